//! `molt bench`: the speed benchmark of issue 2 on random-init Mamba-1 models (and, with
//! `--shapes vim-tiny`, issue 13's Vision Mamba figures: see `bench_vim`).
//!
//! Measures, per model shape (mamba-130m and a small one): forward tokens/s, generation
//! tokens/s, a training-step's tokens/s (LoRA r=8 on in_proj + out_proj with AdamW, and a
//! full fine-tuning step), the peak memory of each, and the fused selective scan against the
//! plain-Candle-op reference scan (forward + backward). It also measures this machine's f32
//! matmul rate (a 1024³ Candle matmul) so that the figures can be read as a share of the peak.
//!
//! Output: one JSON object per line on stdout, in the same format as
//! `bench/pytorch_bench.py` (side, shape, batch, seq, metric, value, unit, plus reps, median_s,
//! cpu_wall, others_cpu, steal, peak_rss_mib), so `bench/run.sh` can put the two side by side.
//! Progress and a readable summary go to stderr.
//!
//! Threads: Candle and the kernels use rayon's pool, sized by `RAYON_NUM_THREADS` (default:
//! physical cores). The thread count in effect is printed in the `env` line; `bench/run.sh`
//! sets it (2 by default) for both sides.
//!
//! Memory: each measurement reports VmHWM after resetting it (`/proc/self/clear_refs`), so it
//! includes the model weights already resident. Freed heap is not always returned to the OS
//! between measurements, so for clean per-shape peaks run one shape per process (run.sh does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use api::serving::WeightDtype;
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value, json};
use trainer::generate::{GenerationConfig, generate};
use trainer::kernels::bench::{BenchShape, scan_fwd, scan_fwd_bwd};
use trainer::model::{CausalLm, Checkpoint, MambaConfig, MambaForCausalLM, Mixer, ModelInput};
use trainer::peft::AdapterSpec;
use trainer::peft::MixerSites;
use trainer::train::data::Batch;
use trainer::train::engine::{MicroBatch, Trainable, optimizer_step};
use trainer::train::full::FullModel;
use trainer::train::{AdamW, AdapterTrainable};

/// The model shapes of issue 2.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// hidden 256, 4 layers, state 16, vocab 50280 (time_step_rank 16, HF's "auto").
    Small,
    /// state-spaces/mamba-130m: hidden 768, 24 layers, state 16, vocab 50280, dt rank 48.
    #[value(name = "130m")]
    M130,
    /// Vision Mamba tiny (224², patch 16, 24 layers, embed 192, state 16, 102 classes):
    /// inference and PEFT training images/s at a batch of `--images` (issue 13).
    #[value(name = "vim-tiny")]
    VimTiny,
    /// state-spaces/mamba2-130m: hidden 768, 24 layers, 24 heads × 64, state 128, one
    /// group, vocab 50288 (issue 14).
    #[value(name = "mamba2-130m")]
    Mamba2M130,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Small => "small",
            Shape::M130 => "130m",
            Shape::VimTiny => "vim-tiny",
            Shape::Mamba2M130 => "mamba2-130m",
        }
    }

    /// The language model's config, or `None` for a vision shape.
    fn config(self) -> Option<MambaConfig> {
        let (hidden, layers) = match self {
            Shape::Small => (256, 4),
            Shape::M130 => (768, 24),
            Shape::VimTiny | Shape::Mamba2M130 => return None,
        };
        // MambaConfig::new gives HF's defaults (state 16, expand 2, conv 4, dt rank
        // ceil(hidden/16) = 48 for 768, no in/out bias, conv bias, tied head): the shapes
        // pytorch_bench.py builds.
        Some(MambaConfig::new(hidden, layers, 50280))
    }
}

/// What to measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// f32 matmul rate of a 1024³ Candle matmul (the machine's peak reference).
    Matmul,
    /// Forward (no autograd) tokens/s at each `--sizes` entry, full logits.
    Forward,
    /// Greedy generation tokens/s at batch 1 and 8.
    Generate,
    /// Training step tokens/s (LoRA r=8 and full fine-tuning), forward + backward + AdamW.
    Train,
    /// Fused selective scan vs the plain-op reference scan, forward + backward.
    Scan,
    /// Training tokens/s, peak memory and trainable parameters of every PEFT method
    /// (issue 3), at each `--sizes` entry. Not in the default set: it takes minutes at 130m.
    Methods,
}

/// Arguments of `molt bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model shapes to measure (comma-separated).
    #[arg(
        long,
        env = "MOLT_BENCH_SHAPES",
        value_enum,
        value_delimiter = ',',
        default_value = "small,130m"
    )]
    pub shapes: Vec<Shape>,

    /// Batch×length list for the forward, training and scan figures.
    #[arg(
        long,
        env = "MOLT_BENCH_SIZES",
        value_delimiter = ',',
        value_parser = parse_size,
        default_value = "1x512,4x128"
    )]
    pub sizes: Vec<(usize, usize)>,

    /// What to measure (comma-separated).
    #[arg(
        long,
        env = "MOLT_BENCH_METRICS",
        value_enum,
        value_delimiter = ',',
        default_value = "matmul,forward,generate,train,scan"
    )]
    pub metrics: Vec<Metric>,

    /// Timed repetitions per measurement (after one warm-up); the median is reported.
    /// Default 5, or 1 with --quick.
    #[arg(long, env = "MOLT_BENCH_REPS")]
    pub reps: Option<usize>,

    /// Stop repeating a measurement once its timed repetitions took this many seconds
    /// (at least one always runs). Default 30, or 0 with --quick.
    #[arg(long, env = "MOLT_BENCH_MAX_SECONDS")]
    pub max_seconds: Option<f64>,

    /// One repetition per measurement and a shorter generation.
    #[arg(long, env = "MOLT_BENCH_QUICK")]
    pub quick: bool,

    /// Tokens generated per sequence (after a 16-token prompt). Default 64, or 16 with --quick.
    #[arg(long, env = "MOLT_BENCH_GEN_TOKENS")]
    pub gen_tokens: Option<usize>,

    /// How the language models keep their matrices in the forward and generate figures
    /// (comma-separated, each measured in turn in this process; `bf16`: see
    /// `molt serve --dtype`). Training always runs in f32.
    #[arg(
        long,
        env = "MOLT_BENCH_WEIGHTS",
        value_enum,
        value_delimiter = ',',
        default_value = "f32"
    )]
    pub weights: Vec<WeightDtype>,

    /// Images per batch for the vision shapes.
    #[arg(long, env = "MOLT_BENCH_IMAGES", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub images: u32,

    /// Seed of the random weights and inputs.
    #[arg(long, env = "MOLT_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
}

fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let (b, l) = s
        .trim()
        .to_ascii_lowercase()
        .split_once('x')
        .map(|(b, l)| (b.to_string(), l.to_string()))
        .ok_or_else(|| format!("expected BATCHxLENGTH like 4x128, got {s:?}"))?;
    let b: usize = b
        .parse()
        .map_err(|_| format!("batch in {s:?} is not a number"))?;
    let l: usize = l
        .parse()
        .map_err(|_| format!("length in {s:?} is not a number"))?;
    if b == 0 || l < 2 {
        // A training step needs two positions for a next-token loss.
        return Err(format!("{s:?}: batch must be ≥ 1 and length ≥ 2"));
    }
    Ok((b, l))
}

/// Prompt length for generation: short, so prefill is a small part of the time (the same
/// value as pytorch_bench.py).
const GEN_PROMPT: usize = 16;
const GEN_BATCHES: [usize; 2] = [1, 8];
const LORA_R: usize = 8;
const LORA_ALPHA: f64 = 16.0;
/// 1024³: big enough to reach gemm's steady state, small enough to time in ~10 ms.
const MATMUL_N: usize = 1024;

/// Runs the benchmark; see the module docs.
pub fn run(args: BenchArgs) -> Result<()> {
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 5 });
    let budget = args
        .max_seconds
        .unwrap_or(if args.quick { 0.0 } else { 30.0 });
    let gen_tokens = args.gen_tokens.unwrap_or(if args.quick { 16 } else { 64 });
    ensure!(reps >= 1, "--reps must be at least 1");
    ensure!(
        budget.is_finite() && budget >= 0.0,
        "--max-seconds must be a finite number ≥ 0"
    );
    ensure!(gen_tokens >= 1, "--gen-tokens must be at least 1");
    let b = Bench {
        reps,
        budget,
        gen_tokens,
        seed: args.seed,
        metrics: args.metrics.clone(),
        sizes: args.sizes.clone(),
        images: args.images as usize,
        weights: args.weights.clone(),
        out: Out,
    };
    b.run(&args.shapes)
}

pub(super) struct Bench {
    pub(super) reps: usize,
    pub(super) budget: f64,
    gen_tokens: usize,
    pub(super) seed: u64,
    metrics: Vec<Metric>,
    pub(super) sizes: Vec<(usize, usize)>,
    pub(super) images: usize,
    weights: Vec<WeightDtype>,
    pub(super) out: Out,
}

impl Bench {
    pub(super) fn wants(&self, m: Metric) -> bool {
        self.metrics.contains(&m)
    }

    fn run(&self, shapes: &[Shape]) -> Result<()> {
        let threads = candle_core::utils::get_num_threads();
        self.out.emit(
            None,
            "env",
            json!(null),
            "",
            &[
                ("threads", json!(threads)),
                ("rayon_threads", json!(rayon_threads())),
                ("reps", json!(self.reps)),
                ("cpu", json!(cpu_model())),
                ("avx2_fma", json!(avx2_fma())),
                ("molt", json!(env!("CARGO_PKG_VERSION"))),
            ],
        );
        if self.wants(Metric::Matmul) {
            self.matmul("start")?;
        }
        for &shape in shapes {
            self.shape(shape)?;
        }
        if self.wants(Metric::Matmul) {
            // Measured again at the end: the two readings bracket the run, and a gap between
            // them shows contention that came or went meanwhile.
            self.matmul("end")?;
        }
        // VmHWM was reset before each measurement, so the process's peak is the largest of
        // the per-measurement peaks (or the current VmHWM, should that be larger).
        let seen = PEAK_SEEN_KIB.load(Ordering::Relaxed) as f64 / 1024.0;
        let peak = peak_rss_mib().map_or(seen, |now| now.max(seen));
        let all = Ctx::new(
            &shapes
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(","),
        );
        self.out.emit(
            Some(&all),
            "process_peak_rss",
            json!(round(peak, 1)),
            "MiB",
            &[],
        );
        Ok(())
    }

    /// A 1024³ f32 matmul: median and best GFLOP/s.
    fn matmul(&self, when: &str) -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), &dev)?;
        a.matmul(&b)?; // warm-up
        let flop = 2.0 * (MATMUL_N as f64).powi(3);
        // Each product is ~10 ms, so many reps cost little and steady the median.
        let m = timed(20, 2.0, || {
            a.matmul(&b)?;
            Ok(())
        })?;
        let median = flop / m.median_s / 1e9;
        let best = flop / m.min_s / 1e9;
        eprintln!("matmul {MATMUL_N}³ ({when}): {median:.1} GFLOP/s median, {best:.1} best");
        self.out.emit(
            None,
            "matmul_gflops",
            json!(round(best, 2)),
            "GFLOP/s",
            &[
                ("when", json!(when)),
                ("n", json!(MATMUL_N)),
                ("median_gflops", json!(round(median, 2))),
                ("reps", json!(m.reps)),
                ("cpu_wall", json!(m.cpu_wall)),
                ("others_cpu", json!(m.others_cpu)),
                ("steal", json!(m.steal)),
            ],
        );
        Ok(())
    }

    fn shape(&self, shape: Shape) -> Result<()> {
        let name = shape.name();
        if shape == Shape::Mamba2M130 {
            return self.mamba2(name, &super::bench_mamba2::mamba2_130m()?);
        }
        let Some(cfg) = shape.config() else {
            return self.vim(name, &super::bench_vim::vim_tiny()?);
        };
        eprintln!(
            "shape {name}: hidden {}, {} layers, E {}, N {}, vocab {}",
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.intermediate_size,
            cfg.state_size,
            cfg.vocab_size
        );
        let dev = Device::Cpu;
        let frozen = Checkpoint::random(&cfg, self.seed, &dev)
            .context("building the random model")?
            .into_frozen()?;
        let params: usize = frozen
            .named_weights()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let at = Ctx::new(name);
        self.out
            .emit(Some(&at), "params", json!(params), "count", &[]);
        self.forward_and_generate(&at, &frozen, cfg.vocab_size)?;

        if self.wants(Metric::Train) {
            self.train_lora(&at, cfg.vocab_size, &frozen)?;
        }
        if self.wants(Metric::Methods) {
            self.methods(&at, &cfg, &frozen)?;
        }
        drop(frozen);
        if self.wants(Metric::Train) {
            self.train_full(&at, &cfg)?;
        }

        if self.wants(Metric::Scan) {
            for &(b, l) in &self.sizes {
                let s = BenchShape {
                    batch: b,
                    len: l,
                    d_inner: cfg.intermediate_size,
                    d_state: cfg.state_size,
                    d_conv: cfg.conv_kernel,
                };
                // The reference scan records every time step as autograd nodes: its
                // forward + backward takes tens of seconds at 1×512 and the 130m width, so one
                // timed run (after the warm-up) is enough for a ratio of 20× or more.
                let mut probe = Probe::start();
                let c = scan_fwd_bwd(&s, self.reps, 1)?;
                let f = scan_fwd(&s, self.reps, self.reps.min(3))?;
                let load = probe.stop();
                for (metric, c) in [("scan_fwd_bwd_speedup", c), ("scan_fwd_speedup", f)] {
                    eprintln!(
                        "{name} {metric} {b}x{l}: fused {:.2} ms, reference {:.2} ms, {:.1}×",
                        c.fused.median_s * 1e3,
                        c.reference.median_s * 1e3,
                        c.speedup()
                    );
                    self.out.emit(
                        Some(&at),
                        metric,
                        json!(round(c.speedup(), 2)),
                        "x",
                        &[
                            ("batch", json!(b)),
                            ("seq", json!(l)),
                            ("fused_s", json!(round(c.fused.median_s, 6))),
                            ("reference_s", json!(round(c.reference.median_s, 6))),
                            ("reps", json!(c.fused.runs)),
                            ("reference_reps", json!(c.reference.runs)),
                            ("cpu_wall", json!(load.cpu_wall)),
                            ("others_cpu", json!(load.others_cpu)),
                            ("steal", json!(load.steal)),
                        ],
                    );
                }
            }
        }
        Ok(())
    }

    /// Forward tokens/s at each `--sizes` entry and greedy generation tokens/s at batch 1
    /// and 8, for a language model of any family, once per `--weights` dtype.
    pub(super) fn forward_and_generate<M: Mixer>(
        &self,
        at: &Ctx,
        frozen: &CausalLm<M>,
        vocab: usize,
    ) -> Result<()> {
        for &w in &self.weights {
            let label = format!("{w:?}").to_lowercase();
            let at = Ctx {
                shape: at.shape.clone(),
                weights: Some(label.clone()),
            };
            // f32 keeps the very tensors (`to_dtype` to the same dtype is a clone).
            let m = frozen.clone().store_weights_as(w.dtype())?;
            self.forward_and_generate_as(&at, &m, vocab)?;
        }
        Ok(())
    }

    fn forward_and_generate_as<M: Mixer>(
        &self,
        at: &Ctx,
        frozen: &CausalLm<M>,
        vocab: usize,
    ) -> Result<()> {
        let at = at.clone();
        let mut rng = Lcg(self.seed ^ 0x9e37_79b9_7f4a_7c15);

        if self.wants(Metric::Forward) {
            for &(b, l) in &self.sizes {
                let input = random_input(&mut rng, b, l, vocab)?;
                let fwd = || -> Result<()> {
                    frozen.forward_with(&input, false)?;
                    Ok(())
                };
                fwd()?;
                let m = timed(self.reps, self.budget, fwd)?;
                self.report(&at, "forward_tokens_per_s", b, l, (b * l) as f64, &m, &[]);
            }
        }

        if self.wants(Metric::Generate) {
            // Decode reads every weight once per step (the tied head included, as the LM
            // head); at the machine's memory read rate that bounds tokens/s.
            let weight_bytes: usize = frozen
                .named_weights()
                .iter()
                .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            // A step also reads each sequence's recurrent state and writes a new one: small
            // for Mamba-1, not for Mamba-2 ([H, P, N] per layer), so the bench reports a
            // second limit that counts that traffic too.
            let state_bytes: usize = frozen
                .new_cache(1)?
                .layers
                .iter()
                .flat_map(|l| [&l.conv, &l.ssm])
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            let read_gbps = memory_read_gbps();
            let per_step_limit = read_gbps * 1e9 / weight_bytes as f64;
            eprintln!(
                "{} memory read {read_gbps:.1} GB/s, {:.0} MB of weights per decode step: \
                 at most {per_step_limit:.1} steps/s",
                at.label(),
                weight_bytes as f64 / 1e6
            );
            // The products alone, as a decode step runs them (`linear_forward` on `b` rows):
            // how close the kernel comes to the read rate, and its share of a step.
            let names = frozen.named_weights();
            let tied = !names.iter().any(|(n, _)| n == "lm_head.weight");
            let matrices: Vec<Tensor> = names
                .into_iter()
                .filter(|(n, _)| {
                    n.ends_with("proj.weight")
                        || n == "lm_head.weight"
                        || (tied && n == "backbone.embeddings.weight")
                })
                .map(|(_, t)| t)
                .collect();
            let matrix_bytes: usize = matrices
                .iter()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            for b in GEN_BATCHES {
                let xs: Vec<Tensor> = matrices
                    .iter()
                    .map(|w| Tensor::ones((b, w.dim(1)?), DType::F32, &Device::Cpu))
                    .collect::<candle_core::Result<_>>()?;
                let products = || -> Result<()> {
                    for (x, w) in xs.iter().zip(&matrices) {
                        trainer::model::layers::linear_forward(x, w, None)?;
                    }
                    Ok(())
                };
                products()?;
                let p = timed(self.reps.max(5), self.budget, products)?;
                let product_s = p.median_s;
                let product_gbps = matrix_bytes as f64 / product_s / 1e9;
                eprintln!(
                    "{} products of one decode step at batch {b}: {:.2} ms, {product_gbps:.1} GB/s",
                    at.label(),
                    product_s * 1e3
                );
                let prompts: Vec<Vec<u32>> =
                    (0..b).map(|_| rng.tokens(GEN_PROMPT, vocab)).collect();
                let gcfg = GenerationConfig {
                    max_new_tokens: self.gen_tokens,
                    // Greedy, and no EOS: a random model may produce one early, and the
                    // figure is for a fixed number of tokens (min_new_tokens on the PyTorch side).
                    eos_token_ids: Vec::new(),
                    ..GenerationConfig::default()
                };
                let new = self.gen_tokens;
                let gen_once = || -> Result<()> {
                    let out = generate(frozen, &prompts, &gcfg)?;
                    ensure!(
                        out.tokens.iter().all(|t| t.len() == new),
                        "generation stopped before {new} tokens"
                    );
                    Ok(())
                };
                gen_once()?;
                let m = timed(self.reps, self.budget, gen_once)?;
                let limit = per_step_limit * b as f64;
                let traffic = (weight_bytes + 2 * b * state_bytes) as f64;
                let traffic_limit = read_gbps * 1e9 / traffic * b as f64;
                let tps = (b * new) as f64 / m.median_s;
                // Step time ≈ the whole generation over its steps (the prompt is short).
                let step_s = m.median_s / new as f64;
                self.report(
                    &at,
                    "generate_tokens_per_s",
                    b,
                    new,
                    (b * new) as f64,
                    &m,
                    &[
                        ("prompt", json!(GEN_PROMPT)),
                        ("memory_read_gbps", json!(round(read_gbps, 2))),
                        ("weight_bytes_per_step", json!(weight_bytes)),
                        ("bandwidth_limit_tokens_per_s", json!(round(limit, 2))),
                        ("share_of_bandwidth_limit", json!(round(tps / limit, 4))),
                        ("state_bytes_per_sequence", json!(state_bytes)),
                        (
                            "weights_and_state_limit_tokens_per_s",
                            json!(round(traffic_limit, 2)),
                        ),
                        (
                            "share_of_weights_and_state_limit",
                            json!(round(tps / traffic_limit, 4)),
                        ),
                        ("products_s_per_step", json!(round(product_s, 6))),
                        ("products_gbps", json!(round(product_gbps, 2))),
                        (
                            "products_share_of_step",
                            json!(round(product_s / step_s, 3)),
                        ),
                    ],
                );
            }
        }

        Ok(())
    }

    /// LoRA r=8 (α=16, PEFT's convention) on every in_proj and out_proj of a frozen model,
    /// trained as `molt train` trains it.
    pub(super) fn train_lora<M: MixerSites>(
        &self,
        at: &Ctx,
        vocab: usize,
        frozen: &CausalLm<M>,
    ) -> Result<()> {
        let spec = AdapterSpec::from_value(&lora_spec())?;
        let t = AdapterTrainable::new(&spec, frozen, self.seed, None)?;
        self.out.emit(
            Some(at),
            "train_lora_trainable_params",
            json!(t.adapter().trainable_parameters()),
            "count",
            &[],
        );
        self.train_steps(at, vocab, &t, "train_lora_tokens_per_s", &[])
    }

    /// Every weight trainable (a `Var`), AdamW on all of them.
    fn train_full(&self, at: &Ctx, cfg: &MambaConfig) -> Result<()> {
        let t = FullModel::new(Checkpoint::random(cfg, self.seed, &Device::Cpu)?, 0.0)?;
        self.train_steps(at, cfg.vocab_size, &t, "train_full_tokens_per_s", &[])
    }

    /// Issue 3's table: every method (the papers' 130m configurations where they give one)
    /// trained at each size, with its trainable-parameter count beside the paper's.
    fn methods(&self, at: &Ctx, cfg: &MambaConfig, frozen: &MambaForCausalLM) -> Result<()> {
        for m in METHODS {
            let v: Value = serde_json::from_str(m.spec)
                .with_context(|| format!("method table entry {}", m.label))?;
            let spec = AdapterSpec::from_value(&v)?;
            let t = AdapterTrainable::new(&spec, frozen, self.seed, None)?;
            let params = t.adapter().trainable_parameters();
            let extra = [
                ("method", json!(m.label)),
                ("spec", v.clone()),
                ("trainable_params", json!(params)),
                ("paper_params", json!(m.paper_params)),
            ];
            self.train_steps(at, cfg.vocab_size, &t, "method_train_tokens_per_s", &extra)?;
        }
        Ok(())
    }

    /// Optimizer steps through the training loop's own step function on random tokens
    /// (every position scored), at each `--sizes` entry.
    pub(super) fn train_steps(
        &self,
        at: &Ctx,
        vocab: usize,
        t: &dyn Trainable,
        metric: &str,
        extra: &[(&str, Value)],
    ) -> Result<()> {
        let groups = t.param_groups()?;
        let mut opt = AdamW::new(groups, 1e-4, 0.9, 0.999, 1e-8)?;
        let mut rng = Lcg(self.seed ^ 0x51ed_270b_a3f1_c3e5);
        for &(b, l) in &self.sizes {
            let ids = Tensor::from_vec(rng.tokens(b * l, vocab), (b, l), &Device::Cpu)?;
            let batch = Batch {
                labels: ids.to_dtype(DType::I64)?,
                input_ids: ids,
                scored: b * (l - 1),
                tokens: b * l,
            };
            let batches = [MicroBatch::Tokens(batch)];
            let mut n = 0u64;
            let mut step = || -> Result<()> {
                n += 1;
                optimizer_step(t, &mut opt, &batches, 1.0, 1.0, n)?;
                Ok(())
            };
            step()?;
            let m = timed(self.reps, self.budget, &mut step)?;
            self.report(at, metric, b, l, (b * l) as f64, &m, extra);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        at: &Ctx,
        metric: &str,
        batch: usize,
        seq: usize,
        tokens: f64,
        m: &Measured,
        extra: &[(&str, Value)],
    ) {
        let tps = tokens / m.median_s;
        eprintln!(
            "{} {metric} {batch}x{seq}: {tps:.1} tokens/s ({} reps, cpu/wall {:.2}, others {:.2}, peak {:.0} MiB)",
            at.label(),
            m.reps,
            m.cpu_wall,
            m.others_cpu,
            m.peak_rss_mib.unwrap_or(f64::NAN)
        );
        let mut fields = vec![("batch", json!(batch)), ("seq", json!(seq))];
        fields.extend(m.fields());
        fields.extend(extra.iter().cloned());
        self.out
            .emit(Some(at), metric, json!(round(tps, 3)), "tokens/s", &fields);
    }
}

/// How fast all threads together read memory (GB/s): the best of five passes summing a
/// 1 GiB buffer, far larger than any cache, split evenly over Candle's threads.
fn memory_read_gbps() -> f64 {
    const LEN: usize = 1 << 28;
    let buf = vec![1.0f32; LEN];
    let threads = candle_core::utils::get_num_threads().max(1);
    let part = LEN.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|sc| {
            let handles: Vec<_> = buf
                .chunks(part)
                .map(|c| sc.spawn(move || sum_lanes(c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (LEN * 4) as f64 / best / 1e9
}

/// A sum in eight independent lanes, which the compiler keeps in vector registers.
fn sum_lanes(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for ch in c.chunks_exact(8) {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += x;
        }
    }
    acc.iter().sum()
}

/// The LoRA of issue 2's training figure: r=8 on in_proj and out_proj, α=16 in PEFT's α/r
/// convention (what `pytorch_bench.py` configures in peft).
fn lora_spec() -> Value {
    json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": LORA_R, "alpha": LORA_ALPHA})
}

/// One row of issue 3's method table.
struct MethodRow {
    label: &'static str,
    spec: &'static str,
    /// The trainable-parameter count the papers (peft-spec §10) give for this configuration
    /// at the mamba-130m shape, where they give one.
    paper_params: Option<u64>,
}

/// Every method family, LoRA(in_proj) first (the reference the table is relative to).
/// Configurations are the papers' 130m ones where peft-spec §10 lists them, else the method's
/// defaults.
const METHODS: &[MethodRow] = &[
    MethodRow {
        label: "LoRA(in_proj) r=32",
        spec: r#"{"type": "lora", "targets": "in_proj", "r": 32}"#,
        paper_params: Some(2_949_120),
    },
    MethodRow {
        label: "LoRA(out_proj) r=8",
        spec: r#"{"type": "lora", "targets": "out_proj", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA(x_proj) r=8",
        spec: r#"{"type": "lora", "targets": "x_proj", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA(dt_proj) r=8",
        spec: r#"{"type": "lora", "targets": "dt_proj", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA(embedding) r=8",
        spec: r#"{"type": "lora", "targets": "embedding", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA_p(X) r=64",
        spec: r#"{"type": "lora_p", "slice": "X", "r": 64}"#,
        paper_params: Some(3_538_944),
    },
    MethodRow {
        label: "LoRA_p(Z) r=8",
        spec: r#"{"type": "lora_p", "slice": "Z", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA_p(dt) r=8",
        spec: r#"{"type": "lora_p", "slice": "dt", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA_p(B) r=8",
        spec: r#"{"type": "lora_p", "slice": "B", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "LoRA_p(C) r=8",
        spec: r#"{"type": "lora_p", "slice": "C", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "DoRA(in_proj, out_proj) r=16",
        spec: r#"{"type": "dora", "targets": ["in_proj", "out_proj"], "r": 16}"#,
        paper_params: None,
    },
    MethodRow {
        label: "DoRA_p(X) r=8",
        spec: r#"{"type": "dora_p", "slice": "X", "r": 8}"#,
        paper_params: None,
    },
    MethodRow {
        label: "ParallelAdapter",
        spec: r#"{"type": "parallel_adapter"}"#,
        paper_params: None,
    },
    MethodRow {
        label: "Prompt prefix n=8",
        spec: r#"{"type": "prompt", "n": 8, "kind": "prefix"}"#,
        paper_params: None,
    },
    MethodRow {
        label: "Prompt prefix+suffix n=8, projection",
        spec: r#"{"type": "prompt", "n": 8, "kind": "prefix_suffix", "projection": true}"#,
        paper_params: None,
    },
    MethodRow {
        label: "Affix prefix n=3",
        spec: r#"{"type": "affix", "n": 3}"#,
        paper_params: Some(221_184),
    },
    MethodRow {
        label: "Affix prefix n=3, projection H=3072",
        spec: r#"{"type": "affix", "n": 3, "projection": true, "hidden": 3072}"#,
        paper_params: Some(236_015_616),
    },
    MethodRow {
        label: "A-tuning (A_log delta)",
        spec: r#"{"type": "partial", "target": "A_log"}"#,
        paper_params: None,
    },
    MethodRow {
        label: "D-tuning",
        spec: r#"{"type": "partial", "target": "D"}"#,
        paper_params: None,
    },
    MethodRow {
        label: "Conv1d-tuning",
        spec: r#"{"type": "partial", "target": "conv1d.weight"}"#,
        paper_params: None,
    },
    MethodRow {
        label: "Bias-tuning (dt_proj.bias delta)",
        spec: r#"{"type": "partial", "target": "dt_proj.bias"}"#,
        paper_params: None,
    },
    MethodRow {
        label: "Additional-scan N'=6",
        spec: r#"{"type": "additional_scan", "n_add": 6}"#,
        paper_params: Some(663_552),
    },
    MethodRow {
        label: "ProDiaL both r_b=64 r_eps=8",
        spec: r#"{"type": "prodial", "targets": "both", "r_b": 64, "r_eps": 8}"#,
        paper_params: Some(2_377_728),
    },
    MethodRow {
        label: "BitFit",
        spec: r#"{"type": "bitfit"}"#,
        paper_params: Some(73_728),
    },
    MethodRow {
        label: "SLL LoRA r=8",
        spec: r#"{"type": "sll_lora", "r": 8}"#,
        paper_params: Some(1_898_304),
    },
    MethodRow {
        label: "Full fine-tuning",
        spec: r#"{"type": "full"}"#,
        paper_params: Some(129_135_360),
    },
];

// ---------------------------------------------------------------------------------------------
// Timing, load and memory probes.

pub(super) struct Measured {
    pub(super) median_s: f64,
    min_s: f64,
    pub(super) reps: usize,
    pub(super) cpu_wall: f64,
    pub(super) others_cpu: f64,
    steal: f64,
    pub(super) peak_rss_mib: Option<f64>,
}

impl Measured {
    /// The fields every measurement line carries besides its value.
    pub(super) fn fields(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("reps", json!(self.reps)),
            ("median_s", json!(round(self.median_s, 6))),
            (
                "peak_rss_mib",
                json!(self.peak_rss_mib.map(|v| round(v, 1))),
            ),
            ("cpu_wall", json!(self.cpu_wall)),
            ("others_cpu", json!(self.others_cpu)),
            ("steal", json!(self.steal)),
        ]
    }
}

/// Runs `f` up to `reps` times (at least once; stops early once `budget_s` of timed work is
/// spent). The caller runs the warm-up. VmHWM is reset first, so the peak is this
/// measurement's (plus whatever was resident before it).
pub(super) fn timed(
    reps: usize,
    budget_s: f64,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Measured> {
    // Keep the peak of what ran before this measurement before resetting it.
    if let Some(p) = peak_rss_mib() {
        PEAK_SEEN_KIB.fetch_max((p * 1024.0) as u64, Ordering::Relaxed);
    }
    let have_hwm = reset_peak_rss();
    let mut times = Vec::with_capacity(reps);
    let mut probe = Probe::start();
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
        if times.iter().sum::<f64>() >= budget_s {
            break;
        }
    }
    let load = probe.stop();
    let peak = if have_hwm { peak_rss_mib() } else { None };
    if let Some(p) = peak {
        PEAK_SEEN_KIB.fetch_max((p * 1024.0) as u64, Ordering::Relaxed);
    }
    times.sort_by(f64::total_cmp);
    let Some(&min_s) = times.first() else {
        bail!("no timed repetition ran")
    };
    Ok(Measured {
        median_s: times[times.len() / 2],
        min_s,
        reps: times.len(),
        cpu_wall: load.cpu_wall,
        others_cpu: load.others_cpu,
        steal: load.steal,
        peak_rss_mib: peak,
    })
}

/// The largest per-measurement VmHWM seen so far, in KiB.
static PEAK_SEEN_KIB: AtomicU64 = AtomicU64::new(0);

struct Load {
    cpu_wall: f64,
    others_cpu: f64,
    steal: f64,
}

/// This process's CPU time and the whole machine's busy and steal time over a span.
struct Probe {
    t0: Instant,
    own0: Option<f64>,
    sys0: Option<(f64, f64)>,
}

/// Linux's USER_HZ, the unit of /proc/stat and /proc/self/stat (100 on every mainstream
/// kernel configuration; reading it properly needs sysconf, i.e. libc).
const USER_HZ: f64 = 100.0;

impl Probe {
    fn start() -> Self {
        Probe {
            own0: own_cpu_s(),
            sys0: machine_busy_steal_s(),
            t0: Instant::now(),
        }
    }

    fn stop(&mut self) -> Load {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-9);
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let own = match (self.own0, own_cpu_s()) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        };
        let (others, steal) = match (self.sys0, machine_busy_steal_s()) {
            (Some((b0, s0)), Some((b1, s1))) => (
                // Tick granularity makes short spans noisy; clamp to [0, 1].
                ((b1 - b0 - own).max(0.0) / (wall * ncpu)).min(1.0),
                (s1 - s0) / (wall * ncpu),
            ),
            _ => (f64::NAN, f64::NAN),
        };
        Load {
            cpu_wall: round(own / wall, 3),
            others_cpu: round(others, 3),
            steal: round(steal, 3),
        }
    }
}

/// user + system CPU seconds of this process (all threads), from /proc/self/stat.
fn own_cpu_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after its ')' are fixed.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// (busy, steal) seconds of the whole machine since boot, from /proc/stat.
fn machine_busy_steal_s() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    Some((busy / USER_HZ, at(7) / USER_HZ))
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0: writing 5 to clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmHWM (peak resident set) in MiB.
fn peak_rss_mib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn rayon_threads() -> Option<String> {
    std::env::var("RAYON_NUM_THREADS").ok()
}

fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub(super) fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

// ---------------------------------------------------------------------------------------------
// Inputs and output.

/// A small deterministic generator for token ids (no need for a crypto RNG,
/// and it keeps this crate's dependencies as they are).
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    pub(super) fn next_u64(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` standard normal values (Box–Muller), e.g. normalised pixels.
    pub(super) fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut unit = || (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (0..n)
            .map(|_| {
                let (u1, u2) = (unit().max(f64::MIN_POSITIVE), unit());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}

fn random_input(rng: &mut Lcg, b: usize, l: usize, vocab: usize) -> Result<ModelInput> {
    let ids = Tensor::from_vec(rng.tokens(b * l, vocab), (b, l), &Device::Cpu)?;
    Ok(ModelInput::new(&ids, None, vocab)?)
}

/// Where a measurement belongs: the model shape (or shapes, for whole-process figures).
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) shape: String,
    /// How the matrices were kept (`--weights`), for the figures it changes.
    pub(super) weights: Option<String>,
}

impl Ctx {
    pub(super) fn new(shape: &str) -> Self {
        Ctx {
            shape: shape.to_string(),
            weights: None,
        }
    }

    fn label(&self) -> String {
        match &self.weights {
            Some(w) => format!("{} ({w} weights)", self.shape),
            None => self.shape.clone(),
        }
    }
}

/// Writes the JSON lines (a type so the format lives in one place).
pub(super) struct Out;

impl Out {
    /// One JSON line on stdout: side, shape, batch, seq, metric, value, unit, then `extra`.
    pub(super) fn emit(
        &self,
        at: Option<&Ctx>,
        metric: &str,
        value: Value,
        unit: &str,
        extra: &[(&str, Value)],
    ) {
        let mut rec = Map::new();
        rec.insert("side".into(), json!("molt"));
        rec.insert("shape".into(), json!(at.map(|c| c.shape.as_str())));
        if let Some(w) = at.and_then(|c| c.weights.as_deref()) {
            rec.insert("weights".into(), json!(w));
        }
        let mut extra: HashMap<&str, Value> = extra.iter().cloned().collect();
        rec.insert("batch".into(), extra.remove("batch").unwrap_or(Value::Null));
        rec.insert("seq".into(), extra.remove("seq").unwrap_or(Value::Null));
        rec.insert("metric".into(), json!(metric));
        rec.insert("value".into(), value);
        rec.insert("unit".into(), json!(unit));
        let mut rest: Vec<_> = extra.into_iter().collect();
        rest.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in rest {
            rec.insert(k.to_string(), v);
        }
        println!("{}", Value::Object(rec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject_bad_input() {
        assert_eq!(parse_size("4x128"), Ok((4, 128)));
        assert_eq!(parse_size(" 1X512 "), Ok((1, 512)));
        assert!(parse_size("4*128").is_err());
        assert!(parse_size("0x128").is_err());
        assert!(parse_size("4x1").is_err());
        assert!(parse_size("ax128").is_err());
    }

    #[test]
    fn shapes_match_issue_2() {
        let c = Shape::M130.config().expect("an LM shape");
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.state_size,
                c.vocab_size
            ),
            (768, 24, 16, 50280)
        );
        assert_eq!((c.intermediate_size, c.time_step_rank), (1536, 48));
        let s = Shape::Small.config().expect("an LM shape");
        assert_eq!((s.hidden_size, s.num_hidden_layers), (256, 4));
    }

    #[test]
    fn lora_step_learns_and_leaves_the_base_alone() -> Result<()> {
        let mut cfg = MambaConfig::new(16, 2, 64);
        cfg.state_size = 4;
        let base = Checkpoint::random(&cfg, 1, &Device::Cpu)?.into_frozen()?;
        let t = AdapterTrainable::new(&AdapterSpec::from_value(&lora_spec())?, &base, 7, None)?;
        // r 8 on in_proj [64×16] and out_proj [16×32], both layers.
        assert_eq!(
            t.adapter().trainable_parameters(),
            2 * 8 * ((16 + 64) + (32 + 16))
        );
        let mut opt = AdamW::new(t.param_groups()?, 1e-2, 0.9, 0.999, 1e-8)?;
        let ids = Tensor::from_vec(Lcg(3).tokens(2 * 8, cfg.vocab_size), (2, 8), &Device::Cpu)?;
        let batches = [MicroBatch::Tokens(Batch {
            labels: ids.to_dtype(DType::I64)?,
            input_ids: ids,
            scored: 2 * 7,
            tokens: 2 * 8,
        })];
        let before_w = base.named_weights();
        let first = optimizer_step(&t, &mut opt, &batches, 1.0, 1.0, 1)?.loss;
        let mut last = first;
        for i in 2..=20 {
            last = optimizer_step(&t, &mut opt, &batches, 1.0, 1.0, i)?.loss;
        }
        assert!(last < first - 0.1, "loss {first} -> {last}");
        for ((name, a), (_, b)) in before_w.iter().zip(base.named_weights()) {
            let d = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "frozen `{name}` moved");
        }
        Ok(())
    }

    #[test]
    fn method_table_parses_and_matches_the_papers_counts() -> Result<()> {
        let cfg = Shape::M130.config().expect("an LM shape");
        assert!(METHODS[0].label.starts_with("LoRA(in_proj)"));
        let mut labels = std::collections::HashSet::new();
        for m in METHODS {
            assert!(labels.insert(m.label), "{} twice", m.label);
            let spec = AdapterSpec::from_value(&serde_json::from_str(m.spec)?)?;
            spec.validate(&cfg)?;
            let n = spec.trainable_parameters(&cfg) as u64;
            assert!(n > 0, "{}", m.label);
            if let Some(p) = m.paper_params {
                assert_eq!(n, p, "{}: molt counts {n}, the paper {p}", m.label);
            }
        }
        Ok(())
    }

    #[test]
    fn probes_read_proc() {
        if cfg!(target_os = "linux") {
            assert!(own_cpu_s().is_some());
            assert!(machine_busy_steal_s().is_some());
            assert!(peak_rss_mib().is_some_and(|v| v > 0.0));
        }
    }
}
