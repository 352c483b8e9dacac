//! Seeded random initialisation of a Vision Mamba (for benchmarks and tests): the selective
//! branches get the reference Mamba inits (S4D-real `A_log`, `D = 1`, log-uniform dt bias) in
//! both directions, linear and conv weights PyTorch's default uniform, and `cls_token`,
//! `pos_embed` and the head a normal of std 0.02 (hustvl's `trunc_normal_(std=.02)`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::checkpoint::VimCheckpoint;
use super::config::VimConfig;
use crate::error::Result;
use crate::model::weights::{LoadOptions, RandomWeights};

/// Every weight of a random Vim, under the official names, in f32.
pub fn random_tensors(
    cfg: &VimConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut g = RandomWeights::new(seed, device);
    let (d, e, n, r, k) = (
        cfg.embed_dim,
        cfg.d_inner(),
        cfg.d_state,
        cfg.dt_rank,
        cfg.d_conv,
    );
    let (c, p) = (cfg.channels, cfg.patch_size);
    let fan = |f: usize| 1.0 / (f as f32).sqrt();
    let mut t = HashMap::new();
    let mut put = |name: String, v: Tensor| {
        t.insert(name, v);
    };
    put(
        "patch_embed.proj.weight".into(),
        g.uniform(&[d, c, p, p], fan(c * p * p))?,
    );
    put(
        "patch_embed.proj.bias".into(),
        g.uniform(&[d], fan(c * p * p))?,
    );
    put("cls_token".into(), g.normal(&[1, 1, d], 0.02)?);
    put(
        "pos_embed".into(),
        g.normal(&[1, cfg.num_patches() + 1, d], 0.02)?,
    );
    for i in 0..cfg.depth {
        let m = format!("layers.{i}.mixer");
        put(format!("layers.{i}.norm.weight"), g.fill(&[d], |_| 1.0)?);
        put(
            format!("{m}.in_proj.weight"),
            g.uniform(&[2 * e, d], fan(d))?,
        );
        // The forward branch's names, then the backward branch's (`*_b`).
        for (s, a, dd) in [("", "A_log", "D"), ("_b", "A_b_log", "D_b")] {
            put(
                format!("{m}.conv1d{s}.weight"),
                g.uniform(&[e, 1, k], fan(k))?,
            );
            if cfg.conv_bias {
                put(format!("{m}.conv1d{s}.bias"), g.uniform(&[e], fan(k))?);
            }
            put(
                format!("{m}.x_proj{s}.weight"),
                g.uniform(&[r + 2 * n, e], fan(e))?,
            );
            put(
                format!("{m}.dt_proj{s}.weight"),
                g.uniform(&[e, r], fan(r))?,
            );
            put(format!("{m}.dt_proj{s}.bias"), g.dt_bias(e)?);
            put(format!("{m}.{a}"), g.s4d_a_log(e, n)?);
            put(format!("{m}.{dd}"), g.fill(&[e], |_| 1.0)?);
        }
        put(format!("{m}.out_proj.weight"), g.uniform(&[d, e], fan(e))?);
    }
    put("norm_f.weight".into(), g.fill(&[d], |_| 1.0)?);
    put("head.weight".into(), g.normal(&[cfg.num_classes, d], 0.02)?);
    put("head.bias".into(), g.fill(&[cfg.num_classes], |_| 0.0)?);
    Ok(t)
}

impl VimCheckpoint {
    /// A seeded random Vim with `cfg`'s shapes (f32), as if loaded from a folder.
    pub fn random(cfg: &VimConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(VimCheckpoint {
            dir: PathBuf::from("random-init"),
            config: cfg.clone(),
            checkpoint_config: cfg.clone(),
            tensors: random_tensors(cfg, seed, device)?,
            weight_files: Vec::new(),
            notes: Vec::new(),
            fresh_head: false,
            load: LoadOptions {
                device: device.clone(),
                ..LoadOptions::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vim::Mode;

    /// The random model has every tensor the loader validates, in the shapes the model
    /// builds, and gives finite logits.
    #[test]
    fn random_vim_builds_and_runs() -> Result<()> {
        let cfg = VimConfig::from_value(
            &serde_json::json!({
                "img_size": [20, 12], "patch_size": 4, "stride": 4, "embed_dim": 16,
                "depth": 2, "d_state": 4, "num_classes": 5, "use_middle_cls_token": true,
                "if_divide_out": true, "ssm_cfg": {"d_conv": 3, "expand": 2}
            }),
            std::path::Path::new("config.json"),
        )?;
        let dev = Device::Cpu;
        let a = VimCheckpoint::random(&cfg, 3, &dev)?.into_frozen()?;
        let b = VimCheckpoint::random(&cfg, 3, &dev)?.into_frozen()?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 20, 12), &dev)?;
        let (la, lb) = (
            a.forward(&x, Mode::Eval, None)?,
            b.forward(&x, Mode::Eval, None)?,
        );
        assert_eq!(la.dims(), &[2, 5]);
        let v = la.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0));
        // Seeded: the same seed gives the same model.
        assert_eq!(v, lb.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
