//! The webhook's HTTP server: axum routes on hyper's HTTP/1 connections, with the limits
//! `axum::serve` has no options for, so that slow or stalled clients cannot exhaust the process:
//!
//! - a connection that has not sent a whole request head within the header timeout (also between
//!   keep-alive requests) is closed; a body must arrive within its own deadline (the router's
//!   `RequestBodyDeadlineLayer`);
//! - at most `max_connections` are open at once: at the cap the server stops accepting, and new
//!   connections wait in the kernel's listen backlog until one closes;
//! - a failed `accept` (out of file descriptors, out of memory) backs off instead of spinning;
//! - request buffers are kept small, so a flood of connections costs little memory, and that
//!   memory goes back to the system once they have closed ([`Trimmer`]).

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::metrics;
use crate::backoff::{Backoff, Delays};

/// Largest buffer a connection reads into (hyper's minimum); a request head must fit in it.
/// WeChat's heads are well under 1 KiB; a push body (64 KiB at most) streams through it.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// File descriptors kept free of connections: Redis, RabbitMQ, the admin port, logs.
const RESERVED_FDS: u64 = 64;

/// How often the [`Trimmer`] looks, and how many connections must have closed since its last
/// trim for it to trim again.
const TRIM_EVERY: Duration = Duration::from_secs(5);
const TRIM_AFTER_CLOSED: usize = 256;

/// The limits of one listening port.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// `public` (WeChat's port) or `admin`: the `port` label of the connection metrics.
    pub port: &'static str,
    /// Open connections at most.
    pub max_connections: usize,
    /// Time a connection gets to send a whole request head.
    pub header_timeout: Duration,
    /// After shutdown, how long requests in progress get to finish.
    pub grace: Duration,
}

/// Serves `router` on `listener` within `limits` until `shutdown`, then lets requests in
/// progress finish (up to the grace period).
pub async fn serve(listener: TcpListener, router: Router, limits: ConnLimits, shutdown: CancellationToken) {
    let max = fit_to_fd_limit(limits.port, limits.max_connections);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(READ_BUFFER_BYTES);
    let slots = Arc::new(Semaphore::new(max));
    let graceful = GracefulShutdown::new();
    let mut backoff = AcceptBackoff::new(limits.port);
    let open = metrics::connections_open(limits.port);
    let trimmer = Arc::new(Trimmer::default());
    tokio::spawn(trimmer.clone().run(shutdown.clone()));
    loop {
        // A slot first: at the cap, connections wait in the backlog rather than cost memory here.
        let slot = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.succeeded();
                    stream
                }
                Err(e) => {
                    if let Some(delay) = backoff.failed(&e) {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                    continue;
                }
            },
        };
        // Answers are one small write: do not hold them back for Nagle.
        let _ = stream.set_nodelay(true);
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone())));
        let (open, port, trimmer) = (open.clone(), limits.port, trimmer.clone());
        open.increment(1.0);
        trimmer.opened();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                if e.is_timeout() {
                    metrics::header_timeout(port);
                }
                debug!(port, error = %e, "connection closed with an error");
            }
            open.decrement(1.0);
            trimmer.closed();
            drop(slot);
        });
    }
    // Stop taking connections at once, so that a load balancer sends new pushes elsewhere.
    drop(listener);
    if tokio::time::timeout(limits.grace, graceful.shutdown()).await.is_err() {
        warn!(port = limits.port, "connections still open when the shutdown grace period ended; closing them");
    }
}

/// The connection cap, lowered to what the process's file-descriptor limit allows (after
/// raising the soft limit to the hard one, as servers do): past that, `accept` would fail with
/// EMFILE for everyone, Redis and RabbitMQ connections included.
fn fit_to_fd_limit(port: &'static str, wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            debug!(error = %e, "cannot read the file-descriptor limit; keeping the connection cap as configured");
            return wanted.max(1);
        }
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX).max(1);
    if wanted > room {
        warn!(
            port,
            wanted,
            allowed = room,
            fd_limit = limit,
            "connection cap lowered to fit the file-descriptor limit (raise `ulimit -n` / the container's nofile limit)"
        );
        return room;
    }
    wanted.max(1)
}

/// Gives freed memory back to the system after many connections have closed. glibc's malloc
/// keeps freed heap pages mapped: after a flood of 2,000 stalled connections the process stayed
/// 15 MiB above its idle size until `malloc_trim`. Other allocators return memory by themselves.
#[derive(Default)]
struct Trimmer {
    open: AtomicUsize,
    /// Most connections open at once since the last trim.
    high: AtomicUsize,
}

impl Trimmer {
    fn opened(&self) {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.high.fetch_max(open, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether enough connections closed since the last trim for another to be worth it (and
    /// if so, starts counting from now).
    fn due(&self) -> bool {
        let open = self.open.load(Ordering::Relaxed);
        if self.high.load(Ordering::Relaxed).saturating_sub(open) < TRIM_AFTER_CLOSED {
            return false;
        }
        self.high.store(open, Ordering::Relaxed);
        true
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TRIM_EVERY) => {}
            }
            if self.due() {
                release_free_memory();
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions; it only hands free pages of the heap back to
    // the kernel, under the allocator's own locks.
    let released = unsafe { libc::malloc_trim(0) };
    debug!(released = released == 1, "free heap memory returned to the system");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// How long to wait after a failed `accept`: errors about one connection are skipped at once;
/// running out of descriptors or memory waits, longer each time (up to a second), until an
/// accept succeeds.
struct AcceptBackoff {
    port: &'static str,
    delays: Delays,
    failures: u64,
}

impl AcceptBackoff {
    /// Not jittered: one process waits for its own resources, with no pool to spread.
    const SCHEDULE: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1)).without_jitter();

    fn new(port: &'static str) -> Self {
        AcceptBackoff { port, delays: Self::SCHEDULE.delays(), failures: 0 }
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(port = self.port, failures = self.failures, "accepting connections again");
        }
        self.failures = 0;
        self.delays.reset();
    }

    /// Counts the failure; the time to wait before the next accept, if any.
    fn failed(&mut self, e: &io::Error) -> Option<Duration> {
        // The peer gave up before we accepted: nothing wrong with the server.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
        ) {
            return None;
        }
        let kind = match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => "fd_limit",
            Some(libc::ENOBUFS | libc::ENOMEM) => "memory",
            _ => "other",
        };
        metrics::accept_error(self.port, kind);
        if self.failures == 0 {
            error!(port = self.port, error = %e, kind, "cannot accept connections; backing off until it works again");
        }
        self.failures += 1;
        Some(self.delays.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_descriptors_backs_off_and_connection_errors_do_not() {
        let mut b = AcceptBackoff::new("public");
        assert_eq!(b.failed(&io::Error::from(io::ErrorKind::ConnectionAborted)), None, "a peer's hang-up");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<u64> = (0..10).filter_map(|_| b.failed(&emfile)).map(|d| d.as_millis() as u64).collect();
        // Doubling up to a second: a handful of tries, never a spin.
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1_000, 1_000, 1_000]);
        assert_eq!(b.failures, 10);
        b.succeeded();
        assert_eq!(b.failures, 0);
        assert_eq!(b.failed(&io::Error::from_raw_os_error(libc::ENFILE)), Some(Duration::from_millis(10)));
    }

    #[test]
    fn memory_is_trimmed_once_many_connections_have_closed() {
        let t = Trimmer::default();
        for _ in 0..300 {
            t.opened();
        }
        assert!(!t.due(), "nothing closed yet");
        for _ in 0..100 {
            t.closed();
        }
        assert!(!t.due(), "100 closed: not worth a trim");
        for _ in 0..200 {
            t.closed();
        }
        assert!(t.due(), "300 closed since the peak");
        assert!(!t.due(), "and counted from there on");
        release_free_memory();
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(fit_to_fd_limit("public", 100), 100);
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0;
        assert_eq!(fit_to_fd_limit("public", usize::MAX) as u64, limit - RESERVED_FDS);
        assert_eq!(fit_to_fd_limit("public", 0), 1);
    }
}
