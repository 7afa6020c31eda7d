//! IngestService: one webhook delivery becomes one run.
//!
//! Deliveries that arrive together share a database commit (a
//! [`GroupCommit`]). With a worker in this process that has steps to spare,
//! a run starts in that commit and is handed to it in memory (see
//! [`zapflow_store::handoff`]).

use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;
use zapflow_core::delivery::{self, DeliveryLimits};
use zapflow_core::{ZapStatus, secret, webhook_signature};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::ingest_service_server::IngestService;
use zapflow_store::handoff::{Handoff, Reservation};
use zapflow_store::{Delivery, GroupCommit, NewRun, RecordedRun, Store, StoreError, answers};
use zapflow_telemetry::metrics::INGEST_DURATION;
use zapflow_telemetry::trace;

use crate::error::ApiError;

/// Most runs written in one transaction.
const MAX_BATCH: usize = 256;
/// Transactions in flight at once: one commits while the next batch forms,
/// or goes on while the other retries a refused delivery's batch one by
/// one. More make smaller batches, each costing the database a statement
/// and a commit of its own (with four, PostgreSQL-only took about 10% more
/// database CPU per run and accepted about 8% fewer webhooks at c=64).
const COMMITTERS: usize = 2;

#[derive(Clone)]
pub struct IngestApi {
    store: Store,
    limits: DeliveryLimits,
    runs: GroupCommit<(Delivery, Option<Reservation>), Result<RecordedRun, StoreError>>,
    /// The worker of this process, if any, that runs may start for.
    local_worker: Option<Handoff>,
}

impl IngestApi {
    /// Starts the committer tasks; they stop once every handle is dropped.
    pub fn new(store: Store, limits: DeliveryLimits) -> Self {
        let runs = {
            let store = store.clone();
            GroupCommit::spawn("ingest", COMMITTERS, MAX_BATCH, move |batch: Vec<_>| {
                let store = store.clone();
                async move {
                    let (deliveries, reservations): (Vec<Delivery>, Vec<Option<Reservation>>) =
                        batch.into_iter().unzip();
                    // One refused delivery fails alone; an outage fails the
                    // batch.
                    let recorded = store.insert_deliveries_isolated(&deliveries).await;
                    // Handed over here, where no caller going away can
                    // cancel it.
                    let answers = answers(recorded, deliveries.len()).into_iter();
                    answers
                        .zip(reservations)
                        .map(|(answer, reservation)| {
                            let (recorded, started) = answer?;
                            if let (Some(started), Some(reservation)) = (started, reservation) {
                                reservation.hand_over(started);
                            }
                            Ok(recorded)
                        })
                        .collect()
                }
            })
        };
        Self {
            store,
            limits,
            runs,
            local_worker: None,
        }
    }

    /// Starts runs for `worker`, a worker of this process, while it has
    /// steps to spare.
    pub fn with_local_worker(mut self, worker: Handoff) -> Self {
        self.local_worker = Some(worker);
        self
    }

    /// Records a delivery; returns the run id and whether it repeated an
    /// earlier delivery's idempotency key.
    pub async fn ingest(&self, request: &pb::IngestRequest) -> Result<RecordedRun, ApiError> {
        let started = Instant::now();
        let recorded = self.record(request).await;
        metrics::histogram!(INGEST_DURATION).record(started.elapsed().as_secs_f64());
        recorded
    }

    async fn record(&self, request: &pb::IngestRequest) -> Result<RecordedRun, ApiError> {
        // One answer for every way a URL can be wrong: nothing tells a
        // prober which part was.
        const NOT_FOUND: ApiError = ApiError::NotFound("webhook");
        let zap_id = delivery::parse_zap_id(&request.zap_id).ok_or(NOT_FOUND)?;
        // Whoever calls (the gateway, or a direct caller with the ingest
        // credentials) is held to the same limits.
        delivery::check_metadata(&request.headers, &request.query, &request.idempotency_key)?;
        self.limits.check_size(&request.body)?;
        let zap = self
            .store
            .zap_for_ingest(zap_id)
            .await
            .map_err(|error| ApiError::from_store(error, "webhook"))?
            .ok_or(NOT_FOUND)?;
        // A scheduled zap has no webhook: its URL is as unknown as any.
        if zap.scheduled
            || !secret::verify(&request.token, &zap.token_hash)
            || zap.status != ZapStatus::Active
        {
            return Err(NOT_FOUND);
        }
        let idempotency_key = match &zap.signing_secret {
            // The signed `webhook-id` is the delivery's identity: unsigned
            // headers (say, a fresh Idempotency-Key) cannot make a replayed
            // delivery new.
            Some(signing_secret) => {
                verify_signature(signing_secret, request)?;
                request
                    .headers
                    .get("webhook-id")
                    .cloned()
                    .unwrap_or_default()
            }
            None => request.idempotency_key.clone(),
        };
        let trigger = self.limits.parse_body(&request.body)?;
        // The run's first outbox row continues the trace from here.
        let commit = trace::span(
            || tracing::info_span!("commit", %zap_id, trace_id = tracing::field::Empty),
        );
        trace::continue_trace(&commit, None);
        let run = NewRun {
            id: Uuid::now_v7(),
            zap_id,
            owner_id: zap.owner_id,
            trigger,
            headers: serde_json::to_value(&request.headers).unwrap_or_default(),
            query: serde_json::to_value(&request.query).unwrap_or_default(),
            actions: zap.actions.clone(),
            idempotency_key: Some(idempotency_key).filter(|key| !key.is_empty()),
            trace_parent: trace::traceparent(&commit),
            scheduled_time: None,
        };
        let reservation = match zap.actions.is_empty() {
            true => None,
            false => self.local_worker.as_ref().and_then(Handoff::reserve),
        };
        let delivery = Delivery {
            run,
            start_for: reservation.as_ref().map(Reservation::lease),
        };
        self.runs
            .submit((delivery, reservation))
            .instrument(commit)
            .await
            .ok_or(ApiError::Unavailable)?
            .map_err(|error| ApiError::from_store(error, "run"))
    }
}

/// Checks the Standard Webhooks signature of a delivery over its raw body.
fn verify_signature(signing_secret: &str, request: &pb::IngestRequest) -> Result<(), ApiError> {
    let secret = webhook_signature::Secret::parse(signing_secret).map_err(|error| {
        tracing::error!(%error, zap_id = request.zap_id, "stored signing secret does not parse");
        ApiError::Internal
    })?;
    let headers = webhook_signature::SignatureHeaders::from_fn(|name| {
        request.headers.get(name).map(String::as_str)
    });
    let now = chrono::Utc::now().timestamp();
    webhook_signature::verify(&[secret], headers, &request.body, now)
        .map_err(|error| ApiError::BadSignature(error.to_string()))
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let run = IngestApi::ingest(self, request.get_ref()).await?;
        Ok(Response::new(pb::IngestResponse {
            run_id: run.id.to_string(),
            duplicate: run.repeated,
        }))
    }
}
