//! The fused selective scan: a Candle `CustomOp3` over (`u`, `delta`, `rest`), where `rest`
//! packs every other input, so that a single graph node carries all nine gradients.
//!
//! Design:
//! * `u` and `delta` are passed as they are; `z, B, C, A, D, delta_bias, [s0]` are flattened
//!   and concatenated into `rest`, and Candle's `cat`/`reshape` backward hands each its
//!   slice of `rest`'s gradient. (Every graph node between a variable and the op costs two
//!   input-sized buffers in Candle's backward, so the two largest inputs skip the packing.)
//! * Channels are processed in blocks of `K` lanes, one register: 16 with AVX-512, else 8
//!   (AVX2 or portable). With the state stored `[N][K]` per block, every step is lane-wise
//!   (no horizontal sums in the recurrence), for any N. Work is split over batch × groups
//!   of blocks with rayon. The lane count changes which channels share a task and so the
//!   order of the dB / dC sums: results agree across machines to rounding, not bit for bit.
//! * The decays `e^(Δ·A)` (one per state update, most of the scan's work) are computed as
//!   `2^(Δ·A')` with `A' = A·log2 e` formed once per block ([`Simd::exp2`]): a shorter
//!   dependency chain than `exp`. Its argument carries two roundings instead of one (an
//!   absolute error below 2.5e-8 in a decay ≤ 1).
//! * The forward keeps the state only at chunk boundaries (every `CHUNK` steps) in a slot
//!   shared with the op; the backward recomputes each chunk's states from its boundary, then
//!   runs the reverse recurrence over the chunk. Activation memory: boundaries
//!   O(b·E·N·L/CHUNK) plus per-thread scratch O(E-block·N·CHUNK), never O(b·L·E·N).

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::simd::Avx512;
use super::simd::{self, Portable, Simd, with_avx512, with_simd};

/// Time steps between stored states. 64 keeps the backward's per-chunk scratch
/// (2·CHUNK·N·K f32 = 64 KiB at N = 16 and 8 lanes, 128 KiB at 16 lanes) in L2 while making
/// boundaries ~1/64 of the states.
pub(crate) const CHUNK: usize = 64;

/// At most this many parallel tasks per batch row. Fixed (not the thread count) so that
/// the reduction order, hence the result, does not depend on the machine.
const MAX_GROUPS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanDims {
    pub b: usize,
    pub l: usize,
    pub e: usize,
    pub n: usize,
    pub has_z: bool,
    pub has_s0: bool,
    /// Scan from the last time row to the first (Vim's backward branch): scan step `t`
    /// reads and writes row `L-1-t`; states, chunks and the returned last state are in scan
    /// order.
    pub reverse: bool,
}

/// Offsets of each input in the virtual concatenation `[u, delta, rest]`; the backward's
/// output uses exactly this layout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Offsets {
    // u is at 0 and delta at b·L·E.
    pub z: usize,
    pub bm: usize,
    pub cm: usize,
    pub a: usize,
    pub d: usize,
    pub bias: usize,
    pub s0: usize,
    pub total: usize,
}

impl ScanDims {
    /// Blocks of `k` channels.
    fn nblk(&self, k: usize) -> usize {
        self.e.div_ceil(k)
    }

    fn nchunks(&self) -> usize {
        self.l.div_ceil(CHUNK)
    }

    fn groups(&self, k: usize) -> usize {
        self.nblk(k).clamp(1, MAX_GROUPS)
    }

    /// The contiguous run of blocks (of `k` channels) handled by group `g`.
    fn group_blocks(&self, k: usize, g: usize) -> Range<usize> {
        let (nblk, groups) = (self.nblk(k), self.groups(k));
        g * nblk / groups..(g + 1) * nblk / groups
    }

    /// Number of stored states per block: all chunk boundaries (for the backward) or just
    /// the last state.
    fn nslabs(&self, keep_all: bool) -> usize {
        if keep_all { self.nchunks() + 1 } else { 1 }
    }

    /// The time row scan step `t` reads and writes.
    #[inline(always)]
    fn row(&self, t: usize) -> usize {
        if self.reverse { self.l - 1 - t } else { t }
    }

    fn block_width(&self, k: usize, blk: usize) -> usize {
        k.min(self.e - blk * k)
    }

    pub(crate) fn offsets(&self) -> Offsets {
        let ble = self.b * self.l * self.e;
        let bln = self.b * self.l * self.n;
        let z = 2 * ble;
        let bm = z + if self.has_z { ble } else { 0 };
        let cm = bm + bln;
        let a = cm + bln;
        let d = a + self.e * self.n;
        let bias = d + self.e;
        let s0 = bias + self.e;
        let total = s0
            + if self.has_s0 {
                self.b * self.e * self.n
            } else {
                0
            };
        Offsets {
            z,
            bm,
            cm,
            a,
            d,
            bias,
            s0,
            total,
        }
    }
}

/// The packed inputs, as slices.
struct Inputs<'a> {
    u: &'a [f32],
    delta: &'a [f32],
    z: Option<&'a [f32]>,
    bm: &'a [f32],
    cm: &'a [f32],
    a: &'a [f32],
    d: &'a [f32],
    bias: &'a [f32],
    s0: Option<&'a [f32]>,
}

impl<'a> Inputs<'a> {
    fn split(dims: &ScanDims, u: &'a [f32], delta: &'a [f32], rest: &'a [f32]) -> Result<Self> {
        let o = dims.offsets();
        let ble = dims.b * dims.l * dims.e;
        if u.len() != ble || delta.len() != ble || rest.len() != o.total - o.z {
            bail!(
                "selective_scan: u/delta/packed inputs have {}/{}/{} values, expected {ble}/{ble}/{}",
                u.len(),
                delta.len(),
                rest.len(),
                o.total - o.z
            )
        }
        let at = |from: usize, to: usize| &rest[from - o.z..to - o.z];
        Ok(Self {
            u,
            delta,
            z: dims.has_z.then(|| at(o.z, o.bm)),
            bm: at(o.bm, o.cm),
            cm: at(o.cm, o.a),
            a: at(o.a, o.d),
            d: at(o.d, o.bias),
            bias: at(o.bias, o.s0),
            s0: dims.has_s0.then(|| at(o.s0, o.total)),
        })
    }
}

/// Per-channel parameters of one block as vectors (padding lanes are zero, which keeps their
/// state and their gradient contributions at zero).
struct BlockParams<V> {
    e0: usize,
    w: usize,
    /// `[N]`: A[e0 + lane, n].
    a: Vec<V>,
    /// `[N]`: A[e0 + lane, n] · log2 e, the argument of the decays' `exp2`.
    a2: Vec<V>,
    d: V,
    bias: V,
}

#[inline(always)]
fn block_params<const K: usize, S: Simd<K>>(
    s: S,
    inp: &Inputs<'_>,
    dims: &ScanDims,
    blk: usize,
) -> BlockParams<S::V> {
    let (e0, w, n) = (blk * K, dims.block_width(K, blk), dims.n);
    let mut a = vec![[0.0; K]; n];
    for i in 0..w {
        let row = &inp.a[(e0 + i) * n..(e0 + i + 1) * n];
        for (an, &v) in a.iter_mut().zip(row) {
            an[i] = v;
        }
    }
    let a: Vec<S::V> = a.iter().map(|l| s.load_lanes(l)).collect();
    let log2e = s.splat(std::f32::consts::LOG2_E);
    BlockParams {
        e0,
        w,
        a2: a.iter().map(|&v| s.mul(v, log2e)).collect(),
        a,
        d: s.load(inp.d, e0, w),
        bias: s.load(inp.bias, e0, w),
    }
}

/// Initial state of block `bp` of batch row `bi`, as `[N]` vectors.
#[inline(always)]
fn initial_state<const K: usize, S: Simd<K>>(
    s: S,
    inp: &Inputs<'_>,
    dims: &ScanDims,
    bi: usize,
    bp: &BlockParams<S::V>,
) -> Vec<S::V> {
    let mut st = vec![[0.0; K]; dims.n];
    if let Some(s0) = inp.s0 {
        for i in 0..bp.w {
            let base = (bi * dims.e + bp.e0 + i) * dims.n;
            for (sn, &v) in st.iter_mut().zip(&s0[base..base + dims.n]) {
                sn[i] = v;
            }
        }
    }
    st.iter().map(|l| s.load_lanes(l)).collect()
}

/// What one forward task produces for its blocks.
struct FwdOut<const K: usize> {
    /// `[block][L][K]`.
    y: Vec<[f32; K]>,
    /// `[block][slab][N][K]`.
    slabs: Vec<[f32; K]>,
}

#[inline(always)]
fn fwd_task_impl<const K: usize, S: Simd<K>>(
    s: S,
    inp: &Inputs<'_>,
    dims: &ScanDims,
    bi: usize,
    blocks: Range<usize>,
    keep_all: bool,
) -> FwdOut<K> {
    let ScanDims { l, e, n, .. } = *dims;
    let nslabs = dims.nslabs(keep_all);
    let mut out = FwdOut {
        y: Vec::with_capacity(blocks.len() * l),
        slabs: Vec::with_capacity(blocks.len() * nslabs * n),
    };
    for blk in blocks {
        let bp = block_params(s, inp, dims, blk);
        let mut st = initial_state(s, inp, dims, bi, &bp);
        if keep_all {
            out.slabs.extend(st.iter().map(|&v| s.to_lanes(v)));
        }
        for t in 0..l {
            let tr = dims.row(t);
            let row = (bi * l + tr) * e + bp.e0;
            let u = s.load(inp.u, row, bp.w);
            let (dt, _) = simd::softplus(s, s.add(s.load(inp.delta, row, bp.w), bp.bias));
            let du = s.mul(dt, u);
            let brow = (bi * l + tr) * n;
            let (bt, ct) = (&inp.bm[brow..brow + n], &inp.cm[brow..brow + n]);
            let mut y = s.zero();
            for ((sn, &an), (&bv, &cv)) in st.iter_mut().zip(&bp.a2).zip(bt.iter().zip(ct)) {
                let da = s.exp2(s.mul(dt, an));
                *sn = s.mul_add(da, *sn, s.mul(du, s.splat(bv)));
                y = s.mul_add(*sn, s.splat(cv), y);
            }
            y = s.mul_add(bp.d, u, y);
            if let Some(z) = inp.z {
                y = s.mul(y, simd::silu(s, s.load(z, row, bp.w)));
            }
            out.y.push(s.to_lanes(y));
            if keep_all && (t + 1) % CHUNK == 0 && t + 1 < l {
                out.slabs.extend(st.iter().map(|&v| s.to_lanes(v)));
            }
        }
        // The last state (with keep_all and L = 0 it is the initial one, already stored).
        if !keep_all || l > 0 {
            out.slabs.extend(st.iter().map(|&v| s.to_lanes(v)));
        }
    }
    out
}

with_simd! {
    fn fwd_task8(
        inp: &Inputs<'_>,
        dims: &ScanDims,
        bi: usize,
        blocks: Range<usize>,
        keep_all: bool,
    ) -> FwdOut<8> = fwd_task_impl;
}

with_avx512! {
    fn fwd_task16(
        inp: &Inputs<'_>,
        dims: &ScanDims,
        bi: usize,
        blocks: Range<usize>,
        keep_all: bool,
    ) -> FwdOut<16> = fwd_task_impl;
}

/// The states a forward stores (block layout `[b][block][slab][N][lanes]`, flattened), and
/// the block width they were computed with, which the backward must use too.
#[derive(Debug)]
pub(crate) struct Slabs {
    lanes: usize,
    data: Vec<f32>,
}

impl Slabs {
    fn new<const K: usize>(rows: Vec<[f32; K]>) -> Self {
        Self {
            lanes: K,
            data: rows.into_flattened(),
        }
    }

    /// The rows, if they were stored `K` lanes wide.
    fn rows<const K: usize>(&self) -> Option<&[[f32; K]]> {
        (self.lanes == K).then(|| self.data.as_chunks::<K>().0)
    }
}

/// Fused forward. Returns `y` (`[b, L, E]`) and the stored states (all chunk boundaries
/// when `keep_all`, else the last state), 16 lanes wide where AVX-512 runs, else 8.
pub(crate) fn forward(
    dims: &ScanDims,
    u: &[f32],
    delta: &[f32],
    rest: &[f32],
    keep_all: bool,
) -> Result<(Vec<f32>, Slabs)> {
    #[cfg(target_arch = "x86_64")]
    if let Some(s) = Avx512::detect() {
        return forward_lanes(dims, u, delta, rest, keep_all, |inp, d, bi, blocks, all| {
            fwd_task16(s, inp, d, bi, blocks, all)
        });
    }
    forward_lanes(dims, u, delta, rest, keep_all, fwd_task8)
}

/// [`forward`] with blocks of `K` channels, each task run by `task`.
fn forward_lanes<const K: usize>(
    dims: &ScanDims,
    u: &[f32],
    delta: &[f32],
    rest: &[f32],
    keep_all: bool,
    task: impl Fn(&Inputs<'_>, &ScanDims, usize, Range<usize>, bool) -> FwdOut<K> + Sync,
) -> Result<(Vec<f32>, Slabs)> {
    let inp = Inputs::split(dims, u, delta, rest)?;
    let groups = dims.groups(K);
    let tasks: Vec<(usize, usize)> = (0..dims.b)
        .flat_map(|bi| (0..groups).map(move |g| (bi, g)))
        .collect();
    let outs: Vec<FwdOut<K>> = tasks
        .par_iter()
        .map(|&(bi, g)| task(&inp, dims, bi, dims.group_blocks(K, g), keep_all))
        .collect();

    let (l, e) = (dims.l, dims.e);
    let mut y = vec![0.0f32; dims.b * l * e];
    if l * e > 0 {
        y.par_chunks_mut(l * e).enumerate().for_each(|(bi, yb)| {
            for g in 0..groups {
                let out = &outs[bi * groups + g];
                for (lb, blk) in dims.group_blocks(K, g).enumerate() {
                    let (e0, w) = (blk * K, dims.block_width(K, blk));
                    for t in 0..l {
                        Portable.store(yb, dims.row(t) * e + e0, w, out.y[lb * l + t]);
                    }
                }
            }
        });
    }
    let slabs = outs.into_iter().flat_map(|o| o.slabs).collect();
    Ok((y, Slabs::new::<K>(slabs)))
}

/// The last state (`[b, E, N]`, row-major) from the stored states.
pub(crate) fn last_state(dims: &ScanDims, slabs: &Slabs, keep_all: bool) -> Vec<f32> {
    let (e, n, k, nslabs) = (dims.e, dims.n, slabs.lanes, dims.nslabs(keep_all));
    let nblk = dims.nblk(k);
    let mut out = vec![0.0f32; dims.b * e * n];
    for bi in 0..dims.b {
        for blk in 0..nblk {
            let base = ((bi * nblk + blk) * nslabs + nslabs - 1) * n;
            for i in 0..dims.block_width(k, blk) {
                let row = (bi * e + blk * k + i) * n;
                for (ni, o) in out[row..row + n].iter_mut().enumerate() {
                    *o = slabs.data[(base + ni) * k + i];
                }
            }
        }
    }
    out
}

/// Time rows ahead that the backward's recompute asks for its lanes of `u`, `delta`, `z`
/// and the gradient: a task walks one block of channels down rows `E` floats apart, a
/// stride that crosses a page every few rows, where hardware stride prefetchers stop.
const PREFETCH_ROWS: usize = 8;

/// What one backward task produces for its blocks.
struct BwdOut<const K: usize> {
    /// `[block][L][K]` each; `gz` empty without z.
    gu: Vec<[f32; K]>,
    gdelta: Vec<[f32; K]>,
    gz: Vec<[f32; K]>,
    /// `[L][N]` in scan order, summed over this task's channels.
    gb: Vec<f32>,
    gc: Vec<f32>,
    /// `[block][N][K]`, summed over time.
    ga: Vec<[f32; K]>,
    /// `[block]`, summed over time.
    gd: Vec<[f32; K]>,
    gbias: Vec<[f32; K]>,
    /// `[block][N][K]`: gradient of the initial state.
    gs0: Vec<[f32; K]>,
}

#[inline(always)]
fn bwd_task_impl<const K: usize, S: Simd<K>>(
    s: S,
    inp: &Inputs<'_>,
    dims: &ScanDims,
    gy_all: &[f32],
    slabs: &[[f32; K]],
    bi: usize,
    blocks: Range<usize>,
) -> BwdOut<K> {
    let ScanDims { l, e, n, .. } = *dims;
    let (nblk, nslabs, nb) = (dims.nblk(K), dims.nslabs(true), blocks.len());
    let params: Vec<BlockParams<S::V>> = blocks
        .clone()
        .map(|blk| block_params(s, inp, dims, blk))
        .collect();
    let zl = [0.0f32; K];
    let mut o = BwdOut {
        gu: vec![zl; nb * l],
        gdelta: vec![zl; nb * l],
        gz: if inp.z.is_some() {
            vec![zl; nb * l]
        } else {
            Vec::new()
        },
        gb: vec![0.0; l * n],
        gc: vec![0.0; l * n],
        ga: vec![zl; nb * n],
        gd: vec![zl; nb],
        gbias: vec![zl; nb],
        gs0: Vec::new(),
    };
    let z = s.zero();
    // dL/ds carried backwards across chunk boundaries, and dL/dA summed over time, per block.
    let mut carry = vec![z; nb * n];
    let mut ga = vec![z; nb * n];
    // Per-chunk scratch: the state and decay of every step, and per-step lane values.
    let mut ss = vec![z; CHUNK * n];
    let mut das = vec![z; CHUNK * n];
    let (mut dts, mut sigs, mut gys, mut dus, mut us) = (
        vec![z; CHUNK],
        vec![z; CHUNK],
        vec![z; CHUNK],
        vec![z; CHUNK],
        vec![z; CHUNK],
    );
    // Lane-wise partial sums of dB and dC over the blocks, reduced once per chunk.
    let mut gbl = vec![z; CHUNK * n];
    let mut gcl = vec![z; CHUNK * n];
    let mut st = vec![z; n];
    let mut start = vec![z; n];

    for c in (0..dims.nchunks()).rev() {
        let t0 = c * CHUNK;
        let len = CHUNK.min(l - t0);
        gbl[..len * n].fill(z);
        gcl[..len * n].fill(z);
        for (lb, blk) in blocks.clone().enumerate() {
            let bp = &params[lb];
            let slab = &slabs[((bi * nblk + blk) * nslabs + c) * n..][..n];
            for ((sv, st0), l) in st.iter_mut().zip(start.iter_mut()).zip(slab) {
                *sv = s.load_lanes(l);
                *st0 = *sv;
            }
            let (mut gd_acc, mut gbias_acc) = (s.load_lanes(&o.gd[lb]), s.load_lanes(&o.gbias[lb]));

            // Recompute the chunk forward, keeping every state and decay.
            for j in 0..len {
                let t = t0 + j;
                let tr = dims.row(t);
                let row = (bi * l + tr) * e + bp.e0;
                if t + PREFETCH_ROWS < l {
                    let ahead = (bi * l + dims.row(t + PREFETCH_ROWS)) * e + bp.e0;
                    for src in [inp.u, inp.delta, gy_all].into_iter().chain(inp.z) {
                        // A hint: never faults; `ahead` is inside every `[b, L, E]` input.
                        s.prefetch(src.as_ptr().wrapping_add(ahead));
                    }
                }
                let u = s.load(inp.u, row, bp.w);
                let v = s.add(s.load(inp.delta, row, bp.w), bp.bias);
                let (dt, ev) = simd::softplus(s, v);
                let du = s.mul(dt, u);
                let g = s.load(gy_all, row, bp.w);
                // Gradient reaching the SSM output (before the gate), and the gate's slope.
                let (gy, gate) = match inp.z {
                    Some(zs) => {
                        let (sz, dsz) = simd::silu_and_grad(s, s.load(zs, row, bp.w));
                        (s.mul(g, sz), s.mul(g, dsz))
                    }
                    None => (g, z),
                };
                let brow = (bi * l + tr) * n;
                let (bt, ct) = (&inp.bm[brow..brow + n], &inp.cm[brow..brow + n]);
                let mut y = z;
                let steps = ss[j * n..(j + 1) * n]
                    .iter_mut()
                    .zip(&mut das[j * n..(j + 1) * n]);
                let lanes = st.iter_mut().zip(&bp.a2).zip(&mut gcl[j * n..(j + 1) * n]);
                for (((sj, daj), ((sn, &an), gcj)), (&bv, &cv)) in
                    steps.zip(lanes).zip(bt.iter().zip(ct))
                {
                    let da = s.exp2(s.mul(dt, an));
                    *sn = s.mul_add(da, *sn, s.mul(du, s.splat(bv)));
                    y = s.mul_add(*sn, s.splat(cv), y);
                    *gcj = s.mul_add(gy, *sn, *gcj);
                    *sj = *sn;
                    *daj = da;
                }
                if inp.z.is_some() {
                    o.gz[lb * l + t] = s.to_lanes(s.mul(s.mul_add(bp.d, u, y), gate));
                }
                gd_acc = s.mul_add(gy, u, gd_acc);
                (dts[j], sigs[j], gys[j], dus[j], us[j]) =
                    (dt, simd::softplus_slope(s, v, ev), gy, du, u);
            }

            // Reverse recurrence over the chunk.
            let h = &mut carry[lb * n..(lb + 1) * n];
            let gab = &mut ga[lb * n..(lb + 1) * n];
            for j in (0..len).rev() {
                let t = t0 + j;
                let brow = (bi * l + dims.row(t)) * n;
                let (bt, ct) = (&inp.bm[brow..brow + n], &inp.cm[brow..brow + n]);
                let (dt, gy, du, u) = (dts[j], gys[j], dus[j], us[j]);
                let prev = if j > 0 {
                    &ss[(j - 1) * n..j * n]
                } else {
                    &start[..]
                };
                let (mut ddt, mut hb_sum) = (z, z);
                let per_n = h
                    .iter_mut()
                    .zip(gab.iter_mut())
                    .zip(&mut gbl[j * n..(j + 1) * n]);
                let inputs = prev.iter().zip(&das[j * n..(j + 1) * n]).zip(&bp.a);
                for (((hc, gan), gbj), (((&sp, &da), &an), (&bv, &cv))) in
                    per_n.zip(inputs.zip(bt.iter().zip(ct)))
                {
                    // dL/ds_t: the carried part plus this step's read-out.
                    let hn = s.mul_add(gy, s.splat(cv), *hc);
                    let q = s.mul(s.mul(hn, sp), da);
                    ddt = s.mul_add(q, an, ddt);
                    *gan = s.mul_add(q, dt, *gan);
                    let hb = s.mul(hn, s.splat(bv));
                    ddt = s.mul_add(hb, u, ddt);
                    hb_sum = s.add(hb_sum, hb);
                    *gbj = s.mul_add(hn, du, *gbj);
                    *hc = s.mul(hn, da);
                }
                let gdl = s.mul(ddt, sigs[j]);
                gbias_acc = s.add(gbias_acc, gdl);
                o.gu[lb * l + t] = s.to_lanes(s.mul_add(gy, bp.d, s.mul(hb_sum, dt)));
                o.gdelta[lb * l + t] = s.to_lanes(gdl);
            }
            o.gd[lb] = s.to_lanes(gd_acc);
            o.gbias[lb] = s.to_lanes(gbias_acc);
        }
        for j in 0..len {
            let (gb, gc) = (
                &mut o.gb[(t0 + j) * n..][..n],
                &mut o.gc[(t0 + j) * n..][..n],
            );
            for (((b, c), bl), cl) in gb.iter_mut().zip(gc).zip(&gbl[j * n..]).zip(&gcl[j * n..]) {
                *b = s.hsum(*bl);
                *c = s.hsum(*cl);
            }
        }
    }
    o.ga = ga.iter().map(|&v| s.to_lanes(v)).collect();
    o.gs0 = carry.iter().map(|&v| s.to_lanes(v)).collect();
    o
}

with_simd! {
    fn bwd_task8(
        inp: &Inputs<'_>,
        dims: &ScanDims,
        gy_all: &[f32],
        slabs: &[[f32; 8]],
        bi: usize,
        blocks: Range<usize>,
    ) -> BwdOut<8> = bwd_task_impl;
}

with_avx512! {
    fn bwd_task16(
        inp: &Inputs<'_>,
        dims: &ScanDims,
        gy_all: &[f32],
        slabs: &[[f32; 16]],
        bi: usize,
        blocks: Range<usize>,
    ) -> BwdOut<16> = bwd_task_impl;
}

/// Fused backward: the gradient of `sum(y · grad_y)` w.r.t. `[u, delta, rest]` (one buffer,
/// laid out as `ScanDims::offsets`), from the chunk-boundary states saved by
/// `forward(.., keep_all = true)`.
pub(crate) fn backward(
    dims: &ScanDims,
    u: &[f32],
    delta: &[f32],
    rest: &[f32],
    grad_y: &[f32],
    slabs: &Slabs,
) -> Result<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), Some(rows)) = (Avx512::detect(), slabs.rows::<16>()) {
        let task = |inp: &Inputs<'_>, d: &ScanDims, g: &[f32], r: &[[f32; 16]], bi, blocks| {
            bwd_task16(s, inp, d, g, r, bi, blocks)
        };
        return backward_lanes(dims, u, delta, rest, grad_y, rows, task);
    }
    let Some(rows) = slabs.rows::<8>() else {
        bail!(
            "selective_scan backward: the states were stored {} lanes wide, which this CPU's kernels do not read",
            slabs.lanes
        )
    };
    backward_lanes(dims, u, delta, rest, grad_y, rows, bwd_task8)
}

/// [`backward`] with blocks of `K` channels, each task run by `task`.
fn backward_lanes<const K: usize>(
    dims: &ScanDims,
    u: &[f32],
    delta: &[f32],
    rest: &[f32],
    grad_y: &[f32],
    slabs: &[[f32; K]],
    task: impl Fn(&Inputs<'_>, &ScanDims, &[f32], &[[f32; K]], usize, Range<usize>) -> BwdOut<K> + Sync,
) -> Result<Vec<f32>> {
    let inp = Inputs::split(dims, u, delta, rest)?;
    let ScanDims { b, l, e, n, .. } = *dims;
    if grad_y.len() != b * l * e {
        bail!(
            "selective_scan backward: grad of y has {} values, expected {}",
            grad_y.len(),
            b * l * e
        )
    }
    let want_slabs = b * dims.nblk(K) * dims.nslabs(true) * n;
    if slabs.len() != want_slabs {
        bail!(
            "selective_scan backward: {} saved state rows, expected {want_slabs} (was the forward run without gradient tracking?)",
            slabs.len()
        )
    }
    let groups = dims.groups(K);
    let tasks: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..groups).map(move |g| (bi, g)))
        .collect();
    let outs: Vec<BwdOut<K>> = tasks
        .par_iter()
        .map(|&(bi, g)| task(&inp, dims, grad_y, slabs, bi, dims.group_blocks(K, g)))
        .collect();

    let o = dims.offsets();
    let mut grads = vec![0.0f32; o.total];
    let (g_ble, rest) = grads.split_at_mut(o.bm);
    let (g_bm, rest) = rest.split_at_mut(o.cm - o.bm);
    let (g_cm, rest) = rest.split_at_mut(o.a - o.cm);
    let (g_a, rest) = rest.split_at_mut(o.d - o.a);
    let (g_d, rest) = rest.split_at_mut(o.bias - o.d);
    let (g_bias, g_s0) = rest.split_at_mut(o.s0 - o.bias);

    // u, delta, z: scatter the block-major results into [b, L, E].
    let per_input = b * l * e;
    if l * e > 0 {
        for (k, dst) in g_ble.chunks_mut(per_input).enumerate() {
            dst.par_chunks_mut(l * e).enumerate().for_each(|(bi, db)| {
                for g in 0..groups {
                    let out = &outs[bi * groups + g];
                    let src = match k {
                        0 => &out.gu,
                        1 => &out.gdelta,
                        _ => &out.gz,
                    };
                    for (lb, blk) in dims.group_blocks(K, g).enumerate() {
                        let (e0, w) = (blk * K, dims.block_width(K, blk));
                        for t in 0..l {
                            Portable.store(db, dims.row(t) * e + e0, w, src[lb * l + t]);
                        }
                    }
                }
            });
        }
    }
    // B, C: sum the per-group partials (fixed order).
    for bi in 0..b {
        for g in 0..groups {
            let out = &outs[bi * groups + g];
            for t in 0..l {
                let (at, from) = ((bi * l + dims.row(t)) * n, t * n);
                for (dst, src) in g_bm[at..at + n].iter_mut().zip(&out.gb[from..from + n]) {
                    *dst += src;
                }
                for (dst, src) in g_cm[at..at + n].iter_mut().zip(&out.gc[from..from + n]) {
                    *dst += src;
                }
            }
        }
    }
    // A, D, delta_bias: sum over the batch; initial state: transpose back to [b, E, N].
    for bi in 0..b {
        for g in 0..groups {
            let out = &outs[bi * groups + g];
            for (lb, blk) in dims.group_blocks(K, g).enumerate() {
                let (e0, w) = (blk * K, dims.block_width(K, blk));
                for i in 0..w {
                    let ch = e0 + i;
                    for ni in 0..n {
                        g_a[ch * n + ni] += out.ga[lb * n + ni][i];
                    }
                    g_d[ch] += out.gd[lb][i];
                    g_bias[ch] += out.gbias[lb][i];
                    if dims.has_s0 {
                        let row = (bi * e + ch) * n;
                        for ni in 0..n {
                            g_s0[row + ni] = out.gs0[lb * n + ni][i];
                        }
                    }
                }
            }
        }
    }
    Ok(grads)
}

/// Reads a contiguous f32 CPU buffer, or fails naming `what`.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: expected an F32 tensor, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// The scan as a custom op over (`u`, `delta`, packed rest); produces `y` `[b, L, E]`.
pub(crate) struct ScanOp {
    pub dims: ScanDims,
    /// Whether to keep chunk-boundary states for the backward (only when autograd tracks).
    pub keep_all: bool,
    /// States saved by the forward, in block layout; read by the backward and by the caller
    /// (the last state).
    pub saved: Arc<OnceLock<Slabs>>,
}

impl CustomOp3 for ScanOp {
    fn name(&self) -> &'static str {
        "molt-selective-scan"
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
        let u = f32_slice(s1, l1, "selective_scan (u)")?;
        let delta = f32_slice(s2, l2, "selective_scan (delta)")?;
        let rest = f32_slice(s3, l3, "selective_scan (packed inputs)")?;
        let (y, slabs) = forward(&self.dims, u, delta, rest, self.keep_all)?;
        if self.saved.set(slabs).is_err() {
            bail!("selective_scan: the op was run twice")
        }
        let ScanDims { b, l, e, .. } = self.dims;
        Ok((CpuStorage::F32(y), Shape::from((b, l, e))))
    }

    /// On CUDA the states stay on the device: the output is `[y | states]` (flat, see
    /// `cuda::scan_fwd`), which the caller splits and the backward receives as `res`.
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
        super::cuda::scan_fwd(&self.dims, self.keep_all, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        u: &Tensor,
        delta: &Tensor,
        rest: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let op = ScanGradOp {
            dims: self.dims,
            saved: self.saved.clone(),
            grad,
            res: res.clone(),
        };
        let g = u.apply_op3_no_bwd(delta, rest, &op)?;
        let ScanDims { b, l, e, .. } = self.dims;
        let n_rest = g.dim(0)? - 2 * b * l * e;
        let [g_u, g_delta, g_rest] = super::unpack(&g, [&[b, l, e], &[b, l, e], &[n_rest]])?;
        // The grads are f32; on CUDA u and delta may be f16/bf16 (`rest` is always f32).
        Ok((
            Some(g_u.to_dtype(u.dtype())?),
            Some(g_delta.to_dtype(delta.dtype())?),
            Some(g_rest),
        ))
    }
}

/// The backward as a (non-differentiable) custom op over (`u`, `delta`, rest) → their
/// gradients, concatenated. A custom op has at most three inputs, so the gradient of `y`
/// travels in the op itself and is read through its storage lock.
struct ScanGradOp {
    dims: ScanDims,
    saved: Arc<OnceLock<Slabs>>,
    grad: Tensor,
    /// The forward's output; on CUDA it carries the chunk-boundary states.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    res: Tensor,
}

impl CustomOp3 for ScanGradOp {
    fn name(&self) -> &'static str {
        "molt-selective-scan-grad"
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
        let u = f32_slice(s1, l1, "selective_scan backward (u)")?;
        let delta = f32_slice(s2, l2, "selective_scan backward (delta)")?;
        let rest = f32_slice(s3, l3, "selective_scan backward (packed inputs)")?;
        let (guard, layout) = self.grad.storage_and_layout();
        let Storage::Cpu(grad) = &*guard else {
            bail!("selective_scan backward: the grad of y is not on the CPU")
        };
        let grad_y = f32_slice(grad, layout, "selective_scan backward (grad of y)")?;
        let Some(slabs) = self.saved.get() else {
            bail!("selective_scan backward: the forward saved no states")
        };
        let grads = backward(&self.dims, u, delta, rest, grad_y, slabs)?;
        let len = grads.len();
        Ok((CpuStorage::F32(grads), Shape::from(len)))
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
        let (grad, grad_layout) = self.grad.storage_and_layout();
        let Storage::Cuda(grad) = &*grad else {
            bail!("selective_scan backward: the grad of y is not on the GPU")
        };
        let (res, res_layout) = self.res.storage_and_layout();
        let Storage::Cuda(res) = &*res else {
            bail!("selective_scan backward: the saved states are not on the GPU")
        };
        super::cuda::scan_bwd(
            &self.dims,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
            (grad, grad_layout),
            (res, res_layout),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close<const K: usize>(what: &str, a: &[[f32; K]], b: &[[f32; K]]) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        let scale = b.iter().flatten().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().flatten().zip(b.iter().flatten()).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * scale + 1e-4 * y.abs(),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Runs every forward and backward task with both implementations and compares them.
    fn compare<const K: usize, P: Simd<K>, Q: Simd<K>>(p: P, q: Q) {
        for (b, l, e, n, has_z, has_s0, reverse) in [
            (2, 70, 19, 4, true, true, false),
            (1, 5, 3, 16, false, false, false),
            (2, 70, 19, 4, true, false, true),
        ] {
            let dims = ScanDims {
                b,
                l,
                e,
                n,
                has_z,
                has_s0,
                reverse,
            };
            let o = dims.offsets();
            let (u, delta) = (noise(b * l * e, 1), noise(b * l * e, 2));
            let mut rest = noise(o.total - o.z, 3);
            // A (at o.a in the virtual layout) must be negative.
            for v in &mut rest[o.a - o.z..o.d - o.z] {
                *v = -1.0 - 4.0 * v.abs();
            }
            let grad = noise(b * l * e, 4);
            let inp = Inputs::split(&dims, &u, &delta, &rest).unwrap();
            let tasks: Vec<(usize, Range<usize>)> = (0..b)
                .flat_map(|bi| (0..dims.groups(K)).map(move |g| (bi, g)))
                .map(|(bi, g)| (bi, dims.group_blocks(K, g)))
                .collect();
            let mut slabs = Vec::new();
            for (bi, blocks) in &tasks {
                let x = fwd_task_impl(p, &inp, &dims, *bi, blocks.clone(), true);
                let y = fwd_task_impl(q, &inp, &dims, *bi, blocks.clone(), true);
                close("y", &x.y, &y.y);
                close("states", &x.slabs, &y.slabs);
                slabs.extend(y.slabs);
            }
            let as_lanes = |v: &[f32]| -> Vec<[f32; K]> {
                v.chunks(K)
                    .map(|c| std::array::from_fn(|i| c.get(i).copied().unwrap_or(0.0)))
                    .collect()
            };
            for (bi, blocks) in &tasks {
                let x = bwd_task_impl(p, &inp, &dims, &grad, &slabs, *bi, blocks.clone());
                let y = bwd_task_impl(q, &inp, &dims, &grad, &slabs, *bi, blocks.clone());
                close("du", &x.gu, &y.gu);
                close("ddelta", &x.gdelta, &y.gdelta);
                close("dz", &x.gz, &y.gz);
                close("dA", &x.ga, &y.ga);
                close("dD", &x.gd, &y.gd);
                close("dbias", &x.gbias, &y.gbias);
                close("ds0", &x.gs0, &y.gs0);
                close("dB", &as_lanes(&x.gb), &as_lanes(&y.gb));
                close("dC", &as_lanes(&x.gc), &as_lanes(&y.gc));
            }
        }
    }

    /// The portable instantiations against the AVX2 and AVX-512 ones (which the
    /// integration tests check against the reference), task by task.
    #[test]
    fn portable_and_vector_kernels_agree() {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = simd::Avx2::detect();
            if let Some(avx) = avx2 {
                compare(Portable, avx);
            }
            if let Some(avx) = Avx512::detect() {
                compare(Portable, avx);
            }
            if avx2.is_some() {
                return;
            }
        }
        // Without vector units, at least run the portable tasks end to end.
        compare::<8, _, _>(Portable, Portable);
    }

    /// The whole forward and backward at 16 and at 8 lanes (different task splits and sum
    /// orders) agree, and the stored states remember their width.
    #[test]
    fn lane_counts_agree() {
        let dims = ScanDims {
            b: 2,
            l: 131,
            e: 37,
            n: 5,
            has_z: true,
            has_s0: true,
            reverse: true,
        };
        let o = dims.offsets();
        let ble = dims.b * dims.l * dims.e;
        let (u, delta, grad) = (noise(ble, 5), noise(ble, 6), noise(ble, 7));
        let mut rest = noise(o.total - o.z, 8);
        for v in &mut rest[o.a - o.z..o.d - o.z] {
            *v = -0.5 - 3.0 * v.abs();
        }
        let run = |wide: bool| {
            let (y, slabs) = if wide {
                forward_lanes(&dims, &u, &delta, &rest, true, |i, d, bi, blk, all| {
                    fwd_task_impl::<16, _>(Portable, i, d, bi, blk, all)
                })
            } else {
                forward_lanes(&dims, &u, &delta, &rest, true, fwd_task8)
            }
            .unwrap();
            assert_eq!(slabs.lanes, if wide { 16 } else { 8 });
            let last = last_state(&dims, &slabs, true);
            let g = match slabs.rows::<16>() {
                Some(rows) => backward_lanes(
                    &dims,
                    &u,
                    &delta,
                    &rest,
                    &grad,
                    rows,
                    |i, d, g, r, bi, blk| bwd_task_impl::<16, _>(Portable, i, d, g, r, bi, blk),
                ),
                None => backward(&dims, &u, &delta, &rest, &grad, &slabs),
            }
            .unwrap();
            [y, last, g]
        };
        let (wide, narrow) = (run(true), run(false));
        for (what, (a, b)) in ["y", "last state", "grads"]
            .iter()
            .zip(wide.iter().zip(&narrow))
        {
            assert_eq!(a.len(), b.len(), "{what}");
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 2e-6 * scale + 1e-5 * y.abs(),
                    "{what}[{i}]: {x} vs {y}"
                );
            }
        }
    }
}
