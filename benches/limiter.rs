//! The pool-wide rate limiter alone: admission decisions per second against the local Redis.
//!
//! `cargo bench --bench limiter [-- --seconds S --tasks T --processes 1,4]`
//!
//! Each process runs T concurrent tasks asking `Redis::admit` for one account whose budget
//! never says no (so every call is a full GCRA + quota decision, not a cheap refusal); the
//! report gives decisions/s for 1 and several processes together.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use wxpush::store::{Redis, limits::Budget};

// The test suite's services, of which a bench uses a few.
#[allow(dead_code)]
#[path = "../tests/it/harness/services.rs"]
mod services;
use services::redis_url;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let seconds: f64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let tasks: usize = arg("--tasks").and_then(|s| s.parse().ok()).unwrap_or(32);
    if let Some(prefix) = arg("--child") {
        let n = tokio::runtime::Runtime::new().unwrap().block_on(decide(&prefix, seconds, tasks));
        println!("{n}");
        return;
    }
    let processes: Vec<usize> =
        arg("--processes").map(|s| s.split(',').filter_map(|p| p.parse().ok()).collect()).unwrap_or(vec![1, 4]);
    println!("rate limiter: {tasks} concurrent tasks per process, {seconds} s per run");
    println!("| processes | decisions/s |");
    println!("|---|---|");
    for p in processes {
        let prefix = format!("wxpush-bench-limiter-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let children: Vec<_> = (0..p)
            .map(|_| {
                Command::new(std::env::current_exe().unwrap())
                    .args(["--child", &prefix, "--seconds", &seconds.to_string(), "--tasks", &tasks.to_string()])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let total: u64 = children
            .into_iter()
            .map(|c| String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap().trim().parse::<u64>().unwrap())
            .sum();
        println!("| {p} | {:.0} |", total as f64 / seconds);
        let _ = Command::new("redis-cli")
            .args(["-u", redis_url(), "--scan", "--pattern", &format!("{prefix}:*")])
            .output()
            .map(|o| {
                for key in String::from_utf8_lossy(&o.stdout).lines() {
                    let _ = Command::new("redis-cli").args(["-u", redis_url(), "DEL", key]).output();
                }
            });
    }
}

async fn decide(prefix: &str, seconds: f64, tasks: usize) -> u64 {
    let redis = Redis::connect(redis_url(), prefix).await.unwrap();
    // A budget that always admits: 1,000,000/s and a quota of 10^12.
    let budget = Budget::new(1_000_000, 0.05, 1_000_000_000_000);
    let count = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (redis, count) = (redis.clone(), count.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    redis.admit("wxbench", &budget, "d0").await.unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    count.load(Ordering::Relaxed)
}
