//! `/v1/adapters`: the adapters a tenant's jobs produced — metadata, file list, download of
//! `adapter_model.safetensors` / `adapter_config.json`, deletion. `{adapter_id}` is the
//! adapter's id (`adapter-…`) or its fine-tuned model name (`ft:…`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use storage::Adapter;

use super::files::Deleted;
use super::{ListParams, ListResponse};
use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Query};
use crate::state::AppState;

/// One file of an adapter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterFile {
    pub name: String,
    pub bytes: u64,
    /// Path of the download route.
    pub url: String,
}

/// An adapter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub base_model: String,
    /// The name to pass as `model` (`ft:…`).
    pub fine_tuned_model: String,
    pub job_id: Option<String>,
    pub bytes: i64,
    /// `adapter_config.json`.
    pub config: Value,
    /// Present on single-adapter answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<AdapterFile>>,
}

impl From<Adapter> for AdapterObject {
    fn from(a: Adapter) -> Self {
        AdapterObject {
            id: a.id,
            object: "adapter".into(),
            created_at: a.created_at,
            base_model: a.base_model,
            fine_tuned_model: a.name,
            job_id: a.job_id,
            bytes: a.bytes,
            config: a.config,
            files: None,
        }
    }
}

/// An adapter by id or fine-tuned model name.
pub async fn find(state: &AppState, tenant: &Tenant, id: &str) -> Result<Adapter, ApiError> {
    if id.starts_with("ft:") {
        Ok(state.db.get_adapter_by_name(&tenant.id, id).await?)
    } else {
        Ok(state.db.get_adapter(&tenant.id, id).await?)
    }
}

async fn files_of(state: &AppState, a: &Adapter) -> Result<Vec<AdapterFile>, ApiError> {
    let prefix = a.object_prefix.trim_end_matches('/');
    let objects = state.blobs.list(prefix).await?;
    Ok(objects
        .into_iter()
        .filter_map(|m| {
            let name = m
                .key
                .strip_prefix(prefix)?
                .trim_start_matches('/')
                .to_string();
            (!name.is_empty() && !name.contains('/')).then(|| AdapterFile {
                url: format!("/v1/adapters/{}/files/{name}", a.id),
                name,
                bytes: m.size,
            })
        })
        .collect())
}

/// `GET /v1/adapters`.
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<ListParams>,
) -> Result<Json<ListResponse<AdapterObject>>, ApiError> {
    let limit = q.limit(20, 1000)?;
    let page = state
        .db
        .list_adapters(&tenant.id, q.after.as_deref(), limit)
        .await?;
    Ok(Json(ListResponse::from_page(
        page,
        AdapterObject::from,
        |a| a.id.clone(),
    )))
}

/// `GET /v1/adapters/{adapter_id}`: metadata and the file list.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<AdapterObject>, ApiError> {
    let a = find(&state, &tenant, &id).await?;
    let files = files_of(&state, &a).await?;
    let mut obj = AdapterObject::from(a);
    obj.files = Some(files);
    Ok(Json(obj))
}

/// `GET /v1/adapters/{adapter_id}/files/{name}`: one file's bytes, streamed.
pub async fn download(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let a = find(&state, &tenant, &id).await?;
    let files = files_of(&state, &a).await?;
    if !files.iter().any(|f| f.name == name) {
        return Err(ApiError::not_found("adapter file", &name));
    }
    let key = format!("{}/{name}", a.object_prefix.trim_end_matches('/'));
    let blob = state.blobs.get_stream(&key).await?;
    let mut res = Body::from_stream(blob.stream).into_response();
    let headers = res.headers_mut();
    let content_type = if name.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&blob.size.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}

/// Deletes an adapter's row, then its files.
pub async fn remove(state: &AppState, tenant: &Tenant, id: &str) -> Result<Adapter, ApiError> {
    let a = find(state, tenant, id).await?;
    let a = state.db.delete_adapter(&tenant.id, &a.id).await?;
    // A running request keeps its copy; nothing new can resolve the adapter now.
    state.serving.adapters.forget(&a.id);
    state
        .serving
        .adapters
        .forget(&format!("{}{}", crate::serving::MERGED_PREFIX, a.id));
    let merged = crate::serving::merged_blob_prefix(&a.id);
    if let Err(e) = state.blobs.delete_prefix(&merged).await {
        tracing::warn!(adapter_id = %a.id, error = %e, "adapter deleted but its merged model remains");
    }
    if let Err(e) = state.blobs.delete_prefix(&a.object_prefix).await {
        tracing::warn!(adapter_id = %a.id, error = %e, "adapter row deleted but its files remain");
    }
    Ok(a)
}

/// `DELETE /v1/adapters/{adapter_id}`.
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let a = remove(&state, &tenant, &id).await?;
    Ok(Json(Deleted {
        id: a.id,
        object: "adapter",
        deleted: true,
    }))
}

/// The answer of the warm/evict routes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterResidency {
    pub id: String,
    pub object: String,
    /// Whether the adapter is now in the serving cache.
    pub resident: bool,
    /// Bytes of its tensors in the cache (0 when not resident).
    pub bytes: u64,
}

/// `POST /v1/adapters/{adapter_id}/load`: loads the adapter into the serving cache (as the
/// first request for it would), so that request does not wait for it.
pub async fn warm(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<AdapterResidency>, ApiError> {
    let a = find(&state, &tenant, &id).await?;
    let base = state.db.get_base_model(&a.base_model).await?;
    let bytes = if crate::serving::vision::is_vision(&base) {
        let vb = state.serving.vision_base(&base, &state.blobs).await?;
        state.serving.classifier(&vb, &a, &state.blobs).await?.bytes
    } else {
        let r = super::completions::resolve(&state, &tenant, &a.id).await?;
        r.served.pin.as_ref().map_or(0, |p| p.bytes)
    };
    Ok(Json(AdapterResidency {
        id: a.id,
        object: "adapter.residency".into(),
        resident: true,
        bytes,
    }))
}

/// `DELETE /v1/adapters/{adapter_id}/load`: evicts the adapter from the serving cache
/// (409 while a request is using it).
pub async fn evict(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<AdapterResidency>, ApiError> {
    let a = find(&state, &tenant, &id).await?;
    match state.serving.adapters.evict(&a.id) {
        crate::serving::Evicted::Pinned => Err(ApiError::conflict(
            "adapter_in_use",
            format!(
                "adapter '{}' is serving a request; evict it when the request ends",
                a.id
            ),
        )),
        _ => Ok(Json(AdapterResidency {
            id: a.id,
            object: "adapter.residency".into(),
            resident: false,
            bytes: 0,
        })),
    }
}

/// `POST /v1/adapters/{adapter_id}/merge` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    /// Fold a prefix prompt/affix into per-layer initial states instead of keeping it as a
    /// residual adapter.
    #[serde(default)]
    pub prefix_as_initial_state: bool,
}

/// `POST /v1/adapters/{adapter_id}/merge`: materialises the merged model (stored in the
/// object store, served as `merged:…`, downloadable from `/v1/models/{model}/files/{name}`).
pub async fn merge(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<super::models::ModelObject>, ApiError> {
    // The body is optional: none means the defaults.
    let opts: MergeRequest = if body.is_empty() {
        MergeRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_request_body", format!("the merge options: {e}"))
        })?
    };
    let a = find(&state, &tenant, &id).await?;
    let base_row = state.db.get_base_model(&a.base_model).await?;
    let files = if crate::serving::vision::is_vision(&base_row) {
        let base = state.serving.vision_base(&base_row, &state.blobs).await?;
        state
            .serving
            .merge_classifier(&base, &a, &state.blobs)
            .await?
    } else {
        let base = state.serving.base(&base_row, &state.blobs).await?;
        state
            .serving
            .merge(
                &base,
                &a,
                &state.blobs,
                trainer::peft::MergeOptions {
                    prefix_as_initial_state: opts.prefix_as_initial_state,
                },
            )
            .await?
    };
    let m = super::models::merged_object(&a, &files);
    Ok(Json(super::models::with_task(&state, m).await))
}
