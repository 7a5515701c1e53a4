//! A single-pass JSON reader over the bytes of a body (SPEC §7.1, §11 "Memory").
//!
//! Inspection used to build a tree of the whole body: 32 bytes and more per value, a `String`
//! per key and string, a set of folded keys per object — about thirty times the body for the
//! worst shapes. This reader builds nothing: it hands out one [`Event`] at a time with the byte
//! span it covers, and a caller keeps only what it needs (a few fields, the current path).
//! Strings are spans of the body; a caller that needs the text decodes it ([`text`], [`cow`]),
//! borrowing the body when the string has no escapes.
//!
//! It accepts exactly what `serde_json::from_slice` accepts (the parser butler used before and
//! the one its tests compare against), with the same reasons for refusing:
//! - whitespace is space, tab, CR and LF; literals, numbers and strings as RFC 8259 writes them;
//! - a string must be UTF-8 without raw control characters, and a `\u` escape of a surrogate
//!   must be a leading one followed by a trailing one (serde_json's rule for `str`);
//! - a number outside the f64 range is [`Error::OutOfRange`] (decided by serde_json itself on
//!   the number's own bytes, so the boundary is the same);
//! - at most [`MAX_DEPTH`] arrays and objects inside each other ([`Error::TooDeep`]);
//! - with duplicate checking, two keys of one object that are equal under Go's folding
//!   ([`fold_into`]) are [`Error::Duplicate`], reported where serde_json would have met the
//!   second one: objects are checked when they close, and on any other error every object still
//!   open is checked first (a duplicate there came earlier in the body than the error).
//!
//! UTF-8 is checked once for the whole body, up front: the first invalid byte is an error when
//! the reader reaches the string holding it (before that, everything read is valid, so a text
//! is a slice of [`Reader::text`] and never checked again). Later readings of a body already
//! accepted take it as `&str` ([`Reader::trusted`]).
//!
//! Memory: a stack entry per open array or object (at most [`MAX_DEPTH`]) and, when checking
//! duplicates, 8 bytes per key of the objects still open (a 32-bit hash of the folded key and
//! the key's offset), sorted when the object closes. Time is linear in the body, plus
//! `n log n` per object of `n` keys.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher, RandomState};

use crate::inspect::Num;

/// Arrays and objects inside each other: serde_json's recursion limit refuses the 128th.
pub const MAX_DEPTH: usize = 127;

/// Why a body is not one acceptable JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not JSON (or more than 4 GiB, which no inspected body is).
    Invalid,
    /// A number outside the f64 range.
    OutOfRange,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Two keys of one object that Go would read as the same field.
    Duplicate,
}

impl Error {
    /// The `<reason>` of a `400 bad request: <reason>`, as butler has always worded it.
    pub fn reason(self) -> &'static str {
        match self {
            Error::Invalid => "invalid JSON",
            Error::OutOfRange => "number out of range",
            Error::TooDeep => "JSON nested too deeply",
            Error::Duplicate => "duplicate key",
        }
    }
}

/// What an [`Event`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    BeginObject,
    EndObject,
    BeginArray,
    EndArray,
    /// An object key; the value follows as the next event.
    Key,
    String,
    Number,
    True,
    False,
    Null,
}

/// One token and the bytes it covers: `start..end` is the bracket of a begin or end, the
/// whole literal or number, and a key or string with its quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub token: Token,
    pub start: usize,
    pub end: usize,
    /// A key or string holding at least one backslash escape.
    pub escaped: bool,
}

impl Event {
    /// The text between the quotes of a key or string, as sent (escapes not decoded).
    pub fn raw<'a>(&self, src: &'a str) -> &'a str {
        src.get(self.start + 1..self.end.saturating_sub(1)).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value must come (the top level, after a key's colon).
    Value,
    /// Just after `{`: a key or `}`.
    FirstKey,
    /// Just after `[`: a value or `]`.
    FirstItem,
    /// After a complete value: `,` or the container's end (or the end of the document).
    AfterValue,
    /// The top-level value is complete.
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Frame {
    /// An object whose keys start at this index of `keys`.
    Object(usize),
    Array,
}

/// A pull reader of one JSON value. [`Reader::next`] returns events until the value is
/// complete, then `None`; [`Reader::finish`] then refuses trailing data.
pub struct Reader<'a> {
    src: &'a [u8],
    /// The longest prefix of `src` that is UTF-8: all of it, unless the body is refused.
    text: &'a str,
    pos: usize,
    state: State,
    stack: Vec<Frame>,
    /// Validate strings, numbers and duplicate keys (the first reading of a body). Later
    /// readings of a body already validated skip that work.
    validate: bool,
    /// (hash of the folded key, offset of its opening quote) for the keys of open objects.
    keys: Vec<(u32, u32)>,
    /// Keyed per reader, so that no body can be made of keys whose hashes collide.
    hasher: Option<RandomState>,
    failed: bool,
}

impl<'a> Reader<'a> {
    /// A validating reader of the value that makes up `src` (surrounding whitespace allowed).
    pub fn new(src: &'a [u8]) -> Reader<'a> {
        let text = match std::str::from_utf8(src) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&src[..e.valid_up_to()]).unwrap_or_default(),
        };
        Reader::with(src, text, 0, true)
    }

    /// A reader of a body that a validating reader has already accepted: structure only. It
    /// still never panics and stops at anything malformed.
    pub fn trusted(src: &'a str) -> Reader<'a> {
        Reader::with(src.as_bytes(), src, 0, false)
    }

    /// A trusted reader of the one value that starts at `pos` (a look ahead into part of a
    /// body already accepted).
    pub fn trusted_at(src: &'a str, pos: usize) -> Reader<'a> {
        Reader::with(src.as_bytes(), src, pos, false)
    }

    fn with(src: &'a [u8], text: &'a str, pos: usize, validate: bool) -> Reader<'a> {
        // Offsets are kept in 32 bits: no inspected body comes near 4 GiB.
        let failed = src.len() > u32::MAX as usize;
        Reader {
            src,
            text,
            pos,
            state: State::Value,
            stack: Vec::new(),
            validate,
            keys: Vec::new(),
            hasher: None,
            failed,
        }
    }

    /// The body as text, as far as it is UTF-8: every key and string returned lies in it.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// Open arrays and objects around the reader's position.
    pub fn depth(&self) -> usize {
        self.stack.len()
    }

    /// The next event, or `None` once the value is complete.
    #[allow(clippy::should_implement_trait)]
    #[inline]
    pub fn next(&mut self) -> Result<Option<Event>, Error> {
        if self.failed {
            return Err(Error::Invalid);
        }
        match self.step() {
            Ok(e) => Ok(e),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// An error: serde_json reports a duplicate key where it meets it, before any error
    /// further on, while its object is still open.
    #[cold]
    fn fail(&mut self, e: Error) -> Error {
        self.failed = true;
        if self.validate && e != Error::Duplicate && self.open_objects_have_duplicates() {
            Error::Duplicate
        } else {
            e
        }
    }

    /// After the value: only whitespace may follow.
    pub fn finish(&mut self) -> Result<(), Error> {
        if self.state != State::Done {
            return Err(Error::Invalid);
        }
        self.skip_ws();
        if self.pos == self.src.len() { Ok(()) } else { Err(Error::Invalid) }
    }

    /// Skips what is left of the value whose first event was `first` (nothing for a scalar).
    pub fn skip(&mut self, first: &Event) -> Result<(), Error> {
        if !matches!(first.token, Token::BeginObject | Token::BeginArray) {
            return Ok(());
        }
        let depth = self.depth();
        while self.depth() >= depth {
            if self.next()?.is_none() {
                return Err(Error::Invalid);
            }
        }
        Ok(())
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    #[inline]
    fn step(&mut self) -> Result<Option<Event>, Error> {
        match self.state {
            State::Done => Ok(None),
            State::Value => {
                self.skip_ws();
                self.value().map(Some)
            }
            State::FirstKey => {
                self.skip_ws();
                match self.peek() {
                    Some(b'}') => self.end(Token::EndObject).map(Some),
                    Some(b'"') => self.key().map(Some),
                    _ => Err(Error::Invalid),
                }
            }
            State::FirstItem => {
                self.skip_ws();
                match self.peek() {
                    Some(b']') => self.end(Token::EndArray).map(Some),
                    _ => self.value().map(Some),
                }
            }
            State::AfterValue => {
                let Some(frame) = self.stack.last().copied() else {
                    self.state = State::Done;
                    return Ok(None);
                };
                self.skip_ws();
                match (frame, self.peek()) {
                    (Frame::Object(_), Some(b',')) => {
                        self.pos += 1;
                        self.skip_ws();
                        if self.peek() != Some(b'"') {
                            return Err(Error::Invalid);
                        }
                        self.key().map(Some)
                    }
                    (Frame::Object(_), Some(b'}')) => self.end(Token::EndObject).map(Some),
                    (Frame::Array, Some(b',')) => {
                        self.pos += 1;
                        self.skip_ws();
                        self.value().map(Some)
                    }
                    (Frame::Array, Some(b']')) => self.end(Token::EndArray).map(Some),
                    _ => Err(Error::Invalid),
                }
            }
        }
    }

    fn event(&self, token: Token, start: usize, escaped: bool) -> Event {
        Event { token, start, end: self.pos, escaped }
    }

    #[inline]
    fn value(&mut self) -> Result<Event, Error> {
        let start = self.pos;
        let token = match self.peek() {
            Some(b'{') | Some(b'[') => {
                // serde_json counts down from 128 and fails when the count reaches 0.
                if self.stack.len() + 1 > MAX_DEPTH {
                    return Err(Error::TooDeep);
                }
                self.pos += 1;
                if self.src[start] == b'{' {
                    self.stack.push(Frame::Object(self.keys.len()));
                    self.state = State::FirstKey;
                    return Ok(self.event(Token::BeginObject, start, false));
                }
                self.stack.push(Frame::Array);
                self.state = State::FirstItem;
                return Ok(self.event(Token::BeginArray, start, false));
            }
            Some(b'"') => {
                let escaped = self.string()?;
                self.state = State::AfterValue;
                return Ok(self.event(Token::String, start, escaped));
            }
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Token::Number
            }
            Some(b't') => {
                self.literal(b"true")?;
                Token::True
            }
            Some(b'f') => {
                self.literal(b"false")?;
                Token::False
            }
            Some(b'n') => {
                self.literal(b"null")?;
                Token::Null
            }
            _ => return Err(Error::Invalid),
        };
        self.state = State::AfterValue;
        Ok(self.event(token, start, false))
    }

    fn key(&mut self) -> Result<Event, Error> {
        let start = self.pos;
        let escaped = self.string()?;
        let event = self.event(Token::Key, start, escaped);
        if self.validate {
            let hash = self.folded_hash(&event);
            self.keys.push((hash, start as u32));
        }
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(Error::Invalid);
        }
        self.pos += 1;
        self.state = State::Value;
        Ok(event)
    }

    fn end(&mut self, token: Token) -> Result<Event, Error> {
        let start = self.pos;
        if let Some(Frame::Object(from)) = self.stack.last().copied() {
            if self.validate && has_duplicates(self.text, &mut self.keys[from..]) {
                return Err(Error::Duplicate);
            }
            self.keys.truncate(from);
        }
        self.stack.pop();
        self.pos += 1;
        self.state = State::AfterValue;
        Ok(self.event(token, start, false))
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Error> {
        if self.src[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Error::Invalid)
        }
    }

    /// A number as RFC 8259 writes it; when validating, also within the f64 range.
    fn number(&mut self) -> Result<(), Error> {
        let start = self.pos;
        let digits = |r: &mut Reader<'_>| {
            let from = r.pos;
            while let Some(b'0'..=b'9') = r.peek() {
                r.pos += 1;
            }
            r.pos - from
        };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(Error::Invalid);
                }
            }
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(Error::Invalid),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(Error::Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(Error::Invalid);
            }
        }
        if self.validate {
            number(&self.src[start..self.pos])?;
        }
        Ok(())
    }

    /// A string from its opening quote; returns whether it holds an escape.
    #[inline]
    fn string(&mut self) -> Result<bool, Error> {
        let src = self.src;
        let mut i = self.pos + 1;
        let mut escaped = false;
        loop {
            i = find_special(src, i);
            match src.get(i) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    i = escape_end(src, i).ok_or(Error::Invalid)?;
                }
                // A raw control character, or the end of the input.
                _ => return Err(Error::Invalid),
            }
        }
        // The first byte that is not UTF-8 is in this string.
        if self.text.len() < i {
            return Err(Error::Invalid);
        }
        self.pos = i + 1;
        Ok(escaped)
    }

    /// Go's folding of a key, hashed as it is decoded (no copy of the key is made). Equal
    /// folded keys hash equally; unequal ones that collide are told apart when the object
    /// closes.
    fn folded_hash(&mut self, key: &Event) -> u32 {
        let mut hasher = self.hasher.get_or_insert_with(RandomState::new).build_hasher();
        let raw = key.raw(self.text);
        let mut buf = [0u8; 64];
        if !key.escaped && raw.is_ascii() {
            for chunk in raw.as_bytes().chunks(buf.len()) {
                let lower = &mut buf[..chunk.len()];
                lower.copy_from_slice(chunk);
                lower.make_ascii_lowercase();
                hasher.write(lower);
            }
        } else {
            let mut n = 0;
            for c in chars(raw) {
                n += fold_char(c, &mut buf[n..]);
                if n > buf.len() - 4 {
                    hasher.write(&buf[..n]);
                    n = 0;
                }
            }
            hasher.write(&buf[..n]);
        }
        hasher.finish() as u32
    }

    fn open_objects_have_duplicates(&mut self) -> bool {
        let mut to = self.keys.len();
        for frame in self.stack.iter().rev() {
            if let Frame::Object(from) = *frame {
                if has_duplicates(self.text, &mut self.keys[from..to]) {
                    return true;
                }
                to = from;
            }
        }
        false
    }
}

/// The first index from `i` on holding `"`, `\` or a control character (below 0x20), or the
/// end: 8 bytes at a time (the classic "has a zero byte" tests on a 64-bit word), then byte by
/// byte. A false hit can only follow a true one in the same word, so the lowest is exact.
fn find_special(src: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    while let Some(chunk) = src.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let hits = (zero(w ^ (ONES * u64::from(b'"')))
            | zero(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w))
            & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = src.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

/// Whether two of an object's keys fold to the same text. Sorts `keys` by hash; keys whose
/// hashes are equal are compared by their folded text (sorted, so even many colliding keys
/// cost `n log n`, not `n²`).
fn has_duplicates(src: &str, keys: &mut [(u32, u32)]) -> bool {
    if keys.len() < 2 {
        return false;
    }
    keys.sort_unstable_by_key(|&(hash, _)| hash);
    let mut i = 0;
    while i < keys.len() {
        let mut j = i + 1;
        while j < keys.len() && keys[j].0 == keys[i].0 {
            j += 1;
        }
        if j - i > 1 {
            let mut folded: Vec<Vec<u8>> = keys[i..j]
                .iter()
                .map(|&(_, at)| {
                    let mut out = Vec::new();
                    let mut reader = Reader::trusted_at(src, at as usize);
                    if let Ok(Some(event)) = reader.next() {
                        fold_event_into(src, &event, &mut out);
                    }
                    out
                })
                .collect();
            folded.sort_unstable();
            if folded.windows(2).any(|w| w[0] == w[1]) {
                return true;
            }
        }
        i = j;
    }
    false
}

/// Appends the Go folding of a key or string event's text (see [`fold_into`]).
fn fold_event_into(src: &str, event: &Event, out: &mut Vec<u8>) {
    let raw = event.raw(src);
    if !event.escaped && raw.is_ascii() {
        out.extend(raw.bytes().map(|b| b.to_ascii_lowercase()));
        return;
    }
    let mut buf = [0u8; 4];
    for c in chars(raw) {
        let n = fold_char(c, &mut buf);
        out.extend_from_slice(&buf[..n]);
    }
}

/// Writes the Go folding of one character (ASCII letters to lower case, `ſ` to `s`, the
/// Kelvin sign to `k`, anything else as it is) as UTF-8 at the start of `out` (at least 4
/// bytes); returns its length.
fn fold_char(c: char, out: &mut [u8]) -> usize {
    let c = match c {
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    };
    c.encode_utf8(out).len()
}

/// Appends `s` folded the way Go's `encoding/json` matches a key against a field name: ASCII
/// letters to lower case, `ſ` to `s`, the Kelvin sign to `k`, everything else as it is (see
/// [`crate::inspect::fold_key`]).
pub fn fold_into(s: &str, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    for c in s.chars() {
        let n = fold_char(c, &mut buf);
        out.extend_from_slice(&buf[..n]);
    }
}

/// The folding of a key or string event's text into `out` (cleared first), if it is at most
/// `max` bytes as sent: a longer key names none of the fields butler reads, and is not
/// copied.
pub fn fold_short(src: &str, event: &Event, max: usize, out: &mut Vec<u8>) -> bool {
    out.clear();
    if event.end - event.start > max + 2 {
        return false;
    }
    fold_event_into(src, event, out);
    true
}

/// Whether the text of a key or string event starts with `prefix`, decoding no more of it
/// than that.
pub fn starts_with(src: &str, event: &Event, prefix: &str) -> bool {
    let raw = event.raw(src);
    if !event.escaped {
        return raw.starts_with(prefix);
    }
    let mut text = chars(raw);
    prefix.chars().all(|p| text.next() == Some(p))
}

/// Whether the text of a key or string event is exactly `word`, decoding no more of it than
/// that.
pub fn is(src: &str, event: &Event, word: &str) -> bool {
    let raw = event.raw(src);
    if !event.escaped {
        return raw == word;
    }
    let mut text = chars(raw);
    word.chars().all(|p| text.next() == Some(p)) && text.next().is_none()
}

/// The characters of a validated string's raw text (between its quotes), escapes decoded,
/// without copying. Malformed input (never met after validation) ends early.
pub fn chars(raw: &str) -> Chars<'_> {
    Chars { raw, at: 0, run: "".chars() }
}

/// See [`chars`].
pub struct Chars<'a> {
    raw: &'a str,
    at: usize,
    /// The plain run being read.
    run: std::str::Chars<'a>,
}

impl Iterator for Chars<'_> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        loop {
            if let Some(c) = self.run.next() {
                return Some(c);
            }
            let rest = self.raw.get(self.at..).filter(|r| !r.is_empty())?;
            if rest.starts_with('\\') {
                let end = escape_end(self.raw.as_bytes(), self.at)?;
                let c = escape_char(self.raw.as_bytes(), self.at, end);
                self.at = end;
                return Some(c);
            }
            let len = rest.find('\\').unwrap_or(rest.len());
            self.run = rest[..len].chars();
            self.at += len;
        }
    }
}

/// The character of the escape `raw[at..end]` (checked by [`escape_end`]).
fn escape_char(raw: &[u8], at: usize, end: usize) -> char {
    match raw[at + 1] {
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let n = u32::from(hex4(raw, at + 2).unwrap_or(0));
            let c = if end - at == 12 {
                let n2 = u32::from(hex4(raw, at + 8).unwrap_or(0));
                0x10000
                    + ((n.wrapping_sub(0xD800) & 0x3ff) << 10)
                    + (n2.wrapping_sub(0xDC00) & 0x3ff)
            } else {
                n
            };
            char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER)
        }
        other => char::from(other),
    }
}

/// The end of the escape starting at the backslash `src[i]`, checked as serde_json checks it
/// for a `str`: one of `"\/bfnrt`, or `\u` with four hex digits, where a surrogate must be a
/// leading one directly followed by a `\u` trailing one.
fn escape_end(src: &[u8], i: usize) -> Option<usize> {
    match src.get(i + 1)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(i + 2),
        b'u' => {
            let n = hex4(src, i + 2)?;
            match n {
                0xDC00..=0xDFFF => None,
                0xD800..=0xDBFF => {
                    if src.get(i + 6) != Some(&b'\\') || src.get(i + 7) != Some(&b'u') {
                        return None;
                    }
                    let n2 = hex4(src, i + 8)?;
                    (0xDC00..=0xDFFF).contains(&n2).then_some(i + 12)
                }
                _ => Some(i + 6),
            }
        }
        _ => None,
    }
}

fn hex4(src: &[u8], at: usize) -> Option<u16> {
    let digits = src.get(at..at + 4)?;
    let mut n: u16 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        n = n * 16 + u16::from(v);
    }
    Some(n)
}

/// Appends the text of a validated string's raw text (between its quotes) with escapes
/// decoded. Malformed input (never met after validation) ends the decoding early.
pub fn decode_into(raw: &str, out: &mut String) {
    let mut rest = raw;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let Some(end) = escape_end(rest.as_bytes(), at) else { return };
        out.push(escape_char(rest.as_bytes(), at, end));
        rest = rest.get(end..).unwrap_or_default();
    }
    out.push_str(rest);
}

/// The text of a key or string event: borrowed from the body without escapes, else decoded
/// into `scratch` (cleared first).
pub fn text<'s>(src: &'s str, event: &Event, scratch: &'s mut String) -> &'s str {
    let raw = event.raw(src);
    if !event.escaped {
        return raw;
    }
    scratch.clear();
    decode_into(raw, scratch);
    scratch
}

/// The text of a key or string event, borrowed from the body when it has no escapes.
pub fn cow<'a>(src: &'a str, event: &Event) -> Cow<'a, str> {
    let raw = event.raw(src);
    if !event.escaped {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    decode_into(raw, &mut out);
    Cow::Owned(out)
}

/// The value of a number token, exactly as serde_json reads it (unsigned, negative or float);
/// [`Error::OutOfRange`] beyond the f64 range. Integers of up to 18 digits are read here;
/// anything else is handed to serde_json, so the rounding and the range are its own.
pub fn number(token: &[u8]) -> Result<Num, Error> {
    let (negative, digits) = match token.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, token),
    };
    if !digits.is_empty() && digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit) {
        let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        return Ok(match (negative, n) {
            (false, n) => Num::U(n),
            // serde_json turns `-0` into the float -0.0.
            (true, 0) => Num::F(-0.0),
            (true, n) => Num::I(-(n as i64)),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(token);
    serde::Deserializer::deserialize_any(&mut de, NumVisitor).map_err(|e| {
        if e.to_string().starts_with("number out of range") {
            Error::OutOfRange
        } else {
            Error::Invalid
        }
    })
}

struct NumVisitor;

impl serde::de::Visitor<'_> for NumVisitor {
    type Value = Num;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number")
    }
    fn visit_u64<E>(self, n: u64) -> Result<Num, E> {
        Ok(Num::U(n))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Num, E> {
        Ok(Num::I(n))
    }
    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Num, E> {
        if f.is_finite() { Ok(Num::F(f)) } else { Err(E::custom("number out of range")) }
    }
}

/// Reads `src` whole with a validating reader: the reason a body is refused, if it is, worded
/// as [`crate::inspect::parse_any`] words it (for tests and fuzzing against serde_json).
pub fn validate(src: &[u8]) -> Result<(), &'static str> {
    let mut reader = Reader::new(src);
    loop {
        match reader.next() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Err(e.reason()),
        }
    }
    reader.finish().map_err(|_| "trailing data after the JSON object")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict of the parser butler used before: serde_json into a tree that refuses
    /// folding duplicate keys (`inspect::Json`).
    fn reference(src: &[u8]) -> Result<(), &'static str> {
        crate::inspect::parse_any(src).map(|_| ())
    }

    fn ours(src: &[u8]) -> Result<(), &'static str> {
        validate(src)
    }

    #[track_caller]
    fn same(src: &[u8]) {
        assert_eq!(ours(src), reference(src), "{:?}", String::from_utf8_lossy(src));
    }

    #[test]
    fn accepts_and_refuses_what_serde_json_does() {
        let cases: &[&[u8]] = &[
            b"{}",
            b" {\"a\":1} \n",
            b"{\"a\":1}\x0c",
            b"\xef\xbb\xbf{}",
            b"[]",
            b"[1,]",
            b"{\"a\":1,}",
            b"{,}",
            b"{\"a\" 1}",
            b"{\"a\":}",
            b"{1:2}",
            b"{\"a\":1 \"b\":2}",
            b"[1 2]",
            b"nul",
            b"nulll",
            b"true",
            b"tru",
            b"falsey",
            b"\"x\"",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"\\u12g4\"",
            b"\"\\uD800\"",
            b"\"\\uD800\\u0041\"",
            b"\"\\uD800\\n\"",
            b"\"\\uDC00\"",
            b"\"\\uD83D\\uDE00\"",
            b"\"\\uD83D\\uDE00\\uDE00\"",
            b"\"\\ud83d\\ude00\"",
            b"\"\x01\"",
            b"\"\x7f\"",
            b"\"\xff\"",
            b"\"\xc3\xa9\"",
            b"\"\xc3\"",
            b"\"\xc3\\n\"",
            b"\"\xed\xa0\x80\"",
            b"\"abc",
            b"\"abc\\",
            b"0",
            b"-0",
            b"-",
            b"01",
            b"-01",
            b"1.",
            b"1.5",
            b".5",
            b"1e",
            b"1e+",
            b"1e5",
            b"1E-5",
            b"+1",
            b"1e400",
            b"-1e400",
            b"1e-400",
            b"0e99999999999999999999",
            b"1e99999999999999999999",
            b"1.7976931348623157e308",
            b"1.7976931348623159e308",
            b"179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792",
            b"179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497791",
            b"18446744073709551615",
            b"18446744073709551616",
            b"-9223372036854775808",
            b"-9223372036854775809",
            b"{\"a\":1,\"A\":2}",
            b"{\"a\":1,\"a\":2}",
            b"{\"a\":{\"b\":1},\"b\":{\"b\":2}}",
            b"{\"a\":1,\"b\":{\"c\":1,\"c\":2}}",
            b"{\"s\":1,\"\xc5\xbf\":2}",
            b"{\"k\":1,\"\\u212a\":2}",
            b"{\"\\u0041\":1,\"a\":2}",
            b"{\"a\":1,\"a\":1e400}",
            b"{\"a\":1e400,\"a\":1}",
            b"{\"a\":1,\"a\"}",
            b"{\"a\":1,\"a\":[[[",
            b"{\"a\":1,\"b\":2,\"a\"",
            b"[{\"a\":1,\"a\":2}]",
            b"{\"x\":[{\"a\":1}],\"y\":[{\"a\":1}]}",
            b"{} {}",
            b"{}x",
            b"[1] x",
            b"",
            b"   ",
        ];
        for case in cases {
            same(case);
        }
    }

    #[test]
    fn nesting_limit_is_serde_jsons() {
        for depth in [1, 126, 127, 128, 129, 300] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let body = open.repeat(depth) + "1" + &close.repeat(depth);
                same(body.as_bytes());
                let unclosed = open.repeat(depth);
                same(unclosed.as_bytes());
            }
            let mixed = "{\"a\":[".repeat(depth) + &"]}".repeat(depth);
            same(mixed.as_bytes());
            // A duplicate before the limit is reported first, as serde_json meets it first.
            let dup = format!("{{\"a\":1,\"a\":{}}}", "[".repeat(depth));
            same(dup.as_bytes());
        }
    }

    #[test]
    fn numbers_read_as_serde_json_reads_them() {
        for token in [
            "0",
            "-0",
            "7",
            "-7",
            "123456789012345678",
            "-123456789012345678",
            "1234567890123456789",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "8192.0",
            "1e4",
            "-0.0",
            "2.5e-3",
            "1e-400",
        ] {
            let theirs: serde_json::Value = serde_json::from_str(token).unwrap();
            let ours = number(token.as_bytes()).unwrap();
            let want = match theirs.as_number().unwrap() {
                n if n.is_u64() => Num::U(n.as_u64().unwrap()),
                n if n.is_i64() => Num::I(n.as_i64().unwrap()),
                n => Num::F(n.as_f64().unwrap()),
            };
            match (ours, want) {
                (Num::F(a), Num::F(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{token}"),
                _ => assert_eq!(ours, want, "{token}"),
            }
        }
        assert_eq!(number(b"1e400"), Err(Error::OutOfRange));
    }

    #[test]
    fn text_is_decoded_as_serde_json_decodes_it() {
        for s in [
            "plain",
            "caf\u{e9}",
            "a\\nb\\t\\\"\\\\\\/\\b\\f\\r",
            "\\u00e9\\u20AC\\uD83D\\uDE00x",
            "\\u0000",
            "",
        ] {
            let json = format!("\"{s}\"");
            let want: String = serde_json::from_str(&json).unwrap();
            let mut reader = Reader::new(json.as_bytes());
            let event = reader.next().unwrap().unwrap();
            let mut scratch = String::new();
            assert_eq!(text(&json, &event, &mut scratch), want);
            assert_eq!(cow(&json, &event), want);
            let decoded: String = chars(event.raw(&json)).collect();
            assert_eq!(decoded, want);
        }
    }

    #[test]
    fn events_carry_their_spans() {
        let src = br#" {"a" : [1, "x\n", true] , "b":null} "#;
        let mut reader = Reader::new(src);
        let mut seen = Vec::new();
        while let Some(e) = reader.next().unwrap() {
            seen.push((e.token, std::str::from_utf8(&src[e.start..e.end]).unwrap().to_owned()));
        }
        reader.finish().unwrap();
        let want = [
            (Token::BeginObject, "{"),
            (Token::Key, "\"a\""),
            (Token::BeginArray, "["),
            (Token::Number, "1"),
            (Token::String, "\"x\\n\""),
            (Token::True, "true"),
            (Token::EndArray, "]"),
            (Token::Key, "\"b\""),
            (Token::Null, "null"),
            (Token::EndObject, "}"),
        ];
        let want: Vec<_> = want.iter().map(|(t, s)| (*t, (*s).to_owned())).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn many_keys_and_colliding_hashes() {
        // 100,000 distinct keys, then one that folds onto an earlier one.
        let mut body = String::from("{");
        for i in 0..100_000 {
            body.push_str(&format!("\"k{i}\":0,"));
        }
        let ok = format!("{}\"end\":0}}", body);
        assert_eq!(ours(ok.as_bytes()), Ok(()));
        let dup = format!("{}\"K99999\":0}}", body);
        assert_eq!(ours(dup.as_bytes()), Err("duplicate key"));
        // Equal hashes, different keys: the run is compared by text.
        let mut keys = vec![(7u32, 1u32), (7, 8), (7, 15)];
        let src = r#"{"ab":0,"cd":0,"ef":0}"#;
        assert!(!has_duplicates(src, &mut keys));
        let src = r#"{"ab":0,"cd":0,"AB":0}"#;
        let mut keys = vec![(7u32, 1u32), (7, 8), (7, 15)];
        assert!(has_duplicates(src, &mut keys));
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    /// Random JSON-ish text from fragments that exercise every rule, valid or not.
    fn random_body(rng: &mut Rng, depth: usize, out: &mut String) {
        const SCALARS: &[&str] = &[
            "0",
            "-0",
            "1",
            "-1",
            "1.5",
            "1e400",
            "1e-400",
            "01",
            "1.",
            "-",
            "true",
            "false",
            "null",
            "nul",
            "\"\"",
            "\"a\"",
            "\"\\n\"",
            "\"\\uD800\"",
            "\"\\uD83D\\uDE00\"",
            "\"\\u00e9\"",
            "\"\\x\"",
            "\"\u{e9}\"",
            "\"\x01\"",
            "18446744073709551616",
        ];
        const KEYS: &[&str] = &[
            "\"a\"",
            "\"A\"",
            "\"b\"",
            "\"\u{17f}\"",
            "\"s\"",
            "\"\\u0061\"",
            "\"k\"",
            "\"\u{212a}\"",
        ];
        const SPACE: &[&str] = &["", "", "", " ", "\n", "\x0c"];
        const GLUE: &[&str] = &[",", ",", ",", ",", "", ":", ",,"];
        out.push_str(rng.pick(SPACE));
        match rng.next() % 4 {
            0 if depth < 6 => {
                out.push('{');
                for i in 0..rng.next() % 4 {
                    if i > 0 {
                        out.push_str(rng.pick(GLUE));
                    }
                    out.push_str(rng.pick(KEYS));
                    out.push_str(if rng.next().is_multiple_of(20) { "" } else { ":" });
                    random_body(rng, depth + 1, out);
                }
                out.push_str(if rng.next().is_multiple_of(20) { "]" } else { "}" });
            }
            1 if depth < 6 => {
                out.push('[');
                for i in 0..rng.next() % 4 {
                    if i > 0 {
                        out.push_str(rng.pick(GLUE));
                    }
                    random_body(rng, depth + 1, out);
                }
                out.push_str(if rng.next().is_multiple_of(20) { "}" } else { "]" });
            }
            _ => out.push_str(rng.pick(SCALARS)),
        }
        out.push_str(rng.pick(SPACE));
    }

    #[test]
    fn random_bodies_agree_with_serde_json() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut body = String::new();
        for _ in 0..20_000 {
            body.clear();
            random_body(&mut rng, 0, &mut body);
            same(body.as_bytes());
            // And every prefix of some: truncation is the commonest malformation.
            if rng.next().is_multiple_of(16) {
                for cut in 0..body.len() {
                    same(&body.as_bytes()[..cut]);
                }
            }
        }
    }

    #[test]
    fn random_bytes_agree_with_serde_json() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let alphabet = b"{}[]\":,\\ 0123456789-+.eEtrufalsn\x01\xc3\xa9\xff u";
        for _ in 0..50_000 {
            let len = (rng.next() % 24) as usize;
            let bytes: Vec<u8> =
                (0..len).map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize]).collect();
            same(&bytes);
        }
    }
}
