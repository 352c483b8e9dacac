//! The Mamba-2 mixer (HF `Mamba2Mixer.torch_forward`, peft-spec §1.5), one struct built from
//! a [`VarBuilder`] whose paths are the checkpoint's names (`in_proj`, `conv1d`, `dt_bias`,
//! `A_log`, `D`, `norm`, `out_proj`), inside the shared language-model shell
//! ([`crate::model::lm`]).
//!
//! `in_proj` rows are `z [E] | xBC [E + 2GN] | dt [H]`; xBC goes through the causal conv +
//! SiLU and splits into `x [H, P] | B [G, N] | C [G, N]`; the SSD scan
//! ([`kernels::ssd_scan`]) runs per head with scalar `A`, `D` and dt bias; the gated grouped
//! RMSNorm ([`kernels::gated_rms_norm`]) precedes `out_proj`.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::Mamba2Config;
use crate::error::Result;
use crate::kernels;
use crate::model::cache::{LayerCache, MambaCache};
use crate::model::layers::{Linear, Param, Projection, conv_weight_and_bias};
use crate::model::lm::{Backbone, Block, CausalLm, Mixer, apply_mask, next_conv_state};

/// Sizes of one Mamba-2 mixer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mamba2Dims {
    /// E = H·P.
    pub d_inner: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub state: usize,
    pub groups: usize,
    pub conv_kernel: usize,
    pub eps: f64,
    /// The dt clamp of the chunked path.
    pub dt_limit: (f64, f64),
}

impl Mamba2Dims {
    pub fn of(cfg: &Mamba2Config) -> Self {
        Mamba2Dims {
            d_inner: cfg.intermediate_size(),
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
            state: cfg.state_size,
            groups: cfg.n_groups,
            conv_kernel: cfg.conv_kernel,
            eps: cfg.layer_norm_epsilon,
            dt_limit: cfg.time_step_limit,
        }
    }

    /// Channels of the conv (`E + 2GN`).
    pub fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.groups * self.state
    }
}

/// One layer's Mamba-2 mixer.
#[derive(Clone, Debug)]
pub struct Mamba2Mixer {
    /// `[2E + 2GN + H, D]`: rows z | x | B | C | dt.
    pub in_proj: Projection,
    /// `[E + 2GN, 1, K]`.
    pub conv_weight: Param,
    pub conv_bias: Option<Param>,
    /// `[H]`.
    pub dt_bias: Param,
    /// `[H]`; `A = -exp(A_log)`.
    pub a_log: Param,
    /// `[H]`.
    pub d: Param,
    /// The gated RMSNorm's weight `[E]`.
    pub norm: Param,
    /// `[D, E]`.
    pub out_proj: Projection,
    pub dims: Mamba2Dims,
    layer_idx: usize,
}

/// xBC's three parts after the conv: `x` `[b, L, H, P]`, `B`, `C` `[b, L, G, N]` (rank 3
/// without the time axis for a decode step).
struct Xbc {
    x: Tensor,
    b: Tensor,
    c: Tensor,
}

impl Mamba2Mixer {
    pub fn new(cfg: &Mamba2Config, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let dims = Mamba2Dims::of(cfg);
        let (d, e, h, k) = (cfg.hidden_size, dims.d_inner, dims.heads, dims.conv_kernel);
        let conv_dim = dims.conv_dim();
        let d_in = cfg.d_in_proj();
        let bias = |name: &str, n: usize| -> Result<Option<Tensor>> {
            Ok(if cfg.use_bias {
                Some(vb.pp(name).get(n, "bias")?)
            } else {
                None
            })
        };
        let conv = vb.pp("conv1d");
        Ok(Mamba2Mixer {
            in_proj: Projection::new(Linear::new(
                vb.pp("in_proj").get((d_in, d), "weight")?,
                bias("in_proj", d_in)?,
            )),
            conv_weight: Param::new(conv.get((conv_dim, 1, k), "weight")?),
            conv_bias: if cfg.use_conv_bias {
                Some(Param::new(conv.get(conv_dim, "bias")?))
            } else {
                None
            },
            dt_bias: Param::new(vb.get(h, "dt_bias")?),
            a_log: Param::new(vb.get(h, "A_log")?),
            d: Param::new(vb.get(h, "D")?),
            norm: Param::new(vb.pp("norm").get(e, "weight")?),
            out_proj: Projection::new(Linear::new(
                vb.pp("out_proj").get((d, e), "weight")?,
                bias("out_proj", d)?,
            )),
            dims,
            layer_idx,
        })
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }

    /// Conv weight as the kernels take it (`[C, K]`) and the bias (zeros when absent).
    fn conv_params(&self) -> Result<(Tensor, Tensor)> {
        Ok(conv_weight_and_bias(
            &self.conv_weight,
            self.conv_bias.as_ref(),
        )?)
    }

    /// `A = -exp(A_log)` in f32.
    fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.neg_exp()?)
    }

    /// Splits in_proj's output along its last axis into (z, xBC, dt).
    fn split_in(&self, zxbcdt: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (e, c) = (self.dims.d_inner, self.dims.conv_dim());
        Ok((
            zxbcdt.narrow(D::Minus1, 0, e)?,
            zxbcdt.narrow(D::Minus1, e, c)?,
            zxbcdt.narrow(D::Minus1, e + c, self.dims.heads)?,
        ))
    }

    /// Splits the conv output `[.., E + 2GN]` into x `[.., H, P]`, B, C `[.., G, N]`.
    fn split_xbc(&self, xbc: &Tensor) -> Result<Xbc> {
        let Mamba2Dims {
            d_inner: e,
            heads: h,
            head_dim: p,
            state: n,
            groups: g,
            ..
        } = self.dims;
        let lead = &xbc.dims()[..xbc.rank() - 1];
        let shape = |a: usize, b: usize| [lead, &[a, b]].concat();
        Ok(Xbc {
            x: xbc.narrow(D::Minus1, 0, e)?.reshape(shape(h, p))?,
            b: xbc.narrow(D::Minus1, e, g * n)?.reshape(shape(g, n))?,
            c: xbc
                .narrow(D::Minus1, e + g * n, g * n)?
                .reshape(shape(g, n))?,
        })
    }

    /// The gated norm and out_proj on the scan output `y` `[.., E]`.
    fn finish(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        let y =
            kernels::gated_rms_norm(y, z, &self.norm.value()?, self.dims.groups, self.dims.eps)?;
        Ok(self.out_proj.forward(&y)?)
    }

    /// Full-sequence forward (see [`Mixer::forward`]). HF multiplies by the mask twice: the
    /// mixer input (so in_proj sees zeros) and the conv output (so x and B are zero at padded
    /// positions and the state stays zero through left padding).
    pub fn forward(
        &self,
        u: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (bsz, len, _) = u.dims3()?;
        let u = apply_mask(u, mask)?;
        let (z, xbc, dt) = self.split_in(&self.in_proj.forward(&u)?)?;
        let xbc = xbc.contiguous()?;
        let k = self.dims.conv_kernel;
        let history = match &cache {
            Some(c) => Some(c.conv.narrow(2, 1, k - 1)?.contiguous()?),
            None => None,
        };
        let (w, b) = self.conv_params()?;
        let conv = kernels::causal_conv1d_silu(&xbc, &w, &b, history.as_ref(), false)?;
        let conv = apply_mask(&conv, mask)?;
        let Xbc { x, b: bm, c: cm } = self.split_xbc(&conv)?;
        let init = cache.as_ref().map(|c| c.ssm.clone());
        let (y, last) = kernels::ssd_scan(
            &x,
            &dt.contiguous()?,
            &self.a()?,
            &bm,
            &cm,
            &self.d.value()?,
            &self.dt_bias.value()?,
            self.dims.dt_limit,
            init.as_ref(),
        )?;
        if let Some(c) = cache {
            c.conv = next_conv_state(&c.conv, &xbc)?;
            c.ssm = last;
        }
        let y = y.reshape((bsz, len, self.dims.d_inner))?;
        self.finish(&y, &z)
    }

    /// One cached decode step on the normed input `[b, D]` (dt unclamped, as HF's step).
    pub fn step(&self, u: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let bsz = u.dim(0)?;
        let (z, xbc, dt) = self.split_in(&self.in_proj.forward(u)?)?;
        let (w, b) = self.conv_params()?;
        let (conv, window) = kernels::causal_conv1d_step(&cache.conv, &xbc.contiguous()?, &w, &b)?;
        let Xbc { x, b: bm, c: cm } = self.split_xbc(&conv)?;
        let (y, state) = kernels::ssd_step(
            &cache.ssm,
            &x,
            &dt.contiguous()?,
            &self.a()?,
            &bm,
            &cm,
            &self.d.value()?,
            &self.dt_bias.value()?,
        )?;
        cache.conv = window.to_dtype(cache.conv.dtype())?;
        cache.ssm = state;
        let y = y.reshape((bsz, self.dims.d_inner))?;
        self.finish(&y, &z)
    }
}

impl Mixer for Mamba2Mixer {
    type Config = Mamba2Config;

    fn new(cfg: &Mamba2Config, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        Mamba2Mixer::new(cfg, layer_idx, vb)
    }

    fn forward(
        &self,
        u: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        Mamba2Mixer::forward(self, u, mask, cache)
    }

    fn step(&self, u: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        Mamba2Mixer::step(self, u, cache)
    }

    fn step_blocks(blocks: &[Mamba2Block], h: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        crate::model::fused::step_blocks(blocks, h, cache, super::decode::fused_layer)
    }

    fn new_cache(&self, batch: usize, dtype: DType, device: &Device) -> Result<LayerCache> {
        let d = &self.dims;
        Ok(LayerCache {
            conv: Tensor::zeros((batch, d.conv_dim(), d.conv_kernel), dtype, device)?,
            ssm: Tensor::zeros((batch, d.heads, d.head_dim, d.state), DType::F32, device)?,
        })
    }

    fn projections(&self) -> Vec<&Projection> {
        vec![&self.in_proj, &self.out_proj]
    }

    fn projections_mut(&mut self) -> Vec<&mut Projection> {
        vec![&mut self.in_proj, &mut self.out_proj]
    }

    fn params(&self) -> Vec<&Param> {
        let mut p = vec![
            &self.conv_weight,
            &self.dt_bias,
            &self.a_log,
            &self.d,
            &self.norm,
        ];
        p.extend(self.conv_bias.as_ref());
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
        push("conv1d.weight", self.conv_weight.base());
        if let Some(b) = &self.conv_bias {
            push("conv1d.bias", b.base());
        }
        push("dt_bias", self.dt_bias.base());
        push("A_log", self.a_log.base());
        push("D", self.d.base());
        push("norm.weight", self.norm.base());
        push("out_proj.weight", self.out_proj.base().weight());
        if let Some(b) = self.out_proj.base().bias() {
            push("out_proj.bias", b);
        }
    }
}

/// A Mamba-2 residual block.
pub type Mamba2Block = Block<Mamba2Mixer>;
/// The Mamba-2 backbone (`backbone.*`).
pub type Mamba2Model = Backbone<Mamba2Mixer>;
/// Mamba-2 with its LM head (`Mamba2ForCausalLM`).
pub type Mamba2ForCausalLM = CausalLm<Mamba2Mixer>;
