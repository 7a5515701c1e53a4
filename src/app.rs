//! The request pipeline (SPEC §7.5): public routes, then authentication, then
//! forwarding; with the request id, the audit log lines and the metrics that
//! every request gets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use log::Level;
use log::kv::Value;
use subtle::ConstantTimeEq;

use crate::auth::KeyStore;
use crate::config::Config;
use crate::health::Health;
use crate::http::{Exchange, Service};
use crate::logging;
use crate::metrics::Metrics;
use crate::proxy::{Forwarding, Proxy};
use crate::routes::{self, Public};

pub struct App {
    metrics_token: Option<String>,
    keys: KeyStore,
    proxy: Proxy,
    health: Health,
    metrics: Metrics,
    ids: RequestIds,
}

impl App {
    pub fn new(config: &Config) -> std::io::Result<App> {
        Ok(App {
            metrics_token: config.metrics_token.clone(),
            keys: KeyStore::new(&config.clients),
            proxy: Proxy::new(config.upstream.clone(), &config.timeouts),
            health: Health::new(&config.upstream),
            metrics: Metrics::new(),
            ids: RequestIds::new()?,
        })
    }

    fn public(&self, ex: &mut Exchange<'_>, route: Public) -> u16 {
        if ex.head.method != "GET" && ex.head.method != "HEAD" {
            let _ = ex.respond(
                405,
                &[("Content-Type", b"application/json"), ("Allow", b"GET, HEAD")],
                b"{\"error\":\"method not allowed\"}\n",
            );
            return 405;
        }
        match route {
            Public::Healthz => match self.health.check() {
                Ok(()) => {
                    let _ = ex.respond_json(200, "{\"status\":\"ok\"}\n");
                    200
                }
                Err(e) => {
                    let body =
                        serde_json::json!({"status": "unhealthy", "error": e}).to_string() + "\n";
                    let _ = ex.respond_json(503, &body);
                    503
                }
            },
            // While draining the intake answers 503 before this is reached.
            Public::Readyz => {
                let _ = ex.respond_json(200, "{\"status\":\"ready\"}\n");
                200
            }
            Public::Metrics => {
                if let Some(token) = &self.metrics_token {
                    let presented = ex
                        .head
                        .header("authorization")
                        .filter(|_| ex.head.header_count("authorization") == 1)
                        .and_then(|v| crate::auth::authorization_key(v).ok());
                    let ok = presented.is_some_and(|p| {
                        crate::config::sha256(p.as_bytes())
                            .ct_eq(&crate::config::sha256(token.as_bytes()))
                            .into()
                    });
                    if !ok {
                        self.metrics.rejected("", "unauthorized");
                        unauthorized(ex);
                        return 401;
                    }
                }
                let text = self.metrics.render();
                let _ = ex.respond(
                    200,
                    &[("Content-Type", b"text/plain; version=0.0.4; charset=utf-8")],
                    text.as_bytes(),
                );
                200
            }
        }
    }
}

fn unauthorized(ex: &mut Exchange<'_>) {
    let _ = ex.respond(
        401,
        &[("Content-Type", b"application/json"), ("WWW-Authenticate", b"Bearer realm=\"butler\"")],
        b"{\"error\":\"unauthorized\"}\n",
    );
}

impl Service for App {
    fn handle(&self, ex: &mut Exchange<'_>) {
        let start = ex.started;
        let id = self
            .ids
            .for_request(ex.head.header("x-request-id"), ex.head.header_count("x-request-id"));
        ex.add_header("X-Request-Id", id.clone());
        let path = ex.head.target.path.clone();
        let route = routes::template(&path);

        if let Some(public) = routes::public(&path) {
            let status = self.public(ex, public);
            self.metrics.request("", route, status, start.elapsed());
            return;
        }

        let remote = ex.peer().ip().to_string();
        let method = ex.head.method.clone();
        let identity = match self.keys.authenticate(&ex.head) {
            Ok(identity) => identity,
            Err(failure) => {
                log::warn!(
                    request_id = id.as_str(), method = method.as_str(), path = path.as_str(),
                    remote = remote.as_str(), status = 401u16, reason = "unauthorized",
                    detail = failure.as_str();
                    "unauthorized request"
                );
                self.metrics.rejected("", "unauthorized");
                unauthorized(ex);
                self.metrics.request("", route, 401, start.elapsed());
                return;
            }
        };
        let client = identity.client.as_str();
        let _in_flight = self.metrics.in_flight();
        log::info!(
            request_id = id.as_str(), client = client, method = method.as_str(),
            path = path.as_str(), remote = remote.as_str();
            "request"
        );

        let outcome = self
            .proxy
            .forward(ex, &Forwarding { request_id: &id, forwarded_for: &remote, proto: "http" });

        let duration = start.elapsed();
        let ttfb_ms = ex.first_byte.map_or(0, |t| t.duration_since(start).as_millis() as u64);
        let mut fields: Vec<(&str, Value)> = vec![
            ("request_id", Value::from(id.as_str())),
            ("client", Value::from(client)),
            ("method", Value::from(method.as_str())),
            ("path", Value::from(path.as_str())),
            ("remote", Value::from(remote.as_str())),
            ("status", Value::from(outcome.status)),
            ("duration_ms", Value::from(duration.as_millis() as u64)),
            ("ttfb_ms", Value::from(ttfb_ms)),
            ("bytes", Value::from(ex.bytes_sent)),
        ];
        if let Some(error) = outcome.error {
            fields.push(("error", Value::from(error)));
        }
        logging::emit(Level::Info, "response", &fields);
        self.metrics.request(client, route, outcome.status, duration);
        if let Some(t) = outcome.upstream_first_byte {
            self.metrics.upstream_first_byte(t);
        }
    }

    fn refused(&self, peer: SocketAddr, status: u16, reason: &str) {
        log::warn!(remote = peer.ip().to_string().as_str(), status = status, reason = reason; "request refused");
        match status {
            400 => self.metrics.rejected("", "bad_request"),
            431 => self.metrics.rejected("", "too_large"),
            _ => {}
        }
    }
}

/// Request ids: the client's own if it is 1–128 of `[A-Za-z0-9._-]`, else a
/// fresh 16-hex-digit one (a random seed mixed with a counter).
struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> std::io::Result<RequestIds> {
        let mut seed = [0u8; 8];
        crate::auth::keys::random_bytes(&mut seed)?;
        Ok(RequestIds { seed: u64::from_le_bytes(seed), counter: AtomicU64::new(0) })
    }

    fn for_request(&self, given: Option<&str>, count: usize) -> String {
        match given {
            Some(id) if count == 1 && valid_request_id(id) => id.to_owned(),
            _ => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                format!("{:016x}", splitmix64(self.seed.wrapping_add(n)))
            }
        }
    }
}

fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let ids = RequestIds { seed: 7, counter: AtomicU64::new(0) };
        assert_eq!(ids.for_request(Some("abc-1.2_3"), 1), "abc-1.2_3");
        let fresh = ids.for_request(Some("bad id"), 1);
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, ids.for_request(None, 0));
        assert_ne!(ids.for_request(Some("ok"), 2), "ok");
        assert!(!valid_request_id(&"a".repeat(129)));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a\r\nx"));
    }
}
