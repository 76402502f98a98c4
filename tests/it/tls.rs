//! TLS to self-hosted Redis and RabbitMQ whose certificates a private CA signed, as where they
//! are run in-house: a Redis started with `--tls-port` and a RabbitMQ node with only a TLS
//! listener, both requiring a client certificate. The CA and the certificates are made here.
//!
//! The library's connect functions and a real worker reach both with the CA bundle and the
//! client certificate (WXPUSH_TLS_CA_FILE, WXPUSH_TLS_CERT_FILE, WXPUSH_TLS_KEY_FILE), and are
//! refused without them. The nodes are private to this test (own ports, own directories) and
//! are stopped, their directory removed, also when the test fails.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::harness::*;
use crate::wx::{Nodes, Tls, TlsSettings, conn};
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A directory removed when dropped (declared before the nodes that use it, so dropped after).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files of a private PKI: a CA, a server certificate for 127.0.0.1 and a client
/// certificate, each key unencrypted PEM.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca.distinguished_name.push(DnType::CommonName, "wxpush test company CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "wxpush test server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_key_pem) = leaf(vec![], "wxpush test client", ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server-key.pem", &server_key_pem),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client-key.pem", &client_key_pem),
        }
    }

    fn settings(&self, ca: bool, client: bool) -> TlsSettings {
        TlsSettings {
            ca_file: ca.then(|| self.ca.clone()),
            cert_file: client.then(|| self.client_cert.clone()),
            key_file: client.then(|| self.client_key.clone()),
        }
    }

    fn tls(&self, ca: bool, client: bool) -> Tls {
        Tls::load(&self.settings(ca, client)).expect("the generated files load")
    }
}

/// A server process of this test: SIGTERM when dropped, SIGKILL if it has not exited 30 s later.
struct Node {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Node {
    /// Waits until `port` accepts connections; fails with the node's log if it exits first.
    async fn wait_for_port(&mut self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before listening:\n{}", self.what, self.log_tail());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not listening on {port} after {timeout:?}:\n{}",
                self.what,
                self.log_tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        // A clean stop within 30 s, else SIGKILL: waited for off the runtime's workers.
        blocking_in_place(|| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(POLL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        });
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Redis with TLS only, on a free port, requiring a client certificate of the CA.
async fn start_redis(dir: &Path, pki: &Pki) -> (Node, String) {
    let port = free_port();
    let log = dir.join("redis.log");
    let p = |path: &Path| path.display().to_string();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &p(&pki.server_cert), "--tls-key-file", &p(&pki.server_key)])
        .args(["--tls-ca-cert-file", &p(&pki.ca), "--tls-auth-clients", "yes"])
        .args(["--save", "", "--appendonly", "no", "--dir", &p(dir), "--logfile", &p(&log)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed (built with TLS, as Debian's is)");
    let mut node = Node { what: "redis-server", child, log };
    node.wait_for_port(port, Duration::from_secs(20)).await;
    (node, format!("rediss://127.0.0.1:{port}/"))
}

/// The RabbitMQ server script that runs the node as the current user (Debian's /usr/sbin one
/// switches to the rabbitmq user, who cannot write this test's directory).
fn rabbitmq_server() -> PathBuf {
    ["/usr/lib/rabbitmq/bin/rabbitmq-server", "/opt/rabbitmq/sbin/rabbitmq-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("rabbitmq-server"))
}

/// A RabbitMQ node of its own (name, ports, configuration, data, cookie) with a TLS listener only,
/// requiring a client certificate of the CA. No plugins, so nothing else listens.
async fn start_rabbitmq(dir: &Path, pki: &Pki) -> (Node, String) {
    let (port, dist_port) = (free_port(), free_port());
    let home = dir.join("rabbitmq");
    std::fs::create_dir_all(&home).unwrap();
    let conf = home.join("rabbitmq.conf");
    std::fs::write(
        &conf,
        format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )
    .unwrap();
    std::fs::write(home.join("enabled_plugins"), "[].\n").unwrap();
    std::fs::write(home.join("rabbitmq-env.conf"), "").unwrap();
    let log = home.join("console.log");
    let node_name = format!("{}@localhost", unique("tls").replace('-', "_"));
    let child = Command::new(rabbitmq_server())
        // Its own Erlang cookie, configuration and data: nothing of the shared broker's.
        .env("HOME", &home)
        .env("RABBITMQ_NODENAME", &node_name)
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_CONF_ENV_FILE", home.join("rabbitmq-env.conf"))
        .env("RABBITMQ_CONFIG_FILE", &conf)
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", home.join("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", home.join("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", home.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", home.join("log"))
        .env_remove("RABBITMQ_NODE_PORT")
        .env_remove("RABBITMQ_ENABLED_PLUGINS")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(home.join("console.err")).unwrap()))
        .spawn()
        .expect("rabbitmq-server is installed");
    let mut node = Node { what: "rabbitmq-server", child, log };
    // A node boots in seconds; a loaded machine may need a good deal more.
    node.wait_for_port(port, Duration::from_secs(180)).await;
    (node, format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
}

/// PING through wxpush's Redis connection made with `tls`; the error text when it fails.
async fn redis_ping(url: &str, tls: &Tls) -> Result<(), String> {
    let mut conn = conn::open_with_tls(url, tls).await.map_err(|e| e.to_string())?;
    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
    match pong {
        Ok(p) if p == "PONG" => Ok(()),
        Ok(other) => Err(format!("PING answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A channel through wxpush's RabbitMQ connection made with `tls`; the error text when it fails.
async fn amqp_channel(url: &str, tls: Tls) -> Result<(lapin::Connection, lapin::Channel), String> {
    let connection = Nodes::new(url).with_tls(Arc::new(tls)).connect("wxpush tls test").await.map_err(|e| {
        let causes = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source());
        causes.map(ToString::to_string).collect::<Vec<_>>().join(": ")
    })?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    Ok((connection, channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_rabbitmq_over_tls_signed_by_a_private_ca() {
    let scratch = Scratch(scratch_dir(&unique("tls")));
    std::fs::create_dir_all(&scratch.0).unwrap();
    let pki = Pki::create(&scratch.0);
    let ((_redis, redis_url), (_rabbitmq, amqp_url)) =
        tokio::join!(start_redis(&scratch.0, &pki), start_rabbitmq(&scratch.0, &pki));

    // The library: reached with the CA and the client certificate ...
    redis_ping(&redis_url, &pki.tls(true, true)).await.expect("Redis over TLS with the private CA");
    let (connection, _channel) =
        amqp_channel(&amqp_url, pki.tls(true, true)).await.expect("RabbitMQ over TLS with the private CA");
    let _ = connection.close(200, "done".into()).await;
    // ... refused without the CA: the system's trust store does not know it.
    let e = redis_ping(&redis_url, &pki.tls(false, true)).await.expect_err("Redis without the CA");
    assert!(e.contains("UnknownIssuer"), "{e}");
    let e = amqp_channel(&amqp_url, pki.tls(false, true)).await.expect_err("RabbitMQ without the CA");
    assert!(e.contains("UnknownIssuer"), "{e}");
    // ... and without a client certificate, which both servers require.
    assert!(redis_ping(&redis_url, &pki.tls(true, false)).await.is_err(), "Redis requires a client certificate");
    assert!(amqp_channel(&amqp_url, pki.tls(true, false)).await.is_err(), "RabbitMQ requires a client certificate");

    // A real worker, configured through the environment.
    let sandbox = start_sandbox(Default::default()).await;
    let mut cfg = config(&unique("tls"), &sandbox.base_url());
    cfg.amqp_url = amqp_url.clone();
    cfg.redis_url = redis_url.clone();
    let files = [
        ("WXPUSH_TLS_CA_FILE", pki.ca.display().to_string()),
        ("WXPUSH_TLS_CERT_FILE", pki.client_cert.display().to_string()),
        ("WXPUSH_TLS_KEY_FILE", pki.client_key.display().to_string()),
    ];
    let env: Vec<(&str, &str)> = files.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let worker = WorkerProcess::captured(&cfg, &env);
    let (code, body) = worker.admin.until("/readyz", Duration::from_secs(60), |code, _| code == 200).await;
    assert_eq!((code, body.as_str()), (200, "rabbitmq: up\nredis: up\n"), "{}", worker.stdout_so_far());

    // A job goes through: RabbitMQ in and out, Redis for the token and the ledger.
    let (connection, channel) = amqp_channel(&amqp_url, pki.tls(true, true)).await.unwrap();
    let observed = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let opts = QueueBindOptions::default();
    channel
        .queue_bind(
            observed.name().clone(),
            cfg.results_exchange.as_str().into(),
            "#".into(),
            opts,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut results = channel
        .basic_consume(
            observed.name().clone(),
            "tls-test".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let body = serde_json::to_vec(&job("over-tls", "u-tls")).unwrap();
    let props = BasicProperties::default().with_delivery_mode(2);
    channel
        .basic_publish("".into(), cfg.jobs_queue.as_str().into(), BasicPublishOptions::default(), &body, props)
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), results.next()).await;
    let delivery = result.expect("a result within 30 s").expect("a delivery").expect("no consumer error");
    assert_eq!(delivery.routing_key.as_str(), "send.succeeded", "{}", String::from_utf8_lossy(&delivery.data));
    let _ = connection.close(200, "done".into()).await;
    let (stdout, _) = worker.stop().await;
    assert!(!stdout.contains("UnknownIssuer"), "{stdout}");

    // The same worker without the CA: not ready, and its log says why.
    let worker = WorkerProcess::captured(&cfg, &[]);
    let line_of = |logs: &str, what: &str| logs.lines().find(|l| l.contains(what)).map(str::to_owned);
    let both = |logs: &str| ["RabbitMQ unavailable", "Redis is unreachable"].iter().all(|w| line_of(logs, w).is_some());
    eventually(Duration::from_secs(30), || std::future::ready(both(&worker.stdout_so_far()))).await;
    let logs = worker.stdout_so_far();
    for what in ["RabbitMQ unavailable", "Redis is unreachable"] {
        let line = line_of(&logs, what).unwrap_or_else(|| panic!("no `{what}` line:\n{logs}"));
        assert!(line.contains("UnknownIssuer"), "the log says why: {line}");
    }
    assert_eq!(worker.admin.get("/readyz").await, (503, "rabbitmq: down\nredis: down\n".to_owned()));
}
