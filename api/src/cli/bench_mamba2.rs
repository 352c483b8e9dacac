//! `molt bench --shapes mamba2-130m`: issue 14's figures on a random-init Mamba-2 at
//! state-spaces/mamba2-130m's shape (hidden 768, 24 layers, 24 heads × 64, state 128, one
//! group, vocab 50288), the same lines as the Mamba-1 shapes so `bench/report.py` sets them
//! beside HF transformers' `Mamba2ForCausalLM` (`bench/pytorch_bench.py --shapes
//! mamba2-130m`):
//!
//! - `forward_tokens_per_s`, `generate_tokens_per_s` (batch 1 and 8);
//! - `train_lora_tokens_per_s` (LoRA r=8, α=16 on in_proj and out_proj) and
//!   `train_prodial_tokens_per_s` (ProDiaL on both, 16 blocks, r_ε 8), a whole training step;
//! - `ssd_scan_fwd_bwd_speedup`: the fused SSD scan against the plain-op reference
//!   (forward + backward), at each `--sizes` entry.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use serde_json::json;
use trainer::kernels;
use trainer::model::mamba2::{Mamba2Checkpoint, Mamba2Config};
use trainer::peft::AdapterSpec;
use trainer::train::AdapterTrainable;

use super::bench::{Bench, Ctx, Lcg, Metric, round, timed};

/// The released `state-spaces/mamba2-130m` config.json.
pub(super) fn mamba2_130m() -> Result<Mamba2Config> {
    let v = json!({
        "d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
        "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
        "pad_vocab_size_multiple": 16, "tie_embeddings": true
    });
    Ok(Mamba2Config::from_value(&v, "mamba2-130m".as_ref())?)
}

const PRODIAL: &str =
    r#"{"type": "prodial", "targets": "both", "r_b": {"in_proj": 16, "out_proj": 16}, "r_eps": 8}"#;

impl Bench {
    pub(super) fn mamba2(&self, name: &str, cfg: &Mamba2Config) -> Result<()> {
        eprintln!(
            "shape {name}: hidden {}, {} layers, {} heads × {}, N {}, vocab {}",
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_heads,
            cfg.head_dim,
            cfg.state_size,
            cfg.vocab_size
        );
        let frozen = Mamba2Checkpoint::random(cfg, self.seed, &Device::Cpu)
            .context("building the random Mamba-2")?
            .into_frozen()?;
        let params: usize = frozen
            .named_weights()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let at = Ctx::new(name);
        self.out
            .emit(Some(&at), "params", json!(params), "count", &[]);
        self.forward_and_generate(&at, &frozen, cfg.vocab_size)?;
        if self.wants(Metric::Train) {
            self.train_lora(&at, cfg.vocab_size, &frozen)?;
            let spec = AdapterSpec::from_value(&serde_json::from_str(PRODIAL)?)?;
            let t = AdapterTrainable::new(&spec, &frozen, self.seed, None)?;
            self.out.emit(
                Some(&at),
                "train_prodial_trainable_params",
                json!(t.adapter().trainable_parameters()),
                "count",
                &[],
            );
            self.train_steps(&at, cfg.vocab_size, &t, "train_prodial_tokens_per_s", &[])?;
        }
        drop(frozen);
        if self.wants(Metric::Scan) {
            for &(b, l) in &self.sizes {
                self.ssd_speedup(&at, cfg, b, l)?;
            }
        }
        Ok(())
    }

    /// The fused SSD scan against the plain-op reference, forward + backward, on random
    /// inputs of one layer's shape.
    fn ssd_speedup(&self, at: &Ctx, cfg: &Mamba2Config, b: usize, l: usize) -> Result<()> {
        let (h, p, g, n) = (cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size);
        let mut rng = Lcg(self.seed ^ 0x55d5_a11e);
        let mut rand = |shape: &[usize], lo: f32, hi: f32| -> Result<Var> {
            let count = shape.iter().product();
            let v = rng
                .normals(count)
                .into_iter()
                .map(|x| lo + (hi - lo) * (0.5 + 0.15 * x));
            Ok(Var::from_tensor(&Tensor::from_vec(
                v.collect::<Vec<f32>>(),
                shape,
                &Device::Cpu,
            )?)?)
        };
        let x = rand(&[b, l, h, p], -1.0, 1.0)?;
        let dt = rand(&[b, l, h], -4.0, 0.0)?;
        let a = rand(&[h], -2.0, -0.5)?;
        let bm = rand(&[b, l, g, n], -1.0, 1.0)?;
        let cm = rand(&[b, l, g, n], -1.0, 1.0)?;
        let d = rand(&[h], 0.5, 1.5)?;
        let bias = rand(&[h], -1.0, 0.0)?;
        let limit = cfg.time_step_limit;
        let run = |fused: bool| -> Result<()> {
            let args = (x.as_tensor(), dt.as_tensor(), a.as_tensor());
            let (y, _) = if fused {
                kernels::ssd_scan(
                    args.0,
                    args.1,
                    args.2,
                    bm.as_tensor(),
                    cm.as_tensor(),
                    d.as_tensor(),
                    bias.as_tensor(),
                    limit,
                    None,
                )?
            } else {
                kernels::reference::ssd_scan(
                    args.0,
                    args.1,
                    args.2,
                    bm.as_tensor(),
                    cm.as_tensor(),
                    d.as_tensor(),
                    bias.as_tensor(),
                    limit,
                    None,
                )?
            };
            y.sum_all()?.backward()?;
            Ok(())
        };
        run(true)?;
        let fused = timed(self.reps, self.budget, || run(true))?;
        // The reference records every time step as autograd nodes: one timed run.
        run(false)?;
        let reference = timed(1, 0.0, || run(false))?;
        let speedup = reference.median_s / fused.median_s;
        eprintln!(
            "{} ssd_scan_fwd_bwd_speedup {b}x{l}: fused {:.2} ms, reference {:.2} ms, {speedup:.1}×",
            at.shape,
            fused.median_s * 1e3,
            reference.median_s * 1e3
        );
        let mut fields = vec![
            ("batch", json!(b)),
            ("seq", json!(l)),
            ("reference_s", json!(round(reference.median_s, 6))),
        ];
        fields.extend(fused.fields());
        self.out.emit(
            Some(at),
            "ssd_scan_fwd_bwd_speedup",
            json!(round(speedup, 2)),
            "x",
            &fields,
        );
        Ok(())
    }
}
