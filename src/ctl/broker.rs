//! RabbitMQ helpers shared by the commands: bounded connects and calls, queue lengths,
//! making sure a queue or exchange exists without clashing with how an operator declared it,
//! and reading the headers of parked jobs.

use std::{future::Future, time::Duration};

use lapin::{
    BasicProperties, Channel, Connection, ErrorKind, ExchangeKind,
    message::Delivery,
    options::{BasicGetOptions, BasicNackOptions, ExchangeDeclareOptions, QueueDeclareOptions},
    types::{AMQPValue, DeliveryTag, FieldTable, ShortString},
};

use super::{CtlError, RPC_TIMEOUT};
use crate::{amqp, config::Config};

/// AMQP reply code of a passive declare of something that does not exist.
const NOT_FOUND: u16 = 404;

/// Runs one RabbitMQ call with [`RPC_TIMEOUT`], naming `action` in the error.
pub(crate) async fn call<T>(action: &str, fut: impl Future<Output = Result<T, lapin::Error>>) -> Result<T, CtlError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CtlError::broker(action, e)),
        Err(_) => Err(CtlError::BrokerTimeout { action: action.into(), secs: RPC_TIMEOUT.as_secs() }),
    }
}

/// Connects to the configured broker, named `wxpush-ctl <purpose>` in the management UI.
pub(crate) async fn connect(config: &Config, purpose: &str) -> Result<Connection, CtlError> {
    connect_url(&config.amqp_url, purpose).await
}

pub(crate) async fn connect_url(url: &str, purpose: &str) -> Result<Connection, CtlError> {
    let name = format!("wxpush-ctl {purpose} pid {}", std::process::id());
    match tokio::time::timeout(RPC_TIMEOUT, amqp::connect(url, &name)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(CtlError::BrokerTimeout {
            action: format!("connect to {}", amqp::redact_url(url)),
            secs: RPC_TIMEOUT.as_secs(),
        }),
    }
}

/// Closes the connection politely; unacknowledged deliveries go back to their queues.
pub(crate) async fn close(connection: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, ShortString::from("done"))).await;
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p) if p.get_id() == NOT_FOUND)
}

/// What a passive declare tells about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    /// Messages ready for delivery (unacknowledged ones are not counted).
    pub messages: u32,
    pub consumers: u32,
}

/// The queue's counts, or `None` when it does not exist. A failed passive declare closes its
/// channel, so each check gets its own.
pub async fn queue_info(connection: &Connection, queue: &str) -> Result<Option<QueueInfo>, CtlError> {
    let channel = call("open a channel", connection.create_channel()).await?;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = tokio::time::timeout(
        RPC_TIMEOUT,
        channel.queue_declare(ShortString::from(queue), options, FieldTable::default()),
    )
    .await;
    let info = match declared {
        Ok(Ok(q)) => Some(QueueInfo { messages: q.message_count(), consumers: q.consumer_count() }),
        Ok(Err(e)) if is_not_found(&e) => return Ok(None),
        Ok(Err(e)) => return Err(CtlError::broker(format!("look up queue {queue:?}"), e)),
        Err(_) => {
            return Err(CtlError::BrokerTimeout {
                action: format!("look up queue {queue:?}"),
                secs: RPC_TIMEOUT.as_secs(),
            });
        }
    };
    let _ = channel.close(200, ShortString::from("done")).await;
    Ok(info)
}

/// Whether an exchange exists (passive declare).
pub(crate) async fn exchange_exists(connection: &Connection, exchange: &str) -> Result<bool, CtlError> {
    let channel = call("open a channel", connection.create_channel()).await?;
    let options = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    let declared = tokio::time::timeout(
        RPC_TIMEOUT,
        channel.exchange_declare(ShortString::from(exchange), ExchangeKind::Topic, options, FieldTable::default()),
    )
    .await;
    match declared {
        Ok(Ok(())) => {
            let _ = channel.close(200, ShortString::from("done")).await;
            Ok(true)
        }
        Ok(Err(e)) if is_not_found(&e) => Ok(false),
        Ok(Err(e)) => Err(CtlError::broker(format!("look up exchange {exchange:?}"), e)),
        Err(_) => Err(CtlError::BrokerTimeout {
            action: format!("look up exchange {exchange:?}"),
            secs: RPC_TIMEOUT.as_secs(),
        }),
    }
}

/// Declares the jobs queue exactly as the worker does, unless it exists already: an operator
/// may have declared it with other arguments, and re-declaring it differently would fail.
/// Returns whether it had to be created.
pub(crate) async fn ensure_jobs_queue(connection: &Connection, config: &Config) -> Result<bool, CtlError> {
    if queue_info(connection, &config.jobs_queue).await?.is_some() {
        return Ok(false);
    }
    let topology = amqp::Topology::from_config(config);
    // The jobs queue of a quorum topology dead-letters to this one: have it in place.
    amqp::declare_dead_letter_queue(connection, &topology.dead_letter_queue, topology.queue_type).await?;
    let channel = call("open a channel", connection.create_channel()).await?;
    amqp::declare_queue(&channel, &config.jobs_queue, topology.jobs_queue_args()).await?;
    let _ = channel.close(200, ShortString::from("done")).await;
    Ok(true)
}

/// Whether an existing queue has the arguments wxpush declares: a declare with the same
/// arguments changes nothing, a different one fails with the broker's reason. `Ok(None)` when the
/// queue does not exist (nothing is created).
pub(crate) async fn queue_matches(
    connection: &Connection,
    queue: &str,
    args: FieldTable,
) -> Result<Option<Result<(), amqp::AmqpError>>, CtlError> {
    if queue_info(connection, queue).await?.is_none() {
        return Ok(None);
    }
    let channel = call("open a channel", connection.create_channel()).await?;
    let declared = match tokio::time::timeout(RPC_TIMEOUT, amqp::declare_queue(&channel, queue, args)).await {
        Ok(declared) => declared,
        Err(_) => {
            return Err(CtlError::BrokerTimeout {
                action: format!("declare queue {queue:?}"),
                secs: RPC_TIMEOUT.as_secs(),
            });
        }
    };
    if declared.is_ok() {
        let _ = channel.close(200, ShortString::from("done")).await;
    }
    Ok(Some(declared))
}

/// Declares the results exchange as the worker does, unless it exists already.
pub(crate) async fn ensure_results_exchange(connection: &Connection, config: &Config) -> Result<(), CtlError> {
    if exchange_exists(connection, &config.results_exchange).await? {
        return Ok(());
    }
    let channel = call("open a channel", connection.create_channel()).await?;
    amqp::declare_results_exchange(&channel, &config.results_exchange).await?;
    let _ = channel.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Takes the message at the head of `queue` (unacknowledged), `None` when the queue is empty.
pub(crate) async fn get(channel: &Channel, queue: &str) -> Result<Option<Delivery>, CtlError> {
    let got = call(
        &format!("read from {queue:?}"),
        channel.basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false }),
    )
    .await?;
    Ok(got.map(|m| m.delivery))
}

/// Returns every message still unacknowledged on `channel` (up to `last`) to its queue, in one
/// nack so they go back in their order.
pub(crate) async fn requeue_all(channel: &Channel, last: Option<DeliveryTag>) -> Result<(), CtlError> {
    if let Some(tag) = last {
        call(
            "return the messages to their queue",
            channel.basic_nack(tag, BasicNackOptions { multiple: true, requeue: true }),
        )
        .await?;
    }
    Ok(())
}

/// The job_id of a message: its `message_id` property, else the body's `job_id` when the body
/// is a JSON object that has one.
pub fn job_id_of(props: &BasicProperties, body: &[u8]) -> Option<String> {
    if let Some(id) = props.message_id().as_ref().filter(|id| !id.as_str().is_empty()) {
        return Some(id.as_str().to_owned());
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("job_id")?.as_str().filter(|id| !id.is_empty()).map(str::to_owned)
}

/// At most `max` characters of the body on one line, control characters shown as spaces.
pub(crate) fn preview(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut chars = text.chars().map(|c| if c.is_control() { ' ' } else { c });
    for c in chars.by_ref().take(max) {
        out.push(c);
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// The message's properties with the dead-letter bookkeeping removed, so that a replayed job
/// starts afresh (attempts from zero) and carries no stale reason.
pub(crate) fn fresh_properties(props: &BasicProperties) -> BasicProperties {
    use crate::amqp::headers::{self, broker};
    const DROPPED: &[&str] = &[
        headers::REASON,
        headers::SOURCE_QUEUE,
        headers::ATTEMPTS,
        headers::DEAD_LETTERED_AT,
        // RabbitMQ's own dead-lettering history, for DLQs fed by a broker policy.
        broker::DEATH,
        broker::FIRST_DEATH_EXCHANGE,
        broker::FIRST_DEATH_QUEUE,
        broker::FIRST_DEATH_REASON,
        broker::LAST_DEATH_EXCHANGE,
        broker::LAST_DEATH_QUEUE,
        broker::LAST_DEATH_REASON,
    ];
    let mut out = BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(headers) = props.headers() {
        let kept: std::collections::BTreeMap<ShortString, AMQPValue> = headers
            .inner()
            .iter()
            .filter(|(k, _)| !DROPPED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !kept.is_empty() {
            out = out.with_headers(FieldTable::from(kept));
        }
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::header_str;

    #[test]
    fn the_job_id_comes_from_the_message_id_then_the_body() {
        let props = BasicProperties::default().with_message_id(ShortString::from("m-1"));
        assert_eq!(job_id_of(&props, br#"{"job_id":"b-1"}"#).as_deref(), Some("m-1"));
        assert_eq!(job_id_of(&BasicProperties::default(), br#"{"job_id":"b-1"}"#).as_deref(), Some("b-1"));
        assert_eq!(job_id_of(&BasicProperties::default(), b"not json"), None);
        assert_eq!(job_id_of(&BasicProperties::default(), br#"{"job_id":7}"#), None);
    }

    #[test]
    fn previews_are_one_short_line() {
        assert_eq!(preview(b"{\n\"a\": 1}", 40), "{ \"a\": 1}");
        assert_eq!(preview("黄先生黄先生".as_bytes(), 3), "黄先生…");
        assert_eq!(preview(&[0xff, b'a'], 10), "\u{fffd}a");
    }

    #[test]
    fn fresh_properties_drop_only_the_bookkeeping() {
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from(crate::amqp::headers::REASON), header_str("expired"));
        headers.insert(ShortString::from(crate::amqp::headers::ATTEMPTS), AMQPValue::LongUInt(3));
        headers.insert(ShortString::from("x-tenant"), header_str("shop"));
        let props = BasicProperties::default()
            .with_message_id(ShortString::from("job-1"))
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_headers(headers);
        let fresh = fresh_properties(&props);
        assert_eq!(fresh.message_id().as_ref().map(|m| m.as_str()), Some("job-1"));
        assert_eq!(fresh.content_type().as_ref().map(|m| m.as_str()), Some("application/json"));
        assert_eq!(*fresh.delivery_mode(), Some(2));
        assert_eq!(crate::amqp::headers::text_of(&fresh, "x-tenant").as_deref(), Some("shop"));
        assert_eq!(crate::amqp::headers::text_of(&fresh, crate::amqp::headers::REASON), None);
        assert_eq!(crate::amqp::headers::text_of(&fresh, crate::amqp::headers::ATTEMPTS), None);

        let only_ours = BasicProperties::default().with_headers({
            let mut h = FieldTable::default();
            h.insert(ShortString::from(crate::amqp::headers::SOURCE_QUEUE), header_str("q"));
            h
        });
        assert_eq!(*fresh_properties(&only_ours).headers(), None);
    }
}
