//! The chat page in a real browser (headless Chromium), against the whole
//! stack on the echo runtime: what a person who opens the page sees.

use std::time::Duration;

use hg_e2e::Stack;
use hg_e2e::browser::Browser;

const WAIT: Duration = Duration::from_secs(15);

/// Types `text` into the message box and submits the form (the Send
/// button).
fn submit(text: &str) -> String {
    format!(
        "document.getElementById('text').value = {}; document.getElementById('form').requestSubmit(); true",
        serde_json::json!(text)
    )
}

/// A browser showing the chat page of the web replica at `url`, once the
/// page has connected.
async fn chat_page(url: &str) -> Browser {
    let mut browser = Browser::launch().await;
    browser.open(&format!("{url}/")).await;
    browser
        .wait_for(
            "document.getElementById('conn').textContent === 'connected'",
            WAIT,
        )
        .await;
    browser
}

/// True once the agent's replies include `text` (replies are rendered
/// HTML, so their text ends with a newline).
fn agent_said(text: &str) -> String {
    format!(
        "{}.some(t => t.trim() === {})",
        texts("agent"),
        serde_json::json!(text)
    )
}

/// Texts of all the page's messages, in order.
const ALL_MESSAGES: &str = "[...document.querySelectorAll('#log .msg')].map(e => e.textContent)";

/// Texts of the page's messages of one kind ("me", "agent", "status").
fn texts(kind: &str) -> String {
    format!("[...document.querySelectorAll('#log .msg.{kind}')].map(e => e.textContent)")
}

#[tokio::test]
async fn the_chat_page_talks_over_its_socket_and_keeps_the_conversation_across_a_reload() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack.default_web().await;
    let mut browser = chat_page(&url).await;
    // The echo runtime says what it is.
    browser
        .wait_for(
            "getComputedStyle(document.getElementById('banner')).display !== 'none' \
             && document.getElementById('runtime').textContent === 'runtime: echo'",
            WAIT,
        )
        .await;
    // Count the page's HTTP posts: with the socket open, messages go on it.
    browser
        .eval(
            "window.posts = 0; { const f = window.fetch; \
             window.fetch = (u, o) => { if (String(u).includes('/api/v1/messages')) window.posts++; return f(u, o); }; } true",
        )
        .await;

    // Typing and pressing Enter sends; the reply is rendered Markdown.
    browser
        .eval(
            "{ const box = document.getElementById('text'); box.value = 'hello **browser**'; \
             box.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true })); } true",
        )
        .await;
    let shown = browser
        .wait_for(
            "[...document.querySelectorAll('#log .msg.agent')].map(e => e.innerHTML).find(h => h.includes('<strong>browser</strong>'))",
            WAIT,
        )
        .await;
    assert_eq!(shown, "<p>hello <strong>browser</strong></p>\n");
    assert_eq!(
        browser.eval(&texts("me")).await,
        serde_json::json!(["hello **browser**"])
    );
    assert_eq!(
        browser.eval("document.getElementById('text').value").await,
        ""
    );

    // A message over the limit is refused with the server's reason, shown
    // in the page; nothing is lost from the conversation.
    browser.eval(&submit(&"x".repeat(16_001))).await;
    let refused = browser
        .wait_for(
            &format!("{}.find(t => t.includes('limit'))", texts("status")),
            WAIT,
        )
        .await;
    assert_eq!(
        refused, "⚠️ text has 16001 characters; the limit is 16000",
        "the page shows why the message was refused"
    );

    // A chat command answers in the same conversation.
    browser.eval(&submit("/status")).await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#log .msg')].some(e => e.textContent.includes('turns: 1'))",
            WAIT,
        )
        .await;
    assert_eq!(
        browser.eval("window.posts").await,
        0,
        "with the socket open, no message was posted over HTTP"
    );

    // After a reload the conversation is still there and the page
    // reconnects with the same user: the next reply arrives too.
    let before = browser.eval(ALL_MESSAGES).await;
    browser
        .eval("window.before_reload = true; location.reload(); true")
        .await;
    browser
        .wait_for(
            "window.before_reload === undefined && document.getElementById('conn').textContent === 'connected'",
            WAIT,
        )
        .await;
    // Anything the server wrongly replayed would arrive right after the
    // socket's ready frame.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        browser.eval(ALL_MESSAGES).await,
        before,
        "the transcript survives a reload, with nothing replayed twice"
    );
    browser.eval(&submit("still me")).await;
    browser.wait_for(&agent_said("still me"), WAIT).await;
}

#[tokio::test]
async fn the_chat_page_reconnects_and_shows_a_reply_it_missed_once() {
    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (web, url) = stack.default_web().await;
    // Another replica stays up while the page's one restarts.
    let (_other, other_url) = stack.default_web().await;
    let mut browser = chat_page(&url).await;
    browser.eval(&submit("before")).await;
    browser.wait_for(&agent_said("before"), WAIT).await;

    // The page's server goes away; the page says so.
    web.stop().await;
    browser
        .wait_for(
            "document.getElementById('conn').textContent === 'reconnecting…'",
            WAIT,
        )
        .await;
    // Meanwhile the same user (another tab, through the other replica)
    // gets a reply the page does not see yet.
    let token = browser.eval("localStorage.getItem('hg.token')").await;
    let token = token.as_str().expect("the page keeps its token");
    let sent = reqwest::Client::new()
        .post(format!("{other_url}/api/v1/messages"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "text": "while away" }))
        .send()
        .await
        .expect("post to the other replica");
    assert_eq!(sent.status(), 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        browser.eval(&format!("{}.length", texts("agent"))).await,
        1,
        "nothing reaches the page while its server is down"
    );

    // The server is back where it was: the page reconnects with the last
    // event id it saw and gets the missed reply, once.
    let addr = url.trim_start_matches("http://");
    let (_web, _) = stack.web_at(hg_e2e::web_config(), addr).await;
    browser.wait_for(&agent_said("while away"), WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = browser.eval(&texts("agent")).await;
    let agent: Vec<&str> = agent
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().unwrap_or_default().trim())
        .collect();
    assert_eq!(agent, ["before", "while away"]);
    assert_eq!(
        browser
            .eval("document.getElementById('conn').textContent")
            .await,
        "connected"
    );
}
