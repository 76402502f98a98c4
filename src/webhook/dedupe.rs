//! "Publish once" for pushes: WeChat pushes an event again when it saw no answer within 5 s,
//! and may do so while the first push is still being published.
//!
//! One Redis key per event (`Keys::push_seen`), holding either
//! - `P<owner>`: a pending mark with a short TTL, set (NX) by the task publishing the event; a
//!   crash leaves nothing but this mark, which runs out, so a re-push publishes then; or
//! - `D`: the done mark, written only after the broker confirmed the event.
//!
//! A failed publish deletes its own pending mark at once (compare-and-delete), so the re-push
//! does not have to wait for it to expire; so does a push task that panics or is dropped half-way
//! ([`PendingMark`] releases on drop). Nothing but a confirmed publish ever writes `D`.

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use redis::Script;
use tracing::warn;

use crate::store::{Redis, StoreError};

/// What the claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The event is ours to publish. `lookup` is the value of the extra key read in the same
    /// round trip (the msgid record), if one was asked for.
    Owned { owner: String, lookup: Option<String> },
    /// Already published and confirmed.
    Done,
    /// Another push of the same event is still publishing it and did not finish in time.
    Pending,
}

/// Deletes a pending mark only if it is still ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        ",
    )
});

/// Claims `key` for publishing, reading `lookup` (when given) in the same round trip. When
/// another push holds the pending mark, waits up to `wait` for it to turn done (or go away, and
/// then claims it).
pub async fn claim(
    redis: &Redis,
    key: &str,
    lookup: Option<&str>,
    pending_ttl: Duration,
    wait: Duration,
) -> Result<Claim, StoreError> {
    let deadline = Instant::now() + wait;
    let owner = format!("P{}", uuid::Uuid::new_v4().simple());
    let mut poll = Duration::from_millis(20);
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(key).arg(&owner).arg("NX").arg("PX").arg(pending_ttl.as_millis().max(1) as u64);
        pipe.cmd("GET").arg(key);
        if let Some(lookup) = lookup {
            pipe.cmd("GET").arg(lookup);
        }
        let (set, current, found): (Option<String>, Option<String>, Option<String>) = if lookup.is_some() {
            pipe.query_async(&mut redis.conn()).await?
        } else {
            let (set, current): (Option<String>, Option<String>) = pipe.query_async(&mut redis.conn()).await?;
            (set, current, None)
        };
        if set.is_some() {
            return Ok(Claim::Owned { owner, lookup: found });
        }
        match current.as_deref() {
            Some("D") => return Ok(Claim::Done),
            // Gone between SET and GET (released or expired): claim again at once.
            None if Instant::now() < deadline => continue,
            None => return Ok(Claim::Pending),
            Some(_) => {}
        }
        // Someone else is publishing this event: give them a moment to confirm.
        loop {
            if Instant::now() >= deadline {
                return Ok(Claim::Pending);
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
            poll = (poll * 2).min(Duration::from_millis(200));
            let current: Option<String> = redis::cmd("GET").arg(key).query_async(&mut redis.conn()).await?;
            match current.as_deref() {
                Some("D") => return Ok(Claim::Done),
                None => break,
                Some(_) => {}
            }
        }
    }
}

/// Marks the event published. Called only after the broker's confirm. Retried briefly: a
/// missing done mark would let a re-push publish the event a second time.
pub async fn mark_done(redis: &Redis, key: &str, done_ttl: Duration) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        let result: Result<(), redis::RedisError> = redis::cmd("SET")
            .arg(key)
            .arg("D")
            .arg("PX")
            .arg(done_ttl.as_millis().max(1) as u64)
            .query_async(&mut redis.conn())
            .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= 3 => return Err(e.into()),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// Gives up our pending mark after a failed publish, so the re-push may publish at once.
pub async fn release(redis: &Redis, key: &str, owner: &str) -> Result<(), StoreError> {
    let _: i64 = RELEASE.key(key).arg(owner).invoke_async(&mut redis.conn()).await?;
    Ok(())
}

/// Reads the msgid record again (used while a receipt waits for the worker's record).
pub async fn get(redis: &Redis, key: &str) -> Result<Option<String>, StoreError> {
    Ok(redis::cmd("GET").arg(key).query_async(&mut redis.conn()).await?)
}

/// The pending mark of an event this task owns. It ends in one of three ways: [`done`](Self::done)
/// after the broker's confirm, [`release`](Self::release) after a failure, or [`keep`](Self::keep)
/// when the outcome is unknown and the mark should run out by itself. Dropped in any other way
/// (the task panicked, or was dropped half-way), it releases the mark in the background, so that
/// WeChat's re-push publishes the event instead of being answered "busy" until the mark expires.
pub struct PendingMark {
    redis: Redis,
    key: String,
    owner: String,
    settled: bool,
}

impl PendingMark {
    /// The mark `owner` holds on `key` (from [`Claim::Owned`]).
    pub fn new(redis: Redis, key: String, owner: String) -> PendingMark {
        PendingMark { redis, key, owner, settled: false }
    }

    /// The event is confirmed: writes the done mark.
    pub async fn done(mut self, done_ttl: Duration) -> Result<(), StoreError> {
        self.settled = true;
        mark_done(&self.redis, &self.key, done_ttl).await
    }

    /// The publish failed: gives the event back at once.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.settled = true;
        release(&self.redis, &self.key, &self.owner).await
    }

    /// The broker may still confirm: leave the mark to expire rather than let a re-push publish
    /// a second copy right away.
    pub fn keep(mut self) {
        self.settled = true;
    }
}

impl Drop for PendingMark {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Outside a runtime (or while it shuts down) nothing can be sent: the mark's TTL ends it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (redis, key, owner) = (self.redis.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.owner));
        runtime.spawn(async move {
            match release(&redis, &key, &owner).await {
                Ok(()) => warn!(%key, "push task ended without an outcome; its pending mark is released"),
                Err(e) => warn!(%key, error = %e, "push task ended without an outcome and its pending mark could not be released; it expires by itself"),
            }
        });
    }
}
