//! wxpush-ctl's commands, driven through `wxpush::ctl` against the real local RabbitMQ and
//! Redis, each test in its own namespace.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use secrecy::SecretString;
use serde_json::{Value, json};
use wxpush::{
    amqp::header_str,
    config::Config,
    ctl::{
        CtlError, check,
        dead::{self, ReplayOptions, Selection},
        demo::{self, DemoOptions},
        progress::{Recorder, Silent},
        publish::{self, PublishOptions},
        status,
    },
    pipeline::{ATTEMPTS_HEADER, REASON_HEADER, SOURCE_HEADER},
    sandbox::SandboxConfig,
    store::Redis,
};

/// A config whose WeChat is nowhere: for tests that run no worker.
/// Messages ready in `queue` once `expected` are, or after 5 s: messages a command handed back
/// (nack with requeue) become ready again asynchronously on a quorum queue.
async fn settled_len(env: &TestEnv, queue: &str, expected: u32) -> u32 {
    TestEnv::eventually(Duration::from_secs(5), || async { env.queue_len(queue).await == expected }).await;
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
            let props = wxpush::amqp::json_properties(Some(&id));
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
    assert_eq!(w.missing_ids, vec!["w-lost".to_owned()]);
    assert!(w.waited >= timeout, "waited the whole timeout for the missing one: {:?}", w.waited);
    assert!(!report.all_good());
    let text = report.to_string();
    assert!(text.contains("1 succeeded, 3 failed, 1 missing"), "{text}");
    assert!(text.contains("invalid openid") && text.contains("w-lost"), "{text}");
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
    assert!(
        TestEnv::eventually(Duration::from_secs(15), || async { env.queue_len(&dlq).await == 2 }).await,
        "both jobs parked"
    );
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
    let day = wxpush::domain::calendar::QuotaDay::with_length(env.config.quota_day_secs).key(chrono::Utc::now());
    let _: () = redis::cmd("SET").arg(redis.keys().quota(APPID, &day)).arg(17).query_async(&mut conn).await.unwrap();
    redis.pause_account(APPID, Duration::from_secs(50), "45011: minute quota reached").await.unwrap();
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
    assert_eq!(report.jobs.as_ref().and_then(|q| q.info).map(|i| i.messages), Some(1));

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
