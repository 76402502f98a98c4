//! The real worker binary as a process of its own, configured like a test's `Config` (a config
//! file and the environment), with its admin endpoints on a port of its own and its output
//! discarded or captured in files. Dropping it kills the process and removes its files, also
//! when the test failed.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::wx::{Config, TokenApi};
use secrecy::ExposeSecret;

use super::{POLL, config_env, exit_of};

/// A program's admin endpoints: `/healthz`, `/readyz`, `/metrics`.
pub struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    /// The endpoints served on `addr` (`host:port`).
    pub fn at(addr: &str) -> Admin {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("an HTTP client");
        Admin { base: format!("http://{addr}"), http }
    }

    /// Status and body of `GET <path>` (status 0 when it cannot be asked).
    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Asks for `path` until `done(status, body)`, for at most `timeout`; the last answer.
    pub async fn until(&self, path: &str, timeout: Duration, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(path).await;
            if done(status, &body) || Instant::now() >= deadline {
                return (status, body);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

pub struct WorkerProcess {
    child: Child,
    config: PathBuf,
    /// Files holding stdout and stderr, when captured.
    output: Option<(PathBuf, PathBuf)>,
    pub admin: Admin,
}

impl WorkerProcess {
    /// Started with `cfg`; its warnings go to the test's stderr.
    pub fn start(cfg: &Config) -> WorkerProcess {
        WorkerProcess::start_with_env(cfg, &[])
    }

    /// As [`start`](Self::start), with more environment variables (`HTTPS_PROXY`, …).
    pub fn start_with_env(cfg: &Config, env: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::launch(cfg, &[&[("RUST_LOG", "warn")], env].concat(), false)
    }

    /// Started with `cfg`, its stdout and stderr captured; `env` is added last (and wins).
    /// `RUST_LOG` is `info` unless `env` sets it.
    pub fn captured(cfg: &Config, env: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::launch(cfg, &[&[("RUST_LOG", "info")], env].concat(), true)
    }

    fn launch(cfg: &Config, env: &[(&str, &str)], capture: bool) -> WorkerProcess {
        let base = std::env::temp_dir().join(format!("{}-{}", cfg.redis_prefix, uuid::Uuid::new_v4().simple()));
        let config = base.with_extension("toml");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let admin = format!("127.0.0.1:{port}");
        std::fs::write(&config, config_file(cfg, &admin)).expect("write the worker's config file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_wxpush-worker"));
        command.envs(config_env(cfg)).env("WXPUSH_CONFIG", &config).envs(env.iter().copied()).stdin(Stdio::null());
        let output = capture.then(|| (base.with_extension("stdout"), base.with_extension("stderr")));
        match &output {
            Some((stdout, stderr)) => command
                .stdout(std::fs::File::create(stdout).expect("a file for stdout"))
                .stderr(std::fs::File::create(stderr).expect("a file for stderr")),
            None => command.stdout(Stdio::null()).stderr(Stdio::inherit()),
        };
        let child = command.spawn().expect("start wxpush-worker");
        WorkerProcess { child, config, output, admin: Admin::at(&admin) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -<signal>` of the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal}");
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        exit_of(&mut self.child, timeout).await
    }

    /// What the process has written to stdout so far (captured output only).
    pub fn stdout_so_far(&self) -> String {
        self.output.as_ref().and_then(|(stdout, _)| std::fs::read_to_string(stdout).ok()).unwrap_or_default()
    }

    /// SIGTERM, a clean exit within 20 s, and what it wrote to stdout and stderr.
    pub async fn stop(mut self) -> (String, String) {
        self.signal("TERM");
        let exit = self.wait(Duration::from_secs(20)).await.expect("the worker exits after SIGTERM");
        assert!(exit.success(), "{exit:?}");
        let (stdout, stderr) = self.output.as_ref().expect("captured output");
        (std::fs::read_to_string(stdout).unwrap_or_default(), std::fs::read_to_string(stderr).unwrap_or_default())
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        for file in self.output.iter().flat_map(|(stdout, stderr)| [stdout, stderr]) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// `cfg` as the worker's config file (what the tests vary, and the accounts), with the admin
/// endpoints on `admin`.
fn config_file(cfg: &Config, admin: &str) -> String {
    let mut toml = format!(
        "metrics_listen = {admin:?}\njob_lease_ms = {}\nhttp_timeout_ms = {}\nshutdown_grace_secs = {}\n\
         max_attempts = {}\nconcurrency = {}\nrate_limit = {}\nqueue_type = {:?}\ndelivery_limit = {}\n\
         quota_day_secs = {}\nminute_pause_secs = {}\n\
         [token]\nrefresh_ahead_secs = {:?}\nfailure_backoff_ms = {}\n\
         [retry]\nmin_delay_ms = {}\nmax_delay_ms = {}\nin_process_max_ms = {}\ndelay_tiers_secs = {:?}\n",
        cfg.job_lease.as_millis(),
        cfg.http_timeout.as_millis(),
        cfg.shutdown_grace.as_secs(),
        cfg.max_attempts,
        cfg.concurrency,
        cfg.rate_limit,
        cfg.queue_type.as_str(),
        cfg.delivery_limit,
        cfg.quota_day.as_secs(),
        cfg.minute_pause.map_or(0, |p| p.as_secs()),
        cfg.token.refresh_ahead.as_secs_f64(),
        cfg.token.failure_backoff.as_millis(),
        cfg.retry.min_delay.as_millis(),
        cfg.retry.max_delay.as_millis(),
        cfg.retry.in_process_max.as_millis(),
        cfg.retry.delay_tiers_secs,
    );
    for a in &cfg.accounts {
        let api = match a.token_api {
            TokenApi::Stable => "stable",
            TokenApi::Classic => "classic",
        };
        let _ = writeln!(
            toml,
            "[[accounts]]\nname = {:?}\nappid = {:?}\nsecret = {:?}\ntoken_api = \"{api}\"",
            a.name,
            a.appid,
            a.secret.expose_secret()
        );
        if let Some(limit) = a.rate_limit {
            let _ = writeln!(toml, "rate_limit = {limit}");
        }
        if let Some(quota) = a.daily_quota {
            let _ = writeln!(toml, "daily_quota = {quota}");
        }
    }
    toml
}
