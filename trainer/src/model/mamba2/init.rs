//! Seeded random initialisation of a Mamba-2 model (benchmarks, tests), following mamba_ssm's
//! `Mamba2` inits: `A` spread over [1, 16] per head (`A_log = log A`), `D = 1`, dt bias =
//! softplus⁻¹ of a log-uniform dt in [1e-3, 1e-1], norms at one, PyTorch's default uniform
//! for linear and conv weights, the embedding N(0, 0.02). Driven by the tensors the config
//! implies, so it covers every option the loader does.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::checkpoint::Mamba2Checkpoint;
use super::config::Mamba2Config;
use crate::error::Result;
use crate::model::lm_checkpoint::LmConfig;
use crate::model::weights::RandomWeights;

/// Every weight of a random model, under HF names, in f32.
pub fn random_tensors(
    cfg: &Mamba2Config,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut g = RandomWeights::new(seed, device);
    let fan = |f: usize| 1.0 / (f.max(1) as f32).sqrt();
    let (d, e, k) = (cfg.hidden_size, cfg.intermediate_size(), cfg.conv_kernel);
    let mut t = HashMap::new();
    for exp in cfg.expected_tensors() {
        let (name, shape) = (exp.name, exp.shape);
        let leaf = name
            .rsplit_once(".mixer.")
            .map_or(name.as_str(), |(_, l)| l);
        let value = if name.ends_with("embeddings.weight") || name == "lm_head.weight" {
            g.normal(&shape, 0.02)?
        } else if name.ends_with("norm.weight") || name.ends_with("norm_f.weight") || leaf == "D" {
            g.fill(&shape, |_| 1.0)?
        } else if leaf == "A_log" {
            let h = shape[0];
            g.fill(&shape, |ix| {
                (1.0 + 15.0 * ix[0] as f32 / h.max(1) as f32).ln()
            })?
        } else if leaf == "dt_bias" {
            g.dt_bias(shape[0])?
        } else if leaf.starts_with("conv1d.") {
            g.uniform(&shape, fan(k))?
        } else if leaf.starts_with("in_proj.") {
            g.uniform(&shape, fan(d))?
        } else {
            g.uniform(&shape, fan(e))?
        };
        t.insert(name, value);
    }
    Ok(t)
}

impl Mamba2Checkpoint {
    /// A seeded random Mamba-2 with `cfg`'s shapes (f32).
    pub fn random(cfg: &Mamba2Config, seed: u64, device: &Device) -> Result<Self> {
        Mamba2Checkpoint::from_tensors(
            "random-init",
            cfg.clone(),
            random_tensors(cfg, seed, device)?,
        )
    }
}
