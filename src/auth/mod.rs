//! Authentication (SPEC §5). This module only answers "who is this, and
//! which policy applies?"; what the caller may do is decided by
//! [`crate::policy`].

pub mod jwt;
pub mod keys;
pub mod oidc;
pub mod password;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::addr::Cidr;
use crate::config::{Client, Config, sha256};
use crate::http::Head;
use crate::limits::RateLimiter;
use crate::policy::{Grant, Policy};
use jwt::JwtIssuer;
use oidc::{Oidc, OidcSettings};
use password::Passwords;

/// Who a request was authenticated as.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The subject's name: the client's, the user's, or the OIDC
    /// `preferred_username` (else `sub`). The `client` metrics label.
    pub name: String,
    pub kind: SubjectKind,
    /// Rate-limit state is keyed by this: kinds never share quota, and OIDC
    /// subjects are keyed by issuer and `sub`, not by a display name.
    pub key: String,
    /// What it may do.
    pub grant: Arc<Grant>,
    /// Addresses an API-key client may connect from (`None`: any).
    pub allow_ips: Option<Arc<[Cidr]>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    /// An API-key client (`client` in logs).
    Client,
    /// A configured user (standalone JWT or Basic auth; `user` in logs).
    User,
    /// An OIDC subject (`user` in logs).
    Oidc,
}

/// Why authentication failed. All of them answer the same 401; the reason is
/// for the log only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    Malformed,
    Invalid,
    /// A valid OIDC token whose roles match no role policy.
    NoRole,
    /// Too many password checks for this user or address (Basic auth).
    Throttled,
    /// A client key past its `expires`.
    Expired,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing credentials",
            Failure::Malformed => "malformed credentials",
            Failure::Invalid => "invalid credentials",
            Failure::NoRole => "no role policy matches",
            Failure::Throttled => "too many password attempts",
            Failure::Expired => "expired client key",
        }
    }
}

/// One credential as presented.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    Bearer(String),
    /// `x-api-key` (Anthropic clients): only ever an API key.
    ApiKey(String),
    Basic {
        user: String,
        password: String,
    },
}

/// Every credential source of SPEC §5, tried in the order `either` mode
/// prescribes: API key, then standalone JWT (and users' passwords), then
/// OIDC. Sources the mode does not use are never consulted.
pub struct Authenticator {
    keys: KeyStore,
    users: HashMap<String, Arc<Grant>>,
    passwords: Passwords,
    jwt: Option<JwtIssuer>,
    /// The verifier and the settings it was started with.
    oidc: Option<(OidcSettings, Arc<Oidc>)>,
    roles: Vec<(String, Arc<Policy>)>,
    /// Password checks (logins and Basic auth) per user name and per
    /// address; carried over by reloads, like every limiter (SPEC §11).
    attempts: Arc<RateLimiter>,
    attempt_rate: Option<crate::limits::Rate>,
}

impl Authenticator {
    /// Builds every source the configuration uses. With OIDC this contacts
    /// the identity provider, and fails if it cannot (fail closed).
    /// `previous` (on a reload) lends its OIDC verifier when the settings are
    /// unchanged, so a reload neither refetches keys nor depends on the IdP.
    pub fn new(config: &Config, previous: Option<&Authenticator>) -> Result<Authenticator, String> {
        let mode = config.auth.mode;
        let users_used = mode.uses_users() && !config.users.is_empty();
        let oidc = match (&config.auth.oidc, mode.uses_oidc()) {
            (Some(settings), true) => match previous.and_then(|p| p.oidc.as_ref()) {
                Some((old, same)) if old == settings => Some(same.clone()),
                _ => Some(Oidc::start(settings.clone())?),
            }
            .map(|o| (settings.clone(), o)),
            _ => None,
        };
        let jwt = match (&config.auth.jwt_secret, users_used) {
            (Some(secret), true) => Some(JwtIssuer::new(secret, config.auth.token_expiry)),
            _ => None,
        };
        let pairs: Vec<(String, String)> = if users_used {
            config.users.iter().map(|u| (u.name.clone(), u.password_hash.clone())).collect()
        } else {
            Vec::new()
        };
        Ok(Authenticator {
            keys: KeyStore::new(if mode.uses_keys() { &config.clients } else { &[] }),
            users: config
                .users
                .iter()
                .filter(|_| users_used)
                .map(|u| (u.name.clone(), Arc::new(Grant::single(u.policy.clone()))))
                .collect(),
            passwords: Passwords::new(&pairs),
            jwt,
            oidc,
            roles: config.role_policies.clone(),
            attempts: previous
                .map_or_else(|| Arc::new(RateLimiter::new(None)), |p| p.attempts.clone()),
            attempt_rate: config.auth.login_rate_limit,
        })
    }

    /// Whether `/auth/login` exists (users are configured and used).
    pub fn has_users(&self) -> bool {
        self.jwt.is_some()
    }

    /// Authenticates a request from its headers. Every credential presented
    /// must identify the same subject.
    pub fn authenticate(&self, head: &Head, peer: IpAddr) -> Result<Identity, Failure> {
        let creds = credentials(head)?;
        let mut found: Option<Identity> = None;
        for cred in &creds {
            let identity = self.resolve(cred, peer)?;
            match &found {
                Some(f) if f.key != identity.key => return Err(Failure::Invalid),
                Some(_) => {}
                None => found = Some(identity),
            }
        }
        found.ok_or(Failure::Missing)
    }

    fn resolve(&self, cred: &Credential, peer: IpAddr) -> Result<Identity, Failure> {
        match cred {
            Credential::ApiKey(key) => self.client(key).unwrap_or(Err(Failure::Invalid)),
            Credential::Basic { user, password } => {
                if let Some(identity) = self.client(password) {
                    return identity;
                }
                if self.jwt.is_none() {
                    return Err(Failure::Invalid);
                }
                self.password_user(user, password, peer)
            }
            Credential::Bearer(token) => {
                if let Some(identity) = self.client(token) {
                    return identity;
                }
                if !oidc::looks_like_jwt(token) {
                    return Err(Failure::Invalid);
                }
                if let Some(jwt) = &self.jwt
                    && let Ok(user) = jwt.verify(token, SystemTime::now())
                {
                    // A token outlives nothing: the user must still exist.
                    return self.user(&user).ok_or(Failure::Invalid);
                }
                match &self.oidc {
                    Some((_, oidc)) => self.oidc_subject(oidc, token),
                    None => Err(Failure::Invalid),
                }
            }
        }
    }

    /// `None` when no client has this key; an expired client is a failure
    /// (the same 401: expiry is not revealed).
    fn client(&self, key: &str) -> Option<Result<Identity, Failure>> {
        let entry = self.keys.lookup(key)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if entry.expires.is_some_and(|t| now >= t) {
            return Some(Err(Failure::Expired));
        }
        Some(Ok(Identity {
            name: entry.name.clone(),
            kind: SubjectKind::Client,
            key: format!("client:{}", entry.name),
            grant: entry.grant.clone(),
            allow_ips: (!entry.allow_ips.is_empty()).then(|| entry.allow_ips.clone()),
        }))
    }

    fn user(&self, name: &str) -> Option<Identity> {
        let grant = self.users.get(name)?;
        Some(Identity {
            name: name.to_owned(),
            kind: SubjectKind::User,
            key: format!("user:{name}"),
            grant: grant.clone(),
            allow_ips: None,
        })
    }

    /// Basic auth for a user: bcrypt once, then the short-lived success
    /// cache. Checks that miss the cache count against `login_rate_limit`
    /// per user name and per address, so bad passwords cannot burn CPU.
    fn password_user(&self, user: &str, password: &str, peer: IpAddr) -> Result<Identity, Failure> {
        let now = Instant::now();
        if !self.passwords.is_cached(user, password, now) {
            self.attempt(user, peer, now).map_err(|_| Failure::Throttled)?;
            if !self.passwords.verify_and_remember(user, password, now) {
                return Err(Failure::Invalid);
            }
        }
        self.user(user).ok_or(Failure::Invalid)
    }

    /// Counts one password check against the per-address and per-user
    /// limits (the address first, so a guessed name costs nothing more).
    pub fn attempt(
        &self,
        user: &str,
        peer: IpAddr,
        now: Instant,
    ) -> Result<(), crate::limits::Limited> {
        self.attempts.check(&format!("ip:{peer}"), self.attempt_rate, now)?;
        self.attempts.check(&format!("user:{user}"), self.attempt_rate, now)
    }

    /// Verifies a login; returns a fresh token. Unknown users pay bcrypt too.
    pub fn login(&self, user: &str, password: &str) -> Option<String> {
        let jwt = self.jwt.as_ref()?;
        (self.passwords.verify(user, password) && self.users.contains_key(user))
            .then(|| jwt.issue(user, SystemTime::now()))
    }

    fn oidc_subject(&self, oidc: &Oidc, token: &str) -> Result<Identity, Failure> {
        let subject = oidc.verify(token).map_err(|_| Failure::Invalid)?;
        let mut parts: Vec<Arc<Policy>> = Vec::new();
        for (role, policy) in &self.roles {
            if subject.roles.iter().any(|r| r == role) {
                parts.push(policy.clone());
            }
        }
        if parts.is_empty() {
            return Err(Failure::NoRole);
        }
        Ok(Identity {
            name: subject.name,
            kind: SubjectKind::Oidc,
            key: format!("oidc:{}\n{}", subject.issuer, subject.sub),
            grant: Arc::new(Grant::merge(parts)),
            allow_ips: None,
        })
    }
}

/// API-key clients, held as SHA-256 digests of their keys.
pub struct KeyStore {
    clients: Vec<KeyEntry>,
}

struct KeyEntry {
    name: String,
    digest: [u8; 32],
    grant: Arc<Grant>,
    expires: Option<i64>,
    allow_ips: Arc<[Cidr]>,
}

impl KeyStore {
    pub fn new(clients: &[Client]) -> KeyStore {
        KeyStore {
            clients: clients
                .iter()
                .map(|c| KeyEntry {
                    name: c.name.clone(),
                    digest: c.key_sha256,
                    grant: Arc::new(Grant::single(c.policy.clone())),
                    expires: c.expires,
                    allow_ips: c.allow_ips.clone().into(),
                })
                .collect(),
        }
    }

    /// The client whose key digest equals the digest of `key`. Every stored
    /// digest is compared, in constant time, whatever matches.
    fn lookup(&self, key: &str) -> Option<&KeyEntry> {
        self.index(key).map(|i| &self.clients[i])
    }

    fn index(&self, key: &str) -> Option<usize> {
        let digest = sha256(key.as_bytes());
        let mut index = 0u64;
        let mut found = subtle::Choice::from(0);
        for (i, entry) in self.clients.iter().enumerate() {
            let hit = entry.digest.ct_eq(&digest);
            index.conditional_assign(&(i as u64), hit);
            found |= hit;
        }
        bool::from(found).then_some(index as usize)
    }
}

/// The credentials a request presents: `Authorization: Bearer`,
/// `Authorization: Basic` and `x-api-key`. A repeated header is malformed,
/// not "first one wins". Keys in the query string never count.
fn credentials(head: &Head) -> Result<Vec<Credential>, Failure> {
    if head.header_count("authorization") > 1 || head.header_count("x-api-key") > 1 {
        return Err(Failure::Malformed);
    }
    let mut creds = Vec::new();
    if head.header_count("authorization") == 1 {
        let value = head.header("authorization").ok_or(Failure::Malformed)?;
        creds.push(authorization(value)?);
    }
    if head.header_count("x-api-key") == 1 {
        let value = head.header("x-api-key").ok_or(Failure::Malformed)?.trim();
        if value.is_empty() {
            return Err(Failure::Malformed);
        }
        creds.push(Credential::ApiKey(value.to_owned()));
    }
    if creds.is_empty() { Err(Failure::Missing) } else { Ok(creds) }
}

/// The token of an `Authorization: Bearer` value; `None` for any other
/// scheme (the metrics token is Bearer only, SPEC §10).
pub fn bearer_token(value: &str) -> Option<String> {
    match authorization(value).ok()? {
        Credential::Bearer(t) => Some(t),
        Credential::Basic { .. } | Credential::ApiKey(_) => None,
    }
}

/// Parses `Bearer <token>` (scheme case-insensitive; the token is the rest
/// after one space, trimmed) or `Basic base64(user:password)`.
fn authorization(value: &str) -> Result<Credential, Failure> {
    let (scheme, rest) = value.split_once(' ').ok_or(Failure::Malformed)?;
    let token = rest.trim();
    if token.is_empty() {
        return Err(Failure::Malformed);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Credential::Bearer(token.to_owned()))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| Failure::Malformed)?;
        let decoded = String::from_utf8(decoded).map_err(|_| Failure::Malformed)?;
        let (user, password) = decoded.split_once(':').ok_or(Failure::Malformed)?;
        if password.is_empty() {
            return Err(Failure::Malformed);
        }
        Ok(Credential::Basic { user: user.to_owned(), password: password.to_owned() })
    } else {
        Err(Failure::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{Parsed, parse};

    fn head(headers: &str) -> Head {
        let raw = format!("GET /api/tags HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        match parse(raw.as_bytes()).unwrap() {
            Parsed::Complete(h, _) => *h,
            Parsed::Partial => panic!(),
        }
    }

    fn store() -> KeyStore {
        KeyStore::new(&[
            client("a", b"sk-a", None),
            client("b", b"sk-b", None),
            client("old", b"sk-old", Some(0)),
        ])
    }

    fn who(headers: &str) -> Result<String, Failure> {
        let store = store();
        let auth = Authenticator {
            keys: store,
            users: HashMap::new(),
            passwords: Passwords::new(&[]),
            jwt: None,
            oidc: None,
            roles: Vec::new(),
            attempts: Arc::new(RateLimiter::new(None)),
            attempt_rate: None,
        };
        auth.authenticate(&head(headers), IpAddr::from([127, 0, 0, 1])).map(|i| i.name)
    }

    fn client(name: &str, key: &[u8], expires: Option<i64>) -> Client {
        Client {
            name: name.into(),
            key_sha256: sha256(key),
            expires,
            allow_ips: Vec::new(),
            policy: Default::default(),
        }
    }

    #[test]
    fn an_expired_key_is_refused() {
        assert_eq!(who("Authorization: Bearer sk-old\r\n"), Err(Failure::Expired));
        assert_eq!(who("x-api-key: sk-old\r\n"), Err(Failure::Expired));
    }

    #[test]
    fn accepts_the_three_header_forms() {
        assert_eq!(who("Authorization: Bearer sk-a\r\n").unwrap(), "a");
        assert_eq!(who("authorization: bEaReR   sk-b  \r\n").unwrap(), "b");
        assert_eq!(who("x-api-key: sk-a\r\n").unwrap(), "a");
        // "dXNlcjpzay1i" is base64("user:sk-b").
        assert_eq!(who("Authorization: Basic dXNlcjpzay1i\r\n").unwrap(), "b");
        assert_eq!(who("Authorization: Bearer sk-a\r\nX-Api-Key: sk-a\r\n").unwrap(), "a");
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(who(""), Err(Failure::Missing));
        assert_eq!(who("Authorization: Bearer sk-x\r\n"), Err(Failure::Invalid));
        assert_eq!(who("Authorization: Bearer\r\n"), Err(Failure::Malformed));
        assert_eq!(who("Authorization: Token sk-a\r\n"), Err(Failure::Malformed));
        assert_eq!(who("Authorization: Basic !!!\r\n"), Err(Failure::Malformed));
        assert_eq!(
            who("Authorization: Bearer sk-a\r\nAuthorization: Bearer sk-a\r\n"),
            Err(Failure::Malformed)
        );
        assert_eq!(who("Authorization: Bearer sk-a\r\nx-api-key: sk-b\r\n"), Err(Failure::Invalid));
        assert_eq!(who("Authorization: Bearer sk-a\r\nx-api-key: nope\r\n"), Err(Failure::Invalid));
        assert_eq!(who("Cookie: key=sk-a\r\n"), Err(Failure::Missing));
    }

    #[test]
    fn the_metrics_token_is_read_from_bearer_only() {
        assert_eq!(bearer_token("Bearer tok-1"), Some("tok-1".to_owned()));
        assert_eq!(bearer_token("bEaReR  tok-1 "), Some("tok-1".to_owned()));
        // "dXNlcjp0b2stMQ==" is base64("user:tok-1").
        assert_eq!(bearer_token("Basic dXNlcjp0b2stMQ=="), None);
        assert_eq!(bearer_token("tok-1"), None);
        assert_eq!(bearer_token("Token tok-1"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
