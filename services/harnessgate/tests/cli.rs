//! The binary as an operator uses it.

mod common;

use std::process::Command;

use common::harnessgate;

#[test]
fn config_check_prints_the_effective_config_without_secrets() {
    let out = harnessgate()
        .args(["config", "check"])
        .env("ANTHROPIC_API_KEY", "sk-ant-secret-value")
        .env("HG_CLAUDE__AGENT_ID", "agent_1")
        .env("HG_CLAUDE__ENVIRONMENT_ID", "env_1")
        .env("HG_WEB__LISTEN", "127.0.0.1:9999")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("sk-ant-secret-value"), "{text}");
    assert!(text.contains("api_key = \"<redacted>\""));
    assert!(
        text.contains("listen = \"127.0.0.1:9999\""),
        "env overrides apply"
    );
    assert!(
        text.contains("runtime = \"claude\""),
        "claude becomes the default route"
    );
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[web]\nmax_body_bytes = \"lots\"\n").unwrap();
    let out = harnessgate()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web.max_body_bytes"), "{err}");

    std::fs::write(&file, "[web]\nlisen = \"typo\"\n").unwrap();
    let out = harnessgate()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));

    let out = harnessgate()
        .args(["config", "check"])
        .env("ANTHROPIC_API_KEY", "sk-ant-x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("claude.agent_id"));

    let out = harnessgate()
        .args([
            "config",
            "check",
            "--config",
            "/nonexistent/harnessgate.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn up_without_nats_server_explains_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = harnessgate()
        .arg("up")
        .env("PATH", dir.path())
        .env("HG_UP__DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nats-server is not installed"), "{err}");
    assert!(err.contains("apt-get install nats-server"), "{err}");
}

#[test]
fn run_serves_health_and_drains_on_sigterm() {
    let nats = hg_testkit::nats::NatsServer::start();
    let web_port = hg_testkit::nats::free_port();
    let admin_port = hg_testkit::nats::free_port();
    let mut child = harnessgate()
        .args(["run", "bridge", "web"])
        .env("HG_NATS__URL", nats.url())
        .env("HG_WEB__LISTEN", format!("127.0.0.1:{web_port}"))
        .env("HG_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        http_status(admin_port, "/readyz") == Some(200)
            && http_status(web_port, "/readyz") == Some(200)
    });
    assert!(ready, "admin and web endpoints become ready");
    assert_eq!(http_status(admin_port, "/healthz"), Some(200));
    // The bridge counts the replicas it sees (itself).
    let seen = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        http_get(admin_port, "/metrics").is_some_and(|(status, body)| {
            status == 200 && body.contains("hg_replicas_seen{bucket=\"hg_bridge_replicas\"} 1")
        })
    });
    assert!(seen, "/metrics shows the replicas the bridge sees");

    let started = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "drains within the grace period"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("draining"), "{stderr}");
}

/// Status code of a plain HTTP/1.1 GET on localhost.
fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// Status code and body of a plain HTTP/1.1 GET on localhost.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

#[tokio::test]
async fn tail_prints_bus_messages_decoded() {
    let nats = hg_testkit::nats::NatsServer::start();
    let bus = hg_bus::Bus::connect(&hg_bus::BusConfig {
        url: nats.url(),
        ..Default::default()
    })
    .await
    .unwrap();
    let child = harnessgate()
        .args(["tail", "hg.in.>", "-n", "1"])
        .env("HG_NATS__URL", nats.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let message = hg_proto::InboundMessage {
        id: "m-1".into(),
        platform: "web".into(),
        app_id: "default".into(),
        text: "hello from the bus".into(),
        ..Default::default()
    };
    // Publish until tail has subscribed and printed (it exits after one).
    let output = tokio::task::spawn_blocking(move || child.wait_with_output());
    tokio::pin!(output);
    let output = loop {
        bus.publish(
            &hg_proto::subject::inbound("web", "default"),
            &message,
            None,
        )
        .await
        .unwrap();
        tokio::select! {
            out = &mut output => break out.unwrap().unwrap(),
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    };
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.starts_with("hg.in.web.default harnessgate.v1.InboundMessage"),
        "{stdout}"
    );
    assert!(stdout.contains("hello from the bus"), "{stdout}");
}
