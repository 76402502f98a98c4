//! `wxpush-ctl publish`: jobs from JSONL (one JSON object a line) to the jobs queue, persistent,
//! with publisher confirms kept in flight by the hundred rather than awaited one by one.
//!
//! A line that is not a JSON object is reported with its number and skipped; blank lines are
//! ignored. The line is published byte for byte (trimmed), `message_id` set to its `job_id`.
//! With a wait, a private queue bound to the results exchange is declared *before* the first
//! publish, and results are matched to the published jobs by their `job_id`. The wait ends early
//! when no worker consumes the jobs queue.
//!
//! [`validate`] (`publish --dry-run`) runs every line through the worker's own parser instead,
//! publishing nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_util::sync::CancellationToken;

use super::{
    CtlError,
    broker::{self, call},
    human_duration,
    progress::Progress,
    results::ResultWatcher,
};
use crate::{
    amqp::{NotTaken, json_properties, taken},
    config::Config,
    domain::job::Job,
    telemetry::chain,
};

/// Confirms kept in flight while publishing.
pub const DEFAULT_IN_FLIGHT: usize = 256;
/// Skipped or unconfirmed lines kept for the report (all are counted).
const KEPT: usize = 1000;
/// Longest `message_id` AMQP allows (a short string).
const MAX_MESSAGE_ID_BYTES: usize = 255;
/// How long the jobs queue may have no consumer before a wait gives up (a worker that was just
/// started, or is reconnecting, gets this long to appear).
const NO_CONSUMER_GRACE: Duration = Duration::from_secs(3);
/// Failed job ids shown per reason in the summary (all are kept in the report, up to 1000).
const IDS_PER_REASON: usize = 10;

/// One job described by `wxpush-ctl publish` flags; the worker's parser checks it like any
/// other job.
#[derive(Debug, Default, Clone)]
pub struct JobFlags {
    pub touser: String,
    pub template_id: String,
    /// `KEY=VALUE`, one per keyword.
    pub data: Vec<String>,
    /// Default: `ctl-` and a random id.
    pub job_id: Option<String>,
    pub account: Option<String>,
    pub kind: Option<String>,
    pub url: Option<String>,
    pub page: Option<String>,
    pub miniprogram_state: Option<String>,
    pub lang: Option<String>,
}

impl JobFlags {
    /// The job's id and its JSONL line.
    pub fn to_line(&self) -> Result<(String, String), String> {
        let mut data = serde_json::Map::new();
        for item in &self.data {
            let Some((key, value)) = item.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
                return Err(format!("--data {item:?} is not KEY=VALUE (for example --data amount=260.00)"));
            };
            data.insert(key.trim().to_owned(), serde_json::json!({ "value": value }));
        }
        let job_id =
            self.job_id.clone().unwrap_or_else(|| format!("ctl-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]));
        let mut job = serde_json::Map::new();
        job.insert("job_id".into(), job_id.clone().into());
        job.insert("touser".into(), self.touser.clone().into());
        job.insert("template_id".into(), self.template_id.clone().into());
        job.insert("data".into(), data.into());
        let optional = [
            ("account", &self.account),
            ("kind", &self.kind),
            ("url", &self.url),
            ("page", &self.page),
            ("miniprogram_state", &self.miniprogram_state),
            ("lang", &self.lang),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                job.insert(key.into(), value.clone().into());
            }
        }
        Ok((job_id, format!("{}\n", Value::Object(job))))
    }
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Wait this long (after the last publish is confirmed) for the jobs' results.
    pub wait: Option<Duration>,
    /// Publisher confirms in flight at once.
    pub in_flight: usize,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self { wait: None, in_flight: DEFAULT_IN_FLIGHT }
    }
}

/// A line that was not published, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    /// 1-based line number in the input.
    pub line: u64,
    pub job_id: Option<String>,
    pub reason: String,
}

/// What a publish did.
#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    pub jobs_queue: String,
    /// The jobs queue did not exist and was declared (as the worker declares it).
    pub created_queue: bool,
    /// Non-blank lines read.
    pub lines: u64,
    /// Jobs confirmed by the broker.
    pub published: u64,
    /// Published jobs without a `job_id` string: the worker dead-letters them (no result comes).
    pub without_job_id: u64,
    /// Lines skipped because they are not JSON objects (the first 1000).
    pub skipped: Vec<LineProblem>,
    pub skipped_count: u64,
    /// Jobs the broker refused or returned (the first 1000).
    pub unconfirmed: Vec<LineProblem>,
    pub unconfirmed_count: u64,
    /// Set when publishing stopped early (the connection broke): what happened.
    pub interrupted: Option<String>,
    /// Set when the wait ended because no worker consumes the jobs queue.
    pub no_consumer: bool,
    pub wait: Option<WaitSummary>,
}

impl PublishReport {
    /// Every line published and, when waited for, every job succeeded.
    pub fn all_good(&self) -> bool {
        self.interrupted.is_none()
            && !self.no_consumer
            && self.skipped_count == 0
            && self.unconfirmed_count == 0
            && self.wait.as_ref().is_none_or(|w| w.failed == 0 && w.missing == 0 && self.without_job_id == 0)
    }
}

/// The results that came back for the published jobs.
#[derive(Debug, Clone, Default)]
pub struct WaitSummary {
    /// Distinct job_ids published.
    pub jobs: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Failures by reason, most frequent first.
    pub failed_by_reason: Vec<(String, u64)>,
    /// The failed jobs (job_id, reason), by job_id; the first 1000.
    pub failed_jobs: Vec<(String, String)>,
    pub missing: u64,
    /// Some of the missing job_ids (at most 10).
    pub missing_ids: Vec<String>,
    pub waited: Duration,
    pub timeout: Duration,
}

/// Publishes every JSON object line of `input` to the jobs queue.
pub async fn publish<R: AsyncBufRead + Unpin>(
    config: &Config,
    input: R,
    input_name: &str,
    options: &PublishOptions,
    progress: &dyn Progress,
) -> Result<PublishReport, CtlError> {
    let connection = broker::connect(config, "publish").await?;
    let result = publish_on(&connection, config, input, input_name, options, progress).await;
    broker::close(&connection).await;
    progress.finish();
    result
}

async fn publish_on<R: AsyncBufRead + Unpin>(
    connection: &lapin::Connection,
    config: &Config,
    input: R,
    input_name: &str,
    options: &PublishOptions,
    progress: &dyn Progress,
) -> Result<PublishReport, CtlError> {
    let created_queue = broker::ensure_jobs_queue(connection, config).await?;
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let stop_watching = CancellationToken::new();
    let collector = match options.wait {
        Some(_) => {
            let watcher = ResultWatcher::start(connection, config, "send.*").await?;
            Some(tokio::spawn(collect(watcher, Arc::clone(&tracker), stop_watching.clone())))
        }
        None => None,
    };
    let channel = call("open a channel", connection.create_channel()).await?;
    call("enable publisher confirms", channel.confirm_select(ConfirmSelectOptions::default())).await?;

    let mut report = PublishReport { jobs_queue: config.jobs_queue.clone(), created_queue, ..PublishReport::default() };
    let mut in_flight = FuturesUnordered::new();
    let mut lines = Lines::new(input, input_name);
    let in_flight_max = options.in_flight.max(1);
    while let Some((line_no, line)) = lines.next().await? {
        report.lines += 1;
        let job_id = match read_line(line) {
            Ok(id) => id,
            Err(reason) => {
                progress.note(&format!("line {line_no}: {reason}; skipped"));
                report.skipped_count += 1;
                if report.skipped.len() < KEPT {
                    report.skipped.push(LineProblem { line: line_no, job_id: None, reason });
                }
                continue;
            }
        };
        let mut props = json_properties(None);
        match &job_id {
            Some(id) => {
                if id.len() <= MAX_MESSAGE_ID_BYTES {
                    props = props.with_message_id(ShortString::from(id.as_str()));
                }
                if options.wait.is_some() {
                    lock(&tracker).expect(id);
                }
            }
            None => report.without_job_id += 1,
        }
        let sent = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(config.jobs_queue.as_str()),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                line,
                props,
            )
            .await;
        let confirm = match sent {
            Ok(c) => c,
            Err(e) => {
                if let Some(id) = &job_id {
                    lock(&tracker).cancel(id);
                }
                report.interrupted = Some(format!(
                    "publishing stopped at line {line_no}: {}. Jobs confirmed so far are listed as published; \
                     publishing the whole file again is safe (a job_id already sent is not sent twice)",
                    chain(&e)
                ));
                break;
            }
        };
        in_flight.push(async move { (line_no, job_id, confirm.await) });
        while in_flight.len() >= in_flight_max {
            if let Some(done) = in_flight.next().await {
                settle(done, &mut report, &tracker);
            }
        }
        if report.lines.is_multiple_of(64) {
            progress.publishing(lines.bytes, report.lines, report.published);
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(done, &mut report, &tracker);
    }
    progress.publishing(lines.bytes, report.lines, report.published);
    let _ = channel.close(200, ShortString::from("done")).await;

    if let (Some(timeout), Some(collector)) = (options.wait, collector) {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut next_look = started;
        let mut unconsumed_since: Option<Instant> = None;
        loop {
            let (arrived, expected) = lock(&tracker).progress();
            progress.waiting(arrived, expected);
            if arrived >= expected || Instant::now() >= deadline || collector.is_finished() {
                break;
            }
            // Results come only from a worker: without one, waiting out the timeout helps no one.
            let now = Instant::now();
            if now >= next_look {
                next_look = now + Duration::from_secs(1);
                match broker::queue_info(connection, &config.jobs_queue).await {
                    Ok(Some(q)) if q.consumers == 0 => {
                        if now.duration_since(*unconsumed_since.get_or_insert(now)) >= NO_CONSUMER_GRACE {
                            report.no_consumer = true;
                            break;
                        }
                    }
                    _ => unconsumed_since = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop_watching.cancel();
        let watch_error = match collector.await {
            Ok(Err(e)) => Some(chain(&e).to_string()),
            _ => None,
        };
        let mut summary = lock(&tracker).summary();
        summary.waited = started.elapsed();
        summary.timeout = timeout;
        if let Some(e) = watch_error
            && summary.missing > 0
        {
            report.interrupted.get_or_insert(format!("stopped receiving results: {e}"));
        }
        report.wait = Some(summary);
    }
    Ok(report)
}

type Settled = (u64, Option<String>, Result<Confirmation, lapin::Error>);

fn settle((line, job_id, confirmation): Settled, report: &mut PublishReport, tracker: &Mutex<Tracker>) {
    let problem = match confirmation.map(taken) {
        Ok(Ok(())) => {
            report.published += 1;
            return;
        }
        Ok(Err(NotTaken::Unroutable)) => {
            "RabbitMQ could not route it to the jobs queue (was the queue deleted?)".into()
        }
        Ok(Err(NotTaken::Nacked)) => "RabbitMQ refused it (nack): the broker may be out of disk or memory".into(),
        Ok(Err(NotTaken::Unconfirmed)) => "not confirmed by RabbitMQ".into(),
        Err(e) => format!("no confirm from RabbitMQ: {}", chain(&e)),
    };
    if let Some(id) = &job_id {
        lock(tracker).cancel(id);
    }
    report.unconfirmed_count += 1;
    if report.unconfirmed.len() < KEPT {
        report.unconfirmed.push(LineProblem { line, job_id, reason: problem });
    }
}

/// The non-blank lines of a JSONL input, trimmed, with their 1-based numbers.
struct Lines<'a, R> {
    input: R,
    name: &'a str,
    buf: Vec<u8>,
    line_no: u64,
    /// Bytes read so far (for the progress bar).
    bytes: u64,
}

impl<'a, R: AsyncBufRead + Unpin> Lines<'a, R> {
    fn new(input: R, name: &'a str) -> Self {
        Self { input, name, buf: Vec::new(), line_no: 0, bytes: 0 }
    }

    /// The next non-blank line and its number; `None` at the end of the input.
    async fn next(&mut self) -> Result<Option<(u64, &[u8])>, CtlError> {
        loop {
            self.buf.clear();
            let n = self
                .input
                .read_until(b'\n', &mut self.buf)
                .await
                .map_err(|source| CtlError::Input { name: self.name.to_owned(), source })?;
            if n == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            self.bytes += n as u64;
            if !self.buf.trim_ascii().is_empty() {
                return Ok(Some((self.line_no, self.buf.trim_ascii())));
            }
        }
    }
}

/// The job_id of a valid line (a JSON object), or why the line is skipped.
fn read_line(line: &[u8]) -> Result<Option<String>, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8 (at byte {})", e.valid_up_to()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        format!("not valid JSON ({message} at column {})", e.column())
    })?;
    match value {
        Value::Object(map) => {
            Ok(map.get("job_id").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned))
        }
        Value::Array(_) => Err("a JSON array, not a job object".into()),
        Value::String(_) => Err("a JSON string, not a job object".into()),
        Value::Number(_) => Err("a JSON number, not a job object".into()),
        Value::Bool(_) | Value::Null => Err(format!("JSON {value}, not a job object")),
    }
}

fn lock(tracker: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// Receives results until told to stop; only results of expected jobs count.
async fn collect(
    mut watcher: ResultWatcher,
    tracker: Arc<Mutex<Tracker>>,
    stop: CancellationToken,
) -> Result<(), CtlError> {
    let outcome = loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            next = watcher.next() => next,
        };
        match next {
            Some(Ok(result)) => {
                if let Some(id) = result.job_id() {
                    let reason = if result.succeeded() { None } else { Some(result.reason()) };
                    lock(&tracker).record(&id, reason);
                }
            }
            Some(Err(e)) => break Err(e),
            None => break Err(CtlError::ResultsClosed),
        }
    };
    watcher.close().await;
    outcome
}

/// Results expected and received, per job_id.
#[derive(Default)]
struct Tracker {
    jobs: HashMap<String, Track>,
    /// Results still expected (one per confirmed publish).
    outstanding: u64,
    /// Publishes counted so far (a job_id published twice is expected twice).
    expected: u64,
}

#[derive(Default)]
struct Track {
    published: u32,
    results: u32,
    succeeded: bool,
    failure: Option<String>,
}

impl Tracker {
    fn expect(&mut self, job_id: &str) {
        self.jobs.entry(job_id.to_owned()).or_default().published += 1;
        self.outstanding += 1;
        self.expected += 1;
    }

    /// The publish of `job_id` was not confirmed: expect one result less.
    fn cancel(&mut self, job_id: &str) {
        if let Some(t) = self.jobs.get_mut(job_id) {
            if t.published > t.results {
                self.outstanding -= 1;
                self.expected -= 1;
            }
            t.published = t.published.saturating_sub(1);
            if t.published == 0 && t.results == 0 {
                self.jobs.remove(job_id);
            }
        }
    }

    /// A result for `job_id`: `failure` is `None` for a success. A result for a job we did not
    /// publish is someone else's and ignored; redelivered duplicates count once.
    fn record(&mut self, job_id: &str, failure: Option<String>) {
        let Some(t) = self.jobs.get_mut(job_id) else { return };
        if t.results < t.published {
            t.results += 1;
            self.outstanding -= 1;
        }
        match failure {
            None => t.succeeded = true,
            Some(reason) => t.failure = Some(reason),
        }
    }

    fn progress(&self) -> (u64, u64) {
        (self.expected - self.outstanding, self.expected)
    }

    fn summary(&self) -> WaitSummary {
        let mut summary = WaitSummary { jobs: self.jobs.len() as u64, ..WaitSummary::default() };
        let mut reasons: HashMap<&str, u64> = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for (id, t) in &self.jobs {
            if t.succeeded {
                // A success wins: the job reached WeChat once, whatever its other copies met.
                summary.succeeded += 1;
            } else if let Some(reason) = &t.failure {
                summary.failed += 1;
                *reasons.entry(reason).or_default() += 1;
            } else {
                summary.missing += 1;
                missing.push(id);
            }
        }
        let mut reasons: Vec<(String, u64)> = reasons.into_iter().map(|(r, n)| (r.to_owned(), n)).collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        summary.failed_by_reason = reasons;
        let mut failed: Vec<(String, String)> = self
            .jobs
            .iter()
            .filter(|(_, t)| !t.succeeded)
            .filter_map(|(id, t)| Some((id.clone(), t.failure.clone()?)))
            .collect();
        failed.sort_unstable();
        failed.truncate(KEPT);
        summary.failed_jobs = failed;
        missing.sort_unstable();
        summary.missing_ids = missing.into_iter().take(10).map(str::to_owned).collect();
        summary
    }
}

/// What `publish --dry-run` found.
#[derive(Debug, Clone, Default)]
pub struct ValidationReport {
    pub input: String,
    /// Non-blank lines read.
    pub lines: u64,
    /// Jobs the worker would accept and send.
    pub valid: u64,
    /// Lines the worker would refuse, and why (the first 1000).
    pub problems: Vec<LineProblem>,
    pub problems_count: u64,
}

impl ValidationReport {
    pub fn all_good(&self) -> bool {
        self.problems_count == 0
    }
}

/// Runs every line through the worker's own checks (the parser, the account, `expires_at`)
/// and says what is wrong with each job it would refuse. Publishes nothing; needs no broker.
pub async fn validate<R: AsyncBufRead + Unpin>(
    config: &Config,
    input: R,
    input_name: &str,
) -> Result<ValidationReport, CtlError> {
    let mut report = ValidationReport { input: input_name.to_owned(), ..ValidationReport::default() };
    let mut lines = Lines::new(input, input_name);
    while let Some((line_no, line)) = lines.next().await? {
        report.lines += 1;
        match validate_line(config, line) {
            Ok(()) => report.valid += 1,
            Err((job_id, reason)) => {
                report.problems_count += 1;
                if report.problems.len() < KEPT {
                    report.problems.push(LineProblem { line: line_no, job_id, reason });
                }
            }
        }
    }
    Ok(report)
}

/// What the worker would do with one line, short of sending it: `Err((job_id, why))` when it
/// would refuse it.
fn validate_line(config: &Config, line: &[u8]) -> Result<(), (Option<String>, String)> {
    read_line(line).map_err(|reason| (None, reason))?;
    // As published: the job_id is in the body, no message_id is set without one.
    let job = Job::parse(line, None).map_err(|e| (e.job_id.clone(), e.to_string()))?;
    let id = Some(job.job_id.clone());
    if config.account(&job.account).is_none() {
        let known: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        return Err((id, format!("invalid job: unknown account {:?} (configured: {})", job.account, known.join(", "))));
    }
    if job.is_expired(chrono::Utc::now()) {
        return Err((id, "expired: its expires_at has passed, the worker would not send it".into()));
    }
    Ok(())
}

impl std::fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.problems {
            let id = p.job_id.as_deref().map_or_else(String::new, |id| format!(" (job_id {id})"));
            writeln!(f, "line {}{id}: {}", p.line, p.reason)?;
        }
        if self.problems_count > self.problems.len() as u64 {
            writeln!(f, "… and {} more", self.problems_count - self.problems.len() as u64)?;
        }
        writeln!(
            f,
            "dry run of {}: {} jobs, {} valid, {} the worker would refuse; nothing was published",
            self.input, self.lines, self.valid, self.problems_count
        )
    }
}

/// Reasons shown in the summary; the rest are added up.
const TOP_REASONS: usize = 10;

impl std::fmt::Display for PublishReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.created_queue {
            writeln!(
                f,
                "note: queue {} did not exist and was declared; if that name is a typo, fix WXPUSH_JOBS_QUEUE",
                self.jobs_queue
            )?;
        }
        writeln!(f, "published {} of {} jobs to {}", self.published, self.lines, self.jobs_queue)?;
        if self.skipped_count > 0 {
            writeln!(f, "  {} lines skipped: not JSON objects (listed above)", self.skipped_count)?;
        }
        if self.unconfirmed_count > 0 {
            writeln!(f, "  {} jobs not confirmed by RabbitMQ (not published):", self.unconfirmed_count)?;
            for p in self.unconfirmed.iter().take(10) {
                writeln!(f, "    line {}: {}", p.line, p.reason)?;
            }
        }
        if self.without_job_id > 0 {
            writeln!(
                f,
                "  {} jobs have no job_id: the worker dead-letters them and publishes no result",
                self.without_job_id
            )?;
        }
        if let Some(w) = &self.wait {
            let timed_out =
                if w.missing > 0 { format!(" (gave up after {})", human_duration(w.timeout)) } else { String::new() };
            writeln!(
                f,
                "results after {}: {} succeeded, {} failed, {} missing{timed_out}",
                human_duration(w.waited),
                w.succeeded,
                w.failed,
                w.missing
            )?;
            if !w.failed_by_reason.is_empty() {
                writeln!(f, "  failed by reason (job ids):")?;
                for (reason, n) in w.failed_by_reason.iter().take(TOP_REASONS) {
                    let ids: Vec<&str> =
                        w.failed_jobs.iter().filter(|(_, r)| r == reason).map(|(id, _)| id.as_str()).collect();
                    let more = (*n).saturating_sub(ids.len().min(IDS_PER_REASON) as u64);
                    let mut shown = ids.iter().take(IDS_PER_REASON).copied().collect::<Vec<_>>().join(", ");
                    if more > 0 {
                        shown.push_str(&format!(", … ({more} more)"));
                    }
                    writeln!(f, "    {n:>7}  {reason}: {shown}")?;
                }
                let rest: u64 = w.failed_by_reason.iter().skip(TOP_REASONS).map(|(_, n)| n).sum();
                if rest > 0 {
                    writeln!(f, "    {rest:>7}  (other reasons)")?;
                }
            }
            if w.missing > 0 {
                let more = if w.missing > w.missing_ids.len() as u64 { ", …" } else { "" };
                writeln!(f, "  missing: {}{more}", w.missing_ids.join(", "))?;
                if !self.no_consumer {
                    writeln!(
                        f,
                        "  (is a worker running on {}? `wxpush-ctl status` shows the queue and its consumers)",
                        self.jobs_queue
                    )?;
                }
            }
        }
        if self.no_consumer {
            writeln!(
                f,
                "stopped waiting: no worker consumes {} (0 consumers for {} s). The jobs wait there and are sent \
                 when a worker starts; `wxpush-ctl results --live` shows their results then",
                self.jobs_queue,
                NO_CONSUMER_GRACE.as_secs()
            )?;
        }
        if let Some(why) = &self.interrupted {
            writeln!(f, "stopped early: {why}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_build_a_job_of_each_kind_the_worker_accepts() {
        let flags = JobFlags {
            touser: "o1".into(),
            template_id: "t1".into(),
            data: vec!["thing1=已发货".into(), "amount2=¥26.00".into()],
            job_id: Some("j1".into()),
            kind: Some("miniprogram_subscribe".into()),
            page: Some("index".into()),
            miniprogram_state: Some("trial".into()),
            lang: Some("en_US".into()),
            ..JobFlags::default()
        };
        let (id, line) = flags.to_line().unwrap();
        let job = Job::parse(line.trim_end().as_bytes(), None).unwrap();
        assert_eq!(
            (id.as_str(), job.kind.as_str(), job.page.as_deref()),
            ("j1", "miniprogram_subscribe", Some("index"))
        );
        let template = JobFlags { kind: None, page: None, miniprogram_state: None, lang: None, ..flags.clone() };
        assert_eq!(
            Job::parse(template.to_line().unwrap().1.trim_end().as_bytes(), None).unwrap().kind.as_str(),
            "template"
        );
        let bad = JobFlags { data: vec!["novalue".into()], ..flags };
        assert!(bad.to_line().unwrap_err().contains("KEY=VALUE"));
    }

    #[test]
    fn lines_that_are_not_objects_say_why() {
        assert_eq!(read_line(br#"{"job_id":"a"}"#), Ok(Some("a".into())));
        assert_eq!(read_line(br#"{"touser":"x"}"#), Ok(None));
        assert!(read_line(b"[1,2]").unwrap_err().contains("array"));
        assert!(read_line(b"null").unwrap_err().contains("not a job object"));
        let broken = read_line(b"{\"job_id\": ").unwrap_err();
        assert!(broken.starts_with("not valid JSON") && broken.contains("column"), "{broken}");
        assert!(!broken.contains("line 1"), "no confusing JSON line number: {broken}");
        assert!(read_line(&[b'{', 0xff, b'}']).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn the_tracker_counts_each_publish_once_and_a_success_wins() {
        let mut t = Tracker::default();
        t.expect("a");
        t.expect("a");
        t.expect("b");
        t.expect("c");
        t.cancel("c");
        t.record("a", Some("system error".into()));
        t.record("a", None);
        t.record("a", None); // a redelivered duplicate
        t.record("zzz", None); // someone else's job
        assert_eq!(t.progress(), (2, 3));
        let s = t.summary();
        assert_eq!((s.jobs, s.succeeded, s.failed, s.missing), (2, 1, 0, 1));
        assert_eq!(s.missing_ids, vec!["b".to_owned()]);
        t.record("b", Some("invalid openid".into()));
        let s = t.summary();
        assert_eq!(s.failed_by_reason, vec![("invalid openid".to_owned(), 1)]);
        assert_eq!(t.progress(), (3, 3));
    }
}
