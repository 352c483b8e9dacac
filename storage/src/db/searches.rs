//! Hybrid PEFT searches: the search row (its state machine), its trials and its events.
//! Deciding what to do next is the caller's (the API's orchestrator, with the trainer's
//! sampler); this module stores each decision atomically. Every change of a search goes
//! through [`Db::commit_search`], which applies it only when the search's `version` is the
//! one the caller read, so concurrent advancers (the API's loop, workers that end trials)
//! never record a decision twice.

use serde_json::Value;
use sqlx::types::Json;

use super::models::{EventLevel, JobError, JobEvent, Page, Search, SearchStatus, SearchTrial};
use super::models::{JobMetric, TrialStatus};
use super::{Backend, Db, check_limit};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_secs};

macro_rules! search_cols {
    () => {
        "id, tenant_id, model, training_file, validation_file, objective, settings, \
         hyperparameters, num_classes, total_steps, suffix, train_best, status, step, version, \
         best, error, result_job_id, idempotency_key, created_at, updated_at, started_at, \
         finished_at"
    };
}
macro_rules! trial_cols {
    () => {
        "search_id, number, step, params, configuration, method, trainable_params, job_id, \
         state, value, pruned_step, message, created_at, finished_at"
    };
}
macro_rules! search_event_cols {
    () => {
        "id, search_id AS job_id, seq, level, event_type, message, data, created_at"
    };
}

/// Appends an event to a search inside an open transaction (sequence numbers from
/// `searches.event_count`).
macro_rules! append_search_event {
    ($tx:ident, $id:expr, $level:expr, $message:expr, $data:expr, $now:expr) => {{
        let seq: i64 = sqlx::query_scalar(
            "UPDATE searches SET event_count = event_count + 1 WHERE id = $1 RETURNING event_count",
        )
        .bind($id)
        .fetch_one(&mut *$tx)
        .await?;
        let data: Option<Value> = $data;
        sqlx::query(
            "INSERT INTO search_events (search_id, seq, id, level, event_type, message, data, \
             created_at) VALUES ($1, $2, $3, $4, 'message', $5, $6, $7)",
        )
        .bind($id)
        .bind(seq)
        .bind(new_id("ftevent"))
        .bind(EventLevel::as_str($level))
        .bind($message)
        .bind(data.map(Json))
        .bind($now)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// A search to create (status `queued`).
#[derive(Debug, Clone)]
pub struct NewSearch {
    pub tenant_id: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: String,
    pub objective: String,
    pub settings: Value,
    pub hyperparameters: Value,
    pub num_classes: Option<i64>,
    pub total_steps: Option<i64>,
    pub suffix: Option<String>,
    pub train_best: bool,
    pub idempotency_key: Option<String>,
}

/// A trial to record.
#[derive(Debug, Clone)]
pub struct NewTrial {
    pub number: i64,
    pub step: i64,
    pub params: Value,
    pub configuration: Value,
    pub method: Option<Value>,
    pub trainable_params: Option<i64>,
    /// `pending` (a job follows) or `skipped`.
    pub status: TrialStatus,
    pub message: Option<String>,
}

/// A finished trial's outcome.
#[derive(Debug, Clone)]
pub struct TrialUpdate {
    pub number: i64,
    pub status: TrialStatus,
    pub value: Option<f64>,
    pub message: Option<String>,
}

/// One decision of the state machine, applied atomically by [`Db::commit_search`].
#[derive(Debug, Clone, Default)]
pub struct SearchChange {
    pub status: Option<SearchStatus>,
    pub step: Option<i64>,
    pub best: Option<Value>,
    pub error: Option<JobError>,
    pub trial_updates: Vec<TrialUpdate>,
    pub new_trials: Vec<NewTrial>,
    pub events: Vec<(EventLevel, String, Option<Value>)>,
}

impl SearchChange {
    pub fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.step.is_none()
            && self.best.is_none()
            && self.error.is_none()
            && self.trial_updates.is_empty()
            && self.new_trials.is_empty()
            && self.events.is_empty()
    }
}

impl Db {
    /// Creates a search in `queued` with its first event. With an idempotency key this
    /// tenant already used for a search, that search is returned with `false`.
    pub async fn create_search(&self, new: NewSearch) -> Result<(Search, bool)> {
        if let Some(key) = &new.idempotency_key
            && let Some(existing) = self
                .find_search_by_idempotency_key(&new.tenant_id, key)
                .await?
        {
            return Ok((existing, false));
        }
        let id = new_id("ftsearch");
        let now = now_secs();
        let search: Search = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            sqlx::query(
                "INSERT INTO searches (id, tenant_id, model, training_file, validation_file, \
                 objective, settings, hyperparameters, num_classes, total_steps, suffix, \
                 train_best, status, idempotency_key, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'queued', $13, $14, $14)",
            )
            .bind(&id)
            .bind(&new.tenant_id)
            .bind(&new.model)
            .bind(&new.training_file)
            .bind(&new.validation_file)
            .bind(&new.objective)
            .bind(Json(&new.settings))
            .bind(Json(&new.hyperparameters))
            .bind(new.num_classes)
            .bind(new.total_steps)
            .bind(&new.suffix)
            .bind(new.train_best)
            .bind(&new.idempotency_key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            append_search_event!(
                tx,
                &id,
                EventLevel::Info,
                format!("Created hybrid PEFT search: {id}"),
                None,
                now
            );
            let s: Search = sqlx::query_as(concat!(
                "SELECT ",
                search_cols!(),
                " FROM searches WHERE id = $1"
            ))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            s
        });
        Ok((search, true))
    }

    pub async fn find_search_by_idempotency_key(
        &self,
        tenant_id: &str,
        key: &str,
    ) -> Result<Option<Search>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                search_cols!(),
                " FROM searches WHERE tenant_id = $1 AND idempotency_key = $2"
            ))
            .bind(tenant_id)
            .bind(key)
            .fetch_optional(p)
            .await?
        }))
    }

    /// A tenant's search. Another tenant's id is [`Error::NotFound`].
    pub async fn get_search(&self, tenant_id: &str, id: &str) -> Result<Search> {
        let row: Option<Search> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                search_cols!(),
                " FROM searches WHERE id = $1 AND tenant_id = $2"
            ))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("search", id))
    }

    /// A search by id regardless of tenant (the orchestrator and workers only).
    pub async fn get_search_unscoped(&self, id: &str) -> Result<Search> {
        let row: Option<Search> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                search_cols!(),
                " FROM searches WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("search", id))
    }

    /// A tenant's searches, newest first.
    pub async fn list_searches(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Search>> {
        let fetch = check_limit(limit)?;
        let rows: Vec<Search> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT seq FROM searches WHERE id = $1 AND tenant_id = $2",
                "search",
                after,
                tenant_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                search_cols!(),
                " FROM searches WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(tenant_id)
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// Ids of every search still queued or running (all tenants), oldest first.
    pub async fn active_search_ids(&self) -> Result<Vec<String>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_scalar(
                "SELECT id FROM searches WHERE status IN ('queued', 'running') ORDER BY seq",
            )
            .fetch_all(p)
            .await?
        }))
    }

    /// Every trial of a search, by number.
    pub async fn search_trials(&self, search_id: &str) -> Result<Vec<SearchTrial>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                trial_cols!(),
                " FROM search_trials WHERE search_id = $1 ORDER BY number"
            ))
            .bind(search_id)
            .fetch_all(p)
            .await?
        }))
    }

    /// Applies `change` if the search is still at `version`; `false` when another process
    /// changed it first (re-read and decide again).
    pub async fn commit_search(
        &self,
        search_id: &str,
        version: i64,
        change: &SearchChange,
    ) -> Result<bool> {
        let now = now_secs();
        let applied = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let started = matches!(change.status, Some(SearchStatus::Running));
            let finished = change.status.is_some_and(SearchStatus::is_terminal);
            let n = sqlx::query(
                "UPDATE searches SET version = version + 1, updated_at = $3, \
                 status = COALESCE($4, status), step = COALESCE($5, step), \
                 best = COALESCE($6, best), error = COALESCE($7, error), \
                 started_at = CASE WHEN $8 THEN COALESCE(started_at, $3) ELSE started_at END, \
                 finished_at = CASE WHEN $9 THEN $3 ELSE finished_at END \
                 WHERE id = $1 AND version = $2",
            )
            .bind(search_id)
            .bind(version)
            .bind(now)
            .bind(change.status.map(SearchStatus::as_str))
            .bind(change.step)
            .bind(change.best.as_ref().map(Json))
            .bind(change.error.as_ref().map(Json))
            .bind(started)
            .bind(finished)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                tx.rollback().await?;
                false
            } else {
                for u in &change.trial_updates {
                    sqlx::query(
                        "UPDATE search_trials SET state = $3, value = $4, \
                         message = COALESCE($5, message), finished_at = $6 \
                         WHERE search_id = $1 AND number = $2",
                    )
                    .bind(search_id)
                    .bind(u.number)
                    .bind(u.status.as_str())
                    .bind(u.value)
                    .bind(&u.message)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for t in &change.new_trials {
                    let finished_at = t.status.is_finished().then_some(now);
                    sqlx::query(
                        "INSERT INTO search_trials (search_id, number, step, params, \
                         configuration, method, trainable_params, state, message, created_at, \
                         finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    )
                    .bind(search_id)
                    .bind(t.number)
                    .bind(t.step)
                    .bind(Json(&t.params))
                    .bind(Json(&t.configuration))
                    .bind(t.method.as_ref().map(Json))
                    .bind(t.trainable_params)
                    .bind(t.status.as_str())
                    .bind(&t.message)
                    .bind(now)
                    .bind(finished_at)
                    .execute(&mut *tx)
                    .await?;
                }
                for (level, message, data) in &change.events {
                    append_search_event!(tx, search_id, *level, message, data.clone(), now);
                }
                tx.commit().await?;
                true
            }
        });
        Ok(applied)
    }

    /// Records the job of a pending trial (it is then running).
    pub async fn set_trial_job(&self, search_id: &str, number: i64, job_id: &str) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query(
                "UPDATE search_trials SET job_id = $3, state = 'running' \
                 WHERE search_id = $1 AND number = $2 AND state = 'pending'",
            )
            .bind(search_id)
            .bind(number)
            .bind(job_id)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Marks a running trial as pruned at `step` (its job is then cancelled); `false` when
    /// it is not running any more or was already marked.
    pub async fn mark_trial_pruned(
        &self,
        search_id: &str,
        number: i64,
        step: i64,
        message: &str,
    ) -> Result<bool> {
        let n = with_pool!(self, |p| {
            sqlx::query(
                "UPDATE search_trials SET pruned_step = $3, message = $4 \
                 WHERE search_id = $1 AND number = $2 AND state = 'running' \
                 AND pruned_step IS NULL",
            )
            .bind(search_id)
            .bind(number)
            .bind(step)
            .bind(message)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Records the job that trains the search's best configuration.
    pub async fn set_search_result_job(&self, search_id: &str, job_id: &str) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query("UPDATE searches SET result_job_id = $2 WHERE id = $1")
                .bind(search_id)
                .bind(job_id)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// The validation points (steps with a validation value) of each job, in step order.
    pub async fn validation_series(&self, job_ids: &[String]) -> Result<Vec<(String, JobMetric)>> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One query for the whole list, the ids bound as one JSON array (a statement with a
        // placeholder per id would have to be built at run time).
        let ids = serde_json::to_string(job_ids).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let rows: Vec<SeriesRow> = with_pool!(self, |p, d| {
            let sql = match d {
                Backend::Sqlite => {
                    "SELECT job_id, step, train_loss, learning_rate, tokens_per_second, \
                     tokens_seen, valid_loss, valid_accuracy, extra, created_at FROM job_metrics \
                     WHERE job_id IN (SELECT value FROM json_each($1)) \
                     AND valid_loss IS NOT NULL ORDER BY job_id, step"
                }
                Backend::Postgres => {
                    "SELECT job_id, step, train_loss, learning_rate, tokens_per_second, \
                     tokens_seen, valid_loss, valid_accuracy, extra, created_at FROM job_metrics \
                     WHERE job_id IN (SELECT jsonb_array_elements_text($1::jsonb)) \
                     AND valid_loss IS NOT NULL ORDER BY job_id, step"
                }
            };
            sqlx::query_as(sql).bind(ids).fetch_all(p).await?
        });
        Ok(rows.into_iter().map(|r| (r.job_id, r.metric)).collect())
    }

    /// Appends an event to a search.
    pub async fn add_search_event(
        &self,
        search_id: &str,
        level: EventLevel,
        message: &str,
        data: Option<Value>,
    ) -> Result<()> {
        let now = now_secs();
        with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            append_search_event!(tx, search_id, level, message, data, now);
            tx.commit().await?;
        });
        Ok(())
    }

    /// A search's events, newest first; `after` is an event id. (`JobEvent::job_id` holds
    /// the search's id.)
    pub async fn list_search_events(
        &self,
        tenant_id: &str,
        search_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<JobEvent>> {
        let fetch = check_limit(limit)?;
        self.get_search(tenant_id, search_id).await?;
        let rows: Vec<JobEvent> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT seq FROM search_events WHERE id = $1 AND search_id = $2",
                "event",
                after,
                search_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                search_event_cols!(),
                " FROM search_events WHERE search_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(search_id)
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// A search's events with `seq > after_seq`, oldest first (streaming).
    pub async fn search_events_since(
        &self,
        tenant_id: &str,
        search_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<JobEvent>> {
        check_limit(limit)?;
        self.get_search(tenant_id, search_id).await?;
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                search_event_cols!(),
                " FROM search_events WHERE search_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3"
            ))
            .bind(search_id)
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(p)
            .await?
        }))
    }
}

/// A validation point with the job it belongs to.
#[derive(sqlx::FromRow)]
struct SeriesRow {
    job_id: String,
    #[sqlx(flatten)]
    metric: JobMetric,
}
