//! Model names and model patterns (SPEC §7.2).
//!
//! Access control on models is only as strong as the name comparison behind it: if butler
//! and Ollama disagree on which model a string names, a client can reach a denied model by
//! spelling it differently (`LLAMA3.3`, `library/llama3.3`, a registry URL, a digest suffix).
//! So every name, and every pattern, is reduced to the same canonical "short form" Ollama
//! itself displays (default host and namespace dropped, tag always present, lowercase), and
//! all matching happens on that form.

/// Ollama's default registry host: names without a host resolve here.
const DEFAULT_HOST: &str = "registry.ollama.ai";
/// Ollama's default namespace on the default registry.
const DEFAULT_NAMESPACE: &str = "library";
/// The tag Ollama assumes when a name has none.
const DEFAULT_TAG: &str = "latest";
/// Upper bound on names and patterns. Real names are far shorter; the bound keeps the
/// worst case of glob matching (length × length) small.
const MAX_LEN: usize = 512;

/// A model name as Ollama resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelName {
    /// Canonical short form, lowercase, always with a tag.
    short: String,
    /// Length of `short` without its `:tag`, so "any tag of this name" compares a prefix
    /// instead of re-parsing.
    base_len: usize,
}

impl ModelName {
    /// Errors with a short reason, e.g. "invalid model name".
    ///
    /// The reason is always "invalid model name" (Ollama's own wording), because it goes
    /// back to clients, which gain nothing from knowing which rule their string broke.
    pub fn parse(raw: &str) -> Result<ModelName, &'static str> {
        match parse_name(raw) {
            Ok(parsed) => Ok(ModelName { short: parsed.short, base_len: parsed.base_len }),
            Err(_) => Err("invalid model name"),
        }
    }

    /// Short form, lowercase: "llama3.2:latest", "user/m:latest", "hf.co/org/m:q4_k_m",
    /// "host:5000/ns/m:tag".
    pub fn short(&self) -> &str {
        &self.short
    }

    /// The short form without its tag ("llama3.2" for "llama3.2:1b").
    fn base(&self) -> &str {
        &self.short[..self.base_len]
    }
}

/// A name after normalisation, plus whether the tag was written out (which decides what a
/// pattern without `*` matches).
struct Parsed {
    short: String,
    base_len: usize,
    explicit_tag: bool,
}

/// Rejects what Ollama rejects before any structure is considered. Anything that is not
/// printable ASCII is refused outright: accepting it could create spellings (Unicode case
/// folding, trailing spaces, controls) that butler and Ollama would resolve differently.
fn check_raw(raw: &str) -> Result<(), &'static str> {
    if raw.is_empty() {
        return Err("empty");
    }
    if raw.len() > MAX_LEN {
        return Err("longer than 512 bytes");
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed");
    }
    Ok(())
}

/// Drops a leading `http://` or `https://`: Ollama's parser accepts a scheme in front of the
/// host (for insecure registries), so `https://registry.ollama.ai/library/x` is just `x`.
/// Expects lowercase input.
fn strip_scheme(s: &str) -> &str {
    s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s)
}

/// Drops a `@digest` suffix (cut at the last `@`): a digest pins content, not identity, and
/// the spec ignores it for matching, so `x@sha256:…` must be governed by the rules for `x`.
fn strip_digest(s: &str) -> Result<&str, &'static str> {
    let s = match s.rfind('@') {
        Some(at) => &s[..at],
        None => s,
    };
    if s.is_empty() { Err("nothing before the digest") } else { Ok(s) }
}

/// Normalises a name (SPEC §7.2); the error is a detailed reason for config messages.
fn parse_name(raw: &str) -> Result<Parsed, &'static str> {
    check_raw(raw)?;
    let lower = raw.to_ascii_lowercase();
    let s = strip_scheme(&lower);
    if s.is_empty() {
        return Err("empty");
    }
    let s = strip_digest(s)?;

    // The tag is what follows the last `:` after the last `/`; a `:` before the last `/`
    // is a registry port (`host:5000/ns/m`), not a tag.
    let last_slash = s.rfind('/');
    let (rest, tag) = match s.rfind(':') {
        Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
            (&s[..colon], Some(&s[colon + 1..]))
        }
        _ => (s, None),
    };
    if tag == Some("") {
        return Err("empty tag");
    }

    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|part| part.is_empty()) {
        return Err("empty part");
    }
    let (host, namespace, model) = match parts.as_slice() {
        [model] => (DEFAULT_HOST, DEFAULT_NAMESPACE, *model),
        [namespace, model] => (DEFAULT_HOST, *namespace, *model),
        [host, namespace, model] => (*host, *namespace, *model),
        _ => return Err("more than host/namespace/model"),
    };

    let base = if host == DEFAULT_HOST && namespace == DEFAULT_NAMESPACE {
        model.to_string()
    } else if host == DEFAULT_HOST {
        format!("{namespace}/{model}")
    } else {
        format!("{host}/{namespace}/{model}")
    };
    let base_len = base.len();
    let short = format!("{base}:{}", tag.unwrap_or(DEFAULT_TAG));
    Ok(Parsed { short, base_len, explicit_tag: tag.is_some() })
}

/// A model pattern from the configuration.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// As configured, for logs and docs.
    raw: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Every model.
    All,
    /// Exactly this short form (the pattern had a tag).
    Exact(String),
    /// Any tag of this short form without tag (the pattern had no tag).
    AnyTag(String),
    /// A glob over the short form, limited to models in `scope`.
    Glob { glob: String, scope: Scope },
}

/// Which models a glob may match at all. A glob written as `library/…` or
/// `registry.ollama.ai/…` has that prefix removed to line up with short forms; without this
/// limit the removal would widen it (`library/*` would become `*`, every model on every
/// registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Any model.
    Any,
    /// Only models on the default registry: short forms with at most one `/`.
    DefaultHost,
    /// Only `registry.ollama.ai/library` models: short forms without `/`.
    Library,
}

impl Scope {
    fn admits(self, short: &str) -> bool {
        let slashes = short.bytes().filter(|&b| b == b'/').count();
        match self {
            Scope::Any => true,
            Scope::DefaultHost => slashes <= 1,
            Scope::Library => slashes == 0,
        }
    }
}

impl Pattern {
    /// Errors with a message suitable for a config error ("invalid model pattern \"…\": …").
    pub fn parse(raw: &str) -> Result<Pattern, String> {
        let kind =
            parse_kind(raw).map_err(|why| format!("invalid model pattern {raw:?}: {why}"))?;
        Ok(Pattern { raw: raw.to_string(), kind })
    }

    pub fn matches(&self, model: &ModelName) -> bool {
        match &self.kind {
            Kind::All => true,
            Kind::Exact(short) => model.short() == short,
            Kind::AnyTag(base) => model.base() == base,
            Kind::Glob { glob, scope } => {
                scope.admits(model.short()) && glob_match(glob.as_bytes(), model.short().as_bytes())
            }
        }
    }

    /// True for the pattern `*` alone.
    ///
    /// Also true for spellings that normalise to it (`**`, `https://*`), so that
    /// [`ModelAcl::permits_all`] agrees with what the pattern actually matches.
    pub fn is_all(&self) -> bool {
        matches!(self.kind, Kind::All)
    }

    /// The pattern as configured (for logs/docs).
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

fn parse_kind(raw: &str) -> Result<Kind, &'static str> {
    if raw == "*" {
        return Ok(Kind::All);
    }
    if !raw.contains('*') {
        let parsed = parse_name(raw)?;
        return Ok(if parsed.explicit_tag {
            Kind::Exact(parsed.short)
        } else {
            let mut base = parsed.short;
            base.truncate(parsed.base_len);
            Kind::AnyTag(base)
        });
    }
    parse_glob(raw)
}

/// Normalises a glob the way names are normalised, as far as that is possible with `*` in
/// it, and rejects globs that could never match a short form: a deny pattern that silently
/// matches nothing is a security hole, so a typo should fail at startup instead.
fn parse_glob(raw: &str) -> Result<Kind, &'static str> {
    check_raw(raw)?;
    let lower = raw.to_ascii_lowercase();
    let s = strip_scheme(&lower);
    if s.is_empty() {
        return Err("empty");
    }
    let mut s = strip_digest(s)?;

    // Short forms have at most host/namespace/model, no empty part and a non-empty tag;
    // the literal `/`s and a trailing `:` of a glob must fit that.
    let segments: Vec<&str> = s.split('/').collect();
    if segments.iter().any(|segment| segment.is_empty()) {
        return Err("empty part");
    }
    if segments.len() > 3 {
        return Err("more than host/namespace/model");
    }
    if s.ends_with(':') {
        return Err("empty tag");
    }

    let mut scope = Scope::Any;
    if let Some(rest) = s.strip_prefix("registry.ollama.ai/") {
        s = rest;
        scope = Scope::DefaultHost;
    }
    // `library/a/*` names host `library`, not the default namespace, so only a `library/`
    // followed by a single part is the default namespace.
    if let Some(rest) = s.strip_prefix("library/").filter(|rest| !rest.contains('/')) {
        s = rest;
        scope = Scope::Library;
    }

    if scope == Scope::Any && s.bytes().all(|b| b == b'*') {
        return Ok(Kind::All);
    }
    Ok(Kind::Glob { glob: s.to_string(), scope })
}

/// Anchored wildcard match where `*` stands for any run of bytes (including `/` and `:`).
///
/// Iterative two-pointer algorithm with a single backtrack point: worst case
/// O(len(glob) × len(text)), never exponential, so a hostile pattern or name cannot burn
/// CPU the way naive recursive backtracking can (`a*a*a*…b`).
fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    let (mut g, mut t) = (0, 0);
    // Position of the last `*` seen, and where in `text` its current match ends.
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match glob.get(g) {
            Some(b'*') => {
                backtrack = Some((g, t));
                g += 1;
            }
            Some(&c) if c == text[t] => {
                g += 1;
                t += 1;
            }
            _ => match backtrack {
                // Let the last `*` swallow one more byte and retry from there. Earlier
                // stars never need revisiting: the last one can absorb anything they could.
                Some((star, end)) => {
                    g = star + 1;
                    t = end + 1;
                    backtrack = Some((star, end + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&b| b == b'*')
}

/// An allow list and a deny list.
#[derive(Debug, Clone, Default)]
pub struct ModelAcl {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
}

impl ModelAcl {
    pub fn new(allow: Vec<Pattern>, deny: Vec<Pattern>) -> ModelAcl {
        ModelAcl { allow, deny }
    }

    /// Deny first; then allowed if any allow pattern matches; empty allow list denies.
    ///
    /// Deny wins so that a broad allow (`*`, `qwen*`) can carve out exceptions, and an
    /// empty allow list fails closed rather than open.
    pub fn permits(&self, model: &ModelName) -> bool {
        !self.deny.iter().any(|p| p.matches(model)) && self.allow.iter().any(|p| p.matches(model))
    }

    /// True when every model is permitted: allow holds `*` and deny is empty.
    pub fn permits_all(&self) -> bool {
        self.deny.is_empty() && self.allow.iter().any(Pattern::is_all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> ModelName {
        match ModelName::parse(raw) {
            Ok(n) => n,
            Err(e) => panic!("{raw:?} should parse: {e}"),
        }
    }

    fn pat(raw: &str) -> Pattern {
        match Pattern::parse(raw) {
            Ok(p) => p,
            Err(e) => panic!("{raw:?} should parse: {e}"),
        }
    }

    fn short(raw: &str) -> String {
        name(raw).short().to_string()
    }

    fn m(pattern: &str, model: &str) -> bool {
        pat(pattern).matches(&name(model))
    }

    fn acl(allow: &[&str], deny: &[&str]) -> ModelAcl {
        ModelAcl::new(allow.iter().map(|p| pat(p)).collect(), deny.iter().map(|p| pat(p)).collect())
    }

    #[test]
    fn short_forms() {
        assert_eq!(short("llama3.2"), "llama3.2:latest");
        assert_eq!(short("user/m"), "user/m:latest");
        assert_eq!(short("hf.co/org/m:Q4_K_M"), "hf.co/org/m:q4_k_m");
        assert_eq!(short("host:5000/ns/m:tag"), "host:5000/ns/m:tag");
        assert_eq!(short("host:5000/ns/m"), "host:5000/ns/m:latest");
        assert_eq!(short("registry.ollama.ai/user/m:1b"), "user/m:1b");
        assert_eq!(short("library/a/b"), "library/a/b:latest");
        assert_eq!(short("http://host:5000/ns/m"), "host:5000/ns/m:latest");
    }

    #[test]
    fn equivalent_spellings() {
        for raw in [
            "LLAMA3.3:70B",
            "llama3.3:70b",
            "library/llama3.3:70b",
            "registry.ollama.ai/library/llama3.3:70b",
            "Registry.Ollama.AI/Library/Llama3.3:70b",
            "https://registry.ollama.ai/library/llama3.3:70b@sha256:ab12",
            "http://registry.ollama.ai/library/llama3.3:70b",
            "llama3.3:70b@sha256:ab12",
        ] {
            assert_eq!(short(raw), "llama3.3:70b", "{raw}");
        }
        assert_eq!(short("https://registry.ollama.ai/library/llama3.3"), "llama3.3:latest");
        assert_eq!(short("x@sha256:abc"), "x:latest");
        assert_eq!(name("llama3.2"), name("LIBRARY/Llama3.2:latest"));
    }

    #[test]
    fn digest_cut_at_last_at() {
        assert_eq!(short("x@y@sha256:abc"), "x@y:latest");
        assert_eq!(short("x:1b@sha256:abc"), "x:1b");
    }

    #[test]
    fn invalid_names() {
        let too_long = "a".repeat(513);
        for raw in [
            "",
            "a b",
            " x",
            "x ",
            "x\n",
            "x\t",
            "x:",
            "/x",
            "x/",
            "a//b",
            "a/b/c/d",
            "é",
            "llamä",
            "@sha256:abc",
            "https://",
            "https://@x",
            ":tag",
            ":",
            "ns/:tag",
            too_long.as_str(),
        ] {
            assert_eq!(ModelName::parse(raw), Err("invalid model name"), "{raw:?}");
        }
        assert!(ModelName::parse(&"a".repeat(512)).is_ok());
    }

    #[test]
    fn pattern_without_tag_matches_any_tag() {
        assert!(m("llama3.2", "llama3.2:1b"));
        assert!(m("llama3.2", "llama3.2:latest"));
        assert!(m("llama3.2", "llama3.2"));
        assert!(!m("llama3.2", "llama3.2-vision"));
        assert!(!m("llama3.2", "user/llama3.2"));
        assert!(m("library/llama3.3", "registry.ollama.ai/library/llama3.3:70b"));
        assert!(m("hf.co/org/m", "HF.CO/org/m:Q4_K_M"));
        assert!(!m("hf.co/org/m", "hf.co/org/m2:q4"));
        // A port is not a tag.
        assert!(m("host:5000/ns/m", "host:5000/ns/m:v1"));
    }

    #[test]
    fn pattern_with_tag_matches_exactly() {
        assert!(m("llama3.2:latest", "llama3.2"));
        assert!(m("llama3.2:latest", "LLAMA3.2:LATEST"));
        assert!(!m("llama3.2:latest", "llama3.2:1b"));
        assert!(m("hf.co/org/m:Q4_K_M", "hf.co/org/m:q4_k_m"));
        assert!(m("x@sha256:abc", "x:latest"));
        assert!(m("x:1b@sha256:abc", "x:1b"));
    }

    #[test]
    fn pattern_accessors() {
        let p = pat("Llama3.2:Latest");
        assert_eq!(p.as_str(), "Llama3.2:Latest");
        assert!(!p.is_all());
        assert!(pat("*").is_all());
        assert!(pat("**").is_all());
        assert!(pat("https://*").is_all());
        assert!(!pat("library/*").is_all());
        assert!(!pat("registry.ollama.ai/*").is_all());
        assert!(!pat("*:7b").is_all());
    }

    #[test]
    fn invalid_patterns() {
        for raw in [
            "", "a b", "x:", "/x", "a//b", "a/b/c/d", "é", "*é", "* ", "a//*", "/*", "*/", "*:",
            "a/*/b/c", "@x", "https://",
        ] {
            let err = match Pattern::parse(raw) {
                Ok(p) => panic!("{raw:?} should not parse: {p:?}"),
                Err(e) => e,
            };
            assert!(err.starts_with("invalid model pattern \""), "{err}");
        }
        assert_eq!(
            Pattern::parse("a//b").err().as_deref(),
            Some("invalid model pattern \"a//b\": empty part")
        );
        // Control characters are escaped in the message.
        assert_eq!(
            Pattern::parse("a\nb").err().as_deref(),
            Some("invalid model pattern \"a\\nb\": only printable ASCII without spaces is allowed")
        );
        assert!(Pattern::parse(&"*".repeat(513)).is_err());
    }

    #[test]
    fn globs() {
        assert!(m("qwen2.5*", "qwen2.5:7b"));
        assert!(m("qwen2.5*", "qwen2.5-coder:1.5b"));
        assert!(!m("qwen2.5*", "qwen2:7b"));
        assert!(m("hf.co/org/*", "hf.co/org/m:q4_k_m"));
        assert!(!m("hf.co/org/*", "hf.co/other/m:latest"));
        assert!(m("*:7b", "qwen2.5:7b"));
        assert!(m("*:7b", "hf.co/org/m:7b"));
        assert!(!m("*:7b", "qwen2.5:7b-instruct"));
        assert!(m("*:7b*", "qwen2.5:7b-instruct"));
        // Star in the middle, several stars, anchoring.
        assert!(m("qwen*:7b", "qwen2.5-coder:7b"));
        assert!(!m("qwen*:7b", "xqwen2.5:7b"));
        assert!(m("*coder*", "qwen2.5-coder:1.5b"));
        assert!(m("q*n*5*:*b", "qwen2.5:7b"));
        assert!(!m("q*n*5*:*b", "qwen2.5:latest"));
        assert!(m("*", "hf.co/org/m:x"));
        // Case and scheme.
        assert!(m("QWEN*", "qwen2.5:7b"));
        assert!(m("https://hf.co/org/*", "hf.co/org/m:q4"));
    }

    #[test]
    fn glob_prefixes_do_not_widen() {
        assert!(m("library/*", "llama3.2"));
        assert!(m("library/*", "registry.ollama.ai/library/llama3.2:1b"));
        assert!(!m("library/*", "hf.co/org/m"));
        assert!(!m("library/*", "user/m"));
        assert!(m("registry.ollama.ai/library/llama*", "llama3.2:1b"));
        assert!(!m("registry.ollama.ai/library/*", "user/m"));
        assert!(m("registry.ollama.ai/*", "llama3.2"));
        assert!(m("registry.ollama.ai/*", "user/m:1b"));
        assert!(!m("registry.ollama.ai/*", "hf.co/org/m"));
        assert!(m("registry.ollama.ai/user/*", "user/m:1b"));
        // `library/a/*` names host `library`, not the default namespace.
        assert!(m("library/a/*", "library/a/b:1"));
        assert!(!m("library/a/*", "a/b"));
    }

    #[test]
    fn glob_match_is_not_exponential() {
        let glob = format!("{}b", "a*".repeat(40));
        let text = "a".repeat(100_000);
        assert!(!glob_match(glob.as_bytes(), text.as_bytes()));
        assert!(glob_match(glob.as_bytes(), format!("{text}b").as_bytes()));

        // Through the public API, at the length limit.
        let p = pat(&format!("{}b", "a*".repeat(255)));
        assert!(!p.matches(&name(&"a".repeat(512))));
        let mut long = "a".repeat(511);
        long.push('b');
        assert!(!p.matches(&name(&long)), "needs 255 a's plus :latest after the b");
        let p = pat(&format!("{}b*", "a*".repeat(200)));
        assert!(p.matches(&name(&long)));
    }

    #[test]
    fn glob_match_basics() {
        let g = |glob: &str, text: &str| glob_match(glob.as_bytes(), text.as_bytes());
        assert!(g("", ""));
        assert!(!g("", "a"));
        assert!(g("*", ""));
        assert!(g("***", "abc"));
        assert!(g("a*", "a"));
        assert!(g("*a", "bba"));
        assert!(!g("*a", "ab"));
        assert!(g("a*b*c", "aXbYbZc"));
        assert!(!g("a*b*c", "aXbYbZ"));
        assert!(g("*ab", "aab"));
        assert!(g("*aab", "aaab"));
        assert!(g("a*/*:*", "ab/c:d"));
    }

    #[test]
    fn deny_catches_every_spelling() {
        let acl = acl(&["*"], &["llama3.3"]);
        for raw in [
            "llama3.3",
            "library/llama3.3",
            "registry.ollama.ai/library/llama3.3:70b",
            "LLAMA3.3:70B",
            "https://registry.ollama.ai/library/llama3.3",
            "http://registry.ollama.ai/library/llama3.3:70b",
            "llama3.3@sha256:ab12",
            "llama3.3:70b@sha256:ab12",
            "Library/Llama3.3:Latest",
        ] {
            assert!(!acl.permits(&name(raw)), "{raw}");
        }
        assert!(acl.permits(&name("llama3.2")));
        assert!(acl.permits(&name("user/llama3.3")));
        assert!(!acl.permits_all());
    }

    #[test]
    fn deny_with_tag() {
        let acl = acl(&["*"], &["llama3.2:latest"]);
        assert!(!acl.permits(&name("llama3.2")));
        assert!(!acl.permits(&name("LLAMA3.2:LATEST")));
        assert!(acl.permits(&name("llama3.2:1b")));
    }

    #[test]
    fn deny_glob_with_library_prefix() {
        let acl = acl(&["*"], &["library/llama*"]);
        assert!(!acl.permits(&name("llama3.3:70b")));
        assert!(!acl.permits(&name("registry.ollama.ai/library/llama3.2")));
        assert!(acl.permits(&name("user/llama3.3")));
    }

    #[test]
    fn deny_before_allow() {
        let acl = acl(&["qwen2.5*", "llama3.2"], &["qwen2.5-coder"]);
        assert!(acl.permits(&name("qwen2.5:7b")));
        assert!(!acl.permits(&name("qwen2.5-coder:1.5b")));
        assert!(acl.permits(&name("llama3.2:1b")));
        assert!(!acl.permits(&name("mistral")));
        assert!(!acl.permits_all());
    }

    #[test]
    fn empty_allow_denies() {
        assert!(!acl(&[], &[]).permits(&name("llama3.2")));
        assert!(!ModelAcl::default().permits(&name("llama3.2")));
        assert!(!ModelAcl::default().permits_all());
        assert!(!acl(&[], &["x"]).permits(&name("llama3.2")));
    }

    #[test]
    fn star_permits_all() {
        let all = acl(&["*"], &[]);
        assert!(all.permits_all());
        for raw in ["llama3.2", "hf.co/org/m:q4_k_m", "host:5000/ns/m:tag", "user/m"] {
            assert!(all.permits(&name(raw)), "{raw}");
        }
        assert!(acl(&["llama3.2", "*"], &[]).permits_all());
        assert!(!acl(&["*"], &["x"]).permits_all());
        assert!(!acl(&["library/*"], &[]).permits_all());
    }
}
