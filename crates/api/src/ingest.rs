//! IngestService: one webhook delivery becomes one run.
//!
//! Deliveries that arrive together share a database commit: each request
//! joins a queue, and a few committer tasks each take everything queued,
//! write it in one transaction and answer every waiting request.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zapflow_core::delivery::{self, DeliveryLimits};
use zapflow_core::{ZapStatus, secret, webhook_signature};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::ingest_service_server::IngestService;
use zapflow_store::{NewRun, RecordedRun, Store};

use crate::error::ApiError;

/// Most runs written in one transaction.
const MAX_BATCH: usize = 256;
/// Transactions in flight at once.
const COMMITTERS: usize = 4;

type Reply = oneshot::Sender<Result<RecordedRun, ApiError>>;

#[derive(Clone)]
pub struct IngestApi {
    store: Store,
    limits: DeliveryLimits,
    queue: mpsc::Sender<(NewRun, Reply)>,
}

impl IngestApi {
    /// Starts the committer tasks; they stop once every handle is dropped.
    pub fn new(store: Store, limits: DeliveryLimits) -> Self {
        let (queue, receiver) = mpsc::channel(MAX_BATCH * COMMITTERS);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..COMMITTERS {
            tokio::spawn(commit_batches(store.clone(), receiver.clone()));
        }
        Self {
            store,
            limits,
            queue,
        }
    }

    /// Records a delivery; returns the run id and whether it repeated an
    /// earlier delivery's idempotency key.
    pub async fn ingest(&self, request: &pb::IngestRequest) -> Result<RecordedRun, ApiError> {
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
        if !secret::verify(&request.token, &zap.token_hash) || zap.status != ZapStatus::Active {
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
        let run = NewRun {
            id: Uuid::now_v7(),
            zap_id,
            owner_id: zap.owner_id,
            trigger,
            headers: serde_json::to_value(&request.headers).unwrap_or_default(),
            query: serde_json::to_value(&request.query).unwrap_or_default(),
            actions: zap.actions,
            idempotency_key: Some(idempotency_key).filter(|key| !key.is_empty()),
        };
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((run, reply))
            .await
            .map_err(|_| ApiError::Unavailable)?;
        answer.await.map_err(|_| ApiError::Unavailable)?
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

async fn commit_batches(store: Store, receiver: Arc<Mutex<mpsc::Receiver<(NewRun, Reply)>>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
        }
        // A caller that gave up (its deadline passed, the sender hung up)
        // before its turn gets no run: it saw an error, and its retry
        // starts afresh.
        let (runs, replies): (Vec<NewRun>, Vec<Reply>) = batch
            .drain(..)
            .filter(|(_, reply)| !reply.is_closed())
            .unzip();
        if runs.is_empty() {
            continue;
        }
        // One refused delivery fails alone; an outage fails the batch.
        match store.insert_runs_isolated(&runs).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result.map_err(|error| ApiError::from_store(error, "run")));
                }
            }
            Err(error) => {
                let error = ApiError::from_store(error, "run");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
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
