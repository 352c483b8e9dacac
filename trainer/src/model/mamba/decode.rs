//! Mamba-1's decode step through the fused layer kernel ([`kernels::decode`]): which layers
//! it applies to, and the layer's tensors as the kernel's slices.
//!
//! A layer takes the fused path when nothing but the checkpoint's own weights act in it
//! (no adapter on a projection or parameter, no mixer hook: a base model or a merged one)
//! and it runs on the CPU in f32 activations with at most [`gemv::MAX_ROWS`] sequences and
//! f32 or bf16 matrices. Any other layer takes the generic [`Block::step`]; both compute
//! the same function (tested in `tests`), so a step may mix them.

use candle_core::{CpuStorage, DType, Layout, Storage, StorageRef, Tensor};

use super::model::{MambaBlock, MambaMixer};
use crate::error::Result;
use crate::kernels::decode::{Dims, LayerWeights, layer_step};
use crate::kernels::gemv::{self, Weights};
use crate::model::cache::{LayerCache, MambaCache};
use crate::model::lm::Mixer;

/// One decode step through every block: `h` `[b, D]` in, the last block's output out.
pub(crate) fn step_blocks(
    blocks: &[MambaBlock],
    h: &Tensor,
    cache: &mut MambaCache,
) -> Result<Tensor> {
    let (b, dm) = h.dims2()?;
    let fusable_input = h.device().is_cpu()
        && h.dtype() == DType::F32
        && (1..=gemv::MAX_ROWS).contains(&b)
        && gemv::enabled();
    if !fusable_input {
        return crate::model::lm::step_each(blocks, h, cache);
    }
    let dev = h.device().clone();
    let mut hv: Vec<f32> = h.flatten_all()?.to_vec1()?;
    for (i, block) in blocks.iter().enumerate() {
        let lc = cache.layer_mut(i)?;
        if !fused_layer(block, b, dm, &mut hv, lc)? {
            let out = block.step(&Tensor::from_slice(&hv, (b, dm), &dev)?, lc)?;
            hv = out.flatten_all()?.to_vec1()?;
        }
    }
    Ok(Tensor::from_vec(hv, (b, dm), &dev)?)
}

/// Whether only the checkpoint's own, frozen weights act in this mixer.
fn plain(m: &MambaMixer) -> bool {
    m.hook.is_none()
        && m.projections()
            .iter()
            .all(|p| p.adapter().is_none() && !p.base().weight().track_op())
        && m.params()
            .iter()
            .all(|p| p.adapter().is_none() && !p.base().track_op())
        && m.branch.x_proj.base().bias().is_none()
        && m.branch.dt_proj.base().bias().is_none()
}

/// A tensor's storage, read-locked while the kernel reads it.
struct Held<'t>(StorageRef<'t>, &'t Layout);

impl<'t> Held<'t> {
    fn new(t: &'t Tensor) -> Self {
        let (guard, layout) = t.storage_and_layout();
        Held(guard, layout)
    }

    fn cpu(&self) -> Option<&CpuStorage> {
        match &*self.0 {
            Storage::Cpu(c) => Some(c),
            _ => None,
        }
    }

    /// The elements of a contiguous f32 tensor with `len` of them.
    fn f32(&self, len: usize) -> Option<&[f32]> {
        let (CpuStorage::F32(data), Some((start, end))) =
            (self.cpu()?, self.1.contiguous_offsets())
        else {
            return None;
        };
        (end - start == len).then(|| &data[start..end])
    }

    /// A contiguous f32 or bf16 matrix with `len` elements.
    fn weights(&self, len: usize) -> Option<Weights<'_>> {
        Weights::of(self.cpu()?, self.1).filter(|w| w.len() == len)
    }
}

fn opt<'t>(t: Option<&'t Tensor>) -> Option<Held<'t>> {
    t.map(Held::new)
}

/// An optional bias: `Some(None)` when absent, `None` when present but unusable (not f32
/// of `len` elements), which rules the kernel out.
fn bias<'a>(h: &'a Option<Held<'_>>, len: usize) -> Option<Option<&'a [f32]>> {
    match h {
        Some(h) => h.f32(len).map(Some),
        None => Some(None),
    }
}

/// Runs `block` on `h` (`[b, D]`, updated in place) through the fused kernel and stores its
/// new states in `lc`; `false` (and nothing changed) where the kernel does not apply.
fn fused_layer(
    block: &MambaBlock,
    b: usize,
    dm: usize,
    h: &mut [f32],
    lc: &mut LayerCache,
) -> Result<bool> {
    let m = &block.mixer;
    if !plain(m) {
        return Ok(false);
    }
    let br = &m.branch;
    let (e, k) = (m.d_inner(), m.conv_kernel());
    let n = m.state_size()?;
    let r = br.dt_proj.base().in_features();
    if lc.conv.dims() != [b, e, k] || lc.ssm.dims() != [b, e, n] {
        return Ok(false);
    }
    let a = br.a_log.neg_exp()?;
    let eps = block.norm.eps() as f32;
    let new = {
        let held = [
            Held::new(block.norm.weight()),
            Held::new(m.in_proj.base().weight()),
            Held::new(br.conv_weight.base()),
            Held::new(br.x_proj.base().weight()),
            Held::new(br.dt_proj.base().weight()),
            Held::new(br.dt_bias.base()),
            Held::new(&a),
            Held::new(br.d.base()),
            Held::new(m.out_proj.base().weight()),
            Held::new(&lc.conv),
            Held::new(&lc.ssm),
        ];
        let biases = [
            opt(m.in_proj.base().bias()),
            opt(br.conv_bias.as_ref().map(|p| p.base())),
            opt(m.out_proj.base().bias()),
        ];
        let [norm, in_w, conv_w, x_w, dt_w, dt_b, a, d, out_w, conv, ssm] = &held;
        let [in_b, conv_b, out_b] = &biases;
        // A present bias that is not f32 of the right size rules the kernel out.
        let lw = (|| {
            Some(LayerWeights {
                norm: norm.f32(dm)?,
                eps,
                in_proj: in_w.weights(2 * e * dm)?,
                in_bias: bias(in_b, 2 * e)?,
                conv_w: conv_w.f32(e * k)?,
                conv_b: bias(conv_b, e)?,
                x_proj: x_w.weights((r + 2 * n) * e)?,
                dt_proj: dt_w.weights(e * r)?,
                dt_bias: dt_b.f32(e)?,
                a: a.f32(e * n)?,
                d: d.f32(e)?,
                out_proj: out_w.weights(dm * e)?,
                out_bias: bias(out_b, dm)?,
            })
        })();
        let (Some(lw), Some(conv), Some(ssm)) = (lw, conv.f32(b * e * k), ssm.f32(b * e * n))
        else {
            return Ok(false);
        };
        layer_step(&lw, Dims { b, dm, e, n, r, k }, h, conv, ssm)
    };
    let dev = lc.ssm.device().clone();
    let len = new.len();
    let packed = Tensor::from_vec(new, len, &dev)?;
    lc.conv = packed.narrow(0, 0, b * e * k)?.reshape((b, e, k))?;
    lc.ssm = packed.narrow(0, b * e * k, b * e * n)?.reshape((b, e, n))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::lm::ModelInput;
    use crate::model::mamba::checkpoint::Checkpoint;
    use crate::model::mamba::config::MambaConfig;
    use crate::model::mamba::init::random_tensors;

    /// `max |got - want| / max |want|`.
    fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        let m = want.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// Steps a random model's blocks three times from a prefilled cache, layer by layer,
    /// through the fused kernel and through `Block::step`, on a pool of `threads` threads:
    /// each layer's output and new states agree.
    fn fused_matches_generic(cfg: &MambaConfig, dtype: DType, batch: usize, threads: usize) {
        let dev = Device::Cpu;
        let mut tensors = random_tensors(cfg, 11, &dev).unwrap();
        // Non-trivial norm weights and D (the random init fills them with ones).
        for (name, t) in tensors.iter_mut() {
            if name.ends_with("norm.weight") || name.ends_with(".D") {
                *t = (t.rand_like(0.5, 1.5).unwrap())
                    .to_dtype(DType::F32)
                    .unwrap();
            }
        }
        let model = Checkpoint::from_tensors("test", cfg.clone(), tensors)
            .unwrap()
            .into_frozen()
            .unwrap()
            .store_weights_as(dtype)
            .unwrap();
        let v = cfg.vocab_size as u32;
        let ids: Vec<u32> = (0..batch as u32 * 5).map(|i| (i * 7 + 3) % v).collect();
        let ids = Tensor::from_vec(ids, (batch, 5), &dev).unwrap();
        let input = ModelInput::new(&ids, None, cfg.vocab_size).unwrap();
        let mut fused = model.new_cache(batch).unwrap();
        model.prefill(&input, &mut fused).unwrap();
        let mut plain = fused.clone();
        let dm = cfg.hidden_size;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for step in 0..3u32 {
                let tokens: Vec<u32> = (0..batch as u32)
                    .map(|i| (i * 13 + step * 5 + 1) % v)
                    .collect();
                let mut h = model
                    .embed(&Tensor::new(tokens.as_slice(), &dev).unwrap())
                    .unwrap();
                // Both continue from the generic output: each layer sees the same input.
                for (i, block) in model.backbone.layers.iter().enumerate() {
                    let mut hv: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
                    let lf = fused.layer_mut(i).unwrap();
                    assert!(
                        fused_layer(block, batch, dm, &mut hv, lf).unwrap(),
                        "layer {i} not fused"
                    );
                    let got = Tensor::from_vec(hv, (batch, dm), &dev).unwrap();
                    let lp = plain.layer_mut(i).unwrap();
                    h = block.step(&h, lp).unwrap();
                    let what =
                        format!("{dtype:?} b={batch} threads={threads} step {step} layer {i}");
                    assert!(
                        rel_diff(&got, &h) < 2e-5,
                        "{what}: output {}",
                        rel_diff(&got, &h)
                    );
                    let (lf, lp) = (&fused.layers[i], &plain.layers[i]);
                    assert_eq!(lf.conv.dims(), lp.conv.dims());
                    assert!(rel_diff(&lf.conv, &lp.conv) < 1e-6, "{what}: conv state");
                    assert!(
                        rel_diff(&lf.ssm, &lp.ssm) < 2e-5,
                        "{what}: ssm state {}",
                        rel_diff(&lf.ssm, &lp.ssm)
                    );
                }
            }
        });
    }

    #[test]
    fn fused_step_matches_block_step() {
        // Widths and state sizes off the SIMD width, with and without biases.
        let mut odd = MambaConfig::new(36, 2, 37);
        odd.state_size = 5;
        odd.use_bias = true;
        odd.intermediate_size = 76;
        let mut plain = MambaConfig::new(64, 2, 50);
        plain.use_conv_bias = false;
        plain.conv_kernel = 3;
        for cfg in [&odd, &plain] {
            for dtype in [DType::F32, DType::BF16] {
                for (batch, threads) in [(1, 1), (3, 3), (8, 2)] {
                    fused_matches_generic(cfg, dtype, batch, threads);
                }
            }
        }
    }

    #[test]
    fn adapted_layers_take_the_generic_step() {
        let cfg = MambaConfig::new(32, 1, 40);
        let mut model = Checkpoint::random(&cfg, 5, &Device::Cpu)
            .unwrap()
            .into_frozen()
            .unwrap();
        let block = &mut model.backbone.layers[0];
        #[derive(Debug)]
        struct Twice;
        impl crate::model::layers::ParamAdapter for Twice {
            fn value(&self, base: &Tensor) -> candle_core::Result<Tensor> {
                base * 2.0
            }
        }
        block
            .mixer
            .branch
            .d
            .set_adapter(Some(std::sync::Arc::new(Twice)));
        let mut cache = model.new_cache(1).unwrap();
        let mut h = vec![0.5f32; cfg.hidden_size];
        let before = h.clone();
        let block = &model.backbone.layers[0];
        assert!(
            !fused_layer(
                block,
                1,
                cfg.hidden_size,
                &mut h,
                cache.layer_mut(0).unwrap()
            )
            .unwrap()
        );
        assert_eq!(h, before);
    }
}
