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
//! - on 40001/40014/42001 the failed token is dropped only if Redis still holds it
//!   (compare-and-invalidate), so one bad answer cannot rotate a token someone just fetched;
//! - a failed fetch (wrong secret, IP whitelist, WeChat down) is remembered in Redis with a
//!   doubling back-off, so the pool does not burn WeChat's 2,000-a-day token quota in a storm.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    config::{Account, TokenSettings},
    domain::errcode::token_error_advice,
    store::{Redis, StoreError, token::StoredToken},
    wechat::{TokenFetchError, WechatClient},
};

/// A token, cheap to hand to many concurrent sends.
pub type Token = Arc<SecretString>;

/// Longest pause after failed fetches.
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(300);
/// A token with less than this left is not handed to a send.
const MIN_USABLE: Duration = Duration::from_millis(500);

/// Why no token could be had. The job that asked waits; it is not failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no access token for account {account}: {reason}")]
    Unavailable { account: String, reason: String },
    #[error("no access token for account {account}: {source}")]
    Store { account: String, source: StoreError },
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
                let tokens = AccountTokens { account: a.clone(), local: RwLock::new(None), flight: Default::default() };
                (a.name.clone(), Arc::new(tokens))
            })
            .collect();
        Arc::new(Self { redis, wechat, settings, owner: uuid::Uuid::new_v4().to_string(), accounts })
    }

    fn refresh_ahead(&self) -> Duration {
        Duration::from_secs_f64(self.settings.refresh_ahead_secs.max(0.0))
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
    /// with: a newer one if someone already replaced it, else one fetched once.
    pub async fn replace(&self, account: &str, failed: &Token) -> Result<Token, TokenError> {
        let entry = self.entry(account)?;
        entry.forget_local(failed);
        let appid = &entry.account.appid;
        let dropped = self.redis.invalidate_token(appid, failed).await.map_err(|source| entry.store_error(source))?;
        if dropped {
            info!(account = %entry.account.name, "access token refused by WeChat; dropped it from the pool's cache");
        }
        self.obtain(entry, Some(failed)).await
    }

    /// The token in Redis and what is left of it, for tools and metrics.
    pub async fn inspect(&self, account: &str) -> Result<Option<StoredToken>, TokenError> {
        let entry = self.entry(account)?;
        let snapshot = self.redis.read_token(&entry.account.appid).await.map_err(|source| entry.store_error(source))?;
        Ok(snapshot.token)
    }

    /// Gets a token through Redis, fetching under the pool-wide lock when there is none.
    /// `stale` is a token known to be bad: it is never returned.
    async fn obtain(&self, entry: &AccountTokens, stale: Option<&Token>) -> Result<Token, TokenError> {
        let deadline = Instant::now() + Duration::from_millis(self.settings.wait_ms);
        let _flight = entry.flight.lock().await;
        // Someone in this process may have obtained one while we queued for the flight.
        if let Some(token) = entry.fresh_local().filter(|t| !same(Some(t), stale)) {
            return Ok(token);
        }
        let appid = entry.account.appid.as_str();
        loop {
            let snapshot = self.redis.read_token(appid).await.map_err(|source| entry.store_error(source))?;
            if let Some(t) = snapshot.token.as_ref().filter(|t| usable(t, stale)) {
                return Ok(entry.remember(t));
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
            let lease = Duration::from_millis(self.settings.lock_ttl_ms);
            if self.redis.try_lock_token(appid, &self.owner, lease).await.map_err(|s| entry.store_error(s))? {
                let result = self.fetch_locked(entry, stale, None).await;
                if let Err(e) = self.redis.unlock_token(appid, &self.owner).await {
                    warn!(account = %entry.account.name, error = %e, "could not release the token lock; it expires by itself");
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
            tokio::time::sleep(jitter(Duration::from_millis(40))).await;
        }
    }

    /// Holding the lock: re-checks Redis, then fetches. `refresh_below` makes a token with less
    /// than that left count as stale (refresh-ahead).
    async fn fetch_locked(
        &self,
        entry: &AccountTokens,
        stale: Option<&Token>,
        refresh_below: Option<Duration>,
    ) -> Result<Token, TokenError> {
        let account = &entry.account;
        let snapshot = self.redis.read_token(&account.appid).await.map_err(|source| entry.store_error(source))?;
        if let Some(t) = snapshot.token.as_ref().filter(|t| usable(t, stale))
            && refresh_below.is_none_or(|below| t.remaining > below)
        {
            debug!(account = %account.name, "another worker refreshed the token meanwhile");
            return Ok(entry.remember(t));
        }
        let streak = snapshot.failure.as_ref().map_or(0, |f| f.streak);
        let mut grant = self.wechat.fetch_token(account.token_api, &account.appid, &account.secret, false).await;
        // stable_token hands out the current token while it is valid; if that is the very token
        // WeChat just refused, only a forced refresh gets a new one (WeChat allows 20 a day).
        if let (Ok(g), Some(bad)) = (&grant, stale)
            && g.access_token.expose_secret() == bad.expose_secret()
        {
            warn!(account = %account.name, "WeChat returned the refused token again; forcing a refresh");
            grant = self.wechat.fetch_token(account.token_api, &account.appid, &account.secret, true).await;
        }
        match grant {
            Ok(g) => {
                self.redis
                    .store_token(&account.appid, &g.access_token, g.expires_in)
                    .await
                    .map_err(|source| entry.store_error(source))?;
                info!(account = %account.name, expires_in_secs = g.expires_in.as_secs(), "fetched a new access token");
                metrics::counter!("wxpush_token_fetches_total", "account" => account.name.clone(), "outcome" => "ok")
                    .increment(1);
                let stored = StoredToken { value: g.access_token, remaining: g.expires_in, fetched_at_ms: 0 };
                Ok(entry.remember(&stored))
            }
            Err(e) => {
                let streak = streak.saturating_add(1);
                let backoff = (Duration::from_millis(self.settings.failure_backoff_ms)
                    * 2u32.saturating_pow(streak - 1))
                .min(MAX_FAILURE_BACKOFF);
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
                if let Err(store) = self.redis.store_token_failure(&account.appid, streak, &message, backoff).await {
                    warn!(account = %account.name, error = %store, "could not record the failed token fetch");
                }
                Err(TokenError::Unavailable { account: account.name.clone(), reason: message })
            }
        }
    }

    /// Keeps every account's token fresh until `cancel`: wakes up `refresh_ahead` before expiry
    /// and refreshes under the pool-wide lock (or finds that another worker already did).
    pub fn spawn_refreshers(self: &Arc<Self>, cancel: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        self.accounts
            .values()
            .filter(|e| !e.account.secret.expose_secret().is_empty())
            .map(|entry| {
                let manager = Arc::clone(self);
                let entry = Arc::clone(entry);
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    loop {
                        let pause = manager.refresh_once(&entry).await;
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                })
            })
            .collect()
    }

    /// One round of the refresher; returns how long to sleep before the next.
    async fn refresh_once(&self, entry: &AccountTokens) -> Duration {
        let ahead = self.refresh_ahead();
        let appid = entry.account.appid.as_str();
        let snapshot = match self.redis.read_token(appid).await {
            Ok(s) => s,
            Err(e) => {
                warn!(account = %entry.account.name, error = %e, "token refresher cannot read Redis; retrying");
                return jitter(Duration::from_secs(1));
            }
        };
        if let Some(failure) = &snapshot.failure
            && !failure.remaining.is_zero()
        {
            return failure.remaining + jitter(Duration::from_millis(50));
        }
        if let Some(t) = &snapshot.token {
            entry.remember(t);
            if t.remaining > ahead {
                // Wake up when it enters the refresh window; jitter spreads the pool's wake-ups.
                return (t.remaining - ahead + jitter(Duration::from_millis(20))).min(Duration::from_secs(60));
            }
        }
        let lease = Duration::from_millis(self.settings.lock_ttl_ms);
        match self.redis.try_lock_token(appid, &self.owner, lease).await {
            Ok(true) => {
                let _flight = entry.flight.lock().await;
                let result = self.fetch_locked(entry, None, Some(ahead)).await;
                let _ = self.redis.unlock_token(appid, &self.owner).await;
                match result {
                    // If WeChat returned the same token (not yet in its own refresh window), look
                    // again halfway to its expiry instead of asking again at once.
                    Ok(_) => entry.local_remaining().map_or(Duration::from_millis(200), |r| {
                        if r <= ahead { (r / 2).max(Duration::from_millis(200)) } else { Duration::from_millis(10) }
                    }),
                    Err(_) => Duration::from_millis(100),
                }
            }
            Ok(false) => jitter(Duration::from_millis(100)),
            Err(e) => {
                warn!(account = %entry.account.name, error = %e, "token refresher cannot reach Redis; retrying");
                jitter(Duration::from_secs(1))
            }
        }
    }
}

impl AccountTokens {
    fn fresh_local(&self) -> Option<Token> {
        let local = self.local.read().unwrap_or_else(|p| p.into_inner());
        local.as_ref().filter(|l| Instant::now() + MIN_USABLE < l.expires_at).map(|l| Arc::clone(&l.token))
    }

    fn local_remaining(&self) -> Option<Duration> {
        let local = self.local.read().unwrap_or_else(|p| p.into_inner());
        local.as_ref().map(|l| l.expires_at.saturating_duration_since(Instant::now()))
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
}

fn same(a: Option<&Token>, b: Option<&Token>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        _ => false,
    }
}

fn usable(t: &StoredToken, stale: Option<&Token>) -> bool {
    t.remaining > MIN_USABLE && stale.is_none_or(|s| s.expose_secret() != t.value.expose_secret())
}

/// `base` plus up to 100 % random extra, so a pool's processes do not move in lockstep.
fn jitter(base: Duration) -> Duration {
    base + base.mul_f64(rand::random::<f64>())
}
