//! Starting zapflow: the requested roles, from typed [`Settings`] and
//! listeners the caller bound. The binary turns flags and environment into
//! these; the test kit builds them from its options. Both start the same
//! way, so the tests run what users run.

mod error;
mod scheduler;
mod settings;

use std::fmt;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zapflow_actions::{Executor, Mailer};
use zapflow_api::Api;
use zapflow_gateway::IngestTarget;
use zapflow_processor::Relay;
use zapflow_store::Store;
use zapflow_store::handoff::{Handed, Handoff};
use zapflow_telemetry::metrics::{OUTBOX_DUE_ROWS, OUTBOX_OLDEST_DUE_AGE};
use zapflow_telemetry::{Admin, Check};
use zapflow_worker::{DeadLetters, Worker};

pub use error::ServerError;
pub use settings::{CONSUMER_MAX_POLL_INTERVAL, DEAD_LETTER_DELIVERY_TIMEOUT, Listeners, Settings};

/// A part of zapflow a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The gRPC API: ZapService, and IngestService for gateways.
    Api,
    /// The webhook gateway.
    Gateway,
    /// The relay from the outbox to Kafka.
    Processor,
    /// Runs the steps: from Kafka, or leasing the outbox without it.
    Worker,
}

/// What `zapflow all` runs.
pub const ALL_ROLES: [Role; 4] = [Role::Api, Role::Gateway, Role::Processor, Role::Worker];

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Api => "api",
            Role::Gateway => "gateway",
            Role::Processor => "processor",
            Role::Worker => "worker",
        })
    }
}

type Result<T, E = ServerError> = std::result::Result<T, E>;

/// The roles of one process, running until shutdown or until one of them
/// ends. Dropping it stops them.
pub struct Server {
    shutdown: CancellationToken,
    tasks: JoinSet<Result<()>>,
}

impl Server {
    /// Starts `roles` on `listeners`; each runs until `shutdown`.
    pub async fn start(
        roles: &[Role],
        settings: Settings,
        mut listeners: Listeners,
        store: Store,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        if settings.bus.is_some() && store.postgres().is_none() {
            return Err(ServerError::KafkaWithoutPostgres);
        }
        let relays_or_consumes = roles
            .iter()
            .any(|role| matches!(role, Role::Processor | Role::Worker));
        if let Some(bus) = &settings.bus
            && relays_or_consumes
        {
            bus.ensure_topics()
                .await
                .map_err(|source| ServerError::Topics {
                    brokers: bus.brokers.clone(),
                    source,
                })?;
        }
        // Without Kafka, a worker here is handed the runs the API here
        // starts for it.
        let (handoff, mut handed) = match roles.contains(&Role::Worker) && settings.bus.is_none() {
            true => {
                let (handoff, handed) = zapflow_worker::local_handoff(&settings.worker);
                (Some(handoff), Some(handed))
            }
            false => (None, None),
        };
        // Dropped on a failure below: what already started stops.
        let mut starting = Starting {
            settings,
            store,
            server: Self {
                shutdown,
                tasks: JoinSet::new(),
            },
        };
        // The API first: a gateway in the same process calls it directly.
        let in_process_ingest = match roles.contains(&Role::Api) {
            true => {
                let grpc = listener(&mut listeners.grpc, Role::Api)?;
                let ingest = listeners.ingest.take();
                Some(
                    starting
                        .api(grpc, ingest, relays_or_consumes, handoff)
                        .await?,
                )
            }
            false => None,
        };
        let mut remote_api = None;
        for role in roles {
            match role {
                Role::Api => {}
                Role::Gateway => {
                    let http = listener(&mut listeners.http, Role::Gateway)?;
                    let in_process = in_process_ingest.clone();
                    let ingest = starting.gateway(http, in_process)?;
                    remote_api = (!roles.contains(&Role::Api)).then_some(ingest);
                }
                Role::Processor => starting.processors(roles.len() > 1)?,
                Role::Worker => starting.workers(handed.take())?,
            }
        }
        if let Some(admin) = listeners.admin.take() {
            starting.admin(admin, roles, remote_api);
        }
        Ok(starting.server)
    }

    /// Waits until a role ends (at shutdown, or failing), then stops the
    /// others and waits for them to drain; the first failure, if any.
    pub async fn wait(mut self) -> Result<()> {
        let mut result = Ok(());
        while let Some(done) = self.tasks.join_next().await {
            // One role ending ends them all.
            self.shutdown.cancel();
            if let Ok(Err(error)) = done {
                tracing::error!(error = %error::chain(&error), "role failed");
                if result.is_ok() {
                    result = Err(error);
                }
            }
        }
        result
    }

    /// Shuts every role down and waits for in-flight work to drain.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `check` as the admin listener takes it.
fn check<F, Fut>(check: F) -> Check
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    std::sync::Arc::new(move || Box::pin(check()))
}

/// `slot`'s listener, which `role` cannot do without.
fn listener(slot: &mut Option<TcpListener>, role: Role) -> Result<TcpListener> {
    slot.take().ok_or(ServerError::NoListener(role))
}

/// The roles being started, and the server of those already running.
struct Starting {
    settings: Settings,
    store: Store,
    server: Server,
}

impl Starting {
    /// Runs `task` until it ends; it is given the shutdown signal.
    fn spawn<F>(&mut self, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let shutdown = self.server.shutdown.clone();
        self.server.tasks.spawn(task(shutdown));
    }

    /// Serves the API; returns its IngestService for a gateway in this
    /// process. With the relay or the workers in this process, the API is
    /// only healthy while their broker answers too.
    async fn api(
        &mut self,
        grpc: TcpListener,
        ingest: Option<TcpListener>,
        with_broker: bool,
        local_worker: Option<Handoff>,
    ) -> Result<zapflow_api::InProcessIngest> {
        let mut settings = self.settings.api.clone();
        settings.broker = self.settings.bus.clone().filter(|_| with_broker);
        let mut api = Api::new(self.store.clone(), settings, self.executor()?).await;
        if let Some(worker) = local_worker {
            api = api.with_local_worker(worker);
        }
        let in_process_ingest = api.in_process_ingest();
        self.spawn(|shutdown| async move {
            api.serve(grpc, ingest, shutdown)
                .await
                .map_err(ServerError::Api)
        });
        Ok(in_process_ingest)
    }

    /// Steps as this process's settings run them: what a worker executes
    /// and what DryRunZap previews.
    fn executor(&self) -> Result<Executor> {
        let mailer = Mailer::new(&self.settings.email).map_err(ServerError::Actions)?;
        Executor::with_http(mailer, &self.settings.http).map_err(ServerError::Actions)
    }

    /// Serves webhooks; they go to `in_process_ingest` when the API runs
    /// here, over the network to `ingest_url` otherwise.
    fn gateway(
        &mut self,
        http: TcpListener,
        in_process_ingest: Option<zapflow_api::InProcessIngest>,
    ) -> Result<IngestTarget> {
        let api = &self.settings.api;
        let ingest = match in_process_ingest {
            Some(service) => IngestTarget::in_process(service, api.max_message_bytes),
            None => IngestTarget::connect(
                &self.settings.ingest_url,
                api.max_message_bytes,
                api.ingest_token.as_deref(),
            )?,
        };
        let router = zapflow_gateway::router(ingest.clone(), &self.settings.gateway);
        self.spawn(|shutdown| async move {
            zapflow_gateway::serve(http, router, shutdown)
                .await
                .map_err(ServerError::Gateway)
        });
        Ok(ingest)
    }

    /// Serves `/metrics`, `/livez` and `/readyz`. The process is ready
    /// while what its roles need answers: the database (API, relay,
    /// workers), the broker (relay and workers, with Kafka), and the API
    /// for a gateway that reaches it over the network (`remote_api`).
    fn admin(&mut self, listener: TcpListener, roles: &[Role], remote_api: Option<IngestTarget>) {
        let uses = |wanted: &[Role]| roles.iter().any(|role| wanted.contains(role));
        let mut admin = Admin::default();
        if uses(&[Role::Api, Role::Processor, Role::Worker]) {
            let store = self.store.clone();
            admin = admin.ready_when(
                "database",
                check(move || {
                    let store = store.clone();
                    async move { store.ping().await.map_err(|error| error.to_string()) }
                }),
            );
        }
        if let Some(bus) = self.settings.bus.clone()
            && uses(&[Role::Processor, Role::Worker])
        {
            admin = admin.ready_when(
                "broker",
                check(move || {
                    let bus = bus.clone();
                    async move { bus.ping().await.map_err(|error| error.to_string()) }
                }),
            );
        }
        if let Some(api) = remote_api {
            admin = admin.ready_when(
                "api",
                check(move || {
                    let api = api.clone();
                    async move {
                        match api.ready().await {
                            true => Ok(()),
                            false => Err("IngestService does not answer SERVING".to_owned()),
                        }
                    }
                }),
            );
        }
        // The processes that take work from the outbox report its backlog.
        if uses(&[Role::Processor, Role::Worker]) {
            let store = self.store.clone();
            let steps_only = self.settings.bus.is_none();
            admin = admin.sample_with(check(move || {
                let store = store.clone();
                async move {
                    let (due, age) = store
                        .outbox_backlog(steps_only)
                        .await
                        .map_err(|error| error.to_string())?;
                    metrics::gauge!(OUTBOX_DUE_ROWS).set(due as f64);
                    metrics::gauge!(OUTBOX_OLDEST_DUE_AGE).set(age.as_secs_f64());
                    Ok(())
                }
            }));
        }
        self.spawn(|shutdown| async move {
            admin
                .serve(listener, shutdown)
                .await
                .map_err(ServerError::Admin)
        });
    }

    /// Relays the outbox to Kafka. Without Kafka there is nothing to relay:
    /// workers read the outbox themselves, which is fine beside other roles
    /// and a mistake on its own.
    fn processors(&mut self, beside_other_roles: bool) -> Result<()> {
        let (Some(bus), Some(_)) = (self.settings.bus.clone(), self.store.postgres()) else {
            return match beside_other_roles {
                true => Ok(()),
                false => Err(ServerError::ProcessorWithoutKafka),
            };
        };
        for _ in 0..self.settings.processors {
            let relay = Relay::new(self.store.clone(), bus.clone(), self.settings.relay.clone())?;
            self.spawn(|shutdown| async move {
                relay.run(shutdown).await;
                Ok(())
            });
        }
        Ok(())
    }

    /// Runs the steps: members of the consumer group with Kafka, leasers of
    /// due outbox rows without; the first of those is `handed` the runs an
    /// API in this process starts. Dead letters past their retention are
    /// trimmed meanwhile, and one scheduler starts the runs of scheduled
    /// zaps.
    fn workers(&mut self, mut handed: Option<Handed>) -> Result<()> {
        let store = self.store.clone();
        self.spawn(move |shutdown| async move {
            scheduler::run(store, shutdown).await;
            Ok(())
        });
        if let Some(retention) = self.settings.dead_letter_retention {
            let store = self.store.clone();
            self.spawn(move |shutdown| async move {
                zapflow_worker::trim_dead_letters(store, retention, shutdown).await;
                Ok(())
            });
        }
        for _ in 0..self.settings.workers {
            let worker = Worker::new(
                self.store.clone(),
                self.executor()?,
                self.settings.worker.clone(),
            );
            match &self.settings.bus {
                Some(bus) => {
                    let consumer =
                        bus.consumer(&self.settings.consumer_group, CONSUMER_MAX_POLL_INTERVAL)?;
                    let dead_letters = DeadLetters {
                        producer: bus.producer(DEAD_LETTER_DELIVERY_TIMEOUT)?,
                        topic: bus.dead_letter_topic.clone(),
                    };
                    self.spawn(|shutdown| async move {
                        zapflow_worker::consume(worker, consumer, dead_letters, shutdown).await;
                        Ok(())
                    });
                }
                None => {
                    let (store, poll_interval) =
                        (self.store.clone(), self.settings.relay.poll_interval);
                    // Later workers lease only: nothing is handed to them.
                    let handed = handed
                        .take()
                        .unwrap_or_else(|| zapflow_worker::local_handoff(&self.settings.worker).1);
                    self.spawn(move |shutdown| async move {
                        zapflow_worker::run_local(worker, store, poll_interval, handed, shutdown)
                            .await;
                        Ok(())
                    });
                }
            }
        }
        Ok(())
    }
}
