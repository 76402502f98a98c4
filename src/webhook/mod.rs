//! wxpush-webhook: the URL WeChat pushes events to (docs/contract.md, "Webhook").
//!
//! - `GET /wechat[/{account}]`: server verification, `echostr` answered when `signature` holds;
//! - `POST /wechat[/{account}]`: a push, plaintext or safe mode ([`verify`]), read by
//!   [`crate::domain::receipt`], published once ([`crate::store::dedupe`]) with publisher confirms ([`push`]);
//!   answered `success` only after the broker confirmed;
//!
//! Nothing else is served on that port. `/healthz`, `/readyz` (RabbitMQ and Redis reachable) and
//! `/metrics` ([`metrics`]) are on the admin address (`WXPUSH_WEBHOOK_ADMIN_LISTEN`), which is not
//! exposed to WeChat. Both ports run on [`server`], which bounds what slow clients can hold.
//!
//! Routing keys on the results exchange: `delivery.<status>` for TEMPLATESENDJOBFINISH and for
//! each `List` item of `subscribe_msg_sent_event` (body:
//! [`crate::domain::result::DeliveryEvent`]), `consent.accepted` / `consent.rejected` for each
//! item of `subscribe_msg_popup_event` and `subscribe_msg_change_event` (body:
//! [`crate::domain::result::ConsentEvent`]), `event.<event lowercase>` for other events and
//! `message.<msgtype lowercase>` for users' messages (body: every field of the push plus
//! `type`, `account`, `received_at`). Pushes may be XML or JSON (a mini program's console
//! setting), plaintext or safe mode (`Encrypt` in an XML or a JSON envelope).
//!
//! A receipt's `job_id` comes from the msgid record the worker writes when WeChat accepts a
//! send. WeChat can push the receipt before that write lands, so the record is looked up again
//! for up to `msgid_wait` (1.5 s by default, for all the items of one push together); after that
//! the event goes out with `job_id` null, and a consumer ties it through `msgid`, which the
//! job's `send.succeeded` result also carries.

pub mod metrics;
pub mod push;
pub mod server;
pub mod verify;

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, Path, RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::{limit::RequestBodyLimitLayer, timeout::RequestBodyDeadlineLayer};
use tracing::{error, info, warn};

use crate::{
    amqp::{AmqpError, ReconnectingPublisher},
    config::{Config, QueueType},
    domain::job::DEFAULT_ACCOUNT,
    health::Readiness,
    store::{Redis, StoreError},
};
use metrics::Outcome;
use server::ConnLimits;
use verify::{AccountKeys, KeyError, PushQuery};

/// Open connections on the admin port at most: probes and a scraper need a handful.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Largest push accepted; WeChat's pushes are a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why the webhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "no account has a callback_token, so no push could be verified: set WXPUSH_CALLBACK_TOKEN (and WXPUSH_APPID) or callback_token in an [[accounts]] entry"
    )]
    NoAccounts,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({var})")]
    Bind { addr: SocketAddr, var: &'static str, source: std::io::Error },
}

/// The webhook's timings and names.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub results_exchange: String,
    pub dead_letter_queue: String,
    /// Kind of the dead-letter queue, declared as the worker declares it.
    pub queue_type: QueueType,
    /// Pushes signed further than this from now are refused (403); `None` = no check.
    pub timestamp_window: Option<Duration>,
    /// How long a receipt waits for the worker's msgid record before it is published with
    /// `job_id` null. Kept well inside WeChat's 5-second budget.
    pub msgid_wait: Duration,
    /// Life of the pending mark: longer than any publish can take (it is what a crash leaves).
    pub pending_ttl: Duration,
    /// How long a published event is remembered; WeChat's re-pushes come within a minute.
    pub done_ttl: Duration,
    /// How long a re-push waits for a concurrent push of the same event to be confirmed.
    pub pending_wait: Duration,
    /// How long a publish may wait for the broker's confirm.
    pub publish_timeout: Duration,
    /// Largest body accepted (413 above).
    pub max_body_bytes: usize,
    /// Open connections on the public port at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head by then is closed (slow clients);
    /// the body then has as long again to arrive.
    pub header_timeout: Duration,
    /// After SIGTERM, how long pushes in flight get to finish.
    pub shutdown_grace: Duration,
}

impl WebhookSettings {
    /// The settings `config` gives (its `[webhook]` section, names and grace period).
    pub fn from_config(config: &Config) -> WebhookSettings {
        let knobs = &config.webhook;
        WebhookSettings {
            results_exchange: config.results_exchange.clone(),
            dead_letter_queue: config.dead_letter_queue.clone(),
            queue_type: config.queue_type,
            timestamp_window: knobs.timestamp_window,
            msgid_wait: knobs.msgid_wait,
            pending_ttl: Duration::from_secs(30),
            done_ttl: knobs.dedupe_ttl.max(Duration::from_secs(60)),
            pending_wait: Duration::from_secs(2),
            publish_timeout: Duration::from_secs(10),
            max_body_bytes: MAX_BODY_BYTES,
            max_connections: knobs.max_connections.max(1),
            header_timeout: knobs.header_timeout,
            shutdown_grace: config.shutdown_grace,
        }
    }
}

/// What the webhook shares between requests and push tasks.
pub struct Inner {
    accounts: HashMap<String, Arc<AccountKeys>>,
    broker: Arc<ReconnectingPublisher>,
    redis: Redis,
    settings: WebhookSettings,
    tracker: TaskTracker,
    topology_declared: AtomicBool,
    metrics: RwLock<Option<MetricsPage>>,
}

/// What renders the `/metrics` page.
type MetricsPage = Arc<dyn Fn() -> String + Send + Sync>;

/// The webhook: cheap to clone, handed to axum as its state.
#[derive(Clone)]
pub struct Webhook {
    inner: Arc<Inner>,
}

impl Webhook {
    /// A webhook for every account of `config` that has a callback Token.
    pub fn new(
        config: &Config,
        settings: WebhookSettings,
        broker: Arc<ReconnectingPublisher>,
        redis: Redis,
    ) -> Result<Webhook, WebhookError> {
        let mut accounts = HashMap::new();
        for account in &config.accounts {
            match AccountKeys::from_account(account)? {
                Some(keys) => {
                    accounts.insert(account.name.clone(), Arc::new(keys));
                }
                None => {
                    warn!(account = %account.name, "account has no callback_token; /wechat/{} answers 404", account.name)
                }
            }
        }
        if accounts.is_empty() {
            return Err(WebhookError::NoAccounts);
        }
        Ok(Webhook {
            inner: Arc::new(Inner {
                accounts,
                broker,
                redis,
                settings,
                tracker: TaskTracker::new(),
                topology_declared: AtomicBool::new(false),
                metrics: RwLock::new(None),
            }),
        })
    }

    /// Serves `/metrics` from `render` (e.g. `telemetry::render_metrics` of the recorder's
    /// handle), also after the routers were built.
    pub fn with_metrics(self, render: MetricsPage) -> Webhook {
        *self.inner.metrics.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(render);
        self
    }

    /// The names of the accounts that take pushes.
    pub fn account_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.accounts.keys().cloned().collect();
        names.sort();
        names
    }

    /// Declares the results exchange and the dead-letter queue (also done before the first
    /// publish, so a broker that is down at start-up is not fatal).
    pub async fn declare_topology(&self) -> Result<(), AmqpError> {
        self.inner.ensure_topology().await
    }

    /// Waits (up to the grace period) for pushes still being published, e.g. after shutdown.
    pub async fn drain(&self) -> bool {
        self.inner.tracker.close();
        tokio::time::timeout(self.inner.settings.shutdown_grace, self.inner.tracker.wait()).await.is_ok()
    }
}

impl Inner {
    async fn ensure_topology(&self) -> Result<(), AmqpError> {
        if self.topology_declared.load(Ordering::Acquire) {
            return Ok(());
        }
        self.broker.declare_results_exchange(&self.settings.results_exchange).await?;
        self.broker.declare_dead_letter_queue(&self.settings.dead_letter_queue, self.settings.queue_type).await?;
        self.topology_declared.store(true, Ordering::Release);
        Ok(())
    }

    fn forget_topology(&self) {
        self.topology_declared.store(false, Ordering::Release);
    }
}

/// The public routes, the only ones WeChat can reach: `/wechat` and `/wechat/{account}`, with
/// the body limits in place. Anything else is 404.
pub fn router(webhook: Webhook) -> Router {
    let settings = &webhook.inner.settings;
    let limit = settings.max_body_bytes;
    let body_deadline = settings.header_timeout;
    Router::new()
        .route("/wechat", get(verify_default).post(post_default))
        .route("/wechat/{account}", get(verify_named).post(post_named))
        // RequestBodyLimitLayer answers 413 from Content-Length before reading; DefaultBodyLimit
        // makes the `Bytes` extractor stop at the same size for chunked bodies.
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyLimitLayer::new(limit))
        // The whole body within the deadline: a client trickling bytes cannot hold a connection.
        .layer(RequestBodyDeadlineLayer::new(body_deadline))
        .with_state(webhook)
}

/// The admin routes: `/healthz`, `/readyz`, `/metrics`.
pub fn admin_router(webhook: Webhook) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(webhook)
}

/// The webhook's two sockets: the public one WeChat pushes to, and the admin one.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `webhook_listen` and `webhook_admin_listen`.
    pub async fn bind(config: &Config) -> Result<Listeners, WebhookError> {
        let bind = |addr: SocketAddr, var: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|source| WebhookError::Bind { addr, var, source })
        };
        Ok(Listeners {
            public: bind(config.webhook_listen, "WXPUSH_WEBHOOK_LISTEN").await?,
            admin: bind(config.webhook_admin_listen, "WXPUSH_WEBHOOK_ADMIN_LISTEN").await?,
        })
    }
}

/// The webhook's RabbitMQ publisher (small frames, as every connection: [`crate::amqp::Nodes`]).
pub fn broker(config: &Config) -> Arc<ReconnectingPublisher> {
    ReconnectingPublisher::new(&config.amqp_url, "wxpush-webhook")
}

/// Runs `webhook` on `listeners` until `shutdown` resolves, then lets pushes in flight finish.
pub async fn serve_with(
    webhook: Webhook,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    if let Err(e) = webhook.declare_topology().await {
        warn!(
            error = &e as &dyn std::error::Error,
            "cannot declare the results exchange and dead-letter queue yet; will retry on the first push"
        );
    }
    info!(
        addr = ?listeners.public.local_addr().ok(),
        admin = ?listeners.admin.local_addr().ok(),
        accounts = ?webhook.account_names(),
        "wxpush-webhook listening"
    );
    let settings = &webhook.inner.settings;
    let public = ConnLimits {
        port: "public",
        max_connections: settings.max_connections,
        header_timeout: settings.header_timeout,
        grace: settings.shutdown_grace,
    };
    let admin = ConnLimits { port: "admin", max_connections: ADMIN_MAX_CONNECTIONS, ..public.clone() };
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    tokio::join!(
        server::serve(listeners.public, router(webhook.clone()), public, stop.clone()),
        server::serve(listeners.admin, admin_router(webhook.clone()), admin, stop.clone()),
        async move {
            shutdown.await;
            stopping.cancel();
        },
    );
    if !webhook.drain().await {
        warn!("shutdown grace period over with pushes still in flight; WeChat will push them again");
    }
    info!("wxpush-webhook stopped");
    Ok(())
}

/// An answer to WeChat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `success`: the event is safe (WeChat's recommended answer, also in safe mode).
    Success,
    /// The server-verification `echostr`, verbatim.
    Echo(String),
    /// Anything else, with a short reason (never a secret).
    Refused(StatusCode, String),
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
        match self {
            Reply::Success => (StatusCode::OK, text, "success").into_response(),
            Reply::Echo(echostr) => (StatusCode::OK, text, echostr).into_response(),
            Reply::Refused(status, reason) => (status, text, reason).into_response(),
        }
    }
}

fn unknown_account(name: &str) -> Reply {
    // The name comes from the URL: quote only a bounded, printable part of it.
    let shown: String = name.chars().take(64).filter(|c| !c.is_control()).collect();
    Reply::Refused(StatusCode::NOT_FOUND, format!("unknown account {shown:?}"))
}

async fn verify_default(state: State<Webhook>, query: RawQuery) -> Reply {
    verify_get(state, DEFAULT_ACCOUNT, query)
}

async fn verify_named(state: State<Webhook>, Path(account): Path<String>, query: RawQuery) -> Reply {
    verify_get(state, &account, query)
}

fn verify_get(State(webhook): State<Webhook>, account: &str, RawQuery(query): RawQuery) -> Reply {
    let Some(keys) = webhook.inner.accounts.get(account) else { return unknown_account(account) };
    let query = PushQuery::parse(query.as_deref());
    let now = chrono::Utc::now().timestamp();
    match keys.verify_echo(&query, now, webhook.inner.settings.timestamp_window) {
        Ok(echostr) => {
            info!(account, "server URL verified");
            Reply::Echo(echostr)
        }
        Err(e) => {
            warn!(account, status = e.status().as_u16(), reason = %e, "server verification refused");
            Reply::Refused(e.status(), e.to_string())
        }
    }
}

async fn post_default(state: State<Webhook>, query: RawQuery, body: Bytes) -> Reply {
    post(state, DEFAULT_ACCOUNT.to_owned(), query, body).await
}

async fn post_named(state: State<Webhook>, Path(account): Path<String>, query: RawQuery, body: Bytes) -> Reply {
    post(state, account, query, body).await
}

/// Hands the push to its own task and waits for it. If WeChat hangs up, axum drops this future
/// but not the task: the publish runs to its confirm (or its release) regardless, and the push
/// is counted when it is done.
async fn post(State(webhook): State<Webhook>, account: String, RawQuery(query): RawQuery, body: Bytes) -> Reply {
    let started = Instant::now();
    let Some(keys) = webhook.inner.accounts.get(&account).cloned() else {
        // The label takes configured names only: a URL cannot make new series.
        metrics::push_answered("unknown", Outcome::Refused("unknown_account"), started.elapsed());
        return unknown_account(&account);
    };
    let query = PushQuery::parse(query.as_deref());
    let inner = webhook.inner.clone();
    let task = webhook.inner.tracker.spawn(async move {
        let name = keys.name.clone();
        // A panic must not go unanswered or uncounted; the pending mark the push held is
        // released by its guard as the panic unwinds (dedupe::PendingMark).
        let (reply, outcome) = match AssertUnwindSafe(inner.process_post(keys, query, body)).catch_unwind().await {
            Ok(answer) => answer,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                error!(account = %name, panic = %what, "push task panicked; answering 500 so that WeChat pushes again");
                (Reply::Refused(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into()), Outcome::Failed)
            }
        };
        metrics::push_answered(&name, outcome, started.elapsed());
        reply
    });
    match task.await {
        Ok(reply) => reply,
        Err(e) => {
            error!(account, error = %e, "push task failed");
            Reply::Refused(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
        }
    }
}

async fn readyz(State(webhook): State<Webhook>) -> Readiness {
    let inner = &webhook.inner;
    let limit = Duration::from_secs(2);
    let (redis, amqp) = tokio::join!(
        tokio::time::timeout(limit, inner.redis.ping()),
        // Reachable, as README promises: with no connection (none yet, or lost in an outage and
        // no push since), the probe opens one, as the next push would.
        tokio::time::timeout(limit, inner.broker.connect()),
    );
    Readiness { rabbitmq: matches!(amqp, Ok(Ok(()))), redis: matches!(redis, Ok(Ok(()))) }
}

async fn metrics_text(State(webhook): State<Webhook>) -> impl IntoResponse {
    let render = webhook.inner.metrics.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let body = render.map(|render| render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_come_from_the_webhook_section() {
        let s = WebhookSettings::from_config(&Config::default());
        assert_eq!(s.timestamp_window, Some(Duration::from_secs(300)));
        assert_eq!(s.msgid_wait, Duration::from_millis(1500));
        assert_eq!(s.done_ttl, Duration::from_secs(86_400));
        assert_eq!((s.results_exchange.as_str(), s.dead_letter_queue.as_str()), ("wxpush.results", "wxpush.jobs.dead"));
        assert_eq!(s.max_body_bytes, 64 * 1024);
        assert_eq!((s.max_connections, s.header_timeout), (2_048, Duration::from_secs(10)));
        let env = |var: &str| match var {
            "WXPUSH_WEBHOOK_TIMESTAMP_WINDOW_SECS" | "WXPUSH_WEBHOOK_MSGID_WAIT_MS" => Some("0".to_owned()),
            "WXPUSH_WEBHOOK_DEDUPE_TTL_SECS" => Some("3600".to_owned()),
            "WXPUSH_WEBHOOK_MAX_CONNECTIONS" => Some("100".to_owned()),
            "WXPUSH_WEBHOOK_HEADER_TIMEOUT_SECS" => Some("3".to_owned()),
            _ => None,
        };
        let s = WebhookSettings::from_config(&Config::from_sources("t", "", env).unwrap());
        assert_eq!((s.timestamp_window, s.msgid_wait, s.done_ttl), (None, Duration::ZERO, Duration::from_secs(3600)));
        assert_eq!((s.max_connections, s.header_timeout), (100, Duration::from_secs(3)));
        let e = Config::from_sources("t", "", |v| (v == "WXPUSH_WEBHOOK_TIMESTAMP_WINDOW_SECS").then(|| "5m".into()));
        assert!(e.unwrap_err().to_string().contains("WXPUSH_WEBHOOK_TIMESTAMP_WINDOW_SECS=\"5m\""));
    }

    #[test]
    fn answers_are_plain_text() {
        let r = Reply::Success.into_response();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(unknown_account("x\u{0}y").into_response().status(), StatusCode::NOT_FOUND);
    }
}
