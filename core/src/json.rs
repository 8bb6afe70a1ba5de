//! A strict JSON reader for the documents tokengate loads: bundles, token records, and the
//! few JSON values the Worker keeps in KV or reads from Cloudflare Access.
//!
//! Why not serde's derived deserialisers: each target carries this code, and the derived
//! ones (a deserialiser per type and reader, plus serde's error machinery with its float
//! formatting) were a quarter of the Worker's code. This reader is RFC 8259 exactly (no
//! comments, no trailing commas, no leading zeros, UTF-8 only, no lone surrogates),
//! reads straight into the caller's types and rejects what a bundle must not hold:
//! duplicate members, unknown members where the format is closed, and any number that is
//! not the unsigned integer a field expects.

use core::fmt;
use std::borrow::Cow;

/// How deeply [`Reader::skip`] follows arrays and objects inside an ignored value.
const MAX_DEPTH: usize = 64;

/// Why a document was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    what: String,
    at: usize,
}

impl JsonError {
    /// What was wrong, without the position.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for JsonError {}

/// A cursor over one JSON text.
pub struct Reader<'a> {
    text: &'a [u8],
    at: usize,
    depth: usize,
    /// Where the key of the member being read starts, for errors about the member.
    member_at: usize,
}

/// A read result.
pub type Result<T> = core::result::Result<T, JsonError>;

impl<'a> Reader<'a> {
    /// Reads `text` as exactly one value, by `read`, with nothing but whitespace after it.
    pub fn read_all<T>(text: &'a [u8], read: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let mut reader = Self {
            text,
            at: 0,
            depth: 0,
            member_at: 0,
        };
        let value = read(&mut reader)?;
        match reader.peek() {
            None => Ok(value),
            Some(_) => Err(reader.error("trailing characters after the value")),
        }
    }

    /// An error at the current position.
    pub fn error(&self, what: impl Into<String>) -> JsonError {
        JsonError {
            what: what.into(),
            at: self.at,
        }
    }

    /// An error about the member being read, at its key.
    pub fn member_error(&self, what: impl Into<String>) -> JsonError {
        JsonError {
            what: what.into(),
            at: self.member_at,
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.text.get(self.at) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    /// The first byte of the next value, not consumed: `"` for a string, `[` for an
    /// array, a digit or `-` for a number; `None` at the end of the text.
    pub fn next_byte(&mut self) -> Option<u8> {
        self.peek()
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<()> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn unexpected(&mut self, expected: &str) -> JsonError {
        let found = match self.peek() {
            None => "the end of the text",
            Some(b'"') => "a string",
            Some(b'{') => "an object",
            Some(b'[') => "an array",
            Some(b'n') => "null",
            Some(b't' | b'f') => "a boolean",
            Some(b'-' | b'0'..=b'9') => "a number",
            Some(_) => "an unexpected character",
        };
        self.error(format!("expected {expected}, found {found}"))
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            true
        } else {
            false
        }
    }

    /// Consumes `null` if it comes next.
    pub fn null(&mut self) -> bool {
        self.peek() == Some(b'n') && self.literal(b"null")
    }

    /// `null` as `None`, anything else by `read`.
    pub fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        if self.null() {
            Ok(None)
        } else {
            read(self).map(Some)
        }
    }

    /// `true` or `false`.
    pub fn bool(&mut self) -> Result<bool> {
        if self.peek() == Some(b't') && self.literal(b"true") {
            Ok(true)
        } else if self.peek() == Some(b'f') && self.literal(b"false") {
            Ok(false)
        } else {
            Err(self.unexpected("true or false"))
        }
    }

    /// The raw text of a number, checked against the JSON grammar.
    fn number_text(&mut self) -> Result<&'a str> {
        if !matches!(self.peek(), Some(b'-' | b'0'..=b'9')) {
            return Err(self.unexpected("a number"));
        }
        let text = self.text;
        let start = self.at;
        let digits = |at: &mut usize| {
            let from = *at;
            while text.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - from
        };
        let mut at = start;
        if text[at] == b'-' {
            at += 1;
        }
        let int_start = at;
        let int_len = digits(&mut at);
        let ok = int_len > 0
            && (int_len == 1 || text[int_start] != b'0')
            && (text.get(at) != Some(&b'.') || {
                at += 1;
                digits(&mut at) > 0
            })
            && (!matches!(text.get(at), Some(b'e' | b'E')) || {
                at += 1;
                if matches!(text.get(at), Some(b'+' | b'-')) {
                    at += 1;
                }
                digits(&mut at) > 0
            });
        if !ok {
            self.at = at;
            return Err(self.error("invalid number"));
        }
        self.at = at;
        // Only ASCII digits, signs, dots and exponents were consumed.
        core::str::from_utf8(&text[start..at]).map_err(|_| self.error("invalid number"))
    }

    /// An unsigned integer (no sign, fraction or exponent) that fits 64 bits.
    pub fn u64(&mut self) -> Result<u64> {
        let start = self.at;
        let text = self.number_text()?;
        text.parse().map_err(|_| JsonError {
            what: format!("expected an unsigned integer below 2^64, found {text}"),
            at: start,
        })
    }

    /// A JWT NumericDate: a number of seconds, its fraction dropped. `None` for a negative
    /// value, an exponent or one past 2^64 (the caller treats those as invalid).
    pub fn seconds(&mut self) -> Result<Option<u64>> {
        let text = self.number_text()?;
        let whole = text.split('.').next().unwrap_or_default();
        Ok(whole.parse().ok().filter(|_| !text.contains(['e', 'E'])))
    }

    /// A string, borrowed from the text when it holds no escapes.
    pub fn str(&mut self) -> Result<Cow<'a, str>> {
        if self.peek() != Some(b'"') {
            return Err(self.unexpected("a string"));
        }
        self.at += 1;
        let text = self.text;
        let mut owned: Option<String> = None;
        let mut run = self.at;
        loop {
            let Some(&b) = text.get(self.at) else {
                return Err(self.error("unterminated string"));
            };
            match b {
                b'"' | b'\\' => {
                    let chunk = core::str::from_utf8(&text[run..self.at])
                        .map_err(|_| self.error("invalid UTF-8 in a string"))?;
                    self.at += 1;
                    if b == b'"' {
                        return Ok(match owned {
                            None => Cow::Borrowed(chunk),
                            Some(mut s) => {
                                s.push_str(chunk);
                                Cow::Owned(s)
                            }
                        });
                    }
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(chunk);
                    let escaped = self.escape()?;
                    s.push(escaped);
                    run = self.at;
                }
                0..=0x1f => return Err(self.error("control character in a string")),
                _ => self.at += 1,
            }
        }
    }

    /// The character an escape (after its backslash) stands for.
    fn escape(&mut self) -> Result<char> {
        let Some(&b) = self.text.get(self.at) else {
            return Err(self.error("unterminated string"));
        };
        self.at += 1;
        Ok(match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = match first {
                    0xd800..=0xdbff => {
                        if !self.literal(b"\\u") {
                            return Err(self.error("lone leading surrogate in a string"));
                        }
                        let second = self.hex4()?;
                        if !(0xdc00..=0xdfff).contains(&second) {
                            return Err(self.error("invalid surrogate pair in a string"));
                        }
                        0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
                    }
                    0xdc00..=0xdfff => {
                        return Err(self.error("lone trailing surrogate in a string"))
                    }
                    code => code,
                };
                char::from_u32(code).ok_or_else(|| self.error("invalid escape in a string"))?
            }
            _ => return Err(self.error("invalid escape in a string")),
        })
    }

    fn hex4(&mut self) -> Result<u32> {
        let digits = self
            .text
            .get(self.at..self.at + 4)
            .ok_or_else(|| self.error("unterminated string"))?;
        let mut value = 0;
        for &d in digits {
            let v = char::from(d)
                .to_digit(16)
                .ok_or_else(|| self.error("invalid \\u escape in a string"))?;
            value = value * 16 + v;
        }
        self.at += 4;
        Ok(value)
    }

    /// A string, owned.
    pub fn string(&mut self) -> Result<String> {
        self.str().map(Cow::into_owned)
    }

    /// An array of strings.
    pub fn strings(&mut self) -> Result<Vec<String>> {
        let mut items = Vec::new();
        self.array(|r| {
            items.push(r.string()?);
            Ok(())
        })?;
        Ok(items)
    }

    /// An array, each element by `item`.
    pub fn array(&mut self, item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.sequence(b'[', b']', "an array", item)
    }

    /// An object, each member's value by `member(reader, key)`. `member` must consume the
    /// value (or refuse the key); the reader rejects nothing by itself, see [`Fields`].
    pub fn object(&mut self, mut member: impl FnMut(&mut Self, &str) -> Result<()>) -> Result<()> {
        self.sequence(b'{', b'}', "an object", |r| {
            r.peek();
            r.member_at = r.at;
            let key = r.str()?;
            r.expect(b':', "':'")?;
            member(r, &key)
        })
    }

    /// `open`, then items separated by commas, then `close`.
    fn sequence(
        &mut self,
        open: u8,
        close: u8,
        what: &str,
        mut item: impl FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        self.expect(open, what)?;
        if self.peek() == Some(close) {
            self.at += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b) if b == close => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(self.unexpected(&format!("',' or '{}'", char::from(close)))),
            }
        }
    }

    /// A string naming one of `choices` (a `what`), as its value.
    pub fn choice<T: Copy>(&mut self, what: &str, choices: &[(&str, T)]) -> Result<T> {
        let text = self.str()?;
        if let Some((_, value)) = choices.iter().find(|(name, _)| *name == text) {
            return Ok(*value);
        }
        let names: Vec<String> = choices
            .iter()
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        Err(self.error(format!(
            "unknown {what} `{text}`, expected {}",
            names.join(" or ")
        )))
    }

    /// Any value, checked and ignored.
    pub fn skip(&mut self) -> Result<()> {
        match self.peek() {
            Some(b'"') => self.str().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number_text().map(drop),
            Some(b't' | b'f') => self.bool().map(drop),
            Some(b'n') if self.null() => Ok(()),
            Some(open @ (b'[' | b'{')) => {
                if self.depth == MAX_DEPTH {
                    return Err(self.error("nested too deeply"));
                }
                self.depth += 1;
                let result = if open == b'[' {
                    self.array(Self::skip)
                } else {
                    self.object(|r, _| r.skip())
                };
                self.depth -= 1;
                result
            }
            _ => Err(self.unexpected("a value")),
        }
    }
}

/// The members of one object in a closed format: each known once, nothing else.
pub struct Fields {
    names: &'static [&'static str],
    seen: u64,
}

impl Fields {
    /// An object whose members may be `names` (at most 64).
    pub fn new(names: &'static [&'static str]) -> Self {
        Self { names, seen: 0 }
    }

    /// The index of `key` in the names; an unknown or repeated key is an error.
    pub fn index(&mut self, reader: &Reader<'_>, key: &str) -> Result<usize> {
        match self.known(reader, key)? {
            Some(index) => Ok(index),
            None => Err(reader.member_error(format!("unknown field `{key}`"))),
        }
    }

    /// Like [`Fields::index`], but an unknown key is `None` (an open format: skip it).
    pub fn known(&mut self, reader: &Reader<'_>, key: &str) -> Result<Option<usize>> {
        let Some(index) = self.names.iter().position(|name| *name == key) else {
            return Ok(None);
        };
        let bit = 1 << index;
        if self.seen & bit != 0 {
            return Err(reader.member_error(format!("duplicate field `{key}`")));
        }
        self.seen |= bit;
        Ok(Some(index))
    }

    /// An error naming the member `names[index]` unless it was present: for members read
    /// in place rather than into an `Option` (see [`required`] for those).
    pub fn require(&self, reader: &Reader<'_>, index: usize) -> Result<()> {
        if self.seen & (1 << index) != 0 {
            Ok(())
        } else {
            Err(reader.error(format!("missing field `{}`", self.names[index])))
        }
    }
}

/// A required member's value, or the error naming it.
pub fn required<T>(reader: &Reader<'_>, value: Option<T>, name: &str) -> Result<T> {
    value.ok_or_else(|| reader.error(format!("missing field `{name}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Result<()> {
        Reader::read_all(text.as_bytes(), Reader::skip)
    }

    fn string(text: &str) -> Result<String> {
        Reader::read_all(text.as_bytes(), Reader::string)
    }

    #[test]
    fn accepts_exactly_what_serde_json_accepts_over_a_grammar_sample() {
        let samples = [
            "0",
            "-0",
            "12",
            "-12",
            "1.5",
            "1e5",
            "1E+5",
            "1e-5",
            "-0.0e0",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "1e+",
            "+1",
            "0x10",
            "true",
            "false",
            "null",
            "nul",
            "tru",
            "\"\"",
            "\"a\\\"b\"",
            "\"\\u00e9\"",
            "\"\\ud83d\\ude00\"",
            "\"\\ud83d\"",
            "\"\\ude00\"",
            "\"\\ud83dx\"",
            "\"\\x\"",
            "\"\\u12\"",
            "\"a\tb\"",
            "\"a\u{7f}b\"",
            "[]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":1 \"b\":2}",
            "[[[]]]",
            " [ 1 , { \"x\" : [ true , null ] } ] ",
            "[] x",
            "",
            "  ",
            "\u{feff}1",
            "\"é\"",
            "\"\\/\"",
            "1 2",
            "[1]]",
            "{\"a\":{}}",
            "\"\\uD83D\\uDE00\"",
        ];
        for sample in samples {
            let ours = value(sample).is_ok();
            let serde = serde_json::from_str::<serde_json::Value>(sample).is_ok();
            assert_eq!(ours, serde, "{sample:?}");
            if ours && sample.trim_start().starts_with('"') {
                let theirs: String = serde_json::from_str(sample).unwrap();
                assert_eq!(string(sample).unwrap(), theirs, "{sample:?}");
            }
        }
    }

    #[test]
    fn refuses_invalid_utf8_and_deep_nesting() {
        assert!(Reader::read_all(b"\"\xff\"", Reader::skip).is_err());
        assert!(Reader::read_all(b"\"\xc3\"", Reader::skip).is_err());
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(value(&deep).unwrap_err().what(), "nested too deeply");
        let fine = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        value(&fine).unwrap();
    }

    #[test]
    fn u64_is_an_unsigned_integer_that_fits() {
        let read = |t: &str| Reader::read_all(t.as_bytes(), Reader::u64);
        assert_eq!(read("0"), Ok(0));
        assert_eq!(read(" 18446744073709551615 "), Ok(u64::MAX));
        for bad in [
            "18446744073709551616",
            "-1",
            "-0",
            "1.0",
            "1e3",
            "\"1\"",
            "null",
            "01",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!(
            read("1.5").unwrap_err().to_string(),
            "expected an unsigned integer below 2^64, found 1.5 at byte 0"
        );
    }

    #[test]
    fn seconds_drop_the_fraction_and_refuse_the_rest() {
        let read = |t: &str| Reader::read_all(t.as_bytes(), Reader::seconds);
        assert_eq!(read("1700000000"), Ok(Some(1_700_000_000)));
        assert_eq!(read("1700000000.9"), Ok(Some(1_700_000_000)));
        assert_eq!(read("-5"), Ok(None));
        assert_eq!(read("1.7e9"), Ok(None));
        assert_eq!(read("99999999999999999999"), Ok(None));
    }

    #[test]
    fn choice_names_what_was_expected() {
        let read = |text: &str| {
            Reader::read_all(text.as_bytes(), |r| {
                r.choice("access", &[("public", 1), ("token", 2)])
            })
        };
        assert_eq!(read("\"token\""), Ok(2));
        assert_eq!(
            read("\"Token\"").unwrap_err().what(),
            "unknown access `Token`, expected `public` or `token`"
        );
        assert!(read("1").is_err());
    }

    #[test]
    fn fields_reject_unknown_and_repeated_members() {
        const NAMES: &[&str] = &["a", "b"];
        let read = |text: &str| {
            Reader::read_all(text.as_bytes(), |r| {
                let mut fields = Fields::new(NAMES);
                let mut sum = 0;
                r.object(|r, key| {
                    fields.index(r, key)?;
                    sum += r.u64()?;
                    Ok(())
                })?;
                Ok(sum)
            })
        };
        assert_eq!(read(r#"{"a":1,"b":2}"#), Ok(3));
        assert_eq!(
            read(r#"{"a":1,"a":2}"#).unwrap_err().what(),
            "duplicate field `a`"
        );
        assert_eq!(read(r#"{"c":1}"#).unwrap_err().what(), "unknown field `c`");
        // A key spelled with an escape is the same key.
        assert_eq!(
            read(r#"{"a":1,"\u0061":2}"#).unwrap_err().what(),
            "duplicate field `a`"
        );
    }
}
