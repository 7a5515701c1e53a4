//! Request targets (RFC 9112 §3.2). Routing decisions are made on the
//! percent-decoded path with dot segments removed, so `/api/%70ull` and
//! `/v1/../api/pull` are both `/api/pull`; the raw target is what is forwarded.
//! A path whose decoding would be ambiguous (an encoded `/` or NUL) is refused.

/// A request target in origin form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As received: path and query, forwarded to the upstream unchanged.
    pub raw: String,
    /// Decoded, dot-segment-free path used for routing.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Not origin form (`*`, `http://host/…`, `host:port`).
    NotOriginForm,
    /// Bad `%` escape, or a decoded byte that makes routing ambiguous.
    BadEncoding,
}

impl TargetError {
    pub fn reason(self) -> &'static str {
        match self {
            TargetError::NotOriginForm => "request target must be an absolute path",
            TargetError::BadEncoding => "invalid path encoding",
        }
    }
}

impl Target {
    pub fn parse(raw: &str) -> Result<Target, TargetError> {
        if !raw.starts_with('/') || raw.contains('#') {
            return Err(TargetError::NotOriginForm);
        }
        let raw_path = raw.split_once('?').map_or(raw, |(p, _)| p);
        let decoded = percent_decode(raw_path)?;
        Ok(Target { raw: raw.to_owned(), path: remove_dot_segments(&decoded) })
    }

    /// The query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.raw.split_once('?').map(|(_, q)| q)
    }
}

fn percent_decode(s: &str) -> Result<String, TargetError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(TargetError::BadEncoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| TargetError::BadEncoding)?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| TargetError::BadEncoding)?;
            if b == b'/' || b == 0 {
                return Err(TargetError::BadEncoding);
            }
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TargetError::BadEncoding)
}

/// RFC 3986 §5.2.4 on a path that starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(raw: &str) -> String {
        Target::parse(raw).unwrap().path
    }

    #[test]
    fn decodes_and_normalises() {
        assert_eq!(path("/api/%70ull"), "/api/pull");
        assert_eq!(path("/api/chat?x=%2F"), "/api/chat");
        assert_eq!(path("/v1/../api/pull"), "/api/pull");
        assert_eq!(path("/v1/%2e%2E/api/pull"), "/api/pull");
        assert_eq!(path("/a/./b/."), "/a/b/");
        assert_eq!(path("/a/b/.."), "/a/");
        assert_eq!(path("/../../x"), "/x");
        assert_eq!(path("/"), "/");
        assert_eq!(path("/.."), "/");
        assert_eq!(path("//api/pull"), "//api/pull");
        assert_eq!(path("/v1/models/llama3.2%3Alatest"), "/v1/models/llama3.2:latest");
        let t = Target::parse("/api/tags?a=b").unwrap();
        assert_eq!(t.raw, "/api/tags?a=b");
        assert_eq!(t.query(), Some("a=b"));
    }

    #[test]
    fn refuses_ambiguous_targets() {
        for raw in
            ["*", "http://h/api", "h:80", "/a%2fb", "/a%00", "/a%zz", "/a%4", "/a%ff", "/a#frag"]
        {
            assert!(Target::parse(raw).is_err(), "{raw}");
        }
    }
}
