//! Request heads: never panic; a complete head's framing is self-consistent.
#![no_main]
use butler::http::head::{Framing, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete(head, len)) = parse(data) {
        assert!(len <= data.len());
        assert!(head.target.path.starts_with('/'));
        assert!(!head.target.path.contains("/../") && !head.target.path.ends_with("/.."));
        let cl = head.header_count("content-length");
        let te = head.header_count("transfer-encoding");
        assert!(cl <= 1 && te <= 1 && cl + te <= 1);
        if head.framing == Framing::Chunked {
            assert_eq!(te, 1);
        }
    }
});
