//! Mamba-1 language model (peft-spec §1.2): its mixer, one struct per module, built from a
//! [`VarBuilder`] whose paths are the checkpoint's tensor names (HF naming), inside the shared
//! language-model shell ([`crate::model::lm`]). The same code serves training (weights are
//! `Var`s from a `VarMap`, or frozen tensors plus adapters) and inference (frozen tensors,
//! cache-driven decoding).
//!
//! Everything is channels-last (`[batch, time, channels]`), the layout the kernels take, so
//! the forward never transposes.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::MambaConfig;
use crate::error::Result;
use crate::model::cache::{LayerCache, MambaCache};
use crate::model::layers::{Linear, Param, Projection};
use crate::model::lm::{Backbone, Block, CausalLm, Mixer, apply_mask, next_conv_state};
use crate::model::selective::{BranchDims, BranchInput, BranchRef, SelectiveBranch};

/// Hook into a mixer's sequence path, for methods that add positions inside a layer
/// (affix-tuning inserts soft tokens after in_proj and drops them after out_proj).
pub trait MixerHook: Send + Sync + std::fmt::Debug {
    /// Receives the in_proj output `xz` `[b, L, 2E]` (X then Z) and the mask `[b, L, 1]`;
    /// returns the sequence the conv and scan run on, and its mask.
    fn before_conv(
        &self,
        layer: usize,
        xz: Tensor,
        mask: Option<Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let _ = layer;
        Ok((xz, mask))
    }

    /// A bidirectional mixer's tokens `[n, 2E]` (X then Z) for one scan direction: prepended
    /// to that direction's sequence in its own scan order, their outputs dropped before the
    /// directions are combined. `None`: this hook does not act per direction.
    fn direction_prefix(
        &self,
        layer: usize,
        backward: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let _ = (layer, backward);
        Ok(None)
    }

    /// Receives the out_proj output for the augmented sequence; returns `[b, L, D]`.
    fn after_out(&self, layer: usize, out: Tensor) -> candle_core::Result<Tensor> {
        let _ = layer;
        Ok(out)
    }
}

/// The selective-SSM mixer of one layer: in_proj, the selective branch (conv1d, x_proj,
/// dt_proj and its bias, `A_log`, `D`; see [`SelectiveBranch`]), out_proj.
#[derive(Clone, Debug)]
pub struct MambaMixer {
    pub in_proj: Projection,
    /// `A_log` is `[E, N]`; N is read from it, not from the config, so extra state
    /// dimensions need no change to this code.
    pub branch: SelectiveBranch,
    pub out_proj: Projection,
    pub hook: Option<Arc<dyn MixerHook>>,
    layer_idx: usize,
    d_inner: usize,
}

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    Ok(vb.get(shape, name)?)
}

impl MambaMixer {
    pub fn new(cfg: &MambaConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let (d_model, e, n, r, k) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.state_size,
            cfg.time_step_rank,
            cfg.conv_kernel,
        );
        let in_bias = if cfg.use_bias {
            Some(get(&vb, &[2 * e], "in_proj.bias")?)
        } else {
            None
        };
        let out_bias = if cfg.use_bias {
            Some(get(&vb, &[d_model], "out_proj.bias")?)
        } else {
            None
        };
        let dims = BranchDims {
            d_inner: e,
            d_state: n,
            dt_rank: r,
            d_conv: k,
            conv_bias: cfg.use_conv_bias,
        };
        Ok(MambaMixer {
            in_proj: Projection::new(Linear::new(
                get(&vb, &[2 * e, d_model], "in_proj.weight")?,
                in_bias,
            )),
            branch: SelectiveBranch::new(dims, "", layer_idx, &vb)?,
            out_proj: Projection::new(Linear::new(
                get(&vb, &[d_model, e], "out_proj.weight")?,
                out_bias,
            )),
            hook: None,
            layer_idx,
            d_inner: e,
        })
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }

    pub fn d_inner(&self) -> usize {
        self.d_inner
    }

    /// The SSM state width N (including any extra dimensions an adapter adds).
    pub fn state_size(&self) -> Result<usize> {
        Ok(self.branch.a_log.value()?.dim(1)?)
    }

    pub fn conv_kernel(&self) -> usize {
        self.branch
            .conv_weight
            .base()
            .dims()
            .last()
            .copied()
            .unwrap_or(1)
    }

    /// This mixer's selective branch (conv1d → x_proj → dt_proj → scan), the code shared
    /// with every family built on the Mamba-1 branch ([`crate::model::selective`]).
    pub fn branch(&self) -> BranchRef<'_> {
        self.branch.as_ref()
    }

    /// Full-sequence forward. `u` is the normed block input `[b, L, D]`; `mask` is
    /// `[b, L, 1]` (1 = real token) or `None`. With a cache, the conv history and SSM state
    /// are read from it and written back (prefill, or continuing a prompt).
    pub fn forward(
        &self,
        u: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let e = self.d_inner;
        let xz = self.in_proj.forward(u)?;
        let (xz, mask) = match &self.hook {
            Some(h) => h.before_conv(self.layer_idx, xz, mask.cloned())?,
            None => (xz, mask.cloned()),
        };
        let mask = mask.as_ref();
        let x = xz.narrow(D::Minus1, 0, e)?;
        let z = xz.narrow(D::Minus1, e, e)?.contiguous()?;
        // HF zeroes padded positions of X (after in_proj) and of the conv output, so the SSM
        // state stays exactly zero through left padding.
        let x = apply_mask(&x, mask)?.contiguous()?;
        let k = self.conv_kernel();
        let history = match &cache {
            // The kernels may require contiguous inputs; this view is small.
            Some(c) => Some(c.conv.narrow(2, 1, k - 1)?.contiguous()?),
            None => None,
        };
        let init = cache.as_ref().map(|c| c.ssm.clone());
        let (y, last) = self.branch().forward(
            &x,
            &z,
            BranchInput {
                mask,
                conv_history: history.as_ref(),
                initial_state: init.as_ref(),
                reverse: false,
            },
        )?;
        if let Some(c) = cache {
            c.conv = next_conv_state(&c.conv, &x)?;
            c.ssm = last;
        }
        let out = self.out_proj.forward(&y)?;
        match &self.hook {
            Some(h) => Ok(h.after_out(self.layer_idx, out)?),
            None => Ok(out),
        }
    }

    /// One decode step: `u` is the normed input `[b, D]` of a single new token.
    pub fn step(&self, u: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let e = self.d_inner;
        let xz = self.in_proj.forward(u)?;
        let x = xz.narrow(1, 0, e)?.contiguous()?;
        let z = xz.narrow(1, e, e)?.contiguous()?;
        let (y, conv, state) = self.branch().step(&x, &z, &cache.conv, &cache.ssm)?;
        cache.conv = conv;
        cache.ssm = state;
        Ok(self.out_proj.forward(&y)?)
    }
}

impl Mixer for MambaMixer {
    type Config = MambaConfig;

    fn new(cfg: &MambaConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        MambaMixer::new(cfg, layer_idx, vb)
    }

    fn forward(
        &self,
        u: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        MambaMixer::forward(self, u, mask, cache)
    }

    fn step(&self, u: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        MambaMixer::step(self, u, cache)
    }

    fn step_blocks(blocks: &[MambaBlock], h: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        crate::model::fused::step_blocks(blocks, h, cache, super::decode::fused_layer)
    }

    fn new_cache(&self, batch: usize, dtype: DType, device: &Device) -> Result<LayerCache> {
        let (e, k, n) = (self.d_inner(), self.conv_kernel(), self.state_size()?);
        Ok(LayerCache {
            conv: Tensor::zeros((batch, e, k), dtype, device)?,
            ssm: Tensor::zeros((batch, e, n), DType::F32, device)?,
        })
    }

    fn inserts_positions(&self) -> bool {
        self.hook.is_some()
    }

    fn projections(&self) -> Vec<&Projection> {
        vec![
            &self.in_proj,
            &self.branch.x_proj,
            &self.branch.dt_proj,
            &self.out_proj,
        ]
    }

    fn projections_mut(&mut self) -> Vec<&mut Projection> {
        vec![
            &mut self.in_proj,
            &mut self.branch.x_proj,
            &mut self.branch.dt_proj,
            &mut self.out_proj,
        ]
    }

    fn params(&self) -> Vec<&Param> {
        let b = &self.branch;
        let mut p = vec![&b.conv_weight, &b.dt_bias, &b.a_log, &b.d];
        p.extend(b.conv_bias.as_ref());
        p
    }

    fn named_weights(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let mut push = |name: &str, t: &Tensor| {
            out.push((format!("{prefix}.{name}"), t.clone()));
        };
        push("in_proj.weight", self.in_proj.base().weight());
        if let Some(b) = self.in_proj.base().bias() {
            push("in_proj.bias", b);
        }
        push("conv1d.weight", self.branch.conv_weight.base());
        if let Some(b) = &self.branch.conv_bias {
            push("conv1d.bias", b.base());
        }
        push("x_proj.weight", self.branch.x_proj.base().weight());
        push("dt_proj.weight", self.branch.dt_proj.base().weight());
        push("dt_proj.bias", self.branch.dt_bias.base());
        push("A_log", self.branch.a_log.base());
        push("D", self.branch.d.base());
        push("out_proj.weight", self.out_proj.base().weight());
        if let Some(b) = self.out_proj.base().bias() {
            push("out_proj.bias", b);
        }
    }
}

/// A Mamba-1 residual block.
pub type MambaBlock = Block<MambaMixer>;
/// The Mamba-1 backbone (`backbone.*`).
pub type MambaModel = Backbone<MambaMixer>;
/// Mamba-1 with its LM head.
pub type MambaForCausalLM = CausalLm<MambaMixer>;

#[cfg(test)]
mod tests {
    use super::super::checkpoint::Checkpoint;
    use super::*;
    use crate::model::layers::{LinearAdapter, ParamAdapter, linear_forward};
    use crate::model::loss::causal_lm_loss;
    use candle_core::Var;

    /// `base + δ`, the partial-tuning re-parameterisation.
    #[derive(Debug)]
    struct Delta(Var);
    impl ParamAdapter for Delta {
        fn value(&self, base: &Tensor) -> candle_core::Result<Tensor> {
            base + self.0.as_tensor()
        }
    }

    /// A LoRA-shaped adapter: `W x + B (A x)`.
    #[derive(Debug)]
    struct LowRank {
        a: Var,
        b: Var,
    }
    impl LinearAdapter for LowRank {
        fn forward(&self, base: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
            let low = linear_forward(
                &linear_forward(x, self.a.as_tensor(), None)?,
                self.b.as_tensor(),
                None,
            )?;
            base.forward(x)? + low
        }
    }

    #[test]
    fn adapters_hook_in_and_only_they_get_gradients() -> Result<()> {
        let mut cfg = MambaConfig::new(16, 2, 32);
        cfg.state_size = 4;
        let base = Checkpoint::random(&cfg, 7, &Device::Cpu)?.into_frozen()?;
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 2]], &Device::Cpu)?;
        let want = base.forward(&ids, None)?;

        let mut model = base.clone();
        let e = cfg.intermediate_size;
        let delta = Var::zeros(e, DType::F32, &Device::Cpu)?;
        let a = Var::from_tensor(&(Tensor::ones((2, 16), DType::F32, &Device::Cpu)? * 0.1)?)?;
        let b = Var::zeros((2 * e, 2), DType::F32, &Device::Cpu)?;
        let mixer = &mut model.backbone.layers[1].mixer;
        mixer
            .branch
            .d
            .set_adapter(Some(Arc::new(Delta(delta.clone()))));
        mixer.in_proj.set_adapter(Some(Arc::new(LowRank {
            a: a.clone(),
            b: b.clone(),
        })));

        // Zero-initialised adapters preserve the function.
        let got = model.forward(&ids, None)?;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");

        let grads = causal_lm_loss(&model.forward(&ids, None)?, &ids)?.backward()?;
        assert!(grads.get(delta.as_tensor()).is_some());
        assert!(grads.get(b.as_tensor()).is_some());
        // Frozen matrices are plain tensors kept out of the graph: no gradient is computed
        // for them (candle still fills one in for small frozen operands of elementwise ops,
        // such as biases and norm weights; those cost little).
        for (name, t) in base.named_weights() {
            if t.rank() == 2 {
                assert!(grads.get(&t).is_none(), "{name} got a gradient");
            }
        }

        // A moved δ changes the output on the next forward (no stale cached value).
        delta.set(&Tensor::ones(e, DType::F32, &Device::Cpu)?)?;
        let moved = model.forward(&ids, None)?;
        let diff = (moved - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff > 1e-4, "{diff}");
        Ok(())
    }
}
