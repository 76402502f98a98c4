//! What downstream systems receive on the results exchange (docs/contract.md, "Results").

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::job::{Job, JobKind};

/// Outcome of a job, published as `send.succeeded` or `send.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendResult {
    #[serde(rename = "type")]
    pub kind: String,
    pub job_id: Option<String>,
    /// The job's kind (template or subscription message); absent for a job that could not be
    /// read, and in records of older versions.
    #[serde(rename = "kind", default, skip_serializing_if = "Option::is_none")]
    pub job_kind: Option<JobKind>,
    pub account: Option<String>,
    pub touser: Option<String>,
    pub template_id: Option<String>,
    pub status: SendStatus,
    pub msgid: Option<u64>,
    pub errcode: Option<i64>,
    pub errmsg: Option<String>,
    pub reason: Option<String>,
    pub attempts: u32,
    #[serde(with = "millis")]
    pub completed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendStatus {
    Succeeded,
    Failed,
    /// Not an outcome: the job is parked (daily quota) and will be sent later. An extension of
    /// the contract, on its own routing key, so consumers of outcomes never see it.
    Deferred,
}

impl SendResult {
    pub fn succeeded(job: &Job, msgid: u64, errmsg: String, attempts: u32) -> Self {
        Self {
            status: SendStatus::Succeeded,
            msgid: Some(msgid),
            errcode: Some(0),
            errmsg: Some(errmsg),
            reason: None,
            ..Self::for_job(job, attempts)
        }
    }

    /// A failure of a valid job. `errcode`/`errmsg` are WeChat's where it answered.
    pub fn failed(job: &Job, errcode: Option<i64>, errmsg: Option<String>, reason: String, attempts: u32) -> Self {
        Self { errcode, errmsg, reason: Some(reason), ..Self::for_job(job, attempts) }
    }

    /// Notice that a job is parked until its account's quota resets.
    pub fn deferred(job: &Job, reason: String, attempts: u32) -> Self {
        Self { status: SendStatus::Deferred, reason: Some(reason), ..Self::for_job(job, attempts) }
    }

    /// A failure of a job that could not even be read: only its job_id (and maybe account) is known.
    pub fn invalid(job_id: String, account: Option<String>, reason: String) -> Self {
        Self {
            kind: "send".into(),
            job_id: Some(job_id),
            job_kind: None,
            account,
            touser: None,
            template_id: None,
            status: SendStatus::Failed,
            msgid: None,
            errcode: None,
            errmsg: None,
            reason: Some(reason),
            attempts: 0,
            completed_at: Utc::now(),
        }
    }

    fn for_job(job: &Job, attempts: u32) -> Self {
        Self {
            kind: "send".into(),
            job_id: Some(job.job_id.clone()),
            job_kind: Some(job.kind),
            account: Some(job.account.clone()),
            touser: Some(job.touser.clone()),
            template_id: Some(job.template_id.clone()),
            status: SendStatus::Failed,
            msgid: None,
            errcode: None,
            errmsg: None,
            reason: None,
            attempts,
            completed_at: Utc::now(),
        }
    }

    /// The routing key on the results exchange.
    pub fn routing_key(&self) -> &'static str {
        match self.status {
            SendStatus::Succeeded => "send.succeeded",
            SendStatus::Failed => "send.failed",
            SendStatus::Deferred => "send.deferred",
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A delivery receipt, published as `delivery.<status>`: a template message's
/// `TEMPLATESENDJOBFINISH`, or one item of a subscription message's `subscribe_msg_sent_event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub account: String,
    pub msgid: u64,
    pub job_id: Option<String>,
    /// The kind of message delivered: `template` for TEMPLATESENDJOBFINISH, the account's
    /// subscription kind for a sent event (records of older versions have none: template).
    #[serde(rename = "kind", default)]
    pub job_kind: JobKind,
    pub touser: String,
    pub to_user_name: String,
    pub status: DeliveryStatus,
    /// `Status` (template) or `ErrorStatus` (subscription) exactly as WeChat sent it.
    pub raw_status: String,
    /// `TemplateId` of a sent event; WeChat's template receipt has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// `ErrorCode` of a sent event (0 delivered); WeChat's template receipt has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errcode: Option<i64>,
    pub create_time: i64,
    #[serde(with = "millis")]
    pub received_at: DateTime<Utc>,
}

/// A user's answer about a subscription template: one `List` item of
/// `subscribe_msg_popup_event` or `subscribe_msg_change_event`, published as
/// `consent.accepted` or `consent.rejected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentEvent {
    /// Always `consent`.
    #[serde(rename = "type")]
    pub kind: String,
    pub account: String,
    /// The job kind the consent is for: `subscribe` (official account) or
    /// `miniprogram_subscribe` (mini program).
    #[serde(rename = "kind")]
    pub job_kind: JobKind,
    /// The user (`FromUserName`).
    pub openid: String,
    /// The account's original id (`ToUserName`).
    pub to_user_name: String,
    pub template_id: String,
    pub consent: Consent,
    /// `SubscribeStatusString` exactly as WeChat sent it (`accept`, `reject`).
    pub status: String,
    /// Where the user answered: a popup's `PopupScene` as sent (`0` in a mini program, `1` an
    /// H5 page, `2` an article; null when the push has none), or `settings` for a change made
    /// in the service-notification settings.
    pub scene: Option<String>,
    /// WeChat's `Event`: `subscribe_msg_popup_event` or `subscribe_msg_change_event`.
    pub event: String,
    /// `CreateTime`: when the user answered, in seconds since the epoch.
    pub create_time: i64,
    #[serde(with = "millis")]
    pub received_at: DateTime<Utc>,
}

/// The scene of a consent change made in the settings rather than in a popup.
pub const SETTINGS_SCENE: &str = "settings";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    Accepted,
    Rejected,
}

impl Consent {
    /// Reads `SubscribeStatusString`; `None` for anything but `accept` or `reject`.
    pub fn from_raw(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "accept" => Some(Self::Accepted),
            "reject" => Some(Self::Rejected),
            _ => None,
        }
    }

    pub fn routing_key(self) -> &'static str {
        match self {
            Self::Accepted => "consent.accepted",
            Self::Rejected => "consent.rejected",
        }
    }
}

impl ConsentEvent {
    pub fn routing_key(&self) -> &'static str {
        self.consent.routing_key()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Success,
    UserBlock,
    SystemFailed,
    Failed,
}

impl DeliveryStatus {
    /// Normalizes WeChat's `Status`: spacing and case vary in the wild
    /// (`failed: system failed` and `failed:system failed` are one status).
    pub fn from_raw(raw: &str) -> Self {
        let folded: String = raw.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect();
        match folded.as_str() {
            "success" => Self::Success,
            "failed:userblock" => Self::UserBlock,
            "failed:systemfailed" => Self::SystemFailed,
            _ => Self::Failed,
        }
    }

    /// A sent event's `ErrorCode`: 0 is delivered, anything else failed (WeChat's only
    /// failures here are system failures of the asynchronous push).
    pub fn from_error_code(code: i64) -> Self {
        if code == 0 { Self::Success } else { Self::Failed }
    }

    pub fn routing_key(self) -> &'static str {
        match self {
            Self::Success => "delivery.success",
            Self::UserBlock => "delivery.user_block",
            Self::SystemFailed => "delivery.system_failed",
            Self::Failed => "delivery.failed",
        }
    }
}

/// RFC 3339 with milliseconds and `Z`, as in the contract's examples.
mod millis {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn job() -> Job {
        Job::parse(
            br#"{"job_id":"order-42-paid","touser":"oia2TjuEGTNoeX76QEjQNrcURxG8","template_id":"ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY","data":{"k":{"value":"v"}}}"#,
            None,
        )
        .unwrap()
    }

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-28T02:19:48.123Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_success_serializes_exactly_as_the_contract_shows() {
        let mut r = SendResult::succeeded(&job(), 200228332, "ok".into(), 1);
        r.completed_at = at();
        assert_eq!(r.routing_key(), "send.succeeded");
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "send",
                "job_id": "order-42-paid",
                "kind": "template",
                "account": "default",
                "touser": "oia2TjuEGTNoeX76QEjQNrcURxG8",
                "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
                "status": "succeeded",
                "msgid": 200228332,
                "errcode": 0,
                "errmsg": "ok",
                "reason": null,
                "attempts": 1,
                "completed_at": "2026-11-28T02:19:48.123Z"
            })
        );
    }

    #[test]
    fn a_failure_has_null_msgid_and_words_for_the_reason() {
        let r = SendResult::failed(&job(), Some(40003), Some("invalid openid".into()), "invalid openid".into(), 1);
        assert_eq!(r.routing_key(), "send.failed");
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["msgid"], Value::Null);
        assert_eq!(v["errcode"], 40003);
        assert_eq!(v["reason"], "invalid openid");
        let inv = SendResult::invalid("j".into(), None, "invalid job: touser missing".into());
        let v: Value = serde_json::from_slice(&inv.to_json()).unwrap();
        assert_eq!(v["errcode"], Value::Null);
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["touser"], Value::Null);
    }

    #[test]
    fn large_msgids_stay_exact_integers() {
        let r = SendResult::succeeded(&job(), 3599307433715204104, "ok".into(), 2);
        let text = String::from_utf8(r.to_json()).unwrap();
        assert!(text.contains("\"msgid\":3599307433715204104"), "{text}");
        let back: SendResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back.msgid, Some(3599307433715204104));
    }

    #[test]
    fn delivery_statuses_normalize_and_route() {
        assert_eq!(DeliveryStatus::from_raw("success"), DeliveryStatus::Success);
        assert_eq!(DeliveryStatus::from_raw("failed:user block"), DeliveryStatus::UserBlock);
        assert_eq!(DeliveryStatus::from_raw("failed: system failed"), DeliveryStatus::SystemFailed);
        assert_eq!(DeliveryStatus::from_raw("failed:system failed"), DeliveryStatus::SystemFailed);
        assert_eq!(DeliveryStatus::from_raw("failed: something new"), DeliveryStatus::Failed);
        assert_eq!(DeliveryStatus::UserBlock.routing_key(), "delivery.user_block");
        assert_eq!(DeliveryStatus::Failed.routing_key(), "delivery.failed");
    }

    #[test]
    fn a_delivery_event_serializes_as_the_contract_shows() {
        let e = DeliveryEvent {
            kind: "delivery".into(),
            account: "default".into(),
            msgid: 200163836,
            job_id: Some("order-42-paid".into()),
            job_kind: JobKind::Template,
            touser: "oia2TjuEGTNoeX76QEjQNrcURxG8".into(),
            to_user_name: "gh_7f083739789a".into(),
            status: DeliveryStatus::from_raw("failed:user block"),
            raw_status: "failed:user block".into(),
            template_id: None,
            errcode: None,
            create_time: 1395658984,
            received_at: DateTime::parse_from_rfc3339("2026-11-28T02:19:49.001Z").unwrap().with_timezone(&Utc),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({
                "type": "delivery",
                "account": "default",
                "msgid": 200163836,
                "job_id": "order-42-paid",
                "kind": "template",
                "touser": "oia2TjuEGTNoeX76QEjQNrcURxG8",
                "to_user_name": "gh_7f083739789a",
                "status": "user_block",
                "raw_status": "failed:user block",
                "create_time": 1395658984,
                "received_at": "2026-11-28T02:19:49.001Z"
            })
        );
    }

    #[test]
    fn a_subscription_delivery_event_carries_its_kind_template_and_errcode() {
        let e = DeliveryEvent {
            kind: "delivery".into(),
            account: "mini".into(),
            msgid: 1864323726461255680,
            job_id: None,
            job_kind: JobKind::MiniprogramSubscribe,
            touser: "o7esq5PHRGBQYmeNyfG064wEFVpQ".into(),
            to_user_name: "gh_123456789abc".into(),
            status: DeliveryStatus::from_error_code(10001),
            raw_status: "system failed".into(),
            template_id: Some("BEwX0BO-T3MqK3Uc5oTU3CGBqzjpndk2jzUf7VfExd8".into()),
            errcode: Some(10001),
            create_time: 1620963428,
            received_at: at(),
        };
        assert_eq!(e.status.routing_key(), "delivery.failed");
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains("\"msgid\":1864323726461255680"), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "delivery",
                "account": "mini",
                "msgid": 1864323726461255680u64,
                "job_id": null,
                "kind": "miniprogram_subscribe",
                "touser": "o7esq5PHRGBQYmeNyfG064wEFVpQ",
                "to_user_name": "gh_123456789abc",
                "status": "failed",
                "raw_status": "system failed",
                "template_id": "BEwX0BO-T3MqK3Uc5oTU3CGBqzjpndk2jzUf7VfExd8",
                "errcode": 10001,
                "create_time": 1620963428,
                "received_at": "2026-11-28T02:19:48.123Z"
            })
        );
        assert_eq!(DeliveryStatus::from_error_code(0), DeliveryStatus::Success);
        // A record written before deliveries had a kind reads as a template's.
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("kind");
        assert_eq!(serde_json::from_value::<DeliveryEvent>(old).unwrap().job_kind, JobKind::Template);
    }

    #[test]
    fn a_consent_event_serializes_with_its_routing_key() {
        let e = ConsentEvent {
            kind: "consent".into(),
            account: "default".into(),
            job_kind: JobKind::Subscribe,
            openid: "otFpruAK8D-E6EfStSYonYSBZ8_4".into(),
            to_user_name: "gh_123456789abc".into(),
            template_id: "VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc".into(),
            consent: Consent::Accepted,
            status: "accept".into(),
            scene: Some("2".into()),
            event: "subscribe_msg_popup_event".into(),
            create_time: 1610969440,
            received_at: at(),
        };
        assert_eq!(e.routing_key(), "consent.accepted");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({
                "type": "consent",
                "account": "default",
                "kind": "subscribe",
                "openid": "otFpruAK8D-E6EfStSYonYSBZ8_4",
                "to_user_name": "gh_123456789abc",
                "template_id": "VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc",
                "consent": "accepted",
                "status": "accept",
                "scene": "2",
                "event": "subscribe_msg_popup_event",
                "create_time": 1610969440,
                "received_at": "2026-11-28T02:19:48.123Z"
            })
        );
        assert_eq!(Consent::Rejected.routing_key(), "consent.rejected");
        for (raw, consent) in
            [("accept", Some(Consent::Accepted)), (" Reject ", Some(Consent::Rejected)), ("ban", None), ("", None)]
        {
            assert_eq!(Consent::from_raw(raw), consent, "{raw:?}");
        }
    }
}
