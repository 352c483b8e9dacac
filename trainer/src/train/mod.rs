//! Training: datasets, AdamW with parameter groups, learning-rate schedules, checkpoints with
//! exact resume, and the loop that ties them together.
//!
//! The entry point is [`run`]: it loads a base model, builds the adapter a
//! [`TrainRequest`] asks for, trains it on a JSONL dataset and writes the adapter to
//! `out_dir`, reporting [`TrainEvent`]s to a [`TrainObserver`] that can stop the run between
//! steps. [`validate_dataset`] checks a dataset file without a model (the API calls it on
//! upload).
//!
//! Reproducibility: every random choice (adapter init, the order of each epoch) is derived
//! from `seed` and a counter (the epoch), never from a running RNG, so "the RNG state" in a
//! checkpoint is just the seed and the position, and a resumed run draws exactly what an
//! uninterrupted one would. On CPU two runs with one seed are bit-identical.

pub mod data;
pub mod engine;
pub mod full;
pub mod images;
pub mod optim;
pub mod pretrain;
pub mod schedule;

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{AnyLm, LoadOptions, MambaForCausalLM};
use crate::peft::{Adapter, AdapterSpec, PeftError, PeftModel};
use crate::tokenizer::Tokenizer;
use engine::{BTreeFingerprint, LoopConfig, TaskModel, TrainSet, Trainable};

pub use data::{DatasetError, DatasetKind, DatasetSummary, validate_dataset};
pub use optim::{AdamW, ParamGroup, ParamGroupState};
pub use pretrain::{
    PretrainOutcome, PretrainRequest, VimPretrainOutcome, VimPretrainRequest, pretrain,
    pretrain_vim,
};
pub use schedule::Schedule;

/// What to train. The worker builds one per job; `molt train` builds one from its flags.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// Base model folder: `config.json`, weights, `tokenizer.json`.
    pub model_dir: PathBuf,
    /// JSONL: `{"text"}`, `{"prompt","completion"}` or `{"context","choices","label"}`.
    pub train_file: PathBuf,
    /// Same format as `train_file`; validation loss (and accuracy for multiple choice) is
    /// computed on it every `hyper.eval_every` steps and at the end.
    pub validation_file: Option<PathBuf>,
    /// The PEFT method(s) (`{"type": "lora", ...}`, or a hybrid of several).
    pub method: AdapterSpec,
    pub hyper: Hyperparameters,
    /// Seeds the adapter's initialisation and the order of every epoch.
    pub seed: u64,
    /// Where the final adapter (`adapter_config.json` + `adapter_model.safetensors`) goes.
    pub out_dir: PathBuf,
    /// Holds the latest checkpoint (one at a time: each new one replaces the previous).
    pub checkpoint_dir: PathBuf,
    /// Continue from the checkpoint in `checkpoint_dir` (an error if there is none).
    pub resume: bool,
    /// Where to train; `Device::Cpu` unless built with CUDA.
    pub device: Device,
}

/// The learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// Training hyperparameters. Every field has a default (serde fills absent fields), and
/// unknown fields are ignored so that the API's stored hyperparameters (which carry a few
/// fields of their own, e.g. `learning_rate_multiplier`) deserialize as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hyperparameters {
    /// Passes over the training set. Range 1..=1000.
    #[serde(alias = "epochs")]
    pub n_epochs: u32,
    /// Examples per micro-batch. Range 1..=4096.
    pub batch_size: u32,
    /// Peak learning rate of every parameter group that does not set its own. Range (0, 10].
    pub learning_rate: f64,
    /// Linear warm-up from 0 over this many optimizer steps.
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the total steps, in [0, 1); used when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    pub lr_scheduler: LrScheduler,
    /// Tokens per example after truncation (longer texts are split into windows of this
    /// length). Range 2..=1_048_576.
    #[serde(alias = "max_seq_len")]
    pub max_seq_length: u32,
    /// Micro-batches per optimizer step. Range 1..=65536.
    pub gradient_accumulation_steps: u32,
    /// AdamW decoupled weight decay. `None` (the default): each parameter group keeps the
    /// decay its method config gives it. `Some(w)`: every group that decays gets `w`
    /// instead; groups the method exempts from decay (decay 0: A_log additions, norms,
    /// biases, ...) stay at 0. Range [0, 10].
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping over every trainable parameter; 0 disables it.
    pub max_grad_norm: f64,
    /// Validate every this many optimizer steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many optimizer steps (0: never).
    pub checkpoint_every: u64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Hyperparameters {
            n_epochs: 3,
            batch_size: 4,
            learning_rate: 1e-3,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            lr_scheduler: LrScheduler::Linear,
            max_seq_length: 512,
            gradient_accumulation_steps: 1,
            weight_decay: None,
            max_grad_norm: 1.0,
            eval_every: 0,
            checkpoint_every: 0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
        }
    }
}

impl Hyperparameters {
    /// MambaPEFT's vision recipe (spec §6.1): AdamW lr 1e-3, weight decay 1e-4, batch 32,
    /// 100 epochs, warm-up over the first 10 % (10 epochs), cosine decay, grad-norm clip 5.
    /// (The paper's cosine ends at 1e-5, this one at 0: a 1 % difference in the last epochs.)
    pub fn vision_recipe() -> Self {
        Hyperparameters {
            n_epochs: 100,
            batch_size: 32,
            learning_rate: 1e-3,
            warmup_ratio: 0.1,
            lr_scheduler: LrScheduler::Cosine,
            weight_decay: Some(1e-4),
            max_grad_norm: 5.0,
            ..Hyperparameters::default()
        }
    }

    /// Image runs validate every epoch unless `eval_every` says otherwise: an `eval_every` of
    /// 0 becomes the steps of one epoch over `examples`.
    pub fn validate_every_epoch(&mut self, examples: usize) {
        if self.eval_every == 0 {
            self.eval_every = self.steps_per_epoch(examples).max(1);
        }
    }

    /// Checks every field's range; the error names the field and what is valid.
    pub fn validate(&self) -> Result<(), TrainError> {
        fn bad(field: &str, reason: String) -> Result<(), TrainError> {
            Err(TrainError::Hyperparameter {
                field: field.to_string(),
                reason,
            })
        }
        fn int_range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), TrainError> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                bad(field, format!("{v} is out of range; valid: {lo}..={hi}"))
            }
        }
        int_range("n_epochs", self.n_epochs.into(), 1, 1000)?;
        int_range("batch_size", self.batch_size.into(), 1, 4096)?;
        int_range("max_seq_length", self.max_seq_length.into(), 2, 1 << 20)?;
        int_range(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps.into(),
            1,
            65536,
        )?;
        let lr = self.learning_rate;
        if !(lr.is_finite() && lr > 0.0 && lr <= 10.0) {
            return bad(
                "learning_rate",
                format!("{lr} is out of range; valid: (0, 10]"),
            );
        }
        let r = self.warmup_ratio;
        if !(r.is_finite() && (0.0..1.0).contains(&r)) {
            return bad(
                "warmup_ratio",
                format!("{r} is out of range; valid: [0, 1)"),
            );
        }
        if self.warmup_steps > 0 && r > 0.0 {
            return bad(
                "warmup_ratio",
                format!(
                    "both warmup_steps ({}) and warmup_ratio ({r}) are set; set one of them",
                    self.warmup_steps
                ),
            );
        }
        if let Some(wd) = self.weight_decay
            && !(wd.is_finite() && (0.0..=10.0).contains(&wd))
        {
            return bad(
                "weight_decay",
                format!("{wd} is out of range; valid: [0, 10]"),
            );
        }
        let g = self.max_grad_norm;
        if !(g.is_finite() && g >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("{g} is out of range; valid: a finite number >= 0 (0 disables clipping)"),
            );
        }
        for (field, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                return bad(field, format!("{b} is out of range; valid: [0, 1)"));
            }
        }
        let e = self.adam_epsilon;
        if !(e.is_finite() && e > 0.0 && e <= 1.0) {
            return bad(
                "adam_epsilon",
                format!("{e} is out of range; valid: (0, 1]"),
            );
        }
        Ok(())
    }

    /// Optimizer steps per epoch for `examples` training examples (after windowing).
    pub fn steps_per_epoch(&self, examples: usize) -> u64 {
        let batches = examples.div_ceil(self.batch_size.max(1) as usize) as u64;
        batches.div_ceil(u64::from(self.gradient_accumulation_steps.max(1)))
    }

    /// Warm-up steps for a run of `total_steps`.
    pub fn warmup_for(&self, total_steps: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total_steps as f64).ceil() as u64
        }
    }
}

/// What the run reports, in order: `Started`, then `Step`s interleaved with `Validation`s and
/// `Checkpoint`s, then `Finished` (unless stopped or failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainEvent {
    Started {
        total_steps: u64,
        /// Non-zero when resuming: the step the checkpoint was taken at.
        start_step: u64,
        n_epochs: u32,
        train_examples: usize,
        validation_examples: usize,
        trainable_parameters: usize,
        dataset_kind: DatasetKind,
    },
    /// One optimizer step is done. `loss` is the step's mean token loss.
    Step {
        step: u64,
        total_steps: u64,
        epoch: u32,
        loss: f64,
        /// The learning rate of the first parameter group at this step.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Scored (non-padding) tokens seen so far, including before a resume.
        tokens_seen: u64,
        /// Over this process's steps so far.
        tokens_per_second: f64,
        step_seconds: f64,
        eta_seconds: f64,
    },
    Validation {
        step: u64,
        /// Mean token loss over the validation set.
        loss: f64,
        /// Multiple choice: the fraction of examples whose correct choice has the highest
        /// log-likelihood; classification: the top-1 accuracy.
        accuracy: Option<f64>,
        /// Classification with more than 5 classes: the top-5 accuracy.
        top5_accuracy: Option<f64>,
        examples: usize,
    },
    /// A complete checkpoint for `step` is in `dir`. The run waits for the observer to
    /// return, so the files can be copied elsewhere safely.
    Checkpoint { step: u64, dir: PathBuf },
    Finished {
        step: u64,
        tokens_seen: u64,
        /// Mean loss of the last step.
        train_loss: Option<f64>,
        out_dir: PathBuf,
    },
}

/// The observer's answer after each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop before the next step (cancellation). Nothing more is written.
    Stop,
}

/// Receives the run's events. Called on the training thread; a slow observer slows training.
pub trait TrainObserver {
    fn event(&mut self, ev: &TrainEvent) -> Control;
}

/// Any `FnMut(&TrainEvent) -> Control` is an observer.
impl<F: FnMut(&TrainEvent) -> Control> TrainObserver for F {
    fn event(&mut self, ev: &TrainEvent) -> Control {
        self(ev)
    }
}

/// An observer that ignores everything.
pub struct NoObserver;

impl TrainObserver for NoObserver {
    fn event(&mut self, _: &TrainEvent) -> Control {
        Control::Continue
    }
}

/// How a run ended without an error.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainOutcome {
    /// The adapter is in `out_dir`.
    Finished {
        steps: u64,
        tokens_seen: u64,
        train_loss: Option<f64>,
        validation_loss: Option<f64>,
        validation_accuracy: Option<f64>,
        validation_top5_accuracy: Option<f64>,
        out_dir: PathBuf,
    },
    /// The observer returned [`Control::Stop`] after `step`.
    Stopped { step: u64, tokens_seen: u64 },
}

/// Why a run failed. [`TrainError::is_user_error`] tells the worker whether retrying can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A hyperparameter is out of range.
    #[error("hyperparameter `{field}`: {reason}")]
    Hyperparameter { field: String, reason: String },

    /// The dataset has errors; each names its file and line.
    #[error("{}", data::ErrorList(errors))]
    Dataset { errors: Vec<DatasetError> },

    /// The method config cannot be used with this model.
    #[error("method: {0}")]
    Method(String),

    /// The checkpoint to resume from is missing, incomplete, or from another run.
    #[error("checkpoint {}: {reason}", dir.display())]
    Checkpoint { dir: PathBuf, reason: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The loss or the gradient norm became NaN or infinite.
    #[error(
        "training diverged at step {step}: {what} is not finite (lower the learning rate or \
         enable gradient clipping)"
    )]
    Diverged { step: u64, what: String },

    /// Loading the model or tokenizer, or a model-level input error.
    #[error(transparent)]
    Model(#[from] crate::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// True when the request itself is at fault (bad data, method or hyperparameters): a
    /// retry would fail the same way.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            TrainError::Hyperparameter { .. }
                | TrainError::Dataset { .. }
                | TrainError::Method(_)
                | TrainError::Diverged { .. }
        )
    }

    pub(crate) fn dataset(error: DatasetError) -> Self {
        TrainError::Dataset {
            errors: vec![error],
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Trains what `req` asks for. See the module docs. A Vision Mamba base trains on image
/// folders ([`images::load_folder`]) instead of JSONL.
pub fn run(req: &TrainRequest, obs: &mut dyn TrainObserver) -> Result<TrainOutcome, TrainError> {
    req.hyper.validate()?;
    if crate::model::family::detect_dir(&req.model_dir)? == crate::model::Family::Vim {
        return run_images(req, obs);
    }
    let tokenizer = Tokenizer::from_model_dir(&req.model_dir)?.ok_or_else(|| {
        TrainError::Method(format!(
            "{}: the base model has no tokenizer.json; training from text needs one",
            req.model_dir.display()
        ))
    })?;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: req.device.clone(),
    };
    let base = AnyLm::load(&req.model_dir, &opts)?;
    let (eos, pad) = special_tokens(base.eos_token_ids(), base.pad_token_id());
    let enc = data::Encoder {
        tokenizer: &tokenizer,
        max_len: req.hyper.max_seq_length as usize,
        eos,
    };
    let train = data::load(&req.train_file, None, &enc)?;
    let validation = match &req.validation_file {
        Some(p) => Some(data::load(p, Some(train.kind), &enc)?),
        None => None,
    };

    let data = match &req.validation_file {
        Some(v) => vec![
            ("training file", file_sha256(&req.train_file)?),
            ("validation file", file_sha256(v)?),
        ],
        None => vec![("training file", file_sha256(&req.train_file)?)],
    };
    let fingerprint = fingerprint(req, base.config_json().to_string(), data)?;
    train_adapter(
        req,
        &base,
        TrainSet::Tokens { data: &train, pad },
        validation
            .as_ref()
            .map(|data| TrainSet::Tokens { data, pad }),
        fingerprint,
        obs,
    )
}

/// The part of [`run`] every family shares: the adapter (fresh, or from the checkpoint when
/// resuming), the loop, the outcome.
fn train_adapter<M: PeftModel + HasTask>(
    req: &TrainRequest,
    base: &M,
    train: TrainSet<'_>,
    validation: Option<TrainSet<'_>>,
    fingerprint: BTreeFingerprint,
    obs: &mut dyn TrainObserver,
) -> Result<TrainOutcome, TrainError> {
    let resume = if req.resume {
        Some(engine::find_checkpoint(&req.checkpoint_dir)?)
    } else {
        None
    };
    let trainable = AdapterTrainable::new(
        &req.method,
        base,
        req.seed,
        resume.as_ref().map(|r| r.0.as_path()),
    )?;
    let end = engine::train(
        &trainable,
        LoopConfig {
            hyper: &req.hyper,
            seed: req.seed,
            train,
            validation,
            device: req.device.clone(),
            checkpoint_dir: Some(&req.checkpoint_dir),
            out_dir: &req.out_dir,
            fingerprint,
            resume: resume.map(|r| r.1),
        },
        obs,
    )?;
    Ok(if end.stopped {
        TrainOutcome::Stopped {
            step: end.step,
            tokens_seen: end.tokens_seen,
        }
    } else {
        TrainOutcome::Finished {
            steps: end.step,
            tokens_seen: end.tokens_seen,
            train_loss: end.last_loss,
            validation_loss: end.validation.map(|v| v.loss),
            validation_accuracy: end.validation.and_then(|v| v.accuracy),
            validation_top5_accuracy: end.validation.and_then(|v| v.top5_accuracy),
            out_dir: req.out_dir.clone(),
        }
    })
}

/// [`run`] for a Vision Mamba: `train_file` / `validation_file` are image datasets (an image
/// folder, a zip / tar / tar.gz of one, or image JSONL: [`images::source`]); the head is built
/// for the training data's classes (a fresh zero head when the checkpoint's has another
/// size). A training file with `train/` and `val/` splits validates on its `val/` split when
/// no validation file is given; validation runs every epoch unless `eval_every` says otherwise.
fn run_images(req: &TrainRequest, obs: &mut dyn TrainObserver) -> Result<TrainOutcome, TrainError> {
    use crate::model::vim::{EvalTransform, VimCheckpoint, VimLoadOptions};
    use images::Role;
    let scratch = images::Scratch::new()?;
    let train_scan = images::scan(&req.train_file, &scratch.sub("training")?)?;
    let classes = train_scan.classes.clone();
    let opts = VimLoadOptions {
        load: LoadOptions {
            dtype: DType::F32,
            device: req.device.clone(),
        },
        num_classes: Some(classes.len()),
        ..VimLoadOptions::default()
    };
    let base = VimCheckpoint::load(&req.model_dir, &opts)?.into_frozen()?;
    let transform = EvalTransform::for_image_size(base.config.img_size);
    let train = images::open(
        &train_scan,
        Role::Training,
        &classes,
        &transform,
        &req.train_file,
    )?;
    let mut data = vec![(
        "training images",
        train_scan
            .sha256(&req.train_file)
            .map_err(TrainError::dataset)?,
    )];
    let validation = match &req.validation_file {
        Some(v) => {
            let scan = images::scan(v, &scratch.sub("validation")?)?;
            data.push((
                "validation images",
                scan.sha256(v).map_err(TrainError::dataset)?,
            ));
            Some(images::open(
                &scan,
                Role::Validation,
                &classes,
                &transform,
                v,
            )?)
        }
        None if !train_scan.validation.is_empty() => Some(images::open(
            &train_scan,
            Role::Validation,
            &classes,
            &transform,
            &req.train_file,
        )?),
        None => None,
    };
    let config =
        serde_json::to_string(&base.config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let fingerprint = fingerprint(req, config, data)?;
    let mut req = req.clone();
    req.hyper.validate_every_epoch(train.len());
    let req = &req;
    let outcome = train_adapter(
        req,
        &base,
        TrainSet::Images(&train),
        validation.as_ref().map(TrainSet::Images),
        fingerprint,
        obs,
    )?;
    if let TrainOutcome::Finished { out_dir, .. } = &outcome {
        images::write_classes(out_dir, &classes)?;
    }
    Ok(outcome)
}

/// The end-of-sequence token appended to texts and completions, and the padding id (any
/// valid id works: padded positions are never scored and come after every real token).
pub fn special_tokens(eos_token_ids: &[u32], pad_token_id: Option<u32>) -> (Option<u32>, u32) {
    let eos = eos_token_ids.first().copied();
    let pad = pad_token_id.or(eos).unwrap_or(0);
    (eos, pad)
}

/// A PEFT adapter on a frozen base of any family: what [`run`] trains.
pub struct AdapterTrainable<M = MambaForCausalLM> {
    adapter: Adapter,
    model: M,
}

/// A model family's task, as the training loop sees it.
pub trait HasTask {
    fn task(&self) -> TaskModel<'_>;
}

impl<M: crate::model::Mixer> HasTask for crate::model::CausalLm<M> {
    fn task(&self) -> TaskModel<'_> {
        TaskModel::CausalLm(self)
    }
}

impl HasTask for AnyLm {
    fn task(&self) -> TaskModel<'_> {
        TaskModel::CausalLm(self)
    }
}

impl HasTask for crate::model::vim::VimForImageClassification {
    fn task(&self) -> TaskModel<'_> {
        TaskModel::Classifier(self)
    }
}

impl<M: PeftModel + HasTask> AdapterTrainable<M> {
    /// A fresh adapter (initialised from `seed`), or the one saved in `resume_from`. Dropout
    /// masks are drawn from a seed derived from `seed` and a counter the checkpoint keeps.
    pub fn new(
        spec: &AdapterSpec,
        base: &M,
        seed: u64,
        resume_from: Option<&Path>,
    ) -> Result<Self, TrainError> {
        spec.validate(base.peft_shape()).map_err(method_error)?;
        let adapter = match resume_from {
            None => Adapter::init(spec, base, seed).map_err(method_error)?,
            Some(dir) => {
                let a = Adapter::load(dir, base).map_err(|e| TrainError::Checkpoint {
                    dir: dir.to_path_buf(),
                    reason: e.to_string(),
                })?;
                if a.spec() != spec {
                    return Err(TrainError::Checkpoint {
                        dir: dir.to_path_buf(),
                        reason: "its adapter has a different method config".into(),
                    });
                }
                a
            }
        };
        adapter.set_dropout_seed(engine::order_seed(seed, u32::MAX));
        let model = adapter.apply(base).map_err(method_error)?;
        Ok(AdapterTrainable { adapter, model })
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }
}

/// A spec the model cannot take is the request's fault; anything else from PEFT (tensors,
/// files) is reported as is.
fn method_error(e: PeftError) -> TrainError {
    TrainError::Method(e.to_string())
}

impl<M: PeftModel + HasTask> Trainable for AdapterTrainable<M> {
    fn task_model(&self) -> TaskModel<'_> {
        self.model.task()
    }

    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError> {
        Ok(self.adapter.param_groups())
    }

    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        self.adapter.save(dir).map_err(|e| TrainError::Checkpoint {
            dir: dir.to_path_buf(),
            reason: format!("saving the adapter: {e}"),
        })
    }

    fn set_training(&self, on: bool) {
        self.adapter.set_training(on);
    }

    fn rng_counter(&self) -> u64 {
        self.adapter.dropout_counter()
    }

    fn set_rng_counter(&self, counter: u64) {
        self.adapter.set_dropout_counter(counter);
    }
}

/// Hashes of everything the numbers of a run depend on (see `engine::check_resume`).
/// `config` is the base model's config as JSON, `data` a hash per dataset.
fn fingerprint(
    req: &TrainRequest,
    config: String,
    data: Vec<(&str, String)>,
) -> Result<BTreeFingerprint, TrainError> {
    let mut fp = BTreeFingerprint::new();
    let hex = |bytes: &[u8]| hex::encode(Sha256::digest(bytes));
    fp.insert("base model config".into(), hex(config.as_bytes()));
    fp.insert(
        "method".into(),
        hex(req.method.to_value().to_string().as_bytes()),
    );
    // Validation and checkpoint frequency do not change the trained numbers, so a resumed
    // run may change them.
    let mut h = req.hyper.clone();
    h.eval_every = 0;
    h.checkpoint_every = 0;
    let hj = serde_json::to_string(&h).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    fp.insert("hyperparameters".into(), hex(hj.as_bytes()));
    fp.insert("seed".into(), req.seed.to_string());
    for (name, hash) in data {
        fp.insert(name.into(), hash);
    }
    Ok(fp)
}

fn file_sha256(path: &Path) -> Result<String, TrainError> {
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| TrainError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
