//! wxpush-worker: consumes notification jobs from RabbitMQ and sends WeChat template messages.
//! All the work is in `wxpush::worker`; this reads the configuration and wires logs, metrics,
//! the admin port and the shutdown signal to it.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use secrecy::ExposeSecret;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};
use wxpush::{
    backlog,
    config::Config,
    health,
    telemetry::{self, Program},
    tls, worker,
};

#[derive(Parser)]
#[command(version, about = "Consumes notification jobs from RabbitMQ and sends WeChat template messages")]
struct Args {
    /// Configuration file (see config/default.toml); WXPUSH_* variables override it.
    #[arg(long, env = "WXPUSH_CONFIG")]
    config: Option<PathBuf>,
}

/// How long the admin server and the metrics upkeep get to stop once the worker is done.
const TASKS_STOP_WAIT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(Program::Worker);
    let config = Config::load(args.config.as_deref()).context("cannot load the configuration")?;
    tls::install(&config.tls).context("cannot use the TLS settings")?;
    if config.accounts.is_empty() {
        anyhow::bail!(
            "no account configured: set WXPUSH_APPID and WXPUSH_APPSECRET, or add [[accounts]] to the config file"
        );
    }
    for a in config.accounts.iter().filter(|a| a.secret.expose_secret().is_empty()) {
        warn!(account = %a.name, "account has no secret (WXPUSH_APPSECRET or `secret`): its jobs will wait for a token");
    }
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    telemetry::cancel_on_signal(&tasks, shutdown.clone());
    let health = health::Health::new();
    let metrics = telemetry::install_metrics();
    if let Some(handle) = &metrics {
        tasks.spawn(telemetry::metrics_upkeep(handle.clone(), shutdown.clone()));
    }
    telemetry::catalog::register_worker_series(&config);
    let admin = health::router(health.clone(), metrics);
    let (admin_addr, admin_stop) = (config.metrics_listen, shutdown.clone());
    tasks.spawn(async move {
        if let Err(error) = health::serve(admin_addr, admin, admin_stop).await {
            warn!(addr = %admin_addr, %error, "cannot serve /metrics, /healthz and /readyz (WXPUSH_METRICS_LISTEN)");
        }
    });
    info!(
        accounts = config.accounts.len(),
        queue = %config.jobs_queue,
        version = telemetry::catalog::VERSION,
        git_sha = telemetry::catalog::GIT_SHA,
        "wxpush-worker starting"
    );
    let backlog = backlog::spawn(&config, shutdown.clone());
    worker::run(config, shutdown.clone(), health).await.context("the worker could not start")?;
    let _ = backlog.await;
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(TASKS_STOP_WAIT, tasks.wait()).await.is_err() {
        warn!("the admin server did not stop in time");
    }
    Ok(())
}
