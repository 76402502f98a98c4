//! What one send comes to. [`decide`] turns WeChat's answer into an [`Outcome`] by the errcode
//! table and the retry policy: a pure function, so every row of the table is tested here.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::backoff::Backoff;

use super::{
    calendar::{self, QuotaDay},
    errcode::{self, Action},
};

/// What came back from one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// WeChat answered: errcode 0 with a msgid, or an errcode.
    WeChat { errcode: i64, errmsg: String, msgid: Option<u64> },
    /// No answer: a connection error, a timeout, an HTTP error status.
    Transport(String),
    /// WeChat refused the token (`errcode`, `errmsg`) and no new one can be had before
    /// `retry_after`; `why` says so.
    TokenRefused { errcode: Option<i64>, errmsg: Option<String>, why: String, retry_after: Duration },
}

impl Answer {
    /// A send that failed in a way another attempt may cure (what `wxpush_send_retries_total`
    /// counts, whether or not attempts are left).
    pub fn is_transient_failure(&self) -> bool {
        match self {
            Answer::Transport(_) => true,
            Answer::WeChat { errcode, msgid, .. } => match errcode::classify(*errcode) {
                Action::Retry | Action::RefreshToken => true,
                Action::Accepted => msgid.is_none(),
                _ => false,
            },
            Answer::TokenRefused { .. } => false,
        }
    }
}

/// What the job does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by WeChat.
    Sent { msgid: u64, errmsg: String },
    /// Transient: send again after `after` (before jitter).
    Retry { after: Duration, why: String },
    /// The job ends with `send.failed`.
    Failed { reason: String, errcode: Option<i64>, errmsg: Option<String> },
    /// The account's daily quota is spent: its jobs wait until `until` (the quota's reset).
    Park { until: DateTime<Utc>, why: String },
    /// The account is paused pool-wide until `until` (the per-minute quota).
    Pause { until: DateTime<Utc>, why: String },
}

impl Outcome {
    /// Whether the send counts against the job's attempts. Waiting for the account's quota is
    /// not the job's failure.
    pub fn spends_attempt(&self) -> bool {
        !matches!(self, Outcome::Park { .. } | Outcome::Pause { .. })
    }
}

/// The retry policy `decide` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_attempts: u32,
    /// The backoff after the first failed attempt; it doubles with each one after.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long 45011 pauses the account; `None`: until the next minute starts.
    pub minute_pause: Option<Duration>,
    pub quota_day: QuotaDay,
}

impl Policy {
    /// The backoff after the `attempt`-th failed attempt (1-based), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        Backoff::new(self.retry_min, self.retry_max).without_jitter().after(attempt.max(1))
    }
}

/// Judges the answer to the `attempt`-th send of a job (1-based), at `now`.
pub fn decide(answer: &Answer, attempt: u32, policy: &Policy, now: DateTime<Utc>) -> Outcome {
    let (errcode, errmsg, why) = match answer {
        Answer::WeChat { errcode, errmsg, msgid } => match judge(*errcode, errmsg, *msgid, policy, now) {
            Judged::Final(outcome) => return outcome,
            Judged::Transient(why) => (Some(*errcode), Some(errmsg.clone()), why),
        },
        Answer::Transport(why) => (None, None, why.clone()),
        Answer::TokenRefused { errcode, errmsg, why, retry_after } => {
            if attempt >= policy.max_attempts {
                return exhausted(why, *errcode, errmsg.clone());
            }
            return Outcome::Retry { after: (*retry_after).max(policy.backoff(attempt)), why: why.clone() };
        }
    };
    if attempt >= policy.max_attempts {
        return exhausted(&why, errcode, errmsg);
    }
    Outcome::Retry { after: policy.backoff(attempt), why }
}

enum Judged {
    Final(Outcome),
    Transient(String),
}

/// One row of the errcode table, applied.
fn judge(errcode: i64, errmsg: &str, msgid: Option<u64>, policy: &Policy, now: DateTime<Utc>) -> Judged {
    let failed = |reason: String| Outcome::Failed { reason, errcode: Some(errcode), errmsg: Some(errmsg.to_owned()) };
    Judged::Final(match errcode::classify(errcode) {
        Action::Accepted => match msgid {
            Some(msgid) => Outcome::Sent { msgid, errmsg: errmsg.to_owned() },
            None => return Judged::Transient("WeChat accepted the message but gave no msgid".into()),
        },
        Action::Retry | Action::RefreshToken => {
            return Judged::Transient(format!("errcode {errcode} ({})", errcode::reason(errcode)));
        }
        Action::WaitNextMinute => {
            let left = policy.minute_pause.unwrap_or_else(|| calendar::until_next_minute(now));
            let why = "45011: minute quota reached; account paused until the next minute".into();
            Outcome::Pause { until: later(now, left), why }
        }
        Action::QuotaExhausted => {
            let why = "45009: WeChat's daily quota reached; jobs parked until it resets".into();
            Outcome::Park { until: later(now, policy.quota_day.until_reset(now)), why }
        }
        Action::Permanent | Action::Declined => failed(errcode::failure_reason(errcode, errmsg)),
        Action::Unknown => failed(format!("unknown errcode {errcode}: {errmsg}")),
    })
}

fn exhausted(why: &str, errcode: Option<i64>, errmsg: Option<String>) -> Outcome {
    Outcome::Failed { reason: format!("attempts exhausted: {why}"), errcode, errmsg }
}

/// `now + left`, saturating far in the future instead of overflowing.
pub fn later(now: DateTime<Utc>, left: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(left).ok().and_then(|d| now.checked_add_signed(d)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const POLICY: Policy = Policy {
        max_attempts: 3,
        retry_min: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
        minute_pause: None,
        quota_day: QuotaDay::BEIJING,
    };

    fn now() -> DateTime<Utc> {
        // 15:59:30 UTC = 23:59:30 Beijing: 30 s to the next minute and to the quota's reset.
        Utc.with_ymd_and_hms(2026, 12, 1, 15, 59, 30).single().expect("a valid time")
    }

    fn wechat(errcode: i64) -> Answer {
        let errmsg = errcode::errmsg(errcode).unwrap_or("whatever").to_owned();
        Answer::WeChat { errcode, errmsg, msgid: (errcode == 0).then_some(42) }
    }

    #[test]
    fn every_row_of_the_table_decides() {
        for entry in errcode::TABLE {
            let outcome = decide(&wechat(entry.code), 1, &POLICY, now());
            let fits = match entry.action {
                Action::Accepted => matches!(outcome, Outcome::Sent { msgid: 42, .. }),
                Action::Retry | Action::RefreshToken => {
                    outcome
                        == Outcome::Retry {
                            after: POLICY.retry_min,
                            why: format!("errcode {} ({})", entry.code, entry.reason),
                        }
                }
                Action::WaitNextMinute => {
                    matches!(&outcome, Outcome::Pause { until, .. } if *until == now() + chrono::Duration::seconds(30))
                }
                Action::QuotaExhausted => {
                    matches!(&outcome, Outcome::Park { until, .. } if *until == now() + chrono::Duration::seconds(30))
                }
                Action::Permanent | Action::Declined => {
                    matches!(&outcome, Outcome::Failed { reason, errcode: Some(c), errmsg: Some(_) } if reason == entry.reason && *c == entry.code)
                }
                Action::Unknown => false,
            };
            assert!(fits, "{}: {outcome:?}", entry.code);
            assert_eq!(
                outcome.spends_attempt(),
                !matches!(entry.action, Action::WaitNextMinute | Action::QuotaExhausted)
            );
        }
    }

    #[test]
    fn an_unknown_errcode_fails_naming_it() {
        let answer = Answer::WeChat { errcode: 45047, errmsg: "new".into(), msgid: None };
        let Outcome::Failed { reason, errcode, .. } = decide(&answer, 1, &POLICY, now()) else { panic!() };
        assert_eq!((reason.as_str(), errcode), ("unknown errcode 45047: new", Some(45047)));
    }

    #[test]
    fn transient_failures_back_off_until_attempts_are_spent() {
        let busy = wechat(-1);
        let after = |attempt| match decide(&busy, attempt, &POLICY, now()) {
            Outcome::Retry { after, .. } => Some(after),
            _ => None,
        };
        assert_eq!(after(1), Some(Duration::from_millis(200)));
        assert_eq!(after(2), Some(Duration::from_millis(400)));
        let Outcome::Failed { reason, errcode, .. } = decide(&busy, 3, &POLICY, now()) else { panic!() };
        assert_eq!((reason.as_str(), errcode), ("attempts exhausted: errcode -1 (system busy)", Some(-1)));
        let transport = Answer::Transport("timed out".into());
        assert!(matches!(decide(&transport, 3, &POLICY, now()), Outcome::Failed { errcode: None, .. }));
        let no_msgid = Answer::WeChat { errcode: 0, errmsg: "ok".into(), msgid: None };
        assert!(matches!(decide(&no_msgid, 1, &POLICY, now()), Outcome::Retry { .. }));
    }

    #[test]
    fn a_refused_token_waits_at_least_its_retry_after_and_ends_with_the_attempts() {
        let refused = |retry_after| Answer::TokenRefused {
            errcode: Some(40001),
            errmsg: Some("invalid credential".into()),
            why: "WeChat refuses the access token".into(),
            retry_after,
        };
        let long = decide(&refused(Duration::from_secs(30)), 1, &POLICY, now());
        assert_eq!(
            long,
            Outcome::Retry { after: Duration::from_secs(30), why: "WeChat refuses the access token".into() }
        );
        let short = decide(&refused(Duration::ZERO), 2, &POLICY, now());
        assert!(matches!(short, Outcome::Retry { after, .. } if after == Duration::from_millis(400)));
        let last = decide(&refused(Duration::ZERO), 3, &POLICY, now());
        assert!(
            matches!(last, Outcome::Failed { reason, errcode: Some(40001), .. } if reason == "attempts exhausted: WeChat refuses the access token")
        );
    }

    #[test]
    fn a_configured_minute_pause_wins_and_backoff_is_capped() {
        let policy = Policy { minute_pause: Some(Duration::from_secs(2)), ..POLICY };
        let outcome = decide(&wechat(45011), 1, &policy, now());
        assert!(matches!(outcome, Outcome::Pause { until, .. } if until == now() + chrono::Duration::seconds(2)));
        assert_eq!(POLICY.backoff(10), Duration::from_secs(1));
        assert_eq!(POLICY.backoff(u32::MAX), Duration::from_secs(1));
        assert_eq!(POLICY.backoff(0), Duration::from_millis(200));
    }
}
