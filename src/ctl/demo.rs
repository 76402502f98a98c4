//! `wxpush-ctl demo`: the README quick start in one process. A WeChat sandbox and a worker run
//! in-process against the local RabbitMQ and Redis, in a namespace of their own
//! (`wxpush-demo-<random>`: queues, exchange and Redis prefix), so a real deployment on the same
//! broker is never touched. The seed's example job goes in, its `send.succeeded` result and the
//! request WeChat (the sandbox) received come out, and everything the demo made is removed.

use std::time::{Duration, Instant};

use lapin::{Connection, types::ShortString};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    CtlError, RPC_TIMEOUT, broker,
    results::{ReceivedResult, ResultWatcher},
};
use crate::telemetry::chain;
use crate::{
    amqp::{self, Topology, json_properties, redact_url},
    config::{Account, AccountKind, Config, TokenApi},
    domain::job::JobKind,
    health::Health,
    sandbox::{Consent, Sandbox, SandboxAccount, SandboxConfig, SentMessage},
    store::Redis,
};

/// The demo account the sandbox knows (not a real appid, but shaped like one, so `check` passes).
pub const DEMO_APPID: &str = "wxde3000000000d3e0";
/// The seed's example job id.
pub const DEMO_JOB_ID: &str = "order-42-paid";

/// Where the demo runs. [`DemoOptions::new`] picks a fresh namespace; tests choose their own.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Prefix of the demo's queues, exchange and Redis keys.
    pub namespace: String,
    pub amqp_url: String,
    pub redis_url: String,
    /// How long to wait for the job's result.
    pub timeout: Duration,
    /// Which kind of message the example job sends (its account is of the kind that sends it).
    pub kind: JobKind,
}

impl DemoOptions {
    /// The broker and Redis of `config` (the local ones by default), a namespace of its own.
    pub fn new(config: &Config) -> Self {
        Self {
            namespace: format!("wxpush-demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            amqp_url: config.amqp_url.clone(),
            redis_url: config.redis_url.clone(),
            timeout: Duration::from_secs(30),
            kind: JobKind::Template,
        }
    }

    /// The worker's configuration: the demo namespace, WeChat at `api_base`.
    pub fn worker_config(&self, api_base: &str, secret: &str) -> Config {
        let ns = &self.namespace;
        let mut config = Config {
            amqp_url: self.amqp_url.clone(),
            redis_url: self.redis_url.clone(),
            redis_prefix: ns.clone(),
            wechat_api_base: api_base.to_owned(),
            jobs_queue: format!("{ns}.jobs"),
            results_exchange: format!("{ns}.results"),
            dead_letter_queue: format!("{ns}.jobs.dead"),
            concurrency: 4,
            shutdown_grace: Duration::from_secs(5),
            http_timeout: Duration::from_secs(2),
            accounts: vec![Account {
                secret: SecretString::from(secret),
                token_api: TokenApi::Stable,
                kind: account_kind(self.kind),
                ..Account::new(crate::domain::job::DEFAULT_ACCOUNT, DEMO_APPID)
            }],
            ..Config::default()
        };
        // Fewer delay queues to create and remove; a demo has no long waits.
        config.retry.delay_tiers_secs = vec![1, 5];
        config
    }
}

/// The kind of account that sends `kind`.
fn account_kind(kind: JobKind) -> AccountKind {
    match kind {
        JobKind::MiniprogramSubscribe => AccountKind::Miniprogram,
        JobKind::Template | JobKind::Subscribe => AccountKind::OfficialAccount,
    }
}

/// The demo's job of `kind`: the seed's template job, or a subscription message with typed data.
pub fn example_job_of(kind: JobKind) -> Value {
    let mut job = match kind {
        JobKind::Template => return example_job(),
        JobKind::Subscribe => json!({"page": "https://example.com/orders/42"}),
        JobKind::MiniprogramSubscribe => {
            json!({"page": "pages/order/index", "miniprogram_state": "trial", "lang": "zh_CN"})
        }
    };
    let fields = [
        ("job_id", json!(DEMO_JOB_ID)),
        ("kind", json!(kind.as_str())),
        ("touser", json!("oia2TjuEGTNoeX76QEjQNrcURxG8")),
        ("template_id", json!("bDmywsp2oEHjwAadTGKkUHpC0RgBVPvfAgsgJ7pWoTA")),
        (
            "data",
            json!({"thing1": {"value": "订单已发货"}, "amount2": {"value": "¥260.00"}, "time3": {"value": "2026-12-02 15:01"}}),
        ),
    ];
    if let Some(obj) = job.as_object_mut() {
        obj.extend(fields.map(|(k, v)| (k.to_owned(), v)));
    }
    job
}

/// The seed's example job (docs/contract.md "Jobs"; the seed document is explained in docs/wechat-api.md#the-seed-document).
pub fn example_job() -> Value {
    let item = |value: &str| json!({"value": value, "color": "#173177"});
    json!({
        "job_id": DEMO_JOB_ID,
        "touser": "oia2TjuEGTNoeX76QEjQNrcURxG8",
        "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
        "url": "http://weixin.qq.com/download",
        "topcolor": "#FF0000",
        "data": {
            "User": item("黄先生"),
            "Date": item("06月07日 19时24分"),
            "CardNumber": item("0426"),
            "Type": item("消费"),
            "Money": item("人民币260.00元"),
            "DeadTime": item("06月07日19时24分"),
            "Left": item("6504.09"),
        }
    })
}

/// What the demo shows.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub namespace: String,
    pub sandbox_url: String,
    pub jobs_queue: String,
    pub results_exchange: String,
    /// The result as it went out on the exchange: its routing key, its body parsed, and the
    /// body's text as published (key order kept).
    pub routing_key: String,
    pub result: Value,
    pub result_text: String,
    /// The template send the sandbox received.
    pub request: SentMessage,
    pub elapsed: Duration,
    /// What could not be removed at the end (empty when all went).
    pub leftovers: Vec<String>,
}

/// Runs the demo: sandbox, worker, one job, its result, clean-up. The clean-up runs whatever
/// happened in between.
pub async fn run(options: &DemoOptions) -> Result<DemoReport, CtlError> {
    let started = Instant::now();
    let connection = reach_services(options).await?;
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(CtlError::Sandbox)?;
    // The demo's recipient has consented (subscription messages need it; templates ignore it).
    let account = SandboxAccount {
        kind: account_kind(options.kind),
        auto_consent: Some(Consent::LongTerm),
        ..SandboxAccount::new(DEMO_APPID, secret.as_str())
    };
    let sandbox = Sandbox::start(SandboxConfig { accounts: vec![account], ..SandboxConfig::default() }, listener)
        .await
        .map_err(CtlError::Sandbox)?;
    let config = options.worker_config(&sandbox.base_url(), &secret);

    let stop = CancellationToken::new();
    let mut worker = {
        let (config, stop) = (config.clone(), stop.clone());
        tokio::spawn(async move { crate::worker::run(config, stop, Health::new()).await })
    };
    // A worker that cannot start ends the demo at once rather than after the timeout.
    let mut worker_exit = None;
    let outcome = tokio::select! {
        outcome = drive(&connection, &config, options.kind, options.timeout) => outcome,
        exit = &mut worker => {
            worker_exit = Some(exit);
            Err(CtlError::Demo("the demo worker stopped before the job was done".into()))
        }
    };
    stop.cancel();
    let worker_exit = match worker_exit {
        Some(exit) => Some(exit),
        None => tokio::time::timeout(config.shutdown_grace + Duration::from_secs(5), worker).await.ok(),
    };
    let leftovers = clean_up(&connection, &config).await;
    broker::close(&connection).await;
    let received = sandbox.messages();
    let sandbox_url = sandbox.base_url();
    sandbox.shutdown_and_wait().await;

    match worker_exit {
        Some(Ok(Err(e))) => return Err(CtlError::Worker(e)),
        Some(Err(panic)) => return Err(CtlError::Demo(format!("the demo worker crashed: {panic}"))),
        _ => {}
    }
    let result = outcome?;
    let result_json: Value =
        serde_json::from_slice(&result.body).unwrap_or_else(|_| Value::String(lossy(&result.body)));
    let msgid = result_json.get("msgid").and_then(Value::as_u64);
    let request = received.into_iter().find(|m| Some(m.msgid) == msgid).ok_or_else(|| {
        CtlError::Demo("the worker reported a msgid the sandbox never gave out; this is a bug, please report it".into())
    })?;
    Ok(DemoReport {
        namespace: options.namespace.clone(),
        sandbox_url,
        jobs_queue: config.jobs_queue.clone(),
        results_exchange: config.results_exchange.clone(),
        routing_key: result.routing_key.clone(),
        result: result_json,
        result_text: lossy(&result.body),
        request,
        elapsed: started.elapsed(),
        leftovers,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Connects to RabbitMQ and pings Redis, saying how to start whichever is missing.
async fn reach_services(options: &DemoOptions) -> Result<Connection, CtlError> {
    let connection = broker::connect_url(&options.amqp_url, "demo").await.map_err(|e| CtlError::NotReachable {
        service: "RabbitMQ",
        url: redact_url(&options.amqp_url),
        // The root cause only: the URL and the advice are in this message already.
        detail: match e {
            CtlError::Amqp(amqp::AmqpError::Connect { source, .. }) => chain(&source).to_string(),
            other => chain(&other).to_string(),
        },
        start: "`docker run -d --name rabbitmq -p 5672:5672 rabbitmq:4` or `systemctl start rabbitmq-server`",
        var: "WXPUSH_AMQP_URL",
    })?;
    let redis_down = |detail: String| CtlError::NotReachable {
        service: "Redis",
        url: super::status::redact_redis_url(&options.redis_url),
        detail,
        start: "`docker run -d --name redis -p 6379:6379 redis:7` or `systemctl start redis-server`",
        var: "WXPUSH_REDIS_URL",
    };
    let pinged = tokio::time::timeout(RPC_TIMEOUT, async {
        let redis = Redis::connect(&options.redis_url, &options.namespace).await?;
        redis.ping().await
    })
    .await;
    let failure = match pinged {
        Ok(Ok(())) => None,
        Ok(Err(crate::store::StoreError::Redis(e))) => Some(redis_down(chain(&e).to_string())),
        Ok(Err(e)) => Some(redis_down(chain(&e).to_string())),
        Err(_) => Some(redis_down(format!("no answer within {} s", RPC_TIMEOUT.as_secs()))),
    };
    if let Some(e) = failure {
        broker::close(&connection).await;
        return Err(e);
    }
    Ok(connection)
}

/// Watches the results, publishes the example job, waits for its result.
async fn drive(
    connection: &Connection,
    config: &Config,
    kind: JobKind,
    timeout: Duration,
) -> Result<ReceivedResult, CtlError> {
    // The topology first, as the worker declares it, so the job has a queue before the worker
    // is up, and the watcher sees every result.
    Topology::from_config(config).declare(connection).await?;
    let mut watcher = ResultWatcher::start(connection, config, "send.*").await?;

    let publisher = amqp::Publisher::open(connection).await?;
    let body =
        serde_json::to_vec(&example_job_of(kind)).map_err(|e| CtlError::Demo(format!("example job: {}", chain(&e))))?;
    let props = json_properties(None).with_message_id(ShortString::from(DEMO_JOB_ID));
    publisher.publish("", &config.jobs_queue, &body, props, true).await.map_err(|e| {
        CtlError::Demo(format!("could not publish the example job to {}: {}", config.jobs_queue, chain(&e)))
    })?;

    let deadline = tokio::time::Instant::now() + timeout;
    let found = loop {
        match tokio::time::timeout_at(deadline, watcher.next()).await {
            Err(_) => {
                break Err(CtlError::Demo(format!(
                    "no result for job {DEMO_JOB_ID} within {} s; run with RUST_LOG=info to see what the worker did",
                    timeout.as_secs()
                )));
            }
            Ok(None) => break Err(CtlError::ResultsClosed),
            Ok(Some(Err(e))) => break Err(e),
            Ok(Some(Ok(r))) if r.job_id().as_deref() == Some(DEMO_JOB_ID) => break Ok(r),
            Ok(Some(Ok(_))) => continue,
        }
    };
    watcher.close().await;
    let result = found?;
    if !result.succeeded() {
        return Err(CtlError::Demo(format!(
            "the example job failed ({}): {}",
            result.routing_key,
            String::from_utf8_lossy(&result.body)
        )));
    }
    Ok(result)
}

/// Deletes the demo's queues, exchange and Redis keys; returns what could not be removed.
async fn clean_up(connection: &Connection, config: &Config) -> Vec<String> {
    let mut leftovers = Vec::new();
    let topology = Topology::from_config(config);
    let unrouted = super::results::unrouted_queue(config);
    let mut queues = vec![config.jobs_queue.clone(), config.dead_letter_queue.clone(), unrouted.clone()];
    queues.extend(topology.delay_tiers_secs.iter().map(|&s| topology.delay_queue(s)));
    // The results exchange and its alternate exchange (named as the unrouted queue).
    let exchanges = [config.results_exchange.clone(), unrouted];
    let names = queues.iter().map(|q| (true, q)).chain(exchanges.iter().map(|e| (false, e)));
    for (is_queue, name) in names {
        // A failed delete closes its channel, so each gets its own.
        let deleted = async {
            let ch = connection.create_channel().await?;
            let short = ShortString::from(name.as_str());
            if is_queue {
                ch.queue_delete(short, Default::default()).await?;
            } else {
                ch.exchange_delete(short, Default::default()).await?;
            }
            ch.close(200, ShortString::from("done")).await
        };
        if !matches!(tokio::time::timeout(RPC_TIMEOUT, deleted).await, Ok(Ok(()))) {
            leftovers.push(format!("{} {name}", if is_queue { "queue" } else { "exchange" }));
        }
    }
    if let Err(e) = delete_redis_keys(&config.redis_url, &config.redis_prefix).await {
        leftovers.push(format!("Redis keys {}:* ({})", config.redis_prefix, chain(&e)));
    }
    leftovers
}

/// Deletes every key under `prefix:`.
async fn delete_redis_keys(url: &str, prefix: &str) -> Result<(), CtlError> {
    let redis = Redis::connect(url, prefix).await?;
    match tokio::time::timeout(RPC_TIMEOUT, redis.delete_all()).await {
        Ok(deleted) => Ok(deleted?),
        Err(_) => Err(CtlError::RedisTimeout { secs: RPC_TIMEOUT.as_secs() }),
    }
}

/// Re-indents JSON text without reordering it: containers down to `expand_depth` levels get
/// one member a line, deeper ones stay on one line (`{"value": "黄先生", "color": "#173177"}`).
pub fn pretty_json(text: &str, expand_depth: usize) -> String {
    fn newline(out: &mut String, depth: usize) {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() * 2);
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if chars.get(j) == Some(&close) {
                    out.push(c);
                    out.push(close);
                    i = j + 1;
                    continue;
                }
                depth += 1;
                out.push(c);
                if depth <= expand_depth {
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                if depth <= expand_depth {
                    newline(&mut out, depth.saturating_sub(1));
                }
                depth = depth.saturating_sub(1);
                out.push(c);
            }
            ',' => {
                out.push(',');
                if depth <= expand_depth {
                    newline(&mut out, depth);
                } else {
                    out.push(' ');
                }
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "wxpush demo: namespace {}, WeChat sandbox at {}", self.namespace, self.sandbox_url)?;
        writeln!(f)?;
        writeln!(f, "1. published job {DEMO_JOB_ID} to {}", self.jobs_queue)?;
        writeln!(f)?;
        writeln!(
            f,
            "2. the worker sent it; WeChat (the sandbox) received POST /cgi-bin/message/template/send \
             (appid {}, msgid {}):",
            self.request.appid, self.request.msgid
        )?;
        writeln!(f, "{}", pretty_json(&self.request.body.to_string(), 2))?;
        writeln!(f)?;
        writeln!(f, "3. result on exchange {}, routing key {}:", self.results_exchange, self.routing_key)?;
        writeln!(f, "{}", pretty_json(&self.result_text, 2))?;
        writeln!(f)?;
        if self.leftovers.is_empty() {
            writeln!(
                f,
                "worker stopped; the demo's queues, exchange and Redis keys are removed ({:.1} s in all)",
                self.elapsed.as_secs_f64()
            )
        } else {
            writeln!(f, "worker stopped; could not remove: {} (delete them by hand)", self.leftovers.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_job_is_a_valid_job() {
        let body = serde_json::to_vec(&example_job()).unwrap();
        let job = crate::domain::job::Job::parse(&body, None).unwrap();
        assert_eq!(job.job_id, DEMO_JOB_ID);
        assert_eq!(job.data.len(), 7);
        for kind in JobKind::ALL {
            let body = serde_json::to_vec(&example_job_of(kind)).unwrap();
            let job = crate::domain::job::Job::parse(&body, None).unwrap();
            assert_eq!(job.kind, kind);
            assert!(account_kind(kind).sends(kind));
        }
    }

    #[test]
    fn the_namespace_is_fresh_and_owns_every_name() {
        let options = DemoOptions::new(&Config::default());
        assert!(options.namespace.starts_with("wxpush-demo-"));
        assert_ne!(options.namespace, DemoOptions::new(&Config::default()).namespace);
        let c = options.worker_config("http://127.0.0.1:1", "s");
        for name in [&c.jobs_queue, &c.results_exchange, &c.dead_letter_queue, &c.redis_prefix] {
            assert!(name.starts_with(&options.namespace), "{name}");
        }
    }

    #[test]
    fn json_is_reindented_in_its_own_order() {
        let text = r##"{"type":"send","data":{"User":{"value":"黄先生, \"x\": {","color":"#173177"},"E":{}},"list":[],"n":1}"##;
        let expected = "{\n  \"type\": \"send\",\n  \"data\": {\n    \"User\": {\"value\": \"黄先生, \\\"x\\\": {\", \"color\": \"#173177\"},\n    \"E\": {}\n  },\n  \"list\": [],\n  \"n\": 1\n}";
        assert_eq!(pretty_json(text, 2), expected);
        let back: Value = serde_json::from_str(&pretty_json(text, 2)).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(text).unwrap());
    }
}
