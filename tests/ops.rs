//! Operations: metrics (SPEC §10), logs (§10), the command line and configuration (§3, §4),
//! and graceful shutdown (§11).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::setup::{KEY, KEY2, WAIT, assert_error, bearer, start};
use support::{
    Behavior, Butler, Event, FakeOllama, RawConn, StreamEnd, StreamingResponse, TempDir, get,
    request, run_cli, run_cli_in, try_request,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// A strict checker for the Prometheus text exposition format 0.0.4
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN` (nothing Rust would also accept, such as
/// `inf` or `infinity`).
fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) {
        return Err(format!("bad value {s:?}"));
    }
    s.parse::<f64>().map_err(|e| format!("bad value {s:?}: {e}"))
}

/// Parses `name{l="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut end = None;
        if after.starts_with('}') {
            end = Some(1);
        }
        while end.is_none() {
            // Label name up to '='.
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            let eq = after[start..].find('=').ok_or("label without '='")? + start;
            let lname = &after[start..eq];
            if !is_label_name(lname) {
                return Err(format!("bad label name {lname:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {lname} value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")? {
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("invalid escape \\{c}")),
                    },
                    (_, '"') => break,
                    (_, c) if c.is_control() => {
                        return Err(format!("raw control character {c:?} in a label value"));
                    }
                    (_, c) => value.push(c),
                }
            }
            if labels.iter().any(|(k, _): &(String, String)| k == lname) {
                return Err(format!("label {lname} repeated"));
            }
            labels.push((lname.to_string(), value));
            match chars.next().ok_or("unterminated labels")? {
                (_, ',') => {}
                (i, '}') => end = Some(i + 1),
                (_, c) => return Err(format!("unexpected {c:?} after a label")),
            }
        }
        rest = &after[end.unwrap()..];
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut parts = rest.split(' ');
    let value = parse_value(parts.next().ok_or("no value")?)?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// Validates a whole exposition strictly and returns its samples. Panics naming the offending
/// line: every sample must belong to the family of the `TYPE` line before it (families are
/// contiguous and typed once), HELP/TYPE lines must be well formed, label values may only use
/// the escapes `\\`, `\"` and `\n`, no series may repeat, counters are non-negative, and each
/// histogram series has cumulative buckets ending in `+Inf` equal to its `_count`, plus `_sum`.
fn validate_exposition(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut current: Option<(String, String)> = None;
    let mut seen_series: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", n + 1) };
        if line.is_empty() {
            fail("empty line");
        }
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, doc) = help.split_once(' ').unwrap_or((help, ""));
            if !is_metric_name(name) {
                fail("bad name in HELP");
            }
            if !helped.insert(name.to_string()) {
                fail("second HELP for a family");
            }
            let mut chars = doc.chars();
            while let Some(c) = chars.next() {
                if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                    fail("invalid escape in HELP");
                }
            }
            continue;
        }
        if let Some(ty) = line.strip_prefix("# TYPE ") {
            let (name, kind) = ty.split_once(' ').unwrap_or_else(|| fail("TYPE without a type"));
            if !is_metric_name(name) {
                fail("bad name in TYPE");
            }
            if !matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped") {
                fail("unknown type");
            }
            if typed.insert(name.to_string(), kind.to_string()).is_some() {
                fail("second TYPE for a family (families must be contiguous)");
            }
            if samples.iter().any(|s: &Sample| s.name.starts_with(name)) {
                fail("TYPE after samples of its family");
            }
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|e| fail(&e));
        let Some((family, kind)) = &current else { fail("sample before any TYPE") };
        let suffix = sample.name.strip_prefix(family.as_str());
        match kind.as_str() {
            "histogram" => match suffix {
                Some("_bucket") => {
                    if sample.label("le").is_none() {
                        fail("bucket without le");
                    }
                }
                Some("_sum" | "_count") => {}
                _ => fail("sample outside its histogram family"),
            },
            _ if suffix != Some("") => fail("sample name differs from its family"),
            "counter" if sample.value.is_nan() || sample.value < 0.0 => fail("negative counter"),
            _ => {}
        }
        let mut key_labels = sample.labels.clone();
        key_labels.sort();
        if !seen_series.insert(format!("{}{key_labels:?}", sample.name)) {
            fail("series repeated");
        }
        samples.push(sample);
    }
    // Histogram consistency.
    for (family, kind) in &typed {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == format!("{family}_bucket")) {
            let rest: Vec<_> = s.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            let le = parse_value(s.label("le").unwrap()).expect("le is a number");
            series.entry(format!("{rest:?}")).or_default().push((le, s.value));
        }
        for (labels, buckets) in &series {
            assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0), "{family}{labels}: le order");
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}{labels}: cumulative");
            let last = buckets.last().unwrap();
            assert_eq!(last.0, f64::INFINITY, "{family}{labels}: no +Inf bucket");
            let with = |suffix: &str| {
                samples
                    .iter()
                    .find(|s| {
                        s.name == format!("{family}{suffix}") && {
                            let rest: Vec<_> = s.labels.clone();
                            format!("{rest:?}") == *labels
                        }
                    })
                    .unwrap_or_else(|| panic!("{family}{labels}: no {suffix}"))
                    .value
            };
            assert_eq!(with("_count"), last.1, "{family}{labels}: +Inf bucket != _count");
            assert!(with("_sum") >= 0.0);
        }
    }
    samples
}

#[test]
fn the_validator_rejects_malformed_expositions() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 1\n";
    assert_eq!(validate_exposition(good)[0].label("x"), Some("q\"\\\n"));
    let bad = [
        "# TYPE a counter\na{x=\"tab\there\"} 1\n",
        "# TYPE a counter\na{x=\"bad\\t\"} 1\n",
        "# TYPE a counter\na{x=\"unterminated} 1\n",
        "# TYPE a counter\na{x=\"1\",x=\"2\"} 1\n",
        "# TYPE a counter\na 1\na 2\n",
        "# TYPE a counter\nb 1\n",
        "a 1\n",
        "# TYPE a counter\na one\n",
        "# TYPE a counter\na{x=\"v\"}1\n",
        "# TYPE a gauge\na 1\n# TYPE a gauge\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n",
    ];
    for text in bad {
        let result = std::panic::catch_unwind(|| validate_exposition(text));
        assert!(result.is_err(), "accepted: {text:?}");
    }
}

fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.label(k) == Some(*v))
        })
        .map(|s| s.value)
}

#[test]
fn metrics_are_valid_prometheus_text_and_count_exactly() {
    let fake = FakeOllama::start();
    // A third client whose name needs every label escape: quote, backslash, newline.
    let weird_key = "sk-test-weird-0f1e2d3c";
    let yaml = support::setup::config(&fake.url(), "").replace(
        "clients:\n",
        &format!("clients:\n  - name: \"we\\\"ird\\\\name\\nx\"\n    key: \"{weird_key}\"\n"),
    );
    let butler = Butler::start(&yaml);
    let auth = bearer();
    // One keep-alive connection: butler counts a request after answering it, but before it
    // reads the next request on the same connection, so the scrape sees every earlier one.
    let mut conn = RawConn::connect(butler.addr());
    let mut get = |path: &str, headers: &[(&str, &str)]| conn.roundtrip("GET", path, headers, b"");
    for _ in 0..3 {
        assert_eq!(get("/api/tags", &[("Authorization", &auth)]).status, 200);
    }
    assert_eq!(get("/api/tags", &[("x-api-key", KEY2)]).status, 200);
    assert_eq!(get("/api/tags", &[]).status, 401);
    assert_eq!(get("/api/tags", &[("Authorization", "Bearer nope")]).status, 401);
    for odd in ["/api/x%09y%22z", "/%22", "/api/a%5Cb%0Ac"] {
        let r = get(odd, &[("Authorization", &auth)]);
        assert_eq!(r.status, 404, "{odd}");
    }
    assert_eq!(get("/api/tags", &[("x-api-key", weird_key)]).status, 200);
    assert_eq!(fake.request_count(), 8);

    let scrape = get("/metrics", &[]);
    assert_eq!(scrape.status, 200);
    let text = scrape.body_str();
    let samples = validate_exposition(&text);
    let count = |name, labels: &[(&str, &str)]| metric(&samples, name, labels);

    let requests = "butler_requests_total";
    assert_eq!(
        count(
            requests,
            &[("client", "c1"), ("model", ""), ("path", "/api/tags"), ("status", "200")]
        ),
        Some(3.0)
    );
    assert_eq!(
        count(
            requests,
            &[("client", "c2"), ("model", ""), ("path", "/api/tags"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        count(requests, &[("client", "c1"), ("model", ""), ("path", "other"), ("status", "404")]),
        Some(3.0)
    );
    assert_eq!(
        count("butler_requests_rejected_total", &[("client", ""), ("reason", "unauthorized")]),
        Some(2.0)
    );
    assert_eq!(count("butler_build_info", &[("version", VERSION)]), Some(1.0));
    assert_eq!(count("butler_in_flight_requests", &[]), Some(0.0));
    // The client name round-trips through the escapes.
    let weird = "we\"ird\\name\nx";
    assert_eq!(
        count(
            requests,
            &[("client", weird), ("model", ""), ("path", "/api/tags"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert!(text.contains(r#"client="we\"ird\\name\nx""#), "{text}");
    // The odd paths were never used as label values.
    for s in &samples {
        for (_, v) in s.labels.iter().filter(|(_, v)| v != weird) {
            assert!(!v.contains(['\t', '"', '\\', '\n', '%']), "a raw path in a label: {s:?}");
        }
    }
    let paths: HashSet<&str> = samples.iter().filter_map(|s| s.label("path")).collect();
    assert!(paths.iter().all(|p| *p == "other" || p.starts_with('/')), "{paths:?}");
    for family in [
        "butler_requests_total",
        "butler_requests_rejected_total",
        "butler_request_duration_seconds",
        "butler_in_flight_requests",
        "butler_build_info",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing\n{text}");
    }
    assert!(text.contains("# TYPE butler_request_duration_seconds histogram\n"));

    // Scrapes are not traffic: the first one is not counted (SPEC §10).
    let again = validate_exposition(&get("/metrics", &[]).body_str());
    assert!(again.iter().all(|s| s.label("path") != Some("/metrics")), "{again:?}");
    assert_eq!(
        metric(
            &again,
            requests,
            &[("client", "c1"), ("model", ""), ("path", "/api/tags"), ("status", "200")]
        ),
        Some(3.0)
    );
}

/// SPEC §10: health probes and scrapes are not counted in `butler_requests_total` or the
/// duration histogram, whatever their answer.
#[test]
fn probes_and_scrapes_are_not_counted() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "metrics: { token: \"metrics-token-0123456789\" }\n");
    let scrape = [("Authorization", "Bearer metrics-token-0123456789")];
    for _ in 0..3 {
        assert_eq!(get(butler.addr(), "/healthz", &[]).status, 200);
        assert_eq!(get(butler.addr(), "/readyz", &[]).status, 200);
        assert_eq!(get(butler.addr(), "/metrics", &scrape).status, 200);
        assert_eq!(get(butler.addr(), "/metrics", &[]).status, 401);
        assert_eq!(request(butler.addr(), "POST", "/healthz", &[], b"").status, 405);
    }
    // On one keep-alive connection, so the scrape sees the request counted (it is counted after
    // its answer, before the next request on the same connection is read).
    let mut conn = RawConn::connect(butler.addr());
    let tags = conn.roundtrip("GET", "/api/tags", &[("Authorization", &bearer())], b"");
    assert_eq!(tags.status, 200);
    let text = conn.roundtrip("GET", "/metrics", &scrape, b"").body_str();
    let samples = validate_exposition(&text);
    for public in ["/healthz", "/readyz", "/metrics"] {
        let counted: Vec<&Sample> =
            samples.iter().filter(|s| s.label("path") == Some(public)).collect();
        assert!(counted.is_empty(), "{public} is counted: {counted:?}");
    }
    assert_eq!(
        metric(
            &samples,
            "butler_requests_total",
            &[("client", "c1"), ("model", ""), ("path", "/api/tags"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&samples, "butler_request_duration_seconds_count", &[("path", "/api/tags")]),
        Some(1.0)
    );
    // The refused scrapes are rejections all the same.
    assert_eq!(
        metric(
            &samples,
            "butler_requests_rejected_total",
            &[("client", ""), ("reason", "unauthorized")]
        ),
        Some(3.0)
    );
}

/// SPEC §10: the metrics token is a Bearer token only — not a Basic password, not x-api-key;
/// a refused token is counted as `unauthorized`.
#[test]
fn the_metrics_token_is_bearer_only() {
    let fake = FakeOllama::start();
    let token = "metrics-token-0123456789";
    let butler = start(&fake, &format!("metrics: {{ token: \"{token}\" }}\n"));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("prometheus:{token}"));
    let refused: [(&str, String); 5] = [
        ("Authorization", format!("Basic {basic}")),
        ("x-api-key", token.to_owned()),
        ("Authorization", format!("Token {token}")),
        ("Authorization", "Bearer wrong-metrics-token-000".to_owned()),
        ("Authorization", token.to_owned()),
    ];
    for (name, value) in &refused {
        let r = get(butler.addr(), "/metrics", &[(name, value)]);
        assert_error(&r, 401, "unauthorized");
        assert!(!r.body_str().contains("butler_"), "{name}: {value}");
    }
    let ok = get(butler.addr(), "/metrics", &[("Authorization", &format!("bearer {token}"))]);
    assert_eq!(ok.status, 200);
    let samples = validate_exposition(&ok.body_str());
    assert_eq!(
        metric(
            &samples,
            "butler_requests_rejected_total",
            &[("client", ""), ("reason", "unauthorized")]
        ),
        Some(5.0)
    );
}

/// SPEC §10: a family keeps at most 1000 label sets without an `other` value; beyond that a new
/// set keeps its client (and path and status) with `model="other"`, and the client folds into
/// `other` only once 1000 clients have sets.
#[test]
fn the_label_bound_folds_models_before_clients() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    // One keep-alive connection: butler counts a request after answering it, but before it
    // reads the next request on the same connection, so the scrape sees every earlier one.
    let mut conn = RawConn::connect(butler.addr());
    let mut show = |key: &str, model: &str| {
        let body = format!("{{\"model\":\"{model}\"}}");
        let auth = format!("Bearer {key}");
        let r = conn.roundtrip("POST", "/api/show", &[("Authorization", &auth)], body.as_bytes());
        assert_eq!(r.status, 200, "{model}: {}", r.body_str());
    };
    for i in 0..1100 {
        show(KEY, &format!("m{i}"));
    }
    show(KEY2, "m0");
    show(KEY2, "llama3.2");
    let text = conn.roundtrip("GET", "/metrics", &[], b"").body_str();
    let samples = validate_exposition(&text);
    let sets: Vec<&Sample> = samples.iter().filter(|s| s.name == "butler_requests_total").collect();
    let counted = sets.iter().filter(|s| s.label("model") != Some("other")).count();
    assert_eq!(counted, 1000, "label sets without an `other` value");
    assert_eq!(sets.len(), 1002, "{sets:?}");
    let show_count = |client: &str, model: &str| {
        metric(
            &samples,
            "butler_requests_total",
            &[("client", client), ("model", model), ("path", "/api/show"), ("status", "200")],
        )
    };
    assert_eq!(show_count("c1", "m0:latest"), Some(1.0));
    assert_eq!(show_count("c1", "other"), Some(100.0));
    // The second client keeps its name: far fewer than 1000 clients have sets.
    assert_eq!(show_count("c2", "other"), Some(2.0));
    assert!(sets.iter().all(|s| s.label("client") != Some("other")), "{sets:?}");
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[test]
fn proxied_requests_get_request_and_response_log_lines() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let response = get(
        butler.addr(),
        "/api/tags?x=1",
        &[("Authorization", &bearer()), ("X-Request-Id", "log-1")],
    );
    assert_eq!(response.status, 200);
    let is = |msg: &'static str| move |v: &Value| v["msg"] == msg && v["request_id"] == "log-1";
    let req = butler.wait_log(is("request"), WAIT).expect("request line");
    let resp = butler.wait_log(is("response"), WAIT).expect("response line");
    for line in [&req, &resp] {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["client"], "c1");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/api/tags");
        assert_eq!(line["remote"], "127.0.0.1");
        let time = line["time"].as_str().expect("time");
        assert!(time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    }
    assert_eq!(resp["status"], 200);
    assert_eq!(resp["bytes"], response.body.len() as u64);
    let duration = resp["duration_ms"].as_u64().expect("duration_ms");
    let ttfb = resp["ttfb_ms"].as_u64().expect("ttfb_ms");
    assert!(ttfb <= duration, "{resp}");
    assert!(duration < 5000, "{resp}");
}

#[test]
fn rejections_are_logged_at_warn_and_odd_paths_stay_escaped() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let refused = get(butler.addr(), "/api/x%09y%22z%0Aw", &[("X-Request-Id", "warn-1")]);
    assert_eq!(refused.status, 401);
    let warn = butler
        .wait_log(|v| v["request_id"] == "warn-1", WAIT)
        .unwrap_or_else(|| panic!("no log for the 401\n{}", butler.output()));
    assert_eq!(warn["level"], "WARN");
    assert_eq!(warn["reason"], "unauthorized");
    assert_eq!(warn["status"], 401);
    assert_eq!(warn["path"], "/api/x\ty\"z\nw");
    assert_eq!(warn["remote"], "127.0.0.1");
    // Every line is one JSON object: the newline in the path did not split a line.
    let raw = butler.stdout_lines();
    assert!(
        raw.iter().all(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v.is_object())),
        "{raw:?}"
    );
}

#[test]
fn keys_never_appear_in_the_output() {
    let fake = FakeOllama::start();
    let butler = start(&fake, "");
    let wrong = "sk-wrong-but-secret-31337";
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{KEY2}"));
    let attempts: Vec<(String, Vec<(&str, String)>)> = vec![
        ("/api/tags".into(), vec![("Authorization", bearer())]),
        ("/api/tags".into(), vec![("x-api-key", KEY2.into())]),
        ("/api/tags".into(), vec![("Authorization", format!("Basic {basic}"))]),
        ("/api/tags".into(), vec![("Authorization", format!("Bearer {wrong}"))]),
        ("/api/tags".into(), vec![("x-api-key", wrong.into())]),
        (format!("/api/tags?key={KEY}"), vec![]),
        ("/metrics".into(), vec![("Authorization", format!("Bearer {wrong}"))]),
    ];
    for (path, headers) in &attempts {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        get(butler.addr(), path, &headers);
    }
    let last =
        get(butler.addr(), "/api/tags", &[("Authorization", &bearer()), ("X-Request-Id", "end")]);
    assert_eq!(last.status, 200);
    butler
        .wait_log(|v| v["msg"] == "response" && v["request_id"] == "end", WAIT)
        .expect("last response line");
    let output = butler.output();
    for secret in [KEY, KEY2, wrong, basic.as_str()] {
        assert!(!output.contains(secret), "{secret} leaked into the output:\n{output}");
    }
}

// ---------------------------------------------------------------------------------------------
// Command line and configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn check_accepts_a_valid_config_and_summarises_it() {
    let dir = TempDir::new();
    let path = dir.write(
        "ok.yaml",
        &format!(
            "listen: \"127.0.0.1:8181\"\nupstream: \"http://127.0.0.1:11434/ollama\"\n\
             clients:\n  - {{name: a, key: sk-check-key-a-0123456789}}\n  \
             - {{name: b, key_sha256: \"{}\"}}\n",
            sha256_hex(b"k2")
        ),
    );
    let (code, stdout, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("127.0.0.1:8181"), "{stdout}");
    assert!(stdout.contains("http://127.0.0.1:11434/ollama"), "{stdout}");
    assert!(stdout.contains("api_key"), "{stdout}");
    let clients = stdout.lines().find(|l| l.trim_start().starts_with("clients")).expect("clients");
    assert_eq!(clients.split_whitespace().last(), Some("2"), "{stdout}");
    // check is offline: nothing listens on 11434 here, and that is fine.
    // `-c` and `-config` work too, and so does $BUTLER_CONFIG.
    for flag in ["-c", "-config"] {
        let (code, _, stderr) = run_cli(&["check", flag, path.to_str().unwrap()], &[], None);
        assert_eq!(code, 0, "{flag}: {stderr}");
    }
    let (code, _, stderr) = run_cli(&["check"], &[("BUTLER_CONFIG", path.to_str().unwrap())], None);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_names_an_unknown_field_with_its_path() {
    let dir = TempDir::new();
    let path = dir.write(
        "bad.yaml",
        "upstream: \"http://127.0.0.1:11434\"\nclients:\n  - {name: a, key: sk-check-key-a-0123456789, deny_model: x}\n",
    );
    let (code, stdout, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("clients[0]: unknown field \"deny_model\""), "{stderr}");
}

#[test]
fn check_reports_every_error_at_once() {
    let dir = TempDir::new();
    let path = dir.write(
        "bad.yaml",
        "upstream: \"ftp://x\"\nbogus: 1\nworkers: 0\ntimeouts: {idle: 5 minutes}\n\
         clients:\n  - {name: a, key: \"${NOPE}\"}\n  - {name: b, key: sk-check-key-b-0123456789, deny_model: x}\n",
    );
    let (code, _, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "{stderr}");
    for needle in [
        "upstream: ",
        "unknown field \"bogus\"",
        "workers: ",
        "timeouts.idle: ",
        "clients[0].key: environment variable \"NOPE\" is not set",
        "clients[1]: unknown field \"deny_model\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

/// SPEC §4: a plaintext key shorter than 20 characters can be guessed online; `butler check`
/// refuses it without echoing it, and butler does not start with it.
#[test]
fn check_refuses_a_short_plaintext_key() {
    let dir = TempDir::new();
    let path = dir.write(
        "short.yaml",
        "upstream: \"http://127.0.0.1:11434\"\nclients:\n  - {name: a, key: \"sk-19-characters-xx\"}\n",
    );
    let (code, stdout, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains(
            "clients[0].key: must be at least 20 characters (generate one with `butler gen-key`)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("sk-19-characters-xx"), "the key was echoed: {stderr}");
    let (code, _, stderr) = run_cli(&["--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "{stderr}");
    // Twenty characters are enough.
    let path = dir.write(
        "ok.yaml",
        "upstream: \"http://127.0.0.1:11434\"\nclients:\n  - {name: a, key: \"sk-20-characters-xyz\"}\n",
    );
    let (code, _, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 0, "{stderr}");
}

/// SPEC §4: an error about two entries names the later one and the earlier one, and an entry
/// with an invalid field still takes part in the cross-checks, so every error shows at once.
#[test]
fn check_names_both_entries_of_a_duplicate() {
    let dir = TempDir::new();
    let key = "sk-the-same-key-in-two-entries";
    let path = dir.write(
        "dups.yaml",
        &format!(
            "upstream: \"http://127.0.0.1:11434\"\nauth: {{mode: either}}\nclients:\n  \
             - {{name: a, key: \"{key}\"}}\n  \
             - {{name: a, key: \"sk-another-key-0123456789\"}}\n  \
             - {{name: b, key: \"{key}\"}}\n  \
             - {{name: c, key_sha256: \"{}\"}}\n\
             users:\n  - {{name: u, password_hash: \"not-a-bcrypt-hash\"}}\n  \
             - {{name: u, password_hash: \"also-not-one\"}}\n",
            sha256_hex(key.as_bytes())
        ),
    );
    let (code, _, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "{stderr}");
    for line in [
        "clients[1].name: duplicate client name \"a\" (clients[0])",
        "clients[2].key: same key as clients[0]",
        "clients[3].key_sha256: same key as clients[0]",
        "users[1].name: duplicate user name \"u\" (users[0])",
        // The users' hashes are malformed, and they still need a secret to sign tokens.
        "auth.jwt_secret: required when users log in (at least 32 bytes)",
    ] {
        assert!(stderr.lines().any(|l| l.trim() == line), "missing {line:?} in:\n{stderr}");
    }
    assert!(stderr.contains("users[0].password_hash: "), "{stderr}");
    assert!(stderr.contains("users[1].password_hash: "), "{stderr}");
}

/// SPEC §4: `max_keep_alive` takes a number of seconds (`600` = `10m`; `0` allows only 0) or a
/// duration, and the refusal repeats the limit as configured.
#[test]
fn max_keep_alive_takes_a_number_of_seconds() {
    let fake = FakeOllama::start();
    let yaml = |cap: &str| {
        format!(
            "listen: \"127.0.0.1:0\"\nupstream: \"{}\"\nclients:\n  - name: c1\n    key: \"{KEY}\"\n    \
             allow_models: [\"*\"]\n    max_keep_alive: {cap}\n",
            fake.url()
        )
    };
    let butler = Butler::start(&yaml("600"));
    let generate = |butler: &Butler, keep_alive: &str| {
        let body = format!(r#"{{"model":"llama3.2","prompt":"hi","keep_alive":{keep_alive}}}"#);
        request(
            butler.addr(),
            "POST",
            "/api/generate",
            &[("Authorization", &bearer())],
            body.as_bytes(),
        )
    };
    for within in ["600", "\"10m\"", "0", "\"599s\""] {
        assert_eq!(generate(&butler, within).status, 200, "{within}");
    }
    for beyond in ["601", "\"11m\"", "-1", "\"1h\""] {
        assert_error(&generate(&butler, beyond), 400, "keep_alive exceeds limit of 600");
    }
    let butler = Butler::start(&yaml("0"));
    assert_eq!(generate(&butler, "0").status, 200);
    assert_error(&generate(&butler, "1"), 400, "keep_alive exceeds limit of 0");
    assert_error(&generate(&butler, "\"5m\""), 400, "keep_alive exceeds limit of 0");
    assert_eq!(fake.requests_to("/api/generate").len(), 5);
}

#[test]
fn an_unset_variable_is_an_error_naming_it() {
    let dir = TempDir::new();
    let path = dir.write(
        "env.yaml",
        "upstream: \"http://127.0.0.1:11434\"\nclients:\n  - {name: a, key: \"${NOPE}\"}\n",
    );
    let (code, _, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("environment variable \"NOPE\" is not set"), "{stderr}");
    // Running it fails the same way, before listening.
    let (code, stdout, stderr) = run_cli(&["--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("\"NOPE\""), "{stderr}");
}

#[test]
fn interpolation_leaves_dollars_alone_and_expands_references() {
    let fake = FakeOllama::start();
    let bcrypt_like = "$2b$10$abcdefghijklmnopqrstuv";
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"${{UPSTREAM_FOR_TEST}}\"\nclients:\n  \
         - name: dollars\n    key: \"{bcrypt_like}\"\n  \
         - name: escaped\n    key: \"$${{LITERAL_NOT_EXPANDED}}\"\n  \
         - name: defaulted\n    key: \"${{UNSET_FOR_TEST:-sk-default-from-the-yaml}}\"\n  \
         - name: fromenv\n    key: \"pre-${{KEY_FOR_TEST}}-post\"\n"
    );
    let upstream = fake.url();
    let butler = Butler::start_with(
        &yaml,
        &[],
        &[("UPSTREAM_FOR_TEST", &upstream), ("KEY_FOR_TEST", "a-longer-middle-part")],
    );
    for key in [
        bcrypt_like,
        "${LITERAL_NOT_EXPANDED}",
        "sk-default-from-the-yaml",
        "pre-a-longer-middle-part-post",
    ] {
        let r = get(butler.addr(), "/api/tags", &[("Authorization", &format!("Bearer {key}"))]);
        assert_eq!(r.status, 200, "key {key:?}");
    }
    for not_a_key in [
        "$2b$10$",
        "$${LITERAL_NOT_EXPANDED}",
        "${UNSET_FOR_TEST:-sk-default-from-the-yaml}",
        "pre-${KEY_FOR_TEST}-post",
    ] {
        let r =
            get(butler.addr(), "/api/tags", &[("Authorization", &format!("Bearer {not_a_key}"))]);
        assert_eq!(r.status, 401, "{not_a_key:?}");
    }
    assert_eq!(fake.request_count(), 4);
}

fn keys_in(text: &str) -> Vec<String> {
    let mut keys: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '"')
        .filter(|t| t.starts_with("sk-"))
        .map(String::from)
        .collect();
    keys.dedup();
    keys
}

#[test]
fn init_writes_a_private_working_config_once() {
    let dir = TempDir::new();
    let (code, stdout, stderr) = run_cli_in(dir.path(), &["init", "new.yaml"], &[], None);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let path = dir.path().join("new.yaml");
    let meta = std::fs::metadata(&path).expect("init wrote the file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let keys = keys_in(&stdout);
    assert_eq!(keys.len(), 1, "expected one key in: {stdout}");
    let key = &keys[0];
    let contents = std::fs::read(&path).unwrap();
    let text = String::from_utf8(contents.clone()).unwrap();
    assert!(!text.contains(key.as_str()), "the key itself was written:\n{text}");
    assert!(text.contains(&sha256_hex(key.as_bytes())), "no digest of the key:\n{text}");
    assert!(text.contains("http://127.0.0.1:11434"), "{text}");

    let (code, _, stderr) = run_cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(code, 0, "init wrote an invalid config: {stderr}");

    // The printed key works against a butler started from the file.
    let fake = FakeOllama::start();
    let upstream = fake.url();
    let butler = Butler::start_with(
        &text,
        &[],
        &[("BUTLER_UPSTREAM", &upstream), ("BUTLER_LISTEN", "127.0.0.1:0")],
    );
    let ok = get(butler.addr(), "/api/tags", &[("Authorization", &format!("Bearer {key}"))]);
    assert_eq!(ok.status, 200, "{}", ok.body_str());
    assert_eq!(fake.request_count(), 1);

    // A second init never overwrites.
    let (code, stdout, stderr) = run_cli_in(dir.path(), &["init", "new.yaml"], &[], None);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("new.yaml"), "{stderr}");
    assert!(keys_in(&stdout).is_empty(), "a key was printed for nothing: {stdout}");
    assert_eq!(std::fs::read(&path).unwrap(), contents);

    // Without a path it writes butler.yaml.
    let (code, _, stderr) = run_cli_in(dir.path(), &["init"], &[], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(dir.path().join("butler.yaml").exists());
}

#[test]
fn gen_key_prints_a_key_and_its_digest() {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (code, stdout, stderr) = run_cli(&["gen-key"], &[], None);
        assert_eq!(code, 0, "{stderr}");
        let keys = keys_in(&stdout);
        assert_eq!(keys.len(), 1, "{stdout}");
        let key = keys[0].clone();
        let body = &key[3..];
        assert!(body.len() >= 43, "fewer than 32 bytes of randomness: {key}");
        assert!(body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{key}");
        let digest_line =
            stdout.lines().find(|l| l.trim_start().starts_with("key_sha256:")).expect("key_sha256");
        let digest = digest_line.split_once(':').unwrap().1.trim().trim_matches('"');
        assert_eq!(digest.len(), 64, "{digest_line}");
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()), "{digest_line}");
        assert_eq!(digest, sha256_hex(key.as_bytes()));
        seen.push(key);
    }
    assert_ne!(seen[0], seen[1]);
}

#[test]
fn version_help_and_usage_errors() {
    let (code, stdout, _) = run_cli(&["--version"], &[], None);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("butler {VERSION}\n"));
    let (code, stdout, _) = run_cli(&["--help"], &[], None);
    assert_eq!(code, 0);
    assert!(stdout.contains("gen-key"), "{stdout}");
    for args in
        [&["--bogus"][..], &["check", "extra"], &["--config"], &["gen-key", "--config", "x"]]
    {
        let (code, _, stderr) = run_cli(args, &[], None);
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
    let (_, _, stderr) = run_cli(&["--bogus"], &[], None);
    assert!(stderr.contains("--bogus"), "{stderr}");
    let (code, _, stderr) = run_cli(&["check", "--config", "/nonexistent/butler.yaml"], &[], None);
    assert_eq!(code, 1, "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_lets_streams_finish_refuses_new_work_and_exits_0() {
    let tokens = 5;
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(400),
        tokens,
        ..Behavior::default()
    });
    let butler = start(&fake, "");
    let auth = bearer();
    let mut stream = StreamingResponse::open(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &auth)],
        br#"{"model":"llama3.2"}"#,
    );
    let (first, _) = stream.next_json_line(WAIT).expect("first token");
    assert_eq!(first["message"]["content"], "tok0");
    // Connections already open, with a request head on its way.
    let mut pending = RawConn::connect(butler.addr());
    pending
        .write(format!("GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n").as_bytes())
        .unwrap();
    let mut pending_ready = RawConn::connect(butler.addr());
    pending_ready.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Make sure butler has accepted both before the signal: a request on a third connection
    // is answered only after the acceptor went past them.
    assert_eq!(get(butler.addr(), "/readyz", &[]).status, 200);

    let mark = butler.log_mark();
    butler.sigterm();
    butler
        .wait_log_since(mark, |v| v["msg"] == "shutting down", WAIT)
        .unwrap_or_else(|| panic!("no shutdown log\n{}", butler.output()));

    // The listener closes: new connections are refused. One that slipped in just before may
    // be answered 503 or dropped, never served.
    let deadline = Instant::now() + WAIT;
    let refused_at = loop {
        match try_request(butler.addr(), "GET", "/api/tags", &[("Authorization", &auth)], b"") {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break Instant::now(),
            Err(_) => {}
            Ok(r) => assert_error(&r, 503, "shutting down"),
        }
        assert!(Instant::now() < deadline, "the listener stayed open after SIGTERM");
    };

    // Requests arriving on open connections get 503 and Connection: close.
    for conn in [&mut pending, &mut pending_ready] {
        conn.write(b"\r\n").unwrap();
        let r = conn.read_response("GET", WAIT).expect("503 on an open connection");
        assert_error(&r, 503, "shutting down");
        assert!(r.connection_close());
        assert!(conn.wait_closed(WAIT));
    }

    // The stream in flight completes.
    let mut contents = vec![first["message"]["content"].as_str().unwrap().to_string()];
    let mut done = false;
    while let Some((line, _)) = stream.next_json_line(WAIT) {
        if line["done"] == true {
            done = true;
        } else {
            contents.push(line["message"]["content"].as_str().unwrap().to_string());
        }
    }
    assert!(stream.ended_cleanly(), "stream cut by the shutdown");
    assert!(done);
    assert_eq!(contents, ["tok0", "tok1", "tok2", "tok3", "tok4"]);
    let last_token = fake.wait_token(tokens - 1, WAIT).unwrap();
    assert!(refused_at < last_token, "connections were refused only after the stream ended");
    assert_eq!(fake.requests_to("/api/tags").len(), 0, "a request was served while draining");

    let status =
        butler.wait_exit(WAIT).unwrap_or_else(|| panic!("still running\n{}", butler.output()));
    assert_eq!(status.code(), Some(0), "{}", butler.output());
}

#[test]
fn shutdown_drain_bounds_the_wait_for_streams() {
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(300),
        tokens: 50,
        ..Behavior::default()
    });
    let butler = start(&fake, "timeouts: {shutdown_drain: 300ms}\n");
    let mut stream = StreamingResponse::open(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &bearer())],
        br#"{"model":"llama3.2"}"#,
    );
    stream.next_json_line(WAIT).expect("first token");
    let signalled = Instant::now();
    butler.sigterm();
    let status = butler
        .wait_exit(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("no exit within 3 s of SIGTERM\n{}", butler.output()));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", butler.output());
    assert!(took >= Duration::from_millis(250), "exited after {took:?}, before the drain time");
    assert!(took < Duration::from_millis(2500), "exited after {took:?}");

    // The unfinished stream is visibly cut, not ended cleanly.
    while stream.next_chunk(WAIT).is_some() {}
    assert!(!stream.timed_out(), "stream still open after butler exited");
    assert_eq!(stream.end(), Some(StreamEnd::Truncated));
    assert!(
        fake.wait_event(|e| matches!(e, Event::ClientGone { .. }), WAIT).is_some(),
        "the upstream stream was never closed"
    );
}
