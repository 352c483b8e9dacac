//! `/v1/fine_tuning/jobs`: create, list, get, cancel, events (JSON pages, or server-sent
//! events with `stream=true`), checkpoints and per-step metrics.
//!
//! Shapes follow OpenAI's `fine_tuning.job`, `fine_tuning.job.event` and
//! `fine_tuning.job.checkpoint`, so the official clients work unchanged. molt adds
//! `trainable_parameters`, `progress`, `metrics` and `adapter_id`, and takes the PEFT method
//! in `method` (`{"type": "lora", …}`); OpenAI's
//! `{"type": "supervised", "supervised": {"hyperparameters": …}}` is accepted too and means
//! the default method.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use storage::{Checkpoint, FileStatus, Job, JobEvent, JobMetric, JobStatus, NewJob};

use super::{ListParams, ListResponse, idempotency_key};
use crate::auth::Tenant;
use crate::dataset::PURPOSE_FINE_TUNE;
use crate::error::{ApiError, Json, Path, Query};
use crate::limits::check_metadata;
use crate::state::AppState;
use crate::training::{self, Hyperparameters};

/// Body of `POST /v1/fine_tuning/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub hyperparameters: Option<Value>,
    pub method: Option<Value>,
    #[serde(default, deserialize_with = "super::integer::opt_i64")]
    pub seed: Option<i64>,
    pub suffix: Option<String>,
    /// OpenAI's; only `null` or `[]` is accepted.
    pub integrations: Option<Value>,
    /// OpenAI's; accepted and ignored.
    pub metadata: Option<Value>,
}

/// OpenAI's `error` object of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobErrorObject {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// molt: the dataset line the error is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<i64>,
}

/// molt: where a job is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobProgress {
    pub step: i64,
    pub total_steps: Option<i64>,
    pub tokens_seen: i64,
    /// 0–100.
    pub percent: Option<f64>,
    pub attempts: i64,
}

/// OpenAI's `fine_tuning.job`, plus molt's fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub error: Option<JobErrorObject>,
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<i64>,
    pub hyperparameters: Value,
    pub model: String,
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub seed: i64,
    pub status: String,
    pub trained_tokens: Option<i64>,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub estimated_finish: Option<i64>,
    pub integrations: Vec<Value>,
    pub metadata: Option<Value>,
    pub user_provided_suffix: Option<String>,
    /// The PEFT method (molt's extension of OpenAI's `method`).
    pub method: Value,
    pub trainable_parameters: Option<i64>,
    pub progress: JobProgress,
    /// The latest metrics the worker reported (loss, learning rate, tokens/s, …).
    pub metrics: Option<Value>,
    /// The trained adapter (`/v1/adapters/{id}`).
    pub adapter_id: Option<String>,
    /// A search's trial: `{"id": "ftsearch-…", "trial": n}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Value>,
}

impl From<Job> for JobObject {
    fn from(j: Job) -> Self {
        let percent = j
            .total_steps
            .filter(|t| *t > 0)
            .map(|t| (j.step as f64 / t as f64 * 100.0).clamp(0.0, 100.0));
        let error = j.error.map(|e| JobErrorObject {
            param: e.line.map(|_| "training_file".to_string()),
            code: e.kind,
            message: e.message,
            line: e.line,
        });
        JobObject {
            object: "fine_tuning.job".into(),
            created_at: j.created_at,
            error,
            fine_tuned_model: j.fine_tuned_model,
            finished_at: j.finished_at,
            hyperparameters: j.hyperparameters,
            model: j.model,
            organization_id: j.tenant_id,
            result_files: Vec::new(),
            seed: j.seed,
            status: j.status.as_str().to_string(),
            trained_tokens: (j.status == JobStatus::Succeeded || j.tokens_seen > 0)
                .then_some(j.tokens_seen),
            training_file: j.training_file,
            validation_file: j.validation_file,
            estimated_finish: j.estimated_finish,
            integrations: Vec::new(),
            metadata: None,
            user_provided_suffix: j.suffix,
            method: j.method,
            trainable_parameters: j.trainable_params,
            progress: JobProgress {
                step: j.step,
                total_steps: j.total_steps,
                tokens_seen: j.tokens_seen,
                percent,
                attempts: j.attempts,
            },
            metrics: j.metrics,
            adapter_id: j.result_adapter_id,
            search: j
                .search_id
                .map(|id| json!({"id": id, "trial": j.trial_number})),
            id: j.id,
        }
    }
}

/// Splits OpenAI's `method` into (PEFT method, hyperparameters given inside it), checking
/// the shape `openapi.yaml` gives it (400): an object whose `type` is a PEFT method,
/// `hybrid` or `supervised` (with an object `supervised` holding `hyperparameters` and
/// `peft`). The PEFT method's options are the trainer's, checked later (422).
fn split_method(method: Option<Value>) -> Result<(Value, Option<Value>), ApiError> {
    let Some(method) = method.filter(|m| !m.is_null()) else {
        return Ok((training::default_method(), None));
    };
    match method_type(&method, "method")? {
        "supervised" => {
            let supervised = match method.get("supervised") {
                None | Some(Value::Null) => return Ok((training::default_method(), None)),
                Some(s @ Value::Object(_)) => s,
                Some(other) => {
                    return Err(ApiError::bad_request(
                        "invalid_method",
                        format!("method.supervised must be an object, got {other}"),
                    )
                    .param("method.supervised"));
                }
            };
            let hp = supervised.get("hyperparameters").cloned();
            // molt extension: a PEFT config inside OpenAI's form.
            let peft = match supervised.get("peft") {
                None | Some(Value::Null) => training::default_method(),
                Some(p) => {
                    let kind = method_type(p, "method.supervised.peft")?;
                    if kind == "supervised" {
                        return Err(unknown_method_type(kind, "method.supervised.peft"));
                    }
                    p.clone()
                }
            };
            Ok((peft, hp))
        }
        _ => Ok((method, None)),
    }
}

/// The `type` of a method object: a PEFT method, `hybrid` or `supervised` (400 otherwise).
fn method_type<'a>(method: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    let Some(obj) = method.as_object() else {
        return Err(ApiError::bad_request(
            "invalid_method",
            format!("{param} must be an object with a `type`, got {method}"),
        )
        .param(param));
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "invalid_method",
            format!("{param} needs a string `type` (e.g. \"lora\")"),
        )
        .param(param));
    };
    match kind {
        "dpo" | "reinforcement" => Err(ApiError::bad_request(
            "unsupported_method",
            format!("method '{kind}' is not supported; molt trains supervised PEFT adapters"),
        )
        .param(param)),
        "supervised" | "hybrid" => Ok(kind),
        k if trainer::peft::METHOD_TYPES.contains(&k) => Ok(kind),
        other => Err(unknown_method_type(other, param)),
    }
}

fn unknown_method_type(kind: &str, param: &str) -> ApiError {
    let mut valid: Vec<&str> = trainer::peft::METHOD_TYPES.to_vec();
    valid.push("hybrid");
    if param == "method" {
        valid.push("supervised");
    }
    ApiError::bad_request(
        "invalid_method",
        format!(
            "unknown method type '{kind}'; valid types: {}",
            valid.join(", ")
        ),
    )
    .param(param)
}

/// Settings given by more than one field: the inner hyperparameters take a setting whole.
const HP_SETTINGS: &[&[&str]] = &[
    &["learning_rate", "learning_rate_multiplier"],
    &["n_epochs", "epochs"],
    &["warmup_steps", "warmup_ratio"],
];

/// OpenAI's `method.supervised.hyperparameters` over the top-level `hyperparameters`: the
/// inner object wins setting by setting (a learning rate, the epochs and the warm-up are
/// one setting each, whichever field gives it), so two objects that are each valid never
/// contradict each other.
fn merge_hyperparameters(
    inner: Option<Value>,
    outer: Option<Value>,
) -> Result<Option<Value>, ApiError> {
    let inner = inner.filter(|v| !v.is_null());
    if let Some(v) = &inner
        && !v.is_object()
    {
        return Err(ApiError::bad_request(
            "invalid_hyperparameter",
            format!("method.supervised.hyperparameters must be an object, got {v}"),
        )
        .param("method.supervised.hyperparameters"));
    }
    // Each object is checked on its own (400), so nothing the merge drops goes unchecked.
    for v in [&inner, &outer] {
        Hyperparameters::from_request(v.as_ref(), 0, &Default::default())?;
    }
    match (inner, outer) {
        (None, outer) => Ok(outer),
        (Some(Value::Object(mut inner)), Some(Value::Object(outer))) => {
            for (k, v) in outer {
                let taken = HP_SETTINGS
                    .iter()
                    .find(|fields| fields.contains(&k.as_str()))
                    .is_some_and(|fields| fields.iter().any(|f| inner.contains_key(*f)));
                if !taken {
                    inner.entry(k).or_insert(v);
                }
            }
            Ok(Some(Value::Object(inner)))
        }
        (Some(inner), _) => Ok(Some(inner)),
    }
}

pub(super) fn check_suffix(suffix: &Option<String>) -> Result<(), ApiError> {
    if let Some(s) = suffix
        && (s.is_empty()
            || s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return Err(ApiError::bad_request(
            "invalid_suffix",
            format!("suffix must be 1 to 64 characters of [A-Za-z0-9_-], got '{s}'"),
        )
        .param("suffix"));
    }
    Ok(())
}

/// Looks a dataset up and checks it can be trained on.
pub(super) async fn usable_file(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    param: &'static str,
) -> Result<storage::FileRecord, ApiError> {
    let file = match state.db.get_file(&tenant.id, id).await {
        Ok(f) => f,
        Err(storage::Error::NotFound { .. }) => {
            return Err(ApiError::bad_request(
                "file_not_found",
                format!("{param} '{id}' does not exist"),
            )
            .param(param));
        }
        Err(e) => return Err(e.into()),
    };
    if file.purpose != PURPOSE_FINE_TUNE {
        return Err(ApiError::bad_request(
            "invalid_file_purpose",
            format!(
                "{param} '{id}' has purpose '{}'; it must be '{PURPOSE_FINE_TUNE}'",
                file.purpose
            ),
        )
        .param(param));
    }
    if file.status != FileStatus::Processed {
        let code = if param == "training_file" {
            "invalid_training_file"
        } else {
            "invalid_validation_file"
        };
        return Err(ApiError::bad_request(
            code,
            format!(
                "{param} '{id}' is not a valid dataset: {}",
                file.status_details
                    .as_deref()
                    .unwrap_or("it has not been processed")
            ),
        )
        .param(param));
    }
    Ok(file)
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    Json(req): Json<CreateJob>,
) -> Result<Json<JobObject>, ApiError> {
    let idem = idempotency_key(&headers)?;
    // What the document states (400), before anything is looked up — a repeated request
    // too, so a key never makes an invalid request succeed.
    if let Some(i) = &req.integrations
        && !(i.is_null() || i.as_array().is_some_and(Vec::is_empty))
    {
        return Err(ApiError::bad_request(
            "unsupported_integrations",
            "integrations are not supported",
        )
        .param("integrations"));
    }
    check_suffix(&req.suffix)?;
    check_metadata(req.metadata.as_ref())?;
    let seed = match req.seed {
        Some(s) if s >= 0 && s <= i64::from(i32::MAX) => s,
        Some(s) => {
            return Err(ApiError::bad_request(
                "invalid_seed",
                format!("seed must be between 0 and {}, got {s}", i32::MAX),
            )
            .param("seed"));
        }
        None => i64::from(rand_seed()),
    };
    let (method, method_hp) = split_method(req.method)?;
    let hp_value = merge_hyperparameters(method_hp, req.hyperparameters)?;
    Hyperparameters::from_request(hp_value.as_ref(), 0, &Default::default())?;
    if let Some(key) = &idem
        && let Some(existing) = state
            .db
            .find_job_by_idempotency_key(&tenant.id, key)
            .await?
    {
        return Ok(Json(existing.into()));
    }

    // What the request names, refused as OpenAI does (400 `invalid_request_error`): a model,
    // a file that does not exist or cannot be trained on, a method that does not fit.
    let base = base_model(&state, &req.model).await?;
    let training_file = usable_file(&state, &tenant, &req.training_file, "training_file").await?;
    let validation_file = match &req.validation_file {
        Some(v) => Some(usable_file(&state, &tenant, v, "validation_file").await?),
        None => None,
    };
    let files = training::check_files(&base.config, &training_file, validation_file.as_ref())?;
    let classes = files.classes.as_ref().map(Vec::len);
    let checked = training::check_method(&method, &base.config, classes)?;
    let examples = files.train_examples;
    let vision = files.classes.is_some();
    let defaults = if vision {
        trainer::train::Hyperparameters::vision_recipe()
    } else {
        trainer::train::Hyperparameters::default()
    };
    let mut hp = Hyperparameters::from_request(hp_value.as_ref(), examples, &defaults)?;
    // Stored as the worker will train: vision jobs validate every epoch unless told otherwise.
    if vision {
        hp.train.validate_every_epoch(examples as usize);
    }
    let new = NewJob {
        tenant_id: tenant.id.clone(),
        model: base.id.clone(),
        training_file: training_file.id.clone(),
        validation_file: req.validation_file.clone(),
        method: checked.method,
        hyperparameters: hp.to_value(),
        seed,
        suffix: req.suffix.clone(),
        trainable_params: checked.trainable_parameters,
        total_steps: Some(hp.total_steps(examples)),
        max_attempts: Some(state.config.job_max_attempts),
        idempotency_key: idem,
        trial: None,
    };
    let (job, _) = state.db.submit_job(new).await?;
    tracing::info!(job_id = %job.id, model = %job.model, "fine-tuning job queued");
    Ok(Json(job.into()))
}

/// The base model a request names (400 `model_not_found` listing the known ones).
pub(super) async fn base_model(
    state: &AppState,
    model: &str,
) -> Result<storage::BaseModel, ApiError> {
    match state.db.get_base_model(model).await {
        Ok(m) => Ok(m),
        Err(storage::Error::NotFound { .. }) => {
            let known: Vec<String> = state
                .db
                .list_base_models()
                .await?
                .into_iter()
                .map(|m| m.id)
                .collect();
            Err(ApiError::bad_request(
                "model_not_found",
                format!(
                    "model '{}' does not exist; base models: [{}]",
                    model,
                    known.join(", ")
                ),
            )
            .param("model"))
        }
        Err(e) => Err(e.into()),
    }
}

/// A non-negative 31-bit seed from the system clock and the process id.
pub(super) fn rand_seed() -> i32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((nanos ^ std::process::id().rotate_left(16)) & 0x7fff_ffff) as i32
}

/// `GET /v1/fine_tuning/jobs`.
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<JobListParams>,
) -> Result<Json<ListResponse<JobObject>>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|s| {
            s.parse::<JobStatus>().map_err(|_| {
                let all: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(
                    "invalid_status",
                    format!("status '{s}' is not one of {}", all.join(", ")),
                )
                .param("status")
            })
        })
        .transpose()?;
    let page_params = ListParams {
        after: q.after,
        limit: q.limit,
        order: q.order,
    };
    let limit = page_params.limit(20, 1000)?;
    let page = state
        .db
        .list_jobs(&tenant.id, status, page_params.after.as_deref(), limit)
        .await?;
    Ok(Json(ListResponse::from_page(page, JobObject::from, |j| {
        j.id.clone()
    })))
}

/// The job list's query: pagination and an optional status filter (the dashboard's filter,
/// and any client's "what is running now").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobListParams {
    after: Option<String>,
    limit: Option<u32>,
    order: Option<String>,
    status: Option<String>,
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<JobObject>, ApiError> {
    Ok(Json(state.db.get_job(&tenant.id, &id).await?.into()))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: 409 for a finished job.
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<JobObject>, ApiError> {
    Ok(Json(state.db.request_cancel(&tenant.id, &id).await?.into()))
}

/// OpenAI's `fine_tuning.job.event`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Option<Value>,
    /// molt: 1, 2, 3 … per job (also the SSE event id).
    pub seq: i64,
}

impl From<JobEvent> for EventObject {
    fn from(e: JobEvent) -> Self {
        EventObject {
            id: e.id,
            object: "fine_tuning.job.event".into(),
            created_at: e.created_at,
            level: e.level.as_str().to_string(),
            message: e.message,
            kind: e.event_type,
            data: e.data,
            seq: e.seq,
        }
    }
}

/// Query of `GET …/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    pub after: Option<String>,
    pub limit: Option<u32>,
    /// Server-sent events: every event from the start (or after `Last-Event-ID`), oldest
    /// first, then new ones as they happen; ends with `data: [DONE]` once the job has
    /// finished.
    #[serde(default)]
    pub stream: bool,
}

/// `GET /v1/fine_tuning/jobs/{id}/events`.
pub async fn events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<EventParams>,
) -> Result<Response, ApiError> {
    let params = ListParams {
        after: q.after,
        limit: q.limit,
        order: None,
    };
    // Checked in both modes, so a page and a stream refuse the same bad parameters.
    let limit = params.limit(20, 1000)?;
    if q.stream {
        // 404 before the stream starts.
        state.db.get_job(&tenant.id, &id).await?;
        let stream = event_stream(state, tenant.id, id, last_event_id(&headers));
        return Ok(sse(stream));
    }
    let page = state
        .db
        .list_job_events(&tenant.id, &id, params.after.as_deref(), limit)
        .await?;
    Ok(Json(ListResponse::from_page(page, EventObject::from, |e| {
        e.id.clone()
    }))
    .into_response())
}

/// The `seq` a resuming SSE client last saw (`Last-Event-ID`), 0 for the start.
pub(super) fn last_event_id(headers: &HeaderMap) -> i64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

/// An SSE response with keep-alive comments.
pub(super) fn sse(
    stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

enum StreamState {
    Running { last_seq: i64 },
    Done,
}

/// Polls the job's events and yields them as SSE, finishing with `[DONE]`.
fn event_stream(
    state: AppState,
    tenant_id: String,
    job_id: String,
    last_seq: i64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let interval = state.config.event_poll_interval;
    poll_events(interval, last_seq, EventObject::from, move |after| {
        let (state, tenant_id, job_id) = (state.clone(), tenant_id.clone(), job_id.clone());
        async move {
            // Read the status first: events written before a terminal status are then
            // certain to be in the next read.
            let done = state
                .db
                .get_job(&tenant_id, &job_id)
                .await?
                .status
                .is_terminal();
            let batch = state
                .db
                .job_events_since(&tenant_id, &job_id, after, 500)
                .await?;
            Ok((done, batch))
        }
    })
}

/// Server-sent events from `fetch(after_seq) -> (finished, events after it)`, polled every
/// `interval`, each sent as `to_object(event)` with its `seq` as the SSE id; ends with
/// `[DONE]` once finished and drained.
pub(super) fn poll_events<O, F, Fut>(
    interval: Duration,
    last_seq: i64,
    to_object: fn(JobEvent) -> O,
    fetch: F,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    O: Serialize,
    F: Fn(i64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(bool, Vec<JobEvent>), storage::Error>> + Send,
{
    let fetch = std::sync::Arc::new(fetch);
    stream::unfold(StreamState::Running { last_seq }, move |st| {
        let fetch = fetch.clone();
        async move {
            let StreamState::Running { mut last_seq } = st else {
                return None;
            };
            loop {
                let (done, batch) = match fetch(last_seq).await {
                    Ok(x) => x,
                    Err(e) => {
                        let ev = Event::default().event("error").data(e.to_string());
                        return Some((vec![ev], StreamState::Done));
                    }
                };
                if !batch.is_empty() {
                    let mut out = Vec::with_capacity(batch.len());
                    for e in batch {
                        last_seq = e.seq;
                        let seq = e.seq;
                        let data = serde_json::to_string(&to_object(e)).unwrap_or_default();
                        out.push(Event::default().id(seq.to_string()).data(data));
                    }
                    return Some((out, StreamState::Running { last_seq }));
                }
                if done {
                    return Some((vec![Event::default().data("[DONE]")], StreamState::Done));
                }
                tokio::time::sleep(interval).await;
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

/// OpenAI's `fine_tuning.job.checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub metrics: Value,
    pub step_number: i64,
}

fn checkpoint_object(c: Checkpoint, model: &str) -> CheckpointObject {
    let mut metrics = c.metrics.unwrap_or_else(|| json!({}));
    if let Value::Object(m) = &mut metrics {
        m.insert("step".into(), json!(c.step));
    }
    CheckpointObject {
        fine_tuned_model_checkpoint: format!("{model}:{}:ckpt-step-{}", c.job_id, c.step),
        id: c.id,
        object: "fine_tuning.job.checkpoint".into(),
        created_at: c.created_at,
        fine_tuning_job_id: c.job_id,
        metrics,
        step_number: c.step,
    }
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`.
pub async fn checkpoints(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(q): Query<ListParams>,
) -> Result<Json<ListResponse<CheckpointObject>>, ApiError> {
    let limit = q.limit(10, 1000)?;
    let job = state.db.get_job(&tenant.id, &id).await?;
    let page = state
        .db
        .list_checkpoints(&tenant.id, &id, q.after.as_deref(), limit)
        .await?;
    let model = format!("ft:{}", job.model);
    Ok(Json(ListResponse::from_page(
        page,
        |c| checkpoint_object(c, &model),
        |c| c.id.clone(),
    )))
}

/// Query of `GET …/metrics`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricParams {
    /// Only steps after this one.
    pub after_step: Option<i64>,
    pub limit: Option<u32>,
}

/// One step's metrics (molt extension).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricObject {
    pub object: String,
    #[serde(flatten)]
    pub metric: JobMetric,
}

/// `GET /v1/fine_tuning/jobs/{id}/metrics`: per-step metrics in step order.
pub async fn metrics(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(q): Query<MetricParams>,
) -> Result<Json<ListResponse<MetricObject>>, ApiError> {
    let limit = ListParams {
        limit: q.limit,
        ..ListParams::default()
    }
    .limit(1000, 10_000)?;
    if let Some(step) = q.after_step
        && step < 0
    {
        return Err(ApiError::bad_request(
            "invalid_after_step",
            format!("after_step must be 0 or more, got {step}"),
        )
        .param("after_step"));
    }
    let page = state
        .db
        .list_job_metrics(&tenant.id, &id, q.after_step, limit)
        .await?;
    Ok(Json(ListResponse::from_page(
        page,
        |m| MetricObject {
            object: "fine_tuning.job.metric".into(),
            metric: m,
        },
        |m| m.step.to_string(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_method_form_is_split() {
        let (m, hp) = split_method(Some(json!({
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2}}
        })))
        .unwrap();
        assert_eq!(m, training::default_method());
        assert_eq!(hp, Some(json!({"n_epochs": 2})));
        let (m, hp) = split_method(Some(json!({"type": "lora", "r": 4}))).unwrap();
        assert_eq!(m, json!({"type": "lora", "r": 4}));
        assert!(hp.is_none());
        assert!(split_method(Some(json!({"type": "dpo"}))).is_err());
    }

    #[test]
    fn inner_hyperparameters_win_setting_by_setting() {
        let merged = merge_hyperparameters(
            Some(json!({"learning_rate": 0.01, "n_epochs": 2})),
            Some(json!({"learning_rate_multiplier": 3, "epochs": 5, "batch_size": 8})),
        )
        .unwrap();
        assert_eq!(
            merged,
            Some(json!({"learning_rate": 0.01, "n_epochs": 2, "batch_size": 8}))
        );
        assert_eq!(
            merge_hyperparameters(None, Some(json!({"n_epochs": 1}))).unwrap(),
            Some(json!({"n_epochs": 1}))
        );
        assert!(merge_hyperparameters(Some(json!(5)), None).is_err());
    }

    #[test]
    fn suffixes_are_checked() {
        assert!(check_suffix(&Some("my-model_1".into())).is_ok());
        assert!(check_suffix(&Some("bad suffix".into())).is_err());
        assert!(check_suffix(&None).is_ok());
    }
}
