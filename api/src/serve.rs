//! `molt serve`: the one-command start. Opens (and migrates) the database, creates a
//! default tenant on first start (its key is printed once and written to `DATA_DIR/first-key`,
//! mode 0600), registers the base models (the demo built into the binary, or the folders of
//! `--models-dir`), serves the API, and
//! runs local workers as child processes: a worker that dies is restarted (with back-off),
//! and one signal (SIGINT/SIGTERM) shuts the server and every worker down.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use storage::{BlobStore, Db};
use tokio::process::{Child, Command};

use crate::ratelimit::RateLimit;
use crate::registry::{self, RegistryError};
use crate::routes;
use crate::state::{ApiConfig, AppState};

/// `molt serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "MOLT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Data directory: the SQLite database, local blobs, worker scratch space, first-key.
    #[arg(long, env = "MOLT_DATA_DIR", default_value = "./molt-data")]
    pub data_dir: PathBuf,

    /// Database URL (`postgres://…`); default: SQLite `DATA_DIR/molt.db`.
    #[arg(long, env = "MOLT_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Blob store (`s3://bucket/prefix` or a directory); default: `DATA_DIR/blobs`.
    #[arg(long, env = "MOLT_STORE")]
    pub store: Option<String>,

    /// Local worker processes to run (0: API only; run `molt worker` elsewhere).
    #[arg(long, env = "MOLT_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// Device for the local workers (`cpu` or `cuda:N`).
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Bearer token for the admin routes (`/admin/…`); unset disables them.
    #[arg(long, env = "MOLT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Folder of base models to register on start: each sub-folder holding a `config.json`
    /// is registered under the sub-folder's name, unless that name is registered already.
    /// Default: the models built into the binary (`demo`); an empty folder registers none.
    #[arg(long, env = "MOLT_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,

    /// Largest dataset upload in bytes.
    #[arg(long, env = "MOLT_MAX_UPLOAD_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// Largest JSON request body in bytes.
    #[arg(long, env = "MOLT_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Time limit for a request, in seconds (uploads: --upload-timeout-secs).
    #[arg(long, env = "MOLT_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Time limit for one upload, in seconds.
    #[arg(long, env = "MOLT_UPLOAD_TIMEOUT_SECS", default_value_t = 3600)]
    pub upload_timeout_secs: u64,

    /// Attempts of a job before it fails for good.
    #[arg(long, env = "MOLT_JOB_MAX_ATTEMPTS", default_value_t = 3)]
    pub job_max_attempts: i64,

    /// Lease length of the local workers, in seconds.
    #[arg(long, env = "MOLT_LEASE_SECONDS", default_value_t = 60)]
    pub lease_seconds: u64,

    /// Budget of the hot-swap adapter cache, in bytes of adapter tensors (least recently
    /// used adapters are evicted beyond it).
    #[arg(long, env = "MOLT_ADAPTER_CACHE_BYTES", default_value_t = 1 << 30)]
    pub adapter_cache_bytes: u64,

    /// Sequences decoded together per base model (continuous batching).
    #[arg(long, env = "MOLT_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// Sequences that may wait per base model; beyond it completions answer 429.
    #[arg(long, env = "MOLT_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,

    /// Longest accepted prompt, in tokens (completions and scoring).
    #[arg(long, env = "MOLT_MAX_PROMPT_TOKENS", default_value_t = 4096)]
    pub max_prompt_tokens: usize,

    /// Largest accepted `max_tokens` of a completion.
    #[arg(long, env = "MOLT_MAX_NEW_TOKENS", default_value_t = 2048)]
    pub max_new_tokens: usize,

    /// How served language models keep their matrices: `f32`, or `bf16` (half the memory
    /// and about half the time per decoded token on CPU; sums, activations and states stay
    /// f32, log-likelihoods move by a few hundredths at most). Training always uses f32.
    #[arg(long, env = "MOLT_DTYPE", value_enum, default_value = "f32")]
    pub dtype: crate::serving::WeightDtype,

    /// Queue poll interval of the local workers, in milliseconds.
    #[arg(long, env = "MOLT_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,

    /// Requests an API key may make per --rate-limit-window-secs on /v1/… (a token bucket:
    /// bursts up to this many, refilled evenly over the window); 0 turns the limit off.
    #[arg(long, env = "MOLT_RATE_LIMIT_REQUESTS", default_value_t = 600)]
    pub rate_limit_requests: u32,

    /// The rate limit's window, in seconds.
    #[arg(long, env = "MOLT_RATE_LIMIT_WINDOW_SECS", default_value_t = 60)]
    pub rate_limit_window_secs: u64,

    #[command(flatten)]
    pub limits: crate::limits::RequestLimits,
}

/// Why `molt serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("storage: {0}")]
    Storage(#[from] storage::Error),
    #[error("demo model: {0}")]
    Registry(#[from] RegistryError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--device: {0}")]
    Device(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Name of the file holding the first tenant's key.
pub const FIRST_KEY_FILE: &str = "first-key";

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Runs the service until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    if args.workers > 0 {
        crate::training::parse_device(&args.device).map_err(ServeError::Device)?;
    }
    let data_dir = absolute(&args.data_dir);
    std::fs::create_dir_all(&data_dir).map_err(|source| ServeError::Io {
        what: "cannot create the data directory",
        path: data_dir.clone(),
        source,
    })?;
    let database_url = args.database_url.clone().unwrap_or_else(|| {
        data_dir
            .join(storage::db::SQLITE_FILE_NAME)
            .display()
            .to_string()
    });
    let db = Db::connect(&database_url).await?;
    db.migrate().await?;
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| data_dir.join("blobs").display().to_string());
    let blobs = BlobStore::from_url(&store)?;

    first_start(&db, &data_dir).await?;
    register_start_models(&db, &blobs, args.models_dir.as_deref(), &data_dir).await?;
    spawn_upload_cleanup(blobs.clone());
    tokio::spawn(crate::search::drive(db.clone(), Duration::from_secs(1)));

    let config = ApiConfig {
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        max_upload_bytes: args.max_upload_bytes,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
        upload_timeout: Duration::from_secs(args.upload_timeout_secs.max(1)),
        job_max_attempts: args.job_max_attempts.max(1),
        rate_limit: RateLimit {
            requests: args.rate_limit_requests,
            window: Duration::from_secs(args.rate_limit_window_secs.max(1)),
        },
        serving: crate::serving::ServingConfig {
            cache_dir: data_dir.join("serving"),
            adapter_cache_bytes: args.adapter_cache_bytes,
            max_batch: args.max_batch.max(1),
            max_queue: args.max_queue,
            max_prompt_tokens: args.max_prompt_tokens.max(1),
            max_new_tokens: args.max_new_tokens.max(1),
            weights: args.dtype,
        },
        limits: args.limits.clone(),
        ..ApiConfig::default()
    };
    tracing::info!(?config, store = %blobs, workers = args.workers, "starting molt");
    let state = AppState::new(db.clone(), blobs, config);
    let app = routes::router(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    eprintln!(
        "molt: listening on http://{addr} (data in {}); dashboard: http://{addr}/ui/",
        data_dir.display()
    );

    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut supervisors = Vec::new();
    for i in 0..args.workers {
        let cmd = WorkerCommand {
            index: i,
            database_url: database_url.clone(),
            store: store.clone(),
            work_dir: data_dir.join("work").join(format!("worker-{i}")),
            device: args.device.clone(),
            lease_seconds: args.lease_seconds,
            poll_interval_ms: args.poll_interval_ms,
        };
        supervisors.push(tokio::spawn(supervise(cmd, stop_rx.clone())));
    }

    let shutdown = {
        let stopping = stopping.clone();
        async move {
            wait_for_signal().await;
            stopping.store(true, Ordering::SeqCst);
            eprintln!("molt: shutting down");
            let _ = stop_tx.send(true);
        }
    };
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "server error");
    }
    for s in supervisors {
        let _ = s.await;
    }
    db.close().await;
    Ok(())
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// On an empty database: creates tenant `default` and its first key, prints the key once
/// and writes it to `DATA_DIR/first-key` (mode 0600).
async fn first_start(db: &Db, data_dir: &Path) -> Result<(), ServeError> {
    if !db.list_tenants(None, 1).await?.data.is_empty() {
        return Ok(());
    }
    let tenant = db.create_tenant("default").await?;
    let (_, secret) = db.create_api_key(&tenant.id, Some("first key")).await?;
    let path = data_dir.join(FIRST_KEY_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| ServeError::Io {
            what: "cannot write",
            path: path.clone(),
            source,
        })?;
    writeln!(f, "{secret}").map_err(|source| ServeError::Io {
        what: "cannot write",
        path: path.clone(),
        source,
    })?;
    println!(
        "molt: first start — created tenant 'default'. Its API key (shown once; also in {}):",
        path.display()
    );
    println!("{secret}");
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Registers the models of `--models-dir`, or else the built-in ones, skipping names that
/// are registered already (a restart keeps what an operator changed). A model that fails
/// to register is logged and skipped; a `--models-dir` that cannot be read stops the start.
async fn register_start_models(
    db: &Db,
    blobs: &BlobStore,
    models_dir: Option<&Path>,
    data_dir: &Path,
) -> Result<(), ServeError> {
    match models_dir {
        Some(dir) => {
            let io = |source| ServeError::Io {
                what: "--models-dir: cannot read",
                path: dir.to_path_buf(),
                source,
            };
            let mut folders: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
                .map_err(io)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("config.json").is_file())
                .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), p)))
                .collect();
            folders.sort();
            if folders.is_empty() {
                tracing::info!(dir = %dir.display(), "no model folders to register");
            }
            for (name, path) in folders {
                register_one(db, blobs, &name, &path).await;
            }
        }
        None => {
            let scratch = data_dir.join("builtin-models");
            for m in crate::builtin::BUILTIN_MODELS {
                if is_registered(db, m.name).await {
                    continue;
                }
                let path = m.write_to(&scratch).map_err(|source| ServeError::Io {
                    what: "cannot write the built-in model to",
                    path: scratch.clone(),
                    source,
                })?;
                register_one(db, blobs, m.name, &path).await;
            }
            // The registry copied the files into the blob store.
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    Ok(())
}

async fn is_registered(db: &Db, id: &str) -> bool {
    match db.get_base_model(id).await {
        Ok(_) => true,
        Err(storage::Error::NotFound { .. }) => false,
        Err(e) => {
            tracing::warn!(model = id, error = %e, "could not look the model up");
            true
        }
    }
}

async fn register_one(db: &Db, blobs: &BlobStore, id: &str, dir: &Path) {
    if is_registered(db, id).await {
        return;
    }
    match registry::register_folder(db, blobs, id, dir, true).await {
        Ok(m) => eprintln!("molt: registered the base model '{}'", m.id),
        Err(e) => {
            tracing::warn!(model = id, error = %e, dir = %dir.display(), "could not register a base model")
        }
    }
}

/// Removes unfinished uploads left by killed processes, at start and then hourly.
fn spawn_upload_cleanup(blobs: BlobStore) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = blobs.cleanup_stale_uploads(Duration::from_secs(3600)).await {
                tracing::warn!(error = %e, "stale upload clean-up failed");
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// How to start one local worker.
#[derive(Debug, Clone)]
struct WorkerCommand {
    index: usize,
    database_url: String,
    store: String,
    work_dir: PathBuf,
    device: String,
    lease_seconds: u64,
    poll_interval_ms: u64,
}

impl WorkerCommand {
    fn spawn(&self) -> std::io::Result<Child> {
        let exe = std::env::current_exe()?;
        Command::new(exe)
            .arg("worker")
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--store")
            .arg(&self.store)
            .arg("--work-dir")
            .arg(&self.work_dir)
            .arg("--device")
            .arg(&self.device)
            .arg("--lease-seconds")
            .arg(self.lease_seconds.to_string())
            .arg("--poll-interval-ms")
            .arg(self.poll_interval_ms.to_string())
            .arg("--worker-id")
            .arg(format!(
                "{}-w{}",
                crate::worker::default_worker_id(),
                self.index
            ))
            .arg("--exit-with-parent")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
    }
}

/// Keeps one worker process alive: restarts it when it dies (back-off from 1 s to 30 s,
/// reset after a minute of uptime); on stop, SIGTERM then SIGKILL after 30 s.
async fn supervise(cmd: WorkerCommand, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(worker = cmd.index, error = %e, "cannot start a worker");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let pid = child.id();
        tracing::info!(worker = cmd.index, pid, "worker started");
        tokio::select! {
            status = child.wait() => {
                if *stop.borrow() {
                    return;
                }
                tracing::warn!(worker = cmd.index, pid, status = ?status.ok(), "worker exited; restarting");
                eprintln!("molt: worker {} (pid {}) exited; restarting", cmd.index, pid.unwrap_or(0));
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            _ = stop.changed() => {
                stop_child(&mut child, cmd.index).await;
                return;
            }
        }
    }
}

async fn stop_child(child: &mut Child, index: usize) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(_) => tracing::info!(worker = index, "worker stopped"),
        Err(_) => {
            tracing::warn!(worker = index, "worker did not stop in 30 s; killing it");
            let _ = child.kill().await;
        }
    }
}
