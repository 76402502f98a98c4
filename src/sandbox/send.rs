//! `POST /cgi-bin/message/template/send`'s request checks; and, for every send endpoint, caps,
//! injected faults and `client_msg_id` de-duplication, per account.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    time::{Duration, Instant},
};

use rand::{Rng, rngs::SmallRng};
use serde_json::Value;

use super::{CLIENT_MSG_ID_WINDOW, Faults};
use crate::domain::subscribe;

/// Most `client_msg_id`s remembered per account; past it the oldest are forgotten early, so a
/// benchmark cannot grow the sandbox without bound (WeChat only promises "不保证效果" anyway).
const MAX_DEDUPE_ENTRIES: usize = 2_000_000;

/// An errcode answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WxError {
    pub errcode: i64,
    pub errmsg: Cow<'static, str>,
}

impl WxError {
    pub fn new(errcode: i64) -> Self {
        Self { errcode, errmsg: Cow::Borrowed(errmsg(errcode)) }
    }

    /// 47003 naming the field: `argument invalid! data.thing1.value invalid`.
    pub fn argument(field: &str) -> Self {
        Self { errcode: 47003, errmsg: Cow::Owned(format!("argument invalid! {field} invalid")) }
    }

    /// 47003 in template/send's form, which puts every field under `data.`.
    fn invalid_argument(path: &str) -> Self {
        Self::argument(&format!("data.{path}"))
    }
}

/// WeChat's errmsg for an errcode (English, as the API answers them), from the errcode table.
pub(super) fn errmsg(errcode: i64) -> &'static str {
    crate::domain::errcode::errmsg(errcode).unwrap_or("sandbox: errcode triggered by touser")
}

/// The fields of a valid send request the sandbox acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SendRequest<'a> {
    pub touser: &'a str,
    pub template_id: &'a str,
    pub client_msg_id: Option<&'a str>,
}

/// Checks a parsed body: 47001 for a non-object, 47003 naming the first invalid field, then the
/// deterministic triggers (`errcode-<N>-…` touser, `invalid…` template_id).
pub(super) fn validate(body: &Value) -> Result<SendRequest<'_>, WxError> {
    let Some(obj) = body.as_object() else {
        return Err(WxError::new(47001));
    };
    let text = |key: &str| obj.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let touser = text("touser").ok_or_else(|| WxError::invalid_argument("touser"))?;
    let template_id = text("template_id").ok_or_else(|| WxError::invalid_argument("template_id"))?;
    let data = obj.get("data").and_then(Value::as_object).ok_or_else(|| WxError::invalid_argument("data"))?;
    for (key, item) in data {
        let value = item.as_object().and_then(|o| o.get("value"));
        if !value.is_some_and(|v| item_value_ok(key, v)) {
            return Err(WxError::invalid_argument(&format!("{key}.value")));
        }
    }
    let client_msg_id = match obj.get("client_msg_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()).filter(|s| !s.is_empty()),
        Some(_) => return Err(WxError::invalid_argument("client_msg_id")),
    };
    if obj.get("url").is_some_and(|u| !u.is_string() && !u.is_null()) {
        return Err(WxError::invalid_argument("url"));
    }
    if let Some(mp) = obj.get("miniprogram").filter(|v| !v.is_null()) {
        if !mp.get("appid").is_some_and(Value::is_string) {
            return Err(WxError::invalid_argument("miniprogram.appid"));
        }
        if mp.get("pagepath").is_some_and(|p| !p.is_string()) {
            return Err(WxError::invalid_argument("miniprogram.pagepath"));
        }
    }
    if let Some(code) = triggered_errcode(touser) {
        return Err(WxError::new(code));
    }
    if template_id.starts_with("invalid") {
        return Err(WxError::new(40037));
    }
    Ok(SendRequest { touser, template_id, client_msg_id })
}

/// `errcode-<N>` or `errcode-<N>-anything` → N (N may be negative, e.g. `errcode--1-x`).
pub(super) fn triggered_errcode(touser: &str) -> Option<i64> {
    let rest = touser.strip_prefix("errcode-")?;
    let (negative, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    if end == 0 || !(rest[end..].is_empty() || rest[end..].starts_with('-')) {
        return None;
    }
    let n: i64 = rest[..end].parse().ok()?;
    let n = if negative { -n } else { n };
    (n != 0).then_some(n)
}

/// A category template's ("类目模板") keys are typed (`thing1`, `number2`, …) and WeChat checks
/// their values by the subscription rules (domain::subscribe, one table for the whole crate).
/// Other keys (industry templates: `first`, `keyword1`, `User`) take any value.
fn item_value_ok(key: &str, value: &Value) -> bool {
    if subscribe::parse_key(key).is_err() {
        return true;
    }
    value_text(value).is_some_and(|text| subscribe::validate_value(key, &text).is_ok())
}

/// A data value as WeChat reads it: a string, or a number as its decimal text.
pub(super) fn value_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// What became of a send that passed the token and request checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    Http503,
    Error(i64),
    /// Same touser + client_msg_id within the window: the original msgid.
    Duplicate(u64),
    Accepted {
        msgid: u64,
        slow: bool,
    },
}

/// One account's counters, fault RNG and `client_msg_id` memory, behind one short-held mutex.
pub(super) struct SendState {
    rng: SmallRng,
    second: u64,
    in_second: u32,
    day: u64,
    today: u64,
    /// Keyed by a 128-bit hash of (touser, client_msg_id): two random SipHash keys make a
    /// collision practically impossible, and an entry costs a few dozen bytes.
    dedupe: HashMap<u128, (u64, Instant)>,
    dedupe_order: VecDeque<(Instant, u128)>,
    hashers: (RandomState, RandomState),
}

impl SendState {
    pub fn new(rng: SmallRng) -> Self {
        Self {
            rng,
            second: 0,
            in_second: 0,
            day: 0,
            today: 0,
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            hashers: (RandomState::new(), RandomState::new()),
        }
    }

    pub fn reseed(&mut self, rng: SmallRng) {
        self.rng = rng;
    }

    pub fn reset_daily(&mut self) {
        self.today = 0;
    }

    /// Starts a new second / a new Beijing day (UTC+8) for the caps.
    fn roll(&mut self, unix: Duration) {
        let second = unix.as_secs();
        if second != self.second {
            self.second = second;
            self.in_second = 0;
        }
        let day = (second + 8 * 3600) / 86_400;
        if day != self.day {
            self.day = day;
            self.today = 0;
        }
    }

    /// 45011 / 45009 when a cap is reached.
    pub fn cap_error(&mut self, faults: &Faults, unix: Duration) -> Option<i64> {
        self.roll(unix);
        if faults.per_second_cap.is_some_and(|cap| self.in_second >= cap) {
            return Some(45011);
        }
        if faults.daily_cap.is_some_and(|cap| self.today >= cap) {
            return Some(45009);
        }
        None
    }

    /// Caps again (the latency may have crossed into a new second), then faults, then
    /// de-duplication, then acceptance, counting it against the caps. `next_msgid` is called
    /// only for a new message.
    pub fn decide(
        &mut self,
        faults: &Faults,
        unix: Duration,
        now: Instant,
        req: &SendRequest<'_>,
        next_msgid: impl FnOnce() -> u64,
    ) -> Decision {
        if let Some(code) = self.cap_error(faults, unix) {
            return Decision::Error(code);
        }
        if faults.http_503_rate > 0.0 && self.rng.random::<f64>() < faults.http_503_rate {
            return Decision::Http503;
        }
        if faults.system_error_rate > 0.0 && self.rng.random::<f64>() < faults.system_error_rate {
            return Decision::Error(-1);
        }
        if faults.token_refused_rate > 0.0 && self.rng.random::<f64>() < faults.token_refused_rate {
            return Decision::Error(40001);
        }
        self.expire(now);
        let key = req.client_msg_id.map(|id| self.key(req.touser, id));
        if let Some(key) = key
            && let Some(&(msgid, until)) = self.dedupe.get(&key)
            && now < until
        {
            return Decision::Duplicate(msgid);
        }
        let msgid = next_msgid();
        self.in_second += 1;
        self.today += 1;
        if let Some(key) = key {
            let until = now + CLIENT_MSG_ID_WINDOW;
            self.dedupe.insert(key, (msgid, until));
            self.dedupe_order.push_back((until, key));
            if self.dedupe_order.len() > MAX_DEDUPE_ENTRIES
                && let Some((_, oldest)) = self.dedupe_order.pop_front()
            {
                // Each key has one queue entry (expired ones were popped above), so no check.
                self.dedupe.remove(&oldest);
            }
        }
        let slow = faults.slow_rate > 0.0 && self.rng.random::<f64>() < faults.slow_rate;
        Decision::Accepted { msgid, slow }
    }

    fn key(&self, touser: &str, client_msg_id: &str) -> u128 {
        let pair = (touser, client_msg_id);
        (u128::from(self.hashers.0.hash_one(pair)) << 64) | u128::from(self.hashers.1.hash_one(pair))
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(until, key)) = self.dedupe_order.front() {
            if until > now {
                break;
            }
            self.dedupe_order.pop_front();
            self.forget(key, now);
        }
    }

    /// Removes `key` unless it was entered again later (its entry then ends after `now`).
    fn forget(&mut self, key: u128, now: Instant) {
        if self.dedupe.get(&key).is_some_and(|&(_, until)| until <= now) {
            self.dedupe.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use serde_json::json;

    use super::*;

    #[test]
    fn triggers_parse_only_the_documented_form() {
        assert_eq!(triggered_errcode("errcode-40003-x"), Some(40003));
        assert_eq!(triggered_errcode("errcode-43004"), Some(43004));
        assert_eq!(triggered_errcode("errcode--1-x"), Some(-1));
        assert_eq!(triggered_errcode("errcode-0-x"), None);
        assert_eq!(triggered_errcode("errcode-12ab"), None);
        assert_eq!(triggered_errcode("errcode-"), None);
        assert_eq!(triggered_errcode("oia2TjuEGTNoeX76QEjQNrcURxG8"), None);
    }

    #[test]
    fn validation_names_the_field() {
        let ok = json!({"touser": "u", "template_id": "t", "data": {"User": {"value": "x"}}});
        assert!(validate(&ok).is_ok());
        let e = validate(&json!({"template_id": "t", "data": {}})).unwrap_err();
        assert_eq!((e.errcode, e.errmsg.as_ref()), (47003, "argument invalid! data.touser invalid"));
        let e = validate(&json!({"touser": "u", "template_id": 5, "data": {}})).unwrap_err();
        assert!(e.errmsg.contains("template_id"));
        let e = validate(&json!({"touser": "u", "template_id": "t", "data": []})).unwrap_err();
        assert!(e.errmsg.contains("data.data"));
        let e = validate(&json!({"touser": "u", "template_id": "t", "data": {"thing1": {"value": "x".repeat(21)}}}))
            .unwrap_err();
        assert_eq!(e.errmsg, "argument invalid! data.thing1.value invalid");
        let e = validate(&json!({"touser": "u", "template_id": "t", "data": {"k": {"color": "#fff"}}})).unwrap_err();
        assert_eq!(e.errmsg, "argument invalid! data.k.value invalid");
        assert_eq!(validate(&json!([1])).unwrap_err().errcode, 47001);
        let e = validate(&json!({"touser": "errcode-43004-a", "template_id": "t", "data": {}})).unwrap_err();
        assert_eq!((e.errcode, e.errmsg.as_ref()), (43004, "require subscribe"));
        let e = validate(&json!({"touser": "u", "template_id": "invalid-x", "data": {}})).unwrap_err();
        assert_eq!(e.errcode, 40037);
    }

    #[test]
    fn duplicates_answer_the_original_msgid_within_the_window() {
        let mut s = SendState::new(SmallRng::seed_from_u64(1));
        let f = Faults::default();
        let now = Instant::now();
        let unix = Duration::from_secs(1_800_000_000);
        let req = SendRequest { touser: "u", template_id: "t", client_msg_id: Some("c") };
        let mut next = 100;
        let mut id = || {
            next += 1;
            next
        };
        let first = s.decide(&f, unix, now, &req, &mut id);
        assert_eq!(first, Decision::Accepted { msgid: 101, slow: false });
        assert_eq!(s.decide(&f, unix, now + Duration::from_secs(599), &req, &mut id), Decision::Duplicate(101));
        let other = SendRequest { touser: "v", ..req };
        assert_eq!(s.decide(&f, unix, now, &other, &mut id), Decision::Accepted { msgid: 102, slow: false });
        assert_eq!(
            s.decide(&f, unix, now + Duration::from_secs(601), &req, &mut id),
            Decision::Accepted { msgid: 103, slow: false }
        );
        assert!(s.dedupe.len() <= 2);
    }

    #[test]
    fn caps_count_accepted_sends_only() {
        let mut s = SendState::new(SmallRng::seed_from_u64(1));
        let f = Faults { per_second_cap: Some(2), daily_cap: Some(3), ..Faults::default() };
        let now = Instant::now();
        let t = Duration::from_secs(1_800_000_000);
        let req = SendRequest { touser: "u", template_id: "t", client_msg_id: None };
        let mut n = 0;
        let mut id = || {
            n += 1;
            n
        };
        assert!(matches!(s.decide(&f, t, now, &req, &mut id), Decision::Accepted { .. }));
        assert!(matches!(s.decide(&f, t, now, &req, &mut id), Decision::Accepted { .. }));
        assert_eq!(s.decide(&f, t, now, &req, &mut id), Decision::Error(45011));
        let t2 = t + Duration::from_secs(1);
        assert!(matches!(s.decide(&f, t2, now, &req, &mut id), Decision::Accepted { .. }));
        assert_eq!(s.decide(&f, t2, now, &req, &mut id), Decision::Error(45009));
        s.reset_daily();
        assert!(matches!(s.decide(&f, t2, now, &req, &mut id), Decision::Accepted { .. }));
    }
}
