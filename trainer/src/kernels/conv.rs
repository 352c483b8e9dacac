//! The fused causal depthwise conv1d + bias + SiLU as a Candle `CustomOp3`
//! (`x_ext`, `weight`, `bias`).
//!
//! `x_ext` is `[b, P + L, E]`: the input, optionally preceded by `P = K-1` rows of history
//! (the caller concatenates them, so their gradient comes back through Candle's `cat`).
//! Without history the first `K-1` taps of the first rows read zeros. Rows may be strided
//! (e.g. a `narrow` of in_proj's output) as long as channels are contiguous.
//!
//! There is no recurrence, so work is split over batch × blocks of time rows and every
//! inner loop runs over contiguous channels, 16 at a time with AVX-512 (half the
//! instructions of the SiLU's `exp` and division per channel), else 8. The backward
//! recomputes the pre-activation instead of storing it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::scan::f32_slice;
use super::simd::{self, Simd, with_simd};

/// Time rows per parallel task.
const ROWS: usize = 64;

#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvDims {
    pub b: usize,
    pub l: usize,
    pub e: usize,
    pub k: usize,
    /// Rows of history in front of the input in `x_ext` (0 or K-1).
    pub p: usize,
    /// Anti-causal: output row `t` reads rows `t..t+K-1` (tap `k` reads `t + K-1-k`, zero
    /// past the end), which is the causal conv of the time-reversed input, reversed back
    /// (Vim's backward branch). Never with history (`p = 0`).
    pub reverse: bool,
}

impl ConvDims {
    /// The `x_ext` row that tap `k` of output row `t` reads, if it is inside `x_ext`.
    #[inline(always)]
    fn tap(&self, t: usize, k: usize) -> Option<usize> {
        if self.reverse {
            let j = t + self.k - 1 - k;
            (j < self.l).then_some(j)
        } else {
            (t + self.p + k).checked_sub(self.k - 1)
        }
    }

    /// The output row whose tap `k` reads `x_ext` row `j` (the inverse of [`Self::tap`]).
    #[inline(always)]
    fn tapped_by(&self, j: usize, k: usize) -> Option<usize> {
        let t = if self.reverse {
            (j + k).checked_sub(self.k - 1)
        } else {
            (j + self.k - 1).checked_sub(self.p + k)
        };
        t.filter(|&t| t < self.l)
    }
}

/// Row access into a `[b, rows, E]` tensor whose last dim is contiguous.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    stride_b: usize,
    stride_t: usize,
    e: usize,
}

impl<'a> Rows<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, dims: &ConvDims) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            bail!(
                "causal_conv1d_silu: expected F32 input, got {:?}",
                storage.dtype()
            )
        };
        let want = [dims.b, dims.p + dims.l, dims.e];
        if layout.dims() != want {
            bail!(
                "causal_conv1d_silu: x has shape {:?}, expected {want:?}",
                layout.dims()
            )
        }
        let stride = layout.stride();
        if dims.e > 1 && stride[2] != 1 {
            bail!("causal_conv1d_silu: x must be contiguous along channels")
        }
        let (start, stride_b, stride_t) = (layout.start_offset(), stride[0], stride[1]);
        // The furthest element any row read touches must be in the buffer.
        if dims.b * (dims.p + dims.l) * dims.e > 0 {
            let last = start + (dims.b - 1) * stride_b + (dims.p + dims.l - 1) * stride_t + dims.e;
            if last > data.len() {
                bail!("causal_conv1d_silu: x's layout reaches past its storage")
            }
        }
        Ok(Self {
            data,
            start,
            stride_b,
            stride_t,
            e: dims.e,
        })
    }

    /// Row `j` (in `x_ext` coordinates) of batch `bi`.
    #[inline(always)]
    fn row(&self, bi: usize, j: usize) -> &'a [f32] {
        let at = self.start + bi * self.stride_b + j * self.stride_t;
        &self.data[at..at + self.e]
    }
}

/// Pre-activation of output row `t`, channels `c..c + w`: `bias + Σ_k w[k]·x[tap(t, k)]`
/// (`x[t + k - (K-1)]` causally), rows outside `x_ext` being zero.
/// `wt` is the weight transposed to `[K][E]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn preact<const K: usize, S: Simd<K>>(
    s: S,
    x: &Rows<'_>,
    wt: &[f32],
    bias: &[f32],
    dims: &ConvDims,
    bi: usize,
    t: usize,
    c: usize,
    w: usize,
) -> S::V {
    let mut acc = s.load(bias, c, w);
    for k in 0..dims.k {
        let Some(j) = dims.tap(t, k) else {
            continue;
        };
        acc = s.mul_add(
            s.load(wt, k * dims.e + c, w),
            s.load(x.row(bi, j), c, w),
            acc,
        );
    }
    acc
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_rows_impl<const K: usize, S: Simd<K>>(
    s: S,
    x: &Rows<'_>,
    wt: &[f32],
    bias: &[f32],
    dims: &ConvDims,
    bi: usize,
    t0: usize,
    out: &mut [f32],
) {
    let e = dims.e;
    for (dt, y) in out.chunks_exact_mut(e).enumerate() {
        for c in (0..e).step_by(K) {
            let w = K.min(e - c);
            let a = preact(s, x, wt, bias, dims, bi, t0 + dt, c, w);
            s.store(y, c, w, simd::silu(s, a));
        }
    }
}

with_simd! {
    wide fn fwd_rows(x: &Rows<'_>, wt: &[f32], bias: &[f32], dims: &ConvDims, bi: usize, t0: usize, out: &mut [f32]) = fwd_rows_impl;
}

/// Gradient w.r.t. the pre-activation for a block of rows (written to `ga`), and this
/// block's contribution to the weight (`[K][E]`) and bias (`[E]`) gradients, returned as
/// `[K + 1][E]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn preact_grad_rows_impl<const K: usize, S: Simd<K>>(
    s: S,
    x: &Rows<'_>,
    wt: &[f32],
    bias: &[f32],
    grad: &[f32],
    dims: &ConvDims,
    bi: usize,
    t0: usize,
    ga: &mut [f32],
) -> Vec<f32> {
    let (e, k) = (dims.e, dims.k);
    let mut gwb = vec![0.0f32; (k + 1) * e];
    for (dt, gar) in ga.chunks_exact_mut(e).enumerate() {
        let t = t0 + dt;
        let gr = &grad[(bi * dims.l + t) * e..][..e];
        for c in (0..e).step_by(K) {
            let w = K.min(e - c);
            let a = preact(s, x, wt, bias, dims, bi, t, c, w);
            let g = s.mul(s.load(gr, c, w), simd::silu_and_grad(s, a).1);
            s.store(gar, c, w, g);
            let gb = s.add(s.load(&gwb, k * e + c, w), g);
            s.store(&mut gwb, k * e + c, w, gb);
            for kk in 0..k {
                let Some(j) = dims.tap(t, kk) else {
                    continue;
                };
                let at = kk * e + c;
                let gw = s.mul_add(g, s.load(x.row(bi, j), c, w), s.load(&gwb, at, w));
                s.store(&mut gwb, at, w, gw);
            }
        }
    }
    gwb
}

with_simd! {
    wide
    #[allow(clippy::too_many_arguments)]
    fn preact_grad_rows(
        x: &Rows<'_>,
        wt: &[f32],
        bias: &[f32],
        grad: &[f32],
        dims: &ConvDims,
        bi: usize,
        t0: usize,
        ga: &mut [f32],
    ) -> Vec<f32> = preact_grad_rows_impl;
}

/// Input gradient for `x_ext` rows `j0..` of batch `bi`: `gx[j] = Σ_k w[k]·ga[t]` over the
/// output rows `t` whose tap `k` reads `j`.
#[inline(always)]
fn input_grad_rows_impl<const K: usize, S: Simd<K>>(
    s: S,
    wt: &[f32],
    ga: &[f32],
    dims: &ConvDims,
    bi: usize,
    j0: usize,
    gx: &mut [f32],
) {
    let e = dims.e;
    for (dj, out) in gx.chunks_exact_mut(e).enumerate() {
        let j = j0 + dj;
        for c in (0..e).step_by(K) {
            let w = K.min(e - c);
            let mut acc = s.zero();
            for k in 0..dims.k {
                if let Some(t) = dims.tapped_by(j, k) {
                    let gar = &ga[(bi * dims.l + t) * e..][..e];
                    acc = s.mul_add(s.load(wt, k * e + c, w), s.load(gar, c, w), acc);
                }
            }
            s.store(out, c, w, acc);
        }
    }
}

with_simd! {
    wide fn input_grad_rows(wt: &[f32], ga: &[f32], dims: &ConvDims, bi: usize, j0: usize, gx: &mut [f32]) = input_grad_rows_impl;
}

/// Splits a `[b, rows, e]` buffer into per-task `(batch, first row, slice)` pieces of at
/// most `ROWS` rows.
fn row_tasks(buf: &mut [f32], rows: usize, e: usize) -> Vec<(usize, usize, &mut [f32])> {
    if rows * e == 0 {
        return Vec::new();
    }
    buf.chunks_mut(rows * e)
        .enumerate()
        .flat_map(|(bi, rb)| {
            rb.chunks_mut(ROWS * e)
                .enumerate()
                .map(move |(c, s)| (bi, c * ROWS, s))
        })
        .collect()
}

/// Weight `[E, K]` → `[K][E]`, so each tap is a contiguous row over channels.
fn transpose_weight(w: &[f32], e: usize, k: usize) -> Vec<f32> {
    let mut wt = vec![0.0f32; k * e];
    for ch in 0..e {
        for kk in 0..k {
            wt[kk * e + ch] = w[ch * k + kk];
        }
    }
    wt
}

fn check_params(dims: &ConvDims, w: &[f32], bias: &[f32]) -> Result<()> {
    if w.len() != dims.e * dims.k || bias.len() != dims.e {
        bail!(
            "causal_conv1d_silu: weight/bias have {}/{} values, expected {}/{}",
            w.len(),
            bias.len(),
            dims.e * dims.k,
            dims.e
        )
    }
    Ok(())
}

pub(crate) struct ConvOp {
    pub dims: ConvDims,
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "molt-causal-conv1d-silu"
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
        let dims = &self.dims;
        let x = Rows::new(s1, l1, dims)?;
        let w = f32_slice(s2, l2, "causal_conv1d_silu (weight)")?;
        let bias = f32_slice(s3, l3, "causal_conv1d_silu (bias)")?;
        check_params(dims, w, bias)?;
        let wt = transpose_weight(w, dims.e, dims.k);
        let mut y = vec![0.0f32; dims.b * dims.l * dims.e];
        row_tasks(&mut y, dims.l, dims.e)
            .into_par_iter()
            .for_each(|(bi, t0, out)| fwd_rows(&x, &wt, bias, dims, bi, t0, out));
        Ok((CpuStorage::F32(y), Shape::from((dims.b, dims.l, dims.e))))
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
        super::cuda::conv_fwd(&self.dims, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x_ext: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.to_dtype(DType::F32)?.contiguous()?;
        // The grad op needs four inputs; weight and bias are small, so pack them.
        let wb = Tensor::cat(
            &[
                &weight.detach().flatten_all()?,
                &bias.detach().flatten_all()?,
            ],
            0,
        )?;
        let packed =
            x_ext
                .detach()
                .apply_op3_no_bwd(&wb, &grad, &ConvGradOp { dims: self.dims })?;
        let ConvDims { b, l, e, k, p, .. } = self.dims;
        let [gx, gw, gb] = super::unpack(&packed, [&[b, p + l, e], &[e, k], &[e]])?;
        // f32 grads; on CUDA x may be f16/bf16.
        Ok((Some(gx.to_dtype(x_ext.dtype())?), Some(gw), Some(gb)))
    }
}

/// (x_ext, [weight; bias], grad y) → [grad x_ext; grad weight; grad bias].
struct ConvGradOp {
    dims: ConvDims,
}

impl CustomOp3 for ConvGradOp {
    fn name(&self) -> &'static str {
        "molt-causal-conv1d-silu-grad"
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
        let dims = &self.dims;
        let ConvDims { b, l, e, k, p, .. } = *dims;
        let x = Rows::new(s1, l1, dims)?;
        let wb = f32_slice(s2, l2, "causal_conv1d_silu backward (weight, bias)")?;
        let grad = f32_slice(s3, l3, "causal_conv1d_silu backward (grad of y)")?;
        if wb.len() != e * (k + 1) {
            bail!(
                "causal_conv1d_silu backward: weight+bias have {} values, expected {}",
                wb.len(),
                e * (k + 1)
            )
        }
        let (w, bias) = wb.split_at(e * k);
        if grad.len() != b * l * e {
            bail!(
                "causal_conv1d_silu backward: grad of y has {} values, expected {}",
                grad.len(),
                b * l * e
            )
        }
        let wt = transpose_weight(w, e, k);

        // Pass 1: gradient of the pre-activation, and per-task weight/bias partials.
        let mut ga = vec![0.0f32; b * l * e];
        let partials: Vec<Vec<f32>> = row_tasks(&mut ga, l, e)
            .into_par_iter()
            .map(|(bi, t0, gar)| preact_grad_rows(&x, &wt, bias, grad, dims, bi, t0, gar))
            .collect();

        // Pass 2: input gradient (a gather over the K taps, so no write conflicts).
        let nx = b * (p + l) * e;
        let mut out = vec![0.0f32; nx + e * (k + 1)];
        let (gx, gwb) = out.split_at_mut(nx);
        row_tasks(gx, p + l, e)
            .into_par_iter()
            .for_each(|(bi, j0, gxr)| input_grad_rows(&wt, &ga, dims, bi, j0, gxr));

        // Reduce the partials in task order (deterministic), transposing the weight back.
        let (gw, gbias) = gwb.split_at_mut(e * k);
        for part in &partials {
            for kk in 0..k {
                for ch in 0..e {
                    gw[ch * k + kk] += part[kk * e + ch];
                }
            }
            for (dst, src) in gbias.iter_mut().zip(&part[k * e..]) {
                *dst += src;
            }
        }
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
        super::cuda::conv_bwd(&self.dims, s1, l1, s2, l2, s3, l3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::Portable;

    fn noise(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Forward rows, pre-activation gradient and input gradient of one batch row with
    /// implementation `s`, for channels that do not fill the last vector.
    fn run<const K: usize, S: Simd<K>>(s: S, dims: &ConvDims) -> Vec<Vec<f32>> {
        let rows = dims.p + dims.l;
        let data = noise(dims.b * rows * dims.e, 1);
        let x = Rows {
            data: &data,
            start: 0,
            stride_b: rows * dims.e,
            stride_t: dims.e,
            e: dims.e,
        };
        let wt = noise(dims.k * dims.e, 2);
        let bias = noise(dims.e, 3);
        let grad = noise(dims.b * dims.l * dims.e, 4);
        let bi = dims.b - 1;
        let mut y = vec![0.0; dims.l * dims.e];
        fwd_rows_impl(s, &x, &wt, &bias, dims, bi, 0, &mut y);
        let mut ga = vec![0.0; dims.b * dims.l * dims.e];
        let gwb = preact_grad_rows_impl(
            s,
            &x,
            &wt,
            &bias,
            &grad,
            dims,
            bi,
            0,
            &mut ga[bi * dims.l * dims.e..],
        );
        let mut gx = vec![0.0; rows * dims.e];
        input_grad_rows_impl(s, &wt, &ga, dims, bi, 0, &mut gx);
        vec![y, ga, gwb, gx]
    }

    #[test]
    fn every_instantiation_matches_the_portable_one() {
        for (e, k, p, reverse) in [(37, 4, 0, false), (21, 3, 2, false), (19, 4, 0, true)] {
            let dims = ConvDims {
                b: 2,
                l: 9,
                e,
                k,
                p,
                reverse,
            };
            let want = run::<8, _>(Portable, &dims);
            let mut got = vec![run::<16, _>(Portable, &dims)];
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(s) = simd::Avx2::detect() {
                    got.push(run(s, &dims));
                }
                if let Some(s) = simd::Avx512::detect() {
                    got.push(run(s, &dims));
                }
            }
            for outs in &got {
                for (i, (a, b)) in outs.iter().zip(&want).enumerate() {
                    assert_eq!(a.len(), b.len());
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                            "output {i}: {x} vs {y} ({dims:?})"
                        );
                    }
                }
            }
        }
    }
}
