//! A test OpenID provider: an HTTPS server on loopback serving a discovery document and a JWKS,
//! with a freshly generated test CA, and helpers that sign tokens with its keys.
//!
//! - TLS: a CA generated per instance ([`TestIdp::ca_pem`], for butler's `ca_file`) and a server
//!   certificate for `127.0.0.1` and `localhost` signed by it.
//! - Keys: RSA (RS256, and any RS*/PS* since the RSA JWK pins no `alg`), EC P-256 (ES256) and
//!   Ed25519 (EdDSA), each with a `kid` that changes on [`TestIdp::rotate`]. The JWKS also holds
//!   an encryption key and a malformed key, which a correct client skips.
//! - Faults: [`TestIdp::fail_jwks`] (the JWKS answers 500), [`TestIdp::serve_jwks`] (any body),
//!   [`TestIdp::advertise_issuer`] (discovery names another issuer); fetches are counted.
//!
//! RSA key generation is slow in debug builds, so the RSA keys are three fixed test-only PEMs
//! (generated once with `openssl genrsa -traditional 2048`) used in turn; the EC and Ed25519 keys
//! are generated per instance and per rotation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The audience [`TestIdp::claims`] puts in tokens: configure butler's `client_id` with it.
pub const IDP_CLIENT_ID: &str = "butler";

/// Path of the JWKS on the test IdP.
const JWKS_PATH: &str = "/jwks";
/// Per-connection socket timeouts, so a stuck client never holds a thread for long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// A running test IdP; stops accepting connections when dropped.
pub struct TestIdp {
    addr: SocketAddr,
    issuer: String,
    ca_pem: String,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    fail_jwks: AtomicBool,
    stop: AtomicBool,
}

struct State {
    issuer: String,
    /// The `issuer` the discovery document names, when not the real one.
    advertised_issuer: Option<String>,
    /// A JWKS body served instead of the real one.
    jwks_override: Option<String>,
    generation: usize,
    rsa: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn rsa(generation: usize) -> SigningKey {
        let pem = RSA_PEMS[generation % RSA_PEMS.len()];
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("test RSA key");
        let kid = format!("rsa-g{generation}");
        let jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("RSA JWK");
        let mut jwk = serde_json::to_value(jwk).expect("JWK as JSON");
        let object = jwk.as_object_mut().expect("JWK object");
        object.remove("alg"); // no pinned alg: RS* and PS* tokens all fit
        object.insert("kid".into(), json!(kid));
        object.insert("use".into(), json!("sig"));
        SigningKey { kid, encoding, jwk }
    }

    fn ec(generation: usize) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let raw = pair.public_key_raw(); // 0x04 || x || y
        let (x, y) = raw[1..].split_at(32);
        let kid = format!("ec-g{generation}");
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        });
        SigningKey { kid, encoding: EncodingKey::from_ec_der(&pair.serialize_der()), jwk }
    }

    fn ed(generation: usize) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        let kid = format!("ed-g{generation}");
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw()),
        });
        SigningKey { kid, encoding: EncodingKey::from_ed_der(&pair.serialize_der()), jwk }
    }
}

impl State {
    fn key(&self, alg: Algorithm) -> &SigningKey {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => &self.rsa,
            Algorithm::ES256 => &self.ec,
            Algorithm::EdDSA => &self.ed,
            other => panic!("the test IdP has no key for {other:?}"),
        }
    }

    fn jwks(&self) -> String {
        if let Some(body) = &self.jwks_override {
            return body.clone();
        }
        let mut encryption = self.rsa.jwk.clone();
        encryption["kid"] = json!(format!("enc-g{}", self.generation));
        encryption["use"] = json!("enc");
        encryption["alg"] = json!("RSA-OAEP");
        let malformed = json!({"kty": "EC", "crv": "P-256", "kid": "broken", "x": "!", "y": "!"});
        json!({ "keys": [encryption, malformed, self.rsa.jwk, self.ec.jwk, self.ed.jwk] })
            .to_string()
    }
}

fn parse_alg(alg: &str) -> Algorithm {
    Algorithm::from_str(alg).unwrap_or_else(|_| panic!("unknown JWT algorithm {alg:?}"))
}

fn b64json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("JSON"))
}

impl TestIdp {
    /// Generates the CA, the server certificate and the signing keys, and starts serving.
    pub fn start() -> TestIdp {
        let cert = super::certs::TestCert::issue("butler test IdP CA");
        let (ca_pem, server_config) = (cert.ca_pem.clone(), cert.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test IdP");
        let addr = listener.local_addr().expect("test IdP address");
        let issuer = format!("https://{addr}");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                issuer: issuer.clone(),
                advertised_issuer: None,
                jwks_override: None,
                generation: 0,
                rsa: SigningKey::rsa(0),
                ec: SigningKey::ec(0),
                ed: SigningKey::ed(0),
            }),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            fail_jwks: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        thread::Builder::new()
            .name("test-idp".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if accept_shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (shared, config) = (accept_shared.clone(), server_config.clone());
                    thread::spawn(move || serve_connection(stream, config, &shared));
                }
            })
            .expect("spawn the test IdP");
        TestIdp { addr, issuer, ca_pem, shared }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `https://127.0.0.1:PORT`: the issuer in the discovery document and in [`claims`].
    ///
    /// [`claims`]: TestIdp::claims
    pub fn issuer(&self) -> String {
        self.issuer.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}{JWKS_PATH}", self.issuer)
    }

    /// The test CA certificate (PEM), for butler's `auth.oidc.ca_file`.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Writes [`ca_pem`](TestIdp::ca_pem) to `dir/idp-ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("idp-ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write the test CA");
        path
    }

    /// Valid claims for `sub`: `iss` = [`issuer`](TestIdp::issuer), `aud` = [`IDP_CLIENT_ID`],
    /// `iat` now, `exp` in ten minutes. Add roles, `preferred_username` etc. as needed.
    pub fn claims(&self, sub: &str) -> Value {
        let now = unix_now();
        json!({"iss": self.issuer, "aud": IDP_CLIENT_ID, "sub": sub, "iat": now, "exp": now + 600})
    }

    /// The current `kid` of the key used for `alg` ("RS256", "PS384", "ES256", "EdDSA", ...).
    pub fn kid(&self, alg: &str) -> String {
        self.state().key(parse_alg(alg)).kid.clone()
    }

    /// `claims` signed with the current key for `alg`, its `kid` in the header.
    pub fn token(&self, alg: &str, claims: Value) -> String {
        let kid = self.kid(alg);
        self.token_with_kid(alg, Some(&kid), claims)
    }

    /// `claims` signed with the current key for `alg`, with `kid` (or none) in the header.
    pub fn token_with_kid(&self, alg: &str, kid: Option<&str>, claims: Value) -> String {
        let alg = parse_alg(alg);
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        let state = self.state();
        jsonwebtoken::encode(&header, &claims, &state.key(alg).encoding).expect("sign token")
    }

    /// `claims` signed by a key the IdP never published, under the current `kid` for `alg`
    /// ("RS256"-family, "ES256" or "EdDSA"): a wrong signature.
    pub fn forged_token(&self, alg: &str, claims: Value) -> String {
        let algorithm = parse_alg(alg);
        let state = self.state();
        let impostor = match algorithm {
            Algorithm::ES256 => SigningKey::ec(state.generation),
            Algorithm::EdDSA => SigningKey::ed(state.generation),
            _ => SigningKey::rsa(state.generation + 1),
        };
        let mut header = Header::new(algorithm);
        header.kid = Some(state.key(algorithm).kid.clone());
        jsonwebtoken::encode(&header, &claims, &impostor.encoding).expect("sign token")
    }

    /// An HS256 token keyed with `secret`, naming the current RSA `kid`.
    pub fn hs256_token(&self, secret: &[u8], claims: Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid("RS256"));
        let key = EncodingKey::from_secret(secret).expect("HMAC key");
        jsonwebtoken::encode(&header, &claims, &key).expect("sign token")
    }

    /// An unsigned `alg: none` token naming the current RSA `kid`.
    pub fn none_token(&self, claims: Value) -> String {
        let header = json!({"alg": "none", "typ": "JWT", "kid": self.kid("RS256")});
        format!("{}.{}.", b64json(&header), b64json(&claims))
    }

    /// New keys with new kids for every algorithm; the JWKS then publishes only those.
    pub fn rotate(&self) {
        let mut state = self.state();
        state.generation += 1;
        let generation = state.generation;
        state.rsa = SigningKey::rsa(generation);
        state.ec = SigningKey::ec(generation);
        state.ed = SigningKey::ed(generation);
    }

    /// While `true`, the JWKS endpoint answers 500 (fetches still count).
    pub fn fail_jwks(&self, fail: bool) {
        self.shared.fail_jwks.store(fail, Ordering::SeqCst);
    }

    /// Serves `body` as the JWKS instead of the real keys (`None` restores them).
    pub fn serve_jwks(&self, body: Option<String>) {
        self.state().jwks_override = body;
    }

    /// Makes the discovery document name `issuer` (`None` restores the real one).
    pub fn advertise_issuer(&self, issuer: Option<&str>) {
        self.state().advertised_issuer = issuer.map(str::to_string);
    }

    /// The JWKS document the IdP currently serves (when not failing).
    pub fn jwks(&self) -> String {
        self.state().jwks()
    }

    /// How many JWKS requests arrived (failed ones included).
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// How many discovery requests arrived.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Answers one request on one TLS connection, then closes it.
fn serve_connection(stream: TcpStream, config: Arc<rustls::ServerConfig>, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(connection) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut head = Vec::new();
    let mut chunk = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return, // handshake failure (e.g. untrusted CA) or hang-up
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        if head.len() > MAX_HEAD {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, body) = route(&path, shared);
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.write_all(body.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn route(path: &str, shared: &Shared) -> (&'static str, String) {
    let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    match path {
        "/.well-known/openid-configuration" => {
            shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            let issuer = state.advertised_issuer.as_deref().unwrap_or(&state.issuer);
            let doc = json!({
                "issuer": issuer,
                "jwks_uri": format!("{}{JWKS_PATH}", state.issuer),
                "authorization_endpoint": format!("{}/authorize", state.issuer),
                "token_endpoint": format!("{}/token", state.issuer),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            });
            ("200 OK", doc.to_string())
        }
        JWKS_PATH => {
            shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            if shared.fail_jwks.load(Ordering::SeqCst) {
                ("500 Internal Server Error", r#"{"error":"unavailable"}"#.to_string())
            } else {
                ("200 OK", state.jwks())
            }
        }
        _ => ("404 Not Found", r#"{"error":"not found"}"#.to_string()),
    }
}

/// Test-only RSA-2048 keys, used in turn by successive key generations.
const RSA_PEMS: [&str; 3] = [RSA_PEM_0, RSA_PEM_1, RSA_PEM_2];

const RSA_PEM_0: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAy5bR+TJ/2QL4KeoxA/GmcYTR6jL9m2LGhcOmKYN6RUJR8+dm
Aqxw4+zt5kKViyA/Off9Vud3lDNTwlbpuhWdAHnOdfaLGBTPSCgVJNU2YJpyZwvI
QkfUFntHF3WYQ/cJeDxQhYFqEmuBGhhgndpxcECDMKy+3toyAkqxH2F85LS6RoDH
niwaZFzfHuNPJuhIuOd5udadMnkXulw8Q9SuBqcMTQNFOh2JmHWphrwFS4113LtZ
zyPg13NmQ1Bjwn9yhNqgygAim+S1Ux9NvdFpF9AIIxpBJ7GaUCgKUiocHTdqa4B3
cm17MJNL1jAAMAQ+cp7OVlpuP8yHdO3FNVtxqQIDAQABAoIBAAOULtuNacOVjHOq
yias4tL5TjA0bxKCLgXLD+Ib5hbTtSXUOYkYYYFENhCe6ErNeqSXtcgpv67w4wr9
jEDGnHNMSXlaMargQu0XlUngcsfvYPT1WbL0u3sJnVEaMqiM5ESW4IguHoCEWngJ
ytuemCx7MnRrOjS7pCgkHkIqZ5Ips+2K7M+F0H+pWJVajSrlOd8jI+vUZKFDSPgD
w5hfwQD0HJE9DbGHYazan8JWUb+4R684vSINZjTT/LiBB197U5yaGxllrarClBzY
nUWVkLy93gqMsWFxYxRJfapNoVrWS2xU5XRmH+7JCqauhluGVmtQ2Ouz+fgLJHuk
omwQuV0CgYEA/X7XX6bObmrnIK1D712NSnaWILc+/dm/DJb8wZ2rCl00aV5P3RUZ
ls3saCNoT1blMT8j+iifLblKf41ZA2XW37/cpy/JWgIS2Pnw/RVk2BSca5XVFXU/
gg66kpP3/MwlzFK12ZoL2A4CJkQvrCtgwCkGrk9ustoo648XLnN/7B0CgYEAzZnA
lTXt0nttmIvxEyKx82wldxELBwDaQ5CA+FfF00ezWLVyMK4r3wNoL1eKeae27OFb
auA0cxrM+eZbbtQ3CXADGMIe0mIeUAJFhdINXO8emdtUY/wMlzO1JDQBKqTUn2Ok
4kfNd+jI8/WFdC5ChxhG29GCrX3YCU63lrnGLf0CgYBPxuhe+O8Efu5IMV8s6KM7
qQBsQV84optmien3wPgAJf8FniHCMQ7BkALzbxk3xuAQVI+s/bXCvQp+A+zcjeNG
vWniz74tbnOiB17ZNy9qdWoYzammvCSFeL8svBaSX2kR2YHTfpB1qUrx4gmixHAJ
aZ/poaPz84ZnQ7wG6WB73QKBgEwbklKpt/OmhRdnFkKDIWR+sA+3W2GoSyOfpl5H
/48Kh7Va1X53uv2/AR4lRblrACgH9BNIE6JYVXBceZQ5MnZn5H2Rvl8auyXa8Wls
LE4upiFGM6MfdnmyRme0aIokoiCufibVdZXhsiG8zT4Isc/YiMJud/VJFGO9o/BD
rLzxAoGAc3DvJMYUYCjWwNPMiMi0HIVquLsuuqjrH7e+g7LQVHBjaSITZyuHE6G6
GVAFakssrL8MN34sZl0z3zJDTofQCX0GU+7D7T/0r+s8G5SxZlYknhkF+sdYsaFS
/szZ9X3lZrB54i4lIAmXFJDF3wtGjipYLUAVSAiT8BnXRGgK44E=
-----END RSA PRIVATE KEY-----
";

const RSA_PEM_1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAkkwamnYeKMOfovBAGSMEm0mWhSa7SEegxIQoXi8HyTxhUJNJ
QQ6LFZbwh8NGqA9GPz4KXhDMRgRWSGGf9XZ3b0hr5wP/XvQnfwvLnZcoK+QlX3m1
N96iBd9xxcDtjKHxh9v8+NsMZaZpdQy7ocXEI8kR1POmgVWBTt6ayyLNiQ8xC9kZ
/oxZ+XBuI/xenR0LpuEyTy0KEKF/cDyjgcjAUUG9Po+l5Tt8nAsl837HvRtZWdv/
DBkHxrzOnTGVnwZdVKJRck6SMv0RW7IUSQxuta4KZWTSp3KXZ1LVvbQ6hrGJuRAJ
ppPZKoED6J6kvdgCk4yOIvjoArfcp6grhpzcJwIDAQABAoIBAAdTjFmD5MrB0TLF
uVAI8ugb7U/JusNJ4wE0ZRkiXc90GKOCXL7HTavNHUqPOvCbozbzkm1XhgNToEaL
rQkL37tQ8yZkittker3gB1hjA33/NOftHmgn3BFTOU1f9gV+7quRFsAXqC1HAiz8
cEEPuFzaauwxL3t2nr0mZLYbjhN4/ebUSKVYgGabdg2+8hSU+yLNtLj7+yoBnpFA
/Rh/TI0DS8ozGbY6klGwD3VBewmgxsf5my/U93f6mCMe0sxdTyRVSGyRoVA8Mimr
vTrGHjoGvujR0K6E2s1z4Ycp2DGXaxNloZgOEz3hbyq8xBrGAbNDW6tB32AesPA3
F74upVECgYEAxSYomrXuwW1prMUayj4Hy6Cd7hC4Su523JNWS5AE3Ym7gAPQhQBv
8SuS6uzpbNIM+qp0rSjVG9u0Fe8N2ESaXlcxkDxiKlzbFj8KBQ0EHhwYcf7ZD0uN
nP0c7xN4Le4mi5PSz4ymtWBCUH+20mdFLY8h9rOGL+7c78w7oI0EckUCgYEAvfft
YQxPJXyXyTuL8qI8vZ+MKBwUozXDAXz+L0SSWfDggIGAlBNq77qKjKsXwBPJinaW
p2vBZu4mMmJnS4jm9ufhBHWRdyKcuUoPkywrziuuy3KAafGJdSoyPIp1ghwVUJtv
Egh62EnNXIDHdqUIu6VUDfL+cqg1UvfQY0A78XsCgYEAibBTzXFg1XCfzE1An5zg
/uMnSZwdyh9vni+8pjtoWn0WGZsQZ8NdaxcenbpmcFznOa4QnNsWs0UnKeZySefn
1BmbgPvbJ3EAhjHywoJLrOe8Xuk5GYiP1+Oi8Iotdg6MlxDfu5qk16npxqTbv2jm
lKIRe2X4QsPVRBjkUAYM4+0CgYB5bJmcaKPGUEcs5xTi9/RfODX8BUbjs597ugs2
51ushZzaRuyKuYamyNN6ann52iv+hyJwzR2Hzz03A1MHIvCObVSU5xkdz0/h14bx
CVDOrXlCrWOLVEoKS/hkXhQSICU3qsJqAmWTDklnkSDtoztbxadeay1c2EuNRr06
U3p9NQKBgG849aLj0iNBHHW1RQvIOTWSxP7hrCYVCas6jTTeHxOYyVrW2Mfttxq/
fNyTsO1xjPflHJQoHZ9aHM6MTwMWzEH/lJ51NN/8Yl1P5mTxXbxDaXGRwgKa4NtG
+mNwJi94CYnrTGEgqdUxvIB3a0GwiZ9D4xoSFPzSnQCxUi8hQbM9
-----END RSA PRIVATE KEY-----
";

const RSA_PEM_2: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEA9PqSJDO92wq7uGtPD2WNON014O1pp74+YijDKTw+SE6Py8ka
Ir2TtHflzNDz7bxkYD37LRdzmq5UG//S0jSzcJvjaI9QIcvGCfKL5G1Bv94HXhF+
F42dzImS6pl9tforgARSPOD5vla2xHjzzDwFjJnb4TIGeOcEw/WGiBfWnsb4Yzoq
A7DfEyYgZS4T+me4PMxkSpvCAmtgk1hXqPJtMZgD047OrvoO9cdfHXgbTW8XcuQo
6/mzeHHtk8kr8Jd8cdQmHQNPR4KwIY28psvfqmXhDhKkMhQRy3l1j8ZHznZ6RJ3z
CdKoBg3mJIN1Wz3sUmdpr5iRDbd3tS5PLM3qeQIDAQABAoIBABIL1lGn5Ru6a+8v
Kn0IHlHay9IEszSJ6WcKOSwztaPWc7XPm+cEv5l6/pjqqJlx+BP15Oeis1+o6WXB
n+pfuvs35JXqfrzqma1YanE6ki4b4T+O+tKp2j67wLCa+315DxTIXLWC3irlEOQi
w9Te9AqyN9YcPQlRfVKhJtamKOd7vGCKJRYu4F6wgUmV4/Khqul0f/uu9j4n7kb+
Z2ke79XZn1ElQK5Gl+o8kRoP7yqvRhptk2Qb+9Sh379Xbyyzk/Z7JtdR5Upz2SBP
dmzf2wAYHDwA8F/X6PIPhNXPlyfaZEEWOsw5AXfZpgIYBQTbvCgyeHG9aat6xrh+
vb8fNN0CgYEA/i7jW+IbQYaqLMAW5DQJHezyAuBEZBTND8mYc2LtUZtE5gN4AQtt
wJ6yqpJWfT3al7IWYPIRmzAzfqHHazqzrirRdXOsNr+52ZQ4UNNlF8ECr3ZUReog
guBh22d94NTpSbLM3DlUcwBudH+NmcGAHFNK5RBwXKtxJK90E2/7/oUCgYEA9rrX
H5AbgVXEZpok9WQoaDi88NELNgu6efDcR4MFp1L01tlMfSSIzzRIdGaYDcguw+HA
H4N6W/AunHvhTK5EYqSmU644KX5nmJhbyQChtqrZi5mCxc0FMAdKg25f+XN1IuqV
nMoB9IyOeDhYyVpBQ9mxulcFjnE7KjDM7PyggGUCgYEAre0PjdPNqqymzTAzebtR
cbSsdONYaNMC7gaX1nyevvRr1KgS+UQEuYTd5HF11QT6CkrFnViGS5ZT5hZ1Ch6E
zGxoHuIjuOLAHO2bC1NbHUHowH9Lcvude3BmBWdvbuTBLLi4DQj9jCODcRvGnKsX
KkqkONFi0UZOiTe1SYea+rECgYB878uzPePPsECNvAxu/lK/w8tZHmHQ8ktxKBhD
VgNs4UL98Hcc/30Pf2gZGUJx6CZWJmCFFKzHFW5k6w4BKFWUpc9bnGLwEAQhbzU7
KUi6GPWkDQ39X336/hYrS57p0B9GmQc9p8UpsmsKUW4UN9HIq9mlhB9aK9hL2v5K
GvqjSQKBgFuHsIkveOSS8tA1yRSoSy/9IoZ30jh2MiPXSBYiH21ileM81rLy4rBv
DnK6iXuNCm2PgX7dBABPSgU+g2JKEujCvPpNYufkeagRD77slmMJbZPdIufrB6K6
GdgtZ59jtgfMeMJaBRxL+WFLQivEAGmLKytda81jFT1kijMg6nan
-----END RSA PRIVATE KEY-----
";
