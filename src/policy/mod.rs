//! Policy: what a subject may do with which model (SPEC §4, §6, §7). Pure
//! decisions over values: an inspected request in, a verdict or a refusal
//! out. The same [`Policy`] type serves clients, users and role policies.

pub mod model;

use std::sync::Arc;

use regex::{RegexSet, RegexSetBuilder};

use crate::budget::TokenBudget;
use crate::inspect::{self, Json, Limit, Num, Request};
use crate::limits::Rate;
use crate::routes::Listing;
use model::{ModelAcl, ModelName};

/// Compiled-program ceiling per prompt pattern set: a hostile or careless
/// regex must not eat memory at startup.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The policy fields of SPEC §4 that butler enforces.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub models: ModelAcl,
    pub allow_manage: bool,
    /// May use cloud models (`:cloud`, `-cloud`), which run on ollama.com on
    /// the host owner's account (SPEC §7.2).
    pub allow_cloud: bool,
    /// May declare `web_search*` tools, which make Ollama search the web on
    /// the host owner's account (SPEC §6).
    pub allow_web_search: bool,
    /// May set runner options, which reload the model for everyone (SPEC §7.3).
    pub allow_runner_options: bool,
    pub rate_limit: Option<Rate>,
    /// Requests of this subject in flight at once.
    pub max_concurrent: Option<u64>,
    pub max_request_bytes: Option<u64>,
    pub max_ctx: Option<u64>,
    pub max_predict: Option<u64>,
    /// Ceiling on `keep_alive`, with its configured spelling for messages.
    pub max_keep_alive: Option<KeepAliveCap>,
    pub token_budget: TokenBudget,
    pub prompts: PromptFilter,
}

/// `max_keep_alive`: seconds, and the text the configuration used (`10m`),
/// which the error message repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepAliveCap {
    pub secs: f64,
    pub text: String,
}

/// `deny_prompt_patterns`, compiled into one set so each string is scanned
/// once whatever the number of patterns.
#[derive(Debug, Clone, Default)]
pub struct PromptFilter {
    set: Option<RegexSet>,
    sources: Vec<String>,
}

impl PromptFilter {
    /// Compiles the patterns (Rust `regex` syntax, size-limited). The error
    /// names the first pattern that does not compile.
    pub fn new(patterns: Vec<String>) -> Result<PromptFilter, String> {
        if patterns.is_empty() {
            return Ok(PromptFilter::default());
        }
        for p in &patterns {
            RegexSetBuilder::new([p])
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("invalid pattern {p:?}: {}", first_line(&e.to_string())))?;
        }
        let set = RegexSetBuilder::new(&patterns)
            .size_limit(REGEX_SIZE_LIMIT * 4)
            .build()
            .map_err(|e| format!("patterns too large together: {}", first_line(&e.to_string())))?;
        Ok(PromptFilter { set: Some(set), sources: patterns })
    }

    /// Whether no pattern is configured (nothing is rejected).
    pub fn is_empty(&self) -> bool {
        self.set.is_none()
    }

    /// The first configured pattern that matches anything a prompt filter
    /// sees in `req` (SPEC §7.4, [`Request::scan`]).
    pub fn first_match(&self, req: &Request<'_>) -> Option<&str> {
        first_matches(&[self], req).pop().flatten()
    }
}

/// For each filter, the pattern [`PromptFilter::first_match`] reports, in one walk over the
/// body whatever the number of filters. The pattern reported is that of the first text
/// that matches in this order: the body's strings and keys in body order, then the joined
/// parts of messages, of Responses `input` items and of `system` ([`inspect::Origin`]); of several
/// patterns matching that text, the first configured. The walk stops once every filter has
/// matched in the body itself (nothing later can come first).
fn first_matches<'p>(filters: &[&'p PromptFilter], req: &Request<'_>) -> Vec<Option<&'p str>> {
    // Per filter: the index of the first match in the body, and in each kind of joined text.
    let mut found: Vec<[Option<usize>; 4]> = vec![[None; 4]; filters.len()];
    let all_in_body = |found: &[[Option<usize>; 4]]| {
        filters.iter().zip(found).all(|(f, found)| f.set.is_none() || found[0].is_some())
    };
    if !all_in_body(&found) {
        req.scan_from(|text, origin| {
            let slot = origin as usize;
            for (filter, found) in filters.iter().zip(found.iter_mut()) {
                let Some(set) = &filter.set else { continue };
                if found[0].is_some() || found[slot].is_some() {
                    continue;
                }
                if set.is_match(text) {
                    found[slot] = set.matches(text).iter().next();
                }
            }
            all_in_body(&found)
        });
    }
    filters
        .iter()
        .zip(found)
        .map(|(filter, found)| {
            let index = found.into_iter().flatten().next()?;
            filter.sources.get(index).map(String::as_str)
        })
        .collect()
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

/// Why a request is refused after authentication. Each maps to SPEC §7.5's
/// status and body and to a `butler_requests_rejected_total` reason.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A client connecting from outside its `allow_ips`.
    Forbidden,
    EndpointNotAllowed,
    RateLimited {
        retry_after_secs: u64,
    },
    /// Over the subject's `max_concurrent`.
    TooManyConcurrent,
    /// Over `global_max_concurrent` (inference in flight upstream).
    Busy,
    /// Over the subject's `max_request_bytes`.
    TooLarge,
    /// Over the 8 MiB inspection ceiling.
    BodyTooLarge,
    /// A `Content-Encoding` other than `gzip`, `zstd` or `identity` on an
    /// inspected route (SPEC §7.1).
    UnsupportedEncoding,
    BadRequest(String),
    ModelDenied,
    /// A cloud model without `allow_cloud` (SPEC §7.2).
    CloudDenied,
    /// A `web_search*` tool without `allow_web_search` (SPEC §6).
    WebSearchDenied,
    /// A runner option without `allow_runner_options` (SPEC §7.3); the
    /// option's name as Ollama reads it.
    RunnerOption(&'static str),
    CtxExceeded {
        asked: Num,
        limit: u64,
    },
    PredictExceeded {
        asked: Num,
        limit: u64,
    },
    KeepAliveExceeded {
        limit: String,
    },
    BudgetExceeded {
        retry_after_secs: u64,
    },
    PromptRejected {
        pattern: String,
    },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Forbidden
            | Refusal::EndpointNotAllowed
            | Refusal::ModelDenied
            | Refusal::CloudDenied
            | Refusal::WebSearchDenied
            | Refusal::PromptRejected { .. } => 403,
            Refusal::RateLimited { .. }
            | Refusal::TooManyConcurrent
            | Refusal::BudgetExceeded { .. } => 429,
            Refusal::Busy => 503,
            Refusal::TooLarge | Refusal::BodyTooLarge => 413,
            Refusal::UnsupportedEncoding => 415,
            Refusal::BadRequest(_)
            | Refusal::RunnerOption(_)
            | Refusal::CtxExceeded { .. }
            | Refusal::PredictExceeded { .. }
            | Refusal::KeepAliveExceeded { .. } => 400,
        }
    }

    /// The `error` text of the JSON body.
    pub fn message(&self) -> String {
        match self {
            Refusal::Forbidden => "forbidden".into(),
            Refusal::EndpointNotAllowed => "endpoint not allowed".into(),
            Refusal::RateLimited { .. } => "rate limit exceeded".into(),
            Refusal::TooManyConcurrent => "too many concurrent requests".into(),
            Refusal::BudgetExceeded { .. } => "token budget exceeded".into(),
            Refusal::Busy => "server busy".into(),
            Refusal::TooLarge => "request too large".into(),
            Refusal::BodyTooLarge => "request body too large".into(),
            Refusal::UnsupportedEncoding => "unsupported content encoding".into(),
            Refusal::BadRequest(reason) => format!("bad request: {reason}"),
            Refusal::ModelDenied => "model not allowed".into(),
            Refusal::CloudDenied => "cloud models not allowed".into(),
            Refusal::WebSearchDenied => "web search not allowed".into(),
            Refusal::RunnerOption(name) => format!("option {name} not allowed"),
            Refusal::CtxExceeded { asked, limit } => {
                format!("num_ctx {asked} exceeds limit of {limit}")
            }
            Refusal::PredictExceeded { asked, limit } => {
                format!("num_predict {asked} exceeds limit of {limit}")
            }
            Refusal::KeepAliveExceeded { limit } => format!("keep_alive exceeds limit of {limit}"),
            Refusal::PromptRejected { .. } => "prompt rejected".into(),
        }
    }

    /// The complete JSON body, newline-terminated like every butler error.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.message() }).to_string() + "\n"
    }

    /// The `reason` label of `butler_requests_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Forbidden => "forbidden",
            Refusal::EndpointNotAllowed | Refusal::WebSearchDenied => "endpoint_not_allowed",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::TooManyConcurrent | Refusal::Busy => "concurrency_limited",
            Refusal::BudgetExceeded { .. } => "budget_exceeded",
            Refusal::TooLarge | Refusal::BodyTooLarge => "too_large",
            Refusal::BadRequest(_) | Refusal::RunnerOption(_) | Refusal::UnsupportedEncoding => {
                "bad_request"
            }
            Refusal::ModelDenied | Refusal::CloudDenied => "model_denied",
            Refusal::CtxExceeded { .. } => "num_ctx_exceeded",
            Refusal::PredictExceeded { .. } => "num_predict_exceeded",
            Refusal::KeepAliveExceeded { .. } => "keep_alive_exceeded",
            Refusal::PromptRejected { .. } => "prompt_rejected",
        }
    }
}

/// An inspected request that may go ahead.
#[derive(Debug)]
pub struct Verdict {
    /// The models it names, normalised (the first is the one it runs).
    pub models: Vec<ModelName>,
    /// A generation cap to write into the body (`max_predict`, SPEC §7.3)
    /// with [`inspect::inject_predict`]; without one (and without other
    /// edits) the original bytes are forwarded untouched.
    pub inject_predict: Option<u64>,
}

/// The effective policy of an authenticated subject: one [`Policy`]
/// (clients, users) or those of every matching role (OIDC), merged "most
/// permissive" and order-independently (SPEC §5): the request is allowed if
/// some role allows its models and does not reject its prompt; numeric caps
/// take the largest value, with unset (unlimited) winning; the most
/// permissive rate limit wins. Duplicated roles change nothing.
#[derive(Debug, Clone)]
pub struct Grant {
    parts: Vec<Arc<Policy>>,
    pub allow_manage: bool,
    pub allow_cloud: bool,
    pub allow_web_search: bool,
    pub allow_runner_options: bool,
    pub rate_limit: Option<Rate>,
    pub max_concurrent: Option<u64>,
    pub max_request_bytes: Option<u64>,
    pub max_ctx: Option<u64>,
    pub max_predict: Option<u64>,
    pub max_keep_alive: Option<KeepAliveCap>,
    pub token_budget: TokenBudget,
}

/// The loosest of the parts' values of one cap, where unset (no cap) is the
/// loosest of all; `looser` orders two set values.
fn loosest<T: Clone>(
    parts: &[Arc<Policy>],
    get: impl Fn(&Policy) -> Option<T>,
    looser: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    let values: Option<Vec<T>> = parts.iter().map(|p| get(p)).collect();
    values?.into_iter().max_by(looser)
}

/// Requests per second a rate allows; `None` (no limit) is the most.
fn rate_per_sec(r: &Rate) -> f64 {
    f64::from(r.count) / r.window.as_secs_f64().max(f64::MIN_POSITIVE)
}

impl Grant {
    pub fn single(policy: Arc<Policy>) -> Grant {
        Grant::merge(vec![policy])
    }

    /// Merges the policies of several roles (at least one).
    pub fn merge(parts: Vec<Arc<Policy>>) -> Grant {
        let by_rate = |a: &Rate, b: &Rate| {
            rate_per_sec(a).total_cmp(&rate_per_sec(b)).then(a.count.cmp(&b.count))
        };
        let cap = |get: fn(&Policy) -> Option<u64>| loosest(&parts, get, u64::cmp);
        Grant {
            allow_manage: parts.iter().any(|p| p.allow_manage),
            allow_cloud: parts.iter().any(|p| p.allow_cloud),
            allow_web_search: parts.iter().any(|p| p.allow_web_search),
            allow_runner_options: parts.iter().any(|p| p.allow_runner_options),
            rate_limit: loosest(&parts, |p| p.rate_limit, by_rate),
            max_concurrent: cap(|p| p.max_concurrent),
            max_request_bytes: cap(|p| p.max_request_bytes),
            max_ctx: cap(|p| p.max_ctx),
            max_predict: cap(|p| p.max_predict),
            token_budget: TokenBudget {
                per_minute: cap(|p| p.token_budget.per_minute),
                per_day: cap(|p| p.token_budget.per_day),
                per_month: cap(|p| p.token_budget.per_month),
            },
            max_keep_alive: loosest(
                &parts,
                |p| p.max_keep_alive.clone(),
                |a, b| a.secs.total_cmp(&b.secs),
            ),
            parts,
        }
    }

    /// Whether the subject may use `model` (some role allows it).
    pub fn permits(&self, model: &ModelName) -> bool {
        self.parts.iter().any(|p| p.models.permits(model))
    }

    /// Whether every model is permitted, cloud models included (listings then pass
    /// untouched, SPEC §8).
    pub fn permits_all(&self) -> bool {
        self.allow_cloud && self.parts.iter().any(|p| p.models.permits_all())
    }

    /// Whether the subject may use `model`: a cloud model needs `allow_cloud`, then the lists.
    pub fn may_use(&self, model: &ModelName) -> bool {
        (self.allow_cloud || !model.is_cloud()) && self.permits(model)
    }

    /// The models a request names, in SPEC §7.5's order: every name must parse (400), then a
    /// cloud model — or a `remote` request, one that creates a model running elsewhere — needs
    /// `allow_cloud` whatever the lists say (403 `cloud models not allowed`), then the lists
    /// decide (403 `model not allowed`).
    pub fn admit_models(
        &self,
        raws: &[impl AsRef<str>],
        remote: bool,
    ) -> Result<Vec<ModelName>, Refusal> {
        let names = raws
            .iter()
            .map(|raw| ModelName::parse(raw.as_ref()).map_err(|e| Refusal::BadRequest(e.into())))
            .collect::<Result<Vec<_>, _>>()?;
        if !self.allow_cloud && (remote || names.iter().any(ModelName::is_cloud)) {
            return Err(Refusal::CloudDenied);
        }
        if !names.iter().all(|name| self.permits(name)) {
            return Err(Refusal::ModelDenied);
        }
        Ok(names)
    }

    /// Judges an inspected body in SPEC §7.5's order: model ACL; unload,
    /// `_debug_render_only` and web search (403); caps in §7.3's order (400);
    /// `context` and prompt patterns. Caps and patterns apply to inference
    /// routes; patterns also to `/api/create`, whose system prompt and
    /// template become prompts.
    pub fn judge(&self, req: &Request) -> Result<Verdict, Refusal> {
        let models = self.admit_models(&req.models, inspect::creates_remote(req))?;
        // Requests that act on the server for everyone, not on a prompt:
        // unloading a model others use, or revealing its hidden prompt.
        if (req.unload || req.debug_render_only) && !self.allow_manage {
            return Err(Refusal::EndpointNotAllowed);
        }
        if req.web_search && !self.allow_web_search {
            return Err(Refusal::WebSearchDenied);
        }
        let inference = req.kind.is_inference();
        let mut inject_predict = None;
        if inference {
            if let (Some(asked), Some(limit)) = (req.num_ctx, self.max_ctx)
                && asked.as_f64() > limit as f64
            {
                return Err(Refusal::CtxExceeded { asked, limit });
            }
            if let Some(limit) = self.max_predict {
                match req.predict {
                    Some(Limit::Unbounded(asked)) => {
                        return Err(Refusal::PredictExceeded { asked, limit });
                    }
                    Some(Limit::Value(asked)) if asked.as_f64() > limit as f64 => {
                        return Err(Refusal::PredictExceeded { asked, limit });
                    }
                    _ => {}
                }
                if !req.predict_effective {
                    // The client set no limit Ollama honours on this route:
                    // write one where Ollama reads it, the smallest of the cap
                    // and the limits it declared elsewhere (whole tokens, as
                    // Ollama truncates them).
                    inject_predict = Some(
                        req.predict_smallest
                            .map_or(limit, |n| (n.as_f64().trunc() as u64).min(limit)),
                    );
                }
            }
        }
        if req.kind == inspect::Kind::Create {
            // A created model's parameters become every later request's defaults: capped
            // like a request's options, nothing injected (SPEC §7.3).
            let (num_ctx, predict) = inspect::create_parameters(req);
            if let (Some(asked), Some(limit)) = (num_ctx, self.max_ctx)
                && asked.as_f64() > limit as f64
            {
                return Err(Refusal::CtxExceeded { asked, limit });
            }
            if let (Some(asked), Some(limit)) = (predict, self.max_predict) {
                match asked {
                    Limit::Unbounded(asked) => {
                        return Err(Refusal::PredictExceeded { asked, limit });
                    }
                    Limit::Value(asked) if asked.as_f64() > limit as f64 => {
                        return Err(Refusal::PredictExceeded { asked, limit });
                    }
                    Limit::Value(_) => {}
                }
            }
        }
        if let (Some(asked), Some(cap)) = (req.keep_alive, &self.max_keep_alive) {
            // Negative means "keep loaded forever": always over a ceiling.
            if asked < 0.0 || asked > cap.secs {
                return Err(Refusal::KeepAliveExceeded { limit: cap.text.clone() });
            }
        }
        if inference
            && let Some(name) = req.runner_option
            && !self.allow_runner_options
        {
            return Err(Refusal::RunnerOption(name));
        }
        if inference || req.kind == inspect::Kind::Create {
            // Roles that allow every model named judge the prompt; if the
            // models are allowed only across roles, every role does.
            let allowing: Vec<&Arc<Policy>> =
                self.parts.iter().filter(|p| models.iter().all(|m| p.models.permits(m))).collect();
            let judges: Vec<&Arc<Policy>> =
                if allowing.is_empty() { self.parts.iter().collect() } else { allowing };
            // `context` is prompt as token ids, which no pattern can read: a
            // request carrying it passes only a judge without patterns.
            if req.context && judges.iter().all(|p| !p.prompts.is_empty()) {
                return Err(Refusal::BadRequest(
                    "context is not allowed with prompt filters".into(),
                ));
            }
            // The request passes if one judge accepts it; a judge without patterns accepts
            // everything. All of them are asked in one walk over the body; the first
            // judge's pattern is the one reported.
            if judges.iter().all(|p| !p.prompts.is_empty()) {
                let filters: Vec<&PromptFilter> = judges.iter().map(|p| &p.prompts).collect();
                let matches = first_matches(&filters, req);
                if let Some(patterns) = matches.into_iter().collect::<Option<Vec<&str>>>()
                    && let Some(pattern) = patterns.first()
                {
                    return Err(Refusal::PromptRejected { pattern: (*pattern).to_owned() });
                }
            }
        }
        Ok(Verdict { models, inject_predict })
    }

    /// Filters a listing body to the models the subject may use. `None` when
    /// the upstream's body is not the JSON listing it should be.
    pub fn filter_listing(&self, kind: Listing, body: &[u8]) -> Option<Vec<u8>> {
        let Json::Object(mut entries) = inspect::parse_object(body).ok()? else { return None };
        let (list_key, name_keys): (&str, &[&str]) = match kind {
            Listing::Ollama => ("models", &["name", "model"]),
            Listing::OpenAi => ("data", &["id"]),
        };
        for (key, value) in entries.iter_mut() {
            if key != list_key {
                continue;
            }
            match value {
                Json::Array(items) => items.retain(|item| {
                    // Every name an entry carries must be permitted; an entry
                    // without a readable name is dropped.
                    let names: Vec<&str> =
                        name_keys.iter().filter_map(|k| item.exact(k)?.as_str()).collect();
                    // A local name for a model that runs elsewhere is a cloud model too.
                    let remote =
                        ["remote_host", "remote_model"].iter().any(|k| item.field(k).is_some());
                    !names.is_empty()
                        && (self.allow_cloud || !remote)
                        && names.iter().all(|n| ModelName::parse(n).is_ok_and(|m| self.may_use(&m)))
                }),
                Json::Null => {}
                _ => return None,
            }
        }
        Some(Json::Object(entries).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{Kind, inspect};
    use model::Pattern;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        let p = |list: &[&str]| list.iter().map(|s| Pattern::parse(s).unwrap()).collect();
        Policy { models: ModelAcl::new(p(allow), p(deny)), ..Policy::default() }
    }

    fn judge(p: &Policy, kind: Kind, body: &str) -> Result<Verdict, Refusal> {
        Grant::single(Arc::new(p.clone())).judge(&inspect(kind, body.as_bytes()).unwrap())
    }

    #[test]
    fn every_named_model_is_checked() {
        let p = policy(&["llama3.2", "ok"], &["llama3.3"]);
        let generate = Kind::OllamaGenerate;
        assert!(judge(&p, generate, r#"{"model":"llama3.2:1b"}"#).is_ok());
        for body in [
            r#"{"model":"library/llama3.3"}"#,
            r#"{"model":"registry.ollama.ai/library/llama3.3:70b"}"#,
            r#"{"model":"LLAMA3.3:70B"}"#,
            r#"{"model":"qwen"}"#,
        ] {
            assert_eq!(judge(&p, generate, body).unwrap_err(), Refusal::ModelDenied, "{body}");
        }
        assert_eq!(
            judge(&p, Kind::Copy, r#"{"source":"llama3.3","destination":"ok"}"#).unwrap_err(),
            Refusal::ModelDenied
        );
        assert_eq!(
            judge(&p, Kind::Create, r#"{"model":"ok","from":"llama3.3"}"#).unwrap_err(),
            Refusal::ModelDenied
        );
        assert!(matches!(
            judge(&p, generate, r#"{"model":"a b"}"#).unwrap_err(),
            Refusal::BadRequest(_)
        ));
    }

    #[test]
    fn caps_and_injection() {
        let p = Policy { max_ctx: Some(4096), max_predict: Some(512), ..policy(&["*"], &[]) };
        let generate = Kind::OllamaGenerate;
        let e = judge(&p, generate, r#"{"model":"m","num_ctx":1,"options":{"num_ctx":8192}}"#);
        assert_eq!(e.unwrap_err().message(), "num_ctx 8192 exceeds limit of 4096");
        let e = judge(&p, Kind::OpenAiGenerate, r#"{"model":"m","max_tokens":1024}"#);
        assert_eq!(e.unwrap_err().message(), "num_predict 1024 exceeds limit of 512");
        let e = judge(&p, generate, r#"{"model":"m","options":{"num_predict":-1}}"#).unwrap_err();
        assert_eq!(e.message(), "num_predict -1 exceeds limit of 512");
        assert_eq!(e.reason(), "num_predict_exceeded");
        let v = judge(&p, generate, r#"{"model":"m","options":{"num_predict":100}}"#).unwrap();
        assert_eq!(
            v.inject_predict, None,
            "an effective limit under the cap forwards the original"
        );
        let v = judge(&p, generate, r#"{"model":"m"}"#).unwrap();
        assert_eq!(v.inject_predict, Some(512));
        // A whole-number limit the route ignores is moved where Ollama reads it.
        let v = judge(&p, generate, r#"{"model":"m","max_tokens":100}"#).unwrap();
        assert_eq!(v.inject_predict, Some(100));
        let v = judge(&p, Kind::OpenAiEmbed, r#"{"model":"m","input":"x"}"#).unwrap();
        assert_eq!(v.inject_predict, None);
    }

    #[test]
    fn injection_takes_the_smallest_declared_limit() {
        let p = Policy { max_predict: Some(64), ..policy(&["*"], &[]) };
        let chat = Kind::OpenAiGenerate;
        let v = judge(&p, chat, r#"{"model":"m","max_completion_tokens":30,"num_predict":20}"#);
        assert_eq!(v.unwrap().inject_predict, Some(20));
        let v = judge(&p, chat, r#"{"model":"m","max_completion_tokens":10}"#).unwrap();
        assert_eq!(v.inject_predict, Some(10));
        let v = judge(&p, chat, r#"{"model":"m","max_completion_tokens":10.9}"#).unwrap();
        assert_eq!(v.inject_predict, Some(10), "Ollama truncates");
        let v = judge(&p, Kind::Responses, r#"{"model":"m","max_tokens":64,"num_predict":1}"#);
        assert_eq!(v.unwrap().inject_predict, Some(1));
        let v = judge(&p, chat, r#"{"model":"m","max_tokens":50,"num_predict":20}"#).unwrap();
        assert_eq!(v.inject_predict, None, "the honoured field is set: nothing is added");
        let e = judge(&p, chat, r#"{"model":"m","max_completion_tokens":65,"num_predict":20}"#);
        assert_eq!(e.unwrap_err().message(), "num_predict 65 exceeds limit of 64");
        let open = policy(&["*"], &[]);
        let v = judge(&open, chat, r#"{"model":"m","max_completion_tokens":30}"#).unwrap();
        assert_eq!(v.inject_predict, None, "without max_predict nothing is injected");
    }

    #[test]
    fn server_side_effects_need_rights() {
        let p = policy(&["*"], &[]);
        let unload = r#"{"model":"m","keep_alive":"0s"}"#;
        let debug = r#"{"model":"m","messages":[],"_debug_render_only":true}"#;
        for (kind, body) in [(Kind::OllamaChat, unload), (Kind::OllamaChat, debug)] {
            let e = judge(&p, kind, body).unwrap_err();
            assert_eq!(e, Refusal::EndpointNotAllowed, "{body}");
            assert_eq!(e.body(), "{\"error\":\"endpoint not allowed\"}\n");
        }
        let manager = Policy { allow_manage: true, ..p.clone() };
        assert!(judge(&manager, Kind::OllamaChat, unload).is_ok());
        assert!(judge(&manager, Kind::OllamaChat, debug).is_ok());

        let search =
            r#"{"model":"m","tools":[{"type":"web_search_20250305","name":"web_search"}]}"#;
        let e = judge(&p, Kind::Messages, search).unwrap_err();
        assert_eq!((e.status(), e.message()), (403, "web search not allowed".to_owned()));
        let searcher = Policy { allow_web_search: true, ..p.clone() };
        assert!(judge(&searcher, Kind::Messages, search).is_ok());

        let gpu = r#"{"model":"m","options":{"num_gpu":0}}"#;
        let e = judge(&p, Kind::OllamaEmbed, gpu).unwrap_err();
        assert_eq!((e.status(), e.message()), (400, "option num_gpu not allowed".to_owned()));
        let e = judge(&p, Kind::OllamaChat, r#"{"model":"m","shift":true}"#).unwrap_err();
        assert_eq!(e.message(), "option shift not allowed");
        let tuner = Policy { allow_runner_options: true, ..p.clone() };
        assert!(judge(&tuner, Kind::OllamaEmbed, gpu).is_ok());
    }

    #[test]
    fn refusals_come_in_spec_order() {
        let p = Policy {
            max_ctx: Some(10),
            prompts: PromptFilter::new(vec!["bad".into()]).unwrap(),
            ..policy(&["ok"], &[])
        };
        let g = Kind::OllamaGenerate;
        let all = r#""keep_alive":0,"_debug_render_only":true,"options":{"num_ctx":99,"num_gpu":1},"context":[1],"system":"bad""#;
        let e = judge(&p, g, &format!(r#"{{"model":"no",{all}}}"#)).unwrap_err();
        assert_eq!(e, Refusal::ModelDenied);
        let e = judge(&p, g, &format!(r#"{{"model":"ok",{all}}}"#)).unwrap_err();
        assert_eq!(e, Refusal::EndpointNotAllowed);
        let p = Policy { allow_manage: true, ..p };
        let e = judge(&p, g, &format!(r#"{{"model":"ok",{all}}}"#)).unwrap_err();
        assert_eq!(e.message(), "num_ctx 99 exceeds limit of 10");
        let rest = r#""options":{"num_gpu":1},"context":[1],"system":"bad""#;
        let e = judge(&p, g, &format!(r#"{{"model":"ok",{rest}}}"#)).unwrap_err();
        assert_eq!(e, Refusal::RunnerOption("num_gpu"));
        let p = Policy { allow_runner_options: true, ..p };
        let e = judge(&p, g, &format!(r#"{{"model":"ok",{rest}}}"#)).unwrap_err();
        assert_eq!(e.message(), "bad request: context is not allowed with prompt filters");
        let e = judge(&p, g, r#"{"model":"ok","context":[],"system":"bad"}"#).unwrap_err();
        assert_eq!(e.message(), "prompt rejected");
        let open = policy(&["ok"], &[]);
        assert!(judge(&open, g, r#"{"model":"ok","context":[1,2]}"#).is_ok());
    }

    #[test]
    fn context_passes_a_role_without_patterns() {
        let strict = role(&["m"], |p| p.prompts = PromptFilter::new(vec!["x".into()]).unwrap());
        let lax = role(&["m"], |_| {});
        let req = inspect(Kind::OllamaGenerate, br#"{"model":"m","context":[1]}"#).unwrap();
        assert!(Grant::merge(vec![strict.clone(), lax]).judge(&req).is_ok());
        let e = Grant::merge(vec![strict]).judge(&req).unwrap_err();
        assert_eq!(e.reason(), "bad_request");
    }

    #[test]
    fn keep_alive_cap() {
        let cap = KeepAliveCap { secs: 600.0, text: "10m".into() };
        let p = Policy { max_keep_alive: Some(cap), ..policy(&["*"], &[]) };
        let generate = Kind::OllamaGenerate;
        assert!(judge(&p, generate, r#"{"model":"m","keep_alive":"10m"}"#).is_ok());
        assert!(judge(&p, generate, r#"{"model":"m","keep_alive":0,"prompt":"hi"}"#).is_ok());
        for body in [
            r#"{"model":"m","keep_alive":"1h"}"#,
            r#"{"model":"m","keep_alive":601}"#,
            r#"{"model":"m","keep_alive":-1}"#,
        ] {
            let e = judge(&p, generate, body).unwrap_err();
            assert_eq!(e.message(), "keep_alive exceeds limit of 10m", "{body}");
            assert_eq!(e.reason(), "keep_alive_exceeded");
        }
    }

    #[test]
    fn prompt_patterns() {
        let p = Policy {
            prompts: PromptFilter::new(vec!["(?i)secret plan".into(), "x{2}".into()]).unwrap(),
            ..policy(&["*"], &[])
        };
        let e = judge(
            &p,
            Kind::OpenAiGenerate,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"The SECRET plan"}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e, Refusal::PromptRejected { pattern: "(?i)secret plan".into() });
        assert_eq!(e.body(), "{\"error\":\"prompt rejected\"}\n");
        assert!(judge(&p, Kind::OllamaGenerate, r#"{"model":"xx","prompt":"hi"}"#).is_ok());
        assert!(judge(&p, Kind::ModelOnly, r#"{"model":"m","insecure":"xx"}"#).is_ok());
        assert!(PromptFilter::new(vec!["(".into()]).is_err());
        assert!(PromptFilter::new(vec!["a{100000}".into()]).is_err());
    }

    #[test]
    fn listings_are_filtered() {
        let p = Grant::single(Arc::new(policy(&["llama3.2"], &[])));
        let tags = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},{"name":"qwen:7b","model":"qwen:7b"},{"size":3}]}"#;
        let out = p.filter_listing(Listing::Ollama, tags).unwrap();
        assert_eq!(
            out,
            br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1}]}"#
        );
        let v1 =
            br#"{"object":"list","data":[{"id":"qwen:7b"},{"id":"llama3.2:1b","object":"model"}]}"#;
        let out = p.filter_listing(Listing::OpenAi, v1).unwrap();
        assert_eq!(out, br#"{"object":"list","data":[{"id":"llama3.2:1b","object":"model"}]}"#);
        assert!(p.filter_listing(Listing::Ollama, b"not json").is_none());
        assert!(p.filter_listing(Listing::Ollama, br#"{"models":{}}"#).is_none());
    }

    fn role(allow: &[&str], f: impl FnOnce(&mut Policy)) -> Arc<Policy> {
        let mut p = policy(allow, &[]);
        f(&mut p);
        Arc::new(p)
    }

    #[test]
    fn roles_merge_most_permissive_and_order_independent() {
        let rate = |s: &str| crate::limits::Rate::parse(s).unwrap();
        let viewer = role(&["llama3.2"], |p| {
            p.max_ctx = Some(2048);
            p.rate_limit = rate("10/min");
        });
        let operator = role(&["qwen*"], |p| {
            p.max_ctx = Some(8192);
            p.max_predict = Some(100);
            p.rate_limit = rate("1/s");
            p.allow_manage = true;
        });
        let unlimited = role(&[], |_| {});
        for parts in
            [vec![viewer.clone(), operator.clone()], vec![operator.clone(), viewer.clone()]]
        {
            let g = Grant::merge(parts);
            assert!(g.permits(&ModelName::parse("llama3.2").unwrap()));
            assert!(g.permits(&ModelName::parse("qwen2.5:7b").unwrap()));
            assert!(!g.permits(&ModelName::parse("mistral").unwrap()));
            assert_eq!(g.max_ctx, Some(8192));
            assert_eq!(g.max_predict, None, "unset on one role is unlimited, and wins");
            assert_eq!(g.rate_limit, rate("1/s"));
            assert!(g.allow_manage);
        }
        let g = Grant::merge(vec![viewer.clone(), unlimited.clone()]);
        assert_eq!((g.max_ctx, g.rate_limit), (None, None));
        let same = Grant::merge(vec![viewer.clone(), viewer.clone()]);
        assert_eq!(same.max_ctx, Some(2048));
    }

    #[test]
    fn a_prompt_passes_if_some_role_allowing_the_model_accepts_it() {
        let strict = role(&["m"], |p| p.prompts = PromptFilter::new(vec!["bad".into()]).unwrap());
        let lax = role(&["m"], |_| {});
        let other = role(&["x"], |_| {});
        let body = br#"{"model":"m","prompt":"bad idea"}"#;
        let req = inspect(Kind::OllamaGenerate, body).unwrap();
        assert!(Grant::merge(vec![strict.clone(), lax]).judge(&req).is_ok());
        let e = Grant::merge(vec![strict.clone(), other.clone()]).judge(&req).unwrap_err();
        assert_eq!(e, Refusal::PromptRejected { pattern: "bad".into() });
        let e = Grant::merge(vec![other]).judge(&req).unwrap_err();
        assert_eq!(e, Refusal::ModelDenied);
    }

    #[test]
    fn cloud_models_need_allow_cloud_before_the_lists() {
        let open = policy(&["*"], &[]);
        let cloudy = Policy { allow_cloud: true, ..policy(&["*"], &["llama3.3"]) };
        let generate = Kind::OllamaGenerate;
        for body in [
            r#"{"model":"gpt-oss:20b-cloud"}"#,
            r#"{"model":"gpt-oss:20b:cloud"}"#,
            r#"{"model":" X:CLOUD "}"#,
        ] {
            let e = judge(&open, generate, body).unwrap_err();
            assert_eq!(
                (e.status(), e.message()),
                (403, "cloud models not allowed".into()),
                "{body}"
            );
            assert_eq!(e.reason(), "model_denied");
            assert!(judge(&cloudy, generate, body).is_ok(), "{body}");
        }
        // With allow_cloud the lists decide, on the name without its suffix.
        assert_eq!(
            judge(&cloudy, generate, r#"{"model":"llama3.3:70b-cloud"}"#).unwrap_err(),
            Refusal::ModelDenied
        );
        // Order: a bad name (400) before cloud (403) before the lists (403).
        let strict = policy(&["llama3.2"], &[]);
        let e = judge(&strict, Kind::Copy, r#"{"source":"x:cloud","destination":"a b"}"#);
        assert!(matches!(e.unwrap_err(), Refusal::BadRequest(_)));
        let e = judge(&strict, Kind::Copy, r#"{"source":"qwen","destination":"x:cloud"}"#);
        assert_eq!(e.unwrap_err(), Refusal::CloudDenied);
        // Every model a management body names, and a model created to run elsewhere.
        for body in [
            r#"{"model":"mine","from":"gpt-oss:20b-cloud"}"#,
            r#"{"model":"mine:cloud","from":"llama3.2"}"#,
            r#"{"model":"mine","from":"llama3.2","remote_host":"https://ollama.com"}"#,
        ] {
            assert_eq!(
                judge(&open, Kind::Create, body).unwrap_err(),
                Refusal::CloudDenied,
                "{body}"
            );
            assert!(judge(&cloudy, Kind::Create, body).is_ok(), "{body}");
        }
        assert!(judge(&open, Kind::Create, r#"{"model":"m","from":"x","remote_host":""}"#).is_ok());
        let g = Grant::single(Arc::new(open.clone()));
        assert!(!g.permits_all(), "a listing must still hide cloud models");
        assert!(Grant::single(Arc::new(Policy { allow_cloud: true, ..open })).permits_all());
    }

    #[test]
    fn create_parameters_are_capped() {
        let p = Policy { max_ctx: Some(4096), max_predict: Some(512), ..policy(&["*"], &[]) };
        let create = |params: &str| {
            let body = format!(r#"{{"model":"m","from":"llama3.2","parameters":{params}}}"#);
            judge(&p, Kind::Create, &body).map(|v| v.inject_predict)
        };
        assert_eq!(
            create(r#"{"num_ctx":131072}"#).unwrap_err().message(),
            "num_ctx 131072 exceeds limit of 4096"
        );
        assert_eq!(
            create(r#"{"num_predict":1000,"temperature":0.1}"#).unwrap_err().message(),
            "num_predict 1000 exceeds limit of 512"
        );
        assert_eq!(
            create(r#"{"num_predict":-1}"#).unwrap_err().message(),
            "num_predict -1 exceeds limit of 512"
        );
        assert_eq!(create(r#"{"num_ctx":4096,"num_predict":512}"#), Ok(None), "nothing injected");
        assert_eq!(create("null"), Ok(None));
        // Without caps anything goes.
        let free = policy(&["*"], &[]);
        let body = r#"{"model":"m","parameters":{"num_ctx":131072,"num_predict":-1}}"#;
        assert!(judge(&free, Kind::Create, body).is_ok());
    }

    #[test]
    fn listings_hide_cloud_models_without_allow_cloud() {
        let tags = br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"},{"name":"gpt-oss:20b-cloud","model":"gpt-oss:20b-cloud"},{"name":"mine:latest","model":"mine:latest","remote_host":"https://ollama.com:443","remote_model":"gpt-oss:20b"},{"name":"other:latest","model":"other:latest","remote_model":"x"}]}"#;
        let open = Grant::single(Arc::new(policy(&["*"], &[])));
        let out = open.filter_listing(Listing::Ollama, tags).unwrap();
        assert_eq!(out, br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}]}"#);
        let cloudy =
            Grant::single(Arc::new(Policy { allow_cloud: true, ..policy(&["*"], &["gpt-oss"]) }));
        let out = cloudy.filter_listing(Listing::Ollama, tags).unwrap();
        assert_eq!(
            out,
            br#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"},{"name":"mine:latest","model":"mine:latest","remote_host":"https://ollama.com:443","remote_model":"gpt-oss:20b"},{"name":"other:latest","model":"other:latest","remote_model":"x"}]}"#
        );
        let v1 =
            br#"{"object":"list","data":[{"id":"gpt-oss:20b-cloud"},{"id":"llama3.2:latest"}]}"#;
        let out = open.filter_listing(Listing::OpenAi, v1).unwrap();
        assert_eq!(out, br#"{"object":"list","data":[{"id":"llama3.2:latest"}]}"#);
    }
}
