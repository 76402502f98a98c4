//! Confirmed publishing: a confirm-mode channel ([`Publisher`]), one that reconnects by itself
//! ([`ReconnectingPublisher`]), and the one reading of the broker's confirms ([`taken`]).
//!
//! A result or a dead-lettered job counts as safe only once the broker has confirmed it, and
//! only then is the job that caused it acknowledged.

use std::sync::Arc;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use tokio::sync::Mutex;

use super::{AmqpError, Nodes, Short, TooLong, topology};
use crate::config::QueueType;

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// Why a publish was not confirmed. None of these may be taken as "published".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Unavailable(#[from] AmqpError),
    #[error("publish to RabbitMQ failed")]
    Broker(#[source] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ could not route the message to {exchange:?} with key {routing_key:?}: no such queue")]
    Returned { exchange: String, routing_key: String },
    #[error(transparent)]
    TooLong(#[from] TooLong),
}

/// Why the broker did not take a message published on a confirm-mode channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTaken {
    /// A mandatory message no queue would take, returned.
    Unroutable,
    /// The broker refused it (nack): it may be out of disk or memory.
    Nacked,
    /// No confirm at all: the channel was not in confirm mode.
    Unconfirmed,
}

/// Reads the broker's confirm of one publish; only `Ok` means the broker has the message.
/// Every publisher (the worker, the webhook, `wxpush-ctl`) reads confirms through here.
pub fn taken(confirmation: Confirmation) -> Result<(), NotTaken> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(NotTaken::Unroutable),
        Confirmation::Nack(_) => Err(NotTaken::Nacked),
        Confirmation::NotRequested => Err(NotTaken::Unconfirmed),
    }
}

/// `application/json`, persistent, with a correlation id where a job_id is known: the job_id
/// itself, or its digest when it is longer than a short string ([`Short::or_digest`]).
pub fn json_properties(job_id: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(PERSISTENT);
    match job_id {
        Some(id) => props.with_correlation_id(Short::or_digest(id).into()),
        None => props,
    }
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
        let exchange_name = Short::new("the exchange name", exchange)?;
        let key = Short::new("the routing key", routing_key)?;
        let confirm = self
            .channel
            .basic_publish(exchange_name.into(), key.into(), options, body, properties)
            .await
            .map_err(PublishError::Broker)?;
        taken(confirm.await.map_err(PublishError::Broker)?).map_err(|not| match not {
            NotTaken::Unroutable => {
                PublishError::Returned { exchange: exchange.into(), routing_key: routing_key.into() }
            }
            // Unconfirmed cannot happen on a channel in confirm mode; never count it as published.
            NotTaken::Nacked | NotTaken::Unconfirmed => PublishError::Nacked,
        })
    }
}

/// A connection and its publisher.
struct Link {
    connection: Connection,
    publisher: Publisher,
}

impl Link {
    fn is_up(&self) -> bool {
        self.connection.status().connected() && self.publisher.is_usable()
    }
}

/// A publisher that connects on first use and again after any failure: for programs (the
/// webhook, tools) that publish but do not consume.
pub struct ReconnectingPublisher {
    nodes: Nodes,
    name: String,
    link: Mutex<Option<Link>>,
}

impl ReconnectingPublisher {
    /// `urls`: one URL, or the nodes of a cluster separated by commas (see [`Nodes`]).
    pub fn new(urls: &str, connection_name: &str) -> Arc<ReconnectingPublisher> {
        Arc::new(ReconnectingPublisher {
            nodes: Nodes::new(urls),
            name: connection_name.to_owned(),
            link: Mutex::new(None),
        })
    }

    /// Whether the current connection is up. Opens none: a probe that wants the broker
    /// reachable calls [`connect`](Self::connect).
    pub async fn is_connected(&self) -> bool {
        self.link.lock().await.as_ref().is_some_and(Link::is_up)
    }

    /// Connects now unless connected: for readiness, and for a program that wants to know at
    /// start-up. Publishing connects by itself.
    pub async fn connect(&self) -> Result<(), AmqpError> {
        self.publisher().await.map(drop)
    }

    /// The current publisher, connecting when there is none or the old one broke.
    pub async fn publisher(&self) -> Result<Publisher, AmqpError> {
        let mut link = self.link.lock().await;
        Ok(self.linked(&mut link).await?.publisher.clone())
    }

    /// The link in `slot`, (re)connecting when there is none or it broke.
    async fn linked<'a>(&self, slot: &'a mut Option<Link>) -> Result<&'a Link, AmqpError> {
        let link = match slot.take() {
            Some(link) if link.is_up() => link,
            old => {
                if let Some(old) = old
                    && old.connection.status().connected()
                {
                    // Only the channel broke (a failed declare closes it): free the old connection.
                    let _ = old.connection.close(200, ShortString::from("replaced")).await;
                }
                let connection = self.nodes.connect(&self.name).await?;
                let publisher = Publisher::open(&connection).await?;
                Link { connection, publisher }
            }
        };
        Ok(slot.insert(link))
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

    /// Declares the results exchange with its alternate exchange
    /// ([`topology::declare_results_exchange`]) on the publisher's channel. A failed declare
    /// closes that channel; the next call finds it unusable and opens another.
    pub async fn declare_results_exchange(&self, name: &str) -> Result<(), AmqpError> {
        topology::declare_results_exchange(self.publisher().await?.channel(), name).await
    }

    /// Declares the dead-letter queue ([`topology::declare_dead_letter_queue`]) on the
    /// connection, connecting first when needed.
    pub async fn declare_dead_letter_queue(&self, name: &str, queue_type: QueueType) -> Result<(), AmqpError> {
        let mut link = self.link.lock().await;
        let link = self.linked(&mut link).await?;
        topology::declare_dead_letter_queue(&link.connection, name, queue_type).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Every job the parser accepts can have its result published: the properties of each
        /// result it can lead to encode as an AMQP frame (lapin's encoder asserts short strings).
        #[test]
        fn every_accepted_job_can_have_its_result_published(
            job_id in "\\PC{1,128}",
            as_message_id in proptest::bool::ANY,
        ) {
            use crate::domain::{job::Job, result::SendResult};
            let body = if as_message_id {
                serde_json::json!({"touser": "o1", "template_id": "t", "data": {"k": {"value": "v"}}})
            } else {
                serde_json::json!({"job_id": job_id, "touser": "o1", "template_id": "t", "data": {"k": {"value": "v"}}})
            };
            let message_id = as_message_id.then_some(job_id.as_str());
            let Ok(job) = Job::parse(body.to_string().as_bytes(), message_id) else {
                // Only ids the contract refuses (a message_id over a short string) get here.
                proptest::prop_assert!(as_message_id);
                return Ok(());
            };
            let results = [
                SendResult::succeeded(&job, 1, "ok".into(), 1),
                SendResult::failed(&job, Some(43004), Some("require subscribe".into()), "x".into(), 1),
                SendResult::deferred(&job, "quota".into(), 0),
                SendResult::invalid(job.job_id.clone(), None, "invalid job: x".into()),
            ];
            for result in results {
                let props = json_properties(result.job_id.as_deref());
                let encoded = cookie_factory::r#gen(lapin::protocol::basic::gen_properties(&props), Vec::new());
                proptest::prop_assert!(encoded.is_ok());
                proptest::prop_assert!(Short::new("routing key", result.routing_key()).is_ok());
                proptest::prop_assert!(!result.to_json().is_empty());
            }
        }
    }
}
