//! The Vision Mamba modules (hustvl/Vim `VisionMamba`, bimamba v2, middle class token), one
//! struct per module, built from a [`VarBuilder`] whose paths are the official key names.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use super::config::{VimConfig, cls_index};
use crate::error::{Error, Result};
use crate::kernels;
use crate::model::layers::{Linear, Param, Projection, RmsNorm};
use crate::model::selective::{BranchInput, SelectiveBranch};
use crate::model::{InputHook, MixerHook};

/// Train or eval. Drop-path only acts in training, and draws its masks from `seed` (one
/// seed per step: resuming from a checkpoint replays the same masks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

/// Named intermediate tensors, under the fixture names (`hidden.patch_embed`,
/// `hidden.block.<i>`, `hidden.mixer.<i>.{normed,y_fwd,y_bwd,out}`, `hidden.norm_f`).
pub type Trace = BTreeMap<String, Tensor>;

/// `Conv2d(channels, D, kernel = patch, stride)` written as a gather of patch pixels and one
/// matmul, so any stride (overlapping patches included) has a plain autograd backward. The
/// kernel is held flattened, `[D, C·p·p]` with its bias, as a [`Projection`] (the PEFT site of
/// LoRA on the patch embedding).
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    pub proj: Projection,
    channels: usize,
    patch: usize,
    stride: usize,
}

impl PatchEmbed {
    pub fn new(cfg: &VimConfig, vb: &VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.embed_dim, cfg.channels, cfg.patch_size);
        let vb = vb.pp("patch_embed").pp("proj");
        Ok(PatchEmbed {
            proj: Projection::new(Linear::new(
                vb.get((d, c, p, p), "weight")?.reshape((d, c * p * p))?,
                Some(vb.get(d, "bias")?),
            )),
            channels: c,
            patch: p,
            stride: cfg.stride,
        })
    }

    /// The kernel in the checkpoint's shape `[D, C, p, p]`.
    pub fn kernel(&self) -> Tensor {
        let w = self.proj.base().weight();
        // The flat kernel was made from this shape, so the reshape cannot fail.
        w.reshape(self.kernel_shape()).unwrap_or_else(|_| w.clone())
    }

    /// The checkpoint's kernel shape `[D, C, p, p]`.
    pub fn kernel_shape(&self) -> (usize, usize, usize, usize) {
        let d = self
            .proj
            .base()
            .weight()
            .dims()
            .first()
            .copied()
            .unwrap_or(0);
        (d, self.channels, self.patch, self.patch)
    }

    /// `[B, C, H, W]` → `[B, gh·gw, D]`, patches in row-major grid order.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (p, s) = (self.patch, self.stride);
        let grid = |n: usize| n.checked_sub(p).map(|r| r / s + 1);
        let (Some(gh), Some(gw)) = (grid(h), grid(w)) else {
            return Err(Error::input(
                "pixel_values",
                format!("image {h}×{w} is smaller than the patch size {p}"),
            ));
        };
        // Flat pixel index of every (patch, channel, dy, dx), in the weight's (C, p, p) order.
        let mut idx = Vec::with_capacity(gh * gw * c * p * p);
        for py in 0..gh {
            for px in 0..gw {
                for ch in 0..c {
                    for dy in 0..p {
                        for dx in 0..p {
                            let (y, x) = (py * s + dy, px * s + dx);
                            idx.push((ch * h * w + y * w + x) as u32);
                        }
                    }
                }
            }
        }
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, pixels.device())?;
        let cols = pixels
            .reshape((b, c * h * w))?
            .index_select(&idx, 1)?
            .reshape((b, gh * gw, c * p * p))?;
        Ok(self.proj.forward(&cols)?)
    }
}

/// The bidirectional mixer (bimamba v2): shared `in_proj` / `out_proj`, a forward branch and a
/// time-reversed backward branch with their own parameters, combined by mean (or sum).
#[derive(Clone, Debug)]
pub struct VimMixer {
    pub in_proj: Projection,
    pub out_proj: Projection,
    /// `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`.
    pub forward_branch: SelectiveBranch,
    /// `conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`.
    pub backward_branch: SelectiveBranch,
    /// Affix-tuning: per-direction prefix tokens ([`MixerHook::direction_prefix`]).
    pub hook: Option<Arc<dyn MixerHook>>,
    divide_out: bool,
    d_inner: usize,
    layer_idx: usize,
}

/// Runs `branch` on `x`, `z` `[b, L, E]` (backwards in time when `reverse`) with `prefix`
/// `[n, 2E]` tokens (X then Z) scanned before them, and returns the outputs of the L real
/// positions. Backwards, the prefix comes first in scan order, so it sits after the last
/// position in time, in reverse row order.
fn run_branch(
    branch: &SelectiveBranch,
    x: &Tensor,
    z: &Tensor,
    prefix: Option<&Tensor>,
    reverse: bool,
) -> Result<Tensor> {
    let input = BranchInput {
        reverse,
        ..BranchInput::default()
    };
    let Some(t) = prefix else {
        return Ok(branch.as_ref().forward(x, z, input)?.0);
    };
    let (b, l, e) = x.dims3()?;
    let n = t.dim(0)?;
    let t = t
        .to_dtype(x.dtype())?
        .unsqueeze(0)?
        .broadcast_as((b, n, 2 * e))?;
    let t = if reverse { kernels::flip_time(&t)? } else { t };
    let (tx, tz) = (t.narrow(2, 0, e)?, t.narrow(2, e, e)?);
    let (x, z, at) = if reverse {
        (Tensor::cat(&[x, &tx], 1)?, Tensor::cat(&[z, &tz], 1)?, 0)
    } else {
        (Tensor::cat(&[&tx, x], 1)?, Tensor::cat(&[&tz, z], 1)?, n)
    };
    let (y, _) = branch
        .as_ref()
        .forward(&x.contiguous()?, &z.contiguous()?, input)?;
    Ok(y.narrow(1, at, l)?.contiguous()?)
}

impl VimMixer {
    pub fn new(cfg: &VimConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let (d, e) = (cfg.embed_dim, cfg.d_inner());
        let dims = cfg.branch_dims();
        Ok(VimMixer {
            in_proj: Projection::new(Linear::new(
                vb.pp("in_proj").get((2 * e, d), "weight")?,
                None,
            )),
            out_proj: Projection::new(Linear::new(vb.pp("out_proj").get((d, e), "weight")?, None)),
            forward_branch: SelectiveBranch::new(dims, "", layer_idx, &vb)?,
            backward_branch: SelectiveBranch::new(dims, "_b", layer_idx, &vb)?,
            hook: None,
            divide_out: cfg.divide_out,
            d_inner: e,
            layer_idx,
        })
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }

    /// `h` `[b, L, D]` (normed) → `[b, L, D]`.
    pub fn forward(&self, h: &Tensor, trace: Option<&mut Trace>) -> Result<Tensor> {
        let e = self.d_inner;
        let xz = self.in_proj.forward(h)?;
        let x = xz.narrow(D::Minus1, 0, e)?.contiguous()?;
        let z = xz.narrow(D::Minus1, e, e)?.contiguous()?;
        let prefix = |backward: bool| -> Result<Option<Tensor>> {
            match &self.hook {
                Some(h) => Ok(h.direction_prefix(self.layer_idx, backward)?),
                None => Ok(None),
            }
        };
        let y_f = run_branch(&self.forward_branch, &x, &z, prefix(false)?.as_ref(), false)?;
        let y_b = run_branch(&self.backward_branch, &x, &z, prefix(true)?.as_ref(), true)?;
        let y = (&y_f + &y_b)?;
        let y = if self.divide_out { (y * 0.5)? } else { y };
        let out = self.out_proj.forward(&y)?;
        if let Some(t) = trace {
            let i = self.layer_idx;
            t.insert(format!("hidden.mixer.{i}.y_fwd"), y_f);
            t.insert(format!("hidden.mixer.{i}.y_bwd"), y_b);
            t.insert(format!("hidden.mixer.{i}.out"), out.clone());
        }
        Ok(out)
    }
}

/// A pre-norm block: `h = mixer(norm(r))`; the residual add happens in the model (hustvl's
/// blocks take and return `(h, r)`).
#[derive(Clone, Debug)]
pub struct VimBlock {
    pub norm: RmsNorm,
    pub mixer: VimMixer,
}

impl VimBlock {
    pub fn new(cfg: &VimConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        Ok(VimBlock {
            norm: RmsNorm::new(
                vb.pp("norm").get(cfg.embed_dim, "weight")?,
                cfg.norm_epsilon,
            ),
            mixer: VimMixer::new(cfg, layer_idx, vb.pp("mixer"))?,
        })
    }
}

/// Vision Mamba with its classification head.
#[derive(Clone, Debug)]
pub struct VimForImageClassification {
    pub config: VimConfig,
    pub patch_embed: PatchEmbed,
    /// `[1, 1, D]`.
    pub cls_token: Param,
    /// `[1, M+1, D]`, row `cls_index` belongs to the class token.
    pub pos_embed: Param,
    pub layers: Vec<VimBlock>,
    pub norm_f: RmsNorm,
    /// `[C, D]` + `[C]`.
    pub head: Linear,
    /// Inserts soft tokens after the class token and `pos_embed` (prompt-tuning); they run
    /// through every block and stay, and the head reads the class token where it moved.
    pub input_hook: Option<Arc<dyn InputHook>>,
}

/// Per-sample drop-path mask `[b, 1, 1]` (0 or 1/(1-p)), drawn from `(seed, site)`.
fn drop_path_mask(b: usize, p: f64, seed: u64, site: usize, dev: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (site as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let keep = 1.0 - p;
    let m: Vec<f32> = (0..b)
        .map(|_| {
            if rng.random::<f64>() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(m, (b, 1, 1), dev)?)
}

impl VimForImageClassification {
    pub fn new(cfg: &VimConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let layers = (0..cfg.depth)
            .map(|i| VimBlock::new(cfg, i, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(VimForImageClassification {
            config: cfg.clone(),
            patch_embed: PatchEmbed::new(cfg, &vb)?,
            cls_token: Param::new(vb.get((1, 1, d), "cls_token")?),
            pos_embed: Param::new(vb.get((1, cfg.seq_len(), d), "pos_embed")?),
            layers,
            norm_f: RmsNorm::new(vb.pp("norm_f").get(d, "weight")?, cfg.norm_epsilon),
            head: Linear::new(
                vb.pp("head").get((cfg.num_classes, d), "weight")?,
                Some(vb.pp("head").get(cfg.num_classes, "bias")?),
            ),
            input_hook: None,
        })
    }

    /// Every base tensor under its official (hustvl) checkpoint name.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let pe = &self.patch_embed;
        let mut out = vec![("patch_embed.proj.weight".to_string(), pe.kernel())];
        if let Some(b) = pe.proj.base().bias() {
            out.push(("patch_embed.proj.bias".to_string(), b.clone()));
        }
        out.extend([
            ("cls_token".to_string(), self.cls_token.base().clone()),
            ("pos_embed".to_string(), self.pos_embed.base().clone()),
        ]);
        for (i, block) in self.layers.iter().enumerate() {
            let p = format!("layers.{i}");
            out.push((format!("{p}.norm.weight"), block.norm.weight().clone()));
            let m = &block.mixer;
            let mut push =
                |name: String, t: &Tensor| out.push((format!("{p}.mixer.{name}"), t.clone()));
            push("in_proj.weight".into(), m.in_proj.base().weight());
            push("out_proj.weight".into(), m.out_proj.base().weight());
            for (b, s) in [(&m.forward_branch, ""), (&m.backward_branch, "_b")] {
                push(format!("conv1d{s}.weight"), b.conv_weight.base());
                if let Some(bias) = &b.conv_bias {
                    push(format!("conv1d{s}.bias"), bias.base());
                }
                push(format!("x_proj{s}.weight"), b.x_proj.base().weight());
                push(format!("dt_proj{s}.weight"), b.dt_proj.base().weight());
                push(format!("dt_proj{s}.bias"), b.dt_bias.base());
                push(format!("A{s}_log"), b.a_log.base());
                push(format!("D{s}"), b.d.base());
            }
        }
        out.push(("norm_f.weight".to_string(), self.norm_f.weight().clone()));
        out.push(("head.weight".to_string(), self.head.weight().clone()));
        if let Some(b) = self.head.bias() {
            out.push(("head.bias".to_string(), b.clone()));
        }
        out
    }

    /// Index of the class token for `m` patches.
    pub fn cls_index(&self, m: usize) -> usize {
        cls_index(self.config.cls_position, m)
    }

    /// Patch tokens with the class token inserted and `pos_embed` added: `[B, M+1, D]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4().map_err(|_| {
            Error::input(
                "pixel_values",
                format!(
                    "expected [batch, channels, height, width], found {:?}",
                    pixels.dims()
                ),
            )
        })?;
        if c != self.config.channels {
            return Err(Error::input(
                "pixel_values",
                format!("{c} channels, the model takes {}", self.config.channels),
            ));
        }
        let x = self.patch_embed.forward(pixels)?;
        let (b, m, d) = x.dims3()?;
        let pos = self.pos_embed.value()?;
        if pos.dim(1)? != m + 1 {
            return Err(Error::input(
                "pixel_values",
                format!(
                    "a {h}×{w} image gives {m} patches but pos_embed has {} rows (built for {:?}); \
                     rebuild the model for this image size",
                    pos.dim(1)?,
                    self.config.img_size
                ),
            ));
        }
        let ci = self.cls_index(m);
        let cls = self.cls_token.value()?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&x.narrow(1, 0, ci)?, &cls, &x.narrow(1, ci, m - ci)?], 1)?;
        Ok(x.broadcast_add(&pos)?)
    }

    /// The normed features at the class token `[B, D]`.
    pub fn forward_features(
        &self,
        pixels: &Tensor,
        mode: Mode,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let x = self.embed(pixels)?;
        if let Some(t) = trace.as_deref_mut() {
            t.insert("hidden.patch_embed".into(), x.clone());
        }
        let mut ci = self.cls_index(x.dim(1)? - 1);
        let x = match &self.input_hook {
            Some(hook) => {
                let (aug, _, pos) = hook.insert(&x, None)?;
                ci = pos
                    .to_vec1::<u32>()?
                    .get(ci)
                    .map(|&p| p as usize)
                    .ok_or_else(|| Error::input("pixel_values", "no class token position"))?;
                aug
            }
            None => x,
        };
        let b = x.dim(0)?;
        let drop = |h: Tensor, site: usize| -> Result<Tensor> {
            match mode {
                Mode::Train { seed } => {
                    let p = self.config.drop_path_at(site);
                    if p > 0.0 {
                        let m = drop_path_mask(b, p, seed, site, h.device())?;
                        return Ok(h.broadcast_mul(&m.to_dtype(h.dtype())?)?);
                    }
                    Ok(h)
                }
                Mode::Eval => Ok(h),
            }
        };
        // Residual stream in f32 (`residual_in_fp32`).
        let mut r = x.to_dtype(DType::F32)?;
        let mut h: Option<Tensor> = None;
        for (i, block) in self.layers.iter().enumerate() {
            if let Some(prev) = h.take() {
                r = (r + drop(prev, i)?.to_dtype(DType::F32)?)?;
            }
            let normed = block.norm.forward(&r.to_dtype(x.dtype())?)?;
            if let Some(t) = trace.as_deref_mut() {
                t.insert(format!("hidden.mixer.{i}.normed"), normed.clone());
            }
            let out = block.mixer.forward(&normed, trace.as_deref_mut())?;
            if let Some(t) = trace.as_deref_mut() {
                t.insert(
                    format!("hidden.block.{i}"),
                    (&r + &out.to_dtype(DType::F32)?)?,
                );
            }
            h = Some(out);
        }
        if let Some(prev) = h {
            r = (r + drop(prev, self.layers.len())?.to_dtype(DType::F32)?)?;
        }
        let out = self.norm_f.forward(&r.to_dtype(x.dtype())?)?;
        if let Some(t) = trace {
            t.insert("hidden.norm_f".into(), out.clone());
        }
        Ok(out.narrow(1, ci, 1)?.squeeze(1)?)
    }

    /// Logits `[B, C]`.
    pub fn forward(
        &self,
        pixels: &Tensor,
        mode: Mode,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let f = self.forward_features(pixels, mode, trace)?;
        Ok(self.head.forward(&f)?)
    }
}

/// Mean cross-entropy of `logits` `[B, C]` against integer `labels` `[B]`.
pub fn classification_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    if !matches!(labels.dtype(), DType::U32 | DType::I64 | DType::U8) {
        return Err(Error::input(
            "labels",
            format!(
                "dtype {:?} is not an integer type (expected I64 or U32)",
                labels.dtype()
            ),
        ));
    }
    if labels.dims() != [b] {
        return Err(Error::input(
            "labels",
            format!("shape {:?}, expected [{b}]", labels.dims()),
        ));
    }
    let values = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some((i, v)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| **v < 0 || **v as u64 >= c as u64)
    {
        return Err(Error::input(
            "labels",
            format!("label {v} at {i} is out of range for {c} classes"),
        ));
    }
    let lsm = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = lsm.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok((picked.sum_all()?.neg()? / b as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn config(img: [usize; 2], patch: usize, stride: usize) -> VimConfig {
        let text = serde_json::json!({
            "img_size": img, "patch_size": patch, "stride": stride, "embed_dim": 16,
            "depth": 2, "d_state": 4, "num_classes": 3, "use_middle_cls_token": true,
            "if_divide_out": true, "ssm_cfg": {"d_conv": 3, "expand": 2}
        });
        VimConfig::from_value(&text, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn patch_embed_equals_conv2d_for_any_stride_and_shape() -> Result<()> {
        let dev = Device::Cpu;
        for (img, p, s) in [([40, 24], 8, 4), ([20, 36], 6, 6), ([9, 13], 3, 2)] {
            let cfg = config(img, p, s);
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let pe = PatchEmbed::new(&cfg, &vb)?;
            let w = Tensor::randn(0f32, 1.0, (16, 3, p, p), &dev)?;
            let b = Tensor::randn(0f32, 1.0, 16, &dev)?;
            let pe = PatchEmbed {
                proj: Projection::new(Linear::new(w.reshape((16, 3 * p * p))?, Some(b.clone()))),
                ..pe
            };
            let x = Tensor::randn(0f32, 1.0, (2, 3, img[0], img[1]), &dev)?;
            let got = pe.forward(&x)?;
            let want = x
                .conv2d(&w, 0, s, 1, 1)?
                .broadcast_add(&b.reshape((1, 16, 1, 1))?)?
                .flatten_from(2)?
                .transpose(1, 2)?;
            let (gh, gw) = cfg.grid();
            assert_eq!(got.dims(), &[2, gh * gw, 16]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{img:?} p{p} s{s}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn odd_patch_count_puts_cls_at_the_floor_of_the_middle() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = config([24, 40], 8, 8); // 3 × 5 = 15 patches, cls at 7
        assert_eq!((cfg.num_patches(), cfg.cls_index()), (15, 7));
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = VimForImageClassification::new(&cfg, vb)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 24, 40), &dev)?;
        let emb = model.embed(&x)?;
        assert_eq!(emb.dims(), &[2, 16, 16]);
        let cls = emb
            .narrow(1, 7, 1)?
            .broadcast_sub(&model.pos_embed.value()?.narrow(1, 7, 1)?)?;
        let want = model.cls_token.value()?.broadcast_as((2, 1, 16))?;
        let diff = (cls - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let logits = model.forward(&x, Mode::Train { seed: 1 }, None)?;
        assert_eq!(logits.dims(), &[2, 3]);
        Ok(())
    }
}
