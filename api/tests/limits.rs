//! Every size a client controls is bounded before any work: over a limit, the answer is 400
//! (one field) or 413 (the work of a whole request), naming the limit's flag, its env
//! variable and the request's value. Limits are set low here through their flags; one
//! server runs on the defaults to show the case (a scoring request far beyond the
//! token budget) is refused at once instead of running into the request timeout.

mod common;

use std::time::{Duration, Instant};

use common::{ServeOptions, Server, assert_error, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// `n` distinct words: at least `n` tokens for any tokenizer that splits on spaces, and
/// many more than `n / 4` for any other.
fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}x"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn post(s: &Server, path: &str, body: Value) -> (StatusCode, Value) {
    s.call(s.req(Method::POST, path).json(&body)).await
}

/// Asserts a 413 `request_too_large` naming `env` and `value`.
fn assert_too_large(status: StatusCode, body: &Value, param: &str, env: &str, value: usize) {
    let msg = assert_error(
        status,
        body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
    );
    assert_eq!(body["error"]["param"], param, "{body}");
    assert!(msg.contains(env), "{msg}");
    assert!(msg.contains(&format!("is {value}")), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_is_checked_up_front_with_its_name_and_value() {
    let flags = [
        ("--max-score-items", "3"),
        ("--max-score-choices", "2"),
        ("--max-score-tokens", "200"),
        ("--max-completion-sequences", "4"),
        ("--max-completion-tokens", "12"),
        ("--max-name-chars", "10"),
    ];
    let s = Server::start(ServeOptions {
        extra_args: flags
            .iter()
            .flat_map(|(f, v)| [f.to_string(), v.to_string()])
            .collect(),
        ..ServeOptions::default()
    })
    .await;
    s.register_model("tiny", &tiny_model_dir()).await;
    let item = json!({"context": "a", "choices": [" b", " c"]});

    // Scores: items, choices per item, tokens in all.
    let (st, v) = post(
        &s,
        "/v1/scores",
        json!({"model": "tiny", "items": [item, item, item, item]}),
    )
    .await;
    assert_too_large(st, &v, "items", "MOLT_MAX_SCORE_ITEMS", 4);
    let (st, v) = post(
        &s,
        "/v1/scores",
        json!({"model": "tiny", "items": [item, {"context": "a", "choices": [" b", " c", " d"]}]}),
    )
    .await;
    assert_too_large(st, &v, "items[1].choices", "MOLT_MAX_SCORE_CHOICES", 3);
    let long = json!({"context": words(400), "choices": [" b", " c"]});
    let (st, v) = post(&s, "/v1/scores", json!({"model": "tiny", "items": [long]})).await;
    let msg = assert_error(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    assert!(
        msg.contains("MOLT_MAX_SCORE_TOKENS") && msg.contains("at most 200"),
        "{msg}"
    );
    // Within the limits: served, and the usage stays within the token budget.
    let (st, v) = post(
        &s,
        "/v1/scores",
        json!({"model": "tiny", "items": [item, item]}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
    let used = v["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    assert!((4..=200).contains(&used), "{v}");

    // Completions: prompts × n, and prompts × n × max_tokens.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}),
    )
    .await;
    assert_too_large(st, &v, "prompt", "MOLT_MAX_COMPLETION_SEQUENCES", 6);
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 4}),
    )
    .await;
    assert_too_large(st, &v, "max_tokens", "MOLT_MAX_COMPLETION_TOKENS", 16);
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4), "{v}");

    // Names: tenants, keys, uploaded files.
    let (st, v) = s
        .call(
            s.admin(Method::POST, "/admin/tenants")
                .json(&json!({"name": "x".repeat(5000)})),
        )
        .await;
    let msg = assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_name");
    assert!(
        msg.contains("5000 characters") && msg.contains("MOLT_MAX_NAME_CHARS"),
        "{msg}"
    );
    let (st, t) = s
        .call(
            s.admin(Method::POST, "/admin/tenants")
                .json(&json!({"name": "acme"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    let tid = t["id"].as_str().expect("id");
    let (st, v) = s
        .call(
            s.admin(Method::POST, &format!("/admin/tenants/{tid}/keys"))
                .json(&json!({"name": "k".repeat(11)})),
        )
        .await;
    let msg = assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_name");
    assert!(msg.contains("11 characters"), "{msg}");
    let (st, v) = s
        .upload(
            &format!("{}.jsonl", "f".repeat(20)),
            b"{\"text\": \"a\"}\n".to_vec(),
        )
        .await;
    let msg = assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_name");
    assert_eq!(v["error"]["param"], "file", "{v}");
    assert!(msg.contains("26 characters"), "{msg}");
    let (st, v) = s
        .call(s.admin(Method::POST, "/admin/models").json(&json!({
            "id": "m", "source": "/".repeat(5000)
        })))
        .await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_source");

    // Job metadata: OpenAI's limits (16 pairs, keys ≤ 64, values ≤ 512 characters).
    let (st, file) = s.upload("d.jsonl", common::text_dataset(2)).await;
    assert_eq!(st, StatusCode::OK, "{file}");
    let (st, v) = post(
        &s,
        "/v1/fine_tuning/jobs",
        json!({"model": "tiny", "training_file": file["id"], "metadata": {"k": "v".repeat(513)}}),
    )
    .await;
    let msg = assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_metadata");
    assert!(msg.contains("513 characters"), "{msg}");
}

/// The request — 1024 items of 64-token choices — on the default limits: refused
/// at once with 413, not run into the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_scoring_request_is_refused_at_once_on_the_defaults() {
    let s = Server::start(ServeOptions::default()).await;
    s.register_model("tiny", &tiny_model_dir()).await;
    let choice = format!(" {}", words(64));
    let items: Vec<Value> = (0..1024)
        .map(|i| json!({"context": format!("item {i}"), "choices": [choice, choice]}))
        .collect();
    let started = Instant::now();
    let (st, v) = post(&s, "/v1/scores", json!({"model": "tiny", "items": items})).await;
    let msg = assert_error(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    assert!(msg.contains("MOLT_MAX_SCORE_TOKENS"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused only after {:?}",
        started.elapsed()
    );
}
