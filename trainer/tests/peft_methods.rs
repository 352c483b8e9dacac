//! Parity of every MambaPEFT/ProDiaL method with the reference fixtures in every method set
//! (`tests/fixtures/methods/` and `methods_alt/`, other shapes; see `common`): a
//! self-contained PyTorch reference written from peft-spec.md, float32, CPU; its base forward
//! matches `transformers.MambaForCausalLM` to 9.5e-7, see the folder's README. The tests walk
//! each set's `index.json`; each folder's hyperparameters come from its `method.json` (ranks
//! are read from the adapter's tensor shapes where a hybrid's keys do not name them), and
//! every size from the set's checkpoint, so a new folder or set in the same format runs with
//! no code change.
//!
//! Tolerances (README "Tolerances"): logits atol 1e-4; loss 1e-5; gradients atol 1e-5 +
//! rtol 1e-3 of the tensor's max|g| (exactly-zero-by-construction entries: |g| ≤ 1e-9);
//! merged weights atol 1e-6 + rtol 1e-5; merged vs unmerged logits ≤ 1e-5; initial states
//! atol 1e-4.
//!
//! Also here: zero-init adapters reproduce the base logits, the spec §10 parameter table on
//! shape-only configs, and bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};
use trainer::model::mamba2::Mamba2Mixer;
use trainer::model::{
    CausalLm, Family, LoadOptions, MambaConfig, MambaForCausalLM, MambaMixer, causal_lm_loss,
};
use trainer::peft::{
    Adapter, AdapterSpec, InitialState, MergeOptions, MixerSites, ModelShape, PeftBase, PeftError,
    Slice, augmented_logits,
};

mod common;
use common::read_json;

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_scalar::<f32>())
        .unwrap_or(f32::NAN)
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).expect("f32");
    let b = b.to_dtype(DType::F32).expect("f32");
    max_abs(&(a - b).expect("sub"))
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to_vec")
}

/// Gradient check: |got − want| ≤ 1e-5 + 1e-3·max|want| everywhere, and exact zeros stay
/// (near) zero. Returns max|got − want| / max|want|.
fn check_grad(ctx: &str, got: Option<&Tensor>, want: &Tensor) -> f32 {
    let want_v = vec_f32(want);
    let got_v = match got {
        Some(g) => vec_f32(g),
        // No gradient reached the tensor: it is zero.
        None => vec![0.0; want_v.len()],
    };
    assert_eq!(got_v.len(), want_v.len(), "{ctx}: gradient size");
    let scale = want_v.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (k, (g, w)) in got_v.iter().zip(&want_v).enumerate() {
        let d = (g - w).abs();
        worst = worst.max(d);
        if *w == 0.0 {
            assert!(
                g.abs() <= 1e-9,
                "{ctx}: element {k} is zero by construction, got {g}"
            );
        }
        assert!(
            d <= 1e-5 + 1e-3 * scale,
            "{ctx}: element {k}: got {g}, want {w} (max|g| {scale})"
        );
    }
    if scale > 0.0 { worst / scale } else { worst }
}

fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str, ctx: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("{ctx}: expected.safetensors has no `{k}`"))
}

// ---- method.json → AdapterSpec ------------------------------------------------------------

/// The slice name of rows `[start, end)` of `target` in a model of shape `cfg` (the slices'
/// rows as molt lays them out for the family).
fn slice_of(cfg: &ModelShape, target: &str, rows: &Value) -> String {
    let start = rows[0].as_u64().expect("rows[0]") as usize;
    let end = rows[1].as_u64().expect("rows[1]") as usize;
    ["X", "Z", "dt", "B", "C"]
        .into_iter()
        .find(|name| {
            let slice = Slice::parse("lora_p", name).expect("slice");
            let (s, len) = slice.rows(cfg);
            slice.proj(cfg).name() == target && s == start && s + len == end
        })
        .map(str::to_string)
        .unwrap_or_else(|| panic!("rows {start}..{end} of {target} are no known slice"))
}

/// First dim of the first adapter tensor whose name ends with `suffix` and contains `infix`.
fn rank_from(adapter: &HashMap<String, Tensor>, infix: &str, suffix: &str) -> Option<u64> {
    let mut names: Vec<&String> = adapter
        .keys()
        .filter(|n| n.contains(infix) && n.ends_with(suffix))
        .collect();
    names.sort();
    names
        .first()
        .and_then(|n| adapter[*n].dims().first().map(|d| *d as u64))
}

/// `hp[key_specific]`, else `hp[key]`.
fn hp_or<'a>(hp: &'a Value, specific: &str, key: &str) -> &'a Value {
    match hp.get(specific) {
        Some(v) if !v.is_null() => v,
        _ => &hp[key],
    }
}

/// A method's scale: `s_<component>`, `s_<suffix>`, else `s`.
fn scale(hp: &Value, component: &str, suffix: &str) -> f64 {
    [
        format!("s_{component}"),
        format!("s_{suffix}"),
        "s".to_string(),
    ]
    .iter()
    .find_map(|k| hp.get(k).and_then(Value::as_f64))
    .unwrap_or_else(|| panic!("no scale `s` for {component} in {hp}"))
}

/// One method's spec JSON from its family and hyperparameters.
fn method_json(
    family: &str,
    component: &str,
    hp: &Value,
    cfg: &ModelShape,
    adapter: &HashMap<String, Tensor>,
) -> Value {
    let suffix = component
        .split_once('_')
        .map(|(_, s)| s)
        .unwrap_or("")
        .to_string();
    match family {
        "lora" => {
            let target = hp
                .get("target")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| suffix.clone());
            let target = if target == "embeddings" {
                "embedding".to_string()
            } else {
                target
            };
            let infix = if target == "embedding" {
                "embeddings.".to_string()
            } else {
                format!(".{target}.lora_")
            };
            // The whole-matrix factors have no `lora_p`/`prodial` in their names.
            let r = rank_from(
                &adapter
                    .iter()
                    .filter(|(n, _)| {
                        !n.contains("lora_p") && !n.contains("prodial") && !n.contains("dora")
                    })
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect(),
                &infix,
                if target == "embedding" {
                    "lora_B"
                } else {
                    "lora_A"
                },
            )
            .or_else(|| hp_or(hp, &format!("r_{suffix}"), "r").as_u64())
            .expect("lora rank");
            let s = scale(hp, component, &suffix);
            json!({"type": "lora", "targets": target, "r": r, "s": s, "dropout": 0.0})
        }
        "lora_p" | "dora_p" => {
            let slice = match (hp.get("target").and_then(Value::as_str), hp.get("rows")) {
                (Some(t), Some(rows)) if !rows.is_null() => slice_of(cfg, t, rows),
                _ => suffix.rsplit('_').next().expect("slice").to_string(),
            };
            let r = rank_from(adapter, &format!(".{family}_{slice}."), "lora_A")
                .or_else(|| hp_or(hp, &format!("r_p_{slice}"), "r").as_u64())
                .expect("rank");
            let s = scale(hp, component, &format!("p_{slice}"));
            let mut v = json!({"type": family, "slice": slice, "r": r, "s": s});
            if family == "lora_p" {
                v["dropout"] = json!(0.0);
            }
            v
        }
        "parallel_adapter" => json!({
            "type": "parallel_adapter",
            "r": rank_from(adapter, "parallel_adapter", "W_down").or_else(|| hp["r"].as_u64()),
            "s": scale(hp, component, &suffix), "dropout": 0.0,
        }),
        "prompt" | "affix" => {
            // Structure from the tensors (n, projection, hidden), layout from the
            // hyperparameters or the component name (`prompt_infix`).
            let dim0 = |leaf: &str| {
                adapter
                    .get(&format!("{family}.{leaf}"))
                    .and_then(|t| t.dims().first().copied())
            };
            let projection = adapter.contains_key(&format!("{family}.embedding"));
            let n = dim0(if projection { "embedding" } else { "table" })
                .map(|n| n as u64)
                .or_else(|| hp["n"].as_u64());
            let kind = hp
                .get("kind")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| suffix.trim_end_matches("_proj").to_string());
            let mut v = json!({"type": family, "n": n, "kind": kind, "projection": projection});
            if projection {
                v["hidden"] = json!(dim0("fc1.weight"));
            }
            v
        }
        "partial" => {
            let target = hp
                .get("target")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(suffix);
            json!({"type": "partial", "target": target})
        }
        "additional_scan" => {
            let placement = hp
                .get("placement")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| suffix.rsplit('_').next().unwrap_or("top").to_string());
            let n_add = rank_from(adapter, "x_proj_scan_addi", "weight")
                .map(|two| two / 2)
                .or_else(|| hp["n_add"].as_u64());
            // "copy A_log[:, 0]" (the fixtures' wording), "s4d", "constant ...".
            let a_init = hp
                .get("A_init")
                .and_then(Value::as_str)
                .map(|a| a.to_lowercase())
                .unwrap_or_default();
            let mut v = json!({"type": "additional_scan", "n_add": n_add, "placement": placement});
            if a_init.contains("s4d") {
                v["a_init"] = json!("s4d");
            } else if a_init.contains("const") {
                v["a_init"] = json!("constant");
                if let Some(c) = hp.get("A_const").or_else(|| hp.get("a_value")) {
                    v["a_value"] = c.clone();
                }
            }
            v
        }
        "prodial" => {
            // Targets and block counts from the tensors; alpha and r_eps as given.
            let mut targets = Vec::new();
            let mut r_b = serde_json::Map::new();
            for t in ["in_proj", "out_proj"] {
                let key = format!("layers.0.{t}.prodial.blocks");
                if let Some(b) = adapter.get(&key) {
                    targets.push(t);
                    r_b.insert(t.to_string(), json!(b.dims()[0]));
                }
            }
            let r_eps = rank_from(adapter, ".prodial.", "lora_A").or_else(|| hp["r_eps"].as_u64());
            {
                let mut v = json!({
                    "type": "prodial", "targets": targets, "r_b": r_b, "r_eps": r_eps, "dropout": 0.0,
                });
                if let Some(a) = hp.get("alpha").filter(|a| !a.is_null()) {
                    v["alpha"] = a.clone();
                }
                v
            }
        }
        other => panic!("no spec mapping for family `{other}`"),
    }
}

/// A hybrid component name (`lora_in_proj`, `partial_A`, `additional_scan_top (N'=1)`) →
/// (family, hyperparameters for that family).
fn component(name: &str, hp: &Value) -> (String, Value) {
    let name = name.split(" (").next().unwrap_or(name).trim();
    let families = [
        "additional_scan",
        "parallel_adapter",
        "lora_p",
        "dora_p",
        "prodial",
        "partial",
        "prompt",
        "affix",
        "lora",
    ];
    let family = families
        .iter()
        .find(|f| name == **f || name.starts_with(&format!("{f}_")))
        .unwrap_or_else(|| panic!("unknown hybrid component `{name}`"));
    let rest = name
        .strip_prefix(family)
        .unwrap_or("")
        .trim_start_matches('_');
    let mut hp = hp.clone();
    match *family {
        "lora" => hp["target"] = json!(rest),
        "partial" => {
            hp["target"] = json!(match rest {
                "A" => "A_log",
                "conv1d" => "conv1d.weight",
                "dt_bias" => "dt_proj.bias",
                other => other,
            })
        }
        "additional_scan" if !rest.is_empty() => hp["placement"] = json!(rest),
        _ => {}
    }
    if let Some(obj) = hp.as_object_mut()
        && (*family == "lora_p" || *family == "dora_p")
    {
        obj.remove("target");
        obj.remove("rows");
    }
    (family.to_string(), hp)
}

fn spec_for(meta: &Value, cfg: &ModelShape, adapter: &HashMap<String, Tensor>) -> AdapterSpec {
    let family = meta["family"].as_str().expect("family");
    let hp = &meta["hyperparameters"];
    let v = if family == "hybrid" {
        let comps = hp["components"].as_array().expect("hybrid components");
        let methods: Vec<Value> = comps
            .iter()
            .map(|c| {
                let name = c.as_str().expect("component name");
                let (fam, chp) = component(name, hp);
                method_json(&fam, name, &chp, cfg, adapter)
            })
            .collect();
        json!({"type": "hybrid", "methods": methods})
    } else {
        let name = meta["method"].as_str().unwrap_or(family);
        method_json(family, name, hp, cfg, adapter)
    };
    AdapterSpec::from_value(&v).unwrap_or_else(|e| panic!("spec {v}: {e}"))
}

// ---- the walk -----------------------------------------------------------------------------

struct Case {
    name: String,
    meta: Value,
    expected: HashMap<String, Tensor>,
    adapter: HashMap<String, Tensor>,
    base_dir: PathBuf,
}

/// One method set: its folder, its index, its base checkpoint and its method folders.
struct MethodSet {
    root: PathBuf,
    index: Value,
    base_dir: PathBuf,
    cases: Vec<Case>,
}

impl MethodSet {
    fn label(&self) -> String {
        common::label(&self.root)
    }

    /// The set's `input_ids` (the same in every folder of a set).
    fn input_ids(&self) -> &Tensor {
        let c = self.cases.first().expect("a method folder");
        get(&c.expected, "input_ids", &c.name)
    }
}

fn method_sets() -> Vec<MethodSet> {
    let sets: Vec<MethodSet> = common::method_sets()
        .into_iter()
        .map(|(root, index)| {
            let base_dir = root.join(index["base_model"]["dir"].as_str().expect("base_model.dir"));
            MethodSet {
                cases: cases_of(&root, &index),
                root,
                index,
                base_dir,
            }
        })
        .collect();
    assert!(!sets.is_empty(), "no method set under tests/fixtures");
    sets
}

/// Every method folder of every set.
fn cases() -> Vec<Case> {
    method_sets().into_iter().flat_map(|s| s.cases).collect()
}

fn cases_of(root: &Path, index: &Value) -> Vec<Case> {
    let default_base = index["base_model"]["dir"]
        .as_str()
        .expect("base_model.dir")
        .to_string();
    let list = index["methods"].as_array().expect("index methods");
    assert!(
        !list.is_empty(),
        "{}: no methods in index.json",
        root.display()
    );
    list.iter()
        .map(|m| {
            let name = m["name"].as_str().expect("method name").to_string();
            let dir = root.join(&name);
            let meta = read_json(&dir.join("method.json"));
            let base = meta["base_model"]["dir"]
                .as_str()
                .unwrap_or(&default_base)
                .to_string();
            Case {
                expected: candle_core::safetensors::load(
                    dir.join("expected.safetensors"),
                    &Device::Cpu,
                )
                .expect("expected.safetensors"),
                adapter: candle_core::safetensors::load(
                    dir.join("adapter.safetensors"),
                    &Device::Cpu,
                )
                .expect("adapter.safetensors"),
                base_dir: root.join(base),
                name: common::label(&dir),
                meta,
            }
        })
        .collect()
}

fn load_base(dir: &Path) -> MambaForCausalLM {
    load_lm::<MambaMixer>(dir)
}

/// A base checkpoint of the language family `M` mixes for.
fn load_lm<M: MixerSites>(dir: &Path) -> CausalLm<M> {
    CausalLm::<M>::load(dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The Mamba-2 method sets (`mamba2/methods/`, …): every folder, walked by index.
fn mamba2_method_sets() -> Vec<MethodSet> {
    let sets: Vec<MethodSet> = common::method_sets_of(Family::Mamba2)
        .into_iter()
        .map(|(root, index, base_dir)| MethodSet {
            cases: cases_of(&root, &index),
            root,
            index,
            base_dir,
        })
        .collect();
    assert!(
        !sets.is_empty(),
        "no Mamba-2 method set under tests/fixtures"
    );
    sets
}

/// Every check of one method folder; returns a one-line summary of the measured diffs.
fn run_case(c: &Case) -> String {
    run_case_on::<MambaMixer>(c) + &check_initial_state(c)
}
/// Mamba-1's prefix prompt/affix folded into initial states (`initstate.*` in the fixture).
fn check_initial_state(c: &Case) -> String {
    let ctx = c.name.as_str();
    if !c.expected.contains_key("initstate_logits") {
        return String::new();
    }
    let base = load_base(&c.base_dir);
    let cfg = base.config().clone();
    let spec = spec_for(&c.meta, &(&cfg).into(), &c.adapter);
    let adapter = Adapter::from_tensors(&spec, &base, c.adapter.clone())
        .unwrap_or_else(|e| panic!("{ctx}: adapter tensors: {e}"));
    let ids = get(&c.expected, "input_ids", ctx);
    let logits = adapter
        .apply(&base)
        .and_then(|m| Ok(m.forward(ids, None)?))
        .expect("forward");
    let mut summary = String::new();
    let opts = MergeOptions {
        prefix_as_initial_state: true,
    };
    let merged = adapter
        .merge_with(&base, &opts)
        .expect("merge to initial state");
    let state = merged.initial_state.as_ref().expect("initial state");
    let mut d_s = 0f32;
    for (i, (conv, ssm)) in state.layers.iter().enumerate() {
        let dc = diff(
            conv,
            get(
                &c.expected,
                &format!("initstate.layers.{i}.conv_inputs"),
                ctx,
            ),
        );
        let ds = diff(
            ssm,
            get(&c.expected, &format!("initstate.layers.{i}.ssm_state"), ctx),
        );
        assert!(
            dc <= 1e-4 && ds <= 1e-4,
            "{ctx}: layer {i} initial state: conv {dc}, ssm {ds}"
        );
        d_s = d_s.max(dc).max(ds);
    }
    // The base model started from the fixture's states gives its initstate_logits.
    let theirs = InitialState {
        layers: (0..cfg.num_hidden_layers)
            .map(|i| {
                (
                    c.expected[&format!("initstate.layers.{i}.conv_inputs")].clone(),
                    c.expected[&format!("initstate.layers.{i}.ssm_state")].clone(),
                )
            })
            .collect(),
    };
    let mut cache = theirs
        .to_cache(ids.dim(0).expect("b"), DType::F32)
        .expect("cache");
    let embeds = base
        .embed(&ids.to_dtype(DType::U32).expect("u32"))
        .expect("embed");
    let h = base
        .backbone
        .forward_embeds(&embeds, None, Some(&mut cache), None)
        .expect("forward");
    let d_il = diff(
        &base.logits(&h).expect("logits"),
        get(&c.expected, "initstate_logits", ctx),
    );
    assert!(d_il <= 1e-4, "{ctx}: initstate_logits differ by {d_il}");
    // Ours, folded: the same logits as the unmerged adapter.
    let folded = merged.forward(ids, None).expect("folded forward");
    let d_f = diff(&folded, &logits);
    assert!(
        d_f <= 1e-4,
        "{ctx}: initial-state form vs adapter logits differ by {d_f}"
    );
    summary += &format!("  initstate {d_s:.2e}  initstate-logits {d_il:.2e}  folded {d_f:.2e}");
    summary
}

fn run_case_on<M: MixerSites>(c: &Case) -> String {
    let ctx = c.name.as_str();
    let base = load_lm::<M>(&c.base_dir);
    let cfg = base.config().clone();
    let shape = M::shape_of(&cfg);
    let spec = spec_for(&c.meta, &shape, &c.adapter);
    let adapter = Adapter::from_tensors(&spec, &base, c.adapter.clone())
        .unwrap_or_else(|e| panic!("{ctx}: adapter tensors: {e}"));
    let model = adapter.apply(&base).expect("apply");
    let ids = get(&c.expected, "input_ids", ctx);

    // Logits and loss.
    let logits = model.forward(ids, None).expect("forward");
    let d_logits = diff(&logits, get(&c.expected, "logits", ctx));
    assert!(d_logits <= 1e-4, "{ctx}: logits differ by {d_logits}");
    let loss = causal_lm_loss(&logits, ids).expect("loss");
    let d_loss = diff(
        &loss.reshape(1).expect("reshape"),
        get(&c.expected, "loss", ctx),
    );
    assert!(d_loss <= 1e-5, "{ctx}: loss differs by {d_loss}");

    // Gradients of every adapter tensor.
    let grads = loss.backward().expect("backward");
    let mut worst_grad = 0f32;
    for (name, var) in adapter.vars() {
        let want = get(&c.expected, &format!("grad.{name}"), ctx);
        let r = check_grad(
            &format!("{ctx}: grad.{name}"),
            grads.get(var.as_tensor()),
            want,
        );
        worst_grad = worst_grad.max(r);
    }

    // Deterministic inits the spec prescribes.
    let mut d_init = 0f32;
    let inits: Vec<&String> = c
        .expected
        .keys()
        .filter(|k| k.starts_with("init."))
        .collect();
    if !inits.is_empty() {
        let fresh = Adapter::init(&spec, &base, 0).expect("init");
        for k in inits {
            let name = k.trim_start_matches("init.");
            let got = fresh
                .vars()
                .get(name)
                .unwrap_or_else(|| panic!("{ctx}: no adapter tensor `{name}` for `{k}`"));
            let d = diff(got.as_tensor(), &c.expected[k]);
            assert!(d <= 1e-6, "{ctx}: {k} differs by {d}");
            d_init = d_init.max(d);
        }
    }

    let mut summary =
        format!("{ctx:24} logits {d_logits:.2e}  loss {d_loss:.2e}  grad(rel) {worst_grad:.2e}");
    if d_init > 0.0 || c.expected.keys().any(|k| k.starts_with("init.")) {
        summary += &format!("  init {d_init:.2e}");
    }

    // Prompts: the augmented sequence, the positions and the probe's gradients.
    if let Some(want_aug) = c.expected.get("logits_aug") {
        let (aug, pos) = augmented_logits(&model, ids).expect("augmented");
        let d_aug = diff(&aug, want_aug);
        assert!(d_aug <= 1e-4, "{ctx}: logits_aug differs by {d_aug}");
        let want_pos: Vec<i64> = get(&c.expected, "positions", ctx)
            .to_vec1::<i64>()
            .expect("positions");
        let pos: Vec<i64> = pos.iter().map(|p| i64::from(*p)).collect();
        assert_eq!(pos, want_pos, "{ctx}: positions");
        assert_eq!(logits.dim(1).ok(), ids.dim(1).ok(), "{ctx}: output length");
        let probe = get(&c.expected, "probe", ctx);
        let probe_loss = ((aug * probe).expect("mul").sum_all().expect("sum")
            / probe.elem_count() as f64)
            .expect("div");
        let d_probe = diff(
            &probe_loss.reshape(1).expect("reshape"),
            &get(&c.expected, "probe_loss", ctx)
                .reshape(1)
                .expect("reshape"),
        );
        assert!(d_probe <= 1e-5, "{ctx}: probe_loss differs by {d_probe}");
        let g = probe_loss.backward().expect("backward");
        let mut worst = 0f32;
        for (name, var) in adapter.vars() {
            let want = get(&c.expected, &format!("grad_probe.{name}"), ctx);
            worst = worst.max(check_grad(
                &format!("{ctx}: grad_probe.{name}"),
                g.get(var.as_tensor()),
                want,
            ));
        }
        summary += &format!("  aug {d_aug:.2e}  probe-grad(rel) {worst:.2e}");
    }

    // Merge.
    let mergeable = c.meta["mergeable"].as_bool().unwrap_or(false);
    if mergeable {
        let merged = adapter
            .merge(&base)
            .unwrap_or_else(|e| panic!("{ctx}: merge: {e}"));
        let tensors = merged.tensors();
        let base_tensors: HashMap<String, Tensor> = base.named_weights().into_iter().collect();
        let mut d_w = 0f32;
        for (k, want) in c.expected.iter().filter(|(k, _)| k.starts_with("merged.")) {
            let name = k.trim_start_matches("merged.");
            let got = match name {
                "prompt.table" | "affix.table" => merged
                    .residual
                    .as_ref()
                    .and_then(|r| r.vars().get(name))
                    .map(|v| v.as_tensor().clone())
                    .unwrap_or_else(|| panic!("{ctx}: merged model has no residual `{name}`")),
                _ => tensors
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| panic!("{ctx}: merged checkpoint has no `{name}`")),
            };
            let d = diff(&got, want);
            let scale = max_abs(want);
            assert!(d <= 1e-6 + 1e-5 * scale, "{ctx}: {k} differs by {d}");
            d_w = d_w.max(d);
        }
        // Tensors the fixture does not list are unchanged.
        for (name, t) in &tensors {
            if c.expected.contains_key(&format!("merged.{name}")) {
                continue;
            }
            let b = base_tensors
                .get(name)
                .unwrap_or_else(|| panic!("{ctx}: merge added `{name}`"));
            assert_eq!(
                diff(t, b),
                0.0,
                "{ctx}: merge changed `{name}`, not listed in the fixture"
            );
        }
        let merged_logits = merged
            .model()
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("merged forward");
        let d_ml = diff(&merged_logits, get(&c.expected, "merged_logits", ctx));
        assert!(d_ml <= 1e-4, "{ctx}: merged_logits differ by {d_ml}");
        let d_mu = diff(&merged_logits, &logits);
        assert!(
            d_mu <= 1e-5,
            "{ctx}: merged vs unmerged logits differ by {d_mu}"
        );
        summary += &format!(
            "  merged-w {d_w:.2e}  merged-logits {d_ml:.2e}  merged-vs-unmerged {d_mu:.2e}"
        );
    } else if c.meta["family"] == "parallel_adapter" {
        let e = adapter
            .merge(&base)
            .expect_err("parallel adapter must not merge");
        assert!(e.to_string().contains("not mergeable"), "{ctx}: {e}");
    }

    summary
}

#[test]
fn every_method_folder_matches_the_reference() {
    let mut lines = Vec::new();
    for c in cases() {
        lines.push(run_case(&c));
    }
    eprintln!("measured parity (max abs diffs; grads relative to max|g|):");
    for l in &lines {
        eprintln!("  {l}");
    }
}

/// Every Mamba-2 method folder (`mamba2/methods/`: spec §8's forms of the methods, in_proj
/// slices Z | X | B | C | dt, per-head A / D / dt bias, the gated norm) against its
/// reference: logits, loss, every gradient, merged weights and merged logits.
#[test]
fn every_mamba2_method_folder_matches_the_reference() {
    let mut lines = Vec::new();
    for set in mamba2_method_sets() {
        for c in &set.cases {
            lines.push(run_case_on::<Mamba2Mixer>(c));
        }
    }
    eprintln!("measured parity on Mamba-2 (max abs diffs; grads relative to max|g|):");
    for l in &lines {
        eprintln!("  {l}");
    }
}

#[test]
fn base_folder_matches_the_plain_model() {
    for set in method_sets() {
        let ctx = set.label();
        let base = load_base(&set.base_dir);
        // The set's checkpoint is the one the index records.
        let bytes = std::fs::read(set.base_dir.join("model.safetensors")).expect("checkpoint");
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(
            set.index["base_model"]["sha256_model_safetensors"].as_str(),
            Some(sha.as_str()),
            "{ctx}: base checkpoint sha256"
        );
        let expected = candle_core::safetensors::load(
            set.root.join("base/expected.safetensors"),
            &Device::Cpu,
        )
        .expect("base expected");
        let ids = get(&expected, "input_ids", &ctx);
        assert_eq!(
            ids.dims(),
            set.input_ids().dims(),
            "{ctx}: base input_ids shape"
        );
        let logits = base.forward(ids, None).expect("forward");
        let d = diff(&logits, get(&expected, "logits", &ctx));
        assert!(d <= 1e-4, "{ctx}: base logits differ by {d}");
        let loss = causal_lm_loss(&logits, ids).expect("loss");
        let d = diff(
            &loss.reshape(1).expect("reshape"),
            get(&expected, "loss", &ctx),
        );
        assert!(d <= 1e-5, "{ctx}: base loss differs by {d}");
    }
}

/// Zero-init adapters are the identity change: merged, every tensor is bit-identical to the
/// base; unmerged, the logits equal the base logits up to float32 rounding (≤ 2e-6 ×
/// max(1, max|logit|): with a
/// trainable tensor in the graph the model takes its differentiable RMSNorm/scan paths
/// instead of the fused inference kernels, which sum in another order). Additional-scan with
/// its released uniform W_add changes the function by design (spec §4.9); prompt/affix change
/// the sequence.
#[test]
fn zero_init_adapters_preserve_the_base_function() {
    let common_extras = [
        json!({"type": "dora", "targets": ["in_proj", "out_proj"], "r": 4}),
        json!({"type": "bitfit"}),
        json!({"type": "linear_probe"}),
        json!({"type": "full"}),
    ];
    let mut mamba1 = common_extras.to_vec();
    mamba1.extend([
        json!({"type": "sll_lora", "r": 2}),
        json!({"type": "additional_scan", "n_add": 2, "zero_init_x_proj": true}),
    ]);
    for set in method_sets() {
        zero_init_adapters_preserve_the_base_function_on::<MambaMixer>(&set, &mamba1);
    }
    let mut mamba2 = common_extras.to_vec();
    mamba2.push(json!({"type": "partial", "target": "D"}));
    for set in mamba2_method_sets() {
        zero_init_adapters_preserve_the_base_function_on::<Mamba2Mixer>(&set, &mamba2);
    }
}

fn zero_init_adapters_preserve_the_base_function_on<M: MixerSites>(
    set: &MethodSet,
    extras: &[Value],
) {
    let ctx = set.label();
    let c = &set.cases;
    let base = load_lm::<M>(&set.base_dir);
    let ids = set.input_ids();
    let want = base.forward(ids, None).expect("forward");
    let base_tensors: HashMap<String, Tensor> = base.named_weights().into_iter().collect();
    let shape = M::shape_of(base.config());
    let mut specs: Vec<(String, Value)> = Vec::new();
    for case in c {
        let s = spec_for(&case.meta, &shape, &case.adapter);
        specs.push((case.name.clone(), s.to_value()));
    }
    for extra in extras.iter().cloned() {
        let name = format!("{ctx}: {}", extra["type"].as_str().unwrap_or("?"));
        specs.push((name, extra));
    }
    let mut worst = 0f32;
    for (name, v) in specs {
        let spec = AdapterSpec::from_value(&v).expect("spec");
        let kinds: Vec<Value> = spec
            .methods
            .iter()
            .map(|m| serde_json::to_value(m).expect("json"))
            .collect();
        let changes_function = kinds.iter().any(|j| {
            matches!(j["type"].as_str(), Some("prompt" | "affix"))
                || (j["type"] == "additional_scan" && j["zero_init_x_proj"] != true)
        });
        if changes_function {
            continue;
        }
        let adapter = Adapter::init(&spec, &base, 1234).expect("init");
        let got = adapter
            .apply(&base)
            .expect("apply")
            .forward(ids, None)
            .expect("forward");
        let d = diff(&got, &want);
        // float32 rounding grows with the logits' size (Mamba-2's reach ~4 here).
        let bound = 2e-6 * max_abs(&want).max(1.0);
        assert!(
            d <= bound,
            "{name}: zero-init adapter moves the logits by {d} (bound {bound})"
        );
        worst = worst.max(d);
        if kinds
            .iter()
            .any(|j| j["type"] == "parallel_adapter" || j["type"] == "additional_scan")
        {
            continue;
        }
        let merged = adapter
            .merge(&base)
            .unwrap_or_else(|e| panic!("{name}: merge: {e}"));
        for (k, t) in merged.tensors() {
            // An untied head (embedding LoRA, probe) starts as the tied matrix.
            let b = base_tensors
                .get(&k)
                .or_else(|| {
                    (k == "lm_head.weight").then(|| &base_tensors["backbone.embeddings.weight"])
                })
                .unwrap_or_else(|| panic!("{name}: merge added `{k}`"));
            assert_eq!(diff(&t, b), 0.0, "{name}: zero-init merge changed `{k}`");
        }
    }
    eprintln!("{ctx}: zero-init adapters: max |logits - base| = {worst:.2e}");
}

// ---- spec §10: trainable-parameter counts from shapes only --------------------------------

fn shape_only(d: usize, layers: usize, vocab: usize) -> MambaConfig {
    MambaConfig::new(d, layers, vocab)
}

fn count(cfg: &MambaConfig, v: Value) -> usize {
    let spec = AdapterSpec::from_value(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
    spec.validate(cfg).unwrap_or_else(|e| panic!("{v}: {e}"));
    spec.trainable_parameters(cfg)
}

#[test]
fn spec_section_10_parameter_table() {
    // mamba-130m: D 768, 24 layers, vocab 50280 (padded), N 16, R 48.
    let m130 = shape_only(768, 24, 50280);
    assert_eq!(count(&m130, json!({"type": "full"})), 129_135_360);
    assert_eq!(
        count(&m130, json!({"type": "lora_p", "slice": "X", "r": 64})),
        3_538_944
    );
    assert_eq!(
        count(
            &m130,
            json!({"type": "lora", "targets": "in_proj", "r": 32})
        ),
        2_949_120
    );
    assert_eq!(
        count(&m130, json!({"type": "additional_scan", "n_add": 6})),
        663_552
    );
    assert_eq!(count(&m130, json!({"type": "affix", "n": 3})), 221_184);
    assert_eq!(
        count(
            &m130,
            json!({"type": "affix", "n": 3, "projection": true, "hidden": 3072})
        ),
        236_015_616
    );
    assert_eq!(count(&m130, json!({"type": "sll_lora", "r": 8})), 1_898_304);
    assert_eq!(count(&m130, json!({"type": "bitfit"})), 73_728);
    assert_eq!(
        count(
            &m130,
            json!({"type": "prodial", "targets": "both", "r_b": 64, "r_eps": 8})
        ),
        2_377_728
    );
    // §5.2: in-only r_b 32 and out-only r_b 128.
    assert_eq!(
        count(
            &m130,
            json!({"type": "prodial", "targets": "in_proj", "r_b": 32, "r_eps": 8})
        ),
        1_253_376
    );
    assert_eq!(
        count(
            &m130,
            json!({"type": "prodial", "targets": "out_proj", "r_b": 128, "r_eps": 8})
        ),
        903_168
    );
    // §3.5: Both-Proj DoRA r = 16 = LoRA + 24·(3072 + 768) magnitudes = 2.45M.
    assert_eq!(
        count(
            &m130,
            json!({"type": "dora", "targets": ["in_proj", "out_proj"], "r": 16})
        ),
        16 * (768 + 3072 + 1536 + 768) * 24 + 24 * (3072 + 768)
    );

    // Vim-S shapes (D 384, 24 layers). One scan direction here; the † rows of §10 count
    // both of Vim's directions, i.e. twice ours.
    let vim_s = shape_only(384, 24, 1000);
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "lora", "targets": "out_proj", "r": 96})
        ),
        2_654_208
    );
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "lora", "targets": "in_proj", "r": 32})
        ),
        1_474_560
    );
    assert_eq!(
        count(&vim_s, json!({"type": "partial", "target": "A_log"})) * 2,
        589_824
    );
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "partial", "target": "conv1d.weight"})
        ) * 2,
        147_456
    );
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "lora", "targets": "x_proj", "r": 64})
        ) * 2,
        2_531_328
    );
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "lora", "targets": "dt_proj", "r": 64})
        ) * 2,
        2_433_024
    );
    assert_eq!(
        count(&vim_s, json!({"type": "lora_p", "slice": "B", "r": 64})) * 2,
        2_408_448
    );
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "prompt", "n": 8, "kind": "prefix_suffix", "projection": true})
        ),
        298_752
    );
    assert_eq!(
        count(
            &vim_s,
            json!({"type": "prompt", "n": 8, "kind": "prefix_suffix"})
        ),
        3_072
    );
    // Dual affix (one token set per direction) = 2 × single.
    assert_eq!(count(&vim_s, json!({"type": "affix", "n": 3})) * 2, 221_184);

    // Larger LLMs (§0): 370m D 1024 48 layers; 1.4b D 2048 48 layers.
    let m370 = shape_only(1024, 48, 50280);
    assert_eq!(
        count(&m370, json!({"type": "lora_p", "slice": "X", "r": 64})),
        64 * (1024 + 2048) * 48
    );
    let m1_4 = shape_only(2048, 48, 50280);
    assert_eq!(
        count(
            &m1_4,
            json!({"type": "prodial", "targets": "both", "r_b": {"in_proj": 2048, "out_proj": 4096}, "r_eps": 32})
        ),
        48 * ((2048 + 4096 * 2 + 32 * (2048 + 8192)) + (4096 + 2048 + 32 * (4096 + 2048)))
    );

    // A hybrid is the sum of its parts.
    let hybrid = json!({"type": "hybrid", "methods": [
        {"type": "lora", "targets": "in_proj", "r": 32},
        {"type": "additional_scan", "n_add": 6},
    ]});
    assert_eq!(count(&m130, hybrid), 2_949_120 + 663_552);
}

// ---- bad input ----------------------------------------------------------------------------

fn tiny_cfg() -> MambaConfig {
    let mut c = MambaConfig::new(64, 2, 512);
    c.state_size = 8;
    c.time_step_rank = 4;
    c
}

fn err(v: Value) -> String {
    let cfg = tiny_cfg();
    match AdapterSpec::from_value(&v).and_then(|s| s.validate(&cfg).map(|_| s)) {
        Ok(_) => panic!("{v} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_specs_say_what_is_valid() {
    let e = err(json!({"type": "lorra"}));
    assert!(
        e.contains("unknown PEFT method type `lorra`")
            && e.contains("lora, lora_p")
            && e.contains("hybrid"),
        "{e}"
    );
    let e = err(json!({"type": "lora", "targets": "in_proj", "r": 0}));
    assert!(
        e.contains("r = 0 is out of range") && e.contains("valid: 1..=256"),
        "{e}"
    );
    let e = err(json!({"type": "lora", "targets": "in_proj", "r": 100000}));
    assert!(
        e.contains("r = 100000 is out of range for in_proj (256×64)"),
        "{e}"
    );
    let e = err(json!({"type": "lora", "targets": "q_proj", "r": 4}));
    assert!(
        e.contains("unknown target `q_proj`")
            && e.contains("embedding, in_proj, x_proj, dt_proj, out_proj"),
        "{e}"
    );
    let e = err(json!({"type": "lora_p", "slice": "Q"}));
    assert!(
        e.contains("unknown target `Q`") && e.contains("X, Z, dt, B, C"),
        "{e}"
    );
    let e = err(json!({"type": "partial", "target": "gate"}));
    assert!(
        e.contains("unknown target `gate`") && e.contains("A_log, D, conv1d.weight, dt_proj.bias"),
        "{e}"
    );
    // Mamba-2's gated-norm weight is no Mamba-1 tensor.
    let e = err(json!({"type": "partial", "target": "norm.weight"}));
    assert!(e.contains("norm.weight") && e.contains("mamba"), "{e}");
    let e = err(json!({"type": "prodial", "targets": "in_proj", "r_b": 5}));
    assert!(
        e.contains("r_b = 5 does not divide d_in = 64") && e.contains("1, 2, 4, 8, 16, 32, 64"),
        "{e}"
    );
    let e = err(json!({"type": "additional_scan", "n_add": 0}));
    assert!(
        e.contains("n_add (N') = 0 is out of range") && e.contains("valid: 1..="),
        "{e}"
    );
    let e = err(json!({"type": "lora", "targets": "in_proj", "s": 0.1, "alpha": 8}));
    assert!(
        e.contains("contradictory") && e.contains("either `s`"),
        "{e}"
    );
    let e = err(json!({"type": "prompt", "n": 3, "hidden": 32}));
    assert!(
        e.contains("contradictory") && e.contains("projection"),
        "{e}"
    );
    let e = err(json!({"type": "hybrid", "methods": [{"type": "full"}, {"type": "bitfit"}]}));
    assert!(e.contains("cannot be stacked"), "{e}");
    let e = err(json!({"type": "hybrid", "methods": [
        {"type": "lora", "targets": "in_proj", "r": 4}, {"type": "lora", "targets": ["in_proj"], "r": 8}]}));
    assert!(
        e.contains("both define the tensor `layers.0.in_proj.lora_A`"),
        "{e}"
    );
    let e = err(json!({"type": "hybrid", "methods": []}));
    assert!(e.contains("`methods` is empty"), "{e}");
    let e = err(json!({"type": "lora", "targets": "in_proj", "rank": 4}));
    assert!(e.contains("unknown field `rank`"), "{e}");
    let e = err(json!({"type": "lora", "targets": "in_proj", "lr": -1.0}));
    assert!(e.contains("`lr` = -1 is invalid"), "{e}");
    let e = err(json!({"type": "lora", "targets": "in_proj", "dropout": 1.5}));
    assert!(
        e.contains("`dropout` = 1.5 is invalid") && e.contains("[0, 1)"),
        "{e}"
    );
    let e = err(json!("lora"));
    assert!(e.contains("expected a JSON object with a `type`"), "{e}");
    let e = err(json!({"r": 4}));
    assert!(e.contains("missing string field `type`"), "{e}");
    let e =
        err(json!({"type": "hybrid", "methods": [{"type": "prompt"}, {"type": "prompt", "n": 2}]}));
    assert!(e.contains("more than one `prompt`"), "{e}");
}

#[test]
fn adapter_for_another_base_is_refused() {
    for set in method_sets() {
        adapter_for_another_base_is_refused_on(&set);
    }
}

fn adapter_for_another_base_is_refused_on(set: &MethodSet) {
    let ctx = set.label();
    let base = load_base(&set.base_dir);
    let n_add = 2;
    let spec =
        AdapterSpec::from_value(&json!({"type": "additional_scan", "n_add": n_add})).expect("spec");
    let adapter = Adapter::init(&spec, &base, 3).expect("init");
    let dir = tempfile::tempdir().expect("tempdir");
    adapter.save(dir.path()).expect("save");

    // The same model with one more state: a different base.
    let state = base.config().state_size;
    let mut other_cfg = base.config().clone();
    other_cfg.state_size = state + 1;
    let other = trainer::model::Checkpoint::random(&other_cfg, 1, &Device::Cpu)
        .and_then(|c| c.into_frozen())
        .expect("other model");
    let e = Adapter::load(dir.path(), &other).expect_err("wrong base accepted");
    assert!(matches!(e, PeftError::WrongBase { .. }), "{ctx}: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains("adapter is for another base model")
            && msg.contains(&format!("state_size={state} "))
            && msg.contains(&format!("state_size={} ", state + 1)),
        "{ctx}: {msg}"
    );
    assert!(adapter.apply(&other).is_err(), "{ctx}");

    // Wrong tensors: a missing and a misshaped one are both listed.
    let inner = base.config().intermediate_size;
    let last = base.config().num_hidden_layers - 1;
    let bad = (inner + 1, n_add + 1);
    let mut t: HashMap<String, Tensor> = adapter.named_tensors().into_iter().collect();
    t.remove("layers.0.A_log_scan_addi");
    t.insert(
        format!("layers.{last}.A_log_scan_addi"),
        Tensor::zeros(bad, DType::F32, &Device::Cpu).expect("zeros"),
    );
    let msg = Adapter::from_tensors(&spec, &base, t)
        .expect_err("bad tensors")
        .to_string();
    assert!(
        msg.contains("missing `layers.0.A_log_scan_addi`")
            && msg.contains(&format!(
                "`layers.{last}.A_log_scan_addi` has shape [{}, {}], expected [{inner}, {n_add}]",
                bad.0, bad.1
            )),
        "{ctx}: {msg}"
    );
}

/// Spec §4.9: the placement of the new states has no computational effect — the top and
/// bottom forms with the same parameters give the same logits.
#[test]
fn additional_scan_placement_has_no_effect() {
    let mut checked = 0;
    for set in method_sets() {
        for top in set
            .cases
            .iter()
            .filter(|c| c.meta["family"] == "additional_scan")
        {
            additional_scan_placement_has_no_effect_on(top);
            checked += 1;
        }
    }
    assert!(checked > 0, "no additional_scan folder in any method set");
}

fn additional_scan_placement_has_no_effect_on(top: &Case) {
    let base = load_base(&top.base_dir);
    let ids = &top.expected["input_ids"];
    let mut out = Vec::new();
    for placement in ["top", "bottom"] {
        let spec = AdapterSpec::from_value(&json!({
            "type": "additional_scan",
            "n_add": top.adapter["layers.0.x_proj_scan_addi.weight"].dims()[0] / 2,
            "placement": placement,
        }))
        .expect("spec");
        let a = Adapter::from_tensors(&spec, &base, top.adapter.clone()).expect("adapter");
        out.push(
            a.apply(&base)
                .expect("apply")
                .forward(ids, None)
                .expect("forward"),
        );
    }
    let d = diff(&out[0], &out[1]);
    assert!(
        d <= 2e-6,
        "{}: top vs bottom with the same parameters: {d}",
        top.name
    );
}

/// Shapes the public fixtures do not cover (odd sizes, K = 3, N = 5, R = 3, three layers,
/// no conv bias): for every method with non-trivial values, the merged model equals the
/// unmerged one (≤ 1e-5) and the autograd gradient matches a central finite difference of
/// the loss along a random direction (float32: 3% relative plus the
/// difference's own rounding noise).
#[test]
fn other_shapes_merge_and_gradients_agree() {
    let mut cfg = MambaConfig::new(24, 3, 97);
    cfg.state_size = 5;
    cfg.time_step_rank = 3;
    cfg.conv_kernel = 3;
    cfg.use_conv_bias = false;
    let base = trainer::model::Checkpoint::random(&cfg, 77, &Device::Cpu)
        .and_then(|c| c.into_frozen())
        .expect("random model");
    let ids = Tensor::new(
        &[
            [3u32, 17, 42, 5, 96, 0, 11, 23, 8],
            [1, 2, 3, 4, 5, 6, 7, 8, 9],
        ],
        &Device::Cpu,
    )
    .expect("ids");
    let specs = [
        json!({"type": "lora", "targets": ["embedding", "in_proj", "x_proj", "dt_proj", "out_proj"], "r": 3, "s": 0.7}),
        json!({"type": "hybrid", "methods": [
            {"type": "lora_p", "slice": "X", "r": 2}, {"type": "lora_p", "slice": "Z", "r": 2},
            {"type": "lora_p", "slice": "dt", "r": 2}, {"type": "lora_p", "slice": "B", "r": 2},
            {"type": "lora_p", "slice": "C", "r": 2}]}),
        json!({"type": "dora", "targets": ["in_proj", "x_proj", "out_proj"], "r": 2, "alpha": 3}),
        json!({"type": "dora_p", "slice": "B", "r": 2}),
        json!({"type": "hybrid", "methods": [
            {"type": "partial", "target": "A_log"}, {"type": "partial", "target": "D"},
            {"type": "partial", "target": "conv1d.weight"}, {"type": "partial", "target": "dt_proj.bias"}]}),
        json!({"type": "hybrid", "methods": [
            {"type": "additional_scan", "n_add": 3, "placement": "bottom"},
            {"type": "lora_p", "slice": "C", "r": 2}, {"type": "partial", "target": "A_log"}]}),
        json!({"type": "prodial", "targets": "both", "r_b": {"in_proj": 8, "out_proj": 16}, "r_eps": 2, "alpha": 4}),
        json!({"type": "prodial", "targets": "in_proj", "r_b": 24, "r_eps": 2, "diagonal": "trainable"}),
        json!({"type": "hybrid", "methods": [{"type": "bitfit"}, {"type": "linear_probe"}]}),
        json!({"type": "full"}),
        json!({"type": "prompt", "n": 4, "kind": "prefix_suffix", "projection": true, "hidden": 7}),
        json!({"type": "affix", "n": 2, "kind": "infix", "projection": true, "hidden": 5}),
        json!({"type": "affix", "n": 1, "kind": "suffix"}),
        json!({"type": "parallel_adapter", "r": 3, "s": 0.5}),
    ];
    for v in specs {
        let spec = AdapterSpec::from_value(&v).expect("spec");
        let adapter = Adapter::init(&spec, &base, 5).expect("init");
        // Non-trivial values everywhere (zero-init factors would hide half the paths).
        let noise = trainer::peft::InitRng::new(99, &Device::Cpu, DType::F32);
        for (name, var) in adapter.vars() {
            let n = noise.normal(name, var.dims(), 0.05).expect("noise");
            var.set(&(var.as_tensor() + n).expect("add")).expect("set");
        }
        let model = adapter.apply(&base).expect("apply");
        let logits = model.forward(&ids, None).expect("forward");
        assert_eq!(
            logits.dims(),
            &[2, 9, 97],
            "{v}: output keeps the input's length"
        );
        let loss = causal_lm_loss(&logits, &ids).expect("loss");
        let grads = loss.backward().expect("backward");

        // Directional derivative vs central difference.
        let dir = trainer::peft::InitRng::new(123, &Device::Cpu, DType::F32);
        let mut dot = 0f64;
        let mut dirs = Vec::new();
        for (name, var) in adapter.vars() {
            let d = dir.normal(name, var.dims(), 1.0).expect("dir");
            if let Some(g) = grads.get(var.as_tensor()) {
                dot += f64::from(
                    (g * &d)
                        .expect("mul")
                        .sum_all()
                        .expect("sum")
                        .to_scalar::<f32>()
                        .expect("f32"),
                );
            }
            dirs.push((var.clone(), d));
        }
        let eps = 2e-3f64;
        let loss_at = |sign: f64| -> f64 {
            for (var, d) in &dirs {
                var.set(&(var.as_tensor() + (d * (sign * eps)).expect("mul")).expect("add"))
                    .expect("set");
            }
            let l = causal_lm_loss(&model.forward(&ids, None).expect("f"), &ids)
                .expect("loss")
                .to_scalar::<f32>()
                .expect("f32");
            for (var, d) in &dirs {
                var.set(&(var.as_tensor() - (d * (sign * eps)).expect("mul")).expect("sub"))
                    .expect("set");
            }
            f64::from(l)
        };
        // DoRA's gradient treats the weight norm as a constant (stop-grad, by design), so
        // it is not the derivative a finite difference measures; its gradients are checked
        // against the fixtures instead.
        let is_dora = v["type"].as_str().is_some_and(|t| t.starts_with("dora"));
        let fd = if is_dora {
            dot
        } else {
            (loss_at(1.0) - loss_at(-1.0)) / (2.0 * eps)
        };
        // f32 loss rounding (~5e-7) over 2·eps bounds the difference's own noise.
        let err = (fd - dot).abs();
        assert!(
            err <= 3e-2 * dot.abs() + 5e-4,
            "{v}: finite difference {fd} vs autograd {dot} (|diff| {err})"
        );

        if v["type"] == "parallel_adapter" {
            assert!(adapter.merge(&base).is_err());
            continue;
        }
        let merged = adapter
            .merge(&base)
            .unwrap_or_else(|e| panic!("{v}: merge: {e}"));
        let d = diff(
            &merged.forward(&ids, None).expect("merged forward"),
            &logits,
        );
        assert!(d <= 1e-5, "{v}: merged vs unmerged logits differ by {d}");
    }
}

/// Cached decoding with an adapter (prefill inserts prompt/affix tokens once, every step
/// uses the same adapted weights and the widened state) gives the logits of a full forward
/// over the growing sequence.
#[test]
fn cached_generation_with_adapters_matches_full_forwards() {
    for set in method_sets() {
        cached_generation_with_adapters_matches_full_forwards_on(&set);
    }
}

fn cached_generation_with_adapters_matches_full_forwards_on(set: &MethodSet) {
    use trainer::generate::{GenerationConfig, generate};
    let ctx = set.label();
    let base = load_base(&set.base_dir);
    // Prompt ids from the set's inputs, plus the last id of the vocabulary.
    let vocab = base.config().vocab_size;
    let mut prompt: Vec<u32> = set
        .input_ids()
        .get(0)
        .and_then(|r| r.to_dtype(DType::U32))
        .and_then(|r| r.to_vec1::<u32>())
        .expect("ids");
    prompt.truncate(4);
    prompt.push(u32::try_from(vocab - 1).expect("vocab"));
    for v in [
        json!({"type": "prompt", "n": 3, "projection": true}),
        json!({"type": "affix", "n": 2}),
        json!({"type": "hybrid", "methods": [
            {"type": "additional_scan", "n_add": 2},
            {"type": "prodial", "targets": "both", "r_b": common::prodial_blocks(base.config()), "r_eps": 2},
            {"type": "dora_p", "slice": "X", "r": 2, "zero_init": false},
            {"type": "lora", "targets": "embedding", "r": 2, "zero_init": false},
            {"type": "parallel_adapter", "r": 2, "zero_init": false},
        ]}),
    ] {
        let spec = AdapterSpec::from_value(&v).expect("spec");
        let adapter = Adapter::init(&spec, &base, 21).expect("init");
        let noise = trainer::peft::InitRng::new(4, &Device::Cpu, DType::F32);
        for (name, var) in adapter.vars() {
            let n = noise.normal(name, var.dims(), 0.05).expect("noise");
            var.set(&(var.as_tensor() + n).expect("add")).expect("set");
        }
        let model = adapter.apply(&base).expect("apply");
        let cfg = GenerationConfig {
            max_new_tokens: 4,
            keep_step_logits: true,
            ..GenerationConfig::default()
        };
        let out = generate(&model, std::slice::from_ref(&prompt), &cfg).expect("generate");
        assert_eq!(
            out.step_logits.len(),
            cfg.max_new_tokens,
            "{ctx}: {v}: steps"
        );
        let mut seq = prompt.clone();
        for (k, step) in out.step_logits.iter().enumerate() {
            let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("ids");
            let full = model.forward(&ids, None).expect("forward");
            let last = full
                .narrow(1, seq.len() - 1, 1)
                .and_then(|t| t.squeeze(1))
                .expect("last");
            let d = diff(step, &last);
            assert!(
                d <= 1e-4,
                "{ctx}: {v}: step {k}: cached vs full forward logits differ by {d}"
            );
            seq.push(out.tokens[0][k]);
        }
    }
}

/// The serving model (merged where possible) computes what the adapted model computes.
#[test]
fn inference_model_equals_the_adapted_model() {
    for set in method_sets() {
        inference_model_equals_the_adapted_model_on(&set);
    }
}

fn inference_model_equals_the_adapted_model_on(set: &MethodSet) {
    let base = load_base(&set.base_dir);
    let ids = set.input_ids();
    for case in &set.cases {
        let spec = spec_for(&case.meta, &base.config().into(), &case.adapter);
        let adapter = Adapter::from_tensors(&spec, &base, case.adapter.clone()).expect("adapter");
        let a = adapter
            .apply(&base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("apply");
        let b = adapter
            .inference_model(&base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("inference model");
        let d = diff(&a, &b);
        assert!(d <= 1e-5, "{}: inference model differs by {d}", case.name);
    }
}

/// An optimizer updates the adapter's variables in place; the model from one `apply` must
/// compute with the new values (nothing precomputed from the initial ones), for every
/// method.
#[test]
fn in_place_updates_are_seen_without_reapplying() {
    for set in method_sets() {
        in_place_updates_are_seen_without_reapplying_on(&set);
    }
}

fn in_place_updates_are_seen_without_reapplying_on(set: &MethodSet) {
    let ctx = set.label();
    let base = load_base(&set.base_dir);
    let ids = set.input_ids();
    let out_blocks = common::prodial_blocks(base.config())["out_proj"].clone();
    let mut specs: Vec<Value> = set
        .cases
        .iter()
        .map(|case| spec_for(&case.meta, &base.config().into(), &case.adapter).to_value())
        .collect();
    specs.extend([
        json!({"type": "dora", "targets": ["in_proj", "out_proj"], "r": 4}),
        json!({"type": "bitfit"}),
        json!({"type": "linear_probe"}),
        json!({"type": "sll_lora", "r": 2}),
        json!({"type": "full"}),
        json!({"type": "affix", "n": 2, "kind": "suffix", "projection": true, "hidden": 8}),
        json!({"type": "prodial", "targets": "out_proj", "r_b": out_blocks, "r_eps": 2, "diagonal": "trainable"}),
    ]);
    for v in specs {
        let spec = AdapterSpec::from_value(&v).expect("spec");
        let adapter = Adapter::init(&spec, &base, 8).expect("init");
        let model = adapter.apply(&base).expect("apply");
        let before = model.forward(ids, None).expect("forward");
        let noise = trainer::peft::InitRng::new(31, &Device::Cpu, DType::F32);
        for (name, var) in adapter.vars() {
            let n = noise.normal(name, var.dims(), 0.05).expect("noise");
            var.set(&(var.as_tensor() + n).expect("add")).expect("set");
        }
        let after = model.forward(ids, None).expect("forward");
        let fresh = adapter
            .apply(&base)
            .and_then(|m| Ok(m.forward(ids, None)?))
            .expect("fresh");
        assert_eq!(
            diff(&after, &fresh),
            0.0,
            "{ctx}: {v}: the applied model kept stale values"
        );
        // Suffix tokens come after every real token of a causal model: no effect, by design.
        if v["kind"] != "suffix" {
            assert!(
                diff(&after, &before) > 1e-6,
                "{ctx}: {v}: an update did not change the output"
            );
        }
    }
}

/// The method sets cover more than one shape, so a test that bakes in one set's sizes fails
/// on another: at least two sets, a vocabulary that is not a multiple of 8, and several
/// state sizes, conv kernels and layer counts, read from each set's checkpoint (which must
/// agree with the `config` its index records).
#[test]
fn the_method_sets_cover_other_shapes() {
    use std::collections::BTreeSet;
    let sets = method_sets();
    assert!(sets.len() >= 2, "only one method set");
    let mut cfgs = Vec::new();
    for set in &sets {
        let cfg = load_base(&set.base_dir).config().clone();
        let recorded = &set.index["base_model"]["config"];
        for (key, got) in [
            ("vocab", cfg.vocab_size),
            ("d_model", cfg.hidden_size),
            ("d_inner", cfg.intermediate_size),
            ("d_state", cfg.state_size),
            ("dt_rank", cfg.time_step_rank),
            ("d_conv", cfg.conv_kernel),
            ("n_layer", cfg.num_hidden_layers),
        ] {
            assert_eq!(
                recorded[key].as_u64(),
                Some(got as u64),
                "{}: index base_model.config.{key}",
                set.label()
            );
        }
        cfgs.push(cfg);
    }
    assert!(
        cfgs.iter().any(|c| !c.vocab_size.is_multiple_of(8)),
        "every vocabulary is a multiple of 8"
    );
    let distinct = |f: fn(&MambaConfig) -> usize| cfgs.iter().map(f).collect::<BTreeSet<_>>();
    assert!(distinct(|c| c.state_size).len() >= 2, "one state size only");
    assert!(
        distinct(|c| c.conv_kernel).len() >= 2,
        "one conv kernel only"
    );
    assert!(
        distinct(|c| c.num_hidden_layers).len() >= 2,
        "one layer count only"
    );
}

/// Trainable-parameter counts at the mamba2-130m shape (the released state-spaces config:
/// D 768, 24 layers, 24 heads × 64, N 128, one group, conv 4, so d_in_proj = 3352 and the conv
/// has 1792 channels), derived by hand from spec §8's forms.
#[test]
fn mamba2_parameter_counts_at_the_130m_shape() {
    let cfg = trainer::model::mamba2::Mamba2Config::from_value(
        &json!({"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                "ssm_cfg": {"layer": "Mamba2"}, "rms_norm": true, "pad_vocab_size_multiple": 16,
                "tie_embeddings": true}),
        Path::new("config.json"),
    )
    .expect("config");
    assert_eq!(cfg.d_in_proj(), 3352);
    let shape: ModelShape = (&cfg).into();
    let count = |v: Value| {
        let spec = AdapterSpec::from_value(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
        spec.validate(&shape).unwrap_or_else(|e| panic!("{v}: {e}"));
        spec.trainable_parameters(&shape)
    };
    let (layers, d, e, h, n) = (24, 768, 1536, 24, 128);
    assert_eq!(
        count(json!({"type": "lora", "targets": "in_proj", "r": 8})),
        layers * 8 * (d + 3352)
    );
    assert_eq!(
        count(json!({"type": "lora", "targets": "out_proj", "r": 8})),
        layers * 8 * (e + d)
    );
    // LoRA_p(X) r 64: the same count as on mamba-130m (3,538,944; spec §4.3).
    assert_eq!(
        count(json!({"type": "lora_p", "slice": "X", "r": 64})),
        3_538_944
    );
    assert_eq!(
        count(json!({"type": "lora_p", "slice": "B", "r": 4})),
        layers * 4 * (d + n)
    );
    assert_eq!(
        count(json!({"type": "lora_p", "slice": "dt", "r": 2})),
        layers * 2 * (d + h)
    );
    assert_eq!(
        count(json!({"type": "partial", "target": "A_log"})),
        layers * h
    );
    assert_eq!(
        count(json!({"type": "partial", "target": "dt_bias"})),
        layers * h
    );
    assert_eq!(
        count(json!({"type": "partial", "target": "norm.weight"})),
        layers * e
    );
    assert_eq!(
        count(json!({"type": "partial", "target": "conv1d.weight"})),
        layers * 1792 * 4
    );
    assert_eq!(count(json!({"type": "bitfit"})), layers * (1792 + h));
    assert_eq!(
        count(json!({"type": "dora_p", "slice": "X", "r": 4})),
        layers * (4 * (d + e) + d)
    );
    // ProDiaL on in_proj (d_out 3352): s [3352], r_b blocks of 768/r_b, LoRA r_ε.
    assert_eq!(
        count(json!({"type": "prodial", "targets": "in_proj", "r_b": {"in_proj": 16}, "r_eps": 4})),
        layers * (3352 + 16 * (d / 16) * (d / 16) + 4 * (d + 3352))
    );
}

/// Mamba-1-only methods are refused on Mamba-2 with a message that names the family and
/// lists what it supports.
#[test]
fn mamba2_refuses_mamba1_methods_naming_what_it_supports() {
    let set = mamba2_method_sets()
        .into_iter()
        .next()
        .expect("a Mamba-2 set");
    let base = load_lm::<Mamba2Mixer>(&set.base_dir);
    let shape = base.peft_shape();
    for (v, needle) in [
        (
            json!({"type": "additional_scan", "n_add": 2}),
            "additional_scan",
        ),
        (json!({"type": "affix", "n": 2}), "affix"),
        (json!({"type": "sll_lora", "r": 2}), "sll_lora"),
        (
            json!({"type": "lora", "targets": "x_proj", "r": 2}),
            "x_proj",
        ),
        (
            json!({"type": "dora", "targets": "dt_proj", "r": 2}),
            "dt_proj",
        ),
    ] {
        let spec = AdapterSpec::from_value(&v).expect("spec");
        let e = spec.validate(&shape).expect_err("refused").to_string();
        assert!(
            e.contains(needle)
                && e.contains("mamba2")
                && (e.contains("lora_p") || e.contains("in_proj")),
            "{v}: {e}"
        );
        let e = Adapter::init(&spec, &base, 0)
            .expect_err("refused at init too")
            .to_string();
        assert!(e.contains(needle), "{v}: {e}");
    }
}
