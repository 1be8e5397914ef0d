//! A headless Chromium driven over the DevTools protocol, for tests of the
//! chat page as a browser runs it.
//!
//! Only what the tests need: open a page, evaluate JavaScript in it, wait
//! for a condition. The browser is Debian's `chromium` (or `CHROMIUM_BIN`);
//! `scripts/ensure-chromium.sh` installs it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One headless browser with one page, closed on drop.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    /// The DevTools session of the page.
    session: String,
    next_id: u64,
}

fn binary() -> String {
    if let Ok(path) = std::env::var("CHROMIUM_BIN") {
        return path;
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or_else(|| {
            panic!("no chromium on PATH: run scripts/ensure-chromium.sh (or set CHROMIUM_BIN)")
        })
        .to_owned()
}

impl Browser {
    /// Starts the browser with a fresh profile and opens a blank page.
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("browser profile dir");
        let mut child = Command::new(binary())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // The browser prints its DevTools address on stderr; the rest of
        // stderr is drained so the browser never blocks on it.
        let stderr = child.stderr.take().expect("chromium stderr");
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = found.send(url.trim().to_owned());
                }
            }
        });
        let url =
            tokio::task::spawn_blocking(move || address.recv_timeout(Duration::from_secs(30)))
                .await
                .expect("wait for chromium")
                .expect("chromium did not print its DevTools address within 30 s");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to the DevTools socket");
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target = target["targetId"].as_str().expect("target id").to_owned();
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        browser
    }

    /// Sends a DevTools command (to the page once attached) and returns
    /// its result; events that arrive meanwhile are skipped.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params).await {
            Ok(result) => result,
            Err(error) => panic!("{method} failed: {error}"),
        }
    }

    /// [`Browser::call`], with the command's error returned.
    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            command["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send a DevTools command");
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(frame) = self.socket.next().await {
                let Ok(Message::Text(text)) = frame else {
                    continue;
                };
                let answer: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if answer["id"] == id {
                    return answer;
                }
            }
            panic!("the DevTools socket closed");
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
        match answer.get("error") {
            Some(error) => Err(error.to_string()),
            None => Ok(answer["result"].clone()),
        }
    }

    /// Loads `url` in the page.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns
    /// its value; a thrown exception fails the test.
    pub async fn eval(&mut self, expression: &str) -> Value {
        match self.try_eval(expression).await {
            Ok(value) => value,
            Err(error) => panic!("{expression} failed: {error}"),
        }
    }

    async fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let result = self
            .try_call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await?;
        match result.get("exceptionDetails") {
            Some(exception) => Err(format!("threw {exception}")),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Evaluates `expression` until it is truthy (as JavaScript judges),
    /// and returns that value; fails the test with the last value after
    /// `timeout`.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> Value {
        let until = tokio::time::Instant::now() + timeout;
        // A falsy value comes back as null. A page that is still loading
        // may have no such elements yet, or no context to evaluate in: both
        // count as "not yet".
        let guarded = format!(
            "(() => {{ try {{ return ({expression}) || null; }} catch (e) {{ return null; }} }})()"
        );
        loop {
            let value = self.try_eval(&guarded).await.unwrap_or(Value::Null);
            if !value.is_null() {
                return value;
            }
            if tokio::time::Instant::now() >= until {
                let last = self.try_eval(expression).await;
                panic!("still not true after {timeout:?}: {expression} (last value {last:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
