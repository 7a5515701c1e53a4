//! Request body decoding: never panics, never returns more than the limit,
//! and a body compressed by the crates' own encoders decodes to exactly what
//! went in (or is too large, when it is over the limit).
#![no_main]
use std::io::Write;

use butler::coding::{Coding, DecodeError, decode};
use libfuzzer_sys::fuzz_target;

const LIMITS: [usize; 5] = [0, 1, 64, 4096, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let Some((&select, rest)) = data.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(select >> 4) % LIMITS.len()];
    let coding = if select & 1 == 0 { Coding::Gzip } else { Coding::Zstd };
    if select & 2 == 0 {
        // Arbitrary bytes labelled with the coding.
        if let Ok(out) = decode(coding, rest.to_vec(), limit) {
            assert!(out.len() <= limit);
        }
        return;
    }
    let encoded = match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(rest).unwrap();
            e.finish().unwrap()
        }
        _ => ruzstd::encoding::compress_to_vec(rest, ruzstd::encoding::CompressionLevel::Fastest),
    };
    match decode(coding, encoded.clone(), limit) {
        Ok(out) => assert_eq!(out, rest),
        Err(DecodeError::TooLarge) => assert!(rest.len() > limit),
        Err(e) => panic!("a valid stream was refused: {e:?}"),
    }
    // Cut short, it never decodes to more than the limit.
    let cut = usize::from(select >> 2) % encoded.len().max(1);
    if let Ok(out) = decode(coding, encoded[..cut].to_vec(), limit) {
        assert!(out.len() <= limit);
    }
});
