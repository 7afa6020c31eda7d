//! What `zapflow` tells a person at start: where things are, and on the very
//! first start an admin API key (also kept in a 0600 file, never printed
//! again).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};
use zapflow_server::Role;
use zapflow_store::Store;

use crate::config::Config;

/// The admin key's file in the data directory.
pub const KEY_FILE: &str = "admin-api-key";

pub async fn greet(config: &Config, store: &Store, roles: &[Role]) -> Result<()> {
    let key_path = config.data_dir.join(KEY_FILE);
    let new_key = if store.user_count().await.context("counting users")? == 0 {
        let (_, key) = store
            .create_user("admin")
            .await
            .context("creating the admin user")?;
        std::fs::create_dir_all(&config.data_dir)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("writing {}", key_path.display()))?;
        writeln!(file, "{key}")?;
        Some(key.to_string())
    } else {
        None
    };

    let deployment = match (&config.database_url, &config.kafka_brokers) {
        (None, _) => "embedded (SQLite, workers read the outbox)",
        (Some(_), None) => "PostgreSQL (workers read the outbox)",
        (Some(_), Some(_)) => "distributed (PostgreSQL + Kafka)",
    };
    let email = match &config.smtp_url {
        Some(_) => "over SMTP".to_owned(),
        None => format!(
            "to the mailbox {} (no SMTP configured)",
            config.email().mailbox_dir.display()
        ),
    };
    let mut lines = vec![
        format!("zapflow is running: {deployment}"),
        format!(
            "  gRPC API      {} (reflection on: grpcurl -plaintext {} list)",
            config.grpc_listen, config.grpc_listen
        ),
        format!(
            "  webhooks      {}/hooks/catch/<zap id>/<token>",
            config.public_url
        ),
        format!("  data          {}", config.database_description()),
        format!("  email         {email}"),
    ];
    if !roles.contains(&Role::Gateway) {
        lines.truncate(2);
    }
    match &new_key {
        Some(key) => {
            lines.push(format!("  admin API key {key}"));
            lines.push(format!(
                "                (shown once; also in {}, mode 0600)",
                key_path.display()
            ));
        }
        None => lines.push(format!("  admin API key in {}", key_path.display())),
    }
    lines.push(String::new());
    lines.push("Create zaps from files and follow their runs (README: Command line):".into());
    lines.push("  zapflow apply -f zaps/".into());
    lines.push("  zapflow runs tail".into());
    eprintln!("\n{}\n", lines.join("\n"));
    Ok(())
}
