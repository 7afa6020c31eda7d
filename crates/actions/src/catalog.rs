//! What each action type accepts, and validation of a zap's actions against it.

use zapflow_core::ActionSpec;

use crate::email;

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
    &[email::ACTION_TYPE]
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
                Some(value) => {
                    let Some(text) = value.as_str() else {
                        return Err(field_error(field.name, "must be a string".into()));
                    };
                    if field.required && text.trim().is_empty() {
                        return Err(field_error(field.name, "must not be empty".into()));
                    }
                    zapflow_core::template::check(text).map_err(|error| {
                        field_error(field.name, format!("invalid template: {error}"))
                    })?;
                    let literal = !text.contains("{{") && !text.contains("{%");
                    if literal && kind.name == email::TYPE {
                        email::validate_literal(field.name, text)
                            .map_err(|message| field_error(field.name, message))?;
                    }
                }
            }
        }
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
}
