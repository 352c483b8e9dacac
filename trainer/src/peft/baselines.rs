//! The baselines the papers compare against (spec §3): full fine-tuning, BitFit, linear
//! probing, and SLL ("Strong") LoRA.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::lora::{LoraConfig, check_rank, check_scale};
use super::sites::{ParamPart, Sites, Slot, Stage, dims};
use super::{ParamGroup, ParamShape, Params, PeftMethod};
use crate::model::{MambaConfig, MambaForCausalLM};

/// Every weight of a Mamba-1 LM with `cfg`'s shapes, under HF names (shape-only).
pub(crate) fn base_shapes(cfg: &MambaConfig) -> Vec<ParamShape> {
    let (d, e, n, r) = dims(cfg);
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

    fn validate(&self, _cfg: &MambaConfig) -> PeftResult<()> {
        Ok(())
    }

    fn parameters(&self, cfg: &MambaConfig) -> Vec<ParamShape> {
        base_shapes(cfg)
    }

    fn init(&self, base: &MambaForCausalLM, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        base.named_weights()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(rng.dtype())?.copy()?)))
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let cfg = sites.config().clone();
        let mut tensors = HashMap::new();
        for (name, _) in base_shapes(&cfg) {
            tensors.insert(name.clone(), params.get(&name)?);
        }
        let base = sites.base();
        let vb = VarBuilder::from_tensors(tensors, base.dtype(), base.device());
        sites.set_replacement(MambaForCausalLM::new(&cfg, vb)?)
    }

    fn groups(
        &self,
        index: usize,
        params: Vec<(String, Var)>,
        base: &MambaForCausalLM,
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
/// (spec §3.3; 73,728 for mamba-130m). Stored as the trained biases themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitFitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

fn bitfit_slots(cfg: &MambaConfig) -> Vec<(Slot, &'static str)> {
    let mut v = Vec::new();
    if cfg.use_conv_bias {
        v.push((Slot::ConvBias, "conv1d.bias"));
    }
    v.push((Slot::DtBias, "dt_proj.bias"));
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

    fn validate(&self, cfg: &MambaConfig) -> PeftResult<()> {
        if cfg.use_bias {
            return Err(PeftError::UnknownTarget {
                method: "bitfit".into(),
                target: "in_proj.bias/out_proj.bias".into(),
                valid: vec!["conv1d.bias".into(), "dt_proj.bias".into()],
            });
        }
        Ok(())
    }

    fn parameters(&self, cfg: &MambaConfig) -> Vec<ParamShape> {
        let e = cfg.intermediate_size;
        (0..cfg.num_hidden_layers)
            .flat_map(|i| {
                bitfit_slots(cfg)
                    .into_iter()
                    .map(move |(_, n)| (format!("layers.{i}.{n}"), vec![e]))
            })
            .collect()
    }

    fn init(&self, base: &MambaForCausalLM, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, block) in base.backbone.layers.iter().enumerate() {
            let m = &block.mixer;
            if let Some(b) = &m.conv_bias {
                out.push((
                    format!("layers.{i}.conv1d.bias"),
                    b.base().to_dtype(rng.dtype())?.copy()?,
                ));
            }
            out.push((
                format!("layers.{i}.dt_proj.bias"),
                m.dt_bias.base().to_dtype(rng.dtype())?.copy()?,
            ));
        }
        Ok(out)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let cfg = sites.config().clone();
        for i in 0..cfg.num_hidden_layers {
            for (slot, n) in bitfit_slots(&cfg) {
                let mixer = &sites
                    .base()
                    .backbone
                    .layers
                    .get(i)
                    .ok_or_else(|| PeftError::Contradictory(format!("no layer {i}")))?
                    .mixer;
                let base = match slot {
                    Slot::ConvBias => mixer.conv_bias.as_ref().map(|b| b.base().clone()),
                    _ => Some(mixer.dt_bias.base().clone()),
                };
                let Some(base) = base else { continue };
                sites.add_param(
                    i,
                    slot,
                    Arc::new(Shift {
                        trained: params.get(&format!("layers.{i}.{n}"))?,
                        pretrained: base,
                    }),
                );
            }
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
/// starts as the current head).
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

    fn validate(&self, _cfg: &MambaConfig) -> PeftResult<()> {
        Ok(())
    }

    fn parameters(&self, cfg: &MambaConfig) -> Vec<ParamShape> {
        vec![(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, cfg.hidden_size],
        )]
    }

    fn init(&self, base: &MambaForCausalLM, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let head = base
            .lm_head
            .as_ref()
            .unwrap_or_else(|| base.backbone.embeddings.weight());
        Ok(vec![(
            "lm_head.weight".into(),
            head.to_dtype(rng.dtype())?.copy()?,
        )])
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
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

    fn validate(&self, cfg: &MambaConfig) -> PeftResult<()> {
        check_scale("sll_lora", "s", self.s)?;
        // The smallest matrix bounds the shared rank.
        let (o, i) = super::sites::Proj::X.shape(cfg);
        check_rank("sll_lora", "x_proj", self.r, o, i)?;
        self.as_lora().validate(cfg)
    }

    fn parameters(&self, cfg: &MambaConfig) -> Vec<ParamShape> {
        self.as_lora().parameters(cfg)
    }

    fn init(&self, base: &MambaForCausalLM, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.as_lora().init(base, rng)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        self.as_lora().attach(params, sites)
    }
}
