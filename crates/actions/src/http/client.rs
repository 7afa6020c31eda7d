//! The client that sends the http action's requests, and what a response
//! becomes: the step's output or an error that says whether to try again.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use reqwest::redirect::Policy;
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::{Map, Value, json};

use crate::action::{ActionError, StepRef};
use crate::ssrf::{self, AddressFilter, Blocked, GuardedResolver, IpNet};

/// How much of an error response's body a step error quotes.
const ERROR_EXCERPT_CHARS: usize = 200;

/// How the HTTP action reaches the network.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Ranges the action may reach although they are not public (loopback,
    /// private networks, ...): for tests and for deployments whose targets
    /// live on a private network. Empty means public addresses only.
    pub allow_cidrs: Vec<IpNet>,
    /// How much of a response body the step output keeps.
    pub max_response_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            allow_cidrs: Vec::new(),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// Sends the http action's requests. Cheap to clone: clones share one
/// connection pool.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    filter: AddressFilter,
    max_response_bytes: usize,
}

impl HttpClient {
    /// Fails only when the TLS setup does (no CA certificates on the system).
    pub fn new(settings: &HttpSettings) -> Result<Self, String> {
        let filter = AddressFilter::new(settings.allow_cidrs.iter().copied());
        let client = reqwest::Client::builder()
            // A redirect could point anywhere, including at a blocked address.
            .redirect(Policy::none())
            // A proxy would resolve and connect on our behalf, past the guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(filter.clone())))
            .user_agent("zapflow")
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {}", error_chain(&error)))?;
        Ok(Self {
            client,
            filter,
            max_response_bytes: settings.max_response_bytes,
        })
    }

    /// The `Idempotency-Key` of a step's request: the same on every attempt,
    /// so the receiving service can drop a duplicate.
    pub fn idempotency_key(step: StepRef) -> String {
        format!("{}:{}", step.run_id, step.stage)
    }

    /// Whether a request to `url` would get past the guard: its host name
    /// is resolved and checked as a real request's would be (a literal IP
    /// is checked by [`Self::request`]).
    pub(crate) async fn check_host(&self, url: &Url) -> Result<(), ActionError> {
        let Some(host) = url.host_str().filter(|_| ssrf::literal_ip(url).is_none()) else {
            return Ok(());
        };
        let name: reqwest::dns::Name = host
            .parse()
            .map_err(|_| ActionError::Permanent(format!("not a host name: {host:?}")))?;
        reqwest::dns::Resolve::resolve(&GuardedResolver::new(self.filter.clone()), name)
            .await
            .map(drop)
            .map_err(|error| ActionError::Permanent(error.to_string()))
    }

    /// A request to `url`, refused at once when the URL names an address
    /// the guard blocks; names are checked when they resolve.
    pub(crate) fn request(&self, method: Method, url: Url) -> Result<RequestBuilder, ActionError> {
        if let Some(address) = ssrf::literal_ip(&url) {
            self.filter
                .check(address)
                .map_err(|blocked| ActionError::Permanent(blocked.to_string()))?;
        }
        Ok(self.client.request(method, url))
    }

    /// Sends `request`; the result is the step's output: status, headers and
    /// body.
    pub(crate) async fn send(&self, request: reqwest::Request) -> Result<Value, ActionError> {
        // Every request the action builds carries its timeout.
        let timeout = request.timeout().copied().unwrap_or_default();
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|error| classify_request_error(error, timeout))?;
        let status = response.status();
        let headers = headers_to_json(response.headers());
        let header = |name| {
            response
                .headers()
                .get(name)
                .map(|value: &HeaderValue| String::from_utf8_lossy(value.as_bytes()).into_owned())
        };
        let (location, content_type) = (header(LOCATION), header(CONTENT_TYPE));
        let bytes = read_capped(response, self.max_response_bytes)
            .await
            .map_err(|error| classify_request_error(error, timeout))?;
        let body = Body::new(bytes, content_type);
        classify_status(status, location.as_deref(), &body.describe())?;
        Ok(json!({ "status": status.as_u16(), "headers": headers, "body": body.into_output() }))
    }
}

/// Reads at most `limit` bytes of the body; the rest is never downloaded.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() >= room {
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A response body as the step output keeps it. Text stays text (JSON
/// when it parses), so templates can use it; any other body is kept whole
/// as base64, which every store accepts and nothing is lost from.
#[derive(Debug, PartialEq)]
enum Body {
    /// UTF-8 of a text content type, or of none declared.
    Text(String),
    Binary {
        bytes: Vec<u8>,
        content_type: Option<String>,
    },
}

impl Body {
    fn new(bytes: Vec<u8>, content_type: Option<String>) -> Self {
        if !content_type.as_deref().is_none_or(is_text_type) {
            return Self::Binary {
                bytes,
                content_type,
            };
        }
        match utf8_prefix(bytes) {
            Ok(text) => Self::Text(text),
            Err(bytes) => Self::Binary {
                bytes,
                content_type,
            },
        }
    }

    /// What an error message quotes of the body.
    fn describe(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Binary {
                bytes,
                content_type,
            } => format!(
                "({} bytes of {})",
                bytes.len(),
                content_type.as_deref().unwrap_or("binary data")
            ),
        }
    }

    fn into_output(self) -> Value {
        match self {
            Self::Text(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            Self::Binary {
                bytes,
                content_type,
            } => json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
                "content_type": content_type,
            }),
        }
    }
}

/// Whether a content type declares text: `text/*`, JSON, XML, JavaScript,
/// form data, or anything with a charset.
fn is_text_type(content_type: &str) -> bool {
    let content_type = content_type.to_ascii_lowercase();
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let has_charset = parts.any(|parameter| parameter.trim().starts_with("charset="));
    has_charset
        || essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || matches!(
            essence,
            "application/json"
                | "application/x-ndjson"
                | "application/xml"
                | "application/javascript"
                | "application/x-www-form-urlencoded"
        )
}

/// The bytes as UTF-8, less an incomplete character at the end (where the
/// size cap may cut one); the bytes back when they are not UTF-8.
fn utf8_prefix(bytes: Vec<u8>) -> Result<String, Vec<u8>> {
    let error = match String::from_utf8(bytes) {
        Ok(text) => return Ok(text),
        Err(error) => error,
    };
    let utf8 = error.utf8_error();
    let mut bytes = error.into_bytes();
    if utf8.error_len().is_some() {
        return Err(bytes);
    }
    bytes.truncate(utf8.valid_up_to());
    String::from_utf8(bytes).map_err(std::string::FromUtf8Error::into_bytes)
}

fn headers_to_json(headers: &HeaderMap) -> Value {
    let mut map = Map::new();
    for name in headers.keys() {
        let values: Vec<_> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        map.insert(name.as_str().to_owned(), Value::String(values.join(", ")));
    }
    Value::Object(map)
}

/// 2xx succeeds; 408, 429 and 5xx may succeed later; a redirect or any
/// other status would fail the same way again.
fn classify_status(
    status: StatusCode,
    location: Option<&str>,
    body: &str,
) -> Result<(), ActionError> {
    if status.is_success() {
        return Ok(());
    }
    if status.is_redirection() {
        let target = location
            .map(|location| format!(" (location: {location})"))
            .unwrap_or_default();
        return Err(ActionError::Permanent(format!(
            "http {status}: redirects are not followed{target}"
        )));
    }
    let excerpt: String = body.trim().chars().take(ERROR_EXCERPT_CHARS).collect();
    let message = if excerpt.is_empty() {
        format!("http {status}")
    } else {
        format!("http {status}: {excerpt}")
    };
    if matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
    ) || status.is_server_error()
    {
        Err(ActionError::Transient(message))
    } else {
        Err(ActionError::Permanent(message))
    }
}

/// A blocked address is permanent; everything that went wrong on the way
/// (refused, reset, timed out, DNS failure, TLS) may work on another attempt.
fn classify_request_error(error: reqwest::Error, timeout: Duration) -> ActionError {
    if let Some(blocked) = find_source::<Blocked>(&error) {
        return ActionError::Permanent(blocked.to_string());
    }
    if error.is_builder() {
        return ActionError::Permanent(format!("http: {}", error_chain(&error)));
    }
    if error.is_timeout() {
        return ActionError::Transient(format!("http: timed out after {timeout:?}"));
    }
    ActionError::Transient(format!("http: {}", error_chain(&error)))
}

fn find_source<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// The error and its causes on one line, without the URL (which may carry
/// a secret in its query and is in the zap already).
pub(crate) fn error_chain(error: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        let part = match error.downcast_ref::<reqwest::Error>() {
            Some(error) => reqwest_message(error),
            None => error.to_string(),
        };
        if !text.ends_with(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        current = error.source();
    }
    text
}

fn reqwest_message(error: &reqwest::Error) -> String {
    let text = error.to_string();
    match error.url() {
        Some(url) => text.replace(&format!(" for url ({url})"), ""),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn classifies_statuses() {
        let transient = |code: u16| {
            matches!(
                classify_status(StatusCode::from_u16(code).unwrap(), None, ""),
                Err(ActionError::Transient(_))
            )
        };
        let permanent = |code: u16| {
            matches!(
                classify_status(StatusCode::from_u16(code).unwrap(), None, ""),
                Err(ActionError::Permanent(_))
            )
        };
        for code in [200, 201, 204] {
            assert_eq!(
                classify_status(StatusCode::from_u16(code).unwrap(), None, ""),
                Ok(())
            );
        }
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(transient(code), "{code}");
        }
        for code in [301, 302, 307, 308, 400, 401, 403, 404, 410, 422] {
            assert!(permanent(code), "{code}");
        }
    }

    #[test]
    fn text_bodies_stay_text_and_others_become_base64() {
        let output = |bytes: &[u8], content_type: Option<&str>| {
            Body::new(bytes.to_vec(), content_type.map(str::to_owned)).into_output()
        };
        assert_eq!(
            output(br#"{"a": 1}"#, Some("application/json")),
            json!({"a": 1})
        );
        assert_eq!(output(b"hi", None), json!("hi"));
        assert_eq!(output(b"a\0b", Some("text/plain")), json!("a\u{0}b"));
        assert_eq!(
            output("caf\u{e9}".as_bytes(), Some("text/plain; charset=utf-8")),
            json!("caf\u{e9}")
        );
        // A character cut by the size cap is dropped, not a reason for base64.
        assert_eq!(
            output(&"ab\u{e9}".as_bytes()[..3], Some("text/plain")),
            json!("ab")
        );
        assert_eq!(
            output(b"\0\x01\xff", Some("application/octet-stream")),
            json!({"base64": "AAH/", "content_type": "application/octet-stream"})
        );
        assert_eq!(
            output(b"\xff\xfe", None),
            json!({"base64": "//4=", "content_type": null})
        );
        assert_eq!(
            Body::new(vec![0; 3], Some("image/png".into())).describe(),
            "(3 bytes of image/png)"
        );
    }
}
