//! Body inspection and policy: never panics, and whatever the bytes, a body
//! that is admitted for a subject without rights never runs a denied model,
//! never unloads a model, renders a hidden prompt, searches the web or sets a
//! runner option, carries no unbounded generation and no prompt text its
//! patterns match — checked on butler's re-reading of what is forwarded and
//! against an independent reading (serde_json's, which keeps the last
//! duplicate; butler refuses duplicates, so both must agree).
//!
//! butler reads bodies with its own streaming reader (`jsonscan`): it must
//! accept and refuse exactly what serde_json (into butler's tree, refusing
//! folding duplicates) does, for the same reason; and an edit, spliced into
//! the original bytes, must give the same JSON value as the edit made on
//! serde_json's reading, with everything butler read unchanged.
#![no_main]
use butler::inspect::{Kind, Limit, include_usage, inject_predict, inspect, key_is, parse_any};
use butler::jsonscan;
use std::sync::Arc;

use butler::policy::model::{ModelAcl, ModelName, Pattern};
use butler::policy::{Grant, Policy, PromptFilter};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const KINDS: [Kind; 8] = [
    Kind::OllamaChat,
    Kind::OllamaGenerate,
    Kind::OllamaEmbed,
    Kind::OpenAiGenerate,
    Kind::Responses,
    Kind::Messages,
    Kind::Copy,
    Kind::Create,
];
const RUNNER_OPTIONS: [&str; 7] =
    ["num_gpu", "main_gpu", "num_batch", "use_mmap", "num_thread", "numa", "low_vram"];
/// The subject's one prompt pattern.
const BANNED: &str = "evil";

/// A top-level field as Go would find it, ASCII folding only (a weaker
/// oracle than butler's, never a stronger one).
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// No object key anywhere contains the banned text (keys have no exemption).
fn keys_clean(v: &Value) -> bool {
    match v {
        Value::Object(map) => map.iter().all(|(k, v)| !k.contains(BANNED) && keys_clean(v)),
        Value::Array(items) => items.iter().all(keys_clean),
        _ => true,
    }
}

/// The edit butler makes, made on serde_json's reading instead: the cap where the route
/// reads it (any folding variant replaced), `stream_options.include_usage: true`.
fn edited(kind: Kind, mut json: Value, cap: Option<u64>, usage: bool) -> Value {
    let Some(top) = json.as_object_mut() else { return json };
    if let Some(cap) = cap {
        let field = match kind {
            Kind::OllamaChat | Kind::OllamaGenerate => None,
            Kind::OpenAiGenerate | Kind::Messages => Some("max_tokens"),
            _ => Some("max_output_tokens"),
        };
        match field {
            Some(name) => {
                top.retain(|k, _| !key_is(k, name));
                top.insert(name.into(), cap.into());
            }
            None => {
                let key = top.keys().find(|k| key_is(k, "options")).cloned();
                match key.as_ref().and_then(|k| top.get_mut(k)) {
                    Some(Value::Object(options)) => {
                        options.retain(|k, _| !key_is(k, "num_predict"));
                        options.insert("num_predict".into(), cap.into());
                    }
                    Some(slot) => *slot = serde_json::json!({ "num_predict": cap }),
                    None => {
                        top.insert("options".into(), serde_json::json!({ "num_predict": cap }));
                    }
                }
            }
        }
    }
    if usage {
        let key = top.keys().find(|k| key_is(k, "stream_options")).cloned();
        match key.as_ref().and_then(|k| top.get_mut(k)) {
            Some(Value::Object(options)) => {
                options.retain(|k, _| !key_is(k, "include_usage"));
                options.insert("include_usage".into(), true.into());
            }
            Some(slot) => *slot = serde_json::json!({ "include_usage": true }),
            None => {
                top.insert("stream_options".into(), serde_json::json!({ "include_usage": true }));
            }
        }
    }
    json
}

fuzz_target!(|data: &[u8]| {
    // The streaming reader accepts and refuses exactly what serde_json does.
    let theirs = parse_any(data).map(|_| ());
    let ours = jsonscan::validate(data);
    assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(data));

    let acl =
        ModelAcl::new(vec![Pattern::parse("*").unwrap()], vec![Pattern::parse("denied").unwrap()]);
    let policy = Grant::single(Arc::new(Policy {
        models: acl,
        max_ctx: Some(4096),
        max_predict: Some(512),
        prompts: PromptFilter::new(vec![BANNED.into()]).unwrap(),
        ..Policy::default()
    }));
    for kind in KINDS {
        let Ok(mut request) = inspect(kind, data) else { continue };
        let mut bytes = 0;
        request.for_each_text(|t| bytes += t.len());
        let Ok(verdict) = policy.judge(&request) else { continue };
        let cap =
            verdict.inject_predict.filter(|&cap| inject_predict(kind, &mut request.body, cap));
        let usage = kind == Kind::OpenAiGenerate && include_usage(&mut request.body);
        let forwarded =
            if cap.is_some() || usage { request.body.to_bytes() } else { data.to_vec() };
        // What is forwarded is still one object that names no denied model
        // and does nothing the subject has no right to.
        let again = inspect(kind, &forwarded).expect("forwarded body re-inspects");
        // The same facts, but for the edit.
        assert_eq!(again.models, request.models);
        assert_eq!(again.num_ctx, request.num_ctx);
        assert_eq!(again.keep_alive, request.keep_alive);
        assert_eq!(
            (again.unload, again.debug_render_only, again.web_search, again.context),
            (request.unload, request.debug_render_only, request.web_search, request.context)
        );
        assert_eq!(again.runner_option, request.runner_option);
        if cap.is_none() {
            assert_eq!(again.predict, request.predict);
        }
        let mut texts = (Vec::new(), Vec::new());
        request.for_each_text(|t| texts.0.push(t.into_owned()));
        again.for_each_text(|t| texts.1.push(t.into_owned()));
        if !usage {
            assert_eq!(texts.0, texts.1, "an edit adds no prompt text");
        }
        // The splice is the edit on serde_json's reading, and nothing else.
        let original: Value = serde_json::from_slice(data).expect("serde_json reads it");
        let spliced: Value = serde_json::from_slice(&forwarded).expect("valid JSON forwarded");
        assert_eq!(spliced, edited(kind, original, cap, usage));
        for name in &again.models {
            let m = ModelName::parse(name).expect("admitted names parse");
            assert!(policy.permits(&m));
        }
        assert!(!again.unload && !again.debug_render_only && !again.web_search);
        assert!(!again.context);
        if kind.is_inference() {
            assert_eq!(again.runner_option, None);
        }
        if kind.is_inference() || kind == Kind::Create {
            assert!(!again.scan(|t| t.contains(BANNED)), "a banned text was admitted");
        }
        if kind.is_inference() && !matches!(kind, Kind::OllamaEmbed) {
            assert!(again.predict_effective, "no honoured limit after injection");
            match again.predict {
                Some(Limit::Value(n)) => assert!(n.as_f64() <= 512.0),
                Some(Limit::Unbounded(_)) => panic!("unbounded generation admitted"),
                None => {}
            }
        }

        let Ok(json @ Value::Object(_)) = serde_json::from_slice::<Value>(&forwarded) else {
            continue;
        };
        // (`/api/copy` reads `source` and `destination`; a `model` there is ignored.)
        if let Some(s) = field(&json, "model").and_then(Value::as_str).filter(|s| !s.is_empty())
            && kind != Kind::Copy
        {
            assert!(ModelName::parse(s).is_ok_and(|m| policy.permits(&m)));
        }
        assert_ne!(field(&json, "_debug_render_only"), Some(&Value::Bool(true)));
        if kind.is_inference() {
            if let Some(Value::Object(options)) = field(&json, "options") {
                for name in RUNNER_OPTIONS {
                    assert!(options.get(name).is_none_or(Value::is_null), "{name} admitted");
                }
            }
            assert!(field(&json, "shift").is_none_or(Value::is_null), "shift admitted");
            assert!(keys_clean(&json), "a banned key was admitted");
        }
        if matches!(kind, Kind::Responses | Kind::Messages)
            && let Some(Value::Array(tools)) = field(&json, "tools")
        {
            for tool in tools {
                let t = field(tool, "type").and_then(Value::as_str).unwrap_or("");
                assert!(!t.starts_with("web_search"), "web search admitted");
            }
        }
        if matches!(kind, Kind::OllamaChat | Kind::OllamaGenerate)
            && let Some(ka) = field(&json, "keep_alive")
        {
            let zero = ka.as_f64() == Some(0.0) || matches!(ka.as_str(), Some("0" | "0s"));
            let empty = |name| match field(&json, name) {
                None | Some(Value::Null) => true,
                Some(Value::String(s)) => s.is_empty(),
                Some(Value::Array(a)) => a.is_empty(),
                Some(_) => false,
            };
            let prompt = if kind == Kind::OllamaChat { "messages" } else { "prompt" };
            assert!(!(zero && empty(prompt)), "an unload was admitted");
        }
    }
});
