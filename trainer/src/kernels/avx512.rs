//! AVX-512 forms of the decode kernels, chosen at run time where the CPU has AVX-512
//! F/BW/VL (Intel Xeon since Skylake-SP, AMD Zen 4 where the hypervisor exposes it): the
//! few-row product of [`super::gemv`] and the state update of the scan step
//! ([`super::step`]). The selective scan and the causal conv reach AVX-512 through
//! [`super::simd::Avx512`] instead (their bodies are generic over the lane count); the rest
//! of the kernels stay 8 lanes wide.
//!
//! The few-row product:
//! Same order of work as the 8-lane kernel — each task streams its rows of `W` front to
//! back and uses each chunk for every row of `x` — with what the 8-lane form cannot have:
//! 16 lanes per instruction (half the loads, widenings and FMAs per weight), tails read
//! with masked loads instead of copied into a zeroed buffer, and `x` read through pointers
//! whose extents are checked once per row of `W`, not once per load. perf of the 8-lane
//! kernel at 8 rows showed ~13 cycles per 8-weight chunk where its arithmetic needs ~4.5,
//! most of it the bounds-checked `x` loads and their address arithmetic.
//!
//! bf16 weights are widened exactly (a bf16 is the upper half of an f32), as in the 8-lane
//! kernel, so both kernels compute the same sums up to their order — except for one or two
//! rows of `x` where the CPU has AVX-512 BF16: there [`PairDot`] multiplies the weights as
//! loaded with `vdpbf16ps` against `x` split into two bf16 parts (within 2⁻¹⁸ of the exact
//! product per term; bf16 batch-1 decode +5–8 % on a Xeon, BENCHMARKS.md).

use std::arch::x86_64::*;

use half::bf16;

use super::gemv::{MAX_ROWS, Operands, PREFETCH_BYTES};
use super::simd::{Avx512, Simd};
use super::step::{StepInputs, seg_dt, seg_gate};

/// f32 lanes per register.
const L: usize = 16;

/// Whether these kernels run: the CPU has AVX-512 F, BW and VL, and `MOLT_AVX512` is not
/// `0` (read once; a switch for side-by-side benchmarks and for running the 8-lane kernels
/// on a machine that has both).
pub(crate) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOLT_AVX512").map_or(true, |v| v != "0")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// Whether bf16 weights take the pair-dot kernel ([`pair_dot`]): [`available`], the CPU
/// has AVX-512 BF16 (`vdpbf16ps`), and `MOLT_BF16_DOT` is not `0` (read once; the switch
/// for side-by-side benchmarks against the widening kernel).
fn pair_dot_available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOLT_BF16_DOT").map_or(true, |v| v != "0")
            && available()
            && is_x86_feature_detected!("avx512bf16")
    })
}

/// A weight element type of the few-row product, and the kernel it takes.
pub(crate) trait Elem: Copy {
    /// `out[(r - r0) * m + i] = x[i] · w[r]` over the operands' column range.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL ([`available`]).
    unsafe fn block16(p: &Operands<'_, Self>, r0: usize, out: &mut [f32]);
}

impl Elem for f32 {
    unsafe fn block16(p: &Operands<'_, f32>, r0: usize, out: &mut [f32]) {
        // SAFETY: this function's contract.
        unsafe { widened(p, r0, out) }
    }
}

impl Elem for bf16 {
    unsafe fn block16(p: &Operands<'_, bf16>, r0: usize, out: &mut [f32]) {
        // SAFETY: this function's contract, and `pair_dot_available` checked AVX-512 BF16.
        unsafe {
            // From 3 rows of `x` the widening does less work: it widens a chunk once for
            // all rows, where `vdpbf16ps` (one a cycle, against two FMAs) takes two per row
            // (bf16 batch-8 decode was 20 % slower with it).
            if pair_dot_available() && p.m <= 2 {
                pair_dot(p, r0, out)
            } else {
                widened(p, r0, out)
            }
        }
    }
}

/// How a kernel multiplies a chunk of a row of `W` into an accumulator of 16 f32 lanes.
trait Dot {
    /// The weight element.
    type T: Copy;
    /// One row of `x`, as the kernel reads it.
    type X: Copy;
    /// A loaded chunk of `W`.
    type Wv: Copy;
    /// Weights per chunk.
    const STEP: usize;
    /// The `STEP` weights at `p`.
    ///
    /// # Safety
    /// `p..p + STEP` is readable; the CPU has the kernel's features.
    unsafe fn load(p: *const Self::T) -> Self::Wv;
    /// The `n < STEP` weights at `p`, the rest of the chunk zero (not read).
    ///
    /// # Safety
    /// `p..p + n` is readable; the CPU has the kernel's features.
    unsafe fn load_tail(p: *const Self::T, n: usize) -> Self::Wv;
    /// `acc + w · x[at..at + n]` lane-wise (pairs summed into lanes where `STEP` = 32), for
    /// the `n ≤ STEP` weights of the chunk.
    ///
    /// # Safety
    /// The row `x` is readable at `at..at + n` (for [`PairDot`]: padded to a whole chunk);
    /// the CPU has the kernel's features.
    unsafe fn madd(acc: __m512, w: Self::Wv, x: Self::X, at: usize, n: usize) -> __m512;
}

/// 16 bf16 values (as u16 in a 256-bit register) widened to f32: shifted into the upper half.
#[inline(always)]
unsafe fn widen(h: __m256i) -> __m512 {
    // SAFETY: the caller's contract (AVX-512 F).
    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))) }
}

/// Lanes selecting the first `n` of 16.
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// Lanes selecting the first `n` of 32 (bf16 elements).
#[inline(always)]
fn mask32(n: usize) -> __mmask32 {
    ((1u64 << n) - 1) as __mmask32
}

/// f32 weights, or bf16 ones widened exactly on load: 16 weights per FMA.
struct Widen<T>(std::marker::PhantomData<T>);

/// A weight type [`Widen`] reads.
trait WideLoad: Copy {
    /// The 16 elements at `p` widened to f32 (the first `n`, the rest 0 and not read).
    ///
    /// # Safety
    /// `p..p + n` is readable; the CPU has AVX-512 F/BW/VL.
    unsafe fn load(p: *const Self, n: usize) -> __m512;
}

impl WideLoad for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> __m512 {
        // SAFETY: the caller's contract; masked-off lanes are not accessed.
        unsafe {
            if n == L {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(mask16(n), p)
            }
        }
    }
}

impl WideLoad for bf16 {
    #[inline(always)]
    unsafe fn load(p: *const bf16, n: usize) -> __m512 {
        // SAFETY: the caller's contract; `bf16` is `repr(transparent)` over `u16`, and
        // masked-off elements are not accessed.
        unsafe {
            if n == L {
                widen(_mm256_loadu_si256(p.cast()))
            } else {
                widen(_mm256_maskz_loadu_epi16(mask16(n), p.cast()))
            }
        }
    }
}

impl<T: WideLoad> Dot for Widen<T> {
    type T = T;
    type X = *const f32;
    type Wv = __m512;
    const STEP: usize = L;
    #[inline(always)]
    unsafe fn load(p: *const T) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { T::load(p, L) }
    }
    #[inline(always)]
    unsafe fn load_tail(p: *const T, n: usize) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { T::load(p, n) }
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, w: __m512, x: *const f32, at: usize, n: usize) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_fmadd_ps(w, f32::load(x.add(at), n), acc) }
    }
}

/// bf16 weights by `vdpbf16ps`, 32 weights per instruction, against each row of `x` split
/// into two bf16 rows `hi + lo` (`hi` = x rounded to bf16, `lo` = the rest rounded): both
/// products of a weight are exact in f32 and summed in f32, so the result differs from the
/// exactly widened product by `|x - hi - lo| ≤ 2⁻¹⁸|x|` per term — far below the weights' own
/// bf16 rounding (2⁻⁹) — where `vdpbf16ps` against `x` rounded once would add another 2⁻⁹.
/// A weight chunk is used as loaded (no widening), and 64 bytes of `W` take one load
/// instead of two.
struct PairDot;

impl Dot for PairDot {
    type T = bf16;
    /// The `hi` and `lo` rows, each padded with zeros to a whole number of chunks.
    type X = (*const u16, *const u16);
    type Wv = __m512bh;
    const STEP: usize = 2 * L;
    #[inline(always)]
    unsafe fn load(p: *const bf16) -> __m512bh {
        // SAFETY: the caller's contract; a 512-bit integer vector as 32 bf16 pairs.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_tail(p: *const bf16, n: usize) -> __m512bh {
        // SAFETY: the caller's contract; masked-off elements are not accessed.
        unsafe {
            let v = _mm512_maskz_loadu_epi16(mask32(n), p.cast());
            std::mem::transmute::<__m512i, __m512bh>(v)
        }
    }
    #[inline(always)]
    unsafe fn madd(
        acc: __m512,
        w: __m512bh,
        x: (*const u16, *const u16),
        at: usize,
        _: usize,
    ) -> __m512 {
        // SAFETY: the caller's contract (the rows are padded to whole chunks; a tail's
        // weights beyond `n` are zero, and so is the padding).
        unsafe {
            let hi =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x.0.add(at).cast()));
            let lo =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x.1.add(at).cast()));
            _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc, w, hi), w, lo)
        }
    }
}

/// `out[r * M + i] = x[i] · rows[r]` for the `M` rows of `x` and the `R` rows of `W` (each
/// `k` long), reading each row of `W` once; `U` independent chains per pair, as in the
/// 8-lane kernel. `R = 2` (from 4 rows of `x`) lets each load of `x` feed two products,
/// halving the loads of `x` (L1/L2 reads) per weight. The rows are `ld` apart; each is
/// prefetched [`PREFETCH_BYTES`] plus `R - 1` rows ahead, i.e. ahead of the rows the pass
/// reads together: 3 KB past row j alone is row j + 1 at f32 k = 768, which the same pass
/// was already reading, so half the rows went unprefetched (f32 batch-8 decode +9–12 %
/// with the extra row, Xeon, BENCHMARKS.md).
///
/// # Safety
/// Every row of `W` is readable for `k` elements, every row of `x` as [`Dot::madd`] needs;
/// the CPU has the kernel's features.
// Index loops: `acc`, `x`, the rows and the chain number move in lockstep.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn row_dots<D: Dot, const M: usize, const R: usize, const U: usize>(
    x: &[D::X; M],
    w: [*const D::T; R],
    k: usize,
    ld: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() == R * M);
    // Unlike the 8-lane kernel, prefetching pays at every row count here (f32 batch-1
    // decode +8–12 % on the Xeon; BENCHMARKS.md). Into L2 (T1), not L1: the same on the
    // Xeon, and on AMD Zen 4 batch-1 decode +4–21 % (f32) and +4–13 % (bf16), bf16 batch 8
    // +4–10 %, f32 batch 8 unchanged.
    let ahead = PREFETCH_BYTES / size_of::<D::T>() + (R - 1) * ld;
    let per_line = 64 / size_of::<D::T>();
    // SAFETY (every block below): the function's contract; full chunks cover
    // `c..c + STEP·U ≤ k` and the tail `c..k`; a prefetch cannot fault.
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); U]; R]; M];
        let mut c = 0;
        while c + D::STEP * U <= k {
            for u in 0..U {
                let at = c + u * D::STEP;
                if at.is_multiple_of(per_line) {
                    for wr in w {
                        _mm_prefetch::<_MM_HINT_T1>(wr.wrapping_add(at + ahead).cast());
                    }
                }
                let wv: [D::Wv; R] = std::array::from_fn(|r| D::load(w[r].add(at)));
                for i in 0..M {
                    for r in 0..R {
                        acc[i][r][u] = D::madd(acc[i][r][u], wv[r], x[i], at, D::STEP);
                    }
                }
            }
            c += D::STEP * U;
        }
        while c < k {
            let n = D::STEP.min(k - c);
            let wv: [D::Wv; R] = std::array::from_fn(|r| {
                if n == D::STEP {
                    D::load(w[r].add(c))
                } else {
                    D::load_tail(w[r].add(c), n)
                }
            });
            for i in 0..M {
                for r in 0..R {
                    acc[i][r][0] = D::madd(acc[i][r][0], wv[r], x[i], c, n);
                }
            }
            c += n;
        }
        for i in 0..M {
            for r in 0..R {
                let a = &acc[i][r];
                let v = a[1..].iter().fold(a[0], |v, b| _mm512_add_ps(v, *b));
                out[r * M + i] = _mm512_reduce_add_ps(v);
            }
        }
    }
}

/// `out[(r - r0) * M + i] = x[i] · w[r]` over the operands' column range, `x` as the kernel
/// reads it (`xs[..M]`).
///
/// # Safety
/// As [`row_dots`], for the rows `r0..r0 + out.len() / M` of `p.w` (checked here) and `xs`.
#[inline(always)]
unsafe fn rows_m<D: Dot, const M: usize, const U: usize>(
    xs: &[D::X],
    p: &Operands<'_, D::T>,
    r0: usize,
    out: &mut [f32],
) {
    let k = p.k;
    let x: [D::X; M] = std::array::from_fn(|i| xs[i]);
    let rows = out.len() / M;
    let row = |j: usize| {
        let at = (r0 + j) * p.ld + p.c0;
        p.w[at..at + k].as_ptr()
    };
    let mut j = 0;
    if M >= 4 {
        while j + 2 <= rows {
            // SAFETY: the caller's contract; the slices bound the rows of `W`.
            unsafe {
                row_dots::<D, M, 2, 1>(
                    &x,
                    [row(j), row(j + 1)],
                    k,
                    p.ld,
                    &mut out[j * M..(j + 2) * M],
                )
            };
            j += 2;
        }
    }
    while j < rows {
        // SAFETY: the caller's contract; the slice bounds the row of `W`.
        unsafe { row_dots::<D, M, 1, U>(&x, [row(j)], k, p.ld, &mut out[j * M..(j + 1) * M]) };
        j += 1;
    }
}

/// [`rows_m`] for `xs.len()` rows of `x` (1..=[`MAX_ROWS`]).
///
/// # Safety
/// As [`rows_m`].
#[inline(always)]
unsafe fn by_rows<D: Dot>(xs: &[D::X], p: &Operands<'_, D::T>, r0: usize, out: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe {
        match xs.len() {
            1 => rows_m::<D, 1, 4>(xs, p, r0, out),
            2 => rows_m::<D, 2, 2>(xs, p, r0, out),
            3 => rows_m::<D, 3, 2>(xs, p, r0, out),
            4 => rows_m::<D, 4, 1>(xs, p, r0, out),
            5 => rows_m::<D, 5, 1>(xs, p, r0, out),
            6 => rows_m::<D, 6, 1>(xs, p, r0, out),
            7 => rows_m::<D, 7, 1>(xs, p, r0, out),
            8 => rows_m::<D, 8, 1>(xs, p, r0, out),
            // Callers pass 1..=MAX_ROWS rows.
            m => unreachable!("gemv block with {m} rows"),
        }
    }
}

/// The few-row product with f32 weights, or bf16 ones widened to f32.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widened<T: WideLoad>(p: &Operands<'_, T>, r0: usize, out: &mut [f32]) {
    let mut xs = [std::ptr::null::<f32>(); MAX_ROWS];
    for (i, x) in xs.iter_mut().enumerate().take(p.m) {
        *x = p.x[i * p.ldx..i * p.ldx + p.k].as_ptr();
    }
    // SAFETY: this function's contract; each row of `x` is `k` long (sliced above).
    unsafe { by_rows::<Widen<T>>(&xs[..p.m], p, r0, out) }
}

/// The few-row product with bf16 weights by `vdpbf16ps` ([`PairDot`]).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and BF16 ([`pair_dot_available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pair_dot(p: &Operands<'_, bf16>, r0: usize, out: &mut [f32]) {
    let (m, k) = (p.m, p.k);
    let kp = k.next_multiple_of(PairDot::STEP);
    // Row i's `hi` at `2i·kp`, its `lo` at `(2i + 1)·kp`: split once per task (m·k values
    // against the task's ≥ 64·k weights).
    let mut split = vec![0u16; 2 * m * kp];
    for (i, pair) in split.chunks_exact_mut(2 * kp).enumerate() {
        let (hi, lo) = pair.split_at_mut(kp);
        let x = &p.x[i * p.ldx..i * p.ldx + k];
        let mut c = 0;
        while c < k {
            let at = |o: usize| {
                let n = k.saturating_sub(c + o).min(L);
                // SAFETY: AVX-512 F (this function's contract); the mask covers the
                // elements `c + o..c + o + n` of `x`, inside it.
                unsafe { _mm512_maskz_loadu_ps(mask16(n), x.as_ptr().wrapping_add(c + o)) }
            };
            let (a0, a1) = (at(0), at(L));
            // SAFETY: AVX-512 F/BF16 (this function's contract); `hi` and `lo` are `kp`
            // long, a multiple of 32, so `c..c + 32` is inside both.
            unsafe {
                let h = _mm512_cvtne2ps_pbh(a1, a0);
                let hv: __m512i = std::mem::transmute::<__m512bh, __m512i>(h);
                let h0 = widen(_mm512_castsi512_si256(hv));
                let h1 = widen(_mm512_extracti64x4_epi64::<1>(hv));
                let l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(a1, h1), _mm512_sub_ps(a0, h0));
                _mm512_storeu_si512(hi.as_mut_ptr().add(c).cast(), hv);
                _mm512_storeu_si512(
                    lo.as_mut_ptr().add(c).cast(),
                    std::mem::transmute::<__m512bh, __m512i>(l),
                );
            }
            c += PairDot::STEP;
        }
    }
    let mut xs = [(std::ptr::null::<u16>(), std::ptr::null::<u16>()); MAX_ROWS];
    for (x, pair) in xs.iter_mut().zip(split.chunks_exact(2 * kp)) {
        *x = (pair.as_ptr(), pair[kp..].as_ptr());
    }
    // SAFETY: this function's contract; the rows of `x` are padded to whole chunks.
    unsafe { by_rows::<PairDot>(&xs[..m], p, r0, out) }
}

/// `out[(r - r0) * m + i] = x[i] · w[r]` for the rows `r0..r0 + out.len() / m` of `w`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
pub(crate) unsafe fn block<T: Elem>(p: &Operands<'_, T>, r0: usize, out: &mut [f32]) {
    // SAFETY: this function's contract.
    unsafe { T::block16(p, r0, out) }
}

/// [`super::step::scan_seg`] with the state update 16 lanes wide: at N = 16 one `exp` and
/// one horizontal sum per channel instead of two and one over twice the registers. `dt` and
/// the gate (one value per channel) stay in the 8-lane kernels.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn scan_seg(
    inp: &StepInputs<'_>,
    bi: usize,
    e0: usize,
    y: &mut [f32],
    ns: &mut [f32],
) {
    // SAFETY: this function's contract.
    let s = unsafe { Avx512::assume() };
    let dts = seg_dt(inp, bi, e0, y.len());
    let n = inp.n;
    let (bt, ct) = inp.bc(bi);
    for (i, (yv, nrow)) in y.iter_mut().zip(ns.chunks_exact_mut(n)).enumerate() {
        let (ch, dt) = (e0 + i, dts[i]);
        let (xv, arow, srow) = inp.channel(bi, ch);
        // SAFETY: AVX-512 (this function's contract); every masked load and store covers
        // `c..c + cw ≤ n`, inside `arow`, `srow`, `bt`, `ct` and `nrow` (each `n` long).
        unsafe {
            let (dtv, duv) = (_mm512_set1_ps(dt), _mm512_set1_ps(dt * xv));
            let mut acc = _mm512_setzero_ps();
            let mut c = 0;
            while c < n {
                let cw = L.min(n - c);
                let m = mask16(cw);
                let load = |v: &[f32]| _mm512_maskz_loadu_ps(m, v.as_ptr().add(c));
                let da = s.exp(_mm512_mul_ps(dtv, load(arow)));
                let sn = _mm512_fmadd_ps(da, load(srow), _mm512_mul_ps(duv, load(bt)));
                _mm512_mask_storeu_ps(nrow.as_mut_ptr().add(c), m, sn);
                acc = _mm512_fmadd_ps(sn, load(ct), acc);
                c += cw;
            }
            *yv = inp.d[ch] * xv + _mm512_reduce_add_ps(acc);
        }
    }
    seg_gate(inp, bi, e0, y);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::tests::lcg;

    /// The pair-dot kernel against the widening one on the same bf16 weights, for every row
    /// count, `k` around its 32-weight chunks and the unrolled main loop, and a column range
    /// (the fused decode step's partial sums): within the `x` split's 2⁻¹⁸ per term. Dropping
    /// `lo` (x rounded once) is off by ≈ 2⁻⁹ per term and fails it.
    #[test]
    fn pair_dot_matches_the_widened_product() {
        if !available() || !is_x86_feature_detected!("avx512bf16") {
            return;
        }
        let mut seed = 5u64;
        let mut next = || lcg(&mut seed);
        for m in 1..=MAX_ROWS {
            for (k, c0, ld) in [
                (1, 0, 1),
                (31, 0, 31),
                (32, 0, 32),
                (33, 0, 33),
                (129, 0, 129),
                (300, 7, 320),
                (768, 0, 768),
            ] {
                let n = 9;
                let x: Vec<f32> = (0..m * k).map(|_| next() * 3.0).collect();
                let w: Vec<bf16> = (0..n * ld).map(|_| bf16::from_f32(next())).collect();
                let p = Operands {
                    x: &x,
                    ldx: k,
                    m,
                    w: &w,
                    ld,
                    c0,
                    k,
                };
                let (mut dot, mut wide) = (vec![0.0f32; n * m], vec![0.0f32; n * m]);
                // SAFETY: the CPU features were checked above.
                unsafe {
                    pair_dot(&p, 0, &mut dot);
                    widened(&p, 0, &mut wide);
                }
                for (j, (d, e)) in dot.iter().zip(&wide).enumerate() {
                    let (r, i) = (j / m, j % m);
                    let scale: f32 = (0..k)
                        .map(|c| (w[r * ld + c0 + c].to_f32() * x[i * k + c]).abs())
                        .sum();
                    assert!(
                        (d - e).abs() <= scale * 2f32.powi(-17) + 1e-6,
                        "m {m} k {k} row {r} x {i}: {d} vs {e} (scale {scale})"
                    );
                }
            }
        }
    }
}
