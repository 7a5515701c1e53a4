//! `make bench`: butler against talking to the upstream directly.
//!
//! Self-contained on purpose (std only): a lean fake Ollama, a keep-alive load
//! generator and a time-to-first-token probe, driving the release binary at
//! `target/release/butler`. It prints a Markdown report for
//! docs/performance.md. Numbers are measured, never asserted: on a shared
//! 2-core machine the load generator, butler and the upstream compete for the
//! same CPUs, so read ratios rather than absolutes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const KEY: &str = "sk-bench-key";
const TAGS: &str = r#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":2019393189},{"name":"qwen2.5:7b","model":"qwen2.5:7b","size":4683087332}]}"#;

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let bin = std::env::var("BUTLER_BIN").unwrap_or_else(|_| "target/release/butler".into());
    let upstream = start_upstream();
    let (mut butler, butler_addr) = start_butler(&bin, upstream);
    let pid = butler.id();
    let idle_rss = rss_kib(pid, "VmRSS");
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);

    let auth = format!("Authorization: Bearer {KEY}\r\n");
    let mut rows = Vec::new();
    let conn_counts: Vec<usize> = std::env::var("BENCH_CONNS")
        .unwrap_or_else(|_| "1,64".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    for conns in conn_counts {
        let direct = load(upstream, conns, "", Duration::from_secs(secs));
        let proxied = load(butler_addr, conns, &auth, Duration::from_secs(secs));
        rows.push((conns, direct, proxied));
    }
    let peak_rss = rss_kib(pid, "VmHWM");
    let ttft_direct = ttft(upstream, "", 300);
    let ttft_proxied = ttft(butler_addr, &auth, 300);
    let _ = butler.kill();
    let _ = butler.wait();

    println!("## Results ({secs} s per run, `GET /api/tags`, keep-alive)\n");
    println!(
        "| connections | direct req/s | butler req/s | ratio | direct p50 / p99 (µs) | butler p50 / p99 (µs) |"
    );
    println!("|---|---|---|---|---|---|");
    for (conns, d, p) in &rows {
        println!(
            "| {conns} | {:.0} | {:.0} | {:.2}× | {} / {} | {} / {} |",
            d.rps,
            p.rps,
            p.rps / d.rps.max(1.0),
            d.p50,
            d.p99,
            p.p50,
            p.p99
        );
    }
    println!("\n## Time to first token (`POST /api/chat`, streamed, 300 requests)\n");
    println!("| path | p50 (µs) | p99 (µs) |");
    println!("|---|---|---|");
    println!("| direct | {} | {} |", ttft_direct.0, ttft_direct.1);
    println!("| butler | {} | {} |", ttft_proxied.0, ttft_proxied.1);
    println!("\nbutler adds {} µs at the median.\n", ttft_proxied.0 as i64 - ttft_direct.0 as i64);
    println!("## Memory and size\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| idle RSS after start | {:.1} MB |", idle_rss as f64 / 1024.0);
    println!("| peak RSS (after 64-connection load) | {:.1} MB |", peak_rss as f64 / 1024.0);
    println!("| stripped release binary | {:.2} MB |", size as f64 / 1_048_576.0);
}

struct Load {
    rps: f64,
    p50: u64,
    p99: u64,
}

/// `conns` keep-alive connections, one thread each, sending `GET /api/tags`
/// back to back for `dur`; latencies in microseconds.
fn load(addr: SocketAddr, conns: usize, auth: &str, dur: Duration) -> Load {
    let request = format!("GET /api/tags HTTP/1.1\r\nHost: bench\r\n{auth}\r\n").into_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, request) = (stop.clone(), request.clone());
            thread::spawn(move || {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut conn = Conn::open(addr);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    conn.stream.write_all(&request).expect("write");
                    let (status, _) = conn.read_response();
                    assert_eq!(status, 200, "bench request failed");
                    lat.push(t.elapsed().as_micros() as u64);
                }
                lat
            })
        })
        .collect();
    thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u64> =
        handles.into_iter().flat_map(|h| h.join().expect("load thread")).collect();
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Load { rps: all.len() as f64 / elapsed, p50: pct(0.50), p99: pct(0.99) }
}

/// Median and p99 time from sending a streamed chat request to receiving the
/// first token's bytes, in microseconds.
fn ttft(addr: SocketAddr, auth: &str, n: usize) -> (u64, u64) {
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut samples = Vec::with_capacity(n);
    let mut conn = Conn::open(addr);
    for _ in 0..n {
        let t = Instant::now();
        conn.stream.write_all(request.as_bytes()).expect("write");
        let first = conn.read_first_body_byte();
        samples.push(first.duration_since(t).as_micros() as u64);
        conn.finish_chunked();
    }
    samples.sort_unstable();
    (samples[n / 2], samples[(n * 99 / 100).min(n - 1)])
}

struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Conn { stream, reader }
    }

    /// Reads a head; returns the status and the Content-Length (None if chunked).
    fn read_head(&mut self) -> (u16, Option<usize>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                return (status, length);
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().ok();
            }
        }
    }

    fn read_response(&mut self) -> (u16, usize) {
        let (status, length) = self.read_head();
        let n = length.expect("bench responses have a Content-Length");
        let mut body = vec![0u8; n];
        self.reader.read_exact(&mut body).expect("body");
        (status, n)
    }

    fn read_first_body_byte(&mut self) -> Instant {
        let (status, _) = self.read_head();
        assert_eq!(status, 200, "ttft request failed");
        self.reader.fill_buf().expect("first chunk");
        Instant::now()
    }

    fn finish_chunked(&mut self) {
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
            let mut data = vec![0u8; size + 2];
            self.reader.read_exact(&mut data).expect("chunk");
            if size == 0 {
                return;
            }
        }
    }
}

/// A lean upstream: `GET /api/tags` with a fixed body, `POST /api/chat` as a
/// three-token NDJSON stream written one chunk per token.
fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || serve_upstream(stream));
        }
    });
    addr
}

fn serve_upstream(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let post = line.starts_with("POST");
        let mut length = 0usize;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let ok = if post {
            let mut r = out.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            for i in 0..3 {
                let token = format!(
                    "{{\"model\":\"llama3.2\",\"message\":{{\"role\":\"assistant\",\"content\":\"t{i}\"}},\"done\":false}}\n"
                );
                r = r.and_then(|()| {
                    out.write_all(format!("{:x}\r\n{token}\r\n", token.len()).as_bytes())
                });
            }
            let done =
                "{\"model\":\"llama3.2\",\"done\":true,\"prompt_eval_count\":5,\"eval_count\":3}\n";
            r.and_then(|()| {
                out.write_all(format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len()).as_bytes())
            })
        } else {
            out.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{TAGS}",
                    TAGS.len()
                )
                .as_bytes(),
            )
        };
        if ok.is_err() {
            return;
        }
    }
}

fn start_butler(bin: &str, upstream: SocketAddr) -> (Child, SocketAddr) {
    let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let dir = std::env::temp_dir().join(format!("butler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("butler.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"{addr}\"\nupstream: \"http://{upstream}\"\nclients:\n  - name: bench\n    key: \"{KEY}\"\n    allow_models: [\"*\"]\n"
        ),
    )
    .expect("write config");
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        // BENCH_BUTLER_LOG=file keeps butler's log lines for a post-mortem.
        .stdout(match std::env::var("BENCH_BUTLER_LOG") {
            Ok(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
            Err(_) => Stdio::null(),
        })
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (run `make build` first): {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "butler did not start listening");
        thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
