//! Typed rows. Every struct is `serde::Serialize` (the API may shape its own responses from
//! them) and `sqlx::FromRow` for both backends. Timestamps are unix seconds.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Declares a string-backed enum stored as TEXT, with `as_str`, `Display` and
/// `TryFrom<String>` (used by `#[sqlx(try_from = "String")]`).
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $column:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The string stored in the database (and used on the wire).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, crate::Error> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(crate::Error::Corrupt { column: $column, value: other.to_string() }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = crate::Error;
            fn try_from(s: String) -> Result<Self, crate::Error> {
                s.parse()
            }
        }
    };
}

text_enum!(
    /// Processing state of an uploaded file.
    FileStatus, "files.status" {
        Uploaded => "uploaded",
        Processed => "processed",
        Error => "error",
    }
);

text_enum!(
    /// Life cycle of a fine-tuning job:
    /// `validating_files → queued → running → succeeded | failed | cancelled`, with
    /// `cancelling` between a cancel request on a running job and the worker noticing it.
    JobStatus, "jobs.status" {
        ValidatingFiles => "validating_files",
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelling => "cancelling",
        Cancelled => "cancelled",
    }
);

impl JobStatus {
    /// `succeeded`, `failed` or `cancelled`: nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

text_enum!(
    /// Severity of a job event.
    EventLevel, "job_events.level" {
        Info => "info",
        Warn => "warn",
        Error => "error",
    }
);

/// A tenant: the owner of files, jobs, adapters and API keys.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// An API key's metadata. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub name: Option<String>,
    /// The first characters of the secret (`sk-molt-AbCd`), for listing.
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// An uploaded file (a dataset). Its bytes live in the blob store under `object_key`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct FileRecord {
    /// `file-…`
    pub id: String,
    pub tenant_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    #[sqlx(try_from = "String")]
    pub status: FileStatus,
    pub status_details: Option<String>,
    pub line_count: Option<i64>,
    pub object_key: String,
    /// Hex SHA-256 of the content, when the uploader computed it.
    pub sha256: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    /// What the upload validator found: `{"kind", …}`, for images also `format`, `classes`,
    /// `train_examples`, `validation_examples`, `split` (migration 0002).
    #[sqlx(json(nullable))]
    pub dataset: Option<serde_json::Value>,
}

/// A base model registered by an admin; shared by all tenants.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct BaseModel {
    /// The name users pass as `model` (e.g. `mamba-130m`).
    pub id: String,
    /// Where its files are: an object-store prefix/URL or a local folder.
    pub location: String,
    /// Hash of `config.json`, to notice a changed model under the same name.
    pub config_hash: String,
    /// The parsed `config.json` (the API uses it to check methods and count parameters).
    #[sqlx(json)]
    pub config: Value,
    pub created_at: i64,
}

/// Why a job failed (OpenAI's `error` object, plus the line of a dataset error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// A machine-readable code, e.g. `invalid_training_file`, `lease_expired`, `internal`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    /// 1-based line of the dataset the error is about, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<i64>,
}

impl JobError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        JobError {
            kind: kind.into(),
            message: message.into(),
            line: None,
        }
    }

    pub fn with_line(mut self, line: i64) -> Self {
        self.line = Some(line);
        self
    }
}

/// A fine-tuning job, which is also the queue entry.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Job {
    /// `ftjob-…`
    pub id: String,
    pub tenant_id: String,
    /// Base model id.
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// The PEFT method config (tagged by `type`).
    #[sqlx(json)]
    pub method: Value,
    #[sqlx(json)]
    pub hyperparameters: Value,
    pub seed: i64,
    pub suffix: Option<String>,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    /// Optimiser steps done.
    pub step: i64,
    pub total_steps: Option<i64>,
    pub tokens_seen: i64,
    /// Unix seconds when the job is expected to finish.
    pub estimated_finish: Option<i64>,
    /// The latest metrics the worker reported.
    #[sqlx(json(nullable))]
    pub metrics: Option<Value>,
    /// Set when the job failed.
    #[sqlx(json(nullable))]
    pub error: Option<JobError>,
    pub result_adapter_id: Option<String>,
    pub fine_tuned_model: Option<String>,
    pub trainable_params: Option<i64>,
    /// Worker holding the lease (while running/cancelling).
    pub lease_owner: Option<String>,
    /// When the lease ends, unix **milliseconds** on the database server's clock.
    pub lease_expires_at_ms: Option<i64>,
    /// How many times a worker claimed the job (the current attempt while running).
    pub attempts: i64,
    pub max_attempts: i64,
    pub cancel_requested: bool,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// First time a worker claimed it.
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The search this job is a trial of (`ftsearch-…`), and the trial's number.
    pub search_id: Option<String>,
    pub trial_number: Option<i64>,
}

text_enum!(
    /// State of a hybrid PEFT search.
    SearchStatus, "searches.status" {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

impl SearchStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SearchStatus::Succeeded | SearchStatus::Failed | SearchStatus::Cancelled
        )
    }
}

text_enum!(
    /// State of one trial of a search.
    TrialStatus, "search_trials.state" {
        /// Recorded; its job is being created.
        Pending => "pending",
        Running => "running",
        Complete => "complete",
        /// Stopped early by the search's pruner.
        Pruned => "pruned",
        /// Not trained (over `max_trainable_params`, or no method switched on).
        Skipped => "skipped",
        Failed => "failed",
        /// Stopped because the search was cancelled.
        Cancelled => "cancelled",
    }
);

impl TrialStatus {
    pub fn is_finished(self) -> bool {
        !matches!(self, TrialStatus::Pending | TrialStatus::Running)
    }
}

/// A hybrid PEFT search (MambaPEFT's two steps); its trials are jobs.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Search {
    /// `ftsearch-…`
    pub id: String,
    pub tenant_id: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: String,
    /// `validation_loss` (minimised) or `validation_accuracy` (maximised).
    pub objective: String,
    /// The search's settings (trainer's `SearchSettings`), resolved.
    #[sqlx(json)]
    pub settings: Value,
    /// The trial jobs' shared hyperparameters.
    #[sqlx(json)]
    pub hyperparameters: Value,
    pub num_classes: Option<i64>,
    /// Optimiser steps of one trial.
    pub total_steps: Option<i64>,
    pub suffix: Option<String>,
    pub train_best: bool,
    #[sqlx(try_from = "String")]
    pub status: SearchStatus,
    /// 1 or 2.
    pub step: i64,
    /// Bumped by every change of the state machine (optimistic lock).
    pub version: i64,
    /// `{"trial", "step", "value", "configuration", "method", "trainable_params"}`.
    #[sqlx(json(nullable))]
    pub best: Option<Value>,
    #[sqlx(json(nullable))]
    pub error: Option<JobError>,
    /// The job training the best configuration into an adapter.
    pub result_job_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// One trial of a search.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct SearchTrial {
    pub search_id: String,
    /// 0, 1, 2 … over both steps, in the order the sampler proposed them.
    pub number: i64,
    pub step: i64,
    /// The sampler's values (a boolean or choice as its index), by parameter name.
    #[sqlx(json)]
    pub params: Value,
    /// The same in readable form.
    #[sqlx(json)]
    pub configuration: Value,
    /// The PEFT method the trial trains (`None` when skipped for having none).
    #[sqlx(json(nullable))]
    pub method: Option<Value>,
    pub trainable_params: Option<i64>,
    pub job_id: Option<String>,
    #[sqlx(rename = "state", try_from = "String")]
    pub status: TrialStatus,
    /// The objective's final value.
    pub value: Option<f64>,
    /// The step whose validation value pruned the trial.
    pub pruned_step: Option<i64>,
    /// Why the trial was skipped, failed or pruned.
    pub message: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobEvent {
    /// `ftevent-…`
    pub id: String,
    pub job_id: String,
    /// 1, 2, 3 … per job, in the order the events were written.
    pub seq: i64,
    #[sqlx(try_from = "String")]
    pub level: EventLevel,
    /// `message` or `metrics` (OpenAI's event `type`).
    pub event_type: String,
    pub message: String,
    #[sqlx(json(nullable))]
    pub data: Option<Value>,
    pub created_at: i64,
}

/// Training metrics at one step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, sqlx::FromRow)]
pub struct JobMetric {
    pub step: i64,
    pub train_loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub tokens_seen: Option<i64>,
    pub valid_loss: Option<f64>,
    pub valid_accuracy: Option<f64>,
    /// Anything else (gradient norm, per-method numbers…).
    #[sqlx(json(nullable))]
    pub extra: Option<Value>,
    /// Set by the database on insert; ignored on input.
    #[serde(default)]
    pub created_at: i64,
}

/// A training checkpoint in the blob store.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Checkpoint {
    /// `ftckpt-…`
    pub id: String,
    pub job_id: String,
    pub step: i64,
    /// Key (or key prefix) of the checkpoint's files in the blob store.
    pub object_key: String,
    #[sqlx(json(nullable))]
    pub metrics: Option<Value>,
    pub created_at: i64,
}

/// A trained adapter (`adapter_model.safetensors` + `adapter_config.json` under
/// `object_prefix`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Adapter {
    /// `adapter-…`
    pub id: String,
    pub tenant_id: String,
    pub job_id: Option<String>,
    pub base_model: String,
    /// The fine-tuned model name (`ft:…`), unique per tenant.
    pub name: String,
    pub object_prefix: String,
    pub bytes: i64,
    #[sqlx(json)]
    pub config: Value,
    pub created_at: i64,
}

/// One page of a list, newest first (OpenAI's list envelope carries `data` and `has_more`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// True when rows older than the last one exist.
    pub has_more: bool,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched rows.
    pub(crate) fn from_overfetch(mut rows: Vec<T>, limit: usize) -> Self {
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        Page {
            data: rows,
            has_more,
        }
    }
}
