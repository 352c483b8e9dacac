//! Chat datasets (OpenAI's `{"messages": [...]}` format) through the service: a bad file
//! is stored with `status: "error"` and its problems by line and message index, a job on it
//! is refused, and a job on a good chat file trains (the loss falls) and succeeds.

mod common;

use std::time::Duration;

use common::{ServeOptions, Server, assert_error, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn conversation(i: usize) -> Value {
    json!({"messages": [
        {"role": "system", "content": "You answer about snakes."},
        {"role": "user", "content": format!("Where does mamba number {i} live?")},
        {"role": "assistant", "content": "In the warm grass by the river."},
    ]})
}

fn chat_dataset(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&conversation(i).to_string());
        s.push('\n');
    }
    s.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_files_are_validated_and_trained() {
    let s = Server::start(ServeOptions {
        workers: 1,
        ..ServeOptions::default()
    })
    .await;
    s.register_model("tiny", &tiny_model_dir()).await;

    // A bad file: line 2 has an unknown role, line 3 no reply to train on.
    let mut bad = String::new();
    bad.push_str(&conversation(0).to_string());
    bad.push('\n');
    bad.push_str(
        &json!({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})
            .to_string(),
    );
    bad.push('\n');
    bad.push_str(&json!({"messages": [{"role": "user", "content": "hi"}]}).to_string());
    bad.push('\n');
    let (status, file) = s.upload("bad-chat.jsonl", bad.into_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!(file["status"], "error", "{file}");
    let details = file["status_details"].as_str().expect("status_details");
    assert!(
        details.starts_with(
            "2 invalid lines: line 2: messages[1].role must be \"system\", \"user\" or \
             \"assistant\", found \"bot\"; line 3: no assistant message to train on"
        ),
        "{details}"
    );
    let bad_id = file["id"].as_str().expect("id");
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": bad_id,
        })))
        .await;
    let msg = assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_training_file",
    );
    assert!(msg.contains("line 2"), "{msg}");

    // A good one trains.
    let (status, file) = s.upload("chat.jsonl", chat_dataset(12)).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!(file["status"], "processed", "{file}");
    let (status, valid) = s.upload("chat-valid.jsonl", chat_dataset(4)).await;
    assert_eq!(status, StatusCode::OK, "{valid}");
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny",
            "training_file": file["id"],
            "validation_file": valid["id"],
            "method": {"type": "lora", "targets": ["in_proj", "out_proj"], "r": 4},
            "hyperparameters": {"n_epochs": 4, "batch_size": 4, "learning_rate": 0.005},
            "seed": 3,
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let job = s.wait_job(&id, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", s.log_text());
    assert!(job["trained_tokens"].as_i64().unwrap_or(0) > 0, "{job}");

    let metrics = s
        .get_ok(&format!("/v1/fine_tuning/jobs/{id}/metrics"))
        .await;
    let losses: Vec<f64> = metrics["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["train_loss"].as_f64())
        .collect();
    assert!(losses.len() >= 2, "{metrics}");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(
        last.is_finite() && last < first,
        "training on the chat file did not lower the loss: {losses:?}"
    );
}
