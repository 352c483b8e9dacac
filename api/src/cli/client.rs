//! The client side of `molt`: `files`, `jobs`, `searches` and `adapters` commands talking HTTP
//! to a molt server (`--url`, `--api-key`; the key defaults to `MOLT_API_KEY`, then to the
//! `first-key` file of `./molt-data`). Answers are printed as JSON; `jobs watch` draws a
//! progress bar with loss, tokens/s and ETA and exits non-zero if the job does not succeed;
//! `searches watch` redraws a search's trial table until it ends (exit status 1 unless it
//! succeeds). An error answer is shown with its status, code, `param` and message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

/// Where the server is and who we are.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Base URL of the molt server.
    #[arg(
        long,
        env = "MOLT_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,

    /// API key (default: the `first-key` file in MOLT_DATA_DIR or ./molt-data).
    #[arg(long, env = "MOLT_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
}

/// A small JSON-over-HTTP client.
pub struct Http {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Http {
    pub fn new(url: &str, token: Option<String>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Http {
            client,
            base: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// A client with the tenant's API key.
    pub fn tenant(args: &ClientArgs) -> Result<Self> {
        let key = match &args.api_key {
            Some(k) => k.clone(),
            None => default_key().context(
                "no API key: pass --api-key, set MOLT_API_KEY, or run next to the server's \
                 data directory (./molt-data/first-key)",
            )?,
        };
        Http::new(&args.url, Some(key))
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Sends and decodes a JSON answer; an error envelope becomes the error's message.
    pub async fn json(&self, req: RequestBuilder) -> Result<Value> {
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        decode(res).await
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::DELETE, path)).await
    }
}

/// Turns an answer into JSON or an error carrying the server's message.
pub async fn decode(res: Response) -> Result<Value> {
    let status = res.status();
    let bytes = res.bytes().await.context("reading the answer")?;
    let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(
        |_| json!({"error": {"message": String::from_utf8_lossy(&bytes), "code": null}}),
    );
    if status.is_success() {
        return Ok(value);
    }
    let msg = value["error"]["message"].as_str().unwrap_or("(no message)");
    let code = value["error"]["code"].as_str().unwrap_or("-");
    match value["error"]["param"].as_str() {
        Some(param) => bail!("server answered {status} ({code}, param {param}): {msg}"),
        None => bail!("server answered {status} ({code}): {msg}"),
    }
}

fn default_key() -> Option<String> {
    let dir = std::env::var_os("MOLT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("molt-data"));
    let key = std::fs::read_to_string(dir.join("first-key")).ok()?;
    let key = key.trim().to_string();
    (!key.is_empty()).then_some(key)
}

fn print(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

// ----- classify -----------------------------------------------------------------------------

/// `molt classify`.
#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    /// A vision base model, a fine-tuned model (`ft:…`) or a merged one (`merged:…`).
    #[arg(long)]
    pub model: String,
    /// Classes shown per image, most likely first.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print the server's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Image files (PNG, JPEG, WebP), sent in one request.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Sends the images (base64) and prints `image  rank  label  index  probability` rows.
pub fn classify(args: &ClientArgs, a: ClassifyArgs) -> Result<()> {
    use base64::Engine;
    let mut images = Vec::with_capacity(a.images.len());
    for p in &a.images {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        images.push(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    runtime()?.block_on(async {
        let http = Http::tenant(args)?;
        let v = http
            .post(
                "/v1/classifications",
                &json!({"model": a.model, "images": images, "top_k": a.top_k}),
            )
            .await?;
        if a.json {
            print(&v);
            return Ok(());
        }
        let data = v["data"].as_array().cloned().unwrap_or_default();
        for (path, d) in a.images.iter().zip(&data) {
            for (rank, p) in d["predictions"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                println!(
                    "{}\t{}\t{}\t{}\t{:.6}",
                    path.display(),
                    rank + 1,
                    p["label"].as_str().unwrap_or(""),
                    p["index"],
                    p["probability"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        Ok(())
    })
}

// ----- files --------------------------------------------------------------------------------

#[derive(clap::Subcommand, Debug)]
pub enum FilesCommand {
    /// Upload a dataset: JSONL text, or images (a zip / tar / tar.gz of class folders, or
    /// image JSONL). Streamed; prints the file object, whose `status` says whether every
    /// line or image validated.
    Upload {
        path: PathBuf,
        /// The file's purpose.
        #[arg(long, default_value = "fine-tune")]
        purpose: String,
        /// Makes a retried upload return the first one's file instead of a duplicate.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// List files.
    List {
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one file.
    Get { id: String },
    /// Delete a file.
    Delete { id: String },
}

pub fn files(args: &ClientArgs, cmd: FilesCommand) -> Result<()> {
    runtime()?.block_on(async {
        let http = Http::tenant(args)?;
        let v = match cmd {
            FilesCommand::Upload {
                path,
                purpose,
                idempotency_key,
            } => upload(&http, &path, &purpose, idempotency_key.as_deref()).await?,
            FilesCommand::List { limit, after } => {
                let mut q = Vec::new();
                if let Some(l) = limit {
                    q.push(("limit", l.to_string()));
                }
                if let Some(a) = after {
                    q.push(("after", a));
                }
                http.json(http.request(Method::GET, "/v1/files").query(&q))
                    .await?
            }
            FilesCommand::Get { id } => http.get(&format!("/v1/files/{id}")).await?,
            FilesCommand::Delete { id } => http.delete(&format!("/v1/files/{id}")).await?,
        };
        print(&v);
        Ok(())
    })
}

/// Streams a file up with a byte progress bar.
pub async fn upload(http: &Http, path: &Path, purpose: &str, idem: Option<&str>) -> Result<Value> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .await
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let counted = bar.clone();
    let stream = tokio_util_stream(file).map(move |chunk| {
        if let Ok(c) = &chunk {
            counted.inc(c.len() as u64);
        }
        chunk
    });
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload.jsonl".into());
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
            .file_name(name)
            .mime_str("application/jsonl")?;
    let form = reqwest::multipart::Form::new()
        .text("purpose", purpose.to_string())
        .part("file", part);
    let mut req = http.request(Method::POST, "/v1/files").multipart(form);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let v = http.json(req).await;
    bar.finish_and_clear();
    v
}

use futures::StreamExt;

/// A file as a stream of byte chunks.
fn tokio_util_stream(
    mut file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::poll_fn(move |cx| {
        use tokio::io::AsyncRead;
        let mut buf = vec![0u8; 256 * 1024];
        let mut rb = tokio::io::ReadBuf::new(&mut buf);
        match std::pin::Pin::new(&mut file).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    std::task::Poll::Ready(None)
                } else {
                    buf.truncate(n);
                    std::task::Poll::Ready(Some(Ok(bytes::Bytes::from(buf))))
                }
            }
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Some(Err(e))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
}

// ----- jobs ---------------------------------------------------------------------------------

#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// Create a fine-tuning job.
    Create {
        /// Base model.
        #[arg(long)]
        model: String,
        /// Training file id (`file-…`).
        #[arg(long)]
        training_file: String,
        /// Validation file id.
        #[arg(long)]
        validation_file: Option<String>,
        /// PEFT method as JSON, e.g. '{"type": "lora", "targets": "in_proj", "r": 8}' (or @file.json).
        #[arg(long)]
        method: Option<String>,
        /// Hyperparameters as JSON, e.g. '{"n_epochs": 1, "batch_size": 4}' (or @file.json).
        #[arg(long)]
        hyperparameters: Option<String>,
        #[arg(long)]
        seed: Option<i64>,
        #[arg(long)]
        suffix: Option<String>,
        /// Watch the job after creating it.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one job.
    Get { id: String },
    /// Follow a job with a progress bar until it ends (exit status 1 unless it succeeds).
    Watch {
        id: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Show a job's events, oldest first.
    Events {
        id: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `JSON` or `@file`, parsed.
pub(crate) fn json_arg(s: &str) -> Result<Value> {
    let text = match s.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => s.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("not valid JSON: {text}"))
}

pub fn jobs(args: &ClientArgs, cmd: JobsCommand) -> Result<()> {
    runtime()?.block_on(async {
        let http = Http::tenant(args)?;
        match cmd {
            JobsCommand::Create {
                model,
                training_file,
                validation_file,
                method,
                hyperparameters,
                seed,
                suffix,
                watch: then_watch,
            } => {
                let mut body = json!({"model": model, "training_file": training_file});
                if let Some(v) = validation_file {
                    body["validation_file"] = json!(v);
                }
                if let Some(m) = method {
                    body["method"] = json_arg(&m)?;
                }
                if let Some(h) = hyperparameters {
                    body["hyperparameters"] = json_arg(&h)?;
                }
                if let Some(s) = seed {
                    body["seed"] = json!(s);
                }
                if let Some(s) = suffix {
                    body["suffix"] = json!(s);
                }
                let job = http.post("/v1/fine_tuning/jobs", &body).await?;
                print(&job);
                if then_watch {
                    let id = job["id"].as_str().unwrap_or_default().to_string();
                    return watch(&http, &id, Duration::from_secs(1)).await;
                }
            }
            JobsCommand::List { limit, after } => {
                let mut q = Vec::new();
                if let Some(l) = limit {
                    q.push(("limit", l.to_string()));
                }
                if let Some(a) = after {
                    q.push(("after", a));
                }
                print(
                    &http
                        .json(http.request(Method::GET, "/v1/fine_tuning/jobs").query(&q))
                        .await?,
                );
            }
            JobsCommand::Get { id } => {
                print(&http.get(&format!("/v1/fine_tuning/jobs/{id}")).await?)
            }
            JobsCommand::Cancel { id } => print(
                &http
                    .post(&format!("/v1/fine_tuning/jobs/{id}/cancel"), &json!({}))
                    .await?,
            ),
            JobsCommand::Events { id, limit } => {
                print_events(
                    &http,
                    &format!("/v1/fine_tuning/jobs/{id}/events?limit={limit}"),
                )
                .await?
            }
            JobsCommand::Watch { id, interval } => {
                return watch(&http, &id, Duration::from_secs_f64(interval.max(0.1))).await;
            }
        }
        Ok(())
    })
}

/// Prints a page of events (newest first from the API) oldest first, one per line.
async fn print_events(http: &Http, path: &str) -> Result<()> {
    let v = http.get(path).await?;
    let mut events: Vec<Value> = v["data"].as_array().cloned().unwrap_or_default();
    events.reverse();
    for e in events {
        println!(
            "{} {:5} {}",
            e["created_at"],
            e["level"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// The bar's message: loss, tokens/s, ETA.
pub fn progress_message(job: &Value) -> String {
    let m = &job["metrics"];
    let mut parts = vec![job["status"].as_str().unwrap_or("?").to_string()];
    if let Some(l) = m["train_loss"].as_f64() {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(t) = m["tokens_per_second"].as_f64() {
        parts.push(format!("{t:.0} tok/s"));
    }
    if let Some(finish) = job["estimated_finish"].as_i64() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(finish);
        parts.push(format!("ETA {}s", (finish - now).max(0)));
    }
    parts.join(" · ")
}

/// Polls a job and draws its progress until it ends.
pub async fn watch(http: &Http, id: &str, interval: Duration) -> Result<()> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    loop {
        let job = http.get(&format!("/v1/fine_tuning/jobs/{id}")).await?;
        let total = job["progress"]["total_steps"].as_u64().unwrap_or(0).max(1);
        bar.set_length(total);
        bar.set_position(job["progress"]["step"].as_u64().unwrap_or(0).min(total));
        bar.set_message(progress_message(&job));
        bar.tick();
        match job["status"].as_str().unwrap_or("") {
            "succeeded" => {
                bar.finish();
                println!(
                    "succeeded: fine-tuned model {} (adapter {})",
                    job["fine_tuned_model"].as_str().unwrap_or("?"),
                    job["adapter_id"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
            "failed" => {
                bar.abandon();
                bail!(
                    "job {id} failed: {}",
                    job["error"]["message"].as_str().unwrap_or("(no message)")
                );
            }
            "cancelled" => {
                bar.abandon();
                bail!("job {id} was cancelled");
            }
            _ => tokio::time::sleep(interval).await,
        }
    }
}

// ----- searches -----------------------------------------------------------------------------

const SEARCHES: &str = "/v1/fine_tuning/searches";

#[derive(clap::Subcommand, Debug)]
pub enum SearchesCommand {
    /// Start a hybrid PEFT search (MambaPEFT's two steps: which methods, then their
    /// hyperparameters). Prints the search; `--watch` follows it.
    Create {
        /// Base model.
        #[arg(long)]
        model: String,
        /// Training file id (`file-…`).
        #[arg(long)]
        training_file: String,
        /// Validation file id (required by the server: the objective is measured on it).
        #[arg(long)]
        validation_file: Option<String>,
        #[command(flatten)]
        search: Box<super::search::SearchFlags>,
        /// Suffix of the fine-tuned model names of the search's jobs.
        #[arg(long)]
        suffix: Option<String>,
        /// Watch the search after creating it.
        #[arg(long)]
        watch: bool,
    },
    /// List searches, newest first.
    List {
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one search (status, step, trial counts, best trial so far, ETA).
    Get { id: String },
    /// Redraw a search's trial table until it ends (exit status 1 unless it succeeds).
    Watch {
        id: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// Cancel a search and its running trials.
    Cancel { id: String },
    /// Show every trial of a search.
    Trials { id: String },
    /// Train the search's best configuration into an adapter (prints the job).
    Train { id: String },
    /// Show a search's events, oldest first.
    Events {
        id: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub fn searches(args: &ClientArgs, cmd: SearchesCommand) -> Result<()> {
    runtime()?.block_on(async {
        let http = Http::tenant(args)?;
        match cmd {
            SearchesCommand::Create {
                model,
                training_file,
                validation_file,
                search,
                suffix,
                watch: then_watch,
            } => {
                let mut body = json!({"model": model, "training_file": training_file});
                if let Some(v) = validation_file {
                    body["validation_file"] = json!(v);
                }
                for (k, v) in search.request()? {
                    body[k] = v;
                }
                if let Some(s) = suffix {
                    body["suffix"] = json!(s);
                }
                let created = http.post(SEARCHES, &body).await?;
                print(&created);
                if then_watch {
                    let id = created["id"].as_str().unwrap_or_default().to_string();
                    return watch_search(&http, &id, Duration::from_secs(1)).await;
                }
            }
            SearchesCommand::List { limit, after } => {
                let mut q = Vec::new();
                if let Some(l) = limit {
                    q.push(("limit", l.to_string()));
                }
                if let Some(a) = after {
                    q.push(("after", a));
                }
                print(
                    &http
                        .json(http.request(Method::GET, SEARCHES).query(&q))
                        .await?,
                );
            }
            SearchesCommand::Get { id } => print(&http.get(&format!("{SEARCHES}/{id}")).await?),
            SearchesCommand::Trials { id } => {
                print(&http.get(&format!("{SEARCHES}/{id}/trials")).await?)
            }
            SearchesCommand::Cancel { id } => print(
                &http
                    .post(&format!("{SEARCHES}/{id}/cancel"), &json!({}))
                    .await?,
            ),
            SearchesCommand::Train { id } => print(
                &http
                    .post(&format!("{SEARCHES}/{id}/train"), &json!({}))
                    .await?,
            ),
            SearchesCommand::Events { id, limit } => {
                print_events(&http, &format!("{SEARCHES}/{id}/events?limit={limit}")).await?
            }
            SearchesCommand::Watch { id, interval } => {
                return watch_search(&http, &id, Duration::from_secs_f64(interval.max(0.1))).await;
            }
        }
        Ok(())
    })
}

/// Polls a search and its trials and shows the trial table until the search ends: on a
/// terminal redrawn in place (ANSI clear + home) every poll, otherwise printed only when it
/// changes (the ETA aside) so that logs stay readable. Errors unless the search succeeds.
pub async fn watch_search(http: &Http, id: &str, interval: Duration) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let mut shown = String::new();
    loop {
        let search = http.get(&format!("{SEARCHES}/{id}")).await?;
        let trials = http.get(&format!("{SEARCHES}/{id}/trials")).await?;
        let trials = trials["data"].as_array().cloned().unwrap_or_default();
        let screen = super::search::watch_screen(&search, &trials, true);
        if tty {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\x1b[2J\x1b[H{screen}");
            let _ = out.flush();
        } else {
            let key = super::search::watch_screen(&search, &trials, false);
            if key != shown {
                println!("{screen}");
                shown = key;
            }
        }
        let best = &search["best"];
        match search["status"].as_str().unwrap_or("") {
            "succeeded" => {
                println!(
                    "succeeded: best {} {} (trial {}): {}",
                    search["objective"].as_str().unwrap_or("value"),
                    best["value"]
                        .as_f64()
                        .map_or_else(|| "-".into(), |v| format!("{v:.6}")),
                    best["trial"],
                    super::search::configuration_summary(&best["configuration"])
                );
                if let Some(job) = search["result_job_id"].as_str() {
                    println!(
                        "training the best configuration into an adapter: job {job} \
                         (molt jobs watch {job})"
                    );
                }
                return Ok(());
            }
            "failed" => bail!(
                "search {id} failed: {}",
                search["error"]["message"]
                    .as_str()
                    .unwrap_or("(no message)")
            ),
            "cancelled" => bail!("search {id} was cancelled"),
            _ => tokio::time::sleep(interval).await,
        }
    }
}

// ----- adapters -----------------------------------------------------------------------------

#[derive(clap::Subcommand, Debug)]
pub enum AdaptersCommand {
    /// Download an adapter's files (adapter_model.safetensors, adapter_config.json) into a
    /// folder. ID is the adapter id or the fine-tuned model name.
    Download {
        id: String,
        /// Destination folder (created).
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Show an adapter.
    Get { id: String },
    /// List adapters.
    List,
}

pub fn adapters(args: &ClientArgs, cmd: AdaptersCommand) -> Result<()> {
    runtime()?.block_on(async {
        let http = Http::tenant(args)?;
        match cmd {
            AdaptersCommand::Download { id, output } => {
                let meta = download_adapter(&http, &id, &output).await?;
                print(&meta);
            }
            AdaptersCommand::Get { id } => print(&http.get(&format!("/v1/adapters/{id}")).await?),
            AdaptersCommand::List => print(&http.get("/v1/adapters").await?),
        }
        Ok(())
    })
}

/// Downloads every file of an adapter into `dir`; returns the adapter's metadata.
pub async fn download_adapter(http: &Http, id: &str, dir: &Path) -> Result<Value> {
    let meta = http.get(&format!("/v1/adapters/{id}")).await?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = meta["files"].as_array().cloned().unwrap_or_default();
    if files.is_empty() {
        bail!("adapter {id} has no files");
    }
    for f in files {
        let name = f["name"].as_str().context("file without a name")?;
        if name.contains('/') || name.starts_with('.') {
            bail!("refusing odd file name {name:?}");
        }
        let url = f["url"].as_str().context("file without a url")?;
        let mut res = http.request(Method::GET, url).send().await?;
        if !res.status().is_success() {
            return decode(res).await.map(|_| Value::Null);
        }
        let dest = dir.join(name);
        let mut out = tokio::fs::File::create(&dest)
            .await
            .with_context(|| format!("creating {}", dest.display()))?;
        while let Some(chunk) = res.chunk().await? {
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
        }
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        eprintln!("wrote {}", dest.display());
    }
    Ok(meta)
}
