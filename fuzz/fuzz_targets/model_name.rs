//! Model names (SPEC §7.2), differentially: whatever the string, butler resolves it as Ollama
//! does wherever Ollama accepts it (same short form, same cloud flag), refuses it only for
//! the reasons SPEC gives, and a name it accepts is matched by itself as a pattern. The model
//! of Ollama's parser is shared with `tests/names.rs`, where it is checked against Ollama's own
//! test cases. Patterns, glob or not, never panic either.
#![no_main]
use butler::policy::model::{ModelName, Pattern};
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/ollama_ref/mod.rs"]
mod ollama_ref;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    ollama_ref::check(raw);
    if let Ok(pattern) = Pattern::parse(raw) {
        // A glob is matched against the short form: never against more than that.
        for probe in ["llama3.2", "gpt-oss:20b-cloud", "hf.co/org/m:q4"] {
            let name = ModelName::parse(probe).expect("a valid name");
            let _ = pattern.matches(&name);
        }
    }
});
