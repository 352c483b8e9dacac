//! molt's storage layer: the database (SQLite or PostgreSQL, through one [`Db`] type), the
//! job queue (which is the `jobs` table — see [`Db::claim`] for leases and the fairness
//! rule), and the blob store ([`BlobStore`], over `object_store`: local directory, S3, or
//! memory).
//!
//! ```no_run
//! # async fn demo() -> storage::Result<()> {
//! use std::time::Duration;
//! let db = storage::Db::connect("sqlite:///tmp/molt/molt.db").await?;
//! db.migrate().await?;
//! let blobs = storage::BlobStore::local(std::path::Path::new("/tmp/molt/blobs"))?;
//! if let Some(job) = db.claim("worker-1", Duration::from_secs(60)).await? {
//!     let cancel = db.heartbeat(&job.id, "worker-1", Duration::from_secs(60)).await?;
//!     # let _ = (cancel, &blobs);
//! }
//! # Ok(()) }
//! ```
//!
//! Conventions: ids are generated here (`file-…`, `ftjob-…`, `ftevent-…`, `ftckpt-…`,
//! `adapter-…`, `tenant-…`, `key-…`); timestamps are unix seconds; every tenant-facing get
//! and list takes the tenant id and answers [`Error::NotFound`] for another tenant's rows;
//! lists are newest-first pages (`after` cursor = the last id of the previous page).

pub mod blob;
pub mod db;
pub mod error;
pub mod ids;

pub use blob::{
    BlobBackend, BlobMeta, BlobStore, BlobStream, BlobUpload, CommittedBlob, S3Config,
    UploadValidator,
};
pub use db::models::{
    Adapter, ApiKey, BaseModel, Checkpoint, EventLevel, FileRecord, FileStatus, Job, JobError,
    JobEvent, JobMetric, JobStatus, Page, Search, SearchStatus, SearchTrial, Tenant, TrialStatus,
};
pub use db::{
    Backend, Db, DbOptions, JobResult, NewAdapter, NewBaseModel, NewFile, NewJob, NewSearch,
    NewTrial, Progress, SearchChange, TrialUpdate,
};
pub use error::{Error, Result};
