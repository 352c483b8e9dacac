//! The official `openai` Python client (from PyPI) drives molt unchanged: `files.create` →
//! `fine_tuning.jobs.create` → `retrieve` until done → `list_events` (see
//! tests/python/openai_flow.py). The client is installed once into a virtualenv under
//! `${MOLT_CACHE_DIR:-~/.cache/molt}/openai-venv`; the test is skipped, with the reason
//! printed, only when pip cannot reach PyPI.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{ServeOptions, Server, repo_root, tiny_model_dir};

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOLT_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("molt")
}

/// The venv's python with `openai` installed, or why not.
fn openai_python() -> Result<PathBuf, String> {
    let venv = cache_dir().join("openai-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if ready.is_file() {
        return Ok(python);
    }
    std::fs::create_dir_all(cache_dir()).map_err(|e| format!("cache dir: {e}"))?;
    // One installer at a time (flock), as scripts/test-services.sh does for moto.
    let script = format!(
        "set -e; exec 9>'{lock}'; flock 9; \
         if [ ! -f '{ready}' ]; then rm -rf '{venv}'; python3 -m venv '{venv}'; \
         '{venv}/bin/pip' install --quiet --disable-pip-version-check 'openai>=1.40,<3'; \
         touch '{ready}'; fi",
        lock = cache_dir().join("openai-venv.lock").display(),
        ready = ready.display(),
        venv = venv.display(),
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip could not install openai: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(python)
}

/// Runs `api/tests/python/{script}` with the venv's python against `s` (its URL and key in
/// `MOLT_URL`/`MOLT_API_KEY`, plus `env`) and fails, with both outputs and the server's log,
/// unless it succeeds.
async fn run_client(python: PathBuf, script: &str, s: &Server, env: Vec<(&'static str, String)>) {
    let script_path = repo_root().join("api/tests/python").join(script);
    let out = tokio::task::spawn_blocking({
        let url = s.url.clone();
        let key = s.key.clone();
        move || {
            Command::new(python)
                .arg(script_path)
                .env("MOLT_URL", url)
                .env("MOLT_API_KEY", key)
                .envs(env)
                .env_remove("OPENAI_API_KEY")
                .env_remove("OPENAI_BASE_URL")
                .output()
                .expect("run python")
        }
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{script} failed:\nstdout: {}\nstderr: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_drives_files_and_jobs() {
    let python = match openai_python() {
        Ok(p) => p,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let s = Server::start(ServeOptions {
        workers: 1,
        ..ServeOptions::default()
    })
    .await;
    s.register_model("tiny", &tiny_model_dir()).await;
    let dataset = s.data_dir.join("openai.jsonl");
    let mut lines = String::new();
    for i in 0..8 {
        lines.push_str(&format!(
            "{{\"prompt\": \"Question {i}: what does the mamba do?\", \"completion\": \" It sings.\"}}\n"
        ));
    }
    std::fs::write(&dataset, lines).expect("dataset");
    run_client(
        python,
        "openai_flow.py",
        &s,
        vec![
            ("MOLT_DATASET", dataset.display().to_string()),
            ("MOLT_MODEL", "tiny".into()),
            // OpenAI's own method form: supervised, which molt trains as its default LoRA.
            (
                "MOLT_METHOD",
                r#"{"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}"#
                    .into(),
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_streams_a_completion() {
    let python = match openai_python() {
        Ok(p) => p,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let s = Server::start(ServeOptions::default()).await;
    s.register_model("demo", &repo_root().join("models/demo"))
        .await;
    run_client(
        python,
        "openai_completions.py",
        &s,
        vec![("MOLT_MODEL", "demo".into())],
    )
    .await;
}
