//! What a job asks the trainer for, checked before the job is queued: the hyperparameters
//! (OpenAI's names where OpenAI has one, `"auto"` accepted) and the PEFT method (any config
//! of `trainer::peft`, tagged by `type`), with the trainable-parameter count it implies.
//!
//! The API stores the *resolved* hyperparameters (defaults filled in, `"auto"` replaced) on
//! the job, so `GET /v1/fine_tuning/jobs/{id}` shows exactly what the worker trains with.

use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Resolved hyperparameters of a job: the trainer's [`trainer::train::Hyperparameters`]
/// (every field, defaults filled in) plus OpenAI's `learning_rate_multiplier`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyperparameters {
    pub train: trainer::train::Hyperparameters,
    pub learning_rate_multiplier: f64,
}

/// The learning rate a multiplier of 1 means (the trainer's default learning rate).
pub fn base_learning_rate() -> f64 {
    trainer::train::Hyperparameters::default().learning_rate
}

/// The range of OpenAI's `learning_rate_multiplier` (times the trainer's default rate).
pub const MIN_LR_MULTIPLIER: f64 = 1e-6;
/// See [`MIN_LR_MULTIPLIER`].
pub const MAX_LR_MULTIPLIER: f64 = 100.0;

/// How many checkpoints a job gets when it does not say (`checkpoint_every` is derived from
/// the estimated total steps), so that a reclaimed job always has something to resume from.
pub const DEFAULT_CHECKPOINTS_PER_JOB: u64 = 10;

fn hp_error(field: &str, message: String) -> ApiError {
    ApiError::bad_request("invalid_hyperparameter", message)
        .param(format!("hyperparameters.{field}"))
}

/// The trainer's field names (from its serialised defaults), plus OpenAI's extras.
fn known_fields() -> Vec<String> {
    let mut out: Vec<String> = match serde_json::to_value(trainer::train::Hyperparameters::default())
    {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    out.push("learning_rate_multiplier".into());
    out.push("epochs".into());
    out
}

impl Hyperparameters {
    /// Parses and range-checks the request's hyperparameters (`null`, absent or `"auto"` →
    /// `defaults`: the trainer's, or its vision recipe for vision models). `examples`
    /// estimates the steps for the default `checkpoint_every`.
    pub fn from_request(
        value: Option<&Value>,
        examples: u64,
        defaults: &trainer::train::Hyperparameters,
    ) -> Result<Self, ApiError> {
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
        let known = known_fields();
        let mut resolved = Map::new();
        for (k, v) in obj {
            if !known.iter().any(|f| f == k) {
                return Err(hp_error(
                    k,
                    format!("unknown hyperparameter '{k}'; known: {}", known.join(", ")),
                ));
            }
            match v {
                Value::Null => {}
                Value::String(s) if s == "auto" => {}
                Value::Number(n) => {
                    // JSON Schema's integers include `3.0`: an integral float is an integer.
                    use crate::routes::integer::{to_i64, to_u64};
                    let v = match (n.is_f64(), to_i64(n), to_u64(n)) {
                        (true, Some(i), _) => json!(i),
                        (true, None, Some(u)) => json!(u),
                        _ => v.clone(),
                    };
                    resolved.insert(k.clone(), v);
                }
                Value::String(s) if k == "lr_scheduler" => {
                    resolved.insert(k.clone(), Value::String(s.clone()));
                }
                other => {
                    return Err(hp_error(
                        k,
                        format!("hyperparameters.{k} must be a number or \"auto\", got {other}"),
                    ));
                }
            }
        }
        if let Some(v) = resolved.remove("epochs") {
            if resolved.contains_key("n_epochs") {
                return Err(hp_error(
                    "epochs",
                    "set hyperparameters.n_epochs or its alias hyperparameters.epochs, not both"
                        .into(),
                ));
            }
            resolved.insert("n_epochs".into(), v);
        }
        let multiplier = match resolved.remove("learning_rate_multiplier") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(m) if (MIN_LR_MULTIPLIER..=MAX_LR_MULTIPLIER).contains(&m) => Some(m),
                _ => {
                    return Err(hp_error(
                        "learning_rate_multiplier",
                        format!(
                            "hyperparameters.learning_rate_multiplier must be in \
                             [{MIN_LR_MULTIPLIER}, {MAX_LR_MULTIPLIER}], got {v}"
                        ),
                    ));
                }
            },
        };
        // Both would multiply to a rate the document cannot bound: one or the other.
        if multiplier.is_some() && resolved.contains_key("learning_rate") {
            return Err(hp_error(
                "learning_rate_multiplier",
                "set hyperparameters.learning_rate or hyperparameters.learning_rate_multiplier, \
                 not both"
                    .into(),
            ));
        }
        let base = base_learning_rate();
        let learning_rate_multiplier = match (
            resolved.get("learning_rate").and_then(Value::as_f64),
            multiplier,
        ) {
            (Some(lr), _) => lr / base,
            (None, Some(m)) => {
                resolved.insert("learning_rate".into(), json!(base * m));
                m
            }
            (None, None) => 1.0,
        };
        let user_checkpoints = resolved.contains_key("checkpoint_every");
        let mut merged = match serde_json::to_value(defaults) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        merged.extend(resolved);
        let mut train: trainer::train::Hyperparameters =
            serde_json::from_value(Value::Object(merged)).map_err(|e| {
                let msg = e.to_string();
                let field = known
                    .iter()
                    .find(|f| msg.contains(&format!("`{f}`")))
                    .cloned()
                    .unwrap_or_else(|| "?".into());
                hp_error(&field, format!("hyperparameters: {msg}"))
            })?;
        train.validate().map_err(|e| match e {
            trainer::train::TrainError::Hyperparameter { field, reason } => {
                hp_error(&field, format!("hyperparameters.{field}: {reason}"))
            }
            other => hp_error("?", other.to_string()),
        })?;
        if !user_checkpoints {
            let total = train.steps_per_epoch(examples as usize).max(1) * u64::from(train.n_epochs);
            train.checkpoint_every = total.div_ceil(DEFAULT_CHECKPOINTS_PER_JOB).max(1);
        }
        Ok(Hyperparameters {
            train,
            learning_rate_multiplier,
        })
    }

    /// Optimiser steps for `examples` training examples (an estimate: the trainer may split
    /// long texts into several windows).
    pub fn total_steps(&self, examples: u64) -> i64 {
        let per_epoch = self.train.steps_per_epoch(examples as usize).max(1);
        i64::try_from(per_epoch * u64::from(self.train.n_epochs)).unwrap_or(i64::MAX)
    }

    /// What is stored on the job and shown in its `hyperparameters`.
    pub fn to_value(&self) -> Value {
        let mut v = serde_json::to_value(&self.train).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            m.insert(
                "learning_rate_multiplier".into(),
                json!(self.learning_rate_multiplier),
            );
        }
        v
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

/// The method a job without one gets (and what OpenAI's `{"type": "supervised"}` means):
/// LoRA on both projectors, with the trainer's default rank.
pub fn default_method() -> Value {
    json!({"type": "lora", "targets": ["in_proj", "out_proj"]})
}

/// Checks a PEFT method config against a base model's `config.json`.
/// What the trainer refuses here — unknown or ill-typed options, sizes that do not fit this
/// base model, methods that contradict each other — answers 400 `invalid_method`, as OpenAI
/// answers a job it cannot create.
/// What a job's files mean for its model: the examples one epoch trains on, and for a vision
/// model the training file's classes.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedFiles {
    pub train_examples: u64,
    pub classes: Option<Vec<String>>,
}

fn dataset_kind(file: &storage::FileRecord) -> &str {
    file.dataset
        .as_ref()
        .and_then(|d| d.get("kind"))
        .and_then(Value::as_str)
        .unwrap_or("text")
}

fn dataset_classes(file: &storage::FileRecord) -> Vec<String> {
    file.dataset
        .as_ref()
        .and_then(|d| d.get("classes"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// Checks a job's (processed) files against its base model: image datasets for a vision
/// model, text datasets for a language model, and a validation file with exactly the
/// training file's classes (400 with both lists otherwise).
pub fn check_files(
    model_config: &Value,
    training: &storage::FileRecord,
    validation: Option<&storage::FileRecord>,
) -> Result<CheckedFiles, ApiError> {
    let family = trainer::model::detect(model_config, std::path::Path::new("config.json"))
        .map_err(|e| ApiError::internal("reading the base model's config", &e))?;
    let vision = family.task() == trainer::model::Task::ImageClassification;
    for (file, param) in std::iter::once((training, "training_file"))
        .chain(validation.map(|v| (v, "validation_file")))
    {
        let images = dataset_kind(file) == "images";
        if images != vision {
            let (code, what) = if param == "training_file" {
                ("invalid_training_file", "training")
            } else {
                ("invalid_validation_file", "validation")
            };
            return Err(ApiError::bad_request(
                code,
                if vision {
                    format!(
                        "{param} '{}' is a {} dataset; the vision model needs an image \
                         dataset for {what} (class folders in a zip / tar, or image JSONL)",
                        file.id,
                        dataset_kind(file)
                    )
                } else {
                    format!(
                        "{param} '{}' is an image dataset; a language model trains on text",
                        file.id
                    )
                },
            )
            .param(param));
        }
    }
    if !vision {
        return Ok(CheckedFiles {
            train_examples: training.line_count.unwrap_or(0).max(0) as u64,
            classes: None,
        });
    }
    let classes = dataset_classes(training);
    if let Some(v) = validation {
        let theirs = dataset_classes(v);
        if theirs != classes {
            return Err(ApiError::bad_request(
                "invalid_validation_file",
                format!(
                    "validation_file '{}' has the classes [{}] but training_file '{}' has [{}]; \
                     both must have the same class list",
                    v.id,
                    theirs.join(", "),
                    training.id,
                    classes.join(", ")
                ),
            )
            .param("validation_file"));
        }
    }
    let train_examples = training
        .dataset
        .as_ref()
        .and_then(|d| d.get("train_examples"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(CheckedFiles {
        train_examples,
        classes: Some(classes),
    })
}

/// Checks the method against the base model; a vision model's head is sized for `classes`.
pub fn check_method(
    method: &Value,
    model_config: &Value,
    classes: Option<usize>,
) -> Result<CheckedMethod, ApiError> {
    let bad = |msg: String| ApiError::bad_request("invalid_method", msg).param("method");
    let Some(obj) = method.as_object() else {
        return Err(bad(format!(
            "method must be an object with a `type`, got {method}"
        )));
    };
    let Some(_kind) = obj.get("type").and_then(Value::as_str) else {
        return Err(bad("method needs a string `type` (e.g. \"lora\")".into()));
    };
    let mut cfg =
        trainer::peft::ModelShape::from_config(model_config, std::path::Path::new("config.json"))
            .map_err(|e| ApiError::internal("reading the base model's config", &e))?;
    if let (Some(v), Some(n)) = (cfg.vision.as_mut(), classes) {
        v.num_classes = n;
    }
    peft_check(method, &cfg).map_err(bad)
}

/// Parses the method as `trainer::peft::AdapterSpec`, checks it against the model
/// (`validate`), counts its trainable parameters, and returns it re-serialised with every
/// default filled in.
fn peft_check(method: &Value, cfg: &trainer::peft::ModelShape) -> Result<CheckedMethod, String> {
    let spec = trainer::peft::AdapterSpec::from_value(method).map_err(|e| e.to_string())?;
    spec.validate(cfg)
        .map_err(|e| format!("method is not valid for this model: {e}"))?;
    let n = spec.trainable_parameters(cfg);
    Ok(CheckedMethod {
        method: spec.to_value(),
        trainable_parameters: Some(i64::try_from(n).unwrap_or(i64::MAX)),
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
    /// The job's stored hyperparameters (the trainer ignores the API's extra fields).
    pub hyperparameters: Value,
    pub seed: u64,
    /// Where the trainer keeps its checkpoint; holds the last one when `resume` is set.
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
    /// Data and model are loaded; `start_step` > 0 when resuming.
    Started {
        total_steps: i64,
        start_step: i64,
        trainable_parameters: i64,
        train_examples: i64,
    },
    /// An optimiser step finished.
    Step {
        step: i64,
        total_steps: i64,
        tokens_seen: i64,
        loss: f64,
        learning_rate: f64,
        grad_norm: f64,
        tokens_per_second: f64,
        step_seconds: f64,
        eta_seconds: f64,
    },
    /// A validation pass finished.
    Validation {
        step: i64,
        loss: f64,
        accuracy: Option<f64>,
        top5_accuracy: Option<f64>,
    },
    /// A complete checkpoint is in `dir` (the run waits until the observer returns, so the
    /// files can be uploaded safely).
    Checkpoint { step: i64, dir: std::path::PathBuf },
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

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Parses `cpu` / `cuda:N` and opens the device.
pub fn parse_device(device: &str) -> Result<candle_core::Device, String> {
    match device {
        "cpu" => Ok(candle_core::Device::Cpu),
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => open_cuda(d, n),
            _ => Err(format!("unknown device '{d}': use cpu or cuda:N")),
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(d: &str, n: usize) -> Result<candle_core::Device, String> {
    candle_core::Device::new_cuda(n)
        .map_err(|e| format!("device {d} is not available (no NVIDIA GPU {n}, or no driver): {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(d: &str, _n: usize) -> Result<candle_core::Device, String> {
    Err(format!(
        "device {d}: this molt was built without CUDA support; rebuild with \
         `cargo build --release --features cuda` (see the README's CUDA section)"
    ))
}

/// Runs one training job on the current thread (call it from `spawn_blocking`) through
/// `trainer::train::run`, translating its events and errors.
pub fn run_training(
    spec: &RunSpec,
    observe: &mut dyn FnMut(RunEvent) -> RunControl,
) -> Result<RunOutcome, RunError> {
    use trainer::train::{Control, TrainError, TrainEvent, TrainOutcome, TrainRequest};
    let hyper: trainer::train::Hyperparameters =
        serde_json::from_value(spec.hyperparameters.clone())
            .map_err(|e| RunError::Invalid(format!("stored hyperparameters: {e}")))?;
    let device = parse_device(&spec.device).map_err(RunError::Invalid)?;
    let request = TrainRequest {
        model_dir: spec.model_dir.clone(),
        train_file: spec.training_file.clone(),
        validation_file: spec.validation_file.clone(),
        method: trainer::peft::AdapterSpec::from_value(&spec.method)
            .map_err(|e| RunError::Invalid(format!("method: {e}")))?,
        hyper,
        seed: spec.seed,
        out_dir: spec.output_dir.clone(),
        checkpoint_dir: spec.checkpoint_dir.clone(),
        resume: spec.resume,
        device,
    };
    let mut observer = |ev: &TrainEvent| -> Control {
        let mapped = match ev {
            TrainEvent::Started {
                total_steps,
                start_step,
                train_examples,
                trainable_parameters,
                ..
            } => RunEvent::Started {
                total_steps: to_i64(*total_steps),
                start_step: to_i64(*start_step),
                trainable_parameters: i64::try_from(*trainable_parameters).unwrap_or(i64::MAX),
                train_examples: i64::try_from(*train_examples).unwrap_or(i64::MAX),
            },
            TrainEvent::Step {
                step,
                total_steps,
                loss,
                lr,
                grad_norm,
                tokens_seen,
                tokens_per_second,
                step_seconds,
                eta_seconds,
                ..
            } => RunEvent::Step {
                step: to_i64(*step),
                total_steps: to_i64(*total_steps),
                tokens_seen: to_i64(*tokens_seen),
                loss: *loss,
                learning_rate: *lr,
                grad_norm: *grad_norm,
                tokens_per_second: *tokens_per_second,
                step_seconds: *step_seconds,
                eta_seconds: *eta_seconds,
            },
            TrainEvent::Validation {
                step,
                loss,
                accuracy,
                top5_accuracy,
                ..
            } => RunEvent::Validation {
                step: to_i64(*step),
                loss: *loss,
                accuracy: *accuracy,
                top5_accuracy: *top5_accuracy,
            },
            TrainEvent::Checkpoint { step, dir } => RunEvent::Checkpoint {
                step: to_i64(*step),
                dir: dir.clone(),
            },
            _ => return Control::Continue,
        };
        match observe(mapped) {
            RunControl::Continue => Control::Continue,
            RunControl::Stop => Control::Stop,
        }
    };
    match trainer::train::run(&request, &mut observer) {
        Ok(TrainOutcome::Finished { tokens_seen, .. }) => Ok(RunOutcome::Finished {
            trained_tokens: to_i64(tokens_seen),
        }),
        Ok(TrainOutcome::Stopped { .. }) => Ok(RunOutcome::Stopped),
        Err(TrainError::Dataset { errors }) => {
            let line = errors
                .iter()
                .find_map(|e| e.line)
                .map(|l| i64::try_from(l).unwrap_or(i64::MAX));
            let shown: Vec<String> = errors
                .iter()
                .take(10)
                .map(|e| match e.line {
                    Some(l) => format!("line {l}: {}", e.message),
                    None => e.message.clone(),
                })
                .collect();
            Err(RunError::Dataset {
                line,
                message: format!("invalid training data: {}", shown.join("; ")),
            })
        }
        Err(e) if e.is_user_error() => Err(RunError::Invalid(e.to_string())),
        Err(e) => Err(RunError::Failed(e.to_string())),
    }
}
