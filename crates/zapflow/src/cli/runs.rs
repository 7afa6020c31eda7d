//! `zapflow runs ...`: runs at a glance, one run in full, replays.

use std::collections::HashMap;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use zapflow_proto::json::{struct_to_json, value_to_json};
use zapflow_proto::v1 as pb;

use crate::cli::client::Client;
use crate::cli::output::{
    Format, Table, ago, print_data, rfc3339, run_status, short, step_status, took,
};
use crate::cli::tail::Tail;

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    #[command(after_help = "Examples:
  zapflow runs list
  zapflow runs list --zap 'New comment' --status failed --since 1h
  zapflow runs list --limit 100 --page-token 0190c3d2-... -o json")]
    List(ListRuns),
    /// Show a run and each of its steps.
    #[command(after_help = "Examples:
  zapflow runs get 0190c3d2-7a1e-7cc1-9f4e-1f0b1a2c3d4e
  zapflow runs get 0190c3d2-7a1e-7cc1-9f4e-1f0b1a2c3d4e -o json")]
    Get {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Run a finished run again, or every failed run of a zap.
    #[command(after_help = "Examples:
  zapflow runs replay 0190c3d2-7a1e-7cc1-9f4e-1f0b1a2c3d4e
  zapflow runs replay 0190c3d2-7a1e-7cc1-9f4e-1f0b1a2c3d4e --from-start
  zapflow runs replay --zap 'New comment' --failed --since 1h")]
    Replay(Replay),
    /// Follow runs as they happen: accepted, each step, finished.
    #[command(after_help = "Examples:
  zapflow runs tail
  zapflow runs tail --zap 'New comment' --status failed
  zapflow runs tail -o json | jq -c .")]
    Tail(Tail),
}

/// A run status as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl StatusArg {
    pub fn proto(self) -> i32 {
        (match self {
            Self::Pending => pb::RunStatus::Pending,
            Self::Running => pb::RunStatus::Running,
            Self::Succeeded => pb::RunStatus::Succeeded,
            Self::Failed => pb::RunStatus::Failed,
        }) as i32
    }
}

#[derive(Debug, Args)]
pub struct ListRuns {
    /// Only runs of this zap (name or id).
    #[arg(long)]
    zap: Option<String>,
    /// Only runs in this status; repeatable.
    #[arg(long, value_enum)]
    status: Vec<StatusArg>,
    /// Only runs created since: a duration back from now (30m, 2h, 7d) or a time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only runs created before: a duration back from now or a time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Runs per page (at most 500).
    #[arg(long, default_value_t = 20)]
    limit: i32,
    /// Go on from an earlier page (its next_page_token).
    #[arg(long)]
    page_token: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, Args)]
pub struct Replay {
    /// The run to replay.
    #[arg(required_unless_present = "zap", conflicts_with = "zap")]
    id: Option<String>,
    /// Replay the failed runs of this zap not replayed yet (with --failed).
    #[arg(long, requires = "failed")]
    zap: Option<String>,
    /// With --zap: replay its failed runs.
    #[arg(long, requires = "zap")]
    failed: bool,
    /// With --zap: only runs created since (30m, 2h, 7d, or RFC 3339).
    #[arg(long, requires = "zap")]
    since: Option<String>,
    /// Start from the first step instead of the failed one.
    #[arg(long)]
    from_start: bool,
}

/// `2h` (that long ago) or an RFC 3339 time.
pub fn parse_time(text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let time = match DateTime::parse_from_rfc3339(text) {
        Ok(time) => time.with_timezone(&Utc),
        Err(_) => {
            let back = crate::cli::zapfile::parse_duration(text).with_context(|| {
                format!("{text:?} is neither a duration (30m, 2h, 7d) nor an RFC 3339 time")
            })?;
            Utc::now() - chrono::TimeDelta::from_std(back)?
        }
    };
    Ok(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    })
}

/// A run for scripts: stable field names.
#[derive(Debug, Serialize)]
pub struct RunView {
    pub id: String,
    pub zap_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zap_name: Option<String>,
    pub status: &'static str,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
    pub finish_time: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub replay_of: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stop_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepView>,
}

#[derive(Debug, Serialize)]
pub struct StepView {
    pub index: u32,
    pub action_type: String,
    pub status: &'static str,
    pub attempts: u32,
    pub start_time: Option<String>,
    pub finish_time: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
}

impl RunView {
    pub fn of(run: &pb::Run, zap_name: Option<&str>) -> Self {
        Self {
            id: run.id.clone(),
            zap_id: run.zap_id.clone(),
            zap_name: zap_name.map(str::to_owned),
            status: run_status(run.status),
            create_time: rfc3339(run.create_time.as_ref()),
            update_time: rfc3339(run.update_time.as_ref()),
            finish_time: rfc3339(run.finish_time.as_ref()),
            replay_of: run.replay_of.clone(),
            scheduled_time: rfc3339(run.scheduled_time.as_ref()),
            stop_reason: run.stop_reason.clone(),
            resume_time: rfc3339(run.resume_time.as_ref()),
            trigger: run.trigger.as_ref().map(value_to_json),
            steps: run
                .steps
                .iter()
                .map(|step| StepView {
                    index: step.index,
                    action_type: step.action_type.clone(),
                    status: step_status(step.status),
                    attempts: step.attempts,
                    start_time: rfc3339(step.start_time.as_ref()),
                    finish_time: rfc3339(step.finish_time.as_ref()),
                    error: step.error.clone(),
                    output: step
                        .output
                        .as_ref()
                        .map(|output| serde_json::Value::Object(struct_to_json(output))),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct RunsPage {
    runs: Vec<RunView>,
    next_page_token: String,
}

/// Zap names by id, to show runs by their zap's name.
pub async fn zap_names(client: &Client) -> anyhow::Result<HashMap<String, String>> {
    Ok(client
        .all_zaps()
        .await?
        .into_iter()
        .map(|zap| (zap.id, zap.name))
        .collect())
}

impl RunsCommand {
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        match self {
            Self::List(list) => list.run(client).await,
            Self::Get { id, output } => get(client, id, *output).await,
            Self::Replay(replay) => replay.run(client).await,
            Self::Tail(tail) => tail.run(client).await,
        }
    }
}

impl ListRuns {
    async fn run(&self, client: &Client) -> anyhow::Result<()> {
        let zap_id = match &self.zap {
            Some(name) => client.zap(name).await?.id,
            None => String::new(),
        };
        let request = pb::ListRunsRequest {
            zap_id,
            page_size: self.limit,
            page_token: self.page_token.clone().unwrap_or_default(),
            view: pb::RunView::Basic as i32,
            statuses: self.status.iter().map(|status| status.proto()).collect(),
            start_time: self.since.as_deref().map(parse_time).transpose()?,
            end_time: self.until.as_deref().map(parse_time).transpose()?,
            stopped: None,
        };
        let page = client
            .answer(client.zaps.clone().list_runs(client.request(request)))
            .await?;
        let names = zap_names(client).await?;
        if self.output != Format::Table {
            let runs = page
                .runs
                .iter()
                .map(|run| RunView::of(run, names.get(&run.zap_id).map(String::as_str)))
                .collect();
            return print_data(
                self.output,
                &RunsPage {
                    runs,
                    next_page_token: page.next_page_token,
                },
            );
        }
        let mut table = Table::new(vec![
            "ID",
            "ZAP",
            "STATUS",
            "CREATED",
            "DURATION",
            "REPLAY OF",
        ])
        .paint_column(2);
        for run in &page.runs {
            table.row(vec![
                run.id.clone(),
                names
                    .get(&run.zap_id)
                    .cloned()
                    .unwrap_or_else(|| run.zap_id.clone()),
                run_status(run.status).into(),
                ago(run.create_time.as_ref()),
                took(run.create_time.as_ref(), run.finish_time.as_ref()),
                run.replay_of.clone(),
            ]);
        }
        if page.runs.is_empty() {
            println!("no runs");
        } else {
            table.print();
        }
        if !page.next_page_token.is_empty() {
            eprintln!("more: --page-token {}", page.next_page_token);
        }
        Ok(())
    }
}

async fn get(client: &Client, id: &str, output: Format) -> anyhow::Result<()> {
    let run = client
        .zaps
        .clone()
        .get_run(client.request(pb::GetRunRequest { id: id.to_owned() }))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => crate::cli::client::CliError::NotFound(format!(
                "no run {id} (`zapflow runs list` shows your runs)"
            )),
            _ => client.error(status),
        })?
        .into_inner()
        .run
        .unwrap_or_default();
    let names = zap_names(client).await?;
    let zap_name = names.get(&run.zap_id).map(String::as_str);
    if output != Format::Table {
        return print_data(output, &RunView::of(&run, zap_name));
    }
    let mut header = Table::new(vec!["FIELD", "VALUE"]).paint_column(1);
    header.row(vec!["run".into(), run.id.clone()]);
    header.row(vec![
        "zap".into(),
        format!("{} ({})", zap_name.unwrap_or("deleted"), run.zap_id),
    ]);
    header.row(vec!["status".into(), run_status(run.status).into()]);
    header.row(vec!["created".into(), ago(run.create_time.as_ref())]);
    header.row(vec![
        "duration".into(),
        took(run.create_time.as_ref(), run.finish_time.as_ref()),
    ]);
    if !run.replay_of.is_empty() {
        header.row(vec!["replay of".into(), run.replay_of.clone()]);
    }
    if let Some(scheduled) = rfc3339(run.scheduled_time.as_ref()) {
        header.row(vec!["scheduled for".into(), scheduled]);
    }
    if !run.stop_reason.is_empty() {
        header.row(vec!["stopped".into(), run.stop_reason.clone()]);
    }
    if let Some(resume) = rfc3339(run.resume_time.as_ref()) {
        header.row(vec!["resumes".into(), resume]);
    }
    header.print();
    println!();
    let mut steps = Table::new(vec![
        "STEP", "ACTION", "STATUS", "ATTEMPTS", "DURATION", "ERROR", "OUTPUT",
    ])
    .paint_column(2);
    for step in &run.steps {
        steps.row(vec![
            step.index.to_string(),
            step.action_type.clone(),
            step_status(step.status).into(),
            step.attempts.to_string(),
            took(step.start_time.as_ref(), step.finish_time.as_ref()),
            if step.error.is_empty() {
                "-".into()
            } else {
                short(&step.error, 60)
            },
            step.output
                .as_ref()
                .map(|output| {
                    short(
                        &serde_json::Value::Object(struct_to_json(output)).to_string(),
                        60,
                    )
                })
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    steps.print();
    Ok(())
}

impl Replay {
    async fn run(&self, client: &Client) -> anyhow::Result<()> {
        if let Some(id) = &self.id {
            let request = pb::ReplayRunRequest {
                id: id.clone(),
                from_start: self.from_start,
            };
            let replay = client
                .answer(client.zaps.clone().replay_run(client.request(request)))
                .await?
                .run
                .unwrap_or_default();
            println!("replay {} of run {id}", replay.id);
            return Ok(());
        }
        let Some(name) = &self.zap else {
            bail!("give a run id, or --zap NAME --failed");
        };
        let zap = client.zap(name).await?;
        let start_time = self.since.as_deref().map(parse_time).transpose()?;
        let end_time = Some(parse_time("0s")?);
        let mut replayed = 0;
        loop {
            let request = pb::ReplayRunsRequest {
                zap_id: zap.id.clone(),
                start_time,
                end_time,
                from_start: self.from_start,
            };
            let ids = client
                .answer(client.zaps.clone().replay_runs(client.request(request)))
                .await?
                .run_ids;
            if ids.is_empty() {
                break;
            }
            for id in &ids {
                println!("replay {id}");
            }
            replayed += ids.len();
        }
        eprintln!("{replayed} failed runs of {} replayed", zap.name);
        Ok(())
    }
}
