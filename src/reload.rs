//! Configuration reload (SPEC §11): SIGHUP or a change of the file builds a
//! new pipeline and swaps it in. A bad new configuration is refused with an
//! error log and the old one keeps serving; requests in flight finish under
//! the pipeline they started with; rate-limit state of unchanged subjects,
//! requests in flight and metrics carry over.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::app::App;
use crate::config::Config;
use crate::http::{Exchange, Head, Service, TlsConfig};

/// How often the file's metadata is checked for changes (a `stat`, cheap).
const POLL: Duration = Duration::from_millis(100);
/// How long a changed file must stay unchanged before it is read (SPEC §11),
/// so that a file still being written is not loaded half-way.
const SETTLE: Duration = Duration::from_millis(250);
/// How often token-budget counters are written to `state_file`.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// The live pipeline, swapped atomically on reload.
pub struct Live {
    current: RwLock<Arc<App>>,
    path: String,
    /// What the running configuration was loaded from, to tell a real change
    /// from a touch, and the settings a reload cannot change.
    loaded: Mutex<Loaded>,
    /// The certificate new TLS connections get; a reload re-reads its files.
    tls: Option<TlsConfig>,
}

struct Loaded {
    digest: [u8; 32],
    stamp: Option<Stamp>,
    /// A stamp that differs from the loaded one, and when it was first seen:
    /// the file is read once it has stayed so for [`SETTLE`].
    pending: Option<(Stamp, Instant)>,
    fixed: Fixed,
}

/// What tells a file changed without reading it: modification time, size and
/// inode (an editor's or a deploy tool's rename gives a new one).
type Stamp = (SystemTime, u64, u64);

/// Settings bound at startup (the socket, the thread pool, the intake's
/// timeouts, the logger): a reload reports their change but cannot apply it.
#[derive(Debug, Clone, PartialEq)]
struct Fixed {
    listen: String,
    workers: usize,
    timeouts: crate::config::Timeouts,
    log_format: crate::config::LogFormat,
    /// Whether the port speaks TLS. The certificate itself is reloadable.
    tls: bool,
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed {
            listen: c.listen.clone(),
            workers: c.workers,
            timeouts: c.timeouts,
            log_format: c.log_format,
            tls: c.tls.is_some(),
        }
    }

    fn changed(&self, new: &Fixed) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.listen != new.listen {
            out.push("listen");
        }
        if self.workers != new.workers {
            out.push("workers");
        }
        if self.timeouts != new.timeouts {
            out.push("timeouts");
        }
        if self.log_format != new.log_format {
            out.push("log_format");
        }
        if self.tls != new.tls {
            out.push("tls");
        }
        out
    }
}

fn stamp(path: &str) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// The debounce (SPEC §11), as a pure step: given the loaded stamp, the
/// pending change and the stamp seen `now`, whether the file has settled
/// (stayed unchanged for [`SETTLE`]) and should be read, and the new pending
/// change.
fn settle(
    loaded: Option<Stamp>,
    pending: Option<(Stamp, Instant)>,
    seen: Option<Stamp>,
    now: Instant,
) -> (bool, Option<(Stamp, Instant)>) {
    let Some(seen) = seen else {
        // Missing for a moment (replaced by a non-atomic tool): wait for it.
        return (false, None);
    };
    if Some(seen) == loaded {
        return (false, None);
    }
    match pending {
        Some((p, since)) if p == seen => {
            if now.saturating_duration_since(since) >= SETTLE {
                (true, None)
            } else {
                (false, pending)
            }
        }
        // New, or changed again since last seen: the wait starts over.
        _ => (false, Some((seen, now))),
    }
}

fn digest_of(path: &str) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|bytes| Sha256::digest(&bytes).into())
}

impl Live {
    pub fn new(app: App, config: &Config, path: &str, tls: Option<TlsConfig>) -> Live {
        Live {
            tls,
            current: RwLock::new(Arc::new(app)),
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                digest: digest_of(path).unwrap_or_default(),
                stamp: stamp(path),
                pending: None,
                fixed: Fixed::of(config),
            }),
        }
    }

    fn current(&self) -> Arc<App> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the file again and swaps in a new pipeline; on any error the
    /// running one stays. `why` names the trigger for the log.
    pub fn reload(&self, why: &str) -> bool {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        // The stamp before the read and the digest of the very bytes parsed:
        // a write that lands during the reload leaves a stamp that differs,
        // so the watcher loads it next, instead of recording it as loaded.
        loaded.stamp = stamp(&self.path);
        loaded.pending = None;
        let result = match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                loaded.digest = Sha256::digest(text.as_bytes()).into();
                Config::parse_for_run(&text)
            }
            Err(e) => Err(vec![format!("cannot read config file {}: {e}", self.path)]),
        };
        let result =
            result.and_then(|c| App::new(&c, Some(&old)).map(|app| (c, app)).map_err(|e| vec![e]));
        // A failed file is not retried until it changes again.
        match result {
            Ok((config, app)) => {
                let fixed = Fixed::of(&config);
                let ignored = loaded.fixed.changed(&fixed);
                if !ignored.is_empty() {
                    log::warn!(settings:% = ignored.join(", ");
                        "config reload: these settings need a restart to change");
                }
                if let (Some(live), Some(new)) = (&self.tls, &config.tls) {
                    live.replace(new.clone());
                }
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(app);
                old.metrics().reloaded(true);
                log::info!(trigger = why, path = self.path.as_str(); "config reloaded");
                true
            }
            Err(errors) => {
                old.metrics().reloaded(false);
                log::error!(trigger = why, path = self.path.as_str(),
                    errors:% = errors.join("; "); "config reload failed; keeping the running config");
                false
            }
        }
    }

    /// Whether the file's content differs from what was last loaded and
    /// has stopped changing. The cheap stamp is watched until it has been
    /// the same for [`SETTLE`]; content then decides, so a touch or an
    /// editor's rewrite of the same bytes reloads nothing.
    fn changed_on_disk(&self, now: Instant) -> bool {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let seen = stamp(&self.path);
        let (settled, pending) = settle(loaded.stamp, loaded.pending, seen, now);
        loaded.pending = pending;
        if !settled {
            return false;
        }
        loaded.stamp = seen;
        digest_of(&self.path).is_some_and(|d| d != loaded.digest)
    }

    /// Writes the token-budget counters (SPEC §9: at least every 10 s and
    /// at shutdown).
    pub fn save_state(&self) {
        self.current().save_state();
    }

    /// Starts the thread that saves the counters every few seconds.
    pub fn save_periodically(self: &Arc<Live>) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new().name("butler-state".into()).spawn(move || {
            loop {
                std::thread::sleep(SAVE_EVERY);
                let Some(live) = weak.upgrade() else { return };
                live.save_state();
            }
        })?;
        Ok(())
    }

    /// Starts the thread that reloads when the file changes.
    pub fn watch_file(self: &Arc<Live>) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new().name("butler-config".into()).spawn(move || {
            loop {
                std::thread::sleep(POLL);
                let Some(live) = weak.upgrade() else { return };
                if live.changed_on_disk(Instant::now()) {
                    live.reload("file changed");
                }
            }
        })?;
        Ok(())
    }
}

impl Service for Live {
    fn handle(&self, ex: &mut Exchange<'_>) {
        // This request keeps its pipeline until it ends, whatever reloads.
        self.current().handle(ex);
    }

    fn refused(&self, peer: SocketAddr, status: u16, reason: &str) {
        self.current().refused(peer, status, reason);
    }

    fn connection_limit(&self, ip: IpAddr) -> Option<usize> {
        self.current().connection_limit(ip)
    }

    fn too_many_connections(&self, peer: SocketAddr) {
        self.current().too_many_connections(peer);
    }

    fn collect_body(&self, head: &Head) -> Option<u64> {
        self.current().collect_body(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(ms: u64) -> Stamp {
        (SystemTime::UNIX_EPOCH + MS * ms as u32, ms, 1)
    }

    #[test]
    fn a_change_is_read_once_it_has_settled() {
        let t0 = Instant::now();
        let loaded = Some(at(0));
        // Unchanged: nothing pending.
        assert_eq!(settle(loaded, None, loaded, t0), (false, None));
        // A change is first seen: the wait starts.
        let (go, pending) = settle(loaded, None, Some(at(1)), t0);
        assert!(!go);
        assert_eq!(pending, Some((at(1), t0)));
        // Still the same 249 ms later: not yet.
        assert_eq!(settle(loaded, pending, Some(at(1)), t0 + MS * 249), (false, pending));
        // Changed again (still being written): the wait starts over.
        let (go, again) = settle(loaded, pending, Some(at(2)), t0 + MS * 249);
        assert!(!go);
        assert_eq!(again, Some((at(2), t0 + MS * 249)));
        assert!(!settle(loaded, again, Some(at(2)), t0 + MS * 498).0);
        // Unchanged for 250 ms: read it.
        assert_eq!(settle(loaded, again, Some(at(2)), t0 + MS * 499), (true, None));
    }

    #[test]
    fn a_missing_or_reverted_file_cancels_the_wait() {
        let t0 = Instant::now();
        let loaded = Some(at(0));
        let pending = Some((at(1), t0));
        assert_eq!(settle(loaded, pending, None, t0 + MS * 300), (false, None));
        assert_eq!(settle(loaded, pending, loaded, t0 + MS * 300), (false, None));
    }
}
