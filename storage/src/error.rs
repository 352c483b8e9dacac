//! The crate's error type.
//!
//! Each variant carries the specifics a caller needs to build a useful message. A suggested
//! HTTP mapping for the API: [`Error::NotFound`] → 404, [`Error::Conflict`] and
//! [`Error::InvalidState`] → 409, [`Error::InvalidCursor`], [`Error::InvalidInput`] and
//! [`Error::Rejected`] → 400, [`Error::TooLarge`] → 413, [`Error::LeaseLost`] → (worker only) stop working on the job,
//! everything else → 500. [`Error::http_status`] returns exactly that.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such row for this tenant (another tenant's rows are reported the same way), or no
    /// such object in the blob store.
    #[error("no such {kind}: '{id}'")]
    NotFound { kind: &'static str, id: String },

    /// A uniqueness rule was broken (a duplicate name, id or idempotency key).
    #[error("conflict: {0}")]
    Conflict(String),

    /// The row exists but its state does not allow the operation.
    #[error("{kind} '{id}' is {state}; cannot {action}")]
    InvalidState {
        kind: &'static str,
        id: String,
        state: String,
        action: &'static str,
    },

    /// A worker tried to act on a job it no longer holds the lease of (it expired and another
    /// worker claimed the job, or the job finished or was cancelled meanwhile).
    #[error("worker '{worker_id}' no longer holds the lease on job '{job_id}'")]
    LeaseLost { job_id: String, worker_id: String },

    /// A pagination cursor (`after`) that names no row of this tenant.
    #[error("invalid pagination cursor: no {kind} '{id}'")]
    InvalidCursor { kind: &'static str, id: String },

    /// An argument the caller passed is malformed (a limit of 0, a bad object key, a bad URL).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// An upload's validator rejected the content; nothing was stored.
    #[error("upload rejected: {0}")]
    Rejected(String),

    /// An upload exceeded its size limit; nothing was stored.
    #[error("upload larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },

    /// The stream a caller uploaded from failed; nothing was stored.
    #[error("upload stream failed: {0}")]
    UploadStream(String),

    /// A row holds a value the code does not understand (a status written by a newer version).
    #[error("corrupt value in column {column}: {value:?}")]
    Corrupt { column: &'static str, value: String },

    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),

    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("object store error: {0}")]
    Blob(#[source] object_store::Error),

    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            id: id.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// The HTTP status the API should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::NotFound { .. } => 404,
            Error::Conflict(_) | Error::InvalidState { .. } => 409,
            Error::InvalidCursor { .. } | Error::InvalidInput(_) | Error::Rejected(_) => 400,
            Error::UploadStream(_) => 400,
            Error::TooLarge { .. } => 413,
            Error::LeaseLost { .. }
            | Error::Corrupt { .. }
            | Error::Database(_)
            | Error::Migrate(_)
            | Error::Blob(_)
            | Error::Io { .. } => 500,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return Error::Conflict(db.message().to_string());
        }
        Error::Database(e)
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => Error::NotFound {
                kind: "object",
                id: path,
            },
            object_store::Error::InvalidPath { source } => {
                Error::InvalidInput(format!("invalid object key: {source}"))
            }
            other => Error::Blob(other),
        }
    }
}
