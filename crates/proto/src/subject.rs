//! Subject names on the bus, and the encoding that keeps platform ids from
//! breaking them.
//!
//! NATS subjects are `.`-separated tokens; `*` and `>` are wildcards and
//! whitespace is not allowed. Platform ids (chat ids, user ids, Slack
//! channel ids…) can contain any of these, so every token built from outside
//! data goes through [`token`], which is reversible with [`decode_token`].

/// Prefix of every HarnessGate subject.
pub const PREFIX: &str = "hg";

/// JetStream stream holding `hg.in.>`.
pub const STREAM_IN: &str = "HG_IN";
/// JetStream stream holding `hg.out.>`.
pub const STREAM_OUT: &str = "HG_OUT";
/// JetStream stream holding `hg.events.>` (bounded retention).
pub const STREAM_EVENTS: &str = "HG_EVENTS";
/// JetStream stream holding `hg.dlq.>`.
pub const STREAM_DLQ: &str = "HG_DLQ";

/// Request-reply subject of the optional routing resolver.
pub const RESOLVE: &str = "hg.resolve";

/// `hg.in.<platform>.<app>`
pub fn inbound(platform: &str, app_id: &str) -> String {
    subject("in", &[platform, app_id])
}

/// `hg.out.<platform>.<app>`
pub fn outbound(platform: &str, app_id: &str) -> String {
    subject("out", &[platform, app_id])
}

/// `hg.out.<platform>.>`: every app of one platform, for its egress.
pub fn outbound_platform_filter(platform: &str) -> String {
    let mut filter = subject("out", &[platform]);
    filter.push_str(".>");
    filter
}

/// `hg.receipt.<platform>.<app>`
pub fn receipt(platform: &str, app_id: &str) -> String {
    subject("receipt", &[platform, app_id])
}

/// `hg.events.<session>`
pub fn events(session_key: &str) -> String {
    subject("events", &[session_key])
}

/// `hg.dlq.<service>`: dead letters of one service.
pub fn dead_letter(service: &str) -> String {
    subject("dlq", &[service])
}

/// `hg.tool.<name>`: request-reply for a custom tool.
pub fn tool(name: &str) -> String {
    subject("tool", &[name])
}

/// `hg.command.<name>`: request-reply for a custom chat command.
pub fn command(name: &str) -> String {
    subject("command", &[name])
}

/// Encodes one subject token. Characters outside `[A-Za-z0-9_-]` become
/// `=XX` (hex of each UTF-8 byte), so the result never contains `.`, `*`,
/// `>`, whitespace or anything else NATS treats specially, and distinct
/// inputs stay distinct. The result is also a valid NATS KV key. An empty input becomes `=`.
pub fn token(raw: &str) -> String {
    let mut out = String::with_capacity(token_len(raw));
    push_token(&mut out, raw);
    out
}

/// `hg.<kind>` followed by the encoded `tokens`, dot-separated, built in
/// one allocation: subjects are made several times per message.
fn subject(kind: &str, tokens: &[&str]) -> String {
    let len =
        PREFIX.len() + 1 + kind.len() + tokens.iter().map(|t| token_len(t) + 1).sum::<usize>();
    // Room for a trailing `.>` (filters).
    let mut out = String::with_capacity(len + 2);
    out.push_str(PREFIX);
    out.push('.');
    out.push_str(kind);
    for raw in tokens {
        out.push('.');
        push_token(&mut out, raw);
    }
    out
}

/// Length of [`token`]`(raw)`.
fn token_len(raw: &str) -> usize {
    if raw.is_empty() {
        return 1;
    }
    raw.len() + 2 * raw.bytes().filter(|&b| !is_plain(b)).count()
}

/// Appends [`token`]`(raw)` to `out`.
fn push_token(out: &mut String, raw: &str) {
    if raw.is_empty() {
        out.push('=');
        return;
    }
    let mut rest = raw;
    // Copy runs of plain bytes at once; escape the others.
    while let Some(at) = rest.bytes().position(|b| !is_plain(b)) {
        out.push_str(&rest[..at]);
        let mut buf = [0u8; 4];
        let c = rest[at..].chars().next().expect("a char starts here");
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.push_str(rest);
}

/// Bytes a token keeps as they are.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Reverses [`token`]. Returns `None` when the input is not a valid encoding.
pub fn decode_token(encoded: &str) -> Option<String> {
    if encoded == "=" {
        return Some(String::new());
    }
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_contain_subject_syntax() {
        for raw in [
            "a.b",
            "*",
            ">",
            "with space",
            "tab\tx",
            "-100123",
            "ü.🙂",
            "",
        ] {
            let t = token(raw);
            assert!(!t.is_empty());
            assert!(
                t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=')),
                "{raw:?} -> {t:?}"
            );
            assert_eq!(decode_token(&t).as_deref(), Some(raw));
            assert_eq!(token_len(raw), t.len(), "{raw:?}");
        }
        assert_eq!(token("ü"), "=C3=BC");
    }

    #[test]
    fn distinct_ids_stay_distinct() {
        assert_ne!(token("a.b"), token("a_b"));
        assert_ne!(token("=2E"), token("."));
        assert_eq!(decode_token(&token("=2E")).as_deref(), Some("=2E"));
    }

    #[test]
    fn subjects_are_shaped_as_documented() {
        assert_eq!(inbound("telegram", "123"), "hg.in.telegram.123");
        assert_eq!(outbound("web", "default"), "hg.out.web.default");
        assert_eq!(events("web:u.1"), "hg.events.web=3Au=2E1");
        assert_eq!(outbound_platform_filter("web"), "hg.out.web.>");
        assert_eq!(receipt("a b", ""), "hg.receipt.a=20b.=");
        assert_eq!(decode_token("=ZZ"), None);
    }
}
