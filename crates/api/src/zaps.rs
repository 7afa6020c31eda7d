//! ZapService: zaps and runs, for their owner only.

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zapflow_actions::Executor;
use zapflow_core::schedule::Trigger;
use zapflow_core::{RunStatus, StepStatus, ZapStatus, secret, webhook_signature};
use zapflow_proto::json::value_to_json;
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_server::ZapService;
use zapflow_store::{Replay, RunFilter, Store, StoreError, TimeWindow};

use crate::convert::{
    action_type_to_proto, actions_from_proto, dead_letter_to_proto, page_size, parse_id,
    parse_page_token, run_statuses_from_proto, run_to_proto, time_from_proto, trigger_from_proto,
    zap_to_proto,
};
use crate::dry_run::{Sample, dry_run};
use crate::error::{ApiError, Result};
use crate::watch::RunWatch;

#[derive(Clone)]
pub struct ZapApi {
    store: Store,
    /// Renders and checks steps for DryRunZap, as workers would.
    previews: Executor,
    /// Where webhooks are reached from outside, without a trailing slash.
    public_url: String,
    /// Ends the streams of WatchRuns (they would hold a draining server).
    shutdown: CancellationToken,
}

impl ZapApi {
    pub fn new(store: Store, public_url: &str, previews: Executor) -> Self {
        Self {
            store,
            previews,
            public_url: public_url.trim_end_matches('/').to_owned(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Ends open WatchRuns streams (UNAVAILABLE) once `shutdown` is cancelled.
    pub fn with_shutdown(self, shutdown: CancellationToken) -> Self {
        Self { shutdown, ..self }
    }

    /// A list's zap filter: none when empty, else a zap the caller owns
    /// (another user's zap id answers NOT_FOUND, not an empty list).
    async fn zap_filter(&self, owner: Uuid, zap_id: &str) -> Result<Option<Uuid>> {
        if zap_id.is_empty() {
            return Ok(None);
        }
        let id = parse_id(zap_id, "zap")?;
        self.store.get_zap(owner, id).await.map_err(zap_error)?;
        Ok(Some(id))
    }

    /// The caller's user id, from `authorization: Bearer <api key>`.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Uuid> {
        let key = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .and_then(|text| secret::ApiKey::parse(text.trim()))
            .ok_or(ApiError::Unauthenticated)?;
        self.store
            .authenticate(&key)
            .await
            .map_err(|error| ApiError::from_store(error, "api key"))?
            .ok_or(ApiError::Unauthenticated)
    }

    fn webhook_url(&self, zap_id: Uuid, token: &str) -> String {
        format!("{}/hooks/catch/{zap_id}/{token}", self.public_url)
    }

    fn validate(name: &str, actions: &[pb::Action]) -> Result<Vec<zapflow_core::ActionSpec>> {
        if name.trim().is_empty() {
            return Err(ApiError::invalid("name", "must not be empty"));
        }
        if name.len() > 200 {
            return Err(ApiError::invalid("name", "at most 200 bytes"));
        }
        Self::valid_actions(actions)
    }

    fn valid_actions(actions: &[pb::Action]) -> Result<Vec<zapflow_core::ActionSpec>> {
        let actions = actions_from_proto(actions);
        zapflow_actions::validate_actions(&actions)
            .map_err(|error| ApiError::invalid(error.field, error.message))?;
        Ok(actions)
    }

    /// Replays one of `owner`'s runs; returns its replay, which exists
    /// already when the run was replayed before (a run has at most one).
    async fn replay(
        &self,
        owner: Uuid,
        run: &zapflow_store::Run,
        from_start: bool,
    ) -> Result<Replay> {
        if !run.status.is_final() {
            return Err(ApiError::FailedPrecondition("the run is still in progress"));
        }
        let start_stage = if from_start {
            0
        } else {
            if run.status != RunStatus::Failed {
                return Err(ApiError::FailedPrecondition(
                    "only a failed run replays from its failed step; set from_start to run it again",
                ));
            }
            run.steps
                .iter()
                .position(|step| step.status != StepStatus::Succeeded)
                .unwrap_or_default() as u32
        };
        let replay = self
            .store
            .insert_replay(run, Uuid::now_v7(), start_stage)
            .await
            .map_err(run_error)?;
        if let Replay::Created(id) = replay {
            tracing::info!(%owner, original = %run.id, replay = %id, start_stage, "run replayed");
        }
        Ok(replay)
    }

    /// FAILED_PRECONDITION for a scheduled zap, which has no webhook.
    async fn refuse_scheduled(&self, owner: Uuid, id: Uuid) -> Result<()> {
        let zap = self.store.get_zap(owner, id).await.map_err(zap_error)?;
        match zap.trigger {
            Trigger::Webhook => Ok(()),
            Trigger::Schedule(_) => Err(NO_WEBHOOK),
        }
    }

    /// Pauses or resumes the zap `id` of the request's caller.
    async fn set_status<T>(
        &self,
        request: &Request<T>,
        id: &str,
        status: ZapStatus,
    ) -> Result<pb::Zap> {
        let owner = self.authenticate(request).await?;
        let id = parse_id(id, "zap")?;
        let zap = self
            .store
            .set_zap_status(owner, id, status)
            .await
            .map_err(|error| ApiError::from_store(error, "zap"))?;
        Ok(zap_to_proto(&zap))
    }
}

/// Refuses signatures for a scheduled zap: it has no webhook to sign.
fn check_signature_wanted(trigger: &Trigger, require_signature: bool) -> Result<()> {
    match (trigger, require_signature) {
        (Trigger::Schedule(_), true) => Err(ApiError::invalid(
            "require_signature",
            "a scheduled zap has no webhook to sign",
        )),
        _ => Ok(()),
    }
}

/// What RotateWebhookToken and RotateSigningSecret answer for a scheduled zap.
const NO_WEBHOOK: ApiError = ApiError::FailedPrecondition("a scheduled zap has no webhook");

fn zap_error(error: zapflow_store::StoreError) -> ApiError {
    ApiError::from_store(error, "zap")
}

/// [`zap_error`] for a write naming the zap `name`, which another zap may
/// have already.
fn zap_write_error(error: zapflow_store::StoreError, name: &str) -> ApiError {
    match error {
        StoreError::AlreadyExists => ApiError::ZapNameTaken(name.to_owned()),
        error => zap_error(error),
    }
}

fn run_error(error: zapflow_store::StoreError) -> ApiError {
    ApiError::from_store(error, "run")
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// Replays one `ReplayRuns` call makes at most; calling again goes on with
/// the failed runs not replayed yet.
const MAX_REPLAYS_PER_CALL: u32 = 1000;

#[tonic::async_trait]
impl ZapService for ZapApi {
    async fn create_zap(
        &self,
        request: Request<pb::CreateZapRequest>,
    ) -> Reply<pb::CreateZapResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let actions = Self::validate(&body.name, &body.actions)?;
        let trigger = trigger_from_proto(body.trigger.as_ref())?.unwrap_or(Trigger::Webhook);
        check_signature_wanted(&trigger, body.require_signature)?;
        // A scheduled zap keeps a token too, one nobody is shown.
        let token = secret::random_token();
        let signing_secret = body
            .require_signature
            .then(|| webhook_signature::Secret::generate().expose());
        let zap = self
            .store
            .create_zap_triggered(
                owner,
                body.name.trim(),
                &actions,
                &secret::hash(&token),
                signing_secret.as_deref(),
                &trigger,
            )
            .await
            .map_err(|error| zap_write_error(error, body.name.trim()))?;
        tracing::info!(zap_id = %zap.id, "zap created");
        Ok(Response::new(pb::CreateZapResponse {
            webhook_url: match trigger {
                Trigger::Webhook => self.webhook_url(zap.id, &token),
                Trigger::Schedule(_) => String::new(),
            },
            zap: Some(zap_to_proto(&zap)),
            signing_secret: signing_secret.unwrap_or_default(),
        }))
    }

    async fn get_zap(&self, request: Request<pb::GetZapRequest>) -> Reply<pb::GetZapResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let zap = match (body.id.as_str(), body.name.as_str()) {
            ("", "") => return Err(ApiError::invalid("id", "give the zap's id or name").into()),
            ("", name) => self.store.zap_by_name(owner, name.trim()).await,
            (id, _) => self.store.get_zap(owner, parse_id(id, "zap")?).await,
        }
        .map_err(zap_error)?;
        Ok(Response::new(pb::GetZapResponse {
            zap: Some(zap_to_proto(&zap)),
        }))
    }

    async fn list_zaps(
        &self,
        request: Request<pb::ListZapsRequest>,
    ) -> Reply<pb::ListZapsResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let limit = page_size(body.page_size)?;
        let after = parse_page_token(&body.page_token)?;
        let mut zaps = self
            .store
            .list_zaps(owner, after, limit + 1)
            .await
            .map_err(zap_error)?;
        let more = zaps.len() > limit as usize;
        zaps.truncate(limit as usize);
        let next_page_token = match (more, zaps.last()) {
            (true, Some(last)) => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListZapsResponse {
            zaps: zaps.iter().map(zap_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_zap(
        &self,
        request: Request<pb::UpdateZapRequest>,
    ) -> Reply<pb::UpdateZapResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let id = parse_id(&body.id, "zap")?;
        let actions = Self::validate(&body.name, &body.actions)?;
        let trigger = trigger_from_proto(body.trigger.as_ref())?;
        if body.require_signature == Some(true) {
            let trigger = match &trigger {
                Some(trigger) => trigger.clone(),
                None => {
                    self.store
                        .get_zap(owner, id)
                        .await
                        .map_err(zap_error)?
                        .trigger
                }
            };
            check_signature_wanted(&trigger, true)?;
        }
        let name = body.name.trim();
        let mut zap = self
            .store
            .update_zap_triggered(owner, id, name, &actions, trigger.as_ref())
            .await
            .map_err(|error| zap_write_error(error, name))?;
        let mut signing_secret = String::new();
        match body.require_signature {
            Some(true) if !zap.signature_required => {
                signing_secret = webhook_signature::Secret::generate().expose();
                self.store
                    .set_zap_signing_secret(owner, id, &signing_secret)
                    .await
                    .map_err(zap_error)?;
                zap.signature_required = true;
            }
            Some(false) if zap.signature_required => {
                self.store
                    .clear_zap_signing_secret(owner, id)
                    .await
                    .map_err(zap_error)?;
                zap.signature_required = false;
            }
            _ => {}
        }
        Ok(Response::new(pb::UpdateZapResponse {
            zap: Some(zap_to_proto(&zap)),
            signing_secret,
        }))
    }

    async fn delete_zap(
        &self,
        request: Request<pb::DeleteZapRequest>,
    ) -> Reply<pb::DeleteZapResponse> {
        let owner = self.authenticate(&request).await?;
        let id = parse_id(&request.get_ref().id, "zap")?;
        self.store.delete_zap(owner, id).await.map_err(zap_error)?;
        Ok(Response::new(pb::DeleteZapResponse {}))
    }

    async fn pause_zap(
        &self,
        request: Request<pb::PauseZapRequest>,
    ) -> Reply<pb::PauseZapResponse> {
        let zap = self
            .set_status(&request, &request.get_ref().id, ZapStatus::Paused)
            .await?;
        Ok(Response::new(pb::PauseZapResponse { zap: Some(zap) }))
    }

    async fn resume_zap(
        &self,
        request: Request<pb::ResumeZapRequest>,
    ) -> Reply<pb::ResumeZapResponse> {
        let zap = self
            .set_status(&request, &request.get_ref().id, ZapStatus::Active)
            .await?;
        Ok(Response::new(pb::ResumeZapResponse { zap: Some(zap) }))
    }

    async fn rotate_webhook_token(
        &self,
        request: Request<pb::RotateWebhookTokenRequest>,
    ) -> Reply<pb::RotateWebhookTokenResponse> {
        let owner = self.authenticate(&request).await?;
        let id = parse_id(&request.get_ref().id, "zap")?;
        self.refuse_scheduled(owner, id).await?;
        let token = secret::random_token();
        self.store
            .set_zap_token(owner, id, &secret::hash(&token))
            .await
            .map_err(zap_error)?;
        Ok(Response::new(pb::RotateWebhookTokenResponse {
            webhook_url: self.webhook_url(id, &token),
        }))
    }

    async fn rotate_signing_secret(
        &self,
        request: Request<pb::RotateSigningSecretRequest>,
    ) -> Reply<pb::RotateSigningSecretResponse> {
        let owner = self.authenticate(&request).await?;
        let id = parse_id(&request.get_ref().id, "zap")?;
        self.refuse_scheduled(owner, id).await?;
        let signing_secret = webhook_signature::Secret::generate().expose();
        self.store
            .set_zap_signing_secret(owner, id, &signing_secret)
            .await
            .map_err(zap_error)?;
        Ok(Response::new(pb::RotateSigningSecretResponse {
            signing_secret,
        }))
    }

    async fn dry_run_zap(
        &self,
        request: Request<pb::DryRunZapRequest>,
    ) -> Reply<pb::DryRunZapResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let (zap_id, actions) = match body.zap_id.as_str() {
            "" => (Uuid::nil(), Self::valid_actions(&body.actions)?),
            id => {
                let zap = self
                    .store
                    .get_zap(owner, parse_id(id, "zap_id")?)
                    .await
                    .map_err(zap_error)?;
                (zap.id, zap.actions)
            }
        };
        let sample = Sample {
            zap_id,
            payload: body
                .payload
                .as_ref()
                .map_or_else(|| serde_json::json!({}), value_to_json),
            headers: &body.headers,
            query: &body.query,
        };
        let steps = dry_run(&self.previews, &actions, &sample).await;
        Ok(Response::new(pb::DryRunZapResponse { steps }))
    }

    async fn list_action_types(
        &self,
        request: Request<pb::ListActionTypesRequest>,
    ) -> Reply<pb::ListActionTypesResponse> {
        self.authenticate(&request).await?;
        Ok(Response::new(pb::ListActionTypesResponse {
            action_types: zapflow_actions::catalog()
                .iter()
                .map(action_type_to_proto)
                .collect(),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Reply<pb::ListRunsResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let filter = RunFilter {
            zap_id: self.zap_filter(owner, &body.zap_id).await?,
            statuses: run_statuses_from_proto(&body.statuses, "statuses")?,
            created: TimeWindow {
                start: time_from_proto(body.start_time.as_ref(), "start_time")?,
                end: time_from_proto(body.end_time.as_ref(), "end_time")?,
            },
            stopped: body.stopped,
        };
        let limit = page_size(body.page_size)?;
        let before = parse_page_token(&body.page_token)?;
        let full = body.view() == pb::RunView::Full;
        let page = self
            .store
            .list_runs_where(owner, &filter, before, limit, full)
            .await
            .map_err(run_error)?;
        Ok(Response::new(runs_page(page, full)))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Reply<pb::ListDeadLettersResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let zap_id = self.zap_filter(owner, &body.zap_id).await?;
        let limit = page_size(body.page_size)?;
        let before = parse_page_token(&body.page_token)?;
        let page = self
            .store
            .list_dead_letters(owner, zap_id, before, limit)
            .await
            .map_err(|error| ApiError::from_store(error, "dead letter"))?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: page.dead_letters.iter().map(dead_letter_to_proto).collect(),
            next_page_token: page
                .next_before
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn replay_run(
        &self,
        request: Request<pb::ReplayRunRequest>,
    ) -> Reply<pb::ReplayRunResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let id = parse_id(&body.id, "run")?;
        let original = self.store.owned_run(owner, id).await.map_err(run_error)?;
        let replay = self.replay(owner, &original, body.from_start).await?;
        let replay = self
            .store
            .owned_run(owner, replay.id())
            .await
            .map_err(run_error)?;
        Ok(Response::new(pb::ReplayRunResponse {
            run: Some(run_to_proto(&replay)),
        }))
    }

    async fn replay_runs(
        &self,
        request: Request<pb::ReplayRunsRequest>,
    ) -> Reply<pb::ReplayRunsResponse> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let zap_id = parse_id(&body.zap_id, "zap")?;
        self.store.get_zap(owner, zap_id).await.map_err(zap_error)?;
        let window = TimeWindow {
            start: time_from_proto(body.start_time.as_ref(), "start_time")?,
            end: time_from_proto(body.end_time.as_ref(), "end_time")?,
        };
        let failed = self
            .store
            .failed_runs(owner, zap_id, &window, MAX_REPLAYS_PER_CALL)
            .await
            .map_err(run_error)?;
        let mut run_ids = Vec::new();
        for id in failed {
            let original = self.store.owned_run(owner, id).await.map_err(run_error)?;
            // A run a concurrent call replayed meanwhile is that call's.
            if let Replay::Created(replay) = self.replay(owner, &original, body.from_start).await? {
                run_ids.push(replay.to_string());
            }
        }
        Ok(Response::new(pb::ReplayRunsResponse { run_ids }))
    }

    type WatchRunsStream = ReceiverStream<std::result::Result<pb::WatchRunsResponse, Status>>;

    async fn watch_runs(
        &self,
        request: Request<pb::WatchRunsRequest>,
    ) -> Reply<Self::WatchRunsStream> {
        let owner = self.authenticate(&request).await?;
        let body = request.get_ref();
        let zap_id = self.zap_filter(owner, &body.zap_id).await?;
        let statuses = run_statuses_from_proto(&body.statuses, "statuses")?;
        let since = time_from_proto(body.start_time.as_ref(), "start_time")?
            .unwrap_or_else(chrono::Utc::now);
        let watch = RunWatch::new(self.store.clone(), owner, zap_id, statuses, since);
        Ok(Response::new(watch.spawn(self.shutdown.clone())))
    }

    async fn get_run(&self, request: Request<pb::GetRunRequest>) -> Reply<pb::GetRunResponse> {
        let owner = self.authenticate(&request).await?;
        let id = parse_id(&request.get_ref().id, "run")?;
        let run = self.store.owned_run(owner, id).await.map_err(run_error)?;
        Ok(Response::new(pb::GetRunResponse {
            run: Some(run_to_proto(&run)),
        }))
    }
}

/// Encoded size a page of runs may reach: room under the 4 MiB that clients
/// accept by default, for the envelope and the next page token.
const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// A ListRuns page. With payloads, the page ends before the run that would
/// take it over [`MAX_PAGE_BYTES`] (but holds at least one run), and the
/// token continues from there, so paging still visits every run.
fn runs_page(page: zapflow_store::RunPage, full: bool) -> pb::ListRunsResponse {
    let mut runs = Vec::with_capacity(page.runs.len());
    let mut bytes = 0;
    let mut next_before = page.next_before;
    for (index, run) in page.runs.iter().enumerate() {
        let mut proto = run_to_proto(run);
        if !full {
            proto.trigger = None;
        }
        // The field's tag and length prefix take a few bytes more.
        bytes += prost::Message::encoded_len(&proto) + 8;
        if bytes > MAX_PAGE_BYTES && index > 0 {
            next_before = Some(page.runs[index - 1].id);
            break;
        }
        runs.push(proto);
    }
    pb::ListRunsResponse {
        runs,
        next_page_token: next_before.map(|id| id.to_string()).unwrap_or_default(),
    }
}
