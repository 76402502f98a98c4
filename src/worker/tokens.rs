//! The access token, shared by every worker process through Redis.
//!
//! The protocol, per appid:
//! - one token cached in Redis; each process also keeps it in memory until it nears expiry, so a
//!   send normally costs no Redis round trip for its token;
//! - a background refresher per process fetches a new token `refresh_ahead` before expiry, so
//!   sends do not wait for a refresh;
//! - fetching is single-flight across the pool: a `SET NX PX` lease with a unique value, a
//!   re-check after acquiring it, release by compare-and-delete; everyone else polls Redis for the
//!   token the holder stores instead of fetching their own;
//! - the refresher decides on the token it saw (its fetch time); under the lock it fetches only
//!   if nobody fetched after that decision, so a pool of any size makes one request per token
//!   lifetime, also when WeChat hands back the same token or tokens live shorter than
//!   `refresh_ahead` (the refresh point is then a sixth of the lifetime before expiry);
//! - on 40001/40014/42001 the failed token is dropped only if Redis still holds it
//!   (compare-and-invalidate), so one bad answer cannot rotate a token someone just fetched;
//! - a forced refresh (when stable_token hands the refused token back) passes a pool-wide gate:
//!   one per `forced_refresh_interval_secs`, `forced_refresh_daily_budget` a day. While the gate
//!   is shut the token is marked refused, and refusals are answered from that mark without
//!   calling WeChat: jobs wait in the delay queues, never in a loop of token requests;
//! - a failed fetch (wrong secret, IP whitelist, WeChat down) is remembered in Redis with a
//!   doubling back-off, so the pool does not burn WeChat's 2,000-a-day token quota in a storm.

use std::{
    collections::HashMap,
    error::Error,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret, SecretString};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::{
    backoff::{Backoff, jittered},
    config::{Account, TokenSettings},
    domain::{calendar, errcode::token_error_advice},
    store::{
        Redis, StoreError,
        token::{ForcedRefresh, StoredToken, fingerprint},
    },
    wechat::{TokenFetchError, TokenGrant, WechatClient},
};

/// A token, cheap to hand to many concurrent sends.
pub type Token = Arc<SecretString>;

/// Longest pause after failed fetches.
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(300);
/// A token with less than this left (or a tenth of its lifetime, if shorter) is not handed to
/// a send.
const MIN_USABLE: Duration = Duration::from_millis(500);
/// A refused token is not asked about again for longer than this, even when the forced-refresh
/// budget is spent: someone may have forced a refresh in the console meanwhile.
const MAX_REFUSAL_MARK: Duration = Duration::from_secs(300);

/// Why no token could be had. The job that asked waits; it is not failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no access token for account {account}: {reason}")]
    Unavailable { account: String, reason: String },
    #[error("no access token for account {account}")]
    Store { account: String, source: StoreError },
    /// WeChat refuses the token, hands the same one back, and no forced refresh is allowed
    /// before `retry_after`.
    #[error(
        "WeChat refuses the access token of account {account} and no new one can be had for {secs:.0} s ({why}); \
         if this lasts, check that no other system uses this appid's secret to fetch tokens",
        secs = retry_after.as_secs_f64()
    )]
    Refused { account: String, why: String, retry_after: Duration },
}

impl TokenError {
    /// When asking again may help, for a refused token.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Refused { retry_after, .. } => Some(*retry_after),
            TokenError::Unavailable { .. } | TokenError::Store { .. } => None,
        }
    }
}

/// Why a fetch under the lock is wanted; the re-check under the lock depends on it.
#[derive(Clone, Copy)]
enum Need<'a> {
    /// No usable token at all.
    Missing,
    /// WeChat refused this token.
    Replace(&'a Token),
    /// The refresher saw the token fetched at this time (None: no token) enter its refresh window.
    Refresh { seen: Option<i64> },
}

struct Local {
    token: Token,
    /// When the token stops being usable, by this process' clock.
    expires_at: Instant,
}

struct AccountTokens {
    account: Account,
    local: RwLock<Option<Local>>,
    /// One fetch or Redis wait at a time in this process; the rest read what it found.
    flight: tokio::sync::Mutex<()>,
    /// `wxpush_token_healthy`: 1 while the account has a token WeChat accepts, 0 after a failed
    /// fetch or a refusal that cannot be remedied; the last value, to log changes once.
    health: metrics::Gauge,
    healthy: std::sync::atomic::AtomicI8,
}

/// Hands out tokens for every configured account.
pub struct TokenManager {
    redis: Redis,
    wechat: WechatClient,
    settings: TokenSettings,
    owner: String,
    accounts: HashMap<String, Arc<AccountTokens>>,
}

impl TokenManager {
    pub fn new(redis: Redis, wechat: WechatClient, settings: TokenSettings, accounts: &[Account]) -> Arc<Self> {
        let accounts = accounts
            .iter()
            .map(|a| {
                let tokens = AccountTokens {
                    account: a.clone(),
                    local: RwLock::new(None),
                    flight: Default::default(),
                    health: metrics::gauge!("wxpush_token_healthy", "account" => a.name.clone()),
                    healthy: std::sync::atomic::AtomicI8::new(-1),
                };
                (a.name.clone(), Arc::new(tokens))
            })
            .collect();
        Arc::new(Self { redis, wechat, settings, owner: uuid::Uuid::new_v4().to_string(), accounts })
    }

    fn refresh_ahead(&self) -> Duration {
        self.settings.refresh_ahead
    }

    fn entry(&self, account: &str) -> Result<&Arc<AccountTokens>, TokenError> {
        self.accounts.get(account).ok_or_else(|| TokenError::Unavailable {
            account: account.into(),
            reason: "the account is not configured".into(),
        })
    }

    /// A usable token for `account`: from memory, else from Redis, else fetched (by this
    /// process or, more likely, by whichever process holds the refresh lock).
    pub async fn get(&self, account: &str) -> Result<Token, TokenError> {
        let entry = self.entry(account)?;
        if let Some(token) = entry.fresh_local() {
            return Ok(token);
        }
        self.obtain(entry, None).await
    }

    /// Reports that WeChat refused `failed` (40001/40014/42001) and returns a token to retry
    /// with: a newer one if someone already replaced it, else one fetched once. A token already
    /// known to be refused with no replacement in reach is answered with
    /// [`TokenError::Refused`] at once, without calling WeChat.
    pub async fn replace(&self, account: &str, failed: &Token) -> Result<Token, TokenError> {
        let entry = self.entry(account)?;
        entry.forget_local(failed);
        let appid = &entry.account.appid;
        let snapshot = self.redis.read_token(appid).await.map_err(|source| entry.store_error(source))?;
        if let Some(refusal) = snapshot.refusal.filter(|r| r.fingerprint == fingerprint(failed)) {
            return Err(entry.refused(refusal.why, refusal.remaining));
        }
        if let Some(t) = snapshot.token.as_ref().filter(|t| usable(t, Some(failed))) {
            return Ok(entry.remember(t));
        }
        let dropped = self.redis.invalidate_token(appid, failed).await.map_err(|source| entry.store_error(source))?;
        if dropped {
            info!(account = %entry.account.name, "access token refused by WeChat; dropped it from the pool's cache");
        }
        self.obtain(entry, Some(failed)).await
    }

    /// Gets a token through Redis, fetching under the pool-wide lock when there is none.
    /// `stale` is a token known to be bad: it is never returned.
    async fn obtain(&self, entry: &AccountTokens, stale: Option<&Token>) -> Result<Token, TokenError> {
        let deadline = Instant::now() + self.settings.wait;
        let _flight = entry.flight.lock().await;
        // Someone in this process may have obtained one while we queued for the flight.
        if let Some(token) = entry.fresh_local().filter(|t| !same(Some(t), stale)) {
            return Ok(token);
        }
        let appid = entry.account.appid.as_str();
        let need = match stale {
            Some(bad) => Need::Replace(bad),
            None => Need::Missing,
        };
        loop {
            let snapshot = self.redis.read_token(appid).await.map_err(|source| entry.store_error(source))?;
            if let Some(t) = snapshot.token.as_ref().filter(|t| usable(t, stale)) {
                return Ok(entry.remember(t));
            }
            if let (Some(refusal), Some(bad)) = (&snapshot.refusal, stale)
                && refusal.fingerprint == fingerprint(bad)
            {
                return Err(entry.refused(refusal.why.clone(), refusal.remaining));
            }
            if let Some(failure) = snapshot.failure.as_ref().filter(|f| !f.remaining.is_zero()) {
                if Instant::now() + failure.remaining > deadline {
                    return Err(TokenError::Unavailable {
                        account: entry.account.name.clone(),
                        reason: format!(
                            "the last token request failed ({}); the pool tries again in {:.1} s",
                            failure.message,
                            failure.remaining.as_secs_f64()
                        ),
                    });
                }
                tokio::time::sleep(failure.remaining).await;
                continue;
            }
            let lease = self.settings.lock_ttl;
            if self.redis.try_lock_token(appid, &self.owner, lease).await.map_err(|s| entry.store_error(s))? {
                let result = self.fetch_locked(entry, need).await;
                if let Err(e) = self.redis.unlock_token(appid, &self.owner).await {
                    warn!(account = %entry.account.name, error = &e as &dyn Error, "could not release the token lock; it expires by itself");
                }
                return result;
            }
            // Another process is fetching: wait for what it stores.
            if Instant::now() >= deadline {
                return Err(TokenError::Unavailable {
                    account: entry.account.name.clone(),
                    reason: "timed out waiting for another worker to fetch a token".into(),
                });
            }
            tokio::time::sleep(jittered(Duration::from_millis(40))).await;
        }
    }

    /// Holding the lock: re-checks Redis for what `need` asks, then fetches.
    async fn fetch_locked(&self, entry: &AccountTokens, need: Need<'_>) -> Result<Token, TokenError> {
        let account = &entry.account;
        let snapshot = self.redis.read_token(&account.appid).await.map_err(|source| entry.store_error(source))?;
        let stale = match need {
            Need::Replace(bad) => Some(bad),
            Need::Missing | Need::Refresh { .. } => None,
        };
        if let Some(t) = snapshot.token.as_ref().filter(|t| usable(t, stale)) {
            let fetched_since = match need {
                Need::Missing | Need::Replace(_) => true,
                // Did someone fetch after I decided to? Compared by fetch time, so it holds when
                // WeChat handed back the same token.
                Need::Refresh { seen } => seen != Some(t.fetched_at_ms),
            };
            if fetched_since {
                debug!(account = %account.name, "another worker fetched the token meanwhile");
                return Ok(entry.remember(t));
            }
        }
        if let (Some(refusal), Some(bad)) = (&snapshot.refusal, stale)
            && refusal.fingerprint == fingerprint(bad)
        {
            return Err(entry.refused(refusal.why.clone(), refusal.remaining));
        }
        let streak = snapshot.failure.as_ref().map_or(0, |f| f.streak);
        match self.fetch_replacing(entry, stale).await? {
            Ok(grant) => self.keep_grant(entry, grant).await,
            Err(e) => Err(self.fetch_failed(entry, e, streak).await),
        }
    }

    /// Fetches a token; when it is `stale` (the very token WeChat just refused, which
    /// stable_token hands out while it is valid), only a forced refresh gets a new one.
    async fn fetch_replacing(
        &self,
        entry: &AccountTokens,
        stale: Option<&Token>,
    ) -> Result<Result<TokenGrant, TokenFetchError>, TokenError> {
        let account = &entry.account;
        let grant = self.wechat.fetch_token(account.token_api, &account.appid, &account.secret, false).await;
        let (Ok(g), Some(bad)) = (&grant, stale) else { return Ok(grant) };
        if g.access_token.expose_secret() != bad.expose_secret() {
            return Ok(grant);
        }
        let lifetime = g.expires_in;
        let forced = match self.force_refresh(entry).await? {
            Ok(()) => self.wechat.fetch_token(account.token_api, &account.appid, &account.secret, true).await,
            Err((why, retry_after)) => return Err(self.keep_refused(entry, bad, lifetime, why, retry_after).await),
        };
        if let Ok(g) = &forced
            && g.access_token.expose_secret() == bad.expose_secret()
        {
            // WeChat ignored the forced refresh (someone forced one less than 30 s ago).
            let why = "WeChat ignored a forced refresh and handed the refused token back".to_owned();
            let retry_after = self.settings.forced_refresh_interval;
            return Err(self.keep_refused(entry, bad, g.expires_in, why, retry_after).await);
        }
        Ok(forced)
    }

    /// Stores a granted token for the pool and keeps it here.
    async fn keep_grant(&self, entry: &AccountTokens, g: TokenGrant) -> Result<Token, TokenError> {
        let account = &entry.account;
        let fetched_at_ms = self
            .redis
            .store_token(&account.appid, &g.access_token, g.expires_in)
            .await
            .map_err(|source| entry.store_error(source))?;
        info!(account = %account.name, expires_in_secs = g.expires_in.as_secs(), "fetched a new access token");
        metrics::counter!("wxpush_token_fetches_total", "account" => account.name.clone(), "outcome" => "ok")
            .increment(1);
        entry.set_healthy(true, "");
        let stored =
            StoredToken { value: g.access_token, remaining: g.expires_in, fetched_at_ms, lifetime: g.expires_in };
        Ok(entry.remember(&stored))
    }

    /// Records a failed fetch for the pool (with a back-off, so a wrong secret does not burn
    /// the quota) and says what to fix.
    async fn fetch_failed(&self, entry: &AccountTokens, e: TokenFetchError, streak: u32) -> TokenError {
        let account = &entry.account;
        let streak = streak.saturating_add(1);
        // Not jittered: it is stored once for the whole pool.
        let backoff = Backoff::new(self.settings.failure_backoff, MAX_FAILURE_BACKOFF).without_jitter().after(streak);
        let advice = match &e {
            TokenFetchError::Refused { errcode, .. } => token_error_advice(*errcode),
            TokenFetchError::Http(_) => None,
        };
        error!(
            account = %account.name,
            appid = %account.appid,
            error = %e,
            advice = advice.unwrap_or("WeChat is unreachable or failing; jobs wait and are retried"),
            retry_in_secs = backoff.as_secs_f64(),
            "cannot get an access token"
        );
        metrics::counter!("wxpush_token_fetches_total", "account" => account.name.clone(), "outcome" => "error")
            .increment(1);
        let message = e.to_string();
        entry.set_healthy(false, &message);
        if let Err(store) = self.redis.store_token_failure(&account.appid, streak, &message, backoff).await {
            warn!(account = %account.name, error = &store as &dyn Error, "could not record the failed token fetch");
        }
        TokenError::Unavailable { account: account.name.clone(), reason: message }
    }

    /// Asks the pool-wide gate for a forced refresh: `Ok(Ok(()))` to go ahead, `Ok(Err((why,
    /// retry_after)))` when the interval or the day's budget says no.
    async fn force_refresh(&self, entry: &AccountTokens) -> Result<Result<(), (String, Duration)>, TokenError> {
        let account = &entry.account;
        let interval = self.settings.forced_refresh_interval;
        let budget = self.settings.forced_refresh_daily_budget;
        let now = chrono::Utc::now();
        let gate = self
            .redis
            .gate_forced_refresh(
                &account.appid,
                interval,
                budget,
                &calendar::beijing_day(now),
                calendar::until_beijing_midnight(now),
            )
            .await
            .map_err(|source| entry.store_error(source))?;
        Ok(match gate {
            ForcedRefresh::Granted { used } => {
                warn!(account = %account.name, forced_today = used, budget, "WeChat returned the refused token again; forcing a refresh");
                metrics::counter!("wxpush_token_forced_refreshes_total", "account" => account.name.clone())
                    .increment(1);
                Ok(())
            }
            ForcedRefresh::Denied { retry_after, used } if u64::from(budget) <= used => Err((
                format!("the day's budget of {budget} forced refreshes is spent (token.forced_refresh_daily_budget)"),
                retry_after,
            )),
            ForcedRefresh::Denied { retry_after, .. } => {
                Err((format!("the last forced refresh was less than {} s ago", interval.as_secs()), retry_after))
            }
        })
    }

    /// Keeps the refused token cached (fetching it again would only return it again) and marks
    /// it refused, so that the pool's refusals are answered without calling WeChat.
    async fn keep_refused(
        &self,
        entry: &AccountTokens,
        bad: &Token,
        lifetime: Duration,
        why: String,
        retry_after: Duration,
    ) -> TokenError {
        let appid = &entry.account.appid;
        let mark = retry_after.min(MAX_REFUSAL_MARK);
        let stored = async {
            self.redis.store_token(appid, bad, lifetime).await?;
            self.redis.mark_token_refused(appid, bad, &why, mark).await
        };
        if let Err(e) = stored.await {
            warn!(account = %entry.account.name, error = &e as &dyn Error, "could not share the token refusal with the pool");
        }
        error!(account = %entry.account.name, %why, retry_in_secs = mark.as_secs_f64(), "WeChat refuses the access token and no new one can be had yet; jobs wait");
        entry.set_healthy(false, &why);
        entry.refused(why, mark)
    }

    /// Keeps every account's token fresh until `cancel`, one task per account on `tracker`:
    /// wakes up `refresh_ahead` before expiry and refreshes under the pool-wide lock (or finds
    /// that another worker already did).
    pub fn spawn_refreshers(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        self.accounts.values().filter(|e| !e.account.secret.expose_secret().is_empty()).for_each(|entry| {
            let manager = Arc::clone(self);
            let entry = Arc::clone(entry);
            let cancel = cancel.clone();
            tracker.spawn(async move {
                loop {
                    let pause = manager.refresh_once(&entry).await;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            });
        });
    }

    /// One round of the refresher; returns how long to sleep before the next.
    async fn refresh_once(&self, entry: &AccountTokens) -> Duration {
        let appid = entry.account.appid.as_str();
        let snapshot = match self.redis.read_token(appid).await {
            Ok(s) => s,
            Err(e) => {
                warn!(account = %entry.account.name, error = &e as &dyn Error, "token refresher cannot read Redis; retrying");
                return jittered(Duration::from_secs(1));
            }
        };
        if let Some(failure) = &snapshot.failure
            && !failure.remaining.is_zero()
        {
            entry.set_healthy(false, &failure.message);
            return failure.remaining + jittered(Duration::from_millis(50));
        }
        if let Some(refusal) = &snapshot.refusal {
            entry.set_healthy(false, &refusal.why);
            // Refreshing now would hand the refused token back; the mark says when to look again.
            return refusal.remaining + jittered(Duration::from_millis(50));
        }
        let seen = match &snapshot.token {
            Some(t) => {
                entry.remember(t);
                entry.set_healthy(true, "");
                let ahead = self.refresh_point(t.lifetime);
                if t.remaining > ahead {
                    // Wake up when it enters the refresh window; jitter spreads the pool's wake-ups.
                    return (t.remaining - ahead + jittered(Duration::from_millis(20))).min(Duration::from_secs(60));
                }
                Some(t.fetched_at_ms)
            }
            None => None,
        };
        let lease = self.settings.lock_ttl;
        match self.redis.try_lock_token(appid, &self.owner, lease).await {
            Ok(true) => {
                let _flight = entry.flight.lock().await;
                let result = self.fetch_locked(entry, Need::Refresh { seen }).await;
                let _ = self.redis.unlock_token(appid, &self.owner).await;
                match result {
                    // The next round reads what is stored now and sleeps until its window.
                    Ok(_) => Duration::ZERO,
                    Err(_) => Duration::from_millis(100),
                }
            }
            // Someone else is refreshing: the next round sees what they stored.
            Ok(false) => jittered(Duration::from_millis(100)),
            Err(e) => {
                warn!(account = %entry.account.name, error = &e as &dyn Error, "token refresher cannot reach Redis; retrying");
                jittered(Duration::from_secs(1))
            }
        }
    }

    /// How long before expiry a token of `lifetime` is refreshed: `refresh_ahead`, or a sixth
    /// of the lifetime when that is shorter (short-lived tokens would otherwise always be due).
    fn refresh_point(&self, lifetime: Duration) -> Duration {
        self.refresh_ahead().min(lifetime / 6)
    }
}

impl AccountTokens {
    fn fresh_local(&self) -> Option<Token> {
        let local = self.local.read().unwrap_or_else(|p| p.into_inner());
        local.as_ref().filter(|l| Instant::now() + MIN_USABLE < l.expires_at).map(|l| Arc::clone(&l.token))
    }

    fn remember(&self, stored: &StoredToken) -> Token {
        let mut local = self.local.write().unwrap_or_else(|p| p.into_inner());
        let expires_at = Instant::now() + stored.remaining;
        match local.as_mut() {
            Some(l) if l.token.expose_secret() == stored.value.expose_secret() => {
                l.expires_at = expires_at;
                Arc::clone(&l.token)
            }
            _ => {
                let token: Token = Arc::new(stored.value.clone());
                *local = Some(Local { token: Arc::clone(&token), expires_at });
                token
            }
        }
    }

    fn forget_local(&self, failed: &Token) {
        let mut local = self.local.write().unwrap_or_else(|p| p.into_inner());
        if local.as_ref().is_some_and(|l| same(Some(&l.token), Some(failed))) {
            *local = None;
        }
    }

    fn store_error(&self, source: StoreError) -> TokenError {
        TokenError::Store { account: self.account.name.clone(), source }
    }

    fn refused(&self, why: String, retry_after: Duration) -> TokenError {
        TokenError::Refused { account: self.account.name.clone(), why, retry_after }
    }

    /// Sets the health gauge and logs when health changes.
    fn set_healthy(&self, healthy: bool, why: &str) {
        use std::sync::atomic::Ordering;
        self.health.set(if healthy { 1.0 } else { 0.0 });
        let before = self.healthy.swap(i8::from(healthy), Ordering::Relaxed);
        if healthy && before == 0 {
            info!(account = %self.account.name, "access token healthy again");
        } else if !healthy && before != 0 {
            warn!(account = %self.account.name, %why, "access token unhealthy: sends of this account wait");
        }
    }
}

fn same(a: Option<&Token>, b: Option<&Token>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        _ => false,
    }
}

fn usable(t: &StoredToken, stale: Option<&Token>) -> bool {
    t.remaining > MIN_USABLE.min(t.lifetime / 10) && stale.is_none_or(|s| s.expose_secret() != t.value.expose_secret())
}
