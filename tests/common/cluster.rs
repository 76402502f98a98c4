//! A throwaway three-master Redis Cluster on free loopback ports, for the tests that run the
//! pool against a cluster. Dropping it shuts the nodes down (`SHUTDOWN NOSAVE`) and removes their
//! directory, also when the test failed or the cluster never came up.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The cluster bus of a node listens on its port + 10000.
const BUS_OFFSET: u16 = 10_000;

pub struct RedisCluster {
    ports: Vec<u16>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts three nodes, joins them into a cluster of three masters (no replicas), and waits
    /// until every node says `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(super::unique("redis-cluster"));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        // The guard exists before the first node does, so a failure below still cleans up.
        let mut cluster = RedisCluster { ports: Vec::new(), dir };
        for _ in 0..3 {
            let port = free_port_pair(&cluster.ports);
            let (dir, p) = (cluster.dir.display().to_string(), port.to_string());
            let started = Command::new("redis-server")
                .args(["--port", &p, "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf"), "--dir", &dir])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
                .args(["--pidfile", &format!("{dir}/redis-{p}.pid"), "--logfile", &format!("{dir}/redis-{p}.log")])
                .stdout(Stdio::null())
                .status()
                .expect("redis-server is installed");
            assert!(started.success(), "redis-server on port {port} did not start: {started}");
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_for(Duration::from_secs(10), &format!("node {port} to answer PING"), || {
                cli(port, &["PING"]).is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            });
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        for &port in &cluster.ports {
            wait_for(Duration::from_secs(20), &format!("node {port} to report cluster_state:ok"), || {
                cli(port, &["CLUSTER", "INFO"])
                    .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            });
        }
        cluster
    }

    /// `WXPUSH_REDIS_URL` for the cluster: every node, comma-separated.
    pub fn url(&self) -> String {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect::<Vec<_>>().join(",")
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The hash slot of `key`, as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> u16 {
        let out = cli(self.ports[0], &["CLUSTER", "KEYSLOT", key]).expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLUSTER KEYSLOT answers a number")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for &port in &self.ports {
            // The server closes the connection without answering, so redis-cli's status says nothing.
            let _ = cli(port, &["SHUTDOWN", "NOSAVE"]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && self.ports.iter().any(|&p| cli(p, &["PING"]).is_some_and(|o| o.status.success() && !o.stdout.is_empty()))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli(port: u16, args: &[&str]) -> Option<Output> {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
}

/// A port that is free, as is its cluster-bus port, and not one of `taken`.
fn free_port_pair(taken: &[u16]) -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (rand::random::<u16>() % 20_000);
        if taken.iter().any(|&t| t == port || t + BUS_OFFSET == port || port + BUS_OFFSET == t) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)).is_ok()
        {
            return port;
        }
    }
    panic!("no free pair of loopback ports for a Redis Cluster node");
}

fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
