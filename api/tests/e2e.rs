//! End to end with real processes: `molt serve` with a local worker child process, talking
//! HTTP. Upload → job → `succeeded` → the adapter is downloaded with `molt adapters download`
//! → it loads and changes the model's output (lower loss on the training text, different
//! logits). Once on SQLite + local files, once on PostgreSQL + S3 (when
//! MOLT_TEST_DATABASE_URL / MOLT_TEST_S3_ENDPOINT are set; skipped with a message otherwise).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::{Backend, ServeOptions, Server, molt_exe, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use trainer::model::{LoadOptions, MambaForCausalLM, causal_lm_loss};
use trainer::tokenizer::Tokenizer;

/// The PEFT method the end-to-end tests train.
pub fn method() -> Value {
    json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": 4})
}

const PROMPT: &str = "The mamba slides over the warm stone";

fn dataset() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..12 {
        s.push_str(&format!(
            "{{\"prompt\": \"{PROMPT}\", \"completion\": \" and sings song number {i}.\"}}\n"
        ));
    }
    s.into_bytes()
}

/// Mean next-token loss and logits of `text` under `model`.
fn loss_and_logits(model: &MambaForCausalLM, tok: &Tokenizer, text: &str) -> (f32, Tensor) {
    let ids = tok.encode(text).expect("encode");
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let input = input.to_dtype(candle_core::DType::I64).expect("i64");
    let logits = model.forward(&input, None).expect("forward");
    let loss = causal_lm_loss(&logits, &input)
        .expect("loss")
        .to_scalar::<f32>()
        .expect("scalar loss");
    (loss, logits)
}

/// Loads what a job produced: a PEFT adapter applied to the base model, or (for `full`) a
/// whole model folder.
fn load_trained(dir: &Path, base: &MambaForCausalLM) -> MambaForCausalLM {
    if dir.join("adapter_config.json").is_file() {
        let adapter = trainer::peft::Adapter::load(dir, base).expect("load the adapter");
        return adapter.apply(base).expect("apply the adapter");
    }
    MambaForCausalLM::load(dir, &LoadOptions::default()).expect("load the trained model")
}

async fn end_to_end(backend: Backend) {
    let label = backend.label;
    let s = Server::start(ServeOptions {
        backend,
        workers: 1,
        lease_seconds: 10,
        ..ServeOptions::default()
    })
    .await;
    match s.options.backend.store.clone() {
        // On S3 the base model is registered from an object-store URL (left in place).
        Some(store) => {
            let url = format!("{store}-model");
            let blobs = storage::BlobStore::from_url(&url).expect("model store");
            blobs
                .upload_dir(&tiny_model_dir(), "")
                .await
                .expect("upload the model to S3");
            let (status, m) = s
                .call(
                    s.admin(Method::POST, "/admin/models")
                        .json(&json!({"id": "tiny", "source": url})),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "register from {url}: {m}");
            assert_eq!(m["location"], url.as_str());
        }
        None => {
            let m = s.register_model("tiny", &tiny_model_dir()).await;
            assert!(
                m["location"]
                    .as_str()
                    .is_some_and(|l| l.starts_with("store:")),
                "{m}"
            );
        }
    }

    // The model list shows the base model.
    let models = s.get_ok("/v1/models").await;
    assert!(
        models["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|m| m["id"] == "tiny" && m["object"] == "model"),
        "{models}"
    );

    // Upload with the CLI (streamed, with an idempotency key).
    let data_file = s.data_dir.join("train.jsonl");
    std::fs::write(&data_file, dataset()).expect("write dataset");
    let out = Command::new(molt_exe())
        .args(["files", "upload"])
        .arg(&data_file)
        .args(["--idempotency-key", "upload-1"])
        .env("MOLT_URL", &s.url)
        .env("MOLT_API_KEY", &s.key)
        .output()
        .expect("molt files upload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file: Value = serde_json::from_slice(&out.stdout).expect("file json");
    assert_eq!(file["status"], "processed", "{file}");
    assert_eq!(file["line_count"], 12, "{file}");
    let file_id = file["id"].as_str().expect("id").to_string();
    // A retried upload with the same idempotency key returns the same file.
    let again = Command::new(molt_exe())
        .args(["files", "upload"])
        .arg(&data_file)
        .args(["--idempotency-key", "upload-1"])
        .env("MOLT_URL", &s.url)
        .env("MOLT_API_KEY", &s.key)
        .output()
        .expect("molt files upload (retry)");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let again: Value = serde_json::from_slice(&again.stdout).expect("file json");
    assert_eq!(again["id"], file_id.as_str());
    assert_eq!(
        s.get_ok("/v1/files").await["data"].as_array().map(Vec::len),
        Some(1)
    );
    // The content round-trips.
    let content = s
        .req(Method::GET, &format!("/v1/files/{file_id}/content"))
        .send()
        .await
        .expect("content")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(content.as_ref(), dataset().as_slice());

    // Create the job.
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny",
            "training_file": file_id,
            "method": method(),
            "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate": 0.005},
            "seed": 7,
            "suffix": "e2e",
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["seed"], 7);
    assert_eq!(job["hyperparameters"]["n_epochs"], 3);
    assert!(
        job["trainable_parameters"].as_i64().unwrap_or(0) > 0,
        "no trainable-parameter count: {job}"
    );
    assert_eq!(job["method"]["type"], "lora");
    let job_id = job["id"].as_str().expect("id").to_string();

    let job = s.wait_job(&job_id, Duration::from_secs(240)).await;
    assert_eq!(
        job["status"],
        "succeeded",
        "{label}: {job}\n{}",
        s.log_text()
    );
    assert!(job["error"].is_null());
    let ft_model = job["fine_tuned_model"].as_str().expect("fine_tuned_model");
    assert!(ft_model.starts_with("ft:tiny:e2e:"), "{ft_model}");
    assert_eq!(
        job["progress"]["step"], job["progress"]["total_steps"],
        "{job}"
    );
    assert!(job["trained_tokens"].as_i64().unwrap_or(0) > 0, "{job}");
    assert!(job["metrics"]["train_loss"].as_f64().is_some(), "{job}");
    assert!(job["finished_at"].as_i64().is_some());
    let adapter_id = job["adapter_id"].as_str().expect("adapter_id").to_string();

    // Events tell the story, oldest first; the SSE stream replays them and ends.
    let events = s.events(&job_id).await;
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Fine-tuning job started")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("Training started")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("successfully completed")),
        "{messages:?}"
    );
    let sse = s
        .req(
            Method::GET,
            &format!("/v1/fine_tuning/jobs/{job_id}/events?stream=true"),
        )
        .send()
        .await
        .expect("sse")
        .text()
        .await
        .expect("sse text");
    assert!(sse.contains("fine_tuning.job.event"), "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");

    // Metrics and checkpoints were recorded.
    let metrics = s
        .get_ok(&format!("/v1/fine_tuning/jobs/{job_id}/metrics"))
        .await;
    assert!(
        !metrics["data"].as_array().expect("data").is_empty(),
        "{metrics}"
    );
    let checkpoints = s
        .get_ok(&format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"))
        .await;
    let first = &checkpoints["data"][0];
    assert_eq!(
        first["object"], "fine_tuning.job.checkpoint",
        "{checkpoints}"
    );

    // The fine-tuned model is listed, and its adapter is downloadable by name.
    let model = s.get_ok(&format!("/v1/models/{ft_model}")).await;
    assert_eq!(model["adapter_id"], adapter_id.as_str());
    let dest = s.data_dir.join("downloaded");
    s.download_adapter(ft_model, &dest);

    // It loads, and it changes the model: lower loss on the training text, other logits.
    let base_dir = tiny_model_dir();
    let tok = Tokenizer::from_model_dir(&base_dir)
        .expect("tokenizer")
        .expect("tokenizer.json");
    let base = MambaForCausalLM::load(&base_dir, &LoadOptions::default()).expect("base");
    assert!(dest.join("adapter_model.safetensors").is_file());
    assert!(dest.join("adapter_config.json").is_file());
    let trained = load_trained(&dest, &base);
    let text = format!("{PROMPT} and sings song number 3.");
    let (base_loss, base_logits) = loss_and_logits(&base, &tok, &text);
    let (trained_loss, trained_logits) = loss_and_logits(&trained, &tok, &text);
    let diff = (base_logits - trained_logits)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert!(
        diff > 1e-3,
        "{label}: the adapter does not change the logits (max diff {diff})"
    );
    assert!(
        trained_loss < base_loss,
        "{label}: training did not lower the loss on its data: {base_loss} -> {trained_loss}"
    );

    // Clean-up through the API: deleting the fine-tuned model removes the adapter.
    let (status, deleted) = s
        .call(s.req(Method::DELETE, &format!("/v1/models/{ft_model}")))
        .await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    let (status, _) = s
        .call(s.req(Method::GET, &format!("/v1/adapters/{adapter_id}")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_sqlite_and_local_files() {
    end_to_end(Backend::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_postgres_and_s3() {
    match Backend::postgres_s3() {
        Some(b) => end_to_end(b).await,
        None => eprintln!(
            "skipped: set MOLT_TEST_DATABASE_URL and MOLT_TEST_S3_ENDPOINT (scripts/test-services.sh does)"
        ),
    }
}
