//! Partial tuning, MambaPEFT's "v2" form (spec §4.1): a zero-initialised delta δ beside a
//! frozen tensor P, used as P + δ. AdamW's decoupled decay on δ is exactly decay toward the
//! pretrained value. A-tuning is in log space (A = −exp(A_log + δ)). Merge: P ← P + δ.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::sites::{ParamPart, Sites, Slot, Stage};
use super::{ParamShape, Params, PeftMethod};
use crate::model::{MambaConfig, MambaForCausalLM};

/// Which tensor a partial-tuning delta adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialTarget {
    ALog,
    D,
    Conv1d,
    DtBias,
}

pub(crate) const PARTIAL_TARGETS: &[&str] = &["A_log", "D", "conv1d.weight", "dt_proj.bias"];

impl PartialTarget {
    pub fn parse(s: &str) -> PeftResult<Self> {
        Ok(match s {
            "A_log" | "A" => PartialTarget::ALog,
            "D" => PartialTarget::D,
            "conv1d" | "conv1d.weight" => PartialTarget::Conv1d,
            "dt_bias" | "dt_proj.bias" | "bias" => PartialTarget::DtBias,
            _ => {
                return Err(PeftError::UnknownTarget {
                    method: "partial".into(),
                    target: s.into(),
                    valid: PARTIAL_TARGETS.iter().map(|v| v.to_string()).collect(),
                });
            }
        })
    }

    pub fn slot(self) -> Slot {
        match self {
            PartialTarget::ALog => Slot::ALog,
            PartialTarget::D => Slot::D,
            PartialTarget::Conv1d => Slot::ConvWeight,
            PartialTarget::DtBias => Slot::DtBias,
        }
    }

    fn shape(self, cfg: &MambaConfig) -> Vec<usize> {
        let e = cfg.intermediate_size;
        match self {
            PartialTarget::ALog => vec![e, cfg.state_size],
            PartialTarget::D | PartialTarget::DtBias => vec![e],
            PartialTarget::Conv1d => vec![e, 1, cfg.conv_kernel],
        }
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

fn name(t: PartialTarget, i: usize) -> String {
    format!("layers.{i}.{}.delta", t.slot().name())
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

    fn validate(&self, _cfg: &MambaConfig) -> PeftResult<()> {
        PartialTarget::parse(&self.target).map(|_| ())
    }

    fn parameters(&self, cfg: &MambaConfig) -> Vec<ParamShape> {
        let Ok(t) = PartialTarget::parse(&self.target) else {
            return Vec::new();
        };
        (0..cfg.num_hidden_layers)
            .map(|i| (name(t, i), t.shape(cfg)))
            .collect()
    }

    fn init(&self, base: &MambaForCausalLM, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.parameters(base.config())
            .into_iter()
            .map(|(n, s)| Ok((n, rng.zeros(&s)?)))
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let t = PartialTarget::parse(&self.target)?;
        for i in 0..sites.config().num_hidden_layers {
            sites.add_param(
                i,
                t.slot(),
                Arc::new(Delta {
                    delta: params.get(&name(t, i))?,
                }),
            );
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
