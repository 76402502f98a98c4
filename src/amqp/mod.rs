//! RabbitMQ: connecting to one broker or a cluster's nodes ([`connect`]), confirmed publishing
//! and a publisher that reconnects by itself ([`publisher`]), and the queues and exchanges
//! wxpush declares ([`topology`]).
//!
//! Every publish here waits for the broker's confirm: a result or a dead-lettered job counts as
//! safe only once the broker has it, and only then is the job that caused it acknowledged.

use lapin::types::{AMQPValue, LongString};

use crate::config::QueueType;

pub mod connect;
pub mod headers;
pub mod publisher;
pub mod short;
pub mod topology;

pub use connect::{Nodes, connect, redact_url};
pub use publisher::{NotTaken, PublishError, Publisher, ReconnectingPublisher, json_properties, taken};
pub use short::{MAX_SHORT_BYTES, Short, TooLong};
pub use topology::{
    DEAD_LETTER_DELIVERY_LIMIT, Topology, UnroutedBounds, dead_letter_queue_args, declare_dead_letter_queue,
    declare_queue, declare_results_exchange, declare_unrouted_queue, unrouted_name, unrouted_queue_args,
};

/// A failure to reach or set up RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url} (is the broker up and WXPUSH_AMQP_URL right?)")]
    Connect { url: String, source: lapin::Error },
    #[error(
        "RabbitMQ at {url} did not complete the connection within {secs} s (is the broker up and WXPUSH_AMQP_URL right?)"
    )]
    ConnectTimeout { url: String, secs: u64 },
    #[error("RabbitMQ channel error")]
    Channel(#[source] lapin::Error),
    #[error(
        "queue {queue:?} already exists with other arguments than wxpush declares for it as a {wanted} queue \
         ({detail}). RabbitMQ cannot change them: either delete the queue once it is drained (`rabbitmqctl \
         delete_queue {queue}`) so that it is declared anew, or make the configuration match it (queue_type = \
         \"{other}\", WXPUSH_QUEUE_TYPE={other}, for a {other} queue; delivery_limit as the queue has it), or use \
         queues of another name (jobs_queue, dead_letter_queue)",
        other = wanted.other()
    )]
    QueueMismatch { queue: String, wanted: QueueType, detail: String },
    #[error(
        "exchange {exchange:?} already exists without the alternate exchange {unrouted:?} that keeps unrouted \
         results ({detail}). RabbitMQ cannot change an exchange's arguments: delete it once (`rabbitmqctl \
         delete_exchange {exchange}`; consumers' bindings to it go with it, so let them re-bind) and wxpush declares it \
         anew, or use another results_exchange"
    )]
    ExchangeMismatch { exchange: String, unrouted: String, detail: String },
    #[error(
        "cannot declare {what} (if it exists with other arguments, delete it or change its name in the configuration)"
    )]
    Declare { what: String, source: lapin::Error },
}

/// Header helper: a string value.
pub fn header_str(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
