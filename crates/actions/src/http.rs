//! The `http` action: one templated HTTP request with reqwest, sent only to
//! addresses the SSRF guard accepts.

mod client;

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde_json::Value;
use tracing::Instrument;
use zapflow_core::webhook_signature::{self, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use zapflow_telemetry::trace;

use self::client::error_chain;
pub use self::client::{HttpClient, HttpSettings};
use crate::action::{Action, ActionError, Completed, StepRef};
use crate::field::{
    ActionField, ActionType, FieldError, Fields, Template, any_text, template, text, value,
};

const METHOD: ActionField = ActionField {
    name: "method",
    description: "GET, POST, PUT, PATCH or DELETE; POST when omitted.",
    required: false,
    templated: false,
};
const URL: ActionField = ActionField {
    name: "url",
    description: "The http:// or https:// URL to call.",
    required: true,
    templated: true,
};
const HEADERS: ActionField = ActionField {
    name: "headers",
    description: "Request headers: an object of header name to templated value.",
    required: false,
    templated: true,
};
const BODY: ActionField = ActionField {
    name: "body",
    description: "The request body, as text.",
    required: false,
    templated: true,
};
const CONTENT_TYPE_FIELD: ActionField = ActionField {
    name: "content_type",
    description: "The body's Content-Type; application/json when omitted.",
    required: false,
    templated: false,
};
const SIGNING_SECRET: ActionField = ActionField {
    name: "signing_secret",
    description: "A Standard Webhooks secret (whsec_...): requests then carry webhook-id, \
                  webhook-timestamp and webhook-signature headers.",
    required: false,
    templated: false,
};
const TIMEOUT: ActionField = ActionField {
    name: "timeout_seconds",
    description: "Bound on the whole request, at most 60; 10 when omitted.",
    required: false,
    templated: false,
};

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TIMEOUT_SECONDS: f64 = 60.0;
const DEFAULT_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/json");
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Headers zapflow sets itself, or that describe the connection rather than
/// the request; a zap may not set them.
const RESERVED_HEADERS: [&str; 14] = [
    "connection",
    "content-length",
    "content-type",
    "host",
    IDEMPOTENCY_KEY,
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
];

/// An http action's configuration.
pub(crate) struct Http {
    method: Method,
    url: Template,
    headers: Vec<(HeaderName, Template)>,
    body: Option<Template>,
    content_type: Option<HeaderValue>,
    signing_secret: Option<webhook_signature::Secret>,
    timeout: Duration,
}

impl Action for Http {
    const TYPE: ActionType = ActionType {
        name: "http",
        description: "Sends an HTTP request. The URL, header values and body are minijinja \
                      templates over trigger, headers, query, steps and run. Only public \
                      addresses are reached unless the operator allows a range; redirects are \
                      not followed.",
        fields: &[
            METHOD,
            URL,
            HEADERS,
            BODY,
            CONTENT_TYPE_FIELD,
            SIGNING_SECRET,
            TIMEOUT,
        ],
        flow: false,
    };

    type Runner = HttpClient;

    fn parse(fields: &Fields<'_>) -> Result<Self, FieldError> {
        Ok(Self {
            method: fields
                .optional(&METHOD, text(parse_method))?
                .unwrap_or(Method::POST),
            url: fields.required(&URL, template(|url| parse_url(url).map(drop)))?,
            headers: fields.optional(&HEADERS, read_headers)?.unwrap_or_default(),
            body: fields.optional(&BODY, template(any_text))?,
            content_type: fields.optional(&CONTENT_TYPE_FIELD, text(parse_header_value))?,
            signing_secret: fields.optional(&SIGNING_SECRET, text(parse_secret))?,
            timeout: fields
                .optional(&TIMEOUT, value(parse_timeout))?
                .unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    async fn execute(
        self,
        client: &HttpClient,
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        let mut request = self.render(client, context, step)?;
        let span = trace::span(|| {
            tracing::info_span!(
                "http",
                otel.kind = "client",
                http.request.method = %request.method(),
                server.address = request.url().host_str().unwrap_or_default(),
            )
        });
        // The target continues the run's trace, unless the zap sets the
        // header itself.
        if let Some(traceparent) = trace::traceparent(&span)
            && let Ok(value) = HeaderValue::from_str(&traceparent)
        {
            request
                .headers_mut()
                .entry(trace::TRACEPARENT)
                .or_insert(value);
        }
        let output = client.send(request).instrument(span).await?;
        Ok(Completed::with(output))
    }

    async fn preview(
        self,
        client: &HttpClient,
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        let request = self.render(client, context, step)?;
        client.check_host(request.url()).await?;
        let headers: serde_json::Map<String, Value> = request
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), Value::String(value))
            })
            .collect();
        let body = request
            .body()
            .and_then(|body| body.as_bytes())
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        Ok(Completed::with(serde_json::json!({
            "method": request.method().as_str(),
            "url": request.url().as_str(),
            "headers": headers,
            "body": body,
        })))
    }
}

impl Http {
    /// The request this action makes for `step` in `context`.
    fn render(
        &self,
        client: &HttpClient,
        context: &Value,
        step: StepRef,
    ) -> Result<reqwest::Request, ActionError> {
        let url = self.url.render_as(context, parse_url)?;
        let builder = client.request(self.method.clone(), url)?;

        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            // Rejects CR and LF, so a payload cannot add a header. The
            // rendered value is not quoted: it may hold a secret.
            let value = value.render_as(context, |text| {
                HeaderValue::from_str(text).map_err(|_| {
                    "not a valid header value (a line break or another control character)"
                        .to_owned()
                })
            })?;
            headers.append(name, value);
        }
        let idempotency_key = HttpClient::idempotency_key(step);
        let body = self
            .body
            .as_ref()
            .map(|body| body.render(context))
            .transpose()?;
        if let Some(secret) = &self.signing_secret {
            // The message id is the idempotency key: the same on every
            // attempt, so the receiver can drop a repeat.
            let timestamp = chrono::Utc::now().timestamp();
            let body = body.as_deref().unwrap_or_default().as_bytes();
            let signature = webhook_signature::sign(secret, &idempotency_key, timestamp, body);
            for (name, value) in [
                (HEADER_ID, idempotency_key.clone()),
                (HEADER_TIMESTAMP, timestamp.to_string()),
                (HEADER_SIGNATURE, signature),
            ] {
                headers.insert(name, header_value(name, &value)?);
            }
        }
        headers.insert(
            IDEMPOTENCY_KEY,
            header_value("Idempotency-Key", &idempotency_key)?,
        );

        let mut builder = builder.timeout(self.timeout).headers(headers);
        if let Some(body) = body {
            let content_type = self.content_type.clone().unwrap_or(DEFAULT_CONTENT_TYPE);
            builder = builder.header(CONTENT_TYPE, content_type).body(body);
        }
        builder
            .build()
            .map_err(|error| ActionError::Permanent(format!("http: {}", error_chain(&error))))
    }
}

fn header_value(name: &str, value: &str) -> Result<HeaderValue, FieldError> {
    HeaderValue::from_str(value).map_err(|error| FieldError::new(name, error.to_string()))
}

/// Reads the `headers` object: names a zap may set, to templated values
/// that are valid header values when they hold no template syntax.
fn read_headers(
    field: &ActionField,
    value: &Value,
) -> Result<Vec<(HeaderName, Template)>, FieldError> {
    let Some(entries) = value.as_object() else {
        return Err(FieldError::new(
            field.name,
            "must be an object of header names to values",
        ));
    };
    let check_value = |text: &str| {
        HeaderValue::from_str(text)
            .map(drop)
            .map_err(|_| format!("not a valid header value: {text:?}"))
    };
    entries
        .iter()
        .map(|(name, value)| {
            let at = format!("{}.{name}", field.name);
            let header =
                check_header_name(name).map_err(|message| FieldError::new(&at, message))?;
            Ok((header, Template::read(&at, value, false, check_value)?))
        })
        .collect()
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

fn parse_header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("not a valid header value: {text:?}"))
}

fn parse_secret(text: &str) -> Result<webhook_signature::Secret, String> {
    text.parse()
        .map_err(|error: webhook_signature::SecretError| error.to_string())
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn step() -> StepRef {
        StepRef {
            run_id: uuid::Uuid::nil(),
            stage: 2,
        }
    }

    /// The request an action with `config` makes in `context`.
    fn build(config: Value, context: &Value) -> Result<reqwest::Request, ActionError> {
        let client = HttpClient::new(&HttpSettings::default()).unwrap();
        let action = Http::from_config(config.as_object().unwrap())?;
        action.render(&client, context, step())
    }

    #[test]
    fn builds_the_request_from_the_rendered_fields() {
        let context = json!({"trigger": {"id": 7, "token": "t0k"}});
        let request = build(
            json!({
                "method": "put",
                "url": "https://api.example.com/items/{{ trigger.id }}",
                "headers": {"Authorization": "Bearer {{ trigger.token }}"},
                "body": "{\"id\": {{ trigger.id }}}",
                "timeout_seconds": "2.5",
            }),
            &context,
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
        let request = build(json!({"url": "http://example.com/"}), &json!({})).unwrap();
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
            match build(fields.clone(), &context) {
                Err(ActionError::Permanent(message)) => {
                    assert!(message.starts_with(expected), "{fields}: {message}")
                }
                other => panic!("{fields}: {other:?}"),
            }
        }
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
