//! `butler::auth::oidc` against the HTTPS test IdP (`support::idp`): discovery, JWKS fetching
//! over TLS with a private CA, token validation, key rotation and JWKS outages. No butler
//! process is involved; the product tests drive the same paths through the binary.

mod support;

use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use butler::auth::oidc::{Oidc, OidcSettings, OidcSubject};
use serde_json::{Value, json};
use support::idp::{IDP_CLIENT_ID, TestIdp, unix_now};

/// The gap the module keeps between two fetches triggered by unknown `kid`s (SPEC §5).
const UNKNOWN_KEY_GAP: Duration = Duration::from_secs(30);

fn settings(idp: &TestIdp, role_claim_path: &str) -> OidcSettings {
    OidcSettings {
        issuer: idp.issuer(),
        client_id: IDP_CLIENT_ID.into(),
        role_claim_path: role_claim_path.into(),
        refresh_interval: Duration::from_secs(3600),
        ca_pem: Some(idp.ca_pem().into_bytes()),
    }
}

fn start(idp: &TestIdp) -> Arc<Oidc> {
    Oidc::start(settings(idp, "realm_access.roles")).expect("OIDC start")
}

#[test]
fn tokens_of_each_key_type_verify_and_bad_ones_do_not() {
    let idp = TestIdp::start();
    let oidc = start(&idp);
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1));

    let mut claims = idp.claims("u-123");
    claims["preferred_username"] = json!("alice");
    claims["realm_access"] = json!({"roles": ["viewer", "operator", "viewer"]});
    let expected = OidcSubject {
        name: "alice".into(),
        sub: "u-123".into(),
        issuer: idp.issuer(),
        roles: vec!["viewer".into(), "operator".into()],
    };
    for alg in ["RS256", "ES256", "EdDSA", "PS256", "RS512"] {
        assert_eq!(oidc.verify(&idp.token(alg, claims.clone())), Ok(expected.clone()), "{alg}");
    }
    // Without a kid the token is tried against the keys of its type.
    assert_eq!(oidc.verify(&idp.token_with_kid("ES256", None, claims.clone())), Ok(expected));
    // No preferred_username: the name is the sub.
    let plain = oidc.verify(&idp.token("RS256", idp.claims("u-9"))).expect("valid");
    assert_eq!((plain.name.as_str(), plain.roles.len()), ("u-9", 0));

    let refused = |token: String, why: &str| {
        assert!(oidc.verify(&token).is_err(), "{why} was accepted");
    };
    let now = unix_now();
    let set = |name: &str, value: Value| {
        let mut claims = idp.claims("u");
        claims[name] = value;
        claims
    };
    let without = |name: &str| {
        let mut claims = idp.claims("u");
        claims.as_object_mut().expect("claims object").remove(name);
        claims
    };
    refused(idp.token("RS256", set("iss", json!("https://other.example"))), "wrong iss");
    let slash = format!("{}/", idp.issuer());
    refused(idp.token("ES256", set("iss", json!(slash))), "iss with a trailing slash");
    refused(idp.token("EdDSA", set("aud", json!("someone-else"))), "wrong aud");
    refused(idp.token("RS256", set("aud", json!(["a", "b"]))), "aud array without client_id");
    refused(idp.token("RS256", set("exp", json!(now - 120))), "expired");
    refused(idp.token("ES256", without("exp")), "missing exp");
    refused(idp.token("ES256", set("nbf", json!(now + 600))), "nbf in the future");
    refused(idp.token("EdDSA", without("sub")), "missing sub");
    refused(idp.hs256_token(b"0123456789abcdef0123456789abcdef", idp.claims("u")), "HS256");
    refused(
        idp.hs256_token(idp.ca_pem().as_bytes(), idp.claims("u")),
        "HS256 keyed with public data",
    );
    refused(idp.none_token(idp.claims("u")), "alg none");
    for alg in ["RS256", "ES256", "EdDSA"] {
        refused(idp.forged_token(alg, idp.claims("u")), "a wrong signature");
    }
    refused(
        idp.token_with_kid("ES256", Some(&idp.kid("RS256")), idp.claims("u")),
        "alg not fitting the kid's key",
    );
    refused(idp.token_with_kid("RS256", Some("broken"), idp.claims("u")), "the malformed JWKS key");
    refused(idp.token_with_kid("RS256", Some("enc-g0"), idp.claims("u")), "the encryption key");
    refused(format!("{}x", idp.token("RS256", idp.claims("u"))), "a mangled signature");
    // Everything above was judged on the keys from startup: within 30 s, no refetch.
    assert_eq!(idp.jwks_fetches(), 1);
}

#[test]
fn roles_come_from_the_configured_claim_path() {
    let idp = TestIdp::start();
    let mut claims = idp.claims("u-1");
    claims["realm_access"] = json!({"roles": ["realm-admin", "viewer"]});
    claims["groups"] = json!(["family", 7, "kids", "family"]);
    claims["https://example.org/roles"] = json!("operator  viewer operator");
    let token = idp.token("ES256", claims);
    for (path, roles) in [
        ("realm_access.roles", vec!["realm-admin", "viewer"]),
        ("groups", vec!["family", "kids"]),
        ("https://example.org/roles", vec!["operator", "viewer"]),
        ("resource_access.butler.roles", vec![]),
    ] {
        let oidc = Oidc::start(settings(&idp, path)).expect("OIDC start");
        assert_eq!(oidc.verify(&token).expect("valid token").roles, roles, "{path}");
    }
}

/// A loopback port with nothing listening.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[test]
fn startup_fails_closed() {
    let idp = TestIdp::start();
    let fails = |settings: OidcSettings, why: &str| -> String {
        let err = Oidc::start(settings).expect_err(why);
        eprintln!("{why}: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
        err
    };

    let mut plain = settings(&idp, "groups");
    plain.issuer = idp.issuer().replacen("https://", "http://", 1);
    fails(plain, "http issuer");

    let mut unreachable = settings(&idp, "groups");
    unreachable.issuer = format!("https://127.0.0.1:{}", closed_port());
    fails(unreachable, "unreachable IdP");

    let mut untrusted = settings(&idp, "groups");
    untrusted.ca_pem = None;
    fails(untrusted, "a certificate from an unknown CA");

    let mut other_ca = settings(&idp, "groups");
    other_ca.ca_pem = Some(TestIdp::start().ca_pem().into_bytes());
    fails(other_ca, "another CA");

    let mut not_issuer = settings(&idp, "groups");
    not_issuer.issuer = format!("{}/realms/x", idp.issuer());
    fails(not_issuer, "a discovery document that is not there");

    idp.advertise_issuer(Some("https://127.0.0.1:1"));
    let err = fails(settings(&idp, "groups"), "issuer mismatch");
    assert!(err.contains("issuer"), "{err}");
    idp.advertise_issuer(Some(&format!("{}/", idp.issuer())));
    fails(settings(&idp, "groups"), "issuer differing by a slash");
    idp.advertise_issuer(None);

    idp.fail_jwks(true);
    fails(settings(&idp, "groups"), "JWKS answering 500");
    idp.fail_jwks(false);

    for body in [
        "<html>not json</html>".to_string(),
        r#"{"keys": []}"#.to_string(),
        r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}, {"kty": "RSA", "n": "!", "e": "AQAB"}]}"#
            .to_string(),
    ] {
        idp.serve_jwks(Some(body));
        fails(settings(&idp, "groups"), "an unusable JWKS");
    }
    // A valid JWKS, but larger than 1 MiB.
    let mut oversized: Value = serde_json::from_str(&idp.jwks()).expect("JWKS");
    oversized["padding"] = json!("x".repeat(1024 * 1024));
    idp.serve_jwks(Some(oversized.to_string()));
    let err = fails(settings(&idp, "groups"), "an oversized JWKS");
    assert!(err.contains("larger than"), "{err}");
    idp.serve_jwks(None);
    assert!(Oidc::start(settings(&idp, "groups")).is_ok(), "the IdP itself is fine");
}

#[test]
fn the_periodic_refresh_picks_up_new_keys() {
    let idp = TestIdp::start();
    let mut s = settings(&idp, "groups");
    s.refresh_interval = Duration::from_secs(1);
    let oidc = Oidc::start(s).expect("OIDC start");
    idp.rotate();
    // Within 30 s of startup an unknown kid triggers no fetch: only the timer can bring the key.
    let token = idp.token("EdDSA", idp.claims("u"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while oidc.verify(&token).is_err() {
        assert!(Instant::now() < deadline, "the new key never arrived");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(idp.jwks_fetches() >= 2);
}

/// Rotation picked up through an unknown `kid`, and an outage that keeps the cached keys, with
/// at most one fetch per 30 s however many unknown `kid`s arrive. Both scenarios need the 30 s
/// gap after the startup fetch to pass, so they share one wait.
#[test]
fn rotation_and_outage_respect_the_30_second_gap() {
    let rotating = TestIdp::start();
    let rotating_oidc = start(&rotating);
    let failing = TestIdp::start();
    let failing_oidc = start(&failing);
    let started = Instant::now();
    let old_token = rotating.token("RS256", rotating.claims("u"));
    let cached_token = failing.token("ES256", failing.claims("u"));

    // Within 30 s of startup an unknown kid cannot trigger a fetch, even a failing one.
    failing.fail_jwks(true);
    storm(&failing_oidc, &failing);
    assert_eq!(failing.jwks_fetches(), 1, "the startup fetch counts toward the gap");
    assert!(failing_oidc.verify(&cached_token).is_ok());
    rotating.rotate();
    let new_token = rotating.token("EdDSA", rotating.claims("u"));
    assert!(rotating_oidc.verify(&new_token).is_err(), "too soon after startup");
    assert_eq!(rotating.jwks_fetches(), 1);

    thread::sleep((UNKNOWN_KEY_GAP + Duration::from_millis(300)).saturating_sub(started.elapsed()));

    // Rotation: the unknown kid now triggers one fetch, and the new keys work.
    assert!(rotating_oidc.verify(&new_token).is_ok());
    assert_eq!(rotating.jwks_fetches(), 2);
    assert!(rotating_oidc.verify(&rotating.token("ES256", rotating.claims("u"))).is_ok());
    assert!(rotating_oidc.verify(&old_token).is_err(), "the old keys were replaced");
    assert_eq!(rotating.jwks_fetches(), 2, "the gap holds after a successful fetch too");

    // Outage: 100 tokens with random kids at once cause one (failed) fetch in all.
    storm(&failing_oidc, &failing);
    assert_eq!(failing.jwks_fetches(), 2);
    assert!(failing_oidc.verify(&cached_token).is_ok(), "cached keys survive the outage");
    // The failed attempt counts: recovery and rotation are not fetched before another 30 s.
    failing.fail_jwks(false);
    failing.rotate();
    assert!(failing_oidc.verify(&failing.token("RS256", failing.claims("u"))).is_err());
    assert_eq!(failing.jwks_fetches(), 2);
    assert!(failing_oidc.verify(&cached_token).is_ok());
}

/// 100 concurrent tokens with random `kid`s, all refused.
fn storm(oidc: &Arc<Oidc>, idp: &TestIdp) {
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            let kid = format!("random-{i}-{}", unix_now());
            idp.token_with_kid(["RS256", "ES256", "EdDSA"][i % 3], Some(&kid), idp.claims("u"))
        })
        .collect();
    let handles: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let oidc = oidc.clone();
            thread::spawn(move || oidc.verify(&token))
        })
        .collect();
    for handle in handles {
        assert!(handle.join().expect("verifier").is_err());
    }
}
