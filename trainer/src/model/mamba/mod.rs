//! The Mamba-1 language model family (HF `MambaForCausalLM` and the original state-spaces
//! checkpoints): its config, loader, modules, decoding cache, random init and the batched
//! rows serving uses.

pub mod checkpoint;
pub mod config;
mod decode;
pub mod init;
pub mod model;

pub use model::*;
