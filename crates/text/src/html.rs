//! Safe HTML rendering for the web channel.

use pulldown_cmark::{Event, LinkType, Parser, Tag, TagEnd, html};

/// Renders Markdown to HTML that is safe to insert into a web page.
///
/// Raw HTML, whether a block or inline, is escaped and shown as text. Links
/// and images whose URL has a scheme other than `http`, `https` or `mailto`
/// are dropped while their text stays; relative URLs are kept. GFM tables,
/// strikethrough and task lists are enabled.
pub fn render_html(markdown: &str) -> String {
    // One entry per open link or image: whether its start tag was kept, so
    // the matching end tag is kept or dropped with it.
    let mut kept: Vec<bool> = Vec::new();
    // Inside a raw HTML block, whether a line ended before the next one.
    let mut line_ended = false;
    let events = Parser::new_ext(markdown, crate::options()).flat_map(|event| {
        let (first, second) = match event {
            // A raw HTML block is shown as a paragraph of text, line by line.
            Event::Start(Tag::HtmlBlock) => {
                line_ended = false;
                (Some(Event::Start(Tag::Paragraph)), None)
            }
            Event::End(TagEnd::HtmlBlock) => (Some(Event::End(TagEnd::Paragraph)), None),
            Event::Html(raw) => {
                let line_break = std::mem::replace(&mut line_ended, raw.ends_with('\n'));
                let text = Event::Text(raw.trim_end_matches('\n').to_owned().into());
                (line_break.then_some(Event::HardBreak), Some(text))
            }
            Event::InlineHtml(raw) => (Some(Event::Text(raw)), None),
            Event::Start(Tag::Link {
                link_type,
                ref dest_url,
                ..
            }) => {
                let keep = link_type == LinkType::Email || is_safe_url(dest_url);
                kept.push(keep);
                (keep.then_some(event), None)
            }
            Event::Start(Tag::Image { ref dest_url, .. }) => {
                let keep = is_safe_url(dest_url);
                kept.push(keep);
                (keep.then_some(event), None)
            }
            Event::End(TagEnd::Link | TagEnd::Image) => {
                (kept.pop().unwrap_or(true).then_some(event), None)
            }
            other => (Some(other), None),
        };
        first.into_iter().chain(second)
    });
    let mut out = String::with_capacity(markdown.len() + markdown.len() / 2);
    html::push_html(&mut out, events);
    out
}

/// Whether a link or image URL is relative or uses an allowed scheme.
///
/// Browsers ignore tabs and newlines anywhere in a URL and strip leading
/// control characters and spaces, so those are removed before the scheme is
/// read. Anything before the first `:` that is not preceded by `/`, `?` or
/// `#` is taken as a scheme, even when it is not a well-formed one.
fn is_safe_url(url: &str) -> bool {
    let cleaned: String = url
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let cleaned = cleaned.trim_matches(|c: char| c <= ' ');
    match cleaned.find([':', '/', '?', '#']) {
        Some(i) if cleaned.as_bytes()[i] == b':' => {
            let scheme = &cleaned[..i];
            ["http", "https", "mailto"]
                .iter()
                .any(|allowed| scheme.eq_ignore_ascii_case(allowed))
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::is_safe_url;

    #[test]
    fn url_schemes() {
        for safe in [
            "https://example.com/a?b#c",
            "HTTP://example.com",
            "mailto:a@example.com",
            "/relative/path",
            "relative",
            "./a:b",
            "?q=a:b",
            "#frag:x",
            "//example.com/x",
        ] {
            assert!(is_safe_url(safe), "{safe}");
        }
        for unsafe_url in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            " javascript:alert(1)",
            "java\tscript:alert(1)",
            "\u{1}javascript:alert(1)",
            "vbscript:x",
            "data:text/html,<script>alert(1)</script>",
            "file:///etc/passwd",
            "weird scheme:x",
        ] {
            assert!(!is_safe_url(unsafe_url), "{unsafe_url:?}");
        }
    }
}
