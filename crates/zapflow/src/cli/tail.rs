//! `zapflow runs tail`: WatchRuns, printed as it comes, through restarts of
//! the server.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clap::Args;
use serde::Serialize;
use tonic::Code;
use zapflow_proto::v1 as pb;

use crate::cli::client::{CliError, Client};
use crate::cli::output::{Format, paint, run_status, short, step_status, time};
use crate::cli::runs::{RunView, StatusArg, zap_names};

#[derive(Debug, Args)]
pub struct Tail {
    /// Only runs of this zap (name or id).
    #[arg(long)]
    zap: Option<String>,
    /// Only events after which the run is in this status; repeatable.
    #[arg(long, value_enum)]
    status: Vec<StatusArg>,
    /// Also what happened since: a duration back from now (30m) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Print events as JSON lines (json) or YAML documents (yaml).
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

/// How far before the last event a reconnection asks to start: changes
/// still committing when the connection broke are then not missed.
const RESUME_OVERLAP: TimeDelta = TimeDelta::seconds(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// An event for scripts: stable field names.
#[derive(Debug, Serialize)]
struct EventView {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<u32>,
    run: RunView,
}

impl Tail {
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        let zap_id = match &self.zap {
            Some(name) => client.zap(name).await?.id,
            None => String::new(),
        };
        let mut names = zap_names(client).await?;
        let mut start_time = match &self.since {
            Some(since) => Some(crate::cli::runs::parse_time(since)?),
            None => Some(now()),
        };
        let mut printed = Printed::default();
        let mut client = client.clone();
        let mut backoff = Duration::from_millis(100);
        let mut connected_once = false;
        loop {
            printed.forget_before(start_from(start_time));
            let request = pb::WatchRunsRequest {
                zap_id: zap_id.clone(),
                statuses: self.status.iter().map(|status| status.proto()).collect(),
                start_time,
            };
            let stream = client.zaps.watch_runs(client.request(request)).await;
            let mut stream = match stream {
                Ok(stream) => stream.into_inner(),
                Err(status) if status.code() == Code::Unavailable => {
                    self.wait(&mut backoff, None, &mut client).await?;
                    continue;
                }
                Err(status) => return Err(client.error(status).into()),
            };
            if connected_once {
                eprintln!("reconnected to {}", client.server);
            } else {
                eprintln!("watching runs on {} (Ctrl-C to stop)", client.server);
            }
            connected_once = true;
            backoff = Duration::from_millis(100);
            let ended = loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        let Some(run) = &event.run else { continue };
                        let updated = time(run.update_time.as_ref()).unwrap_or_else(Utc::now);
                        let resume = updated - RESUME_OVERLAP;
                        start_time = Some(timestamp(resume.max(start_from(start_time))));
                        if !printed.first_time(&event, run, updated) {
                            continue;
                        }
                        if !names.contains_key(&run.zap_id) {
                            names = zap_names(&client).await.unwrap_or(names);
                        }
                        self.print(&event, run, names.get(&run.zap_id).map(String::as_str))?;
                    }
                    Ok(None) => break "the server ended the stream".to_owned(),
                    Err(status) if status.code() == Code::Unavailable => {
                        break status.message().to_owned();
                    }
                    Err(status) => return Err(client.error(status).into()),
                }
            };
            self.wait(&mut backoff, Some(&ended), &mut client).await?;
        }
    }

    /// Waits before the next attempt, then connects again.
    async fn wait(
        &self,
        backoff: &mut Duration,
        lost: Option<&str>,
        client: &mut Client,
    ) -> anyhow::Result<()> {
        if let Some(why) = lost {
            eprintln!("lost {} ({why}); reconnecting", client.server);
        }
        loop {
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            match client.reconnect().await {
                Ok(()) => return Ok(()),
                Err(CliError::Unreachable { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn print(
        &self,
        event: &pb::WatchRunsResponse,
        run: &pb::Run,
        zap: Option<&str>,
    ) -> anyhow::Result<()> {
        let kind = match pb::RunEventKind::try_from(event.kind) {
            Ok(pb::RunEventKind::Accepted) => "accepted",
            Ok(pb::RunEventKind::StepFinished) => "step",
            Ok(pb::RunEventKind::Finished) => "finished",
            _ => "unknown",
        };
        let step = (kind == "step").then_some(event.step);
        match self.output {
            Format::Table => {
                let at = time(run.update_time.as_ref())
                    .map(|time| {
                        time.with_timezone(&chrono::Local)
                            .format("%H:%M:%S")
                            .to_string()
                    })
                    .unwrap_or_default();
                let zap = zap.unwrap_or(&run.zap_id);
                let detail = match step.and_then(|index| run.steps.get(index as usize)) {
                    Some(step) => {
                        let mut text = format!(
                            "step {} {} {} (attempt {})",
                            step.index,
                            step.action_type,
                            paint(step_status(step.status)),
                            step.attempts
                        );
                        if !step.error.is_empty() {
                            text.push_str(&format!(": {}", short(&step.error, 80)));
                        }
                        text
                    }
                    None if kind == "accepted" => String::new(),
                    None => paint(run_status(run.status)),
                };
                println!("{at}  {}  {zap}  {kind:<8}  {detail}", run.id);
            }
            Format::Json => println!(
                "{}",
                serde_json::to_string(&EventView {
                    event: kind,
                    step,
                    run: RunView::of(run, zap),
                })?
            ),
            Format::Yaml => {
                println!("---");
                print!(
                    "{}",
                    serde_norway::to_string(&EventView {
                        event: kind,
                        step,
                        run: RunView::of(run, zap),
                    })?
                );
            }
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        Ok(())
    }
}

/// The events printed, so that a reconnection's overlap is not printed
/// twice: each with its run's update time, and forgotten once the resume
/// point has passed it (the server sends nothing from before that point).
#[derive(Default)]
struct Printed {
    /// Run id, event kind, step and attempts (for a step's event).
    events: HashMap<(String, i32, u32, u32), DateTime<Utc>>,
}

impl Printed {
    /// Whether `event` was not printed before; remembers it.
    fn first_time(
        &mut self,
        event: &pb::WatchRunsResponse,
        run: &pb::Run,
        at: DateTime<Utc>,
    ) -> bool {
        let attempts = match pb::RunEventKind::try_from(event.kind) {
            Ok(pb::RunEventKind::StepFinished) => run
                .steps
                .get(event.step as usize)
                .map_or(0, |step| step.attempts),
            _ => 0,
        };
        let key = (run.id.clone(), event.kind, event.step, attempts);
        self.events.insert(key, at).is_none()
    }

    fn forget_before(&mut self, time: DateTime<Utc>) {
        self.events.retain(|_, at| *at >= time);
    }
}

fn now() -> prost_types::Timestamp {
    timestamp(Utc::now())
}

fn timestamp(time: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

/// The resume point so far, never moved back.
fn start_from(start_time: Option<prost_types::Timestamp>) -> chrono::DateTime<Utc> {
    start_time
        .as_ref()
        .and_then(|start| time(Some(start)))
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
}
