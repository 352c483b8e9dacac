//! `molt worker`: the queue consumer. It claims one job at a time with a lease, materialises
//! the base model and the datasets on local disk, trains on a blocking thread, and on the
//! async side heartbeats, writes progress, metrics, events and checkpoints, and finally the
//! adapter.
//!
//! - **Leases.** A heartbeat every `lease/3` keeps the job; a worker that dies stops
//!   heartbeating, the lease expires and another worker reclaims the job (the queue counts
//!   attempts), downloads the latest checkpoint and resumes from it.
//! - **Cancel.** The heartbeat returns the cancel flag; the trainer is stopped at the next
//!   step boundary and the job confirmed `cancelled`.
//! - **Shutdown.** SIGTERM/SIGINT (or, with `--exit-with-parent`, the launcher's death) stops
//!   the current run at the next step and releases the job without using up an attempt.
//! - **Checkpoints** are uploaded to `checkpoints/<job>/step-<N>/` while the trainer waits,
//!   so the files never change under the upload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storage::{BlobStore, Db, EventLevel, Job, JobError, JobMetric, JobResult, Progress};
use tokio::sync::{mpsc, oneshot};

use crate::registry;
use crate::training::{self, RunControl, RunError, RunEvent, RunOutcome, RunSpec};

/// `molt worker` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Database URL: `postgres://…`, `sqlite:///path/molt.db`, or a SQLite file path.
    #[arg(long, env = "MOLT_DATABASE_URL")]
    pub database_url: String,

    /// Blob store: `s3://bucket/prefix` (AWS_* environment for endpoint and credentials) or a
    /// local directory.
    #[arg(long, env = "MOLT_STORE")]
    pub store: String,

    /// Device to train on: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Local scratch directory (datasets, checkpoints, cached base models).
    #[arg(long, env = "MOLT_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Lease length in seconds: a job whose worker has not heartbeated for this long is
    /// reclaimed by another worker.
    #[arg(long, env = "MOLT_LEASE_SECONDS", default_value_t = 60)]
    pub lease_seconds: u64,

    /// How long to wait between claims when the queue is empty, in milliseconds.
    #[arg(long, env = "MOLT_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,

    /// This worker's name in leases and events (default: host name and process id).
    #[arg(long, env = "MOLT_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Exit when the process that started this worker exits (used by `molt serve`).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("storage: {0}")]
    Storage(#[from] storage::Error),
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--device: {0}")]
    Device(String),
}

/// The default worker id: `<host>-<pid>`.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

/// Shared state of one worker process.
struct Ctx {
    db: Db,
    blobs: BlobStore,
    id: String,
    lease: Duration,
    work_dir: PathBuf,
    device: String,
    /// Set on SIGTERM/SIGINT or when the parent dies.
    shutdown: Arc<AtomicBool>,
}

/// Runs the worker until a shutdown signal.
pub async fn run(args: WorkerArgs) -> Result<(), WorkerError> {
    // Fail at start, not on every job, when the device cannot be used.
    crate::training::parse_device(&args.device).map_err(WorkerError::Device)?;
    let db = Db::connect(&args.database_url).await?;
    db.migrate().await?;
    let blobs = BlobStore::from_url(&args.store)?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("molt-worker"));
    std::fs::create_dir_all(&work_dir).map_err(|source| WorkerError::Io {
        path: work_dir.clone(),
        source,
    })?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    spawn_signal_watch(shutdown.clone(), wake.clone(), args.exit_with_parent);
    let ctx = Ctx {
        db,
        blobs,
        id: args.worker_id.clone().unwrap_or_else(default_worker_id),
        lease: Duration::from_secs(args.lease_seconds.max(1)),
        work_dir,
        device: args.device.clone(),
        shutdown: shutdown.clone(),
    };
    tracing::info!(worker = %ctx.id, store = %ctx.blobs, lease_s = args.lease_seconds, "worker started");
    let poll = Duration::from_millis(args.poll_interval_ms.max(10));
    while !shutdown.load(Ordering::SeqCst) {
        match ctx.db.claim(&ctx.id, ctx.lease).await {
            Ok(Some(job)) => run_job(&ctx, job).await,
            Ok(None) => {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = wake.notified() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claim failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(poll * 2) => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
    tracing::info!(worker = %ctx.id, "worker stopped");
    ctx.db.close().await;
    Ok(())
}

/// Sets `shutdown` on SIGTERM, SIGINT, or (optionally) when the parent process goes away.
fn spawn_signal_watch(
    shutdown: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    with_parent: bool,
) {
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    None
                }
            };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                Some(_) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => break,
                _ = tick.tick() => {
                    if with_parent && std::os::unix::process::parent_id() != parent {
                        tracing::warn!("the launcher exited; stopping");
                        break;
                    }
                }
            }
        }
        tracing::info!("shutdown requested; finishing at the next step boundary");
        shutdown.store(true, Ordering::SeqCst);
        wake.notify_waiters();
    });
}

/// Checkpoints of one attempt whose files are kept in the store (older ones are deleted;
/// their rows stay, so `/checkpoints` still lists them).
pub const KEEP_CHECKPOINT_FILES: usize = 3;

/// Messages from the training thread to the async side.
enum Msg {
    Event(RunEvent),
    Checkpoint {
        step: i64,
        dir: PathBuf,
        done: oneshot::Sender<()>,
    },
}

/// Flags the heartbeat task sets.
#[derive(Default)]
struct Flags {
    cancel: AtomicBool,
    lease_lost: AtomicBool,
}

/// The fine-tuned model name: `ft:<base>:<suffix or molt>:<job id's random part>`.
pub fn fine_tuned_name(job: &Job) -> String {
    let short = job.id.strip_prefix("ftjob-").unwrap_or(&job.id);
    format!(
        "ft:{}:{}:{short}",
        job.model,
        job.suffix.as_deref().unwrap_or("molt")
    )
}

/// Runs one claimed job to an end state (or until the lease is lost).
async fn run_job(ctx: &Ctx, job: Job) {
    let job_id = job.id.clone();
    let flags = Arc::new(Flags::default());
    let heartbeat = tokio::spawn(heartbeat_loop(
        ctx.db.clone(),
        job_id.clone(),
        ctx.id.clone(),
        ctx.lease,
        flags.clone(),
    ));
    let job_dir = ctx.work_dir.join(&job_id);
    let result = attempt(ctx, &job, &job_dir, &flags).await;
    heartbeat.abort();
    let _ = std::fs::remove_dir_all(&job_dir);

    if flags.lease_lost.load(Ordering::SeqCst) {
        tracing::warn!(job_id = %job_id, "lease lost; leaving the job to its new owner");
        return;
    }
    let end = match result {
        Ok(Ended::Succeeded(res)) => ctx.db.complete_job(&job_id, &ctx.id, res).await.map(|_| ()),
        Ok(Ended::Stopped) => {
            if flags.cancel.load(Ordering::SeqCst) {
                ctx.db.confirm_cancelled(&job_id, &ctx.id).await.map(|_| ())
            } else {
                ctx.db.release_job(&job_id, &ctx.id).await.map(|_| ())
            }
        }
        Err(Failure { error, retryable }) => {
            tracing::warn!(job_id = %job_id, error = %error.message, retryable, "attempt failed");
            ctx.db
                .fail_job(&job_id, &ctx.id, error, retryable)
                .await
                .map(|_| ())
        }
    };
    if let Err(e) = end {
        tracing::warn!(job_id = %job_id, error = %e, "could not record the job's end");
    }
    // A trial's end moves its search on at once (the API's loop would, a second later).
    if let Some(search_id) = &job.search_id
        && let Err(e) = crate::search::advance(&ctx.db, search_id).await
    {
        tracing::warn!(search_id = %search_id, error = %e, "could not advance the search");
    }
}

enum Ended {
    Succeeded(JobResult),
    Stopped,
}

struct Failure {
    error: JobError,
    retryable: bool,
}

impl Failure {
    fn retry(kind: &str, message: impl Into<String>) -> Self {
        Failure {
            error: JobError::new(kind, message),
            retryable: true,
        }
    }
    fn fatal(kind: &str, message: impl Into<String>) -> Self {
        Failure {
            error: JobError::new(kind, message),
            retryable: false,
        }
    }
}

impl From<storage::Error> for Failure {
    fn from(e: storage::Error) -> Self {
        Failure::retry("internal", format!("storage error: {e}"))
    }
}

/// Renews the lease every `lease/3`, and in between looks at the job about once a second so
/// that a cancel is noticed within a step or two (a read, not a write).
async fn heartbeat_loop(
    db: Db,
    job_id: String,
    worker: String,
    lease: Duration,
    flags: Arc<Flags>,
) {
    let every = (lease / 3).max(Duration::from_millis(200));
    let poll = every.min(Duration::from_secs(1));
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(poll).await;
        if last.elapsed() + poll / 2 < every {
            if let Ok(job) = db.get_job_unscoped(&job_id).await
                && (job.cancel_requested || job.status == storage::JobStatus::Cancelling)
                && !flags.cancel.swap(true, Ordering::SeqCst)
            {
                tracing::info!(job_id = %job_id, "cancel requested");
            }
            continue;
        }
        last = Instant::now();
        match db.heartbeat(&job_id, &worker, lease).await {
            Ok(cancel) => {
                if cancel && !flags.cancel.swap(true, Ordering::SeqCst) {
                    tracing::info!(job_id = %job_id, "cancel requested");
                }
            }
            Err(storage::Error::LeaseLost { .. }) | Err(storage::Error::NotFound { .. }) => {
                flags.lease_lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "heartbeat failed"),
        }
    }
}

fn io_failure(path: &Path, e: std::io::Error) -> Failure {
    Failure::retry("internal", format!("I/O error on {}: {e}", path.display()))
}

/// Prepares the inputs, trains, uploads checkpoints and the adapter.
async fn attempt(
    ctx: &Ctx,
    job: &Job,
    job_dir: &Path,
    flags: &Arc<Flags>,
) -> Result<Ended, Failure> {
    let db = &ctx.db;
    let _ = std::fs::remove_dir_all(job_dir);
    std::fs::create_dir_all(job_dir).map_err(|e| io_failure(job_dir, e))?;

    let base = match db.get_base_model(&job.model).await {
        Ok(b) => b,
        Err(storage::Error::NotFound { .. }) => {
            return Err(Failure::fatal(
                "model_not_found",
                format!("base model '{}' is no longer registered", job.model),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let model_dir = registry::materialize(&base, &ctx.blobs, &ctx.work_dir)
        .await
        .map_err(|e| {
            Failure::retry(
                "model_unavailable",
                format!("fetching base model '{}': {e}", base.id),
            )
        })?;

    let training_file =
        fetch_file(ctx, job, &job.training_file, &job_dir.join("training.data")).await?;
    let validation_file = match &job.validation_file {
        Some(id) => Some(fetch_file(ctx, job, id, &job_dir.join("validation.data")).await?),
        None => None,
    };

    let checkpoint_dir = job_dir.join("checkpoint");
    let mut resume = false;
    if let Some(ck) = db.latest_checkpoint(&job.id).await? {
        ctx.blobs
            .download_dir(&ck.object_key, &checkpoint_dir)
            .await
            .map_err(|e| {
                Failure::retry(
                    "checkpoint_unavailable",
                    format!("downloading checkpoint at step {}: {e}", ck.step),
                )
            })?;
        resume = true;
        db.add_job_event(
            &job.id,
            EventLevel::Info,
            "message",
            &format!("Resuming from checkpoint at step {}", ck.step),
            Some(json!({"step": ck.step, "checkpoint": ck.id})),
        )
        .await?;
        tracing::info!(job_id = %job.id, step = ck.step, "resuming from checkpoint");
    }
    std::fs::create_dir_all(&checkpoint_dir).map_err(|e| io_failure(&checkpoint_dir, e))?;
    let output_dir = job_dir.join("adapter");

    let spec = RunSpec {
        model_dir,
        training_file,
        validation_file,
        method: job.method.clone(),
        hyperparameters: job.hyperparameters.clone(),
        seed: u64::try_from(job.seed).unwrap_or(0),
        checkpoint_dir: checkpoint_dir.clone(),
        resume,
        output_dir: output_dir.clone(),
        device: ctx.device.clone(),
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let stop_flags = flags.clone();
    let shutdown = ctx.shutdown.clone();
    let trainer = tokio::task::spawn_blocking(move || {
        let mut observe = |ev: RunEvent| -> RunControl {
            match ev {
                RunEvent::Checkpoint { step, dir } => {
                    let (done, wait) = oneshot::channel();
                    if tx.send(Msg::Checkpoint { step, dir, done }).is_ok() {
                        let _ = wait.blocking_recv();
                    }
                }
                other => {
                    let _ = tx.send(Msg::Event(other));
                }
            }
            if stop_flags.cancel.load(Ordering::SeqCst)
                || stop_flags.lease_lost.load(Ordering::SeqCst)
                || shutdown.load(Ordering::SeqCst)
            {
                RunControl::Stop
            } else {
                RunControl::Continue
            }
        };
        training::run_training(&spec, &mut observe)
    });

    let mut reporter = Reporter::new(job);
    let mut kept: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Event(ev) => {
                let validation = matches!(ev, RunEvent::Validation { .. });
                reporter.on_event(ctx, ev).await;
                // A search's trial: its pruner may stop it on this validation value.
                if validation && job.search_id.is_some() {
                    match crate::search::check_prune(db, job).await {
                        Ok(true) => {
                            tracing::info!(job_id = %job.id, "trial pruned");
                            flags.cancel.store(true, Ordering::SeqCst);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(job_id = %job.id, error = %e, "could not check pruning")
                        }
                    }
                }
            }
            Msg::Checkpoint { step, dir, done } => {
                reporter.flush(ctx).await;
                let prefix = format!("checkpoints/{}/step-{step:08}", job.id);
                match ctx.blobs.upload_dir(&dir, &prefix).await {
                    Ok(_) => {
                        if let Err(e) = db
                            .add_checkpoint(
                                &job.id,
                                &ctx.id,
                                step,
                                &prefix,
                                reporter.latest.clone(),
                            )
                            .await
                        {
                            tracing::warn!(job_id = %job.id, step, error = %e, "could not record checkpoint");
                        } else {
                            kept.push_back(prefix);
                            // Only the newest few checkpoints keep their files.
                            while kept.len() > KEEP_CHECKPOINT_FILES {
                                if let Some(old) = kept.pop_front()
                                    && let Err(e) = ctx.blobs.delete_prefix(&old).await
                                {
                                    tracing::warn!(job_id = %job.id, prefix = %old, error = %e, "could not delete an old checkpoint");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %job.id, step, error = %e, "checkpoint upload failed")
                    }
                }
                let _ = done.send(());
            }
        }
    }
    reporter.flush(ctx).await;
    let outcome = trainer
        .await
        .map_err(|e| Failure::retry("internal", format!("the training thread panicked: {e}")))?;
    match outcome {
        Ok(RunOutcome::Stopped) => Ok(Ended::Stopped),
        Ok(RunOutcome::Finished { trained_tokens }) => {
            if flags.lease_lost.load(Ordering::SeqCst) {
                return Ok(Ended::Stopped);
            }
            let prefix = format!("adapters/{}", job.id);
            let uploaded = ctx
                .blobs
                .upload_dir(&output_dir, &prefix)
                .await
                .map_err(|e| Failure::retry("internal", format!("uploading the adapter: {e}")))?;
            let bytes: u64 = uploaded.iter().map(|b| b.size).sum();
            let config_path = output_dir.join("adapter_config.json");
            let adapter_config: Value = std::fs::read(&config_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_else(|| job.method.clone());
            // Final progress: the whole run's tokens.
            let _ = db
                .update_progress(
                    &job.id,
                    &ctx.id,
                    &Progress {
                        step: reporter.last_step.max(job.step),
                        total_steps: None,
                        tokens_seen: trained_tokens.max(reporter.tokens_seen),
                        eta_seconds: Some(0),
                        metrics: None,
                    },
                )
                .await;
            Ok(Ended::Succeeded(JobResult {
                fine_tuned_model: fine_tuned_name(job),
                adapter_object_prefix: prefix,
                adapter_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
                adapter_config,
            }))
        }
        Err(RunError::Dataset { line, message }) => {
            let mut error = JobError::new("invalid_training_file", message);
            error.line = line;
            Err(Failure {
                error,
                retryable: false,
            })
        }
        Err(RunError::Invalid(msg)) => Err(Failure::fatal("invalid_job", msg)),
        Err(RunError::Failed(msg)) => Err(Failure::retry("training_error", msg)),
    }
}

/// Downloads one of the job's files.
async fn fetch_file(ctx: &Ctx, job: &Job, file_id: &str, dest: &Path) -> Result<PathBuf, Failure> {
    let file = match ctx.db.get_file(&job.tenant_id, file_id).await {
        Ok(f) => f,
        Err(storage::Error::NotFound { .. }) => {
            return Err(Failure::fatal(
                "file_not_found",
                format!("file '{file_id}' was deleted before the job ran"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    ctx.blobs
        .download_file(&file.object_key, dest)
        .await
        .map_err(|e| Failure::retry("internal", format!("downloading {file_id}: {e}")))?;
    Ok(dest.to_path_buf())
}

/// Turns step events into progress, metric rows and an ETA, writing to the database at most
/// about once a second (metric rows are buffered, none is dropped).
struct Reporter {
    job_id: String,
    last_step: i64,
    total_steps: Option<i64>,
    tokens_seen: i64,
    pending: Vec<JobMetric>,
    latest: Option<Value>,
    last_flush: Instant,
    eta: Option<i64>,
}

impl Reporter {
    fn new(job: &Job) -> Self {
        Reporter {
            job_id: job.id.clone(),
            last_step: job.step,
            total_steps: job.total_steps,
            tokens_seen: job.tokens_seen,
            pending: Vec::new(),
            latest: None,
            last_flush: Instant::now(),
            eta: None,
        }
    }

    async fn on_event(&mut self, ctx: &Ctx, ev: RunEvent) {
        match ev {
            RunEvent::Started {
                total_steps,
                start_step,
                trainable_parameters,
                train_examples,
            } => {
                self.total_steps = Some(total_steps);
                self.last_step = start_step;
                let message = if start_step > 0 {
                    format!(
                        "Training resumed at step {start_step} of {total_steps} \
                         ({train_examples} examples, {trainable_parameters} trainable parameters)"
                    )
                } else {
                    format!(
                        "Training started: {total_steps} steps over {train_examples} examples, \
                         {trainable_parameters} trainable parameters"
                    )
                };
                let _ = ctx
                    .db
                    .add_job_event(
                        &self.job_id,
                        EventLevel::Info,
                        "message",
                        &message,
                        Some(json!({
                            "total_steps": total_steps,
                            "start_step": start_step,
                            "trainable_parameters": trainable_parameters,
                            "train_examples": train_examples,
                        })),
                    )
                    .await;
                self.flush(ctx).await;
            }
            RunEvent::Step {
                step,
                total_steps,
                tokens_seen,
                loss,
                learning_rate,
                grad_norm,
                tokens_per_second,
                step_seconds,
                eta_seconds,
            } => {
                self.last_step = step;
                self.total_steps = Some(total_steps);
                self.tokens_seen = tokens_seen;
                self.eta = Some(eta_seconds.max(0.0).round() as i64);
                let metric = JobMetric {
                    step,
                    train_loss: Some(loss),
                    learning_rate: Some(learning_rate),
                    tokens_per_second: Some(tokens_per_second),
                    tokens_seen: Some(tokens_seen),
                    valid_loss: None,
                    valid_accuracy: None,
                    extra: Some(json!({"step_seconds": step_seconds, "grad_norm": grad_norm})),
                    created_at: 0,
                };
                self.latest = Some(json!({
                    "step": step,
                    "train_loss": loss,
                    "learning_rate": learning_rate,
                    "tokens_per_second": tokens_per_second,
                    "step_seconds": step_seconds,
                }));
                self.pending.push(metric);
                if self.last_flush.elapsed() >= Duration::from_secs(1) || step >= total_steps {
                    self.flush(ctx).await;
                }
            }
            RunEvent::Validation {
                step,
                loss,
                accuracy,
                top5_accuracy,
            } => {
                let top5 = top5_accuracy.map(|a| json!({"valid_top5_accuracy": a}));
                // Merge into the row of that step when it is still buffered.
                if let Some(m) = self.pending.iter_mut().find(|m| m.step == step) {
                    m.valid_loss = Some(loss);
                    m.valid_accuracy = accuracy;
                    if let (Some(Value::Object(extra)), Some(a)) = (&mut m.extra, top5_accuracy) {
                        extra.insert("valid_top5_accuracy".into(), json!(a));
                    }
                } else {
                    self.pending.push(JobMetric {
                        step,
                        valid_loss: Some(loss),
                        valid_accuracy: accuracy,
                        extra: top5,
                        ..JobMetric::default()
                    });
                }
                if let Some(Value::Object(latest)) = &mut self.latest {
                    latest.insert("valid_loss".into(), json!(loss));
                    if let Some(a) = accuracy {
                        latest.insert("valid_mean_token_accuracy".into(), json!(a));
                    }
                    if let Some(a) = top5_accuracy {
                        latest.insert("valid_top5_accuracy".into(), json!(a));
                    }
                }
                let mut message = format!("Step {step}: validation loss {loss:.4}");
                if let Some(a) = accuracy {
                    message.push_str(&format!(", accuracy {:.2}%", 100.0 * a));
                }
                if let Some(a) = top5_accuracy {
                    message.push_str(&format!(", top-5 {:.2}%", 100.0 * a));
                }
                let _ = ctx
                    .db
                    .add_job_event(
                        &self.job_id,
                        EventLevel::Info,
                        "metrics",
                        &message,
                        Some(json!({
                            "step": step,
                            "valid_loss": loss,
                            "valid_accuracy": accuracy,
                            "valid_top5_accuracy": top5_accuracy,
                        })),
                    )
                    .await;
                self.flush(ctx).await;
            }
            RunEvent::Checkpoint { .. } => {}
        }
    }

    async fn flush(&mut self, ctx: &Ctx) {
        self.last_flush = Instant::now();
        for m in std::mem::take(&mut self.pending) {
            if let Err(e) = ctx.db.record_metric(&self.job_id, &ctx.id, &m).await {
                tracing::debug!(job_id = %self.job_id, error = %e, "could not record a metric");
            }
        }
        let progress = Progress {
            step: self.last_step,
            total_steps: self.total_steps,
            tokens_seen: self.tokens_seen,
            eta_seconds: self.eta,
            metrics: self.latest.clone(),
        };
        if let Err(e) = ctx
            .db
            .update_progress(&self.job_id, &ctx.id, &progress)
            .await
        {
            tracing::debug!(job_id = %self.job_id, error = %e, "could not record progress");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_tuned_names() {
        let mut job = sample_job();
        job.id = "ftjob-AbC".into();
        job.model = "demo".into();
        assert_eq!(fine_tuned_name(&job), "ft:demo:molt:AbC");
        job.suffix = Some("mine".into());
        assert_eq!(fine_tuned_name(&job), "ft:demo:mine:AbC");
    }

    fn sample_job() -> Job {
        Job {
            id: String::new(),
            tenant_id: "t".into(),
            model: String::new(),
            training_file: "f".into(),
            validation_file: None,
            method: json!({}),
            hyperparameters: json!({}),
            seed: 0,
            suffix: None,
            status: storage::JobStatus::Queued,
            step: 0,
            total_steps: None,
            tokens_seen: 0,
            estimated_finish: None,
            metrics: None,
            error: None,
            result_adapter_id: None,
            fine_tuned_model: None,
            trainable_params: None,
            lease_owner: None,
            lease_expires_at_ms: None,
            attempts: 0,
            max_attempts: 3,
            cancel_requested: false,
            idempotency_key: None,
            created_at: 0,
            updated_at: 0,
            started_at: None,
            finished_at: None,
            search_id: None,
            trial_number: None,
        }
    }
}
