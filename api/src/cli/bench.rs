//! `molt bench`: the speed benchmark of issue 2 on random-init Mamba-1 models.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{Map, Value, json};
use trainer::generate::{GenerationConfig, generate};
use trainer::kernels::bench::{BenchShape, scan_fwd, scan_fwd_bwd};
use trainer::model::layers::linear_forward;
use trainer::model::{
    Checkpoint, Linear, LinearAdapter, MambaConfig, MambaForCausalLM, ModelInput, causal_lm_loss,
};

/// The model shapes of issue 2.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// hidden 256, 4 layers, state 16, vocab 50280 (time_step_rank 16, HF's "auto").
    Small,
    /// state-spaces/mamba-130m: hidden 768, 24 layers, state 16, vocab 50280, dt rank 48.
    #[value(name = "130m")]
    M130,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Small => "small",
            Shape::M130 => "130m",
        }
    }

    fn config(self) -> MambaConfig {
        let (hidden, layers) = match self {
            Shape::Small => (256, 4),
            Shape::M130 => (768, 24),
        };
        // MambaConfig::new gives HF's defaults (state 16, expand 2, conv 4, dt rank
        // ceil(hidden/16) = 48 for 768, no in/out bias, conv bias, tied head): the shapes
        // pytorch_bench.py builds.
        MambaConfig::new(hidden, layers, 50280)
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

    /// Seed of the random weights and inputs.
    #[arg(long, env = "MOLT_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Another benchmark (`molt bench service`); without one, the model benchmark runs.
    #[command(subcommand)]
    pub command: Option<super::bench_service::BenchCommand>,
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
        out: Out,
    };
    b.run(&args.shapes)
}

struct Bench {
    reps: usize,
    budget: f64,
    gen_tokens: usize,
    seed: u64,
    metrics: Vec<Metric>,
    sizes: Vec<(usize, usize)>,
    out: Out,
}

impl Bench {
    fn wants(&self, m: Metric) -> bool {
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
        let all = Ctx {
            shape: shapes
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(","),
        };
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
        let cfg = shape.config();
        let name = shape.name();
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
        let at = Ctx {
            shape: name.to_string(),
        };
        self.out
            .emit(Some(&at), "params", json!(params), "count", &[]);
        let mut rng = Lcg(self.seed ^ 0x9e37_79b9_7f4a_7c15);

        if self.wants(Metric::Forward) {
            for &(b, l) in &self.sizes {
                let input = random_input(&mut rng, b, l, cfg.vocab_size)?;
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
            for b in GEN_BATCHES {
                let prompts: Vec<Vec<u32>> = (0..b)
                    .map(|_| rng.tokens(GEN_PROMPT, cfg.vocab_size))
                    .collect();
                let gcfg = GenerationConfig {
                    max_new_tokens: self.gen_tokens,
                    // Greedy, and no EOS: a random model may produce one early, and the
                    // figure is for a fixed number of tokens (min_new_tokens on the PyTorch side).
                    eos_token_ids: Vec::new(),
                    ..GenerationConfig::default()
                };
                let new = self.gen_tokens;
                let gen_once = || -> Result<()> {
                    let out = generate(&frozen, &prompts, &gcfg)?;
                    ensure!(
                        out.tokens.iter().all(|t| t.len() == new),
                        "generation stopped before {new} tokens"
                    );
                    Ok(())
                };
                gen_once()?;
                let m = timed(self.reps, self.budget, gen_once)?;
                self.report(
                    &at,
                    "generate_tokens_per_s",
                    b,
                    new,
                    (b * new) as f64,
                    &m,
                    &[("prompt", json!(GEN_PROMPT))],
                );
            }
        }

        if self.wants(Metric::Train) {
            self.train_lora(&at, &cfg, frozen.clone(), &mut rng)?;
            drop(frozen);
            self.train_full(&at, &cfg, &mut rng)?;
        } else {
            drop(frozen);
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

    /// LoRA r=8 (α=16) on every in_proj and out_proj of a frozen model; AdamW on the
    /// adapters only.
    fn train_lora(
        &self,
        at: &Ctx,
        cfg: &MambaConfig,
        mut model: MambaForCausalLM,
        rng: &mut Lcg,
    ) -> Result<()> {
        let vars = attach_lora(&mut model, LORA_R, LORA_ALPHA, rng)?;
        let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
        self.out.emit(
            Some(at),
            "train_lora_trainable_params",
            json!(trainable),
            "count",
            &[],
        );
        let mut opt = AdamW::new(vars, 1e-4, 0.0)?;
        for &(b, l) in &self.sizes {
            let input = random_input(rng, b, l, cfg.vocab_size)?;
            let labels = input.input_ids.clone();
            let mut step = || -> Result<()> { train_step(&model, &input, &labels, &mut opt) };
            step()?;
            let m = timed(self.reps, self.budget, &mut step)?;
            self.report(
                at,
                "train_lora_tokens_per_s",
                b,
                l,
                (b * l) as f64,
                &m,
                &[("adapter", json!(LORA_SOURCE))],
            );
        }
        Ok(())
    }

    /// Every weight trainable (a `Var`), AdamW on all of them.
    fn train_full(&self, at: &Ctx, cfg: &MambaConfig, rng: &mut Lcg) -> Result<()> {
        let (model, varmap) = Checkpoint::random(cfg, self.seed, &Device::Cpu)?.into_trainable()?;
        let mut opt = AdamW::new(varmap.all_vars(), 1e-4, 0.0)?;
        for &(b, l) in &self.sizes {
            let input = random_input(rng, b, l, cfg.vocab_size)?;
            let labels = input.input_ids.clone();
            let mut step = || -> Result<()> { train_step(&model, &input, &labels, &mut opt) };
            step()?;
            let m = timed(self.reps, self.budget, &mut step)?;
            self.report(at, "train_full_tokens_per_s", b, l, (b * l) as f64, &m, &[]);
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
            at.shape,
            m.reps,
            m.cpu_wall,
            m.others_cpu,
            m.peak_rss_mib.unwrap_or(f64::NAN)
        );
        let mut fields = vec![
            ("batch", json!(batch)),
            ("seq", json!(seq)),
            ("reps", json!(m.reps)),
            ("median_s", json!(round(m.median_s, 6))),
            ("peak_rss_mib", json!(m.peak_rss_mib.map(|v| round(v, 1)))),
            ("cpu_wall", json!(m.cpu_wall)),
            ("others_cpu", json!(m.others_cpu)),
            ("steal", json!(m.steal)),
        ];
        fields.extend(extra.iter().cloned());
        self.out
            .emit(Some(at), metric, json!(round(tps, 3)), "tokens/s", &fields);
    }
}

/// Which LoRA implementation the training figure used.
const LORA_SOURCE: &str = "bench-local LinearAdapter (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)";

/// Forward, next-token loss, backward, AdamW update.
fn train_step(
    model: &MambaForCausalLM,
    input: &ModelInput,
    labels: &Tensor,
    opt: &mut AdamW,
) -> Result<()> {
    let logits = model.forward_with(input, false)?.logits;
    let loss = causal_lm_loss(&logits, labels)?;
    let grads = loss.backward()?;
    opt.step(&grads)?;
    // Reading the loss back makes sure nothing lazy is left unmeasured.
    let v = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    ensure!(v.is_finite(), "training loss is not finite: {v}");
    Ok(())
}

/// LoRA as PEFT computes it: `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`, with `A` `[r, in]` and `B` `[out, r]`.
#[derive(Debug)]
struct Lora {
    a: Var,
    b: Var,
    scale: f64,
}

impl LinearAdapter for Lora {
    fn forward(&self, base: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = base.forward(x)?;
        let low = linear_forward(x, self.a.as_tensor(), None)?;
        let low = linear_forward(&low, self.b.as_tensor(), None)?;
        y + (low * self.scale)?
    }
}

/// Attaches a LoRA adapter to every in_proj and out_proj; returns the trainable tensors.
/// `B` starts at zero as in PEFT (the gradient work is the same as for any other value).
fn attach_lora(
    model: &mut MambaForCausalLM,
    r: usize,
    alpha: f64,
    rng: &mut Lcg,
) -> Result<Vec<Var>> {
    let mut vars = Vec::new();
    for block in &mut model.backbone.layers {
        let m = &mut block.mixer;
        for proj in [&mut m.in_proj, &mut m.out_proj] {
            let (out_f, in_f) = (proj.base().out_features(), proj.base().in_features());
            // PEFT's A init: kaiming-uniform with a = √5, i.e. U(±1/√in).
            let bound = 1.0 / (in_f as f32).sqrt();
            let a_vals: Vec<f32> = (0..r * in_f).map(|_| rng.uniform(bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a_vals, (r, in_f), &Device::Cpu)?)?;
            let b = Var::zeros((out_f, r), DType::F32, &Device::Cpu)?;
            vars.push(a.clone());
            vars.push(b.clone());
            proj.set_adapter(Some(Arc::new(Lora {
                a,
                b,
                scale: alpha / r as f64,
            })));
        }
    }
    Ok(vars)
}

/// AdamW with PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8) and decoupled weight decay;
/// the same update as `candle_nn::AdamW` (which this crate does not depend on).
struct AdamW {
    vars: Vec<(Var, Tensor, Tensor)>,
    lr: f64,
    weight_decay: f64,
    t: i32,
}

impl AdamW {
    fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let vars = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|v| {
                let m = v.zeros_like()?;
                let s = v.zeros_like()?;
                Ok((v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            vars,
            lr,
            weight_decay,
            t: 0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f64 = 1e-8;
        self.t += 1;
        let c1 = 1.0 / (1.0 - B1.powi(self.t));
        let c2 = 1.0 / (1.0 - B2.powi(self.t));
        let mut updated = 0usize;
        for (var, m, v) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            updated += 1;
            let theta = var.as_tensor().detach();
            *m = ((&*m * B1)? + (g * (1.0 - B1))?)?;
            *v = ((&*v * B2)? + (g.sqr()? * (1.0 - B2))?)?;
            let m_hat = (&*m * c1)?;
            let v_hat = (&*v * c2)?;
            let next = (theta * (1.0 - self.lr * self.weight_decay))?;
            let delta = (m_hat / (v_hat.sqrt()? + EPS)?)?;
            var.set(&(next - (delta * self.lr)?)?)?;
        }
        ensure!(updated > 0, "the backward pass produced no gradient");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Timing, load and memory probes.

struct Measured {
    median_s: f64,
    min_s: f64,
    reps: usize,
    cpu_wall: f64,
    others_cpu: f64,
    steal: f64,
    peak_rss_mib: Option<f64>,
}

/// Runs `f` up to `reps` times (at least once; stops early once `budget_s` of timed work is
/// spent). The caller runs the warm-up. VmHWM is reset first, so the peak is this
/// measurement's (plus whatever was resident before it).
fn timed(reps: usize, budget_s: f64, mut f: impl FnMut() -> Result<()>) -> Result<Measured> {
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

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

// ---------------------------------------------------------------------------------------------
// Inputs and output.

/// A small deterministic generator for token ids and LoRA inits (no need for a crypto RNG,
/// and it keeps this crate's dependencies as they are).
struct Lcg(u64);

impl Lcg {
    fn next_u64(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }

    fn uniform(&mut self, bound: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        (2.0 * u - 1.0) * bound
    }
}

fn random_input(rng: &mut Lcg, b: usize, l: usize, vocab: usize) -> Result<ModelInput> {
    let ids = Tensor::from_vec(rng.tokens(b * l, vocab), (b, l), &Device::Cpu)?;
    Ok(ModelInput::new(&ids, None, vocab)?)
}

/// Where a measurement belongs: the model shape (or shapes, for whole-process figures).
struct Ctx {
    shape: String,
}

/// Writes the JSON lines (a type so the format lives in one place).
struct Out;

impl Out {
    /// One JSON line on stdout: side, shape, batch, seq, metric, value, unit, then `extra`.
    fn emit(
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
        let c = Shape::M130.config();
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
        let s = Shape::Small.config();
        assert_eq!((s.hidden_size, s.num_hidden_layers), (256, 4));
    }

    #[test]
    fn lora_step_updates_only_the_adapters_and_learns() -> Result<()> {
        let mut cfg = MambaConfig::new(16, 2, 64);
        cfg.state_size = 4;
        let mut model = Checkpoint::random(&cfg, 1, &Device::Cpu)?.into_frozen()?;
        let mut rng = Lcg(3);
        let vars = attach_lora(&mut model, 2, 4.0, &mut rng)?;
        assert_eq!(vars.len(), 2 * 2 * cfg.num_hidden_layers);
        let mut opt = AdamW::new(vars.clone(), 1e-2, 0.0)?;
        let input = random_input(&mut rng, 2, 8, cfg.vocab_size)?;
        let labels = input.input_ids.clone();
        let loss = |m: &MambaForCausalLM| -> Result<f32> {
            let l = causal_lm_loss(&m.forward_with(&input, false)?.logits, &labels)?;
            Ok(l.to_scalar::<f32>()?)
        };
        let before = loss(&model)?;
        for _ in 0..20 {
            train_step(&model, &input, &labels, &mut opt)?;
        }
        let after = loss(&model)?;
        assert!(after < before, "loss {before} -> {after}");
        // B started at zero and must have moved.
        let b_norm = vars[1].as_tensor().sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(b_norm > 0.0);
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
