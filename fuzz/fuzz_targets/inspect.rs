//! Body inspection and policy: never panics, and whatever the bytes, a body
//! that is admitted never runs a denied model — checked against an
//! independent reading of the model field (serde_json's, which keeps the last
//! duplicate; butler refuses duplicates, so both must agree).
#![no_main]
use butler::inspect::{Kind, inspect};
use std::sync::Arc;

use butler::policy::{Grant, Policy};
use butler::policy::model::{ModelAcl, ModelName, Pattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let acl = ModelAcl::new(
        vec![Pattern::parse("*").unwrap()],
        vec![Pattern::parse("denied").unwrap()],
    );
    let policy = Grant::single(Arc::new(Policy {
        models: acl,
        max_ctx: Some(4096),
        max_predict: Some(512),
        ..Policy::default()
    }));
    for kind in [Kind::OllamaGenerate, Kind::OpenAiGenerate, Kind::Messages, Kind::Copy] {
        let Ok(mut request) = inspect(kind, data) else { continue };
        let Ok(verdict) = policy.judge(&request) else { continue };
        let forwarded = match verdict.inject_predict {
            Some(cap) if butler::inspect::inject_predict(kind, &mut request.body, cap) => {
                request.body.to_bytes()
            }
            _ => data.to_vec(),
        };
        // What is forwarded is still one object that names no denied model.
        let again = inspect(kind, &forwarded).expect("forwarded body re-inspects");
        for name in &again.models {
            let m = ModelName::parse(name).expect("admitted names parse");
            assert!(policy.permits(&m));
        }
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&forwarded) {
            for (k, v) in map {
                if k.eq_ignore_ascii_case("model") {
                    if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
                        assert!(ModelName::parse(s).is_ok_and(|m| policy.permits(&m)));
                    }
                }
            }
        }
    }
});
