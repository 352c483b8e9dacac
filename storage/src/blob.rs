//! The blob store: datasets, checkpoints, adapters and models, through `object_store`.
//!
//! Backends: a local directory (the embedded default), an S3-compatible bucket
//! (`s3://bucket/prefix`; endpoint, region and credentials from the usual `AWS_*`
//! environment variables such as `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`), or memory (tests).
//!
//! Keys are `/`-separated relative paths (`files/file-abc`, `adapters/adapter-x/config.json`);
//! prefixes match whole segments (`a/b` lists `a/b/c` but not `a/bc`).
//!
//! **Uploads are never half-visible.** [`BlobStore::upload`] streams to a temporary key under
//! [`TMP_PREFIX`] (one PUT for small objects, a multipart upload with bounded memory for
//! large ones); only [`BlobUpload::commit`] moves the complete object to its final key
//! (a rename on the local filesystem, copy + delete on S3). [`BlobUpload::abort`], a
//! validator failure, a failing source stream, or dropping the upload leaves nothing under
//! the final key. A process killed mid-upload may leave a temporary object behind:
//! [`BlobStore::cleanup_stale_uploads`] removes those.
//!
//! Limits: on S3 a single copy is limited to 5 GiB, so committed objects must be smaller.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::ids::new_id;

/// Where unfinished uploads live (never a valid user key).
pub const TMP_PREFIX: &str = ".molt-tmp/uploads";

/// Default multipart part size (S3 needs at least 5 MiB per part).
pub const DEFAULT_CHUNK_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploaded concurrently per upload. Peak memory per upload is about
/// `chunk_size × (MAX_PARTS_IN_FLIGHT + 1)`.
pub const MAX_PARTS_IN_FLIGHT: usize = 2;

/// Which kind of store a [`BlobStore`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobBackend {
    Local,
    S3,
    Memory,
}

/// Metadata of a stored object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobMeta {
    /// Key relative to the store's root (and prefix).
    pub key: String,
    pub size: u64,
    /// Unix seconds.
    pub last_modified: i64,
    pub e_tag: Option<String>,
}

impl BlobMeta {
    fn from_object(meta: ObjectMeta) -> Self {
        BlobMeta {
            key: meta.location.to_string(),
            size: meta.size,
            last_modified: meta.last_modified.timestamp(),
            e_tag: meta.e_tag,
        }
    }
}

/// What a committed upload produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CommittedBlob {
    pub key: String,
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

/// A streamed object: its size and its bytes.
pub struct BlobStream {
    pub size: u64,
    pub stream: BoxStream<'static, Result<Bytes>>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("size", &self.size)
            .finish()
    }
}

/// S3 settings; `None` fields come from the `AWS_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints (local test servers).
    pub allow_http: Option<bool>,
}

/// Checks an upload's content as it streams past. Any error rejects the upload.
pub trait UploadValidator: Send {
    /// Sees every chunk in order.
    fn update(&mut self, chunk: &[u8]) -> std::result::Result<(), String>;
    /// Called once after the last chunk.
    fn finish(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
}

impl<F> UploadValidator for F
where
    F: FnMut(&[u8]) -> std::result::Result<(), String> + Send,
{
    fn update(&mut self, chunk: &[u8]) -> std::result::Result<(), String> {
        self(chunk)
    }
}

/// The blob store. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    backend: BlobBackend,
    description: String,
    /// Root directory for the local backend (stale staging files are cleaned there).
    local_root: Option<PathBuf>,
    chunk_size: usize,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl std::fmt::Display for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// Validates a user key and turns it into an object path.
fn key_path(key: &str) -> Result<Path> {
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return Err(Error::InvalidInput(format!(
            "object key '{key}' must be a non-empty relative path without a trailing '/'"
        )));
    }
    let path = Path::parse(key)
        .map_err(|e| Error::InvalidInput(format!("bad object key '{key}': {e}")))?;
    if path
        .parts()
        .any(|p| p.as_ref() == "." || p.as_ref() == "..")
    {
        return Err(Error::InvalidInput(format!("bad object key '{key}'")));
    }
    if key == TMP_PREFIX || key.starts_with(&format!("{TMP_PREFIX}/")) {
        return Err(Error::InvalidInput(format!(
            "object key '{key}' is in the reserved prefix {TMP_PREFIX}"
        )));
    }
    // The local backend uses `name#<digits>` for its own staging files.
    if let Some((_, suffix)) = path.filename().and_then(|f| f.rsplit_once('#'))
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Error::InvalidInput(format!(
            "object key '{key}' may not end in '#<digits>'"
        )));
    }
    Ok(path)
}

/// A prefix: `""` is the whole store.
fn prefix_path(prefix: &str) -> Result<Option<Path>> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(None);
    }
    Ok(Some(key_path(trimmed)?))
}

/// Maps object_store's not-found to one naming the caller's key.
fn map_err(key: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::not_found("object", key),
        other => Error::from(other),
    }
}

impl BlobStore {
    fn new(store: Arc<dyn ObjectStore>, backend: BlobBackend, description: String) -> Self {
        BlobStore {
            store,
            backend,
            description,
            local_root: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }

    /// A store in a local directory (created if missing). Writes are fsynced.
    pub fn local(dir: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let fs = LocalFileSystem::new_with_prefix(&root)?
            .with_automatic_cleanup(true)
            .with_fsync(true);
        let mut store = BlobStore::new(
            Arc::new(fs),
            BlobBackend::Local,
            format!("local:{}", root.display()),
        );
        store.local_root = Some(root);
        Ok(store)
    }

    /// An in-memory store (tests).
    pub fn memory() -> Self {
        BlobStore::new(
            Arc::new(InMemory::new()),
            BlobBackend::Memory,
            "memory".into(),
        )
    }

    /// An S3-compatible store from `s3://bucket[/prefix]`, configured from the environment.
    pub fn s3_from_env(url: &str) -> Result<Self> {
        BlobStore::s3(&S3Config {
            url: url.to_string(),
            ..S3Config::default()
        })
    }

    /// An S3-compatible store; unset fields fall back to the `AWS_*` environment variables.
    pub fn s3(config: &S3Config) -> Result<Self> {
        let rest = config
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| Error::InvalidInput(format!("'{}' is not an s3:// URL", config.url)))?;
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(Error::InvalidInput(format!(
                "no bucket in '{}' (expected s3://bucket/prefix)",
                config.url
            )));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(allow) = config.allow_http {
            builder = builder.with_allow_http(allow);
        }
        let s3 = builder.build()?;
        let description = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let store: Arc<dyn ObjectStore> = match prefix_path(prefix)? {
            None => Arc::new(s3),
            Some(p) => Arc::new(PrefixStore::new(s3, p)),
        };
        tracing::info!(store = %description, "S3 blob store configured");
        Ok(BlobStore::new(store, BlobBackend::S3, description))
    }

    /// A store from a `--store` value: `s3://bucket/prefix`, `memory:`, `file:///dir`, or a
    /// plain directory path.
    pub fn from_url(spec: &str) -> Result<Self> {
        if spec.starts_with("s3://") {
            BlobStore::s3_from_env(spec)
        } else if spec == "memory:" || spec == "memory://" {
            Ok(BlobStore::memory())
        } else if let Some(path) = spec.strip_prefix("file://") {
            BlobStore::local(FsPath::new(path))
        } else if spec.contains("://") {
            Err(Error::InvalidInput(format!(
                "unsupported store URL '{spec}': use s3://bucket/prefix or a directory"
            )))
        } else {
            BlobStore::local(FsPath::new(spec))
        }
    }

    /// Sets the multipart part size (at least 5 MiB for S3; smaller is fine elsewhere).
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size.max(1);
        self
    }

    pub fn backend(&self) -> BlobBackend {
        self.backend
    }

    /// The underlying `object_store` (for callers that need its full API).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    // ----- writing -----------------------------------------------------------------------

    /// Stores a small object in one atomic PUT.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<CommittedBlob> {
        let path = key_path(key)?;
        let size = data.len() as u64;
        let sha256 = hex::encode(Sha256::digest(&data));
        self.store
            .put(&path, PutPayload::from(data))
            .await
            .map_err(|e| map_err(key, e))?;
        Ok(CommittedBlob {
            key: key.to_string(),
            size,
            sha256,
        })
    }

    /// Starts a streaming upload that becomes visible under `key` only on
    /// [`BlobUpload::commit`].
    pub fn upload(&self, key: &str) -> Result<BlobUpload> {
        let final_path = key_path(key)?;
        let tmp_path = Path::from(format!("{TMP_PREFIX}/{}", new_id("upload")));
        Ok(BlobUpload {
            store: Arc::clone(&self.store),
            key: key.to_string(),
            final_path,
            tmp_path,
            chunk_size: self.chunk_size,
            state: UploadState::Buffering(Vec::new()),
            bytes: 0,
            hasher: Sha256::new(),
        })
    }

    /// Streams `stream` into `key`: every chunk goes past `validator` (if any) and the size
    /// limit; the object is committed only if the stream ends cleanly and the validator's
    /// `finish` accepts it. Otherwise nothing is stored and the error says why
    /// ([`Error::Rejected`], [`Error::TooLarge`], [`Error::UploadStream`]).
    pub async fn put_stream<S, B, E>(
        &self,
        key: &str,
        stream: S,
        max_bytes: Option<u64>,
        mut validator: Option<&mut dyn UploadValidator>,
    ) -> Result<CommittedBlob>
    where
        S: Stream<Item = std::result::Result<B, E>> + Send,
        B: AsRef<[u8]> + Send,
        E: std::fmt::Display,
    {
        let mut upload = self.upload(key)?;
        let mut stream = std::pin::pin!(stream);
        let outcome: Result<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Error::UploadStream(e.to_string()))?;
                let chunk = chunk.as_ref();
                if let Some(limit) = max_bytes
                    && upload.bytes_written() + chunk.len() as u64 > limit
                {
                    return Err(Error::TooLarge { limit });
                }
                if let Some(v) = validator.as_deref_mut() {
                    v.update(chunk).map_err(Error::Rejected)?;
                }
                upload.write(chunk).await?;
            }
            if let Some(v) = validator.as_deref_mut() {
                v.finish().map_err(Error::Rejected)?;
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => upload.commit().await,
            Err(e) => {
                if let Err(abort_err) = upload.abort().await {
                    tracing::warn!(key, error = %abort_err, "could not abort upload");
                }
                Err(e)
            }
        }
    }

    /// Uploads one local file to `key` (streaming).
    pub async fn upload_file(&self, path: &FsPath, key: &str) -> Result<CommittedBlob> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut upload = self.upload(key)?;
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = match tokio::io::AsyncReadExt::read(&mut file, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(Error::io(path, e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = upload.write(&buf[..n]).await {
                let _ = upload.abort().await;
                return Err(e);
            }
        }
        upload.commit().await
    }

    /// Uploads every regular file under `dir` (recursively) to `prefix/<relative path>`.
    /// Each file is committed on its own; write a marker object last if readers need the
    /// whole folder at once. Returns the uploaded objects, sorted by key.
    pub async fn upload_dir(&self, dir: &FsPath, prefix: &str) -> Result<Vec<CommittedBlob>> {
        let prefix = prefix.trim_matches('/');
        let mut files = Vec::new();
        collect_files(dir, dir, &mut files).await?;
        files.sort();
        let mut out = Vec::with_capacity(files.len());
        for (rel, path) in files {
            let key = if prefix.is_empty() {
                rel
            } else {
                format!("{prefix}/{rel}")
            };
            out.push(self.upload_file(&path, &key).await?);
        }
        tracing::debug!(dir = %dir.display(), prefix, files = out.len(), "directory uploaded");
        Ok(out)
    }

    // ----- reading -----------------------------------------------------------------------

    /// A whole object in memory.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let path = key_path(key)?;
        let res = self.store.get(&path).await.map_err(|e| map_err(key, e))?;
        res.bytes().await.map_err(|e| map_err(key, e))
    }

    /// An object as a stream of chunks.
    pub async fn get_stream(&self, key: &str) -> Result<BlobStream> {
        let path = key_path(key)?;
        let res = self.store.get(&path).await.map_err(|e| map_err(key, e))?;
        let size = res.meta.size;
        let key = key.to_string();
        let stream = res.into_stream().map_err(move |e| map_err(&key, e)).boxed();
        Ok(BlobStream { size, stream })
    }

    /// Bytes `range` (end exclusive) of an object.
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        if range.start > range.end {
            return Err(Error::InvalidInput(format!(
                "bad range {}..{}",
                range.start, range.end
            )));
        }
        let path = key_path(key)?;
        self.store
            .get_range(&path, range)
            .await
            .map_err(|e| map_err(key, e))
    }

    /// An object's metadata ([`Error::NotFound`] if absent).
    pub async fn head(&self, key: &str) -> Result<BlobMeta> {
        let path = key_path(key)?;
        let meta = self.store.head(&path).await.map_err(|e| map_err(key, e))?;
        Ok(BlobMeta::from_object(meta))
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.head(key).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Objects under `prefix` (whole segments; `""` lists everything except unfinished
    /// uploads), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let prefix = prefix_path(prefix)?;
        let mut out: Vec<BlobMeta> = self
            .store
            .list(prefix.as_ref())
            .map_ok(BlobMeta::from_object)
            .try_collect()
            .await?;
        out.retain(|m| !m.key.starts_with(TMP_PREFIX));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Downloads a file to `dest` (written to a temporary name, then renamed).
    pub async fn download_file(&self, key: &str, dest: &FsPath) -> Result<u64> {
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| Error::io(parent, e))?;
        }
        let tmp = dest.with_file_name(format!(
            ".{}.part",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let result: Result<u64> = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| Error::io(&tmp, e))?;
            let mut blob = self.get_stream(key).await?;
            let mut written = 0u64;
            while let Some(chunk) = blob.stream.next().await {
                let chunk = chunk?;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| Error::io(&tmp, e))?;
                written += chunk.len() as u64;
            }
            file.flush().await.map_err(|e| Error::io(&tmp, e))?;
            file.sync_all().await.map_err(|e| Error::io(&tmp, e))?;
            Ok(written)
        }
        .await;
        match result {
            Ok(n) => {
                tokio::fs::rename(&tmp, dest)
                    .await
                    .map_err(|e| Error::io(dest, e))?;
                Ok(n)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Downloads every object under `prefix` into `dir`, keeping the relative paths.
    /// Returns the downloaded objects (keys as in the store).
    pub async fn download_dir(&self, prefix: &str, dir: &FsPath) -> Result<Vec<BlobMeta>> {
        let objects = self.list(prefix).await?;
        let trimmed = prefix.trim_matches('/');
        for meta in &objects {
            let rel = if trimmed.is_empty() {
                meta.key.as_str()
            } else {
                meta.key
                    .strip_prefix(trimmed)
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(meta.key.as_str())
            };
            let mut dest = dir.to_path_buf();
            for part in rel.split('/') {
                if part.is_empty() || part == "." || part == ".." || part.contains('\\') {
                    return Err(Error::InvalidInput(format!(
                        "object key '{}' cannot be mapped to a local path",
                        meta.key
                    )));
                }
                dest.push(part);
            }
            self.download_file(&meta.key, &dest).await?;
        }
        tracing::debug!(prefix, dir = %dir.display(), files = objects.len(), "prefix downloaded");
        Ok(objects)
    }

    // ----- deleting ----------------------------------------------------------------------

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = key_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object under `prefix` (not `""`); returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        if prefix.trim_matches('/').is_empty() {
            return Err(Error::InvalidInput(
                "refusing to delete the whole store".into(),
            ));
        }
        let objects = self.list(prefix).await?;
        for meta in &objects {
            self.delete(&meta.key).await?;
        }
        Ok(objects.len())
    }

    /// Removes unfinished uploads older than `older_than` (left by killed processes).
    /// Returns how many objects/files were removed.
    pub async fn cleanup_stale_uploads(&self, older_than: Duration) -> Result<usize> {
        let cutoff = crate::ids::now_secs()
            .saturating_sub(i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX));
        let tmp = Path::from(TMP_PREFIX);
        let stale: Vec<ObjectMeta> = self
            .store
            .list(Some(&tmp))
            .try_filter(|m| futures::future::ready(m.last_modified.timestamp() <= cutoff))
            .try_collect()
            .await?;
        let mut removed = 0;
        for meta in stale {
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(e) => return Err(e.into()),
            }
        }
        // The local backend stages multipart uploads as `name#N` files, invisible to `list`.
        if let Some(root) = &self.local_root {
            let dir = root.join(TMP_PREFIX);
            if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
                while let Ok(Some(entry)) = entries.next_entry().await {
                    let Ok(meta) = entry.metadata().await else {
                        continue;
                    };
                    let modified = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                        .unwrap_or(0);
                    if meta.is_file() && modified <= cutoff {
                        let path = entry.path();
                        tokio::fs::remove_file(&path)
                            .await
                            .map_err(|e| Error::io(&path, e))?;
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, store = %self.description, "stale uploads removed");
        }
        Ok(removed)
    }
}

/// Collects `(relative key, path)` for the regular files under `dir`.
async fn collect_files(
    root: &FsPath,
    dir: &FsPath,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| Error::io(dir, e))?;
    while let Some(entry) = entries.next_entry().await.map_err(|e| Error::io(dir, e))? {
        let path = entry.path();
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            Box::pin(collect_files(root, &path, out)).await?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).map_err(|_| {
                Error::InvalidInput(format!("{} is outside {}", path.display(), root.display()))
            })?;
            let mut parts = Vec::new();
            for c in rel.components() {
                let s = c.as_os_str().to_str().ok_or_else(|| {
                    Error::InvalidInput(format!("file name {} is not UTF-8", path.display()))
                })?;
                parts.push(s);
            }
            out.push((parts.join("/"), path));
        }
    }
    Ok(())
}

enum UploadState {
    /// Less than one part so far: kept in memory, written with a single PUT on commit.
    Buffering(Vec<u8>),
    /// A multipart upload to the temporary key is under way.
    Multipart(WriteMultipart),
    /// Committed or aborted.
    Done,
}

/// A streaming upload in progress; see [`BlobStore::upload`]. Dropping it without
/// [`commit`](BlobUpload::commit) aborts it.
pub struct BlobUpload {
    store: Arc<dyn ObjectStore>,
    key: String,
    final_path: Path,
    tmp_path: Path,
    chunk_size: usize,
    state: UploadState,
    bytes: u64,
    hasher: Sha256,
}

impl std::fmt::Debug for BlobUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobUpload")
            .field("key", &self.key)
            .field("tmp", &self.tmp_path.as_ref())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl BlobUpload {
    /// The final key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Appends data. Waits while too many parts are in flight, so memory stays bounded.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            match &mut self.state {
                UploadState::Buffering(buf) => {
                    let room = self.chunk_size.saturating_sub(buf.len());
                    if data.len() < room {
                        buf.extend_from_slice(data);
                        return Ok(());
                    }
                    // The buffer fills a whole part: switch to a multipart upload.
                    let first = std::mem::take(buf);
                    let upload = self
                        .store
                        .put_multipart(&self.tmp_path)
                        .await
                        .map_err(|e| map_err(&self.key, e))?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, self.chunk_size);
                    writer.write(&first);
                    self.state = UploadState::Multipart(writer);
                }
                UploadState::Multipart(writer) => {
                    writer
                        .wait_for_capacity(MAX_PARTS_IN_FLIGHT)
                        .await
                        .map_err(|e| map_err(&self.key, e))?;
                    let n = data.len().min(self.chunk_size);
                    writer.write(&data[..n]);
                    data = &data[n..];
                }
                UploadState::Done => {
                    return Err(Error::InvalidInput(format!(
                        "upload to '{}' already finished",
                        self.key
                    )));
                }
            }
        }
        Ok(())
    }

    /// Finishes the upload and moves it to its final key, where it appears complete.
    pub async fn commit(mut self) -> Result<CommittedBlob> {
        let state = std::mem::replace(&mut self.state, UploadState::Done);
        let result = match state {
            UploadState::Buffering(buf) => self
                .store
                .put(&self.tmp_path, PutPayload::from(Bytes::from(buf)))
                .await
                .map(|_| ()),
            UploadState::Multipart(writer) => writer.finish().await.map(|_| ()),
            UploadState::Done => {
                return Err(Error::InvalidInput(format!(
                    "upload to '{}' already finished",
                    self.key
                )));
            }
        };
        if let Err(e) = result {
            let _ = self.store.delete(&self.tmp_path).await;
            return Err(map_err(&self.key, e));
        }
        if let Err(e) = self.store.rename(&self.tmp_path, &self.final_path).await {
            let _ = self.store.delete(&self.tmp_path).await;
            return Err(map_err(&self.key, e));
        }
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        tracing::debug!(key = %self.key, bytes = self.bytes, "upload committed");
        Ok(CommittedBlob {
            key: std::mem::take(&mut self.key),
            size: self.bytes,
            sha256,
        })
    }

    /// Abandons the upload; nothing becomes visible.
    pub async fn abort(mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, UploadState::Done) {
            UploadState::Multipart(writer) => {
                writer.abort().await.map_err(|e| map_err(&self.key, e))?;
            }
            UploadState::Buffering(_) | UploadState::Done => {}
        }
        tracing::debug!(key = %self.key, bytes = self.bytes, "upload aborted");
        Ok(())
    }
}

impl Drop for BlobUpload {
    fn drop(&mut self) {
        if let UploadState::Multipart(writer) =
            std::mem::replace(&mut self.state, UploadState::Done)
        {
            tracing::warn!(key = %self.key, "upload dropped without commit; aborting");
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = writer.abort().await;
                });
            }
        }
    }
}
