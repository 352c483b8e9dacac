//! Queue behaviour with real worker processes: two `molt worker`s drain twenty jobs, each job
//! runs exactly once to success and none is claimed twice; and a worker killed with SIGKILL
//! mid-job loses its lease, another worker reclaims the job, resumes from its last checkpoint
//! and finishes it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{ServeOptions, Server, Worker, text_dataset, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The method the queue tests train (small and cheap).
fn method() -> Value {
    json!({"type": "lora", "targets": "in_proj", "r": 2})
}

async fn create_job(s: &Server, file_id: &str, hyperparameters: Value) -> String {
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny",
            "training_file": file_id,
            "method": method(),
            "hyperparameters": hyperparameters,
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job["id"].as_str().expect("id").to_string()
}

/// Workers that started (claimed) a job, from its events.
fn claims(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            let m = e["message"].as_str().unwrap_or("");
            m.starts_with("Fine-tuning job started on worker") || m.contains("job reclaimed by")
        })
        .filter_map(|e| e["data"]["worker"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_twenty_jobs_exactly_once() {
    let s = Server::start(ServeOptions::default()).await;
    s.register_model("tiny", &tiny_model_dir()).await;
    let (status, file) = s.upload("small.jsonl", text_dataset(4)).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let file_id = file["id"].as_str().expect("id").to_string();
    let _a = Worker::start(&s, "worker-a", 30);
    let _b = Worker::start(&s, "worker-b", 30);

    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(create_job(&s, &file_id, json!({"n_epochs": 1, "batch_size": 4})).await);
    }
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let job = s.wait_job(id, Duration::from_secs(300)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(
            job["progress"]["attempts"], 1,
            "claimed more than once: {job}"
        );
        let events = s.events(id).await;
        let c = claims(&events);
        assert_eq!(c.len(), 1, "job {id} was claimed {} times: {c:?}", c.len());
        *per_worker.entry(c[0].clone()).or_default() += 1;
        let completions = events
            .iter()
            .filter(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("successfully completed"))
            })
            .count();
        assert_eq!(completions, 1, "job {id} completed {completions} times");
    }
    eprintln!("jobs per worker: {per_worker:?}");
    assert_eq!(per_worker.values().sum::<usize>(), 20);
    assert!(
        per_worker.len() == 2,
        "both workers should have taken jobs: {per_worker:?}"
    );
    // Twenty distinct adapters.
    let adapters = s.get_ok("/v1/adapters?limit=100").await;
    assert_eq!(adapters["data"].as_array().map(Vec::len), Some(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_is_reclaimed_and_resumes_from_checkpoint() {
    let s = Server::start(ServeOptions::default()).await;
    s.register_model("tiny", &tiny_model_dir()).await;
    let (status, file) = s.upload("data.jsonl", text_dataset(16)).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let file_id = file["id"].as_str().expect("id").to_string();

    // A lease of 2 s so that the test does not wait long for it to expire.
    let mut first = Worker::start(&s, "worker-first", 2);
    let job_id = create_job(
        &s,
        &file_id,
        json!({"n_epochs": 30, "batch_size": 1, "checkpoint_every": 5}),
    )
    .await;

    // Wait until the job has a checkpoint and is still running.
    let deadline = Instant::now() + Duration::from_secs(120);
    let checkpoint_step = loop {
        let ck = s
            .get_ok(&format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"))
            .await;
        let job = s.get_ok(&format!("/v1/fine_tuning/jobs/{job_id}")).await;
        assert!(
            matches!(job["status"].as_str(), Some("queued" | "running")),
            "the job ended before the kill: {job}"
        );
        if let Some(step) = ck["data"][0]["step_number"].as_i64() {
            break step;
        }
        assert!(Instant::now() < deadline, "no checkpoint in time: {job}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    first.kill9();
    let killed_at = s.get_ok(&format!("/v1/fine_tuning/jobs/{job_id}")).await;
    assert_eq!(killed_at["status"], "running");

    // A second worker reclaims it once the lease has expired.
    let _second = Worker::start(&s, "worker-second", 2);
    let job = s.wait_job(&job_id, Duration::from_secs(300)).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", s.log_text());
    assert_eq!(job["progress"]["attempts"], 2, "{job}");
    assert_eq!(job["progress"]["step"], job["progress"]["total_steps"]);

    let events = s.events(&job_id).await;
    let messages: Vec<String> = events
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        claims(&events),
        vec!["worker-first", "worker-second"],
        "{messages:#?}"
    );
    assert!(
        messages.iter().any(|m| m
            .contains("'worker-first' lost its lease; job reclaimed by worker 'worker-second'")),
        "{messages:#?}"
    );
    let resumed: Vec<i64> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Resuming from checkpoint"))
        })
        .filter_map(|e| e["data"]["step"].as_i64())
        .collect();
    assert_eq!(resumed.len(), 1, "{messages:#?}");
    assert!(
        resumed[0] >= checkpoint_step,
        "resumed at {} < {checkpoint_step}",
        resumed[0]
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with(&format!("Training resumed at step {}", resumed[0]))),
        "the trainer did not resume from the checkpoint: {messages:#?}"
    );
}
