//! Rendering replies to HTML for the web channel.

use hg_text::render_html;

#[test]
fn raw_html_blocks_are_shown_as_text() {
    let html =
        render_html("Hello\n\n<script>alert('x')</script>\n\n<div onclick=\"x()\">hi</div>\n");
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<div"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert('x')&lt;/script&gt;"),
        "{html}"
    );
    assert!(
        html.contains("&lt;div onclick=\"x()\"&gt;hi&lt;/div&gt;"),
        "{html}"
    );
    assert!(html.starts_with("<p>Hello</p>"), "{html}");
    assert_eq!(
        render_html("<div>\n  <p>hi</p>\n</div>\n"),
        "<p>&lt;div&gt;<br />\n  &lt;p&gt;hi&lt;/p&gt;<br />\n&lt;/div&gt;</p>\n"
    );
}

#[test]
fn inline_html_is_shown_as_text() {
    let html = render_html("a <img src=x onerror=alert(1)> b <b>bold</b>");
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<b>"), "{html}");
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );
    assert_eq!(
        render_html("- item <span>x</span>"),
        "<ul>\n<li>item &lt;span&gt;x&lt;/span&gt;</li>\n</ul>\n"
    );
}

#[test]
fn unsafe_link_schemes_are_dropped_and_their_text_kept() {
    for markdown in [
        "[click me](javascript:alert(1))",
        "[click me](JAVASCRIPT:alert(1))",
        "[click me](java&#x09;script:alert(1))",
        "[click me](<java\tscript:alert(1)>)",
        "[click me](data:text/html;base64,PHNjcmlwdD4=)",
        "[click me](vbscript:msgbox)",
        "[click me][r]\n\n[r]: javascript:alert(1)",
    ] {
        let html = render_html(markdown);
        assert!(!html.contains("<a"), "{markdown:?} gave {html}");
        assert!(
            !html.to_lowercase().contains("script:"),
            "{markdown:?} gave {html}"
        );
        assert!(html.contains("click me"), "{markdown:?} gave {html}");
    }
    let html = render_html("<javascript:alert(1)>");
    assert!(!html.contains("<a"), "{html}");
    assert!(html.contains("javascript:alert(1)"), "{html}");

    let html =
        render_html("![a cat](javascript:alert(1)) and ![a dog](https://example.com/dog.png)");
    assert!(!html.contains("javascript"), "{html}");
    assert!(html.contains("a cat"), "{html}");
    assert!(
        html.contains("<img src=\"https://example.com/dog.png\" alt=\"a dog\" />"),
        "{html}"
    );
}

#[test]
fn safe_links_are_kept() {
    let html = render_html(
        "[web](https://example.com/a?b=1&c=2) [plain](http://example.com) \
         [mail](mailto:someone@example.com) [page](/docs/intro) [anchor](#top) \
         <https://example.com/auto> <someone@example.com>",
    );
    assert!(
        html.contains("<a href=\"https://example.com/a?b=1&amp;c=2\">web</a>"),
        "{html}"
    );
    assert!(
        html.contains("<a href=\"http://example.com\">plain</a>"),
        "{html}"
    );
    assert!(
        html.contains("<a href=\"mailto:someone@example.com\">mail</a>"),
        "{html}"
    );
    assert!(html.contains("<a href=\"/docs/intro\">page</a>"), "{html}");
    assert!(html.contains("<a href=\"#top\">anchor</a>"), "{html}");
    assert!(
        html.contains("<a href=\"https://example.com/auto\">"),
        "{html}"
    );
    assert!(
        html.contains("<a href=\"mailto:someone@example.com\">someone@example.com</a>"),
        "{html}"
    );
}

#[test]
fn gfm_tables_strikethrough_and_code_render() {
    let html = render_html(
        "| name | value |\n|:-----|------:|\n| a | 1 |\n| <b>b</b> | 2 |\n\n~~old~~ new\n\n```rust\nfn main() {}\n```\n",
    );
    assert!(html.contains("<table>"), "{html}");
    assert!(
        html.contains("<th style=\"text-align: left\">name</th>"),
        "{html}"
    );
    assert!(
        html.contains("<td style=\"text-align: right\">1</td>"),
        "{html}"
    );
    assert!(html.contains(">&lt;b&gt;b&lt;/b&gt;</td>"), "{html}");
    assert!(html.contains("<del>old</del> new"), "{html}");
    assert!(
        html.contains("<pre><code class=\"language-rust\">fn main() {}\n</code></pre>"),
        "{html}"
    );
}

#[test]
fn text_is_escaped() {
    assert_eq!(
        render_html("1 < 2 & 3 > 2"),
        "<p>1 &lt; 2 &amp; 3 &gt; 2</p>\n"
    );
    assert_eq!(render_html(""), "");
}
