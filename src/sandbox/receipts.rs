//! `TEMPLATESENDJOBFINISH` pushes to an account's webhook, plaintext or safe mode, with WeChat's
//! re-push rule: a push not answered `success` (or empty) with HTTP 200 within the answer timeout
//! is pushed again, up to `max_repushes` more times, one answer timeout after the previous push.

use std::{
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use url::Url;

use super::{SandboxConfigError, Shared, WebhookTarget};
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

/// The event exactly as the template-message doc shows it.
pub(super) fn event_xml(to_user_name: &str, touser: &str, create_time: i64, msgid: u64, status: &str) -> String {
    let mut xml = String::with_capacity(320 + touser.len());
    xml.push_str("<xml>\n<ToUserName>");
    push_cdata(&mut xml, to_user_name);
    xml.push_str("</ToUserName>\n<FromUserName>");
    push_cdata(&mut xml, touser);
    // Writing to a String cannot fail.
    let _ = write!(
        xml,
        "</FromUserName>\n<CreateTime>{create_time}</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n\
         <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>{msgid}</MsgID>\n<Status>"
    );
    push_cdata(&mut xml, status);
    xml.push_str("</Status>\n</xml>");
    xml
}

/// A CDATA section; a `]]>` inside the text (a touser is whatever the sender sent) is split
/// across two sections so that the XML stays well-formed.
fn push_cdata(out: &mut String, text: &str) {
    out.push_str("<![CDATA[");
    out.push_str(&text.replace("]]>", "]]]]><![CDATA[>"));
    out.push_str("]]>");
}

/// One receipt to push.
pub(super) struct Receipt {
    pub account: usize,
    pub msgid: u64,
    pub touser: String,
    pub create_time: i64,
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
        tracing::warn!(msgid = receipt.msgid, "too many receipts pending: receipt abandoned");
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

    let status = status_for(&receipt.touser);
    let xml = event_xml(&account.original_id, &receipt.touser, receipt.create_time, receipt.msgid, status);
    // Made once: every re-push carries the same content (only the query signature is fresh).
    let (body, encrypt) = match &webhook.cipher {
        Some(cipher) => {
            let encrypt = cipher.encrypt(&rand::random::<[u8; 16]>(), xml.as_bytes(), &account.appid);
            let mut body = String::with_capacity(encrypt.len() + 120);
            body.push_str("<xml><ToUserName>");
            push_cdata(&mut body, &account.original_id);
            body.push_str("</ToUserName><Encrypt>");
            push_cdata(&mut body, &encrypt);
            body.push_str("</Encrypt></xml>");
            (Bytes::from(body), Some(encrypt))
        }
        None => (Bytes::from(xml), None),
    };
    let timeout = Duration::from_millis(settings.answer_timeout_ms);

    for attempt in 0..=settings.max_repushes {
        let url = signed_url(webhook, &receipt.touser, encrypt.as_deref());
        let pushed_at = tokio::time::Instant::now();
        let outcome = {
            let Ok(_permit) = shared.push_permits.acquire().await else { return };
            shared.counters.receipts_pushed.fetch_add(1, Ordering::Relaxed);
            push(shared, url, body.clone(), timeout).await
        };
        match outcome {
            Ok(()) => {
                shared.counters.receipts_acked.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(msgid = receipt.msgid, attempt, "receipt answered");
                return;
            }
            Err(why) => tracing::debug!(msgid = receipt.msgid, attempt, %why, "receipt not answered"),
        }
        if attempt < settings.max_repushes {
            // WeChat's cadence: a new push when the previous one has gone unanswered for the
            // answer timeout, so a webhook that is restarting gets that long to come back.
            tokio::time::sleep_until(pushed_at + timeout).await;
        }
    }
    shared.counters.receipts_abandoned.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        msgid = receipt.msgid,
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

/// One push; `Ok` when answered as WeChat requires: HTTP 200 and a body of `success` or nothing.
async fn push(shared: &Shared, url: Url, body: Bytes, timeout: Duration) -> Result<(), String> {
    let answer = async {
        let resp = shared
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml")
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
    fn event_xml_is_the_documented_layout() {
        let xml = event_xml("gh_7f083739789a", "oia2TjuEGTNoeX76QEjQNrcURxG8", 1395658920, 200163836, "success");
        assert_eq!(
            xml,
            "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n\
             <FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n\
             <CreateTime>1395658920</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n\
             <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163836</MsgID>\n\
             <Status><![CDATA[success]]></Status>\n</xml>"
        );
    }

    #[test]
    fn cdata_survives_a_hostile_openid() {
        let xml = event_xml("gh_x", "a]]>b", 1, 2, "success");
        assert!(xml.contains("<![CDATA[a]]]]><![CDATA[>b]]>"));
    }

    #[test]
    fn status_follows_the_openid() {
        assert_eq!(status_for("user-block-1"), "failed:user block");
        assert_eq!(status_for("x-sysfail"), "failed: system failed");
        assert_eq!(status_for("oia2"), "success");
    }
}
