//! `y = x Wᵀ` for a handful of rows of `x`: the shape of decoding, where each step multiplies
//! one token per sequence by every weight matrix of the model. That product is bound by
//! memory, not arithmetic: every weight is read once per step and used for at most
//! [`MAX_ROWS`] dot products. Candle's GEMM ran it on one thread (cpu/wall ≈ 1.0 in batch-1
//! decode), leaving half of the machine's memory bandwidth unused. This kernel streams `W`
//! once, in parallel over blocks of output rows, each task reading its rows front to back,
//! and uses each chunk of a row for every row of `x` while it is in registers.
//!
//! `W` may be f32 or bf16 (`--dtype bf16`: half the bytes per step). bf16 rows are widened
//! to f32 in registers (exact) and multiplied with the f32 activations in f32, so the only
//! rounding bf16 adds is the weights' own (the AVX-512 BF16 form for one or two rows adds
//! at most 2⁻¹⁸ of each term: [`super::avx512`]).
//!
//! The kernel below is 8 lanes wide (AVX2, or portable); where the CPU has AVX-512 the
//! 16-lane form in [`super::avx512`] runs instead (f32 batch-1 decode 1.2×, bf16 1.35×
//! on a Xeon; BENCHMARKS.md).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use half::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::scan::f32_slice;
use super::simd::{Simd, W, with_simd};

/// A weight element the kernels read: f32, or bf16 widened on load.
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    /// Reads `n ≤ W` elements at `src[at..]` as f32 lanes, zero-filling the rest.
    fn load<S: Simd>(s: S, src: &[Self], at: usize, n: usize) -> S::V;
    /// The contiguous elements of a CPU tensor's storage, if it holds this type.
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [Self]>;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn load<S: Simd>(s: S, src: &[f32], at: usize, n: usize) -> S::V {
        s.load(src, at, n)
    }
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
        f32_slice(storage, layout, "").ok()
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn load<S: Simd>(s: S, src: &[bf16], at: usize, n: usize) -> S::V {
        s.load_bf16(src, at, n)
    }
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [bf16]> {
        let (CpuStorage::BF16(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            return None;
        };
        Some(&data[start..end])
    }
}

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

/// [`ROWS_PER_TASK`] f32 rows' worth of bytes: 128 rows of bf16, so a task streams as many
/// bytes as an f32 one (bf16 batch-1 decode +2–6 % against 64 rows, 512 rows slower; three
/// interleaved runs each, BENCHMARKS.md).
fn rows_per_task<T>() -> usize {
    ROWS_PER_TASK * size_of::<f32>() / size_of::<T>().max(1)
}
/// Below this many weight elements one thread does the product (a task costs µs).
const PARALLEL_MIN: usize = 1 << 15;
/// How far ahead in `W` a product of ≥ 4 rows prefetches: two bf16 rows at k = 768 (a
/// stand-alone probe of 8 rows against 123 M bf16 weights: 43 ms without, 25–28 ms with 3 or
/// 12 KB ahead, 37 ms with 6 KB; noisy).
pub(crate) const PREFETCH_BYTES: usize = 3072;

/// `out[i] = x[i] · row` for the `M` rows of `x` (`xs`), reading `row` once, front to back:
/// one sequential stream per task is what the hardware prefetcher keeps up with (several
/// interleaved rows reached about half the read rate). `U` chains per row of `x` keep ≥ 4
/// FMAs in flight (`M·U ≥ 4`); for `M ≥ 4` each chunk of `row` is loaded (and widened,
/// for bf16) once for all rows of `x`.
#[inline(always)]
fn row_dots<S: Simd, T: WeightElem, const M: usize, const U: usize>(
    s: S,
    xs: &[&[f32]; M],
    row: &[T],
    out: &mut [f32],
) {
    let k = row.len();
    let mut acc = [[s.zero(); U]; M];
    // With ≥ 4 rows of `x` a row of `W` is consumed slowly enough that the hardware
    // prefetcher falls behind (loads of `W` stalled); ask for the line PREFETCH_BYTES ahead
    // once per line. With fewer rows it keeps up, and prefetches only cost issue slots.
    let ahead = if M >= 4 {
        PREFETCH_BYTES / size_of::<T>()
    } else {
        0
    };
    let per_line = (64 / size_of::<T>()).max(W);
    let mut c = 0;
    while c + W * U <= k {
        if ahead > 0 && c % per_line == 0 {
            s.prefetch(row.as_ptr().wrapping_add(c + ahead));
        }
        for u in 0..U {
            let at = c + u * W;
            let wv = T::load(s, row, at, W);
            for (a, x) in acc.iter_mut().zip(xs) {
                a[u] = s.mul_add(wv, s.load(x, at, W), a[u]);
            }
        }
        c += W * U;
    }
    while c < k {
        let n = W.min(k - c);
        let wv = T::load(s, row, c, n);
        for (a, x) in acc.iter_mut().zip(xs) {
            a[0] = s.mul_add(wv, s.load(x, c, n), a[0]);
        }
        c += n;
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        let v = a[1..].iter().fold(a[0], |v, b| s.add(v, *b));
        *o = s.hsum(v);
    }
}

/// A product's operands: `m` rows of `x` (`ldx` apart, each read from its start) against
/// rows of `w` (`ld` apart) over the columns `c0..c0 + k` of `w`. The whole of a matrix is
/// `ldx = ld = k`, `c0 = 0`; a column range of `w` against a narrower `x` is how the fused
/// decode step sums a product over one task's channels.
pub(crate) struct Operands<'a, T> {
    pub x: &'a [f32],
    pub ldx: usize,
    pub m: usize,
    pub w: &'a [T],
    pub ld: usize,
    pub c0: usize,
    pub k: usize,
}

/// `out[(r - r0) * M + i] = x[i] · w[r]` for the rows `r0..r0 + out.len() / M` of `w`.
#[inline(always)]
fn rows_m<S: Simd, T: WeightElem, const M: usize, const U: usize>(
    s: S,
    p: &Operands<'_, T>,
    r0: usize,
    out: &mut [f32],
) {
    let (k, c0) = (p.k, p.c0);
    let xs: [&[f32]; M] = std::array::from_fn(|i| &p.x[i * p.ldx..i * p.ldx + k]);
    for (j, o) in out.chunks_exact_mut(M).enumerate() {
        let at = (r0 + j) * p.ld + c0;
        row_dots::<S, T, M, U>(s, &xs, &p.w[at..at + k], o);
    }
}

/// `out[(r - r0) * m + i] = x[i] · w[r]` for the rows `r0..r0 + out.len() / m` of `w`.
#[inline(always)]
fn block_impl<S: Simd, T: WeightElem>(s: S, p: &Operands<'_, T>, r0: usize, out: &mut [f32]) {
    match p.m {
        1 => rows_m::<S, T, 1, 4>(s, p, r0, out),
        2 => rows_m::<S, T, 2, 2>(s, p, r0, out),
        3 => rows_m::<S, T, 3, 2>(s, p, r0, out),
        4 => rows_m::<S, T, 4, 1>(s, p, r0, out),
        5 => rows_m::<S, T, 5, 1>(s, p, r0, out),
        6 => rows_m::<S, T, 6, 1>(s, p, r0, out),
        7 => rows_m::<S, T, 7, 1>(s, p, r0, out),
        8 => rows_m::<S, T, 8, 1>(s, p, r0, out),
        // Callers pass 1..=MAX_ROWS rows.
        m => unreachable!("gemv block with {m} rows"),
    }
}

with_simd! {
    fn block_f32(p: &Operands<'_, f32>, r0: usize, out: &mut [f32]) = block_impl;
}
with_simd! {
    fn block_bf16(p: &Operands<'_, bf16>, r0: usize, out: &mut [f32]) = block_impl;
}

/// The kernel entry point for each weight type: AVX-512 where the CPU has it
/// ([`avx512`]), else the 8-lane kernel `with_simd!` compiled for AVX2 (or portable).
trait Block: WeightElem + Wide {
    /// The 8-lane kernel for this type.
    fn block8(p: &Operands<'_, Self>, r0: usize, out: &mut [f32]);

    fn block(p: &Operands<'_, Self>, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: `available` checked the CPU features `block` needs.
            return unsafe { avx512::block(p, r0, out) };
        }
        Self::block8(p, r0, out)
    }
}

/// What the AVX-512 kernel needs of a weight type (nothing off x86-64).
#[cfg(target_arch = "x86_64")]
use avx512::Elem as Wide;
#[cfg(not(target_arch = "x86_64"))]
trait Wide {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> Wide for T {}

impl Block for f32 {
    fn block8(p: &Operands<'_, f32>, r0: usize, out: &mut [f32]) {
        block_f32(p, r0, out)
    }
}

impl Block for bf16 {
    fn block8(p: &Operands<'_, bf16>, r0: usize, out: &mut [f32]) {
        block_bf16(p, r0, out)
    }
}

/// A weight matrix as the few-row kernel reads it: f32, or bf16 widened on load.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    /// The contiguous f32 or bf16 elements of a CPU tensor's storage.
    pub(crate) fn of(storage: &'a CpuStorage, layout: &Layout) -> Option<Self> {
        f32::slice(storage, layout)
            .map(Weights::F32)
            .or_else(|| bf16::slice(storage, layout).map(Weights::Bf16))
    }

    /// Elements in the matrix.
    pub(crate) fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }

    /// `x` `[m, k]` (m ≤ [`MAX_ROWS`]) times this `[n, k]` matrix transposed: `[m, n]`, in
    /// parallel over blocks of rows once the matrix is large enough.
    pub(crate) fn matmul(self, x: &[f32], m: usize, k: usize) -> Vec<f32> {
        let n = self.len() / k.max(1);
        match self {
            Weights::F32(w) => matmul_small(x, m, k, w, n),
            Weights::Bf16(w) => matmul_small(x, m, k, w, n),
        }
    }

    /// On the calling thread: `out[(r - r0) * m + i] = Σ_c w[r, c0 + c] · x[i·ldx + c]`
    /// (`c < k`) for the rows `r0..r0 + out.len() / m` of this matrix (rows `ld` apart).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dots(
        self,
        ld: usize,
        c0: usize,
        k: usize,
        x: &[f32],
        ldx: usize,
        m: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        #[allow(clippy::too_many_arguments)]
        fn run<T: Block>(
            w: &[T],
            ld: usize,
            c0: usize,
            k: usize,
            x: &[f32],
            ldx: usize,
            m: usize,
            r0: usize,
            out: &mut [f32],
        ) {
            let p = Operands {
                x,
                ldx,
                m,
                w,
                ld,
                c0,
                k,
            };
            T::block(&p, r0, out)
        }
        match self {
            Weights::F32(w) => run(w, ld, c0, k, x, ldx, m, r0, out),
            Weights::Bf16(w) => run(w, ld, c0, k, x, ldx, m, r0, out),
        }
    }
}

/// `x` `[m, k]` times `wᵀ` (`w` `[n, k]`), row-major: `[m, n]`.
fn matmul_small<T: Block>(x: &[f32], m: usize, k: usize, w: &[T], n: usize) -> Vec<f32> {
    // Computed as `[n, m]` so each task writes one contiguous block, then transposed (a
    // no-op for m = 1).
    let mut t = vec![0.0f32; n * m];
    if m == 0 || n == 0 {
        return t;
    }
    let p = Operands {
        x,
        ldx: k,
        m,
        w,
        ld: k,
        c0: 0,
        k,
    };
    if n * k < PARALLEL_MIN {
        T::block(&p, 0, &mut t);
    } else {
        let rpt = rows_per_task::<T>();
        t.par_chunks_mut(rpt * m)
            .enumerate()
            .for_each(|(task, out)| T::block(&p, task * rpt, out));
    }
    if m == 1 {
        return t;
    }
    transpose(&t, n, m)
}

/// `[rows, m]` (the kernel's output layout) as `[m, rows]`.
pub(crate) fn transpose(t: &[f32], rows: usize, m: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; t.len()];
    for (r, row) in t.chunks_exact(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            y[i * rows + r] = *v;
        }
    }
    y
}

/// `(m, k, n)` of `x` `[m, k]` times `wᵀ` (`w` `[n, k]`), or an error naming `op`.
fn product_dims(op: &str, l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        bail!("{op}: x is [{m}, {k}] but w is [{n}, {k2}]")
    }
    Ok((m, k, n))
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
        let (m, k, n) = product_dims("small-m-matmul", l1, l2)?;
        if m > MAX_ROWS {
            bail!("small-m-matmul: x has {m} rows, at most {MAX_ROWS} go through this kernel")
        }
        let x = f32_slice(s1, l1, "small-m-matmul (x)")?;
        let y = if let Some(w) = f32::slice(s2, l2) {
            matmul_small(x, m, k, w, n)
        } else if let Some(w) = bf16::slice(s2, l2) {
            matmul_small(x, m, k, w, n)
        } else {
            bail!(
                "small-m-matmul: w must be a contiguous F32 or BF16 tensor, got {:?}",
                s2.dtype()
            )
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `x Wᵀ` for an f32 CPU tensor `x` `[m, k]` (m ≤ [`MAX_ROWS`] is where it pays) and a
/// contiguous f32 or bf16 `w` `[n, k]`, outside any autograd graph; f32 out.
pub fn small_m_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &SmallMatmul)
}

/// Rows of a bf16 `W` per task of a many-row product: the task widens them to f32 (≤ 384 KB
/// at k = 1536, in L2) and multiplies that panel on its own thread.
const PANEL_ROWS: usize = 64;

#[inline(always)]
fn widen_impl<S: Simd>(s: S, src: &[bf16], dst: &mut [f32]) {
    let mut c = 0;
    while c < src.len() {
        let n = W.min(src.len() - c);
        s.store(dst, c, n, s.load_bf16(src, c, n));
        c += n;
    }
}

with_simd! {
    fn widen(src: &[bf16], dst: &mut [f32]) = widen_impl;
}

/// `x` `[m, k]` times `wᵀ` (`w` bf16 `[n, k]`): `[m, n]`, in parallel over panels of
/// [`PANEL_ROWS`] rows of `w`, so no f32 copy of `w` exists at any time.
fn bf16_panels(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(PANEL_ROWS))
        .into_par_iter()
        .map_init(Vec::new, |panel: &mut Vec<f32>, p| {
            let r0 = p * PANEL_ROWS;
            let rows = PANEL_ROWS.min(n - r0);
            panel.resize(rows * k, 0.0);
            widen(&w[r0 * k..(r0 + rows) * k], panel);
            let mut out = vec![0.0f32; m * rows];
            // SAFETY: `out` is m × rows (row stride rows), `x` is m × k (row stride k) and
            // `panel` read as k × rows is the row-major rows × k block (column stride k):
            // every index gemm touches is inside its slice; nothing else aliases `out`.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    out.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
            out
        })
        .collect();
    let mut y = vec![0.0f32; m * n];
    for (p, part) in parts.iter().enumerate() {
        let r0 = p * PANEL_ROWS;
        let rows = PANEL_ROWS.min(n - r0);
        for (dst, src) in y.chunks_mut(n).zip(part.chunks(rows)) {
            dst[r0..r0 + rows].copy_from_slice(src);
        }
    }
    y
}

struct Bf16Matmul;

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = product_dims("bf16-weight-matmul", l1, l2)?;
        let x = f32_slice(s1, l1, "bf16-weight-matmul (x)")?;
        let Some(w) = bf16::slice(s2, l2) else {
            bail!("bf16-weight-matmul: w must be a contiguous BF16 tensor")
        };
        let y = if m == 0 || n == 0 || k == 0 {
            vec![0.0f32; m * n]
        } else {
            bf16_panels(x, m, k, w, n)
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `x Wᵀ` for an f32 CPU tensor `x` `[m, k]` and a contiguous bf16 `w` `[n, k]`, outside any
/// autograd graph; f32 out. For many rows (prefill, scoring): each task widens a panel of
/// `W` to f32 and runs Candle's GEMM kernel on it, so no f32 copy of `W` is kept.
pub fn bf16_weight_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &Bf16Matmul)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::simd::Portable;
    use candle_core::Device;

    /// A value in [-0.5, 0.5) from a 64-bit LCG (also the AVX-512 product's tests').
    pub(in crate::kernels) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Against Candle's matmul on shapes around every boundary: k below, at and above the
    /// vector width, n not a multiple of the row group or of a task, serial and parallel
    /// sizes; the dispatched kernel (AVX-512 where the CPU has it), the 8-lane one and the
    /// portable one.
    #[test]
    fn matches_candle_matmul() {
        let mut seed = 7u64;
        for m in 1..=MAX_ROWS {
            for k in [1usize, 5, 8, 9, 31, 100, 768] {
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
                    let whole = Operands {
                        x: &xs,
                        ldx: k,
                        m,
                        w: &ws,
                        ld: k,
                        c0: 0,
                        k,
                    };
                    block_impl(Portable, &whole, 0, &mut portable);
                    // The 8-lane kernel too where the dispatched one is AVX-512.
                    let mut eight = vec![0.0f32; n * m];
                    f32::block8(&whole, 0, &mut eight);
                    // A column range of `w` against a narrower `x` (the fused decode
                    // step's partial sums), from row 1 on.
                    let (c0, kk) = (k / 3, k - k / 3 - k / 4);
                    let xr: Vec<f32> = (0..m * kk)
                        .map(|j| xs[(j / kk) * k + c0 + j % kk])
                        .collect();
                    let mut part = vec![0.0f32; (n - 1) * m];
                    Weights::F32(&ws).dots(k, c0, kk, &xr, kk, m, 1, &mut part);
                    for (j, p) in part.iter().enumerate() {
                        let (r, i) = (1 + j / m, j % m);
                        let e: f32 = (0..kk).map(|c| ws[r * k + c0 + c] * xr[i * kk + c]).sum();
                        assert!(
                            (p - e).abs() <= 1e-5 * (1.0 + e.abs()) * (kk as f32).sqrt(),
                            "range m {m} k {k} n {n}: {p} vs {e}"
                        );
                    }
                    for i in 0..m {
                        for r in 0..n {
                            let e = want[i * n + r];
                            let tol = 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt();
                            for (path, g) in [
                                ("dispatched", got[i * n + r]),
                                ("portable", portable[r * m + i]),
                                ("8-lane", eight[r * m + i]),
                            ] {
                                assert!(
                                    (g - e).abs() <= tol,
                                    "{path} m {m} k {k} n {n} [{i},{r}]: {g} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt();
            assert!((g - e).abs() <= tol, "{what} [{i}]: {g} vs {e}");
        }
    }

    /// A bf16 weight gives the f32 product of its exactly widened values (up to summation
    /// order), through the few-row kernel (vector and portable) and the panel GEMM, with n
    /// around the panel size.
    #[test]
    fn bf16_weights_match_their_f32_widening() {
        let mut seed = 11u64;
        for m in [1usize, 2, 5, 8, 9, 37] {
            for k in [1usize, 7, 8, 9, 100, 300] {
                for n in [1usize, 5, 63, 64, 65, 300] {
                    let xs: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                    let ws: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                    let x = Tensor::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
                    let w = Tensor::from_vec(ws, (n, k), &Device::Cpu)
                        .unwrap()
                        .to_dtype(candle_core::DType::BF16)
                        .unwrap();
                    let wide = w.to_dtype(candle_core::DType::F32).unwrap();
                    let want = values(&x.matmul(&wide.t().unwrap()).unwrap());
                    let what = format!("m {m} k {k} n {n}");
                    let panel = values(&bf16_weight_matmul(&x, &w).unwrap());
                    assert_close(&panel, &want, k, &format!("panel {what}"));
                    if m <= MAX_ROWS {
                        let few = values(&small_m_matmul(&x, &w).unwrap());
                        assert_close(&few, &want, k, &format!("few-row {what}"));
                        let wb: Vec<bf16> = w.flatten_all().unwrap().to_vec1().unwrap();
                        let mut t = vec![0.0f32; n * m];
                        let p = Operands {
                            x: &xs,
                            ldx: k,
                            m,
                            w: &wb,
                            ld: k,
                            c0: 0,
                            k,
                        };
                        block_impl(Portable, &p, 0, &mut t);
                        let mut eight = vec![0.0f32; n * m];
                        bf16::block8(&p, 0, &mut eight);
                        for (path, t) in [("portable", t), ("8-lane", eight)] {
                            let got: Vec<f32> =
                                (0..m * n).map(|j| t[(j % n) * m + j / n]).collect();
                            assert_close(&got, &want, k, &format!("{path} {what}"));
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
        let wb = w.to_dtype(candle_core::DType::BF16).unwrap();
        let err = bf16_weight_matmul(&x, &wb).unwrap_err().to_string();
        assert!(err.contains("[2, 3] but w is [4, 5]"), "{err}");
        let i = Tensor::zeros((4, 3), candle_core::DType::U32, &Device::Cpu).unwrap();
        let err = small_m_matmul(&x, &i).unwrap_err().to_string();
        assert!(err.contains("F32 or BF16"), "{err}");
        let many = Tensor::zeros((MAX_ROWS + 1, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = small_m_matmul(&many, &w).unwrap_err().to_string();
        assert!(err.contains("at most"), "{err}");
    }
}
