//! The rate slot a job takes right before its send: the pool-wide rate limit and daily quota
//! (one Redis script, [`crate::store::limits`]), and this worker's share of waiting jobs per
//! account, so that one throttled account cannot take every concurrency slot.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{metrics::Metrics, sleep_or_cancel};
use crate::{
    backoff::jittered,
    config::{Account, Config},
    domain::{
        calendar::QuotaDay,
        outcome::{Outcome, later},
    },
    store::{
        Redis,
        limits::{Admission, Budget},
    },
};

/// Whether a job may go on to its send.
pub enum Gate {
    Open,
    /// Not now: a [`Outcome::Retry`] (this worker's share of waiting jobs is taken) or an
    /// [`Outcome::Park`] (the daily quota is spent). Neither spends an attempt.
    Closed(Outcome),
    /// Shutdown came first.
    Abandoned,
}

pub struct RateGate {
    redis: Redis,
    metrics: Metrics,
    quota_day: QuotaDay,
    budgets: HashMap<String, Budget>,
    /// Jobs of each account waiting for a rate slot here, and how many may.
    waiting: HashMap<String, AtomicUsize>,
    waiting_cap: usize,
}

impl RateGate {
    pub fn new(config: &Config, redis: Redis, metrics: Metrics) -> Self {
        let budget = |a: &Account| {
            Budget::new(a.effective_rate_limit(config.rate_limit), config.rate_burst, a.daily_quota.unwrap_or(0))
        };
        let waiting_cap = match config.accounts.len() {
            0 | 1 => usize::MAX,
            n => (config.concurrency as usize / n).max(1),
        };
        Self {
            redis,
            metrics,
            quota_day: QuotaDay::with_length(config.quota_day.as_secs()),
            budgets: config.accounts.iter().map(|a| (a.name.clone(), budget(a))).collect(),
            waiting: config.accounts.iter().map(|a| (a.name.clone(), AtomicUsize::new(0))).collect(),
            waiting_cap,
        }
    }

    /// Waits for the account's rate slot (sleeping the retry-after the limiter returns), unless
    /// the day's quota is spent or too many of the account's jobs already wait here.
    pub async fn admit(&self, account: &Account, cancel: &CancellationToken) -> Gate {
        let Some(budget) = self.budgets.get(&account.name).filter(|b| !b.is_unlimited()) else { return Gate::Open };
        let Some(waiting) = self.waiting.get(&account.name) else { return Gate::Open };
        loop {
            let now = Utc::now();
            let wait = match self.redis.admit(&account.appid, budget, &self.quota_day.key(now)).await {
                Ok(Admission::Granted) => return Gate::Open,
                Ok(Admission::Wait(wait)) => wait,
                Ok(Admission::QuotaSpent { used }) => {
                    let why = format!(
                        "daily quota of {} sends reached ({used} counted); jobs parked until it resets",
                        budget.daily_quota
                    );
                    return Gate::Closed(Outcome::Park { until: later(now, self.quota_day.until_reset(now)), why });
                }
                Err(e) => {
                    warn!(error = &e as &dyn std::error::Error, "cannot reach the rate limiter; the job waits");
                    jittered(Duration::from_millis(500))
                }
            };
            self.metrics.of(&account.name).rate_waits.increment(1);
            if waiting.fetch_add(1, Ordering::Relaxed) >= self.waiting_cap {
                waiting.fetch_sub(1, Ordering::Relaxed);
                let why = "rate limit: the account's share of this worker is busy waiting".to_owned();
                return Gate::Closed(Outcome::Retry { after: wait, why });
            }
            let slept = sleep_or_cancel(cancel, wait).await;
            waiting.fetch_sub(1, Ordering::Relaxed);
            if !slept {
                return Gate::Abandoned;
            }
        }
    }
}
