//! Operating the worker: what `/metrics` counts after a run and shows from the start (HELP
//! text, queue backlog, counters at zero), what `/readyz` and `/healthz` say while Redis or
//! RabbitMQ is away, JSON logs that parse with typed fields, the alert rules, and that no secret
//! reaches the logs, the results or the metrics.
//!
//! Outages go through forwarders of the test's own, switched off and on, so that only this
//! test's worker loses Redis or RabbitMQ; the shared servers stay up for the tests running
//! beside it.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use crate::harness::*;
use crate::wx::{Config, Redis, Sandbox, SandboxAccount, SandboxConfig, TokenApi, health, unrouted_name};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// An in-process worker with its `/healthz`, `/readyz` and `/metrics` served on 127.0.0.1.
struct AdminWorker {
    worker: WorkerHandle,
    admin: Admin,
}

impl AdminWorker {
    async fn start(config: &Config) -> AdminWorker {
        let worker = spawn_worker(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the admin port");
        let admin = Admin::at(&listener.local_addr().expect("the admin address").to_string());
        let router = health::router(Arc::clone(&worker.health), Some(recorder()));
        let stop = worker.cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        AdminWorker { worker, admin }
    }
}

/// The value of the sample `name{labels…}` in a Prometheus text page, summed over the label
/// sets that include `labels`; `None` when no line matches.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = samples(page)
        .into_iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| v)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
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
    cfg.retry.in_process_max = Duration::ZERO;
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
    let ready =
        eventually(Duration::from_secs(10), || async { env.queue_len(&env.config.dead_letter_queue).await == 1 }).await;
    assert!(ready, "the unparseable job is in the dead-letter queue");

    let (status, page) = worker.admin.get("/metrics").await;
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
    assert_eq!(worker.admin.get("/healthz").await.0, 200);
    assert_eq!(worker.admin.get("/readyz").await.0, 200);
    worker.worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_and_rabbitmq_and_liveness_does_not() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("ready");
    let redis = Forwarder::to_redis().await;
    let amqp = Forwarder::to_rabbitmq().await;
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.redis_url = redis.url();
    cfg.amqp_url = amqp.url();
    let mut env = TestEnv::new("ready", cfg).await;
    let worker = AdminWorker::start(&env.config).await;
    let wait = Duration::from_secs(30);

    let (code, body) = worker.admin.until("/readyz", wait, |code, _| code == 200).await;
    assert_eq!(code, 200, "ready once connected: {body}");
    assert_eq!(body, "rabbitmq: up\nredis: up\n");

    redis.off();
    let (code, body) =
        worker.admin.until("/readyz", wait, |code, body| code == 503 && body.contains("redis: down")).await;
    assert_eq!((code, body.as_str()), (503, "rabbitmq: up\nredis: down\n"), "unready without Redis");
    // An outage is no reason to restart the worker.
    assert_eq!(worker.admin.get("/healthz").await.0, 200);
    redis.on();
    let (code, body) = worker.admin.until("/readyz", wait, |code, _| code == 200).await;
    assert_eq!(code, 200, "ready again with Redis back: {body}");

    amqp.off();
    let (code, body) =
        worker.admin.until("/readyz", wait, |code, body| code == 503 && body.contains("rabbitmq: down")).await;
    assert_eq!((code, body.as_str()), (503, "rabbitmq: down\nredis: up\n"), "unready without RabbitMQ");
    assert_eq!(worker.admin.get("/healthz").await.0, 200);
    amqp.on();
    let (code, body) = worker.admin.until("/readyz", wait, |code, _| code == 200).await;
    assert_eq!(code, 200, "ready again with RabbitMQ back: {body}");

    // Ready means it: a job goes through both proxies again.
    env.publish_job(&job("after-outages", "u-after")).await;
    let result = env.next_result(Duration::from_secs(20)).await.expect("a result after the outages");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);
    worker.worker.stop().await;
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
        let mut cfg = config(&ns, &sandbox.base_url());
        cfg.max_attempts = 2;
        cfg.accounts[0].secret = secret.clone().into();
        cfg.accounts[0].token_api = if token_api == "classic" { TokenApi::Classic } else { TokenApi::Stable };
        let mut env = TestEnv::new("secret", cfg).await;
        env.declare_topology().await;
        // Everything, the libraries' debug output included (HTTP, AMQP, Redis clients).
        let worker = WorkerProcess::captured(&env.config, &[("WXPUSH_LOG_FORMAT", log_format), ("RUST_LOG", "debug")]);

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

        let (_, metrics) = worker.admin.get("/metrics").await;
        assert!(metrics.contains("wxpush_jobs_total"), "the metrics page of the run");
        let (stdout, stderr) = worker.stop().await;
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
        assert!(!logs.contains('\u{1b}'), "no colour escape codes in logs written to a file ({log_format})");
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

/// Every line of `stdout` as a JSON object (panics on a line that is not one).
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "not an object: {l}");
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_of_a_failed_job_have_typed_top_level_fields() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("jsonlog");
    let mut env = TestEnv::new("jsonlog", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;
    let worker =
        WorkerProcess::captured(&env.config, &[("WXPUSH_LOG_FORMAT", "json"), ("RUST_LOG", "info,wxpush=debug")]);

    // 43004: the recipient has not followed the account, a permanent failure.
    env.publish_job(&job("json-failed", "errcode-43004-x")).await;
    env.publish_job(&job("json-sent", "u-json")).await;
    env.publish_raw(b"{not json", lapin::BasicProperties::default()).await;
    let results = env.results(2, Duration::from_secs(30)).await;
    assert_eq!(results.len(), 2, "{results:?}");
    let dead =
        eventually(Duration::from_secs(10), || async { env.queue_len(&env.config.dead_letter_queue).await == 1 }).await;
    assert!(dead, "the unparseable job is dead-lettered");
    let (stdout, stderr) = worker.stop().await;
    assert!(stderr.trim().is_empty(), "everything is logged on stdout: {stderr}");
    assert!(!stdout.contains('\u{1b}'), "no colour escape codes in a file");
    let lines = json_lines(&stdout);

    let failed: Vec<&Value> = lines.iter().filter(|l| l["message"] == "job failed").collect();
    assert_eq!(failed.len(), 1, "one `job failed` line:\n{stdout}");
    let line = failed[0];
    assert_eq!(line["errcode"], json!(43004), "errcode is a number: {line}");
    assert_eq!(line["job_id"], json!("json-failed"), "job_id is a top-level string: {line}");
    assert_eq!(line["account"], json!("default"), "{line}");
    assert_eq!(line["level"], json!("WARN"));
    assert!(line["attempts"].is_u64(), "{line}");

    // Every line about a job names it at the top level, as a string; no value is Rust debug text.
    for line in &lines {
        assert!(line.get("span").is_none() && line.get("spans").is_none(), "span fields are flattened: {line}");
        if let Some(id) = line.get("job_id") {
            assert!(id.is_string(), "{line}");
            assert!(line["account"].is_string(), "a job's line names its account: {line}");
        }
        for (key, value) in line.as_object().unwrap() {
            let text = value.as_str().unwrap_or_default();
            assert!(!text.starts_with("Some(") && text != "None", "{key} is Rust debug text: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_logs_json_when_asked() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = std::env::temp_dir().join(format!("{}.stdout", unique("sandbox-log")));
    let _cleanup = RemovedOnDrop(out.clone());
    let mut child = Command::new(env!("CARGO_BIN_EXE_wxpush-sandbox"))
        .env("WXPUSH_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("WXPUSH_SANDBOX_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("WXPUSH_APPID")
        .env_remove("WXPUSH_APPSECRET")
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("start wxpush-sandbox");
    let ready = eventually(Duration::from_secs(20), || async {
        std::fs::read_to_string(&out).unwrap_or_default().contains("ready")
    })
    .await;
    // The faults endpoint logs the new faults; then stop.
    let faults = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{port}/_sandbox/faults"))
        .json(&json!({"latency_ms": 5, "per_second_cap": 100}))
        .send()
        .await;
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    if exit_of(&mut child, Duration::from_secs(10)).await.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(ready, "the sandbox says it is ready");
    assert!(faults.is_ok_and(|r| r.status().is_success()), "faults set");
    let stdout = std::fs::read_to_string(&out).unwrap();
    let lines = json_lines(&stdout);
    let ready_line = lines.iter().find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("ready"))).unwrap();
    assert_eq!(ready_line["base_url"], json!(format!("http://127.0.0.1:{port}")), "{ready_line}");
    let faults_line = lines.iter().find(|l| l["message"] == "faults set").expect("a `faults set` line");
    assert_eq!(faults_line["latency_ms"], json!(5), "{faults_line}");
    assert_eq!(faults_line["per_second_cap"], json!(100), "{faults_line}");
    assert!(faults_line.get("daily_cap").is_none(), "an unset cap is left out: {faults_line}");
    let stopping = lines.iter().find(|l| l["message"] == "stopping").expect("a `stopping` line");
    assert!(stopping["send_requests"].is_u64(), "{stopping}");
}

/// A file removed when the test ends, passed or failed.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `(name, labels, value)` of every sample of a Prometheus text page.
fn samples(page: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in page.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (name, set) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = set
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        out.push((name.to_owned(), labels, value.parse().unwrap_or(f64::NAN)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_page_has_help_backlog_gauges_and_zeroed_counters() {
    const APPID_B: &str = "wxtest0000000002";
    let sandbox = start_sandbox(SandboxConfig {
        accounts: vec![SandboxAccount::new(APPID, SECRET), SandboxAccount::new(APPID_B, "test-secret-0002")],
        ..SandboxConfig::default()
    })
    .await;
    let ns = unique("page");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.accounts.push(account("idle", APPID_B, "test-secret-0002"));
    let env = TestEnv::new("page", cfg).await;
    env.declare_topology().await;
    // The unrouted-results queue (declared with the topology), with one result in it; and one
    // job in the dead-letter queue.
    let unrouted = unrouted_name(&env.config.results_exchange);
    let channel = &env.bus.channel;
    let confirm = channel
        .basic_publish("".into(), unrouted.as_str().into(), Default::default(), b"{}", Default::default())
        .await
        .unwrap();
    confirm.await.unwrap();
    env.publish_raw(b"not json", lapin::BasicProperties::default()).await;

    let worker = WorkerProcess::captured(&env.config, &[]);
    let ready =
        |kind: &str| format!("wxpush_queue_messages_ready{{queue=\"{}\",kind=\"{kind}\"}} 1", queue_of(&env, kind));
    let (code, page) = worker
        .admin
        .until("/metrics", Duration::from_secs(30), |code, page| {
            code == 200 && page.contains(&ready("dead_letter")) && page.contains(&ready("unrouted"))
        })
        .await;
    assert_eq!(code, 200, "{page}");
    let samples = samples(&page);
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| *v)
    };

    // HELP for every metric on the page.
    let mut types = 0;
    for line in page.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(page.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{page}");
        types += 1;
    }
    assert!(types >= 15, "{page}");

    // Backlog gauges of every queue wxpush uses, as RabbitMQ reports them.
    assert_eq!(value("wxpush_queue_messages_ready", &[("kind", "dead_letter")]), Some(1.0), "{page}");
    assert_eq!(value("wxpush_queue_messages_ready", &[("kind", "unrouted")]), Some(1.0), "{page}");
    assert_eq!(value("wxpush_queue_messages_ready", &[("queue", &env.config.jobs_queue), ("kind", "jobs")]), Some(0.0));
    assert_eq!(value("wxpush_queue_consumers", &[("kind", "jobs")]), Some(1.0), "the worker itself: {page}");
    for secs in &env.config.retry.delay_tiers_secs {
        let queue = format!("{}.delay.{secs}s", env.config.jobs_queue);
        assert_eq!(value("wxpush_queue_messages_ready", &[("queue", &queue), ("kind", "delay")]), Some(0.0), "{page}");
    }

    // Counters of an account that has done nothing are there, at zero.
    for status in ["succeeded", "failed", "deferred"] {
        assert_eq!(value("wxpush_jobs_total", &[("account", "idle"), ("status", status)]), Some(0.0), "{page}");
    }
    for name in [
        "wxpush_send_retries_total",
        "wxpush_rate_limit_waits_total",
        "wxpush_jobs_parked_total",
        "wxpush_account_pauses_total",
    ] {
        assert_eq!(value(name, &[("account", "idle")]), Some(0.0), "{name}: {page}");
    }
    assert_eq!(value("wxpush_token_fetches_total", &[("account", "idle"), ("outcome", "error")]), Some(0.0));
    assert_eq!(value("wxpush_jobs_delayed_total", &[]), Some(0.0));
    assert_eq!(value("wxpush_jobs_dead_lettered_total", &[]), Some(1.0), "the unparseable job");

    // What runs, and what it costs.
    assert_eq!(value("wxpush_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0), "{page}");
    assert!(value("process_resident_memory_bytes", &[]).is_some_and(|v| v > 1e6), "{page}");
    assert!(value("process_open_fds", &[]).is_some_and(|v| v >= 3.0), "{page}");
    assert!(value("process_cpu_seconds_total", &[]).is_some(), "{page}");
    drop(worker);
}

/// The queue of `kind` in this test's namespace.
fn queue_of(env: &TestEnv, kind: &str) -> String {
    match kind {
        "dead_letter" => env.config.dead_letter_queue.clone(),
        "unrouted" => format!("{}.unrouted", env.config.results_exchange),
        _ => env.config.jobs_queue.clone(),
    }
}

#[test]
fn alert_rules_query_only_described_metrics_and_say_what_to_do() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let catalog = std::fs::read_to_string(root.join("src/telemetry/catalog.rs")).unwrap();
    let text = std::fs::read_to_string(root.join("deploy/kubernetes/prometheus-rules.yaml")).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("the rules file is YAML");
    let doc: Value = serde_json::to_value(doc).unwrap();
    assert_eq!(doc["kind"], "PrometheusRule");
    let rules: Vec<&Value> =
        doc["spec"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let alerts: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "WxpushJobsBacklogGrowing",
        "WxpushDeadLetters",
        "WxpushTokenUnhealthy",
        "WxpushNoProgress",
        "WxpushUnroutedResults",
    ] {
        assert!(alerts.contains(&wanted), "{wanted} in {alerts:?}");
    }
    for rule in rules {
        let expr = rule["expr"].as_str().expect("an expr");
        let mut names = 0;
        for (i, _) in expr.match_indices("wxpush_") {
            let rest = &expr[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            let name = &rest[..end];
            assert!(
                catalog.contains(&format!("\"{name}\"")),
                "{} queries {name}, which no program describes",
                rule["alert"]
            );
            names += 1;
        }
        assert!(names > 0, "{expr}");
        assert!(rule["for"].is_string(), "{}: a `for`, so that one scrape does not page", rule["alert"]);
        assert!(["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")));
        assert!(rule["annotations"]["summary"].is_string() && rule["annotations"]["description"].is_string());
    }
}
