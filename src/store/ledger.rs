//! The lease/done protocol, and the idempotency ledger built on it: one record per job_id,
//! either an in-progress lease held by the worker sending it, or the job's recorded result.
//! And the msgid records that tie WeChat's receipts back to jobs.
//!
//! A job is sent only by the worker that holds its lease. Once sent, its result is recorded
//! before it is published, so a redelivery (a crash between publish and ack) or a duplicate
//! publish finds the result and publishes it again instead of sending a second message. The
//! webhook publishes each pushed event once by the same protocol ([`super::dedupe`]).

use std::time::Duration;

use super::{Redis, StoreError, millis, scripts};

/// What a claim on a record of the lease/done protocol finds. The record holds `P<owner>`
/// while someone holds its lease and `D<payload>` once the work is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours: do the work.
    Claimed,
    /// The work is done: what was recorded with it (a job's result JSON; nothing for a pushed
    /// event). Do nothing but answer with it.
    Done(Vec<u8>),
    /// Someone else holds the lease (a duplicate in flight, or a crashed holder whose lease has
    /// not yet run out): look again after `retry_after`.
    Busy { retry_after: Duration },
    /// An operator cancelled the job (`wxpush-ctl cancel`): do nothing but say so.
    Cancelled,
}

/// What cancelling a job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// No worker has it now: whenever it is delivered (again), it ends `cancelled`.
    Cancelled,
    AlreadyCancelled,
    /// It was sent: its recorded result. Nothing changes.
    AlreadyDone(Vec<u8>),
    /// A worker holds it right now and may be sending it: nothing changes; ask again.
    InFlight,
}

/// A busy record is looked at again after what is left of its lease, within these bounds.
const BUSY_RETRY_MIN_MS: i64 = 50;
const BUSY_RETRY_MAX_MS: i64 = 60_000;

impl Redis {
    /// Claims the record `key` for `owner` for `lease`, reading the key `also` (when given) in
    /// the same round trip.
    pub(super) async fn claim(
        &self,
        key: &str,
        owner: &str,
        lease: Duration,
        also: Option<&str>,
    ) -> Result<(Claim, Option<String>), StoreError> {
        // Nearly every record is new: a plain SET NX settles it, cheaper for Redis than the
        // script, which only runs when the record exists (a duplicate, a redelivery, a retry).
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(key).arg(format!("P{owner}")).arg("NX").arg("PX").arg(millis(lease));
        let (fresh, found): (Option<String>, Option<String>) = match also {
            Some(also) => pipe.cmd("GET").arg(also).query_async(&mut self.conn()).await?,
            None => {
                let (fresh,): (Option<String>,) = pipe.query_async(&mut self.conn()).await?;
                (fresh, None)
            }
        };
        let claim = if fresh.is_some() { Claim::Claimed } else { self.claim_existing(key, owner, lease).await? };
        Ok((claim, found))
    }

    /// [`claim`](Self::claim) of a record that exists, or did a moment ago.
    pub(super) async fn claim_existing(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, StoreError> {
        let (code, payload): (i64, Vec<u8>) =
            scripts::CLAIM.key(key).arg(owner).arg(millis(lease)).invoke_async(&mut self.conn()).await?;
        Ok(match code {
            0 => Claim::Claimed,
            1 => Claim::Done(payload),
            3 => Claim::Cancelled,
            _ => {
                let ttl = std::str::from_utf8(&payload).ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
                Claim::Busy {
                    retry_after: Duration::from_millis(ttl.clamp(BUSY_RETRY_MIN_MS, BUSY_RETRY_MAX_MS) as u64),
                }
            }
        })
    }

    /// Gives up `owner`'s lease on `key`, if it is still theirs.
    pub(super) async fn release_lease(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        self.compare_and_delete(key, &format!("P{owner}")).await.map(drop)
    }

    /// Records the work on `key` done, with `payload`, for `ttl`, in `pipe`.
    pub(super) fn record_done(pipe: &mut redis::Pipeline, key: &str, payload: &[u8], ttl: Duration) {
        let mut value = Vec::with_capacity(payload.len() + 1);
        value.push(b'D');
        value.extend_from_slice(payload);
        pipe.cmd("SET").arg(key).arg(value).arg("PX").arg(millis(ttl)).ignore();
    }

    /// Asks for the lease on `job_id` for `lease`.
    pub async fn claim_job(&self, job_id: &str, owner: &str, lease: Duration) -> Result<Claim, StoreError> {
        Ok(self.claim(&self.keys().job(job_id), owner, lease, None).await?.0)
    }

    /// Cancels `job_id` pool-wide for `ttl` (the ledger's), unless it is sent or being sent.
    pub async fn cancel_job(&self, job_id: &str, ttl: Duration) -> Result<Cancel, StoreError> {
        let (code, payload): (i64, Vec<u8>) =
            scripts::CANCEL.key(self.keys().job(job_id)).arg(millis(ttl)).invoke_async(&mut self.conn()).await?;
        Ok(match code {
            0 => Cancel::Cancelled,
            1 => Cancel::AlreadyCancelled,
            2 => Cancel::AlreadyDone(payload),
            _ => Cancel::InFlight,
        })
    }

    /// Extends our lease on `job_id` to `lease` from now; false when it is no longer ours.
    pub async fn renew_job(&self, job_id: &str, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let renewed: i64 = scripts::RENEW
            .key(self.keys().job(job_id))
            .arg(owner)
            .arg(millis(lease))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(renewed == 1)
    }

    /// Records a sent job: its result for `result_ttl`, and msgid → job_id for `msgid_ttl`.
    /// One round trip.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_sent(
        &self,
        job_id: &str,
        result_json: &[u8],
        result_ttl: Duration,
        appid: &str,
        msgid: u64,
        msgid_ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        Self::record_done(&mut pipe, &self.keys().job(job_id), result_json, result_ttl);
        pipe.cmd("SET").arg(self.keys().msgid(appid, msgid)).arg(job_id).arg("PX").arg(millis(msgid_ttl)).ignore();
        let _: () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Gives up our lease (the job failed, or waits for a later attempt), so that the next
    /// delivery of the job may claim it at once.
    pub async fn release_job(&self, job_id: &str, owner: &str) -> Result<(), StoreError> {
        self.release_lease(&self.keys().job(job_id), owner).await
    }

    /// The job_id that WeChat's `msgid` belongs to, if the worker recorded it.
    pub async fn job_for_msgid(&self, appid: &str, msgid: u64) -> Result<Option<String>, StoreError> {
        let job: Option<String> =
            redis::cmd("GET").arg(self.keys().msgid(appid, msgid)).query_async(&mut self.conn()).await?;
        Ok(job)
    }
}
