//! How long to wait before trying again, for every loop that retries: the worker's send
//! retries and RabbitMQ reconnects, the token protocol, the store's retries and polls, the
//! webhook's waits. It sits at the crate root rather than in one adapter because all of them
//! use it, and one unit keeps them agreeing on what "jitter" means.
//!
//! **Jitter.** A jittered wait of `base` is a random wait between `base` and twice `base` (1.5×
//! on average). It never waits less than `base`, so a wait for something to run out (a lease, a
//! pause, another process's fetch) is never cut short; the random extra keeps a pool of
//! processes from moving in lockstep. backon's jitter has the same range.
//!
//! The schedule is computed here, in nanoseconds, rather than by backon's `ExponentialBuilder`,
//! whose `f32` arithmetic turns 20 ms doubled into 39.999999 ms; backon still does the retrying
//! where a loop is a plain "call until it works" ([`Backoff`] is a `backon::BackoffBuilder`).

use std::time::Duration;

use backon::BackoffBuilder;

/// An exponential schedule: `min` after the first failure, then `factor` times the previous
/// wait, never more than `max` (which wins over `min`); each wait [`jittered`] unless built [`without_jitter`]. `max`
/// bounds the schedule before jitter, so a jittered wait may reach twice `max`.
///
/// [`without_jitter`]: Backoff::without_jitter
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    factor: f32,
    jitter: bool,
}

impl Backoff {
    /// Doubling from `min` up to `max`, jittered.
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, factor: 2.0, jitter: true }
    }

    /// Multiplies each wait by `factor` (at least 1) instead of 2.
    pub const fn with_factor(mut self, factor: f32) -> Backoff {
        self.factor = if factor < 1.0 { 1.0 } else { factor };
        self
    }

    /// Exact waits: for a schedule the whole pool shares (stored once in Redis), or a poll
    /// whose waiters are already spread by when they arrived.
    pub const fn without_jitter(mut self) -> Backoff {
        self.jitter = false;
        self
    }

    /// The waits after each failure in a row; endless, the last repeating.
    pub fn delays(&self) -> Delays {
        Delays { backoff: *self, last: None }
    }

    /// The wait after the `failures`-th failure in a row (1 = the first; 0 counts as 1).
    pub fn after(&self, failures: u32) -> Duration {
        let mut wait = self.first();
        for _ in 1..failures {
            if wait >= self.max {
                break;
            }
            wait = self.following(wait);
        }
        self.spread(wait)
    }

    /// The un-jittered first wait.
    fn first(&self) -> Duration {
        self.min.min(self.max)
    }

    /// The un-jittered wait after `wait`.
    fn following(&self, wait: Duration) -> Duration {
        let next = (wait.as_nanos() as f64 * f64::from(self.factor)).round();
        // `as` saturates; u64 nanoseconds are over 500 years.
        Duration::from_nanos(next as u64).min(self.max)
    }

    fn spread(&self, wait: Duration) -> Duration {
        if self.jitter { jittered(wait) } else { wait }
    }
}

/// The waits of one run of failures ([`Backoff::delays`]). Also a backon backoff, for
/// `backon::Retryable::retry`.
#[derive(Debug)]
pub struct Delays {
    backoff: Backoff,
    /// The last wait, un-jittered; None before the first.
    last: Option<Duration>,
}

impl Delays {
    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let wait = match self.last {
            None => self.backoff.first(),
            Some(last) => self.backoff.following(last),
        };
        self.last = Some(wait);
        self.backoff.spread(wait)
    }

    /// Starts over from `min`, after a success.
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// Sleeps the next wait, cut short at `deadline`; false (at once) when the deadline has
    /// passed: for a loop that looks again until a deadline.
    pub async fn sleep_within(&mut self, deadline: tokio::time::Instant) -> bool {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(self.next_delay().min(left)).await;
        true
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl BackoffBuilder for Backoff {
    type Backoff = Delays;

    fn build(self) -> Delays {
        self.delays()
    }
}

/// `base` plus a random extra of up to `base`: between 1× and 2× `base`.
pub fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_schedule_multiplies_up_to_its_bound() {
        let exact = Backoff::new(100 * MS, 1000 * MS).without_jitter();
        let waits: Vec<u128> = exact.delays().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        let after: Vec<u128> = (1..=6).map(|n| exact.after(n).as_millis()).collect();
        assert_eq!(after, waits, "after(n) is the n-th wait of delays()");
        assert_eq!(exact.after(0), 100 * MS);
        // A long run of failures costs no more than reaching the bound.
        assert_eq!(exact.after(u32::MAX), 1000 * MS);
        let slow: Vec<u128> = exact.with_factor(1.5).delays().take(4).map(|d| d.as_millis()).collect();
        assert_eq!(slow, [100, 150, 225, 337]);
        // A factor below 1 would shrink the waits: it is taken as 1.
        assert_eq!(exact.with_factor(0.5).after(5), 100 * MS);
        // A bound below the start: the bound holds.
        assert_eq!(Backoff::new(50 * MS, 10 * MS).without_jitter().after(1), 10 * MS);
        assert_eq!(Backoff::new(50 * MS, 10 * MS).without_jitter().delays().next(), Some(10 * MS));
    }

    #[test]
    fn jitter_adds_up_to_the_whole_wait_and_never_takes_away() {
        let (mut low, mut high) = (false, false);
        for _ in 0..2000 {
            let d = jittered(1000 * MS);
            assert!((1000 * MS..2000 * MS).contains(&d), "{d:?}");
            low |= d < 1250 * MS;
            high |= d > 1750 * MS;
        }
        assert!(low && high, "the extra is spread over the whole range");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
        let jittered_schedule = Backoff::new(100 * MS, 400 * MS);
        for (n, base) in [(1, 100), (2, 200), (3, 400), (9, 400)] {
            let d = jittered_schedule.after(n);
            assert!((base * MS..2 * base * MS).contains(&d), "after({n}) = {d:?}");
        }
    }

    #[test]
    fn a_reset_starts_over() {
        let mut delays = Backoff::new(10 * MS, 80 * MS).without_jitter().delays();
        assert_eq!((delays.next_delay(), delays.next_delay(), delays.next_delay()), (10 * MS, 20 * MS, 40 * MS));
        delays.reset();
        assert_eq!(delays.next(), Some(10 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn sleeping_within_a_deadline_stops_at_it() {
        let start = tokio::time::Instant::now();
        let deadline = start + 250 * MS;
        let mut delays = Backoff::new(100 * MS, 1000 * MS).without_jitter().delays();
        let mut woke = Vec::new();
        while delays.sleep_within(deadline).await {
            woke.push((tokio::time::Instant::now() - start).as_millis());
        }
        // 100, then 200 cut to the 150 left; then the deadline has passed.
        assert_eq!(woke, [100, 250]);
        assert_eq!(tokio::time::Instant::now(), deadline, "no sleep once the deadline is reached");
    }

    #[tokio::test(start_paused = true)]
    async fn it_drives_backons_retry() {
        use backon::Retryable;
        let mut calls = 0;
        let start = tokio::time::Instant::now();
        let result: Result<u32, &str> = (|| {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err("not yet") } else { Ok(n) } }
        })
        .retry(Backoff::new(50 * MS, 1000 * MS).without_jitter())
        .await;
        assert_eq!(result, Ok(3));
        assert_eq!((tokio::time::Instant::now() - start).as_millis(), 150, "50 + 100");
    }
}
