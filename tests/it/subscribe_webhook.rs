//! Subscription-message events through a running wxpush-webhook, against the real RabbitMQ and
//! Redis: `subscribe_msg_sent_event` tied to its job, popup and change events as consent events,
//! in XML and JSON, plaintext and safe mode (docs/wechat-api.md, section 6, "Events").
//!
//! Each test runs its own webhook with four accounts (an official account and a mini program,
//! each in plaintext and in safe mode) in a namespace of its own (`harness::TestEnv`). "Nothing
//! more arrived" is shown by pushing a marker event and reading up to it, never by sleeping.
//!
//! The small harness below ([`Hook`]) starts the webhook, signs and encrypts pushes as WeChat
//! does; it stands beside the one of tests/it/harness/webhook.rs until the two are merged.

use std::time::Duration;

use crate::harness::{Received, TestEnv, unique};
use crate::wx::{Account, AccountKind, Cipher, Config, Listeners, Redis, Webhook, WebhookSettings, crypto, serve_with};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// An account the webhook takes pushes for.
#[derive(Clone, Copy)]
pub(crate) struct Acct {
    pub(crate) name: &'static str,
    pub(crate) appid: &'static str,
    pub(crate) token: &'static str,
    pub(crate) aes_key: Option<&'static str>,
    pub(crate) kind: AccountKind,
}

impl Acct {
    pub(crate) fn path(&self) -> String {
        if self.name == "default" { "/wechat".into() } else { format!("/wechat/{}", self.name) }
    }

    /// The `kind` its sent and consent events carry.
    fn job_kind(&self) -> &'static str {
        match self.kind {
            AccountKind::OfficialAccount => "subscribe",
            AccountKind::Miniprogram => "miniprogram_subscribe",
        }
    }
}

pub(crate) const OA: Acct = Acct {
    name: "default",
    appid: "wxsuboa000000001",
    token: "oatoken",
    aes_key: None,
    kind: AccountKind::OfficialAccount,
};
const OA_SAFE: Acct = Acct {
    name: "oa-safe",
    appid: "wxsuboasafe00001",
    token: "oasafetoken",
    aes_key: Some("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"),
    kind: AccountKind::OfficialAccount,
};
const MINI: Acct =
    Acct { name: "mini", appid: "wxsubmini0000001", token: "minitoken", aes_key: None, kind: AccountKind::Miniprogram };
pub(crate) const MINI_SAFE: Acct = Acct {
    name: "mini-safe",
    appid: "wxsubminisafe001",
    token: "minisafetoken",
    aes_key: Some("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"),
    kind: AccountKind::Miniprogram,
};
const ACCOUNTS: [Acct; 4] = [OA, OA_SAFE, MINI, MINI_SAFE];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Xml,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Safe,
}

/// One `List` item: its fields, in order, as strings (WeChat's JSON sends every value as one).
type Item = Vec<(&'static str, String)>;

fn sent(template_id: &str, msgid: u64, error_code: i64, error_status: &str) -> Item {
    vec![
        ("TemplateId", template_id.into()),
        ("MsgID", msgid.to_string()),
        ("ErrorCode", error_code.to_string()),
        ("ErrorStatus", error_status.into()),
    ]
}

fn popup(template_id: &str, status: &str, scene: &str) -> Item {
    vec![("TemplateId", template_id.into()), ("SubscribeStatusString", status.into()), ("PopupScene", scene.into())]
}

fn change(template_id: &str, status: &str) -> Item {
    vec![("TemplateId", template_id.into()), ("SubscribeStatusString", status.into())]
}

/// The element that wraps `List` in XML.
fn wrapper(event: &str) -> &'static str {
    match event {
        "subscribe_msg_sent_event" => "SubscribeMsgSentEvent",
        "subscribe_msg_popup_event" => "SubscribeMsgPopupEvent",
        _ => "SubscribeMsgChangeEvent",
    }
}

/// A subscription event as WeChat pushes it: XML with one `<List>` per item, or JSON with
/// `List` one object for one item and an array for several.
fn event_body(format: Format, event: &str, openid: &str, create_time: i64, items: &[Item]) -> String {
    match format {
        Format::Xml => {
            let field = |(k, v): &(&str, String)| {
                // Numbers are plain text in WeChat's samples, words are CDATA.
                if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
                    format!("<{k}>{v}</{k}>")
                } else {
                    format!("<{k}><![CDATA[{v}]]></{k}>")
                }
            };
            let list: String = items
                .iter()
                .map(|item| format!("<List>{}</List>", item.iter().map(field).collect::<String>()))
                .collect();
            let w = wrapper(event);
            format!(
                "<xml><ToUserName><![CDATA[gh_123456789abc]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName><CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event><{w}>{list}</{w}></xml>"
            )
        }
        Format::Json => {
            let object = |item: &Item| Value::Object(item.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect());
            let list = match items {
                [one] => object(one),
                many => Value::Array(many.iter().map(object).collect()),
            };
            json_body(event, openid, create_time, list)
        }
    }
}

/// A JSON push of `event` whose `List` is `list`, whatever it is.
fn json_body(event: &str, openid: &str, create_time: i64, list: Value) -> String {
    json!({
        "ToUserName": "gh_123456789abc",
        "FromUserName": openid,
        "CreateTime": create_time.to_string(),
        "MsgType": "event",
        "Event": event,
        "List": list,
    })
    .to_string()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A fresh openid (each test's pushes are their own events).
fn openid() -> String {
    format!("o{}", &uuid::Uuid::new_v4().simple().to_string()[..27])
}

/// A msgid past 2^53, different in each call: exact 64-bit handling is part of every test.
fn msgid() -> u64 {
    (1u64 << 60) + u64::from(rand::random::<u32>())
}

/// One test's webhook, its namespace, and a view of its results.
pub(crate) struct Hook {
    pub(crate) env: TestEnv,
    pub(crate) base: String,
    http: reqwest::Client,
    redis: Redis,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

impl Hook {
    pub(crate) async fn start(tag: &str) -> Hook {
        let ns = unique(tag);
        let mut config = crate::harness::config(&ns, "http://127.0.0.1:9");
        config.accounts = ACCOUNTS.iter().map(account).collect();
        let env = TestEnv::new(tag, config).await;
        let config: &Config = &env.config;
        let mut settings = WebhookSettings::from_config(config);
        settings.msgid_wait = Duration::from_millis(300);
        settings.publish_timeout = Duration::from_secs(5);
        let webhook_redis = Redis::connect(crate::harness::redis_url(), &ns).await.expect("webhook's Redis");
        let webhook =
            Webhook::new(config, settings, crate::wx::webhook_broker(config), webhook_redis).expect("webhook");
        let listeners = Listeners {
            public: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind admin"),
        };
        let base = format!("http://{}", listeners.public.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            serve_with(webhook, listeners, async move { stopped.cancelled().await }).await.expect("serve");
        });
        let redis = Redis::connect(crate::harness::redis_url(), &ns).await.expect("Redis is up");
        Hook { env, base, http: reqwest::Client::new(), redis, stop, server }
    }

    /// Stops the webhook; the namespace goes when `env` drops.
    pub(crate) async fn finish(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.server).await.expect("webhook stops").expect("webhook task");
    }

    /// The msgid record the worker writes when WeChat accepts a send, written the worker's way.
    async fn record_msgid(&self, acct: Acct, msgid: u64, job_id: &str) {
        let ttl = Duration::from_secs(60);
        self.redis.record_sent(job_id, b"{}", ttl, acct.appid, msgid, ttl).await.expect("record the msgid");
    }

    /// Pushes `body` to `acct` as WeChat would: signed, and in safe mode encrypted inside an
    /// envelope of the body's own format.
    async fn push(&self, acct: Acct, mode: Mode, body: &str) -> (StatusCode, String) {
        let (ts, nonce) = (now().to_string(), uuid::Uuid::new_v4().simple().to_string());
        let signature = crypto::signature(acct.token, &ts, &nonce);
        let mut query = format!("signature={signature}&timestamp={ts}&nonce={nonce}&openid=o");
        let body = match mode {
            Mode::Plain => body.to_owned(),
            Mode::Safe => {
                let key = acct.aes_key.expect("a safe-mode account");
                let encrypt = Cipher::new(key).expect("key").encrypt(&rand::random(), body.as_bytes(), acct.appid);
                let msg_signature = crypto::msg_signature(acct.token, &ts, &nonce, &encrypt);
                query.push_str(&format!("&encrypt_type=aes&msg_signature={msg_signature}"));
                if body.starts_with('{') {
                    json!({"ToUserName": "gh_123456789abc", "Encrypt": encrypt}).to_string()
                } else {
                    format!(
                        "<xml><ToUserName><![CDATA[gh_123456789abc]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
                    )
                }
            }
        };
        let url = format!("{}{}?{query}", self.base, acct.path());
        let resp = self.http.post(url).body(body).timeout(WAIT).send().await.expect("request");
        (resp.status(), resp.text().await.expect("body"))
    }

    /// Pushes and expects WeChat's `success`.
    async fn push_ok(&self, acct: Acct, mode: Mode, body: &str) {
        assert_eq!(self.push(acct, mode, body).await, (StatusCode::OK, "success".into()), "{body}");
    }

    /// The next `n` results, in order.
    async fn results(&mut self, n: usize) -> Vec<Received> {
        let got = self.env.results(n, WAIT).await;
        let keys: Vec<&str> = got.iter().map(|r| r.routing_key.as_str()).collect();
        assert_eq!(got.len(), n, "expected {n} results within {WAIT:?}, got {keys:?}");
        got
    }

    /// Pushes a marker event and returns every result that arrived before it.
    async fn results_until_marker(&mut self) -> Vec<Received> {
        let marker = openid();
        let body = format!(
            "<xml><ToUserName>gh_123456789abc</ToUserName><FromUserName>{marker}</FromUserName><CreateTime>{}</CreateTime><MsgType>event</MsgType><Event>marker</Event></xml>",
            now()
        );
        self.push_ok(OA, Mode::Plain, &body).await;
        let mut before = Vec::new();
        loop {
            let r = self.env.next_result(WAIT).await.expect("the marker arrives");
            if r.routing_key == "event.marker" && r.body["FromUserName"] == marker.as_str() {
                return before;
            }
            before.push(r);
        }
    }

    async fn dead_letters(&self) -> u32 {
        self.env.queue_len(&self.env.config.dead_letter_queue).await
    }
}

fn account(a: &Acct) -> Account {
    Account {
        kind: a.kind,
        callback_token: Some(SecretString::from(a.token)),
        encoding_aes_key: a.aes_key.map(SecretString::from),
        ..Account::new(a.name, a.appid)
    }
}

/// Asserts a `delivery.*` event of a subscription message.
#[track_caller]
fn assert_delivery(r: &Received, acct: Acct, msgid: u64, job_id: Option<&str>, status: &str) {
    let b = &r.body;
    assert_eq!(r.routing_key, format!("delivery.{status}"), "{b}");
    assert_eq!((b["type"].as_str(), b["account"].as_str()), (Some("delivery"), Some(acct.name)), "{b}");
    assert_eq!(b["kind"].as_str(), Some(acct.job_kind()), "{b}");
    assert_eq!(b["msgid"].as_u64(), Some(msgid), "{b}");
    assert_eq!(b["job_id"].as_str(), job_id, "{b}");
    assert_eq!(r.correlation_id.as_deref(), job_id, "{b}");
    assert_eq!(b["status"].as_str(), Some(status), "{b}");
    assert_eq!(b["to_user_name"], "gh_123456789abc", "{b}");
    assert!(b["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{b}");
}

#[tokio::test]
async fn sent_events_are_tied_to_their_jobs_in_xml_and_json_plaintext_and_safe_mode() {
    let mut h = Hook::start("sub-sent").await;
    let cases = [
        (OA, Format::Xml, Mode::Plain),
        (OA_SAFE, Format::Xml, Mode::Safe),
        (OA, Format::Json, Mode::Plain),
        (MINI, Format::Json, Mode::Plain),
        (MINI_SAFE, Format::Json, Mode::Safe),
        (MINI, Format::Xml, Mode::Plain),
        (MINI_SAFE, Format::Xml, Mode::Safe),
    ];
    let mut expected = Vec::new();
    for (i, (acct, format, mode)) in cases.into_iter().enumerate() {
        let (id, job) = (msgid(), format!("job-{i}-{format:?}-{mode:?}"));
        h.record_msgid(acct, id, &job).await;
        let user = openid();
        let body = event_body(format, "subscribe_msg_sent_event", &user, 1620963428, &[sent("TPL", id, 0, "success")]);
        h.push_ok(acct, mode, &body).await;
        expected.push((acct, id, job, user));
    }
    let results = h.results(cases.len()).await;
    for (r, (acct, id, job, user)) in results.iter().zip(&expected) {
        assert_delivery(r, *acct, *id, Some(job), "success");
        let b = &r.body;
        assert_eq!((b["template_id"].as_str(), b["errcode"].as_i64()), (Some("TPL"), Some(0)), "{b}");
        assert_eq!((b["raw_status"].as_str(), b["touser"].as_str()), (Some("success"), Some(user.as_str())), "{b}");
        assert_eq!(b["create_time"], 1620963428, "{b}");
    }
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn a_sent_event_with_several_items_publishes_one_delivery_per_item() {
    let mut h = Hook::start("sub-sent-many").await;
    let ids: Vec<u64> = (0..5).map(|_| msgid()).collect();
    for (i, id) in ids.iter().enumerate().take(4) {
        let acct = if i < 3 { MINI } else { OA_SAFE };
        h.record_msgid(acct, *id, &format!("job-{i}")).await;
    }
    let items = [
        sent("T0", ids[0], 0, "success"),
        sent("T1", ids[1], 0, "success"),
        sent("T2", ids[2], 10001, "system failed"),
    ];
    h.push_ok(MINI, Mode::Plain, &event_body(Format::Xml, "subscribe_msg_sent_event", &openid(), now(), &items)).await;
    // The last item has no msgid record: it goes out with job_id null.
    let items = [sent("T3", ids[3], 0, "success"), sent("T4", ids[4], 0, "success")];
    h.push_ok(OA_SAFE, Mode::Safe, &event_body(Format::Json, "subscribe_msg_sent_event", &openid(), now(), &items))
        .await;

    let r = h.results(5).await;
    assert_delivery(&r[0], MINI, ids[0], Some("job-0"), "success");
    assert_delivery(&r[1], MINI, ids[1], Some("job-1"), "success");
    assert_delivery(&r[2], MINI, ids[2], Some("job-2"), "failed");
    assert_eq!((r[2].body["errcode"].as_i64(), r[2].body["raw_status"].as_str()), (Some(10001), Some("system failed")));
    assert_eq!(r[2].body["template_id"], "T2");
    assert_delivery(&r[3], OA_SAFE, ids[3], Some("job-3"), "success");
    assert_delivery(&r[4], OA_SAFE, ids[4], None, "success");
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

/// Asserts a `consent.*` event.
#[track_caller]
fn assert_consent(r: &Received, acct: Acct, user: &str, template_id: &str, status: &str, scene: &str, event: &str) {
    let b = &r.body;
    let consent = if status == "accept" { "accepted" } else { "rejected" };
    assert_eq!(r.routing_key, format!("consent.{consent}"), "{b}");
    assert_eq!((b["type"].as_str(), b["account"].as_str()), (Some("consent"), Some(acct.name)), "{b}");
    assert_eq!(b["kind"].as_str(), Some(acct.job_kind()), "{b}");
    assert_eq!((b["openid"].as_str(), b["template_id"].as_str()), (Some(user), Some(template_id)), "{b}");
    assert_eq!((b["consent"].as_str(), b["status"].as_str()), (Some(consent), Some(status)), "{b}");
    assert_eq!((b["scene"].as_str(), b["event"].as_str()), (Some(scene), Some(event)), "{b}");
    assert_eq!(
        (b["to_user_name"].as_str(), b["create_time"].as_i64()),
        (Some("gh_123456789abc"), Some(1610969440)),
        "{b}"
    );
    assert!(b["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{b}");
    assert_eq!(r.correlation_id, None);
}

#[tokio::test]
async fn popup_answers_and_settings_changes_become_consent_events() {
    let mut h = Hook::start("sub-consent").await;
    let (popup_event, change_event) = ("subscribe_msg_popup_event", "subscribe_msg_change_event");
    let users: Vec<String> = (0..4).map(|_| openid()).collect();
    let t = 1610969440;
    // An article's popup on an official account, one accepted and one refused template (XML).
    let answers = [popup("TA", "accept", "2"), popup("TB", "reject", "2")];
    h.push_ok(OA, Mode::Plain, &event_body(Format::Xml, popup_event, &users[0], t, &answers)).await;
    // A mini program's popup, in JSON and safe mode.
    let answers = [popup("TC", "accept", "0")];
    h.push_ok(MINI_SAFE, Mode::Safe, &event_body(Format::Json, popup_event, &users[1], t, &answers)).await;
    // Refusals in the settings: XML in safe mode, JSON in plaintext.
    h.push_ok(OA_SAFE, Mode::Safe, &event_body(Format::Xml, change_event, &users[2], t, &[change("TD", "reject")]))
        .await;
    let changes = [change("TE", "reject"), change("TF", "reject")];
    h.push_ok(MINI, Mode::Plain, &event_body(Format::Json, change_event, &users[3], t, &changes)).await;

    let r = h.results(6).await;
    assert_consent(&r[0], OA, &users[0], "TA", "accept", "2", popup_event);
    assert_consent(&r[1], OA, &users[0], "TB", "reject", "2", popup_event);
    assert_consent(&r[2], MINI_SAFE, &users[1], "TC", "accept", "0", popup_event);
    assert_consent(&r[3], OA_SAFE, &users[2], "TD", "reject", "settings", change_event);
    assert_consent(&r[4], MINI, &users[3], "TE", "reject", "settings", change_event);
    assert_consent(&r[5], MINI, &users[3], "TF", "reject", "settings", change_event);
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn a_repeated_push_is_confirmed_once_per_item() {
    let mut h = Hook::start("sub-dedupe").await;
    let (user, ids) = (openid(), [msgid(), msgid(), msgid()]);
    for (i, id) in ids.iter().enumerate() {
        h.record_msgid(MINI, *id, &format!("job-{i}")).await;
    }
    let first = [sent("T", ids[0], 0, "success"), sent("T", ids[1], 0, "success")];
    let xml = event_body(Format::Xml, "subscribe_msg_sent_event", &user, 1620963428, &first);
    h.push_ok(MINI, Mode::Plain, &xml).await;
    h.push_ok(MINI, Mode::Plain, &xml).await;
    // WeChat's retry of the same receipts, now with a third item, in the other format.
    let again = [sent("T", ids[0], 0, "success"), sent("T", ids[1], 0, "success"), sent("T", ids[2], 0, "success")];
    h.push_ok(MINI, Mode::Plain, &event_body(Format::Json, "subscribe_msg_sent_event", &user, 1620963428, &again))
        .await;
    let popup_body =
        event_body(Format::Xml, "subscribe_msg_popup_event", &user, 1610969440, &[popup("T", "accept", "2")]);
    h.push_ok(OA, Mode::Plain, &popup_body).await;
    h.push_ok(OA, Mode::Plain, &popup_body).await;

    let r = h.results_until_marker().await;
    let seen: Vec<(&str, Option<u64>)> = r.iter().map(|r| (r.routing_key.as_str(), r.body["msgid"].as_u64())).collect();
    assert_eq!(
        seen,
        [
            ("delivery.success", Some(ids[0])),
            ("delivery.success", Some(ids[1])),
            ("delivery.success", Some(ids[2])),
            ("consent.accepted", None)
        ]
    );
    assert_delivery(&r[2], MINI, ids[2], Some("job-2"), "success");
    h.finish().await;
}

#[tokio::test]
async fn malformed_lists_are_refused_and_parked_once() {
    let mut h = Hook::start("sub-malformed").await;
    let sent_event = "subscribe_msg_sent_event";
    let user = openid();
    let no_msgid = vec![("TemplateId", "T".to_owned()), ("ErrorCode", "0".into()), ("ErrorStatus", "success".into())];
    let bad: Vec<(String, &str)> = vec![
        (json_body(sent_event, &user, now(), json!("not an item")), "List[0] is not an object"),
        (json_body(sent_event, &user, now(), json!([])), "List has no items"),
        (event_body(Format::Xml, sent_event, &user, now(), &[no_msgid]), "List[0]: MsgID is missing"),
        (
            event_body(Format::Json, sent_event, &user, now(), &[sent("T", 1, 0, "success"), sent("T", 2, 0, "ok")])
                .replace("\"2\"", "\"2x\""),
            "List[1]: MsgID is not a number",
        ),
        (
            event_body(Format::Xml, "subscribe_msg_popup_event", &user, now(), &[popup("T", "maybe", "2")]),
            "SubscribeStatusString \"maybe\" is neither accept nor reject",
        ),
        (
            json_body("subscribe_msg_change_event", &user, now(), json!({"TemplateId": "T"})),
            "SubscribeStatusString is missing",
        ),
    ];
    for (body, reason) in &bad {
        let (status, text) = h.push(MINI, Mode::Plain, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(text.starts_with("unreadable push: ") && text.contains(reason), "{text}");
    }
    // In safe mode too; and a second push of the same body is not parked again.
    let (status, text) = h.push(MINI_SAFE, Mode::Safe, &bad[0].0).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert_eq!(h.push(MINI, Mode::Plain, &bad[2].0).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(h.dead_letters().await, bad.len() as u32 + 1);

    // An event of a name wxpush does not type is readable: published with all its fields.
    let other = json_body("subscribe_msg_other_event", &user, now(), json!({"Anything": "1"}));
    h.push_ok(MINI, Mode::Plain, &other).await;
    let r = h.results_until_marker().await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].routing_key, "event.subscribe_msg_other_event");
    assert_eq!(r[0].body["List"], json!({"Anything": "1"}));
    assert_eq!((r[0].body["type"].as_str(), r[0].body["account"].as_str()), (Some("event"), Some("mini")));
    h.finish().await;
}
