//! The hybrid PEFT search as a service, with real processes: a 2 × 8-trial search on the
//! demo model over three `molt worker`s runs trials concurrently, survives a worker killed
//! with SIGKILL mid-trial and a restart of the API, accounts for every trial, reports a best
//! configuration no worse than any trial, trains it into an adapter that then serves
//! completions, and is invisible to another tenant. Bad requests get 400s naming the field.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{ServeOptions, Server, Worker, assert_error, repo_root, text_dataset};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SEARCHES: &str = "/v1/fine_tuning/searches";

async fn setup(s: &Server) -> (String, String) {
    s.register_model("demo", &repo_root().join("models/demo"))
        .await;
    let (st, train) = s.upload("train.jsonl", text_dataset(8)).await;
    assert_eq!(st, StatusCode::OK, "{train}");
    let (st, valid) = s.upload("valid.jsonl", text_dataset(4)).await;
    assert_eq!(st, StatusCode::OK, "{valid}");
    (
        train["id"].as_str().expect("id").into(),
        valid["id"].as_str().expect("id").into(),
    )
}

fn request(train: &str, valid: &str) -> Value {
    json!({
        "model": "demo",
        "training_file": train,
        "validation_file": valid,
        "methods": ["lora_in_proj", "lora_out_proj", "A", "D", "prompt"],
        "trials": {"step1": 8, "step2": 8},
        "max_parallel": 3,
        "hyperparameters": {"n_epochs": 1, "batch_size": 2, "max_seq_length": 24,
                            "checkpoint_every": 1},
        "seed": 11,
        "train_best": true,
    })
}

/// Polls the search until `done(search)`; returns it.
async fn wait_search(
    s: &Server,
    id: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (st, v) = s
            .call(s.req(Method::GET, &format!("{SEARCHES}/{id}")))
            .await;
        if st == StatusCode::OK && done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "search {id} not there in time: {v}\n{}",
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `(worker, claimed at, finished at)` of a job, from its events and times.
async fn run_span(s: &Server, job: &Value) -> Vec<(String, i64)> {
    let id = job["id"].as_str().expect("id");
    s.events(id)
        .await
        .iter()
        .filter(|e| {
            let m = e["message"].as_str().unwrap_or("");
            m.starts_with("Fine-tuning job started on worker") || m.contains("job reclaimed by")
        })
        .filter_map(|e| {
            Some((
                e["data"]["worker"].as_str()?.to_string(),
                e["created_at"].as_i64()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_runs_over_three_workers_through_a_crash_and_a_restart() {
    let mut s = Server::start(ServeOptions::default()).await;
    let (train, valid) = setup(&s).await;
    let mut workers = [
        Worker::start(&s, "w1", 3),
        Worker::start(&s, "w2", 3),
        Worker::start(&s, "w3", 3),
    ];
    let (st, search) = s
        .call(
            s.req(Method::POST, SEARCHES)
                .header("Idempotency-Key", "search-1")
                .json(&request(&train, &valid)),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{search}");
    let id = search["id"].as_str().expect("id").to_string();
    assert_eq!(search["object"], "fine_tuning.search");
    assert_eq!(search["step"], 1);
    assert_eq!(
        search["trial_counts"]["total"], 3,
        "max_parallel trials queued: {search}"
    );
    // The same key: the same search.
    let (_, again) = s
        .call(
            s.req(Method::POST, SEARCHES)
                .header("Idempotency-Key", "search-1")
                .json(&request(&train, &valid)),
        )
        .await;
    assert_eq!(again["id"], search["id"]);

    // Another tenant sees none of it.
    let (_, other) = s.new_tenant("other").await;
    let (st, body) = s
        .call(s.req_as(&other, Method::GET, &format!("{SEARCHES}/{id}")))
        .await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    let (_, list) = s.call(s.req_as(&other, Method::GET, SEARCHES)).await;
    assert_eq!(list["data"], json!([]), "{list}");
    let (_, jobs) = s
        .call(s.req_as(&other, Method::GET, "/v1/fine_tuning/jobs"))
        .await;
    assert_eq!(jobs["data"], json!([]), "{jobs}");
    let (st, body) = s
        .call(s.req_as(&other, Method::GET, &format!("{SEARCHES}/{id}/trials")))
        .await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");

    // Kill -9 a worker while it trains a trial.
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let jobs = s.get_ok("/v1/fine_tuning/jobs?limit=100").await;
        let mut found = None;
        for j in jobs["data"].as_array().cloned().unwrap_or_default() {
            if j["status"] == "running"
                && j["progress"]["step"].as_i64() >= Some(1)
                && let Some((w, _)) = run_span(&s, &j).await.last().cloned()
            {
                found = Some((w, j["id"].as_str().unwrap_or("").to_string()));
                break;
            }
        }
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no trial started:\n{}",
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (victim_worker, victim_job) = victim;
    let w = workers
        .iter_mut()
        .find(|w| w.id == victim_worker)
        .expect("the worker");
    w.kill9();

    // Restart the API mid-search (workers keep going; they advance the search themselves).
    wait_search(&s, &id, Duration::from_secs(300), |v| {
        v["trial_counts"]["finished"].as_u64() >= Some(4)
    })
    .await;
    let data_dir = s.data_dir.clone();
    s.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s2 = Server::start(ServeOptions {
        data_dir: Some(data_dir),
        ..ServeOptions::default()
    })
    .await;
    let done = wait_search(&s2, &id, Duration::from_secs(900), |v| {
        v["status"] != "queued" && v["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s2.log_text());
    assert_eq!(done["step"], 2);
    let counts = &done["trial_counts"];
    assert_eq!(counts["total"], 16, "{done}");
    assert_eq!(counts["finished"], 16, "{done}");
    assert_eq!(counts["running"], 0);

    // Every trial accounted for: finished, with a job unless skipped, a value when complete.
    let trials = s2.get_ok(&format!("{SEARCHES}/{id}/trials")).await;
    let trials = trials["data"].as_array().cloned().expect("trials");
    assert_eq!(trials.len(), 16);
    let mut best_value = f64::INFINITY;
    for (i, t) in trials.iter().enumerate() {
        assert_eq!(t["number"], i as i64);
        assert_eq!(t["step"], if i < 8 { 1 } else { 2 }, "{t}");
        let status = t["status"].as_str().expect("status");
        assert!(["complete", "failed", "skipped"].contains(&status), "{t}");
        if status != "skipped" {
            assert!(t["job_id"].is_string(), "{t}");
        }
        if status == "complete" {
            let v = t["value"].as_f64().expect("value");
            assert!(v.is_finite());
            assert_eq!(
                t["intermediate_values"].as_array().map(Vec::len),
                Some(1),
                "{t}"
            );
            best_value = best_value.min(v);
        }
    }
    let best = &done["best"];
    assert!(
        (best["value"].as_f64().expect("best") - best_value).abs() < 1e-12,
        "{best}"
    );
    // Algorithm 1: step 2 starts from step 1's best combination with its defaults.
    let best1 = trials[..8]
        .iter()
        .filter(|t| t["status"] == "complete")
        .min_by(|a, b| {
            a["value"]
                .as_f64()
                .unwrap_or(f64::MAX)
                .total_cmp(&b["value"].as_f64().unwrap_or(f64::MAX))
        })
        .expect("a complete step-1 trial");
    assert_eq!(
        trials[8]["configuration"]["methods"],
        best1["configuration"]["methods"]
    );
    assert_eq!(trials[8]["configuration"]["remove"], "none");

    // The killed worker's trial was reclaimed, resumed and finished.
    let job = s2
        .get_ok(&format!("/v1/fine_tuning/jobs/{victim_job}"))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["attempts"], 2, "{job}");
    assert_eq!(job["search"]["id"], json!(id));

    // Trials ran concurrently on different workers: two trial jobs overlapped in time.
    let mut spans: Vec<(String, i64, i64)> = Vec::new();
    let mut seen_workers = BTreeSet::new();
    for t in &trials {
        let Some(jid) = t["job_id"].as_str() else {
            continue;
        };
        let j = s2.get_ok(&format!("/v1/fine_tuning/jobs/{jid}")).await;
        let claims = run_span(&s2, &j).await;
        let (w, start) = claims.first().cloned().expect("claimed");
        seen_workers.insert(w.clone());
        spans.push((w, start, j["finished_at"].as_i64().expect("finished")));
    }
    assert!(seen_workers.len() >= 2, "{seen_workers:?}");
    let overlap = spans.iter().enumerate().any(|(i, a)| {
        spans[i + 1..]
            .iter()
            .any(|b| a.0 != b.0 && a.1 < b.2 && b.1 < a.2)
    });
    assert!(overlap, "no two trials ran at once: {spans:?}");

    // The best configuration trained into an adapter, which serves.
    let result = done["result_job_id"]
        .as_str()
        .expect("result job")
        .to_string();
    let job = s2.wait_job(&result, Duration::from_secs(300)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        job.get("search").is_none(),
        "the result is a normal job: {job}"
    );
    assert_eq!(job["method"], best["method"]);
    let model = job["fine_tuned_model"].as_str().expect("model").to_string();
    let (st, c) = s2
        .call(s2.req(Method::POST, "/v1/completions").json(&json!({
            "model": model, "prompt": "The mamba", "max_tokens": 4, "temperature": 0
        })))
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert!(c["choices"][0]["text"].is_string(), "{c}");
    // Asking again returns the same job.
    let (st, again) = s2
        .call(s2.req(Method::POST, &format!("{SEARCHES}/{id}/train")))
        .await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["id"], json!(result));

    // The events tell the story.
    let events = s2
        .get_ok(&format!("{SEARCHES}/{id}/events?limit=1000"))
        .await;
    let messages: Vec<String> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    for want in [
        "Created hybrid PEFT search",
        "Step 1 finished",
        "Search succeeded",
    ] {
        assert!(
            messages.iter().any(|m| m.starts_with(want)),
            "{want}: {messages:?}"
        );
    }
    let listed = s2.get_ok(SEARCHES).await;
    assert_eq!(listed["data"][0]["id"], json!(id));
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_searches_name_the_field_and_cancel_stops_trials() {
    let s = Server::start(ServeOptions::default()).await;
    let (train, valid) = setup(&s).await;
    let base = request(&train, &valid);
    let with = |patch: Value| {
        let mut v = base.clone();
        for (k, x) in patch.as_object().expect("object") {
            if x.is_null() {
                v.as_object_mut().expect("object").remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    };
    let cases: Vec<(Value, &str)> = vec![
        (with(json!({"validation_file": null})), "validation_file"),
        (with(json!({"objective": "bleu"})), "objective"),
        (
            with(json!({"methods": ["lora_in_proj", "nope"]})),
            "methods[1]",
        ),
        (with(json!({"methods": ["cls_token"]})), "methods[0]"),
        (
            with(json!({"trials": {"step1": 0, "step2": 1}})),
            "trials.step1",
        ),
        (
            with(json!({"trials": {"step1": 5, "step2": 100000}})),
            "trials.step2",
        ),
        (with(json!({"trials": {"step1": -1}})), "trials"),
        (with(json!({"max_parallel": 0})), "max_parallel"),
        (
            with(json!({"space": {"lora_in_proj": {"r": {"low": 16, "high": 4}}}})),
            "space.lora_in_proj.r",
        ),
        (
            with(json!({"space": {"lora_in_proj": {"r": {"low": 4, "high": 100000}}}})),
            "space.lora_in_proj.r",
        ),
        (with(json!({"pruner": {"type": "hyperband"}})), "pruner"),
        (
            with(json!({"pruner": {"type": "median", "interval_steps": 0}})),
            "pruner",
        ),
        (
            with(json!({"hyperparameters": {"weight_decay": 0.1}})),
            "hyperparameters.weight_decay",
        ),
        (
            with(json!({"hyperparameters": {"n_epochs": 0}})),
            "n_epochs",
        ),
        (with(json!({"model": "nope"})), "model"),
    ];
    for (req, field) in cases {
        let (st, body) = s.call(s.req(Method::POST, SEARCHES).json(&req)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{req}: {body}");
        let param = body["error"]["param"].as_str().unwrap_or("");
        assert!(
            param == field || param.ends_with(field),
            "{req}: want {field}, got {body}"
        );
        assert!(!body["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let (_, list) = s.call(s.req(Method::GET, SEARCHES)).await;
    assert_eq!(list["data"], json!([]), "nothing was created: {list}");

    // No worker: the trials wait queued; cancelling the search cancels them.
    let (st, search) = s.call(s.req(Method::POST, SEARCHES).json(&base)).await;
    assert_eq!(st, StatusCode::OK, "{search}");
    let id = search["id"].as_str().expect("id");
    let (st, body) = s
        .call(s.req(Method::POST, &format!("{SEARCHES}/{id}/train")))
        .await;
    assert_error(st, &body, StatusCode::CONFLICT, "search_not_finished");
    let (st, cancelled) = s
        .call(s.req(Method::POST, &format!("{SEARCHES}/{id}/cancel")))
        .await;
    assert_eq!(st, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["trial_counts"]["cancelled"], 3, "{cancelled}");
    let jobs = s.get_ok("/v1/fine_tuning/jobs").await;
    let statuses: BTreeMap<String, usize> =
        jobs["data"]
            .as_array()
            .expect("jobs")
            .iter()
            .fold(BTreeMap::new(), |mut m, j| {
                *m.entry(j["status"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
                m
            });
    assert_eq!(
        statuses,
        BTreeMap::from([("cancelled".to_string(), 3)]),
        "{jobs}"
    );
    let (st, body) = s
        .call(s.req(Method::POST, &format!("{SEARCHES}/{id}/cancel")))
        .await;
    assert_eq!(st, StatusCode::OK, "cancelling twice is harmless: {body}");
    // The event stream replays the story and ends, the search being finished.
    let text = s
        .req(Method::GET, &format!("{SEARCHES}/{id}/events?stream=true"))
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("body");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let first: Value = serde_json::from_str(data[0]).expect("an event object");
    assert_eq!(first["object"], "fine_tuning.search.event");
    assert!(
        first["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("Created hybrid PEFT search")
    );
    assert!(
        data.iter().any(|d| d.contains("Search cancelled")),
        "{text}"
    );
}

/// On PostgreSQL + S3 with `molt serve --workers 2`: a pruned search (median rule, a
/// validation every step) finishes, with intermediate values per trial and every trial
/// finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_search_on_postgres_and_s3() {
    let Some(backend) = common::Backend::postgres_s3() else {
        eprintln!(
            "skipped: set MOLT_TEST_DATABASE_URL and MOLT_TEST_S3_ENDPOINT (scripts/test-services.sh does)"
        );
        return;
    };
    let s = Server::start(ServeOptions {
        backend,
        workers: 2,
        ..ServeOptions::default()
    })
    .await;
    let (train, valid) = setup(&s).await;
    let mut req = request(&train, &valid);
    req["trials"] = json!({"step1": 6, "step2": 2});
    req["max_parallel"] = json!(2);
    req["train_best"] = json!(false);
    req["pruner"] = json!({"type": "median", "n_startup_trials": 1});
    req["hyperparameters"]["eval_every"] = json!(1);
    let (st, search) = s.call(s.req(Method::POST, SEARCHES).json(&req)).await;
    assert_eq!(st, StatusCode::OK, "{search}");
    assert_eq!(search["pruner"]["type"], "median");
    assert_eq!(search["pruner"]["n_startup_trials"], 1);
    let id = search["id"].as_str().expect("id");
    let done = wait_search(&s, id, Duration::from_secs(600), |v| {
        v["status"] != "queued" && v["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["trial_counts"]["finished"], 8, "{done}");
    assert!(done["result_job_id"].is_null());
    let trials = s.get_ok(&format!("{SEARCHES}/{id}/trials")).await;
    for t in trials["data"].as_array().expect("trials") {
        let status = t["status"].as_str().expect("status");
        assert!(
            ["complete", "pruned", "skipped", "failed"].contains(&status),
            "{t}"
        );
        if status == "complete" {
            assert!(
                t["intermediate_values"].as_array().map(Vec::len) > Some(1),
                "a validation every step: {t}"
            );
        }
        if status == "pruned" {
            assert!(t["pruned_step"].is_i64(), "{t}");
            assert!(
                t["message"].as_str().unwrap_or("").contains("median"),
                "{t}"
            );
        }
    }
}

/// A tenant's search does not starve another tenant's job: with one worker, the other
/// tenant's job runs while most of the search's trials still wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_job_is_not_starved_by_a_search() {
    let s = Server::start(ServeOptions::default()).await;
    s.register_model("demo", &repo_root().join("models/demo"))
        .await;
    let (st, train) = s.upload("train.jsonl", text_dataset(32)).await;
    assert_eq!(st, StatusCode::OK, "{train}");
    let train = train["id"].as_str().expect("id").to_string();
    let mut req = request(&train, &train);
    req["trials"] = json!({"step1": 10, "step2": 0});
    req["max_parallel"] = json!(4);
    req["train_best"] = json!(false);
    let (st, search) = s.call(s.req(Method::POST, SEARCHES).json(&req)).await;
    assert_eq!(st, StatusCode::OK, "{search}");
    let id = search["id"].as_str().expect("id").to_string();

    let (_, other) = s.new_tenant("other").await;
    let (st, file) = s.upload_as(&other, "mine.jsonl", text_dataset(4)).await;
    assert_eq!(st, StatusCode::OK, "{file}");
    let (st, job) = s
        .call(
            s.req_as(&other, Method::POST, "/v1/fine_tuning/jobs")
                .json(&json!({"model": "demo", "training_file": file["id"],
                              "hyperparameters": {"n_epochs": 1, "batch_size": 4}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{job}");
    let job_id = job["id"].as_str().expect("id").to_string();

    let _w = Worker::start(&s, "solo", 30);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, j) = s
            .call(s.req_as(
                &other,
                Method::GET,
                &format!("/v1/fine_tuning/jobs/{job_id}"),
            ))
            .await;
        if j["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let search = s.get_ok(&format!("{SEARCHES}/{id}")).await;
    let finished = search["trial_counts"]["finished"].as_u64().expect("count");
    assert!(
        finished <= 3,
        "the other tenant's job waited for {finished} of the search's trials: {search}"
    );
}
