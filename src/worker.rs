//! The worker process: consumes the jobs queue and runs [`Pipeline::process`] for up to
//! `concurrency` jobs at once; reconnects when RabbitMQ goes away; drains on shutdown.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::{
    Connection, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    acks::Acknowledger,
    amqp::{AmqpError, Nodes, Publisher, Topology},
    config::Config,
    health::Health,
    pipeline::{Disposition, Pipeline},
    store::{Redis, StoreError},
    token::TokenManager,
    wechat::{HttpError, WechatClient},
};

/// Why the worker could not start. Outages after start are waited out, never returned.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Redis(#[from] StoreError),
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// How long shutdown waits for the broker at each step (cancelling the consumer, settling,
/// closing): a node that hangs must not keep the worker from exiting. Whatever is unsettled
/// then returns to the queue when the connection drops.
const SHUTDOWN_BROKER_WAIT: Duration = Duration::from_secs(5);

/// One connection's worth of RabbitMQ: a consumer and a confirm-mode publisher.
struct Session {
    connection: Connection,
    channel: lapin::Channel,
    consumer: Consumer,
    acks: Acknowledger,
    publisher: Publisher,
}

impl Session {
    async fn open(config: &Config, topology: &Topology, brokers: &Nodes) -> Result<Session, AmqpError> {
        let name = format!("wxpush-worker {} pid {}", hostname(), std::process::id());
        // The first node that answers, starting after the one the last connection used.
        let connection = brokers.connect(&name).await?;
        topology.declare(&connection).await?;
        let channel = connection.create_channel().await.map_err(AmqpError::Channel)?;
        channel.basic_qos(config.concurrency, BasicQosOptions::default()).await.map_err(AmqpError::Channel)?;
        let consumer = channel
            .basic_consume(
                ShortString::from(topology.jobs_queue.as_str()),
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
}

/// Runs the worker until `shutdown` is cancelled, then drains: no new jobs, in-flight jobs get
/// `shutdown_grace` to finish, and whatever is still unfinished goes back to the queue.
pub async fn run(config: Config, shutdown: CancellationToken, health: Arc<Health>) -> Result<(), WorkerError> {
    let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
    let wechat = WechatClient::new(&config.wechat_api_base, config.http_timeout())?;
    let tokens = TokenManager::new(redis.clone(), wechat.clone(), config.token.clone(), &config.accounts);
    let background = shutdown.child_token();
    tokens.spawn_refreshers(background.clone());
    health.watch_redis(redis.clone(), background.clone());
    let pipeline = Arc::new(Pipeline::new(config.clone(), redis, tokens, wechat));
    let topology = pipeline.topology().clone();
    let tracker = TaskTracker::new();
    // Cancelled when the grace period is over: in-flight waits stop and their jobs are requeued.
    let hard_stop = CancellationToken::new();
    let reconnect = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let mut delays = reconnect.build();
    let mut last_session: Option<Session> = None;
    let brokers = Nodes::new(&config.amqp_url);

    'connect: while !shutdown.is_cancelled() {
        let mut session = match Session::open(&config, &topology, &brokers).await {
            Ok(s) => s,
            Err(e) => {
                health.set_amqp(false);
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                if let AmqpError::QueueMismatch { .. } = e {
                    // An operator has to act; keep asking (with backoff) so the worker resumes once they have.
                    error!(
                        error = &e as &dyn std::error::Error,
                        retry_in_secs = delay.as_secs_f64(),
                        "cannot declare the queues; no jobs are consumed until this is fixed"
                    );
                } else {
                    error!(
                        error = &e as &dyn std::error::Error,
                        retry_in_secs = delay.as_secs_f64(),
                        "RabbitMQ unavailable; jobs wait until it is back"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break 'connect,
                    _ = tokio::time::sleep(delay) => continue 'connect,
                }
            }
        };
        delays = reconnect.build();
        health.set_amqp(true);
        info!(queue = %topology.jobs_queue, concurrency = config.concurrency, "consuming jobs");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Stop deliveries; prefetched ones not yet started return to the queue at close.
                    let tag = session.consumer.tag();
                    let cancel = session.channel.basic_cancel(tag, BasicCancelOptions::default());
                    if tokio::time::timeout(SHUTDOWN_BROKER_WAIT, cancel).await.is_err() {
                        warn!("RabbitMQ did not answer the consumer's cancellation; shutting down regardless");
                    }
                    last_session = Some(session);
                    break 'connect;
                }
                next = session.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        health.progress();
                        if let Some(oversized) = pipeline.oversized(&delivery) {
                            // Dropped here, before any task holds it: a flood of huge bodies then
                            // costs one body at a time, not one per concurrency slot.
                            let tag = delivery.delivery_tag;
                            drop(delivery);
                            let (pipeline, publisher, acks) = (Arc::clone(&pipeline), session.publisher.clone(), session.acks.handle());
                            acks.delivered(tag);
                            tracker.spawn(async move { acks.finished(tag, pipeline.refuse_oversized(oversized, &publisher).await) });
                            continue;
                        }
                        let pipeline = Arc::clone(&pipeline);
                        let publisher = session.publisher.clone();
                        let hard_stop = hard_stop.clone();
                        let health = Arc::clone(&health);
                        let acks = session.acks.handle();
                        acks.delivered(delivery.delivery_tag);
                        tracker.spawn(async move {
                            health.job_started();
                            let tag = delivery.delivery_tag;
                            acks.finished(tag, handle(&pipeline, delivery, &publisher, &hard_stop).await);
                            health.job_finished();
                        });
                    }
                    Some(Err(e)) => {
                        health.set_amqp(false);
                        warn!(error = %e, "lost the RabbitMQ connection; reconnecting");
                        break;
                    }
                    None => {
                        health.set_amqp(false);
                        warn!("the broker cancelled the consumer; reconnecting");
                        break;
                    }
                }
            }
        }
        // In-flight jobs of the old connection finish on their own: their acks fail and the
        // broker redelivers them, which the idempotency ledger makes harmless.
        let _ = session.connection.close(320, ShortString::from("reconnecting")).await;
        tokio::spawn(session.acks.close());
        let delay = delays.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => break 'connect,
            _ = tokio::time::sleep(delay) => {}
        }
    }

    tracker.close();
    let grace = config.shutdown_grace();
    info!(in_flight = tracker.len(), grace_secs = grace.as_secs(), "shutting down: finishing in-flight jobs");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(unfinished = tracker.len(), "grace period over; unfinished jobs go back to the queue");
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
    background.cancel();
    if let Some(session) = last_session {
        // Settle what finished, then close: that returns every unacknowledged delivery.
        let _ = tokio::time::timeout(SHUTDOWN_BROKER_WAIT, session.acks.close()).await;
        let _ =
            tokio::time::timeout(SHUTDOWN_BROKER_WAIT, session.connection.close(200, ShortString::from("shutdown")))
                .await;
    }
    info!("worker stopped");
    Ok(())
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
            pipeline.dead_letter(&delivery, publisher, "poison message: the worker panicked processing it").await
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
}
