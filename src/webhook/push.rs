//! One push, from the verified request to the broker's confirm: the whole life of a push reads
//! top to bottom in [`Inner::process_post`].
//!
//! This runs in its own task (see `super::post`), not in the HTTP handler: WeChat hangs up after
//! 5 s, axum then drops the handler, and a publish cut off half-way would leave the event
//! neither confirmed nor released.

use std::{
    borrow::Cow,
    error::Error,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::http::StatusCode;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{
    BasicProperties,
    types::{FieldTable, ShortString},
};
use serde_json::Value;
use sha1::{Digest, Sha1};
use tracing::{debug, error, warn};

use super::{
    Inner, Reply,
    metrics::{self, Outcome},
    verify::{AccountKeys, Mode, PushQuery, VerifyError},
};
use crate::{
    amqp::{
        PublishError, Short, header_str,
        headers::{REASON, push},
        json_properties,
    },
    backoff::Backoff,
    domain::{
        receipt::{self, Push},
        result::{ConsentEvent, DeliveryEvent},
    },
    store::{StoreError, ledger::Claim},
};

/// How often a receipt looks for its msgid record while it waits for the worker to write it.
const MSGID_LOOKS: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500)).without_jitter();

/// Why a push could not be carried through now; WeChat is answered 503 and pushes again.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("Redis is unavailable, so the push cannot be de-duplicated")]
    Redis(#[from] StoreError),
    #[error("the same event is still being published by an earlier push")]
    Busy,
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("RabbitMQ did not confirm within {0:?}; the outcome is unknown")]
    Unconfirmed(Duration),
    #[error("cannot encode the event as JSON")]
    Encode(#[source] serde_json::Error),
}

impl DeliverError {
    /// The `reason` label of a 503 in the webhook's metrics.
    fn reason(&self) -> &'static str {
        match self {
            DeliverError::Redis(_) => "redis",
            DeliverError::Busy => "busy",
            DeliverError::Publish(_) => "broker",
            DeliverError::Unconfirmed(_) => "unconfirmed",
            DeliverError::Encode(_) => "encode",
        }
    }
}

/// What happened to an event that is now safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    /// Published and confirmed now.
    Published,
    /// An earlier push of the same event was already confirmed.
    AlreadyDone,
}

impl Inner {
    /// Verifies, decrypts, reads and publishes one POSTed push: the answer for WeChat, and how
    /// the push went (for the metrics).
    pub(crate) async fn process_post(
        &self,
        account: Arc<AccountKeys>,
        query: PushQuery,
        body: Bytes,
    ) -> (Reply, Outcome) {
        let received_at = Utc::now();
        let now = received_at.timestamp();
        let window = self.settings.timestamp_window;
        let mode = match query.mode() {
            Ok(m) => m,
            Err(e) => return self.refuse(&account, e),
        };

        let plaintext: Cow<'_, [u8]> = match mode {
            Mode::Plain => {
                if let Err(e) = account.verify_plain(&query, now, window) {
                    return self.refuse(&account, e);
                }
                Cow::Borrowed(&body)
            }
            Mode::Aes => {
                // The envelope must be read to find what msg_signature covers; until that
                // signature holds, nothing about the body is trusted or kept.
                let encrypt = match receipt::parse_fields(&body).and_then(|f| receipt::encrypt_field(&f)) {
                    Ok(Some(e)) => e,
                    Ok(None) => return self.refuse_envelope(&account, "Encrypt is missing".into()),
                    Err(e) => {
                        return self.refuse_envelope(&account, format!("cannot read the encrypted envelope: {e}"));
                    }
                };
                if let Err(e) = account.verify_msg_signature(&query, &encrypt, now, window) {
                    return self.refuse(&account, e);
                }
                match account.decrypt(&encrypt) {
                    Ok(msg) => Cow::Owned(msg),
                    Err(e) => return self.dead_letter(&account, &query, &body, e.to_string()).await,
                }
            }
        };

        let push = match Push::parse(&plaintext) {
            Ok(p) => p,
            Err(e) => return self.dead_letter(&account, &query, &body, format!("unreadable push: {e}")).await,
        };

        match self.publish_push(&account, &push, received_at).await {
            Ok(delivered) => {
                let outcome = if delivered == Delivered::Published { Outcome::Published } else { Outcome::Duplicate };
                debug!(account = %account.name, event = %push.dedupe_key(), outcome = outcome.label(), "push carried through");
                (Reply::Success, outcome)
            }
            Err(e) => self.unavailable(&account, &push.dedupe_key(), e),
        }
    }

    /// Publishes what a push reports: delivery events (a template receipt, or each item of a
    /// subscription sent event), consent events (each item of a popup or change event), or
    /// else the push itself. Items go out in order, each once; the push is `Published` when
    /// any of them was published now.
    async fn publish_push(
        &self,
        account: &AccountKeys,
        push: &Push,
        received_at: DateTime<Utc>,
    ) -> Result<Delivered, DeliverError> {
        let kind = account.subscribe_kind;
        let deliveries = push.delivery_events(&account.name, kind, received_at);
        if !deliveries.is_empty() {
            // One wait for msgid records per push, however many items: WeChat waits 5 s in all.
            let deadline = tokio::time::Instant::now() + self.settings.msgid_wait;
            return publish_each(deliveries, |(key, event)| self.publish_delivery(account, key, event, deadline)).await;
        }
        let consents = push.consent_events(&account.name, kind, received_at);
        if !consents.is_empty() {
            return publish_each(consents, |(key, event)| self.publish_consent(account, key, event)).await;
        }
        self.publish_event(account, push, received_at).await
    }

    /// A delivery event (`delivery.<status>`) tied to its job through the msgid record, looked
    /// for again until `deadline` when the claim did not find it.
    async fn publish_delivery(
        &self,
        account: &AccountKeys,
        key: String,
        mut event: DeliveryEvent,
        deadline: tokio::time::Instant,
    ) -> Result<Delivered, DeliverError> {
        let appid = account.appid.as_str();
        let msgid = event.msgid;
        self.publish_once(appid, &key, Some(msgid), |found| async move {
            event.job_id = match found {
                Some(job) => Some(job),
                None => self.wait_for_msgid_record(appid, msgid, deadline).await,
            };
            let body = serde_json::to_vec(&event).map_err(DeliverError::Encode)?;
            let props = json_properties(event.job_id.as_deref());
            self.publish_confirmed(&self.settings.results_exchange, event.status.routing_key(), &body, props, false)
                .await
        })
        .await
    }

    /// A consent event: `consent.accepted` / `consent.rejected`.
    async fn publish_consent(
        &self,
        account: &AccountKeys,
        key: String,
        event: ConsentEvent,
    ) -> Result<Delivered, DeliverError> {
        let body = serde_json::to_vec(&event).map_err(DeliverError::Encode)?;
        let exchange = &self.settings.results_exchange;
        self.publish_once(&account.appid, &key, None, |_| async {
            self.publish_confirmed(exchange, event.routing_key(), &body, json_properties(None), false).await
        })
        .await
    }

    /// Any other event or message → `event.<event>` / `message.<msgtype>` with every field.
    async fn publish_event(
        &self,
        account: &AccountKeys,
        push: &Push,
        received_at: DateTime<Utc>,
    ) -> Result<Delivered, DeliverError> {
        let mut body = push.fields.clone();
        body.insert("type".into(), Value::from(if push.event.is_some() { "event" } else { "message" }));
        body.insert("account".into(), Value::from(account.name.clone()));
        body.insert("received_at".into(), Value::from(received_at.to_rfc3339_opts(SecondsFormat::Millis, true)));
        let body = serde_json::to_vec(&body).map_err(DeliverError::Encode)?;
        // `event.<Event>` / `message.<MsgType>` come from the push: a name too long for a routing
        // key is cut (the body keeps it whole) rather than refused, or WeChat would push forever.
        let routing_key = Short::truncated(&push.routing_key());
        self.publish_once(&account.appid, &push.dedupe_key(), None, |_| async {
            self.publish_confirmed(
                &self.settings.results_exchange,
                routing_key.as_str(),
                &body,
                json_properties(None),
                false,
            )
            .await
        })
        .await
    }

    /// A push whose signature held but whose content cannot be read is parked, untouched, in
    /// the dead-letter queue (once per distinct body) and answered 400.
    async fn dead_letter(
        &self,
        account: &AccountKeys,
        query: &PushQuery,
        body: &Bytes,
        reason: String,
    ) -> (Reply, Outcome) {
        warn!(account = %account.name, %reason, bytes = body.len(), "push cannot be read; parking it in the dead-letter queue");
        let event = format!("dead:{}", hex::encode(Sha1::digest(body)));
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from(REASON), header_str(&reason));
        headers.insert(ShortString::from(push::SOURCE), header_str("webhook"));
        headers.insert(ShortString::from(push::ACCOUNT), header_str(&account.name));
        // Enough to verify (and replay) the push later; none of it is secret.
        for (name, value) in [
            (push::TIMESTAMP, &query.timestamp),
            (push::NONCE, &query.nonce),
            (push::SIGNATURE, &query.signature),
            (push::MSG_SIGNATURE, &query.msg_signature),
            (push::ENCRYPT_TYPE, &query.encrypt_type),
            (push::OPENID, &query.openid),
        ] {
            if let Some(v) = value {
                headers.insert(ShortString::from(name), header_str(v));
            }
        }
        let content_type = match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => "application/json",
            Some(b'<') => "application/xml",
            _ => "application/octet-stream",
        };
        let props = BasicProperties::default()
            .with_content_type(ShortString::from(content_type))
            .with_delivery_mode(2)
            .with_headers(headers);
        let dlq = &self.settings.dead_letter_queue;
        let result = self
            .publish_once(&account.appid, &event, None, |_| async {
                self.publish_confirmed("", dlq, body, props, true).await
            })
            .await;
        match result {
            Ok(_) => (Reply::Refused(StatusCode::BAD_REQUEST, reason), Outcome::DeadLettered),
            Err(e) => self.unavailable(account, &event, e),
        }
    }

    /// Claims the event `event` of `appid`, publishes it through `publish` (given the job_id
    /// recorded for `msgid`, when one is given), and marks it done only after the broker's
    /// confirm.
    async fn publish_once<F, Fut>(
        &self,
        appid: &str,
        event: &str,
        msgid: Option<u64>,
        publish: F,
    ) -> Result<Delivered, DeliverError>
    where
        F: FnOnce(Option<String>) -> Fut,
        Fut: Future<Output = Result<(), DeliverError>>,
    {
        let s = &self.settings;
        // From the claim on, the mark is released whatever happens, a panic included.
        let mut mark = self.redis.push_mark(appid, event);
        let (claim, found) = mark.claim(msgid, s.pending_ttl, s.pending_wait).await?;
        match claim {
            Claim::Claimed => {}
            // Pushed events are never cancelled; the arm keeps the protocol's answers whole.
            Claim::Done(_) | Claim::Cancelled => return Ok(Delivered::AlreadyDone),
            Claim::Busy { .. } => return Err(DeliverError::Busy),
        }
        let key = mark.key().to_owned();
        match publish(found).await {
            Ok(()) => {
                if let Err(e) = mark.done(s.done_ttl).await {
                    // Published, but a re-push of this event would now publish it again.
                    error!(%key, error = &e as &dyn Error, "event published but its done mark could not be written");
                }
                Ok(Delivered::Published)
            }
            // The broker may still confirm it: keep the pending mark until it runs out rather
            // than let a re-push publish a second copy right away.
            Err(e @ DeliverError::Unconfirmed(_)) => {
                mark.keep();
                Err(e)
            }
            Err(e) => {
                if let Err(release) = mark.release().await {
                    warn!(%key, error = &release as &dyn Error, "could not release the pending mark; it expires by itself");
                }
                Err(e)
            }
        }
    }

    /// Publishes and waits (bounded) for the broker's confirm, declaring the topology first
    /// when that has not been done yet.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), DeliverError> {
        let limit = self.settings.publish_timeout;
        let publish = async {
            self.ensure_topology().await?;
            let started = Instant::now();
            let result = self.broker.publish(exchange, routing_key, body, props, mandatory).await;
            if result.is_ok() {
                metrics::publish_confirmed(started.elapsed());
            }
            if let Err(PublishError::Returned { .. }) = &result {
                // Someone deleted the queue: declare it again before the next try.
                self.forget_topology();
            }
            result
        };
        match tokio::time::timeout(limit, publish).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(DeliverError::Unconfirmed(limit)),
        }
    }

    /// A receipt may arrive before the worker has recorded its msgid (WeChat can be faster
    /// than the worker's Redis write). Looks again a few times until `deadline`.
    async fn wait_for_msgid_record(&self, appid: &str, msgid: u64, deadline: tokio::time::Instant) -> Option<String> {
        let mut looks = MSGID_LOOKS.delays();
        while looks.sleep_within(deadline).await {
            match self.redis.job_for_msgid(appid, msgid).await {
                Ok(Some(job)) => return Some(job),
                Ok(None) => {}
                Err(e) => {
                    warn!(
                        error = &e as &dyn Error,
                        "msgid record look-up failed; publishing the receipt with job_id null"
                    );
                    return None;
                }
            }
        }
        None
    }

    fn refuse(&self, account: &AccountKeys, e: VerifyError) -> (Reply, Outcome) {
        warn!(account = %account.name, status = e.status().as_u16(), reason = %e, "push refused");
        (Reply::Refused(e.status(), e.to_string()), Outcome::Refused(e.reason()))
    }

    /// A safe-mode push whose envelope cannot be read: refused, since without `Encrypt` its
    /// signature cannot be checked (nothing unauthenticated is parked).
    fn refuse_envelope(&self, account: &AccountKeys, reason: String) -> (Reply, Outcome) {
        warn!(account = %account.name, status = 400, %reason, "push refused");
        (Reply::Refused(StatusCode::BAD_REQUEST, reason), Outcome::Refused("bad_envelope"))
    }

    fn unavailable(&self, account: &AccountKeys, event: &str, e: DeliverError) -> (Reply, Outcome) {
        error!(account = %account.name, %event, error = &e as &dyn Error, "push not carried through; answering 503 so WeChat pushes again");
        (Reply::Refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()), Outcome::Unavailable(e.reason()))
    }
}

/// Publishes `items` one after the other through `publish`, stopping at the first failure
/// (WeChat pushes again, and the items already confirmed are then duplicates).
async fn publish_each<T, F, Fut>(items: Vec<T>, mut publish: F) -> Result<Delivered, DeliverError>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<Delivered, DeliverError>>,
{
    let mut delivered = Delivered::AlreadyDone;
    for item in items {
        if publish(item).await? == Delivered::Published {
            delivered = Delivered::Published;
        }
    }
    Ok(delivered)
}
