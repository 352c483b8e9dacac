//! Merging an adapter into its base model (spec §4–§5 "Merge"):
//! - LoRA family, DoRA, ProDiaL, partial deltas, BitFit, probe, full: into the base weights
//!   (read back from each seam's composite, so merged = the adapted forward's own weights).
//! - LoRA(embedding): the merged matrix becomes the input embedding and the original stays
//!   as an untied `lm_head.weight`.
//! - Additional-scan: into an expanded-state model (d_state N + N′, A_log and x_proj
//!   widened); the config records the new state size.
//! - Prompt/affix: a projection collapses to its fixed table, kept as a residual adapter on
//!   the merged model; with [`MergeOptions::prefix_as_initial_state`] a prefix prompt/affix
//!   becomes per-layer initial conv inputs and SSM states instead (spec §4.8).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};

use super::adapter::Adapter;
use super::affix::AffixKind;
use super::error::{PeftError, PeftResult};
use super::prompt::PromptKind;
use super::sites::Sites;
use super::spec::{AdapterSpec, head_shapes};
use super::target::{MixerSites, PeftModel, mixer_sites};
use super::{MergePlan, MethodConfig};
use crate::model::lm_checkpoint::{LmCheckpoint, LmConfig};
use crate::model::{
    AnyLm, CausalLm, LayerCache, MambaCache, MambaForCausalLM, MambaMixer, ModelInput,
};

/// How to merge.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Fold a prefix prompt/affix into per-layer initial states (no extra positions at
    /// inference).
    pub prefix_as_initial_state: bool,
}

/// Per layer, the state a prefix leaves behind: the last K−1 pre-conv inputs `[E, K−1]`
/// (oldest first) and the SSM state `[E, N]`.
#[derive(Clone, Debug)]
pub struct InitialState {
    pub layers: Vec<(Tensor, Tensor)>,
}

impl InitialState {
    /// A decoding cache for `batch` sequences that starts from this state.
    pub fn to_cache(&self, batch: usize, dtype: DType) -> PeftResult<MambaCache> {
        let layers = self
            .layers
            .iter()
            .map(|(conv, ssm)| {
                let (e, _) = conv.dims2()?;
                let conv = Tensor::cat(
                    &[&Tensor::zeros((e, 1), conv.dtype(), conv.device())?, conv],
                    1,
                )?
                .to_dtype(dtype)?;
                let k = conv.dim(1)?;
                let n = ssm.dim(1)?;
                Ok(LayerCache {
                    conv: conv
                        .unsqueeze(0)?
                        .broadcast_as((batch, e, k))?
                        .contiguous()?,
                    ssm: ssm
                        .to_dtype(DType::F32)?
                        .unsqueeze(0)?
                        .broadcast_as((batch, e, n))?
                        .contiguous()?,
                })
            })
            .collect::<PeftResult<Vec<_>>>()?;
        Ok(MambaCache {
            layers,
            seqlen_offset: 0,
        })
    }
}

/// A merged model of any family: plain weights (checkpoint names), plus what has no weight
/// form.
#[derive(Debug)]
pub struct MergedModel<M = MambaForCausalLM> {
    /// The merged weights as a plain model (config updated: state size, untied head).
    pub base: M,
    /// Collapsed prompt/affix tables, as an adapter on `base`.
    pub residual: Option<Adapter>,
    /// Mamba-1's prefix folded into initial states ([`MergeOptions`]).
    pub initial_state: Option<InitialState>,
}

impl<M: PeftModel> MergedModel<M> {
    /// Every merged weight under its checkpoint name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.base.named_weights().into_iter().collect()
    }

    /// The runnable model: merged weights plus the residual adapter (the initial state, if
    /// any, is applied by [`MergedModel::forward`] through the cache).
    pub fn model(&self) -> PeftResult<M> {
        match &self.residual {
            Some(r) => r.apply_frozen(&self.base),
            None => Ok(self.base.clone()),
        }
    }
}

impl MergedModel {
    /// Logits `[b, L, V]`.
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> PeftResult<Tensor> {
        let model = self.model()?;
        let Some(state) = &self.initial_state else {
            return Ok(model.forward(input_ids, mask)?);
        };
        let input = ModelInput::new(input_ids, mask, model.vocab_size())?;
        let embeds = model.embed(&input.input_ids)?;
        let mut cache = state.to_cache(embeds.dim(0)?, model.dtype())?;
        let h = model.backbone.forward_embeds(
            &embeds,
            input.attention_mask.as_ref(),
            Some(&mut cache),
            None,
        )?;
        Ok(model.logits(&h)?)
    }
}

impl<M: MixerSites> MergedModel<CausalLm<M>> {
    /// Writes an HF-format checkpoint (`config.json` + `model.safetensors`) that molt's
    /// loader reads; a residual adapter goes beside it (`adapter_config.json` +
    /// `adapter_model.safetensors`), an initial state to `initial_state.safetensors`.
    pub fn save(&self, dir: &Path) -> PeftResult<()> {
        save_merged(self, &self.base.config().to_hf_json(), dir)
    }
}

impl MergedModel<AnyLm> {
    /// [`MergedModel::save`] for a language model of either family.
    pub fn save(&self, dir: &Path) -> PeftResult<()> {
        save_merged(self, &self.base.config_json(), dir)
    }
}

impl MergedModel<crate::model::vim::VimForImageClassification> {
    /// Writes a Vim checkpoint folder that molt's Vim loader reads: `base_config` (the base's
    /// `config.json`) with the merged head's class count, `model.safetensors`, and a residual
    /// adapter beside them.
    pub fn save(&self, base_config: &serde_json::Value, dir: &Path) -> PeftResult<()> {
        let mut config = base_config.clone();
        if let Some(o) = config.as_object_mut() {
            o.insert(
                "num_classes".into(),
                serde_json::json!(self.base.config.num_classes),
            );
        }
        save_merged(self, &config, dir)
    }
}

fn save_merged<M: PeftModel>(
    merged: &MergedModel<M>,
    config: &serde_json::Value,
    dir: &Path,
) -> PeftResult<()> {
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = serde_json::to_string_pretty(config)
        .map_err(|e| PeftError::file(dir.join("config.json"), e.to_string()))?;
    let path = dir.join("config.json");
    std::fs::write(&path, config).map_err(|source| PeftError::Io { path, source })?;
    let tensors: HashMap<String, Tensor> = merged
        .base
        .named_weights()
        .into_iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect::<PeftResult<_>>()?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| PeftError::file(&path, e.to_string()))?;
    if let Some(r) = &merged.residual {
        r.save(dir)?;
    }
    if let Some(s) = &merged.initial_state {
        let mut t = HashMap::new();
        for (i, (conv, ssm)) in s.layers.iter().enumerate() {
            t.insert(format!("layers.{i}.conv_inputs"), conv.contiguous()?);
            t.insert(format!("layers.{i}.ssm_state"), ssm.contiguous()?);
        }
        let path = dir.join("initial_state.safetensors");
        candle_core::safetensors::save(&t, &path)
            .map_err(|e| PeftError::file(&path, e.to_string()))?;
    }
    Ok(())
}

/// Merges `adapter` into `base` (checked to be its base): the weight-form methods into the
/// weights, the rest (collapsed prompt/affix tables) into a residual adapter.
pub(crate) fn merge<M: PeftModel>(adapter: &Adapter, base: &M) -> PeftResult<MergedModel<M>> {
    let params = adapter.params();
    let mut sites = Sites::new(base, adapter.runtime().clone());
    let mut residual_cfgs = Vec::new();
    let mut residual_tensors = HashMap::new();
    for m in &adapter.spec().methods {
        match m.method().merge_plan(&params)? {
            MergePlan::Weights => m.method().attach(&params, &mut sites)?,
            MergePlan::Residual(cfg, tensors) => {
                residual_cfgs.push(cfg);
                residual_tensors.extend(tensors);
            }
        }
    }
    if let Some((w, b)) = adapter.head_tensors() {
        sites.set_head(w, b)?;
    }
    let adapted = sites.build(base)?;
    let merged_base = adapted.merged_weights(base)?;
    let residual = if residual_cfgs.is_empty() {
        None
    } else {
        // A classification model's adapters carry its head: the merged one, unchanged.
        let merged_tensors = merged_base.named_weights();
        for (name, _) in head_shapes(&merged_base.peft_shape()) {
            if let Some((_, t)) = merged_tensors.iter().find(|(n, _)| *n == name) {
                residual_tensors.insert(name, t.clone());
            }
        }
        Some(Adapter::from_tensors(
            &AdapterSpec::hybrid(residual_cfgs),
            &merged_base,
            residual_tensors,
        )?)
    };
    Ok(MergedModel {
        base: merged_base,
        residual,
        initial_state: None,
    })
}

/// Reads the merged value of every seam of `adapted` (built on `base`), for any language
/// family.
pub(crate) fn merged_weights<M: MixerSites>(
    adapted: &CausalLm<M>,
    base: &CausalLm<M>,
) -> PeftResult<CausalLm<M>> {
    let not_mergeable = |what: &str| PeftError::NotMergeable {
        method: what.to_string(),
        reason: "a part attached there has no merged form".into(),
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let emb = &adapted.backbone.embeddings;
    let emb_w = match emb.adapter() {
        Some(a) => a
            .merged_weight(emb.weight())?
            .ok_or_else(|| not_mergeable("embedding"))?,
        None => emb.weight().detach(),
    };
    t.insert("backbone.embeddings.weight".into(), emb_w);
    let head = match (&adapted.lm_head, emb.adapter()) {
        (Some(h), _) => Some(h.detach()),
        // The embedding LoRA changes the input lookup only: untie, keep the original head.
        (None, Some(_)) => Some(base.backbone.embeddings.weight().detach()),
        (None, None) => None,
    };
    for (i, block) in adapted.backbone.layers.iter().enumerate() {
        let p = format!("backbone.layers.{i}");
        t.insert(format!("{p}.norm.weight"), block.norm.weight().detach());
        let sites = mixer_sites(&block.mixer);
        for (name, pr) in sites.projections {
            let w = match pr.adapter() {
                Some(a) => a
                    .merged_weight(pr.base())?
                    .ok_or_else(|| not_mergeable(&format!("layer {i} {name}")))?,
                None => pr.base().weight().detach(),
            };
            t.insert(format!("{p}.mixer.{name}.weight"), w);
            if let Some(b) = pr.base().bias() {
                t.insert(format!("{p}.mixer.{name}.bias"), b.detach());
            }
        }
        for (name, param) in sites.params {
            t.insert(format!("{p}.mixer.{name}"), param.value()?.detach());
        }
    }
    t.insert(
        "backbone.norm_f.weight".into(),
        adapted.backbone.norm_f.weight().detach(),
    );
    let cfg = M::merged_config(base.config(), &t, head.is_some())?;
    if let Some(h) = head {
        t.insert("lm_head.weight".into(), h);
    }
    Ok(LmCheckpoint::from_tensors("merged adapter", cfg, t)?.into_frozen()?)
}

/// Replaces a residual prefix prompt/affix by the states it leaves in each layer.
pub(crate) fn fold_prefix(merged: &mut MergedModel) -> PeftResult<()> {
    let Some(residual) = merged.residual.take() else {
        return Err(PeftError::Contradictory(
            "prefix_as_initial_state: the adapter has no prompt or affix to fold".into(),
        ));
    };
    for m in &residual.spec().methods {
        let ok = match m {
            MethodConfig::Prompt(p) => p.kind == PromptKind::Prefix,
            MethodConfig::Affix(a) => a.kind == AffixKind::Prefix,
            _ => false,
        };
        if !ok {
            return Err(PeftError::Contradictory(format!(
                "prefix_as_initial_state folds prefix prompts/affixes only; `{}` is {}",
                m.method().kind(),
                serde_json::to_string(m).unwrap_or_default()
            )));
        }
    }
    let model = residual.apply_frozen(&merged.base)?;
    let prompt = residual
        .vars()
        .get("prompt.table")
        .map(|v| v.as_tensor().detach());
    let mut layers = Vec::new();
    match prompt {
        Some(table) => {
            // The prompt runs through every layer (with the affix hooks, if any); the cache
            // then holds exactly what the prefix leaves behind.
            let mut cache = model.new_cache(1)?;
            let embeds = table.unsqueeze(0)?.to_dtype(model.dtype())?;
            model
                .backbone
                .forward_embeds(&embeds, None, Some(&mut cache), None)?;
            for l in &cache.layers {
                let k = l.conv.dim(2)?;
                let conv = l.conv.narrow(2, 1, k - 1)?.squeeze(0)?.contiguous()?;
                layers.push((conv, l.ssm.squeeze(0)?));
            }
        }
        None => {
            let table = residual
                .vars()
                .get("affix.table")
                .map(|v| v.as_tensor().detach())
                .ok_or_else(|| PeftError::Tensors {
                    problems: vec!["missing `affix.table`".into()],
                })?;
            let width = 2 * model.config().intermediate_size;
            for (i, block) in model.backbone.layers.iter().enumerate() {
                let tokens = table.narrow(1, i * width, width)?;
                layers.push(affix_state(&block.mixer, &tokens)?);
            }
        }
    }
    merged.initial_state = Some(InitialState { layers });
    Ok(())
}

/// The conv inputs and SSM state after running a layer's conv and scan on affix tokens
/// `[n, 2E]` alone (their X half; the Z half gates only dropped outputs).
fn affix_state(m: &MambaMixer, tokens: &Tensor) -> PeftResult<(Tensor, Tensor)> {
    let e = m.d_inner();
    let n_tok = tokens.dim(0)?;
    let x = tokens.narrow(1, 0, e)?.unsqueeze(0)?.contiguous()?; // [1, n, E]
    // The state does not depend on the gate; the Z half is passed for the branch's shape.
    let z = tokens.narrow(1, e, e)?.unsqueeze(0)?.contiguous()?;
    let (_, last) = m
        .branch()
        .forward(&x, &z, crate::model::BranchInput::default())?;
    let k = m.conv_kernel();
    let xt = x.squeeze(0)?.t()?; // [E, n]
    let conv = if n_tok >= k - 1 {
        xt.narrow(1, n_tok - (k - 1), k - 1)?
    } else {
        xt.pad_with_zeros(1, k - 1 - n_tok, 0)?
    };
    Ok((conv.contiguous()?, last.squeeze(0)?))
}
