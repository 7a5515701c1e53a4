//! Users, passwords and butler's own tokens (SPEC §4 auth/users validation, §5 standalone JWT,
//! Basic auth, modes): the real binary in front of a fake Ollama.
//!
//! Hashes are made at bcrypt cost 4 so that the suite stays fast; the few tests that need a
//! measurable bcrypt run use [`SLOW_HASH`], a literal cost-10 hash.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::setup::{KEY, WAIT, assert_error, error_body};
use support::{
    Butler, FakeOllama, Response, TempDir, build_request, get, post_json, request, run_cli,
    send_raw,
};

/// The HMAC key of every butler in this file (exactly 32 bytes).
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const ALICE_PW: &str = "alice-Pw-7f3aQx-wonderland";
const BOB_PW: &str = "bob-Pw-9c2eZr-builder";
/// The password of [`SLOW_HASH`].
const SLOW_PW: &str = "slow-password-10";
/// bcrypt cost 10 of [`SLOW_PW`] (≈ 50 ms optimised, ≈ 300 ms in a debug build): written literally into the
/// YAML, which also shows that interpolation leaves `$2b$10$…` alone.
const SLOW_HASH: &str = "$2b$10$5POww3GPNU5hLmVYILUG8OvvnlVoSlsjSHdPUzyCMo3QpqksGVYlm";
/// A floor that a cost-10 bcrypt verification exceeds on any machine (it is 2¹⁰ Blowfish key
/// expansions; ≈ 50 ms on a fast machine in release mode).
const BCRYPT_FLOOR: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

fn hash(password: &str) -> String {
    bcrypt::hash(password, 4).expect("bcrypt hash")
}

/// One `users` entry.
fn user(name: &str, hash: &str, allow_models: &str) -> String {
    format!("  - name: {name}\n    password_hash: \"{hash}\"\n    allow_models: {allow_models}\n")
}

/// alice (allowed `llama3.2` only) and bob (every model), both at cost 4.
fn alice_and_bob() -> Vec<String> {
    vec![user("alice", &hash(ALICE_PW), "[\"llama3.2\"]"), user("bob", &hash(BOB_PW), "[\"*\"]")]
}

/// A config in front of `upstream` in auth `mode`. `auth_extra` are lines under `auth:`
/// (two-space indented, newline-terminated); `jwt_secret` and a generous `login_rate_limit`
/// are added unless given there. With `clients`, client `c1` (key [`KEY`], every model) exists.
fn config(upstream: &str, mode: &str, auth_extra: &str, users: &[String], clients: bool) -> String {
    let mut auth = format!("  mode: {mode}\n");
    if !auth_extra.contains("jwt_secret:") {
        auth.push_str(&format!("  jwt_secret: \"{SECRET}\"\n"));
    }
    if !auth_extra.contains("login_rate_limit:") {
        auth.push_str("  login_rate_limit: \"1000/min\"\n");
    }
    auth.push_str(auth_extra);
    let mut yaml = format!("listen: \"127.0.0.1:0\"\nupstream: \"{upstream}\"\nauth:\n{auth}");
    if !users.is_empty() {
        yaml.push_str("users:\n");
        for u in users {
            yaml.push_str(u);
        }
    }
    if clients {
        yaml.push_str(&format!(
            "clients:\n  - name: c1\n    key: \"{KEY}\"\n    allow_models: [\"*\"]\n"
        ));
    }
    yaml
}

/// jwt_standalone with alice and bob.
fn standalone(fake: &FakeOllama) -> Butler {
    standalone_with(fake, "")
}

/// [`standalone`] with more `auth:` lines (indented by two spaces).
fn standalone_with(fake: &FakeOllama, auth_extra: &str) -> Butler {
    Butler::start(&config(&fake.url(), "jwt_standalone", auth_extra, &alice_and_bob(), false))
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

fn login(addr: SocketAddr, username: &str, password: &str) -> Response {
    post_json(addr, "/auth/login", &[], &json!({"username": username, "password": password}))
}

/// Logs in and returns the token, or panics with the response.
fn login_token(addr: SocketAddr, username: &str, password: &str) -> String {
    let response = login(addr, username, password);
    assert_eq!(response.status, 200, "login {username}: {}", response.body_str());
    response.json()["token"].as_str().expect("token is a string").to_owned()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn tags(addr: SocketAddr, authorization: &str) -> Response {
    get(addr, "/api/tags", &[("Authorization", authorization)])
}

fn chat(addr: SocketAddr, headers: &[(&str, &str)], model: &str) -> Response {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
                      "stream": false});
    post_json(addr, "/api/chat", headers, &body)
}

/// A response with the parts that differ between any two requests (`X-Request-Id`, `Date`)
/// removed, for "these two answers are indistinguishable".
fn comparable(r: &Response) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let headers = r
        .headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("x-request-id") && !k.eq_ignore_ascii_case("date"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    (r.status, headers, r.body.clone())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// A minimal HTTP exchange over a socket bound to `src` (any 127/8 address works on Linux
/// loopback), so that rate limits per client address can be tested from one machine.
/// Returns (status, Retry-After, body).
fn post_from(
    src: Ipv4Addr,
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> (u16, Option<String>, String) {
    let mut stream = connect_from(src, addr);
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let bytes = build_request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
        true,
    );
    stream.write_all(&bytes).expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {text:?}"));
    let retry_after = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("retry-after").then(|| v.trim().to_owned())
    });
    (status, retry_after, body.to_owned())
}

fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else { panic!("IPv4 only: {dst}") };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket whose descriptor is handed to a TcpStream at once (which closes
    // it on every path); the address pointers point at live, correctly sized sockaddr_in values.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(src, 0);
        let rc = libc::bind(fd, (&raw const local).cast(), len);
        assert_eq!(rc, 0, "bind {src}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(*dst.ip(), dst.port());
        let rc = libc::connect(fd, (&raw const remote).cast(), len);
        assert_eq!(rc, 0, "connect {dst}: {}", std::io::Error::last_os_error());
        stream
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-made JWTs
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(msg).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// A token with any header and claims, signed HMAC-SHA256 with `key` whatever the header says.
fn forge(header: &Value, claims: &Value, key: &[u8]) -> String {
    let msg =
        format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    format!("{msg}.{}", b64(&hmac_sha256(key, msg.as_bytes())))
}

fn hs256() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

/// Claims butler would issue for `sub`, valid for ten more minutes.
fn claims(sub: &str) -> Value {
    let now = unix_now();
    json!({"sub": sub, "iat": now, "exp": now + 600, "iss": "butler"})
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

// ---------------------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------------------

#[test]
fn login_issues_an_hs256_token_that_authenticates_the_user() {
    let fake = FakeOllama::start();
    let butler = standalone_with(&fake, "  token_expiry: 2h\n");
    let before = unix_now();
    // The login route takes no credentials, and nothing reaches the upstream.
    let response = login(butler.addr(), "alice", ALICE_PW);
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(fake.request_count(), 0);
    let body = response.json();
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
    let token = body["token"].as_str().expect("token").to_owned();

    // An HS256 JWT signed with jwt_secret, claims sub, iat, exp = iat + token_expiry, iss.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert_eq!(decode_part(parts[0])["alg"], "HS256");
    let expected_sig =
        hmac_sha256(SECRET.as_bytes(), format!("{}.{}", parts[0], parts[1]).as_bytes());
    assert_eq!(parts[2], b64(&expected_sig), "signature is HMAC-SHA256 with jwt_secret");
    let payload = decode_part(parts[1]);
    assert_eq!(payload["sub"], "alice", "{payload}");
    assert_eq!(payload["iss"], "butler", "{payload}");
    let iat = payload["iat"].as_u64().expect("numeric iat");
    let exp = payload["exp"].as_u64().expect("numeric exp");
    assert!(iat + 1 >= before && iat <= unix_now() + 1, "iat {iat} vs now {before}");
    assert_eq!(exp - iat, 7200, "exp - iat is token_expiry (2h)");

    // Bearer on an allowed model: forwarded without butler's credentials.
    let auth = bearer(&token);
    let response = chat(butler.addr(), &[("Authorization", &auth)], "llama3.2");
    assert_eq!(response.status, 200, "{}", response.body_str());
    let seen = fake.last_request().expect("forwarded");
    assert_eq!(seen.path, "/api/chat");
    assert!(seen.headers_named("authorization").is_empty(), "{seen:?}");
    // A model outside alice's allow list.
    let count = fake.request_count();
    let response = chat(butler.addr(), &[("Authorization", &auth)], "qwen2.5:7b");
    assert_error(&response, 403, "model not allowed");
    assert_eq!(fake.request_count(), count);
    // Listings are filtered to her models.
    let response = tags(butler.addr(), &auth);
    assert_eq!(response.status, 200, "{}", response.body_str());
    let listing = response.json();
    let names: Vec<&str> = listing["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["llama3.2:latest"], "{listing}");
    // The scheme is case-insensitive for tokens as for keys.
    let lower = format!("bearer {token}");
    assert_eq!(tags(butler.addr(), &lower).status, 200);
    // bob's token carries bob's policy.
    let bob = bearer(&login_token(butler.addr(), "bob", BOB_PW));
    assert_eq!(chat(butler.addr(), &[("Authorization", &bob)], "qwen2.5:7b").status, 200);
}

#[test]
fn login_failures_have_exact_answers() {
    let fake = FakeOllama::start();
    let butler = standalone(&fake);
    let addr = butler.addr();

    // Unknown user and wrong password: the same answer, byte for byte.
    let unknown = login(addr, "mallory", ALICE_PW);
    assert_error(&unknown, 401, "invalid credentials");
    let wrong = login(addr, "alice", BOB_PW);
    assert_error(&wrong, 401, "invalid credentials");
    assert_eq!(comparable(&unknown), comparable(&wrong));
    // Nothing is trimmed.
    assert_error(&login(addr, "alice ", ALICE_PW), 401, "invalid credentials");
    assert_error(&login(addr, "alice", &format!("{ALICE_PW} ")), 401, "invalid credentials");

    // Missing or empty fields.
    for body in [
        json!({}),
        json!({"username": "alice"}),
        json!({"password": ALICE_PW}),
        json!({"username": "", "password": ALICE_PW}),
        json!({"username": "alice", "password": ""}),
        json!({"username": "alice", "password": null}),
    ] {
        let response = post_json(addr, "/auth/login", &[], &body);
        assert_error(&response, 400, "username and password are required");
    }
    // Bodies that are not JSON.
    for body in [&b"username=alice&password=x"[..], b"{\"username\":", b"", b"\xff\xfe"] {
        let response =
            request(addr, "POST", "/auth/login", &[("Content-Type", "application/json")], body);
        assert_error(&response, 400, "bad request");
    }

    // 64 KiB is the limit (SPEC §5): a body of exactly 65536 bytes is read, one byte more is 413.
    let login_body = |len: usize| {
        let base = json!({"username": "alice", "password": ALICE_PW}).to_string();
        format!("{base}{}", " ".repeat(len - base.len()))
    };
    let exact = login_body(64 * 1024);
    let response = request(
        addr,
        "POST",
        "/auth/login",
        &[("Content-Type", "application/json")],
        exact.as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", response.body_str());
    for len in [64 * 1024 + 1, 1024 * 1024] {
        let big = login_body(len);
        let response = request(
            addr,
            "POST",
            "/auth/login",
            &[("Content-Type", "application/json")],
            big.as_bytes(),
        );
        assert_eq!(response.status, 413, "{len}: {}", response.body_str());
    }

    // Only POST.
    for method in ["GET", "PUT", "DELETE"] {
        let response = request(addr, method, "/auth/login", &[], b"");
        assert_eq!(response.status, 405, "{method}: {}", response.body_str());
        // RFC 9110 §15.5.6: a 405 lists the allowed methods.
        assert_eq!(response.header("allow"), Some("POST"), "{method}");
    }
    // The size limit holds for chunked bodies and for a huge declared length, answered without
    // waiting for the body.
    let mut chunked = b"10001\r\n".to_vec();
    chunked.extend_from_slice(&[b' '; 64 * 1024 + 1]);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let response = request(
        addr,
        "POST",
        "/auth/login",
        &[("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        &chunked,
    );
    assert_eq!(response.status, 413, "chunked: {}", response.body_str());
    let raw = format!(
        "POST /auth/login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000000\r\n\r\n{{\"username\":"
    );
    let response = send_raw(addr, raw.as_bytes());
    assert_eq!(response.status(), 413, "{}", response.raw_str());
    // Nothing of this reached the upstream.
    assert_eq!(fake.request_count(), 0, "{:?}", fake.requests());
}

#[test]
fn login_is_not_found_without_users() {
    let fake = FakeOllama::start();
    // api_key mode (no users possible), and either mode with clients only.
    for mode in ["api_key", "either"] {
        let yaml = format!(
            "listen: \"127.0.0.1:0\"\nupstream: \"{}\"\nauth: {{mode: {mode}}}\nclients:\n  \
             - name: c1\n    key: \"{KEY}\"\n    allow_models: [\"*\"]\n",
            fake.url()
        );
        let butler = Butler::start(&yaml);
        let response = login(butler.addr(), "alice", ALICE_PW);
        assert_error(&response, 404, "not found");
        let response = get(butler.addr(), "/auth/login", &[]);
        assert_error(&response, 404, "not found");
    }
}

#[test]
fn login_is_rate_limited_per_username_and_per_address() {
    let fake = FakeOllama::start();
    let butler = standalone_with(&fake, "  login_rate_limit: \"3/min\"\n");
    let addr = butler.addr();
    let (a, b, c) =
        (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let creds = |u: &str, p: &str| json!({"username": u, "password": p});

    // Three wrong passwords for alice from one address, then even the right one is refused.
    for _ in 0..3 {
        let (status, _, body) = post_from(a, addr, "/auth/login", &creds("alice", "nope"));
        assert_eq!((status, body.as_str()), (401, error_body("invalid credentials").as_str()));
    }
    let (status, retry, body) = post_from(a, addr, "/auth/login", &creds("alice", ALICE_PW));
    assert_eq!((status, body.as_str()), (429, error_body("rate limit exceeded").as_str()));
    let retry: u64 = retry.expect("Retry-After").parse().expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // Per user name: alice is refused from a fresh address too, while bob gets in from it.
    let (status, retry, _) = post_from(b, addr, "/auth/login", &creds("alice", ALICE_PW));
    assert_eq!(status, 429);
    assert!(retry.is_some());
    let (status, _, body) = post_from(b, addr, "/auth/login", &creds("bob", BOB_PW));
    assert_eq!(status, 200, "{body}");

    // Per address: three different names from one address, then a fourth name is refused,
    // and so is a user who has not tried yet with the right password.
    for name in ["u1", "u2", "u3"] {
        let (status, _, _) = post_from(c, addr, "/auth/login", &creds(name, "x"));
        assert_eq!(status, 401, "{name}");
    }
    let (status, _, body) = post_from(c, addr, "/auth/login", &creds("u4", "x"));
    assert_eq!((status, body.as_str()), (429, error_body("rate limit exceeded").as_str()));
    let (status, _, _) = post_from(c, addr, "/auth/login", &creds("bob", BOB_PW));
    assert_eq!(status, 429);
}

/// Password-check limits are limiter state, which a reload carries over (SPEC §11): a reload
/// is no way to earn fresh guesses.
#[test]
fn login_throttling_survives_a_reload() {
    let fake = FakeOllama::start();
    let butler = standalone_with(&fake, "  login_rate_limit: \"2/min\"\n");
    for _ in 0..2 {
        assert_error(&login(butler.addr(), "alice", "guess"), 401, "invalid credentials");
    }
    let mark = butler.log_mark();
    butler.sighup();
    assert!(butler.wait_log_since(mark, |l| l["msg"] == "config reloaded", WAIT).is_some());
    assert_error(&login(butler.addr(), "alice", ALICE_PW), 429, "rate limit exceeded");
}

/// Failed logins, wrong Basic passwords and bad tokens all count against the client address
/// (SPEC §5 `auth_failure_limit`); once it is reached, `/auth/login` is refused unchecked too.
#[test]
fn failed_logins_and_tokens_count_toward_the_auth_failure_limit() {
    let fake = FakeOllama::start();
    let yaml = format!(
        "auth_failure_limit: 3/min\n{}",
        config(&fake.url(), "either", "", &alice_and_bob(), true)
    );
    let butler = Butler::start(&yaml);
    let addr = butler.addr();
    assert_error(&login(addr, "alice", "guess"), 401, "invalid credentials");
    assert_error(&tags(addr, &basic("alice", "guess")), 401, "unauthorized");
    let forged = forge(&hs256(), &claims("alice"), b"not-the-secret-not-the-secret-00");
    assert_error(&tags(addr, &bearer(&forged)), 401, "unauthorized");

    // Three failures from 127.0.0.1: the right password is not even checked.
    let refused = login(addr, "alice", ALICE_PW);
    assert_error(&refused, 429, "too many failed attempts");
    let retry: u64 = refused.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_error(&tags(addr, &format!("Bearer {KEY}")), 429, "too many failed attempts");
    assert_error(&tags(addr, &basic("bob", BOB_PW)), 429, "too many failed attempts");

    // Another address logs in and is served.
    let (status, _, body) = post_from(
        Ipv4Addr::new(127, 0, 0, 2),
        addr,
        "/auth/login",
        &json!({"username": "alice", "password": ALICE_PW}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn unknown_user_and_wrong_password_cost_the_same_bcrypt() {
    let fake = FakeOllama::start();
    // alice's hash is cost 10 (a literal in the YAML); bob's is cost 4. An unknown user must pay
    // for a hash of the highest configured cost, not the cheapest or none.
    let users = vec![user("alice", SLOW_HASH, "[\"*\"]"), user("bob", &hash(BOB_PW), "[\"*\"]")];
    let butler = Butler::start(&config(&fake.url(), "jwt_standalone", "", &users, false));
    let addr = butler.addr();
    let timed = |u: &str, p: &str| {
        let t = Instant::now();
        let r = login(addr, u, p);
        (r, t.elapsed())
    };
    let (unknown, unknown_took) = timed("mallory", SLOW_PW);
    let (wrong, wrong_took) = timed("alice", "not-the-password");
    assert_error(&unknown, 401, "invalid credentials");
    assert_eq!(comparable(&unknown), comparable(&wrong));
    // Both paths ran a cost-10 bcrypt (a floor, not a comparison between the two).
    assert!(wrong_took >= BCRYPT_FLOOR, "wrong password answered in {wrong_took:?}");
    assert!(unknown_took >= BCRYPT_FLOOR, "unknown user answered in {unknown_took:?}");
    // And the right password still works with a literal cost-10 hash.
    let (ok, _) = timed("alice", SLOW_PW);
    assert_eq!(ok.status, 200, "{}", ok.body_str());
}

// ---------------------------------------------------------------------------------------------
// Token validation
// ---------------------------------------------------------------------------------------------

#[test]
fn tokens_butler_did_not_issue_or_no_longer_honours_get_401() {
    let fake = FakeOllama::start();
    let butler = standalone(&fake);
    let addr = butler.addr();
    let key = SECRET.as_bytes();
    let now = unix_now();

    // The forging helper makes tokens butler accepts (guards every negative case below).
    let good = forge(&hs256(), &claims("alice"), key);
    assert_eq!(tags(addr, &bearer(&good)).status, 200);
    let with_past_nbf = forge(
        &hs256(),
        &json!({"sub": "alice", "iss": "butler", "exp": now + 600, "nbf": now - 60}),
        key,
    );
    assert_eq!(tags(addr, &bearer(&with_past_nbf)).status, 200);

    let issued = login_token(addr, "bob", BOB_PW);
    let parts: Vec<&str> = issued.split('.').collect();
    let mut tampered_claims = decode_part(parts[1]);
    tampered_claims["sub"] = json!("alice");
    let tampered =
        format!("{}.{}.{}", parts[0], b64(tampered_claims.to_string().as_bytes()), parts[2]);
    let mut bad_sig = parts[2].as_bytes().to_vec();
    bad_sig[0] = if bad_sig[0] == b'A' { b'B' } else { b'A' };
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], String::from_utf8(bad_sig).unwrap());
    let unsigned_body = format!(
        "{}.{}",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("alice").to_string().as_bytes())
    );
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &claims("alice"),
        &jsonwebtoken::EncodingKey::from_secret(key).expect("HMAC key"),
    )
    .expect("HS384 token");
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims("alice"),
        &jsonwebtoken::EncodingKey::from_secret(key).expect("HMAC key"),
    )
    .expect("HS512 token");

    let cases: Vec<(&str, String)> = vec![
        ("no exp", forge(&hs256(), &json!({"sub": "alice", "iss": "butler", "iat": now}), key)),
        ("null exp", forge(&hs256(), &json!({"sub": "alice", "iss": "butler", "exp": null}), key)),
        (
            "string exp",
            forge(&hs256(), &json!({"sub": "alice", "iss": "butler", "exp": "9999999999"}), key),
        ),
        (
            "expired",
            forge(
                &hs256(),
                &json!({"sub": "alice", "iss": "butler", "iat": now - 7200, "exp": now - 3600}),
                key,
            ),
        ),
        (
            "expired a minute ago",
            forge(&hs256(), &json!({"sub": "alice", "iss": "butler", "exp": now - 60}), key),
        ),
        (
            "nbf in the future",
            forge(
                &hs256(),
                &json!({"sub": "alice", "iss": "butler", "exp": now + 7200, "nbf": now + 3600}),
                key,
            ),
        ),
        (
            "other iss",
            forge(&hs256(), &json!({"sub": "alice", "iss": "keycloak", "exp": now + 600}), key),
        ),
        ("no iss", forge(&hs256(), &json!({"sub": "alice", "exp": now + 600}), key)),
        ("no sub", forge(&hs256(), &json!({"iss": "butler", "exp": now + 600}), key)),
        ("unknown sub", forge(&hs256(), &claims("mallory"), key)),
        (
            "other secret",
            forge(&hs256(), &claims("alice"), b"another-secret-at-least-32-bytes-long"),
        ),
        ("secret prefix", forge(&hs256(), &claims("alice"), &key[..31])),
        ("alg none, no signature", format!("{unsigned_body}.")),
        ("alg none, no dot", unsigned_body.clone()),
        (
            "alg none, HMAC signature",
            format!("{unsigned_body}.{}", b64(&hmac_sha256(key, unsigned_body.as_bytes()))),
        ),
        ("alg None", forge(&json!({"alg": "None"}), &claims("alice"), key)),
        ("alg HS384", hs384),
        ("alg HS512", hs512),
        (
            "alg RS256 with an HMAC signature",
            forge(&json!({"alg": "RS256", "typ": "JWT"}), &claims("alice"), key),
        ),
        (
            "alg ES256 with an HMAC signature",
            forge(&json!({"alg": "ES256", "typ": "JWT"}), &claims("alice"), key),
        ),
        ("tampered payload", tampered),
        ("tampered signature", bad_sig),
        ("truncated", issued[..issued.len() - 4].to_owned()),
        ("two parts", format!("{}.{}", parts[0], parts[1])),
    ];
    let count = fake.request_count();
    for (what, token) in &cases {
        let response = tags(addr, &bearer(token));
        assert_eq!(response.status, 401, "{what}: {}", response.body_str());
        assert_error(&response, 401, "unauthorized");
    }
    // Inference routes too, before anything is forwarded.
    let response = chat(addr, &[("Authorization", &bearer(&cases[0].1))], "llama3.2");
    assert_error(&response, 401, "unauthorized");
    assert_eq!(fake.request_count(), count, "{:?}", fake.requests());
    // The genuine token still works after all that.
    assert_eq!(tags(addr, &bearer(&issued)).status, 200);
}

#[test]
fn tokens_do_not_outlive_their_user_or_the_secret() {
    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let (alice_hash, bob_hash) = (hash(ALICE_PW), hash(BOB_PW));
    let both = vec![user("alice", &alice_hash, "[\"*\"]"), user("bob", &bob_hash, "[\"*\"]")];
    let butler =
        Butler::start_in(&dir, &config(&fake.url(), "jwt_standalone", "", &both, false), &[], &[]);
    let (alice, bob) =
        (login_token(butler.addr(), "alice", ALICE_PW), login_token(butler.addr(), "bob", BOB_PW));
    assert_eq!(tags(butler.addr(), &bearer(&bob)).status, 200);
    drop(butler);

    // Same secret, bob removed: alice's token survives the restart, bob's is dead.
    let only_alice = vec![user("alice", &alice_hash, "[\"*\"]")];
    let butler = Butler::start_in(
        &dir,
        &config(&fake.url(), "jwt_standalone", "", &only_alice, false),
        &[],
        &[],
    );
    assert_eq!(tags(butler.addr(), &bearer(&alice)).status, 200);
    assert_error(&tags(butler.addr(), &bearer(&bob)), 401, "unauthorized");
    assert_error(&login(butler.addr(), "bob", BOB_PW), 401, "invalid credentials");
    drop(butler);

    // A new secret revokes every token.
    let other_secret = "  jwt_secret: \"ffffffffffffffffffffffffffffffffffffffff\"\n";
    let butler = Butler::start_in(
        &dir,
        &config(&fake.url(), "jwt_standalone", other_secret, &both, false),
        &[],
        &[],
    );
    assert_error(&tags(butler.addr(), &bearer(&alice)), 401, "unauthorized");
    assert_error(&tags(butler.addr(), &bearer(&bob)), 401, "unauthorized");
    let fresh = login_token(butler.addr(), "alice", ALICE_PW);
    assert_eq!(tags(butler.addr(), &bearer(&fresh)).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Basic auth
// ---------------------------------------------------------------------------------------------

#[test]
fn basic_auth_for_users_and_for_clients() {
    let fake = FakeOllama::start();

    // jwt_standalone: users only.
    let butler = standalone(&fake);
    let addr = butler.addr();
    let response = chat(addr, &[("Authorization", &basic("alice", ALICE_PW))], "llama3.2");
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert!(fake.last_request().unwrap().headers_named("authorization").is_empty());
    let id = response.header("x-request-id").expect("request id").to_owned();
    let line = butler.wait_log(|v| v["msg"] == "response" && v["request_id"] == id, WAIT).unwrap();
    assert_eq!(line["user"], "alice", "{line}");
    // alice's policy applies.
    let response = chat(addr, &[("Authorization", &basic("alice", ALICE_PW))], "qwen2.5:7b");
    assert_error(&response, 403, "model not allowed");
    for (what, value) in [
        ("wrong password", basic("alice", BOB_PW)),
        ("another user's password", basic("bob", ALICE_PW)),
        ("unknown user", basic("mallory", ALICE_PW)),
        ("no password", basic("alice", "")),
        ("a key with no clients", basic("c1", KEY)),
    ] {
        let response = tags(addr, &value);
        assert_eq!(response.status, 401, "{what}: {}", response.body_str());
        assert_error(&response, 401, "unauthorized");
    }
    drop(butler);

    // A password may hold ':' and non-ASCII text: only the first ':' separates the user name.
    let odd_pw = "pa:ss w\u{f6}rd:\u{1f511}";
    let carol = vec![user("carol", &hash(odd_pw), "[\"*\"]")];
    let butler = Butler::start(&config(&fake.url(), "jwt_standalone", "", &carol, false));
    assert_eq!(tags(butler.addr(), &basic("carol", odd_pw)).status, 200);
    assert_eq!(login(butler.addr(), "carol", odd_pw).status, 200);
    assert_error(&tags(butler.addr(), &basic("carol", "pa")), 401, "unauthorized");
    drop(butler);

    // either: users and clients (a client's key as the password, any user name).
    let butler = Butler::start(&config(&fake.url(), "either", "", &alice_and_bob(), true));
    let addr = butler.addr();
    assert_eq!(tags(addr, &basic("alice", ALICE_PW)).status, 200);
    assert_eq!(tags(addr, &basic("bob", BOB_PW)).status, 200);
    assert_eq!(tags(addr, &basic("whoever", KEY)).status, 200);
    assert_error(&tags(addr, &basic("alice", "wrong")), 401, "unauthorized");
    assert_error(&tags(addr, &basic("whoever", "sk-wrong")), 401, "unauthorized");
    drop(butler);

    // api_key: a client's key as the Basic password.
    let yaml = support::setup::config(&fake.url(), "");
    let butler = Butler::start(&yaml);
    assert_eq!(tags(butler.addr(), &basic("anyone", KEY)).status, 200);
    assert_error(&tags(butler.addr(), &basic("alice", ALICE_PW)), 401, "unauthorized");
}

#[test]
fn basic_auth_success_is_cached() {
    let fake = FakeOllama::start();
    let users = vec![user("alice", SLOW_HASH, "[\"*\"]")];
    let extra = "  login_rate_limit: \"2/min\"\n";
    let butler = Butler::start(&config(&fake.url(), "jwt_standalone", extra, &users, false));
    let addr = butler.addr();
    let right = basic("alice", SLOW_PW);
    let wrong = basic("alice", "not-the-password");

    // A wrong password always pays bcrypt (and uses one of the two checks a minute).
    let t = Instant::now();
    assert_error(&tags(addr, &wrong), 401, "unauthorized");
    assert!(t.elapsed() >= BCRYPT_FLOOR, "{:?}", t.elapsed());
    // The first success uses the second check; the next twenty need none, so they can only
    // have been answered from the cache.
    assert_eq!(tags(addr, &right).status, 200);
    for i in 0..20 {
        let response = tags(addr, &right);
        assert_eq!(response.status, 200, "request {i}: {}", response.body_str());
    }
    // The checks really are used up, and the cache never answers for another password.
    assert_error(&tags(addr, &wrong), 401, "unauthorized");
    assert_error(&login(addr, "alice", SLOW_PW), 429, "rate limit exceeded");
}

#[test]
fn basic_auth_cache_does_not_outlive_a_password_change() {
    // A cached success for the old password must not survive a reload that changes the
    // user's hash (the cache key includes it, and a reload rebuilds the cache).
    let fake = FakeOllama::start();
    let (old_pw, new_pw) = ("old-password-1", "new-password-2");
    let yaml = |pw: &str| {
        config(&fake.url(), "jwt_standalone", "", &[user("alice", &hash(pw), "[\"*\"]")], false)
    };
    let butler = Butler::start(&yaml(old_pw));
    for _ in 0..3 {
        assert_eq!(tags(butler.addr(), &basic("alice", old_pw)).status, 200);
    }
    assert_error(&tags(butler.addr(), &basic("alice", new_pw)), 401, "unauthorized");

    let mark = butler.log_mark();
    butler.rewrite_config(&yaml(new_pw));
    butler.sighup();
    assert!(butler.wait_log_since(mark, |l| l["msg"] == "config reloaded", WAIT).is_some());
    assert_error(&tags(butler.addr(), &basic("alice", old_pw)), 401, "unauthorized");
    assert_eq!(tags(butler.addr(), &basic("alice", new_pw)).status, 200);
    assert_error(&tags(butler.addr(), &basic("alice", old_pw)), 401, "unauthorized");
}

#[test]
fn uncached_basic_checks_count_against_the_login_rate_limit() {
    // docs/authentication.md: Basic checks that miss the success cache count against
    // login_rate_limit per user name and per address; cached successes do not.
    let fake = FakeOllama::start();
    let butler = standalone_with(&fake, "  login_rate_limit: \"3/min\"\n");
    let addr = butler.addr();
    assert_eq!(tags(addr, &basic("alice", ALICE_PW)).status, 200);
    assert_error(&tags(addr, &basic("alice", "guess-1")), 401, "unauthorized");
    assert_error(&tags(addr, &basic("alice", "guess-2")), 401, "unauthorized");
    // Out of checks: the cached success still passes, an uncached check is refused.
    for _ in 0..5 {
        assert_eq!(tags(addr, &basic("alice", ALICE_PW)).status, 200);
    }
    assert_error(&tags(addr, &basic("alice", "guess-3")), 401, "unauthorized");
    let response = login(addr, "alice", ALICE_PW);
    assert_error(&response, 429, "rate limit exceeded");
    assert!(response.header("retry-after").is_some());
}

// ---------------------------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------------------------

#[test]
fn either_mode_accepts_keys_tokens_and_passwords() {
    let fake = FakeOllama::start();
    let butler = Butler::start(&config(&fake.url(), "either", "", &alice_and_bob(), true));
    let addr = butler.addr();
    let alice_token = login_token(addr, "alice", ALICE_PW);
    let key_bearer = format!("Bearer {KEY}");
    let token_bearer = bearer(&alice_token);
    let alice_basic = basic("alice", ALICE_PW);
    let key_basic = basic("x", KEY);
    let cases: [(&str, &str, (&str, &str)); 5] = [
        ("Authorization", &key_bearer, ("client", "c1")),
        ("x-api-key", KEY, ("client", "c1")),
        ("Authorization", &key_basic, ("client", "c1")),
        ("Authorization", &token_bearer, ("user", "alice")),
        ("Authorization", &alice_basic, ("user", "alice")),
    ];
    for (name, value, (field, who)) in cases {
        let response = chat(addr, &[(name, value)], "llama3.2");
        assert_eq!(
            response.status,
            200,
            "{name}: {value}: {}\n{}",
            response.body_str(),
            butler.output()
        );
        let id = response.header("x-request-id").expect("request id").to_owned();
        let line = butler
            .wait_log(|v| v["msg"] == "response" && v["request_id"] == id, WAIT)
            .unwrap_or_else(|| panic!("no response line\n{}", butler.output()));
        assert_eq!(line[field], who, "{name}: {line}");
    }
    // Clients and users do not mix: a client cannot log in with its key, and a token naming a
    // client is not the client.
    assert_error(&login(addr, "c1", KEY), 401, "invalid credentials");
    let as_client = forge(&hs256(), &claims("c1"), SECRET.as_bytes());
    assert_error(&tags(addr, &bearer(&as_client)), 401, "unauthorized");
    // A token next to a wrong key, or next to a client's key (two subjects), is refused.
    let response =
        get(addr, "/api/tags", &[("Authorization", &token_bearer), ("x-api-key", "sk-nope")]);
    assert_error(&response, 401, "unauthorized");
    let response = get(addr, "/api/tags", &[("Authorization", &token_bearer), ("x-api-key", KEY)]);
    assert_error(&response, 401, "unauthorized");
}

#[test]
fn jwt_standalone_mode_refuses_api_keys() {
    let fake = FakeOllama::start();
    let butler = standalone(&fake);
    let addr = butler.addr();
    let key_bearer = format!("Bearer {KEY}");
    let key_basic = basic("c1", KEY);
    for (name, value) in
        [("Authorization", key_bearer.as_str()), ("x-api-key", KEY), ("Authorization", &key_basic)]
    {
        assert_error(&get(addr, "/api/tags", &[(name, value)]), 401, "unauthorized");
    }
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn api_key_mode_refuses_standalone_jwts() {
    let fake = FakeOllama::start();
    // jwt_secret set, but the mode does not use tokens: a token correctly signed with it, for a
    // configured client's name, is still not a credential.
    let yaml = support::setup::config(
        &fake.url(),
        &format!("auth:\n  mode: api_key\n  jwt_secret: \"{SECRET}\"\n"),
    );
    let butler = Butler::start(&yaml);
    for sub in ["c1", "alice"] {
        let forged = forge(&hs256(), &claims(sub), SECRET.as_bytes());
        assert_error(&tags(butler.addr(), &bearer(&forged)), 401, "unauthorized");
    }
    assert_eq!(tags(butler.addr(), &format!("Bearer {KEY}")).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[test]
fn logs_name_the_user_and_never_hold_secrets() {
    let fake = FakeOllama::start();
    let alice_hash = hash(ALICE_PW);
    let users = vec![user("alice", &alice_hash, "[\"llama3.2\"]")];
    let butler = Butler::start(&config(&fake.url(), "jwt_standalone", "", &users, false));
    let addr = butler.addr();
    let wrong_pw = "wrong-Pw-5d1cKk";
    let unknown_pw = "unknown-Pw-8b2eLm";

    let token = login_token(addr, "alice", ALICE_PW);
    assert_error(&login(addr, "alice", wrong_pw), 401, "invalid credentials");
    assert_error(&login(addr, "mallory", unknown_pw), 401, "invalid credentials");
    let forged = forge(&hs256(), &claims("alice"), b"another-secret-at-least-32-bytes-long");
    assert_error(&tags(addr, &bearer(&forged)), 401, "unauthorized");
    assert_error(&tags(addr, &basic("alice", wrong_pw)), 401, "unauthorized");

    let mut ids = Vec::new();
    let by_token = chat(addr, &[("Authorization", &bearer(&token))], "llama3.2");
    assert_eq!(by_token.status, 200);
    ids.push(by_token.header("x-request-id").unwrap().to_owned());
    let by_basic = chat(addr, &[("Authorization", &basic("alice", ALICE_PW))], "llama3.2");
    assert_eq!(by_basic.status, 200);
    ids.push(by_basic.header("x-request-id").unwrap().to_owned());
    let denied = chat(addr, &[("Authorization", &bearer(&token))], "qwen2.5:7b");
    assert_eq!(denied.status, 403);
    ids.push(denied.header("x-request-id").unwrap().to_owned());

    for id in &ids {
        let response = butler
            .wait_log(|v| v["msg"] == "response" && v["request_id"] == id.as_str(), WAIT)
            .unwrap_or_else(|| panic!("no response line for {id}\n{}", butler.output()));
        let request = butler
            .wait_log(|v| v["msg"] == "request" && v["request_id"] == id.as_str(), WAIT)
            .unwrap_or_else(|| panic!("no request line for {id}\n{}", butler.output()));
        for line in [&request, &response] {
            assert_eq!(line["user"], "alice", "{line}");
            assert!(line.get("client").is_none(), "a user is not a client: {line}");
        }
    }
    // The refusal's WARN line names the user as well.
    let rejected = butler
        .wait_log(|v| v["msg"] == "request rejected" && v["request_id"] == ids[2].as_str(), WAIT)
        .unwrap_or_else(|| panic!("no rejection line\n{}", butler.output()));
    assert_eq!(rejected["user"], "alice", "{rejected}");
    assert_eq!(rejected["level"].as_str().map(str::to_ascii_uppercase).as_deref(), Some("WARN"));

    let mut output = butler.stdout_lines().join("\n");
    output.push('\n');
    output.push_str(&butler.stderr());
    let signature = token.rsplit('.').next().unwrap();
    let secrets: [(&str, &str); 12] = [
        ("alice's password", ALICE_PW),
        ("a wrong password", wrong_pw),
        ("an unknown user's password", unknown_pw),
        ("the token", &token),
        ("the token's signature", signature),
        ("the forged token", &forged),
        ("the hash", &alice_hash),
        ("the hash without its prefix", &alice_hash[7..]),
        ("the hash's salt", &alice_hash[7..29]),
        ("the JWT secret", SECRET),
        ("the Basic credentials", &basic("alice", ALICE_PW)[6..]),
        ("the wrong Basic credentials", &basic("alice", wrong_pw)[6..]),
    ];
    for (what, secret) in secrets {
        assert!(!output.contains(secret), "{what} appears in butler's output:\n{output}");
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration validation (`butler check`)
// ---------------------------------------------------------------------------------------------

/// Runs `butler check` on `yaml`; returns (exit code, stdout, stderr, config path).
fn check(yaml: &str, envs: &[(&str, &str)]) -> (i32, String, String, String) {
    let dir = TempDir::new();
    let path = dir.write("butler.yaml", yaml);
    let path = path.to_str().expect("utf-8 path").to_owned();
    let (code, stdout, stderr) = run_cli(&["check", "--config", &path], envs, None);
    (code, stdout, stderr, path)
}

const UPSTREAM: &str = "http://127.0.0.1:11434";

#[test]
fn check_accepts_literal_and_interpolated_hashes() {
    let h = hash(ALICE_PW);
    // Double-quoted, single-quoted and plain scalars: `$2b$04$…` is never taken for `${…}`.
    for scalar in [format!("\"{h}\""), format!("'{h}'"), h.clone()] {
        let yaml = format!(
            "upstream: {UPSTREAM}\nauth: {{mode: jwt_standalone, jwt_secret: \"{SECRET}\"}}\n\
             users:\n  - name: alice\n    password_hash: {scalar}\n"
        );
        let (code, stdout, stderr, _) = check(&yaml, &[]);
        assert_eq!(code, 0, "{scalar}\nstdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains("jwt_standalone"), "{stdout}");
        let users = stdout.lines().find(|l| l.trim_start().starts_with("users")).expect("users");
        assert_eq!(users.split_whitespace().last(), Some("1"), "{stdout}");
    }
    // From the environment, and a secret of exactly 32 bytes.
    let yaml = format!(
        "upstream: {UPSTREAM}\nauth: {{mode: either, jwt_secret: \"${{JWT_SECRET}}\"}}\n\
         users:\n  - {{name: alice, password_hash: \"${{ALICE_HASH}}\"}}\n"
    );
    let (code, stdout, stderr, _) =
        check(&yaml, &[("JWT_SECRET", SECRET), ("ALICE_HASH", h.as_str())]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    // The highest accepted cost: 14 (check does not run bcrypt, so this is instant).
    let cost14 = format!("$2b$14${}", &SLOW_HASH[7..]);
    let yaml = format!(
        "upstream: {UPSTREAM}\nauth: {{mode: jwt_standalone, jwt_secret: \"{SECRET}\"}}\n\
         users:\n  - {{name: alice, password_hash: \"{cost14}\"}}\n"
    );
    let (code, stdout, stderr, _) = check(&yaml, &[]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn check_refuses_bad_auth_and_user_settings() {
    let h = hash(ALICE_PW);
    let alice = format!("users:\n  - {{name: alice, password_hash: \"{h}\"}}\n");
    let client = format!("clients:\n  - {{name: c1, key: \"{KEY}\"}}\n");
    let standalone =
        |secret: &str| format!("auth: {{mode: jwt_standalone, jwt_secret: \"{secret}\"}}\n");
    let cost15 = format!("$2b$15${}", &SLOW_HASH[7..]);
    let oidc = |issuer: &str| {
        format!(
            "auth:\n  mode: oidc\n  oidc: {{issuer: \"{issuer}\", client_id: butler, \
             role_claim_path: roles}}\nrole_policies:\n  viewer: {{allow_models: [\"*\"]}}\n"
        )
    };
    // (what, YAML after `upstream`, texts the error must contain; the first is its path)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "short jwt_secret",
            format!("{}{alice}", standalone(&SECRET[..31])),
            vec!["auth.jwt_secret", "32"],
        ),
        (
            "missing jwt_secret",
            format!("auth: {{mode: jwt_standalone}}\n{alice}"),
            vec!["auth.jwt_secret"],
        ),
        (
            "cost 15",
            format!(
                "{}users:\n  - {{name: alice, password_hash: \"{cost15}\"}}\n",
                standalone(SECRET)
            ),
            vec!["users[0].password_hash", "15"],
        ),
        (
            "not a bcrypt hash",
            format!(
                "{}users:\n  - {{name: alice, password_hash: hunter2-plaintext}}\n",
                standalone(SECRET)
            ),
            vec!["users[0].password_hash"],
        ),
        ("unknown mode", format!("auth: {{mode: jwt}}\n{client}"), vec!["auth.mode"]),
        (
            "users in api_key mode",
            format!("auth: {{mode: api_key}}\n{client}{alice}"),
            vec!["users"],
        ),
        ("users without a mode", format!("{client}{alice}"), vec!["users"]),
        ("jwt_standalone without users", standalone(SECRET), vec!["users"]),
        (
            "duplicate user names",
            format!("{}{alice}  - {{name: alice, password_hash: \"{h}\"}}\n", standalone(SECRET)),
            vec!["users", "alice"],
        ),
        (
            "user without a hash",
            format!("{}users:\n  - {{name: alice}}\n", standalone(SECRET)),
            vec!["users[0].password_hash"],
        ),
        (
            "unknown user field",
            format!(
                "{}users:\n  - {{name: alice, password_hash: \"{h}\", password: x}}\n",
                standalone(SECRET)
            ),
            vec!["users[0]", "password"],
        ),
        (
            "oidc mode without auth.oidc",
            "auth: {mode: oidc}\nrole_policies:\n  viewer: {allow_models: [\"*\"]}\n".to_owned(),
            vec!["auth.oidc"],
        ),
        ("http issuer", oidc("http://idp.example.org/realms/x"), vec!["auth.oidc.issuer"]),
        (
            "zero token_expiry",
            format!(
                "auth: {{mode: jwt_standalone, jwt_secret: \"{SECRET}\", token_expiry: 0s}}\n{alice}"
            ),
            vec!["auth.token_expiry"],
        ),
        (
            "bad login_rate_limit",
            format!(
                "auth: {{mode: jwt_standalone, jwt_secret: \"{SECRET}\", login_rate_limit: 10/fortnight}}\n{alice}"
            ),
            vec!["auth.login_rate_limit"],
        ),
    ];
    for (what, body, needles) in &cases {
        let yaml = format!("upstream: {UPSTREAM}\n{body}");
        let (code, stdout, stderr, path) = check(&yaml, &[]);
        assert_eq!(
            code, 1,
            "{what}: expected a refusal\n{yaml}\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert!(stderr.contains(&path), "{what}: the message names the file: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.trim_start().starts_with(needles[0]))
            .unwrap_or_else(|| panic!("{what}: no error at {}:\n{stderr}", needles[0]));
        for needle in &needles[1..] {
            assert!(line.contains(needle), "{what}: {needle:?} not in {line:?}\n{stderr}");
        }
    }
    // A plaintext password pasted in place of a hash is not echoed back.
    let (_, _, stderr, _) = check(&format!("upstream: {UPSTREAM}\n{}", cases[3].1), &[]);
    assert!(!stderr.contains("hunter2-plaintext"), "{stderr}");
}
