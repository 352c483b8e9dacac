//! End to end: the built `molt` binary on every base case of the language fixture sets
//! (Mamba-1: `tests/fixtures/`, `tests/fixtures/alt/`; Mamba-2: `tests/fixtures/mamba2/`;
//! walked through their `index.json`; shapes,
//! vocabulary sizes and tolerances from each case's manifest). `model forward` must
//! reproduce the reference logits and loss of HF transformers, `model generate` the
//! reference greedy tokens (cases with a tokenizer), and bad input must end with a message
//! and a non-zero exit, never a panic.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

mod common;

#[path = "../../trainer/tests/common/mod.rs"]
mod fixtures;

use common::molt_cli as molt;

use fixtures::IndexedCase;

/// One base case: its model folder, reference tensors and manifest.
struct Case {
    label: String,
    model: std::path::PathBuf,
    reference: HashMap<String, Tensor>,
    manifest: Value,
}

/// (atol, rtol) of a tolerance class in a case's manifest.
fn tolerance(manifest: &Value, class: &str) -> (f64, f64) {
    let t = &manifest["tolerances"][class];
    (
        t["atol"].as_f64().expect("atol"),
        t["rtol"].as_f64().expect("rtol"),
    )
}

impl Case {
    fn tol(&self, class: &str) -> (f64, f64) {
        tolerance(&self.manifest, class)
    }

    fn vocab(&self) -> i64 {
        let config = fixtures::read_json(&self.model.join("config.json"));
        config["vocab_size"].as_i64().expect("vocab_size")
    }

    fn has_tokenizer(&self) -> bool {
        !self.manifest["tokenizer"].is_null()
    }
}

fn load(c: &IndexedCase) -> Case {
    Case {
        label: c.label.clone(),
        model: c.path("model_dir"),
        reference: candle_core::safetensors::load(
            c.dir.join("reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{}: reference: {e}", c.label)),
        manifest: c.manifest(),
    }
}

/// Every base case of the language families (Mamba-1 and Mamba-2).
fn base_cases() -> Vec<Case> {
    [
        trainer::model::Family::Mamba,
        trainer::model::Family::Mamba2,
    ]
    .into_iter()
    .flat_map(|f| fixtures::indexed_cases(f, "base"))
    .map(|c| load(&c))
    .collect()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, (atol, rtol): (f64, f64)) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("values")
    };
    let (g, w) = (flat(got), flat(want));
    let mut max = 0f64;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        max = max.max(d);
        assert!(d <= atol + rtol * b.abs(), "{what}[{i}]: got {a}, want {b}");
    }
    max
}

/// `molt model forward` on `inputs` (with `--adapter` and `--loss` when given).
fn run_forward_with(
    model: &Path,
    adapter: Option<&Path>,
    inputs: &HashMap<String, Tensor>,
    loss: bool,
    extra: &[&str],
) -> (Output, Option<HashMap<String, Tensor>>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in.safetensors");
    let output = tmp.path().join("out.safetensors");
    candle_core::safetensors::save(inputs, &input).expect("save input");
    let mut args = vec![
        "model",
        "forward",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        input.to_str().expect("utf-8 path"),
        "--output",
        output.to_str().expect("utf-8 path"),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().expect("utf-8 path")]);
    }
    if loss {
        args.push("--loss");
    }
    args.extend(extra);
    let out = molt(&args);
    let result = out
        .status
        .success()
        .then(|| candle_core::safetensors::load(&output, &Device::Cpu).expect("output"));
    (out, result)
}

fn run_forward(
    model: &Path,
    inputs: &HashMap<String, Tensor>,
    loss: bool,
) -> (Output, Option<HashMap<String, Tensor>>) {
    run_forward_with(model, None, inputs, loss, &[])
}

#[test]
fn forward_matches_the_reference_logits_and_loss() {
    for c in base_cases() {
        let r = &c.reference;
        let inputs = HashMap::from([("input_ids".to_string(), r["input_ids"].clone())]);
        let (out, result) = run_forward(&c.model, &inputs, true);
        assert!(
            out.status.success(),
            "{}: {}",
            c.label,
            String::from_utf8_lossy(&out.stderr)
        );
        let result = result.expect("output");
        assert_eq!(result["logits"].dtype(), DType::F32);
        let d = assert_close(
            &format!("{} logits", c.label),
            &result["logits"],
            &r["logits"],
            c.tol("logits"),
        );
        eprintln!("{}: cli logits max abs diff {d:.3e}", c.label);
        assert_eq!(result["loss"].dims(), &[1]);
        assert_close(
            &format!("{} loss", c.label),
            &result["loss"],
            &r["loss"],
            c.tol("loss"),
        );
    }
}

/// `--dtype bf16` keeps the matrices in bf16: the logits and the loss stay within bf16's
/// rounding of the weights (the bound of the trainer's `bf16_weights_keep_logits_and_greedy_tokens`:
/// relative L2 ≤ 2 %), and an image model is refused naming the flag.
#[test]
fn forward_with_bf16_weights_stays_within_rounding() {
    for c in base_cases() {
        let r = &c.reference;
        let inputs = HashMap::from([("input_ids".to_string(), r["input_ids"].clone())]);
        let (out, result) = run_forward_with(&c.model, None, &inputs, true, &["--dtype", "bf16"]);
        assert!(
            out.status.success(),
            "{}: {}",
            c.label,
            String::from_utf8_lossy(&out.stderr)
        );
        let result = result.expect("output");
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("values")
        };
        let (got, want) = (flat(&result["logits"]), flat(&r["logits"]));
        assert_eq!(got.len(), want.len(), "{}", c.label);
        let num: f64 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        assert!(
            rel > 0.0 && rel <= 0.02,
            "{}: bf16 logits rel L2 {rel:.3e}",
            c.label
        );
        let (l, lw) = (flat(&result["loss"])[0], flat(&r["loss"])[0]);
        assert!(
            (l - lw).abs() <= 0.02 * lw.abs(),
            "{}: loss {l} vs {lw}",
            c.label
        );
    }
    let vim = fixtures::indexed_cases(trainer::model::Family::Vim, "vim_model");
    let case = vim.first().expect("a Vim case");
    let inputs = HashMap::from([(
        "pixel_values".to_string(),
        Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).expect("zeros"),
    )]);
    let (out, _) = run_forward_with(
        &case.path("model_dir"),
        None,
        &inputs,
        false,
        &["--dtype", "bf16"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dtype bf16:") && err.contains("Vision Mamba"),
        "{err}"
    );
}

#[test]
fn forward_takes_u32_ids_and_an_attention_mask() {
    for c in base_cases() {
        let r = &c.reference;
        let ids = r["masked.input_ids"].to_dtype(DType::U32).expect("u32");
        let inputs = HashMap::from([
            ("input_ids".to_string(), ids),
            (
                "attention_mask".to_string(),
                r["masked.attention_mask"].clone(),
            ),
        ]);
        let (out, result) = run_forward(&c.model, &inputs, false);
        assert!(
            out.status.success(),
            "{}: {}",
            c.label,
            String::from_utf8_lossy(&out.stderr)
        );
        let result = result.expect("output");
        assert!(!result.contains_key("loss"));
        assert_close(
            &format!("{} masked logits", c.label),
            &result["logits"],
            &r["masked.logits"],
            c.tol("logits"),
        );
    }
}

#[test]
fn forward_rejects_bad_input_with_a_message() {
    for c in base_cases() {
        let r = &c.reference;
        // No input_ids.
        let inputs = HashMap::from([("ids".to_string(), r["input_ids"].clone())]);
        let (out, _) = run_forward(&c.model, &inputs, false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("in.safetensors") && err.contains("input_ids"),
            "{}: {err}",
            c.label
        );

        // A token id one past the vocabulary.
        let vocab = c.vocab();
        let ids = Tensor::new(&[[0i64, vocab - 1, vocab]], &Device::Cpu).expect("ids");
        let (out, _) = run_forward(
            &c.model,
            &HashMap::from([("input_ids".to_string(), ids)]),
            false,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("in.safetensors") && err.contains(&format!("token id {vocab}")),
            "{}: {err}",
            c.label
        );

        // Float ids.
        let ids = Tensor::new(&[[1f32, 2.]], &Device::Cpu).expect("ids");
        let (out, _) = run_forward(
            &c.model,
            &HashMap::from([("input_ids".to_string(), ids)]),
            false,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("input_ids") && err.contains("F32"), "{err}");

        // An adapter folder that does not exist.
        let out = molt(&[
            "model",
            "generate",
            "--model",
            c.model.to_str().expect("path"),
            "--adapter",
            "/some/adapter",
            "--prompt",
            "hi",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("/some/adapter") && err.contains("adapter_config.json"),
            "{}: {err}",
            c.label
        );
    }
    // A model folder that does not exist.
    let out = molt(&[
        "model",
        "forward",
        "--model",
        "/nonexistent/model",
        "--input",
        "x",
        "--output",
        "y",
    ]);
    assert!(!out.status.success());
}

/// `--adapter` applies a PEFT adapter folder (HF PEFT's own files, every adapter case of
/// every set): the logits are the fixture's adapted logits.
#[test]
fn forward_with_an_adapter_matches_the_reference() {
    let cases = [
        trainer::model::Family::Mamba,
        trainer::model::Family::Mamba2,
    ]
    .into_iter()
    .flat_map(|f| fixtures::indexed_cases(f, "adapter"));
    for case in cases {
        let r =
            candle_core::safetensors::load(case.dir.join("reference.safetensors"), &Device::Cpu)
                .expect("adapter reference");
        let inputs = HashMap::from([("input_ids".to_string(), r["input_ids"].clone())]);
        let (out, got) = run_forward_with(
            &case.path("model_dir"),
            Some(&case.path("adapter_dir")),
            &inputs,
            false,
            &[],
        );
        assert!(
            out.status.success(),
            "{}: {}",
            case.label,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_close(
            &format!("{} logits", case.label),
            &got.expect("output")["logits"],
            &r["logits"],
            tolerance(&case.manifest(), "logits"),
        );
    }
}

/// Greedy generation from text, on every case that ships a tokenizer (the manifest's
/// `tokenizer` is null otherwise).
#[test]
fn generate_reproduces_the_reference_greedy_tokens() {
    let cases: Vec<Case> = base_cases()
        .into_iter()
        .filter(Case::has_tokenizer)
        .collect();
    assert!(!cases.is_empty(), "no base case with a tokenizer");
    for c in cases {
        generate_on(&c);
    }
}

fn generate_on(c: &Case) {
    let r = &c.reference;
    let tok = trainer::tokenizer::Tokenizer::from_model_dir(&c.model)
        .expect("tokenizer")
        .expect("the manifest lists a tokenizer");
    let prompt_ids = r["gen.prompt_ids"].to_vec2::<i64>().expect("ids");
    let sequences = r["gen.sequences"].to_vec2::<i64>().expect("ids");
    let model = &c.model;
    for (row, ids) in prompt_ids.iter().enumerate() {
        let ids: Vec<u32> = ids.iter().map(|v| *v as u32).collect();
        let text = tok.decode(&ids, false).expect("decode");
        // The prompt goes in as text, so it must encode back to the reference ids.
        assert_eq!(
            tok.encode(&text).expect("encode"),
            ids,
            "{} row {row} round trip",
            c.label
        );
        let new = sequences[row].len() - ids.len();
        let new_s = new.to_string();
        // f32, and bf16 matrices (the same greedy tokens on the fixtures).
        for dtype in ["f32", "bf16"] {
            let out = molt(&[
                "model",
                "generate",
                "--model",
                model.to_str().expect("path"),
                "--prompt",
                &text,
                "--max-tokens",
                &new_s,
                "--ignore-eos",
                "--format",
                "json",
                "--dtype",
                dtype,
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
            let got: Vec<i64> = line["completion_ids"]
                .as_array()
                .expect("completion_ids")
                .iter()
                .map(|v| v.as_i64().expect("id"))
                .collect();
            assert_eq!(
                got,
                sequences[row][ids.len()..].to_vec(),
                "{} row {row} ({dtype})",
                c.label
            );
            assert_eq!(line["finish_reason"], "length");
        }
    }

    // Text output: the prompt then its continuation; sampling with a seed is repeatable.
    let args = [
        "model",
        "generate",
        "--model",
        model.to_str().expect("path"),
        "--prompt",
        "Mamba",
        "--max-tokens",
        "5",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "4",
    ];
    let a = molt(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("Mamba"));
    assert_eq!(a.stdout, molt(&args).stdout);

    // Piped into a reader that has gone (`| head`): the command ends quietly, by SIGPIPE as
    // Unix tools do, not with a panic on the broken pipe.
    let mut child = std::process::Command::new(common::molt_exe())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn molt");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
}
