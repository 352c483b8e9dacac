//! Seeded random initialisation of a Mamba-1 model (for benchmarks and tests), following the
//! reference inits: S4D-real `A_log = log(1..=N)`, `D = 1`, dt bias = softplus⁻¹ of a
//! log-uniform dt in [1e-3, 1e-1], PyTorch's default uniform for linear and conv weights.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checkpoint::Checkpoint;
use super::config::MambaConfig;
use crate::error::Result;

struct Gen {
    rng: StdRng,
    device: Device,
}

impl Gen {
    fn uniform(&mut self, shape: &[usize], bound: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }

    fn normal(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box–Muller; u1 is kept away from 0 so the log is finite.
            let u1: f32 = self.rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = self.rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f32::consts::PI * u2;
            v.push(r * th.cos() * std);
            if v.len() < n {
                v.push(r * th.sin() * std);
            }
        }
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }

    fn fill(&self, shape: &[usize], f: impl Fn(&[usize]) -> f32) -> Result<Tensor> {
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            [r] => (*r, 1),
            _ => (shape.iter().product(), 1),
        };
        let mut v = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                v.push(f(&[r, c]));
            }
        }
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }
}

/// Every weight of a random model, under HF names, in f32.
pub fn random_tensors(
    cfg: &MambaConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        device: device.clone(),
    };
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
        let dts: Vec<f32> = (0..e)
            .map(|_| {
                let lo = 1e-3f32.ln();
                let hi = 1e-1f32.ln();
                let dt = g.rng.random_range(lo..hi).exp().max(1e-4);
                // softplus⁻¹(dt) = dt + log(1 − exp(−dt))
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        t.insert(
            format!("{m}.dt_proj.bias"),
            Tensor::from_vec(dts, e, device)?,
        );
        t.insert(
            format!("{m}.A_log"),
            g.fill(&[e, n], |ix| ((ix[1] + 1) as f32).ln())?,
        );
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
