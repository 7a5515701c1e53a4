//! OIDC through the butler binary (SPEC §5; issue 4, tests 3 and 4): butler in front of the
//! fake Ollama, validating tokens of the loopback HTTPS test IdP (`support::idp`, trusted via
//! `ca_file`), with role policies merged per token.
//!
//! Every refusal is asserted by exact status and body, and by what the upstream saw (nothing).
//! The verifier allows 30 s of clock leeway, and refetches the JWKS for an unknown `kid` at most
//! once per 30 s counting the startup fetch: the one test that must wait for that gap
//! ([`cached_keys_survive_outages_and_rotated_keys_arrive_on_an_unknown_kid`]) runs two butlers
//! side by side so both of its scenarios share a single wait.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::idp::{TestIdp, unix_now};
use support::setup::{KEY, WAIT, assert_error};
use support::{Butler, FakeOllama, Response, TempDir, get, post_json, run_cli_in, unused_addr};

/// The role policies of every butler here. `tight` exists for the rate-limit merge.
const ROLE_POLICIES: &str = "role_policies:
  viewer: {allow_models: [\"llama3.2\"], max_ctx: 2048, rate_limit: \"100/min\"}
  operator: {allow_models: [\"qwen2.5*\"], max_ctx: 8192}
  restricted: {allow_models: [\"*\"], deny_models: [\"llama3.3\"]}
  unlimited: {allow_models: [\"*\"]}
  tight: {allow_models: [\"llama3.2\"], rate_limit: \"1/min\"}
";

/// The key of client `c1` in `either` mode (the standard test key).
const CLIENT_KEY: &str = KEY;

/// How long the verifier keeps from refetching the JWKS for unknown `kid`s (SPEC §5).
const UNKNOWN_KEY_GAP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// A butler started in a directory the test owns (its config and the IdP's CA file). Fields
/// drop in order: the process is killed before the directory goes.
struct Proxy {
    butler: Butler,
    _dir: TempDir,
}

/// The YAML for a butler in `mode` in front of `fake`, trusting `idp` through `ca_file`.
/// `auth_extra` goes under `auth.oidc` (e.g. `refresh_interval: 1s`); with `clients`, client
/// `c1` ([`CLIENT_KEY`], every model) exists. These tests send many refused tokens from one
/// address, so `auth_failure_limit` (SPEC §5, tested in auth_proxy.rs) is off.
fn config(
    fake: &FakeOllama,
    idp: &TestIdp,
    ca_file: &Path,
    mode: &str,
    role_claim_path: &str,
    oidc_extra: &str,
    clients: bool,
) -> String {
    let mut yaml = format!(
        "listen: \"127.0.0.1:0\"\nauth_failure_limit: unlimited\nupstream: \"{}\"\n\
         auth:\n  mode: {mode}\n  oidc:\n    \
         issuer: \"{}\"\n    client_id: butler\n    role_claim_path: \"{role_claim_path}\"\n    \
         ca_file: \"{}\"\n{oidc_extra}{ROLE_POLICIES}",
        fake.url(),
        idp.issuer(),
        ca_file.display(),
    );
    if clients {
        yaml.push_str(&format!(
            "clients:\n  - name: c1\n    key: \"{CLIENT_KEY}\"\n    allow_models: [\"*\"]\n"
        ));
    }
    yaml
}

fn start_full(
    idp: &TestIdp,
    fake: &FakeOllama,
    mode: &str,
    role_claim_path: &str,
    oidc_extra: &str,
    clients: bool,
) -> Proxy {
    let dir = TempDir::new();
    let ca = idp.write_ca(dir.path());
    let yaml = config(fake, idp, &ca, mode, role_claim_path, oidc_extra, clients);
    let butler = Butler::start_in(&dir, &yaml, &[], &[]);
    Proxy { butler, _dir: dir }
}

/// Mode `oidc`, roles at `realm_access.roles` (Keycloak's place).
fn start(idp: &TestIdp, fake: &FakeOllama) -> Proxy {
    start_full(idp, fake, "oidc", "realm_access.roles", "", false)
}

/// Valid claims for `sub` with `roles` at `realm_access.roles`.
fn with_roles(idp: &TestIdp, sub: &str, roles: &[&str]) -> Value {
    let mut claims = idp.claims(sub);
    claims["realm_access"] = json!({ "roles": roles });
    claims
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `POST /api/chat` (not streamed) for `model`, with `options.num_ctx` when given.
fn chat_ctx(butler: &Butler, token: &str, model: &str, num_ctx: Option<u64>) -> Response {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
                          "stream": false});
    if let Some(n) = num_ctx {
        body["options"] = json!({ "num_ctx": n });
    }
    post_json(butler.addr(), "/api/chat", &[("Authorization", &bearer(token))], &body)
}

fn chat(butler: &Butler, token: &str, model: &str) -> Response {
    chat_ctx(butler, token, model, None)
}

#[track_caller]
fn assert_ok(response: &Response, what: &str) {
    assert_eq!(response.status, 200, "{what}: {}", response.body_str());
}

#[track_caller]
fn assert_unauthorized(response: &Response, what: &str) {
    assert_eq!(response.status, 401, "{what} was not refused: {}", response.body_str());
    assert_error(response, 401, "unauthorized");
}

/// A fresh value for "random" `kid`s: unique per call and per run.
fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64).wrapping_mul(6_364_136_223_846_793_005) ^ COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// `n` tokens with valid signatures and claims (role viewer) but `kid`s the IdP never published,
/// cycling through the three key types.
fn random_kid_tokens(idp: &TestIdp, n: usize) -> Vec<String> {
    let claims = with_roles(idp, "u-burst", &["viewer"]);
    (0..n)
        .map(|i| {
            let alg = ["RS256", "ES256", "EdDSA"][i % 3];
            let kid = format!("random-{i}-{:016x}", nonce());
            idp.token_with_kid(alg, Some(&kid), claims.clone())
        })
        .collect()
}

/// Sends every token on `/api/chat` from 10 threads at once; returns the statuses and bodies.
fn burst(butler: &Butler, tokens: &[String]) -> Vec<(u16, String)> {
    thread::scope(|scope| {
        let workers: Vec<_> = tokens
            .chunks(tokens.len().div_ceil(10))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|t| {
                            let r = chat(butler, t, "llama3.2");
                            (r.status, r.body_str())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("burst thread")).collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Hand-made tokens for the refusal cases
// ---------------------------------------------------------------------------------------------

fn b64json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("JSON"))
}

/// An HMAC token (`alg` HS256/HS384/HS512) keyed with `secret`, with `kid` in the header.
fn hmac_token(alg: Algorithm, secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    let key = EncodingKey::from_secret(secret).expect("HMAC key");
    jsonwebtoken::encode(&header, claims, &key).expect("sign HMAC token")
}

/// An unsigned token with this header (e.g. `alg: none` spelled in various ways).
fn unsigned_token(header: &Value, claims: &Value) -> String {
    format!("{}.{}.", b64json(header), b64json(claims))
}

/// DER length octets.
fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![len as u8]
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|&b| b == 0).collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// A positive DER INTEGER from big-endian magnitude bytes.
fn der_uint(magnitude: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = magnitude.iter().copied().skip_while(|&b| b == 0).collect();
    let mut content = Vec::new();
    if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend(trimmed);
    der(0x02, &content)
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Secrets an algorithm-confusion attacker would try as the HMAC key: public material of the
/// IdP in every usual spelling (the JWKS text, each JWK's JSON, the RSA key as SPKI and PKCS#1
/// PEM, the raw modulus, the CA certificate).
fn public_secrets(idp: &TestIdp) -> Vec<(String, Vec<u8>)> {
    let jwks_text = idp.jwks();
    let jwks: Value = serde_json::from_str(&jwks_text).expect("JWKS JSON");
    let keys = jwks["keys"].as_array().expect("JWKS keys").clone();
    let rsa_kid = idp.kid("RS256");
    let rsa = keys.iter().find(|k| k["kid"] == rsa_kid.as_str()).expect("RSA JWK").clone();
    let decode = |field: &str| {
        URL_SAFE_NO_PAD.decode(rsa[field].as_str().expect("RSA JWK field")).expect("base64url")
    };
    let (n, e) = (decode("n"), decode("e"));
    let pkcs1 = der(0x30, &[der_uint(&n), der_uint(&e)].concat());
    let algorithm_id: &[u8] =
        &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let bit_string = der(0x03, &[&[0u8][..], &pkcs1[..]].concat());
    let spki = der(0x30, &[algorithm_id, &bit_string[..]].concat());
    let spki_pem = pem("PUBLIC KEY", &spki);

    let mut secrets = vec![
        ("an arbitrary 32-byte secret".to_string(), b"0123456789abcdef0123456789abcdef".to_vec()),
        ("the JWKS text".to_string(), jwks_text.clone().into_bytes()),
        ("the RSA public key as SPKI PEM".to_string(), spki_pem.clone().into_bytes()),
        ("the SPKI PEM without newline".to_string(), spki_pem.trim_end().as_bytes().to_vec()),
        ("the RSA public key as SPKI DER".to_string(), spki),
        (
            "the RSA public key as PKCS#1 PEM".to_string(),
            pem("RSA PUBLIC KEY", &pkcs1).into_bytes(),
        ),
        ("the RSA modulus".to_string(), n),
        ("the CA certificate PEM".to_string(), idp.ca_pem().into_bytes()),
    ];
    for key in &keys {
        let kid = key["kid"].as_str().unwrap_or("?");
        secrets.push((format!("the JWK {kid} as JSON"), key.to_string().into_bytes()));
    }
    secrets
}

// ---------------------------------------------------------------------------------------------
// Accepted tokens
// ---------------------------------------------------------------------------------------------

#[test]
fn tokens_of_each_key_type_are_accepted_and_stay_at_butler() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    let proxy = start(&idp, &fake);
    let butler = &proxy.butler;
    let claims = with_roles(&idp, "u-viewer", &["viewer"]);

    let mut tokens: Vec<(String, String)> = ["RS256", "ES256", "EdDSA", "PS256", "RS512"]
        .iter()
        .map(|alg| (alg.to_string(), idp.token(alg, claims.clone())))
        .collect();
    // A token without `kid` is tried against the published keys of its type.
    tokens.push(("ES256 without kid".into(), idp.token_with_kid("ES256", None, claims.clone())));
    for (what, token) in &tokens {
        fake.clear_requests();
        assert_ok(&chat(butler, token, "llama3.2"), what);
        let seen = fake.requests_to("/api/chat");
        assert_eq!(seen.len(), 1, "{what}");
        assert_eq!(seen[0].json()["model"], "llama3.2", "{what}");
        assert_eq!(seen[0].header("authorization"), None, "{what}: the token was forwarded");
        let signature = token.rsplit('.').next().expect("signature");
        for (name, value) in &seen[0].headers {
            assert!(!value.contains(signature), "{what}: the token leaked upstream in {name}");
        }
        // The role is viewer: llama3.2 only.
        assert_error(&chat(butler, token, "qwen2.5:7b"), 403, "model not allowed");
        assert_eq!(fake.request_count(), 1, "{what}: a refused request reached the upstream");
    }
    // `Bearer` in any case, extra spaces around the token.
    let spaced = format!("bEaReR   {}  ", tokens[0].1);
    let body = json!({"model": "llama3.2", "messages": [], "stream": false});
    assert_ok(&post_json(butler.addr(), "/api/chat", &[("Authorization", &spaced)], &body), "case");
    // Everything was judged on the keys fetched at startup.
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1));
}

// ---------------------------------------------------------------------------------------------
// Refused tokens
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_tokens_get_401_and_never_reach_the_upstream() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    let proxy = start(&idp, &fake);
    let butler = &proxy.butler;
    let now = unix_now();
    let viewer = |sub: &str| with_roles(&idp, sub, &["viewer"]);
    let set = |name: &str, value: Value| {
        let mut claims = viewer("u-1");
        claims[name] = value;
        claims
    };
    let without = |name: &str| {
        let mut claims = viewer("u-1");
        claims.as_object_mut().expect("claims object").remove(name);
        claims
    };
    let rsa_kid = idp.kid("RS256");

    let mut cases: Vec<(String, String)> = vec![
        ("wrong iss".into(), idp.token("RS256", set("iss", json!("https://other.example")))),
        ("iss with a trailing slash".into(), {
            idp.token("ES256", set("iss", json!(format!("{}/", idp.issuer()))))
        }),
        ("iss over http".into(), {
            let http = idp.issuer().replacen("https://", "http://", 1);
            idp.token("EdDSA", set("iss", json!(http)))
        }),
        ("no iss".into(), idp.token("RS256", without("iss"))),
        ("wrong aud".into(), idp.token("EdDSA", set("aud", json!("someone-else")))),
        ("aud array without client_id".into(), idp.token("RS256", set("aud", json!(["a", "b"])))),
        ("no aud".into(), idp.token("ES256", without("aud"))),
        ("expired".into(), {
            let mut claims = set("exp", json!(now - 120));
            claims["iat"] = json!(now - 720);
            idp.token("RS256", claims)
        }),
        ("expired long ago".into(), idp.token("EdDSA", set("exp", json!(1_000_000_000)))),
        ("exp as a string".into(), idp.token("ES256", set("exp", json!((now + 600).to_string())))),
        ("missing exp".into(), idp.token("ES256", without("exp"))),
        ("nbf in the future".into(), idp.token("RS256", set("nbf", json!(now + 600)))),
        ("missing sub".into(), idp.token("EdDSA", without("sub"))),
        ("roles matching no role policy".into(), {
            idp.token("RS256", with_roles(&idp, "u-2", &["nobody", "admin"]))
        }),
        ("no roles at all".into(), idp.token("ES256", idp.claims("u-3"))),
        ("roles in a different claim".into(), {
            let mut claims = idp.claims("u-4");
            claims["groups"] = json!(["viewer"]);
            claims["roles"] = json!(["viewer"]);
            idp.token("RS256", claims)
        }),
        ("alg none".into(), idp.none_token(viewer("u-1"))),
        ("alg none without kid".into(), unsigned_token(&json!({"alg": "none"}), &viewer("u-1"))),
        ("alg None".into(), unsigned_token(&json!({"alg": "None", "kid": rsa_kid}), &viewer("u"))),
        ("alg NONE".into(), unsigned_token(&json!({"alg": "NONE", "kid": rsa_kid}), &viewer("u"))),
        ("no alg".into(), unsigned_token(&json!({"kid": rsa_kid}), &viewer("u-1"))),
        ("the ES256 signature under alg none".into(), {
            let valid = idp.token("ES256", viewer("u-1"));
            let (_, rest) = valid.split_once('.').expect("JWT");
            let header = b64json(&json!({"alg": "none", "kid": idp.kid("ES256")}));
            format!("{header}.{rest}")
        }),
        ("a forged RS256 signature".into(), idp.forged_token("RS256", viewer("u-1"))),
        ("a forged ES256 signature".into(), idp.forged_token("ES256", viewer("u-1"))),
        ("a forged EdDSA signature".into(), idp.forged_token("EdDSA", viewer("u-1"))),
        ("a tampered payload".into(), {
            // A viewer's valid token with its claims swapped for unlimited ones.
            let valid = idp.token("RS256", viewer("u-1"));
            let parts: Vec<&str> = valid.split('.').collect();
            let payload = b64json(&with_roles(&idp, "u-1", &["unlimited"]));
            format!("{}.{payload}.{}", parts[0], parts[2])
        }),
        ("no signature".into(), {
            let valid = idp.token("EdDSA", viewer("u-1"));
            format!("{}.", &valid[..valid.rfind('.').expect("JWT")])
        }),
        ("a truncated signature".into(), {
            let valid = idp.token("ES256", viewer("u-1"));
            valid[..valid.len() - 4].to_string()
        }),
        ("alg not fitting the kid's key".into(), {
            idp.token_with_kid("ES256", Some(&rsa_kid), viewer("u-1"))
        }),
        ("the encryption key's kid".into(), {
            idp.token_with_kid("RS256", Some("enc-g0"), viewer("u-1"))
        }),
        ("the malformed key's kid".into(), {
            idp.token_with_kid("ES256", Some("broken"), viewer("u-1"))
        }),
        ("an opaque token".into(), "not-a-jwt-at-all".into()),
        ("two segments".into(), {
            let valid = idp.token("RS256", viewer("u-1"));
            valid[..valid.rfind('.').expect("JWT")].to_string()
        }),
    ];
    for (what, secret) in public_secrets(&idp) {
        for (alg, kid) in [
            (Algorithm::HS256, Some(rsa_kid.as_str())),
            (Algorithm::HS256, None),
            (Algorithm::HS384, Some(rsa_kid.as_str())),
            (Algorithm::HS512, None),
        ] {
            cases.push((
                format!("{alg:?} keyed with {what} (kid {kid:?})"),
                hmac_token(alg, &secret, kid, &viewer("u-1")),
            ));
        }
    }
    cases.push(("the helper's HS256 token".into(), {
        idp.hs256_token(b"0123456789abcdef0123456789abcdef", viewer("u-1"))
    }));

    for (what, token) in &cases {
        assert_unauthorized(&chat(butler, token, "llama3.2"), what);
    }
    assert_eq!(fake.request_count(), 0, "a refused token reached the upstream");
    // The control: the same claims, properly signed, pass.
    assert_ok(&chat(butler, &idp.token("RS256", viewer("u-1")), "llama3.2"), "control");
    assert_eq!(fake.request_count(), 1);
    // No refusal above named an unknown key, and none made butler go back to the IdP.
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1));
    // Every refusal is on record (the responses, checked above, say nothing of the reason).
    assert_eq!(butler.logs_with_msg("unauthorized request").len(), cases.len());
}

// ---------------------------------------------------------------------------------------------
// Key rotation and IdP outages
// ---------------------------------------------------------------------------------------------

/// The one long test (about 31 s): butler A and butler B, each with its own IdP, started
/// together so that both scenarios that need the 30 s unknown-`kid` gap share one wait.
///
/// - A, right after startup (gate closed by the startup fetch): the IdP fails, known kids keep
///   working, 100 random kids cause no fetch; then the IdP rotates its keys and recovers, and a
///   token with a new kid is accepted once the gate opens, after exactly one fetch.
/// - B, once the gate is open: the IdP fails, 100 random kids sent at once cause exactly one
///   (failed) fetch, known kids keep working, and that failed attempt closes the gate.
#[test]
fn cached_keys_survive_outages_and_rotated_keys_arrive_on_an_unknown_kid() {
    let fake = FakeOllama::start();
    let idp_a = TestIdp::start();
    let idp_b = TestIdp::start();
    let a = start(&idp_a, &fake);
    let a_ready = Instant::now();
    let b = start(&idp_b, &fake);
    let b_ready = Instant::now();
    let (a, b) = (&a.butler, &b.butler);
    assert_eq!((idp_a.jwks_fetches(), idp_b.jwks_fetches()), (1, 1));

    // --- A: outage right after startup.
    let old_claims = with_roles(&idp_a, "u-old", &["viewer"]);
    let old_tokens: Vec<String> = ["RS256", "ES256", "EdDSA"]
        .iter()
        .map(|alg| idp_a.token(alg, old_claims.clone()))
        .collect();
    idp_a.fail_jwks(true);
    for token in &old_tokens {
        assert_ok(&chat(a, token, "llama3.2"), "a known kid while the IdP fails");
    }
    let before = idp_a.jwks_fetches();
    let results = burst(a, &random_kid_tokens(&idp_a, 100));
    assert_eq!(results.len(), 100);
    for (status, body) in &results {
        assert_eq!((*status, body.as_str()), (401, "{\"error\":\"unauthorized\"}\n"));
    }
    let during = idp_a.jwks_fetches() - before;
    assert!(during <= 1, "100 unknown kids caused {during} JWKS fetches");
    if a_ready.elapsed() < UNKNOWN_KEY_GAP - Duration::from_secs(5) {
        // The startup fetch counts toward the gap: no fetch at all yet.
        assert_eq!(during, 0, "an unknown kid refetched within 30 s of the startup fetch");
    }
    for token in &old_tokens {
        assert_ok(&chat(a, token, "llama3.2"), "a known kid after the burst");
    }

    // --- A: rotation, then recovery; a new kid works once the gate opens.
    idp_a.rotate();
    idp_a.fail_jwks(false);
    let new_claims = with_roles(&idp_a, "u-new", &["viewer"]);
    let new_rsa = idp_a.token("RS256", new_claims.clone());
    let before = idp_a.jwks_fetches();
    let deadline = a_ready + Duration::from_secs(40);
    let mut early_refusals = 0;
    let accepted_after = loop {
        let response = chat(a, &new_rsa, "llama3.2");
        if response.status == 200 {
            break a_ready.elapsed();
        }
        assert_unauthorized(&response, "a rotated kid before the refresh");
        early_refusals += 1;
        assert!(
            Instant::now() < deadline,
            "the rotated key was not picked up within 40 s of startup ({} JWKS fetches)\n{}",
            idp_a.jwks_fetches(),
            a.output()
        );
        thread::sleep(Duration::from_millis(250));
    };
    eprintln!("rotated key accepted {accepted_after:?} after startup ({early_refusals} refusals)");
    assert_eq!(idp_a.jwks_fetches() - before, 1, "picking up the new keys took one fetch");
    for alg in ["ES256", "EdDSA", "PS384"] {
        assert_ok(&chat(a, &idp_a.token(alg, new_claims.clone()), "llama3.2"), alg);
    }
    // The IdP no longer publishes the old keys, so neither does butler; and the gate, just
    // used, keeps those now-unknown kids from causing another fetch.
    for token in &old_tokens {
        assert_unauthorized(&chat(a, token, "llama3.2"), "a kid rotated away");
    }
    assert_eq!(idp_a.jwks_fetches() - before, 1);

    // --- B: an outage once the gate is open.
    let b_claims = with_roles(&idp_b, "u-b", &["viewer"]);
    let b_known = idp_b.token("EdDSA", b_claims.clone());
    if let Some(left) = (b_ready + UNKNOWN_KEY_GAP + Duration::from_millis(500))
        .checked_duration_since(Instant::now())
    {
        thread::sleep(left);
    }
    idp_b.fail_jwks(true);
    let before = idp_b.jwks_fetches();
    let results = burst(b, &random_kid_tokens(&idp_b, 100));
    for (status, body) in &results {
        assert_eq!((*status, body.as_str()), (401, "{\"error\":\"unauthorized\"}\n"));
    }
    assert_eq!(
        idp_b.jwks_fetches() - before,
        1,
        "100 unknown kids with the gate open: exactly one (single-flight) fetch"
    );
    assert_ok(&chat(b, &b_known, "llama3.2"), "a known kid after a failed refresh");
    // The failed attempt counts toward the gap: the IdP recovers with new keys, but the next
    // unknown kid within 30 s neither fetches nor passes.
    idp_b.rotate();
    idp_b.fail_jwks(false);
    assert_unauthorized(
        &chat(b, &idp_b.token("RS256", b_claims), "llama3.2"),
        "a new kid right after a failed refresh",
    );
    assert_eq!(idp_b.jwks_fetches() - before, 1, "a failed attempt must close the gate");
    assert_ok(&chat(b, &b_known, "llama3.2"), "the cached key, still");
    assert!(a.is_running() && b.is_running());
}

/// The periodic refresh (`refresh_interval`) is not held back by the unknown-kid gap, keeps the
/// cached keys while the IdP fails, and picks up rotated keys once it recovers.
#[test]
fn periodic_refresh_keeps_cached_keys_while_the_idp_fails() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    let proxy =
        start_full(&idp, &fake, "oidc", "realm_access.roles", "    refresh_interval: 1s\n", false);
    let butler = &proxy.butler;
    let claims = with_roles(&idp, "u-1", &["viewer"]);
    let known = idp.token("ES256", claims.clone());
    assert_ok(&chat(butler, &known, "llama3.2"), "before the outage");

    idp.fail_jwks(true);
    let wait_fetches = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(6);
        while idp.jwks_fetches() < n {
            assert!(Instant::now() < deadline, "no periodic JWKS refresh\n{}", butler.output());
            thread::sleep(Duration::from_millis(50));
        }
    };
    wait_fetches(idp.jwks_fetches() + 2); // two failed refreshes
    assert_ok(&chat(butler, &known, "llama3.2"), "a cached key after failed refreshes");

    idp.rotate();
    idp.fail_jwks(false);
    let new = idp.token("RS256", claims);
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let response = chat(butler, &new, "llama3.2");
        if response.status == 200 {
            break;
        }
        assert_unauthorized(&response, "a rotated kid before the periodic refresh");
        assert!(Instant::now() < deadline, "the periodic refresh did not pick up the new keys");
        thread::sleep(Duration::from_millis(200));
    }
    assert_unauthorized(&chat(butler, &known, "llama3.2"), "a kid rotated away");
    assert!(butler.is_running());
}

// ---------------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------------

#[test]
fn roles_are_read_from_the_configured_claim_path() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    const DOTTED: &str = "https://example.org/roles";
    let paths = ["realm_access.roles", "groups", DOTTED];
    let proxies: Vec<Proxy> =
        paths.iter().map(|path| start_full(&idp, &fake, "oidc", path, "", false)).collect();

    // Where the roles are (a closure building the claims), and which butler reads them.
    type Placement = Box<dyn Fn(&mut Value, Value)>;
    let placements: Vec<(&str, Placement, usize)> = vec![
        (
            "nested realm_access.roles",
            Box::new(|c: &mut Value, r: Value| c["realm_access"] = json!({"roles": r})),
            0,
        ),
        (
            "a claim literally named realm_access.roles",
            Box::new(|c: &mut Value, r: Value| c["realm_access.roles"] = r),
            0,
        ),
        ("top-level groups", Box::new(|c: &mut Value, r: Value| c["groups"] = r), 1),
        ("the dotted claim name", Box::new(|c: &mut Value, r: Value| c[DOTTED] = r), 2),
    ];
    for (where_, place, reader) in &placements {
        for (form, roles) in [
            ("an array", json!(["other", "viewer"])),
            ("an array with non-strings", json!([7, null, "viewer", {"x": 1}])),
            ("a space-separated string", json!("other  viewer")),
            ("a single string", json!("viewer")),
        ] {
            let mut claims = idp.claims("u-roles");
            place(&mut claims, roles);
            let token = idp.token("ES256", claims);
            for (i, proxy) in proxies.iter().enumerate() {
                let what = format!("roles at {where_} as {form}, role_claim_path {}", paths[i]);
                let response = chat(&proxy.butler, &token, "llama3.2");
                if i == *reader {
                    assert_ok(&response, &what);
                    // The role found is viewer: its policy, not another's.
                    assert_error(
                        &chat(&proxy.butler, &token, "qwen2.5:7b"),
                        403,
                        "model not allowed",
                    );
                } else {
                    assert_unauthorized(&response, &what);
                }
            }
        }
        // Several roles in one string are all found: viewer and operator.
        let mut claims = idp.claims("u-two");
        place(&mut claims, json!("operator viewer"));
        let token = idp.token("EdDSA", claims);
        let butler = &proxies[*reader].butler;
        assert_ok(&chat(butler, &token, "llama3.2"), "viewer from a string");
        assert_ok(&chat(butler, &token, "qwen2.5:7b"), "operator from a string");
    }
}

#[test]
fn role_policies_merge_most_permissively_whatever_the_order() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    let proxy = start(&idp, &fake);
    let butler = &proxy.butler;
    let token = |sub: &str, roles: &[&str]| idp.token("RS256", with_roles(&idp, sub, roles));

    // A single role first, as the baseline.
    let viewer = token("u-viewer", &["viewer"]);
    assert_ok(&chat(butler, &viewer, "llama3.2"), "viewer");
    assert_error(&chat(butler, &viewer, "qwen2.5:7b"), 403, "model not allowed");
    assert_error(
        &chat_ctx(butler, &viewer, "llama3.2", Some(4096)),
        400,
        "num_ctx 4096 exceeds limit of 2048",
    );

    for (i, roles) in [["viewer", "operator"], ["operator", "viewer"]].iter().enumerate() {
        let t = token(&format!("u-both-{i}"), roles);
        let what = format!("{roles:?}");
        // Models: the union.
        assert_ok(&chat(butler, &t, "llama3.2"), &what);
        assert_ok(&chat(butler, &t, "qwen2.5:7b"), &what);
        assert_ok(&chat(butler, &t, "qwen2.5-coder:1.5b"), &what);
        assert_error(&chat(butler, &t, "llama3.3"), 403, "model not allowed");
        // Caps: the largest (operator's 8192), for either model.
        for model in ["llama3.2", "qwen2.5:7b"] {
            fake.clear_requests();
            assert_ok(&chat_ctx(butler, &t, model, Some(4096)), &format!("{what} {model} 4096"));
            let seen = fake.last_request().expect("forwarded");
            assert_eq!(seen.json()["options"]["num_ctx"], 4096, "{what}: forwarded as sent");
            assert_ok(&chat_ctx(butler, &t, model, Some(8192)), &format!("{what} {model} 8192"));
            assert_error(
                &chat_ctx(butler, &t, model, Some(9000)),
                400,
                "num_ctx 9000 exceeds limit of 8192",
            );
        }
    }

    // Duplicates change nothing: the deny list of `restricted` holds.
    for roles in [&["restricted"][..], &["restricted", "restricted"]] {
        let t = token("u-restricted", roles);
        assert_error(&chat(butler, &t, "llama3.3"), 403, "model not allowed");
        assert_error(&chat(butler, &t, "llama3.3:70b"), 403, "model not allowed");
        assert_ok(&chat(butler, &t, "qwen2.5:7b"), &format!("{roles:?}"));
        assert_ok(&chat(butler, &t, "llama3.2"), &format!("{roles:?}"));
    }
    // A role that allows a model another denies: allowed if any role allows it.
    let t = token("u-restricted-unlimited", &["restricted", "unlimited"]);
    assert_ok(&chat(butler, &t, "llama3.3"), "[restricted, unlimited]");

    // Unset is unlimited, and unlimited wins.
    for roles in [["viewer", "unlimited"], ["unlimited", "viewer"]] {
        let t = token("u-unlimited", &roles);
        assert_ok(&chat_ctx(butler, &t, "llama3.2", Some(100_000)), &format!("{roles:?}"));
    }

    // Rate limits: the most permissive wins (and no limit beats any limit).
    let tight = token("u-tight", &["tight"]);
    assert_ok(&chat(butler, &tight, "llama3.2"), "tight, first request");
    assert_error(&chat(butler, &tight, "llama3.2"), 429, "rate limit exceeded");
    let tight_twice = token("u-tight-twice", &["tight", "tight"]);
    assert_ok(&chat(butler, &tight_twice, "llama3.2"), "[tight, tight], first request");
    assert_error(&chat(butler, &tight_twice, "llama3.2"), 429, "rate limit exceeded");
    for (sub, roles) in [("u-tv", ["tight", "viewer"]), ("u-vt", ["viewer", "tight"])] {
        let t = token(sub, &roles);
        for n in 0..4 {
            assert_ok(&chat(butler, &t, "llama3.2"), &format!("{roles:?} request {n}"));
        }
    }
    let t = token("u-tu", &["unlimited", "tight"]);
    for n in 0..4 {
        assert_ok(&chat(butler, &t, "llama3.2"), &format!("[unlimited, tight] request {n}"));
    }
    // Rate state is per subject (`sub`), not per token: a fresh token for u-tight is limited.
    let tight_again = token("u-tight", &["tight"]);
    assert_error(&chat(butler, &tight_again, "llama3.2"), 429, "rate limit exceeded");
    // ... and not per display name: two subjects both called "sam" have a request each.
    for sub in ["u-sam-1", "u-sam-2"] {
        let mut claims = with_roles(&idp, sub, &["tight"]);
        claims["preferred_username"] = json!("sam");
        assert_ok(&chat(butler, &idp.token("ES256", claims), "llama3.2"), sub);
    }
}

// ---------------------------------------------------------------------------------------------
// Logs and metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn logs_and_metrics_name_the_user_never_the_token() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    let proxy = start(&idp, &fake);
    let butler = &proxy.butler;

    let mut alice_claims = with_roles(&idp, "u-alice-7f3a", &["viewer"]);
    alice_claims["preferred_username"] = json!("alice");
    let alice = idp.token("RS256", alice_claims);
    let bob = idp.token("EdDSA", with_roles(&idp, "u-bob-9c2e", &["viewer"]));
    let forged = idp.forged_token("ES256", with_roles(&idp, "u-mallory", &["viewer"]));

    let mut expected: Vec<(String, &str, u16)> = Vec::new();
    for (token, user, model, status) in [
        (&alice, "alice", "llama3.2", 200),
        (&alice, "alice", "qwen2.5:7b", 403),
        (&bob, "u-bob-9c2e", "llama3.2", 200),
    ] {
        let response = chat(butler, token, model);
        assert_eq!(response.status, status, "{user} {model}: {}", response.body_str());
        expected.push((
            response.header("x-request-id").expect("request id").to_owned(),
            user,
            status,
        ));
    }
    assert_unauthorized(&chat(butler, &forged, "llama3.2"), "forged");

    for (id, user, status) in &expected {
        for msg in ["request", "response"] {
            let line = butler
                .wait_log(|v| v["msg"] == msg && v["request_id"] == id.as_str(), WAIT)
                .unwrap_or_else(|| panic!("no {msg} line for {id}\n{}", butler.output()));
            assert_eq!(line["user"], *user, "{line}");
            assert!(line.get("client").is_none(), "an OIDC subject is not a client: {line}");
            if msg == "response" {
                assert_eq!(line["status"], *status, "{line}");
            }
        }
    }
    let rejected = butler
        .wait_log(
            |v| v["msg"] == "request rejected" && v["request_id"] == expected[1].0.as_str(),
            WAIT,
        )
        .unwrap_or_else(|| panic!("no rejection line\n{}", butler.output()));
    assert_eq!(rejected["user"], "alice", "{rejected}");

    let metrics = get(butler.addr(), "/metrics", &[]);
    assert_eq!(metrics.status, 200, "{}", metrics.body_str());
    let metrics = metrics.body_str();
    let has = |prefix: &str, needle: &str| {
        metrics.lines().any(|l| l.starts_with(prefix) && l.contains(needle))
    };
    for (client, status) in [("alice", 200), ("alice", 403), ("u-bob-9c2e", 200)] {
        let label = format!("client=\"{client}\"");
        let status = format!("status=\"{status}\"");
        assert!(
            metrics.lines().any(|l| l.starts_with("butler_requests_total{")
                && l.contains(&label)
                && l.contains("path=\"/api/chat\"")
                && l.contains(&status)),
            "no requests series for {label} {status}:\n{metrics}"
        );
    }
    assert!(
        has("butler_requests_rejected_total{", "client=\"alice\",reason=\"model_denied\""),
        "{metrics}"
    );
    assert!(
        !metrics.contains("u-alice-7f3a"),
        "alice's label is her preferred_username:\n{metrics}"
    );

    let mut output = butler.stdout_lines().join("\n");
    output.push('\n');
    output.push_str(&butler.stderr());
    output.push('\n');
    output.push_str(&metrics);
    for (what, token) in
        [("alice's token", &alice), ("bob's token", &bob), ("the forged token", &forged)]
    {
        let signature = token.rsplit('.').next().expect("signature");
        let payload = token.split('.').nth(1).expect("payload");
        assert!(!output.contains(signature), "{what}'s signature is in the output:\n{output}");
        assert!(!output.contains(payload), "{what}'s payload is in the output:\n{output}");
    }
}

// ---------------------------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------------------------

/// Runs butler on `yaml` (with `idp`'s CA unless `with_ca` is false) and expects it to exit
/// non-zero with one line naming OIDC; returns its output.
fn fails_to_start(fake: &FakeOllama, idp: &TestIdp, issuer: Option<&str>, with_ca: bool) -> String {
    let dir = TempDir::new();
    let ca = idp.write_ca(dir.path());
    let mut yaml = config(fake, idp, &ca, "oidc", "groups", "", false);
    if let Some(issuer) = issuer {
        yaml = yaml.replace(&format!("\"{}\"", idp.issuer()), &format!("\"{issuer}\""));
    }
    if !with_ca {
        yaml = yaml.replace(&format!("    ca_file: \"{}\"\n", ca.display()), "");
    }
    dir.write("butler.yaml", &yaml);
    let started = Instant::now();
    let (code, stdout, stderr) = run_cli_in(dir.path(), &["--config", "butler.yaml"], &[], None);
    let output = format!("{stdout}\n{stderr}");
    assert_ne!(code, 0, "butler started without a usable IdP:\n{output}");
    assert!(!stdout.contains("\"msg\":\"listening\""), "it listened first:\n{output}");
    assert!(output.contains("OIDC"), "the error does not mention OIDC:\n{output}");
    assert!(started.elapsed() < Duration::from_secs(15), "failing took {:?}", started.elapsed());
    output
}

#[test]
fn startup_fails_closed_without_a_trustworthy_idp() {
    let fake = FakeOllama::start();
    let idp = TestIdp::start();

    let nobody = format!("https://{}", unused_addr());
    let output = fails_to_start(&fake, &idp, Some(&nobody), true);
    assert!(output.contains(&nobody), "the error does not name the issuer:\n{output}");

    idp.advertise_issuer(Some("https://impostor.example.org"));
    let output = fails_to_start(&fake, &idp, None, true);
    assert!(output.contains("issuer"), "the error does not mention the issuer:\n{output}");
    let slash = format!("{}/", idp.issuer());
    idp.advertise_issuer(Some(&slash));
    fails_to_start(&fake, &idp, None, true);
    idp.advertise_issuer(None);

    // A certificate from a CA butler was not told to trust.
    fails_to_start(&fake, &idp, None, false);

    // A JWKS that fails, or has no usable key.
    idp.fail_jwks(true);
    fails_to_start(&fake, &idp, None, true);
    idp.fail_jwks(false);
    idp.serve_jwks(Some(r#"{"keys":[]}"#.into()));
    fails_to_start(&fake, &idp, None, true);
    let only_bad = json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "broken", "x": "!", "y": "!"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
    ]});
    idp.serve_jwks(Some(only_bad.to_string()));
    fails_to_start(&fake, &idp, None, true);
    idp.serve_jwks(None);

    // The control: the same IdP, healthy, is accepted.
    let proxy = start_full(&idp, &fake, "oidc", "groups", "", false);
    let mut claims = idp.claims("u-1");
    claims["groups"] = json!(["viewer"]);
    assert_ok(&chat(&proxy.butler, &idp.token("RS256", claims), "llama3.2"), "healthy IdP");
}

// ---------------------------------------------------------------------------------------------
// Mode `either`
// ---------------------------------------------------------------------------------------------

#[test]
fn either_mode_accepts_api_keys_and_oidc_tokens() {
    let idp = TestIdp::start();
    let fake = FakeOllama::start();
    let proxy = start_full(&idp, &fake, "either", "realm_access.roles", "", true);
    let butler = &proxy.butler;
    let addr = butler.addr();
    let body = json!({"model": "qwen2.5:7b", "messages": [], "stream": false});
    let mut claims = with_roles(&idp, "u-carol", &["viewer"]);
    claims["preferred_username"] = json!("carol");
    let token = idp.token("ES256", claims);

    let key_bearer = bearer(CLIENT_KEY);
    for (what, header) in [
        ("Bearer key", ("Authorization", key_bearer.as_str())),
        ("x-api-key", ("x-api-key", CLIENT_KEY)),
    ] {
        let response = post_json(addr, "/api/chat", &[header], &body);
        assert_ok(&response, what);
        let id = response.header("x-request-id").expect("request id").to_owned();
        let line = butler
            .wait_log(|v| v["msg"] == "response" && v["request_id"] == id.as_str(), WAIT)
            .unwrap_or_else(|| panic!("no response line\n{}", butler.output()));
        assert_eq!(line["client"], "c1", "{line}");
    }
    let response = chat(butler, &token, "llama3.2");
    assert_ok(&response, "OIDC token");
    let id = response.header("x-request-id").expect("request id").to_owned();
    let line = butler
        .wait_log(|v| v["msg"] == "response" && v["request_id"] == id.as_str(), WAIT)
        .unwrap_or_else(|| panic!("no response line\n{}", butler.output()));
    assert_eq!(line["user"], "carol", "{line}");
    // The token's role still applies.
    assert_error(&chat(butler, &token, "qwen2.5:7b"), 403, "model not allowed");
    assert_eq!(fake.request_count(), 3);

    let unknown = "sk-test-not-configured-0a1b2c3d4e5f";
    let unknown_bearer = bearer(unknown);
    let forged_bearer = bearer(&idp.forged_token("RS256", with_roles(&idp, "u-x", &["viewer"])));
    for (what, header) in [
        ("an unconfigured key as Bearer", ("Authorization", unknown_bearer.as_str())),
        ("an unconfigured key as x-api-key", ("x-api-key", unknown)),
        ("a forged token", ("Authorization", forged_bearer.as_str())),
    ] {
        assert_unauthorized(&post_json(addr, "/api/chat", &[header], &body), what);
    }
    assert_eq!(fake.request_count(), 3, "a refused request reached the upstream");
}
