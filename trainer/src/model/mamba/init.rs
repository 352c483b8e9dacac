//! Seeded random initialisation of a Mamba-1 model (for benchmarks and tests), following the
//! reference inits: S4D-real `A_log = log(1..=N)`, `D = 1`, dt bias = softplus⁻¹ of a
//! log-uniform dt in [1e-3, 1e-1], PyTorch's default uniform for linear and conv weights.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::checkpoint::Checkpoint;
use super::config::MambaConfig;
use crate::error::Result;
use crate::model::weights::RandomWeights;

/// Every weight of a random model, under HF names, in f32.
pub fn random_tensors(
    cfg: &MambaConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut g = RandomWeights::new(seed, device);
    let (d, e, n, r, k, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.state_size,
        cfg.time_step_rank,
        cfg.conv_kernel,
        cfg.vocab_size,
    );
    let fan = |f: usize| 1.0 / (f as f32).sqrt();
    let mut t = HashMap::new();
    t.insert(
        "backbone.embeddings.weight".to_string(),
        g.normal(&[v, d], 0.02)?,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("backbone.layers.{i}");
        let m = format!("{p}.mixer");
        t.insert(format!("{p}.norm.weight"), g.fill(&[d], |_| 1.0)?);
        t.insert(
            format!("{m}.in_proj.weight"),
            g.uniform(&[2 * e, d], fan(d))?,
        );
        if cfg.use_bias {
            t.insert(format!("{m}.in_proj.bias"), g.uniform(&[2 * e], fan(d))?);
            t.insert(format!("{m}.out_proj.bias"), g.uniform(&[d], fan(e))?);
        }
        t.insert(format!("{m}.conv1d.weight"), g.uniform(&[e, 1, k], fan(k))?);
        if cfg.use_conv_bias {
            t.insert(format!("{m}.conv1d.bias"), g.uniform(&[e], fan(k))?);
        }
        t.insert(
            format!("{m}.x_proj.weight"),
            g.uniform(&[r + 2 * n, e], fan(e))?,
        );
        t.insert(format!("{m}.dt_proj.weight"), g.uniform(&[e, r], fan(r))?);
        t.insert(format!("{m}.dt_proj.bias"), g.dt_bias(e)?);
        t.insert(format!("{m}.A_log"), g.s4d_a_log(e, n)?);
        t.insert(format!("{m}.D"), g.fill(&[e], |_| 1.0)?);
        t.insert(format!("{m}.out_proj.weight"), g.uniform(&[d, e], fan(e))?);
    }
    t.insert("backbone.norm_f.weight".to_string(), g.fill(&[d], |_| 1.0)?);
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".to_string(), g.normal(&[v, d], 0.02)?);
    }
    Ok(t)
}

impl Checkpoint {
    /// A seeded random model with `cfg`'s shapes (f32).
    pub fn random(cfg: &MambaConfig, seed: u64, device: &Device) -> Result<Self> {
        Checkpoint::from_tensors(
            "random-init",
            cfg.clone(),
            random_tensors(cfg, seed, device)?,
        )
    }
}
