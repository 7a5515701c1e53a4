//! One request/response exchange on a connection: the request body as a
//! bounded, deadline-guarded reader, and a response writer that frames chunks
//! itself and hands every chunk to the socket at once (no userspace buffer, so
//! each NDJSON line or SSE event leaves as soon as the upstream produced it).

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::chunked::Decoder;
use super::conn::Conn;
use super::head::{Framing, Head, Version};
use super::server::{WatchGuard, Watches};
use std::os::fd::AsRawFd;

/// An unread request body that has already arrived whole, up to this size,
/// is discarded to keep the connection alive; otherwise the connection closes
/// (SPEC §11). Never an allocation sized by the client.
const DRAIN_LIMIT: u64 = 64 * 1024;

enum Body {
    Length(u64),
    Chunked(Decoder),
    Done,
}

/// Why reading the request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The client paused longer than `timeouts.request_body`.
    Timeout,
    /// Broken chunked framing.
    Malformed(&'static str),
    /// The client closed the connection before the body ended.
    Closed,
    /// The body grew past the limit set with [`Exchange::limit_body`].
    TooLarge,
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    /// Exactly this many bytes follow.
    Length(u64),
    /// Unknown length: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
    Stream,
    /// No body (HEAD, 204, 304); a Content-Length to announce may be given.
    None(Option<u64>),
}

enum Resp {
    NotStarted,
    Chunked,
    Length(u64),
    CloseDelimited,
    Done,
}

pub struct Exchange<'c> {
    conn: &'c mut Conn,
    watches: &'c Watches,
    pub head: Head,
    pub started: Instant,
    body: Body,
    body_timeout: Duration,
    /// When reading the body must have ended, if a route sets a total
    /// deadline (see [`Exchange::set_body_deadline`]).
    body_deadline: Option<Instant>,
    write_stall: Duration,
    continue_sent: bool,
    body_error: Option<BodyError>,
    /// Most body bytes the request may carry, and how many were read.
    body_limit: Option<u64>,
    body_read: u64,
    resp: Resp,
    keep_alive: bool,
    /// The response was given up half-way (see [`Exchange::abort`]).
    aborted: bool,
    /// Headers added to every response (request id, …).
    extra: Vec<(&'static str, String)>,
    scratch: Vec<u8>,
    /// Response status sent, 0 until then.
    pub status: u16,
    /// Response body bytes written.
    pub bytes_sent: u64,
    /// When the response head went out.
    pub first_byte: Option<Instant>,
}

impl<'c> Exchange<'c> {
    pub fn new(
        conn: &'c mut Conn,
        head: Head,
        started: Instant,
        body_timeout: Duration,
        keep_alive: bool,
        watches: &'c Watches,
    ) -> Exchange<'c> {
        let body = match head.framing {
            Framing::None => Body::Done,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(Decoder::default()),
        };
        let keep_alive = keep_alive && !head.close;
        Exchange {
            conn,
            watches,
            head,
            started,
            body,
            body_timeout,
            body_deadline: None,
            write_stall: body_timeout,
            continue_sent: false,
            body_error: None,
            body_limit: None,
            body_read: 0,
            resp: Resp::NotStarted,
            keep_alive,
            aborted: false,
            extra: Vec::new(),
            scratch: Vec::new(),
            status: 0,
            bytes_sent: 0,
            first_byte: None,
        }
    }

    pub fn peer(&self) -> std::net::SocketAddr {
        self.conn.peer
    }

    /// Whether the request came over butler's own TLS (`X-Forwarded-Proto`).
    pub fn is_tls(&self) -> bool {
        self.conn.socket.is_tls()
    }

    /// Calls `on_hangup` if the client closes the connection while the guard
    /// lives (used to cut the upstream request at once).
    pub fn on_client_hangup(&self, on_hangup: Box<dyn FnOnce() + Send>) -> WatchGuard<'c> {
        self.watches.watch(self.conn.socket.tcp().as_raw_fd(), on_hangup)
    }

    /// Whether the request has a body at all.
    pub fn has_body(&self) -> bool {
        self.head.framing != Framing::None
    }

    /// Makes reading fail with [`BodyError::TooLarge`] once the body grows
    /// past `max` bytes (a streamed upload over `max_request_bytes`).
    pub fn limit_body(&mut self, max: u64) {
        self.body_limit = Some(max);
    }

    /// Makes reading fail with [`BodyError::Timeout`] once `at` has passed,
    /// however steadily the body arrives (a total deadline, where
    /// `timeouts.request_body` only bounds each pause).
    pub fn set_body_deadline(&mut self, at: Instant) {
        self.body_deadline = Some(at);
    }

    /// How long the next body read may wait.
    fn read_wait(&self) -> Duration {
        match self.body_deadline {
            Some(at) => at.saturating_duration_since(Instant::now()).min(self.body_timeout),
            None => self.body_timeout,
        }
    }

    /// The first error met while reading the request body.
    pub fn body_error(&self) -> Option<BodyError> {
        self.body_error
    }

    pub fn response_started(&self) -> bool {
        !matches!(self.resp, Resp::NotStarted)
    }

    /// The connection may serve another request after this one.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive && matches!(self.resp, Resp::Done)
    }

    /// Adds a header to the response (before it starts).
    pub fn add_header(&mut self, name: &'static str, value: String) {
        self.extra.push((name, value));
    }

    /// Whether butler sets header `name` itself (an upstream copy must then
    /// be dropped, or the client would see it twice).
    pub fn sets_header(&self, name: &str) -> bool {
        self.extra.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    fn fail(&mut self, e: BodyError) -> io::Error {
        self.body_error.get_or_insert(e);
        self.keep_alive = false;
        match e {
            BodyError::Timeout => io::Error::new(io::ErrorKind::TimedOut, "request body timeout"),
            BodyError::Malformed(m) => io::Error::new(io::ErrorKind::InvalidData, m),
            BodyError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, "client closed"),
            BodyError::TooLarge => io::Error::new(io::ErrorKind::InvalidData, "request too large"),
        }
    }

    fn read_error(&mut self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::TimedOut {
            self.fail(BodyError::Timeout)
        } else {
            self.fail(BodyError::Closed)
        }
    }

    fn send_continue(&mut self) -> io::Result<()> {
        if self.head.expect_continue && !self.continue_sent && !self.response_started() {
            self.continue_sent = true;
            // Body bytes are here already (the intake may have asked for and
            // received the whole body): the client is no longer waiting, and
            // RFC 9110 §10.1.1 lets the interim response be left out.
            if !self.conn.buffered().is_empty() {
                return Ok(());
            }
            self.conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n", self.write_stall)?;
        }
        Ok(())
    }

    /// Reads request body bytes (0 at the end of the body).
    pub fn read_body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.read_body_unlimited(out)?;
        self.body_read += n as u64;
        if self.body_limit.is_some_and(|max| self.body_read > max) {
            self.keep_alive = false;
            return Err(self.fail(BodyError::TooLarge));
        }
        Ok(n)
    }

    fn read_body_unlimited(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if let Some(e) = self.body_error {
            return Err(self.fail(e));
        }
        if matches!(self.body, Body::Done) {
            return Ok(0);
        }
        self.send_continue()?;
        let wait = self.read_wait();
        match &mut self.body {
            Body::Done => Ok(0),
            Body::Length(left) => {
                let want = (*left).min(out.len() as u64) as usize;
                match self.conn.read_into(&mut out[..want], wait) {
                    Ok(0) => Err(self.fail(BodyError::Closed)),
                    Ok(n) => {
                        *left -= n as u64;
                        if *left == 0 {
                            self.body = Body::Done;
                        }
                        Ok(n)
                    }
                    Err(e) => Err(self.read_error(e)),
                }
            }
            Body::Chunked(_) => self.read_chunked(out),
        }
    }

    fn read_chunked(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let Body::Chunked(decoder) = &mut self.body else {
                return Ok(0);
            };
            if decoder.is_done() {
                self.body = Body::Done;
                return Ok(0);
            }
            let input = self.conn.buffered();
            if input.is_empty() {
                let wait = self.read_wait();
                match self.conn.fill(wait) {
                    Ok(0) => return Err(self.fail(BodyError::Closed)),
                    Ok(_) => continue,
                    Err(e) => return Err(self.read_error(e)),
                }
            }
            let input = &input[..input.len().min(out.len())];
            match decoder.decode(input) {
                Ok(step) => {
                    let n = step.data.len();
                    out[..n].copy_from_slice(&input[step.data]);
                    self.conn.consume(step.consumed);
                    if n > 0 {
                        return Ok(n);
                    }
                }
                Err(e) => return Err(self.fail(BodyError::Malformed(e.0))),
            }
        }
    }

    /// Reads the whole body into memory, refusing more than `limit` bytes.
    /// `Ok(None)` means it was larger than `limit`.
    pub fn read_body_limited(&mut self, limit: usize) -> io::Result<Option<Vec<u8>>> {
        if let Framing::Length(n) = self.head.framing
            && n > limit as u64
        {
            return Ok(None);
        }
        let mut body = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self.read_body(&mut chunk)?;
            if n == 0 {
                return Ok(Some(body));
            }
            if body.len() + n > limit {
                self.keep_alive = false;
                return Ok(None);
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }

    /// Discards the rest of the request body if it has already arrived whole,
    /// so the connection can be reused. It never waits for the network: a
    /// request answered without its body (a refusal, a public route) must not
    /// let a client hold the worker by sending the body slowly (SPEC §11).
    /// False means the connection closes after the response.
    fn drain(&mut self) -> bool {
        if matches!(self.body, Body::Done) {
            return true;
        }
        if self.body_error.is_some() || (self.head.expect_continue && !self.continue_sent) {
            return false;
        }
        if let Body::Length(n) = self.body
            && n > DRAIN_LIMIT
        {
            return false;
        }
        // Reads then find nothing to wait for: what has not arrived yet
        // ends them as a timeout at once.
        self.body_deadline = Some(Instant::now());
        let mut chunk = [0u8; 8192];
        let mut total = 0u64;
        while total <= DRAIN_LIMIT {
            match self.read_body(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => total += n as u64,
                Err(_) => return false,
            }
        }
        false
    }

    /// Writes the status line and headers. Framing headers (`Content-Length`,
    /// `Transfer-Encoding`, `Connection`) are the writer's: callers must not
    /// pass them.
    pub fn start_response(
        &mut self,
        status: u16,
        headers: &[(&str, &[u8])],
        len: BodyLen,
    ) -> io::Result<()> {
        self.start_with_body(status, headers, len, &[])
    }

    fn start_with_body(
        &mut self,
        status: u16,
        headers: &[(&str, &[u8])],
        len: BodyLen,
        body: &[u8],
    ) -> io::Result<()> {
        debug_assert!(!self.response_started());
        if self.keep_alive && !self.drain() {
            self.keep_alive = false;
        }
        let http10 = self.head.version == Version::Http10;
        if http10 && len == BodyLen::Stream {
            self.keep_alive = false;
        }
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            push_header(&mut out, name, value);
        }
        for (name, value) in &self.extra {
            push_header(&mut out, name, value.as_bytes());
        }
        self.resp = match len {
            BodyLen::Length(n) => {
                push_header(&mut out, "Content-Length", n.to_string().as_bytes());
                if n == 0 { Resp::Done } else { Resp::Length(n) }
            }
            BodyLen::Stream if http10 => Resp::CloseDelimited,
            BodyLen::Stream => {
                push_header(&mut out, "Transfer-Encoding", b"chunked");
                Resp::Chunked
            }
            BodyLen::None(length) => {
                if let Some(n) = length {
                    push_header(&mut out, "Content-Length", n.to_string().as_bytes());
                }
                Resp::Done
            }
        };
        if !self.keep_alive {
            push_header(&mut out, "Connection", b"close");
        } else if http10 {
            push_header(&mut out, "Connection", b"keep-alive");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        self.status = status;
        self.first_byte = Some(Instant::now());
        let result = self.conn.write_all(&out, self.write_stall);
        self.scratch = out;
        if result.is_err() {
            self.abort();
        }
        result
    }

    /// Sends a complete response with a small in-memory body, in one write.
    pub fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> io::Result<()> {
        let len = if self.head.method == "HEAD" {
            BodyLen::None(Some(body.len() as u64))
        } else {
            BodyLen::Length(body.len() as u64)
        };
        let body = if matches!(len, BodyLen::None(_)) { &[][..] } else { body };
        self.start_with_body(status, headers, len, body)?;
        if !body.is_empty() {
            self.bytes_sent += body.len() as u64;
            self.resp = Resp::Done;
        }
        Ok(())
    }

    /// Sends a JSON response (`Content-Type: application/json`).
    pub fn respond_json(&mut self, status: u16, body: &str) -> io::Result<()> {
        self.respond(status, &[("Content-Type", b"application/json")], body.as_bytes())
    }

    /// Writes one piece of the response body and hands it to the socket.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let result = match self.resp {
            Resp::Chunked => {
                let mut out = std::mem::take(&mut self.scratch);
                out.clear();
                // Written straight into the reused buffer: no allocation per chunk.
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
                let r = self.conn.write_all(&out, self.write_stall);
                self.scratch = out;
                r
            }
            Resp::Length(left) if data.len() as u64 <= left => {
                let r = self.conn.write_all(data, self.write_stall);
                let left = left - data.len() as u64;
                self.resp = if left == 0 { Resp::Done } else { Resp::Length(left) };
                r
            }
            Resp::CloseDelimited => self.conn.write_all(data, self.write_stall),
            _ => Err(io::Error::other("response body longer than announced")),
        };
        match result {
            Ok(()) => {
                self.bytes_sent += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Ends the response body cleanly.
    pub fn finish(&mut self) -> io::Result<()> {
        match self.resp {
            Resp::Chunked => {
                self.resp = Resp::Done;
                self.conn.write_all(b"0\r\n\r\n", self.write_stall).inspect_err(|_| self.abort())
            }
            Resp::CloseDelimited => {
                self.keep_alive = false;
                self.resp = Resp::Done;
                Ok(())
            }
            Resp::Length(_) => {
                self.abort();
                Err(io::Error::other("response body shorter than announced"))
            }
            Resp::Done | Resp::NotStarted => Ok(()),
        }
    }

    /// Gives up on the response: the connection is closed without a clean end
    /// (no final chunk), so the client sees the truncation.
    pub fn abort(&mut self) {
        self.keep_alive = false;
        if !matches!(self.resp, Resp::NotStarted) {
            self.resp = Resp::Done;
            self.aborted = true;
        }
    }

    /// Whether the response was cut short: the connection must then close
    /// without a TLS `close_notify`, which would vouch for a complete
    /// (close-delimited) body.
    pub fn aborted(&self) -> bool {
        self.aborted
    }
}

/// Lets the request body be streamed (to the upstream) with `std::io` tools.
impl Read for Exchange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_body(buf)
    }
}

/// A complete response the intake writes on its own, outside any exchange
/// (503 `server busy`, 408, 431, 400, …): a JSON error body
/// `{"error":"<message>"}` and a newline, `Connection: close`, and a
/// `Content-Length` taken from the body itself, never counted by hand.
pub fn canned(status: u16, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string() + "\n";
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    push_header(&mut out, "Content-Type", b"application/json");
    push_header(&mut out, "Content-Length", body.len().to_string().as_bytes());
    push_header(&mut out, "Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reason phrases for the statuses butler produces; others get a generic one
/// (clients ignore the phrase anyway).
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        s if s < 200 => "Informational",
        s if s < 300 => "Success",
        s if s < 400 => "Redirection",
        s if s < 500 => "Client Error",
        _ => "Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every canned answer parses, and its `Content-Length` is exactly its body.
    #[test]
    fn canned_responses_announce_their_length() {
        for (status, message) in [
            (503, "server busy"),
            (408, "request timeout"),
            (431, "request header fields too large"),
            (400, "bad request: exactly one Host header is required"),
            (413, "request body too large"),
            (417, "expectation failed"),
            (400, "quote \" and backslash \\"),
        ] {
            let bytes = canned(status, message);
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut response = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head_len) = response.parse(&bytes).unwrap() else {
                panic!("partial head for {status}");
            };
            assert_eq!(response.code, Some(status));
            let length = response
                .headers
                .iter()
                .find(|h| h.name == "Content-Length")
                .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap());
            let body = &bytes[head_len..];
            assert_eq!(length, Some(body.len()), "{status} {message}");
            let json: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(json["error"], message);
            assert!(body.ends_with(b"}\n"));
        }
    }
}
