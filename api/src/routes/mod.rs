//! The router: every route path is a constant in [`paths`], every route is mounted through
//! [`Routes::add`], which records `(method, path)` so that [`router`] can hand the exact list
//! to the OpenAPI test (openapi.yaml must document precisely these).

pub mod adapters;
pub mod admin;
pub mod classifications;
pub mod completions;
pub mod files;
pub mod health;
pub mod jobs;
pub mod models;
pub mod scores;
pub mod searches;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::{self, ApiError};
use crate::metrics;
use crate::ratelimit;
use crate::state::AppState;

/// Every route path, in axum's syntax (OpenAPI's `{param}` is the same).
pub mod paths {
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const METRICS: &str = "/metrics";
    pub const OPENAPI: &str = "/openapi.yaml";

    pub const FILES: &str = "/v1/files";
    pub const FILE: &str = "/v1/files/{file_id}";
    pub const FILE_CONTENT: &str = "/v1/files/{file_id}/content";

    pub const JOBS: &str = "/v1/fine_tuning/jobs";
    pub const JOB: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}";
    pub const JOB_CANCEL: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel";
    pub const JOB_EVENTS: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events";
    pub const JOB_CHECKPOINTS: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints";
    pub const JOB_METRICS: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/metrics";
    pub const SEARCHES: &str = "/v1/fine_tuning/searches";
    pub const SEARCH: &str = "/v1/fine_tuning/searches/{search_id}";
    pub const SEARCH_TRIALS: &str = "/v1/fine_tuning/searches/{search_id}/trials";
    pub const SEARCH_CANCEL: &str = "/v1/fine_tuning/searches/{search_id}/cancel";
    pub const SEARCH_TRAIN: &str = "/v1/fine_tuning/searches/{search_id}/train";
    pub const SEARCH_EVENTS: &str = "/v1/fine_tuning/searches/{search_id}/events";

    pub const MODELS: &str = "/v1/models";
    pub const MODEL: &str = "/v1/models/{model}";
    pub const MODEL_FILE: &str = "/v1/models/{model}/files/{name}";

    pub const ADAPTERS: &str = "/v1/adapters";
    pub const ADAPTER: &str = "/v1/adapters/{adapter_id}";
    pub const ADAPTER_FILE: &str = "/v1/adapters/{adapter_id}/files/{name}";
    pub const ADAPTER_LOAD: &str = "/v1/adapters/{adapter_id}/load";
    pub const ADAPTER_MERGE: &str = "/v1/adapters/{adapter_id}/merge";

    pub const COMPLETIONS: &str = "/v1/completions";
    pub const SCORES: &str = "/v1/scores";
    pub const CLASSIFICATIONS: &str = "/v1/classifications";

    pub const ADMIN_TENANTS: &str = "/admin/tenants";
    pub const ADMIN_TENANT: &str = "/admin/tenants/{tenant_id}";
    pub const ADMIN_KEYS: &str = "/admin/tenants/{tenant_id}/keys";
    pub const ADMIN_KEY: &str = "/admin/tenants/{tenant_id}/keys/{key_id}";
    pub const ADMIN_MODELS: &str = "/admin/models";
    pub const ADMIN_MODEL: &str = "/admin/models/{model}";
}

/// Builds the router while recording what it mounts.
#[derive(Default)]
pub struct Routes {
    router: Router<AppState>,
    mounted: Vec<(Method, &'static str)>,
}

impl Routes {
    /// Mounts `handler` at `path`; `methods` lists the methods it answers ("GET POST").
    fn add(
        mut self,
        path: &'static str,
        methods: &'static str,
        handler: MethodRouter<AppState>,
    ) -> Self {
        for m in methods.split_whitespace() {
            let m = Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET);
            self.mounted.push((m, path));
        }
        self.router = self.router.route(path, handler);
        self
    }
}

/// The routes the router serves, as `(method, path)` (for the OpenAPI test).
pub fn mounted_routes() -> Vec<(Method, &'static str)> {
    routes().mounted
}

fn routes() -> Routes {
    use axum::routing::{delete, get, post};
    use paths::*;
    Routes::default()
        .add(HEALTHZ, "GET", get(health::healthz))
        .add(READYZ, "GET", get(health::readyz))
        .add(METRICS, "GET", get(metrics::render))
        .add(OPENAPI, "GET", get(health::openapi))
        .add(
            FILES,
            "POST GET",
            // Uploads are bounded by --max-upload-bytes inside the handler instead.
            post(files::create)
                .layer(DefaultBodyLimit::disable())
                .get(files::list),
        )
        .add(FILE, "GET DELETE", get(files::get).delete(files::delete))
        .add(FILE_CONTENT, "GET", get(files::content))
        .add(JOBS, "POST GET", post(jobs::create).get(jobs::list))
        .add(JOB, "GET", get(jobs::get))
        .add(JOB_CANCEL, "POST", post(jobs::cancel))
        .add(JOB_EVENTS, "GET", get(jobs::events))
        .add(JOB_CHECKPOINTS, "GET", get(jobs::checkpoints))
        .add(JOB_METRICS, "GET", get(jobs::metrics))
        .add(
            SEARCHES,
            "POST GET",
            post(searches::create).get(searches::list),
        )
        .add(SEARCH, "GET", get(searches::get))
        .add(SEARCH_TRIALS, "GET", get(searches::trials))
        .add(SEARCH_CANCEL, "POST", post(searches::cancel))
        .add(SEARCH_TRAIN, "POST", post(searches::train))
        .add(SEARCH_EVENTS, "GET", get(searches::events))
        .add(MODELS, "GET", get(models::list))
        .add(MODEL, "GET DELETE", get(models::get).delete(models::delete))
        .add(ADAPTERS, "GET", get(adapters::list))
        .add(
            ADAPTER,
            "GET DELETE",
            get(adapters::get).delete(adapters::delete),
        )
        .add(ADAPTER_FILE, "GET", get(adapters::download))
        .add(
            ADAPTER_LOAD,
            "POST DELETE",
            post(adapters::warm).delete(adapters::evict),
        )
        .add(ADAPTER_MERGE, "POST", post(adapters::merge))
        .add(MODEL_FILE, "GET", get(models::download))
        .add(COMPLETIONS, "POST", post(completions::create))
        .add(SCORES, "POST", post(scores::create))
        .add(CLASSIFICATIONS, "POST", post(classifications::create))
        .add(
            ADMIN_TENANTS,
            "POST GET",
            post(admin::create_tenant).get(admin::list_tenants),
        )
        .add(ADMIN_TENANT, "GET", get(admin::get_tenant))
        .add(
            ADMIN_KEYS,
            "POST GET",
            post(admin::create_key).get(admin::list_keys),
        )
        .add(ADMIN_KEY, "DELETE", delete(admin::revoke_key))
        .add(
            ADMIN_MODELS,
            "POST GET",
            post(admin::register_model).get(admin::list_models),
        )
        .add(ADMIN_MODEL, "DELETE", delete(admin::delete_model))
}

/// The whole HTTP application: routes, fallbacks, limits, timeouts, request ids, tracing
/// and metrics.
pub fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let body_limit = state.config.max_body_bytes;
    routes()
        .router
        .merge(crate::ui::router())
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ratelimit::limit,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), timeout))
        .layer(middleware::map_response(close_after_too_large))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track_http,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                request_id = %request_id,
                tenant_id = tracing::field::Empty,
            )
        }))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
}

/// Middleware: a time limit per request, answered with the error envelope (504). Uploads
/// get `upload_timeout`; a streamed response (events, downloads) is only limited until its
/// headers are sent.
async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit: Duration = if req.method() == Method::POST && req.uri().path() == paths::FILES {
        state.config.upload_timeout
    } else {
        state.config.request_timeout
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the request took longer than {} s", limit.as_secs_f64()),
        )
        .into_response(),
    }
}

/// Middleware: a 413 may leave the rest of the body unread, after which the server drops
/// the connection; `Connection: close` says so, so a client does not send its next request
/// on a connection that is about to go away.
async fn close_after_too_large(mut res: Response) -> Response {
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        res.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// OpenAI's list envelope.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListResponse<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

impl<T> ListResponse<T> {
    /// Maps a storage page, with `first_id`/`last_id` taken from the rows.
    pub fn from_page<R>(
        page: storage::Page<R>,
        map: impl Fn(R) -> T,
        id: impl Fn(&R) -> String,
    ) -> Self {
        let first_id = page.data.first().map(&id);
        let last_id = page.data.last().map(&id);
        ListResponse {
            object: "list",
            data: page.data.into_iter().map(map).collect(),
            has_more: page.has_more,
            first_id,
            last_id,
        }
    }

    /// A list that is complete in one page.
    pub fn complete(data: Vec<T>, id: impl Fn(&T) -> String) -> Self {
        ListResponse {
            object: "list",
            first_id: data.first().map(&id),
            last_id: data.last().map(&id),
            data,
            has_more: false,
        }
    }
}

/// Pagination parameters (`after` = the last id of the previous page).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub after: Option<String>,
    pub limit: Option<u32>,
    /// Only `desc` (newest first) is supported.
    pub order: Option<String>,
}

impl ListParams {
    /// The page size, checked against `max`; also checks `order` and that `after`, when
    /// given, is not empty (a cursor naming no item of the list is a 404 from storage).
    pub fn limit(&self, default: u32, max: u32) -> Result<u32, ApiError> {
        if self.after.as_deref() == Some("") {
            return Err(ApiError::bad_request(
                "invalid_cursor",
                "after must be the id of an item of the list, not empty",
            )
            .param("after"));
        }
        if let Some(order) = &self.order
            && order != "desc"
        {
            return Err(ApiError::bad_request(
                "invalid_order",
                format!("order '{order}' is not supported; lists are newest first ('desc')"),
            )
            .param("order"));
        }
        match self.limit {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be between 1 and {max}, got {n}"),
            )
            .param("limit")),
        }
    }
}

/// Serde helpers for JSON Schema's `integer`, which openapi.yaml uses and which includes
/// integral floats such as `3.0`: an integer field takes those too.
pub mod integer {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};
    use serde_json::Number;

    /// `n` as an `i64` when it is an integer (also written as `3.0`) in range.
    pub fn to_i64(n: &Number) -> Option<i64> {
        n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| {
                    f.fract() == 0.0
                        && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(f)
                })
                .map(|f| f as i64)
        })
    }

    /// `n` as a `u64` when it is a non-negative integer (also written as `3.0`) in range.
    pub fn to_u64(n: &Number) -> Option<u64> {
        n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..1.844_674_407_370_955_2e19).contains(f))
                .map(|f| f as u64)
        })
    }

    /// For `#[serde(default, deserialize_with = "integer::opt_i64")]`.
    pub fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Option::<Number>::deserialize(d)? {
            None => Ok(None),
            Some(n) => to_i64(&n).map(Some).ok_or_else(|| {
                D::Error::custom(format!("invalid value: {n}, expected an integer"))
            }),
        }
    }
}

/// The `Idempotency-Key` header, checked (1–255 visible ASCII characters).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
        .param("Idempotency-Key")
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_recorded_once() {
        let routes = mounted_routes();
        let mut seen = std::collections::HashSet::new();
        for (m, p) in &routes {
            assert!(seen.insert((m.clone(), *p)), "{m} {p} mounted twice");
        }
        assert!(routes.len() > 20);
    }

    #[test]
    fn integers_may_be_written_as_integral_floats() {
        use serde_json::json;
        let n = |v: serde_json::Value| v.as_number().cloned().expect("number");
        assert_eq!(integer::to_i64(&n(json!(3))), Some(3));
        assert_eq!(integer::to_i64(&n(json!(3.0))), Some(3));
        assert_eq!(integer::to_i64(&n(json!(-2.0))), Some(-2));
        assert_eq!(integer::to_i64(&n(json!(3.5))), None);
        assert_eq!(integer::to_i64(&n(json!(1e300))), None);
        assert_eq!(integer::to_u64(&n(json!(7.0))), Some(7));
        assert_eq!(integer::to_u64(&n(json!(-1))), None);
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "integer::opt_i64")]
            x: Option<i64>,
        }
        let t: T = serde_json::from_value(json!({"x": 4.0})).expect("4.0");
        assert_eq!(t.x, Some(4));
        let t: T = serde_json::from_value(json!({})).expect("absent");
        assert_eq!(t.x, None);
        let t: T = serde_json::from_value(json!({"x": null})).expect("null");
        assert_eq!(t.x, None);
        assert!(serde_json::from_value::<T>(json!({"x": 4.5})).is_err());
        assert!(serde_json::from_value::<T>(json!({"x": "4"})).is_err());
    }

    #[test]
    fn limits_are_checked() {
        let p = ListParams {
            limit: Some(0),
            ..Default::default()
        };
        assert_eq!(
            p.limit(20, 100).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let p = ListParams::default();
        assert_eq!(p.limit(20, 100).unwrap(), 20);
    }
}
