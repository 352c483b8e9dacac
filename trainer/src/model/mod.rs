//! The Mamba-1 language model: config, checkpoint loading, modules, cache and loss.
//!
//! ```no_run
//! # fn main() -> trainer::Result<()> {
//! use trainer::model::{LoadOptions, MambaForCausalLM};
//! let model = MambaForCausalLM::load("models/mamba-130m".as_ref(), &LoadOptions::default())?;
//! # Ok(()) }
//! ```

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod init;
pub mod layers;
pub mod loss;
pub mod mamba;
pub mod rows;

pub use cache::{LayerCache, MambaCache};
pub use checkpoint::{Checkpoint, LoadOptions};
pub use config::{ConfigStyle, MambaConfig};
pub use layers::{
    Embedding, EmbeddingAdapter, Linear, LinearAdapter, LowRankTerm, Param, ParamAdapter,
    Projection, RmsNorm, RowSegments,
};
pub use loss::{IGNORE_INDEX, causal_lm_loss};
pub use mamba::{
    ForwardOutput, InputHook, MambaBlock, MambaForCausalLM, MambaMixer, MambaModel, MixerHook,
    ModelInput,
};
