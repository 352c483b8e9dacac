//! Image-classification data for the training loop: preprocessed images (`[N, C, H, W]`, the
//! model's evaluation transform already applied) and their class labels.
//!
//! The set is held in memory; streaming decode of large archives is the image service's
//! (issue "Image fine-tuning as a service").

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
