//! Explicit f32 SIMD for the fused kernels.
//!
//! The kernels are generic over [`Simd`] and run with [`Avx2`] (AVX2 + FMA intrinsics,
//! chosen at run time) or [`Portable`] (plain array loops, any CPU). Explicit vectors
//! rather than auto-vectorisation because LLVM's SLP vectoriser gives up on the `exp`
//! polynomial's bit tricks (the loops came out scalar), and because our crate is built at
//! opt-level 1 in dev, where nothing auto-vectorises.
//!
//! The lane count is the trait's parameter, 8 unless named: most kernels are written for
//! 8 lanes (one AVX2 register); the selective scan, whose per-state `exp` is most of its
//! work, and the causal conv are generic over it and also run 16 lanes wide with
//! [`Avx512`].
//!
//! `with_simd!` defines a kernel entry point that calls its generic body inside an
//! `#[target_feature(enable = "avx2,fma")]` function, so that the `#[inline(always)]`
//! methods below and the intrinsics they call are compiled into straight AVX2 code.

use half::bf16;

/// Channels per SIMD block of the 8-lane kernels (one AVX2 register of f32).
pub(crate) const W: usize = 8;

/// One value per channel of a block (the storage form of a vector).
pub(crate) type Lanes = [f32; W];

/// `K` × f32 vector operations. Methods take `self` (a zero-sized token) so that an
/// implementation can only be used once its CPU features are known to exist.
pub(crate) trait Simd<const K: usize = W>: Copy + Send + Sync {
    type V: Copy;

    fn splat(self, x: f32) -> Self::V;
    fn load_lanes(self, l: &[f32; K]) -> Self::V;
    fn to_lanes(self, v: Self::V) -> [f32; K];
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c` (fused where the hardware has it).
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `if a > b { a } else { b }`: NaN in `b` is returned, as x86 `maxps` does.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// `if a < b { a } else { b }`: NaN in `b` is returned, as x86 `minps` does.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    fn abs(self, a: Self::V) -> Self::V;
    /// Lane-wise `if a > b { x } else { y }`.
    fn select_gt(self, a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// `2^k` for lanes holding integers in [-126, 127].
    fn pow2i(self, k: Self::V) -> Self::V;
    /// Sum of the lanes.
    fn hsum(self, v: Self::V) -> f32;
    /// `K` bf16 values widened to f32. Exact: a bf16 is the upper half of an f32's bits.
    fn widen_bf16(self, l: &[bf16; K]) -> Self::V;
    /// Asks for the cache line holding `p` (a hint: never faults, any address).
    fn prefetch<T>(self, p: *const T);

    #[inline(always)]
    fn zero(self) -> Self::V {
        self.splat(0.0)
    }

    /// `x · 2^k` for lanes of `k` holding integers in [-126, 127].
    #[inline(always)]
    fn scale2(self, x: Self::V, k: Self::V) -> Self::V {
        self.mul(x, self.pow2i(k))
    }

    /// `x` rounded to the nearest integer (ties to even), for |x| < 2^22.
    #[inline(always)]
    fn round(self, x: Self::V) -> Self::V {
        let magic = self.splat(EXP_MAGIC);
        self.sub(self.add(x, magic), magic)
    }

    /// `e^x` to about 2 ulp for x ∈ [-87.3, 88.3]; below, the result stays at ~1e-38
    /// instead of going subnormal; above, x is clamped; NaN stays NaN.
    #[inline(always)]
    fn exp(self, x: Self::V) -> Self::V {
        // Operand order keeps NaN (max/min return their second operand on NaN).
        let x = self.min(
            self.splat(EXP_RANGE.1),
            self.max(self.splat(EXP_RANGE.0), x),
        );
        let t = self.mul_add(
            x,
            self.splat(std::f32::consts::LOG2_E),
            self.splat(EXP_MAGIC),
        );
        let k = self.sub(t, self.splat(EXP_MAGIC));
        let r = self.mul_add(k, self.splat(-EXP_LN2_HI), x);
        let r = self.mul_add(k, self.splat(-EXP_LN2_LO), r);
        let mut p = self.splat(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = self.mul_add(p, r, self.splat(*c));
        }
        self.scale2(p, k)
    }

    /// `2^x` to about 2 ulp for x ∈ [-126, 127], clamped to that range (so never
    /// subnormal or infinite); NaN stays NaN. Five operations fewer than [`Simd::exp`]
    /// (no Cody–Waite reduction, one fewer polynomial term, and with AVX-512 `vrndscaleps`
    /// and `vscalefps`): the scan computes its decays `e^(Δ·A)` as `2^(Δ·(A·log2 e))`.
    #[inline(always)]
    fn exp2(self, x: Self::V) -> Self::V {
        let x = self.min(self.splat(127.0), self.max(self.splat(-126.0), x));
        let k = self.round(x);
        let f = self.sub(x, k);
        let mut p = self.splat(EXP2_POLY[0]);
        for c in &EXP2_POLY[1..] {
            p = self.mul_add(p, f, self.splat(*c));
        }
        self.scale2(p, k)
    }

    /// Reads `w ≤ K` values at `src[at..]`, zero-filling the other lanes.
    #[inline(always)]
    fn load(self, src: &[f32], at: usize, w: usize) -> Self::V {
        if w == K
            && let Some(full) = src[at..].first_chunk::<K>()
        {
            return self.load_lanes(full);
        }
        let mut tmp = [0.0; K];
        tmp[..w].copy_from_slice(&src[at..at + w]);
        self.load_lanes(&tmp)
    }

    /// Reads `w ≤ K` bf16 values at `src[at..]` as f32, zero-filling the other lanes.
    #[inline(always)]
    fn load_bf16(self, src: &[bf16], at: usize, w: usize) -> Self::V {
        if w == K
            && let Some(full) = src[at..].first_chunk::<K>()
        {
            return self.widen_bf16(full);
        }
        let mut tmp = [bf16::ZERO; K];
        tmp[..w].copy_from_slice(&src[at..at + w]);
        self.widen_bf16(&tmp)
    }

    /// Writes the first `w ≤ K` lanes of `v` to `dst[at..]`.
    #[inline(always)]
    fn store(self, dst: &mut [f32], at: usize, w: usize, v: Self::V) {
        let l = self.to_lanes(v);
        if w == K
            && let Some(full) = dst[at..].first_chunk_mut::<K>()
        {
            *full = l;
            return;
        }
        dst[at..at + w].copy_from_slice(&l[..w]);
    }
}

/// Plain-array implementation at any lane count: correct on any CPU, used where AVX2+FMA
/// are missing, and the scalar model the vector forms are tested against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

#[inline(always)]
fn map2<const K: usize>(a: [f32; K], b: [f32; K], f: impl Fn(f32, f32) -> f32) -> [f32; K] {
    std::array::from_fn(|i| f(a[i], b[i]))
}

impl<const K: usize> Simd<K> for Portable {
    type V = [f32; K];

    #[inline(always)]
    fn splat(self, x: f32) -> [f32; K] {
        [x; K]
    }
    #[inline(always)]
    fn load_lanes(self, l: &[f32; K]) -> [f32; K] {
        *l
    }
    #[inline(always)]
    fn to_lanes(self, v: [f32; K]) -> [f32; K] {
        v
    }
    #[inline(always)]
    fn add(self, a: [f32; K], b: [f32; K]) -> [f32; K] {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: [f32; K], b: [f32; K]) -> [f32; K] {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: [f32; K], b: [f32; K]) -> [f32; K] {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn div(self, a: [f32; K], b: [f32; K]) -> [f32; K] {
        map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    fn mul_add(self, a: [f32; K], b: [f32; K], c: [f32; K]) -> [f32; K] {
        // Not `f32::mul_add`: without FMA hardware that is a slow libm call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn max(self, a: [f32; K], b: [f32; K]) -> [f32; K] {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, a: [f32; K], b: [f32; K]) -> [f32; K] {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn abs(self, a: [f32; K]) -> [f32; K] {
        a.map(f32::abs)
    }
    #[inline(always)]
    fn select_gt(self, a: [f32; K], b: [f32; K], x: [f32; K], y: [f32; K]) -> [f32; K] {
        std::array::from_fn(|i| if a[i] > b[i] { x[i] } else { y[i] })
    }
    #[inline(always)]
    fn pow2i(self, k: [f32; K]) -> [f32; K] {
        k.map(|k| f32::from_bits(((k as i32).wrapping_add(127) as u32) << 23))
    }
    #[inline(always)]
    fn hsum(self, v: [f32; K]) -> f32 {
        // Pairwise, as the vector forms reduce (halves added lane by lane).
        let mut v = v;
        let mut len = K;
        while len > 1 {
            let half = len / 2;
            for i in 0..half {
                v[i] += v[i + half];
            }
            len = half;
        }
        v[0]
    }
    #[inline(always)]
    fn prefetch<T>(self, _p: *const T) {}
    #[inline(always)]
    fn widen_bf16(self, l: &[bf16; K]) -> [f32; K] {
        std::array::from_fn(|i| f32::from_bits(u32::from(l[i].to_bits()) << 16))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Lanes, Simd, W, bf16};

    /// AVX2 + FMA. The private field means a value exists only after [`Avx2::detect`]
    /// (or inside a function compiled with those features), which is what makes the
    /// `unsafe` intrinsic calls below sound.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, if this CPU has AVX2 and FMA.
        #[inline]
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Self(()))
        }
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx2` value proves the CPU supports
    // AVX2 and FMA; the pointer reads/writes go through `&Lanes` / `&mut Lanes` (8 f32) or
    // `&[bf16; W]` (8 × 2 bytes).
    impl Simd for Avx2 {
        type V = __m256;

        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load_lanes(self, l: &Lanes) -> __m256 {
            unsafe { _mm256_loadu_ps(l.as_ptr()) }
        }
        #[inline(always)]
        fn to_lanes(self, v: __m256) -> Lanes {
            let mut out = [0.0f32; 8];
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
            out
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m256) -> __m256 {
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
        }
        #[inline(always)]
        fn select_gt(self, a: __m256, b: __m256, x: __m256, y: __m256) -> __m256 {
            unsafe { _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) }
        }
        #[inline(always)]
        fn pow2i(self, k: __m256) -> __m256 {
            unsafe {
                let e = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
            }
        }
        #[inline(always)]
        fn hsum(self, v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn prefetch<T>(self, p: *const T) {
            // SAFETY: a prefetch reads nothing architecturally and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
        #[inline(always)]
        fn widen_bf16(self, l: &[bf16; W]) -> __m256 {
            // `bf16` is `repr(transparent)` over `u16`: the array is 16 readable bytes.
            unsafe {
                let h = _mm_loadu_si128(l.as_ptr().cast::<__m128i>());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Simd, bf16};

    /// AVX-512 F/BW/VL, 16 lanes (where [`crate::kernels::avx512::available`]). As with
    /// [`super::Avx2`], a value exists only once the features are known to exist.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// The token, if this CPU has AVX-512 F/BW/VL and `MOLT_AVX512` is not `0`.
        #[inline]
        pub(crate) fn detect() -> Option<Self> {
            crate::kernels::avx512::available().then_some(Self(()))
        }

        /// The token, for code already running under the features' contract.
        ///
        /// # Safety
        /// The CPU has AVX-512 F/BW/VL.
        #[inline(always)]
        pub(crate) unsafe fn assume() -> Self {
            Self(())
        }
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx512` value proves the CPU supports
    // AVX-512 F/BW/VL; the pointer reads/writes go through `&[f32; 16]` / `&[bf16; 16]`.
    impl Simd<16> for Avx512 {
        type V = __m512;

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load_lanes(self, l: &[f32; 16]) -> __m512 {
            unsafe { _mm512_loadu_ps(l.as_ptr()) }
        }
        #[inline(always)]
        fn to_lanes(self, v: __m512) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
            out
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m512) -> __m512 {
            unsafe { _mm512_abs_ps(a) }
        }
        #[inline(always)]
        fn select_gt(self, a: __m512, b: __m512, x: __m512, y: __m512) -> __m512 {
            unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b), y, x) }
        }
        #[inline(always)]
        fn pow2i(self, k: __m512) -> __m512 {
            unsafe {
                let e = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
            }
        }
        #[inline(always)]
        fn scale2(self, x: __m512, k: __m512) -> __m512 {
            unsafe { _mm512_scalef_ps(x, k) }
        }
        #[inline(always)]
        fn round(self, x: __m512) -> __m512 {
            unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x) }
        }
        #[inline(always)]
        fn hsum(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        fn prefetch<T>(self, p: *const T) {
            // SAFETY: a prefetch reads nothing architecturally and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
        #[inline(always)]
        fn widen_bf16(self, l: &[bf16; 16]) -> __m512 {
            // `bf16` is `repr(transparent)` over `u16`: the array is 32 readable bytes.
            unsafe {
                let h = _mm256_loadu_si256(l.as_ptr().cast::<__m256i>());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }
}

/// 1.5·2^23: adding it rounds to an integer.
pub(crate) const EXP_MAGIC: f32 = 12_582_912.0;
/// ln 2 split so that k·LN2_HI is exact (Cody–Waite reduction).
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// The clamp of [`exp`]'s argument.
pub(crate) const EXP_RANGE: (f32, f32) = (-87.3, 88.3);
/// Coefficients of `2^f` for |f| ≤ 1/2 from f^6 down (Horner order): interpolation at the
/// Chebyshev nodes, within 2e-8 (relative) of `2^f` with the coefficients rounded to f32.
pub(crate) const EXP2_POLY: [f32; 7] = [
    1.546_144_5e-4,
    1.340_042_8e-3,
    9.618_057e-3,
    5.550_327e-2,
    0.240_226_5,
    std::f32::consts::LN_2,
    1.0,
];
/// Taylor coefficients of `e^r` from r^7 down (Horner order): for |r| ≤ ln2/2 the
/// truncation error stays below 6e-9 (relative).
pub(crate) const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// [`Simd::exp`].
#[inline(always)]
pub(crate) fn exp<const K: usize, S: Simd<K>>(s: S, x: S::V) -> S::V {
    s.exp(x)
}

/// `ln(1 + x)` for `x ∈ [0, 1]`, to about 1 ulp including tiny `x`: `2·atanh(s)` with
/// `s = x / (2 + x) ≤ 1/3`, so there is no `1 + x` cancellation.
#[inline(always)]
pub(crate) fn log1p_unit<const K: usize, S: Simd<K>>(s: S, x: S::V) -> S::V {
    let q = s.div(x, s.add(s.splat(2.0), x));
    let q2 = s.mul(q, q);
    let mut p = s.splat(2.0 / 15.0);
    for c in [
        2.0 / 13.0,
        2.0 / 11.0,
        2.0 / 9.0,
        2.0 / 7.0,
        2.0 / 5.0,
        2.0 / 3.0,
        2.0,
    ] {
        p = s.mul_add(p, q2, s.splat(c));
    }
    s.mul(q, p)
}

/// PyTorch's softplus (threshold 20): `v` above 20, else `max(v, 0) + log1p(e^-|v|)`.
/// Also returns `e^-|v|`, from which [`softplus_slope`] gets the derivative.
#[inline(always)]
pub(crate) fn softplus<const K: usize, S: Simd<K>>(s: S, v: S::V) -> (S::V, S::V) {
    let e = exp(s, s.sub(s.zero(), s.abs(v)));
    let soft = s.add(s.max(v, s.zero()), log1p_unit(s, e));
    (s.select_gt(v, s.splat(20.0), v, soft), e)
}

/// softplus'(v) = σ(v) (1 above the threshold), from `e = e^-|v|`.
#[inline(always)]
pub(crate) fn softplus_slope<const K: usize, S: Simd<K>>(s: S, v: S::V, e: S::V) -> S::V {
    let inv = s.div(s.splat(1.0), s.add(s.splat(1.0), e));
    let sig = s.select_gt(v, s.zero(), inv, s.mul(e, inv));
    s.select_gt(v, s.splat(20.0), s.splat(1.0), sig)
}

/// The logistic sigmoid.
#[inline(always)]
pub(crate) fn sigmoid<const K: usize, S: Simd<K>>(s: S, z: S::V) -> S::V {
    let one = s.splat(1.0);
    s.div(one, s.add(one, exp(s, s.sub(s.zero(), z))))
}

/// `silu(z) = z·σ(z)`.
#[inline(always)]
pub(crate) fn silu<const K: usize, S: Simd<K>>(s: S, z: S::V) -> S::V {
    s.mul(z, sigmoid(s, z))
}

/// `(silu(z), silu'(z))` with `silu'(z) = σ(z)·(1 + z·(1 − σ(z)))`.
#[inline(always)]
pub(crate) fn silu_and_grad<const K: usize, S: Simd<K>>(s: S, z: S::V) -> (S::V, S::V) {
    let sig = sigmoid(s, z);
    let one = s.splat(1.0);
    (
        s.mul(z, sig),
        s.mul(sig, s.mul_add(z, s.sub(one, sig), one)),
    )
}

/// Defines `fn $name(args) -> ret` that runs `$imp(Avx2, args)` compiled with AVX2+FMA
/// when the CPU has them, else `$imp(Portable, args)`. `$imp` must be `#[inline(always)]`
/// and generic over `S: Simd` (first argument) so its body is compiled per instruction set.
///
/// `with_simd! { wide fn … }` tries `$imp(Avx512, args)` (16 lanes, AVX-512 F/BW/VL) first:
/// for bodies generic over the lane count (`const K: usize, S: Simd<K>`) whose result does
/// not depend on it.
macro_rules! with_simd {
    (wide $(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                $crate::kernels::simd::with_avx512! {
                    fn avx512($($arg: $ty),*) $(-> $ret)? = $imp;
                }
                if let Some(s) = $crate::kernels::simd::Avx512::detect() {
                    return avx512(s, $($arg),*);
                }
            }
            $crate::kernels::simd::with_simd!(@narrow $imp [::<8, _>], $($arg : $ty),* ; $($ret)?)
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $crate::kernels::simd::with_simd!(@narrow $imp [], $($arg : $ty),* ; $($ret)?)
        }
    };
    // The body after any wider form: AVX2 + FMA where the CPU has them, else portable
    // (`$($lanes)*` names the lane count for bodies generic over it).
    (@narrow $imp:ident [$($lanes:tt)*], $($arg:ident : $ty:ty),* ; $($ret:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2(s: $crate::kernels::simd::Avx2, $($arg: $ty),*) $(-> $ret)? {
                $imp(s, $($arg),*)
            }
            if let Some(s) = $crate::kernels::simd::Avx2::detect() {
                // SAFETY: `detect` returned a token, so the CPU supports AVX2 and FMA.
                return unsafe { avx2(s, $($arg),*) };
            }
        }
        $imp $($lanes)* ($crate::kernels::simd::Portable, $($arg),*)
    }};
}
pub(crate) use with_simd;

/// Defines `fn $name(s: Avx512, args) -> ret` (x86-64 only) that runs `$imp(s, args)`
/// compiled with AVX-512 F/BW/VL: the 16-lane instantiation of a generic kernel body, for
/// callers that pick the lane count themselves. The token makes the call safe.
macro_rules! with_avx512 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident;) => {
        $(#[$meta])*
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(s: $crate::kernels::simd::Avx512, $($arg: $ty),*) $(-> $ret)? {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn inner(s: $crate::kernels::simd::Avx512, $($arg: $ty),*) $(-> $ret)? {
                $imp(s, $($arg),*)
            }
            // SAFETY: an `Avx512` token exists only where the CPU has these features.
            unsafe { inner(s, $($arg),*) }
        }
    };
}
pub(crate) use with_avx512;

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / (b.abs() * f32::EPSILON as f64).max(f64::MIN_POSITIVE)
    }

    /// Applies a vector function lane by lane to `xs` with implementation `s`.
    fn apply<const K: usize, S: Simd<K>>(
        s: S,
        xs: &[f32],
        f: impl Fn(S, S::V) -> S::V,
    ) -> Vec<f32> {
        xs.chunks(K)
            .flat_map(|c| {
                let v = f(s, s.load(c, 0, c.len()));
                s.to_lanes(v)[..c.len()].to_vec()
            })
            .collect()
    }

    /// Runs `check` with every implementation this CPU supports.
    fn each_impl(check: impl Fn(&dyn Fn(&[f32], &str) -> Vec<f32>)) {
        let portable = |xs: &[f32], which: &str| eval::<8, _>(Portable, xs, which);
        check(&portable);
        let portable16 = |xs: &[f32], which: &str| eval::<16, _>(Portable, xs, which);
        check(&portable16);
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = Avx2::detect() {
            let avx = move |xs: &[f32], which: &str| eval(a, xs, which);
            check(&avx);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = Avx512::detect() {
            let avx = move |xs: &[f32], which: &str| eval(a, xs, which);
            check(&avx);
        }
    }

    fn eval<const K: usize, S: Simd<K>>(s: S, xs: &[f32], which: &str) -> Vec<f32> {
        match which {
            "exp" => apply(s, xs, exp),
            "exp2" => apply(s, xs, |s, v| s.exp2(v)),
            "log1p" => apply(s, xs, log1p_unit),
            "softplus" => apply(s, xs, |s, v| softplus(s, v).0),
            "slope" => apply(s, xs, |s, v| {
                let (_, e) = softplus(s, v);
                softplus_slope(s, v, e)
            }),
            "silu" => apply(s, xs, silu),
            "dsilu" => apply(s, xs, |s, z| silu_and_grad(s, z).1),
            _ => unreachable!("unknown function {which}"),
        }
    }

    fn grid(lo: f32, hi: f32, step: f32) -> Vec<f32> {
        let mut out = Vec::new();
        let mut x = lo;
        while x < hi {
            out.push(x);
            x += step;
        }
        out
    }

    #[test]
    fn exp_is_within_4_ulp() {
        let xs = grid(-87.0, 88.0, 0.0137);
        each_impl(|f| {
            for (x, got) in xs.iter().zip(f(&xs, "exp")) {
                assert!(ulps(got, (*x as f64).exp()) < 4.0, "exp({x}) = {got}");
            }
            let special = f(&[f32::NAN, -1000.0, 1000.0, 0.0], "exp");
            assert!(special[0].is_nan());
            assert!(special[1] >= 0.0 && special[1] < 1e-37);
            assert!(special[2].is_finite() && special[2] > 1e38);
            assert_eq!(special[3], 1.0);
        });
    }

    #[test]
    fn exp2_is_within_2_ulp() {
        let xs = grid(-126.0, 127.0, 0.00731);
        each_impl(|f| {
            for (x, got) in xs.iter().zip(f(&xs, "exp2")) {
                assert!(ulps(got, (*x as f64).exp2()) < 2.0, "exp2({x}) = {got}");
            }
            let special = f(&[f32::NAN, -1000.0, 1000.0, 0.0, -126.0, 127.0], "exp2");
            assert!(special[0].is_nan());
            assert_eq!(
                special[1..],
                [
                    2f32.powi(-126),
                    2f32.powi(127),
                    1.0,
                    2f32.powi(-126),
                    2f32.powi(127)
                ]
            );
        });
    }

    #[test]
    fn softplus_and_slope_match_f64() {
        let xs = grid(-30.0, 30.0, 0.0173);
        each_impl(|f| {
            for ((x, got), slope) in xs.iter().zip(f(&xs, "softplus")).zip(f(&xs, "slope")) {
                let v = *x as f64;
                let (want, want_slope) = if v > 20.0 {
                    (v, 1.0)
                } else {
                    (v.exp().ln_1p(), 1.0 / (1.0 + (-v).exp()))
                };
                assert!(ulps(got, want) < 4.0, "softplus({x}) = {got}, want {want}");
                assert!(
                    (slope as f64 - want_slope).abs() <= 4e-7 * want_slope,
                    "slope({x}) = {slope}"
                );
            }
            assert!(f(&[f32::NAN], "softplus")[0].is_nan());
        });
    }

    #[test]
    fn log1p_keeps_relative_precision_for_tiny_arguments() {
        let xs = [1e-30f32, 1e-12, 3e-7, 1e-3, 0.25, 0.5, 1.0];
        each_impl(|f| {
            for (x, got) in xs.iter().zip(f(&xs, "log1p")) {
                assert!(ulps(got, (*x as f64).ln_1p()) < 3.0, "log1p({x}) = {got}");
            }
        });
    }

    #[test]
    fn silu_and_its_gradient_match_f64() {
        let xs = grid(-20.0, 20.0, 0.031);
        each_impl(|f| {
            for ((z, v), g) in xs.iter().zip(f(&xs, "silu")).zip(f(&xs, "dsilu")) {
                let zf = *z as f64;
                let sig = 1.0 / (1.0 + (-zf).exp());
                assert!(
                    (v as f64 - zf * sig).abs() <= 1e-6 * (1.0 + (zf * sig).abs()),
                    "silu({z})"
                );
                assert!(
                    (g as f64 - sig * (1.0 + zf * (1.0 - sig))).abs() <= 1e-6,
                    "silu'({z})"
                );
            }
        });
    }

    #[test]
    fn partial_loads_and_stores_touch_only_their_lanes() {
        fn check<S: Simd>(s: S) {
            let src: Vec<f32> = (0..11).map(|i| i as f32).collect();
            let v = s.load(&src, 5, 3);
            assert_eq!(s.to_lanes(v), [5.0, 6.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
            let mut dst = vec![-1.0f32; 11];
            s.store(&mut dst, 7, 3, s.splat(2.0));
            assert_eq!(dst[6..11], [-1.0, 2.0, 2.0, 2.0, -1.0]);
            assert_eq!(s.hsum(s.load(&src, 0, 8)), 28.0);
            // Every bf16 widens to the f32 with the same upper bits, NaN and ±inf included.
            let halves: Vec<bf16> = [0u16, 0x8000, 0x3f80, 0xbf80, 0x7f80, 0xff80, 0x7fc1, 0x0001]
                .iter()
                .chain(&[0x4049, 0x1234, 0xc2f7])
                .map(|&b| bf16::from_bits(b))
                .collect();
            let wide = s.to_lanes(s.load_bf16(&halves, 0, 8));
            for (w, h) in wide.iter().zip(&halves) {
                assert_eq!(w.to_bits(), u32::from(h.to_bits()) << 16);
            }
            let tail = s.to_lanes(s.load_bf16(&halves, 8, 3));
            assert_eq!(tail[..3], [3.140625, halves[9].to_f32(), -123.5]);
            assert_eq!(tail[3..], [0.0; 5]);
        }
        check(Portable);
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = Avx2::detect() {
            check(a);
        }
    }
}
