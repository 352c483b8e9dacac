//! `molt train` (fine-tune a base model with a PEFT method on a local JSONL file, or a Vision
//! Mamba on an image folder) and
//! `molt pretrain` (train a small Mamba and its tokenizer from random initialisation on a
//! plain-text corpus: how `models/demo` is made). Both print one progress line per step.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use trainer::peft::AdapterSpec;
use trainer::train::{
    Control, Hyperparameters, LrScheduler, PretrainRequest, TrainEvent, TrainOutcome, TrainRequest,
    pretrain, run,
};

/// Hyperparameter flags shared by both commands. Absent flags keep the defaults of
/// `trainer::train::Hyperparameters` (or of `--hyper`).
#[derive(clap::Args, Debug, Clone)]
pub struct HyperArgs {
    /// Hyperparameters as JSON (or @file.json); the flags below override its fields.
    #[arg(long)]
    pub hyper: Option<String>,
    /// Passes over the training set.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Examples per micro-batch.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Peak learning rate (for methods that do not set their own).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warm-up as a fraction of all steps (instead of --warmup-steps).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Schedule after warm-up.
    #[arg(long, value_enum)]
    pub scheduler: Option<Scheduler>,
    /// Tokens per example (longer ones are truncated; long texts are split).
    #[arg(long)]
    pub max_seq_length: Option<u32>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<u32>,
    /// AdamW weight decay for every parameter group that decays.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping (0 = off).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Validate every N steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

impl HyperArgs {
    fn resolve(&self, base: Hyperparameters) -> Result<Hyperparameters> {
        let mut h = match &self.hyper {
            Some(s) => serde_json::from_str(&read_arg(s)?)
                .context("--hyper is not valid hyperparameters")?,
            None => base,
        };
        if let Some(v) = self.epochs {
            h.n_epochs = v;
        }
        if let Some(v) = self.batch_size {
            h.batch_size = v;
        }
        if let Some(v) = self.lr {
            h.learning_rate = v;
        }
        if let Some(v) = self.warmup_steps {
            h.warmup_steps = v;
        }
        if let Some(v) = self.warmup_ratio {
            h.warmup_ratio = v;
        }
        if let Some(v) = self.scheduler {
            h.lr_scheduler = match v {
                Scheduler::Constant => LrScheduler::Constant,
                Scheduler::Linear => LrScheduler::Linear,
                Scheduler::Cosine => LrScheduler::Cosine,
            };
        }
        if let Some(v) = self.max_seq_length {
            h.max_seq_length = v;
        }
        if let Some(v) = self.grad_accum {
            h.gradient_accumulation_steps = v;
        }
        if let Some(v) = self.weight_decay {
            h.weight_decay = Some(v);
        }
        if let Some(v) = self.max_grad_norm {
            h.max_grad_norm = v;
        }
        if let Some(v) = self.eval_every {
            h.eval_every = v;
        }
        h.validate()?;
        Ok(h)
    }
}

/// `JSON` or `@file`.
fn read_arg(s: &str) -> Result<String> {
    match s.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}")),
        None => Ok(s.to_string()),
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Base model folder: config.json, weights, tokenizer.json (a language model), or a
    /// Vision Mamba's config.json and weights.
    #[arg(long, env = "MOLT_MODEL")]
    pub model: PathBuf,
    /// Training data. A language model: JSONL, {"text"}, {"prompt","completion"} or
    /// {"context","choices","label"} per line. A Vision Mamba: an image folder with one
    /// subfolder per class (sorted names are the classes; png, jpg, jpeg, webp).
    #[arg(long)]
    pub train: PathBuf,
    /// Validation data in the same format (loss, and accuracy for multiple choice and
    /// images; an image folder must have the training folder's classes).
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// The PEFT method as JSON or @file.json, e.g. '{"type": "lora", "targets": "in_proj",
    /// "r": 8}'.
    #[arg(long)]
    pub method: String,
    /// Where the adapter goes (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Checkpoint every N steps into --checkpoint-dir (0 = never).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Where checkpoints go (default: OUT/checkpoint).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint-dir.
    #[arg(long)]
    pub resume: bool,
    /// Seeds the adapter's initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print events as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let method = AdapterSpec::from_json_str(&read_arg(&args.method)?).context("--method")?;
    // A vision model defaults to the papers' vision recipe (peft-spec §6.1).
    let vision = trainer::model::family::detect_dir(&args.model)
        .is_ok_and(|f| f.task() == trainer::model::Task::ImageClassification);
    let defaults = if vision {
        Hyperparameters::vision_recipe()
    } else {
        Hyperparameters::default()
    };
    let mut hyper = args.hyper.resolve(defaults)?;
    hyper.checkpoint_every = args.checkpoint_every;
    let req = TrainRequest {
        model_dir: args.model,
        train_file: args.train,
        validation_file: args.validation,
        method,
        hyper,
        seed: args.seed,
        checkpoint_dir: args
            .checkpoint_dir
            .unwrap_or_else(|| args.out.join("checkpoint")),
        out_dir: args.out,
        resume: args.resume,
        device: api::training::parse_device(&args.device)
            .map_err(|e| anyhow::anyhow!("--device: {e}"))?,
    };
    let mut printer = Printer::new(args.json);
    match run(&req, &mut |ev: &TrainEvent| printer.event(ev))? {
        TrainOutcome::Finished { out_dir, .. } => {
            if !args.json {
                println!("adapter written to {}", out_dir.display());
            }
        }
        TrainOutcome::Stopped { step, .. } => bail!("stopped at step {step}"),
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct PretrainArgs {
    /// Plain-text files, or folders of .txt files (a Mamba language model).
    #[arg(long, num_args = 1.., required_unless_present = "images", conflicts_with = "images")]
    pub corpus: Vec<PathBuf>,
    /// An image dataset (class folders in a zip / tar / folder, or image JSONL): pretrains a
    /// Vision Mamba classifier of its classes instead (`--hidden`, `--layers`, `--state`,
    /// `--image-size`, `--patch` set its shape).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// The model folder to write: config.json, model.safetensors (and tokenizer.json for a
    /// language model).
    #[arg(long)]
    pub out: PathBuf,
    /// Vision: square input size in pixels.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Vision: patch size (and stride) in pixels.
    #[arg(long, default_value_t = 4)]
    pub patch: usize,
    /// Tokenizer vocabulary (byte-level BPE, including 256 bytes and <|endoftext|>).
    #[arg(long, default_value_t = 2048)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub state: usize,
    /// The tail of the corpus held out for validation.
    #[arg(long, default_value_t = 0.02)]
    pub validation_fraction: f64,
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print events as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn pretrain_cmd(args: PretrainArgs) -> Result<()> {
    if let Some(images) = &args.images {
        return pretrain_vision(images.clone(), args);
    }
    // Defaults suited to a tiny model from scratch: larger lr, warm-up, cosine decay.
    let defaults = Hyperparameters {
        n_epochs: 1,
        batch_size: 16,
        learning_rate: 3e-3,
        warmup_ratio: 0.05,
        lr_scheduler: LrScheduler::Cosine,
        max_seq_length: 128,
        weight_decay: Some(0.01),
        ..Default::default()
    };
    let hyper = args.hyper.resolve(defaults)?;
    let req = PretrainRequest {
        corpus: args.corpus,
        out_dir: args.out,
        vocab_size: args.vocab_size,
        hidden_size: args.hidden,
        num_layers: args.layers,
        state_size: args.state,
        hyper,
        seed: args.seed,
        validation_fraction: args.validation_fraction,
    };
    let mut printer = Printer::new(args.json);
    let out = pretrain(&req, &mut |ev: &TrainEvent| printer.event(ev))?;
    let summary = serde_json::to_string_pretty(&out)?;
    println!("{summary}");
    Ok(())
}

/// `molt pretrain --images`: a Vim from random initialisation, every weight trained.
fn pretrain_vision(images: PathBuf, args: PretrainArgs) -> Result<()> {
    // A small model from scratch: the vision recipe's optimiser with a larger rate.
    let defaults = Hyperparameters {
        n_epochs: 30,
        learning_rate: 3e-3,
        weight_decay: Some(0.05),
        ..Hyperparameters::vision_recipe()
    };
    let hyper = args.hyper.resolve(defaults)?;
    let req = trainer::train::VimPretrainRequest {
        images,
        out_dir: args.out,
        img_size: args.image_size,
        patch_size: args.patch,
        embed_dim: args.hidden,
        depth: args.layers,
        d_state: args.state,
        hyper,
        seed: args.seed,
    };
    let mut printer = Printer::new(args.json);
    let out = trainer::train::pretrain_vim(&req, &mut |ev: &TrainEvent| printer.event(ev))?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Prints events as progress lines (or JSON lines).
struct Printer {
    json: bool,
    started: Instant,
    /// What throughput counts: `tokens`, or `images` for image data.
    unit: &'static str,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer {
            json,
            started: Instant::now(),
            unit: "tokens",
        }
    }

    fn event(&mut self, ev: &TrainEvent) -> Control {
        let mut out = std::io::stdout().lock();
        let _ = if self.json {
            match serde_json::to_string(ev) {
                Ok(s) => writeln!(out, "{s}"),
                Err(_) => Ok(()),
            }
        } else {
            match ev {
                TrainEvent::Started {
                    total_steps,
                    start_step,
                    train_examples,
                    validation_examples,
                    trainable_parameters,
                    dataset_kind,
                    ..
                } => {
                    let what = if *dataset_kind == trainer::train::DatasetKind::Images {
                        self.unit = "images";
                        "images".to_string()
                    } else {
                        format!("{dataset_kind} examples")
                    };
                    writeln!(
                        out,
                        "training {trainable_parameters} parameters on {train_examples} {what} \
                     ({validation_examples} for validation): {total_steps} steps{}",
                        if *start_step > 0 {
                            format!(", resuming after step {start_step}")
                        } else {
                            String::new()
                        }
                    )
                }
                TrainEvent::Step {
                    step,
                    total_steps,
                    epoch,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_second,
                    eta_seconds,
                    ..
                } => writeln!(
                    out,
                    "step {step}/{total_steps} epoch {} loss {loss:.4} lr {lr:.2e} grad {grad_norm:.2} \
                     {tokens_per_second:.0} {}/s elapsed {} eta {}",
                    epoch + 1,
                    if self.unit == "images" { "img" } else { "tok" },
                    hms(self.started.elapsed().as_secs_f64()),
                    hms(*eta_seconds)
                ),
                TrainEvent::Validation {
                    step,
                    loss,
                    accuracy,
                    top5_accuracy,
                    examples,
                } => writeln!(
                    out,
                    "validation at step {step}: loss {loss:.4}{}{} ({examples} examples)",
                    accuracy
                        .map(|a| format!(" accuracy {:.2}%", 100.0 * a))
                        .unwrap_or_default(),
                    top5_accuracy
                        .map(|a| format!(" top-5 {:.2}%", 100.0 * a))
                        .unwrap_or_default()
                ),
                TrainEvent::Checkpoint { step, dir } => {
                    writeln!(out, "checkpoint at step {step} in {}", dir.display())
                }
                TrainEvent::Finished {
                    step, tokens_seen, ..
                } => writeln!(
                    out,
                    "finished after {step} steps, {tokens_seen} {}, {}",
                    self.unit,
                    hms(self.started.elapsed().as_secs_f64())
                ),
            }
        };
        Control::Continue
    }
}

fn hms(s: f64) -> String {
    let s = if s.is_finite() { s.max(0.0) as u64 } else { 0 };
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
