//! `molt bench serve`: the serving engine's speed (issue 5), without HTTP in the way.
//!
//! On the demo model (`--model-dir`, default `models/demo`) or a random-init mamba-130m
//! shape (`--shape 130m`), through the same continuous-batching scheduler the API uses:
//! generation tokens/s with `--sequences` sequences in flight on the base model, on a merged
//! LoRA, and hot-swapped with 1, 8 and 64 distinct LoRA adapters (sequence i on adapter
//! i mod k); a cold adapter's load time (from a local blob store: download, parse, apply)
//! and its time to first token; and the bytes one resident adapter costs.
//!
//! The generation variants are measured in `--rounds` interleaved rounds (median reported),
//! so a noisy machine slows them alike; `hot_swapped_K_over_merged` is the ratio the issue's
//! target is stated in.
//!
//! Output: one JSON object per line on stdout (`side`, `shape`, `metric`, `value`, `unit`,
//! plus the settings); a summary on stderr. Numbers go to BENCHMARKS.md only from a quiet
//! machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tokio::sync::mpsc;
use trainer::model::{AnyLm, Checkpoint, LoadOptions, MambaConfig, MambaForCausalLM};
use trainer::peft::{Adapter, AdapterSpec};

use api::serving::scheduler::SeqParams;
use api::serving::{LoadedAdapter, Scheduler, SeqEvent, SeqRequest, ServedModel, Stats};

/// Which model to serve.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeShape {
    /// The demo model folder (`--model-dir`).
    Demo,
    /// Random-init mamba-130m shape (hidden 768, 24 layers, vocab 50280).
    #[value(name = "130m")]
    M130,
}

/// Arguments of `molt bench serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeArgs {
    #[arg(
        long,
        env = "MOLT_BENCH_SERVE_SHAPE",
        value_enum,
        default_value = "demo"
    )]
    pub shape: ServeShape,

    /// The model folder for `--shape demo`.
    #[arg(long, env = "MOLT_BENCH_SERVE_MODEL", default_value = "models/demo")]
    pub model_dir: PathBuf,

    /// Sequences in flight per measurement.
    #[arg(long, env = "MOLT_BENCH_SERVE_SEQUENCES", default_value_t = 64)]
    pub sequences: usize,

    /// Tokens generated per sequence.
    #[arg(long, env = "MOLT_BENCH_SERVE_TOKENS", default_value_t = 32)]
    pub gen_tokens: usize,

    /// Prompt length in tokens.
    #[arg(long, env = "MOLT_BENCH_SERVE_PROMPT", default_value_t = 16)]
    pub prompt_tokens: usize,

    /// LoRA rank of the benchmark adapters (on in_proj and out_proj).
    #[arg(long, env = "MOLT_BENCH_SERVE_RANK", default_value_t = 8)]
    pub rank: usize,

    /// Distinct hot-swapped adapters to measure with (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub adapters: Vec<usize>,

    /// Rounds: each round measures every variant once, in turn, so machine noise falls on
    /// all of them alike, and loads the cold adapter once; each figure is the median over
    /// rounds.
    #[arg(long, env = "MOLT_BENCH_SERVE_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
}

fn base_model(a: &BenchServeArgs) -> Result<(MambaForCausalLM, &'static str)> {
    Ok(match a.shape {
        ServeShape::Demo => (
            MambaForCausalLM::load(&a.model_dir, &LoadOptions::default())
                .with_context(|| format!("loading {}", a.model_dir.display()))?,
            "demo",
        ),
        ServeShape::M130 => (
            Checkpoint::random(
                &MambaConfig::new(768, 24, 50280),
                0,
                &candle_core::Device::Cpu,
            )?
            .into_frozen()?,
            "130m",
        ),
    })
}

/// A LoRA with every tensor moved off its (zero) init, so it costs what a trained one does.
fn lora(base: &AnyLm, rank: usize, seed: u64) -> Result<Adapter> {
    let spec = AdapterSpec::from_value(
        &json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": rank}),
    )?;
    let a = Adapter::init(&spec, base, seed)?;
    for v in a.vars().values() {
        let t = v.as_tensor();
        v.set(&(t + 0.01)?)?;
    }
    Ok(a)
}

/// Runs `models[i % len]` for `n` sequences through one scheduler; returns (tokens/s,
/// mean time to first token in s).
fn run_batch(models: &[ServedModel], a: &BenchServeArgs, vocab: usize) -> Result<(f64, f64)> {
    let stats = Arc::new(Stats::default());
    let n = a.sequences.max(1);
    let sched = Scheduler::start("bench", n, n, stats);
    let mut rxs = Vec::with_capacity(n);
    let mut reqs = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt = (0..a.prompt_tokens.max(1))
            .map(|k| ((i * 31 + k * 7) % vocab) as u32)
            .collect();
        reqs.push(SeqRequest {
            model: models[i % models.len()].clone(),
            prompt,
            // Never stops early: every sequence makes exactly gen_tokens tokens.
            params: SeqParams::greedy(a.gen_tokens.max(1)),
            tx,
        });
        rxs.push(rx);
    }
    let start = Instant::now();
    sched
        .submit(reqs)
        .map_err(|_| anyhow::anyhow!("the scheduler refused the batch"))?;
    let mut tokens = 0usize;
    let mut ttft = 0f64;
    for mut rx in rxs {
        let mut first = true;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                SeqEvent::Token(_) => {
                    if first {
                        ttft += start.elapsed().as_secs_f64();
                        first = false;
                    }
                    tokens += 1;
                }
                SeqEvent::Done(_) => break,
                SeqEvent::Failed(m) => anyhow::bail!("generation failed: {m}"),
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((tokens as f64 / secs, ttft / n as f64))
}

fn emit(shape: &str, metric: &str, value: f64, unit: &str, a: &BenchServeArgs) {
    println!(
        "{}",
        json!({
            "side": "molt", "shape": shape, "metric": metric, "value": value, "unit": unit,
            "sequences": a.sequences, "gen_tokens": a.gen_tokens,
            "prompt_tokens": a.prompt_tokens, "rank": a.rank,
        })
    );
    eprintln!("{shape:>5} {metric:<32} {value:>12.3} {unit}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark; see the module docs.
pub fn run(a: BenchServeArgs) -> Result<()> {
    ensure!(a.sequences >= 1, "--sequences must be at least 1");
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    let (base, shape) = base_model(&a)?;
    let base = Arc::new(AnyLm::from(base));
    let vocab = base.vocab_size();
    let mut variants: Vec<(String, Vec<ServedModel>)> = Vec::new();
    variants.push((
        "generate_base".into(),
        vec![ServedModel {
            key: "base".into(),
            model: base.clone(),
            initial_state: None,
            pin: None,
            shared_base: Some(base.clone()),
        }],
    ));
    let merged = lora(&base, a.rank, 1)?.merge(base.as_ref())?.model()?;
    variants.push((
        "generate_merged".into(),
        vec![ServedModel {
            key: "merged".into(),
            model: Arc::new(merged),
            initial_state: None,
            pin: None,
            shared_base: None,
        }],
    ));

    let max_k = a.adapters.iter().copied().max().unwrap_or(1).max(1);
    let mut loaded = Vec::with_capacity(max_k);
    for k in 0..max_k {
        let ad = lora(&base, a.rank, 100 + k as u64)?;
        let la = LoadedAdapter::new(&format!("bench-{k}"), ad, &base)?;
        loaded.push(Arc::new(la));
    }
    if let Some(first) = loaded.first() {
        ensure!(
            first.shared_base.is_some(),
            "a LoRA adapter should share the base's decode batch"
        );
        emit(
            shape,
            "resident_bytes_per_adapter",
            first.bytes as f64,
            "bytes",
            &a,
        );
    }
    for &k in &a.adapters {
        let models = loaded
            .iter()
            .take(k.max(1))
            .map(|l| ServedModel::adapter(l.clone()))
            .collect();
        variants.push((format!("generate_hot_swapped_{k}"), models));
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..a.rounds {
        for (v, r) in variants.iter().zip(&mut results) {
            r.push(run_batch(&v.1, &a, vocab)?.0);
        }
    }
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    for ((name, _), tps) in variants.iter().zip(&medians) {
        emit(shape, name, *tps, "tokens/s", &a);
    }
    // Hot-swapped relative to merged, the issue's target (≥ 0.9).
    if let Some(&merged) = medians.get(1) {
        for ((name, _), tps) in variants.iter().zip(&medians).skip(2) {
            let k = name.trim_start_matches("generate_hot_swapped_");
            emit(
                shape,
                &format!("hot_swapped_{k}_over_merged"),
                tps / merged,
                "ratio",
                &a,
            );
        }
    }

    // A cold adapter: saved to a local blob store, then downloaded, parsed and applied, as
    // the first request for it does; then its first token.
    let tmp = std::env::temp_dir().join(format!("molt-bench-serve-{}", std::process::id()));
    let src = tmp.join("src");
    lora(&base, a.rank, 7)?.save(&src)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = storage::BlobStore::from_url(&tmp.join("store").display().to_string())?;
    rt.block_on(store.upload_dir(&src, "adapters/cold"))?;
    // Each round loads it afresh (a new folder, a new model); the medians are reported.
    let one = BenchServeArgs {
        sequences: 1,
        gen_tokens: 1,
        ..a.clone()
    };
    let (mut loads, mut firsts) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let start = Instant::now();
        let dir = tmp.join(format!("cold-{round}"));
        rt.block_on(store.download_dir("adapters/cold", &dir))?;
        let cold = Adapter::load(&dir, base.as_ref())?;
        let cold = Arc::new(LoadedAdapter::new("cold", cold, &base)?);
        let load_s = start.elapsed().as_secs_f64();
        let (_, ttft) = run_batch(&[ServedModel::adapter(cold)], &one, vocab)?;
        loads.push(load_s * 1e3);
        firsts.push((load_s + ttft) * 1e3);
    }
    emit(shape, "cold_adapter_load", median(loads), "ms", &a);
    emit(
        shape,
        "cold_adapter_time_to_first_token",
        median(firsts),
        "ms",
        &a,
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
