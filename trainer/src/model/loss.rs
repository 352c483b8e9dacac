//! Next-token cross-entropy as HF's causal-LM loss computes it: logits at position t are
//! scored against the label at t+1, and the mean is over every scored position whose label
//! is not [`IGNORE_INDEX`] (for `labels = input_ids` that is B·(T−1) positions).

use candle_core::{D, DType, Tensor};

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
    let n = b * (t - 1);
    let dev = logits.device();
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
}
