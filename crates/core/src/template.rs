//! Action fields are minijinja templates rendered against the run.
//!
//! Rendering is strict: a template that names a field the payload does not
//! have fails with an error that says which, instead of rendering empty.

use minijinja::{Environment, UndefinedBehavior};

/// A template that did not parse or did not render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl From<minijinja::Error> for TemplateError {
    fn from(error: minijinja::Error) -> Self {
        // The first line is the message; the rest is a source excerpt that
        // would only clutter a step error.
        let text = error.to_string();
        Self(text.lines().next().unwrap_or_default().to_owned())
    }
}

/// Bound on the work one rendering may do: templates are written by zap
/// owners, and a loop over a huge range must not stall a worker.
const FUEL: u64 = 100_000;
/// Longest text one field may render to.
const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env
}

/// Checks that `source` parses, without rendering it.
pub fn check(source: &str) -> Result<(), TemplateError> {
    environment().template_from_str(source)?;
    Ok(())
}

/// Checks that `source` parses as an expression (a filter's condition),
/// without evaluating it.
pub fn check_expression(source: &str) -> Result<(), TemplateError> {
    environment().compile_expression(source)?;
    Ok(())
}

/// Evaluates the expression `source` against `context` and tells whether
/// the result is true (as `{% if %}` would). Naming a field the payload
/// does not have is an error, as in templates; `is defined` and
/// `| default(...)` make a field optional.
pub fn evaluate(source: &str, context: &serde_json::Value) -> Result<bool, TemplateError> {
    let environment = environment();
    let expression = environment.compile_expression(source)?;
    Ok(expression.eval(minijinja::value::Serde(context))?.is_true())
}

/// Renders `source` with `context` (a JSON object whose keys become the
/// template's variables).
pub fn render(source: &str, context: &serde_json::Value) -> Result<String, TemplateError> {
    let text = environment().render_str(source, minijinja::value::Serde(context))?;
    if text.len() > MAX_OUTPUT_BYTES {
        return Err(TemplateError(format!(
            "renders to {} bytes, more than the {MAX_OUTPUT_BYTES} allowed",
            text.len()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn evaluates_conditions_over_the_payload() {
        let context = json!({"trigger": {"amount": 150, "country": "DE"}});
        let condition = r#"trigger.amount > 100 and trigger.country in ["DE", "FR"]"#;
        assert_eq!(evaluate(condition, &context), Ok(true));
        assert_eq!(evaluate("trigger.amount > 200", &context), Ok(false));
        assert_eq!(evaluate("trigger.missing is defined", &context), Ok(false));
        assert!(evaluate("trigger.missing > 1", &context).is_err());
        assert!(check_expression("trigger.amount >").is_err());
    }

    #[test]
    fn renders_nested_payload_fields() {
        let context = json!({"trigger": {"comment": {"email": "a@example.com", "n": 3}}});
        let text = render(
            "to {{ trigger.comment.email }} x{{ trigger.comment.n }}",
            &context,
        );
        assert_eq!(text.unwrap(), "to a@example.com x3");
    }

    #[test]
    fn a_missing_field_is_an_error_naming_it() {
        let error = render("{{ trigger.nope.deeper }}", &json!({"trigger": {}})).unwrap_err();
        assert!(error.to_string().contains("undefined"), "{error}");
    }

    #[test]
    fn a_default_filter_makes_a_field_optional() {
        let text = render(
            "{{ trigger.name | default('friend') }}",
            &json!({"trigger": {}}),
        );
        assert_eq!(text.unwrap(), "friend");
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let context = json!({});
        let looping = render(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            &context,
        );
        assert!(looping.unwrap_err().to_string().contains("fuel"));
        let huge = render("{{ 'x' * 2000000 }}", &context);
        assert!(huge.unwrap_err().to_string().contains("more than"));
    }

    #[test]
    fn syntax_errors_are_caught_by_check() {
        assert!(check("{{ unclosed").is_err());
        assert!(check("plain {{ trigger.x }}").is_ok());
    }
}
