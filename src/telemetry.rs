//! What every program sets up the same way: logs ([`init`]), metrics ([`install_metrics`]),
//! the shutdown signal ([`shutdown_signal`]), and how an error is shown whole ([`chain`]).
//!
//! Logs: readable text by default, one JSON object per line with `WXPUSH_LOG_FORMAT=json`
//! ([`json`]: typed values, a job's `job_id` and `account` at the top level), filtered by
//! `RUST_LOG`. Colour only when the output is a terminal (and `NO_COLOR` is unset).
//!
//! Metrics: [`catalog`] describes every metric the programs emit (the `# HELP` lines), exports
//! `wxpush_build_info` and the process metrics, and registers the per-account counters at zero.

use std::{io::IsTerminal, sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing_subscriber::{EnvFilter, fmt, fmt::format::JsonFields};

pub mod catalog;
pub mod json;

/// Which program is logging: services log to stdout at `info`; the operations tool keeps
/// stdout for its output, logs warnings only to stderr, and silences lapin (it logs the expected
/// "no such queue" answers to existence checks as errors, and every error it raises reaches the
/// user through the tool's own messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    Worker,
    Webhook,
    Sandbox,
    Ctl,
}

impl Program {
    fn default_filter(self) -> &'static str {
        match self {
            Program::Ctl => "warn,lapin=off",
            _ => "info",
        }
    }

    fn to_stderr(self) -> bool {
        self == Program::Ctl
    }
}

/// The log format `WXPUSH_LOG_FORMAT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `json` (any case) is JSON; anything else, or nothing, is text.
    pub fn from_env_value(value: Option<&str>) -> LogFormat {
        match value {
            Some(v) if v.trim().eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// Whether to colour: only on a terminal, and not when `NO_COLOR` is set (no-color.org).
fn use_colour(terminal: bool, no_color: Option<&str>) -> bool {
    terminal && no_color.is_none_or(str::is_empty)
}

/// Sets up logging for `program` (once per process; a second call changes nothing). Every
/// program, `wxpush-ctl` included, calls this first thing in `main`.
pub fn init(program: Program) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(program.default_filter()));
    let format = LogFormat::from_env_value(std::env::var("WXPUSH_LOG_FORMAT").ok().as_deref());
    let terminal = if program.to_stderr() { std::io::stderr().is_terminal() } else { std::io::stdout().is_terminal() };
    let colour = use_colour(terminal, std::env::var("NO_COLOR").ok().as_deref());
    let writer = move || -> Box<dyn std::io::Write> {
        if program.to_stderr() { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) }
    };
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    // A second init (tests) is not an error worth stopping for.
    let _ = match format {
        LogFormat::Json => {
            builder.with_ansi(false).fmt_fields(JsonFields::new()).event_format(json::FlatJson).try_init()
        }
        LogFormat::Text => builder.with_target(false).with_ansi(colour).try_init(),
    };
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C): the one shutdown signal of every program.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stop with Ctrl-C");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT, from a task on `tracker` that also ends when
/// `shutdown` is cancelled otherwise.
pub fn cancel_on_signal(tracker: &TaskTracker, shutdown: CancellationToken) {
    tracker.spawn(async move {
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutdown requested");
                shutdown.cancel();
            }
            _ = shutdown.cancelled() => {}
        }
    });
}

/// Installs the process-wide Prometheus recorder, the same for every program: every metric
/// described, histograms with buckets (so dashboards can aggregate quantiles across replicas),
/// `wxpush_build_info` and the process metrics. Later calls return the same handle; `None` when
/// another recorder was installed first. Serve it with [`render_metrics`], and run
/// [`metrics_upkeep`] beside it.
pub fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("wxpush_send_seconds".into()), catalog::SEND_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Prefix("wxpush_webhook_".into()), crate::webhook::metrics::BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            catalog::describe_metrics();
            crate::webhook::metrics::describe();
            Some(handle)
        })
        .clone()
}

/// The metrics page, with the process metrics read just before.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    catalog::collect_process_metrics();
    handle.render()
}

/// Folds the recorded histogram samples into their buckets every second until `stop`: the
/// recorder does not by itself, and samples would pile up between scrapes (forever when
/// nothing scrapes).
pub async fn metrics_upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => handle.run_upkeep(),
        }
    }
}

/// An error and each of its causes once, on one line: `cannot load the configuration: cannot
/// read config file x.toml: No such file or directory (os error 2)`. Errors never repeat their
/// source in their own message, so this is how to show one whole (anyhow's `{:#}` does the same).
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_asked_for_by_name_only() {
        assert_eq!(LogFormat::from_env_value(Some("json")), LogFormat::Json);
        assert_eq!(LogFormat::from_env_value(Some(" JSON ")), LogFormat::Json);
        assert_eq!(LogFormat::from_env_value(Some("text")), LogFormat::Text);
        assert_eq!(LogFormat::from_env_value(None), LogFormat::Text);
    }

    #[test]
    fn a_chain_shows_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot load the configuration")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(chain(&e).to_string(), "cannot load the configuration: disk on fire");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("")));
        assert!(!use_colour(true, Some("1")));
        assert!(!use_colour(false, None), "a file or a pipe gets no escape codes");
    }
}
