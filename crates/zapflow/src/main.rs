//! `zapflow`: one binary, every role.

mod config;
mod roles;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zapflow_store::Store;

use crate::config::Config;
use crate::roles::{ALL_ROLES, Role};

#[derive(Debug, Parser)]
#[command(
    name = "zapflow",
    version,
    about = "Self-hostable, gRPC-first task automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in this process (migrates the database first).
    All,
    /// Run the gRPC API (ZapService, IngestService).
    Api,
    /// Run the webhook gateway.
    Gateway,
    /// Run the outbox relay to Kafka.
    Processor,
    /// Run a worker of the consumer group.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Create a user and print its API key (shown only this once).
    CreateUser {
        /// A unique name for the user.
        name: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let config = cli.config;
    let store = || Store::connect_lazy(&config.database_url, config.database_pool);

    let roles: &[Role] = match cli.command {
        Command::Migrate => {
            store()?.migrate().await.context("migrating the database")?;
            tracing::info!("database migrated");
            return Ok(());
        }
        Command::CreateUser { name } => {
            let store = store()?;
            store.migrate().await.context("migrating the database")?;
            let (user_id, key) = store
                .create_user(&name)
                .await
                .context("creating the user")?;
            eprintln!("created user {name} ({user_id}); its API key (shown only now):");
            println!("{key}");
            return Ok(());
        }
        Command::All => {
            store()?.migrate().await.context("migrating the database")?;
            &ALL_ROLES
        }
        Command::Api => &[Role::Api],
        Command::Gateway => &[Role::Gateway],
        Command::Processor => &[Role::Processor],
        Command::Worker => &[Role::Worker],
    };

    let shutdown = CancellationToken::new();
    let mut tasks = roles::start(roles, &config, &shutdown).await?;
    tokio::spawn(watch_signals(shutdown.clone()));
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        // One role ending (an error, or shutdown) ends them all.
        shutdown.cancel();
        if let Ok(Err(error)) = done {
            tracing::error!("{error:#}");
            result = Err(error);
        }
    }
    result
}

/// First SIGINT or SIGTERM: drain. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("shutting down; in-flight work drains (signal again to exit now)");
    shutdown.cancel();
    wait_for_signal().await;
    std::process::exit(130);
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
