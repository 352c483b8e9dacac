//! The database: one [`Db`] type over SQLite (the embedded default) and PostgreSQL.
//!
//! Every query goes through sqlx's non-macro API (`sqlx::query`, `query_as` + `FromRow`), so
//! the crate builds without a `DATABASE_URL`. The SQL is written once with `$1` placeholders,
//! which both SQLite and PostgreSQL accept; the few statements that differ (claiming with
//! `FOR UPDATE SKIP LOCKED`, the clock) are chosen per [`Backend`].
//!
//! Write transactions on SQLite start with `BEGIN IMMEDIATE` (they take the write lock up
//! front, so two writers never deadlock on a lock upgrade; the busy timeout makes the second
//! one wait); on PostgreSQL they are ordinary `READ COMMITTED` transactions.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::error::{Error, Result};

/// Runs `$body` with `$pool` bound to the backend's pool (a `SqlitePool` or a `PgPool`) and
/// `$dialect` to the matching [`Backend`]. The body is compiled once per backend.
macro_rules! with_pool {
    ($db:expr, |$pool:ident, $dialect:ident| $body:expr) => {
        match &*$db.pool {
            $crate::db::PoolKind::Sqlite($pool) => {
                #[allow(unused_variables)]
                let $dialect = $crate::db::Backend::Sqlite;
                $body
            }
            $crate::db::PoolKind::Postgres($pool) => {
                #[allow(unused_variables)]
                let $dialect = $crate::db::Backend::Postgres;
                $body
            }
        }
    };
    ($db:expr, |$pool:ident| $body:expr) => {
        with_pool!($db, |$pool, _dialect| $body)
    };
}

/// Appends an event to a job inside an open transaction `$tx` (per-job sequence numbers come
/// from `jobs.event_count`, which also row-locks the job until the transaction ends).
macro_rules! append_event {
    ($tx:ident, $job_id:expr, $level:expr, $event_type:expr, $message:expr, $data:expr, $now:expr) => {{
        let seq: i64 = sqlx::query_scalar(
            "UPDATE jobs SET event_count = event_count + 1 WHERE id = $1 RETURNING event_count",
        )
        .bind($job_id)
        .fetch_one(&mut *$tx)
        .await?;
        let data: Option<serde_json::Value> = $data;
        sqlx::query(
            "INSERT INTO job_events (job_id, seq, id, level, event_type, message, data, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind($job_id)
        .bind(seq)
        .bind($crate::ids::new_id("ftevent"))
        .bind($crate::db::models::EventLevel::as_str($level))
        .bind($event_type)
        .bind($message)
        .bind(data.map(sqlx::types::Json))
        .bind($now)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// Resolves an `after` cursor (a public id) to its `seq`, or `i64::MAX` when absent.
/// `$sql` selects `seq` with `$1` = the cursor id and further binds after it.
macro_rules! cursor_seq {
    ($pool:expr, $sql:expr, $kind:expr, $after:expr $(, $bind:expr)*) => {
        match $after {
            None => i64::MAX,
            Some(after) => sqlx::query_scalar::<_, i64>($sql)
                .bind(after)
                $(.bind($bind))*
                .fetch_optional($pool)
                .await?
                .ok_or_else(|| $crate::error::Error::InvalidCursor {
                    kind: $kind,
                    id: after.to_string(),
                })?,
        }
    };
}

pub mod models;

mod adapters;
mod files;
mod jobs;
mod queue;
mod searches;
mod stats;
mod tenants;

pub use adapters::NewAdapter;
pub use files::NewFile;
pub use jobs::NewJob;
pub use queue::{JobResult, Progress};
pub use searches::{NewSearch, NewTrial, SearchChange, TrialUpdate};
pub use tenants::NewBaseModel;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Largest page a list call returns.
pub const MAX_PAGE_LIMIT: u32 = 10_000;

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The statement that opens a write transaction.
    fn begin_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// A query returning the database server's clock in unix milliseconds (leases use the
    /// database's clock so that workers on machines with skewed clocks agree).
    fn now_ms_sql(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
            }
            Backend::Postgres => {
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
            }
        }
    }
}

pub(crate) enum PoolKind {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// Pool size (default 10 for PostgreSQL, 8 for SQLite).
    pub max_connections: Option<u32>,
    /// How long a SQLite connection waits for the write lock (default 30 s).
    pub busy_timeout: Duration,
    /// How long to wait for a free pooled connection (default 30 s).
    pub acquire_timeout: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: None,
            busy_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

/// The database handle: a connection pool for SQLite or PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pub(crate) pool: std::sync::Arc<PoolKind>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend())
            .finish()
    }
}

/// File name of the SQLite database inside the data directory.
pub const SQLITE_FILE_NAME: &str = "molt.db";

impl Db {
    /// Opens a database by URL with default options:
    /// `postgres://…` / `postgresql://…` → PostgreSQL; `sqlite:…` (sqlx's SQLite URL syntax,
    /// e.g. `sqlite:///var/lib/molt/molt.db` or `sqlite::memory:`) or a plain file path →
    /// SQLite. Does not run migrations (see [`Db::migrate`]).
    pub async fn connect(url: &str) -> Result<Db> {
        Db::connect_with(url, &DbOptions::default()).await
    }

    /// [`Db::connect`] with explicit options.
    pub async fn connect_with(url: &str, options: &DbOptions) -> Result<Db> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let connect = PgConnectOptions::from_str(url)
                .map_err(|e| Error::InvalidInput(format!("bad PostgreSQL URL: {e}")))?;
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections.unwrap_or(10))
                .acquire_timeout(options.acquire_timeout)
                .connect_with(connect)
                .await?;
            tracing::info!(backend = "postgres", "database connected");
            Ok(Db {
                pool: std::sync::Arc::new(PoolKind::Postgres(pool)),
            })
        } else if url.starts_with("sqlite:") {
            let connect = SqliteConnectOptions::from_str(url)
                .map_err(|e| Error::InvalidInput(format!("bad SQLite URL: {e}")))?;
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            Db::open_sqlite_with(connect, options, in_memory).await
        } else if url.contains("://") {
            Err(Error::InvalidInput(format!(
                "unsupported database URL scheme in '{}': use postgres://… or sqlite:…",
                url.split("://").next().unwrap_or_default()
            )))
        } else {
            Db::open_sqlite_file(Path::new(url), options).await
        }
    }

    /// Opens (creating if needed) the SQLite database `molt.db` inside `data_dir` — the
    /// embedded default.
    pub async fn open_data_dir(data_dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        Db::open_sqlite_file(&data_dir.join(SQLITE_FILE_NAME), &DbOptions::default()).await
    }

    /// Opens (creating if needed) a SQLite database file.
    pub async fn open_sqlite_file(path: &Path, options: &DbOptions) -> Result<Db> {
        let connect = SqliteConnectOptions::new().filename(path);
        Db::open_sqlite_with(connect, options, false).await
    }

    /// `in_memory`: one connection that never closes (each SQLite connection to `:memory:`
    /// would otherwise be its own empty database, and the data would vanish with it).
    async fn open_sqlite_with(
        connect: SqliteConnectOptions,
        options: &DbOptions,
        in_memory: bool,
    ) -> Result<Db> {
        let mut connect = connect
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let filename = connect.get_filename().display().to_string();
        let mut pool_options = SqlitePoolOptions::new().acquire_timeout(options.acquire_timeout);
        if in_memory {
            pool_options = pool_options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        } else {
            connect = connect
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            if let Some(parent) = connect.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            pool_options = pool_options.max_connections(options.max_connections.unwrap_or(8));
        }
        let pool = pool_options.connect_with(connect).await?;
        tracing::info!(backend = "sqlite", file = %filename, "database opened");
        Ok(Db {
            pool: std::sync::Arc::new(PoolKind::Sqlite(pool)),
        })
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match &*self.pool {
            PoolKind::Sqlite(_) => Backend::Sqlite,
            PoolKind::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the embedded migrations (`migrations/sqlite` or `migrations/postgres`).
    /// Idempotent: already-applied migrations are skipped. `molt migrate` and `molt serve`
    /// call it at start.
    pub async fn migrate(&self) -> Result<()> {
        match &*self.pool {
            PoolKind::Sqlite(p) => SQLITE_MIGRATOR.run(p).await?,
            PoolKind::Postgres(p) => POSTGRES_MIGRATOR.run(p).await?,
        }
        tracing::info!(backend = ?self.backend(), "database migrations applied");
        Ok(())
    }

    /// A trivial round trip (for readiness checks).
    pub async fn ping(&self) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    /// Closes the pool (waits for checked-out connections to come back).
    pub async fn close(&self) {
        match &*self.pool {
            PoolKind::Sqlite(p) => p.close().await,
            PoolKind::Postgres(p) => p.close().await,
        }
    }

    /// The database server's clock in unix milliseconds.
    pub async fn now_ms(&self) -> Result<i64> {
        Ok(with_pool!(self, |p, d| {
            sqlx::query_scalar::<_, i64>(d.now_ms_sql())
                .fetch_one(p)
                .await?
        }))
    }
}

/// Checks a page size.
pub(crate) fn check_limit(limit: u32) -> Result<i64> {
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(Error::InvalidInput(format!(
            "limit must be between 1 and {MAX_PAGE_LIMIT}, got {limit}"
        )));
    }
    // Fetch one more row than asked to learn `has_more`.
    Ok(i64::from(limit) + 1)
}

/// Converts a lease duration to milliseconds (at least 1 ms).
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}
