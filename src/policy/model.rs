//! Model names and model patterns (SPEC §7.2).
//!
//! Access control on models is only as strong as the name comparison behind it: if butler
//! and Ollama disagree on which model a string names, a client can reach a denied model by
//! spelling it differently (`LLAMA3.3`, `library/llama3.3`, a registry URL, a digest suffix).
//! So every name, and every pattern, is reduced to the same canonical "short form" Ollama
//! itself displays (default host and namespace dropped, tag always present, lowercase), and
//! all matching happens on that form.
//!
//! Before that, a name goes through the same first step as in Ollama's `ParseRef`: surrounding
//! white space is trimmed and one trailing *source suffix* is removed (`:local`, `:cloud`, or
//! `-cloud` ending the tag), so `llama3.3:70b:local` is `llama3.3:70b` — else a deny list
//! would miss it. A `:cloud`/`-cloud` suffix makes the name a cloud model, which Ollama runs on
//! ollama.com with the host owner's account; [`ModelName::is_cloud`] reports it.

use std::borrow::Cow;

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
    /// Canonical short form, lowercase, always with a tag, without a source suffix.
    short: String,
    /// Length of `short` without its `:tag`, so "any tag of this name" compares a prefix
    /// instead of re-parsing.
    base_len: usize,
    /// The name ended in `:cloud` or `-cloud`: Ollama runs it on ollama.com.
    cloud: bool,
}

impl ModelName {
    /// Errors with a short reason, e.g. "invalid model name".
    ///
    /// The reason is always "invalid model name" (Ollama's own wording), because it goes
    /// back to clients, which gain nothing from knowing which rule their string broke.
    pub fn parse(raw: &str) -> Result<ModelName, &'static str> {
        let parse = || {
            reject_scheme(raw)?;
            let (base, source) = parse_ref(raw)?;
            let parsed = parse_name(&base)?;
            Ok::<_, &'static str>(ModelName {
                short: parsed.short,
                base_len: parsed.base_len,
                cloud: source == Source::Cloud,
            })
        };
        parse().map_err(|_| "invalid model name")
    }

    /// Short form, lowercase, without source suffix: "llama3.2:latest", "user/m:latest",
    /// "hf.co/org/m:q4_k_m", "host:5000/ns/m:tag".
    pub fn short(&self) -> &str {
        &self.short
    }

    /// Whether the name asks for a cloud model (`:cloud` or `-cloud`), which Ollama runs on
    /// ollama.com on the host owner's account (SPEC §7.2).
    pub fn is_cloud(&self) -> bool {
        self.cloud
    }

    /// The short form for logs and metrics, with `:cloud` appended for a cloud model so an
    /// audit shows which requests left the host.
    pub fn label(&self) -> String {
        if self.cloud { format!("{}:cloud", self.short) } else { self.short.clone() }
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

/// Refuses any `scheme://`. Ollama's parser takes any scheme in front of the host
/// (`x://registry.ollama.ai/library/llama3.2:3b` is `llama3.2:3b`); no client needs one, and
/// refusing it leaves one spelling fewer to get wrong (SPEC §7.2).
fn reject_scheme(s: &str) -> Result<(), &'static str> {
    if s.contains("://") { Err("a scheme (://) is not allowed") } else { Ok(()) }
}

/// Where a name says its model runs: Ollama's source suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// No suffix.
    Any,
    /// `:local`.
    Local,
    /// `:cloud`, or a tag ending in `-cloud`.
    Cloud,
}

/// Ollama's `ParseRef` (internal/modelref): trims surrounding white space (Rust's `trim` and
/// Go's `strings.TrimSpace` both cut Unicode White_Space), then removes one source suffix and
/// refuses a second one under it (`x:cloud:local`, `x:7b-cloud:cloud`). Returns the base name
/// Ollama goes on to resolve, and the source.
fn parse_ref(raw: &str) -> Result<(Cow<'_, str>, Source), &'static str> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("empty");
    }
    match source_suffix(trimmed) {
        None => Ok((Cow::Borrowed(trimmed), Source::Any)),
        Some((base, source)) => {
            if source_suffix(&base).is_some() {
                return Err("two source suffixes");
            }
            Ok((base, source))
        }
    }
}

/// One source suffix, as Ollama finds it: what follows the last `:`, trimmed, is `cloud` or
/// `local` in any case (the suffix and that `:` are removed), or — when it holds no `/` —
/// ends in `-cloud` (only those six bytes go: `x:7b-cloud` is `x:7b`, `x: 7b-cloud` too).
/// `my-cloud-model` and `foo:bar-cloud/baz` have none. Go lowercases the whole suffix before
/// comparing, but no non-ASCII character lowercases to a letter of `cloud` or `local`, so an
/// ASCII comparison gives the same answers.
fn source_suffix(s: &str) -> Option<(Cow<'_, str>, Source)> {
    let colon = s.rfind(':')?;
    let suffix = s[colon + 1..].trim();
    if suffix.eq_ignore_ascii_case("cloud") {
        return Some((Cow::Borrowed(&s[..colon]), Source::Cloud));
    }
    if suffix.eq_ignore_ascii_case("local") {
        return Some((Cow::Borrowed(&s[..colon]), Source::Local));
    }
    if suffix.contains('/') {
        return None;
    }
    let cut = suffix.len().checked_sub("-cloud".len())?;
    // `get` is None when `cut` splits a character: then the last six bytes are not `-cloud`.
    if !suffix.get(cut..)?.eq_ignore_ascii_case("-cloud") {
        return None;
    }
    Some((Cow::Owned(format!("{}{}", &s[..=colon], &suffix[..cut])), Source::Cloud))
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

/// Normalises a name without source suffix (SPEC §7.2); the error is a detailed reason for
/// config messages.
fn parse_name(raw: &str) -> Result<Parsed, &'static str> {
    check_raw(raw)?;
    let lower = raw.to_ascii_lowercase();
    let s = strip_digest(&lower)?;

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
    /// A source suffix in the pattern limits it to names with that source: `x:7b-cloud` (as
    /// `ollama ls` lists a cloud model) matches only the cloud `x:7b`, `x:local` only names
    /// that are not cloud models. Without one, the pattern matches both.
    source: Source,
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
        let (kind, source) =
            parse_pattern(raw).map_err(|why| format!("invalid model pattern {raw:?}: {why}"))?;
        Ok(Pattern { raw: raw.to_string(), kind, source })
    }

    pub fn matches(&self, model: &ModelName) -> bool {
        let source = match self.source {
            Source::Any => true,
            Source::Cloud => model.cloud,
            Source::Local => !model.cloud,
        };
        source && self.matches_short(model)
    }

    fn matches_short(&self, model: &ModelName) -> bool {
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
    /// Also true for spellings that normalise to it (`**`, ` * `), so that
    /// [`ModelAcl::permits_all`] agrees with what the pattern actually matches; false for
    /// `*:cloud` and `*:local`, which match only part of the models.
    pub fn is_all(&self) -> bool {
        matches!(self.kind, Kind::All) && self.source == Source::Any
    }

    /// The pattern as configured (for logs/docs).
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

/// Normalises a pattern as names are normalised (trimmed, no scheme, one source suffix
/// removed and remembered), then reads what is left as a name or a glob.
fn parse_pattern(raw: &str) -> Result<(Kind, Source), &'static str> {
    reject_scheme(raw)?;
    let (base, source) = parse_ref(raw)?;
    Ok((parse_kind(&base)?, source))
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
    let mut s = strip_digest(&lower)?;
    // `-cloud` ending a tag is removed from names before matching, so a glob ending in it
    // (`*-cloud`: "every cloud model"?) would match nothing. `*:cloud` says that.
    if s.ends_with("-cloud") {
        return Err(
            "names are matched without their -cloud suffix; write *:cloud for every cloud model",
        );
    }

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
    }

    #[test]
    fn equivalent_spellings() {
        for raw in [
            "LLAMA3.3:70B",
            "llama3.3:70b",
            "library/llama3.3:70b",
            "registry.ollama.ai/library/llama3.3:70b",
            "Registry.Ollama.AI/Library/Llama3.3:70b",
            "registry.ollama.ai/library/llama3.3:70b@sha256:ab12",
            "llama3.3:70b@sha256:ab12",
            " llama3.3:70b\n",
            "llama3.3:70b:local",
            "llama3.3:70b:LOCAL",
            "llama3.3:70b: local ",
        ] {
            assert_eq!(short(raw), "llama3.3:70b", "{raw}");
            assert!(!name(raw).is_cloud(), "{raw}");
        }
        for raw in
            ["llama3.3:70b-cloud", "llama3.3:70b:cloud", "LLAMA3.3:70B-CLOUD", "llama3.3:70b:Cloud"]
        {
            assert_eq!(short(raw), "llama3.3:70b", "{raw}");
            assert!(name(raw).is_cloud(), "{raw}");
            assert_eq!(name(raw).label(), "llama3.3:70b:cloud");
        }
        assert_eq!(name("llama3.3:70b").label(), "llama3.3:70b");
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
            " \t\n",
            "a b",
            "x :cloud",
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
            "https://registry.ollama.ai/library/x",
            "http://registry.ollama.ai/library/x:1b",
            "x://registry.ollama.ai/library/llama3.2:3b",
            "x:cloud:local",
            "x:7b-cloud:cloud",
            "x:local:local",
            "x:cloud-cloud",
            ":cloud",
            "x:-cloud",
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
        assert!(pat(" * ").is_all());
        assert!(!pat("*:cloud").is_all());
        assert!(!pat("*:local").is_all());
        assert!(!pat("library/*").is_all());
        assert!(!pat("registry.ollama.ai/*").is_all());
        assert!(!pat("*:7b").is_all());
    }

    #[test]
    fn invalid_patterns() {
        for raw in [
            "",
            "a b",
            "x:",
            "/x",
            "a//b",
            "a/b/c/d",
            "é",
            "*é",
            "* x",
            "a//*",
            "/*",
            "*/",
            "*:",
            "a/*/b/c",
            "@x",
            "https://",
            "https://*",
            "x://m",
            "x:cloud:local",
            "*:cloud:local",
            "*-cloud",
            "qwen*-CLOUD",
            "host:5000/*-cloud",
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
        assert_eq!(
            Pattern::parse("https://x").err().as_deref(),
            Some("invalid model pattern \"https://x\": a scheme (://) is not allowed")
        );
        assert_eq!(
            Pattern::parse("x:cloud:local").err().as_deref(),
            Some("invalid model pattern \"x:cloud:local\": two source suffixes")
        );
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
        // Case.
        assert!(m("QWEN*", "qwen2.5:7b"));
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
            "llama3.3@sha256:ab12",
            "llama3.3:local",
            "llama3.3:70b:local",
            " Llama3.3:70b:LOCAL\t",
            "llama3.3:70b-cloud",
            "llama3.3:cloud",
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
    #[test]
    fn deny_with_tag_catches_source_suffixes() {
        let acl = acl(&["*"], &["llama3.2:latest"]);
        for raw in ["llama3.2:local", "llama3.2:latest:local", "LLAMA3.2:Local", "llama3.2:cloud"] {
            assert!(!acl.permits(&name(raw)), "{raw}");
        }
        assert!(acl.permits(&name("llama3.2:1b:local")));
    }

    /// Ollama's own cases (internal/modelref and types/model tests, v0.33), as facts: the
    /// name, and what Ollama resolves it to — its short form and whether it is a cloud model
    /// — or `None` where Ollama refuses it. butler must agree wherever Ollama accepts; where
    /// Ollama refuses, butler may refuse too (`Err`) or judge some name (Ollama then runs
    /// nothing), so those rows only say what butler does.
    #[test]
    fn ollama_cases() {
        let part80 = "8".repeat(80);
        let long = format!("{part80}/{part80}/{part80}:{part80}");
        let long_short = long.clone();
        let cases: Vec<(&str, Option<(&str, bool)>)> = vec![
            // modelref: source suffixes.
            ("gpt-oss:20b:cloud", Some(("gpt-oss:20b", true))),
            ("gpt-oss:20b-cloud", Some(("gpt-oss:20b", true))),
            ("qwen3:8b:local", Some(("qwen3:8b", false))),
            ("llama3.2", Some(("llama3.2:latest", false))),
            ("my-cloud-model", Some(("my-cloud-model:latest", false))),
            ("gpt-oss:clod", Some(("gpt-oss:clod", false))),
            ("gpt-oss:20b:CLOUD", Some(("gpt-oss:20b", true))),
            ("gpt-oss:20b:local", Some(("gpt-oss:20b", false))),
            ("qwen3:cloud", Some(("qwen3:latest", true))),
            (
                "localhost:11434/library/foo:cloud",
                Some(("localhost:11434/library/foo:latest", true)),
            ),
            ("foo:cloud:local", None),
            ("   ", None),
            // foo:bar-cloud/baz has no suffix; as a name its namespace holds a `:`.
            ("foo:bar-cloud/baz", None),
            // types/model: structure and defaults.
            (
                "registry.ollama.ai/library/dolphin-mistral:7b-v2.6-dpo-laser-q6_K",
                Some(("dolphin-mistral:7b-v2.6-dpo-laser-q6_k", false)),
            ),
            ("host/namespace/model:tag", Some(("host/namespace/model:tag", false))),
            ("host:port/namespace/model:tag", Some(("host:port/namespace/model:tag", false))),
            ("host/namespace/model", Some(("host/namespace/model:latest", false))),
            ("host:port/namespace/model", Some(("host:port/namespace/model:latest", false))),
            ("namespace/model", Some(("namespace/model:latest", false))),
            ("model", Some(("model:latest", false))),
            ("h/nn/mm:t", Some(("h/nn/mm:t", false))),
            ("_why/_the/_lucky:_stiff", Some(("_why/_the/_lucky:_stiff", false))),
            ("host:https/namespace/model:tag", Some(("host:https/namespace/model:tag", false))),
            ("registry.ollama.ai/namespace/model:tag", Some(("namespace/model:tag", false))),
            ("host/library/model:tag", Some(("host/library/model:tag", false))),
            ("xx", Some(("xx:latest", false))),
            (long.as_str(), Some((long_short.as_str(), false))),
            // (Ollama also takes a 350-byte host: 593 bytes in all. butler refuses names over
            // 512 bytes, which is only stricter.)
            // Ollama refuses these.
            ("", None),
            ("n/m:", None),
            ("mm:", None),
            ("/nn/mm", None),
            ("//", None),
            ("//mm", None),
            ("hh//", None),
            ("//mm:@", None),
            ("@", None),
            ("@t", None),
            ("scheme://host:port/namespace/model:tag", None),
        ];
        for (raw, want) in cases {
            let got = ModelName::parse(raw);
            match want {
                Some((short, cloud)) => {
                    let n = got.unwrap_or_else(|e| panic!("{raw:?}: {e}"));
                    assert_eq!((n.short(), n.is_cloud()), (short, cloud), "{raw:?}");
                }
                None => {
                    // Refused by Ollama. butler refuses all of these but one, which it
                    // reads as a name Ollama would not run (its namespace holds a `:`).
                    if raw == "foo:bar-cloud/baz" {
                        assert_eq!(short(raw), "foo:bar-cloud/baz:latest");
                    } else {
                        assert!(got.is_err(), "{raw:?}: {got:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_suffix_in_a_pattern_limits_it_to_that_source() {
        // As `ollama ls` lists a cloud model.
        assert!(m("gpt-oss:20b-cloud", "gpt-oss:20b:cloud"));
        assert!(m("gpt-oss:20b-cloud", "GPT-OSS:20B-Cloud"));
        assert!(!m("gpt-oss:20b-cloud", "gpt-oss:20b"));
        assert!(!m("gpt-oss:20b-cloud", "gpt-oss:20b:local"));
        assert!(m("gpt-oss:cloud", "gpt-oss:120b-cloud"));
        assert!(!m("gpt-oss:cloud", "gpt-oss:120b"));
        assert!(m("gpt-oss:local", "gpt-oss:120b"));
        assert!(m("gpt-oss:local", "gpt-oss:120b:local"));
        assert!(!m("gpt-oss:local", "gpt-oss:120b-cloud"));
        assert!(m("*:cloud", "hf.co/org/m:q4:cloud"));
        assert!(!m("*:cloud", "llama3.2"));
        assert!(m("qwen*:7b-cloud", "qwen3:7b-cloud"));
        assert!(!m("qwen*:7b-cloud", "qwen3:7b"));
        // Without a suffix, a pattern matches local and cloud names alike.
        assert!(m("gpt-oss:20b", "gpt-oss:20b-cloud"));
        assert!(m("gpt-oss", "gpt-oss:20b:cloud"));
        assert!(m("*", "gpt-oss:20b:cloud"));
        // A name whose model merely contains "cloud" is not a cloud model.
        assert!(m("my-model-cloud", "my-model-cloud:1b"));
        assert!(!name("my-model-cloud").is_cloud());
    }
}
