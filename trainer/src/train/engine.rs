//! The training loop: epochs of seeded-shuffled micro-batches, gradient accumulation,
//! clipping, AdamW, validation, checkpoints and exact resume.
//!
//! The loop knows nothing of PEFT: it trains anything that is a [`Trainable`] (a model whose
//! trainable tensors come in parameter groups, and a way to save them). It reaches the model
//! families through their task ([`TaskModel`]): next-token loss on token sequences for a
//! language model, cross-entropy on labelled images for a classifier ([`TrainSet`]). For
//! images, "tokens" in the events and checkpoints count images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::data::{Batch, ChoiceExample, DatasetKind, Tokenized, collate};
use super::images::{ImageBatch, ImageSet};
use super::optim::{self, AdamW, Grads, ParamGroup};
use super::schedule::Schedule;
use super::{Control, Hyperparameters, TrainError, TrainEvent, TrainObserver};
use crate::model::vim::{Mode, VimForImageClassification, classification_loss};
use crate::model::{LanguageModel, ModelInput, causal_lm_loss};
use crate::peft::InitialState;

/// The model a trainable trains, by task.
#[derive(Clone, Copy)]
pub enum TaskModel<'a> {
    CausalLm(&'a dyn LanguageModel),
    Classifier(&'a VimForImageClassification),
}

impl TaskModel<'_> {
    fn name(&self) -> &'static str {
        match self {
            TaskModel::CausalLm(_) => "a language model",
            TaskModel::Classifier(_) => "an image classifier",
        }
    }
}

/// A training or validation set of some task.
#[derive(Clone, Copy)]
pub enum TrainSet<'a> {
    /// Token sequences, right-padded with `pad` in a batch.
    Tokens {
        data: &'a Tokenized,
        pad: u32,
    },
    Images(&'a ImageSet),
}

impl TrainSet<'_> {
    pub fn len(&self) -> usize {
        match self {
            TrainSet::Tokens { data, .. } => data.examples.len(),
            TrainSet::Images(set) => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kind(&self) -> DatasetKind {
        match self {
            TrainSet::Tokens { data, .. } => data.kind,
            TrainSet::Images(_) => DatasetKind::Images,
        }
    }

    /// Source records (for multiple choice the sets, for images the images).
    pub fn records(&self) -> usize {
        match self {
            TrainSet::Tokens { data, .. } => data.records,
            TrainSet::Images(set) => set.len(),
        }
    }

    /// The micro-batch of examples `idx`; `seed` draws its drop-path masks (images).
    pub fn collate(
        &self,
        idx: &[usize],
        device: &Device,
        seed: u64,
    ) -> Result<MicroBatch, TrainError> {
        Ok(match self {
            TrainSet::Tokens { data, pad } => {
                let exs: Vec<_> = idx.iter().map(|&i| &data.examples[i]).collect();
                MicroBatch::Tokens(collate(&exs, *pad, device)?)
            }
            TrainSet::Images(set) => MicroBatch::Images(set.collate(idx, device)?, seed),
        })
    }
}

/// One micro-batch of a training step.
pub enum MicroBatch {
    Tokens(Batch),
    /// With the seed of its drop-path masks.
    Images(ImageBatch, u64),
}

impl MicroBatch {
    /// Its weight in the step's mean loss: scored tokens, or images.
    fn weight(&self) -> usize {
        match self {
            MicroBatch::Tokens(b) => b.scored,
            MicroBatch::Images(b, _) => b.labels.dims().first().copied().unwrap_or(0),
        }
    }

    /// Real tokens, or images (throughput).
    fn units(&self) -> u64 {
        match self {
            MicroBatch::Tokens(b) => b.tokens as u64,
            MicroBatch::Images(..) => self.weight() as u64,
        }
    }

    /// The mean loss of this micro-batch under `model`.
    fn loss(&self, model: TaskModel<'_>) -> Result<Tensor, TrainError> {
        match (model, self) {
            (TaskModel::CausalLm(m), MicroBatch::Tokens(b)) => {
                let logits = m.forward(&b.input_ids, None)?;
                Ok(causal_lm_loss(&logits, &b.labels)?)
            }
            (TaskModel::Classifier(m), MicroBatch::Images(b, seed)) => {
                let logits = m.forward(&b.pixels, Mode::Train { seed: *seed }, None)?;
                Ok(classification_loss(&logits, &b.labels)?)
            }
            (model, _) => Err(TrainError::Method(format!(
                "{} cannot train on this dataset's kind of examples",
                model.name()
            ))),
        }
    }
}

/// What the loop trains.
pub trait Trainable {
    /// The model whose forward uses the trainable tensors.
    fn task_model(&self) -> TaskModel<'_>;
    /// The trainable tensors, grouped by optimizer setting. Called once per run.
    fn param_groups(&self) -> Result<Vec<ParamGroup>, TrainError>;
    /// Writes the trained tensors to `dir` (which exists).
    fn save(&self, dir: &Path) -> Result<(), TrainError>;
    /// Switches dropout (where the method has any) on for training steps, off for
    /// validation.
    fn set_training(&self, on: bool) {
        let _ = on;
    }
    /// The position of the method's random stream (dropout masks are drawn from a seed and
    /// this counter), saved in checkpoints so a resumed run draws the same masks.
    fn rng_counter(&self) -> u64 {
        0
    }
    fn set_rng_counter(&self, counter: u64) {
        let _ = counter;
    }
}

/// `trainer_state.json` in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Bumped when the meaning of a field changes; older checkpoints are refused.
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// The epoch the next step belongs to (0-based) and the number of micro-batches of its
    /// shuffled order already consumed. Derivable from `step`, recorded for humans and
    /// checked on resume.
    pub epoch: u32,
    pub micro_batches_done: u64,
    /// The data order of epoch e is a shuffle by `StdRng::seed_from_u64(order_seed(seed,
    /// e))`: the whole "RNG state" is the seed and the epoch.
    pub seed: u64,
    pub tokens_seen: u64,
    /// The trainable's random-stream position ([`Trainable::rng_counter`]).
    pub rng_counter: u64,
    pub last_loss: Option<f64>,
    /// What the run was started with; a resume with anything else is refused.
    pub fingerprint: BTreeFingerprint,
}

/// Hashes of what a run depends on, by name, so a mismatch can be named.
pub type BTreeFingerprint = std::collections::BTreeMap<String, String>;

const STATE_FORMAT: u32 = 1;
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The seed of epoch `epoch`'s shuffle: the run seed mixed with the epoch by a SplitMix64
/// round, so nearby seeds and epochs give unrelated orders.
pub fn order_seed(seed: u64, epoch: u32) -> u64 {
    let mut z = seed ^ (u64::from(epoch).wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The example order of one epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(order_seed(seed, epoch)));
    idx
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The token-weighted mean loss over the step's micro-batches.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens in the step's micro-batches.
    pub tokens: u64,
}

/// One optimizer step over its micro-batches: forward, loss, backward and gradient
/// accumulation per micro-batch, then global-norm clipping and the AdamW update scaled by
/// `lr_factor`. `step` (1-based) only names the step in a divergence error. The loop and
/// `molt bench` both train through this, so the benchmark measures the real step.
pub fn optimizer_step(
    trainable: &dyn Trainable,
    opt: &mut AdamW,
    batches: &[MicroBatch],
    max_grad_norm: f64,
    lr_factor: f64,
    step: u64,
) -> Result<StepStats, TrainError> {
    let model = trainable.task_model();
    let scored: usize = batches.iter().map(MicroBatch::weight).sum();
    let mut grads: Grads = Vec::new();
    let mut loss_sum = 0f64;
    let mut tokens = 0u64;
    trainable.set_training(true);
    for b in batches {
        let mean = b.loss(model)?;
        // Token-weighted over the whole optimizer step, so k micro-batches of b examples
        // give the gradient of one batch of k·b (up to float rounding).
        let weight = b.weight() as f64 / scored as f64;
        let scaled = (mean * weight)?;
        loss_sum += f64::from(scaled.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let store = scaled.backward()?;
        optim::accumulate(&mut grads, opt.grads_from(&store))?;
        tokens += b.units();
    }
    trainable.set_training(false);
    if !loss_sum.is_finite() {
        return Err(TrainError::Diverged {
            step,
            what: format!("the loss ({loss_sum})"),
        });
    }
    let grad_norm = optim::clip_grad_norm(&mut grads, max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(TrainError::Diverged {
            step,
            what: format!("the gradient norm ({grad_norm})"),
        });
    }
    opt.step(&grads, lr_factor)?;
    Ok(StepStats {
        loss: loss_sum,
        grad_norm,
        tokens,
    })
}

/// Everything the loop needs besides the trainable.
pub struct LoopConfig<'a> {
    pub hyper: &'a Hyperparameters,
    pub seed: u64,
    pub train: TrainSet<'a>,
    pub validation: Option<TrainSet<'a>>,
    pub device: Device,
    pub checkpoint_dir: Option<&'a Path>,
    pub out_dir: &'a Path,
    pub fingerprint: BTreeFingerprint,
    /// A checkpoint's state when resuming (its tensors are already loaded into the
    /// trainable); its optimizer moments are read from `checkpoint_dir`.
    pub resume: Option<TrainerState>,
}

/// The result of a finished loop.
pub struct LoopEnd {
    pub stopped: bool,
    pub step: u64,
    pub tokens_seen: u64,
    pub last_loss: Option<f64>,
    pub validation: Option<Evaluation>,
}

/// One validation pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean token loss, or mean cross-entropy per image.
    pub loss: f64,
    /// Multiple choice and classification: the fraction predicted right.
    pub accuracy: Option<f64>,
    /// Classification with more than 5 classes: the fraction whose label is among the 5
    /// highest logits.
    pub top5_accuracy: Option<f64>,
}

/// Runs the loop. Emits `Started` … `Finished` (the caller's out_dir receives the trained
/// tensors through [`Trainable::save`]).
pub fn train(
    trainable: &dyn Trainable,
    cfg: LoopConfig<'_>,
    obs: &mut dyn TrainObserver,
) -> Result<LoopEnd, TrainError> {
    let h = cfg.hyper;
    let n = cfg.train.len();
    let batch = h.batch_size as usize;
    let accum = h.gradient_accumulation_steps as usize;
    let batches_per_epoch = n.div_ceil(batch);
    let steps_per_epoch = h.steps_per_epoch(n);
    let total = steps_per_epoch * u64::from(h.n_epochs);
    let schedule = Schedule::new(h.lr_scheduler, h.warmup_for(total), total);

    let groups = trainable.param_groups()?;
    let groups = override_weight_decay(groups, h);
    let mut opt = AdamW::new(
        groups,
        h.learning_rate,
        h.adam_beta1,
        h.adam_beta2,
        h.adam_epsilon,
    )?;
    if opt.num_parameters() == 0 {
        return Err(TrainError::Method(
            "the method has no trainable parameters".into(),
        ));
    }

    let (mut step, mut tokens_seen, mut last_loss) = (0u64, 0u64, None);
    if let Some(state) = &cfg.resume {
        let dir = cfg.checkpoint_dir.unwrap_or(Path::new("."));
        check_resume(state, &cfg.fingerprint, total, dir)?;
        let path = dir.join(OPTIMIZER_FILE);
        let tensors = candle_core::safetensors::load(&path, &cfg.device).map_err(|e| {
            TrainError::Checkpoint {
                dir: dir.to_path_buf(),
                reason: format!("{OPTIMIZER_FILE}: {e}"),
            }
        })?;
        opt.load_state(&tensors, state.step)
            .map_err(|reason| TrainError::Checkpoint {
                dir: dir.to_path_buf(),
                reason,
            })?;
        trainable.set_rng_counter(state.rng_counter);
        step = state.step;
        tokens_seen = state.tokens_seen;
        last_loss = state.last_loss;
    }

    let ev = TrainEvent::Started {
        total_steps: total,
        start_step: step,
        n_epochs: h.n_epochs,
        train_examples: n,
        validation_examples: cfg.validation.map(|v| v.len()).unwrap_or(0),
        trainable_parameters: opt.num_parameters(),
        dataset_kind: cfg.train.kind(),
    };
    if obs.event(&ev) == Control::Stop {
        return Ok(stopped(step, tokens_seen, last_loss));
    }

    let model = trainable.task_model();
    let started = Instant::now();
    let start_step = step;
    let mut tokens_this_run = 0u64;
    let mut validation = None;
    let mut order: Option<(u32, Vec<usize>)> = None;
    while step < total {
        let epoch = (step / steps_per_epoch) as u32;
        let k = (step % steps_per_epoch) as usize;
        if order.as_ref().map(|o| o.0) != Some(epoch) {
            order = Some((epoch, epoch_order(n, cfg.seed, epoch)));
        }
        let Some((_, ord)) = order.as_ref() else {
            unreachable!("order is set just above")
        };
        let t0 = Instant::now();
        let first_mb = k * accum;
        let last_mb = ((k + 1) * accum).min(batches_per_epoch);
        let mut batches = Vec::with_capacity(last_mb - first_mb);
        for mb in first_mb..last_mb {
            let idx = &ord[mb * batch..((mb + 1) * batch).min(n)];
            // Drop-path masks from (seed, epoch, micro-batch): a resumed run draws the same.
            let mb_seed = order_seed(cfg.seed ^ (mb as u64).wrapping_mul(0x2545_F491), epoch);
            batches.push(cfg.train.collate(idx, &cfg.device, mb_seed)?);
        }
        // The next step's images decode on other threads while this one trains.
        if let TrainSet::Images(set) = cfg.train {
            let next = step + 1;
            if next < total {
                let (e, k) = (
                    (next / steps_per_epoch) as u32,
                    (next % steps_per_epoch) as usize,
                );
                let mb = k * accum;
                if e == epoch && mb < batches_per_epoch {
                    set.prefetch(&ord[mb * batch..((mb + 1) * batch).min(n)]);
                }
            }
        }
        step += 1;
        let factor = schedule.factor(step);
        let StepStats {
            loss: loss_sum,
            grad_norm,
            tokens,
        } = optimizer_step(trainable, &mut opt, &batches, h.max_grad_norm, factor, step)?;
        tokens_this_run += tokens;
        tokens_seen += tokens;
        last_loss = Some(loss_sum);

        let elapsed = started.elapsed().as_secs_f64();
        let done_here = (step - start_step) as f64;
        let ev = TrainEvent::Step {
            step,
            total_steps: total,
            epoch,
            loss: loss_sum,
            lr: opt.groups.first().map(|g| g.lr * factor).unwrap_or(0.0),
            grad_norm,
            tokens_seen,
            tokens_per_second: if elapsed > 0.0 {
                tokens_this_run as f64 / elapsed
            } else {
                0.0
            },
            step_seconds: t0.elapsed().as_secs_f64(),
            eta_seconds: elapsed / done_here * (total - step) as f64,
        };
        if obs.event(&ev) == Control::Stop {
            return Ok(stopped(step, tokens_seen, last_loss));
        }

        if let Some(v) = cfg.validation
            && h.eval_every > 0
            && step % h.eval_every == 0
            && step < total
        {
            let e = evaluate_set(model, v, batch, &cfg.device)?;
            validation = Some(e);
            let ev = validation_event(step, e, v.records());
            if obs.event(&ev) == Control::Stop {
                return Ok(stopped(step, tokens_seen, last_loss));
            }
        }

        if let Some(dir) = cfg.checkpoint_dir
            && h.checkpoint_every > 0
            && step % h.checkpoint_every == 0
            && step < total
        {
            let micro_done = ((step % steps_per_epoch) as usize * accum) as u64;
            let state = TrainerState {
                format: STATE_FORMAT,
                step,
                total_steps: total,
                epoch: (step / steps_per_epoch) as u32,
                micro_batches_done: micro_done,
                seed: cfg.seed,
                tokens_seen,
                rng_counter: trainable.rng_counter(),
                last_loss,
                fingerprint: cfg.fingerprint.clone(),
            };
            write_checkpoint(dir, trainable, &opt, &state)?;
            let ev = TrainEvent::Checkpoint {
                step,
                dir: dir.to_path_buf(),
            };
            if obs.event(&ev) == Control::Stop {
                return Ok(stopped(step, tokens_seen, last_loss));
            }
        }
    }

    if let Some(v) = cfg.validation {
        let e = evaluate_set(model, v, batch, &cfg.device)?;
        validation = Some(e);
        let ev = validation_event(step, e, v.records());
        if obs.event(&ev) == Control::Stop {
            return Ok(stopped(step, tokens_seen, last_loss));
        }
    }
    save_to(cfg.out_dir, trainable)?;
    let ev = TrainEvent::Finished {
        step,
        tokens_seen,
        train_loss: last_loss,
        out_dir: cfg.out_dir.to_path_buf(),
    };
    // The run is complete: a Stop now has nothing left to stop.
    let _ = obs.event(&ev);
    Ok(LoopEnd {
        stopped: false,
        step,
        tokens_seen,
        last_loss,
        validation,
    })
}

fn stopped(step: u64, tokens_seen: u64, last_loss: Option<f64>) -> LoopEnd {
    LoopEnd {
        stopped: true,
        step,
        tokens_seen,
        last_loss,
        validation: None,
    }
}

/// The job-level `weight_decay`, when set, replaces the decay of every group that decays;
/// groups with decay 0 are the spec's exemptions (A_log additions, norms, biases, ...) and
/// stay at 0.
fn override_weight_decay(groups: Vec<ParamGroup>, h: &Hyperparameters) -> Vec<ParamGroup> {
    let Some(wd) = h.weight_decay else {
        return groups;
    };
    groups
        .into_iter()
        .map(|mut g| {
            if g.weight_decay > 0.0 {
                g.weight_decay = wd;
            }
            g
        })
        .collect()
}

fn validation_event(step: u64, e: Evaluation, examples: usize) -> TrainEvent {
    TrainEvent::Validation {
        step,
        loss: e.loss,
        accuracy: e.accuracy,
        top5_accuracy: e.top5_accuracy,
        examples,
    }
}

/// Validation of any task: see [`evaluate`] (token sequences) and [`evaluate_images`].
pub fn evaluate_set(
    model: TaskModel<'_>,
    data: TrainSet<'_>,
    batch: usize,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    match (model, data) {
        (TaskModel::CausalLm(m), TrainSet::Tokens { data, pad }) => {
            let (loss, accuracy) = evaluate(m, data, batch, pad, device)?;
            Ok(Evaluation {
                loss,
                accuracy,
                top5_accuracy: None,
            })
        }
        (TaskModel::Classifier(m), TrainSet::Images(set)) => evaluate_images(m, set, batch, device),
        (model, _) => Err(TrainError::Method(format!(
            "{} cannot be validated on this dataset's kind of examples",
            model.name()
        ))),
    }
}

/// Image validation (evaluation mode): the mean cross-entropy, the top-1 accuracy, and with
/// more than 5 classes the top-5 accuracy. Batches are decoded one ahead.
pub fn evaluate_images(
    model: &VimForImageClassification,
    set: &ImageSet,
    batch: usize,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let (mut loss, mut top1, mut top5) = (0f64, 0usize, 0usize);
    let idx: Vec<usize> = (0..set.len()).collect();
    let chunks: Vec<&[usize]> = idx.chunks(batch.max(1)).collect();
    for (k, chunk) in chunks.iter().enumerate() {
        let b = set.collate(chunk, device)?;
        if let Some(next) = chunks.get(k + 1) {
            set.prefetch(next);
        }
        let logits = model.forward(&b.pixels, Mode::Eval, None)?;
        let mean = classification_loss(&logits, &b.labels)?;
        loss += f64::from(mean.to_dtype(DType::F32)?.to_scalar::<f32>()?) * chunk.len() as f64;
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let want = b.labels.to_vec1::<u32>()?;
        for (row, &w) in rows.iter().zip(&want) {
            let rank = rank_of(row, w as usize);
            top1 += usize::from(rank == 0);
            top5 += usize::from(rank < 5);
        }
    }
    let n = set.len().max(1) as f64;
    Ok(Evaluation {
        loss: loss / n,
        accuracy: Some(top1 as f64 / n),
        top5_accuracy: (set.num_classes() > 5).then_some(top5 as f64 / n),
    })
}

/// How many classes score above `label` (ties count for the label, as argmax takes the first
/// of equal maxima: only higher ones, and equal ones earlier in the row).
fn rank_of(row: &[f32], label: usize) -> usize {
    let v = row.get(label).copied().unwrap_or(f32::NEG_INFINITY);
    row.iter()
        .enumerate()
        .filter(|(j, x)| **x > v || (**x == v && *j < label))
        .count()
}

/// Validation: the mean token loss over `data`, and for multiple choice the accuracy of
/// picking the choice with the highest summed log-likelihood.
pub fn evaluate(
    model: &dyn LanguageModel,
    data: &Tokenized,
    batch: usize,
    pad: u32,
    device: &Device,
) -> Result<(f64, Option<f64>), TrainError> {
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in data.examples.chunks(batch.max(1)) {
        let exs: Vec<_> = chunk.iter().collect();
        let b = collate(&exs, pad, device)?;
        let (sums, counts) = sequence_logprobs(model, &b, None)?;
        total += sums.iter().sum::<f64>();
        count += counts.iter().sum::<usize>();
    }
    let loss = if count > 0 {
        -total / count as f64
    } else {
        f64::NAN
    };
    if data.choice_sets.is_empty() {
        return Ok((loss, None));
    }
    let scores = score_choice_sets(model, &data.choice_sets, batch, pad, device, None)?;
    let correct = data
        .choice_sets
        .iter()
        .zip(&scores)
        .filter(|(set, sc)| {
            let sums: Vec<f64> = sc.iter().map(|s| s.0).collect();
            argmax(&sums) == Some(set.label)
        })
        .count();
    Ok((loss, Some(correct as f64 / data.choice_sets.len() as f64)))
}

/// Per set, per choice: the summed log-likelihood of the choice's tokens given the context,
/// and how many tokens were scored. Every choice of every set runs in batches of `batch`
/// sequences (right-padded; padding is not scored).
pub fn score_choice_sets(
    model: &dyn LanguageModel,
    sets: &[ChoiceExample],
    batch: usize,
    pad: u32,
    device: &Device,
    initial_state: Option<&InitialState>,
) -> Result<Vec<Vec<(f64, usize)>>, TrainError> {
    let flat: Vec<(usize, usize)> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.choices.len()).map(move |c| (i, c)))
        .collect();
    let mut scores: Vec<Vec<(f64, usize)>> = sets
        .iter()
        .map(|s| vec![(f64::NEG_INFINITY, 0); s.choices.len()])
        .collect();
    for chunk in flat.chunks(batch.max(1)) {
        let exs: Vec<_> = chunk.iter().map(|&(i, c)| &sets[i].choices[c]).collect();
        let b = collate(&exs, pad, device)?;
        let (sums, counts) = sequence_logprobs(model, &b, initial_state)?;
        for ((&(i, c), s), n) in chunk.iter().zip(sums).zip(counts) {
            scores[i][c] = (s, n);
        }
    }
    Ok(scores)
}

/// The first index of the maximum (ties go to the earlier choice, as numpy's argmax).
pub fn argmax(v: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &x) in v.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|b| b.0)
}

/// Per sequence of a batch: the summed log-probability of its scored labels, and how many
/// there are. With an initial state (a merged prefix prompt), every sequence starts from it.
pub fn sequence_logprobs(
    model: &dyn LanguageModel,
    b: &Batch,
    initial_state: Option<&InitialState>,
) -> Result<(Vec<f64>, Vec<usize>), TrainError> {
    let logits = match initial_state {
        Some(s) => {
            let mut cache = s
                .to_cache(b.input_ids.dim(0)?, model.dtype())
                .map_err(|e| TrainError::Method(format!("initial state: {e}")))?;
            let input = ModelInput::new(&b.input_ids, None, model.vocab_size())?;
            model.forward_from(&input, &mut cache)?
        }
        None => model.forward(&b.input_ids, None)?,
    }
    .detach();
    let (bs, t, v) = logits.dims3()?;
    let labels: Vec<i64> = b.labels.flatten_all()?.to_vec1::<i64>()?;
    let flat = logits
        .narrow(1, 0, t - 1)?
        .to_dtype(DType::F32)?
        .reshape((bs * (t - 1), v))?;
    let max = flat.max_keepdim(D::Minus1)?;
    let shifted = flat.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let mut targets = Vec::with_capacity(bs * (t - 1));
    let mut keep = Vec::with_capacity(bs * (t - 1));
    for r in 0..bs {
        for p in 1..t {
            let y = labels[r * t + p];
            let scored = y >= 0 && (y as usize) < v;
            targets.push(if scored { y as u32 } else { 0 });
            keep.push(scored);
        }
    }
    let targets = Tensor::from_vec(targets, (bs * (t - 1), 1), logits.device())?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let mut sums = vec![0f64; bs];
    let mut counts = vec![0usize; bs];
    for (i, (lp, k)) in picked.iter().zip(&keep).enumerate() {
        if *k {
            sums[i / (t - 1)] += f64::from(*lp);
            counts[i / (t - 1)] += 1;
        }
    }
    Ok((sums, counts))
}

/// Refuses a checkpoint from another run or another format.
fn check_resume(
    state: &TrainerState,
    fingerprint: &BTreeFingerprint,
    total: u64,
    dir: &Path,
) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        reason,
    };
    if state.format != STATE_FORMAT {
        return Err(bad(format!(
            "{STATE_FILE} has format {}, this build reads format {STATE_FORMAT}",
            state.format
        )));
    }
    for (k, v) in fingerprint {
        match state.fingerprint.get(k) {
            Some(w) if w == v => {}
            _ => {
                return Err(bad(format!(
                    "it was written by a run with a different {k}; resume only with the \
                     same model, method, data, seed and hyperparameters"
                )));
            }
        }
    }
    if state.total_steps != total || state.step > total {
        return Err(bad(format!(
            "it is at step {} of {}, but this run has {total} steps",
            state.step, state.total_steps
        )));
    }
    Ok(())
}

/// Reads a checkpoint's state; falls back to the previous checkpoint kept while a new one
/// was being swapped in (a crash between the two renames of `write_checkpoint`).
pub fn find_checkpoint(dir: &Path) -> Result<(PathBuf, TrainerState), TrainError> {
    let mut candidates = vec![dir.to_path_buf()];
    if let Some(old) = sibling(dir, "old") {
        candidates.push(old);
    }
    for d in candidates {
        let p = d.join(STATE_FILE);
        if !p.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
                dir: d.clone(),
                reason: format!("{STATE_FILE}: {e}"),
            })?;
        return Ok((d, state));
    }
    Err(TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        reason: format!("resume was requested but there is no {STATE_FILE} here"),
    })
}

/// `dir` with `.{suffix}` appended to its last component.
fn sibling(dir: &Path, suffix: &str) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(dir.with_file_name(format!("{name}.{suffix}")))
}

/// Writes a complete checkpoint beside `dir`, then swaps it in, so `dir` only ever holds a
/// whole checkpoint (the state file, written last, marks it complete).
fn write_checkpoint(
    dir: &Path,
    trainable: &dyn Trainable,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<(), TrainError> {
    let tmp = sibling(dir, "tmp").ok_or_else(|| TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        reason: "the checkpoint folder needs a name".into(),
    })?;
    let old = sibling(dir, "old").ok_or_else(|| TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        reason: "the checkpoint folder needs a name".into(),
    })?;
    remove_dir(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    trainable.save(&tmp)?;
    let opt_path = tmp.join(OPTIMIZER_FILE);
    let tensors: HashMap<String, Tensor> = opt.state_tensors();
    candle_core::safetensors::save(&tensors, &opt_path)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
        dir: tmp.clone(),
        reason: e.to_string(),
    })?;
    let sp = tmp.join(STATE_FILE);
    std::fs::write(&sp, json).map_err(|e| TrainError::io(&sp, e))?;
    remove_dir(&old)?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    remove_dir(&old)?;
    Ok(())
}

fn remove_dir(p: &Path) -> Result<(), TrainError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrainError::io(p, e)),
    }
}

/// Saves the final tensors into `out_dir` (created if needed; files of the same names are
/// overwritten, nothing else there is touched).
fn save_to(out_dir: &Path, trainable: &dyn Trainable) -> Result<(), TrainError> {
    std::fs::create_dir_all(out_dir).map_err(|e| TrainError::io(out_dir, e))?;
    trainable.save(out_dir)
}

#[cfg(test)]
mod tests {
    use super::rank_of;

    /// Top-k membership is `rank_of(..) < k`: classes scoring higher count, ties count for
    /// the label only when earlier in the row (argmax's choice).
    #[test]
    fn rank_counts_higher_scores_and_earlier_ties() {
        let row = [0.1f32, 3.0, 2.0, 2.0, -1.0, 5.0, 0.0];
        assert_eq!(rank_of(&row, 5), 0);
        assert_eq!(rank_of(&row, 1), 1);
        assert_eq!(rank_of(&row, 2), 2);
        assert_eq!(
            rank_of(&row, 3),
            3,
            "the tie with class 2 counts against class 3"
        );
        assert_eq!(rank_of(&row, 4), 6);
        // Top-5 holds classes 5, 1, 2, 3, 0; not 6 or 4.
        let top5: Vec<usize> = (0..row.len()).filter(|&c| rank_of(&row, c) < 5).collect();
        assert_eq!(top5, [0, 1, 2, 3, 5]);
    }
}
