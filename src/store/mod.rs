//! Redis: the pool's shared memory. The access token ([`token`]), the idempotency ledger and
//! the msgid records ([`ledger`]) live here, under `WXPUSH_REDIS_PREFIX`.
//!
//! Keys that one script touches together share a hash tag (`{appid}`), so every script runs on
//! Redis Cluster too. A job's record (`prefix:job:<id>`) is only ever used alone; the one
//! pipeline that spans slots (a job's record with its msgid record) is split on a cluster.

pub mod ledger;
pub mod limits;
pub mod token;

use std::time::Duration;

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

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

/// A connection to a single Redis or to a Redis Cluster, cheap to clone and shared by every
/// task. It reconnects by itself; a command that meets a broken connection fails, and the
/// caller decides whether to wait and retry.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => Box::pin(async move {
                match c.req_packed_commands(pipeline, offset, count).await {
                    // Refused by the client before anything was sent: the pipeline's keys live
                    // in different slots (e.g. a job record and a msgid record).
                    Err(e) if is_cross_slot(&e) && !pipeline.is_transaction() => {
                        across_slots(c, pipeline, offset, count).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn is_cross_slot(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot)
}

/// Runs a pipeline whose keys span several cluster slots as single commands, all at once (one
/// round trip's latency, each command on its own node). Not atomic, like any pipeline; the
/// first error fails the whole.
async fn across_slots(
    conn: &ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> redis::RedisResult<Vec<Value>> {
    let replies = futures_util::future::join_all(pipeline.cmd_iter().map(|cmd| {
        let mut conn = conn.clone();
        async move { conn.req_packed_command(cmd).await }
    }))
    .await;
    let values = replies.into_iter().collect::<redis::RedisResult<Vec<Value>>>()?;
    Ok(values.into_iter().skip(offset).take(count).collect())
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
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let conn = if urls.len() > 1 {
            let client = ClusterClient::builder(urls.iter().map(|u| u.to_string()))
                .response_timeout(Duration::from_secs(2))
                .connection_timeout(Duration::from_secs(2))
                .build()
                .map_err(|e| StoreError::Url(url.to_owned(), e))?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(url).map_err(|e| StoreError::Url(url.to_owned(), e))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?)
        };
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
