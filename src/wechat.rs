//! WeChat's HTTP API: the template send and the two token endpoints.
//!
//! The access token travels in the query string, so no error from this module ever carries a
//! URL (`reqwest::Error::without_url`): a logged error must not leak the token.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{config::TokenApi, domain::job::JobKind};

/// A request that got no usable answer. All of these are worth retrying: the message may or
/// may not have been sent, and the job's client_msg_id makes a retry safe.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("WeChat did not answer within the HTTP timeout")]
    Timeout,
    #[error("cannot reach WeChat: {0}")]
    Connect(String),
    #[error("WeChat answered HTTP {0}")]
    Status(u16),
    #[error("WeChat's answer is not what its API documents: {0}")]
    BadBody(String),
}

impl HttpError {
    fn from_reqwest(e: reqwest::Error) -> Self {
        let e = e.without_url();
        if e.is_timeout() {
            HttpError::Timeout
        } else if let Some(status) = e.status() {
            HttpError::Status(status.as_u16())
        } else {
            // The source chain says what went wrong (refused, reset, DNS…).
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            HttpError::Connect(text)
        }
    }
}

/// WeChat's answer to a template send.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SendAnswer {
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
    #[serde(default)]
    pub msgid: Option<u64>,
}

/// A token as WeChat granted it.
#[derive(Debug)]
pub struct TokenGrant {
    pub access_token: SecretString,
    pub expires_in: Duration,
}

/// Why no token was granted.
#[derive(Debug, thiserror::Error)]
pub enum TokenFetchError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("WeChat refused the token request: errcode {errcode} ({errmsg})")]
    Refused { errcode: i64, errmsg: String },
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<u64>,
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
}

/// A client of one WeChat API base URL (the real one, or the sandbox).
#[derive(Clone)]
pub struct WechatClient {
    http: reqwest::Client,
    /// Each job kind's send URL, up to `access_token=`, in [`JobKind::ALL`]'s order.
    send_urls: [String; 3],
    token_url: String,
    stable_token_url: String,
}

impl WechatClient {
    pub fn new(api_base: &str, timeout: Duration) -> Result<Self, HttpError> {
        let base = api_base.trim_end_matches('/');
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(3)))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("wxpush/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpError::Connect(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            send_urls: JobKind::ALL.map(|kind| format!("{base}{}?access_token=", kind.endpoint())),
            token_url: format!("{base}/cgi-bin/token"),
            stable_token_url: format!("{base}/cgi-bin/stable_token"),
        })
    }

    /// Sends a message of `kind` (its endpoint) with a body made by `Job::message_body`.
    pub async fn send(&self, kind: JobKind, token: &SecretString, body: bytes::Bytes) -> Result<SendAnswer, HttpError> {
        let send_url = &self.send_urls[kind as usize];
        let mut url = String::with_capacity(send_url.len() + 200);
        url.push_str(send_url);
        url.push_str(token.expose_secret());
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(HttpError::from_reqwest)?;
        let status = response.status();
        if !status.is_success() {
            return Err(HttpError::Status(status.as_u16()));
        }
        let bytes = response.bytes().await.map_err(HttpError::from_reqwest)?;
        serde_json::from_slice(&bytes).map_err(|e| HttpError::BadBody(format!("{e} in {}", preview(&bytes))))
    }

    /// Asks WeChat for a token. `force` (stable_token only) makes WeChat rotate it even when the
    /// current one is still valid; WeChat allows that 20 times a day.
    pub async fn fetch_token(
        &self,
        api: TokenApi,
        appid: &str,
        secret: &SecretString,
        force: bool,
    ) -> Result<TokenGrant, TokenFetchError> {
        let request = match api {
            TokenApi::Stable => self.http.post(&self.stable_token_url).json(&serde_json::json!({
                "grant_type": "client_credential",
                "appid": appid,
                "secret": secret.expose_secret(),
                "force_refresh": force,
            })),
            TokenApi::Classic => self.http.get(&self.token_url).query(&[
                ("grant_type", "client_credential"),
                ("appid", appid),
                ("secret", secret.expose_secret()),
            ]),
        };
        let response = request.send().await.map_err(HttpError::from_reqwest)?;
        let status = response.status();
        if !status.is_success() {
            return Err(HttpError::Status(status.as_u16()).into());
        }
        let bytes = response.bytes().await.map_err(HttpError::from_reqwest)?;
        let answer: TokenAnswer =
            serde_json::from_slice(&bytes).map_err(|e| HttpError::BadBody(format!("token answer is not JSON: {e}")))?;
        match (answer.access_token, answer.expires_in) {
            (Some(token), Some(expires_in)) if answer.errcode == 0 && !token.is_empty() && expires_in > 0 => {
                Ok(TokenGrant { access_token: SecretString::from(token), expires_in: Duration::from_secs(expires_in) })
            }
            _ if answer.errcode != 0 => {
                Err(TokenFetchError::Refused { errcode: answer.errcode, errmsg: answer.errmsg })
            }
            _ => Err(HttpError::BadBody("token answer has no access_token or expires_in".into()).into()),
        }
    }
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
    format!("{text:?}")
}
