//! Single-token decode steps as plain loops over f32 slices (no autograd): O(E·N) per
//! token for the scan, O(E·K) for the conv. The scan step runs over batch rows × segments
//! of channels in parallel; within a channel the N states are contiguous, so the inner loop
//! vectorises over N.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};
use rayon::prelude::*;

use super::scan::f32_slice;
use super::simd::{self, Simd, W, with_simd};

/// Channels per parallel task (and the size of the stack buffer for their dt).
pub(crate) const SEG: usize = 256;

pub(crate) struct StepInputs<'a> {
    pub e: usize,
    pub n: usize,
    /// `[b, E, N]`.
    pub state: &'a [f32],
    /// `[b, E]` each.
    pub x: &'a [f32],
    pub delta: &'a [f32],
    pub z: Option<&'a [f32]>,
    /// `[E, N]`.
    pub a: &'a [f32],
    /// `[b, N]` each.
    pub bm: &'a [f32],
    pub cm: &'a [f32],
    /// `[E]` each.
    pub d: &'a [f32],
    pub bias: &'a [f32],
}

impl StepInputs<'_> {
    /// Batch row `bi`'s `B` and `C` rows.
    #[inline(always)]
    pub(crate) fn bc(&self, bi: usize) -> (&[f32], &[f32]) {
        let n = self.n;
        (
            &self.bm[bi * n..(bi + 1) * n],
            &self.cm[bi * n..(bi + 1) * n],
        )
    }

    /// Channel `ch` of batch row `bi`: its input `x`, its row of `A` and its old state.
    #[inline(always)]
    pub(crate) fn channel(&self, bi: usize, ch: usize) -> (f32, &[f32], &[f32]) {
        let (n, row) = (self.n, bi * self.e + ch);
        (
            self.x[row],
            &self.a[ch * n..(ch + 1) * n],
            &self.state[row * n..(row + 1) * n],
        )
    }
}

/// Channels `e0..e0 + y.len()` of batch row `bi`: writes `y` and the new states `ns`.
#[inline(always)]
fn scan_seg_impl<S: Simd>(
    s: S,
    inp: &StepInputs<'_>,
    bi: usize,
    e0: usize,
    y: &mut [f32],
    ns: &mut [f32],
) {
    let dts = seg_dt_impl(s, inp, bi, e0, y.len());
    let n = inp.n;
    // Each channel's N states, vectorised over N (zero-padded lanes stay zero).
    let (bt, ct) = inp.bc(bi);
    for (i, (yv, nrow)) in y.iter_mut().zip(ns.chunks_exact_mut(n)).enumerate() {
        let (ch, dt) = (e0 + i, dts[i]);
        let (xv, arow, srow) = inp.channel(bi, ch);
        let (dtv, duv) = (s.splat(dt), s.splat(dt * xv));
        let mut acc = s.zero();
        for c in (0..n).step_by(W) {
            let cw = W.min(n - c);
            let da = simd::exp(s, s.mul(dtv, s.load(arow, c, cw)));
            let sn = s.mul_add(da, s.load(srow, c, cw), s.mul(duv, s.load(bt, c, cw)));
            s.store(nrow, c, cw, sn);
            acc = s.mul_add(sn, s.load(ct, c, cw), acc);
        }
        *yv = inp.d[ch] * xv + s.hsum(acc);
    }
    seg_gate_impl(s, inp, bi, e0, y);
}

/// `softplus(delta + bias)` for the `w` channels from `e0` of batch row `bi`, vectorised
/// over channels.
#[inline(always)]
fn seg_dt_impl<S: Simd>(s: S, inp: &StepInputs<'_>, bi: usize, e0: usize, w: usize) -> [f32; SEG] {
    let row = bi * inp.e + e0;
    let mut dts = [0.0f32; SEG];
    for c in (0..w).step_by(W) {
        let cw = W.min(w - c);
        let v = s.add(s.load(inp.delta, row + c, cw), s.load(inp.bias, e0 + c, cw));
        s.store(&mut dts, c, cw, simd::softplus(s, v).0);
    }
    dts
}

/// `y ⊙ silu(z)` for the channels of `y`, when there is a gate.
#[inline(always)]
fn seg_gate_impl<S: Simd>(s: S, inp: &StepInputs<'_>, bi: usize, e0: usize, y: &mut [f32]) {
    let Some(z) = inp.z else { return };
    let row = bi * inp.e + e0;
    let w = y.len();
    for c in (0..w).step_by(W) {
        let cw = W.min(w - c);
        let g = simd::silu(s, s.load(z, row + c, cw));
        let v = s.mul(s.load(y, c, cw), g);
        s.store(y, c, cw, v);
    }
}

with_simd! {
    fn scan_seg8(inp: &StepInputs<'_>, bi: usize, e0: usize, y: &mut [f32], ns: &mut [f32]) = scan_seg_impl;
}
with_simd! {
    pub(crate) fn seg_dt(inp: &StepInputs<'_>, bi: usize, e0: usize, w: usize) -> [f32; SEG] = seg_dt_impl;
}
with_simd! {
    pub(crate) fn seg_gate(inp: &StepInputs<'_>, bi: usize, e0: usize, y: &mut [f32]) = seg_gate_impl;
}

/// Channels `e0..e0 + y.len()` (at most [`SEG`]) of batch row `bi`: writes `y` and the new
/// states `ns`; the state update in AVX-512 where the CPU has it.
pub(crate) fn scan_seg(inp: &StepInputs<'_>, bi: usize, e0: usize, y: &mut [f32], ns: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        // SAFETY: `available` checked the CPU features.
        return unsafe { super::avx512::scan_seg(inp, bi, e0, y, ns) };
    }
    scan_seg8(inp, bi, e0, y, ns)
}

/// One scan step for the whole batch (callers handle N = 0): returns one buffer holding `y`
/// `[b, E]` followed by the new state `[b, E, N]` (written in place, no concatenation).
pub(crate) fn scan_step(inp: &StepInputs<'_>, b: usize) -> Vec<f32> {
    let (e, n) = (inp.e, inp.n);
    let mut out = vec![0.0f32; b * e * (1 + n)];
    if e == 0 || n == 0 {
        return out;
    }
    let (y, ns) = out.split_at_mut(b * e);
    y.par_chunks_mut(e)
        .zip(ns.par_chunks_mut(e * n))
        .enumerate()
        .for_each(|(bi, (yb, nb))| {
            yb.par_chunks_mut(SEG)
                .zip(nb.par_chunks_mut(SEG * n))
                .enumerate()
                .for_each(|(s, (ys, nss))| {
                    scan_seg(inp, bi, s * SEG, ys, nss);
                });
        });
    out
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_rows_impl<S: Simd>(
    s: S,
    state: &[f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    k: usize,
    y: &mut [f32],
    ns: &mut [f32],
) {
    let e = bias.len();
    // K is small (4): a scalar dot per channel, then SiLU vectorised over the row.
    for (ch_all, (yv, nrow)) in y.iter_mut().zip(ns.chunks_exact_mut(k)).enumerate() {
        let ch = ch_all % e;
        let srow = &state[ch_all * k..(ch_all + 1) * k];
        nrow[..k - 1].copy_from_slice(&srow[1..]);
        nrow[k - 1] = x[ch_all];
        let mut acc = bias[ch];
        for (&wv, &sv) in w[ch * k..(ch + 1) * k].iter().zip(nrow.iter()) {
            acc += wv * sv;
        }
        *yv = acc;
    }
    for c in (0..y.len()).step_by(W) {
        let cw = W.min(y.len() - c);
        let v = simd::silu(s, s.load(y, c, cw));
        s.store(y, c, cw, v);
    }
}

with_simd! {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_rows(state: &[f32], x: &[f32], w: &[f32], bias: &[f32], k: usize, y: &mut [f32], ns: &mut [f32]) = conv_rows_impl;
}

/// One conv step: `state` `[b, E, K]`, `x` `[b, E]`, `w` `[E, K]`, `bias` `[E]` (K ≥ 1).
/// Returns one buffer holding `y` `[b, E]` followed by the new state (oldest input dropped,
/// `x` appended).
pub(crate) fn conv_step(state: &[f32], x: &[f32], w: &[f32], bias: &[f32], k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len() + state.len()];
    let e = bias.len();
    if e == 0 {
        return out;
    }
    let (y, ns) = out.split_at_mut(x.len());
    // One task per batch row (each row is E·K multiply-adds).
    y.par_chunks_mut(e)
        .zip(ns.par_chunks_mut(e * k))
        .zip(state.par_chunks(e * k).zip(x.par_chunks(e)))
        .for_each(|((yb, nb), (sb, xb))| conv_rows(sb, xb, w, bias, k, yb, nb));
    out
}

/// Scan step as a no-backward op over (state `[b, E, N]`, A `[E, N]`, packed small inputs
/// `[x, delta, (z), B, C, D, delta_bias]`); returns `[y (b·E) ; new state (b·E·N)]`.
pub(crate) struct ScanStepOp {
    pub b: usize,
    pub e: usize,
    pub n: usize,
    pub has_z: bool,
}

impl CustomOp3 for ScanStepOp {
    fn name(&self) -> &'static str {
        "molt-selective-scan-step"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Self { b, e, n, has_z } = *self;
        let state = f32_slice(s1, l1, "selective_scan_step (state)")?;
        let a = f32_slice(s2, l2, "selective_scan_step (A)")?;
        let small = f32_slice(s3, l3, "selective_scan_step (inputs)")?;
        let nz = if has_z { 3 } else { 2 };
        let want = nz * b * e + 2 * b * n + 2 * e;
        if state.len() != b * e * n || a.len() != e * n || small.len() != want {
            bail!(
                "selective_scan_step: packed sizes {}/{}/{} do not match b={b}, E={e}, N={n}",
                state.len(),
                a.len(),
                small.len()
            )
        }
        let (x, rest) = small.split_at(b * e);
        let (delta, rest) = rest.split_at(b * e);
        let (z, rest) = rest.split_at(if has_z { b * e } else { 0 });
        let (bm, rest) = rest.split_at(b * n);
        let (cm, rest) = rest.split_at(b * n);
        let (d, bias) = rest.split_at(e);
        let inp = StepInputs {
            e,
            n,
            state,
            x,
            delta,
            z: has_z.then_some(z),
            a,
            bm,
            cm,
            d,
            bias,
        };
        let out = scan_step(&inp, b);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Self { b, e, n, has_z } = *self;
        super::cuda::scan_step((b, e, n, has_z), s1, l1, s2, l2, s3, l3)
    }
}

/// Conv step as a no-backward op over (conv state `[b, E, K]`, x `[b, E]`,
/// `[weight (E·K) ; bias (E)]`); returns `[y (b·E) ; new state (b·E·K)]`.
pub(crate) struct ConvStepOp {
    pub b: usize,
    pub e: usize,
    pub k: usize,
}

impl CustomOp3 for ConvStepOp {
    fn name(&self) -> &'static str {
        "molt-causal-conv1d-step"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Self { b, e, k } = *self;
        let state = f32_slice(s1, l1, "causal_conv1d_step (conv_state)")?;
        let x = f32_slice(s2, l2, "causal_conv1d_step (x)")?;
        let wb = f32_slice(s3, l3, "causal_conv1d_step (weight, bias)")?;
        if k == 0 || state.len() != b * e * k || x.len() != b * e || wb.len() != e * (k + 1) {
            bail!(
                "causal_conv1d_step: packed sizes {}/{}/{} do not match b={b}, E={e}, K={k}",
                state.len(),
                x.len(),
                wb.len()
            )
        }
        let (w, bias) = wb.split_at(e * k);
        let out = conv_step(state, x, w, bias, k);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Self { b, e, k } = *self;
        super::cuda::conv_step((b, e, k), s1, l1, s2, l2, s3, l3)
    }
}

/// Mamba-2's decode step inputs: `state` `[b, H, P, N]`, `x` `[b, H, P]`, raw `dt` `[b, H]`,
/// `B`, `C` `[b, G, N]`, `A`, `D`, `dt_bias` `[H]`.
pub(crate) struct SsdStepInputs<'a> {
    pub h: usize,
    pub p: usize,
    pub g: usize,
    pub n: usize,
    pub state: &'a [f32],
    pub x: &'a [f32],
    pub dt: &'a [f32],
    pub bm: &'a [f32],
    pub cm: &'a [f32],
    pub a: &'a [f32],
    pub d: &'a [f32],
    pub bias: &'a [f32],
}

/// Head `hi` of batch row `bi`: `S = e^{dt·A}·S + dt·x ⊗ B`, `y = S·C + D·x`, vectorised
/// over N (one scalar decay per head).
#[inline(always)]
fn ssd_head_impl<S: Simd>(
    s: S,
    inp: &SsdStepInputs<'_>,
    bi: usize,
    hi: usize,
    y: &mut [f32],
    ns: &mut [f32],
) {
    let (h, p, n) = (inp.h, inp.p, inp.n);
    let gi = hi / (h / inp.g);
    let raw = inp.dt[bi * h + hi] + inp.bias[hi];
    // torch's softplus (threshold 20); the cached step does not clamp dt.
    let dt = if raw > 20.0 { raw } else { raw.exp().ln_1p() };
    let decay = s.splat((dt * inp.a[hi]).exp());
    let at = (bi * h + hi) * p;
    let bt = &inp.bm[(bi * inp.g + gi) * n..][..n];
    let ct = &inp.cm[(bi * inp.g + gi) * n..][..n];
    for (pi, (yv, nrow)) in y.iter_mut().zip(ns.chunks_exact_mut(n)).enumerate() {
        let xv = inp.x[at + pi];
        let du = s.splat(dt * xv);
        let srow = &inp.state[(at + pi) * n..][..n];
        let mut acc = s.zero();
        for c in (0..n).step_by(W) {
            let cw = W.min(n - c);
            let sn = s.mul_add(decay, s.load(srow, c, cw), s.mul(du, s.load(bt, c, cw)));
            s.store(nrow, c, cw, sn);
            acc = s.mul_add(sn, s.load(ct, c, cw), acc);
        }
        *yv = inp.d[hi] * xv + s.hsum(acc);
    }
}

with_simd! {
    fn ssd_head(inp: &SsdStepInputs<'_>, bi: usize, hi: usize, y: &mut [f32], ns: &mut [f32]) = ssd_head_impl;
}

/// One SSD step for the whole batch, parallel over batch rows × heads: one buffer holding
/// `y` `[b, H, P]` followed by the new state `[b, H, P, N]`.
pub(crate) fn ssd_step(inp: &SsdStepInputs<'_>, b: usize) -> Vec<f32> {
    let (h, p, n) = (inp.h, inp.p, inp.n);
    let mut out = vec![0.0f32; b * h * p * (1 + n)];
    let (y, ns) = out.split_at_mut(b * h * p);
    ssd_step_into(inp, y, ns);
    out
}

/// [`ssd_step`] into `y` `[b, H, P]` and the new state `ns` `[b, H, P, N]`.
pub(crate) fn ssd_step_into(inp: &SsdStepInputs<'_>, y: &mut [f32], ns: &mut [f32]) {
    let (h, p, n) = (inp.h, inp.p, inp.n);
    if p == 0 || n == 0 {
        return;
    }
    y.par_chunks_mut(p)
        .zip(ns.par_chunks_mut(p * n))
        .enumerate()
        .for_each(|(task, (yh, nh))| ssd_head(inp, task / h, task % h, yh, nh));
}

/// The SSD step as a no-backward op over (state `[b, H, P, N]`, x `[b, H, P]`, packed
/// `[dt (b·H) ; B (b·G·N) ; C (b·G·N) ; A ; D ; dt_bias (H each)]`); returns
/// `[y (b·H·P) ; new state]`.
pub(crate) struct SsdStepOp {
    pub b: usize,
    pub h: usize,
    pub p: usize,
    pub g: usize,
    pub n: usize,
}

impl CustomOp3 for SsdStepOp {
    fn name(&self) -> &'static str {
        "molt-ssd-step"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Self { b, h, p, g, n } = *self;
        let state = f32_slice(s1, l1, "ssd_step (state)")?;
        let x = f32_slice(s2, l2, "ssd_step (x)")?;
        let small = f32_slice(s3, l3, "ssd_step (inputs)")?;
        let want = b * h + 2 * b * g * n + 3 * h;
        if g == 0
            || !h.is_multiple_of(g)
            || state.len() != b * h * p * n
            || x.len() != b * h * p
            || small.len() != want
        {
            bail!(
                "ssd_step: packed sizes {}/{}/{} do not match b={b}, H={h}, P={p}, G={g}, N={n}",
                state.len(),
                x.len(),
                small.len()
            )
        }
        let (dt, rest) = small.split_at(b * h);
        let (bm, rest) = rest.split_at(b * g * n);
        let (cm, rest) = rest.split_at(b * g * n);
        let (a, rest) = rest.split_at(h);
        let (d, bias) = rest.split_at(h);
        let inp = SsdStepInputs {
            h,
            p,
            g,
            n,
            state,
            x,
            dt,
            bm,
            cm,
            a,
            d,
            bias,
        };
        let out = ssd_step(&inp, b);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64, lo: f32, hi: f32) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((*seed >> 40) as f32 / (1u64 << 24) as f32)
    }

    /// The dispatched segment kernel (AVX-512 where the CPU has it) against the 8-lane one,
    /// over state sizes below, at and across the vector widths, with and without a gate.
    #[test]
    fn scan_seg_kernels_agree() {
        let mut seed = 3u64;
        for (b, e, n) in [(1, 5, 1), (2, 19, 8), (1, 40, 16), (3, 17, 17), (2, 9, 33)] {
            let mut v = |len: usize, lo: f32, hi: f32| -> Vec<f32> {
                (0..len).map(|_| lcg(&mut seed, lo, hi)).collect()
            };
            let (state, x, delta) = (
                v(b * e * n, -1.0, 1.0),
                v(b * e, -1.0, 1.0),
                v(b * e, -3.0, 3.0),
            );
            let (a, bm, cm) = (
                v(e * n, -17.0, -0.5),
                v(b * n, -1.0, 1.0),
                v(b * n, -1.0, 1.0),
            );
            let (d, bias, z) = (v(e, -1.0, 1.0), v(e, -4.0, 0.5), v(b * e, -2.0, 2.0));
            for gate in [None, Some(z.as_slice())] {
                let inp = StepInputs {
                    e,
                    n,
                    state: &state,
                    x: &x,
                    delta: &delta,
                    z: gate,
                    a: &a,
                    bm: &bm,
                    cm: &cm,
                    d: &d,
                    bias: &bias,
                };
                for bi in 0..b {
                    let (e0, w) = (e / 4, e - e / 4);
                    let (mut y1, mut s1) = (vec![0.0; w], vec![0.0; w * n]);
                    let (mut y2, mut s2) = (vec![0.0; w], vec![0.0; w * n]);
                    scan_seg(&inp, bi, e0, &mut y1, &mut s1);
                    scan_seg8(&inp, bi, e0, &mut y2, &mut s2);
                    for (what, got, want) in [("y", &y1, &y2), ("state", &s1, &s2)] {
                        for (j, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{what} b{b} e{e} n{n} row {bi} [{j}]: {g} vs {w}"
                            );
                        }
                    }
                    assert!(s1.iter().any(|v| *v != 0.0), "the states were written");
                }
            }
        }
    }
}
