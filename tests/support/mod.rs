//! Shared support code for butler's integration tests; use it with `mod support;`.
//!
//! - [`fake_ollama`]: a controllable fake upstream that records requests and reports events
//!   (tokens written, butler hanging up) so streaming behaviour can be asserted without sleeps.
//! - [`butler`]: runs the real butler binary on a temp config and reads its JSON logs.
//! - [`client`]: a raw HTTP/1.1 client with exact control over bytes and framing.
//! - [`setup`]: the standard test configuration, its keys, and error-response assertions.
//!
//! Every blocking wait here takes a timeout, so a broken product fails a test instead of
//! hanging it. Each test file compiles this module separately and uses only part of it, hence
//! the blanket allowances below.
#![allow(dead_code, unused_imports)]

pub mod butler;
pub mod certs;
pub mod client;
pub mod fake_ollama;
pub mod idp;
pub mod setup;

pub use butler::{
    BUTLER_BIN, Butler, CLI_TIMEOUT, LogLine, START_TIMEOUT, TempDir, listening_addr, run_cli,
    run_cli_in,
};
pub use client::{
    DEFAULT_TIMEOUT, Framing, RawConn, RawResponse, Response, StreamEnd, StreamingResponse,
    build_request, connect_from, find_header, get, parse_strict, post_json, request, send_raw,
    try_request,
};
pub use fake_ollama::{Behavior, Canned, Event, FakeOllama, MAX_RECORDED_BODY, Recorded};

use std::net::{SocketAddr, TcpListener};

/// A loopback address on which nothing listens (bound, then released), for "upstream
/// unreachable" tests. Another process could grab the port in between, but the window is tiny.
pub fn unused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
    listener.local_addr().expect("local address")
}
