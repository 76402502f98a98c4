//! wxpush: WeChat template messages from a RabbitMQ queue, for a pool of workers.
//!
//! A job's life, start to end, is in [`worker::pipeline`]: a delivery from the jobs queue is parsed
//! ([`domain::job`]), checked against the idempotency ledger ([`store::ledger`]), sent with the
//! pool's shared access token ([`token`], [`wechat`]), judged by the errcode table
//! ([`domain::errcode`]), and ends as a confirmed result on the results exchange ([`amqp`]) before
//! the job is acknowledged. [`worker`] runs many of those at once and survives outages.
//!
//! The domain sits in the middle and touches no network; the adapters are at the edges:
//! RabbitMQ in [`amqp`], Redis in [`store`], WeChat's HTTP API in [`wechat`], the HTTP servers in
//! [`webhook`], [`sandbox`] and [`health`].

pub mod acks;
pub mod amqp;
pub mod backlog;
pub mod backoff;
pub mod config;
pub mod ctl;
pub mod domain;
pub mod health;
pub mod sandbox;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhook;
pub mod wechat;
pub mod worker;
