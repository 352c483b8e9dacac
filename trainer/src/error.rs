//! The trainer library's error type. Messages carry the file, the tensor and the numbers, so a
//! user can fix a checkpoint or an input from the message alone.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong in `trainer`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config field is missing, has the wrong type, or an impossible value.
    #[error("{}: field `{field}`: {reason}", path.display())]
    ConfigField {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error(
        "{}: unknown config style: expected `hidden_size` (Hugging Face MambaConfig) or \
         `d_model` (state-spaces MambaConfig)",
        path.display()
    )]
    UnknownConfigStyle { path: PathBuf },

    #[error("{}: unsupported model: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },

    #[error(
        "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, \
         *.safetensors, pytorch_model.bin.index.json and pytorch_model.bin)",
        dir.display()
    )]
    NoWeights { dir: PathBuf },

    /// A weights file exists but cannot be opened or parsed.
    #[error("{}: cannot read weights: {reason}", path.display())]
    WeightFile { path: PathBuf, reason: String },

    /// The checkpoint does not match its config (missing, extra or misshaped tensors,
    /// non-finite values, ...). Every problem found is listed.
    #[error("invalid checkpoint in {}: {}", dir.display(), ProblemList(problems))]
    Checkpoint {
        dir: PathBuf,
        problems: Vec<CheckpointProblem>,
    },

    /// Bad model input (token ids, masks, labels, generation settings). `field` names the
    /// input, e.g. `input_ids`.
    #[error("{field}: {reason}")]
    Input { field: String, reason: String },

    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn input(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Input {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// One thing wrong with a checkpoint. `file` is the weights file (or files) concerned.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CheckpointProblem {
    Missing {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        why: String,
    },
    Unexpected {
        file: String,
        tensor: String,
        shape: Vec<usize>,
    },
    Shape {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        why: String,
    },
    /// The config says one thing and the tensors another (layer count, biases, ...).
    ConfigContradiction {
        file: String,
        tensor: String,
        detail: String,
    },
    Dtype {
        file: String,
        tensor: String,
        dtype: String,
    },
    NonFinite {
        file: String,
        tensor: String,
        count: usize,
        first_index: usize,
    },
    Duplicate {
        tensor: String,
        files: Vec<String>,
    },
}

impl fmt::Display for CheckpointProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointProblem::Missing {
                file,
                tensor,
                expected,
                why,
            } => write!(
                f,
                "{file}: missing tensor `{tensor}` (expected shape {expected:?}, {why})"
            ),
            CheckpointProblem::Unexpected {
                file,
                tensor,
                shape,
            } => write!(
                f,
                "{file}: unexpected tensor `{tensor}` with shape {shape:?} (not part of a Mamba-1 model with this config)"
            ),
            CheckpointProblem::Shape {
                file,
                tensor,
                expected,
                found,
                why,
            } => write!(
                f,
                "{file}: tensor `{tensor}` has shape {found:?}, expected {expected:?} ({why})"
            ),
            CheckpointProblem::ConfigContradiction {
                file,
                tensor,
                detail,
            } => write!(
                f,
                "{file}: tensor `{tensor}` contradicts config.json: {detail}"
            ),
            CheckpointProblem::Dtype {
                file,
                tensor,
                dtype,
            } => write!(
                f,
                "{file}: tensor `{tensor}` has dtype {dtype}, expected a floating-point dtype"
            ),
            CheckpointProblem::NonFinite {
                file,
                tensor,
                count,
                first_index,
            } => write!(
                f,
                "{file}: tensor `{tensor}` has {count} non-finite value(s) (NaN or infinity), the first at flat index {first_index}"
            ),
            CheckpointProblem::Duplicate { tensor, files } => {
                write!(f, "tensor `{tensor}` appears in several files: {files:?}")
            }
        }
    }
}

struct ProblemList<'a>(&'a [CheckpointProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A broken conversion can produce hundreds of problems; the first few say enough.
        const SHOWN: usize = 12;
        match self.0 {
            [] => write!(f, "no details"),
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems:", many.len())?;
                for p in many.iter().take(SHOWN) {
                    write!(f, "\n  - {p}")?;
                }
                if many.len() > SHOWN {
                    write!(f, "\n  - ... and {} more", many.len() - SHOWN)?;
                }
                Ok(())
            }
        }
    }
}
