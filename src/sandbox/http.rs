//! The HTTP face: WeChat's endpoints and the admin API under `/_sandbox/`.

use std::{
    borrow::Cow,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Query, RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::{
    Faults, Record, Shared,
    consent::{ConsentChange, ConsentError, Filter, Hold},
    events::{Event, Item, SubscribeEvent},
    lock,
    receipts::{self, Receipt, sent_result_for, status_for},
    send::{self, Decision, SendRequest, WxError},
    subscribe,
    tokens::{Issued, TokenCheck},
    unix_now,
};
use crate::domain::job::JobKind;

/// WeChat answers JSON with this content type.
const JSON_CT: &str = "application/json; encoding=utf-8";

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/cgi-bin/token", get(classic_token))
        .route("/cgi-bin/stable_token", post(stable_token))
        .route("/cgi-bin/message/template/send", post(template_send))
        .route("/cgi-bin/message/subscribe/bizsend", post(bizsend))
        .route("/cgi-bin/message/subscribe/send", post(subscribe_send))
        .route("/_sandbox/stats", get(stats))
        .route("/_sandbox/messages", get(messages))
        .route("/_sandbox/faults", get(get_faults).put(put_faults))
        .route("/_sandbox/revoke_tokens", post(revoke_tokens))
        .route("/_sandbox/reset_daily_counts", post(reset_daily_counts))
        .route("/_sandbox/consents", get(list_consents))
        .route("/_sandbox/consents/grant", post(grant_consent))
        .route("/_sandbox/consents/revoke", post(revoke_consent))
        .with_state(shared)
}

fn json_body(body: String) -> Response {
    ([(header::CONTENT_TYPE, JSON_CT)], body).into_response()
}

fn wx_error(e: &WxError) -> Response {
    json_body(serde_json::json!({"errcode": e.errcode, "errmsg": e.errmsg}).to_string())
}

fn query_param<'a>(query: &'a Option<String>, name: &str) -> Option<Cow<'a, str>> {
    let query = query.as_deref()?;
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v)
}

fn issued(i: &Issued) -> Response {
    json_body(serde_json::json!({"access_token": &*i.token, "expires_in": i.expires_in}).to_string())
}

// ---- tokens -------------------------------------------------------------------------------

/// `GET /cgi-bin/token?grant_type=client_credential&appid=…&secret=…`
async fn classic_token(State(s): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    s.counters.token_requests.fetch_add(1, Ordering::Relaxed);
    let param = |name| query_param(&query, name);
    let account = match check_credentials(&s, param("grant_type").as_deref(), param("appid"), param("secret"), 40001) {
        Ok(a) => a,
        Err(e) => return wx_error(&e),
    };
    let i = s.tokens_write().classic(account, Instant::now(), s.token_lifetime, s.token_overlap);
    s.counters.tokens_issued.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(appid = %s.accounts[account].appid, "classic token issued");
    issued(&i)
}

/// `POST /cgi-bin/stable_token` with `{grant_type, appid, secret, force_refresh?}`.
async fn stable_token(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    s.counters.token_requests.fetch_add(1, Ordering::Relaxed);
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&body) else {
        return wx_error(&WxError::new(47001));
    };
    let text = |k: &str| req.get(k).and_then(Value::as_str).map(Cow::Borrowed);
    let force_refresh = match req.get("force_refresh") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return wx_error(&WxError::new(47001)),
    };
    if force_refresh {
        s.counters.forced_token_requests.fetch_add(1, Ordering::Relaxed);
    }
    let account = match check_credentials(&s, text("grant_type").as_deref(), text("appid"), text("secret"), 40125) {
        Ok(a) => a,
        Err(e) => return wx_error(&e),
    };
    let i = s.tokens_write().stable(account, force_refresh, Instant::now(), s.token_lifetime, s.token_overlap);
    if i.new {
        s.counters.tokens_issued.fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(appid = %s.accounts[account].appid, force_refresh, new = i.new, "stable token answered");
    issued(&i)
}

/// grant_type (40002), appid (41002 / 40013), secret (41004 / `wrong_secret`).
fn check_credentials(
    s: &Shared,
    grant_type: Option<&str>,
    appid: Option<Cow<'_, str>>,
    secret: Option<Cow<'_, str>>,
    wrong_secret: i64,
) -> Result<usize, WxError> {
    if grant_type != Some("client_credential") {
        return Err(WxError::new(40002));
    }
    let appid = appid.filter(|a| !a.is_empty()).ok_or_else(|| WxError::new(41002))?;
    let &account = s.by_appid.get(appid.as_ref()).ok_or_else(|| WxError::new(40013))?;
    let secret = secret.filter(|a| !a.is_empty()).ok_or_else(|| WxError::new(41004))?;
    if s.accounts[account].secret != secret.as_ref() {
        return Err(WxError::new(wrong_secret));
    }
    Ok(account)
}

// ---- sends --------------------------------------------------------------------------------

async fn template_send(State(s): State<Arc<Shared>>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    send(&s, query, body, JobKind::Template).await
}

/// An official account's 订阅通知.
async fn bizsend(State(s): State<Arc<Shared>>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    send(&s, query, body, JobKind::Subscribe).await
}

/// A mini program's subscription message.
async fn subscribe_send(State(s): State<Arc<Shared>>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    send(&s, query, body, JobKind::MiniprogramSubscribe).await
}

async fn send(s: &Arc<Shared>, query: Option<String>, body: Bytes, kind: JobKind) -> Response {
    let requests = if kind == JobKind::Template { &s.counters.send_requests } else { &s.counters.subscribe_requests };
    requests.fetch_add(1, Ordering::Relaxed);
    match send_checked(s, query, body, kind).await {
        Ok(r) => r,
        Err(e) => {
            s.count_error(e.errcode);
            wx_error(&e)
        }
    }
}

/// token → account kind → request → consent (subscriptions) → caps → faults (latency, 503, -1)
/// → de-duplication → accept.
async fn send_checked(s: &Arc<Shared>, query: Option<String>, body: Bytes, kind: JobKind) -> Result<Response, WxError> {
    let account = authorize(s, &query, kind)?;
    let acct = &s.accounts[account];
    let parsed: Value = serde_json::from_slice(&body).map_err(|_| WxError::new(47001))?;
    let req = match kind {
        JobKind::Template => send::validate(&parsed)?,
        _ => subscribe::validate(&parsed, kind, acct.pages.as_ref())?,
    };
    // Taken before the caps and faults, given back unless the message is accepted.
    let hold = match kind {
        JobKind::Template => None,
        _ => Some(Hold::take(&acct.consents, req.touser, req.template_id).ok_or_else(|| WxError::new(43101))?),
    };
    let state = acct.send_state(kind);
    let faults = s.faults();
    if let Some(code) = lock(state).cap_error(&faults, unix_now()) {
        return Err(WxError::new(code));
    }
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let unix = unix_now();
    let next_msgid = || s.next_msgid.fetch_add(1, Ordering::Relaxed);
    let decision = lock(state).decide(&faults, unix, Instant::now(), &req, next_msgid);
    match decision {
        Decision::Http503 => {
            s.counters.http_503.fetch_add(1, Ordering::Relaxed);
            Ok((StatusCode::SERVICE_UNAVAILABLE, "503 Service Temporarily Unavailable").into_response())
        }
        Decision::Error(code) => Err(WxError::new(code)),
        Decision::Duplicate(msgid) => {
            s.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            Ok(ok_answer(msgid))
        }
        Decision::Accepted { msgid, slow } => {
            if let Some(hold) = hold {
                hold.commit();
            }
            accept(s, Accepted { account, kind, msgid, unix }, &req, &body);
            if slow {
                // The message is already sent: a client that times out here and retries without
                // the same client_msg_id sends it twice, as with the real API.
                tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
            }
            Ok(ok_answer(msgid))
        }
    }
}

/// The token's account, if it may call the endpoint of `kind` (48001 otherwise: an official
/// account's API with a mini program's token, or the other way round).
fn authorize(s: &Shared, query: &Option<String>, kind: JobKind) -> Result<usize, WxError> {
    let token = query_param(query, "access_token").filter(|t| !t.is_empty()).ok_or_else(|| WxError::new(41001))?;
    let account = match s.tokens_read().check(&token, Instant::now()) {
        TokenCheck::Valid(a) => a,
        TokenCheck::Invalid => return Err(WxError::new(40001)),
        TokenCheck::Expired => return Err(WxError::new(42001)),
    };
    if !s.accounts[account].kind.sends(kind) {
        return Err(WxError::new(48001));
    }
    Ok(account)
}

/// An accepted message: which account's, through which endpoint, its msgid and when.
struct Accepted {
    account: usize,
    kind: JobKind,
    msgid: u64,
    unix: Duration,
}

/// Records the message and schedules its receipt (template) or sent event (subscription).
fn accept(s: &Arc<Shared>, a: Accepted, req: &SendRequest<'_>, body: &[u8]) {
    let Accepted { account, kind, msgid, unix } = a;
    let accepted = if kind == JobKind::Template { &s.counters.sends_accepted } else { &s.counters.subscribe_accepted };
    accepted.fetch_add(1, Ordering::Relaxed);
    let accepted_at_ms = i64::try_from(unix.as_millis()).unwrap_or(i64::MAX);
    s.record(Record { msgid, kind, account, body: Arc::from(body), accepted_at_ms });
    let event = match kind {
        JobKind::Template => Event::TemplateFinish { msgid, status: status_for(req.touser) },
        JobKind::Subscribe | JobKind::MiniprogramSubscribe => {
            let (code, status) = sent_result_for(req.touser);
            Event::Subscribe {
                kind: SubscribeEvent::Sent,
                items: vec![Item::sent(req.template_id, msgid, code, status)],
            }
        }
    };
    let create_time = i64::try_from(unix.as_secs()).unwrap_or(i64::MAX);
    receipts::schedule(s, Receipt { account, touser: req.touser.to_owned(), create_time, event });
}

fn ok_answer(msgid: u64) -> Response {
    json_body(format!(r#"{{"errcode":0,"errmsg":"ok","msgid":{msgid}}}"#))
}

// ---- admin --------------------------------------------------------------------------------

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    Json(s.stats()).into_response()
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// `GET /_sandbox/messages[?offset=N&limit=M]`, oldest first.
async fn messages(State(s): State<Arc<Shared>>, Query(page): Query<Page>) -> Response {
    Json(s.messages(page.offset, page.limit.unwrap_or(usize::MAX))).into_response()
}

async fn get_faults(State(s): State<Arc<Shared>>) -> Response {
    Json(s.faults()).into_response()
}

#[derive(Deserialize)]
struct SeedQuery {
    seed: Option<u64>,
}

/// `PUT /_sandbox/faults[?seed=N]` with a JSON [`Faults`]; fields left out are off.
async fn put_faults(State(s): State<Arc<Shared>>, Query(q): Query<SeedQuery>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("faults: {e}\n")).into_response(),
    };
    if let Err(e) = faults.validate() {
        return (StatusCode::BAD_REQUEST, format!("faults: {e}\n")).into_response();
    }
    if let Some(seed) = q.seed {
        s.set_seed(seed);
    }
    s.set_faults(faults);
    Json(s.faults()).into_response()
}

async fn revoke_tokens(State(s): State<Arc<Shared>>) -> StatusCode {
    s.tokens_write().revoke_all();
    tracing::info!("all tokens revoked");
    StatusCode::NO_CONTENT
}

async fn reset_daily_counts(State(s): State<Arc<Shared>>) -> StatusCode {
    s.reset_daily_counts();
    tracing::info!("daily counts reset");
    StatusCode::NO_CONTENT
}

/// `POST /_sandbox/consents/grant` with a JSON [`ConsentChange`].
async fn grant_consent(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    change_consent(&s, &body, true)
}

/// `POST /_sandbox/consents/revoke` with a JSON [`ConsentChange`].
async fn revoke_consent(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    change_consent(&s, &body, false)
}

fn change_consent(s: &Arc<Shared>, body: &[u8], grant: bool) -> Response {
    let change: ConsentChange = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("consent: {e}\n")).into_response(),
    };
    match s.change_consent(&change, grant) {
        Ok(records) => Json(records).into_response(),
        Err(e @ ConsentError::UnknownAppid(_)) => (StatusCode::NOT_FOUND, format!("consent: {e}\n")).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("consent: {e}\n")).into_response(),
    }
}

/// `GET /_sandbox/consents[?appid=…&openid=…&template_id=…]`.
async fn list_consents(State(s): State<Arc<Shared>>, Query(filter): Query<Filter>) -> Response {
    Json(s.consents(&filter)).into_response()
}
