//! Image-classification data for the training loop: preprocessed images (`[N, C, H, W]`, the
//! model's evaluation transform already applied) and their class labels.
//!
//! The set is held in memory; streaming decode of large archives is the image service's
//! (issue "Image fine-tuning as a service"). `molt train` reads an image folder
//! ([`load_folder`]: one subfolder per class), each image through the model's evaluation
//! transform (no augmentation yet).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::TrainError;

/// Labelled images.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// `[N, C, H, W]` F32, normalised.
    pixels: Tensor,
    labels: Vec<u32>,
    num_classes: usize,
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
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= num_classes)
        {
            return Err(bad(format!(
                "label {l} of image {i} is outside the {num_classes} classes"
            )));
        }
        Ok(ImageSet {
            pixels: pixels.to_dtype(DType::F32)?,
            labels,
            num_classes,
        })
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
    pub fn collate(&self, idx: &[usize], device: &Device) -> candle_core::Result<ImageBatch> {
        let rows: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let rows = Tensor::from_vec(rows, idx.len(), self.pixels.device())?;
        let labels: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        Ok(ImageBatch {
            pixels: self.pixels.index_select(&rows, 0)?.to_device(device)?,
            labels: Tensor::from_vec(labels, idx.len(), device)?,
        })
    }
}

/// The most images a folder may hold for `molt train` (decoded into memory at once).
pub const MAX_FOLDER_IMAGES: usize = 100_000;

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

fn dataset_error(file: &Path, message: String) -> TrainError {
    TrainError::Dataset {
        errors: vec![super::DatasetError {
            file: file.to_path_buf(),
            line: None,
            message,
        }],
    }
}

/// The classes of an image folder (`class_name/*.png|jpg|jpeg|webp`): its subfolder names,
/// sorted; class `i` is the i-th name.
pub fn folder_classes(dir: &Path) -> Result<Vec<String>, TrainError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))?;
    let mut classes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(dir, e))?;
        if entry.path().is_dir() {
            classes.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    if classes.len() < 2 {
        return Err(dataset_error(
            dir,
            format!(
                "an image folder needs a subfolder per class (at least two), found {}",
                classes.len()
            ),
        ));
    }
    Ok(classes)
}

/// Every image of the folder, decoded and put through `transform`, labelled by the position of
/// its subfolder in `classes` (a subfolder not in `classes`, an empty class, an undecodable
/// file: an error naming it). Also returns every file, for fingerprints.
pub fn load_folder(
    dir: &Path,
    classes: &[String],
    transform: &crate::model::vim::EvalTransform,
) -> Result<(ImageSet, Vec<std::path::PathBuf>), TrainError> {
    let found = folder_classes(dir)?;
    if found != classes {
        return Err(dataset_error(
            dir,
            format!(
                "its classes [{}] differ from the training folder's [{}]",
                found.join(", "),
                classes.join(", ")
            ),
        ));
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let sub = dir.join(class);
        let mut paths: Vec<_> = std::fs::read_dir(&sub)
            .map_err(|e| TrainError::io(&sub, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(dataset_error(
                &sub,
                "the class has no image (png, jpg, jpeg, webp)".into(),
            ));
        }
        for p in paths {
            if files.len() >= MAX_FOLDER_IMAGES {
                return Err(dataset_error(
                    dir,
                    format!("more than {MAX_FOLDER_IMAGES} images"),
                ));
            }
            let img = crate::model::vim::EvalTransform::decode(&p)
                .map_err(|e| dataset_error(&p, e.to_string()))?;
            let t = transform
                .apply(&img, &Device::Cpu)
                .map_err(|e| dataset_error(&p, e.to_string()))?;
            pixels.push(t);
            labels.push(label as u32);
            files.push(p);
        }
    }
    let pixels = Tensor::stack(&pixels, 0)?;
    Ok((ImageSet::new(pixels, labels, classes.len())?, files))
}
