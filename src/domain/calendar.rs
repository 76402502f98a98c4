//! WeChat's clock: daily quotas reset at midnight Beijing time (UTC+8), minute quotas at the
//! turn of the minute.

use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, FixedOffset, Timelike, Utc};

fn beijing() -> FixedOffset {
    // UTC+8 is a valid offset; `east_opt` only fails beyond ±24 h.
    FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset"))
}

/// The Beijing calendar day of `now`, as `yyyymmdd` (the daily quota's key).
pub fn beijing_day(now: DateTime<Utc>) -> String {
    now.with_timezone(&beijing()).format("%Y%m%d").to_string()
}

/// Time from `now` to the next midnight in Beijing.
pub fn until_beijing_midnight(now: DateTime<Utc>) -> Duration {
    let local = now.with_timezone(&beijing());
    let next = (local.date_naive() + ChronoDuration::days(1)).and_hms_opt(0, 0, 0).unwrap_or_default();
    let wait = next - local.naive_local();
    wait.to_std().unwrap_or(Duration::from_secs(1))
}

/// Time from `now` to the start of the next minute.
pub fn until_next_minute(now: DateTime<Utc>) -> Duration {
    let into = Duration::from_secs(now.second() as u64) + Duration::from_nanos(now.nanosecond() as u64 % 1_000_000_000);
    Duration::from_secs(60).saturating_sub(into).max(Duration::from_millis(1))
}

/// The quota day: a Beijing calendar day, or a shorter "day" for tests and demos (the count
/// resets every `length`, aligned on Beijing midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaDay {
    length_secs: u64,
}

impl QuotaDay {
    pub const BEIJING: QuotaDay = QuotaDay { length_secs: 86_400 };

    pub fn with_length(length_secs: u64) -> Self {
        Self { length_secs: length_secs.max(1) }
    }

    /// The name of the day `now` falls in: `yyyymmdd` for real days, a counter for short ones.
    pub fn key(&self, now: DateTime<Utc>) -> String {
        if self.length_secs == 86_400 {
            beijing_day(now)
        } else {
            let beijing_secs = now.timestamp() + 8 * 3600;
            format!("d{}", beijing_secs.div_euclid(self.length_secs as i64))
        }
    }

    /// Time from `now` until the count resets.
    pub fn until_reset(&self, now: DateTime<Utc>) -> Duration {
        if self.length_secs == 86_400 {
            return until_beijing_midnight(now);
        }
        let len_ms = self.length_secs as i64 * 1000;
        let into = (now.timestamp_millis() + 8 * 3_600_000).rem_euclid(len_ms);
        Duration::from_millis((len_ms - into) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_beijing_day_turns_at_16_utc() {
        assert_eq!(beijing_day(t("2026-11-29T15:59:59Z")), "20261129");
        assert_eq!(beijing_day(t("2026-11-29T16:00:00Z")), "20261130");
        assert_eq!(until_beijing_midnight(t("2026-11-29T15:00:00Z")), Duration::from_secs(3600));
        assert_eq!(until_beijing_midnight(t("2026-11-29T16:00:00Z")), Duration::from_secs(24 * 3600));
    }

    #[test]
    fn short_quota_days_turn_over_on_their_own_clock() {
        let day = QuotaDay::with_length(10);
        let a = t("2026-11-29T15:00:01Z");
        let b = t("2026-11-29T15:00:09Z");
        let c = t("2026-11-29T15:00:11Z");
        assert_eq!(day.key(a), day.key(b));
        assert_ne!(day.key(b), day.key(c));
        assert_eq!(day.until_reset(a), Duration::from_secs(9));
        assert_eq!(QuotaDay::BEIJING.key(a), "20261129");
        assert_eq!(QuotaDay::BEIJING.until_reset(a), Duration::from_secs(3599));
    }

    #[test]
    fn the_next_minute() {
        assert_eq!(until_next_minute(t("2026-11-29T15:00:45Z")), Duration::from_secs(15));
        assert_eq!(until_next_minute(t("2026-11-29T15:00:59.500Z")), Duration::from_millis(500));
    }
}
