//! A job's life, from delivery to acknowledgement.
//!
//! ```text
//! delivery ─ parse ─┬─ invalid / unknown account / expired ─▶ dead-letter queue + send.failed ─▶ ack
//!                   ├─ account paused (45011, 45009) ───────▶ delay queue ──────────────────────▶ ack
//!                   └─ claim in the ledger ─┬─ done before ─▶ publish the recorded result ──────▶ ack
//!                                           ├─ busy ────────▶ wait, or delay queue ─────────────▶ ack
//!                                           └─ ours ─▶ token ─▶ send ─▶ errcode table:
//!                        accepted ─▶ record result + msgid ─▶ send.succeeded ─────────────────────▶ ack
//!                        token refused ─▶ replace the token once, send once more
//!                        transient ─▶ backoff in-process, or delay queue with attempts + 1 ──────▶ ack
//!                        permanent / attempts exhausted / unknown errcode ─▶ send.failed ─────────▶ ack
//! ```
//!
//! Nothing is acknowledged before what replaces it (a result, a dead-lettered copy, a delayed
//! copy) is confirmed by the broker. If that publish fails, the delivery goes back to the queue.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, ShortString},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    amqp::{Publisher, Topology, header_str, json_properties},
    config::{Account, Config, QueueType},
    domain::{
        calendar::{self, QuotaDay},
        errcode::{self, Action},
        job::{Job, MAX_JOB_BYTES},
        result::{SendResult, SendStatus},
    },
    store::{
        Redis,
        ledger::Claim,
        limits::{Admission, Budget, Pause},
    },
    token::{TokenError, TokenManager},
    wechat::WechatClient,
};

/// Header carrying how many send attempts a job has had.
pub const ATTEMPTS_HEADER: &str = "x-wxpush-attempts";
/// Header saying why a job was dead-lettered or delayed.
pub const REASON_HEADER: &str = "x-wxpush-reason";
/// Header naming the queue a dead-lettered job came from.
pub const SOURCE_HEADER: &str = "x-wxpush-source-queue";
/// Header set on a job parked for the daily quota, so that its `send.deferred` notice goes out once.
pub const PARKED_HEADER: &str = "x-wxpush-parked";

/// What to do with the delivery once the pipeline is through with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Everything the job led to is confirmed by the broker.
    Ack,
    /// Something could not be made safe (broker or Redis trouble, shutdown): deliver it again.
    Requeue,
    /// Refuse the delivery without requeueing: the jobs queue's own dead-lettering moves it to
    /// the dead-letter queue, so the worker never holds or copies it (oversized bodies).
    Reject,
}

/// How one claimed job ended.
enum Outcome {
    Sent {
        msgid: u64,
        errmsg: String,
        attempts: u32,
    },
    Failed {
        errcode: Option<i64>,
        errmsg: Option<String>,
        reason: String,
        attempts: u32,
    },
    /// Try again after `after`, through a delay queue; `attempts` so far travel with it.
    /// `parked` says the account's daily quota is spent (downstream is told, once).
    Later {
        after: Duration,
        attempts: u32,
        why: String,
        parked: bool,
    },
    /// Shutdown came first: back to the queue as it was.
    Abandoned,
}

/// Accounts paused by 45011/45009, as last read from Redis (read at most every 250 ms).
struct Pauses {
    seen: Mutex<HashMap<String, PauseSeen>>,
}

/// When the pause of an account was last read, and until when it runs.
type PauseSeen = (Instant, Option<(Instant, Pause)>);

const PAUSE_RECHECK: Duration = Duration::from_millis(250);

/// Everything a job needs on its way; shared by all in-flight jobs of a worker.
pub struct Pipeline {
    config: Config,
    topology: Topology,
    redis: Redis,
    tokens: std::sync::Arc<TokenManager>,
    wechat: WechatClient,
    accounts: HashMap<String, Account>,
    owner: String,
    sequence: AtomicU64,
    backoff: ExponentialBuilder,
    pauses: Pauses,
    budgets: HashMap<String, Budget>,
    quota_day: QuotaDay,
    /// Jobs of each account waiting for a rate slot, and how many may: when several accounts
    /// share a worker, one throttled account must not take every concurrency slot.
    waiting: HashMap<String, AtomicUsize>,
    waiting_cap: usize,
    /// Metric handles per configured account, registered once instead of looked up per job;
    /// anything else (an unknown account in a job, an unreadable job) counts under `unknown`,
    /// so job bodies cannot create metric series.
    metrics: HashMap<String, AccountMetrics>,
    unknown_metrics: AccountMetrics,
}

/// The `account` label of jobs whose account is not configured.
pub const UNKNOWN_ACCOUNT_LABEL: &str = "unknown";

/// One account's per-job metrics.
struct AccountMetrics {
    succeeded: metrics::Counter,
    failed: metrics::Counter,
    deferred: metrics::Counter,
    send_seconds: metrics::Histogram,
    retries: metrics::Counter,
    rate_waits: metrics::Counter,
    parked: metrics::Counter,
    pauses: metrics::Counter,
}

impl AccountMetrics {
    fn new(account: &str) -> Self {
        let jobs = |status: &'static str| metrics::counter!("wxpush_jobs_total", "account" => account.to_owned(), "status" => status);
        let this = Self {
            succeeded: jobs("succeeded"),
            failed: jobs("failed"),
            deferred: jobs("deferred"),
            send_seconds: metrics::histogram!("wxpush_send_seconds", "account" => account.to_owned()),
            retries: metrics::counter!("wxpush_send_retries_total", "account" => account.to_owned()),
            rate_waits: metrics::counter!("wxpush_rate_limit_waits_total", "account" => account.to_owned()),
            parked: metrics::counter!("wxpush_jobs_parked_total", "account" => account.to_owned()),
            pauses: metrics::counter!("wxpush_account_pauses_total", "account" => account.to_owned()),
        };
        // Series exist from the start at 0, so the first increase() of a dashboard is not lost.
        for counter in
            [&this.succeeded, &this.failed, &this.deferred, &this.retries, &this.rate_waits, &this.parked, &this.pauses]
        {
            counter.increment(0);
        }
        this
    }

    fn finished(&self, status: SendStatus) -> &metrics::Counter {
        match status {
            SendStatus::Succeeded => &self.succeeded,
            SendStatus::Failed => &self.failed,
            SendStatus::Deferred => &self.deferred,
        }
    }
}

impl Pipeline {
    pub fn new(config: Config, redis: Redis, tokens: std::sync::Arc<TokenManager>, wechat: WechatClient) -> Self {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(config.retry.min_delay_ms))
            .with_max_delay(Duration::from_millis(config.retry.max_delay_ms))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        let budgets = config
            .accounts
            .iter()
            .map(|a| {
                let budget = Budget::new(
                    a.effective_rate_limit(config.rate_limit),
                    config.rate_burst,
                    a.daily_quota.unwrap_or(0),
                );
                (a.name.clone(), budget)
            })
            .collect();
        let waiting = config.accounts.iter().map(|a| (a.name.clone(), AtomicUsize::new(0))).collect();
        let waiting_cap = match config.accounts.len() {
            0 | 1 => usize::MAX,
            n => (config.concurrency as usize / n).max(1),
        };
        let metrics = config.accounts.iter().map(|a| (a.name.clone(), AccountMetrics::new(&a.name))).collect();
        Self {
            metrics,
            unknown_metrics: AccountMetrics::new(UNKNOWN_ACCOUNT_LABEL),
            budgets,
            quota_day: QuotaDay::with_length(config.quota_day_secs),
            waiting,
            waiting_cap,
            topology: Topology::from_config(&config),
            accounts: config.accounts.iter().map(|a| (a.name.clone(), a.clone())).collect(),
            owner: format!("{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]),
            sequence: AtomicU64::new(0),
            backoff,
            pauses: Pauses { seen: Mutex::new(HashMap::new()) },
            config,
            redis,
            tokens,
            wechat,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The metric handles of `account`, or those labelled `unknown` when it is not configured.
    fn metrics_of(&self, account: &str) -> &AccountMetrics {
        self.metrics.get(account).unwrap_or(&self.unknown_metrics)
    }

    /// Takes one delivery of the jobs queue through its whole life.
    pub async fn process(&self, delivery: &Delivery, publisher: &Publisher, cancel: &CancellationToken) -> Disposition {
        let props = &delivery.properties;
        let message_id = props.message_id().as_ref().map(|m| m.as_str());
        if let Some(oversized) = self.oversized(delivery) {
            return self.refuse_oversized(oversized, publisher).await;
        }
        let job = match Job::parse(&delivery.data, message_id) {
            Ok(job) => job,
            Err(invalid) => {
                let reason = invalid.to_string();
                warn!(job_id = invalid.job_id.as_deref(), %reason, "job refused, dead-lettering it");
                return self.reject(delivery, publisher, invalid.job_id, None, &reason).await;
            }
        };
        let span = info_span!("job", job_id = %job.job_id, account = %job.account);
        self.process_job(delivery, publisher, cancel, job).instrument(span).await
    }

    /// Whether a delivery's body is over the job size limit and can be refused without its body:
    /// then the caller drops the body at once and hands [`refuse_oversized`](Self::refuse_oversized)
    /// only what it says here.
    pub fn oversized(&self, delivery: &Delivery) -> Option<Oversized> {
        (delivery.data.len() > MAX_JOB_BYTES && self.topology.queue_type == QueueType::Quorum).then(|| Oversized {
            bytes: delivery.data.len(),
            message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
        })
    }

    /// Refuses a body over the job size limit unread: the broker's own dead-lettering of the
    /// quorum jobs queue moves it, body untouched, to the dead-letter queue, so the worker never
    /// holds or copies it. A `send.failed` goes out when the message_id names the job.
    pub async fn refuse_oversized(&self, oversized: Oversized, publisher: &Publisher) -> Disposition {
        let reason = oversized.reason();
        warn!(bytes = oversized.bytes, "job refused: body too large");
        metrics::counter!("wxpush_jobs_oversized_total").increment(1);
        let Some(job_id) = oversized.message_id.filter(|id| crate::domain::job::is_valid_job_id(id)) else {
            return Disposition::Reject;
        };
        match self.publish_result(publisher, &SendResult::invalid(job_id, None, reason)).await {
            Disposition::Ack => Disposition::Reject,
            other => other,
        }
    }

    async fn process_job(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        cancel: &CancellationToken,
        job: Job,
    ) -> Disposition {
        let attempts_before = match attempts_of(&delivery.properties) {
            Ok(n) => n,
            Err(header) => {
                let reason = format!("invalid job: {header}");
                warn!(%reason, "job refused, dead-lettering it");
                return self.reject(delivery, publisher, Some(job.job_id.clone()), Some(&job), &reason).await;
            }
        };
        let Some(account) = self.accounts.get(&job.account) else {
            let reason = format!("invalid job: unknown account {:?}", job.account);
            warn!(%reason, "job refused, dead-lettering it");
            return self.reject(delivery, publisher, Some(job.job_id.clone()), Some(&job), &reason).await;
        };
        if job.is_expired(Utc::now()) {
            info!("job expired before it could be sent");
            return self.reject(delivery, publisher, Some(job.job_id.clone()), Some(&job), "expired").await;
        }
        if attempts_before >= self.config.max_attempts {
            // Only a forged or foreign header gets here: the pipeline never delays a job whose
            // attempts are spent. Such a header may end a job, never extend it.
            let reason = format!("attempts exhausted: {attempts_before} attempts recorded in {ATTEMPTS_HEADER}");
            warn!(%reason, "job failed");
            return self
                .publish_result(publisher, &SendResult::failed(&job, None, None, reason, attempts_before))
                .await;
        }
        if let Some((left, pause)) = self.pause_of(account).await {
            debug!(why = %pause.why, "account paused; the job waits in a delay queue");
            if pause.parked {
                return self.park(delivery, publisher, &job, left, attempts_before, &pause.why).await;
            }
            return self.defer(delivery, publisher, left, attempts_before, &pause.why).await;
        }

        let owner = format!("{}:{}", self.owner, self.sequence.fetch_add(1, Ordering::Relaxed));
        let lease = Duration::from_millis(self.config.job_lease_ms);
        let in_process_max = Duration::from_millis(self.config.retry.in_process_max_ms);
        loop {
            let claim = match self.redis.claim_job(&job.job_id, &owner, lease).await {
                Ok(claim) => claim,
                Err(e) => {
                    // No send without the idempotency record: the job waits for Redis.
                    warn!(error = %e, "cannot reach the idempotency ledger; the job waits");
                    if !sleep_or_cancel(cancel, jittered(Duration::from_millis(500))).await {
                        return Disposition::Requeue;
                    }
                    continue;
                }
            };
            match claim {
                Claim::Claimed => break,
                Claim::Done(recorded) => {
                    info!("job already done; publishing its recorded result again");
                    return self.republish(publisher, &job, &recorded).await;
                }
                Claim::Busy { retry_after } if retry_after <= in_process_max => {
                    if !sleep_or_cancel(cancel, retry_after).await {
                        return Disposition::Requeue;
                    }
                }
                Claim::Busy { retry_after } => {
                    debug!(
                        retry_after_ms = retry_after.as_millis() as u64,
                        "another worker holds this job; it waits in a delay queue"
                    );
                    return self
                        .defer(delivery, publisher, retry_after, attempts_before, "held by another worker")
                        .await;
                }
            }
        }

        let outcome =
            self.holding_lease(&job.job_id, &owner, lease, self.attempts(&job, account, attempts_before, cancel)).await;
        let result = match outcome {
            Outcome::Sent { msgid, errmsg, attempts } => {
                let result = SendResult::succeeded(&job, msgid, errmsg, attempts);
                let json = result.to_json();
                self.record(&job, account, msgid, &json, cancel).await;
                return self.publish_json(publisher, &result, &json).await;
            }
            Outcome::Failed { errcode, errmsg, reason, attempts } => {
                self.release(&job, &owner).await;
                warn!(errcode, %reason, attempts, "job failed");
                SendResult::failed(&job, errcode, errmsg, reason, attempts)
            }
            Outcome::Later { after, attempts, why, parked } => {
                self.release(&job, &owner).await;
                if parked {
                    return self.park(delivery, publisher, &job, after, attempts, &why).await;
                }
                return self.defer(delivery, publisher, after, attempts, &why).await;
            }
            Outcome::Abandoned => {
                self.release(&job, &owner).await;
                return Disposition::Requeue;
            }
        };
        self.publish_result(publisher, &result).await
    }

    /// Sends until the errcode table says stop; short backoffs are waited here, longer ones
    /// are handed back as [`Outcome::Later`].
    async fn attempts(
        &self,
        job: &Job,
        account: &Account,
        attempts_before: u32,
        cancel: &CancellationToken,
    ) -> Outcome {
        let body = bytes::Bytes::from(job.template_message_body());
        let mut attempt = attempts_before;
        let token_wait = Duration::from_millis(self.config.token.wait_ms);
        loop {
            let token = match self.tokens.get(&account.name).await {
                Ok(t) => t,
                Err(e @ TokenError::Unavailable { .. }) => {
                    return Outcome::Later { after: token_wait, attempts: attempt, why: e.to_string(), parked: false };
                }
                Err(e @ TokenError::Refused { .. }) => {
                    let after = e.retry_after().unwrap_or(token_wait);
                    return Outcome::Later { after, attempts: attempt, why: e.to_string(), parked: false };
                }
                Err(e @ TokenError::Store { .. }) => {
                    warn!(error = %e, "the job waits for Redis");
                    if !sleep_or_cancel(cancel, jittered(Duration::from_millis(500))).await {
                        return Outcome::Abandoned;
                    }
                    continue;
                }
            };
            // The rate slot is taken right before the send, so that what WeChat sees keeps the
            // limiter's spacing.
            match self.admit(account, cancel).await {
                Gate::Open => {}
                Gate::Later(outcome) => {
                    let Outcome::Later { after, why, parked, .. } = outcome else { return outcome };
                    return Outcome::Later { after, attempts: attempt, why, parked };
                }
                Gate::Abandoned => return Outcome::Abandoned,
            }
            attempt = attempt.saturating_add(1);
            let started = Instant::now();
            let mut answer = self.wechat.send_template(&token, body.clone()).await;
            if let Ok(a) = &answer
                && errcode::classify(a.errcode) == Action::RefreshToken
            {
                // Replace the token once and send once more; a second refusal counts as a
                // transient failure below, never as a reason to refresh again.
                match self.tokens.replace(&account.name, &token).await {
                    Ok(fresh) => answer = self.wechat.send_template(&fresh, body.clone()).await,
                    // The refusal cost an attempt: a token WeChat keeps refusing ends the job
                    // once its attempts are spent, with the reason, instead of circling forever.
                    Err(e @ TokenError::Refused { .. }) => {
                        let errcode = answer.as_ref().ok().map(|a| a.errcode);
                        let errmsg = answer.ok().map(|a| a.errmsg);
                        let after = e.retry_after().unwrap_or(token_wait).max(self.backoff_after(attempt));
                        if attempt >= self.config.max_attempts {
                            let reason = format!("attempts exhausted: {e}");
                            return Outcome::Failed { errcode, errmsg, reason, attempts: attempt };
                        }
                        return Outcome::Later { after, attempts: attempt, why: e.to_string(), parked: false };
                    }
                    Err(e) => {
                        let why = e.to_string();
                        return Outcome::Later { after: token_wait, attempts: attempt - 1, why, parked: false };
                    }
                }
            }
            self.metrics_of(&account.name).send_seconds.record(started.elapsed().as_secs_f64());
            let (errcode, errmsg, why) = match answer {
                Ok(a) => match errcode::classify(a.errcode) {
                    Action::Accepted => match a.msgid {
                        Some(msgid) => return Outcome::Sent { msgid, errmsg: a.errmsg, attempts: attempt },
                        None => (Some(0), Some(a.errmsg), "WeChat accepted the message but gave no msgid".to_owned()),
                    },
                    Action::Retry | Action::RefreshToken => {
                        let why = format!("errcode {} ({})", a.errcode, errcode::reason(a.errcode));
                        (Some(a.errcode), Some(a.errmsg), why)
                    }
                    Action::WaitNextMinute => {
                        let left = match self.config.minute_pause_secs {
                            0 => calendar::until_next_minute(Utc::now()) + jittered(Duration::from_millis(200)),
                            secs => Duration::from_secs(secs),
                        };
                        let why = "45011: minute quota reached; account paused until the next minute";
                        self.pause(account, left, why, false).await;
                        return Outcome::Later { after: left, attempts: attempt - 1, why: why.into(), parked: false };
                    }
                    Action::QuotaExhausted => {
                        let left = self.quota_day.until_reset(Utc::now());
                        let why = "45009: WeChat's daily quota reached; jobs parked until it resets";
                        self.pause(account, left, why, true).await;
                        return Outcome::Later { after: left, attempts: attempt - 1, why: why.into(), parked: true };
                    }
                    Action::Permanent => {
                        let reason = errcode::reason(a.errcode).to_owned();
                        return Outcome::Failed {
                            errcode: Some(a.errcode),
                            errmsg: Some(a.errmsg),
                            reason,
                            attempts: attempt,
                        };
                    }
                    Action::Unknown => {
                        let reason = format!("unknown errcode {}: {}", a.errcode, a.errmsg);
                        error!(errcode = a.errcode, errmsg = %a.errmsg, "WeChat answered an errcode wxpush does not know");
                        return Outcome::Failed {
                            errcode: Some(a.errcode),
                            errmsg: Some(a.errmsg),
                            reason,
                            attempts: attempt,
                        };
                    }
                },
                Err(e) => (None, None, e.to_string()),
            };
            self.metrics_of(&account.name).retries.increment(1);
            if attempt >= self.config.max_attempts {
                let reason = format!("attempts exhausted: {why}");
                return Outcome::Failed { errcode, errmsg, reason, attempts: attempt };
            }
            let delay = self.backoff_after(attempt);
            debug!(attempt, %why, delay_ms = delay.as_millis() as u64, "transient failure; retrying");
            if delay > Duration::from_millis(self.config.retry.in_process_max_ms) {
                return Outcome::Later { after: delay, attempts: attempt, why, parked: false };
            }
            if !sleep_or_cancel(cancel, delay).await {
                return Outcome::Abandoned;
            }
        }
    }

    /// Waits for the account's rate slot (sleeping the retry-after the limiter returns), unless
    /// the day's quota is spent or too many of the account's jobs already wait here.
    async fn admit(&self, account: &Account, cancel: &CancellationToken) -> Gate {
        let Some(budget) = self.budgets.get(&account.name).filter(|b| !b.is_unlimited()) else { return Gate::Open };
        let waiting = &self.waiting[&account.name];
        loop {
            let day = self.quota_day.key(Utc::now());
            let wait = match self.redis.admit(&account.appid, budget, &day).await {
                Ok(Admission::Granted) => return Gate::Open,
                Ok(Admission::Wait(wait)) => wait,
                Ok(Admission::QuotaSpent { used }) => {
                    let left = self.quota_day.until_reset(Utc::now());
                    let why = format!(
                        "daily quota of {} sends reached ({used} counted); jobs parked until it resets",
                        budget.daily_quota
                    );
                    self.pause(account, left, &why, true).await;
                    return Gate::Later(Outcome::Later { after: left, attempts: 0, why, parked: true });
                }
                Err(e) => {
                    warn!(error = %e, "cannot reach the rate limiter; the job waits");
                    jittered(Duration::from_millis(500))
                }
            };
            self.metrics_of(&account.name).rate_waits.increment(1);
            if waiting.fetch_add(1, Ordering::Relaxed) >= self.waiting_cap {
                waiting.fetch_sub(1, Ordering::Relaxed);
                let why = "rate limit: the account's share of this worker is busy waiting".to_owned();
                return Gate::Later(Outcome::Later { after: wait, attempts: 0, why, parked: false });
            }
            let slept = sleep_or_cancel(cancel, wait).await;
            waiting.fetch_sub(1, Ordering::Relaxed);
            if !slept {
                return Gate::Abandoned;
            }
        }
    }

    /// Parks a job for the daily quota: delayed like any other, and the first time, a
    /// `send.deferred` notice tells downstream when it will go out.
    async fn park(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        job: &Job,
        after: Duration,
        attempts: u32,
        why: &str,
    ) -> Disposition {
        let first_time = delivery.properties.headers().as_ref().is_none_or(|h| !h.inner().contains_key(PARKED_HEADER));
        if first_time {
            let until = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
            let reason = format!("{why}; parked until {}", until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            let notice = SendResult::deferred(job, reason, attempts);
            if self.publish_result(publisher, &notice).await == Disposition::Requeue {
                return Disposition::Requeue;
            }
        }
        self.metrics_of(&job.account).parked.increment(1);
        self.delay(delivery, publisher, after, attempts, why, true).await
    }

    /// The backoff after the `attempt`-th failed attempt (exponential with jitter, by backon).
    fn backoff_after(&self, attempt: u32) -> Duration {
        self.backoff
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(Duration::from_millis(self.config.retry.max_delay_ms))
    }

    /// Records the success (for duplicates and redeliveries) and msgid → job (for receipts).
    /// Redis trouble is retried for a while; after that the result is still published, since
    /// the message is sent and losing its result would be worse than a missing record.
    async fn record(&self, job: &Job, account: &Account, msgid: u64, json: &[u8], cancel: &CancellationToken) {
        let ttl = Duration::from_secs(self.config.ledger_ttl_secs);
        let msgid_ttl = Duration::from_secs(self.config.msgid_ttl_secs);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.redis.record_sent(&job.job_id, json, ttl, &account.appid, msgid, msgid_ttl).await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && !cancel.is_cancelled() => {
                    warn!(error = %e, "cannot record the sent job yet; retrying");
                    tokio::time::sleep(jittered(Duration::from_millis(300))).await;
                }
                Err(e) => {
                    error!(error = %e, msgid, "could not record the sent job: a duplicate publish of it would be sent again, and its receipts will carry no job_id");
                    return;
                }
            }
        }
    }

    /// Runs `work` while renewing our lease on the job every third of its length, so that the
    /// lease can be short: a crashed worker's jobs are free again within one lease, while a job
    /// that waits long (rate limit, backoff) stays ours.
    async fn holding_lease<T>(&self, job_id: &str, owner: &str, lease: Duration, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let every = lease / 3;
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep(every) => match self.redis.renew_job(job_id, owner, lease).await {
                    Ok(true) => {}
                    Ok(false) => error!("the job's lease ran out before it could be renewed; another worker may take the job"),
                    Err(e) => warn!(error = %e, "could not renew the job's lease; retrying"),
                },
            }
        }
    }

    async fn release(&self, job: &Job, owner: &str) {
        if let Err(e) = self.redis.release_job(&job.job_id, owner).await {
            // The lease runs out by itself; the next delivery waits for that.
            warn!(error = %e, "could not release the job's lease");
        }
    }

    async fn pause_of(&self, account: &Account) -> Option<(Duration, Pause)> {
        let now = Instant::now();
        {
            let seen = self.pauses.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((checked, pause)) = seen.get(&account.appid)
                && now.duration_since(*checked) < PAUSE_RECHECK
            {
                return pause.as_ref().filter(|(until, _)| *until > now).map(|(until, p)| (*until - now, p.clone()));
            }
        }
        let pause = match self.redis.account_pause(&account.appid).await {
            Ok(p) => p,
            // Redis trouble shows up at the claim right after; don't block on it here.
            Err(_) => return None,
        };
        let mut seen = self.pauses.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(account.appid.clone(), (now, pause.as_ref().map(|(left, p)| (now + *left, p.clone()))));
        pause
    }

    /// Pauses the account across the pool for `for_`.
    async fn pause(&self, account: &Account, for_: Duration, why: &str, parked: bool) {
        warn!(account = %account.name, pause_secs = for_.as_secs_f64(), "{why}");
        self.metrics_of(&account.name).pauses.increment(1);
        let now = Instant::now();
        let pause = Pause { why: why.to_owned(), parked };
        if let Err(e) = self.redis.pause_account(&account.appid, for_, &pause).await {
            warn!(error = %e, "could not share the account's pause with the pool");
        }
        self.pauses
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(account.appid.clone(), (now, Some((now + for_, pause))));
    }

    /// Publishes a result and says whether the delivery may be acknowledged.
    async fn publish_result(&self, publisher: &Publisher, result: &SendResult) -> Disposition {
        self.publish_json(publisher, result, &result.to_json()).await
    }

    /// Publishes `result`, already serialized as `json`.
    async fn publish_json(&self, publisher: &Publisher, result: &SendResult, json: &[u8]) -> Disposition {
        let props = json_properties(result.job_id.as_deref());
        match publisher.publish(&self.topology.results_exchange, result.routing_key(), json, props, false).await {
            Ok(()) => {
                self.metrics_of(result.account.as_deref().unwrap_or("")).finished(result.status).increment(1);
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "result not confirmed by the broker; the job goes back to the queue");
                Disposition::Requeue
            }
        }
    }

    /// A recorded result, published again for a job seen before.
    async fn republish(&self, publisher: &Publisher, job: &Job, recorded: &[u8]) -> Disposition {
        match serde_json::from_slice::<SendResult>(recorded) {
            Ok(result) => self.publish_result(publisher, &result).await,
            Err(e) => {
                // Someone else's data under our key: say so, and answer from what we know.
                error!(error = %e, "the ledger's record of this job is unreadable");
                let result = SendResult::failed(job, None, None, "ledger record unreadable".into(), 0);
                self.publish_result(publisher, &result).await
            }
        }
    }

    /// Parks a job that cannot be processed: its body untouched in the dead-letter queue, with
    /// headers saying why, and a `send.failed` result when its job_id is known.
    async fn reject(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        job_id: Option<String>,
        job: Option<&Job>,
        reason: &str,
    ) -> Disposition {
        if self.dead_letter(delivery, publisher, reason).await == Disposition::Requeue {
            return Disposition::Requeue;
        }
        let Some(job_id) = job_id else { return Disposition::Ack };
        let result = match job {
            Some(job) => SendResult::failed(job, None, None, reason.to_owned(), 0),
            None => SendResult::invalid(job_id, None, reason.to_owned()),
        };
        self.publish_result(publisher, &result).await
    }

    /// Parks the delivery's body untouched in the dead-letter queue, with headers saying why,
    /// where from and when. `Ack` once the broker has it.
    pub async fn dead_letter(&self, delivery: &Delivery, publisher: &Publisher, reason: &str) -> Disposition {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(ShortString::from(REASON_HEADER), header_str(reason));
        headers.insert(ShortString::from(SOURCE_HEADER), header_str(&self.topology.jobs_queue));
        headers.insert(ShortString::from("x-wxpush-dead-lettered-at"), header_str(&Utc::now().to_rfc3339()));
        let props = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        if let Err(e) = publisher.publish("", &self.topology.dead_letter_queue, &delivery.data, props, true).await {
            warn!(error = %e, "cannot dead-letter the job; it goes back to the queue");
            return Disposition::Requeue;
        }
        metrics::counter!("wxpush_jobs_dead_lettered_total").increment(1);
        Disposition::Ack
    }

    /// Puts the job in the delay queue that best fits `after`, carrying `attempts`.
    async fn defer(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        after: Duration,
        attempts: u32,
        why: &str,
    ) -> Disposition {
        self.delay(delivery, publisher, after, attempts, why, false).await
    }

    async fn delay(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        after: Duration,
        attempts: u32,
        why: &str,
        parked: bool,
    ) -> Disposition {
        let tier = self.topology.tier_for(after);
        let queue = self.topology.delay_queue(tier);
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(ShortString::from(ATTEMPTS_HEADER), AMQPValue::LongUInt(attempts));
        headers.insert(ShortString::from(REASON_HEADER), header_str(why));
        if parked {
            headers.insert(ShortString::from(PARKED_HEADER), AMQPValue::Boolean(true));
        }
        let props: BasicProperties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        match publisher.publish("", &queue, &delivery.data, props, true).await {
            Ok(()) => {
                metrics::counter!("wxpush_jobs_delayed_total").increment(1);
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "cannot delay the job; it goes back to the queue");
                Disposition::Requeue
            }
        }
    }
}

/// A delivery refused for its size, without its body.
#[derive(Debug)]
pub struct Oversized {
    bytes: usize,
    message_id: Option<String>,
}

impl Oversized {
    fn reason(&self) -> String {
        format!("invalid job: body is {} bytes, over the {MAX_JOB_BYTES}-byte limit", self.bytes)
    }
}

/// Whether a job may go on to its send.
enum Gate {
    Open,
    Later(Outcome),
    Abandoned,
}

/// Attempts so far, from the header (any integer type a publisher may have used); 0 when there
/// is none. A header that is not a whole number from 0 to 2^32 - 1 is an error (its text says
/// what it held): a corrupt count must neither reset a job's attempts nor wrap around.
pub fn attempts_of(props: &BasicProperties) -> Result<u32, String> {
    let Some(value) = props.headers().as_ref().and_then(|h| h.inner().get(ATTEMPTS_HEADER)) else { return Ok(0) };
    let n: Option<i64> = match value {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("header {ATTEMPTS_HEADER} is not a count of attempts: {value:?}"))
}

/// Sleeps unless cancelled first; returns false when cancelled.
async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.5 + rand::random::<f64>())
}
