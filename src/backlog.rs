//! Queue backlog gauges: how many messages wait in each queue wxpush uses, as RabbitMQ reports
//! them, polled every few seconds with passive declares on a connection of its own (a slow or
//! failing poll never touches the channels that carry jobs).
//!
//! `wxpush_queue_messages_ready{queue,kind}` and `wxpush_queue_consumers{queue,kind}`, for the
//! jobs queue, each delay queue, the dead-letter queue and `<results_exchange>.unrouted`. Every
//! worker reports the same broker-wide numbers: aggregate them with `max by (queue)`. A passive
//! declare does not count unacknowledged messages; the workers' `wxpush_jobs_in_flight`, summed,
//! does.

use std::time::Duration;

use lapin::{
    Connection, ErrorKind,
    options::QueueDeclareOptions,
    types::{FieldTable, ShortString},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    amqp::{Nodes, Topology},
    backoff::Backoff,
    config::Config,
};

/// How often the queues are polled.
pub const POLL_EVERY: Duration = Duration::from_secs(5);

/// A missing queue is looked up again every this many rounds only: each look-up closes a
/// channel, which the AMQP client logs as an error.
const MISSING_EVERY: u64 = 12;

/// Waits between attempts to reach RabbitMQ.
const RECONNECT: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// How long one passive declare may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// AMQP reply code of a passive declare of a queue that does not exist.
const NOT_FOUND: u16 = 404;

/// One queue whose backlog is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub queue: String,
    /// `jobs`, `delay`, `dead_letter` or `unrouted`.
    pub kind: &'static str,
}

/// The queues of `config`: jobs, each delay tier, dead letters, unrouted results.
pub fn watched(config: &Config) -> Vec<Watched> {
    let topology = Topology::from_config(config);
    let mut out = vec![Watched { queue: topology.jobs_queue.clone(), kind: "jobs" }];
    for &secs in &topology.delay_tiers_secs {
        out.push(Watched { queue: topology.delay_queue(secs), kind: "delay" });
    }
    out.push(Watched { queue: topology.dead_letter_queue.clone(), kind: "dead_letter" });
    out.push(Watched { queue: format!("{}.unrouted", topology.results_exchange), kind: "unrouted" });
    out
}

/// Polls the backlog of `config`'s queues until `cancel`, reconnecting as needed.
pub fn spawn(config: &Config, cancel: CancellationToken) -> JoinHandle<()> {
    let nodes = Nodes::new(&config.amqp_url);
    let queues = watched(config);
    tokio::spawn(async move { run(nodes, queues, cancel).await })
}

/// What the last poll of a queue found, to log only changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Unknown,
    Present,
    Missing,
}

struct Gauges {
    watched: Watched,
    ready: metrics::Gauge,
    consumers: metrics::Gauge,
    errors: metrics::Counter,
    seen: Seen,
}

async fn run(nodes: Nodes, queues: Vec<Watched>, cancel: CancellationToken) {
    let mut gauges: Vec<Gauges> = queues
        .into_iter()
        .map(|w| Gauges {
            ready: metrics::gauge!("wxpush_queue_messages_ready", "queue" => w.queue.clone(), "kind" => w.kind),
            consumers: metrics::gauge!("wxpush_queue_consumers", "queue" => w.queue.clone(), "kind" => w.kind),
            errors: metrics::counter!("wxpush_queue_poll_errors_total", "kind" => w.kind),
            watched: w,
            seen: Seen::Unknown,
        })
        .collect();
    let mut delays = RECONNECT.delays();
    let name = format!("wxpush-worker backlog pid {}", std::process::id());
    while !cancel.is_cancelled() {
        let connection = tokio::select! {
            _ = cancel.cancelled() => return,
            c = nodes.connect(&name) => c,
        };
        let connection = match connection {
            Ok(c) => c,
            Err(e) => {
                debug!(error = &e as &dyn std::error::Error, "backlog poller cannot reach RabbitMQ");
                gauges.iter().for_each(|g| g.errors.increment(1));
                let delay = delays.next_delay();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        delays.reset();
        // The first round waits too: by then the worker has declared its queues.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + POLL_EVERY, POLL_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u64 = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = connection.close(200, ShortString::from("shutdown")).await;
                    return;
                }
                _ = ticks.tick() => {}
            }
            let recheck_missing = round.is_multiple_of(MISSING_EVERY);
            round += 1;
            if let Err(e) = poll(&connection, &mut gauges, recheck_missing).await {
                debug!(error = %e, "backlog poll failed; reconnecting");
                break;
            }
        }
        let _ = connection.close(320, ShortString::from("reconnecting")).await;
    }
}

/// Why a round of polls stopped.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("RabbitMQ refused to {action}: {source}")]
    Broker { action: &'static str, source: lapin::Error },
    #[error("RabbitMQ did not {action} within {} s", CALL_TIMEOUT.as_secs())]
    Timeout { action: &'static str },
}

/// Runs one call with [`CALL_TIMEOUT`].
async fn call<T>(
    action: &'static str,
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<Result<T, lapin::Error>, PollError> {
    tokio::time::timeout(CALL_TIMEOUT, fut).await.map_err(|_| PollError::Timeout { action })
}

/// One round: a passive declare per queue (queues missing last time only when
/// `recheck_missing`). A missing queue closes its channel, so the next queue gets a new one; it
/// reads as empty. Any other failure ends the round.
async fn poll(connection: &Connection, gauges: &mut [Gauges], recheck_missing: bool) -> Result<(), PollError> {
    let mut channel = None;
    for g in gauges.iter_mut().filter(|g| recheck_missing || g.seen != Seen::Missing) {
        let result = poll_one(connection, &mut channel, g).await;
        if result.is_err() {
            g.errors.increment(1);
        }
        result?;
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, ShortString::from("done")).await;
    }
    Ok(())
}

async fn poll_one(
    connection: &Connection,
    channel: &mut Option<lapin::Channel>,
    g: &mut Gauges,
) -> Result<(), PollError> {
    let ch = match channel.take() {
        Some(ch) => ch,
        None => call("open a channel", connection.create_channel())
            .await?
            .map_err(|source| PollError::Broker { action: "open a channel", source })?,
    };
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let action = "look up a queue";
    let declared =
        call(action, ch.queue_declare(ShortString::from(g.watched.queue.as_str()), options, FieldTable::default()))
            .await?;
    match declared {
        Ok(q) => {
            g.ready.set(f64::from(q.message_count()));
            g.consumers.set(f64::from(q.consumer_count()));
            if g.seen == Seen::Missing {
                info!(queue = %g.watched.queue, kind = g.watched.kind, "queue exists now; its backlog is reported");
            }
            g.seen = Seen::Present;
            *channel = Some(ch);
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            if g.seen == Seen::Present {
                warn!(queue = %g.watched.queue, kind = g.watched.kind, "queue is gone; it reads as empty");
            } else if g.seen == Seen::Unknown {
                debug!(queue = %g.watched.queue, kind = g.watched.kind, "queue does not exist (yet); it reads as empty");
            }
            g.ready.set(0.0);
            g.consumers.set(0.0);
            g.seen = Seen::Missing;
            Ok(())
        }
        Err(source) => Err(PollError::Broker { action, source }),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p) if p.get_id() == NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_wxpush_uses_is_watched() {
        let mut config = Config {
            jobs_queue: "j".into(),
            dead_letter_queue: "d".into(),
            results_exchange: "r".into(),
            ..Config::default()
        };
        config.retry.delay_tiers_secs = vec![1, 30];
        let got: Vec<(String, &str)> = watched(&config).into_iter().map(|w| (w.queue, w.kind)).collect();
        assert_eq!(
            got,
            [
                ("j".to_owned(), "jobs"),
                ("j.delay.1s".to_owned(), "delay"),
                ("j.delay.30s".to_owned(), "delay"),
                ("d".to_owned(), "dead_letter"),
                ("r.unrouted".to_owned(), "unrouted"),
            ]
        );
    }
}
