//! Splitting replies within platform limits, as a platform user sees them.

use std::fmt::Write as _;

use hg_text::{Limit, Measure, split_markdown};

/// `line` without block quote markers, list markers and indentation.
fn strip_containers(line: &str) -> &str {
    line.trim_start_matches(|c: char| " \t>-*+.)".contains(c) || c.is_ascii_digit())
}

/// Whether `line` is a code fence line, possibly inside a block quote.
fn is_fence_line(line: &str) -> bool {
    let t = strip_containers(line);
    t.starts_with("```") || t.starts_with("~~~")
}

/// The text of `s` that the splitter must keep: everything but fence lines,
/// block quote markers that start a line, and whitespace.
fn content(s: &str) -> String {
    s.lines()
        .filter(|line| !is_fence_line(line))
        .flat_map(|line| line.trim_start_matches([' ', '\t', '>']).chars())
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// Checks what every split must guarantee: each part fits and has content,
/// and the parts hold the original text in order, fence lines and quote
/// markers aside.
fn check(text: &str, limit: Limit, parts: &[String]) {
    assert!(!parts.is_empty());
    for (i, part) in parts.iter().enumerate() {
        let len = limit.measure.len(part);
        assert!(len <= limit.max, "part {i} measures {len} > {}", limit.max);
        assert!(!part.trim().is_empty(), "part {i} is blank");
    }
    let joined: String = parts.iter().map(|p| content(p)).collect();
    let original = content(text);
    if joined != original {
        let at = joined
            .chars()
            .zip(original.chars())
            .take_while(|(a, b)| a == b)
            .count();
        let near: String = original
            .chars()
            .skip(at.saturating_sub(20))
            .take(60)
            .collect();
        panic!(
            "content changed after {at} chars, near {near:?}\ntext: {text:?}\nparts: {parts:#?}"
        );
    }
}

/// Asserts that every fence opened in `part` is closed in it.
fn assert_fences_balanced(part: &str) {
    let mut open: Option<(u8, usize)> = None;
    for line in part.lines() {
        let t = strip_containers(line);
        let Some(&ch) = t.as_bytes().first().filter(|&&b| b == b'`' || b == b'~') else {
            continue;
        };
        let run = t.bytes().take_while(|&b| b == ch).count();
        if run < 3 {
            continue;
        }
        match open {
            None => open = Some((ch, run)),
            Some((c, n)) if c == ch && run >= n && t[run..].trim().is_empty() => open = None,
            Some(_) => {}
        }
    }
    assert!(open.is_none(), "unclosed fence in part:\n{part}");
}

/// A reply of about 9,000 characters with prose, a list and two long code
/// blocks, one fenced with backticks and one with tildes.
fn reply_with_code() -> String {
    let mut s = String::from("# Fixing the naïve parser\n\n");
    for i in 0..4 {
        writeln!(
            s,
            "Paragraph {i}: the parser read every token twice, so large inputs were slow. \
             We now keep a cursor and a small lookahead buffer instead. 🚀\n"
        )
        .unwrap();
    }
    s.push_str("```rust\n");
    for i in 0..90 {
        writeln!(
            s,
            "    let value_{i} = compute({i}, \"naïve\"); // step {i} of the loop"
        )
        .unwrap();
    }
    s.push_str("```\n\nThe list of follow-ups:\n\n");
    for i in 0..12 {
        writeln!(
            s,
            "- follow-up {i}: check the [docs](https://example.com/{i}) again"
        )
        .unwrap();
    }
    s.push_str("\n~~~~python\n");
    for i in 0..50 {
        writeln!(s, "print(\"line {i}\", sum(range({i})))  # über").unwrap();
    }
    s.push_str("~~~~\n\nThat is all.\n");
    s
}

#[test]
fn discord_code_fences_are_closed_and_reopened() {
    let text = reply_with_code();
    let chars = text.chars().count();
    assert!((8_500..10_000).contains(&chars), "reply has {chars} chars");

    let parts = split_markdown(&text, Limit::DISCORD);
    check(&text, Limit::DISCORD, &parts);
    assert!(parts.len() >= 5, "{} parts", parts.len());
    for part in &parts {
        assert_fences_balanced(part);
    }
    // Both long blocks span several parts; every part holding a piece of one
    // opens it with the original fence and info string.
    let rust: Vec<&String> = parts.iter().filter(|p| p.contains("let value_")).collect();
    assert!(rust.len() >= 3);
    for part in &rust {
        let first_code_line = part.lines().position(|l| l.contains("let value_")).unwrap();
        assert_eq!(part.lines().nth(first_code_line - 1), Some("```rust"));
        assert!(part.ends_with("```") || part.contains("```\n\n"));
    }
    let python: Vec<&String> = parts.iter().filter(|p| p.contains("print(")).collect();
    assert!(python.len() >= 2);
    for part in &python[1..] {
        assert!(part.starts_with("~~~~python\n"), "{part}");
    }
    for part in &python[..python.len() - 1] {
        assert!(part.ends_with("\n~~~~"), "{part}");
    }
    // Code lines are never cut in the middle here: they are short.
    for part in &parts {
        for line in part.lines().filter(|l| l.contains("let value_")) {
            assert!(line.ends_with("of the loop"), "{line}");
        }
    }
}

#[test]
fn telegram_counts_utf16_units() {
    let mut text = String::new();
    for i in 0..120 {
        writeln!(
            text,
            "Line {i} 😀 with a heart ❤️, a family 👨‍👩‍👧, a flag 🇫🇷 and a thumb 👍🏽 in it.\n"
        )
        .unwrap();
    }
    let units = Measure::Utf16.len(&text);
    assert!(units > 2 * 4096, "{units} units");
    assert!(Measure::Chars.len(&text) < units);

    let parts = split_markdown(&text, Limit::TELEGRAM);
    check(&text, Limit::TELEGRAM, &parts);
    assert!(parts.len() >= 3);
    // Paragraphs fit, so they stay whole and keep their blank lines.
    for part in &parts {
        assert!(part.starts_with("Line "));
        assert!(part.ends_with("in it."));
    }
    let rejoined = parts.join("\n\n");
    assert_eq!(rejoined, text.trim_end());
}

#[test]
fn telegram_never_splits_a_surrogate_pair() {
    // One "word" of 5,000 emoji: 10,000 UTF-16 units, no whitespace at all.
    let text = "😀".repeat(5_000);
    let parts = split_markdown(&text, Limit::TELEGRAM);
    check(&text, Limit::TELEGRAM, &parts);
    assert_eq!(parts.concat(), text);
    for part in &parts {
        assert!(part.chars().all(|c| c == '😀'));
        assert_eq!(Measure::Utf16.len(part) % 2, 0);
    }
    assert_eq!(Measure::Utf16.len(&parts[0]), 4096);

    // An odd limit cannot be filled with 2-unit characters.
    let limit = Limit::new(101, Measure::Utf16);
    let parts = split_markdown(&text, limit);
    check(&text, limit, &parts);
    assert_eq!(parts.concat(), text);
    assert_eq!(Measure::Utf16.len(&parts[0]), 100);
}

#[test]
fn emoji_sequences_are_kept_together_when_possible() {
    // Each sequence is several code points: heart + VS16, a ZWJ family, a
    // skin-toned thumb, a flag, a keycap, and an accented letter built with a
    // combining mark.
    let sequences = ["❤️", "👨‍👩‍👧", "👍🏽", "🇫🇷", "1️⃣", "e\u{301}"];
    let text: String = sequences.iter().cycle().take(3_000).copied().collect();
    for max in [37, 100, 2000] {
        let limit = Limit::new(max, Measure::Chars);
        let parts = split_markdown(&text, limit);
        check(&text, limit, &parts);
        assert_eq!(parts.concat(), text);
        for part in &parts {
            let mut rest = part.as_str();
            while !rest.is_empty() {
                let seq = sequences
                    .iter()
                    .find(|s| rest.starts_with(**s))
                    .unwrap_or_else(|| panic!("part cuts a sequence: {rest:?}"));
                rest = &rest[seq.len()..];
            }
        }
    }
}

#[test]
fn a_long_word_is_cut_at_char_boundaries() {
    let text: String = "aé€😀".chars().cycle().take(10_000).collect();
    let parts = split_markdown(&text, Limit::DISCORD);
    check(&text, Limit::DISCORD, &parts);
    assert_eq!(parts.len(), 5);
    assert!(parts.iter().all(|p| p.chars().count() == 2_000));
    assert_eq!(parts.concat(), text);

    let parts = split_markdown(&text, Limit::new(1_001, Measure::Bytes));
    check(&text, Limit::new(1_001, Measure::Bytes), &parts);
    assert_eq!(parts.concat(), text);
}

#[test]
fn long_paragraphs_are_cut_between_words() {
    let words = ["alpha", "béta", "gamma", "delta", "epsilon", "😀", "zeta"];
    let text: Vec<&str> = words.iter().cycle().take(3_000).copied().collect();
    let text = text.join(" ");
    let parts = split_markdown(&text, Limit::DISCORD);
    check(&text, Limit::DISCORD, &parts);
    for part in &parts {
        assert!(
            part.split(' ').all(|w| words.contains(&w)),
            "a word was cut"
        );
        // Nearly full: a cut loses at most one word's worth of room.
        assert!(part.chars().count() > 1_990 || part == parts.last().unwrap());
    }
    let rejoined = parts.join(" ");
    assert_eq!(rejoined, text);
}

#[test]
fn long_lines_are_cut_between_lines() {
    let mut text = String::new();
    for i in 0..400 {
        writeln!(text, "line {i} of a single long paragraph").unwrap();
    }
    let parts = split_markdown(&text, Limit::DISCORD);
    check(&text, Limit::DISCORD, &parts);
    for part in &parts {
        assert!(part.starts_with("line "));
        assert!(part.ends_with("paragraph"));
    }
}

#[test]
fn paragraphs_are_kept_whole_and_packed() {
    let paragraphs: Vec<String> = (0..30)
        .map(|i| {
            let words = 20 + (i * 37) % 100;
            let mut p = format!("P{i}:");
            for w in 0..words {
                write!(p, " word{w}").unwrap();
            }
            p
        })
        .collect();
    let text = paragraphs.join("\n\n");
    let parts = split_markdown(&text, Limit::DISCORD);
    check(&text, Limit::DISCORD, &parts);
    // Each part is a run of whole paragraphs, separated by blank lines.
    let mut next = 0;
    for part in &parts {
        let mut count = 0;
        for piece in part.split("\n\n") {
            assert_eq!(piece, paragraphs[next]);
            next += 1;
            count += 1;
        }
        // The following paragraph would not have fit.
        if let Some(following) = paragraphs.get(next) {
            assert!(part.chars().count() + 2 + following.chars().count() > 2_000);
        }
        assert!(count >= 1);
    }
    assert_eq!(next, paragraphs.len());
}

#[test]
fn text_that_fits_is_returned_unchanged() {
    let text = "  Hello **world**!\n\n```rust\nfn main() {}\n```\n\n";
    assert_eq!(split_markdown(text, Limit::DISCORD), [text]);
    let limit = Limit::new(Measure::Utf16.len(text), Measure::Utf16);
    assert_eq!(split_markdown(text, limit), [text]);
    assert!(split_markdown("", Limit::DISCORD).is_empty());
    assert!(split_markdown(" \n\t\n ", Limit::DISCORD).is_empty());
    assert!(split_markdown(&" \n".repeat(5_000), Limit::DISCORD).is_empty());
}

#[test]
fn a_huge_code_line_is_cut_inside_balanced_fences() {
    let words: Vec<String> = (0..1_000).map(|i| format!("x{i}")).collect();
    let text = format!("```js\nconst a = [{}];\n```\n", words.join(", "));
    let limit = Limit::new(300, Measure::Chars);
    let parts = split_markdown(&text, limit);
    check(&text, limit, &parts);
    assert!(parts.len() > 10);
    for part in &parts {
        assert_fences_balanced(part);
        assert!(part.starts_with("```js\n"), "{part}");
        assert!(part.ends_with("\n```"), "{part}");
    }
    // Cut between words: no item is torn apart.
    for part in &parts {
        for word in part.lines().nth(1).unwrap().split_whitespace() {
            let item = word.trim_matches(|c| c == ',' || c == '[' || c == ']' || c == ';');
            if item.starts_with('x') {
                assert!(words.iter().any(|w| w == item), "{item}");
            }
        }
    }
}

#[test]
fn quoted_and_listed_code_blocks_are_reopened_in_their_container() {
    let mut text = String::from("> ```rust\n");
    for i in 0..60 {
        writeln!(text, "> let x{i} = {i};").unwrap();
    }
    text.push_str("> ```\n\n- ```sh\n");
    for i in 0..60 {
        writeln!(text, "  echo {i}").unwrap();
    }
    text.push_str("  ```\n");
    let limit = Limit::new(200, Measure::Chars);
    let parts = split_markdown(&text, limit);
    check(&text, limit, &parts);
    for part in &parts {
        assert_fences_balanced(part);
        if part.contains("let x") {
            assert!(part.starts_with("> ```rust\n"), "{part}");
            assert!(part.ends_with("\n> ```"), "{part}");
        } else {
            assert!(
                part.starts_with("- ```sh\n") || part.starts_with("  ```sh\n"),
                "{part}"
            );
            assert!(part.ends_with("\n  ```"), "{part}");
        }
    }
}

#[test]
fn a_longer_closing_fence_is_kept() {
    let mut text = String::from("```rust\n");
    for i in 0..40 {
        writeln!(text, "let x{i} = {i};").unwrap();
    }
    text.push_str("`````\n\nAfter.\n");
    let limit = Limit::new(120, Measure::Chars);
    let parts = split_markdown(&text, limit);
    check(&text, limit, &parts);
    let joined = parts.join("\n");
    assert_eq!(joined.matches("`````").count(), 1, "{parts:#?}");
    for part in &parts {
        assert_fences_balanced(part);
    }
}

#[test]
fn a_quoted_line_cut_between_words_stays_quoted() {
    let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
    let text = format!("> {}\n", words.join(" "));
    let limit = Limit::new(100, Measure::Chars);
    let parts = split_markdown(&text, limit);
    check(&text, limit, &parts);
    assert!(parts.len() > 10);
    for part in &parts {
        assert!(part.starts_with("> w"), "{part}");
    }
}

#[test]
fn indented_code_keeps_its_indentation() {
    let mut text = String::from("Intro.\n\n");
    for i in 0..200 {
        writeln!(text, "    indented code line {i}").unwrap();
    }
    let limit = Limit::new(500, Measure::Chars);
    let parts = split_markdown(&text, limit);
    check(&text, limit, &parts);
    assert_eq!(parts[0], "Intro.");
    for part in &parts[1..] {
        assert!(
            part.lines()
                .all(|l| l.starts_with("    indented code line"))
        );
    }
}

#[test]
fn every_platform_limit_is_respected() {
    let text = reply_with_code().repeat(12);
    for limit in [
        Limit::TELEGRAM,
        Limit::DISCORD,
        Limit::SLACK,
        Limit::WHATSAPP,
        Limit::TEAMS,
        Limit::WEB,
    ] {
        let parts = split_markdown(&text, limit);
        check(&text, limit, &parts);
        for part in &parts {
            assert_fences_balanced(part);
        }
    }
}

#[test]
fn tiny_limits_terminate() {
    let text = reply_with_code();
    for max in [1, 2, 3, 4, 5, 8, 15, 16, 17, 20, 24, 31] {
        for measure in [Measure::Chars, Measure::Utf16, Measure::Bytes] {
            let limit = Limit::new(max, measure);
            let parts = split_markdown(&text, limit);
            if max >= 16 {
                check(&text, limit, &parts);
            }
            // Room for the longest fence line, a closing line and content.
            if max >= 20 {
                for part in &parts {
                    assert_fences_balanced(part);
                }
            } else if max >= 4 {
                assert!(parts.iter().all(|p| measure.len(p) <= max));
            }
            assert!(parts.iter().all(|p| !p.trim().is_empty()));
        }
    }
}

/// A small xorshift generator, so the fuzz test is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Where `needle` stops being a subsequence of `haystack`: the rest of
/// `needle` from the first character not found in order.
fn missing<'a>(needle: &'a str, haystack: &str) -> Option<&'a str> {
    let mut hay = haystack.chars();
    needle
        .char_indices()
        .find(|&(_, c)| !hay.any(|h| h == c))
        .map(|(i, _)| &needle[i..])
}

#[test]
fn random_text_never_panics_and_loses_nothing() {
    let pieces = [
        "a",
        "word ",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\r\n",
        "\t",
        "é",
        "€",
        "😀",
        "❤️",
        "\u{200D}",
        "\u{FE0F}",
        "\u{301}",
        "🇫🇷",
        "```",
        "```rust\n",
        "~~~~\n",
        "\n```\n",
        "    ",
        "> ",
        "- ",
        "1. ",
        "# ",
        "|a|b|\n|-|-|\n",
        "<div>",
        "[x](http://a)",
        "`",
        "*",
        "---\n",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..1500 {
        let len = rng.below(400);
        let text: String = (0..len).map(|_| pieces[rng.below(pieces.len())]).collect();
        let max = match round % 3 {
            0 => 1 + rng.below(20),
            1 => 16 + rng.below(60),
            _ => 40 + rng.below(400),
        };
        let measure = [Measure::Chars, Measure::Utf16, Measure::Bytes][rng.below(3)];
        let limit = Limit::new(max, measure);
        let parts = split_markdown(&text, limit);
        for part in &parts {
            assert!(!part.trim().is_empty(), "blank part for {text:?}");
            if max >= 4 {
                assert!(
                    measure.len(part) <= max,
                    "{part:?} over {limit:?} for {text:?}"
                );
            }
        }
        let original: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let joined: String = parts
            .concat()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Some(at) = missing(&original, &joined) {
            panic!("lost text at {at}: {text:?} -> {parts:?}");
        }
        if text.trim().is_empty() {
            assert!(parts.is_empty());
        }
    }
}

/// A random but well-formed document: paragraphs, headings, lists, block
/// quotes, tables and code blocks (fenced, some inside lists and quotes, and
/// indented), with multibyte text and the odd very long word.
fn random_document(rng: &mut Rng) -> String {
    const WORDS: [&str; 14] = [
        "alpha",
        "béta",
        "😀",
        "❤️",
        "👨‍👩‍👧",
        "日本語",
        "x",
        "naïve",
        "über",
        "🇫🇷",
        "code()",
        "a_b",
        "42",
        "**bold**",
    ];
    // Between `min` and `min + spread - 1` words.
    let words = |rng: &mut Rng, min: usize, spread: usize| -> String {
        let n = min + rng.below(spread);
        let mut line = String::new();
        for i in 0..n {
            if i > 0 {
                line.push(' ');
            }
            if rng.below(60) == 0 {
                line.push_str(&WORDS[rng.below(WORDS.len())].repeat(1 + rng.below(80)));
            } else {
                line.push_str(WORDS[rng.below(WORDS.len())]);
            }
        }
        line
    };
    let fences = ["```", "````", "~~~"];
    let infos = ["", "rust", "py", "sh"];
    let mut blocks = Vec::new();
    for _ in 0..1 + rng.below(12) {
        let block = match rng.below(7) {
            0 => {
                let lines: Vec<String> = (0..1 + rng.below(5)).map(|_| words(rng, 1, 20)).collect();
                lines.join("\n")
            }
            1 => format!("{} {}", "#".repeat(1 + rng.below(3)), words(rng, 1, 6)),
            2 | 3 => {
                let (prefix, open_prefix) = match rng.below(3) {
                    0 => ("", ""),
                    1 => ("> ", "> "),
                    _ => ("  ", "- "),
                };
                let fence = fences[rng.below(fences.len())];
                let mut s = format!("{open_prefix}{fence}{}\n", infos[rng.below(infos.len())]);
                for _ in 0..1 + rng.below(40) {
                    let indent = " ".repeat(rng.below(3) * 4);
                    writeln!(s, "{prefix}{indent}{}", words(rng, 0, 10)).unwrap();
                }
                s.push_str(prefix);
                s.push_str(fence);
                s
            }
            4 => {
                let items: Vec<String> = (0..1 + rng.below(8))
                    .map(|_| format!("- {}", words(rng, 1, 12)))
                    .collect();
                items.join("\n")
            }
            5 => {
                let mut s = String::from("| a | b |\n|---|---|");
                for _ in 0..1 + rng.below(10) {
                    write!(s, "\n| {} | {} |", words(rng, 2, 1), words(rng, 1, 1)).unwrap();
                }
                s
            }
            _ => {
                let lines: Vec<String> = (0..1 + rng.below(10))
                    .map(|_| format!("    {}", words(rng, 1, 8)))
                    .collect();
                lines.join("\n")
            }
        };
        blocks.push(block);
    }
    blocks.join("\n\n")
}

/// Asserts, with pulldown-cmark as the judge, that every fenced code block
/// in `part` is closed by a fence line.
fn assert_code_blocks_closed(part: &str, context: &dyn std::fmt::Debug) {
    use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag};
    for (event, range) in Parser::new(part).into_offset_iter() {
        if let Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_))) = event {
            let block = part[range].trim_end();
            let open = block.trim_start_matches(|c: char| c.is_whitespace() || "->".contains(c));
            let fence_char = open.chars().next().unwrap();
            let last = block.lines().last().unwrap();
            let last = strip_containers(last);
            assert!(
                block.lines().count() > 1 && last.starts_with(&fence_char.to_string().repeat(3)),
                "unclosed code block in part:\n{part}\nin {context:?}"
            );
        }
    }
}

#[test]
fn random_documents_keep_their_structure() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for _ in 0..400 {
        let text = random_document(&mut rng);
        let max = 16 + rng.below(300);
        let measure = [Measure::Chars, Measure::Utf16, Measure::Bytes][rng.below(3)];
        let limit = Limit::new(max, measure);
        let parts = split_markdown(&text, limit);
        check(&text, limit, &parts);
        // Room for the longest fence line, its quote markers, a closing
        // line and a character: fences are closed and reopened.
        if max >= 24 {
            for part in &parts {
                assert_code_blocks_closed(part, &(&text, limit, &parts));
            }
        }
    }
}
