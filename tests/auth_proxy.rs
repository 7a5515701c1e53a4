//! Authentication (SPEC §5), forwarding (§8), public routes (§6, §10) and upstream failures,
//! tested against the real binary in front of a fake Ollama.

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::setup::{KEY, KEY2, WAIT, assert_error, bearer, config, error_body, start};
use support::{
    Behavior, Butler, Canned, FakeOllama, Framing, RawConn, Recorded, get, request, send_raw,
    unused_addr,
};

fn basic(user: &str, password: &str) -> String {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}").as_bytes());
    format!("Basic {token}")
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A request id butler generated: 1–128 of `[A-Za-z0-9._-]`.
fn is_valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What every forwarded request must look like upstream (SPEC §8).
#[track_caller]
fn assert_forwarded_headers(seen: &Recorded, fake: &FakeOllama, response_id: &str) {
    for dropped in ["authorization", "x-api-key", "cookie", "proxy-authorization"] {
        assert!(seen.headers_named(dropped).is_empty(), "{dropped} reached upstream: {seen:?}");
    }
    assert_eq!(seen.headers_named("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.headers_named("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.headers_named("x-request-id"), [response_id]);
    assert_eq!(seen.headers_named("host"), [fake.addr().to_string().as_str()]);
}

#[test]
fn each_credential_form_is_accepted_and_stripped_before_forwarding() {
    let fake = FakeOllama::start();
    let direct = get(fake.addr(), "/api/tags", &[]);
    assert_eq!(direct.status, 200);
    fake.clear_requests();
    let butler = start(&fake, "");

    let bearer_lower = format!("bearer {KEY2}");
    let basic_auth = basic("anyuser", KEY);
    let forms: [(&str, &str, &str); 4] = [
        ("Authorization", &bearer(), "c1"),
        ("Authorization", &bearer_lower, "c2"),
        ("x-api-key", KEY2, "c2"),
        ("Authorization", &basic_auth, "c1"),
    ];
    for (i, (name, value, client)) in forms.into_iter().enumerate() {
        let before = fake.request_count();
        let response = get(
            butler.addr(),
            "/api/tags",
            &[
                (name, value),
                ("Cookie", "session=secret-cookie"),
                ("Proxy-Authorization", "Basic cHJveHk6cGFzcw=="),
            ],
        );
        assert_eq!(response.status, 200, "{name}: {value}: {}", response.body_str());
        assert_eq!(response.body, direct.body, "{name}: {value}");
        assert_eq!(response.header("content-type"), Some("application/json; charset=utf-8"));
        assert_eq!(fake.request_count(), before + 1);
        let seen = fake.last_request().expect("forwarded request");
        assert_eq!((seen.method.as_str(), seen.target().as_str()), ("GET", "/api/tags"));
        let id = response.header("x-request-id").expect("X-Request-Id on the response");
        assert_forwarded_headers(&seen, &fake, id);

        // The audit line names the client the key belongs to.
        let line = butler
            .wait_log(|v| v["msg"] == "response" && v["request_id"] == id, WAIT)
            .unwrap_or_else(|| panic!("no response log for form {i}\n{}", butler.output()));
        assert_eq!(line["client"], client, "form {i}");
    }
}

#[test]
fn bad_credentials_get_401_and_never_reach_upstream() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let wrong_bearer = "Bearer sk-not-a-configured-key";
    let basic_wrong = basic("anyuser", "sk-not-a-configured-key");
    let basic_key_as_user = basic(KEY, "");
    let two_keys_bearer = bearer();
    let query_key = format!("/api/tags?key={KEY}");
    let query_api_key = format!("/api/tags?api_key={KEY}&authorization=Bearer%20{KEY}");
    let cookie_key = format!("api_key={KEY}");
    let token_scheme = format!("Token {KEY}");
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        ("no credentials", "/api/tags".into(), vec![]),
        ("wrong bearer", "/api/tags".into(), vec![("Authorization", wrong_bearer)]),
        ("bearer without token", "/api/tags".into(), vec![("Authorization", "Bearer ")]),
        ("bearer alone", "/api/tags".into(), vec![("Authorization", "Bearer")]),
        ("unknown scheme", "/api/tags".into(), vec![("Authorization", &token_scheme)]),
        ("wrong x-api-key", "/api/tags".into(), vec![("x-api-key", "sk-nope")]),
        ("empty x-api-key", "/api/tags".into(), vec![("x-api-key", "")]),
        ("wrong basic password", "/api/tags".into(), vec![("Authorization", &basic_wrong)]),
        ("key as basic user", "/api/tags".into(), vec![("Authorization", &basic_key_as_user)]),
        ("key in query", query_key, vec![]),
        ("keys in query", query_api_key, vec![]),
        ("key in cookie", "/api/tags".into(), vec![("Cookie", &cookie_key)]),
        (
            "two different valid keys",
            "/api/tags".into(),
            vec![("Authorization", &two_keys_bearer), ("x-api-key", KEY2)],
        ),
        (
            "a valid and a wrong key",
            "/api/tags".into(),
            vec![("Authorization", &two_keys_bearer), ("x-api-key", "sk-nope")],
        ),
    ];
    for (what, path, headers) in &cases {
        let response = get(butler.addr(), path, headers);
        assert_eq!(response.status, 401, "{what}: {}", response.body_str());
        assert_error(&response, 401, "unauthorized");
    }
    // Inference routes and POST bodies are refused the same way, before anything is forwarded.
    let response = request(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("x-api-key", "sk-nope"), ("X-Request-Id", "last-401")],
        br#"{"model":"llama3.2","messages":[]}"#,
    );
    assert_error(&response, 401, "unauthorized");
    assert_eq!(fake.request_count(), 0, "{:?}", fake.requests());

    // Each refusal is logged; lines arrive in order, so once the last is in, all are.
    butler
        .wait_log(|v| v["request_id"] == "last-401" && v["reason"] == "unauthorized", WAIT)
        .unwrap_or_else(|| panic!("no WARN line for the last 401\n{}", butler.output()));
    let warn = butler.logs().into_iter().filter(|v| v["reason"] == "unauthorized").count();
    assert_eq!(warn, cases.len() + 1, "{}", butler.output());
}

#[test]
fn key_sha256_clients_authenticate() {
    let fake = FakeOllama::start();
    let key = "sk-digest-only-6b1f0c9e";
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"{}\"\nclients:\n  - name: hashed\n    \
         key_sha256: \"{}\"\n",
        fake.url(),
        sha256_hex(key.as_bytes())
    );
    let butler = Butler::start(&yaml);
    let ok = get(butler.addr(), "/api/tags", &[("Authorization", &format!("Bearer {key}"))]);
    assert_eq!(ok.status, 200, "{}", ok.body_str());
    assert_eq!(fake.request_count(), 1);
    // The digest itself is not a key.
    let digest = sha256_hex(key.as_bytes());
    let refused =
        get(butler.addr(), "/api/tags", &[("Authorization", &format!("Bearer {digest}"))]);
    assert_error(&refused, 401, "unauthorized");
    assert_eq!(fake.request_count(), 1);
}

#[test]
fn request_ids_are_kept_when_valid_and_replaced_otherwise() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();

    let kept =
        get(butler.addr(), "/api/tags", &[("Authorization", &auth), ("X-Request-Id", "abc-123")]);
    assert_eq!(kept.status, 200);
    assert_eq!(kept.headers_named("x-request-id"), ["abc-123"]);
    assert_eq!(fake.last_request().unwrap().headers_named("x-request-id"), ["abc-123"]);

    let long_ok = "A.b_c-9".repeat(18); // 126 characters
    let kept =
        get(butler.addr(), "/api/tags", &[("Authorization", &auth), ("X-Request-Id", &long_ok)]);
    assert_eq!(kept.headers_named("x-request-id"), [long_ok.as_str()]);

    let too_long = "a".repeat(129);
    let mut generated = Vec::new();
    for given in ["bad id!", "x\"y", too_long.as_str(), ""] {
        let response =
            get(butler.addr(), "/api/tags", &[("Authorization", &auth), ("X-Request-Id", given)]);
        assert_eq!(response.status, 200);
        let ids = response.headers_named("x-request-id");
        assert_eq!(ids.len(), 1, "{:?}", response.headers);
        let id = ids[0].to_string();
        assert_ne!(id, given);
        assert!(is_valid_request_id(&id), "{id:?}");
        assert_eq!(fake.last_request().unwrap().headers_named("x-request-id"), [id.as_str()]);
        generated.push(id);
    }
    let none = get(butler.addr(), "/api/tags", &[("Authorization", &auth)]);
    let id = none.header("x-request-id").expect("generated id").to_string();
    assert!(is_valid_request_id(&id), "{id:?}");
    generated.push(id);
    let mut unique = generated.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), generated.len(), "ids repeat: {generated:?}");
}

#[test]
fn hop_by_hop_and_spoofed_forwarding_headers_are_not_passed_on() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let response = get(
        butler.addr(),
        "/api/tags",
        &[
            ("Authorization", &bearer()),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "do-not-forward"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Kept", "yes"),
            ("User-Agent", "tests/1.0"),
        ],
    );
    assert_eq!(response.status, 200);
    let seen = fake.last_request().unwrap();
    for dropped in ["x-secret", "keep-alive", "proxy-connection", "te"] {
        assert!(seen.headers_named(dropped).is_empty(), "{dropped} forwarded: {:?}", seen.headers);
    }
    assert!(
        seen.headers_named("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-secret")),
        "{:?}",
        seen.headers
    );
    // From an untrusted peer, X-Forwarded-For is just the peer (SPEC §8).
    assert_eq!(seen.headers_named("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.headers_named("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.headers_named("x-kept"), ["yes"]);
    assert_eq!(seen.headers_named("user-agent"), ["tests/1.0"]);
}

#[test]
fn method_raw_path_and_query_are_forwarded_as_received() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();
    let cases = [
        ("POST", "/api/%70ull?name=a%20b&flag", "/api/%70ull", Some("name=a%20b&flag"), 404),
        ("POST", "/api/show?x=%2F", "/api/show", Some("x=%2F"), 200),
        ("PUT", "/api/blobs/sha256:abc", "/api/blobs/sha256:abc", None, 201),
        ("DELETE", "/api/delete", "/api/delete", None, 200),
        ("PATCH", "/api/tags?", "/api/tags", Some(""), 200),
        ("HEAD", "/", "/", None, 200),
        ("GET", "/v1/models/llama3.2%3Alatest", "/v1/models/llama3.2%3Alatest", None, 404),
    ];
    // The fake routes on the raw path, so the statuses show what it was asked for. Bodies name
    // a model so that inspected routes pass policy.
    for (method, target, path, query, status) in cases {
        let body: &[u8] = if matches!(method, "GET" | "HEAD") { b"" } else { br#"{"model":"m"}"# };
        let response = request(butler.addr(), method, target, &[("Authorization", &auth)], body);
        assert_eq!(response.status, status, "{method} {target}: {}", response.body_str());
        let seen = fake.last_request().unwrap();
        assert_eq!(seen.method, method, "{target}");
        assert_eq!(seen.path, path, "{method} {target}");
        assert_eq!(seen.query.as_deref(), query, "{method} {target}");
    }
    assert_eq!(fake.request_count(), cases.len());

    // HEAD: the upstream's Content-Length is announced and no body follows (a stray body
    // would be read as the next response on this kept-alive connection).
    let mut conn = RawConn::connect(butler.addr());
    let head = conn.roundtrip("HEAD", "/", &[("Authorization", &auth)], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.headers_named("content-length"), ["17"]);
    let next = conn.roundtrip("GET", "/api/version", &[("Authorization", &auth)], b"");
    assert_eq!(next.body_str(), r#"{"version":"0.12.0"}"#);
}

#[test]
fn upstream_base_path_is_joined() {
    let fake =
        FakeOllama::start_with(Behavior { path_prefix: "/base".into(), ..Behavior::default() });
    let direct = get(fake.addr(), "/base/api/tags", &[]);
    assert_eq!(direct.status, 200);
    let butler = Butler::start(&config(&format!("{}/base", fake.url()), ""));
    let response = get(butler.addr(), "/api/tags?x=1", &[("Authorization", &bearer())]);
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert_eq!(response.body, direct.body);
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.path, "/base/api/tags");
    assert_eq!(seen.query.as_deref(), Some("x=1"));

    let chat = request(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &bearer())],
        br#"{"model":"llama3.2","stream":false}"#,
    );
    assert_eq!(chat.status, 200);
    assert_eq!(chat.json()["message"]["content"], "tok0tok1tok2");
    assert_eq!(fake.last_request().unwrap().path, "/base/api/chat");
}

#[test]
fn request_bodies_arrive_intact() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let auth = bearer();

    // Content-Length: every byte value, 100 KiB.
    let body: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let response = request(
        butler.addr(),
        "PUT",
        "/api/blobs/sha256:0123",
        &[("Authorization", &auth), ("Content-Type", "application/octet-stream")],
        &body,
    );
    assert_eq!(response.status, 201, "{}", response.body_str());
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.body_len, body.len() as u64);
    assert!(seen.body == body, "Content-Length body changed on the way");
    assert_eq!(seen.headers_named("content-length"), [body.len().to_string().as_str()]);
    assert_eq!(seen.headers_named("content-type"), ["application/octet-stream"]);

    // Chunked, with a chunk extension and a trailer.
    let pieces: [&[u8]; 4] = [b"{\"model\":", b"\"llama3.2\",\r\n", &[0, 255, 10, 13], b"}"];
    let mut raw = format!(
        "POST /api/blobs/sha256:4567 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let mut expected = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if i == 1 {
            raw.extend_from_slice(format!("{:X};ext=1\r\n", piece.len()).as_bytes());
        } else {
            raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        }
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
        expected.extend_from_slice(piece);
    }
    raw.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    let response = send_raw(butler.addr(), &raw);
    assert_eq!(response.status(), 201, "{}", response.raw_str());
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.path, "/api/blobs/sha256:4567");
    assert_eq!(seen.body, expected);
    assert_eq!(fake.request_count(), 2);
}

#[test]
fn healthz_reflects_the_upstream() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let ok = get(butler.addr(), "/healthz", &[]);
    assert_eq!((ok.status, ok.body_str().as_str()), (200, "{\"status\":\"ok\"}\n"));
    assert_eq!(ok.header("content-type"), Some("application/json"));
    assert_eq!(fake.last_request().unwrap().path, "/api/version");

    let down = Butler::start(&config(&format!("http://{}", unused_addr()), ""));
    let bad = get(down.addr(), "/healthz", &[]);
    assert_eq!(bad.status, 503, "{}", bad.body_str());
    assert_eq!(bad.header("content-type"), Some("application/json"));
    assert!(bad.body.ends_with(b"}\n"), "{:?}", bad.body_str());
    let v = bad.json();
    assert_eq!(v["status"], "unhealthy");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
}

#[test]
fn readyz_and_metrics_are_public_by_default() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let ready = get(butler.addr(), "/readyz", &[]);
    assert_eq!((ready.status, ready.body_str().as_str()), (200, "{\"status\":\"ready\"}\n"));
    assert_eq!(ready.header("content-type"), Some("application/json"));

    let metrics = get(butler.addr(), "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert!(metrics.body_str().contains("# TYPE butler_requests_total counter\n"));
    assert_eq!(fake.request_count(), 0, "public routes must not be forwarded");
}

#[test]
fn metrics_token_is_required_when_configured() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "metrics: {token: t0k}\n");
    let wrong = [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Bearer t0k2")],
        vec![("Authorization", "Basic dDBr")],
    ];
    for headers in &wrong {
        let response = get(butler.addr(), "/metrics", headers);
        assert_eq!(response.status, 401, "{headers:?}");
        assert_error(&response, 401, "unauthorized");
    }
    // A client's API key is not the metrics token.
    let client = get(butler.addr(), "/metrics", &[("Authorization", &bearer())]);
    assert_error(&client, 401, "unauthorized");

    let ok = get(butler.addr(), "/metrics", &[("Authorization", "Bearer t0k")]);
    assert_eq!(ok.status, 200);
    assert!(ok.body_str().contains("butler_build_info{version="), "{}", ok.body_str());
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn unreachable_upstream_is_502() {
    let butler = Butler::start(&config(&format!("http://{}", unused_addr()), ""));
    let response = request(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &bearer())],
        br#"{"model":"llama3.2"}"#,
    );
    assert_error(&response, 502, "upstream unavailable");
    assert!(response.header("x-request-id").is_some());
    let get_too = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_error(&get_too, 502, "upstream unavailable");
}

#[test]
fn slow_first_byte_is_504() {
    let fake = FakeOllama::start_with(Behavior {
        first_byte_delay: Duration::from_secs(3),
        ..Behavior::default()
    });
    let butler = start(&fake, "timeouts: {upstream_first_byte: 300ms}\n");
    let sent = Instant::now();
    let response = request(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &bearer())],
        br#"{"model":"llama3.2"}"#,
    );
    let took = sent.elapsed();
    assert_error(&response, 504, "upstream timeout");
    assert!(took >= Duration::from_millis(300), "504 before the timeout: {took:?}");
    assert!(took < Duration::from_secs(2), "504 took {took:?}");
    assert_eq!(fake.request_count(), 1);
}

#[test]
fn upstream_errors_pass_through() {
    let fake = FakeOllama::start_with(Behavior { fail_status: Some(500), ..Behavior::default() });
    let butler = start(&fake, "");
    let body = br#"{"model":"llama3.2","messages":[]}"#;
    let direct = request(fake.addr(), "POST", "/api/chat", &[], body);
    let response =
        request(butler.addr(), "POST", "/api/chat", &[("Authorization", &bearer())], body);
    assert_eq!(response.status, 500);
    assert_eq!(response.body_str(), "{\"error\":\"boom\"}");
    assert_eq!(response.body, direct.body);
    assert_eq!(response.header("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(response.framing, Framing::Length(response.body.len() as u64));

    let missing = get(butler.addr(), "/nope", &[("Authorization", &bearer())]);
    assert_eq!((missing.status, missing.body_str().as_str()), (404, "{\"error\":\"not found\"}"));
}

#[test]
fn response_headers_pass_through_minus_hop_by_hop() {
    let fake = FakeOllama::start();
    fake.set_route(
        "GET",
        "/api/version",
        Canned::json(200, &json!({"version": "9.9.9"}))
            .with_header("X-Upstream", "yes")
            .with_header("Connection", "X-Hop")
            .with_header("X-Hop", "1")
            .with_header("Keep-Alive", "timeout=9")
            .with_header("X-Request-Id", "from-upstream"),
    );
    let butler = start(&fake, "");
    let response =
        get(butler.addr(), "/api/version", &[("Authorization", &bearer()), ("X-Request-Id", "r1")]);
    assert_eq!(response.status, 200);
    assert_eq!(response.body_str(), r#"{"version":"9.9.9"}"#);
    assert_eq!(response.headers_named("x-upstream"), ["yes"]);
    assert!(response.headers_named("x-hop").is_empty(), "{:?}", response.headers);
    assert!(response.headers_named("keep-alive").is_empty(), "{:?}", response.headers);
    assert_eq!(response.headers_named("x-request-id"), ["r1"]);
    assert_eq!(response.headers_named("content-length"), ["19"]);
}

#[test]
fn errors_keep_the_connection_usable() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let mut conn = RawConn::connect(butler.addr());
    let refused = conn.roundtrip("GET", "/api/tags", &[], b"");
    assert_eq!(refused.body_str(), error_body("unauthorized"));
    let ok = conn.roundtrip("GET", "/api/tags", &[("Authorization", &bearer())], b"");
    assert_eq!(ok.status, 200);
    assert_eq!(fake.request_count(), 1);
}

/// `expires` (401, not revealed), `allow_ips` (403 `forbidden`, checked on the client address)
/// and `trusted_proxies` (whose `X-Forwarded-For` names the client, and is passed on with the
/// peer appended; anyone else's is neither believed nor forwarded).
#[test]
fn expiry_allowed_addresses_and_trusted_proxies() {
    let fake = FakeOllama::start();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"{}\"\ntrusted_proxies: [\"127.0.0.1\"]\nclients:\n  \
         - name: old\n    key: \"sk-expired-1-0f0e0d0c0b\"\n    expires: 2020-01-01\n    allow_models: [\"*\"]\n  \
         - name: lan\n    key: \"sk-lan-2-1a2b3c4d5e6f\"\n    allow_ips: [\"10.0.0.0/8\"]\n    allow_models: [\"*\"]\n  \
         - name: later\n    key: \"sk-later-3-6f5e4d3c2b\"\n    expires: \"2999-01-01T00:00:00Z\"\n    allow_models: [\"*\"]\n",
        fake.url()
    );
    let butler = support::Butler::start(&yaml);
    let tags = |headers: &[(&str, &str)]| get(butler.addr(), "/api/tags", headers);

    assert_error(
        &tags(&[("Authorization", "Bearer sk-expired-1-0f0e0d0c0b")]),
        401,
        "unauthorized",
    );
    assert_eq!(tags(&[("Authorization", "Bearer sk-later-3-6f5e4d3c2b")]).status, 200);

    // The peer (127.0.0.1) is a trusted proxy: the client is the right-most untrusted hop.
    assert_error(&tags(&[("Authorization", "Bearer sk-lan-2-1a2b3c4d5e6f")]), 403, "forbidden");
    let spoofed = [
        ("Authorization", "Bearer sk-lan-2-1a2b3c4d5e6f"),
        ("X-Forwarded-For", "10.1.2.3, 192.0.2.9"),
    ];
    assert_error(&tags(&spoofed), 403, "forbidden");
    let before = fake.request_count();
    let via_proxy = [
        ("Authorization", "Bearer sk-lan-2-1a2b3c4d5e6f"),
        ("X-Forwarded-For", "192.0.2.9, 10.1.2.3"),
    ];
    assert_eq!(tags(&via_proxy).status, 200);
    assert_eq!(fake.request_count(), before + 1);
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.headers_named("x-forwarded-for"), ["192.0.2.9, 10.1.2.3, 127.0.0.1"]);
    let line = butler
        .wait_log(|l| l["msg"] == "response" && l["client"] == "lan" && l["status"] == 200, WAIT)
        .expect("response line");
    assert_eq!(line["remote"], "10.1.2.3");
}

/// Without `trusted_proxies`, a client's own `X-Forwarded-For` changes nothing and is not
/// passed on.
#[test]
fn an_untrusted_forwarded_for_is_ignored() {
    let fake = FakeOllama::start();
    let yaml = config(&fake.url(), "").replace(
        "clients:\n",
        "clients:\n  - name: lan\n    key: \"sk-lan-9-9a8b7c6d5e4f\"\n    allow_ips: [\"10.0.0.0/8\"]\n    allow_models: [\"*\"]\n",
    );
    let butler = support::Butler::start(&yaml);
    let spoofed =
        [("Authorization", "Bearer sk-lan-9-9a8b7c6d5e4f"), ("X-Forwarded-For", "10.1.2.3")];
    assert_error(&get(butler.addr(), "/api/tags", &spoofed), 403, "forbidden");
    let r = get(
        butler.addr(),
        "/api/tags",
        &[("Authorization", &bearer()), ("X-Forwarded-For", "10.1.2.3")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(fake.last_request().unwrap().headers_named("x-forwarded-for"), ["127.0.0.1"]);
}

/// CORS (SPEC §11): preflights from allowed origins are answered before authentication, other
/// origins get 403 without CORS headers, and allowed origins see `Access-Control-Allow-Origin` on
/// every response, errors included. Without `cors`, `OPTIONS` is an ordinary request.
#[test]
fn cors_preflights_and_allowed_origins() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "cors: { allowed_origins: [\"https://chat.example.org\"] }\n");
    let preflight = |origin: &str| {
        request(
            butler.addr(),
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, content-type, x-stainless-os"),
            ],
            b"",
        )
    };
    let ok = preflight("https://chat.example.org");
    assert_eq!(ok.status, 204, "{}", ok.body_str());
    assert_eq!(ok.header("access-control-allow-origin"), Some("https://chat.example.org"));
    let allowed = ok.header("access-control-allow-headers").unwrap().to_ascii_lowercase();
    for h in ["authorization", "content-type", "x-api-key", "openai-beta", "x-stainless-os"] {
        assert!(allowed.contains(h), "{h} missing from {allowed}");
    }
    assert!(ok.header("access-control-allow-methods").unwrap().contains("POST"));
    assert!(ok.body.is_empty());

    let denied = preflight("https://evil.example");
    assert_error(&denied, 403, "origin not allowed");
    assert!(
        denied.headers.iter().all(|(n, _)| !n.to_ascii_lowercase().starts_with("access-control"))
    );

    // Errors carry the header too, so the browser app can read them.
    let unauth = get(butler.addr(), "/api/tags", &[("Origin", "https://chat.example.org")]);
    assert_error(&unauth, 401, "unauthorized");
    assert_eq!(unauth.header("access-control-allow-origin"), Some("https://chat.example.org"));
    let auth = bearer();
    let fine = get(
        butler.addr(),
        "/api/tags",
        &[("Origin", "https://chat.example.org"), ("Authorization", &auth)],
    );
    assert_eq!(fine.status, 200);
    assert_eq!(fine.headers_named("access-control-allow-origin"), ["https://chat.example.org"]);
    let other = get(
        butler.addr(),
        "/api/tags",
        &[("Origin", "https://evil.example"), ("Authorization", &auth)],
    );
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_eq!(fake.request_count(), 2, "preflights never reach the upstream");

    // Without `cors`, OPTIONS needs credentials like anything else.
    let plain = start(&fake, "");
    let r = request(
        plain.addr(),
        "OPTIONS",
        "/api/tags",
        &[("Origin", "https://chat.example.org"), ("Access-Control-Request-Method", "GET")],
        b"",
    );
    assert_error(&r, 401, "unauthorized");
}

// ---------------------------------------------------------------------------------------------
// Failed authentications (SPEC §5 auth_failure_limit)
// ---------------------------------------------------------------------------------------------

/// The `Retry-After` of a 429, checked to be whole seconds within the window.
#[track_caller]
fn retry_after(response: &support::Response, window_secs: u64) -> u64 {
    let value = response.header("retry-after").expect("Retry-After");
    let secs: u64 = value.parse().unwrap_or_else(|_| panic!("Retry-After {value:?}"));
    assert!((1..=window_secs).contains(&secs), "Retry-After {secs}");
    secs
}

#[test]
fn failed_authentications_block_the_client_address() {
    let fake = FakeOllama::start();
    // The peer (127.0.0.1) is a trusted proxy, so X-Forwarded-For names the client (SPEC §11).
    let butler = start(&fake, "auth_failure_limit: 3/min\ntrusted_proxies: [\"127.0.0.1/32\"]\n");
    let from = |ip: &'static str, auth: Option<(&'static str, String)>| {
        let mut headers: Vec<(&str, String)> = vec![("X-Forwarded-For", ip.to_owned())];
        headers.extend(auth);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        get(butler.addr(), "/api/tags", &headers)
    };
    let attacker = "203.0.113.7";

    // Requests without credentials are 401 but do not count.
    for _ in 0..5 {
        assert_error(&from(attacker, None), 401, "unauthorized");
    }
    // Refused credentials of every source count: a wrong key as Bearer, as x-api-key, as Basic.
    let wrong = "sk-wrong-guess-0000000000";
    assert_error(
        &from(attacker, Some(("Authorization", format!("Bearer {wrong}")))),
        401,
        "unauthorized",
    );
    assert_error(&from(attacker, Some(("x-api-key", wrong.to_owned()))), 401, "unauthorized");
    assert_error(&from(attacker, Some(("Authorization", basic("u", wrong)))), 401, "unauthorized");

    // The limit is reached: even the right key is refused, unchecked, with Retry-After.
    let blocked = from(attacker, Some(("Authorization", bearer())));
    assert_error(&blocked, 429, "too many failed attempts");
    retry_after(&blocked, 60);
    // So is a request without credentials: every request that needs them is.
    assert_error(&from(attacker, None), 429, "too many failed attempts");
    assert_eq!(fake.request_count(), 0, "nothing from the blocked address reached Ollama");

    // Another address is unaffected, and public routes stay public.
    assert_eq!(from("203.0.113.8", Some(("Authorization", bearer()))).status, 200);
    assert_eq!(fake.request_count(), 1);
    let health = get(butler.addr(), "/healthz", &[("X-Forwarded-For", attacker)]);
    assert_eq!(health.status, 200);

    let logged = butler
        .wait_log(|l| l["msg"] == "too many failed attempts" && l["remote"] == attacker, WAIT)
        .expect("the refusal is logged");
    assert_eq!(logged["reason"], "rate_limited");
    assert_eq!(logged["level"].as_str().map(str::to_ascii_lowercase).as_deref(), Some("warn"));
    let metrics = get(butler.addr(), "/metrics", &[]).body_str();
    assert!(
        metrics.contains("butler_requests_rejected_total{client=\"\",reason=\"rate_limited\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("butler_requests_rejected_total{client=\"\",reason=\"unauthorized\"} 8\n"),
        "{metrics}"
    );
}

#[test]
fn auth_failure_limit_unlimited_never_blocks() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "auth_failure_limit: unlimited\n");
    for _ in 0..40 {
        let r =
            get(butler.addr(), "/api/tags", &[("Authorization", "Bearer sk-wrong-guess-00000")]);
        assert_error(&r, 401, "unauthorized");
    }
    assert_eq!(get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]).status, 200);
}

#[test]
fn the_default_auth_failure_limit_is_30_per_minute() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let wrong = [("x-api-key", "sk-wrong-guess-000000000")];
    for i in 0..30 {
        assert_eq!(get(butler.addr(), "/api/tags", &wrong).status, 401, "attempt {i}");
    }
    let blocked = get(butler.addr(), "/api/tags", &[("Authorization", &bearer())]);
    assert_error(&blocked, 429, "too many failed attempts");
    retry_after(&blocked, 60);
}
