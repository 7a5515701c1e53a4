//! A pure, bounded decoder for `Transfer-Encoding: chunked` request bodies
//! (RFC 9112 §7.1). It never allocates: the caller hands in whatever bytes it
//! has, and gets back how many were consumed and where the body data lies.
//!
//! Strict on purpose: lines must end in CRLF, sizes are hex digits only (at
//! most 16), a size line with extensions is capped at [`MAX_LINE`] bytes and
//! trailers at [`MAX_TRAILERS`] bytes in all.

use std::ops::Range;

/// Longest chunk-size line, extensions included.
pub const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted (and discarded).
pub const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size,
    /// In chunk extensions, until CR.
    Ext,
    /// Expecting LF after a size line's CR.
    SizeLf,
    /// Inside chunk data with this many bytes left.
    Data(u64),
    /// Expecting CR after chunk data.
    DataCr,
    /// Expecting LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line, until CR.
    Trailer,
    /// Expecting LF after a trailer line's CR.
    TrailerLf,
    /// Expecting LF after the final empty line's CR.
    EndLf,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

/// What one call to [`Decoder::decode`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input consumed (framing and data).
    pub consumed: usize,
    /// Body data within the input, if any (always ends at `consumed`).
    pub data: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
    trailers: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { state: State::Size, size: 0, digits: 0, line: 0, trailers: 0 }
    }
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing bytes from `input` until it reaches chunk data (which
    /// it then consumes, up to the end of the chunk or of the input), the end
    /// of the body, or the end of the input.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Data(left) => {
                    let n = left.min((input.len() - i) as u64) as usize;
                    let rest = left - n as u64;
                    self.state = if rest == 0 { State::DataCr } else { State::Data(rest) };
                    return Ok(Step { consumed: i + n, data: i..i + n });
                }
                State::Done => break,
                State::Size => {
                    self.line += 1;
                    if let Some(d) = (b as char).to_digit(16) {
                        self.digits += 1;
                        if self.digits > 16 {
                            return Err(ChunkError("chunk size too large"));
                        }
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or(ChunkError("chunk size too large"))?;
                    } else if self.digits == 0 {
                        return Err(ChunkError("invalid chunk size"));
                    } else if b == b';' {
                        self.state = State::Ext;
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err(ChunkError("invalid chunk size"));
                    }
                }
                State::Ext => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err(ChunkError("chunk extension too long"));
                    }
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' | 0 => return Err(ChunkError("invalid chunk extension")),
                        _ => {}
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError("chunk size line must end in CRLF"));
                    }
                    let size = self.size;
                    self.size = 0;
                    self.digits = 0;
                    self.line = 0;
                    self.state = if size == 0 { State::TrailerStart } else { State::Data(size) };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError("chunk data must end in CRLF"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError("chunk data must end in CRLF"));
                    }
                    self.state = State::Size;
                }
                State::TrailerStart | State::Trailer => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(ChunkError("trailers too large"));
                    }
                    match (self.state, b) {
                        (State::TrailerStart, b'\r') => self.state = State::EndLf,
                        (_, b'\r') => self.state = State::TrailerLf,
                        (_, b'\n') => return Err(ChunkError("trailer must end in CRLF")),
                        _ => self.state = State::Trailer,
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError("trailer must end in CRLF"));
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError("body must end in CRLF"));
                    }
                    self.state = State::Done;
                    return Ok(Step { consumed: i + 1, data: i + 1..i + 1 });
                }
            }
            i += 1;
        }
        Ok(Step { consumed: i, data: i..i })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() && !d.is_done() {
            let end = (pos + step).min(input.len());
            let s = d.decode(&input[pos..end])?;
            out.extend_from_slice(&input[pos..end][s.data]);
            pos += s.consumed;
            assert!(s.consumed > 0 || d.is_done(), "no progress");
        }
        assert!(d.is_done(), "not done");
        Ok((out, pos))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: y\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (data, used) = decode_all(body, step).unwrap();
            assert_eq!(data, b"hello, world");
            assert_eq!(&body[used..], b"NEXT");
        }
    }

    #[test]
    fn rejects_malformed_framing() {
        let bad: [&[u8]; 10] = [
            b"x\r\n",
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"-5\r\n",
            b"11111111111111111\r\n",
            b"ffffffffffffffff0\r\n",
            b"0\r\nbad\n\r\n",
            b"0\r\n\rX",
        ];
        for input in bad {
            let mut d = Decoder::default();
            let mut pos = 0;
            let mut failed = false;
            while pos < input.len() {
                match d.decode(&input[pos..]) {
                    Ok(s) => pos += s.consumed.max(1),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn bounds_extensions_and_trailers() {
        let mut long = b"1;".to_vec();
        long.resize(MAX_LINE + 10, b'a');
        assert!(Decoder::default().decode(&long).is_err());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < 2 * MAX_TRAILERS {
            trailers.extend_from_slice(b"X-A: b\r\n");
        }
        assert!(Decoder::default().decode(&trailers).is_err());
    }

    #[test]
    fn huge_declared_chunk_streams_without_allocation() {
        let mut d = Decoder::default();
        let s = d.decode(b"ffffffff\r\nabc").unwrap();
        assert_eq!(s.data, 10..13);
        assert!(!d.is_done());
    }

    /// Deterministic pseudo-random round trips: encode random bodies with
    /// random chunk sizes and extensions, decode them fed in random pieces;
    /// then flip random bytes and check the decoder never panics or stalls.
    #[test]
    fn random_round_trips_and_mutations() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..500 {
            let body: Vec<u8> = (0..rnd(3000)).map(|_| rnd(256) as u8).collect();
            let mut wire = Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = (rnd(700) + 1).min(rest.len());
                wire.extend_from_slice(format!("{n:x}").as_bytes());
                if rnd(4) == 0 {
                    wire.extend_from_slice(b";name=value");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let (decoded, used) = decode_all(&wire, rnd(64) + 1).unwrap();
            assert_eq!(decoded, body);
            assert_eq!(used, wire.len());

            for _ in 0..5 {
                let i = rnd(wire.len());
                wire[i] = rnd(256) as u8;
            }
            let mut d = Decoder::default();
            let mut pos = 0;
            while pos < wire.len() && !d.is_done() {
                let end = (pos + rnd(64) + 1).min(wire.len());
                match d.decode(&wire[pos..end]) {
                    Ok(s) => {
                        assert!(s.consumed > 0 || d.is_done());
                        pos += s.consumed;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
