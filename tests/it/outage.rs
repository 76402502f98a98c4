//! The worker under failure: killed, stopped, cut off from RabbitMQ or Redis.
//!
//! Outages are aimed at this test's own RabbitMQ user and Redis ACL user, so tests running at the
//! same time on the same broker and Redis are not disturbed.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::harness::*;
use crate::wx::{Faults, SandboxConfig};

/// Collects results until every job in `ids` has one; returns all results by job_id.
async fn results_until_all(
    env: &mut TestEnv,
    seen: Vec<Received>,
    ids: &HashSet<String>,
    timeout: Duration,
) -> HashMap<String, Vec<Received>> {
    let deadline = Instant::now() + timeout;
    let mut by_job: HashMap<String, Vec<Received>> = HashMap::new();
    for r in seen {
        by_job.entry(r.body["job_id"].as_str().unwrap_or_default().to_owned()).or_default().push(r);
    }
    while by_job.len() < ids.len() {
        let Some(r) = env.next_result(deadline.saturating_duration_since(Instant::now())).await else { break };
        let id = r.body["job_id"].as_str().unwrap_or_default().to_owned();
        by_job.entry(id).or_default().push(r);
    }
    by_job
}

/// Every job has a result, each a success, and any repeated result is the recorded one again.
fn assert_one_outcome_per_job(by_job: &HashMap<String, Vec<Received>>, ids: &HashSet<String>) {
    let missing: Vec<_> = ids.iter().filter(|id| !by_job.contains_key(*id)).take(5).collect();
    assert!(missing.is_empty(), "{} jobs have no result, e.g. {missing:?}", ids.len() - by_job.len().min(ids.len()));
    for (id, results) in by_job {
        for r in results {
            assert_eq!(r.routing_key, "send.succeeded", "{id}: {}", r.body);
            assert_eq!(r.body["msgid"], results[0].body["msgid"], "{id}: one outcome");
        }
    }
}

fn publish_ids(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_nothing_and_sends_nothing_twice() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    sandbox.set_faults(Faults { latency_ms: 20, ..Faults::default() });
    let ns = unique("kill");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.job_lease = Duration::from_millis(2_000);
    cfg.concurrency = 32;
    let mut env = TestEnv::new("kill", cfg).await;
    env.declare_topology().await;
    let ids = publish_ids(400, "kill");
    for id in &ids {
        env.publish_job(&job(id, &format!("u-{id}"))).await;
    }
    let mut first = WorkerProcess::start(&env.config);
    let early = env.results(100, Duration::from_secs(30)).await;
    assert_eq!(early.len(), 100, "the first worker made progress");
    first.signal("KILL");
    first.wait(Duration::from_secs(5)).await.expect("killed");
    let mut second = WorkerProcess::start(&env.config);

    let ids: HashSet<String> = ids.into_iter().collect();
    let by_job = results_until_all(&mut env, early, &ids, Duration::from_secs(60)).await;
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(15)).await.is_some_and(|s| s.success()));

    assert_one_outcome_per_job(&by_job, &ids);
    let stats = sandbox.stats();
    assert_eq!(stats.sends_accepted, 400, "no job reached WeChat twice: {stats:?}");
    let users: HashSet<_> = sandbox.messages().into_iter().map(|m| m.touser).collect();
    assert_eq!(users.len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_and_leaves_the_rest_queued() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    sandbox.set_faults(Faults { latency_ms: 300, ..Faults::default() });
    let ns = unique("term");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.concurrency = 8;
    cfg.shutdown_grace = Duration::from_secs(10);
    let mut env = TestEnv::new("term", cfg).await;
    env.declare_topology().await;
    let total = 100;
    for id in publish_ids(total, "term") {
        env.publish_job(&job(&id, &format!("u-{id}"))).await;
    }
    let mut worker = WorkerProcess::start(&env.config);
    let mut results = env.results(8, Duration::from_secs(20)).await;
    assert_eq!(results.len(), 8);
    let sends_before = sandbox.stats().send_requests;
    worker.signal("TERM");
    let status = worker.wait(Duration::from_secs(15)).await.expect("the worker exits within its grace period");
    assert!(status.success(), "exit status {status:?}");
    // In-flight jobs finished and their results were confirmed before exit.
    results.extend(env.results(total, Duration::from_secs(2)).await);
    let left = env.queue_len(&env.config.jobs_queue).await as usize;
    let stats = sandbox.stats();
    assert!(results.iter().all(|r| r.routing_key == "send.succeeded"));
    let done: HashSet<_> = results.iter().map(|r| r.body["job_id"].as_str().unwrap().to_owned()).collect();
    // Every send that had reached WeChat when SIGTERM came (in flight or finished) has its
    // result: counted from what the sandbox had received, whatever the timing.
    assert!(
        done.len() as u64 >= sends_before,
        "{} results, but {sends_before} sends had started before SIGTERM",
        done.len()
    );
    assert_eq!(done.len() as u64, stats.sends_accepted, "every sent job has its result");
    assert_eq!(done.len() + left, total, "nothing lost: {} done + {left} queued", done.len());
    assert!(left > 0, "the jobs not yet started stayed in the queue");
}

/// A RabbitMQ user and a Redis ACL user of the test's own, removed at the end.
struct Users {
    name: String,
}

/// `rabbitmqctl ARGS` on the blocking threads; it must succeed.
async fn rabbitmqctl_ok(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = blocking(move || rabbitmqctl().args(&args).output()).await.expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl: {}", String::from_utf8_lossy(&out.stderr));
}

impl Users {
    async fn create(name: &str) -> Users {
        rabbitmqctl_ok(&["add_user", name, "pw"]).await;
        rabbitmqctl_ok(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]).await;
        let mut redis = redis_conn().await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut redis)
            .await
            .expect("create the Redis user");
        Users { name: name.to_owned() }
    }

    fn amqp_url(&self) -> String {
        amqp_url_as(&self.name, "pw")
    }

    fn redis_url(&self) -> String {
        redis_url_as(&self.name, "pw")
    }

    async fn close_amqp_connections(&self) {
        rabbitmqctl_ok(&["close_all_user_connections", &self.name, "outage test"]).await;
    }

    async fn kill_redis_connections(&self) -> i64 {
        let mut redis = redis_conn().await;
        redis::cmd("CLIENT").arg("KILL").arg("USER").arg(&self.name).query_async(&mut redis).await.expect("CLIENT KILL")
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        blocking_in_place(|| {
            let _ = rabbitmqctl().args(["delete_user", &self.name]).output();
            if let Ok(mut redis) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) {
                let _: redis::RedisResult<i64> = redis::cmd("ACL").arg("DELUSER").arg(&self.name).query(&mut redis);
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_recovers_when_rabbitmq_and_redis_drop_its_connections() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    sandbox.set_faults(Faults { latency_ms: 10, ..Faults::default() });
    let ns = unique("outage");
    let users = Users::create(&ns).await;
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.amqp_url = users.amqp_url();
    cfg.redis_url = users.redis_url();
    cfg.job_lease = Duration::from_millis(2_000);
    cfg.concurrency = 16;
    let mut env = TestEnv::new("outage", cfg).await;
    env.declare_topology().await;
    let ids = publish_ids(600, "outage");
    for id in &ids {
        env.publish_job(&job(id, &format!("u-{id}"))).await;
    }
    let worker = spawn_worker(&env.config);
    let mut seen = env.results(100, Duration::from_secs(30)).await;
    users.close_amqp_connections().await;
    seen.extend(env.results(150, Duration::from_secs(30)).await);
    let killed = users.kill_redis_connections().await;
    assert!(killed > 0, "the worker's Redis connections were killed");
    let ids: HashSet<String> = ids.into_iter().collect();
    let by_job = results_until_all(&mut env, seen, &ids, Duration::from_secs(60)).await;
    worker.stop().await;

    assert_one_outcome_per_job(&by_job, &ids);
    assert_eq!(sandbox.stats().sends_accepted, 600, "no job reached WeChat twice");
}
