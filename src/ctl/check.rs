//! `wxpush-ctl check`: is this configuration ready to run a pool? Lists the accounts (which
//! credentials are set, never their values), then tries RabbitMQ and Redis.

use secrecy::{ExposeSecret, SecretString};

use super::{RPC_TIMEOUT, broker, status::redact_redis_url};
use crate::{
    amqp::{Topology, redact_url},
    config::{Account, Config, QueueType, TokenApi},
    domain::crypto::Cipher,
    store::Redis,
};

/// How a checked item came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Worth knowing, not wrong.
    Note,
    /// Must be fixed; makes `check` fail.
    Problem,
}

/// One line of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

/// Everything `check` found, in order.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub findings: Vec<Finding>,
}

impl CheckReport {
    fn push(&mut self, level: Level, text: impl Into<String>) {
        self.findings.push(Finding { level, text: text.into() });
    }

    pub fn problems(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Problem)
    }

    pub fn passed(&self) -> bool {
        self.problems().next().is_none()
    }
}

/// Checks an already loaded configuration (loading it is the caller's first check).
pub async fn check(config: &Config) -> CheckReport {
    let mut report = CheckReport::default();
    accounts(config, &mut report);
    rabbitmq(config, &mut report).await;
    redis(config, &mut report).await;
    report
}

fn accounts(config: &Config, report: &mut CheckReport) {
    if config.accounts.is_empty() {
        report.push(
            Level::Problem,
            "no account configured: set WXPUSH_APPID and WXPUSH_APPSECRET, or add [[accounts]] to the config file",
        );
        return;
    }
    report.push(Level::Ok, format!("{} account(s); WeChat API at {}", config.accounts.len(), config.wechat_api_base));
    for a in &config.accounts {
        let limit = match a.effective_rate_limit(config.rate_limit) {
            0 => "no rate limit".to_owned(),
            n => format!("{n} sends/s"),
        };
        let quota =
            a.daily_quota.filter(|q| *q > 0).map_or_else(|| "no daily quota".into(), |q| format!("{q} sends/day"));
        let api = match a.token_api {
            TokenApi::Stable => "stable_token",
            TokenApi::Classic => "token (classic)",
        };
        report.push(
            Level::Ok,
            format!(
                "account {}: appid {}, token api {api}, {limit}, {quota}; secret {}, callback token {}, AES key {}",
                a.name,
                a.appid,
                set(Some(&a.secret)),
                set(a.callback_token.as_ref()),
                set(a.encoding_aes_key.as_ref()),
            ),
        );
        account_problems(a, report);
    }
}

fn account_problems(a: &Account, report: &mut CheckReport) {
    if a.secret.expose_secret().is_empty() {
        report.push(
            Level::Problem,
            format!(
                "account {}: no secret, so no token can be fetched and its jobs wait; set WXPUSH_APPSECRET (account \
                 `default`) or `secret` in its [[accounts]] entry",
                a.name
            ),
        );
    }
    for (field, key) in
        [("encoding_aes_key", &a.encoding_aes_key), ("previous_encoding_aes_key", &a.previous_encoding_aes_key)]
    {
        if let Some(key) = key
            && let Err(e) = Cipher::new(key.expose_secret())
        {
            report.push(
                Level::Problem,
                format!(
                    "account {}: {field} is not valid: {e}; copy it again from the WeChat console (WXPUSH_ENCODING_AES_KEY \
                     for `default`)",
                    a.name
                ),
            );
        }
    }
    if a.encoding_aes_key.is_some() && a.callback_token.is_none() {
        report.push(
            Level::Problem,
            format!(
                "account {}: an AES key without a callback token: the webhook cannot verify pushes; set \
                 WXPUSH_CALLBACK_TOKEN (account `default`) or `callback_token`",
                a.name
            ),
        );
    }
}

fn set(secret: Option<&SecretString>) -> &'static str {
    match secret {
        Some(s) if !s.expose_secret().is_empty() => "set",
        _ => "not set",
    }
}

async fn rabbitmq(config: &Config, report: &mut CheckReport) {
    let url = redact_url(&config.amqp_url);
    let connection = match broker::connect(config, "check").await {
        Ok(c) => c,
        Err(e) => {
            report.push(Level::Problem, format!("RabbitMQ: {e}"));
            return;
        }
    };
    report.push(Level::Ok, format!("RabbitMQ {url}: connected"));
    let topology = Topology::from_config(config);
    report.push(
        Level::Ok,
        match config.queue_type {
            QueueType::Quorum => format!("queues: quorum, delivery limit {}", config.delivery_limit),
            QueueType::Classic => "queues: classic".to_owned(),
        },
    );
    for (what, name) in [("jobs queue", &config.jobs_queue), ("dead-letter queue", &config.dead_letter_queue)] {
        match broker::queue_info(&connection, name).await {
            Ok(Some(q)) => {
                report.push(Level::Ok, format!("{what} {name}: {} messages, {} consumers", q.messages, q.consumers))
            }
            Ok(None) => report
                .push(Level::Note, format!("{what} {name} does not exist yet: a worker declares it when it starts")),
            Err(e) => report.push(Level::Problem, format!("{what} {name}: {e}")),
        }
    }
    match broker::exchange_exists(&connection, &config.results_exchange).await {
        Ok(true) => report.push(Level::Ok, format!("results exchange {}: exists", config.results_exchange)),
        Ok(false) => report.push(
            Level::Note,
            format!(
                "results exchange {} does not exist yet: a worker declares it when it starts",
                config.results_exchange
            ),
        ),
        Err(e) => report.push(Level::Problem, format!("results exchange {}: {e}", config.results_exchange)),
    }
    // A queue declared before with other arguments (another queue type) stops the workers.
    for (name, args) in topology.queues() {
        match broker::queue_matches(&connection, &name, args).await {
            Ok(Some(Err(e))) => report.push(Level::Problem, e.to_string()),
            Ok(_) => {}
            Err(e) => report.push(Level::Problem, format!("queue {name}: {e}")),
        }
    }
    broker::close(&connection).await;
}

async fn redis(config: &Config, report: &mut CheckReport) {
    let url = redact_redis_url(&config.redis_url);
    let pinged = tokio::time::timeout(RPC_TIMEOUT, async {
        let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
        redis.ping().await
    })
    .await;
    match pinged {
        Ok(Ok(())) => {
            report.push(Level::Ok, format!("Redis {url}: PING answered (key prefix {:?})", config.redis_prefix))
        }
        Ok(Err(e)) => report.push(Level::Problem, format!("Redis {url}: {e}")),
        Err(_) => report.push(
            Level::Problem,
            format!("Redis {url}: no answer within {} s (is it up and WXPUSH_REDIS_URL right?)", RPC_TIMEOUT.as_secs()),
        ),
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for finding in &self.findings {
            let mark = match finding.level {
                Level::Ok => "  ok ",
                Level::Note => "note ",
                Level::Problem => "FAIL ",
            };
            writeln!(f, "{mark} {}", finding.text)?;
        }
        let problems = self.problems().count();
        if problems == 0 {
            writeln!(f, "all checks passed")
        } else {
            writeln!(f, "{problems} problem(s) to fix (the FAIL lines above)")
        }
    }
}
