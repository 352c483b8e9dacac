//! `molt train` and `molt pretrain` as a user runs them: progress lines on stdout, the
//! adapter (or model folder) on disk, clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn molt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_molt"))
}

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
    ];
    let body: String = rows
        .iter()
        .map(|(t, c)| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": format!("The colour of {t} is"), "completion": format!(" {c}")})
            )
        })
        .collect();
    let p = dir.join("train.jsonl");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn train_prints_progress_and_writes_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let out = dir.path().join("adapter");
    let method = dir.path().join("method.json");
    std::fs::write(
        &method,
        r#"{"type": "lora", "targets": "in_proj", "r": 4, "s": 1.0}"#,
    )
    .unwrap();
    let o = molt()
        .args(["train", "--model"])
        .arg(tiny_model())
        .arg("--train")
        .arg(&train)
        .arg("--validation")
        .arg(&train)
        .arg("--method")
        .arg(format!("@{}", method.display()))
        .arg("--out")
        .arg(&out)
        .args([
            "--epochs",
            "2",
            "--batch-size",
            "3",
            "--lr",
            "1e-2",
            "--seed",
            "4",
        ])
        .args(["--checkpoint-every", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // 6 examples / batch 3 = 2 steps per epoch, 2 epochs.
    assert!(
        stdout.contains("on 6 prompt_completion examples (6 for validation): 4 steps"),
        "{stdout}"
    );
    for s in 1..=4 {
        assert!(stdout.contains(&format!("step {s}/4 epoch")), "{stdout}");
    }
    assert!(
        stdout.contains("tok/s") && stdout.contains("eta 0:"),
        "{stdout}"
    );
    assert!(stdout.contains("checkpoint at step 2"), "{stdout}");
    assert!(stdout.contains("validation at step 4: loss"), "{stdout}");
    assert!(out.join("adapter_config.json").is_file());
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("checkpoint/trainer_state.json").is_file());

    // JSON events, one per line.
    let o = molt()
        .args(["train", "--json", "--model"])
        .arg(tiny_model())
        .arg("--train")
        .arg(&train)
        .args(["--method", r#"{"type": "partial", "target": "D"}"#, "--out"])
        .arg(dir.path().join("a2"))
        .args(["--epochs", "1", "--batch-size", "6"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "started");
    assert_eq!(lines[1]["type"], "step");
    assert_eq!(lines.last().unwrap()["type"], "finished");
}

#[test]
fn train_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \" b\"}\nnot json\n",
    )
    .unwrap();
    let run = |train: &Path, method: &str, extra: &[&str]| {
        let o = molt()
            .args(["train", "--model"])
            .arg(tiny_model())
            .arg("--train")
            .arg(train)
            .args(["--method", method, "--out"])
            .arg(dir.path().join("out"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&bad, r#"{"type": "lora", "targets": "in_proj"}"#, &[]);
    assert!(
        e.contains(&format!("{}:2: not valid JSON", bad.display())),
        "{e}"
    );
    let good = task(dir.path());
    let e = run(&good, r#"{"type": "nope"}"#, &[]);
    assert!(e.contains("unknown PEFT method type `nope`"), "{e}");
    let e = run(
        &good,
        r#"{"type": "lora", "targets": "in_proj"}"#,
        &["--batch-size", "0"],
    );
    assert!(
        e.contains("hyperparameter `batch_size`: 0 is out of range; valid: 1..=4096"),
        "{e}"
    );
}

#[test]
fn pretrain_makes_a_model_folder_that_generates() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let para = "It is a truth universally acknowledged, that a single man in possession\n\
                of a good fortune, must be in want of a wife.\n\n";
    std::fs::write(&corpus, para.repeat(40)).unwrap();
    let out = dir.path().join("model");
    let o = molt()
        .args(["pretrain", "--corpus"])
        .arg(&corpus)
        .arg("--out")
        .arg(&out)
        .args([
            "--vocab-size",
            "300",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--state",
            "4",
        ])
        .args([
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--max-seq-length",
            "32",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("\"parameters\""), "{stdout}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let o = molt()
        .args(["model", "generate", "--model"])
        .arg(&out)
        .args(["--prompt", "It is a truth", "--max-tokens", "8"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("It is a truth"));
}
