//! Uploaded files (datasets).

use super::models::{FileRecord, FileStatus, Page};
use super::{Db, check_limit};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_secs};

macro_rules! file_cols {
    () => {
        "id, tenant_id, purpose, filename, bytes, status, status_details, line_count, \
         object_key, sha256, idempotency_key, created_at, dataset"
    };
}

/// A file to record. The bytes must already be committed to the blob store under
/// `object_key` (see `BlobStore::upload`), so a row never points at a half-written object.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// The id to use, when the caller needed it before the row existed (e.g. to name the
    /// object key `files/<id>`); `None` generates one. Use [`Db::new_file_id`].
    pub id: Option<String>,
    pub tenant_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub status: FileStatus,
    pub status_details: Option<String>,
    pub line_count: Option<i64>,
    pub object_key: String,
    pub sha256: Option<String>,
    pub idempotency_key: Option<String>,
    /// What the validator found (see [`FileRecord::dataset`]).
    pub dataset: Option<serde_json::Value>,
}

impl Db {
    /// A fresh `file-…` id.
    pub fn new_file_id() -> String {
        new_id("file")
    }

    /// Records a file. With an idempotency key that this tenant already used, nothing is
    /// inserted and the existing row is returned with `false` (the caller should then delete
    /// the object it uploaded, unless it is the same key). Returns `(row, created)`.
    pub async fn create_file(&self, new: NewFile) -> Result<(FileRecord, bool)> {
        if let Some(key) = &new.idempotency_key
            && let Some(existing) = self
                .find_file_by_idempotency_key(&new.tenant_id, key)
                .await?
        {
            return Ok((existing, false));
        }
        let id = new.id.clone().unwrap_or_else(Db::new_file_id);
        let res = with_pool!(self, |p| {
            sqlx::query_as::<_, FileRecord>(concat!(
                "INSERT INTO files (id, tenant_id, purpose, filename, bytes, status, status_details, \
                 line_count, object_key, sha256, idempotency_key, created_at, dataset) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
                file_cols!()
            ))
            .bind(&id)
            .bind(&new.tenant_id)
            .bind(&new.purpose)
            .bind(&new.filename)
            .bind(new.bytes)
            .bind(new.status.as_str())
            .bind(&new.status_details)
            .bind(new.line_count)
            .bind(&new.object_key)
            .bind(&new.sha256)
            .bind(&new.idempotency_key)
            .bind(now_secs())
            .bind(new.dataset.as_ref().map(sqlx::types::Json))
            .fetch_one(p)
            .await
        });
        match res {
            Ok(row) => {
                tracing::info!(tenant_id = %row.tenant_id, file_id = %row.id, bytes = row.bytes, "file recorded");
                Ok((row, true))
            }
            Err(e) => match Error::from(e) {
                // Lost a race with a concurrent request carrying the same idempotency key.
                Error::Conflict(msg) => match &new.idempotency_key {
                    Some(key) => match self
                        .find_file_by_idempotency_key(&new.tenant_id, key)
                        .await?
                    {
                        Some(existing) => Ok((existing, false)),
                        None => Err(Error::Conflict(msg)),
                    },
                    None => Err(Error::Conflict(format!("file id '{id}' already exists"))),
                },
                other => Err(other),
            },
        }
    }

    /// The file a tenant created with this idempotency key, if any.
    pub async fn find_file_by_idempotency_key(
        &self,
        tenant_id: &str,
        key: &str,
    ) -> Result<Option<FileRecord>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE tenant_id = $1 AND idempotency_key = $2"
            ))
            .bind(tenant_id)
            .bind(key)
            .fetch_optional(p)
            .await?
        }))
    }

    /// A tenant's file. Another tenant's id is [`Error::NotFound`].
    pub async fn get_file(&self, tenant_id: &str, id: &str) -> Result<FileRecord> {
        let row: Option<FileRecord> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE id = $1 AND tenant_id = $2"
            ))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("file", id))
    }

    /// A tenant's files, newest first, optionally only one purpose.
    pub async fn list_files(
        &self,
        tenant_id: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<FileRecord>> {
        let fetch = check_limit(limit)?;
        let rows: Vec<FileRecord> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT seq FROM files WHERE id = $1 AND tenant_id = $2",
                "file",
                after,
                tenant_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE tenant_id = $1 AND seq < $2 \
                 AND ($3 IS NULL OR purpose = $3) ORDER BY seq DESC LIMIT $4"
            ))
            .bind(tenant_id)
            .bind(before)
            .bind(purpose)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// Sets a file's processing outcome.
    pub async fn set_file_status(
        &self,
        tenant_id: &str,
        id: &str,
        status: FileStatus,
        status_details: Option<&str>,
        line_count: Option<i64>,
    ) -> Result<FileRecord> {
        let row: Option<FileRecord> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "UPDATE files SET status = $1, status_details = $2, \
                 line_count = COALESCE($3, line_count) WHERE id = $4 AND tenant_id = $5 RETURNING ",
                file_cols!()
            ))
            .bind(status.as_str())
            .bind(status_details)
            .bind(line_count)
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("file", id))
    }

    /// Deletes a file's row and returns it (the caller deletes `object_key` from the blob
    /// store afterwards).
    pub async fn delete_file(&self, tenant_id: &str, id: &str) -> Result<FileRecord> {
        let row: Option<FileRecord> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "DELETE FROM files WHERE id = $1 AND tenant_id = $2 RETURNING ",
                file_cols!()
            ))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        let row = row.ok_or_else(|| Error::not_found("file", id))?;
        tracing::info!(tenant_id, file_id = id, "file deleted");
        Ok(row)
    }
}
