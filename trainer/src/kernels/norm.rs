//! RMSNorm over the last dim, `y = x · r · w` with `r = rsqrt(mean(x²) + eps)`, as one Candle
//! `CustomOp2` (`x`, `w`) with its own backward, for training on CPU.
//!
//! Written as plain Candle ops the norm is six graph nodes (square, mean, add, sqrt, divide,
//! multiply), and Candle's backward gives every edge a zero-filled buffer plus an add: about
//! thirty passes over `[rows, D]` per norm and step. Here the forward is one pass and the
//! backward one more: `dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/D`, `dw = Σ_rows g⊙x·r`, with `r`
//! recomputed per row rather than stored. Work is split over blocks of rows; the weight
//! gradient's per-block partials are summed in block order, so the result does not depend
//! on the thread count.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::scan::f32_slice;

/// Rows per parallel task.
const ROWS: usize = 64;

/// `rsqrt(mean(row²) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// `x` (rows of `w.len()` values) and `w`, or an error naming what does not fit.
fn operands<'a>(
    what: &str,
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [f32])> {
    let x = f32_slice(s1, l1, what)?;
    let w = f32_slice(s2, l2, what)?;
    if w.is_empty() || !x.len().is_multiple_of(w.len()) {
        bail!(
            "{what}: {} values do not form rows of the weight's {}",
            x.len(),
            w.len()
        )
    }
    Ok((x, w))
}

pub(crate) struct RmsNormOp {
    pub eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "molt-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = operands("rms_norm", s1, l1, s2, l2)?;
        let d = w.len();
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(d).zip(xb.chunks_exact(d)) {
                    let r = inv_rms(xr, self.eps);
                    for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                        *o = v * r * wi;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let packed =
            x.detach()
                .apply_op3_no_bwd(&w.detach(), &g, &RmsNormGradOp { eps: self.eps })?;
        let [dx, dw] = super::unpack(&packed, [x.dims(), w.dims()])?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (`x`, `w`, grad of `y`) → `[dx; dw]`.
struct RmsNormGradOp {
    eps: f32,
}

impl CustomOp3 for RmsNormGradOp {
    fn name(&self) -> &'static str {
        "molt-rms-norm-grad"
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
        let (x, w) = operands("rms_norm backward", s1, l1, s2, l2)?;
        let g = f32_slice(s3, l3, "rms_norm backward (grad of y)")?;
        if g.len() != x.len() {
            bail!(
                "rms_norm backward: grad of y has {} values, expected {}",
                g.len(),
                x.len()
            )
        }
        let d = w.len();
        let mut out = vec![0.0f32; x.len() + d];
        let (dx, dw) = out.split_at_mut(x.len());
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d))
            .zip(g.par_chunks(ROWS * d))
            .map(|((dxb, xb), gb)| {
                let mut dwb = vec![0.0f32; d];
                let rows = dxb.chunks_exact_mut(d).zip(xb.chunks_exact(d));
                for ((dxr, xr), gr) in rows.zip(gb.chunks_exact(d)) {
                    let r = inv_rms(xr, self.eps);
                    let s: f32 = gr.iter().zip(w).zip(xr).map(|((a, b), c)| a * b * c).sum();
                    let k = r * r * r * s / d as f32;
                    for i in 0..d {
                        dxr[i] = r * gr[i] * w[i] - k * xr[i];
                        dwb[i] += gr[i] * xr[i] * r;
                    }
                }
                dwb
            })
            .collect();
        for part in &partials {
            for (acc, v) in dw.iter_mut().zip(part) {
                *acc += v;
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;

    fn noise(shape: &[usize], seed: u32) -> Result<Tensor> {
        let len: usize = shape.iter().product();
        let v: Vec<f32> = (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(97)) % 2003) as f32 / 1001.0
                    - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The op's output and its gradients (x and w) against the norm written as Candle ops,
    /// with more rows than one task and a width that fills no vector.
    #[test]
    fn matches_the_plain_composition_and_its_gradients() -> Result<()> {
        let eps = 1e-5;
        let (x, w) = (
            Var::from_tensor(&noise(&[3, 70, 37], 1)?)?,
            Var::from_tensor(&noise(&[37], 2)?)?,
        );
        let up = noise(&[3, 70, 37], 3)?;
        let fused = x.apply_op2(w.as_tensor(), RmsNormOp { eps: eps as f32 })?;
        let plain = {
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(w.as_tensor())?
        };
        let gf = (&fused * &up)?.sum_all()?.backward()?;
        let gp = (&plain * &up)?.sum_all()?.backward()?;
        let pairs = [
            (fused.clone(), plain.clone()),
            (
                gf.get(&x).expect("dx").clone(),
                gp.get(&x).expect("dx").clone(),
            ),
            (
                gf.get(&w).expect("dw").clone(),
                gp.get(&w).expect("dw").clone(),
            ),
        ];
        for (i, (a, b)) in pairs.iter().enumerate() {
            assert_eq!(a.dims(), b.dims());
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 2e-6 * scale.max(1.0),
                "output {i}: max diff {diff} (scale {scale})"
            );
        }
        Ok(())
    }
}
