//! An independent model of how Ollama (v0.33) reads a model name, for differential checks of
//! butler's [`ModelName`] (SPEC §7.2). Written from Ollama's documented behaviour and its
//! tests (`internal/modelref`: `ParseRef`; `types/model`: `ParseName`, `IsValid`,
//! `DisplayShortest`), deliberately in a different shape from butler's parser: Go's
//! `TrimSpace` as an explicit table, the suffix compared after full Unicode lowercasing, names
//! cut into parts the way Go's `cutPromised` does and validated part by part.
//!
//! Used by `tests/names.rs` and by the `model_name` fuzz target (which includes this file).

use butler::policy::model::{ModelName, Pattern};

/// What Ollama resolves a name to: its shortest display form (lowercase: Ollama finds models
/// case-insensitively) and whether it asked for the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub short: String,
    pub cloud: bool,
}

/// Go's `unicode.IsSpace`: the Unicode White_Space code points.
fn go_is_space(c: char) -> bool {
    const SINGLES: [char; 13] = [
        '\t', '\n', '\u{0b}', '\u{0c}', '\r', ' ', '\u{85}', '\u{a0}', '\u{1680}', '\u{2028}',
        '\u{2029}', '\u{202f}', '\u{205f}',
    ];
    SINGLES.contains(&c) || ('\u{2000}'..='\u{200a}').contains(&c) || c == '\u{3000}'
}

/// Go's `strings.TrimSpace`.
fn go_trim_space(s: &str) -> &str {
    s.trim_matches(go_is_space)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Unspecified,
    Local,
    Cloud,
}

/// `parseSourceSuffix`: the text after the last `:`, trimmed and lowercased, is `cloud` or
/// `local`; else, if the trimmed text holds no `/` and its lowercase form ends in `-cloud`,
/// those six bytes are cut from the trimmed text, which replaces the original suffix.
fn source_suffix(raw: &str) -> Option<(String, Source)> {
    let idx = raw.rfind(':')?;
    let suffix_raw = go_trim_space(&raw[idx + 1..]);
    let suffix = suffix_raw.to_lowercase();
    match suffix.as_str() {
        "cloud" => return Some((raw[..idx].to_string(), Source::Cloud)),
        "local" => return Some((raw[..idx].to_string(), Source::Local)),
        _ => {}
    }
    if !suffix_raw.contains('/') && suffix.ends_with("-cloud") {
        let keep = suffix_raw.len() - "-cloud".len();
        return Some((format!("{}{}", &raw[..=idx], &suffix_raw[..keep]), Source::Cloud));
    }
    None
}

/// `ParseRef`: trim, remove one suffix, refuse a second.
fn parse_ref(raw: &str) -> Option<(String, Source)> {
    let raw = go_trim_space(raw);
    if raw.is_empty() {
        return None;
    }
    match source_suffix(raw) {
        Some((base, source)) => source_suffix(&base).is_none().then_some((base, source)),
        None => Some((raw.to_string(), Source::Unspecified)),
    }
}

/// Go's `MissingPart`: what a cut leaves for an empty side (never a valid part).
const MISSING: &str = "!MISSING!";

/// `cutPromised`: cut at the last `sep`; an empty side becomes [`MISSING`].
fn cut_promised(s: &str, sep: char) -> Option<(String, String)> {
    let i = s.rfind(sep)?;
    let or_missing = |p: &str| if p.is_empty() { MISSING.to_string() } else { p.to_string() };
    Some((or_missing(&s[..i]), or_missing(&s[i + sep.len_utf8()..])))
}

#[derive(Debug, Default)]
struct Name {
    host: String,
    namespace: String,
    model: String,
    tag: String,
}

/// `ParseNameBare`.
fn parse_name_bare(s: &str) -> Name {
    let mut n = Name::default();
    let mut s = s.to_string();
    let last = |c: char| s.rfind(c).map_or(-1, |i| i as i64);
    if last(':') > last('/') {
        let (before, tag) = cut_promised(&s, ':').expect("a colon");
        s = before;
        n.tag = tag;
    }
    let Some((before, model)) = cut_promised(&s, '/') else {
        n.model = s;
        return n;
    };
    n.model = model;
    let Some((before, namespace)) = cut_promised(&before, '/') else {
        n.namespace = before;
        return n;
    };
    n.namespace = namespace;
    n.host = match before.split_once("://") {
        Some((_scheme, host)) => host.to_string(),
        None => before,
    };
    n
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Host,
    Namespace,
    Model,
    Tag,
}

/// `isValidPart`.
fn valid_part(kind: Part, s: &str) -> bool {
    let max = if kind == Part::Host { 350 } else { 80 };
    if s.is_empty() || s.len() > max {
        return false;
    }
    let alnum_ = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    s.bytes().enumerate().all(|(i, b)| match b {
        _ if i == 0 => alnum_(b),
        b'_' | b'-' => true,
        b'.' => kind != Part::Namespace,
        b':' => kind == Part::Host,
        _ => alnum_(b),
    })
}

/// How Ollama resolves `raw` on a route that uses `ParseRef` (inference, show, pull, delete,
/// create `from`), or `None` where it refuses the name.
pub fn resolve(raw: &str) -> Option<Resolved> {
    let (base, source) = parse_ref(raw)?;
    let mut n = parse_name_bare(&base);
    let or = |part: &mut String, default: &str| {
        if part.is_empty() {
            *part = default.to_string();
        }
    };
    or(&mut n.host, "registry.ollama.ai");
    or(&mut n.namespace, "library");
    or(&mut n.tag, "latest");
    let valid = valid_part(Part::Host, &n.host)
        && valid_part(Part::Namespace, &n.namespace)
        && valid_part(Part::Model, &n.model)
        && valid_part(Part::Tag, &n.tag);
    if !valid {
        return None;
    }
    let short = if !n.host.eq_ignore_ascii_case("registry.ollama.ai") {
        format!("{}/{}/{}:{}", n.host, n.namespace, n.model, n.tag)
    } else if !n.namespace.eq_ignore_ascii_case("library") {
        format!("{}/{}:{}", n.namespace, n.model, n.tag)
    } else {
        format!("{}:{}", n.model, n.tag)
    };
    Some(Resolved { short: short.to_ascii_lowercase(), cloud: source == Source::Cloud })
}

/// Compares butler with the model above on one string; panics on a disagreement.
///
/// - Where both accept a name, they resolve it alike (short form and cloud).
/// - Where Ollama accepts, butler accepts too, except for what SPEC §7.2 refuses on purpose
///   (`://`) and names over butler's 512-byte bound.
/// - Where Ollama refuses, butler may judge some name: Ollama then runs nothing.
/// - A name butler accepts, written as a pattern, matches it (a deny list can name any model
///   a client can).
pub fn check(raw: &str) {
    let ollama = resolve(raw);
    let butler = ModelName::parse(raw);
    match (&ollama, &butler) {
        (Some(o), Ok(b)) => {
            assert_eq!((b.short(), b.is_cloud()), (o.short.as_str(), o.cloud), "{raw:?}");
        }
        (Some(o), Err(_)) => {
            let exempt = raw.contains("://") || go_trim_space(raw).len() > 512;
            assert!(exempt, "Ollama resolves {raw:?} to {o:?}, butler refuses it");
        }
        (None, _) => {}
    }
    if let Ok(name) = &butler
        && !raw.contains('*')
    {
        let pattern = Pattern::parse(raw)
            .unwrap_or_else(|e| panic!("{raw:?} is a name but not a pattern: {e}"));
        assert!(pattern.matches(name), "pattern {raw:?} misses its own name");
    }
}
