//! Authentication: tenant API keys and the admin token, both as `Authorization: Bearer …`.
//!
//! [`Tenant`] is an extractor: a handler that takes it only runs for a valid, unrevoked key,
//! and every query it makes is scoped to that key's tenant (another tenant's ids answer 404).
//! [`Admin`] guards the admin routes with the token from `MOLT_ADMIN_TOKEN`; without one the
//! admin routes answer 401.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;

/// The tenant a request acts for.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub key_id: String,
}

/// The bearer token of a request, if it has one.
fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| {
        ApiError::unauthorized(
            "invalid_authorization",
            "the Authorization header is not valid ASCII",
        )
    })?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized(
                "invalid_authorization",
                "the Authorization header must be `Bearer <key>`",
            )
        })?
        .trim();
    Ok(Some(token))
}

/// Shows the start of a presented key in messages, as OpenAI does ("sk-molt-Ab**…").
fn redact(key: &str) -> String {
    let visible: String = key.chars().take(10).collect();
    format!("{visible}***")
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already authenticated by the rate limiter (see ratelimit.rs).
        if let Some(t) = parts.extensions.get::<Tenant>() {
            return Ok(t.clone());
        }
        let Some(token) = bearer(parts)? else {
            return Err(ApiError::unauthorized(
                "missing_api_key",
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        };
        if token.is_empty() {
            return Err(ApiError::unauthorized(
                "missing_api_key",
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        }
        let key = state.db.authenticate(token).await?.ok_or_else(|| {
            ApiError::unauthorized(
                "invalid_api_key",
                format!("Incorrect API key provided: {}", redact(token)),
            )
        })?;
        tracing::Span::current().record("tenant_id", key.tenant_id.as_str());
        Ok(Tenant {
            id: key.tenant_id,
            key_id: key.id,
        })
    }
}

/// Proof that a request carries the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state.config.admin_token.as_deref() else {
            return Err(ApiError::unauthorized(
                "admin_disabled",
                "the admin API is disabled: start the server with MOLT_ADMIN_TOKEN set",
            ));
        };
        match bearer(parts)? {
            None => Err(ApiError::unauthorized(
                "missing_admin_token",
                "admin routes need `Authorization: Bearer <MOLT_ADMIN_TOKEN>`",
            )),
            Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(Admin),
            Some(_) => Err(ApiError::unauthorized(
                "invalid_admin_token",
                "incorrect admin token",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn redaction_keeps_a_prefix() {
        assert_eq!(redact("sk-molt-abcdefgh"), "sk-molt-ab***");
    }
}
