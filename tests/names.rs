//! Model names as Ollama resolves them (SPEC §7.2), cloud models (§7.2, §8 listings) and the
//! `/api/create` parameter caps (§7.3), against the real binary in front of a fake Ollama.
//!
//! Every refusal is checked for its exact status and body and for nothing having reached the
//! upstream; every admission by what the upstream received.

mod ollama_ref;
mod support;

use std::net::SocketAddr;

use serde_json::{Value, json};
use support::setup::{WAIT, assert_error};
use support::{Behavior, Butler, Canned, FakeOllama, Response, request};

/// `allow_models: ["*"]`, `deny_models: [llama3.3]`, `allow_manage`.
const DENY_FAMILY: &str = "sk-names-family-1a2b3c4d5e6f";
/// `allow_models: ["*"]`, `deny_models: ["llama3.3:70b"]`, `allow_manage`.
const DENY_TAG: &str = "sk-names-tag-6f5e4d3c2b1a";
/// `allow_models: ["*"]`, `deny_models: ["llama3.2:latest"]`, `allow_manage`.
const DENY_LATEST: &str = "sk-names-latest-0f1e2d3c4b5a";
/// `allow_models: ["*"]`, `allow_manage`, no `allow_cloud`.
const NO_CLOUD: &str = "sk-names-nocloud-9a8b7c6d5e4f";
/// `allow_models: [gpt-oss]`, `allow_manage`, no `allow_cloud`.
const GPT_ONLY: &str = "sk-names-gptonly-4e5f6a7b8c9d";
/// `allow_models: ["*"]`, `deny_models: [llama3.3]`, `allow_cloud`, `allow_manage`.
const CLOUD: &str = "sk-names-cloud-3c4d5e6f7a8b";
/// `allow_models: ["*"]`, `allow_cloud`: every model, cloud ones included.
const EVERYTHING: &str = "sk-names-everything-7b8c9d0e1f2a";
/// `allow_models: ["*"]`, `allow_manage`, `max_ctx: 4096`, `max_predict: 512`.
const CAPPED: &str = "sk-names-capped-2a3b4c5d6e7f";

fn config(upstream: &str) -> String {
    format!(
        r#"listen: "127.0.0.1:0"
upstream: "{upstream}"
clients:
  - name: deny-family
    key: "{DENY_FAMILY}"
    allow_models: ["*"]
    deny_models: ["llama3.3"]
    allow_manage: true
  - name: deny-tag
    key: "{DENY_TAG}"
    allow_models: ["*"]
    deny_models: ["llama3.3:70b"]
    allow_manage: true
  - name: deny-latest
    key: "{DENY_LATEST}"
    allow_models: ["*"]
    deny_models: ["llama3.2:latest"]
    allow_manage: true
  - name: no-cloud
    key: "{NO_CLOUD}"
    allow_models: ["*"]
    allow_manage: true
  - name: gpt-only
    key: "{GPT_ONLY}"
    allow_models: ["gpt-oss"]
    allow_manage: true
  - name: cloud
    key: "{CLOUD}"
    allow_models: ["*"]
    deny_models: ["llama3.3"]
    allow_cloud: true
    allow_manage: true
  - name: everything
    key: "{EVERYTHING}"
    allow_models: ["*"]
    allow_cloud: true
  - name: capped
    key: "{CAPPED}"
    allow_models: ["*"]
    allow_manage: true
    max_ctx: 4096
    max_predict: 512
"#
    )
}

fn start(fake: &FakeOllama) -> Butler {
    Butler::start(&config(&fake.url()))
}

fn call(addr: SocketAddr, key: &str, method: &str, path: &str, body: &[u8]) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json"));
    }
    request(addr, method, path, &headers, body)
}

/// The nine inference routes of SPEC §6.
const INFERENCE: [&str; 9] = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
];

const MANAGEMENT: [&str; 5] = ["/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy"];

/// A typical body for an inference route.
fn inference_body(path: &str, model: &str) -> Value {
    let messages = json!([{"role": "user", "content": "hi"}]);
    match path {
        "/api/chat" => json!({"model": model, "messages": messages, "stream": false}),
        "/api/generate" => json!({"model": model, "prompt": "hi", "stream": false}),
        "/api/embed" | "/v1/embeddings" => json!({"model": model, "input": "hi"}),
        "/api/embeddings" => json!({"model": model, "prompt": "hi"}),
        "/v1/chat/completions" => json!({"model": model, "messages": messages}),
        "/v1/completions" => json!({"model": model, "prompt": "hi"}),
        "/v1/responses" => json!({"model": model, "input": "hi"}),
        "/v1/messages" => json!({"model": model, "max_tokens": 64, "messages": messages}),
        other => panic!("not an inference route: {other}"),
    }
}

/// The other models of a create or copy: permitted for every client here.
const COMPANION: &str = "gpt-oss:120b";
const COMPANION_NEW: &str = "gpt-oss:mine";

/// Every request naming `model` that SPEC §7.2 puts under the model rules: the inference
/// routes, `/api/show`, `GET /v1/models/{model}`, and management (pull, push, delete, create
/// `model` and `from`, copy `source` and `destination`). (method, path, body)
fn naming_requests(model: &str) -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = INFERENCE
        .iter()
        .map(|p| ("POST", p.to_string(), inference_body(p, model).to_string().into_bytes()))
        .collect();
    let body = |v: Value| v.to_string().into_bytes();
    out.extend([
        ("POST", "/api/show".into(), body(json!({"model": model}))),
        ("POST", "/api/show".into(), body(json!({"name": model}))),
        ("POST", "/api/pull".into(), body(json!({"model": model}))),
        ("POST", "/api/push".into(), body(json!({"model": model}))),
        ("DELETE", "/api/delete".into(), body(json!({"model": model}))),
        ("POST", "/api/create".into(), body(json!({"model": COMPANION_NEW, "from": model}))),
        ("POST", "/api/create".into(), body(json!({"model": model, "from": COMPANION}))),
        ("POST", "/api/copy".into(), body(json!({"source": model, "destination": COMPANION_NEW}))),
        ("POST", "/api/copy".into(), body(json!({"source": COMPANION, "destination": model}))),
    ]);
    // The route takes one path segment (Ollama's too), without white space.
    if !model.contains(|c: char| c.is_whitespace() || c == '/') {
        out.push(("GET", format!("/v1/models/{model}"), Vec::new()));
    }
    out
}

/// Asserts that every request naming `model` is refused with `status` and `msg` for `key`,
/// and that none reached the upstream.
#[track_caller]
fn assert_all_refused(
    fake: &FakeOllama,
    addr: SocketAddr,
    key: &str,
    model: &str,
    status: u16,
    msg: &str,
) {
    for (method, path, body) in naming_requests(model) {
        let before = fake.request_count();
        let response = call(addr, key, method, &path, &body);
        assert_eq!(
            (response.status, response.body_str()),
            (status, format!("{{\"error\":\"{msg}\"}}\n")),
            "{method} {path} {}",
            String::from_utf8_lossy(&body)
        );
        assert_error(&response, status, msg);
        assert_eq!(
            fake.request_count(),
            before,
            "{method} {path}: a refused request reached the upstream: {:?}",
            fake.last_request()
        );
    }
}

/// Asserts that every request naming `model` reaches the upstream unchanged for `key` (the
/// fake's answer, a 404 for a model it does not list included, comes back).
#[track_caller]
fn assert_all_forwarded(fake: &FakeOllama, addr: SocketAddr, key: &str, model: &str) {
    for (method, path, body) in naming_requests(model) {
        let before = fake.request_count();
        let response = call(addr, key, method, &path, &body);
        assert!(response.header("x-request-id").is_some());
        assert_eq!(fake.request_count(), before + 1, "{method} {path}: not forwarded once");
        let seen = fake.last_request().expect("forwarded");
        assert_eq!(seen.path, path);
        assert_eq!(seen.body, body, "{method} {path}: the body was changed");
    }
}

// ---------------------------------------------------------------------------------------------
// Source suffixes (finding 1)
// ---------------------------------------------------------------------------------------------

#[test]
fn a_source_suffix_does_not_slip_past_a_deny_list() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let addr = butler.addr();
    // Ollama runs each of these as the denied model: it trims the name and removes one
    // trailing `:local` (any case) before the lookup.
    for (key, model) in [
        (DENY_FAMILY, "llama3.3:70b:local"),
        (DENY_FAMILY, "llama3.3:local"),
        (DENY_FAMILY, "Library/LLAMA3.3:Local"),
        (DENY_TAG, "llama3.3:70b:local"),
        (DENY_TAG, "llama3.3:70b:LOCAL"),
        (DENY_TAG, " llama3.3:70b: local\n"),
        (DENY_LATEST, "llama3.2:local"),
        (DENY_LATEST, "llama3.2:latest:local"),
        (DENY_LATEST, "\tllama3.2 "),
    ] {
        assert_all_refused(&fake, addr, key, model, 403, "model not allowed");
    }
    // The same suffixes on permitted models go through untouched: Ollama does the stripping.
    for (key, model) in [
        (DENY_LATEST, "llama3.2:1b:local"),
        (DENY_TAG, "llama3.3:8b:local"),
        (DENY_FAMILY, " qwen2.5:7b:Local "),
    ] {
        assert_all_forwarded(&fake, addr, key, model);
    }
}

#[test]
fn a_scheme_or_a_second_suffix_makes_an_invalid_name() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let addr = butler.addr();
    // Ollama resolves `<any scheme>://registry.ollama.ai/library/x` to x; SPEC refuses them all,
    // and a suffix under a suffix (Ollama refuses those too).
    for model in [
        "x://registry.ollama.ai/library/llama3.2:3b",
        "https://registry.ollama.ai/library/llama3.2",
        "http://registry.ollama.ai/library/qwen2.5:7b",
        "HTTPS://registry.ollama.ai/library/llama3.2:3b",
        "qwen2.5:cloud:local",
        "qwen2.5:7b-cloud:cloud",
        "qwen2.5:local:local",
    ] {
        for key in [EVERYTHING, CLOUD] {
            for (method, path, body) in naming_requests(model) {
                if key == EVERYTHING && MANAGEMENT.contains(&path.as_str()) {
                    continue; // no allow_manage: the route class is checked first
                }
                let before = fake.request_count();
                let response = call(addr, key, method, &path, &body);
                assert_error(&response, 400, "bad request: invalid model name");
                assert_eq!(fake.request_count(), before, "{method} {path} {model}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud models (finding 2)
// ---------------------------------------------------------------------------------------------

const CLOUD_NAMES: [&str; 6] = [
    "gpt-oss:20b-cloud",
    "gpt-oss:20b:cloud",
    "GPT-OSS:120B-CLOUD",
    "gpt-oss:Cloud",
    " gpt-oss:20b-cloud ",
    "registry.ollama.ai/library/gpt-oss:20b:cloud",
];

#[test]
fn cloud_models_are_refused_without_allow_cloud_whatever_the_lists_say() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let addr = butler.addr();
    for model in CLOUD_NAMES {
        // `allow_models: ["*"]` and `["gpt-oss"]` both cover the name without its suffix.
        assert_all_refused(&fake, addr, NO_CLOUD, model, 403, "cloud models not allowed");
        assert_all_refused(&fake, addr, GPT_ONLY, model, 403, "cloud models not allowed");
    }
    // Checked before the lists: a cloud model the lists deny is refused as a cloud model.
    assert_all_refused(&fake, addr, GPT_ONLY, "qwen3:cloud", 403, "cloud models not allowed");
    // And after the name: an invalid name is 400 first.
    let before = fake.request_count();
    let body = json!({"source": "gpt-oss:cloud", "destination": "a b"}).to_string();
    let response = call(addr, NO_CLOUD, "POST", "/api/copy", body.as_bytes());
    assert_error(&response, 400, "bad request: invalid model name");
    // A model created to run on another host is a cloud model whatever its name.
    let body = json!({"model": "mine", "from": "gpt-oss:20b", "remote_host": "https://ollama.com"});
    let response = call(addr, NO_CLOUD, "POST", "/api/create", body.to_string().as_bytes());
    assert_error(&response, 403, "cloud models not allowed");
    assert_eq!(fake.request_count(), before);

    // The local models of the same names pass (positive control).
    assert_all_forwarded(&fake, addr, GPT_ONLY, "gpt-oss:20b");
    assert_all_forwarded(&fake, addr, NO_CLOUD, "gpt-oss:20b:local");
}

#[test]
fn with_allow_cloud_the_lists_decide_on_the_name_without_its_suffix() {
    let fake = FakeOllama::start_with(Behavior {
        models: vec!["gpt-oss:20b-cloud".into(), "llama3.2:latest".into()],
        ..Behavior::default()
    });
    let butler = start(&fake);
    let addr = butler.addr();
    for model in CLOUD_NAMES {
        assert_all_forwarded(&fake, addr, CLOUD, model);
    }
    let body = json!({"model": "mine", "from": "gpt-oss:20b", "remote_host": "https://ollama.com"});
    let before = fake.request_count();
    let response = call(addr, CLOUD, "POST", "/api/create", body.to_string().as_bytes());
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert_eq!(fake.request_count(), before + 1);
    // The log names the model as Ollama resolves it, marked as a cloud model.
    let auth = format!("Bearer {CLOUD}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("X-Request-Id", "cloud-1"),
    ];
    let body = inference_body("/api/chat", "GPT-OSS:20b-cloud").to_string();
    assert_eq!(request(addr, "POST", "/api/chat", &headers, body.as_bytes()).status, 200);
    let line = butler
        .wait_log(|v| v["msg"] == "response" && v["request_id"] == "cloud-1", WAIT)
        .unwrap_or_else(|| panic!("no response line\n{}", butler.output()));
    assert_eq!(line["model"], "gpt-oss:20b:cloud", "{line}");
    // `llama3.3:70b-cloud` is `llama3.3:70b` for matching: the deny list catches it.
    for model in ["llama3.3:70b-cloud", "llama3.3:cloud", "LLAMA3.3:70B:CLOUD"] {
        assert_all_refused(&fake, addr, CLOUD, model, 403, "model not allowed");
    }
}

/// A listing with a local model, a cloud model by name, a local name for a remote model
/// (`remote_host` and `remote_model`, as `ollama create --from x:cloud` makes), and entries
/// carrying only one of the two fields.
fn cloudy_listing_fake() -> FakeOllama {
    let fake = FakeOllama::start();
    let entry = |name: &str, extra: Value| {
        let mut e = json!({"name": name, "model": name, "size": 1000, "digest": "0123"});
        if let (Some(e), Value::Object(extra)) = (e.as_object_mut(), extra) {
            e.extend(extra);
        }
        e
    };
    let models = json!([
        entry("llama3.2:latest", json!({})),
        entry("gpt-oss:20b-cloud", json!({})),
        entry("qwen3-coder:480b-cloud", json!({})),
        entry(
            "mine:latest",
            json!({"remote_host": "https://ollama.com:443", "remote_model": "gpt-oss:20b"})
        ),
        entry("host-only:latest", json!({"remote_host": "https://ollama.com:443"})),
        entry("model-only:latest", json!({"remote_model": "gpt-oss:120b"})),
        entry("llama3.3:70b", json!({})),
    ]);
    fake.set_route("GET", "/api/tags", Canned::json(200, &json!({"models": models})));
    fake.set_route("GET", "/api/ps", Canned::json(200, &json!({"models": models})));
    let data: Vec<Value> =
        ["llama3.2:latest", "gpt-oss:20b-cloud", "qwen3-coder:480b-cloud", "mine:latest"]
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": 1, "owned_by": "library"}))
            .collect();
    fake.set_route(
        "GET",
        "/v1/models",
        Canned::json(200, &json!({"object": "list", "data": data})),
    );
    fake
}

fn listed(response: &Response) -> Vec<String> {
    let v = response.json();
    let (list, key) = if v.get("data").is_some() { ("data", "id") } else { ("models", "name") };
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list}: {v}"))
        .iter()
        .map(|e| e[key].as_str().expect("a name").to_string())
        .collect()
}

#[test]
fn listings_hide_cloud_models_from_subjects_without_allow_cloud() {
    let fake = cloudy_listing_fake();
    let butler = start(&fake);
    let addr = butler.addr();
    for path in ["/api/tags", "/api/ps", "/v1/models"] {
        let direct = support::get(fake.addr(), path, &[]);
        assert_eq!(direct.status, 200);
        let ollama = path != "/v1/models";

        // `allow_models: ["*"]` without allow_cloud no longer sees every model.
        let response = call(addr, NO_CLOUD, "GET", path, b"");
        assert_eq!(response.status, 200, "{path}: {}", response.body_str());
        let want: &[&str] = if ollama {
            &["llama3.2:latest", "llama3.3:70b"]
        } else {
            &["llama3.2:latest", "mine:latest"]
        };
        assert_eq!(listed(&response), want, "{path}");
        let response = call(addr, GPT_ONLY, "GET", path, b"");
        assert_eq!(listed(&response), Vec::<String>::new(), "{path}");

        // With allow_cloud the lists decide, on names without their suffix.
        let response = call(addr, CLOUD, "GET", path, b"");
        let want: &[&str] = if ollama {
            &[
                "llama3.2:latest",
                "gpt-oss:20b-cloud",
                "qwen3-coder:480b-cloud",
                "mine:latest",
                "host-only:latest",
                "model-only:latest",
            ]
        } else {
            &["llama3.2:latest", "gpt-oss:20b-cloud", "qwen3-coder:480b-cloud", "mine:latest"]
        };
        assert_eq!(listed(&response), want, "{path}");

        // Every model, cloud ones included: the upstream's bytes, untouched.
        let response = call(addr, EVERYTHING, "GET", path, b"");
        assert_eq!((response.status, &response.body), (200, &direct.body), "{path}");
    }
}

// ---------------------------------------------------------------------------------------------
// /api/create parameters (finding 8)
// ---------------------------------------------------------------------------------------------

#[test]
fn create_parameters_are_capped_like_options() {
    let fake = FakeOllama::start();
    let butler = start(&fake);
    let addr = butler.addr();
    let create = |parameters: Value| {
        let body = json!({"model": "mine", "from": "llama3.2", "parameters": parameters});
        let before = fake.request_count();
        let bytes = body.to_string().into_bytes();
        let response = call(addr, CAPPED, "POST", "/api/create", &bytes);
        (response, fake.request_count() - before, bytes)
    };
    for (parameters, msg) in [
        (json!({"num_ctx": 131072}), "num_ctx 131072 exceeds limit of 4096"),
        (json!({"num_ctx": 8192.0, "temperature": 0.2}), "num_ctx 8192 exceeds limit of 4096"),
        (json!({"num_predict": 100000}), "num_predict 100000 exceeds limit of 512"),
        (json!({"num_predict": -1}), "num_predict -1 exceeds limit of 512"),
        (json!({"num_ctx": "131072"}), "bad request: parameters.num_ctx must be a number"),
        (json!({"num_predict": [1]}), "bad request: parameters.num_predict must be a number"),
        (json!(["num_ctx", 131072]), "bad request: parameters must be an object"),
    ] {
        let (response, reached, _) = create(parameters.clone());
        assert_error(&response, 400, msg);
        assert_eq!(reached, 0, "{parameters}");
    }
    // Within the caps: forwarded as sent, nothing injected.
    for parameters in
        [json!({"num_ctx": 4096, "num_predict": 512, "stop": ["x"]}), json!({}), Value::Null]
    {
        let (response, reached, sent) = create(parameters.clone());
        assert_eq!(response.status, 200, "{parameters}: {}", response.body_str());
        assert_eq!(reached, 1);
        assert_eq!(fake.last_request().unwrap().body, sent, "{parameters}");
    }
    // A manager without caps may create anything.
    let body = json!({"model": "mine", "from": "llama3.2", "parameters": {"num_ctx": 131072}});
    let response = call(addr, DENY_FAMILY, "POST", "/api/create", body.to_string().as_bytes());
    assert_eq!(response.status, 200, "{}", response.body_str());
}

// ---------------------------------------------------------------------------------------------
// Differential: butler's parser against a model of Ollama's (also the `model_name` fuzz target)
// ---------------------------------------------------------------------------------------------

#[test]
fn the_model_of_ollama_agrees_with_ollamas_own_cases() {
    use ollama_ref::{Resolved, resolve};
    let r = |short: &str, cloud: bool| Some(Resolved { short: short.into(), cloud });
    let part80 = "8".repeat(80);
    let part350 = "3".repeat(350);
    let long = format!("{part350}/{part80}/{part80}:{part80}");
    // Facts from Ollama's tests (internal/modelref, types/model).
    let cases = [
        ("gpt-oss:20b:cloud", r("gpt-oss:20b", true)),
        ("gpt-oss:20b-cloud", r("gpt-oss:20b", true)),
        ("qwen3:8b:local", r("qwen3:8b", false)),
        ("llama3.2", r("llama3.2:latest", false)),
        ("my-cloud-model", r("my-cloud-model:latest", false)),
        ("gpt-oss:clod", r("gpt-oss:clod", false)),
        ("gpt-oss:20b:CLOUD", r("gpt-oss:20b", true)),
        ("qwen3:cloud", r("qwen3:latest", true)),
        ("localhost:11434/library/foo:cloud", r("localhost:11434/library/foo:latest", true)),
        ("foo:cloud:local", None),
        ("   ", None),
        ("foo:bar-cloud/baz", None),
        ("scheme://host:port/namespace/model:tag", r("host:port/namespace/model:tag", false)),
        ("host:https/namespace/model:tag", r("host:https/namespace/model:tag", false)),
        ("_why/_the/_lucky:_stiff", r("_why/_the/_lucky:_stiff", false)),
        ("h/nn/mm:t", r("h/nn/mm:t", false)),
        ("registry.ollama.ai/namespace/model:tag", r("namespace/model:tag", false)),
        ("host/library/model:tag", r("host/library/model:tag", false)),
        (long.as_str(), r(&long, false)),
        ("host/name:space/model:tag", None),
        ("-hh/nn/mm:tt", None),
        ("hh/-nn/mm:tt", None),
        ("hh/nn/-mm:tt", None),
        ("hh/nn/mm:-tt", None),
        ("m@d", None),
        ("@t", None),
        ("mm:", None),
        ("/nn/mm", None),
        ("//mm:@", None),
        ("^", None),
        ("00@", None),
        // The issue's own examples.
        ("x://registry.ollama.ai/library/llama3.2:3b", r("llama3.2:3b", false)),
        ("llama3.3:70b:local", r("llama3.3:70b", false)),
        (" llama3.3:70b-cloud\n", r("llama3.3:70b", true)),
        ("x:7b-cloud:cloud", None),
    ];
    for (raw, want) in cases {
        assert_eq!(resolve(raw), want, "{raw:?}");
        ollama_ref::check(raw);
    }
}

#[test]
fn butler_reads_every_short_name_as_ollama_does() {
    // Every string of up to four of these pieces: the characters and words that decide how a
    // name is read, and a few that make it invalid.
    const PIECES: [&str; 20] = [
        "a",
        "B",
        "\u{2009}",
        ":",
        "/",
        "-",
        ".",
        "_",
        "cloud",
        "LOCAL",
        "-Cloud",
        " ",
        "\u{a0}",
        "@",
        "://",
        "é",
        "*",
        "registry.ollama.ai/library/",
        "h:1/",
        "n/",
    ];
    let mut checked = 0;
    let mut stack = vec![(String::new(), 0)];
    while let Some((s, depth)) = stack.pop() {
        ollama_ref::check(&s);
        checked += 1;
        if depth < 4 {
            stack.extend(PIECES.iter().map(|p| (format!("{s}{p}"), depth + 1)));
        }
    }
    assert_eq!(checked, (0..=4).map(|d| PIECES.len().pow(d)).sum::<usize>());
}
