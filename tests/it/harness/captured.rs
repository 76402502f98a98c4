//! The real `wxpush-worker` binary, configured like a test's `Config`, its output captured in
//! files and its admin endpoints on a port of its own. Dropping it kills the process and removes
//! the files, also when the test failed.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use secrecy::ExposeSecret;
use wxpush::config::{Config, TokenApi};

pub struct CapturedWorker {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    config: PathBuf,
    /// `http://127.0.0.1:<port>`: `/metrics`, `/healthz`, `/readyz`.
    pub admin: String,
}

impl CapturedWorker {
    /// Starts the binary with `cfg`'s URLs, names, accounts and timings; `env` is added last
    /// (and wins). `RUST_LOG` is `info` unless `env` sets it.
    pub fn start(cfg: &Config, env: &[(&str, &str)]) -> CapturedWorker {
        let base = std::env::temp_dir().join(format!("{}-{}", cfg.redis_prefix, uuid::Uuid::new_v4().simple()));
        let config_path = base.with_extension("toml");
        let mut toml = format!(
            "http_timeout_ms = {}\nshutdown_grace_secs = {}\n\
             [retry]\nmin_delay_ms = {}\nin_process_max_ms = {}\ndelay_tiers_secs = {:?}\n",
            cfg.http_timeout_ms,
            cfg.shutdown_grace_secs,
            cfg.retry.min_delay_ms,
            cfg.retry.in_process_max_ms,
            cfg.retry.delay_tiers_secs,
        );
        for a in &cfg.accounts {
            let api = match a.token_api {
                TokenApi::Stable => "stable",
                TokenApi::Classic => "classic",
            };
            toml.push_str(&format!(
                "[[accounts]]\nname = {:?}\nappid = {:?}\nsecret = {:?}\ntoken_api = \"{api}\"\n",
                a.name,
                a.appid,
                a.secret.expose_secret()
            ));
        }
        std::fs::write(&config_path, toml).expect("write the worker's config file");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (stdout, stderr) = (base.with_extension("stdout"), base.with_extension("stderr"));
        let child = worker_command(cfg, &config_path)
            .env("WXPUSH_MAX_ATTEMPTS", cfg.max_attempts.to_string())
            .env("WXPUSH_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .expect("start wxpush-worker");
        CapturedWorker { child, stdout, stderr, config: config_path, admin: format!("http://127.0.0.1:{port}") }
    }

    /// Status and body of `GET <admin><path>` (status 0 when it cannot be asked).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        match client.get(format!("{}{path}", self.admin)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Polls `path` until `done(status, body)`, for at most `timeout`; the last answer.
    pub async fn until(&self, path: &str, timeout: Duration, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, body) = self.get(path).await;
            if done(code, &body) || Instant::now() >= deadline {
                return (code, body);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the process has written to stdout so far.
    pub fn stdout_so_far(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// SIGTERM, wait for a clean exit, and return stdout and stderr.
    pub fn stop(mut self) -> (String, String) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the worker exits after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "{exit:?}");
        (std::fs::read_to_string(&self.stdout).unwrap(), std::fs::read_to_string(&self.stderr).unwrap())
    }
}

/// The worker binary with `cfg`'s URLs and names in its environment and `config_file` as its
/// configuration.
pub fn worker_command(cfg: &Config, config_file: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wxpush-worker"));
    command
        .env("WXPUSH_CONFIG", config_file)
        .env("WXPUSH_AMQP_URL", &cfg.amqp_url)
        .env("WXPUSH_REDIS_URL", &cfg.redis_url)
        .env("WXPUSH_REDIS_PREFIX", &cfg.redis_prefix)
        .env("WXPUSH_WECHAT_API_BASE", &cfg.wechat_api_base)
        .env("WXPUSH_JOBS_QUEUE", &cfg.jobs_queue)
        .env("WXPUSH_RESULTS_EXCHANGE", &cfg.results_exchange)
        .env("WXPUSH_DEAD_LETTER_QUEUE", &cfg.dead_letter_queue);
    command
}

impl Drop for CapturedWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in [&self.stdout, &self.stderr, &self.config] {
            let _ = std::fs::remove_file(file);
        }
    }
}
