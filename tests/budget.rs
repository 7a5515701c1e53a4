//! Usage accounting and token budgets (SPEC §9, §10): token counts read from what Ollama
//! reports, charged after the response, budgets refusing new inference requests, the usage
//! chunk butler asks for on a client's behalf hidden from it, `/butler/usage`, `state_file`.

mod support;

use serde_json::{Value, json};
use support::setup::{WAIT, assert_error};
use support::{Behavior, Butler, FakeOllama, StreamEnd, StreamingResponse, TempDir, get, request};

const KEY: &str = "sk-budget-1-0a1b2c3d4e";

fn config(upstream: &str, extra: &str) -> String {
    config_budget(upstream, extra, 10)
}

fn config_budget(upstream: &str, extra: &str, per_minute: u64) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"{upstream}\"\n{extra}clients:\n  - name: b\n    \
         key: \"{KEY}\"\n    allow_models: [\"*\"]\n    token_budget: {{ per_minute: {per_minute} }}\n"
    )
}

/// A streamed request with the test key.
fn open(butler: &Butler, path: &str, body: &[u8]) -> StreamingResponse {
    let auth = format!("Bearer {KEY}");
    StreamingResponse::open(
        butler.addr(),
        "POST",
        path,
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        body,
    )
}

/// The `response` log line of the next request to `path` after `mark`.
fn response_line(butler: &Butler, mark: usize, path: &str) -> Value {
    butler
        .wait_log_since(mark, |l| l["msg"] == "response" && l["path"] == path, WAIT)
        .unwrap_or_else(|| panic!("no response line for {path}"))
}

/// The tokens a response line says were charged, and whether they were estimated.
fn charged(line: &Value) -> (Option<u64>, Option<u64>, Option<bool>) {
    (
        line["prompt_tokens"].as_u64(),
        line["completion_tokens"].as_u64(),
        line["usage_estimated"].as_bool(),
    )
}

fn chat(butler: &Butler) -> support::Response {
    chat_body(butler, br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#)
}

fn chat_body(butler: &Butler, body: &[u8]) -> support::Response {
    request(
        butler.addr(),
        "POST",
        "/api/chat",
        &[("Authorization", &format!("Bearer {KEY}"))],
        body,
    )
}

fn usage(butler: &Butler) -> Value {
    let r = get(butler.addr(), "/butler/usage", &[("Authorization", &format!("Bearer {KEY}"))]);
    assert_eq!(r.status, 200, "{}", r.body_str());
    r.json()
}

/// Each chat reports 5 prompt + 3 completion tokens (the fake's default).
#[test]
fn a_used_up_budget_refuses_until_the_window_moves() {
    let fake = FakeOllama::start();
    let butler = Butler::start(&config(&fake.url(), ""));
    assert_eq!(chat(&butler).status, 200);
    let line = butler
        .wait_log(|l| l["msg"] == "response" && l["path"] == "/api/chat", WAIT)
        .expect("response line");
    assert_eq!(
        (line["prompt_tokens"].as_u64(), line["completion_tokens"].as_u64()),
        (Some(5), Some(3))
    );
    // 8 < 10: admitted, and afterwards 16 are used.
    assert_eq!(chat(&butler).status, 200);
    let refused = chat(&butler);
    assert_error(&refused, 429, "token budget exceeded");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(fake.requests_to("/api/chat").len(), 2);

    let report = usage(&butler);
    assert_eq!(report["subject"], "b");
    assert_eq!(report["tokens"]["minute"], serde_json::json!({"used": 16, "limit": 10}));
    assert_eq!(report["tokens"]["day"], serde_json::json!({"used": 16, "limit": null}));
    assert_eq!(report["requests"]["window"], "1m");
    // Listings are not inference: the budget does not gate them.
    let tags = get(butler.addr(), "/api/tags", &[("Authorization", &format!("Bearer {KEY}"))]);
    assert_eq!(tags.status, 200);

    let metrics = get(butler.addr(), "/metrics", &[]).body_str();
    assert!(
        metrics.contains(
            "butler_tokens_total{client=\"b\",model=\"llama3.2:latest\",kind=\"prompt\"} 10"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "butler_tokens_total{client=\"b\",model=\"llama3.2:latest\",kind=\"completion\"} 6"
    ));
    assert!(
        metrics
            .contains("butler_requests_rejected_total{client=\"b\",reason=\"budget_exceeded\"} 1")
    );
}

/// A response is charged before its end reaches the client, so a request sent right after
/// reading one is judged with its tokens counted: for a chunked stream (the terminator is held
/// until the charge) and for a Content-Length framed answer (its last bytes are).
#[test]
fn the_charge_lands_before_the_client_has_the_whole_response() {
    let fake = FakeOllama::start();
    let butler = Butler::start(&config(&fake.url(), ""));
    let single: &[u8] =
        br#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    let first = chat_body(&butler, single);
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("content-length").map(str::to_owned),
        Some(first.body.len().to_string())
    );
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 8);
    assert_eq!(chat(&butler).status, 200);
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 16);
    assert_error(&chat_body(&butler, single), 429, "token budget exceeded");
}

/// For a streamed chat completion butler asks Ollama for the usage chunk and hides it from a
/// client that did not ask; a client that did ask sees it.
#[test]
fn the_usage_chunk_is_requested_and_hidden() {
    let fake = FakeOllama::start();
    let butler = Butler::start(&config(&fake.url(), ""));
    let auth = format!("Bearer {KEY}");
    let mut stream = StreamingResponse::open(
        butler.addr(),
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        br#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    let body = String::from_utf8(stream.read_to_end(WAIT)).unwrap();
    assert!(!body.contains("\"usage\""), "{body}");
    assert!(body.contains("data: [DONE]"));
    let seen: Value = serde_json::from_slice(&fake.last_request().unwrap().body).unwrap();
    assert_eq!(seen["stream_options"]["include_usage"], true);
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 8);

    let mut asked = StreamingResponse::open(
        butler.addr(),
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        br#"{"model":"llama3.2","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    );
    let body = String::from_utf8(asked.read_to_end(WAIT)).unwrap();
    assert!(body.contains("\"usage\""), "{body}");
}

#[test]
fn counters_survive_a_restart_through_the_state_file() {
    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let state = dir.path().join("state.json");
    let yaml = config(&fake.url(), &format!("state_file: \"{}\"\n", state.display()));
    let butler = Butler::start_in(&dir, &yaml, &[], &[]);
    assert_eq!(chat(&butler).status, 200);
    butler.sigterm();
    assert!(butler.wait_exit(WAIT).is_some_and(|s| s.success()));
    assert!(state.exists(), "the state file is written at shutdown");

    let again = Butler::start_in(&dir, &yaml, &[], &[]);
    assert_eq!(usage(&again)["tokens"]["day"]["used"], 8);
}

/// SPEC §9: the state file is replaced through a new temporary file in its directory, created
/// exclusively: a symlink planted at a predictable temporary name is never followed.
#[test]
fn the_state_file_is_never_written_through_a_planted_symlink() {
    use std::os::unix::fs::PermissionsExt;

    let fake = FakeOllama::start();
    let dir = TempDir::new();
    let state = dir.path().join("state.json");
    let victim = dir.write("victim.txt", "precious\n");
    std::os::unix::fs::symlink(&victim, dir.path().join("state.json.tmp")).unwrap();
    let yaml = config(&fake.url(), &format!("state_file: \"{}\"\n", state.display()));
    let butler = Butler::start_in(&dir, &yaml, &[], &[]);
    assert_eq!(chat(&butler).status, 200);
    butler.sigterm();
    assert!(butler.wait_exit(WAIT).is_some_and(|s| s.success()), "{}", butler.output());

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "the link was followed");
    let meta = std::fs::symlink_metadata(&state).expect("the state file exists");
    assert!(meta.file_type().is_file(), "the state file is a regular file: {meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["version"], 1);
    // No temporary file is left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["butler.yaml", "state.json", "state.json.tmp", "victim.txt"]);

    let again = Butler::start_in(&dir, &yaml, &[], &[]);
    assert_eq!(usage(&again)["tokens"]["day"]["used"], 8);
}

/// The issue's example: 40-token streams cut early against a 30/min budget used to be charged
/// nothing, so every one of them went through. A stream the upstream cuts after 30 tokens is
/// now charged ⌈2 prompt bytes / 4⌉ = 1 + 30 tokens, and the next request is refused.
#[test]
fn a_stream_cut_by_the_upstream_is_charged_an_estimate() {
    let fake = FakeOllama::start_with(Behavior {
        tokens: 40,
        drop_after_tokens: Some(30),
        ..Behavior::default()
    });
    let butler = Butler::start(&config_budget(&fake.url(), "", 30));
    let mark = butler.log_mark();
    let body = br#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = open(&butler, "/api/chat", body);
    assert_eq!(stream.status, 200);
    let text = String::from_utf8(stream.read_to_end(WAIT)).unwrap();
    assert_eq!(stream.end(), Some(StreamEnd::Truncated));
    assert_eq!(text.lines().count(), 30, "{text}");
    let line = response_line(&butler, mark, "/api/chat");
    assert_eq!(charged(&line), (Some(1), Some(30), Some(true)), "{line}");
    assert_eq!(line["error"], "upstream closed mid-stream");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 31);

    assert_error(&chat(&butler), 429, "token budget exceeded");
    assert_eq!(fake.requests_to("/api/chat").len(), 1);
    let metrics = get(butler.addr(), "/metrics", &[]).body_str();
    assert!(
        metrics.contains(
            "butler_tokens_total{client=\"b\",model=\"llama3.2:latest\",kind=\"completion\"} 30"
        ),
        "{metrics}"
    );
}

/// A client that leaves mid-stream is charged what it got: the fake stalls after 30 chunks
/// until butler hangs up, so butler has seen exactly those 30.
#[test]
fn a_client_leaving_mid_stream_is_charged_an_estimate() {
    let fake = FakeOllama::start_with(Behavior {
        tokens: 40,
        stall_after_tokens: Some(30),
        ..Behavior::default()
    });
    let butler = Butler::start(&config_budget(&fake.url(), "", 30));
    let mark = butler.log_mark();
    // Hidden usage: butler holds each event until its end, which comes in the same chunk.
    let body =
        br#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
    let mut stream = open(&butler, "/v1/chat/completions", body);
    assert_eq!(stream.status, 200);
    for k in 0..30 {
        let (data, _) = stream.next_sse_data(WAIT).expect("a chunk");
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(chunk["choices"][0]["delta"]["content"], format!("tok{k}"));
    }
    stream.disconnect();
    assert!(fake.wait_client_gone(WAIT).is_some());
    let line = response_line(&butler, mark, "/v1/chat/completions");
    // ⌈5 / 4⌉ = 2 prompt tokens.
    assert_eq!(charged(&line), (Some(2), Some(30), Some(true)), "{line}");
    assert_eq!(line["error"], "client closed");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 32);
    assert_error(&chat(&butler), 429, "token budget exceeded");
}

/// A client that leaves before the answer starts (a model loading) is charged its prompt: the
/// request reached Ollama, which may have evaluated it.
#[test]
fn a_client_leaving_before_the_answer_is_charged_its_prompt() {
    let fake = FakeOllama::start_with(Behavior {
        first_byte_delay: std::time::Duration::from_secs(3600),
        ..Behavior::default()
    });
    let butler = Butler::start(&config_budget(&fake.url(), "", 1000));
    let mark = butler.log_mark();
    let auth = format!("Bearer {KEY}");
    let body = br#"{"model":"llama3.2","prompt":"abcdefghijklm"}"#;
    let raw = support::build_request(
        butler.addr(),
        "POST",
        "/api/generate",
        &[("Authorization", &auth)],
        body,
        true,
    );
    let mut conn = support::RawConn::connect(butler.addr());
    conn.write(&raw).unwrap();
    assert!(fake.wait_for_requests(1, WAIT));
    drop(conn);
    let line = response_line(&butler, mark, "/api/generate");
    // ⌈13 / 4⌉ = 4.
    assert_eq!(charged(&line), (Some(4), Some(0), Some(true)), "{line}");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 4);
}

/// Streamed `/v1/completions` is charged: butler asks for the usage and, for a client that did
/// not, hides it — the zero usage Ollama puts on every chunk and the final `choices: []` chunk —
/// so the client gets exactly the bytes Ollama sends without `include_usage`. A client that
/// asked gets Ollama's stream untouched.
#[test]
fn streamed_completions_are_charged_and_the_usage_hidden() {
    let fake = FakeOllama::start();
    let butler = Butler::start(&config_budget(&fake.url(), "", 1000));
    let plain = br#"{"model":"llama3.2","prompt":"hi","stream":true}"#;
    let direct = request(fake.addr(), "POST", "/v1/completions", &[], plain);
    assert_eq!(direct.status, 200);
    assert!(!direct.body_str().contains("usage"), "{}", direct.body_str());

    let mark = butler.log_mark();
    let mut stream = open(&butler, "/v1/completions", plain);
    assert_eq!(stream.status, 200);
    let body = stream.read_to_end(WAIT);
    assert!(stream.ended_cleanly());
    assert!(
        body == direct.body,
        "through butler: {:?}\ndirect: {:?}",
        String::from_utf8_lossy(&body),
        direct.body_str()
    );
    let seen = fake.last_request().unwrap().json();
    assert_eq!(seen["stream_options"], json!({"include_usage": true}));
    let line = response_line(&butler, mark, "/v1/completions");
    assert_eq!(charged(&line), (Some(5), Some(3), None), "{line}");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 8);

    let asked = br#"{"model":"llama3.2","prompt":"hi","stream":true,"stream_options":{"include_usage":true}}"#;
    let direct = request(fake.addr(), "POST", "/v1/completions", &[], asked);
    let text = direct.body_str();
    assert!(text.contains(r#""choices":[],"#), "{text}");
    assert!(text.contains(r#""usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}"#));
    let mut stream = open(&butler, "/v1/completions", asked);
    let body = stream.read_to_end(WAIT);
    assert!(body == direct.body, "{:?}", String::from_utf8_lossy(&body));
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 16);
}

/// `/v1/messages` is charged from `message_delta` (`input_tokens` + `output_tokens`), not from
/// `message_start`, where Ollama puts its own estimate (50 here). A stream cut after
/// `message_start` has no counts and is charged an estimate, not message_start's 50.
#[test]
fn messages_streams_are_charged_from_message_delta() {
    let fake = FakeOllama::start_with(Behavior {
        message_start_input_tokens: Some(50),
        ..Behavior::default()
    });
    let butler = Butler::start(&config_budget(&fake.url(), "", 1000));
    let body = br#"{"model":"llama3.2","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hello world!"}]}"#;
    let mark = butler.log_mark();
    let mut stream = open(&butler, "/v1/messages", body);
    let text = String::from_utf8(stream.read_to_end(WAIT)).unwrap();
    assert!(text.contains(r#""input_tokens":50"#), "{text}");
    let line = response_line(&butler, mark, "/v1/messages");
    assert_eq!(charged(&line), (Some(5), Some(3), None), "{line}");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 8);

    fake.update_behavior(|b| b.drop_after_tokens = Some(2));
    let mark = butler.log_mark();
    let mut stream = open(&butler, "/v1/messages", body);
    let text = String::from_utf8(stream.read_to_end(WAIT)).unwrap();
    assert!(text.contains("message_start") && !text.contains("message_delta"), "{text}");
    let line = response_line(&butler, mark, "/v1/messages");
    // ⌈12 / 4⌉ = 3 prompt tokens, 2 content deltas.
    assert_eq!(charged(&line), (Some(3), Some(2), Some(true)), "{line}");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 13);
}

/// `/api/embeddings` reports no counts: it is charged ⌈prompt bytes / 4⌉, marked as an estimate.
/// An error answer without counts costs nothing.
#[test]
fn legacy_embeddings_are_charged_an_estimate() {
    let fake = FakeOllama::start();
    let butler = Butler::start(&config_budget(&fake.url(), "", 1000));
    let auth = format!("Bearer {KEY}");
    let body = br#"{"model":"all-minilm","prompt":"abcdefghij"}"#;
    let mark = butler.log_mark();
    let r = request(butler.addr(), "POST", "/api/embeddings", &[("Authorization", &auth)], body);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"embedding": [0.1, 0.2, 0.3]}));
    let line = response_line(&butler, mark, "/api/embeddings");
    assert_eq!(charged(&line), (Some(3), Some(0), Some(true)), "{line}");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 3);

    fake.update_behavior(|b| b.fail_status = Some(500));
    let mark = butler.log_mark();
    let r = request(butler.addr(), "POST", "/api/embeddings", &[("Authorization", &auth)], body);
    assert_eq!(r.status, 500);
    let line = response_line(&butler, mark, "/api/embeddings");
    assert_eq!(charged(&line), (None, None, None), "{line}");
    assert_eq!(usage(&butler)["tokens"]["minute"]["used"], 3);
}
