//! wxpush-sandbox: a local stand-in for api.weixin.qq.com (token, stable_token, template/send,
//! subscribe/bizsend and subscribe/send with their consents, receipts and events pushed to a
//! webhook, fault injection). Point the worker at it with
//! `WXPUSH_WECHAT_API_BASE=http://127.0.0.1:9300`.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use wxpush::{
    sandbox::{
        AccountKind, Consent, EventFormat, Faults, ReceiptSettings, Sandbox, SandboxAccount, SandboxConfig, Stats,
        WebhookTarget,
    },
    telemetry::{self, Program},
};

const DEMO_ACCOUNT: &str = "wxdemo0123456789:demo-secret";

#[derive(Debug, Parser)]
#[command(name = "wxpush-sandbox", version, about = "A local stand-in for api.weixin.qq.com")]
struct Cli {
    /// Address to serve on.
    #[arg(long, env = "WXPUSH_SANDBOX_LISTEN", default_value = "127.0.0.1:9300")]
    listen: SocketAddr,

    /// An account as `appid:secret`; repeatable. Default: WXPUSH_APPID/WXPUSH_APPSECRET when set,
    /// else the demo account `wxdemo0123456789:demo-secret`.
    #[arg(long = "account", env = "WXPUSH_SANDBOX_ACCOUNTS", value_delimiter = ',', hide_env_values = true)]
    accounts: Vec<String>,

    /// Where an account's receipts are pushed, as `appid=URL`; a bare URL applies to every
    /// account. Repeatable.
    #[arg(long = "webhook", env = "WXPUSH_SANDBOX_WEBHOOKS", value_delimiter = ',')]
    webhooks: Vec<String>,

    /// An --account that is a mini program (subscribe/send only); repeatable.
    #[arg(long = "miniprogram", env = "WXPUSH_SANDBOX_MINIPROGRAMS", value_delimiter = ',')]
    miniprograms: Vec<String>,

    /// An --account whose events are pushed as JSON instead of XML; repeatable.
    #[arg(long = "json-events", env = "WXPUSH_SANDBOX_JSON_EVENTS", value_delimiter = ',')]
    json_events: Vec<String>,

    /// An --account (or `all`) whose recipients start with a long-term consent to every
    /// template, so that subscription sends succeed without granting first; repeatable.
    /// Default: none, as WeChat (43101 until a consent is granted through the admin API).
    #[arg(long = "auto-consent", env = "WXPUSH_SANDBOX_AUTO_CONSENT", value_delimiter = ',')]
    auto_consent: Vec<String>,

    /// A mini program page as `appid=pages/index/index`; repeatable. An account with pages
    /// answers 41030 to a subscribe/send whose `page` is not one of them; without, any page.
    #[arg(long = "page", env = "WXPUSH_SANDBOX_PAGES", value_delimiter = ',')]
    pages: Vec<String>,

    /// The server-config Token that signs receipt pushes.
    #[arg(long, env = "WXPUSH_CALLBACK_TOKEN", hide_env_values = true)]
    callback_token: Option<String>,

    /// The 43-character EncodingAESKey; when set, receipts are pushed in safe mode.
    #[arg(long, env = "WXPUSH_ENCODING_AES_KEY", hide_env_values = true)]
    encoding_aes_key: Option<String>,

    /// Life of an access token (WeChat: 7200).
    #[arg(long, env = "WXPUSH_SANDBOX_TOKEN_LIFETIME_SECS", default_value_t = 7200)]
    token_lifetime_secs: u64,

    /// How long the old token stays valid after a refresh (WeChat: 300; at most half the lifetime).
    #[arg(long, env = "WXPUSH_SANDBOX_TOKEN_OVERLAP_SECS", default_value_t = 300)]
    token_overlap_secs: u64,

    /// Added to every template send.
    #[arg(long, env = "WXPUSH_SANDBOX_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,

    /// Fraction of sends answered errcode -1.
    #[arg(long, env = "WXPUSH_SANDBOX_SYSTEM_ERROR_RATE", default_value_t = 0.0)]
    system_error_rate: f64,

    /// Fraction of sends answered HTTP 503.
    #[arg(long, env = "WXPUSH_SANDBOX_HTTP_503_RATE", default_value_t = 0.0)]
    http_503_rate: f64,

    /// Fraction of sends answered 40001 whatever the token (WeChat refusing the tokens it hands out).
    #[arg(long, env = "WXPUSH_SANDBOX_TOKEN_REFUSED_RATE", default_value_t = 0.0)]
    token_refused_rate: f64,

    /// Fraction of accepted sends whose answer comes `--slow-ms` late.
    #[arg(long, env = "WXPUSH_SANDBOX_SLOW_RATE", default_value_t = 0.0)]
    slow_rate: f64,

    #[arg(long, env = "WXPUSH_SANDBOX_SLOW_MS", default_value_t = 0)]
    slow_ms: u64,

    /// Accepted sends per appid per second beyond which sends answer 45011.
    #[arg(long, env = "WXPUSH_SANDBOX_PER_SECOND_CAP")]
    per_second_cap: Option<u32>,

    /// Accepted sends per appid per day beyond which sends answer 45009.
    #[arg(long, env = "WXPUSH_SANDBOX_DAILY_CAP")]
    daily_cap: Option<u64>,

    /// Seed of the fault decisions, for repeatable runs.
    #[arg(long, env = "WXPUSH_SANDBOX_SEED")]
    seed: Option<u64>,

    /// Delay between accepting a message and pushing its receipt.
    #[arg(long, env = "WXPUSH_SANDBOX_RECEIPT_DELAY_MS", default_value_t = 500)]
    receipt_delay_ms: u64,

    /// How long a receipt push waits for `success` before it counts as unanswered.
    #[arg(long, env = "WXPUSH_SANDBOX_RECEIPT_TIMEOUT_MS", default_value_t = 5000)]
    receipt_timeout_ms: u64,

    /// Pushes after the first when a receipt is not answered.
    #[arg(long, env = "WXPUSH_SANDBOX_MAX_REPUSHES", default_value_t = 3)]
    max_repushes: u32,
}

fn accounts(cli: &Cli) -> anyhow::Result<Vec<SandboxAccount>> {
    let specs: Vec<String> = if !cli.accounts.is_empty() {
        cli.accounts.clone()
    } else {
        match (std::env::var("WXPUSH_APPID"), std::env::var("WXPUSH_APPSECRET")) {
            (Ok(appid), Ok(secret)) if !appid.is_empty() && !secret.is_empty() => vec![format!("{appid}:{secret}")],
            _ => vec![DEMO_ACCOUNT.to_owned()],
        }
    };
    let mut accounts = Vec::new();
    for spec in values(&specs) {
        // Only the appid is named: the secret must not reach the terminal or a log.
        let Some((appid, secret)) = spec.split_once(':') else {
            bail!(
                "--account must be appid:secret (got one without ':' starting {:?})",
                spec.chars().take(4).collect::<String>()
            );
        };
        accounts.push(SandboxAccount::new(appid.trim(), secret.trim()));
    }

    webhooks(cli, &mut accounts)?;
    subscription_settings(cli, &mut accounts)?;
    Ok(accounts)
}

/// The account named by a flag's value.
fn named<'a>(accounts: &'a mut [SandboxAccount], appid: &str, flag: &str) -> anyhow::Result<&'a mut SandboxAccount> {
    accounts
        .iter_mut()
        .find(|a| a.appid == appid)
        .with_context(|| format!("--{flag} names appid {appid:?}, which is not an --account"))
}

fn values(list: &[String]) -> impl Iterator<Item = &str> {
    list.iter().map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn webhooks(cli: &Cli, accounts: &mut [SandboxAccount]) -> anyhow::Result<()> {
    for hook in values(&cli.webhooks) {
        let token = cli.callback_token.clone().context("--webhook needs --callback-token (WXPUSH_CALLBACK_TOKEN)")?;
        let target = |url: &str| WebhookTarget {
            url: url.to_owned(),
            token: token.clone(),
            encoding_aes_key: cli.encoding_aes_key.clone(),
        };
        if hook.starts_with("http://") || hook.starts_with("https://") {
            for a in accounts.iter_mut() {
                a.webhook = Some(target(hook));
            }
        } else {
            let (appid, url) = hook.split_once('=').context("--webhook must be appid=URL or a URL")?;
            named(accounts, appid, "webhook")?.webhook = Some(target(url));
        }
    }
    Ok(())
}

/// --miniprogram, --json-events, --auto-consent, --page.
fn subscription_settings(cli: &Cli, accounts: &mut [SandboxAccount]) -> anyhow::Result<()> {
    for appid in values(&cli.miniprograms) {
        named(accounts, appid, "miniprogram")?.kind = AccountKind::Miniprogram;
    }
    for appid in values(&cli.json_events) {
        named(accounts, appid, "json-events")?.event_format = EventFormat::Json;
    }
    for appid in values(&cli.auto_consent) {
        if appid == "all" {
            accounts.iter_mut().for_each(|a| a.auto_consent = Some(Consent::LongTerm));
        } else {
            named(accounts, appid, "auto-consent")?.auto_consent = Some(Consent::LongTerm);
        }
    }
    for spec in values(&cli.pages) {
        let (appid, page) = spec.split_once('=').context("--page must be appid=page")?;
        named(accounts, appid, "page")?.pages.get_or_insert_with(Vec::new).push(page.trim().to_owned());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init(Program::Sandbox);
    let cli = Cli::parse();
    let faults = Faults {
        system_error_rate: cli.system_error_rate,
        http_503_rate: cli.http_503_rate,
        token_refused_rate: cli.token_refused_rate,
        latency_ms: cli.latency_ms,
        slow_rate: cli.slow_rate,
        slow_ms: cli.slow_ms,
        per_second_cap: cli.per_second_cap,
        daily_cap: cli.daily_cap,
    };
    faults.validate().map_err(anyhow::Error::msg)?;
    let config = SandboxConfig {
        accounts: accounts(&cli)?,
        token_lifetime: Duration::from_secs(cli.token_lifetime_secs),
        token_overlap: Duration::from_secs(cli.token_overlap_secs),
        faults,
        receipts: ReceiptSettings {
            enabled: true,
            delay_ms: cli.receipt_delay_ms,
            answer_timeout_ms: cli.receipt_timeout_ms,
            max_repushes: cli.max_repushes,
        },
    };
    for a in &config.accounts {
        let webhook = a.webhook.as_ref().map(|w| w.url.as_str()).unwrap_or("none");
        let mode = if a.webhook.as_ref().is_some_and(|w| w.encoding_aes_key.is_some()) { "safe" } else { "plaintext" };
        let (kind, format, auto_consent) = (a.kind.as_str(), a.event_format, a.auto_consent.is_some());
        tracing::info!(appid = %a.appid, kind, webhook, mode, ?format, auto_consent, "account");
    }
    let listener =
        tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("cannot listen on {}", cli.listen))?;
    let sandbox = Sandbox::start(config, listener).await.context("cannot start the sandbox")?;
    if let Some(seed) = cli.seed {
        sandbox.set_fault_seed(seed);
    }
    tracing::info!(base_url = %sandbox.base_url(), "ready: set WXPUSH_WECHAT_API_BASE to this base URL");
    telemetry::shutdown_signal().await;
    log_stats(&sandbox.stats());
    sandbox.shutdown_and_wait().await;
    Ok(())
}

/// The counters at the end of a run.
fn log_stats(stats: &Stats) {
    // The counts by errcode as one string, e.g. {"40003":2}; the rest as numbers.
    let errors = serde_json::to_string(&stats.errors).unwrap_or_default();
    tracing::info!(
        token_requests = stats.token_requests,
        tokens_issued = stats.tokens_issued,
        send_requests = stats.send_requests,
        sends_accepted = stats.sends_accepted,
        duplicates = stats.duplicates,
        subscribe_requests = stats.subscribe_requests,
        subscribe_accepted = stats.subscribe_accepted,
        no_consent = stats.no_consent,
        errors,
        http_503 = stats.http_503,
        receipts_pushed = stats.receipts_pushed,
        receipts_acked = stats.receipts_acked,
        receipts_abandoned = stats.receipts_abandoned,
        "stopping"
    );
}
