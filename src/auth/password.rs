//! Users' passwords (SPEC §5): bcrypt verification with equal cost for unknown users, a
//! short-lived cache of successful verifications for Basic auth, the config's hash check, and
//! the `POST /auth/login` body parser.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Highest bcrypt cost the config accepts; above it every login is a self-inflicted DoS.
pub const MAX_COST: u32 = 14;

/// How long a successful verification is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// Salt and digest of a well-formed bcrypt hash; only its cost (spliced in) matters, since it is
/// used to make unknown users pay for one bcrypt run.
const DUMMY_SALT_AND_HASH: &str = "EGdrhbKUv8Oc9vGiXX0HQOxSg445d458Muh7DAHskb6QbtCvdxcie";

/// Configured users' bcrypt hashes, and a short-lived cache of successful verifications.
pub struct Passwords {
    users: HashMap<String, String>,
    /// A hash of the highest configured cost that no password is checked against for real.
    dummy: String,
    /// Per user name: the digest of the last credentials that passed bcrypt, and when that
    /// success stops counting. One entry per configured user (a user has one password, and
    /// unknown names are never cached), so the map is bounded by the configuration.
    cache: Mutex<HashMap<String, CacheEntry>>,
    bcrypt_runs: AtomicUsize,
}

struct CacheEntry {
    digest: [u8; 32],
    expires: Instant,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Passwords").field("users", &names).finish_non_exhaustive()
    }
}

impl Passwords {
    /// `users`: (name, bcrypt hash) pairs, hashes already validated by [`check_hash`]. A later
    /// duplicate name replaces an earlier one.
    pub fn new(users: &[(String, String)]) -> Passwords {
        let cost =
            users.iter().filter_map(|(_, hash)| hash_cost(hash)).max().unwrap_or(4).clamp(4, 31);
        Passwords {
            users: users.iter().cloned().collect(),
            dummy: format!("$2b${cost:02}${DUMMY_SALT_AND_HASH}"),
            cache: Mutex::new(HashMap::new()),
            bcrypt_runs: AtomicUsize::new(0),
        }
    }

    /// Checks a username/password pair with bcrypt. An unknown user pays the same bcrypt cost
    /// (that of the most expensive configured hash), so timing does not reveal which names
    /// exist. True only for a known user with the right password.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => self.bcrypt(password, hash),
            None => {
                std::hint::black_box(self.bcrypt(password, &self.dummy));
                false
            }
        }
    }

    /// As [`Passwords::verify`], and a success is remembered for [`CACHE_TTL`] (see
    /// [`Passwords::is_cached`]). Only successes are remembered; a change of the user's hash
    /// makes a remembered success useless (the hash is part of the key).
    pub fn verify_and_remember(&self, user: &str, password: &str, now: Instant) -> bool {
        let Some(hash) = self.users.get(user) else {
            return self.verify(user, password);
        };
        // The lock is not held while bcrypt runs.
        if !self.bcrypt(password, hash) {
            return false;
        }
        if let Some(expires) = now.checked_add(CACHE_TTL) {
            let digest = cache_key(user, password, hash);
            self.lock_cache().insert(user.to_owned(), CacheEntry { digest, expires });
        }
        true
    }

    /// Whether these credentials passed [`Passwords::verify_and_remember`] less than
    /// [`CACHE_TTL`] ago: answered without bcrypt (callers rate-limit only the checks that
    /// would pay it).
    pub fn is_cached(&self, user: &str, password: &str, now: Instant) -> bool {
        match self.users.get(user) {
            Some(hash) => self.cache_hit(user, &cache_key(user, password, hash), now),
            None => false,
        }
    }

    /// Whether the cache holds a fresh success for `user` with this digest. Drops the user's
    /// entry if it has expired.
    fn cache_hit(&self, user: &str, digest: &[u8; 32], now: Instant) -> bool {
        let mut cache = self.lock_cache();
        match cache.get(user) {
            Some(entry) if now < entry.expires => bool::from(entry.digest.ct_eq(digest)),
            Some(_) => {
                cache.remove(user);
                false
            }
            None => false,
        }
    }

    /// How many bcrypt verifications have run (telemetry; tests use it to check that the
    /// unknown-user path pays bcrypt and that cache hits do not).
    pub fn bcrypt_runs(&self) -> usize {
        self.bcrypt_runs.load(Ordering::Relaxed)
    }

    fn bcrypt(&self, password: &str, hash: &str) -> bool {
        self.bcrypt_runs.fetch_add(1, Ordering::Relaxed);
        bcrypt::verify(password, hash).unwrap_or(false)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, CacheEntry>> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// SHA-256 of (user, NUL, password, NUL, hash).
fn cache_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(user.as_bytes())
        .chain_update([0u8])
        .chain_update(password.as_bytes())
        .chain_update([0u8])
        .chain_update(hash.as_bytes())
        .finalize()
        .into()
}

/// The cost of a well-formed `$2a$`/`$2b$`/`$2y$` hash, None for anything else.
fn hash_cost(hash: &str) -> Option<u32> {
    let b = hash.as_bytes();
    if b.len() != 60
        || !hash.is_ascii()
        || !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
        || !b[4].is_ascii_digit()
        || !b[5].is_ascii_digit()
        || b[6] != b'$'
    {
        return None;
    }
    let parts: bcrypt::HashParts = hash.parse().ok()?;
    Some(parts.get_cost()).filter(|c| (4..=31).contains(c))
}

/// Validates a bcrypt hash string for the config: `$2a$`, `$2b$` or `$2y$`, a two-digit cost in
/// 4..=31, then 53 characters of salt and digest; and a cost of at most [`MAX_COST`]. Returns the
/// cost. The error is a config message; it never echoes the value (it may be a plaintext
/// password pasted by mistake).
pub fn check_hash(hash: &str) -> Result<u32, String> {
    let cost = hash_cost(hash).ok_or_else(|| {
        "is not a bcrypt hash (expected $2b$<cost>$ followed by 53 characters, as printed by \
         `butler hash-password`)"
            .to_owned()
    })?;
    if cost > MAX_COST {
        return Err(format!(
            "bcrypt cost {cost} is above the maximum of {MAX_COST} (every login would take \
             seconds of CPU); re-hash with a lower cost, e.g. 10 to 12"
        ));
    }
    Ok(cost)
}

/// Why a login body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    /// Not JSON, or not a JSON object: 400 `{"error":"bad request"}`.
    BadRequest,
    /// `username` or `password` missing, empty or not a string: 400
    /// `{"error":"username and password are required"}`.
    Missing,
}

/// Parses `{"username": "...", "password": "..."}` (exact keys; other keys ignored) into
/// (username, password).
pub fn parse_login(body: &[u8]) -> Result<(String, String), LoginError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| LoginError::BadRequest)?;
    let obj = value.as_object().ok_or(LoginError::BadRequest)?;
    let field = |name: &str| match obj.get(name).and_then(serde_json::Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(LoginError::Missing),
    };
    Ok((field("username")?, field("password")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(password: &str) -> String {
        bcrypt::hash(password, 4).unwrap()
    }

    /// Basic auth's use: the remembered success, else bcrypt.
    fn check(p: &Passwords, user: &str, password: &str, now: Instant) -> bool {
        p.is_cached(user, password, now) || p.verify_and_remember(user, password, now)
    }

    fn users(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(u, p)| (u.to_string(), hash(p))).collect()
    }

    #[test]
    fn verify_right_wrong_unknown() {
        let p = Passwords::new(&users(&[("alice", "wonderland"), ("bob", "builder")]));
        assert!(p.verify("alice", "wonderland"));
        assert!(p.verify("bob", "builder"));
        assert!(!p.verify("alice", "builder"));
        assert!(!p.verify("alice", ""));
        assert!(!p.verify("alice", "wonderland "));
        assert!(!p.verify("Alice", "wonderland"));
        assert!(!p.verify("carol", "wonderland"));
        assert!(!p.verify("", ""));
    }

    #[test]
    fn unknown_user_pays_bcrypt_at_the_highest_cost() {
        let list = vec![
            ("alice".to_owned(), bcrypt::hash("a", 4).unwrap()),
            ("bob".to_owned(), bcrypt::hash("b", 5).unwrap()),
        ];
        let p = Passwords::new(&list);
        assert_eq!(hash_cost(&p.dummy), Some(5));
        assert!(p.dummy.parse::<bcrypt::HashParts>().is_ok());
        assert_eq!(p.bcrypt_runs(), 0);
        assert!(!p.verify("mallory", "a"));
        assert_eq!(p.bcrypt_runs(), 1);
        assert!(!check(&p, "mallory", "a", Instant::now()));
        assert_eq!(p.bcrypt_runs(), 2);
        assert!(!p.verify("alice", "wrong"));
        assert_eq!(p.bcrypt_runs(), 3);
    }

    #[test]
    fn no_users() {
        let p = Passwords::new(&[]);
        assert!(!p.verify("alice", "x"));
        assert!(!check(&p, "alice", "x", Instant::now()));
        assert_eq!(p.bcrypt_runs(), 2);
    }

    #[test]
    fn cache_hit_avoids_bcrypt() {
        let p = Passwords::new(&users(&[("alice", "wonderland")]));
        let t0 = Instant::now();
        assert!(check(&p, "alice", "wonderland", t0));
        assert_eq!(p.bcrypt_runs(), 1);
        assert!(check(&p, "alice", "wonderland", t0 + Duration::from_secs(10)));
        assert!(check(&p, "alice", "wonderland", t0 + CACHE_TTL - Duration::from_secs(1)));
        assert_eq!(p.bcrypt_runs(), 1);
        // A wrong password is never answered from the cache, and failures are not cached.
        assert!(!check(&p, "alice", "wonderlan", t0));
        assert!(!check(&p, "alice", "wonderlan", t0));
        assert_eq!(p.bcrypt_runs(), 3);
        // The right password still hits after a wrong attempt.
        assert!(check(&p, "alice", "wonderland", t0 + Duration::from_secs(20)));
        assert_eq!(p.bcrypt_runs(), 3);
        // is_cached answers without bcrypt, and only for the right, fresh credentials.
        assert!(p.is_cached("alice", "wonderland", t0));
        assert!(!p.is_cached("alice", "wonderlan", t0));
        assert!(!p.is_cached("bob", "wonderland", t0));
        assert!(!p.is_cached("alice", "wonderland", t0 + CACHE_TTL));
        assert_eq!(p.bcrypt_runs(), 3);
        // The uncached path always pays.
        assert!(p.verify("alice", "wonderland"));
        assert_eq!(p.bcrypt_runs(), 4);
    }

    #[test]
    fn cache_entries_expire() {
        let p = Passwords::new(&users(&[("alice", "wonderland")]));
        let t0 = Instant::now();
        assert!(check(&p, "alice", "wonderland", t0));
        assert!(check(&p, "alice", "wonderland", t0 + CACHE_TTL));
        assert_eq!(p.bcrypt_runs(), 2);
        // Re-verified successes start a new lifetime.
        assert!(check(&p, "alice", "wonderland", t0 + CACHE_TTL + Duration::from_secs(60)));
        assert_eq!(p.bcrypt_runs(), 2);
    }

    #[test]
    fn cache_does_not_survive_a_hash_change() {
        let old = Passwords::new(&users(&[("alice", "old-password")]));
        let t0 = Instant::now();
        assert!(check(&old, "alice", "old-password", t0));
        // A reload builds new Passwords: the old password no longer works, the new one does.
        let new = Passwords::new(&users(&[("alice", "new-password")]));
        assert!(!check(&new, "alice", "old-password", t0));
        assert!(check(&new, "alice", "new-password", t0));
        // And the key itself depends on the hash, so even a shared cache would miss.
        let (h1, h2) = (hash("pw"), hash("pw"));
        assert_ne!(h1, h2);
        assert_ne!(cache_key("alice", "pw", &h1), cache_key("alice", "pw", &h2));
        assert_ne!(cache_key("alice", "pw", &h1), cache_key("alice", "pw2", &h1));
        assert_ne!(cache_key("alice", "pw", &h1), cache_key("alicf", "pw", &h1));
    }

    #[test]
    fn check_hash_cases() {
        assert_eq!(check_hash(&bcrypt::hash("x", 10).unwrap()), Ok(10));
        assert_eq!(check_hash(&bcrypt::hash("x", 4).unwrap()), Ok(4));
        let h = "$2y$12$L6Bc/AlTQHyd9liGgGEZyOFLPHNgyxeEPfgYfBCVxJ7JIlwxyVU3u";
        assert_eq!(check_hash(h), Ok(12));
        assert_eq!(check_hash(&h.replacen("$2y$", "$2a$", 1)), Ok(12));
        assert_eq!(check_hash(&h.replacen("$2y$", "$2b$", 1)), Ok(12));
        // Too expensive.
        let err = check_hash(&h.replacen("$12$", "$15$", 1)).unwrap_err();
        assert!(err.contains("15") && err.contains("14"), "{err}");
        assert!(check_hash(&h.replacen("$12$", "$14$", 1)).is_ok());
        assert!(check_hash(&h.replacen("$12$", "$31$", 1)).is_err());
        // Not a (supported) bcrypt hash.
        for bad in [
            String::new(),
            "hunter2".to_owned(),
            h.replacen("$2y$", "$2x$", 1),
            h.replacen("$2y$", "$1$$", 1),
            h.replacen("$12$", "$03$", 1),
            h.replacen("$12$", "$+9$", 1),
            h.replacen("$12$", "$32$", 1),
            h[..59].to_owned(),
            format!("{h}x"),
            h.replacen('L', "!", 1),
            h.replacen('L', "é", 1),
            format!(" {}", &h[1..]),
        ] {
            let err = check_hash(&bad).unwrap_err();
            assert!(err.contains("not a bcrypt hash"), "{bad:?}: {err}");
            assert!(bad.is_empty() || !err.contains(&bad), "echoes the value: {err}");
        }
    }

    #[test]
    fn parse_login_cases() {
        assert_eq!(
            parse_login(br#"{"username":"alice","password":"pw"}"#),
            Ok(("alice".to_owned(), "pw".to_owned()))
        );
        assert_eq!(
            parse_login(br#"{"password":"p w","extra":[1],"username":"alice"}"#),
            Ok(("alice".to_owned(), "p w".to_owned()))
        );
        for body in [&b""[..], b"not json", b"{", b"[]", b"\"alice\"", b"null", b"42", b"\xff"] {
            assert_eq!(parse_login(body), Err(LoginError::BadRequest), "{body:?}");
        }
        for body in [
            r#"{}"#,
            r#"{"username":"alice"}"#,
            r#"{"password":"pw"}"#,
            r#"{"username":"","password":"pw"}"#,
            r#"{"username":"alice","password":""}"#,
            r#"{"username":"alice","password":null}"#,
            r#"{"username":1,"password":"pw"}"#,
            r#"{"username":"alice","password":["pw"]}"#,
            r#"{"Username":"alice","Password":"pw"}"#,
            r#"{"user":"alice","pass":"pw"}"#,
        ] {
            assert_eq!(parse_login(body.as_bytes()), Err(LoginError::Missing), "{body}");
        }
    }
}
