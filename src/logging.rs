//! Logs on stdout (SPEC §10): one JSON object per line (`time`, `level`,
//! `msg`, then the record's key-values), or plain text through `simplelog`.
//! Values are escaped by the JSON encoder, so a client-supplied path cannot
//! forge a log line. Secrets and prompts are never passed to the logger.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};
use serde_json::{Map, Value as Json};

use crate::config::LogFormat;

/// Installs the global logger. Butler's own records are kept from INFO up;
/// dependencies' only from WARN up (they are noisy and may echo URLs).
pub fn init(format: LogFormat) {
    let logger: Box<dyn Log> = match format {
        LogFormat::Json => Box::new(JsonLogger),
        LogFormat::Text => Box::new(TextLogger {
            inner: simplelog::WriteLogger::new(
                LevelFilter::Info,
                simplelog::ConfigBuilder::new().set_time_format_rfc3339().build(),
                std::io::stdout(),
            ),
        }),
    };
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

/// Logs `msg` with exactly the given fields (absent values are simply not
/// passed), for the per-request audit lines whose fields vary.
pub fn emit(level: Level, msg: &str, fields: &[(&str, Value<'_>)]) {
    let meta = Metadata::builder().level(level).target("butler").build();
    if log::max_level() < level || !log::logger().enabled(&meta) {
        return;
    }
    log::logger().log(
        &Record::builder().args(format_args!("{msg}")).metadata(meta).key_values(&fields).build(),
    );
}

fn wanted(meta: &Metadata) -> bool {
    if meta.target().starts_with("butler") {
        meta.level() <= Level::Info
    } else {
        meta.level() <= Level::Warn
    }
}

struct JsonLogger;

impl Log for JsonLogger {
    fn enabled(&self, meta: &Metadata) -> bool {
        wanted(meta)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = format_json(record);
        line.push('\n');
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stdout().flush();
    }
}

/// One record as a JSON object.
pub fn format_json(record: &Record) -> String {
    let mut obj = Map::new();
    obj.insert("time".into(), Json::String(rfc3339_now()));
    obj.insert("level".into(), Json::String(record.level().as_str().to_owned()));
    obj.insert("msg".into(), Json::String(record.args().to_string()));
    let mut fields = Fields(&mut obj);
    let _ = record.key_values().visit(&mut fields);
    Json::Object(obj).to_string()
}

struct Fields<'a>(&'a mut Map<String, Json>);

/// Fields whose value is already serialised JSON (an array), emitted as
/// JSON rather than as a string: `log::kv` has no array values.
const RAW_JSON_FIELDS: &[&str] = &["prompts"];

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let json = if RAW_JSON_FIELDS.contains(&key.as_str()) {
            serde_json::from_str(&value.to_string()).unwrap_or_else(|_| to_json(&value))
        } else {
            to_json(&value)
        };
        self.0.insert(key.as_str().to_owned(), json);
        Ok(())
    }
}

fn to_json(v: &Value) -> Json {
    if let Some(b) = v.to_bool() {
        Json::Bool(b)
    } else if let Some(n) = v.to_u64() {
        Json::from(n)
    } else if let Some(n) = v.to_i64() {
        Json::from(n)
    } else if let Some(f) = v.to_f64() {
        Json::from(f)
    } else {
        Json::String(v.to_string())
    }
}

struct TextLogger {
    inner: Box<simplelog::WriteLogger<std::io::Stdout>>,
}

impl Log for TextLogger {
    fn enabled(&self, meta: &Metadata) -> bool {
        wanted(meta)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut obj = Map::new();
        let _ = record.key_values().visit(&mut Fields(&mut obj));
        let mut text = record.args().to_string();
        for (k, v) in obj {
            // Strings are JSON-quoted so control characters stay escaped.
            text.push_str(&format!(" {k}={v}"));
        }
        self.inner.log(
            &Record::builder()
                .args(format_args!("{text}"))
                .level(record.level())
                .target(record.target())
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The current UTC time as RFC 3339 with milliseconds.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// [`civil_from_days`]; config dates and budget months use it).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_000_000, 123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn json_lines_escape_fields() {
        let kvs: &[(&str, Value)] =
            &[("path", Value::from("/a\"\n\tb")), ("status", Value::from(401u16))];
        let record = Record::builder()
            .args(format_args!("unauthorized request"))
            .level(Level::Warn)
            .key_values(&kvs)
            .build();
        let line = format_json(&record);
        assert!(!line.contains('\n'));
        let v: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(v["msg"], "unauthorized request");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["path"], "/a\"\n\tb");
        assert_eq!(v["status"], 401);
    }
}
