//! The response tap: never panics, never changes bytes unless hiding, only ever removes bytes
//! when hiding, sees the same counts with and without hiding, and gives the same bytes, counts
//! and output chunks however the body is split into chunks. The charge made of what it saw is
//! the report when there is one, else an estimate from the prompt and the chunks.
#![no_main]
use butler::usage::{Format, Seen, Tap, charge};
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 5] =
    [Format::OllamaGenerate, Format::OllamaEmbed, Format::OpenAi, Format::Anthropic, Format::Responses];

fn run(format: Format, hide: bool, body: &[u8], step: usize) -> (Vec<u8>, Seen) {
    let mut tap = Tap::new(format, hide);
    let mut out = Vec::new();
    for chunk in body.chunks(step) {
        out.extend_from_slice(&tap.feed(chunk));
    }
    let (rest, seen) = tap.finish();
    out.extend_from_slice(&rest);
    (out, seen)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let format = FORMATS[usize::from(data[0]) % FORMATS.len()];
    let hide = data[0] & 0x80 != 0;
    let step = usize::from(data[1] % 13) + 1;
    let body = &data[2..];
    let whole = run(format, hide, body, body.len().max(1));
    let split = run(format, hide, body, step);
    assert_eq!(whole, split);
    if hide {
        assert!(whole.0.len() <= body.len());
        assert_eq!(whole.1, run(format, false, body, body.len().max(1)).1);
    } else {
        assert_eq!(whole.0, body);
    }
    let seen = whole.1;
    let prompt_bytes = body.len() as u64;
    for status in [None, Some(200), Some(500)] {
        let charged = charge(seen, prompt_bytes, status);
        match seen.usage {
            Some(usage) => assert_eq!(charged.map(|c| (c.usage, c.estimated)), Some((usage, false))),
            None if status == Some(500) => assert_eq!(charged, None),
            None => {
                let c = charged.expect("an estimate");
                assert!(c.estimated);
                assert_eq!((c.usage.prompt, c.usage.completion), (prompt_bytes.div_ceil(4), seen.deltas));
            }
        }
    }
});
