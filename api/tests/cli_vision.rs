//! End to end: the built `molt` binary on every Vision Mamba case of the fixture sets
//! (`vim_model`, walked by index; sizes and tolerances from each manifest). `model forward`
//! must reproduce the reference logits and loss of hustvl's model, `model classify` must
//! print the classes the model ranks highest for image files (checked against the same
//! transform and forward in this process), with an adapter too, and bad input must end with
//! a message naming it, never a panic.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};
use trainer::model::vim::{EvalTransform, Mode, VimForImageClassification, VimLoadOptions};
use trainer::peft::{Adapter, AdapterSpec};

mod common;

#[path = "../../trainer/tests/common/mod.rs"]
mod fixtures;

use common::molt_cli as molt;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32"))
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

/// A PNG of `[h, w]` with a colour gradient that depends on `k`.
fn write_png(path: &Path, [h, w]: [usize; 2], k: u32) {
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb([
            ((x * 255) / w as u32) as u8,
            ((y * 255) / h as u32) as u8,
            ((k * 97 + x + y) % 256) as u8,
        ])
    });
    img.save(path).expect("png");
}

/// The top class indices for `path` by this process's transform and forward.
fn top_classes(model: &VimForImageClassification, path: &Path, k: usize) -> Vec<usize> {
    let t = EvalTransform::for_image_size(model.config.img_size);
    let px = t
        .apply(&EvalTransform::decode(path).expect("decode"), &Device::Cpu)
        .expect("transform")
        .unsqueeze(0)
        .expect("batch");
    let logits = model
        .forward(&px, Mode::Eval, None)
        .expect("forward")
        .squeeze(0)
        .expect("squeeze")
        .to_vec1::<f32>()
        .expect("vec");
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

#[test]
fn forward_classify_and_bad_input_on_every_vim_case() {
    for case in fixtures::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let manifest = case.manifest();
        let tol = |class: &str| {
            manifest["tolerances"][class]["atol"]
                .as_f64()
                .unwrap_or(1e-4) as f32
        };
        let model_dir = case.path("model_dir");
        let model_arg = model_dir.to_str().expect("utf-8 path");
        let reference =
            candle_core::safetensors::load(case.dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference");
        let tmp = tempfile::tempdir().expect("tempdir");

        // forward --loss reproduces the reference.
        let input = tmp.path().join("in.safetensors");
        let output = tmp.path().join("out.safetensors");
        let mut t = HashMap::new();
        t.insert(
            "pixel_values".to_string(),
            reference["pixel_values"].clone(),
        );
        t.insert("labels".to_string(), reference["labels"].clone());
        candle_core::safetensors::save(&t, &input).expect("save input");
        let out = molt(&[
            "model",
            "forward",
            "--model",
            model_arg,
            "--input",
            input.to_str().expect("path"),
            "--output",
            output.to_str().expect("path"),
            "--loss",
        ]);
        assert!(
            out.status.success(),
            "{}: {}",
            case.label,
            String::from_utf8_lossy(&out.stderr)
        );
        let got = candle_core::safetensors::load(&output, &Device::Cpu).expect("output");
        let d = max_diff(&got["logits"], &reference["logits"]);
        assert!(d <= tol("logits"), "{}: logits off by {d}", case.label);
        let d = max_diff(&got["loss"], &reference["loss"].reshape(1).expect("loss"));
        assert!(d <= tol("loss"), "{}: loss off by {d}", case.label);

        // classify, plain and with an adapter (random non-zero values, so it matters).
        let base =
            VimForImageClassification::load(&model_dir, &VimLoadOptions::default()).expect("load");
        let img = base.config.img_size;
        let images: Vec<_> = (0..3)
            .map(|k| {
                let p = tmp.path().join(format!("img{k}.png"));
                write_png(&p, [img[0] + 5, img[1] + 9], k);
                p
            })
            .collect();
        let spec = AdapterSpec::from_value(&json!({"type": "lora", "targets": "in_proj", "r": 2}))
            .expect("spec");
        let init = Adapter::init(&spec, &base, 3).expect("init");
        let noisy: HashMap<String, Tensor> = init
            .named_tensors()
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    (t.clone() + Tensor::randn(0f32, 0.5, t.dims(), &Device::Cpu).expect("randn"))
                        .expect("add"),
                )
            })
            .collect();
        let adapter = Adapter::from_tensors(&spec, &base, noisy).expect("adapter");
        let adir = tmp.path().join("adapter");
        adapter.save(&adir).expect("save adapter");
        let adapted = adapter.apply(&base).expect("apply");
        let k = base.config.num_classes.min(3);
        for (with, model) in [(None, &base), (Some(&adir), &adapted)] {
            let mut args = vec![
                "model", "classify", "--model", model_arg, "--format", "json",
            ];
            let k_arg = k.to_string();
            args.extend(["--top-k", k_arg.as_str()]);
            if let Some(a) = with {
                args.extend(["--adapter", a.to_str().expect("path")]);
            }
            let paths: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
            args.extend(paths.iter().map(String::as_str));
            let out = molt(&args);
            assert!(
                out.status.success(),
                "{}: {}",
                case.label,
                String::from_utf8_lossy(&out.stderr)
            );
            let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).expect("json line"))
                .collect();
            assert_eq!(
                lines.len(),
                images.len(),
                "{}: one line per image",
                case.label
            );
            for (line, path) in lines.iter().zip(&images) {
                let got: Vec<usize> = line["top"]
                    .as_array()
                    .expect("top")
                    .iter()
                    .map(|t| t["class"].as_u64().expect("class") as usize)
                    .collect();
                assert_eq!(
                    got,
                    top_classes(model, path, k),
                    "{}: {}",
                    case.label,
                    path.display()
                );
                let p: f64 = line["top"]
                    .as_array()
                    .expect("top")
                    .iter()
                    .map(|t| t["probability"].as_f64().expect("p"))
                    .sum();
                assert!(
                    p > 0.0 && p <= 1.0 + 1e-5,
                    "{}: probabilities {p}",
                    case.label
                );
            }
        }

        // Bad input: a message naming it, a non-zero exit.
        let missing = tmp.path().join("nope.png");
        let corrupt = tmp.path().join("corrupt.png");
        std::fs::write(&corrupt, b"not a png").expect("write");
        for (args, needle) in [
            (
                vec![
                    "model",
                    "classify",
                    "--model",
                    model_arg,
                    missing.to_str().expect("p"),
                ],
                "nope.png",
            ),
            (
                vec![
                    "model",
                    "classify",
                    "--model",
                    model_arg,
                    corrupt.to_str().expect("p"),
                ],
                "corrupt.png",
            ),
            (
                vec![
                    "model",
                    "classify",
                    "--model",
                    model_arg,
                    "--top-k",
                    "0",
                    corrupt.to_str().expect("p"),
                ],
                "--top-k",
            ),
            (
                vec!["model", "generate", "--model", model_arg, "--prompt", "hi"],
                "classify",
            ),
            (
                vec![
                    "model",
                    "forward",
                    "--model",
                    model_arg,
                    "--input",
                    output.to_str().expect("p"),
                    "--output",
                    input.to_str().expect("p"),
                ],
                "pixel_values",
            ),
        ] {
            let out = molt(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{}: {args:?} succeeded", case.label);
            assert!(err.contains(needle), "{}: {args:?}: {err}", case.label);
        }
    }
}

/// A folder of `per_class` PNGs per class: class k (of `classes`, named `c{k}`) has a bright
/// square in quadrant k on a noisy dark background.
fn quadrant_folder(dir: &Path, [h, w]: [usize; 2], classes: usize, per_class: usize, seed: u32) {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for k in 0..classes {
        let sub = dir.join(format!("c{k}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (state >> 26) as u8;
                let inside = (y as usize) / (h / 2).max(1) == k / 2
                    && (x as usize) / (w / 2).max(1) == k % 2;
                let v = if inside { 180u8 } else { 30u8 } + noise;
                image::Rgb([v, v, v])
            });
            img.save(sub.join(format!("{i:03}.png"))).expect("png");
        }
    }
}

#[test]
fn molt_train_fine_tunes_a_vim_on_an_image_folder() {
    let case = fixtures::indexed_cases(trainer::model::Family::Vim, "vim_model")
        .into_iter()
        .next()
        .expect("a vim case");
    let model_dir = case.path("model_dir");
    let base =
        VimForImageClassification::load(&model_dir, &VimLoadOptions::default()).expect("load");
    let img = base.config.img_size;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (train, val, out) = (
        tmp.path().join("train"),
        tmp.path().join("val"),
        tmp.path().join("out"),
    );
    quadrant_folder(&train, img, 4, 12, 1);
    quadrant_folder(&val, img, 4, 4, 2);
    let out_s = out.to_str().expect("path");
    let run = molt(&[
        "train",
        "--model",
        model_dir.to_str().expect("path"),
        "--train",
        train.to_str().expect("path"),
        "--validation",
        val.to_str().expect("path"),
        "--method",
        r#"{"type": "lora", "targets": ["in_proj", "x_proj"], "r": 4, "s": 1.0}"#,
        "--out",
        out_s,
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let acc = events
        .iter()
        .rev()
        .find(|e| e["type"] == "validation")
        .and_then(|e| e["accuracy"].as_f64())
        .expect("a validation event with accuracy");
    assert!(acc >= 0.65, "validation accuracy {acc} (chance 0.25)");
    // The adapter classifies the validation images through `molt model classify`.
    let pngs: Vec<String> = (0..4)
        .map(|k| val.join(format!("c{k}/000.png")).display().to_string())
        .collect();
    let mut args = vec![
        "model",
        "classify",
        "--model",
        model_dir.to_str().expect("path"),
        "--adapter",
        out_s,
        "--top-k",
        "1",
        "--format",
        "json",
    ];
    args.extend(pngs.iter().map(String::as_str));
    let cls = molt(&args);
    assert!(
        cls.status.success(),
        "{}",
        String::from_utf8_lossy(&cls.stderr)
    );
    let right = String::from_utf8_lossy(&cls.stdout)
        .lines()
        .enumerate()
        .filter(|(k, l)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["top"][0]["class"].as_u64())
                == Some(*k as u64)
        })
        .count();
    assert!(
        right >= 3,
        "{right} of 4 validation images classified right"
    );
    // Bad input: a folder with one class is refused naming it.
    let one = tmp.path().join("one");
    quadrant_folder(&one, img, 1, 2, 3);
    let bad = molt(&[
        "train",
        "--model",
        model_dir.to_str().expect("path"),
        "--train",
        one.to_str().expect("path"),
        "--method",
        r#"{"type": "lora", "targets": "in_proj"}"#,
        "--out",
        out_s,
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("one") && err.contains("at least two"),
        "{err}"
    );
}
