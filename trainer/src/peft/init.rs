//! Seeded initialisation of adapter tensors. Each tensor draws from its own stream, seeded
//! by the adapter seed and the tensor's name, so a tensor's initial value does not depend on
//! which other methods are stacked with it or in what order.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::error::PeftResult;

/// The adapter's seed; see the module docs.
#[derive(Clone, Debug)]
pub struct InitRng {
    seed: u64,
    device: Device,
    dtype: DType,
}

impl InitRng {
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        InitRng {
            seed,
            device: device.clone(),
            dtype,
        }
    }

    fn stream(&self, name: &str) -> StdRng {
        // FNV-1a over the name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        StdRng::seed_from_u64(h ^ self.seed.rotate_left(17) ^ self.seed)
    }

    fn tensor(&self, v: Vec<f32>, shape: &[usize]) -> PeftResult<Tensor> {
        Ok(Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    /// Uniform(−bound, bound).
    pub fn uniform(&self, name: &str, shape: &[usize], bound: f64) -> PeftResult<Tensor> {
        let mut rng = self.stream(name);
        let n = shape.iter().product();
        let b = bound as f32;
        let v = (0..n)
            .map(|_| {
                if b > 0.0 {
                    rng.random_range(-b..=b)
                } else {
                    0.0
                }
            })
            .collect();
        self.tensor(v, shape)
    }

    /// PyTorch's default Linear/Conv init, Uniform(±1/√fan_in) (kaiming-uniform, a = √5).
    pub fn kaiming_uniform(
        &self,
        name: &str,
        shape: &[usize],
        fan_in: usize,
    ) -> PeftResult<Tensor> {
        self.uniform(name, shape, 1.0 / (fan_in.max(1) as f64).sqrt())
    }

    /// Normal(0, std²) (Box–Muller).
    pub fn normal(&self, name: &str, shape: &[usize], std: f64) -> PeftResult<Tensor> {
        let mut rng = self.stream(name);
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * u2;
            v.push((r * th.cos() * std) as f32);
            if v.len() < n {
                v.push((r * th.sin() * std) as f32);
            }
        }
        self.tensor(v, shape)
    }

    pub fn zeros(&self, shape: &[usize]) -> PeftResult<Tensor> {
        Ok(Tensor::zeros(shape, self.dtype, &self.device)?)
    }

    pub fn ones(&self, shape: &[usize]) -> PeftResult<Tensor> {
        Ok(Tensor::ones(shape, self.dtype, &self.device)?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_seed_and_name_only() -> PeftResult<()> {
        let g = InitRng::new(7, &Device::Cpu, DType::F32);
        let a = g
            .uniform("x", &[3, 4], 0.5)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = g
            .uniform("x", &[3, 4], 0.5)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let c = g
            .uniform("y", &[3, 4], 0.5)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| v.abs() <= 0.5));
        let n = g
            .normal("n", &[10_000], 2.0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mean = n.iter().sum::<f32>() / n.len() as f32;
        let var = n.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n.len() as f32;
        assert!(
            mean.abs() < 0.1 && (var.sqrt() - 2.0).abs() < 0.1,
            "{mean} {var}"
        );
        Ok(())
    }
}
