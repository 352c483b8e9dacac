//! molt's trainer library: the Mamba model, its kernels, and (later) PEFT and training.

pub mod error;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod peft;
pub mod search;
pub mod tokenizer;
pub mod train;

pub use error::{CheckpointProblem, Error, Result};
