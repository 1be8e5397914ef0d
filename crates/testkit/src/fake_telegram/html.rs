//! Telegram's HTML parse mode, as strictly as the Bot API applies it.

/// Tags the Bot API accepts in `parse_mode = "HTML"`.
const TAGS: [&str; 17] = [
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "span",
    "tg-spoiler",
    "a",
    "code",
    "pre",
    "blockquote",
    "tg-emoji",
    "tg-time",
];

/// Parses Telegram HTML and returns its visible text, or the Bot API's
/// error description ("Bad Request: can't parse entities: …").
///
/// Checked: only known tags; every tag closed, in order; `span` only as
/// `class="tg-spoiler"`; nothing but one `code` inside `pre`, nothing
/// inside `code`; no `blockquote` inside another; only the entities
/// `&lt;`, `&gt;`, `&amp;`, `&quot;` and numeric ones; no bare `<`, `>`
/// or `&`.
pub fn parse_html(html: &str) -> Result<String, String> {
    let fail = |reason: String| Err(format!("Bad Request: can't parse entities: {reason}"));
    let mut text = String::new();
    let mut stack: Vec<String> = Vec::new();
    let mut i = 0;
    while i < html.len() {
        let c = html[i..].chars().next().unwrap_or('\0');
        match c {
            '<' => {
                let Some(len) = html[i..].find('>') else {
                    return fail(format!("Unclosed start tag at byte offset {i}"));
                };
                let inner = &html[i + 1..i + len];
                if let Some(name) = inner.strip_prefix('/') {
                    let name = name.trim();
                    match stack.pop() {
                        Some(open) if open == name => {}
                        Some(open) => {
                            return fail(format!(
                                "Unmatched end tag at byte offset {i}, expected \"</{open}>\", found \"</{name}>\""
                            ));
                        }
                        None => {
                            return fail(format!("Unexpected end tag at byte offset {i}"));
                        }
                    }
                } else {
                    let name = inner
                        .split(|c: char| c.is_whitespace())
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    if !TAGS.contains(&name.as_str()) {
                        return fail(format!(
                            "Unsupported start tag \"{name}\" at byte offset {i}"
                        ));
                    }
                    let attrs = inner[name.len()..].trim();
                    if name == "span" && attrs != "class=\"tg-spoiler\"" {
                        return fail(format!("Unsupported start tag \"span\" at byte offset {i}"));
                    }
                    if name == "a" && !attrs.starts_with("href=\"") {
                        return fail(format!("Unsupported start tag \"a\" at byte offset {i}"));
                    }
                    match stack.last().map(String::as_str) {
                        Some("code") => {
                            return fail(format!("Can't use tag \"{name}\" inside \"code\""));
                        }
                        Some("pre") if name != "code" => {
                            return fail(format!("Can't use tag \"{name}\" inside \"pre\""));
                        }
                        _ => {}
                    }
                    if name == "blockquote" && stack.iter().any(|t| t == "blockquote") {
                        return fail("Can't use nested blockquotes".to_owned());
                    }
                    stack.push(name);
                }
                i += len + 1;
            }
            '>' => return fail(format!("Character '>' is reserved at byte offset {i}")),
            '&' => {
                let end = html[i..].find(';').filter(|&e| e <= 10);
                let decoded = end.and_then(|e| entity(&html[i..=i + e]));
                match (end, decoded) {
                    (Some(e), Some(ch)) => {
                        text.push(ch);
                        i += e + 1;
                    }
                    _ => {
                        return fail(format!(
                            "Character '&' is reserved and must be escaped at byte offset {i}"
                        ));
                    }
                }
            }
            _ => {
                text.push(c);
                i += c.len_utf8();
            }
        }
    }
    if let Some(open) = stack.pop() {
        return fail(format!(
            "Can't find end tag corresponding to start tag \"{open}\""
        ));
    }
    Ok(text)
}

fn entity(s: &str) -> Option<char> {
    match s {
        "&lt;" => Some('<'),
        "&gt;" => Some('>'),
        "&amp;" => Some('&'),
        "&quot;" => Some('"'),
        _ => {
            let num = s.strip_prefix("&#")?.strip_suffix(';')?;
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_html;

    #[test]
    fn accepts_what_telegram_accepts() {
        assert_eq!(
            parse_html("<b>a &amp; <i>b</i></b> <pre><code class=\"language-rs\">x &lt; y</code></pre> &#128512;")
                .unwrap(),
            "a & b x < y 😀"
        );
    }

    #[test]
    fn rejects_what_telegram_rejects() {
        for bad in [
            "<b>open",
            "<b><i>x</b></i>",
            "<p>x</p>",
            "a & b",
            "a > b",
            "<pre><b>x</b></pre>",
            "<code><i>x</i></code>",
            "<span>x</span>",
            "</b>",
            "<blockquote><blockquote>x</blockquote></blockquote>",
        ] {
            let err = parse_html(bad).unwrap_err();
            assert!(
                err.starts_with("Bad Request: can't parse entities"),
                "{bad}: {err}"
            );
        }
    }
}
