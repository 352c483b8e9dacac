//! The hybrid search's orchestration: the state machine stored in the database
//! (`storage::db::searches`) driven by the trainer's plan (`trainer::search::hybrid`).
//!
//! [`advance`] reads a search and its trials, brings finished trials up to date from their
//! jobs, asks the plan what to do next (new trials up to `max_parallel`, step 2, the end)
//! and commits that decision atomically under the search's version; then it creates the
//! jobs of the trials it recorded (idempotently: a job per trial, keyed by the trial). Any
//! process may call it at any time — the API's loop every second, a worker right after a
//! trial's job ends — so a search survives the restart of the API and the death of any
//! worker: a reclaimed trial resumes from its checkpoint, a failed one counts as failed.
//!
//! Pruning ([`check_prune`]) runs in the worker each time a trial reports a validation
//! value: the median rule over the step's completed trials; a pruned trial's job is
//! cancelled and the trial recorded `pruned`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};
use storage::{
    Db, EventLevel, Job, JobError, JobMetric, JobStatus, NewJob, NewTrial, Search, SearchChange,
    SearchStatus, SearchTrial, TrialStatus, TrialUpdate,
};
use trainer::search::hybrid::{Next, Plan, SearchSettings, TrialRecord};
use trainer::search::pruner::MedianPruner;
use trainer::search::{Direction, TrialState};

/// The objectives a search may optimise.
pub const OBJECTIVES: &[&str] = &["validation_loss", "validation_accuracy"];

/// A search request's field that is wrong, and why (the API answers 400 with `param`,
/// `molt search` prints `field: message`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field_error(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// `objective` (default `validation_loss`).
pub fn parse_objective(v: Option<&str>) -> Result<String, FieldError> {
    let objective = v.unwrap_or("validation_loss");
    if OBJECTIVES.contains(&objective) {
        Ok(objective.to_string())
    } else {
        Err(field_error(
            "objective",
            format!(
                "objective must be one of {}, got '{objective}'",
                OBJECTIVES.join(", ")
            ),
        ))
    }
}

/// `pruner`: absent or null (off), or `{"type": "median", …MedianPruner's settings}`.
pub fn parse_pruner(v: Option<&Value>) -> Result<Option<MedianPruner>, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => {
            let mut o = o.clone();
            match o.remove("type") {
                Some(Value::String(t)) if t == "median" => {}
                other => {
                    return Err(field_error(
                        "pruner",
                        format!(
                            "pruner.type must be \"median\", got {}",
                            other.unwrap_or(Value::Null)
                        ),
                    ));
                }
            }
            serde_json::from_value::<MedianPruner>(Value::Object(o))
                .map(Some)
                .map_err(|e| field_error("pruner", format!("pruner: {e}")))
        }
        Some(other) => Err(field_error(
            "pruner",
            format!("pruner must be an object like {{\"type\": \"median\"}}, got {other}"),
        )),
    }
}

/// The trials' shared hyperparameters may not set `weight_decay`: the search sets each
/// method's (and step 2 tunes it).
pub fn check_search_hyperparameters(v: Option<&Value>) -> Result<(), FieldError> {
    if v.and_then(|h| h.get("weight_decay"))
        .is_some_and(|w| !w.is_null())
    {
        return Err(field_error(
            "hyperparameters.weight_decay",
            "a search sets each method's weight decay (step 2 tunes it as wd_mult); leave \
             hyperparameters.weight_decay out",
        ));
    }
    Ok(())
}

/// The direction of an objective.
pub fn direction(objective: &str) -> Direction {
    if objective == "validation_accuracy" {
        Direction::Maximize
    } else {
        Direction::Minimize
    }
}

/// The objective's value in a validation point.
pub fn objective_value(objective: &str, m: &JobMetric) -> Option<f64> {
    if objective == "validation_accuracy" {
        m.valid_accuracy
    } else {
        m.valid_loss
    }
}

/// The model's shape as the plan needs it: a vision model's head sized for the classes.
pub fn model_shape(
    config: &Value,
    num_classes: Option<i64>,
) -> Result<trainer::peft::ModelShape, String> {
    let mut shape =
        trainer::peft::ModelShape::from_config(config, std::path::Path::new("config.json"))
            .map_err(|e| e.to_string())?;
    if let (Some(v), Some(n)) = (shape.vision.as_mut(), num_classes) {
        v.num_classes = usize::try_from(n).unwrap_or(0);
    }
    Ok(shape)
}

/// The plan of a stored search.
pub fn plan_of(search: &Search, config: &Value) -> Result<Plan, String> {
    let settings: SearchSettings =
        serde_json::from_value(search.settings.clone()).map_err(|e| e.to_string())?;
    let base_lr = search
        .hyperparameters
        .get("learning_rate")
        .and_then(Value::as_f64)
        .unwrap_or_else(crate::training::base_learning_rate);
    Plan::new(
        settings,
        direction(&search.objective),
        model_shape(config, search.num_classes)?,
        base_lr,
    )
    .map_err(|e| e.to_string())
}

fn params_map(v: &Value) -> BTreeMap<String, f64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect()
        })
        .unwrap_or_default()
}

/// The idempotency key of a trial's job (one job per trial, whoever creates it).
fn trial_key(search_id: &str, number: i64) -> String {
    format!("search:{search_id}:trial:{number}")
}

/// What a trial's job says about the trial, when its job has ended.
async fn outcome(
    db: &Db,
    search: &Search,
    t: &SearchTrial,
) -> Result<Option<TrialUpdate>, storage::Error> {
    let Some(job_id) = &t.job_id else {
        return Ok(None);
    };
    let job = db.get_job_unscoped(job_id).await?;
    let update = |status, value, message: Option<String>| {
        Some(TrialUpdate {
            number: t.number,
            status,
            value,
            message,
        })
    };
    Ok(match job.status {
        JobStatus::Succeeded => {
            let series = db.validation_series(std::slice::from_ref(job_id)).await?;
            match series
                .last()
                .and_then(|(_, m)| objective_value(&search.objective, m))
            {
                Some(v) if v.is_finite() => update(TrialStatus::Complete, Some(v), None),
                _ => update(
                    TrialStatus::Failed,
                    None,
                    Some(format!(
                        "the job measured no finite {} on the validation file",
                        search.objective
                    )),
                ),
            }
        }
        JobStatus::Failed => update(
            TrialStatus::Failed,
            None,
            Some(
                job.error
                    .map_or_else(|| "the job failed".into(), |e| e.message),
            ),
        ),
        JobStatus::Cancelled if t.pruned_step.is_some() => update(TrialStatus::Pruned, None, None),
        JobStatus::Cancelled => update(
            TrialStatus::Cancelled,
            None,
            Some("the trial's job was cancelled".into()),
        ),
        _ => None,
    })
}

/// The sampler's view of a trial. Pruned trials carry their last intermediate value.
fn sampler_state(t: &SearchTrial, last: Option<(u64, f64)>) -> TrialState {
    match t.status {
        TrialStatus::Pending | TrialStatus::Running => TrialState::Running,
        TrialStatus::Complete => TrialState::Complete(t.value.unwrap_or(f64::NAN)),
        TrialStatus::Pruned => TrialState::Pruned(last),
        TrialStatus::Skipped => TrialState::Pruned(None),
        TrialStatus::Failed | TrialStatus::Cancelled => TrialState::Failed,
    }
}

fn best_value(plan: &Plan, records: &[TrialRecord], trials: &[SearchTrial]) -> Option<Value> {
    let (best, value) = plan.best(records)?;
    let t = trials.iter().find(|t| t.number as u64 == best.number)?;
    Some(json!({
        "trial": t.number,
        "step": t.step,
        "value": value,
        "configuration": t.configuration,
        "method": t.method,
        "trainable_params": t.trainable_params,
        "job_id": t.job_id,
    }))
}

fn new_trial(
    p: &trainer::search::hybrid::Proposal,
    status: TrialStatus,
    why: Option<String>,
) -> NewTrial {
    NewTrial {
        number: p.number as i64,
        step: i64::from(p.step),
        params: json!(p.params),
        configuration: p.configuration.clone(),
        method: p.spec.as_ref().map(|s| s.to_value()),
        trainable_params: Some(i64::try_from(p.trainable_params).unwrap_or(i64::MAX)),
        status,
        message: why,
    }
}

/// Moves the search on as far as it can now; see the module doc. Errors are the
/// database's; a search that cannot be planned any more is failed with the reason.
pub async fn advance(db: &Db, search_id: &str) -> Result<(), storage::Error> {
    for _ in 0..16 {
        let search = db.get_search_unscoped(search_id).await?;
        if search.status.is_terminal() {
            break;
        }
        let trials = db.search_trials(search_id).await?;
        let mut change = SearchChange::default();
        let plan = match db.get_base_model(&search.model).await {
            Ok(base) => plan_of(&search, &base.config),
            Err(storage::Error::NotFound { .. }) => {
                Err(format!("the base model '{}' was removed", search.model))
            }
            Err(e) => return Err(e),
        };
        let plan = match plan {
            Ok(p) => p,
            Err(message) => {
                change.status = Some(SearchStatus::Failed);
                change.error = Some(JobError::new("invalid_search", message.clone()));
                change
                    .events
                    .push((EventLevel::Error, format!("Search failed: {message}"), None));
                if db.commit_search(search_id, search.version, &change).await? {
                    cancel_running(db, &trials).await;
                    break;
                }
                continue;
            }
        };
        if search.status == SearchStatus::Queued {
            change.status = Some(SearchStatus::Running);
        }
        // Trials whose jobs have ended.
        let mut trials = trials;
        for t in trials.iter_mut() {
            if t.status != TrialStatus::Running {
                continue;
            }
            if let Some(u) = outcome(db, &search, t).await? {
                let what = match (u.status, u.value) {
                    (TrialStatus::Complete, Some(v)) => {
                        format!("Trial {} complete: {} {v:.6}", t.number, search.objective)
                    }
                    (s, _) => format!(
                        "Trial {} {s}{}",
                        t.number,
                        u.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                };
                let level = if u.status == TrialStatus::Failed {
                    EventLevel::Warn
                } else {
                    EventLevel::Info
                };
                change.events.push((
                    level,
                    what,
                    Some(json!({"trial": t.number, "status": u.status, "value": u.value})),
                ));
                t.status = u.status;
                t.value = u.value;
                change.trial_updates.push(u);
            }
        }
        let pruned_ids: Vec<String> = trials
            .iter()
            .filter(|t| t.status == TrialStatus::Pruned)
            .filter_map(|t| t.job_id.clone())
            .collect();
        let series = db.validation_series(&pruned_ids).await?;
        let mut records: Vec<TrialRecord> = trials
            .iter()
            .map(|t| {
                let last = series
                    .iter()
                    .rev()
                    .find(|(id, _)| Some(id) == t.job_id.as_ref())
                    .and_then(|(_, m)| {
                        objective_value(&search.objective, m).map(|v| (m.step as u64, v))
                    });
                TrialRecord {
                    number: t.number as u64,
                    step: t.step as u8,
                    params: params_map(&t.params),
                    state: sampler_state(t, last),
                }
            })
            .collect();
        let mut step = search.step;
        loop {
            match plan.next(&records) {
                Next::Run(p) | Next::Skip(p, _) if p.step as i64 != step && p.step == 2 => {
                    step = 2;
                    let chosen = plan.chosen(&records).unwrap_or_default();
                    change.step = Some(2);
                    change.events.push((
                        EventLevel::Info,
                        format!(
                            "Step 1 finished; step 2 tunes the best combination: {}",
                            chosen.join(", ")
                        ),
                        Some(json!({"methods": chosen})),
                    ));
                }
                Next::Run(p) => {
                    change.events.push((
                        EventLevel::Info,
                        format!(
                            "Trial {} (step {}) proposed: {}",
                            p.number, p.step, p.configuration
                        ),
                        Some(json!({"trial": p.number, "configuration": p.configuration})),
                    ));
                    records.push(TrialRecord {
                        number: p.number,
                        step: p.step,
                        params: p.params.clone(),
                        state: TrialState::Running,
                    });
                    change
                        .new_trials
                        .push(new_trial(&p, TrialStatus::Pending, None));
                }
                Next::Skip(p, why) => {
                    change.events.push((
                        EventLevel::Info,
                        format!("Trial {} (step {}) skipped: {why}", p.number, p.step),
                        Some(json!({"trial": p.number, "configuration": p.configuration})),
                    ));
                    records.push(TrialRecord {
                        number: p.number,
                        step: p.step,
                        params: p.params.clone(),
                        state: TrialState::Pruned(None),
                    });
                    change
                        .new_trials
                        .push(new_trial(&p, TrialStatus::Skipped, Some(why)));
                }
                Next::Wait => break,
                Next::Finished => {
                    change.status = Some(SearchStatus::Succeeded);
                    change.events.push((
                        EventLevel::Info,
                        "Search succeeded".into(),
                        best_value(&plan, &records, &trials),
                    ));
                    break;
                }
                Next::Failed(message) => {
                    change.status = Some(SearchStatus::Failed);
                    change.error = Some(JobError::new("search_failed", message.clone()));
                    change.events.push((
                        EventLevel::Error,
                        format!("Search failed: {message}"),
                        None,
                    ));
                    break;
                }
            }
        }
        let best = best_value(&plan, &records, &trials);
        if best != search.best {
            change.best = best;
        }
        if change.is_empty() {
            break;
        }
        if db.commit_search(search_id, search.version, &change).await? {
            break;
        }
    }
    create_trial_jobs(db, search_id).await?;
    train_best_if_asked(db, search_id).await?;
    Ok(())
}

/// Creates the job of every pending trial (after a crash too: the key finds a job made
/// before it).
async fn create_trial_jobs(db: &Db, search_id: &str) -> Result<(), storage::Error> {
    let search = db.get_search_unscoped(search_id).await?;
    if search.status.is_terminal() {
        return Ok(());
    }
    for t in db.search_trials(search_id).await? {
        if t.status != TrialStatus::Pending {
            continue;
        }
        let Some(method) = t.method.clone() else {
            continue;
        };
        let mut new = search_job(
            &search,
            method,
            t.trainable_params,
            trial_key(search_id, t.number),
        );
        new.trial = Some((search_id.to_string(), t.number));
        let (job, _) = db.submit_job(new).await?;
        db.set_trial_job(search_id, t.number, &job.id).await?;
        tracing::info!(search_id, trial = t.number, job_id = %job.id, "trial job queued");
        // Cancelled meanwhile (the cancel saw this trial pending, without a job): stop it.
        if db
            .get_search_unscoped(search_id)
            .await?
            .status
            .is_terminal()
        {
            let _ = db.request_cancel(&search.tenant_id, &job.id).await;
        }
    }
    Ok(())
}

/// A job of the search's tenant, model, files, hyperparameters and seed training `method`,
/// created once per `key` whoever asks.
fn search_job(search: &Search, method: Value, trainable: Option<i64>, key: String) -> NewJob {
    let mut new = NewJob::new(&search.tenant_id, &search.model, &search.training_file);
    new.validation_file = Some(search.validation_file.clone());
    new.method = method;
    new.hyperparameters = search.hyperparameters.clone();
    new.seed = search
        .settings
        .get("seed")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    new.suffix = search.suffix.clone();
    new.trainable_params = trainable;
    new.total_steps = search.total_steps;
    new.idempotency_key = Some(key);
    new
}

/// With `train_best`, a succeeded search trains its best configuration into an adapter.
async fn train_best_if_asked(db: &Db, search_id: &str) -> Result<(), storage::Error> {
    let search = db.get_search_unscoped(search_id).await?;
    if search.train_best
        && search.status == SearchStatus::Succeeded
        && search.result_job_id.is_none()
    {
        train_best(db, &search).await?;
    }
    Ok(())
}

/// Queues a normal job training the best configuration (once: a second call returns the
/// same job). `None` when the search has no best trial.
pub async fn train_best(db: &Db, search: &Search) -> Result<Option<Job>, storage::Error> {
    let Some(method) = search.best.as_ref().and_then(|b| b.get("method")).cloned() else {
        return Ok(None);
    };
    if method.is_null() {
        return Ok(None);
    }
    let trainable = search
        .best
        .as_ref()
        .and_then(|b| b.get("trainable_params"))
        .and_then(Value::as_i64);
    let new = search_job(
        search,
        method,
        trainable,
        format!("search:{}:best", search.id),
    );
    let (job, created) = db.submit_job(new).await?;
    db.set_search_result_job(&search.id, &job.id).await?;
    if created {
        db.add_search_event(
            &search.id,
            EventLevel::Info,
            &format!(
                "Training the best configuration into an adapter: job {}",
                job.id
            ),
            Some(json!({"job_id": job.id})),
        )
        .await?;
    }
    Ok(Some(job))
}

async fn cancel_running(db: &Db, trials: &[SearchTrial]) {
    for t in trials {
        if let (TrialStatus::Running, Some(job_id)) = (t.status, &t.job_id)
            && let Ok(job) = db.get_job_unscoped(job_id).await
            && let Err(e) = db.request_cancel(&job.tenant_id, job_id).await
        {
            tracing::debug!(job_id, error = %e, "could not cancel a trial's job");
        }
    }
}

/// Cancels a search: it becomes `cancelled`, its running trials' jobs are cancelled and
/// those trials recorded `cancelled`. A finished search is [`storage::Error::InvalidState`].
pub async fn cancel(db: &Db, tenant_id: &str, search_id: &str) -> Result<Search, storage::Error> {
    loop {
        let search = db.get_search(tenant_id, search_id).await?;
        if search.status == SearchStatus::Cancelled {
            return Ok(search);
        }
        if search.status.is_terminal() {
            return Err(storage::Error::InvalidState {
                kind: "search",
                id: search_id.to_string(),
                state: search.status.to_string(),
                action: "cancel",
            });
        }
        let trials = db.search_trials(search_id).await?;
        let mut change = SearchChange {
            status: Some(SearchStatus::Cancelled),
            ..Default::default()
        };
        for t in &trials {
            if !t.status.is_finished() {
                change.trial_updates.push(TrialUpdate {
                    number: t.number,
                    status: TrialStatus::Cancelled,
                    value: None,
                    message: Some("the search was cancelled".into()),
                });
            }
        }
        change
            .events
            .push((EventLevel::Info, "Search cancelled".into(), None));
        if db.commit_search(search_id, search.version, &change).await? {
            cancel_running(db, &trials).await;
            return db.get_search(tenant_id, search_id).await;
        }
    }
}

/// In the worker, after a trial reported a validation value: whether the search's pruner
/// stops it now (then the trial is marked pruned and the caller cancels its job).
pub async fn check_prune(db: &Db, job: &Job) -> Result<bool, storage::Error> {
    let (Some(search_id), Some(number)) = (&job.search_id, job.trial_number) else {
        return Ok(false);
    };
    let search = db.get_search_unscoped(search_id).await?;
    let Some(pruner) = search
        .settings
        .get("pruner")
        .filter(|p| !p.is_null())
        .and_then(|p| {
            serde_json::from_value::<trainer::search::pruner::MedianPruner>(p.clone()).ok()
        })
    else {
        return Ok(false);
    };
    if search.status.is_terminal() {
        return Ok(false);
    }
    let trials = db.search_trials(search_id).await?;
    let Some(me) = trials.iter().find(|t| t.number == number) else {
        return Ok(false);
    };
    let peers: Vec<String> = trials
        .iter()
        .filter(|t| t.step == me.step && t.status == TrialStatus::Complete)
        .filter_map(|t| t.job_id.clone())
        .collect();
    // The objective's series of the peers and of this job, from one query.
    let mut ids = peers.clone();
    ids.push(job.id.clone());
    let mut series: HashMap<String, Vec<(u64, f64)>> = HashMap::new();
    for (id, m) in db.validation_series(&ids).await? {
        if let Some(v) = objective_value(&search.objective, &m) {
            series
                .entry(id)
                .or_default()
                .push((m.step.max(0) as u64, v));
        }
    }
    let current = series.remove(&job.id).unwrap_or_default();
    let completed: Vec<Vec<(u64, f64)>> = peers
        .iter()
        .map(|id| series.get(id).cloned().unwrap_or_default())
        .collect();
    let Some(&(step, value)) = current.last() else {
        return Ok(false);
    };
    if !pruner.should_prune(direction(&search.objective), &current, &completed) {
        return Ok(false);
    }
    let message = format!(
        "pruned at step {step}: {} {value:.6} is worse than the median of the step's \
         completed trials",
        search.objective
    );
    let marked = db
        .mark_trial_pruned(search_id, number, step as i64, &message)
        .await?;
    if marked {
        db.add_job_event(
            &job.id,
            EventLevel::Info,
            "message",
            &format!("Trial {number} of search {search_id} {message}"),
            Some(json!({"search_id": search_id, "trial": number, "step": step})),
        )
        .await?;
    }
    Ok(marked)
}

/// The API process's driver: advances every active search every `interval` (a worker that
/// ends a trial advances its search at once; this catches up after restarts and crashes).
pub async fn drive(db: Db, interval: std::time::Duration) {
    loop {
        match db.active_search_ids().await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = advance(&db, &id).await {
                        tracing::warn!(search_id = %id, error = %e, "could not advance a search");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list active searches"),
        }
        tokio::time::sleep(interval).await;
    }
}
