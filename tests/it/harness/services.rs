//! Where the tests and benchmarks find RabbitMQ and Redis: `WXPUSH_TEST_AMQP_URL` and
//! `WXPUSH_TEST_REDIS_URL` (defaults: the local services, guest/guest), so the suite also runs
//! against the services of deploy/docker-compose.yml or any other pair.
//!
//! The first use checks that both answer. When one does not, the test binary stops at once with
//! one line saying how to start them, instead of every test failing with a connection error.
//! (Standalone: benches include this file with `#[path]`.)

use std::{
    io::Write,
    net::{TcpStream, ToSocketAddrs},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

struct Services {
    amqp: String,
    redis: String,
}

fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        let s = Services {
            amqp: std::env::var("WXPUSH_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned()),
            redis: std::env::var("WXPUSH_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned()),
        };
        let down: Vec<String> =
            [("RabbitMQ", "WXPUSH_TEST_AMQP_URL", &s.amqp), ("Redis", "WXPUSH_TEST_REDIS_URL", &s.redis)]
                .into_iter()
                .filter(|(_, _, url)| !answers(&address(url)))
                .map(|(name, var, url)| format!("{name} on {} ({var})", address(url)))
                .collect();
        if !down.is_empty() {
            // Straight to stderr: the test harness captures `eprintln!`, and would drop it on exit.
            let _ = writeln!(
                std::io::stderr(),
                "\n{} {} not answer: `scripts/services up` starts RabbitMQ and Redis (or set the variable named to a \
                 server that runs); `cargo test --lib` needs neither.\n",
                down.join(" and "),
                if down.len() == 1 { "does" } else { "do" }
            );
            std::process::exit(2);
        }
        s
    })
}

fn answers(address: &str) -> bool {
    let Ok(addrs) = address.to_socket_addrs() else { return false };
    addrs.into_iter().any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

fn parse(url: &str) -> url::Url {
    url::Url::parse(url).unwrap_or_else(|e| panic!("{url} is not a URL: {e}"))
}

/// `host:port` of a service URL.
fn address(url: &str) -> String {
    let u = parse(url);
    let default = if u.scheme().starts_with("amqp") { 5672 } else { 6379 };
    format!("{}:{}", u.host_str().unwrap_or("127.0.0.1"), u.port().unwrap_or(default))
}

/// `url` with another user and password.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let mut u = parse(url);
    u.set_username(user).and_then(|()| u.set_password(Some(password))).expect("a URL with a host");
    u.to_string()
}

/// `url` pointing at `addr` (`host:port`), same credentials and path.
fn at(url: &str, addr: &str) -> String {
    let mut u = parse(url);
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    u.set_host(Some(host)).expect("a host");
    u.set_port(Some(port.parse().expect("a port"))).expect("a port");
    u.to_string()
}

/// RabbitMQ for the tests.
pub fn amqp_url() -> &'static str {
    &services().amqp
}

/// Redis for the tests.
pub fn redis_url() -> &'static str {
    &services().redis
}

/// `host:port` of the tests' RabbitMQ, for proxies that stand in front of it.
pub fn amqp_addr() -> String {
    address(amqp_url())
}

/// `host:port` of the tests' Redis.
pub fn redis_addr() -> String {
    address(redis_url())
}

/// The tests' RabbitMQ URL, reached through `addr` instead (a proxy, a closed port).
pub fn amqp_url_at(addr: &str) -> String {
    at(amqp_url(), addr)
}

/// The tests' Redis URL, reached through `addr` instead.
pub fn redis_url_at(addr: &str) -> String {
    at(redis_url(), addr)
}

/// The tests' RabbitMQ as another user.
pub fn amqp_url_as(user: &str, password: &str) -> String {
    with_user(amqp_url(), user, password)
}

/// The tests' Redis as another (ACL) user.
pub fn redis_url_as(user: &str, password: &str) -> String {
    with_user(redis_url(), user, password)
}

/// `rabbitmqctl` for the tests' broker: `WXPUSH_TEST_RABBITMQCTL` (words, e.g. `docker compose
/// -f deploy/docker-compose.yml exec -T rabbitmq rabbitmqctl`, which `scripts/services env`
/// prints for the Docker broker), else `rabbitmqctl` on the PATH.
pub fn rabbitmqctl() -> Command {
    let words = std::env::var("WXPUSH_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut words = words.split_whitespace();
    let mut command = Command::new(words.next().unwrap_or("rabbitmqctl"));
    command.args(words);
    command
}
