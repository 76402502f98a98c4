//! wxpush-sandbox: a local stand-in for api.weixin.qq.com.
//!
//! It serves the endpoints the worker uses (`/cgi-bin/token`, `/cgi-bin/stable_token`,
//! `/cgi-bin/message/template/send`, `/cgi-bin/message/subscribe/bizsend`,
//! `/cgi-bin/message/subscribe/send`) with the behaviour WeChat documents
//! (`docs/wechat-api.md`), keeps the recipients' subscription consents, pushes
//! `TEMPLATESENDJOBFINISH` receipts and the subscription events to a webhook (XML or JSON,
//! plaintext or safe mode), and injects faults on demand, so the product can be demonstrated,
//! tested and benchmarked on one machine. Tests drive it in-process through [`Sandbox`], other
//! processes through the admin API under `/_sandbox/`.
//!
//! Admin API, on the same server:
//! - `GET /_sandbox/stats` → [`Stats`];
//! - `GET /_sandbox/messages[?offset=N&limit=M]` → [`SentMessage`]s, oldest first;
//! - `GET /_sandbox/faults` → the current [`Faults`];
//! - `PUT /_sandbox/faults[?seed=N]` with a JSON [`Faults`] (fields left out are off; 400 on an
//!   unknown field or a rate outside 0..=1);
//! - `POST /_sandbox/revoke_tokens`, `POST /_sandbox/reset_daily_counts` → 204;
//! - `POST /_sandbox/consents/grant`, `POST /_sandbox/consents/revoke` with a JSON
//!   [`ConsentChange`] → the [`ConsentRecord`]s of its templates (400 when invalid, 404 for an
//!   unknown appid);
//! - `GET /_sandbox/consents[?appid=…&openid=…&template_id=…]` → the [`ConsentRecord`]s granted
//!   or revoked so far (recipients still on their account's `auto_consent` are not listed).
//!
//! Deterministic triggers (not WeChat behaviour, but needed to reach every answer on purpose):
//! - a `touser` of the form `errcode-<N>-anything` is answered with errcode `N`;
//! - a `template_id` starting with `invalid` is answered with 40037;
//! - the receipt's `Status` is `failed:user block` when `touser` contains `block`,
//!   `failed: system failed` when it contains `sysfail`, else `success`;
//! - a subscription message's sent event has `ErrorCode` -1 and `ErrorStatus` `system error` when
//!   `touser` contains `sysfail`, else 0 and `success`.

mod consent;
mod events;
mod http;
mod receipts;
mod send;
mod subscribe;
mod tokens;

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chrono::{DateTime, Utc};
use rand::{SeedableRng, rngs::SmallRng};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use self::consent::{Consent, ConsentChange, ConsentError, ConsentEvent, ConsentRecord};
pub use crate::config::AccountKind;
use crate::domain::job::JobKind;

/// How long WeChat keeps a `client_msg_id` ("10分钟有效").
pub const CLIENT_MSG_ID_WINDOW: Duration = Duration::from_secs(600);
/// Most messages kept for [`Sandbox::messages`]; beyond it the oldest are dropped, so that a long
/// benchmark stays bounded.
pub const MAX_MESSAGES: usize = 1_000_000;
/// The fault decisions' seed until [`Sandbox::set_fault_seed`] says otherwise: a given sequence of
/// sends meets the same faults on every run.
pub const DEFAULT_FAULT_SEED: u64 = 0x5eed_3a4d_b0c5;

/// The sandbox's configuration.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub accounts: Vec<SandboxAccount>,
    /// Life of every access token (`expires_in`); WeChat's is 7200 s.
    pub token_lifetime: Duration,
    /// How long the old token stays valid after a refresh (WeChat: 5 minutes). Clamped to
    /// `token_lifetime / 2`, so a short test lifetime keeps the stable-token rules meaningful.
    pub token_overlap: Duration,
    pub faults: Faults,
    pub receipts: ReceiptSettings,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            accounts: Vec::new(),
            token_lifetime: Duration::from_secs(7200),
            token_overlap: Duration::from_secs(300),
            faults: Faults::default(),
            receipts: ReceiptSettings::default(),
        }
    }
}

/// One account (an official account or a mini program) the sandbox knows.
#[derive(Clone)]
pub struct SandboxAccount {
    pub appid: String,
    pub secret: String,
    /// Official accounts send template messages and `subscribe/bizsend`; mini programs only
    /// `subscribe/send`. The other endpoints answer its tokens 48001 (api unauthorized).
    pub kind: AccountKind,
    /// Where its receipts and events are pushed; `None`: no pushes.
    pub webhook: Option<WebhookTarget>,
    /// The format of its pushes (the console's 数据格式): XML, or JSON, which WeChat offers mini
    /// programs.
    pub event_format: EventFormat,
    /// Every recipient's consent to every template until one is granted or revoked through the
    /// admin API. `None` (the default) is WeChat's behaviour: subscription sends answer 43101
    /// until a consent is granted.
    pub auto_consent: Option<Consent>,
    /// A mini program's pages (as in app.json, e.g. `pages/index/index`): `subscribe/send`
    /// answers 41030 for a `page` not among them. `None` (the default): any page.
    pub pages: Option<Vec<String>>,
}

impl SandboxAccount {
    /// An official account: no webhook, XML pushes, no consents, any page.
    pub fn new(appid: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            appid: appid.into(),
            secret: secret.into(),
            kind: AccountKind::OfficialAccount,
            webhook: None,
            event_format: EventFormat::Xml,
            auto_consent: None,
            pages: None,
        }
    }

    /// A mini program, otherwise as [`SandboxAccount::new`].
    pub fn miniprogram(appid: impl Into<String>, secret: impl Into<String>) -> Self {
        Self { kind: AccountKind::Miniprogram, ..Self::new(appid, secret) }
    }
}

/// The format of an account's pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFormat {
    #[default]
    Xml,
    /// JSON; in safe mode `{"ToUserName", "Encrypt"}` around the encrypted JSON event.
    Json,
}

// Written by hand so that a logged configuration never shows a secret.
impl fmt::Debug for SandboxAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxAccount")
            .field("appid", &self.appid)
            .field("secret", &"[REDACTED]")
            .field("kind", &self.kind)
            .field("webhook", &self.webhook)
            .field("event_format", &self.event_format)
            .field("auto_consent", &self.auto_consent)
            .field("pages", &self.pages)
            .finish()
    }
}

/// The account's server configuration in the MP console: URL, Token, EncodingAESKey.
#[derive(Clone)]
pub struct WebhookTarget {
    /// e.g. `http://127.0.0.1:8080/wechat`
    pub url: String,
    pub token: String,
    /// When set, pushes are made in safe mode (`encrypt_type=aes`).
    pub encoding_aes_key: Option<String>,
}

impl fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .field("token", &"[REDACTED]")
            .field("encoding_aes_key", &self.encoding_aes_key.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

/// Injected faults on sends (template and subscription alike); all off by default. Every field may be left out of the
/// JSON body of `PUT /_sandbox/faults`; an unknown field is refused, so a typo cannot pass unseen.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fraction of sends answered `{"errcode":-1,"errmsg":"system error"}`.
    pub system_error_rate: f64,
    /// Fraction of sends answered HTTP 503.
    pub http_503_rate: f64,
    /// Fraction of sends answered 40001 ("access_token is invalid or not latest") whatever the
    /// token: WeChat refusing tokens it hands out, as when another system shares the appid.
    pub token_refused_rate: f64,
    /// Added to every send that passes the token, request and cap checks.
    pub latency_ms: u64,
    /// Fraction of accepted sends whose answer is delayed `slow_ms` after the message is sent.
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// Per appid and API (template sends and subscription sends are counted apart, as WeChat
    /// keeps a quota per API): accepted sends in the current wall-clock second beyond this →
    /// 45011.
    pub per_second_cap: Option<u32>,
    /// Per appid and API: accepted sends "today" (Beijing time) beyond this → 45009.
    pub daily_cap: Option<u64>,
}

impl Faults {
    /// Rates outside 0..=1 (or NaN) are a mistake; the admin API refuses them.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("system_error_rate", self.system_error_rate),
            ("http_503_rate", self.http_503_rate),
            ("token_refused_rate", self.token_refused_rate),
            ("slow_rate", self.slow_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }

    fn clamped(mut self) -> Self {
        for rate in
            [&mut self.system_error_rate, &mut self.http_503_rate, &mut self.token_refused_rate, &mut self.slow_rate]
        {
            *rate = if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) };
        }
        self
    }
}

/// Event pushes: `TEMPLATESENDJOBFINISH` receipts and the subscription events.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiptSettings {
    /// Off: nothing is pushed, neither receipts nor subscription events.
    pub enabled: bool,
    /// Between accepting a message (or changing a consent) and pushing its event.
    pub delay_ms: u64,
    /// WeChat hangs up after 5 s and counts the push as unanswered.
    pub answer_timeout_ms: u64,
    /// Pushes after the first one when a push is not answered (WeChat: 3).
    pub max_repushes: u32,
}

impl Default for ReceiptSettings {
    fn default() -> Self {
        Self { enabled: true, delay_ms: 500, answer_timeout_ms: 5000, max_repushes: 3 }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Calls to `/cgi-bin/token` and `/cgi-bin/stable_token`, failed ones included.
    pub token_requests: u64,
    /// Token calls that produced a new token.
    pub tokens_issued: u64,
    /// `stable_token` calls with `force_refresh: true`, whatever their answer.
    pub forced_token_requests: u64,
    /// Calls to `/cgi-bin/message/template/send`, whatever their answer.
    pub send_requests: u64,
    /// First-time messages.
    pub sends_accepted: u64,
    /// Sends answered with an earlier message's msgid (same touser + client_msg_id within 10 min).
    pub duplicates: u64,
    /// Calls to `subscribe/bizsend` and `subscribe/send`, whatever their answer.
    pub subscribe_requests: u64,
    /// Subscription messages accepted.
    pub subscribe_accepted: u64,
    /// Sends answered 43101 (no subscription consent left).
    pub no_consent: u64,
    /// Non-zero errcodes answered to sends of every kind, by errcode (token endpoints are not
    /// counted here).
    pub errors: BTreeMap<i64, u64>,
    pub http_503: u64,
    /// Every HTTP push of a receipt or subscription event, re-pushes included.
    pub receipts_pushed: u64,
    pub receipts_acked: u64,
    /// Receipts given up after `1 + max_repushes` unanswered pushes (or never pushed because
    /// too many were pending).
    pub receipts_abandoned: u64,
}

/// One accepted message, as WeChat would have sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentMessage {
    pub msgid: u64,
    /// Which endpoint accepted it.
    #[serde(default)]
    pub kind: JobKind,
    pub appid: String,
    pub touser: String,
    pub template_id: String,
    pub client_msg_id: Option<String>,
    /// The request body as sent.
    pub body: serde_json::Value,
    pub accepted_at: DateTime<Utc>,
}

/// Why a configuration cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxConfigError {
    #[error("no accounts configured")]
    NoAccounts,
    #[error("account {0:?} is configured twice")]
    DuplicateAppid(String),
    #[error("account {0:?} has an empty appid or secret")]
    EmptyCredential(String),
    #[error("token_lifetime must be at least 1 second")]
    TokenLifetime,
    #[error("webhook URL {url:?} of account {appid:?} is not valid: {reason}")]
    WebhookUrl { appid: String, url: String, reason: String },
    #[error("the encoding_aes_key of account {appid:?} is not valid: {reason}")]
    AesKey { appid: String, reason: String },
    #[error("faults: {0}")]
    Faults(String),
    #[error("cannot build the HTTP client for receipts: {0}")]
    HttpClient(String),
}

impl From<SandboxConfigError> for std::io::Error {
    fn from(e: SandboxConfigError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// The `gh_…` original id of an account, the `ToUserName` of its pushes (derived from the appid
/// so that it is stable across restarts).
pub fn original_id(appid: &str) -> String {
    let digest = Sha1::digest(appid.as_bytes());
    format!("gh_{}", &hex::encode(digest)[..12])
}

/// A running sandbox. Dropping it stops the server, like [`Sandbox::shutdown`].
pub struct Sandbox {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl Sandbox {
    /// Serves on `listener` from a spawned task; returns once the sandbox is ready.
    pub async fn start(config: SandboxConfig, listener: TcpListener) -> std::io::Result<Sandbox> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config)?);
        let router = http::router(shared.clone());
        let cancel = shared.cancel.clone();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "sandbox server stopped");
            }
        });
        tracing::info!(%addr, accounts = shared.accounts.len(), "wxpush-sandbox listening");
        Ok(Sandbox { shared, addr, server: Some(server) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, the value for `WXPUSH_WECHAT_API_BASE`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Every accepted first-time message, oldest first (the last [`MAX_MESSAGES`]).
    pub fn messages(&self) -> Vec<SentMessage> {
        self.shared.messages(0, usize::MAX)
    }

    /// Replaces the faults (rates are clamped to 0..=1) and restarts the fault decisions from
    /// the seed, so that the sends that follow meet the same faults on every run.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Sets the seed of the fault decisions (default [`DEFAULT_FAULT_SEED`]) and restarts them.
    pub fn set_fault_seed(&self, seed: u64) {
        self.shared.set_seed(seed);
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Every token issued so far becomes invalid (sends answer 40001).
    pub fn revoke_tokens(&self) {
        self.shared.tokens_write().revoke_all();
    }

    /// Starts a new "day" for the daily caps.
    pub fn reset_daily_counts(&self) {
        self.shared.reset_daily_counts();
    }

    /// Grants consents, as `POST /_sandbox/consents/grant` does; returns them.
    pub fn grant_consent(&self, change: &ConsentChange) -> Result<Vec<ConsentRecord>, ConsentError> {
        self.shared.change_consent(change, true)
    }

    /// Revokes consents, as `POST /_sandbox/consents/revoke` does; returns them (all zero).
    pub fn revoke_consent(&self, change: &ConsentChange) -> Result<Vec<ConsentRecord>, ConsentError> {
        self.shared.change_consent(change, false)
    }

    /// Every consent granted or revoked so far, by appid, openid and template.
    pub fn consents(&self) -> Vec<ConsentRecord> {
        self.shared.consents(&consent::Filter::default())
    }

    /// Stops accepting connections, lets in-flight requests finish, cancels pending receipts.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Like [`Sandbox::shutdown`], then waits until the server has stopped.
    pub async fn shutdown_and_wait(mut self) {
        self.stop();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    fn stop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poisoning only means another request panicked while holding the lock; the data is still
/// counters and maps that are consistent after every statement, so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// An account as the running sandbox holds it.
struct Account {
    appid: Arc<str>,
    secret: String,
    kind: AccountKind,
    original_id: String,
    webhook: Option<receipts::Webhook>,
    format: EventFormat,
    pages: Option<HashSet<String>>,
    /// Template sends' caps, fault draws and de-duplication.
    send: Mutex<send::SendState>,
    /// Subscription sends' own: another API, with its own quota and fault sequence.
    subscribe: Mutex<send::SendState>,
    consents: Mutex<consent::Consents>,
}

impl Account {
    /// The `i`th configured account, its appid and secret already checked.
    fn new(i: usize, a: SandboxAccount) -> Result<Self, SandboxConfigError> {
        let webhook = match &a.webhook {
            Some(w) => Some(receipts::Webhook::new(&a.appid, w)?),
            None => None,
        };
        let pages = a.pages.map(|p| p.iter().map(|page| subscribe::page_path(page).to_owned()).collect());
        Ok(Account {
            original_id: original_id(&a.appid),
            appid: a.appid.into(),
            secret: a.secret,
            kind: a.kind,
            webhook,
            format: a.event_format,
            pages,
            send: Mutex::new(send::SendState::new(fault_rng(DEFAULT_FAULT_SEED, i))),
            subscribe: Mutex::new(send::SendState::new(subscribe_fault_rng(DEFAULT_FAULT_SEED, i))),
            consents: Mutex::new(consent::Consents::new(a.auto_consent)),
        })
    }

    fn send_state(&self, kind: JobKind) -> &Mutex<send::SendState> {
        match kind {
            JobKind::Template => &self.send,
            JobKind::Subscribe | JobKind::MiniprogramSubscribe => &self.subscribe,
        }
    }
}

/// A message as recorded: the body is kept as bytes (far smaller than a `Value`) and read again
/// only when someone asks for the list.
#[derive(Clone)]
struct Record {
    msgid: u64,
    kind: JobKind,
    account: usize,
    body: Arc<[u8]>,
    accepted_at_ms: i64,
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    forced_token_requests: AtomicU64,
    send_requests: AtomicU64,
    sends_accepted: AtomicU64,
    duplicates: AtomicU64,
    subscribe_requests: AtomicU64,
    subscribe_accepted: AtomicU64,
    no_consent: AtomicU64,
    http_503: AtomicU64,
    receipts_pushed: AtomicU64,
    receipts_acked: AtomicU64,
    receipts_abandoned: AtomicU64,
}

/// State shared by the handlers and the receipt tasks.
struct Shared {
    accounts: Vec<Account>,
    by_appid: HashMap<String, usize>,
    token_lifetime: Duration,
    token_overlap: Duration,
    tokens: RwLock<tokens::TokenStore>,
    faults: RwLock<Faults>,
    receipts: ReceiptSettings,
    next_msgid: AtomicU64,
    messages: Mutex<VecDeque<Record>>,
    seed: AtomicU64,
    counters: Counters,
    errors: Mutex<BTreeMap<i64, u64>>,
    http: reqwest::Client,
    push_permits: Semaphore,
    pending_receipts: AtomicUsize,
    cancel: CancellationToken,
}

impl Shared {
    fn new(config: SandboxConfig) -> Result<Self, SandboxConfigError> {
        if config.accounts.is_empty() {
            return Err(SandboxConfigError::NoAccounts);
        }
        if config.token_lifetime < Duration::from_secs(1) {
            return Err(SandboxConfigError::TokenLifetime);
        }
        config.faults.validate().map_err(SandboxConfigError::Faults)?;
        let mut accounts = Vec::with_capacity(config.accounts.len());
        let mut by_appid = HashMap::new();
        for (i, a) in config.accounts.into_iter().enumerate() {
            if a.appid.is_empty() || a.secret.is_empty() {
                return Err(SandboxConfigError::EmptyCredential(a.appid));
            }
            if by_appid.insert(a.appid.clone(), i).is_some() {
                return Err(SandboxConfigError::DuplicateAppid(a.appid));
            }
            accounts.push(Account::new(i, a)?);
        }
        let http = reqwest::Client::builder()
            .no_proxy() // webhooks are local; a proxy from the environment would only get in the way
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| SandboxConfigError::HttpClient(e.to_string()))?;
        let n = accounts.len();
        Ok(Self {
            accounts,
            by_appid,
            token_lifetime: config.token_lifetime,
            token_overlap: config.token_overlap.min(config.token_lifetime / 2),
            tokens: RwLock::new(tokens::TokenStore::new(n)),
            faults: RwLock::new(config.faults.clamped()),
            receipts: config.receipts,
            next_msgid: AtomicU64::new(first_msgid()),
            messages: Mutex::new(VecDeque::new()),
            seed: AtomicU64::new(DEFAULT_FAULT_SEED),
            counters: Counters::default(),
            errors: Mutex::new(BTreeMap::new()),
            http,
            push_permits: Semaphore::new(receipts::MAX_CONCURRENT_PUSHES),
            pending_receipts: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
        })
    }

    fn tokens_read(&self) -> std::sync::RwLockReadGuard<'_, tokens::TokenStore> {
        self.tokens.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn tokens_write(&self) -> std::sync::RwLockWriteGuard<'_, tokens::TokenStore> {
        self.tokens.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn faults(&self) -> Faults {
        *self.faults.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_faults(&self, faults: Faults) {
        let faults = faults.clamped();
        *self.faults.write().unwrap_or_else(PoisonError::into_inner) = faults;
        self.reseed();
        tracing::info!(
            system_error_rate = faults.system_error_rate,
            http_503_rate = faults.http_503_rate,
            latency_ms = faults.latency_ms,
            slow_rate = faults.slow_rate,
            slow_ms = faults.slow_ms,
            per_second_cap = faults.per_second_cap,
            daily_cap = faults.daily_cap,
            "faults set"
        );
    }

    fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
        self.reseed();
    }

    fn reseed(&self) {
        let seed = self.seed.load(Ordering::Relaxed);
        for (i, a) in self.accounts.iter().enumerate() {
            lock(&a.send).reseed(fault_rng(seed, i));
            lock(&a.subscribe).reseed(subscribe_fault_rng(seed, i));
        }
    }

    fn reset_daily_counts(&self) {
        for a in &self.accounts {
            lock(&a.send).reset_daily();
            lock(&a.subscribe).reset_daily();
        }
    }

    fn count_error(&self, errcode: i64) {
        if errcode == 43101 {
            self.counters.no_consent.fetch_add(1, Ordering::Relaxed);
        }
        *lock(&self.errors).entry(errcode).or_insert(0) += 1;
    }

    fn record(&self, record: Record) {
        let mut messages = lock(&self.messages);
        if messages.len() >= MAX_MESSAGES {
            messages.pop_front();
        }
        messages.push_back(record);
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            token_requests: get(&c.token_requests),
            tokens_issued: get(&c.tokens_issued),
            forced_token_requests: get(&c.forced_token_requests),
            send_requests: get(&c.send_requests),
            sends_accepted: get(&c.sends_accepted),
            duplicates: get(&c.duplicates),
            subscribe_requests: get(&c.subscribe_requests),
            subscribe_accepted: get(&c.subscribe_accepted),
            no_consent: get(&c.no_consent),
            errors: lock(&self.errors).clone(),
            http_503: get(&c.http_503),
            receipts_pushed: get(&c.receipts_pushed),
            receipts_acked: get(&c.receipts_acked),
            receipts_abandoned: get(&c.receipts_abandoned),
        }
    }

    /// Messages `offset..offset+limit`, oldest first.
    fn messages(&self, offset: usize, limit: usize) -> Vec<SentMessage> {
        // Take the records out first (an Arc clone each) so the lock is not held while parsing.
        let records: Vec<Record> = lock(&self.messages).iter().skip(offset).take(limit).cloned().collect();
        records
            .into_iter()
            .map(|Record { msgid, kind, account, body, accepted_at_ms: ms }| {
                // The body was parsed and validated when it was accepted, so this cannot fail.
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let text = |k: &str| body.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                SentMessage {
                    msgid,
                    kind,
                    appid: self.accounts.get(account).map(|a| a.appid.to_string()).unwrap_or_default(),
                    touser: text("touser").unwrap_or_default(),
                    template_id: text("template_id").unwrap_or_default(),
                    client_msg_id: text("client_msg_id").filter(|s| !s.is_empty()),
                    accepted_at: DateTime::from_timestamp_millis(ms).unwrap_or_default(),
                    body,
                }
            })
            .collect()
    }
}

/// Each account draws its faults from its own generator, so accounts do not contend for one.
fn fault_rng(seed: u64, account: usize) -> SmallRng {
    SmallRng::seed_from_u64(seed.wrapping_add(account as u64))
}

/// Subscription sends draw their faults apart from template sends, so that adding them does not
/// change the faults a given sequence of template sends meets.
fn subscribe_fault_rng(seed: u64, account: usize) -> SmallRng {
    fault_rng(seed ^ 0x5ab5_c41b_e000, account)
}

/// msgids start above 2^62 so that a consumer keeping them as f64 (or in JS) visibly loses them;
/// the base moves with the clock so that a restarted sandbox does not hand out the same ids.
fn first_msgid() -> u64 {
    let ms = u64::try_from(unix_now().as_millis()).unwrap_or(0) & ((1 << 40) - 1);
    (1u64 << 62) + (ms << 20)
}
