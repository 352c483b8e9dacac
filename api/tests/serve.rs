//! `molt serve` as a launcher: the first start creates the default tenant and prints its key
//! once (also in DATA_DIR/first-key, mode 0600); local workers are child processes, a dead
//! one is restarted; one SIGTERM stops the server and every worker; a restart on the same data
//! directory prints no key. Also: cancelling a running job, `/metrics`, and `molt jobs watch`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ServeOptions, Server, molt_exe, text_dataset, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Direct children of a process (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) has exited.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stdout_of(s: &Server) -> String {
    let port = s.url.rsplit(':').next().expect("port");
    std::fs::read_to_string(s.data_dir.join(format!("serve-{port}.out"))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launcher_first_key_restarts_workers_and_stops_on_one_signal() {
    let mut s = Server::start(ServeOptions {
        workers: 2,
        ..ServeOptions::default()
    })
    .await;
    let key_file = s.data_dir.join("first-key");
    let mode = std::fs::metadata(&key_file)
        .expect("first-key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "first-key mode {mode:o}");
    let out = stdout_of(&s);
    assert_eq!(
        out.matches(&s.key).count(),
        1,
        "the key is printed once: {out}"
    );

    let pid = s.child.as_ref().expect("child").id();
    wait_for("two workers", Duration::from_secs(20), || {
        children(pid).len() == 2
    });
    let before = children(pid);
    let victim = before[0];
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for(
        "the dead worker to be replaced",
        Duration::from_secs(30),
        || {
            let now = children(pid);
            now.len() == 2 && !now.contains(&victim)
        },
    );
    assert!(
        s.log_text().contains("exited; restarting"),
        "{}",
        s.log_text()
    );

    // The replacement works: a job runs to success.
    s.register_model("tiny", &tiny_model_dir()).await;
    let (_, file) = s.upload("d.jsonl", text_dataset(4)).await;
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": file["id"], "hyperparameters": {"n_epochs": 1}
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let job_id = job["id"].as_str().expect("id").to_string();
    let job = s.wait_job(&job_id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // `molt jobs watch` on a finished job exits 0 and names the model.
    let out = Command::new(molt_exe())
        .args(["jobs", "watch", &job_id])
        .env("MOLT_URL", &s.url)
        .env("MOLT_API_KEY", &s.key)
        .output()
        .expect("molt jobs watch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));

    // Prometheus metrics.
    let text = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "molt_queue_depth 0",
        "molt_jobs{status=\"succeeded\"} 1",
        "molt_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/fine_tuning/jobs\",status=\"200\",le=",
        "molt_http_requests_total{method=\"GET\",route=\"/v1/fine_tuning/jobs/{fine_tuning_job_id}\",status=\"200\"}",
        "molt_training_tokens_per_second",
        "molt_upload_bytes_total",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle:?}:\n{text}");
    }

    // `molt admin` talks to the admin API.
    let out = Command::new(molt_exe())
        .args(["admin", "create-tenant", "acme"])
        .env("MOLT_URL", &s.url)
        .env("MOLT_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .output()
        .expect("molt admin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tenant json");
    assert_eq!(tenant["name"], "acme");
    let out = Command::new(molt_exe())
        .args(["admin", "create-key"])
        .arg(tenant["id"].as_str().expect("id"))
        .env("MOLT_URL", &s.url)
        .env("MOLT_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .output()
        .expect("molt admin create-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).expect("key json");
    let secret = key["secret"].as_str().expect("secret");
    let (status, _) = s.call(s.req_as(secret, Method::GET, "/v1/files")).await;
    assert_eq!(status, StatusCode::OK);

    // One SIGTERM stops everything.
    let workers = children(pid);
    assert_eq!(workers.len(), 2);
    s.stop();
    for w in workers {
        wait_for("a worker to exit", Duration::from_secs(10), || !alive(w));
    }

    // A restart on the same data directory keeps the key and prints none.
    let data_dir = s.data_dir.clone();
    let restarted = Server::start(ServeOptions {
        data_dir: Some(data_dir.clone()),
        ..ServeOptions::default()
    })
    .await;
    assert_eq!(restarted.key, s.key);
    assert!(
        !stdout_of(&restarted).contains("sk-molt-"),
        "{}",
        stdout_of(&restarted)
    );
    let jobs = restarted.get_ok("/v1/fine_tuning/jobs").await;
    assert_eq!(jobs["data"][0]["id"], job_id.as_str());
    drop(restarted);
    assert!(Path::new(&key_file).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_its_worker() {
    let s = Server::start(ServeOptions {
        workers: 1,
        ..ServeOptions::default()
    })
    .await;
    s.register_model("tiny", &tiny_model_dir()).await;
    let (_, file) = s.upload("d.jsonl", text_dataset(16)).await;
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": file["id"],
            "hyperparameters": {"n_epochs": 100, "batch_size": 1}
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = s.get_ok(&format!("/v1/fine_tuning/jobs/{id}")).await;
        if j["status"] == "running" && j["progress"]["step"].as_i64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never running: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, j) = s
        .call(s.req(Method::POST, &format!("/v1/fine_tuning/jobs/{id}/cancel")))
        .await;
    assert_eq!(status, StatusCode::OK, "{j}");
    assert!(
        matches!(j["status"].as_str(), Some("cancelling" | "cancelled")),
        "{j}"
    );
    let j = s.wait_job(&id, Duration::from_secs(60)).await;
    assert_eq!(j["status"], "cancelled", "{j}");
    assert!(j["progress"]["step"].as_i64() < j["progress"]["total_steps"].as_i64());
    let events = s.events(&id).await;
    assert!(
        events.iter().any(|e| e["message"] == "Job cancelled"),
        "{events:?}"
    );
}

#[test]
fn migrate_applies_migrations_and_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..2 {
        let out = Command::new(molt_exe())
            .args(["migrate", "--data-dir"])
            .arg(dir.path())
            .env_remove("MOLT_DATABASE_URL")
            .output()
            .expect("molt migrate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(dir.path().join("molt.db").is_file());
}

/// The README's first command as a new user meets it: `molt serve` started in an empty
/// directory, with no flags for data or models, serves the built-in demo model — listed,
/// fine-tuned by a job and completing with the result — and the built-in image classifier,
/// classifying digits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_from_a_fresh_directory_lists_trains_and_completes_on_demo() {
    let s = Server::start(ServeOptions {
        workers: 1,
        defaults: true,
        ..ServeOptions::default()
    })
    .await;
    assert!(
        s.data_dir.ends_with("molt-data"),
        "{}",
        s.data_dir.display()
    );
    let models = s.get_ok("/v1/models").await;
    let demo = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|m| m["id"] == "demo")
        .unwrap_or_else(|| panic!("demo not listed: {models}\n{}", s.log_text()))
        .clone();
    assert_eq!(demo["object"], "model", "{demo}");

    let (status, file) = s.upload("d.jsonl", text_dataset(8)).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "demo", "training_file": file["id"],
            "method": {"type": "lora", "targets": "in_proj", "r": 4},
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let job = s
        .wait_job(job["id"].as_str().expect("id"), Duration::from_secs(180))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let tuned = job["fine_tuned_model"].as_str().expect("fine_tuned_model");

    let (status, done) = s
        .call(s.req(Method::POST, "/v1/completions").json(&json!({
            "model": tuned, "prompt": "The mamba", "max_tokens": 5, "temperature": 0
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["model"], tuned, "{done}");
    let n = done["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=5).contains(&n), "{done}");
    assert!(
        !done["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{done}"
    );

    // The built-in image classifier: listed, and right on its own validation digits.
    assert!(
        models["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|m| m["id"] == "digits"),
        "digits not listed: {models}"
    );
    let zip_path = common::repo_root().join("corpus/digits/digits-0to4.zip");
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(&zip_path).expect("digits zip")).expect("zip");
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).expect("entry");
        let name = f.name().expect("entry name").to_string();
        if let Some(rest) = name.strip_prefix("val/")
            && images.len() < 20
            && i % 9 == 0
        {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes).expect("read");
            use base64::Engine;
            images.push(base64::engine::general_purpose::STANDARD.encode(bytes));
            labels.push(rest.split('/').next().expect("class").to_string());
        }
    }
    assert!(images.len() >= 10, "{} validation images", images.len());
    let (status, v) = s
        .call(s.req(Method::POST, "/v1/classifications").json(&json!({
            "model": "digits", "images": images, "top_k": 1
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let right = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .zip(&labels)
        .filter(|(d, l)| d["predictions"][0]["label"] == l.as_str())
        .count();
    assert!(
        right * 10 >= labels.len() * 9,
        "{right}/{}: {v}",
        labels.len()
    );
}
