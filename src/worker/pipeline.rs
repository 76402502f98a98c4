//! A job's life, from delivery to acknowledgement. [`Pipeline::process`] reads top to bottom as
//! the README's "A job's life" tells it:
//!
//! ```text
//! delivery ─ accept ─┬─ invalid / unknown account / expired ─▶ dead-letter queue + send.failed
//!                    ├─ account paused (45011, 45009) ───────▶ delay queue (send.deferred once)
//!                    └─ claim in the ledger ─┬─ done before ─▶ publish the recorded result
//!                                            ├─ busy ────────▶ wait, or delay queue
//!                                            └─ ours ─▶ token ─▶ rate slot ─▶ send ─▶ decide():
//!              Sent ─▶ record result + msgid ─▶ send.succeeded
//!              Retry ─▶ backoff in-process, or delay queue with attempts + 1
//!              Failed ─▶ send.failed            Pause / Park ─▶ pool-wide pause, delay queue
//! ```
//!
//! Every branch ends in a [`Settlement`]; [`Settler::settle`] publishes what it needs and says
//! how to acknowledge the delivery.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{
    admission::{Gate, RateGate},
    metrics::Metrics,
    pauses::Pauses,
    settle::{Disposition, Published, Settlement, Settler},
    sleep_or_cancel,
    tokens::{Token, TokenError, TokenManager},
};
use crate::{
    amqp::{Publisher, Topology, headers},
    backoff::jittered,
    config::{Account, Config},
    domain::{
        calendar::QuotaDay,
        errcode::{self, Action},
        job::{self, Job, JobKind, MAX_JOB_BYTES},
        outcome::{Answer, Outcome, Policy, decide, later},
        result::SendResult,
    },
    store::{Redis, ledger::Claim, limits::Pause},
    wechat::WechatClient,
};

/// The waits a job's life is made of, from the configuration.
struct Timing {
    /// How long a claim on a job lasts unless renewed (it is, every third of it).
    lease: Duration,
    /// Waits up to this long happen in-process; longer ones through a delay queue.
    in_process_max: Duration,
    /// How long a job waits for a token that cannot be had now.
    token_wait: Duration,
    ledger_ttl: Duration,
    msgid_ttl: Duration,
    /// 45011's pause is jittered when it runs to the next minute, so the pool resumes spread.
    jitter_minute_pause: bool,
}

/// Everything a job needs on its way; shared by all in-flight jobs of a worker.
pub struct Pipeline {
    policy: Policy,
    timing: Timing,
    redis: Redis,
    tokens: Arc<TokenManager>,
    wechat: WechatClient,
    accounts: HashMap<String, Account>,
    /// This worker's name in job leases; each job adds a sequence number.
    owner: String,
    sequence: AtomicU64,
    pauses: Pauses,
    gate: RateGate,
    settler: Settler,
}

/// A job fit to be sent: read, its account known, its attempts so far.
struct Accepted<'a> {
    job: Job,
    account: &'a Account,
    attempts: u32,
}

/// What the sends came to, and the attempts spent on the job so far.
enum Ended {
    Decided(Outcome, u32),
    /// Shutdown came first.
    Abandoned,
}

impl Pipeline {
    pub fn new(config: Config, redis: Redis, tokens: Arc<TokenManager>, wechat: WechatClient) -> Self {
        let metrics = Metrics::new(config.accounts.iter().map(|a| a.name.as_str()));
        let policy = Policy {
            max_attempts: config.max_attempts,
            retry_min: config.retry.min_delay,
            retry_max: config.retry.max_delay,
            minute_pause: config.minute_pause,
            quota_day: QuotaDay::with_length(config.quota_day.as_secs()),
        };
        let timing = Timing {
            lease: config.job_lease,
            in_process_max: config.retry.in_process_max,
            token_wait: config.token.wait,
            ledger_ttl: config.ledger_ttl,
            msgid_ttl: config.msgid_ttl,
            jitter_minute_pause: config.minute_pause.is_none(),
        };
        Self {
            policy,
            timing,
            gate: RateGate::new(&config, redis.clone(), metrics.clone()),
            pauses: Pauses::new(redis.clone(), metrics.clone()),
            settler: Settler::new(Topology::from_config(&config), metrics),
            accounts: config.accounts.iter().map(|a| (a.name.clone(), a.clone())).collect(),
            owner: format!("{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]),
            sequence: AtomicU64::new(0),
            redis,
            tokens,
            wechat,
        }
    }

    pub fn topology(&self) -> &Topology {
        self.settler.topology()
    }

    pub fn settler(&self) -> &Settler {
        &self.settler
    }

    /// Takes one delivery of the jobs queue through its whole life.
    pub async fn process(&self, delivery: &Delivery, publisher: &Publisher, cancel: &CancellationToken) -> Disposition {
        let settlement = match self.accept(delivery) {
            Ok(accepted) => {
                let span = info_span!("job", job_id = %accepted.job.job_id, account = %accepted.job.account);
                self.life(accepted, cancel).instrument(span).await
            }
            Err(refused) => *refused,
        };
        self.settler.settle(delivery, publisher, settlement).await
    }

    /// A job's life once it is read: paused account? already done? then sends until decided.
    async fn life(&self, accepted: Accepted<'_>, cancel: &CancellationToken) -> Settlement {
        let Accepted { job, account, attempts } = accepted;
        if attempts >= self.policy.max_attempts {
            // Only a forged or foreign header gets here: the pipeline never delays a job whose
            // attempts are spent. Such a header may end a job, never extend it.
            let reason = format!("attempts exhausted: {attempts} attempts recorded in {}", headers::ATTEMPTS);
            warn!(%reason, "job failed");
            return Settlement::publish(SendResult::failed(&job, None, None, reason, attempts));
        }
        if let Some((left, pause)) = self.pauses.of(account).await {
            debug!(why = %pause.why, "account paused; the job waits in a delay queue");
            return match pause.parked {
                true => Settlement::park(&job, later(Utc::now(), left), attempts, pause.why),
                false => Settlement::Delay { after: left, attempts, why: pause.why },
            };
        }
        let owner = format!("{}:{}", self.owner, self.sequence.fetch_add(1, Ordering::Relaxed));
        if let Err(settled) = self.claim(&job, &owner, attempts, cancel).await {
            return *settled;
        }
        let ended = self.holding_lease(&job.job_id, &owner, self.send(&job, account, attempts, cancel)).await;
        self.finish(&job, account, &owner, ended, cancel).await
    }

    /// Reads the delivery: a job, of a configured account, not expired, with a readable count
    /// of attempts. Anything else is dead-lettered with its reason.
    fn accept(&self, delivery: &Delivery) -> Result<Accepted<'_>, Box<Settlement>> {
        let message_id = delivery.properties.message_id().as_ref().map(|m| m.as_str());
        let job = Job::parse(&delivery.data, message_id).map_err(|invalid| {
            let reason = invalid.to_string();
            warn!(job_id = invalid.job_id.as_deref(), %reason, "job refused, dead-lettering it");
            let result = invalid.job_id.map(|id| SendResult::invalid(id, None, reason.clone()));
            Box::new(Settlement::DeadLetter { reason, result })
        })?;
        let refuse = |job: &Job, reason: String| {
            let result = Some(SendResult::failed(job, None, None, reason.clone(), 0));
            Err(Box::new(Settlement::DeadLetter { reason, result }))
        };
        let attempts = match headers::attempts(&delivery.properties) {
            Ok(n) => n,
            Err(header) => {
                warn!(job_id = %job.job_id, reason = %header, "job refused, dead-lettering it");
                return refuse(&job, format!("invalid job: {header}"));
            }
        };
        let Some(account) = self.accounts.get(&job.account) else {
            let reason = format!("invalid job: unknown account {:?}", job.account);
            warn!(job_id = %job.job_id, %reason, "job refused, dead-lettering it");
            return refuse(&job, reason);
        };
        if !account.kind.sends(job.kind) {
            let reason = format!(
                "invalid job: kind {} cannot be sent by account {:?}, a {}",
                job.kind,
                account.name,
                account.kind.as_str()
            );
            warn!(job_id = %job.job_id, %reason, "job refused, dead-lettering it");
            return refuse(&job, reason);
        }
        if job.is_expired(Utc::now()) {
            info!(job_id = %job.job_id, "job expired before it could be sent");
            return refuse(&job, "expired".into());
        }
        Ok(Accepted { job, account, attempts })
    }

    /// Takes the job's lease in the idempotency ledger. `Err` settles the job without a send:
    /// its recorded result (done before), a delay (another worker holds it), or a requeue.
    async fn claim(
        &self,
        job: &Job,
        owner: &str,
        attempts: u32,
        cancel: &CancellationToken,
    ) -> Result<(), Box<Settlement>> {
        loop {
            let wait = match self.redis.claim_job(&job.job_id, owner, self.timing.lease).await {
                Ok(Claim::Claimed) => return Ok(()),
                Ok(Claim::Cancelled) => {
                    info!("job cancelled by an operator; nothing is sent");
                    let result = SendResult::failed(job, None, None, "cancelled".into(), attempts);
                    return Err(Box::new(Settlement::publish(result)));
                }
                Ok(Claim::Done(recorded)) => {
                    info!("job already done; publishing its recorded result again");
                    return Err(Box::new(recorded_result(job, recorded)));
                }
                Ok(Claim::Busy { retry_after }) if retry_after > self.timing.in_process_max => {
                    debug!(
                        retry_after_ms = retry_after.as_millis() as u64,
                        "another worker holds this job; it waits in a delay queue"
                    );
                    let why = "held by another worker".into();
                    return Err(Box::new(Settlement::Delay { after: retry_after, attempts, why }));
                }
                Ok(Claim::Busy { retry_after }) => retry_after,
                Err(e) => {
                    // No send without the idempotency record: the job waits for Redis.
                    warn!(error = &e as &dyn std::error::Error, "cannot reach the idempotency ledger; the job waits");
                    jittered(Duration::from_millis(500))
                }
            };
            if !sleep_or_cancel(cancel, wait).await {
                return Err(Box::new(Settlement::Requeue));
            }
        }
    }

    /// Sends until [`decide`] says stop; short backoffs are waited here, longer ones end as a
    /// [`Outcome::Retry`] for a delay queue. `spent`: attempts before this delivery.
    async fn send(&self, job: &Job, account: &Account, mut spent: u32, cancel: &CancellationToken) -> Ended {
        let body = match job.message_body() {
            Ok(body) => bytes::Bytes::from(body),
            // Not reachable with a parsed job's plain fields; never send an empty body.
            Err(e) => {
                return Ended::Decided(
                    Outcome::Failed {
                        reason: format!("cannot serialize the message: {e}"),
                        errcode: None,
                        errmsg: None,
                    },
                    spent,
                );
            }
        };
        loop {
            let token = match self.token(account, cancel).await {
                Ok(token) => token,
                Err(Some(wait)) => return Ended::Decided(wait, spent),
                Err(None) => return Ended::Abandoned,
            };
            // The rate slot is taken right before the send, so that what WeChat sees keeps the
            // limiter's spacing.
            match self.gate.admit(account, cancel).await {
                Gate::Open => {}
                Gate::Closed(wait) => return Ended::Decided(wait, spent),
                Gate::Abandoned => return Ended::Abandoned,
            }
            let attempt = spent.saturating_add(1);
            let answer = match self.send_once(account, job.kind, &token, &body).await {
                Ok(answer) => answer,
                Err(wait) => return Ended::Decided(wait, spent),
            };
            if answer.is_transient_failure() {
                self.settler.metrics().of(&account.name).retries.increment(1);
            }
            let outcome = decide(&answer, attempt, &self.policy, Utc::now());
            if outcome.spends_attempt() {
                spent = attempt;
            }
            let Outcome::Retry { after, why } = outcome else { return Ended::Decided(outcome, spent) };
            let after = jittered(after);
            debug!(attempt, %why, delay_ms = after.as_millis() as u64, "transient failure; retrying");
            if after > self.timing.in_process_max {
                return Ended::Decided(Outcome::Retry { after, why }, spent);
            }
            if !sleep_or_cancel(cancel, after).await {
                return Ended::Abandoned;
            }
        }
    }

    /// The account's token. `Err(Some)`: the job waits for one without spending an attempt;
    /// `Err(None)`: shutdown came first.
    async fn token(&self, account: &Account, cancel: &CancellationToken) -> Result<Token, Option<Outcome>> {
        loop {
            match self.tokens.get(&account.name).await {
                Ok(token) => return Ok(token),
                Err(e @ (TokenError::Unavailable { .. } | TokenError::Refused { .. })) => {
                    let after = e.retry_after().unwrap_or(self.timing.token_wait);
                    return Err(Some(Outcome::Retry { after, why: e.to_string() }));
                }
                Err(e @ TokenError::Store { .. }) => {
                    warn!(error = &e as &dyn std::error::Error, "the job waits for Redis");
                    if !sleep_or_cancel(cancel, jittered(Duration::from_millis(500))).await {
                        return Err(None);
                    }
                }
            }
        }
    }

    /// One send, and if WeChat refuses the token, one more with a fresh token. `Err`: no token
    /// to send again with; the job waits without spending an attempt.
    async fn send_once(
        &self,
        account: &Account,
        kind: JobKind,
        token: &Token,
        body: &bytes::Bytes,
    ) -> Result<Answer, Outcome> {
        let started = Instant::now();
        let mut answer = self.wechat.send(kind, token, body.clone()).await;
        if let Ok(refused) = &answer
            && errcode::classify(refused.errcode) == Action::RefreshToken
        {
            // A second refusal counts as a transient failure, never as a reason to refresh again.
            match self.tokens.replace(&account.name, token).await {
                Ok(fresh) => answer = self.wechat.send(kind, &fresh, body.clone()).await,
                Err(e @ TokenError::Refused { .. }) => {
                    let retry_after = e.retry_after().unwrap_or(self.timing.token_wait);
                    let (errcode, errmsg) = (Some(refused.errcode), Some(refused.errmsg.clone()));
                    return Ok(Answer::TokenRefused { errcode, errmsg, why: e.to_string(), retry_after });
                }
                Err(e) => return Err(Outcome::Retry { after: self.timing.token_wait, why: e.to_string() }),
            }
        }
        self.settler.metrics().of(&account.name).send_seconds.record(started.elapsed().as_secs_f64());
        Ok(match answer {
            Ok(a) => Answer::WeChat { errcode: a.errcode, errmsg: a.errmsg, msgid: a.msgid },
            Err(e) => Answer::Transport(e.to_string()),
        })
    }

    /// Turns the decision into a settlement: a sent job is recorded; any other gives its lease
    /// back first, and a pause or park holds the whole account back.
    async fn finish(
        &self,
        job: &Job,
        account: &Account,
        owner: &str,
        ended: Ended,
        cancel: &CancellationToken,
    ) -> Settlement {
        let Ended::Decided(outcome, attempts) = ended else {
            self.release(job, owner).await;
            return Settlement::Requeue;
        };
        if !matches!(outcome, Outcome::Sent { .. }) {
            self.release(job, owner).await;
        }
        match outcome {
            Outcome::Sent { msgid, errmsg } => {
                let settlement = Settlement::publish(SendResult::succeeded(job, msgid, errmsg, attempts));
                if let Settlement::Publish(published) = &settlement {
                    self.record(job, account, msgid, &published.json, cancel).await;
                }
                settlement
            }
            Outcome::Failed { reason, errcode, errmsg } => {
                match errcode.map(errcode::classify) {
                    Some(Action::Unknown) => {
                        error!(errcode, errmsg = errmsg.as_deref(), "WeChat answered an errcode wxpush does not know");
                        warn!(errcode, %reason, attempts, "job failed");
                    }
                    Some(Action::Declined) => info!(errcode, %reason, "the recipient declined the message"),
                    _ => warn!(errcode, %reason, attempts, "job failed"),
                }
                Settlement::publish(SendResult::failed(job, errcode, errmsg, reason, attempts))
            }
            Outcome::Retry { after, why } => Settlement::Delay { after, attempts, why },
            Outcome::Pause { until, why } => {
                let mut left = (until - Utc::now()).to_std().unwrap_or_default();
                if self.timing.jitter_minute_pause {
                    left += jittered(Duration::from_millis(200));
                }
                self.pauses.pause(account, left, Pause { why: why.clone(), parked: false }).await;
                Settlement::Delay { after: left, attempts, why }
            }
            Outcome::Park { until, why } => {
                let left = (until - Utc::now()).to_std().unwrap_or_default();
                self.pauses.pause(account, left, Pause { why: why.clone(), parked: true }).await;
                Settlement::park(job, until, attempts, why)
            }
        }
    }

    /// Records the success (for duplicates and redeliveries) and msgid → job (for receipts).
    /// Redis trouble is retried for a while; after that the result is still published, since
    /// the message is sent and losing its result would be worse than a missing record.
    async fn record(&self, job: &Job, account: &Account, msgid: u64, json: &[u8], cancel: &CancellationToken) {
        let (ttl, msgid_ttl) = (self.timing.ledger_ttl, self.timing.msgid_ttl);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.redis.record_sent(&job.job_id, json, ttl, &account.appid, msgid, msgid_ttl).await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && !cancel.is_cancelled() => {
                    warn!(error = &e as &dyn std::error::Error, "cannot record the sent job yet; retrying");
                    tokio::time::sleep(jittered(Duration::from_millis(300))).await;
                }
                Err(e) => {
                    error!(
                        error = &e as &dyn std::error::Error,
                        msgid,
                        "could not record the sent job: a duplicate publish of it would be sent again, and its receipts will carry no job_id"
                    );
                    return;
                }
            }
        }
    }

    /// Runs `work` while renewing our lease on the job every third of its length, so that the
    /// lease can be short: a crashed worker's jobs are free again within one lease, while a job
    /// that waits long (rate limit, backoff) stays ours.
    async fn holding_lease<T>(&self, job_id: &str, owner: &str, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let lease = self.timing.lease;
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep(lease / 3) => match self.redis.renew_job(job_id, owner, lease).await {
                    Ok(true) => {}
                    Ok(false) => error!("the job's lease ran out before it could be renewed; another worker may take the job"),
                    Err(e) => warn!(error = &e as &dyn std::error::Error, "could not renew the job's lease; retrying"),
                },
            }
        }
    }

    async fn release(&self, job: &Job, owner: &str) {
        if let Err(e) = self.redis.release_job(&job.job_id, owner).await {
            // The lease runs out by itself; the next delivery waits for that.
            warn!(error = &e as &dyn std::error::Error, "could not release the job's lease");
        }
    }

    /// Whether a delivery's body is over the job size limit and can be refused without its body:
    /// then the caller drops the body at once and hands [`refuse_oversized`](Self::refuse_oversized)
    /// only what it says here.
    pub fn oversized(&self, delivery: &Delivery) -> Option<Oversized> {
        let quorum = self.topology().queue_type == crate::config::QueueType::Quorum;
        (delivery.data.len() > MAX_JOB_BYTES && quorum).then(|| Oversized {
            bytes: delivery.data.len(),
            message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
        })
    }

    /// Refuses a body over the job size limit unread: the broker's own dead-lettering of the
    /// quorum jobs queue moves it, body untouched, to the dead-letter queue, so the worker never
    /// holds or copies it. A `send.failed` goes out when the message_id names the job.
    pub async fn refuse_oversized(&self, oversized: Oversized, publisher: &Publisher) -> Disposition {
        warn!(bytes = oversized.bytes, "job refused: body too large");
        metrics::counter!("wxpush_jobs_oversized_total").increment(1);
        let reason = oversized.reason();
        let result =
            oversized.message_id.filter(|id| job::is_valid_job_id(id)).map(|id| SendResult::invalid(id, None, reason));
        let Some(result) = result else { return Disposition::Reject };
        match self.settler.publish_result(publisher, result).await {
            Disposition::Ack => Disposition::Reject,
            other => other,
        }
    }
}

/// The result recorded for a job done before, published again as it was recorded.
fn recorded_result(job: &Job, recorded: Vec<u8>) -> Settlement {
    match serde_json::from_slice::<SendResult>(&recorded) {
        Ok(result) => Settlement::Publish(Published { result, json: recorded }),
        Err(e) => {
            // Someone else's data under our key: say so, and answer from what we know.
            error!(error = &e as &dyn std::error::Error, "the ledger's record of this job is unreadable");
            Settlement::publish(SendResult::failed(job, None, None, "ledger record unreadable".into(), 0))
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
