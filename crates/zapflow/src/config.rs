//! Configuration: flags, each with a `ZAPFLOW_*` environment variable and a
//! default that runs on one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use zapflow_actions::{EmailSettings, HttpSettings, IpNet};
use zapflow_api::ApiSettings;
use zapflow_bus::BusSettings;
use zapflow_core::delivery::DeliveryLimits;
use zapflow_gateway::{GatewaySettings, RateLimit};
use zapflow_processor::RelaySettings;
use zapflow_server::{Listeners, Role, Settings};
use zapflow_store::{Durability, Store};
use zapflow_telemetry::TelemetrySettings;
use zapflow_worker::WorkerSettings;

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// `postgres://...` for the PostgreSQL deployments. Unset: the embedded
    /// SQLite database DATA_DIR/zapflow.db.
    #[arg(long, env = "ZAPFLOW_DATABASE_URL")]
    pub database_url: Option<String>,
    /// What an acknowledged webhook survives in the embedded database:
    /// `power-loss` syncs every commit to disk (SQLite synchronous=FULL);
    /// `process-crash` survives a killed process only (synchronous=NORMAL).
    #[arg(
        long,
        env = "ZAPFLOW_SQLITE_DURABILITY",
        value_enum,
        default_value = "power-loss"
    )]
    pub sqlite_durability: SqliteDurability,
    /// Connections each role keeps to the database.
    #[arg(long, env = "ZAPFLOW_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: u32,

    /// Kafka bootstrap servers, comma-separated (needs PostgreSQL). Unset:
    /// workers take work from the database's outbox directly.
    #[arg(long, env = "ZAPFLOW_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Topic carrying step events.
    #[arg(long, env = "ZAPFLOW_EVENTS_TOPIC", default_value = "zap-events")]
    pub events_topic: String,
    /// Topic receiving the events of failed runs and undecodable events.
    #[arg(
        long,
        env = "ZAPFLOW_DEAD_LETTER_TOPIC",
        default_value = "zap-events-dlq"
    )]
    pub dead_letter_topic: String,
    /// Partitions of the topics zapflow creates when they are missing.
    #[arg(long, env = "ZAPFLOW_TOPIC_PARTITIONS", default_value_t = 6)]
    pub topic_partitions: i32,
    /// Consumer group of the workers.
    #[arg(
        long,
        env = "ZAPFLOW_CONSUMER_GROUP",
        default_value = "zapflow-workers"
    )]
    pub consumer_group: String,

    /// Where the gRPC API listens.
    #[arg(long, env = "ZAPFLOW_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    /// Where the webhook gateway listens.
    #[arg(long, env = "ZAPFLOW_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Where this process serves /metrics (Prometheus), /livez and /readyz,
    /// whatever its roles. Several processes on one machine each need
    /// their own; port 0 picks a free one.
    #[arg(long, env = "ZAPFLOW_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    pub admin_listen: SocketAddr,
    /// `text` for people, `json` for one JSON object per line (with
    /// run_id, zap_id, step and trace_id where they apply).
    #[arg(long, env = "ZAPFLOW_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// An OpenTelemetry collector's OTLP/gRPC endpoint (e.g.
    /// http://127.0.0.1:4317): one trace per run goes there. Unset: no
    /// tracing.
    #[arg(long, env = "ZAPFLOW_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Where the API serves IngestService for gateways in other processes.
    /// Unset: 127.0.0.1:50052 when this process runs the API without the
    /// gateway; with the gateway in this process it calls the API directly
    /// and nothing else listens.
    #[arg(long, env = "ZAPFLOW_INGEST_LISTEN")]
    pub ingest_listen: Option<SocketAddr>,
    /// The API's IngestService as a gateway in another process reaches it.
    #[arg(
        long,
        env = "ZAPFLOW_INGEST_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub ingest_url: String,
    /// A shared secret the gateway presents to IngestService; when set, the
    /// API refuses ingest calls without it.
    #[arg(long, env = "ZAPFLOW_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// The gateway as webhook senders reach it; webhook URLs start with it.
    #[arg(
        long,
        env = "ZAPFLOW_PUBLIC_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub public_url: String,
    /// Largest webhook body in bytes.
    #[arg(long, env = "ZAPFLOW_BODY_LIMIT", default_value_t = 1024 * 1024)]
    pub body_limit: usize,
    /// Webhook deliveries per second one zap accepts (bursts of twice as
    /// many); 0 turns the limit off.
    #[arg(long, env = "ZAPFLOW_ZAP_RATE_LIMIT", default_value_t = 500.0)]
    pub zap_rate_limit: f64,
    /// Webhook deliveries per second one source address may send (bursts
    /// of twice as many); 0 turns the limit off.
    #[arg(long, env = "ZAPFLOW_IP_RATE_LIMIT", default_value_t = 1000.0)]
    pub ip_rate_limit: f64,
    /// Deepest nesting of objects and arrays a webhook body may have.
    #[arg(long, env = "ZAPFLOW_MAX_JSON_DEPTH", default_value_t = zapflow_core::delivery::DEFAULT_MAX_DEPTH)]
    pub max_json_depth: usize,
    /// Largest gRPC request message in bytes.
    #[arg(long, env = "ZAPFLOW_GRPC_MAX_MESSAGE", default_value_t = 4 * 1024 * 1024)]
    pub grpc_max_message: usize,

    /// SMTP server for the email action: smtp://host:port (plain),
    /// smtp://user:pass@host:587?tls=required (STARTTLS), smtps://host (TLS).
    /// Unset: messages are written as .eml files under DATA_DIR/mailbox.
    #[arg(long, env = "ZAPFLOW_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// Sender address of every email.
    #[arg(
        long,
        env = "ZAPFLOW_SMTP_FROM",
        default_value = "zapflow <zapflow@localhost>"
    )]
    pub smtp_from: String,
    /// Most recipients (to and cc together) one email may have; more fail
    /// the step.
    #[arg(long, env = "ZAPFLOW_EMAIL_MAX_RECIPIENTS", default_value_t = zapflow_actions::DEFAULT_MAX_RECIPIENTS)]
    pub email_max_recipients: usize,
    /// Where local state lives: the embedded database, the mailbox without
    /// SMTP, the first API key.
    #[arg(long, env = "ZAPFLOW_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Non-public ranges the HTTP action may reach, comma-separated CIDRs
    /// (e.g. 10.0.0.0/8). Empty: public addresses only.
    #[arg(long, env = "ZAPFLOW_HTTP_ALLOW_CIDRS", value_delimiter = ',')]
    pub http_allow_cidrs: Vec<IpNet>,

    /// Steps one worker runs at once.
    #[arg(long, env = "ZAPFLOW_WORKER_CONCURRENCY", default_value_t = 64)]
    pub worker_concurrency: usize,
    /// Bound on one action, in seconds.
    #[arg(long, env = "ZAPFLOW_ACTION_TIMEOUT", default_value_t = 30)]
    pub action_timeout: u64,
    /// Days dead letters are kept (listed by ListDeadLetters); 0 keeps them
    /// for good.
    #[arg(long, env = "ZAPFLOW_DEAD_LETTER_RETENTION_DAYS", default_value_t = 30)]
    pub dead_letter_retention_days: u64,
    /// How often the processor looks for due outbox rows without a
    /// notification, in milliseconds.
    #[arg(long, env = "ZAPFLOW_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,
}

impl Config {
    /// What the roles run with: the flags, and the defaults of what no
    /// flag sets.
    pub fn settings(&self) -> Settings {
        let defaults = Settings::default();
        let action_timeout = Duration::from_secs(self.action_timeout);
        Settings {
            api: ApiSettings {
                public_url: self.public_url.clone(),
                max_message_bytes: self.grpc_max_message,
                ingest_token: self.ingest_token.clone(),
                ..defaults.api
            },
            gateway: GatewaySettings {
                per_zap_limit: rate_limit(self.zap_rate_limit),
                per_ip_limit: rate_limit(self.ip_rate_limit),
                ..defaults.gateway
            },
            ingest_url: self.ingest_url.clone(),
            bus: self.bus(),
            consumer_group: self.consumer_group.clone(),
            relay: RelaySettings {
                poll_interval: Duration::from_millis(self.poll_interval_ms),
                ..defaults.relay
            },
            worker: WorkerSettings {
                action_timeout,
                lease: action_timeout * 2,
                concurrency: self.worker_concurrency,
                ..defaults.worker
            },
            email: self.email(),
            http: HttpSettings {
                allow_cidrs: self.http_allow_cidrs.clone(),
                ..defaults.http
            },
            dead_letter_retention: (self.dead_letter_retention_days > 0)
                .then(|| Duration::from_secs(self.dead_letter_retention_days * 24 * 60 * 60)),
            ..defaults
        }
        .with_delivery_limits(DeliveryLimits {
            max_body_bytes: self.body_limit,
            max_depth: self.max_json_depth,
        })
    }

    /// The Kafka settings, when a broker list is configured.
    fn bus(&self) -> Option<BusSettings> {
        let brokers = self.kafka_brokers.clone()?;
        Some(BusSettings {
            brokers,
            events_topic: self.events_topic.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            partitions: self.topic_partitions,
        })
    }

    pub fn email(&self) -> EmailSettings {
        EmailSettings {
            smtp_url: self.smtp_url.clone(),
            mailbox_dir: self.data_dir.join("mailbox"),
            from: self.smtp_from.clone(),
            timeout: Duration::from_secs(self.action_timeout),
            max_recipients: self.email_max_recipients,
        }
    }

    /// Binds what `roles` serve on: the gRPC API, IngestService for
    /// gateways elsewhere (by default only when the gateway is not in this
    /// process, which calls the API directly), the gateway.
    pub async fn listeners(&self, roles: &[Role]) -> anyhow::Result<Listeners> {
        let (api, gateway) = (roles.contains(&Role::Api), roles.contains(&Role::Gateway));
        let ingest_listen = self
            .ingest_listen
            .or_else(|| (!gateway).then(|| SocketAddr::from(([127, 0, 0, 1], 50052))));
        Ok(Listeners {
            grpc: bind(api.then_some(self.grpc_listen)).await?,
            ingest: bind(ingest_listen.filter(|_| api)).await?,
            http: bind(gateway.then_some(self.http_listen)).await?,
            admin: Some(
                TcpListener::bind(self.admin_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot serve /metrics on {}: give each process its own \
                     --admin-listen / ZAPFLOW_ADMIN_LISTEN (port 0 picks a free one)",
                            self.admin_listen
                        )
                    })?,
            ),
        })
    }

    /// Opens the configured database, creating the data directory for the
    /// embedded one.
    pub async fn store(&self) -> anyhow::Result<Store> {
        match &self.database_url {
            Some(url) => Ok(Store::open(url, self.database_pool).await?),
            None => {
                std::fs::create_dir_all(&self.data_dir).with_context(|| {
                    format!("creating the data directory {}", self.data_dir.display())
                })?;
                let path = self.data_dir.join("zapflow.db");
                Store::open_file_with(&path, self.sqlite_durability.into())
                    .await
                    .with_context(|| format!("opening the embedded database {}", path.display()))
            }
        }
    }

    /// Where the data lives, for people.
    pub fn database_description(&self) -> String {
        match &self.database_url {
            Some(url) => redact_password(url),
            None => self.data_dir.join("zapflow.db").display().to_string(),
        }
    }
}

async fn bind(address: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(address) = address else {
        return Ok(None);
    };
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    Ok(Some(listener))
}

/// `scheme://user:****@host/...`: a URL fit for logs.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_owned(),
    }
}

/// A limit of `per_second` with bursts of twice that; none for 0.
fn rate_limit(per_second: f64) -> Option<RateLimit> {
    (per_second > 0.0).then(|| RateLimit {
        per_second,
        burst: (per_second * 2.0).ceil().min(f64::from(u32::MAX)) as u32,
    })
}

/// [`zapflow_telemetry::LogFormat`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// How this process reports.
    pub fn telemetry(&self) -> TelemetrySettings {
        TelemetrySettings {
            log_format: match self.log_format {
                LogFormat::Text => zapflow_telemetry::LogFormat::Text,
                LogFormat::Json => zapflow_telemetry::LogFormat::Json,
            },
            otlp_endpoint: self.otlp_endpoint.clone(),
            default_filter: "info,sqlx=warn,tower_http=warn".into(),
        }
    }
}

/// [`Durability`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteDurability {
    PowerLoss,
    ProcessCrash,
}

impl From<SqliteDurability> for Durability {
    fn from(durability: SqliteDurability) -> Self {
        match durability {
            SqliteDurability::PowerLoss => Durability::PowerLoss,
            SqliteDurability::ProcessCrash => Durability::ProcessCrash,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        config: Config,
    }

    /// The test kit starts from [`Settings::default`]: it must be what
    /// `zapflow` runs with when given nothing.
    #[test]
    fn no_flags_mean_the_default_settings() {
        let command = Flags::command().mut_args(|arg| arg.env(None::<&'static str>));
        let matches = command.try_get_matches_from(["zapflow"]).unwrap();
        let config = Flags::from_arg_matches(&matches).unwrap().config;
        assert_eq!(
            format!("{:#?}", config.settings()),
            format!("{:#?}", Settings::default())
        );
    }
}
