//! wxpush-webhook: the server URL WeChat pushes events to. All the work is in
//! `wxpush::webhook`; this reads the configuration, wires logs and metrics to it, and stops on
//! SIGTERM/SIGINT (finishing the pushes in flight).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use wxpush::{
    config::Config,
    store::Redis,
    telemetry::{self, Program},
    tls,
    webhook::{self, Listeners, Webhook, WebhookSettings, serve_with},
};

#[derive(Parser)]
#[command(version, about = "Receives WeChat event pushes and publishes delivery events to RabbitMQ")]
struct Args {
    /// Configuration file (see config/default.toml); WXPUSH_* variables override it.
    #[arg(long, env = "WXPUSH_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(Program::Webhook);
    let config = Config::load(args.config.as_deref()).context("cannot load the configuration")?;
    tls::install(&config.tls).context("cannot use the TLS settings")?;

    let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
    let settings = WebhookSettings::from_config(&config);
    let mut webhook = Webhook::new(&config, settings, webhook::broker(&config), redis)?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    telemetry::cancel_on_signal(&tasks, shutdown.clone());
    if let Some(handle) = telemetry::install_metrics() {
        tasks.spawn(telemetry::metrics_upkeep(handle.clone(), shutdown.clone()));
        webhook = webhook.with_metrics(Arc::new(move || telemetry::render_metrics(&handle)));
    }

    let listeners = Listeners::bind(&config).await?;
    serve_with(webhook, listeners, shutdown.clone().cancelled_owned()).await?;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}
