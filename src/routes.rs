//! The route table (SPEC §6): which template a decoded path belongs to. The
//! template is what metrics use as the `path` label, so label sets stay
//! bounded whatever paths clients send.

use crate::inspect::Kind;

/// Routes answered by butler itself without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Public {
    Healthz,
    Readyz,
    Metrics,
    /// `POST /auth/login`: a password for a standalone JWT.
    Login,
}

pub fn public(path: &str) -> Option<Public> {
    match path {
        "/healthz" => Some(Public::Healthz),
        "/readyz" => Some(Public::Readyz),
        "/metrics" => Some(Public::Metrics),
        "/auth/login" => Some(Public::Login),
        _ => None,
    }
}

const FIXED: &[&str] = &[
    "/",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/api/tags",
    "/api/ps",
    "/api/version",
    "/api/status",
    "/api/pull",
    "/api/push",
    "/api/delete",
    "/api/create",
    "/api/copy",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
    "/auth/login",
    "/butler/usage",
];

/// The route template of a decoded path, or `other`.
pub fn template(path: &str) -> &'static str {
    if let Some(t) = FIXED.iter().find(|t| **t == path) {
        return t;
    }
    if one_segment_after(path, "/v1/models/") {
        return "/v1/models/{model}";
    }
    if one_segment_after(path, "/api/blobs/") {
        return "/api/blobs/{digest}";
    }
    "other"
}

fn one_segment_after(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// What a route is, for policy (SPEC §6). Public routes are matched first
/// by [`public`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Body inspected: model ACL, caps, prompt patterns.
    Inference(Kind),
    /// `/api/show` (body names the model).
    ModelInfo,
    /// `GET /v1/models/{model}`: the model is in the path (percent-decoded).
    ModelInfoPath(String),
    /// Responses filtered to the models the subject may use.
    Listing(Listing),
    /// `GET`/`HEAD` `/` and `/api/version`, `GET /api/status`:
    /// authentication is enough.
    Info,
    /// `GET /butler/usage`: the caller's own usage and limits (SPEC §9);
    /// answered by butler, never forwarded.
    Usage,
    /// Needs `allow_manage`; `Some` when the body names models.
    Management(Option<Kind>),
    /// Anything else: `allow_manage` required.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `/api/tags` and `/api/ps`: `{"models":[{"name":…,"model":…}]}`.
    Ollama,
    /// `/v1/models`: `{"data":[{"id":…}]}`.
    OpenAi,
}

impl Class {
    /// Whether the request body is parsed (and the 8 MiB ceiling applies).
    pub fn inspected(&self) -> Option<Kind> {
        match self {
            Class::Inference(k) | Class::Management(Some(k)) => Some(*k),
            Class::ModelInfo => Some(Kind::ModelOnly),
            _ => None,
        }
    }

    pub fn needs_manage(&self) -> bool {
        matches!(self, Class::Management(_) | Class::Other)
    }
}

/// Classifies a decoded, dot-segment-free path. Body-carrying routes are
/// classified by path whatever the method, so a body is never forwarded
/// uninspected on them; listings and info only for `GET`/`HEAD`.
pub fn classify(method: &str, path: &str) -> Class {
    let read = method == "GET" || method == "HEAD";
    match path {
        "/api/chat" => Class::Inference(Kind::OllamaChat),
        "/api/generate" => Class::Inference(Kind::OllamaGenerate),
        "/api/embed" | "/api/embeddings" => Class::Inference(Kind::OllamaEmbed),
        "/v1/chat/completions" | "/v1/completions" => Class::Inference(Kind::OpenAiGenerate),
        "/v1/embeddings" => Class::Inference(Kind::OpenAiEmbed),
        "/v1/responses" => Class::Inference(Kind::Responses),
        "/v1/messages" => Class::Inference(Kind::Messages),
        "/api/show" => Class::ModelInfo,
        "/api/pull" | "/api/push" | "/api/delete" => Class::Management(Some(Kind::ModelOnly)),
        "/api/copy" => Class::Management(Some(Kind::Copy)),
        "/api/create" => Class::Management(Some(Kind::Create)),
        "/api/tags" | "/api/ps" if read => Class::Listing(Listing::Ollama),
        "/v1/models" if read => Class::Listing(Listing::OpenAi),
        "/" | "/api/version" if read => Class::Info,
        // Ollama serves only GET here (HEAD is its 405), and answers whether
        // cloud models are disabled: nothing a subject may not know.
        "/api/status" if method == "GET" => Class::Info,
        "/butler/usage" => Class::Usage,
        _ if one_segment_after(path, "/api/blobs/") => Class::Management(None),
        _ if read && one_segment_after(path, "/v1/models/") => {
            Class::ModelInfoPath(path["/v1/models/".len()..].to_owned())
        }
        _ => Class::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert_eq!(template("/api/chat"), "/api/chat");
        assert_eq!(template("/v1/models/llama3.2:latest"), "/v1/models/{model}");
        assert_eq!(template("/api/blobs/sha256:abc"), "/api/blobs/{digest}");
        assert_eq!(template("/api/blobs/"), "other");
        assert_eq!(template("/api/chat/"), "other");
        assert_eq!(template("/x\t\"y"), "other");
        assert_eq!(public("/metrics"), Some(Public::Metrics));
        assert_eq!(public("/api/tags"), None);
    }

    #[test]
    fn classes() {
        assert_eq!(classify("POST", "/api/chat"), Class::Inference(Kind::OllamaChat));
        assert_eq!(classify("GET", "/api/chat"), Class::Inference(Kind::OllamaChat));
        assert_eq!(classify("POST", "/api/generate"), Class::Inference(Kind::OllamaGenerate));
        assert_eq!(classify("GET", "/api/tags"), Class::Listing(Listing::Ollama));
        assert_eq!(classify("DELETE", "/api/tags"), Class::Other);
        assert_eq!(classify("HEAD", "/"), Class::Info);
        assert_eq!(classify("GET", "/api/status"), Class::Info);
        assert_eq!(classify("HEAD", "/api/status"), Class::Other);
        assert_eq!(classify("POST", "/api/status"), Class::Other);
        assert_eq!(template("/api/status"), "/api/status");
        assert_eq!(classify("DELETE", "/api/delete"), Class::Management(Some(Kind::ModelOnly)));
        assert_eq!(classify("POST", "/api/blobs/sha256:ab"), Class::Management(None));
        assert_eq!(classify("GET", "/v1/models/m:7b"), Class::ModelInfoPath("m:7b".into()));
        assert_eq!(classify("GET", "/v1/models/a/b"), Class::Other);
        assert_eq!(classify("GET", "/api/me"), Class::Other);
        assert_eq!(classify("POST", "/v1/images/generations"), Class::Other);
        assert!(Class::Other.needs_manage());
        assert_eq!(Class::ModelInfo.inspected(), Some(Kind::ModelOnly));
    }
}
