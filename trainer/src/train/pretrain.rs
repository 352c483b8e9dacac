//! Pretraining a small Mamba from random initialisation on a plain-text corpus: what makes
//! molt's demo base model (`models/demo`). Same loop, optimizer and schedules as
//! fine-tuning; every weight is trained.
//!
//! 1. The corpus is normalised: Project Gutenberg-style hard-wrapped lines are joined into
//!    one line per paragraph, paragraphs are separated by a blank line, files by the
//!    end-of-text token.
//! 2. A byte-level BPE tokenizer (GPT-2 style, `<|endoftext|>` = id 0) is trained on it with
//!    the `tokenizers` crate.
//! 3. The token stream is cut into windows of `max_seq_length` (overlapping by one token);
//!    the last `validation_fraction` of the stream is held out for validation.
//! 4. A seeded random model (`model::init`) is trained on the windows and saved with the
//!    tokenizer as a model folder: `config.json`, `model.safetensors`, `tokenizer.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use super::data::{DatasetKind, Encoder, Example, Tokenized};
use super::engine::{self, LoopConfig, TrainSet};
use super::full::FullModel;
use super::{Hyperparameters, TrainError, TrainObserver};
use crate::model::{Checkpoint, MambaConfig};
use crate::tokenizer::Tokenizer;

/// The end-of-text token, id 0, as in GPT-NeoX's tokenizer that the Mamba checkpoints use.
pub const EOT: &str = "<|endoftext|>";

/// What to pretrain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainRequest {
    /// `.txt` files, or folders whose `.txt` files are taken in name order.
    pub corpus: Vec<PathBuf>,
    pub out_dir: PathBuf,
    /// Tokenizer vocabulary, including the 256 byte symbols and `<|endoftext|>`.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub state_size: usize,
    pub hyper: Hyperparameters,
    pub seed: u64,
    /// The tail of the token stream held out for validation, in [0, 0.5].
    pub validation_fraction: f64,
}

/// What came out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainOutcome {
    pub out_dir: PathBuf,
    pub parameters: usize,
    pub corpus_bytes: usize,
    pub train_tokens: usize,
    pub validation_tokens: usize,
    pub steps: u64,
    pub validation_loss: Option<f64>,
    pub seconds: f64,
}

/// The corpus files, in order.
pub fn corpus_files(corpus: &[PathBuf]) -> Result<Vec<PathBuf>, TrainError> {
    let mut out = Vec::new();
    for p in corpus {
        if p.is_dir() {
            let mut files = Vec::new();
            for e in std::fs::read_dir(p).map_err(|e| TrainError::io(p, e))? {
                let e = e.map_err(|e| TrainError::io(p, e))?;
                let path = e.path();
                if path.extension().is_some_and(|x| x == "txt") {
                    files.push(path);
                }
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(TrainError::Method("the corpus has no .txt files".into()));
    }
    Ok(out)
}

/// Joins hard-wrapped lines into paragraphs (one line each, single spaces), separated by a
/// blank line.
pub fn normalise(text: &str) -> String {
    let mut paragraphs = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            if !cur.is_empty() {
                paragraphs.push(std::mem::take(&mut cur));
            }
            continue;
        }
        for word in line.split_whitespace() {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
    }
    if !cur.is_empty() {
        paragraphs.push(cur);
    }
    paragraphs.join("\n\n")
}

/// Trains a byte-level BPE tokenizer on `docs` and writes it to `path`.
pub fn train_tokenizer(docs: &[String], vocab_size: usize, path: &Path) -> Result<(), TrainError> {
    let err = |e: tokenizers::Error| TrainError::Method(format!("training the tokenizer: {e}"));
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(err)?;
    tok.train(&mut trainer, docs.iter()).map_err(err)?;
    tok.save(path, true).map_err(err)?;
    Ok(())
}

/// Runs the whole recipe (see the module docs).
pub fn pretrain(
    req: &PretrainRequest,
    obs: &mut dyn TrainObserver,
) -> Result<PretrainOutcome, TrainError> {
    let started = std::time::Instant::now();
    req.hyper.validate()?;
    let vf = req.validation_fraction;
    if !(vf.is_finite() && (0.0..=0.5).contains(&vf)) {
        return Err(TrainError::Hyperparameter {
            field: "validation_fraction".into(),
            reason: format!("{vf} is out of range; valid: [0, 0.5]"),
        });
    }
    if !(300..=1 << 20).contains(&req.vocab_size) {
        return Err(TrainError::Hyperparameter {
            field: "vocab_size".into(),
            reason: format!(
                "{} is out of range; valid: 300..=1048576 (256 bytes + special tokens + merges)",
                req.vocab_size
            ),
        });
    }
    let mut docs = Vec::new();
    let mut corpus_bytes = 0;
    for f in corpus_files(&req.corpus)? {
        let text = std::fs::read_to_string(&f).map_err(|e| TrainError::io(&f, e))?;
        corpus_bytes += text.len();
        docs.push(normalise(&text));
    }
    std::fs::create_dir_all(&req.out_dir).map_err(|e| TrainError::io(&req.out_dir, e))?;
    let tok_path = req.out_dir.join("tokenizer.json");
    // Paragraphs, not whole books, as the trainer's "sequences": its pre-tokenizer runs per
    // sequence and smaller pieces parallelise.
    let paragraphs: Vec<String> = docs
        .iter()
        .flat_map(|d| d.split("\n\n").map(|p| format!("{p}\n\n")))
        .collect();
    train_tokenizer(&paragraphs, req.vocab_size, &tok_path)?;
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    let eot = tokenizer
        .token_to_id(EOT)
        .ok_or_else(|| TrainError::Method(format!("the trained tokenizer lacks {EOT}")))?;

    let mut stream = Vec::new();
    for d in &docs {
        let ids = tokenizer
            .inner()
            .encode(d.as_str(), false)
            .map_err(|e| TrainError::Method(format!("tokenizing the corpus: {e}")))?;
        stream.extend_from_slice(ids.get_ids());
        stream.push(eot);
    }
    let n_val = (stream.len() as f64 * vf) as usize;
    let (train_ids, val_ids) = stream.split_at(stream.len() - n_val);
    let enc = Encoder {
        tokenizer: &tokenizer,
        max_len: req.hyper.max_seq_length as usize,
        eos: Some(eot),
    };
    let windows = |ids: &[u32]| -> Vec<Example> { enc.windows(ids) };
    let train = Tokenized {
        kind: DatasetKind::Text,
        examples: windows(train_ids),
        choice_sets: Vec::new(),
        records: 0,
    };
    let validation = (n_val > 1).then(|| {
        let examples = windows(val_ids);
        Tokenized {
            kind: DatasetKind::Text,
            records: examples.len(),
            examples,
            choice_sets: Vec::new(),
        }
    });

    let mut cfg = MambaConfig::new(req.hidden_size, req.num_layers, tokenizer.id_bound());
    cfg.state_size = req.state_size;
    cfg.pad_token_id = Some(eot);
    cfg.bos_token_id = Some(eot);
    cfg.eos_token_ids = vec![eot];
    let ck = Checkpoint::random(&cfg, req.seed, &candle_core::Device::Cpu)?;
    let wd = req.hyper.weight_decay.unwrap_or(0.0);
    let model = FullModel::new(ck, wd)?;
    let parameters = model.tensors()?.values().map(|t| t.elem_count()).sum();
    let end = engine::train(
        &model,
        LoopConfig {
            hyper: &req.hyper,
            seed: req.seed,
            train: TrainSet::Tokens {
                data: &train,
                pad: eot,
            },
            validation: validation
                .as_ref()
                .map(|data| TrainSet::Tokens { data, pad: eot }),
            device: candle_core::Device::Cpu,
            checkpoint_dir: None,
            out_dir: &req.out_dir,
            fingerprint: Default::default(),
            resume: None,
        },
        obs,
    )?;
    Ok(PretrainOutcome {
        out_dir: req.out_dir.clone(),
        parameters,
        corpus_bytes,
        train_tokens: train_ids.len(),
        validation_tokens: val_ids.len(),
        steps: end.step,
        validation_loss: end.validation.map(|v| v.loss),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What to pretrain for a Vision Mamba from random initialisation on an image dataset: what
/// makes molt's demo vision model (`models/digits`). Every weight trains (the `full`
/// method); the result is a Vim checkpoint folder (`config.json` in hustvl's kwargs, with
/// `id2label` naming the dataset's classes, and `model.safetensors`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VimPretrainRequest {
    /// An image dataset (any format of `images::source`); a `val/` split validates.
    pub images: PathBuf,
    pub out_dir: PathBuf,
    /// Square input size in pixels.
    pub img_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub d_state: usize,
    pub hyper: Hyperparameters,
    pub seed: u64,
}

/// What came out of [`pretrain_vim`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VimPretrainOutcome {
    pub out_dir: PathBuf,
    pub parameters: usize,
    pub classes: Vec<String>,
    pub train_images: usize,
    pub validation_images: usize,
    pub steps: u64,
    pub validation_loss: Option<f64>,
    pub validation_accuracy: Option<f64>,
    pub seconds: f64,
}

/// hustvl's kwargs for a Vim-tiny-like model (bimamba v2, middle class token, mean of the two
/// directions) of the request's sizes, naming `classes`.
fn vim_config_json(req: &VimPretrainRequest, classes: &[String]) -> serde_json::Value {
    let id2label: serde_json::Map<String, serde_json::Value> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), serde_json::Value::String(c.clone())))
        .collect();
    serde_json::json!({
        "architecture": "VisionMamba (hustvl/Vim vim/models_mamba.py), pretrained by molt",
        "img_size": [req.img_size, req.img_size],
        "patch_size": req.patch_size,
        "stride": req.patch_size,
        "depth": req.depth,
        "embed_dim": req.embed_dim,
        "d_state": req.d_state,
        "channels": 3,
        "num_classes": classes.len(),
        "ssm_cfg": {"d_conv": 4, "expand": 2, "conv_bias": true, "bias": false},
        "drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "norm_epsilon": 1e-5,
        "rms_norm": true,
        "fused_add_norm": true,
        "residual_in_fp32": true,
        "final_pool_type": "mean",
        "if_abs_pos_embed": true,
        "if_rope": false,
        "if_rope_residual": false,
        "if_bidirectional": false,
        "bimamba_type": "v2",
        "if_cls_token": true,
        "if_divide_out": true,
        "use_middle_cls_token": true,
        "id2label": id2label,
    })
}

/// Pretrains a Vim (see [`VimPretrainRequest`]).
pub fn pretrain_vim(
    req: &VimPretrainRequest,
    obs: &mut dyn TrainObserver,
) -> Result<VimPretrainOutcome, TrainError> {
    use super::images::{self, Role};
    use crate::model::vim::{EvalTransform, VimCheckpoint, VimConfig};
    use crate::peft::AdapterSpec;
    let started = std::time::Instant::now();
    req.hyper.validate()?;
    let scratch = images::Scratch::new()?;
    let scan = images::scan(&req.images, &scratch.sub("data")?)?;
    let classes = scan.classes.clone();
    let config = vim_config_json(req, &classes);
    let cfg = VimConfig::from_value(&config, Path::new("config.json"))?;
    let device = candle_core::Device::Cpu;
    let base = VimCheckpoint::random(&cfg, req.seed, &device)?.into_frozen()?;
    let transform = EvalTransform::for_image_size(cfg.img_size);
    let train = images::open(&scan, Role::Training, &classes, &transform, &req.images)?;
    let validation = if scan.validation.is_empty() {
        None
    } else {
        Some(images::open(
            &scan,
            Role::Validation,
            &classes,
            &transform,
            &req.images,
        )?)
    };
    let spec = AdapterSpec::from_value(&serde_json::json!({"type": "full"}))
        .map_err(|e| TrainError::Method(e.to_string()))?;
    let trainable = super::AdapterTrainable::new(&spec, &base, req.seed, None)?;
    let parameters = trainable.adapter().trainable_parameters();
    let adapter_dir = scratch.sub("adapter")?;
    let end = engine::train(
        &trainable,
        LoopConfig {
            hyper: &req.hyper,
            seed: req.seed,
            train: TrainSet::Images(&train),
            validation: validation.as_ref().map(TrainSet::Images),
            device,
            checkpoint_dir: None,
            out_dir: &adapter_dir,
            fingerprint: Default::default(),
            resume: None,
        },
        obs,
    )?;
    let merged = trainable
        .adapter()
        .merge(&base)
        .map_err(|e| TrainError::Method(e.to_string()))?;
    merged
        .save(&config, &req.out_dir)
        .map_err(|e| TrainError::Method(format!("saving the model: {e}")))?;
    Ok(VimPretrainOutcome {
        out_dir: req.out_dir.clone(),
        parameters,
        classes,
        train_images: train.len(),
        validation_images: validation.as_ref().map_or(0, |v| v.len()),
        steps: end.step,
        validation_loss: end.validation.map(|v| v.loss),
        validation_accuracy: end.validation.and_then(|v| v.accuracy),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_are_unwrapped() {
        let t = "Chapter 1\n\n\nIt is a truth\nuniversally  acknowledged.\n\n  Next one.\n";
        assert_eq!(
            normalise(t),
            "Chapter 1\n\nIt is a truth universally acknowledged.\n\nNext one."
        );
    }
}
