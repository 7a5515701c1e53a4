//! Request body content codings (SPEC §7.1, §7.3, §7.5): which coding a
//! request's `Content-Encoding` names, and decoding a `gzip` or `zstd` body
//! under a ceiling. Pure: header values and bytes in, bytes or an error out.
//!
//! Clients such as Codex CLI compress request bodies. butler inspects the
//! decoded body and forwards exactly those bytes (without `Content-Encoding`),
//! so Ollama reads what butler judged. A compressed body is tiny compared to
//! what it can decode to, so decoding is bounded by the decoded size and never
//! by a size the client declares: output grows only as bytes really come out
//! of the decoder, and stops one read past the ceiling.

use std::io::{self, Read};

use ruzstd::decoding::errors::{FrameDecoderError, FrameHeaderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// Largest zstd window (history the decoder keeps) butler accepts: a frame
/// header may declare up to gigabytes, which the decoder would reserve up
/// front. Ollama refuses windows above 8 MiB too (`WithDecoderMaxMemory`),
/// and a frame whose content fits the 8 MiB inspection ceiling never needs
/// more.
const MAX_ZSTD_WINDOW: u64 = 8 * 1024 * 1024;

/// Decoder output is taken in pieces of this size, so a bomb is caught at
/// most this far past the ceiling.
const PIECE: usize = 32 * 1024;

/// The coding of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// No `Content-Encoding`, or only `identity`.
    Identity,
    /// `gzip` (or its alias `x-gzip`), RFC 1952; several members are one body.
    Gzip,
    /// `zstd`, RFC 8878; several frames are one body, skippable frames are skipped.
    Zstd,
}

/// A `Content-Encoding` butler does not decode: several codings, an unknown
/// one, `br`, `deflate`, `compress`. Answered 415.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported;

/// The coding named by every `Content-Encoding` header of a request (their
/// values, in order). The headers form one comma-separated list (RFC 9110
/// §5.3); empty elements and `identity` (no coding) are ignored, names are
/// case-insensitive. Anything but a single `gzip`, `x-gzip` or `zstd` is
/// [`Unsupported`] — decoding a chain of codings would multiply the work a
/// small body can cause, and no client sends one.
pub fn coding<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Coding, Unsupported> {
    let mut found = Coding::Identity;
    for value in values {
        let value = std::str::from_utf8(value).map_err(|_| Unsupported)?;
        for element in value.split(',') {
            let name = element.trim_matches([' ', '\t']);
            if name.is_empty() || name.eq_ignore_ascii_case("identity") {
                continue;
            }
            let this = if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                Coding::Gzip
            } else if name.eq_ignore_ascii_case("zstd") {
                Coding::Zstd
            } else {
                return Err(Unsupported);
            };
            if found != Coding::Identity {
                return Err(Unsupported);
            }
            found = this;
        }
    }
    Ok(found)
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// It decodes to more than the ceiling (or, for zstd, needs a window
    /// larger than [`MAX_ZSTD_WINDOW`]): 413.
    TooLarge,
    /// Not a valid stream of its coding (corrupt, truncated, bad checksum,
    /// trailing garbage): 400 with this reason.
    Invalid(&'static str),
}

/// Decodes `body` to at most `limit` bytes. An identity body is returned as
/// it is (the caller has bounded its size already).
pub fn decode(coding: Coding, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, DecodeError> {
    match coding {
        Coding::Identity => Ok(body),
        Coding::Gzip => gzip(&body, limit),
        Coding::Zstd => zstd(&body, limit),
    }
}

fn gzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    const INVALID: DecodeError = DecodeError::Invalid("invalid gzip body");
    if body.is_empty() {
        return Err(INVALID);
    }
    // Every member, as Go's gzip reader does; the CRC and length of each are
    // checked at its end, and bytes after the last member are an error.
    let mut decoder = flate2::read::MultiGzDecoder::new(body);
    let mut out = Output::new(limit);
    let mut piece = vec![0u8; PIECE];
    loop {
        match decoder.read(&mut piece) {
            Ok(0) => return Ok(out.bytes),
            Ok(n) => out.push(&piece[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(INVALID),
        }
    }
}

fn zstd(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    const INVALID: DecodeError = DecodeError::Invalid("invalid zstd body");
    if body.is_empty() {
        return Err(INVALID);
    }
    let mut rest = body;
    let mut out = Output::new(limit);
    let mut piece = vec![0u8; PIECE];
    let mut frame = FrameDecoder::new();
    frame.set_max_window_size(MAX_ZSTD_WINDOW);
    // One frame after the other; the decoder's buffers are reused.
    while !rest.is_empty() {
        match frame.init(&mut rest) {
            Ok(()) => {}
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                rest = usize::try_from(length).ok().and_then(|n| rest.get(n..)).ok_or(INVALID)?;
                continue;
            }
            Err(
                FrameDecoderError::WindowSizeTooBig { .. }
                | FrameDecoderError::FrameHeaderError(FrameHeaderError::WindowTooBig { .. }),
            ) => return Err(DecodeError::TooLarge),
            Err(_) => return Err(INVALID),
        }
        loop {
            // One block (at most 128 KiB of output) at a time; the decoder
            // keeps at most a window of it, the rest is drained below.
            if !frame.is_finished() {
                frame
                    .decode_blocks(&mut rest, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(|_| INVALID)?;
            }
            loop {
                match frame.read(&mut piece) {
                    Ok(0) => break,
                    Ok(n) => out.push(&piece[..n])?,
                    Err(_) => return Err(INVALID),
                }
            }
            if frame.is_finished() && frame.can_collect() == 0 {
                break;
            }
        }
        if let Some(sent) = frame.get_checksum_from_data()
            && frame.get_calculated_checksum() != Some(sent)
        {
            return Err(INVALID);
        }
    }
    Ok(out.bytes)
}

/// Decoded bytes under a ceiling. Capacity doubles as bytes arrive but never
/// beyond the ceiling, so memory follows what the decoder really produced.
struct Output {
    bytes: Vec<u8>,
    limit: usize,
}

impl Output {
    fn new(limit: usize) -> Output {
        Output { bytes: Vec::new(), limit }
    }

    fn push(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        let needed = self.bytes.len().checked_add(data.len()).ok_or(DecodeError::TooLarge)?;
        if needed > self.limit {
            return Err(DecodeError::TooLarge);
        }
        if needed > self.bytes.capacity() {
            let grown = self.bytes.capacity().saturating_mul(2).max(needed).min(self.limit);
            self.bytes.reserve_exact(grown - self.bytes.len());
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    const MIB: usize = 1024 * 1024;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zst(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    /// A zstd frame written by hand: `blocks` RLE blocks of 128 KiB of one
    /// byte each (4 bytes per block), with a 128 KiB window and, if given, a
    /// declared content size. 8192 blocks are 1 GiB from 32 KiB.
    fn zstd_rle(blocks: usize, declared: Option<u64>) -> Vec<u8> {
        let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
        match declared {
            // Frame_Content_Size_flag 3 (8 bytes), no single segment.
            Some(n) => {
                f.push(0b1100_0000);
                f.push(7 << 3); // window 2^(10+7) = 128 KiB
                f.extend_from_slice(&n.to_le_bytes());
            }
            None => {
                f.push(0);
                f.push(7 << 3);
            }
        }
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            let header = last | (1 << 1) | ((128 * 1024) << 3); // RLE, size 128 KiB
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.push(b' ');
        }
        f
    }

    #[test]
    fn codings() {
        let c = |values: &[&str]| coding(values.iter().map(|v| v.as_bytes()));
        assert_eq!(c(&[]), Ok(Coding::Identity));
        assert_eq!(c(&["identity"]), Ok(Coding::Identity));
        assert_eq!(c(&[""]), Ok(Coding::Identity));
        assert_eq!(c(&["gzip"]), Ok(Coding::Gzip));
        assert_eq!(c(&["GZip"]), Ok(Coding::Gzip));
        assert_eq!(c(&["x-gzip"]), Ok(Coding::Gzip));
        assert_eq!(c(&[" zstd\t"]), Ok(Coding::Zstd));
        assert_eq!(c(&["identity, zstd,"]), Ok(Coding::Zstd));
        assert_eq!(c(&["Identity", "gzip"]), Ok(Coding::Gzip));
        for bad in [
            &["br"][..],
            &["deflate"],
            &["compress"],
            &["gzip, zstd"],
            &["gzip", "gzip"],
            &["zstd", "br"],
            &["gzip;q=1"],
            &["gz ip"],
        ] {
            assert_eq!(c(bad), Err(Unsupported), "{bad:?}");
        }
        assert_eq!(coding([&b"gzip\xff"[..]]), Err(Unsupported));
    }

    #[test]
    fn identity_is_untouched() {
        assert_eq!(decode(Coding::Identity, b"{}".to_vec(), 1), Ok(b"{}".to_vec()));
    }

    #[test]
    fn gzip_round_trips() {
        let body = br#"{"model":"m","prompt":"hi"}"#;
        assert_eq!(decode(Coding::Gzip, gz(body), 8 * MIB).unwrap(), body);
        // Several members are one body.
        let two = [gz(b"{\"a\":"), gz(b"1}")].concat();
        assert_eq!(decode(Coding::Gzip, two, 100).unwrap(), b"{\"a\":1}");
        // Exactly at the limit passes; one byte over fails.
        let data = vec![b'x'; 1000];
        assert_eq!(decode(Coding::Gzip, gz(&data), 1000).unwrap(), data);
        assert_eq!(decode(Coding::Gzip, gz(&data), 999), Err(DecodeError::TooLarge));
    }

    #[test]
    fn zstd_round_trips() {
        let body = br#"{"model":"m","input":"hi"}"#;
        assert_eq!(decode(Coding::Zstd, zst(body), 8 * MIB).unwrap(), body);
        let two = [zst(b"{\"a\":"), zst(b"1}")].concat();
        assert_eq!(decode(Coding::Zstd, two, 100).unwrap(), b"{\"a\":1}");
        // A skippable frame (magic 0x184D2A5?, length, data) anywhere is ignored.
        let mut skip = 0x184D_2A53u32.to_le_bytes().to_vec();
        skip.extend_from_slice(&3u32.to_le_bytes());
        skip.extend_from_slice(b"xyz");
        let with_skip = [skip.clone(), zst(b"{}"), skip].concat();
        assert_eq!(decode(Coding::Zstd, with_skip, 100).unwrap(), b"{}");
        let data = vec![b'y'; 300 * 1024];
        assert_eq!(decode(Coding::Zstd, zst(&data), 300 * 1024).unwrap(), data);
        assert_eq!(decode(Coding::Zstd, zst(&data), 300 * 1024 - 1), Err(DecodeError::TooLarge));
        // The hand-written frame format is right: 2 blocks, 256 KiB of spaces.
        assert_eq!(decode(Coding::Zstd, zstd_rle(2, None), MIB).unwrap(), vec![b' '; 256 * 1024]);
    }

    /// The reference `zstd` tool's output (`zstd -19` 1.5.4: one compressed
    /// block and a content checksum), so the decoder is not only checked
    /// against its own crate's encoder.
    #[test]
    fn zstd_from_the_reference_encoder() {
        assert_eq!(decode(Coding::Zstd, REFERENCE_ZSTD.to_vec(), 1000).unwrap(), REFERENCE_JSON);
        let mut bad = REFERENCE_ZSTD.to_vec();
        let n = bad.len();
        bad[n - 1] ^= 1; // the checksum
        assert_eq!(decode(Coding::Zstd, bad, 1000), Err(DecodeError::Invalid("invalid zstd body")));
    }

    const REFERENCE_JSON: &[u8] = br#"{"model":"m","input":[{"role":"user","content":"hello world, hello world, hello world, hello again world"}]}"#;
    #[rustfmt::skip]
    const REFERENCE_ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd, 0x24, 0x6c, 0x1d, 0x02, 0x00, 0x62, 0x04, 0x0e, 0x11, 0xa0, 0xed, 0x0e, 0x1f, 0x8b, 0x8a, 0x08, 0xde, 0xd2, 0x1a, 0x01, 0x88, 0x34, 0xe1, 0x80, 0xea, 0x61, 0x73, 0xcc, 0xaf, 0x44, 0x0e, 0x01, 0xc1, 0x70, 0xeb, 0x08, 0x9a, 0x79, 0xd1, 0xf5, 0x6f, 0xed, 0x5b, 0x5d, 0x1e, 0xde, 0xd6, 0xc1, 0xeb, 0x97, 0xbb, 0x5d, 0x0a, 0xfd, 0x83, 0x6c, 0xa5, 0x87, 0xab, 0xeb, 0x79, 0x4d, 0xab, 0xcb, 0x02, 0x00, 0x36, 0x07, 0xdd, 0x80, 0x4f, 0x28, 0x8b, 0xda, 0x2b, 0x0c];

    /// 1 GiB of zeros as gzip (1 MiB of zeros compressed once, 1024 members)
    /// and as one zstd frame (8192 RLE blocks): each fails fast, having
    /// decoded not much more than the ceiling.
    #[test]
    fn bombs_fail_fast() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; MIB]).unwrap();
        let member = e.finish().unwrap();
        let bomb = member.repeat(1024);
        assert!(bomb.len() < 2 * MIB, "{}", bomb.len());
        let start = Instant::now();
        assert_eq!(decode(Coding::Gzip, bomb, 8 * MIB), Err(DecodeError::TooLarge));
        let gzip_took = start.elapsed();

        let bomb = zstd_rle(8192, None);
        assert_eq!(bomb.len(), 6 + 8192 * 4);
        let start = Instant::now();
        assert_eq!(decode(Coding::Zstd, bomb, 8 * MIB), Err(DecodeError::TooLarge));
        // A frame that declares its 1 GiB: the declaration allocates nothing.
        let declared = zstd_rle(8192, Some(1 << 30));
        assert_eq!(decode(Coding::Zstd, declared, 8 * MIB), Err(DecodeError::TooLarge));
        let zstd_took = start.elapsed();
        // Decoding 1 GiB would take many seconds in a debug build.
        assert!(gzip_took < Duration::from_secs(5), "{gzip_took:?}");
        assert!(zstd_took < Duration::from_secs(5), "{zstd_took:?}");
    }

    #[test]
    fn a_huge_zstd_window_is_refused_before_any_allocation() {
        // Window descriptor exponent 14: 16 MiB of history (ruzstd alone
        // would accept and reserve up to 128 MiB).
        let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
        f.extend_from_slice(&[0, 14 << 3]);
        f.extend_from_slice(&[1, 0, 0]); // last raw block of 0 bytes
        assert_eq!(decode(Coding::Zstd, f.clone(), 8 * MIB), Err(DecodeError::TooLarge));
        // 8 MiB (exponent 13) is accepted.
        f[5] = 13 << 3;
        assert_eq!(decode(Coding::Zstd, f, 8 * MIB), Ok(Vec::new()));
    }

    #[test]
    fn corrupt_and_truncated_streams_are_invalid() {
        let gzip_invalid = Err(DecodeError::Invalid("invalid gzip body"));
        let zstd_invalid = Err(DecodeError::Invalid("invalid zstd body"));
        let body = br#"{"model":"m","prompt":"hello hello hello"}"#;
        let good = gz(body);
        for cut in [0, 1, 10, good.len() / 2, good.len() - 4, good.len() - 1] {
            assert_eq!(decode(Coding::Gzip, good[..cut].to_vec(), MIB), gzip_invalid, "{cut}");
        }
        let mut crc = good.clone();
        let n = crc.len();
        crc[n - 8] ^= 0xff; // CRC32
        assert_eq!(decode(Coding::Gzip, crc, MIB), gzip_invalid);
        let mut size = good.clone();
        size[n - 1] ^= 0x01; // ISIZE
        assert_eq!(decode(Coding::Gzip, size, MIB), gzip_invalid);
        let trailing = [good.clone(), b"junk".to_vec()].concat();
        assert_eq!(decode(Coding::Gzip, trailing, MIB), gzip_invalid);
        assert_eq!(decode(Coding::Gzip, body.to_vec(), MIB), gzip_invalid);

        let good = zst(body);
        for cut in [0, 1, 4, 5, good.len() / 2, good.len() - 1] {
            assert_eq!(decode(Coding::Zstd, good[..cut].to_vec(), MIB), zstd_invalid, "{cut}");
        }
        let trailing = [good.clone(), b"junk".to_vec()].concat();
        assert_eq!(decode(Coding::Zstd, trailing, MIB), zstd_invalid);
        assert_eq!(decode(Coding::Zstd, body.to_vec(), MIB), zstd_invalid);
        let rle = zstd_rle(3, None);
        assert_eq!(decode(Coding::Zstd, rle[..rle.len() - 4].to_vec(), MIB), zstd_invalid);
        // A skippable frame longer than what follows.
        let mut skip = 0x184D_2A50u32.to_le_bytes().to_vec();
        skip.extend_from_slice(&100u32.to_le_bytes());
        assert_eq!(decode(Coding::Zstd, skip, MIB), zstd_invalid);
    }

    #[test]
    fn output_never_reserves_past_the_limit() {
        let mut out = Output::new(100);
        for _ in 0..10 {
            out.push(&[1; 10]).unwrap();
            assert!(out.bytes.capacity() <= 100);
        }
        assert_eq!(out.push(&[1]), Err(DecodeError::TooLarge));
        assert_eq!(out.bytes.len(), 100);
    }
}
