//! One connection's worth of RabbitMQ for the worker: a consumer of the jobs queue, a
//! confirm-mode publisher and the acknowledger, and the loop that hands each delivery to the
//! pipeline in a task of its own.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Connection, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, warn};

use super::{acks::Acknowledger, pipeline::Pipeline, settle::Disposition};
use crate::{
    amqp::{AmqpError, Nodes, Publisher},
    config::Config,
    health::Health,
};

/// How long shutdown waits for the broker at each step (cancelling the consumer, settling,
/// closing): a node that hangs must not keep the worker from exiting. Whatever is unsettled
/// then returns to the queue when the connection drops.
const SHUTDOWN_BROKER_WAIT: Duration = Duration::from_secs(5);
/// How long a lost connection is given to close and settle what it can.
const LOST_SESSION_WAIT: Duration = Duration::from_secs(2);

/// Why a session's loop ended.
pub enum Ended {
    /// Shutdown: the consumer is cancelled; in-flight jobs may still settle on this session.
    Shutdown,
    /// The connection or the consumer is gone: reconnect.
    Lost,
}

pub struct Session {
    connection: Connection,
    channel: lapin::Channel,
    consumer: Consumer,
    acks: Acknowledger,
    publisher: Publisher,
}

/// What every delivery's task shares.
pub struct Shared {
    pub pipeline: Arc<Pipeline>,
    pub health: Arc<Health>,
    pub tracker: TaskTracker,
    /// Cancelled when the grace period is over: in-flight waits stop and their jobs are requeued.
    pub hard_stop: CancellationToken,
}

impl Session {
    pub async fn open(config: &Config, pipeline: &Pipeline, brokers: &Nodes) -> Result<Session, AmqpError> {
        let name = format!("wxpush-worker {} pid {}", hostname(), std::process::id());
        // The first node that answers, starting after the one the last connection used.
        let connection = brokers.connect(&name).await?;
        pipeline.topology().declare(&connection).await?;
        let channel = connection.create_channel().await.map_err(AmqpError::Channel)?;
        channel.basic_qos(config.concurrency, BasicQosOptions::default()).await.map_err(AmqpError::Channel)?;
        let consumer = channel
            .basic_consume(
                ShortString::from(pipeline.topology().jobs_queue.as_str()),
                ShortString::from(format!("wxpush-{}", uuid::Uuid::new_v4().simple())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(AmqpError::Channel)?;
        let publisher = Publisher::open(&connection).await?;
        let max_held = (config.concurrency as usize / 4).max(1);
        let acks = Acknowledger::start(channel.clone(), Duration::from_millis(2), max_held);
        Ok(Session { connection, channel, consumer, publisher, acks })
    }

    /// Consumes until shutdown or until the connection is lost.
    pub async fn consume(&mut self, shared: &Shared, shutdown: &CancellationToken) -> Ended {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Stop deliveries; prefetched ones not yet started return to the queue at close.
                    let cancel = self.channel.basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
                    if tokio::time::timeout(SHUTDOWN_BROKER_WAIT, cancel).await.is_err() {
                        warn!("RabbitMQ did not answer the consumer's cancellation; shutting down regardless");
                    }
                    return Ended::Shutdown;
                }
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => self.dispatch(delivery, shared),
                    Some(Err(e)) => {
                        warn!(error = &e as &dyn std::error::Error, "lost the RabbitMQ connection; reconnecting");
                        return Ended::Lost;
                    }
                    None => {
                        warn!("the broker cancelled the consumer; reconnecting");
                        return Ended::Lost;
                    }
                }
            }
        }
    }

    /// Starts the delivery's task.
    fn dispatch(&self, delivery: Delivery, shared: &Shared) {
        shared.health.progress();
        let (pipeline, publisher, acks) = (Arc::clone(&shared.pipeline), self.publisher.clone(), self.acks.handle());
        let tag = delivery.delivery_tag;
        acks.delivered(tag);
        if let Some(oversized) = pipeline.oversized(&delivery) {
            // Dropped here, before any task holds it: a flood of huge bodies then costs one
            // body at a time, not one per concurrency slot.
            drop(delivery);
            shared
                .tracker
                .spawn(async move { acks.finished(tag, pipeline.refuse_oversized(oversized, &publisher).await) });
            return;
        }
        let (health, hard_stop) = (Arc::clone(&shared.health), shared.hard_stop.clone());
        shared.tracker.spawn(async move {
            health.job_started();
            acks.finished(tag, handle(&pipeline, delivery, &publisher, &hard_stop).await);
            health.job_finished();
        });
    }

    /// Leaves a broken connection, in the background: the caller reconnects (or shuts down) at
    /// once. In-flight jobs of it finish on their own: their acks fail and the broker
    /// redelivers them, which the idempotency ledger makes harmless. Bounded, so that a node
    /// that hangs cannot hold up the drain at shutdown.
    pub fn abandon(self, tracker: &TaskTracker) {
        tracker.spawn(async move {
            let leaving = async {
                let _ = self.connection.close(320, ShortString::from("reconnecting")).await;
                self.acks.close().await;
            };
            let _ = tokio::time::timeout(LOST_SESSION_WAIT, leaving).await;
        });
    }

    /// Settles what finished, then closes: that returns every unacknowledged delivery.
    pub async fn close(self) {
        let _ = tokio::time::timeout(SHUTDOWN_BROKER_WAIT, self.acks.close()).await;
        let closing = self.connection.close(200, ShortString::from("shutdown"));
        let _ = tokio::time::timeout(SHUTDOWN_BROKER_WAIT, closing).await;
    }
}

/// Runs one delivery; says how to acknowledge it. A panic in the pipeline is a poison message:
/// it is dead-lettered rather than redelivered forever.
async fn handle(
    pipeline: &Pipeline,
    delivery: Delivery,
    publisher: &Publisher,
    hard_stop: &CancellationToken,
) -> Disposition {
    let outcome = AssertUnwindSafe(pipeline.process(&delivery, publisher, hard_stop)).catch_unwind().await;
    match outcome {
        Ok(d) => d,
        Err(_) => {
            error!("the pipeline panicked on a job; dead-lettering it as a poison message");
            let reason = "poison message: the worker panicked processing it";
            pipeline.settler().dead_letter(&delivery, publisher, reason).await
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
}
