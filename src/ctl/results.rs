//! Results as they go out, and results nobody took.
//!
//! - Live: a private queue (exclusive, auto-delete, so it disappears with the tool) bound to the
//!   results exchange with a routing-key pattern. `publish --wait` declares one before the first
//!   publish so no result can slip by.
//! - Unrouted: the queue `<results_exchange>.unrouted`, which the worker declares with the fanout
//!   exchange of the same name as the results exchange's alternate exchange: it keeps (bounded)
//!   every result no binding took. Reading it takes nothing unless asked: every message read is
//!   returned at the end in one `basic.nack`, in its order.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    CtlError,
    broker::{self, call},
};
use crate::{amqp::Short, config::Config};

/// The queue, and the fanout exchange feeding it, that keep results no binding took.
pub fn unrouted_queue(config: &Config) -> String {
    crate::amqp::unrouted_name(&config.results_exchange)
}

/// One message from the results exchange.
#[derive(Debug, Clone)]
pub struct ReceivedResult {
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub body: Vec<u8>,
}

impl ReceivedResult {
    fn from_delivery(delivery: Delivery) -> Self {
        ReceivedResult {
            routing_key: delivery.routing_key.to_string(),
            correlation_id: delivery.properties.correlation_id().as_ref().map(|c| c.to_string()),
            body: delivery.data,
        }
    }

    /// The job it is about: the body's `job_id`, else the correlation id (which is a digest for
    /// a job_id longer than 255 bytes, so the body comes first).
    pub fn job_id(&self) -> Option<String> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("job_id")?.as_str().filter(|id| !id.is_empty()).map(str::to_owned))
            .or_else(|| self.correlation_id.clone().filter(|c| !c.is_empty()))
    }

    /// One line: the routing key, then the body as published (line breaks as spaces).
    pub fn to_line(&self) -> String {
        let body: String =
            String::from_utf8_lossy(&self.body).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        format!("{:<22} {body}", self.routing_key)
    }

    /// `{"routing_key", "correlation_id", "body"}`, the body parsed when it is JSON (else a string).
    pub fn to_json(&self) -> Value {
        let body = serde_json::from_slice::<Value>(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()));
        json!({"routing_key": self.routing_key, "correlation_id": self.correlation_id, "body": body})
    }

    pub fn succeeded(&self) -> bool {
        self.routing_key == "send.succeeded"
    }

    /// Why a failed send failed, in words: the result's `reason`, else WeChat's `errmsg`, else
    /// the routing key.
    pub fn reason(&self) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        v.get("reason")
            .and_then(Value::as_str)
            .or_else(|| v.get("errmsg").and_then(Value::as_str))
            .map_or_else(|| format!("({} without a reason)", self.routing_key), str::to_owned)
    }
}

/// A consumer of a private queue bound to the results exchange.
pub struct ResultWatcher {
    channel: Channel,
    consumer: Consumer,
}

impl ResultWatcher {
    /// Declares the results exchange if needed (as the worker does), a private queue, binds it
    /// with `binding` (`send.*` for send results) and starts consuming.
    pub async fn start(connection: &Connection, config: &Config, binding: &str) -> Result<Self, CtlError> {
        broker::ensure_results_exchange(connection, config).await?;
        Self::bind(connection, config, binding).await
    }

    /// Like [`ResultWatcher::start`], but the results exchange must exist already.
    pub async fn bind(connection: &Connection, config: &Config, binding: &str) -> Result<Self, CtlError> {
        let binding = Short::new("the routing-key pattern", binding)
            .map_err(|e| CtlError::Usage(format!("{e}; give a shorter --pattern")))?;
        let channel = call("open a channel", connection.create_channel()).await?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = call(
            "declare a private results queue",
            channel.queue_declare(ShortString::from(""), options, FieldTable::default()),
        )
        .await?;
        let name = queue.name().clone();
        call(
            &format!("bind a results queue to {:?}", config.results_exchange),
            channel.queue_bind(
                name.clone(),
                ShortString::from(config.results_exchange.as_str()),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        // No acks: the queue is ours alone and vanishes with us; nothing in it is anyone's duty.
        let options = BasicConsumeOptions { no_ack: true, exclusive: true, ..BasicConsumeOptions::default() };
        let consumer = call(
            "consume the results queue",
            channel.basic_consume(name, ShortString::from(""), options, FieldTable::default()),
        )
        .await?;
        Ok(Self { channel, consumer })
    }

    /// The next result; `None` when the channel is gone.
    pub async fn next(&mut self) -> Option<Result<ReceivedResult, CtlError>> {
        let delivery = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(CtlError::broker("receive results", e))),
        };
        Some(Ok(ReceivedResult::from_delivery(delivery)))
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, ShortString::from("done")).await;
    }
}

/// Where `wxpush-ctl results` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The unrouted queue. Results stay there unless `take`: then each is acknowledged (removed)
    /// once it has been shown.
    Unrouted { take: bool },
    /// Results published from now on, through a private queue bound with the pattern.
    Live,
}

/// How `wxpush-ctl results` reads.
#[derive(Debug, Clone)]
pub struct ShowOptions {
    pub source: Source,
    /// A topic pattern of routing keys (`#`: all, `send.*`, `delivery.#`): the binding of the live
    /// queue, a filter on the unrouted queue (results it does not match are left alone).
    pub pattern: String,
    /// Keep waiting for new results (always so for `Live`).
    pub follow: bool,
    /// Stop after this many results shown.
    pub limit: Option<u64>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
}

impl Default for ShowOptions {
    fn default() -> Self {
        Self {
            source: Source::Unrouted { take: false },
            pattern: "#".into(),
            follow: false,
            limit: None,
            timeout: None,
        }
    }
}

/// What `wxpush-ctl results` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShowSummary {
    /// The queue read (unrouted) or the exchange watched (live).
    pub from: String,
    /// Results shown.
    pub shown: u64,
    /// Results removed from the unrouted queue (`take`).
    pub taken: u64,
    /// Results in the unrouted queue when reading started.
    pub kept_at_start: u64,
}

impl std::fmt::Display for ShowSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.taken > 0 {
            write!(f, "{} results shown and taken from {}", self.shown, self.from)
        } else if self.kept_at_start > 0 || self.from.ends_with(".unrouted") {
            write!(
                f,
                "{} results shown from {} ({} kept there; all left in place, --take removes what is shown)",
                self.shown, self.from, self.kept_at_start
            )
        } else {
            write!(f, "{} results shown from {}", self.shown, self.from)
        }
    }
}

/// Whether a routing key matches an AMQP topic pattern: words split by `.`, `*` one word, `#`
/// zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&word, rest)) => {
                k.split_first().is_some_and(|(&first, tail)| (word == "*" || word == first) && go(rest, tail))
            }
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() { Vec::new() } else { key.split('.').collect() };
    go(&p, &k)
}

/// Shows results from `options.source` through `emit` (which returns `false` to stop, when its
/// output is gone), until the unrouted queue's results at the start are all seen (unless
/// following), the limit or the timeout is reached, or `stop` is cancelled.
pub async fn show(
    config: &Config,
    options: &ShowOptions,
    stop: &CancellationToken,
    emit: &mut (dyn FnMut(&ReceivedResult) -> bool + Send),
) -> Result<ShowSummary, CtlError> {
    let connection = broker::connect(config, "results").await?;
    let result = match options.source {
        Source::Live => show_live(&connection, config, options, stop, emit).await,
        Source::Unrouted { take } => show_unrouted(&connection, config, options, take, stop, emit).await,
    };
    broker::close(&connection).await;
    result
}

/// When reading stops by itself, if ever.
fn deadline(options: &ShowOptions) -> Option<tokio::time::Instant> {
    options.timeout.map(|t| tokio::time::Instant::now() + t)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn show_live(
    connection: &Connection,
    config: &Config,
    options: &ShowOptions,
    stop: &CancellationToken,
    emit: &mut (dyn FnMut(&ReceivedResult) -> bool + Send),
) -> Result<ShowSummary, CtlError> {
    if !broker::exchange_exists(connection, &config.results_exchange).await? {
        return Err(CtlError::NoResultsExchange { exchange: config.results_exchange.clone() });
    }
    let mut watcher = ResultWatcher::bind(connection, config, &options.pattern).await?;
    let mut summary = ShowSummary { from: config.results_exchange.clone(), ..ShowSummary::default() };
    let end = deadline(options);
    let outcome = loop {
        if options.limit.is_some_and(|l| summary.shown >= l) {
            break Ok(());
        }
        let next = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = sleep_until(end) => break Ok(()),
            next = watcher.next() => next,
        };
        match next {
            Some(Ok(result)) => {
                summary.shown += 1;
                if !emit(&result) {
                    break Ok(());
                }
            }
            Some(Err(e)) => break Err(e),
            None => break Err(CtlError::ResultsClosed),
        }
    };
    watcher.close().await;
    outcome.map(|()| summary)
}

/// How long reading the unrouted queue without following waits for the next message before it
/// takes the queue as read (another consumer may be taking some of them).
const QUIET: Duration = Duration::from_secs(2);

async fn show_unrouted(
    connection: &Connection,
    config: &Config,
    options: &ShowOptions,
    take: bool,
    stop: &CancellationToken,
    emit: &mut (dyn FnMut(&ReceivedResult) -> bool + Send),
) -> Result<ShowSummary, CtlError> {
    let queue = unrouted_queue(config);
    // Passive: the worker declares it with the arguments it chooses; any other declare here
    // could clash with them.
    let Some(info) = broker::queue_info(connection, &queue).await? else {
        return Err(CtlError::NoUnroutedQueue { queue });
    };
    let mut summary =
        ShowSummary { from: queue.clone(), kept_at_start: info.messages.into(), ..ShowSummary::default() };
    if info.messages == 0 && !options.follow {
        return Ok(summary);
    }
    let channel = call("open a channel", connection.create_channel()).await?;
    // Results not taken are held unacknowledged until the end (the queue is bounded, so are
    // they); results taken are acknowledged as they go, so a window of 100 suffices.
    let prefetch = if take { 100 } else { 0 };
    call("set the prefetch", channel.basic_qos(prefetch, BasicQosOptions::default())).await?;
    let mut consumer = call(
        &format!("read {queue:?}"),
        channel.basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let end = deadline(options);
    let mut received = 0u64;
    let outcome: Result<(), CtlError> = async {
        loop {
            if options.limit.is_some_and(|l| summary.shown >= l)
                || (!options.follow && received >= summary.kept_at_start)
            {
                return Ok(());
            }
            let quiet = (!options.follow).then(|| tokio::time::Instant::now() + QUIET);
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = sleep_until(end) => return Ok(()),
                _ = sleep_until(quiet) => return Ok(()),
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(CtlError::broker("receive results", e)),
                None => return Err(CtlError::ResultsClosed),
            };
            received += 1;
            let tag = delivery.delivery_tag;
            let result = ReceivedResult::from_delivery(delivery);
            if !topic_matches(&options.pattern, &result.routing_key) {
                continue;
            }
            summary.shown += 1;
            let more = emit(&result);
            if take {
                call("remove a shown result", channel.basic_ack(tag, BasicAckOptions::default())).await?;
                summary.taken += 1;
            }
            if !more {
                return Ok(());
            }
        }
    }
    .await;
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    // Everything delivered and not taken (read, skipped by the pattern, or still in flight to
    // us) goes back in its order: one nack of tag 0 with `multiple` covers every outstanding
    // delivery of the channel.
    let _ = call(
        "return the results to their queue",
        channel.basic_nack(0, BasicNackOptions { multiple: true, requeue: true }),
    )
    .await;
    let _ = channel.close(200, ShortString::from("done")).await;
    outcome.map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        for (pattern, key, matches) in [
            ("#", "send.succeeded", true),
            ("#", "", true),
            ("send.*", "send.succeeded", true),
            ("send.*", "send", false),
            ("send.*", "delivery.success", false),
            ("*.failed", "send.failed", true),
            ("delivery.#", "delivery", true),
            ("delivery.#", "delivery.failed.x", true),
            ("#.failed", "delivery.failed", true),
            ("#.failed", "send.succeeded", false),
            ("send.succeeded", "send.succeeded", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c", false),
        ] {
            assert_eq!(topic_matches(pattern, key), matches, "{pattern} vs {key}");
        }
    }

    #[test]
    fn the_job_id_comes_from_the_body_first_because_a_long_one_is_a_digest_in_the_correlation_id() {
        let r = |correlation: Option<&str>, body: &str| ReceivedResult {
            routing_key: "send.succeeded".into(),
            correlation_id: correlation.map(str::to_owned),
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(r(Some("sha1:abc"), r#"{"job_id":"long"}"#).job_id().as_deref(), Some("long"));
        assert_eq!(r(Some("c-1"), "not json").job_id().as_deref(), Some("c-1"));
        assert_eq!(r(None, r#"{"job_id":""}"#).job_id(), None);
        let line = r(None, "{\n\"a\": 1}").to_line();
        assert!(line.starts_with("send.succeeded") && line.ends_with("{ \"a\": 1}"), "{line}");
        assert_eq!(r(Some("c"), "x").to_json()["body"], "x");
        assert_eq!(r(Some("c"), r#"{"a":1}"#).to_json()["body"]["a"], 1);
    }
}
