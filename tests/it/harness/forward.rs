//! A TCP forwarder on a loopback port of its own to the tests' RabbitMQ or Redis: a node, or the
//! network path to one, that a test can take away (connections cut, new ones closed at once) or
//! freeze (connections stay open but nothing moves, as with a hung node) without touching the
//! shared service, which the tests running beside it keep using.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use super::services::{amqp_addr, amqp_url_at, redis_addr, redis_url_at};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    On,
    /// Live connections are cut; new ones are closed as soon as they are accepted.
    Off,
    /// Live and new connections stay open, and silent.
    Frozen,
}

#[derive(Clone, Copy)]
enum Service {
    RabbitMq,
    Redis,
}

pub struct Forwarder {
    addr: SocketAddr,
    service: Service,
    mode: watch::Sender<Mode>,
    counts: Arc<Counts>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Counts {
    made: AtomicUsize,
    open: AtomicUsize,
}

impl Forwarder {
    /// Forwards to the tests' RabbitMQ.
    pub async fn to_rabbitmq() -> Forwarder {
        Forwarder::start(Service::RabbitMq, amqp_addr()).await
    }

    /// Forwards to the tests' Redis.
    pub async fn to_redis() -> Forwarder {
        Forwarder::start(Service::Redis, redis_addr()).await
    }

    async fn start(service: Service, upstream: String) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a forwarder");
        let addr = listener.local_addr().expect("the forwarder's address");
        let (mode, _) = watch::channel(Mode::On);
        let counts = Arc::new(Counts::default());
        let (modes, c) = (mode.subscribe(), Arc::clone(&counts));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if *modes.borrow() == Mode::Off {
                    continue;
                }
                c.made.fetch_add(1, Ordering::SeqCst);
                c.open.fetch_add(1, Ordering::SeqCst);
                let (mode, c, upstream) = (modes.clone(), Arc::clone(&c), upstream.clone());
                tokio::spawn(async move {
                    forward(client, &upstream, mode).await;
                    c.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Forwarder { addr, service, mode, counts, accept }
    }

    /// The service's URL, reached through this forwarder.
    pub fn url(&self) -> String {
        match self.service {
            Service::RabbitMq => amqp_url_at(&self.addr.to_string()),
            Service::Redis => redis_url_at(&self.addr.to_string()),
        }
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> usize {
        self.counts.made.load(Ordering::SeqCst)
    }

    /// Forwarded connections still open.
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    /// Cuts every connection, and closes new ones at once, until [`on`](Self::on).
    pub fn off(&self) {
        self.mode.send_replace(Mode::Off);
    }

    /// Forwards new connections again.
    pub fn on(&self) {
        self.mode.send_replace(Mode::On);
    }

    /// Moves no more bytes either way, but keeps every connection open (until `off` or drop).
    pub fn freeze(&self) {
        self.mode.send_replace(Mode::Frozen);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
        self.off();
    }
}

/// Carries one connection while the forwarder is on; holds it, silent, while it is frozen.
async fn forward(mut client: TcpStream, upstream: &str, mut mode: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = mode.wait_for(|m| *m != Mode::On) => {}
    }
    // Both sockets stay open until the forwarder is off or gone.
    let _ = mode.wait_for(|m| *m == Mode::Off).await;
}
