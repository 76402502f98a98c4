//! RabbitMQ's management HTTP API, for what AMQP does not tell: how many messages of a queue are
//! delivered and not yet acknowledged (the jobs workers hold in flight). A passive declare only
//! counts ready messages.
//!
//! Its address comes from the AMQP URL (the same host and credentials, port 15672, or 15671 with
//! `https` for `amqps://`) unless given. Without the `rabbitmq_management` plugin the commands
//! still work; they say the unacknowledged counts are unknown, and why.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// How long one request to the management API may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One queue as the management API counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacknowledged: u64,
    pub consumers: u64,
}

/// Why the management API gave no answer; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("no management API address can be made from the AMQP URL; give one with --management-url")]
    AmqpUrl(#[source] url::ParseError),
    #[error("the AMQP URL names no host; give the management API's address with --management-url")]
    NoHost,
    #[error("--management-url {given:?} is not a URL")]
    Given { given: String, source: url::ParseError },
    #[error("the management API's address {url} cannot take a path (is it an http:// URL?)")]
    NotABase { url: String },
    #[error("cannot build the HTTP client for the management API")]
    Client(#[source] reqwest::Error),
    #[error(
        "the RabbitMQ management API at {url} did not answer; enable it (`rabbitmq-plugins enable \
         rabbitmq_management`) or give its address with --management-url / WXPUSH_MANAGEMENT_URL"
    )]
    Unreachable { url: String, source: reqwest::Error },
    #[error(
        "the RabbitMQ management API at {url} refused the credentials (HTTP {status}); the user needs the \
         `management` or `monitoring` tag, or give another with --management-url http://user:password@host:15672"
    )]
    Refused { url: String, status: u16 },
    #[error("the RabbitMQ management API answered HTTP {status} to GET {path}: {body}")]
    Status { path: String, status: u16, body: String },
}

#[derive(Deserialize)]
struct QueueAnswer {
    // Missing until the broker has collected the queue's first statistics.
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
    consumers: Option<u64>,
}

/// A client of one broker's management API, for one virtual host.
pub struct Management {
    http: reqwest::Client,
    base: Url,
    vhost: String,
    user: String,
    password: String,
}

impl Management {
    /// The API of the first node of `amqp_urls`, or at `explicit` when given (credentials in it
    /// win; otherwise the AMQP URL's are used).
    pub fn new(amqp_urls: &str, explicit: Option<&str>) -> Result<Management, ManagementError> {
        let first = amqp_urls.split(',').map(str::trim).find(|u| !u.is_empty()).unwrap_or_default();
        let amqp = Url::parse(first).map_err(ManagementError::AmqpUrl)?;
        // No credentials in the URL means RabbitMQ's default user, as for AMQP itself.
        let mut user = Some(decode(amqp.username())).filter(|u| !u.is_empty()).unwrap_or_else(|| "guest".into());
        let mut password = amqp.password().map_or_else(|| "guest".into(), decode);
        // The AMQP URL's path is the virtual host, percent-encoded; none means "/".
        let vhost = match amqp.path().strip_prefix('/').unwrap_or_default() {
            "" => "/".to_owned(),
            v => decode(v),
        };
        let base = match explicit {
            Some(given) => {
                let mut url =
                    Url::parse(given).map_err(|source| ManagementError::Given { given: given.to_owned(), source })?;
                if !url.username().is_empty() {
                    user = decode(url.username());
                    password = url.password().map(decode).unwrap_or_default();
                }
                // Sent as a header below; credentials left in the URL would make a second one.
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url
            }
            None => {
                let (scheme, port) = if amqp.scheme() == "amqps" { ("https", 15671) } else { ("http", 15672) };
                let host = amqp.host_str().ok_or(ManagementError::NoHost)?;
                Url::parse(&format!("{scheme}://{host}:{port}/")).map_err(ManagementError::AmqpUrl)?
            }
        };
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(ManagementError::Client)?;
        Ok(Management { http, base, vhost, user, password })
    }

    /// The API's address (it holds no credentials).
    pub fn url(&self) -> String {
        self.base.to_string()
    }

    /// The counts of `queue`, `None` when it does not exist. Counts the broker has not collected
    /// yet (just after the queue was declared) are 0.
    pub async fn queue(&self, queue: &str) -> Result<Option<QueueCounts>, ManagementError> {
        let mut url = self.base.clone();
        url.path_segments_mut().map_err(|()| ManagementError::NotABase { url: self.url() })?.pop_if_empty().extend([
            "api",
            "queues",
            self.vhost.as_str(),
            queue,
        ]);
        let path = url.path().to_owned();
        let response = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| ManagementError::Unreachable { url: self.url(), source: e.without_url() })?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            404 => return Ok(None),
            401 | 403 => return Err(ManagementError::Refused { url: self.url(), status }),
            _ => {
                let body = response.text().await.unwrap_or_default();
                let body: String = body.chars().take(200).collect();
                return Err(ManagementError::Status { path, status, body });
            }
        }
        let answer: QueueAnswer = response
            .json()
            .await
            .map_err(|e| ManagementError::Unreachable { url: self.url(), source: e.without_url() })?;
        Ok(Some(QueueCounts {
            ready: answer.messages_ready.unwrap_or(0),
            unacknowledged: answer.messages_unacknowledged.unwrap_or(0),
            consumers: answer.consumers.unwrap_or(0),
        }))
    }
}

/// A percent-encoded URL component, decoded (`+` stays a plus sign, as in a URL path).
fn decode(component: &str) -> String {
    let query = format!("x={}", component.replace('+', "%2B"));
    url::form_urlencoded::parse(query.as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_and_credentials_come_from_the_amqp_url() {
        let m = Management::new("amqp://ops:p%40ss@rabbit.internal:5672/%2f", None).unwrap();
        assert_eq!(m.url(), "http://rabbit.internal:15672/");
        assert_eq!((m.user.as_str(), m.password.as_str(), m.vhost.as_str()), ("ops", "p@ss", "/"));

        let m = Management::new("amqps://a:b@mq.example:5671/prod, amqps://a:b@mq2.example:5671/prod", None).unwrap();
        assert_eq!((m.url().as_str(), m.vhost.as_str()), ("https://mq.example:15671/", "prod"));

        let m = Management::new("amqp://127.0.0.1", None).unwrap();
        assert_eq!((m.user.as_str(), m.password.as_str(), m.vhost.as_str()), ("guest", "guest", "/"));

        let m = Management::new("amqp://a:b@h/%2f", Some("http://mon:secret@h:8080/rabbit/")).unwrap();
        assert_eq!((m.user.as_str(), m.password.as_str()), ("mon", "secret"));
        assert_eq!(m.url(), "http://h:8080/rabbit/", "credentials go in a header, not the URL");
        assert!(Management::new("not a url", None).is_err());
    }
}
