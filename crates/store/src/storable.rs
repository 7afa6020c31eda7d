//! What both databases can keep.
//!
//! PostgreSQL's `text` and `jsonb` refuse U+0000 (NUL); SQLite keeps it. So
//! that a step's result reads the same on every store, and recording it can
//! never fail on its content, everything recorded from the outside world
//! (step outputs and errors) has each NUL replaced with U+FFFD, the
//! replacement character, as lossy UTF-8 decoding does with bytes that are
//! not text. Bodies that are not text at all are the actions' business: the
//! http action keeps them as base64.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::StepOutcome;

const NUL: char = '\0';

/// `text` with every NUL replaced.
pub(crate) fn storable_text(text: &str) -> Cow<'_, str> {
    if text.contains(NUL) {
        Cow::Owned(text.replace(NUL, "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `value` with every NUL replaced, in strings and in keys.
fn storable_json(value: Value) -> Value {
    match value {
        Value::String(text) => Value::String(storable_text(&text).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(storable_json).collect()),
        Value::Object(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(key, value)| (storable_text(&key).into_owned(), storable_json(value)))
                .collect::<Map<_, _>>(),
        ),
        other => other,
    }
}

impl StepOutcome {
    /// This outcome as the stores keep it (see the module doc).
    pub(crate) fn storable(&self) -> Self {
        let text = |text: &str| storable_text(text).into_owned();
        match self {
            Self::Succeeded(output) => Self::Succeeded(storable_json(output.clone())),
            Self::Stopped { output, reason } => Self::Stopped {
                output: storable_json(output.clone()),
                reason: text(reason),
            },
            Self::Waiting { output, until } => Self::Waiting {
                output: storable_json(output.clone()),
                until: *until,
            },
            Self::Retry { error, delay } => Self::Retry {
                error: text(error),
                delay: *delay,
            },
            Self::Failed(error) => Self::Failed(text(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_is_replaced_in_strings_and_keys_at_any_depth() {
        let outcome = StepOutcome::Succeeded(json!({
            "body": {"a\u{0}b": ["x\u{0}", 1, null, {"k": "\u{0}\u{0}"}]},
            "status": 200,
        }));
        assert_eq!(
            outcome.storable(),
            StepOutcome::Succeeded(json!({
                "body": {"a\u{FFFD}b": ["x\u{FFFD}", 1, null, {"k": "\u{FFFD}\u{FFFD}"}]},
                "status": 200,
            }))
        );
        assert_eq!(
            StepOutcome::Failed("http 500: \u{0}".into()).storable(),
            StepOutcome::Failed("http 500: \u{FFFD}".into())
        );
        assert!(matches!(storable_text("plain"), Cow::Borrowed("plain")));
    }
}
