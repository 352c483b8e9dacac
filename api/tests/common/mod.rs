//! Shared helpers for the end-to-end tests: start `molt serve` / `molt worker` as real
//! processes on free ports and temporary data directories, and talk HTTP to them.
//!
//! PostgreSQL and S3 variants run when `MOLT_TEST_DATABASE_URL` / `MOLT_TEST_S3_ENDPOINT`
//! are set (scripts/test-services.sh sets both); each test then gets its own database and
//! its own bucket prefix.

#![allow(dead_code)]

pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn molt_exe() -> &'static str {
    env!("CARGO_BIN_EXE_molt")
}

/// Runs `molt args…` to completion, with `MOLT_MODEL` / `MOLT_ADAPTER` unset so only the
/// flags count; fails the test if it panicked.
pub fn molt_cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(molt_exe())
        .args(args)
        .env_remove("MOLT_MODEL")
        .env_remove("MOLT_ADAPTER")
        .output()
        .expect("run molt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "molt panicked:\n{stderr}");
    out
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn tiny_model_dir() -> PathBuf {
    repo_root().join("tests/fixtures/tiny/model")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

/// Where a test's database and blobs live.
#[derive(Debug, Clone)]
pub struct Backend {
    pub label: &'static str,
    /// `--database-url`; `None` = SQLite in the data dir.
    pub database_url: Option<String>,
    /// `--store`; `None` = local files in the data dir.
    pub store: Option<String>,
}

impl Backend {
    pub fn local() -> Self {
        Backend {
            label: "sqlite+local",
            database_url: None,
            store: None,
        }
    }

    /// PostgreSQL + S3 when both services are configured (a fresh database and prefix).
    pub fn postgres_s3() -> Option<Self> {
        let pg = std::env::var("MOLT_TEST_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())?;
        let _ = std::env::var("MOLT_TEST_S3_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty())?;
        let bucket = std::env::var("MOLT_TEST_S3_BUCKET").unwrap_or_else(|_| "molt-test".into());
        let name = format!("molt_e2e_{}", random_suffix());
        create_pg_database(&pg, &name);
        Some(Backend {
            label: "postgres+s3",
            database_url: Some(with_database(&pg, &name)),
            store: Some(format!("s3://{bucket}/e2e-{}", random_suffix())),
        })
    }
}

/// Creates a database through the admin URL with `psql`-free SQL over sqlx.
fn create_pg_database(admin_url: &str, name: &str) {
    let admin_url = admin_url.to_string();
    let name = name.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use sqlx::Connection;
            let mut conn = sqlx::postgres::PgConnection::connect(&admin_url)
                .await
                .expect("connect to MOLT_TEST_DATABASE_URL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .expect("create database");
        })
    })
    .join()
    .expect("create database thread");
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
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

/// Options of a `molt serve` process.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub backend: Backend,
    pub workers: usize,
    pub extra_args: Vec<String>,
    /// Reuse this data directory (restart tests).
    pub data_dir: Option<PathBuf>,
    pub lease_seconds: u64,
    /// Start as a new user would: in a fresh temporary working directory, with neither
    /// `--data-dir` nor `--models-dir` (the data lands in `./molt-data`, the built-in models
    /// are registered).
    pub defaults: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            backend: Backend::local(),
            workers: 0,
            extra_args: Vec::new(),
            data_dir: None,
            lease_seconds: 60,
            defaults: false,
        }
    }
}

/// A running `molt serve`.
pub struct Server {
    pub child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    _tmp: Option<TempDir>,
    pub key: String,
    pub http: reqwest::Client,
    pub options: ServeOptions,
    pub log: PathBuf,
}

impl Server {
    pub async fn start(options: ServeOptions) -> Server {
        let (tmp, data_dir) = match &options.data_dir {
            Some(d) => (None, d.clone()),
            None if options.defaults => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().join("molt-data");
                (Some(t), d)
            }
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let port = free_port();
        let log = data_dir.join(format!("serve-{port}.log"));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let mut cmd = Command::new(molt_exe());
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        if options.defaults {
            let cwd = data_dir.parent().expect("working directory");
            cmd.current_dir(cwd).env_remove("MOLT_DATA_DIR");
        } else {
            // No base models on start: each test registers what it uses.
            let no_models = data_dir.join("no-models");
            std::fs::create_dir_all(&no_models).expect("empty models dir");
            cmd.arg("--data-dir")
                .arg(&data_dir)
                .arg("--models-dir")
                .arg(&no_models);
        }
        cmd.arg("--workers")
            .arg(options.workers.to_string())
            .arg("--lease-seconds")
            .arg(options.lease_seconds.to_string())
            .arg("--poll-interval-ms")
            .arg("200")
            .args(&options.extra_args)
            .env("MOLT_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MOLT_LOG", "info")
            .env_remove("MOLT_DATABASE_URL")
            .env_remove("MOLT_STORE")
            .env_remove("MOLT_MODELS_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(data_dir.join(format!("serve-{port}.out"))).expect("out"),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")));
        if let Some(u) = &options.backend.database_url {
            cmd.arg("--database-url").arg(u);
        }
        if let Some(s) = &options.backend.store {
            cmd.arg("--store").arg(s);
        }
        let child = cmd.spawn().expect("spawn molt serve");
        let mut server = Server {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.clone(),
            _tmp: tmp,
            key: String::new(),
            http: reqwest::Client::new(),
            options,
            log,
        };
        server.wait_ready().await;
        server.key = std::fs::read_to_string(data_dir.join("first-key"))
            .expect("first-key")
            .trim()
            .to_string();
        server
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("molt serve exited with {status}:\n{}", self.log_text());
            }
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
    }

    pub fn req_as(&self, key: &str, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.req_as(ADMIN_TOKEN, method, path)
    }

    /// Sends and returns (status, JSON body).
    pub async fn call(&self, req: RequestBuilder) -> (StatusCode, Value) {
        let res = req.send().await.expect("request");
        json_of(res).await
    }

    /// GET as the tenant, expecting 200.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (s, v) = self.call(self.req(Method::GET, path)).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        v
    }

    /// Registers a base model through the admin API.
    pub async fn register_model(&self, id: &str, dir: &Path) -> Value {
        let (s, v) = self
            .call(self.admin(Method::POST, "/admin/models").json(&json!({
                "id": id, "source": dir.display().to_string()
            })))
            .await;
        assert_eq!(s, StatusCode::CREATED, "register model: {v}");
        v
    }

    /// A second tenant and its key.
    pub async fn new_tenant(&self, name: &str) -> (String, String) {
        let (s, t) = self
            .call(
                self.admin(Method::POST, "/admin/tenants")
                    .json(&json!({"name": name})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        let id = t["id"].as_str().expect("id").to_string();
        let (s, k) = self
            .call(self.admin(Method::POST, &format!("/admin/tenants/{id}/keys")))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{k}");
        (id, k["secret"].as_str().expect("secret").to_string())
    }

    /// Uploads bytes as a dataset; returns (status, body).
    pub async fn upload_as(&self, key: &str, name: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        let part = reqwest::multipart::Part::bytes(bytes).file_name(name.to_string());
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part("file", part);
        self.call(self.req_as(key, Method::POST, "/v1/files").multipart(form))
            .await
    }

    pub async fn upload(&self, name: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        self.upload_as(&self.key.clone(), name, bytes).await
    }

    /// Polls a job until it is finished; returns it.
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.get_ok(&format!("/v1/fine_tuning/jobs/{id}")).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not finished in time: {job}\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs the `molt` client CLI against this server with the tenant's key.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(molt_exe())
            .args(args)
            .env("MOLT_URL", &self.url)
            .env("MOLT_API_KEY", &self.key)
            .output()
            .expect("molt client")
    }

    /// `molt adapters download NAME --output DEST`, which must succeed.
    pub fn download_adapter(&self, name: &str, dest: &Path) {
        let dest = dest.display().to_string();
        let out = self.client(&["adapters", "download", name, "--output", &dest]);
        assert!(
            out.status.success(),
            "molt adapters download {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// All events of a job, oldest first.
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let v = self
            .get_ok(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"))
            .await;
        let mut events = v["data"].as_array().cloned().unwrap_or_default();
        events.reverse();
        events
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// (status, JSON) of a response (a non-JSON body becomes a string value).
pub async fn json_of(res: Response) -> (StatusCode, Value) {
    let status = res.status();
    let bytes = res.bytes().await.expect("body");
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

/// Asserts an OpenAI error envelope with this status and code; returns the message.
pub fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) -> String {
    assert_eq!(status, want, "expected {want} {code}, got {status}: {body}");
    let e = body
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no error envelope: {body}"));
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "envelope lacks `{k}`: {body}");
    }
    assert_eq!(e["code"], code, "{body}");
    assert!(
        matches!(
            e["type"].as_str(),
            Some("invalid_request_error" | "server_error")
        ),
        "{body}"
    );
    let msg = e["message"].as_str().expect("message").to_string();
    assert!(!msg.is_empty());
    msg
}

/// A `molt worker` process.
pub struct Worker {
    pub child: Child,
    pub id: String,
    pub log: PathBuf,
}

impl Worker {
    pub fn start(server: &Server, id: &str, lease_seconds: u64) -> Worker {
        let database_url = server
            .options
            .backend
            .database_url
            .clone()
            .unwrap_or_else(|| server.data_dir.join("molt.db").display().to_string());
        let store = server
            .options
            .backend
            .store
            .clone()
            .unwrap_or_else(|| server.data_dir.join("blobs").display().to_string());
        let log = server.data_dir.join(format!("{id}.log"));
        let child = Command::new(molt_exe())
            .arg("worker")
            .arg("--database-url")
            .arg(database_url)
            .arg("--store")
            .arg(store)
            .arg("--work-dir")
            .arg(server.data_dir.join("work").join(id))
            .arg("--worker-id")
            .arg(id)
            .arg("--lease-seconds")
            .arg(lease_seconds.to_string())
            .arg("--poll-interval-ms")
            .arg("100")
            .env("MOLT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn molt worker");
        Worker {
            child,
            id: id.to_string(),
            log,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small valid dataset of `n` plain-text examples.
pub fn text_dataset(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "{{\"text\": \"The mamba {i} slides over the warm stone and sings a quiet song.\"}}\n"
        ));
    }
    s.into_bytes()
}
