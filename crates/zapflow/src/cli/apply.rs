//! `zapflow apply`: makes the server's zaps match files.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use zapflow_proto::v1 as pb;

use crate::cli::client::{Client, Connection};
use crate::cli::output::{Format, paint, print_data};
use crate::cli::zapfile::{self, TriggerKind, ZapFile};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  zapflow apply -f zaps/                 create, update or leave alone each zap in zaps/
  zapflow apply -f comment.yaml --dry-run
  zapflow apply -f zaps/ --prune         also delete the zaps zaps/ no longer names")]
pub struct Apply {
    /// A zap file (YAML or JSON) or a directory of them; repeatable.
    #[arg(short = 'f', long = "file", required = true, value_name = "FILE|DIR")]
    pub files: Vec<PathBuf>,
    /// Print what would change, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete the zaps that no file names.
    #[arg(long)]
    pub prune: bool,
    /// Print the outcome for people (table) or scripts.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub connection: Connection,
}

/// What apply did (or, in a dry run, would do) to one zap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

#[derive(Debug, Serialize)]
struct Outcome {
    name: String,
    change: Change,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// Shown once, for a new zap (or a new token).
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_url: Option<String>,
    /// Shown once, when signatures were turned on.
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
}

impl Apply {
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        let files = zapfile::load(&self.files)?;
        let existing = client.all_zaps().await?;
        let mut outcomes = Vec::new();
        for loaded in &files {
            let current = existing.iter().find(|zap| zap.name == loaded.zap.name);
            outcomes.push(self.apply_one(client, &loaded.zap, current).await?);
        }
        if self.prune {
            for zap in &existing {
                if files.iter().any(|loaded| loaded.zap.name == zap.name) {
                    continue;
                }
                if !self.dry_run {
                    let request = client.request(pb::DeleteZapRequest { id: zap.id.clone() });
                    client
                        .answer(client.zaps.clone().delete_zap(request))
                        .await?;
                }
                outcomes.push(self.outcome(&zap.name, Change::Deleted, Some(&zap.id)));
            }
        }
        match self.output {
            Format::Table => print_outcomes(&outcomes),
            format => print_data(format, &outcomes)?,
        }
        Ok(())
    }

    async fn apply_one(
        &self,
        client: &Client,
        file: &ZapFile,
        current: Option<&pb::Zap>,
    ) -> anyhow::Result<Outcome> {
        let Some(current) = current else {
            let mut outcome = self.outcome(&file.name, Change::Created, None);
            if self.dry_run {
                return Ok(outcome);
            }
            let request = client.request(pb::CreateZapRequest {
                name: file.name.clone(),
                actions: file.actions_proto(),
                require_signature: file.trigger.signature_required(),
                trigger: Some(file.trigger.to_proto()),
            });
            let created = client
                .answer(client.zaps.clone().create_zap(request))
                .await?;
            outcome.id = created.zap.map(|zap| zap.id);
            // A scheduled zap has no webhook URL.
            outcome.webhook_url = non_empty(created.webhook_url);
            outcome.signing_secret = non_empty(created.signing_secret);
            return Ok(outcome);
        };
        if ZapFile::from_proto(current) == file.normalized() {
            return Ok(self.outcome(&file.name, Change::Unchanged, Some(&current.id)));
        }
        let mut outcome = self.outcome(&file.name, Change::Updated, Some(&current.id));
        if self.dry_run {
            return Ok(outcome);
        }
        let request = client.request(pb::UpdateZapRequest {
            id: current.id.clone(),
            name: file.name.clone(),
            actions: file.actions_proto(),
            require_signature: Some(file.trigger.signature_required()),
            trigger: Some(file.trigger.to_proto()),
        });
        let updated = client
            .answer(client.zaps.clone().update_zap(request))
            .await?;
        outcome.signing_secret = non_empty(updated.signing_secret);
        // A scheduled zap turned webhook gets its URL now.
        let was_scheduled = ZapFile::from_proto(current).trigger.kind == TriggerKind::Schedule;
        if was_scheduled && file.trigger.kind == TriggerKind::Webhook {
            let request = client.request(pb::RotateWebhookTokenRequest {
                id: current.id.clone(),
            });
            let rotated = client
                .answer(client.zaps.clone().rotate_webhook_token(request))
                .await?;
            outcome.webhook_url = Some(rotated.webhook_url);
        }
        Ok(outcome)
    }

    fn outcome(&self, name: &str, change: Change, id: Option<&str>) -> Outcome {
        Outcome {
            name: name.to_owned(),
            change,
            dry_run: self.dry_run && change != Change::Unchanged,
            id: id.map(str::to_owned),
            webhook_url: None,
            signing_secret: None,
        }
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn print_outcomes(outcomes: &[Outcome]) {
    for outcome in outcomes {
        let (done, planned) = match outcome.change {
            Change::Created => ("created", "would create"),
            Change::Updated => ("updated", "would update"),
            Change::Unchanged => ("unchanged", "unchanged"),
            Change::Deleted => ("deleted", "would delete"),
        };
        let word = if outcome.dry_run {
            planned.to_owned()
        } else {
            paint(done)
        };
        println!("{word}  {}", outcome.name);
        if let Some(url) = &outcome.webhook_url {
            println!("  webhook URL     {url}");
        }
        if let Some(secret) = &outcome.signing_secret {
            println!("  signing secret  {secret}");
        }
        if outcome.webhook_url.is_some() || outcome.signing_secret.is_some() {
            println!("  (shown only now: keep them secret)");
        }
    }
    if outcomes.is_empty() {
        println!("no zaps in the files given");
    }
}
