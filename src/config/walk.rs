//! A strict reader over a parsed YAML tree that collects every error with its
//! path instead of stopping at the first one (SPEC §4: "all errors are reported
//! at once, each with its path").
//!
//! serde's `deny_unknown_fields` stops at the first problem and cannot run
//! interpolation after parsing, so the schema is read by hand through [`Obj`].

use serde_yaml::{Mapping, Value};

/// Collected configuration errors, each already prefixed with its path.
#[derive(Default)]
pub struct Errors {
    pub list: Vec<String>,
}

impl Errors {
    pub fn push(&mut self, path: &str, msg: impl std::fmt::Display) {
        if path.is_empty() {
            self.list.push(msg.to_string());
        } else {
            self.list.push(format!("{path}: {msg}"));
        }
    }
}

/// Environment lookup used for `${VAR}` expansion; injectable for tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// One YAML mapping being read. Every key that is read is remembered, and
/// [`Obj::finish`] reports the rest as unknown fields.
pub struct Obj<'a> {
    map: Option<&'a Mapping>,
    path: String,
    seen: Vec<&'static str>,
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

impl<'a> Obj<'a> {
    /// Reads `value` as a mapping; anything else is an error (and yields an
    /// empty object so the caller can carry on collecting errors).
    pub fn new(value: &'a Value, path: &str, errs: &mut Errors) -> Obj<'a> {
        let map = match value {
            Value::Mapping(m) => Some(m),
            Value::Null => None,
            _ => {
                errs.push(path, "expected a mapping");
                None
            }
        };
        Obj { map, path: path.to_owned(), seen: Vec::new() }
    }

    pub fn field_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The raw value of `key`; YAML `null` counts as absent.
    pub fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        match self.map?.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// A string value, interpolated.
    pub fn string(&mut self, key: &'static str, env: Env, errs: &mut Errors) -> Option<String> {
        let path = self.field_path(key);
        string_value(self.get(key)?, &path, env, errs)
    }

    pub fn bool(&mut self, key: &'static str, env: Env, errs: &mut Errors) -> Option<bool> {
        let path = self.field_path(key);
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.contains("${") => {
                match interpolate(s, &path, env, errs)?.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    other => {
                        errs.push(&path, format!("expected true or false, got {other:?}"));
                        None
                    }
                }
            }
            _ => {
                errs.push(&path, "expected true or false");
                None
            }
        }
    }

    /// A non-negative integer. A string is accepted only when it is an
    /// interpolation (`workers: ${WORKERS:-64}`), since YAML cannot type it.
    pub fn uint(&mut self, key: &'static str, env: Env, errs: &mut Errors) -> Option<u64> {
        let path = self.field_path(key);
        match self.get(key)? {
            Value::Number(n) => match n.as_u64() {
                Some(v) => Some(v),
                None => {
                    errs.push(&path, "expected a non-negative integer");
                    None
                }
            },
            Value::String(s) if s.contains("${") => {
                let s = interpolate(s, &path, env, errs)?;
                match s.trim().parse::<u64>() {
                    Ok(v) => Some(v),
                    Err(_) => {
                        errs.push(&path, format!("expected a non-negative integer, got {s:?}"));
                        None
                    }
                }
            }
            _ => {
                errs.push(&path, "expected a non-negative integer");
                None
            }
        }
    }

    /// A sequence; each element is handed to `each` with its indexed path.
    pub fn list(
        &mut self,
        key: &'static str,
        errs: &mut Errors,
        mut each: impl FnMut(&'a Value, String, &mut Errors),
    ) {
        let path = self.field_path(key);
        match self.get(key) {
            None => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    each(item, format!("{path}[{i}]"), errs);
                }
            }
            Some(_) => errs.push(&path, "expected a list"),
        }
    }

    /// A list of strings, each interpolated and paired with its path.
    pub fn strings(
        &mut self,
        key: &'static str,
        env: Env,
        errs: &mut Errors,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.list(key, errs, |item, path, errs| {
            if let Some(s) = string_value(item, &path, env, errs) {
                out.push((s, path));
            }
        });
        out
    }

    /// Reports every key that was not read as `unknown field "x"`.
    pub fn finish(self, errs: &mut Errors) {
        let Some(map) = self.map else { return };
        for key in map.keys() {
            match key {
                Value::String(k) if self.seen.contains(&k.as_str()) => {}
                Value::String(k) => errs.push(&self.path, format!("unknown field \"{k}\"")),
                other => errs.push(&self.path, format!("unexpected key {other:?}")),
            }
        }
    }
}

/// Reads a scalar string value, interpolated. Numbers are not silently turned
/// into strings: `key: 1234` is an error, write `key: "1234"`.
pub fn string_value(value: &Value, path: &str, env: Env, errs: &mut Errors) -> Option<String> {
    match value {
        Value::String(s) => interpolate(s, path, env, errs),
        _ => {
            errs.push(path, "expected a string");
            None
        }
    }
}

fn interpolate(s: &str, path: &str, env: Env, errs: &mut Errors) -> Option<String> {
    match super::interp::expand(s, env) {
        Ok(v) => Some(v),
        Err(e) => {
            errs.push(path, e);
            None
        }
    }
}
