//! `/healthz`, `/readyz` and `/metrics` for the worker (and the state behind them).
//!
//! Liveness means "the consume loop is not stuck", not "the broker is up": restarting a worker
//! because RabbitMQ is down would only add a restart storm to the outage. Readiness means
//! connected to RabbitMQ and Redis.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{store::Redis, telemetry};

/// What the health endpoints report.
pub struct Health {
    started: Instant,
    amqp: AtomicBool,
    redis: AtomicBool,
    in_flight: AtomicI64,
    /// Milliseconds since `started` of the last sign of progress of the consume loop.
    last_progress_ms: AtomicU64,
    /// Registered at the first job, after the binary installed its recorder.
    in_flight_gauge: std::sync::OnceLock<metrics::Gauge>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            amqp: AtomicBool::new(false),
            redis: AtomicBool::new(false),
            in_flight: AtomicI64::new(0),
            last_progress_ms: AtomicU64::new(0),
            in_flight_gauge: std::sync::OnceLock::new(),
        }
    }
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_amqp(&self, up: bool) {
        self.amqp.store(up, Ordering::Relaxed);
        self.progress();
    }

    pub fn progress(&self) {
        self.last_progress_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn job_started(&self) {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.gauge().set(n as f64);
    }

    pub fn job_finished(&self) {
        let n = self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        self.gauge().set(n as f64);
        self.progress();
    }

    fn gauge(&self) -> &metrics::Gauge {
        self.in_flight_gauge.get_or_init(|| metrics::gauge!("wxpush_jobs_in_flight"))
    }

    /// Connected to RabbitMQ and Redis.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// What `/readyz` reports.
    pub fn readiness(&self) -> Readiness {
        Readiness { rabbitmq: self.amqp.load(Ordering::Relaxed), redis: self.redis.load(Ordering::Relaxed) }
    }

    /// Alive unless jobs are in flight and nothing has moved for `stall`.
    pub fn is_alive(&self, stall: Duration) -> bool {
        let idle_ms = self.started.elapsed().as_millis() as u64 - self.last_progress_ms.load(Ordering::Relaxed);
        self.in_flight.load(Ordering::Relaxed) == 0 || Duration::from_millis(idle_ms) < stall
    }

    /// Pings Redis every second until `cancel`, for readiness: the caller runs it on its
    /// task tracker.
    pub async fn watch_redis(self: Arc<Self>, redis: Redis, cancel: CancellationToken) {
        // Reported once per outage, the first one at start included (a TLS or URL mistake).
        let mut reported_down = false;
        loop {
            let failure = match tokio::time::timeout(Duration::from_secs(2), redis.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(telemetry::chain(&e).to_string()),
                Err(_) => Some("no answer to PING within 2 s".to_owned()),
            };
            self.redis.store(failure.is_none(), Ordering::Relaxed);
            match failure {
                Some(error) if !reported_down => {
                    warn!(%error, "Redis is unreachable; jobs wait until it is back");
                    reported_down = true;
                }
                None if reported_down => {
                    info!("Redis is reachable again");
                    reported_down = false;
                }
                _ => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// What `/readyz` answers, the worker's and the webhook's alike: one line per service,
/// `rabbitmq: up` / `redis: down`; 200 when both are up, else 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub rabbitmq: bool,
    pub redis: bool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.rabbitmq && self.redis
    }
}

impl IntoResponse for Readiness {
    fn into_response(self) -> Response {
        let word = |up: bool| if up { "up" } else { "down" };
        let body = format!("rabbitmq: {}\nredis: {}\n", word(self.rabbitmq), word(self.redis));
        let status = if self.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, body).into_response()
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// The admin router: `/healthz`, `/readyz`, `/metrics`.
pub fn router(health: Arc<Health>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { health, metrics })
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.is_alive(Duration::from_secs(300)) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stalled: jobs in flight but no progress for 5 minutes\n")
    }
}

async fn readyz(State(s): State<AdminState>) -> Readiness {
    s.health.readiness()
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    match &s.metrics {
        Some(handle) => (StatusCode::OK, telemetry::render_metrics(handle)),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed in this process\n".to_owned()),
    }
}

/// Serves the admin router on `addr` until `cancel`.
pub async fn serve(addr: SocketAddr, router: Router, cancel: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).with_graceful_shutdown(async move { cancel.cancelled().await }).await
}
