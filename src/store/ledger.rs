//! The idempotency ledger: one record per job_id, either an in-progress lease held by the
//! worker sending it, or the job's recorded result. And the msgid records that tie WeChat's
//! receipts back to jobs.
//!
//! A job is sent only by the worker that holds its lease. Once sent, its result is recorded
//! before it is published, so a redelivery (a crash between publish and ack) or a duplicate
//! publish finds the result and publishes it again instead of sending a second message.

use std::{sync::LazyLock, time::Duration};

use redis::Script;

use super::{Redis, StoreError};

/// What a worker finds when it asks for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours: send the job.
    Claimed,
    /// The job already has a result (the recorded result JSON): publish it again, send nothing.
    Done(Vec<u8>),
    /// Another worker holds the lease (a duplicate in flight, or a crashed worker whose lease has
    /// not yet run out): look again after `retry_after`.
    Busy { retry_after: Duration },
}

/// Values are `P<owner>` (a lease) or `D<result json>` (done).
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then
            redis.call('SET', KEYS[1], 'P' .. ARGV[1], 'PX', ARGV[2])
            return {0, ''}
        end
        local kind = string.sub(v, 1, 1)
        if kind == 'D' then return {1, string.sub(v, 2)} end
        if v == 'P' .. ARGV[1] then
            redis.call('PEXPIRE', KEYS[1], ARGV[2])
            return {0, ''}
        end
        return {2, tostring(redis.call('PTTL', KEYS[1]))}
        ",
    )
});

/// Drops a lease only if it is still ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == 'P' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        ",
    )
});

/// Extends a lease only if it is still ours.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == 'P' .. ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
        return 0
        ",
    )
});

impl Redis {
    /// Asks for the lease on `job_id` for `lease`.
    pub async fn claim_job(&self, job_id: &str, owner: &str, lease: Duration) -> Result<Claim, StoreError> {
        // Nearly every job is new: a plain SET NX settles it, cheaper for Redis than the script,
        // which only runs when the key exists (a duplicate, a redelivery, a retry of ours).
        let fresh: Option<String> = redis::cmd("SET")
            .arg(self.keys().job(job_id))
            .arg(format!("P{owner}"))
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis().max(1) as u64)
            .query_async(&mut self.conn())
            .await?;
        if fresh.is_some() {
            return Ok(Claim::Claimed);
        }
        let (code, payload): (i64, Vec<u8>) = CLAIM
            .key(self.keys().job(job_id))
            .arg(owner)
            .arg(lease.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(match code {
            0 => Claim::Claimed,
            1 => Claim::Done(payload),
            _ => {
                let ttl: i64 = std::str::from_utf8(&payload).ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
                Claim::Busy { retry_after: Duration::from_millis(ttl.clamp(50, 60_000) as u64) }
            }
        })
    }

    /// Extends our lease on `job_id` to `lease` from now; false when it is no longer ours.
    pub async fn renew_job(&self, job_id: &str, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let renewed: i64 = RENEW
            .key(self.keys().job(job_id))
            .arg(owner)
            .arg(lease.as_millis().max(1) as u64)
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
        let mut value = Vec::with_capacity(result_json.len() + 1);
        value.push(b'D');
        value.extend_from_slice(result_json);
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(self.keys().job(job_id))
            .arg(value)
            .arg("PX")
            .arg(result_ttl.as_millis() as u64)
            .ignore()
            .cmd("SET")
            .arg(self.keys().msgid(appid, msgid))
            .arg(job_id)
            .arg("PX")
            .arg(msgid_ttl.as_millis() as u64)
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Gives up our lease (the job failed, or waits for a later attempt), so that the next
    /// delivery of the job may claim it at once.
    pub async fn release_job(&self, job_id: &str, owner: &str) -> Result<(), StoreError> {
        let _: i64 = RELEASE.key(self.keys().job(job_id)).arg(owner).invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    /// The job_id that WeChat's `msgid` belongs to, if the worker recorded it.
    pub async fn job_for_msgid(&self, appid: &str, msgid: u64) -> Result<Option<String>, StoreError> {
        let job: Option<String> =
            redis::cmd("GET").arg(self.keys().msgid(appid, msgid)).query_async(&mut self.conn()).await?;
        Ok(job)
    }
}
