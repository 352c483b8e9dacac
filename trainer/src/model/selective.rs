//! The Mamba-1 selective branch, written once (peft-spec §1.2 steps 3–9): causal depthwise
//! conv1d + SiLU → `x_proj` → split `[δ | B | C]` → `dt_proj` → selective scan with
//! `A = -exp(A_log)`, `D` and the dt bias, gated by `SiLU(z)`.
//!
//! Mamba-1's [`MambaMixer`](super::MambaMixer) runs it once per layer on its own parameters;
//! Vim's bidirectional mixer ([`super::vim`]) runs it twice, on a forward and a backward
//! [`SelectiveBranch`] with independent parameters. Both go through [`BranchRef`], so the
//! math (and every fused kernel call) exists in one place.

use candle_core::{D, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Linear, Param, Projection, conv_weight_and_bias};
use crate::error::Result;
use crate::kernels;

/// Borrowed view of one branch's parameters: what the branch computation needs, whoever owns
/// the parameters (Mamba-1's mixer keeps them as its own fields, for its PEFT hooks).
#[derive(Clone, Copy, Debug)]
pub struct BranchRef<'a> {
    /// `[E, 1, K]`.
    pub conv_weight: &'a Param,
    /// `[E]`, `None` when the checkpoint has no conv bias.
    pub conv_bias: Option<&'a Param>,
    pub x_proj: &'a Projection,
    /// dt_proj without its bias (the scan adds `dt_bias` before the softplus).
    pub dt_proj: &'a Projection,
    pub dt_bias: &'a Param,
    /// `[E, N]`.
    pub a_log: &'a Param,
    /// `[E]`.
    pub d: &'a Param,
    /// For messages.
    pub layer_idx: usize,
}

/// What one full-sequence run of a branch takes besides `x` and `z`.
#[derive(Clone, Copy, Debug, Default)]
pub struct BranchInput<'a> {
    /// `[b, L, 1]`, 1 = real token; zeroes padded positions of x and of the conv output.
    pub mask: Option<&'a Tensor>,
    /// Conv history `[b, E, K-1]` (oldest first), when continuing a cached sequence.
    pub conv_history: Option<&'a Tensor>,
    /// Initial SSM state `[b, E, N]`.
    pub initial_state: Option<&'a Tensor>,
    /// Run over time backwards (anti-causal conv, scan from the end) in the kernels, as
    /// Vim's backward branch does, instead of flipping x and z and flipping y back.
    pub reverse: bool,
}

impl BranchRef<'_> {
    /// Conv weight as the kernels take it (`[E, K]`) and the bias (zeros when absent).
    pub fn conv_params(&self) -> Result<(Tensor, Tensor)> {
        Ok(conv_weight_and_bias(self.conv_weight, self.conv_bias)?)
    }

    /// `A = -exp(A_log)`, in f32 as the reference computes it.
    pub fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.neg_exp()?)
    }

    /// Splits x_proj's output into (δ `[.., R]`, B `[.., N]`, C `[.., N]`), along the last dim.
    pub fn split_ssm(&self, ssm: &Tensor, n: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let width = ssm.dim(D::Minus1)?;
        let r = width.checked_sub(2 * n).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "layer {}: x_proj gives {width} outputs, fewer than 2·state_size = {}",
                self.layer_idx,
                2 * n
            ))
        })?;
        let last = ssm.rank() - 1;
        Ok((
            ssm.narrow(last, 0, r)?,
            ssm.narrow(last, r, n)?.contiguous()?,
            ssm.narrow(last, r + n, n)?.contiguous()?,
        ))
    }

    /// The branch on a whole sequence: `x` `[b, L, E]` (contiguous, pre-conv), `z` `[b, L, E]`
    /// (contiguous gate). Returns the gated output `y` `[b, L, E]` and the last SSM state
    /// `[b, E, N]`.
    pub fn forward(
        &self,
        x: &Tensor,
        z: &Tensor,
        input: BranchInput<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let (w, b) = self.conv_params()?;
        let xc = kernels::causal_conv1d_silu(x, &w, &b, input.conv_history, input.reverse)?;
        let xc = match input.mask {
            Some(m) => xc.broadcast_mul(m)?,
            None => xc,
        };
        let a = self.a()?;
        let n = a.dim(1)?;
        let ssm = self.x_proj.forward(&xc)?;
        let (delta_r, bm, cm) = self.split_ssm(&ssm, n)?;
        let delta = self.dt_proj.forward(&delta_r)?;
        let dt_bias = self.dt_bias.value()?;
        let d = self.d.value()?;
        Ok(kernels::selective_scan(
            &xc,
            &delta,
            &a,
            &bm,
            &cm,
            &d,
            &dt_bias,
            Some(z),
            input.initial_state,
            input.reverse,
        )?)
    }

    /// One decode step on `x`, `z` `[b, E]`, with the conv window `[b, E, K]` and SSM state
    /// `[b, E, N]`. Returns `(y, new conv window, new state)`.
    pub fn step(
        &self,
        x: &Tensor,
        z: &Tensor,
        conv: &Tensor,
        state: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (w, b) = self.conv_params()?;
        let (xc, conv) = kernels::causal_conv1d_step(conv, x, &w, &b)?;
        let a = self.a()?;
        let n = a.dim(1)?;
        let ssm = self.x_proj.forward(&xc)?;
        let (delta_r, bm, cm) = self.split_ssm(&ssm, n)?;
        let delta = self.dt_proj.forward(&delta_r)?;
        let (y, state) = kernels::selective_scan_step(
            state,
            &xc,
            &delta,
            &a,
            &bm,
            &cm,
            &self.d.value()?,
            &self.dt_bias.value()?,
            Some(z),
        )?;
        Ok((y, conv, state))
    }
}

/// An owned branch, for families that hold more than one per layer (Vim's forward and
/// backward copies). `suffix` picks the checkpoint names: `""` gives `conv1d`, `x_proj`,
/// `dt_proj`, `A_log`, `D`; `"_b"` gives `conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`.
#[derive(Clone, Debug)]
pub struct SelectiveBranch {
    pub conv_weight: Param,
    pub conv_bias: Option<Param>,
    pub x_proj: Projection,
    pub dt_proj: Projection,
    pub dt_bias: Param,
    pub a_log: Param,
    pub d: Param,
    layer_idx: usize,
}

/// Sizes of one branch: E (d_inner), N (d_state), R (dt_rank), K (d_conv).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchDims {
    pub d_inner: usize,
    pub d_state: usize,
    pub dt_rank: usize,
    pub d_conv: usize,
    pub conv_bias: bool,
}

impl SelectiveBranch {
    pub fn new(dims: BranchDims, suffix: &str, layer_idx: usize, vb: &VarBuilder) -> Result<Self> {
        let BranchDims {
            d_inner: e,
            d_state: n,
            dt_rank: r,
            d_conv: k,
            conv_bias,
        } = dims;
        let conv = vb.pp(format!("conv1d{suffix}"));
        let dt = vb.pp(format!("dt_proj{suffix}"));
        let a_name = if suffix.is_empty() {
            "A_log".to_string()
        } else {
            format!("A{suffix}_log")
        };
        Ok(SelectiveBranch {
            conv_weight: Param::new(conv.get((e, 1, k), "weight")?),
            conv_bias: if conv_bias {
                Some(Param::new(conv.get(e, "bias")?))
            } else {
                None
            },
            x_proj: Projection::new(Linear::new(
                vb.pp(format!("x_proj{suffix}"))
                    .get((r + 2 * n, e), "weight")?,
                None,
            )),
            dt_proj: Projection::new(Linear::new(dt.get((e, r), "weight")?, None)),
            dt_bias: Param::new(dt.get(e, "bias")?),
            a_log: Param::new(vb.get((e, n), &a_name)?),
            d: Param::new(vb.get(e, &format!("D{suffix}"))?),
            layer_idx,
        })
    }

    pub fn as_ref(&self) -> BranchRef<'_> {
        BranchRef {
            conv_weight: &self.conv_weight,
            conv_bias: self.conv_bias.as_ref(),
            x_proj: &self.x_proj,
            dt_proj: &self.dt_proj,
            dt_bias: &self.dt_bias,
            a_log: &self.a_log,
            d: &self.d,
            layer_idx: self.layer_idx,
        }
    }
}
