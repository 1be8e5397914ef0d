//! The binary as an operator uses it.

use std::process::Command;

fn harnessgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harnessgate"));
    // Start from a clean environment so the host's settings do not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("HG_") || key.starts_with("ANTHROPIC_") {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(std::env::temp_dir());
    cmd
}

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
