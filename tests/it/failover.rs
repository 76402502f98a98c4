//! Losing a node mid-run: a RabbitMQ node that leads the jobs queue (stopped, or killed), and
//! the Redis master that holds the account's slot. Three worker processes, 3,000 jobs, WeChat
//! (the sandbox) answering in 50 ms. Every job gets its result, nothing is sent twice, and the
//! workers carry on by themselves; how long the flow paused is printed, not asserted.
//!
//! The clusters are throwaway ones on free loopback ports (`harness/cluster.rs`, through
//! `scripts/cluster`); the shared broker and Redis are used only where a test does not fail them.
//! The tests run one at a time, and not beside the tests that measure send rates
//! (`harness::timed`): each takes a node away from a small machine's clusters.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::harness::{
    cluster::{RabbitCluster, RedisCluster},
    *,
};
use crate::wx::{Config, Faults, Keys, QueueType, Sandbox, SandboxConfig, Topology};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer,
    options::{BasicAckOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

const JOBS: usize = 3_000;
/// The node goes away once this many jobs have their result.
const LOSE_NODE_AFTER: usize = 1_000;
/// Jobs in flight per worker: with 50 ms sends, three workers take several seconds for the run,
/// so the loss falls in the middle of it.
const CONCURRENCY: u16 = 8;
/// Bounds, not expectations (a run takes seconds): time for the first results, and for every
/// job's result once the node is gone, on a machine whose disk and CPU others may be using.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const RESULTS_TIMEOUT: Duration = Duration::from_secs(240);

async fn sandbox_with_latency() -> Sandbox {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    sandbox.set_faults(Faults { latency_ms: 50, ..Faults::default() });
    sandbox
}

fn failover_config(ns: &str, sandbox: &Sandbox) -> Config {
    let mut cfg = config(ns, &sandbox.base_url());
    cfg.concurrency = CONCURRENCY;
    cfg
}

/// Publishes the run's jobs to the jobs queue with confirms, all in flight at once.
async fn publish_jobs(connection: &Connection, queue: &str, tag: &str) -> Vec<String> {
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
    let ids: Vec<String> = (0..JOBS).map(|i| format!("{tag}-{i}")).collect();
    let mut confirms = Vec::with_capacity(JOBS);
    for id in &ids {
        let body = serde_json::to_vec(&job(id, &format!("u-{id}"))).expect("json");
        let props =
            BasicProperties::default().with_delivery_mode(2).with_content_type(ShortString::from("application/json"));
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish a job");
        confirms.push(confirm);
    }
    for confirm in futures_util::future::join_all(confirms).await {
        assert!(confirm.expect("confirmed").is_ack(), "the broker took every job");
    }
    let _ = channel.close(200, ShortString::from("published")).await;
    ids
}

/// Results by job_id as they arrive: every routing key each job's results had.
#[derive(Default)]
struct Results {
    by_job: HashMap<String, Vec<String>>,
    received: usize,
}

impl Results {
    fn add(&mut self, body: &serde_json::Value, routing_key: &str) {
        let id = body["job_id"].as_str().unwrap_or_default().to_owned();
        self.by_job.entry(id).or_default().push(routing_key.to_owned());
        self.received += 1;
    }

    /// Jobs with at least one result.
    fn jobs(&self) -> usize {
        self.by_job.len()
    }

    /// Every job of `ids` has results, and each of them is `send.succeeded`.
    fn assert_each_succeeded(&self, ids: &[String]) {
        let missing: Vec<&String> = ids.iter().filter(|id| !self.by_job.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "{} of {} jobs have no result, e.g. {:?}",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
        let failed: Vec<_> =
            self.by_job.iter().filter(|(_, keys)| keys.iter().any(|k| k != "send.succeeded")).take(5).collect();
        assert!(failed.is_empty(), "jobs with a result other than send.succeeded: {failed:?}");
        assert_eq!(self.by_job.len(), ids.len(), "no results for jobs that were never published");
    }
}

/// WeChat saw every job exactly once: one accepted message per job, no send repeated (not even
/// one its `client_msg_id` would have caught).
fn assert_each_sent_once(sandbox: &Sandbox) {
    let stats = sandbox.stats();
    let messages = sandbox.messages();
    let mut per_job: HashMap<&str, usize> = HashMap::new();
    for m in &messages {
        *per_job.entry(m.client_msg_id.as_deref().unwrap_or_default()).or_default() += 1;
    }
    let twice: Vec<_> = per_job.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "jobs sent as two messages: {twice:?}");
    assert_eq!(stats.duplicates, 0, "sends repeated with the same client_msg_id: {stats:?}");
    assert_eq!(stats.sends_accepted, JOBS as u64, "{stats:?}");
    assert_eq!(per_job.len(), JOBS);
}

/// How the sends went around the loss at `lost_at`: the longest gap between two sends that
/// ends after it, and when the send ending that gap came (seconds after the loss).
fn pause_around(sandbox: &Sandbox, lost_at: DateTime<Utc>) -> (f64, f64) {
    let mut t: Vec<i64> = sandbox.messages().iter().map(|m| m.accepted_at.timestamp_micros()).collect();
    t.sort_unstable();
    let lost = lost_at.timestamp_micros();
    let (gap, resumed) = t.windows(2).filter(|w| w[1] > lost).map(|w| (w[1] - w[0], w[1])).max().unwrap_or((0, lost));
    (gap as f64 / 1e6, (resumed - lost) as f64 / 1e6)
}

/// Sends per half second from the first to the last, for the report.
fn timeline(sandbox: &Sandbox, lost_at: DateTime<Utc>) -> String {
    let mut t: Vec<i64> = sandbox.messages().iter().map(|m| m.accepted_at.timestamp_millis()).collect();
    t.sort_unstable();
    let (Some(&first), Some(&last)) = (t.first(), t.last()) else { return String::new() };
    let mut buckets = vec![0usize; ((last - first) / 500 + 1) as usize];
    for x in &t {
        buckets[((x - first) / 500) as usize] += 1;
    }
    let lost = (lost_at.timestamp_millis() - first) / 500;
    buckets
        .iter()
        .enumerate()
        .map(|(i, n)| if i as i64 == lost { format!("[LOST]{n}") } else { n.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The three worker processes, their logs captured: shown when the test fails.
struct Pool {
    workers: Vec<WorkerProcess>,
}

impl Pool {
    fn start(cfg: &Config) -> Pool {
        Pool { workers: (0..3).map(|_| WorkerProcess::captured(cfg, &[])).collect() }
    }

    /// SIGTERM to every worker; each must drain and exit 0.
    async fn stop(&mut self) {
        for w in &self.workers {
            w.signal("TERM");
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            let status = w.wait(Duration::from_secs(30)).await;
            assert!(status.is_some_and(|s| s.success()), "worker {} exits cleanly after SIGTERM: {status:?}", i + 1);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, w) in self.workers.iter().enumerate() {
            let text = w.stdout_so_far();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("publishing its recorded result")).collect();
            eprintln!("--- worker {} log, last lines:\n{}", i + 1, lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
}

/// Removes the test's Redis keys from the shared Redis at the end, also after a failure.
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        finish_in_drop(async move { delete_redis_prefix(&prefix).await });
    }
}

// ---- RabbitMQ ------------------------------------------------------------------------------

/// How the node leading the jobs queue goes away.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// `rabbitmqctl stop_app`: the broker shuts down in order, the Erlang node stays.
    StopApp,
    /// `kill -9` of the node's Erlang VM.
    Kill,
}

/// A node taken away, holding the test's handle on the shared cluster. When the test ends,
/// however it ends, the node is brought back if another test still uses the cluster; otherwise
/// the cluster is about to be removed, and a killed node would take long to restart for nothing.
struct LostNode {
    cluster: Arc<RabbitCluster>,
    node: usize,
}

impl Drop for LostNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.cluster.log_tails(30));
        }
        if Arc::strong_count(&self.cluster) == 1 {
            return;
        }
        let started = Instant::now();
        blocking_in_place(|| self.cluster.restore(self.node));
        eprintln!("node {} back in the cluster after {:.1} s", self.node, started.elapsed().as_secs_f64());
    }
}

/// Runs its closure if the test fails.
struct OnPanic<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnPanic<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

/// Tests that stop a node's broker and have yet to run. A killed node takes long to come back,
/// so the test that kills one goes after them (and then nobody needs the node back).
static STOPS_PENDING: AtomicUsize = AtomicUsize::new(0);

struct StopPending;

impl StopPending {
    fn new() -> StopPending {
        STOPS_PENDING.fetch_add(1, Ordering::SeqCst);
        StopPending
    }
}

impl Drop for StopPending {
    fn drop(&mut self) {
        STOPS_PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A downstream consumer of the results exchange, connected to one node: a quorum queue bound
/// to every routing key.
struct Observer {
    connection: Connection,
    consumer: Consumer,
    channel: Channel,
}

impl Observer {
    async fn bind(url: &str, exchange: &str, queue: &str) -> Observer {
        let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect the observer");
        let channel = connection.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.basic_qos(500, BasicQosOptions::default()).await.expect("qos");
        let consumer = observe(&channel, exchange, (queue, durable, args)).await;
        Observer { connection, consumer, channel }
    }

    /// Reads results into `results` until `jobs` jobs have one or `timeout` passes.
    async fn collect(&mut self, results: &mut Results, jobs: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while results.jobs() < jobs {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
            let Ok(Some(Ok(delivery))) = next else { return };
            let body = serde_json::from_slice(&delivery.data).unwrap_or_default();
            results.add(&body, delivery.routing_key.as_str());
            delivery.ack(BasicAckOptions::default()).await.expect("ack a result");
        }
    }
}

/// Declares the worker's queues through the node at `url`. A node that has just come back may
/// not yet take part in forming a new quorum queue (`cluster_not_formed`): that is retried.
async fn declare_through(url: &str, cfg: &Config) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
        let declared = Topology::from_config(cfg).declare(&connection).await;
        let _ = connection.close(200, ShortString::from("declared")).await;
        match declared {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("declaring the queues again: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("cannot declare the queues on the cluster: {e}"),
        }
    }
}

/// Three worker processes on a three-node cluster; the node leading the jobs queue goes away a
/// third of the way through 3,000 jobs.
async fn broker_failover(loss: Loss) {
    let _pending = matches!(loss, Loss::StopApp).then(StopPending::new);
    let cluster = blocking(RabbitCluster::shared).await;
    let _one_at_a_time = loop {
        let turn = timed().await;
        if matches!(loss, Loss::StopApp) || STOPS_PENDING.load(Ordering::SeqCst) == 0 {
            break turn;
        }
        drop(turn);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let c = Arc::clone(&cluster);
    blocking(move || c.await_all_running(Duration::from_secs(60))).await;

    let nodes_logs = Arc::downgrade(&cluster);
    let _diagnose = OnPanic(move || {
        if let Some(cluster) = nodes_logs.upgrade() {
            eprintln!("{}", cluster.log_tails(30));
        }
    });
    let sandbox = sandbox_with_latency().await;
    let ns = unique("amqp-failover");
    let _keys = RedisKeys(ns.clone());
    let mut cfg = failover_config(&ns, &sandbox);

    // A quorum queue's leader starts on the node it was declared through.
    declare_through(&cluster.node_url(1), &cfg).await;
    let (c, q) = (Arc::clone(&cluster), cfg.jobs_queue.clone());
    let leader = blocking(move || c.leader_of(&q, 1)).await.expect("the jobs queue has a leader");
    // Every worker gets the same list, the leader first: they all start on the node that goes.
    let others: Vec<usize> = (1..=3).filter(|&n| n != leader).collect();
    cfg.amqp_url = [leader, others[0], others[1]].map(|n| cluster.node_url(n)).join(",");

    // Downstream reads the results through another node.
    let observer_node = others[1];
    let mut observer =
        Observer::bind(&cluster.node_url(observer_node), &cfg.results_exchange, &format!("{ns}.observed")).await;
    let ids = publish_jobs(&observer.connection, &cfg.jobs_queue, "amqp").await;

    let started = Instant::now();
    let mut pool = Pool::start(&cfg);
    let mut results = Results::default();
    observer.collect(&mut results, LOSE_NODE_AFTER, START_TIMEOUT).await;
    assert!(results.jobs() >= LOSE_NODE_AFTER, "the pool got going: {} results", results.jobs());

    let lost_at = Utc::now();
    let c = Arc::clone(&cluster);
    match loss {
        Loss::StopApp => blocking(move || c.stop_app(leader)).await,
        Loss::Kill => blocking(move || c.kill(leader)).await,
    }
    // stop_app takes a while (rabbitmqctl starts, the broker shuts down in order).
    let gone_at = (Utc::now() - lost_at).as_seconds_f64();
    let lost = LostNode { cluster, node: leader };
    let cluster = &lost.cluster;
    let before = results.jobs();
    observer.collect(&mut results, JOBS, RESULTS_TIMEOUT).await;
    let run = started.elapsed();
    pool.stop().await;

    if results.jobs() < JOBS {
        let c = Arc::clone(cluster);
        let queues = blocking(move || {
            let columns = ["name", "leader", "online", "messages_ready", "messages_unacknowledged", "consumers"];
            c.ctl(observer_node, &[&["list_queues"][..], &columns, &["--silent"]].concat())
        })
        .await;
        eprintln!("results are missing; the queues now: {queues:?}");
    }
    let (c, q) = (Arc::clone(cluster), cfg.jobs_queue.clone());
    let new_leader = blocking(move || c.leader_of(&q, observer_node)).await;
    let (gap, resumed) = pause_around(&sandbox, lost_at);
    eprintln!(
        "RabbitMQ {loss:?} of node {leader} (leading the jobs queue) after {before} results, command done after \
         {gone_at:.2} s: longest gap between sends {gap:.2} s, ending {resumed:.2} s after the command was \
         issued; new leader: node {new_leader:?}; {} results for {} jobs in {:.1} s",
        results.received,
        results.jobs(),
        run.as_secs_f64()
    );
    eprintln!("sends per 0.5 s: {}", timeline(&sandbox, lost_at));
    results.assert_each_succeeded(&ids);
    assert_each_sent_once(&sandbox);
    assert!(new_leader.is_some_and(|n| n != leader), "another node leads the jobs queue: {new_leader:?}");
    drop(lost);
    let _ = observer.channel.close(200, ShortString::from("done")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_failover_the_jobs_queue_leader_stopped() {
    broker_failover(Loss::StopApp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_failover_the_jobs_queue_leader_killed() {
    broker_failover(Loss::Kill).await;
}

// ---- Redis ---------------------------------------------------------------------------------

/// Three worker processes on a Redis Cluster of three masters with a replica each; the master
/// of the account's slot (its token, rate, pauses and msgid records) is killed a third of the
/// way through 3,000 jobs, and its replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failover_the_accounts_master_killed() {
    let _one_at_a_time = timed().await;
    let cluster = Arc::new(blocking(|| RedisCluster::with_replicas(Duration::from_millis(1_000))).await);
    let sandbox = sandbox_with_latency().await;
    let ns = unique("redis-failover");
    let mut cfg = failover_config(&ns, &sandbox);
    cfg.redis_url = cluster.url();
    // The shared broker's disk is not this test's subject: classic queues confirm and settle
    // without waiting for an fsync that other builds on the machine can stretch to a second.
    cfg.queue_type = QueueType::Classic;
    let mut env = TestEnv::new("redis-failover", cfg).await;
    env.declare_topology().await;

    // Every key of the account carries the hash tag {appid}, so they live in one slot.
    let keys = Keys::new(&ns);
    let (c, token_key) = (Arc::clone(&cluster), keys.token(APPID));
    let (slot, victim) = blocking(move || {
        let slot = c.slot_of(&token_key);
        (slot, c.master_of(slot))
    })
    .await;
    let ids = publish_jobs(&env.bus.connection, &env.config.jobs_queue, "redis").await;

    let started = Instant::now();
    let mut pool = Pool::start(&env.config);
    let mut results = Results::default();
    collect(&mut env, &mut results, LOSE_NODE_AFTER, START_TIMEOUT).await;
    assert!(results.jobs() >= LOSE_NODE_AFTER, "the pool got going: {} results", results.jobs());

    let lost_at = Utc::now();
    let killed = Instant::now();
    let c = Arc::clone(&cluster);
    blocking(move || c.kill(victim)).await;
    // The replica's promotion is watched alongside the run.
    let c = Arc::clone(&cluster);
    let promoted = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(m) = c.masters().into_iter().find(|m| m.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
                && m.port != victim
                && c.is_healthy_master(m.port)
            {
                return Some((m.port, killed.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    let before = results.jobs();
    collect(&mut env, &mut results, JOBS, RESULTS_TIMEOUT).await;
    let run = started.elapsed();
    pool.stop().await;
    let promoted = promoted.await.expect("watcher");

    let (gap, resumed) = pause_around(&sandbox, lost_at);
    // Job records spread over every master by their id; the account's keys are all in its slot.
    let (c, jobs_pattern, msgid_pattern) =
        (Arc::clone(&cluster), keys.job("*"), keys.msgid(APPID, 0).replace(":0", ":*"));
    let spread = blocking(move || {
        let masters = c.masters();
        masters
            .iter()
            .map(|m| (m.port, c.count_keys(m.port, &jobs_pattern), c.count_keys(m.port, &msgid_pattern)))
            .collect::<Vec<_>>()
    })
    .await;
    let (job_records, msgid_records) = spread.iter().fold((0, 0), |(j, m), s| (j + s.1, m + s.2));
    eprintln!(
        "Redis: master {victim} (slot {slot} of {{{APPID}}}) killed after {before} results; replica promoted: \
         {promoted:?}; longest gap between sends {gap:.2} s, ending {resumed:.2} s after the kill; \
         {} results for {} jobs in {:.1} s; per master after the run (port, job records, msgid records): \
         {spread:?}; {job_records} job records and {msgid_records} msgid records of {JOBS} jobs survived",
        results.received,
        results.jobs(),
        run.as_secs_f64()
    );
    eprintln!("sends per 0.5 s: {}", timeline(&sandbox, lost_at));
    results.assert_each_succeeded(&ids);
    assert_each_sent_once(&sandbox);
    assert!(promoted.is_some(), "a replica took over slot {slot} within 30 s");
}

/// Reads the shared broker's results into `results` until `jobs` jobs have one or `timeout` passes.
async fn collect(env: &mut TestEnv, results: &mut Results, jobs: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while results.jobs() < jobs {
        let Some(r) = env.next_result(deadline.saturating_duration_since(Instant::now())).await else { return };
        results.add(&r.body, &r.routing_key);
    }
}

// ---- a node that hangs ---------------------------------------------------------------------

/// SIGTERM while the broker node hangs: the worker cannot cancel its consumer or close its
/// connection cleanly, but it still exits soon after its grace period instead of waiting for a
/// node that may never answer (the platform would kill it, mid-way, much later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_shuts_down_while_its_broker_node_hangs() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("hung-node");
    let mut cfg = config(&ns, &sandbox.base_url());
    // Quorum queues add nothing here, and wait on the shared broker's disk.
    cfg.queue_type = QueueType::Classic;
    let mut env = TestEnv::new("hung-node", cfg).await;
    env.declare_topology().await;
    let node = Forwarder::to_rabbitmq().await;
    let mut through_node = env.config.clone();
    through_node.amqp_url = node.url();
    let worker = spawn_worker(&through_node);
    env.publish_job(&job("before-the-hang", "u-hang")).await;
    let result = env.next_result(Duration::from_secs(20)).await.expect("the worker consumes through the node");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);

    node.freeze();
    let asked = Instant::now();
    worker.cancel.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(60), worker.join).await;
    let took = asked.elapsed();
    eprintln!("with its broker node hung, the worker stopped {:.1} s after it was asked to", took.as_secs_f64());
    assert!(stopped.is_ok(), "the worker is still running {took:?} after it was asked to stop");
    let bound = through_node.shutdown_grace + Duration::from_secs(12);
    assert!(took <= bound, "the worker took {took:?} to stop (grace {:?})", through_node.shutdown_grace);
}
