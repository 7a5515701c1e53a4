//! The route table (SPEC §6): which template a decoded path belongs to. The
//! template is what metrics use as the `path` label, so label sets stay
//! bounded whatever paths clients send.

/// Routes answered by butler itself without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Public {
    Healthz,
    Readyz,
    Metrics,
}

pub fn public(path: &str) -> Option<Public> {
    match path {
        "/healthz" => Some(Public::Healthz),
        "/readyz" => Some(Public::Readyz),
        "/metrics" => Some(Public::Metrics),
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
}
