//! `/v1/models`: the base models (registered by an admin, shared) and the tenant's
//! fine-tuned models (one per adapter, named `ft:…`), in OpenAI's `model` shape.

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
    /// `base` or `fine-tuned`.
    pub kind: String,
    /// For fine-tuned models: the base model.
    pub parent: Option<String>,
    /// For fine-tuned models: the adapter.
    pub adapter_id: Option<String>,
}

fn base_object(m: BaseModel) -> ModelObject {
    ModelObject {
        id: m.id,
        object: "model".into(),
        created: m.created_at,
        owned_by: "molt".into(),
        kind: "base".into(),
        parent: None,
        adapter_id: None,
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
    let mut after: Option<String> = None;
    loop {
        let page = state
            .db
            .list_adapters(&tenant.id, after.as_deref(), 1000)
            .await?;
        after = page.data.last().map(|a| a.id.clone());
        data.extend(page.data.into_iter().map(adapter_object));
        if !page.has_more {
            break;
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
        return Ok(Json(adapter_object(
            state.db.get_adapter_by_name(&tenant.id, &id).await?,
        )));
    }
    Ok(Json(base_object(state.db.get_base_model(&id).await?)))
}

/// `DELETE /v1/models/{model}`: deletes a fine-tuned model (its adapter). Base models are
/// removed through the admin API.
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    if !id.starts_with("ft:") {
        return Err(ApiError::bad_request(
            "cannot_delete_base_model",
            format!(
                "'{id}' is not a fine-tuned model of yours; base models are removed by an admin"
            ),
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
