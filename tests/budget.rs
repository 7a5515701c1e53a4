//! Usage accounting and token budgets (SPEC §9, §10): token counts read from what Ollama
//! reports, charged after the response, budgets refusing new inference requests, the usage
//! chunk butler asks for on a client's behalf hidden from it, `/butler/usage`, `state_file`.

mod support;

use serde_json::Value;
use support::setup::{WAIT, assert_error};
use support::{Butler, FakeOllama, StreamingResponse, TempDir, get, request};

const KEY: &str = "sk-budget-1-0a1b2c3d4e";

fn config(upstream: &str, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"{upstream}\"\n{extra}clients:\n  - name: b\n    \
         key: \"{KEY}\"\n    allow_models: [\"*\"]\n    token_budget: {{ per_minute: 10 }}\n"
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
