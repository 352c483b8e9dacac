//! The job queue, which is the `jobs` table.
//!
//! A job row carries a status, a lease owner, a lease expiry (unix ms on the database
//! server's clock) and an attempt count. A worker [`claim`](Db::claim)s a job with a lease,
//! renews it with [`heartbeat`](Db::heartbeat) while training, and ends the attempt with
//! [`complete_job`](Db::complete_job), [`fail_job`](Db::fail_job),
//! [`confirm_cancelled`](Db::confirm_cancelled) or [`release_job`](Db::release_job). Every
//! worker-side call checks that the caller still owns the lease and returns
//! [`Error::LeaseLost`] otherwise.
//!
//! A worker that dies stops heartbeating; once its lease has expired the next `claim` by any
//! worker picks the job up again (attempt + 1), and the new worker resumes from
//! [`latest_checkpoint`](Db::latest_checkpoint). A job whose lease expires on its last attempt
//! becomes `failed` (error type `lease_expired`); a `cancelling` job whose lease expires
//! becomes `cancelled`. That clean-up runs inside every `claim` (and in
//! [`reap_expired`](Db::reap_expired)).
//!
//! A lease counts as held while `lease_owner` matches and the job is `running` or
//! `cancelling`: a worker that was paused past its lease keeps the job as long as nobody
//! reclaimed it meanwhile, and can go on heartbeating.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::types::Json;

use super::jobs::{checkpoint_cols, job_cols};
use super::models::{Adapter, Checkpoint, EventLevel, Job, JobError, JobMetric, JobStatus};
use super::{Backend, Db, duration_ms};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_secs};

/// Progress a worker reports between steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Optimiser steps done so far.
    pub step: i64,
    /// Total steps, when known (kept if `None`).
    pub total_steps: Option<i64>,
    pub tokens_seen: i64,
    /// Seconds until the job is expected to finish (stored as an absolute
    /// `estimated_finish`).
    pub eta_seconds: Option<i64>,
    /// The latest metrics, shown on the job (kept if `None`).
    pub metrics: Option<Value>,
}

/// What a successful job produced.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The fine-tuned model name (`ft:…`); unique per tenant.
    pub fine_tuned_model: String,
    /// Blob-store prefix holding `adapter_model.safetensors` and `adapter_config.json`.
    pub adapter_object_prefix: String,
    pub adapter_bytes: i64,
    pub adapter_config: Value,
}

/// How many expired jobs one clean-up pass handles.
const REAP_BATCH: i64 = 100;

const REAP_SQLITE: &str = "SELECT id, status, lease_owner, attempts FROM jobs \
    WHERE lease_expires_at_ms <= $1 \
      AND (status = 'cancelling' OR (status = 'running' AND attempts >= max_attempts)) \
    ORDER BY seq LIMIT $2";
const REAP_POSTGRES: &str = "SELECT id, status, lease_owner, attempts FROM jobs \
    WHERE lease_expires_at_ms <= $1 \
      AND (status = 'cancelling' OR (status = 'running' AND attempts >= max_attempts)) \
    ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED";

/// See [`Db::claim`] for the rule this ORDER BY implements. Running jobs per tenant are
/// counted once in a CTE (not per candidate row), so a claim stays one pass over the
/// claimable jobs however long the queue is.
macro_rules! pick_sql {
    ($suffix:literal) => {
        concat!(
            "WITH running AS (\
                SELECT tenant_id, COUNT(*) AS n FROM jobs \
                WHERE status IN ('running', 'cancelling') AND lease_expires_at_ms > $1 \
                GROUP BY tenant_id) \
             SELECT j.id, j.status, j.lease_owner, j.attempts, j.max_attempts \
             FROM jobs j \
             JOIN tenants t ON t.id = j.tenant_id \
             LEFT JOIN running r ON r.tenant_id = j.tenant_id \
             WHERE j.status = 'queued' \
                OR (j.status = 'running' AND j.lease_expires_at_ms <= $1 \
                    AND j.attempts < j.max_attempts) \
             ORDER BY COALESCE(r.n, 0) ASC, t.served_counter ASC, j.seq ASC \
             LIMIT 1",
            $suffix
        )
    };
}
const PICK_SQLITE: &str = pick_sql!("");
const PICK_POSTGRES: &str = pick_sql!(" FOR UPDATE OF j SKIP LOCKED");

macro_rules! lease_guard_sql {
    ($suffix:literal) => {
        concat!(
            "SELECT status, attempts, max_attempts FROM jobs \
             WHERE id = $1 AND lease_owner = $2 AND status IN ('running', 'cancelling')",
            $suffix
        )
    };
}

/// Inside a write transaction: checks that `$worker` holds the lease on `$job` (locking the
/// row on PostgreSQL) and evaluates to `(status, attempts, max_attempts)`; returns
/// `LeaseLost` / `NotFound` from the enclosing function otherwise.
macro_rules! lease_guard {
    ($tx:ident, $d:ident, $job_id:expr, $worker_id:expr) => {{
        let sql = match $d {
            Backend::Sqlite => lease_guard_sql!(""),
            Backend::Postgres => lease_guard_sql!(" FOR UPDATE"),
        };
        let row: Option<(String, i64, i64)> = sqlx::query_as(sql)
            .bind($job_id)
            .bind($worker_id)
            .fetch_optional(&mut *$tx)
            .await?;
        match row {
            Some((status, attempts, max_attempts)) => {
                (status.parse::<JobStatus>()?, attempts, max_attempts)
            }
            None => {
                let exists: Option<i64> = sqlx::query_scalar("SELECT seq FROM jobs WHERE id = $1")
                    .bind($job_id)
                    .fetch_optional(&mut *$tx)
                    .await?;
                return Err(match exists {
                    Some(_) => Error::LeaseLost {
                        job_id: $job_id.to_string(),
                        worker_id: $worker_id.to_string(),
                    },
                    None => Error::not_found("job", $job_id),
                });
            }
        }
    }};
}

/// Reads the database clock inside a transaction.
macro_rules! db_now_ms {
    ($tx:ident, $d:ident) => {
        sqlx::query_scalar::<_, i64>($d.now_ms_sql())
            .fetch_one(&mut *$tx)
            .await?
    };
}

/// Inside a transaction: finishes expired `cancelling` jobs and gives up on expired jobs that
/// used their last attempt. Evaluates to the number of jobs changed.
macro_rules! reap_in_tx {
    ($tx:ident, $d:ident, $now_ms:expr) => {{
        let sql = match $d {
            Backend::Sqlite => REAP_SQLITE,
            Backend::Postgres => REAP_POSTGRES,
        };
        let expired: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(sql)
            .bind($now_ms)
            .bind(REAP_BATCH)
            .fetch_all(&mut *$tx)
            .await?;
        let now = now_secs();
        for (job_id, status, owner, attempts) in &expired {
            let owner = owner.as_deref().unwrap_or("?");
            if status == JobStatus::Cancelling.as_str() {
                sqlx::query(
                    "UPDATE jobs SET status = 'cancelled', lease_owner = NULL, \
                     lease_expires_at_ms = NULL, finished_at = $1, updated_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(job_id)
                .execute(&mut *$tx)
                .await?;
                append_event!(
                    $tx,
                    job_id,
                    EventLevel::Info,
                    "message",
                    format!("Job cancelled (worker '{owner}' stopped without confirming)"),
                    None,
                    now
                );
                tracing::info!(job_id = %job_id, worker = owner, "expired cancelling job marked cancelled");
            } else {
                let error = JobError::new(
                    "lease_expired",
                    format!(
                        "gave up after {attempts} attempt(s): worker '{owner}' stopped \
                         heartbeating and its lease expired"
                    ),
                );
                sqlx::query(
                    "UPDATE jobs SET status = 'failed', error = $1, lease_owner = NULL, \
                     lease_expires_at_ms = NULL, finished_at = $2, updated_at = $2 WHERE id = $3",
                )
                .bind(Json(&error))
                .bind(now)
                .bind(job_id)
                .execute(&mut *$tx)
                .await?;
                append_event!(
                    $tx,
                    job_id,
                    EventLevel::Error,
                    "message",
                    format!("Job failed: {}", error.message),
                    Some(json!({"error": error})),
                    now
                );
                tracing::warn!(job_id = %job_id, worker = owner, attempts, "job failed: lease expired on last attempt");
            }
        }
        expired.len()
    }};
}

impl Db {
    /// Claims at most one job for `worker_id`, leasing it for `lease`.
    ///
    /// Claimable jobs are `queued` ones and `running` ones whose lease has expired (their
    /// worker died) and that have attempts left; claiming sets `running`, the owner and the
    /// lease expiry, and adds one to `attempts`.
    ///
    /// **Fairness rule.** Among tenants with a claimable job, the claim goes to the tenant
    /// 1. with the fewest jobs currently running under a live lease, then
    /// 2. that was served least recently (a global counter stamped on the tenant at every
    ///    claim; never-served tenants first), then
    /// 3. whose oldest claimable job is the oldest;
    ///
    /// and within that tenant to its oldest claimable job by creation order (FIFO; a job
    /// reclaimed after a lease expiry keeps its place, so it resumes first). So one tenant
    /// with a hundred queued jobs cannot starve another with one: each free worker alternates
    /// between tenants. Under concurrent claims on PostgreSQL two workers may both favour
    /// the same tenant (each sees the other's claim only after commit); no job is ever
    /// claimed twice.
    ///
    /// Concurrency: PostgreSQL selects with `FOR UPDATE OF j SKIP LOCKED` inside a
    /// transaction (concurrent claimers skip each other's rows); SQLite runs the whole claim
    /// in a `BEGIN IMMEDIATE` transaction (claimers take turns). Before picking, expired
    /// `cancelling` jobs become `cancelled` and expired jobs out of attempts become `failed`.
    pub async fn claim(&self, worker_id: &str, lease: Duration) -> Result<Option<Job>> {
        let lease_ms = duration_ms(lease);
        let now = now_secs();
        let job: Option<Job> = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let now_ms = db_now_ms!(tx, d);
            reap_in_tx!(tx, d, now_ms);
            let pick_sql = match d {
                Backend::Sqlite => PICK_SQLITE,
                Backend::Postgres => PICK_POSTGRES,
            };
            let picked: Option<(String, String, Option<String>, i64, i64)> =
                sqlx::query_as(pick_sql)
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
            match picked {
                None => {
                    tx.commit().await?;
                    None
                }
                Some((job_id, prev_status, prev_owner, prev_attempts, max_attempts)) => {
                    let job: Job = sqlx::query_as(concat!(
                        "UPDATE jobs SET status = 'running', lease_owner = $1, \
                         lease_expires_at_ms = $2, attempts = attempts + 1, \
                         started_at = COALESCE(started_at, $3), updated_at = $3 \
                         WHERE id = $4 RETURNING ",
                        job_cols!()
                    ))
                    .bind(worker_id)
                    .bind(now_ms.saturating_add(lease_ms))
                    .bind(now)
                    .bind(&job_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE tenants SET served_counter = \
                         (SELECT COALESCE(MAX(served_counter), 0) + 1 FROM tenants) WHERE id = $1",
                    )
                    .bind(&job.tenant_id)
                    .execute(&mut *tx)
                    .await?;
                    let attempt = prev_attempts + 1;
                    let data = Some(json!({"worker": worker_id, "attempt": attempt}));
                    if prev_status == JobStatus::Running.as_str() {
                        let prev = prev_owner.as_deref().unwrap_or("?");
                        append_event!(
                            tx,
                            &job_id,
                            EventLevel::Warn,
                            "message",
                            format!(
                                "Worker '{prev}' lost its lease; job reclaimed by worker \
                                 '{worker_id}' (attempt {attempt} of {max_attempts})"
                            ),
                            data,
                            now
                        );
                    } else {
                        append_event!(
                            tx,
                            &job_id,
                            EventLevel::Info,
                            "message",
                            format!(
                                "Fine-tuning job started on worker '{worker_id}' \
                                 (attempt {attempt} of {max_attempts})"
                            ),
                            data,
                            now
                        );
                    }
                    tx.commit().await?;
                    Some(job)
                }
            }
        });
        if let Some(job) = &job {
            tracing::info!(job_id = %job.id, tenant_id = %job.tenant_id, worker = worker_id, attempt = job.attempts, "job claimed");
        }
        Ok(job)
    }

    /// Runs the expired-lease clean-up on its own (it also runs inside every
    /// [`claim`](Db::claim)); returns how many jobs it finished.
    pub async fn reap_expired(&self) -> Result<usize> {
        Ok(with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let now_ms = db_now_ms!(tx, d);
            let n = reap_in_tx!(tx, d, now_ms);
            tx.commit().await?;
            n
        }))
    }

    /// Extends the lease of `worker_id` on `job_id` to `lease` from now. Returns whether a
    /// cancel was requested (the worker should then stop and call
    /// [`confirm_cancelled`](Db::confirm_cancelled)). [`Error::LeaseLost`] if the worker no
    /// longer holds the job.
    pub async fn heartbeat(&self, job_id: &str, worker_id: &str, lease: Duration) -> Result<bool> {
        let lease_ms = duration_ms(lease);
        let now = now_secs();
        let cancel: Option<bool> = with_pool!(self, |p, d| {
            let now_ms = sqlx::query_scalar::<_, i64>(d.now_ms_sql())
                .fetch_one(p)
                .await?;
            sqlx::query_scalar(
                "UPDATE jobs SET lease_expires_at_ms = $1, updated_at = $2 \
                 WHERE id = $3 AND lease_owner = $4 AND status IN ('running', 'cancelling') \
                 RETURNING cancel_requested",
            )
            .bind(now_ms.saturating_add(lease_ms))
            .bind(now)
            .bind(job_id)
            .bind(worker_id)
            .fetch_optional(p)
            .await?
        });
        match cancel {
            Some(c) => Ok(c),
            None => Err(self.lease_lost_or_missing(job_id, worker_id).await),
        }
    }

    async fn lease_lost_or_missing(&self, job_id: &str, worker_id: &str) -> Error {
        match self.get_job_unscoped(job_id).await {
            Ok(_) => Error::LeaseLost {
                job_id: job_id.to_string(),
                worker_id: worker_id.to_string(),
            },
            Err(e) => e,
        }
    }

    /// Records progress (step / total, tokens seen, ETA, latest metrics).
    pub async fn update_progress(
        &self,
        job_id: &str,
        worker_id: &str,
        progress: &Progress,
    ) -> Result<()> {
        let now = now_secs();
        let estimated_finish = progress
            .eta_seconds
            .map(|eta| now.saturating_add(eta.max(0)));
        let updated = with_pool!(self, |p| {
            sqlx::query(
                "UPDATE jobs SET step = $1, total_steps = COALESCE($2, total_steps), \
                 tokens_seen = $3, estimated_finish = $4, metrics = COALESCE($5, metrics), \
                 updated_at = $6 \
                 WHERE id = $7 AND lease_owner = $8 AND status IN ('running', 'cancelling')",
            )
            .bind(progress.step)
            .bind(progress.total_steps)
            .bind(progress.tokens_seen)
            .bind(estimated_finish)
            .bind(progress.metrics.as_ref().map(Json))
            .bind(now)
            .bind(job_id)
            .bind(worker_id)
            .execute(p)
            .await?
            .rows_affected()
        });
        if updated == 0 {
            return Err(self.lease_lost_or_missing(job_id, worker_id).await);
        }
        Ok(())
    }

    /// Stores the metrics of one step (replacing a row for the same step, as happens after a
    /// resume) and makes them the job's latest metrics.
    pub async fn record_metric(
        &self,
        job_id: &str,
        worker_id: &str,
        metric: &JobMetric,
    ) -> Result<()> {
        let now = now_secs();
        let mut latest = serde_json::to_value(metric).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut latest {
            map.remove("created_at");
            map.retain(|_, v| !v.is_null());
        }
        with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            lease_guard!(tx, d, job_id, worker_id);
            sqlx::query(
                "INSERT INTO job_metrics (job_id, step, train_loss, learning_rate, \
                 tokens_per_second, tokens_seen, valid_loss, valid_accuracy, extra, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (job_id, step) DO UPDATE SET train_loss = excluded.train_loss, \
                 learning_rate = excluded.learning_rate, \
                 tokens_per_second = excluded.tokens_per_second, \
                 tokens_seen = excluded.tokens_seen, valid_loss = excluded.valid_loss, \
                 valid_accuracy = excluded.valid_accuracy, extra = excluded.extra, \
                 created_at = excluded.created_at",
            )
            .bind(job_id)
            .bind(metric.step)
            .bind(metric.train_loss)
            .bind(metric.learning_rate)
            .bind(metric.tokens_per_second)
            .bind(metric.tokens_seen)
            .bind(metric.valid_loss)
            .bind(metric.valid_accuracy)
            .bind(metric.extra.as_ref().map(Json))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE jobs SET metrics = $1, updated_at = $2 WHERE id = $3")
                .bind(Json(&latest))
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Records a checkpoint whose files are already in the blob store under `object_key`
    /// (replacing a checkpoint at the same step).
    pub async fn add_checkpoint(
        &self,
        job_id: &str,
        worker_id: &str,
        step: i64,
        object_key: &str,
        metrics: Option<Value>,
    ) -> Result<Checkpoint> {
        let now = now_secs();
        let checkpoint: Checkpoint = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            lease_guard!(tx, d, job_id, worker_id);
            let checkpoint: Checkpoint = sqlx::query_as(concat!(
                "INSERT INTO checkpoints (id, job_id, step, object_key, metrics, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (job_id, step) DO UPDATE SET object_key = excluded.object_key, \
                 metrics = excluded.metrics, created_at = excluded.created_at RETURNING ",
                checkpoint_cols!()
            ))
            .bind(new_id("ftckpt"))
            .bind(job_id)
            .bind(step)
            .bind(object_key)
            .bind(metrics.as_ref().map(Json))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            append_event!(
                tx,
                job_id,
                EventLevel::Info,
                "message",
                format!("Checkpoint saved at step {step}"),
                Some(json!({"step": step, "checkpoint": checkpoint.id})),
                now
            );
            tx.commit().await?;
            checkpoint
        });
        tracing::debug!(job_id, step, "checkpoint recorded");
        Ok(checkpoint)
    }

    /// Ends a job successfully: records the adapter (its files must already be in the blob
    /// store), sets `succeeded`, `result_adapter_id` and `fine_tuned_model`, and releases the
    /// lease. Also allowed from `cancelling` (the work finished before the cancel landed).
    pub async fn complete_job(
        &self,
        job_id: &str,
        worker_id: &str,
        result: JobResult,
    ) -> Result<(Job, Adapter)> {
        let now = now_secs();
        let adapter_id = new_id("adapter");
        let (job, adapter) = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            lease_guard!(tx, d, job_id, worker_id);
            let adapter: Adapter = sqlx::query_as(concat!(
                "INSERT INTO adapters (id, tenant_id, job_id, base_model, name, object_prefix, \
                 bytes, config, created_at) \
                 SELECT $1, tenant_id, id, model, $2, $3, $4, $5, $6 FROM jobs WHERE id = $7 \
                 RETURNING ",
                super::adapters::adapter_cols!()
            ))
            .bind(&adapter_id)
            .bind(&result.fine_tuned_model)
            .bind(&result.adapter_object_prefix)
            .bind(result.adapter_bytes)
            .bind(Json(&result.adapter_config))
            .bind(now)
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE jobs SET status = 'succeeded', result_adapter_id = $1, \
                 fine_tuned_model = $2, lease_owner = NULL, lease_expires_at_ms = NULL, \
                 estimated_finish = NULL, finished_at = $3, updated_at = $3 WHERE id = $4",
            )
            .bind(&adapter_id)
            .bind(&result.fine_tuned_model)
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            append_event!(
                tx,
                job_id,
                EventLevel::Info,
                "message",
                format!("New fine-tuned model created: {}", result.fine_tuned_model),
                Some(json!({"adapter": adapter_id, "fine_tuned_model": result.fine_tuned_model})),
                now
            );
            append_event!(
                tx,
                job_id,
                EventLevel::Info,
                "message",
                "The job has successfully completed",
                None,
                now
            );
            let job: Job =
                sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            (job, adapter)
        });
        tracing::info!(job_id, worker = worker_id, adapter_id = %adapter.id, "job succeeded");
        Ok((job, adapter))
    }

    /// Ends an attempt with an error. With `retryable` and attempts left (and no cancel
    /// pending) the job goes back to `queued` for another worker; otherwise it becomes
    /// `failed` with `error`. Returns the updated job.
    pub async fn fail_job(
        &self,
        job_id: &str,
        worker_id: &str,
        error: JobError,
        retryable: bool,
    ) -> Result<Job> {
        let now = now_secs();
        let job: Job = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let (status, attempts, max_attempts) = lease_guard!(tx, d, job_id, worker_id);
            let retry = retryable && status == JobStatus::Running && attempts < max_attempts;
            let data = Some(json!({"error": error, "attempt": attempts, "worker": worker_id}));
            if retry {
                sqlx::query(
                    "UPDATE jobs SET status = 'queued', lease_owner = NULL, \
                     lease_expires_at_ms = NULL, estimated_finish = NULL, updated_at = $1 \
                     WHERE id = $2",
                )
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                append_event!(
                    tx,
                    job_id,
                    EventLevel::Warn,
                    "message",
                    format!(
                        "Attempt {attempts} of {max_attempts} failed: {}; job requeued",
                        error.message
                    ),
                    data,
                    now
                );
            } else {
                sqlx::query(
                    "UPDATE jobs SET status = 'failed', error = $1, lease_owner = NULL, \
                     lease_expires_at_ms = NULL, estimated_finish = NULL, finished_at = $2, \
                     updated_at = $2 WHERE id = $3",
                )
                .bind(Json(&error))
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                append_event!(
                    tx,
                    job_id,
                    EventLevel::Error,
                    "message",
                    format!("Job failed: {}", error.message),
                    data,
                    now
                );
            }
            let job: Job =
                sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            job
        });
        tracing::warn!(job_id, worker = worker_id, status = %job.status, error = %error.message, "job attempt failed");
        Ok(job)
    }

    /// A worker gives a job back without it counting as an attempt (e.g. on shutdown): a
    /// `running` job returns to `queued` (attempts − 1), a `cancelling` one becomes
    /// `cancelled`.
    pub async fn release_job(&self, job_id: &str, worker_id: &str) -> Result<Job> {
        let now = now_secs();
        let job: Job = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let (status, _, _) = lease_guard!(tx, d, job_id, worker_id);
            if status == JobStatus::Cancelling {
                sqlx::query(
                    "UPDATE jobs SET status = 'cancelled', lease_owner = NULL, \
                     lease_expires_at_ms = NULL, estimated_finish = NULL, finished_at = $1, \
                     updated_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                append_event!(
                    tx,
                    job_id,
                    EventLevel::Info,
                    "message",
                    "Job cancelled",
                    None,
                    now
                );
            } else {
                sqlx::query(
                    "UPDATE jobs SET status = 'queued', lease_owner = NULL, \
                     lease_expires_at_ms = NULL, estimated_finish = NULL, \
                     attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                     updated_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                append_event!(
                    tx,
                    job_id,
                    EventLevel::Info,
                    "message",
                    format!("Worker '{worker_id}' released the job; job requeued"),
                    None,
                    now
                );
            }
            let job: Job =
                sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            job
        });
        tracing::info!(job_id, worker = worker_id, status = %job.status, "job released");
        Ok(job)
    }

    /// The worker acknowledges a cancel: the job becomes `cancelled` and the lease is freed.
    pub async fn confirm_cancelled(&self, job_id: &str, worker_id: &str) -> Result<Job> {
        let now = now_secs();
        let job: Job = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            lease_guard!(tx, d, job_id, worker_id);
            sqlx::query(
                "UPDATE jobs SET status = 'cancelled', lease_owner = NULL, \
                 lease_expires_at_ms = NULL, estimated_finish = NULL, finished_at = $1, \
                 updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            append_event!(
                tx,
                job_id,
                EventLevel::Info,
                "message",
                "Job cancelled",
                None,
                now
            );
            let job: Job =
                sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            job
        });
        tracing::info!(job_id, worker = worker_id, "job cancelled");
        Ok(job)
    }

    /// A tenant asks to cancel a job: a job not yet claimed (`validating_files`, `queued`)
    /// becomes `cancelled` at once; a `running` one becomes `cancelling` with the cancel flag
    /// set (its worker sees it at the next heartbeat); a `cancelling` one is returned as is.
    /// A finished job is [`Error::InvalidState`] (HTTP 409).
    pub async fn request_cancel(&self, tenant_id: &str, job_id: &str) -> Result<Job> {
        let now = now_secs();
        let job: Job = with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let sql = match d {
                Backend::Sqlite => "SELECT status FROM jobs WHERE id = $1 AND tenant_id = $2",
                Backend::Postgres => {
                    "SELECT status FROM jobs WHERE id = $1 AND tenant_id = $2 FOR UPDATE"
                }
            };
            let status: Option<String> = sqlx::query_scalar(sql)
                .bind(job_id)
                .bind(tenant_id)
                .fetch_optional(&mut *tx)
                .await?;
            let status: JobStatus = status
                .ok_or_else(|| Error::not_found("job", job_id))?
                .parse()?;
            match status {
                JobStatus::ValidatingFiles | JobStatus::Queued => {
                    sqlx::query(
                        "UPDATE jobs SET status = 'cancelled', cancel_requested = $1, \
                         finished_at = $2, updated_at = $2 WHERE id = $3",
                    )
                    .bind(true)
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                    append_event!(
                        tx,
                        job_id,
                        EventLevel::Info,
                        "message",
                        "Job cancelled",
                        None,
                        now
                    );
                }
                JobStatus::Running => {
                    sqlx::query(
                        "UPDATE jobs SET status = 'cancelling', cancel_requested = $1, \
                         updated_at = $2 WHERE id = $3",
                    )
                    .bind(true)
                    .bind(now)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                    append_event!(
                        tx,
                        job_id,
                        EventLevel::Info,
                        "message",
                        "Cancellation requested; waiting for the worker to stop",
                        None,
                        now
                    );
                }
                JobStatus::Cancelling => {}
                JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled => {
                    return Err(Error::InvalidState {
                        kind: "job",
                        id: job_id.to_string(),
                        state: status.to_string(),
                        action: "cancel",
                    });
                }
            }
            let job: Job =
                sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            job
        });
        tracing::info!(tenant_id, job_id, status = %job.status, "cancel requested");
        Ok(job)
    }

    /// Jobs waiting for a worker (`queued`), for metrics.
    pub async fn queue_depth(&self) -> Result<i64> {
        Ok(with_pool!(self, |p| {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
                .fetch_one(p)
                .await?
        }))
    }
}
