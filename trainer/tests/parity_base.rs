//! Parity with HF transformers' `MambaForCausalLM` and `Mamba2ForCausalLM` (pure-PyTorch
//! path, float32, CPU) on every `base` case of every language fixture set
//! (`tests/fixtures/index.json`, `alt/index.json`, `mamba2/index.json`, see `common`): the
//! same checks run on both families through the shared `CausalLm` shell. Names, shapes and tolerances come from each case's `manifest.json`, so a
//! case added in the same format runs with no code change.
//!
//! Reference: transformers 5.23.0 / torch 2.15.0 (see the manifests' `versions`).
//! Tolerances (manifest `tolerances`): logits/hidden/state atol 1e-4 rtol 1e-4; loss 1e-5;
//! grads atol 1e-5 rtol 1e-3 elementwise and relative L2 ≤ 1e-4; ids exact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use trainer::generate::{GenerationConfig, generate};
use trainer::model::lm_checkpoint::LmConfig;
use trainer::model::mamba2::Mamba2Mixer;
use trainer::model::{
    CausalLm, Family, LoadOptions, MambaForCausalLM, MambaMixer, Mixer, ModelInput, causal_lm_loss,
};
use trainer::tokenizer::Tokenizer;

mod common;

use common::{Tol, assert_close};

struct Case {
    family: Family,
    name: String,
    model_dir: PathBuf,
    manifest: Value,
    reference: HashMap<String, Tensor>,
}

impl Case {
    /// Reference tensor `name`, checked against the shape the manifest declares.
    fn tensor(&self, name: &str) -> Tensor {
        let t = self
            .reference
            .get(name)
            .unwrap_or_else(|| panic!("{}: reference.safetensors has no `{name}`", self.name))
            .clone();
        let declared: Vec<usize> = self.entry(name)["shape"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: manifest has no shape for `{name}`", self.name))
            .iter()
            .map(|v| v.as_u64().expect("shape entries are integers") as usize)
            .collect();
        assert_eq!(
            t.dims(),
            declared.as_slice(),
            "{}: `{name}` shape",
            self.name
        );
        t
    }

    fn entry(&self, name: &str) -> &Value {
        &self.manifest["tensors"]["reference.safetensors"][name]
    }

    /// Reference tensor names starting with `prefix`, sorted.
    fn names(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self.manifest["tensors"]["reference.safetensors"]
            .as_object()
            .expect("manifest tensors")
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn tol(&self, name: &str) -> Tol {
        let class = self.entry(name)["tolerance"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no tolerance class for `{name}`", self.name));
        let t = &self.manifest["tolerances"][class];
        Tol {
            atol: t["atol"].as_f64().unwrap_or(0.0),
            rtol: t["rtol"].as_f64().unwrap_or(0.0),
            rel_l2: t["rel_l2"].as_f64(),
        }
    }

    fn load<M: Mixer>(&self) -> CausalLm<M> {
        load_lm::<M>(&self.model_dir).unwrap_or_else(|e| panic!("{}: load: {e}", self.name))
    }
}

/// Every base case of the language families (Mamba-1, then Mamba-2).
fn base_cases() -> Vec<Case> {
    [Family::Mamba, Family::Mamba2]
        .into_iter()
        .flat_map(|family| {
            common::indexed_cases(family, "base")
                .into_iter()
                .map(move |c| (family, c))
        })
        .map(|(family, c)| {
            let reference =
                candle_core::safetensors::load(c.dir.join("reference.safetensors"), &Device::Cpu)
                    .expect("reference.safetensors");
            Case {
                family,
                model_dir: c.path("model_dir"),
                manifest: c.manifest(),
                name: c.label,
                reference,
            }
        })
        .collect()
}

/// The Mamba-1 base cases (checks of Mamba-1's own formats).
fn mamba1_cases() -> Vec<Case> {
    base_cases()
        .into_iter()
        .filter(|c| c.family == Family::Mamba)
        .collect()
}

/// Loads a model folder as the language family `M` mixes for.
fn load_lm<M: Mixer>(dir: &Path) -> trainer::Result<CausalLm<M>> {
    CausalLm::<M>::load(dir, &LoadOptions::default())
}

/// Runs `$check::<M>(&case)` on every base case, with `M` the mixer of the case's family.
macro_rules! for_each_case {
    ($check:ident) => {
        for case in base_cases() {
            match case.family {
                Family::Mamba => $check::<MambaMixer>(&case),
                Family::Mamba2 => $check::<Mamba2Mixer>(&case),
                other => panic!("{}: {other} is not a language family", case.name),
            }
        }
    };
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .and_then(|t| t.to_vec2::<i64>())
        .expect("ids")
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

#[test]
fn logits_hidden_states_and_loss() {
    for_each_case!(logits_hidden_states_and_loss_case);
}

fn logits_hidden_states_and_loss_case<M: Mixer>(case: &Case) {
    let model = case.load::<M>();
    let ids = case.tensor("input_ids");
    let input = ModelInput::new(&ids, None, model.vocab_size()).expect("input");
    let out = model.forward_with(&input, true).expect("forward");
    let (d, _) = assert_close(
        &format!("{} logits", case.name),
        &out.logits,
        &case.tensor("logits"),
        case.tol("logits"),
    );
    eprintln!("{}: logits max abs diff {d:.3e}", case.name);

    let n_layers = model.config().num_layers();
    assert_eq!(out.hidden_states.len(), n_layers + 2);
    let mut worst = 0f64;
    for name in case.names("hidden.") {
        let idx = match name.as_str() {
            "hidden.embeddings" => 0,
            "hidden.norm_f" => n_layers + 1,
            other => {
                let i: usize = other
                    .strip_prefix("hidden.block.")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("unknown hidden tensor {other}"));
                i + 1
            }
        };
        let (d, _) = assert_close(
            &format!("{} {name}", case.name),
            &out.hidden_states[idx],
            &case.tensor(&name),
            case.tol(&name),
        );
        worst = worst.max(d);
    }
    eprintln!("{}: hidden states max abs diff {worst:.3e}", case.name);

    let loss = causal_lm_loss(&out.logits, &ids).expect("loss");
    let (d, _) = assert_close(
        &format!("{} loss", case.name),
        &loss.reshape(1).expect("reshape"),
        &case.tensor("loss"),
        case.tol("loss"),
    );
    eprintln!("{}: loss abs diff {d:.3e}", case.name);
}

#[test]
fn full_finetune_gradients() {
    for_each_case!(full_finetune_gradients_case);
}

fn full_finetune_gradients_case<M: Mixer>(case: &Case) {
    let (model, varmap) = CausalLm::<M>::load_trainable(&case.model_dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let ids = case.tensor("input_ids");
    let logits = model.forward(&ids, None).expect("forward");
    let loss = causal_lm_loss(&logits, &ids).expect("loss");
    let grads = loss.backward().expect("backward");

    let vars = varmap.data().lock().expect("varmap").clone();
    let grad_names = case.names("grad.");
    // Every trainable parameter has a reference gradient and vice versa.
    let mut params: Vec<&String> = vars.keys().collect();
    params.sort();
    let listed: Vec<String> = grad_names
        .iter()
        .map(|n| n.trim_start_matches("grad.").to_string())
        .collect();
    assert_eq!(
        params.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        listed.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "{}: parameters vs reference gradients",
        case.name
    );
    let (mut worst_abs, mut worst_l2) = (0f64, 0f64);
    for name in &grad_names {
        let param = name.trim_start_matches("grad.");
        let var = &vars[param];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{}: no gradient for {param}", case.name));
        let (d, l2) = assert_close(
            &format!("{} {name}", case.name),
            g,
            &case.tensor(name),
            case.tol(name),
        );
        worst_abs = worst_abs.max(d);
        worst_l2 = worst_l2.max(l2);
    }
    eprintln!(
        "{}: {} gradients, max abs diff {worst_abs:.3e}, max rel L2 {worst_l2:.3e}",
        case.name,
        grad_names.len()
    );
}

#[test]
fn prefill_cache_step_logits_and_greedy_tokens() {
    for_each_case!(prefill_cache_step_logits_and_greedy_tokens_case);
}

fn prefill_cache_step_logits_and_greedy_tokens_case<M: Mixer>(case: &Case) {
    let model = case.load::<M>();
    let prompt = case.tensor("gen.prompt_ids");
    let input = ModelInput::new(&prompt, None, model.vocab_size()).expect("prompt");
    let b = prompt.dim(0).expect("batch");
    let mut cache = model.new_cache(b).expect("cache");
    model.prefill(&input, &mut cache).expect("prefill");
    let mut worst = 0f64;
    for name in case.names("gen.prefill.") {
        let (kind, layer) = name
            .strip_prefix("gen.prefill.")
            .and_then(|s| s.rsplit_once('.'))
            .unwrap_or_else(|| panic!("unexpected name {name}"));
        let layer: usize = layer.parse().expect("layer index");
        let got = match kind {
            "conv_state" => &cache.layers[layer].conv,
            "ssm_state" => &cache.layers[layer].ssm,
            other => panic!("unknown cache tensor {other}"),
        };
        let (d, _) = assert_close(
            &format!("{} {name}", case.name),
            got,
            &case.tensor(&name),
            case.tol(&name),
        );
        worst = worst.max(d);
    }
    eprintln!("{}: prefill cache max abs diff {worst:.3e}", case.name);

    let step_logits = case.tensor("gen.step_logits");
    let steps = step_logits.dim(0).expect("steps");
    let cfg = GenerationConfig {
        max_new_tokens: steps,
        eos_token_ids: Vec::new(), // the reference generated with EOS stopping off
        keep_step_logits: true,
        ..GenerationConfig::for_model(&model)
    };
    let prompts = ids_of(&prompt);
    let out = generate(&model, &prompts, &cfg).expect("generate");
    assert_eq!(out.step_logits.len(), steps);
    let tol = case.tol("gen.step_logits");
    let want_seq = ids_of(&case.tensor("gen.sequences"));
    let mut worst = 0f64;
    for s in 0..steps {
        let want = step_logits.get(s).expect("step");
        let (d, _) = assert_close(
            &format!("{} gen.step_logits[{s}]", case.name),
            &out.step_logits[s],
            &want,
            tol,
        );
        worst = worst.max(d);
    }
    eprintln!("{}: decode step logits max abs diff {worst:.3e}", case.name);
    for (r, want_row) in want_seq.iter().enumerate() {
        let mut got_row = prompts[r].clone();
        got_row.extend(&out.tokens[r]);
        assert_eq!(&got_row, want_row, "{}: greedy sequence row {r}", case.name);
    }
}

#[test]
fn left_padded_masked_batch() {
    for_each_case!(left_padded_masked_batch_case);
}

fn left_padded_masked_batch_case<M: Mixer>(case: &Case) {
    let model = case.load::<M>();
    let ids = case.tensor("masked.input_ids");
    let mask = case.tensor("masked.attention_mask");
    let logits = model.forward(&ids, Some(&mask)).expect("masked forward");
    let (d, _) = assert_close(
        &format!("{} masked.logits", case.name),
        &logits,
        &case.tensor("masked.logits"),
        case.tol("masked.logits"),
    );
    eprintln!("{}: masked logits max abs diff {d:.3e}", case.name);

    // The padded row's real positions equal an unpadded run of the same tokens.
    let mask_rows = ids_of(&mask);
    let ids_rows = ids_of(&ids);
    for (r, m) in mask_rows.iter().enumerate() {
        let start = m.iter().position(|v| *v == 1).expect("a real token");
        if start == 0 {
            continue;
        }
        let real: Vec<u32> = ids_rows[r][start..].to_vec();
        let n = real.len();
        let alone = model
            .forward(
                &Tensor::from_vec(real, (1, n), &Device::Cpu).expect("ids"),
                None,
            )
            .expect("unpadded forward");
        let padded = logits
            .get(r)
            .and_then(|t| t.narrow(0, start, n))
            .and_then(|t| t.unsqueeze(0))
            .expect("slice");
        assert_close(
            &format!("{} row {r} padded vs alone", case.name),
            &padded,
            &alone,
            case.tol("masked.logits"),
        );
    }
}

#[test]
fn batched_generation_matches_one_at_a_time() {
    for_each_case!(batched_generation_matches_one_at_a_time_case);
}

fn batched_generation_matches_one_at_a_time_case<M: Mixer>(case: &Case) {
    let model = case.load::<M>();
    let mut prompts = ids_of(&case.tensor("gen.prompt_ids"));
    // Different lengths force left padding in the batch.
    let half = prompts[0].len().div_ceil(2);
    prompts[0].truncate(half);
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        eos_token_ids: Vec::new(),
        ..GenerationConfig::for_model(&model)
    };
    let batched = generate(&model, &prompts, &cfg).expect("batched");
    for (r, p) in prompts.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), &cfg).expect("alone");
        assert_eq!(batched.tokens[r], alone.tokens[0], "{}: row {r}", case.name);
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    for_each_case!(sampling_is_reproducible_with_a_seed_case);
}

fn sampling_is_reproducible_with_a_seed_case<M: Mixer>(case: &Case) {
    let model = case.load::<M>();
    let prompts = ids_of(&case.tensor("gen.prompt_ids"));
    let run = |seed| {
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            temperature: 1.5,
            top_p: 0.95,
            seed,
            eos_token_ids: Vec::new(),
            ..GenerationConfig::for_model(&model)
        };
        generate(&model, &prompts, &cfg).expect("sample").tokens
    };
    let a = run(11);
    assert_eq!(a, run(11), "{}: same seed, same tokens", case.name);
    assert!(
        (12..20).any(|s| run(s) != a),
        "{}: different seeds never changed the sample",
        case.name
    );
}

#[test]
fn eos_stops_a_row() {
    for_each_case!(eos_stops_a_row_case);
}

fn eos_stops_a_row_case<M: Mixer>(case: &Case) {
    let model = case.load::<M>();
    let prompts = ids_of(&case.tensor("gen.prompt_ids"));
    let want = ids_of(&case.tensor("gen.sequences"));
    let p = prompts[0].len();
    // Declare the reference's 3rd generated token of row 0 an EOS: row 0 must stop there.
    let eos = want[0][p + 2];
    let cfg = GenerationConfig {
        max_new_tokens: want[0].len() - p,
        eos_token_ids: vec![eos],
        ..GenerationConfig::for_model(&model)
    };
    let out = generate(&model, &prompts, &cfg).expect("generate");
    let first = want[0][p..]
        .iter()
        .position(|t| *t == eos)
        .expect("eos in row");
    assert_eq!(
        out.tokens[0],
        want[0][p..=p + first].to_vec(),
        "{}",
        case.name
    );
    assert_eq!(out.finish_reasons[0], trainer::generate::FinishReason::Eos);
}

#[test]
fn tokenizer_samples() {
    let mut checked = 0;
    for case in base_cases() {
        // The manifest says whether the case has a tokenizer (`tokenizer`: null when not).
        let spec = &case.manifest["tokenizer"];
        let tok = Tokenizer::from_model_dir(&case.model_dir).expect("tokenizer.json");
        if spec.is_null() {
            assert!(
                tok.is_none(),
                "{}: the manifest lists no tokenizer, the model folder has one",
                case.name
            );
            continue;
        }
        let tok = tok.unwrap_or_else(|| {
            panic!(
                "{}: the manifest lists a tokenizer, the model folder has none",
                case.name
            )
        });
        let samples = spec["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: manifest tokenizer.samples", case.name));
        assert!(!samples.is_empty(), "{}: no tokenizer samples", case.name);
        for (i, s) in samples.iter().enumerate() {
            let text = s["text"].as_str().expect("text");
            let want_ids: Vec<u32> = s["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            assert_eq!(
                tok.encode(text).expect("encode"),
                want_ids,
                "{} sample {i} ids",
                case.name
            );
            if let Some(tokens) = s["tokens"].as_array() {
                let want: Vec<&str> = tokens.iter().map(|t| t.as_str().expect("token")).collect();
                assert_eq!(
                    tok.tokens(text).expect("tokens"),
                    want,
                    "{} sample {i} tokens",
                    case.name
                );
            }
            let decoded = tok.decode(&want_ids, true).expect("decode");
            assert_eq!(
                decoded,
                s["decoded"].as_str().expect("decoded"),
                "{} sample {i} decode",
                case.name
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no tokenizer samples were checked");
}

// ---- The same checkpoint in the other formats and namings gives the same logits. ----

/// Writes `tensors` (f32) as a PyTorch zip checkpoint (`torch.save(state_dict)` layout:
/// `archive/data.pkl` holding an OrderedDict of `_rebuild_tensor_v2` calls, one storage file
/// per tensor under `archive/data/`).
fn write_pytorch_bin(path: &Path, tensors: &[(String, Tensor)]) {
    use std::io::Write;
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    }
    let mut pkl = vec![0x80, 2];
    pkl.extend(b"ccollections\nOrderedDict\n)R(");
    for (key, (name, t)) in tensors.iter().enumerate() {
        let dims = t.dims().to_vec();
        let mut strides = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        unicode(&mut pkl, name);
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut pkl, &key.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend(b"tQ");
        int(&mut pkl, 0);
        pkl.push(b'(');
        dims.iter().for_each(|d| int(&mut pkl, *d));
        pkl.push(b't');
        pkl.push(b'(');
        strides.iter().for_each(|s| int(&mut pkl, *s));
        pkl.push(b't');
        pkl.push(0x89); // requires_grad = False
        pkl.extend(b"ccollections\nOrderedDict\n)R");
        pkl.extend(b"tR");
    }
    pkl.extend(b"u.");

    let file = std::fs::File::create(path).expect("create bin");
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).expect("zip");
    zip.write_all(&pkl).expect("zip");
    for (key, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), opts)
            .expect("zip");
        let v = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32");
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        zip.write_all(&bytes).expect("zip");
    }
    zip.start_file("archive/version", opts).expect("zip");
    zip.write_all(b"3\n").expect("zip");
    zip.finish().expect("zip");
}

fn check_logits<M: Mixer>(case: &Case, dir: &Path, what: &str) {
    let model = load_lm::<M>(dir).unwrap_or_else(|e| panic!("{} {what}: {e}", case.name));
    let logits = model
        .forward(&case.tensor("input_ids"), None)
        .expect("forward");
    assert_close(
        &format!("{} {what} logits", case.name),
        &logits,
        &case.tensor("logits"),
        case.tol("logits"),
    );
}

#[test]
fn sharded_safetensors_give_the_same_logits() {
    for_each_case!(sharded_safetensors_give_the_same_logits_case);
}

fn sharded_safetensors_give_the_same_logits_case<M: Mixer>(case: &Case) {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        case.model_dir.join("config.json"),
        tmp.path().join("config.json"),
    )
    .expect("config");
    let all =
        candle_core::safetensors::load(case.model_dir.join("model.safetensors"), &Device::Cpu)
            .expect("weights");
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    for (i, name) in names.iter().enumerate() {
        let shard = i % 2;
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        weight_map.insert((*name).clone(), Value::from(file));
        shards[shard].insert((*name).clone(), all[*name].clone());
    }
    for (i, s) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            s,
            tmp.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .expect("save shard");
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::to_string(&index).expect("json"),
    )
    .expect("index");
    check_logits::<M>(case, tmp.path(), "sharded");
}

#[test]
fn state_spaces_config_original_naming_and_pytorch_bin_give_the_same_logits() {
    for case in mamba1_cases() {
        let hf: Value = serde_json::from_str(
            &std::fs::read_to_string(case.model_dir.join("config.json")).expect("config"),
        )
        .expect("json");
        let vocab = hf["vocab_size"].as_u64().expect("vocab") as usize;
        // state-spaces checkpoints store the embedding padded to a multiple of
        // `pad_vocab_size_multiple`, and their config holds the unpadded size. Declare the
        // smallest vocabulary that pads up to the padded row count (so the loader's padding
        // always runs), and pad the tensors with zero rows to that count.
        let multiple = 8usize;
        let padded = vocab.div_ceil(multiple) * multiple;
        let declared = padded - multiple + 1;
        assert!(declared <= vocab && declared.div_ceil(multiple) * multiple == padded);
        let original = serde_json::json!({
            "d_model": hf["hidden_size"],
            "n_layer": hf["num_hidden_layers"],
            "vocab_size": declared,
            "pad_vocab_size_multiple": multiple,
            "ssm_cfg": {
                "d_state": hf["state_size"],
                "d_conv": hf["conv_kernel"],
                "expand": hf["expand"],
                "dt_rank": hf["time_step_rank"],
            },
            "rms_norm": true,
            "residual_in_fp32": true,
            "fused_add_norm": true,
            "tie_embeddings": true,
        });
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("config.json"), original.to_string()).expect("config");
        let all =
            candle_core::safetensors::load(case.model_dir.join("model.safetensors"), &Device::Cpu)
                .expect("weights");
        let emb = &all["backbone.embeddings.weight"];
        assert_eq!(
            emb.dim(0).expect("rows"),
            vocab,
            "{}: embedding rows",
            case.name
        );
        let emb = if padded > vocab {
            let zeros = Tensor::zeros(
                (padded - vocab, emb.dim(1).expect("hidden")),
                emb.dtype(),
                &Device::Cpu,
            )
            .expect("zeros");
            Tensor::cat(&[emb, &zeros], 0).expect("pad")
        } else {
            emb.clone()
        };
        let mut tensors: Vec<(String, Tensor)> = all
            .iter()
            .map(|(k, v)| {
                let v = if k == "backbone.embeddings.weight" {
                    emb.clone()
                } else {
                    v.clone()
                };
                (k.replace("backbone.embeddings.", "backbone.embedding."), v)
            })
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        // torch.save of a tied model lists the head too; it must be accepted as tied.
        tensors.push(("lm_head.weight".into(), emb));
        write_pytorch_bin(&tmp.path().join("pytorch_model.bin"), &tensors);
        let model = MambaForCausalLM::load(tmp.path(), &LoadOptions::default()).expect("load bin");
        assert!(
            model.lm_head.is_none(),
            "an identical lm_head.weight is tied"
        );
        assert_eq!(
            model.vocab_size(),
            padded,
            "{}: padded vocabulary",
            case.name
        );
        let what = "pytorch_model.bin, state-spaces naming";
        let logits = model
            .forward(&case.tensor("input_ids"), None)
            .expect("forward");
        // The real vocabulary gives the reference logits; the zero padding rows give 0.
        assert_close(
            &format!("{} {what} logits", case.name),
            &logits.narrow(2, 0, vocab).expect("narrow"),
            &case.tensor("logits"),
            case.tol("logits"),
        );
        if padded > vocab {
            let pad = logits.narrow(2, vocab, padded - vocab).expect("narrow");
            assert_close(
                &format!("{} {what} padded logits", case.name),
                &pad,
                &pad.zeros_like().expect("zeros"),
                Tol {
                    atol: 0.0,
                    rtol: 0.0,
                    rel_l2: None,
                },
            );
        }
    }
}

#[test]
fn an_untied_head_is_used() {
    for case in mamba1_cases() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(case.model_dir.join("config.json")).expect("config"),
        )
        .expect("json");
        cfg["tie_word_embeddings"] = Value::Bool(false);
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).expect("config");
        let mut all =
            candle_core::safetensors::load(case.model_dir.join("model.safetensors"), &Device::Cpu)
                .expect("weights");
        let emb = all["backbone.embeddings.weight"].clone();
        all.insert("lm_head.weight".into(), (emb * 2.0).expect("scale"));
        candle_core::safetensors::save(&all, tmp.path().join("model.safetensors")).expect("save");
        let model = MambaForCausalLM::load(tmp.path(), &LoadOptions::default()).expect("load");
        assert!(model.lm_head.is_some());
        let logits = model
            .forward(&case.tensor("input_ids"), None)
            .expect("forward");
        // The head is linear in its weight: doubling it doubles the logits.
        let want = (case.tensor("logits") * 2.0).expect("scale");
        assert_close(
            &format!("{} untied head", case.name),
            &logits,
            &want,
            Tol {
                atol: 2.0 * case.tol("logits").atol,
                ..case.tol("logits")
            },
        );
    }
}

/// The walk covers more than one shape: at least two case sets, each with base and adapter
/// cases, a vocabulary that is not a multiple of 8, and several state sizes, conv kernels and
/// layer counts. A test that bakes in one fixture's shapes fails on the other set, in CI.
#[test]
fn the_walk_covers_other_shapes() {
    use std::collections::BTreeSet;
    let base = common::indexed_cases(trainer::model::Family::Mamba, "base");
    let adapters = common::indexed_cases(trainer::model::Family::Mamba, "adapter");
    let sets: BTreeSet<&PathBuf> = base.iter().map(|c| &c.set).collect();
    assert!(sets.len() >= 2, "only one case set: {sets:?}");
    for set in &sets {
        assert!(
            adapters.iter().any(|c| &&c.set == set),
            "{}: no adapter case",
            set.display()
        );
    }
    let configs: Vec<Value> = base
        .iter()
        .map(|c| common::read_json(&c.path("model_dir").join("config.json")))
        .collect();
    let distinct = |key: &str| -> BTreeSet<u64> {
        configs
            .iter()
            .map(|c| c[key].as_u64().unwrap_or_else(|| panic!("config `{key}`")))
            .collect()
    };
    assert!(
        distinct("vocab_size").iter().any(|v| !v.is_multiple_of(8)),
        "every vocabulary is a multiple of 8: {:?}",
        distinct("vocab_size")
    );
    for key in [
        "state_size",
        "conv_kernel",
        "num_hidden_layers",
        "hidden_size",
    ] {
        assert!(
            distinct(key).len() >= 2,
            "one `{key}` only: {:?}",
            distinct(key)
        );
    }
}

/// Mamba-2 cases with an `original_model_dir` (mamba_ssm's own format: `backbone.embedding`,
/// `pytorch_model.bin` with `lm_head.weight` sharing the embedding's storage, an
/// `ssm_cfg: {"layer": "Mamba2"}` config with a padded vocabulary) reproduce
/// `original.logits`, whose first `vocab_size` columns are the HF logits.
#[test]
fn mamba2_original_format_gives_the_reference_logits() {
    let mut checked = 0;
    for c in common::indexed_cases(Family::Mamba2, "base") {
        if c.entry.get("original_model_dir").is_none() {
            continue;
        }
        let case = base_cases()
            .into_iter()
            .find(|b| b.name == c.label)
            .expect("the case");
        let model = load_lm::<Mamba2Mixer>(&c.path("original_model_dir"))
            .unwrap_or_else(|e| panic!("{}: original format: {e}", c.label));
        let logits = model
            .forward(&case.tensor("input_ids"), None)
            .expect("forward");
        assert_close(
            &format!("{} original.logits", case.name),
            &logits,
            &case.tensor("original.logits"),
            case.tol("original.logits"),
        );
        checked += 1;
    }
    assert!(checked > 0, "no Mamba-2 case has an original-format model");
}

/// The Mamba-2 walk covers more than one shape too: head dims, group counts, chunk sizes,
/// conv widths, a vocabulary that is not a multiple of 8, and a finite dt limit.
#[test]
fn the_mamba2_walk_covers_other_shapes() {
    use std::collections::BTreeSet;
    let configs: Vec<Value> = common::indexed_cases(Family::Mamba2, "base")
        .iter()
        .map(|c| common::read_json(&c.path("model_dir").join("config.json")))
        .collect();
    let distinct = |key: &str| -> BTreeSet<u64> {
        configs
            .iter()
            .map(|c| c[key].as_u64().unwrap_or_else(|| panic!("config `{key}`")))
            .collect()
    };
    for key in [
        "head_dim",
        "n_groups",
        "chunk_size",
        "conv_kernel",
        "num_heads",
    ] {
        assert!(
            distinct(key).len() >= 2,
            "one `{key}` only: {:?}",
            distinct(key)
        );
    }
    assert!(
        distinct("vocab_size").iter().any(|v| !v.is_multiple_of(8)),
        "every vocabulary is a multiple of 8"
    );
    assert!(
        configs
            .iter()
            .any(|c| c["time_step_limit"][1].as_f64().is_some_and(f64::is_finite)),
        "no case has a finite dt limit"
    );
}

/// Matrices kept in bf16 (`CausalLm::store_weights_as`, `--dtype bf16`): the products read
/// bf16 weights (the panel GEMM for the prompt rows, the few-row kernel for each decode
/// step) but sum in f32, so the logits stay within bf16's rounding of the weights
/// (relative 2⁻⁹ per weight) of the f32 reference, and greedy decoding picks the same tokens.
/// Tolerance: relative L2 of the logits ≤ 2 %, every logit within 4 % of the largest (the
/// fixtures measured ≤ 0.91 % and ≤ 1.01 %).
#[test]
fn bf16_weights_keep_logits_and_greedy_tokens() {
    for_each_case!(bf16_weights_case);
}

fn bf16_weights_case<M: Mixer>(case: &Case) {
    let model = case
        .load::<M>()
        .store_weights_as(DType::BF16)
        .expect("store as bf16");
    let bf16_matrices = model
        .named_weights()
        .iter()
        .filter(|(_, t)| t.dtype() == DType::BF16)
        .count();
    assert!(bf16_matrices > 0, "{}: no matrix kept in bf16", case.name);
    let scale = |want: &Tensor| {
        want.abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_scalar::<f64>())
            .expect("scale")
    };
    let tol = |want: &Tensor| Tol {
        atol: 0.04 * scale(want),
        rtol: 0.0,
        rel_l2: Some(0.02),
    };
    let ids = case.tensor("input_ids");
    let input = ModelInput::new(&ids, None, model.vocab_size()).expect("input");
    let logits = model.forward_with(&input, false).expect("forward").logits;
    let want = case.tensor("logits");
    let (d, l2) = assert_close(
        &format!("{} bf16 logits", case.name),
        &logits,
        &want,
        tol(&want),
    );
    eprintln!(
        "{}: bf16 logits max abs diff {:.2} % of the largest, rel L2 {l2:.3e}",
        case.name,
        100.0 * d / scale(&want)
    );

    let prompt = case.tensor("gen.prompt_ids");
    let step_logits = case.tensor("gen.step_logits");
    let steps = step_logits.dim(0).expect("steps");
    let cfg = GenerationConfig {
        max_new_tokens: steps,
        eos_token_ids: Vec::new(),
        keep_step_logits: true,
        ..GenerationConfig::for_model(&model)
    };
    let prompts = ids_of(&prompt);
    let out = generate(&model, &prompts, &cfg).expect("generate");
    let mut worst = (0f64, 0f64);
    for s in 0..steps {
        let want = step_logits.get(s).expect("step");
        let (d, l2) = assert_close(
            &format!("{} bf16 gen.step_logits[{s}]", case.name),
            &out.step_logits[s],
            &want,
            tol(&want),
        );
        worst = (worst.0.max(d / scale(&want)), worst.1.max(l2));
    }
    eprintln!(
        "{}: bf16 decode step logits max abs diff {:.2} % of the largest, rel L2 {:.3e}",
        case.name,
        100.0 * worst.0,
        worst.1
    );
    for (r, want_row) in ids_of(&case.tensor("gen.sequences")).iter().enumerate() {
        let mut got_row = prompts[r].clone();
        got_row.extend(&out.tokens[r]);
        assert_eq!(&got_row, want_row, "{}: bf16 greedy row {r}", case.name);
    }
}
