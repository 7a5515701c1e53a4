//! Request-body inspection (SPEC §7.1): bytes in, facts out, no sockets.
//!
//! Inspection must read a body exactly as Ollama will, or a client can show
//! butler one request and Ollama another. Ollama decodes with Go's
//! `encoding/json`, which matches struct keys case-insensitively (with
//! Unicode folding: `ſ` is `s`, `K` (Kelvin) is `k`), lets the last duplicate
//! win, and *merges* duplicate objects into one map. Rather than imitate every
//! rule, butler refuses any object holding two keys that Go could treat as
//! the same field, then reads each field through the same folding. Anything
//! that is not exactly one JSON object — or holds a wrong type in a field
//! butler reads — is a 400 and is never forwarded: the parser fails closed.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Largest body butler parses (SPEC §7.3): beyond it, 413.
pub const MAX_INSPECTED: usize = 8 * 1024 * 1024;

/// A JSON value that keeps object keys in order (for faithful re-serialising)
/// and has already been checked for duplicate keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(Num),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// A JSON number as the parser produced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    U(u64),
    I(i64),
    F(f64),
}

impl Num {
    pub fn as_f64(self) -> f64 {
        match self {
            Num::U(n) => n as f64,
            Num::I(n) => n as f64,
            Num::F(f) => f,
        }
    }
}

impl fmt::Display for Num {
    /// Integers as integers (`8192.0` and `8.192e3` print as `8192`), others
    /// as the shortest float that round-trips.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Num::U(n) => write!(f, "{n}"),
            Num::I(n) => write!(f, "{n}"),
            Num::F(x) if x.fract() == 0.0 && x.abs() < 1e18 => write!(f, "{}", x as i64),
            Num::F(x) => write!(f, "{x}"),
        }
    }
}

/// Folds a key the way Go's `encoding/json` matches it against a field name.
/// Every field butler reads is ASCII, and the only non-ASCII characters that
/// fold onto ASCII letters are `ſ` (to `s`) and the Kelvin sign (to `k`).
pub fn fold_key(key: &str) -> String {
    key.chars().map(fold_char).collect()
}

fn fold_char(c: char) -> char {
    match c {
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    }
}

/// Whether `key` names the (ASCII, lowercase) field `field` for Go.
pub fn key_is(key: &str, field: &str) -> bool {
    if key.len() == field.len() {
        return key.eq_ignore_ascii_case(field);
    }
    // Only the 2- and 3-byte folding characters can make lengths differ;
    // any other non-ASCII character folds to itself and matches nothing.
    let mut expected = field.chars();
    key.chars().all(|c| expected.next() == Some(fold_char(c))) && expected.next().is_none()
}

impl Json {
    /// The value of field `name` in an object, as Go would read it. Because
    /// objects with folding duplicates are refused at parse time, at most one
    /// key matches. JSON `null` counts as absent, as in Go.
    pub fn field(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(entries) => entries
                .iter()
                .find(|(k, _)| key_is(k, name))
                .map(|(_, v)| v)
                .filter(|v| !matches!(v, Json::Null)),
            _ => None,
        }
    }

    /// The value under exactly `name` (Go maps such as `options` match keys
    /// exactly). `null` counts as absent.
    pub fn exact(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(entries) => entries
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v)
                .filter(|v| !matches!(v, Json::Null)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// Serialises compactly, keys in their original order.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Json::Number(Num::U(n)) => out.extend_from_slice(n.to_string().as_bytes()),
            Json::Number(Num::I(n)) => out.extend_from_slice(n.to_string().as_bytes()),
            Json::Number(Num::F(f)) => {
                // Finite by construction (the parser rejects out-of-range numbers).
                let _ = serde_json::to_writer(&mut *out, f);
            }
            Json::String(s) => {
                let _ = serde_json::to_writer(&mut *out, s);
            }
            Json::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write(out);
                }
                out.push(b']');
            }
            Json::Object(entries) => {
                out.push(b'{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let _ = serde_json::to_writer(&mut *out, k);
                    out.push(b':');
                    v.write(out);
                }
                out.push(b'}');
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

/// Marker in the error text so a duplicate key gets its own reason.
const DUPLICATE: &str = "butler: duplicate key";

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
        Ok(Json::Number(Num::U(n)))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
        Ok(Json::Number(Num::I(n)))
    }
    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Json, E> {
        if f.is_finite() {
            Ok(Json::Number(Num::F(f)))
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Json>()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries: Vec<(String, Json)> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(fold_key(&key)) {
                return Err(de::Error::custom(DUPLICATE));
            }
            let value = map.next_value::<Json>()?;
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}

/// Parses exactly one JSON object (surrounding whitespace allowed). The error
/// is the `<reason>` of a `400 bad request: <reason>`.
pub fn parse_object(body: &[u8]) -> Result<Json, &'static str> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("empty body");
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = Json::deserialize(&mut de).map_err(|e| {
        if e.to_string().starts_with(DUPLICATE) {
            "duplicate key"
        } else if e.to_string().starts_with("number out of range") {
            "number out of range"
        } else if e.to_string().starts_with("recursion limit") {
            "JSON nested too deeply"
        } else {
            "invalid JSON"
        }
    })?;
    de.end().map_err(|_| "trailing data after the JSON object")?;
    match value {
        Json::Object(_) => Ok(value),
        _ => Err("body must be a JSON object"),
    }
}

/// What kind of inspected route a body belongs to; decides which fields
/// carry model names, token limits and where a limit is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/api/chat`, `/api/generate`: limits in `options`.
    OllamaGenerate,
    /// `/api/embed`, `/api/embeddings`.
    OllamaEmbed,
    /// `/v1/chat/completions`, `/v1/completions`.
    OpenAiGenerate,
    /// `/v1/embeddings`.
    OpenAiEmbed,
    /// `/v1/responses`.
    Responses,
    /// `/v1/messages` (Anthropic).
    Messages,
    /// `/api/show`, `/api/pull`, `/api/push`, `/api/delete`: a model only.
    ModelOnly,
    /// `/api/copy`: `source` and `destination`.
    Copy,
    /// `/api/create`: `model` and `from`.
    Create,
}

impl Kind {
    /// Whether caps and prompt patterns apply (inference routes).
    pub fn is_inference(self) -> bool {
        !matches!(self, Kind::ModelOnly | Kind::Copy | Kind::Create)
    }

    /// The field that bounds generation on this route as Ollama reads it,
    /// which is where butler injects a cap.
    fn predict_field(self) -> Option<PredictField> {
        match self {
            Kind::OllamaGenerate => Some(PredictField::Options),
            Kind::OpenAiGenerate | Kind::Messages => Some(PredictField::Top("max_tokens")),
            Kind::Responses => Some(PredictField::Top("max_output_tokens")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PredictField {
    /// `options.num_predict` (a Go map: exact key).
    Options,
    /// A top-level struct field (Go folding).
    Top(&'static str),
}

/// A token-count limit the client asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// A number as sent (compared numerically, printed as sent).
    Value(Num),
    /// Below 1: no limit at all. Ollama treats a negative count as
    /// "generate until done" and its runners stop on a count only when it is
    /// above 0, so 0 (or a fraction Go truncates to 0) is unbounded too.
    Unbounded(Num),
}

/// The facts butler judges a request by.
#[derive(Debug)]
pub struct Request {
    pub kind: Kind,
    /// Model names the request refers to, as sent (not yet normalised).
    pub models: Vec<String>,
    /// Largest `num_ctx` asked for.
    pub num_ctx: Option<Num>,
    /// Largest generation limit asked for (over every field Ollama or the
    /// OpenAI/Anthropic layers read).
    pub predict: Option<Limit>,
    /// Whether the field Ollama actually honours on this route is set; if not,
    /// a `max_predict` cap is injected there.
    pub predict_effective: bool,
    /// Every string a prompt filter must see (SPEC §7.4).
    pub texts: Vec<String>,
    /// `keep_alive` in seconds as Ollama reads it (a number is seconds, a
    /// string a Go duration); negative means "keep loaded forever".
    pub keep_alive: Option<f64>,
    pub body: Json,
}

/// Keys whose string values are not prompt text (SPEC §7.4). A `role` is
/// skipped only when it is one of the standard roles: chat templates copy
/// the role into the prompt, so an invented one is scanned like any text.
const NOT_PROMPT: &[&str] = &["model", "name"];
const STANDARD_ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer", "function"];
/// Keys holding image data, skipped whole.
const IMAGE_KEYS: &[&str] = &["images", "image_url"];

/// Parses and reads an inspected body. The error is a `400` reason.
pub fn inspect(kind: Kind, body: &[u8]) -> Result<Request, String> {
    let json = parse_object(body)?;
    check_types(kind, &json)?;
    if kind == Kind::Create {
        check_create_types(&json)?;
    }

    let string_field = |name: &str| json.field(name).and_then(Json::as_str);
    let mut models = Vec::new();
    let model = string_field("model").filter(|m| !m.is_empty()).or_else(|| string_field("name"));
    match kind {
        Kind::Copy => {
            for field in ["source", "destination"] {
                match json.field(field) {
                    Some(Json::String(s)) if !s.is_empty() => models.push(s.clone()),
                    Some(Json::String(_)) | None => return Err(format!("{field} is required")),
                    Some(_) => return Err(format!("{field} must be a string")),
                }
            }
        }
        _ => match model {
            Some(m) if !m.is_empty() => models.push(m.to_owned()),
            _ => return Err("model is required".into()),
        },
    }
    if kind == Kind::Create {
        match json.field("from") {
            Some(Json::String(s)) if !s.is_empty() => models.push(s.clone()),
            Some(Json::String(_)) | None => {}
            Some(_) => return Err("from must be a string".into()),
        }
        // The legacy Modelfile text can name a base model with FROM; butler
        // cannot police it, so it is refused rather than passed through.
        if json.field("modelfile").is_some() {
            return Err("modelfile is not supported; use from".into());
        }
    }

    let options = json.field("options");
    let number = |v: Option<&Json>| -> Option<Num> {
        match v {
            Some(Json::Number(n)) => Some(*n),
            _ => None,
        }
    };
    let num_ctx = [number(options.and_then(|o| o.field("num_ctx"))), number(json.field("num_ctx"))]
        .into_iter()
        .flatten()
        .max_by(|a, b| a.as_f64().total_cmp(&b.as_f64()));

    let predict_values = [
        number(options.and_then(|o| o.field("num_predict"))),
        number(json.field("num_predict")),
        number(json.field("max_tokens")),
        number(json.field("max_completion_tokens")),
        number(json.field("max_output_tokens")),
    ];
    let predict = predict_values.into_iter().flatten().fold(None, |acc: Option<Limit>, n| {
        let this = if n.as_f64() < 1.0 { Limit::Unbounded(n) } else { Limit::Value(n) };
        match (acc, this) {
            (Some(Limit::Unbounded(a)), _) => Some(Limit::Unbounded(a)),
            (_, Limit::Unbounded(b)) => Some(Limit::Unbounded(b)),
            (Some(Limit::Value(a)), Limit::Value(b)) => {
                Some(Limit::Value(if b.as_f64() > a.as_f64() { b } else { a }))
            }
            (None, v) => Some(v),
        }
    });
    let predict_effective = match kind.predict_field() {
        Some(PredictField::Options) => options.and_then(|o| o.exact("num_predict")).is_some(),
        Some(PredictField::Top(name)) => json.field(name).is_some(),
        None => true,
    };

    let keep_alive = match json.field("keep_alive") {
        Some(Json::Number(n)) => Some(n.as_f64()),
        Some(Json::String(s)) => Some(
            go_duration_secs(s).ok_or_else(|| "keep_alive is not a valid duration".to_owned())?,
        ),
        _ => None,
    };

    let mut texts = Vec::new();
    collect_texts(&json, &mut texts);
    Ok(Request { kind, models, num_ctx, predict, predict_effective, texts, keep_alive, body: json })
}

/// Parses a Go `time.ParseDuration` string (`"5m"`, `"1h30m"`, `"-1s"`,
/// `"1.5h"`, `"0"`) into seconds, as Ollama reads a string `keep_alive`.
pub fn go_duration_secs(s: &str) -> Option<f64> {
    let (sign, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (-1.0, &s[1..]),
        Some(b'+') => (1.0, &s[1..]),
        _ => (1.0, s),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number = &rest[..digits];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(sign * total)
}

/// Type checks for every field butler reads (SPEC §7.1): a wrong type is a
/// 400 whatever the subject's policy.
fn check_types(kind: Kind, json: &Json) -> Result<(), String> {
    let wrong = |field: &str, what: &str| Err(format!("{field} must be {what}"));
    for field in ["model", "name"] {
        if let Some(v) = json.field(field)
            && !matches!(v, Json::String(_))
        {
            return wrong(field, "a string");
        }
    }
    for field in
        ["num_ctx", "num_predict", "max_tokens", "max_completion_tokens", "max_output_tokens"]
    {
        if let Some(v) = json.field(field)
            && !matches!(v, Json::Number(_))
        {
            return wrong(field, "a number");
        }
    }
    if let Some(options) = json.field("options") {
        let Json::Object(entries) = options else {
            return wrong("options", "an object");
        };
        for (k, v) in entries {
            if (key_is(k, "num_ctx") || key_is(k, "num_predict"))
                && !matches!(v, Json::Number(_) | Json::Null)
            {
                return Err(format!("options.{} must be a number", k.to_ascii_lowercase()));
            }
        }
    }
    if let Some(v) = json.field("keep_alive")
        && !matches!(v, Json::Number(_) | Json::String(_))
    {
        return wrong("keep_alive", "a number or a string");
    }
    if let Some(v) = json.field("stream")
        && !matches!(v, Json::Bool(_))
    {
        return wrong("stream", "a boolean");
    }
    if let Some(v) = json.field("messages")
        && !matches!(v, Json::Array(_))
    {
        return wrong("messages", "an array");
    }
    if let Some(v) = json.field("prompt")
        && !matches!(v, Json::String(_))
    {
        return wrong("prompt", "a string");
    }
    if let Some(v) = json.field("system") {
        let ok = match v {
            Json::String(_) => true,
            Json::Array(_) => kind == Kind::Messages,
            _ => false,
        };
        if !ok {
            return wrong("system", "a string");
        }
    }
    Ok(())
}

/// Collects every string value a prompt filter must see: all of them, in
/// known and unknown fields alike, except model names, roles and image data.
fn collect_texts(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::String(s) => out.push(s.clone()),
        Json::Array(items) => items.iter().for_each(|v| collect_texts(v, out)),
        Json::Object(entries) => {
            // An Anthropic/OpenAI base64 part: {"type":"base64","data":…}.
            let base64 = value.field("type").and_then(Json::as_str) == Some("base64");
            for (k, v) in entries {
                let standard_role =
                    key_is(k, "role") && v.as_str().is_some_and(|r| STANDARD_ROLES.contains(&r));
                let skip = standard_role
                    || NOT_PROMPT.iter().any(|f| key_is(k, f))
                    || IMAGE_KEYS.iter().any(|f| key_is(k, f))
                    || (base64 && key_is(k, "data"));
                if !skip {
                    collect_texts(v, out);
                }
            }
        }
        Json::Null | Json::Bool(_) | Json::Number(_) => {}
    }
}

/// For a streamed `/v1/chat/completions` whose client did not ask for usage:
/// the body with `stream_options.include_usage: true`, so Ollama reports the
/// tokens (SPEC §9; butler hides the extra chunk from the client). Edits
/// in place; false when nothing needed to change.
pub fn include_usage(body: &mut Json) -> bool {
    if !matches!(body.field("stream"), Some(Json::Bool(true))) {
        return false;
    }
    let options = body.field("stream_options");
    if options.and_then(|o| o.field("include_usage")) == Some(&Json::Bool(true)) {
        return false;
    }
    let Json::Object(entries) = body else { return false };
    let flag = ("include_usage".to_owned(), Json::Bool(true));
    match entries.iter_mut().find(|(k, _)| key_is(k, "stream_options")) {
        Some((_, Json::Object(options))) => {
            options.retain(|(k, _)| !key_is(k, "include_usage"));
            options.push(flag);
        }
        Some((_, slot)) => *slot = Json::Object(vec![flag]),
        None => entries.push(("stream_options".to_owned(), Json::Object(vec![flag]))),
    }
    true
}

/// Writes a generation cap of `value` where Ollama reads it for `kind`
/// (SPEC §7.3), in place; false if the route takes none.
pub fn inject_predict(kind: Kind, body: &mut Json, value: u64) -> bool {
    let Some(field) = kind.predict_field() else { return false };
    let Json::Object(entries) = body else { return false };
    let number = Json::Number(Num::U(value));
    match field {
        PredictField::Top(name) => {
            // Any folding variant present is null (else it would be effective).
            entries.retain(|(k, _)| !key_is(k, name));
            entries.push((name.to_owned(), number));
        }
        PredictField::Options => {
            match entries.iter_mut().find(|(k, _)| key_is(k, "options")) {
                Some((_, Json::Object(options))) => {
                    options.retain(|(k, _)| k != "num_predict");
                    options.push(("num_predict".to_owned(), number));
                }
                Some((_, slot)) => {
                    // `options: null` counts as absent.
                    *slot = Json::Object(vec![("num_predict".to_owned(), number)]);
                }
                None => entries.push((
                    "options".to_owned(),
                    Json::Object(vec![("num_predict".into(), number)]),
                )),
            }
        }
    }
    true
}

/// Type checks for the `/api/create` fields butler reads (SPEC §7.1, §7.3): `parameters` is
/// a Go `map[string]any`, so any value type decodes, but Ollama later loads `num_ctx` and
/// `num_predict` from it as numbers; `remote_host` is a string.
fn check_create_types(json: &Json) -> Result<(), String> {
    if let Some(parameters) = json.field("parameters") {
        let Json::Object(entries) = parameters else {
            return Err("parameters must be an object".into());
        };
        for (k, v) in entries {
            if (key_is(k, "num_ctx") || key_is(k, "num_predict"))
                && !matches!(v, Json::Number(_) | Json::Null)
            {
                return Err(format!("parameters.{} must be a number", k.to_ascii_lowercase()));
            }
        }
    }
    if let Some(v) = json.field("remote_host")
        && !matches!(v, Json::String(_))
    {
        return Err("remote_host must be a string".into());
    }
    Ok(())
}

/// `parameters.num_ctx` and `parameters.num_predict` of an `/api/create` body: the model's
/// defaults for every later request, so they are capped like a request's options (SPEC §7.3).
/// Keys are read case-insensitively although Ollama's map reads them exactly: a variant
/// Ollama ignores can only make butler stricter.
pub fn create_parameters(body: &Json) -> (Option<Num>, Option<Limit>) {
    let parameters = body.field("parameters");
    let number = |name: &str| match parameters.and_then(|p| p.field(name)) {
        Some(Json::Number(n)) => Some(*n),
        _ => None,
    };
    let predict = number("num_predict")
        .map(|n| if n.as_f64() < 1.0 { Limit::Unbounded(n) } else { Limit::Value(n) });
    (number("num_ctx"), predict)
}

/// Whether an `/api/create` body makes a model that runs on another host (`remote_host`):
/// Ollama then forwards every request for it there (ollama.com by default, on the host
/// owner's account), so it is a cloud model whatever its name. A `from` naming a cloud model
/// does the same and is caught as a cloud name.
pub fn creates_remote(req: &Request) -> bool {
    req.kind == Kind::Create
        && req.body.field("remote_host").and_then(Json::as_str).is_some_and(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(kind: Kind, body: &str) -> String {
        inspect(kind, body.as_bytes()).expect_err(body)
    }

    #[test]
    fn only_one_object_is_accepted() {
        let k = Kind::OllamaGenerate;
        assert_eq!(bad(k, ""), "empty body");
        assert_eq!(bad(k, "  \n"), "empty body");
        assert_eq!(bad(k, "nope"), "invalid JSON");
        assert_eq!(bad(k, "[{\"model\":\"a\"}]"), "body must be a JSON object");
        assert_eq!(bad(k, "\"x\""), "body must be a JSON object");
        assert_eq!(
            bad(k, r#"{"model":"denied","prompt":"hi"}x"#),
            "trailing data after the JSON object"
        );
        assert_eq!(bad(k, r#"{"model":"a"}{"model":"b"}"#), "trailing data after the JSON object");
        assert_eq!(bad(k, r#"{"model":"a","num_ctx":1e400}"#), "number out of range");
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(bad(k, &format!("{{\"model\":\"a\",\"x\":{deep}}}")), "JSON nested too deeply");
        assert!(inspect(k, b" {\"model\":\"a\"} \n").is_ok());
    }

    #[test]
    fn keys_that_go_would_merge_are_refused() {
        let k = Kind::OllamaGenerate;
        assert_eq!(bad(k, r#"{"model":"ok","MODEL":"denied"}"#), "duplicate key");
        assert_eq!(bad(k, r#"{"model":"ok","model":"denied"}"#), "duplicate key");
        assert_eq!(
            bad(k, r#"{"model":"a","options":{"num_ctx":9},"options":{}}"#),
            "duplicate key"
        );
        assert_eq!(
            bad(k, r#"{"model":"a","messages":[{"content":"x","Content":"y"}]}"#),
            "duplicate key"
        );
        // Kelvin sign and long s fold onto k and s in Go.
        assert_eq!(
            bad(k, "{\"model\":\"a\",\"max_to\u{212a}ens\":1,\"max_tokens\":2}"),
            "duplicate key"
        );
    }

    #[test]
    fn fields_are_read_as_go_reads_them() {
        let r = inspect(Kind::OllamaGenerate, br#"{"Model":"denied"}"#).unwrap();
        assert_eq!(r.models, ["denied"]);
        let r =
            inspect(Kind::OpenAiGenerate, "{\"model\":\"a\",\"max_to\u{212a}ens\":5}".as_bytes())
                .unwrap();
        assert_eq!(r.predict, Some(Limit::Value(Num::U(5))));
        assert!(r.predict_effective);
        // model wins over name; an empty model falls back to name.
        let r = inspect(Kind::ModelOnly, br#"{"model":"a","name":"b"}"#).unwrap();
        assert_eq!(r.models, ["a"]);
        let r = inspect(Kind::ModelOnly, br#"{"model":"","name":"b"}"#).unwrap();
        assert_eq!(r.models, ["b"]);
        let r = inspect(Kind::ModelOnly, br#"{"model":null,"name":"b"}"#).unwrap();
        assert_eq!(r.models, ["b"]);
        assert_eq!(bad(Kind::OllamaGenerate, r#"{"prompt":"hi"}"#), "model is required");
        assert_eq!(bad(Kind::OllamaGenerate, r#"{"model":""}"#), "model is required");
    }

    #[test]
    fn wrong_types_are_refused() {
        let k = Kind::OllamaGenerate;
        assert_eq!(bad(k, r#"{"model":"denied","num_ctx":"big"}"#), "num_ctx must be a number");
        assert_eq!(bad(k, r#"{"model":1}"#), "model must be a string");
        assert_eq!(bad(k, r#"{"model":"a","options":[]}"#), "options must be an object");
        assert_eq!(
            bad(k, r#"{"model":"a","options":{"num_predict":"9"}}"#),
            "options.num_predict must be a number"
        );
        assert_eq!(bad(k, r#"{"model":"a","stream":"yes"}"#), "stream must be a boolean");
        assert_eq!(bad(k, r#"{"model":"a","messages":{}}"#), "messages must be an array");
        assert_eq!(bad(k, r#"{"model":"a","prompt":["x"]}"#), "prompt must be a string");
        assert_eq!(
            bad(k, r#"{"model":"a","keep_alive":true}"#),
            "keep_alive must be a number or a string"
        );
        assert_eq!(bad(k, r#"{"model":"a","system":[]}"#), "system must be a string");
        assert!(
            inspect(Kind::Messages, br#"{"model":"a","system":[{"type":"text","text":"x"}]}"#)
                .is_ok()
        );
        assert!(inspect(k, br#"{"model":"a","num_ctx":null,"options":null}"#).is_ok());
    }

    #[test]
    fn caps_take_the_largest_value() {
        let r = inspect(
            Kind::OllamaGenerate,
            br#"{"model":"a","num_ctx":1,"options":{"num_ctx":999999.0}}"#,
        )
        .unwrap();
        assert_eq!(r.num_ctx.map(Num::as_f64), Some(999999.0));
        assert_eq!(r.num_ctx.unwrap().to_string(), "999999");
        let r = inspect(
            Kind::OllamaGenerate,
            br#"{"model":"a","max_tokens":99999,"options":{"num_predict":5}}"#,
        )
        .unwrap();
        assert_eq!(r.predict, Some(Limit::Value(Num::U(99999))));
        let r = inspect(
            Kind::OllamaGenerate,
            br#"{"model":"a","options":{"num_predict":-1},"max_tokens":3}"#,
        )
        .unwrap();
        assert!(matches!(r.predict, Some(Limit::Unbounded(_))));
        let r = inspect(Kind::OllamaGenerate, br#"{"model":"a","num_ctx":1e4}"#).unwrap();
        assert_eq!(r.num_ctx.unwrap().to_string(), "10000");
    }

    #[test]
    fn effective_predict_field_per_route() {
        let r = inspect(Kind::OllamaGenerate, br#"{"model":"a","num_predict":5}"#).unwrap();
        assert!(!r.predict_effective, "top-level num_predict is ignored by Ollama");
        let r =
            inspect(Kind::OllamaGenerate, br#"{"model":"a","options":{"NUM_PREDICT":5}}"#).unwrap();
        assert!(!r.predict_effective, "options is a map: keys are exact");
        let r =
            inspect(Kind::OllamaGenerate, br#"{"model":"a","options":{"num_predict":5}}"#).unwrap();
        assert!(r.predict_effective);
        let r = inspect(Kind::Responses, br#"{"model":"a","max_output_tokens":5}"#).unwrap();
        assert!(r.predict_effective);
        let r = inspect(Kind::OpenAiEmbed, br#"{"model":"a","input":"x"}"#).unwrap();
        assert!(r.predict_effective);
    }

    #[test]
    fn injection_writes_where_ollama_reads() {
        let chat = br#"{"model":"a","messages":[],"options":{"temperature":0}}"#;
        let inject = |kind, body: &[u8], value| {
            let mut r = inspect(kind, body).unwrap();
            inject_predict(r.kind, &mut r.body, value).then(|| r.body.to_bytes())
        };
        let out = inject(Kind::OllamaGenerate, chat, 256).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"a","messages":[],"options":{"temperature":0,"num_predict":256}}"#
        );
        let out = inject(Kind::OllamaGenerate, br#"{"model":"a","options":null}"#, 7).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"model":"a","options":{"num_predict":7}}"#);
        let body = br#"{"model":"a","max_tokens":null,"x":1.5}"#;
        let out = inject(Kind::OpenAiGenerate, body, 256).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"model":"a","x":1.5,"max_tokens":256}"#);
        assert!(inject(Kind::OpenAiEmbed, br#"{"model":"a"}"#, 1).is_none());
    }

    #[test]
    fn prompt_texts_cover_every_string_but_names_and_images() {
        let body = r#"{"model":"m","system":"S","messages":[{"role":"user","content":[
            {"type":"text","text":"T"},{"type":"image_url","image_url":{"url":"data:IMG"}}],
            "images":["B64"]}],"unknown":{"deep":["U"]},"Prompt":"P",
            "source":{"type":"base64","data":"D","media_type":"image/png"}}"#;
        let r = inspect(Kind::OpenAiGenerate, body.as_bytes()).unwrap();
        let texts: Vec<&str> = r.texts.iter().map(String::as_str).collect();
        assert_eq!(texts, ["S", "text", "T", "image_url", "U", "P", "base64", "image/png"]);
        let body = br#"{"model":"m","messages":[{"role":"the plan","content":"x"}]}"#;
        let r = inspect(Kind::OllamaGenerate, body).unwrap();
        assert_eq!(r.texts, ["the plan", "x"], "an invented role is prompt text");
    }

    #[test]
    fn copy_and_create_name_every_model() {
        let r = inspect(Kind::Copy, br#"{"source":"denied","destination":"ok"}"#).unwrap();
        assert_eq!(r.models, ["denied", "ok"]);
        assert_eq!(bad(Kind::Copy, r#"{"source":"a"}"#), "destination is required");
        let r = inspect(Kind::Create, br#"{"model":"new","from":"base"}"#).unwrap();
        assert_eq!(r.models, ["new", "base"]);
        assert_eq!(
            bad(Kind::Create, r#"{"model":"new","modelfile":"FROM x"}"#),
            "modelfile is not supported; use from"
        );
    }

    #[test]
    fn create_parameters_are_read_and_type_checked() {
        let body =
            br#"{"model":"m","parameters":{"num_ctx":8192.0,"NUM_PREDICT":-1,"stop":["x"]}}"#;
        let r = inspect(Kind::Create, body).unwrap();
        let (ctx, predict) = create_parameters(&r.body);
        assert_eq!(ctx.map(Num::as_f64), Some(8192.0));
        assert!(matches!(predict, Some(Limit::Unbounded(_))));
        let r = inspect(Kind::Create, br#"{"model":"m","parameters":null}"#).unwrap();
        assert_eq!(create_parameters(&r.body), (None, None));
        assert_eq!(
            bad(Kind::Create, r#"{"model":"m","parameters":[]}"#),
            "parameters must be an object"
        );
        assert_eq!(
            bad(Kind::Create, r#"{"model":"m","parameters":{"num_ctx":"131072"}}"#),
            "parameters.num_ctx must be a number"
        );
        assert_eq!(
            bad(Kind::Create, r#"{"model":"m","Parameters":{"num_predict":true}}"#),
            "parameters.num_predict must be a number"
        );
        assert_eq!(
            bad(Kind::Create, r#"{"model":"m","remote_host":1}"#),
            "remote_host must be a string"
        );
        // Only /api/create reads them.
        assert!(inspect(Kind::OllamaGenerate, br#"{"model":"m","parameters":[]}"#).is_ok());
        let r = inspect(Kind::Create, br#"{"model":"m","remote_host":"ollama.com"}"#).unwrap();
        assert!(creates_remote(&r));
        let r = inspect(Kind::Create, br#"{"model":"m","remote_host":""}"#).unwrap();
        assert!(!creates_remote(&r));
        let r = inspect(Kind::ModelOnly, br#"{"model":"m","remote_host":"ollama.com"}"#).unwrap();
        assert!(!creates_remote(&r));
    }

    #[test]
    fn keep_alive_is_read_as_ollama_reads_it() {
        let ka = |body: &str| inspect(Kind::OllamaGenerate, body.as_bytes()).map(|r| r.keep_alive);
        assert_eq!(ka(r#"{"model":"a","keep_alive":300}"#), Ok(Some(300.0)));
        assert_eq!(ka(r#"{"model":"a","keep_alive":"5m"}"#), Ok(Some(300.0)));
        assert_eq!(ka(r#"{"model":"a","keep_alive":"1h30m"}"#), Ok(Some(5400.0)));
        assert_eq!(ka(r#"{"model":"a","keep_alive":"-1"}"#).ok(), None, "Go needs a unit");
        assert_eq!(ka(r#"{"model":"a","keep_alive":"-1s"}"#), Ok(Some(-1.0)));
        assert_eq!(ka(r#"{"model":"a","keep_alive":-1}"#), Ok(Some(-1.0)));
        assert_eq!(ka(r#"{"model":"a"}"#), Ok(None));
        for bad in ["", "5", "5 m", "m", "1.2.3s", "5w"] {
            assert_eq!(go_duration_secs(bad), None, "{bad}");
        }
        assert_eq!(go_duration_secs("0"), Some(0.0));
        assert_eq!(go_duration_secs("1.5h"), Some(5400.0));
        assert_eq!(go_duration_secs("300ms"), Some(0.3));
    }

    #[test]
    fn usage_is_requested_for_streamed_chat_completions() {
        let with_usage = |s: &str| {
            let mut json = parse_object(s.as_bytes()).unwrap();
            include_usage(&mut json).then(|| json.to_bytes())
        };
        assert_eq!(
            with_usage(r#"{"model":"m","stream":true}"#).unwrap(),
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            with_usage(r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#)
                .unwrap(),
            br#"{"stream":true,"stream_options":{"x":1,"include_usage":true}}"#
        );
        assert!(with_usage(r#"{"stream":true,"stream_options":{"include_usage":true}}"#).is_none());
        assert!(with_usage(r#"{"stream":false}"#).is_none());
        assert!(with_usage(r#"{"model":"m"}"#).is_none());
    }

    #[test]
    fn folding() {
        assert!(key_is("MODEL", "model"));
        assert!(key_is("max_to\u{212a}ens", "max_tokens"));
        assert!(key_is("\u{17f}tream", "stream"));
        assert!(!key_is("modelx", "model"));
        assert!(!key_is("mod\u{e9}l", "model"));
        assert_eq!(fold_key("\u{17f}TREAM"), "stream");
    }
}
