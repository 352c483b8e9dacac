//! `molt admin …`: tenants, API keys and base models through the admin API
//! (`Authorization: Bearer $MOLT_ADMIN_TOKEN`), and `molt migrate`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use super::client::Http;

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// Base URL of the molt server.
    #[arg(long, env = "MOLT_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// The server's admin token.
    #[arg(long, env = "MOLT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,

    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Create a tenant.
    CreateTenant { name: String },
    /// List tenants.
    Tenants,
    /// Create an API key for a tenant (the secret is printed once).
    CreateKey {
        tenant_id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List a tenant's keys.
    Keys { tenant_id: String },
    /// Revoke a key.
    RevokeKey { tenant_id: String, key_id: String },
    /// Register a base model from a folder on the server or an object-store URL.
    RegisterModel {
        /// The name users pass as `model`.
        id: String,
        /// Folder (as the server sees it) or `s3://bucket/prefix`.
        source: String,
        /// Register a local folder in place instead of copying it into the blob store.
        #[arg(long)]
        no_copy: bool,
    },
    /// List base models.
    Models,
    /// Unregister a base model.
    DeleteModel { id: String },
}

pub fn run(args: AdminArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let http = Http::new(&args.url, Some(args.admin_token.clone()))?;
        let v = match args.command {
            AdminCommand::CreateTenant { name } => {
                http.post("/admin/tenants", &json!({"name": name})).await?
            }
            AdminCommand::Tenants => http.get("/admin/tenants").await?,
            AdminCommand::CreateKey { tenant_id, name } => {
                http.post(
                    &format!("/admin/tenants/{tenant_id}/keys"),
                    &json!({"name": name}),
                )
                .await?
            }
            AdminCommand::Keys { tenant_id } => {
                http.get(&format!("/admin/tenants/{tenant_id}/keys"))
                    .await?
            }
            AdminCommand::RevokeKey { tenant_id, key_id } => {
                http.delete(&format!("/admin/tenants/{tenant_id}/keys/{key_id}"))
                    .await?
            }
            AdminCommand::RegisterModel {
                id,
                source,
                no_copy,
            } => {
                // A relative folder means the caller's directory; the server needs it absolute.
                let source = if source.contains("://") {
                    source
                } else {
                    std::path::absolute(PathBuf::from(&source))
                        .map(|p| p.display().to_string())
                        .unwrap_or(source)
                };
                http.post(
                    "/admin/models",
                    &json!({"id": id, "source": source, "copy": !no_copy}),
                )
                .await?
            }
            AdminCommand::Models => http.get("/admin/models").await?,
            AdminCommand::DeleteModel { id } => http.delete(&format!("/admin/models/{id}")).await?,
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    })
}

/// `molt migrate` flags.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Database URL (`postgres://…`, `sqlite:///path`, or a SQLite file path); default: the
    /// SQLite file in MOLT_DATA_DIR (./molt-data).
    #[arg(long, env = "MOLT_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Data directory for the default SQLite database.
    #[arg(long, env = "MOLT_DATA_DIR", default_value = "./molt-data")]
    pub data_dir: PathBuf,
}

pub fn migrate(args: MigrateArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let url = match args.database_url {
            Some(u) => u,
            None => {
                std::fs::create_dir_all(&args.data_dir)
                    .with_context(|| format!("creating {}", args.data_dir.display()))?;
                args.data_dir
                    .join(storage::db::SQLITE_FILE_NAME)
                    .display()
                    .to_string()
            }
        };
        let db = storage::Db::connect(&url)
            .await
            .context("opening the database")?;
        db.migrate().await.context("applying migrations")?;
        db.close().await;
        eprintln!("migrations applied ({:?})", db.backend());
        Ok(())
    })
}
