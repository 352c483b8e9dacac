//! The Mamba-2 language model family (HF `Mamba2ForCausalLM`, mamba_ssm `MambaLMHeadModel`
//! with `ssm_cfg.layer = "Mamba2"`; peft-spec §1.5).
//!
//! - [`config`]: both namings, transformers' `+inf` encoding, refusals by field name.
//! - [`checkpoint`]: the tensors the config implies, loaded by the shared LM loader.
//! - [`init`]: a seeded random Mamba-2 (benchmarks, tests).
//! - [`model`]: the mixer (`in_proj` → conv over xBC → SSD scan → gated grouped RMSNorm →
//!   `out_proj`) inside the shared shell ([`crate::model::lm::CausalLm`]), which gives it the
//!   embedding, the blocks, the head, the cache, prefill and decode.

pub mod checkpoint;
pub mod config;
mod decode;
pub mod init;
pub mod model;

pub use checkpoint::Mamba2Checkpoint;
pub use config::Mamba2Config;
pub use model::{Mamba2Block, Mamba2Dims, Mamba2ForCausalLM, Mamba2Mixer, Mamba2Model};
