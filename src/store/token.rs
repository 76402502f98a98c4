//! The shared access token in Redis: the cached value, the refresh lock, and the failure
//! back-off. The protocol that uses these is in [`crate::worker::tokens`].

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{Redis, StoreError, millis, scripts};

/// A token as cached in Redis, with what is left of its life by Redis' clock.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub value: SecretString,
    pub remaining: Duration,
    /// When it was fetched (Unix ms, Redis' clock): tells one fetch from the next even when
    /// WeChat hands back the same token.
    pub fetched_at_ms: i64,
    /// How long it lived when it was stored (WeChat's `expires_in` then).
    pub lifetime: Duration,
}

/// A token WeChat keeps refusing while no new one can be had (forced refreshes spent or
/// too recent): nobody asks WeChat again for it until `remaining` has passed.
#[derive(Debug, Clone)]
pub struct StoredRefusal {
    /// [`fingerprint`] of the refused token.
    pub fingerprint: String,
    pub remaining: Duration,
    pub why: String,
}

/// What the forced-refresh gate answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForcedRefresh {
    /// Go ahead: this is forced refresh number `used` of the day.
    Granted { used: u64 },
    /// Not now: the last forced refresh was less than the interval ago, or the day's budget is
    /// spent (`used` of it); the next is possible after `retry_after`.
    Denied { retry_after: Duration, used: u64 },
}

/// A short digest of a token, to recognise it without storing it twice.
pub fn fingerprint(token: &SecretString) -> String {
    use sha1::{Digest, Sha1};
    hex::encode(&Sha1::digest(token.expose_secret().as_bytes())[..8])
}

/// A failed fetch remembered by the pool, so that nobody fetches again before `remaining`.
#[derive(Debug, Clone)]
pub struct StoredFailure {
    pub message: String,
    pub remaining: Duration,
    /// How many fetches in a row have failed (drives the doubling back-off).
    pub streak: u32,
}

/// What [`Redis::read_token`] finds.
pub struct Snapshot {
    pub token: Option<StoredToken>,
    pub failure: Option<StoredFailure>,
    pub refusal: Option<StoredRefusal>,
}

impl Redis {
    /// The cached token, failure mark and refusal mark of `appid`.
    pub async fn read_token(&self, appid: &str) -> Result<Snapshot, StoreError> {
        let keys = self.keys();
        type Reply = (Option<String>, i64, Option<String>, i64, Option<String>, i64);
        let (token, token_ttl, failure, now_ms, refusal, refusal_ttl): Reply = scripts::READ_TOKEN
            .key(keys.token(appid))
            .key(keys.token_failure(appid))
            .key(keys.token_refused(appid))
            .invoke_async(&mut self.conn())
            .await?;
        let token = match token {
            Some(raw) if token_ttl > 0 => {
                let (at, value) = raw.split_once(':').ok_or_else(|| StoreError::Corrupt {
                    key: keys.token(appid),
                    what: "no fetch time before the token".into(),
                })?;
                let remaining = Duration::from_millis(token_ttl as u64);
                let fetched_at_ms: i64 = at.parse().unwrap_or(0);
                // Lived so far plus what is left; a fetch time from the future (another clock,
                // an older wxpush) counts as "just fetched".
                let lived = Duration::from_millis((now_ms - fetched_at_ms).clamp(0, i64::MAX) as u64);
                let lifetime = if fetched_at_ms > 0 { remaining + lived } else { remaining };
                Some(StoredToken { value: SecretString::from(value), remaining, fetched_at_ms, lifetime })
            }
            _ => None,
        };
        // `streak:until_ms:message`; the mark outlives `until` so that the streak keeps doubling.
        let failure = failure.and_then(|raw| {
            let mut parts = raw.splitn(3, ':');
            let streak = parts.next()?.parse().ok()?;
            let until: i64 = parts.next()?.parse().ok()?;
            let message = parts.next().unwrap_or_default().to_owned();
            Some(StoredFailure { message, remaining: Duration::from_millis((until - now_ms).max(0) as u64), streak })
        });
        // `fingerprint:why`
        let refusal = refusal.filter(|_| refusal_ttl > 0).and_then(|raw| {
            let (fingerprint, why) = raw.split_once(':')?;
            Some(StoredRefusal {
                fingerprint: fingerprint.to_owned(),
                remaining: Duration::from_millis(refusal_ttl as u64),
                why: why.to_owned(),
            })
        });
        Ok(Snapshot { token, failure, refusal })
    }

    /// Stores a freshly fetched token for `lifetime`, and clears the failure and refusal marks.
    /// Returns its fetch time (Unix ms, Redis' clock).
    pub async fn store_token(&self, appid: &str, token: &SecretString, lifetime: Duration) -> Result<i64, StoreError> {
        let keys = self.keys();
        let fetched_at: i64 = scripts::STORE_TOKEN
            .key(keys.token(appid))
            .key(keys.token_failure(appid))
            .key(keys.token_refused(appid))
            .arg(token.expose_secret())
            .arg(millis(lifetime))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(fetched_at)
    }

    /// Marks `token` as refused by WeChat with no replacement to be had for `for_`: until then
    /// the pool answers its refusals without asking WeChat.
    pub async fn mark_token_refused(
        &self,
        appid: &str,
        token: &SecretString,
        why: &str,
        for_: Duration,
    ) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(self.keys().token_refused(appid))
            .arg(format!("{}:{why}", fingerprint(token)))
            .arg("PX")
            .arg(millis(for_))
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Asks the pool-wide gate for one forced refresh: at most one per `interval` and `budget`
    /// per day (`day` names it; the count lives `day_left`).
    pub async fn gate_forced_refresh(
        &self,
        appid: &str,
        interval: Duration,
        budget: u32,
        day: &str,
        day_left: Duration,
    ) -> Result<ForcedRefresh, StoreError> {
        let keys = self.keys();
        let (granted, retry_ms, used): (i64, i64, u64) = scripts::FORCE_GATE
            .key(keys.token_forced(appid))
            .key(keys.token_forced_day(appid, day))
            .arg(millis(interval))
            .arg(budget)
            .arg(millis(day_left))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(if granted == 1 {
            ForcedRefresh::Granted { used }
        } else {
            ForcedRefresh::Denied { retry_after: Duration::from_millis(retry_ms.max(1) as u64), used }
        })
    }

    /// Tries to take the refresh lock (`SET NX PX` with our unique value).
    pub async fn try_lock_token(&self, appid: &str, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.keys().token_lock(appid))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .query_async(&mut self.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Releases the refresh lock if we still hold it.
    pub async fn unlock_token(&self, appid: &str, owner: &str) -> Result<(), StoreError> {
        self.compare_and_delete(&self.keys().token_lock(appid), owner).await.map(drop)
    }

    /// Drops the cached token only if it is still `failed`; returns whether it was dropped.
    pub async fn invalidate_token(&self, appid: &str, failed: &SecretString) -> Result<bool, StoreError> {
        let n: i64 = scripts::INVALIDATE_TOKEN
            .key(self.keys().token(appid))
            .arg(failed.expose_secret())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Remembers a failed fetch for `backoff`, with how many failed in a row.
    pub async fn store_token_failure(
        &self,
        appid: &str,
        streak: u32,
        message: &str,
        backoff: Duration,
    ) -> Result<(), StoreError> {
        let _: () = scripts::STORE_TOKEN_FAILURE
            .key(self.keys().token_failure(appid))
            .arg(streak)
            .arg(backoff.as_millis() as u64)
            .arg(message)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }
}
