//! A language model's folder, whatever its family: `config.json`, weights
//! (`model.safetensors`, sharded `*.safetensors` with `model.safetensors.index.json`, or
//! `pytorch_model.bin`), and an optional `tokenizer.json`.
//!
//! Safetensors files are memory-mapped and each tensor is copied once, from the map into its
//! Candle storage. Everything is validated before a model is built: every expected tensor
//! present with the shape the config implies, nothing unexpected, float dtypes, finite
//! values. Names are normalised to the HF naming (`backbone.embeddings.weight`), whichever
//! naming the checkpoint used. A family says what it expects through [`LmConfig`]; the rest
//! is written once here (Mamba-1 and Mamba-2 share it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{CheckpointProblem, Error, Result};
use crate::model::lm::{CausalLm, Mixer};
pub use crate::model::weights::LoadOptions;
use crate::model::weights::{
    WeightFile, file_label, load_one, non_finite, open_weight_file, var_map,
};

/// One tensor the config implies.
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
    /// Where the shape comes from, for messages (`[hidden_size] = [64] from config.json`).
    pub why: String,
}

impl Expected {
    pub fn new(name: String, shape: Vec<usize>, why: String) -> Self {
        Expected {
            name,
            shape,
            why: format!("{why} from config.json"),
        }
    }
}

/// What a language-model family tells the shared loader.
pub trait LmConfig: Clone + std::fmt::Debug + Send + Sync + Sized + 'static {
    /// The model built from a checkpoint.
    type Model;

    fn from_file(path: &Path) -> Result<Self>;

    /// The family this config belongs to.
    fn family(&self) -> crate::model::Family;

    /// Every tensor the config implies, under HF names (`lm_head.weight` only when untied).
    fn expected_tensors(&self) -> Vec<Expected>;

    /// Settles what the config leaves open from the tensors found (names normalised).
    fn resolve_from_names(&mut self, names: &BTreeSet<&str>) {
        let _ = names;
    }

    /// The config flag that would have to be true for a tensor found but not expected
    /// (`use_bias` for `in_proj.bias`), so the message names the contradiction. Both language
    /// families name their optional biases alike.
    fn flag_for_unexpected(&self, name: &str) -> Option<&'static str> {
        if name.ends_with(".mixer.in_proj.bias") || name.ends_with(".mixer.out_proj.bias") {
            Some("use_bias")
        } else if name.ends_with(".mixer.conv1d.bias") {
            Some("use_conv_bias")
        } else {
            None
        }
    }

    /// Which naming the config file used.
    fn style(&self) -> crate::model::ConfigStyle;

    /// The layer-count field as this config's naming spells it (`num_hidden_layers`, `n_layer`).
    fn layer_word(&self) -> &'static str {
        match self.style() {
            crate::model::ConfigStyle::HuggingFace => "num_hidden_layers",
            crate::model::ConfigStyle::StateSpaces => "n_layer",
        }
    }
    fn num_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
    fn hidden_size(&self) -> usize;
    fn tie_word_embeddings(&self) -> bool;
    /// Ids that end generation.
    fn eos_token_ids(&self) -> &[u32];
    fn pad_token_id(&self) -> Option<u32>;
    /// The epsilon of the block and final RMSNorms.
    fn norm_epsilon(&self) -> f64;

    /// Builds the model from `vb`, whose names are HF checkpoint names.
    fn build(&self, vb: VarBuilder) -> Result<Self::Model>;

    /// A line in the log after loading.
    fn describe(&self) -> String;

    /// The config as transformers' `save_pretrained` writes it (merged checkpoints).
    fn to_hf_json(&self) -> serde_json::Value;
}

impl<M: Mixer> CausalLm<M> {
    /// Loads a model folder of `M`'s family for inference (frozen weights).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        LmCheckpoint::<M::Config>::load(dir, opts)?.into_frozen()
    }

    /// Loads a model folder of `M`'s family for full fine-tuning (every weight a `Var`).
    pub fn load_trainable(dir: &Path, opts: &LoadOptions) -> Result<(Self, VarMap)> {
        LmCheckpoint::<M::Config>::load(dir, opts)?.into_trainable()
    }
}

/// A validated checkpoint: resolved config and every weight under its HF name.
#[derive(Debug)]
pub struct LmCheckpoint<C> {
    pub dir: PathBuf,
    pub config: C,
    /// HF names; `lm_head.weight` only when the head is untied.
    pub tensors: HashMap<String, Tensor>,
    pub weight_files: Vec<PathBuf>,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer_file: Option<PathBuf>,
    pub dtype: DType,
    pub device: Device,
}

/// One tensor found in the weight files, before loading its data.
struct Found {
    file: usize,
    original: String,
    shape: Vec<usize>,
    dtype: String,
    is_float: bool,
}

impl<C: LmConfig> LmCheckpoint<C> {
    /// Reads, validates and loads the model folder `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Io {
                path: config_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "config.json not found"),
            });
        }
        let mut config = C::from_file(&config_path)?;
        let paths = weight_paths(dir)?;
        let files = paths
            .iter()
            .map(|p| open_weight_file(dir, p))
            .collect::<Result<Vec<_>>>()?;
        let (found, mut problems) = index_tensors(&files);
        config.resolve_from_names(&found.keys().map(String::as_str).collect());
        let expected = config.expected_tensors();
        problems.extend(check_names_and_shapes(&config, &expected, &found, &files));
        if !problems.is_empty() {
            return Err(Error::Checkpoint {
                dir: dir.to_path_buf(),
                problems,
            });
        }

        let mut tensors = HashMap::with_capacity(expected.len() + 1);
        let mut wanted: Vec<&str> = expected.iter().map(|e| e.name.as_str()).collect();
        if found.contains_key("lm_head.weight") && !wanted.contains(&"lm_head.weight") {
            wanted.push("lm_head.weight");
        }
        for name in wanted {
            let Some(f) = found.get(name) else { continue };
            let file = &files[f.file];
            let t = load_one(file, &f.original, opts).map_err(|e| Error::WeightFile {
                path: dir.join(&file.label),
                reason: format!("tensor `{}`: {e}", f.original),
            })?;
            if let Some(p) = non_finite(&t, &file.label, &f.original)? {
                problems.push(p);
            }
            tensors.insert(name.to_string(), t);
        }
        if !problems.is_empty() {
            return Err(Error::Checkpoint {
                dir: dir.to_path_buf(),
                problems,
            });
        }
        resolve_head(&config, &mut tensors, dir)?;
        let tokenizer = dir.join("tokenizer.json");
        tracing::info!(
            dir = %dir.display(),
            config = %config.describe(),
            tied = !tensors.contains_key("lm_head.weight"),
            "loaded checkpoint"
        );
        Ok(LmCheckpoint {
            dir: dir.to_path_buf(),
            config,
            tensors,
            weight_files: paths,
            tokenizer_file: tokenizer.is_file().then_some(tokenizer),
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }

    /// An in-memory checkpoint (e.g. random init), checked like a loaded one except that
    /// nothing is read from disk. `label` stands in for the folder in messages.
    pub fn from_tensors(label: &str, config: C, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut problems = Vec::new();
        for e in config.expected_tensors() {
            match tensors.get(&e.name) {
                None => problems.push(CheckpointProblem::Missing {
                    file: label.to_string(),
                    tensor: e.name.clone(),
                    expected: e.shape.clone(),
                    why: e.why.clone(),
                }),
                Some(t) if t.dims() != e.shape.as_slice() => {
                    problems.push(CheckpointProblem::Shape {
                        file: label.to_string(),
                        tensor: e.name.clone(),
                        expected: e.shape.clone(),
                        found: t.dims().to_vec(),
                        why: e.why.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(Error::Checkpoint {
                dir: PathBuf::from(label),
                problems,
            });
        }
        let (dtype, device) = tensors
            .values()
            .next()
            .map(|t| (t.dtype(), t.device().clone()))
            .unwrap_or((DType::F32, Device::Cpu));
        Ok(LmCheckpoint {
            dir: PathBuf::from(label),
            config,
            tensors,
            weight_files: Vec::new(),
            tokenizer_file: None,
            dtype,
            device,
        })
    }

    /// The inference/frozen build: weights are plain tensors, so no autograd graph is
    /// recorded through them (PEFT adapters add their own `Var`s).
    pub fn into_frozen(self) -> Result<C::Model> {
        let vb = VarBuilder::from_tensors(self.tensors, self.dtype, &self.device);
        self.config.build(vb)
    }

    /// The full fine-tuning build: every weight is a `Var` in the returned `VarMap` (keyed by
    /// HF name), so `loss.backward()` yields a gradient for each.
    pub fn into_trainable(self) -> Result<(C::Model, VarMap)> {
        let varmap = var_map(self.tensors)?;
        let vb = VarBuilder::from_varmap(&varmap, self.dtype, &self.device);
        let model = self.config.build(vb)?;
        Ok((model, varmap))
    }
}

/// The weight files of a folder, in the order they are searched.
fn weight_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let st_index = dir.join("model.safetensors.index.json");
    if st_index.is_file() {
        return index_files(dir, &st_index);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut shards = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = entry.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "safetensors") {
            shards.push(p);
        }
    }
    if !shards.is_empty() {
        shards.sort();
        return Ok(shards);
    }
    let pt_index = dir.join("pytorch_model.bin.index.json");
    if pt_index.is_file() {
        return index_files(dir, &pt_index);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok(vec![bin]);
    }
    Err(Error::NoWeights {
        dir: dir.to_path_buf(),
    })
}

/// The distinct files named in a sharded checkpoint's `weight_map`.
fn index_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::ConfigField {
            path: index.to_path_buf(),
            field: "weight_map".into(),
            reason: "missing or not an object".into(),
        });
    };
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Error::ConfigField {
                path: index.to_path_buf(),
                field: format!("weight_map.{tensor}"),
                reason: format!("expected a file name, found {file}"),
            });
        };
        // Shards live beside the index; a path that leaves the folder is refused.
        let rel = Path::new(file);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(Error::ConfigField {
                path: index.to_path_buf(),
                field: format!("weight_map.{tensor}"),
                reason: format!("file `{file}` is outside the model folder"),
            });
        }
        names.insert(file.to_string());
    }
    let mut out = Vec::new();
    for name in names {
        let p = dir.join(&name);
        if !p.is_file() {
            return Err(Error::WeightFile {
                path: p,
                reason: format!("listed in {} but not found", file_label(dir, index)),
            });
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::ConfigField {
            path: index.to_path_buf(),
            field: "weight_map".into(),
            reason: "names no files".into(),
        });
    }
    Ok(out)
}

/// Maps a checkpoint name to the HF name: `embedding.` → `embeddings.`, and a missing
/// `backbone.` prefix (a bare `MambaModel` state dict) is added.
pub(crate) fn canonical_name(name: &str) -> String {
    let with_prefix = if name.starts_with("layers.")
        || name.starts_with("embedding.")
        || name.starts_with("embeddings.")
        || name.starts_with("norm_f.")
    {
        format!("backbone.{name}")
    } else {
        name.to_string()
    };
    match with_prefix.strip_prefix("backbone.embedding.") {
        Some(rest) => format!("backbone.embeddings.{rest}"),
        None => with_prefix,
    }
}

fn index_tensors(files: &[WeightFile]) -> (BTreeMap<String, Found>, Vec<CheckpointProblem>) {
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let entries = file.entries();
        for (original, shape, dtype, is_float) in entries {
            let name = canonical_name(&original);
            if let Some(prev) = found.get(&name) {
                let files = vec![files[prev.file].label.clone(), file.label.clone()];
                // Both namings at once (`embedding` and `embeddings`), or one tensor in two
                // shards: which copy is meant is a guess, so refuse.
                problems.push(CheckpointProblem::Duplicate {
                    tensor: name.clone(),
                    files,
                });
                continue;
            }
            found.insert(
                name,
                Found {
                    file: i,
                    original,
                    shape,
                    dtype,
                    is_float,
                },
            );
        }
    }
    (found, problems)
}

/// `backbone.layers.{i}.…` → `i`.
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("backbone.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn check_names_and_shapes<C: LmConfig>(
    cfg: &C,
    expected: &[Expected],
    found: &BTreeMap<String, Found>,
    files: &[WeightFile],
) -> Vec<CheckpointProblem> {
    let mut problems = Vec::new();
    let all_files = files
        .iter()
        .map(|f| f.label.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let layers_present: BTreeSet<usize> = found.keys().filter_map(|k| layer_of(k)).collect();
    let layer_word = cfg.layer_word();

    // Missing: a whole absent layer is one problem (a config/tensor contradiction), not a
    // dozen missing tensors.
    let mut reported_layers = BTreeSet::new();
    for e in expected {
        let Some(f) = found.get(&e.name) else {
            if let Some(i) = layer_of(&e.name)
                && !layers_present.contains(&i)
            {
                if reported_layers.insert(i) {
                    problems.push(CheckpointProblem::ConfigContradiction {
                        file: all_files.clone(),
                        tensor: format!("backbone.layers.{i}.*"),
                        detail: format!(
                            "config.json says {layer_word}={} but the checkpoint has no tensors for layer {i} (it has {} layer(s))",
                            cfg.num_layers(),
                            layers_present.len()
                        ),
                    });
                }
                continue;
            }
            problems.push(CheckpointProblem::Missing {
                file: all_files.clone(),
                tensor: e.name.clone(),
                expected: e.shape.clone(),
                why: e.why.clone(),
            });
            continue;
        };
        let label = files[f.file].label.clone();
        if !f.is_float {
            problems.push(CheckpointProblem::Dtype {
                file: label.clone(),
                tensor: f.original.clone(),
                dtype: f.dtype.clone(),
            });
        }
        if f.shape != e.shape {
            problems.push(CheckpointProblem::Shape {
                file: label,
                tensor: f.original.clone(),
                expected: e.shape.clone(),
                found: f.shape.clone(),
                why: e.why.clone(),
            });
        }
    }

    let expected_names: BTreeSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut extra_layers = BTreeSet::new();
    for (name, f) in found {
        if expected_names.contains(name.as_str()) {
            continue;
        }
        let label = files[f.file].label.clone();
        if name == "lm_head.weight" {
            let want = vec![cfg.vocab_size(), cfg.hidden_size()];
            if f.shape != want {
                problems.push(CheckpointProblem::Shape {
                    file: label,
                    tensor: f.original.clone(),
                    expected: want,
                    found: f.shape.clone(),
                    why: format!(
                        "[vocab_size, hidden_size] = [{}, {}] from config.json",
                        cfg.vocab_size(),
                        cfg.hidden_size()
                    ),
                });
            } else if !f.is_float {
                problems.push(CheckpointProblem::Dtype {
                    file: label,
                    tensor: f.original.clone(),
                    dtype: f.dtype.clone(),
                });
            }
            continue;
        }
        if let Some(i) = layer_of(name)
            && i >= cfg.num_layers()
        {
            if extra_layers.insert(i) {
                problems.push(CheckpointProblem::ConfigContradiction {
                    file: label,
                    tensor: f.original.clone(),
                    detail: format!(
                        "config.json says {layer_word}={} but the checkpoint has layer {i}",
                        cfg.num_layers()
                    ),
                });
            }
            continue;
        }
        let bias_flag = cfg.flag_for_unexpected(name);
        match bias_flag {
            Some(flag) => problems.push(CheckpointProblem::ConfigContradiction {
                file: label,
                tensor: f.original.clone(),
                detail: format!("config.json says {flag}=false but the checkpoint has this bias"),
            }),
            None => problems.push(CheckpointProblem::Unexpected {
                file: label,
                tensor: f.original.clone(),
                shape: f.shape.clone(),
            }),
        }
    }
    problems
}

/// Decides whether the head is tied: a `lm_head.weight` equal to the embedding is dropped
/// (tied, one parameter, as HF trains it); a different one is kept as an untied head.
fn resolve_head<C: LmConfig>(
    cfg: &C,
    tensors: &mut HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    let Some(head) = tensors.get("lm_head.weight") else {
        return Ok(());
    };
    let Some(emb) = tensors.get("backbone.embeddings.weight") else {
        return Ok(());
    };
    if !cfg.tie_word_embeddings() {
        return Ok(());
    }
    let diff = (head.to_dtype(DType::F32)? - emb.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    if diff == 0.0 {
        tensors.remove("lm_head.weight");
    } else {
        tracing::warn!(
            dir = %dir.display(),
            max_abs_diff = diff,
            "config ties the LM head to the embedding but lm_head.weight differs; using it as an untied head"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised() {
        assert_eq!(
            canonical_name("backbone.embedding.weight"),
            "backbone.embeddings.weight"
        );
        assert_eq!(
            canonical_name("layers.3.mixer.D"),
            "backbone.layers.3.mixer.D"
        );
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(layer_of("backbone.layers.12.mixer.D"), Some(12));
        assert_eq!(layer_of("backbone.norm_f.weight"), None);
    }
}
