//! wxpush-ctl: the operators' tool. Parses arguments, calls `wxpush::ctl`, prints the result.
//!
//! Exit codes: 0 success; 1 the command could not do its work (configuration, RabbitMQ or
//! Redis unreachable, a purge not confirmed) or `check`/`status` found a problem; 2 bad
//! arguments; 3 the command ran but not everything went well (`publish`: lines skipped or
//! refused by `--dry-run`, jobs not confirmed, failed or missing results, no worker to wait for;
//! `dead replay`/`dead delete`: jobs not found or not moved).
//!
//! Standard output may be closed early (`wxpush-ctl check | head -1`): writing then stops
//! quietly and the exit code is the command's own.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use wxpush::{
    config::Config,
    ctl::{
        cancel,
        check::{self, CheckOptions},
        dead,
        demo::{self, DemoOptions},
        progress,
        publish::{self, JobFlags, PublishOptions},
        results::{self, ReceivedResult, ShowOptions, Source},
        status::{self, StatusOptions},
    },
    domain::job::JobKind,
    telemetry::{self, Program},
};

const PARTIAL: u8 = 3;
const USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "wxpush-ctl",
    version,
    about = "Operate a wxpush worker pool: check the setup, publish jobs, show results, inspect, replay and prune \
             the dead-letter queue, show status, run the demo",
    after_help = "Exit codes: 0 success; 1 error (configuration, RabbitMQ or Redis) or a failed check; 2 bad \
                  arguments; 3 done, but not everything went well (skipped or refused lines, failed or missing \
                  results, jobs not found)."
)]
struct Cli {
    /// Configuration file (see config/default.toml); WXPUSH_* variables override it, and the
    /// flags below override both.
    #[arg(long, env = "WXPUSH_CONFIG", global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
    /// Output format: `json` for check, status, dead list (one document) and results (one
    /// object a line).
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// Settings that win over the configuration file and the WXPUSH_* variables.
#[derive(Args)]
struct Overrides {
    /// RabbitMQ URL(s), comma-separated for a cluster's nodes (else WXPUSH_AMQP_URL).
    #[arg(long, global = true, value_name = "URL", value_parser = non_empty)]
    amqp_url: Option<String>,
    /// Redis URL(s) (else WXPUSH_REDIS_URL).
    #[arg(long, global = true, value_name = "URL", value_parser = non_empty)]
    redis_url: Option<String>,
    /// The jobs queue (else WXPUSH_JOBS_QUEUE).
    #[arg(long, global = true, value_name = "NAME", value_parser = queue_name)]
    jobs_queue: Option<String>,
    /// The results exchange (else WXPUSH_RESULTS_EXCHANGE).
    #[arg(long, global = true, value_name = "NAME", value_parser = queue_name)]
    results_exchange: Option<String>,
    /// Prefix of the Redis keys (else WXPUSH_REDIS_PREFIX).
    #[arg(long, global = true, value_name = "PREFIX", value_parser = redis_prefix)]
    prefix: Option<String>,
}

impl Overrides {
    fn apply(&self, config: &mut Config) {
        let set = |target: &mut String, value: &Option<String>| {
            if let Some(v) = value {
                v.clone_into(target);
            }
        };
        set(&mut config.amqp_url, &self.amqp_url);
        set(&mut config.redis_url, &self.redis_url);
        set(&mut config.jobs_queue, &self.jobs_queue);
        set(&mut config.results_exchange, &self.results_exchange);
        set(&mut config.redis_prefix, &self.prefix);
    }
}

fn non_empty(value: &str) -> Result<String, String> {
    if value.trim().is_empty() { Err("must not be empty".into()) } else { Ok(value.to_owned()) }
}

fn queue_name(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 200 {
        Err("must be 1 to 200 bytes (queue and exchange names are at most 255)".into())
    } else {
        Ok(value.to_owned())
    }
}

fn redis_prefix(value: &str) -> Result<String, String> {
    if value.is_empty() || value.contains(['{', '}']) {
        Err("must be non-empty and free of braces".into())
    } else {
        Ok(value.to_owned())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration and the accounts (appid form, placeholder keys, and a token from
    /// WeChat for each), RabbitMQ and Redis.
    Check {
        /// Do not ask WeChat for tokens (the credentials are then not proven).
        #[arg(long)]
        offline: bool,
    },
    /// Publish jobs from a JSONL file (one JSON job object a line), or one job built from
    /// flags, to the jobs queue.
    Publish(Box<PublishArgs>),
    /// Show results: those no binding took (kept in `<results_exchange>.unrouted`), or live ones.
    Results(ResultsArgs),
    /// Inspect, replay, delete or purge the dead-letter queue.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Per account: token age, token-fetch back-off, today's sends, pauses; and each queue's
    /// ready and unacknowledged messages.
    Status {
        /// RabbitMQ's management API, for the unacknowledged counts (default: the AMQP host,
        /// port 15672, with the AMQP credentials).
        #[arg(long, env = "WXPUSH_MANAGEMENT_URL", value_name = "URL")]
        management_url: Option<String>,
    },
    /// Run the quick start in one process: sandbox + worker + one job, in a namespace of its own.
    Demo(DemoArgs),
    /// Cancel jobs across the pool: a worker that picks one up publishes `send.failed` with
    /// reason `cancelled` and sends nothing (jobs in delay queues too). A job already sent, or
    /// being sent right now, is left as it is (exit 3).
    #[command(group = clap::ArgGroup::new("which").required(true).multiple(true).args(["job_ids", "file"]))]
    Cancel {
        /// The job_ids to cancel.
        #[arg(value_name = "JOB_ID")]
        job_ids: Vec<String>,
        /// A file of job_ids, one a line (`-` reads standard input; `#` starts a comment).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PublishArgs {
    /// JSONL file of jobs; `-` reads standard input. Lines that are not JSON objects are
    /// reported and skipped; blank lines are ignored.
    #[arg(value_name = "FILE.jsonl", required_unless_present = "touser", conflicts_with = "touser")]
    file: Option<PathBuf>,
    /// Check every job with the worker's own parser and say what is wrong; publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// After publishing, wait for each job's send result and print a summary.
    #[arg(long, conflicts_with = "dry_run")]
    wait: bool,
    /// With --wait: how long to wait for results after the last job is published.
    #[arg(long, value_name = "SECS", default_value_t = 120, requires = "wait")]
    timeout: u64,
    /// One job from flags: the recipient's openid.
    #[arg(long, value_name = "OPENID", requires_all = ["template_id", "data"])]
    touser: Option<String>,
    /// One job from flags: the template id.
    #[arg(long, value_name = "ID", requires = "touser")]
    template_id: Option<String>,
    /// One job from flags: a template keyword and its value (repeat for each keyword).
    #[arg(long, value_name = "KEY=VALUE", requires = "touser")]
    data: Vec<String>,
    /// One job from flags: its job_id (default: `ctl-` and a random id, printed).
    #[arg(long, value_name = "ID", requires = "touser")]
    job_id: Option<String>,
    /// One job from flags: the account (default `default`).
    #[arg(long, value_name = "NAME", requires = "touser")]
    account: Option<String>,
    /// One job from flags: the URL a template message opens.
    #[arg(long, value_name = "URL", requires = "touser")]
    url: Option<String>,
    /// One job from flags: `template` (default), `subscribe` (an official account's 订阅通知)
    /// or `miniprogram_subscribe`.
    #[arg(long, value_name = "KIND", requires = "touser")]
    kind: Option<String>,
    /// One job from flags: the page a subscription message opens.
    #[arg(long, value_name = "PAGE", requires = "touser")]
    page: Option<String>,
    /// One job from flags (miniprogram_subscribe): developer, trial or formal.
    #[arg(long, value_name = "STATE", requires = "touser")]
    miniprogram_state: Option<String>,
    /// One job from flags (miniprogram_subscribe): zh_CN, en_US, zh_HK or zh_TW.
    #[arg(long, value_name = "LANG", requires = "touser")]
    lang: Option<String>,
}

#[derive(Args)]
struct ResultsArgs {
    /// Watch results published from now on (a private queue bound to the results exchange),
    /// instead of reading those no binding took. Runs until Ctrl-C, --limit or --timeout.
    #[arg(long)]
    live: bool,
    /// Routing-key pattern (`send.*`, `delivery.#`, `send.failed`; `#` = all).
    #[arg(long, value_name = "PATTERN", default_value = "#")]
    pattern: String,
    /// Keep waiting for new unrouted results after showing those kept.
    #[arg(short, long)]
    follow: bool,
    /// Remove the unrouted results shown (each once it is printed); without it they stay.
    #[arg(long, conflicts_with = "live")]
    take: bool,
    /// Stop after this many results.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

#[derive(Subcommand)]
enum DeadCommand {
    /// Show parked jobs (job_id, reason, source queue, when, size, preview). Listing removes
    /// nothing: every message goes back to its place in the queue, unchanged.
    List {
        /// Show at most this many, from the head of the queue.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
    },
    /// Move chosen parked jobs back to the jobs queue (body and properties untouched, the
    /// x-wxpush-* dead-letter headers removed so they start afresh). A job leaves the
    /// dead-letter queue only after its copy is confirmed in the jobs queue.
    #[command(group = clap::ArgGroup::new("choice").required(true).args(["job_id", "all"]))]
    Replay {
        /// Replay the job with this job_id (repeat for several).
        #[arg(long = "job-id", value_name = "ID")]
        job_id: Vec<String>,
        /// Replay every parked job.
        #[arg(long)]
        all: bool,
        /// Only show what would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the parked jobs with these job_ids (every copy); every other message stays, in
    /// its order.
    Delete {
        /// The job_id to remove (repeat for several).
        #[arg(long = "job-id", value_name = "ID", required = true)]
        job_id: Vec<String>,
    },
    /// Remove every parked job. Asks first (type `yes`), unless --yes.
    Purge {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// How long to wait for the example job's result.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// The kind of message to send: template, subscribe or miniprogram_subscribe.
    #[arg(long, value_name = "KIND", default_value = "template", value_parser = job_kind)]
    kind: JobKind,
}

fn job_kind(text: &str) -> Result<JobKind, String> {
    JobKind::ALL
        .into_iter()
        .find(|k| k.as_str() == text)
        .ok_or_else(|| format!("{text:?} is not a job kind: template, subscribe or miniprogram_subscribe"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings only, on stderr (the demo's worker logs through this): stdout is the output.
    telemetry::init(Program::Ctl);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stdout. `Ok(false)`: the reader is gone (a closed pipe), stop writing.
fn write_out(text: &str) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write to standard output"),
    }
}

/// Prints the command's output and returns its exit code, also when nobody reads the output.
fn finish(text: &str, code: ExitCode) -> anyhow::Result<ExitCode> {
    write_out(text)?;
    Ok(code)
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

fn ok_if(good: bool, otherwise: ExitCode) -> ExitCode {
    if good { ExitCode::SUCCESS } else { otherwise }
}

struct Ctx {
    config_path: Option<PathBuf>,
    overrides: Overrides,
}

impl Ctx {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config_path.as_deref()).context(
            "cannot load the configuration (fix the file given by --config / WXPUSH_CONFIG, or the WXPUSH_* variable \
             named)",
        )?;
        self.overrides.apply(&mut config);
        Ok(config)
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx { config_path: cli.config, overrides: cli.overrides };
    let json = cli.output == Output::Json;
    let no_json = |command: &str| -> anyhow::Result<ExitCode> {
        eprintln!("error: -o json is not available for {command}; it is for check, status, dead list and results");
        Ok(ExitCode::from(USAGE))
    };
    match cli.command {
        Command::Check { offline } => check_command(&ctx, offline, json).await,
        Command::Publish(_) if json => no_json("publish"),
        Command::Publish(args) => publish_command(&ctx, *args).await,
        Command::Results(args) => results_command(&ctx, args, json).await,
        Command::Dead(DeadCommand::List { limit }) => {
            let config = ctx.load()?;
            let list = dead::list(&config, limit)
                .await
                .with_context(|| format!("cannot list the dead-letter queue {}", config.dead_letter_queue))?;
            let text = if json { pretty(&serde_json::to_value(&list)?) } else { list.to_string() };
            finish(&text, ExitCode::SUCCESS)
        }
        Command::Dead(_) if json => no_json("this dead command"),
        Command::Dead(DeadCommand::Replay { job_id, all, dry_run }) => {
            let config = ctx.load()?;
            let selection = if all {
                dead::Selection::All
            } else {
                dead::Selection::JobIds(job_id.into_iter().collect::<BTreeSet<_>>())
            };
            let report = dead::replay(&config, &dead::ReplayOptions { selection, dry_run })
                .await
                .with_context(|| format!("cannot replay the dead-letter queue {}", config.dead_letter_queue))?;
            finish(&report.to_string(), ok_if(report.all_good(), ExitCode::from(PARTIAL)))
        }
        Command::Dead(DeadCommand::Delete { job_id }) => {
            let config = ctx.load()?;
            let ids: BTreeSet<String> = job_id.into_iter().collect();
            let report = dead::delete(&config, &ids)
                .await
                .with_context(|| format!("cannot delete from the dead-letter queue {}", config.dead_letter_queue))?;
            finish(&report.to_string(), ok_if(report.all_good(), ExitCode::from(PARTIAL)))
        }
        Command::Dead(DeadCommand::Purge { yes }) => purge_command(&ctx, yes).await,
        Command::Status { management_url } => {
            let config = ctx.load()?;
            let report = status::status_with(&config, &StatusOptions { management_url }).await;
            let text = if json { pretty(&report.to_json()) } else { report.to_string() };
            finish(&text, ok_if(report.is_complete(), ExitCode::FAILURE))
        }
        Command::Cancel { mut job_ids, file } => {
            if let Some(file) = file {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin()).context("cannot read job_ids from standard input")?
                } else {
                    std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
                };
                job_ids.extend(cancel::read_ids(&text));
            }
            let config = ctx.load()?;
            let found = cancel::cancel(&config, &job_ids).await.context("cannot cancel the jobs")?;
            let text = if json {
                found.iter().map(|f| f.to_json().to_string()).collect::<Vec<_>>().join("\n")
            } else {
                found.iter().map(|f| f.to_line()).collect::<Vec<_>>().join("\n")
            };
            finish(&text, ok_if(found.iter().all(|f| f.stopped()), ExitCode::from(PARTIAL)))
        }
        Command::Demo(_) if json => no_json("demo"),
        Command::Demo(args) => {
            let config = ctx.load()?;
            let options = DemoOptions {
                timeout: Duration::from_secs(args.timeout),
                kind: args.kind,
                ..DemoOptions::new(&config)
            };
            eprintln!("starting the demo in namespace {} …", options.namespace);
            let report = demo::run(&options).await.context("the demo failed")?;
            finish(&report.to_string(), ExitCode::SUCCESS)
        }
    }
}

async fn check_command(ctx: &Ctx, offline: bool, json: bool) -> anyhow::Result<ExitCode> {
    let config = match ctx.load() {
        Ok(c) => c,
        Err(e) => {
            let problem = format!("configuration: {e:#}");
            let text = if json {
                pretty(&json!({"passed": false, "findings": [{"level": "problem", "text": problem}]}))
            } else {
                format!("FAIL  {problem}\nfix it and run `wxpush-ctl check` again\n")
            };
            return finish(&text, ExitCode::FAILURE);
        }
    };
    let source = ctx.config_path.as_deref().map_or_else(|| "built-in defaults".into(), |p| p.display().to_string());
    // The effective configuration first (what the checks below are about), secrets redacted.
    let loaded = format!(
        "  ok  configuration loaded from {source} and the WXPUSH_* environment\n\
         # the effective configuration (secrets redacted):\n{}\n",
        config.to_redacted_toml()
    );
    if !json && !write_out(&loaded)? {
        // Nobody reads the report: the checks are still worth their exit code.
        let report = check::check_with(&config, CheckOptions { offline }).await;
        return Ok(ok_if(report.passed(), ExitCode::FAILURE));
    }
    let report = check::check_with(&config, CheckOptions { offline }).await;
    let text = if json {
        let mut document = report.to_json();
        document["config"] = serde_json::to_value(config.redacted())?;
        pretty(&document)
    } else {
        report.to_string()
    };
    finish(&text, ok_if(report.passed(), ExitCode::FAILURE))
}

async fn publish_command(ctx: &Ctx, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let config = ctx.load()?;
    let (input, name, size) = match (&args.file, &args.touser) {
        (Some(file), _) => open_input(file).await?,
        (None, Some(touser)) => {
            let (job_id, line) = match job_from_flags(touser, &args) {
                Ok(built) => built,
                Err(why) => {
                    eprintln!("error: {why}");
                    return Ok(ExitCode::from(USAGE));
                }
            };
            // A job built here is checked before it goes: a typo in a flag is an argument error.
            let check = publish::validate(&config, line.as_bytes(), "the flags").await?;
            if !args.dry_run && !check.all_good() {
                eprint!("{check}");
                return Ok(ExitCode::from(USAGE));
            }
            if !write_out(&format!("job_id {job_id}\n"))? {
                return Ok(ExitCode::SUCCESS);
            }
            let input: Box<dyn AsyncBufRead + Unpin + Send> = Box::new(std::io::Cursor::new(line.into_bytes()));
            (input, "the flags".to_owned(), None)
        }
        (None, None) => anyhow::bail!("give a FILE.jsonl (or - for standard input), or --touser/--template-id/--data"),
    };
    if args.dry_run {
        let report = publish::validate(&config, input, &name).await?;
        return finish(&report.to_string(), ok_if(report.all_good(), ExitCode::from(PARTIAL)));
    }
    let options =
        PublishOptions { wait: args.wait.then(|| Duration::from_secs(args.timeout)), ..PublishOptions::default() };
    let progress = progress::for_stderr(size);
    let report = publish::publish(&config, input, &name, &options, progress.as_ref())
        .await
        .with_context(|| format!("cannot publish {name} to {}", config.jobs_queue))?;
    let code = if report.interrupted.is_some() {
        ExitCode::FAILURE
    } else {
        ok_if(report.all_good(), ExitCode::from(PARTIAL))
    };
    finish(&report.to_string(), code)
}

/// One job line from `--touser --template-id --data k=v … [--job-id --account --url]`, and its
/// job_id.
fn job_from_flags(touser: &str, args: &PublishArgs) -> Result<(String, String), String> {
    let flags = JobFlags {
        touser: touser.to_owned(),
        template_id: args.template_id.clone().unwrap_or_default(),
        data: args.data.clone(),
        job_id: args.job_id.clone(),
        account: args.account.clone(),
        kind: args.kind.clone(),
        url: args.url.clone(),
        page: args.page.clone(),
        miniprogram_state: args.miniprogram_state.clone(),
        lang: args.lang.clone(),
    };
    flags.to_line()
}

async fn results_command(ctx: &Ctx, args: ResultsArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = ctx.load()?;
    let source = if args.live { Source::Live } else { Source::Unrouted { take: args.take } };
    let options = ShowOptions {
        source,
        pattern: args.pattern,
        follow: args.follow || args.live,
        limit: args.limit,
        timeout: args.timeout.map(Duration::from_secs),
    };
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    telemetry::cancel_on_signal(&tasks, stop.clone());
    let mut closed = false;
    let mut write_error = None;
    let mut emit = |r: &ReceivedResult| {
        let mut line = if json { r.to_json().to_string() } else { r.to_line() };
        line.push('\n');
        match write_out(&line) {
            Ok(true) => true,
            Ok(false) => {
                closed = true;
                false
            }
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    };
    let summary = results::show(&config, &options, &stop, &mut emit).await.context("cannot show results");
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let summary = summary?;
    if let Some(e) = write_error {
        return Err(e);
    }
    if !closed {
        eprintln!("{summary}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn purge_command(ctx: &Ctx, yes: bool) -> anyhow::Result<ExitCode> {
    let config = ctx.load()?;
    let queue = &config.dead_letter_queue;
    let count = dead::count(&config).await.with_context(|| format!("cannot look at the dead-letter queue {queue}"))?;
    let Some(count) = count else {
        return finish(&format!("dead-letter queue {queue} does not exist yet; nothing to purge\n"), ExitCode::SUCCESS);
    };
    if !yes {
        eprint!("remove all {count} parked jobs from {queue}? They cannot be brought back. Type yes to go on: ");
        let mut answer = String::new();
        BufReader::new(tokio::io::stdin()).read_line(&mut answer).await.context("cannot read the answer")?;
        if answer.trim() != "yes" {
            eprintln!("\nnothing purged (the answer was not \"yes\"; --yes skips the question)");
            return Ok(ExitCode::FAILURE);
        }
    }
    let report = dead::purge(&config).await.with_context(|| format!("cannot purge the dead-letter queue {queue}"))?;
    finish(&report.to_string(), ExitCode::SUCCESS)
}

type Input = (Box<dyn AsyncBufRead + Unpin + Send>, String, Option<u64>);

/// The file (with its size, for the progress bar) or standard input.
async fn open_input(path: &Path) -> anyhow::Result<Input> {
    if path.as_os_str() == "-" {
        return Ok((Box::new(BufReader::new(tokio::io::stdin())), "standard input".into(), None));
    }
    let name = path.display().to_string();
    let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {name} (is the path right?)"))?;
    let size = file.metadata().await.ok().map(|m| m.len());
    Ok((Box::new(BufReader::with_capacity(256 * 1024, file)), name, size))
}
