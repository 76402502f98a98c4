//! wxpush: WeChat template and subscription messages from a RabbitMQ queue, for a pool of
//! workers, with a receipt webhook, a local WeChat stand-in and an operations CLI.
//!
//! Start with a job's life, on one page: [`worker::pipeline`]. A delivery is read
//! ([`domain::job`]), claimed in the idempotency ledger ([`store::ledger`]), sent with the pool's
//! shared token ([`worker::tokens`], [`wechat`]) in a pool-wide rate slot
//! ([`worker::admission`]), judged by [`domain::outcome::decide`] over the errcode table
//! ([`domain::errcode::TABLE`]), and settled ([`worker::settle`]): its result confirmed on the
//! results exchange before the delivery is acknowledged.
//!
//! The shape:
//! - [`domain`]: plain data and pure functions, no I/O: jobs, subscription data rules, the
//!   errcode table, `decide`, result and receipt formats, crypto, the Beijing calendar.
//! - Adapters, one per system: [`amqp`] (RabbitMQ: nodes, publisher, topology, headers),
//!   [`store`] (Redis: every key, script and protocol), [`wechat`] (WeChat's HTTP API).
//! - Programs: [`worker`] (the pipeline, sessions, tokens, pauses), [`webhook`] (pushes in,
//!   receipts out), `sandbox` (WeChat's stand-in), `ctl` (operations); [`telemetry`] (logs,
//!   metrics, shutdown) and [`config`] serve all four; [`backoff`] is every retry loop's
//!   schedule.
//!
//! The `sandbox` and `ctl` modules are cargo features (on by default): a worker or webhook
//! build can leave them out.

pub mod amqp;
pub mod backlog;
pub mod backoff;
pub mod config;
#[cfg(feature = "ctl")]
pub mod ctl;
pub mod domain;
pub mod health;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhook;
pub mod wechat;
pub mod worker;
