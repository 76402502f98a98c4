//! Subscription messages through a real worker, the sandbox and the webhook: each kind sent
//! through its endpoint, checked before sending, 43101, and the sent event tied to its job (XML
//! for the official account, JSON in safe mode for the mini program).

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Received, spawn_worker, start_sandbox};
use crate::subscribe_webhook::{Acct, Hook, MINI_SAFE, OA};
use crate::wx::{AccountKind, Consent, EventFormat, JobKind, Sandbox, SandboxAccount, SandboxConfig, WebhookTarget};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "sub-secret";

/// The sandbox's view of `acct`, pushing its events to the test's webhook.
fn sandbox_account(acct: Acct, hook: &Hook, consent: Option<Consent>) -> SandboxAccount {
    let mut a = match acct.kind {
        AccountKind::OfficialAccount => SandboxAccount::new(acct.appid, SECRET),
        AccountKind::Miniprogram => SandboxAccount::miniprogram(acct.appid, SECRET),
    };
    a.webhook = Some(WebhookTarget {
        url: format!("{}{}", hook.base, acct.path()),
        token: acct.token.into(),
        encoding_aes_key: acct.aes_key.map(Into::into),
    });
    a.event_format = if acct.kind == AccountKind::Miniprogram { EventFormat::Json } else { EventFormat::Xml };
    a.auto_consent = consent;
    a
}

/// A webhook for the accounts, a sandbox pushing to it, and a worker sending through it.
async fn pool(tag: &str, consent: Option<Consent>) -> (Hook, Sandbox, crate::harness::WorkerHandle) {
    let hook = Hook::start(tag).await;
    hook.env.declare_topology().await;
    let accounts = vec![sandbox_account(OA, &hook, consent), sandbox_account(MINI_SAFE, &hook, consent)];
    let sandbox = start_sandbox(SandboxConfig { accounts, ..SandboxConfig::default() }).await;
    let mut config = hook.env.config.clone();
    config.wechat_api_base = sandbox.base_url();
    for account in &mut config.accounts {
        account.secret = SECRET.to_owned().into();
    }
    let worker = spawn_worker(&config);
    (hook, sandbox, worker)
}

fn subscribe_job(job_id: &str, acct: Acct, thing: &str) -> Value {
    let kind = if acct.kind == AccountKind::Miniprogram { "miniprogram_subscribe" } else { "subscribe" };
    json!({
        "job_id": job_id,
        "kind": kind,
        "account": acct.name,
        "touser": format!("o-{job_id}"),
        "template_id": "TPL-sub-1",
        "page": "pages/order/index",
        "data": {"thing1": {"value": thing}, "amount2": {"value": "¥26.00"}, "time3": {"value": "2026-12-02 15:01"}}
    })
}

/// Results until every `job_ids` has a `send.*` result and, when `deliveries`, a `delivery.*`.
async fn results_for(hook: &mut Hook, job_ids: &[&str], deliveries: bool) -> Vec<Received> {
    let mut got = Vec::new();
    let done = |got: &[Received]| {
        job_ids.iter().all(|id| {
            let has = |prefix: &str| {
                got.iter().any(|r: &Received| r.routing_key.starts_with(prefix) && r.body["job_id"] == *id)
            };
            has("send.") && (!deliveries || has("delivery."))
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(&got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(r) = hook.env.next_result(left).await else { break };
        got.push(r);
    }
    assert!(done(&got), "results for {job_ids:?} within {WAIT:?}: {got:?}");
    got
}

fn one<'a>(got: &'a [Received], key: &str, job_id: &str) -> &'a Value {
    let found: Vec<&Received> = got.iter().filter(|r| r.routing_key == key && r.body["job_id"] == job_id).collect();
    assert_eq!(found.len(), 1, "one {key} for {job_id}: {got:?}");
    &found[0].body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_is_sent_through_its_endpoint_and_its_sent_event_is_tied_to_the_job() {
    let (mut hook, sandbox, worker) = pool("sub-send", Some(Consent::LongTerm)).await;
    hook.env.publish_job(&subscribe_job("oa-1", OA, "订单已发货")).await;
    hook.env.publish_job(&subscribe_job("mp-1", MINI_SAFE, "牙科复诊")).await;
    let got = results_for(&mut hook, &["oa-1", "mp-1"], true).await;
    for (job_id, kind) in [("oa-1", "subscribe"), ("mp-1", "miniprogram_subscribe")] {
        let sent = one(&got, "send.succeeded", job_id);
        assert_eq!(sent["kind"], kind, "{sent}");
        let delivered = one(&got, "delivery.success", job_id);
        assert_eq!((&delivered["kind"], &delivered["msgid"]), (&json!(kind), &sent["msgid"]), "{delivered}");
    }
    let kinds: Vec<(String, JobKind)> = sandbox.messages().into_iter().map(|m| (m.touser, m.kind)).collect();
    assert!(kinds.contains(&("o-oa-1".into(), JobKind::Subscribe)), "{kinds:?}");
    assert!(kinds.contains(&("o-mp-1".into(), JobKind::MiniprogramSubscribe)), "{kinds:?}");
    worker.stop().await;
    hook.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_breaks_a_rule_fails_before_sending_and_without_consent_wechat_says_43101() {
    let (mut hook, sandbox, worker) = pool("sub-refused", None).await;
    let long = "这是一条超过二十个字符长度限制的订阅消息内容文";
    hook.env.publish_job(&subscribe_job("too-long", OA, long)).await;
    let mut wrong_kind = subscribe_job("wrong-kind", OA, "x");
    wrong_kind["kind"] = json!("miniprogram_subscribe");
    hook.env.publish_job(&wrong_kind).await;
    hook.env.publish_job(&subscribe_job("no-consent", MINI_SAFE, "牙科复诊")).await;
    let got = results_for(&mut hook, &["too-long", "wrong-kind", "no-consent"], false).await;
    let reason = |id| one(&got, "send.failed", id)["reason"].as_str().map(str::to_owned);
    assert_eq!(reason("too-long").as_deref(), Some("invalid job: thing1 is 23 characters, at most 20"));
    assert!(reason("wrong-kind").is_some_and(|r| r.contains("cannot be sent by account")), "{got:?}");
    let refused = one(&got, "send.failed", "no-consent");
    assert_eq!(
        (&refused["reason"], &refused["errcode"], &refused["attempts"]),
        (&json!("no subscription consent"), &json!(43101), &json!(1))
    );
    let stats = sandbox.stats();
    assert_eq!((stats.subscribe_requests, stats.no_consent), (1, 1), "only the valid job reached WeChat");
    worker.stop().await;
    hook.finish().await;
}
