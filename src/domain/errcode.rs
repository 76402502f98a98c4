//! The errcode table: what the worker does about each answer WeChat can give.
//!
//! One place maps every errcode (docs/wechat-api.md, "Send errcodes") to an [`Action`]; the pipeline
//! never tests errcodes itself. An errcode the table does not know fails the job visibly,
//! naming the code, rather than being retried blindly or treated as success.

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
    /// Not in the table: fail the job, naming the code, so that someone looks at it.
    Unknown,
}

/// errcodes that mean "this access token is no good" (the set WxJava and wechatpy use).
pub const TOKEN_ERRCODES: [i64; 3] = [40001, 40014, 42001];

/// Classifies a template-send errcode.
pub fn classify(errcode: i64) -> Action {
    match errcode {
        0 => Action::Accepted,
        -1 | 43117 => Action::Retry,
        45011 => Action::WaitNextMinute,
        40001 | 40014 | 42001 => Action::RefreshToken,
        45009 => Action::QuotaExhausted,
        40003 | 43004 | 40036 | 40037 | 47001 | 47003 | 48001 | 48002 | 48004 | 43116 | 40013 | 41001 => {
            Action::Permanent
        }
        _ => Action::Unknown,
    }
}

/// The `reason` of a send result: WeChat's meaning in words, stable across errmsg wording.
pub fn reason(errcode: i64) -> &'static str {
    match errcode {
        0 => "ok",
        -1 => "system busy",
        40001 => "access token invalid or not latest",
        40003 => "invalid openid",
        40013 => "invalid appid",
        40014 => "invalid access token",
        40036 => "invalid template_id size",
        40037 => "invalid template_id",
        41001 => "access token missing",
        42001 => "access token expired",
        43004 => "recipient has not followed the account",
        43116 => "template banned",
        43117 => "too many messages to this openid",
        45009 => "daily api quota reached",
        45011 => "api minute-quota reached",
        47001 => "data format error",
        47003 => "argument invalid",
        48001 => "api unauthorized",
        48002 => "user refuses messages from the account",
        48004 => "api banned",
        _ => "unknown errcode",
    }
}

/// Token-endpoint errcodes that no retry will cure: the account's configuration is wrong.
/// The log line says what to fix.
pub fn token_error_advice(errcode: i64) -> Option<&'static str> {
    Some(match errcode {
        40001 | 40125 => "the AppSecret is wrong: check the account's secret in the MP console",
        40013 => "the AppID is wrong: check the account's appid",
        40164 => "this machine's IP is not on the account's IP whitelist: add it in the MP console",
        40243 => "the AppSecret is frozen: unfreeze or reset it in the MP console",
        40002 => "invalid grant_type: this is a wxpush bug, please report it",
        45009 => "the daily access-token quota is spent: it resets at midnight Beijing time, or use clear_quota",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_classes_hold() {
        assert_eq!(classify(0), Action::Accepted);
        for c in [-1, 43117] {
            assert_eq!(classify(c), Action::Retry, "{c}");
        }
        assert_eq!(classify(45011), Action::WaitNextMinute);
        for c in TOKEN_ERRCODES {
            assert_eq!(classify(c), Action::RefreshToken, "{c}");
        }
        assert_eq!(classify(45009), Action::QuotaExhausted);
        for c in [40003, 43004, 40036, 40037, 47001, 47003, 48001, 48002, 48004, 43116] {
            assert_eq!(classify(c), Action::Permanent, "{c}");
        }
        for c in [1, 45047, 99999, -1000] {
            assert_eq!(classify(c), Action::Unknown, "{c}");
        }
    }

    #[test]
    fn reasons_name_the_permanent_failures() {
        assert_eq!(reason(40003), "invalid openid");
        assert_eq!(reason(12345), "unknown errcode");
        for c in [40003, 43004, 40036, 40037, 47001, 47003, 48001, 48002, 48004, 43116] {
            assert_ne!(reason(c), "unknown errcode", "{c}");
        }
    }

    #[test]
    fn configuration_errors_on_the_token_endpoint_carry_advice() {
        for c in [40125, 40013, 40164, 40243] {
            assert!(token_error_advice(c).is_some(), "{c}");
        }
        assert!(token_error_advice(-1).is_none());
    }
}
