//! Shared helpers of the integration tests: a fresh namespace per test (queues, exchange, Redis
//! prefix), the sandbox standing in for WeChat, and in-process workers, all against the real
//! RabbitMQ and Redis that `services` names (local by default). Everything a test created is removed when its `TestEnv` drops,
//! even when the test fails.

pub mod captured;
pub mod cluster;
pub mod services;

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use wxpush::{
    config::{Account, Config, TokenApi},
    health::Health,
    sandbox::{Sandbox, SandboxAccount, SandboxConfig},
};

pub use services::{
    amqp_addr, amqp_url, amqp_url_as, amqp_url_at, rabbitmqctl, redis_addr, redis_url, redis_url_as, redis_url_at,
};
pub const APPID: &str = "wxtest0000000001";
pub const SECRET: &str = "test-secret-0001";

/// A unique name for this test's resources.
pub fn unique(tag: &str) -> String {
    format!("wxpush-test-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A job body for the default account.
pub fn job(job_id: &str, touser: &str) -> Value {
    json!({
        "job_id": job_id,
        "touser": touser,
        "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
        "url": "http://weixin.qq.com/download",
        "data": {
            "User": {"value": "黄先生", "color": "#173177"},
            "Money": {"value": "人民币260.00元", "color": "#173177"}
        }
    })
}

pub fn account(name: &str, appid: &str, secret: &str) -> Account {
    Account {
        name: name.into(),
        appid: appid.into(),
        secret: SecretString::from(secret),
        token_api: TokenApi::Stable,
        callback_token: None,
        encoding_aes_key: None,
        previous_encoding_aes_key: None,
        accept_plaintext: false,
        rate_limit: None,
        daily_quota: None,
    }
}

/// A configuration in this test's namespace, pointing at `api_base`.
pub fn config(ns: &str, api_base: &str) -> Config {
    let mut c = Config {
        amqp_url: amqp_url().into(),
        redis_url: redis_url().into(),
        redis_prefix: ns.into(),
        wechat_api_base: api_base.into(),
        jobs_queue: format!("{ns}.jobs"),
        results_exchange: format!("{ns}.results"),
        dead_letter_queue: format!("{ns}.jobs.dead"),
        http_timeout_ms: 1_000,
        shutdown_grace_secs: 5,
        accounts: vec![account("default", APPID, SECRET)],
        ..Config::default()
    };
    c.retry.min_delay_ms = 20;
    c.retry.max_delay_ms = 2_000;
    c.retry.in_process_max_ms = 300;
    c.retry.delay_tiers_secs = vec![1, 2, 5];
    c.token.refresh_ahead_secs = 0.3;
    c.token.failure_backoff_ms = 200;
    c
}

pub async fn start_sandbox(mut sandbox: SandboxConfig) -> Sandbox {
    if sandbox.accounts.is_empty() {
        sandbox.accounts.push(SandboxAccount::new(APPID, SECRET));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the sandbox");
    Sandbox::start(sandbox, listener).await.expect("start the sandbox")
}

/// A worker running in this process, with its own connections.
pub struct WorkerHandle {
    pub cancel: CancellationToken,
    pub join: JoinHandle<()>,
}

impl WorkerHandle {
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.join).await.expect("worker stops within 30 s").ok();
    }
}

pub fn spawn_worker(config: &Config) -> WorkerHandle {
    let cancel = CancellationToken::new();
    let config = config.clone();
    let c = cancel.clone();
    let join = tokio::spawn(async move {
        wxpush::worker::run(config, c, Health::new()).await.expect("worker runs");
    });
    WorkerHandle { cancel, join }
}

/// One received result or event.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub body: Value,
    pub correlation_id: Option<String>,
}

/// The test's view of RabbitMQ: publishes jobs, reads the results exchange.
pub struct Bus {
    pub connection: Connection,
    pub channel: Channel,
    consumer: Consumer,
}

pub struct TestEnv {
    pub ns: String,
    pub config: Config,
    pub bus: Bus,
    cleanup: Arc<Mutex<Vec<String>>>,
}

impl TestEnv {
    /// Declares the results exchange and a queue bound to all of it, before any worker starts.
    pub async fn new(tag: &str, config: Config) -> TestEnv {
        let ns = config.redis_prefix.clone();
        assert!(ns.starts_with("wxpush-test-"), "tests must use a unique namespace ({tag})");
        let connection =
            Connection::connect(amqp_url(), ConnectionProperties::default()).await.expect("RabbitMQ is up");
        let channel = connection.create_channel().await.expect("channel");
        wxpush::amqp::declare_results_exchange(&channel, &config.results_exchange)
            .await
            .expect("declare the results exchange");
        let results_queue = format!("{ns}.observed");
        channel
            .queue_declare(
                ShortString::from(results_queue.as_str()),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare the results queue");
        channel
            .queue_bind(
                ShortString::from(results_queue.as_str()),
                ShortString::from(config.results_exchange.as_str()),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        let consumer = channel
            .basic_consume(
                ShortString::from(results_queue.as_str()),
                ShortString::from("test-observer"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume results");
        let mut queues = vec![results_queue.clone(), config.jobs_queue.clone(), config.dead_letter_queue.clone()];
        for t in &config.retry.delay_tiers_secs {
            queues.push(format!("{}.delay.{t}s", config.jobs_queue));
        }
        let unrouted = wxpush::amqp::unrouted_name(&config.results_exchange);
        queues.push(unrouted.clone());
        queues.push(format!("exchange:{}", config.results_exchange));
        queues.push(format!("exchange:{unrouted}"));
        TestEnv { ns, config, bus: Bus { connection, channel, consumer }, cleanup: Arc::new(Mutex::new(queues)) }
    }

    /// Also removes `queue` at the end.
    pub fn remove_later(&self, queue: &str) {
        self.cleanup.lock().unwrap().push(queue.to_owned());
    }

    /// Declares the jobs topology the way the worker does, so jobs can be published first.
    pub async fn declare_topology(&self) {
        let topology = wxpush::amqp::Topology::from_config(&self.config);
        topology.declare(&self.bus.connection).await.expect("declare the topology");
    }

    pub async fn publish_job(&self, body: &Value) {
        self.publish_raw(&serde_json::to_vec(body).unwrap(), BasicProperties::default()).await;
    }

    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) {
        let props = props.with_delivery_mode(2).with_content_type(ShortString::from("application/json"));
        self.bus
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(self.config.jobs_queue.as_str()),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish a job")
            .await
            .expect("job published");
    }

    /// The next result, or `None` after `timeout`.
    pub async fn next_result(&mut self, timeout: Duration) -> Option<Received> {
        let delivery = tokio::time::timeout(timeout, self.bus.consumer.next()).await.ok()??.ok()?;
        delivery.ack(BasicAckOptions::default()).await.ok()?;
        Some(Received {
            routing_key: delivery.routing_key.to_string(),
            body: serde_json::from_slice(&delivery.data).unwrap_or(Value::Null),
            correlation_id: delivery.properties.correlation_id().as_ref().map(|c| c.to_string()),
        })
    }

    /// Reads results until `n` have arrived or `timeout` has passed since the call.
    pub async fn results(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_result(left).await {
                Some(r) => out.push(r),
                None => break,
            }
        }
        out
    }

    /// Messages ready in `queue` (not counting unacknowledged ones).
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let ch = self.bus.connection.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = ch.close(200, ShortString::from("done")).await;
        q.message_count()
    }

    /// Polls `check` every 50 ms until it holds or `timeout` passes.
    pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if check().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.cleanup.lock().unwrap());
        let prefix = self.ns.clone();
        // Async clean-up cannot run in Drop; a thread with its own runtime does it, even after
        // a failed assertion.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(cleanup(names, prefix));
        })
        .join();
    }
}

async fn cleanup(names: Vec<String>, prefix: String) {
    if let Ok(conn) = Connection::connect(amqp_url(), ConnectionProperties::default()).await {
        for name in names {
            // A failed delete closes the channel, so each gets its own.
            let Ok(ch) = conn.create_channel().await else { continue };
            if let Some(exchange) = name.strip_prefix("exchange:") {
                let _ = ch.exchange_delete(ShortString::from(exchange), ExchangeDeleteOptions::default()).await;
            } else {
                let _ = ch.queue_delete(ShortString::from(name.as_str()), QueueDeleteOptions::default()).await;
            }
        }
        let _ = conn.close(200, ShortString::from("cleanup")).await;
    }
    delete_redis_prefix(&prefix).await;
}

/// Removes every Redis key under `prefix:`.
pub async fn delete_redis_prefix(prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// The process' metrics recorder, shared by every test (labels of their own keep them apart):
/// the webhook's exporter (buckets on every histogram) with the worker's HELP texts as well.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = wxpush::webhook::metrics::install().expect("the only recorder of the test process");
            wxpush::telemetry::catalog::describe_metrics();
            handle
        })
        .clone()
}

/// Set in a process [`run_alone`] starts: the test it runs.
const ALONE: &str = "WXPUSH_TEST_ALONE";

/// Whether this process was started by [`run_alone`] to run `test`.
pub fn is_alone(test: &str) -> bool {
    std::env::var(ALONE).is_ok_and(|t| t == test)
}

/// Runs `test` (its path in this binary, `module::name`) in a test process of its own, with
/// `env` added: for what a process can do only once, such as installing its metrics recorder,
/// or what ends it. Its output.
pub fn run_alone(test: &str, env: &[(&str, String)]) -> std::process::Output {
    Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", test, "--test-threads", "1"])
        .env(ALONE, test)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("the test binary runs")
}

/// A plain Redis connection for assertions.
pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.expect("Redis is up")
}

/// A worker process started from the real binary, configured like `cfg`.
pub struct WorkerProcess {
    child: Child,
    _config_file: TempFile,
}

pub struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl WorkerProcess {
    pub fn start(cfg: &Config) -> WorkerProcess {
        Self::start_with_env(cfg, &[])
    }

    /// Like [`WorkerProcess::start`], with more environment variables (`HTTPS_PROXY`, …).
    pub fn start_with_env(cfg: &Config, extra: &[(&str, &str)]) -> WorkerProcess {
        Self::spawn(cfg, "warn", Stdio::null(), extra)
    }

    /// As [`start`](Self::start), with the worker's log (its stdout) at `level` going to `log`.
    pub fn start_logging(cfg: &Config, level: &str, log: impl Into<Stdio>) -> WorkerProcess {
        Self::spawn(cfg, level, log.into(), &[])
    }

    fn spawn(cfg: &Config, level: &str, log: Stdio, extra: &[(&str, &str)]) -> WorkerProcess {
        let path = std::env::temp_dir().join(format!("{}-{}.toml", cfg.redis_prefix, uuid::Uuid::new_v4().simple()));
        let toml = format!(
            "job_lease_ms = {}\nhttp_timeout_ms = {}\nshutdown_grace_secs = {}\nmetrics_listen = \"127.0.0.1:0\"\n\
             [token]\nrefresh_ahead_secs = {}\n[retry]\nmin_delay_ms = 20\nin_process_max_ms = 300\ndelay_tiers_secs = [1, 2, 5]\n",
            cfg.job_lease_ms, cfg.http_timeout_ms, cfg.shutdown_grace_secs, cfg.token.refresh_ahead_secs
        );
        std::fs::write(&path, toml).expect("write the worker's config file");
        let child = captured::worker_command(cfg, &path)
            .env("WXPUSH_QUEUE_TYPE", cfg.queue_type.as_str())
            .env("WXPUSH_CONCURRENCY", cfg.concurrency.to_string())
            .env("WXPUSH_RATE_LIMIT", cfg.rate_limit.to_string())
            .env("WXPUSH_APPID", APPID)
            .env("WXPUSH_APPSECRET", SECRET)
            .env("RUST_LOG", level)
            .envs(extra.iter().copied())
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start wxpush-worker");
        WorkerProcess { child, _config_file: TempFile(path) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WXPUSH_* variables that give a program `cfg`'s services and names (and the account
/// `default`'s credentials, when it has that account).
pub fn config_env(cfg: &Config) -> Vec<(&'static str, String)> {
    use secrecy::ExposeSecret;
    let mut vars = vec![
        ("WXPUSH_AMQP_URL", cfg.amqp_url.clone()),
        ("WXPUSH_REDIS_URL", cfg.redis_url.clone()),
        ("WXPUSH_REDIS_PREFIX", cfg.redis_prefix.clone()),
        ("WXPUSH_WECHAT_API_BASE", cfg.wechat_api_base.clone()),
        ("WXPUSH_JOBS_QUEUE", cfg.jobs_queue.clone()),
        ("WXPUSH_RESULTS_EXCHANGE", cfg.results_exchange.clone()),
        ("WXPUSH_DEAD_LETTER_QUEUE", cfg.dead_letter_queue.clone()),
        ("WXPUSH_HTTP_TIMEOUT_MS", cfg.http_timeout_ms.to_string()),
    ];
    if let Some(a) = cfg.account("default") {
        vars.push(("WXPUSH_APPID", a.appid.clone()));
        vars.push(("WXPUSH_APPSECRET", a.secret.expose_secret().to_owned()));
    }
    vars
}

/// The most sends any 1-second window saw, and the mean rate from first to last send.
pub fn window_stats(times: &[chrono::DateTime<chrono::Utc>]) -> (usize, f64) {
    let mut t: Vec<i64> = times.iter().map(|t| t.timestamp_micros()).collect();
    t.sort_unstable();
    let mut most = 0;
    let mut start = 0;
    for end in 0..t.len() {
        while t[end] - t[start] >= 1_000_000 {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    let span = (t[t.len() - 1] - t[0]) as f64 / 1e6;
    (most, (t.len() - 1) as f64 / span)
}
