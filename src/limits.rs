//! Request rate limits (SPEC §4 "Rates", §7.5).
//!
//! Each client (subject) may have its own limit and there may be one global limit. A request is
//! checked against the subject's limit first and then the global one, and it is recorded in both
//! only when both admit it: a client that exhausts its own quota must not also drain the shared
//! one, and a request the global limit refuses must not cost its client anything.
//!
//! The limits are *sliding windows*: a limit of N per window never lets more than N requests
//! through in any span of the window's length. A fixed window (a counter reset every minute)
//! would let 2N through around each reset, which is exactly the burst a limit is meant to stop.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// N requests per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub window: Duration,
}

/// The units a rate may be written with, and the one [`Rate`]'s `Display` writes back.
const UNITS: [(&[&str], u64, &str); 4] = [
    (&["s", "sec", "second"], 1, "s"),
    (&["m", "min", "minute"], 60, "min"),
    (&["h", "hour"], 3_600, "h"),
    (&["d", "day"], 86_400, "d"),
];

impl Rate {
    /// Parses "N/unit" (units above; surrounding whitespace ok; N ≥ 1, reject 0, signs, decimals,
    /// N > u32::MAX) or "unlimited" (→ Ok(None)). Error strings are config messages like
    /// `invalid rate "5/week" (use e.g. 60/min, 1000/day or unlimited)`.
    ///
    /// The grammar is as strict as the one for durations (no inner spaces, no case folding) so
    /// that a typo is reported when the config is loaded instead of silently meaning something.
    pub fn parse(s: &str) -> Result<Option<Rate>, String> {
        let s = s.trim();
        if s == "unlimited" {
            return Ok(None);
        }
        let invalid = || format!("invalid rate {s:?} (use e.g. 60/min, 1000/day or unlimited)");
        let (num, unit) = s.split_once('/').ok_or_else(invalid)?;
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let secs = UNITS
            .iter()
            .find(|(names, _, _)| names.contains(&unit))
            .map(|&(_, secs, _)| secs)
            .ok_or_else(invalid)?;
        // Only digits remain, so the one way left to fail is overflow.
        let count: u32 = num
            .parse()
            .map_err(|_| format!("invalid rate {s:?} (the count must be at most {})", u32::MAX))?;
        if count == 0 {
            return Err(format!("invalid rate {s:?} (the count must be at least 1)"));
        }
        Ok(Some(Rate { count, window: Duration::from_secs(secs) }))
    }
}

impl fmt::Display for Rate {
    /// Writes the form [`Rate::parse`] reads back ("60/min"), so that logs and `--check` output
    /// can be pasted into a config. A window that no unit names (only possible by building a
    /// `Rate` by hand) is written as a duration instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match UNITS.iter().find(|&&(_, secs, _)| self.window == Duration::from_secs(secs)) {
            Some((_, _, unit)) => write!(f, "{}/{unit}", self.count),
            None => write!(f, "{} per {:?}", self.count, self.window),
        }
    }
}

/// A refusal: how long until a retry can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds, rounded up, at least 1 (for the Retry-After header).
    ///
    /// Rounding down would tell a client to come back before its quota is free, and it would then
    /// be refused again; `Retry-After: 0` would invite an immediate retry loop.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// Above this count a limit switches from the exact log to counting buckets, so that one
/// subject's state never costs more than 32 KiB however large its configured N.
const LOG_MAX: u32 = 4096;
/// How many buckets a window is split into in the bucketed variant.
const BUCKETS: u64 = 64;
/// Ring slots for the buckets: a window of 64 buckets overlaps at most 65 of them, plus one
/// spare so that the newest bucket never shares a slot with one still being counted.
const SLOTS: usize = 66;
/// The subject map is swept for idle entries only once it has grown past this size (and then
/// again each time it doubles), so sweeping costs O(1) per new subject, amortised.
const SWEEP_MIN: usize = 1024;

/// The state of one limit.
///
/// Times are nanoseconds since the owning [`RateLimiter`]'s base instant: 8 bytes each instead
/// of 16 for an `Instant`, and plain integer arithmetic that cannot panic.
#[derive(Debug, Clone)]
struct Window {
    rate: Rate,
    /// The window's length in nanoseconds.
    len: u64,
    /// The latest admission recorded. A `now` that lags behind it (captured by a thread before
    /// it took the lock) is recorded as this time instead, which keeps the log sorted; it also
    /// tells when the entry has gone idle.
    newest: u64,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// The times of the last (at most N) admissions, oldest first. Exact: admits iff fewer than
    /// N of them lie in `(now - window, now]`.
    Log(VecDeque<u64>),
    /// Counts per bucket, for large N where the log would be too big (8 bytes per admission).
    /// Every bucket overlapping `(now - window, now]` counts in full, as if all its admissions
    /// were at its end, so a refusal may last up to one bucket (1/64 of the window) longer than
    /// the exact rule's, never shorter, and the "at most N in any window" promise still holds.
    /// At over 4096 requests per window, that bit of extra caution buys a fixed 264 bytes of
    /// state instead of up to 32 GiB for N = u32::MAX.
    Buckets(Box<Buckets>),
}

#[derive(Debug, Clone)]
struct Buckets {
    /// Nanoseconds per bucket: the window divided by 64, rounded up, so 64 buckets cover it.
    width: u64,
    /// The absolute index (time / width) of the newest bucket written.
    head: u64,
    /// Admissions per bucket; bucket `j` lives in slot `j % SLOTS` while `j > head - SLOTS`.
    counts: [u32; SLOTS],
}

impl Window {
    fn new(rate: Rate) -> Window {
        let len = u64::try_from(rate.window.as_nanos()).unwrap_or(u64::MAX);
        let kind = if rate.count > LOG_MAX {
            let width = len.div_ceil(BUCKETS).max(1);
            Kind::Buckets(Box::new(Buckets { width, head: 0, counts: [0; SLOTS] }))
        } else {
            Kind::Log(VecDeque::new())
        };
        Window { rate, len, newest: 0, kind }
    }

    /// Decides whether one more request may be admitted at `now`, without recording it, so that
    /// the caller can consult the other limit before committing to either. A refusal carries
    /// the time at which the first retry can succeed.
    fn admit(&self, now: u64) -> Result<(), u64> {
        let n = u64::from(self.rate.count);
        if n == 0 {
            // Not reachable through `Rate::parse`; a hand-built zero rate admits nothing.
            return Err(now.saturating_add(self.len.max(1)));
        }
        match &self.kind {
            // The log is judged at `now` as given: admissions later than it (recorded by a thread
            // whose clock read came later) simply count as inside the window, the cautious
            // reading of "time went backwards".
            Kind::Log(times) => match times.front() {
                // The log holds the last N admissions: if it is full, the request fits only when
                // the oldest of them has left the window, i.e. is at or before `now - window`.
                Some(&oldest) if times.len() as u64 >= n => {
                    let free = oldest.saturating_add(self.len);
                    if free <= now { Ok(()) } else { Err(free) }
                }
                _ => Ok(()),
            },
            Kind::Buckets(b) => {
                // The ring no longer holds buckets from before the newest one's window, so a
                // lagging `now` is judged at the newest time instead (clock reads taken by
                // threads racing for the lock differ by far less than a bucket anyway).
                let now = now.max(self.newest);
                // Every bucket that overlaps (now - window, now] counts in full, since we do not
                // know where within it its admissions fell.
                let first = now.saturating_sub(self.len) / b.width;
                let lo = first.max(b.head.saturating_sub(SLOTS as u64 - 1));
                let slot = |j: u64| b.counts[(j % SLOTS as u64) as usize];
                let total: u64 = (lo..=b.head).map(|j| u64::from(slot(j))).sum();
                if total < n {
                    return Ok(());
                }
                // Bucket j stops counting once first > j, at (j + 1) * width + window. Drop
                // buckets oldest first until the total falls below N.
                let mut left = total;
                for j in lo..=b.head {
                    left -= u64::from(slot(j));
                    if left < n {
                        return Err(j
                            .saturating_add(1)
                            .saturating_mul(b.width)
                            .saturating_add(self.len));
                    }
                }
                // `left` reaches 0 < n at the latest in the loop's last round.
                Ok(())
            }
        }
    }

    /// Records an admission at `now` (or at the newest recorded time, if `now` lags behind it,
    /// which keeps the log sorted).
    fn record(&mut self, now: u64) {
        let now = now.max(self.newest);
        self.newest = now;
        match &mut self.kind {
            Kind::Log(times) => {
                if times.len() >= self.rate.count as usize {
                    times.pop_front();
                }
                times.push_back(now);
            }
            Kind::Buckets(b) => {
                let cur = now / b.width;
                if cur > b.head {
                    // Clear the slots of the buckets skipped over: they held buckets that have
                    // long left every window that can still be asked about.
                    let stale = (cur - b.head).min(SLOTS as u64);
                    for j in cur - stale + 1..=cur {
                        b.counts[(j % SLOTS as u64) as usize] = 0;
                    }
                    b.head = cur;
                }
                let c = &mut b.counts[(cur % SLOTS as u64) as usize];
                *c = c.saturating_add(1);
            }
        }
    }

    /// Admissions counted against the window at `now` (for `/butler/usage`).
    fn count(&self, now: u64) -> u64 {
        match &self.kind {
            Kind::Log(times) => {
                times.iter().filter(|t| t.saturating_add(self.len) > now).count() as u64
            }
            Kind::Buckets(b) => {
                let now = now.max(self.newest);
                let first = now.saturating_sub(self.len) / b.width;
                let lo = first.max(b.head.saturating_sub(SLOTS as u64 - 1));
                (lo..=b.head).map(|j| u64::from(b.counts[(j % SLOTS as u64) as usize])).sum()
            }
        }
    }

    /// An entry whose newest admission has left its window admits exactly what a fresh entry
    /// would, so dropping it changes nothing but the memory it held.
    fn is_idle(&self, now: u64) -> bool {
        self.newest.saturating_add(self.len) <= now
    }
}

/// Per-subject limits plus one optional global limit.
///
/// One mutex covers the subject map and another the global window, always taken in that order:
/// the decision "both admit" and the recording in both must be one atomic step, or two threads
/// could each see one free slot and both take it. Critical sections are a hash lookup and a few
/// integer operations, so the serialisation costs little next to proxying a request.
pub struct RateLimiter {
    /// Set from the first `now` seen rather than at construction, so that instants captured just
    /// before the limiter was built are not all squashed onto the same time.
    base: OnceLock<Instant>,
    subjects: Mutex<Subjects>,
    global: Mutex<Option<Window>>,
}

struct Subjects {
    map: HashMap<String, Window>,
    /// The map size at which the next sweep for idle entries runs.
    sweep_at: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is consistent after every statement that changes it, so a panic elsewhere while
    // the lock was held leaves nothing to repair.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RateLimiter {
    pub fn new(global: Option<Rate>) -> RateLimiter {
        RateLimiter {
            base: OnceLock::new(),
            subjects: Mutex::new(Subjects { map: HashMap::new(), sweep_at: SWEEP_MIN }),
            global: Mutex::new(global.map(Window::new)),
        }
    }

    /// Changes the global limit (a config reload). Its state carries over
    /// when the rate is unchanged, and starts afresh under a new rate.
    pub fn set_global(&self, rate: Option<Rate>) {
        let mut global = lock(&self.global);
        if global.as_ref().map(|w| w.rate) != rate {
            *global = rate.map(Window::new);
        }
    }

    /// Admits or refuses one request of `subject` whose own limit is `rate` (None = no subject
    /// limit), at `now`. Checks the subject first, then the global limit; records the request in
    /// both only when both admit it.
    ///
    /// `rate` is passed on every call rather than configured once so that a reload can change a
    /// client's limit: a subject whose rate differs from the one its state was built for starts
    /// afresh under the new rate.
    pub fn check(&self, subject: &str, rate: Option<Rate>, now: Instant) -> Result<(), Limited> {
        let base = *self.base.get_or_init(|| now);
        // A `now` before the base (a thread that captured it early) counts as the base.
        let now = u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX);
        let refused =
            |at: u64| Limited { retry_after: Duration::from_nanos(at.saturating_sub(now)) };

        let mut subjects = lock(&self.subjects);
        match rate {
            Some(rate) => {
                // A subject with no entry (or one built for another rate) starts empty.
                match subjects.map.get(subject).filter(|w| w.rate == rate) {
                    Some(w) => w.admit(now),
                    None => Window::new(rate).admit(now),
                }
                .map_err(refused)?;
            }
            None => {
                subjects.map.remove(subject);
            }
        }
        let mut global = lock(&self.global);
        if let Some(g) = global.as_ref() {
            g.admit(now).map_err(refused)?;
        }

        if let Some(g) = global.as_mut() {
            g.record(now);
        }
        if let Some(rate) = rate {
            match subjects.map.get_mut(subject) {
                Some(w) if w.rate == rate => w.record(now),
                Some(w) => {
                    *w = Window::new(rate);
                    w.record(now);
                }
                None => {
                    subjects.insert(subject, rate, now);
                }
            }
        }
        Ok(())
    }
}

impl RateLimiter {
    /// How many of `subject`'s requests count against its `rate` at `now`.
    pub fn used(&self, subject: &str, rate: Rate, now: Instant) -> u64 {
        let Some(base) = self.base.get() else { return 0 };
        let now =
            u64::try_from(now.saturating_duration_since(*base).as_nanos()).unwrap_or(u64::MAX);
        lock(&self.subjects).map.get(subject).filter(|w| w.rate == rate).map_or(0, |w| w.count(now))
    }
}

impl Subjects {
    /// Adds a new subject's window, first dropping idle entries if the map has grown enough to
    /// make that worthwhile, so memory follows the number of recently active subjects rather
    /// than every name ever seen.
    fn insert(&mut self, subject: &str, rate: Rate, now: u64) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, w| !w.is_idle(now));
            self.sweep_at = (self.map.len() * 2).max(SWEEP_MIN);
            if self.map.capacity() > self.sweep_at * 2 {
                self.map.shrink_to(self.sweep_at);
            }
        }
        let mut w = Window::new(rate);
        w.record(now);
        self.map.insert(subject.to_owned(), w);
    }
}

/// A window as a short duration (`1m`, `1h`, `1d`, `30s`), as
/// `/butler/usage` reports it.
pub fn window_text(window: Duration) -> String {
    let s = window.as_secs();
    match s {
        0 => format!("{}ms", window.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Requests in flight per key (`max_concurrent`, `global_max_concurrent`).
/// A key's entry exists only while it has requests in flight, so memory is
/// bounded by the number of requests being served.
#[derive(Debug, Default)]
pub struct Concurrency {
    in_flight: Mutex<HashMap<String, usize>>,
}

/// One admitted request; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a> {
    owner: &'a Concurrency,
    key: String,
}

impl Concurrency {
    pub fn new() -> Concurrency {
        Concurrency::default()
    }

    /// Takes a slot for `key` if fewer than `max` are in flight.
    pub fn try_acquire(&self, key: &str, max: usize) -> Option<Slot<'_>> {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Slot { owner: self, key: key.to_owned() })
    }

    #[cfg(test)]
    fn count(&self, key: &str) -> usize {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut map = self.owner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Most client addresses whose failed authentications are remembered (SPEC §5
/// `auth_failure_limit`). A client that owns many addresses (an IPv6 prefix, a
/// botnet) could otherwise grow the map without end. At the default `30/min`
/// an entry costs a few hundred bytes, so the table stays within a few MiB.
pub const MAX_FAILURE_ADDRESSES: usize = 16_384;

/// Failed authentications per client address (SPEC §5): once an address has
/// `auth_failure_limit` failures in the sliding window, its requests that need
/// credentials are refused unchecked until the oldest failure leaves the
/// window. Shared across reloads, like every limiter (SPEC §11).
///
/// The table holds at most [`MAX_FAILURE_ADDRESSES`] addresses. When it is
/// full, addresses whose failures have all left the window go first (they
/// decide nothing any more); if that frees too little, the addresses whose
/// latest failure is oldest go next, down to 7/8 of the cap so the sweep is
/// paid once per many insertions. An evicted address simply starts afresh.
pub struct AuthFailures {
    base: OnceLock<Instant>,
    state: Mutex<Failures>,
}

struct Failures {
    /// `None`: `unlimited`, nothing is counted.
    rate: Option<Rate>,
    map: HashMap<std::net::IpAddr, Window>,
}

impl AuthFailures {
    pub fn new(rate: Option<Rate>) -> AuthFailures {
        AuthFailures {
            base: OnceLock::new(),
            state: Mutex::new(Failures { rate, map: HashMap::new() }),
        }
    }

    /// A config reload: the counts carry over when the limit is unchanged and
    /// start afresh under a new one (as subject rate limits do).
    pub fn set_rate(&self, rate: Option<Rate>) {
        let mut state = lock(&self.state);
        if state.rate != rate {
            state.rate = rate;
            state.map = HashMap::new();
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        let base = *self.base.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether `addr` may present credentials at `now`; a refusal says when
    /// the oldest of its failures leaves the window.
    pub fn check(&self, addr: std::net::IpAddr, now: Instant) -> Result<(), Limited> {
        let now = self.nanos(now);
        let state = lock(&self.state);
        match state.map.get(&addr) {
            Some(w) => w.admit(now).map_err(|at| Limited {
                retry_after: Duration::from_nanos(at.saturating_sub(now)),
            }),
            None => Ok(()),
        }
    }

    /// Counts one refused credential from `addr` at `now`.
    pub fn record(&self, addr: std::net::IpAddr, now: Instant) {
        let now = self.nanos(now);
        let mut state = lock(&self.state);
        let Some(rate) = state.rate else { return };
        if let Some(w) = state.map.get_mut(&addr) {
            w.record(now);
            return;
        }
        if state.map.len() >= MAX_FAILURE_ADDRESSES {
            state.evict(now);
        }
        let mut w = Window::new(rate);
        w.record(now);
        state.map.insert(addr, w);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.state).map.len()
    }
}

impl Failures {
    /// Makes room: idle addresses first, then those whose latest failure is
    /// oldest, down to 7/8 of the cap.
    fn evict(&mut self, now: u64) {
        self.map.retain(|_, w| !w.is_idle(now));
        let keep = MAX_FAILURE_ADDRESSES / 8 * 7;
        if self.map.len() > keep {
            let mut newest: Vec<u64> = self.map.values().map(|w| w.newest).collect();
            let cut = self.map.len() - keep;
            // The `cut`-th oldest latest failure: everything at or before it goes.
            let (_, &mut threshold, _) = newest.select_nth_unstable(cut - 1);
            let mut left = cut;
            self.map.retain(|_, w| {
                if left > 0 && w.newest <= threshold {
                    left -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const MS: Duration = Duration::from_millis(1);

    fn rate(s: &str) -> Rate {
        match Rate::parse(s) {
            Ok(Some(r)) => r,
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_all_units_and_spellings() {
        for (s, count, secs) in [
            ("1/s", 1, 1),
            ("2/sec", 2, 1),
            ("3/second", 3, 1),
            ("60/m", 60, 60),
            ("60/min", 60, 60),
            ("60/minute", 60, 60),
            ("100/h", 100, 3_600),
            ("100/hour", 100, 3_600),
            ("1000/d", 1000, 86_400),
            ("1000/day", 1000, 86_400),
            ("  5/min\t", 5, 60),
            ("007/s", 7, 1),
            ("4294967295/d", u32::MAX, 86_400),
        ] {
            assert_eq!(rate(s), Rate { count, window: Duration::from_secs(secs) }, "{s:?}");
        }
        assert_eq!(Rate::parse("unlimited"), Ok(None));
        assert_eq!(Rate::parse(" unlimited "), Ok(None));
    }

    #[test]
    fn rejects_malformed_rates() {
        for s in [
            "",
            "5",
            "/min",
            "5/",
            "0/min",
            "00/s",
            "-1/min",
            "+1/min",
            "1.5/min",
            "1e3/min",
            "5/week",
            "5/Min",
            "5 /min",
            "5/ min",
            "5/min/s",
            "4294967296/s",
            "Unlimited",
            "unlimited/s",
            "five/min",
        ] {
            assert!(Rate::parse(s).is_err(), "{s:?} was accepted");
        }
        assert_eq!(
            Rate::parse("5/week"),
            Err(r#"invalid rate "5/week" (use e.g. 60/min, 1000/day or unlimited)"#.to_owned())
        );
        assert!(Rate::parse("0/min").is_err_and(|e| e.contains("at least 1")));
        assert!(Rate::parse("4294967296/s").is_err_and(|e| e.contains("at most 4294967295")));
    }

    #[test]
    fn display_round_trips() {
        for (s, shown) in
            [("60/minute", "60/min"), ("2/sec", "2/s"), ("5/hour", "5/h"), ("9/day", "9/d")]
        {
            assert_eq!(rate(s).to_string(), shown);
            assert_eq!(rate(shown), rate(s));
        }
        let odd = Rate { count: 3, window: Duration::from_secs(90) };
        assert_eq!(odd.to_string(), "3 per 90s");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let secs = |ms| Limited { retry_after: MS * ms }.retry_after_secs();
        assert_eq!(secs(0), 1);
        assert_eq!(secs(200), 1);
        assert_eq!(secs(1000), 1);
        assert_eq!(secs(1200), 2);
        assert_eq!(secs(59_001), 60);
    }

    #[test]
    fn three_per_minute() {
        let t0 = Instant::now();
        let l = RateLimiter::new(None);
        let r = Some(rate("3/min"));
        assert_eq!(l.check("a", r, t0), Ok(()));
        assert_eq!(l.check("a", r, t0 + MS * 10_000), Ok(()));
        assert_eq!(l.check("a", r, t0 + MS * 20_000), Ok(()));
        let e = l.check("a", r, t0 + MS * 30_000).unwrap_err();
        assert_eq!(e.retry_after, MS * 30_000);
        assert_eq!(e.retry_after_secs(), 30);
        // Another subject has its own quota.
        assert_eq!(l.check("b", r, t0 + MS * 30_000), Ok(()));
        // Just before the first admission leaves the window: still refused, for 1 ms more.
        let e = l.check("a", r, t0 + MS * 59_999).unwrap_err();
        assert_eq!(e.retry_after, MS);
        assert_eq!(e.retry_after_secs(), 1);
        // Exactly a window after it: admitted (the window is (now - 60 s, now]).
        assert_eq!(l.check("a", r, t0 + MS * 60_000), Ok(()));
        let e = l.check("a", r, t0 + MS * 60_000).unwrap_err();
        assert_eq!(e.retry_after, MS * 10_000);
    }

    #[test]
    fn no_double_burst_across_a_boundary() {
        let t0 = Instant::now();
        let l = RateLimiter::new(None);
        let r = Some(rate("2/s"));
        // Pin the base so the offsets below are the limiter's times.
        assert_eq!(l.check("other", r, t0), Ok(()));
        assert_eq!(l.check("a", r, t0 + MS * 900), Ok(()));
        assert_eq!(l.check("a", r, t0 + MS * 900), Ok(()));
        let e = l.check("a", r, t0 + MS * 1100).unwrap_err();
        assert_eq!(e.retry_after, MS * 800);
        assert!(l.check("a", r, t0 + MS * 1899).is_err());
        assert_eq!(l.check("a", r, t0 + MS * 1900), Ok(()));
        assert_eq!(l.check("a", r, t0 + MS * 1900), Ok(()));
        assert!(l.check("a", r, t0 + MS * 2000).is_err());
    }

    #[test]
    fn two_then_two_more_after_the_window() {
        // What an integration test does: 2 requests, a pause of about 1.1 s, 2 more.
        let t0 = Instant::now();
        let l = RateLimiter::new(Some(rate("2/s")));
        assert_eq!(l.check("a", Some(rate("2/s")), t0), Ok(()));
        assert_eq!(l.check("a", Some(rate("2/s")), t0 + MS * 3), Ok(()));
        assert!(l.check("a", Some(rate("2/s")), t0 + MS * 5).is_err());
        assert_eq!(l.check("a", Some(rate("2/s")), t0 + MS * 1100), Ok(()));
        assert_eq!(l.check("a", Some(rate("2/s")), t0 + MS * 1103), Ok(()));
        assert!(l.check("a", Some(rate("2/s")), t0 + MS * 1104).is_err());
    }

    #[test]
    fn subject_refusal_leaves_global_quota_intact() {
        let t0 = Instant::now();
        let l = RateLimiter::new(Some(rate("3/min")));
        let one = Some(rate("1/min"));
        assert_eq!(l.check("a", one, t0), Ok(()));
        for _ in 0..10 {
            let e = l.check("a", one, t0).unwrap_err();
            assert_eq!(e.retry_after, Duration::from_secs(60));
        }
        // The global limit saw one request only: two more fit.
        assert_eq!(l.check("b", None, t0), Ok(()));
        assert_eq!(l.check("c", None, t0), Ok(()));
        assert!(l.check("d", None, t0).is_err());
    }

    #[test]
    fn global_refusal_leaves_subject_quota_intact() {
        let t0 = Instant::now();
        let l = RateLimiter::new(Some(rate("2/min")));
        let two = Some(rate("2/min"));
        assert_eq!(l.check("x", None, t0), Ok(()));
        assert_eq!(l.check("y", None, t0 + MS * 1000), Ok(()));
        for _ in 0..5 {
            let e = l.check("a", two, t0 + MS * 2000).unwrap_err();
            // The global limit refused, so its retry time is reported.
            assert_eq!(e.retry_after, MS * 58_000);
        }
        // Once the global limit frees up, "a" still has both of its requests.
        assert_eq!(l.check("a", two, t0 + MS * 60_000), Ok(()));
        assert_eq!(l.check("a", two, t0 + MS * 61_000), Ok(()));
        let e = l.check("a", two, t0 + MS * 61_000).unwrap_err();
        assert_eq!(e.retry_after, MS * 59_000);
    }

    #[test]
    fn no_subject_limit_and_rate_changes() {
        let t0 = Instant::now();
        let l = RateLimiter::new(None);
        for _ in 0..100 {
            assert_eq!(l.check("a", None, t0), Ok(()));
        }
        let one = Some(rate("1/min"));
        assert_eq!(l.check("a", one, t0), Ok(()));
        assert!(l.check("a", one, t0).is_err());
        // A reload changed the client's limit: it starts afresh under the new one.
        let two = Some(rate("2/min"));
        assert_eq!(l.check("a", two, t0), Ok(()));
        assert_eq!(l.check("a", two, t0), Ok(()));
        assert!(l.check("a", two, t0).is_err());
        // Unlimited now; the old state is dropped.
        assert_eq!(l.check("a", None, t0), Ok(()));
        assert!(!lock(&l.subjects).map.contains_key("a"));
    }

    #[test]
    fn concurrent_requests_never_over_admit() {
        let t0 = Instant::now();
        let l = RateLimiter::new(None);
        let r = Some(rate("50/min"));
        let barrier = Barrier::new(200);
        let admitted = std::thread::scope(|s| {
            let handles: Vec<_> = (0..200)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        l.check("shared", r, t0).is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap_or(false))).sum::<usize>()
        });
        assert_eq!(admitted, 50);

        // The same through the global limit, with every thread its own subject.
        let l = RateLimiter::new(Some(rate("50/min")));
        let barrier = Barrier::new(200);
        let admitted = std::thread::scope(|s| {
            let handles: Vec<_> = (0..200)
                .map(|i| {
                    let (l, barrier) = (&l, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        l.check(&format!("c{i}"), Some(rate("10/min")), t0).is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap_or(false))).sum::<usize>()
        });
        assert_eq!(admitted, 50);
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Prng(u64);
    impl Prng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Drives one window with random bursts and pauses and checks what it promises: never more
    /// than N admissions within any window's length, a refusal's retry time is when a retry
    /// first succeeds, and (for the exact log) refusals only when N already lie in the window.
    fn exercise(rate: Rate, seed: u64, steps: usize, exact: bool) {
        let mut rng = Prng(seed);
        let mut w = Window::new(rate);
        let len = w.len;
        let n = rate.count as usize;
        let mut admitted: Vec<u64> = Vec::new();
        let mut now = 0u64;
        // admitted[lo..] are the admissions inside (now - window, now].
        let mut lo = 0;
        for _ in 0..steps {
            now += match rng.below(10) {
                0 => rng.below(len * 2),
                1..=3 => rng.below(len / 16),
                _ => rng.below(len / n as u64 / 2 + 1),
            };
            let burst = 1 + rng.below(n as u64 / 4 + 1);
            for _ in 0..burst {
                while lo < admitted.len() && admitted[lo] + len <= now {
                    lo += 1;
                }
                let in_window = admitted.len() - lo;
                match w.admit(now) {
                    Ok(()) => {
                        assert!(in_window < n, "admitted with {in_window} in the window");
                        w.record(now);
                        admitted.push(now);
                    }
                    Err(at) => {
                        assert!(at > now);
                        if exact {
                            assert_eq!(in_window, n);
                        }
                        let mut later = w.clone();
                        assert!(later.admit(at - 1).is_err());
                        assert_eq!(later.admit(at), Ok(()));
                        later.record(at);
                        break;
                    }
                }
            }
        }
        for pair in admitted.windows(n + 1) {
            assert!(pair[n] - pair[0] >= len, "more than {n} within {len} ns");
        }
        assert!(admitted.len() > n, "the test admitted too little to mean anything");
    }

    #[test]
    fn exact_log_matches_the_sliding_window() {
        for (seed, r) in [(1, "2/s"), (2, "3/min"), (3, "50/min"), (4, "4096/h")] {
            let r = rate(r);
            assert!(matches!(Window::new(r).kind, Kind::Log(_)));
            exercise(r, seed, 3000, true);
        }
    }

    #[test]
    fn bucketed_variant_never_exceeds_n_in_any_window() {
        for (seed, r) in [(5, "4097/s"), (6, "5000/min"), (7, "10000/h")] {
            let r = rate(r);
            assert!(matches!(Window::new(r).kind, Kind::Buckets(_)));
            exercise(r, seed, 400, false);
        }
        // Odd window lengths that 64 does not divide.
        let r = Rate { count: 5000, window: Duration::from_nanos(1_000_003) };
        exercise(r, 8, 400, false);
    }

    #[test]
    fn bucketed_variant_refuses_at_most_one_bucket_longer() {
        let r = rate("6400/min");
        let mut w = Window::new(r);
        let bucket = w.len / BUCKETS;
        for _ in 0..6400 {
            assert_eq!(w.admit(0), Ok(()));
            w.record(0);
        }
        assert_eq!(w.admit(w.len - 1), Err(w.len + bucket));
        assert!(w.admit(w.len + bucket - 1).is_err());
        assert_eq!(w.admit(w.len + bucket), Ok(()));
    }

    #[test]
    fn idle_subjects_are_evicted() {
        let t0 = Instant::now();
        let l = RateLimiter::new(None);
        let r = Some(rate("1/s"));
        let mut most = 0;
        // A new subject every 10 ms, each active for 1 s: about 100 alive at any time.
        for i in 0..20_000u32 {
            assert_eq!(l.check(&format!("client-{i}"), r, t0 + MS * 10 * i), Ok(()));
            most = most.max(lock(&l.subjects).map.len());
        }
        assert!(most <= SWEEP_MIN, "the map grew to {most}");
        // An evicted subject is simply fresh again; a live one keeps its state.
        let end = t0 + MS * 200_000;
        assert_eq!(l.check("client-0", r, end), Ok(()));
        assert!(l.check("client-19999", r, t0 + MS * 199_995).is_err());
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now();
        let l = RateLimiter::new(Some(rate("2/s")));
        let r = Some(rate("2/s"));
        assert_eq!(l.check("a", r, t0 + MS * 500), Ok(()));
        // Captured before the first call (and before the base): treated as the base time.
        assert_eq!(l.check("a", r, t0), Ok(()));
        let e = l.check("a", r, t0).unwrap_err();
        assert!(e.retry_after >= MS * 1000);
        assert!(l.check("a", r, t0 + MS * 1499).is_err());
        assert_eq!(l.check("a", r, t0 + MS * 1500), Ok(()));
        // A lagging `now` inside the bucketed variant does not panic either.
        let big = Some(rate("5000/s"));
        assert_eq!(l.check("b", big, t0 + MS * 2600), Ok(()));
        assert_eq!(l.check("b", big, t0 + MS * 2550), Ok(()));
    }

    #[test]
    fn a_lagging_now_never_moves_time_backwards() {
        for (r, exact) in [(rate("2/s"), true), (rate("5000/s"), false)] {
            let mut w = Window::new(r);
            let ms = 1_000_000;
            for _ in 0..r.count - 1 {
                w.record(0);
            }
            w.record(1500 * ms);
            // The oldest left the window at 1 s, but a request whose clock read said 0.8 s is
            // judged at 0.8 s by the log, where all N still count; the buckets judge it at
            // 1.5 s, as they no longer know what lay before.
            assert_eq!(w.admit(800 * ms).is_err(), exact);
            assert_eq!(w.admit(1500 * ms), Ok(()));
            // Recorded at the newest time, never earlier.
            w.record(800 * ms);
            assert_eq!(w.newest, 1500 * ms);
        }
    }

    #[test]
    fn hand_built_odd_rates_do_not_panic() {
        let t0 = Instant::now();
        let l = RateLimiter::new(None);
        let zero = Some(Rate { count: 0, window: Duration::from_secs(1) });
        assert!(l.check("a", zero, t0).is_err());
        let instant = Some(Rate { count: 1, window: Duration::ZERO });
        assert_eq!(l.check("b", instant, t0), Ok(()));
        assert_eq!(l.check("b", instant, t0), Ok(()));
        let huge = Some(Rate { count: 1, window: Duration::MAX });
        assert_eq!(l.check("c", huge, t0), Ok(()));
        let e = l.check("c", huge, t0 + MS).unwrap_err();
        assert!(e.retry_after_secs() > 1_000_000);
        let huge_big = Some(Rate { count: u32::MAX, window: Duration::MAX });
        assert_eq!(l.check("d", huge_big, t0), Ok(()));
    }

    #[test]
    fn concurrency_slots_are_bounded_and_freed() {
        let c = Concurrency::new();
        let a = c.try_acquire("a", 2).unwrap();
        let b = c.try_acquire("a", 2).unwrap();
        assert!(c.try_acquire("a", 2).is_none());
        assert!(c.try_acquire("b", 1).is_some(), "keys are independent");
        drop(a);
        assert_eq!(c.count("a"), 1);
        let again = c.try_acquire("a", 2).unwrap();
        drop((b, again));
        assert!(c.in_flight.lock().unwrap().is_empty(), "idle keys leave no entry");
        assert!(c.try_acquire("z", 0).is_none());
        assert!(c.in_flight.lock().unwrap().is_empty());
    }

    #[test]
    fn the_global_limit_can_change_and_keeps_state_when_unchanged() {
        let t0 = Instant::now();
        let two = Rate::parse("2/min").unwrap();
        let l = RateLimiter::new(two);
        assert!(l.check("a", None, t0).is_ok());
        assert!(l.check("b", None, t0).is_ok());
        assert!(l.check("c", None, t0).is_err());
        l.set_global(two);
        assert!(l.check("c", None, t0).is_err(), "same rate: state carries over");
        l.set_global(Rate::parse("3/min").unwrap());
        assert!(l.check("c", None, t0).is_ok(), "new rate: fresh window");
        l.set_global(None);
        for _ in 0..10 {
            assert!(l.check("c", None, t0).is_ok());
        }
    }

    #[test]
    fn used_counts_admissions_in_the_window() {
        let t0 = Instant::now();
        let rate = Rate::parse("3/s").unwrap().unwrap();
        let l = RateLimiter::new(None);
        assert_eq!(l.used("a", rate, t0), 0);
        l.check("a", Some(rate), t0).unwrap();
        l.check("a", Some(rate), t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(l.used("a", rate, t0 + Duration::from_millis(600)), 2);
        assert_eq!(l.used("a", rate, t0 + Duration::from_millis(1200)), 1);
        assert_eq!(l.used("a", Rate::parse("9/s").unwrap().unwrap(), t0), 0, "another rate");
    }

    fn ip(n: u32) -> std::net::IpAddr {
        std::net::IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn failed_authentications_block_an_address_until_one_leaves_the_window() {
        let t0 = Instant::now();
        let f = AuthFailures::new(Some(rate("3/min")));
        let a = ip(1);
        for i in 0..3 {
            assert_eq!(f.check(a, t0 + MS * 1000 * i), Ok(()));
            f.record(a, t0 + MS * 1000 * i);
        }
        // Three failures at 0 s, 1 s and 2 s: blocked until the first leaves, at 60 s.
        let e = f.check(a, t0 + MS * 10_000).unwrap_err();
        assert_eq!(e.retry_after, MS * 50_000);
        assert_eq!(e.retry_after_secs(), 50);
        assert_eq!(f.check(a, t0 + MS * 59_999).unwrap_err().retry_after_secs(), 1);
        // Other addresses are unaffected.
        assert_eq!(f.check(ip(2), t0 + MS * 10_000), Ok(()));
        // One failure left the window: one more try, and a failure blocks again until 61 s.
        assert_eq!(f.check(a, t0 + MS * 60_000), Ok(()));
        f.record(a, t0 + MS * 60_000);
        assert_eq!(f.check(a, t0 + MS * 60_000).unwrap_err().retry_after, MS * 1000);
    }

    #[test]
    fn unlimited_counts_nothing_and_a_reload_keeps_or_resets_the_counts() {
        let t0 = Instant::now();
        let f = AuthFailures::new(None);
        for _ in 0..100 {
            f.record(ip(1), t0);
        }
        assert_eq!(f.check(ip(1), t0), Ok(()));
        assert_eq!(f.len(), 0);

        let two = Rate::parse("2/min").unwrap();
        f.set_rate(two);
        f.record(ip(1), t0);
        f.record(ip(1), t0);
        assert!(f.check(ip(1), t0).is_err());
        f.set_rate(two);
        assert!(f.check(ip(1), t0).is_err(), "same limit: the counts carry over");
        f.set_rate(Rate::parse("5/min").unwrap());
        assert_eq!(f.check(ip(1), t0), Ok(()), "new limit: counted afresh");
        f.set_rate(None);
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn the_failure_table_is_bounded_and_evicts_idle_then_oldest() {
        let t0 = Instant::now();
        let f = AuthFailures::new(Some(rate("2/min")));
        // A blocked address, failing early on.
        let blocked = ip(u32::MAX);
        f.record(blocked, t0);
        f.record(blocked, t0);
        // Many addresses failing once each, long ago: idle by the time the table fills.
        for i in 0..MAX_FAILURE_ADDRESSES as u32 / 2 {
            f.record(ip(i), t0 + MS);
        }
        // The rest fail later, inside the window.
        let later = t0 + MS * 120_000;
        f.record(blocked, later);
        f.record(blocked, later);
        for i in MAX_FAILURE_ADDRESSES as u32 / 2..MAX_FAILURE_ADDRESSES as u32 + 100 {
            f.record(ip(i), later + MS * i);
            assert!(f.len() <= MAX_FAILURE_ADDRESSES);
        }
        // The idle half went first; the blocked address, still in its window, stayed.
        assert!(f.check(blocked, later + MS * 30_000).is_err());
        assert_eq!(f.len(), 1 + MAX_FAILURE_ADDRESSES / 2 + 100);

        // All active: the oldest latest failures go, down to 7/8 of the cap.
        let g = AuthFailures::new(Some(rate("1/min")));
        for i in 0..MAX_FAILURE_ADDRESSES as u32 {
            g.record(ip(i), t0 + MS * i);
        }
        assert_eq!(g.len(), MAX_FAILURE_ADDRESSES);
        g.record(ip(u32::MAX), t0 + MS * 20_000);
        assert_eq!(g.len(), MAX_FAILURE_ADDRESSES / 8 * 7 + 1);
        let now = t0 + MS * 20_000;
        assert_eq!(g.check(ip(0), now), Ok(()), "the oldest was evicted");
        assert!(g.check(ip(MAX_FAILURE_ADDRESSES as u32 - 1), now).is_err(), "the newest stays");
        assert!(g.check(ip(u32::MAX), now).is_err());
    }
}
