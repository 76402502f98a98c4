//! Access tokens: `/cgi-bin/token` (classic) and `/cgi-bin/stable_token`, isolated from each
//! other as WeChat documents ("完全隔离，互不影响").

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::{Rng, distr::Alphanumeric};

/// A second forced refresh within this is not a refresh ("至少间隔30s，否则不会刷新").
pub(super) const FORCE_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

const TOKEN_LEN: usize = 136;

struct TokenRecord {
    account: usize,
    expires_at: Instant,
    /// Earlier than `expires_at` once a newer token replaced this one: the overlap's end.
    valid_until: Instant,
}

#[derive(Default)]
struct AccountTokens {
    classic: Option<Arc<str>>,
    stable: Option<Arc<str>>,
    last_force: Option<Instant>,
}

/// What a send's `access_token` turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenCheck {
    Valid(usize),
    /// Unknown, revoked, or replaced and past the overlap: 40001.
    Invalid,
    /// Past its `expires_in`: 42001.
    Expired,
}

/// A token handed out by a token call.
pub(super) struct Issued {
    pub token: Arc<str>,
    pub expires_in: u64,
    /// A new token, rather than the current one again.
    pub new: bool,
}

pub(super) struct TokenStore {
    map: HashMap<Arc<str>, TokenRecord>,
    accounts: Vec<AccountTokens>,
    /// Forgotten tokens answer 40001 instead of 42001, so they are kept a while after their end;
    /// the map is swept whenever it has doubled since the last sweep.
    sweep_at: usize,
}

impl TokenStore {
    pub fn new(accounts: usize) -> Self {
        Self {
            map: HashMap::new(),
            accounts: (0..accounts).map(|_| AccountTokens::default()).collect(),
            sweep_at: 1024,
        }
    }

    pub fn check(&self, token: &str, now: Instant) -> TokenCheck {
        match self.map.get(token) {
            None => TokenCheck::Invalid,
            Some(r) if now >= r.expires_at => TokenCheck::Expired,
            // A replaced token: WeChat's 40001 errmsg says "invalid or not latest".
            Some(r) if now >= r.valid_until => TokenCheck::Invalid,
            Some(r) => TokenCheck::Valid(r.account),
        }
    }

    /// `/cgi-bin/token`: every call issues a new token; the previous one lives `overlap` more.
    pub fn classic(&mut self, account: usize, now: Instant, lifetime: Duration, overlap: Duration) -> Issued {
        let token = self.issue(account, now, lifetime);
        let previous = self.accounts.get_mut(account).and_then(|a| a.classic.replace(token.clone()));
        self.cut_short(previous, now + overlap);
        Issued { token, expires_in: lifetime.as_secs(), new: true }
    }

    /// `/cgi-bin/stable_token`.
    pub fn stable(
        &mut self,
        account: usize,
        force_refresh: bool,
        now: Instant,
        lifetime: Duration,
        overlap: Duration,
    ) -> Issued {
        let Some(state) = self.accounts.get(account) else {
            // Not reachable: callers pass an index of a configured account.
            return Issued { token: Arc::from(""), expires_in: 0, new: false };
        };
        let current = state.stable.as_ref().and_then(|t| {
            let r = self.map.get(t)?;
            (now < r.expires_at && now < r.valid_until).then(|| (t.clone(), r.expires_at - now))
        });
        let recently_forced = state.last_force.is_some_and(|at| now.duration_since(at) < FORCE_REFRESH_INTERVAL);
        // A force within 30 s of the last one is treated as normal mode ("否则不会刷新").
        let force = force_refresh && !recently_forced;
        if !force && let Some((token, left)) = &current {
            // Normal mode: the same token while more than the overlap is left, so that every
            // token handed out has `expires_in >= overlap`.
            if *left > overlap {
                return Issued { token: token.clone(), expires_in: left.as_secs(), new: false };
            }
        }
        let token = self.issue(account, now, lifetime);
        let previous = self.accounts.get_mut(account).and_then(|a| {
            if force {
                a.last_force = Some(now);
            }
            a.stable.replace(token.clone())
        });
        if force {
            // Forced: the old token lives `overlap` more. Normal-mode refresh: until its own end.
            self.cut_short(previous, now + overlap);
        }
        Issued { token, expires_in: lifetime.as_secs(), new: true }
    }

    /// Every token issued so far becomes unknown (40001).
    pub fn revoke_all(&mut self) {
        self.map.clear();
        for a in &mut self.accounts {
            *a = AccountTokens::default();
        }
    }

    fn cut_short(&mut self, token: Option<Arc<str>>, until: Instant) {
        if let Some(r) = token.and_then(|t| self.map.get_mut(&t)) {
            r.valid_until = r.valid_until.min(until);
        }
    }

    fn issue(&mut self, account: usize, now: Instant, lifetime: Duration) -> Arc<str> {
        if self.map.len() >= self.sweep_at {
            // Keep a token for one more lifetime after its end, to answer 42001 rather than 40001.
            self.map.retain(|_, r| now < r.expires_at.min(r.valid_until) + lifetime);
            self.sweep_at = (self.map.len() * 2).max(1024);
        }
        let token: String = rand::rng().sample_iter(Alphanumeric).take(TOKEN_LEN).map(char::from).collect();
        let token: Arc<str> = token.into();
        let expires_at = now + lifetime;
        self.map.insert(token.clone(), TokenRecord { account, expires_at, valid_until: expires_at });
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFE: Duration = Duration::from_secs(7200);
    const OVERLAP: Duration = Duration::from_secs(300);

    #[test]
    fn classic_rotation_keeps_the_previous_token_for_the_overlap() {
        let mut s = TokenStore::new(1);
        let t0 = Instant::now();
        let a = s.classic(0, t0, LIFE, OVERLAP).token;
        let b = s.classic(0, t0 + Duration::from_secs(10), LIFE, OVERLAP).token;
        assert_ne!(a, b);
        assert_eq!(s.check(&a, t0 + Duration::from_secs(309)), TokenCheck::Valid(0));
        assert_eq!(s.check(&a, t0 + Duration::from_secs(311)), TokenCheck::Invalid);
        assert_eq!(s.check(&b, t0 + Duration::from_secs(311)), TokenCheck::Valid(0));
        assert_eq!(s.check(&b, t0 + Duration::from_secs(7211)), TokenCheck::Expired);
    }

    #[test]
    fn stable_token_is_the_same_until_the_overlap_then_new() {
        let mut s = TokenStore::new(1);
        let t0 = Instant::now();
        let a = s.stable(0, false, t0, LIFE, OVERLAP);
        assert!(a.new);
        let again = s.stable(0, false, t0 + Duration::from_secs(1000), LIFE, OVERLAP);
        assert!(!again.new);
        assert_eq!(again.token, a.token);
        assert_eq!(again.expires_in, 6200);
        let late = t0 + Duration::from_secs(7000);
        let b = s.stable(0, false, late, LIFE, OVERLAP);
        assert!(b.new);
        assert_ne!(b.token, a.token);
        assert_eq!(s.check(&a.token, late + Duration::from_secs(199)), TokenCheck::Valid(0));
        assert_eq!(s.check(&a.token, late + Duration::from_secs(200)), TokenCheck::Expired);
    }

    #[test]
    fn force_refresh_only_every_30_seconds_and_isolated_from_classic() {
        let mut s = TokenStore::new(1);
        let t0 = Instant::now();
        let classic = s.classic(0, t0, LIFE, OVERLAP).token;
        let a = s.stable(0, false, t0, LIFE, OVERLAP).token;
        let b = s.stable(0, true, t0 + Duration::from_secs(1), LIFE, OVERLAP);
        assert!(b.new);
        let c = s.stable(0, true, t0 + Duration::from_secs(20), LIFE, OVERLAP);
        assert!(!c.new);
        assert_eq!(c.token, b.token);
        let d = s.stable(0, true, t0 + Duration::from_secs(32), LIFE, OVERLAP);
        assert!(d.new);
        assert_eq!(s.check(&a, t0 + Duration::from_secs(302)), TokenCheck::Invalid);
        assert_eq!(s.check(&classic, t0 + Duration::from_secs(302)), TokenCheck::Valid(0));
    }

    #[test]
    fn revoked_tokens_are_unknown_and_not_handed_out_again() {
        let mut s = TokenStore::new(1);
        let t0 = Instant::now();
        let a = s.stable(0, false, t0, LIFE, OVERLAP).token;
        s.revoke_all();
        assert_eq!(s.check(&a, t0), TokenCheck::Invalid);
        let b = s.stable(0, false, t0, LIFE, OVERLAP);
        assert!(b.new);
        assert_ne!(b.token, a);
    }
}
