//! Every Redis key the programs use, in one place. The formats are part of running pools (and
//! named in the README): changing one strands what a running pool has stored.

/// The key names under one prefix (`WXPUSH_REDIS_PREFIX`). Keys of one account carry its hash
/// tag (`{appid}`), so that a script touching several of them runs on Redis Cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A `SCAN MATCH` pattern of every key under the prefix (the prefix's glob characters
    /// escaped).
    pub fn all(&self) -> String {
        format!("{}:*", glob_escape(&self.prefix))
    }

    /// The cached access token of an appid: `<fetched_at_ms>:<token>`.
    pub fn token(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token", self.prefix)
    }

    /// The pool-wide lock held by whoever is fetching a new token (its owner's id).
    pub fn token_lock(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:lock", self.prefix)
    }

    /// Set after a failed token fetch (`<streak>:<until_ms>:<message>`): the pool waits until
    /// then before fetching again.
    pub fn token_failure(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:failure", self.prefix)
    }

    /// Set while WeChat refuses a token and no new one can be had: `<fingerprint>:<why>`.
    pub fn token_refused(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:refused", self.prefix)
    }

    /// Lives one forced-refresh interval after each forced refresh, pool-wide.
    pub fn token_forced(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:token:forced", self.prefix)
    }

    /// Forced refreshes counted on one Beijing day (`yyyymmdd`).
    pub fn token_forced_day(&self, appid: &str, day: &str) -> String {
        format!("{}:{{{appid}}}:token:forced:{day}", self.prefix)
    }

    /// A job's idempotency record: `P<owner>` while a worker holds its lease, `D<result json>`
    /// once sent ([`super::ledger`]).
    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.prefix)
    }

    /// msgid → job_id, for the webhook to tie receipts to jobs.
    pub fn msgid(&self, appid: &str, msgid: u64) -> String {
        format!("{}:{{{appid}}}:msgid:{msgid}", self.prefix)
    }

    /// The rate limiter's state of an appid (the GCRA's theoretical arrival time, µs).
    pub fn rate(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:rate", self.prefix)
    }

    /// Sends counted on one Beijing day (`yyyymmdd`).
    pub fn quota(&self, appid: &str, day: &str) -> String {
        format!("{}:{{{appid}}}:quota:{day}", self.prefix)
    }

    /// Set while an account is paused, for as long as the pause lasts (its TTL): `park|<why>`
    /// (jobs are parked and announced until the pause ends: a spent daily quota, 45009) or
    /// `wait|<why>` (jobs wait: 45011, until the next minute). See [`super::limits::Pause`].
    pub fn pause(&self, appid: &str) -> String {
        format!("{}:{{{appid}}}:pause", self.prefix)
    }

    /// The webhook's de-duplication of one pushed event: `P<owner>` while a push publishes it,
    /// `D` once the broker confirmed it ([`super::dedupe`]).
    pub fn push_seen(&self, appid: &str, event_key: &str) -> String {
        format!("{}:{{{appid}}}:push:{event_key}", self.prefix)
    }
}

/// `s` with the characters a Redis glob pattern gives a meaning escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_account_share_a_hash_tag() {
        let k = Keys::new("wxpush");
        assert_eq!(k.token("wx1"), "wxpush:{wx1}:token");
        assert_eq!(k.token_lock("wx1"), "wxpush:{wx1}:token:lock");
        assert_eq!(k.msgid("wx1", 42), "wxpush:{wx1}:msgid:42");
        assert_eq!(k.job("order-1"), "wxpush:job:order-1");
        assert_eq!(k.pause("wx1"), "wxpush:{wx1}:pause");
        assert_eq!(k.push_seen("wx1", "msg:7"), "wxpush:{wx1}:push:msg:7");
        for key in
            [k.token("wx1"), k.token_lock("wx1"), k.token_failure("wx1"), k.rate("wx1"), k.quota("wx1", "20261129")]
        {
            assert!(key.contains("{wx1}"), "{key}");
        }
    }

    #[test]
    fn the_pattern_of_every_key_takes_the_prefix_literally() {
        assert_eq!(Keys::new("wxpush").all(), "wxpush:*");
        assert_eq!(Keys::new("a*b[c]").all(), "a\\*b\\[c\\]:*");
    }
}
