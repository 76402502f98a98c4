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

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

    pub fn is_ready(&self) -> bool {
        self.amqp.load(Ordering::Relaxed) && self.redis.load(Ordering::Relaxed)
    }

    /// Alive unless jobs are in flight and nothing has moved for `stall`.
    pub fn is_alive(&self, stall: Duration) -> bool {
        let idle_ms = self.started.elapsed().as_millis() as u64 - self.last_progress_ms.load(Ordering::Relaxed);
        self.in_flight.load(Ordering::Relaxed) == 0 || Duration::from_millis(idle_ms) < stall
    }

    /// Pings Redis every second until `cancel`, for readiness.
    pub fn watch_redis(self: &Arc<Self>, redis: Redis, cancel: CancellationToken) {
        let health = Arc::clone(self);
        tokio::spawn(async move {
            // Reported once per outage, the first one at start included (a TLS or URL mistake).
            let mut reported_down = false;
            loop {
                let failure = match tokio::time::timeout(Duration::from_secs(2), redis.ping()).await {
                    Ok(Ok(())) => None,
                    // The whole chain: the cause (refused, a TLS certificate) is what to act on.
                    Ok(Err(e)) => Some(
                        std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(": "),
                    ),
                    Err(_) => Some("no answer to PING within 2 s".to_owned()),
                };
                health.redis.store(failure.is_none(), Ordering::Relaxed);
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
        });
    }
}

/// Installs the process-wide Prometheus recorder (once; later calls return `None`), with every
/// metric described, `wxpush_build_info` and the process metrics.
pub fn install_metrics() -> Option<PrometheusHandle> {
    // Buckets, not the default summary, so that dashboards can aggregate latency across workers
    // (histogram_quantile over the pool); 5 ms to 10 s covers WeChat up to the HTTP timeout.
    let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let builder =
        PrometheusBuilder::new().set_buckets_for_metric(Matcher::Full("wxpush_send_seconds".into()), &buckets).ok()?;
    let handle = builder.install_recorder().ok()?;
    telemetry::catalog::describe_metrics();
    // install_recorder starts no upkeep: without it histogram samples pile up between scrapes
    // (forever when nothing scrapes), so drain them every few seconds.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let upkeep = handle.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
                // Also for pages rendered elsewhere (the webhook's /metrics).
                telemetry::catalog::collect_process_metrics();
            }
        });
    }
    Some(handle)
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

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let amqp = s.health.amqp.load(Ordering::Relaxed);
    let redis = s.health.redis.load(Ordering::Relaxed);
    let body = format!("rabbitmq: {}\nredis: {}\n", up(amqp), up(redis));
    (if amqp && redis { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

fn up(b: bool) -> &'static str {
    if b { "up" } else { "down" }
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    match &s.metrics {
        Some(handle) => {
            telemetry::catalog::collect_process_metrics();
            (StatusCode::OK, handle.render())
        }
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed in this process\n".to_owned()),
    }
}

/// Serves the admin router on `addr` until `cancel`.
pub async fn serve(addr: SocketAddr, router: Router, cancel: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).with_graceful_shutdown(async move { cancel.cancelled().await }).await
}
