//! `PeftError`: everything a PEFT spec, an adapter file or a merge can get wrong. Messages
//! say what is valid, so a user can fix the request from the message alone.

use std::path::PathBuf;

/// Errors of [`crate::peft`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// `type` names no registered method.
    #[error("unknown PEFT method type `{got}`; valid types: {}", valid.join(", "))]
    UnknownMethod { got: String, valid: Vec<String> },

    /// The JSON of a method does not parse (missing/unknown field, wrong type, ...).
    #[error("invalid `{method}` config: {reason}")]
    InvalidConfig { method: String, reason: String },

    /// A rank (or another size) outside its valid range.
    #[error("{method}: {what} = {got} is out of range for {target}; valid: {min}..={max}")]
    OutOfRange {
        method: String,
        what: String,
        target: String,
        got: usize,
        min: usize,
        max: usize,
    },

    /// A target the model (or the method) does not have.
    #[error("{method}: unknown target `{target}`; valid: {}", valid.join(", "))]
    UnknownTarget {
        method: String,
        target: String,
        valid: Vec<String>,
    },

    /// ProDiaL's block count must divide the projector's input width.
    #[error(
        "prodial: r_b = {r_b} does not divide d_in = {d_in} of {target} (the blocks are \
         d_in / r_b wide); valid r_b: divisors of {d_in}, e.g. {examples}"
    )]
    BlocksDoNotDivide {
        target: String,
        r_b: usize,
        d_in: usize,
        examples: String,
    },

    /// A method on a site this model family does not have.
    #[error("{method} is not available on {family} models: {why}")]
    Unsupported {
        method: String,
        family: String,
        why: String,
    },

    /// Options that cannot hold together (two affixes, a scale and an alpha, ...).
    #[error("contradictory PEFT options: {0}")]
    Contradictory(String),

    /// A value that is not finite or not in its domain (a negative dropout, ...).
    #[error("{method}: `{field}` = {value} is invalid; valid: {valid}")]
    BadValue {
        method: String,
        field: String,
        value: String,
        valid: String,
    },

    /// The adapter was made for a different base model.
    #[error(
        "adapter is for another base model: the adapter records base identity {expected}, \
         this model is {found} ({detail})"
    )]
    WrongBase {
        expected: String,
        found: String,
        detail: String,
    },

    /// Adapter tensors missing, unexpected or misshaped.
    #[error("adapter tensors do not match the spec: {}", problems.join("; "))]
    Tensors { problems: Vec<String> },

    /// An adapter folder that cannot be read.
    #[error("{}: {reason}", path.display())]
    AdapterFile { path: PathBuf, reason: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The adapter holds a method that has no merged form.
    #[error("cannot merge: {method} is not mergeable ({reason})")]
    NotMergeable { method: String, reason: String },

    #[error(transparent)]
    Model(#[from] crate::error::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl PeftError {
    /// `method` needs a site the `family` does not have; `why` says which.
    pub(crate) fn unsupported(
        method: impl Into<String>,
        family: crate::model::Family,
        why: impl Into<String>,
    ) -> Self {
        PeftError::Unsupported {
            method: method.into(),
            family: family.name().into(),
            why: why.into(),
        }
    }

    pub(crate) fn config(method: &str, reason: impl Into<String>) -> Self {
        PeftError::InvalidConfig {
            method: method.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        PeftError::AdapterFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

pub type PeftResult<T> = std::result::Result<T, PeftError>;
