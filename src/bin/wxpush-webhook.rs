//! wxpush-webhook: the server URL WeChat pushes events to. All the work is in
//! `wxpush::webhook`; this only reads the configuration, sets up logging and metrics, and stops
//! on SIGTERM/SIGINT.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use wxpush::{
    amqp::Broker,
    config::Config,
    store::Redis,
    webhook::{Webhook, WebhookSettings, serve_with},
};

#[derive(Parser)]
#[command(version, about = "Receives WeChat event pushes and publishes delivery events to RabbitMQ")]
struct Args {
    /// TOML configuration file (defaults and WXPUSH_* environment variables when absent).
    #[arg(long, env = "WXPUSH_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing();
    let config = Config::load(args.config.as_deref())?;
    let settings = WebhookSettings::from_config(&config)?;

    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let broker = Broker::new(&config.amqp_url, "wxpush-webhook");
    let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
    let webhook = Webhook::new(&config, settings, broker, redis)?.with_metrics(Arc::new(move || prometheus.render()));

    let listener = tokio::net::TcpListener::bind(config.webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {} (WXPUSH_WEBHOOK_LISTEN)", config.webhook_listen))?;
    serve_with(webhook, listener, shutdown_signal()).await?;
    Ok(())
}

/// `RUST_LOG` filters (default `info`); `WXPUSH_LOG_FORMAT=json` logs one JSON object a line.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("WXPUSH_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing pushes in flight");
}
