//! The CUDA kernels against the CPU kernels, the base fixtures on the GPU, and a LoRA
//! training run on the GPU against the same run on the CPU. Built only with the `cuda`
//! feature; every test prints "skipped: no CUDA device" and passes when
//! `Device::new_cuda(0)` fails (no GPU or no driver).
//!
//! Tolerances (CUDA vs CPU, both f32): the kernels differ only in summation order (atomic
//! adds over channels and batch rows on the GPU, lane/block partial sums on the CPU) and in
//! `exp`/`log1p` (CUDA's libdevice vs the CPU polynomials), so every value must satisfy
//! `|gpu − cpu| ≤ 1e-4·max(1, max|cpu|)`: an absolute 1e-4 for unit-scale tensors, scaled for
//! the large sums (dA, dD, dbias over b·L steps). bf16 inputs on the GPU are compared with
//! the f32 CPU kernels run on the same (bf16-rounded) values: the math is f32 in both, but
//! outputs and the u/delta/x gradients are rounded to bf16 (relative step 2⁻⁸ ≈ 3.9e-3), so
//! the bound there is `1e-2·max(1, max|cpu|)` elementwise.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use trainer::kernels;
use trainer::model::{LoadOptions, MambaForCausalLM, ModelInput, causal_lm_loss};
use trainer::peft::AdapterSpec;
use trainer::train::{
    Control, Hyperparameters, LrScheduler, TrainEvent, TrainOutcome, TrainRequest, run,
};

mod common;

/// The first GPU, or `None` (after printing why the test is skipped).
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("{test}: skipped: no CUDA device ({e})");
            None
        }
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to vec")
}

/// `|got − want| ≤ tol·max(1, max|want|)` elementwise (NaN fails).
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (values(got), values(want));
    let bound = tol * w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        assert!(
            d <= bound,
            "{what}: element {i}: gpu {a} cpu {b} (|diff| {d:.3e} > {bound:.3e})"
        );
    }
}

fn rand_t(rng: &mut StdRng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

const F32_TOL: f64 = 1e-4;
const BF16_TOL: f64 = 1e-2;

#[derive(Clone, Copy, Debug)]
struct ScanCase {
    b: usize,
    l: usize,
    e: usize,
    n: usize,
    z: bool,
    s0: bool,
    /// Scan backwards in time (Vim's backward branch).
    reverse: bool,
}

/// The scan's inputs as CPU tensors, in the order u, delta, A, B, C, D, bias, z, s0.
fn scan_inputs(c: ScanCase, seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ScanCase { b, l, e, n, .. } = c;
    let mut v = vec![
        rand_t(&mut rng, &[b, l, e], -1.0, 1.0),
        rand_t(&mut rng, &[b, l, e], -3.0, 1.0),
        rand_t(&mut rng, &[e, n], -4.0, -0.1),
        rand_t(&mut rng, &[b, l, n], -1.0, 1.0),
        rand_t(&mut rng, &[b, l, n], -1.0, 1.0),
        rand_t(&mut rng, &[e], -1.0, 1.0),
        rand_t(&mut rng, &[e], -1.0, 1.0),
    ];
    if c.z {
        v.push(rand_t(&mut rng, &[b, l, e], -2.0, 2.0));
    }
    if c.s0 {
        v.push(rand_t(&mut rng, &[b, e, n], -1.0, 1.0));
    }
    v
}

const SCAN_NAMES: [&str; 9] = ["u", "delta", "A", "B", "C", "D", "bias", "z", "s0"];

/// Runs the scan on `dev` with `inputs` (moved there; u and delta cast to `io`), and
/// returns y, the last state and the gradient of `sum(y · w)` for every input (all on the
/// CPU, f32).
fn run_scan(c: ScanCase, inputs: &[Tensor], w: &Tensor, dev: &Device, io: DType) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t.to_device(dev).expect("to device");
            let t = if i < 2 {
                t.to_dtype(io).expect("cast")
            } else {
                t
            };
            Var::from_tensor(&t).expect("var")
        })
        .collect();
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let z = c.z.then(|| t[7]);
    let s0 = c.s0.then(|| t[if c.z { 8 } else { 7 }]);
    let (y, last) =
        kernels::selective_scan(t[0], t[1], t[2], t[3], t[4], t[5], t[6], z, s0, c.reverse)
            .expect("scan");
    let w = w.to_device(dev).expect("w").to_dtype(y.dtype()).expect("w");
    let loss = (y.clone() * w).expect("mul").sum_all().expect("sum");
    let grads = loss.backward().expect("backward");
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("to cpu")
    };
    let mut out = vec![cpu(&y), cpu(&last)];
    for v in &vars {
        out.push(cpu(grads
            .get(v.as_tensor())
            .expect("a gradient for every input")));
    }
    out
}

fn check_scan(c: ScanCase, seed: u64, dev: &Device, io: DType) {
    let inputs = scan_inputs(c, seed);
    // The CPU side sees exactly the values the GPU gets.
    let inputs: Vec<Tensor> = inputs
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if i < 2 {
                t.to_dtype(io)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .expect("round")
            } else {
                t
            }
        })
        .collect();
    let w = rand_t(
        &mut StdRng::seed_from_u64(seed + 99),
        &[c.b, c.l, c.e],
        -1.0,
        1.0,
    );
    let want = run_scan(c, &inputs, &w, &Device::Cpu, DType::F32);
    let got = run_scan(c, &inputs, &w, dev, io);
    let tol = if io == DType::F32 { F32_TOL } else { BF16_TOL };
    let mut names = vec!["y".to_string(), "last state".to_string()];
    let grads = SCAN_NAMES
        .iter()
        .take(7)
        .chain(c.z.then_some(&"z"))
        .chain(c.s0.then_some(&"s0"));
    names.extend(grads.map(|n| format!("gradient of {n}")));
    assert_eq!(names.len(), got.len());
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        assert_close(&format!("{c:?} {io:?}: {name}"), g, w, tol);
    }
}

const SCAN_CASES: [ScanCase; 6] = [
    ScanCase {
        b: 1,
        l: 1,
        e: 3,
        n: 4,
        z: false,
        s0: false,
        reverse: false,
    },
    ScanCase {
        b: 2,
        l: 64,
        e: 32,
        n: 16,
        z: true,
        s0: false,
        reverse: false,
    },
    ScanCase {
        b: 2,
        l: 65,
        e: 19,
        n: 16,
        z: true,
        s0: true,
        reverse: false,
    },
    ScanCase {
        b: 3,
        l: 130,
        e: 160,
        n: 17,
        z: false,
        s0: true,
        reverse: false,
    },
    ScanCase {
        b: 1,
        l: 200,
        e: 37,
        n: 64,
        z: true,
        s0: true,
        reverse: false,
    },
    ScanCase {
        b: 2,
        l: 129,
        e: 129,
        n: 32,
        z: true,
        s0: false,
        reverse: false,
    },
];

#[test]
fn scan_cuda_matches_cpu_forward_and_every_gradient_f32() {
    let Some(dev) = gpu("scan_cuda_matches_cpu_f32") else {
        return;
    };
    for (i, c) in SCAN_CASES.into_iter().enumerate() {
        check_scan(c, i as u64, &dev, DType::F32);
        check_scan(
            ScanCase { reverse: true, ..c },
            50 + i as u64,
            &dev,
            DType::F32,
        );
    }
}

#[test]
fn scan_cuda_bf16_and_f16_inputs() {
    let Some(dev) = gpu("scan_cuda_bf16_and_f16_inputs") else {
        return;
    };
    for (i, c) in SCAN_CASES.into_iter().enumerate() {
        check_scan(c, 10 + i as u64, &dev, DType::BF16);
        check_scan(c, 20 + i as u64, &dev, DType::F16);
    }
}

#[test]
fn scan_cuda_state_sizes_beyond_the_kernels_use_the_reference() {
    let Some(dev) = gpu("scan_cuda_large_n") else {
        return;
    };
    check_scan(
        ScanCase {
            b: 1,
            l: 9,
            e: 5,
            n: 80,
            z: true,
            s0: true,
            reverse: false,
        },
        40,
        &dev,
        DType::F32,
    );
}

/// Conv on `dev`: x (optionally a strided narrow of a wider tensor), weight, bias,
/// history → y and every gradient, on the CPU in f32.
fn run_conv(
    inputs: &[Tensor],
    strided: bool,
    reverse: bool,
    dev: &Device,
    io: DType,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t.to_device(dev).expect("to device");
            let t = if i == 0 {
                t.to_dtype(io).expect("cast")
            } else {
                t
            };
            Var::from_tensor(&t).expect("var")
        })
        .collect();
    let x = if strided {
        // Channels 1..=E of a [b, L, E + 3] tensor: rows strided, channels contiguous.
        let e = inputs[1].dim(0).expect("E");
        vars[0].as_tensor().narrow(2, 1, e).expect("narrow")
    } else {
        vars[0].as_tensor().clone()
    };
    let hist = vars.get(3).map(|v| v.as_tensor());
    let y =
        kernels::causal_conv1d_silu(&x, vars[1].as_tensor(), vars[2].as_tensor(), hist, reverse)
            .expect("conv");
    let w = rand_t(&mut StdRng::seed_from_u64(7), y.dims(), -1.0, 1.0)
        .to_device(dev)
        .and_then(|w| w.to_dtype(y.dtype()))
        .expect("w");
    let grads = (y.clone() * w)
        .and_then(|t| t.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("to cpu")
    };
    let mut out = vec![cpu(&y)];
    for v in &vars {
        out.push(cpu(grads
            .get(v.as_tensor())
            .expect("a gradient for every input")));
    }
    out
}

#[test]
fn conv_cuda_matches_cpu_forward_and_every_gradient() {
    let Some(dev) = gpu("conv_cuda_matches_cpu") else {
        return;
    };
    let cases = [
        // (b, L, E, K, history, strided x)
        (1, 1, 3, 4, false, false),
        (2, 70, 40, 4, true, false),
        (2, 130, 33, 4, false, true),
        (3, 17, 8, 1, false, false),
        (1, 5, 129, 3, true, true),
    ];
    for (i, (b, l, e, k, hist, strided)) in cases.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        let xe = if strided { e + 3 } else { e };
        let mut inputs = vec![
            rand_t(&mut rng, &[b, l, xe], -2.0, 2.0),
            rand_t(&mut rng, &[e, k], -1.0, 1.0),
            rand_t(&mut rng, &[e], -1.0, 1.0),
        ];
        if hist && k > 1 {
            inputs.push(rand_t(&mut rng, &[b, e, k - 1], -2.0, 2.0));
        }
        // The anti-causal conv (Vim's backward branch) takes no history.
        let directions: &[bool] = if hist { &[false] } else { &[false, true] };
        for (&reverse, io) in directions
            .iter()
            .flat_map(|r| [(r, DType::F32), (r, DType::BF16)])
        {
            let mut inp = inputs.clone();
            inp[0] = inp[0]
                .to_dtype(io)
                .and_then(|t| t.to_dtype(DType::F32))
                .expect("round");
            let want = run_conv(&inp, strided, reverse, &Device::Cpu, DType::F32);
            let got = run_conv(&inp, strided, reverse, &dev, io);
            let tol = if io == DType::F32 { F32_TOL } else { BF16_TOL };
            let names = [
                "y",
                "x gradient",
                "weight gradient",
                "bias gradient",
                "history gradient",
            ];
            for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                assert_close(
                    &format!("conv case {i} {io:?} reverse={reverse}: {name}"),
                    g,
                    w,
                    tol,
                );
            }
        }
    }
}

#[test]
fn decode_steps_cuda_match_cpu() {
    let Some(dev) = gpu("decode_steps_cuda_match_cpu") else {
        return;
    };
    for (i, (b, e, n, k, has_z)) in [
        (1, 3, 4, 4, false),
        (3, 130, 16, 4, true),
        (2, 64, 80, 2, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(200 + i as u64);
        let state = rand_t(&mut rng, &[b, e, n], -1.0, 1.0);
        let x = rand_t(&mut rng, &[b, e], -1.0, 1.0);
        let delta = rand_t(&mut rng, &[b, e], -3.0, 1.0);
        let a = rand_t(&mut rng, &[e, n], -4.0, -0.1);
        let bm = rand_t(&mut rng, &[b, n], -1.0, 1.0);
        let cm = rand_t(&mut rng, &[b, n], -1.0, 1.0);
        let d = rand_t(&mut rng, &[e], -1.0, 1.0);
        let bias = rand_t(&mut rng, &[e], -1.0, 1.0);
        let z = rand_t(&mut rng, &[b, e], -2.0, 2.0);
        let conv_state = rand_t(&mut rng, &[b, e, k], -2.0, 2.0);
        let w = rand_t(&mut rng, &[e, k], -1.0, 1.0);
        let step = |dev: &Device| {
            let m = |t: &Tensor| t.to_device(dev).expect("to device");
            let zt = m(&z);
            let (y, s) = kernels::selective_scan_step(
                &m(&state),
                &m(&x),
                &m(&delta),
                &m(&a),
                &m(&bm),
                &m(&cm),
                &m(&d),
                &m(&bias),
                has_z.then_some(&zt),
            )
            .expect("scan step");
            let (cy, cs) = kernels::causal_conv1d_step(&m(&conv_state), &m(&x), &m(&w), &m(&bias))
                .expect("conv step");
            [y, s, cy, cs].map(|t| t.to_device(&Device::Cpu).expect("to cpu"))
        };
        let (want, got) = (step(&Device::Cpu), step(&dev));
        for ((name, g), w) in ["scan y", "scan state", "conv y", "conv state"]
            .iter()
            .zip(&got)
            .zip(&want)
        {
            assert_close(&format!("step case {i}: {name}"), g, w, F32_TOL);
        }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The base fixture cases of every case set (`tests/fixtures/index.json`, `alt/index.json`):
/// (name, model dir, manifest, reference tensors).
fn base_cases() -> Vec<(
    String,
    PathBuf,
    Value,
    std::collections::HashMap<String, Tensor>,
)> {
    common::indexed_cases(trainer::model::Family::Mamba, "base")
        .into_iter()
        .map(|c| {
            let reference =
                candle_core::safetensors::load(c.dir.join("reference.safetensors"), &Device::Cpu)
                    .expect("reference.safetensors");
            (
                c.label.clone(),
                c.path("model_dir"),
                c.manifest(),
                reference,
            )
        })
        .collect()
}

/// The manifest's tolerance for `tensor`: `|got − want| ≤ atol + rtol·|want|`.
fn manifest_tol(manifest: &Value, tensor: &str) -> (f64, f64) {
    let class = manifest["tensors"]["reference.safetensors"][tensor]["tolerance"]
        .as_str()
        .unwrap_or_else(|| panic!("no tolerance class for {tensor}"));
    let t = &manifest["tolerances"][class];
    (
        t["atol"].as_f64().unwrap_or(0.0),
        t["rtol"].as_f64().unwrap_or(0.0),
    )
}

fn assert_manifest_close(what: &str, got: &Tensor, want: &Tensor, (atol, rtol): (f64, f64)) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (a, b)) in values(got).iter().zip(values(want)).enumerate() {
        assert!(
            (a - b).abs() <= atol + rtol * b.abs(),
            "{what}: element {i}: gpu {a} reference {b}"
        );
    }
}

#[test]
fn base_fixture_parity_on_the_gpu() {
    let Some(dev) = gpu("base_fixture_parity_on_the_gpu") else {
        return;
    };
    let opts = LoadOptions {
        dtype: DType::F32,
        device: dev.clone(),
    };
    for (name, model_dir, manifest, reference) in base_cases() {
        let ids = reference["input_ids"].clone();
        // Forward: logits and loss.
        let model = MambaForCausalLM::load(&model_dir, &opts).expect("load");
        let input = ModelInput::new(&ids, None, model.vocab_size()).expect("input");
        let out = model.forward_with(&input, false).expect("forward");
        let logits = out.logits.to_device(&Device::Cpu).expect("logits");
        assert_manifest_close(
            &format!("{name} logits"),
            &logits,
            &reference["logits"],
            manifest_tol(&manifest, "logits"),
        );
        let ids_dev = ids.to_device(&dev).expect("ids");
        let loss = causal_lm_loss(&out.logits, &ids_dev)
            .expect("loss")
            .reshape(1)
            .and_then(|l| l.to_device(&Device::Cpu))
            .expect("loss");
        assert_manifest_close(
            &format!("{name} loss"),
            &loss,
            &reference["loss"],
            manifest_tol(&manifest, "loss"),
        );
        // Full fine-tune gradients through the CUDA kernels' backward.
        let (model, varmap) = MambaForCausalLM::load_trainable(&model_dir, &opts).expect("load");
        let logits = model.forward(&ids_dev, None).expect("forward");
        let grads = causal_lm_loss(&logits, &ids_dev)
            .expect("loss")
            .backward()
            .expect("backward");
        let vars = varmap.data().lock().expect("varmap").clone();
        let mut checked = 0;
        for (param, var) in &vars {
            let key = format!("grad.{param}");
            let Some(want) = reference.get(&key) else {
                continue;
            };
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {param}"))
                .to_device(&Device::Cpu)
                .expect("grad");
            assert_manifest_close(
                &format!("{name} {key}"),
                &got,
                want,
                manifest_tol(&manifest, &key),
            );
            checked += 1;
        }
        assert!(checked > 0, "{name}: no reference gradients checked");
    }
}

/// A LoRA run (2 epochs of a 16-example task) on the tiny fixture: the step losses and the
/// saved adapter on the GPU equal the CPU run's within 1e-3 relative (f32 both, summation
/// order differs; AdamW amplifies differences little over 8 steps).
#[test]
fn lora_training_on_the_gpu_matches_the_cpu() {
    let Some(dev) = gpu("lora_training_on_the_gpu_matches_the_cpu") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let lines: String = (0..16)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("Item {i} is"), "completion": format!(" number {}", i * 7 % 10)})
            )
        })
        .collect();
    let train = tmp.path().join("train.jsonl");
    std::fs::write(&train, lines).expect("write");
    let model_dir = fixtures().join("tiny/model");
    let request = |device: Device, out: &str| TrainRequest {
        model_dir: model_dir.clone(),
        train_file: train.clone(),
        validation_file: None,
        method: AdapterSpec::from_value(&json!({"type": "lora", "targets": "in_proj", "r": 4}))
            .expect("spec"),
        hyper: Hyperparameters {
            n_epochs: 2,
            batch_size: 4,
            learning_rate: 1e-3,
            lr_scheduler: LrScheduler::Linear,
            max_seq_length: 32,
            ..Default::default()
        },
        seed: 3,
        out_dir: tmp.path().join(out),
        checkpoint_dir: tmp.path().join(format!("{out}-ck")),
        resume: false,
        device,
    };
    let train_on = |req: &TrainRequest| {
        let mut losses = Vec::new();
        let outcome = run(req, &mut |ev: &TrainEvent| {
            if let TrainEvent::Step { loss, .. } = ev {
                losses.push(*loss);
            }
            Control::Continue
        })
        .expect("training");
        assert!(matches!(outcome, TrainOutcome::Finished { .. }));
        let adapter = candle_core::safetensors::load(
            req.out_dir.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .expect("adapter");
        (losses, adapter)
    };
    let (cpu_losses, cpu_adapter) = train_on(&request(Device::Cpu, "cpu"));
    let (gpu_losses, gpu_adapter) = train_on(&request(dev, "gpu"));
    assert_eq!(cpu_losses.len(), gpu_losses.len(), "steps");
    for (i, (a, b)) in gpu_losses.iter().zip(&cpu_losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
            "step {i}: gpu loss {a} cpu {b}"
        );
    }
    let mut names: Vec<&String> = cpu_adapter.keys().collect();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        let got = gpu_adapter
            .get(name)
            .unwrap_or_else(|| panic!("gpu adapter lacks {name}"));
        assert_close(&format!("adapter {name}"), got, &cpu_adapter[name], 1e-3);
    }
}

/// Generation on the GPU (greedy) gives the CPU's tokens for every base fixture, from its
/// `gen.prompt_ids` with the first row shortened (rows of different lengths).
#[test]
fn greedy_generation_on_the_gpu_matches_the_cpu() {
    let Some(dev) = gpu("greedy_generation_on_the_gpu_matches_the_cpu") else {
        return;
    };
    use trainer::generate::{GenerationConfig, generate};
    for (name, dir, _, reference) in base_cases() {
        let load = |device: Device| {
            MambaForCausalLM::load(
                &dir,
                &LoadOptions {
                    dtype: DType::F32,
                    device,
                },
            )
            .expect("load")
        };
        let mut prompts: Vec<Vec<u32>> = reference["gen.prompt_ids"]
            .to_dtype(DType::U32)
            .and_then(|t| t.to_vec2::<u32>())
            .expect("gen.prompt_ids");
        let half = prompts[0].len().div_ceil(2);
        prompts[0].truncate(half);
        let run_on = |m: &MambaForCausalLM| {
            let mut cfg = GenerationConfig::for_model(m);
            cfg.max_new_tokens = 12;
            cfg.temperature = 0.0;
            cfg.eos_token_ids.clear();
            generate(m, &prompts, &cfg).expect("generate").tokens
        };
        assert_eq!(
            run_on(&load(dev.clone())),
            run_on(&load(Device::Cpu)),
            "{name}"
        );
    }
}
