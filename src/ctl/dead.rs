//! `wxpush-ctl dead`: the dead-letter queue, looked at, replayed, pruned and purged without
//! losing anything that was not asked for.
//!
//! Listing, replaying and deleting take messages with `basic.get` and manual acknowledgement.
//! Listing never acknowledges: at the end every message taken is rejected with requeue, in one
//! `basic.nack` covering all of them, so they return in their order ahead of anything parked
//! meanwhile (only their `redelivered` flag is set, and on a quorum queue their
//! `x-delivery-count` rises: the dead-letter queue must have no delivery limit for listing to be
//! harmless, which is how wxpush declares it). Replaying acknowledges a message only after its
//! copy in the jobs queue is confirmed by the broker; deleting acknowledges exactly the chosen
//! messages; whatever is not chosen, or could not be moved, is requeued the same way. A crash in
//! between leaves the message in the dead-letter queue (unacknowledged messages return when the
//! connection closes), at worst also in the jobs queue, where its job_id keeps it from being sent
//! twice.

use std::collections::BTreeSet;

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    Channel, Confirmation, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions},
    types::{DeliveryTag, ShortString},
};

use serde::Serialize;

use super::{
    CtlError,
    broker::{self, call, fresh_properties, get, job_id_of, preview, requeue_all},
};
use crate::telemetry::chain;
use crate::{
    amqp::{
        NotTaken,
        headers::{
            DEAD_LETTERED_AT as DEAD_LETTERED_AT_HEADER, REASON as REASON_HEADER, SOURCE_QUEUE as SOURCE_HEADER,
            broker::{FIRST_DEATH_QUEUE, FIRST_DEATH_REASON},
            text_of,
        },
        taken,
    },
    config::Config,
};

/// Characters of the body shown in a listing.
const PREVIEW_CHARS: usize = 60;
/// Replayed copies awaiting their confirm at once.
const IN_FLIGHT: usize = 256;

/// One parked job, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedJob {
    /// 1-based position from the head of the queue.
    pub position: u64,
    pub job_id: Option<String>,
    /// `x-wxpush-reason` (or RabbitMQ's own `x-first-death-reason` for a broker dead-letter).
    pub reason: Option<String>,
    /// `x-wxpush-source-queue` (or `x-first-death-queue`).
    pub source_queue: Option<String>,
    /// `x-wxpush-dead-lettered-at`, when present.
    pub dead_lettered_at: Option<String>,
    pub size: usize,
    pub preview: String,
}

impl ParkedJob {
    fn from_delivery(position: u64, d: &Delivery) -> Self {
        let props = &d.properties;
        Self {
            position,
            job_id: job_id_of(props, &d.data),
            reason: text_of(props, REASON_HEADER)
                .or_else(|| text_of(props, FIRST_DEATH_REASON).map(|r| format!("RabbitMQ dead-lettered it ({r})"))),
            source_queue: text_of(props, SOURCE_HEADER).or_else(|| text_of(props, FIRST_DEATH_QUEUE)),
            dead_lettered_at: text_of(props, DEAD_LETTERED_AT_HEADER),
            size: d.data.len(),
            preview: preview(&d.data, PREVIEW_CHARS),
        }
    }
}

/// What `dead list` saw.
#[derive(Debug, Clone, Serialize)]
pub struct DeadList {
    pub queue: String,
    /// Whether the queue exists at all (a worker declares it when it starts).
    pub exists: bool,
    /// Messages ready in the queue when the listing started.
    pub total: u32,
    pub jobs: Vec<ParkedJob>,
}

/// Lists up to `limit` parked jobs from the head of the dead-letter queue, leaving them all in
/// place.
pub async fn list(config: &Config, limit: usize) -> Result<DeadList, CtlError> {
    let connection = broker::connect(config, "dead list").await?;
    let result = list_on(&connection, config, limit).await;
    // Closing also returns anything still unacknowledged, should the requeue have failed.
    broker::close(&connection).await;
    result
}

async fn list_on(connection: &Connection, config: &Config, limit: usize) -> Result<DeadList, CtlError> {
    let queue = config.dead_letter_queue.clone();
    let Some(info) = broker::queue_info(connection, &queue).await? else {
        return Ok(DeadList { queue, exists: false, total: 0, jobs: Vec::new() });
    };
    let channel = call("open a channel", connection.create_channel()).await?;
    let mut jobs = Vec::new();
    let mut last_tag = None;
    while jobs.len() < limit && jobs.len() < info.messages as usize {
        let Some(message) = get(&channel, &queue).await? else { break };
        last_tag = Some(message.delivery_tag);
        jobs.push(ParkedJob::from_delivery(jobs.len() as u64 + 1, &message));
    }
    requeue_all(&channel, last_tag).await?;
    let _ = channel.close(200, ShortString::from("done")).await;
    Ok(DeadList { queue, exists: true, total: info.messages, jobs })
}

/// Which parked jobs to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    JobIds(BTreeSet<String>),
}

impl Selection {
    fn matches(&self, job_id: Option<&str>) -> bool {
        match self {
            Selection::All => true,
            Selection::JobIds(ids) => job_id.is_some_and(|id| ids.contains(id)),
        }
    }
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub selection: Selection,
    /// Only say what would move.
    pub dry_run: bool,
}

/// What `dead replay` did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub dead_letter_queue: String,
    pub jobs_queue: String,
    pub dry_run: bool,
    /// Messages looked at.
    pub examined: u64,
    /// Job ids moved (or, in a dry run, that would move); `(no job_id)` for those without one.
    pub moved: Vec<String>,
    /// Chosen but not moved (the broker refused the copy), with why; they stay parked.
    pub failed: Vec<(String, String)>,
    /// Asked-for job ids that are not in the dead-letter queue.
    pub not_found: Vec<String>,
    /// Messages left in the dead-letter queue.
    pub left: u64,
}

impl ReplayReport {
    pub fn all_good(&self) -> bool {
        self.failed.is_empty() && self.not_found.is_empty()
    }
}

/// Moves the chosen parked jobs back to the jobs queue, bodies and properties untouched except
/// the dead-letter headers, which are dropped so each starts afresh. Looks at most at the
/// messages the queue holds when it starts, so it ends even while new jobs are being parked.
pub async fn replay(config: &Config, options: &ReplayOptions) -> Result<ReplayReport, CtlError> {
    let connection = broker::connect(config, "dead replay").await?;
    let result = replay_on(&connection, config, options).await;
    broker::close(&connection).await;
    result
}

async fn replay_on(
    connection: &Connection,
    config: &Config,
    options: &ReplayOptions,
) -> Result<ReplayReport, CtlError> {
    let dlq = config.dead_letter_queue.as_str();
    let mut report = ReplayReport {
        dead_letter_queue: dlq.to_owned(),
        jobs_queue: config.jobs_queue.clone(),
        dry_run: options.dry_run,
        ..ReplayReport::default()
    };
    let mut wanted: BTreeSet<String> = match &options.selection {
        Selection::All => BTreeSet::new(),
        Selection::JobIds(ids) => ids.clone(),
    };
    let Some(info) = broker::queue_info(connection, dlq).await? else {
        report.not_found = wanted.into_iter().collect();
        return Ok(report);
    };
    if !options.dry_run {
        broker::ensure_jobs_queue(connection, config).await?;
    }
    let getter = call("open a channel", connection.create_channel()).await?;
    let publisher = call("open a channel", connection.create_channel()).await?;
    call("enable publisher confirms", publisher.confirm_select(ConfirmSelectOptions::default())).await?;

    // The latest delivery that stays parked: the closing nack covers it and all before it. (A
    // nack naming an acknowledged tag would be refused as unknown.)
    let mut kept = None;
    let outcome: Result<(), CtlError> = async {
        let mut in_flight = FuturesUnordered::new();
        for _ in 0..info.messages {
            let Some(message) = get(&getter, dlq).await? else { break };
            report.examined += 1;
            let job_id = job_id_of(&message.properties, &message.data);
            if !options.selection.matches(job_id.as_deref()) {
                keep(&mut kept, message.delivery_tag);
                continue;
            }
            if let Some(id) = &job_id {
                wanted.remove(id);
            }
            let label = job_id.unwrap_or_else(|| "(no job_id)".into());
            if options.dry_run {
                keep(&mut kept, message.delivery_tag);
                report.moved.push(label);
                continue;
            }
            let confirm = call(
                &format!("publish to {:?}", config.jobs_queue),
                publisher.basic_publish(
                    ShortString::from(""),
                    ShortString::from(config.jobs_queue.as_str()),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &message.data,
                    fresh_properties(&message.properties),
                ),
            )
            .await?;
            let tag = message.delivery_tag;
            in_flight.push(async move { (tag, label, confirm.await) });
            if in_flight.len() >= IN_FLIGHT
                && let Some(done) = in_flight.next().await
            {
                settle(&getter, done, &mut report, &mut kept).await?;
            }
        }
        while let Some(done) = in_flight.next().await {
            settle(&getter, done, &mut report, &mut kept).await?;
        }
        Ok(())
    }
    .await;
    // Whatever happened, the rest goes back to where it was: nothing unconfirmed is acked.
    let requeued = requeue_all(&getter, kept).await;
    let _ = getter.close(200, ShortString::from("done")).await;
    let _ = publisher.close(200, ShortString::from("done")).await;
    outcome?;
    requeued?;
    report.not_found = wanted.into_iter().collect();
    report.left = if options.dry_run {
        info.messages as u64
    } else {
        (info.messages as u64).saturating_sub(report.moved.len() as u64)
    };
    Ok(report)
}

/// Acknowledges a parked message whose copy the broker confirmed; otherwise leaves it parked.
async fn settle(
    getter: &Channel,
    (tag, label, confirmation): (DeliveryTag, String, Result<Confirmation, lapin::Error>),
    report: &mut ReplayReport,
    kept: &mut Option<DeliveryTag>,
) -> Result<(), CtlError> {
    let why = match confirmation.map(taken) {
        Ok(Ok(())) => {
            call("remove a replayed job from the dead-letter queue", getter.basic_ack(tag, BasicAckOptions::default()))
                .await?;
            report.moved.push(label);
            return Ok(());
        }
        Ok(Err(NotTaken::Unroutable)) => "RabbitMQ could not route it to the jobs queue".to_owned(),
        Ok(Err(NotTaken::Nacked)) => "RabbitMQ refused the copy (nack)".to_owned(),
        Ok(Err(NotTaken::Unconfirmed)) => "the copy was not confirmed".to_owned(),
        Err(e) => format!("no confirm for the copy: {}", chain(&e)),
    };
    keep(kept, tag);
    report.failed.push((label, why));
    Ok(())
}

/// Notes that the delivery `tag` stays in the queue.
fn keep(kept: &mut Option<DeliveryTag>, tag: DeliveryTag) {
    *kept = Some(kept.map_or(tag, |k| k.max(tag)));
}

/// What `dead delete` did.
#[derive(Debug, Clone, Default)]
pub struct DeleteReport {
    pub queue: String,
    /// Messages looked at.
    pub examined: u64,
    /// Job ids removed (a job_id parked twice appears twice).
    pub deleted: Vec<String>,
    /// Asked-for job ids that are not in the dead-letter queue.
    pub not_found: Vec<String>,
    /// Messages left in the dead-letter queue.
    pub left: u64,
}

impl DeleteReport {
    pub fn all_good(&self) -> bool {
        self.not_found.is_empty()
    }
}

/// Removes the parked jobs whose job_id is in `job_ids` (every copy), and nothing else: every
/// other message is returned to the queue in its order. Looks at most at the messages the queue
/// holds when it starts.
pub async fn delete(config: &Config, job_ids: &BTreeSet<String>) -> Result<DeleteReport, CtlError> {
    let connection = broker::connect(config, "dead delete").await?;
    let result = delete_on(&connection, config, job_ids).await;
    broker::close(&connection).await;
    result
}

async fn delete_on(
    connection: &Connection,
    config: &Config,
    job_ids: &BTreeSet<String>,
) -> Result<DeleteReport, CtlError> {
    let queue = config.dead_letter_queue.as_str();
    let mut report = DeleteReport { queue: queue.to_owned(), ..DeleteReport::default() };
    let mut wanted = job_ids.clone();
    let Some(info) = broker::queue_info(connection, queue).await? else {
        report.not_found = wanted.into_iter().collect();
        return Ok(report);
    };
    let channel = call("open a channel", connection.create_channel()).await?;
    let mut kept = None;
    let outcome: Result<(), CtlError> = async {
        for _ in 0..info.messages {
            let Some(message) = get(&channel, queue).await? else { break };
            report.examined += 1;
            let Some(id) = job_id_of(&message.properties, &message.data).filter(|id| job_ids.contains(id)) else {
                keep(&mut kept, message.delivery_tag);
                continue;
            };
            call(
                "remove a job from the dead-letter queue",
                channel.basic_ack(message.delivery_tag, BasicAckOptions::default()),
            )
            .await?;
            wanted.remove(&id);
            report.deleted.push(id);
        }
        Ok(())
    }
    .await;
    // Everything not removed goes back, in its order, in one nack.
    let requeued = requeue_all(&channel, kept).await;
    let _ = channel.close(200, ShortString::from("done")).await;
    outcome?;
    requeued?;
    report.not_found = wanted.into_iter().collect();
    report.left = (info.messages as u64).saturating_sub(report.deleted.len() as u64);
    Ok(report)
}

/// The dead-letter queue's ready count, `None` when it does not exist (to ask before a purge).
pub async fn count(config: &Config) -> Result<Option<u32>, CtlError> {
    let connection = broker::connect(config, "dead count").await?;
    let info = broker::queue_info(&connection, &config.dead_letter_queue).await;
    broker::close(&connection).await;
    Ok(info?.map(|i| i.messages))
}

/// What `dead purge` did.
#[derive(Debug, Clone)]
pub struct PurgeReport {
    pub queue: String,
    pub exists: bool,
    /// Messages the broker removed.
    pub purged: u32,
}

/// Removes every ready message from the dead-letter queue (messages another command holds at
/// that moment, unacknowledged, stay).
pub async fn purge(config: &Config) -> Result<PurgeReport, CtlError> {
    let connection = broker::connect(config, "dead purge").await?;
    let result = async {
        let queue = config.dead_letter_queue.clone();
        if broker::queue_info(&connection, &queue).await?.is_none() {
            return Ok(PurgeReport { queue, exists: false, purged: 0 });
        }
        let channel = call("open a channel", connection.create_channel()).await?;
        let purged = call(
            &format!("purge {queue:?}"),
            channel.queue_purge(ShortString::from(queue.as_str()), QueuePurgeOptions::default()),
        )
        .await?;
        let _ = channel.close(200, ShortString::from("done")).await;
        Ok(PurgeReport { queue, exists: true, purged })
    }
    .await;
    broker::close(&connection).await;
    result
}

impl std::fmt::Display for DeleteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "deleted {} of {} examined jobs from {}", self.deleted.len(), self.examined, self.queue)?;
        for id in &self.deleted {
            writeln!(f, "  {id}")?;
        }
        if !self.not_found.is_empty() {
            writeln!(f, "not in the dead-letter queue: {}", self.not_found.join(", "))?;
        }
        writeln!(f, "{} jobs left in {}, in their order", self.left, self.queue)
    }
}

impl std::fmt::Display for PurgeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.exists {
            writeln!(f, "purged {} parked jobs from {}", self.purged, self.queue)
        } else {
            writeln!(f, "dead-letter queue {} does not exist yet; nothing to purge", self.queue)
        }
    }
}

impl std::fmt::Display for DeadList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.exists {
            return writeln!(
                f,
                "dead-letter queue {} does not exist yet (a worker declares it when it starts); nothing is parked",
                self.queue
            );
        }
        if self.jobs.is_empty() {
            return writeln!(f, "dead-letter queue {} is empty", self.queue);
        }
        writeln!(
            f,
            "dead-letter queue {}: showing {} of {} parked jobs (listing removes nothing)",
            self.queue,
            self.jobs.len(),
            self.total
        )?;
        for j in &self.jobs {
            writeln!(f)?;
            writeln!(f, "#{:<4} job_id  {}", j.position, j.job_id.as_deref().unwrap_or("(none)"))?;
            writeln!(f, "      reason  {}", j.reason.as_deref().unwrap_or("(no reason header)"))?;
            if let Some(q) = &j.source_queue {
                writeln!(f, "      from    {q}")?;
            }
            if let Some(at) = &j.dead_lettered_at {
                writeln!(f, "      parked  {at}")?;
            }
            writeln!(f, "      body    {} bytes: {}", j.size, j.preview)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would move" } else { "moved" };
        writeln!(
            f,
            "{verb} {} of {} examined jobs from {} to {}",
            self.moved.len(),
            self.examined,
            self.dead_letter_queue,
            self.jobs_queue
        )?;
        const SHOWN: usize = 20;
        for id in self.moved.iter().take(SHOWN) {
            writeln!(f, "  {id}")?;
        }
        if self.moved.len() > SHOWN {
            writeln!(f, "  … and {} more", self.moved.len() - SHOWN)?;
        }
        for (id, why) in &self.failed {
            writeln!(f, "not moved (still parked): {id}: {why}")?;
        }
        if !self.not_found.is_empty() {
            writeln!(f, "not in the dead-letter queue: {}", self.not_found.join(", "))?;
        }
        writeln!(f, "{} jobs left in {}", self.left, self.dead_letter_queue)?;
        if self.dry_run {
            writeln!(f, "dry run: nothing was moved; run again without --dry-run to move them")?;
        }
        Ok(())
    }
}
