//! `${VAR}` interpolation inside string values (SPEC §4).
//!
//! Expansion runs on each string *after* YAML parsing, so a bcrypt hash such as
//! `$2b$10$…` or a regex ending in `$` is never mistaken for a reference: only the
//! exact sequence `${` starts one. `$${` is an escaped, literal `${`.

/// Expands `${NAME}`, `${NAME:-default}` and `$${` in `input`, looking names up
/// with `lookup`. An unset name without a default is an error, as is an
/// unterminated or malformed reference: a typo must not become a silent empty
/// secret.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !input.contains("${") {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or_else(|| "unterminated \"${\" in value".to_owned())?;
            let inner = &tail[..end];
            let (name, default) = match inner.find(":-") {
                Some(i) => (&inner[..i], Some(&inner[i + 2..])),
                None => (inner, None),
            };
            if !valid_name(name) {
                return Err(format!("invalid variable reference \"${{{inner}}}\""));
            }
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!("environment variable \"{name}\" is not set"));
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-123".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn ex(s: &str) -> Result<String, String> {
        expand(s, &env)
    }

    #[test]
    fn expands_references() {
        assert_eq!(ex("${KEY}").unwrap(), "sk-123");
        assert_eq!(ex("a-${KEY}-b").unwrap(), "a-sk-123-b");
        assert_eq!(ex("${MISSING:-dflt}").unwrap(), "dflt");
        assert_eq!(ex("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(ex("${KEY:-dflt}").unwrap(), "sk-123");
        assert_eq!(ex("${MISSING:-}").unwrap(), "");
    }

    #[test]
    fn leaves_dollars_alone() {
        let hash = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";
        assert_eq!(ex(hash).unwrap(), hash);
        assert_eq!(ex("^end$").unwrap(), "^end$");
        assert_eq!(ex("$${KEY}").unwrap(), "${KEY}");
        assert_eq!(ex("$$${KEY}").unwrap(), "$${KEY}");
        assert_eq!(ex("cost $5").unwrap(), "cost $5");
    }

    #[test]
    fn rejects_bad_references() {
        assert_eq!(ex("${MISSING}").unwrap_err(), "environment variable \"MISSING\" is not set");
        assert!(ex("${KEY").is_err());
        assert!(ex("${}").is_err());
        assert!(ex("${1A}").is_err());
        assert!(ex("${A B}").is_err());
    }
}
