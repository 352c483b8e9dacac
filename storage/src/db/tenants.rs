//! Tenants, API keys and base models (the admin side).

use serde_json::Value;
use sqlx::types::Json;

use super::models::{ApiKey, BaseModel, Page, Tenant};
use super::{Db, check_limit};
use crate::error::{Error, Result};
use crate::ids::{hash_secret, new_api_key_secret, new_id, now_secs, visible_prefix};

macro_rules! tenant_cols {
    () => {
        "id, name, created_at"
    };
}
macro_rules! api_key_cols {
    () => {
        "id, tenant_id, name, prefix, created_at, last_used_at, revoked_at"
    };
}
macro_rules! base_model_cols {
    () => {
        "id, location, config_hash, config, created_at"
    };
}

/// A base model to register.
#[derive(Debug, Clone)]
pub struct NewBaseModel {
    /// The model name users will pass as `model`.
    pub id: String,
    /// Object-store prefix/URL or local folder holding `config.json`, weights, tokenizer.
    pub location: String,
    pub config_hash: String,
    pub config: Value,
}

/// `last_used_at` of an API key is refreshed at most this often (seconds), so that
/// authenticating a request is usually a read.
const KEY_TOUCH_INTERVAL: i64 = 60;

impl Db {
    // ----- tenants -------------------------------------------------------------------------

    /// Creates a tenant. Names are unique ([`Error::Conflict`] otherwise).
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant> {
        if name.trim().is_empty() {
            return Err(Error::InvalidInput("tenant name must not be empty".into()));
        }
        let tenant = Tenant {
            id: new_id("tenant"),
            name: name.to_string(),
            created_at: now_secs(),
        };
        let res = with_pool!(self, |p| {
            sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(&tenant.id)
                .bind(&tenant.name)
                .bind(tenant.created_at)
                .execute(p)
                .await
                .map(|_| ())
        });
        match res {
            Ok(_) => {
                tracing::info!(tenant_id = %tenant.id, name, "tenant created");
                Ok(tenant)
            }
            Err(e) => match Error::from(e) {
                Error::Conflict(_) => Err(Error::Conflict(format!(
                    "a tenant named '{name}' already exists"
                ))),
                other => Err(other),
            },
        }
    }

    /// A tenant by id.
    pub async fn get_tenant(&self, id: &str) -> Result<Tenant> {
        let row: Option<Tenant> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                tenant_cols!(),
                " FROM tenants WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("tenant", id))
    }

    /// A tenant by name.
    pub async fn get_tenant_by_name(&self, name: &str) -> Result<Tenant> {
        let row: Option<Tenant> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                tenant_cols!(),
                " FROM tenants WHERE name = $1"
            ))
            .bind(name)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("tenant", name))
    }

    /// Tenants, newest first.
    pub async fn list_tenants(&self, after: Option<&str>, limit: u32) -> Result<Page<Tenant>> {
        let fetch = check_limit(limit)?;
        let rows: Vec<Tenant> = with_pool!(self, |p| {
            let before = match after {
                None => i64::MAX,
                Some(after) => {
                    sqlx::query_scalar::<_, i64>("SELECT seq FROM tenants WHERE id = $1")
                        .bind(after)
                        .fetch_optional(p)
                        .await?
                        .ok_or_else(|| Error::InvalidCursor {
                            kind: "tenant",
                            id: after.to_string(),
                        })?
                }
            };
            sqlx::query_as(concat!(
                "SELECT ",
                tenant_cols!(),
                " FROM tenants WHERE seq < $1 ORDER BY seq DESC LIMIT $2"
            ))
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    // ----- API keys ------------------------------------------------------------------------

    /// Creates an API key for a tenant. Returns its metadata and the secret, which is shown
    /// once and never stored (only its SHA-256 is).
    pub async fn create_api_key(
        &self,
        tenant_id: &str,
        name: Option<&str>,
    ) -> Result<(ApiKey, String)> {
        self.get_tenant(tenant_id).await?;
        let secret = new_api_key_secret();
        let key = ApiKey {
            id: new_id("key"),
            tenant_id: tenant_id.to_string(),
            name: name.map(str::to_string),
            prefix: visible_prefix(&secret),
            created_at: now_secs(),
            last_used_at: None,
            revoked_at: None,
        };
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&key.id)
            .bind(&key.tenant_id)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(hash_secret(&secret))
            .bind(key.created_at)
            .execute(p)
            .await?;
        });
        tracing::info!(tenant_id, key_id = %key.id, "API key created");
        Ok((key, secret))
    }

    /// Looks a presented secret up. `Ok(None)` when it matches no key or a revoked one.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>> {
        let hash = hash_secret(secret);
        let key: Option<ApiKey> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
            ))
            .bind(&hash)
            .fetch_optional(p)
            .await?
        });
        let Some(mut key) = key else {
            return Ok(None);
        };
        let now = now_secs();
        if key
            .last_used_at
            .is_none_or(|t| now - t >= KEY_TOUCH_INTERVAL)
        {
            with_pool!(self, |p| {
                sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(&key.id)
                    .execute(p)
                    .await?;
            });
            key.last_used_at = Some(now);
        }
        Ok(Some(key))
    }

    /// A tenant's API keys (revoked ones included), newest first.
    pub async fn list_api_keys(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<ApiKey>> {
        let fetch = check_limit(limit)?;
        let rows: Vec<ApiKey> = with_pool!(self, |p| {
            let before = match after {
                None => i64::MAX,
                Some(after) => sqlx::query_scalar::<_, i64>(
                    "SELECT seq FROM api_keys WHERE id = $1 AND tenant_id = $2",
                )
                .bind(after)
                .bind(tenant_id)
                .fetch_optional(p)
                .await?
                .ok_or_else(|| Error::InvalidCursor {
                    kind: "api key",
                    id: after.to_string(),
                })?,
            };
            sqlx::query_as(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(tenant_id)
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// Revokes a key (idempotent); it stops authenticating at once.
    pub async fn revoke_api_key(&self, tenant_id: &str, key_id: &str) -> Result<ApiKey> {
        let now = now_secs();
        let key: Option<ApiKey> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) \
                 WHERE id = $2 AND tenant_id = $3 RETURNING ",
                api_key_cols!()
            ))
            .bind(now)
            .bind(key_id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        let key = key.ok_or_else(|| Error::not_found("api key", key_id))?;
        tracing::info!(tenant_id, key_id, "API key revoked");
        Ok(key)
    }

    // ----- base models ---------------------------------------------------------------------

    /// Registers a base model (shared by all tenants). A duplicate id is [`Error::Conflict`].
    pub async fn register_base_model(&self, new: NewBaseModel) -> Result<BaseModel> {
        if new.id.trim().is_empty() {
            return Err(Error::InvalidInput(
                "base model id must not be empty".into(),
            ));
        }
        let now = now_secs();
        let res = with_pool!(self, |p| {
            sqlx::query_as::<_, BaseModel>(concat!(
                "INSERT INTO base_models (id, location, config_hash, config, created_at) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING ",
                base_model_cols!()
            ))
            .bind(&new.id)
            .bind(&new.location)
            .bind(&new.config_hash)
            .bind(Json(&new.config))
            .bind(now)
            .fetch_one(p)
            .await
        });
        match res {
            Ok(model) => {
                tracing::info!(model = %model.id, location = %model.location, "base model registered");
                Ok(model)
            }
            Err(e) => match Error::from(e) {
                Error::Conflict(_) => Err(Error::Conflict(format!(
                    "a base model named '{}' already exists",
                    new.id
                ))),
                other => Err(other),
            },
        }
    }

    /// A base model by id.
    pub async fn get_base_model(&self, id: &str) -> Result<BaseModel> {
        let row: Option<BaseModel> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                base_model_cols!(),
                " FROM base_models WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("model", id))
    }

    /// All base models, newest first.
    pub async fn list_base_models(&self) -> Result<Vec<BaseModel>> {
        Ok(with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                base_model_cols!(),
                " FROM base_models ORDER BY seq DESC"
            ))
            .fetch_all(p)
            .await?
        }))
    }

    /// Unregisters a base model (its files are left alone). Returns the removed row.
    pub async fn delete_base_model(&self, id: &str) -> Result<BaseModel> {
        let row: Option<BaseModel> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "DELETE FROM base_models WHERE id = $1 RETURNING ",
                base_model_cols!()
            ))
            .bind(id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("model", id))
    }
}
