//! `zapflow`: one binary, every role, and the command line to drive it.

mod cli;
mod config;
mod first_run;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zapflow_server::{ALL_ROLES, Role, Server};
use zapflow_telemetry::Telemetry;

use crate::config::Config;

/// jemalloc: under load, glibc's `malloc` and `free` took about 15% of the
/// embedded server's CPU; with jemalloc it accepts about a fifth more
/// webhooks per second, for about 5 MiB more memory per process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "zapflow",
    version,
    about = "Self-hostable, gRPC-first task automation",
    after_help = "Examples:
  zapflow                              run every role (embedded: SQLite in ./data)
  zapflow apply -f zaps/               make the server's zaps match zap files
  zapflow zaps list
  zapflow runs list --status failed --since 1h
  zapflow runs tail

Client commands find the server in --server / ZAPFLOW_SERVER (default
http://127.0.0.1:50051) and the API key in ZAPFLOW_API_KEY, else the file
`zapflow login` writes, else DATA_DIR/admin-api-key."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Server(ServerCommand),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// What a zapflow process runs as.
#[derive(Debug, Subcommand)]
enum ServerCommand {
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
async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let command = match cli.command {
        Some(Command::Client(command)) => {
            return Ok(cli::run(command, &cli.config.data_dir, Cli::command()).await);
        }
        Some(Command::Server(command)) => command,
        None => ServerCommand::All,
    };
    let config = cli.config;
    let telemetry = Telemetry::init(&config.telemetry())?;
    let served = serve(command, &config).await;
    telemetry.shutdown().await;
    served
}

/// Runs `command` until it is done, or until a signal for a server.
async fn serve(command: ServerCommand, config: &Config) -> Result<ExitCode> {
    let store = config.store().await?;
    let migrate = || async { store.migrate().await.context("migrating the database") };

    let roles: &[Role] = match command {
        ServerCommand::Migrate => {
            migrate().await?;
            tracing::info!(database = %config.database_description(), "database migrated");
            return Ok(ExitCode::SUCCESS);
        }
        ServerCommand::CreateUser { name } => {
            migrate().await?;
            let (user_id, key) = store
                .create_user(&name)
                .await
                .context("creating the user")?;
            eprintln!("created user {name} ({user_id}); its API key (shown only now):");
            println!("{key}");
            return Ok(ExitCode::SUCCESS);
        }
        ServerCommand::All => {
            migrate().await?;
            &ALL_ROLES
        }
        ServerCommand::Api => &[Role::Api],
        ServerCommand::Gateway => &[Role::Gateway],
        ServerCommand::Processor => &[Role::Processor],
        ServerCommand::Worker => &[Role::Worker],
    };

    let shutdown = CancellationToken::new();
    let listeners = config.listeners(roles).await?;
    if let Some(admin) = &listeners.admin {
        tracing::info!(address = %admin.local_addr()?, "serving /metrics, /livez and /readyz");
    }
    let server = Server::start(
        roles,
        config.settings(),
        listeners,
        store.clone(),
        shutdown.clone(),
    )
    .await?;
    if roles.contains(&Role::Api) {
        first_run::greet(config, &store, roles).await?;
    }
    tokio::spawn(watch_signals(shutdown));
    server.wait().await?;
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
