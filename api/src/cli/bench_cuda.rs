//! `molt bench cuda`: the GPU figures of issue 6 on random-init models.
//!
//! * `scan`: the fused selective scan, forward + backward (and forward alone), at a
//!   mamba-130m mixer shape (E 1536, N 16) per `--sizes` entry, in f32 and bf16 inputs:
//!   tokens/s and the achieved memory bandwidth (bytes the kernels must move, see
//!   [`scan_bytes`], over the median time) against the GPU's peak (from the driver's memory
//!   clock and bus width).
//! * `train`: LoRA (r 8 on in_proj + out_proj, AdamW) training-step tokens/s at the 130m
//!   shape, batch × length from `--train-size` (8×512 by default).
//! * `generate`: greedy generation tokens/s at batch 1 and 8.
//!
//! Times are wall-clock medians with the device synchronised around each run. Output: one
//! JSON object per line on stdout (side "molt-cuda"; `bench/pytorch_scan_cuda.py` prints
//! the PyTorch reference scan in the same format); a summary goes to stderr. Needs a build
//! with the `cuda` feature; elsewhere it fails with the device error.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;
use trainer::generate::{GenerationConfig, generate};
use trainer::kernels;
use trainer::model::{Checkpoint, MambaConfig, causal_lm_loss};
use trainer::peft::{Adapter, AdapterSpec};
use trainer::train::AdamW;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaMetric {
    /// Fused scan forward and forward + backward: tokens/s and achieved bandwidth.
    Scan,
    /// LoRA training-step tokens/s at the 130m shape.
    Train,
    /// Greedy generation tokens/s at batch 1 and 8.
    Generate,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchCudaArgs {
    /// The GPU: `cuda:N`.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cuda:0")]
    pub device: String,

    /// What to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "scan,train,generate"
    )]
    pub metrics: Vec<CudaMetric>,

    /// Batch×length list for the scan.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "8x512,1x2048")]
    pub sizes: Vec<(usize, usize)>,

    /// Batch×length of the training step.
    #[arg(long, value_parser = parse_size, default_value = "8x512")]
    pub train_size: (usize, usize),

    /// New tokens per generation run.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,

    /// Timed repetitions per measurement (after two warm-ups); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (b, l) = s
        .split_once('x')
        .ok_or_else(|| format!("'{s}': expected BATCHxLEN, e.g. 8x512"))?;
    let p = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("'{s}': '{v}' is not a positive integer"))
    };
    Ok((p(b)?, p(l)?))
}

/// Median wall time of `reps` runs of `f` after two warm-ups, synchronising the device
/// around each run so that queued kernels are counted.
fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn emit(metric: &str, shape: &str, extra: serde_json::Value) {
    let mut rec = json!({"side": "molt-cuda", "metric": metric, "shape": shape});
    if let (Some(r), Some(e)) = (rec.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    println!("{rec}");
}

/// The GPU's peak DRAM bandwidth in GB/s (2 transfers per memory clock × bus width), or
/// `None` when the driver does not say.
#[cfg(feature = "cuda")]
fn peak_gbps(dev: &Device) -> Option<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let Device::Cuda(d) = dev else { return None };
    let ctx = d.cuda_stream().context().clone();
    let clock_khz = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
        .ok()?;
    let bus_bits = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
        .ok()?;
    Some(2.0 * clock_khz as f64 * 1e3 * bus_bits as f64 / 8.0 / 1e9)
}

#[cfg(not(feature = "cuda"))]
fn peak_gbps(_dev: &Device) -> Option<f64> {
    None
}

/// The bytes the scan kernels must move at least: every input read once and every output
/// written once (forward: u, delta, z in `io` bytes, B, C, A, D, bias and y in f32, plus
/// the chunk-boundary states; backward: the same inputs again twice (recompute and reverse
/// pass), grad y, and the gradients). The per-chunk state workspace of the backward is not
/// counted (it mostly stays in L2), so this is a lower bound of the traffic.
fn scan_bytes(b: usize, l: usize, e: usize, n: usize, io: usize, backward: bool) -> f64 {
    let (ble, bln) = ((b * l * e) as f64, (b * l * n) as f64);
    let io = io as f64;
    let states = (b * e * n * (l.div_ceil(64) + 1)) as f64 * 4.0;
    let fwd = 3.0 * ble * io + 2.0 * bln * 4.0 + ble * 4.0 + states;
    if !backward {
        return fwd;
    }
    let bwd_in = 2.0 * (3.0 * ble * io + 2.0 * bln * 4.0) + ble * 4.0 + states;
    let bwd_out = 3.0 * ble * 4.0 + 2.0 * bln * 4.0;
    fwd + bwd_in + bwd_out
}

fn bench_scan(dev: &Device, args: &BenchCudaArgs) -> Result<()> {
    let (e, n) = (1536, 16);
    let peak = peak_gbps(dev);
    for &(b, l) in &args.sizes {
        for io in [DType::F32, DType::BF16] {
            let r = |shape: (usize, usize, usize), lo: f64, hi: f64| {
                Tensor::rand(lo as f32, hi as f32, shape, dev)
            };
            let u = Var::from_tensor(&r((b, l, e), -1.0, 1.0)?.to_dtype(io)?)?;
            let delta = Var::from_tensor(&r((b, l, e), -3.0, 1.0)?.to_dtype(io)?)?;
            let z = Var::from_tensor(&r((b, l, e), -2.0, 2.0)?.to_dtype(io)?)?;
            let a = Var::from_tensor(&Tensor::rand(-4f32, -0.1, (e, n), dev)?)?;
            let bm = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (b, l, n), dev)?)?;
            let cm = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (b, l, n), dev)?)?;
            let d = Var::from_tensor(&Tensor::ones(e, DType::F32, dev)?)?;
            let bias = Var::from_tensor(&Tensor::zeros(e, DType::F32, dev)?)?;
            let scan = |track: bool| -> Result<Tensor> {
                let t = |v: &Var| {
                    if track {
                        v.as_tensor().clone()
                    } else {
                        v.as_tensor().detach()
                    }
                };
                let (y, _) = kernels::selective_scan(
                    &t(&u),
                    &t(&delta),
                    &t(&a),
                    &t(&bm),
                    &t(&cm),
                    &t(&d),
                    &t(&bias),
                    Some(&t(&z)),
                    None,
                    false,
                )?;
                Ok(y)
            };
            let fwd = time(dev, args.reps, || {
                scan(false)?;
                Ok(())
            })?;
            let fwd_bwd = time(dev, args.reps, || {
                let y = scan(true)?;
                y.to_dtype(DType::F32)?.sum_all()?.backward()?;
                Ok(())
            })?;
            let isz = io.size_in_bytes();
            for (metric, secs, backward) in
                [("scan_fwd", fwd, false), ("scan_fwd_bwd", fwd_bwd, true)]
            {
                let gbps = scan_bytes(b, l, e, n, isz, backward) / secs / 1e9;
                emit(
                    metric,
                    "130m-mixer",
                    json!({
                        "batch": b, "seq": l, "d_inner": e, "d_state": n,
                        "dtype": format!("{io:?}").to_lowercase(),
                        "median_s": secs,
                        "tokens_per_s": (b * l) as f64 / secs,
                        "achieved_gbps": gbps,
                        "peak_gbps": peak,
                        "share_of_peak": peak.map(|p| gbps / p),
                    }),
                );
                eprintln!(
                    "{metric:>13} {b}x{l} {io:?}: {:.3} ms, {:.0} tok/s, {gbps:.0} GB/s{}",
                    secs * 1e3,
                    (b * l) as f64 / secs,
                    peak.map(|p| format!(" ({:.0}% of {p:.0})", 100.0 * gbps / p))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn config_130m() -> MambaConfig {
    MambaConfig::new(768, 24, 50280)
}

fn random_ids(dev: &Device, b: usize, l: usize, vocab: usize) -> Result<Tensor> {
    // A fixed LCG: the ids only need to be valid and not all equal.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let ids: Vec<u32> = (0..b * l)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect();
    Ok(Tensor::from_vec(ids, (b, l), dev)?)
}

fn bench_train(dev: &Device, args: &BenchCudaArgs) -> Result<()> {
    let cfg = config_130m();
    let (b, l) = args.train_size;
    let base = Checkpoint::random(&cfg, 1, dev)?.into_frozen()?;
    let spec = AdapterSpec::from_value(&json!({
        "type": "lora", "targets": ["in_proj", "out_proj"], "r": 8
    }))
    .context("LoRA spec")?;
    let adapter = Adapter::init(&spec, &base, 1).context("LoRA init")?;
    let model = adapter.apply(&base).context("LoRA apply")?;
    adapter.set_training(true);
    let mut opt = AdamW::new(adapter.param_groups(), 1e-4, 0.9, 0.999, 1e-8)?;
    let ids = random_ids(dev, b, l, cfg.vocab_size)?;
    let secs = time(dev, args.reps, || {
        let logits = model.forward(&ids, None)?;
        let loss = causal_lm_loss(&logits, &ids)?;
        let grads = opt.grads_from(&loss.backward()?);
        opt.step(&grads, 1.0)?;
        Ok(())
    })?;
    emit(
        "train_lora",
        "130m",
        json!({"batch": b, "seq": l, "median_s": secs, "tokens_per_s": (b * l) as f64 / secs,
               "trainable_parameters": adapter.trainable_parameters()}),
    );
    eprintln!(
        "   train_lora 130m {b}x{l}: {:.1} ms/step, {:.0} tok/s",
        secs * 1e3,
        (b * l) as f64 / secs
    );
    Ok(())
}

fn bench_generate(dev: &Device, args: &BenchCudaArgs) -> Result<()> {
    let cfg = config_130m();
    let model = Checkpoint::random(&cfg, 1, dev)?.into_frozen()?;
    for batch in [1usize, 8] {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| {
                (0..16)
                    .map(|j| ((i * 131 + j * 17) % 50000) as u32 + 1)
                    .collect()
            })
            .collect();
        let mut gen_cfg = GenerationConfig::for_model(&model);
        gen_cfg.max_new_tokens = args.gen_tokens;
        gen_cfg.temperature = 0.0;
        gen_cfg.eos_token_ids.clear();
        let secs = time(dev, args.reps.min(3), || {
            generate(&model, &prompts, &gen_cfg)?;
            Ok(())
        })?;
        let tps = (batch * args.gen_tokens) as f64 / secs;
        emit(
            "generate",
            "130m",
            json!({"batch": batch, "new_tokens": args.gen_tokens, "median_s": secs,
                   "tokens_per_s": tps}),
        );
        eprintln!(
            "     generate 130m batch {batch}: {tps:.0} tok/s ({} new tokens)",
            args.gen_tokens
        );
    }
    Ok(())
}

pub fn run(args: BenchCudaArgs) -> Result<()> {
    let dev =
        api::training::parse_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    if !dev.is_cuda() {
        bail!(
            "--device {}: molt bench cuda measures a GPU; use cuda:N",
            args.device
        );
    }
    for m in &args.metrics {
        match m {
            CudaMetric::Scan => bench_scan(&dev, &args)?,
            CudaMetric::Train => bench_train(&dev, &args)?,
            CudaMetric::Generate => bench_generate(&dev, &args)?,
        }
    }
    Ok(())
}
