//! A real `nats-server` with JetStream per test: its own port, its own store
//! directory, killed and cleaned up on drop.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server` child process.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    binary: PathBuf,
    /// HTTP monitoring port (`/varz`), when started with one.
    monitor: Option<u16>,
}

impl NatsServer {
    /// Starts `nats-server` (from `NATS_SERVER_BIN`, else `PATH`) on a free
    /// loopback port with JetStream in a fresh temporary directory, and waits
    /// until it accepts connections.
    ///
    /// # Panics
    /// When the binary is missing or the server does not come up: a test
    /// cannot run without it.
    pub fn start() -> NatsServer {
        Self::start_on(None)
    }

    /// Like [`NatsServer::start`], with the HTTP monitoring endpoint on
    /// (see [`NatsServer::message_counts`]); for benchmarks.
    pub fn start_monitored() -> NatsServer {
        Self::start_on(Some(free_port()))
    }

    fn start_on(monitor: Option<u16>) -> NatsServer {
        let binary = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let store = tempfile::Builder::new()
            .prefix("hg-nats-")
            .tempdir()
            .expect("create jetstream store directory");
        let port = free_port();
        let mut server = NatsServer {
            child: None,
            port,
            store,
            binary,
            monitor,
        };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Messages the server has received and sent so far (`in_msgs`,
    /// `out_msgs` of `/varz`), if it was started with monitoring.
    pub fn message_counts(&self) -> Option<(u64, u64)> {
        use std::io::{Read, Write};
        let mut conn = TcpStream::connect(("127.0.0.1", self.monitor?)).ok()?;
        conn.write_all(b"GET /varz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        conn.read_to_string(&mut response).ok()?;
        let body = &response[response.find("\r\n\r\n")? + 4..];
        let varz: serde_json::Value = serde_json::from_str(body).ok()?;
        Some((varz["in_msgs"].as_u64()?, varz["out_msgs"].as_u64()?))
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL), keeping its store for [`NatsServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path())
            .args(
                self.monitor
                    .map(|port| vec!["-m".to_owned(), port.to_string()])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; install the Debian package nats-server or set NATS_SERVER_BIN",
                    self.binary.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}
