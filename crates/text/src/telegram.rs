//! Telegram's HTML dialect: rendering, splitting and a plain-text fallback.
//!
//! The Bot API accepts a small set of HTML tags with `parse_mode = "HTML"`:
//! `b`, `i`, `u`, `s`, `code`, `pre` (optionally holding one
//! `code class="language-…"`), `a href`, `blockquote` and `tg-spoiler`.
//! Everything else — paragraphs, headings, lists, tables — has to become
//! plain text with newlines. Only `&`, `<` and `>` (and `"` in attributes)
//! need escaping, and an unbalanced or unknown tag makes Telegram reject the
//! whole message with "can't parse entities".
//!
//! [`render_html`] turns Markdown into that dialect. [`split_html`] renders
//! and cuts the result into parts that are each valid on their own and fit a
//! [`Limit`]: a cut never falls inside a tag or an entity; tags open at a cut
//! are closed at the end of the part and reopened at the start of the next
//! one (so a code block continues as a code block). Cuts go between
//! top-level blocks where possible, else between lines, else between words,
//! else between characters. [`html_to_plain`] strips a part back to plain
//! text, for when Telegram rejects its formatting anyway.

use std::rc::Rc;

use pulldown_cmark::{CodeBlockKind, Event, LinkType, Parser, Tag, TagEnd};

use crate::{Limit, Measure};

/// Renders Markdown as Telegram HTML.
///
/// Headings become bold lines, list items `• ` or `1. ` lines, tables a
/// preformatted block, rules a line of box-drawing characters; raw HTML in
/// the Markdown is shown as text. Links keep their target only for `http`,
/// `https`, `tg` and `mailto` URLs; other links keep just their text.
pub fn render_html(markdown: &str) -> String {
    let tokens = tokenize(markdown);
    let mut out = String::with_capacity(markdown.len() + markdown.len() / 4);
    let mut stack: Vec<usize> = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        match token {
            Token::Open { open, .. } => {
                out.push_str(open);
                stack.push(i);
            }
            Token::Close => {
                if let Some(j) = stack.pop()
                    && let Token::Open { open, close } = &tokens[j]
                {
                    if out.ends_with(open.as_str()) {
                        out.truncate(out.len() - open.len());
                    } else {
                        out.push_str(close);
                    }
                }
            }
            Token::Text(text) => escape_into(&mut out, text, false),
            Token::Sep { text, .. } => out.push_str(text),
        }
    }
    out.trim_end().to_owned()
}

/// Renders Markdown as Telegram HTML ([`render_html`]) and splits it into
/// parts that each measure at most `limit.max` (tags included) and are valid
/// HTML on their own.
///
/// Text that fits is a single part; empty or whitespace-only input gives no
/// parts. The whitespace character at a cut is dropped; nothing else is
/// lost or reordered. Only when a limit is too small to hold the tags open at
/// a position plus one character (a few dozen units) can a part exceed it.
pub fn split_html(markdown: &str, limit: Limit) -> Vec<String> {
    if markdown.trim().is_empty() {
        return Vec::new();
    }
    let tokens = tokenize(markdown);
    Splitter::new(&tokens, limit).run()
}

/// The text of a Telegram HTML fragment without its markup: tags dropped,
/// entities decoded, and a link's target added in parentheses after its
/// text when the text is not the target itself.
///
/// The result is never longer than the input, in any [`Measure`], so a part
/// from [`split_html`] still fits its limit as plain text.
pub fn html_to_plain(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    // Links open in the fragment: (target, where their text starts in `out`).
    let mut links: Vec<(String, usize)> = Vec::new();
    while let Some(c) = rest.chars().next() {
        match c {
            '<' => {
                let end = rest.find('>').map_or(rest.len(), |i| i + 1);
                let tag = &rest[..end];
                if let Some(attrs) = tag.strip_prefix("<a ") {
                    let href = attrs
                        .split_once("href=\"")
                        .and_then(|(_, v)| v.split_once('"'))
                        .map(|(v, _)| decode_entities(v))
                        .unwrap_or_default();
                    links.push((href, out.len()));
                } else if tag == "</a>"
                    && let Some((href, start)) = links.pop()
                {
                    let text = &out[start..];
                    let target = href.strip_prefix("mailto:").unwrap_or(&href);
                    if !href.is_empty() && text.trim() != target && text.trim() != href {
                        out.push_str(" (");
                        out.push_str(target);
                        out.push(')');
                    }
                }
                rest = &rest[end..];
            }
            '&' => {
                let end = rest
                    .char_indices()
                    .take(12)
                    .find(|&(_, c)| c == ';')
                    .map(|(i, _)| i + 1);
                match end.and_then(|end| decode_entity(&rest[..end]).map(|c| (c, end))) {
                    Some((decoded, end)) => {
                        out.push(decoded);
                        rest = &rest[end..];
                    }
                    None => {
                        out.push('&');
                        rest = &rest[1..];
                    }
                }
            }
            c => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Escapes text for Telegram HTML: `&`, `<` and `>`.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text, false);
    out
}

fn decode_entities(s: &str) -> String {
    html_to_plain(s)
}

fn decode_entity(entity: &str) -> Option<char> {
    match entity {
        "&amp;" => Some('&'),
        "&lt;" => Some('<'),
        "&gt;" => Some('>'),
        "&quot;" => Some('"'),
        "&#39;" | "&apos;" => Some('\''),
        _ => {
            let num = entity.strip_prefix("&#")?.strip_suffix(';')?;
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code)
        }
    }
}

fn escape_into(out: &mut String, text: &str, attribute: bool) {
    for c in text.chars() {
        push_escaped(out, c, attribute);
    }
}

fn push_escaped(out: &mut String, c: char, attribute: bool) {
    match c {
        '&' => out.push_str("&amp;"),
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        '"' if attribute => out.push_str("&quot;"),
        c => out.push(c),
    }
}

/// The length of `c` once escaped, in `measure`.
fn escaped_len(c: char, measure: Measure) -> usize {
    match c {
        '&' => 5,
        '<' | '>' => 4,
        c => measure.char_len(c),
    }
}

/// Rendered Telegram HTML as a flat stream, which the splitter can cut
/// anywhere between tokens or characters.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// An opening tag and the closing tag that matches it.
    Open { open: String, close: &'static str },
    /// Closes the innermost open tag.
    Close,
    /// Text, not yet escaped.
    Text(String),
    /// Whitespace between blocks; dropped where a part ends on it.
    Sep { text: &'static str, level: usize },
}

/// Kinds of cut position, from least to most preferred.
const HARD_CHAR: usize = 0;
const CHAR: usize = 1;
const WORD: usize = 2;
const LINE: usize = 3;
const BLOCK: usize = 4;

/// Builds the token stream of a Markdown text.
fn tokenize(markdown: &str) -> Vec<Token> {
    let mut r = Renderer::default();
    for event in Parser::new_ext(markdown, crate::options()) {
        r.event(event);
    }
    r.tokens
}

/// One open list: the next item number, or `None` for bullets.
struct List {
    next: Option<u64>,
}

/// A table being collected, rendered as a preformatted block at its end.
#[derive(Default)]
struct Table {
    rows: Vec<Vec<String>>,
    header_rows: usize,
    in_head: bool,
}

#[derive(Default)]
struct Renderer {
    tokens: Vec<Token>,
    /// Separator owed before the next content: `"\n"` or `"\n\n"`.
    pending: Option<&'static str>,
    /// Open tags, to know whether a separator is top-level.
    depth: usize,
    lists: Vec<List>,
    quote_depth: usize,
    /// For each open link or image: whether its tag was emitted.
    links: Vec<bool>,
    /// Text of the code block being read.
    code: Option<String>,
    /// Whether that block has a language `code` tag inside its `pre`.
    code_lang: bool,
    table: Option<Table>,
}

impl Renderer {
    fn event(&mut self, event: Event<'_>) {
        if let Some(table) = &mut self.table {
            match event {
                Event::End(TagEnd::Table) => {
                    let table = self.table.take().unwrap_or_default();
                    self.table_block(table);
                }
                Event::Start(Tag::TableHead) => table.in_head = true,
                Event::End(TagEnd::TableHead) => {
                    table.in_head = false;
                    table.header_rows = table.rows.len();
                }
                Event::Start(Tag::TableRow) => table.rows.push(Vec::new()),
                Event::Start(Tag::TableCell) => {
                    if table.rows.is_empty()
                        || (table.in_head && table.rows.len() == table.header_rows)
                    {
                        table.rows.push(Vec::new());
                    }
                    if let Some(row) = table.rows.last_mut() {
                        row.push(String::new());
                    }
                }
                Event::Text(t) | Event::Code(t) | Event::InlineHtml(t) | Event::Html(t) => {
                    if let Some(cell) = table.rows.last_mut().and_then(|r| r.last_mut()) {
                        cell.push_str(&t);
                    }
                }
                Event::SoftBreak | Event::HardBreak => {
                    if let Some(cell) = table.rows.last_mut().and_then(|r| r.last_mut()) {
                        cell.push(' ');
                    }
                }
                _ => {}
            }
            return;
        }
        if let Some(code) = &mut self.code {
            match event {
                Event::Text(t) => code.push_str(&t),
                Event::End(TagEnd::CodeBlock) => {
                    let code = self.code.take().unwrap_or_default();
                    let code = code.strip_suffix('\n').unwrap_or(&code);
                    if !code.is_empty() {
                        self.text(code);
                    }
                    if self.code_lang {
                        self.close();
                    }
                    self.close();
                    self.block_end();
                }
                _ => {}
            }
            return;
        }
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(t) => self.text(&t),
            Event::Code(t) => {
                self.open("<code>".into(), "</code>");
                self.text(&t);
                self.close();
            }
            Event::InlineMath(t) | Event::DisplayMath(t) => self.text(&t),
            Event::Html(t) => self.text(t.trim_end_matches('\n')),
            Event::InlineHtml(t) => self.text(&t),
            Event::FootnoteReference(t) => self.text(&format!("[{t}]")),
            Event::SoftBreak | Event::HardBreak => self.text("\n"),
            Event::Rule => {
                self.text("──────────");
                self.block_end();
            }
            Event::TaskListMarker(done) => self.text(if done { "☑ " } else { "☐ " }),
        }
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            Tag::Paragraph | Tag::HtmlBlock | Tag::MetadataBlock(_) => {}
            Tag::Heading { .. } => self.open("<b>".into(), "</b>"),
            Tag::BlockQuote(_) => {
                if self.quote_depth == 0 {
                    self.open("<blockquote>".into(), "</blockquote>");
                }
                self.quote_depth += 1;
            }
            Tag::CodeBlock(kind) => {
                self.open("<pre>".into(), "</pre>");
                let lang = match kind {
                    CodeBlockKind::Fenced(info) => language(&info),
                    CodeBlockKind::Indented => String::new(),
                };
                self.code_lang = !lang.is_empty();
                if self.code_lang {
                    self.open(format!("<code class=\"language-{lang}\">"), "</code>");
                }
                self.code = Some(String::new());
            }
            Tag::List(start) => {
                if !self.lists.is_empty() {
                    self.soft_sep("\n");
                }
                self.lists.push(List { next: start });
            }
            Tag::Item => {
                let depth = self.lists.len();
                let marker = match self.lists.last_mut() {
                    Some(List { next: Some(n) }) => {
                        let marker = format!("{n}. ");
                        *n += 1;
                        marker
                    }
                    _ => "• ".to_owned(),
                };
                let indent = "  ".repeat(depth.saturating_sub(1));
                self.text(&format!("{indent}{marker}"));
            }
            Tag::Table(_) => self.table = Some(Table::default()),
            Tag::TableHead | Tag::TableRow | Tag::TableCell => {}
            Tag::Emphasis => self.open("<i>".into(), "</i>"),
            Tag::Strong => self.open("<b>".into(), "</b>"),
            Tag::Strikethrough => self.open("<s>".into(), "</s>"),
            Tag::Superscript | Tag::Subscript => {}
            Tag::Link {
                link_type,
                dest_url,
                ..
            } => {
                let href = if link_type == LinkType::Email {
                    Some(format!("mailto:{dest_url}"))
                } else {
                    safe_url(&dest_url).then(|| dest_url.to_string())
                };
                self.link(href);
            }
            Tag::Image { dest_url, .. } => {
                let href = safe_url(&dest_url).then(|| dest_url.to_string());
                self.link(href);
            }
            Tag::FootnoteDefinition(label) => self.text(&format!("[{label}]: ")),
            Tag::DefinitionList | Tag::DefinitionListTitle | Tag::DefinitionListDefinition => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph | TagEnd::HtmlBlock | TagEnd::MetadataBlock(_) => self.block_end(),
            TagEnd::Heading(_) => {
                self.close();
                self.block_end();
            }
            TagEnd::BlockQuote(_) => {
                self.quote_depth = self.quote_depth.saturating_sub(1);
                if self.quote_depth == 0 {
                    self.pending = None;
                    self.close();
                }
                self.block_end();
            }
            TagEnd::CodeBlock => {}
            TagEnd::List(_) => {
                self.lists.pop();
                self.block_end();
            }
            TagEnd::Item => self.soft_sep("\n"),
            TagEnd::Emphasis | TagEnd::Strong | TagEnd::Strikethrough => self.close(),
            TagEnd::Superscript | TagEnd::Subscript => {}
            TagEnd::Link | TagEnd::Image => {
                if self.links.pop().unwrap_or(false) {
                    self.close();
                }
            }
            TagEnd::FootnoteDefinition => self.block_end(),
            TagEnd::DefinitionListTitle | TagEnd::DefinitionListDefinition => self.soft_sep("\n"),
            TagEnd::DefinitionList => self.block_end(),
            TagEnd::Table | TagEnd::TableHead | TagEnd::TableRow | TagEnd::TableCell => {}
        }
    }

    fn link(&mut self, href: Option<String>) {
        // Telegram does not nest links (an image inside a link).
        let href = href.filter(|_| !self.links.contains(&true));
        match href {
            Some(href) => {
                let mut open = String::from("<a href=\"");
                escape_into(&mut open, &href, true);
                open.push_str("\">");
                self.open(open, "</a>");
                self.links.push(true);
            }
            None => self.links.push(false),
        }
    }

    /// A block ended: the next content is separated by a blank line, or by
    /// a newline inside lists.
    fn block_end(&mut self) {
        let sep = if self.lists.is_empty() { "\n\n" } else { "\n" };
        self.soft_sep(sep);
    }

    /// Owes `sep` before the next content, keeping the larger of two.
    fn soft_sep(&mut self, sep: &'static str) {
        self.pending = match self.pending {
            Some(current) if current.len() >= sep.len() => Some(current),
            _ => Some(sep),
        };
    }

    fn flush_sep(&mut self) {
        if let Some(text) = self.pending.take() {
            if self.tokens.is_empty() {
                return;
            }
            let level = if self.depth == 0 && text.len() == 2 {
                BLOCK
            } else {
                LINE
            };
            self.tokens.push(Token::Sep { text, level });
        }
    }

    fn open(&mut self, open: String, close: &'static str) {
        self.flush_sep();
        self.tokens.push(Token::Open { open, close });
        self.depth += 1;
    }

    fn close(&mut self) {
        self.tokens.push(Token::Close);
        self.depth = self.depth.saturating_sub(1);
    }

    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.flush_sep();
        match self.tokens.last_mut() {
            Some(Token::Text(last)) => last.push_str(text),
            _ => self.tokens.push(Token::Text(text.to_owned())),
        }
    }

    fn table_block(&mut self, table: Table) {
        let columns = table.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0usize; columns];
        let rows: Vec<Vec<String>> = table
            .rows
            .into_iter()
            .map(|row| row.into_iter().map(|c| c.trim().to_owned()).collect())
            .collect();
        for row in &rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut text = String::new();
        for (r, row) in rows.iter().enumerate() {
            if r > 0 {
                text.push('\n');
            }
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str(" | ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
            text.push_str(line.trim_end());
            if r + 1 == table.header_rows && rows.len() > r + 1 {
                text.push('\n');
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat((*w).max(1))).collect();
                text.push_str(&rule.join("-+-"));
            }
        }
        if text.is_empty() {
            return;
        }
        self.open("<pre>".into(), "</pre>");
        self.text(&text);
        self.close();
        self.block_end();
    }
}

/// The language of a fenced code block's info string, reduced to characters
/// that are safe in a class attribute.
fn language(info: &str) -> String {
    info.split_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '#' | '.' | '-'))
        .take(32)
        .collect()
}

/// Whether Telegram accepts `url` as a link target and it is safe to click:
/// absolute `http`, `https`, `tg` or `mailto` URLs.
fn safe_url(url: &str) -> bool {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once(':') else {
        return false;
    };
    if url.chars().any(|c| c.is_control() || c == ' ') || rest.is_empty() {
        return false;
    }
    ["http", "https", "tg", "mailto"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
}

/// A place where the current part may end.
#[derive(Clone)]
struct Cut {
    /// Length of the part's HTML when it ends here.
    end: usize,
    /// Tags open at the cut (token indexes).
    stack: Rc<Vec<usize>>,
    /// Where the next part starts: token index and byte offset in it.
    resume: (usize, usize),
}

struct Splitter<'t> {
    tokens: &'t [Token],
    limit: Limit,
    parts: Vec<String>,
    /// The part being built.
    part: String,
    cost: usize,
    /// Whether the part holds a visible non-whitespace character.
    has_content: bool,
    /// Open tags (token indexes) and the measure of their closing tags.
    stack: Rc<Vec<usize>>,
    close_cost: usize,
    best: [Option<Cut>; 5],
}

impl<'t> Splitter<'t> {
    fn new(tokens: &'t [Token], limit: Limit) -> Self {
        Splitter {
            tokens,
            limit,
            parts: Vec::new(),
            part: String::new(),
            cost: 0,
            has_content: false,
            stack: Rc::new(Vec::new()),
            close_cost: 0,
            best: Default::default(),
        }
    }

    fn measure(&self, s: &str) -> usize {
        self.limit.measure.len(s)
    }

    fn open_tag(&self, i: usize) -> (&'t str, &'static str) {
        match &self.tokens[i] {
            Token::Open { open, close } => (open.as_str(), close),
            _ => ("", ""),
        }
    }

    fn run(mut self) -> Vec<String> {
        let mut pos = (0usize, 0usize);
        while pos.0 < self.tokens.len() {
            pos = match self.step(pos) {
                Ok(next) => next,
                Err(()) => self.cut(pos),
            };
        }
        self.finish_part();
        self.parts
    }

    /// Processes the token at `pos` (from its byte offset). Returns where to
    /// continue, or `Err` when the part is full.
    fn step(&mut self, (index, offset): (usize, usize)) -> Result<(usize, usize), ()> {
        let tokens = self.tokens;
        match &tokens[index] {
            Token::Open { open, close } => {
                let open_cost = self.measure(open);
                let close_cost = self.measure(close);
                if self.has_content {
                    self.offer(CHAR, (index, 0));
                }
                if self.cost + open_cost + close_cost + self.close_cost > self.limit.max
                    && !self.must_force()
                {
                    return Err(());
                }
                self.part.push_str(open);
                self.cost += open_cost;
                self.close_cost += close_cost;
                Rc::make_mut(&mut self.stack).push(index);
                Ok((index + 1, 0))
            }
            Token::Close => {
                self.pop_tag();
                Ok((index + 1, 0))
            }
            Token::Sep { text, level } => {
                if !self.has_content {
                    return Ok((index + 1, 0));
                }
                self.offer(*level, (index + 1, 0));
                let cost = self.measure(text);
                if self.cost + cost + self.close_cost > self.limit.max {
                    return Err(());
                }
                self.part.push_str(text);
                self.cost += cost;
                Ok((index + 1, 0))
            }
            Token::Text(text) => {
                let measure = self.limit.measure;
                let mut prev = text[..offset].chars().next_back().unwrap_or('\n');
                for (i, c) in text[offset..].char_indices() {
                    let at = offset + i;
                    if self.has_content {
                        if c == '\n' {
                            self.offer(LINE, (index, at + 1));
                        } else if c == ' ' || c == '\t' {
                            if !prev.is_whitespace() {
                                self.offer(WORD, (index, at + 1));
                            }
                        } else if joins(prev, c) {
                            self.offer(HARD_CHAR, (index, at));
                        } else {
                            self.offer(CHAR, (index, at));
                        }
                    }
                    let cost = escaped_len(c, measure);
                    if self.cost + cost + self.close_cost > self.limit.max && !self.must_force() {
                        return Err(());
                    }
                    push_escaped(&mut self.part, c, false);
                    self.cost += cost;
                    if !c.is_whitespace() {
                        self.has_content = true;
                    }
                    prev = c;
                }
                Ok((index + 1, 0))
            }
        }
    }

    /// Nothing fits and there is no place to cut: the part must take what
    /// comes, beyond the limit, or splitting would never end.
    fn must_force(&self) -> bool {
        !self.has_content && self.best.iter().all(Option::is_none)
    }

    fn offer(&mut self, level: usize, resume: (usize, usize)) {
        self.best[level] = Some(Cut {
            end: self.part.len(),
            stack: Rc::clone(&self.stack),
            resume,
        });
    }

    /// Closes the innermost tag, dropping it instead when it holds nothing.
    fn pop_tag(&mut self) {
        let Some(i) = Rc::make_mut(&mut self.stack).pop() else {
            return;
        };
        let (open, close) = self.open_tag(i);
        let close_cost = self.measure(close);
        self.close_cost = self.close_cost.saturating_sub(close_cost);
        if self.part.ends_with(open) {
            self.part.truncate(self.part.len() - open.len());
            self.cost = self.cost.saturating_sub(self.measure(open));
        } else {
            self.part.push_str(close);
            self.cost += close_cost;
        }
    }

    /// Ends the part at the best cut found and starts the next one after it.
    /// Without a cut (which the callers rule out) the part ends where it is.
    fn cut(&mut self, pos: (usize, usize)) -> (usize, usize) {
        let Some(cut) = self.best.iter().rev().flatten().next().cloned() else {
            self.finish_part();
            return pos;
        };
        self.part.truncate(cut.end);
        self.close_cost = cut
            .stack
            .iter()
            .map(|&i| self.measure(self.open_tag(i).1))
            .sum();
        self.stack = Rc::clone(&cut.stack);
        self.finish_part();
        // Reopen what was open at the cut.
        for &i in cut.stack.iter() {
            let (open, close) = self.open_tag(i);
            self.part.push_str(open);
            self.cost += self.measure(open);
            self.close_cost += self.measure(close);
        }
        self.stack = cut.stack;
        cut.resume
    }

    /// Closes the tags still open and stores the part if it has content.
    fn finish_part(&mut self) {
        while !self.stack.is_empty() {
            self.pop_tag();
        }
        let part = std::mem::take(&mut self.part);
        let part = part.trim_end();
        if self.has_content {
            self.parts.push(part.to_owned());
        }
        self.cost = 0;
        self.close_cost = 0;
        self.has_content = false;
        self.best = Default::default();
    }
}

/// Whether a cut between `prev` and `next` would tear a character sequence
/// apart (emoji with modifiers or joiners, combining marks, flags).
fn joins(prev: char, next: char) -> bool {
    prev == '\u{200D}'
        || matches!(next as u32,
            0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x200C..=0x200D
            | 0x20D0..=0x20FF | 0xFE00..=0xFE0F | 0xFE20..=0xFE2F | 0x1F3FB..=0x1F3FF
            | 0xE0020..=0xE007F | 0xE0100..=0xE01EF)
        || (matches!(prev as u32, 0x1F1E6..=0x1F1FF) && matches!(next as u32, 0x1F1E6..=0x1F1FF))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: usize) -> Limit {
        Limit::new(max, Measure::Utf16)
    }

    #[test]
    fn renders_the_telegram_subset() {
        let md = "# Title\n\nSome *em* and **bold** and ~~gone~~ and `a<b`.\n\n\
                  - one\n- two\n  1. sub\n\n> quoted **x**\n\n```rust\nfn a() -> u8 { 1 & 2 }\n```\n\n\
                  [site](https://example.com/?a=1&b=\"2\") [bad](javascript:alert(1)) <b>raw</b>";
        let html = render_html(md);
        assert_eq!(
            html,
            "<b>Title</b>\n\nSome <i>em</i> and <b>bold</b> and <s>gone</s> and <code>a&lt;b</code>.\n\n\
             • one\n• two\n  1. sub\n\n<blockquote>quoted <b>x</b></blockquote>\n\n\
             <pre><code class=\"language-rust\">fn a() -&gt; u8 { 1 &amp; 2 }</code></pre>\n\n\
             <a href=\"https://example.com/?a=1&amp;b=&quot;2&quot;\">site</a> bad &lt;b&gt;raw&lt;/b&gt;"
        );
    }

    #[test]
    fn links_do_not_nest() {
        let html = render_html("[![logo](https://e.com/l.png)](https://e.com)");
        assert_eq!(html, "<a href=\"https://e.com\">logo</a>");
    }

    #[test]
    fn tables_become_preformatted() {
        let html = render_html("| a | bb |\n|---|---|\n| 1 | 2 |\n");
        assert_eq!(html, "<pre>a | bb\n--+---\n1 | 2</pre>");
    }

    #[test]
    fn code_without_language_is_plain_pre() {
        assert_eq!(render_html("```\nx\n```"), "<pre>x</pre>");
        assert_eq!(render_html("    indented"), "<pre>indented</pre>");
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(
            split_html("hello *you*", limit(100)),
            vec!["hello <i>you</i>"]
        );
        assert!(split_html("  \n ", limit(100)).is_empty());
    }

    #[test]
    fn tags_are_closed_and_reopened_across_parts() {
        let md = format!("**{}**", "word ".repeat(30).trim());
        let parts = split_html(&md, limit(40));
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(Measure::Utf16.len(part) <= 40, "{part}");
            assert!(part.starts_with("<b>") && part.ends_with("</b>"), "{part}");
        }
        let words: usize = parts
            .iter()
            .map(|p| html_to_plain(p).split_whitespace().count())
            .sum();
        assert_eq!(words, 30);
    }

    #[test]
    fn code_blocks_continue_in_the_next_part() {
        let code: String = (0..40).map(|i| format!("line {i} <&>\n")).collect();
        let md = format!("intro\n\n```py\n{code}```\n\noutro");
        let parts = split_html(&md, limit(200));
        assert!(parts.len() > 2);
        let plain: String = parts
            .iter()
            .map(|p| html_to_plain(p))
            .collect::<Vec<_>>()
            .join("\n");
        for i in 0..40 {
            assert!(plain.contains(&format!("line {i} <&>")), "line {i} lost");
        }
        for part in &parts[1..parts.len() - 1] {
            assert!(
                part.starts_with("<pre><code class=\"language-py\">"),
                "{part}"
            );
            assert!(part.ends_with("</code></pre>"), "{part}");
        }
        assert!(parts[0].starts_with("intro"));
    }

    #[test]
    fn cuts_never_split_entities_or_surrogates() {
        let md = "&<>😀".repeat(50);
        for max in [7, 8, 9, 10, 13, 50] {
            for part in split_html(&md, limit(max)) {
                assert!(Measure::Utf16.len(&part) <= max, "{max}: {part}");
                let plain = html_to_plain(&part);
                assert!(!plain.contains(';'), "{part}");
            }
        }
    }

    #[test]
    fn blocks_are_preferred_cut_points() {
        let md = format!("{}\n\n{}", "a ".repeat(20).trim(), "b ".repeat(20).trim());
        let parts = split_html(&md, limit(60));
        assert_eq!(parts, vec!["a ".repeat(20).trim(), "b ".repeat(20).trim()]);
    }

    #[test]
    fn plain_fallback_keeps_text_and_link_targets() {
        let html = "<b>x &amp; y</b> <a href=\"https://e.com/?a&amp;b\">site</a> \
                    <a href=\"https://e.com\">https://e.com</a>";
        assert_eq!(
            html_to_plain(html),
            "x & y site (https://e.com/?a&b) https://e.com"
        );
    }

    /// The visible text of `html`, without link targets or whitespace.
    fn visible(html: &str) -> String {
        let mut text = String::new();
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' if in_tag => in_tag = false,
                c if !in_tag => text.push(c),
                _ => {}
            }
        }
        html_to_plain(&text)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect()
    }

    /// Checks that `html` only nests the tags Telegram knows, balanced.
    fn balanced(html: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = html;
        while let Some(start) = rest.find('<') {
            let Some(end) = rest[start..].find('>') else {
                return false;
            };
            let tag = &rest[start + 1..start + end];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name) {
                    return false;
                }
            } else {
                let name = tag.split(' ').next().unwrap_or("");
                if !["b", "i", "s", "u", "code", "pre", "a", "blockquote"].contains(&name) {
                    return false;
                }
                stack.push(name.to_owned());
            }
            rest = &rest[start + end + 1..];
        }
        stack.is_empty() && !rest.contains('>')
    }

    #[test]
    fn random_documents_split_into_valid_parts_without_loss() {
        let pieces = [
            "# Heading *em*\n\n",
            "Plain words with & and <tags> and émojis 😀👍🏽 here. ",
            "**bold _nested italic_ text** ",
            "[a link](https://example.com/x?y=1&z=2) ",
            "`inline <code>` ",
            "\n\n```rust\nfn main() {\n    println!(\"<>&\");\n}\n```\n\n",
            "\n\n- item one\n- item **two**\n  - nested\n\n",
            "\n\n> a quote with *style*\n> over lines\n\n",
            "\n\n| h1 | h2 |\n|----|----|\n| c1 | c2 |\n\n",
            "averyveryveryverylongwordwithoutanyspacesatallthatmustbecut ",
            "\n",
        ];
        let mut seed = 7u64;
        for round in 0..60 {
            let mut md = String::new();
            for _ in 0..(5 + round * 3) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                md.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            let whole = visible(&render_html(&md));
            for max in [64, 100, 333, 4096] {
                let parts = split_html(&md, limit(max));
                let mut joined = String::new();
                for part in &parts {
                    assert!(Measure::Utf16.len(part) <= max, "{max}: {part}");
                    assert!(balanced(part), "unbalanced: {part}");
                    joined.push_str(&visible(part));
                }
                assert_eq!(joined, whole, "round {round}, limit {max}");
            }
        }
    }
}
