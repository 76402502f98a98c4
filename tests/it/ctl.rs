//! wxpush-ctl's commands, driven through `wxpush::ctl` against the real local RabbitMQ and
//! Redis, each test in its own namespace.

use std::{
    collections::BTreeSet,
    process::Stdio,
    time::{Duration, Instant},
};

use crate::harness::*;
use crate::wx::{
    ATTEMPTS_HEADER, Config, CtlError, DemoOptions, ENV_VARS, Faults, JobKind, Pause, PublishOptions, QueueRole,
    QuotaDay, REASON_HEADER, ReceivedResult, Recorder, Redis, ReplayOptions, SOURCE_HEADER, SandboxAccount,
    SandboxConfig, Selection, ShowOptions, ShowSummary, Silent, Source, Topology, check, dead,
    declare_results_exchange, declare_unrouted_queue, demo, header_str, json_properties, publish, results, status,
    unrouted_name,
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A config whose WeChat is nowhere: for tests that run no worker.
/// Messages ready in `queue` once `expected` are, or after 5 s: messages a command handed back
/// (nack with requeue) become ready again asynchronously on a quorum queue.
async fn settled_len(env: &TestEnv, queue: &str, expected: u32) -> u32 {
    eventually(Duration::from_secs(5), || async { env.queue_len(queue).await == expected }).await;
    env.queue_len(queue).await
}

fn offline_config(ns: &str) -> Config {
    config(ns, "http://127.0.0.1:9")
}

async fn get_one(env: &TestEnv, queue: &str) -> Option<Delivery> {
    let message = env
        .bus
        .channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")?;
    message.delivery.ack(BasicAckOptions::default()).await.expect("ack");
    Some(message.delivery)
}

fn message_id(d: &Delivery) -> Option<String> {
    d.properties.message_id().as_ref().map(|m| m.to_string())
}

fn header(d: &Delivery, name: &str) -> Option<AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(name).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_skips_lines_that_are_not_objects_and_confirms_the_rest() {
    let ns = unique("ctl-pub");
    let env = TestEnv::new("ctl-pub", offline_config(&ns)).await;
    let good = [
        r#"{"job_id":"p-1","touser":"u1","template_id":"t","data":{"k":{"value":"v"}}}"#,
        r#"{"job_id":"p-2","touser":"u2","template_id":"t","data":{"k":{"value":"黄先生"}}}"#,
        r#"{"touser":"u3","template_id":"t","data":{}}"#,
    ];
    let input = format!("{}\nthis is not json\n\n{}\r\n[1,2,3]\n   {}   \n", good[0], good[1], good[2]);
    let recorder = Recorder::default();
    let report = publish::publish(&env.config, input.as_bytes(), "test input", &PublishOptions::default(), &recorder)
        .await
        .expect("publish runs");

    assert_eq!(report.lines, 5, "blank lines are not counted");
    assert_eq!(report.published, 3);
    assert_eq!(report.skipped_count, 2);
    let skipped: Vec<u64> = report.skipped.iter().map(|s| s.line).collect();
    assert_eq!(skipped, vec![2, 5], "skipped lines are named by their line number");
    assert!(report.skipped[0].reason.contains("not valid JSON"), "{:?}", report.skipped[0]);
    assert!(report.skipped[1].reason.contains("array"), "{:?}", report.skipped[1]);
    let notes = recorder.notes.lock().unwrap().clone();
    assert!(notes.iter().any(|n| n.starts_with("line 2:")), "{notes:?}");
    assert_eq!(report.without_job_id, 1);
    assert!(!report.all_good());
    assert!(report.to_string().contains("published 3 of 5 jobs"), "{report}");
    assert!(report.created_queue, "no worker declared the jobs queue yet: publish did, and says so");
    assert!(report.to_string().contains("did not exist"), "{report}");

    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 3);
    for (i, expected) in good.iter().enumerate() {
        let d = get_one(&env, &env.config.jobs_queue).await.expect("a published job");
        assert_eq!(d.data, expected.as_bytes(), "the line is published byte for byte");
        let expected_id = [Some("p-1"), Some("p-2"), None][i];
        assert_eq!(message_id(&d).as_deref(), expected_id);
        assert_eq!(d.properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
        assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
    }
}

/// Plays the worker: answers each job on the results exchange as `answer` says (None: never).
async fn fake_worker(config: Config, answer: fn(&str) -> Option<(&'static str, Value)>) {
    let conn = Connection::connect(amqp_url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            ShortString::from(config.jobs_queue.as_str()),
            ShortString::from("fake-worker"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publish = |key: &'static str, id: String, body: Value| {
        let ch = ch.clone();
        let exchange = config.results_exchange.clone();
        async move {
            let props = json_properties(Some(&id));
            ch.basic_publish(
                ShortString::from(exchange.as_str()),
                ShortString::from(key),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).unwrap(),
                props,
            )
            .await
            .unwrap();
        }
    };
    while let Some(Ok(d)) = consumer.next().await {
        let id = message_id(&d).unwrap_or_default();
        if let Some((key, body)) = answer(&id) {
            // Results of other jobs (someone else's traffic) and duplicates must not confuse it.
            publish("send.succeeded", "someone-else".into(), json!({"job_id": "someone-else"})).await;
            publish(key, id.clone(), body.clone()).await;
            publish(key, id, body).await;
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_summarises_results_published_on_the_exchange() {
    let ns = unique("ctl-wait");
    let env = TestEnv::new("ctl-wait", offline_config(&ns)).await;
    env.declare_topology().await;
    let answers = tokio::spawn(fake_worker(env.config.clone(), |id| match id {
        "w-ok" => Some(("send.succeeded", json!({"job_id": id, "status": "succeeded"}))),
        "w-openid-1" | "w-openid-2" => {
            Some(("send.failed", json!({"job_id": id, "status": "failed", "reason": "invalid openid"})))
        }
        "w-expired" => Some(("send.failed", json!({"job_id": id, "status": "failed", "reason": "expired"}))),
        _ => None,
    }));
    let ids = ["w-ok", "w-openid-1", "w-openid-2", "w-expired", "w-lost"];
    let input: String = ids.iter().map(|id| format!("{}\n", job(id, "u"))).collect();
    let timeout = Duration::from_secs(3);
    let options = PublishOptions { wait: Some(timeout), ..PublishOptions::default() };
    let report =
        publish::publish(&env.config, input.as_bytes(), "test", &options, &Silent).await.expect("publish runs");
    answers.abort();

    assert_eq!(report.published, 5);
    let w = report.wait.as_ref().expect("a wait summary");
    assert_eq!((w.jobs, w.succeeded, w.failed, w.missing), (5, 1, 3, 1), "{report}");
    assert_eq!(w.failed_by_reason, vec![("invalid openid".to_owned(), 2), ("expired".to_owned(), 1)]);
    let failed: Vec<&str> = w.failed_jobs.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(failed, vec!["w-expired", "w-openid-1", "w-openid-2"], "the failed job ids are listed");
    assert_eq!(w.missing_ids, vec!["w-lost".to_owned()]);
    assert!(w.waited >= timeout, "waited the whole timeout for the missing one: {:?}", w.waited);
    assert!(!report.all_good());
    let text = report.to_string();
    assert!(text.contains("1 succeeded, 3 failed, 1 missing"), "{text}");
    assert!(text.contains("invalid openid: w-openid-1, w-openid-2") && text.contains("expired: w-expired"), "{text}");
    assert!(text.contains("w-lost"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ends_as_soon_as_a_real_worker_answered_every_job() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("ctl-waitw");
    let env = TestEnv::new("ctl-waitw", config(&ns, &sandbox.base_url())).await;
    let worker = spawn_worker(&env.config);
    let input = [job("ww-1", "user-1"), job("ww-2", "user-2"), job("ww-bad", "errcode-40003-x")]
        .iter()
        .map(|j| format!("{j}\n"))
        .collect::<String>();
    let timeout = Duration::from_secs(60);
    let options = PublishOptions { wait: Some(timeout), ..PublishOptions::default() };
    let started = Instant::now();
    let report =
        publish::publish(&env.config, input.as_bytes(), "test", &options, &Silent).await.expect("publish runs");
    worker.stop().await;

    let w = report.wait.as_ref().expect("a wait summary");
    assert_eq!((w.succeeded, w.failed, w.missing), (2, 1, 0), "{report}");
    assert!(w.failed_by_reason[0].0.contains("openid"), "{:?}", w.failed_by_reason);
    assert!(started.elapsed() < timeout, "did not wait out the timeout once all results were in");
    assert_eq!(sandbox.stats().sends_accepted, 2);
}

/// Parks a job in the dead-letter queue the way the pipeline does.
async fn park(env: &TestEnv, message_id: Option<&str>, body: &[u8], reason: &str) {
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from(REASON_HEADER), header_str(reason));
    headers.insert(ShortString::from(SOURCE_HEADER), header_str(&env.config.jobs_queue));
    headers.insert(ShortString::from("x-wxpush-dead-lettered-at"), header_str("2026-11-28T02:19:48+00:00"));
    headers.insert(ShortString::from(ATTEMPTS_HEADER), AMQPValue::LongUInt(5));
    headers.insert(ShortString::from("x-tenant"), header_str("shop"));
    let mut props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_correlation_id(ShortString::from("corr-kept"))
        .with_headers(headers);
    if let Some(id) = message_id {
        props = props.with_message_id(ShortString::from(id));
    }
    env.bus
        .channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(env.config.dead_letter_queue.as_str()),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn parked_ids(config: &Config) -> Vec<Option<String>> {
    dead::list(config, 100).await.expect("list").jobs.into_iter().map(|j| j.job_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_shows_why_jobs_were_parked_and_removes_nothing() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("ctl-dlist");
    let env = TestEnv::new("ctl-dlist", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;
    // The real pipeline parks these: an unknown account, then a body that is not JSON.
    let mut unknown = job("d-unknown", "u");
    unknown["account"] = "nobody".into();
    env.publish_job(&unknown).await;
    env.publish_raw(b"{ this is not json", BasicProperties::default()).await;
    let worker = spawn_worker(&env.config);
    let dlq = env.config.dead_letter_queue.clone();
    assert!(eventually(Duration::from_secs(15), || async { env.queue_len(&dlq).await == 2 }).await, "both jobs parked");
    worker.stop().await;

    let list = dead::list(&env.config, 10).await.expect("list");
    assert_eq!((list.total, list.jobs.len()), (2, 2));
    assert_eq!(list.jobs.iter().map(|j| j.position).collect::<Vec<_>>(), vec![1, 2]);
    // The worker parks concurrently: find each by what it is, not by position.
    let unknown = list.jobs.iter().find(|j| j.job_id.is_some()).expect("the job with a job_id");
    assert_eq!(unknown.job_id.as_deref(), Some("d-unknown"));
    assert!(unknown.reason.as_deref().unwrap_or_default().contains("unknown account"), "{unknown:?}");
    assert_eq!(unknown.source_queue.as_deref(), Some(env.config.jobs_queue.as_str()));
    assert!(unknown.dead_lettered_at.is_some(), "{unknown:?}");
    let garbage = list.jobs.iter().find(|j| j.job_id.is_none()).expect("the unparseable job");
    assert!(garbage.reason.as_deref().unwrap_or_default().contains("not JSON"), "{garbage:?}");
    assert_eq!(garbage.size, b"{ this is not json".len());
    assert_eq!(garbage.preview, "{ this is not json");
    let text = list.to_string();
    assert!(text.contains("unknown account") && text.contains("removes nothing"), "{text}");

    assert_eq!(settled_len(&env, &dlq, 2).await, 2, "listing removed nothing");
    let again = dead::list(&env.config, 1).await.expect("list");
    assert_eq!((again.total, again.jobs.len()), (2, 1), "--limit is honoured");
    assert_eq!(again.jobs[0], list.jobs[0], "the head of the queue is unchanged");
    assert_eq!(settled_len(&env, &dlq, 2).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_exactly_the_chosen_job_untouched_but_for_the_dead_letter_headers() {
    let ns = unique("ctl-replay");
    let env = TestEnv::new("ctl-replay", offline_config(&ns)).await;
    env.declare_topology().await;
    let bodies: Vec<Vec<u8>> = ["r-1", "r-2", "r-3"].iter().map(|id| job(id, "u").to_string().into_bytes()).collect();
    park(&env, Some("r-1"), &bodies[0], "expired").await;
    park(&env, Some("r-2"), &bodies[1], "invalid job: unknown account \"x\"").await;
    park(&env, Some("r-3"), &bodies[2], "expired").await;

    let selection = Selection::JobIds(BTreeSet::from(["r-2".to_owned(), "not-there".to_owned()]));
    let report = dead::replay(&env.config, &ReplayOptions { selection, dry_run: false }).await.expect("replay runs");
    assert_eq!(report.moved, vec!["r-2".to_owned()]);
    assert_eq!(report.not_found, vec!["not-there".to_owned()]);
    assert_eq!((report.examined, report.left), (3, 2));
    assert!(!report.all_good(), "an id that was not found is reported");

    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 1);
    let moved = get_one(&env, &env.config.jobs_queue).await.expect("the replayed job");
    assert_eq!(moved.data, bodies[1], "body identical");
    assert_eq!(message_id(&moved).as_deref(), Some("r-2"));
    assert_eq!(moved.properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-kept"));
    assert_eq!(*moved.properties.delivery_mode(), Some(2));
    for gone in [REASON_HEADER, SOURCE_HEADER, ATTEMPTS_HEADER, "x-wxpush-dead-lettered-at"] {
        assert_eq!(header(&moved, gone), None, "{gone} removed");
    }
    assert_eq!(header(&moved, "x-tenant"), Some(header_str("shop")), "other headers kept");

    assert_eq!(settled_len(&env, &env.config.dead_letter_queue, 2).await, 2);
    assert_eq!(parked_ids(&env.config).await, vec![Some("r-1".to_owned()), Some("r-3".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_moves_everything_and_a_dry_run_moves_nothing() {
    let ns = unique("ctl-replayall");
    let env = TestEnv::new("ctl-replayall", offline_config(&ns)).await;
    env.declare_topology().await;
    park(&env, Some("a-1"), job("a-1", "u").to_string().as_bytes(), "expired").await;
    park(&env, None, b"not json at all", "invalid job: body is not JSON").await;
    park(&env, Some("a-3"), job("a-3", "u").to_string().as_bytes(), "expired").await;

    let dry = dead::replay(&env.config, &ReplayOptions { selection: Selection::All, dry_run: true }).await.unwrap();
    assert_eq!(dry.moved, vec!["a-1".to_owned(), "(no job_id)".to_owned(), "a-3".to_owned()]);
    assert!(dry.to_string().contains("would move 3"), "{dry}");
    assert_eq!(settled_len(&env, &env.config.dead_letter_queue, 3).await, 3, "a dry run moves nothing");
    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 0);

    let all = dead::replay(&env.config, &ReplayOptions { selection: Selection::All, dry_run: false }).await.unwrap();
    assert_eq!(all.moved.len(), 3);
    assert!(all.all_good());
    assert_eq!(env.queue_len(&env.config.dead_letter_queue).await, 0);
    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 3);
    let raw = {
        get_one(&env, &env.config.jobs_queue).await;
        get_one(&env, &env.config.jobs_queue).await.unwrap()
    };
    assert_eq!(raw.data, b"not json at all", "in order, bodies untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_token_age_and_never_a_secret() {
    const TOKEN: &str = "ACCESS_TOKEN_tHiS-iS-sEcReT-42";
    const CALLBACK: &str = "callback-token-value-777";
    const AES: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    let ns = unique("ctl-status");
    let mut cfg = offline_config(&ns);
    cfg.accounts[0].callback_token = Some(SecretString::from(CALLBACK));
    cfg.accounts[0].encoding_aes_key = Some(SecretString::from(AES));
    cfg.accounts[0].daily_quota = Some(1000);
    let env = TestEnv::new("ctl-status", cfg).await;
    env.declare_topology().await;
    env.publish_job(&job("s-1", "u")).await;

    let redis = Redis::connect(redis_url(), &ns).await.unwrap();
    let mut conn = redis_conn().await;
    let fetched_at = chrono::Utc::now().timestamp_millis() - 65_000;
    let _: () = redis::cmd("SET")
        .arg(redis.keys().token(APPID))
        .arg(format!("{fetched_at}:{TOKEN}"))
        .arg("PX")
        .arg(7_135_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let day = QuotaDay::with_length(env.config.quota_day.as_secs()).key(chrono::Utc::now());
    let _: () = redis::cmd("SET").arg(redis.keys().quota(APPID, &day)).arg(17).query_async(&mut conn).await.unwrap();
    let pause = Pause { why: "45011: minute quota reached".into(), parked: false };
    redis.pause_account(APPID, Duration::from_secs(50), &pause).await.unwrap();
    redis
        .store_token_failure(
            APPID,
            3,
            &format!("WeChat refused: errcode 40125 (secret {SECRET})"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();

    let report = status::status(&env.config).await;
    assert!(report.is_complete(), "{report}");
    let a = &report.accounts[0];
    let age = a.token.as_ref().and_then(|t| t.age).expect("the token's age");
    assert!((Duration::from_secs(64)..Duration::from_secs(80)).contains(&age), "age {age:?}");
    assert_eq!((a.sent_today, a.daily_quota), (17, Some(1000)));
    assert!(a.pause.as_ref().is_some_and(|(left, why)| *left > Duration::ZERO && why.contains("45011")));
    assert_eq!(a.fetch_failure.as_ref().map(|f| f.streak), Some(3));
    let jobs = report.queue(QueueRole::Jobs).expect("the jobs queue");
    assert_eq!((jobs.exists, jobs.ready, jobs.consumers), (true, 1, 0));

    let text = report.to_string();
    assert!(text.contains("fetched 1 min"), "{text}");
    assert!(text.contains("17 of 1000"), "{text}");
    assert!(text.contains("45011"), "{text}");
    assert!(text.contains(&format!("{}: 1 ready", env.config.jobs_queue)), "{text}");
    for secret in [TOKEN, SECRET, CALLBACK, AES] {
        assert!(!text.contains(secret), "status shows a secret ({secret}):\n{text}");
        assert!(!format!("{report:?}").contains(secret), "the report holds a secret ({secret})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_which_credentials_are_set_without_showing_them() {
    let ns = unique("ctl-check");
    let mut cfg = offline_config(&ns);
    cfg.accounts[0].encoding_aes_key = Some(SecretString::from("too-short-key"));
    let mut nosecret = account("shop", "wxshop000000001", "");
    nosecret.callback_token = Some(SecretString::from("cb-token-value"));
    cfg.accounts.push(nosecret);
    let report = check::check(&cfg).await;
    let text = report.to_string();
    assert!(!report.passed(), "{text}");
    assert!(text.contains("RabbitMQ") && text.contains("connected"), "{text}");
    assert!(text.contains("PING answered"), "{text}");
    assert!(text.contains("does not exist yet"), "queues not declared yet are a note: {text}");
    let problems: Vec<_> = report.problems().map(|p| p.text.clone()).collect();
    assert!(problems.iter().any(|p| p.contains("encoding_aes_key is not valid")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("shop: no secret")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("callback token")), "AES key without a token: {problems:?}");
    for secret in [SECRET, "too-short-key", "cb-token-value"] {
        assert!(!text.contains(secret), "check shows a secret:\n{text}");
    }

    let mut down = offline_config(&ns);
    down.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let report = check::check(&down).await;
    assert!(!report.passed());
    assert!(report.problems().any(|p| p.text.contains("RabbitMQ") && p.text.contains("WXPUSH_AMQP_URL")), "{report}");
}

async fn queue_exists(queue: &str) -> bool {
    let conn = Connection::connect(amqp_url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let exists = ch.queue_declare(ShortString::from(queue), passive, FieldTable::default()).await.is_ok();
    let _ = conn.close(200, ShortString::from("done")).await;
    exists
}

async fn redis_keys(prefix: &str) -> Vec<String> {
    let mut conn = redis_conn().await;
    redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_sends_the_seed_job_through_a_worker_and_cleans_up() {
    let ns = unique("ctl-demo");
    let options = DemoOptions {
        namespace: ns.clone(),
        amqp_url: amqp_url().into(),
        redis_url: redis_url().into(),
        timeout: Duration::from_secs(30),
        kind: JobKind::Template,
    };
    // The env watches the demo's exchange independently and cleans up should the demo fail.
    let mut env = TestEnv::new("ctl-demo", options.worker_config("http://127.0.0.1:9", "unused")).await;

    let report = demo::run(&options).await.expect("the demo succeeds");
    assert_eq!(report.routing_key, "send.succeeded");
    assert_eq!(report.result["job_id"], demo::DEMO_JOB_ID);
    assert_eq!(report.result["status"], "succeeded");
    assert_eq!(report.result["msgid"].as_u64(), Some(report.request.msgid));
    assert_eq!(report.request.appid, demo::DEMO_APPID);
    assert_eq!(report.request.body["touser"], "oia2TjuEGTNoeX76QEjQNrcURxG8");
    assert_eq!(report.request.body["template_id"], "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY");
    assert_eq!(report.request.body["data"]["Left"]["value"], "6504.09");
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    let text = report.to_string();
    assert!(text.contains("send.succeeded") && text.contains("黄先生"), "{text}");
    assert!(text.find("\"type\": \"send\"") < text.find("\"job_id\""), "the result keeps its own key order:\n{text}");

    let observed = env.next_result(Duration::from_secs(5)).await.expect("the result went out on the exchange");
    assert_eq!(observed.routing_key, "send.succeeded");
    assert_eq!(observed.body, report.result);

    let config = &env.config;
    for queue in [&config.jobs_queue, &config.dead_letter_queue, &format!("{}.delay.1s", config.jobs_queue)] {
        assert!(!queue_exists(queue).await, "demo queue {queue} removed");
    }
    assert!(redis_keys(&ns).await.is_empty(), "demo Redis keys removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_says_how_to_start_what_is_not_running() {
    let base = DemoOptions {
        namespace: unique("ctl-demo-down"),
        amqp_url: amqp_url().into(),
        redis_url: redis_url().into(),
        timeout: Duration::from_secs(5),
        kind: JobKind::Template,
    };
    let no_rabbit = DemoOptions { amqp_url: "amqp://guest:guest@127.0.0.1:1/%2f".into(), ..base.clone() };
    let e = demo::run(&no_rabbit).await.expect_err("no RabbitMQ");
    assert!(matches!(e, CtlError::NotReachable { service: "RabbitMQ", .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("Start it") && text.contains("WXPUSH_AMQP_URL") && !text.contains("guest:guest"), "{text}");

    let no_redis = DemoOptions { redis_url: "redis://127.0.0.1:1/".into(), ..base };
    let e = demo::run(&no_redis).await.expect_err("no Redis");
    assert!(matches!(e, CtlError::NotReachable { service: "Redis", .. }), "{e}");
    assert!(e.to_string().contains("WXPUSH_REDIS_URL"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The binary, as operators run it.

/// Runs the real `wxpush-ctl` with `cfg` given through the WXPUSH_* variables (and nothing from
/// this process's own environment), feeding `stdin` when given.
async fn run_ctl(cfg: &Config, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxpush-ctl"));
    for (var, _) in ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove("WXPUSH_CONFIG").env_remove("WXPUSH_MANAGEMENT_URL");
    cmd.envs(config_env(cfg)).env("RUST_LOG", "warn");
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start wxpush-ctl");
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).await.expect("write to wxpush-ctl");
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("wxpush-ctl ends within 60 s")
        .expect("wxpush-ctl's output")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Removes a file when dropped, also after a failed assertion.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const GOOD_APPID: &str = "wx00000000000000a1";
const OTHER_APPID: &str = "wx00000000000000b2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_asks_wechat_for_a_token_per_account_and_fails_on_a_wrong_secret() {
    let sandbox = start_sandbox(SandboxConfig {
        accounts: vec![
            SandboxAccount::new(GOOD_APPID, "right-secret-a1"),
            SandboxAccount::new(OTHER_APPID, "right-secret-b2"),
        ],
        ..SandboxConfig::default()
    })
    .await;
    let ns = unique("ctl-checktok");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.accounts = vec![account("default", GOOD_APPID, "right-secret-a1")];
    let _env = TestEnv::new("ctl-checktok", cfg.clone()).await;

    let good = check::check(&cfg).await;
    assert!(good.passed(), "a right secret passes:\n{good}");
    assert!(good.to_string().contains("account default: WeChat granted a token (stable_token"), "{good}");
    assert!(good.to_string().contains("all checks passed"), "{good}");

    let mut wrong = cfg.clone();
    wrong.accounts.push(account("shop", OTHER_APPID, "wrong-secret-b2"));
    let report = check::check(&wrong).await;
    let text = report.to_string();
    assert!(!report.passed(), "{text}");
    assert!(!text.contains("all checks passed"), "{text}");
    let problems: Vec<&str> = report.problems().map(|p| p.text.as_str()).collect();
    assert_eq!(problems.len(), 1, "only the wrong secret is a problem: {problems:?}");
    assert!(
        problems[0].contains("account shop")
            && problems[0].contains("errcode 40125")
            && problems[0].contains("AppSecret is wrong"),
        "WeChat's answer and the advice: {problems:?}"
    );
    assert!(!text.contains("wrong-secret-b2") && !text.contains("right-secret-a1"), "no secret shown:\n{text}");

    let asked = sandbox.stats().token_requests;
    let offline = check::check_with(&wrong, check::CheckOptions { offline: true }).await;
    assert_eq!(sandbox.stats().token_requests, asked, "--offline asks WeChat nothing");
    assert!(offline.passed() && offline.to_string().contains("offline"), "{offline}");

    // The binary exits non-zero, and says why.
    let mut env_wrong = cfg.clone();
    env_wrong.accounts = vec![account("default", GOOD_APPID, "not-the-secret")];
    let out = run_ctl(&env_wrong, &["check"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("errcode 40125") && !stdout(&out).contains("all checks passed"), "{}", stdout(&out));
    let out = run_ctl(&cfg, &["check", "-o", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("check -o json is JSON");
    assert_eq!(report["passed"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flags_placeholder_keys_and_malformed_appids() {
    let secret_yaml: Value = serde_norway::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/secret.yaml")).unwrap(),
    )
    .unwrap();
    let deployed_key = secret_yaml["stringData"]["WXPUSH_ENCODING_AES_KEY"].as_str().expect("the placeholder key");
    let deployed_secret = secret_yaml["stringData"]["WXPUSH_APPSECRET"].as_str().expect("the placeholder secret");
    let ns = unique("ctl-checkph");
    let mut cfg = offline_config(&ns);
    cfg.accounts = vec![account("default", "wx1", deployed_secret), account("shop", GOOD_APPID, "s3cr3t-shop")];
    cfg.accounts[0].callback_token = Some(SecretString::from("cb-token"));
    cfg.accounts[0].encoding_aes_key = Some(SecretString::from(deployed_key));
    cfg.accounts[1].callback_token = Some(SecretString::from("cb-token"));
    cfg.accounts[1].encoding_aes_key = Some(SecretString::from("a".repeat(43)));

    let report = check::check_with(&cfg, check::CheckOptions { offline: true }).await;
    let problems: Vec<&str> = report.problems().map(|p| p.text.as_str()).collect();
    assert!(
        problems.iter().any(|p| p.contains("account default: appid \"wx1\" is not a WeChat appid")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("account default: encoding_aes_key is a placeholder")),
        "the key of deploy/kubernetes/secret.yaml: {problems:?}"
    );
    assert!(problems.iter().any(|p| p.contains("account default: secret is a placeholder")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("account shop: encoding_aes_key is a placeholder")), "{problems:?}");
    assert!(!problems.iter().any(|p| p.contains("account shop: appid")), "a well-formed appid passes: {problems:?}");
    let text = report.to_string();
    assert!(!text.contains(deployed_key) && !text.contains(&"a".repeat(43)), "no key shown:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_the_output_quietly() {
    let ns = unique("ctl-pipe");
    let cfg = offline_config(&ns);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wxpush-ctl"))
        .args(["check", "--offline"])
        .env("WXPUSH_AMQP_URL", &cfg.amqp_url)
        .env("WXPUSH_REDIS_URL", &cfg.redis_url)
        .env("WXPUSH_APPID", GOOD_APPID)
        .env("WXPUSH_APPSECRET", "x")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wxpush-ctl");
    // `| head -0`: the reader goes away before the report is written.
    drop(child.stdout.take());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "no panic on a closed pipe: {err}");
    assert!(matches!(out.status.code(), Some(0 | 1)), "the command's own exit code: {:?} {err}", out.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_win_over_the_environment_and_status_speaks_json() {
    let ns = unique("ctl-flags");
    let env = TestEnv::new("ctl-flags", offline_config(&ns)).await;
    env.declare_topology().await;
    env.publish_job(&job("f-1", "u")).await;
    let redis = Redis::connect(redis_url(), &ns).await.unwrap();
    let day = QuotaDay::with_length(env.config.quota_day.as_secs()).key(chrono::Utc::now());
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("SET").arg(redis.keys().quota(APPID, &day)).arg(5).query_async(&mut conn).await.unwrap();

    // The environment points elsewhere; the flags put it right.
    let mut elsewhere = env.config.clone();
    elsewhere.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    elsewhere.redis_url = "redis://127.0.0.1:1/".into();
    elsewhere.redis_prefix = "wxpush-test-nothing-here".into();
    elsewhere.jobs_queue = "wxpush-test-no-such-jobs".into();
    elsewhere.results_exchange = "wxpush-test-no-such-results".into();
    let results_exchange = env.config.results_exchange.clone();
    let args = [
        "status",
        "-o",
        "json",
        "--amqp-url",
        amqp_url(),
        "--redis-url",
        redis_url(),
        "--prefix",
        &ns,
        "--jobs-queue",
        &env.config.jobs_queue,
        "--results-exchange",
        &results_exchange,
    ];
    let out = run_ctl(&elsewhere, &args, None).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).expect("status -o json is JSON");
    assert_eq!(status["redis"]["prefix"], ns.as_str());
    assert_eq!(status["rabbitmq"]["error"], Value::Null, "{status}");
    let jobs = &status["queues"][0];
    assert_eq!((jobs["role"].as_str(), jobs["name"].as_str()), (Some("jobs"), Some(env.config.jobs_queue.as_str())));
    assert_eq!((jobs["ready"].as_u64(), jobs["exists"].as_bool()), (Some(1), Some(true)), "{status}");
    let unrouted = status["queues"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(unrouted["name"], format!("{results_exchange}.unrouted"));
    let account = &status["accounts"][0];
    assert_eq!((account["sent_today"].as_u64(), &account["daily_quota"]), (Some(5), &Value::Null), "{status}");
    // This broker has no management plugin: the unacknowledged counts are unknown, and why.
    assert_eq!(jobs["unacknowledged"], Value::Null);
    let why = status["rabbitmq"]["management_error"].as_str().expect("why the counts are unknown");
    assert!(why.contains("rabbitmq_management") && why.contains("--management-url"), "{why}");

    let out = run_ctl(&elsewhere, &["--jobs-queue", "", "status"], None).await;
    assert_eq!(out.status.code(), Some(2), "an empty name is a bad argument: {}", stderr(&out));
    let out = run_ctl(&elsewhere, &["publish", "-o", "json", "-"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_sends_today_without_a_quota() {
    let ns = unique("ctl-sent");
    let env = TestEnv::new("ctl-sent", offline_config(&ns)).await;
    assert_eq!(env.config.accounts[0].daily_quota, None);
    let redis = Redis::connect(redis_url(), &ns).await.unwrap();
    let day = QuotaDay::with_length(env.config.quota_day.as_secs()).key(chrono::Utc::now());
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("SET").arg(redis.keys().quota(APPID, &day)).arg(23).query_async(&mut conn).await.unwrap();
    let report = status::status(&env.config).await;
    assert_eq!(report.accounts[0].sent_today, 23);
    let text = report.to_string();
    assert!(text.contains("sent today  23 (quota day"), "{text}");
    assert!(text.contains("does not exist yet"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Publishing: dry runs, one job from flags, waiting without a worker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_dry_run_uses_the_workers_parser_and_publishes_nothing() {
    let ns = unique("ctl-dry");
    let env = TestEnv::new("ctl-dry", offline_config(&ns)).await;
    let mut no_touser = job("dry-2", "u");
    no_touser.as_object_mut().unwrap().remove("touser");
    let mut unknown = job("dry-3", "u");
    unknown["account"] = "nobody".into();
    let mut expired = job("dry-4", "u");
    expired["expires_at"] = "2020-01-01T00:00:00Z".into();
    let mut bad_data = job("dry-5", "u");
    bad_data["data"] = json!({"k": {"value": {"nested": true}}});
    let input = format!("{}\n{no_touser}\n{unknown}\n\n{expired}\nnot json\n{bad_data}\n", job("dry-1", "u"));

    let report = publish::validate(&env.config, input.as_bytes(), "test").await.expect("validate runs");
    assert_eq!((report.lines, report.valid, report.problems_count), (6, 1, 5), "{report}");
    let by_line: Vec<(u64, Option<&str>)> = report.problems.iter().map(|p| (p.line, p.job_id.as_deref())).collect();
    assert_eq!(
        by_line,
        vec![(2, Some("dry-2")), (3, Some("dry-3")), (5, Some("dry-4")), (6, None), (7, Some("dry-5"))]
    );
    let reasons: Vec<&str> = report.problems.iter().map(|p| p.reason.as_str()).collect();
    assert!(reasons[0].contains("touser"), "{reasons:?}");
    assert!(reasons[1].contains("unknown account \"nobody\""), "{reasons:?}");
    assert!(reasons[2].contains("expired"), "{reasons:?}");
    assert!(reasons[3].contains("not valid JSON"), "{reasons:?}");
    assert!(reasons[4].contains("invalid job"), "{reasons:?}");
    assert!(report.to_string().contains("nothing was published"), "{report}");
    assert!(!queue_exists(&env.config.jobs_queue).await, "a dry run touches no queue");

    let file = std::env::temp_dir().join(format!("{ns}.jsonl"));
    std::fs::write(&file, &input).unwrap();
    let _remove = RemoveOnDrop(file.clone());
    let out = run_ctl(&env.config, &["publish", "--dry-run", file.to_str().unwrap()], None).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("line 3 (job_id dry-3): invalid job: unknown account"), "{}", stdout(&out));
    assert!(!queue_exists(&env.config.jobs_queue).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_builds_one_job_from_flags() {
    let ns = unique("ctl-flagjob");
    let env = TestEnv::new("ctl-flagjob", offline_config(&ns)).await;
    env.declare_topology().await;
    let base = ["publish", "--touser", "oia2TjuEGTNoeX76QEjQNrcURxG8", "--template-id", "tpl-1"];

    let out = run_ctl(&env.config, &[&base[..], &["--data", "Money=260.00", "--dry-run"]].concat(), None).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("1 valid"), "{}", stdout(&out));
    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 0, "a dry run publishes nothing");

    let out = run_ctl(&env.config, &[&base[..], &["--data", "no-equals-sign"]].concat(), None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
    let out = run_ctl(&env.config, &[&base[..], &["--data", "k=v", "--account", "nobody"]].concat(), None).await;
    assert_eq!(out.status.code(), Some(2), "a job the worker would refuse is not published: {}", stderr(&out));
    assert!(stderr(&out).contains("unknown account"), "{}", stderr(&out));

    let extra = [
        "--data",
        "Money=人民币260.00元",
        "--data",
        "Note=a=b",
        "--job-id",
        "flag-1",
        "--url",
        "http://weixin.qq.com/download",
    ];
    let out = run_ctl(&env.config, &[&base[..], &extra[..]].concat(), None).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("job_id flag-1") && stdout(&out).contains("published 1 of 1"), "{}", stdout(&out));
    let d = get_one(&env, &env.config.jobs_queue).await.expect("the job");
    assert_eq!(message_id(&d).as_deref(), Some("flag-1"));
    let body: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(
        body,
        json!({"job_id": "flag-1", "touser": "oia2TjuEGTNoeX76QEjQNrcURxG8", "template_id": "tpl-1",
               "url": "http://weixin.qq.com/download",
               "data": {"Money": {"value": "人民币260.00元"}, "Note": {"value": "a=b"}}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_stops_at_once_when_no_worker_consumes_the_jobs_queue() {
    let ns = unique("ctl-nocons");
    let env = TestEnv::new("ctl-nocons", offline_config(&ns)).await;
    let timeout = Duration::from_secs(120);
    let options = PublishOptions { wait: Some(timeout), ..PublishOptions::default() };
    let input = format!("{}\n{}\n", job("nc-1", "u"), job("nc-2", "u"));
    let started = Instant::now();
    let report =
        publish::publish(&env.config, input.as_bytes(), "test", &options, &Silent).await.expect("publish runs");
    assert!(report.no_consumer, "{report}");
    assert!(started.elapsed() < Duration::from_secs(60), "did not wait for the timeout: {:?}", started.elapsed());
    assert_eq!(report.published, 2);
    assert_eq!(report.wait.as_ref().map(|w| w.missing), Some(2));
    let text = report.to_string();
    assert!(text.contains("no worker consumes") && text.contains(&env.config.jobs_queue), "{text}");
    assert!(!report.all_good());
    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 2, "the jobs wait for a worker");
}

// ---------------------------------------------------------------------------------------------
// Results: the unrouted queue and live.

/// Declares the results exchange as the worker does from issue 11 on: with an alternate
/// exchange `<exchange>.unrouted` (fanout) feeding a bounded quorum queue of the same name.
async fn declare_with_unrouted(env: &TestEnv, exchange: &str) {
    let unrouted = unrouted_name(exchange);
    env.remove_later(&unrouted);
    env.remove_later(&format!("exchange:{unrouted}"));
    env.remove_later(&format!("exchange:{exchange}"));
    let ch = &env.bus.channel;
    declare_results_exchange(ch, exchange).await.unwrap();
    let mut config = env.config.clone();
    config.results_exchange = exchange.to_owned();
    let args = Topology::from_config(&config).unrouted_queue_args();
    declare_unrouted_queue(ch, exchange, args).await.unwrap();
}

async fn publish_result(env: &TestEnv, exchange: &str, key: &str, job_id: &str) {
    let body = json!({"type": "send", "job_id": job_id, "status": key.trim_start_matches("send.")});
    env.bus
        .channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(key),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            json_properties(Some(job_id)),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn show_all(config: &Config, options: &ShowOptions) -> (Vec<(String, String)>, ShowSummary) {
    let mut seen = Vec::new();
    let mut emit = |r: &ReceivedResult| {
        seen.push((r.routing_key.clone(), r.job_id().unwrap_or_default()));
        true
    };
    let summary = results::show(config, options, &CancellationToken::new(), &mut emit).await.expect("show runs");
    (seen, summary)
}

fn keys(seen: &[(String, String)]) -> Vec<&str> {
    seen.iter().map(|(_, id)| id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reads_the_unrouted_queue_without_taking_unless_asked() {
    let ns = unique("ctl-unrouted");
    let env = TestEnv::new("ctl-unrouted", offline_config(&ns)).await;
    // The env binds `#` to its own exchange; this one has no binding, as in a fresh deployment.
    let mut cfg = env.config.clone();
    cfg.results_exchange = format!("{ns}.lonely");
    let missing = results::show(&cfg, &ShowOptions::default(), &CancellationToken::new(), &mut |_| true).await;
    let e = missing.expect_err("no unrouted queue yet");
    assert!(matches!(e, CtlError::NoUnroutedQueue { .. }) && e.to_string().contains("start a worker once"), "{e}");

    declare_with_unrouted(&env, &cfg.results_exchange).await;
    let unrouted = results::unrouted_queue(&cfg);
    for (key, id) in [("send.succeeded", "u-1"), ("send.failed", "u-2"), ("delivery.success", "u-3")] {
        publish_result(&env, &cfg.results_exchange, key, id).await;
    }
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3, "nothing bound: the alternate exchange kept them");

    let checked = check::check_with(&cfg, check::CheckOptions { offline: true }).await;
    assert!(checked.to_string().contains(&format!("3 results no binding took are kept in {unrouted}")), "{checked}");
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3);

    let (seen, summary) = show_all(&cfg, &ShowOptions::default()).await;
    assert_eq!(keys(&seen), vec!["u-1", "u-2", "u-3"], "in order");
    assert_eq!(seen[0].0, "send.succeeded", "the routing key it was published with");
    assert_eq!((summary.shown, summary.taken, summary.kept_at_start), (3, 0, 3));
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3, "showing takes nothing");

    // (What a read hands back is ready again a moment later, on a quorum queue.)
    let sends = ShowOptions { pattern: "send.*".into(), ..ShowOptions::default() };
    assert_eq!(keys(&show_all(&cfg, &sends).await.0), vec!["u-1", "u-2"]);
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3);
    let one = ShowOptions { limit: Some(1), ..ShowOptions::default() };
    assert_eq!(keys(&show_all(&cfg, &one).await.0), vec!["u-1"]);
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3);
    assert_eq!(keys(&show_all(&cfg, &ShowOptions::default()).await.0), vec!["u-1", "u-2", "u-3"], "still in order");
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3);

    let take_failed = ShowOptions {
        source: Source::Unrouted { take: true },
        pattern: "send.failed".into(),
        ..ShowOptions::default()
    };
    let (seen, summary) = show_all(&cfg, &take_failed).await;
    assert_eq!((keys(&seen), summary.taken), (vec!["u-2"], 1));
    assert_eq!(settled_len(&env, &unrouted, 2).await, 2, "only the result taken is gone");
    assert_eq!(keys(&show_all(&cfg, &ShowOptions::default()).await.0), vec!["u-1", "u-3"], "the rest in order");
    assert_eq!(settled_len(&env, &unrouted, 2).await, 2);

    // Following: the kept ones, then a new one as it comes.
    let seen_count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let follow =
        ShowOptions { follow: true, limit: Some(3), timeout: Some(Duration::from_secs(30)), ..Default::default() };
    let (c, counter) = (cfg.clone(), seen_count.clone());
    let follower = tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut emit = |r: &ReceivedResult| {
            ids.push(r.job_id().unwrap_or_default());
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            true
        };
        results::show(&c, &follow, &CancellationToken::new(), &mut emit).await.expect("follow runs");
        ids
    });
    assert!(
        eventually(Duration::from_secs(10), || async { seen_count.load(std::sync::atomic::Ordering::SeqCst) == 2 })
            .await,
        "the kept results are shown first"
    );
    publish_result(&env, &cfg.results_exchange, "send.succeeded", "u-4").await;
    let ids = tokio::time::timeout(Duration::from_secs(30), follower).await.expect("follow ends at its limit").unwrap();
    assert_eq!(ids, vec!["u-1", "u-3", "u-4"]);
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3);

    // The binary: JSON lines, and --take.
    let exchange = cfg.results_exchange.clone();
    let out = run_ctl(&env.config, &["results", "--results-exchange", &exchange, "-o", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 3, "{}", stdout(&out));
    assert_eq!((&lines[2]["routing_key"], &lines[2]["body"]["job_id"]), (&json!("send.succeeded"), &json!("u-4")));
    assert!(stderr(&out).contains("3 results shown"), "{}", stderr(&out));
    assert_eq!(settled_len(&env, &unrouted, 3).await, 3);
    let out = run_ctl(&env.config, &["results", "--results-exchange", &exchange, "--take"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 3, "{}", stdout(&out));
    assert!(stdout(&out).starts_with("send.succeeded"), "{}", stdout(&out));
    assert_eq!(settled_len(&env, &unrouted, 0).await, 0, "--take removed them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_live_tails_the_exchange_with_a_pattern() {
    let ns = unique("ctl-live");
    let env = TestEnv::new("ctl-live", offline_config(&ns)).await;
    let mut nowhere = env.config.clone();
    nowhere.results_exchange = format!("{ns}.absent");
    let live = ShowOptions { source: Source::Live, pattern: "delivery.#".into(), ..ShowOptions::default() };
    let e = results::show(&nowhere, &live, &CancellationToken::new(), &mut |_| true).await.expect_err("no exchange");
    assert!(matches!(e, CtlError::NoResultsExchange { .. }), "{e}");
    assert!(!wxpush_exchange_exists(&nowhere.results_exchange).await, "the tool did not declare it");

    let options = ShowOptions { limit: Some(2), timeout: Some(Duration::from_secs(30)), ..live };
    let c = env.config.clone();
    let mut watcher = tokio::spawn(async move { show_all(&c, &options).await });
    // Keep publishing until the watcher, bound at some point, has seen two deliveries.
    let mut n = 0;
    let (seen, summary) = loop {
        n += 1;
        assert!(n <= 200, "the watcher never saw two deliveries");
        publish_result(&env, &env.config.results_exchange, "send.succeeded", &format!("s-{n}")).await;
        publish_result(&env, &env.config.results_exchange, "delivery.success", &format!("d-{n}")).await;
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(100), &mut watcher).await {
            break done.expect("the watcher");
        }
    };
    assert_eq!(summary.shown, 2);
    assert!(seen.iter().all(|(key, id)| key == "delivery.success" && id.starts_with("d-")), "{seen:?}");
}

async fn wxpush_exchange_exists(exchange: &str) -> bool {
    let conn = Connection::connect(amqp_url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
    let exists = ch
        .exchange_declare(ShortString::from(exchange), lapin::ExchangeKind::Topic, passive, FieldTable::default())
        .await
        .is_ok();
    let _ = conn.close(200, ShortString::from("done")).await;
    exists
}

// ---------------------------------------------------------------------------------------------
// The dead-letter queue: delete and purge.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_delete_removes_only_the_chosen_jobs_and_keeps_the_order() {
    let ns = unique("ctl-ddel");
    let env = TestEnv::new("ctl-ddel", offline_config(&ns)).await;
    env.declare_topology().await;
    for id in ["d-1", "d-2", "d-3", "d-4", "d-5"] {
        park(&env, Some(id), job(id, "u").to_string().as_bytes(), "expired").await;
    }
    let ids = BTreeSet::from(["d-2".to_owned(), "d-4".to_owned(), "not-there".to_owned()]);
    let report = dead::delete(&env.config, &ids).await.expect("delete runs");
    assert_eq!(report.deleted, vec!["d-2".to_owned(), "d-4".to_owned()]);
    assert_eq!(report.not_found, vec!["not-there".to_owned()]);
    assert_eq!((report.examined, report.left), (5, 3));
    assert!(!report.all_good());
    assert_eq!(settled_len(&env, &env.config.dead_letter_queue, 3).await, 3);
    let left: Vec<Option<String>> = ["d-1", "d-3", "d-5"].iter().map(|s| Some(s.to_string())).collect();
    assert_eq!(parked_ids(&env.config).await, left, "the others, in their order");

    // The last message deleted too: nothing else is touched.
    let report = dead::delete(&env.config, &BTreeSet::from(["d-5".to_owned()])).await.unwrap();
    assert_eq!(report.deleted, vec!["d-5".to_owned()]);
    assert_eq!(settled_len(&env, &env.config.dead_letter_queue, 2).await, 2);
    assert_eq!(parked_ids(&env.config).await, left[..2].to_vec());

    let out = run_ctl(&env.config, &["dead", "list", "-o", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("dead list -o json is JSON");
    assert_eq!((list["total"].as_u64(), list["jobs"][1]["job_id"].as_str()), (Some(2), Some("d-3")), "{list}");
    assert_eq!(list["jobs"][0]["reason"], "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_purge_asks_first_and_yes_skips_the_question() {
    let ns = unique("ctl-purge");
    let env = TestEnv::new("ctl-purge", offline_config(&ns)).await;
    env.declare_topology().await;
    let dlq = env.config.dead_letter_queue.clone();
    park(&env, Some("p-1"), b"{}", "expired").await;
    park(&env, Some("p-2"), b"{}", "expired").await;

    let out = run_ctl(&env.config, &["dead", "purge"], Some("no\n")).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("remove all 2 parked jobs") && stderr(&out).contains("nothing purged"));
    let out = run_ctl(&env.config, &["dead", "purge"], None).await;
    assert_eq!(out.status.code(), Some(1), "no answer is no: {}", stderr(&out));
    assert_eq!(env.queue_len(&dlq).await, 2, "not confirmed: nothing removed");

    let out = run_ctl(&env.config, &["dead", "purge"], Some("yes\n")).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("purged 2 parked jobs"), "{}", stdout(&out));
    assert_eq!(env.queue_len(&dlq).await, 0);

    park(&env, Some("p-3"), b"{}", "expired").await;
    let out = run_ctl(&env.config, &["dead", "purge", "--yes"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("purged 1 parked jobs"), "{}", stdout(&out));
    let report = dead::purge(&env.config).await.unwrap();
    assert_eq!((report.exists, report.purged), (true, 0));
}

// ---------------------------------------------------------------------------------------------
// Unacknowledged counts, from a RabbitMQ node of this test's own with the management plugin
// (the shared broker has none, and must not be reconfigured).

/// A RabbitMQ node on free loopback ports, with the management API, in a directory of its own.
/// Dropping it stops the node and removes the directory.
struct ManagedRabbit {
    node: String,
    dir: std::path::PathBuf,
    amqp_port: u16,
    management_port: u16,
    child: Option<std::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl ManagedRabbit {
    async fn start() -> ManagedRabbit {
        let name = unique("mgmt");
        let dir = scratch_dir(&name);
        let (amqp_port, management_port, dist_port) = (free_port(), free_port(), free_port());
        let mut node = ManagedRabbit {
            node: format!("{}@localhost", &name[name.len() - 10..]),
            dir: dir.clone(),
            amqp_port,
            management_port,
            child: None,
        };
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{amqp_port}\nmanagement.tcp.port = {management_port}\n\
                 management.tcp.ip = 127.0.0.1\ncollect_statistics_interval = 500\n"
            ),
        )
        .unwrap();
        // The server drops to the rabbitmq user when started as root.
        let _ = std::process::Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(&dir).status();
        let log = std::fs::File::create(dir.join("server.out")).unwrap();
        let child = std::process::Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &node.node)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server is installed");
        node.child = Some(child);
        let overview = format!("http://127.0.0.1:{management_port}/api/overview");
        let http = reqwest::Client::new();
        let up = eventually(Duration::from_secs(120), || async {
            let answer = http.get(&overview).basic_auth("guest", Some("guest")).send().await;
            answer.is_ok_and(|r| r.status().is_success())
        })
        .await;
        let out = std::fs::read_to_string(dir.join("server.out")).unwrap_or_default();
        assert!(up, "the private RabbitMQ node did not start within 120 s:\n{out}");
        node
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.management_port)
    }
}

impl Drop for ManagedRabbit {
    fn drop(&mut self) {
        blocking_in_place(|| {
            let _ = std::process::Command::new("timeout")
                .args(["60", "rabbitmqctl", "-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_ready_and_unacknowledged_jobs_through_the_management_api() {
    let rabbit = ManagedRabbit::start().await;
    let ns = unique("ctl-unacked");
    let mut cfg = offline_config(&ns);
    cfg.amqp_url = rabbit.amqp_url();
    let conn = Connection::connect(&cfg.amqp_url, ConnectionProperties::default()).await.expect("the private node");
    let ch = conn.create_channel().await.unwrap();
    Topology::from_config(&cfg).declare(&conn).await.expect("declare the topology");
    for i in 0..5 {
        ch.basic_publish(
            ShortString::from(""),
            ShortString::from(cfg.jobs_queue.as_str()),
            BasicPublishOptions::default(),
            job(&format!("q-{i}"), "u").to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    // A "worker" holding two jobs in flight.
    let holder = conn.create_channel().await.unwrap();
    holder.basic_qos(2, lapin::options::BasicQosOptions::default()).await.unwrap();
    let mut held = holder
        .basic_consume(
            ShortString::from(cfg.jobs_queue.as_str()),
            ShortString::from("holder"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), held.next()).await.expect("a delivery").unwrap().unwrap();
    }

    let options = status::StatusOptions { management_url: Some(rabbit.management_url()) };
    let counted = eventually(Duration::from_secs(20), || {
        let (cfg, options) = (cfg.clone(), options.clone());
        async move {
            let r = status::status_with(&cfg, &options).await;
            r.queue(QueueRole::Jobs).is_some_and(|q| q.unacknowledged == Some(2))
        }
    })
    .await;
    assert!(counted, "the management API counted 2 unacknowledged");
    let report = status::status_with(&cfg, &options).await;
    let jobs = report.queue(QueueRole::Jobs).unwrap();
    assert_eq!((jobs.ready, jobs.unacknowledged, jobs.consumers), (3, Some(2), 1), "{report}");
    assert_eq!(report.management_error, None);
    let dlq = report.queue(QueueRole::DeadLetter).unwrap();
    assert_eq!((dlq.exists, dlq.ready, dlq.unacknowledged), (true, 0, Some(0)));
    assert!(report.queues.iter().any(|q| q.role == QueueRole::Delay && q.exists), "{report}");
    let text = report.to_string();
    assert!(text.contains(&format!("{}: 3 ready, 2 unacknowledged, 1 consumers", cfg.jobs_queue)), "{text}");

    // The binary; wrong management credentials are named as such.
    let out = run_ctl(&cfg, &["status", "--management-url", &rabbit.management_url(), "-o", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["queues"][0]["unacknowledged"], 2, "{status}");
    let wrong = format!("http://nobody:wrong@127.0.0.1:{}/", rabbit.management_port);
    let out = run_ctl(&cfg, &["status", "--management-url", &wrong], None).await;
    assert!(stdout(&out).contains("refused the credentials"), "{}", stdout(&out));
    let _ = conn.close(200, ShortString::from("done")).await;
    delete_redis_prefix(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_effective_configuration_with_secrets_redacted() {
    let cfg = offline_config(&unique("ctl-effective"));
    let amqp_url = cfg.amqp_url.replacen("guest:guest@", "guest:pa55-effective@", 1);
    let run = |args: &'static [&'static str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxpush-ctl"));
        for (var, _) in ENV_VARS {
            cmd.env_remove(var);
        }
        cmd.env_remove("WXPUSH_CONFIG")
            .env("WXPUSH_AMQP_URL", &amqp_url)
            .env("WXPUSH_REDIS_URL", &cfg.redis_url)
            .env("WXPUSH_APPID", GOOD_APPID)
            .env("WXPUSH_APPSECRET", "s3cr3t-effective")
            .env("WXPUSH_CALLBACK_TOKEN", "cb-t0ken-effective")
            .env("WXPUSH_TOKEN__WAIT_MS", "4321")
            .env("WXPUSH_WEBHOOK_MSGID_WAIT_MS", "250")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
    };
    let out = tokio::time::timeout(Duration::from_secs(60), run(&["check", "--offline"])).await.unwrap().unwrap();
    let text = stdout(&out);
    for shown in ["[token]\n", "wait_ms = 4321\n", "[webhook]\n", "msgid_wait_ms = 250\n", "secret = \"[REDACTED]\""] {
        assert!(text.contains(shown), "{shown:?} not in:\n{text}");
    }
    for secret in ["pa55-effective", "s3cr3t-effective", "cb-t0ken-effective"] {
        assert!(!text.contains(secret), "check shows {secret}:\n{text}");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), run(&["check", "--offline", "-o", "json"]))
        .await
        .unwrap()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).expect("check -o json is JSON");
    assert_eq!(
        (report["config"]["token"]["wait_ms"].as_u64(), report["config"]["webhook"]["msgid_wait_ms"].as_u64()),
        (Some(4321), Some(250))
    );
    assert_eq!(report["config"]["accounts"][0]["callback_token"], "[REDACTED]", "{report}");
    assert!(!out.stdout.windows(14).any(|w| w == b"pa55-effective"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_sends_each_subscription_kind_through_its_endpoint() {
    for kind in [JobKind::Subscribe, JobKind::MiniprogramSubscribe] {
        let options = DemoOptions {
            namespace: unique("ctl-demo-kind"),
            amqp_url: amqp_url().into(),
            redis_url: redis_url().into(),
            timeout: Duration::from_secs(30),
            kind,
        };
        let report = demo::run(&options).await.expect("the demo succeeds");
        assert_eq!(report.routing_key, "send.succeeded", "{kind}: {}", report.result_text);
        assert_eq!((report.result["kind"].as_str(), report.request.kind), (Some(kind.as_str()), kind));
        assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    }
}

// ---- cancel --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_ends_cancelled_unsent_and_a_sent_one_keeps_its_result() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let mut env = TestEnv::new("ctl-cancel", config(&unique("ctl-cancel"), &sandbox.base_url())).await;
    env.declare_topology().await;
    let out = run_ctl(&env.config, &["cancel", "cancel-early"], None).await;
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "cancel-early: cancelled"));

    let worker = spawn_worker(&env.config);
    env.publish_job(&job("cancel-early", "u-early")).await;
    env.publish_job(&job("cancel-late", "u-late")).await;
    let results = env.results(2, Duration::from_secs(20)).await;
    let of =
        |id: &str| results.iter().find(|r| r.body["job_id"] == id).map(|r| (r.routing_key.clone(), r.body.clone()));
    let (key, early) = of("cancel-early").expect("a result for the cancelled job");
    assert_eq!((key.as_str(), &early["reason"]), ("send.failed", &serde_json::json!("cancelled")));
    let (key, late) = of("cancel-late").expect("a result for the other job");
    assert_eq!(key, "send.succeeded");
    let sent: Vec<String> = sandbox.messages().into_iter().map(|m| m.touser).collect();
    assert_eq!(sent, ["u-late"], "the cancelled job never reached WeChat");

    // A job already sent says so, changes nothing, and exits 3.
    let out = run_ctl(&env.config, &["cancel", "cancel-late"], None).await;
    let msgid = late["msgid"].as_u64().expect("a msgid");
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert_eq!(stdout(&out).trim(), format!("cancel-late: already sent (msgid {msgid}); nothing changed"));
    env.publish_job(&job("cancel-late", "u-late")).await;
    let again = env.next_result(Duration::from_secs(20)).await.expect("the recorded result again");
    assert_eq!((again.routing_key.as_str(), &again.body["msgid"]), ("send.succeeded", &late["msgid"]));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_in_a_delay_queue_can_be_cancelled() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    sandbox.set_faults(Faults { system_error_rate: 1.0, ..Faults::default() });
    let mut cfg = config(&unique("ctl-cancel-delay"), &sandbox.base_url());
    // Every retry goes through a delay queue.
    cfg.retry.in_process_max = Duration::ZERO;
    let mut env = TestEnv::new("ctl-cancel-delay", cfg).await;
    env.declare_topology().await;
    let worker = spawn_worker(&env.config);
    env.publish_job(&job("cancel-delayed", "u-delayed")).await;
    let failed_once = eventually(Duration::from_secs(15), || async { sandbox.stats().send_requests >= 1 }).await;
    assert!(failed_once, "the first send failed");
    // Once the worker has let the job go to the delay queue, its record is free to cancel.
    let cancelled = eventually(Duration::from_secs(10), || async {
        let out = run_ctl(&env.config, &["cancel", "cancel-delayed"], None).await;
        stdout(&out).contains(": cancelled")
    })
    .await;
    assert!(cancelled, "the delayed job was cancelled");
    sandbox.set_faults(Faults::default());
    let result = env.next_result(Duration::from_secs(20)).await.expect("the delayed job's result");
    assert_eq!((result.routing_key.as_str(), &result.body["reason"]), ("send.failed", &serde_json::json!("cancelled")));
    assert!(sandbox.messages().is_empty(), "nothing was sent");
    worker.stop().await;
}
