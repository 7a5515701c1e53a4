//! The request pipeline (SPEC §7.5): public routes, authentication, policy,
//! then forwarding; with the request id, the audit log lines and the metrics that
//! every request gets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use log::Level;
use log::kv::Value;
use subtle::ConstantTimeEq;

use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::addr::{self, Cidr};
use crate::auth::password::{self, LoginError};
use crate::auth::{Authenticator, Failure, Identity, SubjectKind};
use crate::budget::Ledger;
use crate::coding::{self, DecodeError};
use crate::config::Config;
use crate::cors::{Cors, Preflight};
use crate::health::Health;
use crate::http::exchange::BodyError;
use crate::http::head::Framing;
use crate::http::{Exchange, Head, Service};
use crate::inspect::{self, MAX_INSPECTED};
use crate::limits::{AuthFailures, Concurrency, Limited, RateLimiter, Slot};
use crate::logging;
use crate::metrics::Metrics;
use crate::policy::Refusal;
use crate::policy::model::ModelName;
use crate::proxy::{Forwarding, Metered, Outcome, Proxy, Respond, Upload};
use crate::routes::{self, Class, Listing, Public};
use crate::usage::{Charge, Format, Tap};

/// The request pipeline for one configuration. A reload builds a new one;
/// requests in flight finish under the one they started with. State that
/// must outlive a reload (metrics, rate-limit windows, requests in flight,
/// the request-id generator) is shared between them.
pub struct App {
    metrics_token: Option<String>,
    auth: Authenticator,
    proxy: Proxy,
    health: Health,
    metrics: Arc<Metrics>,
    ids: Arc<RequestIds>,
    limiter: Arc<RateLimiter>,
    /// Failed authentications per client address (SPEC §5).
    failures: Arc<AuthFailures>,
    concurrency: Arc<Concurrency>,
    ledger: Arc<Ledger>,
    state_file: Option<String>,
    cors: Cors,
    trusted_proxies: Vec<Cidr>,
    /// Open connections one (untrusted) peer address may hold (SPEC §11).
    max_connections_per_ip: usize,
    /// `timeouts.request_header`: a login body must be in within this of
    /// its head (SPEC §5).
    login_body_wait: std::time::Duration,
    global_max_concurrent: Option<u64>,
    log_prompts: bool,
}

impl App {
    /// Builds the pipeline; with OIDC this contacts the identity provider.
    /// `previous` (on a reload) hands over the state that survives reloads.
    pub fn new(config: &Config, previous: Option<&App>) -> Result<App, String> {
        let failures = match previous {
            Some(p) => {
                p.failures.set_rate(config.auth_failure_limit);
                p.failures.clone()
            }
            None => Arc::new(AuthFailures::new(config.auth_failure_limit)),
        };
        let (metrics, ids, limiter, concurrency, ledger) = match previous {
            Some(p) => {
                p.limiter.set_global(config.global_rate_limit);
                let ledger = p.ledger.clone();
                (p.metrics.clone(), p.ids.clone(), p.limiter.clone(), p.concurrency.clone(), ledger)
            }
            None => (
                Arc::new(Metrics::new()),
                Arc::new(RequestIds::new().map_err(|e| format!("no randomness: {e}"))?),
                Arc::new(RateLimiter::new(config.global_rate_limit)),
                Arc::new(Concurrency::new()),
                Arc::new(match &config.state_file {
                    Some(path) => Ledger::load(path)?,
                    None => Ledger::new(),
                }),
            ),
        };
        Ok(App {
            metrics_token: config.metrics_token.clone(),
            auth: Authenticator::new(config, previous.map(|p| &p.auth))?,
            proxy: Proxy::new(config.upstream.clone(), &config.timeouts),
            health: Health::new(&config.upstream),
            metrics,
            ids,
            limiter,
            failures,
            concurrency,
            ledger,
            state_file: config.state_file.clone(),
            cors: config.cors.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            max_connections_per_ip: config.max_connections_per_ip,
            login_body_wait: config.timeouts.request_header,
            global_max_concurrent: config.global_max_concurrent,
            log_prompts: config.log_prompts,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Writes the token-budget counters to `state_file`, if one is set and
    /// anything changed.
    pub fn save_state(&self) {
        if let Some(path) = &self.state_file
            && let Err(e) = self.ledger.save(path)
        {
            log::error!(path = path.as_str(), error:% = e; "cannot write the state file");
        }
    }

    /// `GET /butler/usage` (SPEC §9): the caller's own usage and limits.
    fn usage_report(&self, ex: &mut Exchange<'_>, identity: &Identity) -> u16 {
        let grant = &identity.grant;
        let used = self.ledger.used(&identity.key, unix_now());
        let window =
            |used: u64, limit: Option<u64>| serde_json::json!({"used": used, "limit": limit});
        let requests = match grant.rate_limit {
            Some(rate) => serde_json::json!({
                "used": self.limiter.used(&identity.key, rate, Instant::now()),
                "limit": rate.count,
                "window": crate::limits::window_text(rate.window),
            }),
            None => serde_json::json!({"used": used.requests, "limit": null, "window": "1m"}),
        };
        let body = serde_json::json!({
            "subject": identity.name,
            "tokens": {
                "minute": window(used.minute, grant.token_budget.per_minute),
                "day": window(used.day, grant.token_budget.per_day),
                "month": window(used.month, grant.token_budget.per_month),
            },
            "requests": requests,
        })
        .to_string()
            + "\n";
        let _ = ex.respond_json(200, &body);
        200
    }

    fn public(&self, ex: &mut Exchange<'_>, route: Public) -> u16 {
        if route == Public::Login {
            return self.login(ex);
        }
        if !is_read(ex) {
            return method_not_allowed(ex, "GET, HEAD");
        }
        match route {
            Public::Healthz => match self.health.check() {
                Ok(()) => {
                    let _ = ex.respond_json(200, "{\"status\":\"ok\"}\n");
                    200
                }
                Err(e) => {
                    let body =
                        serde_json::json!({"status": "unhealthy", "error": e}).to_string() + "\n";
                    let _ = ex.respond_json(503, &body);
                    503
                }
            },
            // While draining the intake answers 503 before this is reached.
            Public::Readyz => {
                let _ = ex.respond_json(200, "{\"status\":\"ready\"}\n");
                200
            }
            Public::Login => unreachable!("answered above"),
            Public::Metrics => {
                if let Some(token) = &self.metrics_token {
                    // Bearer only (SPEC §10): not a Basic password, not x-api-key.
                    let presented = ex
                        .head
                        .header("authorization")
                        .filter(|_| ex.head.header_count("authorization") == 1)
                        .and_then(crate::auth::bearer_token);
                    let ok = presented.is_some_and(|p| {
                        crate::config::sha256(p.as_bytes())
                            .ct_eq(&crate::config::sha256(token.as_bytes()))
                            .into()
                    });
                    if !ok {
                        self.metrics.rejected("", "unauthorized");
                        unauthorized(ex);
                        return 401;
                    }
                }
                let text = self.metrics.render();
                let _ = ex.respond(
                    200,
                    &[("Content-Type", b"text/plain; version=0.0.4; charset=utf-8")],
                    text.as_bytes(),
                );
                200
            }
        }
    }
}

impl App {
    /// `POST /auth/login` (SPEC §5): a username and password for a
    /// standalone JWT. Unknown users and wrong passwords get the same answer
    /// after the same bcrypt work.
    fn login(&self, ex: &mut Exchange<'_>) -> u16 {
        if !self.auth.has_users() {
            let _ = ex.respond_json(404, "{\"error\":\"not found\"}\n");
            return 404;
        }
        if ex.head.method != "POST" {
            return method_not_allowed(ex, "POST");
        }
        // The intake has normally collected the body already (see
        // `collect_body`); should it not have, the same total deadline holds.
        ex.set_body_deadline(ex.started + self.login_body_wait);
        let (remote, _) = self.client_addr(ex);
        if let Err(limited) = self.failures.check(remote, Instant::now()) {
            return self.too_many_failures(ex, remote, limited);
        }
        let body = match ex.read_body_limited(MAX_LOGIN_BODY) {
            Ok(Some(body)) => body,
            Ok(None) => {
                self.metrics.rejected("", "too_large");
                let _ = ex.respond_json(413, "{\"error\":\"request body too large\"}\n");
                return 413;
            }
            Err(_) => {
                return match body_failed(ex) {
                    Stop::Answered(status, _) => status,
                    Stop::Refused(r) => {
                        let _ = ex.respond_json(r.status(), &r.body());
                        r.status()
                    }
                };
            }
        };
        let (user, password) = match password::parse_login(&body) {
            Ok(pair) => pair,
            Err(e) => {
                self.metrics.rejected("", "bad_request");
                let body = match e {
                    LoginError::BadRequest => "{\"error\":\"bad request\"}\n",
                    LoginError::Missing => "{\"error\":\"username and password are required\"}\n",
                };
                let _ = ex.respond_json(400, body);
                return 400;
            }
        };
        if let Err(limited) = self.auth.attempt(&user, remote, Instant::now()) {
            log::warn!(user = user.as_str(), remote = remote.to_string().as_str(),
                status = 429u16, reason = "rate_limited"; "login refused");
            self.metrics.rejected("", "rate_limited");
            let retry = limited.retry_after_secs().to_string();
            let _ = ex.respond(
                429,
                &[("Content-Type", b"application/json"), ("Retry-After", retry.as_bytes())],
                b"{\"error\":\"rate limit exceeded\"}\n",
            );
            return 429;
        }
        match self.auth.login(&user, &password) {
            Some(token) => {
                log::info!(user = user.as_str(), remote = remote.to_string().as_str(); "login");
                let body = serde_json::json!({ "token": token }).to_string() + "\n";
                let _ = ex.respond(
                    200,
                    &[("Content-Type", b"application/json"), ("Cache-Control", b"no-store")],
                    body.as_bytes(),
                );
                200
            }
            None => {
                log::warn!(user = user.as_str(), remote = remote.to_string().as_str(),
                    status = 401u16, reason = "unauthorized"; "login failed");
                self.failures.record(remote, Instant::now());
                self.metrics.rejected("", "unauthorized");
                let _ = ex.respond_json(401, "{\"error\":\"invalid credentials\"}\n");
                401
            }
        }
    }
}

impl App {
    /// 429 for an address with too many failed authentications (SPEC §5),
    /// its credentials unchecked.
    fn too_many_failures(&self, ex: &mut Exchange<'_>, remote: IpAddr, limited: Limited) -> u16 {
        log::warn!(method = ex.head.method.as_str(), path = ex.head.target.path.as_str(),
            remote = remote.to_string().as_str(), status = 429u16, reason = "rate_limited";
            "too many failed attempts");
        self.metrics.rejected("", "rate_limited");
        let retry = limited.retry_after_secs().to_string();
        let _ = ex.respond(
            429,
            &[("Content-Type", b"application/json"), ("Retry-After", retry.as_bytes())],
            b"{\"error\":\"too many failed attempts\"}\n",
        );
        429
    }

    /// CORS (SPEC §11): answers a preflight (returning its status), or marks
    /// every response to an allowed origin. Other origins get no CORS headers,
    /// so browsers refuse to read the answers.
    fn cors(&self, ex: &mut Exchange<'_>) -> Option<u16> {
        if ex.head.header_count("origin") != 1 {
            return None;
        }
        let origin = ex.head.header("origin")?.trim().to_owned();
        let preflight = ex.head.method == "OPTIONS"
            && ex.head.header("access-control-request-method").is_some();
        if !preflight {
            if self.cors.allows(&origin) {
                ex.add_header("Access-Control-Allow-Origin", origin);
                ex.add_header("Vary", "Origin".to_owned());
            }
            return None;
        }
        let requested = ex.head.header("access-control-request-headers").map(str::to_owned);
        match self.cors.preflight(&origin, requested.as_deref()) {
            Preflight::Allowed(headers) => {
                for (name, value) in headers {
                    ex.add_header(name, value);
                }
                let _ = ex.respond(204, &[], b"");
                Some(204)
            }
            Preflight::Denied => {
                log::warn!(origin = origin.as_str(), status = 403u16, reason = "forbidden"; "preflight refused");
                self.metrics.rejected("", "forbidden");
                let _ = ex.respond_json(403, "{\"error\":\"origin not allowed\"}\n");
                Some(403)
            }
        }
    }

    /// The client's address and the `X-Forwarded-For` to send upstream
    /// (SPEC §8, §11): a trusted proxy's header is believed, others' not.
    fn client_addr(&self, ex: &Exchange<'_>) -> (IpAddr, String) {
        let xff: Vec<&str> = ex
            .head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .collect();
        addr::client_ip(ex.peer().ip(), &xff, &self.trusted_proxies)
    }

    /// The `X-Forwarded-Proto` to send upstream (SPEC §8): a trusted proxy's
    /// (Caddy terminating TLS), else butler's own scheme.
    fn forwarded_proto(&self, ex: &Exchange<'_>) -> &'static str {
        let values: Vec<&str> = ex
            .head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-proto"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .collect();
        let own = if ex.is_tls() { "https" } else { "http" };
        addr::forwarded_proto(ex.peer().ip(), &values, &self.trusted_proxies, own)
    }
}

/// How a route reports token usage (SPEC §9); `/api/embeddings` reports none
/// and is charged an estimate.
fn usage_format(class: &Class, kind: inspect::Kind) -> Option<Format> {
    use inspect::Kind;
    if !matches!(class, Class::Inference(_)) {
        return None;
    }
    match kind {
        Kind::OllamaChat | Kind::OllamaGenerate => Some(Format::OllamaGenerate),
        Kind::OllamaEmbed => Some(Format::OllamaEmbed),
        Kind::OpenAiGenerate | Kind::OpenAiEmbed => Some(Format::OpenAi),
        Kind::Messages => Some(Format::Anthropic),
        Kind::Responses => Some(Format::Responses),
        Kind::ModelOnly | Kind::Copy | Kind::Create => None,
    }
}

/// Seconds since the Unix epoch (budgets use the UTC calendar).
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Largest `/auth/login` body (SPEC §5).
const MAX_LOGIN_BODY: usize = 64 * 1024;

fn is_read(ex: &Exchange<'_>) -> bool {
    ex.head.method == "GET" || ex.head.method == "HEAD"
}

/// 405 for a route butler answers itself, naming the methods it takes.
fn method_not_allowed(ex: &mut Exchange<'_>, allow: &'static str) -> u16 {
    let _ = ex.respond(
        405,
        &[("Content-Type", b"application/json"), ("Allow", allow.as_bytes())],
        b"{\"error\":\"method not allowed\"}\n",
    );
    405
}

fn unauthorized(ex: &mut Exchange<'_>) {
    let _ = ex.respond(
        401,
        &[("Content-Type", b"application/json"), ("WWW-Authenticate", b"Bearer realm=\"butler\"")],
        b"{\"error\":\"unauthorized\"}\n",
    );
}

/// What an admitted request forwards.
struct Plan<'a> {
    /// Concurrency slots held until the response ends.
    _slots: Vec<Slot<'a>>,
    upload: Upload,
    listing: Option<Listing>,
    /// Normalised name of the model it runs, for logs and metrics.
    model: Option<String>,
    /// Digest of the inspected prompt text (audits without the text).
    prompt_sha256: Option<String>,
    /// How to read token counts from the response, and whether to hide the
    /// usage chunk butler asked for on the client's behalf.
    tap: Option<(Format, bool)>,
    /// Bytes of the inspected prompt text, for a token estimate when the
    /// response brings no counts (SPEC §9).
    prompt_bytes: u64,
}

/// Why a request goes no further.
enum Stop {
    Refused(Refusal),
    /// Already answered (or the client left); the status for the log.
    Answered(u16, &'static str),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Stop {
        Stop::Refused(r)
    }
}

impl App {
    /// SPEC §7.5 after authentication: route class, rate limits, body size,
    /// parse, model ACL, caps, patterns. Nothing is forwarded unless every
    /// step admits it.
    fn admit(
        &self,
        ex: &mut Exchange<'_>,
        identity: &Identity,
        class: &Class,
        id: &str,
        client_ip: IpAddr,
    ) -> Result<Plan<'_>, Stop> {
        let policy = &*identity.grant;
        if let Some(allowed) = &identity.allow_ips
            && !addr::any_contains(allowed, client_ip)
        {
            return Err(Refusal::Forbidden.into());
        }
        if *class == Class::Usage {
            if !is_read(ex) {
                let status = method_not_allowed(ex, "GET, HEAD");
                return Err(Stop::Answered(status, "method not allowed"));
            }
            let status = self.usage_report(ex, identity);
            return Err(Stop::Answered(status, "usage report"));
        }
        if class.needs_manage() && !policy.allow_manage {
            return Err(Refusal::EndpointNotAllowed.into());
        }
        self.limiter
            .check(&identity.key, policy.rate_limit, Instant::now())
            .map_err(|l| Refusal::RateLimited { retry_after_secs: l.retry_after_secs() })?;
        self.ledger.request(&identity.key, unix_now());
        let mut slots = Vec::new();
        if let Some(max) = policy.max_concurrent {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            slots.push(
                self.concurrency
                    .try_acquire(&identity.key, max)
                    .ok_or(Refusal::TooManyConcurrent)?,
            );
        }
        if let (Some(max), Class::Inference(_)) = (self.global_max_concurrent, class) {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            // Subject keys carry a kind prefix, so this one cannot collide.
            slots.push(self.concurrency.try_acquire("global", max).ok_or(Refusal::Busy)?);
        }

        let declared = match ex.head.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let inspected = class.inspected();
        if let (Some(n), Some(max)) = (declared, policy.max_request_bytes)
            && n > max
        {
            return Err(Refusal::TooLarge.into());
        }
        if inspected.is_some() && declared.is_some_and(|n| n > MAX_INSPECTED as u64) {
            return Err(Refusal::BodyTooLarge.into());
        }

        let mut plan = Plan {
            _slots: slots,
            upload: Upload::Stream,
            listing: None,
            model: None,
            prompt_sha256: None,
            tap: None,
            prompt_bytes: 0,
        };
        match class {
            Class::ModelInfoPath(raw) => {
                let names = policy.admit_models(std::slice::from_ref(raw), false)?;
                plan.model = names.first().map(ModelName::label);
            }
            Class::Listing(kind) if !policy.permits_all() => plan.listing = Some(*kind),
            _ => {}
        }
        let Some(kind) = inspected else {
            if let Some(max) = policy.max_request_bytes {
                ex.limit_body(max);
            }
            return Ok(plan);
        };

        let ceiling = policy
            .max_request_bytes
            .map_or(MAX_INSPECTED, |m| usize::try_from(m).unwrap_or(usize::MAX).min(MAX_INSPECTED));
        // Over the ceiling, as sent or decoded: the subject's own limit when
        // it is the smaller one.
        let too_large = || {
            if policy.max_request_bytes.is_some_and(|m| m <= MAX_INSPECTED as u64) {
                Refusal::TooLarge
            } else {
                Refusal::BodyTooLarge
            }
        };
        let body = match ex.read_body_limited(ceiling) {
            Ok(Some(body)) => body,
            Ok(None) => return Err(too_large().into()),
            Err(_) => return Err(body_failed(ex)),
        };
        // A gzip or zstd body is inspected and forwarded decoded, under the
        // same ceiling (SPEC §7.1, §7.5: size, then decoding, then parsing).
        let codings = ex
            .head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-encoding"))
            .map(|(_, v)| v.as_slice());
        let coding = coding::coding(codings).map_err(|_| Refusal::UnsupportedEncoding)?;
        let body = coding::decode(coding, body, ceiling).map_err(|e| match e {
            DecodeError::TooLarge => too_large(),
            DecodeError::Invalid(reason) => Refusal::BadRequest(reason.into()),
        })?;
        let mut request = inspect::inspect(kind, &body).map_err(Refusal::BadRequest)?;
        let verdict = policy.judge(&request)?;
        plan.model = verdict.models.first().map(ModelName::label);
        if kind.is_inference() {
            // Token budgets gate inference only (SPEC §7.5, §9).
            self.ledger
                .check(&identity.key, &policy.token_budget, unix_now())
                .map_err(|secs| Refusal::BudgetExceeded { retry_after_secs: secs })?;
            let mut hasher = Sha256::new();
            let mut first = true;
            let mut prompt_bytes = 0u64;
            request.for_each_text(|text| {
                if !std::mem::take(&mut first) {
                    hasher.update(b"\n");
                }
                hasher.update(text.as_bytes());
                prompt_bytes += text.len() as u64;
            });
            plan.prompt_sha256 = Some(crate::auth::keys::hex(&hasher.finalize()));
            // The estimate for a response without counts (SPEC §9).
            plan.prompt_bytes = prompt_bytes;
            if self.log_prompts {
                let mut texts = Vec::new();
                request.for_each_text(|text| texts.push(text));
                let prompts = serde_json::to_string(&texts).unwrap_or_default();
                logging::emit(
                    Level::Info,
                    "prompts",
                    &[
                        ("request_id", Value::from(id)),
                        (subject_field(identity), Value::from(identity.name.as_str())),
                        ("prompts", Value::from(prompts.as_str())),
                    ],
                );
            }
        }
        // The parsed body is edited in place, and serialised once if it was.
        let mut edited = verdict
            .inject_predict
            .is_some_and(|cap| inspect::inject_predict(kind, &mut request.body, cap));
        plan.tap = usage_format(class, kind).map(|format| (format, false));
        // Both `/v1/chat/completions` and `/v1/completions` (SPEC §9).
        if class == &Class::Inference(inspect::Kind::OpenAiGenerate)
            && inspect::include_usage(&mut request.body)
        {
            // Ollama is asked for the usage chunk, which is hidden from this client.
            edited = true;
            plan.tap = Some((Format::OpenAi, true));
        }
        plan.upload = Upload::Bytes(if edited { request.body.to_bytes() } else { body });
        Ok(plan)
    }
}

/// The log field naming the subject: `client` for API keys, `user` for
/// users and OIDC subjects (SPEC §10).
fn subject_field(identity: &Identity) -> &'static str {
    match identity.kind {
        SubjectKind::Client => "client",
        SubjectKind::User | SubjectKind::Oidc => "user",
    }
}

/// Answers a request body that could not be read whole.
fn body_failed(ex: &mut Exchange<'_>) -> Stop {
    match ex.body_error() {
        Some(BodyError::Timeout) => {
            let _ = ex.respond_json(408, "{\"error\":\"request timeout\"}\n");
            Stop::Answered(408, "request body timeout")
        }
        Some(BodyError::Malformed(_)) => {
            Stop::Refused(Refusal::BadRequest("malformed chunked body".into()))
        }
        Some(BodyError::TooLarge) => Stop::Refused(Refusal::TooLarge),
        Some(BodyError::Closed) | None => {
            ex.abort();
            Stop::Answered(0, "client closed")
        }
    }
}

impl Service for App {
    fn handle(&self, ex: &mut Exchange<'_>) {
        let start = ex.started;
        let id = self
            .ids
            .for_request(ex.head.header("x-request-id"), ex.head.header_count("x-request-id"));
        ex.add_header("X-Request-Id", id.clone());
        let path = ex.head.target.path.clone();
        let route = routes::template(&path);

        if self.cors.is_configured()
            && let Some(status) = self.cors(ex)
        {
            self.metrics.request("", "", route, status, start.elapsed());
            return;
        }

        if let Some(public) = routes::public(&path) {
            let status = self.public(ex, public);
            // Probes and scrapes are not traffic (SPEC §10).
            if public == Public::Login {
                self.metrics.request("", "", route, status, start.elapsed());
            }
            return;
        }

        let (client_ip, forwarded_for) = self.client_addr(ex);
        if let Err(limited) = self.failures.check(client_ip, Instant::now()) {
            let status = self.too_many_failures(ex, client_ip, limited);
            self.metrics.request("", "", route, status, start.elapsed());
            return;
        }
        let remote = client_ip.to_string();
        let method = ex.head.method.clone();
        let identity = match self.auth.authenticate(&ex.head, client_ip) {
            Ok(identity) => identity,
            Err(failure) => {
                // Presented credentials that were refused count (SPEC §5).
                if failure != Failure::Missing {
                    self.failures.record(client_ip, Instant::now());
                }
                log::warn!(
                    request_id = id.as_str(), method = method.as_str(), path = path.as_str(),
                    remote = remote.as_str(), status = 401u16, reason = "unauthorized",
                    detail = failure.as_str();
                    "unauthorized request"
                );
                self.metrics.rejected("", "unauthorized");
                unauthorized(ex);
                self.metrics.request("", "", route, 401, start.elapsed());
                return;
            }
        };
        let client = identity.name.as_str();
        let subject = subject_field(&identity);
        let _in_flight = self.metrics.in_flight();
        logging::emit(
            Level::Info,
            "request",
            &[
                ("request_id", Value::from(id.as_str())),
                (subject, Value::from(client)),
                ("method", Value::from(method.as_str())),
                ("path", Value::from(path.as_str())),
                ("remote", Value::from(remote.as_str())),
            ],
        );

        let class = routes::classify(&method, &path);
        let (outcome, model, prompt_sha256) = match self
            .admit(ex, &identity, &class, &id, client_ip)
        {
            Ok(plan) => {
                let policy = identity.grant.clone();
                let model = plan.model.as_deref().unwrap_or("");
                // Charged after the response but before its end reaches the
                // client; a running stream is never cut (SPEC §9).
                let settle = |charge: Charge| {
                    let usage = charge.usage;
                    let total = usage.prompt.saturating_add(usage.completion);
                    self.ledger.charge(&identity.key, total, unix_now());
                    self.metrics.tokens(client, model, usage.prompt, usage.completion);
                };
                let filter =
                    plan.listing.map(|kind| move |body: &[u8]| policy.filter_listing(kind, body));
                let respond = match &filter {
                    Some(f) => Respond::Rewrite(f as &dyn Fn(&[u8]) -> Option<Vec<u8>>),
                    None => Respond::Stream(plan.tap.map(|(format, hide)| Metered {
                        tap: Box::new(Tap::new(format, hide)),
                        prompt_bytes: plan.prompt_bytes,
                        settle: &settle,
                    })),
                };
                let outcome = self.proxy.forward(
                    ex,
                    &Forwarding {
                        request_id: &id,
                        forwarded_for: &forwarded_for,
                        proto: self.forwarded_proto(ex),
                    },
                    plan.upload,
                    respond,
                );
                // A streamed upload cut at max_request_bytes (SPEC §7.3).
                if outcome.error == Some("request too large") {
                    self.metrics.rejected(client, "too_large");
                }
                (outcome, plan.model, plan.prompt_sha256)
            }
            Err(Stop::Refused(refusal)) => {
                let status = refusal.status();
                let mut fields: Vec<(&str, Value)> = vec![
                    ("request_id", Value::from(id.as_str())),
                    (subject, Value::from(client)),
                    ("method", Value::from(method.as_str())),
                    ("path", Value::from(path.as_str())),
                    ("remote", Value::from(remote.as_str())),
                    ("status", Value::from(status)),
                    ("reason", Value::from(refusal.reason())),
                ];
                match &refusal {
                    // The pattern is logged, never the prompt (SPEC §7.4).
                    Refusal::PromptRejected { pattern } => {
                        fields.push(("pattern", Value::from(pattern.as_str())))
                    }
                    Refusal::BadRequest(detail) => {
                        fields.push(("detail", Value::from(detail.as_str())))
                    }
                    _ => {}
                }
                logging::emit(Level::Warn, "request rejected", &fields);
                self.metrics.rejected(client, refusal.reason());
                let body = refusal.body();
                let retry;
                let mut headers: Vec<(&str, &[u8])> = vec![("Content-Type", b"application/json")];
                if let Refusal::RateLimited { retry_after_secs }
                | Refusal::BudgetExceeded { retry_after_secs } = refusal
                {
                    retry = retry_after_secs.to_string();
                    headers.push(("Retry-After", retry.as_bytes()));
                }
                let _ = ex.respond(status, &headers, body.as_bytes());
                (Outcome::new(status, None), None, None)
            }
            Err(Stop::Answered(status, error)) => (Outcome::new(status, Some(error)), None, None),
        };

        let duration = start.elapsed();
        let ttfb_ms = ex.first_byte.map_or(0, |t| t.duration_since(start).as_millis() as u64);
        let mut fields: Vec<(&str, Value)> =
            vec![("request_id", Value::from(id.as_str())), (subject, Value::from(client))];
        if let Some(m) = &model {
            fields.push(("model", Value::from(m.as_str())));
        }
        fields.extend([
            ("method", Value::from(method.as_str())),
            ("path", Value::from(path.as_str())),
            ("remote", Value::from(remote.as_str())),
            ("status", Value::from(outcome.status)),
            ("duration_ms", Value::from(duration.as_millis() as u64)),
            ("ttfb_ms", Value::from(ttfb_ms)),
            ("bytes", Value::from(ex.bytes_sent)),
        ]);
        if let Some(charge) = outcome.usage {
            fields.push(("prompt_tokens", Value::from(charge.usage.prompt)));
            fields.push(("completion_tokens", Value::from(charge.usage.completion)));
            if charge.estimated {
                fields.push(("usage_estimated", Value::from(true)));
            }
        }
        if let Some(digest) = &prompt_sha256 {
            fields.push(("prompt_sha256", Value::from(digest.as_str())));
        }
        if let Some(error) = outcome.error {
            fields.push(("error", Value::from(error)));
        }
        logging::emit(Level::Info, "response", &fields);
        let model_label = model.as_deref().unwrap_or("");
        self.metrics.request(client, model_label, route, outcome.status, duration);
        if let Some(t) = outcome.upstream_first_byte {
            self.metrics.upstream_first_byte(t);
        }
    }

    fn refused(&self, peer: SocketAddr, status: u16, reason: &str) {
        log::warn!(remote = peer.ip().to_string().as_str(), status = status, reason = reason; "request refused");
        match status {
            400 => self.metrics.rejected("", "bad_request"),
            413 | 431 => self.metrics.rejected("", "too_large"),
            _ => {}
        }
    }

    fn connection_limit(&self, ip: IpAddr) -> Option<usize> {
        // A trusted proxy (Caddy in front) carries every client's connections.
        (!addr::any_contains(&self.trusted_proxies, ip)).then_some(self.max_connections_per_ip)
    }

    fn too_many_connections(&self, peer: SocketAddr) {
        log::warn!(remote = peer.ip().to_string().as_str(), reason = "too_many_connections";
            "connection refused");
        self.metrics.rejected("", "too_many_connections");
    }

    /// A login body is read before anyone is authenticated, so the intake
    /// receives it whole before a worker is involved (SPEC §5, §11).
    fn collect_body(&self, head: &Head) -> Option<u64> {
        let login = head.method == "POST"
            && routes::public(&head.target.path) == Some(Public::Login)
            && self.auth.has_users();
        login.then_some(MAX_LOGIN_BODY as u64)
    }
}

/// Request ids: the client's own if it is 1–128 of `[A-Za-z0-9._-]`, else a
/// fresh 16-hex-digit one (a random seed mixed with a counter).
struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> std::io::Result<RequestIds> {
        let mut seed = [0u8; 8];
        crate::auth::keys::random_bytes(&mut seed)?;
        Ok(RequestIds { seed: u64::from_le_bytes(seed), counter: AtomicU64::new(0) })
    }

    fn for_request(&self, given: Option<&str>, count: usize) -> String {
        match given {
            Some(id) if count == 1 && valid_request_id(id) => id.to_owned(),
            _ => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                format!("{:016x}", splitmix64(self.seed.wrapping_add(n)))
            }
        }
    }
}

fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let ids = RequestIds { seed: 7, counter: AtomicU64::new(0) };
        assert_eq!(ids.for_request(Some("abc-1.2_3"), 1), "abc-1.2_3");
        let fresh = ids.for_request(Some("bad id"), 1);
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, ids.for_request(None, 0));
        assert_ne!(ids.for_request(Some("ok"), 2), "ok");
        assert!(!valid_request_id(&"a".repeat(129)));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a\r\nx"));
    }
}
