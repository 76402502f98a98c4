//! The webhook's rig: one test's webhook in this process on free ports, with its own exchange,
//! queues and Redis prefix (a [`TestEnv`], removed when it drops), accounts in each message mode
//! to push for, signed pushes, and readers of what it published. Waits are bounded; "nothing
//! more arrived" is shown by a marker event sent afterwards and read up to (the webhook publishes
//! on one channel, so the broker keeps the order), never by sleeping.

use std::{sync::Arc, time::Duration};

use crate::wx::{
    Cipher, Config, Listeners, ReconnectingPublisher, Redis, Webhook, WebhookSettings, crypto, dead_letter_queue_args,
    serve_with,
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Consumer,
    message::Delivery,
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
};
use rand::{Rng, distr::Alphanumeric};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{TestEnv, amqp_url, eventually, recorder, redis_url, unique};

/// How long a test waits for an answer, a result or a dead letter.
pub const WAIT: Duration = Duration::from_secs(15);

pub const DEFAULT_APPID: &str = "wxdefault0000001";
pub const SAFE_APPID: &str = "wxsafe0000000001";
pub const ROT_APPID: &str = "wxrotating000001";
pub const SWITCHING_APPID: &str = "wxswitching00001";

pub fn random(n: usize) -> String {
    rand::rng().sample_iter(Alphanumeric).take(n).map(char::from).collect()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A receipt as WeChat pushes it.
pub fn receipt_xml(msgid: u64, status: &str) -> String {
    format!(
        "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658984</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>{msgid}</MsgID>\n<Status><![CDATA[{status}]]></Status>\n</xml>"
    )
}

/// Options of one test's webhook.
pub struct Options {
    pub timestamp_window: Option<Duration>,
    pub amqp_url: String,
    /// Redis as the webhook sees it (the test itself always uses the real one).
    pub redis_url: String,
    pub msgid_wait: Duration,
    /// Open connections on the public port at most (`None`: the default).
    pub max_connections: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timestamp_window: Some(Duration::from_secs(300)),
            amqp_url: amqp_url().into(),
            redis_url: redis_url().into(),
            msgid_wait: Duration::from_millis(1500),
            max_connections: None,
        }
    }
}

/// One test's webhook, its namespace and readers of its results and dead letters.
pub struct Harness {
    /// The public address WeChat pushes to.
    pub base: String,
    /// The admin address: `/healthz`, `/readyz`, `/metrics`.
    pub admin: String,
    pub http: reqwest::Client,
    /// Redis as the test sees it, with the webhook's prefix.
    pub redis: Redis,
    pub safe_key: String,
    pub rot_new_key: String,
    pub rot_old_key: String,
    /// Cancelling it starts the webhook's shutdown.
    pub stop: CancellationToken,
    env: TestEnv,
    dead: Consumer,
    server: JoinHandle<()>,
    marker: u64,
}

/// The webhook's configuration: an account in each message mode, and one without a token.
fn webhook_config(ns: &str, safe_key: &str, rot_new_key: &str, rot_old_key: &str) -> Config {
    let toml = format!(
        r#"
        redis_prefix = "{ns}"
        jobs_queue = "{ns}.jobs"
        results_exchange = "{ns}.results"
        dead_letter_queue = "{ns}.jobs.dead"
        [[accounts]]
        name = "default"
        appid = "{DEFAULT_APPID}"
        callback_token = "AAAAA"
        [[accounts]]
        name = "safe"
        appid = "{SAFE_APPID}"
        callback_token = "safetoken"
        encoding_aes_key = "{safe_key}"
        [[accounts]]
        name = "rotating"
        appid = "{ROT_APPID}"
        callback_token = "rottoken"
        encoding_aes_key = "{rot_new_key}"
        previous_encoding_aes_key = "{rot_old_key}"
        [[accounts]]
        name = "switching"
        appid = "{SWITCHING_APPID}"
        callback_token = "switchtoken"
        encoding_aes_key = "{safe_key}"
        accept_plaintext = true
        [[accounts]]
        name = "notoken"
        appid = "wxnotoken0000001"
        "#
    );
    Config::from_sources("test", &toml, |_| None).expect("test config")
}

impl Harness {
    pub async fn start(opts: Options) -> Harness {
        let ns = unique("webhook");
        let (safe_key, rot_new_key, rot_old_key) = (random(43), random(43), random(43));
        let config = webhook_config(&ns, &safe_key, &rot_new_key, &rot_old_key);
        let mut settings = WebhookSettings::from_config(&config);
        settings.timestamp_window = opts.timestamp_window;
        settings.msgid_wait = opts.msgid_wait;
        settings.publish_timeout = Duration::from_secs(5);
        if let Some(max) = opts.max_connections {
            settings.max_connections = max;
        }
        // The results exchange with a reader bound to all of it, before the webhook starts.
        let env = TestEnv::new("webhook", config.clone()).await;
        let dead = read_dead_letters(&env).await;

        let redis = Redis::connect(redis_url(), &ns).await.expect("Redis is up");
        let broker = ReconnectingPublisher::new(&opts.amqp_url, "wxpush-webhook-test");
        let webhook_redis = Redis::connect(&opts.redis_url, &ns).await.expect("webhook's Redis");
        let mut webhook = Webhook::new(&config, settings, broker, webhook_redis).expect("webhook");
        // One recorder for the whole test process: series are shared between tests, so tests
        // compare counts before and after, on labels only they produce.
        let prometheus = recorder();
        webhook = webhook.with_metrics(Arc::new(move || prometheus.render()));
        let listeners = Listeners {
            public: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind admin"),
        };
        let base = format!("http://{}", listeners.public.local_addr().expect("addr"));
        let admin = format!("http://{}", listeners.admin.local_addr().expect("admin addr"));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            serve_with(webhook, listeners, async move { stopped.cancelled().await }).await.expect("serve");
        });
        let http = reqwest::Client::new();
        Harness {
            base,
            admin,
            http,
            redis,
            safe_key,
            rot_new_key,
            rot_old_key,
            stop,
            env,
            dead,
            server,
            marker: 9_000_000_000,
        }
    }

    /// Stops the webhook, which must stop within [`WAIT`]; the namespace goes with the harness.
    pub async fn finish(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.server).await.expect("webhook stops").expect("webhook task");
    }

    pub fn url(&self, path: &str, query: &str) -> String {
        format!("{}{path}?{query}", self.base)
    }

    /// GET on the admin address.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        self.send(self.http.get(format!("{}{path}", self.admin))).await
    }

    /// The value of one series on the admin `/metrics` (0 when it does not exist yet).
    pub async fn metric(&self, series: &str) -> f64 {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }

    /// A plaintext POST, signed with `token`.
    pub async fn post_plain(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> (StatusCode, String) {
        let (ts, nonce) = (now().to_string(), random(9));
        let sig = crypto::signature(token, &ts, &nonce);
        let q = format!("signature={sig}&timestamp={ts}&nonce={nonce}&openid=oia2TjuEGTNoeX76QEjQNrcURxG8");
        self.send(self.http.post(self.url(path, &q)).body(body)).await
    }

    /// A safe-mode POST: `plaintext` encrypted with `key` for `appid`, signed with `token`.
    pub async fn post_aes(
        &self,
        path: &str,
        token: &str,
        key: &str,
        appid: &str,
        plaintext: &str,
    ) -> (StatusCode, String) {
        let encrypt = Cipher::new(key).expect("key").encrypt(&rand::random(), plaintext.as_bytes(), appid);
        let body = format!(
            "<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
        );
        self.post_envelope(path, token, &encrypt, body).await
    }

    pub async fn post_envelope(&self, path: &str, token: &str, encrypt: &str, body: String) -> (StatusCode, String) {
        let (ts, nonce) = (now().to_string(), random(9));
        let sig = crypto::signature(token, &ts, &nonce);
        let msg_sig = crypto::msg_signature(token, &ts, &nonce, encrypt);
        let q =
            format!("signature={sig}&timestamp={ts}&nonce={nonce}&openid=o&encrypt_type=aes&msg_signature={msg_sig}");
        self.send(self.http.post(self.url(path, &q)).body(body)).await
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, String) {
        let resp = req.timeout(WAIT).send().await.expect("request");
        let status = resp.status();
        (status, resp.text().await.expect("body"))
    }

    pub async fn write_msgid_record(&self, appid: &str, msgid: u64, job_id: &str) {
        let key = self.redis.keys().msgid(appid, msgid);
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(job_id)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut self.redis.conn())
            .await
            .expect("set");
    }

    /// Waits until the webhook holds the push of `event` (`receipt:<msgid>:<status>`, …) for
    /// `appid`: its pending mark is in Redis (set in the same step that first looks for the
    /// push's msgid record).
    pub async fn until_held(&self, appid: &str, event: &str) {
        let key = self.redis.keys().push_seen(appid, event);
        let held = eventually(WAIT, || async {
            let mark: Option<String> =
                redis::cmd("GET").arg(&key).query_async(&mut self.redis.conn()).await.unwrap_or(None);
            mark.is_some_and(|m| m.starts_with('P'))
        })
        .await;
        assert!(held, "the webhook did not take the push of {event} within {WAIT:?}");
    }

    pub async fn next_result(&mut self) -> Delivery {
        self.env.next_delivery(WAIT).await.unwrap_or_else(|| panic!("no result within {WAIT:?}"))
    }

    pub async fn next_dead(&mut self) -> Delivery {
        match tokio::time::timeout(WAIT, self.dead.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("no dead letter within {WAIT:?}: {:?}", other.map(|o| o.map(|r| r.map(|d| d.data)))),
        }
    }

    /// Pushes a marker receipt and returns every result that arrived before it.
    pub async fn results_until_marker(&mut self) -> Vec<Delivery> {
        self.marker += 1;
        let marker = self.marker;
        self.write_msgid_record(DEFAULT_APPID, marker, "marker").await;
        let (status, _) = self.post_plain("/wechat", "AAAAA", receipt_xml(marker, "success")).await;
        assert_eq!(status, StatusCode::OK, "marker push");
        self.read_until(Source::Results, |d| json(d)["msgid"] == marker).await
    }

    /// Results that arrived before a marker the test publishes straight to the exchange.
    pub async fn results_until_direct_marker(&mut self) -> Vec<Delivery> {
        let marker = format!("{{\"marker\":\"{}\"}}", random(12));
        let exchange = ShortString::from(self.env.config.results_exchange.as_str());
        let options = BasicPublishOptions::default();
        let publish = self.env.bus.channel.basic_publish(
            exchange,
            ShortString::from("test.marker"),
            options,
            marker.as_bytes(),
            BasicProperties::default(),
        );
        drop(publish.await.expect("publish marker"));
        self.read_until(Source::Results, |d| d.data == marker.as_bytes()).await
    }

    /// Dead letters that arrived before a marker dead letter (an unreadable push of its own).
    pub async fn dead_until_marker(&mut self) -> Vec<Delivery> {
        let marker = format!("<xml><Marker>{}</Marker>", random(12));
        let (status, _) = self.post_plain("/wechat", "AAAAA", marker.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "marker dead letter");
        self.read_until(Source::Dead, |d| d.data == marker.as_bytes()).await
    }

    /// What arrives from `source` before the delivery `is_marker` picks.
    async fn read_until(&mut self, source: Source, is_marker: impl Fn(&Delivery) -> bool) -> Vec<Delivery> {
        let mut before = Vec::new();
        loop {
            let d = match source {
                Source::Results => self.next_result().await,
                Source::Dead => self.next_dead().await,
            };
            if is_marker(&d) {
                return before;
            }
            before.push(d);
        }
    }
}

enum Source {
    Results,
    Dead,
}

/// Declares the dead-letter queue the webhook parks unreadable pushes in, and reads it.
async fn read_dead_letters(env: &TestEnv) -> Consumer {
    let channel = &env.bus.channel;
    let dlq = env.config.dead_letter_queue.as_str();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let args = dead_letter_queue_args(env.config.queue_type);
    channel.queue_declare(ShortString::from(dlq), durable, args).await.expect("declare the dead-letter queue");
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let tag = ShortString::from(format!("test-{}", random(6)));
    channel.basic_consume(ShortString::from(dlq), tag, no_ack, FieldTable::default()).await.expect("consume")
}

/// A delivery's body as JSON.
pub fn json(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).expect("JSON body")
}

pub fn correlation_id(d: &Delivery) -> Option<String> {
    d.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned())
}
