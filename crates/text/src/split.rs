//! Splitting Markdown into parts that fit a platform's message limit.
//!
//! The text is parsed once, with pulldown-cmark's offset iterator, to find
//! where top-level blocks start and where every code block lies. Each part
//! is then found by one forward scan from where the previous part ended. The
//! scan keeps a running measure and remembers, for each kind of position at
//! which the part could end (between blocks, between lines, between words,
//! between characters), the last one that fits. Lines that fit whole are
//! measured in one go; only a line in which the part may have to end is
//! walked character by character. The scan stops as soon as nothing more
//! can fit, and the part ends at the best kind of position seen. A scan
//! covers at most one part's worth of text past its start, so splitting is
//! linear in the size of the input.

use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag};

use crate::Limit;

/// Below this limit code fences are not closed and reopened across parts.
const MIN_FENCE_LIMIT: usize = 16;

/// The most any one character measures, in any [`Measure`](crate::Measure).
const MAX_CHAR_LEN: usize = 4;

/// Splits Markdown into parts that each measure at most `limit.max`.
///
/// Text that fits is returned unchanged as a single part, and text that is
/// empty or only whitespace gives no parts. Otherwise parts end between
/// top-level blocks where possible, packing as many whole blocks into each
/// part as fit. A block too large for one part is cut between lines, else
/// between words, else between characters (avoiding cuts inside emoji
/// sequences and before combining marks where possible). A fenced code block
/// cut across parts is closed at the end of one part and reopened, with the
/// same fence and info string, at the start of the next; the added fence
/// lines count toward the limit. Whitespace at part boundaries is dropped,
/// and nothing else is lost or reordered.
///
/// Only when a single character measures more than `limit.max` (a limit
/// below 4) can a part exceed the limit: that character is then a part of its
/// own.
pub fn split_markdown(markdown: &str, limit: Limit) -> Vec<String> {
    if markdown.trim().is_empty() {
        return Vec::new();
    }
    if limit.fits(markdown) {
        return vec![markdown.to_owned()];
    }
    Splitter::new(markdown, limit).run()
}

/// Kinds of cut position, from least to most preferred; used as indexes.
const HARD_CHAR: usize = 0;
const CHAR: usize = 1;
const WORD: usize = 2;
const LINE: usize = 3;
const BLOCK: usize = 4;

/// A fenced code block, with what it takes to close and reopen it.
struct Fence {
    /// Start of the line holding the opening fence.
    open_start: usize,
    /// Start of the first content line.
    content_start: usize,
    /// End of the last non-whitespace character of the content, or
    /// `content_start` when the block is empty.
    content_end: usize,
    /// Start of the closing fence line, or the end of the block if unclosed.
    close_start: usize,
    /// End of the closing fence line including its newline, or the end of
    /// the block if unclosed.
    close_end: usize,
    /// The line that reopens the block at the start of a part.
    reopen: String,
    /// The block quote markers the block is in, repeated before content
    /// when a part starts in the middle of one of its lines.
    quote: String,
    /// The lines that close the block, as picked by [`Fence::closing`]: added
    /// ones, and the block's own closing line, each for a part that holds
    /// the opening line and for a part that reopened the block.
    closing: [String; 4],
    /// Measure of each of `closing` with the newline before it.
    closing_cost: [usize; 4],
    /// Measure of `reopen` and the newline after it.
    reopen_cost: usize,
    /// Whether the limit leaves room to close and reopen this block.
    enabled: bool,
}

impl Fence {
    /// Reads the fenced code block whose event range is `range`.
    fn parse(text: &str, range: std::ops::Range<usize>, limit: Limit) -> Option<Fence> {
        if !text.is_char_boundary(range.start) || !text.is_char_boundary(range.end) {
            return None;
        }
        let bytes = text.as_bytes();
        let open_start = line_start(text, range.start);
        let open_end = line_end(text, open_start);
        let mut fence_pos = range.start.max(open_start);
        while fence_pos < open_end && matches!(bytes[fence_pos], b' ' | b'\t' | b'>') {
            fence_pos += 1;
        }
        let fence_char = *bytes.get(fence_pos).filter(|&&b| b == b'`' || b == b'~')?;
        let fence_len = bytes[fence_pos..open_end]
            .iter()
            .take_while(|&&b| b == fence_char)
            .count();
        if fence_len < 3 {
            return None;
        }
        let fence = &text[fence_pos..fence_pos + fence_len];
        let opening = text[fence_pos..open_end].trim_end();
        let content_start = (open_end + 1).min(text.len());

        let end = range.end.min(text.len()).max(content_start);
        let last_end = if end > content_start && bytes[end - 1] == b'\n' {
            end - 1
        } else {
            end
        };
        let last_start = line_start(text, last_end);
        let closed = last_start >= content_start
            && is_closing_line(&text[last_start..last_end], fence_char, fence_len);
        let (close_start, close_end) = if closed {
            let close_end = if bytes.get(last_end) == Some(&b'\n') {
                last_end + 1
            } else {
                last_end
            };
            (last_start, close_end)
        } else {
            (end, end)
        };

        let content_end = text[content_start..close_start]
            .trim_end()
            .len()
            .saturating_add(content_start);

        // What precedes the fence on its line: indentation, block quote
        // markers and list markers. Continuation lines of the same containers
        // keep the quote markers and replace list markers with spaces.
        let container: String = text[open_start..fence_pos]
            .chars()
            .map(|c| {
                if matches!(c, '>' | ' ' | '\t') {
                    c
                } else {
                    ' '
                }
            })
            .collect();
        // A part is a fresh document: a fence indented by four columns or more
        // would read as an indented code block there.
        let indent: usize = container
            .chars()
            .take_while(|c| c.is_whitespace())
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum();
        let reopen_container = if indent >= 4 {
            container.trim_start()
        } else {
            container.as_str()
        };
        let quote = quote_markers(reopen_container).to_owned();
        let reopen = format!("{reopen_container}{opening}");
        let close = format!("{container}{fence}");
        let close_reopened = format!("{reopen_container}{fence}");
        let (own, own_reopened) = if closed {
            let line = text[close_start..close_end].trim_end();
            let reopened = if indent >= 4 { line.trim_start() } else { line };
            (line.to_owned(), reopened.to_owned())
        } else {
            (close.clone(), close_reopened.clone())
        };
        let closing = [close, close_reopened, own, own_reopened];

        let measure = limit.measure;
        let reopen_cost = measure.len(&reopen) + 1;
        let closing_cost = closing.each_ref().map(|line| measure.len(line) + 1);
        let (close_cost, close_reopened_cost) = (closing_cost[0], closing_cost[1]);
        let open_cost = measure.len(text[open_start..open_end].trim_end()) + 1;
        // Room for the opening line or the reopening line with the quote
        // markers repeated after it, a closing line and one character.
        let head_cost = open_cost.max(reopen_cost + measure.len(&quote));
        let enabled = limit.max >= MIN_FENCE_LIMIT
            && head_cost + close_cost.max(close_reopened_cost) + MAX_CHAR_LEN <= limit.max;
        Some(Fence {
            open_start,
            content_start,
            content_end,
            close_start,
            close_end,
            reopen,
            quote,
            closing,
            closing_cost,
            reopen_cost,
            enabled,
        })
    }

    /// The closing line for a part that reopened the block or not, and that
    /// cuts it inside its content or finishes it, with its measure.
    fn closing(&self, reopened: bool, finish: bool) -> (&str, usize) {
        let i = usize::from(finish) * 2 + usize::from(reopened);
        (&self.closing[i], self.closing_cost[i])
    }

    /// Whether a cut at `pos` falls inside this block's content, so that the
    /// part must close the block and the next part reopen it. A cut after
    /// the last non-whitespace content is not inside: it would leave the next
    /// part an empty block.
    fn holds(&self, pos: usize) -> bool {
        self.enabled && self.content_start < pos && pos < self.content_end
    }

    /// What a cut at `pos`, with `open_start < pos < close_end`, does to
    /// this enabled block; `None` when the cut is not allowed there.
    fn cut_at(&self, pos: usize) -> Option<FenceCut> {
        let closed = self.close_start < self.close_end;
        if pos >= self.content_end {
            if !closed {
                // Only whitespace is left before the end of an unclosed
                // block: the part ends the block as the source does.
                Some(FenceCut::Outside)
            } else if pos <= self.close_start {
                Some(FenceCut::Finish)
            } else {
                None
            }
        } else if pos > self.content_start {
            Some(FenceCut::Inside)
        } else if pos == self.content_start {
            Some(FenceCut::Empty)
        } else {
            None
        }
    }
}

/// What a cut does to the fenced code block it falls in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FenceCut {
    /// The cut is not in the block's reach: nothing to do.
    Outside,
    /// Inside the content: close the block, and reopen it in the next part.
    Inside,
    /// Right after the opening line, when nothing else fits: close the
    /// block at once, and reopen it in the next part.
    Empty,
    /// Only whitespace left before the closing line: close the block with
    /// an added line, and let the next part start after the original one.
    Finish,
}

/// Whether `line` closes a code block opened by `len` times `fence_char`.
fn is_closing_line(line: &str, fence_char: u8, len: usize) -> bool {
    let rest = line.trim_start_matches([' ', '\t', '>']);
    let run = rest.bytes().take_while(|&b| b == fence_char).count();
    run >= len && rest[run..].trim().is_empty()
}

/// Where a part starts.
#[derive(Clone, Copy)]
struct Start {
    /// First byte of the part's own text.
    pos: usize,
    /// Start of the line holding `pos`.
    line: usize,
    /// The fenced code block the part reopens, if any.
    reopen: Option<usize>,
}

/// Where a part ends.
#[derive(Clone, Copy)]
struct Cut {
    /// End of the part's text, trailing whitespace excluded.
    end: usize,
    /// Where the next part starts looking.
    next: usize,
    /// Start of the line holding `next`.
    next_line: usize,
    /// The fenced code block this part closes with an added line.
    close: Option<usize>,
    /// Whether that line stands for the block's own closing line, which the
    /// next part skips.
    finish: bool,
    /// The fenced code block the next part reopens.
    reopen: Option<usize>,
}

/// One splitting run over one text.
struct Splitter<'a> {
    text: &'a str,
    limit: Limit,
    /// Starts of the lines that start top-level blocks, ascending, after 0.
    blocks: Vec<usize>,
    /// Every code block, from the start of its first line, ascending.
    code: Vec<(usize, usize)>,
    /// Every fenced code block, ascending.
    fences: Vec<Fence>,
}

impl<'a> Splitter<'a> {
    fn new(text: &'a str, limit: Limit) -> Self {
        let mut blocks = Vec::new();
        let mut code = Vec::new();
        let mut fences = Vec::new();
        let mut depth = 0usize;
        let top_level = |start: usize, blocks: &mut Vec<usize>| {
            let start = line_start(text, start);
            if start > 0 && blocks.last().is_none_or(|&last| start > last) {
                blocks.push(start);
            }
        };
        for (event, range) in Parser::new_ext(text, crate::options()).into_offset_iter() {
            match event {
                Event::Start(tag) => {
                    if depth == 0 {
                        top_level(range.start, &mut blocks);
                    }
                    depth += 1;
                    if let Tag::CodeBlock(kind) = tag {
                        let start = line_start(text, range.start);
                        if code.last().is_none_or(|&(_, end)| start >= end) {
                            code.push((start, range.end.min(text.len())));
                        }
                        if matches!(kind, CodeBlockKind::Fenced(_))
                            && let Some(fence) = Fence::parse(text, range, limit)
                            && fences
                                .last()
                                .is_none_or(|last: &Fence| fence.open_start >= last.close_end)
                        {
                            fences.push(fence);
                        }
                    }
                }
                Event::End(_) => depth = depth.saturating_sub(1),
                _ => {
                    if depth == 0 {
                        top_level(range.start, &mut blocks);
                    }
                }
            }
        }
        Splitter {
            text,
            limit,
            blocks,
            code,
            fences,
        }
    }

    fn run(&self) -> Vec<String> {
        let mut parts = Vec::new();
        let mut cut = Cut {
            end: 0,
            next: 0,
            next_line: 0,
            close: None,
            finish: false,
            reopen: None,
        };
        while let Some(start) = self.start_at(cut) {
            let part;
            (part, cut) = match self.scan(start).map(|cut| (start, cut)).or_else(|| {
                // Indentation at a part boundary may go when it alone is
                // what keeps anything from fitting.
                let pos = first_non_space(self.text, start.pos)?;
                let dedented = Start { pos, ..start };
                (pos > start.pos)
                    .then(|| self.scan(dedented))
                    .flatten()
                    .map(|cut| (dedented, cut))
            }) {
                Some((start, cut)) => (self.part(start, cut), cut),
                None => self.forced(start),
            };
            parts.push(part);
        }
        parts
    }

    /// Where the part after `cut` starts; `None` when only whitespace is
    /// left.
    ///
    /// Blank lines are skipped but the first line keeps its indentation,
    /// unless it is indented enough to read as code while not being code.
    fn start_at(&self, cut: Cut) -> Option<Start> {
        let text = self.text;
        let pos = cut.next;
        let q = first_non_space(text, pos)?;
        let (pos, line) = match text[pos..q].rfind('\n') {
            Some(i) => (pos + i + 1, pos + i + 1),
            None => (pos, cut.next_line),
        };
        let reopen = cut.reopen;
        let pos = if reopen.is_none()
            && pos == line
            && !self.in_code(pos)
            && indent_width(&text[pos..q]) >= 4
        {
            q
        } else {
            pos
        };
        Some(Start { pos, line, reopen })
    }

    /// The block quote markers to repeat before a part that starts in the
    /// middle of a quoted line, so that the rest of the line stays quoted.
    fn quote_prefix(&self, start: Start) -> &str {
        if start.pos == start.line {
            ""
        } else if let Some(f) = start.reopen {
            &self.fences[f].quote
        } else if self.in_code(start.pos) {
            ""
        } else {
            quote_markers(&self.text[start.line..start.pos])
        }
    }

    /// Finds where the part starting at `start` ends, or `None` when not even
    /// one character fits.
    fn scan(&self, start: Start) -> Option<Cut> {
        let head_cost = start.reopen.map_or(0, |f| self.fences[f].reopen_cost)
            + self.limit.measure.len(self.quote_prefix(start));
        let mut scan = Scan {
            splitter: self,
            start,
            budget: self.limit.max.checked_sub(head_cost)?,
            best: [None; 5],
            block: self.blocks.partition_point(|&b| b < start.pos),
            fence: self.fences.partition_point(|f| f.close_end <= start.pos),
            cost: 0,
            kept_cost: 0,
            kept_end: start.pos,
            line: start.line,
        };
        scan.run();
        scan.best.into_iter().rev().flatten().next()
    }

    /// Builds the part from `start` to `cut`, reopening and closing code
    /// blocks as needed.
    fn part(&self, start: Start, cut: Cut) -> String {
        let prefix = self.quote_prefix(start);
        let body = &self.text[start.pos..cut.end];
        let mut part = String::with_capacity(body.len() + prefix.len() + 32);
        if let Some(f) = start.reopen {
            part.push_str(&self.fences[f].reopen);
            part.push('\n');
        }
        part.push_str(prefix);
        part.push_str(body);
        if let Some(f) = cut.close {
            part.push('\n');
            part.push_str(
                self.fences[f]
                    .closing(start.reopen == Some(f), cut.finish)
                    .0,
            );
        }
        part
    }

    /// The last resort when nothing fits from `start`: as many characters of
    /// one line as fit, at least one, ignoring structure.
    fn forced(&self, start: Start) -> (String, Cut) {
        let text = self.text;
        let from = first_non_space(text, start.pos).unwrap_or(start.pos);
        let mut stop = line_end(text, from);
        if let Some(f) = self.fence_holding(from) {
            stop = stop.min(self.fences[f].content_end);
        }
        let mut cost = 0;
        let mut end = from;
        for (offset, c) in text[from..stop.max(from)].char_indices() {
            let len = self.limit.measure.char_len(c);
            if end > from && cost + len > self.limit.max {
                break;
            }
            cost += len;
            end = from + offset + c.len_utf8();
        }
        let part = text[from..end].trim_end().to_owned();
        let cut = Cut {
            end,
            next: end,
            next_line: start.line,
            close: None,
            finish: false,
            reopen: self.fence_holding(end),
        };
        (part, cut)
    }

    /// The enabled fenced code block whose content holds `pos`, if any.
    fn fence_holding(&self, pos: usize) -> Option<usize> {
        let f = self.fences.partition_point(|f| f.close_end <= pos);
        self.fences.get(f).filter(|f| f.holds(pos)).map(|_| f)
    }

    /// Whether `pos` lies in a code block, where indentation is content.
    fn in_code(&self, pos: usize) -> bool {
        let i = self.code.partition_point(|&(start, _)| start <= pos);
        i > 0 && self.code[i - 1].1 > pos
    }
}

/// One search for the end of a part.
///
/// Lines that fit whole are measured at once and only offer the cut after
/// them; a line is walked character by character only when the part may
/// have to end inside it.
struct Scan<'s, 'a> {
    splitter: &'s Splitter<'a>,
    start: Start,
    /// What the part's own text may measure, closing line included.
    budget: usize,
    /// The last cut that fits, for each kind of cut position.
    best: [Option<Cut>; 5],
    /// Index of the first top-level block boundary not before the scan.
    block: usize,
    /// Index of the first fenced code block not ended before the scan.
    fence: usize,
    /// Measure of the text scanned so far.
    cost: usize,
    /// Measure of the text scanned so far up to its last non-whitespace
    /// character, which ends at `kept_end`.
    kept_cost: usize,
    kept_end: usize,
    /// Start of the line being scanned.
    line: usize,
}

impl Scan<'_, '_> {
    fn run(&mut self) {
        let text = self.splitter.text;
        let measure = self.splitter.limit.measure;
        let mut from = self.start.pos;
        loop {
            // Any measure counts at least one unit per four bytes, so a line
            // with no newline in this window cannot fit.
            let room = self.budget.saturating_sub(self.kept_cost);
            let mut window = from
                .saturating_add(room.saturating_mul(MAX_CHAR_LEN))
                .saturating_add(MAX_CHAR_LEN)
                .min(text.len());
            while !text.is_char_boundary(window) {
                window += 1;
            }
            let end = match text[from..window].find('\n') {
                Some(offset) => Some(from + offset),
                None => (window == text.len()).then_some(window),
            };
            let end = match end {
                Some(end) => {
                    let line = &text[from..end];
                    let body = line.trim_end();
                    let body_cost = measure.len(body);
                    if body.is_empty() || self.cost + body_cost <= self.budget {
                        let before = (self.cost, self.kept_cost, self.kept_end);
                        if !body.is_empty() {
                            self.kept_cost = self.cost + body_cost;
                            self.kept_end = from + body.len();
                        }
                        self.cost += body_cost + measure.len(&line[body.len()..]);
                        if !self.offer_line_end(end) && !self.has_line_cut() {
                            // The cut after the line is not allowed or its
                            // closing line does not fit: look inside it.
                            (self.cost, self.kept_cost, self.kept_end) = before;
                            self.chars(from, true);
                        }
                        end
                    } else if self.has_line_cut() {
                        return;
                    } else {
                        // Overflows within the line.
                        self.chars(from, true);
                        return;
                    }
                }
                None => {
                    let offer = !self.has_line_cut();
                    let Some(end) = self.chars(from, offer) else {
                        return;
                    };
                    self.offer_line_end(end);
                    end
                }
            };
            if end == text.len() {
                return;
            }
            self.cost += 1;
            from = end + 1;
            self.line = from;
        }
    }

    /// Whether a cut between lines or blocks has been found.
    fn has_line_cut(&self) -> bool {
        self.best[LINE].is_some() || self.best[BLOCK].is_some()
    }

    /// Offers the cut after the line ending at `end`.
    fn offer_line_end(&mut self, end: usize) -> bool {
        if end == self.splitter.text.len() {
            self.offer(end, BLOCK, end)
        } else {
            self.offer(end + 1, LINE, end + 1)
        }
    }

    /// Walks the line from `from` character by character, offering the cuts
    /// between its characters when `offer` is set. Returns where the line
    /// ends, or `None` when the part overflows inside it.
    fn chars(&mut self, from: usize, offer: bool) -> Option<usize> {
        let text = self.splitter.text;
        let measure = self.splitter.limit.measure;
        let mut prev = '\n';
        let mut regional_run = 0usize;
        for (offset, c) in text[from..].char_indices() {
            let i = from + offset;
            if c == '\n' {
                return Some(i);
            }
            if offer && i > from {
                let level = if prev.is_whitespace() && !c.is_whitespace() {
                    WORD
                } else if joins(prev, c, regional_run) {
                    HARD_CHAR
                } else {
                    CHAR
                };
                // A cut of a kind below one already found would not be used.
                if self.best[level + 1..].iter().all(Option::is_none) {
                    self.offer(i, level, self.line);
                }
            }
            self.cost += measure.char_len(c);
            if !c.is_whitespace() {
                self.kept_cost = self.cost;
                self.kept_end = i + c.len_utf8();
                if self.kept_cost > self.budget {
                    return None;
                }
            }
            regional_run = if is_regional_indicator(c) {
                regional_run + 1
            } else {
                0
            };
            prev = c;
        }
        Some(text.len())
    }

    /// Offers a cut at `i`, on the line starting at `line`, of kind `level`
    /// unless it is a block boundary; records it if allowed and it fits.
    fn offer(&mut self, i: usize, level: usize, line: usize) -> bool {
        if self.kept_cost == 0 {
            return false;
        }
        let s = self.splitter;
        while s.blocks.get(self.block).is_some_and(|&b| b < i) {
            self.block += 1;
        }
        while s.fences.get(self.fence).is_some_and(|f| f.close_end <= i) {
            self.fence += 1;
        }
        let level = if i == s.text.len() || s.blocks.get(self.block) == Some(&i) {
            BLOCK
        } else {
            level
        };
        // What the cut does to a code block it falls in; a cut may not fall
        // inside a fence line.
        let fence = self.fence;
        let action = match s.fences.get(fence) {
            Some(f) if f.enabled && f.open_start < i => f.cut_at(i),
            _ => Some(FenceCut::Outside),
        };
        let Some(action) = action else {
            return false;
        };
        let (level, close, reopen, next, next_line) = match action {
            FenceCut::Outside => (level, None, None, i, line),
            FenceCut::Inside => (level, Some(fence), Some(fence), i, line),
            FenceCut::Empty => (HARD_CHAR, Some(fence), Some(fence), i, line),
            FenceCut::Finish => {
                let end = s.fences[fence].close_end;
                (level, Some(fence), None, end, end)
            }
        };
        let finish = action == FenceCut::Finish;
        let extra = close.map_or(0, |f| {
            s.fences[f].closing(self.start.reopen == Some(f), finish).1
        });
        if self.kept_cost + extra > self.budget {
            return false;
        }
        self.best[level] = Some(Cut {
            end: self.kept_end,
            next,
            next_line,
            close,
            finish,
            reopen,
        });
        true
    }
}

/// Start of the line holding byte `pos`.
fn line_start(text: &str, pos: usize) -> usize {
    let pos = pos.min(text.len());
    text.as_bytes()[..pos]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1)
}

/// Position of the newline ending the line that starts at `start`, or the
/// end of the text.
fn line_end(text: &str, start: usize) -> usize {
    text.as_bytes()[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |i| start + i)
}

/// Position of the first non-whitespace character at or after `pos`.
fn first_non_space(text: &str, pos: usize) -> Option<usize> {
    text[pos..]
        .char_indices()
        .find(|(_, c)| !c.is_whitespace())
        .map(|(i, _)| pos + i)
}

/// The block quote markers that start `lead`, the start of a line: its
/// leading run of `>`, spaces and tabs up to the last `>` and one space
/// after it, without indentation before the first marker.
fn quote_markers(lead: &str) -> &str {
    let run = &lead[..lead.len() - lead.trim_start_matches([' ', '\t', '>']).len()];
    match run.rfind('>') {
        Some(i) if run[i + 1..].starts_with(' ') => run[..i + 2].trim_start(),
        Some(i) => run[..i + 1].trim_start(),
        None => "",
    }
}

/// Width in columns of leading whitespace, a tab counting four.
fn indent_width(s: &str) -> usize {
    s.chars()
        .map(|c| if c == '\t' { 4 } else { 1 })
        .sum::<usize>()
}

/// Whether a cut between `prev` and `next` would tear a grapheme-ish
/// sequence apart: an emoji with its variation selector, skin tone, keycap
/// or zero-width joiner, a flag's two regional indicators, a letter and its
/// combining mark, or CR LF. `regional_run` counts the regional indicators
/// ending at `prev`.
fn joins(prev: char, next: char, regional_run: usize) -> bool {
    prev == '\u{200D}'
        || (prev == '\r' && next == '\n')
        || (is_regional_indicator(next) && regional_run % 2 == 1)
        || is_extending(next)
}

/// Characters that attach to the one before them.
fn is_extending(c: char) -> bool {
    matches!(c as u32,
        0x0300..=0x036F     // combining diacritical marks
        | 0x0483..=0x0489   // cyrillic combining marks
        | 0x0591..=0x05BD   // hebrew points
        | 0x0610..=0x061A | 0x064B..=0x065F | 0x0670 // arabic marks
        | 0x093A..=0x094F   // devanagari vowel signs and virama
        | 0x0E31 | 0x0E34..=0x0E3A | 0x0E47..=0x0E4E // thai marks
        | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF // combining marks
        | 0x200C..=0x200D   // zero-width non-joiner and joiner
        | 0x20D0..=0x20FF   // combining marks for symbols, keycap
        | 0xFE00..=0xFE0F   // variation selectors
        | 0xFE20..=0xFE2F   // combining half marks
        | 0x1F3FB..=0x1F3FF // emoji skin tones
        | 0xE0020..=0xE007F // emoji tag sequences
        | 0xE0100..=0xE01EF // variation selectors supplement
    )
}

fn is_regional_indicator(c: char) -> bool {
    matches!(c as u32, 0x1F1E6..=0x1F1FF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Measure;

    fn limit(max: usize) -> Limit {
        Limit::new(max, Measure::Chars)
    }

    #[test]
    fn finds_top_level_blocks_and_fences() {
        let text = "intro\n\n> ```rust\n> code\n> ```\n\n- ```py\n  x\n  ```\n\n---\n\n```\nopen\n";
        let s = Splitter::new(text, limit(40));
        let starts: Vec<&str> = s.blocks.iter().map(|&b| &text[b..b + 3]).collect();
        assert_eq!(starts, ["> `", "- `", "---", "```"]);
        assert_eq!(s.fences.len(), 3);
        let quoted = &s.fences[0];
        assert_eq!(quoted.reopen, "> ```rust");
        assert_eq!(quoted.closing(false, false).0, "> ```");
        assert_eq!(&text[quoted.content_start..quoted.content_end], "> code");
        assert_eq!(&text[quoted.content_end..quoted.close_end], "\n> ```\n");
        let listed = &s.fences[1];
        assert_eq!(listed.reopen, "  ```py");
        assert_eq!(listed.closing(false, false).0, "  ```");
        let open = &s.fences[2];
        assert_eq!(&text[open.content_start..open.content_end], "open");
        assert_eq!(open.close_end, text.len());
    }

    #[test]
    fn fences_are_disabled_when_there_is_no_room() {
        let text = "```rust\ncode\n```\n";
        assert!(Splitter::new(text, limit(20)).fences[0].enabled);
        assert!(!Splitter::new(text, limit(15)).fences[0].enabled);
    }

    #[test]
    fn joins_grapheme_sequences() {
        assert!(joins('❤', '\u{FE0F}', 0));
        assert!(joins('👨', '\u{200D}', 0));
        assert!(joins('\u{200D}', '👩', 0));
        assert!(joins('e', '\u{301}', 0));
        assert!(joins('\u{1F1EB}', '\u{1F1F7}', 1));
        assert!(!joins('\u{1F1F7}', '\u{1F1E9}', 2));
        assert!(!joins('a', 'b', 0));
        assert!(!joins('😀', '😀', 0));
    }
}
