//! Standalone JWTs (SPEC §5): HS256 tokens that butler issues at `POST /auth/login` and accepts
//! as `Authorization: Bearer`.
//!
//! Signature checking is delegated to `jsonwebtoken`; every time-dependent claim is checked here
//! against the caller's `now` so that tests (and the caller) control the clock.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// The `iss` of every token butler issues, and the only one it accepts.
pub const ISSUER: &str = "butler";

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: f64 = 5.0;

/// Issues and verifies butler's own HS256 tokens.
pub struct JwtIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    expiry: Duration,
}

impl fmt::Debug for JwtIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtIssuer").field("expiry", &self.expiry).finish_non_exhaustive()
    }
}

impl JwtIssuer {
    /// `secret` is the HMAC key (the config requires at least 32 bytes).
    ///
    /// # Panics
    /// If `secret` is empty, which the config never lets through.
    pub fn new(secret: &[u8], expiry: Duration) -> JwtIssuer {
        assert!(!secret.is_empty(), "JWT secret must not be empty");
        let encoding = EncodingKey::from_secret(secret).expect("non-empty HMAC secret");
        let decoding = DecodingKey::from_secret(secret).expect("non-empty HMAC secret");
        // The library checks the algorithm and the signature only; claims are checked in
        // `verify` against the caller's clock.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        JwtIssuer { encoding, decoding, validation, expiry }
    }

    /// Signs `{"sub": user, "iat": now, "exp": now + expiry, "iss": "butler"}` with HS256.
    pub fn issue(&self, user: &str, now: SystemTime) -> String {
        let iat = unix_secs(now).floor() as u64;
        let exp = iat.saturating_add(self.expiry.as_secs());
        let claims = serde_json::json!({ "sub": user, "iat": iat, "exp": exp, "iss": ISSUER });
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with a non-empty secret cannot fail")
    }

    /// Validates a token and returns its `sub`.
    ///
    /// The header's `alg` must be exactly HS256; the signature must match; `iss` must be
    /// `"butler"`; `exp` is required and must not be past (5 s leeway); `nbf`, when present,
    /// must not be in the future (same leeway); `sub` must be a non-empty string. Whether `sub`
    /// names a configured user is the caller's business. The error is a short reason for logs.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<String, &'static str> {
        if token.len() > MAX_TOKEN_LEN {
            return Err("token too long");
        }
        // Cheap structural check first so that the reasons below stay meaningful.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed token header or unsupported alg")?;
        if header.alg != Algorithm::HS256 {
            return Err("alg not allowed");
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &self.validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::InvalidAlgorithm => "alg not allowed",
                    ErrorKind::InvalidSignature => "bad signature",
                    _ => "malformed token",
                })?;
        let claims = data.claims;

        if claims.get("iss").and_then(Value::as_str) != Some(ISSUER) {
            return Err("wrong or missing iss");
        }
        let now = unix_secs(now);
        let exp = match claims.get("exp") {
            None | Some(Value::Null) => return Err("missing exp"),
            Some(v) => numeric_date(v).ok_or("malformed exp")?,
        };
        if now >= exp + LEEWAY_SECS {
            return Err("expired");
        }
        match claims.get("nbf") {
            None | Some(Value::Null) => {}
            Some(v) => {
                if numeric_date(v).ok_or("malformed nbf")? > now + LEEWAY_SECS {
                    return Err("not yet valid");
                }
            }
        }
        match claims.get("sub").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => Ok(sub.to_owned()),
            _ => Err("missing sub"),
        }
    }
}

/// A JSON NumericDate: a finite number of seconds since the epoch.
fn numeric_date(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::json;
    use sha2::Sha256;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn issuer() -> JwtIssuer {
        JwtIssuer::new(SECRET, Duration::from_secs(3600))
    }

    fn b64(data: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(data)
    }

    /// HMAC-SHA256 by hand (RFC 2104), so that tests can sign arbitrary headers.
    fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
        use sha2::Digest;
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

    /// Builds a token with any header and claims, HMAC-SHA256-signed with `key`.
    fn forge(header: &Value, claims: &Value, key: &[u8]) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = hmac_sha256(key, msg.as_bytes());
        format!("{msg}.{}", b64(&sig))
    }

    fn hs256() -> Value {
        json!({"alg": "HS256", "typ": "JWT"})
    }

    #[test]
    fn round_trip() {
        let j = issuer();
        let token = j.issue("alice", t(1_000_000));
        assert_eq!(j.verify(&token, t(1_000_000)), Ok("alice".to_owned()));
        assert_eq!(j.verify(&token, t(1_000_000 + 3599)), Ok("alice".to_owned()));
        // The claims are exactly the documented ones.
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(
            claims,
            json!({"sub": "alice", "iat": 1_000_000, "exp": 1_003_600, "iss": "butler"})
        );
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
    }

    #[test]
    fn hand_built_hs256_token_is_accepted() {
        // Guards the forging helper used by the negative tests below.
        let token = forge(&hs256(), &json!({"sub": "bob", "iss": "butler", "exp": 2000}), SECRET);
        assert_eq!(issuer().verify(&token, t(1000)), Ok("bob".to_owned()));
    }

    #[test]
    fn missing_exp() {
        let token = forge(&hs256(), &json!({"sub": "bob", "iss": "butler", "iat": 1000}), SECRET);
        assert_eq!(issuer().verify(&token, t(1000)), Err("missing exp"));
        let token = forge(&hs256(), &json!({"sub": "bob", "iss": "butler", "exp": null}), SECRET);
        assert_eq!(issuer().verify(&token, t(1000)), Err("missing exp"));
        let token = forge(&hs256(), &json!({"sub": "bob", "iss": "butler", "exp": "2000"}), SECRET);
        assert_eq!(issuer().verify(&token, t(1000)), Err("malformed exp"));
    }

    #[test]
    fn expired() {
        let j = issuer();
        let token = j.issue("alice", t(1_000_000));
        let exp = 1_000_000 + 3600;
        // Within the leeway it still passes; past it, not.
        assert!(j.verify(&token, t(exp)).is_ok());
        assert!(j.verify(&token, t(exp + 4)).is_ok());
        assert_eq!(j.verify(&token, t(exp + 5)), Err("expired"));
        assert_eq!(j.verify(&token, t(exp + 86_400)), Err("expired"));
    }

    #[test]
    fn wrong_or_missing_iss() {
        let j = issuer();
        for claims in [
            json!({"sub": "bob", "iss": "other", "exp": 2000}),
            json!({"sub": "bob", "iss": ["butler"], "exp": 2000}),
            json!({"sub": "bob", "exp": 2000}),
        ] {
            let token = forge(&hs256(), &claims, SECRET);
            assert_eq!(j.verify(&token, t(1000)), Err("wrong or missing iss"), "{claims}");
        }
    }

    #[test]
    fn other_secret() {
        let other =
            JwtIssuer::new(b"another-secret-of-at-least-32-bytes!", Duration::from_secs(60));
        let token = other.issue("alice", t(1000));
        assert_eq!(issuer().verify(&token, t(1000)), Err("bad signature"));
    }

    #[test]
    fn alg_none() {
        let claims = json!({"sub": "bob", "iss": "butler", "exp": 2000});
        let body = format!(
            "{}.{}",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        );
        let j = issuer();
        // Unsigned, with an empty signature, and with a valid HS256 signature attached.
        assert!(j.verify(&format!("{body}."), t(1000)).is_err());
        assert!(j.verify(&body, t(1000)).is_err());
        let sig = b64(&hmac_sha256(SECRET, body.as_bytes()));
        assert!(j.verify(&format!("{body}.{sig}"), t(1000)).is_err());
        for alg in ["None", "NONE", ""] {
            let token = forge(&json!({"alg": alg}), &claims, SECRET);
            assert!(j.verify(&token, t(1000)).is_err(), "{alg}");
        }
    }

    #[test]
    fn other_algs() {
        let claims = json!({"sub": "bob", "iss": "butler", "exp": 2000});
        let j = issuer();
        for alg in ["RS256", "HS384", "HS512", "ES256", "PS256", "EdDSA"] {
            // The signature is HMAC-SHA256 with the right secret: only the header's alg is wrong.
            let token = forge(&json!({"alg": alg, "typ": "JWT"}), &claims, SECRET);
            assert_eq!(j.verify(&token, t(1000)), Err("alg not allowed"), "{alg}");
        }
        // Properly signed HS384 token with the same secret.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(j.verify(&token, t(1000)), Err("alg not allowed"));
    }

    #[test]
    fn nbf() {
        let j = issuer();
        let claims = json!({"sub": "bob", "iss": "butler", "exp": 5000, "nbf": 2000});
        let token = forge(&hs256(), &claims, SECRET);
        assert_eq!(j.verify(&token, t(1000)), Err("not yet valid"));
        assert_eq!(j.verify(&token, t(1994)), Err("not yet valid"));
        assert_eq!(j.verify(&token, t(1995)), Ok("bob".to_owned()));
        assert_eq!(j.verify(&token, t(3000)), Ok("bob".to_owned()));
        let claims = json!({"sub": "bob", "iss": "butler", "exp": 5000, "nbf": "soon"});
        let token = forge(&hs256(), &claims, SECRET);
        assert_eq!(j.verify(&token, t(3000)), Err("malformed nbf"));
    }

    #[test]
    fn sub_must_be_non_empty_string() {
        let j = issuer();
        for claims in [
            json!({"iss": "butler", "exp": 2000}),
            json!({"sub": "", "iss": "butler", "exp": 2000}),
            json!({"sub": 42, "iss": "butler", "exp": 2000}),
        ] {
            let token = forge(&hs256(), &claims, SECRET);
            assert_eq!(j.verify(&token, t(1000)), Err("missing sub"), "{claims}");
        }
        // jsonwebtoken's own claim pre-parse already refuses this one.
        let token = forge(&hs256(), &json!({"sub": ["bob"], "iss": "butler", "exp": 2000}), SECRET);
        assert!(j.verify(&token, t(1000)).is_err());
    }

    #[test]
    fn tampered_payload() {
        let j = issuer();
        let token = j.issue("alice", t(1000));
        let mut parts: Vec<&str> = token.split('.').collect();
        let claims = json!({"sub": "admin", "iat": 1000, "exp": 4600, "iss": "butler"});
        let forged = b64(claims.to_string().as_bytes());
        parts[1] = &forged;
        assert_eq!(j.verify(&parts.join("."), t(1000)), Err("bad signature"));
        // Flipping one signature character is caught as well.
        let mut bad = token.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert!(j.verify(std::str::from_utf8(&bad).unwrap(), t(1000)).is_err());
    }

    #[test]
    fn malformed_and_oversized() {
        let j = issuer();
        for token in ["", "abc", "a.b", "a.b.c", "a.b.c.d", "...."] {
            assert!(j.verify(token, t(1000)).is_err(), "{token:?}");
        }
        let claims = json!({"sub": "bob", "iss": "butler", "exp": 2000, "pad": "x".repeat(17_000)});
        let token = forge(&hs256(), &claims, SECRET);
        assert_eq!(j.verify(&token, t(1000)), Err("token too long"));
        // A payload that is not an object.
        let token = forge(&hs256(), &json!(["sub", "bob"]), SECRET);
        assert_eq!(j.verify(&token, t(1000)), Err("malformed token"));
    }

    #[test]
    fn debug_does_not_print_secret() {
        let s = format!("{:?}", issuer());
        assert!(!s.contains("0123456789abcdef"), "{s}");
    }
}
