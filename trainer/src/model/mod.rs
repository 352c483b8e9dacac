//! Model families behind one seam.
//!
//! # The seam
//!
//! The rest of molt (PEFT, training, the worker, serving, the API) asks a model family, never
//! a concrete architecture. A family is one folder under `model/` (`mamba/`, `mamba2/`,
//! `vim/`) plus one registry line in [`family`]:
//!
//! | question | where it is answered | Mamba-1 | Mamba-2 | Vim |
//! | --- | --- | --- | --- | --- |
//! | which family is this `config.json`? | [`family::detect`] | HF `model_type: "mamba"`, state-spaces `d_model` | HF `model_type: "mamba2"`, `ssm_cfg.layer: "Mamba2"` | `bimamba_type` / `img_size` + `patch_size` + `embed_dim` |
//! | how is it loaded? | [`load`] → [`AnyModel`]; [`AnyLm::load`] for language models | [`lm_checkpoint::LmCheckpoint`] with [`MambaConfig`] | the same loader with [`mamba2::Mamba2Config`] | [`vim::VimCheckpoint`] (official names, `.pth` under `"model"`, fresh head, `pos_embed` resize) |
//! | what computes a layer? | [`lm::Mixer`] inside the shared [`lm::CausalLm`] shell (embedding, blocks, head, cache, prefill, decode) | [`MambaMixer`] (the [`selective`] branch) | [`mamba2::Mamba2Mixer`] (SSD scan, gated norm) | its own bidirectional mixer (two [`selective`] branches) |
//! | which PEFT sites does it have? | `peft::PeftBase` / `peft::PeftModel`; for language families through `peft::MixerSites` | in_proj, x_proj, dt_proj, out_proj; A_log, D, conv, dt_proj.bias | in_proj (slices z, x, B, C, dt), out_proj; per-head A_log, D, dt_bias; conv over xBC; norm.weight | the branch sites twice (`Dir::Bwd` = the `_b` tensors), in/out_proj once, plus `cls_token`, `pos_embed` and the head |
//! | task head and loss | [`Family::task`] | next token, [`causal_lm_loss`] | next token | class at the class token, [`vim::classification_loss`] |
//! | input pipeline | [`Family::task`] | tokenizer | tokenizer | image transform |
//! | serving entry points | [`AnyLm`] (serving, training), [`AnyModel`] | generation, scoring | generation, scoring | classification (`forward` → logits) |
//!
//! Shared building blocks are written once: [`layers`] (Linear/Projection with adapters,
//! Param, RmsNorm), the kernels (`crate::kernels`), the language-model shell ([`lm`], with
//! [`rows`] for serving's row-segmented batches and [`cache`]), the loader
//! ([`lm_checkpoint`], [`weights`], `fields` for `config.json`), and the Mamba-1 selective
//! branch ([`selective`]: conv1d → x_proj → dt_proj → scan, gated by SiLU(z)), which Mamba-1's
//! mixer runs once and Vim's mixer runs twice. Mamba-2 shares the shell, not the branch.
//!
//! PEFT reaches a family through `peft::target`: a [`peft::ModelShape`](crate::peft::ModelShape)
//! (sizes, scan directions, vision sizes, Mamba-2's SSD layout), read access to each site's
//! base tensor for initialisation, and installation of the folded composites. Every method
//! is written once against those; a bidirectional family gets one instance per direction of
//! each branch site; a method a family cannot host is refused naming the family.
//!
//! A bidirectional family runs its backward branch through the same kernels with
//! `BranchInput::reverse` (scan from the last row, anti-causal conv): no flipped copies.
//!
//! ```no_run
//! # fn main() -> trainer::Result<()> {
//! use trainer::model::{LoadOptions, MambaForCausalLM};
//! let model = MambaForCausalLM::load("models/mamba-130m".as_ref(), &LoadOptions::default())?;
//! # Ok(()) }
//! ```

pub mod any_lm;
pub mod cache;
pub mod family;
pub(crate) mod fields;
pub(crate) mod fused;
pub mod layers;
pub mod lm;
pub mod lm_checkpoint;
pub mod loss;
pub mod mamba;
pub mod mamba2;
pub mod rows;
pub mod selective;
pub mod vim;
pub mod weights;

// Mamba-1's modules keep their paths (`model::checkpoint`, `model::config`, …).
pub use mamba::{checkpoint, config, init};

pub use any_lm::{AnyLm, LanguageModel};
pub use cache::{LayerCache, MambaCache};
pub use checkpoint::{Checkpoint, LoadOptions};
pub use config::{ConfigStyle, MambaConfig};
pub use family::{Family, Task, detect};
pub use layers::{
    Embedding, EmbeddingAdapter, Linear, LinearAdapter, LowRankTerm, Param, ParamAdapter,
    Projection, RmsNorm, RowSegments,
};
pub use lm::{Backbone, Block, CausalLm, ForwardOutput, InputHook, Mixer, ModelInput};
pub use loss::{IGNORE_INDEX, causal_lm_loss};
pub use mamba::{MambaBlock, MambaForCausalLM, MambaMixer, MambaModel, MixerHook};
pub use selective::{BranchInput, BranchRef, SelectiveBranch};

use std::path::Path;

/// A loaded model of any family: what serving and training hold.
#[derive(Clone, Debug)]
pub enum AnyModel {
    Mamba(MambaForCausalLM),
    Vim(vim::VimForImageClassification),
    Mamba2(mamba2::Mamba2ForCausalLM),
}

impl AnyModel {
    pub fn family(&self) -> Family {
        match self {
            AnyModel::Mamba(_) => Family::Mamba,
            AnyModel::Vim(_) => Family::Vim,
            AnyModel::Mamba2(_) => Family::Mamba2,
        }
    }
}

/// Detects the family of the folder `dir` and loads it for inference (frozen weights).
pub fn load(dir: &Path, opts: &LoadOptions) -> crate::Result<AnyModel> {
    Ok(match family::detect_dir(dir)? {
        Family::Mamba => AnyModel::Mamba(MambaForCausalLM::load(dir, opts)?),
        Family::Mamba2 => AnyModel::Mamba2(mamba2::Mamba2ForCausalLM::load(dir, opts)?),
        Family::Vim => AnyModel::Vim(vim::VimForImageClassification::load(
            dir,
            &vim::VimLoadOptions {
                load: opts.clone(),
                ..Default::default()
            },
        )?),
    })
}

/// Detects the family of a parsed `config.json` and checks it with that family's parser
/// (every field the family reads, every size bounded); `path` is only used in messages.
pub fn check_config(config: &serde_json::Value, path: &Path) -> crate::Result<CheckedConfig> {
    let family = family::detect(config, path)?;
    let vocab_size = match family {
        Family::Mamba => Some(MambaConfig::from_json_str(&config.to_string(), path)?.vocab_size),
        Family::Mamba2 => Some(mamba2::Mamba2Config::from_value(config, path)?.vocab_size),
        Family::Vim => {
            vim::VimConfig::from_value(config, path)?;
            None
        }
    };
    Ok(CheckedConfig { family, vocab_size })
}

/// What [`check_config`] learns from a valid config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedConfig {
    pub family: Family,
    /// Embedding rows of a language model (after any padding the config asks for).
    pub vocab_size: Option<usize>,
}
