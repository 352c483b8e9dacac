//! The baselines the papers compare against (spec §3): full fine-tuning, BitFit, linear
//! probing, and SLL ("Strong") LoRA.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::lora::{LoraConfig, check_rank, check_scale};
use super::sites::{ParamPart, ParamSite, Sites, Slot, Stage};
use super::spec::head_shapes;
use super::target::{ModelShape, PeftBase, base_param};
use super::{ParamGroup, ParamShape, Params, PeftMethod};
use crate::model::MambaConfig;

/// Every weight of a Mamba-1 LM with `cfg`'s shapes, under HF names (shape-only).
pub(crate) fn base_shapes(cfg: &MambaConfig) -> Vec<ParamShape> {
    let (d, e, n, r) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.state_size,
        cfg.time_step_rank,
    );
    let k = cfg.conv_kernel;
    let mut out = vec![(
        "backbone.embeddings.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("backbone.layers.{i}");
        let m = format!("{p}.mixer");
        out.push((format!("{p}.norm.weight"), vec![d]));
        out.push((format!("{m}.in_proj.weight"), vec![2 * e, d]));
        if cfg.use_bias {
            out.push((format!("{m}.in_proj.bias"), vec![2 * e]));
        }
        out.push((format!("{m}.conv1d.weight"), vec![e, 1, k]));
        if cfg.use_conv_bias {
            out.push((format!("{m}.conv1d.bias"), vec![e]));
        }
        out.push((format!("{m}.x_proj.weight"), vec![r + 2 * n, e]));
        out.push((format!("{m}.dt_proj.weight"), vec![e, r]));
        out.push((format!("{m}.dt_proj.bias"), vec![e]));
        out.push((format!("{m}.A_log"), vec![e, n]));
        out.push((format!("{m}.D"), vec![e]));
        out.push((format!("{m}.out_proj.weight"), vec![d, e]));
        if cfg.use_bias {
            out.push((format!("{m}.out_proj.bias"), vec![d]));
        }
    }
    out.push(("backbone.norm_f.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    out
}

/// `{"type": "full", "lr": 5e-5, "weight_decay": 0, "decay_to_pretrained": false}`: every
/// weight trains. With `decay_to_pretrained`, decay pulls toward the pretrained weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub decay_to_pretrained: bool,
}

impl PeftMethod for FullConfig {
    fn kind(&self) -> &'static str {
        "full"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, _cfg: &ModelShape) -> PeftResult<()> {
        Ok(())
    }

    /// Every base weight, except a classification head (trained under every method).
    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let head: Vec<String> = head_shapes(cfg).into_iter().map(|(n, _)| n).collect();
        cfg.weights
            .iter()
            .filter(|(n, _)| !head.contains(n))
            .cloned()
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let names: Vec<String> = self
            .parameters(&base.peft_shape())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        base.named_weights()
            .into_iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, t)| Ok((n, t.to_dtype(rng.dtype())?.copy()?)))
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let cfg = sites.config().clone();
        // The base's values for what this method does not train (a head), then its own.
        let mut tensors: HashMap<String, Tensor> =
            sites.base().named_weights().into_iter().collect();
        for (name, _) in self.parameters(&cfg) {
            tensors.insert(name.clone(), params.get(&name)?);
        }
        sites.set_replacement(tensors)
    }

    fn groups(
        &self,
        index: usize,
        params: Vec<(String, Var)>,
        base: &dyn PeftBase,
    ) -> PeftResult<Vec<ParamGroup>> {
        let decay_toward = if self.decay_to_pretrained {
            let weights: HashMap<String, Tensor> = base.named_weights().into_iter().collect();
            let v = params
                .iter()
                .map(|(n, _)| {
                    weights.get(n).cloned().ok_or_else(|| PeftError::Tensors {
                        problems: vec![format!("base model has no `{n}`")],
                    })
                })
                .collect::<PeftResult<Vec<_>>>()?;
            Some(v)
        } else {
            None
        };
        Ok(vec![ParamGroup {
            name: format!("{index}:full"),
            params,
            lr: self.lr,
            weight_decay: self.weight_decay,
            decay_toward,
        }])
    }
}

/// `{"type": "bitfit"}`: every bias trains — in Mamba-1, conv1d.bias and dt_proj.bias
/// (spec §3.3; 73,728 for mamba-130m); on Vim the same biases of both scan directions
/// (`conv1d_b.bias`, `dt_proj_b.bias`; the patch embedding's bias stays frozen, and the head
/// trains anyway). Stored as the trained biases themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitFitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

/// Every bias site with its adapter tensor name (`layers.{i}.dt_proj_b.bias`).
fn bitfit_sites(cfg: &ModelShape) -> Vec<(ParamSite, String)> {
    let mut slots = Vec::new();
    if cfg.use_conv_bias {
        slots.push(Slot::ConvBias);
    }
    slots.push(if cfg.ssd.is_some() {
        Slot::HeadDtBias
    } else {
        Slot::DtBias
    });
    let mut v = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        for &slot in &slots {
            for &dir in &cfg.directions {
                let site = ParamSite::Mixer(i, slot, dir);
                v.push((site, site.name()));
            }
        }
    }
    v
}

impl PeftMethod for BitFitConfig {
    fn kind(&self) -> &'static str {
        "bitfit"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        if cfg.use_bias {
            return Err(PeftError::UnknownTarget {
                method: "bitfit".into(),
                target: "in_proj.bias/out_proj.bias".into(),
                valid: vec![
                    "conv1d.bias".into(),
                    if cfg.ssd.is_some() {
                        "dt_bias"
                    } else {
                        "dt_proj.bias"
                    }
                    .into(),
                ],
            });
        }
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        bitfit_sites(cfg)
            .into_iter()
            .map(|(site, n)| match site {
                ParamSite::Mixer(_, slot, _) => (n, cfg.slot_shape(slot)),
                _ => (n, Vec::new()),
            })
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        bitfit_sites(&base.peft_shape())
            .into_iter()
            .map(|(site, n)| Ok((n, base_param(base, site)?.to_dtype(rng.dtype())?.copy()?)))
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        for (site, n) in bitfit_sites(sites.config()) {
            let pretrained = base_param(sites.base(), site)?.clone();
            sites.add_param(
                site,
                Arc::new(Shift {
                    trained: params.get(&n)?,
                    pretrained,
                }),
            );
        }
        Ok(())
    }
}

/// The trained bias as a shift of the current value, `P + (trained − pretrained)`, so it
/// composes with partial tuning. Computed on every call: the trained tensor changes in place
/// with each optimizer step.
#[derive(Debug)]
struct Shift {
    trained: Tensor,
    pretrained: Tensor,
}

impl ParamPart for Shift {
    fn stage(&self) -> Stage {
        Stage::Transform
    }

    fn value(&self, current: &Tensor) -> candle_core::Result<Tensor> {
        let delta = (&self.trained - self.pretrained.to_dtype(self.trained.dtype())?)?;
        current + delta.to_dtype(current.dtype())?
    }
}

/// `{"type": "linear_probe"}`: only the LM head trains (untied from the embedding; it
/// starts as the current head). On a classification model only its head trains, which every
/// adapter of that model carries: the method adds nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearProbeConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl PeftMethod for LinearProbeConfig {
    fn kind(&self) -> &'static str {
        "linear_probe"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, _cfg: &ModelShape) -> PeftResult<()> {
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        match cfg.vocab_size {
            Some(v) => vec![("lm_head.weight".into(), vec![v, cfg.hidden_size])],
            None => Vec::new(),
        }
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        if base.peft_shape().vocab_size.is_none() {
            return Ok(Vec::new());
        }
        let weights: HashMap<String, Tensor> = base.named_weights().into_iter().collect();
        let head = weights
            .get("lm_head.weight")
            .or_else(|| base.token_embedding())
            .ok_or_else(|| PeftError::Tensors {
                problems: vec!["the base model has no LM head or token embedding".into()],
            })?;
        Ok(vec![(
            "lm_head.weight".into(),
            head.to_dtype(rng.dtype())?.copy()?,
        )])
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        if sites.config().vocab_size.is_none() {
            return Ok(());
        }
        sites.set_lm_head(params.get("lm_head.weight")?)
    }
}

fn default_sll_r() -> usize {
    8
}
fn default_sll_s() -> f64 {
    1.0
}

/// `{"type": "sll_lora", "r": 8, "s": 1.0}`: LoRA with one rank on x_proj, in_proj,
/// out_proj and the token embedding (Halloran et al.; MambaPEFT preset `lora_sll`, r = 8·k
/// for the k-th model size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SllLoraConfig {
    #[serde(default = "default_sll_r")]
    pub r: usize,
    #[serde(default = "default_sll_s")]
    pub s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl SllLoraConfig {
    fn as_lora(&self) -> LoraConfig {
        let mut l = LoraConfig::new(
            &["x_proj", "in_proj", "out_proj", "embedding"],
            self.r,
            self.s,
        );
        l.lr = self.lr;
        l.weight_decay = self.weight_decay;
        l
    }
}

impl PeftMethod for SllLoraConfig {
    fn kind(&self) -> &'static str {
        "sll_lora"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        check_scale("sll_lora", "s", self.s)?;
        // The smallest matrix bounds the shared rank.
        cfg.require_selective("sll_lora")?;
        let (o, i) = super::sites::Proj::X.shape(cfg);
        check_rank("sll_lora", "x_proj", self.r, o, i)?;
        self.as_lora().validate(cfg)
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        self.as_lora().parameters(cfg)
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.as_lora().init(base, rng)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        self.as_lora().attach(params, sites)
    }
}
