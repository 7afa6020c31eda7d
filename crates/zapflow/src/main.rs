//! `zapflow`: one binary, every role.

mod config;
mod first_run;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zapflow_server::{ALL_ROLES, Role, Server};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "zapflow",
    version,
    about = "Self-hostable, gRPC-first task automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in this process (the default; migrates the database first).
    All,
    /// Run the gRPC API (ZapService, IngestService).
    Api,
    /// Run the webhook gateway.
    Gateway,
    /// Run the outbox relay to Kafka.
    Processor,
    /// Run a worker.
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
    let store = config.store().await?;
    let migrate = || async { store.migrate().await.context("migrating the database") };

    let roles: &[Role] = match cli.command.unwrap_or(Command::All) {
        Command::Migrate => {
            migrate().await?;
            tracing::info!(database = %config.database_description(), "database migrated");
            return Ok(());
        }
        Command::CreateUser { name } => {
            migrate().await?;
            let (user_id, key) = store
                .create_user(&name)
                .await
                .context("creating the user")?;
            eprintln!("created user {name} ({user_id}); its API key (shown only now):");
            println!("{key}");
            return Ok(());
        }
        Command::All => {
            migrate().await?;
            &ALL_ROLES
        }
        Command::Api => &[Role::Api],
        Command::Gateway => &[Role::Gateway],
        Command::Processor => &[Role::Processor],
        Command::Worker => &[Role::Worker],
    };

    let shutdown = CancellationToken::new();
    let listeners = config.listeners(roles).await?;
    let server = Server::start(
        roles,
        config.settings(),
        listeners,
        store.clone(),
        shutdown.clone(),
    )
    .await?;
    if roles.contains(&Role::Api) {
        first_run::greet(&config, &store, roles).await?;
    }
    tokio::spawn(watch_signals(shutdown));
    Ok(server.wait().await?)
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
