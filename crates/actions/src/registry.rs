//! Every action type this build runs: the catalog, the validation of a
//! zap's actions and the executor all come from one list.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;

use serde_json::{Map, Value};
use zapflow_core::ActionSpec;

use crate::action::{Action, ActionError, Completed, StepRef};
use crate::email::{Email, Mailer};
use crate::field::{ActionType, FieldError};
use crate::flow::{Delay, Filter};
use crate::http::{Http, HttpClient, HttpSettings};

/// Every action type, in catalog order. Adding a type is a module that
/// implements [`Action`] and a line here (and, when it needs a runner of a
/// new kind, a field of [`Executor`] that [`Provides`] it).
static ACTIONS: [Registered; 4] = [
    Registered::of::<Email>(),
    Registered::of::<Http>(),
    Registered::of::<Filter>(),
    Registered::of::<Delay>(),
];

type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<Completed, ActionError>> + Send + 'a>>;

/// Runs a step for real, or previews it.
type Run = for<'a> fn(&'a Executor, &'a Map<String, Value>, &'a Value, StepRef) -> StepFuture<'a>;

/// An action type with its configuration type erased, so that actions can be
/// found by the name a zap stores.
struct Registered {
    kind: ActionType,
    check: fn(&Map<String, Value>) -> Result<(), FieldError>,
    execute: Run,
    preview: Run,
}

impl Registered {
    const fn of<A: Action>() -> Self
    where
        Executor: Provides<A::Runner>,
    {
        Self {
            kind: A::TYPE,
            check: |config| A::from_config(config).map(drop),
            execute: run::<A, false>,
            preview: run::<A, true>,
        }
    }
}

/// Runs (or, with `PREVIEW`, previews) a step of type `A`.
fn run<'a, A: Action, const PREVIEW: bool>(
    executor: &'a Executor,
    config: &'a Map<String, Value>,
    context: &'a Value,
    step: StepRef,
) -> StepFuture<'a>
where
    Executor: Provides<A::Runner>,
{
    Box::pin(async move {
        let runner = executor.runner()?;
        let action = A::from_config(config)?;
        match PREVIEW {
            true => action.preview(runner, context, step).await,
            false => action.execute(runner, context, step).await,
        }
    })
}

fn find(name: &str) -> Option<&'static Registered> {
    ACTIONS.iter().find(|action| action.kind.name == name)
}

/// Every action type this build can run.
pub fn catalog() -> &'static [ActionType] {
    static CATALOG: LazyLock<Vec<ActionType>> =
        LazyLock::new(|| ACTIONS.iter().map(|action| action.kind.clone()).collect());
    &CATALOG
}

/// Checks a zap's actions: at least one, known types, required fields
/// present, no unknown fields, templates that parse, and literal values
/// (those without template syntax) valid for their field.
pub fn validate_actions(actions: &[ActionSpec]) -> Result<(), FieldError> {
    if actions.is_empty() {
        return Err(FieldError::new(
            "actions",
            "a zap needs at least one action",
        ));
    }
    for (index, action) in actions.iter().enumerate() {
        let prefix = format!("actions[{index}]");
        let Some(registered) = find(&action.action_type) else {
            let known: Vec<_> = ACTIONS.iter().map(|action| action.kind.name).collect();
            return Err(FieldError::new(
                format!("{prefix}.type"),
                format!(
                    "unknown action type {:?}; known types: {}",
                    action.action_type,
                    known.join(", ")
                ),
            ));
        };
        if let Some(retry) = &action.retry {
            zapflow_core::retry::RetryPolicy::validate_override(retry).map_err(
                |(field, message)| FieldError::new(format!("{prefix}.retry.{field}"), message),
            )?;
        }
        (registered.check)(&action.config)
            .map_err(|error| error.within(&format!("{prefix}.config")))?;
    }
    if let Some(last) = actions.last()
        && last.action_type == Delay::TYPE.name
    {
        return Err(FieldError::new(
            format!("actions[{}].type", actions.len() - 1),
            "a delay cannot be the last step: nothing would follow it",
        ));
    }
    Ok(())
}

/// Runs actions of every type.
#[derive(Clone)]
pub struct Executor {
    mailer: Mailer,
    /// `Err` keeps why the HTTP client could not be built, reported by
    /// every http step, so that [`Executor::new`] stays infallible.
    http: Result<HttpClient, String>,
}

impl Executor {
    /// Email with `mailer`; HTTP to public addresses only, with the default
    /// [`HttpSettings`].
    pub fn new(mailer: Mailer) -> Self {
        let http = HttpClient::new(&HttpSettings::default());
        if let Err(error) = &http {
            tracing::warn!(%error, "http actions are unavailable");
        }
        Self { mailer, http }
    }

    /// Email with `mailer`, HTTP with `settings` (an allowlist of private
    /// ranges, ...). Fails when the HTTP client cannot be built, so a service
    /// can refuse to start instead of failing every http step.
    pub fn with_http(mailer: Mailer, settings: &HttpSettings) -> Result<Self, String> {
        Ok(Self {
            mailer,
            http: Ok(HttpClient::new(settings)?),
        })
    }

    /// Runs one step: its output, and what the run does next.
    pub async fn execute(
        &self,
        action: &ActionSpec,
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        (registered(action)?.execute)(self, &action.config, context, step).await
    }

    /// Renders and checks one step as [`Self::execute`] would, with no
    /// effect: its fields as rendered, and what the run would do next.
    pub async fn preview(
        &self,
        action: &ActionSpec,
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        (registered(action)?.preview)(self, &action.config, context, step).await
    }
}

fn registered(action: &ActionSpec) -> Result<&'static Registered, ActionError> {
    find(&action.action_type).ok_or_else(|| {
        ActionError::Permanent(format!("unknown action type {:?}", action.action_type))
    })
}

/// Hands an action type the runner that performs it.
trait Provides<R> {
    fn runner(&self) -> Result<&R, ActionError>;
}

/// Flow steps need nothing to run.
impl Provides<()> for Executor {
    fn runner(&self) -> Result<&(), ActionError> {
        Ok(&())
    }
}

impl Provides<Mailer> for Executor {
    fn runner(&self) -> Result<&Mailer, ActionError> {
        Ok(&self.mailer)
    }
}

impl Provides<HttpClient> for Executor {
    fn runner(&self) -> Result<&HttpClient, ActionError> {
        self.http.as_ref().map_err(|error| {
            ActionError::Permanent(format!("http actions are unavailable: {error}"))
        })
    }
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

    #[test]
    fn of_several_faults_the_first_field_in_catalog_order_is_named() {
        let actions = [email(
            json!({"subject": "", "to": "not-an-address", "body": "{{ x"}),
        )];
        assert_eq!(
            validate_actions(&actions).unwrap_err().field,
            "actions[0].config.to"
        );
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
