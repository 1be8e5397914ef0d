//! Running the `harnessgate` binary from the tests.
// Each test crate uses its own subset.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The binary, started from a clean environment (the host's `HG_…` and
/// `ANTHROPIC_…` settings do not leak in) in the temporary directory.
pub fn harnessgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harnessgate"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HG_") || key.starts_with("ANTHROPIC_") {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(std::env::temp_dir());
    cmd
}

/// Standard output and standard error together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
