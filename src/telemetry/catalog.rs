//! Every metric the worker exports, described in one place (the `# HELP` line a scrape shows),
//! plus the metrics about the process itself.
//!
//! A metric emitted anywhere in `src/` must be described (here, or beside the code of a program
//! that installs a recorder of its own): a unit test below reads the sources and fails
//! otherwise. The worker's counters of every configured account are registered at zero when it
//! starts, so that the first `increase()` over them is not lost.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

use crate::config::Config;

/// The statuses of `wxpush_jobs_total`.
pub const JOB_STATUSES: [&str; 3] = ["succeeded", "failed", "deferred"];
/// The outcomes of `wxpush_token_fetches_total`.
pub const TOKEN_FETCH_OUTCOMES: [&str; 2] = ["ok", "error"];

/// The version this binary was built from; the git commit when the build set `WXPUSH_GIT_SHA`
/// (e.g. `WXPUSH_GIT_SHA=$(git rev-parse --short HEAD) cargo build`), else `unknown`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_SHA: &str = match option_env!("WXPUSH_GIT_SHA") {
    Some(sha) => sha,
    None => "unknown",
};

/// Buckets of `wxpush_send_seconds` (seconds): 5 ms to 10 s covers WeChat up to the HTTP
/// timeout.
pub const SEND_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Describes every metric of the worker (the webhook's are in `webhook::metrics`), once per
/// process, after the recorder is installed.
pub fn describe_metrics() {
    // Jobs (worker).
    describe_counter!(
        "wxpush_jobs_total",
        "Jobs finished by this worker, by account and status: succeeded, failed (a send.failed result), deferred (parked until the account's quota is back)."
    );
    describe_gauge!(
        "wxpush_jobs_in_flight",
        "Jobs this worker has received from the jobs queue and not yet acknowledged. Summed over the pool: the jobs queue's unacknowledged messages."
    );
    describe_counter!(
        "wxpush_jobs_delayed_total",
        "Jobs put in a delay queue to be retried or to wait (transient failure, rate slot, token, account pause)."
    );
    describe_counter!(
        "wxpush_jobs_parked_total",
        "Jobs parked until the account's daily quota or minute pause is over, by account."
    );
    describe_counter!(
        "wxpush_jobs_oversized_total",
        "Jobs refused unread because their body is over the size limit (the broker moves them, untouched, to the dead-letter queue)."
    );
    describe_counter!(
        "wxpush_jobs_dead_lettered_total",
        "Jobs moved to the dead-letter queue: unparseable or invalid, or a poison message."
    );
    // WeChat.
    describe_histogram!(
        "wxpush_send_seconds",
        Unit::Seconds,
        "Duration of template sends to WeChat, by account (every attempt, failed ones included)."
    );
    describe_counter!("wxpush_send_retries_total", "Send attempts retried after a transient failure, by account.");
    describe_counter!(
        "wxpush_rate_limit_waits_total",
        "Sends that waited for a slot of the account's pool-wide rate limit, by account."
    );
    describe_counter!(
        "wxpush_account_pauses_total",
        "Times an account was paused (minute quota 45011, daily quota 45009), by account."
    );
    describe_counter!(
        "wxpush_token_fetches_total",
        "Access-token fetches from WeChat, by account and outcome (ok, error)."
    );
    describe_counter!(
        "wxpush_token_forced_refreshes_total",
        "Token refreshes forced after WeChat refused a token that should still be valid, by account (limited by a daily budget)."
    );
    describe_gauge!(
        "wxpush_token_healthy",
        "1 while the account has an access token WeChat accepts, 0 after a failed fetch or a refusal (wrong secret, IP not whitelisted, WeChat down): its jobs wait."
    );
    // Queues, as the broker reports them (see backlog.rs); the same on every worker.
    describe_gauge!(
        "wxpush_queue_messages_ready",
        "Messages ready in a queue wxpush uses, by queue and kind (jobs, delay, dead_letter, unrouted), polled from RabbitMQ every few seconds. Unacknowledged jobs are wxpush_jobs_in_flight."
    );
    describe_gauge!(
        "wxpush_queue_consumers",
        "Consumers of a queue wxpush uses, by queue and kind, polled from RabbitMQ."
    );
    describe_counter!(
        "wxpush_queue_poll_errors_total",
        "Failed polls of the queue lengths (RabbitMQ unreachable or not answering), by kind. A missing queue is no failure: it reads as empty."
    );
    export_build_and_process();
}

/// `wxpush_build_info` and the `process_*` metrics, described and set: for every program's
/// recorder (the webhook's too).
pub fn export_build_and_process() {
    describe_gauge!("wxpush_build_info", "Always 1; the labels say which version (and git commit) is running.");
    metrics::gauge!("wxpush_build_info", "version" => VERSION, "git_sha" => GIT_SHA).set(1.0);
    process().describe();
    process().collect();
}

/// The collector of `process_*` metrics (CPU seconds, resident memory, open fds, threads).
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process metrics again (before each scrape, so they are current).
pub fn collect_process_metrics() {
    process().collect();
}

/// Registers the worker's counters of every configured account (and outcome) at zero.
pub fn register_worker_series(config: &Config) {
    for account in &config.accounts {
        let name = || account.name.clone();
        for status in JOB_STATUSES {
            metrics::counter!("wxpush_jobs_total", "account" => name(), "status" => status).increment(0);
        }
        for outcome in TOKEN_FETCH_OUTCOMES {
            metrics::counter!("wxpush_token_fetches_total", "account" => name(), "outcome" => outcome).increment(0);
        }
        metrics::counter!("wxpush_send_retries_total", "account" => name()).increment(0);
        metrics::counter!("wxpush_rate_limit_waits_total", "account" => name()).increment(0);
        metrics::counter!("wxpush_jobs_parked_total", "account" => name()).increment(0);
        metrics::counter!("wxpush_account_pauses_total", "account" => name()).increment(0);
    }
    metrics::counter!("wxpush_jobs_delayed_total").increment(0);
    metrics::counter!("wxpush_jobs_dead_lettered_total").increment(0);
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    /// `name → kind` of every metric emitted with a literal name in `text`, and of every one
    /// described in it, separately.
    fn scan(text: &str) -> (BTreeMap<String, &'static str>, BTreeMap<String, &'static str>) {
        let (mut emitted, mut described) = (BTreeMap::new(), BTreeMap::new());
        for kind in ["counter", "gauge", "histogram"] {
            let mac = format!("{kind}!(");
            for (i, _) in text.match_indices(&mac) {
                let rest = text[i + mac.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else { continue };
                let Some(end) = rest.find('"') else { continue };
                let target = if text[..i].ends_with("describe_") { &mut described } else { &mut emitted };
                target.insert(rest[..end].to_owned(), kind);
            }
        }
        (emitted, described)
    }

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }

    #[test]
    fn every_metric_the_code_emits_is_described_as_what_it_is() {
        let mut files = Vec::new();
        sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        let (mut emitted, mut described) = (BTreeMap::new(), BTreeMap::new());
        for (path, text) in &files {
            let (e, d) = scan(text);
            for (name, kind) in e {
                emitted.insert(name.clone(), (kind, path.clone()));
            }
            described.extend(d);
        }
        assert!(emitted.contains_key("wxpush_jobs_total") && emitted.len() >= 10, "the scan finds them: {emitted:?}");
        for (name, (kind, path)) in &emitted {
            assert_eq!(described.get(name), Some(kind), "{name} ({kind}, emitted in {path}) needs a describe_{kind}!");
        }
        for name in described.keys() {
            assert!(name.starts_with("wxpush_"), "{name}: wxpush's metrics share the wxpush_ prefix");
        }
    }
}
