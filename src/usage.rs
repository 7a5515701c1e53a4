//! Token usage read from response bodies as they stream past (SPEC §9, §10).
//!
//! butler copies an upstream body to the client chunk by chunk, and chunk boundaries fall
//! anywhere: inside a line, inside a JSON string, inside a UTF-8 sequence. A [`Tap`] watches that
//! byte stream and learns the token counts Ollama reports, without delaying or changing a byte —
//! except for the one documented case of hiding the usage butler itself asked for. It also
//! counts output chunks, so a body that ends without counts can be charged an estimate.
//!
//! # Design
//!
//! The body is never buffered for parsing. A small incremental JSON scanner reads each document
//! byte by byte, tracking only the nesting (a bit per level, at most [`MAX_DEPTH`] levels) and the
//! keys of the outer three object levels, and captures the handful of values that matter (such as
//! `usage.prompt_tokens` or a top-level `"done": true`). Memory is therefore constant whatever the
//! size of a line or document, so there is no size cap on a non-streamed body: a batch of
//! embeddings many megabytes long is still charged (a cap would let a client dodge its token
//! budget by asking for big batches). Captured values count only once their document has parsed
//! completely; anything malformed is ignored.
//!
//! - **Ollama formats** ([`Format::OllamaGenerate`], [`Format::OllamaEmbed`]): the body is a
//!   sequence of JSON objects separated by whitespace, which covers NDJSON streams, a single
//!   object with or without a trailing newline, and even pretty-printed JSON. A malformed object
//!   is skipped up to the next newline, after which scanning resumes.
//! - **`/v1` formats** ([`Format::OpenAi`], [`Format::Anthropic`], [`Format::Responses`]): a body
//!   whose first non-blank byte is `{` or `[` is JSON as above; anything else is Server-Sent
//!   Events. Each event's `data:` lines (one leading space dropped, several lines joined by
//!   newlines as the SSE standard says) form one JSON document, read when the blank line ending
//!   the event arrives; `data: [DONE]` and other non-objects are ignored. `event:` lines are not
//!   needed: the JSON paths alone tell the events apart (a top-level `usage` only occurs in an
//!   Anthropic `message_delta`, `response.usage` only in a Responses `response.*` event, where it
//!   is `null` until the response ends). An event still open when the body ends is read too if its
//!   data is complete, so tokens reported just before a cut are not lost.
//!
//! The last report wins. Ollama, OpenAI and Responses bodies report once, as a whole. In an
//! OpenAI stream only a chunk without choices reports: Ollama's `/v1/completions` puts a zero
//! `usage` on every content chunk once usage is asked for, and the counts come in a final
//! `choices: []` chunk. Anthropic streams are charged from `message_delta`'s top-level `usage`
//! (`input_tokens` + `output_tokens`); `message_start`'s `message.usage` is Ollama's estimate
//! from the request and is not read. A count that is not a non-negative integer fitting a `u64`
//! (negative, fractional, exponent, string, too big) is ignored as if absent.
//!
//! # Estimates
//!
//! A body may end before its counts arrive (the client left, the upstream died) or never carry
//! any (`/api/embeddings`). For an estimate the tap also counts output chunks ([`Seen::deltas`]):
//! Ollama objects before the final one with a `message` or `response`, OpenAI chunks with
//! choices, Anthropic and Responses events with a top-level `delta` (not `message_delta`).
//! [`charge`] turns what was seen into what is charged.
//!
//! # Hiding the usage
//!
//! For a streamed `/v1/chat/completions` or `/v1/completions` whose client did not ask for
//! usage, butler adds `stream_options.include_usage` and must take away what that adds: the
//! event whose `choices` is an empty array and which carries a `usage` object is removed whole,
//! and a `usage` member on any other event (Ollama's completions chunks) is cut out of its JSON,
//! leaving every other byte as Ollama wrote it. While hiding, the bytes of an event that has not
//! ended yet are held back (everything before it is sent at once) until its blank line shows
//! what it is; then they are dropped (with the blank line, whatever the line endings), edited
//! or released. An event longer than [`HOLD_CAP`] is released unedited (its usage is still
//! counted), so holding never takes more memory than that. Hiding applies only to
//! [`Format::OpenAi`] SSE bodies; for other formats and for JSON bodies the flag is ignored.

use std::borrow::Cow;

/// Most bytes of one unfinished SSE event held back while hiding the usage chunk; a longer event
/// is released (it is not the short usage chunk Ollama writes).
pub const HOLD_CAP: usize = 1 << 20;

/// Deepest nesting the scanner follows (a document nested deeper is ignored).
pub const MAX_DEPTH: usize = 4096;

/// Longest object key the scanner remembers (all keys it looks for are shorter).
const KEY_CAP: usize = 24;

/// Token counts reported by Ollama for one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// What a [`Tap`] saw in a whole body (or up to where it was cut).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// The counts Ollama reported; None if they never arrived.
    pub usage: Option<Usage>,
    /// Output chunks seen: NDJSON objects with a `message` or `response` before the final one,
    /// SSE events with choices (`/v1` chat and completions) or a content `delta` (`/v1/messages`,
    /// `/v1/responses`). Each stands for one generated token in an estimate.
    pub deltas: u64,
}

/// The tokens a response is charged (SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub usage: Usage,
    /// No counts arrived: the tokens are an estimate.
    pub estimated: bool,
}

/// What a tapped response is charged: the counts Ollama reported or, when none arrived, an
/// estimate — the prompt at ⌈`prompt_bytes` / 4⌉ tokens (the bytes of the request's prompt
/// text) and one generated token per output chunk seen. Estimated: a successful response
/// without counts (a stream cut by either side, `/api/embeddings`, which reports none) and a
/// request whose client left before the response began (`status` None); Ollama may have done
/// the work either way, and charging nothing would let a client dodge its budget by hanging up.
/// Any other status without counts (an error answer) costs nothing.
pub fn charge(seen: Seen, prompt_bytes: u64, status: Option<u16>) -> Option<Charge> {
    if let Some(usage) = seen.usage {
        return Some(Charge { usage, estimated: false });
    }
    if status.is_some_and(|s| !(200..300).contains(&s)) {
        return None;
    }
    let usage = Usage { prompt: prompt_bytes.div_ceil(4), completion: seen.deltas };
    Some(Charge { usage, estimated: true })
}

/// Which wire format and API a response body uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `/api/chat`, `/api/generate`: one JSON object (stream:false) or NDJSON lines; the final
    /// object has `"done": true` with `prompt_eval_count` (ABSENT when the prompt was cached →
    /// count 0) and `eval_count`.
    OllamaGenerate,
    /// `/api/embed`: one JSON object with `prompt_eval_count` (completion 0). (`/api/embeddings`
    /// reports nothing → no usage, so it is charged an estimate.)
    OllamaEmbed,
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: a JSON object with
    /// `usage: {prompt_tokens, completion_tokens}` or an SSE stream of `data: {...}` events ending
    /// with `data: [DONE]`, where (with `stream_options.include_usage`) a final chunk carries
    /// `usage` and an empty `choices` array (and completions chunks a zero `usage` each).
    OpenAi,
    /// `/v1/messages` (Anthropic): JSON `usage: {input_tokens, output_tokens}`, or SSE events
    /// where `message_delta` has `usage: {input_tokens, output_tokens}` (`message_start`'s
    /// `message.usage` is an estimate and is not read).
    Anthropic,
    /// `/v1/responses`: JSON `usage: {input_tokens, output_tokens}`, or SSE with a
    /// `response.completed` event whose `response.usage` has them.
    Responses,
}

/// Watches a response body as it streams past.
#[derive(Debug)]
pub struct Tap {
    format: Format,
    /// Hiding is on (only ever for [`Format::OpenAi`]).
    hide: bool,
    mode: Mode,
    scan: Scanner,
    /// JSON mode: a malformed document is being skipped up to the next newline.
    skip_line: bool,
    /// SSE: where in the current line we are.
    line: Line,
    /// SSE: the previous byte was `\r`, so a `\n` now belongs to the same line ending.
    cr: bool,
    /// SSE: a non-blank line has been seen since the last blank line.
    event_open: bool,
    /// SSE: the open event has `data` lines (fed to `scan`).
    data_seen: bool,
    /// Hiding: the open event's bytes are being held back (in `held` and the current chunk).
    holding: bool,
    /// Hiding: bytes of the open event from earlier chunks.
    held: Vec<u8>,
    /// Hiding: an event ended with a blank line terminated by `\r`; a `\n` right after it still
    /// belongs to the event. `pending` says what becomes of the event.
    end_pending: bool,
    pending: Edit,
    usage: Option<Usage>,
    /// Documents or events carrying generated output, for an estimate (see [`Seen::deltas`]).
    deltas: u64,
}

/// What hiding does to one SSE event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    Keep,
    /// The usage chunk (`choices: []` with a `usage`): removed whole.
    Drop,
    /// A chunk with choices and a `usage` member (Ollama's `/v1/completions` puts a zero one on
    /// every chunk once usage is asked for): the member is removed.
    Strip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `/v1` body before its first non-blank byte: JSON or SSE is not known yet (bytes so far go
    /// through the SSE machine, which treats them as blank lines or an ignored line).
    Unknown,
    Json,
    Sse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// In the field name; `data` says it still matches `"data"` over its first `len` bytes.
    Name { len: u8, data: bool },
    /// In the value of a `data` field; `first` is true right after the colon (where one space
    /// is dropped).
    Data { first: bool },
    /// In another field or a comment.
    Skip,
}

impl Tap {
    /// `hide_usage_chunk`: for a streamed `/v1/chat/completions` or `/v1/completions` where
    /// butler itself added `stream_options.include_usage` (the client did not ask), the SSE event
    /// whose `choices` is an empty array and which carries `usage` must be removed from what the
    /// client receives, and a `usage` member from any other event. Ignored for formats other
    /// than [`Format::OpenAi`].
    pub fn new(format: Format, hide_usage_chunk: bool) -> Tap {
        let ollama = matches!(format, Format::OllamaGenerate | Format::OllamaEmbed);
        Tap {
            format,
            hide: hide_usage_chunk && format == Format::OpenAi,
            mode: if ollama { Mode::Json } else { Mode::Unknown },
            scan: Scanner::new(),
            skip_line: false,
            line: Line::Start,
            cr: false,
            event_open: false,
            data_seen: false,
            holding: false,
            held: Vec::new(),
            end_pending: false,
            pending: Edit::Keep,
            usage: None,
            deltas: 0,
        }
    }

    /// Turns hiding off: for a body whose length was announced, removing an
    /// event would break its framing, so every byte goes through.
    pub fn keep_every_byte(&mut self) {
        self.hide = false;
    }

    /// Feeds the next chunk exactly as the upstream sent it. Returns the bytes to send to the
    /// client for this chunk: borrowed `chunk` unchanged in the normal case (`Cow::Borrowed`), or
    /// an owned, edited version only when `hide_usage_chunk` removed or edited (part of) an event. When
    /// hiding, bytes that might belong to the usage event may be held back until the event
    /// boundary (blank line) is seen — only from the start of an event that has not ended yet;
    /// everything before it is released at once.
    pub fn feed<'a>(&mut self, chunk: &'a [u8]) -> Cow<'a, [u8]> {
        if self.mode == Mode::Json {
            self.feed_json(chunk);
            return Cow::Borrowed(chunk);
        }
        let mut out = Out::new(chunk, !self.held.is_empty());
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if self.end_pending {
                self.end_pending = false;
                let end = if b == b'\n' { i + 1 } else { i };
                self.end_event(&mut out, end, self.pending);
            }
            if self.mode == Mode::Unknown && !is_ws(b) {
                if b == b'{' || b == b'[' {
                    // One JSON document after all: release whatever blank bytes were held and
                    // let everything else through.
                    self.mode = Mode::Json;
                    self.holding = false;
                    out.buf.append(&mut self.held);
                    out.pass(chunk.len());
                    self.feed_json(&chunk[i..]);
                    return out.finish();
                }
                self.mode = Mode::Sse;
            }
            self.sse_byte(b, i, &mut out);
            i += 1;
            // Skip what cannot matter: the inside of a string or number of a data line (which
            // never spans a line ending), or the rest of an ignored line.
            let rest = &chunk[i..];
            i += match self.line {
                Line::Data { first: false } => self.scan.skippable(rest),
                Line::Skip => {
                    rest.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(rest.len())
                }
                _ => 0,
            };
        }
        if self.holding {
            let rest = &chunk[out.pos..];
            if self.held.len() + rest.len() > HOLD_CAP {
                self.holding = false;
                out.buf.append(&mut self.held);
                out.pass(chunk.len());
            } else {
                // Held, not sent: the output ends at `out.pos`.
                self.held.extend_from_slice(rest);
            }
        } else {
            out.pass(chunk.len());
        }
        out.finish()
    }

    /// At the end of the body (or where it was cut): any held-back bytes to send, and what was
    /// seen — the usage reported (None if the body reported none, e.g. the stream was cut before
    /// its counts) and the output chunks counted.
    pub fn finish(mut self) -> (Vec<u8>, Seen) {
        let mut edit = Edit::Keep;
        if self.end_pending {
            edit = self.pending;
        } else if self.mode == Mode::Sse && self.event_open {
            edit = self.dispatch();
        }
        // Holding implies the held bytes are within HOLD_CAP.
        let tail = match (self.holding, edit) {
            (false, _) | (true, Edit::Drop) => Vec::new(),
            (true, Edit::Keep) => std::mem::take(&mut self.held),
            (true, Edit::Strip) => strip_usage(&self.held).unwrap_or_else(|| self.held.clone()),
        };
        (tail, Seen { usage: self.usage, deltas: self.deltas })
    }

    /// A sequence of JSON documents (Ollama bodies, non-streamed `/v1` bodies).
    fn feed_json(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if self.skip_line {
                match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(n) => i += n + 1,
                    None => return,
                }
                self.skip_line = false;
                continue;
            }
            i += self.scan.skippable(&bytes[i..]);
            let Some(&b) = bytes.get(i) else { return };
            i += 1;
            match self.scan.byte(b) {
                Step::More => {}
                Step::Complete => {
                    self.commit();
                    self.scan.reset();
                }
                Step::Error => {
                    self.scan.reset();
                    self.skip_line = b != b'\n';
                }
            }
        }
    }

    /// One byte of an SSE body at index `i` of the current chunk.
    fn sse_byte(&mut self, b: u8, i: usize, out: &mut Out<'_>) {
        if self.cr {
            self.cr = false;
            if b == b'\n' {
                return; // the rest of a `\r\n`
            }
        }
        let eol = b == b'\n' || b == b'\r';
        self.cr = b == b'\r';
        if self.line == Line::Start {
            if eol {
                // A blank line ends the open event, if any.
                if self.event_open {
                    let edit = self.dispatch();
                    if b == b'\r' {
                        self.end_pending = true;
                        self.pending = edit;
                    } else {
                        self.end_event(out, i + 1, edit);
                    }
                }
                return;
            }
            if !self.event_open {
                self.event_open = true;
                if self.hide {
                    out.pass(i);
                    self.holding = true;
                }
            }
            self.line = Line::Name { len: 0, data: true };
        }
        match self.line {
            Line::Start => {}
            Line::Name { len, data } => {
                let is_data = data && len == 4;
                if eol {
                    // A field without a colon has an empty value.
                    if is_data {
                        self.data_seen = true;
                        self.scan.byte(b'\n');
                    }
                    self.line = Line::Start;
                } else if b == b':' {
                    if is_data {
                        self.data_seen = true;
                        self.line = Line::Data { first: true };
                    } else {
                        self.line = Line::Skip;
                    }
                } else {
                    let data = data && b"data".get(usize::from(len)) == Some(&b);
                    self.line = Line::Name { len: len.saturating_add(1), data };
                }
            }
            Line::Data { first } => {
                if eol {
                    // Lines of one event's data are joined with newlines.
                    self.scan.byte(b'\n');
                    self.line = Line::Start;
                } else {
                    self.line = Line::Data { first: false };
                    if !(first && b == b' ') {
                        self.scan.byte(b);
                    }
                }
            }
            Line::Skip => {
                if eol {
                    self.line = Line::Start;
                }
            }
        }
    }

    /// The open SSE event is over: reads its data, resets for the next event, and says what
    /// hiding does to it.
    fn dispatch(&mut self) -> Edit {
        let edit =
            if self.data_seen && self.scan.is_complete() { self.commit() } else { Edit::Keep };
        self.scan.reset();
        self.data_seen = false;
        self.event_open = false;
        self.line = Line::Start;
        edit
    }

    /// The held event ends just before index `end` of the current chunk: drop, edit or release
    /// it.
    fn end_event(&mut self, out: &mut Out<'_>, end: usize, edit: Edit) {
        if !self.holding {
            return;
        }
        self.holding = false;
        // An event longer than HOLD_CAP is never edited, whether or not it was split: hiding
        // depends on the bytes alone, not on where chunks happen to end.
        if edit == Edit::Keep || self.held.len() + (end - out.pos) > HOLD_CAP {
            out.buf.append(&mut self.held);
            out.pass(end);
            return;
        }
        out.modify();
        if edit == Edit::Strip {
            self.held.extend_from_slice(&out.chunk[out.pos..end]);
            match strip_usage(&self.held) {
                Some(event) => out.buf.extend_from_slice(&event),
                None => out.buf.extend_from_slice(&self.held),
            }
        }
        self.held.clear();
        out.pos = end;
    }

    /// Takes the usage and the output count from a complete document; returns what hiding does
    /// to it.
    fn commit(&mut self) -> Edit {
        let caps = &self.scan.caps;
        let num = |s: Slot| match caps[s as usize] {
            Some(Val::Num(n)) => Some(n),
            _ => None,
        };
        let has = |s: Slot| caps[s as usize].is_some();
        let usage_object = caps[Slot::Usage as usize] == Some(Val::Object);
        let choices = caps[Slot::Choices as usize];
        let sse = self.mode == Mode::Sse;
        // The counts this document reports (None: it reports none), and whether it carries
        // generated output.
        let (report, output) = match self.format {
            Format::OllamaGenerate => {
                if caps[Slot::Done as usize] == Some(Val::True) {
                    // A cached prompt has no prompt_eval_count: 0 tokens evaluated.
                    let prompt = Some(num(Slot::PromptEvalCount).unwrap_or(0));
                    (Some((prompt, num(Slot::EvalCount))), false)
                } else {
                    (None, has(Slot::Message) || has(Slot::ResponseText))
                }
            }
            Format::OllamaEmbed => (Some((num(Slot::PromptEvalCount), None)), false),
            Format::OpenAi => {
                let counts = (num(Slot::UsagePromptTokens), num(Slot::UsageCompletionTokens));
                // In a stream, a chunk that still has choices is output, and its usage is not
                // the report: Ollama's `/v1/completions` puts a zero usage on every chunk once
                // usage is asked for, and the counts come in a final `choices: []` chunk.
                let content = sse && choices == Some(Val::NonEmptyArray);
                ((!content).then_some(counts), content)
            }
            // `message_delta` (or a whole message) reports at the top level; `message_start`'s
            // `message.usage` is Ollama's estimate from the request and is not read. A content
            // delta has a `delta` and no usage (`message_delta` has both).
            Format::Anthropic => (
                Some((num(Slot::UsageInputTokens), num(Slot::UsageOutputTokens))),
                has(Slot::Delta) && !usage_object,
            ),
            Format::Responses => {
                let nested =
                    (num(Slot::ResponseUsageInputTokens), num(Slot::ResponseUsageOutputTokens));
                let counts = if nested == (None, None) {
                    (num(Slot::UsageInputTokens), num(Slot::UsageOutputTokens))
                } else {
                    nested
                };
                (Some(counts), has(Slot::Delta))
            }
        };
        if let Some((prompt, completion)) = report
            && (prompt.is_some() || completion.is_some())
        {
            self.usage =
                Some(Usage { prompt: prompt.unwrap_or(0), completion: completion.unwrap_or(0) });
        }
        if output {
            self.deltas = self.deltas.saturating_add(1);
        }
        if !self.hide || !usage_object {
            Edit::Keep
        } else if choices == Some(Val::EmptyArray) {
            Edit::Drop
        } else {
            Edit::Strip
        }
    }
}

/// The output for one chunk while hiding: `chunk` minus dropped and held bytes, plus released
/// ones. Nothing is copied as long as the output is a prefix of `chunk`.
struct Out<'c> {
    chunk: &'c [u8],
    /// The output so far, once `modified`.
    buf: Vec<u8>,
    /// Bytes of `chunk` before `pos` are dealt with (sent, held or dropped).
    pos: usize,
    /// The output differs from `chunk[..pos]` (until then `buf` is empty and unused).
    modified: bool,
}

impl<'c> Out<'c> {
    fn new(chunk: &'c [u8], modified: bool) -> Self {
        Out { chunk, buf: Vec::new(), pos: 0, modified }
    }

    /// Sends `chunk[pos..to]`.
    fn pass(&mut self, to: usize) {
        if self.modified {
            self.buf.extend_from_slice(&self.chunk[self.pos..to]);
        }
        self.pos = to;
    }

    /// The output is about to differ from `chunk`: materialise what has been sent so far.
    fn modify(&mut self) {
        if !self.modified {
            self.modified = true;
            self.buf.extend_from_slice(&self.chunk[..self.pos]);
        }
    }

    /// Everything sent: `buf` once modified, else the prefix of `chunk` up to `pos`.
    fn finish(self) -> Cow<'c, [u8]> {
        if self.modified { Cow::Owned(self.buf) } else { Cow::Borrowed(&self.chunk[..self.pos]) }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

// ---------------------------------------------------------------------------------------------
// Removing the usage member from a held event.

/// `event` (one whole SSE event, its blank line included or not) with every top-level `usage`
/// member removed from the JSON object of its data; everything else stays byte for byte.
/// None when there is nothing to remove or the event is not a single `data` line holding one
/// JSON object (Ollama writes each chunk as one `data:` line; the caller then sends the event
/// as it is). The event was already read whole by the scanner, so this second pass over at most
/// [`HOLD_CAP`] bytes happens only for events that do carry a usage.
fn strip_usage(event: &[u8]) -> Option<Vec<u8>> {
    let (start, end) = single_data_value(event)?;
    let json = strip_member(&event[start..end], b"usage")?;
    let mut out = Vec::with_capacity(event.len());
    out.extend_from_slice(&event[..start]);
    out.extend_from_slice(&json);
    out.extend_from_slice(&event[end..]);
    Some(out)
}

/// Where the value of the one `data` line of an SSE event lies (after the colon and one optional
/// space, up to the line ending); None unless exactly one line is a `data` field.
fn single_data_value(event: &[u8]) -> Option<(usize, usize)> {
    let mut found = None;
    let mut count = 0;
    let mut line = 0;
    while line < event.len() {
        let len = event[line..].iter().position(|&b| b == b'\n' || b == b'\r');
        let end = len.map_or(event.len(), |n| line + n);
        let text = &event[line..end];
        if text == b"data" || text.starts_with(b"data:") {
            count += 1;
            let mut start = (line + 5).min(end);
            if event.get(start) == Some(&b' ') && start < end {
                start += 1;
            }
            found = Some((start, end));
        }
        // Past the line ending (`\r\n` counts as one).
        line = end + 1;
        if event.get(end) == Some(&b'\r') && event.get(end + 1) == Some(&b'\n') {
            line += 1;
        }
    }
    if count == 1 { found } else { None }
}

/// One top-level member of a JSON object: its text runs from `own` (the end of the previous
/// value, so the separating comma is its own, or just after `{` for the first) to `end`; its
/// key starts at `key`.
struct Member {
    own: usize,
    key: usize,
    end: usize,
    drop: bool,
}

/// `json` (one object) without its top-level members named `name`; None if it has none or is
/// not an object.
fn strip_member(json: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let open = skip_ws(json, 0);
    if json.get(open) != Some(&b'{') {
        return None;
    }
    let mut members = Vec::new();
    let mut own = open + 1;
    let mut i = skip_ws(json, own);
    if json.get(i) != Some(&b'}') {
        loop {
            let key = i;
            let key_end = skip_string(json, key)?;
            // Keys are compared decoded, as the scanner does (`\u0075sage` is `usage`).
            let decoded: String = serde_json::from_slice(&json[key..key_end]).ok()?;
            i = skip_ws(json, key_end);
            if json.get(i) != Some(&b':') {
                return None;
            }
            let end = skip_value(json, skip_ws(json, i + 1))?;
            members.push(Member { own, key, end, drop: decoded.as_bytes() == name });
            i = skip_ws(json, end);
            match json.get(i)? {
                b',' => {
                    own = end;
                    i = skip_ws(json, i + 1);
                }
                b'}' => break,
                _ => return None,
            }
        }
    }
    let last = members.last()?.end;
    if !members.iter().any(|m| m.drop) {
        return None;
    }
    let mut out = Vec::with_capacity(json.len());
    out.extend_from_slice(&json[..=open]);
    let mut first = true;
    for m in members.iter().filter(|m| !m.drop) {
        // The first member kept loses the comma it had after a dropped one.
        let from = if first && m.own != open + 1 { m.key } else { m.own };
        out.extend_from_slice(&json[from..m.end]);
        first = false;
    }
    out.extend_from_slice(&json[last..]);
    Some(out)
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while json.get(i).is_some_and(|&b| is_ws(b)) {
        i += 1;
    }
    i
}

/// The index just past the string starting at `i`.
fn skip_string(json: &[u8], i: usize) -> Option<usize> {
    if json.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        match json.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// The index just past the value starting at `i`.
fn skip_value(json: &[u8], i: usize) -> Option<usize> {
    match json.get(i)? {
        b'"' => skip_string(json, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match json.get(j)? {
                    b'"' => {
                        j = skip_string(json, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = json[i..].iter().position(|&b| matches!(b, b',' | b'}' | b']') || is_ws(b));
            Some(len.map_or(json.len(), |n| i + n))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The incremental JSON scanner.

/// Object keys the scanner recognises in the outer three levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// Any other key (or none read yet).
    Other,
    /// The level is an array.
    Array,
    Choices,
    CompletionTokens,
    Delta,
    Done,
    EvalCount,
    InputTokens,
    Message,
    OutputTokens,
    PromptEvalCount,
    PromptTokens,
    Response,
    Usage,
}

impl Key {
    fn of(name: &[u8]) -> Key {
        match name {
            b"choices" => Key::Choices,
            b"completion_tokens" => Key::CompletionTokens,
            b"delta" => Key::Delta,
            b"done" => Key::Done,
            b"eval_count" => Key::EvalCount,
            b"input_tokens" => Key::InputTokens,
            b"message" => Key::Message,
            b"output_tokens" => Key::OutputTokens,
            b"prompt_eval_count" => Key::PromptEvalCount,
            b"prompt_tokens" => Key::PromptTokens,
            b"response" => Key::Response,
            b"usage" => Key::Usage,
            _ => Key::Other,
        }
    }
}

/// The values captured, by position from the document's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Done,
    PromptEvalCount,
    EvalCount,
    Usage,
    UsagePromptTokens,
    UsageCompletionTokens,
    UsageInputTokens,
    UsageOutputTokens,
    Choices,
    ResponseUsageInputTokens,
    ResponseUsageOutputTokens,
    /// Top-level `message`, `response` and `delta`: present (not null) in output chunks.
    Message,
    ResponseText,
    Delta,
}

const SLOTS: [(Slot, &[Key]); 14] = [
    (Slot::Done, &[Key::Done]),
    (Slot::PromptEvalCount, &[Key::PromptEvalCount]),
    (Slot::EvalCount, &[Key::EvalCount]),
    (Slot::Usage, &[Key::Usage]),
    (Slot::UsagePromptTokens, &[Key::Usage, Key::PromptTokens]),
    (Slot::UsageCompletionTokens, &[Key::Usage, Key::CompletionTokens]),
    (Slot::UsageInputTokens, &[Key::Usage, Key::InputTokens]),
    (Slot::UsageOutputTokens, &[Key::Usage, Key::OutputTokens]),
    (Slot::Choices, &[Key::Choices]),
    (Slot::ResponseUsageInputTokens, &[Key::Response, Key::Usage, Key::InputTokens]),
    (Slot::ResponseUsageOutputTokens, &[Key::Response, Key::Usage, Key::OutputTokens]),
    (Slot::Message, &[Key::Message]),
    (Slot::ResponseText, &[Key::Response]),
    (Slot::Delta, &[Key::Delta]),
];

/// Deepest path a slot has.
const PATH_LEN: usize = 3;

impl Slot {
    /// Slots holding a token count.
    fn is_count(self) -> bool {
        !matches!(self, Slot::Done | Slot::Usage | Slot::Choices) && !self.is_presence()
    }

    /// Slots recording only that a value other than null is there.
    fn is_presence(self) -> bool {
        matches!(self, Slot::Message | Slot::ResponseText | Slot::Delta)
    }
}

/// A captured value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// A non-negative integer.
    Num(u64),
    /// `true`.
    True,
    /// An object.
    Object,
    /// `[]`.
    EmptyArray,
    /// An array with elements.
    NonEmptyArray,
    /// Any value but null (presence slots).
    Present,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    More,
    /// The top-level object just ended.
    Complete,
    /// Not JSON (the scanner stays in error until reset).
    Error,
}

/// What a string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str {
    Value,
    /// A key deeper than [`PATH_LEN`] (not remembered).
    Key,
    /// A key within [`PATH_LEN`], read into the buffer.
    TrackedKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Before the top-level object.
    Start,
    /// After `:` or after `,` in an array.
    Value,
    /// After `[`.
    ValueOrEnd,
    /// After `{`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    Colon,
    CommaOrEnd,
    /// After the top-level object: only whitespace may follow.
    Done,
    Str(Str),
    Esc(Str),
    /// In `\uXXXX`: digits read so far and their value.
    Hex(Str, u8, u16),
    Num,
    /// In `true`, `false` or `null`: the word and the bytes matched so far.
    Lit(&'static [u8], u8),
    Error,
}

/// Reads one JSON document (whose top level must be an object) incrementally, in constant
/// memory, capturing the values listed in [`SLOTS`].
#[derive(Debug)]
struct Scanner {
    state: St,
    depth: usize,
    /// One bit per open level: set for an object, clear for an array.
    kinds: [u64; MAX_DEPTH / 64],
    /// The key (or [`Key::Array`]) at each of the outer levels.
    path: [Key; PATH_LEN],
    /// The key or number being read.
    buf: [u8; KEY_CAP],
    len: usize,
    /// The key or number was longer than the buffer.
    over: bool,
    /// The number being read goes into a slot.
    capturing: bool,
    caps: [Option<Val>; SLOTS.len()],
}

impl Scanner {
    fn new() -> Scanner {
        Scanner {
            state: St::Start,
            depth: 0,
            kinds: [0; MAX_DEPTH / 64],
            path: [Key::Other; PATH_LEN],
            buf: [0; KEY_CAP],
            len: 0,
            over: false,
            capturing: false,
            caps: [None; SLOTS.len()],
        }
    }

    fn reset(&mut self) {
        self.state = St::Start;
        self.depth = 0;
        self.caps = [None; SLOTS.len()];
    }

    /// The top-level object has ended, followed by nothing but whitespace.
    fn is_complete(&self) -> bool {
        self.state == St::Done
    }

    fn byte(&mut self, b: u8) -> Step {
        match self.state {
            St::Str(kind) => match b {
                b'"' => return self.end_str(kind),
                b'\\' => self.state = St::Esc(kind),
                0..=0x1f => return self.fail(),
                _ => {
                    if kind == Str::TrackedKey {
                        self.push(b);
                    }
                }
            },
            St::Esc(kind) => {
                let c = match b {
                    b'"' | b'\\' | b'/' => b,
                    b'b' => 8,
                    b'f' => 12,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.state = St::Hex(kind, 0, 0);
                        return Step::More;
                    }
                    _ => return self.fail(),
                };
                if kind == Str::TrackedKey {
                    self.push(c);
                }
                self.state = St::Str(kind);
            }
            St::Hex(kind, n, acc) => {
                let Some(d) = char::from(b).to_digit(16) else { return self.fail() };
                let acc = acc << 4 | d as u16;
                if n < 3 {
                    self.state = St::Hex(kind, n + 1, acc);
                } else {
                    if kind == Str::TrackedKey {
                        // Only ASCII keys are looked for; 0xff matches none of them.
                        self.push(u8::try_from(acc).ok().filter(u8::is_ascii).unwrap_or(0xff));
                    }
                    self.state = St::Str(kind);
                }
            }
            St::Num => {
                if matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    if self.capturing {
                        self.push(b);
                    }
                } else {
                    // Numbers only occur inside the top-level object, so this leads to
                    // `CommaOrEnd` and `b` is read there.
                    self.end_num();
                    return self.byte(b);
                }
            }
            St::Lit(word, n) => {
                let n = usize::from(n);
                if word.get(n) != Some(&b) {
                    return self.fail();
                }
                if n + 1 == word.len() {
                    if word == b"true" && self.here() == Some(Slot::Done) {
                        self.caps[Slot::Done as usize] = Some(Val::True);
                    }
                    return self.value_done();
                }
                self.state = St::Lit(word, (n + 1) as u8);
            }
            St::Error => return Step::Error,
            _ if is_ws(b) => {}
            St::Start => {
                if b != b'{' {
                    return self.fail();
                }
                return self.open(true);
            }
            St::Value => return self.value(b),
            St::ValueOrEnd => {
                if b == b']' {
                    return self.close(true);
                }
                return self.value(b);
            }
            St::KeyOrEnd => match b {
                b'}' => return self.close(false),
                b'"' => self.key(),
                _ => return self.fail(),
            },
            St::Key => {
                if b != b'"' {
                    return self.fail();
                }
                self.key();
            }
            St::Colon => {
                if b != b':' {
                    return self.fail();
                }
                self.state = St::Value;
            }
            St::CommaOrEnd => {
                let object = self.in_object();
                match b {
                    b',' => self.state = if object { St::Key } else { St::Value },
                    b'}' if object => return self.close(false),
                    b']' if !object => return self.close(false),
                    _ => return self.fail(),
                }
            }
            St::Done => return self.fail(),
        }
        Step::More
    }

    /// How many of `bytes` would leave the state as it is (the inside of a string or of a number
    /// not captured, or anything after an error), so they need not be fed one by one. Never
    /// skips a line ending.
    fn skippable(&self, bytes: &[u8]) -> usize {
        let stop = match self.state {
            St::Str(Str::Value | Str::Key) => {
                bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            }
            St::Num if !self.capturing => bytes
                .iter()
                .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')),
            // A malformed SSE data line: nothing matters until the line ends.
            St::Error => bytes.iter().position(|&b| b == b'\n' || b == b'\r'),
            _ => Some(0),
        };
        stop.unwrap_or(bytes.len())
    }

    fn fail(&mut self) -> Step {
        self.state = St::Error;
        Step::Error
    }

    fn push(&mut self, b: u8) {
        if self.len < KEY_CAP {
            self.buf[self.len] = b;
            self.len += 1;
        } else {
            self.over = true;
        }
    }

    fn key(&mut self) {
        self.len = 0;
        self.over = false;
        let tracked = self.depth <= PATH_LEN;
        self.state = St::Str(if tracked { Str::TrackedKey } else { Str::Key });
    }

    fn end_str(&mut self, kind: Str) -> Step {
        match kind {
            Str::Value => return self.value_done(),
            Str::Key => {}
            Str::TrackedKey => {
                let key = if self.over { Key::Other } else { Key::of(&self.buf[..self.len]) };
                self.path[self.depth - 1] = key;
            }
        }
        self.state = St::Colon;
        Step::More
    }

    /// The start of a value (not the top-level object).
    fn value(&mut self, b: u8) -> Step {
        // A key given twice: its last value wins, so forget what the first one held.
        self.clear_here();
        if let Some(slot) = self.here()
            && slot.is_presence()
            && b != b'n'
        {
            self.caps[slot as usize] = Some(Val::Present);
        }
        match b {
            b'{' => {
                if self.here() == Some(Slot::Usage) {
                    self.caps[Slot::Usage as usize] = Some(Val::Object);
                }
                return self.open(true);
            }
            b'[' => return self.open(false),
            b'"' => self.state = St::Str(Str::Value),
            b'-' | b'0'..=b'9' => {
                self.len = 0;
                self.over = false;
                self.capturing = self.here().is_some_and(Slot::is_count);
                if self.capturing {
                    self.push(b);
                }
                self.state = St::Num;
            }
            b't' => self.state = St::Lit(b"true", 1),
            b'f' => self.state = St::Lit(b"false", 1),
            b'n' => self.state = St::Lit(b"null", 1),
            _ => return self.fail(),
        }
        Step::More
    }

    fn end_num(&mut self) {
        if self.capturing {
            let digits = &self.buf[..self.len];
            let valid = !self.over
                && !digits.is_empty()
                && digits.iter().all(u8::is_ascii_digit)
                && (digits.len() == 1 || digits[0] != b'0');
            let n = std::str::from_utf8(digits).ok().filter(|_| valid).and_then(|s| s.parse().ok());
            if let Some(slot) = self.here() {
                self.caps[slot as usize] = n.map(Val::Num);
            }
        }
        self.value_done();
    }

    fn open(&mut self, object: bool) -> Step {
        if self.depth >= MAX_DEPTH {
            return self.fail();
        }
        let (word, bit) = (self.depth / 64, 1u64 << (self.depth % 64));
        if object {
            self.kinds[word] |= bit;
        } else {
            self.kinds[word] &= !bit;
        }
        self.depth += 1;
        if self.depth <= PATH_LEN {
            self.path[self.depth - 1] = if object { Key::Other } else { Key::Array };
        }
        self.state = if object { St::KeyOrEnd } else { St::ValueOrEnd };
        Step::More
    }

    /// Closes the innermost container (the caller checked its kind); `empty_array` for `[]`.
    fn close(&mut self, empty_array: bool) -> Step {
        let array = !self.in_object();
        self.depth -= 1;
        if array && self.here() == Some(Slot::Choices) {
            let val = if empty_array { Val::EmptyArray } else { Val::NonEmptyArray };
            self.caps[Slot::Choices as usize] = Some(val);
        }
        self.value_done()
    }

    fn value_done(&mut self) -> Step {
        if self.depth == 0 {
            self.state = St::Done;
            Step::Complete
        } else {
            self.state = St::CommaOrEnd;
            Step::More
        }
    }

    fn in_object(&self) -> bool {
        let d = self.depth - 1;
        self.kinds[d / 64] & (1 << (d % 64)) != 0
    }

    /// The path of a value inside the current container, if it can lead to a slot.
    fn path_here(&self) -> Option<&[Key]> {
        let path = self.path.get(..self.depth)?;
        let plain = !path.is_empty() && path.iter().all(|k| !matches!(k, Key::Other | Key::Array));
        plain.then_some(path)
    }

    /// The slot of a value inside the current container.
    fn here(&self) -> Option<Slot> {
        let path = self.path_here()?;
        SLOTS.iter().find(|(_, p)| *p == path).map(|&(slot, _)| slot)
    }

    /// Forgets the slots at or under the path of a value inside the current container.
    fn clear_here(&mut self) {
        let Some(path) = self.path_here() else { return };
        let mut clear = [false; SLOTS.len()];
        for (c, (_, p)) in clear.iter_mut().zip(SLOTS) {
            *c = p.starts_with(path);
        }
        for (cap, c) in self.caps.iter_mut().zip(clear) {
            if c {
                *cap = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` in order; returns everything sent to the client and what the tap saw.
    fn run_seen(format: Format, hide: bool, chunks: &[&[u8]]) -> (Vec<u8>, Seen) {
        let mut tap = Tap::new(format, hide);
        let mut out = Vec::new();
        for chunk in chunks {
            let sent = tap.feed(chunk);
            if !hide {
                assert!(matches!(sent, Cow::Borrowed(_)), "edited without hiding");
            }
            out.extend_from_slice(&sent);
        }
        let (tail, seen) = tap.finish();
        out.extend_from_slice(&tail);
        (out, seen)
    }

    /// Like [`run_seen`], with the usage only.
    fn run(format: Format, hide: bool, chunks: &[&[u8]]) -> (Vec<u8>, Option<Usage>) {
        let (out, seen) = run_seen(format, hide, chunks);
        (out, seen.usage)
    }

    /// The output chunks a whole body counts.
    fn deltas(format: Format, body: &str) -> u64 {
        run_seen(format, false, &[body.as_bytes()]).1.deltas
    }

    fn whole(format: Format, hide: bool, body: &str) -> (Vec<u8>, Option<Usage>) {
        run(format, hide, &[body.as_bytes()])
    }

    fn usage(format: Format, body: &str) -> Option<Usage> {
        let (out, usage) = whole(format, false, body);
        assert_eq!(out, body.as_bytes());
        usage
    }

    fn u(prompt: u64, completion: u64) -> Option<Usage> {
        Some(Usage { prompt, completion })
    }

    /// Deterministic xorshift64*, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Splits `body` at random places (sometimes many tiny chunks, sometimes a few big ones).
    fn random_chunks<'a>(rng: &mut Rng, body: &'a [u8]) -> Vec<&'a [u8]> {
        let max = [1, 2, 3, 7, 16, 64, 1000][rng.below(7)];
        let mut chunks = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let n = (1 + rng.below(max)).min(rest.len());
            let (a, b) = rest.split_at(n);
            // Empty chunks must be harmless too.
            if rng.below(10) == 0 {
                chunks.push(&rest[..0]);
            }
            chunks.push(a);
            rest = b;
        }
        chunks
    }

    /// Every split in two, byte by byte, and random splits all give what one chunk gives.
    fn assert_boundary_independent(format: Format, hide: bool, body: &[u8]) {
        let expected = run_seen(format, hide, &[body]);
        for i in 0..=body.len() {
            let (a, b) = body.split_at(i);
            assert_eq!(run_seen(format, hide, &[a, b]), expected, "split at {i} of {format:?}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(run_seen(format, hide, &bytes), expected, "byte by byte, {format:?}");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ body.len() as u64);
        for _ in 0..200 {
            let chunks = random_chunks(&mut rng, body);
            assert_eq!(run_seen(format, hide, &chunks), expected, "random split of {format:?}");
        }
    }

    // Realistic bodies, as Ollama writes them.

    const OLLAMA_CHAT_STREAM: &str = concat!(
        r#"{"model":"llama3.2","created_at":"2025-03-01T10:00:00.123456Z","message":{"role":"assistant","content":"The"},"done":false}"#,
        "\n",
        r#"{"model":"llama3.2","created_at":"2025-03-01T10:00:00.223456Z","message":{"role":"assistant","content":" sky ☀️ is \"blue\"\n"},"done":false}"#,
        "\n",
        r#"{"model":"llama3.2","created_at":"2025-03-01T10:00:00.323456Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}"#,
        "\n",
    );

    const OLLAMA_GENERATE_SINGLE: &str = r#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"The sky is blue because of Rayleigh scattering.","done":true,"done_reason":"stop","context":[128006,882,128007,271,791,13180],"total_duration":5043500667,"load_duration":5025959,"prompt_eval_count":13,"prompt_eval_duration":325953000,"eval_count":290,"eval_duration":4709213000}"#;

    const OLLAMA_TOOL_CALL_STREAM: &str = concat!(
        r#"{"model":"qwen3","created_at":"2025-03-01T10:00:00Z","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"report","arguments":{"usage":{"prompt_tokens":999},"done":true,"eval_count":999}}}]},"done":false}"#,
        "\n",
        r#"{"model":"qwen3","created_at":"2025-03-01T10:00:01Z","message":{"role":"assistant","content":"{\"done\":true,\"eval_count\":999}"},"done":false}"#,
        "\n",
        r#"{"model":"qwen3","created_at":"2025-03-01T10:00:02Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":1,"load_duration":1,"prompt_eval_count":40,"prompt_eval_duration":1,"eval_count":21,"eval_duration":1}"#,
        "\n",
    );

    const OLLAMA_EMBED: &str = r#"{"model":"all-minilm","embeddings":[[0.010071029,-0.0017594862,0.05007221,0.04692972,0.054916814,0.008599704,0.105441414,-0.025878139,0.12958129,0.031952348],[-0.0098027075,0.06042469,0.025257962,-0.006364387,0.07272725,0.017194884,0.09032035,-0.051705178,0.09951512,0.09072481]],"total_duration":14143917,"load_duration":1019500,"prompt_eval_count":8}"#;

    const OPENAI_JSON: &str = r#"{"id":"chatcmpl-123","object":"chat.completion","created":1741570283,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":13,"completion_tokens":7,"total_tokens":20}}"#;

    const OPENAI_EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","embedding":[0.0023064255,-0.009327292,-0.0028842222],"index":0}],"model":"all-minilm","usage":{"prompt_tokens":5,"total_tokens":5}}"#;

    const OPENAI_CHUNK_1: &str = r#"data: {"id":"chatcmpl-94","object":"chat.completion.chunk","created":1741570283,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#;
    const OPENAI_CHUNK_2: &str = r#"data: {"id":"chatcmpl-94","object":"chat.completion.chunk","created":1741570283,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"lo"},"finish_reason":"stop"}]}"#;
    const OPENAI_USAGE_CHUNK: &str = r#"data: {"id":"chatcmpl-94","object":"chat.completion.chunk","created":1741570283,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}"#;

    /// An OpenAI SSE stream with the given line ending; `with_usage` adds the usage chunk.
    fn openai_stream(eol: &str, with_usage: bool) -> String {
        let mut events = vec![OPENAI_CHUNK_1, OPENAI_CHUNK_2];
        if with_usage {
            events.push(OPENAI_USAGE_CHUNK);
        }
        events.push("data: [DONE]");
        events.iter().map(|e| format!("{e}{eol}{eol}")).collect()
    }

    /// Ollama's streamed `/v1/completions`: with `include_usage`, a zero usage on every chunk
    /// and a last chunk with `choices: []` and the counts (middleware/openai.go).
    fn completions_stream(eol: &str, include_usage: bool) -> String {
        let head = r#"{"id":"cmpl-7","object":"text_completion","created":1741570283,"choices":["#;
        let foot = r#"],"model":"llama3.2","system_fingerprint":"fp_ollama""#;
        let zero = r#","usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#;
        let counts = r#","usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}"#;
        let choices = [
            r#"{"text":"Hel","index":0,"finish_reason":null}"#,
            r#"{"text":"lo","index":0,"finish_reason":null}"#,
            r#"{"text":"","index":0,"finish_reason":"stop"}"#,
        ];
        let mut events: Vec<String> = choices
            .iter()
            .map(|c| format!("data: {head}{c}{foot}{}}}", if include_usage { zero } else { "" }))
            .collect();
        if include_usage {
            events.push(format!("data: {head}{foot}{counts}}}"));
        }
        events.push("data: [DONE]".into());
        events.iter().map(|e| format!("{e}{eol}{eol}")).collect()
    }

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","content":[],"model":"llama3.2","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        "\n\n",
        "event: ping\n",
        r#"data: {"type": "ping"}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    /// Ollama's own `/v1/messages`: counts known only at the end, both in `message_delta`.
    const ANTHROPIC_OLLAMA_STREAM: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_7","type":"message","role":"assistant","model":"llama3.2","content":[],"usage":{"input_tokens":0,"output_tokens":0}}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":31,"output_tokens":9}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    const ANTHROPIC_JSON: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"llama3.2","content":[{"type":"text","text":"Hi! \"usage\":{\"input_tokens\":1}"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"output_tokens":6}}"#;

    const RESPONSES_STREAM: &str = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","created_at":1741290958,"status":"in_progress","model":"llama3.2","output":[],"usage":null}}"#,
        "\n\n",
        "event: response.in_progress\n",
        r#"data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_1","object":"response","created_at":1741290958,"status":"in_progress","model":"llama3.2","output":[],"usage":null}}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
        "\n\n",
        "event: response.completed\n",
        r#"data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","object":"response","created_at":1741290958,"status":"completed","model":"llama3.2","output":[{"id":"msg_1","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}}}"#,
        "\n\n",
    );

    const RESPONSES_JSON: &str = r#"{"id":"resp_1","object":"response","created_at":1741290958,"status":"completed","model":"llama3.2","output":[{"id":"msg_1","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}}"#;

    #[test]
    fn ollama_generate_stream_and_single() {
        assert_eq!(usage(Format::OllamaGenerate, OLLAMA_CHAT_STREAM), u(26, 282));
        assert_eq!(usage(Format::OllamaGenerate, OLLAMA_GENERATE_SINGLE), u(13, 290));
        // With a trailing newline, and pretty-printed.
        let with_newline = format!("{OLLAMA_GENERATE_SINGLE}\n");
        assert_eq!(usage(Format::OllamaGenerate, &with_newline), u(13, 290));
        let pretty = "{\n  \"done\": true,\n  \"prompt_eval_count\": 3,\n  \"eval_count\": 4\n}\n";
        assert_eq!(usage(Format::OllamaGenerate, pretty), u(3, 4));
    }

    #[test]
    fn cached_prompt_counts_zero_prompt_tokens() {
        let body = concat!(
            r#"{"model":"llama3.2","created_at":"2025-03-01T10:00:00Z","message":{"role":"assistant","content":"Hi"},"done":false}"#,
            "\n",
            r#"{"model":"llama3.2","created_at":"2025-03-01T10:00:01Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":1,"load_duration":1,"prompt_eval_duration":1,"eval_count":17,"eval_duration":1}"#,
            "\n",
        );
        assert_eq!(usage(Format::OllamaGenerate, body), u(0, 17));
        // A model load (empty prompt) reports done without any count.
        let load = r#"{"model":"llama3.2","created_at":"2025-03-01T10:00:00Z","response":"","done":true,"done_reason":"load"}"#;
        assert_eq!(usage(Format::OllamaGenerate, load), u(0, 0));
    }

    #[test]
    fn cut_streams_report_nothing() {
        let final_line = OLLAMA_CHAT_STREAM.trim_end().rfind('\n').unwrap() + 1;
        // Cut before the final object, and in the middle of it (even right before its last `}`).
        assert_eq!(usage(Format::OllamaGenerate, &OLLAMA_CHAT_STREAM[..final_line]), None);
        for cut in [final_line + 40, OLLAMA_CHAT_STREAM.len() - 2] {
            assert_eq!(usage(Format::OllamaGenerate, &OLLAMA_CHAT_STREAM[..cut]), None);
        }
        assert_eq!(usage(Format::OllamaGenerate, ""), None);
        let single = OLLAMA_GENERATE_SINGLE;
        assert_eq!(usage(Format::OllamaGenerate, &single[..single.len() - 1]), None);
        let embed = OLLAMA_EMBED;
        assert_eq!(usage(Format::OllamaEmbed, &embed[..embed.len() - 1]), None);
        // SSE cut inside the usage event's data; a stream without the usage chunk.
        let stream = openai_stream("\n", true);
        let cut = stream.find(r#""total_tokens""#).unwrap();
        assert_eq!(usage(Format::OpenAi, &stream[..cut]), None);
        assert_eq!(usage(Format::OpenAi, &openai_stream("\n", false)), None);
        let cut = RESPONSES_STREAM.find("event: response.completed").unwrap();
        assert_eq!(usage(Format::Responses, &RESPONSES_STREAM[..cut]), None);
        // Errors report nothing.
        assert_eq!(usage(Format::OllamaGenerate, r#"{"error":"model 'x' not found"}"#), None);
        assert_eq!(usage(Format::OpenAi, r#"{"error":{"message":"x","type":"api_error"}}"#), None);
    }

    #[test]
    fn a_complete_event_before_a_cut_still_counts() {
        // Anthropic: message_start's numbers are Ollama's estimate, not a report; a stream cut
        // before message_delta has no counts (and is charged an estimate).
        let cut = ANTHROPIC_STREAM.find("event: message_delta").unwrap();
        assert_eq!(usage(Format::Anthropic, &ANTHROPIC_STREAM[..cut]), None);
        // message_delta arrived whole, only its blank line is missing.
        let cut = ANTHROPIC_OLLAMA_STREAM.find("event: message_stop").unwrap() - 1;
        assert_eq!(usage(Format::Anthropic, &ANTHROPIC_OLLAMA_STREAM[..cut]), u(31, 9));
        // The usage event arrived whole, only its blank line is missing.
        let stream = openai_stream("\n", true);
        let cut = stream.find("data: [DONE]").unwrap() - 2;
        assert_eq!(usage(Format::OpenAi, &stream[..cut]), u(11, 2));
        assert_eq!(usage(Format::OpenAi, &stream[..cut + 1]), u(11, 2));
    }

    #[test]
    fn ollama_embed() {
        assert_eq!(usage(Format::OllamaEmbed, OLLAMA_EMBED), u(8, 0));
        // `/api/embeddings` reports nothing.
        let legacy =
            r#"{"embedding":[0.5670403838157654,0.009260174818336964,0.23178744316101074]}"#;
        assert_eq!(usage(Format::OllamaEmbed, legacy), None);
    }

    #[test]
    fn openai_bodies() {
        assert_eq!(usage(Format::OpenAi, OPENAI_JSON), u(13, 7));
        assert_eq!(usage(Format::OpenAi, &format!("\n  {OPENAI_JSON}\n")), u(13, 7));
        assert_eq!(usage(Format::OpenAi, OPENAI_EMBEDDINGS), u(5, 0));
        assert_eq!(usage(Format::OpenAi, &openai_stream("\n", true)), u(11, 2));
        assert_eq!(usage(Format::OpenAi, &openai_stream("\r\n", true)), u(11, 2));
        assert_eq!(usage(Format::OpenAi, &openai_stream("\r", true)), u(11, 2));
        // OpenAI itself sends `"usage":null` on every chunk but the last.
        let nulls = format!(
            "{}\n\n{}\n\n{OPENAI_USAGE_CHUNK}\n\ndata: [DONE]\n\n",
            OPENAI_CHUNK_1.replace("]}", r#"],"usage":null}"#),
            OPENAI_CHUNK_2.replace("]}", r#"],"usage":null}"#),
        );
        assert_eq!(usage(Format::OpenAi, &nulls), u(11, 2));
        // In a stream, a usage on a chunk that still has choices is not the report (Ollama's
        // `/v1/completions` puts a zero one on every chunk): cut before the final chunk, the
        // stream has no counts.
        let completions = completions_stream("\n", true);
        assert_eq!(usage(Format::OpenAi, &completions), u(7, 3));
        let cut = completions.find(r#""choices":[]"#).unwrap();
        assert_eq!(usage(Format::OpenAi, &completions[..cut]), None);
        let on_content = format!(
            "{}\n\ndata: [DONE]\n\n",
            OPENAI_CHUNK_2.replace("]}", r#"],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#),
        );
        assert_eq!(usage(Format::OpenAi, &on_content), None);
        // Legacy completions.
        let completions = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"llama3.2","choices":[{"text":"Hi","index":0,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        assert_eq!(usage(Format::OpenAi, completions), u(3, 1));
    }

    #[test]
    fn anthropic_bodies() {
        // Charged from message_delta: input_tokens + output_tokens there (none here).
        assert_eq!(usage(Format::Anthropic, ANTHROPIC_STREAM), u(0, 15));
        assert_eq!(usage(Format::Anthropic, ANTHROPIC_OLLAMA_STREAM), u(31, 9));
        assert_eq!(usage(Format::Anthropic, ANTHROPIC_JSON), u(12, 6));
        // message_start's numbers (Ollama's estimate from the request) never count, whatever
        // they are.
        let estimate = ANTHROPIC_OLLAMA_STREAM.replace(
            r#""input_tokens":0,"output_tokens":0"#,
            r#""input_tokens":500,"output_tokens":7"#,
        );
        assert_ne!(estimate, ANTHROPIC_OLLAMA_STREAM);
        assert_eq!(usage(Format::Anthropic, &estimate), u(31, 9));
    }

    #[test]
    fn responses_bodies() {
        assert_eq!(usage(Format::Responses, RESPONSES_STREAM), u(37, 11));
        assert_eq!(usage(Format::Responses, RESPONSES_JSON), u(37, 11));
    }

    #[test]
    fn only_top_level_paths_count() {
        // Lookalikes in tool-call arguments and in strings are not reports.
        assert_eq!(usage(Format::OllamaGenerate, OLLAMA_TOOL_CALL_STREAM), u(40, 21));
        let nested = r#"{"choices":[{"message":{"usage":{"prompt_tokens":9}}}],"x":{"usage":{"prompt_tokens":9}}}"#;
        assert_eq!(usage(Format::OpenAi, nested), None);
        let in_string =
            r#"{"content":"{\"usage\":{\"prompt_tokens\":9}}","usage_":{"prompt_tokens":9}}"#;
        assert_eq!(usage(Format::OpenAi, in_string), None);
        // Anthropic: only a top-level usage counts, deeper or other usages do not.
        let deep = r#"{"type":"x","content":[{"usage":{"input_tokens":5}}],"delta":{"usage":{"output_tokens":5}}}"#;
        assert_eq!(usage(Format::Anthropic, deep), None);
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":5}}}"#;
        assert_eq!(usage(Format::Anthropic, start), None);
        // Each format reads its own fields only.
        assert_eq!(usage(Format::OllamaGenerate, OPENAI_JSON), None);
        assert_eq!(usage(Format::OpenAi, OLLAMA_GENERATE_SINGLE), None);
        assert_eq!(usage(Format::Responses, OPENAI_JSON), None);
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let body =
            r#"{"d\u006Fne":true,"prompt\u005feval_count":5,"eval\/count":1,"eval_count":6}"#;
        assert_eq!(usage(Format::OllamaGenerate, body), u(5, 6));
        let body = r#"{"\u0075sage":{"prompt_tokens":2,"completion_t\u00f6kens":3}}"#;
        assert_eq!(usage(Format::OpenAi, body), u(2, 0));
    }

    #[test]
    fn bad_numbers_are_ignored() {
        for bad in ["-1", "1.0", "1e3", "\"12\"", "null", "18446744073709551616", "012", "{}", "[]"]
        {
            let body = format!(r#"{{"done":true,"prompt_eval_count":{bad},"eval_count":7}}"#);
            assert_eq!(usage(Format::OllamaGenerate, &body), u(0, 7), "{bad}");
            let body = format!(r#"{{"usage":{{"prompt_tokens":{bad},"completion_tokens":2}}}}"#);
            assert_eq!(usage(Format::OpenAi, &body), u(0, 2), "{bad}");
        }
        let max = format!(r#"{{"done":true,"prompt_eval_count":{},"eval_count":0}}"#, u64::MAX);
        assert_eq!(usage(Format::OllamaGenerate, &max), u(u64::MAX, 0));
        // `done` must be the boolean true.
        for done in ["false", "\"true\"", "1", "null"] {
            let body = format!(r#"{{"done":{done},"prompt_eval_count":1,"eval_count":1}}"#);
            assert_eq!(usage(Format::OllamaGenerate, &body), None, "{done}");
        }
    }

    #[test]
    fn last_report_wins() {
        let two = concat!(
            r#"{"done":true,"prompt_eval_count":1,"eval_count":2}"#,
            "\n",
            r#"{"done":true,"prompt_eval_count":3,"eval_count":4}"#,
            "\n",
            r#"{"done":false,"prompt_eval_count":5,"eval_count":6}"#,
            "\n",
        );
        assert_eq!(usage(Format::OllamaGenerate, two), u(3, 4));
        // A duplicate key's last value wins, including over a nested object.
        let dup =
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":{"prompt_tokens":3}}"#;
        assert_eq!(usage(Format::OpenAi, dup), u(3, 0));
        let dup = r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":null}"#;
        assert_eq!(usage(Format::OpenAi, dup), None);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let body = concat!(
            "garbage {\"done\":true,\"eval_count\":99}\n",
            "{\"done\":true,\"eval_count\":\"unterminated\n",
            "{\"done\":true,\"prompt_eval_count\":2,\"eval_count\":5}\n",
            "{\"done\":true,\"eval_count\":1}}\n",
        );
        // The last line is complete (and counted) before its stray `}`.
        assert_eq!(usage(Format::OllamaGenerate, body), u(0, 1));
        let body = "{\"done\":tru}\n{\"done\":true,\"eval_count\":8}";
        assert_eq!(usage(Format::OllamaGenerate, body), u(0, 8));
        // SSE: a bad event does not spoil the next one; two values in one event are not JSON.
        let body =
            "data: {\"usage\":{\"prompt_tokens\":1}\n\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n";
        assert_eq!(usage(Format::OpenAi, body), u(2, 0));
        let body = "data: {\"usage\":{\"prompt_tokens\":1}} {}\n\n";
        assert_eq!(usage(Format::OpenAi, body), None);
    }

    #[test]
    fn sse_details() {
        // Multi-line data, comments, other fields, no space after the colon, `data` without one.
        let body = concat!(
            ": keep-alive\n\n",
            "id: 7\nretry: 1000\ndata:{\"usage\":\n",
            "data\n",
            "data: {\"prompt_tokens\":4,\"completion_tokens\":5}}\n\n",
            "datum: {\"usage\":{\"prompt_tokens\":9}}\n\n",
            "Data: {\"usage\":{\"prompt_tokens\":9}}\n\n",
            "data : {\"usage\":{\"prompt_tokens\":9}}\n\n",
        );
        assert_eq!(usage(Format::OpenAi, body), u(4, 5));
        // Only one space is dropped after the colon; more is JSON whitespace.
        assert_eq!(usage(Format::OpenAi, "data:   {\"usage\":{\"prompt_tokens\":1}}\n\n"), u(1, 0));
    }

    #[test]
    fn big_single_documents_are_read_without_buffering() {
        // A 6 MB embedding batch with the count at the end, fed in 64 KiB chunks.
        let mut body = String::from(r#"{"model":"all-minilm","embeddings":["#);
        let vector = format!("[{}0.5]", "-0.0123456789,".repeat(1000));
        for i in 0..400 {
            body.push_str(if i == 0 { "" } else { "," });
            body.push_str(&vector);
        }
        body.push_str(r#"],"total_duration":1,"load_duration":1,"prompt_eval_count":4096}"#);
        assert!(body.len() > 5_000_000);
        let chunks: Vec<&[u8]> = body.as_bytes().chunks(65536).collect();
        let (out, got) = run(Format::OllamaEmbed, false, &chunks);
        assert_eq!((out.len(), got), (body.len(), u(4096, 0)));
        // A 3 MB line in an NDJSON stream does not stop the stream being read either.
        let long = format!(
            "{{\"done\":false,\"message\":{{\"content\":\"{}\"}}}}\n{{\"done\":true,\"eval_count\":3}}\n",
            "x".repeat(3 << 20)
        );
        assert_eq!(usage(Format::OllamaGenerate, &long), u(0, 3));
    }

    #[test]
    fn deep_nesting_is_ignored_safely() {
        let deep =
            format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH + 10), "]".repeat(MAX_DEPTH + 10));
        let body = format!("{deep}\n{{\"done\":true,\"eval_count\":2}}\n");
        assert_eq!(usage(Format::OllamaGenerate, &body), u(0, 2));
        // Just within the limit is fine.
        let ok = format!(
            "{{\"a\":{}{}, \"done\":true,\"eval_count\":5}}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert_eq!(usage(Format::OllamaGenerate, &ok), u(0, 5));
    }

    #[test]
    fn hidden_usage_chunk_is_removed_exactly() {
        for eol in ["\n", "\r\n", "\r"] {
            let with = openai_stream(eol, true);
            let without = openai_stream(eol, false);
            let (out, got) = whole(Format::OpenAi, true, &with);
            assert_eq!(String::from_utf8(out).unwrap(), without, "{eol:?}");
            assert_eq!(got, u(11, 2));
            assert_boundary_independent(Format::OpenAi, true, with.as_bytes());
        }
        // Mixed line endings, extra fields, and the usage event last without [DONE].
        let body = format!(
            "{OPENAI_CHUNK_1}\r\n\r\nid: 3\n{OPENAI_USAGE_CHUNK}\r\n\n: bye\n\n{OPENAI_USAGE_CHUNK}\n"
        );
        let (out, got) = whole(Format::OpenAi, true, &body);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{OPENAI_CHUNK_1}\r\n\r\n: bye\n\n"));
        assert_eq!(got, u(11, 2));
        assert_boundary_independent(Format::OpenAi, true, body.as_bytes());
    }

    #[test]
    fn not_hidden_unless_asked_or_not_the_usage_chunk() {
        // Without hiding, the stream is untouched (every chunk borrowed, see `run`).
        for eol in ["\n", "\r\n"] {
            let with = openai_stream(eol, true);
            let (out, got) = whole(Format::OpenAi, false, &with);
            assert_eq!((out, got), (with.clone().into_bytes(), u(11, 2)));
            assert_boundary_independent(Format::OpenAi, false, with.as_bytes());
        }
        // An empty `choices` without usage, `"usage":null`: not the usage chunk, kept.
        let body = format!(
            "{}\n\n{}\n\ndata: [DONE]\n\n",
            OPENAI_USAGE_CHUNK.replace(
                r#","usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}"#,
                ""
            ),
            OPENAI_USAGE_CHUNK
                .replace(r#"{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}"#, "null"),
        );
        let (out, got) = whole(Format::OpenAi, true, &body);
        assert_eq!((out, got), (body.clone().into_bytes(), None));
        // Non-streamed JSON is never edited, nor are other formats.
        let json = r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        assert_eq!(whole(Format::OpenAi, true, json), (json.as_bytes().to_vec(), u(1, 1)));
        let sse = format!("data: {json}\n\n");
        assert_eq!(whole(Format::Responses, true, &sse), (sse.clone().into_bytes(), None));
        let sse = format!("data: {}\n\n", r#"{"delta":{},"usage":{"input_tokens":1}}"#);
        assert_eq!(whole(Format::Anthropic, true, &sse), (sse.clone().into_bytes(), u(1, 0)));
    }

    /// Ollama's streamed `/v1/completions` with `include_usage` (middleware/openai.go,
    /// CompleteWriter): a zero `usage` on every chunk, then the same chunk again with
    /// `choices: []` and the counts. Hidden, the client gets exactly what Ollama sends without
    /// `include_usage`.
    #[test]
    fn completions_usage_is_hidden_exactly() {
        for eol in ["\n", "\r\n", "\r"] {
            let with = completions_stream(eol, true);
            let without = completions_stream(eol, false);
            let (out, got) = whole(Format::OpenAi, true, &with);
            assert_eq!(String::from_utf8(out).unwrap(), without, "{eol:?}");
            assert_eq!(got, u(7, 3));
            assert_boundary_independent(Format::OpenAi, true, with.as_bytes());
        }
        // Cut: what came through has no usage either, and the tap reports none.
        let with = completions_stream("\n", true);
        let cut = with.find(r#""choices":[]"#).unwrap();
        let (out, seen) = run_seen(Format::OpenAi, true, &[&with.as_bytes()[..cut]]);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("usage"), "{out}");
        assert_eq!(seen, Seen { usage: None, deltas: 3 });
    }

    #[test]
    fn usage_members_are_removed_byte_exactly() {
        let strip = |json: &str| {
            strip_member(json.as_bytes(), b"usage").map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(strip(r#"{"a":1,"usage":{"x":[1,{"y":"}"}]}}"#).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(strip(r#"{"usage":null,"a":"b"}"#).as_deref(), Some(r#"{"a":"b"}"#));
        assert_eq!(strip(r#"{"a":1,"usage":2,"b":[3]}"#).as_deref(), Some(r#"{"a":1,"b":[3]}"#));
        assert_eq!(strip(r#" { "usage" : 1 } "#).as_deref(), Some(r#" { } "#));
        assert_eq!(strip(r#"{"usage":1,"usage":{},"a":true}"#).as_deref(), Some(r#"{"a":true}"#));
        assert_eq!(
            strip(r#"{ "a" : 1 , "usage" : 1 , "b" : 2 }"#).as_deref(),
            Some(r#"{ "a" : 1 , "b" : 2 }"#)
        );
        assert_eq!(
            strip(r#"{"\u0075sage":{},"a":"usage\"x"}"#).as_deref(),
            Some(r#"{"a":"usage\"x"}"#)
        );
        // Nothing to remove: deeper usages, lookalike keys, no object.
        assert_eq!(strip(r#"{"a":{"usage":1},"usage_":2,"Usage":3}"#), None);
        assert_eq!(strip(r#"{}"#), None);
        assert_eq!(strip(r#"[{"usage":1}]"#), None);
        assert_eq!(strip(r#"{"usage":1"#), None);
        // Events: one data line, kept around the edit whatever the other lines and endings.
        let event = |s: &str| strip_usage(s.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            event("id: 1\r\ndata: {\"a\":1,\"usage\":{}}\r\n\r\n").as_deref(),
            Some("id: 1\r\ndata: {\"a\":1}\r\n\r\n")
        );
        assert_eq!(event("data:{\"usage\":{},\"a\":1}\r").as_deref(), Some("data:{\"a\":1}\r"));
        // Two data lines (one JSON text over both) are sent as they are.
        assert_eq!(event("data: {\"a\":1,\ndata: \"usage\":{}}\n\n"), None);
    }

    #[test]
    fn hiding_holds_back_only_the_unfinished_event() {
        let mut tap = Tap::new(Format::OpenAi, true);
        let first = format!("{OPENAI_CHUNK_1}\n\n");
        // Whole events go straight through, borrowed.
        assert!(matches!(tap.feed(first.as_bytes()), Cow::Borrowed(_)));
        // An event split across chunks: what precedes it is sent, the rest waits.
        let second = format!("{OPENAI_CHUNK_2}\n\n");
        let (a, b) = second.split_at(30);
        let chunk = format!("{first}{a}");
        assert_eq!(&*tap.feed(chunk.as_bytes()), first.as_bytes());
        assert_eq!(&*tap.feed(b.as_bytes()), second.as_bytes());
        // The usage chunk, split, disappears; [DONE] after it goes through at once.
        let usage = format!("{OPENAI_USAGE_CHUNK}\n\n");
        let (a, b) = usage.split_at(usage.len() - 1);
        assert_eq!(&*tap.feed(a.as_bytes()), b"");
        let chunk = format!("{b}data: [DONE]\n\n");
        assert_eq!(&*tap.feed(chunk.as_bytes()), b"data: [DONE]\n\n");
        // Three chunks with choices went through (the first one twice).
        assert_eq!(tap.finish(), (Vec::new(), Seen { usage: u(11, 2), deltas: 3 }));

        // A cut stream: the held partial event comes out at the end.
        let mut tap = Tap::new(Format::OpenAi, true);
        assert_eq!(&*tap.feed(b"data: {\"choices\":[]"), b"");
        assert_eq!(tap.finish(), (b"data: {\"choices\":[]".to_vec(), Seen::default()));
    }

    #[test]
    fn overlong_events_are_released() {
        // A usage chunk longer than HOLD_CAP is never hidden (but counted), however it is split.
        let big = format!(
            "data: {{\"choices\":[],\"pad\":\"{}\",\"usage\":{{\"prompt_tokens\":1}}}}\n\n",
            "x".repeat(HOLD_CAP)
        );
        let body = format!("{big}data: [DONE]\n\n");
        for size in [4096, HOLD_CAP - 10, body.len()] {
            let mut tap = Tap::new(Format::OpenAi, true);
            let mut out = Vec::new();
            for chunk in body.as_bytes().chunks(size) {
                out.extend_from_slice(&tap.feed(chunk));
                assert!(tap.held.len() <= HOLD_CAP);
            }
            let (tail, got) = tap.finish();
            out.extend_from_slice(&tail);
            assert!(out == body.as_bytes(), "chunks of {size}: {} bytes out", out.len());
            assert_eq!(got.usage, u(1, 0));
        }
        // An event of exactly HOLD_CAP bytes is still hidden.
        let (head, foot) = (r#"data: {"choices":[],"usage":{},"p":""#, "\"}\n\n");
        let fits = format!("{head}{}{foot}", "x".repeat(HOLD_CAP - head.len() - foot.len()));
        assert_eq!(fits.len(), HOLD_CAP);
        for size in [4096, HOLD_CAP] {
            let chunks: Vec<&[u8]> = fits.as_bytes().chunks(size).collect();
            assert!(run(Format::OpenAi, true, &chunks).0.is_empty());
        }
    }

    #[test]
    fn output_chunks_are_counted() {
        // Ollama: every object before the final one that carries a message or response.
        assert_eq!(deltas(Format::OllamaGenerate, OLLAMA_CHAT_STREAM), 2);
        assert_eq!(deltas(Format::OllamaGenerate, OLLAMA_TOOL_CALL_STREAM), 2);
        assert_eq!(deltas(Format::OllamaGenerate, OLLAMA_GENERATE_SINGLE), 0);
        let generate = "{\"response\":\"a\",\"done\":false}\n{\"response\":\"\",\"done\":false}\n";
        assert_eq!(deltas(Format::OllamaGenerate, generate), 2);
        // Errors, null messages and other objects are not output.
        let other =
            "{\"error\":\"x\"}\n{\"message\":null}\n{\"status\":\"x\"}\n{\"x\":{\"message\":{}}}\n";
        assert_eq!(deltas(Format::OllamaGenerate, other), 0);
        assert_eq!(deltas(Format::OllamaEmbed, OLLAMA_EMBED), 0);
        // OpenAI: chunks with choices (not the usage chunk).
        assert_eq!(deltas(Format::OpenAi, &openai_stream("\n", true)), 2);
        assert_eq!(deltas(Format::OpenAi, &completions_stream("\r\n", true)), 3);
        assert_eq!(deltas(Format::OpenAi, &completions_stream("\n", false)), 3);
        assert_eq!(deltas(Format::OpenAi, r#"data: {"choices":{"a":1}}"#), 0);
        // Anthropic: content deltas, not message_delta; Responses: `delta` events.
        assert_eq!(deltas(Format::Anthropic, ANTHROPIC_STREAM), 1);
        assert_eq!(deltas(Format::Anthropic, ANTHROPIC_OLLAMA_STREAM), 1);
        assert_eq!(deltas(Format::Responses, RESPONSES_STREAM), 1);
        // A cut stream keeps what it counted; an incomplete object is not counted.
        let final_line = OLLAMA_CHAT_STREAM.trim_end().rfind('\n').unwrap() + 1;
        let seen = run_seen(
            Format::OllamaGenerate,
            false,
            &[&OLLAMA_CHAT_STREAM.as_bytes()[..final_line - 5]],
        )
        .1;
        assert_eq!(seen, Seen { usage: None, deltas: 1 });
    }

    #[test]
    fn charges() {
        let seen = |usage, deltas| Seen { usage, deltas };
        let c = |prompt, completion, estimated| {
            Some(Charge { usage: Usage { prompt, completion }, estimated })
        };
        // Reported counts are charged whatever the status.
        assert_eq!(charge(seen(u(3, 4), 9), 1000, Some(200)), c(3, 4, false));
        assert_eq!(charge(seen(u(3, 4), 9), 1000, Some(500)), c(3, 4, false));
        // Without counts: ⌈prompt bytes / 4⌉ plus one per output chunk, for a success or a
        // client gone before the answer.
        assert_eq!(charge(seen(None, 30), 5, Some(200)), c(2, 30, true));
        assert_eq!(charge(seen(None, 0), 8, Some(200)), c(2, 0, true));
        assert_eq!(charge(seen(None, 0), 0, Some(200)), c(0, 0, true));
        assert_eq!(charge(seen(None, 0), 13, None), c(4, 0, true));
        assert_eq!(charge(seen(None, 0), u64::MAX, None), c(u64::MAX / 4 + 1, 0, true));
        // An error answer without counts costs nothing.
        for status in [400, 404, 500, 502] {
            assert_eq!(charge(seen(None, 3), 100, Some(status)), None);
        }
    }

    #[test]
    fn boundary_independence() {
        let openai = openai_stream("\r\n", true);
        let completions = completions_stream("\n", true);
        let bodies: [(Format, &str); 13] = [
            (Format::OllamaGenerate, OLLAMA_CHAT_STREAM),
            (Format::OllamaGenerate, OLLAMA_GENERATE_SINGLE),
            (Format::OllamaGenerate, OLLAMA_TOOL_CALL_STREAM),
            (Format::OllamaEmbed, OLLAMA_EMBED),
            (Format::OpenAi, OPENAI_JSON),
            (Format::OpenAi, &openai),
            (Format::OpenAi, &completions),
            (Format::Anthropic, ANTHROPIC_STREAM),
            (Format::Anthropic, ANTHROPIC_OLLAMA_STREAM),
            (Format::Anthropic, ANTHROPIC_JSON),
            (Format::Responses, RESPONSES_STREAM),
            (Format::Responses, RESPONSES_JSON),
            (Format::Responses, "\r\n \n{\"usage\":{\"input_tokens\":1}}"),
        ];
        for (format, body) in bodies {
            let (out, got) = whole(format, false, body);
            assert_eq!(out, body.as_bytes());
            assert!(got.is_some(), "{format:?}");
            assert_boundary_independent(format, false, body.as_bytes());
            assert_boundary_independent(format, true, body.as_bytes());
        }
    }

    /// Random bytes, mostly made of pieces of the formats so the parsers get deep, fed in random
    /// chunks: never a panic, never an edit without hiding, and chunking never matters.
    #[test]
    fn random_input_is_harmless() {
        const PIECES: [&[u8]; 31] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b":",
            b",",
            b"\n",
            b"\r",
            b"\r\n",
            b"\n\n",
            b" ",
            b"data: ",
            b"data:",
            b"event: x\n",
            b"\\",
            b"\\u00",
            b"true",
            b"12",
            b"-",
            b"null",
            b"\"usage\"",
            b"\"choices\":[]",
            b"\"done\":true",
            b"\"prompt_tokens\":",
            b"\xff\xc3",
            b"\"usage\":{}",
            b"\"choices\":[{}]",
            b"\"delta\":",
            b"\"message\":",
            b"\"u\\u0073age\"",
        ];
        let formats = [
            Format::OllamaGenerate,
            Format::OllamaEmbed,
            Format::OpenAi,
            Format::Anthropic,
            Format::Responses,
        ];
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for round in 0..3000 {
            let mut body = Vec::new();
            let len = rng.below(120);
            for _ in 0..len {
                if rng.below(4) == 0 {
                    body.push(rng.next() as u8);
                } else {
                    body.extend_from_slice(PIECES[rng.below(PIECES.len())]);
                }
            }
            if round % 3 == 0 {
                // Sometimes a real body with noise spliced in.
                let at = rng.below(body.len() + 1);
                let real = if round % 2 == 0 {
                    openai_stream("\n", true)
                } else {
                    completions_stream("\r\n", true)
                };
                body.splice(at..at, real.into_bytes());
            }
            let format = formats[rng.below(formats.len())];
            for hide in [false, true] {
                let expected = run_seen(format, hide, &[&body]);
                if !hide {
                    assert_eq!(expected.0, body);
                } else {
                    // Hiding only removes bytes, and never changes what is counted.
                    assert!(expected.0.len() <= body.len());
                    assert_eq!(expected.1, run_seen(format, false, &[&body]).1);
                }
                for _ in 0..4 {
                    let chunks = random_chunks(&mut rng, &body);
                    assert_eq!(run_seen(format, hide, &chunks), expected, "{format:?} {body:?}");
                }
            }
        }
    }

    #[test]
    fn keep_every_byte_turns_hiding_off() {
        let body: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n\
data: [DONE]\n\n";
        let mut hiding = Tap::new(Format::OpenAi, true);
        let mut out = hiding.feed(body).into_owned();
        let (rest, usage) = hiding.finish();
        out.extend_from_slice(&rest);
        assert!(out.len() < body.len(), "the usage event is hidden");
        assert_eq!(usage.usage, Some(Usage { prompt: 5, completion: 3 }));
        let mut kept = Tap::new(Format::OpenAi, true);
        kept.keep_every_byte();
        let mut out = kept.feed(body).into_owned();
        let (rest, usage) = kept.finish();
        out.extend_from_slice(&rest);
        assert_eq!(out, body);
        assert_eq!(usage.usage, Some(Usage { prompt: 5, completion: 3 }));
    }
}
