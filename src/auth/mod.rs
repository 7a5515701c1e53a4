//! Authentication (SPEC §5). This module only answers "who is this?"; what
//! the caller may do is decided elsewhere.

pub mod keys;

use std::sync::Arc;

use base64::Engine;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::{Client, sha256};
use crate::http::Head;
use crate::policy::Policy;

/// Who a request was authenticated as.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The client's configured name (logs, metrics, rate-limit key).
    pub client: String,
    /// What it may do.
    pub policy: Arc<Policy>,
}

/// Why authentication failed. All of them answer the same 401; the reason is
/// for the log only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    Malformed,
    Invalid,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing credentials",
            Failure::Malformed => "malformed credentials",
            Failure::Invalid => "invalid credentials",
        }
    }
}

/// API-key clients, held as SHA-256 digests of their keys.
pub struct KeyStore {
    clients: Vec<(String, [u8; 32], Arc<Policy>)>,
}

impl KeyStore {
    pub fn new(clients: &[Client]) -> KeyStore {
        KeyStore {
            clients: clients
                .iter()
                .map(|c| (c.name.clone(), c.key_sha256, c.policy.clone()))
                .collect(),
        }
    }

    /// Finds the client whose key digest equals the digest of `key`. Every
    /// stored digest is compared, in constant time, whatever matches.
    fn lookup(&self, key: &str) -> Option<usize> {
        let digest = sha256(key.as_bytes());
        let mut index = 0u64;
        let mut found = subtle::Choice::from(0);
        for (i, (_, stored, _)) in self.clients.iter().enumerate() {
            let hit = stored.ct_eq(&digest);
            index.conditional_assign(&(i as u64), hit);
            found |= hit;
        }
        bool::from(found).then_some(index as usize)
    }

    /// Authenticates a request from its headers.
    pub fn authenticate(&self, head: &Head) -> Result<Identity, Failure> {
        let keys = presented_keys(head)?;
        let mut matched: Option<usize> = None;
        for key in &keys {
            match (self.lookup(key), matched) {
                (None, _) => return Err(Failure::Invalid),
                // Two different valid keys in one request: refuse the ambiguity.
                (Some(i), Some(j)) if i != j => return Err(Failure::Invalid),
                (Some(i), _) => matched = Some(i),
            }
        }
        let i = matched.ok_or(Failure::Missing)?;
        let (name, _, policy) = &self.clients[i];
        Ok(Identity { client: name.clone(), policy: policy.clone() })
    }
}

/// The keys a request presents: `Authorization: Bearer`, `Authorization:
/// Basic` (the password is the key) and `x-api-key`. A repeated header is
/// malformed, not "first one wins". Keys in the query string never count.
fn presented_keys(head: &Head) -> Result<Vec<String>, Failure> {
    if head.header_count("authorization") > 1 || head.header_count("x-api-key") > 1 {
        return Err(Failure::Malformed);
    }
    let mut keys = Vec::new();
    if head.header_count("authorization") == 1 {
        let value = head.header("authorization").ok_or(Failure::Malformed)?;
        keys.push(authorization_key(value)?);
    }
    if head.header_count("x-api-key") == 1 {
        let value = head.header("x-api-key").ok_or(Failure::Malformed)?.trim();
        if value.is_empty() {
            return Err(Failure::Malformed);
        }
        keys.push(value.to_owned());
    }
    if keys.is_empty() { Err(Failure::Missing) } else { Ok(keys) }
}

/// Parses `Bearer <token>` (scheme case-insensitive; the token is the rest
/// after one space, trimmed) or `Basic base64(user:key)`.
pub fn authorization_key(value: &str) -> Result<String, Failure> {
    let (scheme, rest) = value.split_once(' ').ok_or(Failure::Malformed)?;
    let token = rest.trim();
    if token.is_empty() {
        return Err(Failure::Malformed);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(token.to_owned())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| Failure::Malformed)?;
        let decoded = String::from_utf8(decoded).map_err(|_| Failure::Malformed)?;
        let (_, password) = decoded.split_once(':').ok_or(Failure::Malformed)?;
        if password.is_empty() {
            return Err(Failure::Malformed);
        }
        Ok(password.to_owned())
    } else {
        Err(Failure::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{Parsed, parse};

    fn head(headers: &str) -> Head {
        let raw = format!("GET /api/tags HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        match parse(raw.as_bytes()).unwrap() {
            Parsed::Complete(h, _) => *h,
            Parsed::Partial => panic!(),
        }
    }

    fn store() -> KeyStore {
        KeyStore::new(&[
            Client { name: "a".into(), key_sha256: sha256(b"sk-a"), policy: Default::default() },
            Client { name: "b".into(), key_sha256: sha256(b"sk-b"), policy: Default::default() },
        ])
    }

    fn who(headers: &str) -> Result<String, Failure> {
        store().authenticate(&head(headers)).map(|i| i.client)
    }

    #[test]
    fn accepts_the_three_header_forms() {
        assert_eq!(who("Authorization: Bearer sk-a\r\n").unwrap(), "a");
        assert_eq!(who("authorization: bEaReR   sk-b  \r\n").unwrap(), "b");
        assert_eq!(who("x-api-key: sk-a\r\n").unwrap(), "a");
        // "dXNlcjpzay1i" is base64("user:sk-b").
        assert_eq!(who("Authorization: Basic dXNlcjpzay1i\r\n").unwrap(), "b");
        assert_eq!(who("Authorization: Bearer sk-a\r\nX-Api-Key: sk-a\r\n").unwrap(), "a");
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(who(""), Err(Failure::Missing));
        assert_eq!(who("Authorization: Bearer sk-x\r\n"), Err(Failure::Invalid));
        assert_eq!(who("Authorization: Bearer\r\n"), Err(Failure::Malformed));
        assert_eq!(who("Authorization: Token sk-a\r\n"), Err(Failure::Malformed));
        assert_eq!(who("Authorization: Basic !!!\r\n"), Err(Failure::Malformed));
        assert_eq!(
            who("Authorization: Bearer sk-a\r\nAuthorization: Bearer sk-a\r\n"),
            Err(Failure::Malformed)
        );
        assert_eq!(who("Authorization: Bearer sk-a\r\nx-api-key: sk-b\r\n"), Err(Failure::Invalid));
        assert_eq!(who("Authorization: Bearer sk-a\r\nx-api-key: nope\r\n"), Err(Failure::Invalid));
        assert_eq!(who("Cookie: key=sk-a\r\n"), Err(Failure::Missing));
    }
}
