//! The bus against a real nats-server started by the test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hg_bus::consumer::{ConsumerSpec, WatchedConsumer};
use hg_bus::lease::{Claim, Lease};
use hg_bus::presence::{Presence, PresenceTimings};
use hg_bus::{Bus, BusConfig};
use hg_proto::{InboundMessage, subject};
use hg_testkit::nats::NatsServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn config(server: &NatsServer) -> BusConfig {
    BusConfig {
        url: server.url(),
        ..BusConfig::default()
    }
}

fn inbound(id: &str) -> InboundMessage {
    InboundMessage {
        id: id.into(),
        platform: "web".into(),
        app_id: "a".into(),
        text: format!("text {id}"),
        ..Default::default()
    }
}

type Seen = Arc<Mutex<Vec<String>>>;

fn spawn_consumer(bus: &Bus, durable: &str, stop: &CancellationToken) -> Seen {
    let seen: Seen = Arc::default();
    let mut spec = ConsumerSpec::new(subject::STREAM_IN, durable, "hg.in.>");
    spec.heartbeat = Duration::from_millis(500);
    spec.expires = Duration::from_secs(2);
    spec.stall_after = Duration::from_secs(2);
    let bus = bus.clone();
    let stop = stop.clone();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let consumer = WatchedConsumer::create(&bus, spec).await.unwrap();
        consumer
            .run(stop, move |d| {
                let msg: InboundMessage = hg_bus::decode(d.payload()).unwrap();
                log.lock().unwrap().push(msg.id);
                tokio::spawn(async move { d.ack().await });
            })
            .await
    });
    seen
}

async fn wait_for(seen: &Seen, n: usize) -> Vec<String> {
    for _ in 0..200 {
        if seen.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.lock().unwrap().clone()
}

#[tokio::test]
async fn duplicate_message_ids_are_stored_once() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let subject = subject::inbound("web", "a");
    let first = bus
        .publish(&subject, &inbound("m1"), Some("m1"))
        .await
        .unwrap();
    let again = bus
        .publish(&subject, &inbound("m1"), Some("m1"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(
        again.duplicate,
        "second publish with the same id must be dropped"
    );
    let stop = CancellationToken::new();
    let seen = spawn_consumer(&bus, "dups", &stop);
    assert_eq!(wait_for(&seen, 1).await, vec!["m1"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    stop.cancel();
}

#[tokio::test]
async fn consumer_recovers_after_the_server_restarts() {
    let mut server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let stop = CancellationToken::new();
    let seen = spawn_consumer(&bus, "restart", &stop);
    let subject = subject::inbound("web", "a");
    bus.publish(&subject, &inbound("before"), Some("before"))
        .await
        .unwrap();
    assert_eq!(wait_for(&seen, 1).await, vec!["before"]);

    // A restarted server has forgotten every outstanding pull request while
    // the client still counts them: the stall the watchdog exists for.
    server.restart();
    let mut published = false;
    for _ in 0..100 {
        if bus
            .publish(&subject, &inbound("after"), Some("after"))
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "publish after restart");
    assert_eq!(wait_for(&seen, 2).await, vec!["before", "after"]);
    stop.cancel();
}

#[tokio::test]
async fn consumer_recovers_when_its_consumer_is_deleted() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let stop = CancellationToken::new();
    let seen = spawn_consumer(&bus, "deleted", &stop);
    let subject = subject::inbound("web", "a");
    bus.publish(&subject, &inbound("one"), Some("one"))
        .await
        .unwrap();
    wait_for(&seen, 1).await;
    let stream = bus
        .jetstream()
        .get_stream(subject::STREAM_IN)
        .await
        .unwrap();
    stream.delete_consumer("deleted").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    bus.publish(&subject, &inbound("two"), Some("two"))
        .await
        .unwrap();
    // The recreated consumer may deliver "one" again (its acks went with
    // the deleted consumer) before "two".
    for _ in 0..200 {
        if seen.lock().unwrap().iter().any(|s| s == "two") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&"two".to_owned()), "{seen:?}");
    stop.cancel();
}

#[tokio::test]
async fn one_lease_holder_at_a_time_and_takeover_after_release() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let a = Lease::open(&bus, "hg_test_leases", Duration::from_secs(30), "a")
        .await
        .unwrap();
    let b = Lease::open(&bus, "hg_test_leases", Duration::from_secs(30), "b")
        .await
        .unwrap();
    let first = a
        .acquire("chat.1")
        .await
        .unwrap()
        .revision()
        .expect("free lease");
    let refreshed = a
        .acquire("chat.1")
        .await
        .unwrap()
        .revision()
        .expect("owner refreshes its lease");
    assert!(refreshed > first);
    assert_eq!(
        b.acquire("chat.1").await.unwrap(),
        Claim::Theirs("a".into())
    );
    assert_eq!(b.holder("chat.1").await.unwrap().as_deref(), Some("a"));
    // A stale revision releases nothing.
    a.release("chat.1", first).await.unwrap();
    assert_eq!(
        b.acquire("chat.1").await.unwrap(),
        Claim::Theirs("a".into())
    );
    a.release("chat.1", refreshed).await.unwrap();
    assert!(matches!(b.acquire("chat.1").await.unwrap(), Claim::Ours(_)));
}

#[tokio::test]
async fn unknown_nats_url_fails_with_a_clear_error() {
    let port = hg_testkit::nats::free_port();
    let err = Bus::connect(&BusConfig {
        url: format!("nats://127.0.0.1:{port}"),
        connect_timeout: Duration::from_millis(500),
        ..BusConfig::default()
    })
    .await
    .err()
    .expect("connect must fail");
    assert!(err.to_string().contains("cannot connect to nats"), "{err}");
}

#[tokio::test]
async fn a_publish_no_stream_takes_or_a_stream_refuses_fails_with_the_reason() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    bus.ensure_streams().await.unwrap();
    let nowhere = bus
        .publish("hg.nowhere", &inbound("m1"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        nowhere.contains("no stream takes this subject"),
        "{nowhere}"
    );

    bus.ensure_stream(async_nats::jetstream::stream::Config {
        name: "TINY".into(),
        subjects: vec!["tiny.>".into()],
        max_message_size: 16,
        ..Default::default()
    })
    .await
    .unwrap();
    let refused = bus
        .publish(
            "tiny.x",
            &inbound("a message longer than sixteen bytes"),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("maximum"), "{refused}");
    assert!(refused.contains("tiny.x"), "names the subject: {refused}");
}

#[tokio::test]
async fn kv_put_stores_new_revisions_readable_by_the_library() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let store = bus.kv(hg_bus::kv_config("hg_test", "test")).await.unwrap();
    let first = bus.kv_put(&store, "k", "one".into()).await.unwrap();
    let second = bus.kv_put(&store, "k", "two".into()).await.unwrap();
    assert!(second > first);
    let entry = store.entry("k").await.unwrap().expect("stored");
    assert_eq!(entry.value.as_ref(), b"two");
    assert_eq!(entry.revision, second);
}

fn quick_presence() -> PresenceTimings {
    PresenceTimings {
        refresh: Duration::from_millis(100),
        echo_window: Duration::from_millis(300),
        stale_after: Duration::from_millis(800),
        join_grace: Duration::from_millis(500),
    }
}

/// A replica joined to the test group; it leaves (deleting its entry) on
/// [`Member::leave`] and stops its task when dropped.
struct Member {
    presence: Presence,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Member {
    async fn leave(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::ops::Deref for Member {
    type Target = Presence;
    fn deref(&self) -> &Presence {
        &self.presence
    }
}

async fn join(bus: &Bus, me: &str) -> Member {
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let presence = Presence::join_with(
        bus,
        "hg_test_replicas",
        me,
        quick_presence(),
        &tracker,
        stop.clone(),
    )
    .await
    .unwrap();
    Member {
        presence,
        tracker,
        stop,
    }
}

/// Polls `check` for up to five seconds.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_replica_is_alone_until_another_joins_and_again_once_it_leaves() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let a = join(&bus, "a").await;
    assert!(a.alone());

    let joining = std::time::Instant::now();
    let b = join(&bus, "b").await;
    assert!(
        joining.elapsed() >= quick_presence().join_grace,
        "a replica that finds others waits before it works"
    );
    // Both know of each other by the time the newcomer starts work.
    assert!(!a.alone());
    assert!(!b.alone());
    assert_eq!(a.others(), ["b"]);
    assert_eq!(b.others(), ["a"]);

    // Leaving deletes the entry: the other one is alone again at once.
    b.leave().await;
    assert!(eventually(|| a.alone()).await, "others: {:?}", a.others());
}

#[tokio::test]
async fn a_replica_that_died_counts_until_its_entry_is_stale() {
    let server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let a = join(&bus, "a").await;
    // What a replica that was killed leaves behind: its last put.
    let store = bus
        .jetstream()
        .get_key_value("hg_test_replicas")
        .await
        .unwrap();
    store.put("dead", "up".into()).await.unwrap();
    assert!(eventually(|| !a.alone()).await);
    assert_eq!(a.others(), ["dead"]);
    assert!(eventually(|| a.alone()).await, "others: {:?}", a.others());
    assert!(a.others().is_empty());
}

#[tokio::test]
async fn a_replica_whose_watch_is_down_is_not_alone_until_it_works_again() {
    let mut server = NatsServer::start();
    let bus = Bus::connect(&config(&server)).await.unwrap();
    let a = join(&bus, "a").await;
    assert!(a.alone());
    server.kill();
    assert!(
        eventually(|| !a.alone()).await,
        "with the server gone the replica cannot know who joined"
    );
    server.restart();
    assert!(
        eventually(|| a.alone()).await,
        "the watch recovers after the server comes back"
    );
}
