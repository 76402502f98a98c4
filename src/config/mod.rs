//! Configuration: a TOML file (`config/default.toml` documents every key) and then the
//! environment, which wins: every key has a `WXPUSH_*` variable derived from its path (`env.rs`;
//! docs/contract.md, "Configuration"). figment merges the two and says which key a wrong value
//! is at; an error then names the variable that set it, or the file.
//!
//! Durations are [`Duration`]s, read from keys that name their unit (`http_timeout_ms`), so
//! files keep working (`duration.rs`). Secrets are [`SecretString`]s from the moment they are
//! read: their `Debug` prints `[REDACTED]`, and so does serializing them ([`Config::to_redacted_toml`]).

mod duration;
mod env;

use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use figment::{Figment, providers::Serialized};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

pub use env::{ENV_VARS, EnvVars};

/// Why a configuration could not be loaded; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML")]
    Syntax { path: String, source: toml::de::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}={value:?} is not valid: {message}")]
    Env { var: String, value: String, message: String },
    #[error("configuration is not valid: {0}")]
    Invalid(String),
}

/// Which WeChat endpoint an account's access token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenApi {
    /// `POST /cgi-bin/stable_token`: the same token for every caller until it nears expiry.
    #[default]
    Stable,
    /// `GET /cgi-bin/token`: every call rotates the token (the old one lives 5 more minutes).
    Classic,
}

/// What an account's appid is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// A service or subscription account: template messages and 订阅通知 (`subscribe`).
    #[default]
    OfficialAccount,
    /// A mini program: subscription messages only (`miniprogram_subscribe`).
    Miniprogram,
}

impl AccountKind {
    /// Whether the account can send jobs of `kind`.
    pub fn sends(self, kind: crate::domain::job::JobKind) -> bool {
        use crate::domain::job::JobKind::*;
        matches!(
            (self, kind),
            (AccountKind::OfficialAccount, Template | Subscribe) | (AccountKind::Miniprogram, MiniprogramSubscribe)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::OfficialAccount => "official_account",
            AccountKind::Miniprogram => "miniprogram",
        }
    }
}

/// The kind of RabbitMQ queue wxpush declares for its jobs, delay and dead-letter queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", try_from = "String")]
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

impl TryFrom<String> for QueueType {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// One WeChat official account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub name: String,
    pub appid: String,
    #[serde(default = "empty_secret", serialize_with = "redacted")]
    pub secret: SecretString,
    #[serde(default)]
    pub token_api: TokenApi,
    /// What the appid is: an official account (the default) or a mini program. It decides
    /// which job kinds the account sends.
    #[serde(default)]
    pub kind: AccountKind,
    /// The server-config Token that signs pushes (webhook).
    #[serde(default, serialize_with = "redacted_option")]
    pub callback_token: Option<SecretString>,
    /// The 43-character EncodingAESKey; when set, safe-mode pushes are accepted.
    #[serde(default, serialize_with = "redacted_option")]
    pub encoding_aes_key: Option<SecretString>,
    /// The key before the last rotation, still tried when the current one fails.
    #[serde(default, serialize_with = "redacted_option")]
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

/// What a secret serializes as: never its value, only whether it is set.
const REDACTED: &str = "[REDACTED]";

fn redacted<S: Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if secret.expose_secret().is_empty() { "" } else { REDACTED })
}

fn redacted_option<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => redacted(secret, s),
        None => s.serialize_none(),
    }
}

impl Account {
    /// An account with only its name and appid set (no secret yet, the global rate limit).
    pub fn new(name: impl Into<String>, appid: impl Into<String>) -> Account {
        Account {
            name: name.into(),
            appid: appid.into(),
            secret: empty_secret(),
            token_api: TokenApi::default(),
            kind: AccountKind::default(),
            callback_token: None,
            encoding_aes_key: None,
            previous_encoding_aes_key: None,
            accept_plaintext: false,
            rate_limit: None,
            daily_quota: None,
        }
    }

    /// Sends per second for this account, 0 meaning no limit.
    pub fn effective_rate_limit(&self, global: u32) -> u32 {
        self.rate_limit.unwrap_or(global)
    }
}

/// The access-token protocol's timings (`[token]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSettings {
    /// Refresh a token when less than this is left of its life. Keep it under WeChat's
    /// 5-minute overlap, so a stable_token call made then returns a new token.
    #[serde(rename = "refresh_ahead_secs", with = "duration::secs_f64")]
    pub refresh_ahead: Duration,
    /// Lease of the pool-wide refresh lock: longer than one token request can take.
    #[serde(rename = "lock_ttl_ms", with = "duration::millis")]
    pub lock_ttl: Duration,
    /// How long a send may wait for a token before its job is put back to wait in a delay queue.
    #[serde(rename = "wait_ms", with = "duration::millis")]
    pub wait: Duration,
    /// After a failed token fetch, how long the pool waits before the next one (doubles up
    /// to 5 minutes while failures go on), so a wrong secret does not burn the daily quota.
    #[serde(rename = "failure_backoff_ms", with = "duration::millis")]
    pub failure_backoff: Duration,
    /// Least time between two forced refreshes (`force_refresh=true`) of one appid, pool-wide.
    /// WeChat ignores a forced refresh less than 30 s after the last one.
    #[serde(rename = "forced_refresh_interval_secs", with = "duration::secs")]
    pub forced_refresh_interval: Duration,
    /// Forced refreshes one appid may make per Beijing day, pool-wide. WeChat allows 20, and
    /// each one invalidates the token every worker is using; the rest of the 20 is left for
    /// people (the console, a script) who may need one.
    pub forced_refresh_daily_budget: u32,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            refresh_ahead: Duration::from_secs(240),
            lock_ttl: Duration::from_secs(15),
            wait: Duration::from_secs(10),
            failure_backoff: Duration::from_secs(2),
            forced_refresh_interval: Duration::from_secs(30),
            forced_refresh_daily_budget: 10,
        }
    }
}

/// Retry timings (`[retry]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// First backoff after a transient failure; doubles each attempt, with jitter.
    #[serde(rename = "min_delay_ms", with = "duration::millis")]
    pub min_delay: Duration,
    /// Longest backoff.
    #[serde(rename = "max_delay_ms", with = "duration::millis")]
    pub max_delay: Duration,
    /// Backoffs up to this long are waited in-process; longer ones go through a delay queue so
    /// the job holds no concurrency or prefetch slot while it waits.
    #[serde(rename = "in_process_max_ms", with = "duration::millis")]
    pub in_process_max: Duration,
    /// The delay queues' TTLs, in whole seconds, shortest first: they also name the queues
    /// (`<jobs_queue>.delay.<n>s`).
    pub delay_tiers_secs: Vec<u64>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(300),
            in_process_max: Duration::from_secs(1),
            delay_tiers_secs: vec![1, 5, 30, 120, 600, 3600],
        }
    }
}

/// The webhook's own knobs (`[webhook]`); its addresses are `webhook_listen` and
/// `webhook_admin_listen`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Pushes signed further than this from our clock are refused; `None` (0) = no check.
    #[serde(rename = "timestamp_window_secs", with = "duration::secs_or_none")]
    pub timestamp_window: Option<Duration>,
    /// How long a receipt waits for the worker's msgid record (at most 3 s: WeChat hangs up
    /// after 5).
    #[serde(rename = "msgid_wait_ms", with = "duration::millis")]
    pub msgid_wait: Duration,
    /// How long a published push is remembered (at least a minute: WeChat's re-pushes come
    /// within one).
    #[serde(rename = "dedupe_ttl_secs", with = "duration::secs")]
    pub dedupe_ttl: Duration,
    /// Open connections on the public port at most; more wait to be accepted.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head by then is closed (1 to 60 s).
    #[serde(rename = "header_timeout_secs", with = "duration::secs")]
    pub header_timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            timestamp_window: Some(Duration::from_secs(300)),
            msgid_wait: Duration::from_millis(1_500),
            dedupe_ttl: Duration::from_secs(86_400),
            max_connections: 2_048,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The whole configuration of the programs.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Length of the daily-quota "day"; 86400 s = a Beijing calendar day. Shorter only for
    /// tests and demos.
    #[serde(rename = "quota_day_secs", with = "duration::secs")]
    pub quota_day: Duration,
    /// How long an account pauses after 45011 (minute quota); `None` (0) = until the next
    /// minute, as WeChat asks. Set only for tests and demos.
    #[serde(rename = "minute_pause_secs", with = "duration::secs_or_none")]
    pub minute_pause: Option<Duration>,
    pub webhook_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// The webhook's `/metrics`, `/healthz`, `/readyz`, kept off the port WeChat reaches.
    pub webhook_admin_listen: SocketAddr,
    /// How long in-flight jobs get to finish after SIGTERM/SIGINT.
    #[serde(rename = "shutdown_grace_secs", with = "duration::secs")]
    pub shutdown_grace: Duration,
    /// Timeout of one HTTP request to WeChat.
    #[serde(rename = "http_timeout_ms", with = "duration::millis")]
    pub http_timeout: Duration,
    /// How long msgid → job records live, for the webhook to tie receipts (at least 3 days).
    #[serde(rename = "msgid_ttl_secs", with = "duration::secs")]
    pub msgid_ttl: Duration,
    /// How long a job's recorded success is kept, to answer redeliveries and duplicates.
    #[serde(rename = "ledger_ttl_secs", with = "duration::secs")]
    pub ledger_ttl: Duration,
    /// Lease a worker holds on a job while it sends it, renewed every third of it while the job
    /// is in flight: a crashed worker's jobs are free for the next worker within this time.
    #[serde(rename = "job_lease_ms", with = "duration::millis")]
    pub job_lease: Duration,
    /// Most results the unrouted-results queue (`<results_exchange>.unrouted`) keeps; past
    /// it the oldest are dropped.
    pub unrouted_max_length: u64,
    /// How long a result stays in the unrouted-results queue.
    #[serde(rename = "unrouted_ttl_secs", with = "duration::secs")]
    pub unrouted_ttl: Duration,
    pub webhook: WebhookConfig,
    pub token: TokenSettings,
    pub retry: RetrySettings,
    /// TLS to RabbitMQ and Redis: extra CA bundle, client certificate (`[tls]`).
    pub tls: crate::tls::TlsSettings,
    pub accounts: Vec<Account>,
}

impl Default for Config {
    fn default() -> Self {
        const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
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
            quota_day: Duration::from_secs(86_400),
            minute_pause: None,
            webhook_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9100)),
            webhook_admin_listen: SocketAddr::from(([0, 0, 0, 0], 9101)),
            shutdown_grace: Duration::from_secs(20),
            http_timeout: Duration::from_secs(5),
            msgid_ttl: WEEK,
            ledger_ttl: WEEK,
            job_lease: Duration::from_secs(5),
            unrouted_max_length: 100_000,
            unrouted_ttl: WEEK,
            webhook: WebhookConfig::default(),
            token: TokenSettings::default(),
            retry: RetrySettings::default(),
            tls: crate::tls::TlsSettings::default(),
            accounts: Vec::new(),
        }
    }
}

/// What is wrong with a loaded configuration, and the key it is about (empty when it is about
/// several), so that the error can name the variable that set it.
struct Problem {
    key: &'static str,
    message: String,
}

fn problem(key: &'static str, message: impl Into<String>) -> Result<(), Problem> {
    Err(Problem { key, message: message.into() })
}

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

    /// Builds a configuration from TOML text (`name` says where it came from) and an
    /// environment lookup (tests pass their own).
    pub fn from_sources(
        name: &str,
        toml_text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file: toml::Table =
            toml::from_str(toml_text).map_err(|source| ConfigError::Syntax { path: name.to_owned(), source })?;
        let overrides = env::Overrides::read(&env);
        let mut config: Config = Figment::from(Serialized::defaults(file))
            .merge(Serialized::defaults(&overrides.dict))
            .extract()
            .map_err(|e| overrides.extract_error(name, &e))?;
        env::apply_default_account(&mut config.accounts, &env)?;
        config.validate().map_err(|p| overrides.invalid(p.key, p.message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Problem> {
        self.validate_names()?;
        self.validate_limits()?;
        self.validate_timings()?;
        self.validate_webhook()?;
        self.validate_accounts()
    }

    fn validate_names(&self) -> Result<(), Problem> {
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return problem("redis_prefix", "must be non-empty and free of braces");
        }
        for (key, name) in [
            ("jobs_queue", &self.jobs_queue),
            ("results_exchange", &self.results_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 200 {
                return problem(key, "must be 1 to 200 characters (queue and exchange names are at most 255 bytes)");
            }
        }
        if self.jobs_queue == self.dead_letter_queue {
            return problem("", "jobs_queue and dead_letter_queue must differ");
        }
        if self.amqp_url.split(',').all(|u| u.trim().is_empty()) {
            return problem("amqp_url", "must name at least one broker");
        }
        if let Err(e) = url::Url::parse(&self.wechat_api_base) {
            return problem("wechat_api_base", format!("{:?} is not a URL: {e}", self.wechat_api_base));
        }
        self.tls.validate().or_else(|e| problem("", e.to_string()))
    }

    fn validate_limits(&self) -> Result<(), Problem> {
        if self.concurrency == 0 {
            return problem("concurrency", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return problem("max_attempts", "must be at least 1");
        }
        if self.delivery_limit == 0 {
            return problem("delivery_limit", "must be at least 1 (deliveries of a job before it is dead-lettered)");
        }
        if !(0.0..=0.1).contains(&self.rate_burst) {
            return problem(
                "rate_burst",
                format!("{} must be between 0 and 0.1: a burst may add at most 10 % to the rate", self.rate_burst),
            );
        }
        if self.unrouted_max_length == 0 {
            return problem(
                "unrouted_max_length",
                "must be at least 1: the unrouted-results queue keeps what no consumer's binding took",
            );
        }
        if self.token.forced_refresh_daily_budget > 20 {
            return problem(
                "token.forced_refresh_daily_budget",
                format!(
                    "{} must be at most 20, WeChat's daily limit (keep some for people)",
                    self.token.forced_refresh_daily_budget
                ),
            );
        }
        Ok(())
    }

    fn validate_timings(&self) -> Result<(), Problem> {
        if self.token.forced_refresh_interval < Duration::from_secs(30) {
            return problem(
                "token.forced_refresh_interval_secs",
                "must be at least 30: WeChat ignores forced refreshes closer together",
            );
        }
        if self.unrouted_ttl.is_zero() {
            return problem("unrouted_ttl_secs", "must be at least 1: results live this long in the unrouted queue");
        }
        if self.quota_day.is_zero() {
            return problem("quota_day_secs", "must be at least 1 (86400 = a Beijing day)");
        }
        if self.job_lease < Duration::from_secs(1) {
            return problem(
                "job_lease_ms",
                "must be at least 1000: the lease is renewed every third of it, and a shorter one could run out \
                 under a moment of load and let a second worker send the job",
            );
        }
        let tiers = &self.retry.delay_tiers_secs;
        if tiers.is_empty() || tiers.windows(2).any(|w| w[0] >= w[1]) || tiers.contains(&0) {
            return problem("retry.delay_tiers_secs", "must be a non-empty list of increasing seconds, none 0");
        }
        if self.msgid_ttl < Duration::from_secs(3 * 24 * 3600) {
            return problem("msgid_ttl_secs", "must be at least 259200 (3 days): WeChat may push a receipt days later");
        }
        Ok(())
    }

    fn validate_webhook(&self) -> Result<(), Problem> {
        if self.webhook.msgid_wait > Duration::from_secs(3) {
            return problem("webhook.msgid_wait_ms", "must be at most 3000: WeChat hangs up after 5 s");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.webhook.header_timeout) {
            return problem(
                "webhook.header_timeout_secs",
                "must be 1 to 60 seconds: WeChat sends its request at once and hangs up after 5 s",
            );
        }
        Ok(())
    }

    fn validate_accounts(&self) -> Result<(), Problem> {
        let mut names = BTreeSet::new();
        for a in &self.accounts {
            if a.name.is_empty() || !a.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return problem(
                    "",
                    format!("account name {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'", a.name),
                );
            }
            if !names.insert(a.name.as_str()) {
                return problem("", format!("account {:?} is configured twice", a.name));
            }
            if a.appid.is_empty() || a.appid.contains(['{', '}', ':']) {
                return problem(
                    "",
                    format!("account {:?}: appid must be non-empty and free of braces and colons", a.name),
                );
            }
        }
        Ok(())
    }

    /// The account called `name`, if configured.
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name == name)
    }

    /// The configuration as TOML, as a file would give it: secrets shown as `[REDACTED]` when
    /// set, passwords in the RabbitMQ and Redis URLs as `***`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(&self.redacted()).unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"))
    }

    /// A copy for display: the URLs' passwords replaced (secrets serialize redacted anyway).
    pub fn redacted(&self) -> Config {
        Config {
            amqp_url: crate::amqp::redact_url(&self.amqp_url),
            redis_url: crate::amqp::redact_url(&self.redis_url),
            ..self.clone()
        }
    }
}

/// The `[tls]` settings the environment alone gives (for a program that loaded no
/// configuration); the rest of the environment is not read.
pub fn tls_from_env() -> Result<crate::tls::TlsSettings, ConfigError> {
    let overrides = env::Overrides::read(&|var| std::env::var(var).ok());
    if !overrides.dict.contains_key("tls") {
        return Ok(crate::tls::TlsSettings::default());
    }
    Figment::from(Serialized::defaults(&overrides.dict))
        .extract_inner("tls")
        .map_err(|e| overrides.extract_error("(environment)", &e))
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
        assert!(e.contains("delivery_limit (WXPUSH_DELIVERY_LIMIT) must be at least 1"), "{e}");
        let e = Config::from_sources("t", "", env(&[("WXPUSH_AMQP_URL", " , ")])).unwrap_err().to_string();
        assert!(e.contains("at least one broker"), "{e}");
    }

    #[test]
    fn the_documented_reference_file_loads_and_shows_every_key() {
        let text = include_str!("../../config/default.toml");
        let c = Config::from_sources("config/default.toml", text, env(&[])).unwrap();
        assert_eq!(c.jobs_queue, "wxpush.jobs");
        for (var, key) in ENV_VARS {
            let (section, leaf) = key.rsplit_once('.').unwrap_or(("", key));
            if section.starts_with("accounts") {
                assert!(text.contains(var.as_str()), "config/default.toml does not mention {var}");
                continue;
            }
            let shown = text.lines().any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{leaf} = ")));
            assert!(shown, "config/default.toml does not show the key {key}");
            if !section.is_empty() {
                assert!(text.contains(&format!("[{section}]")), "config/default.toml has no [{section}]");
            }
        }
    }

    #[test]
    fn every_key_is_overridden_by_its_variable() {
        let pairs = [
            ("WXPUSH_TOKEN__REFRESH_AHEAD_SECS", "1.5"),
            ("WXPUSH_RETRY__DELAY_TIERS_SECS", "2,4,8"),
            ("WXPUSH_HTTP_TIMEOUT_MS", "750"),
            ("WXPUSH_MINUTE_PAUSE_SECS", "3"),
            ("WXPUSH_WEBHOOK_TIMESTAMP_WINDOW_SECS", "0"),
            ("WXPUSH_WEBHOOK__MAX_CONNECTIONS", "100"),
            ("WXPUSH_TLS_CA_FILE", "/etc/ca.pem"),
            ("WXPUSH_TLS_CERT_FILE", ""),
            ("WXPUSH_JOBS_QUEUE", "0123"),
        ];
        let c = Config::from_sources("t", "[tls]\nca_file = \"from-file.pem\"\n", env(&pairs)).unwrap();
        assert_eq!(c.token.refresh_ahead, Duration::from_millis(1500));
        assert_eq!(c.retry.delay_tiers_secs, [2, 4, 8]);
        assert_eq!(c.http_timeout, Duration::from_millis(750));
        assert_eq!(c.minute_pause, Some(Duration::from_secs(3)));
        assert_eq!((c.webhook.timestamp_window, c.webhook.max_connections), (None, 100));
        assert_eq!(c.tls.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(c.tls.cert_file, None, "an empty variable changes nothing");
        assert_eq!(c.jobs_queue, "0123", "text stays text, even when it looks like a number");
        let e = Config::from_sources("t", "", env(&[("WXPUSH_RETRY__MIN_DELAY_MS", "5m")])).unwrap_err().to_string();
        assert!(e.contains("WXPUSH_RETRY__MIN_DELAY_MS=\"5m\"") && e.contains("whole number of milliseconds"), "{e}");
        let e = Config::from_sources("t", "", env(&[("WXPUSH_WEBHOOK_HEADER_TIMEOUT_SECS", "0")])).unwrap_err();
        assert!(e.to_string().contains("WXPUSH_WEBHOOK_HEADER_TIMEOUT_SECS=\"0\""), "the variable as it was set: {e}");
        let e = Config::from_sources("t", "", env(&[("WXPUSH_WEBHOOK_MSGID_WAIT_MS", "10000")])).unwrap_err();
        assert!(e.to_string().contains("5 s"), "{e}");
    }

    #[test]
    fn durations_keep_their_keys_and_units() {
        let c = Config::from_sources(
            "t",
            "http_timeout_ms = 250\nshutdown_grace_secs = 3\n[token]\nrefresh_ahead_secs = 0.3\n[retry]\nmin_delay_ms = 20\n",
            env(&[]),
        )
        .unwrap();
        assert_eq!((c.http_timeout, c.shutdown_grace), (Duration::from_millis(250), Duration::from_secs(3)));
        assert_eq!((c.token.refresh_ahead, c.retry.min_delay), (Duration::from_millis(300), Duration::from_millis(20)));
        assert_eq!(c.webhook.timestamp_window, Some(Duration::from_secs(300)));
        let e = Config::from_sources("f.toml", "[retry]\nmax_delay_ms = -1\n", env(&[])).unwrap_err().to_string();
        assert!(e.contains("f.toml") && e.contains("retry.max_delay_ms"), "{e}");
    }

    #[test]
    fn the_redacted_toml_loads_back_and_shows_no_secret() {
        let c = Config::from_sources(
            "t",
            "amqp_url = \"amqp://u:pa55word@h:5672/%2f\"\n[[accounts]]\nname = \"shop\"\nappid = \"wxB\"\nsecret = \"s3cret-value\"\n",
            env(&[("WXPUSH_CALLBACK_TOKEN", "cb-t0ken"), ("WXPUSH_APPID", "wx1")]),
        )
        .unwrap();
        let shown = c.to_redacted_toml();
        for secret in ["pa55word", "s3cret-value", "cb-t0ken"] {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        }
        assert!(shown.contains("[REDACTED]") && shown.contains("http_timeout_ms = 5000"), "{shown}");
        let back = Config::from_sources("shown", &shown, env(&[])).unwrap();
        assert_eq!(back.to_redacted_toml(), shown, "what check prints is a configuration file");
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
        assert!(err("concurrency = ", &[]).contains("f.toml is not valid TOML"));
        assert!(err("concurency = 3", &[]).ends_with("unknown field `concurency`"));
        assert!(err("[tls]\nca_fil = \"x\"", &[]).ends_with("unknown field `ca_fil` in [tls]"));
        assert!(err("", &[("WXPUSH_APPSECRET", "x")]).contains("set WXPUSH_APPID"));
        let twice = "[[accounts]]\nname=\"a\"\nappid=\"x\"\n[[accounts]]\nname=\"a\"\nappid=\"y\"\n";
        assert!(err(twice, &[]).contains("configured twice"));
        assert!(err("msgid_ttl_secs = 60", &[]).contains("3 days"));
        assert!(err("wechat_api_base = \"not a url\"", &[]).contains("not a URL"));
    }
}
