//! Tests of the shared test-support code itself (no butler involved): if these fail, failures
//! elsewhere say nothing about the product.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    Behavior, Canned, Event, FakeOllama, Framing, LogLine, RawConn, StreamEnd, StreamingResponse,
    listening_addr, request, send_raw,
};

const WAIT: Duration = Duration::from_secs(5);

fn chat_body() -> Vec<u8> {
    json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

#[test]
fn ndjson_tokens_arrive_one_by_one() {
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(300),
        tokens: 3,
        ..Behavior::default()
    });
    let mut stream = StreamingResponse::open(fake.addr(), "POST", "/api/chat", &[], &chat_body());
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(stream.framing, Framing::Chunked);

    let mut arrivals = Vec::new();
    for k in 0..3 {
        let (data, at) = stream.next_chunk(WAIT).expect("token chunk");
        let line: serde_json::Value = serde_json::from_slice(&data).expect("NDJSON line");
        assert_eq!(line["message"]["content"], format!("tok{k}"));
        assert_eq!(line["done"], false);
        assert_eq!(line["model"], "llama3.2");
        let written = fake.wait_token(k, WAIT).expect("TokenWritten event");
        assert!(written <= at, "chunk {k} read before the fake wrote it");
        arrivals.push(at);
    }
    // Each chunk was read before the next token was written: nothing was held back.
    for (k, arrived) in arrivals.iter().enumerate().take(2) {
        let next_written = fake.wait_token(k + 1, WAIT).unwrap();
        assert!(*arrived < next_written, "chunk {k} arrived only with token {}", k + 1);
    }

    let (last, _) = stream.next_chunk(WAIT).expect("final object");
    let last: serde_json::Value = serde_json::from_slice(&last).unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["eval_count"], 3);
    assert_eq!(last["prompt_eval_count"], 5);
    assert!(stream.next_chunk(WAIT).is_none());
    assert!(stream.ended_cleanly());
}

#[test]
fn first_token_delay_replaces_token_delay_for_token_zero_only() {
    let fake = FakeOllama::start_with(Behavior {
        first_token_delay: Some(Duration::ZERO),
        token_delay: Duration::from_millis(300),
        tokens: 2,
        ..Behavior::default()
    });
    let mut stream = StreamingResponse::open(fake.addr(), "POST", "/api/chat", &[], &chat_body());
    let (first, _) = stream.next_json_line(WAIT).expect("token 0");
    assert_eq!(first["message"]["content"], "tok0");
    let started = fake
        .wait_event(|e| matches!(e, Event::ResponseStarted { .. }), WAIT)
        .expect("ResponseStarted")
        .at();
    let t0 = fake.wait_token(0, WAIT).unwrap();
    let t1 = fake.wait_token(1, WAIT).unwrap();
    assert!(t0.duration_since(started) < Duration::from_millis(250), "token 0 was delayed");
    assert!(t1.duration_since(t0) >= Duration::from_millis(300), "token 1 was not delayed");
    assert!(!stream.read_to_end(WAIT).is_empty(), "token 1 and the final object");
    assert!(stream.ended_cleanly());
}

#[test]
fn drop_after_tokens_truncates_the_stream() {
    let fake = FakeOllama::start_with(Behavior {
        tokens: 5,
        drop_after_tokens: Some(2),
        ..Behavior::default()
    });
    let mut stream = StreamingResponse::open(fake.addr(), "POST", "/api/generate", &[], b"{}");
    let mut lines = Vec::new();
    while let Some((line, _)) = stream.next_json_line(WAIT) {
        lines.push(line);
    }
    assert!(!stream.timed_out());
    let texts: Vec<_> = lines.iter().map(|l| l["response"].clone()).collect();
    assert_eq!(texts, [json!("tok0"), json!("tok1")]);
    assert_eq!(stream.end(), Some(StreamEnd::Truncated));
    assert!(!stream.ended_cleanly());
}

#[test]
fn stall_after_tokens_waits_for_the_client_to_leave() {
    let fake = FakeOllama::start_with(Behavior {
        tokens: 5,
        stall_after_tokens: Some(2),
        ..Behavior::default()
    });
    let mut stream = StreamingResponse::open(fake.addr(), "POST", "/api/generate", &[], b"{}");
    for k in 0..2 {
        let (line, _) = stream.next_json_line(WAIT).expect("token line");
        assert_eq!(line["response"], format!("tok{k}"));
    }
    assert!(fake.wait_token(1, WAIT).is_some());
    stream.disconnect();
    assert!(fake.wait_client_gone(WAIT).is_some());
    let written =
        fake.event_log().iter().filter(|e| matches!(e, Event::TokenWritten { .. })).count();
    assert_eq!(written, 2);
}

#[test]
fn client_disconnect_mid_stream_is_reported() {
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_secs(10),
        ..Behavior::default()
    });
    let stream = StreamingResponse::open(fake.addr(), "POST", "/api/chat", &[], &chat_body());
    assert_eq!(stream.status, 200);
    let left = Instant::now();
    stream.disconnect();
    let gone = fake.wait_client_gone(WAIT).expect("ClientGone");
    assert!(
        gone.duration_since(left) < Duration::from_secs(1),
        "ClientGone took {:?}",
        gone.duration_since(left)
    );
    assert!(fake.wait_event(|e| matches!(e, Event::ConnectionClosed { .. }), WAIT).is_some());
    assert!(
        !fake.event_log().iter().any(|e| matches!(e, Event::TokenWritten { .. })),
        "no token should have been written"
    );
    assert_eq!(fake.connections_open(), 0);
}

#[test]
fn client_disconnect_before_first_byte_is_reported() {
    let fake = FakeOllama::start_with(Behavior {
        first_byte_delay: Duration::from_secs(10),
        ..Behavior::default()
    });
    let mut conn = RawConn::connect(fake.addr());
    conn.send_request("POST", "/api/chat", &[], &chat_body()).unwrap();
    assert!(fake.wait_for_requests(1, WAIT));
    let left = Instant::now();
    drop(conn);
    let gone = fake.wait_client_gone(WAIT).expect("ClientGone");
    assert!(gone.duration_since(left) < Duration::from_secs(1));
    assert!(!fake.event_log().iter().any(|e| matches!(e, Event::ResponseStarted { .. })));
}

#[test]
fn first_byte_delay_delays_the_head() {
    let fake = FakeOllama::start_with(Behavior {
        first_byte_delay: Duration::from_millis(200),
        ..Behavior::default()
    });
    let sent = Instant::now();
    let stream = StreamingResponse::open(fake.addr(), "GET", "/api/version", &[], b"");
    assert!(stream.head_at.duration_since(sent) >= Duration::from_millis(200));
}

#[test]
fn requests_are_recorded_raw() {
    let fake = FakeOllama::start();
    let raw = b"GET /api/odd%2Fpath/../x?q=a%20b&r HTTP/1.1\r\nHost: example\r\n\
                X-Mixed-Case: One\r\nx-mixed-case: Two\r\nAuthorization: Bearer k\r\n\
                Connection: close\r\n\r\n";
    let response = send_raw(fake.addr(), raw);
    assert_eq!(response.status(), 404);
    assert_eq!(response.response().json(), json!({"error": "not found"}));

    let recorded = fake.last_request().expect("recorded");
    assert_eq!(recorded.method, "GET");
    assert_eq!(recorded.path, "/api/odd%2Fpath/../x");
    assert_eq!(recorded.query.as_deref(), Some("q=a%20b&r"));
    assert_eq!(recorded.target(), "/api/odd%2Fpath/../x?q=a%20b&r");
    let names: Vec<&str> = recorded.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["Host", "X-Mixed-Case", "x-mixed-case", "Authorization", "Connection"]);
    assert_eq!(recorded.header("X-MIXED-CASE"), Some("One"));
    assert_eq!(recorded.headers_named("x-mixed-case"), ["One", "Two"]);
    assert_eq!(recorded.header("authorization"), Some("Bearer k"));
    assert!(recorded.body.is_empty());
}

#[test]
fn chunked_request_bodies_are_decoded_and_connections_kept_alive() {
    let fake = FakeOllama::start();
    let mut conn = RawConn::connect(fake.addr());
    conn.write(
        b"POST /api/embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          9\r\n{\"input\":\r\n9;ext=1\r\n[\"a\",\"b\"]\r\n1\r\n}\r\n0\r\nTrailer: t\r\n\r\n",
    )
    .unwrap();
    let first = conn.read_response("POST", WAIT).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["embeddings"].as_array().unwrap().len(), 2);
    assert!(!first.connection_close());

    let second = conn.roundtrip("GET", "/api/tags", &[], b"");
    assert_eq!(second.status, 200);
    assert_eq!(second.framing, Framing::Length(second.body.len() as u64));
    let names: Vec<_> = second.json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["llama3.2:latest", "qwen2.5:7b"]);

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[0].chunked);
    assert_eq!(requests[0].body_str(), r#"{"input":["a","b"]}"#);
    assert_eq!(requests[0].conn, requests[1].conn);
    assert_eq!(fake.connections_accepted(), 1);
}

#[test]
fn expect_continue_is_answered() {
    let fake = FakeOllama::start();
    let mut conn = RawConn::connect(fake.addr());
    conn.write(
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
    )
    .unwrap();
    let interim = conn.read_response("POST", WAIT).unwrap();
    assert_eq!(interim.status, 100);
    conn.write(b"{}").unwrap();
    let last = conn.read_response("POST", WAIT).unwrap();
    assert_eq!(last.json(), json!({"status": "success"}));
}

#[test]
fn openai_sse_stream_with_usage() {
    let fake = FakeOllama::start_with(Behavior { tokens: 2, ..Behavior::default() });
    let body = json!({"model": "qwen2.5:7b", "stream": true,
                      "stream_options": {"include_usage": true}, "messages": []});
    let mut stream = StreamingResponse::open(
        fake.addr(),
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    );
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    while let Some((data, _)) = stream.next_sse_data(WAIT) {
        events.push(data);
    }
    assert!(stream.ended_cleanly());
    assert_eq!(events.len(), 4, "{events:?}");
    let first: serde_json::Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "tok0");
    let usage: serde_json::Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    );
    assert_eq!(events[3], "[DONE]");

    // Completions put a zero usage on every chunk and repeat the last one with the counts,
    // as Ollama does; `message_start` of `/v1/messages` can carry its own estimate.
    let body = json!({"model": "m", "prompt": "p", "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut stream = StreamingResponse::open(
        fake.addr(),
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    );
    let mut events = Vec::new();
    while let Some((data, _)) = stream.next_sse_data(WAIT) {
        events.push(data);
    }
    assert_eq!(events.len(), 4, "{events:?}");
    let zero = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
    for event in &events[..2] {
        let chunk: serde_json::Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["usage"], zero);
    }
    let last: serde_json::Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 7);
    fake.update_behavior(|b| b.message_start_input_tokens = Some(99));
    let mut stream = StreamingResponse::open(
        fake.addr(),
        "POST",
        "/v1/messages",
        &[],
        br#"{"model":"m","stream":true,"messages":[]}"#,
    );
    let (start, _) = stream.next_sse_data(WAIT).unwrap();
    let start: serde_json::Value = serde_json::from_str(&start).unwrap();
    assert_eq!(start["message"]["usage"]["input_tokens"], 99);

    // OpenAI's default is not to stream.
    let whole = request(fake.addr(), "POST", "/v1/chat/completions", &[], br#"{"model":"m"}"#);
    assert_eq!(whole.framing, Framing::Length(whole.body.len() as u64));
    assert_eq!(whole.json()["choices"][0]["message"]["content"], "tok0tok1");
}

#[test]
fn ollama_non_streamed_and_failures() {
    let fake = FakeOllama::start();
    let whole = request(fake.addr(), "POST", "/api/chat", &[], br#"{"model":"x","stream":false}"#);
    assert_eq!(whole.status, 200);
    let v = whole.json();
    assert_eq!(v["message"]["content"], "tok0tok1tok2");
    assert_eq!(v["done"], true);

    fake.update_behavior(|b| b.fail_status = Some(500));
    let failed = request(fake.addr(), "POST", "/api/generate", &[], b"{}");
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json(), json!({"error": "boom"}));
    let listing = request(fake.addr(), "GET", "/api/tags", &[], b"");
    assert_eq!(listing.status, 200);
}

#[test]
fn head_and_bodyless_responses_parse() {
    let fake = FakeOllama::start();
    let head = request(fake.addr(), "HEAD", "/", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("17"));
    assert!(head.body.is_empty());
    assert_eq!(head.framing, Framing::None);

    fake.set_route("DELETE", "/api/delete", Canned::new(204, "text/plain", b""));
    let none = request(fake.addr(), "DELETE", "/api/delete", &[], b"");
    assert_eq!(none.status, 204);
    assert_eq!(none.framing, Framing::None);

    // A test-framed canned response: close-delimited body.
    fake.set_route(
        "GET",
        "/close",
        Canned::new(200, "text/plain", b"until close").with_header("Transfer-Encoding", "identity"),
    );
    let closed = request(fake.addr(), "GET", "/close", &[], b"");
    assert_eq!(closed.framing, Framing::Close);
    assert_eq!(closed.body_str(), "until close");
    assert!(closed.complete);
}

#[test]
fn listening_line_is_recognised() {
    let json_line =
        |raw: &str| LogLine { raw: raw.to_string(), json: serde_json::from_str(raw).ok() };
    let line =
        json_line(r#"{"time":"t","level":"INFO","msg":"listening","addr":"127.0.0.1:43567"}"#);
    assert_eq!(listening_addr(&line), Some("127.0.0.1:43567".parse().unwrap()));
    let line = json_line(r#"{"msg":"listening","addr":"0.0.0.0:8080"}"#);
    assert_eq!(listening_addr(&line), Some("127.0.0.1:8080".parse().unwrap()));
    let line = json_line(r#"{"msg":"request","addr":"127.0.0.1:1"}"#);
    assert_eq!(listening_addr(&line), None);
    let line = json_line("07:00:00 [INFO] listening addr=127.0.0.1:9999");
    assert_eq!(listening_addr(&line), Some("127.0.0.1:9999".parse().unwrap()));
}

#[test]
fn early_response_is_read_despite_failed_body_write() {
    // A server that rejects a request on its head and closes without reading the body, as
    // butler does for an oversized Content-Length.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            std::io::Read::read_exact(&mut socket, &mut byte).unwrap();
            head.push(byte[0]);
        }
        let body = r#"{"error":"request body too large"}"#;
        let response = format!(
            "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut socket, response.as_bytes()).unwrap();
    });
    let response = request(addr, "POST", "/api/chat", &[], &vec![b'a'; 32 << 20]);
    server.join().unwrap();
    assert_eq!(response.status, 413);
    assert_eq!(response.json()["error"], "request body too large");
}

#[test]
fn strict_parse_wants_exactly_the_announced_length() {
    let ok = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 24\r\n\r\n{\"error\":\"server busy\"}\n";
    let r = support::parse_strict(ok).expect("exact length");
    assert_eq!((r.status, r.body.len()), (503, 24));
    let long = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 25\r\n\r\n{\"error\":\"server busy\"}\n";
    let err = support::parse_strict(long).expect_err("announces a byte more than it sends");
    assert!(err.contains("Content-Length 25 but 24"), "{err}");
    let short = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab";
    assert!(support::parse_strict(short).is_err(), "bytes after the body");
    let none = b"HTTP/1.1 200 OK\r\n\r\nab";
    assert!(support::parse_strict(none).is_err(), "no Content-Length");
    assert!(support::parse_strict(b"HTTP/1.1 200 OK\r\n").is_err(), "no complete head");
}
