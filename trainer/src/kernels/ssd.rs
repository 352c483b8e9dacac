//! Mamba-2's SSD scan on the CPU, fused, chunked and parallel over batch × heads, with its
//! own backward.
//!
//! Per head (state `S` `[P, N]`, scalar decay), a chunk of `q ≤ Q` steps starting from the
//! state `S₀` is computed in the state-space-dual form, as the SSD paper and mamba_ssm do:
//! with `w_t = dt_t`, `c_t = Σ_{s≤t} w_s·A` (within the chunk),
//!
//! - `y_t = D·x_t + e^{c_t}·S₀C_t + Σ_{s≤t} e^{c_t − c_s}·(C_t·B_s)·w_s·x_s` (the inter-chunk
//!   term and the intra-chunk quadratic form), and
//! - `S_end = e^{c_last}·S₀ + Σ_s e^{c_last − c_s}·w_s·x_s ⊗ B_s` (state passing).
//!
//! The forward keeps only the chunk-boundary states (one `[P, N]` per chunk) when autograd
//! needs them; the backward walks the chunks from the last, recomputing each chunk's terms
//! from its boundary state instead of keeping every step's state. B and C are shared by the
//! heads of a group, so each head task writes its own partial dB / dC, summed per group at
//! the end.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::scan::f32_slice;
use super::simd::{Simd, with_simd};

/// The fused kernel's chunk length. The reference (HF) uses the config's `chunk_size`; the
/// chunking only changes the rounding, so the kernel picks what suits the cache.
const Q: usize = 64;

#[derive(Clone, Copy, Debug)]
pub(crate) struct SsdDims {
    pub b: usize,
    pub l: usize,
    pub h: usize,
    pub p: usize,
    pub g: usize,
    pub n: usize,
    pub has_s0: bool,
    /// `(lo, hi)` clamp of dt after the softplus; `None`: no clamp.
    pub limit: Option<(f32, f32)>,
}

impl SsdDims {
    fn chunks(&self) -> usize {
        self.l.div_ceil(Q)
    }

    /// Length of the packed `rest` input: B, C `[b, L, G, N]`, A, D, dt_bias `[H]`, and the
    /// initial state `[b, H, P, N]` when there is one.
    pub(crate) fn rest_len(&self) -> usize {
        let s0 = if self.has_s0 {
            self.b * self.h * self.p * self.n
        } else {
            0
        };
        2 * self.b * self.l * self.g * self.n + 3 * self.h + s0
    }

    fn x_at(&self, bi: usize, t: usize, hi: usize) -> usize {
        ((bi * self.l + t) * self.h + hi) * self.p
    }

    fn dt_at(&self, bi: usize, t: usize, hi: usize) -> usize {
        (bi * self.l + t) * self.h + hi
    }

    fn bc_at(&self, bi: usize, t: usize, gi: usize) -> usize {
        ((bi * self.l + t) * self.g + gi) * self.n
    }

    fn group_of(&self, hi: usize) -> usize {
        hi / (self.h / self.g)
    }
}

struct Inputs<'a> {
    x: &'a [f32],
    dt: &'a [f32],
    bm: &'a [f32],
    cm: &'a [f32],
    a: &'a [f32],
    d: &'a [f32],
    bias: &'a [f32],
    s0: Option<&'a [f32]>,
}

impl<'a> Inputs<'a> {
    fn new(dims: &SsdDims, x: &'a [f32], dt: &'a [f32], rest: &'a [f32]) -> Result<Self> {
        let SsdDims {
            b, l, h, p, g, n, ..
        } = *dims;
        if x.len() != b * l * h * p || dt.len() != b * l * h || rest.len() != dims.rest_len() {
            bail!(
                "ssd_scan: inputs of {}, {}, {} values do not fit {dims:?}",
                x.len(),
                dt.len(),
                rest.len()
            )
        }
        let bc = b * l * g * n;
        let (bm, rest) = rest.split_at(bc);
        let (cm, rest) = rest.split_at(bc);
        let (a, rest) = rest.split_at(h);
        let (d, rest) = rest.split_at(h);
        let (bias, rest) = rest.split_at(h);
        Ok(Inputs {
            x,
            dt,
            bm,
            cm,
            a,
            d,
            bias,
            s0: dims.has_s0.then_some(rest),
        })
    }
}

/// `dt = clamp(softplus(raw), limit)` and `d dt / d raw` (torch's softplus threshold 20;
/// the clamp passes the gradient where `lo ≤ dt ≤ hi`, as `torch.clamp`).
fn dt_and_slope(raw: f32, limit: Option<(f32, f32)>) -> (f32, f32) {
    let (w, slope) = if raw > 20.0 {
        (raw, 1.0)
    } else {
        (raw.exp().ln_1p(), 1.0 / (1.0 + (-raw).exp()))
    };
    match limit {
        Some((lo, _)) if w < lo => (lo, 0.0),
        Some((_, hi)) if w > hi => (hi, 0.0),
        _ => (w, slope),
    }
}

/// `a·b` with eight running sums, so the compiler vectorises it (one sequential f32 sum
/// would chain every multiply-add on the previous one).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One chunk's per-step values for head `hi` of batch row `bi`: `w`, `d w / d raw`, `c`.
struct ChunkSteps {
    t0: usize,
    q: usize,
    w: Vec<f32>,
    slope: Vec<f32>,
    cum: Vec<f32>,
}

impl ChunkSteps {
    fn new(dims: &SsdDims, inp: &Inputs, bi: usize, hi: usize, chunk: usize) -> Self {
        let t0 = chunk * Q;
        let q = Q.min(dims.l - t0);
        let (mut w, mut slope, mut cum) = (vec![0.0; q], vec![0.0; q], vec![0.0; q]);
        let a = inp.a[hi];
        let mut acc = 0.0f32;
        for j in 0..q {
            let raw = inp.dt[dims.dt_at(bi, t0 + j, hi)] + inp.bias[hi];
            (w[j], slope[j]) = dt_and_slope(raw, dims.limit);
            acc += w[j] * a;
            cum[j] = acc;
        }
        ChunkSteps {
            t0,
            q,
            w,
            slope,
            cum,
        }
    }
}

/// What one (batch row, head) task of the forward produces.
struct FwdTask {
    /// `[L, P]`.
    y: Vec<f32>,
    /// Boundary states `[chunks + 1][P·N]` (the first is the initial state) when kept, else
    /// only the final state.
    states: Vec<f32>,
}

/// One (batch row, head) of the forward. Generic over the instruction set only so that
/// [`with_simd`] compiles its loops (dot products, axpys) for AVX2 + FMA where the CPU has
/// them.
#[inline(always)]
fn forward_task_impl<S: Simd>(
    _s: S,
    dims: &SsdDims,
    inp: &Inputs<'_>,
    bi: usize,
    hi: usize,
    keep_all: bool,
) -> FwdTask {
    let SsdDims { l, p, n, .. } = *dims;
    let gi = dims.group_of(hi);
    let pn = p * n;
    let mut s = match inp.s0 {
        Some(s0) => s0[(bi * dims.h + hi) * pn..][..pn].to_vec(),
        None => vec![0.0; pn],
    };
    let mut states = Vec::with_capacity(if keep_all {
        (dims.chunks() + 1) * pn
    } else {
        pn
    });
    if keep_all {
        states.extend_from_slice(&s);
    }
    let mut y = vec![0.0f32; l * p];
    let d = inp.d[hi];
    for chunk in 0..dims.chunks() {
        let cs = ChunkSteps::new(dims, inp, bi, hi, chunk);
        let x = |j: usize| &inp.x[dims.x_at(bi, cs.t0 + j, hi)..][..p];
        let bv = |j: usize| &inp.bm[dims.bc_at(bi, cs.t0 + j, gi)..][..n];
        let cv = |j: usize| &inp.cm[dims.bc_at(bi, cs.t0 + j, gi)..][..n];
        for j in 0..cs.q {
            let yj = &mut y[(cs.t0 + j) * p..][..p];
            let (xj, cj) = (x(j), cv(j));
            let ej = cs.cum[j].exp();
            for (pi, yv) in yj.iter_mut().enumerate() {
                *yv = d * xj[pi] + ej * dot(&s[pi * n..][..n], cj);
            }
            for k in 0..=j {
                let coef = (cs.cum[j] - cs.cum[k]).exp() * dot(cj, bv(k)) * cs.w[k];
                for (yv, xv) in yj.iter_mut().zip(x(k)) {
                    *yv += coef * xv;
                }
            }
        }
        let last = cs.cum[cs.q - 1];
        let decay = last.exp();
        s.iter_mut().for_each(|v| *v *= decay);
        for k in 0..cs.q {
            let coef = (last - cs.cum[k]).exp() * cs.w[k];
            let bk = bv(k);
            for (pi, xv) in x(k).iter().enumerate() {
                let f = coef * xv;
                for (sv, bval) in s[pi * n..][..n].iter_mut().zip(bk) {
                    *sv += f * bval;
                }
            }
        }
        if keep_all {
            states.extend_from_slice(&s);
        }
    }
    if !keep_all {
        states = s;
    }
    FwdTask { y, states }
}

with_simd! {
    fn forward_task(dims: &SsdDims, inp: &Inputs<'_>, bi: usize, hi: usize, keep_all: bool) -> FwdTask = forward_task_impl;
}

with_simd! {
    fn backward_task(dims: &SsdDims, inp: &Inputs<'_>, gy: &[f32], states: &[f32], bi: usize, hi: usize) -> BwdTask = backward_task_impl;
}

/// Runs the forward: `y` `[b, L, H, P]` and, per (batch row, head) task, its states.
pub(crate) fn forward(
    dims: &SsdDims,
    x: &[f32],
    dt: &[f32],
    rest: &[f32],
    keep_all: bool,
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let inp = Inputs::new(dims, x, dt, rest)?;
    let SsdDims { b, l, h, p, .. } = *dims;
    let tasks: Vec<FwdTask> = (0..b * h)
        .into_par_iter()
        .map(|task| forward_task(dims, &inp, task / h, task % h, keep_all))
        .collect();
    let mut y = vec![0.0f32; b * l * h * p];
    y.par_chunks_mut(h * p).enumerate().for_each(|(row, out)| {
        let (bi, t) = (row / l, row % l);
        for hi in 0..h {
            out[hi * p..][..p].copy_from_slice(&tasks[bi * h + hi].y[t * p..][..p]);
        }
    });
    Ok((y, tasks.into_iter().map(|t| t.states).collect()))
}

/// The last state `[b, H, P, N]` from the saved task states.
pub(crate) fn last_state(dims: &SsdDims, states: &[Vec<f32>]) -> Vec<f32> {
    let pn = dims.p * dims.n;
    states
        .iter()
        .flat_map(|s| s[s.len() - pn..].iter().copied())
        .collect()
}

/// What one (batch row, head) task of the backward produces.
struct BwdTask {
    /// `[L, P]`.
    dx: Vec<f32>,
    /// `[L]`, the gradient of the raw dt.
    ddt: Vec<f32>,
    /// `[L, N]`: this head's share of the group's dB and dC.
    db: Vec<f32>,
    dc: Vec<f32>,
    da: f32,
    dd: f32,
    dbias: f32,
    /// `[P, N]`.
    ds0: Vec<f32>,
}

/// One (batch row, head) of the backward (see [`forward_task_impl`] for the `S`).
#[inline(always)]
fn backward_task_impl<S: Simd>(
    _s: S,
    dims: &SsdDims,
    inp: &Inputs<'_>,
    gy: &[f32],
    states: &[f32],
    bi: usize,
    hi: usize,
) -> BwdTask {
    let SsdDims { l, p, n, .. } = *dims;
    let gi = dims.group_of(hi);
    let pn = p * n;
    let mut out = BwdTask {
        dx: vec![0.0; l * p],
        ddt: vec![0.0; l],
        db: vec![0.0; l * n],
        dc: vec![0.0; l * n],
        da: 0.0,
        dd: 0.0,
        dbias: 0.0,
        ds0: vec![0.0; pn],
    };
    let (a, d) = (inp.a[hi], inp.d[hi]);
    // dS: the gradient of the state at the end of the current chunk (none for the last).
    let mut ds = vec![0.0f32; pn];
    let mut sc = vec![0.0f32; p];
    let mut u = vec![0.0f32; p];
    for chunk in (0..dims.chunks()).rev() {
        let cs = ChunkSteps::new(dims, inp, bi, hi, chunk);
        let s0 = &states[chunk * pn..][..pn];
        let x = |j: usize| &inp.x[dims.x_at(bi, cs.t0 + j, hi)..][..p];
        let gyv = |j: usize| &gy[dims.x_at(bi, cs.t0 + j, hi)..][..p];
        let bv = |j: usize| &inp.bm[dims.bc_at(bi, cs.t0 + j, gi)..][..n];
        let cv = |j: usize| &inp.cm[dims.bc_at(bi, cs.t0 + j, gi)..][..n];
        let mut dcum = vec![0.0f32; cs.q];
        let mut dw = vec![0.0f32; cs.q];
        let mut ds0 = vec![0.0f32; pn];
        for j in 0..cs.q {
            let t = cs.t0 + j;
            let (gj, xj, cj) = (gyv(j), x(j), cv(j));
            // D skip.
            out.dd += dot(gj, xj);
            for (dxv, gv) in out.dx[t * p..][..p].iter_mut().zip(gj) {
                *dxv += d * gv;
            }
            // Inter-chunk term e^{c_j}·S₀C_j.
            let ej = cs.cum[j].exp();
            for (pi, scv) in sc.iter_mut().enumerate() {
                *scv = dot(&s0[pi * n..][..n], cj);
            }
            dcum[j] += ej * dot(gj, &sc);
            let dcj = &mut out.dc[t * n..][..n];
            for (pi, gv) in gj.iter().enumerate() {
                let f = ej * gv;
                let (row0, rows) = (&s0[pi * n..][..n], &mut ds0[pi * n..][..n]);
                for ((dsv, cval), (dcv, sv)) in
                    rows.iter_mut().zip(cj).zip(dcj.iter_mut().zip(row0))
                {
                    *dsv += f * cval;
                    *dcv += f * sv;
                }
            }
            // Intra-chunk quadratic form.
            for k in 0..=j {
                let tk = cs.t0 + k;
                let bk = bv(k);
                let lk = (cs.cum[j] - cs.cum[k]).exp();
                let gjk = dot(cj, bk);
                let dm = dot(gj, x(k));
                let m = lk * gjk * cs.w[k];
                for (dxv, gv) in out.dx[tk * p..][..p].iter_mut().zip(gj) {
                    *dxv += m * gv;
                }
                let dg = dm * lk * cs.w[k];
                for (dcv, bval) in out.dc[t * n..][..n].iter_mut().zip(bk) {
                    *dcv += dg * bval;
                }
                for (dbv, cval) in out.db[tk * n..][..n].iter_mut().zip(cj) {
                    *dbv += dg * cval;
                }
                dw[k] += dm * lk * gjk;
                let wjk = dm * m;
                dcum[j] += wjk;
                dcum[k] -= wjk;
            }
        }
        // State passing: S_end = e^{c_last}·S₀ + Σ_k e^{c_last − c_k}·w_k·x_k ⊗ B_k.
        let lastj = cs.q - 1;
        let el = cs.cum[lastj].exp();
        for ((d0, dsv), sv) in ds0.iter_mut().zip(&ds).zip(s0) {
            *d0 += el * dsv;
            dcum[lastj] += el * sv * dsv;
        }
        for k in 0..cs.q {
            let tk = cs.t0 + k;
            let (bk, xk) = (bv(k), x(k));
            let kk = (cs.cum[lastj] - cs.cum[k]).exp();
            for (pi, uv) in u.iter_mut().enumerate() {
                *uv = dot(&ds[pi * n..][..n], bk);
            }
            let xu = dot(xk, &u);
            let f = kk * cs.w[k];
            for (dxv, uv) in out.dx[tk * p..][..p].iter_mut().zip(&u) {
                *dxv += f * uv;
            }
            let dbk = &mut out.db[tk * n..][..n];
            for (pi, xv) in xk.iter().enumerate() {
                let fx = f * xv;
                for (dbv, dsv) in dbk.iter_mut().zip(&ds[pi * n..][..n]) {
                    *dbv += fx * dsv;
                }
            }
            dw[k] += kk * xu;
            let v = f * xu;
            dcum[lastj] += v;
            dcum[k] -= v;
        }
        // c_j = Σ_{k≤j} w_k·A, so d a_k = Σ_{j≥k} dc_j.
        let mut acc = 0.0f32;
        for k in (0..cs.q).rev() {
            acc += dcum[k];
            dw[k] += acc * a;
            out.da += acc * cs.w[k];
            let graw = dw[k] * cs.slope[k];
            out.ddt[cs.t0 + k] = graw;
            out.dbias += graw;
        }
        ds = ds0;
    }
    out.ds0 = ds;
    out
}

/// Runs the backward from the saved states; returns `[dx | d dt | d rest]` in the inputs'
/// layouts (see [`SsdDims::rest_len`]).
pub(crate) fn backward(
    dims: &SsdDims,
    x: &[f32],
    dt: &[f32],
    rest: &[f32],
    gy: &[f32],
    states: &[Vec<f32>],
) -> Result<Vec<f32>> {
    let inp = Inputs::new(dims, x, dt, rest)?;
    let SsdDims {
        b, l, h, p, g, n, ..
    } = *dims;
    if gy.len() != x.len() || states.len() != b * h {
        bail!("ssd_scan backward: the gradient or the saved states do not fit {dims:?}")
    }
    let tasks: Vec<BwdTask> = (0..b * h)
        .into_par_iter()
        .map(|task| backward_task(dims, &inp, gy, &states[task], task / h, task % h))
        .collect();
    let (nx, ndt, nbc) = (b * l * h * p, b * l * h, b * l * g * n);
    let mut out = vec![0.0f32; nx + ndt + dims.rest_len()];
    let (dx, rest_out) = out.split_at_mut(nx);
    let (ddt, rest_out) = rest_out.split_at_mut(ndt);
    let (db, rest_out) = rest_out.split_at_mut(nbc);
    let (dc, rest_out) = rest_out.split_at_mut(nbc);
    let (da, rest_out) = rest_out.split_at_mut(h);
    let (dd, rest_out) = rest_out.split_at_mut(h);
    let (dbias, ds0) = rest_out.split_at_mut(h);
    dx.par_chunks_mut(h * p).enumerate().for_each(|(row, o)| {
        let (bi, t) = (row / l, row % l);
        for hi in 0..h {
            o[hi * p..][..p].copy_from_slice(&tasks[bi * h + hi].dx[t * p..][..p]);
        }
    });
    // Per time row: each head's dt gradient, and its share of its group's dB / dC.
    let heads_per_group = h / g;
    ddt.par_chunks_mut(h)
        .zip(db.par_chunks_mut(g * n).zip(dc.par_chunks_mut(g * n)))
        .enumerate()
        .for_each(|(row, (ddt_row, (db_row, dc_row)))| {
            let (bi, t) = (row / l, row % l);
            for hi in 0..h {
                let task = &tasks[bi * h + hi];
                ddt_row[hi] = task.ddt[t];
                let at = (hi / heads_per_group) * n;
                for (o, v) in db_row[at..][..n].iter_mut().zip(&task.db[t * n..][..n]) {
                    *o += v;
                }
                for (o, v) in dc_row[at..][..n].iter_mut().zip(&task.dc[t * n..][..n]) {
                    *o += v;
                }
            }
        });
    for (task, t) in tasks.iter().enumerate() {
        let hi = task % h;
        da[hi] += t.da;
        dd[hi] += t.dd;
        dbias[hi] += t.dbias;
        if dims.has_s0 {
            ds0[task * p * n..][..p * n].copy_from_slice(&t.ds0);
        }
    }
    Ok(out)
}

/// The scan as a custom op over (`x`, `dt`, packed rest); produces `y` `[b, L, H, P]`.
pub(crate) struct SsdOp {
    pub dims: SsdDims,
    pub keep_all: bool,
    /// The task states the forward saved (boundary states when `keep_all`, else the last).
    pub saved: Arc<OnceLock<Vec<Vec<f32>>>>,
}

impl CustomOp3 for SsdOp {
    fn name(&self) -> &'static str {
        "molt-ssd-scan"
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
        let x = f32_slice(s1, l1, "ssd_scan (x)")?;
        let dt = f32_slice(s2, l2, "ssd_scan (dt)")?;
        let rest = f32_slice(s3, l3, "ssd_scan (packed inputs)")?;
        let (y, states) = forward(&self.dims, x, dt, rest, self.keep_all)?;
        if self.saved.set(states).is_err() {
            bail!("ssd_scan: the op was run twice")
        }
        let SsdDims { b, l, h, p, .. } = self.dims;
        Ok((CpuStorage::F32(y), Shape::from((b, l, h, p))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        dt: &Tensor,
        rest: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.keep_all {
            bail!("ssd_scan backward: the forward ran without autograd and kept no states")
        }
        let op = SsdGradOp {
            dims: self.dims,
            saved: self.saved.clone(),
            grad: grad_res.to_dtype(DType::F32)?.contiguous()?,
        };
        let g = x.apply_op3_no_bwd(dt, rest, &op)?;
        let SsdDims { b, l, h, p, .. } = self.dims;
        let [gx, gdt, grest] =
            super::unpack(&g, [&[b, l, h, p], &[b, l, h], &[self.dims.rest_len()]])?;
        Ok((Some(gx), Some(gdt), Some(grest)))
    }
}

/// The backward as a (non-differentiable) custom op; the gradient of `y` travels in the op
/// (a custom op has at most three inputs).
struct SsdGradOp {
    dims: SsdDims,
    saved: Arc<OnceLock<Vec<Vec<f32>>>>,
    grad: Tensor,
}

impl CustomOp3 for SsdGradOp {
    fn name(&self) -> &'static str {
        "molt-ssd-scan-grad"
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
        let x = f32_slice(s1, l1, "ssd_scan backward (x)")?;
        let dt = f32_slice(s2, l2, "ssd_scan backward (dt)")?;
        let rest = f32_slice(s3, l3, "ssd_scan backward (packed inputs)")?;
        let (guard, layout) = self.grad.storage_and_layout();
        let Storage::Cpu(grad) = &*guard else {
            bail!("ssd_scan backward: the grad of y is not on the CPU")
        };
        let gy = f32_slice(grad, layout, "ssd_scan backward (grad of y)")?;
        let Some(states) = self.saved.get() else {
            bail!("ssd_scan backward: the forward saved no states")
        };
        let out = backward(&self.dims, x, dt, rest, gy, states)?;
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
