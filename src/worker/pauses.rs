//! Account-wide pauses (45011 for a minute, 45009 or a spent quota until the daily reset),
//! shared through Redis so the whole pool holds back, and cached here so that a job reads Redis
//! for them at most every 250 ms.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::warn;

use super::metrics::Metrics;
use crate::{
    config::Account,
    store::{Redis, limits::Pause},
};

const RECHECK: Duration = Duration::from_millis(250);

/// When the pause of an account was last read, and until when it runs.
type Seen = (Instant, Option<(Instant, Pause)>);

/// The pool's pauses, as this worker last saw them.
pub struct Pauses {
    redis: Redis,
    metrics: Metrics,
    seen: Mutex<HashMap<String, Seen>>,
}

impl Pauses {
    pub fn new(redis: Redis, metrics: Metrics) -> Self {
        Self { redis, metrics, seen: Mutex::new(HashMap::new()) }
    }

    /// The account's pause, if one runs: what is left of it, and why.
    pub async fn of(&self, account: &Account) -> Option<(Duration, Pause)> {
        let now = Instant::now();
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((checked, pause)) = seen.get(&account.appid)
                && now.duration_since(*checked) < RECHECK
            {
                return pause.as_ref().filter(|(until, _)| *until > now).map(|(until, p)| (*until - now, p.clone()));
            }
        }
        let pause = match self.redis.account_pause(&account.appid).await {
            Ok(p) => p,
            // Redis trouble shows up at the claim right after; don't block on it here.
            Err(_) => return None,
        };
        self.remember(&account.appid, now, pause.as_ref().map(|(left, p)| (now + *left, p.clone())));
        pause
    }

    /// Pauses the account across the pool for `for_`.
    pub async fn pause(&self, account: &Account, for_: Duration, pause: Pause) {
        warn!(account = %account.name, pause_secs = for_.as_secs_f64(), "{}", pause.why);
        self.metrics.of(&account.name).pauses.increment(1);
        let now = Instant::now();
        if let Err(e) = self.redis.pause_account(&account.appid, for_, &pause).await {
            warn!(error = &e as &dyn std::error::Error, "could not share the account's pause with the pool");
        }
        self.remember(&account.appid, now, Some((now + for_, pause)));
    }

    fn remember(&self, appid: &str, at: Instant, pause: Option<(Instant, Pause)>) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(appid.to_owned(), (at, pause));
    }
}
