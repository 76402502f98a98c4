//! Connecting to RabbitMQ: one broker, or the nodes of a cluster tried in turn, over TLS for
//! `amqps://` URLs with the process's TLS setting ([`crate::tls`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::{Connection, ConnectionProperties, types::LongString};

use super::AmqpError;
use crate::tls::Tls;

/// How long one node may take to accept a connection before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL with its password hidden, for logs and errors (each of them, for a list of nodes).
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(|u| redact_one(u.trim())).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparseable AMQP URL)".into(),
    }
}

/// Opens a connection to the first node of `urls` (one URL, or several separated by commas)
/// that answers, naming it so operators can tell the pool's connections apart.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, AmqpError> {
    Nodes::new(urls).connect(name).await
}

/// Opens a connection to one node.
async fn connect_one(url: &str, name: &str, tls: &Tls) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let runtime =
        lapin::runtime::default_runtime().map_err(|source| AmqpError::Connect { url: redact_url(url), source })?;
    let connecting = Connection::connect_with_config(url, props, tls.amqp(), runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected.map_err(|source| AmqpError::Connect { url: redact_url(url), source }),
        Err(_) => Err(AmqpError::ConnectTimeout { url: redact_url(url), secs: CONNECT_TIMEOUT.as_secs() }),
    }
}

/// The largest AMQP frame every connection asks for, unless its URL sets `frame_max`. lapin
/// keeps 32 frames of buffer each way per connection: at RabbitMQ's default of 128 KiB that is
/// 8 MiB a connection, at 16 KiB 1 MiB. Jobs and results are far smaller than a frame.
pub const FRAME_MAX: u32 = 16 * 1024;

/// `url` with `frame_max=`[`FRAME_MAX`] added to its query, unless it has one.
fn with_frame_max(url: &str) -> String {
    if url.contains("frame_max=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}frame_max={FRAME_MAX}")
}

/// The nodes of `WXPUSH_AMQP_URL`: one broker, or several nodes of a cluster. A connection goes
/// to the first that answers; the next connection (after this one broke) starts with the node
/// after it, so a node that went away is tried last and the pool spreads over the nodes.
#[derive(Debug)]
pub struct Nodes {
    urls: Vec<String>,
    /// Index of the node the next connection tries first.
    next: AtomicUsize,
    /// `None`: the process's TLS setting at each connect ([`crate::tls::current`]).
    tls: Option<Arc<Tls>>,
}

impl Nodes {
    pub fn new(list: &str) -> Nodes {
        let mut urls: Vec<String> =
            list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(with_frame_max).collect();
        if urls.is_empty() {
            // Config validation refuses an empty list; keep the error at connect time otherwise.
            urls.push(list.to_owned());
        }
        Nodes { urls, next: AtomicUsize::new(0), tls: None }
    }

    /// Uses `tls` instead of the process's TLS setting.
    pub fn with_tls(mut self, tls: Arc<Tls>) -> Nodes {
        self.tls = Some(tls);
        self
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The node indexes in the order the next connection tries them.
    fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let n = self.urls.len();
        let start = self.next.load(Ordering::Relaxed) % n;
        (0..n).map(move |i| (start + i) % n)
    }

    /// Connects to the first node that answers. Each failure is logged; if every node fails,
    /// the last node's error is returned.
    pub async fn connect(&self, name: &str) -> Result<Connection, AmqpError> {
        let mut last = None;
        let tls = self.tls.clone().unwrap_or_else(crate::tls::current);
        for i in self.order() {
            match connect_one(&self.urls[i], name, &tls).await {
                Ok(connection) => {
                    self.next.store((i + 1) % self.urls.len(), Ordering::Relaxed);
                    if self.urls.len() > 1 {
                        tracing::info!(node = %redact_url(&self.urls[i]), "connected to RabbitMQ");
                    }
                    return Ok(connection);
                }
                Err(e) => {
                    if self.urls.len() > 1 {
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            "RabbitMQ node unavailable; trying the next"
                        );
                    }
                    last = Some(e);
                }
            }
        }
        // Start the next round elsewhere, so that a node that hangs is not always tried first.
        self.next.fetch_add(1, Ordering::Relaxed);
        Err(last.unwrap_or_else(|| AmqpError::ConnectTimeout { url: "(no URL)".into(), secs: 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_asks_for_small_frames_unless_the_url_says_otherwise() {
        assert_eq!(with_frame_max("amqp://u:p@h:5672/%2f"), "amqp://u:p@h:5672/%2f?frame_max=16384");
        assert_eq!(with_frame_max("amqps://h/%2f?heartbeat=30"), "amqps://h/%2f?heartbeat=30&frame_max=16384");
        assert_eq!(with_frame_max("amqp://h?frame_max=131072"), "amqp://h?frame_max=131072");
        let nodes = Nodes::new("amqp://a, amqp://b?frame_max=4096");
        assert_eq!(nodes.urls, ["amqp://a?frame_max=16384", "amqp://b?frame_max=4096"]);
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(
            redact_url("amqp://u:p@a:5672/%2f, amqp://u:p@b:5672/%2f"),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
    }

    #[test]
    fn each_connection_starts_with_the_node_after_the_last_one_used() {
        let b = Nodes::new("amqp://a, amqp://b ,amqp://c,");
        assert_eq!(b.len(), 3);
        assert_eq!(b.order().collect::<Vec<_>>(), [0, 1, 2]);
        // Connected to b: when that connection breaks, c is tried first and b last.
        b.next.store(2, Ordering::Relaxed);
        assert_eq!(b.order().collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(Nodes::new("amqp://only").order().collect::<Vec<_>>(), [0]);
    }
}
