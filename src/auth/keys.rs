//! API key generation: at least 32 bytes of OS randomness, URL-safe, `sk-`
//! prefixed, with the SHA-256 digest the config stores instead of the key.

use std::io::Read;

use base64::Engine;

/// Fills `buf` from the kernel's CSPRNG. Failing to get randomness is fatal
/// for key generation, never papered over.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// A new API key and its hex SHA-256 digest.
pub fn generate() -> std::io::Result<(String, String)> {
    let mut raw = [0u8; 32];
    random_bytes(&mut raw)?;
    let key = format!("sk-{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let digest = hex(&crate::config::sha256(key.as_bytes()));
    Ok((key, digest))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_match_their_digest() {
        let (k1, d1) = generate().unwrap();
        let (k2, _) = generate().unwrap();
        assert_ne!(k1, k2);
        assert!(k1.starts_with("sk-") && k1.len() >= 3 + 43);
        assert!(k1[3..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(d1, hex(&crate::config::sha256(k1.as_bytes())));
        assert_eq!(d1.len(), 64);
    }
}
