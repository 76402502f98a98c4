//! Redis: the pool's shared memory. The access token ([`token`]), the idempotency ledger and
//! the msgid records ([`ledger`]) live here, under `WXPUSH_REDIS_PREFIX`.
//!
//! Keys that one script touches together share a hash tag (`{appid}`), so every script runs on
//! Redis Cluster too. A job's record (`prefix:job:<id>`) is only ever used alone; the one
//! pipeline that spans slots (a job's record with its msgid record) is split on a cluster.

pub mod conn;
pub mod ledger;
pub mod limits;
pub mod token;

pub use conn::Conn;

/// A failure to reach or use Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis URL {0:?} is not valid (WXPUSH_REDIS_URL): {1}")]
    Url(String, #[source] redis::RedisError),
    #[error("Redis is unavailable: {0} (is it up and WXPUSH_REDIS_URL right?)")]
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
}

/// Every key name the programs use, in one place.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The cached access token of an appid.
    pub fn token(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token", self.prefix)
    }

    /// The pool-wide lock held by whoever is fetching a new token.
    pub fn token_lock(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:lock", self.prefix)
    }

    /// Set after a failed token fetch: the pool waits this long before fetching again.
    pub fn token_failure(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:failure", self.prefix)
    }

    /// Set while WeChat refuses a token and no new one can be had: its fingerprint and why.
    pub fn token_refused(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:refused", self.prefix)
    }

    /// Lives one forced-refresh interval after each forced refresh, pool-wide.
    pub fn token_forced(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:forced", self.prefix)
    }

    /// Forced refreshes counted on one Beijing day (`yyyymmdd`).
    pub fn token_forced_day(&self, appid: &str, day: &str) -> String {
        format!("{}:{{{appid}}}:token:forced:{day}", self.prefix)
    }

    /// A job's idempotency record: in progress (a lease) or done (its result).
    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.prefix)
    }

    /// msgid → job_id, for the webhook to tie receipts to jobs.
    pub fn msgid(&self, appid: &str, msgid: u64) -> String {
        format!("{}:{{{appid}}}:msgid:{msgid}", self.prefix)
    }

    /// The rate limiter's state of an appid.
    pub fn rate(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:rate", self.prefix)
    }

    /// Sends counted on one Beijing day (`yyyymmdd`).
    pub fn quota(&self, appid: &str, day: &str) -> String {
        format!("{}:{{{appid}}}:quota:{day}", self.prefix)
    }

    /// Set while an account is paused (45011, 45009, quota spent): until when, in Unix ms.
    pub fn pause(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:pause", self.prefix)
    }

    /// Webhook de-duplication of one pushed event.
    pub fn push_seen(&self, appid: &str, event_key: &str) -> String {
        format!("{}:{{{appid}}}:push:{event_key}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_account_share_a_hash_tag() {
        let k = Keys::new("wxpush");
        assert_eq!(k.token("wx1"), "wxpush:{wx1}:token");
        assert_eq!(k.token_lock("wx1"), "wxpush:{wx1}:token:lock");
        assert_eq!(k.msgid("wx1", 42), "wxpush:{wx1}:msgid:42");
        assert_eq!(k.job("order-1"), "wxpush:job:order-1");
        for key in
            [k.token("wx1"), k.token_lock("wx1"), k.token_failure("wx1"), k.rate("wx1"), k.quota("wx1", "20261129")]
        {
            assert!(key.contains("{wx1}"), "{key}");
        }
    }
}
