//! Fine-tuning jobs (the tenant-facing side), their events, metrics and checkpoints.
//! The worker-facing side (claiming, leases, transitions) is in `queue.rs`.

use serde_json::{Value, json};
use sqlx::types::Json;

use super::models::{Checkpoint, EventLevel, Job, JobError, JobEvent, JobMetric, JobStatus, Page};
use super::{Db, check_limit};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_secs};

macro_rules! job_cols {
    () => {
        "id, tenant_id, model, training_file, validation_file, method, hyperparameters, seed, \
         suffix, status, step, total_steps, tokens_seen, estimated_finish, metrics, error, \
         result_adapter_id, fine_tuned_model, trainable_params, lease_owner, lease_expires_at_ms, \
         attempts, max_attempts, cancel_requested, idempotency_key, created_at, updated_at, \
         started_at, finished_at, search_id, trial_number"
    };
}
pub(crate) use job_cols;

macro_rules! event_cols {
    () => {
        "id, job_id, seq, level, event_type, message, data, created_at"
    };
}
macro_rules! metric_cols {
    () => {
        "step, train_loss, learning_rate, tokens_per_second, tokens_seen, valid_loss, \
         valid_accuracy, extra, created_at"
    };
}
macro_rules! checkpoint_cols {
    () => {
        "id, job_id, step, object_key, metrics, created_at"
    };
}
pub(crate) use checkpoint_cols;

/// Default number of times a job is claimed before it is given up on.
pub const DEFAULT_MAX_ATTEMPTS: i64 = 3;

/// A job to create. It starts in `validating_files`; [`Db::enqueue`] makes it claimable.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub tenant_id: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub method: Value,
    pub hyperparameters: Value,
    pub seed: i64,
    pub suffix: Option<String>,
    /// Trainable-parameter count computed by the API at creation.
    pub trainable_params: Option<i64>,
    /// Known up front when the API can compute it from the dataset and hyperparameters.
    pub total_steps: Option<i64>,
    /// Defaults to [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: Option<i64>,
    pub idempotency_key: Option<String>,
    /// A search's trial: the search and the trial's number.
    pub trial: Option<(String, i64)>,
}

impl NewJob {
    /// A job with defaults for everything optional.
    pub fn new(
        tenant_id: impl Into<String>,
        model: impl Into<String>,
        training_file: impl Into<String>,
    ) -> Self {
        NewJob {
            tenant_id: tenant_id.into(),
            model: model.into(),
            training_file: training_file.into(),
            validation_file: None,
            method: json!({"type": "lora"}),
            hyperparameters: json!({}),
            seed: 0,
            suffix: None,
            trainable_params: None,
            total_steps: None,
            max_attempts: None,
            idempotency_key: None,
            trial: None,
        }
    }
}

impl Db {
    /// Creates a job in `validating_files` and writes its first event. With an idempotency
    /// key this tenant already used, the existing job is returned with `false`.
    /// Returns `(job, created)`.
    pub async fn create_job(&self, new: NewJob) -> Result<(Job, bool)> {
        if let Some(key) = &new.idempotency_key
            && let Some(existing) = self
                .find_job_by_idempotency_key(&new.tenant_id, key)
                .await?
        {
            return Ok((existing, false));
        }
        let max_attempts = new.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts < 1 {
            return Err(Error::InvalidInput(format!(
                "max_attempts must be at least 1, got {max_attempts}"
            )));
        }
        let id = new_id("ftjob");
        let now = now_secs();
        let res: Result<Job> = with_pool!(self, |p, d| {
            async {
                let mut tx = p.begin_with(d.begin_write()).await?;
                sqlx::query(
                    "INSERT INTO jobs (id, tenant_id, model, training_file, validation_file, method, \
                     hyperparameters, seed, suffix, status, total_steps, trainable_params, \
                     max_attempts, idempotency_key, created_at, updated_at, search_id, \
                     trial_number) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, \
                     $16, $17)",
                )
                .bind(&id)
                .bind(&new.tenant_id)
                .bind(&new.model)
                .bind(&new.training_file)
                .bind(&new.validation_file)
                .bind(Json(&new.method))
                .bind(Json(&new.hyperparameters))
                .bind(new.seed)
                .bind(&new.suffix)
                .bind(JobStatus::ValidatingFiles.as_str())
                .bind(new.total_steps)
                .bind(new.trainable_params)
                .bind(max_attempts)
                .bind(&new.idempotency_key)
                .bind(now)
                .bind(new.trial.as_ref().map(|t| &t.0))
                .bind(new.trial.as_ref().map(|t| t.1))
                .execute(&mut *tx)
                .await?;
                append_event!(
                    tx,
                    &id,
                    EventLevel::Info,
                    "message",
                    format!("Created fine-tuning job: {id}"),
                    None,
                    now
                );
                let job: Job = sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(&id)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, Error>(job)
            }
            .await
        });
        match res {
            Ok(job) => {
                tracing::info!(tenant_id = %job.tenant_id, job_id = %job.id, model = %job.model, "job created");
                Ok((job, true))
            }
            Err(Error::Conflict(msg)) => match &new.idempotency_key {
                Some(key) => match self
                    .find_job_by_idempotency_key(&new.tenant_id, key)
                    .await?
                {
                    Some(existing) => Ok((existing, false)),
                    None => Err(Error::Conflict(msg)),
                },
                None => Err(Error::Conflict(msg)),
            },
            Err(e) => Err(e),
        }
    }

    /// Creates a job and enqueues it at once ([`Db::create_job`] + [`Db::enqueue`]).
    /// An idempotent repeat returns the existing job untouched.
    pub async fn submit_job(&self, new: NewJob) -> Result<(Job, bool)> {
        let tenant_id = new.tenant_id.clone();
        let (job, created) = self.create_job(new).await?;
        if !created {
            return Ok((job, false));
        }
        Ok((self.enqueue(&tenant_id, &job.id).await?, true))
    }

    /// The job a tenant created with this idempotency key, if any.
    pub async fn find_job_by_idempotency_key(
        &self,
        tenant_id: &str,
        key: &str,
    ) -> Result<Option<Job>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2"
            ))
            .bind(tenant_id)
            .bind(key)
            .fetch_optional(p)
            .await?
        }))
    }

    /// Moves a job from `validating_files` to `queued`, where workers can claim it.
    /// Any other state is [`Error::InvalidState`].
    pub async fn enqueue(&self, tenant_id: &str, job_id: &str) -> Result<Job> {
        let job = self
            .transition_from(
                tenant_id,
                job_id,
                &[JobStatus::ValidatingFiles],
                JobStatus::Queued,
                None,
                "enqueue",
                (EventLevel::Info, "Files validated; job queued".to_string()),
            )
            .await?;
        tracing::info!(tenant_id, job_id, "job queued");
        Ok(job)
    }

    /// Fails a job whose files did not validate (from `validating_files` only).
    pub async fn reject_job(&self, tenant_id: &str, job_id: &str, error: JobError) -> Result<Job> {
        let message = format!("Job failed validation: {}", error.message);
        self.transition_from(
            tenant_id,
            job_id,
            &[JobStatus::ValidatingFiles],
            JobStatus::Failed,
            Some(&error),
            "reject",
            (EventLevel::Error, message),
        )
        .await
    }

    /// Shared by enqueue/reject: a guarded status change plus an event, in one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn transition_from(
        &self,
        tenant_id: &str,
        job_id: &str,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&JobError>,
        action: &'static str,
        event: (EventLevel, String),
    ) -> Result<Job> {
        let now = now_secs();
        let finished = to.is_terminal().then_some(now);
        with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let current: Option<String> =
                sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND tenant_id = $2")
                    .bind(job_id)
                    .bind(tenant_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let current: JobStatus = current
                .ok_or_else(|| Error::not_found("job", job_id))?
                .parse()?;
            if !from.contains(&current) {
                return Err(Error::InvalidState {
                    kind: "job",
                    id: job_id.to_string(),
                    state: current.to_string(),
                    action,
                });
            }
            sqlx::query(
                "UPDATE jobs SET status = $1, error = COALESCE($2, error), updated_at = $3, \
                 finished_at = COALESCE($4, finished_at) WHERE id = $5",
            )
            .bind(to.as_str())
            .bind(error.map(Json))
            .bind(now)
            .bind(finished)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            append_event!(tx, job_id, event.0, "message", event.1, None, now);
            let job: Job =
                sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok(job)
        })
    }

    /// A tenant's job. Another tenant's id is [`Error::NotFound`].
    pub async fn get_job(&self, tenant_id: &str, job_id: &str) -> Result<Job> {
        let row: Option<Job> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE id = $1 AND tenant_id = $2"
            ))
            .bind(job_id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("job", job_id))
    }

    /// A job by id regardless of tenant — for workers and admin tools only, never for
    /// tenant-facing requests.
    pub async fn get_job_unscoped(&self, job_id: &str) -> Result<Job> {
        let row: Option<Job> = with_pool!(self, |p| {
            sqlx::query_as(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
                .bind(job_id)
                .fetch_optional(p)
                .await?
        });
        row.ok_or_else(|| Error::not_found("job", job_id))
    }

    /// A tenant's jobs, newest first; with `status`, only the jobs in that status.
    pub async fn list_jobs(
        &self,
        tenant_id: &str,
        status: Option<JobStatus>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Job>> {
        let fetch = check_limit(limit)?;
        let rows: Vec<Job> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT seq FROM jobs WHERE id = $1 AND tenant_id = $2",
                "job",
                after,
                tenant_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE tenant_id = $1 AND seq < $2 AND ($4 IS NULL OR status = $4) \
                 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(tenant_id)
            .bind(before)
            .bind(fetch)
            .bind(status.map(|s| s.as_str()))
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// Number of jobs in each status (all tenants; for metrics). Statuses with no jobs are
    /// reported as 0.
    pub async fn job_status_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        let rows: Vec<(String, i64)> = with_pool!(self, |p| {
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .fetch_all(p)
                .await?
        });
        let mut out: Vec<(JobStatus, i64)> = JobStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for (status, n) in rows {
            let status: JobStatus = status.parse()?;
            if let Some(slot) = out.iter_mut().find(|(s, _)| *s == status) {
                slot.1 = n;
            }
        }
        Ok(out)
    }

    // ----- events --------------------------------------------------------------------------

    /// Appends an event to a job (workers use this for their own messages). `event_type` is
    /// `message` or `metrics`.
    pub async fn add_job_event(
        &self,
        job_id: &str,
        level: EventLevel,
        event_type: &str,
        message: &str,
        data: Option<Value>,
    ) -> Result<()> {
        let now = now_secs();
        with_pool!(self, |p, d| {
            let mut tx = p.begin_with(d.begin_write()).await?;
            let exists: Option<i64> = sqlx::query_scalar("SELECT seq FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(Error::not_found("job", job_id));
            }
            append_event!(tx, job_id, level, event_type, message, data, now);
            tx.commit().await?;
        });
        Ok(())
    }

    /// A job's events, newest first (OpenAI's `GET …/events`); `after` is an event id.
    pub async fn list_job_events(
        &self,
        tenant_id: &str,
        job_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<JobEvent>> {
        let fetch = check_limit(limit)?;
        self.get_job(tenant_id, job_id).await?;
        let rows: Vec<JobEvent> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT seq FROM job_events WHERE id = $1 AND job_id = $2",
                "event",
                after,
                job_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                event_cols!(),
                " FROM job_events WHERE job_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(job_id)
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// A job's events with `seq > after_seq`, oldest first (for streaming: remember the last
    /// `seq` seen and ask again).
    pub async fn job_events_since(
        &self,
        tenant_id: &str,
        job_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<JobEvent>> {
        check_limit(limit)?;
        self.get_job(tenant_id, job_id).await?;
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                event_cols!(),
                " FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3"
            ))
            .bind(job_id)
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(p)
            .await?
        }))
    }

    // ----- metrics and checkpoints -----------------------------------------------------------

    /// A job's metric points with `step > after_step`, in step order.
    pub async fn list_job_metrics(
        &self,
        tenant_id: &str,
        job_id: &str,
        after_step: Option<i64>,
        limit: u32,
    ) -> Result<Page<JobMetric>> {
        let fetch = check_limit(limit)?;
        self.get_job(tenant_id, job_id).await?;
        let rows: Vec<JobMetric> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                metric_cols!(),
                " FROM job_metrics WHERE job_id = $1 AND step > $2 ORDER BY step ASC LIMIT $3"
            ))
            .bind(job_id)
            .bind(after_step.unwrap_or(i64::MIN))
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// A job's checkpoints, newest (highest step) first; `after` is a checkpoint id.
    pub async fn list_checkpoints(
        &self,
        tenant_id: &str,
        job_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Checkpoint>> {
        let fetch = check_limit(limit)?;
        self.get_job(tenant_id, job_id).await?;
        let rows: Vec<Checkpoint> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT step FROM checkpoints WHERE id = $1 AND job_id = $2",
                "checkpoint",
                after,
                job_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                checkpoint_cols!(),
                " FROM checkpoints WHERE job_id = $1 AND step < $2 ORDER BY step DESC LIMIT $3"
            ))
            .bind(job_id)
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// The checkpoint with the highest step, to resume from (workers).
    pub async fn latest_checkpoint(&self, job_id: &str) -> Result<Option<Checkpoint>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                checkpoint_cols!(),
                " FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1"
            ))
            .bind(job_id)
            .fetch_optional(p)
            .await?
        }))
    }
}
