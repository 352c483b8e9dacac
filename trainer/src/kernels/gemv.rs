//! `y = x Wᵀ` for a handful of rows of `x`: the shape of decoding, where each step multiplies
//! one token per sequence by every weight matrix of the model. That product is bound by
//! memory, not arithmetic: every weight is read once per step and used for at most
//! [`MAX_ROWS`] dot products. Candle's GEMM ran it on one thread (cpu/wall ≈ 1.0 in batch-1
//! decode), leaving half of the machine's memory bandwidth unused. This kernel streams `W`
//! once, in parallel over blocks of output rows, and reuses each row of `W` (from L1) for
//! every row of `x`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::scan::f32_slice;
use super::simd::{Simd, W, with_simd};

/// Whether the model routes few-row products here: yes, unless `MOLT_SMALL_M_MATMUL=0` (read
/// once), which hands them back to Candle's GEMM — a switch for side-by-side benchmarks.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOLT_SMALL_M_MATMUL").map_or(true, |v| v != "0"))
}

/// Up to this many rows of `x` take this kernel; more make a GEMM worth its packing.
pub const MAX_ROWS: usize = 8;
/// Output rows per parallel task: a task reads a contiguous block of `W`.
const ROWS_PER_TASK: usize = 64;
/// Below this many weight elements one thread does the product (a task costs µs).
const PARALLEL_MIN: usize = 1 << 15;
/// Rows of `W` multiplied together: four independent accumulator chains (and four memory
/// streams) per row of `x`.
const GROUP: usize = 4;

/// `out[(r - r0) * m + i] = x[i] · w[r]` for the rows `r0..r0 + out.len() / m` of `w`.
#[inline(always)]
fn block_impl<S: Simd>(s: S, x: &[f32], m: usize, k: usize, w: &[f32], r0: usize, out: &mut [f32]) {
    let rows = out.len() / m;
    let full = k / W * W;
    let tail = k - full;
    let mut r = 0;
    while r < rows {
        let g = GROUP.min(rows - r);
        let wr = |j: usize| &w[(r0 + r + j) * k..(r0 + r + j + 1) * k];
        if g == GROUP {
            let (w0, w1, w2, w3) = (wr(0), wr(1), wr(2), wr(3));
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                let mut a = [s.zero(); GROUP];
                let mut c = 0;
                while c < full {
                    let xv = s.load(xi, c, W);
                    a[0] = s.mul_add(s.load(w0, c, W), xv, a[0]);
                    a[1] = s.mul_add(s.load(w1, c, W), xv, a[1]);
                    a[2] = s.mul_add(s.load(w2, c, W), xv, a[2]);
                    a[3] = s.mul_add(s.load(w3, c, W), xv, a[3]);
                    c += W;
                }
                if tail > 0 {
                    let xv = s.load(xi, full, tail);
                    a[0] = s.mul_add(s.load(w0, full, tail), xv, a[0]);
                    a[1] = s.mul_add(s.load(w1, full, tail), xv, a[1]);
                    a[2] = s.mul_add(s.load(w2, full, tail), xv, a[2]);
                    a[3] = s.mul_add(s.load(w3, full, tail), xv, a[3]);
                }
                for (j, acc) in a.iter().enumerate() {
                    out[(r + j) * m + i] = s.hsum(*acc);
                }
            }
        } else {
            for j in 0..g {
                let wj = wr(j);
                for i in 0..m {
                    let xi = &x[i * k..(i + 1) * k];
                    let mut acc = s.zero();
                    let mut c = 0;
                    while c < k {
                        let n = W.min(k - c);
                        acc = s.mul_add(s.load(wj, c, n), s.load(xi, c, n), acc);
                        c += n;
                    }
                    out[(r + j) * m + i] = s.hsum(acc);
                }
            }
        }
        r += g;
    }
}

with_simd! {
    fn block(x: &[f32], m: usize, k: usize, w: &[f32], r0: usize, out: &mut [f32]) = block_impl;
}

/// `x` `[m, k]` times `wᵀ` (`w` `[n, k]`), row-major: `[m, n]`.
pub(crate) fn matmul_small(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    // Computed as `[n, m]` so each task writes one contiguous block, then transposed (a
    // no-op for m = 1).
    let mut t = vec![0.0f32; n * m];
    if m == 0 || n == 0 {
        return t;
    }
    if n * k < PARALLEL_MIN {
        block(x, m, k, w, 0, &mut t);
    } else {
        t.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| block(x, m, k, w, task * ROWS_PER_TASK, out));
    }
    if m == 1 {
        return t;
    }
    let mut y = vec![0.0f32; m * n];
    for (r, row) in t.chunks(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            y[i * n + r] = *v;
        }
    }
    y
}

struct SmallMatmul;

impl CustomOp2 for SmallMatmul {
    fn name(&self) -> &'static str {
        "small-m-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            bail!("small-m-matmul: x is [{m}, {k}] but w is [{n}, {k2}]")
        }
        let x = f32_slice(s1, l1, "small-m-matmul (x)")?;
        let w = f32_slice(s2, l2, "small-m-matmul (w)")?;
        Ok((
            CpuStorage::F32(matmul_small(x, m, k, w, n)),
            Shape::from((m, n)),
        ))
    }
}

/// `x Wᵀ` for f32 CPU tensors `x` `[m, k]` (m ≤ [`MAX_ROWS`] is where it pays) and a
/// contiguous `w` `[n, k]`, outside any autograd graph.
pub fn small_m_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &SmallMatmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::Portable;
    use candle_core::Device;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Against Candle's matmul on shapes around every boundary: k below, at and above the
    /// vector width, n not a multiple of the row group or of a task, serial and parallel
    /// sizes; and the portable kernel against the vector one.
    #[test]
    fn matches_candle_matmul() {
        let mut seed = 7u64;
        for m in 1..=MAX_ROWS {
            for k in [1usize, 5, 8, 9, 31, 768] {
                for n in [1usize, 3, 4, 7, 65, 130, 1031] {
                    let xs: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                    let ws: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                    let x = Tensor::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
                    let w = Tensor::from_vec(ws.clone(), (n, k), &Device::Cpu).unwrap();
                    let want: Vec<f32> = x
                        .matmul(&w.t().unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let got: Vec<f32> = small_m_matmul(&x, &w)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let mut portable = vec![0.0f32; n * m];
                    block_impl(Portable, &xs, m, k, &ws, 0, &mut portable);
                    for i in 0..m {
                        for r in 0..n {
                            let (g, p, e) = (got[i * n + r], portable[r * m + i], want[i * n + r]);
                            let tol = 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt();
                            assert!(
                                (g - e).abs() <= tol,
                                "m {m} k {k} n {n} [{i},{r}]: {g} vs {e}"
                            );
                            assert!(
                                (p - e).abs() <= tol,
                                "portable m {m} k {k} n {n}: {p} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = small_m_matmul(&x, &w).unwrap_err().to_string();
        assert!(err.contains("[2, 3] but w is [4, 5]"), "{err}");
    }
}
