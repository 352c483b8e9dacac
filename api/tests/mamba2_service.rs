//! End to end on a Mamba-2 base: `molt serve` (SQLite + local files; PostgreSQL + S3 when the
//! test services are configured) registers the Mamba-2 fixture checkpoint, trains a LoRA
//! and a ProDiaL job through the API, and serves each adapter hot-swapped (in the base's
//! shared decode batch) and merged: the same greedy tokens and log-probabilities as the
//! adapted model computed in this process, and a merged download that is an HF
//! `Mamba2ForCausalLM` checkpoint.
//!
//! The bases are the Mamba-2 fixtures of every case set (their models have no tokenizer of
//! their own), each paired with the Mamba-1 fixture's tokenizer (a tokenizer is the
//! service's, not the architecture's) where the tokenizer's ids fit its vocabulary.

mod common;

#[path = "../../trainer/tests/common/mod.rs"]
mod fixtures;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{D, DType, Tensor};
use common::{Backend, ServeOptions, Server, tiny_model_dir};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use trainer::generate::{GenerationConfig, generate};
use trainer::model::mamba2::Mamba2ForCausalLM;
use trainer::model::{Family, LoadOptions};
use trainer::tokenizer::Tokenizer;

const PROMPT: &str = "The mamba slides over the warm stone";

/// Mamba-2 model folders with a tokenizer: each Mamba-2 base case's checkpoint plus the
/// Mamba-1 fixture's `tokenizer.json`, when its ids fit the model's vocabulary.
fn mamba2_bases(tmp: &Path) -> Vec<(String, PathBuf)> {
    let tok_file = tiny_model_dir().join("tokenizer.json");
    let tok = Tokenizer::from_model_dir(&tiny_model_dir())
        .expect("tokenizer")
        .expect("tokenizer.json");
    let mut out = Vec::new();
    for (i, case) in fixtures::indexed_cases(Family::Mamba2, "base")
        .into_iter()
        .enumerate()
    {
        let src = case.path("model_dir");
        let config = fixtures::read_json(&src.join("config.json"));
        let vocab = config["vocab_size"].as_u64().expect("vocab_size") as usize;
        // The registry's rule: every id the tokenizer produces has an embedding row.
        if tok.id_bound() > vocab {
            eprintln!(
                "{}: skipped, the tokenizer's ids up to {} do not fit its vocabulary of {vocab}",
                case.label,
                tok.id_bound() - 1
            );
            continue;
        }
        let dir = tmp.join(format!("m2-{i}"));
        std::fs::create_dir_all(&dir).expect("dir");
        for entry in std::fs::read_dir(&src).expect("model dir") {
            let p = entry.expect("entry").path();
            if p.is_file() {
                std::fs::copy(&p, dir.join(p.file_name().expect("name"))).expect("copy");
            }
        }
        std::fs::copy(&tok_file, dir.join("tokenizer.json")).expect("tokenizer");
        out.push((format!("m2-{i}"), dir));
    }
    assert!(!out.is_empty(), "no Mamba-2 base case fits the tokenizer");
    out
}

fn dataset() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..12 {
        s.push_str(&format!(
            "{{\"prompt\": \"{PROMPT}\", \"completion\": \" and sings song number {i}.\"}}\n"
        ));
    }
    s.into_bytes()
}

/// Greedy tokens (EOS dropped, as the API does) and their log-probabilities.
fn reference(model: &Mamba2ForCausalLM, prompt: &[u32], max: usize) -> (Vec<u32>, Vec<f32>) {
    let cfg = GenerationConfig {
        max_new_tokens: max,
        keep_step_logits: true,
        ..GenerationConfig::for_model(model)
    };
    let out = generate(model, &[prompt.to_vec()], &cfg).expect("generate");
    let mut toks = out.tokens[0].clone();
    if toks.last().is_some_and(|t| cfg.eos_token_ids.contains(t)) {
        toks.pop();
    }
    let lps = toks
        .iter()
        .zip(&out.step_logits)
        .map(|(t, l)| {
            let l = l.to_dtype(DType::F32).expect("f32");
            let max = l.max_keepdim(D::Minus1).expect("max");
            let s = l.broadcast_sub(&max).expect("sub");
            let lse = s
                .exp()
                .and_then(|e| e.sum_keepdim(D::Minus1))
                .and_then(|e| e.log())
                .expect("lse");
            let lsm: Vec<f32> = s
                .broadcast_sub(&lse)
                .and_then(|t| t.flatten_all())
                .and_then(|t: Tensor| t.to_vec1())
                .expect("log softmax");
            lsm[*t as usize]
        })
        .collect();
    (toks, lps)
}

fn token_logprobs(choice: &Value) -> Vec<f32> {
    choice["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 2e-3, "{what}: {got:?} vs {want:?}");
    }
}

async fn complete(s: &Server, model: &str) -> Value {
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/completions").json(&json!({
            "model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0
        })))
        .await;
    assert_eq!(st, StatusCode::OK, "completion on {model}: {v}");
    v
}

/// `/v1/scores` on `model`: every choice's log-likelihood equals the one `m` gives here.
async fn check_scores(s: &Server, model: &str, m: &Mamba2ForCausalLM, tok: &Tokenizer) {
    let items = json!([
        {"context": "The mamba slides", "choices": [" over", " under the warm stone"]},
        {"context": "It sings", "choices": [" songs", " nothing"]},
    ]);
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/scores").json(&json!({
            "model": model, "items": items, "batch_size": 2
        })))
        .await;
    assert_eq!(st, StatusCode::OK, "scores on {model}: {v}");
    for (i, item) in items.as_array().expect("items").iter().enumerate() {
        let ctx = tok
            .encode(item["context"].as_str().expect("context"))
            .expect("encode");
        for (k, ch) in item["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .enumerate()
        {
            let c: Vec<u32> = tok
                .inner()
                .encode(ch.as_str().expect("choice"), false)
                .expect("encode")
                .get_ids()
                .to_vec();
            let ids: Vec<u32> = ctx.iter().chain(&c).copied().collect();
            let t = Tensor::new(ids.as_slice(), m.device())
                .and_then(|t| t.unsqueeze(0))
                .expect("ids");
            let logits = m
                .forward(&t, None)
                .and_then(|l| Ok(l.squeeze(0)?))
                .expect("forward");
            let mut want = 0f64;
            for (j, id) in c.iter().enumerate() {
                let row: Vec<f32> = logits
                    .get(ctx.len() + j - 1)
                    .and_then(|r| r.to_vec1())
                    .expect("row");
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = row
                    .iter()
                    .map(|x| f64::from(x - max).exp())
                    .sum::<f64>()
                    .ln();
                want += f64::from(row[*id as usize] - max) - lse;
            }
            let got = &v["data"][i]["choices"][k];
            let lp = got["logprob"].as_f64().expect("logprob");
            assert!((lp - want).abs() < 1e-3, "{model}: {got} vs {want}");
            assert_eq!(got["tokens"], c.len(), "{model}: {got}");
        }
    }
}

async fn mamba2_service(backend: Backend) {
    let label = backend.label;
    let s = Server::start(ServeOptions {
        backend,
        workers: 1,
        lease_seconds: 10,
        ..ServeOptions::default()
    })
    .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    for (id, dir) in mamba2_bases(tmp.path()) {
        let m = s.register_model(&id, &dir).await;
        assert_eq!(m["id"], id.as_str(), "{m}");
        let tok = Tokenizer::from_model_dir(&dir)
            .expect("tokenizer")
            .expect("tokenizer.json");
        let prompt = tok.encode(PROMPT).expect("encode");
        let base = Mamba2ForCausalLM::load(&dir, &LoadOptions::default()).expect("base");

        // The base itself, served through the shared batch.
        let (want, want_lps) = reference(&base, &prompt, 6);
        let v = complete(&s, &id).await;
        let c = &v["choices"][0];
        assert_eq!(
            c["text"],
            tok.decode(&want, true).expect("decode"),
            "{label}"
        );
        assert_close(&token_logprobs(c), &want_lps, &format!("{label} {id} base"));
        check_scores(&s, &id, &base, &tok).await;

        let (st, file) = s.upload("train.jsonl", dataset()).await;
        assert_eq!(st, StatusCode::OK, "{file}");
        let file_id = file["id"].as_str().expect("file id").to_string();
        let methods = [
            json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": 4}),
            json!({"type": "prodial", "targets": "both", "r_b": {"in_proj": 4, "out_proj": 4}, "r_eps": 2}),
        ];
        for (k, method) in methods.iter().enumerate() {
            let what = format!("{label} {id} {}", method["type"]);
            let (st, job) = s
                .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
                    "model": id,
                    "training_file": file_id,
                    "method": method,
                    "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 0.01},
                    "seed": 3 + k,
                    "suffix": format!("m2-{k}"),
                })))
                .await;
            assert_eq!(st, StatusCode::OK, "{what}: {job}");
            assert!(
                job["trainable_parameters"].as_i64().unwrap_or(0) > 0,
                "{job}"
            );
            let job_id = job["id"].as_str().expect("id").to_string();
            let job = s.wait_job(&job_id, Duration::from_secs(240)).await;
            assert_eq!(
                job["status"],
                "succeeded",
                "{what}: {job}\n{}",
                s.log_text()
            );
            let ft = job["fine_tuned_model"]
                .as_str()
                .expect("ft model")
                .to_string();
            let adapter_id = job["adapter_id"].as_str().expect("adapter id").to_string();

            // The downloaded adapter applied here is what the service must reproduce.
            let dest = tmp.path().join(format!("{id}-adapter-{k}"));
            s.download_adapter(&ft, &dest);
            let adapter = trainer::peft::Adapter::load(&dest, &base).expect("adapter loads");
            let adapted = adapter.apply(&base).expect("apply");
            // Training moved the adapter off its function-preserving start.
            let ids = Tensor::new(prompt.as_slice(), base.device())
                .and_then(|t| t.unsqueeze(0))
                .expect("ids");
            let moved = (adapted.forward(&ids, None).expect("adapted")
                - base.forward(&ids, None).expect("base"))
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
            assert!(
                moved > 1e-5,
                "{what}: the trained adapter leaves the logits as they were"
            );
            let (toks, lps) = reference(&adapted, &prompt, 6);

            // Hot-swapped.
            let v = complete(&s, &ft).await;
            let c = &v["choices"][0];
            assert_eq!(
                c["text"],
                tok.decode(&toks, true).expect("decode"),
                "{what}"
            );
            assert_close(&token_logprobs(c), &lps, &format!("{what} hot-swapped"));
            check_scores(&s, &ft, &adapted, &tok).await;

            // Merged: the same tokens; the download is a Mamba2ForCausalLM checkpoint.
            let (st, m) = s
                .call(s.req(Method::POST, &format!("/v1/adapters/{adapter_id}/merge")))
                .await;
            assert_eq!(st, StatusCode::OK, "{what}: {m}");
            let merged = m["id"].as_str().expect("merged id").to_string();
            let v = complete(&s, &merged).await;
            let c = &v["choices"][0];
            assert_eq!(
                c["text"],
                tok.decode(&toks, true).expect("decode"),
                "{what} merged"
            );
            assert_close(&token_logprobs(c), &lps, &format!("{what} merged"));
            let mdir = tmp.path().join(format!("{id}-merged-{k}"));
            std::fs::create_dir_all(&mdir).expect("dir");
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                let res = s
                    .req(Method::GET, &format!("/v1/models/{merged}/files/{f}"))
                    .send()
                    .await
                    .expect("download");
                assert_eq!(res.status(), StatusCode::OK, "{what}: {f}");
                std::fs::write(mdir.join(f), res.bytes().await.expect("bytes")).expect("write");
            }
            let config = fixtures::read_json(&mdir.join("config.json"));
            assert_eq!(config["model_type"], "mamba2", "{what}: {config}");
            assert_eq!(config["architectures"][0], "Mamba2ForCausalLM", "{config}");
            let loaded = Mamba2ForCausalLM::load(&mdir, &LoadOptions::default())
                .expect("the merged checkpoint loads");
            let (t2, l2) = reference(&loaded, &prompt, 6);
            assert_eq!(t2, toks, "{what}: merged download");
            assert_close(&l2, &lps, &format!("{what} merged download"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mamba2_trains_and_serves_on_sqlite_and_local_files() {
    mamba2_service(Backend::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mamba2_trains_and_serves_on_postgres_and_s3() {
    match Backend::postgres_s3() {
        Some(b) => mamba2_service(b).await,
        None => eprintln!(
            "skipped: set MOLT_TEST_DATABASE_URL and MOLT_TEST_S3_ENDPOINT (scripts/test-services.sh does)"
        ),
    }
}
