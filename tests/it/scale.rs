//! Beyond one machine: quorum queues (a delivery limit that parks poison messages, a clear error
//! when a queue of the other kind is in the way), a list of RabbitMQ nodes, and the pool on a
//! Redis Cluster (token sharing, the pool-wide rate limit, the idempotency ledger, every script).

use std::time::{Duration, Instant};

use crate::harness::{cluster::RedisCluster, header_text, *};
use crate::wx::{
    Admission, AmqpError, Budget, Claim, Level, Pause, QueueType, ReconnectingPublisher, Redis, SandboxConfig,
    Topology, check, declare_dead_letter_queue, declare_queue, json_properties, unrouted_name,
};
use lapin::{
    BasicProperties,
    options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use secrecy::{ExposeSecret, SecretString};

/// Declares `queue` with `args` on a channel of its own (a refused declare closes its channel).
async fn declare(env: &TestEnv, queue: &str, args: FieldTable) -> Result<(), AmqpError> {
    let channel = env.bus.connection.create_channel().await.expect("channel");
    let result = declare_queue(&channel, queue, args).await;
    if result.is_ok() {
        let _ = channel.close(200, ShortString::from("done")).await;
    }
    result
}

fn with(mut args: FieldTable, key: &str, value: AMQPValue) -> FieldTable {
    args.insert(ShortString::from(key), value);
    args
}

/// The dead-letter queue of an older wxpush (quorum, no delivery limit) holds parked jobs, so
/// the worker takes it as it is instead of refusing to start until someone deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_declared_by_an_older_wxpush_is_taken_as_it_is() {
    let ns = unique("olddlq");
    let env = TestEnv::new("olddlq", config(&ns, "http://127.0.0.1:9/")).await;
    let old = with(FieldTable::default(), "x-queue-type", AMQPValue::LongString("quorum".into()));
    declare(&env, &env.config.dead_letter_queue, old).await.expect("the dead-letter queue as it used to be declared");
    let topology = Topology::from_config(&env.config);
    topology.declare(&env.bus.connection).await.expect("the old dead-letter queue is accepted");
    // A new one gets the explicit limit: declaring it again with it passes, without it fails.
    let fresh = format!("{ns}.fresh.dead");
    env.remove_later(&fresh);
    declare_dead_letter_queue(&env.bus.connection, &fresh, QueueType::Quorum).await.expect("declare");
    declare(&env, &fresh, topology.dead_letter_queue_args()).await.expect("same arguments");
    let limit =
        declare(&env, &fresh, with(FieldTable::default(), "x-queue-type", AMQPValue::LongString("quorum".into())))
            .await
            .expect_err("the new dead-letter queue has an explicit delivery limit");
    assert!(limit.to_string().contains("x-delivery-limit"), "{limit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_are_quorum_queues_by_default_with_a_delivery_limit() {
    let ns = unique("quorum");
    let cfg = config(&ns, "http://127.0.0.1:9/");
    assert_eq!((cfg.queue_type, cfg.delivery_limit), (QueueType::Quorum, 10), "the defaults");
    let env = TestEnv::new("quorum", cfg).await;
    env.declare_topology().await;
    let topology = Topology::from_config(&env.config);
    let queues = topology.queues();
    assert_eq!(
        queues.len(),
        3 + env.config.retry.delay_tiers_secs.len(),
        "jobs, dead-letter, delay and unrouted queues"
    );
    for (queue, args) in queues {
        // The broker compares a declare with what the queue is: the same arguments pass...
        declare(&env, &queue, args.clone()).await.unwrap_or_else(|e| panic!("{queue} again as declared: {e}"));
        // ...and another queue type is refused, so this one is a quorum queue.
        let classic = with(args, "x-queue-type", AMQPValue::LongString("classic".into()));
        let e = declare(&env, &queue, classic).await.expect_err("a classic declare of a quorum queue is refused");
        assert!(matches!(e, AmqpError::QueueMismatch { .. }), "{queue}: {e}");
        assert!(e.to_string().contains("x-queue-type"), "{queue}: {e}");
    }
    // The jobs queue has the configured delivery limit and dead-letters at least once.
    let jobs = &env.config.jobs_queue;
    for (key, other) in [
        ("x-delivery-limit", AMQPValue::LongLongInt(11)),
        ("x-dead-letter-strategy", AMQPValue::LongString("at-most-once".into())),
        ("x-dead-letter-routing-key", AMQPValue::LongString("elsewhere".into())),
    ] {
        let e = declare(&env, jobs, with(topology.jobs_queue_args(), key, other)).await.expect_err(key);
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
}

/// A job whose result can never be published is requeued on every delivery; past the delivery
/// limit RabbitMQ moves it to the dead-letter queue (untouched, with its death recorded), and
/// the idempotency ledger kept it from being sent more than once meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_requeued_past_the_delivery_limit_ends_in_the_dead_letter_queue() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("poison");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.delivery_limit = 3;
    let mut env = TestEnv::new("poison", cfg).await;
    env.declare_topology().await;
    let worker = spawn_worker(&env.config);
    env.publish_job(&job("healthy", "u-healthy")).await;
    let first = env.next_result(Duration::from_secs(15)).await.expect("the worker runs");
    assert_eq!(first.routing_key, "send.succeeded");

    // From now on every result publish fails: the worker cannot make any job safe.
    env.bus
        .channel
        .exchange_delete(ShortString::from(env.config.results_exchange.as_str()), ExchangeDeleteOptions::default())
        .await
        .expect("delete the results exchange");
    let body = serde_json::to_vec(&job("poison", "u-poison")).unwrap();
    env.publish_raw(&body, BasicProperties::default()).await;

    let dlq = env.config.dead_letter_queue.clone();
    let parked = eventually(Duration::from_secs(20), || async { env.queue_len(&dlq).await == 1 }).await;
    worker.stop().await;
    assert!(parked, "the job reached the dead-letter queue");
    let got = env
        .bus
        .channel
        .basic_get(ShortString::from(dlq.as_str()), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a message in the dead-letter queue");
    assert_eq!(got.delivery.data, body, "the body is untouched");
    let props = &got.delivery.properties;
    assert_eq!(header_text(props, "x-first-death-reason").as_deref(), Some("delivery_limit"), "{props:?}");
    assert_eq!(header_text(props, "x-first-death-queue").as_deref(), Some(env.config.jobs_queue.as_str()));
    assert!(header_text(props, "x-death").is_some(), "RabbitMQ's death record: {props:?}");
    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 0, "nothing left circulating");
    assert_eq!(sandbox.stats().sends_accepted, 2, "the poison job was sent once, however often it came back");
}

/// A classic queue already holding the jobs queue's name: the declare fails with an error that
/// names the queue and what to do; the worker stays up, unready, and retrying, and carries on
/// once the queue is gone. `wxpush-ctl check` reports the same, and a classic configuration
/// accepts the queue as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_the_other_type_is_a_clear_error_the_worker_waits_out() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("mismatch");
    let mut env = TestEnv::new("mismatch", config(&ns, &sandbox.base_url())).await;
    let jobs = env.config.jobs_queue.clone();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    env.bus
        .channel
        .queue_declare(ShortString::from(jobs.as_str()), durable, FieldTable::default())
        .await
        .expect("a classic queue, as an older deployment left it");

    let e =
        Topology::from_config(&env.config).declare(&env.bus.connection).await.expect_err("a quorum declare is refused");
    let text = e.to_string();
    assert!(matches!(&e, AmqpError::QueueMismatch { queue, .. } if *queue == jobs), "{e:?}");
    // The broker names the first argument that differs; the advice covers every case.
    for part in [format!("{jobs:?}"), "inequivalent arg".into(), "WXPUSH_QUEUE_TYPE=classic".into(), "delete".into()] {
        assert!(text.contains(&part), "the error says {part}: {text}");
    }

    let mut classic = env.config.clone();
    classic.queue_type = QueueType::Classic;
    classic.dead_letter_queue = format!("{ns}.classic.dead");
    classic.results_exchange = format!("{ns}.classic.results");
    let classic_unrouted = unrouted_name(&classic.results_exchange);
    env.remove_later(&classic_unrouted);
    env.remove_later(&format!("exchange:{}", classic.results_exchange));
    env.remove_later(&format!("exchange:{classic_unrouted}"));
    classic.retry.delay_tiers_secs = vec![7];
    env.remove_later(&classic.dead_letter_queue);
    env.remove_later(&format!("{jobs}.delay.7s"));
    Topology::from_config(&classic)
        .declare(&env.bus.connection)
        .await
        .expect("queue_type = classic takes the queue as it is");

    let report = check::check(&env.config).await;
    let problems: Vec<&str> = report.problems().map(|f| f.text.as_str()).collect();
    assert!(problems.iter().any(|p| p.contains(&format!("{jobs:?}")) && p.contains("inequivalent arg")), "{report}");
    assert!(report.findings.iter().any(|f| f.level == Level::Ok && f.text.contains("quorum")), "{report}");

    // The worker reaches the broker through a counting forwarder, to see it retry.
    let node = Forwarder::to_rabbitmq().await;
    let mut through_node = env.config.clone();
    through_node.amqp_url = node.url();
    let worker = spawn_worker(&through_node);
    let started = Instant::now();
    let retried = eventually(Duration::from_secs(10), || async { node.connections() >= 3 }).await;
    assert!(retried, "the worker keeps trying: {} connections", node.connections());
    assert!(started.elapsed() >= Duration::from_millis(500), "with backoff, not in a spin: {:?}", started.elapsed());
    assert!(!worker.join.is_finished(), "the worker does not exit over a mismatch");
    assert!(!worker.health.is_ready(), "not ready while it cannot consume");
    let closed = eventually(Duration::from_secs(5), || async { node.open() <= 1 }).await;
    assert!(closed, "a failed attempt closes its connection: {} open", node.open());

    // The operator deletes the drained classic queue; the worker declares it anew and consumes.
    env.bus
        .channel
        .queue_delete(ShortString::from(jobs.as_str()), QueueDeleteOptions::default())
        .await
        .expect("delete the classic queue");
    env.declare_topology().await;
    env.publish_job(&job("after-fix", "u-after-fix")).await;
    let result = env.next_result(Duration::from_secs(20)).await.expect("the worker carried on");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);
    assert!(worker.health.is_ready());
    worker.stop().await;
}

/// `WXPUSH_AMQP_URL` naming three nodes, the first dead: the worker, the webhook's publisher
/// and `wxpush-ctl check` reach the second; when it goes away, the worker moves to the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_brokers_is_tried_in_turn_and_a_lost_node_is_replaced() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (a, b) = (Forwarder::to_rabbitmq().await, Forwarder::to_rabbitmq().await);
    let ns = unique("nodes");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.amqp_url = format!("{}, {}, {}", amqp_url_at(&dead.to_string()), a.url(), b.url());
    let mut env = TestEnv::new("nodes", cfg).await;
    env.declare_topology().await;

    let worker = spawn_worker(&env.config);
    env.publish_job(&job("via-a", "u-a")).await;
    let result = env.next_result(Duration::from_secs(20)).await.expect("a result through the second node");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);
    assert_eq!((a.connections(), b.connections()), (1, 0), "the worker skipped the dead node and took the next");

    let broker = ReconnectingPublisher::new(&env.config.amqp_url, "wxpush-test-webhook");
    broker
        .publish(&env.config.results_exchange, "delivery.success", b"{}", json_properties(Some("via-list")), false)
        .await
        .expect("the webhook's publisher skips the dead node too");
    let event = env.next_result(Duration::from_secs(10)).await.expect("the event arrived");
    assert_eq!(event.correlation_id.as_deref(), Some("via-list"));

    let report = check::check(&env.config).await;
    assert!(report.findings.iter().any(|f| f.level == Level::Ok && f.text.contains(": connected")), "{report}");
    assert!(!report.findings.iter().any(|f| f.text.contains("RabbitMQ") && f.level == Level::Problem), "{report}");

    // The node the worker uses goes away: it reconnects to the one after it.
    let before = b.connections();
    a.off();
    env.publish_job(&job("via-b", "u-b")).await;
    let result = env.next_result(Duration::from_secs(30)).await.expect("a result through the third node");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);
    assert!(b.connections() > before, "the worker moved to the next node");
    worker.stop().await;
}

/// Every store operation, script and pipeline on a Redis Cluster, including the one pipeline
/// whose keys live in different slots (a job's record and its msgid record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_operation_works_on_a_redis_cluster() {
    let cluster = blocking(RedisCluster::start).await;
    let ns = unique("cstore");
    let redis = Redis::connect(&cluster.url(), &ns).await.expect("connect to the cluster");
    redis.ping().await.expect("PING");
    let keys = redis.keys().clone();
    assert_ne!(
        cluster.slot_of(&keys.job("job-1")),
        cluster.slot_of(&keys.msgid(APPID, 42)),
        "the test needs the job and msgid records in different slots"
    );

    let lease = Duration::from_secs(5);
    assert_eq!(redis.claim_job("job-1", "me", lease).await.expect("claim"), Claim::Claimed);
    assert!(matches!(redis.claim_job("job-1", "other", lease).await.expect("claim"), Claim::Busy { .. }));
    redis
        .record_sent("job-1", br#"{"job_id":"job-1"}"#, lease, APPID, 42, Duration::from_secs(60))
        .await
        .expect("record a sent job across two slots");
    assert_eq!(
        redis.claim_job("job-1", "other", lease).await.expect("claim"),
        Claim::Done(br#"{"job_id":"job-1"}"#.to_vec())
    );
    assert_eq!(redis.job_for_msgid(APPID, 42).await.expect("msgid").as_deref(), Some("job-1"));
    assert_eq!(redis.claim_job("job-2", "me", lease).await.expect("claim"), Claim::Claimed);
    redis.release_job("job-2", "me").await.expect("release");
    assert_eq!(redis.claim_job("job-2", "other", lease).await.expect("claim"), Claim::Claimed);

    let budget = Budget::new(5, 0.0, 3);
    let mut granted = 0;
    for _ in 0..4 {
        match redis.admit(APPID, &budget, "20261129").await.expect("admit") {
            Admission::Granted => granted += 1,
            Admission::Wait(_) | Admission::QuotaSpent { .. } => {}
        }
    }
    assert!((1..=3).contains(&granted), "the rate and quota script ran: {granted} granted");
    let pause = Pause { why: "test".into(), parked: false };
    redis.pause_account(APPID, Duration::from_secs(5), &pause).await.expect("pause");
    let (left, read) = redis.account_pause(APPID).await.expect("pause read").expect("paused");
    assert!(left > Duration::from_secs(3) && read == pause, "{left:?} {read:?}");

    assert!(redis.try_lock_token(APPID, "me", lease).await.expect("lock"));
    assert!(!redis.try_lock_token(APPID, "other", lease).await.expect("lock"));
    redis.store_token_failure(APPID, 1, "boom", Duration::from_millis(100)).await.expect("failure");
    let token = SecretString::from("tok-1");
    redis.store_token(APPID, &token, Duration::from_secs(60)).await.expect("store the token");
    let snapshot = redis.read_token(APPID).await.expect("read the token");
    assert_eq!(snapshot.token.expect("a token").value.expose_secret(), "tok-1");
    assert!(snapshot.failure.is_none(), "storing the token cleared the failure mark");
    redis.unlock_token(APPID, "me").await.expect("unlock");
    assert!(redis.invalidate_token(APPID, &token).await.expect("invalidate"));

    // The webhook's claim reads the msgid record in the same round trip.
    let wait = Duration::from_millis(200);
    let mut mark = redis.push_mark(APPID, "42:success");
    match mark.claim(Some(42), lease, wait).await.expect("claim a push") {
        (Claim::Claimed, job_id) => assert_eq!(job_id.as_deref(), Some("job-1")),
        other => panic!("the first push owns its event: {other:?}"),
    }
    mark.done(lease).await.expect("mark done");
    let again = redis.push_mark(APPID, "42:success").claim(None, lease, wait).await.expect("claim again");
    assert_eq!(again, (Claim::Done(Vec::new()), None));
}

/// As `reliability::a_duplicate_job_is_not_sent_again_and_gets_its_recorded_result`, the
/// idempotency ledger on a Redis Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_job_is_sent_once_on_a_redis_cluster() {
    let cluster = blocking(RedisCluster::start).await;
    crate::reliability::a_duplicate_job_is_sent_once("cledger", &cluster.url()).await;
}

/// As `worker::three_workers_share_one_token_through_expiry_and_revocation`, with the token, its
/// lock and its failure mark on a Redis Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_token_on_a_redis_cluster() {
    let cluster = blocking(RedisCluster::start).await;
    crate::worker::three_workers_share_one_token("ctoken", 600, &cluster.url()).await;
}

/// As `limits::three_worker_processes_hold_one_rate_limit`, the limiter's state on a Redis
/// Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_hold_one_rate_limit_on_a_redis_cluster() {
    let _timed = timed().await;
    let cluster = blocking(RedisCluster::start).await;
    crate::limits::three_worker_processes_hold_one_rate_limit_of_100("crate", 800, &cluster.url()).await;
}
