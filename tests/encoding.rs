//! Compressed request bodies (SPEC §7.1, §7.3, §7.5), the forwarded `Origin` and
//! `X-Forwarded-Proto` headers (§8) and `/api/status` (§6), tested against the real binary in
//! front of a fake Ollama.
//!
//! A compressed body on an inspected route is decoded under the size ceilings, inspected, and
//! forwarded decoded without `Content-Encoding`: what reached the fake is asserted byte for byte.

mod support;

use std::io::Write;

use serde_json::json;
use support::setup::{WAIT, assert_error};
use support::{Butler, FakeOllama, Recorded, Response, get, request};

const MIB: usize = 1024 * 1024;

/// `allow_models: ["*"]` but `deny_models: [llama3.3]`, one prompt pattern, `max_ctx` 4096; no
/// `allow_manage`, no `max_predict` (so admitted bodies are forwarded unedited).
const KEY: &str = "sk-encoding-user-4d1f8a2c6b";
/// Like [`KEY`] but `max_request_bytes: 1000`.
const SMALL: &str = "sk-encoding-small-7e3b9c1a5f";
/// `allow_models: ["*"]`, `allow_manage`.
const ADMIN: &str = "sk-encoding-admin-2a6c8e0b4d";

/// A Codex CLI `/v1/responses` request (shape as Codex sends it, model renamed) and the same
/// bytes as compressed by the reference tool: `zstd -3 --check` (zstd 1.5.4).
const CODEX_JSON: &[u8] = include_bytes!("fixtures/codex-responses.json");
const CODEX_ZSTD: &[u8] = include_bytes!("fixtures/codex-responses.json.zst");

fn yaml(upstream: &str, extra: &str) -> String {
    format!(
        r#"listen: "127.0.0.1:0"
upstream: "{upstream}"
{extra}
clients:
  - name: user
    key: "{KEY}"
    allow_models: ["*"]
    deny_models: ["llama3.3"]
    max_ctx: 4096
    deny_prompt_patterns: ["(?i)secret plan"]
  - name: small
    key: "{SMALL}"
    allow_models: ["*"]
    max_request_bytes: 1000
  - name: admin
    key: "{ADMIN}"
    allow_models: ["*"]
    allow_manage: true
"#
    )
}

fn start(fake: &FakeOllama) -> Butler {
    Butler::start(&yaml(&fake.url(), ""))
}

fn auth(key: &str) -> String {
    format!("Bearer {key}")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// `body` in chunked framing, cut into pieces of `size` bytes.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// POSTs `body` with `Content-Encoding: coding` (none if empty), framed by Content-Length or,
/// with `chunked_size`, as chunks of that size.
fn post(
    butler: &Butler,
    key: &str,
    path: &str,
    coding: &str,
    body: &[u8],
    chunked_size: Option<usize>,
) -> Response {
    let auth = auth(key);
    let mut headers = vec![("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    if !coding.is_empty() {
        headers.push(("Content-Encoding", coding));
    }
    match chunked_size {
        Some(size) => {
            headers.push(("Transfer-Encoding", "chunked"));
            request(butler.addr(), "POST", path, &headers, &chunked(body, size))
        }
        None => request(butler.addr(), "POST", path, &headers, body),
    }
}

/// What an inspected, decoded body must look like upstream: exactly `decoded`, announced by a
/// matching Content-Length, and no `Content-Encoding`.
#[track_caller]
fn assert_forwarded_decoded(seen: &Recorded, decoded: &[u8]) {
    assert_eq!(seen.body_str(), String::from_utf8_lossy(decoded));
    assert_eq!(seen.body, decoded);
    assert!(seen.headers_named("content-encoding").is_empty(), "{:?}", seen.headers);
    let length = decoded.len().to_string();
    assert_eq!(seen.headers_named("content-length"), [length.as_str()], "{:?}", seen.headers);
    assert!(!seen.chunked);
}

#[test]
fn gzip_and_zstd_bodies_are_forwarded_decoded() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let body = br#"{"model":"llama3.2","messages":[{"role":"user","content":"hello there"}],"stream":false}"#;
    let cases: [(&str, Vec<u8>); 5] = [
        ("gzip", gzip(body)),
        ("x-gzip", gzip(body)),
        ("zstd", zstd(body)),
        ("ZSTD", zstd(body)),
        ("identity, gzip", gzip(body)),
    ];
    for (coding, encoded) in cases {
        for framing in [None, Some(7)] {
            fake.clear_requests();
            let response = post(&butler, KEY, "/api/chat", coding, &encoded, framing);
            assert_eq!(response.status, 200, "{coding} {framing:?}: {}", response.body_str());
            assert_eq!(fake.request_count(), 1, "{coding} {framing:?}");
            let seen = fake.last_request().unwrap();
            assert_eq!(seen.path, "/api/chat");
            assert_forwarded_decoded(&seen, body);
        }
    }
    // `identity` alone is as if absent, and is not forwarded either.
    fake.clear_requests();
    let response = post(&butler, KEY, "/api/chat", "identity", body, None);
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert_forwarded_decoded(&fake.last_request().unwrap(), body);
}

/// Codex CLI sends `/v1/responses` bodies with `Content-Encoding: zstd` (issue 8, finding 9):
/// the reference encoder's output reaches Ollama decoded, and the stream comes back.
#[test]
fn a_codex_zstd_responses_request_reaches_ollama_decoded() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    for framing in [None, Some(100)] {
        fake.clear_requests();
        let response = post(&butler, KEY, "/v1/responses", "zstd", CODEX_ZSTD, framing);
        assert_eq!(response.status, 200, "{framing:?}: {}", response.body_str());
        assert!(response.body_str().contains("response.completed"), "{}", response.body_str());
        let seen = fake.last_request().expect("forwarded");
        assert_eq!(seen.path, "/v1/responses");
        assert_forwarded_decoded(&seen, CODEX_JSON);
    }
}

/// The policy judges the decoded body: nothing inside a compressed body escapes it.
#[test]
fn policy_is_enforced_on_the_decoded_body() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let denied = br#"{"model":"llama3.3","prompt":"hi","stream":false}"#;
    let pattern = br#"{"model":"llama3.2","prompt":"the SECRET PLAN is","stream":false}"#;
    let ctx = br#"{"model":"llama3.2","prompt":"hi","options":{"num_ctx":8192}}"#;
    for (coding, encode) in [("gzip", gzip as fn(&[u8]) -> Vec<u8>), ("zstd", zstd)] {
        let r = post(&butler, KEY, "/api/generate", coding, &encode(denied), None);
        assert_error(&r, 403, "model not allowed");
        let r = post(&butler, KEY, "/api/generate", coding, &encode(pattern), Some(5));
        assert_error(&r, 403, "prompt rejected");
        let r = post(&butler, KEY, "/api/generate", coding, &encode(ctx), None);
        assert_error(&r, 400, "num_ctx 8192 exceeds limit of 4096");
        // Decoded but not JSON: the ordinary parse error.
        let r = post(&butler, KEY, "/api/generate", coding, &encode(b"{\"model\":"), None);
        assert_eq!(r.status, 400, "{}", r.body_str());
        assert!(r.body_str().starts_with("{\"error\":\"bad request: "), "{}", r.body_str());
    }
    assert_eq!(fake.request_count(), 0, "nothing may be forwarded");
}

/// A body that decodes past a ceiling is 413 — the inspection ceiling's message, or the
/// subject's `max_request_bytes` one — and decoding stops there: a gigabyte bomb is answered at
/// once. Exactly 8 MiB decoded is allowed.
#[test]
fn decompression_bombs_are_413() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    // 1 GiB of zeros: 1 MiB compressed once, as 1024 gzip members (about 1 MiB in all).
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; MIB]).unwrap();
    let gzip_bomb = e.finish().unwrap().repeat(1024);
    assert!(gzip_bomb.len() < 2 * MIB);
    // 1 GiB of spaces as one zstd frame of 8192 RLE blocks (32 KiB).
    let mut zstd_bomb = 0xFD2F_B528u32.to_le_bytes().to_vec();
    zstd_bomb.extend_from_slice(&[0, 7 << 3]); // no content size, 128 KiB window
    for i in 0..8192u32 {
        let header = u32::from(i == 8191) | (1 << 1) | ((128 * 1024) << 3);
        zstd_bomb.extend_from_slice(&header.to_le_bytes()[..3]);
        zstd_bomb.push(b' ');
    }
    for (coding, bomb) in [("gzip", &gzip_bomb), ("zstd", &zstd_bomb)] {
        for framing in [None, Some(64 * 1024)] {
            let r = post(&butler, KEY, "/api/chat", coding, bomb, framing);
            assert_error(&r, 413, "request body too large");
        }
    }

    // The subject's own, smaller limit applies to the decoded size with its own message.
    let big = format!(r#"{{"model":"llama3.2","prompt":"{}"}}"#, "a".repeat(2000));
    let small = gzip(big.as_bytes());
    assert!(small.len() < 1000);
    assert_error(
        &post(&butler, SMALL, "/api/generate", "gzip", &small, None),
        413,
        "request too large",
    );
    assert_eq!(fake.request_count(), 0);

    // Exactly 8 MiB decoded passes; one byte more does not.
    let head = br#"{"model":"llama3.2","prompt":"x","stream":false}"#;
    let mut exact = head.to_vec();
    exact.resize(8 * MIB, b' ');
    let r = post(&butler, KEY, "/api/generate", "gzip", &gzip(&exact), None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.body_len, 8 * MIB as u64);
    assert!(seen.body == exact);
    exact.push(b' ');
    let r = post(&butler, KEY, "/api/generate", "zstd", &zstd(&exact), None);
    assert_error(&r, 413, "request body too large");
    assert_eq!(fake.request_count(), 1);

    let scrape = get(butler.addr(), "/metrics", &[]).body_str();
    assert!(
        scrape.contains("butler_requests_rejected_total{client=\"user\",reason=\"too_large\"} 5"),
        "{scrape}"
    );
}

/// Codings butler does not decode are 415 (reason `bad_request`); corrupt streams are 400. The
/// order is size (413) before decoding (415) before parsing (400).
#[test]
fn other_codings_are_415_and_corrupt_streams_400() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let body = br#"{"model":"llama3.2","prompt":"hi"}"#;
    for coding in ["br", "deflate", "compress", "gzip, gzip", "gzip, zstd", "zstd, br", "snappy"] {
        for framing in [None, Some(4)] {
            let r = post(&butler, KEY, "/api/generate", coding, body, framing);
            assert_error(&r, 415, "unsupported content encoding");
        }
    }
    // Two headers are one list.
    let auth = auth(KEY);
    let two = [
        ("Authorization", auth.as_str()),
        ("Content-Encoding", "gzip"),
        ("Content-Encoding", "gzip"),
    ];
    let r = request(butler.addr(), "POST", "/api/generate", &two, &gzip(&gzip(body)));
    assert_error(&r, 415, "unsupported content encoding");
    // On OpenAI routes too (the error takes that API's shape where SPEC §7.5 says so).
    let r = post(&butler, KEY, "/v1/chat/completions", "br", body, None);
    assert_eq!(r.status, 415, "{}", r.body_str());
    assert!(r.body_str().contains("unsupported content encoding"), "{}", r.body_str());

    // Corrupt or truncated streams, and bytes that are not of the named coding.
    let good = gzip(body);
    let mut bad_crc = good.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    for (coding, bytes, msg) in [
        ("gzip", good[..good.len() / 2].to_vec(), "bad request: invalid gzip body"),
        ("gzip", bad_crc, "bad request: invalid gzip body"),
        ("gzip", body.to_vec(), "bad request: invalid gzip body"),
        ("gzip", Vec::new(), "bad request: invalid gzip body"),
        ("zstd", zstd(body)[..10].to_vec(), "bad request: invalid zstd body"),
        ("zstd", good.clone(), "bad request: invalid zstd body"),
    ] {
        let r = post(&butler, KEY, "/api/generate", coding, &bytes, None);
        assert_error(&r, 400, msg);
    }

    // Size first: a declared length over 8 MiB is 413 whatever the coding.
    let auth_header = auth.clone();
    let over = (8 * MIB + 1).to_string();
    let mut conn = support::RawConn::connect(butler.addr());
    let head = format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: {auth_header}\r\n\
         Content-Encoding: br\r\nContent-Length: {over}\r\n\r\n"
    );
    conn.write(head.as_bytes()).unwrap();
    let r = conn.read_response("POST", WAIT).expect("an answer before the body");
    assert_error(&r, 413, "request body too large");
    assert_eq!(fake.request_count(), 0);

    let scrape = get(butler.addr(), "/metrics", &[]).body_str();
    assert!(
        scrape
            .contains("butler_requests_rejected_total{client=\"user\",reason=\"bad_request\"} 22"),
        "{scrape}"
    );
}

/// Uninspected routes (blob uploads) stream the body through untouched, `Content-Encoding`
/// included, as Ollama itself decodes no request body there.
#[test]
fn uninspected_routes_pass_the_coding_through() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let blob = gzip(b"layer bytes");
    for coding in ["gzip", "br"] {
        let r = post(&butler, ADMIN, "/api/blobs/sha256:abcd", coding, &blob, None);
        assert_eq!(r.status, 201, "{}", r.body_str());
        let seen = fake.last_request().unwrap();
        assert_eq!(seen.body, blob);
        assert_eq!(seen.headers_named("content-encoding"), [coding]);
    }
}

/// `Origin` is not forwarded (butler has applied CORS; Ollama would refuse the origin with a
/// bare 403), whether or not CORS is configured and the origin allowed.
#[test]
fn origin_is_not_forwarded() {
    let fake = FakeOllama::start();
    let cors = "cors: { allowed_origins: [\"https://chat.example.org\"] }\n";
    for extra in ["", cors] {
        let butler = Butler::start(&yaml(&fake.url(), extra));
        let auth = auth(KEY);
        for origin in ["https://chat.example.org", "https://elsewhere.example"] {
            let headers = [("Authorization", auth.as_str()), ("Origin", origin)];
            assert_eq!(get(butler.addr(), "/api/tags", &headers).status, 200);
            assert!(fake.last_request().unwrap().headers_named("origin").is_empty());
            let body = br#"{"model":"llama3.2","prompt":"hi","stream":false}"#;
            let r = request(butler.addr(), "POST", "/api/generate", &headers, body);
            assert_eq!(r.status, 200, "{}", r.body_str());
            let seen = fake.last_request().unwrap();
            assert!(seen.headers_named("origin").is_empty(), "{:?}", seen.headers);
        }
    }
}

/// `X-Forwarded-Proto` from a trusted proxy (Caddy terminating TLS) reaches Ollama when it is
/// `http` or `https` (its first value); anything else, and anyone else's, is replaced by
/// butler's own scheme.
#[test]
fn forwarded_proto_comes_from_trusted_proxies_only() {
    let fake = FakeOllama::start();
    let auth = auth(KEY);
    let proto_seen = |butler: &Butler, sent: &[&str]| {
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend(sent.iter().map(|v| ("X-Forwarded-Proto", *v)));
        assert_eq!(get(butler.addr(), "/api/tags", &headers).status, 200);
        let seen = fake.last_request().unwrap();
        seen.headers_named("x-forwarded-proto").iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let trusted = Butler::start(&yaml(&fake.url(), "trusted_proxies: [\"127.0.0.1\"]\n"));
    assert_eq!(proto_seen(&trusted, &["https"]), ["https"]);
    assert_eq!(proto_seen(&trusted, &["HTTPS"]), ["https"]);
    assert_eq!(proto_seen(&trusted, &["https, http"]), ["https"]);
    assert_eq!(proto_seen(&trusted, &["https", "http"]), ["https"]);
    assert_eq!(proto_seen(&trusted, &["http"]), ["http"]);
    assert_eq!(proto_seen(&trusted, &["wss, https"]), ["http"]);
    assert_eq!(proto_seen(&trusted, &[]), ["http"]);

    let untrusted = start(&fake);
    assert_eq!(proto_seen(&untrusted, &["https"]), ["http"]);
    let elsewhere = Butler::start(&yaml(&fake.url(), "trusted_proxies: [\"10.0.0.0/8\"]\n"));
    assert_eq!(proto_seen(&elsewhere, &["https"]), ["http"]);
}

/// `GET /api/status` is an info route: authentication is enough (no `allow_manage`). Ollama
/// serves no HEAD there, so HEAD stays in "everything else".
#[test]
fn api_status_needs_authentication_only() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    assert_error(&get(butler.addr(), "/api/status", &[]), 401, "unauthorized");
    assert_eq!(fake.request_count(), 0);

    let auth = auth(KEY);
    let r = get(butler.addr(), "/api/status", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(r.json(), json!({"cloud": {"disabled": false, "source": "none"}}));
    let seen = fake.last_request().unwrap();
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("GET", "/api/status"));

    let head = request(butler.addr(), "HEAD", "/api/status", &[("Authorization", &auth)], b"");
    assert_eq!(head.status, 403);
    assert_eq!(fake.request_count(), 1);

    let scrape = get(butler.addr(), "/metrics", &[]).body_str();
    assert!(scrape.contains("path=\"/api/status\""), "{scrape}");
}
