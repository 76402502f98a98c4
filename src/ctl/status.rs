//! `wxpush-ctl status`: what the pool shares in Redis per account (token age, fetch back-off,
//! today's sends against the quota, pauses) and how full the queues are.
//!
//! The access token is read to learn its age and what is left of it; its value is dropped at
//! once and never printed.

use std::time::Duration;

use chrono::Utc;
use secrecy::ExposeSecret;
use serde_json::json;

use super::{CtlError, RPC_TIMEOUT, broker, human_duration, management::Management, results::unrouted_queue, scrub};
use crate::telemetry::chain;
use crate::{
    amqp::{Topology, redact_url},
    config::{Account, Config},
    domain::calendar::QuotaDay,
    store::Redis,
};

/// The cached token, without its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Since it was fetched; `None` when the record does not say.
    pub age: Option<Duration>,
    pub remaining: Duration,
}

/// A failed token fetch the pool remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFailure {
    pub message: String,
    /// Until the pool tries again; zero when the back-off is over.
    pub retry_in: Duration,
    pub streak: u32,
}

/// One account's shared state.
#[derive(Debug, Clone)]
pub struct AccountStatus {
    pub name: String,
    pub appid: String,
    pub token: Option<TokenInfo>,
    pub fetch_failure: Option<FetchFailure>,
    /// The quota day the count is for (`yyyymmdd`, the Beijing day, unless `quota_day_secs` is
    /// shortened for a test).
    pub day: String,
    pub sent_today: u64,
    pub daily_quota: Option<u64>,
    /// What is left of a pause, and why.
    pub pause: Option<(Duration, String)>,
    /// Redis could not answer for this account.
    pub error: Option<String>,
}

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Jobs,
    /// One of the delay queues (retries, paused accounts, parked jobs).
    Delay,
    DeadLetter,
    /// Results no binding took (`<results_exchange>.unrouted`).
    Unrouted,
}

impl QueueRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            QueueRole::Jobs => "jobs",
            QueueRole::Delay => "delay",
            QueueRole::DeadLetter => "dead_letter",
            QueueRole::Unrouted => "unrouted",
        }
    }
}

/// One queue's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStatus {
    pub role: QueueRole,
    pub name: String,
    /// `false`: not declared yet (a worker declares it when it starts); the counts are 0.
    pub exists: bool,
    /// Messages ready for delivery (from AMQP, live).
    pub ready: u64,
    /// Delivered and not yet acknowledged (the management API's last sample); `None` when the
    /// management API could not say.
    pub unacknowledged: Option<u64>,
    pub consumers: u64,
}

/// Everything `status` shows.
#[derive(Debug, Clone)]
pub struct StatusReport {
    pub redis_url: String,
    pub redis_prefix: String,
    pub accounts: Vec<AccountStatus>,
    pub redis_error: Option<String>,
    pub amqp_url: String,
    /// Jobs, delay tiers (shortest first), dead-letter and unrouted queues, in that order.
    pub queues: Vec<QueueStatus>,
    pub rabbitmq_error: Option<String>,
    /// Where the unacknowledged counts come from.
    pub management_url: Option<String>,
    /// Why the unacknowledged counts are unknown.
    pub management_error: Option<String>,
}

impl StatusReport {
    /// Both services answered for everything (the management API is optional).
    pub fn is_complete(&self) -> bool {
        self.redis_error.is_none() && self.rabbitmq_error.is_none() && self.accounts.iter().all(|a| a.error.is_none())
    }

    /// The first queue with this role.
    pub fn queue(&self, role: QueueRole) -> Option<&QueueStatus> {
        self.queues.iter().find(|q| q.role == role)
    }
}

/// How `status` reaches the management API.
#[derive(Debug, Clone, Default)]
pub struct StatusOptions {
    /// The management API's URL; `None`: made from the AMQP URL.
    pub management_url: Option<String>,
}

/// Gathers the status; a service that does not answer is reported, not returned as an error.
pub async fn status(config: &Config) -> StatusReport {
    status_with(config, &StatusOptions::default()).await
}

/// [`status`], with options.
pub async fn status_with(config: &Config, options: &StatusOptions) -> StatusReport {
    let mut report = StatusReport {
        redis_url: redact_redis_url(&config.redis_url),
        redis_prefix: config.redis_prefix.clone(),
        accounts: Vec::new(),
        redis_error: None,
        amqp_url: redact_url(&config.amqp_url),
        queues: Vec::new(),
        rabbitmq_error: None,
        management_url: None,
        management_error: None,
    };
    match accounts(config).await {
        Ok(a) => report.accounts = a,
        Err(e) => report.redis_error = Some(chain(&e).to_string()),
    }
    if let Err(e) = queues(config, &mut report).await {
        report.rabbitmq_error = Some(chain(&e).to_string());
    }
    if report.rabbitmq_error.is_none() {
        unacknowledged(config, options, &mut report).await;
    }
    report
}

async fn accounts(config: &Config) -> Result<Vec<AccountStatus>, CtlError> {
    let redis = match tokio::time::timeout(RPC_TIMEOUT, Redis::connect(&config.redis_url, &config.redis_prefix)).await {
        Ok(r) => r?,
        Err(_) => return Err(CtlError::RedisTimeout { secs: RPC_TIMEOUT.as_secs() }),
    };
    match tokio::time::timeout(RPC_TIMEOUT, redis.ping()).await {
        Ok(r) => r?,
        Err(_) => return Err(CtlError::RedisTimeout { secs: RPC_TIMEOUT.as_secs() }),
    }
    let mut out = Vec::with_capacity(config.accounts.len());
    for account in &config.accounts {
        out.push(account_status(&redis, account, QuotaDay::with_length(config.quota_day.as_secs())).await);
    }
    Ok(out)
}

async fn account_status(redis: &Redis, account: &Account, quota_day: QuotaDay) -> AccountStatus {
    let now = Utc::now();
    let mut status = AccountStatus {
        name: account.name.clone(),
        appid: account.appid.clone(),
        token: None,
        fetch_failure: None,
        // Named exactly as the rate limiter names it, so the count read is the one it keeps.
        day: quota_day.key(now),
        sent_today: 0,
        daily_quota: account.daily_quota.filter(|q| *q > 0),
        pause: None,
        error: None,
    };
    let read = async {
        let snapshot = redis.read_token(&account.appid).await?;
        // Known secrets are scrubbed from text that came from Redis, in case an error message
        // ever quoted one.
        let token_value = snapshot.token.as_ref().map(|t| t.value.expose_secret().to_owned()).unwrap_or_default();
        let secrets = [account.secret.expose_secret(), token_value.as_str()];
        status.token = snapshot.token.as_ref().map(|t| TokenInfo {
            age: (t.fetched_at_ms > 0)
                .then(|| Duration::from_millis((now.timestamp_millis() - t.fetched_at_ms).max(0) as u64)),
            remaining: t.remaining,
        });
        status.fetch_failure = snapshot.failure.map(|f| FetchFailure {
            message: scrub(&f.message, &secrets),
            retry_in: f.remaining,
            streak: f.streak,
        });
        status.sent_today = redis.quota_used(&account.appid, &status.day).await?;
        status.pause =
            redis.account_pause(&account.appid).await?.map(|(left, pause)| (left, scrub(&pause.why, &secrets)));
        Ok::<(), crate::store::StoreError>(())
    };
    let outcome = tokio::time::timeout(RPC_TIMEOUT, read).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => status.error = Some(chain(&e).to_string()),
        Err(_) => status.error = Some(CtlError::RedisTimeout { secs: RPC_TIMEOUT.as_secs() }.to_string()),
    }
    status
}

/// Every queue wxpush declares (and the unrouted results queue), with its role.
fn queue_names(config: &Config) -> Vec<(QueueRole, String)> {
    let topology = Topology::from_config(config);
    let mut names = vec![(QueueRole::Jobs, config.jobs_queue.clone())];
    names.extend(topology.delay_tiers_secs.iter().map(|&secs| (QueueRole::Delay, topology.delay_queue(secs))));
    names.push((QueueRole::DeadLetter, config.dead_letter_queue.clone()));
    names.push((QueueRole::Unrouted, unrouted_queue(config)));
    names
}

async fn queues(config: &Config, report: &mut StatusReport) -> Result<(), CtlError> {
    let connection = broker::connect(config, "status").await?;
    let result = async {
        for (role, name) in queue_names(config) {
            let info = broker::queue_info(&connection, &name).await?;
            report.queues.push(QueueStatus {
                role,
                name,
                exists: info.is_some(),
                ready: info.map_or(0, |i| i.messages.into()),
                unacknowledged: None,
                consumers: info.map_or(0, |i| i.consumers.into()),
            });
        }
        Ok(())
    }
    .await;
    broker::close(&connection).await;
    result
}

/// Fills in the unacknowledged counts from the management API, or says why it cannot.
async fn unacknowledged(config: &Config, options: &StatusOptions, report: &mut StatusReport) {
    let management = match Management::new(&config.amqp_url, options.management_url.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            report.management_error = Some(chain(&e).to_string());
            return;
        }
    };
    report.management_url = Some(management.url());
    for queue in report.queues.iter_mut().filter(|q| q.exists) {
        match management.queue(&queue.name).await {
            Ok(counts) => queue.unacknowledged = Some(counts.map_or(0, |c| c.unacknowledged)),
            Err(e) => {
                // One answer is enough to know the API is not there.
                report.management_error = Some(chain(&e).to_string());
                return;
            }
        }
    }
}

impl StatusReport {
    /// The report as one JSON document (durations in seconds, secrets never included).
    pub fn to_json(&self) -> serde_json::Value {
        let secs = |d: &Duration| d.as_secs_f64();
        let accounts: Vec<serde_json::Value> = self
            .accounts
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "appid": a.appid,
                    "token": a.token.as_ref().map(|t| json!({
                        "age_secs": t.age.as_ref().map(secs),
                        "remaining_secs": secs(&t.remaining),
                    })),
                    "token_fetch_failure": a.fetch_failure.as_ref().map(|x| json!({
                        "message": x.message,
                        "retry_in_secs": secs(&x.retry_in),
                        "streak": x.streak,
                    })),
                    "quota_day": a.day,
                    "sent_today": a.sent_today,
                    "daily_quota": a.daily_quota,
                    "pause": a.pause.as_ref().map(|(left, why)| json!({"remaining_secs": secs(left), "reason": why})),
                    "error": a.error,
                })
            })
            .collect();
        let queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .map(|q| {
                json!({
                    "role": q.role.as_str(),
                    "name": q.name,
                    "exists": q.exists,
                    "ready": q.ready,
                    "unacknowledged": q.unacknowledged,
                    "consumers": q.consumers,
                })
            })
            .collect();
        json!({
            "complete": self.is_complete(),
            "redis": {"url": self.redis_url, "prefix": self.redis_prefix, "error": self.redis_error},
            "accounts": accounts,
            "rabbitmq": {
                "url": self.amqp_url,
                "error": self.rabbitmq_error,
                "management_url": self.management_url,
                "management_error": self.management_error,
            },
            "queues": queues,
        })
    }
}

/// The Redis URL(s) with any password hidden.
pub fn redact_redis_url(url: &str) -> String {
    url.split(',').map(|u| redact_url(u.trim())).collect::<Vec<_>>().join(",")
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "accounts (Redis {}, prefix {:?}):", self.redis_url, self.redis_prefix)?;
        if let Some(e) = &self.redis_error {
            writeln!(f, "  cannot read Redis: {e}")?;
        } else if self.accounts.is_empty() {
            writeln!(f, "  none configured (WXPUSH_APPID / [[accounts]])")?;
        }
        for a in &self.accounts {
            writeln!(f, "  {} (appid {})", a.name, a.appid)?;
            if let Some(e) = &a.error {
                writeln!(f, "    cannot read its state: {e}")?;
                continue;
            }
            match &a.token {
                Some(t) => {
                    let age = t.age.map_or_else(
                        || "fetched at an unknown time".into(),
                        |age| format!("fetched {} ago", human_duration(age)),
                    );
                    writeln!(f, "    token       cached, {age}, {} left", human_duration(t.remaining))?;
                }
                None => writeln!(f, "    token       none cached (a worker fetches one when it needs it)")?,
            }
            if let Some(x) = &a.fetch_failure {
                if x.retry_in.is_zero() {
                    writeln!(f, "    last fetch  failed: {} ({} in a row; back-off over)", x.message, x.streak)?;
                } else {
                    writeln!(
                        f,
                        "    back-off    token fetch failing: {}; next try in {} ({} in a row)",
                        x.message,
                        human_duration(x.retry_in),
                        x.streak
                    )?;
                }
            }
            match a.daily_quota {
                Some(q) => writeln!(f, "    sent today  {} of {q} (quota day {})", a.sent_today, a.day)?,
                None => {
                    writeln!(f, "    sent today  {} (quota day {}; no daily_quota configured)", a.sent_today, a.day)?
                }
            }
            match &a.pause {
                Some((left, why)) => writeln!(f, "    paused      {} more: {why}", human_duration(*left))?,
                None => writeln!(f, "    paused      no")?,
            }
        }
        writeln!(f, "queues (RabbitMQ {}):", self.amqp_url)?;
        if let Some(e) = &self.rabbitmq_error {
            writeln!(f, "  cannot read RabbitMQ: {e}")?;
        }
        let unacked = |q: &QueueStatus| match q.unacknowledged {
            Some(n) => format!("{n} unacknowledged"),
            None => "unacknowledged unknown".to_owned(),
        };
        for q in &self.queues {
            let label = match q.role {
                QueueRole::Jobs => "jobs",
                QueueRole::Delay => "delayed",
                QueueRole::DeadLetter => "dead letters",
                QueueRole::Unrouted => "unrouted",
            };
            if !q.exists {
                // Delay queues appear with the first retry; not worth a line each until then.
                if q.role != QueueRole::Delay {
                    writeln!(f, "  {label:<13} {}: does not exist yet (a worker declares it when it starts)", q.name)?;
                }
                continue;
            }
            let what = match q.role {
                QueueRole::Jobs => format!("{} ready, {}, {} consumers", q.ready, unacked(q), q.consumers),
                QueueRole::Delay => format!("{} waiting", q.ready),
                QueueRole::DeadLetter if q.ready > 0 => {
                    format!("{} parked, {} (`wxpush-ctl dead list` shows them)", q.ready, unacked(q))
                }
                QueueRole::DeadLetter => format!("empty, {}", unacked(q)),
                QueueRole::Unrouted => {
                    format!("{} results no binding took, {} (`wxpush-ctl results` shows them)", q.ready, unacked(q))
                }
            };
            writeln!(f, "  {label:<13} {}: {what}", q.name)?;
        }
        match (&self.management_url, &self.management_error) {
            (_, Some(e)) => writeln!(f, "  unacknowledged counts unknown: {e}")?,
            (Some(url), None) => {
                writeln!(f, "  (unacknowledged counts from the management API at {url}, sampled every few seconds)")?
            }
            (None, None) => {}
        }
        Ok(())
    }
}
