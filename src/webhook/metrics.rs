//! What the webhook counts and times, each with its `# HELP` text, served on the admin port
//! (`WXPUSH_WEBHOOK_ADMIN_LISTEN`), never on the port WeChat reaches.
//!
//! Labels take bounded values only: `account` is a configured account name (or `unknown` for a
//! URL that names none), `outcome` and `reason` come from the fixed lists below.

use std::time::Duration;

use metrics::{Label, Unit, describe_counter, describe_gauge, describe_histogram};

/// Buckets of the webhook's histograms (seconds): a push is answered in milliseconds; WeChat
/// hangs up at 5 s. The recorder is `telemetry::install_metrics`.
pub const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How a push was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Published now and confirmed by the broker (`success`).
    Published,
    /// Already published by an earlier push of the same event (`success`, nothing published).
    Duplicate,
    /// Refused before anything was published (4xx), with why.
    Refused(&'static str),
    /// Authentic but unreadable: parked in the dead-letter queue (400).
    DeadLettered,
    /// Not carried through now (503, WeChat pushes again), with why.
    Unavailable(&'static str),
    /// The push task failed unexpectedly (500, WeChat pushes again).
    Failed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Duplicate => "duplicate",
            Outcome::Refused(_) => "refused",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Unavailable(_) => "unavailable",
            Outcome::Failed => "failed",
        }
    }

    fn reason(self) -> Option<&'static str> {
        match self {
            Outcome::Refused(reason) | Outcome::Unavailable(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Counts an answered push and the time it took, from the request to the answer.
pub fn push_answered(account: &str, outcome: Outcome, took: Duration) {
    let mut labels =
        vec![Label::new("account", account.to_owned()), Label::from_static_parts("outcome", outcome.label())];
    if let Some(reason) = outcome.reason() {
        labels.push(Label::from_static_parts("reason", reason));
    }
    metrics::counter!("wxpush_webhook_pushes_total", labels).increment(1);
    metrics::histogram!("wxpush_webhook_push_seconds", "outcome" => outcome.label()).record(took.as_secs_f64());
}

/// Time from handing an event to RabbitMQ to its confirm.
pub fn publish_confirmed(took: Duration) {
    metrics::histogram!("wxpush_webhook_publish_confirm_seconds").record(took.as_secs_f64());
}

/// Open connections on one of the webhook's ports (`public` or `admin`).
pub fn connections_open(port: &'static str) -> metrics::Gauge {
    metrics::gauge!("wxpush_webhook_connections_open", "port" => port)
}

/// A connection closed because it had not sent a whole request head in time.
pub fn header_timeout(port: &'static str) {
    metrics::counter!("wxpush_webhook_header_timeouts_total", "port" => port).increment(1);
}

/// `accept` failed; `kind` is `fd_limit` (EMFILE/ENFILE), `memory` or `other`.
pub fn accept_error(port: &'static str, kind: &'static str) {
    metrics::counter!("wxpush_webhook_accept_errors_total", "port" => port, "kind" => kind).increment(1);
}

/// The `# HELP` text of every webhook metric.
pub fn describe() {
    describe_counter!(
        "wxpush_webhook_pushes_total",
        Unit::Count,
        "Pushes answered, by account, outcome (published, duplicate, refused, dead_lettered, unavailable, failed) and, for refused and unavailable, reason"
    );
    describe_histogram!(
        "wxpush_webhook_push_seconds",
        Unit::Seconds,
        "Time from a push's request to its answer, by outcome (WeChat hangs up after 5 s)"
    );
    describe_histogram!(
        "wxpush_webhook_publish_confirm_seconds",
        Unit::Seconds,
        "Time from publishing an event to RabbitMQ's publisher confirm"
    );
    describe_gauge!(
        "wxpush_webhook_connections_open",
        Unit::Count,
        "Open HTTP connections, by port (public: WeChat's; admin: metrics and probes)"
    );
    describe_counter!(
        "wxpush_webhook_header_timeouts_total",
        Unit::Count,
        "Connections closed because no whole request head arrived within the header timeout (slow or stalled clients)"
    );
    describe_counter!(
        "wxpush_webhook_accept_errors_total",
        Unit::Count,
        "Failed accepts, by kind (fd_limit: out of file descriptors; the server backs off and retries)"
    );
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    #[test]
    fn every_metric_has_help_and_histograms_have_buckets() {
        let recorder = PrometheusBuilder::new().set_buckets(BUCKETS).unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            push_answered("default", Outcome::Published, Duration::from_millis(3));
            push_answered("default", Outcome::Refused("bad_signature"), Duration::from_millis(1));
            publish_confirmed(Duration::from_millis(2));
            connections_open("public").set(3.0);
            header_timeout("public");
            accept_error("public", "fd_limit");
        });
        let text = handle.render();
        for name in [
            "wxpush_webhook_pushes_total",
            "wxpush_webhook_push_seconds",
            "wxpush_webhook_publish_confirm_seconds",
            "wxpush_webhook_connections_open",
            "wxpush_webhook_header_timeouts_total",
            "wxpush_webhook_accept_errors_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP:\n{text}");
        }
        assert!(text.contains("wxpush_webhook_push_seconds_bucket{outcome=\"published\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("wxpush_webhook_publish_confirm_seconds_bucket{le=\"0.0025\"} 1"), "{text}");
        assert!(
            text.contains("outcome=\"refused\"") && text.contains("reason=\"bad_signature\""),
            "refusals say why:\n{text}"
        );
    }
}
