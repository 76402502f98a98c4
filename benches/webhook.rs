//! Load benchmark of wxpush-webhook: runs the real `wxpush-webhook` binary (release build) against
//! the local RabbitMQ and Redis, fires N signed TEMPLATESENDJOBFINISH receipts (plaintext, then
//! safe mode) over keep-alive HTTP/1.1 connections, checks on the results exchange that every
//! event arrived exactly once, and reports for each mode receipts per second, latency (p50, p99,
//! max) and the webhook's peak RSS. Then it floods the webhook with stalled connections and
//! reports its RSS with them open and after the header timeout closed them.
//!
//! ```text
//! cargo bench --bench webhook                           # 20,000 receipts per mode, 64 connections
//! cargo bench --bench webhook -- --rate 6500            # paced at 6,500 receipts/s
//! cargo bench --bench webhook -- --n 50000 --stalled 0  # no flood
//! ```
//!
//! The webhook runs as its own process, so its RSS is its own: the load generator (bare hyper
//! client connections, requests signed and encrypted before the clock starts) is not in it.
//! Everything it creates (exchange, queues, Redis keys under a random prefix, a config file) is
//! deleted at the end. It only talks to 127.0.0.1.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lapin::{
    Connection, ConnectionProperties,
    options::{
        BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
};
use rand::{Rng, distr::Alphanumeric};
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    process::{Child, Command},
};
use wxpush::{
    domain::crypto::{self, Cipher},
    store::Redis,
};

#[derive(Parser)]
#[command(about = "Load benchmark of wxpush-webhook against a local RabbitMQ and Redis")]
struct Args {
    /// Receipts per mode.
    #[arg(long, default_value_t = 20_000)]
    n: u64,
    /// Concurrent HTTP connections (each sends its next receipt when the last is answered).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Receipts per second to send at (0: as fast as the webhook answers). Latency is counted
    /// from when a receipt was due, so a webhook that falls behind shows it.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Modes to run: plain, aes or both.
    #[arg(long, default_value = "both")]
    mode: String,
    /// Stalled connections to open after the runs (half a request head, then nothing), to
    /// measure the webhook's memory under a slow-client flood and after it; 0 = none.
    #[arg(long, default_value_t = 2_000)]
    stalled: usize,
    #[arg(long, env = "WXPUSH_TEST_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, env = "WXPUSH_TEST_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Leave out the msgid records, so every receipt waits for one and goes out with job_id null
    /// (measures the worst case; use a small --n).
    #[arg(long)]
    no_records: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const APPID: &str = "wxbench000000001";
const TOKEN: &str = "benchtoken";
const WEBHOOK: &str = env!("CARGO_BIN_EXE_wxpush-webhook");

fn random(n: usize) -> String {
    rand::rng().sample_iter(Alphanumeric).take(n).map(char::from).collect()
}

fn receipt_xml(msgid: u64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName><FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName><CreateTime>1395658984</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>{msgid}</MsgID><Status><![CDATA[success]]></Status></xml>"
    )
}

/// A free port on 127.0.0.1 (asked of the kernel, then handed to the webhook).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The webhook process under test.
struct Webhook {
    child: Child,
    pid: u32,
    public: String,
    admin: String,
}

impl Webhook {
    async fn start(config_path: &std::path::Path, args: &Args) -> anyhow::Result<Webhook> {
        let (public, admin) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
        let child = Command::new(WEBHOOK)
            .arg("--config")
            .arg(config_path)
            .env("WXPUSH_WEBHOOK_LISTEN", &public)
            .env("WXPUSH_WEBHOOK_ADMIN_LISTEN", &admin)
            .env("WXPUSH_AMQP_URL", &args.amqp_url)
            .env("WXPUSH_REDIS_URL", &args.redis_url)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {WEBHOOK}"))?;
        let pid = child.id().context("the webhook exited at once")?;
        let webhook = Webhook { child, pid, public, admin };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(get(&webhook.admin, "/readyz").await, Ok((200, _))) {
            ensure!(Instant::now() < deadline, "the webhook was not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(webhook)
    }

    /// (current RSS, peak RSS) in KiB, from /proc.
    fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
            Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Resets the peak RSS the kernel reports (VmHWM), so that each run's peak is its own.
    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }

    async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let (_, text) = get(&self.admin, "/metrics").await?;
        Ok(text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        // SIGTERM, as Kubernetes would; the webhook drains and exits.
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status().await;
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => ensure!(status?.success(), "the webhook exited with an error"),
            Err(_) => {
                self.child.kill().await?;
                bail!("the webhook did not stop within 30 s of SIGTERM");
            }
        }
        Ok(())
    }
}

/// One plain GET (the admin endpoints), on a connection of its own.
async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path).header(hyper::header::HOST, addr).body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What one run measured.
struct Run {
    elapsed: Duration,
    /// Microseconds from when each receipt was due (or sent) to its answer.
    latencies: Vec<u64>,
    failures: HashMap<u16, u64>,
}

/// Sends every request over `connections` keep-alive connections; each connection takes the next
/// request when its last one is answered (and, with `rate`, not before the request is due).
async fn fire(addr: &str, requests: Vec<(String, Bytes)>, connections: usize, rate: u64) -> anyhow::Result<Run> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (requests, next, addr) = (requests.clone(), next.clone(), addr.to_owned());
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            let mut failures: HashMap<u16, u64> = HashMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((uri, body)) = requests.get(i) else { break };
                let due = match rate {
                    0 => Instant::now(),
                    r => started + Duration::from_secs_f64(i as f64 / r as f64),
                };
                tokio::time::sleep_until(due.into()).await;
                let req = hyper::Request::post(uri.as_str())
                    .header(hyper::header::HOST, addr.as_str())
                    .body(Full::new(body.clone()))?;
                let answer = match sender.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                            Ok(b) if status == 200 && b == "success" => None,
                            _ => Some(status),
                        }
                    }
                    Err(_) => Some(0),
                };
                latencies.push(due.elapsed().as_micros() as u64);
                if let Some(code) = answer {
                    *failures.entry(code).or_default() += 1;
                    if code == 0 {
                        break; // the connection is gone
                    }
                }
            }
            anyhow::Ok((latencies, failures))
        }));
    }
    let mut run = Run { elapsed: Duration::ZERO, latencies: Vec::new(), failures: HashMap::new() };
    for task in tasks {
        let (latencies, failures) = task.await??;
        run.latencies.extend(latencies);
        for (code, n) in failures {
            *run.failures.entry(code).or_default() += n;
        }
    }
    run.elapsed = started.elapsed();
    run.latencies.sort_unstable();
    Ok(run)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let modes: Vec<bool> = match args.mode.as_str() {
        "plain" => vec![false],
        "aes" => vec![true],
        "both" => vec![false, true],
        other => bail!("--mode {other:?}: expected plain, aes or both"),
    };

    let id = random(8).to_lowercase();
    let exchange = format!("wxpush.bench.{id}.results");
    let dlq = format!("wxpush.bench.{id}.dead");
    let observer = format!("wxpush.bench.{id}.observer");
    let prefix = format!("wxpush-bench-{id}");
    let aes_key = random(43);
    // Two accounts with the same appid and Token: `plain` takes plaintext pushes (no AES key),
    // `default` is in safe mode and takes only encrypted ones.
    let toml = format!(
        "redis_prefix = \"{prefix}\"\njobs_queue = \"wxpush.bench.{id}.jobs\"\nresults_exchange = \"{exchange}\"\n\
         dead_letter_queue = \"{dlq}\"\n\
         [[accounts]]\nname = \"default\"\nappid = \"{APPID}\"\ncallback_token = \"{TOKEN}\"\nencoding_aes_key = \"{aes_key}\"\n\
         [[accounts]]\nname = \"plain\"\nappid = \"{APPID}\"\ncallback_token = \"{TOKEN}\"\n"
    );
    let config_path = std::env::temp_dir().join(format!("wxpush-bench-{id}.toml"));
    std::fs::write(&config_path, toml)?;

    // The observer: a queue bound to every delivery event, consumed throughout the run.
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await.context("RabbitMQ")?;
    let channel = conn.create_channel().await?;
    wxpush::amqp::declare_results_exchange(&channel, &exchange).await?;
    channel
        .queue_declare(
            ShortString::from(observer.as_str()),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            ShortString::from(observer.as_str()),
            ShortString::from(exchange.as_str()),
            ShortString::from("delivery.#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel.basic_qos(2_000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            ShortString::from(observer.as_str()),
            ShortString::from("bench-observer"),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let redis = Redis::connect(&args.redis_url, &prefix).await?;

    let result = run_all(&args, &modes, &config_path, &redis, &aes_key, &mut consumer).await;

    let _ = std::fs::remove_file(&config_path);
    let _ = channel.queue_delete(ShortString::from(observer.as_str()), QueueDeleteOptions::default()).await;
    let _ = channel.queue_delete(ShortString::from(dlq.as_str()), QueueDeleteOptions::default()).await;
    for x in [exchange.clone(), wxpush::amqp::unrouted_name(&exchange)] {
        let _ = channel.exchange_delete(ShortString::from(x), ExchangeDeleteOptions::default()).await;
    }
    let mut conn_r = redis.conn();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn_r)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn_r).await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    result
}

async fn run_all(
    args: &Args,
    modes: &[bool],
    config_path: &std::path::Path,
    redis: &Redis,
    aes_key: &str,
    consumer: &mut lapin::Consumer,
) -> anyhow::Result<()> {
    let webhook = Webhook::start(config_path, args).await?;
    let (idle, _) = webhook.rss_kib()?;
    println!("wxpush-webhook (pid {}): idle RSS {:.1} MiB", webhook.pid, idle as f64 / 1024.0);
    let cipher = Cipher::new(aes_key)?;
    for (round, &aes) in modes.iter().enumerate() {
        let first = 1_000_000_000 * (round as u64 + 1);
        let msgids: Vec<u64> = (first..first + args.n).collect();
        if !args.no_records {
            // The worker records msgid → job_id when WeChat accepts a send, before any receipt.
            for chunk in msgids.chunks(1_000) {
                let mut pipe = redis::pipe();
                for &m in chunk {
                    pipe.cmd("SET")
                        .arg(redis.keys().msgid(APPID, m))
                        .arg(format!("job-{m}"))
                        .arg("EX")
                        .arg(600)
                        .ignore();
                }
                let _: () = pipe.query_async(&mut redis.conn()).await?;
            }
        }
        // Signed (and encrypted) requests are made before the clock starts: what is measured is
        // the webhook, not this client's AES.
        let ts = chrono::Utc::now().timestamp().to_string();
        let requests: Vec<(String, Bytes)> = msgids
            .iter()
            .map(|&m| {
                let nonce = m.to_string();
                let xml = receipt_xml(m);
                if aes {
                    let encrypt = cipher.encrypt(&rand::random(), xml.as_bytes(), APPID);
                    let sig = crypto::msg_signature(TOKEN, &ts, &nonce, &encrypt);
                    let body = format!("<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
                    (format!("/wechat?timestamp={ts}&nonce={nonce}&encrypt_type=aes&msg_signature={sig}"), body.into())
                } else {
                    let sig = crypto::signature(TOKEN, &ts, &nonce);
                    (format!("/wechat/plain?signature={sig}&timestamp={ts}&nonce={nonce}"), xml.into())
                }
            })
            .collect();

        webhook.reset_peak();
        let run = fire(&webhook.public, requests, args.connections, args.rate).await?;
        let (_, peak) = webhook.rss_kib()?;
        let ok = run.latencies.len() as u64 - run.failures.values().sum::<u64>();
        ensure!(
            run.failures.is_empty() && ok == args.n,
            "{} receipts not answered success: {:?} (status 0 = transport error)",
            args.n - ok,
            run.failures
        );

        // Every answer was `success`, so every event is confirmed: read them all back.
        let mut seen: HashMap<u64, u32> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (seen.len() as u64) < args.n {
            let left = deadline.saturating_duration_since(Instant::now());
            let delivery = match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                _ => bail!("only {} of {} events arrived", seen.len(), args.n),
            };
            let v: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            let msgid = v["msgid"].as_u64().context("event without msgid")?;
            ensure!(args.no_records || v["job_id"] == format!("job-{msgid}"), "event {msgid} not tied to its job: {v}");
            *seen.entry(msgid).or_default() += 1;
        }
        ensure!(msgids.iter().all(|m| seen.get(m) == Some(&1)), "some event arrived more than once or not at all");
        // Anything still queued would be a duplicate: the run is over, so check the queue is empty.
        let extra = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        ensure!(extra.is_err(), "an extra event arrived after all {} were seen", args.n);

        let mode = if aes { "safe mode (aes)" } else { "plaintext" };
        let rate = args.n as f64 / run.elapsed.as_secs_f64();
        let paced = if args.rate > 0 { format!(", paced at {}/s", args.rate) } else { String::new() };
        println!(
            "{mode:>16}: {} receipts in {:.2} s = {rate:.0} receipts/s ({} connections{paced}); latency p50 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms; peak RSS {:.1} MiB; every event arrived exactly once",
            args.n,
            run.elapsed.as_secs_f64(),
            args.connections,
            percentile(&run.latencies, 0.50),
            percentile(&run.latencies, 0.99),
            percentile(&run.latencies, 1.0),
            peak as f64 / 1024.0,
        );
    }

    if args.stalled > 0 {
        flood(&webhook, args.stalled).await?;
    }
    webhook.stop().await
}

/// Opens `n` stalled connections, then waits for the webhook to close them all.
async fn flood(webhook: &Webhook, n: usize) -> anyhow::Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    ensure!(limit > n as u64 + 256, "`ulimit -n` is {limit}: too low for --stalled {n}");
    let (before, _) = webhook.rss_kib()?;
    webhook.reset_peak();
    let open = r#"wxpush_webhook_connections_open{port="public"}"#;
    let started = Instant::now();
    let addr = webhook.public.clone();
    let mut stalled: Vec<TcpStream> = futures_util::stream::iter(0..n)
        .map(|_| {
            let addr = addr.clone();
            async move {
                let mut s = TcpStream::connect(&addr).await?;
                s.write_all(b"POST /wechat HTTP/1.1\r\nHost: x\r\nContent-").await?;
                anyhow::Ok(s)
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while webhook.metric(open).await? < n as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = webhook.metric(open).await?;
    let (during, _) = webhook.rss_kib()?;
    // The header timeout (10 s) closes them: read each to its end.
    let closed = futures_util::future::join_all(stalled.iter_mut().map(|s| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    }));
    ensure!(
        tokio::time::timeout(Duration::from_secs(60), closed).await.is_ok(),
        "stalled connections still open after 60 s"
    );
    let closed_after = started.elapsed();
    drop(stalled);
    // The webhook gives freed memory back within a few seconds (its trimmer looks every 5 s).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (after, peak) = webhook.rss_kib()?;
    println!(
        "{:>16}: {n} stalled connections ({accepted:.0} open at once), all closed by the webhook after {:.1} s; RSS {:.1} MiB \
         before, {:.1} MiB with them open (peak {:.1} MiB), {:.1} MiB 10 s after they closed",
        "slow clients",
        closed_after.as_secs_f64(),
        before as f64 / 1024.0,
        during as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0,
    );
    Ok(())
}
