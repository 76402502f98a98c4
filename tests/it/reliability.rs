//! Never lose a job, never send one twice: faults, permanent errors, bad input.

use std::{collections::HashMap, time::Duration};

use crate::harness::*;
use crate::wx::{Faults, Redis, SandboxConfig, errcode};
use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicGetOptions},
    types::{AMQPValue, ShortString},
};
use serde_json::{Value, json};

/// 20 % errcode -1, 5 % HTTP 503 and 5 % answers slower than the HTTP timeout: every job still
/// ends `send.succeeded`, with its attempts counted, and no message reaches a user twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_until_every_job_succeeds() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    sandbox.set_faults(Faults {
        system_error_rate: 0.20,
        http_503_rate: 0.05,
        slow_rate: 0.05,
        slow_ms: 1_500,
        ..Faults::default()
    });
    let ns = unique("faults");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.max_attempts = 10;
    cfg.http_timeout = Duration::from_millis(800);
    let mut env = TestEnv::new("faults", cfg).await;
    env.declare_topology().await;
    let total = 300;
    for i in 0..total {
        env.publish_job(&job(&format!("flaky-{i}"), &format!("user-{i}"))).await;
    }
    let worker = spawn_worker(&env.config);
    let results = env.results(total, Duration::from_secs(90)).await;
    worker.stop().await;

    assert_eq!(results.len(), total, "every job has a result");
    let mut attempts: HashMap<String, u64> = HashMap::new();
    for r in &results {
        assert_eq!(r.routing_key, "send.succeeded", "{}", r.body);
        attempts.insert(r.body["job_id"].as_str().unwrap().to_owned(), r.body["attempts"].as_u64().unwrap());
    }
    assert_eq!(attempts.len(), total, "one result per job");
    let retried = attempts.values().filter(|&&a| a > 1).count();
    assert!(retried > total / 10, "about a quarter of the jobs needed more than one attempt, {retried} did");
    assert!(attempts.values().any(|&a| a >= 3), "some jobs needed three attempts or more");
    let stats = sandbox.stats();
    assert!(stats.errors.get(&-1).copied().unwrap_or(0) > 0 && stats.http_503 > 0, "{stats:?}");
    // Slow answers were retried with the same client_msg_id: WeChat kept one message per job.
    assert_eq!(stats.sends_accepted, total as u64, "{stats:?}");
    assert!(stats.duplicates > 0, "timed-out sends were retried and de-duplicated: {stats:?}");
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for m in sandbox.messages() {
        *per_user.entry(m.touser).or_default() += 1;
    }
    assert!(per_user.values().all(|&n| n == 1), "no user got a message twice");
}

/// Each permanent errcode ends `send.failed` after exactly one attempt; an unknown errcode fails
/// the job naming the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errcodes_fail_after_one_attempt() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("permanent");
    let mut env = TestEnv::new("permanent", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;
    let codes = [40003, 43004, 40036, 40037, 47001, 47003, 48001, 48002, 48004, 43116, 99999];
    for code in codes {
        env.publish_job(&job(&format!("perm-{code}"), &format!("errcode-{code}-someone"))).await;
    }
    let worker = spawn_worker(&env.config);
    let results = env.results(codes.len(), Duration::from_secs(20)).await;
    worker.stop().await;

    assert_eq!(results.len(), codes.len());
    for r in &results {
        assert_eq!(r.routing_key, "send.failed", "{}", r.body);
        let code = r.body["errcode"].as_i64().expect("errcode");
        assert_eq!(r.body["job_id"], format!("perm-{code}"));
        assert_eq!(r.body["attempts"], 1, "{}", r.body);
        assert_eq!(r.body["msgid"], Value::Null);
        assert!(r.body["errmsg"].is_string());
        let reason = r.body["reason"].as_str().unwrap();
        if code == 99999 {
            assert!(reason.starts_with("unknown errcode 99999"), "{reason}");
        } else {
            assert_eq!(reason, errcode::reason(code));
        }
    }
    assert_eq!(sandbox.stats().send_requests, codes.len() as u64, "exactly one attempt each");
}

/// Every kind of bad input is dead-lettered with its body untouched and a reason, gets a
/// `send.failed` when its job_id can be read, and the good jobs around it all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_and_good_jobs_flow_around_it() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("badinput");
    let mut env = TestEnv::new("badinput", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;

    let mut oversized = job("too-big", "o");
    oversized["data"]["Pad"] = json!({"value": "x".repeat(70 * 1024)});
    let mut unknown_account = job("who", "o");
    unknown_account["account"] = "nobody".into();
    let mut expired = job("late", "o");
    expired["expires_at"] = "2020-01-01T00:00:00Z".into();
    let mut no_touser = job("no-touser", "o");
    no_touser.as_object_mut().unwrap().remove("touser");
    let mut bad_type = job("bad-type", "o");
    bad_type["data"] = json!("not an object");
    let mut no_id = job("x", "o");
    no_id.as_object_mut().unwrap().remove("job_id");

    let bad: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (b"this is not json".to_vec(), None, "not JSON"),
        (vec![0xff, 0xfe, 0x00, 0x7b], None, "not UTF-8"),
        (serde_json::to_vec(&no_touser).unwrap(), Some("no-touser"), "touser missing"),
        (serde_json::to_vec(&bad_type).unwrap(), Some("bad-type"), "data must be an object"),
        (serde_json::to_vec(&oversized).unwrap(), None, "byte limit"),
        (serde_json::to_vec(&unknown_account).unwrap(), Some("who"), "unknown account"),
        (serde_json::to_vec(&expired).unwrap(), Some("late"), "expired"),
        (serde_json::to_vec(&no_id).unwrap(), None, "job_id missing"),
    ];
    let good = 20;
    for i in 0..good {
        env.publish_job(&job(&format!("good-{i}"), &format!("user-{i}"))).await;
        if let Some((body, _, _)) = bad.get(i) {
            env.publish_raw(body, BasicProperties::default()).await;
        }
    }
    let worker = spawn_worker(&env.config);
    let with_id = bad.iter().filter(|b| b.1.is_some()).count();
    let results = env.results(good + with_id, Duration::from_secs(20)).await;
    assert!(env.next_result(Duration::from_millis(500)).await.is_none(), "no extra results");
    worker.stop().await;

    let succeeded = results.iter().filter(|r| r.routing_key == "send.succeeded").count();
    assert_eq!(succeeded, good, "all good jobs succeed");
    for (_, id, why) in bad.iter().filter(|b| b.1.is_some()) {
        let r =
            results.iter().find(|r| r.body["job_id"] == *id.unwrap()).unwrap_or_else(|| panic!("a result for {id:?}"));
        assert_eq!(r.routing_key, "send.failed");
        let reason = r.body["reason"].as_str().unwrap();
        if *why == "expired" {
            assert_eq!(reason, "expired");
        } else {
            assert!(reason.starts_with("invalid job: ") && reason.contains(why), "{reason}");
        }
    }

    // The dead-letter queue holds each bad body untouched, with why and where from.
    let ch = env.bus.connection.create_channel().await.unwrap();
    let mut parked = Vec::new();
    while let Some(m) = ch
        .basic_get(ShortString::from(env.config.dead_letter_queue.as_str()), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let text = |k: &str| match headers.inner().get(k) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        // An oversized body is refused unread, and RabbitMQ's own dead-lettering parks it: its
        // headers are the broker's (x-first-death-*), the body is untouched all the same.
        let (reason, source) = match text("x-wxpush-reason") {
            Some(reason) => (reason, text("x-wxpush-source-queue")),
            None if m.delivery.data.len() > 64 * 1024 => {
                ("byte limit: rejected".to_owned(), text("x-first-death-queue"))
            }
            None => panic!("header x-wxpush-reason missing: {headers:?}"),
        };
        parked.push((m.delivery.data.clone(), reason, source.expect("the queue it came from")));
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(parked.len(), bad.len(), "one dead-lettered copy per bad job");
    for (body, _, why) in &bad {
        let (_, reason, source) =
            parked.iter().find(|p| &p.0 == body).unwrap_or_else(|| panic!("the body of the {why:?} job, untouched"));
        assert!(reason.contains(why), "{reason:?} should say {why:?}");
        assert_eq!(source, &env.config.jobs_queue);
    }
    assert_eq!(sandbox.stats().sends_accepted, good as u64, "nothing bad was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_job_is_not_sent_again_and_gets_its_recorded_result() {
    a_duplicate_job_is_sent_once("dup", redis_url()).await;
}

/// The same job published twice at once, and once more after it was done, reach WeChat once,
/// with the idempotency ledger in the Redis at `redis_url`: every copy gets the recorded result,
/// and the webhook can find the job by its msgid.
pub async fn a_duplicate_job_is_sent_once(tag: &str, redis_url: &str) {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique(tag);
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.redis_url = redis_url.to_owned();
    let mut env = TestEnv::new(tag, cfg).await;
    env.declare_topology().await;
    let worker = spawn_worker(&env.config);
    let body = job("twice", "o-twice");
    env.publish_job(&body).await;
    env.publish_job(&body).await;
    let mut results = env.results(2, Duration::from_secs(20)).await;
    env.publish_job(&body).await;
    results.extend(env.results(1, Duration::from_secs(20)).await);
    worker.stop().await;

    assert_eq!(results.len(), 3, "every copy has a result: {results:?}");
    let first = &results[0].body;
    for r in &results {
        assert_eq!(r.routing_key, "send.succeeded", "{}", r.body);
        assert_eq!(r.body["msgid"], first["msgid"], "one send, one msgid");
        assert_eq!(r.body["completed_at"], first["completed_at"], "the recorded result, not a new one");
    }
    assert_eq!(sandbox.stats().send_requests, 1, "WeChat was asked once");
    let msgid = first["msgid"].as_u64().expect("a msgid");
    let redis = Redis::connect(redis_url, &ns).await.expect("connect to Redis");
    assert_eq!(redis.job_for_msgid(APPID, msgid).await.expect("msgid").as_deref(), Some("twice"));
}

/// 43117 ("too many messages to this openid") is that recipient's limit, not the account's: the
/// job backs off and retries until its attempts are spent, while jobs to other recipients go
/// straight through and the account is never paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_recipient_retries_alone_without_pausing_the_account() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let mut cfg = config(&unique("per-openid"), &sandbox.base_url());
    cfg.max_attempts = 3;
    let mut env = TestEnv::new("per-openid", cfg).await;
    env.declare_topology().await;
    env.publish_job(&job("throttled", "errcode-43117-busy-user")).await;
    for i in 0..5 {
        env.publish_job(&job(&format!("others-{i}"), &format!("u-other-{i}"))).await;
    }
    let worker = spawn_worker(&env.config);
    let results = env.results(6, Duration::from_secs(20)).await;
    let throttled = results.iter().find(|r| r.body["job_id"] == "throttled").expect("the throttled job's result");
    assert_eq!(throttled.routing_key, "send.failed", "{}", throttled.body);
    assert_eq!(
        (&throttled.body["attempts"], &throttled.body["errcode"], &throttled.body["reason"]),
        (&json!(3), &json!(43117), &json!("attempts exhausted: errcode 43117 (too many messages to this openid)"))
    );
    let others = results.iter().filter(|r| r.routing_key == "send.succeeded").count();
    assert_eq!(others, 5, "every other recipient was sent to: {results:?}");
    let redis = Redis::connect(redis_url(), &env.config.redis_prefix).await.expect("Redis");
    assert_eq!(redis.account_pause(APPID).await.expect("pause read"), None, "the account was never paused");
    worker.stop().await;
}
