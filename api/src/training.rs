//! What a job asks the trainer for, checked before the job is queued: the hyperparameters
//! (OpenAI's names where OpenAI has one, `"auto"` accepted) and the PEFT method (any config
//! of `trainer::peft`, tagged by `type`), with the trainable-parameter count it implies.
//!
//! The API stores the *resolved* hyperparameters (defaults filled in, `"auto"` replaced) on
//! the job, so `GET /v1/fine_tuning/jobs/{id}` shows exactly what the worker trains with.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Resolved hyperparameters of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    /// Passes over the training file (OpenAI's `n_epochs`).
    pub n_epochs: u32,
    /// Examples per micro-batch.
    pub batch_size: u32,
    /// Peak learning rate = `base_learning_rate × learning_rate_multiplier` unless given
    /// directly.
    pub learning_rate: f64,
    /// OpenAI's multiplier, kept for the response.
    pub learning_rate_multiplier: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u32,
    /// `constant`, `linear` (decay to 0) or `cosine`.
    pub lr_scheduler: String,
    /// Longer examples are truncated.
    pub max_seq_length: u32,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: u32,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Save a checkpoint every this many optimiser steps (0: only at the end).
    pub checkpoint_every: u32,
}

/// The learning rate a multiplier of 1 means.
pub const BASE_LEARNING_RATE: f64 = 1e-3;

impl Default for Hyperparameters {
    fn default() -> Self {
        Hyperparameters {
            n_epochs: 3,
            batch_size: 4,
            learning_rate: BASE_LEARNING_RATE,
            learning_rate_multiplier: 1.0,
            warmup_steps: 0,
            lr_scheduler: "linear".into(),
            max_seq_length: 512,
            gradient_accumulation_steps: 1,
            weight_decay: 0.0,
            checkpoint_every: 10,
        }
    }
}

/// The schedules the trainer knows.
pub const SCHEDULERS: &[&str] = &["constant", "linear", "cosine"];

fn hp_error(field: &str, message: String) -> ApiError {
    ApiError::bad_request("invalid_hyperparameter", message)
        .param(format!("hyperparameters.{field}"))
}

/// `None` for absent, null or `"auto"`.
fn given<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a Value>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::String(s)) => Err(hp_error(
            field,
            format!("hyperparameters.{field} must be a number or \"auto\", got \"{s}\""),
        )),
        Some(v) => Ok(Some(v)),
    }
}

fn int_in(
    obj: &Map<String, Value>,
    field: &str,
    lo: u64,
    hi: u64,
    default: u32,
) -> Result<u32, ApiError> {
    let Some(v) = given(obj, field)? else {
        return Ok(default);
    };
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    });
    match n {
        Some(n) if (lo..=hi).contains(&n) => Ok(n as u32),
        _ => Err(hp_error(
            field,
            format!("hyperparameters.{field} must be an integer between {lo} and {hi}, got {v}"),
        )),
    }
}

fn float_in(
    obj: &Map<String, Value>,
    field: &str,
    lo_exclusive: f64,
    hi: f64,
) -> Result<Option<f64>, ApiError> {
    let Some(v) = given(obj, field)? else {
        return Ok(None);
    };
    match v.as_f64() {
        Some(x) if x > lo_exclusive && x <= hi && x.is_finite() => Ok(Some(x)),
        _ => Err(hp_error(
            field,
            format!("hyperparameters.{field} must be a number in ({lo_exclusive}, {hi}], got {v}"),
        )),
    }
}

const KNOWN_FIELDS: &[&str] = &[
    "n_epochs",
    "epochs",
    "batch_size",
    "learning_rate",
    "learning_rate_multiplier",
    "warmup_steps",
    "lr_scheduler",
    "max_seq_length",
    "gradient_accumulation_steps",
    "weight_decay",
    "checkpoint_every",
];

impl Hyperparameters {
    /// Parses and range-checks the request's hyperparameters (`null` or absent → defaults).
    pub fn from_request(value: Option<&Value>) -> Result<Self, ApiError> {
        let d = Hyperparameters::default();
        let empty = Map::new();
        let obj = match value {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(o)) => o,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_hyperparameter",
                    format!("hyperparameters must be an object, got {other}"),
                )
                .param("hyperparameters"));
            }
        };
        if let Some(unknown) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            return Err(hp_error(
                unknown,
                format!(
                    "unknown hyperparameter '{unknown}'; known: {}",
                    KNOWN_FIELDS.join(", ")
                ),
            ));
        }
        let epochs_field = if obj.contains_key("n_epochs") {
            "n_epochs"
        } else {
            "epochs"
        };
        let n_epochs = int_in(obj, epochs_field, 1, 100, d.n_epochs)?;
        let batch_size = int_in(obj, "batch_size", 1, 1024, d.batch_size)?;
        let multiplier = float_in(obj, "learning_rate_multiplier", 0.0, 100.0)?;
        let lr = float_in(obj, "learning_rate", 0.0, 1.0)?;
        let (learning_rate, learning_rate_multiplier) = match (lr, multiplier) {
            (Some(lr), Some(m)) => (lr * m, m),
            (Some(lr), None) => (lr, lr / BASE_LEARNING_RATE),
            (None, Some(m)) => (BASE_LEARNING_RATE * m, m),
            (None, None) => (d.learning_rate, d.learning_rate_multiplier),
        };
        let warmup_steps = int_in(obj, "warmup_steps", 0, 1_000_000, d.warmup_steps)?;
        let lr_scheduler = match obj.get("lr_scheduler") {
            None | Some(Value::Null) => d.lr_scheduler.clone(),
            Some(Value::String(s)) if s == "auto" => d.lr_scheduler.clone(),
            Some(Value::String(s)) if SCHEDULERS.contains(&s.as_str()) => s.clone(),
            Some(v) => {
                return Err(hp_error(
                    "lr_scheduler",
                    format!(
                        "hyperparameters.lr_scheduler must be one of {}, got {v}",
                        SCHEDULERS.join(", ")
                    ),
                ));
            }
        };
        let max_seq_length = int_in(obj, "max_seq_length", 8, 65_536, d.max_seq_length)?;
        let gradient_accumulation_steps = int_in(
            obj,
            "gradient_accumulation_steps",
            1,
            1024,
            d.gradient_accumulation_steps,
        )?;
        let weight_decay = match given(obj, "weight_decay")? {
            None => d.weight_decay,
            Some(v) => match v.as_f64() {
                Some(x) if (0.0..=1.0).contains(&x) => x,
                _ => {
                    return Err(hp_error(
                        "weight_decay",
                        format!("hyperparameters.weight_decay must be in [0, 1], got {v}"),
                    ));
                }
            },
        };
        let checkpoint_every = int_in(obj, "checkpoint_every", 0, 1_000_000, d.checkpoint_every)?;
        Ok(Hyperparameters {
            n_epochs,
            batch_size,
            learning_rate,
            learning_rate_multiplier,
            warmup_steps,
            lr_scheduler,
            max_seq_length,
            gradient_accumulation_steps,
            weight_decay,
            checkpoint_every,
        })
    }

    /// Optimiser steps for `examples` training examples.
    pub fn total_steps(&self, examples: u64) -> i64 {
        let batches = examples.div_ceil(u64::from(self.batch_size.max(1)));
        let steps_per_epoch = batches.div_ceil(u64::from(self.gradient_accumulation_steps.max(1)));
        i64::try_from(steps_per_epoch.max(1) * u64::from(self.n_epochs)).unwrap_or(i64::MAX)
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| json!({}))
    }
}

/// A checked PEFT method.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedMethod {
    /// The config with every default filled in (what is stored and shown).
    pub method: Value,
    /// Parameters the method trains on this base model.
    pub trainable_parameters: Option<i64>,
}

/// The method a job without one gets.
pub fn default_method() -> Value {
    json!({"type": "lora"})
}

/// Checks a PEFT method config against a base model's `config.json`.
pub fn check_method(method: &Value, model_config: &Value) -> Result<CheckedMethod, ApiError> {
    let bad = |msg: String| ApiError::bad_request("invalid_method", msg).param("method");
    let Some(obj) = method.as_object() else {
        return Err(bad(format!(
            "method must be an object with a `type`, got {method}"
        )));
    };
    let Some(_kind) = obj.get("type").and_then(Value::as_str) else {
        return Err(bad("method needs a string `type` (e.g. \"lora\")".into()));
    };
    let cfg_text = model_config.to_string();
    let cfg =
        trainer::model::MambaConfig::from_json_str(&cfg_text, std::path::Path::new("config.json"))
            .map_err(|e| ApiError::internal("reading the base model's config", &e))?;
    peft_check(method, &cfg).map_err(bad)
}

/// The PEFT families of DESIGN.md, by `type` tag.
/// INTEGRATION(peft): replaced by `trainer::peft::AdapterSpec` once it is published.
pub const METHOD_TYPES: &[&str] = &[
    "lora",
    "lora_p",
    "dora",
    "parallel_adapter",
    "prompt",
    "affix",
    "partial",
    "additional_scan",
    "prodial",
    "full",
    "linear_probe",
    "bitfit",
    "sll_lora",
    "hybrid",
];

/// INTEGRATION(peft): parse `trainer::peft::AdapterSpec`, call `validate(&cfg)` and
/// `trainable_parameters(&cfg)`, and return the re-serialised spec (defaults filled in).
fn peft_check(method: &Value, _cfg: &trainer::model::MambaConfig) -> Result<CheckedMethod, String> {
    let kind = method
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !METHOD_TYPES.contains(&kind) {
        return Err(format!(
            "unknown method type '{kind}'; known: {}",
            METHOD_TYPES.join(", ")
        ));
    }
    Ok(CheckedMethod {
        method: method.clone(),
        trainable_parameters: None,
    })
}

// ----- running a job (the worker's side of the trainer) --------------------------------------

/// Everything a training run needs, on local disk.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Base model folder (config.json, weights, tokenizer.json).
    pub model_dir: std::path::PathBuf,
    pub training_file: std::path::PathBuf,
    pub validation_file: Option<std::path::PathBuf>,
    /// The PEFT method config (tagged by `type`).
    pub method: Value,
    pub hyperparameters: Hyperparameters,
    pub seed: u64,
    /// Where the trainer writes checkpoints; holds the last one when `resume` is set.
    pub checkpoint_dir: std::path::PathBuf,
    pub resume: bool,
    /// Where the trainer writes the final adapter.
    pub output_dir: std::path::PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// What a run reports while it trains.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// An optimiser step finished.
    Step {
        step: i64,
        total_steps: i64,
        tokens_seen: i64,
        loss: f64,
        learning_rate: f64,
        tokens_per_second: f64,
        step_seconds: f64,
    },
    /// A validation pass finished.
    Validation {
        step: i64,
        loss: f64,
        accuracy: Option<f64>,
    },
    /// A checkpoint is complete in `checkpoint_dir` (the run waits until the observer
    /// returns, so the files can be uploaded safely).
    Checkpoint { step: i64 },
}

/// The observer's answer: go on or stop at the next step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunControl {
    Continue,
    Stop,
}

/// How a run ended without an error.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// The adapter (`adapter_model.safetensors` + `adapter_config.json`) is in `output_dir`.
    Finished { trained_tokens: i64 },
    /// The observer asked to stop.
    Stopped,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The dataset is unusable (never retried).
    #[error("{message}")]
    Dataset { line: Option<i64>, message: String },
    /// The job's spec cannot be trained (never retried).
    #[error("{0}")]
    Invalid(String),
    /// Anything else (retried while attempts are left).
    #[error("{0}")]
    Failed(String),
}

/// Runs one training job on the current thread (call it from `spawn_blocking`).
///
/// INTEGRATION(train): build `trainer::train::TrainRequest` from `spec` (model_dir,
/// training/validation files, `AdapterSpec` parsed from `spec.method`, `Hyperparameters`
/// from `spec.hyperparameters`, seed, checkpoint_dir, resume, output dir, device), call
/// `trainer::train::run(&request, &mut adapter)` where the adapter turns
/// `TrainEvent::{Step, Validation, Checkpoint}` into [`RunEvent`]s for `observe` and maps
/// [`RunControl::Stop`] to `Control::Stop`; map `TrainError`'s dataset errors to
/// [`RunError::Dataset`] (with the line), spec errors to [`RunError::Invalid`], the rest to
/// [`RunError::Failed`].
pub fn run_training(
    spec: &RunSpec,
    observe: &mut dyn FnMut(RunEvent) -> RunControl,
) -> Result<RunOutcome, RunError> {
    let _ = (spec, observe);
    Err(RunError::Invalid(
        "this build of molt cannot train yet: the trainer's training loop \
         (trainer::train) is not integrated"
            .into(),
    ))
}
