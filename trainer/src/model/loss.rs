//! Next-token cross-entropy as HF's causal-LM loss computes it: logits at position t are
//! scored against the label at t+1, and the mean is over every scored position whose label
//! is not [`IGNORE_INDEX`] (for `labels = input_ids` that is B·(T−1) positions).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Labels with this value are not scored (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// `logits` `[B, T, V]`, `labels` `[B, T]` (I64 with −100 for ignored positions, or U32/I32).
/// Returns a scalar tensor that carries gradients back to `logits`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (lb, lt) = labels.dims2().map_err(|_| {
        Error::input(
            "labels",
            format!("expected [batch, length], found {:?}", labels.dims()),
        )
    })?;
    if (lb, lt) != (b, t) {
        return Err(Error::input(
            "labels",
            format!("shape [{lb}, {lt}] does not match logits [{b}, {t}, {v}]"),
        ));
    }
    if t < 2 {
        return Err(Error::input(
            "labels",
            format!("a next-token loss needs at least 2 positions, got {t}"),
        ));
    }
    let shifted = labels.narrow(1, 1, t - 1)?;
    let values: Vec<i64> = match shifted.dtype() {
        DType::I64 => shifted.flatten_all()?.to_vec1::<i64>()?,
        DType::U32 => shifted
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::I32 => shifted
            .flatten_all()?
            .to_vec1::<i32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        other => {
            return Err(Error::input(
                "labels",
                format!("dtype {other:?} is not an integer type"),
            ));
        }
    };
    let mut targets = Vec::with_capacity(values.len());
    let mut weights = Vec::with_capacity(values.len());
    for (i, &y) in values.iter().enumerate() {
        if y == IGNORE_INDEX {
            targets.push(0u32);
            weights.push(0f32);
        } else if y < 0 || y as u64 >= v as u64 {
            return Err(Error::input(
                "labels",
                format!(
                    "label {y} at [{}, {}] is out of range for a vocabulary of {v} (use {IGNORE_INDEX} to skip a position)",
                    i / (t - 1),
                    i % (t - 1) + 1
                ),
            ));
        } else {
            targets.push(y as u32);
            weights.push(1f32);
        }
    }
    let count = weights.iter().filter(|w| **w > 0.0).count();
    if count == 0 {
        return Err(Error::input(
            "labels",
            "every position is ignored; nothing to score",
        ));
    }
    let dev = logits.device();
    if matches!(dev, Device::Cpu) {
        // Fused: one pass per row for the loss and one for its gradient, so the step keeps
        // only the logits and their gradient alive ([B·T, V] each), not the half-dozen
        // vocabulary-wide temporaries of the composed form below.
        let rows = RowTargets::shifted(&targets, &weights, b, t);
        let flat = logits.reshape((b * t, v))?.to_dtype(DType::F32)?;
        let nll = flat.apply_op1(NllOp(rows))?;
        return Ok((nll.sum_all()? / count as f64)?);
    }
    let n = b * (t - 1);
    let flat = logits
        .narrow(1, 0, t - 1)?
        .reshape((n, v))?
        .to_dtype(DType::F32)?;
    let logp = log_softmax(&flat)?;
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?;
    let weights = Tensor::from_vec(weights, n, dev)?;
    let total = (picked * weights)?.sum_all()?;
    Ok((total.neg()? / count as f64)?)
}

/// The target and weight of every row of `[B·T, V]` logits: row `b·T + t` is scored against
/// the label at `t + 1`; the last position of each sequence has weight 0.
#[derive(Clone)]
struct RowTargets {
    targets: Arc<Vec<u32>>,
    weights: Arc<Vec<f32>>,
}

impl RowTargets {
    fn shifted(targets: &[u32], weights: &[f32], b: usize, t: usize) -> Self {
        let mut tg = vec![0u32; b * t];
        let mut wt = vec![0f32; b * t];
        for bi in 0..b {
            let src = bi * (t - 1)..(bi + 1) * (t - 1);
            tg[bi * t..bi * t + t - 1].copy_from_slice(&targets[src.clone()]);
            wt[bi * t..bi * t + t - 1].copy_from_slice(&weights[src]);
        }
        RowTargets {
            targets: Arc::new(tg),
            weights: Arc::new(wt),
        }
    }
}

/// The rows of a contiguous F32 `[n, V]` storage.
fn f32_rows<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: expected F32 logits")
    };
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: logits must be contiguous")
    };
    let v = *l.dims().last().unwrap_or(&0);
    if v == 0 {
        candle_core::bail!("{op}: empty vocabulary dimension")
    }
    Ok((&data[a..z], v))
}

/// Max and log-sum-exp of one row (the max shift keeps exp in range).
fn row_lse(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
    (m, m + s.ln())
}

/// `[n, V]` logits → `[n]` weighted negative log-likelihoods `w·(lse − x[y])`.
struct NllOp(RowTargets);

impl CustomOp1 for NllOp {
    fn name(&self) -> &'static str {
        "molt-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, v) = f32_rows(s, l, "nll")?;
        let n = x.len() / v;
        let RowTargets { targets, weights } = &self.0;
        if targets.len() != n {
            candle_core::bail!("nll: {} targets for {n} rows", targets.len())
        }
        let mut out = vec![0f32; n];
        out.par_iter_mut().enumerate().for_each(|(i, o)| {
            if weights[i] != 0.0 {
                let row = &x[i * v..(i + 1) * v];
                let (_, lse) = row_lse(row);
                *o = weights[i] * (lse - row[targets[i] as usize]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let grad = arg
            .detach()
            .contiguous()?
            .apply_op2_no_bwd(&g, &NllGradOp(self.0.clone()))?;
        Ok(Some(grad))
    }
}

/// (`[n, V]` logits, `[n]` upstream gradient) → `[n, V]`: `g·w·(softmax − onehot(y))` per row.
struct NllGradOp(RowTargets);

impl CustomOp2 for NllGradOp {
    fn name(&self) -> &'static str {
        "molt-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, v) = f32_rows(s1, l1, "nll grad")?;
        let (g, _) = f32_rows(s2, l2, "nll grad (upstream)")?;
        let n = x.len() / v;
        let RowTargets { targets, weights } = &self.0;
        if g.len() != n || targets.len() != n {
            candle_core::bail!(
                "nll grad: {} gradients, {} targets for {n} rows",
                g.len(),
                targets.len()
            )
        }
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).enumerate().for_each(|(i, o)| {
            let scale = g[i] * weights[i];
            if scale != 0.0 {
                let row = &x[i * v..(i + 1) * v];
                let (_, lse) = row_lse(row);
                for (o, &xi) in o.iter_mut().zip(row) {
                    *o = scale * (xi - lse).exp();
                }
                o[targets[i] as usize] -= scale;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Log-softmax over the last dim. The max is detached: it only shifts for stability and its
/// gradient is zero in exact arithmetic.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computation_and_ignores() -> Result<()> {
        let dev = Device::Cpu;
        // B=1, T=3, V=2.
        let logits = Tensor::new(&[[[0f32, 1.], [2., 0.], [5., 5.]]], &dev)?;
        let labels = Tensor::new(&[[0i64, 1, 0]], &dev)?;
        let loss = causal_lm_loss(&logits, &labels)?.to_scalar::<f32>()?;
        // position 0 → label 1, position 1 → label 0
        let l0 = -(1f32.exp() / (1f32 + 1f32.exp())).ln();
        let l1 = -(2f32.exp() / (2f32.exp() + 1.)).ln();
        assert!((loss - (l0 + l1) / 2.).abs() < 1e-6);
        let labels = Tensor::new(&[[0i64, -100, 0]], &dev)?;
        let loss = causal_lm_loss(&logits, &labels)?.to_scalar::<f32>()?;
        assert!((loss - l1).abs() < 1e-6);
        let bad = Tensor::new(&[[0i64, 7, 0]], &dev)?;
        let e = causal_lm_loss(&logits, &bad).unwrap_err().to_string();
        assert!(e.contains("label 7"), "{e}");
        Ok(())
    }

    /// The composed form (what non-CPU devices run), for checking the fused op.
    fn composed(logits: &Tensor, labels: &[i64], b: usize, t: usize) -> Result<Tensor> {
        let v = logits.dim(2)?;
        let n = b * (t - 1);
        let mut tg = Vec::new();
        let mut wt = Vec::new();
        for bi in 0..b {
            for ti in 1..t {
                let y = labels[bi * t + ti];
                tg.push(if y == IGNORE_INDEX { 0u32 } else { y as u32 });
                wt.push(if y == IGNORE_INDEX { 0f32 } else { 1.0 });
            }
        }
        let count = wt.iter().filter(|w| **w > 0.0).count();
        let flat = logits.narrow(1, 0, t - 1)?.reshape((n, v))?;
        let logp = log_softmax(&flat)?;
        let dev = logits.device();
        let picked = logp
            .gather(&Tensor::from_vec(tg, (n, 1), dev)?, 1)?
            .squeeze(1)?;
        let total = (picked * Tensor::from_vec(wt, n, dev)?)?.sum_all()?;
        Ok((total.neg()? / count as f64)?)
    }

    #[test]
    fn fused_loss_and_gradient_match_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, v) = (3, 7, 1001);
        let x = candle_core::Var::from_tensor(&(Tensor::randn(0f32, 3.0, (b, t, v), &dev)?))?;
        let mut labels: Vec<i64> = (0..b * t).map(|i| ((i * 7919) % v) as i64).collect();
        labels[4] = IGNORE_INDEX;
        labels[t + 1] = IGNORE_INDEX;
        let lt = Tensor::from_vec(labels.clone(), (b, t), &dev)?;
        let fused = causal_lm_loss(x.as_tensor(), &lt)?;
        let reference = composed(x.as_tensor(), &labels, b, t)?;
        let (f, r) = (fused.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
        assert!((f - r).abs() <= 1e-5 * r.abs().max(1.0), "loss {f} vs {r}");
        let gf = fused.backward()?.get(&x).cloned().expect("fused grad");
        let gr = reference
            .backward()?
            .get(&x)
            .cloned()
            .expect("reference grad");
        let diff = (gf - &gr)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = gr.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            scale > 0.0 && diff <= 1e-6 * scale.max(1.0),
            "grad diff {diff} (max {scale})"
        );
        Ok(())
    }
}
