//! The web chat end to end on the echo runtime: browser API → NATS →
//! bridge → runtime → egress → NATS → browser, all real.

use std::time::Duration;

use hg_e2e::{Stack, WebUser, dead_letters};
use hg_proto::{InboundMessage, Message, subject};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_message_comes_back_as_a_reply_in_the_event_stream() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("hello **world**").await;
    let reply = events.next_message(WAIT).await.expect("a reply");
    assert_eq!(reply.kind, "reply");
    assert_eq!(reply.text, "hello **world**");
    assert_eq!(reply.html, "<p>hello <strong>world</strong></p>\n");
    assert!(reply.seq > 0);
}

#[tokio::test]
async fn two_users_never_see_each_other_and_a_forged_token_is_refused() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack.default_web().await;
    let ana = WebUser::signup(&url).await;
    let bob = WebUser::signup(&url).await;
    let mut ana_events = ana.events(None).await;
    let mut bob_events = bob.events(None).await;
    ana.send("for ana only").await;
    bob.send("for bob only").await;
    let ana_got = ana_events.collect(Duration::from_secs(3)).await;
    let bob_got = bob_events.collect(Duration::from_secs(1)).await;
    let texts = |events: &[hg_web::hub::WebEvent]| {
        events.iter().map(|e| e.text.clone()).collect::<Vec<_>>()
    };
    assert_eq!(texts(&ana_got), vec!["for ana only"]);
    assert_eq!(texts(&bob_got), vec!["for bob only"]);

    // Bob knows Ana's user id and rewrites his token to claim it.
    let forged = bob.token.replace(&bob.user_id, &ana.user_id);
    let client = reqwest::Client::new();
    let res = client
        .get(format!(
            "{url}/api/v1/events?token={forged}&last_event_id=0"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .post(format!("{url}/api/v1/messages"))
        .bearer_auth(&forged)
        .json(&serde_json::json!({"text": "pretending to be ana"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    // Ana's history is untouched by the attempt.
    let mut replay = ana.events(Some(0)).await;
    assert_eq!(
        texts(&replay.collect(Duration::from_secs(1)).await),
        vec!["for ana only"]
    );
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors_and_the_service_keeps_running() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let client = reqwest::Client::new();
    let post = |body: String, token: Option<&str>| {
        let mut req = client
            .post(format!("{url}/api/v1/messages"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    let cases: Vec<(reqwest::Response, u16, &str)> = vec![
        (
            post("{not json".into(), Some(&user.token)).await.unwrap(),
            400,
            "invalid_json",
        ),
        (
            post(r#"{"text":"hi"}"#.into(), None).await.unwrap(),
            401,
            "unauthorized",
        ),
        (
            post(r#"{"text":"hi"}"#.into(), Some("v1.u_x.1.bad"))
                .await
                .unwrap(),
            401,
            "unauthorized",
        ),
        (
            post(
                format!(r#"{{"text":"{}"}}"#, "a".repeat(70_000)),
                Some(&user.token),
            )
            .await
            .unwrap(),
            413,
            "payload_too_large",
        ),
        (
            post(
                format!(r#"{{"text":"{}"}}"#, "a".repeat(20_000)),
                Some(&user.token),
            )
            .await
            .unwrap(),
            413,
            "message_too_long",
        ),
        (
            post(r#"{"text":"   "}"#.into(), Some(&user.token))
                .await
                .unwrap(),
            400,
            "empty_message",
        ),
        (
            post(
                r#"{"text":"x","client_message_id":"a.b"}"#.into(),
                Some(&user.token),
            )
            .await
            .unwrap(),
            400,
            "invalid_client_message_id",
        ),
        (
            client
                .get(format!("{url}/api/v1/nope"))
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
        ),
        (
            client
                .get(format!("{url}/api/v1/events"))
                .send()
                .await
                .unwrap(),
            401,
            "unauthorized",
        ),
    ];
    for (res, status, code) in cases {
        assert_eq!(res.status().as_u16(), status, "expected {code}");
        let body: serde_json::Value = res.json().await.expect("json error body");
        assert_eq!(body["error"]["code"], code);
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Still serving.
    let mut events = user.events(None).await;
    user.send("still here").await;
    assert_eq!(events.next_message(WAIT).await.unwrap().text, "still here");
}

#[tokio::test]
async fn the_same_inbound_published_twice_is_answered_once() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    // A client retrying its POST with the same id (JetStream dedup).
    for _ in 0..2 {
        let res = user
            .post_message(&serde_json::json!({"text": "once", "client_message_id": "m-1"}))
            .await;
        assert_eq!(res.status(), 202);
    }
    // The same inbound arriving again past the dedup window (no msg id):
    // the bridge recognises it and does not answer again.
    let inbound = InboundMessage {
        id: format!("{}:m-2", user.user_id),
        platform: "web".into(),
        app_id: "default".into(),
        channel_id: user.user_id.clone(),
        chat_type: hg_proto::ChatType::Direct as i32,
        sender: Some(hg_proto::Sender {
            id: user.user_id.clone(),
            ..Default::default()
        }),
        text: "twice".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        stack
            .bus
            .publish(&subject::inbound("web", "default"), &inbound, None)
            .await
            .unwrap();
    }
    let got = events.collect(Duration::from_secs(4)).await;
    let texts: Vec<_> = got.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, vec!["once", "twice"], "{got:?}");
}

#[tokio::test]
async fn a_malformed_bus_payload_is_dead_lettered_with_its_reason() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    stack
        .bus
        .publish_raw(
            &subject::inbound("web", "default"),
            "harnessgate.v1.InboundMessage",
            vec![0xff, 0xff, 0xff].into(),
            None,
        )
        .await
        .unwrap();
    let mut letters = Vec::new();
    for _ in 0..50 {
        letters = dead_letters(&stack.bus).await;
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].service, "bridge");
    assert!(
        letters[0].reason.contains("malformed inbound payload"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].payload, vec![0xff, 0xff, 0xff]);
    // A good message after the bad one is still served.
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("after garbage").await;
    assert_eq!(
        events.next_message(WAIT).await.unwrap().text,
        "after garbage"
    );
    let _ = InboundMessage::default().encode_to_vec();
}

#[tokio::test]
async fn a_reply_reaches_the_user_on_another_replica_and_a_reconnect_gets_what_it_missed() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web_a, url_a) = stack.default_web().await;
    let (_web_b, url_b) = stack.default_web().await;
    let user = WebUser::signup(&url_a).await;
    // Listening on replica A, sending through replica B.
    let mut on_a = user.events(None).await;
    user.via(&url_b).send("cross replica").await;
    let first = on_a
        .next_message(WAIT)
        .await
        .expect("reply on the other replica");
    assert_eq!(first.text, "cross replica");
    drop(on_a);

    // Offline: two replies arrive while no browser is connected.
    user.send("missed one").await;
    user.send("missed two").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut back = user.via(&url_b).events(Some(first.seq)).await;
    let got = back.collect(Duration::from_secs(2)).await;
    let texts: Vec<_> = got.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, vec!["missed one", "missed two"]);
    // And live traffic continues on the same connection.
    user.send("live again").await;
    assert_eq!(back.next_message(WAIT).await.unwrap().text, "live again");
}

#[tokio::test]
async fn the_chat_page_and_api_description_are_served() {
    let stack = Stack::start().await;
    let (_web, url) = stack.default_web().await;
    let page = reqwest::get(format!("{url}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<title>HarnessGate chat</title>"));
    assert!(
        page.contains("Echo runtime"),
        "the page can label the echo runtime"
    );
    assert!(
        page.contains("/api/v1/ws?token="),
        "the page listens on the event socket"
    );
    let spec = reqwest::get(format!("{url}/openapi.yaml"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for path in [
        "/api/v1/sessions",
        "/api/v1/messages",
        "/api/v1/events",
        "/api/v1/ws",
        "/api/v1/info",
    ] {
        assert!(
            spec.contains(&format!("  {path}:")),
            "openapi documents {path}"
        );
    }
    let ready = reqwest::get(format!("{url}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
}

#[tokio::test]
async fn with_two_web_replicas_a_users_replies_arrive_in_order_and_survive_a_replica_stopping() {
    let stack = Stack::start().await;
    let (web_a, url_a) = stack.default_web().await;
    let (_web_b, url_b) = stack.default_web().await;
    let user = WebUser::signup(&url_a).await;
    let mut events = user.via(&url_b).events(None).await;
    let publish = |n: u32| {
        let bus = stack.bus.clone();
        let user = user.user_id.clone();
        async move {
            let out = hg_proto::OutboundMessage {
                id: format!("ordered-{n}"),
                platform: "web".into(),
                app_id: "default".into(),
                channel_id: user.clone(),
                recipient_id: user,
                text: format!("message {n}"),
                kind: hg_proto::OutboundKind::Reply as i32,
                ..Default::default()
            };
            bus.publish(&subject::outbound("web", "default"), &out, Some(&out.id))
                .await
                .unwrap();
        }
    };
    // All at once (acks awaited afterwards), so both replicas' consumers
    // see a backlog; the stream keeps the publish order of one connection.
    let mut acks = Vec::new();
    for n in 0..40 {
        let out = hg_proto::OutboundMessage {
            id: format!("ordered-{n}"),
            platform: "web".into(),
            app_id: "default".into(),
            channel_id: user.user_id.clone(),
            recipient_id: user.user_id.clone(),
            text: format!("message {n}"),
            kind: hg_proto::OutboundKind::Reply as i32,
            ..Default::default()
        };
        let ack = stack
            .bus
            .jetstream()
            .publish(
                subject::outbound("web", "default"),
                out.encode_to_vec().into(),
            )
            .await
            .unwrap();
        acks.push(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let got: Vec<String> = events
        .collect(Duration::from_secs(3))
        .await
        .into_iter()
        .filter(|e| e.kind == "reply")
        .map(|e| e.text)
        .collect();
    let want: Vec<String> = (0..40).map(|n| format!("message {n}")).collect();
    assert_eq!(got, want, "in publish order, each once");
    // The replica that was sending (or not) stops: delivery goes on.
    web_a.stop().await;
    publish(40).await;
    let next = events.next_message(Duration::from_secs(15)).await;
    assert_eq!(next.map(|e| e.text).as_deref(), Some("message 40"));
}

#[tokio::test]
async fn the_websocket_carries_replies_across_replicas_and_replays_what_a_reconnect_missed() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web_a, url_a) = stack.default_web().await;
    let (_web_b, url_b) = stack.default_web().await;
    let ana = WebUser::signup(&url_a).await;
    let bob = WebUser::signup(&url_a).await;
    let mut on_a = ana.socket(None).await;
    let mut bob_socket = bob.socket(None).await;
    ana.via(&url_b).send("over a **socket**").await;
    let first = on_a.next_message(WAIT).await.expect("a reply");
    assert_eq!(first.kind, "reply");
    assert_eq!(first.text, "over a **socket**");
    assert_eq!(first.html, "<p>over a <strong>socket</strong></p>\n");
    assert!(first.seq > 0);
    assert!(
        bob_socket.collect(Duration::from_secs(1)).await.is_empty(),
        "another user's socket sees nothing"
    );
    drop(on_a);

    ana.send("missed one").await;
    ana.send("missed two").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut back = ana.via(&url_b).socket(Some(first.seq)).await;
    let texts: Vec<_> = back
        .collect(Duration::from_secs(2))
        .await
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, vec!["missed one", "missed two"]);
    ana.send("live again").await;
    assert_eq!(back.next_message(WAIT).await.unwrap().text, "live again");
}

#[tokio::test]
async fn the_websocket_refuses_bad_tokens_and_plain_requests_and_closes_on_shutdown() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (web, url) = stack.default_web().await;
    let ana = WebUser::signup(&url).await;
    let bob = WebUser::signup(&url).await;

    // A forged token is refused before the upgrade, with the JSON error.
    let forged = bob.token.replace(&bob.user_id, &ana.user_id);
    let ws_url = url.replacen("http://", "ws://", 1);
    match tokio_tungstenite::connect_async(format!("{ws_url}/api/v1/ws?token={forged}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 401);
            let body: serde_json::Value =
                serde_json::from_slice(res.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        other => panic!("forged token accepted: {:?}", other.map(|(_, res)| res)),
    }
    // A plain GET (no upgrade) gets a JSON error naming the problem.
    let res = reqwest::get(format!("{url}/api/v1/ws?token={}", ana.token))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "websocket_required");

    // Stopping the service closes open sockets with "going away".
    let mut socket = ana.socket(None).await;
    web.stop().await;
    assert_eq!(socket.closed(WAIT).await, Some(1001));
}

#[tokio::test]
async fn messages_sent_on_the_websocket_are_accepted_in_order_and_bad_ones_get_the_post_errors() {
    use tokio_tungstenite::tungstenite::Message as Frame;
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack
        .web(hg_web::WebConfig {
            max_body_bytes: 1024,
            max_message_chars: 200,
            ..hg_e2e::web_config()
        })
        .await;
    let ana = WebUser::signup(&url).await;
    let mut chat = ana.chat_socket(None).await;

    // Messages sent back to back are stored and answered in the order sent.
    for n in 0..5 {
        let body =
            serde_json::json!({"text": format!("m{n}"), "client_message_id": format!("c{n}")});
        chat.send_frame(Frame::Text(body.to_string().into())).await;
    }
    for n in 0..5 {
        let answer = chat.answer().await;
        assert_eq!(answer["kind"], "accepted", "{answer}");
        assert_eq!(answer["id"], format!("c{n}"));
    }
    let mut texts = Vec::new();
    for _ in 0..5 {
        texts.push(chat.events.next_kind("reply", WAIT).await.text);
    }
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);
    // A resent client id is accepted again but answered once.
    let again = chat
        .post(&serde_json::json!({"text": "m0", "client_message_id": "c0"}))
        .await;
    assert_eq!(again["kind"], "accepted");
    assert!(chat.events.collect(Duration::from_secs(1)).await.is_empty());

    // Bad frames get what a POST would, and the socket stays usable.
    let text = |s: String| Frame::Text(s.into());
    assert_eq!(
        refused(&mut chat, text("{not json".into())).await,
        (400, "invalid_json".into())
    );
    assert_eq!(
        refused(&mut chat, text(r#"{"text": "  "}"#.into())).await,
        (400, "empty_message".into())
    );
    let long = serde_json::json!({"text": "x".repeat(201)}).to_string();
    assert_eq!(
        refused(&mut chat, text(long)).await,
        (413, "message_too_long".into())
    );
    let oversize = serde_json::json!({"text": "y".repeat(1500)}).to_string();
    assert_eq!(
        refused(&mut chat, text(oversize)).await,
        (413, "payload_too_large".into())
    );
    assert_eq!(
        refused(&mut chat, Frame::Binary(b"{}".to_vec().into())).await,
        (400, "text_frames_only".into())
    );
    chat.send("still here").await;
    assert_eq!(
        chat.events.next_kind("reply", WAIT).await.text,
        "still here"
    );

    // A frame far beyond the limit closes the socket: "message too big".
    chat.send_frame(text("z".repeat(5000))).await;
    assert_eq!(chat.events.closed(WAIT).await, Some(1009));
}

/// Sends a frame the server must refuse; its (status, error code).
async fn refused(
    chat: &mut hg_e2e::ChatSocket,
    raw: tokio_tungstenite::tungstenite::Message,
) -> (u64, String) {
    chat.send_frame(raw).await;
    let answer = chat.answer().await;
    assert_eq!(answer["kind"], "error", "{answer}");
    (
        answer["status"].as_u64().unwrap(),
        answer["error"]["code"].as_str().unwrap().to_owned(),
    )
}
