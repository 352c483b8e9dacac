//! `molt bench --shapes vim-tiny`: issue 13's Vision Mamba figures on a random-init Vim-tiny
//! (224×224, patch 16, 24 layers, embed 192, state 16, a 102-class head as ProDiaL's
//! Caltech-101), at a batch of `--images` (default 8):
//!
//! - `vim_forward_images_per_s`: inference (eval mode, no autograd);
//! - `vim_train_images_per_s`, one line per method: a training step through the training
//!   loop's own step function (forward in train mode, mean cross-entropy, backward, gradient
//!   clipping, AdamW) with LoRA(in_proj) r=16, Additional-scan N'=6 per direction and ProDiaL
//!   on in_proj and out_proj (r_b 192 / 384, r_ε 16: ProDiaL's Table 11 Caltech setting), the
//!   head trained with each.
//!
//! Each line carries `gflop_per_image`, the model's useful matmul work per image (forward:
//! every projection, the patch embedding and the head, 2 FLOPs per multiply-add; a PEFT
//! training step counts twice that: the forward and the activation gradients — frozen weights
//! get no weight gradient, the adapters' own work is left out), and `model_gflops`, that
//! work per second. `bench/vim_report.py` divides it by the run's matmul peak.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{Value, json};
use trainer::model::vim::{Mode, VimCheckpoint, VimConfig, VimForImageClassification};
use trainer::peft::AdapterSpec;
use trainer::train::engine::{MicroBatch, Trainable, optimizer_step};
use trainer::train::images::ImageBatch;
use trainer::train::{AdamW, AdapterTrainable};

use super::bench::{Bench, Ctx, Lcg, Measured, round, timed};

/// The methods of issue 13's speed table: (label, spec).
const VIM_METHODS: &[(&str, &str)] = &[
    (
        "LoRA(in_proj) r=16",
        r#"{"type": "lora", "targets": "in_proj", "r": 16, "alpha": 16}"#,
    ),
    (
        "Additional-scan N'=6",
        r#"{"type": "additional_scan", "n_add": 6}"#,
    ),
    (
        "ProDiaL in+out r_b=192/384 r_eps=16",
        r#"{"type": "prodial", "targets": ["in_proj", "out_proj"], "r_b": {"in_proj": 192, "out_proj": 384}, "r_eps": 16}"#,
    ),
];

/// hustvl's `vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`
/// with a 102-class head.
pub(super) fn vim_tiny() -> Result<VimConfig> {
    let v = json!({
        "img_size": 224, "patch_size": 16, "stride": 16, "embed_dim": 192, "depth": 24,
        "d_state": 16, "num_classes": 102, "use_middle_cls_token": true,
        "if_divide_out": true, "bimamba_type": "v2", "rms_norm": true,
        "residual_in_fp32": true, "fused_add_norm": true, "final_pool_type": "mean",
        "if_abs_pos_embed": true, "if_cls_token": true
    });
    Ok(VimConfig::from_value(&v, "vim-tiny".as_ref())?)
}

/// Matmul FLOPs of one image's forward: the patch embedding, per layer in_proj, both
/// directions' x_proj and dt_proj, out_proj, and the head (at the class token only).
pub(super) fn forward_flops_per_image(cfg: &VimConfig) -> f64 {
    let (d, e, n, r) = (cfg.embed_dim, cfg.d_inner(), cfg.d_state, cfg.dt_rank);
    let (m, l) = (cfg.num_patches(), cfg.seq_len());
    let k = cfg.channels * cfg.patch_size * cfg.patch_size;
    let per_layer = l * (d * 2 * e + 2 * (e * (r + 2 * n) + r * e) + e * d);
    let macs = m * k * d + cfg.depth * per_layer + d * cfg.num_classes;
    2.0 * macs as f64
}

impl Bench {
    pub(super) fn vim(&self, name: &str, cfg: &VimConfig) -> Result<()> {
        let b = self.images;
        let [h, w] = cfg.img_size;
        eprintln!(
            "shape {name}: {h}×{w}, patch {}, {} layers, D {}, E {}, N {}, {} tokens, batch {b}",
            cfg.patch_size,
            cfg.depth,
            cfg.embed_dim,
            cfg.d_inner(),
            cfg.d_state,
            cfg.seq_len()
        );
        let dev = Device::Cpu;
        let frozen = VimCheckpoint::random(cfg, self.seed, &dev)
            .context("building the random Vim")?
            .into_frozen()?;
        let at = Ctx::new(name);
        let params: usize = frozen
            .named_weights()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        self.out
            .emit(Some(&at), "params", json!(params), "count", &[]);
        let flops = forward_flops_per_image(cfg);
        let mut rng = Lcg(self.seed ^ 0x2545_f491_4f6c_dd1d);
        let pixels = Tensor::from_vec(
            rng.normals(b * cfg.channels * h * w),
            (b, cfg.channels, h, w),
            &dev,
        )?;
        let labels: Vec<u32> = (0..b)
            .map(|_| (rng.next_u64() % cfg.num_classes as u64) as u32)
            .collect();

        if self.wants(super::bench::Metric::Forward) {
            let fwd = || -> Result<()> {
                frozen.forward(&pixels, Mode::Eval, None)?;
                Ok(())
            };
            fwd()?;
            let m = timed(self.reps, self.budget, fwd)?;
            self.report_images(&at, cfg, "vim_forward_images_per_s", flops, &m, &[]);
        }
        if self.wants(super::bench::Metric::Train) {
            let batch = ImageBatch {
                pixels: pixels.clone(),
                labels: Tensor::from_vec(labels, b, &dev)?,
            };
            for (label, spec) in VIM_METHODS {
                let v: Value = serde_json::from_str(spec)
                    .with_context(|| format!("method table entry {label}"))?;
                let spec = AdapterSpec::from_value(&v)?;
                let t = AdapterTrainable::new(&spec, &frozen, self.seed, None)?;
                let extra = [
                    ("method", json!(label)),
                    ("spec", v.clone()),
                    (
                        "trainable_params",
                        json!(t.adapter().trainable_parameters()),
                    ),
                ];
                self.vim_train(&at, cfg, &t, &batch, flops, &extra)?;
            }
        }
        Ok(())
    }

    fn vim_train(
        &self,
        at: &Ctx,
        cfg: &VimConfig,
        t: &AdapterTrainable<VimForImageClassification>,
        batch: &ImageBatch,
        flops: f64,
        extra: &[(&str, Value)],
    ) -> Result<()> {
        let mut opt = AdamW::new(t.param_groups()?, 1e-3, 0.9, 0.999, 1e-8)?;
        let mut n = 0u64;
        let mut step = || -> Result<()> {
            n += 1;
            // A new drop-path seed per step, as the training loop draws them.
            let batches = [MicroBatch::Images(batch.clone(), n)];
            optimizer_step(t, &mut opt, &batches, 5.0, 1.0, n)?;
            Ok(())
        };
        step()?;
        let m = timed(self.reps, self.budget, &mut step)?;
        self.report_images(at, cfg, "vim_train_images_per_s", 2.0 * flops, &m, extra);
        Ok(())
    }

    fn report_images(
        &self,
        at: &Ctx,
        cfg: &VimConfig,
        metric: &str,
        flops_per_image: f64,
        m: &Measured,
        extra: &[(&str, Value)],
    ) {
        let b = self.images;
        let ips = b as f64 / m.median_s;
        let gflops = ips * flops_per_image / 1e9;
        let method = extra
            .iter()
            .find(|(k, _)| *k == "method")
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("");
        eprintln!(
            "{} {metric} {method} batch {b}: {ips:.2} images/s, {gflops:.1} GFLOP/s ({} reps, cpu/wall {:.2}, others {:.2}, peak {:.0} MiB)",
            at.shape,
            m.reps,
            m.cpu_wall,
            m.others_cpu,
            m.peak_rss_mib.unwrap_or(f64::NAN)
        );
        let mut fields = vec![
            ("batch", json!(b)),
            ("seq", json!(cfg.seq_len())),
            ("gflop_per_image", json!(round(flops_per_image / 1e9, 4))),
            ("model_gflops", json!(round(gflops, 2))),
        ];
        fields.extend(m.fields());
        fields.extend(extra.iter().cloned());
        self.out
            .emit(Some(at), metric, json!(round(ips, 3)), "images/s", &fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vim-tiny's forward is about 2.6 GFLOP of matmul per 224² image (issue 13), and every
    /// method of the table builds on it with the papers' trainable-parameter count where
    /// they give one (ProDiaL Table 3: 0.65 M with the head).
    #[test]
    fn vim_tiny_flops_and_method_table() -> Result<()> {
        let cfg = vim_tiny()?;
        let g = forward_flops_per_image(&cfg) / 1e9;
        assert!((2.5..2.7).contains(&g), "{g} GFLOP");
        for (label, spec) in VIM_METHODS {
            let spec = AdapterSpec::from_value(&serde_json::from_str(spec)?)?;
            spec.validate(&cfg)?;
            let n = spec.trainable_parameters(&cfg);
            assert!(n > 0, "{label}");
            if label.starts_with("ProDiaL") {
                assert_eq!((n as f64 / 1e4).round() / 100.0, 0.65, "{label}: {n}");
            }
        }
        Ok(())
    }
}
