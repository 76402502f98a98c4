//! `wxpush-ctl check`: is this configuration ready to run a pool? Lists the accounts (which
//! credentials are set, never their values) and flags what cannot be right (a malformed appid, a
//! placeholder key), asks WeChat for a token per account (unless offline), then tries RabbitMQ
//! and Redis.

use futures_util::future::join_all;
use secrecy::{ExposeSecret, SecretString};

use super::{RPC_TIMEOUT, broker, scrub, status::redact_redis_url};
use crate::{
    amqp::{Topology, redact_url},
    config::{Account, Config, QueueType, TokenApi},
    domain::{crypto::Cipher, errcode::token_error_advice},
    store::Redis,
    telemetry::chain,
    wechat::{TokenFetchError, WechatClient},
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

/// What `check` may do besides reading the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Do not ask WeChat for tokens (a machine without access to WeChat, or to save calls).
    pub offline: bool,
}

/// Checks an already loaded configuration (loading it is the caller's first check), asking
/// WeChat for a token per account.
pub async fn check(config: &Config) -> CheckReport {
    check_with(config, CheckOptions::default()).await
}

/// [`check`], with options.
pub async fn check_with(config: &Config, options: CheckOptions) -> CheckReport {
    let mut report = CheckReport::default();
    accounts(config, &mut report);
    if options.offline {
        report.push(Level::Note, "offline: no token was asked of WeChat, so the credentials are not proven");
    } else {
        tokens(config, &mut report).await;
    }
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
        let api = api_name(a.token_api);
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
    if !is_appid(&a.appid) {
        report.push(
            Level::Problem,
            format!(
                "account {}: appid {:?} is not a WeChat appid (\"wx\" and 16 lowercase hex digits, as the MP console \
                 shows it under 设置与开发 → 基本配置); set WXPUSH_APPID (account `default`) or `appid`",
                a.name, a.appid
            ),
        );
    }
    for (field, value) in [("secret", Some(&a.secret)), ("callback_token", a.callback_token.as_ref())] {
        if let Some(value) = value
            && let Some(why) = placeholder_word(value.expose_secret())
        {
            report.push(
                Level::Problem,
                format!("account {}: {field} is a placeholder ({why}); put the real value from the MP console", a.name),
            );
        }
    }
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
        let Some(key) = key else { continue };
        let key = key.expose_secret();
        let wrong = match Cipher::new(key) {
            Err(e) => Some(format!("is not valid: {}", chain(&e))),
            Ok(_) => placeholder_aes_key(key).map(|why| format!("is a placeholder ({why})")),
        };
        if let Some(wrong) = wrong {
            report.push(
                Level::Problem,
                format!(
                    "account {}: {field} {wrong}; copy the EncodingAESKey from the MP console (43 characters; \
                     WXPUSH_ENCODING_AES_KEY for `default`)",
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

/// Whether `appid` has the form of a WeChat appid: `wx` and 16 lowercase hex digits.
pub fn is_appid(appid: &str) -> bool {
    appid.len() == 18
        && appid.starts_with("wx")
        && appid.bytes().skip(2).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Words that only a template or an example puts where a credential belongs.
const PLACEHOLDER_WORDS: &[&str] = &["changeme", "placeholder", "replaceme", "yourkey", "yoursecret", "example"];

/// Why `value` is a placeholder rather than a credential, if it names itself one.
pub fn placeholder_word(value: &str) -> Option<String> {
    let folded: String = value.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    PLACEHOLDER_WORDS.iter().find(|w| folded.contains(*w)).map(|w| format!("it contains {w:?}"))
}

/// Why a well-formed EncodingAESKey is still not one the MP console generated. The console draws
/// 43 random characters from 62: a run of 6 equal or 6 consecutive characters, or fewer than 12
/// distinct ones, has odds below one in ten million there, and is what templates and samples
/// look like (`CHANGEME000…`, `aaaa…`, WeChat's documented `abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG`).
pub fn placeholder_aes_key(key: &str) -> Option<String> {
    if let Some(why) = placeholder_word(key) {
        return Some(why);
    }
    let bytes = key.as_bytes();
    let longest_run = |same: fn(u8, u8) -> bool| {
        let (mut longest, mut run) = (1, 1);
        for w in bytes.windows(2) {
            run = if same(w[0], w[1]) { run + 1 } else { 1 };
            longest = usize::max(longest, run);
        }
        longest
    };
    if longest_run(|a, b| a == b) >= 6 {
        return Some("a character repeated 6 times or more".into());
    }
    if longest_run(|a, b| a.checked_add(1) == Some(b)) >= 6 {
        return Some("6 or more consecutive characters, as in WeChat's documentation sample".into());
    }
    let distinct = bytes.iter().collect::<std::collections::BTreeSet<_>>().len();
    if distinct < 12 {
        return Some(format!("only {distinct} different characters"));
    }
    None
}

/// Asks WeChat for a token for every account with a secret, all at once.
async fn tokens(config: &Config, report: &mut CheckReport) {
    let client = match WechatClient::new(&config.wechat_api_base, config.http_timeout) {
        Ok(c) => c,
        Err(e) => {
            report.push(Level::Problem, format!("cannot ask WeChat for tokens: {}", chain(&e)));
            return;
        }
    };
    let asked = config.accounts.iter().filter(|a| !a.secret.expose_secret().is_empty());
    let answers = join_all(asked.map(|a| {
        let client = &client;
        async move { (a, client.fetch_token(a.token_api, &a.appid, &a.secret, false).await) }
    }))
    .await;
    for (a, answer) in answers {
        let api = api_name(a.token_api);
        match answer {
            Ok(grant) => {
                let rotated = match a.token_api {
                    TokenApi::Stable => "",
                    // Every /cgi-bin/token call rotates the token; the pool's old one stays
                    // valid 5 more minutes and a worker replaces it on its first refusal.
                    TokenApi::Classic => "; note: this rotated the account's token (the pool's stays valid 5 min)",
                };
                report.push(
                    Level::Ok,
                    format!(
                        "account {}: WeChat granted a token ({api}, valid {} s){rotated}",
                        a.name,
                        grant.expires_in.as_secs()
                    ),
                );
            }
            Err(TokenFetchError::Refused { errcode, errmsg }) => {
                let errmsg = scrub(&errmsg, &[a.secret.expose_secret()]);
                let advice = token_error_advice(errcode)
                    .unwrap_or("no retry will help until this is fixed; look the errcode up in WeChat's documentation");
                report.push(
                    Level::Problem,
                    format!(
                        "account {}: WeChat refused the token request ({api}): errcode {errcode} ({errmsg}): {advice}",
                        a.name
                    ),
                );
            }
            Err(TokenFetchError::Http(e)) => report.push(
                Level::Problem,
                format!(
                    "account {}: no token from WeChat at {} ({api}): {}; check WXPUSH_WECHAT_API_BASE and that this \
                     machine may reach it (or run `check --offline`)",
                    a.name,
                    config.wechat_api_base,
                    chain(&e)
                ),
            ),
        }
    }
}

fn api_name(api: TokenApi) -> &'static str {
    match api {
        TokenApi::Stable => "stable_token",
        TokenApi::Classic => "token (classic)",
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
            report.push(Level::Problem, format!("RabbitMQ: {}", chain(&e)));
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
            Err(e) => report.push(Level::Problem, format!("{what} {name}: {}", chain(&e))),
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
        Err(e) => report.push(Level::Problem, format!("results exchange {}: {}", config.results_exchange, chain(&e))),
    }
    let unrouted = super::results::unrouted_queue(config);
    match broker::queue_info(&connection, &unrouted).await {
        Ok(Some(q)) if q.messages > 0 => report.push(
            Level::Note,
            format!(
                "{} results no binding took are kept in {unrouted}: bind your consumers' queues to {} \
                 (`wxpush-ctl results` shows them)",
                q.messages, config.results_exchange
            ),
        ),
        Ok(_) => {}
        Err(e) => report.push(Level::Problem, format!("queue {unrouted}: {}", chain(&e))),
    }
    // A queue declared before with other arguments (another queue type) stops the workers.
    for (name, args) in topology.queues() {
        match broker::queue_matches(&connection, &name, args).await {
            Ok(Some(Err(e))) => report.push(Level::Problem, chain(&e).to_string()),
            Ok(_) => {}
            Err(e) => report.push(Level::Problem, format!("queue {name}: {}", chain(&e))),
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
        Ok(Err(e)) => report.push(Level::Problem, format!("Redis {url}: {}", chain(&e))),
        Err(_) => report.push(
            Level::Problem,
            format!("Redis {url}: no answer within {} s (is it up and WXPUSH_REDIS_URL right?)", RPC_TIMEOUT.as_secs()),
        ),
    }
}

impl CheckReport {
    /// The findings as JSON: `{"passed": bool, "findings": [{"level": "ok"|"note"|"problem", "text"}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let findings: Vec<serde_json::Value> = self
            .findings
            .iter()
            .map(|f| {
                let level = match f.level {
                    Level::Ok => "ok",
                    Level::Note => "note",
                    Level::Problem => "problem",
                };
                serde_json::json!({"level": level, "text": f.text})
            })
            .collect();
        serde_json::json!({"passed": self.passed(), "findings": findings})
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appids_are_wx_and_16_lowercase_hex_digits() {
        assert!(is_appid("wx0123456789abcdef"));
        for bad in ["wx1", "wx0123456789ABCDEF", "wx0123456789abcdeg", "wy0123456789abcdef", "wx0123456789abcdef0", ""]
        {
            assert!(!is_appid(bad), "{bad}");
        }
    }

    #[test]
    fn placeholder_aes_keys_are_caught_and_random_ones_are_not() {
        for placeholder in [
            "CHANGEME0000000000000000000000000000000000a", // deploy/kubernetes/secret.yaml
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", // WeChat's documentation sample
            "abababababababababababababababababababababa",
            "YourKeyGoesHere0Qx7Lm2Pz9Rk4Ws1Vd8Nb3Hj5Tg6",
        ] {
            assert!(placeholder_aes_key(placeholder).is_some(), "{placeholder}");
            assert!(Cipher::new(placeholder).is_ok(), "well formed, so only this check catches it: {placeholder}");
        }
        for real in ["kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR", "Q8fXk2Lm9Pz4Rv7Ws1Td3Yb6Nh0Jc5Gq8Ue2Ia4Ko7S"] {
            assert_eq!(placeholder_aes_key(real), None, "{real}");
        }
        assert!(placeholder_word("CHANGE-ME-appsecret").is_some());
        assert_eq!(placeholder_word("3d6a0f8c2b7e4d1a9c5f0e8b7a6d3c21"), None);
    }
}
