//! CORS for browser front ends (SPEC §11): preflights from allowed origins
//! are answered before authentication, and allowed origins get
//! `Access-Control-Allow-Origin` on every response. Pure decisions; the
//! pipeline writes the headers.

/// Request headers a browser client may send (besides the CORS-safelisted
/// ones): credentials, JSON, and what the OpenAI and Anthropic SDKs add.
const ALLOWED_HEADERS: &[&str] =
    &["authorization", "content-type", "x-api-key", "openai-beta", "x-request-id"];
/// The OpenAI SDKs send a family of `x-stainless-*` headers.
const ALLOWED_PREFIX: &str = "x-stainless-";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";
/// How long a browser may cache a preflight answer.
pub const MAX_AGE: &str = "600";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cors {
    /// Exact origins (`https://chat.example.org`), or `*` for any.
    origins: Vec<String>,
}

/// The answer to a preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    /// 204 with these headers.
    Allowed(Vec<(&'static str, String)>),
    /// 403 `{"error":"origin not allowed"}`, no CORS headers.
    Denied,
}

impl Cors {
    pub fn new(origins: Vec<String>) -> Cors {
        Cors { origins: origins.into_iter().map(|o| o.trim_end_matches('/').to_owned()).collect() }
    }

    /// Validates one configured origin: `*` or `scheme://host[:port]`.
    pub fn check_origin(origin: &str) -> Result<(), String> {
        if origin == "*" {
            return Ok(());
        }
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"))
            .ok_or_else(|| format!("origin {origin:?} must start with http:// or https://"))?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '*']) {
            return Err(format!("origin {origin:?} must be scheme://host[:port] only"));
        }
        Ok(())
    }

    /// Whether `origin` (the request's `Origin` header) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        !origin.is_empty()
            && self.origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// Answers a preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`. Requested headers outside the
    /// allowed set are left out of the answer, so the browser refuses them.
    pub fn preflight(&self, origin: &str, requested_headers: Option<&str>) -> Preflight {
        if !self.allows(origin) {
            return Preflight::Denied;
        }
        let mut headers: Vec<String> = ALLOWED_HEADERS.iter().map(|h| (*h).to_owned()).collect();
        for h in requested_headers.unwrap_or("").split(',') {
            let h = h.trim().to_ascii_lowercase();
            if h.starts_with(ALLOWED_PREFIX)
                && h.len() <= 64
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !headers.contains(&h)
            {
                headers.push(h);
            }
        }
        Preflight::Allowed(vec![
            ("Access-Control-Allow-Origin", origin.to_owned()),
            ("Access-Control-Allow-Methods", ALLOWED_METHODS.to_owned()),
            ("Access-Control-Allow-Headers", headers.join(", ")),
            ("Access-Control-Max-Age", MAX_AGE.to_owned()),
            ("Vary", "Origin".to_owned()),
        ])
    }

    pub fn is_configured(&self) -> bool {
        !self.origins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_preflights() {
        let cors = Cors::new(vec!["https://chat.example.org/".into()]);
        assert!(cors.allows("https://chat.example.org"));
        assert!(cors.allows("HTTPS://CHAT.EXAMPLE.ORG"));
        assert!(!cors.allows("https://evil.example"));
        assert!(!cors.allows(""));
        assert_eq!(cors.preflight("https://evil.example", None), Preflight::Denied);
        let Preflight::Allowed(h) = cors.preflight(
            "https://chat.example.org",
            Some("Authorization, X-Stainless-Lang, x-evil, x-stainless-bad!"),
        ) else {
            panic!("denied")
        };
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("Access-Control-Allow-Origin"), Some("https://chat.example.org"));
        let allowed = get("Access-Control-Allow-Headers").unwrap();
        assert!(allowed.contains("x-stainless-lang") && allowed.contains("openai-beta"));
        assert!(!allowed.contains("x-evil") && !allowed.contains("bad!"));
        assert!(Cors::new(vec!["*".into()]).allows("https://any.example"));
        for bad in ["chat.example.org", "https://x/path", "https://", "ftp://x"] {
            assert!(Cors::check_origin(bad).is_err(), "{bad}");
        }
        assert!(Cors::check_origin("http://localhost:3000").is_ok());
    }
}
