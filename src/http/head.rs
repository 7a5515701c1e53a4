//! Request heads: parsing with `httparse` and the framing rules of RFC 9112,
//! applied more strictly than the RFC allows so that no two parsers on the path
//! (butler, Ollama, a proxy in front) can disagree about where a body ends.
//!
//! Everything here is pure: bytes in, a [`Head`] or a [`HeadError`] out.

use super::target::{Target, TargetError};

/// Largest request head accepted (request line plus headers).
pub const MAX_HEAD: usize = 32 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed, validated request head.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub target: Target,
    pub version: Version,
    /// Header lines in order, names as sent (lookups ignore case).
    pub headers: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// The client asked to close the connection after this exchange (or is HTTP/1.0).
    pub close: bool,
}

/// Why a head was refused; each maps to one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// More than [`MAX_HEAD`] bytes or [`MAX_HEADERS`] lines: 431.
    TooLarge,
    /// Malformed request line, header or framing: 400 with a reason.
    Bad(&'static str),
    /// A request target we refuse to route: 400.
    Target(TargetError),
    /// An `Expect` other than `100-continue`: 417.
    Expectation,
}

impl Head {
    /// The first value of header `name` (case-insensitive), if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// How many times header `name` occurs.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count()
    }
}

/// Result of looking at the bytes received so far.
#[derive(Debug)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head of `len` bytes.
    Complete(Box<Head>, usize),
}

/// Parses a request head from the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Err(HeadError::TooLarge)
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let method = req.method.ok_or(HeadError::Bad("malformed request line"))?.to_owned();
    let version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(HeadError::Bad("unsupported HTTP version")),
    };
    let path = req.path.ok_or(HeadError::Bad("malformed request line"))?;
    let target = Target::parse(path).map_err(HeadError::Target)?;
    let headers: Vec<(String, Vec<u8>)> =
        req.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect();

    let mut head = Head {
        method,
        target,
        version,
        headers,
        framing: Framing::None,
        expect_continue: false,
        close: version == Version::Http10,
    };
    head.framing = framing(&head)?;

    match head.header_count("host") {
        1 => {}
        0 if version == Version::Http10 => {}
        _ => return Err(HeadError::Bad("exactly one Host header is required")),
    }
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                    head.close = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                head.expect_continue = version == Version::Http11;
            } else {
                return Err(HeadError::Expectation);
            }
        }
    }
    Ok(Parsed::Complete(Box::new(head), len))
}

/// RFC 9112 §6 body framing, strict: `Content-Length` with `Transfer-Encoding`,
/// repeated or invalid `Content-Length`, or any coding but a lone `chunked` is
/// refused rather than guessed at (request smuggling lives in those guesses).
fn framing(head: &Head) -> Result<Framing, HeadError> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(HeadError::Bad("repeated Content-Length"));
            }
            length = Some(parse_content_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Bad("unsupported Transfer-Encoding"));
            }
            chunked = true;
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err(HeadError::Bad("Content-Length with Transfer-Encoding")),
        (None, true) if head.version == Version::Http10 => {
            Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"))
        }
        (None, true) => Ok(Framing::Chunked),
        (Some(0), false) | (None, false) => Ok(Framing::None),
        (Some(n), false) => Ok(Framing::Length(n)),
    }
}

fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Bad("invalid Content-Length"));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(HeadError::Bad("invalid Content-Length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Head, HeadError> {
        match parse(raw.as_bytes())? {
            Parsed::Complete(h, len) => {
                assert_eq!(len, raw.len());
                Ok(*h)
            }
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_a_simple_request() {
        let h =
            head("POST /api/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.target.path, "/api/chat");
        assert_eq!(h.target.raw, "/api/chat?x=1");
        assert_eq!(h.framing, Framing::Length(12));
        assert!(!h.close);
        assert_eq!(h.header("content-length"), Some("12"));
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(Parsed::Partial)));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse(&big).unwrap_err(), HeadError::TooLarge);
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_HEADERS {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(many.as_bytes()).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let bad = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ];
        for raw in bad {
            assert!(matches!(head(raw), Err(HeadError::Bad(_))), "{raw}");
        }
    }

    #[test]
    fn unknown_expectation() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n";
        assert_eq!(head(raw).unwrap_err(), HeadError::Expectation);
    }

    #[test]
    fn framing_and_connection_options() {
        let h = head("POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\nConnection: keep-alive, close\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.close);
        assert!(h.expect_continue);
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(h.version, Version::Http10);
        assert!(h.close);
        assert_eq!(h.framing, Framing::None);
    }

    #[test]
    fn refuses_non_origin_targets() {
        for raw in [
            "GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(head(raw), Err(HeadError::Target(_))), "{raw}");
        }
    }

    /// Random byte flips in a valid head never panic, and whatever parses
    /// still obeys the framing rules.
    #[test]
    fn random_mutations_never_break_the_rules() {
        let base = b"POST /api/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let alphabet =
            b" :\r\n/%.0123456789abcdefABCDEF-,;chunkedContent-LengthTransfer-Encoding\t\x00\x7f";
        for _ in 0..20_000 {
            let mut raw = base.to_vec();
            for _ in 0..rnd(4) + 1 {
                let i = rnd(raw.len());
                match rnd(3) {
                    0 => raw[i] = alphabet[rnd(alphabet.len())],
                    1 => raw.insert(i, alphabet[rnd(alphabet.len())]),
                    _ => {
                        raw.remove(i);
                    }
                }
            }
            if let Ok(Parsed::Complete(h, len)) = parse(&raw) {
                assert!(len <= raw.len());
                assert!(h.target.path.starts_with('/'));
                let cl = h.header_count("content-length");
                let te = h.header_count("transfer-encoding");
                assert!(cl + te <= 1, "{}", String::from_utf8_lossy(&raw));
            }
        }
    }
}
