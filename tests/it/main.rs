//! The integration tests: one binary, one module per area, one harness. They run against the
//! real RabbitMQ and Redis that `harness::services` names (local by default), each test in a
//! namespace of its own, and the real programs where a test needs a process.

mod harness;
mod wx;

mod acks;
mod ctl;
mod deploy;
mod docs;
mod edges;
mod failover;
mod limits;
mod ops;
mod outage;
mod proxy;
mod reliability;
mod sandbox;
mod scale;
mod scripts;
mod subscribe;
mod subscribe_sandbox;
mod subscribe_webhook;
mod tls;
mod webhook;
mod worker;
