//! The command line for people: client subcommands of `zapflow`, built on
//! the same gRPC contract as any generated client.

mod apply;
mod client;
mod dry_run;
mod output;
mod runs;
mod send;
mod tail;
mod zapfile;
mod zaps;

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use zapflow_proto::v1 as pb;

use self::client::{CliError, Client, Connection, Credentials, DEFAULT_SERVER, KeySource};

/// The client subcommands (beside the server roles).
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Make the server's zaps match zap files: create, update, leave alone.
    Apply(apply::Apply),
    /// List, show and manage zaps.
    #[command(after_help = "Examples:
  zapflow zaps list
  zapflow zaps get 'New comment' -o yaml
  zapflow zaps pause 'New comment'")]
    Zaps {
        #[command(subcommand)]
        command: zaps::ZapsCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// List and show runs, replay them, follow them as they happen.
    #[command(after_help = "Examples:
  zapflow runs list --status failed --since 1h
  zapflow runs get 0190c3d2-7a1e-7cc1-9f4e-1f0b1a2c3d4e
  zapflow runs tail --zap 'New comment'")]
    Runs {
        #[command(subcommand)]
        command: runs::RunsCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Post a JSON webhook to a zap's URL, signed when given its secret.
    Send(send::Send),
    /// Show what a zap would do with a sample payload; sends nothing.
    DryRun(dry_run::DryRun),
    /// Check an API key against a server and keep both for later commands.
    #[command(after_help = "Examples:
  zapflow login --server http://zapflow.internal:50051 < key.txt
  ZAPFLOW_API_KEY=zf_... zapflow login")]
    Login(Login),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  zapflow completion bash > ~/.local/share/bash-completion/completions/zapflow
  zapflow completion zsh > \"${fpath[1]}/_zapflow\"
  zapflow completion fish > ~/.config/fish/completions/zapflow.fish")]
    Completion { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
pub struct Login {
    #[command(flatten)]
    connection: Connection,
}

/// Runs a client command; `app` is the whole command line, for completions.
pub async fn run(command: ClientCommand, data_dir: &Path, app: clap::Command) -> ExitCode {
    match dispatch(command, data_dir, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let code = error
                .downcast_ref::<CliError>()
                .map_or(1, CliError::exit_code);
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}

async fn dispatch(
    command: ClientCommand,
    data_dir: &Path,
    mut app: clap::Command,
) -> anyhow::Result<()> {
    match command {
        ClientCommand::Apply(apply) => apply.run(&apply.connection.connect(data_dir).await?).await,
        ClientCommand::Zaps {
            command,
            connection,
        } => command.run(&connection.connect(data_dir).await?).await,
        ClientCommand::Runs {
            command,
            connection,
        } => command.run(&connection.connect(data_dir).await?).await,
        ClientCommand::Send(send) => send.run().await,
        ClientCommand::DryRun(dry_run) => {
            dry_run
                .run(&dry_run.connection.connect(data_dir).await?)
                .await
        }
        ClientCommand::Login(login) => login.run().await,
        ClientCommand::Completion { shell } => {
            clap_complete::generate(shell, &mut app, "zapflow", &mut std::io::stdout());
            Ok(())
        }
    }
}

impl Login {
    async fn run(&self) -> anyhow::Result<()> {
        let server = self
            .connection
            .server
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let key = match &self.connection.api_key {
            Some(key) => key.trim().to_owned(),
            None => {
                eprint!("API key for {server}: ");
                std::io::stderr().flush()?;
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                line.trim().to_owned()
            }
        };
        let client = Client::connect(server.clone(), key.clone(), KeySource::Given).await?;
        let request = client.request(pb::ListZapsRequest {
            page_size: 1,
            ..Default::default()
        });
        client
            .answer(client.zaps.clone().list_zaps(request))
            .await?;
        let path = Credentials::path().context("no home directory to keep credentials in")?;
        Credentials {
            server: server.clone(),
            api_key: key,
        }
        .save(&path)?;
        println!(
            "logged in to {server}; the key is kept in {} (mode 0600)",
            path.display()
        );
        Ok(())
    }
}
