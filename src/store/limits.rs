//! Account-wide pauses shared by the pool: after 45011 (minute quota) until the next minute,
//! after 45009 or a spent daily quota until midnight Beijing time.

use std::time::Duration;

use super::{Redis, StoreError};

impl Redis {
    /// Pauses the account for `for_`, unless it is already paused for longer.
    pub async fn pause_account(&self, appid: &str, for_: Duration, reason: &str) -> Result<(), StoreError> {
        let ms = for_.as_millis().max(1) as u64;
        // Keep the longer pause: a 45011 must not shorten a 45009 parking.
        let _: i64 = redis::Script::new(
            r"
            local ttl = redis.call('PTTL', KEYS[1])
            if ttl < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1]) return 1 end
            return 0
            ",
        )
        .key(self.keys().pause(appid))
        .arg(ms)
        .arg(reason)
        .invoke_async(&mut self.conn())
        .await?;
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
