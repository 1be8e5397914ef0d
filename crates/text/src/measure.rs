//! How platforms count the length of a message.

/// How a platform counts message length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Unicode scalar values (Rust `char`s).
    Chars,
    /// UTF-16 code units, as Telegram counts: characters outside the Basic
    /// Multilingual Plane, such as most emoji, count 2.
    Utf16,
    /// UTF-8 bytes.
    Bytes,
}

impl Measure {
    /// The length of `s` in this measure.
    pub fn len(self, s: &str) -> usize {
        match self {
            Measure::Chars => s.chars().count(),
            // Characters outside the Basic Multilingual Plane take two
            // units; they are exactly those encoded in four UTF-8 bytes.
            Measure::Utf16 => s.chars().count() + s.bytes().filter(|&b| b >= 0xF0).count(),
            Measure::Bytes => s.len(),
        }
    }

    /// The length of the single character `c` in this measure.
    pub fn char_len(self, c: char) -> usize {
        match self {
            Measure::Chars => 1,
            Measure::Utf16 => c.len_utf16(),
            Measure::Bytes => c.len_utf8(),
        }
    }
}

/// The longest message a platform accepts, and how it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    /// The largest accepted length, inclusive.
    pub max: usize,
    /// How the length is counted.
    pub measure: Measure,
}

impl Limit {
    /// Telegram: 4096 UTF-16 code units per message.
    pub const TELEGRAM: Limit = Limit::new(4096, Measure::Utf16);
    /// Discord: 2000 characters per message.
    pub const DISCORD: Limit = Limit::new(2000, Measure::Chars);
    /// Slack: 4000 characters per message text.
    pub const SLACK: Limit = Limit::new(4000, Measure::Chars);
    /// WhatsApp: 4096 characters per text message.
    pub const WHATSAPP: Limit = Limit::new(4096, Measure::Chars);
    /// Microsoft Teams: about 40 KB per message.
    pub const TEAMS: Limit = Limit::new(40_000, Measure::Bytes);
    /// The web channel: 100,000 characters per message.
    pub const WEB: Limit = Limit::new(100_000, Measure::Chars);

    /// A limit of `max` units counted with `measure`.
    pub const fn new(max: usize, measure: Measure) -> Self {
        Limit { max, measure }
    }

    /// Whether `s` measures at most [`Limit::max`].
    pub fn fits(self, s: &str) -> bool {
        // Every measure counts a string as at most its UTF-8 length.
        s.len() <= self.max || self.measure.len(s) <= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_count_differently() {
        let s = "aé😀";
        assert_eq!(Measure::Chars.len(s), 3);
        assert_eq!(Measure::Utf16.len(s), 4);
        assert_eq!(Measure::Bytes.len(s), 7);
        for c in s.chars() {
            for m in [Measure::Chars, Measure::Utf16, Measure::Bytes] {
                assert_eq!(m.char_len(c), m.len(c.encode_utf8(&mut [0; 4])));
            }
        }
    }

    #[test]
    fn utf16_matches_the_standard_encoder() {
        let s = "a\u{7FF}\u{800}\u{FFFF}\u{10000}\u{10FFFF}é😀👨‍👩‍👧🇫🇷";
        assert_eq!(Measure::Utf16.len(s), s.encode_utf16().count());
    }

    #[test]
    fn fits_is_inclusive() {
        let limit = Limit::new(2, Measure::Utf16);
        assert!(limit.fits("😀"));
        assert!(!limit.fits("😀a"));
        assert!(Limit::DISCORD.fits(&"é".repeat(2000)));
        assert!(!Limit::DISCORD.fits(&"é".repeat(2001)));
    }
}
