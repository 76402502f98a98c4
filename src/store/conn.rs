//! The connection to Redis: one server, or the nodes of a Redis Cluster, over TLS for
//! `rediss://` URLs with the process's TLS setting ([`crate::tls`]).

use std::time::Duration;

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use super::StoreError;
use crate::tls::Tls;

/// Connects to `url`: one `redis://` or `rediss://` URL, or several separated by commas for a
/// Redis Cluster. A single server is connected lazily.
pub async fn open(url: &str) -> Result<Conn, StoreError> {
    open_with_tls(url, &crate::tls::current()).await
}

/// [`open`] with `tls` instead of the process's TLS setting.
pub async fn open_with_tls(url: &str, tls: &Tls) -> Result<Conn, StoreError> {
    let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let conn = if urls.len() > 1 {
        let mut builder = ClusterClient::builder(urls.iter().map(|u| u.to_string()))
            .response_timeout(Duration::from_secs(2))
            .connection_timeout(Duration::from_secs(2));
        if urls.iter().all(|u| is_tls(u)) {
            builder = builder.certs(tls.redis());
        }
        let client = builder.build().map_err(|e| StoreError::Url(url.to_owned(), e))?;
        Conn::Cluster(client.get_async_connection().await?)
    } else {
        let client =
            if is_tls(url) { redis::Client::build_with_tls(url, tls.redis()) } else { redis::Client::open(url) }
                .map_err(|e| StoreError::Url(url.to_owned(), e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?)
    };
    Ok(conn)
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

fn is_tls(url: &str) -> bool {
    url.get(..9).is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"))
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
