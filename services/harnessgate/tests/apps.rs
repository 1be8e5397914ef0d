//! `harnessgate apps` as an operator uses it, against a real nats-server
//! and the fake Bot API.

mod common;

use std::process::Output;

use common::text;

use hg_testkit::fake_telegram::FakeTelegram;
use hg_testkit::nats::NatsServer;

fn harnessgate(nats: &NatsServer, api_url: &str, args: &[&str]) -> Output {
    common::harnessgate()
        .env("HG_NATS__URL", nats.url())
        .env("HG_TELEGRAM__API_URL", api_url)
        .env("RUST_LOG", "trace")
        .args(args)
        .output()
        .expect("run harnessgate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_add_list_remove_never_print_the_token() {
    let nats = NatsServer::start();
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(4242, "cli_bot");
    let url = fake.api_url();
    let secret = token.split_once(':').unwrap().1.to_owned();

    // The fake answers from the runtime's other worker while this one waits
    // for the process.
    let added = harnessgate(
        &nats,
        &url,
        &[
            "apps", "add", "telegram", "--token", &token, "--name", "support",
        ],
    );
    let out = text(&added);
    assert!(added.status.success(), "{out}");
    assert!(out.contains("added telegram app 4242 (@cli_bot)"), "{out}");
    assert!(!out.contains(&secret), "the token was printed: {out}");
    assert_eq!(fake.calls("getMe").len(), 1, "the token was checked");

    let listed = harnessgate(&nats, &url, &["apps", "list"]);
    let out = text(&listed);
    assert!(listed.status.success(), "{out}");
    assert!(out.contains("4242"), "{out}");
    assert!(out.contains("@cli_bot"), "{out}");
    assert!(out.contains("support"), "{out}");
    assert!(out.contains("runtime"), "{out}");
    assert!(out.contains("4242:****"), "{out}");
    assert!(!out.contains(&secret), "the token was printed: {out}");

    let bad = harnessgate(
        &nats,
        &url,
        &["apps", "add", "telegram", "--token", "4243:wrong-secret"],
    );
    let out = text(&bad);
    assert!(!bad.status.success(), "{out}");
    assert!(out.contains("rejected"), "{out}");
    assert!(!out.contains("wrong-secret"), "{out}");

    let removed = harnessgate(&nats, &url, &["apps", "remove", "4242"]);
    let out = text(&removed);
    assert!(removed.status.success(), "{out}");
    assert!(out.contains("removed telegram app 4242"), "{out}");
    let again = harnessgate(&nats, &url, &["apps", "remove", "4242"]);
    assert!(!again.status.success());
    assert!(text(&again).contains("no runtime app 4242"));
    let listed = harnessgate(&nats, &url, &["apps", "list"]);
    assert!(!text(&listed).contains("4242"), "{}", text(&listed));
}
