//! Times `split_markdown` on a generated reply of about 100 KB for every
//! platform limit, printing the mean time of one split, and the Telegram
//! egress's Markdown → HTML render + split.
//!
//! Run with `cargo bench -p hg-text`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use hg_text::{Limit, split_markdown};

/// Splits timed per limit, after one untimed warm-up split.
const ITERATIONS: u32 = 200;

/// A reply of about 100 KB: headings, prose with links and emoji, lists,
/// tables, and code blocks short and long.
fn document() -> String {
    let mut s = String::new();
    let mut section = 0;
    while s.len() < 100_000 {
        writeln!(s, "## Section {section}: what changed 🚀\n").unwrap();
        for p in 0..3 {
            writeln!(
                s,
                "Paragraph {p} of section {section} explains the change in some detail, \
                 links to [the docs](https://example.com/docs/{section}/{p}) and to \
                 <https://example.com/issue/{p}>, and adds a few emoji ❤️ 👍🏽 👨‍👩‍👧 🇫🇷 \
                 along with some *emphasis*, **bold** text and `inline code` for good \
                 measure. Naïve façades über alles.\n"
            )
            .unwrap();
        }
        for i in 0..8 {
            writeln!(
                s,
                "- item {i}: check [link {i}](https://example.com/{i}) ✅"
            )
            .unwrap();
        }
        s.push('\n');
        let lines = if section % 5 == 4 { 160 } else { 12 };
        s.push_str("```rust\n");
        for i in 0..lines {
            writeln!(
                s,
                "    let value_{i} = compute({i}, \"naïve\").await?; // step {i} 🦀"
            )
            .unwrap();
        }
        s.push_str("```\n\n| key | value |\n|-----|-------|\n");
        for i in 0..5 {
            writeln!(s, "| k{i} | v{i} 😀 |").unwrap();
        }
        s.push('\n');
        section += 1;
    }
    s
}

fn main() {
    let doc = document();
    println!(
        "document: {} bytes, {} chars",
        doc.len(),
        doc.chars().count()
    );
    for (name, limit) in [
        ("telegram", Limit::TELEGRAM),
        ("discord", Limit::DISCORD),
        ("slack", Limit::SLACK),
        ("whatsapp", Limit::WHATSAPP),
        ("teams", Limit::TEAMS),
        ("web", Limit::WEB),
    ] {
        let parts = split_markdown(&doc, limit).len();
        let started = Instant::now();
        for _ in 0..ITERATIONS {
            black_box(split_markdown(black_box(&doc), limit));
        }
        let mean = started.elapsed().as_secs_f64() * 1e6 / f64::from(ITERATIONS);
        println!("{name:>9}: {mean:>8.1} µs per split, {parts} parts");
    }
    // What the Telegram egress does per reply: render Telegram HTML and
    // split it entity-safely within 4096 UTF-16 units.
    let parts = hg_text::telegram::split_html(&doc, Limit::TELEGRAM).len();
    let started = Instant::now();
    for _ in 0..ITERATIONS {
        black_box(hg_text::telegram::split_html(
            black_box(&doc),
            Limit::TELEGRAM,
        ));
    }
    let mean = started.elapsed().as_secs_f64() * 1e6 / f64::from(ITERATIONS);
    println!("tg-html: {mean:>8.1} µs per render+split, {parts} parts");
}
