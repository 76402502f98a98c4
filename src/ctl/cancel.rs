//! `wxpush-ctl cancel`: marks jobs cancelled across the pool. A worker that picks one up (fresh,
//! redelivered, or back from a delay queue) publishes `send.failed` with reason `cancelled` and
//! sends nothing. A job already sent keeps its result; one being sent right now is left alone.

use std::time::Duration;

use serde_json::{Value, json};

use super::CtlError;
use crate::{
    config::Config,
    store::{Redis, ledger::Cancel},
};

/// How long Redis gets to answer each cancel.
const REDIS_WAIT: Duration = Duration::from_secs(10);

/// What cancelling one job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    pub job_id: String,
    pub found: Cancel,
}

impl Cancelled {
    /// Whether the job will not be sent (cancelled now or before).
    pub fn stopped(&self) -> bool {
        matches!(self.found, Cancel::Cancelled | Cancel::AlreadyCancelled)
    }

    /// The msgid of the job's recorded result, when it was sent.
    fn msgid(&self) -> Option<u64> {
        let Cancel::AlreadyDone(result) = &self.found else { return None };
        serde_json::from_slice::<Value>(result).ok()?.get("msgid")?.as_u64()
    }

    pub fn to_line(&self) -> String {
        let what = match &self.found {
            Cancel::Cancelled => "cancelled".to_owned(),
            Cancel::AlreadyCancelled => "cancelled before".to_owned(),
            Cancel::AlreadyDone(_) => match self.msgid() {
                Some(msgid) => format!("already sent (msgid {msgid}); nothing changed"),
                None => "already finished; nothing changed".to_owned(),
            },
            Cancel::InFlight => "being sent right now; nothing changed (ask again in a few seconds)".to_owned(),
        };
        format!("{}: {what}", self.job_id)
    }

    pub fn to_json(&self) -> Value {
        let status = match self.found {
            Cancel::Cancelled => "cancelled",
            Cancel::AlreadyCancelled => "already_cancelled",
            Cancel::AlreadyDone(_) => "already_sent",
            Cancel::InFlight => "in_flight",
        };
        json!({"job_id": self.job_id, "status": status, "msgid": self.msgid()})
    }
}

/// Cancels each of `job_ids` (for as long as the ledger keeps records, `ledger_ttl`).
pub async fn cancel(config: &Config, job_ids: &[String]) -> Result<Vec<Cancelled>, CtlError> {
    let redis = Redis::connect(&config.redis_url, &config.redis_prefix).await?;
    let mut found = Vec::with_capacity(job_ids.len());
    for job_id in job_ids {
        let asked = redis.cancel_job(job_id, config.ledger_ttl);
        let outcome = tokio::time::timeout(REDIS_WAIT, asked)
            .await
            .map_err(|_| CtlError::RedisTimeout { secs: REDIS_WAIT.as_secs() })??;
        found.push(Cancelled { job_id: job_id.clone(), found: outcome });
    }
    Ok(found)
}

/// The job_ids of a file: one a line, blank lines and `#` comments skipped.
pub fn read_ids(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_answer_says_what_happened() {
        let sent = Cancelled { job_id: "j".into(), found: Cancel::AlreadyDone(br#"{"msgid":42}"#.to_vec()) };
        assert_eq!(sent.to_line(), "j: already sent (msgid 42); nothing changed");
        assert_eq!(sent.to_json()["status"], "already_sent");
        assert!(!sent.stopped());
        let now = Cancelled { job_id: "k".into(), found: Cancel::Cancelled };
        assert!(now.stopped() && now.to_line() == "k: cancelled");
        assert_eq!(read_ids("a\n\n# note\n b \n"), ["a", "b"]);
    }
}
