//! Streaming through butler (SPEC §2, §8): every NDJSON line / SSE event is forwarded as soon as
//! Ollama writes it, byte for byte; a client hanging up cuts the upstream at once; an upstream
//! dying mid-stream is visible to the client as a truncation.
//!
//! Ordering is asserted with the fake's events (stamped before each write) against the
//! instants at which the client read each piece; nothing here sleeps.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::setup::{WAIT, bearer, start};
use support::{
    Behavior, Event, FakeOllama, Framing, RawConn, StreamEnd, StreamingResponse, get, request,
};

fn chat_body(stream: Option<bool>) -> Vec<u8> {
    let mut v = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
    if let Some(s) = stream {
        v["stream"] = json!(s);
    }
    v.to_string().into_bytes()
}

fn open(butler_addr: std::net::SocketAddr, path: &str, body: &[u8]) -> StreamingResponse {
    let auth = bearer();
    StreamingResponse::open(butler_addr, "POST", path, &[("Authorization", &auth)], body)
}

/// When token `index` was written on any connection, waiting for it if need be.
fn token_written(fake: &FakeOllama, index: usize) -> Instant {
    fake.wait_token(index, WAIT).unwrap_or_else(|| panic!("token {index} was never written"))
}

#[test]
fn ndjson_lines_reach_the_client_as_they_are_written() {
    let tokens = 4;
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(200),
        tokens,
        ..Behavior::default()
    });
    let butler = start(&fake, "");
    let mut stream = open(butler.addr(), "/api/chat", &chat_body(None));
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(stream.framing, Framing::Chunked);

    for k in 0..tokens {
        let (line, arrived) = stream.next_json_line(WAIT).expect("token line");
        assert_eq!(line["message"]["content"], format!("tok{k}"), "{line}");
        assert_eq!(line["done"], false);
        assert!(token_written(&fake, k) <= arrived, "token {k} read before it was written");
        if k + 1 < tokens {
            // Chunk k was in the client's hands before the fake even wrote token k+1: butler
            // held nothing back.
            let next = token_written(&fake, k + 1);
            assert!(arrived < next, "token {k} arrived only after token {} was written", k + 1);
        }
    }
    let (last, _) = stream.next_json_line(WAIT).expect("final object");
    assert_eq!(last["done"], true);
    assert_eq!(last["eval_count"], tokens);
    assert!(stream.next_chunk(WAIT).is_none());
    assert!(stream.ended_cleanly());
}

#[test]
fn sse_events_reach_the_client_as_they_are_written() {
    let tokens = 4;
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(200),
        tokens,
        ..Behavior::default()
    });
    let butler = start(&fake, "");
    let mut stream = open(butler.addr(), "/v1/chat/completions", &chat_body(Some(true)));
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.framing, Framing::Chunked);

    for k in 0..tokens {
        let (data, arrived) = stream.next_sse_data(WAIT).expect("SSE event");
        let event: Value = serde_json::from_str(&data).expect("JSON event");
        assert_eq!(event["choices"][0]["delta"]["content"], format!("tok{k}"), "{event}");
        assert!(token_written(&fake, k) <= arrived, "event {k} read before it was written");
        if k + 1 < tokens {
            let next = token_written(&fake, k + 1);
            assert!(arrived < next, "event {k} arrived only after event {} was written", k + 1);
        }
    }
    let (done, _) = stream.next_sse_data(WAIT).expect("[DONE]");
    assert_eq!(done, "[DONE]");
    assert!(stream.next_chunk(WAIT).is_none());
    assert!(stream.ended_cleanly());
}

/// The fake is deterministic (fixed timestamps and ids), so a stream through butler must equal
/// the stream straight from the fake, byte for byte.
#[test]
fn streamed_bodies_are_byte_identical_to_direct() {
    let fake = FakeOllama::start_with(Behavior { tokens: 200, ..Behavior::default() });
    let butler = start(&fake, "");
    let sse_usage = json!({"model": "qwen2.5:7b", "stream": true,
                           "stream_options": {"include_usage": true},
                           "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
    .into_bytes();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("/api/chat", chat_body(None), "application/x-ndjson"),
        (
            "/api/generate",
            br#"{"model":"llama3.2","prompt":"hi"}"#.to_vec(),
            "application/x-ndjson",
        ),
        ("/v1/chat/completions", chat_body(Some(true)), "text/event-stream"),
        ("/v1/chat/completions", sse_usage, "text/event-stream"),
        (
            "/v1/completions",
            br#"{"model":"m","prompt":"p","stream":true}"#.to_vec(),
            "text/event-stream",
        ),
    ];
    for (path, body, content_type) in cases {
        let direct = request(fake.addr(), "POST", path, &[], &body);
        assert_eq!(direct.status, 200);
        assert!(direct.complete);

        let mut stream = open(butler.addr(), path, &body);
        assert_eq!(stream.status, 200, "{path}");
        assert_eq!(stream.header("content-type"), Some(content_type), "{path}");
        assert_eq!(stream.framing, Framing::Chunked, "{path}");
        let through = stream.read_to_end(WAIT);
        assert!(stream.ended_cleanly(), "{path}");
        assert!(
            through == direct.body,
            "{path}: body differs\n through butler: {:?}\n direct: {:?}",
            String::from_utf8_lossy(&through),
            direct.body_str()
        );
    }
}

#[test]
fn non_streamed_responses_keep_content_length() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();
    let cases: [(&str, Vec<u8>); 3] = [
        ("/api/chat", chat_body(Some(false))),
        ("/v1/chat/completions", chat_body(None)),
        ("/api/embed", br#"{"model":"m","input":["a","b"]}"#.to_vec()),
    ];
    for (path, body) in cases {
        let direct = request(fake.addr(), "POST", path, &[], &body);
        assert_eq!(direct.framing, Framing::Length(direct.body.len() as u64), "{path}");
        let through = request(butler.addr(), "POST", path, &[("Authorization", &auth)], &body);
        assert_eq!(through.status, 200, "{path}");
        assert_eq!(through.framing, Framing::Length(direct.body.len() as u64), "{path}");
        assert!(through.headers_named("transfer-encoding").is_empty(), "{path}");
        assert_eq!(through.body, direct.body, "{path}");
        assert_eq!(through.header("content-type"), direct.header("content-type"), "{path}");
    }
}

/// `workers: 1`, so the follow-up request runs on the very thread whose upstream was cut.
#[test]
fn client_hanging_up_mid_stream_cuts_the_upstream_at_once() {
    let fake = FakeOllama::start_with(Behavior {
        first_token_delay: Some(Duration::ZERO),
        token_delay: Duration::from_secs(5),
        tokens: 3,
        ..Behavior::default()
    });
    let butler = start(&fake, "workers: 1\n");
    let mut stream = open(butler.addr(), "/api/chat", &chat_body(None));
    let (first, _) = stream.next_json_line(WAIT).expect("first token");
    assert_eq!(first["message"]["content"], "tok0");

    // The fake now pauses 5 s before token 1; butler is blocked reading the upstream and has
    // nothing to write, so only watching the client socket can notice the hang-up.
    let left = Instant::now();
    stream.disconnect();
    let gone = fake.wait_client_gone(WAIT).expect("butler never hung up on the upstream");
    let after = gone.saturating_duration_since(left);
    assert!(after < Duration::from_secs(1), "upstream closed {after:?} after the client left");
    let written: Vec<usize> = fake
        .event_log()
        .iter()
        .filter_map(|e| match e {
            Event::TokenWritten { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(written, [0]);

    // The worker (and its upstream client) recovered.
    let next = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(next.status, 200, "{}", next.body_str());
}

#[test]
fn client_hanging_up_before_the_first_byte_cuts_the_upstream_at_once() {
    let fake = FakeOllama::start_with(Behavior {
        first_byte_delay: Duration::from_secs(5),
        ..Behavior::default()
    });
    let butler = start(&fake, "workers: 1\n");
    let mut conn = RawConn::connect(butler.addr());
    conn.send_request("POST", "/api/chat", &[("Authorization", &bearer())], &chat_body(None))
        .unwrap();
    assert!(fake.wait_for_requests(1, WAIT), "request never reached the fake");
    let left = Instant::now();
    drop(conn);
    let gone = fake.wait_client_gone(WAIT).expect("butler never hung up on the upstream");
    let after = gone.saturating_duration_since(left);
    assert!(after < Duration::from_secs(1), "upstream closed {after:?} after the client left");
    assert!(
        !fake.event_log().iter().any(|e| matches!(e, Event::ResponseStarted { .. })),
        "the fake answered although butler should have hung up"
    );

    fake.update_behavior(|b| b.first_byte_delay = Duration::ZERO);
    let next = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(next.status, 200, "{}", next.body_str());
}

#[test]
fn upstream_dying_mid_stream_truncates_the_response() {
    let fake = FakeOllama::start_with(Behavior {
        tokens: 5,
        drop_after_tokens: Some(2),
        ..Behavior::default()
    });
    let butler = start(&fake, "");
    for path in ["/api/chat", "/v1/chat/completions"] {
        let mut stream = open(butler.addr(), path, &chat_body(Some(true)));
        assert_eq!(stream.status, 200, "{path}");
        let mut body = Vec::new();
        while let Some((piece, _)) = stream.next_chunk(WAIT) {
            body.extend_from_slice(&piece);
        }
        assert!(!stream.timed_out(), "{path}: stream neither ended nor was cut");
        assert_eq!(stream.end(), Some(StreamEnd::Truncated), "{path}");
        let text = String::from_utf8(body).unwrap();
        let contents: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l.strip_prefix("data: ").unwrap_or(l))
                    .unwrap_or_else(|e| panic!("{path}: bad line {l:?}: {e}"));
                v.pointer("/message/content")
                    .or_else(|| v.pointer("/choices/0/delta/content"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(contents, ["tok0", "tok1"], "{path}: {text:?}");
    }
    // butler itself is fine.
    let next = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(next.status, 200);
}
