//! Liveness, readiness and the OpenAPI document.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{ApiError, Json};
use crate::state::AppState;

/// The committed OpenAPI document (also checked against the router by a test).
pub const OPENAPI_YAML: &str = include_str!("../../../openapi.yaml");

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the database and the blob store answer.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Err(e) = state.db.ping().await {
        tracing::warn!(error = %e, "readiness: database unavailable");
        return Err(ApiError::unavailable(
            format!("the database is not reachable: {e}"),
            5,
        ));
    }
    if let Err(e) = state.blobs.exists("readyz-probe").await {
        tracing::warn!(error = %e, "readiness: blob store unavailable");
        return Err(ApiError::unavailable(
            format!("the blob store is not reachable: {e}"),
            5,
        ));
    }
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /openapi.yaml`.
pub async fn openapi() -> Response {
    let mut res = (StatusCode::OK, OPENAPI_YAML).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml"),
    );
    res
}
