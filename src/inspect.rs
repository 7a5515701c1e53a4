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
//!
//! An inspected body is read without building a tree of it (SPEC §11
//! "Memory"): one validating pass over the bytes ([`crate::jsonscan`]) keeps
//! the few fields butler reads, and prompt scans walk the bytes again. The
//! tree type [`Json`] remains for small upstream bodies butler rewrites
//! (listings).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::ops::ControlFlow;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::jsonscan::{self, Event, Reader, Token};

#[cfg(test)]
mod oracle;

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

/// Parses exactly one JSON object (surrounding whitespace allowed) into a tree. The error
/// is the `<reason>` of a `400 bad request: <reason>`. For small bodies only (listings):
/// inspected request bodies are read by [`inspect`] without a tree.
pub fn parse_object(body: &[u8]) -> Result<Json, &'static str> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("empty body");
    }
    let value = parse_any(body)?;
    match value {
        Json::Object(_) => Ok(value),
        _ => Err("body must be a JSON object"),
    }
}

/// Parses one JSON value of any kind with serde_json, refusing keys that fold alike: the
/// reference the streaming reader is tested against.
pub fn parse_any(body: &[u8]) -> Result<Json, &'static str> {
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
    Ok(value)
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

/// The facts butler judges a request by, read in one pass over the body bytes (SPEC §7.1)
/// without building a tree of it (SPEC §11 "Memory"): a few fields are kept, the rest is
/// only validated. The body stays borrowed: [`Request::scan`] and
/// [`Request::for_each_text`] read it again, and an edit ([`inject_predict`],
/// [`include_usage`]) is spliced into a copy of it ([`Body::to_bytes`]).
#[derive(Debug)]
pub struct Request<'a> {
    pub kind: Kind,
    /// Model names the request refers to, as sent (not yet normalised), borrowed from the
    /// body unless escaped.
    pub models: Vec<Cow<'a, str>>,
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
    /// `parameters.num_ctx` and `parameters.num_predict` (read on `/api/create`).
    create_parameters: (Option<Num>, Option<Limit>),
    /// A non-empty `remote_host` on `/api/create`.
    remote: bool,
    /// Where the prompt texts are (start, end with the top bit for "escaped"), once a walk
    /// has found them all and they were few enough to note (see `Request::walk`).
    texts: RefCell<Option<Vec<(u32, u32)>>>,
    /// The body as sent, with what an edit needs to know about it.
    pub body: Body<'a>,
}

/// Keys longer than this (as sent) name no field butler reads, and are not decoded to be
/// compared: the longest name is 21 bytes, and an escape takes at most 12 bytes per character.
const MAX_NAME: usize = 21 * 12;

/// Decoding buffers larger than this are freed after use rather than kept for the next
/// string.
const SCRATCH_KEPT: usize = 64 * 1024;

/// Roles a chat template writes as a label; any other role value is copied
/// into the prompt and scanned like any text (SPEC §7.4).
const STANDARD_ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer", "function"];

/// Options that make Ollama reload the model, evicting other users' work
/// (SPEC §7.3). `options` is a Go map, matched with exact keys.
const RUNNER_OPTIONS: &[&str] =
    &["num_gpu", "main_gpu", "num_batch", "use_mmap", "num_thread", "numa", "low_vram"];

/// The top-level fields butler reads, as Go matches them (folded keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Model,
    Name,
    Source,
    Destination,
    From,
    Modelfile,
    Options,
    NumCtx,
    NumPredict,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    KeepAlive,
    Stream,
    Messages,
    Prompt,
    System,
    DebugRenderOnly,
    Tools,
    Shift,
    Context,
    Parameters,
    RemoteHost,
    StreamOptions,
}

const FIELDS: [(&str, Field); 24] = [
    ("model", Field::Model),
    ("name", Field::Name),
    ("source", Field::Source),
    ("destination", Field::Destination),
    ("from", Field::From),
    ("modelfile", Field::Modelfile),
    ("options", Field::Options),
    ("num_ctx", Field::NumCtx),
    ("num_predict", Field::NumPredict),
    ("max_tokens", Field::MaxTokens),
    ("max_completion_tokens", Field::MaxCompletionTokens),
    ("max_output_tokens", Field::MaxOutputTokens),
    ("keep_alive", Field::KeepAlive),
    ("stream", Field::Stream),
    ("messages", Field::Messages),
    ("prompt", Field::Prompt),
    ("system", Field::System),
    ("_debug_render_only", Field::DebugRenderOnly),
    ("tools", Field::Tools),
    ("shift", Field::Shift),
    ("context", Field::Context),
    ("parameters", Field::Parameters),
    ("remote_host", Field::RemoteHost),
    ("stream_options", Field::StreamOptions),
];

/// What a field butler reads holds; strings stay spans of the body.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val {
    Null,
    Bool(bool),
    Number(Num),
    Str(Event),
    Object,
    Array { empty: bool },
}

/// An object member's bytes: from its key's opening quote to the end of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    start: usize,
    value_start: usize,
    end: usize,
}

/// An object's closing brace and how many members it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Obj {
    close: usize,
    entries: usize,
}

/// What is read inside `options` or `parameters` (one level down).
#[derive(Debug, Default)]
struct Inner {
    /// The values of the keys that fold to `num_ctx` and `num_predict`.
    num_ctx: Option<Val>,
    num_predict: Option<Val>,
    /// The member whose key folds to `num_predict`.
    num_predict_entry: Option<Entry>,
    /// `num_predict` under exactly that key, not null (the one Ollama's map reads).
    num_predict_exact: bool,
    /// Runner options present (not null) under their exact keys, by index in
    /// [`RUNNER_OPTIONS`].
    runner: u8,
    /// The first `num_ctx`/`num_predict` key holding neither a number nor null.
    wrong: Option<String>,
}

impl Inner {
    fn num(v: Option<Val>) -> Option<Num> {
        match v {
            Some(Val::Number(n)) => Some(n),
            _ => None,
        }
    }
}

/// The body as sent and where the few members an edit touches are (SPEC §7.3 injection,
/// SPEC §9 usage): an edit is spliced into a copy of the original bytes rather than
/// re-serialising anything, so everything else reaches Ollama byte for byte.
pub struct Body<'a> {
    src: &'a str,
    top: Obj,
    /// The top-level `options` member (folded key), and its object if it is one.
    options: Option<(Entry, Option<Obj>)>,
    /// Inside `options`: the member whose key folds to `num_predict`.
    options_predict: Option<Entry>,
    /// Top-level members whose keys fold to `max_tokens` and `max_output_tokens`.
    predict_top: [Option<Entry>; 2],
    /// `stream: true`.
    stream: bool,
    /// The top-level `stream_options` member, and its object if it is one.
    stream_options: Option<(Entry, Option<Obj>)>,
    /// Inside `stream_options`: the member whose key folds to `include_usage`, and whether
    /// it is `true`.
    include_usage: Option<(Entry, bool)>,
    /// Edits asked for: a generation cap, and usage reporting.
    predict: Option<(PredictField, u64)>,
    usage: bool,
}

impl fmt::Debug for Body<'_> {
    /// Never the content: it is the client's prompt.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("len", &self.src.len())
            .field("predict", &self.predict)
            .field("usage", &self.usage)
            .finish_non_exhaustive()
    }
}

/// Everything the single reading of a body finds.
struct Read<'a> {
    top: [Option<Val>; FIELDS.len()],
    options: Inner,
    parameters: Inner,
    web_search: bool,
    body: Body<'a>,
}

impl Read<'_> {
    /// A field's value as Go reads it: `null` counts as absent.
    fn field(&self, field: Field) -> Option<Val> {
        self.top[field as usize].filter(|v| *v != Val::Null)
    }
}

/// The one validating pass over a body: every byte is checked (SPEC §7.1) and the fields
/// butler reads are kept.
struct Reading<'a> {
    r: Reader<'a>,
    /// The body's bytes, and the body as text as far as it is UTF-8 (every key and string
    /// the reader returns lies in it).
    bytes: &'a [u8],
    src: &'a str,
    fold: Vec<u8>,
    scratch: String,
}

impl<'a> Reading<'a> {
    fn next(&mut self) -> Result<Event, jsonscan::Error> {
        self.r.next()?.ok_or(jsonscan::Error::Invalid)
    }

    /// The folded text of a key (into `self.fold`), unless it is too long to name a field
    /// butler reads (then `self.fold` is empty): a long key is never copied.
    fn fold(&mut self, key: &Event) -> bool {
        jsonscan::fold_short(self.src, key, MAX_NAME, &mut self.fold)
    }

    /// Reads the rest of a value whose first event is `v`: what it is, and where it ends.
    fn value(&mut self, v: Event) -> Result<(Val, usize), jsonscan::Error> {
        let val = match v.token {
            Token::BeginObject => return Ok((Val::Object, self.close()?)),
            Token::BeginArray => {
                let first = self.next()?;
                if first.token == Token::EndArray {
                    return Ok((Val::Array { empty: true }, first.end));
                }
                self.r.skip(&first)?;
                return Ok((Val::Array { empty: false }, self.close()?));
            }
            Token::String => Val::Str(v),
            Token::Number => {
                Val::Number(jsonscan::number(self.bytes.get(v.start..v.end).unwrap_or_default())?)
            }
            Token::True => Val::Bool(true),
            Token::False => Val::Bool(false),
            Token::Null => Val::Null,
            Token::EndObject | Token::EndArray | Token::Key => {
                return Err(jsonscan::Error::Invalid);
            }
        };
        Ok((val, v.end))
    }

    /// Reads to the end of the array or object just opened; returns where it ends.
    fn close(&mut self) -> Result<usize, jsonscan::Error> {
        let depth = self.r.depth();
        loop {
            let e = self.next()?;
            if self.r.depth() < depth {
                return Ok(e.end);
            }
        }
    }

    /// The top-level object, its `{` just read.
    fn top(&mut self, kind: Kind) -> Result<Read<'a>, jsonscan::Error> {
        let mut read = Read {
            top: [None; FIELDS.len()],
            options: Inner::default(),
            parameters: Inner::default(),
            web_search: false,
            body: Body {
                src: self.src,
                top: Obj::default(),
                options: None,
                options_predict: None,
                predict_top: [None; 2],
                stream: false,
                stream_options: None,
                include_usage: None,
                predict: None,
                usage: false,
            },
        };
        loop {
            let key = self.next()?;
            if key.token == Token::EndObject {
                read.body.top.close = key.start;
                break;
            }
            read.body.top.entries += 1;
            self.fold(&key);
            let field = FIELDS.iter().find(|(name, _)| name.as_bytes() == self.fold.as_slice());
            let field = field.map(|&(_, f)| f);
            let v = self.next()?;
            let (val, end, inner) = match (field, v.token) {
                (Some(Field::Options), Token::BeginObject) => {
                    let obj = self.inner(&mut read.options, None)?;
                    read.body.options_predict = read.options.num_predict_entry;
                    (Val::Object, obj.close + 1, Some(obj))
                }
                (Some(Field::Parameters), Token::BeginObject) => {
                    let obj = self.inner(&mut read.parameters, None)?;
                    (Val::Object, obj.close + 1, Some(obj))
                }
                (Some(Field::StreamOptions), Token::BeginObject) => {
                    let mut usage = None;
                    let obj = self.inner(&mut Inner::default(), Some(&mut usage))?;
                    read.body.include_usage = usage;
                    (Val::Object, obj.close + 1, Some(obj))
                }
                (Some(Field::Tools), Token::BeginArray) if kind_has_web_search(kind) => {
                    let (empty, end) = self.tools(&mut read.web_search)?;
                    (Val::Array { empty }, end, None)
                }
                _ => {
                    let (val, end) = self.value(v)?;
                    (val, end, None)
                }
            };
            let Some(field) = field else { continue };
            read.top[field as usize] = Some(val);
            let entry = Entry { start: key.start, value_start: v.start, end };
            match field {
                Field::Options => read.body.options = Some((entry, inner)),
                Field::StreamOptions => read.body.stream_options = Some((entry, inner)),
                Field::MaxTokens => read.body.predict_top[0] = Some(entry),
                Field::MaxOutputTokens => read.body.predict_top[1] = Some(entry),
                Field::Stream => read.body.stream = val == Val::Bool(true),
                _ => {}
            }
        }
        Ok(read)
    }

    /// The members of `options`, `parameters` or `stream_options`, the `{` just read. With
    /// `usage`, the member whose key folds to `include_usage` is noted there.
    fn inner(
        &mut self,
        inner: &mut Inner,
        mut usage: Option<&mut Option<(Entry, bool)>>,
    ) -> Result<Obj, jsonscan::Error> {
        let mut obj = Obj::default();
        loop {
            let key = self.next()?;
            if key.token == Token::EndObject {
                obj.close = key.start;
                return Ok(obj);
            }
            obj.entries += 1;
            let short = self.fold(&key);
            let v = self.next()?;
            let (val, end) = self.value(v)?;
            let entry = Entry { start: key.start, value_start: v.start, end };
            if !short {
                continue;
            }
            if let Some(usage) = usage.as_deref_mut() {
                if self.fold == b"include_usage" {
                    *usage = Some((entry, val == Val::Bool(true)));
                }
                continue;
            }
            let (ctx, predict) = (self.fold == b"num_ctx", self.fold == b"num_predict");
            let text = jsonscan::text(self.src, &key, &mut self.scratch);
            if (ctx || predict)
                && !matches!(val, Val::Number(_) | Val::Null)
                && inner.wrong.is_none()
            {
                inner.wrong = Some(text.to_ascii_lowercase());
            }
            if ctx {
                inner.num_ctx = Some(val);
            }
            if predict {
                inner.num_predict = Some(val);
                inner.num_predict_entry = Some(entry);
                inner.num_predict_exact = text == "num_predict" && val != Val::Null;
            }
            if val != Val::Null
                && let Some(i) = RUNNER_OPTIONS.iter().position(|o| *o == text)
            {
                inner.runner |= 1 << i;
            }
        }
    }

    /// The top-level `tools` array, `[` just read: whether a tool's `type` starts with
    /// `web_search` (Ollama compares it case-sensitively). Returns whether the array is
    /// empty, and where it ends.
    fn tools(&mut self, found: &mut bool) -> Result<(bool, usize), jsonscan::Error> {
        let mut empty = true;
        loop {
            let item = self.next()?;
            match item.token {
                Token::EndArray => return Ok((empty, item.end)),
                Token::BeginObject => loop {
                    let key = self.next()?;
                    if key.token == Token::EndObject {
                        break;
                    }
                    self.fold(&key);
                    let is_type = self.fold == b"type";
                    let v = self.next()?;
                    if is_type && v.token == Token::String {
                        *found |= jsonscan::starts_with(self.src, &v, "web_search");
                    }
                    self.r.skip(&v)?;
                },
                _ => self.r.skip(&item)?,
            }
            empty = false;
        }
    }
}

/// Routes on which Ollama runs `web_search*` tools itself.
fn kind_has_web_search(kind: Kind) -> bool {
    matches!(kind, Kind::Responses | Kind::Messages)
}

/// Reads a body in one validating pass: exactly one object (SPEC §7.1), and its fields.
fn read(kind: Kind, body: &[u8]) -> Result<Read<'_>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("empty body".into());
    }
    let reason = |e: jsonscan::Error| e.reason().to_owned();
    let r = Reader::new(body);
    let src = r.text();
    let mut reading = Reading { r, bytes: body, src, fold: Vec::new(), scratch: String::new() };
    let first = reading.next().map_err(reason)?;
    let read = if first.token == Token::BeginObject {
        Some(reading.top(kind).map_err(reason)?)
    } else {
        reading.r.skip(&first).map_err(reason)?;
        None
    };
    if reading.r.next().map_err(reason)?.is_some() {
        return Err("invalid JSON".into());
    }
    reading.r.finish().map_err(|_| "trailing data after the JSON object".to_owned())?;
    // Accepted: all of it is UTF-8.
    if src.len() != body.len() {
        return Err("invalid JSON".into());
    }
    read.ok_or_else(|| "body must be a JSON object".into())
}

/// A field's name as Go matches it.
fn field_name(field: Field) -> &'static str {
    FIELDS[field as usize].0
}

/// Parses and reads an inspected body. The error is a `400` reason.
pub fn inspect(kind: Kind, body: &[u8]) -> Result<Request<'_>, String> {
    let read = read(kind, body)?;
    check_types(kind, &read)?;
    if kind == Kind::Create {
        check_create_types(&read)?;
    }

    let string = |field: Field| match read.field(field) {
        Some(Val::Str(e)) => Some(e),
        _ => None,
    };
    let src = read.body.src;
    let text = |e: Event| jsonscan::cow(src, &e);
    // A string's text is empty exactly when its content is: an escape is never empty.
    let empty = |e: &Event| e.end - e.start == 2;
    let mut models = Vec::new();
    let model = string(Field::Model).filter(|m| !empty(m)).or_else(|| string(Field::Name));
    match kind {
        Kind::Copy => {
            for field in [Field::Source, Field::Destination] {
                let name = field_name(field);
                match read.field(field) {
                    Some(Val::Str(s)) if !empty(&s) => models.push(text(s)),
                    Some(Val::Str(_)) | None => return Err(format!("{name} is required")),
                    Some(_) => return Err(format!("{name} must be a string")),
                }
            }
        }
        _ => match model {
            Some(m) if !empty(&m) => models.push(text(m)),
            _ => return Err("model is required".into()),
        },
    }
    if kind == Kind::Create {
        match read.field(Field::From) {
            Some(Val::Str(s)) if !empty(&s) => models.push(text(s)),
            Some(Val::Str(_)) | None => {}
            Some(_) => return Err("from must be a string".into()),
        }
        // The legacy Modelfile text can name a base model with FROM; butler
        // cannot police it, so it is refused rather than passed through.
        if read.field(Field::Modelfile).is_some() {
            return Err("modelfile is not supported; use from".into());
        }
    }

    // `options` is an object or absent (type-checked); `read.options` holds what it has.
    let options = read.field(Field::Options).is_some();
    let in_options = |v: Option<Val>| if options { Inner::num(v) } else { None };
    let number = |field: Field| match read.field(field) {
        Some(Val::Number(n)) => Some(n),
        _ => None,
    };
    let num_ctx = [in_options(read.options.num_ctx), number(Field::NumCtx)]
        .into_iter()
        .flatten()
        .max_by(|a, b| a.as_f64().total_cmp(&b.as_f64()));

    let predict_values = [
        in_options(read.options.num_predict),
        number(Field::NumPredict),
        number(Field::MaxTokens),
        number(Field::MaxCompletionTokens),
        number(Field::MaxOutputTokens),
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
        Some(PredictField::Options) => options && read.options.num_predict_exact,
        Some(PredictField::Top(name)) => FIELDS
            .iter()
            .find(|(n, _)| *n == name)
            .is_some_and(|&(_, field)| read.field(field).is_some()),
        None => true,
    };

    let (keep_alive, keep_alive_zero) = match read.field(Field::KeepAlive) {
        Some(Val::Number(n)) => {
            // Ollama: a negative number is "forever", else seconds converted
            // to whole nanoseconds (truncated), so 1e-10 is 0.
            let secs = n.as_f64();
            (Some(secs), secs >= 0.0 && (secs * 1e9).trunc() == 0.0)
        }
        Some(Val::Str(s)) => {
            let nanos = go_duration_nanos(&text(s))
                .ok_or_else(|| "keep_alive is not a valid duration".to_owned())?;
            (Some(nanos as f64 / 1e9), nanos == 0)
        }
        _ => (None, false),
    };
    let unload = keep_alive_zero
        && match kind {
            Kind::OllamaChat => {
                read.field(Field::Messages).is_none_or(|m| m == Val::Array { empty: true })
            }
            Kind::OllamaGenerate => string(Field::Prompt).is_none_or(|p| empty(&p)),
            _ => false,
        };
    let debug_render_only = read.field(Field::DebugRenderOnly) == Some(Val::Bool(true));
    // Ollama compares a tool's `type` case-sensitively: `web_search` on
    // `/v1/responses`, any `web_search…` on `/v1/messages`.
    let web_search = kind_has_web_search(kind) && read.web_search;
    let runner_option = RUNNER_OPTIONS
        .iter()
        .enumerate()
        .find(|&(i, _)| options && read.options.runner & (1 << i) != 0)
        .map(|(_, &name)| name)
        .or_else(|| read.field(Field::Shift).map(|_| "shift"));
    let context = kind == Kind::OllamaGenerate
        && read.field(Field::Context).is_some_and(|c| c != Val::Array { empty: true });
    let create_parameters = if read.field(Field::Parameters) == Some(Val::Object) {
        let predict = Inner::num(read.parameters.num_predict)
            .map(|n| if n.as_f64() < 1.0 { Limit::Unbounded(n) } else { Limit::Value(n) });
        (Inner::num(read.parameters.num_ctx), predict)
    } else {
        (None, None)
    };
    let remote = kind == Kind::Create && string(Field::RemoteHost).is_some_and(|h| !empty(&h));

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
        create_parameters,
        remote,
        texts: RefCell::new(None),
        body: read.body,
    })
}

/// Type checks for every field butler reads (SPEC §7.1): a wrong type is a
/// 400 whatever the subject's policy. Checked in this order, whatever the body's.
fn check_types(kind: Kind, read: &Read<'_>) -> Result<(), String> {
    let wrong = |field: Field, what: &str| Err(format!("{} must be {what}", field_name(field)));
    for field in [Field::Model, Field::Name] {
        if let Some(v) = read.field(field)
            && !matches!(v, Val::Str(_))
        {
            return wrong(field, "a string");
        }
    }
    for field in [
        Field::NumCtx,
        Field::NumPredict,
        Field::MaxTokens,
        Field::MaxCompletionTokens,
        Field::MaxOutputTokens,
    ] {
        if let Some(v) = read.field(field)
            && !matches!(v, Val::Number(_))
        {
            return wrong(field, "a number");
        }
    }
    if let Some(options) = read.field(Field::Options) {
        if options != Val::Object {
            return wrong(Field::Options, "an object");
        }
        if let Some(key) = &read.options.wrong {
            return Err(format!("options.{key} must be a number"));
        }
    }
    if let Some(v) = read.field(Field::KeepAlive)
        && !matches!(v, Val::Number(_) | Val::Str(_))
    {
        return wrong(Field::KeepAlive, "a number or a string");
    }
    if let Some(v) = read.field(Field::Stream)
        && !matches!(v, Val::Bool(_))
    {
        return wrong(Field::Stream, "a boolean");
    }
    if let Some(v) = read.field(Field::Messages)
        && !matches!(v, Val::Array { .. })
    {
        return wrong(Field::Messages, "an array");
    }
    if let Some(v) = read.field(Field::Prompt)
        && !matches!(v, Val::Str(_))
    {
        return wrong(Field::Prompt, "a string");
    }
    if let Some(v) = read.field(Field::System) {
        let ok = match v {
            Val::Str(_) => true,
            Val::Array { .. } => kind == Kind::Messages,
            _ => false,
        };
        if !ok {
            return wrong(Field::System, "a string");
        }
    }
    Ok(())
}

/// Type checks for the `/api/create` fields butler reads (SPEC §7.1, §7.3): `parameters` is
/// a Go `map[string]any`, so any value type decodes, but Ollama later loads `num_ctx` and
/// `num_predict` from it as numbers; `remote_host` is a string.
fn check_create_types(read: &Read<'_>) -> Result<(), String> {
    if let Some(parameters) = read.field(Field::Parameters) {
        if parameters != Val::Object {
            return Err("parameters must be an object".into());
        }
        if let Some(key) = &read.parameters.wrong {
            return Err(format!("parameters.{key} must be a number"));
        }
    }
    if let Some(v) = read.field(Field::RemoteHost)
        && !matches!(v, Val::Str(_))
    {
        return Err("remote_host must be a string".into());
    }
    Ok(())
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

/// Where a text a prompt filter sees comes from (SPEC §7.4): the body's own strings and
/// keys, or the text parts of one message joined — of a `messages` element, of a Responses
/// `input` item, or of `system`. Prompt filters report the pattern of the first match in
/// this order: the body in its own order, then joined messages, input items and `system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Body,
    Messages,
    Input,
    System,
}

/// The role of a value in a message's text parts (the `text_parts` of SPEC §7.4): the
/// content itself (a string, or an array of blocks), an element of that array, or a block
/// (whose `text` and `content` are parts in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parts {
    None,
    Root,
    Item,
    Block,
}

/// What the walk over a body offers: a key or a string value (spans of the body), or a
/// message's text parts joined.
enum Item<'s> {
    Key(Event),
    Value(Event),
    Joined(Origin, &'s str),
}

/// Why a walk stopped early.
enum Stop {
    /// The visitor had enough.
    Done,
    /// The body was not what the validating reading accepted (never happens).
    Malformed,
}

/// Key names the walk treats specially (Go's folding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Role,
    Model,
    Images,
    Messages,
    Input,
    Content,
    ImageUrl,
    Source,
    Url,
    Data,
    Text,
    System,
    Other,
}

const NAMES: [(&str, Name); 12] = [
    ("role", Name::Role),
    ("model", Name::Model),
    ("images", Name::Images),
    ("messages", Name::Messages),
    ("input", Name::Input),
    ("content", Name::Content),
    ("image_url", Name::ImageUrl),
    ("source", Name::Source),
    ("url", Name::Url),
    ("data", Name::Data),
    ("text", Name::Text),
    ("system", Name::System),
];

/// A message's text parts joined with `""` and with `"\n"`, built as the parts stream past
/// (never all messages at once). A block's `text` comes before its nested `content` parts
/// whatever their order in the body, so it is inserted where the block began. A single part
/// stays a span of the body: it is only ever seen on its own.
#[derive(Default)]
struct Joiner {
    origin: Option<Origin>,
    count: usize,
    first: Option<Event>,
    concat: String,
    join: String,
    tmp: String,
}

/// Where a block began in a [`Joiner`].
#[derive(Clone, Copy)]
struct Mark {
    count: usize,
    concat: usize,
    join: usize,
}

impl Joiner {
    fn begin(&mut self, origin: Origin) {
        self.origin = Some(origin);
        self.count = 0;
        self.first = None;
        self.concat.clear();
        self.join.clear();
    }

    /// Writes out a first part kept as a span.
    fn materialise(&mut self, src: &str) {
        if let Some(first) = self.first.take() {
            jsonscan::decode_into(first.raw(src), &mut self.concat);
            self.join.push_str(&self.concat);
        }
    }

    fn add(&mut self, src: &str, part: &Event) {
        if self.origin.is_none() {
            return;
        }
        if self.count == 0 {
            self.first = Some(*part);
            self.count = 1;
            return;
        }
        self.materialise(src);
        let from = self.concat.len();
        jsonscan::decode_into(part.raw(src), &mut self.concat);
        self.join.push('\n');
        self.join.push_str(&self.concat[from..]);
        self.count += 1;
    }

    fn mark(&mut self, src: &str) -> Mark {
        if self.count == 1 {
            self.materialise(src);
        }
        Mark { count: self.count, concat: self.concat.len(), join: self.join.len() }
    }

    /// A block's `text`: before the parts its `content` added since `mark`.
    fn add_first(&mut self, src: &str, mark: Mark, part: &Event) {
        if self.origin.is_none() {
            return;
        }
        if self.count == mark.count {
            return self.add(src, part);
        }
        self.materialise(src);
        self.tmp.clear();
        jsonscan::decode_into(part.raw(src), &mut self.tmp);
        self.concat.insert_str(mark.concat, &self.tmp);
        // After the separator that precedes the block's first part, if any.
        let at = mark.join + usize::from(mark.count > 0);
        self.tmp.push('\n');
        self.join.insert_str(at, &self.tmp);
        self.count += 1;
    }
}

/// One walk over a body already validated, in body order (see [`Request::scan_from`]).
struct Walk<'a, 'f> {
    src: &'a str,
    kind: Kind,
    r: Reader<'a>,
    fold: Vec<u8>,
    /// Present when joined message texts are wanted.
    joiner: Option<Joiner>,
    visit: &'f mut dyn FnMut(Item<'_>) -> ControlFlow<()>,
}

impl Walk<'_, '_> {
    fn next(&mut self) -> ControlFlow<Stop, Event> {
        match self.r.next() {
            Ok(Some(e)) => ControlFlow::Continue(e),
            _ => ControlFlow::Break(Stop::Malformed),
        }
    }

    fn offer(&mut self, item: Item<'_>) -> ControlFlow<Stop> {
        match (self.visit)(item) {
            ControlFlow::Continue(()) => ControlFlow::Continue(()),
            ControlFlow::Break(()) => ControlFlow::Break(Stop::Done),
        }
    }

    /// What a key names (folded into `self.fold`; a long key names nothing and is not
    /// copied).
    fn name(&mut self, key: &Event) -> Name {
        let raw = key.raw(self.src);
        if !key.escaped && raw.is_ascii() {
            // The common case: an ASCII key as sent; folding is ASCII case.
            return NAMES
                .iter()
                .find(|(n, _)| n.len() == raw.len() && n.eq_ignore_ascii_case(raw))
                .map_or(Name::Other, |n| n.1);
        }
        if !jsonscan::fold_short(self.src, key, MAX_NAME, &mut self.fold) {
            return Name::Other;
        }
        NAMES
            .iter()
            .find(|(n, _)| n.as_bytes() == self.fold.as_slice())
            .map_or(Name::Other, |n| n.1)
    }

    /// Whether a key names `field` (ASCII, lowercase) for Go.
    fn key_is(&mut self, key: &Event, field: &str) -> bool {
        let raw = key.raw(self.src);
        if !key.escaped && raw.is_ascii() {
            return raw.eq_ignore_ascii_case(field);
        }
        jsonscan::fold_short(self.src, key, MAX_NAME, &mut self.fold)
            && self.fold == field.as_bytes()
    }

    /// Whether the object at `at` has a `type` (folded, not null) that is exactly
    /// `"base64"`: a look ahead, since `data` may come before `type`. Only a content
    /// block's `source` is looked into, so no byte is looked at twice this way.
    fn is_base64_source(&mut self, at: usize) -> bool {
        let mut r = Reader::trusted_at(self.src, at);
        if !matches!(r.next(), Ok(Some(Event { token: Token::BeginObject, .. }))) {
            return false;
        }
        while let Ok(Some(key)) = r.next() {
            if key.token != Token::Key {
                return false;
            }
            let Ok(Some(v)) = r.next() else { return false };
            if self.key_is(&key, "type") {
                return v.token == Token::String && jsonscan::is(self.src, &v, "base64");
            }
            if r.skip(&v).is_err() {
                return false;
            }
        }
        false
    }

    /// Walks the value whose first event is `v`.
    fn value(&mut self, v: Event, place: Place, parts: Parts, msg: Origin) -> ControlFlow<Stop> {
        match v.token {
            Token::String => {
                if place != Place::Images {
                    self.offer(Item::Value(v))?;
                }
                if matches!(parts, Parts::Root | Parts::Item)
                    && let Some(j) = self.joiner.as_mut()
                {
                    j.add(self.src, &v);
                }
            }
            Token::BeginArray => loop {
                let item = self.next()?;
                if item.token == Token::EndArray {
                    break;
                }
                let inner = if item.token == Token::BeginArray { Place::Other } else { place };
                let item_parts = match (parts, item.token) {
                    (Parts::Root, Token::String) => Parts::Item,
                    (Parts::Root, Token::BeginObject) => Parts::Block,
                    _ => Parts::None,
                };
                self.value(item, inner, item_parts, msg)?;
            },
            Token::BeginObject => self.object(place, parts, msg)?,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    /// Walks an object's members, its `{` just read. Every key is offered; values by the
    /// exemptions of SPEC §7.4 (the top-level `model` value, standard `role` values, image
    /// data where Ollama decodes it as an image).
    fn object(&mut self, place: Place, parts: Parts, msg: Origin) -> ControlFlow<Stop> {
        let src = self.src;
        let mark = match (parts, self.joiner.as_mut()) {
            (Parts::Block, Some(j)) => Some(j.mark(src)),
            _ => None,
        };
        loop {
            let key = self.next()?;
            if key.token == Token::EndObject {
                return ControlFlow::Continue(());
            }
            self.offer(Item::Key(key))?;
            let name = self.name(&key);
            let v = self.next()?;
            let (string, array) = (v.token == Token::String, v.token == Token::BeginArray);
            if name == Name::Role
                && string
                && STANDARD_ROLES.iter().any(|role| jsonscan::is(src, &v, role))
            {
                continue;
            }
            // The value's part in the message's text, and whether it starts a message's.
            let mut session = None;
            let child_parts = match (parts, name) {
                (Parts::Block, Name::Text) => {
                    if let (true, Some(mark), Some(j)) = (string, mark, self.joiner.as_mut()) {
                        j.add_first(src, mark, &v);
                    }
                    Parts::None
                }
                (Parts::Block, Name::Content) => Parts::Root,
                _ if place == Place::Message && name == Name::Content => {
                    session = Some(msg);
                    Parts::Root
                }
                _ if place == Place::Top && name == Name::System => {
                    session = Some(Origin::System);
                    Parts::Root
                }
                _ => Parts::None,
            };
            let data_url = |_: &mut Self| string && jsonscan::starts_with(src, &v, "data:");
            let mut child_msg = msg;
            let child = match (place, name) {
                (Place::Top, Name::Model) if string => continue,
                (Place::Top | Place::Message, Name::Images) if array => Place::Images,
                (Place::Top, Name::Messages) if array => {
                    child_msg = Origin::Messages;
                    Place::Message
                }
                (Place::Top, Name::Input) if self.kind == Kind::Responses && array => {
                    child_msg = Origin::Input;
                    Place::Message
                }
                (Place::Message | Place::Block, Name::Content) if array => Place::Block,
                (Place::Block, Name::ImageUrl) if data_url(self) => continue,
                (Place::Block, Name::ImageUrl) => Place::ImageUrl,
                (Place::Block, Name::Source)
                    if v.token == Token::BeginObject && self.is_base64_source(v.start) =>
                {
                    Place::Base64Source
                }
                (Place::ImageUrl, Name::Url) if data_url(self) => continue,
                (Place::Base64Source, Name::Data) if string => continue,
                _ => Place::Other,
            };
            if let (Some(origin), Some(j)) = (session, self.joiner.as_mut()) {
                j.begin(origin);
            }
            self.value(v, child, child_parts, child_msg)?;
            if session.is_some() {
                self.end_session()?;
            }
        }
    }

    /// Offers a message's joined parts (when it has several) and ends its session.
    fn end_session(&mut self) -> ControlFlow<Stop> {
        let Some(mut j) = self.joiner.take() else { return ControlFlow::Continue(()) };
        let origin = j.origin.take();
        let mut flow = ControlFlow::Continue(());
        if let Some(origin) = origin
            && j.count >= 2
        {
            for joined in [&j.concat, &j.join] {
                flow = self.offer(Item::Joined(origin, joined));
                if flow.is_break() {
                    break;
                }
            }
        }
        self.joiner = Some(j);
        flow
    }
}

impl<'a> Request<'a> {
    /// Walks the body once (SPEC §7.4): every key and string value but the exemptions, in
    /// body order, and — with `joins` — each message's text parts joined, offered when the
    /// message's content ends.
    fn walk(&self, joins: bool, visit: &mut dyn FnMut(Item<'_>) -> ControlFlow<()>) -> bool {
        let src = self.body.src;
        // The first complete walk notes where the prompt texts are, if they are few for the
        // body's size (at most 8 bytes each, an eighth of the body in all), so that
        // `for_each_text` (the digest, `log_prompts`, usage estimates) need not walk again.
        let mut spans = (self.texts.borrow().is_none() && src.len() < 1 << 31).then(Vec::new);
        let cap = src.len() / 64 + 16;
        let mut noting = |item: Item<'_>| {
            if let (Item::Value(e), Some(list)) = (&item, spans.as_mut()) {
                if list.len() < cap {
                    list.push((e.start as u32, e.end as u32 | u32::from(e.escaped) << 31));
                } else {
                    spans = None;
                }
            }
            visit(item)
        };
        let mut walk = Walk {
            src,
            kind: self.kind,
            r: Reader::trusted(src),
            fold: Vec::new(),
            joiner: joins.then(Joiner::default),
            visit: &mut noting,
        };
        let flow = match walk.next() {
            ControlFlow::Continue(e) if e.token == Token::BeginObject => {
                walk.object(Place::Top, Parts::None, Origin::Messages)
            }
            _ => ControlFlow::Break(Stop::Malformed),
        };
        if flow.is_continue()
            && let Some(spans) = spans
        {
            *self.texts.borrow_mut() = Some(spans);
        }
        // A body that cannot be walked (never after validation) counts as a hit: fail closed.
        matches!(flow, ControlFlow::Break(_))
    }

    /// Every string value that is prompt text (SPEC §7.4: all but the
    /// exemptions; keys aside), in body order, borrowed from the body unless it has
    /// escapes: what `log_prompts` writes and the prompt digest covers.
    pub fn for_each_text(&self, mut f: impl FnMut(Cow<'a, str>)) {
        let src = self.body.src;
        if let Some(spans) = &*self.texts.borrow() {
            for &(start, end) in spans {
                let escaped = end >> 31 == 1;
                let end = (end & !(1 << 31)) as usize;
                let e = Event { token: Token::String, start: start as usize, end, escaped };
                f(jsonscan::cow(src, &e));
            }
            return;
        }
        self.walk(false, &mut |item| {
            if let Item::Value(e) = item {
                f(jsonscan::cow(src, &e));
            }
            ControlFlow::Continue(())
        });
    }

    /// Offers `hit` everything a prompt pattern must see (SPEC §7.4): every
    /// string value and object key but the exemptions, and each message's
    /// (and `system`'s) text parts joined with `""` and with `"\n"`, so a
    /// phrase split across blocks is seen whole. Stops at the first `true`
    /// and returns whether there was one. Joined texts are built one
    /// message at a time, never all at once.
    pub fn scan(&self, mut hit: impl FnMut(&str) -> bool) -> bool {
        self.scan_from(|text, _| hit(text))
    }

    /// [`Request::scan`], saying where each text comes from: the body's strings and keys
    /// come in body order, a message's joined parts when its content ends.
    pub fn scan_from(&self, mut hit: impl FnMut(&str, Origin) -> bool) -> bool {
        let src = self.body.src;
        let mut scratch = String::new();
        self.walk(true, &mut |item| {
            let found = match item {
                Item::Key(e) | Item::Value(e) => {
                    let found = hit(jsonscan::text(src, &e, &mut scratch), Origin::Body);
                    // A long escaped text is decoded once; its buffer is not kept.
                    if scratch.capacity() > SCRATCH_KEPT {
                        scratch = String::new();
                    }
                    found
                }
                Item::Joined(origin, text) => hit(text, origin),
            };
            if found { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
    }
}

impl Body<'_> {
    /// Reads a body for its edits alone, without the checks [`inspect`] makes of the
    /// fields (for tests of the edits).
    pub fn parse(src: &[u8]) -> Result<Body<'_>, String> {
        read(Kind::OpenAiGenerate, src).map(|r| r.body)
    }

    /// The body with the edits spliced in: members removed with one adjoining comma, new
    /// members appended at the end of their object. Everything else is the bytes as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let src = self.src.as_bytes();
        // (start, end, replacement), applied in order of start.
        let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        let mut top_left = self.top.entries;
        let mut top_new: Vec<Vec<u8>> = Vec::new();
        // Adds a member at the end of an object that keeps `left` of its own.
        let append = |edits: &mut Vec<(usize, usize, Vec<u8>)>, obj: Obj, left: usize, m: &[u8]| {
            let mut bytes = if left > 0 { b",".to_vec() } else { Vec::new() };
            bytes.extend_from_slice(m);
            edits.push((obj.close, obj.close, bytes));
        };
        if let Some((field, value)) = self.predict {
            match field {
                PredictField::Top(name) => {
                    // Any folding variant present is null (else it would be effective).
                    let at = usize::from(name != "max_tokens");
                    if let Some(entry) = self.predict_top[at] {
                        edits.push(removal(src, entry));
                        top_left -= 1;
                    }
                    top_new.push(format!("\"{name}\":{value}").into_bytes());
                }
                PredictField::Options => {
                    let member = format!("\"num_predict\":{value}");
                    match self.options {
                        Some((_, Some(obj))) => {
                            let mut left = obj.entries;
                            // A folding variant (`NUM_PREDICT`) Ollama's map ignores goes
                            // too, so that butler reads the result as Ollama does.
                            if let Some(entry) = self.options_predict {
                                edits.push(removal(src, entry));
                                left -= 1;
                            }
                            append(&mut edits, obj, left, member.as_bytes());
                        }
                        // `options: null` counts as absent.
                        Some((entry, None)) => edits.push((
                            entry.value_start,
                            entry.end,
                            format!("{{{member}}}").into_bytes(),
                        )),
                        None => top_new.push(format!("\"options\":{{{member}}}").into_bytes()),
                    }
                }
            }
        }
        if self.usage {
            let member = b"\"include_usage\":true";
            match self.stream_options {
                Some((_, Some(obj))) => {
                    let mut left = obj.entries;
                    if let Some((entry, _)) = self.include_usage {
                        edits.push(removal(src, entry));
                        left -= 1;
                    }
                    append(&mut edits, obj, left, member);
                }
                Some((entry, None)) => {
                    edits.push((
                        entry.value_start,
                        entry.end,
                        b"{\"include_usage\":true}".to_vec(),
                    ));
                }
                None => top_new.push(b"\"stream_options\":{\"include_usage\":true}".to_vec()),
            }
        }
        for member in top_new {
            append(&mut edits, self.top, top_left, &member);
            top_left += 1;
        }
        edits.sort_by_key(|&(start, _, _)| start);
        let mut out = Vec::with_capacity(src.len() + 64);
        let mut at = 0;
        for (start, end, bytes) in edits {
            out.extend_from_slice(&src[at..start]);
            out.extend_from_slice(&bytes);
            at = end;
        }
        out.extend_from_slice(&src[at..]);
        out
    }
}

/// The bytes to cut to remove a member: with the comma after it (up to the next key), or
/// else with the comma before it, or alone when it is the object's only member.
fn removal(src: &[u8], entry: Entry) -> (usize, usize, Vec<u8>) {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\n' | b'\t' | b'\r');
    let after = entry.end + src[entry.end..].iter().take_while(|b| is_ws(b)).count();
    if src.get(after) == Some(&b',') {
        let next = after + 1 + src[after + 1..].iter().take_while(|b| is_ws(b)).count();
        return (entry.start, next, Vec::new());
    }
    let before = entry.start - src[..entry.start].iter().rev().take_while(|b| is_ws(b)).count();
    if before > 0 && src[before - 1] == b',' {
        return (before - 1, entry.end, Vec::new());
    }
    (entry.start, entry.end, Vec::new())
}

/// For a streamed `/v1/chat/completions` whose client did not ask for usage:
/// asks for `stream_options.include_usage: true`, so Ollama reports the
/// tokens (SPEC §9; butler hides the extra chunk from the client). The edit is made by
/// [`Body::to_bytes`]; false when nothing needs to change.
pub fn include_usage(body: &mut Body<'_>) -> bool {
    if !body.stream || body.usage {
        return false;
    }
    // `stream_options.include_usage` already true (in an object; null counts as absent).
    if matches!(body.stream_options, Some((_, Some(_))))
        && matches!(body.include_usage, Some((_, true)))
    {
        return false;
    }
    body.usage = true;
    true
}

/// Writes a generation cap of `value` where Ollama reads it for `kind`
/// (SPEC §7.3) when [`Body::to_bytes`] is called; false if the route takes none.
pub fn inject_predict(kind: Kind, body: &mut Body<'_>, value: u64) -> bool {
    let Some(field) = kind.predict_field() else { return false };
    body.predict = Some((field, value));
    true
}

/// `parameters.num_ctx` and `parameters.num_predict` of an `/api/create` body: the model's
/// defaults for every later request, so they are capped like a request's options (SPEC §7.3).
/// Keys are read case-insensitively although Ollama's map reads them exactly: a variant
/// Ollama ignores can only make butler stricter.
pub fn create_parameters(req: &Request<'_>) -> (Option<Num>, Option<Limit>) {
    req.create_parameters
}

/// Whether an `/api/create` body makes a model that runs on another host (`remote_host`):
/// Ollama then forwards every request for it there (ollama.com by default, on the host
/// owner's account), so it is a cloud model whatever its name. A `from` naming a cloud model
/// does the same and is caught as a cloud name.
pub fn creates_remote(req: &Request<'_>) -> bool {
    req.remote
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
        r.for_each_text(|t| out.push(t.into_owned()));
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
        let (ctx, predict) = create_parameters(&r);
        assert_eq!(ctx.map(Num::as_f64), Some(8192.0));
        assert!(matches!(predict, Some(Limit::Unbounded(_))));
        let r = inspect(Kind::Create, br#"{"model":"m","parameters":null}"#).unwrap();
        assert_eq!(create_parameters(&r), (None, None));
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
        fn r(kind: Kind, body: &str) -> Request<'_> {
            inspect(kind, body.as_bytes()).unwrap()
        }
        let k = Kind::OpenAiGenerate;
        assert!(r(k, r#"{"model":"m","_debug_render_only":true}"#).debug_render_only);
        assert!(r(k, r#"{"model":"m","_DEBUG_RENDER_ONLY":true}"#).debug_render_only);
        assert!(!r(k, r#"{"model":"m","_debug_render_only":false}"#).debug_render_only);
        // Web search: a top-level tool whose type starts with web_search.
        let ws =
            |kind, tools: &str| r(kind, &format!(r#"{{"model":"m","tools":{tools}}}"#)).web_search;
        assert!(ws(Kind::Messages, r#"[{"type":"web_search_20250305","name":"web_search"}]"#));
        assert!(ws(Kind::Responses, r#"[{"name":"f"},{"TYPE":"web_search"}]"#));
        assert!(!ws(Kind::Responses, r#"[{"type":"function","name":"web_search"}]"#));
        assert!(!ws(Kind::Responses, r#"[{"type":"Web_Search"}]"#), "Go is exact");
        assert!(!ws(Kind::OpenAiGenerate, r#"[{"type":"web_search"}]"#));
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
        fn r(body: &str) -> Request<'_> {
            inspect(Kind::OpenAiGenerate, body.as_bytes()).unwrap()
        }
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
            let mut body = Body::parse(s.as_bytes()).unwrap();
            include_usage(&mut body).then(|| body.to_bytes())
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

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    const KEYS: &[&str] = &[
        "model",
        "Model",
        "mod\\u0065l",
        "name",
        "messages",
        "Messages",
        "input",
        "system",
        "content",
        "Content",
        "text",
        "role",
        "images",
        "image_url",
        "url",
        "source",
        "type",
        "data",
        "options",
        "OPTIONS",
        "num_ctx",
        "num_predict",
        "NUM_PREDICT",
        "max_tokens",
        "max_to\u{212a}ens",
        "max_completion_tokens",
        "max_output_tokens",
        "keep_alive",
        "stream",
        "\u{17f}tream",
        "stream_options",
        "include_usage",
        "prompt",
        "_debug_render_only",
        "tools",
        "shift",
        "context",
        "parameters",
        "remote_host",
        "from",
        "destination",
        "modelfile",
        "num_gpu",
        "numa",
        "low_vram",
        "x",
        "y",
        "tool_result",
    ];
    const STRINGS: &[&str] = &[
        "",
        "m",
        "llama3.2",
        "hi\\nthere",
        "data:xyz",
        "base64",
        "user",
        "User",
        "the plan",
        "web_search",
        "web_search_x",
        "5m",
        "0",
        "0s",
        "-1s",
        "caf\\u00e9",
        "a\\\"b",
        "tool_result",
        "text",
        "image",
        "evil",
        "ev",
        "il",
        "\u{e9}t\u{e9}",
    ];
    const NUMBERS: &[&str] =
        &["0", "1", "-1", "8192.0", "1e4", "0.5", "600", "99999", "-0", "7", "64", "1e-10"];

    /// A random JSON value, biased by the key it sits under towards the shapes inspection
    /// cares about (messages of blocks, options, image data…).
    fn gen_value(rng: &mut Rng, key: &str, depth: usize, out: &mut String) {
        let space = |rng: &mut Rng, out: &mut String| {
            if rng.below(6) == 0 {
                out.push_str(["  ", "\n", "\t"][rng.below(3)]);
            }
        };
        space(rng, out);
        let shape = match key {
            "messages" | "Messages" | "input" | "content" | "Content" | "images" | "tools"
            | "context" | "system"
                if depth < 5 =>
            {
                [0, 0, 0, 1, 2][rng.below(5)]
            }
            "options" | "OPTIONS" | "parameters" | "stream_options" | "source" | "image_url"
                if depth < 5 =>
            {
                [1, 1, 1, 2, 3][rng.below(5)]
            }
            _ if depth >= 5 => 2 + rng.below(2),
            _ => rng.below(4),
        };
        match shape {
            // An array, mostly of objects.
            0 => {
                out.push('[');
                for i in 0..rng.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    let inner = if rng.below(3) > 0 { "content" } else { "x" };
                    if rng.below(4) > 0 {
                        gen_object(rng, depth + 1, key, out);
                    } else {
                        gen_value(rng, inner, depth + 1, out);
                    }
                }
                out.push(']');
            }
            1 => gen_object(rng, depth + 1, key, out),
            2 => {
                out.push('"');
                out.push_str(rng.pick(STRINGS));
                out.push('"');
            }
            _ => out.push_str(
                [rng.pick(NUMBERS), "true", "false", "null", rng.pick(NUMBERS)][rng.below(5)],
            ),
        }
        space(rng, out);
    }

    /// An object; its keys favour those that matter where it sits (under `parent`).
    fn gen_object(rng: &mut Rng, depth: usize, parent: &str, out: &mut String) {
        const MESSAGE: &[&str] = &["role", "content", "Content", "images", "text", "name"];
        const BLOCK: &[&str] =
            &["type", "text", "content", "source", "image_url", "data", "url", "Text"];
        const OPTIONS: &[&str] =
            &["num_ctx", "num_predict", "NUM_PREDICT", "num_gpu", "numa", "include_usage"];
        out.push('{');
        let mut used = Vec::new();
        for i in 0..rng.below(5) {
            let pool = match parent {
                "messages" | "Messages" | "input" if rng.below(4) > 0 => MESSAGE,
                "content" | "Content" | "system" | "source" | "image_url" if rng.below(4) > 0 => {
                    BLOCK
                }
                "options" | "OPTIONS" | "parameters" | "stream_options" if rng.below(4) > 0 => {
                    OPTIONS
                }
                _ => KEYS,
            };
            let key = rng.pick(pool);
            // Mostly distinct keys (a duplicate refuses the whole body).
            if used.contains(&key) && rng.below(8) > 0 {
                continue;
            }
            used.push(key);
            if i > 0 && !out.ends_with('{') {
                out.push(',');
            }
            out.push('"');
            out.push_str(key);
            out.push_str("\":");
            gen_value(rng, key, depth, out);
        }
        out.push('}');
    }

    /// A message's content: a string, or blocks of text, nested content and images, with
    /// their members in any order.
    fn gen_content(rng: &mut Rng, depth: usize, out: &mut String) {
        let string = |rng: &mut Rng| format!("\"{}\"", rng.pick(STRINGS));
        if depth > 3 || rng.below(4) == 0 {
            out.push_str(&string(rng));
            return;
        }
        out.push('[');
        for i in 0..rng.below(5) {
            if i > 0 {
                out.push(',');
            }
            match rng.below(6) {
                0 => out.push_str(&string(rng)),
                1 => out.push_str("[\"nested\"]"),
                2 => out.push_str(rng.pick(NUMBERS)),
                _ => {
                    let mut members: Vec<String> = Vec::new();
                    if rng.below(3) > 0 {
                        members.push(format!("\"text\":{}", string(rng)));
                    }
                    if rng.below(2) > 0 {
                        let mut inner = String::new();
                        gen_content(rng, depth + 1, &mut inner);
                        members.push(format!("\"content\":{inner}"));
                    }
                    if rng.below(3) == 0 {
                        let kind = ["base64", "url", "BASE64"][rng.below(3)];
                        members.push(format!(
                            "\"source\":{{\"data\":{},\"type\":\"{kind}\"}}",
                            string(rng)
                        ));
                    }
                    if rng.below(4) == 0 {
                        members.push(format!("\"image_url\":{{\"url\":{}}}", string(rng)));
                    }
                    if rng.below(2) == 0 {
                        members.push(format!("\"type\":{}", string(rng)));
                    }
                    // Any order.
                    for j in (1..members.len()).rev() {
                        members.swap(j, rng.below(j + 1));
                    }
                    out.push_str(&format!("{{{}}}", members.join(",")));
                }
            }
        }
        out.push(']');
    }

    fn gen_body(rng: &mut Rng) -> String {
        let mut out = String::from("{");
        if rng.below(4) > 0 {
            out.push_str(&format!("\"model\":\"{}\",", rng.pick(STRINGS)));
        }
        for field in ["messages", "input", "system"] {
            if rng.below(3) == 0 {
                continue;
            }
            if field == "system" {
                out.push_str("\"system\":");
                gen_content(rng, 1, &mut out);
                out.push(',');
                continue;
            }
            out.push_str(&format!("\"{field}\":["));
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                let role = ["user", "User", "x"][rng.below(3)];
                out.push_str(&format!("{{\"role\":\"{role}\",\"content\":"));
                gen_content(rng, 0, &mut out);
                out.push('}');
            }
            out.push_str("],");
        }
        let mut inner = String::new();
        gen_object(rng, 0, "", &mut inner);
        out.push_str(&inner[1..]);
        if out.ends_with(",}") {
            out.truncate(out.len() - 2);
            out.push('}');
        }
        out
    }

    const ALL_KINDS: [Kind; 10] = [
        Kind::OllamaChat,
        Kind::OllamaGenerate,
        Kind::OllamaEmbed,
        Kind::OpenAiGenerate,
        Kind::OpenAiEmbed,
        Kind::Responses,
        Kind::Messages,
        Kind::ModelOnly,
        Kind::Copy,
        Kind::Create,
    ];

    /// Compares the streaming inspection with the tree one butler used before on one body:
    /// the verdict, every fact, the texts, the scan (joined texts in the old order) and the
    /// edits (as JSON values).
    fn agree(kind: Kind, body: &str) {
        let new = inspect(kind, body.as_bytes());
        let old = oracle::inspect(kind, body.as_bytes());
        let (mut new, mut old) = match (new, old) {
            (Ok(n), Ok(o)) => (n, o),
            (Err(n), Err(o)) => return assert_eq!(n, o, "{kind:?} {body}"),
            (n, o) => panic!("{kind:?} {body}: {:?} vs {:?}", n.err(), o.err()),
        };
        let models: Vec<&str> = new.models.iter().map(|m| m.as_ref()).collect();
        assert_eq!(models, old.models, "{kind:?} {body}");
        assert_eq!(
            (new.num_ctx, new.predict, new.predict_smallest, new.predict_effective),
            (old.num_ctx, old.predict, old.predict_smallest, old.predict_effective),
            "{kind:?} {body}"
        );
        assert_eq!(
            (new.keep_alive, new.unload, new.debug_render_only, new.web_search),
            (old.keep_alive, old.unload, old.debug_render_only, old.web_search),
            "{kind:?} {body}"
        );
        assert_eq!(
            (new.runner_option, new.context, create_parameters(&new), creates_remote(&new)),
            (
                old.runner_option,
                old.context,
                oracle::create_parameters(&old.body),
                oracle::creates_remote(&old)
            ),
            "{kind:?} {body}"
        );
        let mut texts = (Vec::new(), Vec::new());
        new.for_each_text(|t| texts.0.push(t.into_owned()));
        old.for_each_text(|t| texts.1.push(t.to_owned()));
        assert_eq!(texts.0, texts.1, "{kind:?} {body}");
        let mut scanned: Vec<(Origin, String)> = Vec::new();
        new.scan_from(|t, origin| {
            scanned.push((origin, t.to_owned()));
            false
        });
        // The old order: the body's texts, then joined parts by origin.
        scanned.sort_by_key(|(origin, _)| *origin);
        let scanned: Vec<String> = scanned.into_iter().map(|(_, t)| t).collect();
        let mut old_scanned = Vec::new();
        old.scan(|t| {
            old_scanned.push(t.to_owned());
            false
        });
        assert_eq!(scanned, old_scanned, "{kind:?} {body}");
        // Texts noted by the first walk (here `for_each_text`'s, or the scan's) are replayed.
        let mut replayed = Vec::new();
        new.for_each_text(|t| replayed.push(t.into_owned()));
        assert_eq!(replayed, texts.0, "{kind:?} {body}");
        let fresh = inspect(kind, body.as_bytes()).unwrap();
        fresh.scan(|_| false);
        let mut replayed = Vec::new();
        fresh.for_each_text(|t| replayed.push(t.into_owned()));
        assert_eq!(replayed, texts.0, "{kind:?} {body}");

        // Edits: the same JSON as the tree's re-serialisation, and a body that inspects.
        let as_value = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        let new_edit = inject_predict(kind, &mut new.body, 77);
        let old_edit = oracle::inject_predict(kind, &mut old.body, 77);
        assert_eq!(new_edit, old_edit);
        let usage = include_usage(&mut new.body);
        assert_eq!(usage, oracle::include_usage(&mut old.body), "{kind:?} {body}");
        if new_edit || usage {
            let out = new.body.to_bytes();
            let mut want = as_value(&old.body.to_bytes());
            // Where the cap goes into `options`, a variant of `num_predict` that Ollama's
            // map ignores is removed as well (the tree kept it, which made its own result
            // fail re-inspection as a duplicate).
            if kind.predict_field() == Some(PredictField::Options)
                && let Some(serde_json::Value::Object(options)) = want
                    .as_object_mut()
                    .and_then(|o| o.iter_mut().find(|(k, _)| key_is(k, "options")).map(|e| e.1))
            {
                options.retain(|k, _| k == "num_predict" || !key_is(k, "num_predict"));
            }
            let text = String::from_utf8_lossy(&out).into_owned();
            assert_eq!(as_value(&out), want, "{kind:?} {body}\n{text}");
            let again = inspect(kind, &out).unwrap_or_else(|e| panic!("{e}: {text}"));
            if new_edit {
                assert!(again.predict_effective, "{text}");
            }
        }
    }

    #[test]
    fn streaming_inspection_agrees_with_the_tree_on_random_bodies() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let (mut ok, mut joined, mut edited) = (0, 0, 0);
        for _ in 0..6000 {
            let body = gen_body(&mut rng);
            for kind in ALL_KINDS {
                agree(kind, &body);
                if let Ok(mut r) = inspect(kind, body.as_bytes()) {
                    ok += 1;
                    r.scan_from(|_, o| {
                        joined += usize::from(o != Origin::Body);
                        false
                    });
                    edited += usize::from(include_usage(&mut r.body));
                }
            }
        }
        // The generator must keep reaching the interesting cases.
        assert!(ok > 5000 && joined > 2000 && edited > 10, "{ok} {joined} {edited}");
    }

    #[test]
    fn streaming_inspection_agrees_with_the_tree_on_chosen_bodies() {
        let bodies = [
            r#"{"model":"m","messages":[{"role":"user","content":[{"content":[{"text":"c"}],"text":"a","type":"tool_result"},{"text":"b"}]}]}"#,
            r#"{"model":"m","messages":[{"content":[{"content":"x","text":"t"},"s",["no"],{"content":["y",{"text":"z","content":"w"}]}]}],"system":[{"text":"a"},"b"]}"#,
            r#"{"system":"s","model":"m","input":[{"content":["a","b"]}],"messages":[{"content":["c","d"]}]}"#,
            r#"{"model":"m","messages":[{"content":[{"type":"image","source":{"data":"D","type":"base64"}},{"source":{"type":"base64","data":"E"}},{"source":{"type":null,"data":"F"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"assistant","images":["I"],"content":[{"image_url":"data:1"},{"image_url":{"url":"data:2","x":"data:3"}},{"image_url":{"url":"http://u"}}]}]}"#,
            r#"{"model":"m","options":{"NUM_PREDICT":5,"temperature":1},"stream":true}"#,
            r#"{"model":"m","options":{"num_predict":null},"max_tokens":null,"max_output_tokens":null,"stream":true,"stream_options":null}"#,
            r#"{ "model" : "m" , "stream" : true , "stream_options" : { "include_usage" : false } }"#,
            r#"{"stream_options":{"Include_Usage":false,"x":1},"model":"m","stream":true,"max_tokens":null}"#,
            r#"{"max_tokens":null}"#,
            r#"{"model":"m","keep_alive":"0s","messages":[]}"#,
            r#"{"model":"m","prompt":"","keep_alive":0}"#,
            r#"{"model":"m","tools":[{"type":"web_search"},5,{"type":null}]}"#,
            r#"{"model":"m","parameters":{"num_ctx":1,"NUM_PREDICT":-1},"remote_host":"h","from":"f"}"#,
        ];
        for body in bodies {
            for kind in ALL_KINDS {
                agree(kind, body);
            }
        }
    }

    #[test]
    fn the_deepest_body_is_walked_on_a_worker_stack() {
        // Content blocks nested as deep as the parser allows (each level an object and an
        // array), walked on a stack the size of a worker's (1 MiB), unoptimised.
        let levels = (jsonscan::MAX_DEPTH - 4) / 2;
        let mut body = String::from(r#"{"model":"m","messages":[{"content":"#);
        for _ in 0..levels {
            body.push_str(r#"[{"text":"t","source":{"type":"base64","data":"d"},"content":"#);
        }
        body.push_str(r#""x""#);
        body.push_str(&"}]".repeat(levels));
        body.push_str("}]}");
        let run = move || {
            let mut r = inspect(Kind::Messages, body.as_bytes()).expect("accepted");
            let mut joined = 0;
            r.scan_from(|_, origin| {
                joined += usize::from(origin != Origin::Body);
                false
            });
            let mut texts = 0;
            r.for_each_text(|_| texts += 1);
            assert!(inject_predict(Kind::Messages, &mut r.body, 5));
            assert!(inspect(Kind::Messages, &r.body.to_bytes()).is_ok());
            (joined, texts)
        };
        let (joined, texts) =
            std::thread::Builder::new().stack_size(1 << 20).spawn(run).unwrap().join().unwrap();
        assert_eq!(joined, 2, "the message's parts joined with \"\" and \"\\n\"");
        assert_eq!(texts, 2 * levels + 1, "each level's text and source type, and the last");
    }

    #[test]
    fn field_table_matches_the_enum() {
        for (i, (_, field)) in FIELDS.iter().enumerate() {
            assert_eq!(*field as usize, i);
        }
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
