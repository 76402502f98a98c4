//! The worker pipeline end to end: RabbitMQ and Redis for real, the sandbox for WeChat.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::wx::SandboxConfig;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_in_one_success_out_with_the_sandbox_msgid() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("one");
    let mut env = TestEnv::new("one", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;
    let mut body = job("order-42-paid", "oia2TjuEGTNoeX76QEjQNrcURxG8");
    body["miniprogram"] = serde_json::json!({"appid": "wx0123456789abcdef", "pagepath": "pages/order?id=42"});
    body["topcolor"] = "#FF0000".into();
    env.publish_job(&body).await;
    let worker = spawn_worker(&env.config);

    let result = env.next_result(Duration::from_secs(15)).await.expect("a result within 15 s");
    assert_eq!(result.routing_key, "send.succeeded", "{:?}", result.body);
    assert_eq!(result.correlation_id.as_deref(), Some("order-42-paid"));
    let r = &result.body;
    assert_eq!(r["type"], "send");
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["job_id"], "order-42-paid");
    assert_eq!(r["account"], "default");
    assert_eq!(r["touser"], "oia2TjuEGTNoeX76QEjQNrcURxG8");
    assert_eq!(r["errcode"], 0);
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["reason"], Value::Null);

    let messages = sandbox.messages();
    assert_eq!(messages.len(), 1);
    let sent = &messages[0];
    assert_eq!(r["msgid"].as_u64(), Some(sent.msgid), "the result carries the sandbox's msgid exactly");
    // The full body reached WeChat, client_msg_id derived from the job_id.
    assert_eq!(sent.body["client_msg_id"], "order-42-paid");
    assert_eq!(sent.body["miniprogram"]["pagepath"], "pages/order?id=42");
    assert_eq!(sent.body["topcolor"], "#FF0000");
    assert_eq!(sent.body["url"], "http://weixin.qq.com/download");
    assert_eq!(sent.body["data"]["Money"]["color"], "#173177");

    // msgid → job_id recorded for the webhook, with a TTL of at least 3 days.
    let mut redis = redis_conn().await;
    let key = format!("{ns}:{{{APPID}}}:msgid:{}", sent.msgid);
    let job_id: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(job_id.as_deref(), Some("order-42-paid"));
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut redis).await.unwrap();
    assert!(ttl >= 3 * 24 * 3600, "msgid record TTL {ttl}");

    // Acked: after the worker is gone, nothing comes back to the queue.
    worker.stop().await;
    assert_eq!(env.queue_len(&env.config.jobs_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_token_through_expiry_and_revocation() {
    three_workers_share_one_token("token", 1_000, redis_url()).await;
}

/// Three workers, each with its own connections, share one account through the Redis at
/// `redis_url` while tokens live 3 seconds and are revoked midway: every one of `total` jobs
/// succeeds, and the sandbox sees no more token requests than token lifetimes elapsed + 2,
/// however many workers there are. The jobs come in batches, each after the pool renewed its
/// token, so that every batch meets a token of its own.
pub async fn three_workers_share_one_token(tag: &str, total: usize, redis_url: &str) {
    let lifetime = Duration::from_secs(3);
    let sandbox = sandbox_with_token_lifetime(lifetime).await;
    let ns = unique(tag);
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.redis_url = redis_url.to_owned();
    let mut env = TestEnv::new(tag, cfg).await;
    env.declare_topology().await;
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&env.config)).collect();

    let started = Instant::now();
    let batches = 4;
    let mut results = Vec::new();
    for b in 0..batches {
        // Revoke right before a batch, so the batch's sends meet the revoked token (a revocation
        // just before a scheduled refresh would otherwise go unnoticed).
        if b == batches / 2 {
            sandbox.revoke_tokens();
        }
        for i in 0..total / batches {
            env.publish_job(&job(&format!("{tag}-{b}-{i}"), "oia2TjuEGTNoeX76QEjQNrcURxG8")).await;
        }
        results.extend(env.results(total / batches, Duration::from_secs(30)).await);
        if b + 1 < batches {
            let fetched = sandbox.stats().token_requests;
            let renewed =
                eventually(2 * lifetime, || std::future::ready(sandbox.stats().token_requests > fetched)).await;
            assert!(renewed, "the pool renews the token before it expires: {:?}", sandbox.stats());
        }
    }
    let elapsed = started.elapsed();
    for w in workers {
        w.stop().await;
    }

    assert_eq!(results.len(), total, "every job has a result");
    let failed: Vec<_> = results.iter().filter(|r| r.routing_key != "send.succeeded").take(3).collect();
    assert!(failed.is_empty(), "all jobs succeed; failures: {failed:?}");
    let mut ids: Vec<_> = results.iter().map(|r| r.body["job_id"].as_str().unwrap_or_default().to_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "one result per job");
    let stats = sandbox.stats();
    assert_eq!(stats.sends_accepted, total as u64);
    assert!(stats.errors.get(&40001).copied().unwrap_or(0) > 0, "the revocation was felt: {stats:?}");
    let lifetimes = (elapsed.as_secs_f64() / lifetime.as_secs_f64()).ceil() as u64;
    eprintln!(
        "{tag}: {} token requests over {:.1} s ({lifetimes} lifetimes): {stats:?}",
        stats.token_requests,
        elapsed.as_secs_f64()
    );
    assert!(
        stats.token_requests <= lifetimes + 2,
        "{} token requests in {:.1} s ({lifetimes} lifetimes): {stats:?}",
        stats.token_requests,
        elapsed.as_secs_f64()
    );
    assert!(stats.token_requests >= 3, "tokens were refreshed across lifetimes: {stats:?}");
}
