//! DryRunZap: what a zap would do with a sample delivery. Each step is
//! rendered and checked as a worker would before running it (addresses,
//! URLs and the hosts they name, template errors, filter conditions, delay
//! times), and nothing is sent or written.

use std::collections::HashMap;

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;
use zapflow_actions::{ActionError, Executor, Next, StepRef};
use zapflow_core::ActionSpec;
use zapflow_proto::json::json_to_struct;
use zapflow_proto::v1 as pb;

/// A sample delivery.
pub(crate) struct Sample<'a> {
    pub zap_id: Uuid,
    pub payload: Value,
    pub headers: &'a HashMap<String, String>,
    pub query: &'a HashMap<String, String>,
}

/// Each step of `actions` as it would go with `sample`: rendered, failed
/// (and why), or skipped after a failure or a filter that stops the run.
pub(crate) async fn dry_run(
    executor: &Executor,
    actions: &[ActionSpec],
    sample: &Sample<'_>,
) -> Vec<pb::DryRunStep> {
    // Nothing runs, so no step has an output for later ones to use.
    let context = json!({
        "trigger": sample.payload,
        "headers": sample.headers,
        "query": sample.query,
        "steps": vec![Value::Null; actions.len()],
        "run": {
            "id": Uuid::nil(),
            "zap_id": sample.zap_id,
            "created_at": Utc::now().to_rfc3339(),
            "attempt": 1,
            "scheduled_time": null,
        },
    });
    let mut steps = Vec::with_capacity(actions.len());
    let mut reached = true;
    for (index, action) in actions.iter().enumerate() {
        let mut step = pb::DryRunStep {
            index: index as u32,
            action_type: action.action_type.clone(),
            status: pb::StepStatus::Skipped as i32,
            ..Default::default()
        };
        if reached {
            let at = StepRef {
                run_id: Uuid::nil(),
                stage: index as u32,
            };
            match executor.preview(action, &context, at).await {
                Ok(completed) => {
                    step.status = pb::StepStatus::Succeeded as i32;
                    if let Value::Object(fields) = &completed.output {
                        step.rendered = Some(json_to_struct(fields));
                    }
                    if action.action_type == "filter" {
                        step.passed = Some(!matches!(completed.next, Next::Stop(_)));
                    }
                    reached = !matches!(completed.next, Next::Stop(_));
                }
                Err(ActionError::Permanent(error) | ActionError::Transient(error)) => {
                    step.status = pb::StepStatus::Failed as i32;
                    step.error = error;
                    reached = false;
                }
            }
        }
        steps.push(step);
    }
    steps
}
