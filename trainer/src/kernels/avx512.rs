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
//! kernel, so both kernels compute the same sums up to their order; `vdpbf16ps` would also
//! round the activations to bf16.

use std::arch::x86_64::*;

use half::bf16;

use super::gemv::{Operands, PREFETCH_BYTES};
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

/// A weight element as 16 f32 lanes.
pub(crate) trait Elem: Copy {
    /// The 16 elements at `p`, widened to f32.
    ///
    /// # Safety
    /// `p..p + 16` is readable and the CPU has AVX-512 F/BW/VL.
    unsafe fn load(p: *const Self) -> __m512;
    /// The elements at `p` selected by `mask` (the others are not read and come out 0).
    ///
    /// # Safety
    /// Every selected element is readable and the CPU has AVX-512 F/BW/VL.
    unsafe fn load_masked(p: *const Self, mask: __mmask16) -> __m512;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's contract; masked-off lanes are not accessed.
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
}

/// 16 bf16 values (as u16 in a 256-bit register) widened to f32: shifted into the upper half.
#[inline(always)]
unsafe fn widen(h: __m256i) -> __m512 {
    // SAFETY: the caller's contract (AVX-512 F).
    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))) }
}

impl Elem for bf16 {
    #[inline(always)]
    unsafe fn load(p: *const bf16) -> __m512 {
        // SAFETY: the caller's contract; `bf16` is `repr(transparent)` over `u16`.
        unsafe { widen(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const bf16, mask: __mmask16) -> __m512 {
        // SAFETY: as `load`, and masked-off elements are not accessed.
        unsafe { widen(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

/// `out[r * M + i] = x[i] · rows[r]` for the `M` rows of `x` and the `R` rows of `W` (each
/// `k` long), reading each row of `W` once; `U` independent chains per pair, as in the
/// 8-lane kernel. `R = 2` (from 4 rows of `x`) lets each load of `x` feed two FMAs, halving
/// the loads of `x` (L1/L2 reads) per weight.
// Index loops: `acc`, `x`, the rows and the chain number move in lockstep.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn row_dots<T: Elem, const M: usize, const R: usize, const U: usize>(
    xs: &[&[f32]; M],
    rows: [&[T]; R],
    out: &mut [f32],
) {
    let k = rows[0].len();
    debug_assert!(xs.iter().all(|x| x.len() == k) && out.len() == R * M);
    debug_assert!(rows.iter().all(|r| r.len() == k));
    let w: [*const T; R] = std::array::from_fn(|r| rows[r].as_ptr());
    let x: [*const f32; M] = std::array::from_fn(|i| xs[i].as_ptr());
    // Unlike the 8-lane kernel, prefetching pays at every row count here (f32 batch-1
    // decode +8–12 % on the Xeon; BENCHMARKS.md). Into L2 (T1), not L1: the same on the
    // Xeon, and on AMD Zen 4 batch-1 decode +4–21 % (f32) and +4–13 % (bf16), bf16 batch 8
    // +4–10 %, f32 batch 8 unchanged.
    let ahead = PREFETCH_BYTES / size_of::<T>();
    let per_line = 64 / size_of::<T>();
    // SAFETY (every block below): the CPU has AVX-512 F/BW/VL (the caller's contract); full
    // loads cover `c..c + L·U ≤ k` and masked ones `c..k`, inside every row of `W` and of
    // `x` (each `k` long); a prefetch cannot fault.
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); U]; R]; M];
        let mut c = 0;
        while c + L * U <= k {
            for u in 0..U {
                let at = c + u * L;
                if at.is_multiple_of(per_line) {
                    for wr in w {
                        _mm_prefetch::<_MM_HINT_T1>(wr.wrapping_add(at + ahead).cast());
                    }
                }
                let wv: [__m512; R] = std::array::from_fn(|r| T::load(w[r].add(at)));
                for i in 0..M {
                    let xv = _mm512_loadu_ps(x[i].add(at));
                    for r in 0..R {
                        acc[i][r][u] = _mm512_fmadd_ps(wv[r], xv, acc[i][r][u]);
                    }
                }
            }
            c += L * U;
        }
        while c < k {
            let n = L.min(k - c);
            let mask: __mmask16 = u16::MAX >> (L - n);
            let wv: [__m512; R] = std::array::from_fn(|r| T::load_masked(w[r].add(c), mask));
            for i in 0..M {
                let xv = _mm512_maskz_loadu_ps(mask, x[i].add(c));
                for r in 0..R {
                    acc[i][r][0] = _mm512_fmadd_ps(wv[r], xv, acc[i][r][0]);
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

/// `out[(r - r0) * M + i] = x[i] · w[r]` over the operands' column range.
#[inline(always)]
unsafe fn rows_m<T: Elem, const M: usize, const U: usize>(
    p: &Operands<'_, T>,
    r0: usize,
    out: &mut [f32],
) {
    let k = p.k;
    let xs: [&[f32]; M] = std::array::from_fn(|i| &p.x[i * p.ldx..i * p.ldx + k]);
    let rows = out.len() / M;
    let row = |j: usize| {
        let at = (r0 + j) * p.ld + p.c0;
        &p.w[at..at + k]
    };
    let mut j = 0;
    if M >= 4 {
        while j + 2 <= rows {
            // SAFETY: the caller's contract (CPU features); the slices bound every read.
            unsafe {
                row_dots::<T, M, 2, 1>(&xs, [row(j), row(j + 1)], &mut out[j * M..(j + 2) * M])
            };
            j += 2;
        }
    }
    while j < rows {
        // SAFETY: the caller's contract (CPU features); the slices bound every read.
        unsafe { row_dots::<T, M, 1, U>(&xs, [row(j)], &mut out[j * M..(j + 1) * M]) };
        j += 1;
    }
}

/// `out[(r - r0) * m + i] = x[i] · w[r]` for the rows `r0..r0 + out.len() / m` of `w`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn block<T: Elem>(p: &Operands<'_, T>, r0: usize, out: &mut [f32]) {
    // SAFETY: this function's contract.
    unsafe {
        match p.m {
            1 => rows_m::<T, 1, 4>(p, r0, out),
            2 => rows_m::<T, 2, 2>(p, r0, out),
            3 => rows_m::<T, 3, 2>(p, r0, out),
            4 => rows_m::<T, 4, 1>(p, r0, out),
            5 => rows_m::<T, 5, 1>(p, r0, out),
            6 => rows_m::<T, 6, 1>(p, r0, out),
            7 => rows_m::<T, 7, 1>(p, r0, out),
            8 => rows_m::<T, 8, 1>(p, r0, out),
            // Callers pass 1..=MAX_ROWS rows.
            m => unreachable!("gemv block with {m} rows"),
        }
    }
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
                let m: __mmask16 = u16::MAX >> (L - cw);
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
