//! `wxpush-ctl`, the operators' tool, as library functions: the binary only parses arguments and
//! prints what these return, so every command can be driven (and tested) in-process.
//!
//! - [`check`]: is the configuration valid, does WeChat grant each account a token, are RabbitMQ
//!   and Redis reachable;
//! - [`publish`]: jobs from a JSONL stream to the jobs queue, optionally waiting for their results;
//! - [`results`]: results as they go out, or those no binding took (the unrouted queue);
//! - [`dead`]: list, replay, delete and purge the dead-letter queue, losing nothing not asked for;
//! - [`status`]: tokens, quotas, pauses and queue lengths (ready and unacknowledged);
//! - [`demo`]: the README quick start in one process, in a namespace of its own.
//!
//! Nothing here prints a secret: app secrets, callback tokens, AES keys and access tokens are
//! only ever reported as "set" or "not set".

pub mod cancel;
pub mod check;
pub mod dead;
pub mod demo;
pub mod management;
pub mod progress;
pub mod publish;
pub mod results;
pub mod status;

mod broker;

use std::time::Duration;

use crate::{amqp::AmqpError, store::StoreError, worker::WorkerError};

pub use broker::{QueueInfo, job_id_of};

/// How long one RabbitMQ or Redis round trip may take before the tool gives up on it.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a command could not do its work. Each message says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("RabbitMQ: cannot {action} (is the broker up and WXPUSH_AMQP_URL right?)")]
    Broker { action: String, source: lapin::Error },
    #[error(
        "RabbitMQ did not answer within {secs} s when asked to {action} (is the broker up and WXPUSH_AMQP_URL right?)"
    )]
    BrokerTimeout { action: String, secs: u64 },
    #[error(transparent)]
    Redis(#[from] StoreError),
    #[error("Redis did not answer within {secs} s (is it up and WXPUSH_REDIS_URL right?)")]
    RedisTimeout { secs: u64 },
    #[error("cannot read {name}")]
    Input { name: String, source: std::io::Error },
    #[error("{service} is not reachable at {url}: {detail}. Start it ({start}), or set {var} to where it runs")]
    NotReachable { service: &'static str, url: String, detail: String, start: &'static str, var: &'static str },
    #[error("cannot start the WeChat sandbox")]
    Sandbox(#[source] std::io::Error),
    #[error("the demo worker could not start")]
    Worker(#[from] WorkerError),
    #[error("stopped receiving results: the channel closed (did RabbitMQ go away?)")]
    ResultsClosed,
    #[error(
        "the unrouted results queue {queue} does not exist yet: start a worker once, it declares it (with the \
         results exchange's alternate exchange of the same name)"
    )]
    NoUnroutedQueue { queue: String },
    #[error("the results exchange {exchange} does not exist yet: start a worker once, it declares it")]
    NoResultsExchange { exchange: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Demo(String),
}

impl CtlError {
    pub(crate) fn broker(action: impl Into<String>, source: lapin::Error) -> Self {
        CtlError::Broker { action: action.into(), source }
    }
}

/// Replaces every occurrence of a non-empty secret in `text` with `***`: a last guard for text
/// that comes from outside (an error message stored in Redis, a pause reason).
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "***");
    }
    out
}

/// `12.3 s`, `4 min 05 s`, `1 h 59 min`: short and readable.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1} s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{} min {:02} s", secs / 60, secs % 60)
    } else {
        format!("{} h {:02} min", secs / 3600, (secs % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4 min 05 s");
        assert_eq!(human_duration(Duration::from_secs(7140)), "1 h 59 min");
    }

    #[test]
    fn secrets_are_scrubbed() {
        assert_eq!(scrub("bad secret s3cr3t-value here", &["s3cr3t-value", ""]), "bad secret *** here");
    }
}
