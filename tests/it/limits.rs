//! One rate limit and one daily quota for the whole pool, per account.

use std::time::Duration;

use crate::harness::*;
use crate::wx::{Faults, QuotaDay, SandboxAccount, SandboxConfig, SentMessage};
use chrono::{DateTime, Utc};

const APPID_B: &str = "wxtest0000000002";

const SECRET_B: &str = "test-secret-0002";

fn times_of(messages: &[SentMessage], appid: &str) -> Vec<DateTime<Utc>> {
    messages.iter().filter(|m| m.appid == appid).map(|m| m.accepted_at).collect()
}

fn two_account_sandbox() -> SandboxConfig {
    SandboxConfig {
        accounts: vec![SandboxAccount::new(APPID, SECRET), SandboxAccount::new(APPID_B, SECRET_B)],
        ..SandboxConfig::default()
    }
}

fn job_for(account: &str, id: &str) -> serde_json::Value {
    let mut j = job(id, &format!("u-{id}"));
    j["account"] = account.into();
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_hold_one_rate_limit() {
    let _timed = timed().await;
    three_worker_processes_hold_one_rate_limit_of_100("rate", 1_000, redis_url()).await;
}

/// Three worker processes sharing the limiter's state in the Redis at `redis_url` send `total`
/// jobs, published at once, at 100 per second: no 1-second window sees more than 10 % over it,
/// and the mean stays within 10 % under it.
pub async fn three_worker_processes_hold_one_rate_limit_of_100(tag: &str, total: usize, redis_url: &str) {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique(tag);
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.rate_limit = 100;
    cfg.redis_url = redis_url.to_owned();
    let mut env = TestEnv::new(tag, cfg).await;
    env.declare_topology().await;
    for i in 0..total {
        env.publish_job(&job(&format!("{tag}-{i}"), &format!("u-{i}"))).await;
    }
    let mut workers: Vec<_> = (0..3).map(|_| WorkerProcess::start(&env.config)).collect();
    let results = env.results(total, Duration::from_secs(60)).await;
    for w in &mut workers {
        w.signal("TERM");
        w.wait(Duration::from_secs(15)).await;
    }
    assert_eq!(results.len(), total);
    assert!(results.iter().all(|r| r.routing_key == "send.succeeded"));
    let (most, mean) = window_stats(&times_of(&sandbox.messages(), APPID));
    eprintln!("{tag}, limit 100/s: at most {most} sends in a 1-second window, mean {mean:.1}/s");
    assert!(most <= 110, "a 1-second window saw {most} sends (limit 100/s, burst 10 %)");
    assert!(mean >= 90.0, "mean rate {mean:.1}/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_in_one_pool_each_hold_their_own_limit() {
    let _timed = timed().await;
    let sandbox = start_sandbox(two_account_sandbox()).await;
    let ns = unique("rate2");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.accounts = vec![account("default", APPID, SECRET), account("b", APPID_B, SECRET_B)];
    cfg.accounts[0].rate_limit = Some(40);
    cfg.accounts[1].rate_limit = Some(15);
    let mut env = TestEnv::new("rate2", cfg).await;
    env.declare_topology().await;
    for i in 0..200 {
        env.publish_job(&job_for("default", &format!("a-{i}"))).await;
        if i < 75 {
            env.publish_job(&job_for("b", &format!("b-{i}"))).await;
        }
    }
    let workers = [spawn_worker(&env.config), spawn_worker(&env.config)];
    let results = env.results(275, Duration::from_secs(60)).await;
    for w in workers {
        w.stop().await;
    }
    assert_eq!(results.len(), 275);
    assert!(results.iter().all(|r| r.routing_key == "send.succeeded"));
    let messages = sandbox.messages();
    let (most_a, mean_a) = window_stats(&times_of(&messages, APPID));
    let (most_b, mean_b) = window_stats(&times_of(&messages, APPID_B));
    eprintln!("limits 40/s and 15/s: windows {most_a} and {most_b}, means {mean_a:.1}/s and {mean_b:.1}/s");
    assert!(most_a <= 44 && mean_a >= 36.0, "account a: {most_a} in a window, {mean_a:.1}/s (limit 40)");
    assert!(most_b <= 16 && mean_b >= 13.5, "account b: {most_b} in a window, {mean_b:.1}/s (limit 15)");
}

/// A small quota and a 3-second "day": jobs beyond the quota wait for the reset (with one
/// `send.deferred` notice each) and are then sent; none fails; no day sends more than the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_beyond_the_daily_quota_wait_for_the_reset() {
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("quota");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.quota_day = Duration::from_secs(3);
    cfg.accounts[0].daily_quota = Some(25);
    let mut env = TestEnv::new("quota", cfg).await;
    env.declare_topology().await;
    let total = 60;
    for i in 0..total {
        env.publish_job(&job(&format!("q-{i}"), &format!("u-{i}"))).await;
    }
    let worker = spawn_worker(&env.config);
    let mut succeeded = 0;
    let mut deferred = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while succeeded < total && std::time::Instant::now() < deadline {
        let Some(r) = env.next_result(Duration::from_secs(5)).await else { continue };
        match r.routing_key.as_str() {
            "send.succeeded" => succeeded += 1,
            "send.deferred" => {
                assert!(r.body["reason"].as_str().unwrap().contains("parked until"), "{}", r.body);
                *deferred.entry(r.body["job_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    worker.stop().await;
    assert_eq!(succeeded, total, "every job was sent in the end");
    assert!(!deferred.is_empty(), "jobs over the quota were announced as deferred");
    assert!(deferred.values().all(|&n| n == 1), "one notice per parked job");
    let day = QuotaDay::with_length(3);
    let mut per_day = std::collections::HashMap::new();
    for m in sandbox.messages() {
        *per_day.entry(day.key(m.accepted_at)).or_insert(0) += 1;
    }
    assert!(per_day.values().all(|&n| n <= 25), "no day over the quota: {per_day:?}");
    assert!(per_day.len() >= 3, "the sends spread over three quota days: {per_day:?}");
}

/// WeChat's own 45009 (daily quota) and 45011 (minute quota) pause that account only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_quota_answers_pause_one_account_while_others_go_on() {
    let sandbox = start_sandbox(two_account_sandbox()).await;
    sandbox.set_faults(Faults { daily_cap: Some(10), ..Faults::default() });
    let ns = unique("wxquota");
    let mut cfg = config(&ns, &sandbox.base_url());
    cfg.accounts = vec![account("default", APPID, SECRET), account("b", APPID_B, SECRET_B)];
    cfg.quota_day = Duration::from_secs(2);
    cfg.minute_pause = Some(Duration::from_secs(1));
    let mut env = TestEnv::new("wxquota", cfg).await;
    env.declare_topology().await;
    for i in 0..30 {
        env.publish_job(&job_for("default", &format!("a-{i}"))).await;
    }
    for i in 0..8 {
        env.publish_job(&job_for("b", &format!("b-{i}"))).await;
    }
    let worker = spawn_worker(&env.config);

    // 45009: account a stops after 10 sends; b's 8 all go through meanwhile.
    let mut b_done = 0;
    let mut a_done = 0;
    let mut a_deferred = 0;
    while b_done < 8 || a_deferred == 0 {
        let r = env.next_result(Duration::from_secs(15)).await.expect("results keep coming");
        match (r.routing_key.as_str(), r.body["account"].as_str().unwrap()) {
            ("send.succeeded", "b") => b_done += 1,
            ("send.succeeded", _) => a_done += 1,
            ("send.deferred", _) => a_deferred += 1,
            (other, _) => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(a_done <= 10, "account a was stopped by 45009 after 10 sends, sent {a_done}");
    assert!(sandbox.stats().errors.get(&45009).copied().unwrap_or(0) >= 1, "WeChat answered 45009");

    // WeChat lifts the cap; now 45011 per second: a pauses a second at a time, and finishes.
    sandbox.set_faults(Faults { per_second_cap: Some(5), ..Faults::default() });
    let mut deadline_hits = 0;
    while a_done < 30 {
        match env.next_result(Duration::from_secs(20)).await {
            Some(r) if r.routing_key == "send.succeeded" => a_done += 1,
            Some(r) if r.routing_key == "send.deferred" => {}
            Some(r) => panic!("unexpected {}: {}", r.routing_key, r.body),
            None => {
                deadline_hits += 1;
                assert!(deadline_hits < 2, "account a stalled at {a_done} of 30");
            }
        }
    }
    worker.stop().await;
    let stats = sandbox.stats();
    assert!(stats.errors.get(&45011).copied().unwrap_or(0) >= 1, "the per-second cap was hit: {stats:?}");
    assert_eq!(stats.sends_accepted, 38, "every job sent once: {stats:?}");
}
