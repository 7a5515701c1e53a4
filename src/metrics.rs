//! Prometheus metrics (SPEC §10), hand-rolled in the text exposition format
//! 0.0.4. Every labelled family holds at most [`MAX_SERIES`] label sets not
//! counting those with an `other` value; beyond that new values collapse into
//! `other`, so a client cannot grow memory or scrape size by inventing names.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Most label sets per metric family.
pub const MAX_SERIES: usize = 1000;

/// Butler's request-duration buckets, plus the long tail of model loads.
const BUCKETS: [f64; 13] =
    [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (bound, c) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if secs <= *bound {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

#[derive(Default)]
struct Families {
    /// (client, model, path, status)
    requests: HashMap<(String, String, &'static str, u16), u64>,
    /// (client, reason)
    rejected: HashMap<(String, &'static str), u64>,
    /// path
    duration: HashMap<&'static str, Histogram>,
    /// (client, model, kind)
    tokens: HashMap<(String, String, &'static str), u64>,
    first_byte: Histogram,
    /// What bounds `requests` and `tokens`.
    requests_bound: Bound,
    tokens_bound: Bound,
}

/// The label value sets fold into.
const OTHER: &str = "other";

/// The bound of a family labelled by client and model (SPEC §10): at most
/// [`MAX_SERIES`] sets whose model is not `other`; a new set beyond that
/// keeps its client (and its other labels) with `model="other"`, and takes
/// `client="other"` too once [`MAX_SERIES`] clients have sets. Sets with
/// `model="other"` are then at most clients × the few values of the other
/// labels (route templates, statuses, kinds).
#[derive(Default)]
struct Bound {
    /// Sets whose model is not `other`.
    counted: usize,
    /// Clients with at least one set (`other` aside).
    clients: HashSet<String>,
}

impl Bound {
    /// The (client, model) labels to record under; `exists` tells whether a
    /// set with these labels (and the family's other labels) is present.
    fn labels(
        &mut self,
        client: &str,
        model: &str,
        exists: impl Fn(&str, &str) -> bool,
    ) -> (String, String) {
        if exists(client, model) {
            return (client.to_owned(), model.to_owned());
        }
        if model == OTHER || self.counted < MAX_SERIES {
            self.counted += usize::from(model != OTHER);
            self.note(client);
            return (client.to_owned(), model.to_owned());
        }
        let client = if self.clients.contains(client) || self.clients.len() < MAX_SERIES {
            client
        } else {
            OTHER
        };
        self.note(client);
        (client.to_owned(), OTHER.to_owned())
    }

    fn note(&mut self, client: &str) {
        if client != OTHER && !self.clients.contains(client) {
            self.clients.insert(client.to_owned());
        }
    }
}

pub struct Metrics {
    families: Mutex<Families>,
    in_flight: AtomicI64,
    /// Config reloads: [success, failure].
    reloads: [AtomicU64; 2],
}

/// Keeps `client` as a label value unless the family is full and it is new.
fn bounded<K: Eq + std::hash::Hash, V>(
    map: &HashMap<K, V>,
    key: K,
    fallback: impl FnOnce() -> K,
) -> K {
    if map.len() < MAX_SERIES || map.contains_key(&key) { key } else { fallback() }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            families: Mutex::new(Families::default()),
            in_flight: AtomicI64::new(0),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Families> {
        self.families.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request that butler answered or forwarded. `model` is the
    /// normalised model name, or empty when the request names none.
    pub fn request(
        &self,
        client: &str,
        model: &str,
        path: &'static str,
        status: u16,
        took: Duration,
    ) {
        let f = &mut *self.lock();
        // A full family first loses the model, then the client (SPEC §10).
        let requests = &f.requests;
        let (client, model) = f.requests_bound.labels(client, model, |c, m| {
            requests.contains_key(&(c.to_owned(), m.to_owned(), path, status))
        });
        *f.requests.entry((client, model, path, status)).or_insert(0) += 1;
        f.duration.entry(path).or_default().observe(took.as_secs_f64());
    }

    /// Counts a refused request; `reason` is one of SPEC §10's reasons.
    pub fn rejected(&self, client: &str, reason: &'static str) {
        let mut f = self.lock();
        let key =
            bounded(&f.rejected, (client.to_owned(), reason), || ("other".to_owned(), reason));
        *f.rejected.entry(key).or_insert(0) += 1;
    }

    /// Adds the tokens of one response (`butler_tokens_total`).
    pub fn tokens(&self, client: &str, model: &str, prompt: u64, completion: u64) {
        let f = &mut *self.lock();
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let tokens = &f.tokens;
            let (client, model) = f.tokens_bound.labels(client, model, |c, m| {
                tokens.contains_key(&(c.to_owned(), m.to_owned(), kind))
            });
            *f.tokens.entry((client, model, kind)).or_insert(0) += n;
        }
    }

    /// Counts a configuration reload by its result.
    pub fn reloaded(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_first_byte(&self, took: Duration) {
        self.lock().first_byte.observe(took.as_secs_f64());
    }

    /// Marks a request in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let f = self.lock();
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "butler_requests_total",
            "counter",
            "Requests answered, by client, route and status.",
        );
        let mut rows: Vec<_> = f.requests.iter().collect();
        rows.sort();
        for ((client, model, path, status), n) in rows {
            let _ = writeln!(
                out,
                "butler_requests_total{{client=\"{}\",model=\"{}\",path=\"{}\",status=\"{status}\"}} {n}",
                escape(client),
                escape(model),
                escape(path)
            );
        }
        header(
            &mut out,
            "butler_requests_rejected_total",
            "counter",
            "Requests refused by butler, by client and reason.",
        );
        let mut rows: Vec<_> = f.rejected.iter().collect();
        rows.sort();
        for ((client, reason), n) in rows {
            let _ = writeln!(
                out,
                "butler_requests_rejected_total{{client=\"{}\",reason=\"{}\"}} {n}",
                escape(client),
                escape(reason)
            );
        }
        header(
            &mut out,
            "butler_request_duration_seconds",
            "histogram",
            "Time from request head to end of response.",
        );
        let mut rows: Vec<_> = f.duration.iter().collect();
        rows.sort_by_key(|(p, _)| **p);
        for (path, h) in rows {
            histogram(
                &mut out,
                "butler_request_duration_seconds",
                &format!("path=\"{}\"", escape(path)),
                h,
            );
        }
        header(
            &mut out,
            "butler_upstream_first_byte_seconds",
            "histogram",
            "Time until the upstream's response head.",
        );
        histogram(&mut out, "butler_upstream_first_byte_seconds", "", &f.first_byte);
        header(&mut out, "butler_in_flight_requests", "gauge", "Requests being served.");
        let _ =
            writeln!(out, "butler_in_flight_requests {}", self.in_flight.load(Ordering::Relaxed));
        header(
            &mut out,
            "butler_tokens_total",
            "counter",
            "Tokens Ollama reported, by client, model and kind (prompt or completion).",
        );
        let mut rows: Vec<_> = f.tokens.iter().collect();
        rows.sort();
        for ((client, model, kind), n) in rows {
            let _ = writeln!(
                out,
                "butler_tokens_total{{client=\"{}\",model=\"{}\",kind=\"{kind}\"}} {n}",
                escape(client),
                escape(model)
            );
        }
        header(&mut out, "butler_config_reloads_total", "counter", "Configuration reloads.");
        for (result, n) in ["success", "failure"].iter().zip(&self.reloads) {
            let _ = writeln!(
                out,
                "butler_config_reloads_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        header(&mut out, "butler_build_info", "gauge", "Build information.");
        let _ = writeln!(
            out,
            "butler_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );
        out
    }
}

pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, c) in BUCKETS.iter().zip(h.counts.iter()) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd\te"), "a\\\"b\\\\c\\nd\te");
    }

    #[test]
    fn renders_families_and_bounds_series() {
        let m = Metrics::new();
        m.request("we\"ird", "llama3.2:latest", "/api/chat", 200, Duration::from_millis(20));
        m.rejected("", "unauthorized");
        for i in 0..MAX_SERIES + 50 {
            m.rejected(&format!("c{i}"), "unauthorized");
        }
        let text = m.render();
        assert!(text.contains(
            "butler_requests_total{client=\"we\\\"ird\",model=\"llama3.2:latest\",path=\"/api/chat\",status=\"200\"} 1"
        ));
        assert!(
            text.contains(
                "butler_request_duration_seconds_bucket{path=\"/api/chat\",le=\"0.05\"} 1"
            )
        );
        assert!(
            text.contains(
                "butler_request_duration_seconds_bucket{path=\"/api/chat\",le=\"0.01\"} 0"
            )
        );
        assert!(text.contains("butler_build_info{version="));
        let rejected =
            text.lines().filter(|l| l.starts_with("butler_requests_rejected_total{")).count();
        assert_eq!(rejected, MAX_SERIES + 1, "full family gains only the 'other' series");
        assert!(
            text.contains(
                "butler_requests_rejected_total{client=\"other\",reason=\"unauthorized\"} "
            )
        );
    }

    fn request_sets(text: &str) -> Vec<&str> {
        text.lines().filter(|l| l.starts_with("butler_requests_total{")).collect()
    }

    #[test]
    fn a_full_family_folds_the_model_and_keeps_the_client() {
        let m = Metrics::new();
        let ms = Duration::from_millis(1);
        for i in 0..MAX_SERIES + 100 {
            m.request("a", &format!("m{i}"), "/api/chat", 200, ms);
        }
        // A second client after the family is full keeps its name.
        m.request("b", "m0", "/api/chat", 200, ms);
        m.request("b", "m0", "/api/chat", 500, ms);
        let text = m.render();
        let sets = request_sets(&text);
        assert_eq!(sets.len(), MAX_SERIES + 3, "1000 counted sets, then `other` ones");
        assert!(sets.contains(
            &"butler_requests_total{client=\"a\",model=\"other\",path=\"/api/chat\",status=\"200\"} 100"
        ));
        assert!(sets.contains(
            &"butler_requests_total{client=\"b\",model=\"other\",path=\"/api/chat\",status=\"200\"} 1"
        ));
        assert!(sets.contains(
            &"butler_requests_total{client=\"b\",model=\"other\",path=\"/api/chat\",status=\"500\"} 1"
        ));
        assert!(!text.contains("client=\"other\""), "no client folded yet");
        // Sets already present keep counting under their own labels.
        m.request("a", "m5", "/api/chat", 200, ms);
        assert!(m.render().contains(
            "butler_requests_total{client=\"a\",model=\"m5\",path=\"/api/chat\",status=\"200\"} 2"
        ));
    }

    #[test]
    fn clients_fold_only_once_a_thousand_have_sets() {
        let m = Metrics::new();
        let ms = Duration::from_millis(1);
        for i in 0..MAX_SERIES {
            m.request(&format!("c{i}"), "m", "/api/chat", 200, ms);
        }
        // Known clients keep their name; a new one beyond 1000 clients is `other`.
        m.request("c7", "n", "/api/chat", 200, ms);
        m.request("new", "n", "/api/chat", 200, ms);
        m.tokens("new", "n", 1, 2);
        let text = m.render();
        assert!(text.contains(
            "butler_requests_total{client=\"c7\",model=\"other\",path=\"/api/chat\",status=\"200\"} 1"
        ));
        assert!(text.contains(
            "butler_requests_total{client=\"other\",model=\"other\",path=\"/api/chat\",status=\"200\"} 1"
        ));
        assert_eq!(request_sets(&text).len(), MAX_SERIES + 2);
        // The token family has its own bound: nothing is full there.
        assert!(text.contains("butler_tokens_total{client=\"new\",model=\"n\",kind=\"prompt\"} 1"));
    }
}
