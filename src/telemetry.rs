//! Logs and metrics set up the same way in every program, and the shutdown signal.
//!
//! Logs: readable text by default, one JSON object per line with `WXPUSH_LOG_FORMAT=json`
//! ([`json`]: typed values, a job's `job_id` and `account` at the top level), filtered by
//! `RUST_LOG`. Colour only when the output is a terminal (and `NO_COLOR` is unset).
//!
//! Metrics: [`catalog`] describes every metric the programs emit (the `# HELP` lines), exports
//! `wxpush_build_info` and the process metrics, and registers the per-account counters at zero.

use std::io::IsTerminal;

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
/// program calls this first thing in `main`.
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

/// The services' logging ([`init`] for the worker); kept for callers not yet naming their program.
pub fn init_logging() {
    init(Program::Worker);
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
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
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("")));
        assert!(!use_colour(true, Some("1")));
        assert!(!use_colour(false, None), "a file or a pipe gets no escape codes");
    }
}
