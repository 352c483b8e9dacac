//! Mamba's two sequence kernels — the selective scan and the causal depthwise conv1d — and
//! their single-token decode steps.
//!
//! Layout: everything is channels-last, as the model produces it, so the model never
//! transposes: `u`, `delta`, `z` are `[b, L, E]`; `B`, `C` are `[b, L, N]`; `A` is `[E, N]`
//! (already negative, `-exp(A_log)`); `D`, `delta_bias` are `[E]`; states are `[b, E, N]`
//! (SSM) and `[b, E, K]` (conv, the last K inputs, oldest first).
//!
//! On CPU these are fused kernels (Candle custom ops with their own backward, see `scan`
//! and `conv`); they compute in f32 whatever the input dtype, return outputs in the input's
//! dtype and states in F32. With the `cuda` feature the same ops run CUDA kernels on CUDA
//! devices (see `cuda`; the large inputs may stay f16/bf16 there, the math is f32). On other
//! devices they fall back to `reference`, which holds the same functions written as plain
//! Candle ops: slow, obviously right, and what the fused kernels are tested against.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod bench;
mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod decode;
pub(crate) mod decode_ssd;
pub mod gemv;
mod norm;
pub mod reference;
mod scan;
mod simd;
mod ssd;
mod step;

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Result, Tensor, bail};

/// Whether the fused kernels run on `dev`: always on CPU, on CUDA when built with `cuda`.
fn fused(dev: &Device) -> bool {
    dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda())
}

/// The largest state size N with a CUDA scan kernel (the state lives in registers); larger
/// N on a GPU runs through `reference`.
const CUDA_MAX_N: usize = 64;

/// The dtype the large inputs (`u`, `delta`, conv `x`) are handed to a kernel in: f32 on
/// CPU; on CUDA f16/bf16 stay as they are (the kernels convert on load).
fn kernel_dtype(t: &Tensor) -> DType {
    match t.dtype() {
        d @ (DType::F16 | DType::BF16) if t.device().is_cuda() => d,
        _ => DType::F32,
    }
}

/// Fails with `"{op}: {name} has shape [..], expected [..]"` unless `t` has shape `want`.
fn expect_shape(op: &str, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        bail!("{op}: {name} has shape {:?}, expected {want:?}", t.dims())
    }
    Ok(())
}

/// The dims of a rank-3 tensor, or an error naming it and its expected `layout`.
fn dims3(op: &str, name: &str, t: &Tensor, layout: &str) -> Result<(usize, usize, usize)> {
    match *t.dims() {
        [d0, d1, d2] => Ok((d0, d1, d2)),
        _ => bail!("{op}: {name} has shape {:?}, expected {layout}", t.dims()),
    }
}

/// The dims of a rank-4 tensor, or an error naming it and its expected `layout`.
fn dims4(op: &str, name: &str, t: &Tensor, layout: &str) -> Result<(usize, usize, usize, usize)> {
    match *t.dims() {
        [d0, d1, d2, d3] => Ok((d0, d1, d2, d3)),
        _ => bail!("{op}: {name} has shape {:?}, expected {layout}", t.dims()),
    }
}

/// The dims of a rank-2 tensor, or an error naming it and its expected `layout`.
fn dims2(op: &str, name: &str, t: &Tensor, layout: &str) -> Result<(usize, usize)> {
    match *t.dims() {
        [d0, d1] => Ok((d0, d1)),
        _ => bail!("{op}: {name} has shape {:?}, expected {layout}", t.dims()),
    }
}

fn f32_flat(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.flatten_all()
}

/// Splits a custom op's packed 1-D output into consecutive pieces of the given shapes (ops
/// return several tensors as one buffer).
pub(crate) fn unpack<const K: usize>(
    packed: &Tensor,
    shapes: [&[usize]; K],
) -> Result<[Tensor; K]> {
    let mut at = 0;
    let mut out = Vec::with_capacity(K);
    for shape in shapes {
        let len: usize = shape.iter().product();
        out.push(packed.narrow(0, at, len)?.reshape(shape)?);
        at += len;
    }
    out.try_into()
        .map_err(|_| candle_core::Error::Msg("unpack: piece count".into()))
}

/// Selective scan: `dt = softplus(delta + delta_bias)`,
/// `s_t = exp(dt_t·A) ⊙ s_{t-1} + dt_t·B_t·u_t`, `y_t = s_t·C_t + D ⊙ u_t`, then `y ⊙ silu(z)`
/// when `z` is given. Starts from `initial_state` (`[b, E, N]`) or zero. Returns `y`
/// (`[b, L, E]`) and the last state (`[b, E, N]`, F32, detached from autograd).
///
/// Differentiable in every input (including `A`, `D`, `delta_bias` and `initial_state`); the
/// backward recomputes states chunk by chunk from boundary states kept by the forward.
///
/// `reverse` scans from the last time row to the first (Vim's backward branch): the result
/// equals flipping every `[b, L, ·]` input in time, scanning, and flipping `y` back, without
/// the copies. `initial_state` then enters at row L-1 and the last state is after row 0.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    delta_bias: &Tensor,
    z: Option<&Tensor>,
    initial_state: Option<&Tensor>,
    reverse: bool,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "selective_scan";
    let (bsz, len, e) = dims3(OP, "u", u, "[b, L, E]")?;
    let (_, n) = dims2(OP, "A", a, "[E, N]")?;
    expect_shape(OP, "delta", delta, &[bsz, len, e])?;
    expect_shape(OP, "A", a, &[e, n])?;
    expect_shape(OP, "B", b, &[bsz, len, n])?;
    expect_shape(OP, "C", c, &[bsz, len, n])?;
    expect_shape(OP, "D", d, &[e])?;
    expect_shape(OP, "delta_bias", delta_bias, &[e])?;
    if let Some(z) = z {
        expect_shape(OP, "z", z, &[bsz, len, e])?;
    }
    if let Some(s) = initial_state {
        expect_shape(OP, "initial_state", s, &[bsz, e, n])?;
    }
    let on_gpu = u.device().is_cuda();
    if !fused(u.device()) || (on_gpu && n > CUDA_MAX_N) {
        if !reverse {
            return reference::selective_scan(u, delta, a, b, c, d, delta_bias, z, initial_state);
        }
        let z = z.map(flip_time).transpose()?;
        let (y, last) = reference::selective_scan(
            &flip_time(u)?,
            &flip_time(delta)?,
            a,
            &flip_time(b)?,
            &flip_time(c)?,
            d,
            delta_bias,
            z.as_ref(),
            initial_state,
        )?;
        return Ok((flip_time(&y)?, last));
    }
    let dims = scan::ScanDims {
        b: bsz,
        l: len,
        e,
        n,
        has_z: z.is_some(),
        has_s0: initial_state.is_some(),
        reverse,
    };
    // u and delta go in as they are; the other inputs are packed (see `scan`).
    // (`contiguous` is free for already-contiguous tensors.)
    let io = kernel_dtype(u);
    let dense = |t: &Tensor| t.to_dtype(io)?.contiguous();
    let (u32, delta32) = (dense(u)?, dense(delta)?);
    let mut parts = Vec::with_capacity(7);
    if let Some(z) = z {
        parts.push(f32_flat(z)?);
    }
    for t in [b, c, a, d, delta_bias] {
        parts.push(f32_flat(t)?);
    }
    if let Some(s) = initial_state {
        parts.push(f32_flat(s)?);
    }
    let rest = Tensor::cat(&parts, 0)?;
    let keep_all = u32.track_op() || delta32.track_op() || rest.track_op();
    let saved = Arc::new(OnceLock::new());
    let y = u32.apply_op3(
        &delta32,
        &rest,
        scan::ScanOp {
            dims,
            keep_all,
            saved: saved.clone(),
        },
    )?;
    if on_gpu {
        // The CUDA op returns `[y | states [b][slab][E][N]]`; the last slab is the state.
        let ble = bsz * len * e;
        let nslabs = (y.dim(0)? - ble) / (bsz * e * n).max(1);
        let last = y
            .detach()
            .narrow(0, ble, y.dim(0)? - ble)?
            .reshape((bsz, nslabs, e * n))?
            .narrow(1, nslabs.saturating_sub(1), nslabs.min(1))?
            .reshape((bsz, e, n))?;
        let y = y.narrow(0, 0, ble)?.reshape((bsz, len, e))?;
        return Ok((y.to_dtype(u.dtype())?, last));
    }
    let Some(slabs) = saved.get() else {
        bail!("{OP}: the forward saved no state")
    };
    let last = scan::last_state(&dims, slabs, keep_all);
    let last = Tensor::from_vec(last, (bsz, e, n), u.device())?;
    Ok((y.to_dtype(u.dtype())?, last))
}

/// Causal depthwise conv1d over time with `K-1` zeros on the left (or the given
/// `[b, E, K-1]` history), plus bias, then SiLU. `x` is `[b, L, E]`, `weight` `[E, K]`,
/// `bias` `[E]`; returns `[b, L, E]`.
///
/// `reverse` makes it anti-causal (zeros on the right): the causal conv of the time-reversed
/// `x`, reversed back, without the copies (Vim's backward branch). It takes no history.
pub fn causal_conv1d_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    history: Option<&Tensor>,
    reverse: bool,
) -> Result<Tensor> {
    const OP: &str = "causal_conv1d_silu";
    let (bsz, len, e) = dims3(OP, "x", x, "[b, L, E]")?;
    let (_, k) = dims2(OP, "weight", weight, "[E, K]")?;
    expect_shape(OP, "weight", weight, &[e, k])?;
    if k == 0 {
        bail!("{OP}: weight has shape {:?}, expected K ≥ 1", weight.dims())
    }
    expect_shape(OP, "bias", bias, &[e])?;
    if let Some(h) = history {
        if reverse {
            bail!("{OP}: a reverse (anti-causal) conv takes no history")
        }
        expect_shape(OP, "history", h, &[bsz, e, k - 1])?;
    }
    if !fused(x.device()) {
        if reverse {
            let y = reference::causal_conv1d_silu(&flip_time(x)?, weight, bias, None)?;
            return flip_time(&y);
        }
        return reference::causal_conv1d_silu(x, weight, bias, history);
    }
    let out_dtype = x.dtype();
    let io = kernel_dtype(x);
    let x = x.to_dtype(io)?;
    // History rows go in front of x; Candle's cat returns their gradient.
    let (x_ext, p) = match history {
        Some(h) if k > 1 => (
            Tensor::cat(&[&h.to_dtype(io)?.transpose(1, 2)?, &x], 1)?,
            k - 1,
        ),
        _ => (x, 0),
    };
    // The kernel reads rows with any stride but needs channels contiguous.
    let x_ext = if e > 1 && x_ext.stride()[2] != 1 {
        x_ext.contiguous()?
    } else {
        x_ext
    };
    let w = weight.to_dtype(DType::F32)?.contiguous()?;
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let dims = conv::ConvDims {
        b: bsz,
        l: len,
        e,
        k,
        p,
        reverse,
    };
    x_ext
        .apply_op3(&w, &bias, conv::ConvOp { dims })?
        .to_dtype(out_dtype)
}

/// One decode step of the scan: `x`, `delta`, `z` are `[b, E]`, `B`, `C` `[b, N]`, `state`
/// `[b, E, N]`. Returns `y` `[b, E]` and the new state (F32). No autograd: plain loops, O(E·N)
/// per token, parallel over batch rows and channel segments.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_step(
    state: &Tensor,
    x: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    delta_bias: &Tensor,
    z: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "selective_scan_step";
    let (bsz, e, n) = dims3(OP, "state", state, "[b, E, N]")?;
    expect_shape(OP, "x", x, &[bsz, e])?;
    expect_shape(OP, "delta", delta, &[bsz, e])?;
    expect_shape(OP, "A", a, &[e, n])?;
    expect_shape(OP, "B", b, &[bsz, n])?;
    expect_shape(OP, "C", c, &[bsz, n])?;
    expect_shape(OP, "D", d, &[e])?;
    expect_shape(OP, "delta_bias", delta_bias, &[e])?;
    if let Some(z) = z {
        expect_shape(OP, "z", z, &[bsz, e])?;
    }
    if !fused(x.device()) || n == 0 {
        return reference::selective_scan_step(state, x, delta, a, b, c, d, delta_bias, z);
    }
    let mut small = vec![f32_flat(x)?, f32_flat(delta)?];
    if let Some(z) = z {
        small.push(f32_flat(z)?);
    }
    for t in [b, c, d, delta_bias] {
        small.push(f32_flat(t)?);
    }
    let small = Tensor::cat(&small, 0)?;
    let st = state.to_dtype(DType::F32)?.contiguous()?;
    let a32 = a.to_dtype(DType::F32)?.contiguous()?;
    let op = step::ScanStepOp {
        b: bsz,
        e,
        n,
        has_z: z.is_some(),
    };
    let out = st.apply_op3_no_bwd(&a32, &small, &op)?;
    let [y, new_state] = unpack(&out, [&[bsz, e], &[bsz, e, n]])?;
    Ok((y.to_dtype(x.dtype())?, new_state))
}

/// One decode step of the conv: `x` is `[b, E]`, `conv_state` `[b, E, K]` (the last K
/// inputs). Returns `y` `[b, E]` (after bias and SiLU) and the new conv state, which drops the
/// oldest input and appends `x` (F32). No autograd.
pub fn causal_conv1d_step(
    conv_state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "causal_conv1d_step";
    let (bsz, e, k) = dims3(OP, "conv_state", conv_state, "[b, E, K]")?;
    if k == 0 {
        bail!(
            "{OP}: conv_state has shape {:?}, expected K ≥ 1",
            conv_state.dims()
        )
    }
    expect_shape(OP, "x", x, &[bsz, e])?;
    expect_shape(OP, "weight", weight, &[e, k])?;
    expect_shape(OP, "bias", bias, &[e])?;
    if !fused(x.device()) {
        return reference::causal_conv1d_step(conv_state, x, weight, bias);
    }
    let st = conv_state.to_dtype(DType::F32)?.contiguous()?;
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let wb = Tensor::cat(&[f32_flat(weight)?, f32_flat(bias)?], 0)?;
    let out = st.apply_op3_no_bwd(&x32, &wb, &step::ConvStepOp { b: bsz, e, k })?;
    let [y, new_state] = unpack(&out, [&[bsz, e], &[bsz, e, k]])?;
    Ok((y.to_dtype(x.dtype())?, new_state))
}

/// Mamba-2's SSD scan (the state-space dual form, HF `mamba2_chunk_scan`): `x` `[b, L, H, P]`,
/// raw `dt` `[b, L, H]` (before `dt_bias` and the softplus), `A` `[H]` (already negative),
/// `B`, `C` `[b, L, G, N]` (head h reads group `h / (H/G)`), `D`, `dt_bias` `[H]`,
/// `initial_state` `[b, H, P, N]` or zero. With `dt = clamp(softplus(dt + dt_bias), dt_limit)`
/// each head runs `S_t = exp(dt_t·A)·S_{t-1} + dt_t·x_t ⊗ B_t`, `y_t = S_t·C_t + D·x_t`.
/// Returns `y` `[b, L, H, P]` (no gate) and the last state `[b, H, P, N]` (F32, detached).
#[allow(clippy::too_many_arguments)]
pub fn ssd_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    dt_bias: &Tensor,
    dt_limit: (f64, f64),
    initial_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "ssd_scan";
    let (bsz, len, h, p) = dims4(OP, "x", x, "[b, L, H, P]")?;
    let (_, _, g, n) = dims4(OP, "B", b, "[b, L, G, N]")?;
    expect_shape(OP, "dt", dt, &[bsz, len, h])?;
    expect_shape(OP, "A", a, &[h])?;
    expect_shape(OP, "B", b, &[bsz, len, g, n])?;
    expect_shape(OP, "C", c, &[bsz, len, g, n])?;
    expect_shape(OP, "D", d, &[h])?;
    expect_shape(OP, "dt_bias", dt_bias, &[h])?;
    if g == 0 || !h.is_multiple_of(g) {
        bail!("{OP}: {g} groups do not divide {h} heads")
    }
    if let Some(s) = initial_state {
        expect_shape(OP, "initial_state", s, &[bsz, h, p, n])?;
    }
    if len == 0 {
        bail!("{OP}: empty sequence")
    }
    // No CUDA SSD kernel yet: GPUs run the reference composition.
    if !x.device().is_cpu() {
        let (y, last) = reference::ssd_scan(x, dt, a, b, c, d, dt_bias, dt_limit, initial_state)?;
        return Ok((y, last.to_dtype(DType::F32)?));
    }
    let clamps = dt_limit.0 > 0.0 || dt_limit.1.is_finite();
    let dims = ssd::SsdDims {
        b: bsz,
        l: len,
        h,
        p,
        g,
        n,
        has_s0: initial_state.is_some(),
        limit: clamps.then_some((dt_limit.0 as f32, dt_limit.1 as f32)),
    };
    let dense = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let (x32, dt32) = (dense(x)?, dense(dt)?);
    let mut parts = vec![f32_flat(b)?, f32_flat(c)?, f32_flat(a)?, f32_flat(d)?];
    parts.push(f32_flat(dt_bias)?);
    if let Some(s) = initial_state {
        parts.push(f32_flat(s)?);
    }
    let rest = Tensor::cat(&parts, 0)?;
    let keep_all = x32.track_op() || dt32.track_op() || rest.track_op();
    let saved = Arc::new(OnceLock::new());
    let y = x32.apply_op3(
        &dt32,
        &rest,
        ssd::SsdOp {
            dims,
            keep_all,
            saved: saved.clone(),
        },
    )?;
    let Some(states) = saved.get() else {
        bail!("{OP}: the forward saved no state")
    };
    let last = Tensor::from_vec(ssd::last_state(&dims, states), (bsz, h, p, n), x.device())?;
    Ok((y.to_dtype(x.dtype())?, last))
}

/// One cached decode step of [`ssd_scan`]: `state` `[b, H, P, N]`, `x` `[b, H, P]`, raw `dt`
/// `[b, H]`, `B`, `C` `[b, G, N]`. dt is not clamped (HF's and mamba_ssm's step). Returns `y`
/// `[b, H, P]` and the new state (F32). No autograd.
#[allow(clippy::too_many_arguments)]
pub fn ssd_step(
    state: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    dt_bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "ssd_step";
    let (bsz, h, p, n) = dims4(OP, "state", state, "[b, H, P, N]")?;
    let (_, g, _) = dims3(OP, "B", b, "[b, G, N]")?;
    expect_shape(OP, "x", x, &[bsz, h, p])?;
    expect_shape(OP, "dt", dt, &[bsz, h])?;
    expect_shape(OP, "A", a, &[h])?;
    expect_shape(OP, "B", b, &[bsz, g, n])?;
    expect_shape(OP, "C", c, &[bsz, g, n])?;
    expect_shape(OP, "D", d, &[h])?;
    expect_shape(OP, "dt_bias", dt_bias, &[h])?;
    if g == 0 || !h.is_multiple_of(g) {
        bail!("{OP}: {g} groups do not divide {h} heads")
    }
    if !x.device().is_cpu() {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (y, s) = reference::ssd_step(
            &f32(state)?,
            &f32(x)?,
            &f32(dt)?,
            &f32(a)?,
            &f32(b)?,
            &f32(c)?,
            &f32(d)?,
            &f32(dt_bias)?,
        )?;
        return Ok((y.to_dtype(x.dtype())?, s));
    }
    let st = state.to_dtype(DType::F32)?.contiguous()?;
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let small = Tensor::cat(
        &[
            f32_flat(dt)?,
            f32_flat(b)?,
            f32_flat(c)?,
            f32_flat(a)?,
            f32_flat(d)?,
            f32_flat(dt_bias)?,
        ],
        0,
    )?;
    let op = step::SsdStepOp { b: bsz, h, p, g, n };
    let out = st.apply_op3_no_bwd(&x32, &small, &op)?;
    let [y, new_state] = unpack(&out, [&[bsz, h, p], &[bsz, h, p, n]])?;
    Ok((y.to_dtype(x.dtype())?, new_state))
}

/// RMSNorm over the last dim, `x · rsqrt(mean(x²) + eps) · weight`, as one graph node with
/// its own backward (see `norm`): for training on CPU, where the same norm as Candle ops
/// costs six nodes. `x` and `weight` must be F32 on the CPU.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let d = x.dims().last().copied().unwrap_or(0);
    expect_shape(OP, "weight", weight, &[d])?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        bail!("{OP}: the fused norm takes F32 tensors on the CPU")
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, norm::RmsNormOp { eps: eps as f32 })
}

/// Mamba-2's grouped gated RMSNorm: `v = y ⊙ silu(z)`, each group of `E/groups` consecutive
/// channels scaled by `rsqrt(mean(v²) + eps)`, then `⊙ weight`; `y`, `z` `[..., E]`.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "gated_rms_norm";
    let e = y.dims().last().copied().unwrap_or(0);
    if z.dims() != y.dims() {
        bail!("{OP}: z has shape {:?}, y has {:?}", z.dims(), y.dims())
    }
    expect_shape(OP, "weight", weight, &[e])?;
    if groups == 0 || !e.is_multiple_of(groups) {
        bail!("{OP}: {groups} groups do not divide {e} channels")
    }
    reference::gated_rms_norm(y, z, weight, groups, eps)
}

/// Reverses a `[b, L, ·]` tensor along time (dim 1).
pub fn flip_time(t: &Tensor) -> Result<Tensor> {
    let l = t.dim(1)?;
    let idx: Vec<u32> = (0..l as u32).rev().collect();
    let idx = Tensor::from_vec(idx, l, t.device())?;
    t.contiguous()?.index_select(&idx, 1)
}

/// PyTorch's softplus (threshold 20), written stably: `max(v, 0) + log1p(exp(-|v|))`.
pub fn softplus(v: &Tensor) -> Result<Tensor> {
    let relu = v.relu()?;
    let soft = (v.abs()?.neg()?.exp()? + 1.0)?.log()?;
    relu + soft
}
