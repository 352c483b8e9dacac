//! Explicit 8-lane f32 SIMD for the fused kernels.
//!
//! The kernels are generic over [`Simd`] and run with [`Avx2`] (AVX2 + FMA intrinsics,
//! chosen at run time) or [`Portable`] (plain `[f32; 8]` loops, any CPU). Explicit vectors
//! rather than auto-vectorisation because LLVM's SLP vectoriser gives up on the `exp`
//! polynomial's bit tricks (the loops came out scalar), and because our crate is built at
//! opt-level 1 in dev, where nothing auto-vectorises.
//!
//! `with_simd!` defines a kernel entry point that calls its generic body inside an
//! `#[target_feature(enable = "avx2,fma")]` function, so that the `#[inline(always)]`
//! methods below and the intrinsics they call are compiled into straight AVX2 code.

use half::bf16;

/// Channels per SIMD block (one AVX2 register of f32).
pub(crate) const W: usize = 8;

/// One value per channel of a block (the storage form of a vector).
pub(crate) type Lanes = [f32; W];

/// 8 × f32 vector operations. Methods take `self` (a zero-sized token) so that an
/// implementation can only be used once its CPU features are known to exist.
pub(crate) trait Simd: Copy + Send + Sync {
    type V: Copy;

    fn splat(self, x: f32) -> Self::V;
    fn load_lanes(self, l: &Lanes) -> Self::V;
    fn to_lanes(self, v: Self::V) -> Lanes;
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
    /// Eight bf16 values widened to f32. Exact: a bf16 is the upper half of an f32's bits.
    fn widen_bf16(self, l: &[bf16; W]) -> Self::V;
    /// Asks for the cache line holding `p` (a hint: never faults, any address).
    fn prefetch<T>(self, p: *const T);

    #[inline(always)]
    fn zero(self) -> Self::V {
        self.splat(0.0)
    }

    /// Reads `w ≤ W` values at `src[at..]`, zero-filling the other lanes.
    #[inline(always)]
    fn load(self, src: &[f32], at: usize, w: usize) -> Self::V {
        if w == W
            && let Some(full) = src[at..].first_chunk::<W>()
        {
            return self.load_lanes(full);
        }
        let mut tmp = [0.0; W];
        tmp[..w].copy_from_slice(&src[at..at + w]);
        self.load_lanes(&tmp)
    }

    /// Reads `w ≤ W` bf16 values at `src[at..]` as f32, zero-filling the other lanes.
    #[inline(always)]
    fn load_bf16(self, src: &[bf16], at: usize, w: usize) -> Self::V {
        if w == W
            && let Some(full) = src[at..].first_chunk::<W>()
        {
            return self.widen_bf16(full);
        }
        let mut tmp = [bf16::ZERO; W];
        tmp[..w].copy_from_slice(&src[at..at + w]);
        self.widen_bf16(&tmp)
    }

    /// Writes the first `w ≤ W` lanes of `v` to `dst[at..]`.
    #[inline(always)]
    fn store(self, dst: &mut [f32], at: usize, w: usize, v: Self::V) {
        let l = self.to_lanes(v);
        if w == W
            && let Some(full) = dst[at..].first_chunk_mut::<W>()
        {
            *full = l;
            return;
        }
        dst[at..at + w].copy_from_slice(&l[..w]);
    }
}

/// Plain-array implementation: correct on any CPU, used where AVX2+FMA are missing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

#[inline(always)]
fn map2(a: Lanes, b: Lanes, f: impl Fn(f32, f32) -> f32) -> Lanes {
    std::array::from_fn(|i| f(a[i], b[i]))
}

impl Simd for Portable {
    type V = Lanes;

    #[inline(always)]
    fn splat(self, x: f32) -> Lanes {
        [x; W]
    }
    #[inline(always)]
    fn load_lanes(self, l: &Lanes) -> Lanes {
        *l
    }
    #[inline(always)]
    fn to_lanes(self, v: Lanes) -> Lanes {
        v
    }
    #[inline(always)]
    fn add(self, a: Lanes, b: Lanes) -> Lanes {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: Lanes, b: Lanes) -> Lanes {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: Lanes, b: Lanes) -> Lanes {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn div(self, a: Lanes, b: Lanes) -> Lanes {
        map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    fn mul_add(self, a: Lanes, b: Lanes, c: Lanes) -> Lanes {
        // Not `f32::mul_add`: without FMA hardware that is a slow libm call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn max(self, a: Lanes, b: Lanes) -> Lanes {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, a: Lanes, b: Lanes) -> Lanes {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn abs(self, a: Lanes) -> Lanes {
        a.map(f32::abs)
    }
    #[inline(always)]
    fn select_gt(self, a: Lanes, b: Lanes, x: Lanes, y: Lanes) -> Lanes {
        std::array::from_fn(|i| if a[i] > b[i] { x[i] } else { y[i] })
    }
    #[inline(always)]
    fn pow2i(self, k: Lanes) -> Lanes {
        k.map(|k| f32::from_bits(((k as i32).wrapping_add(127) as u32) << 23))
    }
    #[inline(always)]
    fn hsum(self, v: Lanes) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
    #[inline(always)]
    fn prefetch<T>(self, _p: *const T) {}
    #[inline(always)]
    fn widen_bf16(self, l: &[bf16; W]) -> Lanes {
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

/// 1.5·2^23: adding it rounds to an integer.
pub(crate) const EXP_MAGIC: f32 = 12_582_912.0;
/// ln 2 split so that k·LN2_HI is exact (Cody–Waite reduction).
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// The clamp of [`exp`]'s argument.
pub(crate) const EXP_RANGE: (f32, f32) = (-87.3, 88.3);
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

/// `e^x` to about 2 ulp for x ∈ [-87.3, 88.3]; below, the result stays at ~1e-38 instead
/// of going subnormal; above, x is clamped; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    // Operand order keeps NaN (max/min return their second operand on NaN).
    let x = s.min(s.splat(EXP_RANGE.1), s.max(s.splat(EXP_RANGE.0), x));
    let t = s.mul_add(x, s.splat(std::f32::consts::LOG2_E), s.splat(EXP_MAGIC));
    let k = s.sub(t, s.splat(EXP_MAGIC));
    let r = s.mul_add(k, s.splat(-EXP_LN2_HI), x);
    let r = s.mul_add(k, s.splat(-EXP_LN2_LO), r);
    let mut p = s.splat(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = s.mul_add(p, r, s.splat(*c));
    }
    s.mul(p, s.pow2i(k))
}

/// `ln(1 + x)` for `x ∈ [0, 1]`, to about 1 ulp including tiny `x`: `2·atanh(s)` with
/// `s = x / (2 + x) ≤ 1/3`, so there is no `1 + x` cancellation.
#[inline(always)]
pub(crate) fn log1p_unit<S: Simd>(s: S, x: S::V) -> S::V {
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
pub(crate) fn softplus<S: Simd>(s: S, v: S::V) -> (S::V, S::V) {
    let e = exp(s, s.sub(s.zero(), s.abs(v)));
    let soft = s.add(s.max(v, s.zero()), log1p_unit(s, e));
    (s.select_gt(v, s.splat(20.0), v, soft), e)
}

/// softplus'(v) = σ(v) (1 above the threshold), from `e = e^-|v|`.
#[inline(always)]
pub(crate) fn softplus_slope<S: Simd>(s: S, v: S::V, e: S::V) -> S::V {
    let inv = s.div(s.splat(1.0), s.add(s.splat(1.0), e));
    let sig = s.select_gt(v, s.zero(), inv, s.mul(e, inv));
    s.select_gt(v, s.splat(20.0), s.splat(1.0), sig)
}

/// The logistic sigmoid.
#[inline(always)]
pub(crate) fn sigmoid<S: Simd>(s: S, z: S::V) -> S::V {
    let one = s.splat(1.0);
    s.div(one, s.add(one, exp(s, s.sub(s.zero(), z))))
}

/// `silu(z) = z·σ(z)`.
#[inline(always)]
pub(crate) fn silu<S: Simd>(s: S, z: S::V) -> S::V {
    s.mul(z, sigmoid(s, z))
}

/// `(silu(z), silu'(z))` with `silu'(z) = σ(z)·(1 + z·(1 − σ(z)))`.
#[inline(always)]
pub(crate) fn silu_and_grad<S: Simd>(s: S, z: S::V) -> (S::V, S::V) {
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
macro_rules! with_simd {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
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
            $imp($crate::kernels::simd::Portable, $($arg),*)
        }
    };
}
pub(crate) use with_simd;

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / (b.abs() * f32::EPSILON as f64).max(f64::MIN_POSITIVE)
    }

    /// Applies a vector function lane by lane to `xs` with implementation `s`.
    fn apply<S: Simd>(s: S, xs: &[f32], f: impl Fn(S, S::V) -> S::V) -> Vec<f32> {
        xs.chunks(W)
            .flat_map(|c| {
                let v = f(s, s.load(c, 0, c.len()));
                s.to_lanes(v)[..c.len()].to_vec()
            })
            .collect()
    }

    /// Runs `check` with every implementation this CPU supports.
    fn each_impl(check: impl Fn(&dyn Fn(&[f32], &str) -> Vec<f32>)) {
        let portable = |xs: &[f32], which: &str| eval(Portable, xs, which);
        check(&portable);
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = Avx2::detect() {
            let avx = move |xs: &[f32], which: &str| eval(a, xs, which);
            check(&avx);
        }
    }

    fn eval<S: Simd>(s: S, xs: &[f32], which: &str) -> Vec<f32> {
        match which {
            "exp" => apply(s, xs, exp),
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
