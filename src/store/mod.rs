//! Redis: the pool's shared memory, and the one adapter that knows its keys ([`keys`]), scripts
//! ([`scripts`]) and protocols: the access token ([`token`]), the idempotency ledger and the
//! msgid records ([`ledger`]), the send budget and pauses ([`limits`]), and the webhook's
//! de-duplication ([`dedupe`]), all under `WXPUSH_REDIS_PREFIX`.
//!
//! Keys that one script touches together share a hash tag (`{appid}`), so every script runs on
//! Redis Cluster too. A job's record (`prefix:job:<id>`) is only ever used alone; the one
//! pipeline that spans slots (a job's record with its msgid record) is split on a cluster.

pub mod conn;
pub mod dedupe;
pub mod keys;
pub mod ledger;
pub mod limits;
mod scripts;
pub mod token;

use std::time::Duration;

pub use conn::Conn;
pub use keys::Keys;

/// A failure to reach or use Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis URL {0:?} is not valid (WXPUSH_REDIS_URL)")]
    Url(String, #[source] redis::RedisError),
    #[error("Redis is unavailable (is it up and WXPUSH_REDIS_URL right?)")]
    Redis(#[from] redis::RedisError),
    #[error("Redis holds an unexpected value under {key}: {what}")]
    Corrupt { key: String, what: String },
}

/// The Redis handle the programs share: a connection and the key layout.
#[derive(Clone)]
pub struct Redis {
    conn: Conn,
    keys: Keys,
}

impl Redis {
    /// Connects to `url`: one `redis://` or `rediss://` URL, or several separated by commas for
    /// a Redis Cluster. A single server is connected lazily, so a program can start while Redis
    /// is down and its work waits until Redis is back.
    pub async fn connect(url: &str, prefix: &str) -> Result<Redis, StoreError> {
        let conn = conn::open(url).await?;
        Ok(Redis { conn, keys: Keys::new(prefix) })
    }

    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// `PING`, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Deletes every key under the prefix (SCAN, not KEYS, so a big Redis is not blocked): for
    /// a namespace of its own, such as the demo's.
    pub async fn delete_all(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let pattern = self.keys.all();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            for key in &keys {
                // One key at a time: keys of different hash tags may live on different nodes.
                let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Deletes `key` only if it still holds `value`; true when deleted.
    async fn compare_and_delete(&self, key: &str, value: &str) -> Result<bool, StoreError> {
        let deleted: i64 = scripts::COMPARE_AND_DELETE.key(key).arg(value).invoke_async(&mut self.conn()).await?;
        Ok(deleted == 1)
    }
}

/// `d` as a TTL for `PX`: whole milliseconds, at least 1 (Redis refuses 0).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
