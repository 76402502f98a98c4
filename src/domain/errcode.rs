//! The errcode table: what the worker does about each answer WeChat can give.
//!
//! [`TABLE`] is data: one row per errcode (docs/wechat-api.md, "Send errcodes") with the action,
//! the `reason` results carry, and WeChat's own errmsg. The worker ([`classify`], [`reason`]),
//! the sandbox (its answers' errmsg) and the README's table all read it; a test holds the README
//! to it. An errcode the table does not know fails the job visibly, naming the code, rather than
//! being retried blindly or treated as success.

/// What to do about one answer to a template send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// errcode 0: the message was accepted.
    Accepted,
    /// A transient failure: try again after a backoff.
    Retry,
    /// The per-minute API quota is spent (45011): pause the account until the next minute.
    WaitNextMinute,
    /// The access token was refused: invalidate it (if still current), fetch once, retry once.
    RefreshToken,
    /// The account's daily quota is spent (45009): park its jobs until the daily reset.
    QuotaExhausted,
    /// The message can never be sent as it is: fail the job at once.
    Permanent,
    /// The recipient has no subscription consent left (43101): fail the job at once. An
    /// expected answer for subscription messages, logged at info, not as a failure.
    Declined,
    /// Not in the table: fail the job, naming the code, so that someone looks at it.
    Unknown,
}

impl Action {
    /// What the action does, in the README's words.
    pub fn describe(self) -> &'static str {
        match self {
            Action::Accepted => "success: record, publish `send.succeeded`",
            Action::Retry => "retry with backoff",
            Action::WaitNextMinute => "pause the account until the next minute",
            Action::RefreshToken => "replace the token once, send once more",
            Action::QuotaExhausted => "park the account's jobs until midnight Beijing time",
            Action::Permanent => "permanent: `send.failed`",
            Action::Declined => "declined by the recipient: `send.failed`, logged at info",
            Action::Unknown => "`send.failed`, logged as an error",
        }
    }
}

/// One errcode a template send can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub code: i64,
    pub action: Action,
    /// The `reason` of a result: WeChat's meaning in words, stable across errmsg wording.
    pub reason: &'static str,
    /// WeChat's errmsg (English, as the API answers it); the sandbox answers with it.
    pub errmsg: &'static str,
}

const fn entry(code: i64, action: Action, reason: &'static str, errmsg: &'static str) -> Entry {
    Entry { code, action, reason, errmsg }
}

use Action::*;

/// Every errcode of `cgi-bin/message/template/send` wxpush knows, in the README's order.
#[rustfmt::skip]
pub const TABLE: &[Entry] = &[
    entry(0, Accepted, "ok", "ok"),
    entry(-1, Retry, "system busy", "system error"),
    entry(43117, Retry, "too many messages to this openid", "Sending messages to this openid too frequently, please try later"),
    entry(40001, RefreshToken, "access token invalid or not latest", "invalid credential, access_token is invalid or not latest"),
    entry(40014, RefreshToken, "invalid access token", "invalid access_token"),
    entry(42001, RefreshToken, "access token expired", "access_token expired"),
    entry(45011, WaitNextMinute, "api minute-quota reached", "api minute-quota reach limit must slower retry next minute"),
    entry(45009, QuotaExhausted, "daily api quota reached", "reach max api daily quota limit"),
    entry(40003, Permanent, "invalid openid", "invalid openid"),
    entry(40013, Permanent, "invalid appid", "invalid appid"),
    entry(40036, Permanent, "invalid template_id size", "invalid template_id size"),
    entry(40037, Permanent, "invalid template_id", "invalid template_id"),
    entry(41001, Permanent, "access token missing", "access_token missing"),
    entry(43004, Permanent, "recipient has not followed the account", "require subscribe"),
    entry(43116, Permanent, "template banned", "this template_id is banned"),
    entry(47001, Permanent, "data format error", "data format error"),
    entry(47003, Permanent, "argument invalid", "argument invalid!"),
    entry(48001, Permanent, "api unauthorized", "api unauthorized"),
    entry(48002, Permanent, "user refuses messages from the account", "api forbidden for user"),
    entry(48004, Permanent, "api banned", "api forbidden for irregularities"),
    // Subscription messages (docs/wechat-api.md, "Subscription errcodes"). WeChat documents
    // 41030's and 43107's meaning but not their errmsg; these are the sandbox's.
    entry(43101, Declined, "no subscription consent", "user refuse to accept the msg"),
    entry(43108, Retry, "concurrent sends to this openid", "Cannot make concurrent calls to the same OpenID, please try again"),
    entry(41030, Permanent, "invalid page", "invalid page"),
    entry(43107, Permanent, "subscription messages banned", "subscribe message banned"),
    entry(45168, Permanent, "blocked keyword in the message", "keyword in blacklist"),
    entry(45103, Permanent, "api unsupported for this account", "This API has been unsupported"),
];

/// The token endpoints' errcodes that no retry will cure (the account's configuration is
/// wrong), with WeChat's errmsg and what to fix.
pub struct TokenEntry {
    pub code: i64,
    pub errmsg: &'static str,
    pub advice: &'static str,
}

const fn token_entry(code: i64, errmsg: &'static str, advice: &'static str) -> TokenEntry {
    TokenEntry { code, errmsg, advice }
}

/// `cgi-bin/token` and `cgi-bin/stable_token` answers that need an operator.
#[rustfmt::skip]
pub const TOKEN_TABLE: &[TokenEntry] = &[
    token_entry(40001, "invalid credential, access_token is invalid or not latest", "the AppSecret is wrong: check the account's secret in the MP console"),
    token_entry(40125, "invalid appsecret", "the AppSecret is wrong: check the account's secret in the MP console"),
    token_entry(40013, "invalid appid", "the AppID is wrong: check the account's appid"),
    token_entry(40164, "invalid ip, not in whitelist", "this machine's IP is not on the account's IP whitelist: add it in the MP console"),
    // WeChat documents the code, not its errmsg; the sandbox never answers it.
    token_entry(40243, "appsecret frozen", "the AppSecret is frozen: unfreeze or reset it in the MP console"),
    token_entry(40002, "invalid grant_type", "invalid grant_type: this is a wxpush bug, please report it"),
    token_entry(41002, "appid missing", "the account has no appid: set it in the configuration"),
    token_entry(41004, "appsecret missing", "the account has no secret: set it in the configuration"),
    token_entry(45009, "reach max api daily quota limit", "the daily access-token quota is spent: it resets at midnight Beijing time, or use clear_quota"),
];

/// The row of a send errcode, if the table has one.
pub fn lookup(errcode: i64) -> Option<&'static Entry> {
    TABLE.iter().find(|e| e.code == errcode)
}

/// Classifies a template-send errcode.
pub fn classify(errcode: i64) -> Action {
    lookup(errcode).map_or(Action::Unknown, |e| e.action)
}

/// The `reason` of a send result: WeChat's meaning in words, stable across errmsg wording.
pub fn reason(errcode: i64) -> &'static str {
    lookup(errcode).map_or("unknown errcode", |e| e.reason)
}

/// The `reason` of a failed send, naming the field for 47003 (WeChat's errmsg says which:
/// `argument invalid! data.thing3.value invalid` → `argument invalid: data.thing3.value`).
pub fn failure_reason(errcode: i64, errmsg: &str) -> String {
    let field = (errcode == 47003)
        .then(|| {
            errmsg
                .split_whitespace()
                .find(|w| w.starts_with("data.") || w.starts_with("touser") || w.starts_with("template_id"))
        })
        .flatten();
    match field {
        Some(field) => {
            format!("{}: {}", reason(errcode), field.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_'))
        }
        None => reason(errcode).to_owned(),
    }
}

/// WeChat's errmsg for an errcode of a send or token endpoint, if wxpush knows it.
pub fn errmsg(errcode: i64) -> Option<&'static str> {
    lookup(errcode).map(|e| e.errmsg).or_else(|| TOKEN_TABLE.iter().find(|e| e.code == errcode).map(|e| e.errmsg))
}

/// What to fix for a token-endpoint errcode that no retry will cure.
pub fn token_error_advice(errcode: i64) -> Option<&'static str> {
    TOKEN_TABLE.iter().find(|e| e.code == errcode).map(|e| e.advice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_classes_hold() {
        let cases: &[(&[i64], Action)] = &[
            (&[0], Accepted),
            (&[-1, 43117], Retry),
            (&[45011], WaitNextMinute),
            (&[40001, 40014, 42001], RefreshToken),
            (&[45009], QuotaExhausted),
            (&[40003, 43004, 40036, 40037, 47001, 47003, 48001, 48002, 48004, 43116, 40013, 41001], Permanent),
            (&[41030, 43107, 45168, 45103], Permanent),
            (&[43108], Retry),
            (&[43101], Declined),
            (&[1, 45047, 99999, -1000], Unknown),
        ];
        for (codes, action) in cases {
            for &c in *codes {
                assert_eq!(classify(c), *action, "{c}");
            }
        }
    }

    #[test]
    fn every_code_has_one_row_and_words() {
        for (i, e) in TABLE.iter().enumerate() {
            assert!(TABLE[i + 1..].iter().all(|o| o.code != e.code), "{} twice", e.code);
            assert!(!e.reason.is_empty() && !e.errmsg.is_empty(), "{}", e.code);
            assert_ne!(e.action, Unknown, "{}: a row says what to do", e.code);
        }
        assert_eq!(reason(40003), "invalid openid");
        assert_eq!(reason(12345), "unknown errcode");
        assert_eq!(errmsg(43004), Some("require subscribe"));
        assert_eq!(errmsg(40125), Some("invalid appsecret"));
        assert_eq!(errmsg(12345), None);
    }

    #[test]
    fn argument_errors_name_the_field_wechat_complained_about() {
        assert_eq!(
            failure_reason(47003, "argument invalid! data.thing3.value invalid"),
            "argument invalid: data.thing3.value"
        );
        assert_eq!(
            failure_reason(47003, "argument invalid! hint: [abc] data.character_string13.value invalid rid: 1"),
            "argument invalid: data.character_string13.value"
        );
        assert_eq!(failure_reason(47003, "argument invalid!"), "argument invalid");
        assert_eq!(failure_reason(43101, "user refuse to accept the msg"), "no subscription consent");
    }

    #[test]
    fn configuration_errors_on_the_token_endpoint_carry_advice() {
        for c in [40125, 40013, 40164, 40243] {
            assert!(token_error_advice(c).is_some(), "{c}");
        }
        assert!(token_error_advice(-1).is_none());
    }

    /// The README's table is this one: a row per errcode, in this order, with the same action
    /// and reason.
    #[test]
    fn the_readme_table_matches() {
        let readme = include_str!("../../README.md");
        let rows: Vec<Vec<String>> = readme
            .lines()
            .skip_while(|l| !l.starts_with("### What each WeChat answer does"))
            .skip(1)
            .take_while(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.trim_matches('|').split(" | ").map(|c| c.trim().replace('`', "")).collect())
            .collect();
        let expected: Vec<Vec<String>> = TABLE
            .iter()
            .map(|e| vec![e.code.to_string(), e.errmsg.into(), e.action.describe().replace('`', ""), e.reason.into()])
            .collect();
        assert_eq!(rows.len(), expected.len(), "README rows: {rows:?}");
        for (row, want) in rows.iter().zip(&expected) {
            assert_eq!(row, want);
        }
    }
}
