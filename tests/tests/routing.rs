//! Who serves a message: static rules, the resolver on `hg.resolve`, the
//! default route; and several bridge replicas sharing the work.

use std::time::Duration;

use futures::StreamExt;
use hg_bridge::BridgeConfig;
use hg_bridge::routing::{ResolverConfig, ResolverFallback, RouteRule};
use hg_e2e::{Stack, WebUser, echo_providers, fast_bridge_config};
use hg_proto::{Message, ResolveRequest, ResolveResponse};

const WAIT: Duration = Duration::from_secs(10);

fn with_resolver(on_failure: ResolverFallback) -> BridgeConfig {
    BridgeConfig {
        resolver: ResolverConfig {
            enabled: true,
            timeout: Duration::from_millis(300),
            on_failure,
        },
        ..fast_bridge_config()
    }
}

#[tokio::test]
async fn a_static_rule_rejects_a_sender_with_its_message() {
    let stack = Stack::start().await;
    let (_web, url) = stack.default_web().await;
    let blocked = WebUser::signup(&url).await;
    let other = WebUser::signup(&url).await;
    let config = BridgeConfig {
        routes: vec![RouteRule {
            sender: Some(blocked.user_id.clone()),
            reject: true,
            reject_message: "You are not allowed to use this agent.".into(),
            ..RouteRule::default()
        }],
        ..fast_bridge_config()
    };
    let _bridge = stack.bridge(config, echo_providers()).await;
    let mut blocked_events = blocked.events(None).await;
    let mut other_events = other.events(None).await;
    blocked.send("let me in").await;
    other.send("hello").await;
    let answer = blocked_events.next_message(WAIT).await.unwrap();
    assert_eq!(answer.kind, "status");
    assert_eq!(answer.text, "You are not allowed to use this agent.");
    assert_eq!(other_events.next_message(WAIT).await.unwrap().text, "hello");
}

#[tokio::test]
async fn the_resolver_decides_and_a_rejected_sender_never_reaches_the_agent() {
    let stack = Stack::start().await;
    let (_web, url) = stack.default_web().await;
    let allowed = WebUser::signup(&url).await;
    let refused = WebUser::signup(&url).await;
    let refused_id = refused.user_id.clone();
    let mut requests = stack.bus.client().subscribe("hg.resolve").await.unwrap();
    let client = stack.bus.client().clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let asked = ResolveRequest::decode(request.payload.as_ref()).unwrap();
            let sender = asked.message.unwrap().sender.unwrap().id;
            let answer = if sender == refused_id {
                ResolveResponse {
                    reject: true,
                    reject_reason: "Ask an admin for access.".into(),
                    ..Default::default()
                }
            } else {
                ResolveResponse {
                    runtime: "echo".into(),
                    ..Default::default()
                }
            };
            client
                .publish(request.reply.unwrap(), answer.encode_to_vec().into())
                .await
                .unwrap();
        }
    });
    let _bridge = stack
        .bridge(with_resolver(ResolverFallback::Reject), echo_providers())
        .await;
    let mut allowed_events = allowed.events(None).await;
    let mut refused_events = refused.events(None).await;
    allowed.send("routed by the resolver").await;
    refused.send("secret plans").await;
    assert_eq!(
        allowed_events.next_message(WAIT).await.unwrap().text,
        "routed by the resolver"
    );
    let got = refused_events.collect(Duration::from_secs(2)).await;
    let texts: Vec<_> = got.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(
        texts,
        vec!["Ask an admin for access."],
        "the agent never echoed the message"
    );
}

#[tokio::test]
async fn without_a_resolver_answer_the_configured_fallback_applies() {
    let stack = Stack::start().await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;

    // No responder at all, fallback "default": served by the default route.
    let bridge = stack
        .bridge(with_resolver(ResolverFallback::Default), echo_providers())
        .await;
    user.send("nobody resolves").await;
    assert_eq!(
        events.next_message(WAIT).await.unwrap().text,
        "nobody resolves"
    );
    bridge.stop().await;

    // A resolver that never answers (timeout), fallback "reject": not served.
    let _silent = stack.bus.client().subscribe("hg.resolve").await.unwrap();
    let _bridge = stack
        .bridge(with_resolver(ResolverFallback::Reject), echo_providers())
        .await;
    user.send("resolver asleep").await;
    assert!(events.collect(Duration::from_secs(2)).await.is_empty());
}

#[tokio::test]
async fn three_bridge_replicas_answer_every_message_once_and_in_order() {
    let stack = Stack::start().await;
    let mut bridges = Vec::new();
    for _ in 0..3 {
        bridges.push(stack.echo_bridge().await);
    }
    let (_web, url) = stack.default_web().await;
    let mut users = Vec::new();
    for _ in 0..12 {
        let user = WebUser::signup(&url).await;
        let events = user.events(None).await;
        users.push((user, events));
    }
    // Each user sends a burst without waiting: order must still hold.
    for (i, (user, _)) in users.iter().enumerate() {
        for m in 0..5 {
            user.send(&format!("user {i} message {m}")).await;
        }
    }
    for (i, (_, events)) in users.iter_mut().enumerate() {
        let mut texts = Vec::new();
        while texts.len() < 5 {
            let event = events
                .next_message(Duration::from_secs(20))
                .await
                .expect("a reply");
            texts.push(event.text);
        }
        let expected: Vec<String> = (0..5).map(|m| format!("user {i} message {m}")).collect();
        assert_eq!(texts, expected);
        assert!(
            events.collect(Duration::from_millis(100)).await.is_empty(),
            "nothing twice"
        );
    }
}
