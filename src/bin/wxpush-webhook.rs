//! wxpush-webhook: the server URL WeChat pushes events to. All the work is in
//! `wxpush::webhook`; this only reads the configuration, sets up logging and metrics, and stops
//! on SIGTERM/SIGINT (finishing the pushes in flight).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use tracing::info;
use wxpush::{
    config::Config,
    store::Redis,
    telemetry,
    webhook::{self, Listeners, Webhook, WebhookSettings, metrics, serve_with},
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
    telemetry::init(telemetry::Program::Webhook);
    let config = Config::load(args.config.as_deref()).context("cannot load the configuration")?;
    wxpush::tls::install(&config.tls).context("cannot use the TLS settings")?;
    let settings = WebhookSettings::from_config(&config)?;

    let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
    let mut webhook = Webhook::new(&config, settings, webhook::broker(&config), redis)?;
    if let Some(prometheus) = metrics::install() {
        webhook = webhook.with_metrics(Arc::new(move || prometheus.render()));
    }

    let listeners = Listeners::bind(&config).await?;
    let shutdown = async {
        telemetry::shutdown_signal().await;
        info!("shutdown requested: finishing pushes in flight");
    };
    serve_with(webhook, listeners, shutdown).await?;
    Ok(())
}
