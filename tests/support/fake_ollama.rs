//! `FakeOllama`: a small, controllable stand-in for an Ollama server.
//!
//! butler's streaming guarantees (§8: per-token flushing, time to first token, closing the
//! upstream when the client leaves, truncation when the upstream dies) can only be tested
//! against an upstream whose timing the test controls and whose side of the connection the
//! test can observe. This server imitates Ollama's wire behaviour (NDJSON and SSE streams with
//! one chunk per token, Content-Length framed JSON otherwise), records every request exactly as
//! it arrived, and publishes [`Event`]s so tests can assert on ordering without sleeping.
//!
//! It is a plain std server: one acceptor thread, one thread per connection, keep-alive.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::client::find_header;

/// Request bodies are stored up to this size; beyond it only [`Recorded::body_len`] grows, so
/// multi-gigabyte blob-upload tests do not exhaust memory.
pub const MAX_RECORDED_BODY: usize = 64 << 20;

/// Largest request head the fake accepts (a test bug otherwise).
const MAX_HEAD: usize = 1 << 20;

/// A fixed timestamp in Ollama's `created_at` format, so responses are deterministic.
const CREATED_AT: &str = "2025-11-22T07:00:00.000000Z";

/// Unix time used for OpenAI-style `created` fields.
const CREATED_UNIX: u64 = 1_763_794_800;

/// Locks a mutex, ignoring poisoning: a panicking test thread must not cascade into every other
/// user of the fake.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Knobs controlling how the fake answers. A snapshot is taken when each request has been
/// read, so changing the behaviour affects the next request, not a response in progress.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Pause before each streamed token (the first included). While pausing, the fake watches
    /// the connection so it notices a departed client at once. Non-streamed inference responses
    /// wait `tokens * token_delay` before their head, like a model generating.
    pub token_delay: Duration,
    /// Pause before the first streamed token instead of `token_delay` (e.g. a fast first
    /// token followed by slow ones, to test a client leaving while the fake is pausing).
    pub first_token_delay: Option<Duration>,
    /// Number of tokens generated per inference request (reported as `eval_count`).
    pub tokens: usize,
    /// Pause before writing the status line of any response (simulates a model load). The
    /// fake still notices a departed client during it.
    pub first_byte_delay: Duration,
    /// Answer every inference request with this status and `{"error":"boom"}`.
    pub fail_status: Option<u16>,
    /// Stream this many tokens, then close the socket abruptly without the terminating chunk.
    /// With `n >= tokens` all tokens and the final object are written, then the socket closes.
    /// Non-streamed responses get their head and half their body, then the close.
    pub drop_after_tokens: Option<usize>,
    /// Stream this many tokens, then wait (watching the connection) until the client goes away,
    /// so a test knows exactly how much of a stream butler saw before its client left.
    pub stall_after_tokens: Option<usize>,
    /// Prompt tokens reported (`prompt_eval_count`, `usage.prompt_tokens`, ...). `None` omits
    /// `prompt_eval_count`, as Ollama does when the prompt was cached.
    pub prompt_tokens: Option<u64>,
    /// `input_tokens` in `/v1/messages`' `message_start`, which Ollama fills with its own
    /// estimate from the request (the real counts come in `message_delta`). `None`: the prompt
    /// tokens.
    pub message_start_input_tokens: Option<u64>,
    /// Models listed by `/api/tags`, `/api/ps`, `/v1/models` and known to `/v1/models/{id}`.
    pub models: Vec<String>,
    /// A base path the fake is mounted under (e.g. `/ollama`): stripped before routing, so
    /// butler configured with `upstream: http://host:port/ollama` still reaches the routes.
    /// Recorded paths keep it.
    pub path_prefix: String,
}

impl Default for Behavior {
    fn default() -> Behavior {
        Behavior {
            token_delay: Duration::ZERO,
            first_token_delay: None,
            tokens: 3,
            first_byte_delay: Duration::ZERO,
            fail_status: None,
            drop_after_tokens: None,
            stall_after_tokens: None,
            prompt_tokens: Some(5),
            message_start_input_tokens: None,
            models: vec!["llama3.2:latest".to_string(), "qwen2.5:7b".to_string()],
            path_prefix: String::new(),
        }
    }
}

/// One request exactly as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Connection number (1, 2, ... in accept order); equal numbers mean a reused connection.
    pub conn: u64,
    /// When the whole request (body included) had been read.
    pub at: Instant,
    pub method: String,
    /// The raw path as received (percent-encoding untouched), without the query.
    pub path: String,
    /// The raw query after the first `?`, if any.
    pub query: Option<String>,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Header fields in wire order with their original case.
    pub headers: Vec<(String, String)>,
    /// The body with any chunked framing removed (at most [`MAX_RECORDED_BODY`] bytes).
    pub body: Vec<u8>,
    /// Full decoded body length, even when `body` was cut at [`MAX_RECORDED_BODY`].
    pub body_len: u64,
    /// Whether the body arrived with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl Recorded {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Every value of the headers with this name (case-insensitive), in wire order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Path plus `?query`, i.e. the request target as received.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("recorded body is not JSON ({e}): {:?}", self.body_str()))
    }
}

/// Something observable that happened in the fake, with the instant it happened.
/// `conn` is the connection number (see [`Recorded::conn`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A TCP connection was accepted.
    ConnectionOpened { conn: u64, at: Instant },
    /// A request head was parsed (its body, if any, not yet read). Lets upload tests see that
    /// butler forwards before the client finished sending.
    HeadReceived { conn: u64, method: String, path: String, at: Instant },
    /// A whole request was read and recorded.
    RequestReceived { conn: u64, method: String, path: String, at: Instant },
    /// A response status line and headers were written.
    ResponseStarted { conn: u64, status: u16, at: Instant },
    /// Token `index` (0-based) of a streamed response was written and flushed. The event is
    /// published after the write; `at` is stamped just before it, so a client's read of that
    /// chunk always happens after `at` (causal, not timing-dependent).
    TokenWritten { conn: u64, index: usize, at: Instant },
    /// A response was written completely (final chunk included).
    ResponseComplete { conn: u64, at: Instant },
    /// While the fake was delaying or writing a response, the peer closed the connection or a
    /// write failed: i.e. butler hung up on Ollama.
    ClientGone { conn: u64, at: Instant },
    /// The connection ended (either side closed it).
    ConnectionClosed { conn: u64, at: Instant },
}

impl Event {
    pub fn at(&self) -> Instant {
        match self {
            Event::ConnectionOpened { at, .. }
            | Event::HeadReceived { at, .. }
            | Event::RequestReceived { at, .. }
            | Event::ResponseStarted { at, .. }
            | Event::TokenWritten { at, .. }
            | Event::ResponseComplete { at, .. }
            | Event::ClientGone { at, .. }
            | Event::ConnectionClosed { at, .. } => *at,
        }
    }

    pub fn conn(&self) -> u64 {
        match self {
            Event::ConnectionOpened { conn, .. }
            | Event::HeadReceived { conn, .. }
            | Event::RequestReceived { conn, .. }
            | Event::ResponseStarted { conn, .. }
            | Event::TokenWritten { conn, .. }
            | Event::ResponseComplete { conn, .. }
            | Event::ClientGone { conn, .. }
            | Event::ConnectionClosed { conn, .. } => *conn,
        }
    }
}

/// A scripted response for one method and path, overriding the built-in routes (e.g. a custom
/// model listing, or odd upstream headers to check what butler passes through).
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: u16,
    /// Written as given. If they include `Content-Length` or `Transfer-Encoding`, the body is
    /// written raw and unframed and the connection is closed afterwards, so a test can produce
    /// any upstream framing it likes (`Transfer-Encoding: identity` gives a close-delimited
    /// body).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send the body as one chunk of a chunked response instead of with Content-Length.
    pub chunked: bool,
}

impl Canned {
    /// A JSON response with Content-Length framing.
    pub fn json(status: u16, body: &Value) -> Canned {
        Canned {
            status,
            headers: vec![("Content-Type".into(), "application/json; charset=utf-8".into())],
            body: body.to_string().into_bytes(),
            chunked: false,
        }
    }

    /// A response with the given content type and body.
    pub fn new(status: u16, content_type: &str, body: &[u8]) -> Canned {
        Canned {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.to_vec(),
            chunked: false,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Canned {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn chunked(mut self) -> Canned {
        self.chunked = true;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// State shared by the handle, the acceptor and the connection threads.
struct Inner {
    behavior: Mutex<Behavior>,
    /// (method or "*", path) → response.
    canned: Mutex<Vec<(String, String, Canned)>>,
    requests: Mutex<Vec<Recorded>>,
    requests_cv: Condvar,
    events: Mutex<Vec<Event>>,
    events_cv: Condvar,
    subscribers: Mutex<Vec<Sender<Event>>>,
    stopping: AtomicBool,
    next_conn: AtomicU64,
    accepted: AtomicUsize,
    /// Clones of the open connections, so `Drop` can shut them down.
    open: Mutex<HashMap<u64, TcpStream>>,
}

impl Inner {
    fn emit(&self, event: Event) {
        // Subscribers are fed under the log lock so every observer sees one order.
        let mut log = lock(&self.events);
        lock(&self.subscribers).retain(|tx| tx.send(event.clone()).is_ok());
        log.push(event);
        self.events_cv.notify_all();
    }
}

/// A fake Ollama listening on `127.0.0.1:<ephemeral>`. Stops (best effort) when dropped: the
/// listener closes, so connecting to [`FakeOllama::addr`] afterwards is refused.
pub struct FakeOllama {
    addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeOllama {
    /// Starts with [`Behavior::default`].
    pub fn start() -> FakeOllama {
        FakeOllama::start_with(Behavior::default())
    }

    pub fn start_with(behavior: Behavior) -> FakeOllama {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake ollama");
        let addr = listener.local_addr().expect("fake ollama address");
        let inner = Arc::new(Inner {
            behavior: Mutex::new(behavior),
            canned: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            requests_cv: Condvar::new(),
            events: Mutex::new(Vec::new()),
            events_cv: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            accepted: AtomicUsize::new(0),
            open: Mutex::new(HashMap::new()),
        });
        let acceptor_inner = Arc::clone(&inner);
        let acceptor = thread::Builder::new()
            .name("fake-ollama-accept".into())
            .spawn(move || accept_loop(listener, acceptor_inner))
            .expect("spawn fake ollama acceptor");
        FakeOllama { addr, inner, acceptor: Some(acceptor) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for butler's `upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the behaviour (takes effect for requests read from now on).
    pub fn set_behavior(&self, behavior: Behavior) {
        *lock(&self.inner.behavior) = behavior;
    }

    /// Changes some fields of the behaviour: `fake.update_behavior(|b| b.tokens = 10)`.
    pub fn update_behavior(&self, change: impl FnOnce(&mut Behavior)) {
        change(&mut lock(&self.inner.behavior));
    }

    pub fn behavior(&self) -> Behavior {
        lock(&self.inner.behavior).clone()
    }

    /// Scripts the response to `method` (or `"*"` for any) and exact raw `path` (no query).
    /// Later calls for the same method and path replace earlier ones.
    pub fn set_route(&self, method: &str, path: &str, response: Canned) {
        let mut canned = lock(&self.inner.canned);
        canned.retain(|(m, p, _)| !(m == method && p == path));
        canned.push((method.to_string(), path.to_string(), response));
    }

    /// Removes every scripted response.
    pub fn clear_routes(&self) {
        lock(&self.inner.canned).clear();
    }

    /// Every request received so far, in order of completion.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.inner.requests).len()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.inner.requests).last().cloned()
    }

    /// Requests whose raw path equals `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        lock(&self.inner.requests).iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Forgets the recorded requests (events are kept).
    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
    }

    /// Waits until at least `n` requests have been recorded. False on timeout.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut requests = lock(&self.inner.requests);
        while requests.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            requests = self
                .inner
                .requests_cv
                .wait_timeout(requests, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// A channel receiving every event from now on (earlier ones are in
    /// [`FakeOllama::event_log`]).
    pub fn events(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        lock(&self.inner.subscribers).push(tx);
        rx
    }

    /// Every event since the fake started, in order.
    pub fn event_log(&self) -> Vec<Event> {
        lock(&self.inner.events).clone()
    }

    /// A position in the event log; pass it to [`FakeOllama::wait_event_since`] to consider only
    /// events that happen after this call.
    pub fn event_mark(&self) -> usize {
        lock(&self.inner.events).len()
    }

    /// The first event (since the fake started) matching `pred`, waiting up to `timeout` for
    /// one to happen. Searching the history makes this free of races with the event itself.
    pub fn wait_event(&self, pred: impl Fn(&Event) -> bool, timeout: Duration) -> Option<Event> {
        self.wait_event_since(0, pred, timeout)
    }

    /// Like [`FakeOllama::wait_event`], counting only events at or after `mark`.
    pub fn wait_event_since(
        &self,
        mark: usize,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut log = lock(&self.inner.events);
        let mut checked = mark.min(log.len());
        loop {
            if let Some(event) = log[checked..].iter().find(|e| pred(e)) {
                return Some(event.clone());
            }
            checked = log.len();
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            log = self
                .inner
                .events_cv
                .wait_timeout(log, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// When token `index` of some stream was written (first such event since the start).
    pub fn wait_token(&self, index: usize, timeout: Duration) -> Option<Instant> {
        self.wait_event(
            |e| matches!(e, Event::TokenWritten { index: i, .. } if *i == index),
            timeout,
        )
        .map(|e| e.at())
    }

    /// When the fake first noticed a client (butler) hanging up mid-response.
    pub fn wait_client_gone(&self, timeout: Duration) -> Option<Instant> {
        self.wait_event(|e| matches!(e, Event::ClientGone { .. }), timeout).map(|e| e.at())
    }

    /// Connections currently open.
    pub fn connections_open(&self) -> usize {
        lock(&self.inner.open).len()
    }

    /// Connections accepted since the start.
    pub fn connections_accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the acceptor sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
        for stream in lock(&self.inner.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    for stream in listener.incoming() {
        if inner.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let conn = inner.next_conn.fetch_add(1, Ordering::SeqCst);
        inner.accepted.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            lock(&inner.open).insert(conn, clone);
        }
        inner.emit(Event::ConnectionOpened { conn, at: Instant::now() });
        let conn_inner = Arc::clone(&inner);
        let spawned = thread::Builder::new()
            .name(format!("fake-ollama-conn-{conn}"))
            .spawn(move || serve_connection(conn_inner, stream, conn));
        if spawned.is_err() {
            lock(&inner.open).remove(&conn);
        }
    }
}

/// Serves requests on one connection until either side closes it.
fn serve_connection(inner: Arc<Inner>, stream: TcpStream, conn: u64) {
    let _ = stream.set_nodelay(true);
    if let Ok(read_half) = stream.try_clone() {
        let mut reader = BufReader::with_capacity(64 * 1024, read_half);
        let mut out = Out {
            stream,
            conn,
            inner: &inner,
            head_only: false,
            close_after: false,
            gone_reported: false,
        };
        while let Ok(Some(request)) = read_request(&mut reader, &mut out) {
            lock(&inner.requests).push(request.clone());
            inner.requests_cv.notify_all();
            inner.emit(Event::RequestReceived {
                conn,
                method: request.method.clone(),
                path: request.path.clone(),
                at: request.at,
            });
            let behavior = lock(&inner.behavior).clone();
            out.head_only = request.method == "HEAD";
            out.close_after = wants_close(&request);
            let keep_alive = respond(&mut out, &request, &behavior).is_ok() && !out.close_after;
            if !keep_alive {
                let _ = out.stream.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    lock(&inner.open).remove(&conn);
    inner.emit(Event::ConnectionClosed { conn, at: Instant::now() });
}

fn wants_close(request: &Recorded) -> bool {
    let tokens = request.headers_named("connection").join(",").to_ascii_lowercase();
    let has = |t: &str| tokens.split(',').any(|x| x.trim() == t);
    if request.version == "HTTP/1.0" { !has("keep-alive") } else { has("close") }
}

// ---------------------------------------------------------------------------------------------
// Reading requests
// ---------------------------------------------------------------------------------------------

fn bad_input(msg: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg.to_string())
}

/// Reads one request. `Ok(None)`: the peer closed the connection between requests.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    out: &mut Out<'_>,
) -> io::Result<Option<Recorded>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        if reader.read_until(b'\n', &mut head)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(bad_input("EOF inside request head"))
            };
        }
        // Tolerate stray CRLFs before the request line (RFC 9112 §2.2).
        if before == 0 && (head == b"\r\n" || head == b"\n") {
            head.clear();
            continue;
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(bad_input("request head too large"));
        }
    }

    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut storage);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            let _ = out.send_json(400, &json!({"error": "fake: bad request head"}));
            return Err(bad_input("unparsable request head"));
        }
    }
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let version = format!("HTTP/1.{}", parsed.version.unwrap_or(1));
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();
    out.inner.emit(Event::HeadReceived {
        conn: out.conn,
        method: method.clone(),
        path: path.clone(),
        at: Instant::now(),
    });

    if find_header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        out.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }

    let mut body = Body::default();
    let chunked = find_header(&headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        read_chunked_body(reader, &mut body)?;
    } else if let Some(cl) = find_header(&headers, "content-length") {
        let len: u64 = cl.trim().parse().map_err(|_| bad_input("bad Content-Length"))?;
        read_exact_body(reader, len, &mut body)?;
    }

    Ok(Some(Recorded {
        conn: out.conn,
        at: Instant::now(),
        method,
        path,
        query,
        version,
        headers,
        body: body.data,
        body_len: body.len,
        chunked,
    }))
}

/// A request body being received: stored up to [`MAX_RECORDED_BODY`], counted in full.
#[derive(Default)]
struct Body {
    data: Vec<u8>,
    len: u64,
}

impl Body {
    fn push(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        let room = MAX_RECORDED_BODY.saturating_sub(self.data.len());
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

fn read_exact_body(reader: &mut BufReader<TcpStream>, len: u64, body: &mut Body) -> io::Result<()> {
    let mut left = len;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad_input("EOF inside request body"));
        }
        body.push(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line)? == 0 {
        return Err(bad_input("EOF inside chunked body"));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

fn read_chunked_body(reader: &mut BufReader<TcpStream>, body: &mut Body) -> io::Result<()> {
    loop {
        let line = read_line(reader)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| bad_input("bad chunk size"))?;
        if size == 0 {
            // Trailer section ends with an empty line.
            while !read_line(reader)?.is_empty() {}
            return Ok(());
        }
        read_exact_body(reader, size, body)?;
        let mut crlf = Vec::new();
        reader.read_until(b'\n', &mut crlf)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Writing responses
// ---------------------------------------------------------------------------------------------

/// The peer is gone (already reported as [`Event::ClientGone`]) or the response ended the
/// connection on purpose; either way the connection must close.
struct Closed;

type Flow = Result<(), Closed>;

/// The writing side of a connection, reporting a departed peer exactly once.
struct Out<'a> {
    stream: TcpStream,
    conn: u64,
    inner: &'a Inner,
    /// The request was HEAD: write heads, never bodies.
    head_only: bool,
    /// Announce and perform a close after this response.
    close_after: bool,
    gone_reported: bool,
}

impl Out<'_> {
    fn gone(&mut self) -> Closed {
        if !self.gone_reported {
            self.gone_reported = true;
            self.inner.emit(Event::ClientGone { conn: self.conn, at: Instant::now() });
        }
        Closed
    }

    fn write(&mut self, bytes: &[u8]) -> Flow {
        match self.stream.write_all(bytes).and_then(|()| self.stream.flush()) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.gone()),
        }
    }

    /// Waits `delay` while watching the socket: a blocking `peek` returns at once when the peer
    /// closes (0 bytes) or resets, so a departed client is reported within milliseconds even
    /// during a long delay. This is the fake's own pacing, not test synchronisation.
    fn pause(&mut self, delay: Duration) -> Flow {
        if delay.is_zero() {
            return Ok(());
        }
        let deadline = Instant::now() + delay;
        let result = loop {
            let now = Instant::now();
            if now >= deadline {
                break Ok(());
            }
            if self.inner.stopping.load(Ordering::SeqCst) {
                break Err(Closed);
            }
            // Bounded steps so a dropped fake stops its threads promptly.
            let step = (deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(50));
            if self.stream.set_read_timeout(Some(step)).is_err() {
                break Err(self.gone());
            }
            match self.stream.peek(&mut [0u8; 1]) {
                Ok(0) => break Err(self.gone()),
                // The peer sent more data (a pipelined request): it is still there, but peek
                // would now return at once, so pace in small sleeps instead.
                Ok(_) => thread::sleep(step.min(Duration::from_millis(5))),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => break Err(self.gone()),
            }
        };
        let _ = self.stream.set_read_timeout(None);
        result
    }

    /// Writes the status line and headers (plus `Connection: close` when closing after).
    fn head(&mut self, status: u16, headers: &[(String, String)]) -> Flow {
        let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        if self.close_after {
            text.push_str("Connection: close\r\n");
        }
        text.push_str("\r\n");
        self.write(text.as_bytes())?;
        self.inner.emit(Event::ResponseStarted { conn: self.conn, status, at: Instant::now() });
        Ok(())
    }

    fn complete(&mut self) {
        self.inner.emit(Event::ResponseComplete { conn: self.conn, at: Instant::now() });
    }

    /// A Content-Length framed response.
    fn send(&mut self, status: u16, content_type: &str, body: &[u8]) -> Flow {
        let headers = vec![
            ("Content-Type".to_string(), content_type.to_string()),
            ("Content-Length".to_string(), body.len().to_string()),
        ];
        self.head(status, &headers)?;
        if !self.head_only && !body.is_empty() {
            self.write(body)?;
        }
        self.complete();
        Ok(())
    }

    fn send_json(&mut self, status: u16, body: &Value) -> Flow {
        self.send(status, "application/json; charset=utf-8", body.to_string().as_bytes())
    }

    fn start_chunked(&mut self, status: u16, content_type: &str) -> Flow {
        let headers = vec![
            ("Content-Type".to_string(), content_type.to_string()),
            ("Transfer-Encoding".to_string(), "chunked".to_string()),
        ];
        self.head(status, &headers)
    }

    /// One chunk, written with a single write so it leaves as one segment.
    fn chunk(&mut self, data: &[u8]) -> Flow {
        if self.head_only || data.is_empty() {
            return Ok(());
        }
        let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
        framed.extend_from_slice(data);
        framed.extend_from_slice(b"\r\n");
        self.write(&framed)
    }

    fn finish_chunked(&mut self) -> Flow {
        if !self.head_only {
            self.write(b"0\r\n\r\n")?;
        }
        self.complete();
        Ok(())
    }

    /// Closes the connection abruptly, as a crashing upstream would.
    fn abort(&mut self) -> Closed {
        let _ = self.stream.shutdown(Shutdown::Both);
        Closed
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// Paths whose requests are inference (affected by `fail_status`).
const INFERENCE_PATHS: &[&str] = &[
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
];

/// Model-management paths that simply succeed.
const MANAGEMENT_PATHS: &[&str] =
    &["/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy", "/api/show"];

fn respond(out: &mut Out<'_>, request: &Recorded, b: &Behavior) -> Flow {
    out.pause(b.first_byte_delay)?;

    let canned = lock(&out.inner.canned)
        .iter()
        .find(|(m, p, _)| (m == "*" || *m == request.method) && *p == request.path)
        .map(|(_, _, c)| c.clone());
    if let Some(canned) = canned {
        return send_canned(out, &canned);
    }

    let path = request
        .path
        .strip_prefix(b.path_prefix.as_str())
        .filter(|_| !b.path_prefix.is_empty())
        .unwrap_or(&request.path);
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("m").to_string();

    if INFERENCE_PATHS.contains(&path)
        && let Some(status) = b.fail_status
    {
        return out.send_json(status, &json!({"error": "boom"}));
    }

    let ollama_stream = body.get("stream").and_then(Value::as_bool) != Some(false);
    let openai_stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage =
        body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let bodies = Gen { b, model: &model };

    match path {
        "/" => out.send(200, "text/plain; charset=utf-8", b"Ollama is running"),
        "/api/version" => out.send_json(200, &json!({"version": "0.12.0"})),
        "/api/status" => {
            out.send_json(200, &json!({"cloud": {"disabled": false, "source": "none"}}))
        }
        "/api/tags" => out.send_json(200, &bodies.tags()),
        "/api/ps" => out.send_json(200, &bodies.ps()),
        "/v1/models" => out.send_json(200, &bodies.openai_models()),
        "/api/chat" | "/api/generate" => {
            let key = if path == "/api/chat" { "chat" } else { "generate" };
            if ollama_stream {
                stream(out, b, bodies.ndjson_plan(key))
            } else {
                whole(out, b, &bodies.ollama_final(key, true))
            }
        }
        "/v1/chat/completions" | "/v1/completions" => {
            let chat = path == "/v1/chat/completions";
            if openai_stream {
                stream(out, b, bodies.openai_plan(chat, include_usage))
            } else {
                whole(out, b, &bodies.openai_whole(chat))
            }
        }
        "/v1/messages" => {
            if openai_stream {
                stream(out, b, bodies.anthropic_plan())
            } else {
                whole(out, b, &bodies.anthropic_whole())
            }
        }
        "/v1/responses" => {
            if openai_stream {
                stream(out, b, bodies.responses_plan())
            } else {
                whole(out, b, &bodies.responses_whole())
            }
        }
        "/api/embed" => {
            let n = match body.get("input") {
                Some(Value::Array(items)) => items.len(),
                _ => 1,
            };
            let mut v = json!({
                "model": model,
                "embeddings": vec![[0.1, 0.2, 0.3]; n],
                "total_duration": 1000,
                "load_duration": 100,
            });
            if let Some(p) = b.prompt_tokens {
                v["prompt_eval_count"] = json!(p);
            }
            out.send_json(200, &v)
        }
        "/api/embeddings" => out.send_json(200, &json!({"embedding": [0.1, 0.2, 0.3]})),
        "/v1/embeddings" => {
            let n = match body.get("input") {
                Some(Value::Array(items)) => items.len(),
                _ => 1,
            };
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"object": "embedding", "embedding": [0.1, 0.2, 0.3], "index": i}))
                .collect();
            let p = b.prompt_tokens.unwrap_or(0);
            out.send_json(
                200,
                &json!({"object": "list", "data": data, "model": model,
                        "usage": {"prompt_tokens": p, "total_tokens": p}}),
            )
        }
        p if MANAGEMENT_PATHS.contains(&p) => out.send_json(200, &json!({"status": "success"})),
        p if p.starts_with("/api/blobs/") => match request.method.as_str() {
            "POST" | "PUT" => out.send(201, "text/plain; charset=utf-8", b""),
            _ => out.send(200, "text/plain; charset=utf-8", b""),
        },
        p if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if b.models.iter().any(|m| m == id) {
                out.send_json(
                    200,
                    &json!({"id": id, "object": "model", "created": CREATED_UNIX, "owned_by": "library"}),
                )
            } else {
                out.send_json(
                    404,
                    &json!({"error": {"message": format!("model \"{id}\" not found"),
                                      "type": "api_error", "param": null, "code": null}}),
                )
            }
        }
        _ => out.send_json(404, &json!({"error": "not found"})),
    }
}

fn send_canned(out: &mut Out<'_>, canned: &Canned) -> Flow {
    let framed_by_test = canned.headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    let mut headers = canned.headers.clone();
    if framed_by_test {
        // The test owns the framing (possibly close-delimited or deliberately wrong), so the
        // connection cannot be reused afterwards: close it.
        out.head(canned.status, &headers)?;
        if !out.head_only {
            out.write(&canned.body)?;
        }
        out.complete();
        return Err(Closed);
    }
    if canned.chunked {
        headers.push(("Transfer-Encoding".into(), "chunked".into()));
        out.head(canned.status, &headers)?;
        out.chunk(&canned.body)?;
        return out.finish_chunked();
    }
    headers.push(("Content-Length".into(), canned.body.len().to_string()));
    out.head(canned.status, &headers)?;
    if !out.head_only {
        out.write(&canned.body)?;
    }
    out.complete();
    Ok(())
}

/// A streamed response: pieces written as separate chunks.
struct Plan {
    content_type: &'static str,
    /// Written right after the head (e.g. SSE `message_start`); not tokens.
    prelude: Vec<String>,
    /// One per token, each preceded by `token_delay`.
    tokens: Vec<String>,
    /// Written right after the last token (final object, usage, `[DONE]`).
    epilogue: Vec<String>,
}

fn stream(out: &mut Out<'_>, b: &Behavior, plan: Plan) -> Flow {
    out.start_chunked(200, plan.content_type)?;
    for piece in &plan.prelude {
        out.chunk(piece.as_bytes())?;
    }
    for (index, token) in plan.tokens.iter().enumerate() {
        if b.drop_after_tokens == Some(index) {
            return Err(out.abort());
        }
        if b.stall_after_tokens == Some(index) {
            // Returns early with `Closed` once the client is gone (or the fake stops).
            out.pause(Duration::from_secs(3600))?;
        }
        let delay = match b.first_token_delay {
            Some(first) if index == 0 => first,
            _ => b.token_delay,
        };
        out.pause(delay)?;
        // Stamped before the write, so any read of this chunk happens after `at`.
        let at = Instant::now();
        out.chunk(token.as_bytes())?;
        out.inner.emit(Event::TokenWritten { conn: out.conn, index, at });
    }
    for piece in &plan.epilogue {
        out.chunk(piece.as_bytes())?;
    }
    if b.drop_after_tokens.is_some() {
        return Err(out.abort());
    }
    out.finish_chunked()
}

/// A non-streamed inference response: waits as long as generation would, then sends the JSON.
fn whole(out: &mut Out<'_>, b: &Behavior, body: &Value) -> Flow {
    out.pause(b.token_delay * u32::try_from(b.tokens).unwrap_or(u32::MAX))?;
    if b.drop_after_tokens.is_none() {
        return out.send_json(200, body);
    }
    let bytes = body.to_string().into_bytes();
    let headers = vec![
        ("Content-Type".to_string(), "application/json; charset=utf-8".to_string()),
        ("Content-Length".to_string(), bytes.len().to_string()),
    ];
    out.head(200, &headers)?;
    out.write(&bytes[..bytes.len() / 2])?;
    Err(out.abort())
}

/// Builds Ollama-shaped response bodies for one request.
struct Gen<'a> {
    b: &'a Behavior,
    model: &'a str,
}

impl Gen<'_> {
    fn token(&self, i: usize) -> String {
        format!("tok{i}")
    }

    fn text(&self) -> String {
        (0..self.b.tokens).map(|i| self.token(i)).collect()
    }

    fn prompt(&self) -> u64 {
        self.b.prompt_tokens.unwrap_or(0)
    }

    fn usage(&self) -> Value {
        let (p, c) = (self.prompt(), self.b.tokens as u64);
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    }

    fn tags(&self) -> Value {
        let models: Vec<Value> = self
            .b
            .models
            .iter()
            .map(|m| {
                json!({"name": m, "model": m, "modified_at": CREATED_AT, "size": 1000,
                       "digest": "0123456789abcdef",
                       "details": {"format": "gguf", "family": "llama", "parameter_size": "3B",
                                   "quantization_level": "Q4_K_M"}})
            })
            .collect();
        json!({"models": models})
    }

    fn ps(&self) -> Value {
        let models: Vec<Value> = self
            .b
            .models
            .iter()
            .map(|m| {
                json!({"name": m, "model": m, "size": 1000, "digest": "0123456789abcdef",
                       "expires_at": "2099-01-01T00:00:00Z", "size_vram": 1000})
            })
            .collect();
        json!({"models": models})
    }

    fn openai_models(&self) -> Value {
        let data: Vec<Value> = self
            .b
            .models
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": CREATED_UNIX, "owned_by": "library"}))
            .collect();
        json!({"object": "list", "data": data})
    }

    /// The final `done: true` object of `/api/chat` (`key == "chat"`) or `/api/generate`;
    /// `whole` puts the full text in it (non-streamed responses).
    fn ollama_final(&self, key: &str, whole: bool) -> Value {
        let text = if whole { self.text() } else { String::new() };
        let mut v = json!({"model": self.model, "created_at": CREATED_AT});
        if key == "chat" {
            v["message"] = json!({"role": "assistant", "content": text});
        } else {
            v["response"] = json!(text);
        }
        v["done"] = json!(true);
        v["done_reason"] = json!("stop");
        v["total_duration"] = json!(1000);
        v["load_duration"] = json!(100);
        if let Some(p) = self.b.prompt_tokens {
            v["prompt_eval_count"] = json!(p);
        }
        v["prompt_eval_duration"] = json!(10);
        v["eval_count"] = json!(self.b.tokens);
        v["eval_duration"] = json!(100);
        v
    }

    fn ndjson_plan(&self, key: &str) -> Plan {
        let tokens = (0..self.b.tokens)
            .map(|i| {
                let mut v = json!({"model": self.model, "created_at": CREATED_AT});
                if key == "chat" {
                    v["message"] = json!({"role": "assistant", "content": self.token(i)});
                } else {
                    v["response"] = json!(self.token(i));
                }
                v["done"] = json!(false);
                format!("{v}\n")
            })
            .collect();
        Plan {
            content_type: "application/x-ndjson",
            prelude: Vec::new(),
            tokens,
            epilogue: vec![format!("{}\n", self.ollama_final(key, false))],
        }
    }

    /// As Ollama's middleware writes them (middleware/openai.go): with `include_usage`, chat
    /// adds a last chunk with `choices: []` and the usage; completions put a zero usage on every
    /// chunk and repeat the last chunk with `choices: []` and the usage.
    fn openai_plan(&self, chat: bool, include_usage: bool) -> Plan {
        let n = self.b.tokens;
        let zero = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
        let tokens = (0..n)
            .map(|i| {
                let finish = if i + 1 == n { json!("stop") } else { Value::Null };
                let mut v = if chat {
                    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                           "created": CREATED_UNIX, "model": self.model,
                           "system_fingerprint": "fp_ollama",
                           "choices": [{"index": 0,
                                        "delta": {"role": "assistant", "content": self.token(i)},
                                        "finish_reason": finish}]})
                } else {
                    json!({"id": "cmpl-1", "object": "text_completion",
                           "created": CREATED_UNIX, "model": self.model,
                           "system_fingerprint": "fp_ollama",
                           "choices": [{"index": 0, "text": self.token(i),
                                        "finish_reason": finish}]})
                };
                if include_usage && !chat {
                    v["usage"] = zero.clone();
                }
                format!("data: {v}\n\n")
            })
            .collect();
        let mut epilogue = Vec::new();
        if include_usage {
            let object = if chat { "chat.completion.chunk" } else { "text_completion" };
            let id = if chat { "chatcmpl-1" } else { "cmpl-1" };
            let v = json!({"id": id, "object": object, "created": CREATED_UNIX,
                           "model": self.model, "system_fingerprint": "fp_ollama",
                           "choices": [], "usage": self.usage()});
            epilogue.push(format!("data: {v}\n\n"));
        }
        epilogue.push("data: [DONE]\n\n".to_string());
        Plan { content_type: "text/event-stream", prelude: Vec::new(), tokens, epilogue }
    }

    fn openai_whole(&self, chat: bool) -> Value {
        if chat {
            json!({"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED_UNIX,
                   "model": self.model, "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0,
                                "message": {"role": "assistant", "content": self.text()},
                                "finish_reason": "stop"}],
                   "usage": self.usage()})
        } else {
            json!({"id": "cmpl-1", "object": "text_completion", "created": CREATED_UNIX,
                   "model": self.model, "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "text": self.text(), "finish_reason": "stop"}],
                   "usage": self.usage()})
        }
    }

    fn sse(event: &str, data: &Value) -> String {
        format!("event: {event}\ndata: {data}\n\n")
    }

    fn anthropic_plan(&self) -> Plan {
        let start = json!({"type": "message_start",
                           "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                       "model": self.model, "content": [], "stop_reason": null,
                                       "usage": {"input_tokens": self.b.message_start_input_tokens.unwrap_or(self.prompt()),
                                                 "output_tokens": 0}}});
        let block = json!({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "text", "text": ""}});
        let tokens = (0..self.b.tokens)
            .map(|i| {
                let d = json!({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": self.token(i)}});
                Gen::sse("content_block_delta", &d)
            })
            .collect();
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"input_tokens": self.prompt(), "output_tokens": self.b.tokens}});
        Plan {
            content_type: "text/event-stream",
            prelude: vec![
                Gen::sse("message_start", &start),
                Gen::sse("content_block_start", &block),
            ],
            tokens,
            epilogue: vec![
                Gen::sse("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
                Gen::sse("message_delta", &delta),
                Gen::sse("message_stop", &json!({"type": "message_stop"})),
            ],
        }
    }

    fn anthropic_whole(&self) -> Value {
        json!({"id": "msg_1", "type": "message", "role": "assistant", "model": self.model,
               "content": [{"type": "text", "text": self.text()}],
               "stop_reason": "end_turn", "stop_sequence": null,
               "usage": {"input_tokens": self.prompt(), "output_tokens": self.b.tokens}})
    }

    fn responses_whole(&self) -> Value {
        let (p, c) = (self.prompt(), self.b.tokens as u64);
        json!({"id": "resp_1", "object": "response", "created_at": CREATED_UNIX,
               "status": "completed", "model": self.model,
               "output": [{"type": "message", "id": "msg_1", "status": "completed",
                           "role": "assistant",
                           "content": [{"type": "output_text", "text": self.text(),
                                        "annotations": []}]}],
               "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c}})
    }

    fn responses_plan(&self) -> Plan {
        let created = json!({"type": "response.created",
                             "response": {"id": "resp_1", "object": "response",
                                          "created_at": CREATED_UNIX, "status": "in_progress",
                                          "model": self.model, "output": []}});
        let tokens = (0..self.b.tokens)
            .map(|i| {
                let d = json!({"type": "response.output_text.delta", "item_id": "msg_1",
                               "output_index": 0, "content_index": 0, "delta": self.token(i)});
                Gen::sse("response.output_text.delta", &d)
            })
            .collect();
        let done = json!({"type": "response.completed", "response": self.responses_whole()});
        Plan {
            content_type: "text/event-stream",
            prelude: vec![Gen::sse("response.created", &created)],
            tokens,
            epilogue: vec![Gen::sse("response.completed", &done)],
        }
    }
}
