//! The shared access token in Redis: the cached value, the refresh lock, and the failure
//! back-off. The protocol that uses these is in [`crate::token`].

use std::{sync::LazyLock, time::Duration};

use redis::Script;
use secrecy::{ExposeSecret, SecretString};

use super::{Redis, StoreError};

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

/// Reads the token, the failure mark and the refusal mark in one round trip.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]),
                t[1] * 1000 + math.floor(t[2] / 1000), redis.call('GET', KEYS[3]), redis.call('PTTL', KEYS[3])}
        ",
    )
});

/// Stores a token as `fetched_at_ms:token` by Redis' clock (one clock for the whole pool), and
/// clears the failure and refusal marks.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = t[1] * 1000 + math.floor(t[2] / 1000)
        redis.call('SET', KEYS[1], now .. ':' .. ARGV[1], 'PX', ARGV[2])
        redis.call('DEL', KEYS[2], KEYS[3])
        return now
        ",
    )
});

/// The pool-wide gate of forced refreshes: at most one per interval (KEYS[1] lives that long)
/// and at most ARGV[2] a day (KEYS[2] counts them). Returns {granted, retry_after_ms, used}.
static FORCE_GATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local used = tonumber(redis.call('GET', KEYS[2]) or '0')
        local wait = redis.call('PTTL', KEYS[1])
        if wait > 0 then return {0, wait, used} end
        if used >= tonumber(ARGV[2]) then return {0, tonumber(ARGV[3]), used} end
        redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
        used = redis.call('INCR', KEYS[2])
        redis.call('PEXPIRE', KEYS[2], ARGV[3])
        return {1, 0, used}
        ",
    )
});

/// Deletes a key only if it still holds the given value: releasing our own lock, or dropping
/// the token only if it is still the one that failed.
static COMPARE_AND_DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        ",
    )
});

/// Deletes the token only if its value part is the failed token (the stored value is
/// `fetched_at_ms:token`).
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if v and string.sub(v, string.find(v, ':', 1, true) + 1) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
    )
});

/// Records a failed fetch by Redis' clock; kept 10 minutes past its back-off for the streak.
static STORE_FAILURE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = t[1] * 1000 + math.floor(t[2] / 1000)
        local backoff = tonumber(ARGV[2])
        redis.call('SET', KEYS[1], ARGV[1] .. ':' .. (now + backoff) .. ':' .. ARGV[3], 'PX', backoff + 600000)
        return 1
        ",
    )
});

/// What `read` finds.
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
        let (token, token_ttl, failure, now_ms, refusal, refusal_ttl): Reply = READ
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
        let fetched_at: i64 = STORE
            .key(keys.token(appid))
            .key(keys.token_failure(appid))
            .key(keys.token_refused(appid))
            .arg(token.expose_secret())
            .arg(lifetime.as_millis().max(1) as u64)
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
            .arg(for_.as_millis().max(1) as u64)
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
        let (granted, retry_ms, used): (i64, i64, u64) = FORCE_GATE
            .key(keys.token_forced(appid))
            .key(keys.token_forced_day(appid, day))
            .arg(interval.as_millis().max(1) as u64)
            .arg(budget)
            .arg(day_left.as_millis().max(1) as u64)
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
            .arg(lease.as_millis() as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Releases the refresh lock if we still hold it.
    pub async fn unlock_token(&self, appid: &str, owner: &str) -> Result<(), StoreError> {
        let _: i64 =
            COMPARE_AND_DELETE.key(self.keys().token_lock(appid)).arg(owner).invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Drops the cached token only if it is still `failed`; returns whether it was dropped.
    pub async fn invalidate_token(&self, appid: &str, failed: &SecretString) -> Result<bool, StoreError> {
        let n: i64 =
            INVALIDATE.key(self.keys().token(appid)).arg(failed.expose_secret()).invoke_async(&mut self.conn()).await?;
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
        let _: () = STORE_FAILURE
            .key(self.keys().token_failure(appid))
            .arg(streak)
            .arg(backoff.as_millis() as u64)
            .arg(message)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }
}
