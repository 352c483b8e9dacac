//! Loading a Vim model folder: `config.json` (every `VisionMamba` kwarg) and the weights under
//! hustvl's official key names, from `model.safetensors` (or any `*.safetensors`) or the
//! official `.pth` (`torch.save({"model": state_dict})`; a bare state dict works too).
//!
//! Adapting instead of failing, as timm does:
//! - a checkpoint without `head.*`, or with a head of another class count than wanted, loads
//!   with a fresh zero-initialised head (MambaPEFT's `VisionTransformerClsHead` init) and says
//!   so in [`VimCheckpoint::notes`] and the log;
//! - another image size than the checkpoint's resizes `pos_embed` ([`PosEmbedResize`]).
//!
//! Everything else must match the config exactly; every problem is listed with the file, the
//! tensor and both shapes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};

use super::config::VimConfig;
use super::model::VimForImageClassification;
use super::pos_embed::{PosEmbedResize, resize_pos_embed};
use crate::error::{CheckpointProblem, Error, Result};
use crate::model::weights::{
    LoadOptions, WeightFile, load_one, non_finite, open_weight_file_with_key, var_map,
};

/// What to adapt while loading.
#[derive(Clone, Debug, Default)]
pub struct VimLoadOptions {
    pub load: LoadOptions,
    /// Build for another image size `[H, W]` than the checkpoint's; `pos_embed` is resized.
    pub img_size: Option<[usize; 2]>,
    /// Build a head of this many classes; a checkpoint head of another size is replaced by a
    /// fresh zero head.
    pub num_classes: Option<usize>,
    pub pos_embed_resize: PosEmbedResize,
}

/// A validated Vim checkpoint: the config the model is built with (image size and class
/// count as asked) and every tensor under its official name.
#[derive(Debug)]
pub struct VimCheckpoint {
    pub dir: PathBuf,
    pub config: VimConfig,
    /// The config as the checkpoint was trained.
    pub checkpoint_config: VimConfig,
    pub tensors: HashMap<String, Tensor>,
    pub weight_files: Vec<PathBuf>,
    /// What was adapted (fresh head, resized pos_embed), one sentence each.
    pub notes: Vec<String>,
    /// Whether the head was freshly initialised.
    pub fresh_head: bool,
    pub load: LoadOptions,
}

/// The weight files of a Vim folder: `model.safetensors`, else every `*.safetensors`, else
/// `checkpoint.pth` / `*.pth` / `pytorch_model.bin`.
fn weight_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let main = dir.join("model.safetensors");
    if main.is_file() {
        return Ok(vec![main]);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let with_ext = |ext: &str| -> Vec<PathBuf> {
        names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .cloned()
            .collect()
    };
    let st = with_ext("safetensors");
    if !st.is_empty() {
        return Ok(st);
    }
    for preferred in ["checkpoint.pth", "pytorch_model.bin"] {
        let p = dir.join(preferred);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    let pth = with_ext("pth");
    if let Some(first) = pth.into_iter().next() {
        return Ok(vec![first]);
    }
    Err(Error::NoWeights {
        dir: dir.to_path_buf(),
    })
}

/// Opens one file; a `.pth` is read under key `"model"` when it has one.
fn open(dir: &Path, path: &Path) -> Result<WeightFile> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return open_weight_file_with_key(dir, path, None);
    }
    match open_weight_file_with_key(dir, path, Some("model")) {
        Ok(f) => Ok(f),
        Err(_) => open_weight_file_with_key(dir, path, None),
    }
}

/// The tensors `cfg` implies (head included), with the reason for each shape.
fn expected(cfg: &VimConfig) -> Vec<(String, Vec<usize>, String)> {
    let (d, c, p) = (cfg.embed_dim, cfg.channels, cfg.patch_size);
    let (e, n, r, k) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank, cfg.d_conv);
    let mut out = vec![
        (
            "patch_embed.proj.weight".to_string(),
            vec![d, c, p, p],
            format!("[embed_dim, channels, patch, patch] = [{d}, {c}, {p}, {p}]"),
        ),
        (
            "patch_embed.proj.bias".into(),
            vec![d],
            format!("[embed_dim] = [{d}]"),
        ),
        (
            "cls_token".into(),
            vec![1, 1, d],
            format!("[1, 1, embed_dim] = [1, 1, {d}]"),
        ),
        (
            "pos_embed".into(),
            vec![1, cfg.seq_len(), d],
            format!(
                "[1, patches + 1, embed_dim] for img_size {:?}, patch {p}, stride {}",
                cfg.img_size, cfg.stride
            ),
        ),
        (
            "norm_f.weight".into(),
            vec![d],
            format!("[embed_dim] = [{d}]"),
        ),
    ];
    for i in 0..cfg.depth {
        let l = format!("layers.{i}");
        out.push((
            format!("{l}.norm.weight"),
            vec![d],
            format!("[embed_dim] = [{d}]"),
        ));
        let m = format!("{l}.mixer");
        out.push((
            format!("{m}.in_proj.weight"),
            vec![2 * e, d],
            format!("[2·d_inner, embed_dim] = [{}, {d}]", 2 * e),
        ));
        out.push((
            format!("{m}.out_proj.weight"),
            vec![d, e],
            format!("[embed_dim, d_inner] = [{d}, {e}]"),
        ));
        for (sfx, a) in [("", "A_log"), ("_b", "A_b_log")] {
            out.push((
                format!("{m}.conv1d{sfx}.weight"),
                vec![e, 1, k],
                format!("[d_inner, 1, d_conv] = [{e}, 1, {k}]"),
            ));
            if cfg.conv_bias {
                out.push((
                    format!("{m}.conv1d{sfx}.bias"),
                    vec![e],
                    format!("[d_inner] = [{e}]"),
                ));
            }
            out.push((
                format!("{m}.x_proj{sfx}.weight"),
                vec![r + 2 * n, e],
                format!("[dt_rank + 2·d_state, d_inner] = [{}, {e}]", r + 2 * n),
            ));
            out.push((
                format!("{m}.dt_proj{sfx}.weight"),
                vec![e, r],
                format!("[d_inner, dt_rank] = [{e}, {r}]"),
            ));
            out.push((
                format!("{m}.dt_proj{sfx}.bias"),
                vec![e],
                format!("[d_inner] = [{e}]"),
            ));
            out.push((
                format!("{m}.{a}"),
                vec![e, n],
                format!("[d_inner, d_state] = [{e}, {n}]"),
            ));
            out.push((format!("{m}.D{sfx}"), vec![e], format!("[d_inner] = [{e}]")));
        }
    }
    out
}

/// `module.` (DataParallel) prefixes are dropped.
fn canonical(name: &str) -> &str {
    name.strip_prefix("module.").unwrap_or(name)
}

impl VimCheckpoint {
    pub fn load(dir: &Path, opts: &VimLoadOptions) -> Result<Self> {
        let ckpt_cfg = VimConfig::from_file(&dir.join("config.json"))?;
        let paths = weight_paths(dir)?;
        let files = paths
            .iter()
            .map(|p| open(dir, p))
            .collect::<Result<Vec<_>>>()?;
        // name → (file index, original name, shape, dtype, is_float)
        let mut found: BTreeMap<String, (usize, String, Vec<usize>, String, bool)> =
            BTreeMap::new();
        let mut problems = Vec::new();
        for (i, f) in files.iter().enumerate() {
            for (orig, shape, dtype, is_float) in f.entries() {
                let name = canonical(&orig).to_string();
                if let Some(prev) = found.get(&name) {
                    problems.push(CheckpointProblem::Duplicate {
                        tensor: name.clone(),
                        files: vec![files[prev.0].label.clone(), f.label.clone()],
                    });
                    continue;
                }
                found.insert(name, (i, orig, shape, dtype, is_float));
            }
        }
        let all_files = files
            .iter()
            .map(|f| f.label.as_str())
            .collect::<Vec<_>>()
            .join(", ");

        let mut cfg = ckpt_cfg.clone();
        if let Some(img) = opts.img_size {
            cfg.img_size = img;
        }
        if let Some(c) = opts.num_classes {
            cfg.num_classes = c;
        }
        if cfg.grid_for(cfg.img_size).is_none() || cfg.num_classes == 0 {
            return Err(Error::ConfigField {
                path: dir.join("config.json"),
                field: "img_size".into(),
                reason: format!(
                    "image {:?} with {} classes cannot be built (patch size {})",
                    cfg.img_size, cfg.num_classes, cfg.patch_size
                ),
            });
        }
        let mut notes = Vec::new();

        // Head: present with the wanted shape, or replaced.
        let head_w = found.get("head.weight").map(|f| f.2.clone());
        let head_b = found.get("head.bias").map(|f| f.2.clone());
        let want_w = vec![cfg.num_classes, cfg.embed_dim];
        let fresh_head = match (&head_w, &head_b) {
            (None, None) => {
                notes.push(format!(
                    "the checkpoint has no head; a fresh zero-initialised head of {} classes is used",
                    cfg.num_classes
                ));
                true
            }
            (Some(w), Some(b))
                if w.len() == 2 && w[1] == cfg.embed_dim && b.len() == 1 && b[0] == w[0] =>
            {
                if w[0] != cfg.num_classes {
                    notes.push(format!(
                        "the checkpoint's head has {} classes; a fresh zero-initialised head of {} classes replaces it",
                        w[0], cfg.num_classes
                    ));
                    true
                } else {
                    false
                }
            }
            _ => {
                problems.push(CheckpointProblem::Shape {
                    file: all_files.clone(),
                    tensor: "head.weight / head.bias".into(),
                    expected: want_w.clone(),
                    found: head_w.clone().unwrap_or_default(),
                    why: format!(
                        "a head needs weight [classes, embed_dim = {}] and bias [classes] (bias {:?})",
                        cfg.embed_dim, head_b
                    ),
                });
                false
            }
        };

        let mut wanted = expected(&ckpt_cfg);
        let mut names: std::collections::BTreeSet<String> =
            wanted.iter().map(|w| w.0.clone()).collect();
        names.insert("head.weight".into());
        names.insert("head.bias".into());
        if !fresh_head {
            wanted.push((
                "head.weight".into(),
                want_w.clone(),
                "[num_classes, embed_dim]".into(),
            ));
            wanted.push((
                "head.bias".into(),
                vec![cfg.num_classes],
                "[num_classes]".into(),
            ));
        }
        for (name, shape, why) in &wanted {
            match found.get(name) {
                None => problems.push(CheckpointProblem::Missing {
                    file: all_files.clone(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                    why: why.clone(),
                }),
                Some((fi, orig, got, dtype, is_float)) => {
                    if !is_float {
                        problems.push(CheckpointProblem::Dtype {
                            file: files[*fi].label.clone(),
                            tensor: orig.clone(),
                            dtype: dtype.clone(),
                        });
                    }
                    if got != shape {
                        problems.push(CheckpointProblem::Shape {
                            file: files[*fi].label.clone(),
                            tensor: orig.clone(),
                            expected: shape.clone(),
                            found: got.clone(),
                            why: why.clone(),
                        });
                    }
                }
            }
        }
        for (name, (fi, orig, shape, _, _)) in &found {
            if !names.contains(name) {
                problems.push(CheckpointProblem::Unexpected {
                    file: files[*fi].label.clone(),
                    tensor: orig.clone(),
                    shape: shape.clone(),
                });
            }
        }
        if !problems.is_empty() {
            return Err(Error::Checkpoint {
                dir: dir.to_path_buf(),
                problems,
            });
        }

        let mut tensors = HashMap::with_capacity(wanted.len() + 2);
        for (name, _, _) in &wanted {
            let Some((fi, orig, ..)) = found.get(name) else {
                continue;
            };
            let file = &files[*fi];
            let t = load_one(file, orig, &opts.load).map_err(|e| Error::WeightFile {
                path: dir.join(&file.label),
                reason: format!("tensor `{orig}`: {e}"),
            })?;
            if let Some(p) = non_finite(&t, &file.label, orig)? {
                problems.push(p);
            }
            tensors.insert(name.clone(), t);
        }
        if !problems.is_empty() {
            return Err(Error::Checkpoint {
                dir: dir.to_path_buf(),
                problems,
            });
        }
        let dev = &opts.load.device;
        let dtype = opts.load.dtype;
        if fresh_head {
            tensors.insert(
                "head.weight".into(),
                Tensor::zeros((cfg.num_classes, cfg.embed_dim), dtype, dev)?,
            );
            tensors.insert(
                "head.bias".into(),
                Tensor::zeros(cfg.num_classes, dtype, dev)?,
            );
        }
        let (from, to) = (ckpt_cfg.grid(), cfg.grid());
        if from != to {
            let pos = tensors.get("pos_embed").ok_or_else(|| {
                candle_core::Error::Msg("pos_embed vanished after validation".into())
            })?;
            let resized = resize_pos_embed(pos, from, to, cfg.cls_position, opts.pos_embed_resize)?;
            notes.push(format!(
                "pos_embed resized from a {}×{} to a {}×{} patch grid ({:?})",
                from.0, from.1, to.0, to.1, opts.pos_embed_resize
            ));
            tensors.insert("pos_embed".into(), resized);
        }
        for n in &notes {
            tracing::warn!(dir = %dir.display(), "{n}");
        }
        Ok(VimCheckpoint {
            dir: dir.to_path_buf(),
            config: cfg,
            checkpoint_config: ckpt_cfg,
            tensors,
            weight_files: paths,
            notes,
            fresh_head,
            load: opts.load.clone(),
        })
    }

    /// Inference build: frozen tensors.
    pub fn into_frozen(self) -> Result<VimForImageClassification> {
        let vb = VarBuilder::from_tensors(self.tensors, self.load.dtype, &self.load.device);
        VimForImageClassification::new(&self.config, vb)
    }

    /// Full fine-tuning build: every tensor a `Var` in the returned map, under its official
    /// name.
    pub fn into_trainable(self) -> Result<(VimForImageClassification, VarMap)> {
        let varmap = var_map(self.tensors)?;
        let vb = VarBuilder::from_varmap(&varmap, self.load.dtype, &self.load.device);
        let model = VimForImageClassification::new(&self.config, vb)?;
        Ok((model, varmap))
    }
}

impl VimForImageClassification {
    /// Loads a Vim folder for inference, as the checkpoint was trained.
    pub fn load(dir: &Path, opts: &VimLoadOptions) -> Result<Self> {
        VimCheckpoint::load(dir, opts)?.into_frozen()
    }
}
