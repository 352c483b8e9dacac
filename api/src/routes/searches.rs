//! `/v1/fine_tuning/searches`: MambaPEFT's hybrid PEFT search as a service (a namespaced
//! extension with OpenAI's conventions for objects, lists and errors). A search's trials are
//! ordinary fine-tuning jobs of the same tenant (listed by the jobs API, with `search`), so
//! every worker runs them; the state machine is `crate::search`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use storage::{NewSearch, Search, SearchStatus, SearchTrial, TrialStatus};
use trainer::search::hybrid::{Plan, Sampler, SearchSettings, TrialBudget};
use trainer::search::pruner::MedianPruner;

use super::jobs::{
    EventObject, EventParams, JobObject, base_model, check_suffix, last_event_id, poll_events,
    rand_seed, sse, usable_file,
};
use super::{ListParams, ListResponse, idempotency_key};
use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Query};
use crate::search::{direction, model_shape};
use crate::state::AppState;
use crate::training::{self, Hyperparameters};

/// Body of `POST /v1/fine_tuning/searches`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSearch {
    pub model: String,
    pub training_file: String,
    /// Required: the objective is measured on it.
    pub validation_file: Option<String>,
    /// `validation_loss` (default, minimised) or `validation_accuracy` (maximised).
    pub objective: Option<String>,
    /// Candidate methods (default: MambaPEFT's step-1 set for the model's family).
    pub methods: Option<Vec<String>>,
    pub space: Option<BTreeMap<String, Value>>,
    /// `{"step1": n, "step2": m}`.
    pub trials: Option<Value>,
    pub max_parallel: Option<u32>,
    pub max_trainable_params: Option<u64>,
    /// `{"type": "median", …}` (Optuna's MedianPruner settings); off when absent.
    pub pruner: Option<Value>,
    /// The trial jobs' shared training settings.
    pub hyperparameters: Option<Value>,
    #[serde(default, deserialize_with = "super::integer::opt_i64")]
    pub seed: Option<i64>,
    pub suffix: Option<String>,
    /// Train the best configuration into an adapter when the search succeeds.
    pub train_best: Option<bool>,
    /// `tpe` (default) or `random`.
    pub sampler: Option<Sampler>,
}

/// Trials by state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrialCounts {
    pub total: u64,
    pub finished: u64,
    pub running: u64,
    pub complete: u64,
    pub pruned: u64,
    pub skipped: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// `fine_tuning.search`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub model: String,
    pub training_file: String,
    pub validation_file: String,
    pub objective: String,
    pub status: String,
    /// 1 (which methods) or 2 (their hyperparameters).
    pub step: i64,
    pub methods: Vec<String>,
    pub trials: TrialBudget,
    pub max_parallel: u32,
    pub max_trainable_params: Option<u64>,
    pub pruner: Option<Value>,
    pub space: Value,
    pub hyperparameters: Value,
    pub seed: i64,
    pub sampler: Sampler,
    pub user_provided_suffix: Option<String>,
    pub train_best: bool,
    pub trial_counts: TrialCounts,
    /// The best finished trial so far: `trial`, `step`, `value`, `configuration`,
    /// `method`, `trainable_params`, `job_id`.
    pub best: Option<Value>,
    /// Unix seconds: remaining trials × mean trial time ÷ `max_parallel`.
    pub estimated_finish: Option<i64>,
    /// The job training the best configuration.
    pub result_job_id: Option<String>,
    pub error: Option<Value>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// `fine_tuning.search.trial`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrialObject {
    pub object: String,
    pub number: i64,
    pub step: i64,
    pub status: String,
    pub configuration: Value,
    pub params: Value,
    pub method: Option<Value>,
    pub trainable_parameters: Option<i64>,
    pub job_id: Option<String>,
    /// The objective's final value.
    pub value: Option<f64>,
    /// `[{"step", "value"}]`: the objective at each validation.
    pub intermediate_values: Vec<Value>,
    pub pruned_step: Option<i64>,
    pub message: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

fn counts(trials: &[SearchTrial]) -> TrialCounts {
    let mut c = TrialCounts {
        total: trials.len() as u64,
        ..Default::default()
    };
    for t in trials {
        match t.status {
            TrialStatus::Pending | TrialStatus::Running => c.running += 1,
            TrialStatus::Complete => c.complete += 1,
            TrialStatus::Pruned => c.pruned += 1,
            TrialStatus::Skipped => c.skipped += 1,
            TrialStatus::Failed => c.failed += 1,
            TrialStatus::Cancelled => c.cancelled += 1,
        }
    }
    c.finished = c.total - c.running;
    c
}

fn search_object(s: Search, trials: &[SearchTrial]) -> SearchObject {
    let settings: SearchSettings = serde_json::from_value(s.settings.clone()).unwrap_or_default();
    let trial_counts = counts(trials);
    let estimated_finish = (!s.status.is_terminal())
        .then(|| {
            let durations: Vec<i64> = trials
                .iter()
                .filter(|t| t.status == TrialStatus::Complete || t.status == TrialStatus::Pruned)
                .filter_map(|t| t.finished_at.map(|f| f - t.created_at))
                .collect();
            if durations.is_empty() {
                return None;
            }
            let mean = durations.iter().sum::<i64>() as f64 / durations.len() as f64;
            let total = u64::from(settings.trials.step1) + u64::from(settings.trials.step2);
            let left = total.saturating_sub(trial_counts.finished) as f64;
            let waves = (left / f64::from(settings.max_parallel.max(1))).ceil();
            Some(storage::ids::now_secs() + (waves * mean).round() as i64)
        })
        .flatten();
    SearchObject {
        object: "fine_tuning.search".into(),
        created_at: s.created_at,
        model: s.model,
        training_file: s.training_file,
        validation_file: s.validation_file,
        objective: s.objective,
        status: s.status.as_str().into(),
        step: s.step,
        methods: settings.methods.clone().unwrap_or_default(),
        trials: settings.trials,
        max_parallel: settings.max_parallel,
        max_trainable_params: settings.max_trainable_params,
        pruner: settings.pruner.as_ref().map(pruner_object),
        space: json!(settings.space),
        hyperparameters: s.hyperparameters,
        seed: settings.seed as i64,
        sampler: settings.sampler,
        user_provided_suffix: s.suffix,
        train_best: s.train_best,
        trial_counts,
        best: s.best,
        estimated_finish,
        result_job_id: s.result_job_id,
        error: s
            .error
            .map(|e| json!({"code": e.kind, "message": e.message, "param": null})),
        started_at: s.started_at,
        finished_at: s.finished_at,
        id: s.id,
    }
}

fn pruner_object(p: &MedianPruner) -> Value {
    let mut v = json!(p);
    v["type"] = json!("median");
    v
}

fn bad(code: &'static str, param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message).param(param)
}

/// `POST /v1/fine_tuning/searches`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    Json(req): Json<CreateSearch>,
) -> Result<Json<SearchObject>, ApiError> {
    let idem = idempotency_key(&headers)?;
    check_suffix(&req.suffix)?;
    let Some(validation_file) = req.validation_file.clone() else {
        return Err(bad(
            "missing_validation_file",
            "validation_file",
            "a search needs validation_file: the objective is measured on it",
        ));
    };
    let field = |e: crate::search::FieldError| {
        let code = match e.field {
            "objective" => "invalid_objective",
            "pruner" => "invalid_pruner",
            _ => "invalid_hyperparameter",
        };
        bad(code, e.field, e.message)
    };
    let objective = crate::search::parse_objective(req.objective.as_deref()).map_err(field)?;
    let seed = match req.seed {
        Some(s) if (0..=i64::from(i32::MAX)).contains(&s) => s,
        Some(s) => {
            return Err(bad(
                "invalid_seed",
                "seed",
                format!("seed must be between 0 and {}, got {s}", i32::MAX),
            ));
        }
        None => i64::from(rand_seed()),
    };
    let trials = match &req.trials {
        None => TrialBudget::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            bad(
                "invalid_trials",
                "trials",
                format!("trials must be {{\"step1\": n, \"step2\": m}} with counts ≥ 0: {e}"),
            )
        })?,
    };
    let pruner = crate::search::parse_pruner(req.pruner.as_ref()).map_err(field)?;
    crate::search::check_search_hyperparameters(req.hyperparameters.as_ref()).map_err(field)?;
    Hyperparameters::from_request(req.hyperparameters.as_ref(), 0, &Default::default())?;
    if let Some(key) = &idem
        && let Some(existing) = state
            .db
            .find_search_by_idempotency_key(&tenant.id, key)
            .await?
    {
        let trials = state.db.search_trials(&existing.id).await?;
        return Ok(Json(search_object(existing, &trials)));
    }

    let base = base_model(&state, &req.model).await?;
    let training_file = usable_file(&state, &tenant, &req.training_file, "training_file").await?;
    let validation = usable_file(&state, &tenant, &validation_file, "validation_file").await?;
    let files = training::check_files(&base.config, &training_file, Some(&validation))?;
    let num_classes = files.classes.as_ref().map(Vec::len);
    let examples = files.train_examples;
    let vision = files.classes.is_some();
    let defaults = if vision {
        trainer::train::Hyperparameters::vision_recipe()
    } else {
        trainer::train::Hyperparameters::default()
    };
    let mut hp = Hyperparameters::from_request(req.hyperparameters.as_ref(), examples, &defaults)?;
    if vision {
        hp.train.validate_every_epoch(examples as usize);
    }
    let settings = SearchSettings {
        methods: req.methods.clone(),
        space: req.space.clone().unwrap_or_default(),
        trials,
        max_parallel: req
            .max_parallel
            .unwrap_or(SearchSettings::default().max_parallel),
        max_trainable_params: req.max_trainable_params,
        pruner,
        seed: seed as u64,
        sampler: req.sampler.unwrap_or_default(),
    };
    let shape = model_shape(&base.config, num_classes.map(|n| n as i64))
        .map_err(|e| ApiError::internal("reading the base model's config", &e))?;
    let plan = Plan::new(
        settings,
        direction(&objective),
        shape,
        hp.train.learning_rate,
    )
    .map_err(|e| {
        bad(
            "invalid_search",
            &e.field,
            format!("{}: {}", e.field, e.message),
        )
    })?;
    // Stored resolved: the candidate list is explicit, so later defaults never change it.
    let mut resolved = plan.settings().clone();
    resolved.methods = Some(plan.candidates().iter().map(|c| c.name.clone()).collect());
    let new = NewSearch {
        tenant_id: tenant.id.clone(),
        model: base.id.clone(),
        training_file: training_file.id.clone(),
        validation_file,
        objective,
        settings: serde_json::to_value(&resolved).unwrap_or(Value::Null),
        hyperparameters: hp.to_value(),
        num_classes: num_classes.map(|n| n as i64),
        total_steps: Some(hp.total_steps(examples)),
        suffix: req.suffix.clone(),
        train_best: req.train_best.unwrap_or(false),
        idempotency_key: idem,
    };
    let (search, created) = state.db.create_search(new).await?;
    if created {
        tracing::info!(search_id = %search.id, model = %search.model, "search created");
        crate::search::advance(&state.db, &search.id).await?;
    }
    let search = state.db.get_search(&tenant.id, &search.id).await?;
    let trials = state.db.search_trials(&search.id).await?;
    Ok(Json(search_object(search, &trials)))
}

/// `GET /v1/fine_tuning/searches`.
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<ListParams>,
) -> Result<Json<ListResponse<SearchObject>>, ApiError> {
    let limit = q.limit(20, 100)?;
    let page = state
        .db
        .list_searches(&tenant.id, q.after.as_deref(), limit)
        .await?;
    let mut with_trials = Vec::with_capacity(page.data.len());
    for s in &page.data {
        with_trials.push(state.db.search_trials(&s.id).await?);
    }
    let first_id = page.data.first().map(|s| s.id.clone());
    let last_id = page.data.last().map(|s| s.id.clone());
    Ok(Json(ListResponse {
        object: "list",
        has_more: page.has_more,
        data: page
            .data
            .into_iter()
            .zip(with_trials)
            .map(|(s, t)| search_object(s, &t))
            .collect(),
        first_id,
        last_id,
    }))
}

/// `GET /v1/fine_tuning/searches/{id}`.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<SearchObject>, ApiError> {
    let search = state.db.get_search(&tenant.id, &id).await?;
    let trials = state.db.search_trials(&id).await?;
    Ok(Json(search_object(search, &trials)))
}

/// `GET /v1/fine_tuning/searches/{id}/trials`: every trial, by number.
pub async fn trials(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<ListResponse<TrialObject>>, ApiError> {
    let search = state.db.get_search(&tenant.id, &id).await?;
    let trials = state.db.search_trials(&id).await?;
    let ids: Vec<String> = trials.iter().filter_map(|t| t.job_id.clone()).collect();
    let series = state.db.validation_series(&ids).await?;
    let data: Vec<TrialObject> = trials
        .into_iter()
        .map(|t| {
            let intermediate_values = series
                .iter()
                .filter(|(j, _)| Some(j) == t.job_id.as_ref())
                .filter_map(|(_, m)| {
                    crate::search::objective_value(&search.objective, m)
                        .map(|v| json!({"step": m.step, "value": v}))
                })
                .collect();
            TrialObject {
                object: "fine_tuning.search.trial".into(),
                number: t.number,
                step: t.step,
                status: t.status.as_str().into(),
                configuration: t.configuration,
                params: t.params,
                method: t.method,
                trainable_parameters: t.trainable_params,
                job_id: t.job_id,
                value: t.value,
                intermediate_values,
                pruned_step: t.pruned_step,
                message: t.message,
                created_at: t.created_at,
                finished_at: t.finished_at,
            }
        })
        .collect();
    let page = storage::Page {
        data,
        has_more: false,
    };
    Ok(Json(ListResponse::from_page(
        page,
        |t| t,
        |t| t.number.to_string(),
    )))
}

/// `POST /v1/fine_tuning/searches/{id}/cancel`: cancels the search and its running trials
/// (409 for a finished search).
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<SearchObject>, ApiError> {
    let search = crate::search::cancel(&state.db, &tenant.id, &id).await?;
    let trials = state.db.search_trials(&id).await?;
    Ok(Json(search_object(search, &trials)))
}

/// `POST /v1/fine_tuning/searches/{id}/train`: trains the best configuration into an
/// adapter as a normal job (the same job when asked again). 409 before the search has
/// finished with a best trial.
pub async fn train(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<JobObject>, ApiError> {
    let search = state.db.get_search(&tenant.id, &id).await?;
    if !matches!(
        search.status,
        SearchStatus::Succeeded | SearchStatus::Cancelled
    ) {
        return Err(ApiError::conflict(
            "search_not_finished",
            format!(
                "search {id} is {}; its best configuration is trained once it has succeeded \
                 (or was cancelled)",
                search.status
            ),
        ));
    }
    match crate::search::train_best(&state.db, &search).await? {
        Some(job) => Ok(Json(job.into())),
        None => Err(ApiError::conflict(
            "no_best_trial",
            format!("search {id} has no finished trial to train"),
        )),
    }
}

/// `GET /v1/fine_tuning/searches/{id}/events` (a page, or SSE with `stream=true`).
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
    let limit = params.limit(20, 1000)?;
    if q.stream {
        state.db.get_search(&tenant.id, &id).await?;
        let last_seq = last_event_id(&headers);
        let interval = state.config.event_poll_interval;
        let tenant_id = tenant.id.clone();
        let stream = poll_events(interval, last_seq, search_event, move |after| {
            let (state, tenant_id, id) = (state.clone(), tenant_id.clone(), id.clone());
            async move {
                let done = state
                    .db
                    .get_search(&tenant_id, &id)
                    .await?
                    .status
                    .is_terminal();
                let batch = state
                    .db
                    .search_events_since(&tenant_id, &id, after, 500)
                    .await?;
                Ok((done, batch))
            }
        });
        return Ok(sse(stream));
    }
    let page = state
        .db
        .list_search_events(&tenant.id, &id, params.after.as_deref(), limit)
        .await?;
    Ok(Json(ListResponse::from_page(page, search_event, |e| {
        e.id.clone()
    }))
    .into_response())
}

fn search_event(e: storage::JobEvent) -> EventObject {
    EventObject {
        object: "fine_tuning.search.event".into(),
        ..EventObject::from(e)
    }
}
