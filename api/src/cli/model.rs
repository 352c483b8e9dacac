//! `molt model forward`, `molt model generate` and `molt model classify`: check a model folder
//! from the command line without writing code. The family is read from the folder's
//! `config.json`: a language model takes token ids, a Vision Mamba takes images.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use trainer::generate::{FinishReason, GenerationConfig, generate};
use trainer::model::mamba2::Mamba2Mixer;
use trainer::model::vim::{
    EvalTransform, Mode, VimForImageClassification, VimLoadOptions, classification_loss,
};
use trainer::model::{
    CausalLm, Family, IGNORE_INDEX, LoadOptions, MambaMixer, Mixer, ModelInput, causal_lm_loss,
};
use trainer::peft::{MixerSites, PeftModel};
use trainer::tokenizer::Tokenizer;

use api::serving::WeightDtype;

#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Run the forward pass on `input_ids` from a safetensors file and write the logits
    /// (and, with --loss, the next-token loss).
    Forward(ForwardArgs),
    /// Generate a continuation of one or more prompts (needs tokenizer.json in the model
    /// folder).
    Generate(GenerateArgs),
    /// Classify image files with a Vision Mamba (after its evaluation transform: resize,
    /// centre crop, ImageNet normalisation) and print the top-k classes of each.
    Classify(ClassifyArgs),
}

/// The most images one `molt model classify` takes (they are decoded together).
const MAX_CLASSIFY_IMAGES: usize = 1024;

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    /// Vision Mamba folder: config.json and weights.
    #[arg(long, env = "MOLT_MODEL")]
    pub model: PathBuf,

    /// PEFT adapter folder to apply on top of the model.
    #[arg(long, env = "MOLT_ADAPTER")]
    pub adapter: Option<PathBuf>,

    /// How many classes to print per image, most likely first.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,

    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,

    /// Device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Image files (PNG, JPEG, WebP), at most 1024.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// Model folder: config.json, weights (*.safetensors or pytorch_model.bin), optional
    /// tokenizer.json.
    #[arg(long, env = "MOLT_MODEL")]
    pub model: PathBuf,

    /// PEFT adapter folder to apply on top of the model (adapter_config.json +
    /// adapter_model.safetensors).
    #[arg(long, env = "MOLT_ADAPTER")]
    pub adapter: Option<PathBuf>,

    /// Safetensors file. A language model: `input_ids` [B, L] (I64 or U32), and optionally
    /// `attention_mask` [B, L] (0 = padding) and `labels` [B, L] (I64, -100 = not scored).
    /// A Vision Mamba: `pixel_values` F32 [B, 3, H, W] (normalised), optionally `labels`
    /// [B] (I64).
    #[arg(long)]
    pub input: PathBuf,

    /// Where to write `logits` (F32 [B, L, V], or [B, C] for images) and, with --loss, `loss`
    /// (F32 [1]).
    #[arg(long)]
    pub output: PathBuf,

    /// Also compute the next-token cross-entropy, as HF's causal-LM loss: mean over the
    /// scored positions. Labels are `labels` when given, else `input_ids` with padded
    /// positions (attention_mask 0) not scored.
    #[arg(long)]
    pub loss: bool,

    /// Device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,

    /// How a language model keeps its matrices: `f32`, or `bf16` (half the memory and the
    /// bytes read per decoded token; sums, activations and states stay f32). Applied after
    /// --adapter is merged.
    #[arg(long, env = "MOLT_DTYPE", value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The prompt followed by its continuation, one block per prompt.
    Text,
    /// One JSON object per prompt: prompt, completion, token ids, finish reason.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model folder (must contain tokenizer.json).
    #[arg(long, env = "MOLT_MODEL")]
    pub model: PathBuf,

    /// PEFT adapter folder to apply on top of the model.
    #[arg(long, env = "MOLT_ADAPTER")]
    pub adapter: Option<PathBuf>,

    /// Prompt text; repeat the flag to generate for a batch of prompts.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,

    /// Maximum number of new tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,

    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, env = "MOLT_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,

    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,

    /// Device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,

    /// How a language model keeps its matrices: `f32`, or `bf16` (half the memory and the
    /// bytes read per decoded token; sums, activations and states stay f32). Applied after
    /// --adapter is merged.
    #[arg(long, env = "MOLT_DTYPE", value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Forward(a) if family(&a.model)? == Family::Vim => {
            if a.dtype != WeightDtype::F32 {
                bail!(
                    "--dtype {}: only language models keep their matrices in another \
                     dtype; {} is a Vision Mamba (run it with --dtype f32)",
                    a.dtype,
                    a.model.display()
                );
            }
            forward_vision(a)
        }
        ModelCommand::Forward(a) => match family(&a.model)? {
            Family::Mamba2 => {
                let model =
                    load_model::<Mamba2Mixer>(&a.model, a.adapter.as_deref(), &a.device, a.dtype)?;
                forward(a, model)
            }
            _ => {
                let model =
                    load_model::<MambaMixer>(&a.model, a.adapter.as_deref(), &a.device, a.dtype)?;
                forward(a, model)
            }
        },
        ModelCommand::Generate(a) => match family(&a.model)? {
            Family::Vim => bail!(
                "{}: a Vision Mamba classifies images; use `molt model classify`",
                a.model.display()
            ),
            Family::Mamba2 => {
                let model =
                    load_model::<Mamba2Mixer>(&a.model, a.adapter.as_deref(), &a.device, a.dtype)?;
                generate_cmd(a, model)
            }
            Family::Mamba => {
                let model =
                    load_model::<MambaMixer>(&a.model, a.adapter.as_deref(), &a.device, a.dtype)?;
                generate_cmd(a, model)
            }
        },
        ModelCommand::Classify(a) => classify(a),
    }
}

fn family(dir: &Path) -> Result<Family> {
    trainer::model::family::detect_dir(dir)
        .with_context(|| format!("--model {}: reading its config.json", dir.display()))
}

fn load_vision(
    dir: &Path,
    adapter: Option<&Path>,
    device: &str,
) -> Result<VimForImageClassification> {
    // An adapter carries the head it was trained with: build the base for its classes.
    let num_classes = adapter.and_then(|a| {
        let t = candle_core::safetensors::load(a.join(trainer::peft::WEIGHTS_FILE), &Device::Cpu)
            .ok()?;
        t.get("head.bias").and_then(|b| b.dims().first().copied())
    });
    let opts = VimLoadOptions {
        load: load_options(device)?,
        num_classes,
        ..VimLoadOptions::default()
    };
    let base = VimForImageClassification::load(dir, &opts)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    with_adapter(base, dir, adapter)
}

fn load_options(device: &str) -> Result<LoadOptions> {
    Ok(LoadOptions {
        device: api::training::parse_device(device)
            .map_err(|e| anyhow::anyhow!("--device: {e}"))?,
        ..LoadOptions::default()
    })
}

/// `base` (loaded from `dir`) with the adapter folder applied, if any: merged where possible,
/// so inference pays nothing per token for the adapter.
fn with_adapter<M: PeftModel>(base: M, dir: &Path, adapter: Option<&Path>) -> Result<M> {
    let Some(a) = adapter else {
        return Ok(base);
    };
    let adapter = trainer::peft::Adapter::load(a, &base)
        .with_context(|| format!("--adapter {}: loading the adapter", a.display()))?;
    adapter.inference_model(&base).with_context(|| {
        format!(
            "--adapter {}: applying it to {}",
            a.display(),
            dir.display()
        )
    })
}

fn forward_vision(a: ForwardArgs) -> Result<()> {
    let inputs = read_inputs(&a.input)?;
    let model = load_vision(&a.model, a.adapter.as_deref(), &a.device)?;
    let label = a.input.display().to_string();
    let pixels = inputs
        .get("pixel_values")
        .with_context(|| format!("{label}: no `pixel_values` tensor ({})", names(&inputs)))?;
    if pixels.dtype() != DType::F32 {
        bail!(
            "{label}: pixel_values: dtype {:?}, expected F32",
            pixels.dtype()
        );
    }
    let device = model.head.weight().device().clone();
    let logits = model
        .forward(&pixels.to_device(&device)?, Mode::Eval, None)
        .with_context(|| label.clone())?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    if a.loss {
        let labels = inputs
            .get("labels")
            .with_context(|| format!("{label}: --loss needs a `labels` tensor [B]"))?;
        let loss = classification_loss(&logits, &labels.to_device(&device)?)
            .with_context(|| label.clone())?;
        tracing::info!(loss = loss.to_scalar::<f32>()?, "loss");
        out.insert("loss".into(), loss.reshape(1)?.to_device(&Device::Cpu)?);
    }
    out.insert("logits".into(), logits.to_device(&Device::Cpu)?);
    write_atomically(&a.output, &out)
}

fn classify(a: ClassifyArgs) -> Result<()> {
    if a.images.len() > MAX_CLASSIFY_IMAGES {
        bail!(
            "{} images given; `molt model classify` takes at most {MAX_CLASSIFY_IMAGES} at once",
            a.images.len()
        );
    }
    if family(&a.model)? != Family::Vim {
        bail!(
            "{}: not an image classifier; `molt model classify` needs a Vision Mamba",
            a.model.display()
        );
    }
    let model = load_vision(&a.model, a.adapter.as_deref(), &a.device)?;
    let classes = model.config.num_classes;
    if a.top_k == 0 || a.top_k > classes {
        bail!(
            "--top-k {}: must be between 1 and the model's {classes} classes",
            a.top_k
        );
    }
    let device = model.head.weight().device().clone();
    let transform = EvalTransform::for_image_size(model.config.img_size);
    let names = class_names(&a.model, classes);
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for path in &a.images {
        let img = EvalTransform::decode(path)
            .with_context(|| format!("{}: reading the image", path.display()))?;
        let pixels = transform
            .apply(&img, &device)
            .with_context(|| path.display().to_string())?
            .unsqueeze(0)?;
        let logits = model.forward(&pixels, Mode::Eval, None)?;
        let probs = api::serving::vision::softmax(
            &logits.to_dtype(DType::F32)?.squeeze(0)?.to_vec1::<f32>()?,
        );
        let top = api::serving::vision::top_k(&probs, a.top_k);
        match a.format {
            OutputFormat::Text => {
                for (rank, (c, p)) in top.iter().enumerate() {
                    writeln!(
                        w,
                        "{}\t{}\t{c}\t{}\t{p:.6}",
                        path.display(),
                        rank + 1,
                        names[*c]
                    )?;
                }
            }
            OutputFormat::Json => {
                let rec = serde_json::json!({
                    "image": path.display().to_string(),
                    "top": top.iter().map(|(c, p)| serde_json::json!({
                        "class": c, "label": names[*c], "probability": p,
                    })).collect::<Vec<_>>(),
                });
                writeln!(w, "{rec}")?;
            }
        }
    }
    Ok(())
}

/// Class names from `config.json`'s `id2label` (HF's convention) where present, else the
/// class indices.
fn class_names(dir: &Path, classes: usize) -> Vec<String> {
    let config = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .unwrap_or_default();
    api::serving::vision::config_class_names(&config, classes)
}

/// A language model folder of `M`'s family, with the adapter folder applied (merged where
/// possible, from the f32 weights), if any, then its matrices kept in `dtype`.
fn load_model<M: MixerSites>(
    dir: &Path,
    adapter: Option<&Path>,
    device: &str,
    dtype: WeightDtype,
) -> Result<CausalLm<M>> {
    let base = CausalLm::<M>::load(dir, &load_options(device)?)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    Ok(with_adapter(base, dir, adapter)?.store_weights_as(dtype.dtype())?)
}

fn forward<M: Mixer>(a: ForwardArgs, model: CausalLm<M>) -> Result<()> {
    let inputs = read_inputs(&a.input)?;
    let label = a.input.display().to_string();
    let ids = inputs
        .get("input_ids")
        .with_context(|| format!("{label}: no `input_ids` tensor ({})", names(&inputs)))?;
    match ids.dtype() {
        DType::I64 | DType::U32 => {}
        other => bail!("{label}: input_ids: dtype {other:?}, expected I64 or U32"),
    }
    let mask = inputs.get("attention_mask");
    let input = ModelInput::new(ids, mask, model.vocab_size()).with_context(|| label.clone())?;
    let logits = model
        .forward_with(&input, false)
        .context("forward pass")?
        .logits
        .to_dtype(DType::F32)?;

    let mut out: HashMap<String, Tensor> = HashMap::new();
    if a.loss {
        let labels = match inputs.get("labels") {
            Some(l) => {
                if l.dims() != ids.dims() {
                    bail!(
                        "{label}: labels: shape {:?} does not match input_ids {:?}",
                        l.dims(),
                        ids.dims()
                    );
                }
                l.clone()
            }
            None => default_labels(&input)?,
        };
        let labels = labels.to_device(logits.device())?;
        let loss = causal_lm_loss(&logits, &labels).with_context(|| label.clone())?;
        tracing::info!(loss = loss.to_scalar::<f32>()?, "loss");
        out.insert("loss".into(), loss.reshape(1)?.to_device(&Device::Cpu)?);
    }
    out.insert("logits".into(), logits.to_device(&Device::Cpu)?);
    write_atomically(&a.output, &out)
}

/// `input_ids` as I64 with padded positions set to the ignore index.
fn default_labels(input: &ModelInput) -> Result<Tensor> {
    let ids = input.input_ids.to_dtype(DType::I64)?;
    Ok(match &input.attention_mask {
        None => ids,
        Some(m) => {
            let keep = m.to_dtype(DType::U8)?;
            let ignore = Tensor::full(IGNORE_INDEX, ids.dims(), ids.device())?;
            keep.where_cond(&ids, &ignore)?
        }
    })
}

fn read_inputs(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))
}

fn names(t: &HashMap<String, Tensor>) -> String {
    let mut n: Vec<&str> = t.keys().map(String::as_str).collect();
    n.sort();
    if n.is_empty() {
        "the file holds no tensors".into()
    } else {
        format!("found: {}", n.join(", "))
    }
}

/// Writes beside the target and renames, so a failed run never leaves a half-written file.
fn write_atomically(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("moving the output to {}", path.display())
    })?;
    Ok(())
}

fn generate_cmd<M: Mixer>(a: GenerateArgs, model: CausalLm<M>) -> Result<()> {
    let tok = Tokenizer::from_model_dir(&a.model)?.with_context(|| {
        format!(
            "{}: no tokenizer.json; `molt model generate` needs one to turn text into tokens",
            a.model.display()
        )
    })?;
    let prompts = a
        .prompt
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = tok.encode(p)?;
            if ids.is_empty() {
                bail!("--prompt #{}: the prompt encodes to no tokens", i + 1);
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cfg = GenerationConfig::for_model(&model);
    cfg.max_new_tokens = a.max_tokens;
    cfg.temperature = a.temperature;
    cfg.top_p = a.top_p;
    cfg.seed = a.seed;
    if a.ignore_eos {
        cfg.eos_token_ids.clear();
    }
    let out = generate(&model, &prompts, &cfg).context("generation")?;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for (i, prompt) in a.prompt.iter().enumerate() {
        let tokens = &out.tokens[i];
        let completion = tok.decode(tokens, true)?;
        match a.format {
            OutputFormat::Text => {
                if i > 0 {
                    writeln!(w)?;
                }
                writeln!(w, "{prompt}{completion}")?;
            }
            OutputFormat::Json => {
                let reason = match out.finish_reasons[i] {
                    FinishReason::Eos => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Stopped => "stopped",
                };
                let rec = serde_json::json!({
                    "prompt": prompt,
                    "prompt_ids": prompts[i],
                    "completion": completion,
                    "completion_ids": tokens,
                    "finish_reason": reason,
                });
                writeln!(w, "{rec}")?;
            }
        }
    }
    Ok(())
}
