//! The response tap: never panics, never changes bytes unless hiding, and
//! gives the same bytes and counts however the body is split into chunks.
#![no_main]
use butler::usage::{Format, Tap};
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 5] =
    [Format::OllamaGenerate, Format::OllamaEmbed, Format::OpenAi, Format::Anthropic, Format::Responses];

fn run(format: Format, hide: bool, body: &[u8], step: usize) -> (Vec<u8>, Option<(u64, u64)>) {
    let mut tap = Tap::new(format, hide);
    let mut out = Vec::new();
    for chunk in body.chunks(step) {
        out.extend_from_slice(&tap.feed(chunk));
    }
    let (rest, usage) = tap.finish();
    out.extend_from_slice(&rest);
    (out, usage.map(|u| (u.prompt, u.completion)))
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
    if !hide {
        assert_eq!(whole.0, body);
    }
});
