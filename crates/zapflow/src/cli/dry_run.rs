//! `zapflow dry-run`: what a zap would do with a sample delivery, each step
//! rendered or refused as the real run would; nothing is sent and no run
//! is written.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use zapflow_proto::json::{json_to_value, struct_to_json};
use zapflow_proto::v1 as pb;

use super::client::{CliError, Client, Connection};
use super::output::{Format, Table, print_data, short, step_status};
use super::send::read_body;
use super::zapfile;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  zapflow dry-run 'New comment' --data @comment.json
  zapflow dry-run -f zaps/new-comment.yaml --data '{\"comment\": {\"email\": \"ada@example.com\"}}'

Exits with 1 when the real run would fail at a step.")]
pub struct DryRun {
    /// One of your zaps, by name or id (or give --file).
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// A zap file holding one zap, tried as it would be applied.
    #[arg(short, long, conflicts_with = "name")]
    file: Option<PathBuf>,
    /// The sample JSON body: inline, `@FILE`, or `@-` for standard input.
    #[arg(short, long, default_value = "{}")]
    data: String,
    /// A sample header, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
    #[command(flatten)]
    pub connection: Connection,
}

/// One step as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
struct StepView {
    index: u32,
    action_type: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    passed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rendered: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

impl DryRun {
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        let body = read_body(&self.data)?;
        let payload: serde_json::Value =
            serde_json::from_str(&body).context("the sample body is not JSON")?;
        let mut headers = HashMap::new();
        for header in &self.headers {
            let Some((name, value)) = header.split_once(':') else {
                bail!("{header:?} is not a header; write `Name: value`");
            };
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        let mut request = pb::DryRunZapRequest {
            payload: Some(json_to_value(&payload)),
            headers,
            ..Default::default()
        };
        match (&self.name, &self.file) {
            (Some(name), _) => request.zap_id = client.zap(name).await?.id,
            (None, Some(file)) => {
                let mut zaps = zapfile::load(std::slice::from_ref(file))?;
                if zaps.len() != 1 {
                    bail!(
                        "{} holds {} zaps; dry-run tries one",
                        file.display(),
                        zaps.len()
                    );
                }
                request.actions = zaps.remove(0).zap.actions_proto();
            }
            (None, None) => bail!("name a zap or give --file"),
        }
        let steps = client
            .answer(client.zaps.clone().dry_run_zap(client.request(request)))
            .await?
            .steps;
        let views: Vec<StepView> = steps.iter().map(view).collect();
        if self.output == Format::Table {
            let mut table = Table::new(vec!["STEP", "TYPE", "STATUS", "DETAIL"]).paint_column(2);
            for step in &views {
                table.row(vec![
                    step.index.to_string(),
                    step.action_type.clone(),
                    step.status.into(),
                    detail(step),
                ]);
            }
            table.print();
        } else {
            print_data(self.output, &views)?;
        }
        match steps
            .iter()
            .find(|step| step.status() == pb::StepStatus::Failed)
        {
            Some(failed) => Err(CliError::Refused(format!(
                "the run would fail at step {}: {}",
                failed.index, failed.error
            ))
            .into()),
            None => Ok(()),
        }
    }
}

fn view(step: &pb::DryRunStep) -> StepView {
    StepView {
        index: step.index,
        action_type: step.action_type.clone(),
        status: step_status(step.status),
        passed: step.passed,
        rendered: step
            .rendered
            .as_ref()
            .map(|rendered| serde_json::Value::Object(struct_to_json(rendered))),
        error: step.error.clone(),
    }
}

/// What a table row says of a step: its error, a filter's decision, or
/// its rendered fields.
fn detail(step: &StepView) -> String {
    match (&step.error, step.passed, &step.rendered) {
        (error, _, _) if !error.is_empty() => short(error, 100),
        (_, Some(true), _) => "passes".into(),
        (_, Some(false), _) => "stops the run".into(),
        (_, None, Some(rendered)) => short(&rendered.to_string(), 100),
        _ => "-".into(),
    }
}
