//! wxpush-worker: consumes notification jobs from RabbitMQ and sends WeChat template messages.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
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
    let health = health::Health::new();
    let admin = health::router(health.clone(), health::install_metrics());
    telemetry::catalog::register_worker_series(&config);
    let admin_addr = config.metrics_listen;
    let admin_cancel = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = health::serve(admin_addr, admin, admin_cancel).await {
            warn!(addr = %admin_addr, error = %e, "cannot serve /metrics, /healthz and /readyz (WXPUSH_METRICS_LISTEN)");
        }
    });
    let signal = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        info!("shutdown requested");
        signal.cancel();
    });
    info!(
        accounts = config.accounts.len(),
        queue = %config.jobs_queue,
        version = telemetry::catalog::VERSION,
        git_sha = telemetry::catalog::GIT_SHA,
        "wxpush-worker starting"
    );
    let backlog = backlog::spawn(&config, shutdown.clone());
    worker::run(config, shutdown, health).await.context("the worker could not start")?;
    let _ = backlog.await;
    Ok(())
}
