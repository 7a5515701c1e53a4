//! Memory of request inspection (SPEC §11 "Memory", issue 9 finding 3): inspecting one 8 MiB
//! body takes at most 4× its size in additional memory at peak, and afterwards butler's RSS is
//! back within 32 MiB of its level before — whatever the body's shape, and also when the
//! subject may use no model at all (the body is parsed before the model check).
//!
//! Butler's own memory is read from `/proc/<pid>/status`: `VmRSS` now and `VmHWM`, the peak
//! since the last `echo 5 > /proc/<pid>/clear_refs`. The fake upstream runs in this process, so
//! what it receives does not count. The worst cases are the shapes that cost a tree parser the
//! most per byte (tiny keys in one object, tiny array elements, empty strings) and those that
//! make the prompt scan buffer text (many text parts per message, long escaped strings).
//!
//! Alone in its own test binary: other butlers started by parallel tests of the same binary
//! would not disturb the numbers (each is its own process), but the CPU they take would make
//! the test slow.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

use support::{Butler, Canned, FakeOllama, RawConn};

/// The inspection ceiling (SPEC §7.3): exactly this size is allowed.
const MAX_BODY: usize = 8 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;
/// SPEC §11: 4× the body size at peak, the body buffer itself included.
const PEAK_BUDGET: u64 = 4 * MAX_BODY as u64;
/// What the peak may exceed the budget by for reasons that have nothing to do with the body:
/// the kernel's accounting of RSS is per-CPU cached (up to 64 pages per counter per CPU on
/// Linux ≥ 6.2, so `VmRSS`/`VmHWM` can lag by a few hundred KiB), and serving a request touches
/// a little memory of its own (log lines, the upstream connection's buffers, the worker's
/// stack). 2 MiB covers all of it with room to spare; the inspection itself must fit the 32.
const PEAK_SLACK: u64 = 2 * MIB;
/// SPEC §11: RSS within 32 MiB of its level before the request.
const AFTER_BUDGET: u64 = 32 * MIB;

/// Allowed every model, with a prompt pattern and `max_predict`, so that every admitted body is
/// scanned in full (the pattern never matches) and gets a generation cap injected.
const FILTERED: &str = "sk-memory-filtered-7c1d9e3b5a2f";
/// Allowed no model: refused (403) after parsing.
const NOBODY: &str = "sk-memory-nobody-2e8f4a6c0b9d";

fn yaml(upstream: &str, workers: usize) -> String {
    format!(
        r#"listen: "127.0.0.1:0"
upstream: "{upstream}"
workers: {workers}
clients:
  - name: filtered
    key: "{FILTERED}"
    allow_models: ["*"]
    max_predict: 64
    deny_prompt_patterns: ["(?i)never present in any body"]
  - name: nobody
    key: "{NOBODY}"
"#
    )
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
fn rss_and_peak(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).expect(name);
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{line}"));
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("write clear_refs");
}

// ---------------------------------------------------------------------------------------------
// Worst-case bodies, each at most MAX_BODY bytes
// ---------------------------------------------------------------------------------------------

/// `{"model":"llama3.2", <prefix> item,item,... <suffix>}` with as many items as fit.
fn fill(prefix: &str, item: impl Fn(usize) -> String, suffix: &str) -> Vec<u8> {
    let mut body = format!("{{\"model\":\"llama3.2\",{prefix}").into_bytes();
    let tail = format!("{suffix}}}");
    let mut i = 0;
    loop {
        let next = item(i);
        if body.len() + 1 + next.len() + tail.len() > MAX_BODY {
            break;
        }
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(next.as_bytes());
        i += 1;
    }
    body.extend_from_slice(tail.as_bytes());
    assert!(body.len() <= MAX_BODY && body.len() > MAX_BODY - 4096, "{}", body.len());
    body
}

/// A short distinct key for each index (base 36).
fn key(mut i: usize) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[i % 36]);
        i /= 36;
        if i == 0 {
            break;
        }
    }
    String::from_utf8(out).expect("ascii")
}

/// The bodies, built once for both tests.
fn worst_cases() -> &'static [(&'static str, Vec<u8>)] {
    static BODIES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    BODIES.get_or_init(build_worst_cases)
}

fn build_worst_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // About 840,000 distinct keys in the top-level object.
        ("one object with tiny keys", fill("", |i| format!("\"k{}\":0", key(i)), "")),
        // About 4.2 million array elements.
        ("an array of zeros", fill("\"x\":[", |_| "0".into(), "]")),
        // About 2.8 million empty strings, all text parts of one message.
        (
            "empty strings as the parts of one message",
            fill("\"messages\":[{\"role\":\"user\",\"content\":[", |_| "\"\"".into(), "]}]"),
        ),
        // Thousands of messages with 64 text blocks each.
        (
            "many messages with many text parts",
            fill(
                "\"messages\":[",
                |i| {
                    let parts: Vec<String> = (0..64)
                        .map(|j| format!("{{\"type\":\"text\",\"text\":\"p{}\"}}", (i + j) % 10))
                        .collect();
                    format!("{{\"role\":\"user\",\"content\":[{}]}}", parts.join(","))
                },
                "]",
            ),
        ),
        // Two long strings made of escapes, joined as the parts of one message.
        (
            "long escaped strings",
            fill(
                "\"messages\":[{\"role\":\"user\",\"content\":[",
                |i| match i {
                    0 => format!("\"{}\"", "\\n\\\"\\u00e9".repeat(MAX_BODY / 24)),
                    1 => format!("\"{}\"", "a\\tb".repeat(MAX_BODY / 12)),
                    _ => "\"\"".into(),
                },
                "]}]",
            ),
        ),
        // Two strings of nearly 4 MiB with an escape each, the two text parts of one
        // message: each is decoded to be scanned, and both are joined twice.
        (
            "two long parts of one message",
            fill(
                "\"messages\":[{\"role\":\"user\",\"content\":[",
                |i| match i {
                    0 | 1 => format!("\"{}\\n\"", "x".repeat(MAX_BODY / 2 - 64)),
                    _ => "\"\"".into(),
                },
                "]}]",
            ),
        ),
        // One key of nearly 8 MiB, all escapes: folded and hashed for the duplicate check.
        (
            "one long escaped key",
            fill(
                "",
                |i| {
                    if i == 0 {
                        format!("\"{}\":0", "\\u00e9".repeat(MAX_BODY / 6 - 16))
                    } else {
                        format!("\"k{i}\":0")
                    }
                },
                "",
            ),
        ),
        // One plain string of nearly 8 MiB.
        ("one long prompt", {
            let head = "{\"model\":\"llama3.2\",\"messages\":[{\"role\":\"user\",\"content\":\"";
            let tail = "\"}]}";
            let text = "x".repeat(MAX_BODY - head.len() - tail.len());
            format!("{head}{text}{tail}").into_bytes()
        }),
    ]
}

/// The two tests take turns: each keeps both CPUs of a small machine busy for seconds.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(fake: &FakeOllama, workers: usize) -> Butler {
    // A canned answer: the fake then does not parse what it receives.
    let answer =
        Canned::json(200, &serde_json::json!({"message": {"content": "ok"}, "done": true}));
    fake.set_route("POST", "/api/chat", answer);
    Butler::start(&yaml(&fake.url(), workers))
}

/// Posts `body` to `/api/chat` and waits until butler has finished with the request (its
/// `response` log line comes after the body has been freed), so that RSS read afterwards is
/// butler's state after the request.
fn post(butler: &Butler, key: &str, body: &[u8]) -> u16 {
    post_timed(butler, key, body).0
}

/// [`post`], with how long butler took (its `duration_ms`).
fn post_timed(butler: &Butler, key: &str, body: &[u8]) -> (u16, u64) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = format!("memory-{}", NEXT.fetch_add(1, Ordering::SeqCst));
    let auth = format!("Bearer {key}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("X-Request-Id", id.as_str()),
    ];
    // A debug build takes seconds over the worst bodies, more when six run at once on a
    // shared machine: a generous deadline (the test is about memory, not time).
    let mut conn = RawConn::connect(butler.addr());
    conn.send_request("POST", "/api/chat", &headers, body).expect("send");
    let status = conn.read_response("POST", Duration::from_secs(120)).expect("response").status;
    let done = butler.wait_log(
        |v| v["msg"] == "response" && v["request_id"] == id.as_str(),
        Duration::from_secs(120),
    );
    let Some(done) = done else { panic!("no response log line for {id}\n{}", butler.output()) };
    (status, done["duration_ms"].as_u64().unwrap_or(0))
}

/// Warms butler up: every worker thread and code path a large request takes has run once.
fn warm_up(butler: &Butler) {
    let small = br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..4 {
        assert_eq!(post(butler, FILTERED, small), 200);
        assert_eq!(post(butler, NOBODY, small), 403);
    }
}

#[test]
fn inspecting_an_8_mib_body_takes_at_most_four_times_its_size() {
    let _turn = one_at_a_time();
    let fake = FakeOllama::start();
    // One worker, so every request runs on the same (already warm) thread.
    let butler = start(&fake, 1);
    let pid = butler.pid();
    warm_up(&butler);
    let (start_rss, _) = rss_and_peak(pid);

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, body) in worst_cases() {
        let name = *name;
        for (key, status) in [(FILTERED, 200), (NOBODY, 403)] {
            let (before, _) = rss_and_peak(pid);
            reset_peak(pid);
            let (got, ms) = post_timed(&butler, key, body);
            assert_eq!(got, status, "{name}\n{}", butler.output());
            let (after, peak) = rss_and_peak(pid);
            let extra = peak.saturating_sub(before);
            let line = format!(
                "{name} ({}, {status}, {ms} ms): before {} MiB, peak +{:.1} MiB, after {:+.1} MiB",
                if key == FILTERED { "filtered" } else { "nobody" },
                before / MIB,
                extra as f64 / MIB as f64,
                (after as f64 - before as f64) / MIB as f64,
            );
            if extra > PEAK_BUDGET + PEAK_SLACK || after > before + AFTER_BUDGET {
                failures.push(line.clone());
            }
            report.push(line);
            fake.clear_requests();
        }
    }
    let (end_rss, _) = rss_and_peak(pid);
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "over budget:\n{}\n\nall:\n{}",
        failures.join("\n"),
        report.join("\n")
    );
    assert!(
        end_rss <= start_rss + AFTER_BUDGET,
        "RSS grew from {} to {} MiB over the run",
        start_rss / MIB,
        end_rss / MIB
    );
    // What was admitted reached the upstream with the cap injected (the scan and the edit ran).
    let small = br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(post(&butler, FILTERED, small), 200);
    let sent = fake.last_request().expect("forwarded").json();
    assert_eq!(sent["options"]["num_predict"], 64);
}

#[test]
fn six_large_bodies_at_once_give_their_memory_back() {
    const PARALLEL: usize = 6;
    let _turn = one_at_a_time();
    let fake = FakeOllama::start();
    let butler = Arc::new(start(&fake, PARALLEL));
    let pid = butler.pid();
    // Warm every worker: PARALLEL requests at once, twice.
    let small =
        Arc::new(br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#.to_vec());
    let bodies: Vec<Arc<Vec<u8>>> =
        worst_cases().iter().map(|(_, body)| Arc::new(body.clone())).collect();
    let run_all = |bodies: Vec<Arc<Vec<u8>>>| {
        let barrier = Arc::new(Barrier::new(bodies.len()));
        let threads: Vec<_> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                let (butler, barrier) = (Arc::clone(&butler), Arc::clone(&barrier));
                thread::spawn(move || {
                    let key = if i % 2 == 0 { FILTERED } else { NOBODY };
                    barrier.wait();
                    post(&butler, key, &body)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("client thread")).collect::<Vec<u16>>()
    };
    for _ in 0..2 {
        run_all((0..PARALLEL).map(|_| Arc::clone(&small)).collect());
    }
    let (before, _) = rss_and_peak(pid);
    reset_peak(pid);
    let mut all = bodies.clone();
    all.truncate(PARALLEL);
    let statuses = run_all(all);
    let expected: Vec<u16> = (0..PARALLEL).map(|i| if i % 2 == 0 { 200 } else { 403 }).collect();
    assert_eq!(statuses, expected, "{}", butler.output());
    let (after, peak) = rss_and_peak(pid);
    eprintln!(
        "{PARALLEL} at once: before {} MiB, peak +{:.1} MiB, after {:+.1} MiB",
        before / MIB,
        peak.saturating_sub(before) as f64 / MIB as f64,
        (after as f64 - before as f64) / MIB as f64
    );
    // Each request within its own budget, all of them at once within the sum.
    assert!(
        peak.saturating_sub(before) <= PARALLEL as u64 * (PEAK_BUDGET + PEAK_SLACK),
        "peak +{} MiB",
        peak.saturating_sub(before) / MIB
    );
    assert!(
        after <= before + AFTER_BUDGET,
        "RSS {} MiB after, {} before",
        after / MIB,
        before / MIB
    );
}
