//! Operating the worker: what `/metrics` counts after a run, what `/readyz` and `/healthz` say
//! while Redis or RabbitMQ is away, and that no secret reaches the logs, the results or the
//! metrics.
//!
//! Outages go through a TCP proxy of the test's own, switched off and on, so that only this
//! test's worker loses Redis or RabbitMQ; the shared servers stay up for the tests running
//! beside it.

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use common::*;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use wxpush::{
    config::Config,
    health::{self, Health},
    sandbox::{Sandbox, SandboxAccount, SandboxConfig},
    store::Redis,
};

/// The process-wide recorder: one per test binary, shared by its tests (labels keep them apart).
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE.get_or_init(health::install_metrics).clone().expect("this test binary installs the recorder")
}

/// An in-process worker with its `/healthz`, `/readyz` and `/metrics` served on 127.0.0.1.
struct AdminWorker {
    worker: WorkerHandle,
    admin: String,
    http: reqwest::Client,
}

impl AdminWorker {
    async fn start(config: &Config) -> AdminWorker {
        let health = Health::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the admin port");
        let admin = format!("http://{}", listener.local_addr().unwrap());
        let cancel = CancellationToken::new();
        let router = health::router(health.clone(), Some(recorder()));
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        });
        let (config, run) = (config.clone(), cancel.clone());
        let join = tokio::spawn(async move {
            wxpush::worker::run(config, run, health).await.expect("worker runs");
        });
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        AdminWorker { worker: WorkerHandle { cancel, join }, admin, http }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.admin)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Polls `path` until its status is `status` and its body contains `text`.
    async fn until(&self, path: &str, status: u16, text: &str, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, body) = self.get(path).await;
            if (code == status && body.contains(text)) || Instant::now() >= deadline {
                return (code, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The value of the sample `name{labels…}` in a Prometheus text page, summed over the label
/// sets that include `labels`; `None` when no line matches.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, set) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let have: Vec<(&str, &str)> =
            set.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.trim_matches('"'))).collect();
        if labels.iter().all(|l| have.contains(l)) {
            *total.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_worker_did() {
    const APPID_B: &str = "wxtest0000000002";
    const SECRET_B: &str = "test-secret-0002";
    let sandbox = start_sandbox(SandboxConfig {
        accounts: vec![SandboxAccount::new(APPID, SECRET), SandboxAccount::new(APPID_B, SECRET_B)],
        ..SandboxConfig::default()
    })
    .await;
    let ns = unique("metrics");
    let mut cfg = config(&ns, &sandbox.base_url());
    // Account names of this test alone: the recorder is shared by the tests of this binary.
    let tail = &ns[ns.len() - 10..];
    let (main, quota) = (format!("main-{tail}"), format!("quota-{tail}"));
    let mut a = account(&main, APPID, SECRET);
    a.rate_limit = Some(5);
    let mut b = account(&quota, APPID_B, SECRET_B);
    b.daily_quota = Some(1);
    cfg.accounts = vec![a, b];
    cfg.max_attempts = 2;
    // Every retry goes through a delay queue, so that delays are counted too.
    cfg.retry.in_process_max_ms = 0;
    let mut env = TestEnv::new("metrics", cfg).await;
    env.declare_topology().await;
    let page = recorder().render();
    let dead_before = sample(&page, "wxpush_jobs_dead_lettered_total", &[]).unwrap_or(0.0);
    let delayed_before = sample(&page, "wxpush_jobs_delayed_total", &[]).unwrap_or(0.0);

    let with_account = |id: &str, touser: &str, account: &str| {
        let mut j = job(id, touser);
        j["account"] = json!(account);
        j
    };
    let good = 6;
    for i in 0..good {
        env.publish_job(&with_account(&format!("ok-{i}"), &format!("u-{i}"), &main)).await;
    }
    env.publish_job(&with_account("permanent", "errcode-40003-x", &main)).await;
    env.publish_job(&with_account("transient", "errcode--1-x", &main)).await;
    // The account's daily quota is one send: the second job is parked, with a deferred notice.
    env.publish_job(&with_account("quota-1", "u-q1", &quota)).await;
    env.publish_job(&with_account("quota-2", "u-q2", &quota)).await;
    env.publish_raw(b"not json", lapin::BasicProperties::default()).await;

    let worker = AdminWorker::start(&env.config).await;
    let results = env.results(good + 4, Duration::from_secs(30)).await;
    let keys: BTreeMap<String, usize> = results.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.routing_key.clone()).or_default() += 1;
        m
    });
    assert_eq!(
        keys,
        BTreeMap::from([
            ("send.succeeded".to_owned(), good + 1),
            ("send.failed".to_owned(), 2),
            ("send.deferred".to_owned(), 1)
        ]),
        "{results:?}"
    );
    let ready = TestEnv::eventually(Duration::from_secs(10), || async {
        env.queue_len(&env.config.dead_letter_queue).await == 1
    })
    .await;
    assert!(ready, "the unparseable job is in the dead-letter queue");

    let (status, page) = worker.get("/metrics").await;
    assert_eq!(status, 200);
    let count = |name: &str, labels: &[(&str, &str)]| sample(&page, name, labels).unwrap_or(0.0);
    let jobs = |account: &str, status: &str| count("wxpush_jobs_total", &[("account", account), ("status", status)]);
    assert_eq!(jobs(&main, "succeeded"), good as f64, "{page}");
    assert_eq!(jobs(&main, "failed"), 2.0);
    assert_eq!(jobs(&quota, "succeeded"), 1.0);
    // The deferred notice is not a failure: failure alerts must not fire on parked jobs.
    assert_eq!(jobs(&quota, "deferred"), 1.0);
    assert_eq!(jobs(&quota, "failed"), 0.0);
    // Six sends, one refused for good, two transient failures.
    assert_eq!(count("wxpush_send_seconds_count", &[("account", &main)]), good as f64 + 3.0);
    assert_eq!(
        count("wxpush_send_seconds_bucket", &[("account", &main), ("le", "+Inf")]),
        good as f64 + 3.0,
        "send latency is a histogram with buckets"
    );
    assert_eq!(count("wxpush_send_retries_total", &[("account", &main)]), 2.0);
    assert!(count("wxpush_rate_limit_waits_total", &[("account", &main)]) >= 1.0, "9 sends at 5 per second wait");
    assert!(count("wxpush_token_fetches_total", &[("account", &main), ("outcome", "ok")]) >= 1.0);
    assert!(count("wxpush_token_fetches_total", &[("account", &quota), ("outcome", "ok")]) >= 1.0);
    assert!(count("wxpush_account_pauses_total", &[("account", &quota)]) >= 1.0);
    assert!(count("wxpush_jobs_parked_total", &[("account", &quota)]) >= 1.0);
    assert!(count("wxpush_jobs_dead_lettered_total", &[]) > dead_before);
    assert!(count("wxpush_jobs_delayed_total", &[]) >= delayed_before + 2.0, "the retry and the parked job");
    assert!(sample(&page, "wxpush_jobs_in_flight", &[]).is_some());
    assert_eq!(worker.get("/healthz").await.0, 200);
    assert_eq!(worker.get("/readyz").await.0, 200);
    worker.worker.stop().await;
}

/// A TCP forwarder from a local port to `upstream` that can be switched off (listener closed,
/// live connections cut) and on again at the same address.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    running: Mutex<Option<CancellationToken>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream: std::net::ToSocketAddrs::to_socket_addrs(upstream).unwrap().next().unwrap(),
            running: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        *self.running.lock().unwrap() = Some(stop.clone());
        let upstream = self.upstream;
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    // Returning drops the listener: connecting is refused from here on.
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
    }

    fn off(&self) {
        if let Some(stop) = self.running.lock().unwrap().take() {
            stop.cancel();
        }
    }

    /// Listens again on the same address (once the old listener is gone).
    async fn on(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            match socket.bind(self.addr).and_then(|()| socket.listen(128)) {
                Ok(listener) => return self.serve(listener),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.off();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_and_rabbitmq_and_liveness_does_not() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("ready");
    let redis = Proxy::start(&redis_addr()).await;
    let amqp = Proxy::start(&amqp_addr()).await;
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.redis_url = redis_url_at(&redis.addr.to_string());
    cfg.amqp_url = amqp_url_at(&amqp.addr.to_string());
    let mut env = TestEnv::new("ready", cfg).await;
    let worker = AdminWorker::start(&env.config).await;
    let wait = Duration::from_secs(30);

    let (code, body) = worker.until("/readyz", 200, "", wait).await;
    assert_eq!(code, 200, "ready once connected: {body}");
    assert_eq!(body, "rabbitmq: up\nredis: up\n");

    redis.off();
    let (code, body) = worker.until("/readyz", 503, "redis: down", wait).await;
    assert_eq!((code, body.as_str()), (503, "rabbitmq: up\nredis: down\n"), "unready without Redis");
    // An outage is no reason to restart the worker.
    assert_eq!(worker.get("/healthz").await.0, 200);
    redis.on().await;
    let (code, body) = worker.until("/readyz", 200, "", wait).await;
    assert_eq!(code, 200, "ready again with Redis back: {body}");

    amqp.off();
    let (code, body) = worker.until("/readyz", 503, "rabbitmq: down", wait).await;
    assert_eq!((code, body.as_str()), (503, "rabbitmq: down\nredis: up\n"), "unready without RabbitMQ");
    assert_eq!(worker.get("/healthz").await.0, 200);
    amqp.on().await;
    let (code, body) = worker.until("/readyz", 200, "", wait).await;
    assert_eq!(code, 200, "ready again with RabbitMQ back: {body}");

    // Ready means it: a job goes through both proxies again.
    env.publish_job(&job("after-outages", "u-after")).await;
    let result = env.next_result(Duration::from_secs(20)).await.expect("a result after the outages");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);
    worker.worker.stop().await;
}

/// The real worker binary, its output captured in files.
struct CapturedWorker {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    metrics: String,
    config: PathBuf,
}

impl CapturedWorker {
    fn start(cfg: &Config, secret: &str, log_format: &str, token_api: &str) -> CapturedWorker {
        let base = std::env::temp_dir().join(format!("{}-{log_format}", cfg.redis_prefix));
        let config_path = base.with_extension("toml");
        // Timings as in the other tests (and the delay queues the clean-up removes).
        let toml = format!(
            "http_timeout_ms = 1000\nshutdown_grace_secs = 5\n\
             [retry]\nmin_delay_ms = 20\nin_process_max_ms = 300\ndelay_tiers_secs = [1, 2, 5]\n\
             [[accounts]]\nname = \"default\"\nappid = \"{APPID}\"\ntoken_api = \"{token_api}\"\n"
        );
        std::fs::write(&config_path, toml).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (stdout, stderr) = (base.with_extension("stdout"), base.with_extension("stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_wxpush-worker"))
            .env("WXPUSH_CONFIG", &config_path)
            .env("WXPUSH_AMQP_URL", &cfg.amqp_url)
            .env("WXPUSH_REDIS_URL", &cfg.redis_url)
            .env("WXPUSH_REDIS_PREFIX", &cfg.redis_prefix)
            .env("WXPUSH_WECHAT_API_BASE", &cfg.wechat_api_base)
            .env("WXPUSH_JOBS_QUEUE", &cfg.jobs_queue)
            .env("WXPUSH_RESULTS_EXCHANGE", &cfg.results_exchange)
            .env("WXPUSH_DEAD_LETTER_QUEUE", &cfg.dead_letter_queue)
            .env("WXPUSH_MAX_ATTEMPTS", "2")
            .env("WXPUSH_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("WXPUSH_APPSECRET", secret)
            .env("WXPUSH_LOG_FORMAT", log_format)
            // Everything, the libraries' debug output included (HTTP, AMQP, Redis clients).
            .env("RUST_LOG", "debug")
            .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .expect("start wxpush-worker");
        CapturedWorker {
            child,
            stdout,
            stderr,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            config: config_path,
        }
    }

    /// SIGTERM, wait for a clean exit, and return stdout and stderr.
    fn stop(mut self) -> (String, String) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the worker exits after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "{exit:?}");
        (std::fs::read_to_string(&self.stdout).unwrap(), std::fs::read_to_string(&self.stderr).unwrap())
    }
}

impl Drop for CapturedWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in [&self.stdout, &self.stderr, &self.config] {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The token the pool holds for APPID, as the workers stored it.
async fn stored_token(ns: &str) -> String {
    let redis = Redis::connect(redis_url(), ns).await.unwrap();
    let snapshot = redis.read_token(APPID).await.unwrap();
    snapshot.token.expect("a stored token").value.expose_secret().to_owned()
}

/// What `/cgi-bin/stable_token` hands out now: in normal mode, the current token.
async fn current_stable_token(sandbox: &Sandbox, secret: &str) -> String {
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/cgi-bin/stable_token", sandbox.base_url()))
        .json(&json!({"grant_type": "client_credential", "appid": APPID, "secret": secret}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"].as_str().expect("a token").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_results_or_metrics() {
    for (log_format, token_api) in [("text", "stable"), ("json", "classic")] {
        let ns = unique(&format!("secret-{log_format}"));
        let secret = format!("appsecret-{}", uuid::Uuid::new_v4().simple());
        let sandbox = start_sandbox(SandboxConfig {
            accounts: vec![SandboxAccount::new(APPID, secret.clone())],
            ..SandboxConfig::default()
        })
        .await;
        let mut env = TestEnv::new("secret", config(&ns, &sandbox.base_url())).await;
        env.declare_topology().await;
        let worker = CapturedWorker::start(&env.config, &secret, log_format, token_api);

        // A send, a token WeChat revokes (refused, replaced, sent again), a send that fails and
        // is retried: every path that handles the secret or a token.
        env.publish_job(&job("first", "u-first")).await;
        let mut results = env.results(1, Duration::from_secs(20)).await;
        assert_eq!(results.len(), 1, "the first job's result ({log_format})");
        let mut tokens = vec![stored_token(&ns).await];
        if token_api == "stable" {
            tokens.push(current_stable_token(&sandbox, &secret).await);
        }
        sandbox.revoke_tokens();
        env.publish_job(&job("after-revoke", "u-second")).await;
        env.publish_job(&job("transient", "errcode--1-x")).await;
        results.extend(env.results(2, Duration::from_secs(20)).await);
        assert_eq!(results.len(), 3, "every job's result ({log_format})");
        tokens.push(stored_token(&ns).await);
        if token_api == "stable" {
            tokens.push(current_stable_token(&sandbox, &secret).await);
        }
        assert_ne!(tokens[0], tokens[tokens.len() - 1], "the revoked token was replaced");
        assert!(tokens.iter().all(|t| t.len() >= 32), "real tokens: {tokens:?}");

        let metrics = reqwest::get(&worker.metrics).await.expect("/metrics").text().await.unwrap();
        assert!(metrics.contains("wxpush_jobs_total"), "the metrics page of the run");
        let (stdout, stderr) = worker.stop();
        // The logs are there to search: debug lines in the requested format.
        let logs = format!("{stdout}{stderr}");
        if log_format == "json" {
            for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
                let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(entry["level"].is_string() && entry["timestamp"].is_string(), "{line}");
            }
            assert!(stdout.contains("\"level\":\"DEBUG\""), "RUST_LOG=debug took effect");
            assert!(stdout.contains("\"job_id\":\"first\""), "span fields are logged");
        } else {
            assert!(logs.contains("DEBUG"), "RUST_LOG=debug took effect");
        }
        assert!(logs.lines().count() > 20, "a debug run logs plenty:\n{logs}");

        let mut places: Vec<(String, String)> =
            vec![("stdout".into(), stdout), ("stderr".into(), stderr), ("/metrics".into(), metrics)];
        for r in &results {
            places.push((format!("result {}", r.routing_key), r.body.to_string()));
        }
        for (place, text) in &places {
            assert!(!text.contains(&secret), "{log_format}: the appsecret appears in {place}");
            for token in &tokens {
                assert!(!text.contains(token.as_str()), "{log_format}: an access token appears in {place}");
            }
        }
    }
}
