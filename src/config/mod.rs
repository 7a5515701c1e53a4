//! The configuration file (SPEC §4): strict YAML, every error reported at once
//! with its path, `${VAR}` expanded inside string values after parsing.

mod interp;
mod walk;

use std::sync::Arc;
use std::time::Duration;

use serde_yaml::Value;
use sha2::{Digest, Sha256};

use crate::addr::Cidr;
use crate::auth::oidc::OidcSettings;
use crate::auth::password::check_hash;
use crate::budget::TokenBudget;
use crate::cors::Cors;
use crate::limits::Rate;
use crate::policy::model::{ModelAcl, Pattern};
use crate::policy::{KeepAliveCap, Policy, PromptFilter};
use walk::{Env, Errors, Obj, string_value};

/// Where butler listens when the config says nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_WORKERS: u64 = 128;
/// Open connections one peer address may hold (SPEC §4, §11).
const DEFAULT_MAX_CONNECTIONS_PER_IP: u64 = 256;
/// More threads than this is a typo, not a deployment.
const MAX_WORKERS: u64 = 4096;
/// `auth_failure_limit` when the config says nothing (SPEC §4).
pub const DEFAULT_AUTH_FAILURE_LIMIT: Rate = Rate { count: 30, window: Duration::from_secs(60) };
/// Fewest characters in a plaintext client `key`: shorter keys can be
/// guessed online (SPEC §4). `butler gen-key` makes 46.
pub const MIN_KEY_CHARS: usize = 20;

/// A validated configuration. Only fields that butler enforces exist here: a
/// field that is accepted but ignored would be a silent security hole.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub upstream: Upstream,
    pub workers: usize,
    pub log_format: LogFormat,
    pub log_prompts: bool,
    pub timeouts: Timeouts,
    /// Bearer token wanted on `/metrics`; `None` leaves it public.
    pub metrics_token: Option<String>,
    /// Requests per window across every subject.
    pub global_rate_limit: Option<Rate>,
    /// Failed authentications per client address before its requests are
    /// refused unchecked (SPEC §5); `None` is `unlimited`.
    pub auth_failure_limit: Option<Rate>,
    /// Inference requests in flight upstream at once, across every subject.
    pub global_max_concurrent: Option<u64>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Open connections one peer address may hold; `trusted_proxies` are
    /// exempt (SPEC §11).
    pub max_connections_per_ip: usize,
    /// Browser origins allowed to call butler (empty: no CORS handling).
    pub cors: Cors,
    /// Where token-budget counters are kept across restarts.
    pub state_file: Option<String>,
    /// Native HTTPS (`tls:`), from the certificate and key files, read and
    /// checked at load time so that `butler check` catches a key that does
    /// not fit its certificate. `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub clients: Vec<Client>,
    pub auth: Auth,
    pub users: Vec<User>,
    /// OIDC role name → policy, in file order.
    pub role_policies: Vec<(String, Arc<Policy>)>,
}

/// Which credentials count (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    #[default]
    ApiKey,
    JwtStandalone,
    Oidc,
    /// API key, then standalone JWT (and users' Basic auth), then OIDC.
    Either,
}

impl AuthMode {
    pub fn uses_keys(self) -> bool {
        matches!(self, AuthMode::ApiKey | AuthMode::Either)
    }
    pub fn uses_users(self) -> bool {
        matches!(self, AuthMode::JwtStandalone | AuthMode::Either)
    }
    pub fn uses_oidc(self) -> bool {
        matches!(self, AuthMode::Oidc | AuthMode::Either)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::ApiKey => "api_key",
            AuthMode::JwtStandalone => "jwt_standalone",
            AuthMode::Oidc => "oidc",
            AuthMode::Either => "either",
        }
    }
}

/// The `auth` section.
#[derive(Debug, Clone)]
pub struct Auth {
    pub mode: AuthMode,
    /// HS256 secret for standalone JWTs (≥ 32 bytes where JWTs are used).
    pub jwt_secret: Option<Vec<u8>>,
    pub token_expiry: Duration,
    /// Per username and per client IP.
    pub login_rate_limit: Option<Rate>,
    pub oidc: Option<OidcSettings>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            mode: AuthMode::ApiKey,
            jwt_secret: None,
            token_expiry: Duration::from_secs(24 * 3600),
            login_rate_limit: Some(Rate { count: 10, window: Duration::from_secs(60) }),
            oidc: None,
        }
    }
}

/// A user who logs in with a password (standalone JWT, Basic auth).
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// A bcrypt hash, cost at most 14.
    pub password_hash: String,
    pub policy: Arc<Policy>,
}

/// Least bytes in `auth.jwt_secret`.
const MIN_JWT_SECRET: usize = 32;

/// The Ollama server requests are forwarded to.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `scheme://host[:port]`, without a trailing slash.
    pub origin: String,
    /// Base path without a trailing slash (`""` or `/ollama`).
    pub base_path: String,
    pub https: bool,
}

impl Upstream {
    /// The URL of `path_and_query` (which starts with `/`) on the upstream.
    pub fn url(&self, path_and_query: &str) -> String {
        let mut url =
            String::with_capacity(self.origin.len() + self.base_path.len() + path_and_query.len());
        url.push_str(&self.origin);
        url.push_str(&self.base_path);
        url.push_str(path_and_query);
        url
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Every timeout butler applies (SPEC §4 `timeouts`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// Total time to receive a request head.
    pub request_header: Duration,
    /// Longest pause between two reads of a request body.
    pub request_body: Duration,
    /// A keep-alive connection waiting for its next request.
    pub idle: Duration,
    /// A connection with a complete request waiting for a free worker.
    pub queue: Duration,
    pub upstream_connect: Duration,
    /// Model loads can delay the first byte for minutes.
    pub upstream_first_byte: Duration,
    pub shutdown_drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_header: Duration::from_secs(10),
            request_body: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            queue: Duration::from_secs(1),
            upstream_connect: Duration::from_secs(5),
            upstream_first_byte: Duration::from_secs(600),
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

/// An API-key client. The key itself is never kept, only its SHA-256 digest.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub key_sha256: [u8; 32],
    /// Unix time from which the key is refused (401, expiry not revealed).
    pub expires: Option<i64>,
    /// Addresses the client may connect from; empty means any (else 403).
    pub allow_ips: Vec<Cidr>,
    pub policy: Arc<Policy>,
}

impl Config {
    /// Reads and validates the file at `path`, expanding `${VAR}` and applying
    /// the `BUTLER_*` overrides from the process environment: what `butler`
    /// and `butler check` use.
    pub fn load_for_run(path: &str) -> Result<Config, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read config file {path}: {e}")])?;
        Config::parse_for_run(&text)
    }

    /// [`Config::load_for_run`] on text already read (a reload digests the
    /// very bytes it parses).
    pub fn parse_for_run(text: &str) -> Result<Config, Vec<String>> {
        let mut config = Config::parse(text, &|name| std::env::var(name).ok())?;
        let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        config.apply_env_overrides(&env)?;
        Ok(config)
    }

    /// Parses and validates YAML text. Returns every error found.
    pub fn parse(text: &str, env: Env) -> Result<Config, Vec<String>> {
        let value: Value =
            serde_yaml::from_str(text).map_err(|e| vec![format!("invalid YAML: {e}")])?;
        let mut errs = Errors::default();
        let config = read_root(&value, env, &mut errs);
        if errs.list.is_empty() { Ok(config) } else { Err(errs.list) }
    }

    /// Applies `BUTLER_LISTEN` / `BUTLER_UPSTREAM` (SPEC §3) for containers.
    pub fn apply_env_overrides(&mut self, env: Env) -> Result<(), Vec<String>> {
        if let Some(listen) = env("BUTLER_LISTEN") {
            check_listen(&listen).map_err(|e| vec![format!("BUTLER_LISTEN: {e}")])?;
            self.listen = listen;
        }
        if let Some(upstream) = env("BUTLER_UPSTREAM") {
            self.upstream =
                parse_upstream(&upstream).map_err(|e| vec![format!("BUTLER_UPSTREAM: {e}")])?;
        }
        Ok(())
    }
}

fn read_root(value: &Value, env: Env, errs: &mut Errors) -> Config {
    if !matches!(value, Value::Mapping(_)) {
        errs.push("", "the configuration must be a YAML mapping");
    }
    let mut root = Obj::new(value, "", errs);

    let listen = match root.string("listen", env, errs) {
        Some(l) => {
            if let Err(e) = check_listen(&l) {
                errs.push("listen", e);
            }
            l
        }
        None => DEFAULT_LISTEN.to_owned(),
    };

    let upstream = match root.string("upstream", env, errs) {
        Some(u) => parse_upstream(&u).unwrap_or_else(|e| {
            errs.push("upstream", e);
            placeholder_upstream()
        }),
        None => {
            // BUTLER_UPSTREAM may still supply it; checked after overrides.
            if env("BUTLER_UPSTREAM").is_none_or(|v| v.is_empty()) {
                errs.push("upstream", "required (e.g. \"http://127.0.0.1:11434\")");
            }
            placeholder_upstream()
        }
    };

    let workers = match root.uint("workers", env, errs) {
        Some(0) => {
            errs.push("workers", "must be at least 1");
            1
        }
        Some(n) if n > MAX_WORKERS => {
            errs.push("workers", format!("must be at most {MAX_WORKERS}"));
            MAX_WORKERS as usize
        }
        Some(n) => n as usize,
        None => DEFAULT_WORKERS as usize,
    };

    let log_format = match root.string("log_format", env, errs).as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(other) => {
            errs.push("log_format", format!("expected json or text, got {other:?}"));
            LogFormat::Json
        }
    };
    let log_prompts = root.bool("log_prompts", env, errs).unwrap_or(false);

    let timeouts = match root.get("timeouts") {
        Some(v) => read_timeouts(v, env, errs),
        None => Timeouts::default(),
    };

    let mut metrics_token = None;
    if let Some(v) = root.get("metrics") {
        let mut m = Obj::new(v, "metrics", errs);
        metrics_token = m.string("token", env, errs);
        if metrics_token.as_deref() == Some("") {
            errs.push("metrics.token", "must not be empty (omit it to leave /metrics public)");
        }
        m.finish(errs);
    }

    let global_rate_limit = root.string("global_rate_limit", env, errs).and_then(|r| {
        Rate::parse(&r).unwrap_or_else(|e| {
            errs.push("global_rate_limit", e);
            None
        })
    });

    let auth_failure_limit = match root.string("auth_failure_limit", env, errs) {
        Some(r) => Rate::parse(&r).unwrap_or_else(|e| {
            errs.push("auth_failure_limit", e);
            None
        }),
        None => Some(DEFAULT_AUTH_FAILURE_LIMIT),
    };

    let trusted_proxies = read_cidrs(&mut root, "trusted_proxies", env, errs);
    let max_connections_per_ip = match root.uint("max_connections_per_ip", env, errs) {
        // Zero would refuse every client: surely a mistake, not a policy.
        Some(0) => {
            errs.push("max_connections_per_ip", "must be at least 1");
            DEFAULT_MAX_CONNECTIONS_PER_IP
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONNECTIONS_PER_IP,
    };
    let max_connections_per_ip = usize::try_from(max_connections_per_ip).unwrap_or(usize::MAX);
    let state_file = root.string("state_file", env, errs);
    let mut cors = Cors::default();
    if let Some(v) = root.get("cors") {
        let mut obj = Obj::new(v, "cors", errs);
        let origins = obj.strings("allowed_origins", env, errs);
        obj.finish(errs);
        let mut list = Vec::new();
        for (origin, path) in origins {
            match Cors::check_origin(&origin) {
                Ok(()) => list.push(origin),
                Err(e) => errs.push(&path, e),
            }
        }
        cors = Cors::new(list);
    }
    let tls = root.get("tls").and_then(|v| read_tls(v, env, errs));
    let global_max_concurrent = root.uint("global_max_concurrent", env, errs);
    if global_max_concurrent == Some(0) {
        errs.push("global_max_concurrent", "must be at least 1");
    }

    let mut clients = Vec::new();
    let mut client_entries = Vec::new();
    root.list("clients", errs, |item, path, errs| {
        let (client, seen) = read_client(item, &path, env, errs);
        clients.extend(client);
        client_entries.push(seen);
    });
    let auth = match root.get("auth") {
        Some(v) => read_auth(v, env, errs),
        None => Auth::default(),
    };
    let mut users = Vec::new();
    let mut user_names = Vec::new();
    root.list("users", errs, |item, path, errs| {
        let (user, name) = read_user(item, &path, env, errs);
        users.extend(user);
        user_names.push(name);
    });
    let mut role_policies = Vec::new();
    if let Some(v) = root.get("role_policies") {
        match v {
            Value::Mapping(map) => {
                for (name, policy) in map {
                    let Some(name) = name.as_str() else {
                        errs.push("role_policies", "role names must be strings");
                        continue;
                    };
                    let path = format!("role_policies.{name}");
                    let mut obj = Obj::new(policy, &path, errs);
                    let p = read_policy(&mut obj, env, errs);
                    obj.finish(errs);
                    role_policies.push((name.to_owned(), Arc::new(p)));
                }
            }
            _ => errs.push("role_policies", "expected a mapping of role name to policy"),
        }
    }
    // Entries with an invalid field take part too, so every error shows at once.
    check_auth_mode(&auth, client_entries.len(), user_names.len(), &role_policies, errs);
    let client_errors = errs.list.iter().any(|e| e.starts_with("clients"));
    if auth.mode == AuthMode::ApiKey && client_entries.is_empty() && !client_errors {
        errs.push("clients", "at least one client is required in api_key mode");
    }
    if auth.mode == AuthMode::Either
        && client_entries.is_empty()
        && user_names.is_empty()
        && auth.oidc.is_none()
        && !client_errors
    {
        errs.push("auth.mode", "either mode needs clients, users or auth.oidc");
    }
    check_duplicates(&client_entries, &user_names, errs);
    root.finish(errs);

    Config {
        listen,
        upstream,
        workers,
        log_format,
        log_prompts,
        timeouts,
        metrics_token,
        global_rate_limit,
        auth_failure_limit,
        global_max_concurrent,
        trusted_proxies,
        max_connections_per_ip,
        cors,
        state_file,
        tls,
        clients,
        auth,
        users,
        role_policies,
    }
}

fn read_timeouts(value: &Value, env: Env, errs: &mut Errors) -> Timeouts {
    let mut t = Timeouts::default();
    let mut obj = Obj::new(value, "timeouts", errs);
    let fields: [(&'static str, &mut Duration); 7] = [
        ("request_header", &mut t.request_header),
        ("request_body", &mut t.request_body),
        ("idle", &mut t.idle),
        ("queue", &mut t.queue),
        ("upstream_connect", &mut t.upstream_connect),
        ("upstream_first_byte", &mut t.upstream_first_byte),
        ("shutdown_drain", &mut t.shutdown_drain),
    ];
    for (key, slot) in fields {
        let path = obj.field_path(key);
        if let Some(s) = obj.string(key, env, errs) {
            match parse_duration(&s) {
                Ok(d) if d.is_zero() && key != "shutdown_drain" => {
                    errs.push(&path, "must be greater than zero")
                }
                Ok(d) => *slot = d,
                Err(e) => errs.push(&path, e),
            }
        }
    }
    obj.finish(errs);
    t
}

/// What the cross-checks of SPEC §4 need from one `clients` entry. It is
/// kept even when another field of the entry is invalid, so that a duplicate
/// is reported along with that error.
#[derive(Debug, Default)]
struct ClientEntry {
    name: Option<String>,
    /// The key's digest and the field it came from (`key` or `key_sha256`).
    key: Option<([u8; 32], &'static str)>,
}

fn read_client(
    value: &Value,
    path: &str,
    env: Env,
    errs: &mut Errors,
) -> (Option<Client>, ClientEntry) {
    let mut obj = Obj::new(value, path, errs);
    let name = obj.string("name", env, errs);
    let key = obj.get("key").map(|v| (v, obj.field_path("key")));
    let digest = obj.get("key_sha256").map(|v| (v, obj.field_path("key_sha256")));
    let expires = obj.string("expires", env, errs).and_then(|s| match parse_expiry(&s) {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(&obj.field_path("expires"), e);
            None
        }
    });
    let allow_ips = read_cidrs(&mut obj, "allow_ips", env, errs);
    let policy = read_policy(&mut obj, env, errs);
    obj.finish(errs);

    let name = match name {
        Some(n) if !n.trim().is_empty() => Some(n),
        Some(_) => {
            errs.push(&format!("{path}.name"), "must not be empty");
            None
        }
        None => {
            errs.push(&format!("{path}.name"), "required");
            None
        }
    };
    let mut valid_key = true;
    let key_sha256 = match (key, digest) {
        (Some(_), Some(_)) => {
            errs.push(path, "set either key or key_sha256, not both");
            None
        }
        (Some((v, p)), None) => match string_value(v, &p, env, errs) {
            Some(k) if k.is_empty() => {
                errs.push(&p, "must not be empty");
                None
            }
            Some(k) => {
                // Still digested: a short key that repeats another is reported too.
                if k.chars().count() < MIN_KEY_CHARS {
                    errs.push(
                        &p,
                        format!(
                            "must be at least {MIN_KEY_CHARS} characters \
                             (generate one with `butler gen-key`)"
                        ),
                    );
                    valid_key = false;
                }
                Some((sha256(k.as_bytes()), "key"))
            }
            None => None,
        },
        (None, Some((v, p))) => {
            string_value(v, &p, env, errs).and_then(|h| match parse_hex32(&h) {
                Some(d) => Some((d, "key_sha256")),
                None => {
                    errs.push(&p, "must be 64 hexadecimal characters (a SHA-256 digest)");
                    None
                }
            })
        }
        (None, None) => {
            errs.push(path, "key or key_sha256 is required");
            None
        }
    };
    let entry = ClientEntry { name: name.clone(), key: key_sha256 };
    let client = match (name, key_sha256) {
        (Some(name), Some((key_sha256, _))) if valid_key => {
            Some(Client { name, key_sha256, expires, allow_ips, policy: Arc::new(policy) })
        }
        _ => None,
    };
    (client, entry)
}

/// Duplicate client names and keys and user names (SPEC §4): each error
/// names the later entry's field and the first earlier entry it repeats.
fn check_duplicates(clients: &[ClientEntry], users: &[Option<String>], errs: &mut Errors) {
    for (i, c) in clients.iter().enumerate() {
        let earlier = &clients[..i];
        if let Some(name) = &c.name
            && let Some(j) = earlier.iter().position(|o| o.name.as_ref() == Some(name))
        {
            errs.push(
                &format!("clients[{i}].name"),
                format!("duplicate client name \"{name}\" (clients[{j}])"),
            );
        }
        if let Some((digest, field)) = &c.key
            && let Some(j) = earlier.iter().position(|o| o.key.is_some_and(|(d, _)| d == *digest))
        {
            errs.push(&format!("clients[{i}].{field}"), format!("same key as clients[{j}]"));
        }
    }
    for (i, name) in users.iter().enumerate() {
        if let Some(name) = name
            && let Some(j) = users[..i].iter().position(|o| o.as_ref() == Some(name))
        {
            errs.push(
                &format!("users[{i}].name"),
                format!("duplicate user name \"{name}\" (users[{j}])"),
            );
        }
    }
}

fn read_cidrs(obj: &mut Obj, key: &'static str, env: Env, errs: &mut Errors) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (raw, path) in obj.strings(key, env, errs) {
        match Cidr::parse(&raw) {
            Ok(c) => out.push(c),
            Err(e) => errs.push(&path, e),
        }
    }
    out
}

/// Parses `expires`: a date (`2027-01-31`, the key stops working at the
/// start of that day, UTC) or an RFC 3339 time (`2027-01-31T18:00:00+01:00`).
/// YAML may also hand over a date it read itself; both arrive as text.
pub fn parse_expiry(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let bad = || format!("invalid date {s:?} (use 2027-01-31 or 2027-01-31T18:00:00Z)");
    let num = |t: &str| -> Result<i64, String> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse().map_err(|_| bad())
    };
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, m, d) = (num(y)?, num(m)?, num(d)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&m) || d < 1 || d > month_days[(m - 1) as usize] {
        return Err(bad());
    }
    let mut secs = crate::logging::days_from_civil(y, m as u32, d as u32) * 86_400;
    if let Some(time) = time {
        let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
            (c, 0)
        } else {
            let i = time.rfind(['+', '-']).ok_or_else(bad)?;
            let (c, o) = time.split_at(i);
            let (oh, om) = o[1..].split_once(':').ok_or_else(bad)?;
            let (oh, om) = (num(oh)?, num(om)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let sign = if o.starts_with('-') { -1 } else { 1 };
            (c, sign * (oh * 3600 + om * 60))
        };
        let clock = clock.split('.').next().unwrap_or_default();
        let mut hms = clock.split(':');
        let (Some(h), Some(mi), Some(se), None) = (hms.next(), hms.next(), hms.next(), hms.next())
        else {
            return Err(bad());
        };
        let (h, mi, se) = (num(h)?, num(mi)?, num(se)?);
        if h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + se - offset;
    }
    Ok(secs)
}

fn read_auth(value: &Value, env: Env, errs: &mut Errors) -> Auth {
    let mut auth = Auth::default();
    let mut obj = Obj::new(value, "auth", errs);
    match obj.string("mode", env, errs).as_deref() {
        None | Some("api_key") => {}
        Some("jwt_standalone") => auth.mode = AuthMode::JwtStandalone,
        Some("oidc") => auth.mode = AuthMode::Oidc,
        Some("either") => auth.mode = AuthMode::Either,
        Some(other) => errs.push(
            "auth.mode",
            format!("expected api_key, jwt_standalone, oidc or either, got {other:?}"),
        ),
    }
    auth.jwt_secret = obj.string("jwt_secret", env, errs).map(String::into_bytes);
    if let Some(s) = obj.string("token_expiry", env, errs) {
        match parse_duration(&s) {
            Ok(d) if !d.is_zero() => auth.token_expiry = d,
            Ok(_) => errs.push("auth.token_expiry", "must be greater than zero"),
            Err(e) => errs.push("auth.token_expiry", e),
        }
    }
    if let Some(r) = obj.string("login_rate_limit", env, errs) {
        match Rate::parse(&r) {
            Ok(rate) => auth.login_rate_limit = rate,
            Err(e) => errs.push("auth.login_rate_limit", e),
        }
    }
    if let Some(v) = obj.get("oidc") {
        auth.oidc = read_oidc(v, env, errs);
    }
    obj.finish(errs);
    auth
}

fn read_oidc(value: &Value, env: Env, errs: &mut Errors) -> Option<OidcSettings> {
    let mut obj = Obj::new(value, "auth.oidc", errs);
    let issuer = obj.string("issuer", env, errs);
    let client_id = obj.string("client_id", env, errs);
    let role_claim_path = obj.string("role_claim_path", env, errs);
    let mut refresh_interval = Duration::from_secs(3600);
    if let Some(s) = obj.string("refresh_interval", env, errs) {
        match parse_duration(&s) {
            Ok(d) if d >= Duration::from_secs(1) => refresh_interval = d,
            Ok(_) => errs.push("auth.oidc.refresh_interval", "must be at least 1s"),
            Err(e) => errs.push("auth.oidc.refresh_interval", e),
        }
    }
    let ca_file = obj.string("ca_file", env, errs);
    obj.finish(errs);
    let mut ok = true;
    match &issuer {
        None => {
            errs.push("auth.oidc.issuer", "required");
            ok = false;
        }
        Some(i) if !i.to_ascii_lowercase().starts_with("https://") => {
            errs.push("auth.oidc.issuer", format!("must be an https:// URL, got {i:?}"));
            ok = false;
        }
        Some(_) => {}
    }
    for (field, value) in [("client_id", &client_id), ("role_claim_path", &role_claim_path)] {
        if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
            errs.push(&format!("auth.oidc.{field}"), "required");
            ok = false;
        }
    }
    let ca_pem = match ca_file {
        Some(path) => match std::fs::read(&path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                errs.push("auth.oidc.ca_file", format!("cannot read {path}: {e}"));
                ok = false;
                None
            }
        },
        None => None,
    };
    ok.then(|| OidcSettings {
        issuer: issuer.unwrap_or_default(),
        client_id: client_id.unwrap_or_default(),
        role_claim_path: role_claim_path.unwrap_or_default(),
        refresh_interval,
        ca_pem,
    })
}

fn read_tls(value: &Value, env: Env, errs: &mut Errors) -> Option<Arc<rustls::ServerConfig>> {
    let mut obj = Obj::new(value, "tls", errs);
    let cert_file = obj.string("cert_file", env, errs);
    let key_file = obj.string("key_file", env, errs);
    obj.finish(errs);
    let mut read = |field: &str, path: &Option<String>| match path {
        None => {
            errs.push(&format!("tls.{field}"), "required");
            None
        }
        Some(p) => match std::fs::read(p) {
            Ok(pem) => Some(pem),
            Err(e) => {
                errs.push(&format!("tls.{field}"), format!("cannot read {p}: {e}"));
                None
            }
        },
    };
    let cert = read("cert_file", &cert_file);
    let key = read("key_file", &key_file);
    let (cert, key) = (cert?, key?);
    match crate::http::socket::server_config(&cert, &key) {
        Ok(server) => Some(Arc::new(server)),
        Err(e) => {
            errs.push("tls", e);
            None
        }
    }
}

/// A user, and its name for the cross-checks even when another field is
/// invalid.
fn read_user(
    value: &Value,
    path: &str,
    env: Env,
    errs: &mut Errors,
) -> (Option<User>, Option<String>) {
    let mut obj = Obj::new(value, path, errs);
    let name = obj.string("name", env, errs);
    let hash = obj.string("password_hash", env, errs);
    let policy = read_policy(&mut obj, env, errs);
    obj.finish(errs);
    let name = match name {
        Some(n) if !n.trim().is_empty() => Some(n),
        _ => {
            errs.push(&format!("{path}.name"), "required");
            None
        }
    };
    let hash = match hash {
        Some(h) => match check_hash(&h) {
            Ok(_) => Some(h),
            Err(e) => {
                errs.push(&format!("{path}.password_hash"), e);
                None
            }
        },
        None => {
            errs.push(&format!("{path}.password_hash"), "required (see `butler hash-password`)");
            None
        }
    };
    let user = match (name.clone(), hash) {
        (Some(name), Some(password_hash)) => {
            Some(User { name, password_hash, policy: Arc::new(policy) })
        }
        _ => None,
    };
    (user, name)
}

/// Cross-checks of SPEC §4: what each auth mode needs and uses.
/// `clients` and `users` count every entry, valid or not.
fn check_auth_mode(
    auth: &Auth,
    clients: usize,
    users: usize,
    roles: &[(String, Arc<Policy>)],
    errs: &mut Errors,
) {
    let mode = auth.mode.as_str();
    if !auth.mode.uses_keys() && clients > 0 {
        errs.push("clients", format!("API-key clients are not used in auth.mode {mode}"));
    }
    if !auth.mode.uses_users() && users > 0 {
        errs.push("users", format!("users need auth.mode jwt_standalone or either, not {mode}"));
    }
    if auth.mode == AuthMode::JwtStandalone && users == 0 {
        errs.push("users", "at least one user is required in jwt_standalone mode");
    }
    let jwt_used = auth.mode.uses_users() && users > 0;
    match &auth.jwt_secret {
        Some(s) if s.len() < MIN_JWT_SECRET => errs.push(
            "auth.jwt_secret",
            format!("must be at least {MIN_JWT_SECRET} bytes, got {}", s.len()),
        ),
        None if jwt_used || auth.mode == AuthMode::JwtStandalone => {
            errs.push("auth.jwt_secret", "required when users log in (at least 32 bytes)")
        }
        _ => {}
    }
    if auth.mode == AuthMode::Oidc
        && auth.oidc.is_none()
        && !errs.list.iter().any(|e| e.starts_with("auth.oidc"))
    {
        errs.push("auth.oidc", "required in oidc mode");
    }
    if !auth.mode.uses_oidc() {
        if auth.oidc.is_some() {
            errs.push("auth.oidc", format!("not used in auth.mode {mode}"));
        }
        if !roles.is_empty() {
            errs.push("role_policies", format!("only used with OIDC, not in auth.mode {mode}"));
        }
    } else if auth.oidc.is_some() && roles.is_empty() {
        errs.push("role_policies", "at least one role policy is required with OIDC");
    }
}

/// Reads the policy fields (SPEC §4) of a client, user or role policy.
pub(crate) fn read_policy(obj: &mut Obj, env: Env, errs: &mut Errors) -> Policy {
    let patterns = |key: &'static str, obj: &mut Obj, errs: &mut Errors| {
        let mut out = Vec::new();
        for (raw, path) in obj.strings(key, env, errs) {
            match Pattern::parse(&raw) {
                Ok(p) => out.push(p),
                Err(e) => errs.push(&path, e),
            }
        }
        out
    };
    let allow = patterns("allow_models", obj, errs);
    let deny = patterns("deny_models", obj, errs);
    let allow_manage = obj.bool("allow_manage", env, errs).unwrap_or(false);
    let allow_cloud = obj.bool("allow_cloud", env, errs).unwrap_or(false);
    let allow_web_search = obj.bool("allow_web_search", env, errs).unwrap_or(false);
    let allow_runner_options = obj.bool("allow_runner_options", env, errs).unwrap_or(false);
    let rate_limit = obj.string("rate_limit", env, errs).and_then(|r| {
        Rate::parse(&r).unwrap_or_else(|e| {
            errs.push(&obj.field_path("rate_limit"), e);
            None
        })
    });
    let max_concurrent = obj.uint("max_concurrent", env, errs);
    if max_concurrent == Some(0) {
        errs.push(&obj.field_path("max_concurrent"), "must be at least 1");
    }
    let max_request_bytes = obj.uint("max_request_bytes", env, errs);
    let max_ctx = obj.uint("max_ctx", env, errs);
    let max_predict = obj.uint("max_predict", env, errs);
    let max_keep_alive = read_keep_alive_cap(obj, env, errs);
    let mut token_budget = TokenBudget::default();
    if let Some(v) = obj.get("token_budget") {
        let path = obj.field_path("token_budget");
        let mut b = Obj::new(v, &path, errs);
        token_budget.per_minute = b.uint("per_minute", env, errs);
        token_budget.per_day = b.uint("per_day", env, errs);
        token_budget.per_month = b.uint("per_month", env, errs);
        b.finish(errs);
    }
    let sources: Vec<(String, String)> = obj.strings("deny_prompt_patterns", env, errs);
    let mut compiled = Vec::new();
    for (source, path) in sources {
        match PromptFilter::new(vec![source.clone()]) {
            Ok(_) => compiled.push(source),
            Err(e) => errs.push(&path, e),
        }
    }
    let prompts = PromptFilter::new(compiled).unwrap_or_else(|e| {
        errs.push(&obj.field_path("deny_prompt_patterns"), e);
        PromptFilter::default()
    });
    Policy {
        models: ModelAcl::new(allow, deny),
        allow_manage,
        allow_cloud,
        allow_web_search,
        allow_runner_options,
        rate_limit,
        max_concurrent,
        max_request_bytes,
        max_ctx,
        max_predict,
        max_keep_alive,
        token_budget,
        prompts,
    }
}

/// `max_keep_alive` (SPEC §4): a duration (`10m`) or a number of seconds
/// (`600`, as Ollama reads a number in `keep_alive`; `0` allows only 0). The
/// text is kept as configured, for the refusal message.
fn read_keep_alive_cap(obj: &mut Obj, env: Env, errs: &mut Errors) -> Option<KeepAliveCap> {
    let path = obj.field_path("max_keep_alive");
    let text = match obj.get("max_keep_alive")? {
        Value::Number(n) => match n.as_u64() {
            Some(secs) => secs.to_string(),
            None => {
                errs.push(&path, "expected a duration or a non-negative whole number of seconds");
                return None;
            }
        },
        v => string_value(v, &path, env, errs)?.trim().to_owned(),
    };
    let secs = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        match text.parse::<u64>() {
            Ok(secs) => secs as f64,
            Err(_) => {
                errs.push(&path, format!("number of seconds {text:?} is too large"));
                return None;
            }
        }
    } else {
        match parse_duration(&text) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => {
                errs.push(&path, format!("{e}, or a number of seconds"));
                return None;
            }
        }
    };
    Some(KeepAliveCap { secs, text })
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn placeholder_upstream() -> Upstream {
    Upstream { origin: String::new(), base_path: String::new(), https: false }
}

/// Checks `host:port` syntax without resolving anything (`butler check` is offline).
fn check_listen(s: &str) -> Result<(), String> {
    let (host, port) =
        s.rsplit_once(':').ok_or_else(|| format!("expected host:port, got {s:?}"))?;
    if port.parse::<u16>().is_err() {
        return Err(format!("invalid port in {s:?}"));
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("invalid host in {s:?}"));
    }
    Ok(())
}

/// Parses the upstream URL: `http` or `https`, a host, an optional port and an
/// optional base path; no credentials, query or fragment.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("expected http:// or https:// URL, got {s:?}"))?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(format!("scheme must be http or https, got {scheme:?}")),
    };
    if rest.contains(['?', '#']) {
        return Err("must not contain a query or fragment".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("must not contain credentials".into());
    }
    if authority.is_empty() {
        return Err("missing host".into());
    }
    let uri: ureq::http::Uri =
        format!("{scheme}://{authority}/").parse().map_err(|e| format!("invalid URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    // The port follows the last ':' outside an IPv6 literal.
    let port = match authority.rfind(']') {
        Some(i) => authority[i + 1..].strip_prefix(':'),
        None => authority.rsplit_once(':').map(|(_, p)| p),
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("invalid port {port:?}"));
    }
    if path.contains(char::is_whitespace) || path.contains("//") {
        return Err(format!("invalid base path {path:?}"));
    }
    Ok(Upstream {
        origin: format!("{}://{}", scheme.to_ascii_lowercase(), authority),
        base_path: path.trim_end_matches('/').to_owned(),
        https,
    })
}

/// Parses `500ms`, `30s`, `5m`, `24h`, `7d` (SPEC §4).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 500ms, 30s, 5m, 24h, 7d)"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too large"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(format!("invalid duration {s:?} (use e.g. 500ms, 30s, 5m, 24h, 7d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn parse_env(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let vars: Vec<(String, String)> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::parse(yaml, &move |n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
    }

    fn parse(yaml: &str) -> Result<Config, Vec<String>> {
        parse_env(yaml, &[])
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&format!(
            "upstream: http://127.0.0.1:11434\nclients:\n  - name: a\n    key_sha256: {KEY_DIGEST}\n"
        ))
        .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.workers, 128);
        assert_eq!(c.max_connections_per_ip, 256);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.upstream.url("/api/tags"), "http://127.0.0.1:11434/api/tags");
        assert_eq!(c.clients[0].key_sha256, sha256(b"test"));
    }

    #[test]
    fn plaintext_key_is_digested_and_interpolated() {
        let c = parse_env(
            "upstream: http://h:1\nclients:\n  - {name: a, key: \"${K}\"}\n",
            &[("K", "sk-twenty-characters")],
        )
        .unwrap();
        assert_eq!(c.clients[0].key_sha256, sha256(b"sk-twenty-characters"));
    }

    #[test]
    fn reports_every_error_with_its_path() {
        let errs = parse(
            "upstream: ftp://x\nworkers: -1\nbogus: 1\ntimeouts: {idle: 5 minutes}\n\
             clients:\n  - {name: a, key: sk-unit-test-key-0001}\n  - {name: b, key: sk-unit-test-key-0002}\n  \
             - {name: c, key: sk-unit-test-key-0003, deny_model: x}\n",
        )
        .unwrap_err();
        let has = |needle: &str| errs.iter().any(|e| e == needle);
        assert!(has("clients[2]: unknown field \"deny_model\""), "{errs:?}");
        assert!(has("unknown field \"bogus\""), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("upstream: ")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("workers: ")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("timeouts.idle: ")), "{errs:?}");
        assert_eq!(errs.len(), 5, "{errs:?}");
    }

    #[test]
    fn max_connections_per_ip() {
        let base = "upstream: http://h:1\nclients:\n  - {name: a, key: kkkkkkkkkkkkkkkkkkkkkkkk}\n";
        let c = parse(&format!("max_connections_per_ip: 3\n{base}")).unwrap();
        assert_eq!(c.max_connections_per_ip, 3);
        let errs = parse(&format!("max_connections_per_ip: 0\n{base}")).unwrap_err();
        assert_eq!(errs, vec!["max_connections_per_ip: must be at least 1"]);
        let errs = parse(&format!("max_connections_per_ip: -2\n{base}")).unwrap_err();
        assert_eq!(errs, vec!["max_connections_per_ip: expected a non-negative integer"]);
    }

    #[test]
    fn unset_variable_is_an_error() {
        let errs =
            parse("upstream: http://h:1\nclients:\n  - {name: a, key: \"${NOPE}\"}\n").unwrap_err();
        assert_eq!(errs, vec!["clients[0].key: environment variable \"NOPE\" is not set"]);
    }

    #[test]
    fn client_validation() {
        let same = "sk-the-same-key-twice-01";
        let yaml = [
            "upstream: http://h:1",
            "clients:",
            &format!("  - {{name: a, key: {same}}}"),
            &format!("  - {{name: a, key: {same}}}"),
            "  - {name: c, key_sha256: abc}",
            "  - {name: d}",
            &format!("  - {{name: e, key: sk-unit-test-key-0005, key_sha256: {KEY_DIGEST}}}"),
            &format!(
                "  - {{name: f, key_sha256: \"{}\"}}",
                crate::auth::keys::hex(&sha256(same.as_bytes()))
            ),
            "  - {name: a, key: short}",
        ]
        .join("\n");
        let errs = parse(&yaml).unwrap_err();
        assert_eq!(
            errs,
            [
                "clients[2].key_sha256: must be 64 hexadecimal characters (a SHA-256 digest)",
                "clients[3]: key or key_sha256 is required",
                "clients[4]: set either key or key_sha256, not both",
                "clients[6].key: must be at least 20 characters (generate one with `butler gen-key`)",
                "clients[1].name: duplicate client name \"a\" (clients[0])",
                "clients[1].key: same key as clients[0]",
                "clients[5].key_sha256: same key as clients[0]",
                "clients[6].name: duplicate client name \"a\" (clients[0])",
            ]
        );
    }

    #[test]
    fn plaintext_keys_need_twenty_characters() {
        let yaml = |key: &str| {
            format!("upstream: http://h:1\nclients:\n  - {{name: a, key: \"{key}\"}}\n")
        };
        assert!(parse(&yaml(&"k".repeat(20))).is_ok());
        // Characters, not bytes: 19 of them in 38 bytes are too few.
        let errs = parse(&yaml(&"é".repeat(19))).unwrap_err();
        assert_eq!(
            errs,
            ["clients[0].key: must be at least 20 characters (generate one with `butler gen-key`)"]
        );
        // The key itself never appears in the message.
        let errs = parse(&yaml("a")).unwrap_err();
        assert!(!errs[0].contains("\"a\""), "{errs:?}");
        // A digest is not a key: any 64 hex digits pass.
        assert!(
            parse(&format!(
                "upstream: http://h:1\nclients:\n  - {{name: a, key_sha256: {KEY_DIGEST}}}\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn duplicate_users_name_both_entries() {
        let hash = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";
        let yaml = format!(
            "upstream: http://h:1\nauth: {{mode: jwt_standalone, jwt_secret: \"{}\"}}\n\
             users:\n  - {{name: u, password_hash: \"{hash}\"}}\n  - {{name: v, password_hash: \"{hash}\"}}\n  \
             - {{name: u, password_hash: \"{hash}\"}}\n",
            "s".repeat(32)
        );
        assert_eq!(
            parse(&yaml).unwrap_err(),
            ["users[2].name: duplicate user name \"u\" (users[0])"]
        );
    }

    #[test]
    fn an_entry_with_an_invalid_field_still_counts_in_cross_checks() {
        // The malformed hash is reported, and so is the secret this user needs.
        let errs = parse(
            "upstream: http://h:1\nauth: {mode: either}\nclients:\n  - {name: a, key: sk-unit-test-key-0001}\n\
             users:\n  - {name: u, password_hash: \"not-bcrypt\"}\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("users[0].password_hash: "), "{errs:?}");
        assert_eq!(errs[1], "auth.jwt_secret: required when users log in (at least 32 bytes)");
        // A client whose key is too short is still a client: no "at least one client" error,
        // and in jwt_standalone mode it is reported as unused.
        let errs =
            parse("upstream: http://h:1\nclients:\n  - {name: a, key: short}\n").unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let errs = parse(
            "upstream: http://h:1\nauth: {mode: oidc, oidc: {issuer: \"https://idp\", client_id: b, \
             role_claim_path: r}}\nrole_policies: {x: {}}\nclients:\n  - {name: a, key: short}\n",
        )
        .unwrap_err();
        assert!(
            errs.contains(&"clients: API-key clients are not used in auth.mode oidc".to_owned()),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn max_keep_alive_takes_seconds_or_a_duration() {
        let cap = |v: &str| {
            let c = parse(&format!(
                "upstream: http://h:1\nclients:\n  - {{name: a, key: sk-unit-test-key-0001, max_keep_alive: {v}}}\n"
            ));
            c.map(|c| c.clients[0].policy.max_keep_alive.clone().map(|k| (k.secs, k.text)))
        };
        assert_eq!(cap("600"), Ok(Some((600.0, "600".to_owned()))));
        assert_eq!(cap("0"), Ok(Some((0.0, "0".to_owned()))));
        assert_eq!(cap("10m"), Ok(Some((600.0, "10m".to_owned()))));
        assert_eq!(cap("\"90\""), Ok(Some((90.0, "90".to_owned()))));
        for bad in ["-1", "1.5", "ten", "\"5 m\"", "[1]"] {
            let errs = cap(bad).unwrap_err();
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert!(errs[0].starts_with("clients[0].max_keep_alive: "), "{bad}: {errs:?}");
        }
    }

    #[test]
    fn auth_failure_limit_defaults_to_30_per_minute() {
        let base = "upstream: http://h:1\nclients:\n  - {name: a, key: sk-unit-test-key-0001}\n";
        assert_eq!(parse(base).unwrap().auth_failure_limit, Some(DEFAULT_AUTH_FAILURE_LIMIT));
        assert_eq!(DEFAULT_AUTH_FAILURE_LIMIT.to_string(), "30/min");
        let c = parse(&format!("auth_failure_limit: 3/min\n{base}")).unwrap();
        assert_eq!(c.auth_failure_limit, Rate::parse("3/min").unwrap());
        let c = parse(&format!("auth_failure_limit: unlimited\n{base}")).unwrap();
        assert_eq!(c.auth_failure_limit, None);
        let errs = parse(&format!("auth_failure_limit: 0/min\n{base}")).unwrap_err();
        assert!(errs[0].starts_with("auth_failure_limit: invalid rate"), "{errs:?}");
    }

    #[test]
    fn upstream_forms() {
        let u = parse_upstream("https://ollama.lan:8443/base/").unwrap();
        assert_eq!(u.origin, "https://ollama.lan:8443");
        assert_eq!(u.base_path, "/base");
        assert!(u.https);
        assert_eq!(u.url("/api/chat?x=1"), "https://ollama.lan:8443/base/api/chat?x=1");
        assert!(parse_upstream("http://[::1]:11434").is_ok());
        for bad in
            ["127.0.0.1:11434", "ftp://h", "http://", "http://u:p@h", "http://h/?q", "http://h:"]
        {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "5", "m", "1.5s", "-1s", "5 m", "5w", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn example_config_is_valid() {
        let c = parse_env(
            include_str!("../../butler.example.yaml"),
            &[
                ("OPEN_WEBUI_KEY", "sk-example-open-webui-key"),
                ("INDEXER_KEY", "sk-example-indexer-key"),
            ],
        )
        .unwrap();
        assert_eq!(c.clients.len(), 3);
        assert!(c.clients[0].policy.allow_manage);
        assert!(!c.clients[0].policy.allow_cloud, "cloud models stay off in the example");
        assert_eq!(c.clients[2].policy.rate_limit.map(|r| r.count), Some(120));
    }

    #[test]
    fn model_patterns_with_a_scheme_or_two_suffixes_are_errors() {
        let errs = parse(
            "upstream: http://h:1\nclients:\n  - name: a\n    key: k\n    \
             allow_models: [\"*:cloud\", \" llama3.2:local \"]\n    \
             deny_models: [\"https://registry.ollama.ai/library/x\", \"x:cloud:local\", \"*-cloud\"]\n",
        )
        .unwrap_err();
        assert_eq!(
            errs[..3],
            [
                "clients[0].deny_models[0]: invalid model pattern \"https://registry.ollama.ai/library/x\": a scheme (://) is not allowed",
                "clients[0].deny_models[1]: invalid model pattern \"x:cloud:local\": two source suffixes",
                "clients[0].deny_models[2]: invalid model pattern \"*-cloud\": names are matched without their -cloud suffix; write *:cloud for every cloud model",
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn policy_fields_are_validated_with_paths() {
        let errs = parse(
            "upstream: http://h:1\nglobal_rate_limit: 5/week\nclients:\n  - name: a\n    key: sk-unit-test-key-0001\n    \
             allow_models: [\"a//b\", 7]\n    deny_prompt_patterns: [\"(\"]\n    rate_limit: 0/s\n    \
             max_ctx: -1\n",
        )
        .unwrap_err();
        let has = |prefix: &str| errs.iter().any(|e| e.starts_with(prefix));
        assert!(has("global_rate_limit: invalid rate"), "{errs:?}");
        assert!(has("clients[0].allow_models[0]: invalid model pattern"), "{errs:?}");
        assert!(has("clients[0].allow_models[1]: expected a string"), "{errs:?}");
        assert!(has("clients[0].deny_prompt_patterns[0]: invalid pattern"), "{errs:?}");
        assert!(has("clients[0].rate_limit: invalid rate"), "{errs:?}");
        assert!(has("clients[0].max_ctx: expected a non-negative integer"), "{errs:?}");
        assert_eq!(errs.len(), 6, "{errs:?}");
    }

    #[test]
    fn expiry_dates() {
        assert_eq!(parse_expiry("1970-01-02"), Ok(86_400));
        assert_eq!(parse_expiry("2027-01-31"), Ok(1_801_353_600));
        assert_eq!(parse_expiry("2027-01-31T00:00:00Z"), Ok(1_801_353_600));
        assert_eq!(parse_expiry("2027-01-31T01:00:00+01:00"), Ok(1_801_353_600));
        assert_eq!(parse_expiry("2027-01-30T23:30:00.5-00:30"), Ok(1_801_353_600));
        assert_eq!(parse_expiry("2024-02-29"), Ok(1_709_164_800));
        for bad in [
            "",
            "2027-02-30",
            "2027-13-01",
            "27-01-01",
            "2027-01-31T25:00:00Z",
            "tomorrow",
            "2027-01-31T10:00:00",
            "2027-01-31T10:00Z",
        ] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
        let c = parse("upstream: http://h:1\ntrusted_proxies: [\"127.0.0.1\"]\nclients:\n  - {name: a, key: sk-unit-test-key-0001, expires: 2027-01-31, allow_ips: [\"10.0.0.0/8\"]}\n").unwrap();
        assert_eq!(c.clients[0].expires, Some(1_801_353_600));
        assert_eq!(c.clients[0].allow_ips.len(), 1);
        assert_eq!(c.trusted_proxies.len(), 1);
        let errs = parse("upstream: http://h:1\ntrusted_proxies: [\"x\"]\nclients:\n  - {name: a, key: sk-unit-test-key-0001, expires: soon, allow_ips: [\"10.0.0.1/8\"]}\n").unwrap_err();
        assert!(errs.iter().any(|e| e.starts_with("trusted_proxies[0]: ")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("clients[0].expires: invalid date")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("clients[0].allow_ips[0]: ")), "{errs:?}");
    }

    #[test]
    fn env_overrides() {
        let mut c =
            parse("upstream: http://h:1\nclients:\n  - {name: a, key: sk-unit-test-key-0001}\n")
                .unwrap();
        let env = |n: &str| match n {
            "BUTLER_LISTEN" => Some("0.0.0.0:9000".to_string()),
            "BUTLER_UPSTREAM" => Some("http://ollama:11434".to_string()),
            _ => None,
        };
        c.apply_env_overrides(&env).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert_eq!(c.upstream.origin, "http://ollama:11434");
    }
}
