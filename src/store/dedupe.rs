//! "Publish once" for the webhook: WeChat pushes an event again when it saw no answer within
//! 5 s, and may do so while the first push is still being published.
//!
//! One record per event ([`Keys::push_seen`](super::Keys::push_seen)) under the lease/done
//! protocol of the ledger ([`Claim`]):
//! - `P<owner>`: a pending mark with a short TTL, set by the task publishing the event; a crash
//!   leaves nothing but this mark, which runs out, so a re-push publishes then; or
//! - `D`: the done mark, written only after the broker confirmed the event.
//!
//! A failed publish deletes its own pending mark at once, so the re-push does not have to wait
//! for it to expire; so does a push task that panics or is dropped half-way ([`PendingMark`]
//! releases on drop). Nothing but a confirmed publish ever writes `D`.

use std::time::Duration;

use backon::Retryable;
use tracing::warn;

use super::{Redis, StoreError, ledger::Claim};
use crate::backoff::Backoff;

/// How often a push looks again while another push of the same event holds it.
const BUSY_POLL: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200)).without_jitter();

/// Retries of the done mark: a missing one would let a re-push publish the event again.
const DONE_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(200));
const DONE_RETRIES: usize = 3;

impl Redis {
    /// The pending mark this push would hold on the event `event` of `appid`; nothing is
    /// written before [`PendingMark::claim`].
    pub fn push_mark(&self, appid: &str, event: &str) -> PendingMark {
        PendingMark {
            redis: self.clone(),
            appid: appid.to_owned(),
            key: self.keys().push_seen(appid, event),
            owner: uuid::Uuid::new_v4().simple().to_string(),
            held: false,
        }
    }
}

/// The pending mark of one push on its event. Once [claimed](Self::claim), it ends in one of
/// three ways: [`done`](Self::done) after the broker's confirm, [`release`](Self::release) after
/// a failure, or [`keep`](Self::keep) when the outcome is unknown and the mark should run out by
/// itself. Dropped while held in any other way (the task panicked, or was dropped half-way), it
/// releases the mark in the background, so that WeChat's re-push publishes the event instead of
/// being answered "busy" until the mark expires.
pub struct PendingMark {
    redis: Redis,
    appid: String,
    key: String,
    owner: String,
    held: bool,
}

impl PendingMark {
    /// The Redis key of the mark, for logs.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Claims the event for publishing, the mark living `lease`, and reads the job_id recorded
    /// for `msgid` (when given) in the same round trip. While another push holds the event,
    /// looks again for up to `wait`: it may finish (done), fail (the event is claimed then) or
    /// still be busy.
    pub async fn claim(
        &mut self,
        msgid: Option<u64>,
        lease: Duration,
        wait: Duration,
    ) -> Result<(Claim, Option<String>), StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        let record = msgid.map(|m| self.redis.keys().msgid(&self.appid, m));
        let (mut claim, job_id) = self.redis.claim(&self.key, &self.owner, lease, record.as_deref()).await?;
        let mut polls = BUSY_POLL.delays();
        while matches!(claim, Claim::Busy { .. }) && polls.sleep_within(deadline).await {
            claim = self.redis.claim_existing(&self.key, &self.owner, lease).await?;
        }
        self.held = claim == Claim::Claimed;
        Ok((claim, job_id))
    }

    /// The event is confirmed: writes the done mark (retried briefly), to live `ttl`.
    pub async fn done(mut self, ttl: Duration) -> Result<(), StoreError> {
        self.held = false;
        let write = || async {
            let mut pipe = redis::pipe();
            Redis::record_done(&mut pipe, &self.key, b"", ttl);
            pipe.query_async::<()>(&mut self.redis.conn()).await
        };
        write.retry(DONE_RETRY.delays().take(DONE_RETRIES)).await?;
        Ok(())
    }

    /// The publish failed: gives the event back at once.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.held = false;
        self.redis.release_lease(&self.key, &self.owner).await
    }

    /// The broker may still confirm: leave the mark to expire rather than let a re-push publish
    /// a second copy right away.
    pub fn keep(mut self) {
        self.held = false;
    }
}

impl Drop for PendingMark {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        // Outside a runtime (or while it shuts down) nothing can be sent: the mark's TTL ends it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (redis, key, owner) = (self.redis.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.owner));
        runtime.spawn(async move {
            match redis.release_lease(&key, &owner).await {
                Ok(()) => warn!(%key, "push task ended without an outcome; its pending mark is released"),
                Err(e) => warn!(
                    %key,
                    error = &e as &dyn std::error::Error,
                    "push task ended without an outcome and its pending mark could not be released; it expires by itself"
                ),
            }
        });
    }
}
