//! One error type for every HTTP answer that is not a success: [`ApiError`], rendered as
//! OpenAI's envelope
//!
//! ```json
//! {"error": {"message": "…", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
//! ```
//!
//! Storage errors, axum's extractor rejections (malformed JSON, a wrong content type, a bad
//! query string or path, an over-long body) and the router's 404/405 fallbacks all become
//! this envelope, so a client never sees a plain-text error. The extractors [`Json`],
//! [`Query`] and [`Path`] wrap axum's and convert their rejections.

use std::borrow::Cow;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// OpenAI's error `type` for problems with the request.
pub const INVALID_REQUEST: &str = "invalid_request_error";
/// OpenAI's error `type` for problems on the server's side.
pub const SERVER_ERROR: &str = "server_error";

/// A failed request: status, OpenAI error `type`, machine-readable `code`, the offending
/// parameter, and a message that says what was wrong with the numbers and names involved.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<Cow<'static, str>>,
    pub message: String,
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        let kind = if status.is_server_error() {
            SERVER_ERROR
        } else {
            INVALID_REQUEST
        };
        ApiError {
            status,
            kind,
            code: Some(code.into()),
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400 with a code.
    pub fn bad_request(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for a resource this tenant cannot see (absent or another tenant's).
    pub fn not_found(kind: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("No such {kind}: '{id}'"),
        )
    }

    /// 401.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 422: the request is valid by `openapi.yaml`, but what it names does not allow it (a
    /// dataset that failed validation, a PEFT method that does not fit the base model, a
    /// token id outside the model's vocabulary, …) — rules no schema can state.
    pub fn unprocessable(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 409.
    pub fn conflict(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// 500 that logs the cause and shows the client only a generic message.
    pub fn internal(context: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("internal server error while {context}; see the server log"),
        )
    }

    /// 503 with a `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(retry_after);
        e
    }

    /// Names the request parameter the error is about.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The JSON envelope, as bytes.
    pub fn body(&self) -> Vec<u8> {
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        serde_json::to_vec(&envelope).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = ?self.code, "{}", self.message);
        } else {
            tracing::debug!(status = self.status.as_u16(), code = ?self.code, "{}", self.message);
        }
        let mut res = (self.status, self.body()).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        res
    }
}

impl From<storage::Error> for ApiError {
    fn from(e: storage::Error) -> Self {
        use storage::Error as E;
        match &e {
            E::NotFound { kind, id } => ApiError::not_found(kind, id),
            E::Conflict(msg) => ApiError::conflict("conflict", msg.clone()),
            E::InvalidState { .. } => ApiError::conflict("invalid_state", e.to_string()),
            // A cursor is a reference like a path id: one naming nothing is a 404.
            E::InvalidCursor { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "invalid_cursor", e.to_string()).param("after")
            }
            E::InvalidInput(msg) => ApiError::bad_request("invalid_input", msg.clone()),
            E::Rejected(msg) => ApiError::bad_request("invalid_file", msg.clone()).param("file"),
            E::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "file_too_large",
                format!("the upload is larger than the limit of {limit} bytes"),
            )
            .param("file"),
            E::UploadStream(msg) => {
                ApiError::bad_request("upload_failed", format!("the upload failed: {msg}"))
                    .param("file")
            }
            _ => ApiError::internal("talking to storage", &e),
        }
    }
}

/// Guesses the parameter a serde error is about ("missing field `model`").
fn param_from_serde_message(msg: &str) -> Option<String> {
    for marker in ["missing field `", "unknown field `"] {
        if let Some(rest) = msg.split(marker).nth(1)
            && let Some(name) = rest.split('`').next()
        {
            return Some(name.to_string());
        }
    }
    None
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match &r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a JSON body with `Content-Type: application/json`",
            ),
            JsonRejection::JsonSyntaxError(_) => ApiError::bad_request(
                "invalid_json",
                format!("the request body is not valid JSON: {}", r.body_text()),
            ),
            JsonRejection::JsonDataError(_) => {
                let text = r.body_text();
                let e = ApiError::bad_request("invalid_request_body", text.clone());
                match param_from_serde_message(&text) {
                    Some(p) => e.param(p),
                    None => e,
                }
            }
            _ => body_rejection(r.status(), r.body_text()),
        }
    }
}

/// A failure to read the body (too large → 413, anything else → 400).
fn body_rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is too large: {text}"),
        )
    } else {
        ApiError::new(status, "invalid_request_body", text)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        let e = ApiError::bad_request("invalid_query", text.clone());
        match param_from_serde_message(&text) {
            Some(p) => e.param(p),
            None => e,
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", r.body_text())
    }
}

/// `axum::Json` whose rejection is an [`ApiError`]. Also the response type for JSON bodies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(r) => Err(r.into()),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` whose rejection is an [`ApiError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(r) => Err(r.into()),
        }
    }
}

/// `axum::extract::Path` whose rejection is an [`ApiError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(r) => Err(r.into()),
        }
    }
}

/// Router fallback: no route has this path.
pub async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_url",
        format!("Invalid URL ({method} {})", uri.path()),
    )
}

/// Router fallback: the path exists but not with this method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("Method {method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_the_four_fields() {
        let e = ApiError::bad_request("x", "bad").param("model");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "bad");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "x");
        let e = ApiError::unauthorized("invalid_api_key", "nope");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn storage_errors_map_to_statuses() {
        let e: ApiError = storage::Error::NotFound {
            kind: "file",
            id: "file-x".into(),
        }
        .into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e: ApiError = storage::Error::InvalidCursor {
            kind: "job",
            id: "x".into(),
        }
        .into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.param.as_deref(), Some("after"));
        let e: ApiError = storage::Error::TooLarge { limit: 10 }.into();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn serde_params_are_found() {
        assert_eq!(
            param_from_serde_message("missing field `model` at line 1 column 2").as_deref(),
            Some("model")
        );
        assert_eq!(
            param_from_serde_message("unknown field `foo`, expected one of").as_deref(),
            Some("foo")
        );
    }
}
