//! Throwaway clusters on free loopback ports: a Redis Cluster (three masters, with or without a
//! replica each) and a three-node RabbitMQ cluster. Both are started, stopped and poked by
//! `scripts/cluster`, the script people use for the same clusters, so the tests exercise what
//! the README tells them to run. Dropping a cluster removes it (nodes killed, directory gone),
//! also when the test failed or the cluster never came up; a cluster whose test process was
//! killed is removed by the next start (the script records the owning process).
//!
//! Everything here blocks (it runs the script): async tests call it through
//! [`blocking`](super::blocking).

use super::blocking_in_place;

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, Instant},
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster");

/// One `scripts/cluster` state directory, and what its nodes are called and listen on.
struct Script {
    dir: PathBuf,
    name: String,
}

impl Script {
    fn new(tag: &str) -> Script {
        let name = super::unique(tag);
        Script { dir: super::scratch_dir(&name), name }
    }

    /// Runs `scripts/cluster ARGS` with this state directory and `env`; its output, or why it failed.
    fn run(&self, args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
        let out = Command::new(SCRIPT)
            .args(args)
            .env("WXPUSH_CLUSTER_DIR", &self.dir)
            .env("WXPUSH_CLUSTER_NAME", &self.name)
            .env("WXPUSH_CLUSTER_OWNER_PID", std::process::id().to_string())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {SCRIPT}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("scripts/cluster {} failed: {text}{}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn must(&self, args: &[&str], env: &[(&str, String)]) -> String {
        self.run(args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `scripts/cluster down WHAT`, from a `Drop`.
    fn down(&self, what: &str) {
        if let Err(e) = blocking_in_place(|| self.run(&["down", what], &[])) {
            eprintln!("{e}");
        }
    }
}

/// Starts a cluster of `nodes` with `scripts/cluster up WHAT` on free ports (each with its second
/// listener at port + `offset`) passed in `ports_var`, with `extra` in the environment. Ports
/// taken between choosing and starting are refused by the script: it tries new ones.
fn up(
    tag: &str,
    what: &str,
    nodes: usize,
    offset: u16,
    ports_var: &str,
    extra: &[(&str, String)],
) -> (Script, Vec<u16>) {
    for _ in 0..3 {
        let mut ports = Vec::new();
        for _ in 0..nodes {
            ports.push(free_port(&ports, offset));
        }
        let script = Script::new(tag);
        let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
        match script.run(&["up", what], &[&[(ports_var, list)], extra].concat()) {
            Ok(_) => return (script, ports),
            // Nothing was started.
            Err(e) if e.contains("already in use") => eprintln!("{e}; trying other ports"),
            Err(e) => {
                // Whatever did start goes.
                script.down(what);
                panic!("{e}");
            }
        }
    }
    panic!("no free ports for a {what} cluster after three tries");
}

// ---- Redis -------------------------------------------------------------------------------

/// A Redis Cluster node's bus listens on its port + 10000.
const REDIS_BUS_OFFSET: u16 = 10_000;

pub struct RedisCluster {
    script: Script,
    ports: Vec<u16>,
}

impl RedisCluster {
    /// Three masters without replicas, `cluster_state:ok` on every node. A master is declared
    /// failed only after 15 s of silence, so a loaded machine never fails one over by mistake
    /// (nothing could take over anyway).
    pub fn start() -> RedisCluster {
        RedisCluster::launch(3, 15_000)
    }

    /// Three masters with one replica each (ports 4-6 replicate 1-3 in some order); a master
    /// silent for `node_timeout` is replaced by its replica.
    pub fn with_replicas(node_timeout: Duration) -> RedisCluster {
        RedisCluster::launch(6, node_timeout.as_millis() as u64)
    }

    fn launch(nodes: usize, node_timeout_ms: u64) -> RedisCluster {
        let timeout = [("WXPUSH_CLUSTER_NODE_TIMEOUT_MS", node_timeout_ms.to_string())];
        let (script, ports) =
            up("redis-cluster", "redis", nodes, REDIS_BUS_OFFSET, "WXPUSH_CLUSTER_REDIS_PORTS", &timeout);
        RedisCluster { script, ports }
    }

    /// `WXPUSH_REDIS_URL` for the cluster: every node, comma-separated.
    pub fn url(&self) -> String {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect::<Vec<_>>().join(",")
    }

    /// The hash slot of `key`, as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> u16 {
        let out = self.cli_any(&["CLUSTER", "KEYSLOT", key]);
        out.trim().parse().unwrap_or_else(|_| panic!("CLUSTER KEYSLOT answers a number, not {out:?}"))
    }

    /// The port of the master serving `slot`, as the first live node sees it.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.masters()
            .into_iter()
            .find(|m| m.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The masters and their slot ranges (`CLUSTER NODES` of the first live node).
    pub fn masters(&self) -> Vec<Master> {
        let nodes = self.cli_any(&["CLUSTER", "NODES"]);
        nodes
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let flags = *f.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter_map(|r| match r.split_once('-') {
                        Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                Some(Master { port, slots })
            })
            .filter(|m: &Master| !m.slots.is_empty())
            .collect()
    }

    /// `kill -9` of the node on `port`.
    pub fn kill(&self, port: u16) {
        let n = self.index_of(port).to_string();
        self.script.must(&["stop", "redis", &n], &[]);
    }

    /// Whether the node on `port` says it is a master with `cluster_state:ok`.
    pub fn is_healthy_master(&self, port: u16) -> bool {
        let role = cli(port, &["ROLE"]).unwrap_or_default();
        let info = cli(port, &["CLUSTER", "INFO"]).unwrap_or_default();
        role.starts_with("master") && info.contains("cluster_state:ok")
    }

    /// Keys held by the node on `port` whose name matches `pattern`.
    pub fn count_keys(&self, port: u16, pattern: &str) -> usize {
        cli(port, &["--scan", "--pattern", pattern]).map_or(0, |out| out.lines().filter(|l| !l.is_empty()).count())
    }

    fn index_of(&self, port: u16) -> usize {
        1 + self.ports.iter().position(|&p| p == port).unwrap_or_else(|| panic!("{port} is not a node of the cluster"))
    }

    /// Runs a command on the first node that answers.
    fn cli_any(&self, args: &[&str]) -> String {
        self.ports
            .iter()
            .find_map(|&p| cli(p, args).filter(|o| !o.is_empty() && !o.starts_with("Could not connect")))
            .unwrap_or_else(|| panic!("no node of the Redis Cluster answers {args:?}"))
    }
}

/// A master and the slot ranges it serves.
#[derive(Debug, Clone)]
pub struct Master {
    pub port: u16,
    pub slots: Vec<(u16, u16)>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.script.down("redis");
    }
}

/// redis-cli's answer on stdout (None if it could not run at all).
fn cli(port: u16, args: &[&str]) -> Option<String> {
    // A node that hangs (stopped, not dead) must not hang the test: 10 s at most.
    let out: Output = Command::new("timeout")
        .args(["10", "redis-cli", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- RabbitMQ ----------------------------------------------------------------------------

/// A RabbitMQ node's Erlang distribution listens on its AMQP port + 20000.
const RABBIT_DIST_OFFSET: u16 = 20_000;

/// Three RabbitMQ nodes joined into one cluster (node names `<unique>-1@localhost` …), on free
/// loopback ports, with their own data directories and Erlang cookie. Nodes are numbered 1-3.
pub struct RabbitCluster {
    script: Script,
    ports: Vec<u16>,
}

/// The cluster the tests of one binary share while any of them holds it.
static SHARED_RABBIT: Mutex<Weak<RabbitCluster>> = Mutex::new(Weak::new());

impl RabbitCluster {
    pub fn start() -> RabbitCluster {
        let started = Instant::now();
        let (script, ports) = up("rmq", "rabbitmq", 3, RABBIT_DIST_OFFSET, "WXPUSH_CLUSTER_RABBITMQ_PORTS", &[]);
        eprintln!("RabbitMQ cluster of three nodes up in {:.1} s", started.elapsed().as_secs_f64());
        RabbitCluster { script, ports }
    }

    /// The cluster every test of this binary uses while one holds it: started by the first,
    /// removed when the last one drops it. Tests that stop nodes must bring them back.
    pub fn shared() -> Arc<RabbitCluster> {
        let mut shared = SHARED_RABBIT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cluster) = shared.upgrade() {
            return cluster;
        }
        let cluster = Arc::new(RabbitCluster::start());
        *shared = Arc::downgrade(&cluster);
        cluster
    }

    /// The AMQP URL of node `n` alone.
    pub fn node_url(&self, n: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.ports[n - 1])
    }

    /// The Erlang name of node `n`.
    pub fn node_name(&self, n: usize) -> String {
        format!("{}-{n}@localhost", self.script.name)
    }

    /// `rabbitmqctl ARGS` against node `n`.
    pub fn ctl(&self, n: usize, args: &[&str]) -> Result<String, String> {
        let n = n.to_string();
        let mut all = vec!["rabbitmqctl", n.as_str()];
        all.extend_from_slice(args);
        self.script.run(&all, &[])
    }

    /// The node leading quorum queue `queue`, asked of node `via`.
    pub fn leader_of(&self, queue: &str, via: usize) -> Option<usize> {
        let out = self.ctl(via, &["list_queues", "name", "leader", "--formatter", "json", "--silent"]).ok()?;
        let rows: serde_json::Value = serde_json::from_str(&out).ok()?;
        let leader = rows.as_array()?.iter().find(|r| r["name"] == queue)?["leader"].as_str()?.to_owned();
        (1..=3).find(|&n| self.node_name(n) == leader)
    }

    /// `rabbitmqctl stop_app` on node `n`: the broker stops, the Erlang node stays.
    pub fn stop_app(&self, n: usize) {
        self.ctl(n, &["stop_app"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `kill -9` of node `n`'s Erlang VM.
    pub fn kill(&self, n: usize) {
        self.script.must(&["stop", "rabbitmq", &n.to_string()], &[]);
    }

    /// Brings node `n` back after [`stop_app`](Self::stop_app) or [`kill`](Self::kill), and
    /// waits until every node reports running.
    pub fn restore(&self, n: usize) {
        if self.ctl(n, &["start_app"]).is_err() {
            // The VM is gone (killed): start it again; it rejoins with its data directory.
            self.script.must(&["start", "rabbitmq", &n.to_string()], &[]);
        }
        self.await_all_running(Duration::from_secs(90));
    }

    /// Waits until every node is in the cluster and running.
    pub fn await_all_running(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let running = (1..=3).find_map(|via| self.ctl(via, &["cluster_status", "--formatter", "json"]).ok());
            let all = running.is_some_and(|out| {
                serde_json::from_str::<serde_json::Value>(&out).ok().is_some_and(|v| {
                    (1..=3).all(|n| {
                        v["running_nodes"].as_array().is_some_and(|r| r.iter().any(|x| x == &*self.node_name(n)))
                    })
                })
            });
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "the RabbitMQ nodes did not all run again within {timeout:?}");
            // Each ask starts an Erlang VM: not too often.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl RabbitCluster {
    /// The last `lines` lines of each node's log (warnings and errors), for a failed test to show.
    pub fn log_tails(&self, lines: usize) -> String {
        (1..=3)
            .map(|n| {
                let path = self.script.dir.join(format!("rabbitmq/{n}/log/{}.log", self.node_name(n)));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                format!(
                    "--- {} log, last lines:\n{}",
                    self.node_name(n),
                    all[all.len().saturating_sub(lines)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        self.script.down("rabbitmq");
    }
}

/// A loopback port that is free, as is `port + offset` (the node's second listener), and
/// clashes with none of `taken` or their second ports.
fn free_port(taken: &[u16], offset: u16) -> u16 {
    for _ in 0..500 {
        let port = 20_000 + (rand::random::<u16>() % 20_000);
        if taken.iter().any(|&t| t == port || t + offset == port || port + offset == t) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + offset)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of loopback ports for a cluster node");
}
