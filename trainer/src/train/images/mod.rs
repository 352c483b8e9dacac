//! Image-classification data for the training loop: labelled images, preprocessed by the
//! model's evaluation transform (the papers' vision recipe, spec §6.1, uses no augmentation:
//! resize, bicubic, ImageNet mean/std), batched `[b, C, H, W]`.
//!
//! A set is either in memory (tests, benchmarks) or streamed from a dataset file
//! ([`source`]): an image is read and decoded only when its batch is built, in parallel, and
//! the loop asks for the next step's batch ahead ([`ImageSet::prefetch`]) so that decoding
//! runs on other threads while the current step trains. Memory holds at most two steps of
//! decoded images, however large the archive.

pub mod source;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{DType, Device, Tensor};

pub use source::{ImageFormat, ImageIndex, ImageLimits, Role, Scanned};

use super::{DatasetError, TrainError};
use crate::model::vim::EvalTransform;

/// Labelled images.
#[derive(Debug, Clone)]
pub struct ImageSet {
    store: Store,
    labels: Vec<u32>,
    num_classes: usize,
}

#[derive(Debug, Clone)]
enum Store {
    /// `[N, C, H, W]` F32, normalised.
    Memory(Tensor),
    Streamed(Arc<Streamed>),
}

/// Pixels of one batch of examples, decoded ahead of use.
type Decoded = Result<Tensor, TrainError>;

#[derive(Debug)]
struct Streamed {
    index: ImageIndex,
    transform: EvalTransform,
    /// The dataset file, for messages.
    file: std::path::PathBuf,
    ahead: Mutex<Option<(Vec<usize>, JoinHandle<Decoded>)>>,
}

/// One micro-batch of images.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `[b, C, H, W]`.
    pub pixels: Tensor,
    /// `[b]` U32.
    pub labels: Tensor,
}

impl ImageSet {
    /// Checks that `pixels` is `[N, C, H, W]` with one label per image, each below
    /// `num_classes`.
    pub fn new(pixels: Tensor, labels: Vec<u32>, num_classes: usize) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::Method(format!("image set: {reason}"));
        let dims = pixels.dims().to_vec();
        if dims.len() != 4 {
            return Err(bad(format!("pixels must be [N, C, H, W], found {dims:?}")));
        }
        if dims[0] != labels.len() {
            return Err(bad(format!(
                "{} images but {} labels",
                dims[0],
                labels.len()
            )));
        }
        check_labels(&labels, num_classes).map_err(bad)?;
        Ok(ImageSet {
            store: Store::Memory(pixels.to_dtype(DType::F32)?),
            labels,
            num_classes,
        })
    }

    /// The examples of `index`, read and decoded when batched; `file` names the dataset in
    /// errors.
    pub fn streamed(index: ImageIndex, transform: EvalTransform, file: &Path) -> Self {
        let labels = index.entries.iter().map(|e| e.label).collect();
        let num_classes = index.classes.len();
        ImageSet {
            store: Store::Streamed(Arc::new(Streamed {
                index,
                transform,
                file: file.to_path_buf(),
                ahead: Mutex::new(None),
            })),
            labels,
            num_classes,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The images `idx`, in that order, on `device`.
    pub fn collate(&self, idx: &[usize], device: &Device) -> Result<ImageBatch, TrainError> {
        let labels: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        let pixels = match &self.store {
            Store::Memory(pixels) => {
                let rows: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                let rows = Tensor::from_vec(rows, idx.len(), pixels.device())?;
                pixels.index_select(&rows, 0)?
            }
            Store::Streamed(s) => {
                let ahead = s.ahead.lock().ok().and_then(|mut a| a.take());
                match ahead {
                    Some((want, handle)) if want == idx => handle.join().unwrap_or_else(|_| {
                        Err(TrainError::Method("image decoding panicked".into()))
                    })?,
                    _ => s.decode_batch(idx)?,
                }
            }
        };
        Ok(ImageBatch {
            pixels: pixels.to_device(device)?,
            labels: Tensor::from_vec(labels, idx.len(), device)?,
        })
    }

    /// Starts decoding the images `idx` on other threads; the next [`collate`] of exactly
    /// `idx` takes them. A no-op for in-memory sets.
    ///
    /// [`collate`]: ImageSet::collate
    pub fn prefetch(&self, idx: &[usize]) {
        let Store::Streamed(s) = &self.store else {
            return;
        };
        let s2 = s.clone();
        let want = idx.to_vec();
        let job = want.clone();
        let handle = std::thread::Builder::new()
            .name("molt-images".into())
            .spawn(move || s2.decode_batch(&job));
        if let (Ok(handle), Ok(mut slot)) = (handle, s.ahead.lock()) {
            *slot = Some((want, handle));
        }
    }
}

impl Streamed {
    /// Reads, decodes and transforms the images `idx` in parallel: `[b, 3, H, W]`.
    fn decode_batch(&self, idx: &[usize]) -> Result<Tensor, TrainError> {
        use rayon::prelude::*;
        let images: Vec<Result<Tensor, TrainError>> = idx
            .par_iter()
            .map(|&i| {
                let name = || {
                    self.index
                        .entries
                        .get(i)
                        .map(|e| e.name.clone())
                        .unwrap_or_default()
                };
                let bad = |m: String| dataset_error(&self.file, format!("{}: {m}", name()));
                let img = self.index.decode(i).map_err(bad)?;
                self.transform
                    .apply(&img, &Device::Cpu)
                    .map_err(|e| bad(e.to_string()))
            })
            .collect();
        let images = images.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::stack(&images, 0)?)
    }
}

fn check_labels(labels: &[u32], num_classes: usize) -> Result<(), String> {
    match labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= num_classes)
    {
        Some((i, l)) => Err(format!(
            "label {l} of image {i} is outside the {num_classes} classes"
        )),
        None => Ok(()),
    }
}

fn dataset_error(file: &Path, message: String) -> TrainError {
    TrainError::Dataset {
        errors: vec![DatasetError {
            file: file.to_path_buf(),
            line: None,
            message,
        }],
    }
}

/// The image dataset at `path` (any format of [`source`]), scanned without decoding;
/// `scratch` receives a tar.gz's decompressed tar.
pub fn scan(path: &Path, scratch: &Path) -> Result<Scanned, TrainError> {
    source::scan(path, &ImageLimits::default(), scratch).map_err(TrainError::dataset)
}

/// The set `role` plays in `scanned`, streamed through `transform`; refuses classes other
/// than `classes` (a validation file must share the training file's).
pub fn open(
    scanned: &Scanned,
    role: Role,
    classes: &[String],
    transform: &EvalTransform,
    file: &Path,
) -> Result<ImageSet, TrainError> {
    if scanned.classes != classes {
        return Err(dataset_error(
            file,
            format!(
                "its classes [{}] differ from the training data's [{}]",
                scanned.classes.join(", "),
                classes.join(", ")
            ),
        ));
    }
    let index = scanned.role(role);
    if index.is_empty() {
        return Err(dataset_error(file, "no images for this split".into()));
    }
    Ok(ImageSet::streamed(index, transform.clone(), file))
}

/// The file of a vision adapter's folder naming its classes (a JSON array, class `i` first
/// at `i`), written next to `adapter_config.json` so that whoever serves the adapter can name
/// its predictions.
pub const CLASSES_FILE: &str = "classes.json";

/// Writes [`CLASSES_FILE`] into `dir`.
pub fn write_classes(dir: &Path, classes: &[String]) -> Result<(), TrainError> {
    let path = dir.join(CLASSES_FILE);
    let text = serde_json::to_string_pretty(classes)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| TrainError::io(path, e))
}

/// The class names of an adapter folder, when it has [`CLASSES_FILE`].
pub fn read_classes(dir: &Path) -> Result<Option<Vec<String>>, TrainError> {
    let path = dir.join(CLASSES_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| dataset_error(&path, format!("not a JSON array of class names: {e}")))
}

/// A private scratch folder (a tar.gz's decompressed tar), removed when dropped.
#[derive(Debug)]
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new() -> Result<Self, TrainError> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("molt-images-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        Ok(Scratch(dir))
    }

    /// A subfolder, created.
    pub fn sub(&self, name: &str) -> Result<std::path::PathBuf, TrainError> {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        Ok(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
