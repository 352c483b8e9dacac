//! ParallelAdapter (AdaptFormer-style, spec §4.6): beside out_proj, on out_proj's input o,
//! out = W_out·o + s·W_up·Dropout(ReLU(W_down·o)). W_down Uniform(±1/√E), W_up zeros.
//! Not mergeable (the ReLU).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::lora::{check_dropout, check_rank, check_scale};
use super::sites::{Dir, LinearPart, Proj, Runtime, Sites, Stage};
use super::target::{ModelShape, PeftBase};
use super::{MergePlan, ParamShape, Params, PeftMethod};
use crate::model::layers::linear_forward;

fn default_r() -> usize {
    32
}
fn default_s() -> f64 {
    0.1
}
fn default_dropout() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}

/// `{"type": "parallel_adapter", "r": 32, "s": 0.1, "dropout": 0.1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelAdapterConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_s")]
    pub s: f64,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_true")]
    pub zero_init: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

fn names(i: usize) -> (String, String) {
    (
        format!("layers.{i}.parallel_adapter.W_down"),
        format!("layers.{i}.parallel_adapter.W_up"),
    )
}

impl PeftMethod for ParallelAdapterConfig {
    fn kind(&self) -> &'static str {
        "parallel_adapter"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        let (d, e) = Proj::Out.shape(cfg);
        check_rank("parallel_adapter", "out_proj", self.r, d, e)?;
        check_scale("parallel_adapter", "s", self.s)?;
        check_dropout("parallel_adapter", self.dropout)
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let (d, e) = Proj::Out.shape(cfg);
        (0..cfg.num_hidden_layers)
            .flat_map(|i| {
                let (down, up) = names(i);
                [(down, vec![self.r, e]), (up, vec![d, self.r])]
            })
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.parameters(&base.peft_shape())
            .into_iter()
            .map(|(name, shape)| {
                let fan_in = shape.get(1).copied().unwrap_or(1);
                let t = if name.ends_with("W_down") || !self.zero_init {
                    rng.kaiming_uniform(&name, &shape, fan_in)?
                } else {
                    rng.zeros(&shape)?
                };
                Ok((name, t))
            })
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        for i in 0..sites.config().num_hidden_layers {
            let (down, up) = names(i);
            sites.add_linear(
                i,
                Proj::Out,
                Dir::Fwd,
                Arc::new(Parallel {
                    down: params.get(&down)?,
                    up: params.get(&up)?,
                    s: self.s,
                    dropout: self.dropout,
                }),
            );
        }
        Ok(())
    }

    fn merge_plan(&self, _params: &Params) -> PeftResult<MergePlan> {
        Err(PeftError::NotMergeable {
            method: "parallel_adapter".into(),
            reason: "its ReLU bottleneck is not a linear map; serve it as an adapter".into(),
        })
    }
}

#[derive(Debug)]
struct Parallel {
    down: Tensor,
    up: Tensor,
    s: f64,
    dropout: f64,
}

impl LinearPart for Parallel {
    fn stage(&self) -> Stage {
        Stage::Add
    }

    fn output(&self, x: &Tensor, y: Tensor, rt: &Runtime) -> Result<Tensor> {
        let h = linear_forward(x, &self.down, None)?.relu()?;
        let h = rt.dropout(&h, self.dropout)?;
        y + (linear_forward(&h, &self.up, None)? * self.s)?
    }
}
