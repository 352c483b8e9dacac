//! One Mamba-1 layer's decode step as a single fused pass over plain slices: RMSNorm,
//! in_proj, the conv step, x_proj, dt_proj, the scan step, the gate, out_proj and the
//! residual add, for at most [`MAX_ROWS`] tokens (one per sequence).
//!
//! Why: through Candle ops a decode step of the 130m model ran ≈ 300 small ops a token
//! (narrow + contiguous copies, packing the step kernels' inputs with `cat`, a fresh buffer
//! and a wake-up of the thread pool for each) around products that stream the weights once.
//! Measured (BENCHMARKS.md, issue 18): batch 8 gains 5–15 %; batch 1, where the products
//! were already most of a step, stays within the noise.
//!
//! How: the layer's E channels are split into one contiguous range per thread, and a task
//! keeps its range from in_proj to the gate, so the layer takes three parallel regions:
//! 1. in_proj's X and Z rows of the range, the conv step and SiLU on them, and x_proj's
//!    partial sums over the range (x_proj reads all of E, so each task sums its columns);
//! 2. (after the partial sums are added) dt_proj's rows of the range, the scan step and the
//!    gate on the range;
//! 3. out_proj in blocks of whole rows, then the residual add.
//!
//! The caller's thread adds x_proj's partial sums between the regions (R + 2N values per
//! token); summing in column ranges changes only the order of the f32 additions against
//! the unfused path. The states are written to fresh buffers (the old ones are still
//! readable by whoever shares them), each task its own channels.

use rayon::prelude::*;

use super::gemv::{MAX_ROWS, Weights, transpose};
use super::simd::W;
use super::step::{SEG, StepInputs, conv_rows, scan_seg};

/// Sizes of the step: `b` tokens, model width `dm` (D), E channels, N states, dt rank R,
/// conv width K.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub dm: usize,
    pub e: usize,
    pub n: usize,
    pub r: usize,
    pub k: usize,
}

/// One layer's weights, as the checkpoint holds them (`A` already `-exp(A_log)`).
pub(crate) struct LayerWeights<'a> {
    /// `[D]`, and the norm's epsilon.
    pub norm: &'a [f32],
    pub eps: f32,
    /// `[2E, D]` (X rows, then Z rows), bias `[2E]`.
    pub in_proj: Weights<'a>,
    pub in_bias: Option<&'a [f32]>,
    /// `[E, K]`, bias `[E]`.
    pub conv_w: &'a [f32],
    pub conv_b: Option<&'a [f32]>,
    /// `[R + 2N, E]` (dt, B, C rows).
    pub x_proj: Weights<'a>,
    /// `[E, R]`, bias `[E]` (added before the softplus).
    pub dt_proj: Weights<'a>,
    pub dt_bias: &'a [f32],
    /// `[E, N]` and `[E]`.
    pub a: &'a [f32],
    pub d: &'a [f32],
    /// `[D, E]`, bias `[D]`.
    pub out_proj: Weights<'a>,
    pub out_bias: Option<&'a [f32]>,
}

/// What one task keeps between the two regions, for its channels `e0..e0 + w`.
struct Task {
    e0: usize,
    w: usize,
    /// `[b, w]` each: the conv output (SiLU applied) and the gate input.
    xc: Vec<f32>,
    z: Vec<f32>,
    /// `[R + 2N, b]`: x_proj summed over this task's channels.
    partial: Vec<f32>,
}

/// Channel ranges, one per thread, each a multiple of the SIMD width where E allows.
fn ranges(e: usize) -> Vec<(usize, usize)> {
    let tasks = rayon::current_num_threads().clamp(1, e.div_ceil(W).max(1));
    let step = e.div_ceil(tasks).div_ceil(W) * W;
    (0..e)
        .step_by(step.max(1))
        .map(|e0| (e0, step.min(e - e0)))
        .collect()
}

/// Splits each batch row's `[E, per]` block of `buf` (`[b, E, per]`) at the channel ranges:
/// `out[t][i]` is row `i`'s slice for range `t`.
fn split_rows<'a>(
    buf: &'a mut [f32],
    e: usize,
    per: usize,
    ranges: &[(usize, usize)],
) -> Vec<Vec<&'a mut [f32]>> {
    let mut out: Vec<Vec<&mut [f32]>> = ranges.iter().map(|_| Vec::new()).collect();
    if e * per == 0 {
        return out;
    }
    for row in buf.chunks_exact_mut(e * per) {
        let mut rest = row;
        for (t, &(_, w)) in ranges.iter().enumerate() {
            let (piece, tail) = rest.split_at_mut(w * per);
            out[t].push(piece);
            rest = tail;
        }
    }
    out
}

/// Runs the layer on `h` `[b, D]` (updated in place: `h + mixer(norm(h))`) with the old
/// states `conv` `[b, E, K]` and `ssm` `[b, E, N]`; returns the new states packed as
/// `[conv (b·E·K) ; ssm (b·E·N)]`. Callers check the sizes (`b ≤ MAX_ROWS`, every slice
/// as documented on [`LayerWeights`]).
pub(crate) fn layer_step(
    lw: &LayerWeights<'_>,
    dims: Dims,
    h: &mut [f32],
    conv: &[f32],
    ssm: &[f32],
) -> Vec<f32> {
    let Dims { b, dm, e, n, r, k } = dims;
    debug_assert!(b <= MAX_ROWS);
    let xw = r + 2 * n;
    let mut u = vec![0.0f32; b * dm];
    for (urow, hrow) in u.chunks_exact_mut(dm).zip(h.chunks_exact(dm)) {
        rms_norm(hrow, lw.norm, lw.eps, urow);
    }
    let ranges = ranges(e);
    let mut out = vec![0.0f32; b * e * (k + n)];
    let (new_conv, new_ssm) = out.split_at_mut(b * e * k);

    // Region 1: in_proj rows, conv step, x_proj partial sums.
    let conv_pieces = split_rows(new_conv, e, k, &ranges);
    let tasks: Vec<Task> = ranges
        .par_iter()
        .zip(conv_pieces)
        .map(|(&(e0, w), mut pieces)| {
            let mut x = vec![0.0f32; w * b];
            lw.in_proj.dots(dm, 0, dm, &u, dm, b, e0, &mut x);
            let mut z = vec![0.0f32; w * b];
            lw.in_proj.dots(dm, 0, dm, &u, dm, b, e + e0, &mut z);
            let (mut x, mut z) = (transpose(&x, w, b), transpose(&z, w, b));
            if let Some(bias) = lw.in_bias {
                for i in 0..b {
                    add(&mut x[i * w..(i + 1) * w], &bias[e0..e0 + w]);
                    add(&mut z[i * w..(i + 1) * w], &bias[e + e0..e + e0 + w]);
                }
            }
            let zeros;
            let cb = match lw.conv_b {
                Some(cb) => &cb[e0..e0 + w],
                None => {
                    zeros = vec![0.0f32; w];
                    &zeros
                }
            };
            let mut xc = vec![0.0f32; b * w];
            for (i, piece) in pieces.iter_mut().enumerate() {
                let old = &conv[(i * e + e0) * k..(i * e + e0 + w) * k];
                conv_rows(
                    old,
                    &x[i * w..(i + 1) * w],
                    &lw.conv_w[e0 * k..(e0 + w) * k],
                    cb,
                    k,
                    &mut xc[i * w..(i + 1) * w],
                    piece,
                );
            }
            let mut partial = vec![0.0f32; xw * b];
            lw.x_proj.dots(e, e0, w, &xc, w, b, 0, &mut partial);
            Task {
                e0,
                w,
                xc,
                z,
                partial,
            }
        })
        .collect();
    let mut dbc = vec![0.0f32; xw * b];
    for t in &tasks {
        add(&mut dbc, &t.partial);
    }
    let dbc = transpose(&dbc, xw, b);
    let (mut bm, mut cm) = (vec![0.0f32; b * n], vec![0.0f32; b * n]);
    for i in 0..b {
        let row = &dbc[i * xw..(i + 1) * xw];
        bm[i * n..(i + 1) * n].copy_from_slice(&row[r..r + n]);
        cm[i * n..(i + 1) * n].copy_from_slice(&row[r + n..]);
    }

    // Region 2: dt_proj rows, scan step and gate.
    let ssm_pieces = split_rows(new_ssm, e, n, &ranges);
    let ys: Vec<(usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .zip(ssm_pieces)
        .map(|(t, mut pieces)| {
            let Task { e0, w, xc, z, .. } = t;
            let mut dt = vec![0.0f32; w * b];
            lw.dt_proj.dots(r, 0, r, &dbc, xw, b, e0, &mut dt);
            let delta = transpose(&dt, w, b);
            let mut y = vec![0.0f32; b * w];
            for (i, piece) in pieces.iter_mut().enumerate() {
                // Token i's channels of the range, as the kernel's batch row 0.
                let tok = i * w..(i + 1) * w;
                let inp = StepInputs {
                    e: w,
                    n,
                    state: &ssm[(i * e + e0) * n..(i * e + e0 + w) * n],
                    x: &xc[tok.clone()],
                    delta: &delta[tok.clone()],
                    z: Some(&z[tok.clone()]),
                    a: &lw.a[e0 * n..(e0 + w) * n],
                    bm: &bm[i * n..(i + 1) * n],
                    cm: &cm[i * n..(i + 1) * n],
                    d: &lw.d[e0..e0 + w],
                    bias: &lw.dt_bias[e0..e0 + w],
                };
                let yi = &mut y[tok];
                for s in (0..w).step_by(SEG) {
                    let sw = SEG.min(w - s);
                    scan_seg(
                        &inp,
                        0,
                        s,
                        &mut yi[s..s + sw],
                        &mut piece[s * n..(s + sw) * n],
                    );
                }
            }
            (e0, w, y)
        })
        .collect();
    let mut y = vec![0.0f32; b * e];
    for (e0, w, part) in &ys {
        for (i, row) in part.chunks_exact(*w).enumerate() {
            y[i * e + e0..i * e + e0 + w].copy_from_slice(row);
        }
    }

    // Region 3: out_proj as the few-row product (blocks of whole rows, one stream per task;
    // summing it in column ranges per task was slower at batch 1), then the residual.
    project_residual(lw.out_proj, lw.out_bias, &y, b, e, h);
    out
}

/// `h += x Wᵀ + bias` for the `b` rows of `x` (`[b, k]`), `h` `[b, D]`: a layer's out_proj
/// and residual add, in the unfused step's order (the bias joins the product first).
pub(crate) fn project_residual(
    w: Weights<'_>,
    bias: Option<&[f32]>,
    x: &[f32],
    b: usize,
    k: usize,
    h: &mut [f32],
) {
    let o = w.matmul(x, b, k);
    let dm = h.len() / b.max(1);
    for (hrow, orow) in h.chunks_exact_mut(dm).zip(o.chunks_exact(dm)) {
        for (j, (hv, ov)) in hrow.iter_mut().zip(orow).enumerate() {
            *hv += ov + bias.map_or(0.0, |ob| ob[j]);
        }
    }
}

pub(crate) fn add(acc: &mut [f32], v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, in the order Candle's fused `rms_norm` (the
/// unfused step's) computes it.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let m = (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / m * w;
    }
}
