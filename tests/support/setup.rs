//! Shared scaffolding for the product tests: the standard two-client configuration, the keys
//! that go with it, and the assertion for butler's JSON error responses.

use std::time::Duration;

use super::butler::Butler;
use super::client::Response;
use super::fake_ollama::FakeOllama;

/// Key of client `c1` in [`config`].
pub const KEY: &str = "sk-test-c1-4f9a2b7e1d3c5a8f0b6e";
/// Key of client `c2` in [`config`].
pub const KEY2: &str = "sk-test-c2-9e8d7c6b5a4f3e2d1c0b";

/// Upper bound for waits on things that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(5);

/// A configuration on an ephemeral port forwarding to `upstream`, with clients `c1` ([`KEY`])
/// and `c2` ([`KEY2`]), both allowed every model and every route (these tests are about the
/// transport; policy has its own suite). `extra` is inserted as top-level YAML (e.g.
/// `"workers: 1\n"`).
pub fn config(upstream: &str, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"{upstream}\"\n{extra}\nclients:\n  \
         - name: c1\n    key: \"{KEY}\"\n    allow_models: [\"*\"]\n    allow_manage: true\n  \
         - name: c2\n    key: \"{KEY2}\"\n    allow_models: [\"*\"]\n    allow_manage: true\n"
    )
}

/// Starts butler with [`config`] in front of `fake`.
pub fn start(fake: &FakeOllama, extra: &str) -> Butler {
    Butler::start(&config(&fake.url(), extra))
}

/// `Bearer <KEY>`.
pub fn bearer() -> String {
    format!("Bearer {KEY}")
}

/// Exactly how butler writes an error: `{"error":"<msg>"}` and a newline.
pub fn error_body(msg: &str) -> String {
    format!("{{\"error\":\"{msg}\"}}\n")
}

/// Asserts a butler error response: the status, `Content-Type: application/json` and the body
/// [`error_body`]`(msg)` byte for byte.
#[track_caller]
pub fn assert_error(response: &Response, status: u16, msg: &str) {
    assert_eq!(
        (response.status, response.body_str().as_str()),
        (status, error_body(msg).as_str()),
        "headers: {:?}",
        response.headers
    );
    assert_eq!(response.header("content-type"), Some("application/json"));
}
