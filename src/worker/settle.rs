//! How a delivery ends: [`Settler::settle`] turns what the pipeline decided into confirmed
//! publishes (a result, a delayed or dead-lettered copy) and says how to acknowledge the
//! delivery. The only code that edits envelopes and headers ([`crate::amqp::headers`]).
//!
//! Nothing is acknowledged before what replaces it is confirmed by the broker. If that publish
//! fails, the delivery goes back to the queue.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::message::Delivery;
use tracing::warn;

use super::metrics::Metrics;
use crate::{
    amqp::{Publisher, Topology, headers, json_properties},
    domain::result::SendResult,
};

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

/// A result, serialized once: the same bytes are recorded in the ledger and published.
#[derive(Debug, Clone)]
pub struct Published {
    pub result: SendResult,
    pub json: Vec<u8>,
}

impl Published {
    pub fn new(result: SendResult) -> Result<Self, serde_json::Error> {
        let json = serde_json::to_vec(&result)?;
        Ok(Self { result, json })
    }
}

/// How the pipeline ends a delivery.
#[derive(Debug)]
pub enum Settlement {
    /// The job is finished: publish its result.
    Publish(Published),
    /// The body, untouched, to the dead-letter queue with the reason; then the job's
    /// `send.failed` when its job_id is known.
    DeadLetter { reason: String, result: Option<SendResult> },
    /// Send again later, through the delay queue that fits `after`, carrying `attempts`.
    Delay { after: Duration, attempts: u32, why: String },
    /// Parked until the daily quota resets: `notice` (`send.deferred`) goes out the first
    /// time, then the job is delayed.
    Park { until: DateTime<Utc>, attempts: u32, why: String, notice: SendResult },
    /// Back to the queue as it was (shutdown, or a dependency down).
    Requeue,
}

impl Settlement {
    /// A finished job's result.
    pub fn publish(result: SendResult) -> Settlement {
        match Published::new(result) {
            Ok(published) => Settlement::Publish(published),
            Err(e) => {
                // Not reachable with SendResult's plain fields; never publish an empty body.
                warn!(
                    error = &e as &dyn std::error::Error,
                    "cannot serialize the result; the job goes back to the queue"
                );
                Settlement::Requeue
            }
        }
    }

    /// A parked job: the notice says until when.
    pub fn park(job: &crate::domain::job::Job, until: DateTime<Utc>, attempts: u32, why: String) -> Settlement {
        let reason = format!("{why}; parked until {}", until.to_rfc3339_opts(SecondsFormat::Secs, true));
        Settlement::Park { until, attempts, why, notice: SendResult::deferred(job, reason, attempts) }
    }
}

/// Publishes what settles a delivery; shared by all in-flight jobs of a worker.
pub struct Settler {
    topology: Topology,
    metrics: Metrics,
}

impl Settler {
    pub fn new(topology: Topology, metrics: Metrics) -> Self {
        Self { topology, metrics }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Carries out `settlement` for `delivery`; says how to acknowledge it.
    pub async fn settle(&self, delivery: &Delivery, publisher: &Publisher, settlement: Settlement) -> Disposition {
        match settlement {
            Settlement::Publish(published) => self.publish(publisher, &published).await,
            Settlement::DeadLetter { reason, result } => match self.dead_letter(delivery, publisher, &reason).await {
                Disposition::Ack => self.publish_optional(publisher, result).await,
                other => other,
            },
            Settlement::Delay { after, attempts, why } => {
                self.delay(delivery, publisher, after, attempts, &why, false).await
            }
            Settlement::Park { until, attempts, why, notice } => {
                let account = notice.account.clone().unwrap_or_default();
                if !headers::is_parked(&delivery.properties)
                    && self.publish_result(publisher, notice).await == Disposition::Requeue
                {
                    return Disposition::Requeue;
                }
                self.metrics.of(&account).parked.increment(1);
                let after = (until - Utc::now()).to_std().unwrap_or_default();
                self.delay(delivery, publisher, after, attempts, &why, true).await
            }
            Settlement::Requeue => Disposition::Requeue,
        }
    }

    async fn publish_optional(&self, publisher: &Publisher, result: Option<SendResult>) -> Disposition {
        match result {
            Some(result) => self.publish_result(publisher, result).await,
            None => Disposition::Ack,
        }
    }

    /// Serializes and publishes a result; `Ack` once the broker confirms it.
    pub async fn publish_result(&self, publisher: &Publisher, result: SendResult) -> Disposition {
        match Settlement::publish(result) {
            Settlement::Publish(published) => self.publish(publisher, &published).await,
            _ => Disposition::Requeue,
        }
    }

    /// Publishes a result on the results exchange; `Ack` once the broker confirms it.
    pub async fn publish(&self, publisher: &Publisher, published: &Published) -> Disposition {
        let result = &published.result;
        let props = json_properties(result.job_id.as_deref());
        match publisher
            .publish(&self.topology.results_exchange, result.routing_key(), &published.json, props, false)
            .await
        {
            Ok(()) => {
                self.metrics.of(result.account.as_deref().unwrap_or("")).finished(result.status).increment(1);
                Disposition::Ack
            }
            Err(e) => {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "result not confirmed by the broker; the job goes back to the queue"
                );
                Disposition::Requeue
            }
        }
    }

    /// Parks the delivery's body untouched in the dead-letter queue, with headers saying why,
    /// where from and when. `Ack` once the broker has it.
    pub async fn dead_letter(&self, delivery: &Delivery, publisher: &Publisher, reason: &str) -> Disposition {
        let props = headers::dead_lettered(&delivery.properties, reason, &self.topology.jobs_queue, Utc::now());
        if let Err(e) = publisher.publish("", &self.topology.dead_letter_queue, &delivery.data, props, true).await {
            warn!(error = &e as &dyn std::error::Error, "cannot dead-letter the job; it goes back to the queue");
            return Disposition::Requeue;
        }
        metrics::counter!("wxpush_jobs_dead_lettered_total").increment(1);
        Disposition::Ack
    }

    /// Puts the job in the delay queue that best fits `after`, carrying `attempts`.
    async fn delay(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        after: Duration,
        attempts: u32,
        why: &str,
        parked: bool,
    ) -> Disposition {
        let queue = self.topology.delay_queue(self.topology.tier_for(after));
        let props = headers::delayed(&delivery.properties, attempts, why, parked);
        match publisher.publish("", &queue, &delivery.data, props, true).await {
            Ok(()) => {
                metrics::counter!("wxpush_jobs_delayed_total").increment(1);
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = &e as &dyn std::error::Error, "cannot delay the job; it goes back to the queue");
                Disposition::Requeue
            }
        }
    }
}
