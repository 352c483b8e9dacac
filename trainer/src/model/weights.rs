//! Reading weight files, whatever the model family: memory-mapped safetensors and PyTorch
//! `.pth` / `.bin` state dicts, one tensor at a time, with the checks every loader shares
//! (non-finite values) and the `VarMap` full fine-tuning builds.

use std::path::Path;

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

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
