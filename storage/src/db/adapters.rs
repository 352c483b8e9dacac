//! Trained adapters. A successful job creates one through [`Db::complete_job`]; adapters
//! can also be imported directly with [`Db::create_adapter`].

use serde_json::Value;
use sqlx::types::Json;

use super::models::{Adapter, Page};
use super::{Db, check_limit};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_secs};

macro_rules! adapter_cols {
    () => {
        "id, tenant_id, job_id, base_model, name, object_prefix, bytes, config, created_at"
    };
}
pub(crate) use adapter_cols;

/// An adapter to record (its files must already be in the blob store under `object_prefix`).
#[derive(Debug, Clone)]
pub struct NewAdapter {
    pub tenant_id: String,
    pub job_id: Option<String>,
    pub base_model: String,
    /// Unique per tenant.
    pub name: String,
    pub object_prefix: String,
    pub bytes: i64,
    pub config: Value,
}

impl Db {
    /// Records an adapter. A name the tenant already uses is [`Error::Conflict`].
    pub async fn create_adapter(&self, new: NewAdapter) -> Result<Adapter> {
        let res = with_pool!(self, |p| {
            sqlx::query_as::<_, Adapter>(concat!(
                "INSERT INTO adapters (id, tenant_id, job_id, base_model, name, object_prefix, \
                 bytes, config, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING ",
                adapter_cols!()
            ))
            .bind(new_id("adapter"))
            .bind(&new.tenant_id)
            .bind(&new.job_id)
            .bind(&new.base_model)
            .bind(&new.name)
            .bind(&new.object_prefix)
            .bind(new.bytes)
            .bind(Json(&new.config))
            .bind(now_secs())
            .fetch_one(p)
            .await
        });
        match res {
            Ok(a) => Ok(a),
            Err(e) => match Error::from(e) {
                Error::Conflict(_) => Err(Error::Conflict(format!(
                    "an adapter named '{}' already exists",
                    new.name
                ))),
                other => Err(other),
            },
        }
    }

    /// A tenant's adapter by id. Another tenant's id is [`Error::NotFound`].
    pub async fn get_adapter(&self, tenant_id: &str, id: &str) -> Result<Adapter> {
        let row: Option<Adapter> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                adapter_cols!(),
                " FROM adapters WHERE id = $1 AND tenant_id = $2"
            ))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("adapter", id))
    }

    /// A tenant's adapter by its fine-tuned model name (`ft:…`).
    pub async fn get_adapter_by_name(&self, tenant_id: &str, name: &str) -> Result<Adapter> {
        let row: Option<Adapter> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "SELECT ",
                adapter_cols!(),
                " FROM adapters WHERE name = $1 AND tenant_id = $2"
            ))
            .bind(name)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("adapter", name))
    }

    /// A tenant's adapters, newest first.
    pub async fn list_adapters(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Adapter>> {
        let fetch = check_limit(limit)?;
        let rows: Vec<Adapter> = with_pool!(self, |p| {
            let before = cursor_seq!(
                p,
                "SELECT seq FROM adapters WHERE id = $1 AND tenant_id = $2",
                "adapter",
                after,
                tenant_id
            );
            sqlx::query_as(concat!(
                "SELECT ",
                adapter_cols!(),
                " FROM adapters WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(tenant_id)
            .bind(before)
            .bind(fetch)
            .fetch_all(p)
            .await?
        });
        Ok(Page::from_overfetch(rows, limit as usize))
    }

    /// Deletes an adapter's row and returns it (the caller deletes its files afterwards).
    pub async fn delete_adapter(&self, tenant_id: &str, id: &str) -> Result<Adapter> {
        let row: Option<Adapter> = with_pool!(self, |p| {
            sqlx::query_as(concat!(
                "DELETE FROM adapters WHERE id = $1 AND tenant_id = $2 RETURNING ",
                adapter_cols!()
            ))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?
        });
        row.ok_or_else(|| Error::not_found("adapter", id))
    }
}
