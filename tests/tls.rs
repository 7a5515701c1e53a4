//! Native HTTPS (SPEC §11 `tls`): butler terminates TLS itself with a certificate from
//! `tls.cert_file` / `tls.key_file`. Requests are served as over plain HTTP, streams still
//! arrive token by token, pipelined requests inside one TLS connection are all answered, the
//! upstream is told `X-Forwarded-Proto: https`, and plain HTTP on the TLS port gets no answer.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use support::certs::TestCert;
use support::setup::{KEY, WAIT, config};
use support::{Behavior, Butler, FakeOllama, TempDir, run_cli_in};

/// A fresh test CA and a server certificate it signed, written as PEM files into `dir`.
/// Returns the CA certificate (DER) for the client's trust store.
fn write_certificate(dir: &TempDir) -> CertificateDer<'static> {
    let cert = TestCert::issue("butler test CA");
    dir.write("cert.pem", &cert.cert_pem);
    dir.write("key.pem", &cert.key_pem);
    cert.ca_der
}

fn tls_yaml(fake: &FakeOllama, dir: &TempDir) -> String {
    let extra = format!(
        "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    config(&fake.url(), &extra)
}

/// A TLS client connection to butler that trusts only the test CA.
fn connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("CA accepted");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(client), name).expect("client connection");
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("read timeout");
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads until the server closes, tolerating a close without `close_notify`.
fn read_all(stream: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return out,
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    }
}

/// Splits the responses in `bytes` into (status, body) pairs; bodies are Content-Length
/// framed or chunked (decoded).
fn responses(mut bytes: &[u8]) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head") + 4;
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        bytes = &bytes[end..];
        let status: u16 = head[9..12].parse().expect("status");
        let mut body = Vec::new();
        if head.contains("transfer-encoding: chunked") {
            loop {
                let line_end = bytes.windows(2).position(|w| w == b"\r\n").expect("size line");
                let size =
                    usize::from_str_radix(std::str::from_utf8(&bytes[..line_end]).unwrap(), 16)
                        .expect("chunk size");
                bytes = &bytes[line_end + 2..];
                if size == 0 {
                    bytes = &bytes[2..];
                    break;
                }
                body.extend_from_slice(&bytes[..size]);
                bytes = &bytes[size + 2..];
            }
        } else {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().expect("length"));
            body.extend_from_slice(&bytes[..len]);
            bytes = &bytes[len..];
        }
        out.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    out
}

#[test]
fn https_requests_are_served_and_forwarded_as_https() {
    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let ca = write_certificate(&dir);
    let butler = Butler::start_in(&dir, &tls_yaml(&fake, &dir), &[], &[]);
    let listening = butler.wait_log(|l| l["msg"] == "listening", WAIT).expect("listening line");
    assert_eq!(listening["scheme"], "https");

    let mut tls = connect(butler.addr(), &ca);
    let body = r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: butler\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).expect("write");
    let got = responses(&read_all(&mut tls));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, 200, "{got:?}");
    assert!(got[0].1.contains("\"done\":true"), "{got:?}");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));

    let seen = fake.last_request().expect("forwarded");
    assert_eq!(seen.path, "/api/chat");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.body_str(), body);

    // No key, no entry: the same 401 as over plain HTTP.
    let mut tls = connect(butler.addr(), &ca);
    tls.write_all(b"GET /api/tags HTTP/1.1\r\nHost: butler\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(
        responses(&read_all(&mut tls)),
        vec![(401, "{\"error\":\"unauthorized\"}\n".to_string())]
    );
}

/// Requests written together arrive in the same TLS records. When a request body ends inside
/// a record, the next request's head stays decrypted inside the TLS session, where `poll`
/// cannot see it; it must still be answered at once, not after an idle timeout.
#[test]
fn pipelined_requests_in_one_tls_connection_are_all_answered() {
    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let ca = write_certificate(&dir);
    let butler = Butler::start_in(&dir, &tls_yaml(&fake, &dir), &[], &[]);

    let mut tls = connect(butler.addr(), &ca);
    // About two records: the body ends inside the second, the next head follows it.
    let prompt = "x".repeat(30_000);
    let chat = format!(
        r#"{{"model":"llama3.2","stream":false,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let mut batch = format!(
        "POST /api/chat HTTP/1.1\r\nHost: b\r\nx-api-key: {KEY}\r\nContent-Length: {}\r\n\r\n{chat}",
        chat.len()
    )
    .into_bytes();
    for i in 0..3 {
        let close = if i == 2 { "Connection: close\r\n" } else { "" };
        batch.extend_from_slice(
            format!("GET /api/tags?n={i} HTTP/1.1\r\nHost: b\r\nx-api-key: {KEY}\r\n{close}\r\n")
                .as_bytes(),
        );
    }
    tls.write_all(&batch).expect("write");
    let got = responses(&read_all(&mut tls));
    assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![200; 4], "{got:?}");
    assert_eq!(fake.requests_to("/api/chat")[0].body_str(), chat);
    let targets: Vec<String> = fake.requests_to("/api/tags").iter().map(|r| r.target()).collect();
    assert_eq!(targets, (0..3).map(|i| format!("/api/tags?n={i}")).collect::<Vec<_>>());
}

/// Each NDJSON line is readable by the client before Ollama writes the next one.
#[test]
fn streams_arrive_token_by_token_through_tls() {
    let fake = FakeOllama::start_with(Behavior {
        token_delay: Duration::from_millis(300),
        tokens: 3,
        ..Behavior::default()
    });
    let dir = TempDir::new();
    let ca = write_certificate(&dir);
    let butler = Butler::start_in(&dir, &tls_yaml(&fake, &dir), &[], &[]);
    let mut tls = connect(butler.addr(), &ca);
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).expect("write");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut seen_at = Vec::new();
    for token in 0..3 {
        let needle = format!("\"content\":\"tok{token}\"");
        while !String::from_utf8_lossy(&received).contains(&needle) {
            let n = tls.read(&mut buf).expect("read");
            assert!(n > 0, "closed before token {token}");
            received.extend_from_slice(&buf[..n]);
        }
        seen_at.push(Instant::now());
    }
    for (token, seen) in seen_at.iter().enumerate().take(2) {
        let next_written = fake.wait_token(token + 1, WAIT).expect("next token written");
        assert!(
            *seen < next_written,
            "token {token} reached the client only after token {} was written",
            token + 1
        );
    }
}

#[test]
fn plain_http_on_the_tls_port_gets_no_http_answer() {
    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let ca = write_certificate(&dir);
    let butler = Butler::start_in(&dir, &tls_yaml(&fake, &dir), &[], &[]);
    let mut tcp = TcpStream::connect(butler.addr()).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: b\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(fake.request_count(), 0);
    // Serving goes on for proper clients.
    let mut tls = connect(butler.addr(), &ca);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(responses(&read_all(&mut tls))[0].0, 200);
}

#[test]
fn check_reports_unreadable_and_mismatched_certificate_files() {
    let dir = TempDir::new();
    write_certificate(&dir);
    let other = TempDir::new();
    write_certificate(&other);
    let yaml = |cert: &str, key: &str| {
        format!(
            "upstream: \"http://127.0.0.1:11434\"\ntls:\n  cert_file: \"{cert}\"\n  \
             key_file: \"{key}\"\nclients:\n  - name: a\n    key: \"{KEY}\"\n"
        )
    };
    let cert = dir.path().join("cert.pem").display().to_string();
    let key = dir.path().join("key.pem").display().to_string();
    let foreign_key = other.path().join("key.pem").display().to_string();

    dir.write("good.yaml", &yaml(&cert, &key));
    let ok = run_cli_in(dir.path(), &["check", "--config", "good.yaml"], &[], None);
    assert_eq!(ok.0, 0, "{}", ok.2);
    assert!(ok.1.contains("  tls:       on"), "{}", ok.1);

    dir.write("missing.yaml", &yaml("/nonexistent/cert.pem", &key));
    let missing = run_cli_in(dir.path(), &["check", "--config", "missing.yaml"], &[], None);
    assert_eq!(missing.0, 1);
    assert!(
        missing.2.contains("tls.cert_file: cannot read /nonexistent/cert.pem"),
        "{}",
        missing.2
    );

    dir.write("mismatch.yaml", &yaml(&cert, &foreign_key));
    let mismatch = run_cli_in(dir.path(), &["check", "--config", "mismatch.yaml"], &[], None);
    assert_eq!(mismatch.0, 1);
    assert!(
        mismatch.2.contains("tls: the certificate and key do not fit together"),
        "{}",
        mismatch.2
    );

    dir.write("partial.yaml", &format!(
        "upstream: \"http://127.0.0.1:11434\"\ntls:\n  cert_file: \"{cert}\"\nclients:\n  - name: a\n    key: \"{KEY}\"\n"
    ));
    let partial = run_cli_in(dir.path(), &["check", "--config", "partial.yaml"], &[], None);
    assert_eq!(partial.0, 1);
    assert!(partial.2.contains("tls.key_file: required"), "{}", partial.2);
}

/// A renewed certificate is picked up on SIGHUP: new connections get it, and the port keeps
/// speaking TLS throughout.
#[test]
fn sighup_loads_renewed_certificate_files() {
    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let old_ca = write_certificate(&dir);
    let butler = Butler::start_in(&dir, &tls_yaml(&fake, &dir), &[], &[]);
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n";
    let mut tls = connect(butler.addr(), &old_ca);
    tls.write_all(healthz).unwrap();
    assert_eq!(responses(&read_all(&mut tls))[0].0, 200);

    let new_ca = write_certificate(&dir);
    let mark = butler.log_mark();
    butler.signal("HUP");
    butler.wait_log_since(mark, |l| l["msg"] == "config reloaded", WAIT).expect("reloaded");

    let mut tls = connect(butler.addr(), &new_ca);
    tls.write_all(healthz).unwrap();
    assert_eq!(responses(&read_all(&mut tls))[0].0, 200);
    // A client that trusts only the old CA no longer accepts the server.
    let mut stale = connect(butler.addr(), &old_ca);
    let err = stale.write_all(healthz).and_then(|()| stale.flush()).and_then(|()| {
        let mut buf = [0u8; 64];
        stale.read(&mut buf).map(|_| ())
    });
    let err = err.expect_err("the old CA does not verify the new certificate");
    assert!(err.to_string().contains("certificate"), "{err}");
}

/// Over TLS, only `close_notify` tells a close-delimited body from a cut one. An HTTP/1.0
/// stream that the upstream abandons half-way must end without it; a whole one ends with it.
#[test]
fn a_cut_close_delimited_stream_ends_without_close_notify() {
    let fake = FakeOllama::start_with(Behavior {
        tokens: 3,
        drop_after_tokens: Some(1),
        ..Behavior::default()
    });
    let dir = TempDir::new();
    let ca = write_certificate(&dir);
    let butler = Butler::start_in(&dir, &tls_yaml(&fake, &dir), &[], &[]);
    let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /api/chat HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let end = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
        tls.write_all(request.as_bytes()).expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => return (got, "close_notify".to_string()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, format!("{:?}", e.kind())),
            }
        }
    };

    let (got, how) = end(&mut connect(butler.addr(), &ca));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("tok0") && !text.contains("\"done\":true"), "{text}");
    assert_eq!(how, "UnexpectedEof", "{text}");

    fake.update_behavior(|b| b.drop_after_tokens = None);
    let (got, how) = end(&mut connect(butler.addr(), &ca));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\"done\":true"), "{text}");
    assert_eq!(how, "close_notify", "{text}");
}
