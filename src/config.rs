//! Configuration: a TOML file (`config/default.toml` documents every key) overridden by
//! `WXPUSH_*` environment variables (docs/contract.md, "Configuration").
//!
//! Secrets are [`SecretString`]s from the moment they are read: their `Debug` prints
//! `[REDACTED]`, so a logged `Config` shows none of them.

use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

/// Why a configuration could not be loaded; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}={value:?} is not valid: {message}")]
    Env { var: &'static str, value: String, message: String },
    #[error("configuration is not valid: {0}")]
    Invalid(String),
}

/// Which WeChat endpoint an account's access token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenApi {
    /// `POST /cgi-bin/stable_token`: the same token for every caller until it nears expiry.
    #[default]
    Stable,
    /// `GET /cgi-bin/token`: every call rotates the token (the old one lives 5 more minutes).
    Classic,
}

/// The kind of RabbitMQ queue wxpush declares for its jobs, delay and dead-letter queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated over the cluster's nodes (Raft); survives the loss of a minority of them, and
    /// counts deliveries so that a poison message ends in the dead-letter queue.
    #[default]
    Quorum,
    /// A classic queue on one node: for brokers older than 3.10 or queues kept from before.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(&self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }

    /// The other kind (for advice in errors).
    pub fn other(&self) -> QueueType {
        match self {
            QueueType::Quorum => QueueType::Classic,
            QueueType::Classic => QueueType::Quorum,
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            _ => Err("expected \"quorum\" or \"classic\"".into()),
        }
    }
}

/// One WeChat official account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub name: String,
    pub appid: String,
    #[serde(default = "empty_secret")]
    pub secret: SecretString,
    #[serde(default)]
    pub token_api: TokenApi,
    /// The server-config Token that signs pushes (webhook).
    #[serde(default)]
    pub callback_token: Option<SecretString>,
    /// The 43-character EncodingAESKey; when set, safe-mode pushes are accepted.
    #[serde(default)]
    pub encoding_aes_key: Option<SecretString>,
    /// The key before the last rotation, still tried when the current one fails.
    #[serde(default)]
    pub previous_encoding_aes_key: Option<SecretString>,
    /// With an AES key, also take plaintext pushes (checked by `signature` alone, which does
    /// not cover the body): only while switching the console's message mode.
    #[serde(default)]
    pub accept_plaintext: bool,
    /// Template sends per second across the pool; `None` takes the global `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Template sends per Beijing day; `None` (or 0) = no quota kept by wxpush.
    #[serde(default)]
    pub daily_quota: Option<u64>,
}

fn empty_secret() -> SecretString {
    SecretString::from("")
}

impl Account {
    /// Sends per second for this account, 0 meaning no limit.
    pub fn effective_rate_limit(&self, global: u32) -> u32 {
        self.rate_limit.unwrap_or(global)
    }
}

/// The access-token protocol's timings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSettings {
    /// Refresh a token when less than this is left of its life. Keep it under WeChat's
    /// 5-minute overlap, so a stable_token call made then returns a new token.
    pub refresh_ahead_secs: f64,
    /// Lease of the pool-wide refresh lock: longer than one token request can take.
    pub lock_ttl_ms: u64,
    /// How long a send may wait for a token before its job is put back to wait in a delay queue.
    pub wait_ms: u64,
    /// After a failed token fetch, how long the pool waits before the next one (doubles up
    /// to 5 minutes while failures go on), so a wrong secret does not burn the daily quota.
    pub failure_backoff_ms: u64,
    /// Least time between two forced refreshes (`force_refresh=true`) of one appid, pool-wide.
    /// WeChat ignores a forced refresh less than 30 s after the last one.
    pub forced_refresh_interval_secs: u64,
    /// Forced refreshes one appid may make per Beijing day, pool-wide. WeChat allows 20, and
    /// each one invalidates the token every worker is using; the rest of the 20 is left for
    /// people (the console, a script) who may need one.
    pub forced_refresh_daily_budget: u32,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            refresh_ahead_secs: 240.0,
            lock_ttl_ms: 15_000,
            wait_ms: 10_000,
            failure_backoff_ms: 2_000,
            forced_refresh_interval_secs: 30,
            forced_refresh_daily_budget: 10,
        }
    }
}

/// Retry timings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// First backoff after a transient failure; doubles each attempt, with jitter.
    pub min_delay_ms: u64,
    /// Longest backoff.
    pub max_delay_ms: u64,
    /// Backoffs up to this long are waited in-process; longer ones go through a delay queue so
    /// the job holds no concurrency or prefetch slot while it waits.
    pub in_process_max_ms: u64,
    /// The delay queues' TTLs, in seconds, shortest first.
    pub delay_tiers_secs: Vec<u64>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            min_delay_ms: 200,
            max_delay_ms: 300_000,
            in_process_max_ms: 1_000,
            delay_tiers_secs: vec![1, 5, 30, 120, 600, 3600],
        }
    }
}

/// The whole configuration of the programs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub wechat_api_base: String,
    pub jobs_queue: String,
    pub results_exchange: String,
    pub dead_letter_queue: String,
    /// Kind of the queues wxpush declares (jobs, delay, dead-letter).
    pub queue_type: QueueType,
    /// Deliveries of one job after which a quorum jobs queue dead-letters it (a poison message
    /// that keeps being requeued, or crashes its workers). Ignored for classic queues.
    pub delivery_limit: u32,
    /// Default sends per second per account (0 = no limit).
    pub rate_limit: u32,
    /// Extra sends a burst may add to `rate_limit`, as a fraction (at most 0.1 = 10 %).
    pub rate_burst: f64,
    pub max_attempts: u32,
    pub concurrency: u16,
    /// Length of the daily-quota "day" in seconds; 86400 = a Beijing calendar day. Shorter only
    /// for tests and demos.
    pub quota_day_secs: u64,
    /// How long an account pauses after 45011 (minute quota); 0 = until the next minute, as
    /// WeChat asks. Shorter only for tests and demos.
    pub minute_pause_secs: u64,
    pub webhook_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// The webhook's `/metrics`, `/healthz`, `/readyz`, kept off the port WeChat reaches.
    pub webhook_admin_listen: SocketAddr,
    /// How long in-flight jobs get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// Timeout of one HTTP request to WeChat.
    pub http_timeout_ms: u64,
    /// How long msgid → job records live, for the webhook to tie receipts (at least 3 days).
    pub msgid_ttl_secs: u64,
    /// How long a job's recorded success is kept, to answer redeliveries and duplicates.
    pub ledger_ttl_secs: u64,
    /// Lease a worker holds on a job while it sends it, renewed every third of it while the job
    /// is in flight: a crashed worker's jobs are free for the next worker within this time.
    pub job_lease_ms: u64,
    /// Most results the unrouted-results queue (`<results_exchange>.unrouted`) keeps; past
    /// it the oldest are dropped.
    pub unrouted_max_length: u64,
    /// How long a result stays in the unrouted-results queue.
    pub unrouted_ttl_secs: u64,
    pub token: TokenSettings,
    pub retry: RetrySettings,
    /// TLS to RabbitMQ and Redis: extra CA bundle, client certificate (`[tls]`).
    pub tls: crate::tls::TlsSettings,
    pub accounts: Vec<Account>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_prefix: "wxpush".into(),
            wechat_api_base: "https://api.weixin.qq.com".into(),
            jobs_queue: "wxpush.jobs".into(),
            results_exchange: "wxpush.results".into(),
            dead_letter_queue: "wxpush.jobs.dead".into(),
            queue_type: QueueType::Quorum,
            delivery_limit: 10,
            rate_limit: 0,
            rate_burst: 0.05,
            max_attempts: 5,
            concurrency: 64,
            quota_day_secs: 86_400,
            minute_pause_secs: 0,
            webhook_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9100)),
            webhook_admin_listen: SocketAddr::from(([0, 0, 0, 0], 9101)),
            shutdown_grace_secs: 20,
            http_timeout_ms: 5_000,
            msgid_ttl_secs: 7 * 24 * 3600,
            ledger_ttl_secs: 7 * 24 * 3600,
            job_lease_ms: 5_000,
            unrouted_max_length: 100_000,
            unrouted_ttl_secs: 7 * 24 * 3600,
            token: TokenSettings::default(),
            retry: RetrySettings::default(),
            tls: crate::tls::TlsSettings::default(),
            accounts: Vec::new(),
        }
    }
}

/// Every environment variable the programs read, with the key it overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("WXPUSH_AMQP_URL", "amqp_url"),
    ("WXPUSH_REDIS_URL", "redis_url"),
    ("WXPUSH_REDIS_PREFIX", "redis_prefix"),
    ("WXPUSH_WECHAT_API_BASE", "wechat_api_base"),
    ("WXPUSH_JOBS_QUEUE", "jobs_queue"),
    ("WXPUSH_RESULTS_EXCHANGE", "results_exchange"),
    ("WXPUSH_DEAD_LETTER_QUEUE", "dead_letter_queue"),
    ("WXPUSH_QUEUE_TYPE", "queue_type"),
    ("WXPUSH_RATE_LIMIT", "rate_limit"),
    ("WXPUSH_MAX_ATTEMPTS", "max_attempts"),
    ("WXPUSH_CONCURRENCY", "concurrency"),
    ("WXPUSH_WEBHOOK_LISTEN", "webhook_listen"),
    ("WXPUSH_METRICS_LISTEN", "metrics_listen"),
    ("WXPUSH_WEBHOOK_ADMIN_LISTEN", "webhook_admin_listen"),
    ("WXPUSH_SHUTDOWN_GRACE_SECS", "shutdown_grace_secs"),
    ("WXPUSH_HTTP_TIMEOUT_MS", "http_timeout_ms"),
    ("WXPUSH_UNROUTED_MAX_LENGTH", "unrouted_max_length"),
    ("WXPUSH_UNROUTED_TTL_SECS", "unrouted_ttl_secs"),
    ("WXPUSH_TLS_CA_FILE", "tls.ca_file"),
    ("WXPUSH_TLS_CERT_FILE", "tls.cert_file"),
    ("WXPUSH_TLS_KEY_FILE", "tls.key_file"),
    ("WXPUSH_APPID", "accounts[default].appid"),
    ("WXPUSH_APPSECRET", "accounts[default].secret"),
    ("WXPUSH_CALLBACK_TOKEN", "accounts[default].callback_token"),
    ("WXPUSH_ENCODING_AES_KEY", "accounts[default].encoding_aes_key"),
];

impl Config {
    /// Loads the file at `path` (or the defaults when `None`), then the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?,
            None => String::new(),
        };
        let name = path.map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        Self::from_sources(&name, &text, |var| std::env::var(var).ok())
    }

    /// Builds a configuration from TOML text and an environment lookup (tests pass their own).
    pub fn from_sources(
        name: &str,
        toml_text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(toml_text)
            .map_err(|e| ConfigError::Parse { path: name.to_owned(), message: e.to_string() })?;
        config.apply_env(&env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                value: value.into(),
                message: e.to_string(),
            })
        }
        let get = |var: &str| env(var).filter(|v| !v.is_empty());
        if let Some(v) = get("WXPUSH_AMQP_URL") {
            self.amqp_url = v;
        }
        if let Some(v) = get("WXPUSH_REDIS_URL") {
            self.redis_url = v;
        }
        if let Some(v) = get("WXPUSH_REDIS_PREFIX") {
            self.redis_prefix = v;
        }
        if let Some(v) = get("WXPUSH_WECHAT_API_BASE") {
            self.wechat_api_base = v;
        }
        if let Some(v) = get("WXPUSH_JOBS_QUEUE") {
            self.jobs_queue = v;
        }
        if let Some(v) = get("WXPUSH_RESULTS_EXCHANGE") {
            self.results_exchange = v;
        }
        if let Some(v) = get("WXPUSH_DEAD_LETTER_QUEUE") {
            self.dead_letter_queue = v;
        }
        if let Some(v) = get("WXPUSH_QUEUE_TYPE") {
            self.queue_type = parse("WXPUSH_QUEUE_TYPE", &v)?;
        }
        if let Some(v) = get("WXPUSH_RATE_LIMIT") {
            self.rate_limit = parse("WXPUSH_RATE_LIMIT", &v)?;
        }
        if let Some(v) = get("WXPUSH_MAX_ATTEMPTS") {
            self.max_attempts = parse("WXPUSH_MAX_ATTEMPTS", &v)?;
        }
        if let Some(v) = get("WXPUSH_CONCURRENCY") {
            self.concurrency = parse("WXPUSH_CONCURRENCY", &v)?;
        }
        if let Some(v) = get("WXPUSH_WEBHOOK_LISTEN") {
            self.webhook_listen = parse("WXPUSH_WEBHOOK_LISTEN", &v)?;
        }
        if let Some(v) = get("WXPUSH_METRICS_LISTEN") {
            self.metrics_listen = parse("WXPUSH_METRICS_LISTEN", &v)?;
        }
        if let Some(v) = get("WXPUSH_WEBHOOK_ADMIN_LISTEN") {
            self.webhook_admin_listen = parse("WXPUSH_WEBHOOK_ADMIN_LISTEN", &v)?;
        }
        if let Some(v) = get("WXPUSH_SHUTDOWN_GRACE_SECS") {
            self.shutdown_grace_secs = parse("WXPUSH_SHUTDOWN_GRACE_SECS", &v)?;
        }
        if let Some(v) = get("WXPUSH_HTTP_TIMEOUT_MS") {
            self.http_timeout_ms = parse("WXPUSH_HTTP_TIMEOUT_MS", &v)?;
        }
        if let Some(v) = get("WXPUSH_UNROUTED_MAX_LENGTH") {
            self.unrouted_max_length = parse("WXPUSH_UNROUTED_MAX_LENGTH", &v)?;
        }
        if let Some(v) = get("WXPUSH_UNROUTED_TTL_SECS") {
            self.unrouted_ttl_secs = parse("WXPUSH_UNROUTED_TTL_SECS", &v)?;
        }
        self.tls.apply_env(&get);

        let appid = get("WXPUSH_APPID");
        let secret = get("WXPUSH_APPSECRET");
        let callback_token = get("WXPUSH_CALLBACK_TOKEN");
        let aes_key = get("WXPUSH_ENCODING_AES_KEY");
        if appid.is_none() && secret.is_none() && callback_token.is_none() && aes_key.is_none() {
            return Ok(());
        }
        let index = match self.accounts.iter().position(|a| a.name == crate::domain::job::DEFAULT_ACCOUNT) {
            Some(i) => i,
            None => {
                let Some(appid) = appid.clone() else {
                    return Err(ConfigError::Invalid(
                        "WXPUSH_APPSECRET, WXPUSH_CALLBACK_TOKEN or WXPUSH_ENCODING_AES_KEY is set but the account \
                         `default` has no appid: set WXPUSH_APPID too, or add an [[accounts]] entry named \"default\""
                            .into(),
                    ));
                };
                self.accounts.push(Account {
                    name: crate::domain::job::DEFAULT_ACCOUNT.into(),
                    appid,
                    secret: empty_secret(),
                    token_api: TokenApi::default(),
                    callback_token: None,
                    encoding_aes_key: None,
                    previous_encoding_aes_key: None,
                    accept_plaintext: false,
                    rate_limit: None,
                    daily_quota: None,
                });
                self.accounts.len() - 1
            }
        };
        let account = &mut self.accounts[index];
        if let Some(v) = appid {
            account.appid = v;
        }
        if let Some(v) = secret {
            account.secret = SecretString::from(v);
        }
        if let Some(v) = callback_token {
            account.callback_token = Some(SecretString::from(v));
        }
        if let Some(v) = aes_key {
            account.encoding_aes_key = Some(SecretString::from(v));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.concurrency == 0 {
            return invalid("concurrency (WXPUSH_CONCURRENCY) must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts (WXPUSH_MAX_ATTEMPTS) must be at least 1".into());
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return invalid("redis_prefix (WXPUSH_REDIS_PREFIX) must be non-empty and free of braces".into());
        }
        for (key, name) in [
            ("jobs_queue", &self.jobs_queue),
            ("results_exchange", &self.results_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 200 {
                return invalid(format!(
                    "{key} must be 1 to 200 characters (queue and exchange names are at most 255 bytes)"
                ));
            }
        }
        if self.token.forced_refresh_interval_secs < 30 {
            return invalid(format!(
                "token.forced_refresh_interval_secs {} must be at least 30: WeChat ignores forced refreshes closer together",
                self.token.forced_refresh_interval_secs
            ));
        }
        if self.token.forced_refresh_daily_budget > 20 {
            return invalid(format!(
                "token.forced_refresh_daily_budget {} must be at most 20, WeChat's daily limit (keep some for people)",
                self.token.forced_refresh_daily_budget
            ));
        }
        if self.unrouted_max_length == 0 || self.unrouted_ttl_secs == 0 {
            return invalid(
                "unrouted_max_length and unrouted_ttl_secs must be at least 1: the unrouted-results queue keeps what no \
                 consumer's binding took"
                    .into(),
            );
        }
        if self.job_lease_ms < 1_000 {
            return invalid(format!(
                "job_lease_ms {} must be at least 1000: the lease is renewed every third of it, and a shorter one could \
                 run out under a moment of load and let a second worker send the job",
                self.job_lease_ms
            ));
        }
        if self.delivery_limit == 0 {
            return invalid(
                "delivery_limit must be at least 1 (deliveries of a job before it is dead-lettered)".into(),
            );
        }
        if self.amqp_url.split(',').all(|u| u.trim().is_empty()) {
            return invalid("amqp_url (WXPUSH_AMQP_URL) must name at least one broker".into());
        }
        self.tls.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.jobs_queue == self.dead_letter_queue {
            return invalid("jobs_queue and dead_letter_queue must differ".into());
        }
        if !(0.0..=0.1).contains(&self.rate_burst) {
            return invalid(format!(
                "rate_burst {} must be between 0 and 0.1: a burst may add at most 10 % to the rate",
                self.rate_burst
            ));
        }
        if self.retry.delay_tiers_secs.is_empty() || self.retry.delay_tiers_secs.windows(2).any(|w| w[0] >= w[1]) {
            return invalid("retry.delay_tiers_secs must be a non-empty list of increasing seconds".into());
        }
        if self.retry.delay_tiers_secs.contains(&0) {
            return invalid("retry.delay_tiers_secs must not contain 0".into());
        }
        if self.msgid_ttl_secs < 3 * 24 * 3600 {
            return invalid(
                "msgid_ttl_secs must be at least 259200 (3 days): WeChat may push a receipt days later".into(),
            );
        }
        url::Url::parse(&self.wechat_api_base).map_err(|e| {
            ConfigError::Invalid(format!("wechat_api_base {:?} is not a URL: {e}", self.wechat_api_base))
        })?;
        let mut names = BTreeSet::new();
        for a in &self.accounts {
            if a.name.is_empty() || !a.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return invalid(format!(
                    "account name {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    a.name
                ));
            }
            if !names.insert(a.name.as_str()) {
                return invalid(format!("account {:?} is configured twice", a.name));
            }
            if a.appid.is_empty() || a.appid.contains(['{', '}', ':']) {
                return invalid(format!("account {:?}: appid must be non-empty and free of braces and colons", a.name));
            }
        }
        Ok(())
    }

    /// The account called `name`, if configured.
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name == name)
    }

    pub fn http_timeout(&self) -> Duration {
        Duration::from_millis(self.http_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_sources("t", "", env(&[])).unwrap();
        assert_eq!(c.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379/");
        assert_eq!(c.redis_prefix, "wxpush");
        assert_eq!(c.wechat_api_base, "https://api.weixin.qq.com");
        assert_eq!(c.jobs_queue, "wxpush.jobs");
        assert_eq!(c.results_exchange, "wxpush.results");
        assert_eq!(c.dead_letter_queue, "wxpush.jobs.dead");
        assert_eq!((c.rate_limit, c.max_attempts, c.concurrency), (0, 5, 64));
        assert_eq!(c.webhook_listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.metrics_listen.to_string(), "0.0.0.0:9100");
        assert_eq!(c.webhook_admin_listen.to_string(), "0.0.0.0:9101");
        assert!(c.accounts.is_empty());
        assert_eq!((c.queue_type, c.delivery_limit), (QueueType::Quorum, 10));
    }

    #[test]
    fn the_queue_type_comes_from_the_file_or_the_environment() {
        let c = Config::from_sources("t", "queue_type = \"classic\"\ndelivery_limit = 3\n", env(&[])).unwrap();
        assert_eq!((c.queue_type, c.delivery_limit), (QueueType::Classic, 3));
        let c = Config::from_sources("t", "queue_type = \"classic\"", env(&[("WXPUSH_QUEUE_TYPE", "Quorum")])).unwrap();
        assert_eq!(c.queue_type, QueueType::Quorum);
        let e = Config::from_sources("t", "", env(&[("WXPUSH_QUEUE_TYPE", "stream")])).unwrap_err().to_string();
        assert!(e.contains("WXPUSH_QUEUE_TYPE=\"stream\"") && e.contains("\"quorum\" or \"classic\""), "{e}");
        let e = Config::from_sources("t", "delivery_limit = 0", env(&[])).unwrap_err().to_string();
        assert!(e.contains("delivery_limit must be at least 1"), "{e}");
        let e = Config::from_sources("t", "", env(&[("WXPUSH_AMQP_URL", " , ")])).unwrap_err().to_string();
        assert!(e.contains("at least one broker"), "{e}");
    }

    #[test]
    fn the_documented_reference_file_loads_and_names_every_variable() {
        let text = include_str!("../config/default.toml");
        let c = Config::from_sources("config/default.toml", text, env(&[])).unwrap();
        assert_eq!(c.jobs_queue, "wxpush.jobs");
        for (var, _) in ENV_VARS {
            assert!(text.contains(var), "config/default.toml does not mention {var}");
        }
    }

    #[test]
    fn environment_overrides_the_file_and_makes_the_default_account() {
        let c = Config::from_sources(
            "t",
            "jobs_queue = \"from.file\"\nrate_limit = 5\n",
            env(&[
                ("WXPUSH_JOBS_QUEUE", "from.env"),
                ("WXPUSH_RATE_LIMIT", "100"),
                ("WXPUSH_CONCURRENCY", "8"),
                ("WXPUSH_APPID", "wx1"),
                ("WXPUSH_APPSECRET", "s3cret"),
                ("WXPUSH_ENCODING_AES_KEY", "k"),
            ]),
        )
        .unwrap();
        assert_eq!(c.jobs_queue, "from.env");
        assert_eq!(c.rate_limit, 100);
        assert_eq!(c.concurrency, 8);
        let a = c.account("default").unwrap();
        assert_eq!(a.appid, "wx1");
        assert_eq!(a.secret.expose_secret(), "s3cret");
        assert_eq!(a.encoding_aes_key.as_ref().unwrap().expose_secret(), "k");
        assert_eq!(a.token_api, TokenApi::Stable);
    }

    #[test]
    fn several_accounts_come_from_the_file() {
        let c = Config::from_sources(
            "t",
            r#"
            [[accounts]]
            name = "default"
            appid = "wxA"
            secret = "a"
            [[accounts]]
            name = "shop"
            appid = "wxB"
            secret = "b"
            token_api = "classic"
            rate_limit = 20
            "#,
            env(&[("WXPUSH_APPSECRET", "override")]),
        )
        .unwrap();
        assert_eq!(c.accounts.len(), 2);
        assert_eq!(c.account("default").unwrap().secret.expose_secret(), "override");
        let shop = c.account("shop").unwrap();
        assert_eq!(shop.token_api, TokenApi::Classic);
        assert_eq!(shop.effective_rate_limit(7), 20);
        assert_eq!(c.account("default").unwrap().effective_rate_limit(7), 7);
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let c = Config::from_sources("t", "", env(&[("WXPUSH_APPID", "wx1"), ("WXPUSH_APPSECRET", "topsecretvalue")]))
            .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("topsecretvalue"), "{shown}");
        assert!(shown.contains("wx1"));
    }

    #[test]
    fn mistakes_are_named() {
        let err =
            |toml: &str, e: &[(&str, &str)]| Config::from_sources("f.toml", toml, env(e)).unwrap_err().to_string();
        assert!(err("", &[("WXPUSH_CONCURRENCY", "many")]).contains("WXPUSH_CONCURRENCY=\"many\""));
        assert!(err("", &[("WXPUSH_CONCURRENCY", "0")]).contains("at least 1"));
        assert!(err("concurency = 3", &[]).contains("unknown field `concurency`"));
        assert!(err("", &[("WXPUSH_APPSECRET", "x")]).contains("set WXPUSH_APPID"));
        let twice = "[[accounts]]\nname=\"a\"\nappid=\"x\"\n[[accounts]]\nname=\"a\"\nappid=\"y\"\n";
        assert!(err(twice, &[]).contains("configured twice"));
        assert!(err("msgid_ttl_secs = 60", &[]).contains("3 days"));
        assert!(err("wechat_api_base = \"not a url\"", &[]).contains("not a URL"));
    }
}
