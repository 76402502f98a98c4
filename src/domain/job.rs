//! A notification job, as business systems publish it (docs/contract.md, "Jobs").
//!
//! [`Job::parse`] is the only way to get a [`Job`]: once you hold one, it is valid. Anything
//! wrong with the input becomes an [`InvalidJob`] that keeps whatever `job_id` could be read, so
//! the worker can still publish a `send.failed` result for it.

use std::{borrow::Cow, collections::BTreeMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha1::{Digest, Sha1};

/// Largest job body the worker accepts. WeChat itself caps template content far below this;
/// a larger body is a bug or an attack, and goes to the dead-letter queue untouched.
pub const MAX_JOB_BYTES: usize = 64 * 1024;
/// `job_id` length bounds, in characters (docs/contract.md).
pub const MAX_JOB_ID_CHARS: usize = 128;
/// Longest `client_msg_id` sent as is; a longer one (or a derived one) is hashed down.
/// WeChat documents no limit for template sends; mass send caps its `clientmsgid` at 64 bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
const MAX_FIELD_CHARS: usize = 1024;

/// The account a job names when it names none.
pub const DEFAULT_ACCOUNT: &str = "default";

/// Which WeChat message a job sends, and through which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// 模板消息, `cgi-bin/message/template/send` (the default: jobs without `kind`).
    #[default]
    Template = 0,
    /// An official account's 订阅通知, `cgi-bin/message/subscribe/bizsend`.
    Subscribe = 1,
    /// A mini program's subscription message, `cgi-bin/message/subscribe/send`.
    MiniprogramSubscribe = 2,
}

impl JobKind {
    /// Every kind, in discriminant order (`kind as usize` indexes arrays built from it).
    pub const ALL: [JobKind; 3] = [JobKind::Template, JobKind::Subscribe, JobKind::MiniprogramSubscribe];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Template => "template",
            JobKind::Subscribe => "subscribe",
            JobKind::MiniprogramSubscribe => "miniprogram_subscribe",
        }
    }

    /// The WeChat endpoint that sends it, below the API base.
    pub fn endpoint(self) -> &'static str {
        match self {
            JobKind::Template => "/cgi-bin/message/template/send",
            JobKind::Subscribe => "/cgi-bin/message/subscribe/bizsend",
            JobKind::MiniprogramSubscribe => "/cgi-bin/message/subscribe/send",
        }
    }

    /// Whether its data keys are typed (`thing1`, `number2`, …) and checked before sending.
    pub fn is_subscription(self) -> bool {
        self != JobKind::Template
    }

    fn parse(text: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which version of a mini program a subscription message opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MiniprogramState {
    Developer,
    Trial,
    Formal,
}

/// The language of a mini program subscription message's "进入小程序查看".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lang {
    #[serde(rename = "zh_CN")]
    ZhCn,
    #[serde(rename = "en_US")]
    EnUs,
    #[serde(rename = "zh_HK")]
    ZhHk,
    #[serde(rename = "zh_TW")]
    ZhTw,
}

/// A valid notification job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub job_id: String,
    pub kind: JobKind,
    pub account: String,
    pub touser: String,
    pub template_id: String,
    pub url: Option<String>,
    pub miniprogram: Option<MiniProgram>,
    pub topcolor: Option<String>,
    /// Subscription messages: the page the message opens (a web page for `subscribe`, a page
    /// of the mini program for `miniprogram_subscribe`).
    pub page: Option<String>,
    pub miniprogram_state: Option<MiniprogramState>,
    pub lang: Option<Lang>,
    pub data: BTreeMap<String, DataItem>,
    /// Always set: the job's own value, or one derived from `job_id`, so that every attempt
    /// and every redelivery of the job carries the same one and WeChat drops duplicates.
    pub client_msg_id: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MiniProgram {
    pub appid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagepath: Option<String>,
}

/// One keyword of the template. `value` is kept as JSON so numbers pass through unchanged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataItem {
    pub value: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
}

impl crate::domain::subscribe::DataValue for DataItem {
    fn text(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.value.text()
    }
}

/// Why a job could not be accepted, with the `job_id` when one could be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid job: {reason}")]
pub struct InvalidJob {
    pub job_id: Option<String>,
    pub reason: String,
}

impl InvalidJob {
    fn new(job_id: Option<&str>, reason: impl Into<String>) -> Self {
        Self { job_id: job_id.map(str::to_owned), reason: reason.into() }
    }
}

/// The wire form, read leniently so that each problem can be named precisely afterwards.
#[derive(Deserialize)]
struct RawJob {
    job_id: Option<Value>,
    kind: Option<Value>,
    page: Option<Value>,
    miniprogram_state: Option<Value>,
    lang: Option<Value>,
    account: Option<Value>,
    touser: Option<Value>,
    template_id: Option<Value>,
    url: Option<Value>,
    miniprogram: Option<Value>,
    topcolor: Option<Value>,
    data: Option<Value>,
    client_msg_id: Option<Value>,
    expires_at: Option<Value>,
}

impl Job {
    /// Parses and validates a job body. `message_id` is the AMQP property, used as `job_id`
    /// when the body has none.
    pub fn parse(body: &[u8], message_id: Option<&str>) -> Result<Job, InvalidJob> {
        let fallback_id = message_id.filter(|id| is_valid_job_id(id));
        if body.len() > MAX_JOB_BYTES {
            return Err(InvalidJob::new(
                fallback_id,
                format!("body is {} bytes, over the {MAX_JOB_BYTES}-byte limit", body.len()),
            ));
        }
        let text = std::str::from_utf8(body)
            .map_err(|e| InvalidJob::new(fallback_id, format!("body is not UTF-8 (at byte {})", e.valid_up_to())))?;
        if let Some(job) = parse_fast(text, message_id) {
            return Ok(job);
        }
        Self::parse_slow(text, message_id, fallback_id)
    }

    /// Reads the body as generic JSON, so that whatever is wrong with it can be named.
    fn parse_slow(text: &str, message_id: Option<&str>, fallback_id: Option<&str>) -> Result<Job, InvalidJob> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| InvalidJob::new(fallback_id, format!("body is not JSON: {e}")))?;
        let Value::Object(_) = value else {
            return Err(InvalidJob::new(fallback_id, "body is not a JSON object"));
        };
        let raw: RawJob = serde_json::from_value(value)
            .map_err(|e| InvalidJob::new(fallback_id, format!("body is not a job: {e}")))?;

        // The job_id first: every later error can then carry it.
        let job_id = slow_job_id(raw.job_id.as_ref(), message_id, fallback_id)?;
        let id = Some(job_id.as_str());
        let fail = |reason: String| InvalidJob::new(id, reason);

        let kind = match optional_string(&raw.kind, "kind").map_err(&fail)? {
            None => JobKind::Template,
            Some(k) => JobKind::parse(&k).ok_or_else(|| {
                fail(format!("kind {k:?} is not one of \"template\", \"subscribe\", \"miniprogram_subscribe\""))
            })?,
        };
        let account = optional_string(&raw.account, "account").map_err(&fail)?;
        let account = account.unwrap_or_else(|| DEFAULT_ACCOUNT.to_owned());
        if account.is_empty() {
            return Err(fail("account must not be empty".into()));
        }
        let touser = required_string(&raw.touser, "touser").map_err(&fail)?;
        let template_id = required_string(&raw.template_id, "template_id").map_err(&fail)?;
        let url = optional_string(&raw.url, "url").map_err(&fail)?;
        let topcolor = optional_string(&raw.topcolor, "topcolor").map_err(&fail)?;
        let miniprogram = slow_miniprogram(raw.miniprogram.as_ref()).map_err(&fail)?;
        let data = parse_data(raw.data.as_ref()).map_err(&fail)?;
        let client_msg_id = optional_string(&raw.client_msg_id, "client_msg_id").map_err(&fail)?;
        let client_msg_id = choose_client_msg_id(client_msg_id.as_deref(), &job_id)
            .ok_or_else(|| fail("client_msg_id must not be empty".into()))?;
        let expires_at = match optional_string(&raw.expires_at, "expires_at").map_err(&fail)? {
            None => None,
            Some(s) => {
                Some(parse_time(&s).map_err(|e| fail(format!("expires_at {s:?} is not an RFC 3339 time: {e}")))?)
            }
        };
        let extras = SubscriptionFields::read(&raw, kind).map_err(&fail)?;
        let job = Job {
            job_id,
            kind,
            account,
            touser,
            template_id,
            url,
            miniprogram,
            topcolor,
            page: extras.page,
            miniprogram_state: extras.miniprogram_state,
            lang: extras.lang,
            data,
            client_msg_id,
            expires_at,
        };
        job.check_kind().map_err(|reason| InvalidJob::new(Some(&job.job_id), reason))?;
        Ok(job)
    }

    /// Whether the job's `expires_at` has passed at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The body of the job's send (its kind's endpoint), serialized once: a template message's
    /// fields, or a subscription message's (typed data values as text, no colours, no
    /// `client_msg_id`).
    pub fn message_body(&self) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct Item {
            value: String,
        }
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match self.kind {
            JobKind::Template => serde_json::to_vec(&self.body(&self.data, Some(&self.client_msg_id))),
            JobKind::Subscribe | JobKind::MiniprogramSubscribe => {
                let data: BTreeMap<&str, Item> =
                    self.data.iter().map(|(k, item)| (k.as_str(), Item { value: text(&item.value) })).collect();
                serde_json::to_vec(&self.body(data, None))
            }
        }
    }

    fn body<'a, D>(&'a self, data: D, client_msg_id: Option<&'a str>) -> Body<'a, D> {
        Body {
            touser: &self.touser,
            template_id: &self.template_id,
            url: self.url.as_deref(),
            page: self.page.as_deref(),
            miniprogram: self.miniprogram.as_ref(),
            topcolor: self.topcolor.as_deref(),
            miniprogram_state: self.miniprogram_state,
            lang: self.lang,
            data,
            client_msg_id,
        }
    }

    /// The fields a kind does not take, and a subscription message's typed data.
    fn check_kind(&self) -> Result<(), String> {
        let not_for = |field: &str| Err(format!("{field} is not a field of kind {}", self.kind));
        match self.kind {
            JobKind::Template => return Ok(()),
            JobKind::Subscribe if self.miniprogram_state.is_some() => return not_for("miniprogram_state"),
            JobKind::Subscribe if self.lang.is_some() => return not_for("lang"),
            JobKind::MiniprogramSubscribe if self.miniprogram.is_some() => return not_for("miniprogram"),
            _ if self.url.is_some() => return not_for("url (a subscription message opens `page`)"),
            _ if self.topcolor.is_some() => return not_for("topcolor"),
            _ => {}
        }
        if let Some((key, _)) = self.data.iter().find(|(_, item)| item.color.is_some()) {
            return Err(format!("data.{key}.color: subscription messages have no colours"));
        }
        crate::domain::subscribe::validate_data(&self.data).map_err(|e| e.to_string())
    }
}

/// A send's body, for every endpoint: each kind sets only the fields it takes (`check_kind`
/// refuses the others), and absent ones are left out.
#[derive(Serialize)]
struct Body<'a, D> {
    touser: &'a str,
    template_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    miniprogram: Option<&'a MiniProgram>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topcolor: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    miniprogram_state: Option<MiniprogramState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lang: Option<Lang>,
    data: D,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
}

/// A job as [`parse_fast`] reads it: borrowed strings, typed fields.
#[derive(Deserialize)]
struct Fast<'a> {
    #[serde(borrow, default)]
    job_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    account: Option<Cow<'a, str>>,
    #[serde(borrow)]
    touser: Cow<'a, str>,
    #[serde(borrow)]
    template_id: Cow<'a, str>,
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(default)]
    miniprogram: Option<MiniProgram>,
    #[serde(borrow, default)]
    topcolor: Option<Cow<'a, str>>,
    data: BTreeMap<String, FastItem>,
    #[serde(borrow, default)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    expires_at: Option<Cow<'a, str>>,
}
#[derive(Deserialize)]
struct FastItem {
    value: Value,
    #[serde(default)]
    color: Option<String>,
}

/// The common case, read straight into typed fields: about three times cheaper than the generic
/// path. Anything unusual (a wrong type, a null where a value is needed, a failed check) gives
/// `None`, and [`Job::parse_slow`] names the problem. Both accept the same jobs (a property
/// test holds them to it).
fn parse_fast(text: &str, message_id: Option<&str>) -> Option<Job> {
    let fits = |s: &str| s.chars().count() <= MAX_FIELD_CHARS;
    let required = |s: &Cow<str>| !s.is_empty() && fits(s);
    let optional = |s: &Option<Cow<str>>| s.as_deref().is_none_or(fits);

    let f: Fast = serde_json::from_str(text).ok()?;
    // Subscription messages take the slow path, which checks their typed data.
    if f.kind.as_deref().is_some_and(|k| k != "template") {
        return None;
    }
    let job_id = match f.job_id {
        Some(id) if is_valid_job_id(&id) => id.into_owned(),
        Some(_) => return None,
        None => message_id.filter(|id| is_valid_job_id(id))?.to_owned(),
    };
    let account = match f.account {
        Some(a) if a.is_empty() || !fits(&a) => return None,
        Some(a) => a.into_owned(),
        None => DEFAULT_ACCOUNT.to_owned(),
    };
    if !required(&f.touser) || !required(&f.template_id) || !optional(&f.url) || !optional(&f.topcolor) {
        return None;
    }
    if f.miniprogram.as_ref().is_some_and(|mp| mp.appid.is_empty()) || f.data.is_empty() {
        return None;
    }
    let data = fast_data(f.data)?;
    if f.client_msg_id.as_deref().is_some_and(|c| !fits(c)) {
        return None;
    }
    let client_msg_id = choose_client_msg_id(f.client_msg_id.as_deref(), &job_id)?;
    let expires_at = match f.expires_at {
        Some(s) if !fits(&s) => return None,
        Some(s) => Some(parse_time(&s).ok()?),
        None => None,
    };
    Some(Job {
        job_id,
        account,
        touser: f.touser.into_owned(),
        template_id: f.template_id.into_owned(),
        kind: JobKind::Template,
        url: f.url.map(Cow::into_owned),
        miniprogram: f.miniprogram,
        topcolor: f.topcolor.map(Cow::into_owned),
        page: None,
        miniprogram_state: None,
        lang: None,
        data,
        client_msg_id,
        expires_at,
    })
}

/// Template data with plain values only; anything else is for the slow path to name.
fn fast_data(items: BTreeMap<String, FastItem>) -> Option<BTreeMap<String, DataItem>> {
    let mut data = BTreeMap::new();
    for (key, item) in items {
        if !matches!(item.value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            return None;
        }
        data.insert(key, DataItem { value: item.value, color: item.color });
    }
    Some(data)
}

/// The job_id of a job read the slow way: the body's, else the message_id property.
fn slow_job_id(raw: Option<&Value>, message_id: Option<&str>, fallback_id: Option<&str>) -> Result<String, InvalidJob> {
    match raw {
        None | Some(Value::Null) => match message_id {
            Some(id) if is_valid_job_id(id) => Ok(id.to_owned()),
            Some(_) => Err(InvalidJob::new(
                None,
                format!("job_id missing and message_id is not 1 to {MAX_JOB_ID_CHARS} characters"),
            )),
            None => Err(InvalidJob::new(None, "job_id missing (and no message_id property)")),
        },
        Some(Value::String(id)) if is_valid_job_id(id) => Ok(id.clone()),
        Some(Value::String(_)) => Err(InvalidJob::new(
            fallback_id,
            format!("job_id must be 1 to {MAX_JOB_ID_CHARS} characters without control characters"),
        )),
        Some(_) => Err(InvalidJob::new(fallback_id, "job_id must be a string")),
    }
}

fn slow_miniprogram(raw: Option<&Value>) -> Result<Option<MiniProgram>, String> {
    let Some(v) = raw.filter(|v| !v.is_null()) else { return Ok(None) };
    let mp: MiniProgram = serde_json::from_value(v.clone())
        .map_err(|e| format!("miniprogram must be {{\"appid\": string, \"pagepath\"?: string}}: {e}"))?;
    if mp.appid.is_empty() {
        return Err("miniprogram.appid must not be empty".into());
    }
    Ok(Some(mp))
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

/// The client_msg_id WeChat de-duplicates on: the job's own (hashed when over WeChat's limit),
/// else one derived from the job_id. `None`: an empty one, which no path accepts.
fn choose_client_msg_id(given: Option<&str>, job_id: &str) -> Option<String> {
    Some(match given {
        Some("") => return None,
        Some(c) if c.len() <= MAX_CLIENT_MSG_ID_BYTES => c.to_owned(),
        Some(c) => hashed_client_msg_id(c),
        None => derive_client_msg_id(job_id),
    })
}

/// Whether `id` is a job_id the contract allows: 1 to 128 characters, no control characters.
pub fn is_valid_job_id(id: &str) -> bool {
    let chars = id.chars().count();
    (1..=MAX_JOB_ID_CHARS).contains(&chars) && !id.chars().any(char::is_control)
}

/// The `client_msg_id` of a job that carries none: the job_id itself when it fits, so that an
/// operator can match WeChat-side records by eye, else a hash of it.
pub fn derive_client_msg_id(job_id: &str) -> String {
    if job_id.len() <= MAX_CLIENT_MSG_ID_BYTES && job_id.is_ascii() {
        job_id.to_owned()
    } else {
        hashed_client_msg_id(job_id)
    }
}

fn hashed_client_msg_id(id: &str) -> String {
    format!("wxpush-{}", hex::encode(Sha1::digest(id.as_bytes())))
}

/// The fields only subscription messages take, read from the wire form.
struct SubscriptionFields {
    page: Option<String>,
    miniprogram_state: Option<MiniprogramState>,
    lang: Option<Lang>,
}

impl SubscriptionFields {
    fn read(raw: &RawJob, kind: JobKind) -> Result<Self, String> {
        // Template jobs ignore them, as they ignored every unknown field before kinds existed.
        if kind == JobKind::Template {
            return Ok(Self { page: None, miniprogram_state: None, lang: None });
        }
        let one_of_states = "\"developer\", \"trial\" or \"formal\"";
        let one_of_langs = "\"zh_CN\", \"en_US\", \"zh_HK\" or \"zh_TW\"";
        Ok(Self {
            page: optional_string(&raw.page, "page")?,
            miniprogram_state: optional_enum(&raw.miniprogram_state, "miniprogram_state", one_of_states)?,
            lang: optional_enum(&raw.lang, "lang", one_of_langs)?,
        })
    }
}

/// A string field that must be one of an enum's names.
fn optional_enum<T: serde::de::DeserializeOwned>(
    v: &Option<Value>,
    field: &str,
    one_of: &str,
) -> Result<Option<T>, String> {
    let Some(text) = optional_string(v, field)? else { return Ok(None) };
    serde_json::from_value(Value::String(text.clone()))
        .map(Some)
        .map_err(|_| format!("{field} {text:?} is not one of {one_of}"))
}

fn required_string(v: &Option<Value>, field: &str) -> Result<String, String> {
    match optional_string(v, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        Some(_) => Err(format!("{field} must not be empty")),
        None => Err(format!("{field} missing")),
    }
}

fn optional_string(v: &Option<Value>, field: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() > MAX_FIELD_CHARS => {
            Err(format!("{field} is longer than {MAX_FIELD_CHARS} characters"))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{field} must be a string, not {}", kind(other))),
    }
}

fn parse_data(v: Option<&Value>) -> Result<BTreeMap<String, DataItem>, String> {
    let map = match v {
        None | Some(Value::Null) => return Err("data missing".into()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(format!("data must be an object, not {}", kind(other))),
    };
    if map.is_empty() {
        return Err("data must have at least one keyword".into());
    }
    let mut data = BTreeMap::new();
    for (key, item) in map {
        let Value::Object(item) = item else {
            return Err(format!("data.{key} must be an object {{\"value\": …, \"color\"?: …}}, not {}", kind(item)));
        };
        let value = match item.get("value") {
            None | Some(Value::Null) => return Err(format!("data.{key}.value missing")),
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v.clone(),
            Some(other) => return Err(format!("data.{key}.value must be a string or number, not {}", kind(other))),
        };
        let color = match item.get("color") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) => Some(c.clone()),
            Some(other) => return Err(format!("data.{key}.color must be a string, not {}", kind(other))),
        };
        data.insert(key.clone(), DataItem { value, color });
    }
    Ok(data)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full() -> Value {
        json!({
            "job_id": "order-42-paid",
            "account": "default",
            "touser": "oia2TjuEGTNoeX76QEjQNrcURxG8",
            "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
            "url": "http://weixin.qq.com/download",
            "miniprogram": {"appid": "wx0123456789abcdef", "pagepath": "pages/order?id=42"},
            "topcolor": "#FF0000",
            "data": {
                "User": {"value": "黄先生", "color": "#173177"},
                "Money": {"value": "人民币260.00元", "color": "#173177"}
            },
            "client_msg_id": "order-42-paid-c",
            "expires_at": "2026-11-28T12:00:00Z"
        })
    }

    fn parse(v: &Value) -> Result<Job, InvalidJob> {
        Job::parse(&serde_json::to_vec(v).unwrap(), None)
    }

    fn reason_of(v: Value) -> (Option<String>, String) {
        let e = parse(&v).unwrap_err();
        (e.job_id, e.reason)
    }

    fn subscription(kind: &str, extra: Value) -> Value {
        let mut v = json!({
            "job_id": "sub-1",
            "kind": kind,
            "touser": "o1",
            "template_id": "t1",
            "data": {"thing1": {"value": "订单已发货"}, "amount2": {"value": "¥26.00"}, "number3": {"value": 12}}
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    #[test]
    fn subscription_jobs_build_their_endpoints_bodies() {
        let job = parse(&subscription(
            "subscribe",
            json!({"page": "https://example.com/o/1", "miniprogram": {"appid": "wxmp"}}),
        ))
        .unwrap();
        assert_eq!((job.kind, job.kind.endpoint()), (JobKind::Subscribe, "/cgi-bin/message/subscribe/bizsend"));
        let body: Value = serde_json::from_slice(&job.message_body().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "touser": "o1", "template_id": "t1", "page": "https://example.com/o/1", "miniprogram": {"appid": "wxmp"},
                "data": {"thing1": {"value": "订单已发货"}, "amount2": {"value": "¥26.00"}, "number3": {"value": "12"}}
            })
        );
        let mp = parse(&subscription(
            "miniprogram_subscribe",
            json!({"page": "index", "miniprogram_state": "trial", "lang": "en_US"}),
        ))
        .unwrap();
        let body: Value = serde_json::from_slice(&mp.message_body().unwrap()).unwrap();
        assert_eq!((body["miniprogram_state"].as_str(), body["lang"].as_str()), (Some("trial"), Some("en_US")));
        assert_eq!(mp.kind.endpoint(), "/cgi-bin/message/subscribe/send");
        assert!(body.get("client_msg_id").is_none());
    }

    #[test]
    fn subscription_jobs_are_checked_before_sending() {
        let long = json!({"data": {"thing1": {"value": "这是一条超过二十个字符长度限制的订阅消息内容文"}}});
        let (id, reason) = reason_of(subscription("subscribe", long));
        assert_eq!((id.as_deref(), reason.as_str()), (Some("sub-1"), "thing1 is 23 characters, at most 20"));
        let cases = [
            (
                subscription("subscribe", json!({"url": "https://x"})),
                "url (a subscription message opens `page`) is not a field of kind subscribe",
            ),
            (subscription("subscribe", json!({"lang": "en_US"})), "lang is not a field of kind subscribe"),
            (
                subscription("miniprogram_subscribe", json!({"miniprogram": {"appid": "wx"}})),
                "miniprogram is not a field of kind miniprogram_subscribe",
            ),
            (
                subscription("miniprogram_subscribe", json!({"lang": "fr"})),
                "lang \"fr\" is not one of \"zh_CN\", \"en_US\", \"zh_HK\" or \"zh_TW\"",
            ),
            (subscription("subscribe", json!({"data": {"keyword1": {"value": "x"}}})), "keyword1 is not a typed key"),
            (
                subscription("subscribe", json!({"data": {"thing1": {"value": "x", "color": "#000"}}})),
                "data.thing1.color: subscription messages have no colours",
            ),
            (subscription("sms", json!({})), "kind \"sms\" is not one of"),
        ];
        for (job, want) in cases {
            let (_, reason) = reason_of(job);
            assert!(reason.starts_with(want), "{reason}");
        }
    }

    #[test]
    fn template_jobs_ignore_subscription_fields_on_both_paths() {
        let v = json!({"job_id": "j", "kind": "template", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "page": "p", "lang": "fr"});
        let job = parse(&v).unwrap();
        assert_eq!((job.kind, job.page.as_deref(), job.lang), (JobKind::Template, None, None));
        let slow = Job::parse_slow(&v.to_string(), None, None).unwrap();
        assert_eq!(slow, job);
    }

    #[test]
    fn every_field_of_the_contract_example_is_read() {
        let job = parse(&full()).unwrap();
        assert_eq!(job.job_id, "order-42-paid");
        assert_eq!(job.account, "default");
        assert_eq!(job.touser, "oia2TjuEGTNoeX76QEjQNrcURxG8");
        assert_eq!(job.template_id, "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY");
        assert_eq!(job.url.as_deref(), Some("http://weixin.qq.com/download"));
        let mp = job.miniprogram.clone().unwrap();
        assert_eq!(mp.appid, "wx0123456789abcdef");
        assert_eq!(mp.pagepath.as_deref(), Some("pages/order?id=42"));
        assert_eq!(job.topcolor.as_deref(), Some("#FF0000"));
        assert_eq!(job.data["User"].value, json!("黄先生"));
        assert_eq!(job.data["Money"].color.as_deref(), Some("#173177"));
        assert_eq!(job.client_msg_id, "order-42-paid-c");
        assert_eq!(job.expires_at.unwrap().to_rfc3339(), "2026-11-28T12:00:00+00:00");
    }

    #[test]
    fn the_template_body_carries_every_field_wechat_takes() {
        let job = parse(&full()).unwrap();
        let body: Value = serde_json::from_slice(&job.message_body().unwrap()).unwrap();
        // The job less what is wxpush's own (job_id, account, expires_at).
        let mut expected = full();
        let fields = expected.as_object_mut().unwrap();
        for own in ["job_id", "account", "expires_at"] {
            fields.remove(own);
        }
        assert_eq!(body, expected);
    }

    #[test]
    fn optional_fields_default_and_client_msg_id_is_derived_stably() {
        let v = json!({"job_id": "j1", "touser": "o1", "template_id": "t1", "data": {"k": {"value": 3}}});
        let a = parse(&v).unwrap();
        let b = parse(&v).unwrap();
        assert_eq!(a.account, "default");
        assert_eq!(a.client_msg_id, "j1");
        assert_eq!(a.client_msg_id, b.client_msg_id);
        assert_eq!(a.data["k"].value, json!(3));
        assert!(a.url.is_none() && a.miniprogram.is_none() && a.topcolor.is_none() && a.expires_at.is_none());
        let body: Value = serde_json::from_slice(&a.message_body().unwrap()).unwrap();
        assert!(body.get("url").is_none() && body.get("miniprogram").is_none());
    }

    #[test]
    fn long_or_non_ascii_job_ids_give_a_bounded_hashed_client_msg_id() {
        let long = "x".repeat(100);
        let c = derive_client_msg_id(&long);
        assert!(c.len() <= MAX_CLIENT_MSG_ID_BYTES && c.starts_with("wxpush-"));
        assert_eq!(c, derive_client_msg_id(&long));
        assert_ne!(c, derive_client_msg_id(&"y".repeat(100)));
        assert!(derive_client_msg_id("订单-42").starts_with("wxpush-"));
    }

    #[test]
    fn message_id_stands_in_for_a_missing_job_id() {
        let v = json!({"touser": "o1", "template_id": "t1", "data": {"k": {"value": "v"}}});
        let body = serde_json::to_vec(&v).unwrap();
        assert_eq!(Job::parse(&body, Some("mid-7")).unwrap().job_id, "mid-7");
        let e = Job::parse(&body, None).unwrap_err();
        assert_eq!(e.job_id, None);
        assert!(e.reason.contains("job_id missing"), "{}", e.reason);
    }

    #[test]
    fn each_kind_of_wrong_input_is_named_and_keeps_the_job_id() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"job_id": "j", "template_id": "t", "data": {"k": {"value": "v"}}}), "touser missing"),
            (
                json!({"job_id": "j", "touser": 5, "template_id": "t", "data": {"k": {"value": "v"}}}),
                "touser must be a string",
            ),
            (
                json!({"job_id": "j", "touser": "", "template_id": "t", "data": {"k": {"value": "v"}}}),
                "touser must not be empty",
            ),
            (json!({"job_id": "j", "touser": "o", "data": {"k": {"value": "v"}}}), "template_id missing"),
            (json!({"job_id": "j", "touser": "o", "template_id": "t"}), "data missing"),
            (json!({"job_id": "j", "touser": "o", "template_id": "t", "data": []}), "data must be an object"),
            (json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {}}), "at least one keyword"),
            (json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": "v"}}), "data.k must be an object"),
            (json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {}}}), "data.k.value missing"),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": [1]}}}),
                "data.k.value must be a string or number",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v", "color": 1}}}),
                "data.k.color must be a string",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "account": 1}),
                "account must be a string",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "url": false}),
                "url must be a string",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "miniprogram": "x"}),
                "miniprogram must be",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "miniprogram": {"appid": ""}}),
                "miniprogram.appid",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "expires_at": "tomorrow"}),
                "expires_at \"tomorrow\" is not an RFC 3339",
            ),
            (
                json!({"job_id": "j", "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}, "client_msg_id": ""}),
                "client_msg_id must not be empty",
            ),
        ];
        for (v, want) in cases {
            let (id, reason) = reason_of(v);
            assert_eq!(id.as_deref(), Some("j"), "{reason}");
            assert!(reason.contains(want), "{reason:?} should contain {want:?}");
        }
    }

    #[test]
    fn a_bad_job_id_is_rejected_without_being_kept() {
        for v in [json!(7), json!(""), json!("x".repeat(129)), json!("a\nb")] {
            let (id, reason) =
                reason_of(json!({"job_id": v, "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}}));
            assert_eq!(id, None);
            assert!(reason.contains("job_id"), "{reason}");
        }
        assert!(
            parse(
                &json!({"job_id": "é".repeat(128), "touser": "o", "template_id": "t", "data": {"k": {"value": "v"}}})
            )
            .is_ok()
        );
    }

    #[test]
    fn bytes_that_are_not_a_json_object_are_refused() {
        assert!(Job::parse(b"\xff\xfe", None).unwrap_err().reason.contains("not UTF-8"));
        assert!(Job::parse(b"{not json", None).unwrap_err().reason.contains("not JSON"));
        assert!(Job::parse(b"[1,2]", Some("m")).unwrap_err().reason.contains("not a JSON object"));
        let big = vec![b' '; MAX_JOB_BYTES + 1];
        let e = Job::parse(&big, Some("m")).unwrap_err();
        assert!(e.reason.contains("over the 65536-byte limit"), "{}", e.reason);
        assert_eq!(e.job_id.as_deref(), Some("m"));
    }

    #[test]
    fn expiry_is_judged_against_the_given_time() {
        let job = parse(&full()).unwrap();
        let before = DateTime::parse_from_rfc3339("2026-11-28T11:59:59Z").unwrap().with_timezone(&Utc);
        let after = DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z").unwrap().with_timezone(&Utc);
        assert!(!job.is_expired(before));
        assert!(job.is_expired(after));
    }

    /// Field values that are valid, invalid, or of the wrong type, to mix into jobs.
    fn field() -> impl proptest::strategy::Strategy<Value = Option<Value>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            Just(Some(json!(""))),
            Just(Some(json!("x"))),
            Just(Some(json!("2026-11-28T12:00:00Z"))),
            Just(Some(json!("y".repeat(70)))),
            Just(Some(json!("z".repeat(1100)))),
            Just(Some(json!(5))),
            Just(Some(json!({"appid": "wx1", "pagepath": "p"}))),
            Just(Some(json!({"appid": ""}))),
            Just(Some(json!({"k": {"value": "v", "color": "#fff"}}))),
            Just(Some(json!({"k": {"value": 1.5}, "m": {"value": true, "color": null}}))),
            Just(Some(json!({"k": {"value": null}}))),
            Just(Some(json!({"k": {"value": [1]}}))),
            Just(Some(json!({"k": {"value": "v", "color": 3}}))),
            Just(Some(json!({}))),
            Just(Some(json!([]))),
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_fast_path_and_the_generic_path_agree(
            fields in proptest::collection::vec(field(), 10),
            message_id in proptest::option::of(proptest::prop_oneof![proptest::strategy::Just("mid".to_owned()), proptest::strategy::Just(String::new())]),
        ) {
            let names = ["job_id", "account", "touser", "template_id", "url", "miniprogram", "topcolor", "data", "client_msg_id", "expires_at"];
            let mut obj = serde_json::Map::new();
            for (name, value) in names.iter().zip(fields) {
                if let Some(v) = value {
                    obj.insert(name.to_string(), v);
                }
            }
            let text = Value::Object(obj).to_string();
            let fallback = message_id.as_deref().filter(|id| is_valid_job_id(id));
            let slow = Job::parse_slow(&text, message_id.as_deref(), fallback);
            match parse_fast(&text, message_id.as_deref()) {
                Some(fast) => proptest::prop_assert_eq!(Ok(fast), slow),
                None => proptest::prop_assert!(slow.is_err(), "the fast path refused a valid job: {}", text),
            }
        }

        #[test]
        fn no_body_panics_the_parser(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Job::parse(&body, None);
        }

        #[test]
        fn any_string_fields_parse_or_fail_cleanly(job_id in ".{0,140}", touser in ".{0,40}", value in ".{0,40}") {
            let v = json!({"job_id": job_id, "touser": touser, "template_id": "t", "data": {"k": {"value": value}}});
            if let Ok(job) = parse(&v) {
                proptest::prop_assert!(job.client_msg_id.len() <= MAX_CLIENT_MSG_ID_BYTES);
                proptest::prop_assert!(!job.touser.is_empty());
            }
        }
    }
}
