//! Scale-out: does the pool grow with its worker processes, and does it keep one rate limit
//! whatever its size?
//!
//! `cargo bench --bench scale [-- --jobs N --workers 1,2,4 --latency-ms 100 --concurrency 32
//!  --rate 150 --rate-jobs N --queue-type quorum --redis-url URL]`
//!
//! 1. Throughput: for each pool size, `N × workers` jobs (default N = 2500) are published first,
//!    then that many `wxpush-worker` processes (the real binary) start. The sandbox answers each
//!    send after `latency-ms`, so one worker is bound by its concurrency (32 in flight / 100 ms ≈
//!    320 jobs/s at best): jobs/s (first result to last) and the ratio to one worker show how the
//!    pool scales. Goal: ≥ 1.8× with 2 workers, ≥ 3.4× with 4.
//! 2. Rate limit: the same pool sizes with `rate` sends/s set pool-wide (`rate-jobs` jobs each
//!    run): the most sends any 1-second window saw at the sandbox, and the mean rate.
//!
//! Everything runs on this machine: RabbitMQ, Redis, the sandbox (in this process) and the
//! workers share its cores, so the figures are what this machine gives; "CPU busy" says how
//! much of the machine a run used (near 100 % means the machine, not the pool, was the limit).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
};
use serde_json::json;
use tokio::net::TcpListener;
use wxpush::{
    amqp::Topology,
    config::{Config, QueueType},
    sandbox::{Faults, Sandbox, SandboxAccount, SandboxConfig},
};

// The test suite's services, of which a bench uses a few.
#[allow(dead_code)]
#[path = "../tests/it/harness/services.rs"]
mod services;
use services::{amqp_url, redis_url};

const APPID: &str = "wxbench000000001";
const SECRET: &str = "bench-secret";

struct Options {
    jobs_per_worker: usize,
    workers: Vec<usize>,
    latency_ms: u64,
    concurrency: u16,
    rate: u32,
    rate_jobs: usize,
    queue_type: QueueType,
    redis_url: String,
}

fn options() -> Options {
    let mut o = Options {
        jobs_per_worker: 2500,
        workers: vec![1, 2, 4],
        latency_ms: 100,
        concurrency: 32,
        rate: 150,
        rate_jobs: 1500,
        queue_type: QueueType::default(),
        redis_url: redis_url().into(),
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--jobs" => o.jobs_per_worker = value.parse().expect("--jobs N (per worker)"),
            "--workers" => o.workers = value.split(',').map(|w| w.trim().parse().expect("--workers 1,2,4")).collect(),
            "--latency-ms" => o.latency_ms = value.parse().expect("--latency-ms N"),
            "--concurrency" => o.concurrency = value.parse().expect("--concurrency N"),
            "--rate" => o.rate = value.parse().expect("--rate N (0 skips the rate runs)"),
            "--rate-jobs" => o.rate_jobs = value.parse().expect("--rate-jobs N"),
            "--queue-type" => o.queue_type = value.parse().expect("--queue-type quorum|classic"),
            "--redis-url" => o.redis_url = value,
            // cargo bench passes `--bench`; anything unknown is skipped alone.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// One measured run.
struct Run {
    workers: usize,
    jobs: usize,
    jobs_per_sec: f64,
    /// The most sends the sandbox accepted in any 1-second window, and the mean send rate.
    max_window: usize,
    mean_rate: f64,
    /// Share of the machine's CPU time used while the run lasted.
    cpu_busy: f64,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: a minute of load
    // is no test, so only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("scale: run it with `cargo bench --bench scale`");
        return;
    }
    let o = options();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut throughput = Vec::new();
    for &workers in &o.workers {
        let run = rt.block_on(measure(&o, workers, o.jobs_per_worker * workers, 0));
        eprintln!("{workers} worker(s), no limit: {:.0} jobs/s, CPU busy {:.0} %", run.jobs_per_sec, run.cpu_busy);
        throughput.push(run);
    }
    let mut limited = Vec::new();
    if o.rate > 0 {
        for &workers in &o.workers {
            let run = rt.block_on(measure(&o, workers, o.rate_jobs, o.rate));
            eprintln!(
                "{workers} worker(s), limit {}/s: max 1-s window {}, mean {:.1}/s",
                o.rate, run.max_window, run.mean_rate
            );
            limited.push(run);
        }
    }
    report(&o, &throughput, &limited);
}

async fn measure(o: &Options, workers: usize, jobs: usize, rate: u32) -> Run {
    let ns = format!("wxpush-bench-scale-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let sandbox = Sandbox::start(
        SandboxConfig {
            accounts: vec![SandboxAccount::new(APPID, SECRET)],
            faults: Faults { latency_ms: o.latency_ms, ..Faults::default() },
            ..SandboxConfig::default()
        },
        TcpListener::bind("127.0.0.1:0").await.expect("bind the sandbox"),
    )
    .await
    .expect("start the sandbox");
    let config = Config {
        jobs_queue: format!("{ns}.jobs"),
        results_exchange: format!("{ns}.results"),
        dead_letter_queue: format!("{ns}.dead"),
        queue_type: o.queue_type,
        ..Config::default()
    };
    let topology = Topology::from_config(&config);
    let conn = Connection::connect(amqp_url(), ConnectionProperties::default()).await.expect("RabbitMQ is up");
    let ch = conn.create_channel().await.expect("channel");
    topology.declare(&conn).await.expect("declare the topology as the workers do");
    let observed = format!("{ns}.observed");
    ch.queue_declare(ShortString::from(observed.as_str()), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare the observer queue");
    ch.queue_bind(
        ShortString::from(observed.as_str()),
        ShortString::from(config.results_exchange.as_str()),
        ShortString::from("#"),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the observer queue");

    // Every job is in the queue before the first worker starts.
    ch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let body = json!({
                "job_id": format!("scale-{i}"),
                "touser": format!("user-{i}"),
                "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
                "data": {"User": {"value": "黄先生", "color": "#173177"}}
            });
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"));
            confirms.push(
                ch.basic_publish(
                    ShortString::from(""),
                    ShortString::from(config.jobs_queue.as_str()),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&body).expect("json"),
                    props,
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            c.await.expect("confirmed");
        }
    }

    let results_ch = conn.create_channel().await.expect("channel");
    results_ch.basic_qos(1000, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = results_ch
        .basic_consume(
            ShortString::from(observed.as_str()),
            ShortString::from("bench"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume results");

    let cpu_before = machine_cpu();
    let mut children: Vec<Child> = (0..workers)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_wxpush-worker"))
                .env("WXPUSH_AMQP_URL", amqp_url())
                .env("WXPUSH_REDIS_URL", &o.redis_url)
                .env("WXPUSH_REDIS_PREFIX", &ns)
                .env("WXPUSH_WECHAT_API_BASE", sandbox.base_url())
                .env("WXPUSH_JOBS_QUEUE", &config.jobs_queue)
                .env("WXPUSH_RESULTS_EXCHANGE", &config.results_exchange)
                .env("WXPUSH_DEAD_LETTER_QUEUE", &config.dead_letter_queue)
                .env("WXPUSH_QUEUE_TYPE", o.queue_type.as_str())
                .env("WXPUSH_CONCURRENCY", o.concurrency.to_string())
                .env("WXPUSH_RATE_LIMIT", rate.to_string())
                .env("WXPUSH_METRICS_LISTEN", "127.0.0.1:0")
                .env("WXPUSH_APPID", APPID)
                .env("WXPUSH_APPSECRET", SECRET)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("start wxpush-worker")
        })
        .collect();

    let mut seen = vec![false; jobs];
    let (mut count, mut first, mut last) = (0, None, Instant::now());
    while count < jobs {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await else { break };
        let id = d.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default();
        let Some(i) = id.strip_prefix("scale-").and_then(|n| n.parse::<usize>().ok()) else { continue };
        if i < jobs && !seen[i] {
            seen[i] = true;
            count += 1;
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
    }
    let cpu_after = machine_cpu();
    for c in &children {
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
    }
    for c in &mut children {
        let _ = c.wait();
    }

    for (queue, _) in topology.queues().into_iter().chain([(observed.clone(), FieldTable::default())]) {
        let ch = conn.create_channel().await.expect("channel");
        let _ = ch.queue_delete(ShortString::from(queue.as_str()), QueueDeleteOptions::default()).await;
    }
    let ch = conn.create_channel().await.expect("channel");
    let unrouted = wxpush::amqp::unrouted_name(&config.results_exchange);
    for exchange in [&config.results_exchange, &unrouted] {
        let _ = ch.exchange_delete(ShortString::from(exchange.as_str()), ExchangeDeleteOptions::default()).await;
    }
    let _ = conn.close(200, ShortString::from("done")).await;
    delete_prefix(&o.redis_url, &ns).await;

    assert_eq!(count, jobs, "{workers} worker(s): only {count} of {jobs} results arrived");
    assert_eq!(sandbox.stats().sends_accepted, jobs as u64, "{workers} worker(s): every job sent once");
    let (max_window, mean_rate) =
        window_stats(&sandbox.messages().iter().map(|m| m.accepted_at.timestamp_micros()).collect::<Vec<_>>());
    let span = last.duration_since(first.unwrap_or(last)).as_secs_f64().max(1e-9);
    let (busy, total) = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
    Run {
        workers,
        jobs,
        jobs_per_sec: (jobs - 1) as f64 / span,
        max_window,
        mean_rate,
        cpu_busy: 100.0 * busy as f64 / (total as f64).max(1.0),
    }
}

fn report(o: &Options, throughput: &[Run], limited: &[Run]) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!();
    println!(
        "scale-out: sandbox latency {} ms, concurrency {} per worker, {} queues, {cores} cores",
        o.latency_ms, o.concurrency, o.queue_type
    );
    println!();
    println!("| workers | jobs | jobs/s | × 1 worker | goal | CPU busy |");
    println!("|---|---|---|---|---|---|");
    let one = throughput.iter().find(|r| r.workers == 1).map(|r| r.jobs_per_sec);
    for r in throughput {
        let ratio = one.map(|one| r.jobs_per_sec / one);
        let goal = match r.workers {
            2 => Some(1.8),
            4 => Some(3.4),
            _ => None,
        };
        let verdict = match (ratio, goal) {
            (Some(ratio), Some(goal)) if ratio >= goal => format!("≥ {goal}× met"),
            (Some(_), Some(goal)) => format!("≥ {goal}× missed"),
            _ => String::new(),
        };
        println!(
            "| {} | {} | {:.0} | {} | {verdict} | {:.0} % |",
            r.workers,
            r.jobs,
            r.jobs_per_sec,
            ratio.map_or_else(String::new, |x| format!("{x:.2}×")),
            r.cpu_busy
        );
    }
    if limited.is_empty() {
        return;
    }
    let allowed = (o.rate as f64 * 1.1).floor() as usize;
    println!();
    println!("pool-wide rate limit {}/s (a 1-second window may see at most {allowed}):", o.rate);
    println!();
    println!("| workers | jobs | max 1-s window | mean sends/s | mean ÷ limit | held |");
    println!("|---|---|---|---|---|---|");
    for r in limited {
        let held = if r.max_window <= allowed { "yes" } else { "NO" };
        println!(
            "| {} | {} | {} | {:.1} | {:.0} % | {held} |",
            r.workers,
            r.jobs,
            r.max_window,
            r.mean_rate,
            100.0 * r.mean_rate / o.rate as f64
        );
    }
}

/// The most events in any 1-second window, and the mean rate from first to last (µs stamps).
fn window_stats(times: &[i64]) -> (usize, f64) {
    let mut t = times.to_vec();
    t.sort_unstable();
    if t.len() < 2 {
        return (t.len(), 0.0);
    }
    let (mut most, mut start) = (0, 0);
    for end in 0..t.len() {
        while t[end] - t[start] >= 1_000_000 {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    let span = (t[t.len() - 1] - t[0]) as f64 / 1e6;
    (most, (t.len() - 1) as f64 / span)
}

/// The machine's (busy, total) CPU ticks so far, from /proc/stat.
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = fields.iter().sum();
    // idle + iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Removes the run's keys (single Redis only: a cluster's keys expire with their TTLs).
async fn delete_prefix(url: &str, prefix: &str) {
    if url.contains(',') {
        return;
    }
    if let Ok(redis) = wxpush::store::Redis::connect(url, prefix).await {
        let _ = redis.delete_all().await;
    }
}
