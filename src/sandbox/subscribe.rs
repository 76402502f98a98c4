//! The request checks of `POST /cgi-bin/message/subscribe/bizsend` (an official account's
//! 订阅通知) and `POST /cgi-bin/message/subscribe/send` (a mini program's subscription message),
//! as docs/wechat-api.md, section 6, has them. Consent, caps and faults come after, as for
//! template sends.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::send::{SendRequest, WxError, triggered_errcode, value_text};
use crate::domain::{
    job::{JobKind, Lang, MiniprogramState},
    subscribe,
};

/// Checks a parsed body: 47001 for a non-object; 40003 / 40037 for an empty `touser` /
/// `template_id` (the send pages' own codes); 47003 naming the first invalid data key
/// (`argument invalid! data.thing1.value invalid`) or field; 41030 for a mini program page not
/// in `pages`; then the deterministic triggers (`errcode-<N>-…` touser, `invalid…` template_id).
/// Subscription sends have no `client_msg_id` de-duplication (neither page documents one).
pub(super) fn validate<'a>(
    body: &'a Value,
    kind: JobKind,
    pages: Option<&HashSet<String>>,
) -> Result<SendRequest<'a>, WxError> {
    let obj = body.as_object().ok_or_else(|| WxError::new(47001))?;
    let text = |key: &str| obj.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let touser = text("touser").ok_or_else(|| WxError::new(40003))?;
    let template_id = text("template_id").ok_or_else(|| WxError::new(40037))?;
    check_data(obj.get("data"))?;
    let page = optional_text(obj, "page")?;
    check_versions(obj)?;
    if kind == JobKind::Subscribe {
        check_miniprogram(obj.get("miniprogram"))?;
    }
    if kind == JobKind::MiniprogramSubscribe
        && let (Some(page), Some(pages)) = (page, pages)
        && !pages.contains(page_path(page))
    {
        return Err(WxError::new(41030));
    }
    if let Some(code) = triggered_errcode(touser) {
        return Err(WxError::new(code));
    }
    if template_id.starts_with("invalid") {
        return Err(WxError::new(40037));
    }
    Ok(SendRequest { touser, template_id, client_msg_id: None })
}

/// A page as app.json lists it: without its query and a leading `/`.
pub(super) fn page_path(page: &str) -> &str {
    let path = page.split_once('?').map_or(page, |(path, _)| path);
    path.trim_start_matches('/')
}

/// Every key typed and every value keeping its type's rule (domain::subscribe, the table the
/// worker checks jobs against); the first bad key in key order is the one named.
fn check_data(data: Option<&Value>) -> Result<(), WxError> {
    let data = data.and_then(Value::as_object).ok_or_else(|| WxError::argument("data"))?;
    let mut items: Vec<(&String, &Value)> = data.iter().collect();
    items.sort_unstable_by_key(|(key, _)| *key);
    for (key, item) in items {
        let value = item.as_object().and_then(|o| o.get("value")).and_then(value_text);
        if value.is_none_or(|v| subscribe::validate_value(key, &v).is_err()) {
            return Err(WxError::argument(&format!("data.{key}.value")));
        }
    }
    Ok(())
}

/// An optional string field; empty counts as absent.
fn optional_text<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, WxError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str()).filter(|s| !s.is_empty())),
        Some(_) => Err(WxError::argument(key)),
    }
}

/// `miniprogram_state` (developer | trial | formal) and `lang` (zh_CN | en_US | zh_HK | zh_TW),
/// when given: the mini program's fields, which the current `bizsend` page lists too.
fn check_versions(obj: &Map<String, Value>) -> Result<(), WxError> {
    if let Some(state) = obj.get("miniprogram_state").filter(|v| !v.is_null())
        && serde_json::from_value::<MiniprogramState>(state.clone()).is_err()
    {
        return Err(WxError::argument("miniprogram_state"));
    }
    if let Some(lang) = obj.get("lang").filter(|v| !v.is_null())
        && serde_json::from_value::<Lang>(lang.clone()).is_err()
    {
        return Err(WxError::argument("lang"));
    }
    Ok(())
}

/// `bizsend`'s `miniprogram`: `{"appid", "pagepath"?}`.
fn check_miniprogram(mp: Option<&Value>) -> Result<(), WxError> {
    let Some(mp) = mp.filter(|v| !v.is_null()) else { return Ok(()) };
    if mp.get("appid").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(WxError::argument("miniprogram.appid"));
    }
    if mp.get("pagepath").is_some_and(|p| !p.is_string() && !p.is_null()) {
        return Err(WxError::argument("miniprogram.pagepath"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body() -> Value {
        json!({
            "touser": "o1",
            "template_id": "T1",
            "page": "pages/order/detail?id=42",
            "miniprogram_state": "developer",
            "lang": "zh_CN",
            "data": {"thing1": {"value": "订单已发货"}, "number2": {"value": 42}, "time3": {"value": "15:01"}}
        })
    }

    fn code(r: Result<SendRequest<'_>, WxError>) -> (i64, String) {
        r.map_or_else(|e| (e.errcode, e.errmsg.into_owned()), |_| (0, "ok".into()))
    }

    #[test]
    fn a_valid_send_passes_on_both_endpoints() {
        let b = body();
        let req = validate(&b, JobKind::MiniprogramSubscribe, None).expect("valid");
        assert_eq!((req.touser, req.template_id, req.client_msg_id), ("o1", "T1", None));
        assert!(validate(&b, JobKind::Subscribe, None).is_ok());
    }

    #[test]
    fn missing_fields_answer_the_send_pages_codes() {
        let mut b = body();
        b["touser"] = json!("");
        assert_eq!(code(validate(&b, JobKind::Subscribe, None)).0, 40003);
        let mut b = body();
        b.as_object_mut().map(|o| o.remove("template_id"));
        assert_eq!(code(validate(&b, JobKind::Subscribe, None)).0, 40037);
        let mut b = body();
        b["template_id"] = json!("invalid-x");
        assert_eq!(code(validate(&b, JobKind::Subscribe, None)), (40037, "invalid template_id".into()));
        assert_eq!(code(validate(&json!([]), JobKind::Subscribe, None)).0, 47001);
    }

    #[test]
    fn data_values_are_checked_by_the_domain_rules_naming_the_first_bad_key() {
        for (data, key) in [
            (json!({"thing1": {"value": "x".repeat(21)}}), "thing1"),
            (json!({"thing1": {"value": ""}}), "thing1"),
            (json!({"time3": {"value": "2019年8月8日"}, "thing9": {"value": ""}}), "thing9"),
            (json!({"keyword1": {"value": "x"}}), "keyword1"),
            (json!({"phrase2": "配送中"}), "phrase2"),
            (json!({"number2": {"value": true}}), "number2"),
        ] {
            let mut b = body();
            b["data"] = data;
            let want = (47003, format!("argument invalid! data.{key}.value invalid"));
            assert_eq!(code(validate(&b, JobKind::MiniprogramSubscribe, None)), want);
        }
        let mut b = body();
        b.as_object_mut().map(|o| o.remove("data"));
        assert_eq!(code(validate(&b, JobKind::Subscribe, None)), (47003, "argument invalid! data invalid".into()));
    }

    #[test]
    fn versions_languages_and_miniprogram_are_checked() {
        for (field, value) in [("miniprogram_state", json!("release")), ("lang", json!("fr_FR")), ("page", json!(3))] {
            let mut b = body();
            b[field] = value;
            assert_eq!(
                code(validate(&b, JobKind::Subscribe, None)),
                (47003, format!("argument invalid! {field} invalid"))
            );
        }
        let mut b = body();
        b["miniprogram"] = json!({"pagepath": "index"});
        assert_eq!(code(validate(&b, JobKind::Subscribe, None)).0, 47003);
        assert!(validate(&b, JobKind::MiniprogramSubscribe, None).is_ok(), "not a field of subscribe/send");
        b["miniprogram"] = json!({"appid": "wxmp", "pagepath": "index?foo=bar"});
        assert!(validate(&b, JobKind::Subscribe, None).is_ok());
    }

    #[test]
    fn pages_of_the_released_version_only_when_listed() {
        let pages: HashSet<String> = ["pages/order/detail".to_owned()].into();
        let b = body();
        assert!(validate(&b, JobKind::MiniprogramSubscribe, Some(&pages)).is_ok(), "the query is not the page");
        let mut b = body();
        b["page"] = json!("/pages/order/detail");
        assert!(validate(&b, JobKind::MiniprogramSubscribe, Some(&pages)).is_ok());
        b["page"] = json!("pages/nope/index");
        assert_eq!(code(validate(&b, JobKind::MiniprogramSubscribe, Some(&pages))), (41030, "invalid page".into()));
        assert!(validate(&b, JobKind::MiniprogramSubscribe, None).is_ok(), "no list: any page");
        assert!(validate(&b, JobKind::Subscribe, Some(&pages)).is_ok(), "bizsend's page is a web page");
    }
}
