//! The one harness of the integration tests: a fresh namespace per test (queues, exchange,
//! Redis prefix), the sandbox standing in for WeChat, workers in this process or as processes
//! of their own, forwarders a test can take away, throwaway clusters and the webhook's rig, all
//! against the real RabbitMQ and Redis that `services` names (local by default). Everything a
//! test created is removed when its guard drops, even when the test fails.

pub mod cluster;
pub mod forward;
pub mod programs;
pub mod services;
pub mod webhook;

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use crate::wx::{
    Account, Config, Health, Sandbox, SandboxAccount, SandboxConfig, TokenApi, Topology, declare_results_exchange,
    describe_metrics, install_metrics, run_worker, unrouted_name,
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{FieldTable, ShortString},
};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::{net::TcpListener, runtime::RuntimeFlavor, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use forward::Forwarder;
pub use programs::{Admin, WorkerProcess};
pub use services::{amqp_url, amqp_url_as, amqp_url_at, rabbitmqctl, redis_url, redis_url_as};
pub const APPID: &str = "wxtest0000000001";
pub const SECRET: &str = "test-secret-0001";

/// Where a test keeps the data of servers of its own (RabbitMQ and Redis nodes): `name` in
/// memory where the machine has it, so that their logs and commits never wait for a disk that
/// other builds keep busy (a killed process loses nothing either way).
pub fn scratch_dir(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    base.join(name)
}

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
    Account { secret: SecretString::from(secret), token_api: TokenApi::Stable, ..Account::new(name, appid) }
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
        http_timeout: Duration::from_millis(1_000),
        shutdown_grace: Duration::from_secs(5),
        accounts: vec![account("default", APPID, SECRET)],
        ..Config::default()
    };
    c.retry.min_delay = Duration::from_millis(20);
    c.retry.max_delay = Duration::from_millis(2_000);
    c.retry.in_process_max = Duration::from_millis(300);
    c.retry.delay_tiers_secs = vec![1, 2, 5];
    c.token.refresh_ahead = Duration::from_secs_f64(0.3);
    c.token.failure_backoff = Duration::from_millis(200);
    c
}

pub async fn start_sandbox(mut sandbox: SandboxConfig) -> Sandbox {
    if sandbox.accounts.is_empty() {
        sandbox.accounts.push(SandboxAccount::new(APPID, SECRET));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the sandbox");
    Sandbox::start(sandbox, listener).await.expect("start the sandbox")
}

/// A sandbox whose tokens live `lifetime` (and the previous one 1.5 s longer).
pub async fn sandbox_with_token_lifetime(lifetime: Duration) -> Sandbox {
    start_sandbox(SandboxConfig {
        token_lifetime: lifetime,
        token_overlap: Duration::from_millis(1500),
        ..Default::default()
    })
    .await
}

/// Held by the tests that measure send rates (which a starved machine bunches up) and by those
/// that load it most (the failover clusters): they run one at a time, so that they do not skew
/// each other on a small machine. (Token tests count requests per lifetime, which a busy
/// machine can only lower.)
pub async fn timed() -> tokio::sync::MutexGuard<'static, ()> {
    static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TIMED.lock().await
}

/// A worker running in this process, with its own connections.
pub struct WorkerHandle {
    pub cancel: CancellationToken,
    pub join: JoinHandle<()>,
    /// What its `/readyz` would say.
    pub health: Arc<Health>,
}

impl WorkerHandle {
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.join).await.expect("worker stops within 30 s").ok();
    }
}

pub fn spawn_worker(config: &Config) -> WorkerHandle {
    let (cancel, health) = (CancellationToken::new(), Health::new());
    let (config, c, h) = (config.clone(), cancel.clone(), Arc::clone(&health));
    let join = tokio::spawn(async move {
        run_worker(config, c, h).await.expect("worker runs");
    });
    WorkerHandle { cancel, join, health }
}

/// How often the harness asks while it waits for something to happen.
pub const POLL: Duration = Duration::from_millis(20);

/// Asks `check` until it holds or `timeout` passes (at once, then every [`POLL`]); whether it
/// held.
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
        tokio::time::sleep(POLL).await;
    }
}

/// Waits up to `timeout` for `child` to exit; its exit status.
pub async fn exit_of(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            _ if Instant::now() >= deadline => return None,
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Declares `queue` (name, options, arguments), binds it to every routing key of `exchange` and
/// consumes it: a downstream reader of the results.
pub async fn observe(channel: &Channel, exchange: &str, queue: (&str, QueueDeclareOptions, FieldTable)) -> Consumer {
    let (name, options, args) = queue;
    channel.queue_declare(ShortString::from(name), options, args).await.expect("declare the observed queue");
    let (every, no_args) = (ShortString::from("#"), FieldTable::default());
    let bind =
        channel.queue_bind(ShortString::from(name), ShortString::from(exchange), every, Default::default(), no_args);
    bind.await.expect("bind the observed queue");
    let tag = ShortString::from("test-observer");
    let consume = channel.basic_consume(ShortString::from(name), tag, Default::default(), FieldTable::default());
    consume.await.expect("consume the observed queue")
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
        declare_results_exchange(&channel, &config.results_exchange).await.expect("declare the results exchange");
        let results_queue = format!("{ns}.observed");
        let queue = (results_queue.as_str(), QueueDeclareOptions::default(), FieldTable::default());
        let consumer = observe(&channel, &config.results_exchange, queue).await;
        let mut queues = vec![results_queue.clone(), config.jobs_queue.clone(), config.dead_letter_queue.clone()];
        for t in &config.retry.delay_tiers_secs {
            queues.push(format!("{}.delay.{t}s", config.jobs_queue));
        }
        let unrouted = unrouted_name(&config.results_exchange);
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
        let topology = Topology::from_config(&self.config);
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

    /// The next message on the results exchange (acknowledged), or `None` after `timeout`.
    pub async fn next_delivery(&mut self, timeout: Duration) -> Option<Delivery> {
        let delivery = tokio::time::timeout(timeout, self.bus.consumer.next()).await.ok()??.ok()?;
        delivery.ack(BasicAckOptions::default()).await.ok()?;
        Some(delivery)
    }

    /// The next result, or `None` after `timeout`.
    pub async fn next_result(&mut self, timeout: Duration) -> Option<Received> {
        let delivery = self.next_delivery(timeout).await?;
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
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.cleanup.lock().unwrap_or_else(PoisonError::into_inner));
        finish_in_drop(cleanup(names, self.ns.clone()));
    }
}

/// Runs blocking `f` (a process to wait for, a thread to join) from sync code such as a `Drop`
/// inside a test's runtime, handing the runtime's other tasks to another worker meanwhile (on a
/// multi-thread runtime; a current-thread one has none to hand over).
pub fn blocking_in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs blocking `f` (a script, a process) on the runtime's blocking threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking task")
}

/// Runs async clean-up to its end from a `Drop`, which cannot await (also after a failed
/// assertion): on a thread with a runtime of its own.
pub fn finish_in_drop(clean_up: impl Future<Output = ()> + Send + 'static) {
    blocking_in_place(|| {
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(clean_up);
        })
        .join();
    });
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

/// Removes every Redis key under `prefix:` (the library's own clean-up; errors are ignored, the
/// test has its verdict already).
pub async fn delete_redis_prefix(prefix: &str) {
    if let Ok(redis) = crate::wx::Redis::connect(redis_url(), prefix).await {
        let _ = redis.delete_all().await;
    }
}

pub use crate::wx::header_text;

/// The process' metrics recorder, shared by every test (labels of their own keep them apart):
/// the webhook's exporter (buckets on every histogram) with the worker's HELP texts as well.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = install_metrics().expect("the only recorder of the test process");
            describe_metrics();
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
        ("WXPUSH_HTTP_TIMEOUT_MS", cfg.http_timeout.as_millis().to_string()),
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
