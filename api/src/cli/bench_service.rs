//! `molt bench service`: the service's speed figures of issue 4.
//!
//! - `upload`: one `--upload-mib` (default 1024) JSONL dataset through `POST /v1/files` of a
//!   fresh `molt serve` (SQLite and local files in a temporary data directory): throughput,
//!   and the server's resident memory before and its peak (VmHWM) after — the upload must
//!   stream with bounded memory whatever the file's size. The data is generated on the fly
//!   (valid `{"text"}` lines), so the client holds only one chunk either.
//! - `latency`: `GET /v1/fine_tuning/jobs/{id}` at `--rate` requests/s (default 500) for
//!   `--duration-secs`, open loop: request *i* is due at `start + i / rate` whatever the
//!   earlier ones did, and its latency counts from when it was due, so a stalled server
//!   cannot hide its stall by slowing the client down (no coordinated omission). The first
//!   `--warmup-secs` are not counted. p50/p90/p99/p99.9/max, errors, the rate achieved.
//! - `claims`: `--jobs` small queued jobs over `--tenants` tenants claimed by `--workers`
//!   (default 8) concurrent claimers through the storage crate's `Db::claim` (PostgreSQL
//!   `FOR UPDATE SKIP LOCKED`), each on its own pooled connection, until the queue is empty:
//!   claims per second and the claim latency. With `--database-url postgres://…` a fresh
//!   database is created next to the given one and dropped afterwards; without it the
//!   figure is for SQLite in the temporary directory (labelled so).
//!
//! The rate limiter is off on the benchmarked server (`--rate-limit-requests 0`): it would
//! refuse the latency run's requests, which all use one key.
//!
//! Output: one JSON object per line on stdout (`bench`, `metric`, `value`, `unit` and
//! details); a readable summary on stderr.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use storage::{Db, DbOptions, JobStatus, NewFile, NewJob};

/// What to measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Upload,
    Latency,
    Claims,
}

/// `molt bench service` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceBenchArgs {
    /// What to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "upload,latency,claims"
    )]
    pub parts: Vec<Part>,

    /// Size of the uploaded dataset, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub upload_mib: u64,

    /// Requests per second of the latency run.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,

    /// Measured seconds of the latency run.
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,

    /// Seconds at the same rate before the latency run's measured part.
    #[arg(long, default_value_t = 5)]
    pub warmup_secs: u64,

    /// PostgreSQL server for the claims run (`postgres://user:pw@host:5432/postgres`): a
    /// fresh database is created there and dropped afterwards. Unset: SQLite.
    #[arg(long, env = "MOLT_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Concurrent claimers of the claims run.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,

    /// Jobs queued for the claims run.
    #[arg(long, default_value_t = 4000)]
    pub jobs: usize,

    /// Tenants the claims run's jobs are spread over (claims are fair across tenants).
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
}

/// Runs `molt bench service`.
pub fn run(args: ServiceBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(service(args))
}

fn emit(metric: &str, value: f64, unit: &str, details: Value) {
    let mut v = json!({"bench": "service", "metric": metric, "value": value, "unit": unit});
    if let (Some(o), Value::Object(d)) = (v.as_object_mut(), details) {
        o.extend(d);
    }
    println!("{v}");
}

async fn service(args: ServiceBenchArgs) -> Result<()> {
    ensure!(args.rate > 0, "--rate must be positive");
    ensure!(args.workers > 0, "--workers must be positive");
    let tmp = std::env::temp_dir().join(format!("molt-bench-service-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let res = run_parts(&args, &tmp).await;
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

async fn run_parts(args: &ServiceBenchArgs, tmp: &Path) -> Result<()> {
    let wants = |p| args.parts.contains(&p);
    if wants(Part::Upload) || wants(Part::Latency) {
        let server = BenchServer::start(&tmp.join("serve"), args.upload_mib).await?;
        if wants(Part::Upload) {
            upload(&server, args.upload_mib).await?;
        }
        if wants(Part::Latency) {
            latency(&server, args).await?;
        }
    }
    if wants(Part::Claims) {
        claims(args, tmp).await?;
    }
    Ok(())
}

/// A `molt serve` child process with a tenant, its key and one queued job.
struct BenchServer {
    child: Child,
    url: String,
    key: String,
    job_id: String,
    http: reqwest::Client,
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

/// `(VmRSS, VmHWM)` of a process in MiB.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading the server's /proc status")?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM in /proc/{pid}/status"),
    }
}

impl BenchServer {
    async fn start(data_dir: &Path, upload_mib: u64) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        // The tenant, key and a queued job go straight into the database before the server
        // opens it (with no workers the job stays queued for the GETs).
        let db = Db::open_data_dir(data_dir).await?;
        db.migrate().await?;
        let tenant = db.create_tenant("bench").await?;
        let (_, key) = db.create_api_key(&tenant.id, Some("bench")).await?;
        let (file, _) = db
            .create_file(NewFile {
                id: None,
                tenant_id: tenant.id.clone(),
                purpose: "fine-tune".into(),
                filename: "bench.jsonl".into(),
                bytes: 1,
                status: storage::FileStatus::Processed,
                status_details: None,
                line_count: Some(1),
                object_key: "files/bench".into(),
                sha256: None,
                idempotency_key: None,
                dataset: None,
            })
            .await?;
        let (job, _) = db
            .submit_job(NewJob::new(&tenant.id, "bench-model", &file.id))
            .await?;
        db.close().await;

        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = data_dir.join("serve.log");
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--workers", "0", "--rate-limit-requests", "0"])
            .arg("--models-dir")
            .arg({
                // No base models: the bench needs none.
                let d = data_dir.join("no-models");
                std::fs::create_dir_all(&d)?;
                d
            })
            .arg("--max-upload-bytes")
            .arg(((upload_mib + 64) << 20).to_string())
            .env("MOLT_LOG", "warn")
            .env_remove("MOLT_DATABASE_URL")
            .env_remove("MOLT_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("starting molt serve")?;
        let mut server = BenchServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            key,
            job_id: job.id,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "molt serve exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(r) = server
                .http
                .get(format!("{}/readyz", server.url))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(server);
            }
            ensure!(Instant::now() < deadline, "molt serve not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One MiB of valid JSONL (whole lines, padded with a last line to the exact size).
fn jsonl_chunk() -> Bytes {
    const MIB: usize = 1 << 20;
    let mut s = String::with_capacity(MIB);
    let mut i = 0usize;
    loop {
        let line = format!(
            "{{\"text\": \"Line {i}: the mamba slides over the warm stone and sings a quiet \
             song about the river, the reeds and the evening light.\"}}\n"
        );
        if s.len() + line.len() + 64 > MIB {
            break;
        }
        s.push_str(&line);
        i += 1;
    }
    let pad = MIB - s.len() - "{\"text\": \"\"}\n".len();
    s.push_str(&format!("{{\"text\": \"{}\"}}\n", "x".repeat(pad)));
    debug_assert_eq!(s.len(), MIB);
    Bytes::from(s)
}

async fn upload(server: &BenchServer, mib: u64) -> Result<()> {
    let pid = server.child.id();
    let (rss_before, _) = memory_mib(pid)?;
    let chunk = jsonl_chunk();
    let len = mib * chunk.len() as u64;
    let stream =
        futures::stream::iter((0..mib).map(move |_| Ok::<Bytes, std::io::Error>(chunk.clone())));
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
            .file_name("bench.jsonl");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part("file", part);
    eprintln!("upload: {mib} MiB through POST /v1/files …");
    let start = Instant::now();
    let res = server
        .http
        .post(format!("{}/v1/files", server.url))
        .bearer_auth(&server.key)
        .multipart(form)
        .send()
        .await
        .context("uploading")?;
    let status = res.status();
    let body: Value = res.json().await.context("reading the upload's answer")?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        status.is_success() && body["status"] == "processed",
        "the upload failed: {status} {body}"
    );
    let (rss_after, peak) = memory_mib(pid)?;
    let mib_s = mib as f64 / secs;
    eprintln!(
        "upload: {mib} MiB in {secs:.1} s = {mib_s:.1} MiB/s; server RSS {rss_before:.0} MiB \
         before, peak {peak:.0} MiB, {rss_after:.0} MiB after"
    );
    let details = json!({
        "bytes": len, "seconds": secs, "server_rss_before_mib": rss_before,
        "server_peak_rss_mib": peak, "server_rss_after_mib": rss_after,
    });
    emit("upload_throughput", mib_s, "MiB/s", details.clone());
    emit("upload_server_peak_rss", peak, "MiB", details);
    Ok(())
}

/// The `q`-quantile (nearest rank) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn latency(server: &BenchServer, args: &ServiceBenchArgs) -> Result<()> {
    let url: Arc<str> = format!("{}/v1/fine_tuning/jobs/{}", server.url, server.job_id).into();
    let auth: Arc<str> = format!("Bearer {}", server.key).into();
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let warmup = u64::from(args.rate) * args.warmup_secs;
    let total = warmup + u64::from(args.rate) * args.duration_secs;
    eprintln!(
        "latency: GET /v1/fine_tuning/jobs/{{id}} at {} requests/s for {} s (+{} s warm-up) …",
        args.rate, args.duration_secs, args.warmup_secs
    );
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(total as usize);
    let mut behind = Duration::ZERO;
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        behind = behind.max(tokio::time::Instant::now().saturating_duration_since(due));
        let (http, url, auth) = (server.http.clone(), url.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let ok = match http.get(&*url).header("authorization", &*auth).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (due.elapsed().as_secs_f64(), ok)
        }));
    }
    let sent_in = start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(total as usize);
    let mut errors = 0usize;
    for (i, t) in tasks.into_iter().enumerate() {
        let (secs, ok) = t.await?;
        if (i as u64) < warmup {
            continue;
        }
        if ok {
            lat.push(secs * 1000.0);
        } else {
            errors += 1;
        }
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p90, p99, p999) = (
        quantile(&lat, 0.5),
        quantile(&lat, 0.9),
        quantile(&lat, 0.99),
        quantile(&lat, 0.999),
    );
    let max = lat.last().copied().unwrap_or(f64::NAN);
    let achieved = total as f64 / sent_in;
    eprintln!(
        "latency: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max \
         {max:.2} ms; {errors} errors; sent at {achieved:.0}/s (generator at most {:.1} ms late)",
        behind.as_secs_f64() * 1000.0
    );
    let details = json!({
        "rate": args.rate, "seconds": args.duration_secs, "requests": lat.len() + errors,
        "errors": errors, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "p999_ms": p999,
        "max_ms": max, "achieved_rate": achieved,
        "generator_max_lateness_ms": behind.as_secs_f64() * 1000.0,
    });
    emit("job_get_latency_p50", p50, "ms", details.clone());
    emit("job_get_latency_p99", p99, "ms", details);
    Ok(())
}

/// The URL of database `name` on the server of `url`.
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

async fn pg_admin(url: &str, sql: String) -> Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .with_context(|| "connecting to --database-url")?;
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

async fn claims(args: &ServiceBenchArgs, tmp: &Path) -> Result<()> {
    let (url, backend, cleanup) = match &args.database_url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            let name = format!("molt_bench_{}", uuid::Uuid::new_v4().simple());
            pg_admin(u, format!("CREATE DATABASE {name}")).await?;
            (with_database(u, &name), "postgres", Some((u.clone(), name)))
        }
        Some(u) => bail!("--database-url must be postgres://… (got {u}); leave it out for SQLite"),
        None => {
            let p: PathBuf = tmp.join("claims.db");
            (p.display().to_string(), "sqlite", None)
        }
    };
    let res = claims_on(&url, backend, args).await;
    if let Some((admin, name)) = cleanup
        && let Err(e) = pg_admin(&admin, format!("DROP DATABASE IF EXISTS {name}")).await
    {
        eprintln!("claims: could not drop the scratch database {name}: {e:#}");
    }
    res
}

async fn claims_on(url: &str, backend: &str, args: &ServiceBenchArgs) -> Result<()> {
    let options = DbOptions {
        max_connections: Some(args.workers as u32 + 2),
        ..DbOptions::default()
    };
    let db = Db::connect_with(url, &options).await?;
    db.migrate().await?;
    eprintln!(
        "claims: queueing {} jobs over {} tenants on {backend} …",
        args.jobs, args.tenants
    );
    let mut owners = Vec::new();
    for t in 0..args.tenants.max(1) {
        let tenant = db.create_tenant(&format!("bench-{t}")).await?;
        let (file, _) = db
            .create_file(NewFile {
                id: None,
                tenant_id: tenant.id.clone(),
                purpose: "fine-tune".into(),
                filename: "bench.jsonl".into(),
                bytes: 1,
                status: storage::FileStatus::Processed,
                status_details: None,
                line_count: Some(1),
                object_key: format!("files/bench-{t}"),
                sha256: None,
                idempotency_key: None,
                dataset: None,
            })
            .await?;
        owners.push((tenant.id, file.id));
    }
    // Queued in parallel; not timed.
    let owners = Arc::new(owners);
    let mut fill = Vec::new();
    for w in 0..args.workers {
        let (db, owners) = (db.clone(), owners.clone());
        let (jobs, workers) = (args.jobs, args.workers);
        fill.push(tokio::spawn(async move {
            for i in (w..jobs).step_by(workers) {
                let (tenant, file) = &owners[i % owners.len()];
                db.submit_job(NewJob::new(tenant, "bench-model", file))
                    .await?;
            }
            Ok::<(), storage::Error>(())
        }));
    }
    for f in fill {
        f.await??;
    }

    eprintln!("claims: {} claimers …", args.workers);
    let start = Instant::now();
    let mut claimers = Vec::new();
    for w in 0..args.workers {
        let db = db.clone();
        claimers.push(tokio::spawn(async move {
            let worker = format!("bench-worker-{w}");
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                match db.claim(&worker, Duration::from_secs(3600)).await? {
                    Some(job) => {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        debug_assert_eq!(job.status, JobStatus::Running);
                    }
                    None => return Ok::<_, storage::Error>(lat),
                }
            }
        }));
    }
    let mut lat = Vec::new();
    for c in claimers {
        lat.extend(c.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    db.close().await;
    ensure!(
        lat.len() == args.jobs,
        "{} claims for {} jobs: a job was claimed twice or lost",
        lat.len(),
        args.jobs
    );
    lat.sort_by(f64::total_cmp);
    let rate = lat.len() as f64 / secs;
    let (p50, p99) = (quantile(&lat, 0.5), quantile(&lat, 0.99));
    eprintln!(
        "claims: {} jobs in {secs:.2} s by {} claimers on {backend} = {rate:.0} claims/s; claim \
         latency p50 {p50:.2} ms, p99 {p99:.2} ms",
        lat.len(),
        args.workers
    );
    emit(
        "queue_claims_per_second",
        rate,
        "claims/s",
        json!({
            "backend": backend, "workers": args.workers, "jobs": args.jobs,
            "tenants": args.tenants, "seconds": secs, "claim_p50_ms": p50, "claim_p99_ms": p99,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_chunk_is_one_mib_of_valid_jsonl() {
        let c = jsonl_chunk();
        assert_eq!(c.len(), 1 << 20);
        let summary = trainer::train::data::validate_reader(&c[..], Path::new("chunk"), None)
            .expect("valid JSONL");
        assert!(summary.examples > 1000, "{summary:?}");
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
    }
}
