//! Shared test fixtures: every test runs against each available database and blob store.
//!
//! - SQLite: always, a fresh file in a temporary directory.
//! - PostgreSQL: when `MOLT_TEST_DATABASE_URL` is set (e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`); each test creates its own database
//!   `molt_test_<random>` through that URL and drops it afterwards.
//! - Local directory and in-memory blob stores: always.
//! - S3: when `MOLT_TEST_S3_ENDPOINT` is set (e.g. `http://127.0.0.1:9000`, a moto server);
//!   bucket `MOLT_TEST_S3_BUCKET` (default `molt-test`, must exist), credentials from
//!   `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (default `test` / `test`), region
//!   `AWS_REGION` (default `us-east-1`). Each test uses its own random prefix.
//!
//! `scripts/test-services.sh` starts both services and exports these variables.

#![allow(dead_code)]

use std::str::FromStr;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use storage::{BlobStore, Db, DbOptions, S3Config};
use tempfile::TempDir;

pub const PG_ENV: &str = "MOLT_TEST_DATABASE_URL";
pub const S3_ENV: &str = "MOLT_TEST_S3_ENDPOINT";

fn random_suffix() -> String {
    storage::ids::new_id("x")[2..].to_ascii_lowercase()
}

/// One database under test.
pub struct TestDb {
    pub label: &'static str,
    pub db: Db,
    /// URL to open more pools on the same database.
    pub url: String,
    _dir: Option<TempDir>,
    pg_drop: Option<PgDrop>,
}

impl TestDb {
    /// Another, separate connection pool on the same database (as a second process would
    /// have).
    pub async fn another_pool(&self) -> Db {
        Db::connect_with(&self.url, &test_options())
            .await
            .expect("open a second pool")
    }
}

fn test_options() -> DbOptions {
    DbOptions {
        max_connections: Some(5),
        ..DbOptions::default()
    }
}

struct PgDrop {
    admin_url: String,
    name: String,
}

impl Drop for PgDrop {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a separate thread with its own runtime.
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut conn = PgConnection::connect(&admin_url).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(joined, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// Replaces the database name in a PostgreSQL URL.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_and_path = &base[scheme_end..];
    let host_end = authority_and_path
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..host_end], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// SQLite always; PostgreSQL when `MOLT_TEST_DATABASE_URL` is set. Migrations applied.
pub async fn databases(test: &str) -> Vec<TestDb> {
    let mut out = Vec::new();

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("molt.db");
    let url = format!("sqlite://{}", path.display());
    let db = Db::connect_with(&url, &test_options())
        .await
        .expect("open sqlite");
    db.migrate().await.expect("migrate sqlite");
    out.push(TestDb {
        label: "sqlite",
        db,
        url,
        _dir: Some(dir),
        pg_drop: None,
    });

    match std::env::var(PG_ENV) {
        Ok(admin_url) if !admin_url.is_empty() => {
            PgConnectOptions::from_str(&admin_url).expect("MOLT_TEST_DATABASE_URL parses");
            let name = format!("molt_test_{}", random_suffix());
            let mut conn = PgConnection::connect(&admin_url)
                .await
                .expect("connect to MOLT_TEST_DATABASE_URL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .expect("create test database");
            conn.close().await.ok();
            let pg_drop = PgDrop {
                admin_url: admin_url.clone(),
                name: name.clone(),
            };
            let url = with_database(&admin_url, &name);
            let db = Db::connect_with(&url, &test_options())
                .await
                .expect("open postgres");
            db.migrate().await.expect("migrate postgres");
            out.push(TestDb {
                label: "postgres",
                db,
                url,
                _dir: None,
                pg_drop: Some(pg_drop),
            });
        }
        _ => eprintln!("{test}: skipping PostgreSQL ({PG_ENV} not set)"),
    }
    out
}

/// One blob store under test.
pub struct TestStore {
    pub label: &'static str,
    pub store: BlobStore,
    _dir: Option<TempDir>,
}

/// Local directory and memory always; S3 when `MOLT_TEST_S3_ENDPOINT` is set.
/// Part size 5 MiB (S3's minimum) everywhere, so multipart paths run on every backend.
pub fn blob_stores(test: &str) -> Vec<TestStore> {
    const CHUNK: usize = 5 * 1024 * 1024;
    let mut out = Vec::new();
    let dir = tempfile::tempdir().expect("tempdir");
    out.push(TestStore {
        label: "local",
        store: BlobStore::local(&dir.path().join("blobs"))
            .expect("local store")
            .with_chunk_size(CHUNK),
        _dir: Some(dir),
    });
    out.push(TestStore {
        label: "memory",
        store: BlobStore::memory().with_chunk_size(CHUNK),
        _dir: None,
    });
    match std::env::var(S3_ENV) {
        Ok(endpoint) if !endpoint.is_empty() => {
            let bucket =
                std::env::var("MOLT_TEST_S3_BUCKET").unwrap_or_else(|_| "molt-test".into());
            let env_or = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
            let config = S3Config {
                url: format!("s3://{bucket}/{test}-{}", random_suffix()),
                endpoint: Some(endpoint.clone()),
                region: Some(env_or("AWS_REGION", "us-east-1")),
                access_key_id: Some(env_or("AWS_ACCESS_KEY_ID", "test")),
                secret_access_key: Some(env_or("AWS_SECRET_ACCESS_KEY", "test")),
                allow_http: Some(endpoint.starts_with("http://")),
            };
            out.push(TestStore {
                label: "s3",
                store: BlobStore::s3(&config)
                    .expect("s3 store")
                    .with_chunk_size(CHUNK),
                _dir: None,
            });
        }
        _ => eprintln!("{test}: skipping S3 ({S3_ENV} not set)"),
    }
    out
}

/// A tenant with a processed training file, ready for jobs.
pub async fn tenant_with_file(db: &Db, name: &str) -> (storage::Tenant, storage::FileRecord) {
    let tenant = db.create_tenant(name).await.expect("create tenant");
    let (file, _) = db
        .create_file(storage::NewFile {
            id: None,
            tenant_id: tenant.id.clone(),
            purpose: "fine-tune".into(),
            filename: "train.jsonl".into(),
            bytes: 10,
            status: storage::FileStatus::Processed,
            status_details: None,
            line_count: Some(1),
            object_key: format!("files/{name}"),
            sha256: None,
            idempotency_key: None,
            dataset: None,
        })
        .await
        .expect("create file");
    (tenant, file)
}

/// Submits (creates and enqueues) a job.
pub async fn submit(db: &Db, tenant: &storage::Tenant, file: &storage::FileRecord) -> storage::Job {
    submit_with(db, tenant, file, None).await
}

pub async fn submit_with(
    db: &Db,
    tenant: &storage::Tenant,
    file: &storage::FileRecord,
    max_attempts: Option<i64>,
) -> storage::Job {
    let mut new = storage::NewJob::new(&tenant.id, "mamba-test", &file.id);
    new.max_attempts = max_attempts;
    let (job, created) = db.submit_job(new).await.expect("submit job");
    assert!(created);
    assert_eq!(job.status, storage::JobStatus::Queued);
    job
}
