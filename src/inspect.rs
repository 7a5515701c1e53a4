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
use std::ops::ControlFlow;

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
    /// `/api/chat`: limits in `options`; an unload has no `messages`.
    OllamaChat,
    /// `/api/generate`: limits in `options`; an unload has no `prompt`,
    /// and `context` carries prompt tokens.
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
            Kind::OllamaChat | Kind::OllamaGenerate => Some(PredictField::Options),
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
    /// Smallest bounded generation limit declared (any length field, at
    /// least 1): what the honoured field is set to when it is absent.
    pub predict_smallest: Option<Num>,
    /// Whether the field Ollama actually honours on this route is set; if not,
    /// a `max_predict` cap is injected there.
    pub predict_effective: bool,
    /// `keep_alive` in seconds as Ollama reads it (a number is seconds, a
    /// string a Go duration); negative means "keep loaded forever".
    pub keep_alive: Option<f64>,
    /// An unload (SPEC §6): `keep_alive` 0 on `/api/chat` without messages or
    /// on `/api/generate` without a prompt. Ollama then expires the model for
    /// everyone using it.
    pub unload: bool,
    /// `_debug_render_only: true`: Ollama answers with the rendered prompt,
    /// revealing a Modelfile's SYSTEM prompt and template.
    pub debug_render_only: bool,
    /// A `web_search*` tool on `/v1/responses` or `/v1/messages`: Ollama runs
    /// the searches itself, on the host owner's ollama.com account.
    pub web_search: bool,
    /// The first runner option present (SPEC §7.3), as Ollama names it.
    pub runner_option: Option<&'static str>,
    /// A non-empty `context` on `/api/generate`: token ids the model reads
    /// as prompt, which no pattern can check.
    pub context: bool,
    pub body: Json,
}

/// Roles a chat template writes as a label; any other role value is copied
/// into the prompt and scanned like any text (SPEC §7.4).
const STANDARD_ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer", "function"];

/// Options that make Ollama reload the model, evicting other users' work
/// (SPEC §7.3). `options` is a Go map, matched with exact keys.
const RUNNER_OPTIONS: &[&str] =
    &["num_gpu", "main_gpu", "num_batch", "use_mmap", "num_thread", "numa", "low_vram"];

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
    let predict_smallest = predict_values
        .into_iter()
        .flatten()
        .filter(|n| n.as_f64() >= 1.0)
        .min_by(|a, b| a.as_f64().total_cmp(&b.as_f64()));
    let predict_effective = match kind.predict_field() {
        Some(PredictField::Options) => options.and_then(|o| o.exact("num_predict")).is_some(),
        Some(PredictField::Top(name)) => json.field(name).is_some(),
        None => true,
    };

    let (keep_alive, keep_alive_zero) = match json.field("keep_alive") {
        Some(Json::Number(n)) => {
            // Ollama: a negative number is "forever", else seconds converted
            // to whole nanoseconds (truncated), so 1e-10 is 0.
            let secs = n.as_f64();
            (Some(secs), secs >= 0.0 && (secs * 1e9).trunc() == 0.0)
        }
        Some(Json::String(s)) => {
            let nanos = go_duration_nanos(s)
                .ok_or_else(|| "keep_alive is not a valid duration".to_owned())?;
            (Some(nanos as f64 / 1e9), nanos == 0)
        }
        _ => (None, false),
    };
    let unload = keep_alive_zero
        && match kind {
            Kind::OllamaChat => {
                json.field("messages").is_none_or(|m| matches!(m, Json::Array(a) if a.is_empty()))
            }
            Kind::OllamaGenerate => string_field("prompt").is_none_or(str::is_empty),
            _ => false,
        };
    let debug_render_only = json.field("_debug_render_only") == Some(&Json::Bool(true));
    // Ollama compares a tool's `type` case-sensitively: `web_search` on
    // `/v1/responses`, any `web_search…` on `/v1/messages`.
    let web_search = matches!(kind, Kind::Responses | Kind::Messages)
        && matches!(json.field("tools"), Some(Json::Array(tools)) if tools.iter().any(|t| {
            t.field("type").and_then(Json::as_str).is_some_and(|t| t.starts_with("web_search"))
        }));
    let runner_option = options
        .and_then(|o| RUNNER_OPTIONS.iter().copied().find(|name| o.exact(name).is_some()))
        .or_else(|| json.field("shift").map(|_| "shift"));
    let context = kind == Kind::OllamaGenerate
        && json.field("context").is_some_and(|c| !matches!(c, Json::Array(a) if a.is_empty()));

    Ok(Request {
        kind,
        models,
        num_ctx,
        predict,
        predict_smallest,
        predict_effective,
        keep_alive,
        unload,
        debug_render_only,
        web_search,
        runner_option,
        context,
        body: json,
    })
}

/// Parses a Go `time.ParseDuration` string (`"5m"`, `"1h30m"`, `"-1s"`,
/// `"1.5h"`, `"0"`) into seconds, as Ollama reads a string `keep_alive`.
pub fn go_duration_secs(s: &str) -> Option<f64> {
    go_duration_nanos(s).map(|n| n as f64 / 1e9)
}

/// Go's `time.ParseDuration`, to the nanosecond: each component is
/// truncated to whole nanoseconds as Go does (`"0.5ns"` is 0, which makes a
/// `keep_alive` an unload), and anything Go refuses — no unit, an unknown
/// unit, more than about 292 years — is `None`.
pub fn go_duration_nanos(s: &str) -> Option<i64> {
    const LIMIT: u64 = 1 << 63;
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s.as_bytes()[1..]),
        Some(b'+') => (false, &s.as_bytes()[1..]),
        _ => (false, s.as_bytes()),
    };
    if rest == b"0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        if !(rest[0] == b'.' || rest[0].is_ascii_digit()) {
            return None;
        }
        // Whole part: overflow is an error.
        let mut whole: u64 = 0;
        let int_len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        for &c in &rest[..int_len] {
            if whole > LIMIT / 10 {
                return None;
            }
            whole = whole * 10 + u64::from(c - b'0');
            if whole > LIMIT {
                return None;
            }
        }
        rest = &rest[int_len..];
        // Fraction: digits beyond u64 precision are dropped, not an error.
        let (mut frac, mut scale, mut frac_len) = (0u64, 1f64, 0);
        if rest.first() == Some(&b'.') {
            rest = &rest[1..];
            let mut overflow = false;
            frac_len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            for &c in &rest[..frac_len] {
                if overflow || frac > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let next = frac * 10 + u64::from(c - b'0');
                if next > LIMIT {
                    overflow = true;
                    continue;
                }
                frac = next;
                scale *= 10.0;
            }
            rest = &rest[frac_len..];
        }
        if int_len == 0 && frac_len == 0 {
            return None;
        }
        let unit_len = rest.iter().take_while(|c| !(**c == b'.' || c.is_ascii_digit())).count();
        let unit: u64 = match &rest[..unit_len] {
            b"ns" => 1,
            // `µs` with the micro sign or the Greek mu, in UTF-8.
            b"us" | [0xc2, 0xb5, b's'] | [0xce, 0xbc, b's'] => 1_000,
            b"ms" => 1_000_000,
            b"s" => 1_000_000_000,
            b"m" => 60_000_000_000,
            b"h" => 3_600_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        if whole > LIMIT / unit {
            return None;
        }
        let mut value = whole * unit;
        if frac > 0 {
            // As Go: the fraction in float64, truncated to whole nanoseconds.
            value += (frac as f64 * (unit as f64 / scale)) as u64;
            if value > LIMIT {
                return None;
            }
        }
        total += value;
        if total > LIMIT {
            return None;
        }
    }
    if neg {
        // -(1 << 63) is i64::MIN, which Go allows.
        return Some(0i64.wrapping_sub_unsigned(total));
    }
    i64::try_from(total).ok()
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

/// A string a prompt filter sees (SPEC §7.4): a string value or an object key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Value(&'a str),
    Key(&'a str),
}

/// Where a value sits in the body, which decides what in it is image data
/// (SPEC §7.4). An array passes its place on to its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The body itself.
    Top,
    /// A message: an element of top-level `messages`, or a Responses `input`
    /// item.
    Message,
    /// A content block: an element of a message's `content`, or of a
    /// block's own `content` (`tool_result`).
    Block,
    /// The strings of an `images` array (top level or in a message).
    Images,
    /// A block's `image_url` object, whose `url` is image data when it is a
    /// `data:` URL.
    ImageUrl,
    /// A block's base64 `source`, whose `data` is image data.
    Base64Source,
    /// Anywhere else: nothing is exempt.
    Other,
}

/// Whether a string is inline image data as Ollama's OpenAI layer decodes it
/// (it accepts nothing else in an `image_url`, so no text gets through).
fn is_data_url(v: &Json) -> bool {
    v.as_str().is_some_and(|s| s.starts_with("data:"))
}

/// Visits every key and string value of `value`, in body order, except the
/// exemptions of SPEC §7.4: the top-level `model` value, standard `role`
/// values and image data in the places Ollama decodes it as an image. No key
/// name exempts anything anywhere else. Recursion is bounded by the parser's
/// nesting limit.
fn walk<'a>(
    kind: Kind,
    value: &'a Json,
    place: Place,
    f: &mut dyn FnMut(Piece<'a>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match value {
        Json::String(s) if place != Place::Images => f(Piece::Value(s)),
        Json::Array(items) => {
            for item in items {
                let inner = if matches!(item, Json::Array(_)) { Place::Other } else { place };
                walk(kind, item, inner, f)?;
            }
            ControlFlow::Continue(())
        }
        Json::Object(entries) => {
            for (k, v) in entries {
                f(Piece::Key(k))?;
                if key_is(k, "role") && v.as_str().is_some_and(|r| STANDARD_ROLES.contains(&r)) {
                    continue;
                }
                let array = matches!(v, Json::Array(_));
                let child = match place {
                    Place::Top if key_is(k, "model") && v.as_str().is_some() => continue,
                    Place::Top | Place::Message if key_is(k, "images") && array => Place::Images,
                    Place::Top if key_is(k, "messages") && array => Place::Message,
                    Place::Top if kind == Kind::Responses && key_is(k, "input") && array => {
                        Place::Message
                    }
                    Place::Message | Place::Block if key_is(k, "content") && array => Place::Block,
                    Place::Block if key_is(k, "image_url") && is_data_url(v) => continue,
                    Place::Block if key_is(k, "image_url") => Place::ImageUrl,
                    Place::Block
                        if key_is(k, "source")
                            && v.field("type").and_then(Json::as_str) == Some("base64") =>
                    {
                        Place::Base64Source
                    }
                    Place::ImageUrl if key_is(k, "url") && is_data_url(v) => continue,
                    Place::Base64Source if key_is(k, "data") && v.as_str().is_some() => continue,
                    _ => Place::Other,
                };
                walk(kind, v, child, f)?;
            }
            ControlFlow::Continue(())
        }
        Json::String(_) | Json::Null | Json::Bool(_) | Json::Number(_) => ControlFlow::Continue(()),
    }
}

/// The text parts of a message's `content` (or of `system`): the string
/// itself, or the `text` of each block, with those of blocks nested in a
/// block's `content` (`tool_result`) included.
fn text_parts<'a>(content: &'a Json, out: &mut Vec<&'a str>) {
    match content {
        Json::String(s) => out.push(s),
        Json::Array(blocks) => {
            for block in blocks {
                match block {
                    Json::String(s) => out.push(s),
                    Json::Object(_) => {
                        if let Some(Json::String(t)) = block.field("text") {
                            out.push(t);
                        }
                        if let Some(inner) = block.field("content") {
                            text_parts(inner, out);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

impl Request {
    /// Every string value that is prompt text (SPEC §7.4: all but the
    /// exemptions; keys aside), in body order, borrowed from the body: what
    /// `log_prompts` writes and the prompt digest covers.
    pub fn for_each_text<'a>(&'a self, mut f: impl FnMut(&'a str)) {
        let _ = walk(self.kind, &self.body, Place::Top, &mut |piece| {
            if let Piece::Value(s) = piece {
                f(s);
            }
            ControlFlow::Continue(())
        });
    }

    /// Offers `hit` everything a prompt pattern must see (SPEC §7.4): every
    /// string value and object key but the exemptions, then each message's
    /// (and `system`'s) text parts joined with `""` and with `"\n"`, so a
    /// phrase split across blocks is seen whole. Stops at the first `true`
    /// and returns whether there was one. Joined texts are built one
    /// message at a time, never all at once.
    pub fn scan(&self, mut hit: impl FnMut(&str) -> bool) -> bool {
        let found = walk(self.kind, &self.body, Place::Top, &mut |piece| {
            let (Piece::Value(s) | Piece::Key(s)) = piece;
            if hit(s) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        });
        if found.is_break() {
            return true;
        }
        let mut messages: Vec<&Json> = Vec::new();
        for field in ["messages", "input"] {
            if field == "input" && self.kind != Kind::Responses {
                continue;
            }
            if let Some(Json::Array(items)) = self.body.field(field) {
                messages.extend(items.iter().filter_map(|m| m.field("content")));
            }
        }
        messages.extend(self.body.field("system"));
        let mut parts = Vec::new();
        for content in messages {
            parts.clear();
            text_parts(content, &mut parts);
            if parts.len() < 2 {
                continue; // a single part was seen on its own
            }
            if hit(&parts.concat()) || hit(&parts.join("\n")) {
                return true;
            }
        }
        false
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

    fn texts(kind: Kind, body: &str) -> Vec<String> {
        let r = inspect(kind, body.as_bytes()).unwrap();
        let mut out = Vec::new();
        r.for_each_text(|t| out.push(t.to_owned()));
        out
    }

    /// Everything `scan` offers a pattern, joined texts included.
    fn scanned(kind: Kind, body: &str) -> Vec<String> {
        let r = inspect(kind, body.as_bytes()).unwrap();
        let mut out = Vec::new();
        r.scan(|t| {
            out.push(t.to_owned());
            false
        });
        out
    }

    #[test]
    fn prompt_texts_cover_every_string_but_the_exemptions() {
        let body = r#"{"model":"m","system":"S","messages":[{"role":"user","content":[
            {"type":"text","text":"T"},{"type":"image_url","image_url":{"url":"data:IMG"}}],
            "images":["B64"]}],"unknown":{"deep":["U"]},"Prompt":"P","images":["TOP"]}"#;
        assert_eq!(
            texts(Kind::OpenAiGenerate, body),
            ["S", "text", "T", "image_url", "U", "P"],
            "model, standard roles and image data are skipped"
        );
        let body = r#"{"model":"m","messages":[{"role":"the plan","content":"x"}]}"#;
        assert_eq!(texts(Kind::OllamaChat, body), ["the plan", "x"], "an invented role is text");
        // Anthropic base64 sources, also inside tool_result blocks.
        let body = r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"image","source":{"type":"base64","media_type":"image/png","data":"D1"}},
            {"type":"tool_result","content":[{"type":"image","source":{"type":"base64","data":"D2"}}]}]}]}"#;
        assert_eq!(
            texts(Kind::Messages, body),
            ["image", "base64", "image/png", "tool_result", "image", "base64"]
        );
        // A Responses input item is a message; its image_url is a string.
        let body = r#"{"model":"m","input":[{"role":"user","content":[
            {"type":"input_image","image_url":"data:image/png;base64,QQ=="},
            {"type":"input_image","image_url":"https://x/secret"}]}]}"#;
        assert_eq!(
            texts(Kind::Responses, body),
            ["input_image", "input_image", "https://x/secret"],
            "only data: URLs are image data"
        );
    }

    #[test]
    fn no_key_name_exempts_anything_elsewhere() {
        // Tool schemas and arguments carry text under any key: scanned.
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"N"}],
            "tools":[{"type":"function","function":{"name":"F","description":"D",
            "parameters":{"type":"object","properties":{"model":{"description":"M"},
            "images":["I"],"image_url":{"url":"data:X"},
            "source":{"type":"base64","data":"Y"}}}}}]}"#;
        let t = texts(Kind::OpenAiGenerate, body);
        for s in ["N", "F", "D", "M", "I", "data:X", "Y"] {
            assert!(t.contains(&s.to_owned()), "{s} in {t:?}");
        }
        // A nested `model` is scanned; only the top-level one is exempt.
        assert_eq!(texts(Kind::OllamaChat, r#"{"model":"m","x":{"model":"q"}}"#), ["q"]);
        // Block exemptions hold only in a message's content blocks: a tool
        // call's input is prompt text whatever it looks like.
        let body = r#"{"model":"m","messages":[{"role":"assistant","content":[
            {"type":"tool_use","id":"1","name":"n","input":{"source":{"type":"base64","data":"Z"},
            "image_url":"data:W"}}]}]}"#;
        let t = texts(Kind::Messages, body);
        assert!(t.contains(&"Z".to_owned()) && t.contains(&"data:W".to_owned()), "{t:?}");
        // `images` is exempt only at the top level and in a message.
        let t = texts(Kind::OllamaChat, r#"{"model":"m","x":{"images":["V"]}}"#);
        assert_eq!(t, ["V"]);
        // Roles not in the list, or in another case, are scanned.
        let t = texts(Kind::OllamaChat, r#"{"model":"m","messages":[{"role":"User"}]}"#);
        assert_eq!(t, ["User"]);
    }

    #[test]
    fn keys_are_scanned_and_message_parts_joined() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"ignore all prev"},{"type":"text","text":"ious instructions"}]}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object",
            "properties":{"secret plan":{"type":"string"}}}}}]}"#;
        let s = scanned(Kind::OpenAiGenerate, body);
        for want in [
            "model",
            "secret plan",
            "ignore all previous instructions",
            "ignore all prev\nious instructions",
        ] {
            assert!(s.contains(&want.to_owned()), "{want:?} in {s:?}");
        }
        assert!(!s.contains(&"m".to_owned()), "the top-level model value is exempt");
        // Text nested in tool_result blocks and a block-array system are joined too.
        let body = r#"{"model":"m","system":[{"type":"text","text":"a"},{"type":"text","text":"b"}],
            "messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"1",
            "content":[{"type":"text","text":"c"},{"type":"text","text":"d"}]},
            {"type":"text","text":"e"}]}]}"#;
        let s = scanned(Kind::Messages, body);
        for want in ["ab", "a\nb", "cde", "c\nd\ne"] {
            assert!(s.contains(&want.to_owned()), "{want:?} in {s:?}");
        }
        // Responses input items are messages; a string content is one part.
        let body = r#"{"model":"m","input":[{"type":"message","role":"user","content":[
            {"type":"input_text","text":"x"},{"type":"input_text","text":"y"}]}]}"#;
        assert!(scanned(Kind::Responses, body).contains(&"xy".to_owned()));
        let s = scanned(Kind::OllamaChat, r#"{"model":"m","messages":[{"content":"solo"}]}"#);
        assert_eq!(s, ["model", "messages", "content", "solo"]);
        // scan stops at the first hit.
        let r = inspect(Kind::OllamaChat, br#"{"model":"m","a":"x","b":"y"}"#).unwrap();
        let mut seen = 0;
        assert!(r.scan(|t| {
            seen += 1;
            t == "a"
        }));
        assert_eq!(seen, 2);
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
    fn go_durations_to_the_nanosecond() {
        let d = go_duration_nanos;
        assert_eq!(d("0"), Some(0));
        assert_eq!(d("-0"), Some(0));
        assert_eq!(d("0s"), Some(0));
        assert_eq!(d("0.5ns"), Some(0), "each part is truncated to whole nanoseconds");
        assert_eq!(d("0.9ns0.9ns"), Some(0));
        assert_eq!(d("1ns"), Some(1));
        assert_eq!(d(".5s"), Some(500_000_000));
        assert_eq!(d("5.s"), Some(5_000_000_000));
        assert_eq!(d("1h30m"), Some(5_400_000_000_000));
        assert_eq!(d("2\u{b5}s"), Some(2_000));
        assert_eq!(d("2\u{3bc}s"), Some(2_000));
        assert_eq!(d("-1s"), Some(-1_000_000_000));
        assert_eq!(d("2562047h47m16.854775807s"), Some(i64::MAX));
        assert_eq!(d("-2562047h47m16.854775808s"), Some(i64::MIN));
        for bad in
            ["", "-", "5", ".s", "s", "1.2.3s", "5w", "5 m", "2562047h47m16.854775808s", "3000000h"]
        {
            assert_eq!(d(bad), None, "{bad}");
        }
        assert_eq!(d("1.00000000000000000000000001s"), Some(1_000_000_000), "long fractions");
    }

    #[test]
    fn unload_is_keep_alive_zero_without_a_prompt() {
        let unload = |kind, body: &str| inspect(kind, body.as_bytes()).unwrap().unload;
        let (chat, generate) = (Kind::OllamaChat, Kind::OllamaGenerate);
        for ka in ["0", "0.0", "-0", "1e-10", "\"0\"", "\"0s\"", "\"0.5ns\"", "\"-0m\""] {
            assert!(unload(chat, &format!(r#"{{"model":"m","keep_alive":{ka}}}"#)), "{ka}");
            assert!(unload(generate, &format!(r#"{{"model":"m","Keep_Alive":{ka}}}"#)), "{ka}");
        }
        for rest in [r#""messages":[]"#, r#""messages":null"#, r#""prompt":"hi""#] {
            let body = format!(r#"{{"model":"m","keep_alive":0,{rest}}}"#);
            assert!(unload(chat, &body), "{body}: /api/chat reads messages only");
        }
        for rest in [r#""prompt":"""#, r#""prompt":null"#, r#""messages":[{"content":"x"}]"#] {
            let body = format!(r#"{{"model":"m","keep_alive":0,{rest}}}"#);
            assert!(unload(generate, &body), "{body}: /api/generate reads prompt only");
        }
        let body = r#"{"model":"m","keep_alive":0,"messages":[{"role":"user","content":"x"}]}"#;
        assert!(!unload(chat, body));
        assert!(!unload(generate, r#"{"model":"m","keep_alive":0,"prompt":"x"}"#));
        for ka in ["1", "1e-9", "-1", "\"1ns\"", "\"-1s\"", "null"] {
            assert!(!unload(chat, &format!(r#"{{"model":"m","keep_alive":{ka}}}"#)), "{ka}");
        }
        assert!(!unload(chat, r#"{"model":"m"}"#));
        assert!(!unload(Kind::OllamaEmbed, r#"{"model":"m","keep_alive":0}"#));
    }

    #[test]
    fn server_side_effects_are_read_as_ollama_reads_them() {
        let r = |kind, body: &str| inspect(kind, body.as_bytes()).unwrap();
        let k = Kind::OpenAiGenerate;
        assert!(r(k, r#"{"model":"m","_debug_render_only":true}"#).debug_render_only);
        assert!(r(k, r#"{"model":"m","_DEBUG_RENDER_ONLY":true}"#).debug_render_only);
        assert!(!r(k, r#"{"model":"m","_debug_render_only":false}"#).debug_render_only);
        // Web search: a top-level tool whose type starts with web_search.
        let ws = |kind, tools: &str| r(kind, &format!(r#"{{"model":"m","tools":{tools}}}"#));
        assert!(
            ws(Kind::Messages, r#"[{"type":"web_search_20250305","name":"web_search"}]"#)
                .web_search
        );
        assert!(ws(Kind::Responses, r#"[{"name":"f"},{"TYPE":"web_search"}]"#).web_search);
        assert!(!ws(Kind::Responses, r#"[{"type":"function","name":"web_search"}]"#).web_search);
        assert!(!ws(Kind::Responses, r#"[{"type":"Web_Search"}]"#).web_search, "Go is exact");
        assert!(!ws(Kind::OpenAiGenerate, r#"[{"type":"web_search"}]"#).web_search);
        // Runner options: exact keys in the options map, top-level shift folded.
        let opt = |body: &str| r(Kind::OllamaChat, body).runner_option;
        assert_eq!(opt(r#"{"model":"m","options":{"num_gpu":0}}"#), Some("num_gpu"));
        assert_eq!(opt(r#"{"model":"m","OPTIONS":{"use_mmap":false}}"#), Some("use_mmap"));
        assert_eq!(opt(r#"{"model":"m","options":{"low_vram":true,"numa":1}}"#), Some("numa"));
        assert_eq!(opt(r#"{"model":"m","Shift":false}"#), Some("shift"));
        assert_eq!(opt(r#"{"model":"m","options":{"NUM_GPU":1}}"#), None, "Ollama ignores it");
        assert_eq!(opt(r#"{"model":"m","options":{"num_gpu":null}}"#), None);
        assert_eq!(opt(r#"{"model":"m","shift":null,"options":{"temperature":1}}"#), None);
        // context counts on /api/generate only, when not empty.
        assert!(r(Kind::OllamaGenerate, r#"{"model":"m","context":[1,2]}"#).context);
        assert!(!r(Kind::OllamaGenerate, r#"{"model":"m","context":[]}"#).context);
        assert!(!r(Kind::OllamaGenerate, r#"{"model":"m","context":null}"#).context);
        assert!(!r(Kind::OllamaChat, r#"{"model":"m","context":[1]}"#).context);
    }

    #[test]
    fn the_smallest_declared_limit_is_kept() {
        let r = |body: &str| inspect(Kind::OpenAiGenerate, body.as_bytes()).unwrap();
        let req = r(r#"{"model":"m","max_completion_tokens":30,"num_predict":20}"#);
        assert_eq!(req.predict_smallest, Some(Num::U(20)));
        assert_eq!(req.predict, Some(Limit::Value(Num::U(30))));
        assert!(!req.predict_effective);
        let req = r(r#"{"model":"m","options":{"num_predict":7.5},"max_output_tokens":9}"#);
        assert_eq!(req.predict_smallest, Some(Num::F(7.5)));
        let req = r(r#"{"model":"m","num_predict":-1,"max_output_tokens":9}"#);
        assert_eq!(req.predict_smallest, Some(Num::U(9)), "unbounded values are not limits");
        assert!(matches!(req.predict, Some(Limit::Unbounded(_))));
        assert_eq!(r(r#"{"model":"m"}"#).predict_smallest, None);
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
