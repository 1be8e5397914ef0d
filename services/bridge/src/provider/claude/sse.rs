//! A small server-sent-events decoder that reads frames the way the SDK's
//! `SSEDecoder` (`_streaming.py`) does: lines end with `\n`, `\r\n` or `\r`;
//! a blank line ends a frame; `event:` and `data:` are kept (several `data:`
//! lines joined with `\n`), comments and other fields ignored.
//!
//! Unlike general-purpose decoders it keeps "no `event:` line" apart from
//! `event: message`, because the SDK drops frames without an event name,
//! and it reuses its buffers so a frame costs no allocation.

use bytes::{Buf, BytesMut};

/// Incremental decoder: feed chunks with [`SseDecoder::push`], take frames
/// with [`SseDecoder::next_frame`].
#[derive(Default)]
pub(super) struct SseDecoder {
    buf: BytesMut,
    event: String,
    has_event: bool,
    data: Vec<u8>,
    has_data: bool,
    /// A `\r` ended the last line; a `\n` right after it is part of it.
    skip_lf: bool,
    /// The last frame was handed out; clear the fields before reading on.
    dispatched: bool,
    /// Bytes at the start of `buf` known to hold no line end.
    scanned: usize,
}

/// One frame: its event name (None without an `event:` line) and data.
pub(super) struct Frame<'a> {
    pub event: Option<&'a str>,
    pub data: &'a [u8],
}

impl SseDecoder {
    /// Appends received bytes.
    pub(super) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame in the buffered bytes, if any.
    pub(super) fn next_frame(&mut self) -> Option<Frame<'_>> {
        if self.dispatched {
            self.dispatched = false;
            self.event.clear();
            self.has_event = false;
            self.data.clear();
            self.has_data = false;
        }
        loop {
            if self.skip_lf && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
                self.skip_lf = false;
            }
            let Some(found) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scanned..]) else {
                self.scanned = self.buf.len();
                return None;
            };
            let end = self.scanned + found;
            self.scanned = 0;
            let terminator = self.buf[end];
            if end == 0 {
                self.buf.advance(1);
                self.skip_lf = terminator == b'\r';
                if self.has_event || self.has_data {
                    self.dispatched = true;
                    return Some(Frame {
                        event: self.has_event.then_some(self.event.as_str()),
                        data: &self.data,
                    });
                }
                continue;
            }
            self.field(end);
            self.buf.advance(end + 1);
            self.skip_lf = terminator == b'\r';
        }
    }

    /// Reads the field in the first `len` buffered bytes.
    fn field(&mut self, len: usize) {
        let line = &self.buf[..len];
        if line[0] == b':' {
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"event" => {
                self.event.clear();
                self.event.push_str(&String::from_utf8_lossy(value));
                self.has_event = true;
            }
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
        let mut decoder = SseDecoder::default();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame() {
                out.push((
                    frame.event.map(str::to_owned),
                    String::from_utf8(frame.data.to_vec()).expect("utf-8"),
                ));
            }
        }
        out
    }

    #[test]
    fn splits_frames_across_chunks_and_line_endings() {
        let got = frames(&[
            b"event: ping\ndata: {}\n\n: comment\nevent: agent.mes",
            b"sage\r\ndata: {\"a\":1}\r",
            b"\n\r\ndata: no event\n\nevent:x\rdata:1\rdata:2\r\r",
        ]);
        assert_eq!(
            got,
            vec![
                (Some("ping".into()), "{}".into()),
                (Some("agent.message".into()), "{\"a\":1}".into()),
                (None, "no event".into()),
                (Some("x".into()), "1\n2".into()),
            ]
        );
    }

    #[test]
    fn incomplete_frame_waits() {
        let mut decoder = SseDecoder::default();
        decoder.push(b"event: a\ndata: 1\n");
        assert!(decoder.next_frame().is_none());
        decoder.push(b"\n");
        assert_eq!(
            decoder.next_frame().map(|f| f.data.to_vec()),
            Some(b"1".to_vec())
        );
        assert!(decoder.next_frame().is_none());
    }
}
