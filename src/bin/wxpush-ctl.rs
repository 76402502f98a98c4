//! wxpush-ctl: the operators' tool. Parses arguments, calls `wxpush::ctl`, prints the result.
//!
//! Exit codes: 0 success; 1 the command could not do its work (configuration, RabbitMQ or
//! Redis unreachable) or `check`/`status` found a problem; 2 bad arguments; 3 the command ran
//! but not everything went well (`publish`: lines skipped, jobs not confirmed, failed or
//! missing results; `dead replay`: jobs not found or not moved).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncBufRead, BufReader};
use wxpush::{
    config::Config,
    ctl::{
        check, dead,
        demo::{self, DemoOptions},
        progress,
        publish::{self, PublishOptions},
        status,
    },
};

const PARTIAL: u8 = 3;

#[derive(Parser)]
#[command(
    name = "wxpush-ctl",
    version,
    about = "Operate a wxpush worker pool: check the setup, publish jobs, inspect and replay the dead-letter queue, \
             show status, run the demo",
    after_help = "Exit codes: 0 success; 1 error (configuration, RabbitMQ or Redis) or a failed check; 2 bad \
                  arguments; 3 done, but not everything went well (skipped lines, failed or missing results, jobs \
                  not found)."
)]
struct Cli {
    /// Configuration file (see config/default.toml); WXPUSH_* variables override it.
    #[arg(long, env = "WXPUSH_CONFIG", global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration, the accounts (which credentials are set), RabbitMQ and Redis.
    Check,
    /// Publish jobs from a JSONL file (one JSON job object a line) to the jobs queue.
    Publish(PublishArgs),
    /// Inspect or replay the dead-letter queue.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Per account: token age, token-fetch back-off, today's sends, pauses; and queue lengths.
    Status,
    /// Run the quick start in one process: sandbox + worker + one job, in a namespace of its own.
    Demo(DemoArgs),
}

#[derive(Args)]
struct PublishArgs {
    /// JSONL file of jobs; `-` reads standard input. Lines that are not JSON objects are
    /// reported and skipped; blank lines are ignored.
    #[arg(value_name = "FILE.jsonl")]
    file: PathBuf,
    /// After publishing, wait for each job's send result and print a summary.
    #[arg(long)]
    wait: bool,
    /// With --wait: how long to wait for results after the last job is published.
    #[arg(long, value_name = "SECS", default_value_t = 120, requires = "wait")]
    timeout: u64,
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
}

#[derive(Args)]
struct DemoArgs {
    /// How long to wait for the example job's result.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause its parent already quoted.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Warnings and errors only (the demo's worker logs through this), on stderr; RUST_LOG overrides.
/// lapin is silenced: it logs the expected "no such queue" answers to existence checks as errors,
/// and every error it raises reaches the user through this tool's own messages.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=off"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).try_init();
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Config::load(path).context(
        "cannot load the configuration (fix the file given by --config / WXPUSH_CONFIG, or the WXPUSH_* variable named)",
    )
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = cli.config.as_deref();
    match cli.command {
        Command::Check => {
            let config = match Config::load(config_path) {
                Ok(c) => c,
                Err(e) => {
                    println!("FAIL  configuration: {e}");
                    println!("fix it and run `wxpush-ctl check` again");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let source = config_path.map_or_else(|| "built-in defaults".into(), |p| p.display().to_string());
            println!("  ok  configuration loaded from {source} and the WXPUSH_* environment");
            let report = check::check(&config).await;
            print!("{report}");
            Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Publish(args) => {
            let config = load(config_path)?;
            let options = PublishOptions {
                wait: args.wait.then(|| Duration::from_secs(args.timeout)),
                ..PublishOptions::default()
            };
            let (input, name, size) = open_input(&args.file).await?;
            let progress = progress::for_stderr(size);
            let report = publish::publish(&config, input, &name, &options, progress.as_ref())
                .await
                .with_context(|| format!("cannot publish {name} to {}", config.jobs_queue))?;
            print!("{report}");
            Ok(if report.interrupted.is_some() {
                ExitCode::FAILURE
            } else if report.all_good() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(PARTIAL)
            })
        }
        Command::Dead(DeadCommand::List { limit }) => {
            let config = load(config_path)?;
            let list = dead::list(&config, limit)
                .await
                .with_context(|| format!("cannot list the dead-letter queue {}", config.dead_letter_queue))?;
            print!("{list}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dead(DeadCommand::Replay { job_id, all, dry_run }) => {
            let config = load(config_path)?;
            let selection = if all {
                dead::Selection::All
            } else {
                dead::Selection::JobIds(job_id.into_iter().collect::<BTreeSet<_>>())
            };
            let report = dead::replay(&config, &dead::ReplayOptions { selection, dry_run })
                .await
                .with_context(|| format!("cannot replay the dead-letter queue {}", config.dead_letter_queue))?;
            print!("{report}");
            Ok(if report.all_good() { ExitCode::SUCCESS } else { ExitCode::from(PARTIAL) })
        }
        Command::Status => {
            let config = load(config_path)?;
            let report = status::status(&config).await;
            print!("{report}");
            Ok(if report.is_complete() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Demo(args) => {
            let config = load(config_path)?;
            let options = DemoOptions { timeout: Duration::from_secs(args.timeout), ..DemoOptions::new(&config) };
            eprintln!("starting the demo in namespace {} …", options.namespace);
            let report = demo::run(&options).await.context("the demo failed")?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
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
