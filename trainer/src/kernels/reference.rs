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
