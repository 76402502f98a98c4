//! The pool's shared send budget per account: the rate limiter (GCRA), the daily quota, and
//! account-wide pauses (after 45011 until the next minute, after 45009 or a spent daily quota
//! until midnight Beijing time).

use std::{sync::LazyLock, time::Duration};

use redis::Script;

use super::{Redis, StoreError};

/// Sets the pause unless a longer one is already set: a 45011 must not shorten a 45009 parking.
static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1]) return 1 end
        return 0
        ",
    )
});

impl Redis {
    /// Pauses the account for `for_`, unless it is already paused for longer.
    pub async fn pause_account(&self, appid: &str, for_: Duration, reason: &str) -> Result<(), StoreError> {
        let ms = for_.as_millis().max(1) as u64;
        let _: i64 = PAUSE.key(self.keys().pause(appid)).arg(ms).arg(reason).invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    /// The account's pause, if any: what is left of it and why.
    pub async fn account_pause(&self, appid: &str) -> Result<Option<(Duration, String)>, StoreError> {
        let (reason, ttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(self.keys().pause(appid))
            .cmd("PTTL")
            .arg(self.keys().pause(appid))
            .query_async(&mut self.conn())
            .await?;
        Ok(match reason {
            Some(r) if ttl > 0 => Some((Duration::from_millis(ttl as u64), r)),
            _ => None,
        })
    }
}

/// The pool-wide send budget of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Sends per second; 0 = no rate limit.
    pub rate: u32,
    /// Sends allowed back to back after an idle spell; the most any 1-second window can see is
    /// `rate + burst - 1`.
    pub burst: u32,
    /// Sends per quota day; 0 = none kept.
    pub daily_quota: u64,
}

impl Budget {
    pub fn new(rate: u32, burst_fraction: f64, daily_quota: u64) -> Self {
        let burst = ((rate as f64) * burst_fraction).floor().max(1.0) as u32;
        Self { rate, burst, daily_quota }
    }

    pub fn is_unlimited(&self) -> bool {
        self.rate == 0 && self.daily_quota == 0
    }
}

/// The limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send now (and the send is counted against the day's quota).
    Granted,
    /// The rate is spent: ask again after this long.
    Wait(Duration),
    /// The day's quota is spent: `used` sends counted.
    QuotaSpent { used: u64 },
}

/// GCRA (one stored number per account: the theoretical arrival time, in µs of Redis' clock, so
/// worker clocks do not matter) and the daily count, in one round trip. KEYS: rate, quota.
/// ARGV: emission interval µs (0 = no rate), burst tolerance µs, quota (0 = none), quota TTL s.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local quota = tonumber(ARGV[3])
        if quota > 0 then
            local used = tonumber(redis.call('GET', KEYS[2]) or '0')
            if used >= quota then return {2, used} end
        end
        local interval = tonumber(ARGV[1])
        if interval > 0 then
            local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
            if tat < now then tat = now end
            local new_tat = tat + interval
            local allow_at = new_tat - tonumber(ARGV[2])
            if now < allow_at then return {1, allow_at - now} end
            -- %.0f keeps all digits; tostring would round a 16-digit number.
            redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
        end
        if quota > 0 then
            redis.call('INCR', KEYS[2])
            redis.call('EXPIRE', KEYS[2], ARGV[4])
        end
        return {0, 0}
        ",
    )
});

impl Redis {
    /// Asks for one send of `appid` under `budget`, counting it in the quota day `day`.
    pub async fn admit(&self, appid: &str, budget: &Budget, day: &str) -> Result<Admission, StoreError> {
        let interval_us = if budget.rate == 0 { 0 } else { 1_000_000 / budget.rate as u64 };
        let tolerance_us = interval_us * budget.burst as u64;
        let (code, value): (i64, i64) = ADMIT
            .key(self.keys().rate(appid))
            .key(self.keys().quota(appid, day))
            .arg(interval_us)
            .arg(tolerance_us)
            .arg(budget.daily_quota)
            .arg(3 * 86_400)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(match code {
            0 => Admission::Granted,
            1 => Admission::Wait(Duration::from_micros(value.max(1) as u64)),
            _ => Admission::QuotaSpent { used: value.max(0) as u64 },
        })
    }

    /// Sends counted on quota day `day`.
    pub async fn quota_used(&self, appid: &str, day: &str) -> Result<u64, StoreError> {
        let used: Option<u64> =
            redis::cmd("GET").arg(self.keys().quota(appid, day)).query_async(&mut self.conn()).await?;
        Ok(used.unwrap_or(0))
    }
}
