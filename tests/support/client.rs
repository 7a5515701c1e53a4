//! A raw HTTP/1.1 client for the integration tests.
//!
//! Tests deliberately avoid `ureq` here: they need to send exact bytes (smuggling attempts,
//! malformed heads, slow-loris heads), see exact framing on the way back (was the response
//! chunked? did the terminating zero chunk arrive?) and time each chunk's arrival. So this module
//! speaks HTTP/1.1 over a plain `TcpStream` and parses responses itself (heads with `httparse`).
//!
//! Every read carries a deadline: a broken product makes a test fail with a message, never hang.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Default deadline for one whole exchange (connect, send, read the complete response).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for a TCP connect to a local test server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A response head must fit in this many bytes; anything larger means a broken server.
const MAX_HEAD: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Response
// ---------------------------------------------------------------------------------------------

/// How a response body was delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body by definition (HEAD request, 1xx, 204, 304).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body runs until the server closes the connection.
    Close,
}

/// A complete (or, if the server cut it short, truncated) HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Header fields in wire order with their original case.
    pub headers: Vec<(String, String)>,
    /// The decoded body (chunk framing removed).
    pub body: Vec<u8>,
    pub framing: Framing,
    /// For chunked bodies, each chunk's data in arrival order (empty otherwise).
    pub chunks: Vec<Vec<u8>>,
    /// Trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
    /// False when the connection ended before the body did (missing zero chunk, short
    /// Content-Length body, or a close-delimited body ended by a reset).
    pub complete: bool,
}

impl Response {
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

    /// The body as text (lossy, so a test failure message is always printable).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the status and body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {} body {:?}",
                self.status,
                self.body_str()
            )
        })
    }

    /// Whether the server announced it will close the connection after this response.
    pub fn connection_close(&self) -> bool {
        self.headers_named("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// Case-insensitive header lookup shared by the client and fake server types.
pub fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// Wire: a buffered reader in which every read has a deadline
// ---------------------------------------------------------------------------------------------

fn timeout_error(what: &str) -> io::Error {
    io::Error::new(ErrorKind::TimedOut, format!("timed out {what}"))
}

/// Buffered reading from a socket where each call takes a deadline. Data is consumed from the
/// buffer only once a whole unit (head, chunk, ...) is available, so a timed-out call can be
/// retried without losing bytes.
struct Wire {
    stream: TcpStream,
    /// Received but not yet consumed bytes.
    buf: Vec<u8>,
    /// The peer closed (or reset) the connection; no more bytes will come.
    eof: bool,
    /// The connection was reset rather than closed in order.
    reset: bool,
    /// When the most recent read that returned data completed.
    last_read_at: Instant,
    /// Every byte received, in order, for tests that want to look at the exact wire bytes.
    raw: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
            eof: false,
            reset: false,
            last_read_at: Instant::now(),
            raw: Vec::new(),
        }
    }

    /// Reads once more from the socket into the buffer. Ok(0) means end of stream.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        if self.eof {
            return Ok(0);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(timeout_error("waiting for data"));
        }
        // A zero timeout is rejected by std, so round up to a millisecond.
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(wait))?;
        let mut tmp = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.last_read_at = Instant::now();
                    self.buf.extend_from_slice(&tmp[..n]);
                    self.raw.extend_from_slice(&tmp[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(timeout_error("waiting for data"));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    self.eof = true;
                    self.reset = true;
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buf.drain(..n).collect()
    }

    /// The bytes up to and including the first CRLFCRLF. `Ok(None)` if the peer closed the
    /// connection before sending any byte of a head.
    fn take_head(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.take(pos + 4)));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(ErrorKind::InvalidData, "response head too large"));
            }
            if self.fill(deadline)? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed inside a response head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Waits until the peer closes the connection; bytes arriving meanwhile are kept.
    fn wait_eof(&mut self, deadline: Instant) -> bool {
        loop {
            match self.fill(deadline) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return self.eof,
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Result of trying to decode one chunk from the front of a buffer.
enum ChunkParse {
    /// More bytes are needed.
    Incomplete,
    /// A data chunk: (bytes consumed, data).
    Data(usize, Vec<u8>),
    /// The zero chunk and trailer section: (bytes consumed, trailers).
    Last(usize, Vec<(String, String)>),
}

/// Decodes one chunk (RFC 9112 §7.1) from the front of `buf` without consuming anything.
fn parse_chunk(buf: &[u8]) -> io::Result<ChunkParse> {
    let Some(line_end) = find(buf, b"\r\n") else {
        if buf.len() > 4096 {
            return Err(io::Error::new(ErrorKind::InvalidData, "chunk size line too long"));
        }
        return Ok(ChunkParse::Incomplete);
    };
    let line = std::str::from_utf8(&buf[..line_end])
        .map_err(|_| io::Error::new(ErrorKind::InvalidData, "chunk size line not UTF-8"))?;
    let size_text = line.split(';').next().unwrap_or("").trim();
    let size = u64::from_str_radix(size_text, 16).map_err(|_| {
        io::Error::new(ErrorKind::InvalidData, format!("bad chunk size line {line:?}"))
    })?;
    let start = line_end + 2;
    if size == 0 {
        // Trailer section: header lines, then an empty line.
        let rest = &buf[start..];
        if rest.starts_with(b"\r\n") {
            return Ok(ChunkParse::Last(start + 2, Vec::new()));
        }
        let Some(end) = find(rest, b"\r\n\r\n") else {
            return Ok(ChunkParse::Incomplete);
        };
        let trailers = String::from_utf8_lossy(&rest[..end])
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        return Ok(ChunkParse::Last(start + end + 4, trailers));
    }
    let size = usize::try_from(size)
        .map_err(|_| io::Error::new(ErrorKind::InvalidData, "chunk too large"))?;
    if buf.len() < start + size + 2 {
        return Ok(ChunkParse::Incomplete);
    }
    if &buf[start + size..start + size + 2] != b"\r\n" {
        return Err(io::Error::new(ErrorKind::InvalidData, "chunk data not followed by CRLF"));
    }
    Ok(ChunkParse::Data(start + size + 2, buf[start..start + size].to_vec()))
}

/// A parsed response head.
struct Head {
    version: String,
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
}

fn parse_head(bytes: &[u8]) -> io::Result<Head> {
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Response::new(&mut storage);
    match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(io::Error::new(ErrorKind::InvalidData, "partial response head"));
        }
        Err(e) => {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("unparsable response head ({e}): {:?}", String::from_utf8_lossy(bytes)),
            ));
        }
    }
    Ok(Head {
        version: format!("HTTP/1.{}", parsed.version.unwrap_or(1)),
        status: parsed.code.unwrap_or(0),
        reason: parsed.reason.unwrap_or("").to_string(),
        headers: parsed
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    })
}

/// Decides the body framing of a response (RFC 9112 §6.3).
fn framing_of(request_method: &str, head: &Head) -> io::Result<Framing> {
    if request_method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
    {
        return Ok(Framing::None);
    }
    if let Some(te) = find_header(&head.headers, "transfer-encoding") {
        let last = te.rsplit(',').next().unwrap_or("").trim();
        if last.eq_ignore_ascii_case("chunked") {
            return Ok(Framing::Chunked);
        }
        return Ok(Framing::Close);
    }
    if let Some(cl) = find_header(&head.headers, "content-length") {
        let n = cl.trim().parse::<u64>().map_err(|_| {
            io::Error::new(ErrorKind::InvalidData, format!("bad Content-Length {cl:?}"))
        })?;
        return Ok(Framing::Length(n));
    }
    Ok(Framing::Close)
}

/// Reads one complete response from `wire`. 1xx interim responses are returned as they are
/// (callers that want the final response skip them). `Ok(None)`: the connection closed before
/// a response began.
fn read_response(
    wire: &mut Wire,
    request_method: &str,
    deadline: Instant,
) -> io::Result<Option<Response>> {
    let Some(head_bytes) = wire.take_head(deadline)? else {
        return Ok(None);
    };
    let head = parse_head(&head_bytes)?;
    let framing = framing_of(request_method, &head)?;
    let mut response = Response {
        version: head.version,
        status: head.status,
        reason: head.reason,
        headers: head.headers,
        body: Vec::new(),
        framing,
        chunks: Vec::new(),
        trailers: Vec::new(),
        complete: true,
    };
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let n = usize::try_from(n)
                .map_err(|_| io::Error::new(ErrorKind::InvalidData, "body too large"))?;
            while wire.buf.len() < n {
                if wire.fill(deadline)? == 0 {
                    response.complete = false;
                    break;
                }
            }
            let take = n.min(wire.buf.len());
            response.body = wire.take(take);
        }
        Framing::Close => {
            while wire.fill(deadline)? != 0 {}
            response.body = std::mem::take(&mut wire.buf);
            // An orderly close ends such a body; a reset means it may be cut short.
            response.complete = !wire.reset;
        }
        Framing::Chunked => loop {
            match parse_chunk(&wire.buf)? {
                ChunkParse::Data(used, data) => {
                    wire.take(used);
                    response.body.extend_from_slice(&data);
                    response.chunks.push(data);
                }
                ChunkParse::Last(used, trailers) => {
                    wire.take(used);
                    response.trailers = trailers;
                    break;
                }
                ChunkParse::Incomplete => {
                    if wire.fill(deadline)? == 0 {
                        response.complete = false;
                        break;
                    }
                }
            }
        },
    }
    Ok(Some(response))
}

/// Reads responses until a final (non-1xx) one arrives.
fn read_final_response(
    wire: &mut Wire,
    request_method: &str,
    deadline: Instant,
) -> io::Result<Response> {
    loop {
        match read_response(wire, request_method, deadline)? {
            None => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed without a response",
                ));
            }
            Some(r) if (100..200).contains(&r.status) && r.status != 101 => continue,
            Some(r) => return Ok(r),
        }
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    Ok(stream)
}

/// Connects to `dst` from the local address `src` (port chosen by the system), so tests can
/// play several clients: Linux routes all of 127.0.0.0/8 to the loopback interface.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        return Err(io::Error::new(ErrorKind::InvalidInput, format!("IPv4 only: {dst}")));
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket whose descriptor goes into a TcpStream at once (which closes it on
    // every path); the address pointers point at live, correctly sized sockaddr_in values.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(src, 0);
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(*dst.ip(), dst.port());
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        stream
    };
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    Ok(stream)
}

/// Parses everything received on a connection that the server then closed as exactly one
/// response, as strictly as a careful client (Python's `requests`, curl) reads it: a complete
/// head, one `Content-Length`, and exactly that many body bytes before the close — fewer is a
/// truncated body, more is garbage after the response.
pub fn parse_strict(raw: &[u8]) -> Result<Response, String> {
    let text = || String::from_utf8_lossy(raw).into_owned();
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| format!("no complete head: {:?}", text()))?;
    let head = parse_head(&raw[..end + 4]).map_err(|e| e.to_string())?;
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    let [length] = lengths[..] else {
        return Err(format!("want exactly one Content-Length: {:?}", text()));
    };
    let length: usize =
        length.parse().map_err(|_| format!("bad Content-Length {length:?}: {:?}", text()))?;
    let body = &raw[end + 4..];
    if body.len() != length {
        return Err(format!(
            "Content-Length {length} but {} body bytes before the close: {:?}",
            body.len(),
            text()
        ));
    }
    Ok(Response {
        version: head.version,
        status: head.status,
        reason: head.reason,
        headers: head.headers,
        body: body.to_vec(),
        framing: Framing::Length(length as u64),
        chunks: Vec::new(),
        trailers: Vec::new(),
        complete: true,
    })
}

/// Serialises an HTTP/1.1 request. `Host`, `Content-Length` and `Connection: close` are added
/// unless the caller supplied that header (or `Transfer-Encoding`, in which case the body is
/// sent exactly as given and must already be chunk-encoded). `Content-Length` is sent when
/// there is a body or the method normally carries one.
pub fn build_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let body_method = matches!(method, "POST" | "PUT" | "PATCH");
    if !has("content-length") && !has("transfer-encoding") && (!body.is_empty() || body_method) {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close && !has("connection") {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Writes a request, then reads the final response. A failed write (a server may answer early,
/// e.g. 413 for a large body, and close without reading the rest) is reported only if no
/// response can be read afterwards.
fn exchange(
    wire: &mut Wire,
    bytes: &[u8],
    method: &str,
    deadline: Instant,
) -> io::Result<Response> {
    let written = wire.stream.write_all(bytes);
    match read_final_response(wire, method, deadline) {
        Ok(response) => Ok(response),
        Err(read_error) => Err(match written {
            Err(w) => io::Error::new(w.kind(), format!("write failed ({w}); then {read_error}")),
            Ok(()) => read_error,
        }),
    }
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the final response.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let mut wire = Wire::new(connect(addr)?);
    let bytes = build_request(addr, method, path, headers, body, true);
    exchange(&mut wire, &bytes, method, deadline)
}

/// Like [`try_request`] but panics (naming the request) on any I/O failure or timeout.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} to {addr} failed: {e}"))
}

/// `GET path` with the given headers.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers, b"")
}

/// `POST path` with a JSON body and `Content-Type: application/json` (unless given).
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Response {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if !all.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        all.push(("Content-Type", "application/json"));
    }
    request(addr, "POST", path, &all, body.to_string().as_bytes())
}

// ---------------------------------------------------------------------------------------------
// send_raw and RawConn
// ---------------------------------------------------------------------------------------------

/// What came back for a hand-written request.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// Exactly the bytes received (interim 1xx responses included).
    pub raw: Vec<u8>,
    /// The final response, if one arrived in full head form.
    pub response: Option<Response>,
    /// Why no response was parsed (closed without answer, timeout, garbage), if so.
    pub error: Option<String>,
}

impl RawResponse {
    /// The parsed final response; panics with the raw bytes if there is none.
    pub fn response(&self) -> &Response {
        self.response.as_ref().unwrap_or_else(|| {
            panic!(
                "no HTTP response ({}); received {:?}",
                self.error.as_deref().unwrap_or("?"),
                String::from_utf8_lossy(&self.raw)
            )
        })
    }

    /// Status of the final response; panics if there is none.
    pub fn status(&self) -> u16 {
        self.response().status
    }

    /// The received bytes as text, for assertions on exact wire format.
    pub fn raw_str(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// Writes `bytes` verbatim on a fresh connection and reads one final response (until it is
/// complete or the connection closes; 10 s deadline). A write error (the server may close
/// early, e.g. after rejecting a head) is not fatal: whatever response arrived is still read.
/// The request method (for HEAD framing) is taken from the first word of `bytes`.
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let method =
        String::from_utf8_lossy(bytes).split_whitespace().next().unwrap_or("GET").to_string();
    let mut stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            return RawResponse {
                raw: Vec::new(),
                response: None,
                error: Some(format!("connect: {e}")),
            };
        }
    };
    let write_error = stream.write_all(bytes).err();
    let mut wire = Wire::new(stream);
    let result = read_final_response(&mut wire, &method, deadline);
    let (response, mut error) = match result {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e.to_string())),
    };
    if let (Some(we), Some(err)) = (write_error, error.as_mut()) {
        err.push_str(&format!(" (after write error: {we})"));
    }
    RawResponse { raw: wire.raw, response, error }
}

/// A persistent connection for tests of keep-alive, pipelining, `Expect: 100-continue`,
/// partial heads and "does the server close this connection?".
pub struct RawConn {
    wire: Wire,
    addr: SocketAddr,
}

impl RawConn {
    /// Connects or panics.
    pub fn connect(addr: SocketAddr) -> RawConn {
        RawConn::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr} failed: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<RawConn> {
        Ok(RawConn { wire: Wire::new(connect(addr)?), addr })
    }

    /// Connects from the local address `src` (see [`connect_from`]).
    pub fn try_connect_from(src: Ipv4Addr, addr: SocketAddr) -> io::Result<RawConn> {
        Ok(RawConn { wire: Wire::new(connect_from(src, addr)?), addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes bytes verbatim.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wire.stream.write_all(bytes)?;
        self.wire.stream.flush()
    }

    /// Writes a well-formed keep-alive request (no `Connection: close`; see [`build_request`]).
    pub fn send_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let bytes = build_request(self.addr, method, path, headers, body, false);
        self.write(&bytes)
    }

    /// Reads the next response, 1xx interim responses included. `request_method` decides HEAD
    /// framing. Errors with `UnexpectedEof` if the server closed the connection instead.
    pub fn read_response(
        &mut self,
        request_method: &str,
        timeout: Duration,
    ) -> io::Result<Response> {
        let deadline = Instant::now() + timeout;
        read_response(&mut self.wire, request_method, deadline)?.ok_or_else(|| {
            io::Error::new(ErrorKind::UnexpectedEof, "connection closed without a response")
        })
    }

    /// Sends a keep-alive request and reads its final response, panicking on failure.
    pub fn roundtrip(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let bytes = build_request(self.addr, method, path, headers, body, false);
        exchange(&mut self.wire, &bytes, method, deadline)
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"))
    }

    /// Waits up to `timeout` for the server to close the connection. Bytes that arrive in the
    /// meantime are kept for [`RawConn::read_response`] / [`RawConn::received`].
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        self.wire.wait_eof(Instant::now() + timeout)
    }

    /// Whether the connection was reset (RST) rather than closed in order.
    pub fn was_reset(&self) -> bool {
        self.wire.reset
    }

    /// Every byte received on this connection so far.
    pub fn received(&self) -> &[u8] {
        &self.wire.raw
    }

    /// Half-closes the sending side (the server sees end of input).
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.wire.stream.shutdown(Shutdown::Write)
    }

    /// The underlying socket, e.g. to query its local address.
    pub fn stream(&self) -> &TcpStream {
        &self.wire.stream
    }
}

// ---------------------------------------------------------------------------------------------
// StreamingResponse
// ---------------------------------------------------------------------------------------------

/// How a streamed body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The body ended as its framing says (zero chunk, full Content-Length, close-delimited EOF,
    /// or no body at all).
    Clean,
    /// The connection closed (or was reset) before the body's end.
    Truncated,
}

/// A response read piece by piece as it arrives, for streaming tests (time to first token,
/// per-token flushing, truncation, client disconnects).
pub struct StreamingResponse {
    wire: Wire,
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    /// When the complete response head had arrived.
    pub head_at: Instant,
    /// Body bytes still expected for `Framing::Length`.
    remaining: u64,
    end: Option<StreamEnd>,
    timed_out: bool,
    /// Partial line carried between chunks for the line-oriented readers.
    line_buf: Vec<u8>,
    line_at: Instant,
}

impl StreamingResponse {
    /// Sends the request (with `Connection: close`; see [`build_request`]) and returns once the
    /// final response head has arrived; panics on failure or after 10 s.
    pub fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> StreamingResponse {
        StreamingResponse::try_open(addr, method, path, headers, body)
            .unwrap_or_else(|e| panic!("streaming {method} {path} to {addr} failed: {e}"))
    }

    pub fn try_open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<StreamingResponse> {
        let mut stream = connect(addr)?;
        // As in `exchange`: a failed write matters only if no response head follows.
        let written = stream.write_all(&build_request(addr, method, path, headers, body, true));
        StreamingResponse::from_stream(stream, method, DEFAULT_TIMEOUT).map_err(|e| match written {
            Err(w) => io::Error::new(w.kind(), format!("write failed ({w}); then {e}")),
            Ok(()) => e,
        })
    }

    /// Reads a response head from a connection on which the caller already wrote a request.
    /// Interim 1xx responses are skipped.
    pub fn from_stream(
        stream: TcpStream,
        request_method: &str,
        timeout: Duration,
    ) -> io::Result<StreamingResponse> {
        let deadline = Instant::now() + timeout;
        let mut wire = Wire::new(stream);
        let head = loop {
            let Some(bytes) = wire.take_head(deadline)? else {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed without a response",
                ));
            };
            let head = parse_head(&bytes)?;
            if !(100..200).contains(&head.status) || head.status == 101 {
                break head;
            }
        };
        let framing = framing_of(request_method, &head)?;
        Ok(StreamingResponse {
            head_at: wire.last_read_at,
            wire,
            version: head.version,
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            end: if framing == Framing::None { Some(StreamEnd::Clean) } else { None },
            timed_out: false,
            line_buf: Vec::new(),
            line_at: Instant::now(),
        })
    }

    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The next piece of body with the instant its last byte was read: one decoded chunk of a
    /// chunked body, or whatever one read returned for length- or close-delimited bodies.
    /// `None` when the body has ended (see [`StreamingResponse::end`]) or `timeout` passed
    /// (see [`StreamingResponse::timed_out`]; calling again then resumes without data loss).
    pub fn next_chunk(&mut self, timeout: Duration) -> Option<(Vec<u8>, Instant)> {
        let deadline = Instant::now() + timeout;
        self.timed_out = false;
        if self.end.is_some() {
            return None;
        }
        loop {
            // First try to produce a piece from bytes already buffered.
            match self.framing {
                Framing::None => {
                    self.end = Some(StreamEnd::Clean);
                    return None;
                }
                Framing::Chunked => match parse_chunk(&self.wire.buf) {
                    Ok(ChunkParse::Data(used, data)) => {
                        self.wire.take(used);
                        return Some((data, self.wire.last_read_at));
                    }
                    Ok(ChunkParse::Last(used, _)) => {
                        self.wire.take(used);
                        self.end = Some(StreamEnd::Clean);
                        return None;
                    }
                    Ok(ChunkParse::Incomplete) => {}
                    Err(e) => panic!("malformed chunked body: {e}"),
                },
                Framing::Length(_) => {
                    if self.remaining == 0 {
                        self.end = Some(StreamEnd::Clean);
                        return None;
                    }
                    if !self.wire.buf.is_empty() {
                        let n = (self.wire.buf.len() as u64).min(self.remaining) as usize;
                        self.remaining -= n as u64;
                        return Some((self.wire.take(n), self.wire.last_read_at));
                    }
                }
                Framing::Close => {
                    if !self.wire.buf.is_empty() {
                        let data = std::mem::take(&mut self.wire.buf);
                        return Some((data, self.wire.last_read_at));
                    }
                }
            }
            // Then read more.
            match self.wire.fill(deadline) {
                Ok(0) => {
                    self.end = Some(if self.framing == Framing::Close {
                        StreamEnd::Clean
                    } else {
                        StreamEnd::Truncated
                    });
                    return None;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    self.timed_out = true;
                    return None;
                }
                Err(_) => {
                    self.end = Some(StreamEnd::Truncated);
                    return None;
                }
            }
        }
    }

    /// How the body ended, once it has.
    pub fn end(&self) -> Option<StreamEnd> {
        self.end
    }

    /// True once the body ended as framed: for chunked bodies, the terminating `0\r\n\r\n`
    /// arrived (as opposed to the connection closing early).
    pub fn ended_cleanly(&self) -> bool {
        self.end == Some(StreamEnd::Clean)
    }

    /// True when the most recent read call returned because its timeout passed.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// Every remaining piece with its arrival instant, until the body ends. Panics if it has not
    /// ended within `timeout`, so a stalled stream fails the test.
    pub fn collect_chunks(&mut self, timeout: Duration) -> Vec<(Vec<u8>, Instant)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_chunk(left) {
                Some(piece) => out.push(piece),
                None if self.timed_out => {
                    panic!("stream did not end within {timeout:?}; got {} pieces so far", out.len())
                }
                None => return out,
            }
        }
    }

    /// The rest of the body (plus any partial line held by the line readers), until it ends.
    /// Panics if it has not ended within `timeout`.
    pub fn read_to_end(&mut self, timeout: Duration) -> Vec<u8> {
        let mut body = std::mem::take(&mut self.line_buf);
        for (piece, _) in self.collect_chunks(timeout) {
            body.extend_from_slice(&piece);
        }
        body
    }

    /// The next `\n`-terminated line (without `\n` / `\r\n`) and the arrival instant of its
    /// last byte, whatever the chunking. At the end of the body a final unterminated line is
    /// returned once. `None` on end or timeout, as for [`StreamingResponse::next_chunk`].
    pub fn next_line(&mut self, timeout: Duration) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.line_buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.line_buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some((String::from_utf8_lossy(&line).into_owned(), self.line_at));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_chunk(left) {
                Some((data, at)) => {
                    self.line_buf.extend_from_slice(&data);
                    self.line_at = at;
                }
                None if self.timed_out || self.line_buf.is_empty() => return None,
                None => {
                    let line = std::mem::take(&mut self.line_buf);
                    return Some((String::from_utf8_lossy(&line).into_owned(), self.line_at));
                }
            }
        }
    }

    /// The next non-empty NDJSON line parsed as JSON (panics if a line is not JSON).
    pub fn next_json_line(&mut self, timeout: Duration) -> Option<(serde_json::Value, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (line, at) = self.next_line(left)?;
            if line.trim().is_empty() {
                continue;
            }
            let value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("stream line is not JSON ({e}): {line:?}"));
            return Some((value, at));
        }
    }

    /// The payload of the next SSE `data:` line (other SSE lines are skipped), e.g. the JSON
    /// text of an OpenAI chunk or `[DONE]`.
    pub fn next_sse_data(&mut self, timeout: Duration) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (line, at) = self.next_line(left)?;
            if let Some(data) = line.strip_prefix("data:") {
                return Some((data.trim_start().to_string(), at));
            }
        }
    }

    /// Closes the connection mid-stream (the server sees EOF, or a reset if data was unread).
    pub fn disconnect(self) {
        let _ = self.wire.stream.shutdown(Shutdown::Both);
    }

    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        &self.wire.stream
    }
}
