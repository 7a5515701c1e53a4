//! Forwarding to Ollama and streaming the answer back (SPEC §8).
//!
//! The upstream client is a `ureq` agent with redirects off, no proxy from the
//! environment, no decompression and pooled keep-alive connections. Response
//! bodies are copied read by read: each upstream read becomes one chunk on the
//! client socket at once, so tokens reach the client as Ollama writes them.

use std::cell::RefCell;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ureq::http;

use crate::config::{Timeouts, Upstream};
use crate::http::{BodyError, BodyLen, Exchange};
use crate::usage::{self, Charge, Tap};

/// Request headers never forwarded: hop-by-hop ones, credentials meant for
/// butler, the ones butler sets itself, and `Origin`: butler has applied CORS
/// already, and Ollama refuses origins it does not know with a bare 403.
const DROP_REQUEST: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "host",
    "content-length",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "origin",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
];

/// Response headers not passed back: hop-by-hop and framing (butler frames the
/// response itself), and the request id butler sets.
const DROP_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-request-id",
];

/// Bytes per upstream read; each read is forwarded as it arrives.
const COPY_BUF: usize = 16 * 1024;

/// ureq serialises the whole request head into its output buffer, so it
/// must hold the largest head the intake accepts (32 KiB, which bounds the
/// forwarded headers too) plus the few headers butler adds. Every worker's
/// connection holds one, so it is not rounded up further.
const UPSTREAM_OUTPUT_BUF: usize = 36 * 1024;

/// How a forwarded request ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Status sent to the client (0 if none could be sent).
    pub status: u16,
    /// Time until the upstream's response head, if one came.
    pub upstream_first_byte: Option<Duration>,
    /// Set when the exchange did not end normally.
    pub error: Option<&'static str>,
    /// Tokens charged, when the response was tapped.
    pub usage: Option<Charge>,
}

impl Outcome {
    pub fn new(status: u16, error: Option<&'static str>) -> Outcome {
        Outcome { status, upstream_first_byte: None, error, usage: None }
    }
}

/// What butler does with the response body on its way to the client.
pub enum Respond<'a> {
    /// Copy it through as it arrives, watching for token counts if tapped.
    Stream(Option<Metered<'a>>),
    /// Buffer a `200` body and send it rewritten (filtered listings).
    Rewrite(Rewrite<'a>),
}

/// A tapped response: the tap reading token counts, and what to do with them.
///
/// `settle` runs before the client can see the end of the body (the chunked
/// terminator, or the last bytes of a length-framed body), so a client that
/// sends its next request after reading a response is judged against a budget
/// that already holds that response's tokens. A response that ends without
/// counts — cut by either side, or never begun because the client left — is
/// settled with an estimate (SPEC §9, [`usage::charge`]).
pub struct Metered<'a> {
    pub tap: Box<Tap>,
    /// Bytes of the request's prompt text, for an estimate.
    pub prompt_bytes: u64,
    pub settle: &'a dyn Fn(Charge),
}

impl Metered<'_> {
    /// Ends the tap and settles the charge; returns the bytes the tap still
    /// held back, and the charge. `status` is the upstream's (None: no
    /// response came).
    fn close(self, status: Option<u16>) -> (Vec<u8>, Option<Charge>) {
        let (rest, seen) = self.tap.finish();
        let charge = usage::charge(seen, self.prompt_bytes, status);
        if let Some(charge) = charge {
            (self.settle)(charge);
        }
        (rest, charge)
    }
}

/// The request body to send upstream.
pub enum Upload {
    /// Whatever the client sends, streamed through (or none).
    Stream,
    /// An inspected body, already read (possibly rewritten).
    Bytes(Vec<u8>),
}

/// Rewrites a complete `200` response body (a filtered listing); `None`
/// means the upstream's body was not what it should be (502).
pub type Rewrite<'a> = &'a dyn Fn(&[u8]) -> Option<Vec<u8>>;

/// Largest upstream body butler buffers to rewrite.
const MAX_REWRITE: u64 = 8 * 1024 * 1024;

/// Per-request facts the forwarded headers carry.
pub struct Forwarding<'a> {
    pub request_id: &'a str,
    /// The `X-Forwarded-For` value to send.
    pub forwarded_for: &'a str,
    pub proto: &'a str,
}

pub struct Proxy {
    config: ureq::config::Config,
    upstream: Upstream,
}

thread_local! {
    /// Each connection thread has its own agent (and so its own pool of
    /// upstream connections): when a client hangs up, shutting that agent
    /// down interrupts exactly this thread's upstream request and no other.
    static AGENT: RefCell<Option<ureq::Agent>> = const { RefCell::new(None) };
}

impl Proxy {
    pub fn new(upstream: Upstream, timeouts: &Timeouts) -> Proxy {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .proxy(None)
            .user_agent(ureq::config::AutoHeaderValue::None)
            .accept(ureq::config::AutoHeaderValue::None)
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .allow_non_standard_methods(true)
            .timeout_connect(Some(timeouts.upstream_connect))
            .timeout_recv_response(Some(timeouts.upstream_first_byte))
            // One request at a time per thread: one warm connection is enough.
            .max_idle_connections(2)
            .max_idle_connections_per_host(2)
            .max_idle_age(Duration::from_secs(30))
            // Small read buffer: many streams may be open on a Raspberry Pi.
            .input_buffer_size(COPY_BUF)
            .output_buffer_size(UPSTREAM_OUTPUT_BUF)
            .build();
        Proxy { config, upstream }
    }

    fn agent(&self) -> ureq::Agent {
        AGENT.with_borrow_mut(|slot| {
            slot.get_or_insert_with(|| ureq::Agent::new_with_config(self.config.clone())).clone()
        })
    }

    /// Forwards the request in `ex` and streams the response back.
    pub fn forward(
        &self,
        ex: &mut Exchange<'_>,
        fwd: &Forwarding<'_>,
        upload: Upload,
        respond: Respond<'_>,
    ) -> Outcome {
        let length = match &upload {
            Upload::Bytes(b) => Some(b.len() as u64),
            Upload::Stream => match ex.head.framing {
                crate::http::head::Framing::Length(n) => Some(n),
                _ => None,
            },
        };
        // An inspected body goes upstream as inspected: decoded, so without
        // the client's `Content-Encoding` (SPEC §7.1).
        let decoded = matches!(upload, Upload::Bytes(_));
        let request = match self.build_request(ex, fwd, length, decoded) {
            Ok(r) => r,
            Err(reason) => {
                let _ = ex.respond_json(400, &format!("{{\"error\":\"bad request: {reason}\"}}\n"));
                return Outcome::new(400, Some(reason));
            }
        };
        let agent = self.agent();
        let hung_up = Arc::new(AtomicBool::new(false));
        let watch = {
            let (hung_up, agent) = (hung_up.clone(), agent.clone());
            ex.on_client_hangup(Box::new(move || {
                hung_up.store(true, Ordering::SeqCst);
                agent.shutdown();
            }))
        };
        let outcome = self.exchange(ex, request, upload, respond, &agent, &hung_up, fwd.request_id);
        // After the guard is gone no hang-up callback can run, so the flag is
        // final: if the client left at any point (even just after the
        // response ended), the agent was shut down and must be replaced.
        drop(watch);
        if hung_up.load(Ordering::SeqCst) {
            // This thread's agent is shut down; the next request gets a new one.
            AGENT.with_borrow_mut(|slot| *slot = None);
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        ex: &mut Exchange<'_>,
        request: http::Request<()>,
        upload: Upload,
        respond: Respond<'_>,
        agent: &ureq::Agent,
        hung_up: &AtomicBool,
        request_id: &str,
    ) -> Outcome {
        let rewriting = matches!(respond, Respond::Rewrite(_));
        let sent_at = Instant::now();
        let result = if let Upload::Bytes(bytes) = &upload {
            agent.run(request.map(|()| bytes.as_slice()))
        } else if ex.has_body() {
            agent.run(request.map(|()| ureq::SendBody::from_reader(ex)))
        } else {
            agent.run(request.map(|()| ureq::SendBody::none()))
        };
        let response = match result {
            Ok(r) => r,
            Err(_) if hung_up.load(Ordering::SeqCst) => {
                ex.abort();
                let mut outcome = Outcome::new(0, Some("client closed"));
                if let Respond::Stream(Some(m)) = respond {
                    outcome.usage = m.close(None).1;
                }
                return outcome;
            }
            Err(e) => return self.upstream_failed(ex, e, request_id),
        };
        let first_byte = sent_at.elapsed();
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();

        let connection_listed = listed_in_connection(&parts.headers);
        let headers: Vec<(&str, &[u8])> = parts
            .headers
            .iter()
            .filter(|(name, _)| {
                let n = name.as_str();
                !DROP_RESPONSE.contains(&n)
                    && !connection_listed.iter().any(|c| c == n)
                    && !ex.sets_header(n)
            })
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();

        let no_body = ex.head.method == "HEAD" || status == 204 || status == 304 || status < 200;
        let len = if no_body {
            // A filtered listing's length would reveal the unfiltered size.
            BodyLen::None(if rewriting { None } else { content_length(&parts.headers) })
        } else {
            match body.content_length() {
                Some(n) => BodyLen::Length(n),
                None => BodyLen::Stream,
            }
        };
        let mut outcome =
            Outcome { status, upstream_first_byte: Some(first_byte), error: None, usage: None };
        let (rewrite, mut metered) = match respond {
            Respond::Rewrite(r) => (Some(r), None),
            Respond::Stream(m) => (None, m),
        };
        // Bytes of a length-framed body still to come: its last read is
        // settled before it is sent, as there is no terminator to hold back.
        let mut remaining = match len {
            BodyLen::Length(n) => {
                if let Some(m) = &mut metered {
                    m.tap.keep_every_byte();
                }
                Some(n)
            }
            _ => None,
        };
        if let (Some(rewrite), 200, false) = (rewrite, status, no_body) {
            let mut original = Vec::new();
            let read = body.into_reader().take(MAX_REWRITE + 1).read_to_end(&mut original);
            let (rewritten, why) = match read {
                Ok(n) if n as u64 <= MAX_REWRITE => (rewrite(&original), "not valid JSON"),
                Ok(_) => (None, "too large"),
                Err(_) if hung_up.load(Ordering::SeqCst) => {
                    ex.abort();
                    outcome.error = Some("client closed");
                    return outcome;
                }
                Err(_) => (None, "cut short"),
            };
            let Some(new_body) = rewritten else {
                log::warn!(request_id = request_id, problem = why; "unusable upstream listing");
                let _ = ex.respond_json(502, "{\"error\":\"upstream unavailable\"}\n");
                outcome.status = 502;
                outcome.error = Some("invalid upstream listing");
                return outcome;
            };
            let len = BodyLen::Length(new_body.len() as u64);
            if ex.start_response(status, &headers, len).is_err()
                || ex.send(&new_body).is_err()
                || ex.finish().is_err()
            {
                outcome.error = Some("client closed");
            }
            return outcome;
        }
        // A body cut short (by either side) is settled with what was seen.
        let cut = |metered: Option<Metered<'_>>, outcome: &mut Outcome, error| {
            if let Some(m) = metered {
                outcome.usage = m.close(Some(status)).1;
            }
            outcome.error = Some(error);
        };
        if ex.start_response(status, &headers, len).is_err() {
            cut(metered, &mut outcome, "client closed");
            return outcome;
        }
        if no_body {
            return outcome;
        }

        let mut reader = body.into_reader();
        // Room for chunk framing (size line and CRLF, at most 8 bytes here)
        // keeps a framed full read within one 16 KiB TLS record.
        let mut buf = vec![0u8; COPY_BUF - 16];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    if let Some(m) = metered.take() {
                        let (rest, charge) = m.close(Some(status));
                        outcome.usage = charge;
                        if !rest.is_empty() && ex.send(&rest).is_err() {
                            outcome.error = Some("client closed");
                            return outcome;
                        }
                    }
                    if ex.finish().is_err() {
                        outcome.error = Some("client closed");
                    }
                    return outcome;
                }
                Ok(n) => {
                    let last = match &mut remaining {
                        Some(r) => {
                            *r = r.saturating_sub(n as u64);
                            *r == 0
                        }
                        None => false,
                    };
                    let out = match &mut metered {
                        Some(m) => m.tap.feed(&buf[..n]),
                        None => std::borrow::Cow::Borrowed(&buf[..n]),
                    };
                    if last && let Some(m) = metered.take() {
                        // A length-framed body is tapped without hiding, so
                        // the tap holds nothing back.
                        let (rest, charge) = m.close(Some(status));
                        debug_assert!(rest.is_empty());
                        outcome.usage = charge;
                    }
                    // An empty chunk would end a chunked body: send nothing.
                    if !out.is_empty() && ex.send(&out).is_err() {
                        // Dropping the unfinished reader closes the upstream
                        // connection, so Ollama stops generating.
                        cut(metered, &mut outcome, "client closed");
                        return outcome;
                    }
                }
                Err(_) if hung_up.load(Ordering::SeqCst) => {
                    ex.abort();
                    cut(metered, &mut outcome, "client closed");
                    return outcome;
                }
                Err(_) => {
                    // The upstream died mid-stream: end without a clean
                    // terminator so the client sees the truncation. The
                    // charge is settled first, like a complete response's.
                    cut(metered, &mut outcome, "upstream closed mid-stream");
                    ex.abort();
                    return outcome;
                }
            }
        }
    }

    fn build_request(
        &self,
        ex: &Exchange<'_>,
        fwd: &Forwarding<'_>,
        length: Option<u64>,
        decoded: bool,
    ) -> Result<http::Request<()>, &'static str> {
        let head = &ex.head;
        let method =
            http::Method::from_bytes(head.method.as_bytes()).map_err(|_| "invalid method")?;
        let mut builder =
            http::Request::builder().method(method).uri(self.upstream.url(&head.target.raw));
        let connection_listed: Vec<String> = head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect();
        for (name, value) in &head.headers {
            let lower = name.to_ascii_lowercase();
            if DROP_REQUEST.contains(&lower.as_str())
                || connection_listed.contains(&lower)
                || (decoded && lower == "content-encoding")
            {
                continue;
            }
            builder = builder.header(name.as_str(), value.as_slice());
        }
        if let Some(n) = length {
            builder = builder.header("content-length", n);
        }
        builder = builder
            .header("x-forwarded-for", fwd.forwarded_for)
            .header("x-forwarded-proto", fwd.proto)
            .header("x-request-id", fwd.request_id);
        builder.body(()).map_err(|_| "invalid header")
    }

    /// Maps an upstream failure to 502/504, unless the real cause was the
    /// client's own request body.
    fn upstream_failed(&self, ex: &mut Exchange<'_>, e: ureq::Error, request_id: &str) -> Outcome {
        let (status, body, error): (u16, &str, &'static str) = match ex.body_error() {
            Some(BodyError::Timeout) => {
                (408, "{\"error\":\"request timeout\"}\n", "request body timeout")
            }
            Some(BodyError::Malformed(_)) => (
                400,
                "{\"error\":\"bad request: malformed chunked body\"}\n",
                "malformed request body",
            ),
            Some(BodyError::Closed) => (0, "", "client closed"),
            Some(BodyError::TooLarge) => {
                (413, "{\"error\":\"request too large\"}\n", "request too large")
            }
            None => match e {
                ureq::Error::Timeout(ureq::Timeout::RecvResponse) => {
                    (504, "{\"error\":\"upstream timeout\"}\n", "upstream timeout")
                }
                _ => (502, "{\"error\":\"upstream unavailable\"}\n", "upstream unavailable"),
            },
        };
        if status != 0 && !ex.response_started() {
            let _ = ex.respond_json(status, body);
        }
        log::warn!(request_id = request_id, detail:% = e; "upstream request failed");
        Outcome::new(status, Some(error))
    }
}

fn listed_in_connection(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect()
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}
