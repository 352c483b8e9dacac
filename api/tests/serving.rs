//! Serving against a real `molt serve`: completions and scores on the demo model, with
//! adapters of every method family hot-swapped onto it. The adapters are made here
//! (`Adapter::init` with every tensor moved off its initial value), put in the server's blob
//! store and recorded in its database, exactly as a finished job leaves them; the expected
//! numbers come from the trainer's own API (`Adapter::load` + `apply`, `generate`,
//! `forward`) on the same files.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{D, DType, Device, Tensor};
use common::{ServeOptions, Server, assert_error, repo_root};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use storage::{BlobStore, Db, NewAdapter};
use trainer::generate::{GenerationConfig, generate};
use trainer::model::{LoadOptions, MambaForCausalLM};
use trainer::peft::{Adapter, AdapterSpec};
use trainer::tokenizer::Tokenizer;

const PROMPT: &str = "It is a truth universally acknowledged";

fn demo_dir() -> PathBuf {
    repo_root().join("models/demo")
}

fn base_model() -> MambaForCausalLM {
    MambaForCausalLM::load(&demo_dir(), &LoadOptions::default()).expect("demo model")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&demo_dir().join("tokenizer.json")).expect("tokenizer")
}

/// One adapter spec per method family.
fn family_specs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "lora",
            json!({"type": "lora", "targets": "in_proj", "r": 4}),
        ),
        (
            "dora",
            json!({"type": "dora", "targets": ["in_proj", "out_proj"], "r": 4}),
        ),
        (
            "prodial",
            json!({"type": "prodial", "targets": ["in_proj"], "r_b": {"in_proj": 8}, "r_eps": 2}),
        ),
        ("partial", json!({"type": "partial", "target": "A_log"})),
        (
            "prompt",
            json!({"type": "prompt", "n": 4, "kind": "prefix"}),
        ),
        ("affix", json!({"type": "affix", "n": 3, "kind": "prefix"})),
        (
            "additional_scan",
            json!({"type": "additional_scan", "n_add": 2}),
        ),
        (
            "parallel_adapter",
            json!({"type": "parallel_adapter", "r": 4}),
        ),
    ]
}

/// An adapter of `spec` whose every tensor is moved by seeded noise (so it changes the
/// model), saved to `dir` and loaded back as the server will load it.
fn make_adapter(spec: &Value, base: &MambaForCausalLM, seed: u64, dir: &Path) -> Adapter {
    let spec = AdapterSpec::from_value(spec).unwrap_or_else(|e| panic!("spec {spec}: {e}"));
    let a = Adapter::init(&spec, base, seed).expect("init");
    for (i, (_, v)) in a.vars().iter().enumerate() {
        let t = v.as_tensor();
        let noise = Tensor::randn(0f32, 1.0, t.dims(), &Device::Cpu)
            .and_then(|n| n.to_dtype(t.dtype()))
            .expect("noise");
        let scale = 0.05 * (1.0 + (i % 3) as f64);
        let moved = (t + (noise * scale).expect("scale")).expect("add");
        v.set(&moved).expect("set");
    }
    a.save(dir).expect("save");
    Adapter::load(dir, base).expect("load back")
}

/// A running server with the demo model registered, plus direct handles to its database
/// and blob store (to record adapters as a job would).
struct Env {
    server: Server,
    db: Db,
    blobs: BlobStore,
    tenant_id: String,
    base: MambaForCausalLM,
    tok: Tokenizer,
    tmp: tempfile::TempDir,
}

impl Env {
    async fn start(extra_args: &[&str]) -> Env {
        let server = Server::start(ServeOptions {
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            ..ServeOptions::default()
        })
        .await;
        server.register_model("demo", &demo_dir()).await;
        let db = Db::connect(&server.data_dir.join("molt.db").display().to_string())
            .await
            .expect("db");
        let blobs = BlobStore::from_url(&server.data_dir.join("blobs").display().to_string())
            .expect("blobs");
        let tenant_id = db
            .authenticate(&server.key)
            .await
            .expect("auth")
            .expect("key")
            .tenant_id;
        Env {
            server,
            db,
            blobs,
            tenant_id,
            base: base_model(),
            tok: tokenizer(),
            tmp: tempfile::tempdir().expect("tmp"),
        }
    }

    /// Makes, stores and records an adapter; returns (name, id, reference adapter).
    async fn adapter(&self, family: &str, spec: &Value, seed: u64) -> (String, String, Adapter) {
        let dir = self.tmp.path().join(format!("{family}-{seed}"));
        let a = make_adapter(spec, &self.base, seed, &dir);
        let prefix = format!("adapters/test/{family}-{seed}");
        let blobs = self.blobs.upload_dir(&dir, &prefix).await.expect("upload");
        let name = format!("ft:demo:{family}:{seed}");
        let row = self
            .db
            .create_adapter(NewAdapter {
                tenant_id: self.tenant_id.clone(),
                job_id: None,
                base_model: "demo".into(),
                name: name.clone(),
                object_prefix: prefix,
                bytes: blobs.iter().map(|b| b.size as i64).sum(),
                config: a.spec().to_value(),
            })
            .await
            .expect("adapter row");
        (name, row.id, a)
    }

    async fn complete(&self, body: Value) -> Value {
        let (s, v) = self
            .server
            .call(self.server.req(Method::POST, "/v1/completions").json(&body))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}: {v}");
        v
    }

    /// Six greedy tokens of `PROMPT` from `model`, with their log-probabilities.
    async fn greedy(&self, model: &str) -> Value {
        self.complete(json!({"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}))
            .await
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .server
            .http
            .get(format!("{}/metrics", self.server.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }
}

/// Greedy tokens and per-token log-probabilities from the trainer's generate.
fn reference(model: &MambaForCausalLM, prompt: &[u32], max: usize) -> (Vec<u32>, Vec<f32>) {
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
            let lsm = candle_nn_free_log_softmax(&l);
            lsm[*t as usize]
        })
        .collect();
    (toks, lps)
}

/// log softmax of the first row of `[1, V]` logits.
fn candle_nn_free_log_softmax(l: &Tensor) -> Vec<f32> {
    let max = l.max_keepdim(D::Minus1).expect("max");
    let s = l.broadcast_sub(&max).expect("sub");
    let lse = s
        .exp()
        .and_then(|e| e.sum_keepdim(D::Minus1))
        .and_then(|e| e.log())
        .expect("lse");
    s.broadcast_sub(&lse)
        .and_then(|x| x.squeeze(0))
        .and_then(|x| x.to_vec1::<f32>())
        .expect("lsm")
}

/// `log p(choice | context)` under `m` and the choice's token count, as `/v1/scores` defines it.
fn choice_logprob(
    m: &MambaForCausalLM,
    tok: &Tokenizer,
    context: &str,
    choice: &str,
) -> (f64, usize) {
    let ctx = tok.encode(context).expect("context");
    let c: Vec<u32> = tok
        .inner()
        .encode(choice, false)
        .expect("choice")
        .get_ids()
        .to_vec();
    let ids: Vec<u32> = ctx.iter().chain(&c).copied().collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0));
    let logits = m
        .forward(&t.expect("ids"), None)
        .and_then(|l| Ok(l.squeeze(0)?))
        .expect("forward");
    let mut sum = 0f64;
    for (k, id) in c.iter().enumerate() {
        let row = logits
            .get(ctx.len() + k - 1)
            .and_then(|r| r.unsqueeze(0))
            .expect("row");
        sum += f64::from(candle_nn_free_log_softmax(&row)[*id as usize]);
    }
    (sum, c.len())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swapped_adapters_match_the_adapted_model() {
    let env = Env::start(&[]).await;
    let prompt = env.tok.encode(PROMPT).expect("encode");
    let (base_toks, base_lps) = reference(&env.base, &prompt, 6);
    let base = env.greedy("demo").await;
    assert_eq!(base["object"], "text_completion");
    assert_eq!(
        base["choices"][0]["text"],
        env.tok.decode(&base_toks, true).expect("decode")
    );
    assert_close(&token_logprobs(&base["choices"][0]), &base_lps, "base");
    assert_eq!(base["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(base["usage"]["completion_tokens"], base_toks.len());

    for (i, (family, spec)) in family_specs().into_iter().enumerate() {
        let (name, id, adapter) = env.adapter(family, &spec, 10 + i as u64).await;
        let adapted = adapter.apply(&env.base).expect("apply");
        let (toks, lps) = reference(&adapted, &prompt, 6);
        // The adapter changes the model (or the test would prove nothing).
        assert!(
            lps.iter().zip(&base_lps).any(|(a, b)| (a - b).abs() > 1e-3) || toks != base_toks,
            "{family}: the adapter does not change the output"
        );
        for model in [&name, &id] {
            let v = env.greedy(model).await;
            let c = &v["choices"][0];
            assert_eq!(v["model"], *model);
            assert_eq!(
                c["text"],
                env.tok.decode(&toks, true).expect("decode"),
                "{family} via {model}"
            );
            assert_close(&token_logprobs(c), &lps, family);
        }
    }
    assert!(env.metric("molt_adapter_cache_hits_total").await >= 8.0);
    assert_eq!(env.metric("molt_adapter_loads_total").await, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_equals_the_requests_one_at_a_time() {
    let env = Env::start(&[]).await;
    let specs = family_specs();
    let mut models = vec!["demo".to_string()];
    // Shared-batch adapters (LoRA twice, ParallelAdapter) beside ones that run on their own
    // weights (DoRA, ProDiaL, partial tuning).
    let families = [
        "lora",
        "dora",
        "prodial",
        "partial",
        "parallel_adapter",
        "lora",
    ];
    for (i, family) in families.into_iter().enumerate() {
        let spec = &specs.iter().find(|(f, _)| *f == family).expect("family").1;
        models.push(env.adapter(family, spec, 30 + i as u64).await.0);
    }
    let bodies: Vec<Value> = models
        .iter()
        .flat_map(|m| {
            [
                json!({"model": m, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 1}),
                json!({"model": m, "prompt": ["Mr. Darcy", "She"], "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7, "n": 2, "logprobs": 1}),
            ]
        })
        .collect();
    let mut alone = Vec::new();
    for b in &bodies {
        alone.push(env.complete(b.clone()).await);
    }
    let (steps, rows, groups) = (
        env.metric("molt_serving_decode_steps_total").await,
        env.metric("molt_serving_decode_rows_total").await,
        env.metric("molt_serving_decode_groups_total").await,
    );
    let together = futures::future::join_all(bodies.iter().map(|b| env.complete(b.clone()))).await;
    // They did run together: more sequences per step on average than any one request has.
    let steps = env.metric("molt_serving_decode_steps_total").await - steps;
    let rows = env.metric("molt_serving_decode_rows_total").await - rows;
    let groups = env.metric("molt_serving_decode_groups_total").await - groups;
    assert!(rows / steps > 4.0, "mean batch {}", rows / steps);
    // The base and the three additive adapters share one model pass: at most 4 passes per
    // step for 7 models.
    assert!(
        groups / steps <= 4.0,
        "mean passes per step {}",
        groups / steps
    );
    for (a, t) in alone.iter().zip(&together) {
        let (ca, ct) = (
            a["choices"].as_array().unwrap(),
            t["choices"].as_array().unwrap(),
        );
        assert_eq!(ca.len(), ct.len());
        for (x, y) in ca.iter().zip(ct) {
            assert_eq!(x["text"], y["text"], "{a} vs {t}");
            assert_eq!(x["finish_reason"], y["finish_reason"]);
            assert_close(&token_logprobs(x), &token_logprobs(y), "batched");
        }
    }
    // Seeded sampling: choice 1 of a prompt uses seed + 1, so the two differ (almost surely).
    let sampled = &alone[1]["choices"];
    assert_eq!(sampled.as_array().unwrap().len(), 4);
    assert_ne!(sampled[0]["text"], sampled[1]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_a_tiny_budget_and_the_warm_routes() {
    let env = Env::start(&["--adapter-cache-bytes", "1"]).await;
    let specs = family_specs();
    let (a_name, a_id, _) = env.adapter("lora", &specs[0].1, 1).await;
    let (_, b_id, _) = env.adapter("lora", &specs[0].1, 2).await;
    let s = &env.server;
    let (st, v) = s
        .call(s.req(Method::POST, &format!("/v1/adapters/{a_id}/load")))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["resident"], true);
    let a_bytes = v["bytes"].as_f64().expect("bytes");
    assert!(a_bytes > 0.0);
    assert_eq!(env.metric("molt_adapter_resident_bytes").await, a_bytes);
    // Loading B evicts A: the budget cannot hold both.
    let (st, _) = s
        .call(s.req(Method::POST, &format!("/v1/adapters/{b_id}/load")))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(env.metric("molt_adapter_evictions_total").await, 1.0);
    assert_eq!(env.metric("molt_adapters_resident").await, 1.0);
    assert_eq!(env.metric("molt_adapter_loads_total").await, 2.0);
    // A completion on A loads it again (a miss) and evicts B.
    env.complete(json!({"model": a_name, "prompt": PROMPT, "max_tokens": 2}))
        .await;
    assert_eq!(env.metric("molt_adapter_loads_total").await, 3.0);
    assert_eq!(env.metric("molt_adapter_evictions_total").await, 2.0);
    // Still resident: a hit.
    let hits = env.metric("molt_adapter_cache_hits_total").await;
    env.complete(json!({"model": a_id, "prompt": PROMPT, "max_tokens": 2}))
        .await;
    assert_eq!(
        env.metric("molt_adapter_cache_hits_total").await,
        hits + 1.0
    );
    // Explicit eviction.
    let (st, v) = s
        .call(s.req(Method::DELETE, &format!("/v1/adapters/{a_id}/load")))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["resident"], false);
    assert_eq!(env.metric("molt_adapters_resident").await, 0.0);
    assert_eq!(env.metric("molt_adapter_resident_bytes").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_other_tenants() {
    let env = Env::start(&["--max-prompt-tokens", "8", "--max-new-tokens", "50"]).await;
    let (name, id, _) = env.adapter("lora", &family_specs()[0].1, 3).await;
    let s = &env.server;
    let post =
        |key: &str, body: Value| s.call(s.req_as(key, Method::POST, "/v1/completions").json(&body));
    let key = s.key.clone();
    let (_, other) = s.new_tenant("other").await;
    // Another tenant's adapter is not found, by name or id, for completions and warming.
    for m in [&name, &id] {
        let (st, v) = post(&other, json!({"model": m, "prompt": "a"})).await;
        assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");
        assert_eq!(v["error"]["param"], "model");
    }
    let (st, v) = s
        .call(s.req_as(&other, Method::POST, &format!("/v1/adapters/{id}/load")))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    // `<base>:<adapter>`: served when the base is the adapter's, refused otherwise.
    let (st, v) = post(
        &key,
        json!({"model": format!("demo:{id}"), "prompt": "a", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = post(
        &key,
        json!({"model": format!("demo:{name}"), "prompt": "a", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = post(&key, json!({"model": format!("tiny:{id}"), "prompt": "a"})).await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "adapter_base_mismatch",
    );
    assert_eq!(v["error"]["param"], "model");
    let (st, v) = post(&key, json!({"model": "nope", "prompt": "a"})).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");
    let (st, v) = post(&key, json!({"model": "ft:demo:nope:1", "prompt": "a"})).await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");

    let cases = [
        (
            json!({"model": "demo", "prompt": "a", "temperature": 3}),
            "temperature",
            "invalid_temperature",
        ),
        (
            json!({"model": "demo", "prompt": "a", "top_p": 0}),
            "top_p",
            "invalid_top_p",
        ),
        (
            json!({"model": "demo", "prompt": "a", "n": 0}),
            "n",
            "invalid_n",
        ),
        (
            json!({"model": "demo", "prompt": "a", "max_tokens": 51}),
            "max_tokens",
            "invalid_max_tokens",
        ),
        (
            json!({"model": "demo", "prompt": "a", "max_tokens": 0}),
            "max_tokens",
            "invalid_max_tokens",
        ),
        (
            json!({"model": "demo", "prompt": "a", "logprobs": 6}),
            "logprobs",
            "invalid_logprobs",
        ),
        (
            json!({"model": "demo", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
            "invalid_stop",
        ),
        (
            json!({"model": "demo", "prompt": "a", "echo": true}),
            "echo",
            "unsupported_parameter",
        ),
        (
            json!({"model": "demo", "prompt": 5}),
            "prompt",
            "invalid_prompt",
        ),
        (
            json!({"model": "demo", "prompt": []}),
            "prompt",
            "invalid_prompt",
        ),
        (
            json!({"model": "demo", "prompt": "a", "bogus": 1}),
            "bogus",
            "invalid_request_body",
        ),
        (json!({"prompt": "a"}), "model", "invalid_request_body"),
    ];
    for (body, param, code) in cases {
        let (st, v) = post(&key, body.clone()).await;
        let msg = assert_error(st, &v, StatusCode::BAD_REQUEST, code);
        assert_eq!(v["error"]["param"], param, "{body}: {msg}");
    }
    // Valid by openapi.yaml, refused by the model as OpenAI refuses them (400): a token id
    // outside its vocabulary, a prompt over --max-prompt-tokens.
    for (body, status, code) in [
        (
            json!({"model": "demo", "prompt": [1, 99999]}),
            StatusCode::BAD_REQUEST,
            "invalid_prompt",
        ),
        (
            json!({"model": "demo", "prompt": "one two three four five six seven eight nine ten eleven"}),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
        ),
    ] {
        let (st, v) = post(&key, body.clone()).await;
        let msg = assert_error(st, &v, status, code);
        assert_eq!(v["error"]["param"], "prompt", "{body}: {msg}");
    }
    let res = s
        .req(Method::POST, "/v1/completions")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    let (st, v) = common::json_of(res).await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_json");
    let (st, v) = s
        .call(
            s.req(Method::POST, "/v1/scores")
                .json(&json!({"model": "demo", "items": []})),
        )
        .await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_items");
    let (st, v) = s
        .call(s.req_as(&other, Method::POST, "/v1/scores").json(&json!({
            "model": name, "items": [{"context": "a", "choices": [" b"]}]
        })))
        .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");
    // Nothing was left running.
    assert_eq!(env.metric("molt_serving_sequences_running").await, 0.0);
}

/// Reads server-sent events until `[DONE]`; returns the data payloads.
async fn sse_events(res: reqwest::Response) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            for line in ev.lines() {
                if let Some(d) = line.strip_prefix("data: ") {
                    out.push(d.to_string());
                }
            }
        }
        if out.last().is_some_and(|d| d == "[DONE]") {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_the_plain_answer() {
    let env = Env::start(&[]).await;
    let body =
        json!({"model": "demo", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "n": 2});
    let plain = env.complete(body.clone()).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let res = env
        .server
        .req(Method::POST, "/v1/completions")
        .json(&sbody)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(res).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut texts = [String::new(), String::new()];
    let mut finish = [None, None];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk json");
        assert_eq!(v["object"], "text_completion");
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["text"].as_str().unwrap());
            if !c["finish_reason"].is_null() {
                finish[i] = Some(c["finish_reason"].clone());
            }
        }
    }
    for i in 0..2 {
        assert_eq!(texts[i], plain["choices"][i]["text"].as_str().unwrap());
        assert_eq!(
            finish[i].as_ref(),
            Some(&plain["choices"][i]["finish_reason"])
        );
    }
    assert_eq!(usage, Some(plain["usage"].clone()));

    // A stop sequence cuts the text before it.
    let full = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = full.chars().skip(3).take(2).collect();
    if !stop.trim().is_empty() {
        let v = env
            .complete(json!({"model": "demo", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stop": stop}))
            .await;
        let cut = &full[..full.find(&stop).unwrap()];
        assert_eq!(v["choices"][0]["text"], cut);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_429_and_a_disconnect_frees_the_slot() {
    let env = Env::start(&[
        "--max-batch",
        "1",
        "--max-queue",
        "0",
        "--max-new-tokens",
        "100000",
        "--max-completion-tokens",
        "100000",
    ])
    .await;
    let s = &env.server;
    // A long streamed generation takes the only slot.
    let res = s
        .req(Method::POST, "/v1/completions")
        .json(&json!({"model": "demo", "prompt": PROMPT, "max_tokens": 100000, "temperature": 0, "stream": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    let mut stream = res.bytes_stream();
    let first = stream.next().await.expect("a first event").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    let res = s
        .req(Method::POST, "/v1/completions")
        .json(&json!({"model": "demo", "prompt": "a", "max_tokens": 1}))
        .send()
        .await
        .expect("send");
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let (st, v) = common::json_of(res).await;
    assert_error(st, &v, StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(env.metric("molt_serving_rejected_total").await >= 1.0);
    // The client goes away: its generation stops and the slot frees.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = s
            .call(s.req(Method::POST, "/v1/completions").json(&json!({
                "model": "demo", "prompt": "a", "max_tokens": 1
            })))
            .await;
        if st == StatusCode::OK {
            break;
        }
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The gauge drops when the scheduler retires the sequence, which may be just after the
    // answer went out.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = env.metric("molt_serving_sequences_running").await;
        if running == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "molt_serving_sequences_running stayed at {running}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_match_the_adapted_models_log_likelihoods() {
    let env = Env::start(&[]).await;
    let specs = family_specs();
    let (name, _, adapter) = env.adapter("lora", &specs[0].1, 5).await;
    let adapted = adapter.apply(&env.base).expect("apply");
    let items = json!([
        {"context": "Elizabeth said", "choices": [" yes", " no", " nothing at all"]},
        {"context": "It is a truth", "choices": [" universally", " rarely"]},
    ]);
    for (model, m) in [("demo", &env.base), (name.as_str(), &adapted)] {
        let (st, v) = env
            .server
            .call(env.server.req(Method::POST, "/v1/scores").json(&json!({
                "model": model, "items": items, "batch_size": 2
            })))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        for (i, item) in items.as_array().unwrap().iter().enumerate() {
            let want: Vec<(f64, usize)> = item["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ch| {
                    let ctx = item["context"].as_str().unwrap();
                    choice_logprob(m, &env.tok, ctx, ch.as_str().unwrap())
                })
                .collect();
            let got = &v["data"][i];
            for (k, (sum, n)) in want.iter().enumerate() {
                let c = &got["choices"][k];
                assert!(
                    (c["logprob"].as_f64().unwrap() - sum).abs() < 1e-3,
                    "{c} vs {sum}"
                );
                assert_eq!(c["tokens"], *n);
            }
            let best = want
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (k, w)| if w.0 > b.1 { (k, w.0) } else { b },
                )
                .0;
            assert_eq!(got["chosen"], best);
        }
    }
}

/// `backbone.layers.3.mixer.A_log` → `backbone.layers.{i}.mixer.A_log`.
fn name_template(n: &str) -> String {
    n.split('.')
        .map(|p| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                "{i}"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_models_match_and_download_in_hf_format() {
    let env = Env::start(&[]).await;
    let s = &env.server;
    let prompt = env.tok.encode(PROMPT).expect("encode");
    let specs = family_specs();
    let spec = |f: &str| {
        specs
            .iter()
            .find(|(n, _)| *n == f)
            .expect("family")
            .1
            .clone()
    };
    // (family, prefix_as_initial_state)
    let cases = [
        ("lora", false),
        ("dora", false),
        ("prodial", false),
        ("partial", false),
        ("additional_scan", false),
        ("prompt", false),
        ("prompt", true),
        ("affix", true),
    ];
    // The HF checkpoint's tensor names, as templates over the layer index.
    let fixture = candle_core::safetensors::load(
        repo_root().join("tests/fixtures/tiny/model/model.safetensors"),
        &Device::Cpu,
    )
    .expect("fixture");
    let hf_names: std::collections::BTreeSet<String> =
        fixture.keys().map(|n| name_template(n)).collect();
    let hf_config: Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("tests/fixtures/tiny/model/config.json")).expect("config"),
    )
    .expect("json");
    for (i, (family, fold)) in cases.into_iter().enumerate() {
        let (name, id, adapter) = env.adapter(family, &spec(family), 50 + i as u64).await;
        let adapted = adapter.apply(&env.base).expect("apply");
        let (toks, lps) = reference(&adapted, &prompt, 6);
        let (st, m) = s
            .call(
                s.req(Method::POST, &format!("/v1/adapters/{id}/merge"))
                    .json(&json!({"prefix_as_initial_state": fold})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{family}: {m}");
        let merged = name.replacen("ft:", "merged:", 1);
        assert_eq!(m["id"], merged);
        assert_eq!(m["kind"], "merged");
        let files: Vec<&str> = m["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(files.contains(&f), "{family}: {files:?}");
        }
        assert_eq!(
            files.contains(&"initial_state.safetensors"),
            fold,
            "{files:?}"
        );
        let v = env.greedy(&merged).await;
        let c = &v["choices"][0];
        assert_eq!(
            c["text"],
            env.tok.decode(&toks, true).expect("decode"),
            "{family} merged (fold {fold})"
        );
        assert_close(&token_logprobs(c), &lps, family);
        if fold {
            // Scoring starts every choice from the merged initial state: the numbers of the
            // hot-swapped prefix.
            let items = json!([{"context": "Elizabeth said", "choices": [" yes", " no at all"]}]);
            let mut got = Vec::new();
            for model in [&name, &merged] {
                let (st, v) = s
                    .call(s.req(Method::POST, "/v1/scores").json(&json!({
                        "model": model, "items": items, "batch_size": 2
                    })))
                    .await;
                assert_eq!(st, StatusCode::OK, "{family} scores on {model}: {v}");
                got.push(
                    v["data"][0]["choices"]
                        .as_array()
                        .expect("choices")
                        .iter()
                        .map(|c| c["logprob"].as_f64().expect("logprob"))
                        .collect::<Vec<_>>(),
                );
            }
            assert_eq!(got[0].len(), 2);
            for (a, b) in got[0].iter().zip(&got[1]) {
                assert!(
                    (a - b).abs() < 1e-3,
                    "{family}: {:?} vs {:?}",
                    got[0],
                    got[1]
                );
            }
        }

        // The download is an HF checkpoint: HF's tensor names and config keys, loadable.
        let dir = env.tmp.path().join(format!("download-{i}"));
        std::fs::create_dir_all(&dir).expect("dir");
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            let res = s
                .req(Method::GET, &format!("/v1/models/{merged}/files/{f}"))
                .send()
                .await
                .expect("download");
            assert_eq!(res.status(), StatusCode::OK, "{f}");
            std::fs::write(dir.join(f), res.bytes().await.expect("bytes")).expect("write");
        }
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("weights");
        for n in weights.keys() {
            let t = name_template(n);
            assert!(
                hf_names.contains(&t) || t == "lm_head.weight",
                "{family}: `{n}` is not an HF Mamba tensor name"
            );
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        for k in config.as_object().unwrap().keys() {
            assert!(
                hf_config.get(k).is_some(),
                "{family}: config key `{k}` is not HF's"
            );
        }
        let loaded = MambaForCausalLM::load(&dir, &LoadOptions::default()).expect("loads");
        if family == "additional_scan" {
            assert_eq!(loaded.config().state_size, env.base.config().state_size + 2);
        }
        if !fold && family != "prompt" {
            // Plain weights: the downloaded checkpoint alone is the adapted model.
            let (t2, l2) = reference(&loaded, &prompt, 6);
            assert_eq!(t2, toks, "{family}");
            assert_close(&l2, &lps, family);
        }
    }
    let list = s.get_ok("/v1/models").await;
    let merged: Vec<&Value> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "merged")
        .collect();
    assert_eq!(merged.len(), cases.len());
    // ParallelAdapter has no merged form.
    let (_, id, _) = env
        .adapter("parallel_adapter", &spec("parallel_adapter"), 99)
        .await;
    let (st, v) = s
        .call(s.req(Method::POST, &format!("/v1/adapters/{id}/merge")))
        .await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "adapter_not_mergeable",
    );
    // Another tenant sees none of it.
    let (_, other) = s.new_tenant("other").await;
    let (st, v) = s
        .call(s.req_as(
            &other,
            Method::GET,
            &format!("/v1/models/{}", merged[0]["id"].as_str().unwrap()),
        ))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, v) = s
        .call(
            s.req_as(&other, Method::POST, "/v1/completions")
                .json(&json!({
                    "model": merged[0]["id"], "prompt": "a"
                })),
        )
        .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");
    // Deleting the merged model leaves the adapter.
    let first = merged[0]["id"].as_str().unwrap().to_string();
    let (st, _) = s
        .call(s.req(Method::DELETE, &format!("/v1/models/{first}")))
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = s
        .call(
            s.req(Method::POST, "/v1/completions")
                .json(&json!({"model": first, "prompt": "a"})),
        )
        .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");
}

/// The whole path: a fine-tuning job trains an adapter, and its `fine_tuned_model` serves
/// completions that match the downloaded adapter run by the trainer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_adapter_serves_what_it_learned() {
    let s = Server::start(ServeOptions {
        workers: 1,
        ..ServeOptions::default()
    })
    .await;
    s.register_model("demo", &demo_dir()).await;
    let (st, f) = s.upload("train.jsonl", common::text_dataset(16)).await;
    assert_eq!(st, StatusCode::OK, "{f}");
    let (st, job) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": "demo", "training_file": f["id"],
            "method": {"type": "lora", "targets": "in_proj", "r": 4},
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20}
        })))
        .await;
    assert_eq!(st, StatusCode::OK, "{job}");
    let job = s
        .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(300))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let name = job["fine_tuned_model"].as_str().expect("fine_tuned_model");
    let meta = s.get_ok(&format!("/v1/adapters/{name}")).await;
    let dir = s.data_dir.join("downloaded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in meta["files"].as_array().unwrap() {
        let res = s
            .req(Method::GET, f["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        std::fs::write(
            dir.join(f["name"].as_str().unwrap()),
            res.bytes().await.unwrap(),
        )
        .unwrap();
    }
    let base = base_model();
    let adapted = Adapter::load(&dir, &base).unwrap().apply(&base).unwrap();
    let tok = tokenizer();
    let prompt = "The mamba 3 slides";
    let (toks, lps) = reference(&adapted, &tok.encode(prompt).unwrap(), 8);
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/completions").json(&json!({
            "model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0
        })))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], tok.decode(&toks, true).unwrap());
    assert_close(&token_logprobs(&v["choices"][0]), &lps, "trained");
}

/// Largest |Δ log-probability| between `molt serve --dtype bf16` and the f32 model, per
/// token or per scored choice (the demo model measured 0.0094).
const BF16_LOGPROB_TOL: f64 = 0.05;

/// `molt serve --dtype bf16`: the base and hot-swapped adapters (an additive LoRA and a
/// weight-transforming DoRA, computed on the widened base) answer with the f32 model's greedy
/// tokens, log-probabilities and scores within bf16's rounding; a merge is computed from the
/// f32 checkpoint (its files equal the f32 merge exactly) and served in bf16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_weights_serve_the_f32_answers_within_rounding() {
    let env = Env::start(&["--dtype", "bf16"]).await;
    let s = &env.server;
    let prompt = env.tok.encode(PROMPT).expect("encode");
    let specs = family_specs();
    let mut worst = 0f64;
    let mut close = |got: &[f32], want: &[f32], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            let d = f64::from((g - w).abs());
            worst = worst.max(d);
            assert!(d <= BF16_LOGPROB_TOL, "{what}: {got:?} vs {want:?}");
        }
    };
    let mut models = vec![("demo".to_string(), env.base.clone())];
    let mut adapters = Vec::new();
    for (i, family) in ["lora", "dora"].into_iter().enumerate() {
        let spec = &specs.iter().find(|(n, _)| *n == family).expect("spec").1;
        let (name, id, adapter) = env.adapter(family, spec, 70 + i as u64).await;
        models.push((name, adapter.apply(&env.base).expect("apply")));
        adapters.push((id, adapter));
    }
    let items = json!([
        {"context": "Elizabeth said", "choices": [" yes", " no", " nothing at all"]},
    ]);
    for (model, m) in &models {
        let (toks, lps) = reference(m, &prompt, 6);
        let v = env.greedy(model).await;
        let c = &v["choices"][0];
        assert_eq!(
            c["text"],
            env.tok.decode(&toks, true).expect("decode"),
            "{model}"
        );
        close(&token_logprobs(c), &lps, model);

        let (st, v) = s
            .call(
                s.req(Method::POST, "/v1/scores")
                    .json(&json!({"model": model, "items": items})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        for (k, ch) in items[0]["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .enumerate()
        {
            let (sum, _) =
                choice_logprob(m, &env.tok, "Elizabeth said", ch.as_str().expect("choice"));
            let got = v["data"][0]["choices"][k]["logprob"]
                .as_f64()
                .expect("logprob");
            close(
                &[got as f32],
                &[sum as f32],
                &format!("{model} score of {ch}"),
            );
        }
    }

    let (dora, dora_model) = &models[2];
    let (id, dora_adapter) = &adapters[1];
    let (st, m) = s
        .call(
            s.req(Method::POST, &format!("/v1/adapters/{id}/merge"))
                .json(&json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{m}");
    let merged = dora.replacen("ft:", "merged:", 1);
    let res = s
        .req(
            Method::GET,
            &format!("/v1/models/{merged}/files/model.safetensors"),
        )
        .send()
        .await
        .expect("download");
    assert_eq!(res.status(), StatusCode::OK);
    let got =
        candle_core::safetensors::load_buffer(&res.bytes().await.expect("bytes"), &Device::Cpu)
            .expect("merged weights");
    let want = dora_adapter
        .merge(&env.base)
        .expect("f32 merge")
        .base
        .named_weights();
    for (n, w) in &want {
        let g = got
            .get(n)
            .unwrap_or_else(|| panic!("merged file lacks {n}"));
        assert_eq!(g.dtype(), DType::F32, "{n}");
        let diff = (g - w)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0, "{n}: the merge is not the f32 one");
    }
    let (toks, lps) = reference(dora_model, &prompt, 6);
    let v = env.greedy(&merged).await;
    let c = &v["choices"][0];
    assert_eq!(
        c["text"],
        env.tok.decode(&toks, true).expect("decode"),
        "merged"
    );
    close(&token_logprobs(c), &lps, "merged");
    eprintln!("bf16 serving: largest log-probability difference {worst:.4}");
    assert!(
        worst > 0.0,
        "no difference from f32 at all: is --dtype applied?"
    );
}
