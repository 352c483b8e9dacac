//! `/v1/models`: the base models (registered by an admin, shared), the tenant's
//! fine-tuned models (one per adapter, named `ft:…`) and merged models (`merged:…`, made by
//! `POST /v1/adapters/{id}/merge`), in OpenAI's `model` shape. A merged model's files (an
//! HF-format checkpoint: `config.json`, `model.safetensors`, `tokenizer.json`) download from
//! `/v1/models/{model}/files/{name}`.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use storage::{Adapter, BaseModel};

use super::ListResponse;
use super::files::Deleted;
use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path};
use crate::state::AppState;

/// OpenAI's `model`, plus molt's kind and lineage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
    /// `base`, `fine-tuned` or `merged`.
    pub kind: String,
    /// For fine-tuned models: the base model.
    pub parent: Option<String>,
    /// For fine-tuned and merged models: the adapter.
    pub adapter_id: Option<String>,
    /// For merged models: the files of the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<super::adapters::AdapterFile>>,
    /// What the model does, from its base's family: `causal_lm` (completions, scores) or
    /// `image_classification` (classifications) — so that a client (the dashboard's
    /// playground) knows which endpoint serves it.
    #[serde(default)]
    pub task: Option<String>,
}

/// The task of a base model's `config.json` (`None` if no family recognises it).
fn task_of(config: &serde_json::Value) -> Option<String> {
    let family = trainer::model::detect(config, std::path::Path::new("config.json")).ok()?;
    Some(match family.task() {
        trainer::model::Task::CausalLm => "causal_lm".into(),
        trainer::model::Task::ImageClassification => "image_classification".into(),
    })
}

/// Fills in `m.task` from its base model (itself, or its parent).
pub async fn with_task(state: &AppState, mut m: ModelObject) -> ModelObject {
    let base = m.parent.as_deref().unwrap_or(&m.id);
    m.task = match state.db.get_base_model(base).await {
        Ok(b) => task_of(&b.config),
        Err(_) => None,
    };
    m
}

/// A merged model of adapter `a` with its files.
pub fn merged_object(a: &Adapter, files: &[(String, u64)]) -> ModelObject {
    let id = crate::serving::merged_name(a);
    ModelObject {
        files: Some(
            files
                .iter()
                .map(|(name, bytes)| super::adapters::AdapterFile {
                    url: format!("/v1/models/{id}/files/{name}"),
                    name: name.clone(),
                    bytes: *bytes,
                })
                .collect(),
        ),
        id,
        object: "model".into(),
        created: a.created_at,
        owned_by: a.tenant_id.clone(),
        kind: "merged".into(),
        parent: Some(a.base_model.clone()),
        adapter_id: Some(a.id.clone()),
        task: None,
    }
}

/// The tenant's adapter behind a `merged:…` name.
async fn merged_adapter(
    state: &AppState,
    tenant: &Tenant,
    name: &str,
) -> Result<Adapter, ApiError> {
    let rest = name
        .strip_prefix(crate::serving::MERGED_PREFIX)
        .ok_or_else(|| ApiError::not_found("model", name))?;
    let a = match state
        .db
        .get_adapter_by_name(&tenant.id, &format!("ft:{rest}"))
        .await
    {
        Err(storage::Error::NotFound { .. }) => state.db.get_adapter(&tenant.id, rest).await,
        other => other,
    }
    .map_err(|_| ApiError::not_found("model", name))?;
    Ok(a)
}

/// A merged model and its files (404 when not merged).
async fn merged_with_files(
    state: &AppState,
    tenant: &Tenant,
    name: &str,
) -> Result<(Adapter, Vec<(String, u64)>), ApiError> {
    let a = merged_adapter(state, tenant, name).await?;
    let files = crate::serving::merged_files(&state.blobs, &a.id).await?;
    if files.is_empty() {
        return Err(ApiError::not_found("model", name));
    }
    Ok((a, files))
}

fn base_object(m: BaseModel) -> ModelObject {
    ModelObject {
        task: task_of(&m.config),
        id: m.id,
        object: "model".into(),
        created: m.created_at,
        owned_by: "molt".into(),
        kind: "base".into(),
        parent: None,
        adapter_id: None,
        files: None,
    }
}

fn adapter_object(a: Adapter) -> ModelObject {
    ModelObject {
        id: a.name,
        object: "model".into(),
        created: a.created_at,
        owned_by: a.tenant_id,
        kind: "fine-tuned".into(),
        parent: Some(a.base_model),
        adapter_id: Some(a.id),
        files: None,
        task: None,
    }
}

/// `GET /v1/models`.
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<ListResponse<ModelObject>>, ApiError> {
    let mut data: Vec<ModelObject> = state
        .db
        .list_base_models()
        .await?
        .into_iter()
        .map(base_object)
        .collect();
    // Merged models: one listing of the store's `merged/` prefix for all adapters.
    let merged: std::collections::HashSet<String> = state
        .blobs
        .list("merged")
        .await?
        .into_iter()
        .filter_map(|m| {
            let rest = m.key.strip_prefix("merged/")?;
            let (id, file) = rest.split_once('/')?;
            (file == "config.json").then(|| id.to_string())
        })
        .collect();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .db
            .list_adapters(&tenant.id, after.as_deref(), 1000)
            .await?;
        after = page.data.last().map(|a| a.id.clone());
        for a in page.data {
            if merged.contains(&a.id) {
                data.push(merged_object(&a, &[]));
                if let Some(m) = data.last_mut() {
                    m.files = None;
                }
            }
            data.push(adapter_object(a));
        }
        if !page.has_more {
            break;
        }
    }
    // Fine-tuned and merged models do what their base does.
    let tasks: std::collections::HashMap<String, Option<String>> = data
        .iter()
        .filter(|m| m.kind == "base")
        .map(|m| (m.id.clone(), m.task.clone()))
        .collect();
    for m in &mut data {
        if let Some(parent) = &m.parent {
            m.task = tasks.get(parent).cloned().flatten();
        }
    }
    Ok(Json(ListResponse::complete(data, |m| m.id.clone())))
}

/// `GET /v1/models/{model}`.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    if id.starts_with("ft:") {
        let m = adapter_object(state.db.get_adapter_by_name(&tenant.id, &id).await?);
        return Ok(Json(with_task(&state, m).await));
    }
    if id.starts_with(crate::serving::MERGED_PREFIX) {
        let (a, files) = merged_with_files(&state, &tenant, &id).await?;
        return Ok(Json(with_task(&state, merged_object(&a, &files)).await));
    }
    Ok(Json(base_object(state.db.get_base_model(&id).await?)))
}

/// `GET /v1/models/{model}/files/{name}`: one file of a merged model, streamed.
pub async fn download(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(String, String)>,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::{HeaderValue, header};
    use axum::response::IntoResponse;
    let (a, files) = merged_with_files(&state, &tenant, &id).await?;
    let Some((_, size)) = files.iter().find(|(n, _)| *n == name) else {
        return Err(ApiError::not_found("model file", &name));
    };
    let key = format!("{}/{name}", crate::serving::merged_blob_prefix(&a.id));
    let blob = state.blobs.get_stream(&key).await?;
    let mut res = axum::body::Body::from_stream(blob.stream).into_response();
    let h = res.headers_mut();
    let ct = if name.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}

/// `DELETE /v1/models/{model}`: deletes a fine-tuned model (its adapter). Base models are
/// removed through the admin API.
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    if id.starts_with(crate::serving::MERGED_PREFIX) {
        let (a, _) = merged_with_files(&state, &tenant, &id).await?;
        state
            .blobs
            .delete_prefix(&crate::serving::merged_blob_prefix(&a.id))
            .await?;
        state
            .serving
            .adapters
            .forget(&format!("{}{}", crate::serving::MERGED_PREFIX, a.id));
        return Ok(Json(Deleted {
            id,
            object: "model",
            deleted: true,
        }));
    }
    if !id.starts_with("ft:") {
        // A base model exists for every tenant but is an admin's to remove (403); any other
        // name is no model of this tenant's (404).
        state.db.get_base_model(&id).await?;
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "cannot_delete_base_model",
            format!("'{id}' is a base model; base models are removed by an admin"),
        )
        .param("model"));
    }
    let a = super::adapters::remove(&state, &tenant, &id).await?;
    Ok(Json(Deleted {
        id: a.name,
        object: "model",
        deleted: true,
    }))
}
