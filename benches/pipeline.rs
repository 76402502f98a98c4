//! The whole pipeline, measured against the bare minimum on the machine at hand.
//!
//! `cargo bench --bench pipeline [-- --jobs N --concurrency C --latencies 0,100 --workers 1,2 --queue-type quorum]`
//!
//! For each sandbox latency and worker count, N jobs are published first, then the worker
//! processes start; the report gives jobs/s (first result to last), worker CPU seconds per
//! 1,000 jobs, peak RSS per worker process, and p50/p99 from publish to result. "bare" is the
//! floor: a process that does consume → HTTP POST → confirmed publish → ack on lapin and reqwest
//! and nothing else (no token protocol, no idempotency ledger, no msgid record).
//!
//! Everything runs on this machine: RabbitMQ and Redis (local), the sandbox (in this process),
//! and the worker processes. The figures are what this machine gives, not a promise.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
};
use serde_json::json;
use tokio::net::TcpListener;
use wxpush::sandbox::{Faults, Sandbox, SandboxAccount, SandboxConfig};

// The test suite's services, of which a bench uses a few.
#[allow(dead_code)]
#[path = "../tests/it/harness/services.rs"]
mod services;
use services::{amqp_url, redis_url};

const APPID: &str = "wxbench000000001";
const SECRET: &str = "bench-secret";

struct Options {
    jobs: usize,
    concurrency: u16,
    latencies: Vec<u64>,
    workers: Vec<usize>,
    modes: Vec<String>,
    /// Kind of the jobs queue ("quorum", the default, or "classic").
    queue_type: wxpush::config::QueueType,
}

fn options() -> Options {
    let mut o = Options {
        jobs: 20_000,
        concurrency: 64,
        latencies: vec![0, 100],
        workers: vec![1, 2],
        modes: vec!["bare".into(), "wxpush".into()],
        queue_type: wxpush::config::QueueType::default(),
    };
    let args: Vec<String> = std::env::args().collect();
    fn list<T: std::str::FromStr>(s: &str) -> Vec<T> {
        s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
    }
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--jobs" => o.jobs = value.parse().expect("--jobs N"),
            "--concurrency" => o.concurrency = value.parse().expect("--concurrency N"),
            "--latencies" => o.latencies = list(&value),
            "--workers" => o.workers = list(&value),
            "--modes" => o.modes = value.split(',').map(str::to_owned).collect(),
            "--queue-type" => o.queue_type = value.parse().expect("--queue-type quorum|classic"),
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
#[derive(Debug, Clone)]
struct Run {
    mode: String,
    latency_ms: u64,
    workers: usize,
    jobs_per_sec: f64,
    cpu_ms_per_1000: f64,
    /// CPU per 1,000 jobs of RabbitMQ, Redis, and this process (the sandbox and the observer).
    broker_ms_per_1000: f64,
    redis_ms_per_1000: f64,
    harness_ms_per_1000: f64,
    peak_rss_mb: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bare-worker") {
        let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(bare_worker(
            get("--queue"),
            get("--exchange"),
            get("--api"),
            get("--concurrency").parse().unwrap(),
        ));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let opts = options();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let runs = rt.block_on(run_all(&opts));
    report(&opts, &runs);
}

async fn run_all(o: &Options) -> Vec<Run> {
    let mut runs = Vec::new();
    for &latency in &o.latencies {
        for &workers in &o.workers {
            for mode in &o.modes {
                let run = measure(mode, latency, workers, o).await;
                eprintln!(
                    "{mode:>6} latency {latency:>3} ms, {workers} worker(s): {:>7.0} jobs/s, CPU ms/1000 jobs: worker {:.0}, RabbitMQ {:.0}, Redis {:.0}, sandbox+observer {:.0}; {:.1} MB",
                    run.jobs_per_sec,
                    run.cpu_ms_per_1000,
                    run.broker_ms_per_1000,
                    run.redis_ms_per_1000,
                    run.harness_ms_per_1000,
                    run.peak_rss_mb
                );
                runs.push(run);
            }
        }
    }
    runs
}

async fn measure(mode: &str, latency_ms: u64, workers: usize, o: &Options) -> Run {
    let ns = format!("wxpush-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let sandbox = Sandbox::start(
        SandboxConfig {
            accounts: vec![SandboxAccount::new(APPID, SECRET)],
            faults: Faults { latency_ms, ..Faults::default() },
            ..SandboxConfig::default()
        },
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let conn = Connection::connect(amqp_url(), ConnectionProperties::default()).await.expect("RabbitMQ is up");
    let ch = conn.create_channel().await.unwrap();
    let jobs_queue = format!("{ns}.jobs");
    let exchange = format!("{ns}.results");
    let observed = format!("{ns}.observed");
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    // Declared as the worker declares it, so that the worker's own declare matches.
    let topology = wxpush::amqp::Topology::from_config(&wxpush::config::Config {
        jobs_queue: jobs_queue.clone(),
        dead_letter_queue: format!("{ns}.dead"),
        queue_type: o.queue_type,
        ..wxpush::config::Config::default()
    });
    ch.queue_declare(ShortString::from(jobs_queue.as_str()), durable, topology.jobs_queue_args()).await.unwrap();
    wxpush::amqp::declare_results_exchange(&ch, &exchange).await.unwrap();
    ch.queue_declare(ShortString::from(observed.as_str()), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        ShortString::from(observed.as_str()),
        ShortString::from(exchange.as_str()),
        ShortString::from("#"),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Publish every job first, with confirms, remembering when each went out.
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut published = Vec::with_capacity(o.jobs);
    for chunk in (0..o.jobs).collect::<Vec<_>>().chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let body = json!({
                "job_id": format!("bench-{i}"),
                "touser": format!("user-{i}"),
                "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
                "url": "http://weixin.qq.com/download",
                "data": {"User": {"value": "黄先生", "color": "#173177"}, "Money": {"value": "人民币260.00元", "color": "#173177"}}
            });
            published.push(Instant::now());
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(format!("bench-{i}")));
            confirms.push(
                ch.basic_publish(
                    ShortString::from(""),
                    ShortString::from(jobs_queue.as_str()),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&body).unwrap(),
                    props,
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
    }

    let results_ch = conn.create_channel().await.unwrap();
    results_ch.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let mut consumer = results_ch
        .basic_consume(
            ShortString::from(observed.as_str()),
            ShortString::from("bench"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let mut children: Vec<Child> = (0..workers)
        .map(|_| match mode {
            "bare" => Command::new(std::env::current_exe().unwrap())
                .args(["--bare-worker", "--queue", &jobs_queue, "--exchange", &exchange, "--api", &sandbox.base_url()])
                .args(["--concurrency", &o.concurrency.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
            _ => Command::new(env!("CARGO_BIN_EXE_wxpush-worker"))
                .env("WXPUSH_AMQP_URL", amqp_url())
                .env("WXPUSH_REDIS_URL", redis_url())
                .env("WXPUSH_REDIS_PREFIX", &ns)
                .env("WXPUSH_WECHAT_API_BASE", sandbox.base_url())
                .env("WXPUSH_JOBS_QUEUE", &jobs_queue)
                .env("WXPUSH_RESULTS_EXCHANGE", &exchange)
                .env("WXPUSH_DEAD_LETTER_QUEUE", format!("{ns}.dead"))
                .env("WXPUSH_QUEUE_TYPE", o.queue_type.as_str())
                .env("WXPUSH_CONCURRENCY", o.concurrency.to_string())
                .env("WXPUSH_METRICS_LISTEN", "127.0.0.1:0")
                .env("WXPUSH_APPID", APPID)
                .env("WXPUSH_APPSECRET", SECRET)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        })
        .collect();
    let cpu_before: u64 = children.iter().map(|c| cpu_ticks(c.id())).sum();
    let others_before = [pids_of("beam.smp"), pids_of("redis-server"), vec![std::process::id()]]
        .map(|pids| pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>());

    let mut latencies = Vec::with_capacity(o.jobs);
    let mut seen = vec![false; o.jobs];
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < o.jobs && Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await else { break };
        let now = Instant::now();
        let id = d.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default();
        let Some(i) = id.strip_prefix("bench-").and_then(|n| n.parse::<usize>().ok()) else { continue };
        if i < o.jobs && !seen[i] {
            seen[i] = true;
            count += 1;
            latencies.push(now - published[i]);
            first.get_or_insert(now);
            last = now;
        }
    }
    let peak_rss_kb: u64 = children.iter().map(|c| peak_rss_kb(c.id())).max().unwrap_or(0);
    let cpu_after: u64 = children.iter().map(|c| cpu_ticks(c.id())).sum();
    let others_after = [pids_of("beam.smp"), pids_of("redis-server"), vec![std::process::id()]]
        .map(|pids| pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>());
    for c in &mut children {
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
    }
    for c in &mut children {
        let _ = c.wait();
    }
    assert_eq!(count, o.jobs, "{mode}: only {count} of {} results arrived", o.jobs);
    let stats = sandbox.stats();
    assert_eq!(stats.sends_accepted, o.jobs as u64, "{mode}: every job sent once");

    let unrouted = wxpush::amqp::unrouted_name(&exchange);
    for q in [&jobs_queue, &observed, &format!("{ns}.dead"), &unrouted] {
        let _ = ch.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default()).await;
    }
    let ch2 = conn.create_channel().await.unwrap();
    for t in wxpush::config::RetrySettings::default().delay_tiers_secs {
        let _ = ch2
            .queue_delete(ShortString::from(format!("{jobs_queue}.delay.{t}s")), QueueDeleteOptions::default())
            .await;
    }
    for x in [&exchange, &unrouted] {
        let _ = ch2.exchange_delete(ShortString::from(x.as_str()), ExchangeDeleteOptions::default()).await;
    }
    delete_prefix(&ns).await;

    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    let span = last.duration_since(first.unwrap_or(last)).as_secs_f64().max(1e-9);
    let ticks = sysconf_ticks();
    let per_1000 =
        |before: u64, after: u64| after.saturating_sub(before) as f64 / ticks * 1000.0 / o.jobs as f64 * 1000.0;
    Run {
        broker_ms_per_1000: per_1000(others_before[0], others_after[0]),
        redis_ms_per_1000: per_1000(others_before[1], others_after[1]),
        harness_ms_per_1000: per_1000(others_before[2], others_after[2]),
        mode: mode.to_owned(),
        latency_ms,
        workers,
        jobs_per_sec: (o.jobs - 1) as f64 / span,
        cpu_ms_per_1000: per_1000(cpu_before, cpu_after),
        peak_rss_mb: peak_rss_kb as f64 / 1024.0,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

fn report(o: &Options, runs: &[Run]) {
    println!();
    println!(
        "pipeline benchmark: {} jobs, concurrency {} per worker, {} queues, {} cores",
        o.jobs,
        o.concurrency,
        o.queue_type,
        num_cpus()
    );
    println!(
        "| latency | workers | mode   |  jobs/s | CPU ms / 1000 jobs | peak RSS MB | p50 ms | p99 ms | ÷ bare (jobs/s, CPU) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let bare: HashMap<(u64, usize), &Run> =
        runs.iter().filter(|r| r.mode == "bare").map(|r| ((r.latency_ms, r.workers), r)).collect();
    for r in runs {
        let ratio = match (r.mode.as_str(), bare.get(&(r.latency_ms, r.workers))) {
            ("wxpush", Some(b)) => format!(
                "{:.0} % / {:.2}×",
                100.0 * r.jobs_per_sec / b.jobs_per_sec,
                r.cpu_ms_per_1000 / b.cpu_ms_per_1000.max(1e-9)
            ),
            _ => String::new(),
        };
        println!(
            "| {} ms | {} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {} |",
            r.latency_ms,
            r.workers,
            r.mode,
            r.jobs_per_sec,
            r.cpu_ms_per_1000,
            r.peak_rss_mb,
            r.p50_ms,
            r.p99_ms,
            ratio
        );
    }
}

/// The bare minimum: consume → POST → confirmed publish → ack, on lapin and reqwest.
async fn bare_worker(queue: String, exchange: String, api: String, concurrency: u16) {
    let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
    let token: serde_json::Value = http
        .post(format!("{api}/cgi-bin/stable_token"))
        .json(&json!({"grant_type": "client_credential", "appid": APPID, "secret": SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = Arc::new(format!(
        "{api}/cgi-bin/message/template/send?access_token={}",
        token["access_token"].as_str().unwrap()
    ));
    let conn = Connection::connect(amqp_url(), ConnectionProperties::default()).await.unwrap();
    let consume = conn.create_channel().await.unwrap();
    consume.basic_qos(concurrency, BasicQosOptions::default()).await.unwrap();
    let publish = conn.create_channel().await.unwrap();
    publish.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut consumer = consume
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from("bare"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let exchange = Arc::new(exchange);
    let inflight = Arc::new(Mutex::new(0usize));
    while let Some(Ok(delivery)) = consumer.next().await {
        let (http, url, publish, exchange, _inflight) =
            (http.clone(), url.clone(), publish.clone(), exchange.clone(), inflight.clone());
        tokio::spawn(async move {
            let answer: serde_json::Value =
                http.post(url.as_str()).body(delivery.data.clone()).send().await.unwrap().json().await.unwrap();
            let id = delivery.properties.message_id().clone().unwrap_or_default();
            let result =
                json!({"type": "send", "job_id": id.as_str(), "status": "succeeded", "msgid": answer["msgid"]});
            publish
                .basic_publish(
                    ShortString::from(exchange.as_str()),
                    ShortString::from("send.succeeded"),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&result).unwrap(),
                    BasicProperties::default().with_delivery_mode(2).with_correlation_id(id),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        });
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Processes whose command name is `name` (RabbitMQ's VM, Redis).
fn pids_of(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name))
        .collect()
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sysconf_ticks() -> f64 {
    // CLK_TCK is 100 on every Linux this runs on; `getconf` confirms it without libc.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

async fn delete_prefix(prefix: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}
