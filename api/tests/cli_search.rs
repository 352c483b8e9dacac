//! `molt search` (the hybrid PEFT search on local files, no server) and `molt searches …`
//! (the client of `/v1/fine_tuning/searches`) as a user runs them: a two-step search on the
//! demo model that writes search.json and the best adapter and is deterministic for a seed;
//! bad flag values naming the field; a search created and watched through a server, then
//! shown, listed and (once finished) refused a cancel.

mod common;

use std::path::Path;

use common::{ServeOptions, Server, molt_cli, repo_root, text_dataset};
use reqwest::StatusCode;
use serde_json::Value;

fn demo() -> String {
    repo_root().join("models/demo").display().to_string()
}

/// Writes train.jsonl (8 examples) and valid.jsonl (4) into `dir`.
fn files(dir: &Path) -> (String, String) {
    let train = dir.join("train.jsonl");
    let valid = dir.join("valid.jsonl");
    std::fs::write(&train, text_dataset(8)).unwrap();
    std::fs::write(&valid, text_dataset(4)).unwrap();
    (train.display().to_string(), valid.display().to_string())
}

const HYPER: &str = r#"{"n_epochs": 1, "batch_size": 2, "max_seq_length": 24}"#;

/// `molt search` on the demo model into `out`; returns the output and search.json.
fn local_search(dir: &Path, out: &Path) -> (std::process::Output, Value) {
    let (train, valid) = files(dir);
    let out_s = out.display().to_string();
    let o = molt_cli(&[
        "search",
        "--model",
        &demo(),
        "--training-file",
        &train,
        "--validation-file",
        &valid,
        "--methods",
        "lora_in_proj,A,prompt",
        "--trials",
        "3,2",
        "--max-parallel",
        "2",
        "--hyperparameters",
        HYPER,
        "--seed",
        "3",
        "--train-best",
        "--out",
        &out_s,
    ]);
    let text = std::fs::read_to_string(out.join("search.json")).unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (o, v)
}

fn configurations(search: &Value) -> Vec<Value> {
    search["trials"]
        .as_array()
        .expect("trials")
        .iter()
        .map(|t| t["configuration"].clone())
        .collect()
}

#[test]
fn a_local_search_runs_both_steps_and_trains_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (o, search) = local_search(dir.path(), &out);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("validation_loss"), "{stdout}");
    assert!(stdout.contains("search succeeded"), "{stdout}");
    assert_eq!(search["status"], "succeeded", "{search}");

    let trials = search["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 5, "{search}");
    let numbers: Vec<i64> = trials
        .iter()
        .map(|t| t["number"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4]);
    let steps: Vec<i64> = trials.iter().map(|t| t["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [1, 1, 1, 2, 2]);
    for t in trials {
        let status = t["status"].as_str().unwrap();
        assert!(
            matches!(status, "complete" | "skipped" | "pruned"),
            "no trial fails here: {t}"
        );
        if status == "complete" {
            assert!(t["value"].as_f64().unwrap().is_finite(), "{t}");
            assert!(!t["intermediate_values"].as_array().unwrap().is_empty());
            assert!(t["method"].is_object(), "{t}");
        }
        let row = [
            t["number"].to_string(),
            t["step"].to_string(),
            status.into(),
        ];
        assert!(
            stdout.lines().any(|l| l
                .split_whitespace()
                .take(3)
                .eq(row.iter().map(String::as_str))),
            "one line per trial:\n{stdout}"
        );
    }

    // The best is the lowest complete value (validation loss is minimised).
    let lowest = trials
        .iter()
        .filter(|t| t["status"] == "complete")
        .map(|t| t["value"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let best = &search["best"];
    assert_eq!(best["value"].as_f64(), Some(lowest), "{search}");
    let best_trial = &trials[best["trial"].as_u64().unwrap() as usize];
    assert_eq!(best_trial["value"].as_f64(), Some(lowest));

    // Algorithm 1: step 2's first trial (number 3) is step 1's best with its defaults.
    let best1 = trials[..3]
        .iter()
        .filter(|t| t["status"] == "complete")
        .min_by(|a, b| {
            a["value"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["value"].as_f64().unwrap())
        })
        .expect("a complete step-1 trial");
    assert_eq!(
        trials[3]["configuration"]["methods"], best1["configuration"]["methods"],
        "{search}"
    );
    assert_eq!(trials[3]["configuration"]["remove"], "none");
    assert_eq!(search["chosen"], best1["configuration"]["methods"]);

    // The best adapter, written as `molt train` writes one.
    let adapter = out.join("best");
    assert!(adapter.join("adapter_config.json").is_file(), "{stdout}");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(stdout.contains(&format!("adapter written to {}", adapter.display())));
    assert_eq!(search["adapter"], adapter.display().to_string());
    // The trials' scratch folders are gone.
    assert!(!out.join("trials").exists());

    // The same seed: the same trials.
    let (o2, again) = local_search(dir.path(), &dir.path().join("out2"));
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    assert_eq!(configurations(&again), configurations(&search));
}

#[test]
fn bad_flag_values_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (train, valid) = files(dir.path());
    let out = dir.path().join("out").display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "search",
            "--model",
            "",
            "--training-file",
            &train,
            "--validation-file",
            &valid,
            "--out",
            &out,
        ];
        let model = demo();
        args[2] = &model;
        args.extend_from_slice(extra);
        let o = molt_cli(&args);
        assert!(!o.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&["--trials", "0,1"]);
    assert!(e.contains("trials.step1"), "{e}");
    let e = run(&["--methods", "nope"]);
    assert!(e.contains("methods[0]") && e.contains("nope"), "{e}");
    let e = run(&["--methods", "lora_in_proj", "--max-parallel", "0"]);
    assert!(e.contains("max_parallel"), "{e}");
    let e = run(&["--hyperparameters", r#"{"n_epochs": 0}"#]);
    assert!(e.contains("hyperparameters.n_epochs"), "{e}");
    let e = run(&["--pruner", r#"{"type": "mean"}"#]);
    assert!(e.contains("pruner.type"), "{e}");
    let e = run(&["--trials", "3"]);
    assert!(e.contains("STEP1,STEP2"), "{e}");

    // A missing file is named.
    let missing = dir.path().join("missing.jsonl").display().to_string();
    let o = molt_cli(&[
        "search",
        "--model",
        &demo(),
        "--training-file",
        &missing,
        "--validation-file",
        &valid,
        "--out",
        &out,
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&missing), "{e}");
}

fn ok_json(o: &std::process::Output) -> Value {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_create_watch_get_list_and_cancel_through_a_server() {
    let s = Server::start(ServeOptions {
        workers: 1,
        ..Default::default()
    })
    .await;
    s.register_model("demo", &repo_root().join("models/demo"))
        .await;
    let (st, train) = s.upload("train.jsonl", text_dataset(8)).await;
    assert_eq!(st, StatusCode::OK, "{train}");
    let (st, valid) = s.upload("valid.jsonl", text_dataset(4)).await;
    assert_eq!(st, StatusCode::OK, "{valid}");
    let (train, valid) = (
        train["id"].as_str().unwrap().to_string(),
        valid["id"].as_str().unwrap().to_string(),
    );

    // A bad value: the server's 400 names the field.
    let o = s.client(&[
        "searches",
        "create",
        "--model",
        "demo",
        "--training-file",
        &train,
        "--validation-file",
        &valid,
        "--methods",
        "lora_in_proj,nope",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("400") && e.contains("methods[1]"), "{e}");

    let o = s.client(&[
        "searches",
        "create",
        "--model",
        "demo",
        "--training-file",
        &train,
        "--validation-file",
        &valid,
        "--methods",
        "lora_in_proj,A",
        "--trials",
        "2,1",
        "--max-parallel",
        "2",
        "--hyperparameters",
        HYPER,
        "--seed",
        "5",
        "--watch",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.log_text()
    );
    assert!(
        stdout.contains("#  step  status") && stdout.contains("validation_loss"),
        "the table header: {stdout}"
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    // Not a terminal: no ANSI redraws.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    // The created search's JSON comes first.
    let id = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"id\": \""))
        .and_then(|r| r.strip_suffix("\","))
        .expect("the created search's id")
        .to_string();
    assert!(id.starts_with("ftsearch"), "{id}");

    let search = ok_json(&s.client(&["searches", "get", &id]));
    assert_eq!(search["id"], id.as_str());
    assert_eq!(search["status"], "succeeded");
    assert_eq!(search["trial_counts"]["total"], 3, "{search}");
    let trials = ok_json(&s.client(&["searches", "trials", &id]));
    let data = trials["data"].as_array().expect("data");
    assert_eq!(data.len(), 3, "{trials}");
    let steps: Vec<i64> = data.iter().map(|t| t["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [1, 1, 2]);
    let list = ok_json(&s.client(&["searches", "list"]));
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()], "{list}");

    // Events print as lines, oldest first.
    let o = s.client(&["searches", "events", &id]);
    assert!(o.status.success());
    let events = String::from_utf8_lossy(&o.stdout);
    assert!(events.contains("Search succeeded"), "{events}");

    // A finished search cannot be cancelled: the 409's message is shown.
    let o = s.client(&["searches", "cancel", &id]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("409") && e.contains(&id), "{e}");
}
