//! RabbitMQ: the topology wxpush declares, confirmed publishing, and a publisher that
//! reconnects by itself.
//!
//! Every publish here waits for the broker's confirm: a result or a dead-lettered job counts as
//! safe only once the broker has it, and only then is the job that caused it acknowledged.

use std::sync::Arc;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::Mutex;

use crate::config::Config;

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// A failure to reach or set up RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url}: {source} (is the broker up and WXPUSH_AMQP_URL right?)")]
    Connect { url: String, source: lapin::Error },
    #[error("RabbitMQ channel error: {0}")]
    Channel(#[source] lapin::Error),
    #[error(
        "cannot declare {what}: {source} (if it exists with other arguments, delete it or change its name in the configuration)"
    )]
    Declare { what: String, source: lapin::Error },
}

/// Why a publish was not confirmed. None of these may be taken as "published".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(#[from] AmqpError),
    #[error("publish to RabbitMQ failed: {0}")]
    Broker(#[source] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ could not route the message to {exchange:?} with key {routing_key:?}: no such queue")]
    Returned { exchange: String, routing_key: String },
}

/// The URL with its password hidden, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparseable AMQP URL)".into(),
    }
}

/// Opens a connection, naming it so operators can tell the pool's connections apart.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect(url, props).await.map_err(|source| AmqpError::Connect { url: redact_url(url), source })
}

/// `application/json`, persistent, with a correlation id where one is known.
pub fn json_properties(correlation_id: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(PERSISTENT);
    match correlation_id {
        Some(id) => props.with_correlation_id(ShortString::from(id)),
        None => props,
    }
}

/// Header helper: a string value.
pub fn header_str(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The queues and exchanges the worker owns.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs_queue: String,
    pub results_exchange: String,
    pub dead_letter_queue: String,
    pub delay_tiers_secs: Vec<u64>,
}

impl Topology {
    pub fn from_config(config: &Config) -> Self {
        Self {
            jobs_queue: config.jobs_queue.clone(),
            results_exchange: config.results_exchange.clone(),
            dead_letter_queue: config.dead_letter_queue.clone(),
            delay_tiers_secs: config.retry.delay_tiers_secs.clone(),
        }
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
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        declare_queue(channel, &self.jobs_queue, FieldTable::default()).await?;
        declare_queue(channel, &self.dead_letter_queue, FieldTable::default()).await?;
        declare_exchange(channel, &self.results_exchange).await?;
        for &secs in &self.delay_tiers_secs {
            let mut args = FieldTable::default();
            args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt((secs * 1000) as i64));
            args.insert(ShortString::from("x-dead-letter-exchange"), header_str(""));
            args.insert(ShortString::from("x-dead-letter-routing-key"), header_str(&self.jobs_queue));
            declare_queue(channel, &self.delay_queue(secs), args).await?;
        }
        Ok(())
    }
}

/// Declares a durable queue.
pub async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel
        .queue_declare(ShortString::from(name), options, args)
        .await
        .map(drop)
        .map_err(|source| AmqpError::Declare { what: format!("queue {name:?}"), source })
}

/// Declares a durable topic exchange.
pub async fn declare_exchange(channel: &Channel, name: &str) -> Result<(), AmqpError> {
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(ShortString::from(name), ExchangeKind::Topic, options, FieldTable::default())
        .await
        .map_err(|source| AmqpError::Declare { what: format!("topic exchange {name:?}"), source })
}

/// A confirm-mode channel. Many tasks may publish through it at once; each waits for its own
/// confirm.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Publisher, AmqpError> {
        let channel = connection.create_channel().await.map_err(AmqpError::Channel)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(AmqpError::Channel)?;
        Ok(Publisher { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes and waits for the broker's confirm. With `mandatory`, a message no queue
    /// would take is an error rather than silently dropped (used for queues we address).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
        let confirm = self
            .channel
            .basic_publish(ShortString::from(exchange), ShortString::from(routing_key), options, body, properties)
            .await
            .map_err(PublishError::Broker)?;
        match confirm.await.map_err(PublishError::Broker)? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(PublishError::Returned { exchange: exchange.into(), routing_key: routing_key.into() })
            }
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            // Cannot happen on a channel in confirm mode; refuse to count it as published.
            Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }
}

/// A publisher that connects on first use and again after any failure: for programs (the
/// webhook, tools) that publish but do not consume.
pub struct Broker {
    url: String,
    name: String,
    link: Mutex<Option<(Connection, Publisher)>>,
}

impl Broker {
    pub fn new(url: &str, connection_name: &str) -> Arc<Broker> {
        Arc::new(Broker { url: url.to_owned(), name: connection_name.to_owned(), link: Mutex::new(None) })
    }

    /// The current publisher, connecting when there is none or the old one broke.
    pub async fn publisher(&self) -> Result<Publisher, AmqpError> {
        let mut link = self.link.lock().await;
        if let Some((conn, publisher)) = link.as_ref()
            && conn.status().connected()
            && publisher.is_usable()
        {
            return Ok(publisher.clone());
        }
        *link = None;
        let conn = connect(&self.url, &self.name).await?;
        let publisher = Publisher::open(&conn).await?;
        *link = Some((conn, publisher.clone()));
        Ok(publisher)
    }

    /// Whether a connection is currently up (for readiness).
    pub async fn is_connected(&self) -> bool {
        self.publisher().await.is_ok()
    }

    /// Runs `f` on a fresh channel of the broker's connection (for declarations).
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let publisher = self.publisher().await?;
        Ok(publisher.channel().clone())
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let publisher = self.publisher().await?;
        let result = publisher.publish(exchange, routing_key, body, properties, mandatory).await;
        if let Err(PublishError::Broker(_)) = &result {
            // The channel or connection is gone: the next call reconnects.
            self.link.lock().await.take();
        }
        result
    }

    pub async fn declare_results_exchange(&self, name: &str) -> Result<(), AmqpError> {
        declare_exchange(&self.channel().await?, name).await
    }

    pub async fn declare_queue(&self, name: &str) -> Result<(), AmqpError> {
        declare_queue(&self.channel().await?, name, FieldTable::default()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn the_tier_is_the_longest_that_does_not_overshoot() {
        let t = Topology {
            jobs_queue: "j".into(),
            results_exchange: "r".into(),
            dead_letter_queue: "d".into(),
            delay_tiers_secs: vec![1, 5, 30],
        };
        assert_eq!(t.tier_for(Duration::from_millis(300)), 1);
        assert_eq!(t.tier_for(Duration::from_secs(7)), 5);
        assert_eq!(t.tier_for(Duration::from_secs(3600)), 30);
        assert_eq!(t.delay_queue(5), "j.delay.5s");
    }
}
