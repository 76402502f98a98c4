//! The queues and exchanges wxpush declares, with their arguments: the jobs queue, its delay
//! queues and dead-letter queue, the results exchange with its alternate exchange and the
//! unrouted-results queue. Every program that declares one goes through here, so the arguments
//! agree.

use lapin::{
    Channel, Connection, ErrorKind, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use super::{AmqpError, header_str};
use crate::config::{Config, QueueType};

/// AMQP reply code of a declare that does not match the existing queue.
const PRECONDITION_FAILED: u16 = 406;

/// The alternate exchange of `results_exchange`, and the queue of the same name bound to it:
/// where results go that no consumer's binding takes.
pub fn unrouted_name(results_exchange: &str) -> String {
    format!("{results_exchange}.unrouted")
}

/// Bounds of the unrouted-results queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnroutedBounds {
    pub max_length: u64,
    pub message_ttl: std::time::Duration,
}

/// The queues and exchanges the worker owns.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs_queue: String,
    pub results_exchange: String,
    pub dead_letter_queue: String,
    pub delay_tiers_secs: Vec<u64>,
    pub queue_type: QueueType,
    /// Quorum only: deliveries of a job before the broker dead-letters it.
    pub delivery_limit: u32,
    pub unrouted: UnroutedBounds,
}

impl Topology {
    pub fn from_config(config: &Config) -> Self {
        Self {
            jobs_queue: config.jobs_queue.clone(),
            results_exchange: config.results_exchange.clone(),
            dead_letter_queue: config.dead_letter_queue.clone(),
            delay_tiers_secs: config.retry.delay_tiers_secs.clone(),
            queue_type: config.queue_type,
            delivery_limit: config.delivery_limit,
            unrouted: UnroutedBounds { max_length: config.unrouted_max_length, message_ttl: config.unrouted_ttl },
        }
    }

    /// The queue keeping results no binding took, bounded: the oldest go first when it is full,
    /// and each leaves after its TTL.
    pub fn unrouted_queue_args(&self) -> FieldTable {
        unrouted_queue_args(self.queue_type, self.unrouted)
    }

    /// The jobs queue's arguments. A quorum jobs queue counts deliveries and, past the limit,
    /// dead-letters the job to the dead-letter queue (at least once: the broker keeps it until
    /// the dead-letter queue has confirmed it, where the broker supports that).
    pub fn jobs_queue_args(&self) -> FieldTable {
        let mut args = queue_type_args(self.queue_type);
        if self.queue_type == QueueType::Quorum {
            args.insert(ShortString::from("x-delivery-limit"), AMQPValue::LongLongInt(self.delivery_limit.into()));
            dead_letter_to(&mut args, &self.dead_letter_queue, self.queue_type);
        }
        args
    }

    /// The dead-letter queue's arguments.
    pub fn dead_letter_queue_args(&self) -> FieldTable {
        dead_letter_queue_args(self.queue_type)
    }

    /// A delay queue's arguments: its TTL, after which the broker moves the job back to the
    /// jobs queue (per-queue TTL works on quorum queues from RabbitMQ 3.10).
    pub fn delay_queue_args(&self, secs: u64) -> FieldTable {
        let mut args = queue_type_args(self.queue_type);
        args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt((secs * 1000) as i64));
        dead_letter_to(&mut args, &self.jobs_queue, self.queue_type);
        args
    }

    /// Every queue wxpush declares, with its arguments.
    pub fn queues(&self) -> Vec<(String, FieldTable)> {
        let mut queues = vec![
            (self.jobs_queue.clone(), self.jobs_queue_args()),
            (self.dead_letter_queue.clone(), self.dead_letter_queue_args()),
        ];
        for &secs in &self.delay_tiers_secs {
            queues.push((self.delay_queue(secs), self.delay_queue_args(secs)));
        }
        queues.push((unrouted_name(&self.results_exchange), self.unrouted_queue_args()));
        queues
    }

    /// The delay queue for one tier: messages sit there `secs` seconds, then the broker
    /// dead-letters them back into the jobs queue.
    pub fn delay_queue(&self, secs: u64) -> String {
        format!("{}.delay.{secs}s", self.jobs_queue)
    }

    /// The longest tier not longer than `wanted` (the shortest tier if all are longer).
    pub fn tier_for(&self, wanted: std::time::Duration) -> u64 {
        let wanted = wanted.as_secs_f64();
        let mut chosen = self.delay_tiers_secs[0];
        for &t in &self.delay_tiers_secs {
            if (t as f64) <= wanted {
                chosen = t;
            }
        }
        chosen
    }

    /// Declares everything, idempotently. Safe to call on every (re)connect.
    /// Declarations run on channels of their own, closed afterwards.
    pub async fn declare(&self, connection: &Connection) -> Result<(), AmqpError> {
        // The dead-letter queue first: the jobs queue names it as its dead-letter target.
        declare_dead_letter_queue(connection, &self.dead_letter_queue, self.queue_type).await?;
        let channel = &connection.create_channel().await.map_err(AmqpError::Channel)?;
        declare_queue(channel, &self.jobs_queue, self.jobs_queue_args()).await?;
        declare_results_exchange(channel, &self.results_exchange).await?;
        declare_unrouted_queue(channel, &self.results_exchange, self.unrouted_queue_args()).await?;
        for &secs in &self.delay_tiers_secs {
            declare_queue(channel, &self.delay_queue(secs), self.delay_queue_args(secs)).await?;
        }
        let _ = channel.close(200, ShortString::from("declared")).await;
        Ok(())
    }
}

/// The arguments of the unrouted-results queue.
pub fn unrouted_queue_args(queue_type: QueueType, bounds: UnroutedBounds) -> FieldTable {
    let mut args = browsable_queue_args(queue_type);
    args.insert(
        ShortString::from("x-max-length"),
        AMQPValue::LongLongInt(bounds.max_length.min(i64::MAX as u64) as i64),
    );
    let ttl_ms = bounds.message_ttl.as_millis().min(i64::MAX as u128) as i64;
    args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt(ttl_ms));
    args
}

/// Declares the unrouted-results queue and binds it to the alternate exchange.
pub async fn declare_unrouted_queue(
    channel: &Channel,
    results_exchange: &str,
    args: FieldTable,
) -> Result<(), AmqpError> {
    let unrouted = unrouted_name(results_exchange);
    declare_queue(channel, &unrouted, args).await?;
    channel
        .queue_bind(
            ShortString::from(unrouted.as_str()),
            ShortString::from(unrouted.as_str()),
            ShortString::from(""),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare { what: format!("binding of queue {unrouted:?}"), source })
}

/// The delivery limit of queues people read by taking and returning (dead-letter, unrouted):
/// too high to reach. Each read counts as a delivery on a quorum queue, and RabbitMQ 4.x would
/// otherwise drop a message after 20 of them. (3.x has no default limit and refuses -1, 4.x's
/// "unlimited"; this value means the same on both.)
pub const DEAD_LETTER_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// The arguments of a queue of `queue_type` that is read by taking and returning.
fn browsable_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = queue_type_args(queue_type);
    if queue_type == QueueType::Quorum {
        args.insert(ShortString::from("x-delivery-limit"), AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT));
    }
    args
}

/// The arguments of a dead-letter queue of `queue_type`.
pub fn dead_letter_queue_args(queue_type: QueueType) -> FieldTable {
    browsable_queue_args(queue_type)
}

/// Declares the dead-letter queue on a channel of its own. One declared by an older wxpush,
/// without the delivery limit, is taken as it is, with a warning: it holds parked jobs, so asking
/// to delete it is no answer.
pub async fn declare_dead_letter_queue(
    connection: &Connection,
    name: &str,
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    let channel = connection.create_channel().await.map_err(AmqpError::Channel)?;
    match declare_queue(&channel, name, dead_letter_queue_args(queue_type)).await {
        Ok(()) => {
            let _ = channel.close(200, ShortString::from("declared")).await;
            Ok(())
        }
        Err(AmqpError::QueueMismatch { detail, .. }) if detail.contains("x-delivery-limit") => {
            // The failed declare closed that channel.
            let channel = connection.create_channel().await.map_err(AmqpError::Channel)?;
            let passive = QueueDeclareOptions { passive: true, durable: true, ..QueueDeclareOptions::default() };
            channel
                .queue_declare(ShortString::from(name), passive, FieldTable::default())
                .await
                .map_err(|source| AmqpError::Declare { what: format!("queue {name:?}"), source })?;
            let _ = channel.close(200, ShortString::from("declared")).await;
            tracing::warn!(
                queue = name,
                "the dead-letter queue was declared without an explicit delivery limit (by an older wxpush): on \
                 RabbitMQ 4.x each listing of it counts as a delivery and a message is dropped after 20; give it \
                 one with a policy: rabbitmqctl set_policy wxpush-dead '^{name}$' '{{\"delivery-limit\":-1}}' \
                 --apply-to quorum_queues"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn queue_type_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), header_str(queue_type.as_str()));
    args
}

/// Dead-letters through the default exchange to `queue`. On quorum queues, at least once:
/// RabbitMQ then keeps a dead-lettered message until the target queue has it (it needs
/// `x-overflow: reject-publish` for that, and the `stream_queue` feature flag, on from 3.9).
fn dead_letter_to(args: &mut FieldTable, queue: &str, queue_type: QueueType) {
    args.insert(ShortString::from("x-dead-letter-exchange"), header_str(""));
    args.insert(ShortString::from("x-dead-letter-routing-key"), header_str(queue));
    if queue_type == QueueType::Quorum {
        args.insert(ShortString::from("x-dead-letter-strategy"), header_str("at-least-once"));
        args.insert(ShortString::from("x-overflow"), header_str("reject-publish"));
    }
}

/// Declares a durable queue. A queue that exists with other arguments is a
/// [`AmqpError::QueueMismatch`], which says what to do about it.
pub async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let wanted = match args.inner().get("x-queue-type") {
        Some(AMQPValue::LongString(t)) if t.as_bytes() == b"classic" => QueueType::Classic,
        _ => QueueType::Quorum,
    };
    channel.queue_declare(ShortString::from(name), options, args).await.map(drop).map_err(|source| {
        match precondition_failed(&source) {
            Some(detail) => AmqpError::QueueMismatch { queue: name.to_owned(), wanted, detail },
            None => AmqpError::Declare { what: format!("queue {name:?}"), source },
        }
    })
}

/// The broker's explanation, when `e` is a 406 PRECONDITION_FAILED.
fn precondition_failed(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        ErrorKind::ProtocolError(p) if p.get_id() == PRECONDITION_FAILED => Some(p.get_message().to_string()),
        _ => None,
    }
}

/// Declares the results exchange: a durable topic exchange whose alternate exchange (a fanout,
/// [`unrouted_name`]) takes every result no binding matches, so none is dropped silently.
/// Every program that declares the results exchange goes through here, so the arguments agree.
pub async fn declare_results_exchange(channel: &Channel, name: &str) -> Result<(), AmqpError> {
    let unrouted = unrouted_name(name);
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(ShortString::from(unrouted.as_str()), ExchangeKind::Fanout, options, FieldTable::default())
        .await
        .map_err(|source| AmqpError::Declare { what: format!("fanout exchange {unrouted:?}"), source })?;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("alternate-exchange"), header_str(&unrouted));
    channel.exchange_declare(ShortString::from(name), ExchangeKind::Topic, options, args).await.map_err(|source| {
        match precondition_failed(&source) {
            Some(detail) => AmqpError::ExchangeMismatch { exchange: name.to_owned(), unrouted, detail },
            None => AmqpError::Declare { what: format!("topic exchange {name:?}"), source },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(args: &FieldTable, key: &str) -> Option<String> {
        match args.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn quorum_queues_count_deliveries_and_dead_letter_at_least_once() {
        let mut config = Config { jobs_queue: "j".into(), dead_letter_queue: "d".into(), ..Config::default() };
        config.retry.delay_tiers_secs = vec![1, 5];
        let t = Topology::from_config(&config);
        let jobs = t.jobs_queue_args();
        assert_eq!(text(&jobs, "x-queue-type").as_deref(), Some("quorum"));
        assert_eq!(text(&jobs, "x-delivery-limit").as_deref(), Some("10"));
        assert_eq!(text(&jobs, "x-dead-letter-exchange").as_deref(), Some(""));
        assert_eq!(text(&jobs, "x-dead-letter-routing-key").as_deref(), Some("d"));
        assert_eq!(text(&jobs, "x-dead-letter-strategy").as_deref(), Some("at-least-once"));
        assert_eq!(text(&jobs, "x-overflow").as_deref(), Some("reject-publish"));
        let delay = t.delay_queue_args(5);
        assert_eq!(text(&delay, "x-message-ttl").as_deref(), Some("5000"));
        assert_eq!(text(&delay, "x-dead-letter-routing-key").as_deref(), Some("j"));
        assert_eq!(text(&delay, "x-queue-type").as_deref(), Some("quorum"));
        assert_eq!(text(&t.dead_letter_queue_args(), "x-queue-type").as_deref(), Some("quorum"));
        // Listing the dead-letter queue counts deliveries: its limit must never be reached.
        assert_eq!(text(&t.dead_letter_queue_args(), "x-delivery-limit").as_deref(), Some("2147483647"));
        let names: Vec<String> = t.queues().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["j", "d", "j.delay.1s", "j.delay.5s", "wxpush.results.unrouted"]);
        let unrouted = t.unrouted_queue_args();
        assert_eq!(text(&unrouted, "x-max-length").as_deref(), Some("100000"));
        assert_eq!(text(&unrouted, "x-message-ttl").as_deref(), Some("604800000"));

        config.queue_type = QueueType::Classic;
        let t = Topology::from_config(&config);
        let jobs = t.jobs_queue_args();
        assert_eq!(text(&jobs, "x-queue-type").as_deref(), Some("classic"));
        assert_eq!(text(&jobs, "x-delivery-limit"), None, "classic queues have no delivery limit");
        assert_eq!(text(&jobs, "x-dead-letter-exchange"), None);
        let delay = t.delay_queue_args(1);
        assert_eq!(text(&delay, "x-dead-letter-routing-key").as_deref(), Some("j"));
        assert_eq!(text(&delay, "x-dead-letter-strategy"), None, "at-least-once is for quorum queues only");
    }

    #[test]
    fn a_mismatch_says_what_to_do() {
        let e = AmqpError::QueueMismatch {
            queue: "wxpush.jobs".into(),
            wanted: QueueType::Quorum,
            detail: "inequivalent arg 'x-queue-type'".into(),
        }
        .to_string();
        assert!(e.contains("\"wxpush.jobs\"") && e.contains("inequivalent arg 'x-queue-type'"), "{e}");
        assert!(e.contains("rabbitmqctl delete_queue wxpush.jobs"), "{e}");
        assert!(e.contains("WXPUSH_QUEUE_TYPE=classic"), "{e}");
    }

    #[test]
    fn the_tier_is_the_longest_that_does_not_overshoot() {
        let t = Topology {
            jobs_queue: "j".into(),
            results_exchange: "r".into(),
            dead_letter_queue: "d".into(),
            delay_tiers_secs: vec![1, 5, 30],
            queue_type: QueueType::Quorum,
            delivery_limit: 10,
            unrouted: UnroutedBounds { max_length: 10, message_ttl: Duration::from_secs(60) },
        };
        assert_eq!(t.tier_for(Duration::from_millis(300)), 1);
        assert_eq!(t.tier_for(Duration::from_secs(7)), 5);
        assert_eq!(t.tier_for(Duration::from_secs(3600)), 30);
        assert_eq!(t.delay_queue(5), "j.delay.5s");
    }
}
