//! Vision Mamba (hustvl/Vim `vim/models_mamba.py` `VisionMamba`, bimamba v2, middle class
//! token; peft-spec §1.4), the image-classification family.
//!
//! - [`config`]: `config.json` with every `VisionMamba` kwarg by name.
//! - [`model`]: patch embedding (any kernel/stride, non-square images), class token at
//!   `M / 2`, `pos_embed` added after the insertion, pre-norm residual blocks with the
//!   residual in f32, the bidirectional mixer (shared `in_proj` / `out_proj`, a forward and a
//!   time-reversed backward [`SelectiveBranch`](crate::model::selective::SelectiveBranch)),
//!   `norm_f`, the head at the class token; seeded drop-path in training only.
//! - [`checkpoint`]: official key names from `model.safetensors` or `.pth`; fresh zero head
//!   when the checkpoint has none or another class count; `pos_embed` resize ([`pos_embed`]).
//! - [`init`]: a seeded random Vim (benchmarks, tests).
//! - [`transform`]: the evaluation transform (Pillow-exact bicubic resize, center crop,
//!   ImageNet normalisation).
//!
//! ```no_run
//! # fn main() -> trainer::Result<()> {
//! use trainer::model::vim::{Mode, VimForImageClassification, VimLoadOptions};
//! let model = VimForImageClassification::load("models/vim-s".as_ref(), &VimLoadOptions::default())?;
//! # let pixels = candle_core::Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let logits = model.forward(&pixels, Mode::Eval, None)?;
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod config;
pub mod init;
pub mod model;
pub mod pos_embed;
pub mod transform;

pub use checkpoint::{VimCheckpoint, VimLoadOptions};
pub use config::{ClsPosition, VimConfig};
pub use model::{
    Mode, PatchEmbed, Trace, VimBlock, VimForImageClassification, VimMixer, classification_loss,
};
pub use pos_embed::{PosEmbedResize, resize_pos_embed};
pub use transform::EvalTransform;
