//! The tree-based inspection butler used before the streaming one (kept for tests only): the
//! oracle the streaming reader is compared against on generated bodies. Same code as before,
//! renamed; `Json` and `parse_object` are still the main module's.

use std::ops::ControlFlow;

use super::*;

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

/// A string a prompt filter sees (SPEC §7.4): a string value or an object key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Value(&'a str),
    Key(&'a str),
}
