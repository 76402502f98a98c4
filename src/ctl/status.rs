//! `wxpush-ctl status`: what the pool shares in Redis per account (token age, fetch back-off,
//! today's sends against the quota, pauses) and how full the queues are.
//!
//! The access token is read to learn its age and what is left of it; its value is dropped at
//! once and never printed.

use std::time::Duration;

use chrono::Utc;
use secrecy::ExposeSecret;

use super::{CtlError, QueueInfo, RPC_TIMEOUT, broker, human_duration, scrub};
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

/// A queue and its counts (`None`: it does not exist).
#[derive(Debug, Clone)]
pub struct NamedQueue {
    pub name: String,
    pub info: Option<QueueInfo>,
}

/// Everything `status` shows.
#[derive(Debug, Clone)]
pub struct StatusReport {
    pub redis_url: String,
    pub redis_prefix: String,
    pub accounts: Vec<AccountStatus>,
    pub redis_error: Option<String>,
    pub amqp_url: String,
    pub jobs: Option<NamedQueue>,
    pub dead_letters: Option<NamedQueue>,
    /// Jobs waiting in the delay queues (retries, paused accounts), all tiers together.
    pub delayed: u64,
    pub rabbitmq_error: Option<String>,
}

impl StatusReport {
    /// Both services answered for everything.
    pub fn is_complete(&self) -> bool {
        self.redis_error.is_none() && self.rabbitmq_error.is_none() && self.accounts.iter().all(|a| a.error.is_none())
    }
}

/// Gathers the status; a service that does not answer is reported, not returned as an error.
pub async fn status(config: &Config) -> StatusReport {
    let mut report = StatusReport {
        redis_url: redact_redis_url(&config.redis_url),
        redis_prefix: config.redis_prefix.clone(),
        accounts: Vec::new(),
        redis_error: None,
        amqp_url: redact_url(&config.amqp_url),
        jobs: None,
        dead_letters: None,
        delayed: 0,
        rabbitmq_error: None,
    };
    match accounts(config).await {
        Ok(a) => report.accounts = a,
        Err(e) => report.redis_error = Some(e.to_string()),
    }
    if let Err(e) = queues(config, &mut report).await {
        report.rabbitmq_error = Some(e.to_string());
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
        out.push(account_status(&redis, account, QuotaDay::with_length(config.quota_day_secs)).await);
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
        status.pause = redis.account_pause(&account.appid).await?.map(|(left, why)| (left, scrub(&why, &secrets)));
        Ok::<(), crate::store::StoreError>(())
    };
    let outcome = tokio::time::timeout(RPC_TIMEOUT, read).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => status.error = Some(e.to_string()),
        Err(_) => status.error = Some(CtlError::RedisTimeout { secs: RPC_TIMEOUT.as_secs() }.to_string()),
    }
    status
}

async fn queues(config: &Config, report: &mut StatusReport) -> Result<(), CtlError> {
    let connection = broker::connect(config, "status").await?;
    let result = async {
        let info = broker::queue_info(&connection, &config.jobs_queue).await?;
        report.jobs = Some(NamedQueue { name: config.jobs_queue.clone(), info });
        let info = broker::queue_info(&connection, &config.dead_letter_queue).await?;
        report.dead_letters = Some(NamedQueue { name: config.dead_letter_queue.clone(), info });
        let topology = Topology::from_config(config);
        for &secs in &topology.delay_tiers_secs {
            if let Some(q) = broker::queue_info(&connection, &topology.delay_queue(secs)).await? {
                report.delayed += q.messages as u64;
            }
        }
        Ok(())
    }
    .await;
    broker::close(&connection).await;
    result
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
        if let Some(q) = &self.jobs {
            match q.info {
                Some(i) => writeln!(f, "  jobs          {}: {} ready, {} consumers", q.name, i.messages, i.consumers)?,
                None => writeln!(f, "  jobs          {}: does not exist yet (a worker declares it)", q.name)?,
            }
        }
        if let Some(q) = &self.dead_letters {
            match q.info {
                Some(i) if i.messages > 0 => writeln!(
                    f,
                    "  dead letters  {}: {} parked (`wxpush-ctl dead list` shows them)",
                    q.name, i.messages
                )?,
                Some(_) => writeln!(f, "  dead letters  {}: empty", q.name)?,
                None => writeln!(f, "  dead letters  {}: does not exist yet", q.name)?,
            }
            writeln!(f, "  delayed       {} waiting in the delay queues", self.delayed)?;
        }
        Ok(())
    }
}
