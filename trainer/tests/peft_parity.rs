//! Parity with HF PEFT's LoRA and DoRA (peft 0.21.2 on transformers' pure-PyTorch Mamba,
//! float32, CPU) on every `adapter` case of every fixture case set (`tests/fixtures/index.json`
//! and `alt/index.json`, see `common`). The adapters are
//! PEFT's own folders (`adapter_config.json` + `adapter_model.safetensors`); r, alpha, the
//! targets and DoRA come from the config, names and tolerances from each case's manifest, so
//! a case added in the same format runs with no code change.
//!
//! Checks: logits, loss, the primary `grad.*` (dt_proj LoRA applied as the merge applies it,
//! not PEFT's unmerged forward, which skips it; fixtures README "Two PEFT quirks"), merged
//! weights and merged logits, DoRA row norms, and a save → reload round trip (same keys,
//! shapes, config keys and numbers).
//!
//! Tolerances (manifest `tolerances`): |got − want| ≤ atol + rtol·|want| elementwise —
//! logits 1e-4/1e-4, loss 1e-5/1e-5, grads 1e-5/1e-3 plus relative L2 ≤ 1e-4, weights
//! 1e-6/1e-5.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use trainer::model::mamba2::Mamba2Mixer;
use trainer::model::{CausalLm, Family, LoadOptions, MambaMixer, causal_lm_loss};
use trainer::peft::{
    Adapter, CONFIG_FILE, MethodConfig, MixerSites, PeftBase, WEIGHTS_FILE, to_peft_name,
};

mod common;
use common::read_json;

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to_vec")
}

struct Tol {
    atol: f32,
    rtol: f32,
    rel_l2: Option<f32>,
}

struct Case {
    family: Family,
    name: String,
    model_dir: PathBuf,
    adapter_dir: PathBuf,
    manifest: Value,
    reference: HashMap<String, Tensor>,
}

impl Case {
    fn want(&self, name: &str) -> &Tensor {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("{}: reference has no `{name}`", self.name))
    }

    fn tol(&self, name: &str) -> Tol {
        let class = self.manifest["tensors"]["reference.safetensors"][name]["tolerance"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no tolerance class for `{name}`", self.name));
        let t = &self.manifest["tolerances"][class];
        Tol {
            atol: t["atol"].as_f64().unwrap_or(0.0) as f32,
            rtol: t["rtol"].as_f64().unwrap_or(0.0) as f32,
            rel_l2: t["rel_l2"].as_f64().map(|v| v as f32),
        }
    }

    /// Compares `got` with reference `name` under its tolerance class; returns max|diff|.
    fn check(&self, name: &str, got: &Tensor) -> f32 {
        let want = self.want(name);
        assert_eq!(got.dims(), want.dims(), "{}: `{name}` shape", self.name);
        let tol = self.tol(name);
        let (g, w) = (vec_f32(got), vec_f32(want));
        let mut worst = 0f32;
        let (mut num, mut den) = (0f64, 0f64);
        for (k, (a, b)) in g.iter().zip(&w).enumerate() {
            let d = (a - b).abs();
            worst = worst.max(d);
            num += f64::from(d).powi(2);
            den += f64::from(*b).powi(2);
            assert!(
                d <= tol.atol + tol.rtol * b.abs(),
                "{}: `{name}`[{k}]: got {a}, want {b}",
                self.name
            );
        }
        if let Some(l2) = tol.rel_l2
            && den > 0.0
        {
            let rel = (num / den).sqrt() as f32;
            assert!(
                rel <= l2,
                "{}: `{name}` relative L2 {rel} > {l2}",
                self.name
            );
        }
        worst
    }
}

/// A base checkpoint of the language family `M` mixes for.
fn load_lm<M: MixerSites>(dir: &std::path::Path) -> CausalLm<M> {
    CausalLm::<M>::load(dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The adapter cases of the language families (Mamba-1, then Mamba-2).
fn adapter_cases() -> Vec<Case> {
    [Family::Mamba, Family::Mamba2]
        .into_iter()
        .flat_map(|f| {
            common::indexed_cases(f, "adapter")
                .into_iter()
                .map(move |c| (f, c))
        })
        .map(|(family, c)| Case {
            family,
            model_dir: c.path("model_dir"),
            adapter_dir: c.path("adapter_dir"),
            manifest: c.manifest(),
            reference: candle_core::safetensors::load(
                c.dir.join("reference.safetensors"),
                &Device::Cpu,
            )
            .expect("reference.safetensors"),
            name: c.label,
        })
        .collect()
}

/// Every number of one case for `adapter` on `base`; returns a summary line.
fn check_numbers<M: MixerSites>(c: &Case, base: &CausalLm<M>, adapter: &Adapter) -> String {
    let ids = c.want("input_ids");
    let model = adapter.apply(base).expect("apply");
    let logits = model.forward(ids, None).expect("forward");
    let d_logits = c.check("logits", &logits);
    let loss = causal_lm_loss(&logits, ids).expect("loss");
    let d_loss = c.check("loss", &loss.reshape(1).expect("reshape"));

    let grads = loss.backward().expect("backward");
    let mut d_grad = 0f32;
    let mut seen = 0;
    for (name, var) in adapter.vars() {
        let (peft, transposed) =
            to_peft_name(name).unwrap_or_else(|| panic!("no PEFT name for {name}"));
        let key = format!("grad.{peft}");
        let g = grads
            .get(var.as_tensor())
            .cloned()
            .unwrap_or_else(|| var.as_tensor().zeros_like().expect("zeros"));
        let g = if transposed { g.t().expect("t") } else { g };
        d_grad = d_grad.max(c.check(&key, &g));
        seen += 1;
    }
    let declared = c
        .reference
        .keys()
        .filter(|k| k.starts_with("grad.") && !k.starts_with("grad.peft_unmerged"))
        .count();
    assert_eq!(seen, declared, "{}: gradient count", c.name);

    let merged = adapter.merge(base).expect("merge");
    let tensors = merged.tensors();
    let mut d_w = 0f32;
    let prefix = "merged.weight.";
    let mut names: Vec<&String> = c
        .reference
        .keys()
        .filter(|k| k.starts_with(prefix))
        .collect();
    names.sort();
    for k in names {
        let got = tensors
            .get(k.trim_start_matches(prefix))
            .unwrap_or_else(|| panic!("{}: merged checkpoint lacks {k}", c.name));
        d_w = d_w.max(c.check(k, got));
    }
    let merged_logits = merged
        .model()
        .and_then(|m| Ok(m.forward(ids, None)?))
        .expect("merged forward");
    let d_ml = c.check("merged.logits", &merged_logits);
    let mut line = format!(
        "{:12} logits {d_logits:.2e}  loss {d_loss:.2e}  grad {d_grad:.2e}  merged-w {d_w:.2e}  merged-logits {d_ml:.2e}",
        c.name
    );

    // DoRA: ‖W + s·B·A‖ per output row.
    if let [MethodConfig::Dora(d)] = adapter.spec().methods.as_slice() {
        let weights: HashMap<String, Tensor> = base.named_weights().into_iter().collect();
        let mut d_n = 0f32;
        let keys: Vec<String> = c
            .reference
            .keys()
            .filter(|k| k.starts_with("aux.dora_weight_norm."))
            .cloned()
            .collect();
        assert!(!keys.is_empty(), "{}: no DoRA norms", c.name);
        for k in keys {
            let module = k.trim_start_matches("aux.dora_weight_norm.");
            let w = &weights[&format!("{module}.weight")];
            // backbone.layers.{i}.mixer.{proj} → layers.{i}.{proj}.dora.*
            let rest = module
                .trim_start_matches("backbone.")
                .replace(".mixer.", ".");
            let a = adapter.vars()[&format!("{rest}.dora.lora_A")].as_tensor();
            let b = adapter.vars()[&format!("{rest}.dora.lora_B")].as_tensor();
            let v = (w + (b.matmul(a).expect("ba") * d.scale()).expect("scale")).expect("v");
            let n = v
                .sqr()
                .and_then(|t| t.sum(1))
                .and_then(|t| t.sqrt())
                .expect("norm");
            d_n = d_n.max(c.check(&k, &n));
        }
        line += &format!("  dora-norm {d_n:.2e}");
    }
    line
}

#[test]
fn peft_lora_and_dora_adapters_match() {
    let mut lines = Vec::new();
    for c in adapter_cases() {
        lines.push(match c.family {
            Family::Mamba => peft_adapter_matches::<MambaMixer>(&c),
            Family::Mamba2 => peft_adapter_matches::<Mamba2Mixer>(&c),
            other => panic!("{}: {other} is not a language family", c.name),
        });
    }
    eprintln!("measured parity with HF PEFT (max abs diffs):");
    for l in lines {
        eprintln!("  {l}");
    }
}

/// One HF PEFT adapter folder: its numbers, then a save → reload round trip.
fn peft_adapter_matches<M: MixerSites>(c: &Case) -> String {
    {
        let base = load_lm::<M>(&c.model_dir);
        let adapter = Adapter::load(&c.adapter_dir, &base)
            .unwrap_or_else(|e| panic!("{}: load adapter: {e}", c.name));
        // r, alpha, targets and DoRA come from adapter_config.json.
        let cfg = read_json(&c.adapter_dir.join(CONFIG_FILE));
        let spec = serde_json::to_value(&adapter.spec().methods[0]).expect("spec json");
        assert_eq!(spec["r"], cfg["r"], "{}", c.name);
        assert_eq!(
            spec["alpha"].as_f64(),
            cfg["lora_alpha"].as_f64(),
            "{}",
            c.name
        );
        assert_eq!(
            spec["type"],
            if cfg["use_dora"] == true {
                "dora"
            } else {
                "lora"
            },
            "{}",
            c.name
        );
        let line = check_numbers(c, &base, &adapter);

        // Save what molt loaded, reload it: same keys and shapes, same config keys, and
        // the same numbers.
        let dir = tempfile::tempdir().expect("tempdir");
        adapter.save(dir.path()).expect("save");
        let orig = candle_core::safetensors::load(c.adapter_dir.join(WEIGHTS_FILE), &Device::Cpu)
            .expect("original tensors");
        let ours = candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &Device::Cpu)
            .expect("saved tensors");
        let shapes = |m: &HashMap<String, Tensor>| {
            let mut v: Vec<(String, Vec<usize>)> = m
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            shapes(&ours),
            shapes(&orig),
            "{}: saved keys/shapes",
            c.name
        );
        for (k, t) in &orig {
            assert_eq!(
                vec_f32(&ours[k]),
                vec_f32(t),
                "{}: saved `{k}` differs",
                c.name
            );
        }
        let saved_cfg = read_json(&dir.path().join(CONFIG_FILE));
        for key in ["peft_type", "r", "lora_alpha", "use_dora", "bias"] {
            assert_eq!(saved_cfg[key], cfg[key], "{}: config key `{key}`", c.name);
        }
        let mut t1: Vec<String> = saved_cfg["target_modules"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect();
        let mut t2: Vec<String> = cfg["target_modules"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect();
        t1.sort();
        t2.sort();
        assert_eq!(t1, t2, "{}: target_modules", c.name);
        let reloaded = Adapter::load(dir.path(), &base).expect("reload");
        let ids = c.want("input_ids");
        let a = adapter
            .apply(&base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("a");
        let b = reloaded
            .apply(&base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("b");
        assert_eq!(
            vec_f32(&a),
            vec_f32(&b),
            "{}: reloaded adapter logits",
            c.name
        );
        check_numbers(c, &base, &reloaded);
        line
    }
}

/// Adapters of every other method round-trip through save/load with the same tensors and
/// spec, and a reloaded adapter reproduces the logits bit for bit.
/// Every base model of the case sets, with the first row of its case's `input_ids`.
fn base_models<M: MixerSites>(family: Family) -> Vec<(String, CausalLm<M>, Tensor)> {
    common::indexed_cases(family, "base")
        .into_iter()
        .map(|c| {
            let base = load_lm::<M>(&c.path("model_dir"));
            let reference =
                candle_core::safetensors::load(c.dir.join("reference.safetensors"), &Device::Cpu)
                    .expect("reference.safetensors");
            let ids = reference["input_ids"].narrow(0, 0, 1).expect("row 0");
            (c.label, base, ids)
        })
        .collect()
}

#[test]
fn molt_adapters_round_trip() {
    for (label, base, ids) in base_models::<MambaMixer>(Family::Mamba) {
        let specs = mamba1_round_trip_specs(&base);
        molt_adapters_round_trip_on(&label, &base, &ids, &specs);
    }
    for (label, base, ids) in base_models::<Mamba2Mixer>(Family::Mamba2) {
        molt_adapters_round_trip_on(&label, &base, &ids, &mamba2_specs());
    }
}

/// Mamba-2's methods (spec §8), stacked and alone, with non-zero starts.
fn mamba2_specs() -> Vec<Value> {
    vec![
        serde_json::json!({"type": "lora", "targets": ["in_proj", "out_proj", "embedding"], "r": 4, "zero_init": false}),
        serde_json::json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": 4, "alpha": 8, "dropout": 0.0, "zero_init": false}),
        serde_json::json!({"type": "dora", "targets": ["in_proj"], "r": 2, "zero_init": false}),
        serde_json::json!({"type": "prodial", "targets": "both", "r_b": {"in_proj": 2, "out_proj": 2}, "r_eps": 2}),
        serde_json::json!({"type": "hybrid", "methods": [
            {"type": "prompt", "n": 2, "kind": "prefix"},
            {"type": "lora_p", "slice": "B", "r": 2, "zero_init": false},
            {"type": "lora_p", "slice": "dt", "r": 2, "zero_init": false},
            {"type": "dora_p", "slice": "X", "r": 2, "zero_init": false},
            {"type": "partial", "target": "norm.weight", "lr": 1e-3},
            {"type": "partial", "target": "dt_bias"},
            {"type": "parallel_adapter", "r": 4, "zero_init": false},
        ]}),
        serde_json::json!({"type": "bitfit"}),
        serde_json::json!({"type": "linear_probe"}),
    ]
}

fn mamba1_round_trip_specs(base: &trainer::model::MambaForCausalLM) -> Vec<Value> {
    vec![
        serde_json::json!({"type": "lora", "targets": ["in_proj", "embedding"], "r": 4, "zero_init": false}),
        serde_json::json!({"type": "lora", "targets": ["x_proj", "out_proj"], "r": 4, "alpha": 8, "dropout": 0.0, "zero_init": false}),
        serde_json::json!({"type": "dora", "targets": ["in_proj", "dt_proj"], "r": 2, "zero_init": false}),
        serde_json::json!({"type": "prodial", "targets": "both", "r_b": common::prodial_blocks(base.config()), "r_eps": 2}),
        serde_json::json!({"type": "hybrid", "methods": [
            {"type": "affix", "n": 2, "projection": true, "hidden": 16},
            {"type": "prompt", "n": 2, "kind": "infix"},
            {"type": "additional_scan", "n_add": 3, "placement": "bottom", "a_init": "s4d"},
            {"type": "partial", "target": "D", "lr": 1e-3},
            {"type": "parallel_adapter", "r": 4, "zero_init": false},
        ]}),
        serde_json::json!({"type": "bitfit"}),
        serde_json::json!({"type": "linear_probe"}),
    ]
}

fn molt_adapters_round_trip_on<M: MixerSites>(
    label: &str,
    base: &CausalLm<M>,
    ids: &Tensor,
    specs: &[Value],
) {
    for v in specs {
        let spec = trainer::peft::AdapterSpec::from_value(v).expect("spec");
        let adapter = Adapter::init(&spec, base, 9).expect("init");
        let dir = tempfile::tempdir().expect("tempdir");
        adapter.save(dir.path()).expect("save");
        let back = Adapter::load(dir.path(), base).unwrap_or_else(|e| panic!("{label}: {v}: {e}"));
        assert_eq!(back.spec(), adapter.spec(), "{label}: {v}");
        assert_eq!(
            back.trainable_parameters(),
            adapter.trainable_parameters(),
            "{label}: {v}"
        );
        for (n, t) in adapter.named_tensors() {
            assert_eq!(
                vec_f32(back.vars()[&n].as_tensor()),
                vec_f32(&t),
                "{label}: {v}: {n}"
            );
        }
        let a = adapter
            .apply(base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("a");
        let b = back
            .apply(base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("b");
        assert_eq!(vec_f32(&a), vec_f32(&b), "{label}: {v}");
        let cfg = read_json(&dir.path().join(CONFIG_FILE));
        assert!(cfg["peft_type"].is_string(), "{label}: {v}: {cfg}");
        let alpha_lora = v["type"] == "dora" || v.get("alpha").is_some();
        if !alpha_lora {
            assert!(
                cfg["base_model_identity"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("sha256:"))
            );
            assert_eq!(cfg["spec"], adapter.spec().to_value());
        } else {
            assert!(cfg["molt"]["base_model_identity"].is_string());
        }
    }
}

/// A merged model saved as an HF checkpoint loads with molt's loader and gives the merged
/// logits, including the expanded-state (Additional-scan) and untied-head (embedding LoRA)
/// cases.
#[test]
fn merged_checkpoints_load_back() {
    for (label, base, ids) in base_models::<MambaMixer>(Family::Mamba) {
        let specs = [
            serde_json::json!({"type": "hybrid", "methods": [
                {"type": "lora", "targets": ["embedding", "dt_proj"], "r": 4, "zero_init": false},
                {"type": "additional_scan", "n_add": 2},
                {"type": "dora_p", "slice": "X", "r": 2, "zero_init": false},
            ]}),
            serde_json::json!({"type": "prompt", "n": 3, "projection": true}),
        ];
        merged_checkpoints_load_back_on(&label, &base, &ids, &specs);
    }
    for (label, base, ids) in base_models::<Mamba2Mixer>(Family::Mamba2) {
        let specs = [
            serde_json::json!({"type": "hybrid", "methods": [
                {"type": "lora", "targets": ["embedding", "in_proj"], "r": 4, "zero_init": false},
                {"type": "lora_p", "slice": "C", "r": 2, "zero_init": false},
                {"type": "dora_p", "slice": "X", "r": 2, "zero_init": false},
                {"type": "partial", "target": "A_log"},
            ]}),
            serde_json::json!({"type": "prompt", "n": 3, "projection": true}),
        ];
        merged_checkpoints_load_back_on(&label, &base, &ids, &specs);
    }
}

/// The merged checkpoint is written in the family's HF format and read back by the family's
/// own loader (the config records an untied head where the embedding LoRA untied it).
fn merged_checkpoints_load_back_on<M: MixerSites>(
    label: &str,
    base: &CausalLm<M>,
    ids: &Tensor,
    specs: &[Value],
) {
    for v in specs {
        let spec = trainer::peft::AdapterSpec::from_value(v).expect("spec");
        let adapter = Adapter::init(&spec, base, 5).expect("init");
        let want = adapter
            .apply(base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("want");
        let merged = adapter.merge(base).expect("merge");
        let dir = tempfile::tempdir().expect("tempdir");
        merged.save(dir.path()).expect("save merged");
        assert_eq!(
            trainer::model::family::detect_dir(dir.path()).expect("family"),
            base.peft_shape().family,
            "{label}: the merged config names the family"
        );
        let loaded = load_lm::<M>(dir.path());
        let got = match merged.residual {
            Some(_) => {
                let residual = Adapter::load(dir.path(), &loaded).expect("residual adapter");
                residual
                    .apply(&loaded)
                    .expect("apply")
                    .forward(ids, None)
                    .expect("forward")
            }
            None => loaded.forward(ids, None).expect("forward"),
        };
        let d = (got - &want)
            .and_then(|t| t.abs())
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("diff");
        assert!(
            d <= 1e-5,
            "{label}: {v}: merged checkpoint logits differ by {d}"
        );
    }
}
