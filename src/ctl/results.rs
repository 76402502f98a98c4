//! Watching the results exchange: a private queue (exclusive, auto-delete, so it disappears
//! with the tool) bound to it, declared before any job is published so no result can slip by.

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, Consumer,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
};
use serde_json::Value;

use super::{
    CtlError,
    broker::{self, call},
};
use crate::config::Config;

/// One message from the results exchange.
#[derive(Debug, Clone)]
pub struct ReceivedResult {
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub body: Vec<u8>,
}

impl ReceivedResult {
    /// The job it is about: the correlation id, else the body's `job_id`.
    pub fn job_id(&self) -> Option<String> {
        self.correlation_id.clone().filter(|c| !c.is_empty()).or_else(|| {
            let v: Value = serde_json::from_slice(&self.body).ok()?;
            v.get("job_id")?.as_str().map(str::to_owned)
        })
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
                ShortString::from(binding),
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
        Some(Ok(ReceivedResult {
            routing_key: delivery.routing_key.to_string(),
            correlation_id: delivery.properties.correlation_id().as_ref().map(|c| c.to_string()),
            body: delivery.data,
        }))
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, ShortString::from("done")).await;
    }
}
