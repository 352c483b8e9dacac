//! One decode batch for sequences of different adapters on the same base (serving).
//!
//! An adapter that only adds low-rank (or parallel) terms to projection outputs leaves
//! every base tensor of the model shared and untouched. Rows of such adapted models can
//! then run through one model whose projections compute the base matmul once for the whole
//! batch and add each row range's own terms ([`RowSegments`]); everything else in a Mamba
//! layer (conv, scan, norms) is per row anyway. Written once for every language family
//! through the [`Mixer`]'s projection and parameter lists.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::layers::{LinearAdapter, RowSegments};
use crate::model::lm::{CausalLm, Mixer};

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.id() == b.id()
}

fn same_opt(a: Option<&Tensor>, b: Option<&Tensor>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl<M: Mixer> CausalLm<M> {
    /// Whether `self` is `base` (sharing all of its tensors) with nothing changed but
    /// additive projection adapters: then its sequences can share `base`'s decode batch
    /// ([`Self::row_segmented`]).
    pub fn is_additive_over(&self, base: &CausalLm<M>) -> bool {
        let (a, b) = (&self.backbone, &base.backbone);
        if self.input_hook.is_some()
            || base.input_hook.is_some()
            || a.layers.len() != b.layers.len()
            || !same_opt(self.lm_head.as_ref(), base.lm_head.as_ref())
            || !same(a.embeddings.weight(), b.embeddings.weight())
            || a.embeddings.adapter().is_some()
            || b.embeddings.adapter().is_some()
            || !same(a.norm_f.weight(), b.norm_f.weight())
        {
            return false;
        }
        a.layers.iter().zip(&b.layers).all(|(la, lb)| {
            let (ma, mb) = (&la.mixer, &lb.mixer);
            let (params_a, params_b) = (ma.params(), mb.params());
            let params_shared = params_a.len() == params_b.len()
                && params_a.iter().zip(&params_b).all(|(pa, pb)| {
                    same(pa.base(), pb.base()) && pa.adapter().is_none() && pb.adapter().is_none()
                });
            let (projs_a, projs_b) = (ma.projections(), mb.projections());
            let projections_shared = projs_a.len() == projs_b.len()
                && projs_a.iter().zip(&projs_b).all(|(pa, pb)| {
                    same(pa.base().weight(), pb.base().weight())
                        && same_opt(pa.base().bias(), pb.base().bias())
                        && pb.adapter().is_none()
                        && pa.adapter().is_none_or(|x| x.is_additive())
                });
            same(la.norm.weight(), lb.norm.weight())
                && !ma.inserts_positions()
                && !mb.inserts_positions()
                && params_shared
                && projections_shared
        })
    }

    /// The model for one batch whose consecutive row ranges run additive variants of
    /// `self`: `segments` is `(rows, model)` in row order, each model passing
    /// [`Self::is_additive_over`] `self` (`self` itself for plain base rows).
    pub fn row_segmented(&self, segments: &[(usize, &CausalLm<M>)]) -> Result<Self> {
        if segments.iter().any(|(_, m)| !m.is_additive_over(self)) {
            return Err(Error::input(
                "segments",
                "a model in the batch changes more than additive projection terms",
            ));
        }
        let mut out = self.clone();
        for (i, block) in out.backbone.layers.iter_mut().enumerate() {
            for (p, proj) in block.mixer.projections_mut().into_iter().enumerate() {
                let segs: Vec<(usize, Option<Arc<dyn LinearAdapter>>)> = segments
                    .iter()
                    .map(|(rows, m)| {
                        let adapter = m.backbone.layers[i]
                            .mixer
                            .projections()
                            .get(p)
                            .and_then(|x| x.adapter().cloned());
                        (*rows, adapter)
                    })
                    .collect();
                if segs.iter().all(|s| s.1.is_none()) {
                    continue;
                }
                let joined = RowSegments::new(segs)?.ok_or_else(|| {
                    Error::input("segments", "a projection adapter is not additive")
                })?;
                proj.set_adapter(Some(Arc::new(joined)));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MambaConfig;
    use crate::model::layers::{Linear, LowRankTerm, ParamAdapter, linear_forward};
    use crate::model::mamba::checkpoint::Checkpoint;
    use candle_core::{DType, Device};

    /// `W x + B (A x)`, additive; with `terms` it also offers itself as a low-rank term
    /// (the stacked path), without only as an opaque additive adapter (per-run path).
    #[derive(Debug)]
    struct LowRank {
        a: Tensor,
        b: Tensor,
        terms: bool,
    }
    impl LinearAdapter for LowRank {
        fn forward(&self, base: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
            self.add_terms(x, base.forward(x)?)
        }
        fn is_additive(&self) -> bool {
            true
        }
        fn add_terms(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
            y + linear_forward(&linear_forward(x, &self.a, None)?, &self.b, None)?
        }
        fn low_rank_terms(&self) -> Option<Vec<LowRankTerm>> {
            let out = self.b.dims()[0];
            self.terms.then(|| {
                vec![LowRankTerm {
                    a: self.a.clone(),
                    b: self.b.clone(),
                    scale: 1.0,
                    rows: (0, out, out),
                }]
            })
        }
    }

    #[derive(Debug)]
    struct Shift;
    impl ParamAdapter for Shift {
        fn value(&self, base: &Tensor) -> candle_core::Result<Tensor> {
            base + 0.5
        }
    }

    fn low_rank(seed: f64, out: usize, inp: usize, terms: bool) -> Result<Arc<dyn LinearAdapter>> {
        let dev = Device::Cpu;
        let a = (Tensor::randn(0f32, 1., (2, inp), &dev)? * seed)?;
        let b = (Tensor::randn(0f32, 1., (out, 2), &dev)? * 0.1)?;
        Ok(Arc::new(LowRank { a, b, terms }))
    }

    #[test]
    fn one_batch_of_mixed_adapters_equals_each_model_alone() -> Result<()> {
        for terms in [true, false] {
            mixed_batch(terms)?;
        }
        Ok(())
    }

    fn mixed_batch(terms: bool) -> Result<()> {
        let mut cfg = MambaConfig::new(16, 2, 40);
        cfg.state_size = 4;
        let base = Checkpoint::random(&cfg, 3, &Device::Cpu)?.into_frozen()?;
        let e = cfg.intermediate_size;
        let mut one = base.clone();
        one.backbone.layers[0]
            .mixer
            .in_proj
            .set_adapter(Some(low_rank(0.3, 2 * e, 16, terms)?));
        let mut two = base.clone();
        two.backbone.layers[1]
            .mixer
            .out_proj
            .set_adapter(Some(low_rank(0.5, 16, e, terms)?));
        two.backbone.layers[0]
            .mixer
            .in_proj
            .set_adapter(Some(low_rank(-0.2, 2 * e, 16, terms)?));
        assert!(one.is_additive_over(&base) && two.is_additive_over(&base));
        assert!(base.is_additive_over(&base));

        // Rows: 2 of `one`, 1 of base, 2 of `two`; each row fed a different prompt.
        let models = [&one, &one, &base, &two, &two];
        let prompts: [&[u32]; 5] = [
            &[1, 2, 3],
            &[4, 5, 6],
            &[7, 8, 9],
            &[10, 11, 12],
            &[3, 3, 1],
        ];
        let mut alone = Vec::new();
        for (m, p) in models.iter().zip(prompts) {
            let mut cache = m.new_cache(1)?;
            let mut logits = Vec::new();
            for &t in p {
                logits.push(m.step(&[t], &mut cache)?.squeeze(0)?);
            }
            alone.push(Tensor::stack(&logits, 0)?);
        }
        let joined = base.row_segmented(&[(2, &one), (1, &base), (2, &two)])?;
        let mut cache = base.new_cache(5)?;
        for pos in 0..3 {
            let toks: Vec<u32> = prompts.iter().map(|p| p[pos]).collect();
            let got = joined.step(&toks, &mut cache)?;
            for (row, want) in alone.iter().enumerate() {
                let diff = (got.get(row)? - want.get(pos)?)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                assert!(
                    diff < 1e-5,
                    "row {row} position {pos} (terms {terms}): {diff}"
                );
            }
        }
        // The adapters matter: row 0 differs from a base row fed the same tokens.
        let mut c = base.new_cache(1)?;
        let plain = base.step(&[1], &mut c)?.squeeze(0)?;
        let d = (alone[0].get(0)? - plain)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d > 1e-4, "{d}");
        Ok(())
    }

    #[test]
    fn only_additive_variants_join() -> Result<()> {
        let mut cfg = MambaConfig::new(16, 1, 40);
        cfg.state_size = 4;
        let base = Checkpoint::random(&cfg, 5, &Device::Cpu)?.into_frozen()?;
        let mut shifted = base.clone();
        shifted.backbone.layers[0]
            .mixer
            .branch
            .d
            .set_adapter(Some(Arc::new(Shift)));
        assert!(!shifted.is_additive_over(&base));
        // Other weights (e.g. a merged model) are not the base's.
        let other = Checkpoint::random(&cfg, 6, &Device::Cpu)?.into_frozen()?;
        assert!(!other.is_additive_over(&base));
        assert!(base.row_segmented(&[(1, &base), (1, &shifted)]).is_err());
        Ok(())
    }
}
