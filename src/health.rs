//! `/healthz` (SPEC §10): asks the upstream for `/api/version` with a short
//! timeout and caches the answer for about a second. One check runs at a time;
//! concurrent callers wait for it and share its result, so a burst of probes
//! never becomes a burst of upstream requests.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Upstream;

const CACHE_FOR: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Health {
    agent: ureq::Agent,
    url: String,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Health {
    pub fn new(upstream: &Upstream) -> Health {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_global(Some(CHECK_TIMEOUT))
            .build()
            .into();
        Health { agent, url: upstream.url("/api/version"), last: Mutex::new(None) }
    }

    /// `Ok` when the upstream answered 2xx recently.
    pub fn check(&self) -> Result<(), String> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, result)) = &*last
            && at.elapsed() < CACHE_FOR
        {
            return result.clone();
        }
        let result = match self.agent.get(&self.url).call() {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("upstream answered {}", r.status().as_u16())),
            Err(ureq::Error::Timeout(_)) => Err("upstream timeout".to_owned()),
            Err(_) => Err("upstream unavailable".to_owned()),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}
