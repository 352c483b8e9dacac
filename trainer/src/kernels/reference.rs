//! The kernels as compositions of plain Candle ops. Autograd comes for free; speed does not
//! (the scan records O(L) graph nodes). Used as the oracle in tests and as a baseline in
//! `molt bench`.

use candle_core::{D, Result, Tensor};

use super::softplus;

/// The signature of [`selective_scan`] (u, delta, A, B, C, D, delta_bias, z, initial state),
/// which benchmarks and tests use to run either implementation; the fused one also takes
/// `reverse`.
pub type ScanFn = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    Option<&Tensor>,
) -> Result<(Tensor, Tensor)>;

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
) -> Result<(Tensor, Tensor)> {
    let (bsz, len, e) = u.dims3()?;
    let n = a.dim(1)?;
    let dt = softplus(&delta.broadcast_add(delta_bias)?)?; // [b, L, E]
    let dt4 = dt.unsqueeze(3)?; // [b, L, E, 1]
    let d_a = dt4.broadcast_mul(a)?.exp()?; // [b, L, E, N]
    let d_bu = dt4
        .broadcast_mul(&u.unsqueeze(3)?)?
        .broadcast_mul(&b.unsqueeze(2)?)?; // [b, L, E, N]
    let mut s = match initial_state {
        Some(s) => s.clone(),
        None => Tensor::zeros((bsz, e, n), u.dtype(), u.device())?,
    };
    let mut ys = Vec::with_capacity(len);
    for t in 0..len {
        s = (d_a.narrow(1, t, 1)?.squeeze(1)? * &s)?.add(&d_bu.narrow(1, t, 1)?.squeeze(1)?)?;
        let c_t = c.narrow(1, t, 1)?; // [b, 1, N]
        ys.push(s.broadcast_mul(&c_t)?.sum(D::Minus1)?); // [b, E]
    }
    let y = if ys.is_empty() {
        Tensor::zeros((bsz, 0, e), u.dtype(), u.device())?
    } else {
        Tensor::stack(&ys, 1)? // [b, L, E]
    };
    let y = y.add(&u.broadcast_mul(d)?)?;
    let y = match z {
        Some(z) => (y * candle_nn::ops::silu(z)?)?,
        None => y,
    };
    Ok((y, s.detach()))
}

pub fn causal_conv1d_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    history: Option<&Tensor>,
) -> Result<Tensor> {
    let (bsz, len, e) = x.dims3()?;
    let k = weight.dim(1)?;
    let pad = match history {
        Some(h) => h.transpose(1, 2)?, // [b, K-1, E]
        None => Tensor::zeros((bsz, k - 1, e), x.dtype(), x.device())?,
    };
    let xp = Tensor::cat(&[&pad, x], 1)?; // [b, L+K-1, E]
    let mut acc = bias
        .reshape((1, 1, e))?
        .broadcast_as((bsz, len, e))?
        .contiguous()?;
    for j in 0..k {
        let w_j = weight.narrow(1, j, 1)?.squeeze(1)?; // [E]
        acc = acc.add(&xp.narrow(1, j, len)?.broadcast_mul(&w_j)?)?;
    }
    candle_nn::ops::silu(&acc)
}

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
    let dt = softplus(&delta.broadcast_add(delta_bias)?)?.unsqueeze(2)?; // [b, E, 1]
    let d_a = dt.broadcast_mul(a)?.exp()?; // [b, E, N]
    let d_bu = dt
        .broadcast_mul(&x.unsqueeze(2)?)?
        .broadcast_mul(&b.unsqueeze(1)?)?;
    let s = ((d_a * state)? + d_bu)?;
    let y = s.broadcast_mul(&c.unsqueeze(1)?)?.sum(D::Minus1)?;
    let y = y.add(&x.broadcast_mul(d)?)?;
    let y = match z {
        Some(z) => (y * candle_nn::ops::silu(z)?)?,
        None => y,
    };
    Ok((y, s))
}

pub fn causal_conv1d_step(
    conv_state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let k = conv_state.dim(2)?;
    let new_state = Tensor::cat(&[&conv_state.narrow(2, 1, k - 1)?, &x.unsqueeze(2)?], 2)?;
    let y = new_state
        .broadcast_mul(&weight.unsqueeze(0)?)?
        .sum(D::Minus1)?;
    let y = candle_nn::ops::silu(&y.broadcast_add(bias)?)?;
    Ok((y, new_state))
}

/// Mamba-2's dt: `softplus(dt + dt_bias)`, clamped to `limit` when it bounds anything
/// (`(0, inf)` is no clamp, as in HF).
pub fn ssd_dt(dt: &Tensor, dt_bias: &Tensor, limit: (f64, f64)) -> Result<Tensor> {
    let dt = softplus(&dt.broadcast_add(dt_bias)?)?;
    if limit.0 > 0.0 || limit.1.is_finite() {
        // Candle's clamp passes the gradient where lo ≤ dt ≤ hi, as torch.clamp does.
        dt.clamp(limit.0, limit.1)
    } else {
        Ok(dt)
    }
}

/// `[b, L, G, N]` → `[b, L, H, N]`: head h reads group `h / (H/G)` (repeat_interleave).
pub fn ssd_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (bsz, len, g, n) = t.dims4()?;
    t.unsqueeze(3)?
        .broadcast_as((bsz, len, g, heads / g, n))?
        .reshape((bsz, len, heads, n))
}

/// Mamba-2's SSD scan as a plain sequential recurrence (the chunked algorithm only changes
/// the rounding): `x` `[b, L, H, P]`, raw `dt` `[b, L, H]`, `A` `[H]` (negative), `B`, `C`
/// `[b, L, G, N]`, `D`, `dt_bias` `[H]`, `initial_state` `[b, H, P, N]`. Per head:
/// `S_t = exp(dt_t·A)·S_{t-1} + dt_t·x_t ⊗ B_t`, `y_t = S_t·C_t + D·x_t`. Returns `y`
/// `[b, L, H, P]` and the last state (detached).
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
    let (bsz, len, h, p) = x.dims4()?;
    let n = b.dim(3)?;
    let dt = ssd_dt(dt, dt_bias, dt_limit)?; // [b, L, H]
    let decay = dt.broadcast_mul(a)?.exp()?; // [b, L, H]
    let (bh, ch) = (ssd_heads(b, h)?, ssd_heads(c, h)?); // [b, L, H, N]
    let dx = x.broadcast_mul(&dt.unsqueeze(3)?)?; // [b, L, H, P]
    let mut s = match initial_state {
        Some(s) => s.clone(),
        None => Tensor::zeros((bsz, h, p, n), x.dtype(), x.device())?,
    };
    let mut ys = Vec::with_capacity(len);
    for t in 0..len {
        let at = |v: &Tensor| v.narrow(1, t, 1)?.squeeze(1);
        let upd = at(&dx)?
            .unsqueeze(3)?
            .broadcast_mul(&at(&bh)?.unsqueeze(2)?)?; // [b, H, P, N]
        s = s
            .broadcast_mul(&at(&decay)?.unsqueeze(2)?.unsqueeze(3)?)?
            .add(&upd)?;
        ys.push(s.broadcast_mul(&at(&ch)?.unsqueeze(2)?)?.sum(D::Minus1)?); // [b, H, P]
    }
    let y = Tensor::stack(&ys, 1)?;
    let y = y.add(&x.broadcast_mul(&d.unsqueeze(1)?)?)?;
    Ok((y, s.detach()))
}

/// One cached decode step of Mamba-2 (`x` `[b, H, P]`, raw `dt` `[b, H]`, `B`, `C`
/// `[b, G, N]`, `state` `[b, H, P, N]`): no dt clamp, as HF's and mamba_ssm's step.
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
    let h = x.dim(1)?;
    let dt = softplus(&dt.broadcast_add(dt_bias)?)?; // [b, H]
    let decay = dt.broadcast_mul(a)?.exp()?.unsqueeze(2)?.unsqueeze(3)?;
    let bh = ssd_heads(&b.unsqueeze(1)?, h)?.squeeze(1)?; // [b, H, N]
    let ch = ssd_heads(&c.unsqueeze(1)?, h)?.squeeze(1)?;
    let dx = x.broadcast_mul(&dt.unsqueeze(2)?)?; // [b, H, P]
    let s = state
        .broadcast_mul(&decay)?
        .add(&dx.unsqueeze(3)?.broadcast_mul(&bh.unsqueeze(2)?)?)?;
    let y = s.broadcast_mul(&ch.unsqueeze(2)?)?.sum(D::Minus1)?;
    let y = y.add(&x.broadcast_mul(&d.unsqueeze(1)?)?)?;
    Ok((y, s))
}

/// Mamba-2's grouped gated RMSNorm (`norm_before_gate = false`): `v = y ⊙ silu(z)`, each of
/// the G groups of `E/G` consecutive channels scaled by `rsqrt(mean(v²) + eps)`, then
/// `⊙ weight`. `y`, `z` `[..., E]`, `weight` `[E]`; computed in f32.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = y.dims().to_vec();
    let e = *dims.last().unwrap_or(&0);
    let v = (y.to_dtype(candle_core::DType::F32)?
        * candle_nn::ops::silu(&z.to_dtype(candle_core::DType::F32)?)?)?;
    let mut grouped = dims[..dims.len() - 1].to_vec();
    grouped.extend([groups, e / groups]);
    let v = v.reshape(grouped)?;
    let rms = (v.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let v = v.broadcast_div(&rms)?.reshape(dims)?;
    v.to_dtype(y.dtype())?.broadcast_mul(weight)
}
