//! The worker's per-account metrics, registered once per configured account instead of looked
//! up per job. Anything else (an unknown account in a job, an unreadable job) counts under
//! `unknown`, so job bodies cannot create metric series.

use std::{collections::HashMap, sync::Arc};

use crate::domain::result::SendStatus;

/// The `account` label of jobs whose account is not configured.
pub const UNKNOWN_ACCOUNT_LABEL: &str = "unknown";

/// One account's per-job metrics.
pub struct AccountMetrics {
    pub succeeded: metrics::Counter,
    pub failed: metrics::Counter,
    pub deferred: metrics::Counter,
    pub send_seconds: metrics::Histogram,
    pub retries: metrics::Counter,
    pub rate_waits: metrics::Counter,
    pub parked: metrics::Counter,
    pub pauses: metrics::Counter,
}

impl AccountMetrics {
    fn new(account: &str) -> Self {
        let label = || account.to_owned();
        let jobs =
            |status: &'static str| metrics::counter!("wxpush_jobs_total", "account" => label(), "status" => status);
        let this = Self {
            succeeded: jobs("succeeded"),
            failed: jobs("failed"),
            deferred: jobs("deferred"),
            send_seconds: metrics::histogram!("wxpush_send_seconds", "account" => label()),
            retries: metrics::counter!("wxpush_send_retries_total", "account" => label()),
            rate_waits: metrics::counter!("wxpush_rate_limit_waits_total", "account" => label()),
            parked: metrics::counter!("wxpush_jobs_parked_total", "account" => label()),
            pauses: metrics::counter!("wxpush_account_pauses_total", "account" => label()),
        };
        // Series exist from the start at 0, so the first increase() of a dashboard is not lost.
        for counter in
            [&this.succeeded, &this.failed, &this.deferred, &this.retries, &this.rate_waits, &this.parked, &this.pauses]
        {
            counter.increment(0);
        }
        this
    }

    /// The counter of jobs that ended with `status`.
    pub fn finished(&self, status: SendStatus) -> &metrics::Counter {
        match status {
            SendStatus::Succeeded => &self.succeeded,
            SendStatus::Failed => &self.failed,
            SendStatus::Deferred => &self.deferred,
        }
    }
}

/// The metric handles of every configured account, and of `unknown`.
#[derive(Clone)]
pub struct Metrics {
    accounts: Arc<HashMap<String, AccountMetrics>>,
    unknown: Arc<AccountMetrics>,
}

impl Metrics {
    pub fn new<'a>(accounts: impl IntoIterator<Item = &'a str>) -> Self {
        let accounts = accounts.into_iter().map(|name| (name.to_owned(), AccountMetrics::new(name))).collect();
        Self { accounts: Arc::new(accounts), unknown: Arc::new(AccountMetrics::new(UNKNOWN_ACCOUNT_LABEL)) }
    }

    /// The handles of `account`, or those labelled `unknown` when it is not configured.
    pub fn of(&self, account: &str) -> &AccountMetrics {
        self.accounts.get(account).unwrap_or(&self.unknown)
    }
}
