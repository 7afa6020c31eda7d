//! The action types a zap can run, and the catalog that describes them.
//!
//! Each action renders its templated fields against the run's context and
//! performs one effect. Errors say whether trying again could help.

pub mod catalog;
pub mod email;
pub mod http;
mod smtp_pool;
pub mod ssrf;

use serde_json::Value;
use zapflow_core::ActionSpec;

pub use catalog::{ActionField, ActionType, FieldError, catalog, validate_actions};
pub use email::{DEFAULT_MAX_RECIPIENTS, EmailSettings, Mailer};
pub use http::{HttpClient, HttpSettings};
pub use ssrf::IpNet;

/// Why an action did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Worth another attempt: the other side may recover.
    #[error("{0}")]
    Transient(String),
    /// Trying again would fail the same way (bad address, template error, 5xx).
    #[error("{0}")]
    Permanent(String),
}

/// Which run and step an action executes for; effects derive their
/// idempotency keys from it.
#[derive(Debug, Clone, Copy)]
pub struct StepRef {
    pub run_id: uuid::Uuid,
    pub stage: u32,
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

    /// Runs one action; the result is the step's output.
    pub async fn execute(
        &self,
        action: &ActionSpec,
        context: &Value,
        step: StepRef,
    ) -> Result<Value, ActionError> {
        match action.action_type.as_str() {
            email::TYPE => self.mailer.send(&action.config, context, step).await,
            http::TYPE => match &self.http {
                Ok(client) => client.send(&action.config, context, step).await,
                Err(error) => Err(ActionError::Permanent(format!(
                    "http actions are unavailable: {error}"
                ))),
            },
            other => Err(ActionError::Permanent(format!(
                "unknown action type {other:?}"
            ))),
        }
    }
}

/// Renders one templated string field of an action's configuration.
/// A missing optional field renders as `None`.
pub(crate) fn render_field(
    config: &serde_json::Map<String, Value>,
    name: &str,
    context: &Value,
) -> Result<Option<String>, ActionError> {
    let Some(source) = config.get(name) else {
        return Ok(None);
    };
    let Some(source) = source.as_str() else {
        return Err(ActionError::Permanent(format!("{name}: must be a string")));
    };
    zapflow_core::template::render(source, context)
        .map(Some)
        .map_err(|error| ActionError::Permanent(format!("{name}: {error}")))
}
