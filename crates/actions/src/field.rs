//! What an action type accepts: the field specs the catalog lists, and the
//! reading of a zap's configuration against them.
//!
//! Every action type reads its configuration through [`Fields`], field by
//! field in the order of its specs, so a configuration with several faults
//! is reported at the same field whether it is checked when the zap is
//! saved or when a step runs.

use serde_json::{Map, Value};

/// An action type as the catalog lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionType {
    pub name: &'static str,
    pub description: &'static str,
    pub fields: &'static [ActionField],
    /// A flow step (filter, delay): no effect outside zapflow.
    pub flow: bool,
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

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error named from further out: `to` within
    /// `actions[1].config` is `actions[1].config.to`.
    pub(crate) fn within(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            ..self
        }
    }
}

/// An action's configuration, read one field at a time.
pub(crate) struct Fields<'a> {
    config: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// `config` as a configuration of `kind`; fails on a field `kind` does
    /// not have.
    pub(crate) fn of(
        kind: &ActionType,
        config: &'a Map<String, Value>,
    ) -> Result<Self, FieldError> {
        let unknown = config
            .keys()
            .find(|name| !kind.fields.iter().any(|field| field.name == *name));
        match unknown {
            Some(name) => Err(FieldError::new(name, "unknown field")),
            None => Ok(Self { config }),
        }
    }

    /// Reads a field the type requires with `read`.
    pub(crate) fn required<T>(
        &self,
        field: &ActionField,
        read: impl FnOnce(&ActionField, &Value) -> Result<T, FieldError>,
    ) -> Result<T, FieldError> {
        debug_assert!(field.required, "{} is optional", field.name);
        let value = self
            .config
            .get(field.name)
            .ok_or_else(|| FieldError::new(field.name, "required"))?;
        read(field, value)
    }

    /// Reads an optional field with `read`; `None` when it is absent.
    pub(crate) fn optional<T>(
        &self,
        field: &ActionField,
        read: impl FnOnce(&ActionField, &Value) -> Result<T, FieldError>,
    ) -> Result<Option<T>, FieldError> {
        debug_assert!(!field.required, "{} is required", field.name);
        self.config
            .get(field.name)
            .map(|value| read(field, value))
            .transpose()
    }
}

/// Reads a templated text field. `check` judges a text without template
/// syntax, which is the value as it will be used: a bad address is refused
/// when the zap is saved rather than at its first run.
pub(crate) fn template(
    check: fn(&str) -> Result<(), String>,
) -> impl FnOnce(&ActionField, &Value) -> Result<Template, FieldError> {
    move |field, value| {
        debug_assert!(field.templated, "{} is not templated", field.name);
        Template::read(field.name, value, field.required, check)
    }
}

/// Reads a text field that is not a template with `parse`.
pub(crate) fn text<T>(
    parse: fn(&str) -> Result<T, String>,
) -> impl FnOnce(&ActionField, &Value) -> Result<T, FieldError> {
    move |field, value| {
        debug_assert!(!field.templated, "{} is templated", field.name);
        let text = string(field.name, value, field.required)?;
        parse(text).map_err(|message| FieldError::new(field.name, message))
    }
}

/// Reads a field of another JSON shape (a number, an object) with `parse`.
pub(crate) fn value<T>(
    parse: fn(&Value) -> Result<T, String>,
) -> impl FnOnce(&ActionField, &Value) -> Result<T, FieldError> {
    move |field, value| parse(value).map_err(|message| FieldError::new(field.name, message))
}

/// The check of a text any string satisfies.
pub(crate) fn any_text(_: &str) -> Result<(), String> {
    Ok(())
}

/// The string at `field`, not blank where a value is required.
fn string<'v>(field: &str, value: &'v Value, required: bool) -> Result<&'v str, FieldError> {
    let Some(text) = value.as_str() else {
        return Err(FieldError::new(field, "must be a string"));
    };
    if required && text.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    Ok(text)
}

/// A minijinja template over the run's context, as the zap wrote it.
#[derive(Debug)]
pub(crate) struct Template {
    /// Where the template sits in the configuration (`subject`,
    /// `headers.X-Source`), for errors.
    field: String,
    source: String,
}

impl Template {
    /// Reads the template at `field` (a field's name, or a path into a
    /// field: `headers.X-Source`) whose syntax must parse; see [`template`]
    /// for `check`.
    pub(crate) fn read(
        field: &str,
        value: &Value,
        required: bool,
        check: fn(&str) -> Result<(), String>,
    ) -> Result<Self, FieldError> {
        let source = string(field, value, required)?;
        // Text without a delimiter is plain text, which always parses: most
        // fields are, and this runs before every step.
        if ["{{", "{%", "{#"].iter().any(|open| source.contains(open)) {
            zapflow_core::template::check(source)
                .map_err(|error| FieldError::new(field, format!("invalid template: {error}")))?;
        }
        let template = Self {
            field: field.to_owned(),
            source: source.to_owned(),
        };
        if let Some(literal) = template.literal() {
            check(literal).map_err(|message| FieldError::new(field, message))?;
        }
        Ok(template)
    }

    /// The text itself when it holds no template syntax.
    fn literal(&self) -> Option<&str> {
        let templated = self.source.contains("{{") || self.source.contains("{%");
        (!templated).then_some(self.source.as_str())
    }

    pub(crate) fn render(&self, context: &Value) -> Result<String, FieldError> {
        zapflow_core::template::render(&self.source, context)
            .map_err(|error| FieldError::new(&self.field, error.to_string()))
    }

    /// Renders the template and reads the result with `parse`; its errors
    /// name the template's field.
    pub(crate) fn render_as<T>(
        &self,
        context: &Value,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, FieldError> {
        let text = self.render(context)?;
        parse(&text).map_err(|message| FieldError::new(&self.field, message))
    }
}
