//! Learning, method by method: on the tiny fixture model (random init, 2 layers, hidden 64,
//! vocab 512), each PEFT method trained through `train::run` lowers the loss of a
//! 16-example task by at least the stated fraction within 24 optimizer steps (6 epochs of 4
//! batches of 4, constant lr, clipping at 1.0, seed 3).
//!
//! "Before" is the base model's mean token loss on the task (every method's init preserves
//! the function, so training starts there); "after" is the final adapter's. The margins are
//! about 55–65% of the drops measured when this test was written (run with `--nocapture` to
//! see them), so they catch a method that stops learning without being brittle. The
//! learning rates are per method: in a random model the scan path (dt, B, C, A, soft
//! prefixes) barely moves the logits, so those methods need large Adam steps to show an
//! effect in 24 steps. `MOLT_LR_SCALE=x` scales every lr, `MOLT_ONLY=a,b` runs some cases,
//! `MOLT_DEBUG_STEPS=1` prints every step.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::{Value, json};
use trainer::model::{LoadOptions, MambaForCausalLM};
use trainer::peft::AdapterSpec;
use trainer::tokenizer::Tokenizer;
use trainer::train::data::{Encoder, load};
use trainer::train::engine::evaluate;
use trainer::train::{
    Control, Hyperparameters, LrScheduler, TrainEvent, TrainOutcome, TrainRequest, run,
    special_tokens,
};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/model")
}

fn task(dir: &Path) -> PathBuf {
    let rows = [
        ("grass", "green"),
        ("sky", "blue"),
        ("snow", "white"),
        ("coal", "black"),
        ("blood", "red"),
        ("sun", "yellow"),
        ("sea", "blue"),
        ("night", "black"),
        ("milk", "white"),
        ("leaf", "green"),
        ("rose", "red"),
        ("lemon", "yellow"),
        ("cloud", "white"),
        ("ink", "black"),
        ("lime", "green"),
        ("fire", "red"),
    ];
    let body: String = rows
        .iter()
        .map(|(t, c)| {
            format!(
                "{}\n",
                json!({"prompt": format!("The colour of {t} is"), "completion": format!(" {c}")})
            )
        })
        .collect();
    let p = dir.join("train.jsonl");
    std::fs::write(&p, body).unwrap();
    p
}

/// Sixteen short sentences, every token scored.
fn text_task(dir: &Path) -> PathBuf {
    let body: String = [
        "grass is green",
        "the sky is blue",
        "snow is white",
        "coal is black",
        "blood is red",
        "the sun is yellow",
        "the sea is blue",
        "night is black",
        "milk is white",
        "a leaf is green",
        "a rose is red",
        "a lemon is yellow",
        "a cloud is white",
        "ink is black",
        "a lime is green",
        "fire is red",
    ]
    .iter()
    .map(|t| format!("{}\n", json!({"text": t})))
    .collect();
    let p = dir.join("text.jsonl");
    std::fs::write(&p, body).unwrap();
    p
}

/// Which task a case trains on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Task {
    /// Prompt → colour, loss on the completion.
    Prompt,
    /// Short sentences, every token scored: for methods that reach the completion only
    /// through the scan state (prefix soft tokens, A), whose effect on a prompt's last
    /// tokens is tiny in a random model.
    Text,
}

/// (name, spec, task, learning rate, minimum fractional drop of the loss).
fn cases() -> Vec<(&'static str, Value, Task, f64, f64)> {
    use Task::*;
    vec![
        ("full", json!({"type": "full"}), Prompt, 2e-3, 0.75),
        (
            "linear_probe",
            json!({"type": "linear_probe"}),
            Prompt,
            1e-2,
            0.6,
        ),
        (
            "sll_lora",
            json!({"type": "sll_lora", "r": 4}),
            Prompt,
            1e-2,
            0.45,
        ),
        (
            "lora_embedding",
            json!({"type": "lora", "targets": "embedding", "r": 4, "s": 1.0}),
            Prompt,
            0.3,
            0.3,
        ),
        (
            "lora_in_proj",
            json!({"type": "lora", "targets": "in_proj", "r": 4, "s": 1.0}),
            Prompt,
            1e-2,
            0.3,
        ),
        (
            "lora_x_proj",
            json!({"type": "lora", "targets": "x_proj", "r": 4, "s": 1.0}),
            Prompt,
            0.1,
            0.1,
        ),
        (
            "lora_dt_proj",
            json!({"type": "lora", "targets": "dt_proj", "r": 4, "s": 1.0}),
            Prompt,
            0.3,
            0.12,
        ),
        (
            "lora_out_proj",
            json!({"type": "lora", "targets": "out_proj", "r": 4, "s": 1.0}),
            Prompt,
            0.1,
            0.4,
        ),
        (
            "lora_alpha_r",
            json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": 4, "alpha": 8}),
            Prompt,
            1e-2,
            0.45,
        ),
        (
            "lora_p_X",
            json!({"type": "lora_p", "slice": "X", "r": 4, "s": 1.0}),
            Prompt,
            0.1,
            0.25,
        ),
        (
            "lora_p_Z",
            json!({"type": "lora_p", "slice": "Z", "r": 4, "s": 1.0}),
            Prompt,
            0.1,
            0.3,
        ),
        (
            "lora_p_dt",
            json!({"type": "lora_p", "slice": "dt", "r": 4, "s": 1.0}),
            Prompt,
            0.1,
            0.05,
        ),
        (
            "lora_p_B",
            json!({"type": "lora_p", "slice": "B", "r": 4, "s": 1.0}),
            Prompt,
            0.3,
            0.12,
        ),
        (
            "lora_p_C",
            json!({"type": "lora_p", "slice": "C", "r": 4, "s": 1.0}),
            Prompt,
            0.3,
            0.12,
        ),
        (
            "dora",
            json!({"type": "dora", "targets": ["in_proj", "out_proj"], "r": 4}),
            Prompt,
            1e-2,
            0.45,
        ),
        (
            "dora_p_X",
            json!({"type": "dora_p", "r": 4, "s": 1.0}),
            Prompt,
            0.1,
            0.35,
        ),
        (
            "parallel_adapter",
            json!({"type": "parallel_adapter", "r": 8, "s": 1.0}),
            Prompt,
            0.1,
            0.45,
        ),
        (
            "prompt_prefix",
            json!({"type": "prompt", "n": 4, "kind": "prefix"}),
            Text,
            0.3,
            0.03,
        ),
        (
            "prompt_infix",
            json!({"type": "prompt", "n": 4, "kind": "infix"}),
            Prompt,
            0.3,
            0.04,
        ),
        (
            "prompt_prefix_suffix_proj",
            json!({"type": "prompt", "n": 4, "kind": "prefix_suffix", "projection": true}),
            Text,
            1e-2,
            0.02,
        ),
        (
            "affix_prefix",
            json!({"type": "affix", "n": 3, "kind": "prefix"}),
            Prompt,
            0.9,
            0.15,
        ),
        (
            "affix_infix",
            json!({"type": "affix", "n": 3, "kind": "infix"}),
            Prompt,
            0.9,
            0.15,
        ),
        (
            "affix_prefix_proj",
            json!({"type": "affix", "n": 3, "kind": "prefix", "projection": true, "hidden": 64}),
            Prompt,
            1e-2,
            0.08,
        ),
        (
            "partial_A_log",
            json!({"type": "partial", "target": "A_log"}),
            Text,
            0.3,
            0.0005,
        ),
        (
            "partial_D",
            json!({"type": "partial", "target": "D"}),
            Prompt,
            0.3,
            0.18,
        ),
        (
            "partial_conv1d",
            json!({"type": "partial", "target": "conv1d.weight"}),
            Prompt,
            3e-2,
            0.2,
        ),
        (
            "partial_dt_bias",
            json!({"type": "partial", "target": "dt_proj.bias"}),
            Prompt,
            0.9,
            0.04,
        ),
        (
            "additional_scan_top",
            json!({"type": "additional_scan", "n_add": 4, "placement": "top"}),
            Prompt,
            0.3,
            0.25,
        ),
        (
            "additional_scan_bottom",
            json!({"type": "additional_scan", "n_add": 4, "placement": "bottom"}),
            Prompt,
            0.3,
            0.25,
        ),
        (
            "prodial_in",
            json!({"type": "prodial", "targets": "in_proj", "r_b": 16, "r_eps": 4}),
            Prompt,
            1e-2,
            0.3,
        ),
        (
            "prodial_out",
            json!({"type": "prodial", "targets": "out_proj", "r_b": 32, "r_eps": 4}),
            Prompt,
            1e-2,
            0.35,
        ),
        (
            "prodial_both",
            json!({"type": "prodial", "targets": "both", "r_b": 16, "r_eps": 4}),
            Prompt,
            1e-2,
            0.45,
        ),
        (
            "hybrid",
            json!({"type": "hybrid", "methods": [
                {"type": "lora_p", "slice": "X", "r": 4, "s": 1.0},
                {"type": "partial", "target": "A_log", "lr": 3e-2},
                {"type": "additional_scan", "n_add": 2},
            ]}),
            Prompt,
            0.1,
            0.15,
        ),
    ]
}

/// The base model's mean token loss on a task file (what every function-preserving
/// adapter starts from).
fn base_loss(train: &Path) -> f64 {
    let tok = Tokenizer::from_file(&tiny_model().join("tokenizer.json")).unwrap();
    let base = MambaForCausalLM::load(&tiny_model(), &LoadOptions::default()).unwrap();
    let (eos, pad) = special_tokens(&base.config().eos_token_ids, base.config().pad_token_id);
    let enc = Encoder {
        tokenizer: &tok,
        max_len: 32,
        eos,
    };
    let data = load(train, None, &enc).unwrap();
    evaluate(&base, &data, 4, pad, &Device::Cpu).unwrap().0
}

/// (loss at step 1, loss of the final adapter on the task).
fn train_once(dir: &Path, train: &Path, spec: &Value, lr: f64) -> (f64, f64) {
    let req = TrainRequest {
        model_dir: tiny_model(),
        train_file: train.to_path_buf(),
        validation_file: Some(train.to_path_buf()),
        method: AdapterSpec::from_value(spec).unwrap_or_else(|e| panic!("{spec}: {e}")),
        hyper: Hyperparameters {
            n_epochs: 6,
            batch_size: 4,
            learning_rate: lr,
            lr_scheduler: LrScheduler::Constant,
            max_seq_length: 32,
            max_grad_norm: 1.0,
            ..Default::default()
        },
        seed: 3,
        out_dir: dir.join("out"),
        checkpoint_dir: dir.join("ck"),
        resume: false,
        device: Device::Cpu,
    };
    let mut first = None;
    let out = run(&req, &mut |ev: &TrainEvent| {
        if let TrainEvent::Step {
            step,
            loss,
            grad_norm,
            ..
        } = ev
        {
            if *step == 1 {
                first = Some(*loss);
            }
            if std::env::var("MOLT_DEBUG_STEPS").is_ok() {
                eprintln!("  step {step} loss {loss:.4} grad_norm {grad_norm:.3e}");
            }
        }
        Control::Continue
    })
    .unwrap_or_else(|e| panic!("{spec}: {e}"));
    let TrainOutcome::Finished {
        steps: 24,
        validation_loss: Some(after),
        ..
    } = out
    else {
        panic!("{spec}: {out:?}")
    };
    assert!(dir.join("out/adapter_config.json").is_file());
    (first.unwrap_or(f64::NAN), after)
}

#[test]
fn every_method_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = task(dir.path());
    let text = text_task(dir.path());
    let (base_prompt, base_text) = (base_loss(&prompt), base_loss(&text));
    let scale: f64 = std::env::var("MOLT_LR_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let mut failures = Vec::new();
    for (name, spec, which, lr, margin) in cases() {
        if let Ok(only) = std::env::var("MOLT_ONLY")
            && !only.split(',').any(|o| o == name)
        {
            continue;
        }
        let (train, before) = match which {
            Task::Prompt => (&prompt, base_prompt),
            Task::Text => (&text, base_text),
        };
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let t0 = std::time::Instant::now();
        let (_, after) = train_once(&d, train, &spec, lr * scale);
        let drop = 1.0 - after / before;
        eprintln!(
            "{name:26} {which:?} lr {:<5} loss {before:.4} → {after:.4} (−{:.2}%, required −{:.2}%) {:.2}s",
            lr * scale,
            100.0 * drop,
            100.0 * margin,
            t0.elapsed().as_secs_f64()
        );
        // A NaN drop fails too.
        if drop.is_nan() || drop < margin {
            failures.push(format!(
                "{name}: {before:.4} → {after:.4}, wanted −{margin}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Suffix soft tokens (prompt or affix) come after every scored token; in a causal model they
/// cannot change any scored prediction, so training them leaves the loss exactly where it was.
#[test]
fn suffix_tokens_cannot_change_a_causal_loss() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = task(dir.path());
    let before = base_loss(&prompt);
    for (name, spec) in [
        (
            "prompt_suffix",
            json!({"type": "prompt", "n": 4, "kind": "suffix"}),
        ),
        (
            "affix_suffix",
            json!({"type": "affix", "n": 3, "kind": "suffix"}),
        ),
    ] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (_, after) = train_once(&d, &prompt, &spec, 0.3);
        assert!((after - before).abs() < 1e-5, "{name}: {before} → {after}");
    }
}

/// BitFit trains the biases themselves, so it must learn like partial dt-bias tuning does.
#[test]
fn bitfit_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = task(dir.path());
    let before = base_loss(&prompt);
    let (_, after) = train_once(dir.path(), &prompt, &json!({"type": "bitfit"}), 0.3);
    assert!(after < 0.97 * before, "{before} → {after}");
}
