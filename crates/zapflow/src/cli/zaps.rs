//! `zapflow zaps ...`: list, read and manage zaps by name.

use clap::Subcommand;
use serde::Serialize;
use zapflow_proto::v1 as pb;

use crate::cli::client::Client;
use crate::cli::output::{Format, Table, ago, print_data, rfc3339, zap_status};
use crate::cli::zapfile::{TriggerKind, ZapFile};

#[derive(Debug, Subcommand)]
pub enum ZapsCommand {
    /// List your zaps.
    #[command(after_help = "Examples:
  zapflow zaps list
  zapflow zaps list -o json | jq -r '.[].id'")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show a zap; `-o yaml` prints a file `zapflow apply` accepts as it is.
    #[command(after_help = "Examples:
  zapflow zaps get 'New comment'
  zapflow zaps get 'New comment' -o yaml > new-comment.yaml")]
    Get {
        /// The zap's name (or id).
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a zap (its runs stay readable).
    #[command(after_help = "Example:\n  zapflow zaps delete 'New comment'")]
    Delete { name: String },
    /// Pause a zap: its webhook answers 404 (its schedule stops) until resumed.
    #[command(after_help = "Example:\n  zapflow zaps pause 'New comment'")]
    Pause { name: String },
    /// Resume a paused zap.
    #[command(after_help = "Example:\n  zapflow zaps resume 'New comment'")]
    Resume { name: String },
    /// Give a zap a new webhook URL; the old one stops working at once.
    #[command(after_help = "Example:\n  zapflow zaps rotate-token 'New comment'")]
    RotateToken { name: String },
}

/// A zap for scripts: stable field names.
#[derive(Debug, Serialize)]
struct ZapSummary {
    id: String,
    name: String,
    status: &'static str,
    signature_required: bool,
    /// `webhook`, `cron EXPRESSION [ZONE]` or `every DURATION`.
    trigger: String,
    /// For an active scheduled zap: its next tick.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_tick_time: Option<String>,
    actions: Vec<String>,
    create_time: Option<String>,
    update_time: Option<String>,
}

impl From<&pb::Zap> for ZapSummary {
    fn from(zap: &pb::Zap) -> Self {
        Self {
            id: zap.id.clone(),
            name: zap.name.clone(),
            status: zap_status(zap.status),
            signature_required: zap.signature_required,
            trigger: trigger_text(zap),
            next_tick_time: rfc3339(zap.next_tick_time.as_ref()),
            actions: zap.actions.iter().map(|a| a.r#type.clone()).collect(),
            create_time: rfc3339(zap.create_time.as_ref()),
            update_time: rfc3339(zap.update_time.as_ref()),
        }
    }
}

impl ZapsCommand {
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        match self {
            Self::List { output } => list(client, *output).await,
            Self::Get { name, output } => get(client, name, *output).await,
            Self::Delete { name } => {
                let zap = client.zap(name).await?;
                let request = client.request(pb::DeleteZapRequest { id: zap.id });
                client
                    .answer(client.zaps.clone().delete_zap(request))
                    .await?;
                println!("deleted  {}", zap.name);
                Ok(())
            }
            Self::Pause { name } => {
                let zap = client.zap(name).await?;
                let request = client.request(pb::PauseZapRequest { id: zap.id });
                client
                    .answer(client.zaps.clone().pause_zap(request))
                    .await?;
                println!("paused  {}", zap.name);
                Ok(())
            }
            Self::Resume { name } => {
                let zap = client.zap(name).await?;
                let request = client.request(pb::ResumeZapRequest { id: zap.id });
                client
                    .answer(client.zaps.clone().resume_zap(request))
                    .await?;
                println!("resumed  {}", zap.name);
                Ok(())
            }
            Self::RotateToken { name } => {
                let zap = client.zap(name).await?;
                let request = client.request(pb::RotateWebhookTokenRequest { id: zap.id });
                let reply = client
                    .answer(client.zaps.clone().rotate_webhook_token(request))
                    .await?;
                println!(
                    "new webhook URL for {} (the old one no longer works):",
                    zap.name
                );
                println!("{}", reply.webhook_url);
                Ok(())
            }
        }
    }
}

async fn list(client: &Client, output: Format) -> anyhow::Result<()> {
    let zaps = client.all_zaps().await?;
    if output != Format::Table {
        let summaries: Vec<ZapSummary> = zaps.iter().map(ZapSummary::from).collect();
        return print_data(output, &summaries);
    }
    let mut table = Table::new(vec![
        "NAME", "STATUS", "TRIGGER", "SIGNED", "ACTIONS", "UPDATED", "ID",
    ])
    .paint_column(1);
    for zap in &zaps {
        table.row(vec![
            zap.name.clone(),
            zap_status(zap.status).into(),
            trigger_text(zap),
            if zap.signature_required { "yes" } else { "no" }.into(),
            actions_text(zap),
            ago(zap.update_time.as_ref()),
            zap.id.clone(),
        ]);
    }
    table.print();
    Ok(())
}

/// What starts the zap's runs, in a few words.
fn trigger_text(zap: &pb::Zap) -> String {
    let file = ZapFile::from_proto(zap).trigger;
    match (file.kind, file.cron, file.every) {
        (TriggerKind::Schedule, Some(cron), _) => match file.time_zone {
            Some(zone) => format!("cron {cron} ({zone})"),
            None => format!("cron {cron}"),
        },
        (TriggerKind::Schedule, None, Some(every)) => format!("every {every}"),
        _ => "webhook".into(),
    }
}

fn actions_text(zap: &pb::Zap) -> String {
    zap.actions
        .iter()
        .map(|action| action.r#type.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

async fn get(client: &Client, name: &str, output: Format) -> anyhow::Result<()> {
    let zap = client.zap(name).await?;
    let file = ZapFile::from_proto(&zap);
    match output {
        Format::Yaml => {
            // Comments, so that the file stays one `apply` takes as it is.
            println!(
                "# zap {} ({}), updated {}",
                zap.id,
                zap_status(zap.status),
                rfc3339(zap.update_time.as_ref()).unwrap_or_default()
            );
            print_data(Format::Yaml, &file)
        }
        Format::Json => print_data(Format::Json, &file),
        Format::Table => {
            let mut table = Table::new(vec!["FIELD", "VALUE"]);
            for (field, value) in [
                ("name", zap.name.clone()),
                ("id", zap.id.clone()),
                ("status", zap_status(zap.status).into()),
                ("trigger", trigger_text(&zap)),
                (
                    "next tick",
                    rfc3339(zap.next_tick_time.as_ref()).unwrap_or_else(|| "-".into()),
                ),
                ("signature required", zap.signature_required.to_string()),
                ("created", ago(zap.create_time.as_ref())),
                ("updated", ago(zap.update_time.as_ref())),
            ] {
                table.row(vec![field.into(), value]);
            }
            table.print();
            println!();
            let mut actions = Table::new(vec!["STEP", "TYPE", "CONFIG", "RETRY"]);
            for (index, action) in file.actions.iter().enumerate() {
                actions.row(vec![
                    index.to_string(),
                    action.action_type.clone(),
                    crate::cli::output::short(&serde_json::to_string(&action.config)?, 80),
                    action
                        .retry
                        .as_ref()
                        .map(serde_json::to_string)
                        .transpose()?
                        .unwrap_or_else(|| "default".into()),
                ]);
            }
            actions.print();
            Ok(())
        }
    }
}
