//! The pool's shared send budget per account: the rate limiter (GCRA), the daily quota, and
//! account-wide pauses (after 45011 until the next minute, after 45009 or a spent daily quota
//! until midnight Beijing time).

use std::time::Duration;

use super::{Redis, StoreError, millis, scripts};

/// An account-wide pause, as stored under [`Keys::pause`](super::Keys::pause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// Why, for logs, results and `wxpush-ctl status`.
    pub why: String,
    /// Parked pauses (a spent daily quota, 45009) last until the quota resets and their jobs
    /// are announced to downstream; the others (45011) last a minute and their jobs just wait.
    pub parked: bool,
}

impl Pause {
    /// As stored: `park|why` or `wait|why`.
    fn encode(&self) -> String {
        format!("{}|{}", if self.parked { "park" } else { "wait" }, self.why)
    }

    /// A stored value without the `park|`/`wait|` mark (an older wxpush's) is a wait.
    fn decode(raw: &str) -> Pause {
        match raw.split_once('|') {
            Some(("park", why)) => Pause { why: why.to_owned(), parked: true },
            Some((_, why)) => Pause { why: why.to_owned(), parked: false },
            None => Pause { why: raw.to_owned(), parked: false },
        }
    }
}

impl Redis {
    /// Pauses the account for `for_`, unless it is already paused for longer.
    pub async fn pause_account(&self, appid: &str, for_: Duration, pause: &Pause) -> Result<(), StoreError> {
        let _: i64 = scripts::PAUSE
            .key(self.keys().pause(appid))
            .arg(millis(for_))
            .arg(pause.encode())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The account's pause, if any: what is left of it and why.
    pub async fn account_pause(&self, appid: &str) -> Result<Option<(Duration, Pause)>, StoreError> {
        let (raw, ttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(self.keys().pause(appid))
            .cmd("PTTL")
            .arg(self.keys().pause(appid))
            .query_async(&mut self.conn())
            .await?;
        Ok(match raw {
            Some(raw) if ttl > 0 => Some((Duration::from_millis(ttl as u64), Pause::decode(&raw))),
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

impl Redis {
    /// Asks for one send of `appid` under `budget`, counting it in the quota day `day`.
    pub async fn admit(&self, appid: &str, budget: &Budget, day: &str) -> Result<Admission, StoreError> {
        let interval_us = if budget.rate == 0 { 0 } else { 1_000_000 / budget.rate as u64 };
        let tolerance_us = interval_us * budget.burst as u64;
        let (code, value): (i64, i64) = scripts::ADMIT
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_stored_with_its_kind() {
        for parked in [true, false] {
            let pause = Pause { why: "45009: a|b".into(), parked };
            assert_eq!(Pause::decode(&pause.encode()), pause);
        }
        assert_eq!(Pause { why: "x".into(), parked: true }.encode(), "park|x");
        assert_eq!(Pause::decode("quota spent"), Pause { why: "quota spent".into(), parked: false });
    }
}
