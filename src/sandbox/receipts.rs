//! Event pushes to an account's webhook (`TEMPLATESENDJOBFINISH` receipts and the subscription
//! events), in the account's format, plaintext or safe mode, with WeChat's re-push rule: a push not answered `success` (or empty) with HTTP 200 within the answer timeout
//! is pushed again, up to `max_repushes` more times, one answer timeout after the previous push.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use url::Url;

use super::{
    EventFormat, SandboxConfigError, Shared, WebhookTarget,
    events::{self, Event, Header},
};
use crate::domain::crypto::{self, Cipher};

/// HTTP pushes in flight at once, across accounts.
pub(super) const MAX_CONCURRENT_PUSHES: usize = 128;
/// Receipts waiting (for their delay, a push slot, or a re-push) beyond this are abandoned at
/// once, so that a dead webhook under a benchmark cannot grow the sandbox without bound.
const MAX_PENDING_RECEIPTS: usize = 200_000;

/// An account's webhook as the running sandbox holds it.
pub(super) struct Webhook {
    url: Url,
    token: String,
    cipher: Option<Cipher>,
}

impl Webhook {
    pub fn new(appid: &str, target: &WebhookTarget) -> Result<Self, SandboxConfigError> {
        let url_error = |reason: String| SandboxConfigError::WebhookUrl {
            appid: appid.to_owned(),
            url: target.url.clone(),
            reason,
        };
        let url = Url::parse(&target.url).map_err(|e| url_error(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(url_error("the scheme must be http or https".into()));
        }
        let cipher = match &target.encoding_aes_key {
            Some(key) => Some(
                Cipher::new(key)
                    .map_err(|e| SandboxConfigError::AesKey { appid: appid.to_owned(), reason: e.to_string() })?,
            ),
            None => None,
        };
        Ok(Self { url, token: target.token.clone(), cipher })
    }
}

/// `Status` of the receipt, chosen by the recipient's openid.
pub(super) fn status_for(touser: &str) -> &'static str {
    if touser.contains("block") {
        "failed:user block"
    } else if touser.contains("sysfail") {
        "failed: system failed"
    } else {
        "success"
    }
}

/// `ErrorCode` and `ErrorStatus` of a subscription message's sent event, chosen by the openid
/// like [`status_for`]. WeChat documents success only (`0`, `success`); a failure is "a system
/// failure of the asynchronous delivery", for which the sandbox uses errcode -1 and its errmsg.
pub(super) fn sent_result_for(touser: &str) -> (i64, &'static str) {
    if touser.contains("sysfail") { (-1, super::send::errmsg(-1)) } else { (0, "success") }
}

/// One event to push to an account's webhook.
pub(super) struct Receipt {
    pub account: usize,
    /// The recipient, the event's `FromUserName`.
    pub touser: String,
    pub create_time: i64,
    pub event: Event,
}

/// Decrements the pending count however the task ends (done, abandoned, cancelled).
struct Pending(Arc<Shared>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending_receipts.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Schedules the receipt of an accepted message, if its account has a webhook and receipts are
/// on. Never waits: the push runs in its own task.
pub(super) fn schedule(shared: &Arc<Shared>, receipt: Receipt) {
    if !shared.receipts.enabled {
        return;
    }
    if shared.accounts.get(receipt.account).is_none_or(|a| a.webhook.is_none()) {
        return;
    }
    if shared.pending_receipts.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_RECEIPTS {
        shared.pending_receipts.fetch_sub(1, Ordering::Relaxed);
        shared.counters.receipts_abandoned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(event = receipt.event.name(), msgid = ?receipt.event.msgid(), "too many receipts pending: receipt abandoned");
        return;
    }
    let guard = Pending(shared.clone());
    tokio::spawn(async move {
        let shared = guard.0.clone();
        tokio::select! {
            () = shared.cancel.cancelled() => {}
            () = deliver(&shared, receipt) => {}
        }
        drop(guard);
    });
}

async fn deliver(shared: &Shared, receipt: Receipt) {
    let Some(account) = shared.accounts.get(receipt.account) else { return };
    let Some(webhook) = &account.webhook else { return };
    let settings = shared.receipts;
    tokio::time::sleep(Duration::from_millis(settings.delay_ms)).await;

    let header = Header {
        to_user_name: &account.original_id,
        from_user_name: &receipt.touser,
        create_time: receipt.create_time,
    };
    let event = events::render(account.format, &header, &receipt.event);
    // Made once: every re-push carries the same content (only the query signature is fresh).
    let (body, encrypt) = match &webhook.cipher {
        Some(cipher) => {
            let encrypt = cipher.encrypt(&rand::random::<[u8; 16]>(), event.as_bytes(), &account.appid);
            (Bytes::from(events::envelope(account.format, &account.original_id, &encrypt)), Some(encrypt))
        }
        None => (Bytes::from(event), None),
    };
    let timeout = Duration::from_millis(settings.answer_timeout_ms);

    for attempt in 0..=settings.max_repushes {
        let url = signed_url(webhook, &receipt.touser, encrypt.as_deref());
        let pushed_at = tokio::time::Instant::now();
        let outcome = {
            let Ok(_permit) = shared.push_permits.acquire().await else { return };
            shared.counters.receipts_pushed.fetch_add(1, Ordering::Relaxed);
            push(shared, url, body.clone(), content_type(account.format), timeout).await
        };
        match outcome {
            Ok(()) => {
                shared.counters.receipts_acked.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event = receipt.event.name(), msgid = ?receipt.event.msgid(), attempt, "push answered");
                return;
            }
            Err(why) => {
                tracing::debug!(event = receipt.event.name(), msgid = ?receipt.event.msgid(), attempt, %why, "push not answered")
            }
        }
        if attempt < settings.max_repushes {
            // WeChat's cadence: a new push when the previous one has gone unanswered for the
            // answer timeout, so a webhook that is restarting gets that long to come back.
            tokio::time::sleep_until(pushed_at + timeout).await;
        }
    }
    shared.counters.receipts_abandoned.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        event = receipt.event.name(),
        msgid = ?receipt.event.msgid(),
        pushes = settings.max_repushes + 1,
        "receipt abandoned: the webhook never answered success"
    );
}

/// The webhook URL with a fresh `timestamp`/`nonce` and their signatures.
fn signed_url(webhook: &Webhook, openid: &str, encrypt: Option<&str>) -> Url {
    let timestamp = super::unix_now().as_secs().to_string();
    let nonce = rand::random::<u32>().to_string();
    let mut url = webhook.url.clone();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("signature", &crypto::signature(&webhook.token, &timestamp, &nonce))
            .append_pair("timestamp", &timestamp)
            .append_pair("nonce", &nonce)
            .append_pair("openid", openid);
        if let Some(encrypt) = encrypt {
            q.append_pair("encrypt_type", "aes")
                .append_pair("msg_signature", &crypto::msg_signature(&webhook.token, &timestamp, &nonce, encrypt));
        }
    }
    url
}

fn content_type(format: EventFormat) -> &'static str {
    match format {
        EventFormat::Xml => "text/xml",
        EventFormat::Json => "application/json",
    }
}

/// One push; `Ok` when answered as WeChat requires: HTTP 200 and a body of `success` or nothing.
async fn push(
    shared: &Shared,
    url: Url,
    body: Bytes,
    content_type: &'static str,
    timeout: Duration,
) -> Result<(), String> {
    let answer = async {
        let resp = shared
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.bytes().await.map_err(|e| e.to_string())?;
        if status != reqwest::StatusCode::OK {
            return Err(format!("HTTP {status}"));
        }
        if !text.is_empty() && &text[..] != b"success" {
            return Err(format!(
                "answered {:?} instead of success",
                String::from_utf8_lossy(&text[..text.len().min(64)])
            ));
        }
        Ok(())
    };
    // The whole answer, body included, must come within the timeout (WeChat hangs up at 5 s).
    tokio::time::timeout(timeout, answer).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_openid() {
        assert_eq!(status_for("user-block-1"), "failed:user block");
        assert_eq!(status_for("x-sysfail"), "failed: system failed");
        assert_eq!(status_for("oia2"), "success");
        assert_eq!(sent_result_for("x-sysfail"), (-1, "system error"));
        assert_eq!(sent_result_for("oia2"), (0, "success"));
    }
}
