//! Vision Mamba parity with hustvl/Vim (`tests/fixtures/vim/`, see its README): the reference
//! is hustvl's `VisionMamba` (bimamba v2, middle class token) ported to pure PyTorch, float32
//! on CPU with `selective_scan_ref`. Every case of kind `vim_model` / `vim_posinterp` in every
//! fixture set is walked by index; names, shapes and tolerances come from the manifests
//! (`|got − want| ≤ atol + rtol·|want|`, and for gradients also a relative L2 bound).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use trainer::model::vim::{
    Mode, PosEmbedResize, Trace, VimCheckpoint, VimForImageClassification, VimLoadOptions,
    classification_loss,
};

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    let p = dir.join("reference.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The reference tensors the manifest lists: name → (tolerance class, shape).
fn listed(manifest: &Value) -> Vec<(String, String, Vec<usize>)> {
    let t = manifest["tensors"]["reference.safetensors"]
        .as_object()
        .expect("manifest lists reference.safetensors tensors");
    t.iter()
        .map(|(name, spec)| {
            let shape = spec["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|v| v.as_u64().expect("dim") as usize)
                .collect();
            (
                name.clone(),
                spec["tolerance"].as_str().unwrap_or("exact").to_string(),
                shape,
            )
        })
        .collect()
}

fn tol(manifest: &Value, class: &str) -> (f64, f64, Option<f64>) {
    let t = &manifest["tolerances"][class];
    (
        t["atol"].as_f64().unwrap_or(0.0),
        t["rtol"].as_f64().unwrap_or(0.0),
        t["rel_l2"].as_f64(),
    )
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to vec")
}

/// Asserts `got ≈ want` under the manifest's tolerance class `class`.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, manifest: &Value, class: &str) {
    assert_eq!(
        got.elem_count(),
        want.elem_count(),
        "{what}: shape {:?}, expected {:?}",
        got.dims(),
        want.dims()
    );
    let (atol, rtol, rel_l2) = tol(manifest, class);
    let (g, w) = (flat(got), flat(want));
    let mut worst = (0.0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = if a.is_finite() {
            (a - b).abs() - (atol + rtol * b.abs())
        } else {
            f64::INFINITY
        };
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: element {} is {} vs {} (atol {atol}, rtol {rtol}, class {class})",
        worst.1,
        g[worst.1],
        w[worst.1]
    );
    if let Some(bound) = rel_l2 {
        let num: f64 = g.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        let den: f64 = w.iter().map(|b| b * b).sum::<f64>();
        if den > 0.0 {
            let rel = (num / den).sqrt();
            assert!(rel <= bound, "{what}: relative L2 error {rel} > {bound}");
        }
    }
}

fn load_opts() -> VimLoadOptions {
    VimLoadOptions::default()
}

#[test]
fn vim_model_cases_match_hustvl() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let manifest = case.manifest();
        let refs = reference(&case.dir);
        let model_dir = case.path("model_dir");
        let (model, varmap) = VimCheckpoint::load(&model_dir, &load_opts())
            .unwrap_or_else(|e| panic!("{}: {e}", case.label))
            .into_trainable()
            .unwrap_or_else(|e| panic!("{}: {e}", case.label));
        let pixels = &refs["pixel_values"];
        let labels = &refs["labels"];
        let mut trace = Trace::new();
        let logits = model
            .forward(pixels, Mode::Eval, Some(&mut trace))
            .expect("forward");
        let loss = classification_loss(&logits, labels).expect("loss");
        let features = {
            let mut t2 = Trace::new();
            model
                .forward_features(pixels, Mode::Eval, Some(&mut t2))
                .expect("features")
        };
        let grads = loss.backward().expect("backward");
        let vars = varmap.data().lock().expect("varmap").clone();
        let mut checked = 0;
        for (name, class, shape) in listed(&manifest) {
            let want = &refs[&name];
            assert_eq!(want.dims(), shape.as_slice(), "{}: {name}", case.label);
            let what = format!("{}: {name}", case.label);
            let got = match name.as_str() {
                "pixel_values" | "labels" => continue,
                "logits" => logits.clone(),
                "loss" => loss.reshape(1).expect("loss shape"),
                "features" => features.clone(),
                n if n.starts_with("hidden.") => trace
                    .get(n)
                    .unwrap_or_else(|| panic!("{what}: the model does not produce it"))
                    .clone(),
                n if n.starts_with("grad.") => {
                    let param = &n["grad.".len()..];
                    let var = vars
                        .get(param)
                        .unwrap_or_else(|| panic!("{what}: no parameter `{param}`"));
                    grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{what}: no gradient"))
                        .clone()
                }
                _ => panic!("{what}: unknown reference tensor"),
            };
            assert_eq!(got.dims(), want.dims(), "{what}");
            assert_close(&what, &got, want, &manifest, &class);
            checked += 1;
        }
        // Every parameter has a reference gradient (full fine-tune covers them all).
        for name in vars.keys() {
            assert!(
                refs.contains_key(&format!("grad.{name}")),
                "{}: parameter {name} has no reference gradient",
                case.label
            );
        }
        eprintln!("{}: {checked} reference tensors match", case.label);
        assert!(checked > 0, "{}: nothing compared", case.label);
    }
}

#[test]
fn pth_checkpoint_loads_the_same_tensors() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let model_dir = case.path("model_dir");
        if !model_dir.join("checkpoint.pth").is_file() {
            continue;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        for f in ["config.json", "checkpoint.pth"] {
            std::fs::copy(model_dir.join(f), tmp.path().join(f)).expect("copy");
        }
        let st = VimCheckpoint::load(&model_dir, &load_opts()).expect("safetensors");
        let pth = VimCheckpoint::load(tmp.path(), &load_opts())
            .unwrap_or_else(|e| panic!("{}: checkpoint.pth: {e}", case.label));
        assert_eq!(st.tensors.len(), pth.tensors.len(), "{}", case.label);
        for (name, t) in &st.tensors {
            let other = &pth.tensors[name];
            assert_eq!(flat(t), flat(other), "{}: {name}", case.label);
        }
        assert!(!pth.fresh_head);
    }
}

#[test]
fn vim_posinterp_cases_match_both_resizes() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_posinterp") {
        let manifest = case.manifest();
        let refs = reference(&case.dir);
        let model_dir = case.path("model_dir");
        let img = case.entry["img_size"]
            .as_array()
            .expect("img_size")
            .iter()
            .map(|v| v.as_u64().expect("size") as usize)
            .collect::<Vec<_>>();
        let pixels = &refs["pixel_values"];
        let tensors = listed(&manifest);
        let mut modes = 0;
        for (prefix, mode) in [
            ("hustvl", PosEmbedResize::Hustvl),
            ("midcls", PosEmbedResize::ClsAware),
        ] {
            // A case lists the variants it has (hustvl's resize exists for square grids only).
            if !tensors
                .iter()
                .any(|t| t.0.starts_with(&format!("{prefix}.")))
            {
                continue;
            }
            modes += 1;
            let opts = VimLoadOptions {
                img_size: Some([img[0], img[1]]),
                pos_embed_resize: mode,
                ..load_opts()
            };
            let ckpt = VimCheckpoint::load(&model_dir, &opts)
                .unwrap_or_else(|e| panic!("{}: {e}", case.label));
            assert!(ckpt.notes.iter().any(|n| n.contains("pos_embed")));
            let model = ckpt.into_frozen().expect("build");
            let features = model
                .forward_features(pixels, Mode::Eval, None)
                .expect("forward");
            let logits = model.head.forward(&features).expect("head");
            let pos = model.pos_embed.value().expect("pos_embed");
            for (name, class, _) in tensors
                .iter()
                .filter(|t| t.0.starts_with(&format!("{prefix}.")))
            {
                let got = match &name[prefix.len() + 1..] {
                    "pos_embed" => pos.clone(),
                    "logits" => logits.clone(),
                    "features" => features.clone(),
                    other => panic!("{}: unknown tensor {other}", case.label),
                };
                assert_close(
                    &format!("{}: {name}", case.label),
                    &got,
                    &refs[name],
                    &manifest,
                    class,
                );
            }
        }
        assert!(modes > 0, "{}: no resize variant listed", case.label);
    }
}

/// Writes a copy of `model_dir` whose safetensors holds `tensors` (and `config` if given).
fn write_variant(
    model_dir: &Path,
    tensors: &HashMap<String, Tensor>,
    config: Option<&Value>,
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    match config {
        Some(c) => std::fs::write(tmp.path().join("config.json"), c.to_string()).expect("config"),
        None => {
            std::fs::copy(
                model_dir.join("config.json"),
                tmp.path().join("config.json"),
            )
            .expect("copy config");
        }
    }
    candle_core::safetensors::save(tensors, tmp.path().join("model.safetensors"))
        .expect("save safetensors");
    tmp
}

fn base_tensors(model_dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu)
        .expect("model.safetensors")
}

#[test]
fn missing_or_other_head_gives_a_fresh_zero_head() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let model_dir = case.path("model_dir");
        let config = common::read_json(&model_dir.join("config.json"));
        let classes = config["num_classes"].as_u64().expect("num_classes") as usize;
        let mut tensors = base_tensors(&model_dir);
        tensors.remove("head.weight");
        tensors.remove("head.bias");
        let tmp = write_variant(&model_dir, &tensors, None);
        let ckpt = VimCheckpoint::load(tmp.path(), &load_opts())
            .unwrap_or_else(|e| panic!("{}: {e}", case.label));
        assert!(ckpt.fresh_head);
        assert!(
            ckpt.notes.iter().any(|n| n.contains("no head")),
            "{:?}",
            ckpt.notes
        );
        let model = ckpt.into_frozen().expect("build");
        assert_eq!(
            model.head.weight().dims(),
            &[classes, config["embed_dim"].as_u64().unwrap() as usize]
        );
        assert!(flat(model.head.weight()).iter().all(|v| *v == 0.0));
        assert!(
            flat(model.head.bias().expect("bias"))
                .iter()
                .all(|v| *v == 0.0)
        );

        // A head of another class count than asked for is replaced, and the message says so.
        let opts = VimLoadOptions {
            num_classes: Some(classes + 3),
            ..load_opts()
        };
        let ckpt = VimCheckpoint::load(&model_dir, &opts).expect("load");
        assert!(ckpt.fresh_head);
        assert!(
            ckpt.notes
                .iter()
                .any(|n| n.contains(&classes.to_string()) && n.contains(&(classes + 3).to_string())),
            "{:?}",
            ckpt.notes
        );
        let model = ckpt.into_frozen().expect("build");
        assert_eq!(model.head.weight().dim(0).unwrap(), classes + 3);
    }
}

#[test]
fn a_misshaped_tensor_is_named_with_both_shapes() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let model_dir = case.path("model_dir");
        let mut tensors = base_tensors(&model_dir);
        let name = "layers.0.mixer.x_proj_b.weight";
        let t = tensors[name].clone();
        let (rows, cols) = t.dims2().expect("x_proj_b is 2-d");
        tensors.insert(name.into(), t.narrow(0, 0, rows - 1).expect("narrow"));
        tensors.remove("layers.0.mixer.D_b");
        let tmp = write_variant(&model_dir, &tensors, None);
        let e = VimCheckpoint::load(tmp.path(), &load_opts())
            .expect_err("must refuse")
            .to_string();
        assert!(
            e.contains(name)
                && e.contains(&format!("{}, {cols}", rows - 1))
                && e.contains(&format!("{rows}, {cols}"))
                && e.contains("model.safetensors"),
            "{e}"
        );
        assert!(e.contains("layers.0.mixer.D_b"), "{e}");
    }
}

#[test]
fn drop_path_is_off_in_eval_and_seeded_in_training() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let model_dir = case.path("model_dir");
        let refs = reference(&case.dir);
        let mut config = common::read_json(&model_dir.join("config.json"));
        config["drop_path_rate"] = serde_json::json!(0.5);
        let tmp = write_variant(&model_dir, &base_tensors(&model_dir), Some(&config));
        let model = VimForImageClassification::load(tmp.path(), &load_opts()).expect("load");
        // Repeat the batch so that drop-path masks have many samples to differ on.
        let pixels = &refs["pixel_values"];
        let pixels = Tensor::cat(&[pixels; 4], 0).expect("cat");
        let eval = flat(&model.forward(&pixels, Mode::Eval, None).expect("eval"));
        let want = flat(&Tensor::cat(&[&refs["logits"]; 4], 0).expect("cat"));
        for (a, b) in eval.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 + 1e-4 * b.abs(), "eval: {a} vs {b}");
        }
        let t1 = flat(
            &model
                .forward(&pixels, Mode::Train { seed: 7 }, None)
                .expect("train"),
        );
        let t2 = flat(
            &model
                .forward(&pixels, Mode::Train { seed: 7 }, None)
                .expect("train"),
        );
        let t3 = flat(
            &model
                .forward(&pixels, Mode::Train { seed: 8 }, None)
                .expect("train"),
        );
        assert_eq!(t1, t2, "same seed, same masks");
        assert_ne!(t1, eval, "training drops paths");
        assert_ne!(t1, t3, "another seed, other masks");
    }
}

#[test]
fn vim_preprocess_cases_match_pillow_and_torchvision() {
    use trainer::model::vim::EvalTransform;
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_preprocess") {
        let manifest = case.manifest();
        let refs = reference(&case.dir);
        let recipe = &manifest["recipe"];
        let size = recipe["input_size"].as_u64().expect("input_size") as usize;
        let mut tf = EvalTransform::for_image_size([size, size]);
        if let Some(r) = recipe["eval_crop_ratio"].as_f64() {
            tf.crop_ratio = r;
        }
        if let Some(want) = recipe["resize_short_side_to"].as_u64() {
            assert_eq!(tf.resize_to(), Some(want as usize), "{}", case.label);
        }
        let images = manifest["images"].as_array().expect("images");
        let mut crops = Vec::new();
        let mut pixels = Vec::new();
        for img in images {
            let file = case.dir.join(img["file"].as_str().expect("file"));
            let decoded = EvalTransform::decode(&file).expect("decode");
            let (u8s, [h, w]) = tf.crop_u8(&decoded).expect("crop");
            let as_f32: Vec<f32> = u8s.iter().map(|v| *v as f32).collect();
            crops.push(Tensor::from_vec(as_f32, (3, h, w), &Device::Cpu).expect("tensor"));
            pixels.push(tf.apply(&decoded, &Device::Cpu).expect("apply"));
        }
        let crops = Tensor::stack(&crops, 0).expect("stack");
        let pixels = Tensor::stack(&pixels, 0).expect("stack");
        for (name, class, _) in listed(&manifest) {
            let got = match name.as_str() {
                "crop_u8" => &crops,
                "preprocessed" => &pixels,
                other => panic!("{}: unknown tensor {other}", case.label),
            };
            assert_eq!(got.dims(), refs[&name].dims(), "{}: {name}", case.label);
            assert_close(
                &format!("{}: {name}", case.label),
                got,
                &refs[&name],
                &manifest,
                &class,
            );
        }
    }
}
