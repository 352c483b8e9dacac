//! One Mamba-2 layer's decode step as a single pass over plain slices: RMSNorm, in_proj, the
//! conv step over xBC, the SSD step, the gated grouped RMSNorm, out_proj and the residual
//! add, for at most [`MAX_ROWS`](super::gemv::MAX_ROWS) tokens (one per sequence).
//!
//! Why: through Candle ops a Mamba-2 step ran ≈ 30 small ops a layer (the splits of in_proj's
//! output and their copies, packing the SSD step's inputs, `-exp(A_log)`, the gated norm as a
//! composition of a dozen element-wise ops) around the two products, each with a fresh
//! buffer and some with a wake-up of the thread pool.
//!
//! How: three parallel regions a layer — in_proj and out_proj as the few-row product
//! ([`super::gemv`]), the SSD step over batch rows × heads ([`super::step::ssd_step_into`],
//! writing the new state straight into the returned buffer) — with the conv step and the
//! gated norm (b·(E + 2GN) and b·E values) on the calling thread between them. Every piece
//! is the kernel the unfused step runs, in the same order, so the two agree to rounding.

use super::decode::{add, project_residual, rms_norm};
use super::gemv::Weights;
use super::simd::{self, Simd, W, with_simd};
use super::step::{SsdStepInputs, conv_rows, ssd_step_into};

/// Sizes of the step: `b` tokens, model width `dm` (D), `h` heads of `p` channels (E = H·P),
/// `g` groups of B and C with `n` states each, conv width `k`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SsdDims {
    pub b: usize,
    pub dm: usize,
    pub h: usize,
    pub p: usize,
    pub g: usize,
    pub n: usize,
    pub k: usize,
}

impl SsdDims {
    /// E = H·P.
    pub(crate) fn e(&self) -> usize {
        self.h * self.p
    }

    /// The conv's channels: xBC, E + 2GN.
    pub(crate) fn conv_dim(&self) -> usize {
        self.e() + 2 * self.g * self.n
    }

    /// in_proj's rows: z | xBC | dt.
    pub(crate) fn d_in(&self) -> usize {
        self.e() + self.conv_dim() + self.h
    }
}

/// One layer's weights, as the checkpoint holds them (`A` already `-exp(A_log)`).
pub(crate) struct SsdLayerWeights<'a> {
    /// The block's RMSNorm `[D]` and its epsilon.
    pub norm: &'a [f32],
    pub eps: f32,
    /// `[2E + 2GN + H, D]`, bias `[2E + 2GN + H]`.
    pub in_proj: Weights<'a>,
    pub in_bias: Option<&'a [f32]>,
    /// `[E + 2GN, K]`, bias `[E + 2GN]`.
    pub conv_w: &'a [f32],
    pub conv_b: Option<&'a [f32]>,
    /// `[H]` each.
    pub dt_bias: &'a [f32],
    pub a: &'a [f32],
    pub d: &'a [f32],
    /// The gated norm's weight `[E]` and epsilon.
    pub gate_norm: &'a [f32],
    pub gate_eps: f32,
    /// `[D, E]`, bias `[D]`.
    pub out_proj: Weights<'a>,
    pub out_bias: Option<&'a [f32]>,
}

/// `y ← (y ⊙ silu(z)) / sqrt(mean((y ⊙ silu(z))²) + eps) ⊙ w` over one group's channels.
#[inline(always)]
fn gate_norm_impl<S: Simd>(s: S, y: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    let len = y.len();
    let mut acc = s.zero();
    for c in (0..len).step_by(W) {
        let cw = W.min(len - c);
        // Zero-filled tail lanes give v = 0 and add nothing to the sum.
        let v = s.mul(s.load(y, c, cw), simd::silu(s, s.load(z, c, cw)));
        s.store(y, c, cw, v);
        acc = s.mul_add(v, v, acc);
    }
    let rms = s.splat((s.hsum(acc) / len.max(1) as f32 + eps).sqrt());
    for c in (0..len).step_by(W) {
        let cw = W.min(len - c);
        let v = s.mul(s.div(s.load(y, c, cw), rms), s.load(w, c, cw));
        s.store(y, c, cw, v);
    }
}

with_simd! {
    fn gate_norm(y: &mut [f32], z: &[f32], w: &[f32], eps: f32) = gate_norm_impl;
}

/// Runs the layer on `h` `[b, D]` (updated in place: `h + mixer(norm(h))`) with the old
/// states `conv` `[b, E + 2GN, K]` and `ssm` `[b, H, P, N]`; returns the new states packed as
/// `[conv ; ssm]`. Callers check the sizes (`b ≤ MAX_ROWS`, `G` divides `H`, every slice as
/// documented on [`SsdLayerWeights`]).
pub(crate) fn layer_step(
    lw: &SsdLayerWeights<'_>,
    dims: SsdDims,
    h: &mut [f32],
    conv: &[f32],
    ssm: &[f32],
) -> Vec<f32> {
    let SsdDims { b, dm, g, n, k, .. } = dims;
    let (e, c, d_in, gn) = (dims.e(), dims.conv_dim(), dims.d_in(), g * n);
    let mut u = vec![0.0f32; b * dm];
    for (urow, hrow) in u.chunks_exact_mut(dm).zip(h.chunks_exact(dm)) {
        rms_norm(hrow, lw.norm, lw.eps, urow);
    }
    // Region 1: in_proj, rows z | xBC | dt.
    let mut zx = lw.in_proj.matmul(&u, b, dm);
    if let Some(bias) = lw.in_bias {
        for row in zx.chunks_exact_mut(d_in) {
            add(row, bias);
        }
    }

    let mut out = vec![0.0f32; b * c * k + b * e * n];
    let (new_conv, new_ssm) = out.split_at_mut(b * c * k);
    let zeros;
    let cb = match lw.conv_b {
        Some(cb) => cb,
        None => {
            zeros = vec![0.0f32; c];
            &zeros
        }
    };
    let mut xbc = vec![0.0f32; b * c];
    for (i, (xrow, nrow)) in xbc
        .chunks_exact_mut(c)
        .zip(new_conv.chunks_exact_mut(c * k))
        .enumerate()
    {
        let old = &conv[i * c * k..(i + 1) * c * k];
        let row = &zx[i * d_in + e..i * d_in + e + c];
        conv_rows(old, row, lw.conv_w, cb, k, xrow, nrow);
    }
    // The SSD step's inputs, each contiguous over the batch.
    let (mut x, mut bm, mut cm, mut dt) = (
        Vec::with_capacity(b * e),
        Vec::with_capacity(b * gn),
        Vec::with_capacity(b * gn),
        Vec::with_capacity(b * dims.h),
    );
    for (row, zrow) in xbc.chunks_exact(c).zip(zx.chunks_exact(d_in)) {
        x.extend_from_slice(&row[..e]);
        bm.extend_from_slice(&row[e..e + gn]);
        cm.extend_from_slice(&row[e + gn..]);
        dt.extend_from_slice(&zrow[e + c..]);
    }
    let inp = SsdStepInputs {
        h: dims.h,
        p: dims.p,
        g,
        n,
        state: ssm,
        x: &x,
        dt: &dt,
        bm: &bm,
        cm: &cm,
        a: lw.a,
        d: lw.d,
        bias: lw.dt_bias,
    };
    // Region 2: the SSD step.
    let mut y = vec![0.0f32; b * e];
    ssd_step_into(&inp, &mut y, new_ssm);

    let ge = e / g.max(1);
    for (yrow, zrow) in y.chunks_exact_mut(e).zip(zx.chunks_exact(d_in)) {
        for (gi, yg) in yrow.chunks_exact_mut(ge).enumerate() {
            let at = gi * ge..(gi + 1) * ge;
            gate_norm(yg, &zrow[at.clone()], &lw.gate_norm[at], lw.gate_eps);
        }
    }
    // Region 3: out_proj, then the residual.
    project_residual(lw.out_proj, lw.out_bias, &y, b, e, h);
    out
}
