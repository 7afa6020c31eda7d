//! The `http` action: one templated HTTP request with reqwest, sent only to
//! addresses the SSRF guard accepts.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::redirect::Policy;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};
use zapflow_core::webhook_signature;

use crate::catalog::{ActionField, ActionType, FieldError};
use crate::ssrf::{self, AddressFilter, Blocked, GuardedResolver, IpNet};
use crate::{ActionError, StepRef, render_field};

pub const TYPE: &str = "http";

pub const ACTION_TYPE: ActionType = ActionType {
    name: TYPE,
    description: "Sends an HTTP request. The URL, header values and body are minijinja templates \
                  over trigger, headers, query, steps and run. Only public addresses are reached \
                  unless the operator allows a range; redirects are not followed.",
    fields: &[
        ActionField {
            name: "method",
            description: "GET, POST, PUT, PATCH or DELETE; POST when omitted.",
            required: false,
            templated: false,
        },
        ActionField {
            name: "url",
            description: "The http:// or https:// URL to call.",
            required: true,
            templated: true,
        },
        ActionField {
            name: "headers",
            description: "Request headers: an object of header name to templated value.",
            required: false,
            templated: true,
        },
        ActionField {
            name: "body",
            description: "The request body, as text.",
            required: false,
            templated: true,
        },
        ActionField {
            name: "content_type",
            description: "The body's Content-Type; application/json when omitted.",
            required: false,
            templated: false,
        },
        ActionField {
            name: "signing_secret",
            description: "A Standard Webhooks secret (whsec_...): requests then carry webhook-id, \
                          webhook-timestamp and webhook-signature headers.",
            required: false,
            templated: false,
        },
        ActionField {
            name: "timeout_seconds",
            description: "Bound on the whole request, at most 60; 10 when omitted.",
            required: false,
            templated: false,
        },
    ],
};

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TIMEOUT_SECONDS: f64 = 60.0;
const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// How much of an error response's body a step error quotes.
const ERROR_EXCERPT_CHARS: usize = 200;
/// Headers zapflow sets itself, or that describe the connection rather than
/// the request; a zap may not set them.
const RESERVED_HEADERS: [&str; 14] = [
    "connection",
    "content-length",
    "content-type",
    "host",
    "idempotency-key",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "webhook-id",
    "webhook-signature",
    "webhook-timestamp",
];

/// Checks a plain-string field given without template syntax when the zap
/// is saved.
pub(crate) fn validate_literal(field: &str, text: &str) -> Result<(), String> {
    match field {
        "method" => parse_method(text).map(drop),
        "url" => parse_url(text).map(drop),
        "content_type" => HeaderValue::from_str(text)
            .map(drop)
            .map_err(|_| format!("not a valid header value: {text:?}")),
        "signing_secret" => text
            .parse::<webhook_signature::Secret>()
            .map(drop)
            .map_err(|error| error.to_string()),
        _ => Ok(()),
    }
}

/// Checks the fields that are not plain strings. `None` leaves the field to
/// the common string checks. Errors name the field relative to `config`.
pub(crate) fn validate_structured(field: &str, value: &Value) -> Option<Result<(), FieldError>> {
    match field {
        "headers" => Some(validate_headers(value)),
        "timeout_seconds" => Some(
            parse_timeout(value)
                .map(drop)
                .map_err(|message| FieldError {
                    field: field.into(),
                    message,
                }),
        ),
        _ => None,
    }
}

fn validate_headers(value: &Value) -> Result<(), FieldError> {
    let Some(headers) = value.as_object() else {
        return Err(FieldError {
            field: "headers".into(),
            message: "must be an object of header names to values".into(),
        });
    };
    for (name, value) in headers {
        let error = |message: String| FieldError {
            field: format!("headers.{name}"),
            message,
        };
        check_header_name(name).map_err(error)?;
        let Some(text) = value.as_str() else {
            return Err(error("must be a string".into()));
        };
        zapflow_core::template::check(text)
            .map_err(|template| error(format!("invalid template: {template}")))?;
        let literal = !text.contains("{{") && !text.contains("{%");
        if literal && HeaderValue::from_str(text).is_err() {
            return Err(error(format!("not a valid header value: {text:?}")));
        }
    }
    Ok(())
}

fn check_header_name(name: &str) -> Result<HeaderName, String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("not a valid header name: {name:?}"))?;
    if header == CONTENT_TYPE {
        return Err("set the content type with the content_type field".into());
    }
    if RESERVED_HEADERS.contains(&header.as_str()) {
        return Err("this header is set by zapflow".into());
    }
    Ok(header)
}

fn parse_method(text: &str) -> Result<Method, String> {
    let upper = text.trim().to_ascii_uppercase();
    if !METHODS.contains(&upper.as_str()) {
        return Err(format!(
            "unknown method {text:?}; known methods: {}",
            METHODS.join(", ")
        ));
    }
    Method::from_bytes(upper.as_bytes()).map_err(|error| error.to_string())
}

fn parse_url(text: &str) -> Result<Url, String> {
    let url =
        Url::parse(text.trim()).map_err(|error| format!("not a valid URL ({error}): {text:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("only http and https URLs are supported: {text:?}"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("the URL has no host: {text:?}"));
    }
    Ok(url)
}

/// A number of seconds, as a JSON number or a numeric string.
fn parse_timeout(value: &Value) -> Result<Duration, String> {
    let seconds = match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("must be a number of seconds, got {value}"))?;
    if !(seconds > 0.0 && seconds <= MAX_TIMEOUT_SECONDS) {
        return Err(format!(
            "must be more than 0 and at most {MAX_TIMEOUT_SECONDS} seconds, got {seconds}"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

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

    pub(crate) async fn send(
        &self,
        config: &Map<String, Value>,
        context: &Value,
        step: StepRef,
    ) -> Result<Value, ActionError> {
        let request = self.build_request(config, context, step)?;
        let timeout = request.timeout().copied().unwrap_or(DEFAULT_TIMEOUT);
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

    fn build_request(
        &self,
        config: &Map<String, Value>,
        context: &Value,
        step: StepRef,
    ) -> Result<reqwest::Request, ActionError> {
        let permanent =
            |name: &str, error: String| ActionError::Permanent(format!("{name}: {error}"));
        let literal = |name: &str| match config.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.as_str())),
            Some(_) => Err(permanent(name, "must be a string".into())),
        };

        let method = match literal("method")? {
            Some(text) => parse_method(text).map_err(|error| permanent("method", error))?,
            None => Method::POST,
        };
        let url = render_field(config, "url", context)?
            .ok_or_else(|| permanent("url", "required".into()))?;
        let url = parse_url(&url).map_err(|error| permanent("url", error))?;
        if let Some(address) = ssrf::literal_ip(&url) {
            self.filter
                .check(address)
                .map_err(|blocked| ActionError::Permanent(blocked.to_string()))?;
        }
        let timeout = match config.get("timeout_seconds") {
            Some(value) => {
                parse_timeout(value).map_err(|error| permanent("timeout_seconds", error))?
            }
            None => DEFAULT_TIMEOUT,
        };

        let mut headers = HeaderMap::new();
        match config.get("headers") {
            None => {}
            Some(Value::Object(entries)) => {
                for (name, value) in entries {
                    let field = format!("headers.{name}");
                    let header =
                        check_header_name(name).map_err(|error| permanent(&field, error))?;
                    let Some(source) = value.as_str() else {
                        return Err(permanent(&field, "must be a string".into()));
                    };
                    let text = zapflow_core::template::render(source, context)
                        .map_err(|error| permanent(&field, error.to_string()))?;
                    // Rejects CR and LF, so a payload cannot add a header. The
                    // rendered value is not quoted: it may hold a secret.
                    let value = HeaderValue::from_str(&text).map_err(|_| {
                        permanent(
                            &field,
                            "not a valid header value (a line break or another control \
                             character)"
                                .into(),
                        )
                    })?;
                    headers.append(header, value);
                }
            }
            Some(_) => {
                return Err(permanent(
                    "headers",
                    "must be an object of header names to values".into(),
                ));
            }
        }
        let idempotency_key = Self::idempotency_key(step);
        let body = render_field(config, "body", context)?;
        if let Some(secret) = literal("signing_secret")? {
            let secret: webhook_signature::Secret =
                secret
                    .parse()
                    .map_err(|error: webhook_signature::SecretError| {
                        permanent("signing_secret", error.to_string())
                    })?;
            // The message id is the idempotency key: the same on every
            // attempt, so the receiver can drop a repeat.
            let timestamp = chrono::Utc::now().timestamp();
            let body = body.as_deref().unwrap_or_default().as_bytes();
            let signature = webhook_signature::sign(&secret, &idempotency_key, timestamp, body);
            for (name, value) in [
                ("webhook-id", idempotency_key.clone()),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signature),
            ] {
                let value = HeaderValue::from_str(&value)
                    .map_err(|error| permanent(name, error.to_string()))?;
                headers.insert(name, value);
            }
        }
        let idempotency_key = HeaderValue::from_str(&idempotency_key)
            .map_err(|error| permanent("Idempotency-Key", error.to_string()))?;
        headers.insert("idempotency-key", idempotency_key);

        let mut request = self
            .client
            .request(method, url)
            .timeout(timeout)
            .headers(headers);
        if let Some(body) = body {
            let content_type = literal("content_type")?.unwrap_or(DEFAULT_CONTENT_TYPE);
            let content_type = HeaderValue::from_str(content_type).map_err(|_| {
                permanent(
                    "content_type",
                    format!("not a valid header value: {content_type:?}"),
                )
            })?;
            request = request.header(CONTENT_TYPE, content_type).body(body);
        }
        request
            .build()
            .map_err(|error| ActionError::Permanent(format!("http: {}", error_chain(&error))))
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
fn error_chain(error: &reqwest::Error) -> String {
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

    fn config(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn step() -> StepRef {
        StepRef {
            run_id: uuid::Uuid::nil(),
            stage: 2,
        }
    }

    fn client() -> HttpClient {
        HttpClient::new(&HttpSettings::default()).unwrap()
    }

    #[test]
    fn builds_the_request_from_the_rendered_fields() {
        let context = json!({"trigger": {"id": 7, "token": "t0k"}});
        let request = client()
            .build_request(
                &config(json!({
                    "method": "put",
                    "url": "https://api.example.com/items/{{ trigger.id }}",
                    "headers": {"Authorization": "Bearer {{ trigger.token }}"},
                    "body": "{\"id\": {{ trigger.id }}}",
                    "timeout_seconds": "2.5",
                })),
                &context,
                step(),
            )
            .unwrap();
        assert_eq!(request.method(), Method::PUT);
        assert_eq!(request.url().as_str(), "https://api.example.com/items/7");
        assert_eq!(request.timeout(), Some(&Duration::from_millis(2500)));
        let headers = request.headers();
        assert_eq!(headers["authorization"], "Bearer t0k");
        assert_eq!(
            headers["idempotency-key"],
            "00000000-0000-0000-0000-000000000000:2"
        );
        assert_eq!(headers["content-type"], "application/json");
        let body = request.body().and_then(|body| body.as_bytes()).unwrap();
        assert_eq!(body, br#"{"id": 7}"#);
    }

    #[test]
    fn defaults_to_post_without_a_body_or_content_type() {
        let request = client()
            .build_request(
                &config(json!({"url": "http://example.com/"})),
                &json!({}),
                step(),
            )
            .unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.timeout(), Some(&DEFAULT_TIMEOUT));
        assert!(request.headers().get(CONTENT_TYPE).is_none());
    }

    #[test]
    fn bad_input_is_a_permanent_error_naming_the_field() {
        let cases = [
            (json!({"url": "{{ trigger.missing }}"}), "url: "),
            (json!({"url": "ftp://example.com/"}), "url: only http"),
            (
                json!({"url": "http://example.com", "method": "TRACE"}),
                "method: ",
            ),
            (
                json!({"url": "http://example.com", "headers": {"X-A": "{{ trigger.line }}"}}),
                "headers.X-A: not a valid header value",
            ),
            (
                json!({"url": "http://example.com", "headers": {"Host": "x"}}),
                "headers.Host: ",
            ),
            (
                json!({"url": "http://example.com", "timeout_seconds": 600}),
                "timeout_seconds: ",
            ),
            (
                json!({"url": "http://169.254.169.254/latest/meta-data/"}),
                "blocked: ",
            ),
            (json!({"url": "http://2130706433/"}), "blocked: 127.0.0.1"),
            (
                json!({"url": "http://[::ffff:127.0.0.1]:8080/"}),
                "blocked: ::ffff:127.0.0.1",
            ),
            (
                json!({"url": "http://{{ trigger.host }}/"}),
                "blocked: 10.0.0.1",
            ),
        ];
        let context = json!({"trigger": {"line": "x\r\nBcc: evil", "host": "0x0a.1"}});
        for (fields, expected) in cases {
            match client().build_request(&config(fields.clone()), &context, step()) {
                Err(ActionError::Permanent(message)) => {
                    assert!(message.starts_with(expected), "{fields}: {message}")
                }
                other => panic!("{fields}: {other:?}"),
            }
        }
    }

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

    #[test]
    fn accepts_timeouts_as_numbers_or_numeric_strings() {
        assert_eq!(parse_timeout(&json!(30)), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout(&json!("60")), Ok(Duration::from_secs(60)));
        assert_eq!(parse_timeout(&json!(0.5)), Ok(Duration::from_millis(500)));
        for bad in [
            json!(0),
            json!(-1),
            json!(61),
            json!("soon"),
            json!(true),
            json!("NaN"),
        ] {
            assert!(parse_timeout(&bad).is_err(), "{bad}");
        }
    }
}
