//! Load benchmark of wxpush-webhook: starts the webhook in-process against a local RabbitMQ and
//! Redis, fires N signed TEMPLATESENDJOBFINISH receipts (plaintext, then safe mode) from
//! concurrent HTTP connections, checks on the results exchange that every event arrived exactly
//! once, and prints receipts per second for each mode.
//!
//! ```text
//! cargo bench --bench webhook -- --n 20000 --connections 64
//! ```
//!
//! Everything it creates (exchange, queues, Redis keys under a random prefix) is deleted at the
//! end. It only talks to the addresses given (127.0.0.1 by default).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures_util::{StreamExt, stream};
use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
};
use rand::{Rng, distr::Alphanumeric};
use tokio_util::sync::CancellationToken;
use wxpush::{
    amqp::Broker,
    config::Config,
    domain::crypto::{self, Cipher},
    store::Redis,
    webhook::{Webhook, WebhookSettings, serve_with},
};

#[derive(Parser)]
#[command(about = "Load benchmark of wxpush-webhook against a local RabbitMQ and Redis")]
struct Args {
    /// Receipts per mode.
    #[arg(long, default_value_t = 20_000)]
    n: u64,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Modes to run: plain, aes or both.
    #[arg(long, default_value = "both")]
    mode: String,
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

fn random(n: usize) -> String {
    rand::rng().sample_iter(Alphanumeric).take(n).map(char::from).collect()
}

fn receipt_xml(msgid: u64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName><FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName><CreateTime>1395658984</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>{msgid}</MsgID><Status><![CDATA[success]]></Status></xml>"
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new("warn")).init();
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
    let toml = format!(
        "redis_prefix = \"{prefix}\"\njobs_queue = \"wxpush.bench.{id}.jobs\"\nresults_exchange = \"{exchange}\"\n\
         dead_letter_queue = \"{dlq}\"\n[[accounts]]\nname = \"default\"\nappid = \"{APPID}\"\n\
         callback_token = \"{TOKEN}\"\nencoding_aes_key = \"{aes_key}\"\n"
    );
    let config = Config::from_sources("bench", &toml, |_| None)?;
    let settings = WebhookSettings::from_sources(&config, |_| None)?;

    // The observer: a queue bound to every delivery event, consumed throughout the run.
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await.context("RabbitMQ")?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            ShortString::from(exchange.as_str()),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
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
    let webhook = Webhook::new(&config, settings, Broker::new(&args.amqp_url, "wxpush-webhook-bench"), redis.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/wechat", listener.local_addr()?);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(serve_with(webhook, listener, async move { stopped.cancelled().await }));

    let http = reqwest::Client::builder().pool_max_idle_per_host(args.connections).build()?;
    let cipher = Cipher::new(&aes_key)?;
    let mut report = Vec::new();
    for (round, aes) in modes.into_iter().enumerate() {
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
        let requests: Vec<(String, String)> = msgids
            .iter()
            .map(|&m| {
                let nonce = m.to_string();
                let xml = receipt_xml(m);
                if aes {
                    let encrypt = cipher.encrypt(&rand::random(), xml.as_bytes(), APPID);
                    let sig = crypto::msg_signature(TOKEN, &ts, &nonce, &encrypt);
                    let body = format!("<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
                    (format!("{base}?timestamp={ts}&nonce={nonce}&encrypt_type=aes&msg_signature={sig}"), body)
                } else {
                    let sig = crypto::signature(TOKEN, &ts, &nonce);
                    (format!("{base}?signature={sig}&timestamp={ts}&nonce={nonce}"), xml)
                }
            })
            .collect();

        let started = Instant::now();
        let mut failures: HashMap<u16, u64> = HashMap::new();
        let mut answers = stream::iter(requests)
            .map(|(url, body)| {
                let http = http.clone();
                async move {
                    match http.post(url).body(body).timeout(Duration::from_secs(30)).send().await {
                        Ok(r) if r.status().is_success() => {
                            r.text().await.map(|t| t == "success").unwrap_or(false).then_some(()).ok_or(0)
                        }
                        Ok(r) => Err(r.status().as_u16()),
                        Err(_) => Err(0),
                    }
                }
            })
            .buffer_unordered(args.connections);
        let mut ok = 0u64;
        while let Some(answer) = answers.next().await {
            match answer {
                Ok(()) => ok += 1,
                Err(code) => *failures.entry(code).or_default() += 1,
            }
        }
        let elapsed = started.elapsed();
        ensure!(
            failures.is_empty(),
            "{} receipts not answered success: {failures:?} (status 0 = transport error)",
            args.n - ok
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
        let rate = args.n as f64 / elapsed.as_secs_f64();
        println!(
            "{mode:>16}: {} receipts in {:.2} s = {rate:.0} receipts/s ({} connections); every event arrived exactly once",
            args.n,
            elapsed.as_secs_f64(),
            args.connections
        );
        report.push((mode, rate));
    }

    stop.cancel();
    server.await??;
    let _ = channel.queue_delete(ShortString::from(observer.as_str()), QueueDeleteOptions::default()).await;
    let _ = channel.queue_delete(ShortString::from(dlq.as_str()), QueueDeleteOptions::default()).await;
    let _ = channel.exchange_delete(ShortString::from(exchange.as_str()), ExchangeDeleteOptions::default()).await;
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
    Ok(())
}
