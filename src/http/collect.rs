//! Receiving a small request body whole before any worker touches it.
//!
//! A route that reads its body without knowing who is asking (`POST
//! /auth/login`, SPEC §5) would otherwise let a client without any credential
//! hold a worker thread by sending the body one byte at a time. Instead the
//! acceptor keeps such a connection, as it keeps one whose head is still
//! arriving, until the whole body is in its buffer (or the deadline passes,
//! or the body proves too large), and only then hands it to a worker, which
//! reads it without waiting.
//!
//! This module is the pure part: it is fed the body bytes as they arrive and
//! says whether the body is complete. It never allocates.

use super::chunked::Decoder;
use super::head::Framing;

/// Where collecting a body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    More,
    /// The whole body has been received.
    Complete,
    /// The body is (or declares itself) larger than the limit.
    TooLarge,
    /// Broken chunked framing; the worker reading the body reports it.
    Malformed,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Body bytes still to come.
    Length(u64),
    Chunked {
        decoder: Decoder,
        /// Body data decoded so far.
        data: u64,
        /// Bytes on the wire so far, framing included.
        raw: u64,
    },
    Over(Progress),
}

/// Follows one request body as it arrives.
#[derive(Debug, Clone)]
pub struct Collector {
    kind: Kind,
    limit: u64,
}

impl Collector {
    /// Starts collecting a body framed as `framing`, of at most `limit` bytes
    /// of data. A chunked body may take twice that (plus 1 KiB) on the wire:
    /// framing and extensions are bounded too, so a client cannot make the
    /// acceptor buffer without end.
    pub fn new(framing: Framing, limit: u64) -> Collector {
        let kind = match framing {
            Framing::None => Kind::Over(Progress::Complete),
            Framing::Length(n) if n > limit => Kind::Over(Progress::TooLarge),
            Framing::Length(n) => Kind::Length(n),
            Framing::Chunked => Kind::Chunked { decoder: Decoder::default(), data: 0, raw: 0 },
        };
        let mut c = Collector { kind, limit };
        if matches!(c.kind, Kind::Length(0)) {
            c.kind = Kind::Over(Progress::Complete);
        }
        c
    }

    fn max_raw(&self) -> u64 {
        self.limit.saturating_mul(2).saturating_add(1024)
    }

    /// Where things stand without new bytes.
    pub fn progress(&self) -> Progress {
        match self.kind {
            Kind::Over(p) => p,
            _ => Progress::More,
        }
    }

    /// Takes the next body bytes received (each byte exactly once; bytes
    /// past the end of the body, such as a pipelined request, are ignored).
    pub fn feed(&mut self, bytes: &[u8]) -> Progress {
        let max_raw = self.max_raw();
        let limit = self.limit;
        match &mut self.kind {
            Kind::Over(p) => return *p,
            Kind::Length(left) => {
                *left -= (*left).min(bytes.len() as u64);
                if *left == 0 {
                    self.kind = Kind::Over(Progress::Complete);
                }
            }
            Kind::Chunked { decoder, data, raw } => {
                let mut rest = bytes;
                let outcome = loop {
                    if decoder.is_done() {
                        break Some(Progress::Complete);
                    }
                    if rest.is_empty() {
                        break None;
                    }
                    match decoder.decode(rest) {
                        Ok(step) => {
                            *data += step.data.len() as u64;
                            *raw += step.consumed as u64;
                            rest = &rest[step.consumed..];
                            if *data > limit || *raw > max_raw {
                                break Some(Progress::TooLarge);
                            }
                        }
                        Err(_) => break Some(Progress::Malformed),
                    }
                };
                if let Some(p) = outcome {
                    self.kind = Kind::Over(p);
                }
            }
        }
        self.progress()
    }

    /// How many more bytes are worth reading: the rest of a sized body, or
    /// one past what a chunked body may still take (to see it overflow).
    pub fn room(&self) -> usize {
        let n = match &self.kind {
            Kind::Over(_) => 0,
            Kind::Length(left) => *left,
            Kind::Chunked { raw, .. } => self.max_raw().saturating_sub(*raw) + 1,
        };
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_bodies() {
        assert_eq!(Collector::new(Framing::None, 10).progress(), Progress::Complete);
        assert_eq!(Collector::new(Framing::Length(11), 10).progress(), Progress::TooLarge);
        let mut c = Collector::new(Framing::Length(10), 10);
        assert_eq!(c.room(), 10);
        assert_eq!(c.feed(b"abcd"), Progress::More);
        assert_eq!(c.room(), 6);
        assert_eq!(c.feed(b""), Progress::More);
        // A pipelined request after the body does not matter.
        assert_eq!(c.feed(b"efghijGET / HTTP/1.1\r\n"), Progress::Complete);
        assert_eq!(c.room(), 0);
        assert_eq!(c.feed(b"more"), Progress::Complete);
    }

    #[test]
    fn chunked_bodies_split_anywhere() {
        let body = b"3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nTrailer: t\r\n\r\nGET / HTTP/1.1\r\n";
        for split in 0..body.len() {
            let mut c = Collector::new(Framing::Chunked, 7);
            let first = c.feed(&body[..split]);
            let end = body.len() - b"GET / HTTP/1.1\r\n".len();
            if split >= end {
                assert_eq!(first, Progress::Complete, "split {split}");
            } else {
                assert_eq!(first, Progress::More, "split {split}");
                assert_eq!(c.feed(&body[split..]), Progress::Complete, "split {split}");
            }
        }
        // One byte at a time.
        let mut c = Collector::new(Framing::Chunked, 7);
        let progress: Vec<Progress> = body.iter().map(|b| c.feed(&[*b])).collect();
        let end = body.len() - b"GET / HTTP/1.1\r\n".len();
        assert!(progress[..end - 1].iter().all(|p| *p == Progress::More), "{progress:?}");
        assert!(progress[end - 1..].iter().all(|p| *p == Progress::Complete), "{progress:?}");
    }

    #[test]
    fn chunked_limits() {
        let mut c = Collector::new(Framing::Chunked, 6);
        assert_eq!(c.feed(b"3\r\nabc\r\n4\r\nde"), Progress::More);
        assert_eq!(c.feed(b"f"), Progress::More);
        assert_eq!(c.feed(b"g"), Progress::TooLarge);
        // Framing alone may not grow without end either.
        let mut c = Collector::new(Framing::Chunked, 10);
        assert_eq!(c.room(), 1045);
        let ext = format!("1;{}\r\n", "e".repeat(1100));
        assert_eq!(c.feed(ext.as_bytes()), Progress::TooLarge);
        assert_eq!(c.room(), 0);
        let mut c = Collector::new(Framing::Chunked, 10);
        assert_eq!(c.feed(b"zz\r\n"), Progress::Malformed);
        assert_eq!(c.feed(b"0\r\n\r\n"), Progress::Malformed);
    }
}
