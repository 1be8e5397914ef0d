//! `harnessgate pairing` as an operator uses it, against a real nats-server:
//! a code the bridge issued is listed, approved (the user is told), and an
//! unknown or repeated code is refused with a clear error.

mod common;

use std::process::Output;

use common::text;

use futures::StreamExt;
use hg_bridge::access::{PairingConfig, PairingRequest, PairingStatus, PairingStore};
use hg_bus::{Bus, BusConfig};
use hg_proto::OutboundMessage;
use hg_testkit::nats::NatsServer;

fn harnessgate(nats: &NatsServer, args: &[&str]) -> Output {
    common::harnessgate()
        .env("HG_NATS__URL", nats.url())
        .args(args)
        .output()
        .expect("run harnessgate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_list_and_approve_let_a_waiting_user_in() {
    let nats = NatsServer::start();
    let bus = Bus::connect(&BusConfig {
        url: nats.url(),
        ..BusConfig::default()
    })
    .await
    .unwrap();
    let store = PairingStore::open(&bus).await.unwrap();
    let request = PairingRequest {
        code: String::new(),
        platform: "telegram".into(),
        app_id: "1001".into(),
        user_id: "55".into(),
        username: "ana".into(),
        display_name: "Ana".into(),
        channel_id: "55".into(),
        created_ms: 0,
        expires_ms: 0,
    };
    let PairingStatus::Pending(issued) = store
        .status(request, &PairingConfig::default(), hg_proto::now_ms())
        .await
        .unwrap()
    else {
        panic!("a code is issued");
    };
    let mut told = bus
        .client()
        .subscribe("hg.out.telegram.1001")
        .await
        .unwrap();

    let listed = harnessgate(&nats, &["pairing", "list"]);
    let out = text(&listed);
    assert!(listed.status.success(), "{out}");
    assert!(out.contains(&issued.code) && out.contains("@ana"), "{out}");

    let approved = harnessgate(&nats, &["pairing", "approve", &issued.code.to_lowercase()]);
    let out = text(&approved);
    assert!(approved.status.success(), "{out}");
    assert!(out.contains("approved 55 on telegram/1001"), "{out}");
    assert!(store.is_paired("telegram", "1001", "55").await.unwrap());
    let notice = tokio::time::timeout(std::time::Duration::from_secs(5), told.next())
        .await
        .expect("the user is told")
        .unwrap();
    let notice: OutboundMessage = hg_bus::decode(&notice.payload).unwrap();
    assert_eq!(notice.channel_id, "55");
    assert!(notice.text.contains("You can talk to the agent now"));

    let again = harnessgate(&nats, &["pairing", "approve", &issued.code]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("no pending pairing code"),
        "{}",
        text(&again)
    );
    let listed = harnessgate(&nats, &["pairing", "list"]);
    assert!(text(&listed).contains("no pairing codes waiting"));
}
