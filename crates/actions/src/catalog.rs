//! What each action type accepts, and validation of a zap's actions against it.

use zapflow_core::ActionSpec;

use crate::{email, http};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionType {
    pub name: &'static str,
    pub description: &'static str,
    pub fields: &'static [ActionField],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionField {
    pub name: &'static str,
    pub description: &'static str,
    pub required: bool,
    pub templated: bool,
}

/// An invalid action, naming the offending field (`actions[1].config.to`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every action type this build can run.
pub fn catalog() -> &'static [ActionType] {
    &[email::ACTION_TYPE, http::ACTION_TYPE]
}

/// Checks a zap's actions: at least one, known types, required fields
/// present, no unknown fields, templates that parse, and literal values
/// (those without template syntax) valid for their field.
pub fn validate_actions(actions: &[ActionSpec]) -> Result<(), FieldError> {
    if actions.is_empty() {
        return Err(FieldError {
            field: "actions".into(),
            message: "a zap needs at least one action".into(),
        });
    }
    for (index, action) in actions.iter().enumerate() {
        let prefix = format!("actions[{index}]");
        let Some(kind) = catalog()
            .iter()
            .find(|kind| kind.name == action.action_type)
        else {
            let known: Vec<_> = catalog().iter().map(|kind| kind.name).collect();
            return Err(FieldError {
                field: format!("{prefix}.type"),
                message: format!(
                    "unknown action type {:?}; known types: {}",
                    action.action_type,
                    known.join(", ")
                ),
            });
        };
        if let Some(retry) = &action.retry {
            zapflow_core::retry::RetryPolicy::validate_override(retry).map_err(
                |(field, message)| FieldError {
                    field: format!("{prefix}.retry.{field}"),
                    message,
                },
            )?;
        }
        let field_error = |name: &str, message: String| FieldError {
            field: format!("{prefix}.config.{name}"),
            message,
        };
        for name in action.config.keys() {
            if !kind.fields.iter().any(|field| field.name == name) {
                return Err(field_error(name, "unknown field".into()));
            }
        }
        for field in kind.fields {
            match action.config.get(field.name) {
                None if field.required => {
                    return Err(field_error(field.name, "required".into()));
                }
                None => {}
                Some(value) => check_field(kind, field, value)
                    .map_err(|error| field_error(&error.field, error.message))?,
            }
        }
    }
    Ok(())
}

/// Checks one field's value; the error names the field relative to the
/// action's `config` (`to`, `headers.Authorization`).
fn check_field(
    kind: &ActionType,
    field: &ActionField,
    value: &serde_json::Value,
) -> Result<(), FieldError> {
    if kind.name == http::TYPE
        && let Some(checked) = http::validate_structured(field.name, value)
    {
        return checked;
    }
    let error = |message: String| FieldError {
        field: field.name.into(),
        message,
    };
    let Some(text) = value.as_str() else {
        return Err(error("must be a string".into()));
    };
    if field.required && text.trim().is_empty() {
        return Err(error("must not be empty".into()));
    }
    let mut literal = true;
    if field.templated {
        zapflow_core::template::check(text)
            .map_err(|template| error(format!("invalid template: {template}")))?;
        literal = !text.contains("{{") && !text.contains("{%");
    }
    if literal {
        let checked = match kind.name {
            email::TYPE => email::validate_literal(field.name, text),
            http::TYPE => http::validate_literal(field.name, text),
            _ => Ok(()),
        };
        checked.map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn action(value: serde_json::Value) -> ActionSpec {
        serde_json::from_value(value).unwrap()
    }

    fn email(config: serde_json::Value) -> ActionSpec {
        action(json!({"type": "email", "config": config}))
    }

    #[test]
    fn accepts_a_templated_email() {
        let actions = [email(json!({
            "to": "{{ trigger.email }}", "subject": "Hi {{ trigger.name }}", "body": "text"
        }))];
        assert_eq!(validate_actions(&actions), Ok(()));
    }

    #[test]
    fn names_the_field_at_fault() {
        let cases = [
            (vec![], "actions"),
            (
                vec![action(json!({"type": "fax", "config": {}}))],
                "actions[0].type",
            ),
            (
                vec![email(json!({"subject": "s", "body": "b"}))],
                "actions[0].config.to",
            ),
            (
                vec![email(
                    json!({"to": "not-an-address", "subject": "s", "body": "b"}),
                )],
                "actions[0].config.to",
            ),
            (
                vec![email(
                    json!({"to": "a@example.com", "subject": "{{ x", "body": "b"}),
                )],
                "actions[0].config.subject",
            ),
            (
                vec![email(
                    json!({"to": "a@example.com", "subject": "s", "body": "b", "bcc": "x"}),
                )],
                "actions[0].config.bcc",
            ),
        ];
        for (actions, field) in cases {
            assert_eq!(validate_actions(&actions).unwrap_err().field, field);
        }
    }

    fn http(config: serde_json::Value) -> ActionSpec {
        action(json!({"type": "http", "config": config}))
    }

    #[test]
    fn accepts_http_actions() {
        let valid = [
            json!({"url": "https://hooks.example.com/in"}),
            json!({"url": "{{ trigger.callback_url }}", "method": "get"}),
            json!({
                "method": "PATCH",
                "url": "https://api.example.com/users/{{ trigger.id }}",
                "headers": {"Authorization": "Bearer {{ trigger.token }}", "X-Source": "zapflow"},
                "body": "{{ trigger | tojson }}",
                "content_type": "application/merge-patch+json",
                "timeout_seconds": 30,
            }),
            json!({"url": "http://10.0.0.5:8080/", "timeout_seconds": "2.5", "headers": {}}),
        ];
        for config in valid {
            assert_eq!(
                validate_actions(&[http(config.clone())]),
                Ok(()),
                "{config}"
            );
        }
    }

    #[test]
    fn names_the_http_field_at_fault() {
        let cases = [
            (json!({"method": "GET"}), "actions[0].config.url"),
            (json!({"url": ""}), "actions[0].config.url"),
            (json!({"url": "not a url"}), "actions[0].config.url"),
            (
                json!({"url": "file:///etc/passwd"}),
                "actions[0].config.url",
            ),
            (
                json!({"url": "https://x.example/{{ a"}),
                "actions[0].config.url",
            ),
            (json!({"url": 7}), "actions[0].config.url"),
            (
                json!({"url": "https://x.example", "method": "TRACE"}),
                "actions[0].config.method",
            ),
            (
                json!({"url": "https://x.example", "method": "{{ m }}"}),
                "actions[0].config.method",
            ),
            (
                json!({"url": "https://x.example", "headers": "X-A: b"}),
                "actions[0].config.headers",
            ),
            (
                json!({"url": "https://x.example", "headers": {"X A": "b"}}),
                "actions[0].config.headers.X A",
            ),
            (
                json!({"url": "https://x.example", "headers": {"X-A": 1}}),
                "actions[0].config.headers.X-A",
            ),
            (
                json!({"url": "https://x.example", "headers": {"X-A": "{{ x"}}),
                "actions[0].config.headers.X-A",
            ),
            (
                json!({"url": "https://x.example", "headers": {"X-A": "a\nb"}}),
                "actions[0].config.headers.X-A",
            ),
            (
                json!({"url": "https://x.example", "headers": {"Idempotency-Key": "k"}}),
                "actions[0].config.headers.Idempotency-Key",
            ),
            (
                json!({"url": "https://x.example", "headers": {"Content-Type": "text/plain"}}),
                "actions[0].config.headers.Content-Type",
            ),
            (
                json!({"url": "https://x.example", "content_type": "a\nb"}),
                "actions[0].config.content_type",
            ),
            (
                json!({"url": "https://x.example", "timeout_seconds": 61}),
                "actions[0].config.timeout_seconds",
            ),
            (
                json!({"url": "https://x.example", "timeout_seconds": "ten"}),
                "actions[0].config.timeout_seconds",
            ),
            (
                json!({"url": "https://x.example", "retries": 3}),
                "actions[0].config.retries",
            ),
        ];
        for (config, field) in cases {
            let error = validate_actions(&[http(config.clone())]).unwrap_err();
            assert_eq!(error.field, field, "{config}: {error}");
        }
    }
}
