//! `/admin/…`: tenants, their API keys, and base-model registration. Every route needs
//! `Authorization: Bearer $MOLT_ADMIN_TOKEN`.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use storage::{ApiKey, BaseModel, Tenant};

use super::{ListParams, ListResponse};
use crate::auth::Admin;
use crate::error::{ApiError, Json, Path, Query};
use crate::limits::{MAX_SOURCE_CHARS, check_name};
use crate::registry::{self, RegistryError};
use crate::state::AppState;

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(msg) => ApiError::unprocessable("invalid_model", msg),
            RegistryError::SourceNotFound(path) => ApiError::new(
                StatusCode::NOT_FOUND,
                "model_source_not_found",
                format!("{path} does not exist on the server"),
            )
            .param("source"),
            // The source names something the server cannot read as a model.
            RegistryError::Storage(storage::Error::InvalidInput(msg)) => {
                ApiError::unprocessable("invalid_model", msg).param("source")
            }
            RegistryError::Storage(s) => s.into(),
            RegistryError::Io { path, source } => ApiError::unprocessable(
                "invalid_model",
                format!("{} cannot be read as a model: {source}", path.display()),
            )
            .param("source"),
        }
    }
}

/// Body of `POST /admin/tenants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
}

/// `POST /admin/tenants`.
pub async fn create_tenant(
    State(state): State<AppState>,
    _: Admin,
    Json(req): Json<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    check_name("name", &req.name, state.config.limits.max_name_chars)?;
    let tenant = state.db.create_tenant(req.name.trim()).await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// `GET /admin/tenants`.
pub async fn list_tenants(
    State(state): State<AppState>,
    _: Admin,
    Query(q): Query<ListParams>,
) -> Result<Json<ListResponse<Tenant>>, ApiError> {
    let limit = q.limit(100, 10_000)?;
    let page = state.db.list_tenants(q.after.as_deref(), limit).await?;
    Ok(Json(ListResponse::from_page(page, |t| t, |t| t.id.clone())))
}

/// `GET /admin/tenants/{tenant_id}`.
pub async fn get_tenant(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(state.db.get_tenant(&id).await?))
}

/// Body of `POST /admin/tenants/{tenant_id}/keys`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: Option<String>,
}

/// A new key: its metadata and the secret, shown this once.
#[derive(Debug, Serialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub key: ApiKey,
    pub secret: String,
}

/// `POST /admin/tenants/{tenant_id}/keys`.
pub async fn create_key(
    State(state): State<AppState>,
    _: Admin,
    Path(tenant_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    // The body is optional: none, or `{"name": "…"}`.
    let req: CreateKey = if body.is_empty() {
        CreateKey::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("the request body is not valid: {e}"),
            )
        })?
    };
    if let Some(name) = &req.name {
        check_name("name", name, state.config.limits.max_name_chars)?;
    }
    let (key, secret) = state
        .db
        .create_api_key(&tenant_id, req.name.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(NewKey { key, secret })))
}

/// `GET /admin/tenants/{tenant_id}/keys`.
pub async fn list_keys(
    State(state): State<AppState>,
    _: Admin,
    Path(tenant_id): Path<String>,
    Query(q): Query<ListParams>,
) -> Result<Json<ListResponse<ApiKey>>, ApiError> {
    state.db.get_tenant(&tenant_id).await?;
    let limit = q.limit(100, 10_000)?;
    let page = state
        .db
        .list_api_keys(&tenant_id, q.after.as_deref(), limit)
        .await?;
    Ok(Json(ListResponse::from_page(page, |k| k, |k| k.id.clone())))
}

/// `DELETE /admin/tenants/{tenant_id}/keys/{key_id}`: revokes the key.
pub async fn revoke_key(
    State(state): State<AppState>,
    _: Admin,
    Path((tenant_id, key_id)): Path<(String, String)>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(state.db.revoke_api_key(&tenant_id, &key_id).await?))
}

/// Body of `POST /admin/models`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterModel {
    /// The name users pass as `model`.
    pub id: String,
    /// A folder on the server (or `file://…`) or an object-store URL (`s3://bucket/prefix`).
    pub source: String,
    /// Copy a local folder into the blob store (default) or register it in place.
    #[serde(default = "yes")]
    pub copy: bool,
}

fn yes() -> bool {
    true
}

/// A base model as the admin API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct BaseModelObject {
    pub id: String,
    pub object: String,
    pub location: String,
    pub config_hash: String,
    pub config: Value,
    pub created_at: i64,
}

impl From<BaseModel> for BaseModelObject {
    fn from(m: BaseModel) -> Self {
        BaseModelObject {
            id: m.id,
            object: "base_model".into(),
            location: m.location,
            config_hash: m.config_hash,
            config: m.config,
            created_at: m.created_at,
        }
    }
}

/// `POST /admin/models`.
pub async fn register_model(
    State(state): State<AppState>,
    _: Admin,
    Json(req): Json<RegisterModel>,
) -> Result<(StatusCode, Json<BaseModelObject>), ApiError> {
    if registry::check_model_id(&req.id).is_err() {
        return Err(ApiError::bad_request(
            "invalid_model_id",
            format!(
                "id '{}' must be 1 to 128 characters of [A-Za-z0-9._-]",
                req.id
            ),
        )
        .param("id"));
    }
    if req.source.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_source",
            "source must not contain control characters",
        )
        .param("source"));
    }
    if req.source.chars().count() > MAX_SOURCE_CHARS {
        return Err(ApiError::bad_request(
            "invalid_source",
            format!(
                "source has {} characters; at most {MAX_SOURCE_CHARS} are accepted",
                req.source.chars().count()
            ),
        )
        .param("source"));
    }
    let model = registry::register(&state.db, &state.blobs, &req.id, &req.source, req.copy)
        .await
        .map_err(ApiError::from)
        .map_err(|e| {
            if e.param.is_none() {
                e.param("source")
            } else {
                e
            }
        })?;
    Ok((StatusCode::CREATED, Json(model.into())))
}

/// `GET /admin/models`.
pub async fn list_models(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<ListResponse<BaseModelObject>>, ApiError> {
    let models: Vec<BaseModelObject> = state
        .db
        .list_base_models()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(ListResponse::complete(models, |m| m.id.clone())))
}

/// `DELETE /admin/models/{model}`.
pub async fn delete_model(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<BaseModelObject>, ApiError> {
    Ok(Json(
        registry::unregister(&state.db, &state.blobs, &id)
            .await?
            .into(),
    ))
}
