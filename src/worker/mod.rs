//! The worker: consumes the jobs queue and takes each job through its life
//! ([`pipeline::Pipeline::process`]), up to `concurrency` at once; reconnects when RabbitMQ goes
//! away; drains on shutdown.
//!
//! - [`pipeline`]: a job's life on one page, from delivery to [`settle::Settlement`];
//! - [`settle`]: the confirmed publishes that end a delivery, and how it is acknowledged;
//! - [`admission`], [`pauses`]: the pool-wide rate slot and account pauses;
//! - [`session`]: one RabbitMQ connection's consumer, publisher and acknowledger;
//! - [`acks`]: acknowledgements in runs (`multiple`), decided by a pure state machine;
//! - [`tokens`]: the pool's shared access token per account (over [`crate::store::token`]);
//! - [`metrics`]: per-account metric handles.

pub mod acks;
pub mod admission;
pub mod metrics;
pub mod pauses;
pub mod pipeline;
pub mod session;
pub mod settle;
pub mod tokens;

use std::{sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

pub use self::{
    pipeline::Pipeline,
    settle::{Disposition, Settlement},
};
use self::{
    session::{Session, Shared},
    tokens::TokenManager,
};
use crate::{
    amqp::{AmqpError, Nodes},
    backoff::Backoff,
    config::Config,
    health::Health,
    store::{Redis, StoreError},
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

/// Runs the worker until `shutdown` is cancelled, then drains: no new jobs, in-flight jobs get
/// `shutdown_grace` to finish, and whatever is still unfinished goes back to the queue.
pub async fn run(config: Config, shutdown: CancellationToken, health: Arc<Health>) -> Result<(), WorkerError> {
    let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
    let wechat = WechatClient::new(&config.wechat_api_base, config.http_timeout)?;
    let tokens = TokenManager::new(redis.clone(), wechat.clone(), config.token.clone(), &config.accounts);
    // Token refreshers and the Redis watch: stopped after the jobs have drained.
    let background = shutdown.child_token();
    let background_tasks = TaskTracker::new();
    tokens.spawn_refreshers(&background_tasks, background.clone());
    background_tasks.spawn(health.clone().watch_redis(redis.clone(), background.clone()));
    let shared = Shared {
        pipeline: Arc::new(Pipeline::new(config.clone(), redis, tokens, wechat)),
        health,
        tracker: TaskTracker::new(),
        hard_stop: CancellationToken::new(),
    };
    let last_session = consume(&config, &shared, &shutdown).await;
    drain(&shared, config.shutdown_grace).await;
    background.cancel();
    background_tasks.close();
    // A token fetch under way is not cut short; it ends within the HTTP timeout.
    let _ = tokio::time::timeout(config.http_timeout, background_tasks.wait()).await;
    if let Some(session) = last_session {
        session.close().await;
    }
    info!("worker stopped");
    Ok(())
}

/// Connects, consumes, and reconnects with backoff until shutdown; returns the session that
/// was open then, for its in-flight jobs to settle on.
async fn consume(config: &Config, shared: &Shared, shutdown: &CancellationToken) -> Option<Session> {
    const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut delays = RECONNECT.delays();
    let brokers = Nodes::new(&config.amqp_url);
    while !shutdown.is_cancelled() {
        let delay = match Session::open(config, &shared.pipeline, &brokers).await {
            Ok(mut session) => {
                delays.reset();
                shared.health.set_amqp(true);
                let queue = &shared.pipeline.topology().jobs_queue;
                info!(%queue, concurrency = config.concurrency, "consuming jobs");
                if let session::Ended::Shutdown = session.consume(shared, shutdown).await {
                    return Some(session);
                }
                shared.health.set_amqp(false);
                session.abandon(&shared.tracker);
                delays.next_delay()
            }
            Err(e) => {
                shared.health.set_amqp(false);
                let delay = delays.next_delay();
                let retry_in_secs = delay.as_secs_f64();
                if let AmqpError::QueueMismatch { .. } = e {
                    // An operator has to act; keep asking (with backoff) so the worker resumes once they have.
                    error!(
                        error = &e as &dyn std::error::Error,
                        retry_in_secs, "cannot declare the queues; no jobs are consumed until this is fixed"
                    );
                } else {
                    error!(
                        error = &e as &dyn std::error::Error,
                        retry_in_secs, "RabbitMQ unavailable; jobs wait until it is back"
                    );
                }
                delay
            }
        };
        if !sleep_or_cancel(shutdown, delay).await {
            break;
        }
    }
    None
}

/// Gives in-flight jobs `grace` to finish; then cancels their waits so they requeue.
async fn drain(shared: &Shared, grace: Duration) {
    let tracker = &shared.tracker;
    tracker.close();
    info!(in_flight = tracker.len(), grace_secs = grace.as_secs(), "shutting down: finishing in-flight jobs");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(unfinished = tracker.len(), "grace period over; unfinished jobs go back to the queue");
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
}

/// Sleeps unless cancelled first; returns false when cancelled.
pub(crate) async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
