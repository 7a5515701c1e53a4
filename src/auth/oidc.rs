//! OIDC federation (SPEC §5): discovery, the JWKS cache and its refreshes, token validation and
//! roles.
//!
//! [`Oidc::start`] reads `<issuer>/.well-known/openid-configuration`, fetches the JWKS it names
//! and fails closed when either is unusable; a detached thread then refreshes the JWKS every
//! `refresh_interval`. A token whose `kid` is unknown triggers an extra refresh, at most one per
//! 30 s counting every attempt (the startup fetch and failed fetches included), single-flight:
//! verifiers that arrive while a fetch is running wait for it instead of starting their own. A
//! refresh that fails or yields no usable key keeps the cached keys.
//!
//! Only the IdP's published keys are ever trusted: header fields that name or embed keys (`jku`,
//! `x5u`, `jwk`, `x5c`) are ignored, and `alg` must be one of the asymmetric algorithms and fit
//! the key's type (and the key's own `alg`, when it has one). `exp` and `nbf` allow 30 s of clock
//! skew.
//!
//! The pure parts (JWKS parsing, key/algorithm matching, claim checks, role extraction, the
//! refresh gate) are private functions tested below without sockets; fetching is thin glue around
//! `ureq`: HTTPS only, no redirects, bounded bodies, connect and whole-request timeouts.
//! Tokens are never logged.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

/// Largest discovery document or JWKS accepted, in bytes.
const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024;
/// Connect timeout of every fetch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of every fetch (connect, TLS, headers and body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many usable keys of one JWKS are kept; the rest are ignored.
const MAX_KEYS: usize = 100;
/// Bearer tokens longer than this are refused before any decoding.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew tolerated between butler and the IdP on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: f64 = 30.0;
/// Minimum time between two JWKS fetches triggered by unknown keys. Every attempt counts: the
/// startup fetch, periodic refreshes and failed fetches.
const UNKNOWN_KEY_GAP: Duration = Duration::from_secs(30);
/// How long a verifier waits for a fetch already in flight (longer than any fetch can take).
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(15);
/// RSA modulus sizes accepted, in bits.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// `auth.oidc` settings (SPEC §4). Built by the config module.
#[derive(Debug, Clone, PartialEq)]
pub struct OidcSettings {
    /// The issuer URL, exactly as the IdP's tokens and discovery document spell it; `https://`.
    pub issuer: String,
    /// Must be in every token's `aud`.
    pub client_id: String,
    /// Where the roles are: a dot path (`realm_access.roles`) or a literal claim name
    /// (`https://example.org/roles`).
    pub role_claim_path: String,
    /// How often the JWKS is refreshed in the background.
    pub refresh_interval: Duration,
    /// Contents of `ca_file`: extra trusted roots (PEM) for private IdPs, already read.
    pub ca_pem: Option<Vec<u8>>,
}

/// A validated OIDC token's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSubject {
    /// `preferred_username` when it is a non-empty string, else `sub`.
    pub name: String,
    pub sub: String,
    pub issuer: String,
    /// Deduplicated, in the order found at `role_claim_path`; empty when the claim is missing.
    pub roles: Vec<String>,
}

/// A cheap pre-check used to route a bearer token: three dot-separated base64url segments (no
/// padding), the first two non-empty. Says nothing about validity.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let base64url =
        |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    !header.is_empty()
        && !payload.is_empty()
        && base64url(header)
        && base64url(payload)
        && base64url(signature)
}

/// Fetches the JWKS; the error is a one-line reason.
type Fetcher = Box<dyn Fn() -> Result<Vec<u8>, String> + Send + Sync>;

/// The clocks, injectable for tests.
struct Clock {
    /// Monotonic time, for the refresh gate.
    monotonic: Box<dyn Fn() -> Instant + Send + Sync>,
    /// Seconds since the Unix epoch, for `exp` and `nbf`.
    unix: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl Clock {
    fn system() -> Clock {
        Clock {
            monotonic: Box::new(Instant::now),
            unix: Box::new(|| {
                SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
            }),
        }
    }
}

/// Validates tokens of one OIDC issuer against its cached JWKS.
pub struct Oidc {
    issuer: String,
    client_id: String,
    role_claim_path: String,
    keys: RwLock<Arc<Vec<Jwk>>>,
    gate: Mutex<RefreshGate>,
    fetch_done: Condvar,
    fetch_jwks: Fetcher,
    clock: Clock,
}

impl fmt::Debug for Oidc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("keys", &self.current_keys().len())
            .finish_non_exhaustive()
    }
}

impl Oidc {
    /// Discovery (`<issuer>/.well-known/openid-configuration`, issuer field must equal `issuer`
    /// exactly, jwks_uri must be https) and the first JWKS fetch. Err (a one-line message) if the
    /// IdP is unreachable, answers garbage, or the JWKS has no usable key: startup fails closed.
    /// Starts a background thread refreshing the JWKS every `refresh_interval` (keeping the
    /// cached keys when a refresh fails or yields no usable key). The thread holds only a weak
    /// reference: it never keeps the process alive and ends once the `Oidc` is dropped.
    pub fn start(settings: OidcSettings) -> Result<Arc<Oidc>, String> {
        check_https(&settings.issuer)
            .map_err(|e| format!("OIDC issuer {:?}: {e}", truncate(&settings.issuer)))?;
        let agent = http_agent(settings.ca_pem.as_deref())?;
        let discovery_url =
            format!("{}/.well-known/openid-configuration", settings.issuer.trim_end_matches('/'));
        let jwks_uri = fetch(&agent, &discovery_url)
            .and_then(|body| parse_discovery(&body, &settings.issuer))
            .map_err(|e| format!("OIDC discovery at {discovery_url}: {e}"))?;
        let clock = Clock::system();
        let first_fetch = (clock.monotonic)();
        let keys = fetch(&agent, &jwks_uri)
            .and_then(|body| parse_jwks(&body))
            .map_err(|e| format!("OIDC JWKS at {jwks_uri}: {e}"))?;
        log::debug!(keys = keys.len(); "OIDC signing keys loaded");
        let fetcher: Fetcher = Box::new(move || fetch(&agent, &jwks_uri));
        let oidc = Arc::new(Oidc::from_parts(&settings, keys, first_fetch, fetcher, clock));
        spawn_refresher(Arc::downgrade(&oidc), settings.refresh_interval)
            .map_err(|e| format!("OIDC: cannot start the JWKS refresh thread: {e}"))?;
        Ok(oidc)
    }

    /// Builds an `Oidc` from keys already fetched at `first_fetch` (which counts toward the
    /// unknown-key gap) and the means to fetch them again.
    fn from_parts(
        settings: &OidcSettings,
        keys: Vec<Jwk>,
        first_fetch: Instant,
        fetch_jwks: Fetcher,
        clock: Clock,
    ) -> Oidc {
        Oidc {
            issuer: settings.issuer.clone(),
            client_id: settings.client_id.clone(),
            role_claim_path: settings.role_claim_path.clone(),
            keys: RwLock::new(Arc::new(keys)),
            gate: Mutex::new(RefreshGate { last_attempt: Some(first_fetch), in_flight: false }),
            fetch_done: Condvar::new(),
            fetch_jwks,
            clock,
        }
    }

    /// Validates a bearer token. Err is a short reason for the log only (never shown to clients).
    pub fn verify(&self, token: &str) -> Result<OidcSubject, &'static str> {
        let parts = split_token(token)?;
        let header = parse_header(parts.header)?;
        let mut keys = self.current_keys();
        let mut lookup = find_keys(&keys, &header);
        if lookup == Lookup::Unknown {
            self.refresh(Trigger::UnknownKey);
            keys = self.current_keys();
            lookup = find_keys(&keys, &header);
        }
        let candidates = match lookup {
            Lookup::Found(candidates) => candidates,
            Lookup::Unknown => return Err("no published key for the token's kid and alg"),
            Lookup::Unfit => return Err("the key named by kid does not fit the token's alg"),
        };
        let message = &token[..parts.header.len() + 1 + parts.payload.len()];
        let signed = candidates.iter().any(|&i| {
            jsonwebtoken::crypto::verify(
                parts.signature,
                message.as_bytes(),
                &keys[i].key,
                header.alg,
            )
            .unwrap_or(false)
        });
        if !signed {
            return Err("bad signature");
        }
        let claims = decode_json_object(parts.payload).ok_or("claims are not a JSON object")?;
        check_claims(&claims, &self.issuer, &self.client_id, (self.clock.unix)())?;
        subject(&claims, &self.issuer, &self.role_claim_path)
    }

    fn current_keys(&self) -> Arc<Vec<Jwk>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_gate(&self) -> MutexGuard<'_, RefreshGate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetches the JWKS again when the gate allows it; an unknown-key trigger that finds a fetch
    /// in flight waits for that one instead. Failures keep the cached keys.
    fn refresh(&self, trigger: Trigger) {
        let now = (self.clock.monotonic)();
        {
            let mut gate = self.lock_gate();
            match gate.begin(now, trigger) {
                GateDecision::Fetch => {}
                GateDecision::Skip => return,
                GateDecision::Wait => {
                    let waited = self
                        .fetch_done
                        .wait_timeout_while(gate, IN_FLIGHT_WAIT, |g| g.in_flight)
                        .unwrap_or_else(|e| e.into_inner());
                    drop(waited);
                    return;
                }
            }
        }
        // Clears `in_flight` and wakes the waiters however the fetch ends (even by a panic).
        let _done = InFlight(self);
        match (self.fetch_jwks)().and_then(|body| parse_jwks(&body)) {
            Ok(keys) => {
                log::debug!(keys = keys.len(); "OIDC signing keys refreshed");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
            }
            Err(e) => {
                log::warn!(detail:% = e; "OIDC JWKS refresh failed; keeping the cached keys");
            }
        }
    }
}

/// Ends a fetch when dropped.
struct InFlight<'a>(&'a Oidc);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock_gate().in_flight = false;
        self.0.fetch_done.notify_all();
    }
}

/// Refreshes the JWKS every `interval` until the `Oidc` is gone.
fn spawn_refresher(
    oidc: Weak<Oidc>,
    interval: Duration,
) -> std::io::Result<thread::JoinHandle<()>> {
    let interval = interval.max(Duration::from_secs(1));
    thread::Builder::new().name("oidc-jwks".into()).spawn(move || {
        loop {
            thread::sleep(interval);
            let Some(oidc) = oidc.upgrade() else { return };
            oidc.refresh(Trigger::Periodic);
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The refresh gate

/// What asks for a JWKS fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A token names a key the cache does not have: at most one fetch per [`UNKNOWN_KEY_GAP`].
    UnknownKey,
    /// The `refresh_interval` timer: not held back by the gap, but never concurrent.
    Periodic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateDecision {
    /// Fetch now (the gate has recorded the attempt and marked it in flight).
    Fetch,
    /// Another fetch is in flight: wait for it.
    Wait,
    /// Too soon after the last attempt (or a periodic tick during a fetch): do nothing.
    Skip,
}

/// Single-flight and rate limit for JWKS fetches, over an injected monotonic clock.
#[derive(Debug)]
struct RefreshGate {
    /// When the last fetch started, successful or not.
    last_attempt: Option<Instant>,
    in_flight: bool,
}

impl RefreshGate {
    fn begin(&mut self, now: Instant, trigger: Trigger) -> GateDecision {
        if self.in_flight {
            return match trigger {
                Trigger::UnknownKey => GateDecision::Wait,
                Trigger::Periodic => GateDecision::Skip,
            };
        }
        let too_soon = self
            .last_attempt
            .is_some_and(|last| now.saturating_duration_since(last) < UNKNOWN_KEY_GAP);
        if trigger == Trigger::UnknownKey && too_soon {
            return GateDecision::Skip;
        }
        self.last_attempt = Some(now);
        self.in_flight = true;
        GateDecision::Fetch
    }
}

// ---------------------------------------------------------------------------------------------
// Fetching (thin glue; the parsers below are the tested part)

/// `https://` followed by something.
fn check_https(url: &str) -> Result<(), &'static str> {
    let scheme = url.get(..8).filter(|scheme| scheme.eq_ignore_ascii_case("https://"));
    match scheme {
        Some(_) if url.len() > 8 => Ok(()),
        _ => Err("must be an https:// URL"),
    }
}

fn http_agent(ca_pem: Option<&[u8]>) -> Result<ureq::Agent, String> {
    use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(pem) = ca_pem {
        // `ca_file` adds roots: the usual public ones stay trusted.
        let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|der| Certificate::from_der(der.as_ref()))
            .collect();
        let public = roots.len();
        for item in ureq::tls::parse_pem(pem) {
            match item {
                Ok(PemItem::Certificate(cert)) => roots.push(cert),
                Ok(_) => {}
                Err(e) => return Err(format!("OIDC ca_file: {}", one_line(&e.to_string()))),
            }
        }
        if roots.len() == public {
            return Err("OIDC ca_file: no PEM certificate found".into());
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&roots));
    }
    let config = ureq::Agent::config_builder()
        .https_only(true)
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(REQUEST_TIMEOUT))
        .user_agent(concat!("butler/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    Ok(config.new_agent())
}

/// GETs `url` and returns its body: status 200 and at most [`MAX_DOCUMENT_BYTES`].
fn fetch(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, String> {
    check_https(url)?;
    let mut response = agent
        .get(url)
        .header("accept", "application/json")
        .call()
        .map_err(|e| one_line(&e.to_string()))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    // The reader fails once the limit is reached, so allow one byte more than the maximum.
    response.body_mut().with_config().limit(MAX_DOCUMENT_BYTES + 1).read_to_vec().map_err(|e| {
        match e {
            ureq::Error::BodyExceedsLimit(_) => {
                format!("response larger than {MAX_DOCUMENT_BYTES} bytes")
            }
            e => one_line(&e.to_string()),
        }
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Discovery and JWKS parsing

/// The `jwks_uri` of a discovery document whose `issuer` is exactly `issuer`.
fn parse_discovery(body: &[u8], issuer: &str) -> Result<String, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "not JSON".to_string())?;
    let doc = doc.as_object().ok_or("not a JSON object")?;
    match doc.get("issuer").and_then(Value::as_str) {
        Some(found) if found == issuer => {}
        Some(found) => {
            return Err(format!("issuer is {:?}, expected exactly {issuer:?}", truncate(found)));
        }
        None => return Err("no issuer".into()),
    }
    let jwks_uri = doc.get("jwks_uri").and_then(Value::as_str).ok_or("no jwks_uri")?;
    check_https(jwks_uri).map_err(|e| format!("jwks_uri {e}"))?;
    Ok(jwks_uri.to_string())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The key types butler can verify with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

/// The only token algorithms accepted: asymmetric, never HS* or `none`.
fn parse_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The key type an accepted algorithm needs.
fn key_type_for(alg: Algorithm) -> Option<KeyType> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(KeyType::Rsa),
        Algorithm::ES256 => Some(KeyType::P256),
        Algorithm::ES384 => Some(KeyType::P384),
        Algorithm::EdDSA => Some(KeyType::Ed25519),
        _ => None,
    }
}

/// One usable signing key of the JWKS.
#[derive(Debug)]
struct Jwk {
    kid: Option<String>,
    key_type: KeyType,
    /// The key's own `alg`, when published: tokens must then use exactly that.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl Jwk {
    fn fits(&self, alg: Algorithm) -> bool {
        key_type_for(alg) == Some(self.key_type) && self.alg.is_none_or(|own| own == alg)
    }
}

/// The usable signing keys of a JWKS document (at most [`MAX_KEYS`]). Keys that are malformed,
/// unsupported or not for signatures are skipped; Err when none is left.
fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "not JSON".to_string())?;
    let entries = doc.get("keys").and_then(Value::as_array).ok_or("no \"keys\" array")?;
    let mut keys = Vec::new();
    let mut skipped: Option<(usize, &str)> = None;
    for entry in entries {
        match parse_jwk(entry) {
            Ok(key) => keys.push(key),
            Err(reason) => skipped = Some((skipped.map_or(0, |(n, _)| n) + 1, reason)),
        }
        if keys.len() == MAX_KEYS {
            break;
        }
    }
    if let Some((count, last_reason)) = skipped {
        log::debug!(count = count, last_reason = last_reason; "OIDC JWKS keys skipped");
    }
    if keys.is_empty() {
        return Err(format!("no usable signing key among {} keys", entries.len()));
    }
    Ok(keys)
}

/// One JWK, or why it is skipped.
fn parse_jwk(entry: &Value) -> Result<Jwk, &'static str> {
    let jwk = entry.as_object().ok_or("not an object")?;
    let text = |name: &str| -> Result<Option<&str>, &'static str> {
        match jwk.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err("a member is not a string"),
        }
    };
    match text("use")? {
        None | Some("sig") => {}
        Some(_) => return Err("not a signature key"),
    }
    if let Some(ops) = jwk.get("key_ops") {
        let ops = ops.as_array().ok_or("key_ops is not an array")?;
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return Err("key_ops lacks verify");
        }
    }
    let kid = text("kid")?.map(str::to_string);
    let alg = match text("alg")? {
        None => None,
        Some(name) => Some(parse_alg(name).ok_or("unsupported alg")?),
    };
    let member = |name: &str| -> Result<Vec<u8>, &'static str> {
        let value = text(name)?.ok_or("a key member is missing")?;
        URL_SAFE_NO_PAD.decode(value).map_err(|_| "a key member is not base64url")
    };
    let (key_type, key) = match text("kty")?.ok_or("no kty")? {
        "RSA" => {
            let n = member("n")?;
            let e = member("e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            let bits = n.first().map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits)
                || n.last().is_some_and(|b| b % 2 == 0)
            {
                return Err("unsupported RSA modulus");
            }
            // 3 ≤ e < 2^33 and odd, as the verifier requires.
            let exponent =
                (e.len() <= 5).then(|| e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)));
            if !exponent.is_some_and(|x| (3..1 << 33).contains(&x) && x % 2 == 1) {
                return Err("unsupported RSA exponent");
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(n, e))
        }
        "EC" => {
            let (key_type, size) = match text("crv")? {
                Some("P-256") => (KeyType::P256, 32),
                Some("P-384") => (KeyType::P384, 48),
                _ => return Err("unsupported curve"),
            };
            let x = member("x")?;
            let y = member("y")?;
            if x.len() != size || y.len() != size {
                return Err("EC coordinates of the wrong size");
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (key_type, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            if text("crv")? != Some("Ed25519") {
                return Err("unsupported curve");
            }
            let x = member("x")?;
            if x.len() != 32 {
                return Err("Ed25519 key of the wrong size");
            }
            (KeyType::Ed25519, DecodingKey::from_ed_der(&x))
        }
        _ => return Err("unsupported kty"),
    };
    if alg.is_some_and(|alg| key_type_for(alg) != Some(key_type)) {
        return Err("alg does not fit kty");
    }
    Ok(Jwk { kid, key_type, alg, key })
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// The three segments of a compact JWS.
#[derive(Debug)]
struct TokenParts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn split_token(token: &str) -> Result<TokenParts<'_>, &'static str> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err("token too long");
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None) => {
            Ok(TokenParts { header, payload, signature })
        }
        _ => Err("not a compact JWS"),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

/// The header's `alg` (refused unless asymmetric and supported) and `kid`.
fn parse_header(encoded: &str) -> Result<TokenHeader, &'static str> {
    let header = decode_json_object(encoded).ok_or("header is not a base64url JSON object")?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => parse_alg(name).ok_or("alg not accepted")?,
        _ => return Err("no alg"),
    };
    // No JWS extension is understood, so none may be critical (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err("crit header");
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err("kid is not a string"),
    };
    Ok(TokenHeader { alg, kid })
}

fn decode_json_object(encoded: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Lookup {
    /// Indexes of the keys to try.
    Found(Vec<usize>),
    /// No key has the token's `kid` (or, without a `kid`, none fits its `alg`): worth a refresh.
    Unknown,
    /// Keys with the token's `kid` exist but none fits its `alg`.
    Unfit,
}

/// The keys a token may be signed with: those with its `kid` that fit its `alg`; without a
/// `kid`, every key that fits its `alg`.
fn find_keys(keys: &[Jwk], header: &TokenHeader) -> Lookup {
    let fitting = |key: &Jwk| key.fits(header.alg);
    let found: Vec<usize> = match &header.kid {
        Some(kid) => {
            let named: Vec<usize> =
                (0..keys.len()).filter(|&i| keys[i].kid.as_deref() == Some(kid.as_str())).collect();
            if named.is_empty() {
                return Lookup::Unknown;
            }
            let fit: Vec<usize> = named.into_iter().filter(|&i| fitting(&keys[i])).collect();
            if fit.is_empty() {
                return Lookup::Unfit;
            }
            fit
        }
        None => (0..keys.len()).filter(|&i| fitting(&keys[i])).collect(),
    };
    if found.is_empty() { Lookup::Unknown } else { Lookup::Found(found) }
}

/// `iss`, `aud`, `exp` and `nbf` (with [`LEEWAY_SECS`] of skew) at `now` (Unix seconds).
fn check_claims(
    claims: &Map<String, Value>,
    issuer: &str,
    client_id: &str,
    now: u64,
) -> Result<(), &'static str> {
    if claims.get("iss").and_then(Value::as_str) != Some(issuer) {
        return Err("wrong iss");
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == client_id,
        Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(client_id)),
        _ => false,
    };
    if !audience_ok {
        return Err("aud does not contain client_id");
    }
    let now = now as f64;
    let exp = claims.get("exp").ok_or("no exp")?.as_f64().ok_or("exp is not a number")?;
    if now >= exp + LEEWAY_SECS {
        return Err("expired");
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_f64().ok_or("nbf is not a number")?;
        if now + LEEWAY_SECS < nbf {
            return Err("not yet valid (nbf)");
        }
    }
    Ok(())
}

/// The subject of validated claims: `sub` (required), the name and the roles.
fn subject(
    claims: &Map<String, Value>,
    issuer: &str,
    role_claim_path: &str,
) -> Result<OidcSubject, &'static str> {
    let sub = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        _ => return Err("no sub"),
    };
    let name = match claims.get("preferred_username") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        _ => sub.clone(),
    };
    let roles = extract_roles(claims, role_claim_path);
    Ok(OidcSubject { name, sub, issuer: issuer.to_string(), roles })
}

/// The roles at `path`: a top-level claim literally named `path`, else the dot path through
/// nested objects. An array of strings (other elements ignored) or one space-separated string;
/// anything else, or nothing there, gives no roles. Deduplicated, first occurrence kept.
fn extract_roles(claims: &Map<String, Value>, path: &str) -> Vec<String> {
    if path.is_empty() {
        return Vec::new();
    }
    let value = claims.get(path).or_else(|| {
        let mut segments = path.split('.');
        let first = claims.get(segments.next()?)?;
        segments.try_fold(first, |value, segment| value.as_object()?.get(segment))
    });
    let found: Vec<&str> = match value {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => s.split_whitespace().collect(),
        _ => Vec::new(),
    };
    let mut roles: Vec<String> = Vec::with_capacity(found.len());
    for role in found {
        if !role.is_empty() && !roles.iter().any(|r| r == role) {
            roles.push(role.to_string());
        }
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::jwk::Jwk as LibJwk;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISSUER: &str = "https://idp.example.org/realms/test";
    const CLIENT: &str = "butler";

    /// A test-only RSA-2048 key (generated once with `openssl genrsa -traditional 2048`).
    const RSA_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAvO2ebXU7avSRbTFGXHn1dmFjma3iIS5ufbAiMlQGEx9VtSFs
LsEDfUCJl07o1QjuvzrZVqhqZ1QxKPZ3DVsEzab4ZR1JFY1qaKs/TRMtAbWobvWR
2tP16Ip/dV0iq8Li3+4TxyqF7uhlmb2pO0/O4q3Dz2sguOv3s0ht4I9pioIqeTEh
mG7AQiH7Van4k6EAacbEopqf37GAFZI8/0bR0wqWNIbtmTtI9teSZ9Rtixmc7I9W
3pTBKE1A3rHWKOnmG9c1G8gAJ53ULnHJTncPqxUuVNUvtOFhXF2+9TBnSLREN+Cl
aE7ezG8D9A+ro3HuS/D/N6ipnkRuwM9gnQChgQIDAQABAoIBACG7Nx8J4ErvUYuy
UYKvT7EMIFFO52HPPXD5YpGjyNXfMVk+l2cdlPbm7+nw78chaicAZc+AEEdUk9Zh
cs4Sox/ooM7E1MihUA9SC+JB+zYj7eeptpngYDZdi/YzY75Q9FrQ0f0sTW9jVMiH
QVDSpfh4184PrW72ymnbE6sVT92nozpiAnzLB/7jWu5xd/qapJL1apTmWja2Vno+
ew3+lkk3cA/vcw1+5jjnNPfCep9s4zrSYuzv8IhXBMDoenM67V4vC69H+RrKUEB0
R0CloJ//Fl/UwHG8qYL06IshTxrsslTeaBi9eV7ZLRAdXlsI+Lud3NCikAbsH4N+
ZV2eMRUCgYEA5kv8sA27WA709eQD8zuTx0DagTRfYwt3YoKQZBT36K46zU8+BvDy
L1nVZa6jdGHicUAaBTcWsF8ouRLRBJSPGC5kmbYCFePyb+/ZadHf+Jm3yG1Xq7h1
/jissBn3n6K612BRR3qCkWUP2Vlhv+SFYGvHxsr4mADc3qlfIRPDUYcCgYEA0gOn
Bh9w8eIFXAsYagbvPvHKE9DtN2xyAshCpRMkLQl4OJO7hcfbc4nElvGxkQsfFwbY
vYIPs0Vg5CAKI6br2Hh0Vpq/lXJZWK0GsM+DIYiyQazgBz8D5YsftVnFJaIVk8Bf
5DGhdj5s16gU2UsdN41cH0Z6zVfqTI+kCaCSVrcCgYAPWkd5MSEpKK4Z6l59C565
bNBkRqqJPs1xqsSXd3Jjd6IB5+N5sPxkPbflNHQ/IPtok15otJh1n5JmbCO1C3ZS
pV0dhi2zaePSpIm47T3iI9VFrkxm7UAod3zDrKd+Y+nSy9//ROKJcNRSqAvFMCXY
HLdPwF48O+p9iYsG+HtP5wKBgQCwNopVU9pDyl6u3Uxt4kWp7dydhecUYvTCqt9o
fMgU1eY+qo5kcM4MgqMl98QCrG84tfD0CYY86FCk+NEpGuy25FLRO+TWc2zOP9fm
USd44qaW/oO28MPHPVWsp5cIvZgXMgoDgTU17qkKxihALotkSkLqpwtw8nxQIxID
VeyTvwKBgG/e5eZ8TF+f/OCBqNxoWdSzVg5dgmDObfgcOFIFvV1BqgIRFsCjY4GM
haNKUolCLmdYvkCpG3gjtzyIQCccjI/w+lrS3M8ySBMMAdkk8xSnXotpNYcALZsv
C+QvZI1++3AKaG16Jg+itOjNEznkn8RGcOXxNvDfC5lIzhlXhJrM
-----END RSA PRIVATE KEY-----
";

    /// A private key and its public JWK.
    struct TestKey {
        alg: Algorithm,
        encoding: EncodingKey,
        jwk: Value,
    }

    impl TestKey {
        fn rsa(kid: &str) -> TestKey {
            let encoding = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).expect("RSA test key");
            let lib = LibJwk::from_encoding_key(&encoding, Algorithm::RS256).expect("RSA JWK");
            let mut jwk = serde_json::to_value(lib).expect("JWK as JSON");
            jwk["kid"] = json!(kid);
            jwk.as_object_mut().expect("object").remove("alg");
            TestKey { alg: Algorithm::RS256, encoding, jwk }
        }

        fn generated(alg: Algorithm, kid: &str) -> TestKey {
            let (rcgen_alg, crv) = match alg {
                Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, "P-256"),
                Algorithm::ES384 => (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384"),
                Algorithm::EdDSA => (&rcgen::PKCS_ED25519, "Ed25519"),
                _ => panic!("no generated key for {alg:?}"),
            };
            let pair = rcgen::KeyPair::generate_for(rcgen_alg).expect("key generation");
            let der = pair.serialize_der();
            let raw = pair.public_key_raw();
            let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
            let (encoding, jwk) = if alg == Algorithm::EdDSA {
                let jwk = json!({"kty": "OKP", "crv": crv, "x": b64(raw), "kid": kid});
                (EncodingKey::from_ed_der(&der), jwk)
            } else {
                let size = (raw.len() - 1) / 2;
                let (x, y) = raw[1..].split_at(size);
                let jwk = json!({"kty": "EC", "crv": crv, "x": b64(x), "y": b64(y), "kid": kid});
                (EncodingKey::from_ec_der(&der), jwk)
            };
            TestKey { alg, encoding, jwk }
        }

        fn kid(&self) -> Option<&str> {
            self.jwk.get("kid").and_then(Value::as_str)
        }

        fn sign(&self, claims: &Value) -> String {
            self.sign_as(self.alg, self.kid(), claims)
        }

        fn sign_as(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
            let mut header = Header::new(alg);
            header.kid = kid.map(str::to_string);
            jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing")
        }
    }

    fn jwks(keys: &[&TestKey]) -> Vec<u8> {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        serde_json::to_vec(&json!({ "keys": keys })).expect("JWKS")
    }

    fn unix_now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
    }

    fn claims() -> Value {
        json!({
            "iss": ISSUER,
            "aud": CLIENT,
            "sub": "f3b1c2d4",
            "exp": unix_now() + 300,
            "iat": unix_now(),
            "preferred_username": "alice",
            "realm_access": {"roles": ["viewer", "operator"]},
        })
    }

    fn settings() -> OidcSettings {
        OidcSettings {
            issuer: ISSUER.into(),
            client_id: CLIENT.into(),
            role_claim_path: "realm_access.roles".into(),
            refresh_interval: Duration::from_secs(3600),
            ca_pem: None,
        }
    }

    fn b64json(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
    }

    /// A JWKS endpoint in memory: what it serves, whether it fails, how often it was asked.
    #[derive(Clone)]
    struct FakeIdp {
        body: Arc<Mutex<Result<Vec<u8>, String>>>,
        fetches: Arc<AtomicUsize>,
        delay: Duration,
    }

    impl FakeIdp {
        fn new(body: Vec<u8>) -> FakeIdp {
            FakeIdp {
                body: Arc::new(Mutex::new(Ok(body))),
                fetches: Arc::new(AtomicUsize::new(0)),
                delay: Duration::ZERO,
            }
        }

        fn serve(&self, body: Result<Vec<u8>, String>) {
            *self.body.lock().expect("lock") = body;
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }

        fn fetcher(&self) -> Fetcher {
            let idp = self.clone();
            Box::new(move || {
                idp.fetches.fetch_add(1, Ordering::SeqCst);
                thread::sleep(idp.delay);
                idp.body.lock().expect("lock").clone()
            })
        }
    }

    /// A monotonic clock that moves only when told to.
    #[derive(Clone)]
    struct FakeClock {
        start: Instant,
        offset: Arc<Mutex<Duration>>,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock { start: Instant::now(), offset: Arc::new(Mutex::new(Duration::ZERO)) }
        }

        fn advance(&self, by: Duration) {
            *self.offset.lock().expect("lock") += by;
        }

        fn clock(&self) -> Clock {
            let this = self.clone();
            Clock {
                monotonic: Box::new(move || this.start + *this.offset.lock().expect("lock")),
                unix: Box::new(unix_now),
            }
        }
    }

    /// An `Oidc` over an in-memory JWKS; the startup fetch happened at the fake clock's start.
    fn oidc_with(settings: &OidcSettings, idp: &FakeIdp, clock: &FakeClock) -> Oidc {
        let body = idp.body.lock().expect("lock").clone().expect("initial JWKS");
        let keys = parse_jwks(&body).expect("usable initial JWKS");
        Oidc::from_parts(settings, keys, clock.start, idp.fetcher(), clock.clock())
    }

    fn oidc(keys: &[&TestKey]) -> (Oidc, FakeIdp, FakeClock) {
        let idp = FakeIdp::new(jwks(keys));
        let clock = FakeClock::new();
        (oidc_with(&settings(), &idp, &clock), idp, clock)
    }

    // --- looks_like_jwt -------------------------------------------------------------------

    #[test]
    fn looks_like_jwt_wants_three_base64url_segments() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"));
        assert!(looks_like_jwt("a.b.")); // alg none shape: routed to JWT checks, refused there
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt(".b.c"));
        assert!(!looks_like_jwt("a..c"));
        assert!(!looks_like_jwt("a.b.c="));
        assert!(!looks_like_jwt("a+b.c.d"));
        assert!(!looks_like_jwt("a b.c.d"));
        assert!(!looks_like_jwt(""));
        assert!(!looks_like_jwt("sk-1234567890abcdef"));
    }

    // --- algorithms and key types -----------------------------------------------------------

    #[test]
    fn only_asymmetric_algorithms_are_accepted() {
        for name in
            ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
        {
            let alg = parse_alg(name).unwrap_or_else(|| panic!("{name} refused"));
            assert!(key_type_for(alg).is_some(), "{name}");
        }
        for name in
            ["HS256", "HS384", "HS512", "none", "None", "NONE", "", "ES512", "rs256", "Ed25519"]
        {
            assert_eq!(parse_alg(name), None, "{name} accepted");
        }
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert_eq!(key_type_for(alg), None);
        }
    }

    #[test]
    fn algorithm_must_fit_key_type_and_key_alg() {
        let key = |key_type, alg| Jwk {
            kid: None,
            key_type,
            alg,
            key: DecodingKey::from_ed_der(&[0; 32]),
        };
        let rsa = key(KeyType::Rsa, None);
        for alg in [Algorithm::RS256, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384] {
            assert!(rsa.fits(alg));
        }
        for alg in [Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA, Algorithm::HS256] {
            assert!(!rsa.fits(alg));
        }
        assert!(key(KeyType::P256, None).fits(Algorithm::ES256));
        assert!(!key(KeyType::P256, None).fits(Algorithm::ES384));
        assert!(key(KeyType::P384, None).fits(Algorithm::ES384));
        assert!(!key(KeyType::P384, None).fits(Algorithm::ES256));
        assert!(key(KeyType::Ed25519, None).fits(Algorithm::EdDSA));
        assert!(!key(KeyType::Ed25519, None).fits(Algorithm::ES256));
        let pinned = key(KeyType::Rsa, Some(Algorithm::PS256));
        assert!(pinned.fits(Algorithm::PS256));
        assert!(!pinned.fits(Algorithm::RS256));
        assert!(!pinned.fits(Algorithm::PS384));
    }

    // --- JWKS parsing ---------------------------------------------------------------------

    fn parse_one(jwk: Value) -> Result<Jwk, &'static str> {
        parse_jwk(&jwk)
    }

    #[test]
    fn jwks_keys_of_every_supported_type_parse() {
        let rsa = TestKey::rsa("r");
        let p256 = TestKey::generated(Algorithm::ES256, "e");
        let p384 = TestKey::generated(Algorithm::ES384, "f");
        let ed = TestKey::generated(Algorithm::EdDSA, "d");
        let keys = parse_jwks(&jwks(&[&rsa, &p256, &p384, &ed])).expect("JWKS");
        let types: Vec<(Option<&str>, KeyType)> =
            keys.iter().map(|k| (k.kid.as_deref(), k.key_type)).collect();
        assert_eq!(
            types,
            [
                (Some("r"), KeyType::Rsa),
                (Some("e"), KeyType::P256),
                (Some("f"), KeyType::P384),
                (Some("d"), KeyType::Ed25519)
            ]
        );
        assert!(keys.iter().all(|k| k.alg.is_none()));
    }

    #[test]
    fn jwk_use_key_ops_and_alg_are_honoured() {
        let rsa = TestKey::rsa("r").jwk;
        let with = |member: &str, value: Value| {
            let mut jwk = rsa.clone();
            jwk[member] = value;
            parse_one(jwk)
        };
        assert!(with("use", json!("sig")).is_ok());
        assert_eq!(with("use", json!("enc")).err(), Some("not a signature key"));
        assert!(with("use", json!(1)).is_err());
        assert!(with("key_ops", json!(["verify"])).is_ok());
        assert!(with("key_ops", json!(["encrypt"])).is_err());
        assert!(with("key_ops", json!("verify")).is_err());
        assert_eq!(with("alg", json!("PS384")).map(|k| k.alg).ok(), Some(Some(Algorithm::PS384)));
        assert_eq!(with("alg", json!("ES256")).err(), Some("alg does not fit kty"));
        assert_eq!(with("alg", json!("HS256")).err(), Some("unsupported alg"));
        assert_eq!(with("alg", json!("RSA-OAEP")).err(), Some("unsupported alg"));
        assert_eq!(with("kid", json!(7)).err(), Some("a member is not a string"));
        assert_eq!(with("kty", json!("oct")).err(), Some("unsupported kty"));
        assert!(parse_one(json!({"kty": "oct", "k": "c2VjcmV0"})).is_err());
        assert!(parse_one(json!("RSA")).is_err());
        assert!(parse_one(json!({"n": rsa["n"], "e": rsa["e"]})).is_err());
    }

    #[test]
    fn malformed_rsa_keys_are_refused() {
        let rsa = TestKey::rsa("r").jwk;
        let with = |member: &str, value: &str| {
            let mut jwk = rsa.clone();
            jwk[member] = json!(value);
            parse_one(jwk)
        };
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        assert!(with("n", "not base64!").is_err());
        assert!(with("n", "").is_err());
        let mut small = vec![0xC5u8; 128]; // 1024 bits
        small[127] = 0x01;
        assert_eq!(with("n", &b64(&small)).err(), Some("unsupported RSA modulus"));
        let mut even = vec![0xC5u8; 256];
        even[255] = 0x02;
        assert_eq!(with("n", &b64(&even)).err(), Some("unsupported RSA modulus"));
        let mut huge = vec![0xC5u8; 1025]; // 8200 bits
        huge[1024] = 0x01;
        assert_eq!(with("n", &b64(&huge)).err(), Some("unsupported RSA modulus"));
        let mut padded = vec![0u8];
        padded.extend(URL_SAFE_NO_PAD.decode(rsa["n"].as_str().expect("n")).expect("n"));
        assert!(with("n", &b64(&padded)).is_ok(), "a leading zero byte is harmless");
        assert_eq!(with("e", &b64(&[1])).err(), Some("unsupported RSA exponent"));
        assert_eq!(with("e", &b64(&[1, 0, 0])).err(), Some("unsupported RSA exponent"));
        assert_eq!(with("e", &b64(&[2, 0, 0, 0, 1])).err(), Some("unsupported RSA exponent"));
        assert_eq!(with("e", &b64(&[1; 9])).err(), Some("unsupported RSA exponent"));
        assert!(with("e", &b64(&[3])).is_ok());
        assert!(with("e", "").is_err());
    }

    #[test]
    fn malformed_ec_and_okp_keys_are_refused() {
        let p256 = TestKey::generated(Algorithm::ES256, "e").jwk;
        let ed = TestKey::generated(Algorithm::EdDSA, "d").jwk;
        let with = |jwk: &Value, member: &str, value: Value| {
            let mut jwk = jwk.clone();
            jwk[member] = value;
            parse_one(jwk)
        };
        assert_eq!(with(&p256, "crv", json!("P-521")).err(), Some("unsupported curve"));
        assert_eq!(
            with(&p256, "crv", json!("P-384")).err(),
            Some("EC coordinates of the wrong size")
        );
        assert_eq!(with(&p256, "x", json!("AAAA")).err(), Some("EC coordinates of the wrong size"));
        assert!(with(&p256, "y", json!("%%%")).is_err());
        assert!(with(&p256, "y", Value::Null).is_err());
        assert_eq!(with(&ed, "crv", json!("Ed448")).err(), Some("unsupported curve"));
        assert_eq!(with(&ed, "crv", json!("X25519")).err(), Some("unsupported curve"));
        assert_eq!(with(&ed, "x", json!("AAAA")).err(), Some("Ed25519 key of the wrong size"));
        assert_eq!(with(&ed, "alg", json!("ES256")).err(), Some("alg does not fit kty"));
        assert!(with(&ed, "alg", json!("EdDSA")).is_ok());
    }

    #[test]
    fn bad_keys_are_skipped_and_an_empty_result_is_an_error() {
        let rsa = TestKey::rsa("good");
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": rsa.jwk["n"], "e": rsa.jwk["e"]},
            "garbage",
            rsa.jwk,
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).expect("one usable key");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("good"));

        let no_usable = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}, {"kty": "EC"}]});
        assert!(parse_jwks(no_usable.to_string().as_bytes()).is_err());
        assert!(parse_jwks(br#"{"keys": []}"#).is_err());
        assert!(parse_jwks(br#"{"keys": {}}"#).is_err());
        assert!(parse_jwks(br#"{"other": []}"#).is_err());
        assert!(parse_jwks(b"<html>oops</html>").is_err());
        assert!(parse_jwks(b"").is_err());
    }

    #[test]
    fn the_number_of_keys_kept_is_capped() {
        let rsa = TestKey::rsa("r").jwk;
        let many: Vec<Value> = (0..MAX_KEYS + 20)
            .map(|i| {
                let mut jwk = rsa.clone();
                jwk["kid"] = json!(format!("k{i}"));
                jwk
            })
            .collect();
        let keys = parse_jwks(json!({ "keys": many }).to_string().as_bytes()).expect("JWKS");
        assert_eq!(keys.len(), MAX_KEYS);
        assert_eq!(keys[0].kid.as_deref(), Some("k0"));
    }

    // --- discovery --------------------------------------------------------------------------

    #[test]
    fn discovery_needs_the_exact_issuer_and_an_https_jwks_uri() {
        let doc =
            |issuer: &str, jwks: &str| json!({"issuer": issuer, "jwks_uri": jwks}).to_string();
        let jwks = "https://idp.example.org/certs";
        assert_eq!(parse_discovery(doc(ISSUER, jwks).as_bytes(), ISSUER).as_deref(), Ok(jwks));
        let with_slash = format!("{ISSUER}/");
        assert!(parse_discovery(doc(&with_slash, jwks).as_bytes(), ISSUER).is_err());
        assert!(parse_discovery(doc("https://evil.example", jwks).as_bytes(), ISSUER).is_err());
        let err = parse_discovery(doc(ISSUER, "http://idp.example.org/certs").as_bytes(), ISSUER);
        assert!(err.is_err());
        assert!(parse_discovery(json!({"issuer": ISSUER}).to_string().as_bytes(), ISSUER).is_err());
        assert!(parse_discovery(json!({"jwks_uri": jwks}).to_string().as_bytes(), ISSUER).is_err());
        let numeric = json!({"issuer": ISSUER, "jwks_uri": 1}).to_string();
        assert!(parse_discovery(numeric.as_bytes(), ISSUER).is_err());
        assert!(parse_discovery(b"[]", ISSUER).is_err());
        assert!(parse_discovery(b"not json", ISSUER).is_err());
    }

    #[test]
    fn only_https_urls_are_fetched() {
        assert!(check_https("https://idp.example.org").is_ok());
        assert!(check_https("HTTPS://idp.example.org").is_ok());
        assert!(check_https("http://idp.example.org").is_err());
        assert!(check_https("https://").is_err());
        assert!(check_https("ftp://idp.example.org").is_err());
        assert!(check_https("idp.example.org").is_err());
        assert!(check_https("").is_err());
        assert!(check_https("httpsé://x").is_err());
    }

    #[test]
    fn start_refuses_http_issuers_and_bad_ca_files_without_fetching() {
        let mut plain = settings();
        plain.issuer = "http://127.0.0.1:9/realms/test".into();
        let err = Oidc::start(plain).expect_err("http issuer");
        assert!(err.contains("https"), "{err}");
        let mut bad_ca = settings();
        bad_ca.ca_pem = Some(b"not a certificate".to_vec());
        let err = Oidc::start(bad_ca).expect_err("bad CA");
        assert!(err.contains("ca_file"), "{err}");
        assert!(!err.contains('\n'));
    }

    // --- token header -------------------------------------------------------------------

    #[test]
    fn header_alg_none_hs_crit_and_bad_kid_are_refused() {
        let header = |value: Value| parse_header(&b64json(&value));
        assert_eq!(
            header(json!({"alg": "RS256", "kid": "k"})),
            Ok(TokenHeader { alg: Algorithm::RS256, kid: Some("k".into()) })
        );
        assert_eq!(
            header(json!({"alg": "EdDSA", "typ": "JWT"})),
            Ok(TokenHeader { alg: Algorithm::EdDSA, kid: None })
        );
        assert_eq!(header(json!({"alg": "none"})), Err("alg not accepted"));
        assert_eq!(header(json!({"alg": "HS256", "kid": "k"})), Err("alg not accepted"));
        assert_eq!(header(json!({"alg": "HS512"})), Err("alg not accepted"));
        assert_eq!(header(json!({"kid": "k"})), Err("no alg"));
        assert_eq!(header(json!({"alg": null})), Err("no alg"));
        assert_eq!(header(json!({"alg": "RS256", "crit": ["exp"]})), Err("crit header"));
        assert_eq!(header(json!({"alg": "RS256", "kid": 3})), Err("kid is not a string"));
        assert!(header(json!(["RS256"])).is_err());
        assert!(parse_header("!!!").is_err());
        assert!(parse_header("").is_err());
    }

    #[test]
    fn oversized_or_misshapen_tokens_are_refused_before_decoding() {
        let (oidc, idp, _) = oidc(&[&TestKey::rsa("r")]);
        let long = format!("{}.e30.sig", "a".repeat(MAX_TOKEN_BYTES));
        assert_eq!(oidc.verify(&long), Err("token too long"));
        assert_eq!(oidc.verify("a.b"), Err("not a compact JWS"));
        assert_eq!(oidc.verify("a.b.c.d"), Err("not a compact JWS"));
        assert_eq!(oidc.verify(""), Err("not a compact JWS"));
        assert!(oidc.verify("....").is_err());
        assert_eq!(idp.fetches(), 0);
    }

    // --- verification ---------------------------------------------------------------------

    #[test]
    fn tokens_of_every_supported_algorithm_verify() {
        let rsa = TestKey::rsa("rsa-1");
        let p256 = TestKey::generated(Algorithm::ES256, "ec-1");
        let p384 = TestKey::generated(Algorithm::ES384, "ec-2");
        let ed = TestKey::generated(Algorithm::EdDSA, "ed-1");
        let (oidc, idp, _) = oidc(&[&rsa, &p256, &p384, &ed]);
        let expected = OidcSubject {
            name: "alice".into(),
            sub: "f3b1c2d4".into(),
            issuer: ISSUER.into(),
            roles: vec!["viewer".into(), "operator".into()],
        };
        for alg in [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            assert_eq!(
                oidc.verify(&rsa.sign_as(alg, Some("rsa-1"), &claims())),
                Ok(expected.clone())
            );
        }
        for key in [&p256, &p384, &ed] {
            assert_eq!(oidc.verify(&key.sign(&claims())), Ok(expected.clone()), "{:?}", key.alg);
        }
        assert_eq!(idp.fetches(), 0);
    }

    #[test]
    fn signatures_must_match() {
        let rsa = TestKey::rsa("rsa-1");
        let p256 = TestKey::generated(Algorithm::ES256, "ec-1");
        let other = TestKey::generated(Algorithm::ES256, "ec-1");
        let (oidc, _, _) = oidc(&[&rsa, &p256]);
        // Same kid, another private key.
        assert_eq!(oidc.verify(&other.sign(&claims())), Err("bad signature"));
        // Claims changed after signing.
        let token = p256.sign(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims();
        forged["sub"] = json!("admin");
        let tampered = format!("{}.{}.{}", parts[0], b64json(&forged), parts[2]);
        assert_eq!(oidc.verify(&tampered), Err("bad signature"));
        // Signature missing, or not base64url.
        assert_eq!(oidc.verify(&format!("{}.{}.", parts[0], parts[1])), Err("bad signature"));
        assert_eq!(oidc.verify(&format!("{}.{}.!!", parts[0], parts[1])), Err("bad signature"));
        // Signature swapped from another token.
        let token2 = rsa.sign(&claims());
        let sig2 = token2.rsplit('.').next().expect("signature");
        assert_eq!(oidc.verify(&format!("{}.{}.{sig2}", parts[0], parts[1])), Err("bad signature"));
    }

    #[test]
    fn hs256_and_none_tokens_are_refused_before_any_key_lookup() {
        let rsa = TestKey::rsa("rsa-1");
        let (oidc, idp, clock) = oidc(&[&rsa]);
        clock.advance(Duration::from_secs(60)); // a lookup could now refresh: it must not
        // HS256 keyed with the RSA public key's bytes: the classic algorithm confusion.
        let public_n = rsa.jwk["n"].as_str().expect("n").as_bytes().to_vec();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        let secret = EncodingKey::from_secret(&public_n).expect("HMAC key");
        let hs = jsonwebtoken::encode(&header, &claims(), &secret).expect("HS256");
        assert_eq!(oidc.verify(&hs), Err("alg not accepted"));
        let none =
            format!("{}.{}.", b64json(&json!({"alg": "none", "kid": "rsa-1"})), b64json(&claims()));
        assert_eq!(oidc.verify(&none), Err("alg not accepted"));
        let unknown_kid_none =
            format!("{}.{}.", b64json(&json!({"alg": "none", "kid": "x"})), b64json(&claims()));
        assert_eq!(oidc.verify(&unknown_kid_none), Err("alg not accepted"));
        assert_eq!(idp.fetches(), 0);
    }

    #[test]
    fn the_token_alg_must_fit_the_key_named_by_kid() {
        let rsa = TestKey::rsa("rsa-1");
        let p256 = TestKey::generated(Algorithm::ES256, "ec-1");
        let (oidc, idp, clock) = oidc(&[&rsa, &p256]);
        clock.advance(Duration::from_secs(60));
        // An ES256 token naming the RSA key's kid.
        assert_eq!(
            oidc.verify(&p256.sign_as(Algorithm::ES256, Some("rsa-1"), &claims())),
            Err("the key named by kid does not fit the token's alg")
        );
        assert_eq!(idp.fetches(), 0, "a known kid needs no refresh");
        // A JWK pinned to RS384 refuses RS256 tokens.
        let mut pinned = rsa.jwk.clone();
        pinned["alg"] = json!("RS384");
        let idp = FakeIdp::new(json!({ "keys": [pinned] }).to_string().into_bytes());
        let oidc = oidc_with(&settings(), &idp, &FakeClock::new());
        assert!(oidc.verify(&rsa.sign_as(Algorithm::RS256, Some("rsa-1"), &claims())).is_err());
        assert!(oidc.verify(&rsa.sign_as(Algorithm::RS384, Some("rsa-1"), &claims())).is_ok());
    }

    #[test]
    fn a_token_without_kid_is_tried_against_keys_of_its_type() {
        let p256_a = TestKey::generated(Algorithm::ES256, "ec-a");
        let p256_b = TestKey::generated(Algorithm::ES256, "ec-b");
        let rsa = TestKey::rsa("rsa-1");
        let (oidc, idp, _) = oidc(&[&p256_a, &rsa, &p256_b]);
        assert!(oidc.verify(&p256_b.sign_as(Algorithm::ES256, None, &claims())).is_ok());
        assert!(oidc.verify(&rsa.sign_as(Algorithm::PS512, None, &claims())).is_ok());
        let stranger = TestKey::generated(Algorithm::ES256, "x");
        assert_eq!(
            oidc.verify(&stranger.sign_as(Algorithm::ES256, None, &claims())),
            Err("bad signature")
        );
        let ed = TestKey::generated(Algorithm::EdDSA, "ed");
        assert_eq!(
            oidc.verify(&ed.sign_as(Algorithm::EdDSA, None, &claims())),
            Err("no published key for the token's kid and alg")
        );
        assert_eq!(idp.fetches(), 0, "within 30 s of the startup fetch");
    }

    #[test]
    fn find_keys_distinguishes_unknown_and_unfit() {
        let keys = parse_jwks(&jwks(&[
            &TestKey::rsa("a"),
            &TestKey::generated(Algorithm::ES256, "b"),
            &TestKey::rsa("b"),
        ]))
        .expect("JWKS");
        let header = |alg, kid: Option<&str>| TokenHeader { alg, kid: kid.map(str::to_string) };
        assert_eq!(find_keys(&keys, &header(Algorithm::RS256, Some("a"))), Lookup::Found(vec![0]));
        assert_eq!(find_keys(&keys, &header(Algorithm::ES256, Some("b"))), Lookup::Found(vec![1]));
        assert_eq!(find_keys(&keys, &header(Algorithm::PS256, Some("b"))), Lookup::Found(vec![2]));
        assert_eq!(find_keys(&keys, &header(Algorithm::ES256, Some("a"))), Lookup::Unfit);
        assert_eq!(find_keys(&keys, &header(Algorithm::RS256, Some("c"))), Lookup::Unknown);
        assert_eq!(find_keys(&keys, &header(Algorithm::RS256, None)), Lookup::Found(vec![0, 2]));
        assert_eq!(find_keys(&keys, &header(Algorithm::EdDSA, None)), Lookup::Unknown);
        assert_eq!(find_keys(&keys, &header(Algorithm::ES384, None)), Lookup::Unknown);
    }

    // --- claims -----------------------------------------------------------------------------

    fn check(claims: Value, now: u64) -> Result<(), &'static str> {
        check_claims(claims.as_object().expect("object"), ISSUER, CLIENT, now)
    }

    #[test]
    fn iss_must_match_exactly() {
        let now = 1_000_000;
        let with_iss = |iss: Value| check(json!({"iss": iss, "aud": CLIENT, "exp": now + 60}), now);
        assert_eq!(with_iss(json!(ISSUER)), Ok(()));
        assert_eq!(with_iss(json!(format!("{ISSUER}/"))), Err("wrong iss"));
        assert_eq!(with_iss(json!(ISSUER.to_uppercase())), Err("wrong iss"));
        assert_eq!(with_iss(json!("https://evil.example")), Err("wrong iss"));
        assert_eq!(with_iss(json!([ISSUER])), Err("wrong iss"));
        assert_eq!(check(json!({"aud": CLIENT, "exp": now + 60}), now), Err("wrong iss"));
    }

    #[test]
    fn aud_must_contain_the_client_id() {
        let now = 1_000_000;
        let with_aud = |aud: Value| check(json!({"iss": ISSUER, "aud": aud, "exp": now + 60}), now);
        assert_eq!(with_aud(json!(CLIENT)), Ok(()));
        assert_eq!(with_aud(json!(["account", CLIENT])), Ok(()));
        assert_eq!(with_aud(json!([1, null, CLIENT])), Ok(()));
        assert!(with_aud(json!("account")).is_err());
        assert!(with_aud(json!(["account"])).is_err());
        assert!(with_aud(json!([])).is_err());
        assert!(with_aud(json!("butler2")).is_err());
        assert!(with_aud(json!({"aud": CLIENT})).is_err());
        assert!(with_aud(json!(null)).is_err());
        assert!(check(json!({"iss": ISSUER, "exp": now + 60}), now).is_err());
    }

    #[test]
    fn exp_is_required_and_honoured_with_leeway() {
        let now = 1_000_000u64;
        let with_exp = |exp: Value| check(json!({"iss": ISSUER, "aud": CLIENT, "exp": exp}), now);
        assert_eq!(with_exp(json!(now + 1)), Ok(()));
        assert_eq!(with_exp(json!(now - 29)), Ok(()), "within the 30 s leeway");
        assert_eq!(with_exp(json!(now - 30)), Err("expired"));
        assert_eq!(with_exp(json!(now - 3600)), Err("expired"));
        assert_eq!(with_exp(json!(0)), Err("expired"));
        assert_eq!(with_exp(json!(-5)), Err("expired"));
        assert_eq!(with_exp(json!(now as f64 + 0.5)), Ok(()));
        assert_eq!(with_exp(json!((now + 60).to_string())), Err("exp is not a number"));
        assert_eq!(with_exp(json!(null)), Err("exp is not a number"));
        assert_eq!(check(json!({"iss": ISSUER, "aud": CLIENT}), now), Err("no exp"));
    }

    #[test]
    fn nbf_is_honoured_when_present() {
        let now = 1_000_000u64;
        let with_nbf = |nbf: Value| {
            check(json!({"iss": ISSUER, "aud": CLIENT, "exp": now + 600, "nbf": nbf}), now)
        };
        assert_eq!(with_nbf(json!(now - 10)), Ok(()));
        assert_eq!(with_nbf(json!(now + 30)), Ok(()), "within the leeway");
        assert_eq!(with_nbf(json!(now + 31)), Err("not yet valid (nbf)"));
        assert_eq!(with_nbf(json!(now + 3600)), Err("not yet valid (nbf)"));
        assert_eq!(with_nbf(json!("soon")), Err("nbf is not a number"));
    }

    #[test]
    fn sub_is_required_and_names_fall_back_to_it() {
        let map = |v: Value| v.as_object().expect("object").clone();
        let path = "groups";
        assert_eq!(subject(&map(json!({})), ISSUER, path), Err("no sub"));
        assert_eq!(subject(&map(json!({"sub": ""})), ISSUER, path), Err("no sub"));
        assert_eq!(subject(&map(json!({"sub": 42})), ISSUER, path), Err("no sub"));
        let s = subject(&map(json!({"sub": "u-1"})), ISSUER, path).expect("subject");
        assert_eq!(
            s,
            OidcSubject {
                name: "u-1".into(),
                sub: "u-1".into(),
                issuer: ISSUER.into(),
                roles: vec![]
            }
        );
        let s = subject(&map(json!({"sub": "u-1", "preferred_username": ""})), ISSUER, path);
        assert_eq!(s.expect("subject").name, "u-1");
        let s = subject(&map(json!({"sub": "u-1", "preferred_username": 7})), ISSUER, path);
        assert_eq!(s.expect("subject").name, "u-1");
        let s = subject(&map(json!({"sub": "u-1", "preferred_username": "bob"})), ISSUER, path);
        assert_eq!(s.expect("subject").name, "bob");
    }

    fn remove(claims: &mut Value, name: &str) {
        claims.as_object_mut().expect("object").remove(name);
    }

    #[test]
    fn claim_failures_surface_through_verify() {
        let ed = TestKey::generated(Algorithm::EdDSA, "ed-1");
        let (oidc, _, _) = oidc(&[&ed]);
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut c = claims();
            edit(&mut c);
            oidc.verify(&ed.sign(&c))
        };
        assert!(with(&|_| {}).is_ok());
        assert_eq!(with(&|c| c["iss"] = json!("https://other.example")), Err("wrong iss"));
        assert_eq!(with(&|c| c["aud"] = json!("other")), Err("aud does not contain client_id"));
        assert_eq!(with(&|c| c["exp"] = json!(unix_now() - 120)), Err("expired"));
        assert_eq!(with(&|c| remove(c, "exp")), Err("no exp"));
        assert_eq!(with(&|c| c["nbf"] = json!(unix_now() + 600)), Err("not yet valid (nbf)"));
        assert_eq!(with(&|c| remove(c, "sub")), Err("no sub"));
        let array = ed.sign(&json!(["not", "an", "object"]));
        assert_eq!(oidc.verify(&array), Err("claims are not a JSON object"));
    }

    // --- roles ------------------------------------------------------------------------------

    #[test]
    fn roles_are_found_by_literal_name_or_dot_path() {
        let claims = json!({
            "realm_access": {"roles": ["viewer", "operator"]},
            "groups": ["g1", "g2"],
            "https://example.org/roles": ["literal"],
            "scope": "openid  profile email",
            "a.b": ["literal-wins"],
            "a": {"b": ["nested-loses"], "c": {"d": "deep"}},
            "mixed": ["x", 1, null, {"y": 2}, "", "x", "z", "z"],
            "number": 5,
            "object": {"roles": 1},
        });
        let map = claims.as_object().expect("object");
        let roles = |path: &str| extract_roles(map, path);
        assert_eq!(roles("realm_access.roles"), ["viewer", "operator"]);
        assert_eq!(roles("groups"), ["g1", "g2"]);
        assert_eq!(roles("https://example.org/roles"), ["literal"]);
        assert_eq!(roles("scope"), ["openid", "profile", "email"]);
        assert_eq!(roles("a.b"), ["literal-wins"]);
        assert_eq!(roles("a.c.d"), ["deep"]);
        assert_eq!(roles("mixed"), ["x", "z"]);
        for nothing in [
            "missing",
            "realm_access.missing",
            "groups.0",
            "number",
            "object",
            "object.roles",
            "",
            ".",
            "realm_access.",
        ] {
            assert!(roles(nothing).is_empty(), "{nothing}");
        }
    }

    #[test]
    fn roles_from_each_claim_path_through_verify() {
        let rsa = TestKey::rsa("rsa-1");
        let mut c = claims();
        c["groups"] = json!(["family", "family", "admins"]);
        c["https://example.org/roles"] = json!("reader writer reader");
        let token = rsa.sign(&c);
        for (path, expected) in [
            ("realm_access.roles", vec!["viewer", "operator"]),
            ("groups", vec!["family", "admins"]),
            ("https://example.org/roles", vec!["reader", "writer"]),
            ("nowhere", vec![]),
        ] {
            let mut s = settings();
            s.role_claim_path = path.into();
            let idp = FakeIdp::new(jwks(&[&rsa]));
            let oidc = oidc_with(&s, &idp, &FakeClock::new());
            assert_eq!(oidc.verify(&token).expect("valid").roles, expected, "{path}");
        }
    }

    // --- the refresh gate ---------------------------------------------------------------------

    #[test]
    fn gate_allows_one_unknown_key_fetch_per_30_seconds_including_startup() {
        let t0 = Instant::now();
        let mut gate = RefreshGate { last_attempt: Some(t0), in_flight: false };
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(gate.begin(at(0), Trigger::UnknownKey), GateDecision::Skip);
        assert_eq!(gate.begin(at(29), Trigger::UnknownKey), GateDecision::Skip);
        assert_eq!(gate.begin(at(30), Trigger::UnknownKey), GateDecision::Fetch);
        assert!(gate.in_flight);
        assert_eq!(gate.begin(at(30), Trigger::UnknownKey), GateDecision::Wait);
        assert_eq!(gate.begin(at(31), Trigger::Periodic), GateDecision::Skip);
        gate.in_flight = false; // the fetch failed: it still counts
        assert_eq!(gate.begin(at(45), Trigger::UnknownKey), GateDecision::Skip);
        assert_eq!(gate.begin(at(59), Trigger::UnknownKey), GateDecision::Skip);
        assert_eq!(gate.begin(at(60), Trigger::UnknownKey), GateDecision::Fetch);
        gate.in_flight = false;
        // A periodic refresh ignores the gap but counts as an attempt.
        assert_eq!(gate.begin(at(70), Trigger::Periodic), GateDecision::Fetch);
        gate.in_flight = false;
        assert_eq!(gate.begin(at(95), Trigger::UnknownKey), GateDecision::Skip);
        assert_eq!(gate.begin(at(100), Trigger::UnknownKey), GateDecision::Fetch);
        // A clock that seems to run backwards never opens the gate early.
        gate.in_flight = false;
        assert_eq!(gate.begin(at(90), Trigger::UnknownKey), GateDecision::Skip);
        let mut fresh = RefreshGate { last_attempt: None, in_flight: false };
        assert_eq!(fresh.begin(t0, Trigger::UnknownKey), GateDecision::Fetch);
    }

    #[test]
    fn an_unknown_kid_picks_up_rotated_keys_once_the_gate_opens() {
        let old = TestKey::rsa("old");
        let new = TestKey::generated(Algorithm::ES256, "new");
        let (oidc, idp, clock) = oidc(&[&old]);
        idp.serve(Ok(jwks(&[&new])));
        let token = new.sign(&claims());
        // The startup fetch counts: no refresh within 30 s of it.
        clock.advance(Duration::from_secs(29));
        assert_eq!(oidc.verify(&token), Err("no published key for the token's kid and alg"));
        assert_eq!(idp.fetches(), 0);
        clock.advance(Duration::from_secs(1));
        assert!(oidc.verify(&token).is_ok());
        assert_eq!(idp.fetches(), 1);
        // The old key was replaced by the refresh.
        assert!(oidc.verify(&old.sign(&claims())).is_err());
        assert_eq!(idp.fetches(), 1, "the old kid is now unknown but the gate is closed");
    }

    #[test]
    fn failed_refreshes_keep_the_cached_keys_and_count_toward_the_gap() {
        let cached = TestKey::generated(Algorithm::EdDSA, "cached");
        let rotated = TestKey::generated(Algorithm::EdDSA, "rotated");
        let (oidc, idp, clock) = oidc(&[&cached]);
        let good = cached.sign(&claims());
        let unknown = rotated.sign(&claims());
        for failure in [
            Err("HTTP status 500".to_string()),
            Ok(b"<html>".to_vec()),
            Ok(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#.to_vec()),
        ] {
            idp.serve(failure);
            clock.advance(Duration::from_secs(30));
            let before = idp.fetches();
            assert!(oidc.verify(&unknown).is_err());
            assert_eq!(idp.fetches(), before + 1);
            assert!(oidc.verify(&good).is_ok(), "cached key kept");
            // The failed attempt closes the gate even though the endpoint recovers.
            idp.serve(Ok(jwks(&[&rotated])));
            clock.advance(Duration::from_secs(29));
            assert!(oidc.verify(&unknown).is_err());
            assert_eq!(idp.fetches(), before + 1);
        }
        clock.advance(Duration::from_secs(1));
        assert!(oidc.verify(&unknown).is_ok());
        // A periodic refresh that fails keeps the keys too.
        idp.serve(Err("unreachable".into()));
        oidc.refresh(Trigger::Periodic);
        assert!(oidc.verify(&unknown).is_ok());
    }

    #[test]
    fn concurrent_unknown_kids_cause_a_single_fetch() {
        let cached = TestKey::generated(Algorithm::ES256, "cached");
        let mut idp = FakeIdp::new(jwks(&[&cached]));
        idp.delay = Duration::from_millis(200);
        let clock = FakeClock::new();
        let oidc = Arc::new(oidc_with(&settings(), &idp, &clock));
        idp.serve(Err("HTTP status 500".into()));
        clock.advance(Duration::from_secs(31));
        let signer = TestKey::generated(Algorithm::ES256, "unused");
        let tokens: Vec<String> = (0..100)
            .map(|i| signer.sign_as(Algorithm::ES256, Some(&format!("random-{i}")), &claims()))
            .collect();
        let started = Instant::now();
        let handles: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let oidc = oidc.clone();
                thread::spawn(move || oidc.verify(&token))
            })
            .collect();
        for handle in handles {
            assert!(handle.join().expect("verifier thread").is_err());
        }
        assert_eq!(idp.fetches(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(oidc.verify(&cached.sign(&claims())).is_ok());
    }

    #[test]
    fn verifiers_waiting_on_an_in_flight_fetch_use_its_keys() {
        let cached = TestKey::generated(Algorithm::ES256, "cached");
        let rotated = TestKey::generated(Algorithm::EdDSA, "rotated");
        let mut idp = FakeIdp::new(jwks(&[&cached]));
        idp.delay = Duration::from_millis(300);
        let clock = FakeClock::new();
        let oidc = Arc::new(oidc_with(&settings(), &idp, &clock));
        idp.serve(Ok(jwks(&[&rotated])));
        clock.advance(Duration::from_secs(30));
        let token = rotated.sign(&claims());
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let (oidc, token) = (oidc.clone(), token.clone());
                thread::spawn(move || oidc.verify(&token))
            })
            .collect();
        for handle in handles {
            assert!(handle.join().expect("verifier thread").is_ok());
        }
        assert_eq!(idp.fetches(), 1);
    }

    #[test]
    fn a_panicking_fetch_does_not_wedge_the_gate() {
        let cached = TestKey::generated(Algorithm::ES256, "cached");
        let rotated = TestKey::generated(Algorithm::ES256, "rotated");
        let clock = FakeClock::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetcher: Fetcher = {
            let (calls, body) = (calls.clone(), jwks(&[&rotated]));
            Box::new(move || {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("fetch blew up");
                }
                Ok(body.clone())
            })
        };
        let keys = parse_jwks(&jwks(&[&cached])).expect("JWKS");
        let oidc =
            Arc::new(Oidc::from_parts(&settings(), keys, clock.start, fetcher, clock.clock()));
        clock.advance(Duration::from_secs(30));
        let token = rotated.sign(&claims());
        let panicked = {
            let (oidc, token) = (oidc.clone(), token.clone());
            thread::spawn(move || oidc.verify(&token)).join()
        };
        assert!(panicked.is_err());
        assert!(!oidc.lock_gate().in_flight);
        clock.advance(Duration::from_secs(30));
        assert!(oidc.verify(&token).is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_periodic_refresher_updates_keys_and_ends_with_its_oidc() {
        let old = TestKey::generated(Algorithm::ES256, "old");
        let new = TestKey::generated(Algorithm::ES256, "new");
        let idp = FakeIdp::new(jwks(&[&old]));
        let oidc = Arc::new(oidc_with(&settings(), &idp, &FakeClock::new()));
        idp.serve(Ok(jwks(&[&new])));
        oidc.refresh(Trigger::Periodic);
        assert_eq!(idp.fetches(), 1, "the periodic refresh ignores the 30 s gap");
        assert!(oidc.verify(&new.sign(&claims())).is_ok());

        let handle = spawn_refresher(Arc::downgrade(&oidc), Duration::ZERO).expect("thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        while idp.fetches() < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(idp.fetches() >= 2, "the background thread refreshed");
        drop(oidc);
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(handle.is_finished(), "the thread ends once the Oidc is dropped");
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let (oidc, _, _) = oidc(&[&TestKey::rsa("r")]);
        let shown = format!("{oidc:?}");
        assert!(shown.contains(ISSUER) && shown.contains("keys: 1"), "{shown}");
    }
}
