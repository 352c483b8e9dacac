//! The PEFT methods on Vision Mamba against `tests/fixtures/vim/methods/` (see its README):
//! every method folder of every Vim method set, walked by index; the spec of each folder is
//! read from its adapter tensors (ranks, blocks, N′) and its `method.json` (scales, α,
//! placement), never from constants. Checked: logits, loss, and the gradient of every
//! adapter tensor (the head included), with base weights frozen; for mergeable methods every
//! merged checkpoint tensor (`merged.*`, Additional-scan as an expanded-state model) and the
//! merged model's logits; a method without a merged form is refused.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};
use trainer::model::Family;
use trainer::model::vim::{
    Mode, VimCheckpoint, VimForImageClassification, VimLoadOptions, classification_loss,
};
use trainer::peft::{Adapter, AdapterSpec, PeftError};

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn base_model(dir: &Path) -> VimForImageClassification {
    VimCheckpoint::load(dir, &VimLoadOptions::default())
        .and_then(|c| c.into_frozen())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// First dim of `adapter[name]`.
fn dim0(adapter: &HashMap<String, Tensor>, name: &str) -> Option<usize> {
    adapter.get(name).and_then(|t| t.dims().first().copied())
}

/// One component's spec (`lora_x_proj`, `partial_cls_token`, `additional_scan_top`, …) from
/// the adapter's tensors and the hyperparameters.
fn component_json(name: &str, hp: &Value, adapter: &HashMap<String, Tensor>) -> Value {
    let name = name.split(" (").next().unwrap_or(name).trim();
    let s = |key: &str| {
        hp.get(key)
            .or_else(|| hp.get("s"))
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{name}: no scale in {hp}"))
    };
    if name == "base" {
        return json!({"type": "linear_probe"});
    }
    if let Some(slice) = name
        .strip_prefix("lora_p_")
        .or_else(|| name.strip_prefix("dora_p_"))
    {
        let family = if name.starts_with("lora_p") {
            "lora_p"
        } else {
            "dora_p"
        };
        let proj = if matches!(slice, "X" | "Z") {
            "in_proj"
        } else {
            "x_proj"
        };
        let r = dim0(adapter, &format!("layers.0.{proj}.{family}_{slice}.lora_A"))
            .unwrap_or_else(|| panic!("{name}: no lora_A"));
        let mut v =
            json!({"type": family, "slice": slice, "r": r, "s": s(&format!("s_p_{slice}"))});
        if family == "lora_p" {
            v["dropout"] = json!(0.0);
        }
        return v;
    }
    if let Some(target) = name.strip_prefix("partial_") {
        let target = match target {
            "A" => "A_log",
            "conv1d" => "conv1d.weight",
            "dt_bias" => "dt_proj.bias",
            other => other,
        };
        return json!({"type": "partial", "target": target});
    }
    if let Some(placement) = name.strip_prefix("additional_scan_") {
        let n_add =
            dim0(adapter, "layers.0.x_proj_scan_addi.weight").expect("x_proj_scan_addi") / 2;
        return json!({"type": "additional_scan", "n_add": n_add, "placement": placement});
    }
    if name.starts_with("prodial") {
        let mut targets = Vec::new();
        let mut r_b = serde_json::Map::new();
        for t in ["in_proj", "out_proj"] {
            if let Some(b) = dim0(adapter, &format!("layers.0.{t}.prodial.blocks")) {
                targets.push(t);
                r_b.insert(t.into(), json!(b));
            }
        }
        let r_eps = adapter
            .iter()
            .find(|(n, _)| n.contains(".prodial.lora_A"))
            .map(|(_, t)| t.dims()[0])
            .expect("prodial lora_A");
        return json!({"type": "prodial", "targets": targets, "r_b": r_b, "r_eps": r_eps,
                      "alpha": hp["alpha"], "dropout": 0.0});
    }
    if let Some(kind) = name.strip_prefix("prompt_") {
        let projection = adapter.contains_key("prompt.embedding");
        let table = if projection {
            "prompt.embedding"
        } else {
            "prompt.table"
        };
        let mut v = json!({"type": "prompt", "kind": kind.trim_end_matches("_proj"),
                           "n": dim0(adapter, table).expect("prompt n"), "projection": projection});
        if projection {
            v["hidden"] = json!(dim0(adapter, "prompt.fc1.weight"));
        }
        return v;
    }
    if let Some(kind) = name.strip_prefix("affix_") {
        let projection = adapter.contains_key("affix.embedding");
        let table = if projection {
            "affix.embedding"
        } else {
            "affix.table"
        };
        let mut v = json!({"type": "affix", "kind": "prefix",
                           "per_direction": kind.starts_with("dual"),
                           "n": dim0(adapter, table).expect("affix n"), "projection": projection});
        if projection {
            v["hidden"] = json!(dim0(adapter, "affix.fc1.weight"));
        }
        return v;
    }
    if name == "parallel_adapter" {
        let r = dim0(adapter, "layers.0.parallel_adapter.W_down").expect("W_down");
        return json!({"type": "parallel_adapter", "r": r, "s": s("s"), "dropout": 0.0});
    }
    if let Some(target) = name.strip_prefix("lora_") {
        let a = match target {
            "patch_embed" => "patch_embed.lora_A".to_string(),
            t => format!("layers.0.{t}.lora_A"),
        };
        let r = dim0(adapter, &a).unwrap_or_else(|| panic!("{name}: no {a}"));
        return json!({"type": "lora", "targets": target, "r": r, "s": s(&format!("s_{target}")),
                      "dropout": 0.0});
    }
    panic!("{name}: no spec mapping");
}

fn spec_for(meta: &Value, adapter: &HashMap<String, Tensor>) -> AdapterSpec {
    let hp = &meta["hyperparameters"];
    let v = if meta["family"] == "hybrid" {
        let methods: Vec<Value> = hp["components"]
            .as_array()
            .expect("hybrid components")
            .iter()
            .map(|c| component_json(c.as_str().expect("component"), hp, adapter))
            .collect();
        json!({"type": "hybrid", "methods": methods})
    } else {
        let name = meta["method"].as_str().unwrap_or("base");
        component_json(name, hp, adapter)
    };
    AdapterSpec::from_value(&v).unwrap_or_else(|e| panic!("spec {v}: {e}"))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max_abs")
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(
        &(a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32"))
            .expect("sub"),
    )
}

/// One method folder: logits, loss, every gradient. Returns the largest relative gradient
/// error.
fn run(dir: &Path, base: &VimForImageClassification, meta: &Value) -> f32 {
    let label = common::label(dir);
    let adapter_t = load(&dir.join("adapter.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let spec = spec_for(meta, &adapter_t);
    let adapter = Adapter::from_tensors(&spec, base, adapter_t.clone())
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(
        adapter.trainable_parameters(),
        adapter_t.values().map(Tensor::elem_count).sum::<usize>(),
        "{label}: trainable parameters"
    );
    let model = adapter
        .apply(base)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let pixels = &expected["pixel_values"];
    let logits = model.forward(pixels, Mode::Eval, None).expect("forward");
    let loss = classification_loss(&logits, &expected["labels"]).expect("loss");
    let d_logits = diff(&logits, &expected["logits"]);
    assert!(d_logits <= 1e-4, "{label}: logits differ by {d_logits}");
    let d_loss = diff(&loss.reshape(1).expect("loss"), &expected["loss"]);
    assert!(d_loss <= 1e-5, "{label}: loss differs by {d_loss}");
    let grads = loss.backward().expect("backward");
    let mut worst = 0f32;
    for (name, var) in adapter.vars() {
        let want = expected
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{label}: no reference gradient for {name}"));
        let got = grads
            .get(var.as_tensor())
            .cloned()
            .unwrap_or_else(|| var.as_tensor().zeros_like().expect("zeros"));
        let scale = max_abs(want);
        let err = diff(&got, want);
        if scale == 0.0 {
            assert!(
                err <= 1e-6,
                "{label}: grad.{name} should be zero, is off by {err}"
            );
            continue;
        }
        let rel = err / scale;
        assert!(
            rel <= 1e-3,
            "{label}: grad.{name} off by {rel} of its max |g| {scale}"
        );
        worst = worst.max(rel);
    }
    let merged = adapter.merge(base);
    // `base/` records no `mergeable`: the head alone merges into the base checkpoint.
    if meta["mergeable"].as_bool().unwrap_or(true) {
        let merged = merged.unwrap_or_else(|e| panic!("{label}: merge: {e}"));
        let mut weights: HashMap<String, Tensor> = merged.tensors().into_iter().collect();
        // A projection collapses to a fixed table, kept as a residual adapter.
        if let Some(r) = &merged.residual {
            weights.extend(r.named_tensors());
        }
        let mut compared = 0;
        for (key, want) in &expected {
            let Some(name) = key.strip_prefix("merged.") else {
                continue;
            };
            let got = weights
                .get(name)
                .unwrap_or_else(|| panic!("{label}: the merged model has no {name}"));
            assert_eq!(got.dims(), want.dims(), "{label}: merged {name}");
            let d = diff(got, want);
            assert!(
                d <= 1e-5 * (1.0 + max_abs(want)),
                "{label}: merged {name} off by {d}"
            );
            compared += 1;
        }
        let want = match expected.get("merged_logits") {
            Some(w) => {
                assert!(compared > 0, "{label}: no merged tensor compared");
                w
            }
            None => &expected["logits"],
        };
        let logits = merged
            .model()
            .expect("merged model")
            .forward(pixels, Mode::Eval, None)
            .expect("merged forward");
        let d = diff(&logits, want);
        assert!(d <= 1e-4, "{label}: merged logits differ by {d}");
    } else {
        match merged {
            // No weight form at all (ParallelAdapter).
            Err(err) => assert!(
                matches!(err, PeftError::NotMergeable { .. }),
                "{label}: {err}"
            ),
            // A prompt table stays a prompt: kept as the residual adapter, same function.
            Ok(m) => {
                assert!(m.residual.is_some(), "{label}: merged without a residual");
                let logits = m
                    .model()
                    .expect("merged model")
                    .forward(pixels, Mode::Eval, None)
                    .expect("merged forward");
                let d = diff(&logits, &expected["logits"]);
                assert!(d <= 1e-4, "{label}: merged logits differ by {d}");
            }
        }
    }
    worst
}

#[test]
fn every_vim_method_folder_matches_the_reference() {
    let sets = common::method_sets_of(Family::Vim);
    assert!(!sets.is_empty(), "no Vim method set under tests/fixtures");
    for (root, index, base_dir) in sets {
        let base = base_model(&base_dir);
        let mut ran = 0;
        // `base/` (linear probing: the head alone) is the set's reference, not in the list.
        let mut names: Vec<&str> = index["methods"]
            .as_array()
            .expect("methods")
            .iter()
            .map(|m| m["name"].as_str().expect("name"))
            .collect();
        if root.join("base").join("method.json").is_file() {
            names.push("base");
        }
        for name in names {
            let dir = root.join(name);
            let meta = common::read_json(&dir.join("method.json"));
            let worst = run(&dir, &base, &meta);
            eprintln!("{}: ok (grad rel ≤ {worst:.1e})", common::label(&dir));
            ran += 1;
        }
        assert!(ran > 0, "{}: no method ran", common::label(&root));
    }
}

#[test]
fn an_adapter_for_another_family_is_refused_naming_both() {
    let (_, _, vim_dir) = common::method_sets_of(Family::Vim)
        .into_iter()
        .next()
        .expect("a Vim method set");
    let vim = base_model(&vim_dir);
    let mamba_case = common::indexed_cases(trainer::model::Family::Mamba, "base")
        .into_iter()
        .next()
        .expect("a base case");
    let mamba = trainer::model::MambaForCausalLM::load(
        &mamba_case.path("model_dir"),
        &trainer::model::LoadOptions::default(),
    )
    .expect("mamba");
    let spec = AdapterSpec::from_value(&json!({"type": "lora", "targets": "in_proj", "r": 2}))
        .expect("spec");
    let adapter = Adapter::init(&spec, &mamba, 1).expect("init on mamba");
    let dir = tempfile::tempdir().expect("tempdir");
    adapter.save(dir.path()).expect("save");
    let err = Adapter::load(dir.path(), &vim).expect_err("a Mamba-1 adapter on Vim");
    let msg = err.to_string();
    assert!(msg.contains("mamba1") && msg.contains("vim"), "{msg}");
    let cfg = common::read_json(&dir.path().join(trainer::peft::CONFIG_FILE));
    assert_eq!(cfg["family"], "mamba", "{cfg}");
}

/// Methods with no Vim fixture (full fine-tuning, BitFit, DoRA, linear probing) and every
/// fixture method's spec: a freshly initialised adapter leaves the features unchanged (the
/// head starts at zero), and with random values the merged model equals the adapted one.
#[test]
fn zero_init_preserves_the_features_and_merged_equals_unmerged() {
    for (root, index, base_dir) in common::method_sets_of(Family::Vim) {
        let base = base_model(&base_dir);
        let pixels = &load(&root.join("base").join("expected.safetensors"))["pixel_values"];
        let want = base
            .forward_features(pixels, Mode::Eval, None)
            .expect("features");
        let mut specs = vec![
            json!({"type": "full"}),
            json!({"type": "bitfit"}),
            json!({"type": "dora", "targets": ["in_proj", "out_proj", "x_proj"], "r": 2}),
            json!({"type": "linear_probe"}),
            json!({"type": "lora", "targets": ["patch_embed", "dt_proj"], "r": 2}),
        ];
        for m in index["methods"].as_array().expect("methods") {
            let dir = root.join(m["name"].as_str().expect("name"));
            let meta = common::read_json(&dir.join("method.json"));
            let adapter = load(&dir.join("adapter.safetensors"));
            specs.push(spec_for(&meta, &adapter).to_value());
        }
        for v in specs {
            let spec = AdapterSpec::from_value(&v).expect("spec");
            let label = format!("{}: {v}", common::label(&root));
            let adapter = Adapter::init(&spec, &base, 7).unwrap_or_else(|e| panic!("{label}: {e}"));
            let adds_state = v["type"] == "additional_scan"
                || v["methods"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["type"] == "additional_scan"));
            let inserts = matches!(v["type"].as_str(), Some("prompt" | "affix"));
            if !adds_state && !inserts {
                let got = adapter
                    .apply(&base)
                    .expect("apply")
                    .forward_features(pixels, Mode::Eval, None)
                    .expect("features");
                let d = diff(&got, &want);
                assert!(
                    d <= 2e-6,
                    "{label}: a fresh adapter moves the features by {d}"
                );
            }
            // Random values everywhere (B factors, deltas, head), then merge.
            let random: HashMap<String, Tensor> = adapter
                .named_tensors()
                .into_iter()
                .map(|(n, t)| {
                    let noise = Tensor::randn(0f32, 0.05, t.dims(), &Device::Cpu).expect("randn");
                    (n, (t + noise).expect("add"))
                })
                .collect();
            let adapter = Adapter::from_tensors(&spec, &base, random).expect("from_tensors");
            let unmerged = adapter
                .apply(&base)
                .expect("apply")
                .forward(pixels, Mode::Eval, None)
                .expect("forward");
            match adapter.merge(&base) {
                Ok(m) => {
                    let merged = m
                        .model()
                        .expect("merged model")
                        .forward(pixels, Mode::Eval, None)
                        .expect("merged forward");
                    let d = diff(&merged, &unmerged);
                    assert!(d <= 1e-4, "{label}: merged differs from unmerged by {d}");
                }
                Err(PeftError::NotMergeable { .. }) if v["type"] == "parallel_adapter" => {}
                Err(e) => panic!("{label}: merge: {e}"),
            }
        }
    }
}

/// Trainable parameters at Vim-tiny's shape (224², patch 16, 24 layers, D 192, N 16) with
/// Caltech-101's 102-class head, against ProDiaL's Table 3 (in millions, two decimals; its
/// hyperparameters from Table 11: LoRA r 16, ProDiaL r_b (192, 384), r_ε 16). Shape only.
#[test]
fn parameter_counts_match_prodial_table_3_at_vim_tiny() {
    let cfg = trainer::model::vim::VimConfig::from_value(
        &json!({"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 24,
                "d_state": 16, "num_classes": 102, "use_middle_cls_token": true,
                "if_divide_out": true, "bimamba_type": "v2", "rms_norm": true,
                "residual_in_fp32": true, "fused_add_norm": true,
                "final_pool_type": "mean", "if_abs_pos_embed": true, "if_cls_token": true}),
        Path::new("config.json"),
    )
    .expect("Vim-tiny config");
    let millions = |v: Value| {
        let n = AdapterSpec::from_value(&v)
            .expect("spec")
            .trainable_parameters(&cfg);
        (n as f64 / 1e4).round() / 100.0
    };
    for (spec, want) in [
        (
            json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": 16}),
            0.61,
        ),
        (json!({"type": "lora", "targets": "in_proj", "r": 16}), 0.39),
        (
            json!({"type": "lora", "targets": "out_proj", "r": 16}),
            0.24,
        ),
        (
            json!({"type": "prodial", "targets": ["in_proj", "out_proj"],
                "r_b": {"in_proj": 192, "out_proj": 384}, "r_eps": 16}),
            0.65,
        ),
        (
            json!({"type": "prodial", "targets": "in_proj", "r_b": 192, "r_eps": 16}),
            0.41,
        ),
        (json!({"type": "linear_probe"}), 0.02),
    ] {
        assert_eq!(millions(spec.clone()), want, "{spec}");
    }
}

/// A method on a site the family lacks is refused before anything is built, naming the
/// method, the family and why.
#[test]
fn methods_on_sites_a_family_lacks_are_refused_naming_them() {
    let (_, _, vim_dir) = common::method_sets_of(Family::Vim)
        .into_iter()
        .next()
        .expect("a Vim method set");
    let vim = base_model(&vim_dir);
    let mamba_case = common::indexed_cases(trainer::model::Family::Mamba, "base")
        .into_iter()
        .next()
        .expect("a base case");
    let mamba = trainer::model::MambaForCausalLM::load(
        &mamba_case.path("model_dir"),
        &trainer::model::LoadOptions::default(),
    )
    .expect("mamba");
    let refused = |v: Value, on_vim: bool| -> String {
        let spec = AdapterSpec::from_value(&v).expect("spec");
        let err = if on_vim {
            Adapter::init(&spec, &vim, 0).expect_err("refused on vim")
        } else {
            Adapter::init(&spec, &mamba, 0).expect_err("refused on mamba")
        };
        err.to_string()
    };
    for (v, on_vim, needles) in [
        (
            json!({"type": "lora", "targets": "embedding", "r": 2}),
            true,
            vec!["lora on the embedding", "vim", "no token embedding"],
        ),
        (
            json!({"type": "affix", "n": 2, "kind": "infix"}),
            true,
            vec!["affix with kind Infix", "vim", "prefix"],
        ),
        (
            json!({"type": "lora", "targets": "patch_embed", "r": 2}),
            false,
            vec!["lora on patch_embed", "mamba", "no patch embedding"],
        ),
        (
            json!({"type": "partial", "target": "cls_token"}),
            false,
            vec!["partial tuning of `cls_token`", "mamba", "no class token"],
        ),
        (
            json!({"type": "affix", "n": 2, "per_direction": true}),
            false,
            vec!["per_direction", "bidirectional", "mamba"],
        ),
    ] {
        let msg = refused(v.clone(), on_vim);
        for n in needles {
            assert!(msg.contains(n), "{v}: {msg:?} lacks {n:?}");
        }
    }
}
