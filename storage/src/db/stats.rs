//! Read-only numbers across all tenants, for the API's `/metrics`.

use serde_json::Value;

use super::Db;
use crate::error::Result;

impl Db {
    /// The latest metrics (`jobs.metrics`) of every job that is running or cancelling under
    /// a lease, across all tenants (jobs that have not reported any are left out).
    pub async fn running_job_metrics(&self) -> Result<Vec<Value>> {
        let rows: Vec<(Option<sqlx::types::Json<Value>>,)> = with_pool!(self, |p| {
            sqlx::query_as("SELECT metrics FROM jobs WHERE status IN ('running', 'cancelling')")
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().filter_map(|(m,)| m.map(|j| j.0)).collect())
    }
}
