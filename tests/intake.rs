//! butler's own HTTP/1.1 intake (SPEC §2, §11): size limits, strict framing, timeouts,
//! request targets, HTTP/1.0, keep-alive, pipelining, `Expect: 100-continue`, and the bounded
//! worker pool under connection floods.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::setup::{KEY, WAIT, assert_error, bearer, start};
use support::{Behavior, Event, FakeOllama, RawConn, Response, StreamingResponse, get, send_raw};

/// Writes `raw` on a fresh connection, reads one response, and checks that butler then closes
/// the connection.
#[track_caller]
fn refused_and_closed(addr: std::net::SocketAddr, raw: &[u8]) -> Response {
    let mut conn = RawConn::connect(addr);
    // A write error is fine: butler may refuse before reading everything.
    let _ = conn.write(raw);
    let response = conn.read_response("GET", WAIT).expect("a response before the close");
    assert!(response.connection_close(), "no Connection: close: {:?}", response.headers);
    assert!(conn.wait_closed(WAIT), "butler kept the connection open");
    response
}

/// A GET head of exactly `total` bytes, padded with one `X-Pad` header.
fn head_of_size(total: usize) -> Vec<u8> {
    let head = format!(
        "GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nX-Pad: {}\r\n\
         Connection: close\r\n\r\n",
        "a".repeat(pad_for(total))
    );
    assert_eq!(head.len(), total);
    head.into_bytes()
}

/// Length of the `X-Pad` value in [`head_of_size`]`(total)`.
fn pad_for(total: usize) -> usize {
    let fixed = "GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\nX-Pad: \r\n\
                 Connection: close\r\n\r\n";
    total - fixed.len() - KEY.len()
}

#[test]
fn heads_over_32_kib_get_431_and_close() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    for size in [32 * 1024 + 1, 40 * 1024, 200 * 1024] {
        let response = refused_and_closed(butler.addr(), &head_of_size(size));
        assert_error(&response, 431, "request header fields too large");
    }
    assert_eq!(fake.request_count(), 0);
    let after = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(after.status, 200);
}

/// A head of up to 32 KiB is within the limit (SPEC §11), so it must be forwarded.
#[test]
fn heads_up_to_32_kib_are_forwarded() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    for size in [16 * 1024, 17 * 1024, 24 * 1024, 32 * 1024] {
        let response = send_raw(butler.addr(), &head_of_size(size));
        assert_eq!(response.status(), 200, "a {size}-byte head: {}", response.raw_str());
        let seen = fake.last_request().expect("forwarded");
        assert_eq!(seen.header("x-pad").map(str::len), Some(pad_for(size)));
    }
    assert_eq!(fake.request_count(), 4);
}

fn head_with_headers(count: usize) -> Vec<u8> {
    // Host, Authorization and Connection, then fillers up to `count` header lines.
    let mut head = format!(
        "GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
    );
    for i in 0..count - 3 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

#[test]
fn more_than_100_headers_get_431() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let hundred = send_raw(butler.addr(), &head_with_headers(100));
    assert_eq!(hundred.status(), 200, "100 header lines are allowed");
    let response = refused_and_closed(butler.addr(), &head_with_headers(101));
    assert_error(&response, 431, "request header fields too large");
    assert_eq!(fake.request_count(), 1);
}

#[test]
fn ambiguous_framing_gets_400_and_close() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();
    let cases = [
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "bad request: Content-Length with Transfer-Encoding",
        ),
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
            ),
            "bad request: Content-Length with Transfer-Encoding",
        ),
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
            "bad request: repeated Content-Length",
        ),
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Content-Length: 2, 2\r\n\r\n{{}}"
            ),
            "bad request: invalid Content-Length",
        ),
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Content-Length: -1\r\n\r\n"
            ),
            "bad request: invalid Content-Length",
        ),
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
            ),
            "bad request: unsupported Transfer-Encoding",
        ),
        (
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "bad request: unsupported Transfer-Encoding",
        ),
    ];
    for (raw, msg) in &cases {
        let response = refused_and_closed(butler.addr(), raw.as_bytes());
        assert_error(&response, 400, msg);
    }
    assert_eq!(fake.request_count(), 0, "{:?}", fake.requests());
    assert!(!fake.event_log().iter().any(|e| matches!(e, Event::ConnectionOpened { .. })));
}

#[test]
fn malformed_chunked_body_gets_400() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let raw = format!(
        "PUT /api/blobs/sha256:1 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nnope\r\n0\r\n\r\n",
        bearer()
    );
    let response = refused_and_closed(butler.addr(), raw.as_bytes());
    assert_error(&response, 400, "bad request: malformed chunked body");
    assert_eq!(fake.request_count(), 0, "a broken body must not complete upstream");
}

#[test]
fn a_stalled_head_gets_408_and_close() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "timeouts: {request_header: 500ms}\n");
    let mut conn = RawConn::connect(butler.addr());
    let sent = Instant::now();
    conn.write(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let response = conn.read_response("GET", WAIT).expect("408");
    let took = sent.elapsed();
    assert_error(&response, 408, "request timeout");
    assert!(response.connection_close());
    assert!(took >= Duration::from_millis(450), "408 after only {took:?}");
    assert!(took < Duration::from_secs(3), "408 after {took:?}");
    assert!(conn.wait_closed(WAIT));
    assert_eq!(fake.request_count(), 0);

    // A connection that sends nothing at all is cut as well.
    let mut silent = RawConn::connect(butler.addr());
    let response = silent.read_response("GET", WAIT).expect("408 for a silent connection");
    assert_error(&response, 408, "request timeout");
    assert!(silent.wait_closed(WAIT));
}

#[test]
fn a_body_that_never_comes_gets_408_and_butler_lives_on() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "timeouts: {request_body: 500ms}\n");
    let mut conn = RawConn::connect(butler.addr());
    let sent = Instant::now();
    // A streamed (uninspected) route: the body would go straight to the upstream.
    conn.write(
        format!(
            "POST /api/blobs/sha256:abc HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
             Content-Length: 100000000000\r\n\r\n",
            bearer()
        )
        .as_bytes(),
    )
    .unwrap();
    let response = conn.read_response("POST", WAIT).expect("a response");
    let took = sent.elapsed();
    assert_error(&response, 408, "request timeout");
    assert!(response.connection_close());
    assert!(took >= Duration::from_millis(450), "408 after only {took:?}");
    assert!(conn.wait_closed(WAIT));
    assert_eq!(fake.request_count(), 0, "an incomplete body must not complete upstream");

    let next = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(next.status, 200);
    assert!(butler.is_running());

    // On an inspected route the declared length alone is refused (SPEC §7.3), at once.
    let mut conn = RawConn::connect(butler.addr());
    conn.write(
        format!(
            "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n",
            bearer()
        )
        .as_bytes(),
    )
    .unwrap();
    let response = conn.read_response("POST", WAIT).expect("a response");
    assert_error(&response, 413, "request body too large");
    assert!(conn.wait_closed(WAIT));
    assert_eq!(fake.request_count(), 1);
}

#[test]
fn unroutable_targets_get_400() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();
    let cases = [
        ("http://evil/api/tags", "bad request: request target must be an absolute path"),
        ("evil:80", "bad request: request target must be an absolute path"),
        ("/api/a%2Fb", "bad request: invalid path encoding"),
        ("/api/a%2fb", "bad request: invalid path encoding"),
        ("/api/%00", "bad request: invalid path encoding"),
        ("/api/%zz", "bad request: invalid path encoding"),
    ];
    for (target, msg) in cases {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n");
        let response = refused_and_closed(butler.addr(), raw.as_bytes());
        assert_error(&response, 400, msg);
    }
    assert_eq!(fake.request_count(), 0, "{:?}", fake.requests());
}

#[test]
fn http_10_without_host_is_served_and_closed() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let mut conn = RawConn::connect(butler.addr());
    conn.write(format!("GET / HTTP/1.0\r\nAuthorization: {}\r\n\r\n", bearer()).as_bytes())
        .unwrap();
    let response = conn.read_response("GET", WAIT).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_str(), "Ollama is running");
    assert!(response.connection_close(), "{:?}", response.headers);
    assert!(conn.wait_closed(WAIT));
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.headers_named("host"), [fake.addr().to_string().as_str()]);

    // HTTP/1.1 without Host is not allowed.
    let raw = format!("GET / HTTP/1.1\r\nAuthorization: {}\r\n\r\n", bearer());
    let response = refused_and_closed(butler.addr(), raw.as_bytes());
    assert_error(&response, 400, "bad request: exactly one Host header is required");
    assert_eq!(fake.request_count(), 1);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();
    let mut conn = RawConn::connect(butler.addr());
    let first = conn.roundtrip("GET", "/api/tags", &[("Authorization", &auth)], b"");
    assert_eq!(first.status, 200);
    assert!(!first.connection_close());
    let second = conn.roundtrip(
        "POST",
        "/api/chat",
        &[("Authorization", &auth)],
        br#"{"model":"llama3.2","stream":false}"#,
    );
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["message"]["content"], "tok0tok1tok2");
    let third = conn.roundtrip("GET", "/api/version", &[("Authorization", &auth)], b"");
    assert_eq!(third.body_str(), r#"{"version":"0.12.0"}"#);
    let paths: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/api/tags", "/api/chat", "/api/version"]);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();
    let mut conn = RawConn::connect(butler.addr());
    let body = r#"{"model":"llama3.2","stream":false}"#;
    let pipelined = format!(
        "GET /api/version HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n\
         POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}\
         GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write(pipelined.as_bytes()).unwrap();
    let first = conn.read_response("GET", WAIT).unwrap();
    assert_eq!(first.body_str(), r#"{"version":"0.12.0"}"#);
    let second = conn.read_response("POST", WAIT).unwrap();
    assert_eq!(second.json()["message"]["content"], "tok0tok1tok2");
    let third = conn.read_response("GET", WAIT).unwrap();
    assert_eq!(third.status, 200);
    assert!(third.json()["models"].is_array());
    assert!(third.connection_close());
    assert!(conn.wait_closed(WAIT));
    let paths: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/api/version", "/api/chat", "/api/tags"]);
}

#[test]
fn expect_100_continue_is_honoured() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let body = br#"{"model":"llama3.2"}"#;
    let mut conn = RawConn::connect(butler.addr());
    conn.write(
        format!(
            "POST /api/show HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            bearer(),
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let interim = conn.read_response("POST", WAIT).expect("100 Continue");
    assert_eq!(interim.status, 100);
    assert_eq!(fake.request_count(), 0, "forwarded before the body was sent");
    conn.write(body).unwrap();
    let last = conn.read_response("POST", WAIT).unwrap();
    assert_eq!(last.status, 200);
    assert_eq!(last.body_str(), r#"{"status":"success"}"#);
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.body, body);
    assert!(seen.headers_named("expect").is_empty(), "{:?}", seen.headers);

    // The connection is still usable.
    let next = conn.roundtrip("GET", "/api/tags", &[("Authorization", &bearer())], b"");
    assert_eq!(next.status, 200);

    // A 401 is sent without asking for the body.
    let mut conn = RawConn::connect(butler.addr());
    conn.write(
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n",
    )
    .unwrap();
    let refused = conn.read_response("POST", WAIT).unwrap();
    assert_error(&refused, 401, "unauthorized");
}

#[test]
fn idle_and_half_open_connections_do_not_starve_workers() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "workers: 4\n");
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(butler.addr()).expect("connect"));
    }
    for _ in 0..50 {
        let mut s = TcpStream::connect(butler.addr()).expect("connect");
        s.write_all(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Le").unwrap();
        idle.push(s);
    }
    let sent = Instant::now();
    let response = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    let took = sent.elapsed();
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert!(took < Duration::from_secs(2), "served after {took:?}");
    // And again, on a kept-alive connection.
    let mut conn = RawConn::connect(butler.addr());
    for _ in 0..3 {
        let r = conn.roundtrip("GET", "/api/version", &[("Authorization", &bearer())], b"");
        assert_eq!(r.status, 200);
    }
    drop(idle);
    let response = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(response.status, 200);
}

#[test]
fn a_full_worker_pool_answers_503_after_the_queue_timeout() {
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(300),
        tokens: 5,
        ..Behavior::default()
    });
    let butler = start(&fake, "workers: 1\ntimeouts: {queue: 300ms}\n");
    let auth = bearer();
    let mut slow = StreamingResponse::open(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &auth)],
        br#"{"model":"llama3.2"}"#,
    );
    assert_eq!(slow.status, 200);

    let sent = Instant::now();
    let busy = get(butler.addr(), "/api/tags", &[("Authorization", &auth)]);
    let took = sent.elapsed();
    assert_error(&busy, 503, "server busy");
    assert!(busy.connection_close());
    assert!(took >= Duration::from_millis(250), "503 after only {took:?}");
    assert!(took < Duration::from_millis(1200), "503 after {took:?}");

    // The stream that held the worker was not disturbed.
    let mut tokens = 0;
    while let Some((line, _)) = slow.next_json_line(WAIT) {
        if line["done"] == false {
            tokens += 1;
        }
    }
    assert!(slow.ended_cleanly());
    assert_eq!(tokens, 5);

    let after = get(butler.addr(), "/api/tags", &[("Authorization", &auth)]);
    assert_eq!(after.status, 200);
    let paths: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/api/chat", "/api/tags"], "the refused request must not be forwarded");
}

/// A burst of connections that arrive together must each get a worker, even while every
/// client keeps its connection busy: nobody waits into a 503. (The bench once hit a race
/// here, where two back-to-back dispatches both counted on the same idle worker; on an idle
/// machine the worker usually wakes in time, so this guards the behaviour, not the timing.)
#[test]
fn simultaneous_connections_each_get_a_worker() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "workers: 64\ntimeouts: {queue: 300ms}\n");
    let auth = bearer();
    let headers = [("Authorization", auth.as_str())];
    for _round in 0..3 {
        // One worker exists and is idle once this connection is closed and handed back.
        assert_eq!(get(butler.addr(), "/api/tags", &headers).status, 200);
        let mut conns: Vec<RawConn> = (0..32).map(|_| RawConn::connect(butler.addr())).collect();
        for c in &mut conns {
            c.send_request("GET", "/api/tags", &headers, b"").expect("send");
        }
        // Every client keeps its connection busy for longer than the queue timeout.
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until {
            for c in &mut conns {
                let response = c.read_response("GET", WAIT).expect("response");
                assert_eq!(response.status, 200, "{}", response.body_str());
                c.send_request("GET", "/api/tags", &headers, b"").expect("send");
            }
        }
        for c in &mut conns {
            assert_eq!(c.read_response("GET", WAIT).expect("response").status, 200);
        }
    }
}
