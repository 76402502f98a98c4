//! wxpush-webhook against the real RabbitMQ and Redis: every test runs its own webhook on free
//! ports, in its own namespace (`harness::webhook`).

use std::time::Duration;

use crate::wx::{Cipher, Claim, crypto};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{
    Forwarder, eventually, header_text,
    webhook::{
        DEFAULT_APPID, Harness, Options, ROT_APPID, SAFE_APPID, SWITCHING_APPID, correlation_id, json, now, random,
        receipt_xml,
    },
};

/// The seed file's first sample, exactly as published (`]]&g;` instead of `]]>`).
const SEED_MALFORMED: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]&g;</FromUserName>\n<CreateTime>1395658920</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163836</MsgID>\n<Status><![CDATA[success]]></Status>\n</xml>";
/// The same sample, corrected, and the seed's two failure samples.
const SEED_SUCCESS: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658920</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163836</MsgID>\n<Status><![CDATA[success]]></Status>\n</xml>";
const SEED_USER_BLOCK: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658984</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163840</MsgID>\n<Status><![CDATA[failed:user block]]></Status>\n</xml>";
const SEED_SYSTEM_FAILED: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658984</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163840</MsgID>\n<Status><![CDATA[failed: system failed]]></Status>\n</xml>";

#[tokio::test]
async fn get_verification_answers_echostr_for_the_official_example() {
    // The official vector is from 2024: the timestamp window must be off for it.
    let h = Harness::start(Options { timestamp_window: None, ..Options::default() }).await;
    let q = "signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492";
    for path in ["/wechat", "/wechat/default"] {
        let (status, body) = h.send(h.http.get(h.url(path, q))).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "4375120948345356249"), "{path}");
    }
    let wrong = q.replace("f464b", "f464c");
    assert_eq!(h.send(h.http.get(h.url("/wechat", &wrong))).await.0, StatusCode::UNAUTHORIZED);
    let missing = "echostr=1&timestamp=1714036504&nonce=1514711492";
    assert_eq!(h.send(h.http.get(h.url("/wechat", missing))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(h.send(h.http.get(h.url("/wechat/nobody", q))).await.0, StatusCode::NOT_FOUND);
    // An account without a callback Token takes no pushes.
    assert_eq!(h.send(h.http.get(h.url("/wechat/notoken", q))).await.0, StatusCode::NOT_FOUND);
    // Another account's Token does not verify the default account's URL.
    assert_eq!(h.send(h.http.get(h.url("/wechat/safe", q))).await.0, StatusCode::UNAUTHORIZED);
    h.finish().await;
}

#[tokio::test]
async fn get_verification_refuses_a_stale_timestamp() {
    let h = Harness::start(Options::default()).await;
    let q = "signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492";
    let (status, body) = h.send(h.http.get(h.url("/wechat", q))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (ts, nonce) = (now().to_string(), "42".to_owned());
    let fresh =
        format!("signature={}&echostr=hello&timestamp={ts}&nonce={nonce}", crypto::signature("AAAAA", &ts, &nonce));
    assert_eq!(h.send(h.http.get(h.url("/wechat", &fresh))).await, (StatusCode::OK, "hello".into()));
    h.finish().await;
}

#[tokio::test]
async fn plaintext_seed_receipts_publish_delivery_events_tied_to_their_jobs() {
    let mut h = Harness::start(Options::default()).await;
    h.write_msgid_record(DEFAULT_APPID, 200163836, "order-42-paid").await;
    for xml in [SEED_SUCCESS, SEED_USER_BLOCK, SEED_SYSTEM_FAILED] {
        assert_eq!(h.post_plain("/wechat", "AAAAA", xml).await, (StatusCode::OK, "success".into()));
    }
    let first = h.next_result().await;
    assert_eq!(first.routing_key.as_str(), "delivery.success");
    assert_eq!(correlation_id(&first).as_deref(), Some("order-42-paid"));
    assert_eq!(first.properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(first.properties.delivery_mode(), &Some(2));
    let v = json(&first);
    assert_eq!(v["type"], "delivery");
    assert_eq!(v["account"], "default");
    assert_eq!(v["msgid"], 200163836);
    assert_eq!(v["job_id"], "order-42-paid");
    assert_eq!(v["touser"], "oia2TjuEGTNoeX76QEjQNrcURxG8");
    assert_eq!(v["to_user_name"], "gh_7f083739789a");
    assert_eq!(v["status"], "success");
    assert_eq!(v["raw_status"], "success");
    assert_eq!(v["create_time"], 1395658920);
    assert!(v["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");

    // The two failures share a MsgID but are different events: both are published.
    let second = h.next_result().await;
    assert_eq!(second.routing_key.as_str(), "delivery.user_block");
    assert_eq!(
        (json(&second)["raw_status"].clone(), json(&second)["job_id"].clone()),
        ("failed:user block".into(), Value::Null)
    );
    assert_eq!(correlation_id(&second), None);
    let third = h.next_result().await;
    assert_eq!(third.routing_key.as_str(), "delivery.system_failed");
    assert_eq!(json(&third)["status"], "system_failed");
    assert_eq!(json(&third)["raw_status"], "failed: system failed");
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn each_status_goes_to_its_routing_key_and_big_msgids_stay_exact() {
    let mut h = Harness::start(Options { msgid_wait: Duration::from_millis(100), ..Options::default() }).await;
    let cases = [
        ("success", "delivery.success", "success"),
        ("failed:user block", "delivery.user_block", "user_block"),
        ("failed: system failed", "delivery.system_failed", "system_failed"),
        ("failed:system failed", "delivery.system_failed", "system_failed"),
        ("failed: something new", "delivery.failed", "failed"),
    ];
    for (i, (raw, _, _)) in cases.iter().enumerate() {
        let msgid = 3599307433715204104 + i as u64;
        assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(msgid, raw)).await.0, StatusCode::OK);
    }
    for (i, (raw, key, status)) in cases.iter().enumerate() {
        let d = h.next_result().await;
        assert_eq!(d.routing_key.as_str(), *key, "{raw}");
        let text = String::from_utf8(d.data.clone()).expect("utf8");
        assert!(text.contains(&format!("\"msgid\":{}", 3599307433715204104 + i as u64)), "{text}");
        assert_eq!(json(&d)["status"], *status);
        assert_eq!(json(&d)["raw_status"], *raw);
    }
    h.finish().await;
}

#[tokio::test]
async fn job_id_is_null_without_a_record_and_found_when_the_record_comes_a_little_late() {
    let mut h = Harness::start(Options::default()).await;
    let started = std::time::Instant::now();
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(777, "success")).await.0, StatusCode::OK);
    let waited = started.elapsed();
    let d = h.next_result().await;
    assert_eq!(json(&d)["job_id"], Value::Null);
    assert_eq!(json(&d)["msgid"], 777);
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_millis(4500), "{waited:?}");

    // The worker records the msgid only after WeChat answered it; the receipt can come first.
    // The record is written once the webhook holds the push and has looked for it once.
    let (answer, ()) = tokio::join!(h.post_plain("/wechat", "AAAAA", receipt_xml(778, "success")), async {
        h.until_held(DEFAULT_APPID, "receipt:778:success").await;
        h.write_msgid_record(DEFAULT_APPID, 778, "late-job").await;
    });
    assert_eq!(answer.0, StatusCode::OK);
    let d = h.next_result().await;
    assert_eq!(json(&d)["job_id"], "late-job");
    assert_eq!(correlation_id(&d).as_deref(), Some("late-job"));
    h.finish().await;
}

#[tokio::test]
async fn safe_mode_pushes_are_verified_decrypted_and_published() {
    let mut h = Harness::start(Options::default()).await;
    h.write_msgid_record(SAFE_APPID, 424242, "safe-job").await;
    let key = h.safe_key.clone();
    let (status, body) =
        h.post_aes("/wechat/safe", "safetoken", &key, SAFE_APPID, &receipt_xml(424242, "failed:user block")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "success"));
    let d = h.next_result().await;
    assert_eq!(d.routing_key.as_str(), "delivery.user_block");
    assert_eq!(json(&d)["account"], "safe");
    assert_eq!(json(&d)["job_id"], "safe-job");

    // JSON envelope and JSON plaintext, as an account set to JSON pushes.
    let plain = r#"{"ToUserName":"gh_1","FromUserName":"o_json","CreateTime":1714112445,"MsgType":"event","Event":"TEMPLATESENDJOBFINISH","MsgID":424243,"Status":"success"}"#;
    let encrypt = Cipher::new(&key).expect("key").encrypt(&[1; 16], plain.as_bytes(), SAFE_APPID);
    let envelope = format!(r#"{{"ToUserName":"gh_1","Encrypt":"{encrypt}"}}"#);
    assert_eq!(h.post_envelope("/wechat/safe", "safetoken", &encrypt, envelope).await.0, StatusCode::OK);
    let d = h.next_result().await;
    assert_eq!((json(&d)["msgid"].clone(), json(&d)["touser"].clone()), (424243.into(), "o_json".into()));

    // Compatible mode: plaintext fields beside Encrypt; what counts is the signed Encrypt.
    let encrypt =
        Cipher::new(&key).expect("key").encrypt(&[2; 16], receipt_xml(424244, "success").as_bytes(), SAFE_APPID);
    let compat = receipt_xml(999, "failed: forged")
        .replace("</xml>", &format!("<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"));
    assert_eq!(h.post_envelope("/wechat/safe", "safetoken", &encrypt, compat).await.0, StatusCode::OK);
    let d = h.next_result().await;
    assert_eq!((d.routing_key.as_str(), json(&d)["msgid"].clone()), ("delivery.success", 424244.into()));

    // No Encrypt in the envelope: nothing to verify, refused without being parked.
    let empty = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName></xml>".to_owned();
    let (status, reason) = h.post_envelope("/wechat/safe", "safetoken", "", empty).await;
    assert_eq!((status, reason.as_str()), (StatusCode::BAD_REQUEST, "Encrypt is missing"));
    // A wrong msg_signature: refused, nothing published or parked.
    let encrypt = Cipher::new(&key).expect("key").encrypt(&[3; 16], receipt_xml(1, "success").as_bytes(), SAFE_APPID);
    let body = format!("<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
    assert_eq!(h.post_envelope("/wechat/safe", "wrongtoken", &encrypt, body).await.0, StatusCode::UNAUTHORIZED);
    // Signed, but encrypted for another appid: refused and parked.
    let (status, reason) =
        h.post_aes("/wechat/safe", "safetoken", &key, "wxsomeoneelse001", &receipt_xml(2, "success")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("wxsomeoneelse001"), "{reason}");
    let parked = h.dead_until_marker().await;
    assert_eq!(parked.len(), 1);
    assert_eq!(header_text(&parked[0].properties, "x-wxpush-account").as_deref(), Some("safe"));
    assert_eq!(header_text(&parked[0].properties, "x-wxpush-encrypt-type").as_deref(), Some("aes"));
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn the_previous_key_still_decrypts_during_a_rotation() {
    let mut h = Harness::start(Options { msgid_wait: Duration::from_millis(50), ..Options::default() }).await;
    let (new, old) = (h.rot_new_key.clone(), h.rot_old_key.clone());
    assert_eq!(
        h.post_aes("/wechat/rotating", "rottoken", &old, ROT_APPID, &receipt_xml(5001, "success")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.post_aes("/wechat/rotating", "rottoken", &new, ROT_APPID, &receipt_xml(5002, "success")).await.0,
        StatusCode::OK
    );
    let a = h.next_result().await;
    let b = h.next_result().await;
    assert_eq!((json(&a)["msgid"].clone(), json(&b)["msgid"].clone()), (5001.into(), 5002.into()));
    // A key that is neither: signed correctly, so parked, and answered 400.
    let stranger = random(43);
    assert_eq!(
        h.post_aes("/wechat/rotating", "rottoken", &stranger, ROT_APPID, &receipt_xml(5003, "success")).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(h.dead_until_marker().await.len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn repeated_pushes_of_one_event_publish_it_once() {
    let mut h = Harness::start(Options::default()).await;
    h.write_msgid_record(DEFAULT_APPID, 31337, "dup-job").await;
    // Five concurrent pushes (WeChat re-pushing while the first is in flight), then a late one.
    let pushes = (0..5).map(|_| h.post_plain("/wechat", "AAAAA", receipt_xml(31337, "success")));
    for (status, body) in futures_util::future::join_all(pushes).await {
        assert_eq!((status, body.as_str()), (StatusCode::OK, "success"));
    }
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(31337, "success")).await.0, StatusCode::OK);
    // Same MsgID, another Status: another event.
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(31337, "failed:user block")).await.0, StatusCode::OK);
    // Other events are the same when FromUserName + CreateTime + Event are.
    let subscribe = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_sub]]></FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event></xml>";
    for _ in 0..3 {
        assert_eq!(h.post_plain("/wechat", "AAAAA", subscribe).await.0, StatusCode::OK);
    }
    let got = h.results_until_marker().await;
    let keys: Vec<&str> = got.iter().map(|d| d.routing_key.as_str()).collect();
    assert_eq!(keys, ["delivery.success", "delivery.user_block", "event.subscribe"]);
    h.finish().await;
}

#[tokio::test]
async fn other_events_and_messages_are_published_with_all_their_fields() {
    let mut h = Harness::start(Options::default()).await;
    let scan = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_scan]]></FromUserName><CreateTime>1700000001</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[SCAN]]></Event><EventKey><![CDATA[123]]></EventKey><Ticket><![CDATA[TICKET]]></Ticket></xml>";
    assert_eq!(h.post_plain("/wechat", "AAAAA", scan).await.0, StatusCode::OK);
    let d = h.next_result().await;
    assert_eq!(d.routing_key.as_str(), "event.scan");
    let v = json(&d);
    assert_eq!((v["type"].clone(), v["account"].clone()), ("event".into(), "default".into()));
    assert_eq!(
        (v["EventKey"].clone(), v["Ticket"].clone(), v["Event"].clone()),
        ("123".into(), "TICKET".into(), "SCAN".into())
    );
    assert!(v["received_at"].is_string());

    let sent = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_s]]></FromUserName><CreateTime>1700000002</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_sent_event]]></Event><SubscribeMsgSentEvent><List><TemplateId><![CDATA[T1]]></TemplateId><MsgID>1700827132819554304</MsgID><ErrorCode>0</ErrorCode><ErrorStatus><![CDATA[success]]></ErrorStatus></List></SubscribeMsgSentEvent></xml>";
    assert_eq!(h.post_plain("/wechat", "AAAAA", sent).await.0, StatusCode::OK);
    let d = h.next_result().await;
    // A subscription message's receipt is typed (issue 15): a delivery event of the account's kind.
    assert_eq!(d.routing_key.as_str(), "delivery.success");
    assert_eq!((json(&d)["msgid"].as_u64(), json(&d)["kind"].clone()), (Some(1700827132819554304), "subscribe".into()));

    let text = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_t]]></FromUserName><CreateTime>1700000003</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content><MsgId>6054768590064713728</MsgId></xml>";
    assert_eq!(h.post_plain("/wechat", "AAAAA", text).await.0, StatusCode::OK);
    let d = h.next_result().await;
    assert_eq!(d.routing_key.as_str(), "message.text");
    assert_eq!((json(&d)["type"].clone(), json(&d)["Content"].clone()), ("message".into(), "hello".into()));
    h.finish().await;
}

#[tokio::test]
async fn the_seed_malformed_push_is_400_and_parked_once_in_the_dead_letter_queue() {
    let mut h = Harness::start(Options::default()).await;
    let (status, reason) = h.post_plain("/wechat", "AAAAA", SEED_MALFORMED).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("unterminated CDATA in <FromUserName>"), "{reason}");
    // WeChat may push it again: still one copy.
    assert_eq!(h.post_plain("/wechat", "AAAAA", SEED_MALFORMED).await.0, StatusCode::BAD_REQUEST);
    let parked = h.dead_until_marker().await;
    assert_eq!(parked.len(), 1, "one dead-letter copy");
    let d = &parked[0];
    assert_eq!(d.data, SEED_MALFORMED.as_bytes(), "body untouched");
    assert_eq!(header_text(&d.properties, "x-wxpush-source").as_deref(), Some("webhook"));
    assert_eq!(header_text(&d.properties, "x-wxpush-account").as_deref(), Some("default"));
    assert!(
        header_text(&d.properties, "x-wxpush-reason").is_some_and(|r| r.contains("unterminated CDATA")),
        "{:?}",
        header_text(&d.properties, "x-wxpush-reason")
    );
    assert!(header_text(&d.properties, "x-wxpush-timestamp").is_some());
    assert_eq!(d.properties.delivery_mode(), &Some(2));
    assert!(h.results_until_marker().await.is_empty(), "nothing on the results exchange");
    h.finish().await;
}

#[tokio::test]
async fn doctype_oversized_and_badly_signed_pushes_are_refused() {
    let mut h = Harness::start(Options::default()).await;
    let doctype = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>{}",
        receipt_xml(1, "success")
    );
    let (status, reason) = h.post_plain("/wechat", "AAAAA", doctype).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("DOCTYPE"), "{reason}");

    let big = format!("<xml><Pad>{}</Pad></xml>", "x".repeat(70 * 1024));
    assert_eq!(h.post_plain("/wechat", "AAAAA", big).await.0, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, reason) = h.post_plain("/wechat", "not-the-token", receipt_xml(2, "success")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!reason.contains("AAAAA"), "no secret in the answer: {reason}");
    // Unsigned.
    let (status, _) =
        h.send(h.http.post(h.url("/wechat", "timestamp=1&nonce=2")).body(receipt_xml(3, "success"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Signed long ago: a replay.
    let (ts, nonce) = ((now() - 3600).to_string(), "n".to_owned());
    let q = format!("signature={}&timestamp={ts}&nonce={nonce}", crypto::signature("AAAAA", &ts, &nonce));
    assert_eq!(
        h.send(h.http.post(h.url("/wechat", &q)).body(receipt_xml(4, "success"))).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(h.post_plain("/wechat/nobody", "AAAAA", receipt_xml(5, "success")).await.0, StatusCode::NOT_FOUND);

    // Only the DOCTYPE push was signed and unreadable: it alone is parked.
    let parked = h.dead_until_marker().await;
    assert_eq!(parked.len(), 1);
    assert!(header_text(&parked[0].properties, "x-wxpush-reason").is_some_and(|r| r.contains("DOCTYPE")));
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn a_push_whose_client_hangs_up_is_still_published() {
    let mut h = Harness::start(Options::default()).await;
    // No msgid record: the push waits ~1.5 s for it, long after this client gave up.
    let (ts, nonce) = (now().to_string(), random(9));
    let q = format!("signature={}&timestamp={ts}&nonce={nonce}", crypto::signature("AAAAA", &ts, &nonce));
    let hung_up = h
        .http
        .post(h.url("/wechat", &q))
        .body(receipt_xml(60606, "success"))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(hung_up.is_err_and(|e| e.is_timeout()));
    let d = h.next_result().await;
    assert_eq!(json(&d)["msgid"], 60606);
    // WeChat's re-push finds it done and publishes nothing more.
    assert_eq!(
        h.post_plain("/wechat", "AAAAA", receipt_xml(60606, "success")).await,
        (StatusCode::OK, "success".into())
    );
    assert!(h.results_until_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn a_broker_outage_answers_503_and_the_re_push_succeeds_once() {
    let relay = Forwarder::to_rabbitmq().await;
    relay.off();
    let mut h =
        Harness::start(Options { amqp_url: relay.url(), msgid_wait: Duration::from_millis(50), ..Options::default() })
            .await;

    // The broker is unreachable from the start.
    let (status, reason) = h.post_plain("/wechat", "AAAAA", receipt_xml(808, "success")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason}");
    // No done mark (and no pending mark left behind) for an event that was not confirmed.
    let seen = h.redis.keys().push_seen(DEFAULT_APPID, "receipt:808:success");
    let mark: Option<String> = redis::cmd("GET").arg(&seen).query_async(&mut h.redis.conn()).await.expect("get");
    assert_eq!(mark, None);
    let (status, _) = h.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // The broker is back: WeChat's re-push goes through.
    relay.on();
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(808, "success")).await, (StatusCode::OK, "success".into()));
    let (status, body) = h.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The broker goes away while the webhook holds a connection to it.
    relay.off();
    let (status, _) = h.post_plain("/wechat", "AAAAA", receipt_xml(809, "success")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    relay.on();
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(809, "success")).await.0, StatusCode::OK);
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(809, "success")).await.0, StatusCode::OK);

    let got = h.results_until_marker().await;
    let ids: Vec<Value> = got.iter().map(|d| json(d)["msgid"].clone()).collect();
    assert_eq!(ids, [Value::from(808), Value::from(809)], "each event exactly once");
    h.finish().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_on_the_admin_port_only() {
    let h = Harness::start(Options::default()).await;
    assert_eq!(h.admin_get("/healthz").await, (StatusCode::OK, "ok".into()));
    let (status, body) = h.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // WeChat's port serves WeChat's paths and nothing else.
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let (status, _) = h.send(h.http.get(format!("{}{path}", h.base))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path} on the public port");
    }
    for path in ["/wechat", "/wechat/default"] {
        let (status, _) = h.send(h.http.post(format!("{}{path}", h.admin)).body(receipt_xml(1, "success"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path} on the admin port");
    }
    h.finish().await;
}

#[tokio::test]
async fn metrics_count_outcomes_by_reason_and_time_pushes_and_confirms_with_help_text() {
    let mut h = Harness::start(Options::default()).await;
    let published = r#"wxpush_webhook_pushes_total{account="rotating",outcome="published"}"#;
    let duplicate = r#"wxpush_webhook_pushes_total{account="rotating",outcome="duplicate"}"#;
    let bad_signature =
        r#"wxpush_webhook_pushes_total{account="rotating",outcome="refused",reason="bad_msg_signature"}"#;
    let plaintext = r#"wxpush_webhook_pushes_total{account="rotating",outcome="refused",reason="plaintext_refused"}"#;
    let dead = r#"wxpush_webhook_pushes_total{account="rotating",outcome="dead_lettered"}"#;
    let unknown = r#"wxpush_webhook_pushes_total{account="unknown",outcome="refused",reason="unknown_account"}"#;
    let series = [published, duplicate, bad_signature, plaintext, dead, unknown];
    let mut before = Vec::new();
    for s in series {
        before.push(h.metric(s).await);
    }
    let confirms_before = h.metric("wxpush_webhook_publish_confirm_seconds_count").await;

    let key = h.rot_new_key.clone();
    h.write_msgid_record(ROT_APPID, 5151, "metrics-job").await;
    let receipt = receipt_xml(5151, "success");
    for _ in 0..2 {
        assert_eq!(h.post_aes("/wechat/rotating", "rottoken", &key, ROT_APPID, &receipt).await.0, StatusCode::OK);
    }
    assert_eq!(h.post_aes("/wechat/rotating", "wrong", &key, ROT_APPID, &receipt).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(h.post_plain("/wechat/rotating", "rottoken", receipt.clone()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.post_aes("/wechat/rotating", "rottoken", &key, ROT_APPID, "<xml><Marker>1</Marker>").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(h.post_plain(&format!("/wechat/{}", random(12)), "x", receipt).await.0, StatusCode::NOT_FOUND);

    for (s, was) in series.iter().zip(before) {
        assert_eq!(h.metric(s).await, was + 1.0, "{s}");
    }
    assert!(h.metric("wxpush_webhook_publish_confirm_seconds_count").await >= confirms_before + 2.0);
    let (_, text) = h.admin_get("/metrics").await;
    for name in [
        "wxpush_webhook_pushes_total",
        "wxpush_webhook_push_seconds",
        "wxpush_webhook_publish_confirm_seconds",
        "wxpush_webhook_connections_open",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has HELP text:\n{text}");
    }
    assert!(text.contains(r#"wxpush_webhook_push_seconds_bucket{outcome="published",le="0.5"}"#), "{text}");
    assert!(text.contains(r#"wxpush_webhook_connections_open{port="public"}"#), "{text}");
    assert!(!text.contains(&key) && !text.contains("rottoken"), "no secret in the metrics");
    assert_eq!(h.next_result().await.routing_key.as_str(), "delivery.success");
    h.finish().await;
}

#[tokio::test]
async fn without_redis_nothing_is_published_and_the_answer_is_503() {
    // Nothing listens on port 1: every Redis command fails at once.
    let mut h = Harness::start(Options { redis_url: "redis://127.0.0.1:1/".into(), ..Options::default() }).await;
    let (status, reason) = h.post_plain("/wechat", "AAAAA", receipt_xml(4040, "success")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reason.contains("Redis"), "{reason}");
    // Unreadable pushes are not parked either (they could not be de-duplicated): WeChat pushes again.
    assert_eq!(h.post_plain("/wechat", "AAAAA", SEED_MALFORMED).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = h.admin_get("/readyz").await;
    assert_eq!((status, body.contains("redis: down")), (StatusCode::SERVICE_UNAVAILABLE, true), "{body}");
    // This webhook cannot publish a marker push: the test publishes one itself. Anything the
    // webhook had confirmed would be queued before it.
    assert!(h.results_until_direct_marker().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn shutdown_lets_a_push_in_flight_finish() {
    let mut h = Harness::start(Options::default()).await;
    // No msgid record: this push spends ~1.5 s waiting for one; shutdown starts meanwhile.
    let (answer, ()) = tokio::join!(h.post_plain("/wechat", "AAAAA", receipt_xml(7070, "success")), async {
        h.until_held(DEFAULT_APPID, "receipt:7070:success").await;
        h.stop.cancel();
    });
    assert_eq!(answer, (StatusCode::OK, "success".into()));
    assert_eq!(json(&h.next_result().await)["msgid"], 7070);
    h.finish().await;
}

#[tokio::test]
async fn a_plaintext_push_to_a_safe_mode_account_is_refused_and_publishes_nothing() {
    let mut h = Harness::start(Options::default()).await;
    // `signature` covers only token, timestamp and nonce: anyone who saw one push URL of the
    // account could replay it with a body of their own, such as a forged user_block.
    let forged = receipt_xml(13_131, "failed:user block");
    let (status, reason) = h.post_plain("/wechat/safe", "safetoken", forged.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reason}");
    assert!(reason.contains("accept_plaintext"), "the answer says how to switch modes: {reason}");
    // encrypt_type=raw is plaintext too.
    let (ts, nonce) = (now().to_string(), random(9));
    let q = format!(
        "signature={}&timestamp={ts}&nonce={nonce}&encrypt_type=raw",
        crypto::signature("safetoken", &ts, &nonce)
    );
    assert_eq!(h.send(h.http.post(h.url("/wechat/safe", &q)).body(forged.clone())).await.0, StatusCode::UNAUTHORIZED);
    // The rotating account has two keys: the same rule.
    assert_eq!(h.post_plain("/wechat/rotating", "rottoken", forged.clone()).await.0, StatusCode::UNAUTHORIZED);

    // An account switching modes in the console takes both while accept_plaintext is set.
    let key = h.safe_key.clone();
    assert_eq!(
        h.post_plain("/wechat/switching", "switchtoken", receipt_xml(13_132, "success")).await,
        (StatusCode::OK, "success".into())
    );
    assert_eq!(
        h.post_aes("/wechat/switching", "switchtoken", &key, SWITCHING_APPID, &receipt_xml(13_133, "success")).await.0,
        StatusCode::OK
    );
    let got = h.results_until_marker().await;
    let ids: Vec<Value> = got.iter().map(|d| json(d)["msgid"].clone()).collect();
    assert_eq!(ids, [Value::from(13_132), Value::from(13_133)], "the refused pushes published nothing");
    assert!(h.dead_until_marker().await.is_empty(), "and parked nothing");
    h.finish().await;
}

#[tokio::test]
async fn long_job_ids_event_names_and_field_names_are_published_not_refused() {
    let mut h = Harness::start(Options::default()).await;
    // A job_id of 86 CJK characters: 258 bytes, more than an AMQP short string holds.
    let job_id = "订".repeat(86);
    h.write_msgid_record(DEFAULT_APPID, 86_258, &job_id).await;
    assert_eq!(
        h.post_plain("/wechat", "AAAAA", receipt_xml(86_258, "success")).await,
        (StatusCode::OK, "success".into())
    );
    let d = h.next_result().await;
    assert_eq!(json(&d)["job_id"], job_id.as_str(), "the body keeps the job_id whole");
    let correlation = correlation_id(&d).expect("a correlation_id");
    assert!(correlation.starts_with("sha1:") && correlation.len() == 45, "{correlation}");

    // An event name longer than a routing key may be, and a field name longer than a short
    // string: published whole in the body, under a routing key of the name's first 64 characters.
    let event = format!("E{}", "x".repeat(400));
    let field = format!("F{}", "y".repeat(300));
    let push = format!(
        "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_long]]></FromUserName><CreateTime>1700000100</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event><{field}>v</{field}></xml>"
    );
    assert_eq!(h.post_plain("/wechat", "AAAAA", push).await, (StatusCode::OK, "success".into()));
    let d = h.next_result().await;
    assert_eq!(d.routing_key.as_str(), format!("event.e{}", "x".repeat(63)));
    assert_eq!((json(&d)["Event"].clone(), json(&d)[&field].clone()), (event.clone().into(), "v".into()));
    // A user's message with a long MsgType: message.<type>, cut the same way.
    let msg_type = "t".repeat(300);
    let message = format!(
        "<xml><ToUserName>gh_1</ToUserName><FromUserName>o_long</FromUserName><CreateTime>1700000101</CreateTime><MsgType>{msg_type}</MsgType><MsgId>42</MsgId></xml>"
    );
    assert_eq!(h.post_plain("/wechat", "AAAAA", message).await.0, StatusCode::OK);
    let d = h.next_result().await;
    assert_eq!(d.routing_key.as_str(), format!("message.{}", &msg_type[..64]));
    // Nothing is left pending: a re-push of each is a duplicate, answered at once.
    assert_eq!(h.post_plain("/wechat", "AAAAA", receipt_xml(86_258, "success")).await.0, StatusCode::OK);
    assert!(h.results_until_marker().await.is_empty());
    assert!(pending_marks(&h).await.is_empty());
    h.finish().await;
}

/// The pending marks (`P…` values) under the test's Redis prefix.
async fn pending_marks(h: &Harness) -> Vec<String> {
    let mut conn = h.redis.conn();
    let pattern = format!("{}:*", h.redis.keys().prefix());
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.expect("keys");
    let mut pending = Vec::new();
    for key in keys {
        let value: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap_or(None);
        if value.is_some_and(|v| v.starts_with('P')) {
            pending.push(key);
        }
    }
    pending
}

#[tokio::test]
async fn a_push_task_that_panics_or_is_dropped_releases_its_pending_mark() {
    let h = Harness::start(Options::default()).await;
    let (ttl, wait) = (Duration::from_secs(30), Duration::from_millis(100));
    for how in ["panics", "is dropped"] {
        let event = format!("receipt:1:{how}");
        let mut mark = h.redis.push_mark(DEFAULT_APPID, &event);
        match mark.claim(None, ttl, wait).await.expect("claim") {
            (Claim::Claimed, _) => {}
            other => panic!("a fresh event is ours: {other:?}"),
        }
        let (holding, held) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _mark = mark;
            let _ = holding.send(());
            if how == "panics" {
                panic!("the push task fails half-way");
            }
            std::future::pending::<()>().await;
        });
        let _ = held.await;
        if how == "is dropped" {
            task.abort();
        }
        assert!(task.await.is_err(), "the task {how}");
        // The re-push can claim the event again: the mark was released, not left to run out.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match h.redis.push_mark(DEFAULT_APPID, &event).claim(None, ttl, wait).await.expect("claim") {
                (Claim::Claimed, _) => break,
                other => assert!(tokio::time::Instant::now() < deadline, "still {other:?} after the task {how}"),
            }
        }
    }
    h.finish().await;
}

/// Opens `n` connections to `addr`, 64 at a time; every other one sends half a request head.
async fn stalled_connections(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    futures_util::stream::iter(0..n)
        .map(|i| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            if i % 2 == 0 {
                stream
                    .write_all(b"POST /wechat?signature=a&timestamp=1&nonce=2 HTTP/1.1\r\nHost: x\r\nContent-")
                    .await
                    .ok();
            }
            stream
        })
        .buffer_unordered(64)
        .collect()
        .await
}

#[tokio::test]
async fn stalled_connections_neither_block_pushes_nor_stay_open() {
    // Both ends of every connection live in this process: make room for them.
    const STALLED: usize = 1_600;
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("file-descriptor limit");
    assert!(
        limit >= 2 * STALLED as u64 + 512,
        "`ulimit -n` is {limit}: this test needs {} descriptors",
        2 * STALLED + 512
    );
    let h = Harness::start(Options { max_connections: Some(STALLED + 400), ..Options::default() }).await;
    let open = r#"wxpush_webhook_connections_open{port="public"}"#;
    let timeouts = r#"wxpush_webhook_header_timeouts_total{port="public"}"#;
    let timeouts_before = h.metric(timeouts).await;
    let addr = h.base.trim_start_matches("http://").to_owned();
    let opened = tokio::time::Instant::now();
    let mut stalled = stalled_connections(&addr, STALLED).await;
    // The webhook has accepted them all (the gauge is shared with other tests: at least).
    let accepted = eventually(Duration::from_secs(20), || async { h.metric(open).await >= STALLED as f64 }).await;
    assert!(accepted, "the webhook did not accept {STALLED} connections");

    // A real push and the probes still get through, quickly.
    h.write_msgid_record(DEFAULT_APPID, 1_500_001, "under-siege").await;
    let started = std::time::Instant::now();
    assert_eq!(
        h.post_plain("/wechat", "AAAAA", receipt_xml(1_500_001, "success")).await,
        (StatusCode::OK, "success".into())
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "a push took {took:?} with {STALLED} stalled connections open");
    assert_eq!(h.admin_get("/healthz").await.0, StatusCode::OK);

    // The webhook hangs up on every stalled connection (header timeout, 10 s by default).
    let closed = futures_util::future::join_all(stalled.iter_mut().map(|s| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }));
    let left = Duration::from_secs(40).saturating_sub(opened.elapsed());
    assert!(tokio::time::timeout(left, closed).await.is_ok(), "stalled connections still open 40 s after they opened");
    assert!(h.metric(timeouts).await >= timeouts_before + STALLED as f64, "each was closed by the header timeout");
    h.finish().await;
}
