//! `/v1/files`: upload (multipart, streamed to the blob store with bounded memory and
//! validated line by line), list, get, delete, and `/content`.
//!
//! An upload streams straight from the socket into a temporary object (see
//! `storage::BlobStore::upload`); the object becomes visible under `files/<id>` and the
//! row is written only once the whole body has arrived. A client that disconnects, a body
//! over `--max-upload-bytes` (413) or a server that dies mid-upload leave neither a row nor a
//! visible object.

use axum::body::Body;
use axum::extract::multipart::MultipartError;
use axum::extract::{Multipart, State, multipart::MultipartRejection};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use storage::{Db, FileRecord, FileStatus, NewFile};

use super::{ListParams, ListResponse, idempotency_key};
use crate::auth::Tenant;
use crate::dataset::{DatasetValidator, PURPOSE_FINE_TUNE};
use crate::error::{ApiError, Json, Path, Query};
use crate::limits::check_name;
use crate::state::AppState;

/// OpenAI's File object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
    /// `processed` (a valid dataset) or `error` (see `status_details`).
    pub status: String,
    pub status_details: Option<String>,
    /// molt: number of valid examples.
    pub line_count: Option<i64>,
    /// molt: hex SHA-256 of the content.
    pub sha256: Option<String>,
    /// molt: what a valid dataset holds: `{"kind"}` (`text`, `prompt_completion`,
    /// `multiple_choice`, `chat`, `images`); image datasets add `format`, `classes` (class
    /// `i` is `classes[i]`), `train_examples`, `validation_examples` and `split`.
    pub dataset: Option<serde_json::Value>,
}

impl From<FileRecord> for FileObject {
    fn from(f: FileRecord) -> Self {
        FileObject {
            id: f.id,
            object: "file",
            bytes: f.bytes,
            created_at: f.created_at,
            expires_at: None,
            filename: f.filename,
            purpose: f.purpose,
            status: f.status.as_str().to_string(),
            status_details: f.status_details,
            line_count: f.line_count,
            sha256: f.sha256,
            dataset: f.dataset,
        }
    }
}

/// Longest accepted `purpose`.
const MAX_SMALL_FIELD: usize = 1024;

fn multipart_rejection(r: MultipartRejection) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "expected a `multipart/form-data` body with fields `purpose` and `file`: {}",
            r.body_text()
        ),
    )
}

fn multipart_error(e: MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "request_too_large", e.body_text());
    }
    ApiError::bad_request(
        "invalid_multipart",
        format!("malformed multipart body: {}", e.body_text()),
    )
}

fn check_purpose(purpose: &str) -> Result<(), ApiError> {
    if purpose == PURPOSE_FINE_TUNE {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_purpose",
            format!("purpose '{purpose}' is not supported; molt accepts '{PURPOSE_FINE_TUNE}'"),
        )
        .param("purpose"))
    }
}

/// Reads a small text field, refusing more than [`MAX_SMALL_FIELD`] bytes.
async fn small_text(
    mut field: axum::extract::multipart::Field<'_>,
    name: &str,
) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if buf.len() + chunk.len() > MAX_SMALL_FIELD {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("field `{name}` is longer than {MAX_SMALL_FIELD} bytes"),
            )
            .param(name));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| {
        ApiError::bad_request("invalid_request", format!("field `{name}` is not UTF-8")).param(name)
    })
}

/// The `purpose` field: exactly one, exactly a documented value (nothing is trimmed).
async fn read_purpose(
    field: axum::extract::multipart::Field<'_>,
    purpose: &mut Option<String>,
) -> Result<(), ApiError> {
    if purpose.is_some() {
        return Err(
            ApiError::bad_request("invalid_purpose", "send exactly one `purpose` field")
                .param("purpose"),
        );
    }
    let p = small_text(field, "purpose").await?;
    check_purpose(&p)?;
    *purpose = Some(p);
    Ok(())
}

fn missing_file() -> ApiError {
    ApiError::bad_request("missing_file", "the multipart body has no `file` field").param("file")
}

fn missing_purpose() -> ApiError {
    ApiError::bad_request(
        "missing_purpose",
        format!("the multipart body has no `purpose` field (use '{PURPOSE_FINE_TUNE}')"),
    )
    .param("purpose")
}

fn one_file() -> ApiError {
    ApiError::bad_request("invalid_request", "send exactly one `file` field").param("file")
}

/// Reads a repeated upload to its end with the checks of a new one (purpose, one file, its
/// name and size), storing nothing.
async fn check_replayed_upload(
    state: &AppState,
    multipart: &mut Multipart,
) -> Result<(), ApiError> {
    let mut purpose = None;
    let mut file = false;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "purpose" => read_purpose(field, &mut purpose).await?,
            "file" => {
                if file {
                    return Err(one_file());
                }
                file = true;
                if let Some(name) = field.file_name() {
                    check_name("file", name, state.config.limits.max_name_chars)?;
                }
                let mut bytes: u64 = 0;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    bytes += chunk.len() as u64;
                    if bytes > state.config.max_upload_bytes {
                        return Err(storage::Error::TooLarge {
                            limit: state.config.max_upload_bytes,
                        }
                        .into());
                    }
                }
            }
            _ => while field.chunk().await.map_err(multipart_error)?.is_some() {},
        }
    }
    if !file {
        return Err(missing_file());
    }
    if purpose.is_none() {
        return Err(missing_purpose());
    }
    Ok(())
}

/// `POST /v1/files`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let idem = idempotency_key(&headers)?;
    let replay = match &idem {
        Some(key) => {
            state
                .db
                .find_file_by_idempotency_key(&tenant.id, key)
                .await?
        }
        None => None,
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > state.config.max_upload_bytes.saturating_add(64 * 1024)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!(
                "the upload ({len} bytes) is larger than the limit of {} bytes",
                state.config.max_upload_bytes
            ),
        )
        .param("file"));
    }
    let mut multipart = multipart.map_err(multipart_rejection)?;
    if let Some(existing) = replay {
        // A repeated request is read and checked like a new one, then answered with the
        // first result; its bytes are not stored.
        check_replayed_upload(&state, &mut multipart).await?;
        return Ok(Json(existing.into()));
    }

    let mut purpose: Option<String> = None;
    // (object key, filename, committed blob, validator)
    let mut uploaded: Option<(String, String, storage::CommittedBlob, DatasetValidator)> = None;
    let file_id = Db::new_file_id();
    let key = format!("files/{file_id}");

    let outcome: Result<(), ApiError> = async {
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            match field.name().unwrap_or_default() {
                "purpose" => read_purpose(field, &mut purpose).await?,
                "file" => {
                    if uploaded.is_some() {
                        return Err(one_file());
                    }
                    let filename = field
                        .file_name()
                        .map(str::to_string)
                        .unwrap_or_else(|| "upload.jsonl".to_string());
                    check_name("file", &filename, state.config.limits.max_name_chars)?;
                    let mut validator = DatasetValidator::new(&filename);
                    let blob = state
                        .blobs
                        .put_stream(
                            &key,
                            field,
                            Some(state.config.max_upload_bytes),
                            Some(&mut validator),
                        )
                        .await?;
                    state.metrics.add_upload_bytes(blob.size);
                    uploaded = Some((key.clone(), filename, blob, validator));
                }
                _ => {
                    // Unknown fields are drained and ignored, as OpenAI does.
                    let mut field = field;
                    while field.chunk().await.map_err(multipart_error)?.is_some() {}
                }
            }
        }
        Ok(())
    }
    .await;

    let cleanup = |state: &AppState, key: String| {
        let blobs = state.blobs.clone();
        async move {
            if let Err(e) = blobs.delete(&key).await {
                tracing::warn!(key, error = %e, "could not delete an unused upload");
            }
        }
    };

    if let Err(e) = outcome {
        if uploaded.is_some() {
            cleanup(&state, key).await;
        }
        return Err(e);
    }
    let Some((key, filename, blob, validator)) = uploaded else {
        return Err(missing_file());
    };
    let Some(purpose) = purpose else {
        cleanup(&state, key).await;
        return Err(missing_purpose());
    };

    let (status, details) = if validator.is_valid() {
        (FileStatus::Processed, None)
    } else {
        (FileStatus::Error, validator.status_details())
    };
    let new = NewFile {
        id: Some(file_id),
        tenant_id: tenant.id.clone(),
        purpose,
        filename,
        bytes: i64::try_from(blob.size).unwrap_or(i64::MAX),
        status,
        status_details: details,
        line_count: Some(i64::try_from(validator.examples()).unwrap_or(i64::MAX)),
        object_key: key.clone(),
        sha256: Some(blob.sha256.clone()),
        idempotency_key: idem,
        dataset: validator.dataset(),
    };
    match state.db.create_file(new).await {
        Ok((row, true)) => {
            tracing::info!(file_id = %row.id, bytes = row.bytes, status = %row.status, "file uploaded");
            Ok(Json(row.into()))
        }
        Ok((row, false)) => {
            // A concurrent request with the same idempotency key won the race.
            cleanup(&state, key).await;
            Ok(Json(row.into()))
        }
        Err(e) => {
            cleanup(&state, key).await;
            Err(e.into())
        }
    }
}

/// Query of `GET /v1/files`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListParams {
    pub purpose: Option<String>,
    pub after: Option<String>,
    pub limit: Option<u32>,
    /// Only `desc` (newest first) is supported.
    pub order: Option<String>,
}

/// `GET /v1/files`.
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<FileListParams>,
) -> Result<Json<ListResponse<FileObject>>, ApiError> {
    let params = ListParams {
        after: q.after,
        limit: q.limit,
        order: q.order,
    };
    let limit = params.limit(10_000, 10_000)?;
    let page = state
        .db
        .list_files(
            &tenant.id,
            q.purpose.as_deref(),
            params.after.as_deref(),
            limit,
        )
        .await?;
    Ok(Json(ListResponse::from_page(page, FileObject::from, |f| {
        f.id.clone()
    })))
}

/// `GET /v1/files/{file_id}`.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(state.db.get_file(&tenant.id, &id).await?.into()))
}

/// OpenAI's deletion status.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// `DELETE /v1/files/{file_id}`.
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let row = state.db.delete_file(&tenant.id, &id).await?;
    if let Err(e) = state.blobs.delete(&row.object_key).await {
        tracing::warn!(file_id = %row.id, error = %e, "file row deleted but its object remains");
    }
    Ok(Json(Deleted {
        id: row.id,
        object: "file",
        deleted: true,
    }))
}

/// `GET /v1/files/{file_id}/content`: the bytes as uploaded, streamed.
pub async fn content(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = state.db.get_file(&tenant.id, &id).await?;
    let blob = state.blobs.get_stream(&row.object_key).await?;
    let mut res = Body::from_stream(blob.stream).into_response();
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&blob.size.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    let safe: String = row
        .filename
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}
