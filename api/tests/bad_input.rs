//! Every bad input of the issue's list, against a real `molt serve`: each answers a 4xx with
//! OpenAI's envelope `{"error": {"message", "type", "param", "code"}}` and a message that says
//! what is wrong (line numbers for datasets).
//!
//! Datasets are validated at upload: a malformed file is stored with `status: "error"` and
//! its problems (with line numbers) in `status_details`, and a job naming it is refused with
//! 400 `invalid_training_file` carrying the same details (OpenAI's status for a job it cannot
//! create). Path ids naming nothing answer 404.

mod common;

use common::{ServeOptions, Server, assert_error, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn server() -> Server {
    let s = Server::start(ServeOptions {
        extra_args: vec!["--max-upload-bytes".into(), "4096".into()],
        ..ServeOptions::default()
    })
    .await;
    s.register_model("tiny", &tiny_model_dir()).await;
    s
}

/// Uploads a bad dataset: it is stored with status `error` and details naming `needle`;
/// a job on it is refused with the same details. Returns the job error's message.
async fn bad_dataset(s: &Server, name: &str, bytes: &[u8], needle: &str) -> String {
    let (status, file) = s.upload(name, bytes.to_vec()).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["status"], "error", "{file}");
    let details = file["status_details"].as_str().expect("status_details");
    assert!(
        details.contains(needle),
        "status_details {details:?} lacks {needle:?}"
    );
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": file["id"]
        })))
        .await;
    let msg = assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_training_file",
    );
    assert_eq!(body["error"]["param"], "training_file");
    assert!(msg.contains(needle), "job error {msg:?} lacks {needle:?}");
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_answers_4xx_with_the_envelope() {
    let s = server().await;

    // Malformed JSONL: the line number is reported.
    let msg = bad_dataset(
        &s,
        "malformed.jsonl",
        b"{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{\"text\": oops}\n",
        "line 3",
    )
    .await;
    assert!(msg.contains("not valid JSON"), "{msg}");

    // Empty file.
    bad_dataset(&s, "empty.jsonl", b"", "empty").await;

    // Not UTF-8 (line 2).
    let msg = bad_dataset(
        &s,
        "latin1.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n",
        "line 2",
    )
    .await;
    assert!(msg.contains("UTF-8"), "{msg}");

    // Valid JSON, wrong schema for purpose fine-tune.
    let msg = bad_dataset(
        &s,
        "schema.jsonl",
        b"{\"text\": \"ok\"}\n{\"question\": \"what?\", \"answer\": 42}\n",
        "line 2",
    )
    .await;
    assert!(msg.contains("no known fields"), "{msg}");

    // Over the size limit (the server runs with --max-upload-bytes 4096): 413, nothing kept.
    let (status, body) = s.upload("big.jsonl", common::text_dataset(200)).await;
    let msg = assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "file_too_large",
    );
    assert!(msg.contains("4096"), "{msg}");
    assert_eq!(body["error"]["param"], "file");

    // A wrong purpose.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "assistants")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{\"text\":\"x\"}\n".to_vec()).file_name("a.jsonl"),
        );
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/files").multipart(form))
        .await;
    let msg = assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_purpose");
    assert!(msg.contains("assistants"), "{msg}");
    // Exactly `fine-tune`, once, whichever comes first: the file is not kept.
    for fields in [
        vec![("file", "a.jsonl"), ("purpose", "fine-tune ")],
        vec![("purpose", "fine-tune"), ("purpose", "fine-tune")],
        vec![("file", "a.jsonl"), ("purpose", "assistants")],
        vec![("file", "a.jsonl")],
    ] {
        let mut form = reqwest::multipart::Form::new();
        for (name, value) in &fields {
            form = if *name == "file" {
                form.part(
                    "file",
                    reqwest::multipart::Part::bytes(b"{\"text\":\"x\"}\n".to_vec())
                        .file_name(value.to_string()),
                )
            } else {
                form.text(name.to_string(), value.to_string())
            };
        }
        let (status, body) = s
            .call(s.req(Method::POST, "/v1/files").multipart(form))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{fields:?}: {body}");
        assert_eq!(body["error"]["param"], "purpose", "{fields:?}: {body}");
    }

    // Only the valid uploads are left: the four bad datasets, nothing from the 413.
    let files = s.get_ok("/v1/files").await;
    assert_eq!(files["object"], "list");
    assert_eq!(files["data"].as_array().map(Vec::len), Some(4), "{files}");

    // A good dataset for the job checks below.
    let (status, good) = s.upload("good.jsonl", common::text_dataset(8)).await;
    assert_eq!(status, StatusCode::OK, "{good}");
    assert_eq!(good["status"], "processed", "{good}");
    let good_id = good["id"].as_str().expect("id").to_string();

    // Unknown model.
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "mamba-9000b", "training_file": good_id
        })))
        .await;
    let msg = assert_error(status, &body, StatusCode::BAD_REQUEST, "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    assert!(msg.contains("mamba-9000b") && msg.contains("tiny"), "{msg}");

    // A method that is not valid for the model (rank above the projector's size; blocks
    // that do not divide its width), or one whose type does not exist: 400.
    for (method, status_wanted, needles) in [
        (
            json!({"type": "lora", "targets": "in_proj", "r": 100000}),
            StatusCode::BAD_REQUEST,
            vec!["not valid for this model", "100000", "in_proj"],
        ),
        (
            json!({"type": "prodial", "r_b": 7}),
            StatusCode::BAD_REQUEST,
            vec!["not valid for this model", "r_b = 7"],
        ),
        (
            json!({"type": "no-such-method"}),
            StatusCode::BAD_REQUEST,
            vec!["no-such-method"],
        ),
    ] {
        let (status, body) = s
            .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
                "model": "tiny", "training_file": good_id, "method": method
            })))
            .await;
        let msg = assert_error(status, &body, status_wanted, "invalid_method");
        assert_eq!(body["error"]["param"], "method");
        for n in needles {
            assert!(msg.contains(n), "{msg:?} lacks {n:?}");
        }
    }

    // Hyperparameters out of range.
    for (hp, field) in [
        (json!({"n_epochs": 0}), "n_epochs"),
        (json!({"batch_size": 100000}), "batch_size"),
        (
            json!({"learning_rate_multiplier": -1}),
            "learning_rate_multiplier",
        ),
        (json!({"n_epochs": "lots"}), "n_epochs"),
        (json!({"no_such_knob": 1}), "no_such_knob"),
        (
            json!({"learning_rate": 0.01, "learning_rate_multiplier": 2}),
            "learning_rate_multiplier",
        ),
        (json!({"n_epochs": 2, "epochs": 3}), "epochs"),
    ] {
        let (status, body) = s
            .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
                "model": "tiny", "training_file": good_id, "hyperparameters": hp
            })))
            .await;
        let msg = assert_error(
            status,
            &body,
            StatusCode::BAD_REQUEST,
            "invalid_hyperparameter",
        );
        assert_eq!(
            body["error"]["param"],
            format!("hyperparameters.{field}"),
            "{body}"
        );
        assert!(msg.contains(field), "{msg}");
    }

    // Missing and wrong keys: 401.
    let (status, body) = s.call(s.http.get(format!("{}/v1/files", s.url))).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "missing_api_key");
    let (status, body) = s
        .call(s.req_as("sk-molt-not-a-key", Method::GET, "/v1/files"))
        .await;
    let msg = assert_error(status, &body, StatusCode::UNAUTHORIZED, "invalid_api_key");
    assert!(
        !msg.contains("sk-molt-not-a-key"),
        "the key is echoed: {msg}"
    );
    let (status, body) = s
        .call(s.req_as("wrong", Method::GET, "/admin/tenants"))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "invalid_admin_token",
    );

    // Another tenant's resources answer 404, exactly like absent ones.
    let (_, other_key) = s.new_tenant("other").await;
    let (status, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": good_id, "hyperparameters": {"n_epochs": 1}
        })))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    let job_id = job["id"].as_str().expect("id").to_string();
    for (method, path) in [
        (Method::GET, format!("/v1/files/{good_id}")),
        (Method::GET, format!("/v1/files/{good_id}/content")),
        (Method::DELETE, format!("/v1/files/{good_id}")),
        (Method::GET, format!("/v1/fine_tuning/jobs/{job_id}")),
        (
            Method::POST,
            format!("/v1/fine_tuning/jobs/{job_id}/cancel"),
        ),
        (Method::GET, format!("/v1/fine_tuning/jobs/{job_id}/events")),
        (
            Method::GET,
            format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ),
        (
            Method::GET,
            "/v1/fine_tuning/jobs/ftjob-doesnotexist".to_string(),
        ),
        (Method::GET, "/v1/adapters/adapter-doesnotexist".to_string()),
    ] {
        let (status, body) = s.call(s.req_as(&other_key, method.clone(), &path)).await;
        let msg = assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
        assert!(msg.contains("No such"), "{method} {path}: {msg}");
    }
    // The other tenant's listings are empty; its own upload of our file id is impossible.
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": "file-belongs-to-nobody"
        })))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "file_not_found");
    let other_files = s
        .call(s.req_as(&other_key, Method::GET, "/v1/files"))
        .await
        .1;
    assert_eq!(other_files["data"], json!([]));
    let (status, body) = s
        .call(
            s.req_as(&other_key, Method::POST, "/v1/fine_tuning/jobs")
                .json(&json!({
                    "model": "tiny", "training_file": good_id
                })),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "file_not_found");

    // Cancelling a finished job: 409 (no worker runs here, so cancel it first).
    let (status, cancelled) = s
        .call(s.req(
            Method::POST,
            &format!("/v1/fine_tuning/jobs/{job_id}/cancel"),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let (status, body) = s
        .call(s.req(
            Method::POST,
            &format!("/v1/fine_tuning/jobs/{job_id}/cancel"),
        ))
        .await;
    let msg = assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    assert!(msg.contains("cancelled"), "{msg}");

    // Pagination cursors that name nothing (404) and limits.
    for path in [
        "/v1/fine_tuning/jobs?after=ftjob-nope",
        "/v1/files?after=file-nope",
        &format!("/v1/fine_tuning/jobs/{job_id}/events?after=ftevent-nope"),
    ] {
        let (status, body) = s.call(s.req(Method::GET, path)).await;
        let msg = assert_error(status, &body, StatusCode::NOT_FOUND, "invalid_cursor");
        assert_eq!(body["error"]["param"], "after");
        assert!(msg.contains("nope"), "{msg}");
    }
    let (status, body) = s.call(s.req(Method::GET, "/v1/files?after=")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_cursor");
    let (status, body) = s
        .call(s.req(Method::GET, "/v1/fine_tuning/jobs?limit=0"))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_limit");

    // A base model is not a tenant's to delete (403); a name of no model is a 404.
    let (status, body) = s.call(s.req(Method::DELETE, "/v1/models/tiny")).await;
    assert_error(
        status,
        &body,
        StatusCode::FORBIDDEN,
        "cannot_delete_base_model",
    );
    let (status, body) = s.call(s.req(Method::DELETE, "/v1/models/nope")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = s
        .call(s.req(Method::GET, "/v1/fine_tuning/jobs?limit=many"))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");

    // Malformed JSON, a wrong content type, a missing field, an unknown field.
    let (status, body) = s
        .call(
            s.req(Method::POST, "/v1/fine_tuning/jobs")
                .header("content-type", "application/json")
                .body("{\"model\": \"tiny\","),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_json");
    let (status, body) = s
        .call(
            s.req(Method::POST, "/v1/fine_tuning/jobs")
                .header("content-type", "text/plain")
                .body("model=tiny"),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, body) = s
        .call(
            s.req(Method::POST, "/v1/files")
                .json(&json!({"purpose": "fine-tune"})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, body) = s
        .call(
            s.req(Method::POST, "/v1/fine_tuning/jobs")
                .json(&json!({"model": "tiny"})),
        )
        .await;
    let msg = assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_request_body",
    );
    assert_eq!(body["error"]["param"], "training_file");
    assert!(msg.contains("training_file"), "{msg}");
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": good_id, "modle": "x"
        })))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_request_body",
    );
    assert_eq!(body["error"]["param"], "modle");

    // A JSON body over the body limit: 413.
    let big = "x".repeat(2 * 1024 * 1024);
    let (status, body) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "tiny", "training_file": good_id, "suffix": big
        })))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
    );

    // Unknown routes and methods keep the envelope too.
    let (status, body) = s.call(s.req(Method::GET, "/v1/nothing-here")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "unknown_url");
    let (status, body) = s.call(s.req(Method::PUT, "/v1/files")).await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );

    // Idempotency: the same key returns the same job.
    let create = |key: &'static str| {
        s.req(Method::POST, "/v1/fine_tuning/jobs")
            .header("Idempotency-Key", key)
            .json(&json!({"model": "tiny", "training_file": good_id}))
    };
    let (_, a) = s.call(create("retry-1")).await;
    let (_, b) = s.call(create("retry-1")).await;
    assert_eq!(a["id"], b["id"]);
    let (status, body) = s.call(create("bad key with spaces")).await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_idempotency_key",
    );
    // A repeated key does not make an invalid request succeed: it is checked first.
    let (status, body) = s
        .call(
            s.req(Method::POST, "/v1/fine_tuning/jobs")
                .header("Idempotency-Key", "retry-1")
                .json(&json!({"model": "tiny", "training_file": good_id, "suffix": "no spaces"})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_suffix");
    let upload = |purpose: &'static str| {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose)
            .part(
                "file",
                reqwest::multipart::Part::bytes(common::text_dataset(8)).file_name("again.jsonl"),
            );
        s.req(Method::POST, "/v1/files")
            .header("Idempotency-Key", "upload-1")
            .multipart(form)
    };
    let (status, first) = s.call(upload("fine-tune")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, again) = s.call(upload("fine-tune")).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(first["id"], again["id"]);
    let (status, body) = s.call(upload("not-a-purpose")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_purpose");
    assert_eq!(body["error"]["param"], "purpose");

    // Every response carried a request id.
    let res = s
        .req(Method::GET, "/v1/files")
        .send()
        .await
        .expect("request");
    assert!(res.headers().contains_key("x-request-id"));
    let _: Value = res.json().await.expect("json");
}

/// A language model whose tokenizer produces ids beyond its embedding (a tokenizer of another
/// model) is refused at registration, naming both files, and is not registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_larger_than_the_vocabulary_is_refused_at_registration() {
    let s = Server::start(ServeOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(tiny_model_dir()).expect("fixture") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    let tok = trainer::tokenizer::Tokenizer::from_file(&dir.path().join("tokenizer.json"))
        .expect("tokenizer");
    let bound = tok.id_bound();
    // Half the tokenizer's ids: below the bound even after state-spaces padding to 8.
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("config")).expect("json");
    config["vocab_size"] = json!(bound / 2);
    std::fs::write(&config_path, config.to_string()).expect("write config");

    let (st, v) = s
        .call(s.admin(Method::POST, "/admin/models").json(&json!({
            "id": "mismatched", "source": dir.path().display().to_string()
        })))
        .await;
    let msg = assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_model");
    assert!(msg.contains("tokenizer.json"), "{msg}");
    assert!(msg.contains(&format!("up to {}", bound - 1)), "{msg}");
    let (st, v) = s.call(s.req(Method::GET, "/v1/models/mismatched")).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");

    // The fixture itself, tokenizer and vocabulary matching, registers.
    s.register_model("tiny", &tiny_model_dir()).await;
}
