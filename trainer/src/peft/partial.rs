//! Partial tuning, MambaPEFT's "v2" form (spec §4.1): a zero-initialised delta δ beside a
//! frozen tensor P, used as P + δ. AdamW's decoupled decay on δ is exactly decay toward the
//! pretrained value. A-tuning is in log space (A = −exp(A_log + δ)). Merge: P ← P + δ.
//!
//! On a bidirectional model each branch tensor gets one delta per scan direction, named after
//! the tensor (`layers.{i}.A_b_log.delta`); a vision model adds CLS-token and pos-embed tuning
//! (`cls_token.delta` `[1, 1, D]`, `pos_embed.delta` `[1, M+1, D]`).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::sites::{ParamPart, ParamSite, Sites, Slot, Stage};
use super::target::{ModelShape, PeftBase};
use super::{ParamShape, Params, PeftMethod};

/// Which tensor a partial-tuning delta adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialTarget {
    ALog,
    D,
    Conv1d,
    DtBias,
    /// Mamba-2: the gated RMSNorm's weight.
    Norm,
    /// Vision: the class token.
    ClsToken,
    /// Vision: the position embedding.
    PosEmbed,
}

pub(crate) const PARTIAL_TARGETS: &[&str] = &[
    "A_log",
    "D",
    "conv1d.weight",
    "dt_proj.bias",
    "dt_bias",
    "norm.weight",
    "cls_token",
    "pos_embed",
];

impl PartialTarget {
    pub fn parse(s: &str) -> PeftResult<Self> {
        Ok(match s {
            "A_log" | "A" => PartialTarget::ALog,
            "D" => PartialTarget::D,
            "conv1d" | "conv1d.weight" => PartialTarget::Conv1d,
            "dt_bias" | "dt_proj.bias" | "bias" => PartialTarget::DtBias,
            "norm" | "norm.weight" => PartialTarget::Norm,
            "cls_token" => PartialTarget::ClsToken,
            "pos_embed" => PartialTarget::PosEmbed,
            _ => {
                return Err(PeftError::UnknownTarget {
                    method: "partial".into(),
                    target: s.into(),
                    valid: PARTIAL_TARGETS.iter().map(|v| v.to_string()).collect(),
                });
            }
        })
    }

    /// The mixer slot in a model of shape `cfg` (the dt bias is per channel on Mamba-1,
    /// per head on Mamba-2), `None` for the vision tensors and for a slot the family lacks.
    pub fn slot(self, cfg: &ModelShape) -> Option<Slot> {
        let ssd = cfg.ssd.is_some();
        match self {
            PartialTarget::ALog => Some(Slot::ALog),
            PartialTarget::D => Some(Slot::D),
            PartialTarget::Conv1d => Some(Slot::ConvWeight),
            PartialTarget::DtBias if ssd => Some(Slot::HeadDtBias),
            PartialTarget::DtBias => Some(Slot::DtBias),
            PartialTarget::Norm if ssd => Some(Slot::Norm),
            PartialTarget::Norm | PartialTarget::ClsToken | PartialTarget::PosEmbed => None,
        }
    }

    /// Every site this target adapts in a model of shape `cfg`, with the delta's shape.
    fn sites(self, cfg: &ModelShape) -> Vec<(ParamSite, Vec<usize>)> {
        let d = cfg.hidden_size;
        match self {
            PartialTarget::ClsToken => return vec![(ParamSite::ClsToken, vec![1, 1, d])],
            PartialTarget::PosEmbed => {
                let tokens = cfg.vision.map(|v| v.tokens).unwrap_or(0);
                return vec![(ParamSite::PosEmbed, vec![1, tokens, d])];
            }
            _ => {}
        }
        let Some(slot) = self.slot(cfg) else {
            return Vec::new();
        };
        let shape = cfg.slot_shape(slot);
        (0..cfg.num_hidden_layers)
            .flat_map(|i| {
                cfg.directions
                    .iter()
                    .map(move |&dir| ParamSite::Mixer(i, slot, dir))
            })
            .map(|site| (site, shape.clone()))
            .collect()
    }

    /// Released decay strengths toward the pretrained value (§4.1): ×10 → 1e-3 for A, D
    /// and conv1d, ×100 → 1e-2 for the dt bias.
    fn default_weight_decay(self) -> f64 {
        match self {
            PartialTarget::DtBias => 1e-2,
            _ => 1e-3,
        }
    }
}

/// `{"type": "partial", "target": "A_log" | "D" | "conv1d.weight" | "dt_proj.bias"}`.
/// `weight_decay` is the strength of the decay toward the pretrained value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

impl PartialConfig {
    pub fn new(target: &str) -> Self {
        PartialConfig {
            target: target.into(),
            lr: None,
            weight_decay: None,
        }
    }
}

fn name(site: ParamSite) -> String {
    format!("{}.delta", site.name())
}

impl PeftMethod for PartialConfig {
    fn kind(&self) -> &'static str {
        "partial"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        match (self.weight_decay, PartialTarget::parse(&self.target)) {
            (Some(w), _) => w,
            (None, Ok(t)) => t.default_weight_decay(),
            (None, Err(_)) => 0.0,
        }
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        let t = PartialTarget::parse(&self.target)?;
        let vision = matches!(t, PartialTarget::ClsToken | PartialTarget::PosEmbed);
        if vision && cfg.vision.is_none() {
            return Err(PeftError::unsupported(
                format!("partial tuning of `{}`", self.target),
                cfg.family,
                "it has no class token or position embedding",
            ));
        }
        if !vision && t.slot(cfg).is_none() {
            return Err(PeftError::unsupported(
                format!("partial tuning of `{}`", self.target),
                cfg.family,
                "its mixer has no such tensor (norm.weight is Mamba-2's gated norm)",
            ));
        }
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let Ok(t) = PartialTarget::parse(&self.target) else {
            return Vec::new();
        };
        t.sites(cfg)
            .into_iter()
            .map(|(site, shape)| (name(site), shape))
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.parameters(&base.peft_shape())
            .into_iter()
            .map(|(n, s)| Ok((n, rng.zeros(&s)?)))
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let t = PartialTarget::parse(&self.target)?;
        for (site, _) in t.sites(sites.config()) {
            let delta = params.get(&name(site))?;
            sites.add_param(site, Arc::new(Delta { delta }));
        }
        Ok(())
    }
}

/// `P + δ` (also used by BitFit, whose δ is the trained bias minus the pretrained one).
#[derive(Debug)]
pub(crate) struct Delta {
    pub delta: Tensor,
}

impl ParamPart for Delta {
    fn stage(&self) -> Stage {
        Stage::Transform
    }

    fn value(&self, current: &Tensor) -> Result<Tensor> {
        current + self.delta.to_dtype(current.dtype())?
    }
}
