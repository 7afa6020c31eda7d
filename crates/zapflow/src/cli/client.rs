//! The connection to a zapflow server: its address, the API key and where
//! it came from, and errors that say what to do.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;

/// The local API, where `zapflow` listens by default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Where the server is and who is asking.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The zapflow gRPC API [default: the server of `zapflow login`, else
    /// http://127.0.0.1:50051]
    #[arg(long, env = "ZAPFLOW_SERVER", global = true)]
    pub server: Option<String>,
    /// API key [default: the key of `zapflow login`, else the local data
    /// directory's admin key]
    #[arg(long, env = "ZAPFLOW_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
}

/// A failure with the exit code it ends the command with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach zapflow at {server} ({cause}).\n\
         Start it with `zapflow` (every role, embedded), or point --server or \
         ZAPFLOW_SERVER at a running server."
    )]
    Unreachable { server: String, cause: String },
    #[error(
        "{server} refused the API key from {key_source}.\n\
         Set ZAPFLOW_API_KEY, run `zapflow login`, or pass --api-key."
    )]
    KeyRefused {
        server: String,
        key_source: KeySource,
    },
    #[error(
        "no API key: set ZAPFLOW_API_KEY, run `zapflow login`, or run this where \
         zapflow keeps its data ({} not found).",
        .0.display()
    )]
    NoKey(PathBuf),
    #[error("{0}")]
    NotFound(String),
    /// The server answered the request with an error of its own.
    #[error("{0}")]
    Refused(String),
}

impl CliError {
    /// The process exit code: 1 for a refused request, then one code per
    /// kind of failure a script may want to tell apart.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused(_) => 1,
            Self::Unreachable { .. } => 3,
            Self::KeyRefused { .. } | Self::NoKey(_) => 4,
            Self::NotFound(_) => 5,
        }
    }
}

/// Where the API key came from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `--api-key` or `ZAPFLOW_API_KEY`.
    Given,
    Credentials(PathBuf),
    DataDir(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Given => f.write_str("--api-key / ZAPFLOW_API_KEY"),
            Self::Credentials(path) => write!(f, "{} (`zapflow login`)", path.display()),
            Self::DataDir(path) => write!(f, "{} (the local admin key)", path.display()),
        }
    }
}

/// What `zapflow login` keeps: one server and its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub server: String,
    pub api_key: String,
}

impl Credentials {
    /// `$XDG_CONFIG_HOME/zapflow/credentials.json`, else under `~/.config`.
    pub fn path() -> Option<PathBuf> {
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
        Some(config.join("zapflow").join("credentials.json"))
    }

    fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Writes the file, readable by its owner alone.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A new file, so that the mode applies; never readable by others.
        let _ = std::fs::remove_file(path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

/// A connected ZapService client and the key it presents.
#[derive(Clone)]
pub struct Client {
    pub zaps: ZapServiceClient<Channel>,
    pub server: String,
    key: String,
    key_source: KeySource,
}

impl Connection {
    /// The server to talk to and, if one is found, the key with its source.
    fn resolve(&self, data_dir: &Path) -> Result<(String, String, KeySource), CliError> {
        let credentials =
            Credentials::path().and_then(|path| Some((Credentials::load(&path)?, path)));
        let server = self
            .server
            .clone()
            .or_else(|| credentials.as_ref().map(|(saved, _)| saved.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        if let Some(key) = &self.api_key {
            return Ok((server, key.trim().to_owned(), KeySource::Given));
        }
        if let Some((saved, path)) = credentials
            && same_server(&saved.server, &server)
        {
            return Ok((server, saved.api_key, KeySource::Credentials(path)));
        }
        let key_path = data_dir.join(crate::first_run::KEY_FILE);
        match std::fs::read_to_string(&key_path) {
            Ok(key) => Ok((server, key.trim().to_owned(), KeySource::DataDir(key_path))),
            Err(_) => Err(CliError::NoKey(key_path)),
        }
    }

    /// Connects to the server with the key found.
    pub async fn connect(&self, data_dir: &Path) -> Result<Client, CliError> {
        let (server, key, key_source) = self.resolve(data_dir)?;
        Client::connect(server, key, key_source).await
    }
}

fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The channel to `server`, connected (so that an unreachable server is
/// told at once, not at the first call).
pub async fn channel(server: &str) -> Result<Channel, CliError> {
    let unreachable = |cause: String| CliError::Unreachable {
        server: server.to_owned(),
        cause,
    };
    let endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|error| unreachable(format!("not a URL: {error}")))?
        .connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|error| {
        let mut cause = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(inner) = source {
            cause = inner.to_string();
            source = inner.source();
        }
        unreachable(cause)
    })
}

impl Client {
    pub async fn connect(
        server: String,
        key: String,
        key_source: KeySource,
    ) -> Result<Self, CliError> {
        let channel = channel(&server).await?;
        Ok(Self {
            zaps: ZapServiceClient::new(channel),
            server,
            key,
            key_source,
        })
    }

    /// Connects again (after the server went away).
    pub async fn reconnect(&mut self) -> Result<(), CliError> {
        self.zaps = ZapServiceClient::new(channel(&self.server).await?);
        Ok(())
    }

    /// `message` with the key.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.key).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// What a call answered, or what its failure means to the person who
    /// made it.
    pub async fn answer<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, CliError> {
        call.await
            .map(Response::into_inner)
            .map_err(|status| self.error(status))
    }

    /// What a failed call means to the person who made it.
    pub fn error(&self, status: Status) -> CliError {
        match status.code() {
            Code::Unauthenticated => CliError::KeyRefused {
                server: self.server.clone(),
                key_source: self.key_source.clone(),
            },
            // The server's own UNAVAILABLE is about its database.
            Code::Unavailable if !status.message().starts_with("the database") => {
                CliError::Unreachable {
                    server: self.server.clone(),
                    cause: status.message().to_owned(),
                }
            }
            Code::NotFound => CliError::NotFound(status.message().to_owned()),
            _ => CliError::Refused(status.message().to_owned()),
        }
    }

    /// The caller's zap named `name` (or with the id `name`).
    pub async fn zap(&self, name: &str) -> Result<pb::Zap, CliError> {
        let by_name = pb::GetZapRequest {
            name: name.to_owned(),
            ..Default::default()
        };
        match self.zaps.clone().get_zap(self.request(by_name)).await {
            Ok(reply) => return Ok(reply.into_inner().zap.unwrap_or_default()),
            Err(status) if status.code() != Code::NotFound => return Err(self.error(status)),
            Err(_) => {}
        }
        if uuid_like(name) {
            let by_id = pb::GetZapRequest {
                id: name.to_owned(),
                ..Default::default()
            };
            if let Ok(reply) = self.zaps.clone().get_zap(self.request(by_id)).await {
                return Ok(reply.into_inner().zap.unwrap_or_default());
            }
        }
        Err(CliError::NotFound(format!(
            "no zap named {name:?} (`zapflow zaps list` shows your zaps)"
        )))
    }

    /// Every zap of the caller, in creation order.
    pub async fn all_zaps(&self) -> Result<Vec<pb::Zap>, CliError> {
        let mut zaps = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .zaps
                .clone()
                .list_zaps(self.request(pb::ListZapsRequest {
                    page_size: 500,
                    page_token,
                }))
                .await
                .map_err(|status| self.error(status))?
                .into_inner();
            zaps.extend(page.zaps);
            if page.next_page_token.is_empty() {
                return Ok(zaps);
            }
            page_token = page.next_page_token;
        }
    }
}

fn uuid_like(text: &str) -> bool {
    text.len() == 36 && text.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}
