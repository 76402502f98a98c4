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
    /// When it was fetched (Unix ms), for the token-age metric.
    pub fetched_at_ms: i64,
}

/// A failed fetch remembered by the pool, so that nobody fetches again before `remaining`.
#[derive(Debug, Clone)]
pub struct StoredFailure {
    pub message: String,
    pub remaining: Duration,
    /// How many fetches in a row have failed (drives the doubling back-off).
    pub streak: u32,
}

/// Reads the token and the failure mark in one round trip.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]),
                t[1] * 1000 + math.floor(t[2] / 1000)}
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
}

impl Redis {
    /// The cached token and failure mark of `appid`.
    pub async fn read_token(&self, appid: &str) -> Result<Snapshot, StoreError> {
        let keys = self.keys();
        let (token, token_ttl, failure, now_ms): (Option<String>, i64, Option<String>, i64) =
            READ.key(keys.token(appid)).key(keys.token_failure(appid)).invoke_async(&mut self.conn()).await?;
        let token = match token {
            Some(raw) if token_ttl > 0 => {
                let (at, value) = raw.split_once(':').ok_or_else(|| StoreError::Corrupt {
                    key: keys.token(appid),
                    what: "no fetch time before the token".into(),
                })?;
                Some(StoredToken {
                    value: SecretString::from(value),
                    remaining: Duration::from_millis(token_ttl as u64),
                    fetched_at_ms: at.parse().unwrap_or(0),
                })
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
        Ok(Snapshot { token, failure })
    }

    /// Stores a freshly fetched token for `lifetime`, and clears any failure mark.
    pub async fn store_token(&self, appid: &str, token: &SecretString, lifetime: Duration) -> Result<(), StoreError> {
        let keys = self.keys();
        let value = format!("{}:{}", chrono::Utc::now().timestamp_millis(), token.expose_secret());
        let ms = lifetime.as_millis().max(1) as u64;
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(keys.token(appid))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .ignore()
            .cmd("DEL")
            .arg(keys.token_failure(appid))
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
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
