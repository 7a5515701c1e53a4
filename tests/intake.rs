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
    // Everything here comes from 127.0.0.1: lift the per-address cap (it has its own test).
    let butler = start(&fake, "workers: 4\nmax_connections_per_ip: 1000\n");
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

// ---------------------------------------------------------------------------------------------
// Clients without a key hold no worker and no connection slot (SPEC §5, §11)
// ---------------------------------------------------------------------------------------------

/// The head of a request declaring a 60000-byte body, and the body's first byte.
fn dripping(method: &str, path: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{{")
}

/// A request butler answers without reading its body (a refusal, a public route) is answered
/// at once with `Connection: close`, however slowly the body comes: a client without a key
/// cannot hold a worker by dripping it.
#[test]
fn requests_answered_without_their_body_never_wait_for_it() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "workers: 2\n");
    let cases = [
        ("POST", "/api/chat", 401),
        ("POST", "/api/pull", 401),
        ("GET", "/healthz", 200),
        ("POST", "/readyz", 405),
        // No users configured: 404.
        ("POST", "/auth/login", 404),
    ];
    let mut drippers = Vec::new();
    for (method, path, status) in cases {
        let mut conn = RawConn::connect(butler.addr());
        conn.write(dripping(method, path).as_bytes()).unwrap();
        let response = conn.read_response(method, WAIT).unwrap_or_else(|e| {
            panic!("{method} {path}: no answer while the body is incomplete: {e}")
        });
        assert_eq!(response.status, status, "{method} {path}: {}", response.body_str());
        assert!(response.connection_close(), "{method} {path}: {:?}", response.headers);
        assert!(conn.wait_closed(WAIT), "{method} {path}: butler kept the connection");
        drippers.push(conn);
    }
    // The clients keep dripping (butler discards it) and a client with a key is served by
    // one of the two workers.
    for d in &mut drippers {
        let _ = d.write(b" ");
    }
    let response = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(response.status, 200, "{}", response.body_str());
    // The health check asked the upstream; nothing else reached it.
    let paths: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/api/version", "/api/tags"]);

    // A body that has arrived whole is discarded and the connection kept.
    let mut conn = RawConn::connect(butler.addr());
    let refused = conn.roundtrip("POST", "/api/chat", &[], b"{\"model\":\"x\"}");
    assert_error(&refused, 401, "unauthorized");
    assert!(!refused.connection_close(), "{:?}", refused.headers);
    let next = conn.roundtrip("GET", "/api/version", &[("Authorization", &bearer())], b"");
    assert_eq!(next.status, 200);
}

/// A stub of butler's users section: user `u` with password [`LOGIN_PW`] (bcrypt cost 4).
const LOGIN_PW: &str = "login-Pw-3d9fQz-hardening";

fn with_login(extra: &str) -> String {
    let hash = bcrypt::hash(LOGIN_PW, 4).expect("bcrypt");
    format!(
        "{extra}auth:\n  mode: either\n  jwt_secret: \"0123456789abcdef0123456789abcdef\"\n  \
         login_rate_limit: \"1000/min\"\nusers:\n  - name: u\n    password_hash: \"{hash}\"\n    \
         allow_models: [\"*\"]\n"
    )
}

fn login_request(body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut raw = format!(
        "POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// `/auth/login` reads a body before anyone is authenticated: it must arrive whole within
/// `timeouts.request_header` of its head (a total deadline, however steadily it drips), else
/// 408 and close; and while it arrives, no worker waits for it. Bodies up to 64 KiB are fine.
#[test]
fn a_login_body_must_arrive_whole_in_time_and_holds_no_worker() {
    let fake = FakeOllama::start();
    let butler = start(&fake, &with_login("workers: 1\ntimeouts: {request_header: 1s}\n"));
    let credentials = format!("{{\"username\":\"u\",\"password\":\"{LOGIN_PW}\"}}");

    // Sent with the head: everything up to the body's first byte.
    let raw = login_request(credentials.as_bytes(), "");
    let body_at = raw.len() - credentials.len();
    let mut drip = RawConn::connect(butler.addr());
    let head_sent = Instant::now();
    drip.write(&raw[..body_at + 1]).unwrap();
    // One byte every 100 ms: never a long pause, yet never done in time.
    let mut next = body_at + 1;
    let mut served = None;
    let response = loop {
        if served.is_none() && next == body_at + 5 {
            // Half-way, the only worker is free for a client with a key.
            served = Some(get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]));
        }
        match drip.read_response("POST", Duration::from_millis(100)) {
            Ok(r) => break r,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("no 408: {e}"),
        }
        assert!(head_sent.elapsed() < Duration::from_secs(4), "no answer to a dripping login");
        if next < raw.len() - 1 {
            drip.write(&raw[next..next + 1]).unwrap();
            next += 1;
        }
    };
    let took = head_sent.elapsed();
    let served = served.expect("the client with a key had its turn");
    assert_eq!(served.status, 200, "{}", served.body_str());
    assert_error(&response, 408, "request timeout");
    assert!(response.connection_close());
    assert!(took >= Duration::from_millis(900), "408 after only {took:?}");
    assert!(took < Duration::from_millis(2500), "408 after {took:?}");
    assert!(drip.wait_closed(WAIT));

    // A login body over the old 4 KiB bound and within 64 KiB is read (JSON allows padding).
    let padded = format!("{credentials}{}", " ".repeat(60 * 1024));
    let ok = send_raw(butler.addr(), &login_request(padded.as_bytes(), "Connection: close\r\n"));
    assert_eq!(ok.status(), 200, "{}", ok.raw_str());
    assert!(ok.response().json()["token"].is_string());
    // With Expect: 100-continue the client is told to go on, then served.
    let mut conn = RawConn::connect(butler.addr());
    let raw = login_request(credentials.as_bytes(), "Expect: 100-continue\r\n");
    conn.write(&raw[..raw.len() - credentials.len()]).unwrap();
    let interim = conn.read_response("POST", WAIT).expect("100 Continue");
    assert_eq!(interim.status, 100);
    conn.write(credentials.as_bytes()).unwrap();
    let ok = conn.read_response("POST", WAIT).expect("the login answer");
    assert_eq!(ok.status, 200, "{}", ok.body_str());
    // Over 64 KiB: 413 at once, without waiting for the body.
    let mut conn = RawConn::connect(butler.addr());
    conn.write(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n{").unwrap();
    let response = conn.read_response("POST", WAIT).expect("413");
    assert_error(&response, 413, "request body too large");
    assert!(conn.wait_closed(WAIT));
    assert_eq!(fake.request_count(), 1);
}

/// Stalled heads cannot lock everyone out: with the connection table full (its size follows the
/// open-file limit), a new connection displaces the oldest one still sending its head.
#[test]
fn stalled_heads_cannot_fill_the_connection_table() {
    let fake = FakeOllama::start();
    // 200 open files and 2 workers: min(2 + 1024, 200 - 64 - 2 * 2) = 132 connections. The
    // per-address cap is lifted: everything here comes from 127.0.0.1.
    let yaml = support::setup::config(&fake.url(), "workers: 2\nmax_connections_per_ip: 1000\n");
    let butler = support::Butler::start_with_open_files(&yaml, 200);
    let mut stalled: Vec<RawConn> = (0..140)
        .map(|_| {
            let mut c = RawConn::connect(butler.addr());
            c.write(b"GET / HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    let sent = Instant::now();
    let response = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    let took = sent.elapsed();
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert!(took < Duration::from_secs(1), "served after {took:?}");
    // Eight stalled heads beyond the cap and the client with a key displaced the nine oldest,
    // which were told 503; the newest are still open.
    for (i, c) in stalled.iter_mut().enumerate().take(9) {
        let busy = c.read_response("GET", WAIT).unwrap_or_else(|e| panic!("stalled[{i}]: {e}"));
        assert_error(&busy, 503, "server busy");
        assert!(c.wait_closed(WAIT), "stalled[{i}] still open");
    }
    let newest = stalled.last_mut().expect("stalled connections");
    newest.stream().set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let still_open = matches!(
        std::io::Read::read(&mut newest.stream(), &mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    assert!(still_open, "the newest stalled head was closed");
}

/// One peer address may hold at most `max_connections_per_ip` connections; another one is
/// closed at once and counted. Other addresses are unaffected.
#[test]
fn one_address_holds_at_most_max_connections_per_ip() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "max_connections_per_ip: 3\n");
    let mut held: Vec<RawConn> = (0..3)
        .map(|_| {
            let mut c = RawConn::connect(butler.addr());
            c.write(b"GET / HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    let mut fourth = RawConn::connect(butler.addr());
    assert!(fourth.wait_closed(WAIT), "a fourth connection from 127.0.0.1 was kept");
    assert!(fourth.received().is_empty(), "{:?}", String::from_utf8_lossy(fourth.received()));

    let other = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut conn = RawConn::try_connect_from(other, butler.addr()).expect("connect from .2");
    let response = conn.roundtrip("GET", "/api/tags", &[("Authorization", &bearer())], b"");
    assert_eq!(response.status, 200);
    let metrics = conn.roundtrip("GET", "/metrics", &[], b"");
    let line = "butler_requests_rejected_total{client=\"\",reason=\"too_many_connections\"} 1\n";
    assert!(metrics.body_str().contains(line), "{}", metrics.body_str());

    // A slot given back is usable again (butler learns of the close asynchronously).
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = support::try_request(
            butler.addr(),
            "GET",
            "/api/version",
            &[("Authorization", &bearer())],
            b"",
        );
        match attempt {
            Ok(r) => {
                assert_eq!(r.status, 200);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never served again: {e}"),
        }
    }
}

/// A trusted proxy (Caddy in front) carries everyone's connections: no per-address cap.
#[test]
fn trusted_proxies_are_exempt_from_the_per_address_cap() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "max_connections_per_ip: 2\ntrusted_proxies: [\"127.0.0.1/32\"]\n");
    let _held: Vec<RawConn> = (0..4)
        .map(|_| {
            let mut c = RawConn::connect(butler.addr());
            c.write(b"GET / HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    let response = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_eq!(response.status, 200);
    // An untrusted address still is capped.
    let other = std::net::Ipv4Addr::new(127, 0, 0, 3);
    let _two: Vec<RawConn> =
        (0..2).map(|_| RawConn::try_connect_from(other, butler.addr()).unwrap()).collect();
    let mut third = RawConn::try_connect_from(other, butler.addr()).unwrap();
    assert!(third.wait_closed(WAIT), "a third connection from 127.0.0.3 was kept");
    assert!(third.received().is_empty());
}

/// Every response the intake writes itself declares exactly its body's length, so strict
/// clients (Python `requests`, curl) read it instead of failing with an incomplete read.
#[test]
fn every_canned_response_declares_its_exact_length() {
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(300),
        tokens: 5,
        ..Behavior::default()
    });
    let butler =
        start(&fake, &with_login("workers: 1\ntimeouts: {request_header: 500ms, queue: 300ms}\n"));
    let strict = |raw: &[u8]| {
        let mut conn = RawConn::connect(butler.addr());
        let _ = conn.write(raw);
        assert!(conn.wait_closed(WAIT), "not closed after {:?}", String::from_utf8_lossy(raw));
        support::parse_strict(conn.received()).unwrap_or_else(|e| panic!("{e}"))
    };
    let cases: [(Vec<u8>, u16, &str); 6] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(), 408, "request timeout"),
        (head_of_size(40 * 1024), 431, "request header fields too large"),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"
                .to_vec(),
            400,
            "bad request: repeated Content-Length",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: later\r\n\r\n".to_vec(), 417, "expectation failed"),
        (
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n".to_vec(),
            413,
            "request body too large",
        ),
        (
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{".to_vec(),
            408,
            "request timeout",
        ),
    ];
    for (raw, status, msg) in &cases {
        assert_error(&strict(raw), *status, msg);
    }

    // 503 server busy: the only worker is streaming.
    let auth = bearer();
    let mut slow = StreamingResponse::open(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &auth)],
        br#"{"model":"llama3.2"}"#,
    );
    assert_eq!(slow.status, 200);
    let busy = strict(&support::build_request(
        butler.addr(),
        "GET",
        "/api/tags",
        &[("Authorization", &auth)],
        b"",
        true,
    ));
    assert_error(&busy, 503, "server busy");
    slow.read_to_end(WAIT);
}
