//! Untrusted text made safe to show: in a log line, a table or an error message.
//!
//! Devices, operators and brokers hand burrow strings (status reasons, ids
//! that failed to parse, labels read back from an old registry). Written raw,
//! a `\n` forges a log line, an ESC sequence repaints the terminal and a bidi
//! override reorders what the reader sees. [`printable`] escapes all of them;
//! [`clip`] bounds the length. Clip first, then escape, so an escape is never
//! cut in half; [`excerpt`] does both in that order.

use std::borrow::Cow;
use std::fmt::Write;

/// What is appended to clipped text.
pub const ELLIPSIS: char = '…';

/// `s` with every character that could change how the surrounding output
/// reads written as an escape: `\n`, `\r`, `\t`, `\\` for a backslash, and
/// `\u{..}` for the other control characters (C0, DEL, C1), the Unicode bidi
/// embeddings, overrides, isolates and marks, and the line and paragraph
/// separators. Borrows `s` when nothing needs escaping.
///
/// The escaping is reversible: different inputs give different outputs.
pub fn printable(s: &str) -> Cow<'_, str> {
    let Some(first) = s.find(needs_escape) else { return Cow::Borrowed(s) };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        // Bidi marks, embeddings, overrides and isolates; line and paragraph separators.
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// At most `max` characters of `s`: when `s` is longer, its first `max - 1`
/// characters followed by `…`. Cuts only between characters.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some(_) if max == 0 => String::new(),
        Some(_) => {
            let (end, _) = s.char_indices().nth(max - 1).expect("s has more than max chars");
            let mut out = String::with_capacity(end + ELLIPSIS.len_utf8());
            out.push_str(&s[..end]);
            out.push(ELLIPSIS);
            out
        }
    }
}

/// [`clip`] then [`printable`]: untrusted text ready to quote in a message.
pub fn excerpt(s: &str, max: usize) -> String {
    printable(&clip(s, max)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_output() {
        assert!(matches!(printable("cam-42 is fine: ü"), Cow::Borrowed(_)));
        assert_eq!(printable("a\nb\rc\td\\e"), "a\\nb\\rc\\td\\\\e");
        assert_eq!(printable("\x1b[31mred\x7f"), "\\u{1b}[31mred\\u{7f}");
        assert_eq!(printable("\u{85}\u{9b}"), "\\u{85}\\u{9b}");
        assert_eq!(printable("abc\u{202e}fed\u{2066}"), "abc\\u{202e}fed\\u{2066}");
        assert_eq!(printable("x\u{2028}y"), "x\\u{2028}y");
    }

    #[test]
    fn clips_on_char_boundaries() {
        assert_eq!(clip("hello", 5), "hello");
        assert_eq!(clip("hello!", 5), "hell…");
        assert_eq!(clip("ééééé!", 3), "éé…");
        assert_eq!(clip("abc", 0), "");
        assert_eq!(clip("", 0), "");
        assert_eq!(clip("ab", 1), "…");
        assert_eq!(excerpt("a\nbcdef", 4), "a\\nb…");
    }
}
