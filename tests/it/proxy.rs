//! Reaching WeChat from behind a whitelisted egress IP is a setting, not code: the worker sends
//! through the proxy that `HTTPS_PROXY` (or `HTTP_PROXY`, `ALL_PROXY`) names — a CONNECT tunnel
//! for `https://api.weixin.qq.com`, so TLS stays end to end — and goes direct to the hosts in
//! `NO_PROXY`. reqwest reads these variables when its client is built; these tests hold it to that
//! with the real worker binary and a local proxy that records what it is asked.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::harness::*;
use crate::wx::SandboxConfig;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// A proxy that records the request line of every connection and refuses to go further (502).
struct RecordingProxy {
    url: String,
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    async fn start() -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&lines);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    seen.lock().unwrap().push(text.lines().next().unwrap_or_default().to_owned());
                    let _ = client
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        RecordingProxy { url, lines, task }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_over_https_goes_through_the_https_proxy_in_a_connect_tunnel() {
    let proxy = RecordingProxy::start().await;
    let ns = unique("proxy-https");
    // A name that resolves nowhere: with the proxy the worker never looks it up, and should the
    // proxy be ignored, nothing leaves the machine either.
    let env = TestEnv::new("proxy-https", config(&ns, "https://api.wechat.invalid")).await;
    env.declare_topology().await;
    env.publish_job(&job("via-proxy", "u-proxy")).await;
    let _worker = WorkerProcess::start_with_env(
        &env.config,
        &[("HTTPS_PROXY", proxy.url.as_str()), ("NO_PROXY", ""), ("HTTP_PROXY", ""), ("ALL_PROXY", "")],
    );

    let tunnelled = eventually(Duration::from_secs(30), || async {
        proxy.lines().iter().any(|l| l == "CONNECT api.wechat.invalid:443 HTTP/1.1")
    })
    .await;
    assert!(tunnelled, "the worker asked the proxy for a tunnel to WeChat: {:?}", proxy.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_in_no_proxy_are_reached_directly() {
    let proxy = RecordingProxy::start().await;
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("proxy-direct");
    let mut env = TestEnv::new("proxy-direct", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;
    env.publish_job(&job("direct", "u-direct")).await;
    let url = proxy.url.as_str();
    let _worker = WorkerProcess::start_with_env(
        &env.config,
        &[("HTTPS_PROXY", url), ("HTTP_PROXY", url), ("ALL_PROXY", url), ("NO_PROXY", "127.0.0.1,localhost")],
    );

    let result = env.next_result(Duration::from_secs(30)).await.expect("a result");
    assert_eq!(result.routing_key, "send.succeeded", "{}", result.body);
    assert_eq!(sandbox.stats().sends_accepted, 1);
    assert!(proxy.lines().is_empty(), "the proxy was asked: {:?}", proxy.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_api_base_goes_through_the_http_proxy() {
    // The counterpart of the test above: the same sandbox URL without NO_PROXY goes to the proxy.
    let proxy = RecordingProxy::start().await;
    let sandbox = start_sandbox(SandboxConfig::default()).await;
    let ns = unique("proxy-http");
    let env = TestEnv::new("proxy-http", config(&ns, &sandbox.base_url())).await;
    env.declare_topology().await;
    env.publish_job(&job("via-http-proxy", "u-http")).await;
    let _worker = WorkerProcess::start_with_env(
        &env.config,
        &[("HTTP_PROXY", proxy.url.as_str()), ("NO_PROXY", ""), ("HTTPS_PROXY", ""), ("ALL_PROXY", "")],
    );

    let expected = format!("POST {}/cgi-bin/stable_token HTTP/1.1", sandbox.base_url().trim_end_matches('/'));
    let forwarded = eventually(Duration::from_secs(30), || async { proxy.lines().contains(&expected) }).await;
    assert!(forwarded, "the worker sent {expected:?} to the proxy: {:?}", proxy.lines());
    assert_eq!(sandbox.stats().sends_accepted, 0, "nothing reached the sandbox around the proxy");
}
