//! Chunked decoding: never panics, always makes progress, and decoding is the
//! same however the input is split.
#![no_main]
use butler::http::chunked::Decoder;
use libfuzzer_sys::fuzz_target;

fn decode(data: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ()> {
    let mut d = Decoder::default();
    let (mut out, mut pos) = (Vec::new(), 0);
    while pos < data.len() && !d.is_done() {
        let end = pos.saturating_add(step).min(data.len());
        let s = d.decode(&data[pos..end]).map_err(|_| ())?;
        assert!(s.data.end <= end - pos && s.data.end == s.consumed);
        out.extend_from_slice(&data[pos..end][s.data]);
        assert!(s.consumed > 0 || d.is_done());
        pos += s.consumed;
    }
    Ok((out, pos, d.is_done()))
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let step = usize::from(data[0] % 7) + 1;
    let whole = decode(&data[1..], usize::MAX);
    let split = decode(&data[1..], step);
    assert_eq!(whole, split);
});
