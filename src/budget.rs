//! Token budgets (SPEC §9): tokens each subject used per minute (sliding),
//! per UTC day and per UTC month, charged after each response from what
//! Ollama reports; a subject that has reached a budget is refused until the
//! window resets. Counters survive restarts through `state_file`.
//!
//! Pure bookkeeping over explicit times (Unix seconds), so every rule is
//! unit-tested without clocks; the pipeline supplies `now`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// `token_budget` of a policy: tokens (prompt + completion) per window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenBudget {
    pub per_minute: Option<u64>,
    pub per_day: Option<u64>,
    pub per_month: Option<u64>,
}

impl TokenBudget {
    pub fn is_empty(&self) -> bool {
        self.per_minute.is_none() && self.per_day.is_none() && self.per_month.is_none()
    }
}

/// Most subjects whose usage is kept; beyond it the longest-idle ones are
/// dropped first (OIDC subjects are not bounded by the configuration).
const MAX_ACCOUNTS: usize = 100_000;
/// Most entries in one minute window (one per second at most).
const MINUTE: u64 = 60;

/// Usage of one subject.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Account {
    /// (second, tokens) charged in the last minute, oldest first.
    minute: VecDeque<(u64, u64)>,
    /// (day number since 1970-01-01 UTC, tokens).
    day: (u64, u64),
    /// (year * 12 + month - 1, tokens).
    month: (u64, u64),
    /// (second, requests admitted) in the last minute (for `/butler/usage`);
    /// one entry per second, so a busy subject costs at most 60 entries.
    #[serde(default)]
    requests: VecDeque<(u64, u64)>,
    last_seen: u64,
}

/// How much of each window a subject has used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub minute: u64,
    pub day: u64,
    pub month: u64,
    /// Requests admitted in the last minute.
    pub requests: u64,
}

impl Account {
    fn expire(&mut self, now: u64) {
        while self.minute.front().is_some_and(|(t, _)| t + MINUTE <= now) {
            self.minute.pop_front();
        }
        while self.requests.front().is_some_and(|(t, _)| t + MINUTE <= now) {
            self.requests.pop_front();
        }
        if self.day.0 != day_of(now) {
            self.day = (day_of(now), 0);
        }
        if self.month.0 != month_of(now) {
            self.month = (month_of(now), 0);
        }
    }

    fn used(&mut self, now: u64) -> Used {
        self.expire(now);
        Used {
            minute: self.minute.iter().map(|(_, n)| n).sum(),
            day: self.day.1,
            month: self.month.1,
            requests: self.requests.iter().map(|(_, n)| n).sum(),
        }
    }
}

fn day_of(secs: u64) -> u64 {
    secs / 86_400
}

/// Months since year 0 of the UTC date of `secs`.
fn month_of(secs: u64) -> u64 {
    let (y, m, _) = crate::logging::civil_from_days(day_of(secs) as i64);
    (y.max(0) as u64) * 12 + u64::from(m) - 1
}

/// First second of the month after month index `m`.
fn next_month_start(m: u64) -> u64 {
    let next = m + 1;
    let (y, month) = ((next / 12) as i64, (next % 12) as u32 + 1);
    (crate::logging::days_from_civil(y, month, 1).max(0) as u64) * 86_400
}

/// Every subject's usage.
#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<HashMap<String, Account>>,
    dirty: std::sync::atomic::AtomicBool,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    subjects: HashMap<String, Account>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(seconds)` when `key` has reached one of its budgets: how long
    /// until the window that refuses resets (the longest if several do).
    pub fn check(&self, key: &str, budget: &TokenBudget, now: u64) -> Result<(), u64> {
        if budget.is_empty() {
            return Ok(());
        }
        let mut accounts = self.lock();
        // A subject not seen yet has used nothing (and a budget of 0 is
        // reached already).
        let mut fresh = Account::default();
        let account = accounts.get_mut(key).unwrap_or(&mut fresh);
        let used = account.used(now);
        let mut refused: Option<u64> = None;
        let mut refuse = |wait: u64| refused = Some(refused.map_or(wait, |w| w.max(wait)));
        if budget.per_month.is_some_and(|limit| used.month >= limit) {
            refuse(next_month_start(month_of(now)).saturating_sub(now));
        }
        if budget.per_day.is_some_and(|limit| used.day >= limit) {
            refuse((day_of(now) + 1) * 86_400 - now);
        }
        if let Some(limit) = budget.per_minute.filter(|l| used.minute >= *l) {
            // Until enough of the minute's charges have aged out; with a
            // budget of 0, never: a whole minute.
            let mut left = used.minute;
            let mut wait = MINUTE;
            for (t, n) in &account.minute {
                left -= n;
                if left < limit {
                    wait = t + MINUTE - now;
                    break;
                }
            }
            refuse(wait);
        }
        refused.map_or(Ok(()), |wait| Err(wait.max(1)))
    }

    /// Records an admitted request (for the `requests` part of the usage).
    pub fn request(&self, key: &str, now: u64) {
        let mut accounts = self.lock();
        let account = account(&mut accounts, key, now);
        account.expire(now);
        match account.requests.back_mut() {
            Some((t, n)) if *t == now => *n += 1,
            _ => account.requests.push_back((now, 1)),
        }
    }

    /// Charges `tokens` to `key` after a response.
    pub fn charge(&self, key: &str, tokens: u64, now: u64) {
        if tokens == 0 {
            return;
        }
        let mut accounts = self.lock();
        let account = account(&mut accounts, key, now);
        account.expire(now);
        match account.minute.back_mut() {
            Some((t, n)) if *t == now => *n += tokens,
            _ => account.minute.push_back((now, tokens)),
        }
        account.day.1 += tokens;
        account.month.1 += tokens;
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn used(&self, key: &str, now: u64) -> Used {
        self.lock().get_mut(key).map(|a| a.used(now)).unwrap_or_default()
    }

    /// Writes the counters to `path` atomically (SPEC §9), if anything
    /// changed since the last save: see [`write_atomically`].
    pub fn save(&self, path: &str) -> std::io::Result<()> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let state = StateFile { version: 1, subjects: self.lock().clone() };
        let text = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
        let result = write_atomically(std::path::Path::new(path), &text);
        if result.is_err() {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// Reads counters saved by [`Ledger::save`]. A missing file is a fresh
    /// start; an unreadable one is an error (the operator must look).
    pub fn load(path: &str) -> Result<Ledger, String> {
        let ledger = Ledger::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                let state: StateFile = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("state file {path} is not valid: {e}"))?;
                *ledger.lock() = state.subjects;
                Ok(ledger)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ledger),
            Err(e) => Err(format!("cannot read state file {path}: {e}")),
        }
    }
}

/// Replaces `path` with `bytes` so that a reader (or a crash) sees the old
/// file or the new one, never a mix: a new temporary file in the same
/// directory, created exclusively under an unpredictable name (`O_EXCL`
/// never follows a symlink, so nobody who can write to the directory can
/// point it at another file), fsynced, renamed over `path`, and the
/// directory fsynced so the rename itself survives a power loss.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut attempt = 0;
    let (tmp, mut file) = loop {
        let mut random = [0u8; 8];
        crate::auth::keys::random_bytes(&mut random)?;
        let tmp = dir.join(format!(".{name}.{}.tmp", crate::auth::keys::hex(&random)));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(file) => break (tmp, file),
            // A name taken by chance (or planted): draw another.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Best effort: not every filesystem lets a directory be fsynced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn account<'a>(accounts: &'a mut HashMap<String, Account>, key: &str, now: u64) -> &'a mut Account {
    // Known subjects (every request after the first) cost a lookup, no allocation.
    if !accounts.contains_key(key) {
        if accounts.len() >= MAX_ACCOUNTS {
            // Forget the subject seen longest ago (its windows have likely reset).
            if let Some(oldest) =
                accounts.iter().min_by_key(|(_, a)| a.last_seen).map(|(k, _)| k.clone())
            {
                accounts.remove(&oldest);
            }
        }
        accounts.insert(key.to_owned(), Account::default());
    }
    let account = accounts.get_mut(key).expect("inserted above");
    account.last_seen = now;
    account
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_801_353_600; // 2027-01-31T00:00:00Z

    #[test]
    fn a_budget_of_zero_refuses_from_the_start() {
        let l = Ledger::new();
        for budget in [
            TokenBudget { per_minute: Some(0), ..TokenBudget::default() },
            TokenBudget { per_day: Some(0), ..TokenBudget::default() },
            TokenBudget { per_month: Some(0), ..TokenBudget::default() },
        ] {
            assert!(l.check("nobody-yet", &budget, T0).is_err(), "{budget:?}");
        }
        let minute = TokenBudget { per_minute: Some(0), ..TokenBudget::default() };
        assert_eq!(l.check("nobody-yet", &minute, T0), Err(60));
    }

    #[test]
    fn minute_budget_slides() {
        let l = Ledger::new();
        let b = TokenBudget { per_minute: Some(100), ..TokenBudget::default() };
        assert_eq!(l.check("a", &b, T0), Ok(()));
        l.charge("a", 60, T0);
        l.charge("a", 50, T0 + 10);
        assert_eq!(l.check("a", &b, T0 + 20), Err(40), "until the first charge ages out");
        assert_eq!(l.check("a", &b, T0 + 60), Ok(()));
        assert_eq!(l.used("a", T0 + 60).minute, 50);
        assert_eq!(l.check("b", &b, T0), Ok(()), "subjects are separate");
    }

    #[test]
    fn day_and_month_reset_on_the_utc_calendar() {
        let l = Ledger::new();
        let b = TokenBudget { per_day: Some(10), per_month: Some(25), ..TokenBudget::default() };
        l.charge("a", 10, T0 + 3600);
        assert_eq!(l.check("a", &b, T0 + 7200), Err(86_400 - 7200));
        assert_eq!(l.check("a", &b, T0 + 86_400), Ok(()));
        l.charge("a", 15, T0 + 86_400 + 5);
        // 2027-02-01: the month of January is used up until Feb 1 00:00... which it now is.
        let used = l.used("a", T0 + 86_400 + 6);
        assert_eq!((used.day, used.month), (15, 15), "a new month started on Feb 1");
        // Within one month: 2027-02-01 + 15 -> 30 tokens over 25.
        l.charge("a", 15, T0 + 2 * 86_400);
        let feb_end = crate::logging::days_from_civil(2027, 3, 1) as u64 * 86_400;
        assert_eq!(l.check("a", &b, T0 + 2 * 86_400 + 1), Err(feb_end - (T0 + 2 * 86_400 + 1)));
    }

    #[test]
    fn months() {
        assert_eq!(next_month_start(month_of(T0)), T0 + 86_400);
        let dec = crate::logging::days_from_civil(2026, 12, 15) as u64 * 86_400;
        assert_eq!(
            next_month_start(month_of(dec)),
            crate::logging::days_from_civil(2027, 1, 1) as u64 * 86_400
        );
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("butler-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let path = path.to_str().unwrap();
        let l = Ledger::new();
        l.charge("user:alice", 42, T0);
        l.request("user:alice", T0);
        l.save(path).unwrap();
        let again = Ledger::load(path).unwrap();
        assert_eq!(again.used("user:alice", T0 + 1).day, 42);
        assert_eq!(again.used("user:alice", T0 + 1).requests, 1);
        for _ in 0..1000 {
            again.request("user:alice", T0 + 2);
        }
        assert_eq!(again.used("user:alice", T0 + 2).requests, 1001);
        assert_eq!(again.lock()["user:alice"].requests.len(), 2, "one entry per second");
        std::fs::write(path, b"{oops").unwrap();
        assert!(Ledger::load(path).is_err());
        assert!(Ledger::load(dir.join("missing.json").to_str().unwrap()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
