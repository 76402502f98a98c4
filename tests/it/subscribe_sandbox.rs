//! The sandbox's subscription messages over HTTP: `subscribe/bizsend` (official account) and
//! `subscribe/send` (mini program), their validation, the consent model and its admin API, and
//! the events pushed to a webhook in XML and JSON, plaintext and safe mode.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::harness::{eventually, start_sandbox};
use crate::wx::{
    Cipher, Consent, EventFormat, Faults, JobKind, ReceiptSettings, Sandbox, SandboxAccount, SandboxConfig,
    WebhookTarget, crypto, original_id,
};
use axum::{Router, extract::RawQuery, http::HeaderMap, routing::post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const OA: &str = "wx5b00000000000001";
const MP: &str = "wx5b00000000000002";
const SECRET: &str = "sub-secret";
const HOOK_TOKEN: &str = "subhooktoken";
const AES_KEY: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
const TEMPLATE: &str = "VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc";
const BIZSEND: &str = "/cgi-bin/message/subscribe/bizsend";
const SEND: &str = "/cgi-bin/message/subscribe/send";

fn official_account() -> SandboxAccount {
    SandboxAccount::new(OA, SECRET)
}

fn mini_program() -> SandboxAccount {
    SandboxAccount::miniprogram(MP, SECRET)
}

/// Both accounts; every recipient has a long-term consent unless `consent` is false.
fn both(consent: bool) -> Vec<SandboxAccount> {
    let start = consent.then_some(Consent::LongTerm);
    vec![
        SandboxAccount { auto_consent: start, ..official_account() },
        SandboxAccount { auto_consent: start, ..mini_program() },
    ]
}

async fn start(accounts: Vec<SandboxAccount>) -> (Sandbox, Api) {
    let receipts = ReceiptSettings { delay_ms: 10, ..ReceiptSettings::default() };
    let sandbox = start_sandbox(SandboxConfig { accounts, receipts, ..SandboxConfig::default() }).await;
    let api = Api { base: sandbox.base_url(), http: reqwest::Client::builder().no_proxy().build().expect("client") };
    (sandbox, api)
}

/// `bizsend`'s body: WeChat's own example data, with a time the key-type table accepts.
fn bizsend_body(touser: &str) -> Value {
    json!({
        "touser": touser,
        "template_id": TEMPLATE,
        "page": "https://mp.weixin.qq.com",
        "miniprogram": {"appid": "wxmini", "pagepath": "index?foo=bar"},
        "data": {
            "name1": {"value": "广州腾讯科技有限公司"},
            "thing8": {"value": "广州腾讯科技有限公司"},
            "time7": {"value": "2019年8月8日 15:01"}
        }
    })
}

/// `subscribe/send`'s body: the mini program page's example.
fn send_body(touser: &str) -> Value {
    json!({
        "touser": touser,
        "template_id": TEMPLATE,
        "page": "index",
        "miniprogram_state": "developer",
        "lang": "zh_CN",
        "data": {
            "phrase3": {"value": "审核通过"},
            "name1": {"value": "订阅"},
            "date2": {"value": "2019-12-25 09:42"}
        }
    })
}

fn errcode(v: &Value) -> i64 {
    v["errcode"].as_i64().unwrap_or(i64::MIN)
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn token(&self, appid: &str) -> String {
        let body = json!({"grant_type": "client_credential", "appid": appid, "secret": SECRET});
        let v: Value = self.post_json("/cgi-bin/stable_token", &body).await.1;
        v["access_token"].as_str().expect("access_token").to_owned()
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}{path}", self.base)).json(body).send().await.expect("post");
        let status = resp.status().as_u16();
        (status, serde_json::from_str(&resp.text().await.expect("body")).unwrap_or(Value::Null))
    }

    /// A send through `path` with `token`: the answer.
    async fn send(&self, path: &str, token: &str, body: &Value) -> Value {
        self.post_json(&format!("{path}?access_token={token}"), body).await.1
    }

    async fn grant(&self, change: Value) -> (u16, Value) {
        self.post_json("/_sandbox/consents/grant", &change).await
    }

    async fn revoke(&self, change: Value) -> (u16, Value) {
        self.post_json("/_sandbox/consents/revoke", &change).await
    }

    async fn consents(&self, query: &str) -> Value {
        let url = format!("{}/_sandbox/consents?{query}", self.base);
        self.http.get(url).send().await.expect("get").json().await.expect("json")
    }
}

// ---- sends --------------------------------------------------------------------------------

#[tokio::test]
async fn each_endpoint_accepts_a_valid_send_and_answers_a_64_bit_msgid() {
    let (sb, api) = start(both(true)).await;
    let (oa, mp) = (api.token(OA).await, api.token(MP).await);
    let biz = api.send(BIZSEND, &oa, &bizsend_body("o-biz")).await;
    assert_eq!((errcode(&biz), biz["errmsg"].as_str()), (0, Some("ok")), "{biz}");
    let mini = api.send(SEND, &mp, &send_body("o-mini")).await;
    assert_eq!(errcode(&mini), 0, "{mini}");
    let ids: Vec<u64> = [&biz, &mini].iter().map(|v| v["msgid"].as_u64().expect("an exact u64 msgid")).collect();
    assert!(ids.iter().all(|&id| id >= 1 << 62), "{ids:?}");
    assert_ne!(ids[0], ids[1]);

    let messages = sb.messages();
    let recorded: Vec<(u64, JobKind, &str, &str)> =
        messages.iter().map(|m| (m.msgid, m.kind, m.appid.as_str(), m.touser.as_str())).collect();
    assert_eq!(
        recorded,
        [(ids[0], JobKind::Subscribe, OA, "o-biz"), (ids[1], JobKind::MiniprogramSubscribe, MP, "o-mini")]
    );
    assert_eq!(messages[1].body, send_body("o-mini"));
    let stats = sb.stats();
    assert_eq!((stats.subscribe_requests, stats.subscribe_accepted), (2, 2));
    assert_eq!((stats.send_requests, stats.sends_accepted), (0, 0), "template counters are apart");
}

#[tokio::test]
async fn a_token_of_the_other_kind_of_account_is_unauthorized() {
    let (sb, api) = start(both(true)).await;
    let (oa, mp) = (api.token(OA).await, api.token(MP).await);
    for (path, token, body) in [
        (BIZSEND, &mp, bizsend_body("o1")),
        (SEND, &oa, send_body("o1")),
        ("/cgi-bin/message/template/send", &mp, bizsend_body("o1")),
    ] {
        let v = api.send(path, token, &body).await;
        assert_eq!((errcode(&v), v["errmsg"].as_str()), (48001, Some("api unauthorized")), "{path}");
    }
    let (_, missing) = api.post_json(BIZSEND, &bizsend_body("o1")).await;
    assert_eq!(errcode(&missing), 41001);
    assert_eq!(errcode(&api.send(SEND, "not-a-token", &send_body("o1")).await), 40001);
    assert_eq!(sb.stats().errors.get(&48001), Some(&3));
    assert!(sb.messages().is_empty());
}

#[tokio::test]
async fn invalid_sends_name_the_field_and_cost_no_consent() {
    let mut accounts = both(false);
    accounts[1].pages = Some(vec!["index".into(), "/pages/order/detail".into()]);
    let (sb, api) = start(accounts).await;
    let (oa, mp) = (api.token(OA).await, api.token(MP).await);
    for appid in [OA, MP] {
        assert_eq!(api.grant(json!({"appid": appid, "openid": "o1", "template_ids": [TEMPLATE]})).await.0, 200);
    }
    let (biz, mini) = (|| bizsend_body("o1"), || send_body("o1"));
    let long_thing = json!({"thing1": {"value": "一二三四五六七八九十一二三四五六七八九十一二三"}});
    let cases = [
        (BIZSEND, with(biz(), "data", long_thing), 47003, argument("data.thing1.value")),
        (
            BIZSEND,
            with(biz(), "data", json!({"time7": {"value": "2019年8月8日"}})),
            47003,
            argument("data.time7.value"),
        ),
        (SEND, with(mini(), "data", json!({"keyword1": {"value": "x"}})), 47003, argument("data.keyword1.value")),
        (SEND, with(mini(), "miniprogram_state", json!("release")), 47003, argument("miniprogram_state")),
        (SEND, with(mini(), "lang", json!("fr_FR")), 47003, argument("lang")),
        (SEND, with(mini(), "page", json!("pages/gone/index")), 41030, "invalid page".into()),
        (SEND, with(mini(), "touser", json!("")), 40003, "invalid openid".into()),
        (BIZSEND, with(biz(), "template_id", json!("invalid-template")), 40037, "invalid template_id".into()),
        (BIZSEND, bizsend_body("errcode-45168-o1"), 45168, "keyword in blacklist".into()),
    ];
    for (path, body, code, errmsg) in &cases {
        let v = api.send(path, if *path == BIZSEND { &oa } else { &mp }, body).await;
        assert_eq!((errcode(&v), v["errmsg"].as_str()), (*code, Some(errmsg.as_str())), "{path} {body}");
    }
    let v = api.send(SEND, &mp, &with(mini(), "page", json!("pages/order/detail?id=42"))).await;
    assert_eq!(errcode(&v), 0, "a listed page, with a query: {v}");
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &biz()).await), 0, "the consent was still there");
    let stats = sb.stats();
    assert_eq!((stats.subscribe_requests, stats.subscribe_accepted), (cases.len() as u64 + 2, 2));
    assert_eq!(stats.errors.get(&47003), Some(&5));
}

/// WeChat's 47003 errmsg naming `field`.
fn argument(field: &str) -> String {
    format!("argument invalid! {field} invalid")
}

/// `body` with `field` set to `value`.
fn with(mut body: Value, field: &str, value: Value) -> Value {
    body[field] = value;
    body
}

// ---- consent ------------------------------------------------------------------------------

#[tokio::test]
async fn without_consent_43101_and_a_one_time_consent_is_used_by_one_send() {
    let (sb, api) = start(both(false)).await;
    let mp = api.token(MP).await;
    let v = api.send(SEND, &mp, &send_body("o-user")).await;
    assert_eq!((errcode(&v), v["errmsg"].as_str()), (43101, Some("user refuse to accept the msg")));

    let change = json!({"appid": MP, "openid": "o-user", "template_ids": [TEMPLATE], "count": 2});
    let (status, granted) = api.grant(change).await;
    assert_eq!(status, 200);
    assert_eq!(
        granted,
        json!([{"appid": MP, "openid": "o-user", "template_id": TEMPLATE, "once": 2, "long_term": false}])
    );
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-user")).await), 0);
    assert_eq!(api.consents(&format!("appid={MP}&openid=o-user")).await[0]["once"], 1);
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-user")).await), 0);
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-user")).await), 43101, "both used up");
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-other")).await), 43101, "consent is per openid");

    let stats = sb.stats();
    assert_eq!((stats.subscribe_accepted, stats.no_consent), (2, 3));
    assert_eq!(stats.errors.get(&43101), Some(&3));
}

#[tokio::test]
async fn a_send_that_is_not_accepted_keeps_the_one_time_consent() {
    let (sb, api) = start(both(false)).await;
    let oa = api.token(OA).await;
    sb.grant_consent(
        &serde_json::from_value(json!({"appid": OA, "openid": "o1", "template_ids": [TEMPLATE]})).expect("change"),
    )
    .expect("granted");
    sb.set_faults(Faults { system_error_rate: 1.0, ..Faults::default() });
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o1")).await), -1);
    sb.set_faults(Faults { daily_cap: Some(0), ..Faults::default() });
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o1")).await), 45009);
    sb.set_faults(Faults::default());
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o1")).await), 0, "the consent survived both");
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o1")).await), 43101);
}

#[tokio::test]
async fn long_term_consent_keeps_working_until_revoked() {
    let (sb, api) = start(both(false)).await;
    let oa = api.token(OA).await;
    let change =
        json!({"appid": OA, "openid": "o-lt", "template_ids": [TEMPLATE, "other-template"], "long_term": true});
    assert_eq!(api.grant(change).await.0, 200);
    for _ in 0..3 {
        assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o-lt")).await), 0);
    }
    let (status, revoked) = api.revoke(json!({"appid": OA, "openid": "o-lt", "template_ids": [TEMPLATE]})).await;
    assert_eq!((status, &revoked[0]["long_term"], &revoked[0]["once"]), (200, &json!(false), &json!(0)));
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o-lt")).await), 43101);
    let listed = api.consents(&format!("openid=o-lt&appid={OA}")).await;
    let summary: Vec<(&str, bool)> = listed
        .as_array()
        .expect("list")
        .iter()
        .map(|r| (r["template_id"].as_str().unwrap_or(""), r["long_term"] == true))
        .collect();
    assert_eq!(summary, [(TEMPLATE, false), ("other-template", true)]);
    assert_eq!(sb.consents().len(), 2);
}

#[tokio::test]
async fn revoking_beats_auto_consent_for_that_recipient_only() {
    let (_sb, api) = start(both(true)).await;
    let mp = api.token(MP).await;
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-a")).await), 0);
    assert_eq!(api.revoke(json!({"appid": MP, "openid": "o-a", "template_ids": [TEMPLATE]})).await.0, 200);
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-a")).await), 43101);
    assert_eq!(errcode(&api.send(SEND, &mp, &send_body("o-b")).await), 0);
}

#[tokio::test]
async fn the_consent_api_refuses_what_wechat_cannot_do() {
    let (_sb, api) = start(both(false)).await;
    let base = |appid: &str| json!({"appid": appid, "openid": "o1", "template_ids": [TEMPLATE]});
    assert_eq!(api.grant(base("wxnobody")).await.0, 404);
    for bad in [
        with(base(MP), "count", json!(0)),
        with(base(MP), "template_ids", json!([])),
        with(base(MP), "event", json!("change")),
        with(base(MP), "scene", json!(1)),
        with(base(OA), "scene", json!(0)),
        with(with(base(MP), "long_term", json!(true)), "count", json!(3)),
        with(base(MP), "templates", json!([TEMPLATE])),
    ] {
        assert_eq!(api.grant(bad.clone()).await.0, 400, "{bad}");
    }
    assert_eq!(api.revoke(with(base(MP), "count", json!(1))).await.0, 400);
    assert_eq!(api.consents("").await, json!([]), "nothing changed");
}

// ---- events -------------------------------------------------------------------------------

/// One push as the webhook saw it.
#[derive(Debug, Clone)]
struct Pushed {
    query: HashMap<String, String>,
    content_type: String,
    body: String,
}

/// A webhook on a local port that records every push and answers `success`.
#[derive(Clone, Default)]
struct Listener {
    seen: Arc<Mutex<Vec<Pushed>>>,
}

impl Listener {
    async fn target(&self, aes: bool) -> WebhookTarget {
        let seen = self.seen.clone();
        let record = move |RawQuery(query): RawQuery, headers: HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let query = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
                let content_type =
                    headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                seen.lock().expect("lock").push(Pushed { query, content_type, body });
                "success"
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the webhook");
        let url = format!("http://{}/wechat", listener.local_addr().expect("addr"));
        let app = Router::new().route("/wechat", post(record));
        tokio::spawn(async move { axum::serve(listener, app).await });
        WebhookTarget { url, token: HOOK_TOKEN.into(), encoding_aes_key: aes.then(|| AES_KEY.to_owned()) }
    }

    /// The first `n` pushes, once they have come (5 s at most).
    async fn pushes(&self, n: usize) -> Vec<Pushed> {
        let arrived = eventually(Duration::from_secs(5), || async { self.seen.lock().expect("lock").len() >= n }).await;
        let seen = self.seen.lock().expect("lock").clone();
        assert!(arrived, "{n} pushes expected, got {seen:#?}");
        seen
    }
}

/// A push checked as the webhook would check it, decrypted when in safe mode: the event's text.
fn opened(push: &Pushed, appid: &str) -> String {
    let q = &push.query;
    assert_eq!(q["signature"], crypto::signature(HOOK_TOKEN, &q["timestamp"], &q["nonce"]));
    if q.get("encrypt_type").map(String::as_str) != Some("aes") {
        return push.body.clone();
    }
    let encrypt = if push.content_type.contains("json") {
        let envelope: Value = serde_json::from_str(&push.body).expect("a JSON envelope");
        assert_eq!(envelope["ToUserName"], original_id(appid));
        envelope["Encrypt"].as_str().expect("Encrypt").to_owned()
    } else {
        assert!(push.body.contains(&format!("<ToUserName><![CDATA[{}]]></ToUserName>", original_id(appid))));
        xml_text(&push.body, "Encrypt").expect("Encrypt").to_owned()
    };
    assert_eq!(q["msg_signature"], crypto::msg_signature(HOOK_TOKEN, &q["timestamp"], &q["nonce"], &encrypt));
    let plain = Cipher::new(AES_KEY).expect("key").decrypt(&encrypt).expect("decrypts");
    assert_eq!(plain.appid, appid);
    String::from_utf8(plain.msg).expect("UTF-8")
}

/// The text of the first `<name>` element, CDATA unwrapped.
fn xml_text<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let after_open = xml.split_once(&format!("<{name}>"))?.1;
    let inner = after_open.split_once(&format!("</{name}>"))?.0;
    Some(inner.strip_prefix("<![CDATA[").and_then(|t| t.strip_suffix("]]>")).unwrap_or(inner))
}

const HEAD: [&str; 5] = ["ToUserName", "FromUserName", "CreateTime", "MsgType", "Event"];
const ITEM: [&str; 6] = ["TemplateId", "MsgID", "ErrorCode", "ErrorStatus", "SubscribeStatusString", "PopupScene"];

/// An XML event in the JSON event's shape (every value a string, `List` an array), so that
/// one set of assertions serves both formats.
fn xml_as_json(xml: &str, wrapper: &str) -> Value {
    let mut event: serde_json::Map<String, Value> =
        HEAD.iter().filter_map(|k| Some(((*k).to_owned(), json!(xml_text(xml, k)?)))).collect();
    let inside = xml_text(xml, wrapper).unwrap_or_else(|| panic!("<{wrapper}> in {xml}"));
    let items: Vec<Value> = inside
        .split("<List>")
        .skip(1)
        .map(|item| {
            Value::Object(ITEM.iter().filter_map(|k| Some(((*k).to_owned(), json!(xml_text(item, k)?)))).collect())
        })
        .collect();
    event.insert("List".into(), Value::Array(items));
    Value::Object(event)
}

/// A JSON event with `List` as an array, after checking WeChat's rule: one object for one item.
fn json_listed(text: &str) -> Value {
    let mut event: Value = serde_json::from_str(text).expect("a JSON event");
    match event["List"].take() {
        Value::Array(items) => {
            assert!(items.len() > 1, "one item is an object, not an array: {text}");
            event["List"] = Value::Array(items);
        }
        one => event["List"] = json!([one]),
    }
    event
}

/// The account's original id, the recipient, a recent CreateTime, and the event's name.
fn check_head(event: &Value, appid: &str, openid: &str, name: &str) {
    assert_eq!((&event["ToUserName"], &event["FromUserName"]), (&json!(original_id(appid)), &json!(openid)));
    assert_eq!((&event["MsgType"], &event["Event"]), (&json!("event"), &json!(name)));
    let created: i64 = event["CreateTime"].as_str().and_then(|t| t.parse().ok()).expect("CreateTime, a string");
    assert!((chrono::Utc::now().timestamp() - created).abs() < 10);
}

async fn with_webhook(mut account: SandboxAccount, format: EventFormat, aes: bool) -> (Sandbox, Api, Listener) {
    let listener = Listener::default();
    account.webhook = Some(listener.target(aes).await);
    account.event_format = format;
    account.auto_consent = Some(Consent::LongTerm);
    let (sb, api) = start(vec![account]).await;
    (sb, api, listener)
}

#[tokio::test]
async fn sent_events_in_xml_carry_the_msgid_and_the_result() {
    let (sb, api, hook) = with_webhook(official_account(), EventFormat::Xml, false).await;
    let oa = api.token(OA).await;
    let ok = api.send(BIZSEND, &oa, &bizsend_body("o-xml")).await["msgid"].as_u64().expect("msgid");
    let first = hook.pushes(1).await;
    let failed = api.send(BIZSEND, &oa, &bizsend_body("o-sysfail")).await["msgid"].as_u64().expect("msgid");
    let pushes = hook.pushes(2).await;
    assert_eq!(first[0].content_type, "text/xml");
    assert!(!pushes[0].query.contains_key("encrypt_type"));
    let events: Vec<Value> = pushes.iter().map(|p| xml_as_json(&opened(p, OA), "SubscribeMsgSentEvent")).collect();
    check_head(&events[0], OA, "o-xml", "subscribe_msg_sent_event");
    let item = |msgid: u64, code: &str, status: &str| json!([{"TemplateId": TEMPLATE, "MsgID": msgid.to_string(), "ErrorCode": code, "ErrorStatus": status}]);
    assert_eq!(events[0]["List"], item(ok, "0", "success"));
    assert_eq!(events[1]["List"], item(failed, "-1", "system error"), "a failed delivery");
    assert!(eventually(Duration::from_secs(5), || async { sb.stats().receipts_acked == 2 }).await);
}

#[tokio::test]
async fn sent_events_in_json_safe_mode_hold_one_list_object() {
    let (_sb, api, hook) = with_webhook(mini_program(), EventFormat::Json, true).await;
    let mp = api.token(MP).await;
    let msgid = api.send(SEND, &mp, &send_body("o-json")).await["msgid"].as_u64().expect("msgid");
    let push = hook.pushes(1).await.remove(0);
    assert_eq!((push.content_type.as_str(), push.query["encrypt_type"].as_str()), ("application/json", "aes"));
    let text = opened(&push, MP);
    let event = json_listed(&text);
    check_head(&event, MP, "o-json", "subscribe_msg_sent_event");
    assert_eq!(
        event["List"],
        json!([{"TemplateId": TEMPLATE, "MsgID": msgid.to_string(), "ErrorCode": "0", "ErrorStatus": "success"}])
    );
}

#[tokio::test]
async fn popup_and_change_events_in_json_follow_grants_and_revokes() {
    let (_sb, api, hook) = with_webhook(mini_program(), EventFormat::Json, false).await;
    let two = json!({"appid": MP, "openid": "o-pop", "template_ids": [TEMPLATE, "T2"], "event": "popup"});
    assert_eq!(api.grant(two).await.0, 200);
    let popup_push = hook.pushes(1).await.remove(0);
    // A revoke without an event first: were it pushed, it would come before the change event.
    let silent = json!({"appid": MP, "openid": "o-pop", "template_ids": [TEMPLATE]});
    assert_eq!(api.revoke(silent).await.0, 200);
    let revoke = json!({"appid": MP, "openid": "o-pop", "template_ids": ["T2"], "event": "change"});
    assert_eq!(api.revoke(revoke).await.0, 200);
    let change_push = hook.pushes(2).await.remove(1);
    assert_eq!(popup_push.content_type, "application/json");

    let popup = json_listed(&opened(&popup_push, MP));
    check_head(&popup, MP, "o-pop", "subscribe_msg_popup_event");
    assert_eq!(
        popup["List"],
        json!([
            {"TemplateId": TEMPLATE, "SubscribeStatusString": "accept", "PopupScene": "0"},
            {"TemplateId": "T2", "SubscribeStatusString": "accept", "PopupScene": "0"}
        ])
    );
    let change = json_listed(&opened(&change_push, MP));
    check_head(&change, MP, "o-pop", "subscribe_msg_change_event");
    assert_eq!(
        change["List"],
        json!([{"TemplateId": "T2", "SubscribeStatusString": "reject"}]),
        "not the silent revoke"
    );
}

#[tokio::test]
async fn popup_events_in_xml_safe_mode_list_each_template() {
    let (_sb, api, hook) = with_webhook(official_account(), EventFormat::Xml, true).await;
    let grant = json!({"appid": OA, "openid": "o-h5", "template_ids": [TEMPLATE], "event": "popup", "scene": 2});
    assert_eq!(api.grant(grant).await.0, 200);
    hook.pushes(1).await;
    let reject = json!({"appid": OA, "openid": "o-h5", "template_ids": [TEMPLATE, "T2"], "event": "popup"});
    assert_eq!(api.revoke(reject).await.0, 200);
    let pushes = hook.pushes(2).await;
    assert!(pushes.iter().all(|p| p.query["encrypt_type"] == "aes" && p.content_type == "text/xml"));

    let events: Vec<Value> = pushes.iter().map(|p| xml_as_json(&opened(p, OA), "SubscribeMsgPopupEvent")).collect();
    check_head(&events[0], OA, "o-h5", "subscribe_msg_popup_event");
    assert_eq!(
        events[0]["List"],
        json!([{"TemplateId": TEMPLATE, "SubscribeStatusString": "accept", "PopupScene": "2"}])
    );
    assert_eq!(
        events[1]["List"],
        json!([
            {"TemplateId": TEMPLATE, "SubscribeStatusString": "reject", "PopupScene": "1"},
            {"TemplateId": "T2", "SubscribeStatusString": "reject", "PopupScene": "1"}
        ]),
        "an official account's popup defaults to an H5 page"
    );
    let oa = api.token(OA).await;
    assert_eq!(errcode(&api.send(BIZSEND, &oa, &bizsend_body("o-h5")).await), 43101, "the reject revoked it");
}
