//! Vim's evaluation transform (`vim/datasets.py build_transform(is_train=False)`), the family's
//! input pipeline: decode → RGB → resize the short side to `int(input_size / 0.875)` with
//! Pillow's BICUBIC → center crop `input_size` → `/255` → normalise with the ImageNet mean and
//! std. For `input_size <= 32` hustvl skips the resize and the crop.
//!
//! The resize reproduces Pillow's `Image.resize(BICUBIC)` (`libImaging/Resample.c`) exactly:
//! Keys cubic with a = −0.5, support 2 scaled by the downscale factor (antialiased when
//! shrinking), pixel centres `(i + 0.5)·scale`, weights normalised then fixed point with 22
//! bits, a horizontal then a vertical pass, each rounded and clipped to u8. So a model
//! evaluated here sees the pixels it saw under torchvision.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The transform's settings (the data config lives with the model, as in timm).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalTransform {
    /// Output `[H, W]`.
    pub input_size: [usize; 2],
    /// `eval_crop_ratio` (hustvl: 0.875).
    pub crop_ratio: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl EvalTransform {
    /// hustvl's transform for a model of `img_size`.
    pub fn for_image_size(img_size: [usize; 2]) -> Self {
        EvalTransform {
            input_size: img_size,
            crop_ratio: 0.875,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Short-side target of the resize; `None` when hustvl skips resize and crop
    /// (`input_size <= 32`). For a non-square `input_size` the larger side is used, so the
    /// crop always fits.
    pub fn resize_to(&self) -> Option<usize> {
        let s = self.input_size[0].max(self.input_size[1]);
        (s > 32).then(|| (s as f64 / self.crop_ratio) as usize)
    }

    /// Decodes an image file (PNG, JPEG, WebP) to RGB.
    pub fn decode(path: &Path) -> Result<image::RgbImage> {
        let img = image::open(path).map_err(|e| Error::Input {
            field: path.display().to_string(),
            reason: format!("cannot decode image: {e}"),
        })?;
        Ok(img.to_rgb8())
    }

    /// Resize + center crop: the u8 pixels `[3, H, W]` (channel-major).
    pub fn crop_u8(&self, img: &image::RgbImage) -> Result<(Vec<u8>, [usize; 2])> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let [sh, sw] = self.input_size;
        let (img, w, h) = match self.resize_to() {
            None => (img.clone(), w, h),
            Some(size) => {
                let (short, long) = (w.min(h), w.max(h));
                if short == 0 {
                    return Err(Error::input("image", "empty image"));
                }
                let new_long = (size as f64 * long as f64 / short as f64) as usize;
                let (nw, nh) = if w <= h {
                    (size, new_long)
                } else {
                    (new_long, size)
                };
                (pil_bicubic_resize(img, nw, nh), nw, nh)
            }
        };
        if w < sw || h < sh {
            return Err(Error::input(
                "image",
                format!("{w}×{h} is smaller than the {sw}×{sh} crop"),
            ));
        }
        let top = ((h - sh) as f64 / 2.0).round_ties_even() as usize;
        let left = ((w - sw) as f64 / 2.0).round_ties_even() as usize;
        let mut out = vec![0u8; 3 * sh * sw];
        for y in 0..sh {
            for x in 0..sw {
                let p = img.get_pixel((left + x) as u32, (top + y) as u32);
                for c in 0..3 {
                    out[c * sh * sw + y * sw + x] = p[c];
                }
            }
        }
        Ok((out, [sh, sw]))
    }

    /// The model input `[3, H, W]` (f32) of one image.
    pub fn apply(&self, img: &image::RgbImage, device: &Device) -> Result<Tensor> {
        let (px, [h, w]) = self.crop_u8(img)?;
        let plane = h * w;
        let v: Vec<f32> = px
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = i / plane;
                (p as f32 / 255.0 - self.mean[c]) / self.std[c]
            })
            .collect();
        Ok(Tensor::from_vec(v, (3, h, w), device)?)
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: for each output index, the first
/// input index and the fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|v| {
                    let v = if total != 0.0 { v / total } else { *v };
                    let scaled = v * (1u64 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + scaled) as i64
                    } else {
                        (0.5 + scaled) as i64
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow `Image.resize((w, h), BICUBIC)` on an RGB image, bit for bit.
pub fn pil_bicubic_resize(img: &image::RgbImage, out_w: usize, out_h: usize) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as Pillow does).
    let (tmp, tw) = if out_w != w {
        let kx = coeffs(w, out_w);
        let mut tmp = vec![0u8; out_w * h * 3];
        for y in 0..h {
            for (xx, (xmin, k)) in kx.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = half;
                    for (i, kv) in k.iter().enumerate() {
                        ss += src[(y * w + xmin + i) * 3 + c] as i64 * kv;
                    }
                    tmp[(y * out_w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        (tmp, out_w)
    } else {
        (src.clone(), w)
    };
    let out = if out_h != h {
        let ky = coeffs(h, out_h);
        let mut out = vec![0u8; tw * out_h * 3];
        for (yy, (ymin, k)) in ky.iter().enumerate() {
            for x in 0..tw {
                for c in 0..3 {
                    let mut ss = half;
                    for (i, kv) in k.iter().enumerate() {
                        ss += tmp[((ymin + i) * tw + x) * 3 + c] as i64 * kv;
                    }
                    out[(yy * tw + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        tmp
    };
    // The buffer has exactly out_w · out_h · 3 bytes by construction.
    image::RgbImage::from_raw(tw as u32, out_h as u32, out)
        .unwrap_or_else(|| image::RgbImage::new(tw as u32, out_h as u32))
}
