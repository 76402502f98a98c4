//! Who may push: the query a push arrives with, its signatures, its age, and safe-mode
//! decryption with the account's current (or, during a rotation, previous) key.
//!
//! Pure functions over the account's secrets: no network, so every rule is unit-tested here.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{Account, AccountKind};
use crate::domain::{
    crypto::{self, Cipher, CryptoError},
    job::JobKind,
};

/// Why a request is refused before its body is looked at. The messages are safe to return to
/// the caller and to log: they never contain a secret or an expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("query parameter {0} is missing")]
    Missing(&'static str),
    #[error("timestamp {0:?} is not a number of seconds")]
    BadTimestamp(String),
    #[error("encrypt_type {0:?} is not supported (expected aes or raw)")]
    BadEncryptType(String),
    #[error("signature does not match (wrong Token, or not from WeChat)")]
    BadSignature,
    #[error("msg_signature does not match (wrong Token, or not from WeChat)")]
    BadMsgSignature,
    #[error("timestamp is {skew_secs} s away from this server's clock, more than the {window_secs} s allowed")]
    Stale { skew_secs: i64, window_secs: u64 },
    #[error(
        "this account has an EncodingAESKey, so it takes only encrypted pushes (encrypt_type=aes with msg_signature); \
         a plaintext push is not authenticated. While switching the console's mode, set accept_plaintext = true for the account"
    )]
    PlaintextRefused,
}

impl VerifyError {
    /// 400 for a malformed request, 401 for a wrong signature, 403 for a replayed or stale one.
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            Self::Missing(_) | Self::BadTimestamp(_) | Self::BadEncryptType(_) => StatusCode::BAD_REQUEST,
            Self::BadSignature | Self::BadMsgSignature | Self::PlaintextRefused => StatusCode::UNAUTHORIZED,
            Self::Stale { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The `reason` label of the refusal in the webhook's metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing_parameter",
            Self::BadTimestamp(_) | Self::BadEncryptType(_) => "bad_request",
            Self::BadSignature => "bad_signature",
            Self::BadMsgSignature => "bad_msg_signature",
            Self::Stale { .. } => "stale",
            Self::PlaintextRefused => "plaintext_refused",
        }
    }
}

/// The query parameters WeChat adds to the server URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushQuery {
    pub signature: Option<String>,
    pub timestamp: Option<String>,
    pub nonce: Option<String>,
    pub echostr: Option<String>,
    pub openid: Option<String>,
    pub encrypt_type: Option<String>,
    pub msg_signature: Option<String>,
}

/// How a POST body is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 明文模式: the body is the push; `signature` covers only timestamp and nonce.
    Plain,
    /// 安全模式 or 兼容模式 (`encrypt_type=aes`): the push is in `Encrypt`, signed by `msg_signature`.
    Aes,
}

impl PushQuery {
    /// Reads a raw query string; unknown parameters are ignored, a repeated one keeps its first value.
    pub fn parse(raw: Option<&str>) -> PushQuery {
        let mut q = PushQuery::default();
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let slot = match k.as_ref() {
                "signature" => &mut q.signature,
                "timestamp" => &mut q.timestamp,
                "nonce" => &mut q.nonce,
                "echostr" => &mut q.echostr,
                "openid" => &mut q.openid,
                "encrypt_type" => &mut q.encrypt_type,
                "msg_signature" => &mut q.msg_signature,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v.into_owned());
            }
        }
        q
    }

    pub fn mode(&self) -> Result<Mode, VerifyError> {
        match self.encrypt_type.as_deref() {
            None | Some("") | Some("raw") => Ok(Mode::Plain),
            Some(t) if t.eq_ignore_ascii_case("aes") => Ok(Mode::Aes),
            Some(other) => Err(VerifyError::BadEncryptType(other.chars().take(32).collect())),
        }
    }

    fn get(&self, field: &Option<String>, name: &'static str) -> Result<String, VerifyError> {
        field.clone().filter(|v| !v.is_empty()).ok_or(VerifyError::Missing(name))
    }
}

/// One account's push secrets, ready to check requests. Its `Debug` shows no secret.
pub struct AccountKeys {
    pub name: String,
    pub appid: String,
    /// The kind of the account's subscription messages, which its sent and consent events
    /// report: `subscribe` for an official account, `miniprogram_subscribe` for a mini program.
    pub subscribe_kind: JobKind,
    token: SecretString,
    /// The current key first, then the previous one (kept during a rotation).
    ciphers: Vec<Cipher>,
    /// Plaintext pushes are taken even though the account has an AES key.
    accept_plaintext: bool,
}

impl std::fmt::Debug for AccountKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKeys")
            .field("name", &self.name)
            .field("appid", &self.appid)
            .field("subscribe_kind", &self.subscribe_kind)
            .field("keys", &self.ciphers.len())
            .field("accept_plaintext", &self.accept_plaintext)
            .finish_non_exhaustive()
    }
}

/// An account whose AES key is not a valid EncodingAESKey.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account {account:?}: {which} is not valid: {source}")]
pub struct KeyError {
    pub account: String,
    pub which: &'static str,
    pub source: CryptoError,
}

impl AccountKeys {
    /// The account's push secrets, or `None` when it has no callback Token (it takes no pushes).
    pub fn from_account(account: &Account) -> Result<Option<AccountKeys>, KeyError> {
        let Some(token) = account.callback_token.clone().filter(|t| !t.expose_secret().is_empty()) else {
            return Ok(None);
        };
        let mut ciphers = Vec::new();
        for (which, key) in [
            ("encoding_aes_key", &account.encoding_aes_key),
            ("previous_encoding_aes_key", &account.previous_encoding_aes_key),
        ] {
            if let Some(key) = key.as_ref().filter(|k| !k.expose_secret().is_empty()) {
                let cipher = Cipher::new(key.expose_secret()).map_err(|source| KeyError {
                    account: account.name.clone(),
                    which,
                    source,
                })?;
                ciphers.push(cipher);
            }
        }
        let subscribe_kind = match account.kind {
            AccountKind::OfficialAccount => JobKind::Subscribe,
            AccountKind::Miniprogram => JobKind::MiniprogramSubscribe,
        };
        Ok(Some(AccountKeys {
            name: account.name.clone(),
            appid: account.appid.clone(),
            subscribe_kind,
            token,
            ciphers,
            accept_plaintext: account.accept_plaintext,
        }))
    }

    /// The server-verification GET: the `echostr` to answer when the signature holds.
    pub fn verify_echo(&self, q: &PushQuery, now: i64, window: Option<Duration>) -> Result<String, VerifyError> {
        let echostr = q.get(&q.echostr, "echostr")?;
        self.verify_signature(q, now, window)?;
        Ok(echostr)
    }

    /// A plaintext POST. `signature` covers only (token, timestamp, nonce), not the body: anyone
    /// who saw one push URL could post any body with it for the timestamp window. So an account
    /// with an AES key refuses plaintext pushes outright (WeChat's compatible and safe modes both
    /// send encrypted ones), unless it is switching modes (`accept_plaintext`).
    pub fn verify_plain(&self, q: &PushQuery, now: i64, window: Option<Duration>) -> Result<(), VerifyError> {
        let has_aes_key = !self.ciphers.is_empty();
        if has_aes_key && !self.accept_plaintext {
            return Err(VerifyError::PlaintextRefused);
        }
        self.verify_signature(q, now, window)
    }

    /// `signature` over (token, timestamp, nonce): the server-verification GET, and plaintext POSTs.
    pub fn verify_signature(&self, q: &PushQuery, now: i64, window: Option<Duration>) -> Result<(), VerifyError> {
        let signature = q.get(&q.signature, "signature")?;
        let timestamp = q.get(&q.timestamp, "timestamp")?;
        let nonce = q.get(&q.nonce, "nonce")?;
        let ts = parse_timestamp(&timestamp)?;
        let expected = crypto::signature(self.token.expose_secret(), &timestamp, &nonce);
        if !crypto::signature_matches(&expected, &signature) {
            return Err(VerifyError::BadSignature);
        }
        check_window(ts, now, window)
    }

    /// A safe-mode POST: `msg_signature` over (token, timestamp, nonce, Encrypt). WeChat's doc
    /// warns not to rely on `signature` here: it does not cover the body.
    pub fn verify_msg_signature(
        &self,
        q: &PushQuery,
        encrypt: &str,
        now: i64,
        window: Option<Duration>,
    ) -> Result<(), VerifyError> {
        let msg_signature = q.get(&q.msg_signature, "msg_signature")?;
        let timestamp = q.get(&q.timestamp, "timestamp")?;
        let nonce = q.get(&q.nonce, "nonce")?;
        let ts = parse_timestamp(&timestamp)?;
        let expected = crypto::msg_signature(self.token.expose_secret(), &timestamp, &nonce, encrypt);
        if !crypto::signature_matches(&expected, &msg_signature) {
            return Err(VerifyError::BadMsgSignature);
        }
        check_window(ts, now, window)
    }

    /// Decrypts `Encrypt` with the current key, then the previous one, and checks that the
    /// message was addressed to this account's appid. The current key's error is the one
    /// reported, since the previous key is only a fallback.
    pub fn decrypt(&self, encrypt: &str) -> Result<Vec<u8>, DecryptError> {
        let mut first_error = None;
        for cipher in &self.ciphers {
            match cipher.decrypt_for(encrypt, &self.appid) {
                Ok(msg) => return Ok(msg),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.map_or(DecryptError::NoKey, DecryptError::Crypto))
    }
}

/// Why a verified safe-mode push could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("safe-mode push, but the account has no encoding_aes_key configured")]
    NoKey,
    #[error("cannot decrypt Encrypt: {0}")]
    Crypto(CryptoError),
}

fn parse_timestamp(ts: &str) -> Result<i64, VerifyError> {
    ts.trim().parse().map_err(|_| VerifyError::BadTimestamp(ts.chars().take(32).collect()))
}

/// Refuses pushes signed too long ago (or in the future): a captured request cannot be
/// replayed later. `None` turns the check off.
fn check_window(ts: i64, now: i64, window: Option<Duration>) -> Result<(), VerifyError> {
    let Some(window) = window else { return Ok(()) };
    let skew = now.saturating_sub(ts);
    if skew.unsigned_abs() > window.as_secs() {
        return Err(VerifyError::Stale { skew_secs: skew, window_secs: window.as_secs() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_with_an_aes_key_refuses_plaintext_pushes_unless_switching_modes() {
        let key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        let (ts, nonce) = ("1714037059", "486452656");
        let q = PushQuery::parse(Some(&format!(
            "signature={}&timestamp={ts}&nonce={nonce}",
            crypto::signature("t", ts, nonce)
        )));
        assert_eq!(q.mode(), Ok(Mode::Plain));
        let safe = AccountKeys::from_account(&account("t", Some(key), None, "wx1")).unwrap().unwrap();
        let err = safe.verify_plain(&q, 0, None).unwrap_err();
        assert_eq!(err, VerifyError::PlaintextRefused);
        assert_eq!(err.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert!(err.to_string().contains("accept_plaintext = true"), "{err}");
        // Refused before the signature is even looked at: a forged one gets the same answer.
        let unsigned = PushQuery::parse(Some("timestamp=1&nonce=2"));
        assert_eq!(safe.verify_plain(&unsigned, 0, None), Err(VerifyError::PlaintextRefused));

        let mut switching = account("t", Some(key), None, "wx1");
        switching.accept_plaintext = true;
        let switching = AccountKeys::from_account(&switching).unwrap().unwrap();
        assert_eq!(switching.verify_plain(&q, 0, None), Ok(()));
        assert_eq!(switching.verify_plain(&unsigned, 0, None), Err(VerifyError::Missing("signature")));
        // Without an AES key there is nothing better: plaintext is the mode.
        assert_eq!(keys("t").verify_plain(&q, 0, None), Ok(()));
    }

    fn account(token: &str, key: Option<&str>, previous: Option<&str>, appid: &str) -> Account {
        let text = format!(
            "[[accounts]]\nname = \"default\"\nappid = \"{appid}\"\ncallback_token = \"{token}\"\n{}{}",
            key.map(|k| format!("encoding_aes_key = \"{k}\"\n")).unwrap_or_default(),
            previous.map(|k| format!("previous_encoding_aes_key = \"{k}\"\n")).unwrap_or_default(),
        );
        crate::config::Config::from_sources("t", &text, |_| None).unwrap().accounts.remove(0)
    }

    fn keys(token: &str) -> AccountKeys {
        AccountKeys::from_account(&account(token, None, None, "wx1")).unwrap().unwrap()
    }

    #[test]
    fn the_official_get_example_verifies() {
        let q = PushQuery::parse(Some(
            "signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492",
        ));
        assert_eq!(keys("AAAAA").verify_echo(&q, 0, None).unwrap(), "4375120948345356249");
        assert_eq!(
            keys("AAAAA").verify_echo(&q, 1714036504 + 10, Some(Duration::from_secs(300))).unwrap(),
            "4375120948345356249"
        );
        assert_eq!(keys("BBBBB").verify_echo(&q, 0, None), Err(VerifyError::BadSignature));
        let err = keys("AAAAA").verify_echo(&q, 1714036504 + 301, Some(Duration::from_secs(300))).unwrap_err();
        assert_eq!(err, VerifyError::Stale { skew_secs: 301, window_secs: 300 });
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN);
        assert!(keys("AAAAA").verify_echo(&q, 1714036504 - 299, Some(Duration::from_secs(300))).is_ok());
        assert!(keys("AAAAA").verify_echo(&q, 1714036504 - 301, Some(Duration::from_secs(300))).is_err());
    }

    #[test]
    fn missing_and_malformed_parameters_are_400() {
        let k = keys("AAAAA");
        for (query, missing) in [
            ("timestamp=1&nonce=2&echostr=3", "signature"),
            ("signature=a&nonce=2&echostr=3", "timestamp"),
            ("signature=a&timestamp=1&echostr=3", "nonce"),
            ("signature=a&timestamp=1&nonce=2", "echostr"),
            ("signature=&timestamp=1&nonce=2&echostr=3", "signature"),
        ] {
            let err = k.verify_echo(&PushQuery::parse(Some(query)), 0, None).unwrap_err();
            assert_eq!(err, VerifyError::Missing(missing), "{query}");
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        }
        let err = k.verify_echo(&PushQuery::parse(Some("signature=a&timestamp=x&nonce=2&echostr=3")), 0, None);
        assert_eq!(err, Err(VerifyError::BadTimestamp("x".into())));
        assert_eq!(k.verify_echo(&PushQuery::parse(None), 0, None), Err(VerifyError::Missing("echostr")));
        assert_eq!(VerifyError::BadSignature.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(PushQuery::parse(Some("encrypt_type=aes")).mode(), Ok(Mode::Aes));
        assert_eq!(PushQuery::parse(Some("encrypt_type=raw")).mode(), Ok(Mode::Plain));
        assert_eq!(PushQuery::parse(Some("x=1")).mode(), Ok(Mode::Plain));
        assert!(PushQuery::parse(Some("encrypt_type=rsa")).mode().is_err());
    }

    #[test]
    fn the_official_plaintext_post_signature_verifies_and_is_case_insensitive() {
        let q = PushQuery::parse(Some(
            "signature=899CF89E464EFB63F54DDAC96B0A0A235F53AA78&timestamp=1714037059&nonce=486452656&openid=o",
        ));
        assert_eq!(q.openid.as_deref(), Some("o"));
        assert!(keys("AAAAA").verify_signature(&q, 0, None).is_ok());
    }

    const VECTOR_A_ENCRYPT: &str = "+qdx1OKCy+5JPCBFWw70tm0fJGb2Jmeia4FCB7kao+/Q5c/ohsOzQHi8khUOb05JCpj0JB4RvQMkUyus8TPxLKJGQqcvZqzDpVzazhZv6JsXUnnR8XGT740XgXZUXQ7vJVnAG+tE8NUd4yFyjPy7GgiaviNrlCTj+l5kdfMuFUPpRSrfMZuMcp3Fn2Pede2IuQrKEYwKSqFIZoNqJ4M8EajAsjLY2km32IIjdf8YL/P50F7mStwntrA2cPDrM1kb6mOcfBgRtWygb3VIYnSeOBrebufAlr7F9mFUPAJGj04=";

    #[test]
    fn vector_a_safe_mode_verifies_and_decrypts() {
        let a = "A".repeat(43);
        let k = AccountKeys::from_account(&account("AAAAA", Some(&a), None, "wxba5fad812f8e6fb9")).unwrap().unwrap();
        // The URL's `signature` and `msg_signature` from the official guide, `+` percent-encoded.
        let q = PushQuery::parse(Some(
            "signature=6c5c811b55cc85e0e1b54100749188c20beb3f5d&timestamp=1714112445&nonce=415670741&openid=o9AgO5Kd5ggOC-bXrbNODIiE3bGY&encrypt_type=aes&msg_signature=046e02f8204d34f8ba5fa3b1db94908f3df2e9b3",
        ));
        assert_eq!(q.mode(), Ok(Mode::Aes));
        k.verify_msg_signature(&q, VECTOR_A_ENCRYPT, 0, None).unwrap();
        assert_eq!(
            k.verify_msg_signature(&q, &VECTOR_A_ENCRYPT.replace('+', "-"), 0, None),
            Err(VerifyError::BadMsgSignature)
        );
        let msg = k.decrypt(VECTOR_A_ENCRYPT).unwrap();
        assert!(msg.starts_with(br#"{"ToUserName":"gh_97417a04a28d""#));
        // Addressed to another appid: refused even though the key is right.
        let other = AccountKeys::from_account(&account("AAAAA", Some(&a), None, "wxother")).unwrap().unwrap();
        assert!(matches!(other.decrypt(VECTOR_A_ENCRYPT), Err(DecryptError::Crypto(CryptoError::WrongAppid { .. }))));
        assert_eq!(keys("AAAAA").decrypt(VECTOR_A_ENCRYPT), Err(DecryptError::NoKey));
    }

    #[test]
    fn the_previous_key_is_tried_during_a_rotation() {
        let old = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        let new = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR";
        let enc_old = Cipher::new(old).unwrap().encrypt(&[7; 16], b"<xml/>", "wx1");
        let enc_new = Cipher::new(new).unwrap().encrypt(&[8; 16], b"<xml>new</xml>", "wx1");
        let rotating = AccountKeys::from_account(&account("t", Some(new), Some(old), "wx1")).unwrap().unwrap();
        assert_eq!(rotating.decrypt(&enc_old).unwrap(), b"<xml/>");
        assert_eq!(rotating.decrypt(&enc_new).unwrap(), b"<xml>new</xml>");
        let rotated = AccountKeys::from_account(&account("t", Some(new), None, "wx1")).unwrap().unwrap();
        assert!(rotated.decrypt(&enc_old).is_err());
    }

    #[test]
    fn subscription_events_take_the_kind_of_the_account() {
        assert_eq!(keys("t").subscribe_kind, JobKind::Subscribe);
        let mut mini = account("t", None, None, "wx1");
        mini.kind = AccountKind::Miniprogram;
        let mini = AccountKeys::from_account(&mini).unwrap().unwrap();
        assert_eq!(mini.subscribe_kind, JobKind::MiniprogramSubscribe);
    }

    #[test]
    fn accounts_without_a_token_take_no_pushes_and_bad_keys_are_reported() {
        let mut a = account("t", None, None, "wx1");
        a.callback_token = None;
        assert!(AccountKeys::from_account(&a).unwrap().is_none());
        let bad = account("t", Some("short"), None, "wx1");
        let err = AccountKeys::from_account(&bad).unwrap_err();
        assert_eq!(err.which, "encoding_aes_key");
        assert!(!err.to_string().contains("short"), "the key itself is not echoed: {err}");
        let k = keys("s3cret-token");
        assert!(!format!("{k:?}").contains("s3cret"));
    }
}
