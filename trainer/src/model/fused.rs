//! What the language families' fused decode steps share: the loop over blocks that runs a
//! family's fused layer kernel where it applies and the generic [`Block::step`] elsewhere,
//! the rule for "where it applies", and read access to a layer's tensors as plain slices.
//!
//! A layer takes its family's fused path when nothing but the checkpoint's own weights act
//! in it (no adapter on a projection or parameter: a base model or a merged one) and it runs
//! on the CPU in f32 activations with at most [`gemv::MAX_ROWS`] sequences and f32 or bf16
//! matrices. Both paths compute the same function (each family tests it), so a step may mix
//! them.

use candle_core::{CpuStorage, DType, Layout, Storage, StorageRef, Tensor};

use crate::error::Result;
use crate::kernels::gemv::{self, Weights};
use crate::model::cache::{LayerCache, MambaCache};
use crate::model::lm::{Block, Mixer, step_each};

/// A family's fused layer: runs `block` on `h` (`[b, D]`, updated in place) and stores its
/// new states in the layer cache; `false` (and nothing changed) where it does not apply.
pub(crate) type FusedLayer<M> =
    fn(&Block<M>, usize, usize, &mut [f32], &mut LayerCache) -> Result<bool>;

/// Whether decode steps take the fused layers: yes, unless `MOLT_FUSED_DECODE=0` (read
/// once) — a switch for side-by-side benchmarks of one binary.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOLT_FUSED_DECODE").map_or(true, |v| v != "0"))
}

/// One decode step through every block (`h` `[b, D]` in, the last block's output out),
/// each through `fused` where it applies.
pub(crate) fn step_blocks<M: Mixer>(
    blocks: &[Block<M>],
    h: &Tensor,
    cache: &mut MambaCache,
    fused: FusedLayer<M>,
) -> Result<Tensor> {
    let (b, dm) = h.dims2()?;
    let fusable_input = h.device().is_cpu()
        && h.dtype() == DType::F32
        && (1..=gemv::MAX_ROWS).contains(&b)
        && gemv::enabled()
        && enabled();
    if !fusable_input {
        return step_each(blocks, h, cache);
    }
    let dev = h.device().clone();
    let mut hv: Vec<f32> = h.flatten_all()?.to_vec1()?;
    for (i, block) in blocks.iter().enumerate() {
        let lc = cache.layer_mut(i)?;
        if !fused(block, b, dm, &mut hv, lc)? {
            let out = block.step(&Tensor::from_slice(&hv, (b, dm), &dev)?, lc)?;
            hv = out.flatten_all()?.to_vec1()?;
        }
    }
    Ok(Tensor::from_vec(hv, (b, dm), &dev)?)
}

/// Whether only the checkpoint's own, frozen weights act in the projections and parameters
/// of `m` (a family adds its own conditions, such as mixer hooks).
pub(crate) fn base_weights_only<M: Mixer>(m: &M) -> bool {
    m.projections()
        .iter()
        .all(|p| p.adapter().is_none() && !p.base().weight().track_op())
        && m.params()
            .iter()
            .all(|p| p.adapter().is_none() && !p.base().track_op())
}

/// Stores a fused layer's packed new states `[conv ; ssm]` in `lc` with the old shapes.
pub(crate) fn store_states(lc: &mut LayerCache, new: Vec<f32>) -> Result<()> {
    let (conv_dims, ssm_dims) = (lc.conv.dims().to_vec(), lc.ssm.dims().to_vec());
    let conv_len: usize = conv_dims.iter().product();
    let len = new.len();
    let packed = Tensor::from_vec(new, len, lc.ssm.device())?;
    lc.conv = packed.narrow(0, 0, conv_len)?.reshape(conv_dims)?;
    lc.ssm = packed
        .narrow(0, conv_len, len - conv_len)?
        .reshape(ssm_dims)?;
    Ok(())
}

/// A tensor's storage, read-locked while the kernel reads it.
pub(crate) struct Held<'t>(StorageRef<'t>, &'t Layout);

impl<'t> Held<'t> {
    pub(crate) fn new(t: &'t Tensor) -> Self {
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
    pub(crate) fn f32(&self, len: usize) -> Option<&[f32]> {
        let (CpuStorage::F32(data), Some((start, end))) =
            (self.cpu()?, self.1.contiguous_offsets())
        else {
            return None;
        };
        (end - start == len).then(|| &data[start..end])
    }

    /// A contiguous f32 or bf16 matrix with `len` elements.
    pub(crate) fn weights(&self, len: usize) -> Option<Weights<'_>> {
        Weights::of(self.cpu()?, self.1).filter(|w| w.len() == len)
    }
}

pub(crate) fn opt<'t>(t: Option<&'t Tensor>) -> Option<Held<'t>> {
    t.map(Held::new)
}

/// An optional bias: `Some(None)` when absent, `None` when present but unusable (not f32
/// of `len` elements), which rules the kernel out.
pub(crate) fn bias<'a>(h: &'a Option<Held<'_>>, len: usize) -> Option<Option<&'a [f32]>> {
    match h {
        Some(h) => h.f32(len).map(Some),
        None => Some(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::FusedLayer;
    use crate::model::layers::Param;
    use crate::model::lm::{CausalLm, Mixer, ModelInput};
    use crate::model::lm_checkpoint::{LmCheckpoint, LmConfig};

    /// `max |got - want| / max |want|`.
    pub(crate) fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        let m = want.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// `fused_matches_generic` on the model of `cfg` built from its family's random
    /// `tensors` (with non-trivial norm weights and D: the random inits fill them with
    /// ones), its weights stored in f32 and in bf16, at several batch sizes and thread
    /// counts.
    pub(crate) fn check_fused_layers<C, M>(
        cfg: &C,
        tensors: HashMap<String, Tensor>,
        fused: FusedLayer<M>,
    ) where
        C: LmConfig<Model = CausalLm<M>>,
        M: Mixer,
    {
        let mut tensors = tensors;
        for (name, t) in tensors.iter_mut() {
            if name.ends_with("norm.weight") || name.ends_with(".D") {
                *t = t.rand_like(0.5, 1.5).unwrap().to_dtype(DType::F32).unwrap();
            }
        }
        let checkpoint = LmCheckpoint::from_tensors("test", cfg.clone(), tensors).unwrap();
        let frozen = checkpoint.into_frozen().unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let model = frozen.clone().store_weights_as(dtype).unwrap();
            for (batch, threads) in [(1, 1), (3, 3), (8, 2)] {
                fused_matches_generic(&model, fused, batch, threads);
            }
        }
    }

    /// Steps `model`'s blocks three times from a prefilled cache, layer by layer, through
    /// `fused` and through `Block::step`, on a pool of `threads` threads: each layer's output
    /// and new states agree.
    fn fused_matches_generic<M: Mixer>(
        model: &CausalLm<M>,
        fused: FusedLayer<M>,
        batch: usize,
        threads: usize,
    ) {
        let dev = Device::Cpu;
        let v = model.vocab_size() as u32;
        let ids: Vec<u32> = (0..batch as u32 * 5).map(|i| (i * 7 + 3) % v).collect();
        let ids = Tensor::from_vec(ids, (batch, 5), &dev).unwrap();
        let input = ModelInput::new(&ids, None, model.vocab_size()).unwrap();
        let mut fused_cache = model.new_cache(batch).unwrap();
        model.prefill(&input, &mut fused_cache).unwrap();
        let mut plain = fused_cache.clone();
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
                let dm = h.dim(1).unwrap();
                let dtype = model.backbone.embeddings.weight().dtype();
                // Both continue from the generic output: each layer sees the same input.
                for (i, block) in model.backbone.layers.iter().enumerate() {
                    let mut hv: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
                    let lf = fused_cache.layer_mut(i).unwrap();
                    assert!(
                        fused(block, batch, dm, &mut hv, lf).unwrap(),
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
                    let (lf, lp) = (&fused_cache.layers[i], &plain.layers[i]);
                    assert_eq!(lf.conv.dims(), lp.conv.dims());
                    assert_eq!(lf.ssm.dims(), lp.ssm.dims());
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

    /// A constant doubling of a parameter: an adapter as far as the fused path can tell.
    #[derive(Debug)]
    struct Twice;
    impl crate::model::layers::ParamAdapter for Twice {
        fn value(&self, base: &Tensor) -> candle_core::Result<Tensor> {
            base * 2.0
        }
    }

    /// With an adapter on the parameter `param` picks in layer 0, `fused` declines the layer
    /// and leaves `h` as it was.
    pub(crate) fn adapted_layer_is_not_fused<M: Mixer>(
        mut model: CausalLm<M>,
        param: impl Fn(&mut M) -> &mut Param,
        fused: FusedLayer<M>,
    ) {
        param(&mut model.backbone.layers[0].mixer).set_adapter(Some(std::sync::Arc::new(Twice)));
        let mut cache = model.new_cache(1).unwrap();
        let dm = model.backbone.embeddings.weight().dim(1).unwrap();
        let mut h = vec![0.5f32; dm];
        let before = h.clone();
        let lc = cache.layer_mut(0).unwrap();
        assert!(!fused(&model.backbone.layers[0], 1, dm, &mut h, lc).unwrap());
        assert_eq!(h, before);
    }
}
