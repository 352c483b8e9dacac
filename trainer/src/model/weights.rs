//! Reading weight files, whatever the model family: memory-mapped safetensors and PyTorch
//! `.pth` / `.bin` state dicts, one tensor at a time, with the checks every loader shares
//! (non-finite values) and the `VarMap` full fine-tuning builds; and seeded random weights
//! ([`RandomWeights`]) for the families' random-init models.

use std::path::Path;

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{CheckpointProblem, Error, Result};

/// Where and in which dtype to load the weights.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

enum Source {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

pub(crate) struct WeightFile {
    /// Name shown in messages, relative to the model folder.
    pub(crate) label: String,
    source: Source,
}

/// One tensor's entry in a weight file: name, shape, dtype (as text), whether it is a float.
pub(crate) type Entry = (String, Vec<usize>, String, bool);

impl WeightFile {
    /// Every tensor the file lists, without loading data.
    pub(crate) fn entries(&self) -> Vec<Entry> {
        match &self.source {
            Source::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(name, view)| {
                    let dt = view.dtype();
                    let is_float = matches!(
                        dt,
                        safetensors::Dtype::F16
                            | safetensors::Dtype::BF16
                            | safetensors::Dtype::F32
                            | safetensors::Dtype::F64
                    );
                    (name, view.shape().to_vec(), format!("{dt:?}"), is_float)
                })
                .collect(),
            Source::Pth(p) => p
                .tensor_infos()
                .iter()
                .map(|(name, info)| {
                    let is_float = info.dtype.is_float();
                    (
                        name.clone(),
                        info.layout.dims().to_vec(),
                        format!("{:?}", info.dtype),
                        is_float,
                    )
                })
                .collect(),
        }
    }
}

/// Every tensor as a `Var` of a new `VarMap`, under its name (full fine-tuning builds).
/// Consumes the map one tensor at a time, so the copy into a Var never holds two full copies
/// of the model.
pub(crate) fn var_map(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        for (name, t) in tensors {
            let var = Var::from_tensor(&t)?;
            drop(t);
            data.insert(name, var);
        }
    }
    Ok(varmap)
}

pub(crate) fn file_label(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

pub(crate) fn open_weight_file(dir: &Path, path: &Path) -> Result<WeightFile> {
    open_weight_file_with_key(dir, path, None)
}

/// Opens a weights file; `pth_key` names the entry of a `.pth` dict that holds the state dict
/// (`"model"` for hustvl checkpoints), `None` for a bare state dict.
pub(crate) fn open_weight_file_with_key(
    dir: &Path,
    path: &Path,
    pth_key: Option<&str>,
) -> Result<WeightFile> {
    let label = file_label(dir, path);
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    let source = if is_st {
        // SAFETY: the map is read-only; like every mmap-based loader we rely on nobody
        // truncating the file while the model is being loaded.
        let st = unsafe { MmapedSafetensors::new(path) };
        Source::Safetensors(st.map_err(|e| Error::WeightFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?)
    } else {
        Source::Pth(
            PthTensors::new(path, pth_key).map_err(|e| Error::WeightFile {
                path: path.to_path_buf(),
                reason: format!("not a readable PyTorch checkpoint: {e}"),
            })?,
        )
    };
    Ok(WeightFile { label, source })
}

pub(crate) fn load_one(
    file: &WeightFile,
    name: &str,
    opts: &LoadOptions,
) -> candle_core::Result<Tensor> {
    let t = match &file.source {
        Source::Safetensors(st) => st.load(name, &opts.device)?,
        Source::Pth(p) => p
            .get(name)?
            .ok_or_else(|| candle_core::Error::Msg("listed but not readable".into()))?
            .to_device(&opts.device)?,
    };
    // Non-contiguous torch storage (e.g. a transposed view saved as is) becomes contiguous
    // here once; every later use assumes the usual layout.
    t.to_dtype(opts.dtype)?.contiguous()
}

/// `Some(problem)` when `t` has a NaN or an infinity.
pub(crate) fn non_finite(t: &Tensor, file: &str, name: &str) -> Result<Option<CheckpointProblem>> {
    // One cheap reduction first: a finite sum means every value is finite (short of an
    // overflow, which only absurd weights reach, and those are worth a look anyway).
    let t32 = t.to_dtype(DType::F32)?;
    let sum = t32.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(None);
    }
    let values = t32.flatten_all()?.to_vec1::<f32>()?;
    let mut count = 0;
    let mut first = None;
    for (i, v) in values.iter().enumerate() {
        if !v.is_finite() {
            count += 1;
            first.get_or_insert(i);
        }
    }
    Ok(first.map(|first_index| CheckpointProblem::NonFinite {
        file: file.to_string(),
        tensor: name.to_string(),
        count,
        first_index,
    }))
}

/// Seeded random weights for benchmarks and tests, with the reference Mamba inits every
/// family's selective branch shares.
pub(crate) struct RandomWeights {
    rng: StdRng,
    device: Device,
}

impl RandomWeights {
    pub(crate) fn new(seed: u64, device: &Device) -> Self {
        RandomWeights {
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    pub(crate) fn uniform(&mut self, shape: &[usize], bound: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }

    pub(crate) fn normal(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box–Muller; u1 is kept away from 0 so the log is finite.
            let u1: f32 = self.rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = self.rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f32::consts::PI * u2;
            v.push(r * th.cos() * std);
            if v.len() < n {
                v.push(r * th.sin() * std);
            }
        }
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }

    pub(crate) fn fill(&self, shape: &[usize], f: impl Fn(&[usize]) -> f32) -> Result<Tensor> {
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            [r] => (*r, 1),
            _ => (shape.iter().product(), 1),
        };
        let mut v = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                v.push(f(&[r, c]));
            }
        }
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }

    /// S4D-real: `A_log[e, n] = log(n + 1)`.
    pub(crate) fn s4d_a_log(&self, e: usize, n: usize) -> Result<Tensor> {
        self.fill(&[e, n], |ix| ((ix[1] + 1) as f32).ln())
    }

    /// The dt bias: softplus⁻¹ of a log-uniform dt in [1e-3, 1e-1].
    pub(crate) fn dt_bias(&mut self, e: usize) -> Result<Tensor> {
        let (lo, hi) = (1e-3f32.ln(), 1e-1f32.ln());
        let dts: Vec<f32> = (0..e)
            .map(|_| {
                let dt = self.rng.random_range(lo..hi).exp().max(1e-4);
                // softplus⁻¹(dt) = dt + log(1 − exp(−dt))
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        Ok(Tensor::from_vec(dts, e, &self.device)?)
    }
}
