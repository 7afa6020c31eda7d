//! What a webhook delivery may carry, checked once for every way in (the
//! gateway and direct IngestService calls) and for every store alike.
//!
//! Two rules keep every accepted delivery storable and readable:
//! - **No U+0000.** PostgreSQL refuses NUL in `jsonb` and `text`; SQLite
//!   would keep it. Rather than store it on one and fail on the other, a
//!   NUL anywhere (a value, a key, a query parameter, a header) is refused,
//!   naming where it was.
//! - **Bounded nesting.** Every JSON level becomes about three protobuf
//!   levels when a run is read back (`Struct`, its map entry, `Value`), and
//!   protobuf runtimes stop at 100 levels by default; 32 JSON levels stay
//!   under that in every response that carries a payload.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;
use uuid::Uuid;

/// Longest `Idempotency-Key` / `webhook-id` accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Deepest JSON nesting accepted by default.
pub const DEFAULT_MAX_DEPTH: usize = 32;

/// The limits every delivery is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLimits {
    /// Largest body in bytes.
    pub max_body_bytes: usize,
    /// Deepest nesting of objects and arrays in the body (a scalar body is
    /// depth 0, `{"a": 1}` is 1).
    pub max_depth: usize,
}

impl Default for DeliveryLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Why a delivery was refused; the text names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the body is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the body nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("{0} contains U+0000 (NUL), which zapflow does not accept")]
    Nul(Location),
    #[error("the idempotency key is longer than {MAX_IDEMPOTENCY_KEY} bytes")]
    KeyTooLong,
}

/// Where in a delivery a NUL was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A path into the body, like `body.items[2].name`.
    Body(String),
    Header(String),
    Query(String),
    IdempotencyKey,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Body(path) => f.write_str(path),
            Self::Header(name) => write!(f, "header {name:?}"),
            Self::Query(name) => write!(f, "query parameter {name:?}"),
            Self::IdempotencyKey => f.write_str("the idempotency key"),
        }
    }
}

impl DeliveryLimits {
    /// Refuses a body over the size limit, before anything else is done
    /// with it.
    pub fn check_size(&self, body: &[u8]) -> Result<(), DeliveryError> {
        if body.len() > self.max_body_bytes {
            return Err(DeliveryError::TooLarge {
                size: body.len(),
                limit: self.max_body_bytes,
            });
        }
        Ok(())
    }

    /// Parses and checks a body: size, JSON syntax, depth and NULs.
    pub fn parse_body(&self, body: &[u8]) -> Result<Value, DeliveryError> {
        self.check_size(body)?;
        // serde_json stops at 128 levels itself, so the walk below is
        // bounded whatever the input.
        let value: Value = serde_json::from_slice(body)
            .map_err(|error| DeliveryError::NotJson(error.to_string()))?;
        check_value(&value, "body", 0, self.max_depth)?;
        Ok(value)
    }
}

/// Refuses NULs in headers, query parameters (names and values) and the
/// idempotency key, and keys over [`MAX_IDEMPOTENCY_KEY`] bytes.
pub fn check_metadata(
    headers: &HashMap<String, String>,
    query: &HashMap<String, String>,
    idempotency_key: &str,
) -> Result<(), DeliveryError> {
    let nul = |text: &str| text.contains('\0');
    if let Some((name, _)) = headers.iter().find(|(n, v)| nul(n) || nul(v)) {
        return Err(DeliveryError::Nul(Location::Header(name.clone())));
    }
    if let Some((name, _)) = query.iter().find(|(n, v)| nul(n) || nul(v)) {
        return Err(DeliveryError::Nul(Location::Query(name.clone())));
    }
    if idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(DeliveryError::KeyTooLong);
    }
    if nul(idempotency_key) {
        return Err(DeliveryError::Nul(Location::IdempotencyKey));
    }
    Ok(())
}

fn check_value(value: &Value, path: &str, depth: usize, limit: usize) -> Result<(), DeliveryError> {
    match value {
        Value::String(text) if text.contains('\0') => {
            Err(DeliveryError::Nul(Location::Body(path.to_owned())))
        }
        Value::Array(items) => {
            ensure_depth(depth + 1, limit)?;
            items.iter().enumerate().try_for_each(|(index, item)| {
                check_value(item, &format!("{path}[{index}]"), depth + 1, limit)
            })
        }
        Value::Object(fields) => {
            ensure_depth(depth + 1, limit)?;
            fields.iter().try_for_each(|(key, item)| {
                let path = format!("{path}.{key}");
                if key.contains('\0') {
                    return Err(DeliveryError::Nul(Location::Body(path)));
                }
                check_value(item, &path, depth + 1, limit)
            })
        }
        _ => Ok(()),
    }
}

fn ensure_depth(depth: usize, limit: usize) -> Result<(), DeliveryError> {
    if depth > limit {
        Err(DeliveryError::TooDeep { limit })
    } else {
        Ok(())
    }
}

/// A zap id as webhook URLs spell it: lowercase and hyphenated. Every other
/// spelling the UUID parser would accept (uppercase, no hyphens, braces,
/// `urn:uuid:`) is refused, so that one zap has one URL and one rate-limit
/// budget.
pub fn parse_zap_id(text: &str) -> Option<Uuid> {
    let id = Uuid::try_parse(text).ok()?;
    let mut canonical = Uuid::encode_buffer();
    (id.hyphenated().encode_lower(&mut canonical) == text).then_some(id)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested(depth: usize) -> String {
        "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth)
    }

    #[test]
    fn nesting_is_counted_by_objects_and_arrays() {
        let limits = DeliveryLimits {
            max_depth: 3,
            ..Default::default()
        };
        assert!(limits.parse_body(b"1").is_ok());
        assert!(limits.parse_body(nested(3).as_bytes()).is_ok());
        assert_eq!(
            limits.parse_body(nested(4).as_bytes()),
            Err(DeliveryError::TooDeep { limit: 3 })
        );
        assert!(limits.parse_body(b"[[[1]]]").is_ok());
        assert!(limits.parse_body(b"[[[[1]]]]").is_err());
        // Far past serde_json's own limit: an error, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(matches!(
            limits.parse_body(deep.as_bytes()),
            Err(DeliveryError::NotJson(_))
        ));
    }

    #[test]
    fn a_nul_is_named_wherever_it_is() {
        let limits = DeliveryLimits::default();
        let refused = |body: serde_json::Value| {
            limits
                .parse_body(body.to_string().as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(json!({"x": "a\u{0}b"})),
            "body.x contains U+0000 (NUL), which zapflow does not accept"
        );
        assert_eq!(
            refused(json!({"items": [1, {"k\u{0}": 1}]})),
            "body.items[1].k\u{0} contains U+0000 (NUL), which zapflow does not accept"
        );
        let query = HashMap::from([("q".to_owned(), "\0".to_owned())]);
        assert_eq!(
            check_metadata(&HashMap::new(), &query, "")
                .unwrap_err()
                .to_string(),
            "query parameter \"q\" contains U+0000 (NUL), which zapflow does not accept"
        );
        let header = HashMap::from([("x-\0".to_owned(), "v".to_owned())]);
        assert!(check_metadata(&header, &HashMap::new(), "").is_err());
        assert_eq!(
            check_metadata(&HashMap::new(), &HashMap::new(), &"k".repeat(256)),
            Err(DeliveryError::KeyTooLong)
        );
    }

    #[test]
    fn only_the_canonical_spelling_of_a_zap_id_is_accepted() {
        let id = Uuid::new_v4();
        assert_eq!(parse_zap_id(&id.to_string()), Some(id));
        for other in [
            id.to_string().to_uppercase(),
            id.simple().to_string(),
            id.urn().to_string(),
            id.braced().to_string(),
            "not-a-uuid".to_owned(),
        ] {
            assert_eq!(parse_zap_id(&other), None, "{other}");
        }
    }
}
