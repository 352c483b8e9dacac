//! Bad checkpoints and bad inputs give errors that name the file, the tensor and the
//! expected and found shapes — never a panic. Broken checkpoints are built in a temp dir
//! from the `tiny` fixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use trainer::model::{LoadOptions, MambaForCausalLM, causal_lm_loss};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/model")
}

/// A copy of the tiny checkpoint with its weights and config passed through `edit_*`.
fn broken(
    edit_weights: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut Value),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut weights =
        candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu)
            .expect("weights");
    edit_weights(&mut weights);
    candle_core::safetensors::save(&weights, tmp.path().join("model.safetensors")).expect("save");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).expect("config"))
            .expect("json");
    edit_config(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).expect("write config");
    tmp
}

fn load_err(dir: &Path) -> String {
    match MambaForCausalLM::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => {
            // Shown with --nocapture, to read the messages as a user would.
            eprintln!("{e}\n");
            e.to_string()
        }
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message lacks `{p}`:\n{msg}");
    }
}

fn model() -> MambaForCausalLM {
    MambaForCausalLM::load(&tiny(), &LoadOptions::default()).expect("tiny loads")
}

#[test]
fn missing_tensor() {
    let dir = broken(
        |w| {
            w.remove("backbone.layers.0.mixer.D");
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "missing tensor `backbone.layers.0.mixer.D`",
            "[128]",
            "intermediate_size",
        ],
    );
}

#[test]
fn extra_tensor() {
    let dir = broken(
        |w| {
            let t = Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu).expect("zeros");
            w.insert("backbone.layers.0.mixer.gate_proj.weight".into(), t);
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "unexpected tensor `backbone.layers.0.mixer.gate_proj.weight`",
            "[3, 5]",
        ],
    );
}

#[test]
fn misshaped_tensor() {
    let dir = broken(
        |w| {
            let t = Tensor::zeros((21, 128), candle_core::DType::F32, &Device::Cpu).expect("zeros");
            w.insert("backbone.layers.1.mixer.x_proj.weight".into(), t);
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "`backbone.layers.1.mixer.x_proj.weight`",
            "has shape [21, 128]",
            "expected [20, 128]",
        ],
    );
}

#[test]
fn config_contradicts_tensors() {
    // Hidden size: every tensor that depends on it is reported with both shapes.
    let dir = broken(
        |_| {},
        |c| {
            c["hidden_size"] = Value::from(32);
            c["intermediate_size"] = Value::from(64);
        },
    );
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "`backbone.embeddings.weight` has shape [512, 64], expected [512, 32]",
            "hidden_size",
        ],
    );

    // More layers than the checkpoint has.
    let dir = broken(|_| {}, |c| c["num_hidden_layers"] = Value::from(3));
    let e = load_err(dir.path());
    assert_mentions(&e, &["num_hidden_layers=3", "no tensors for layer 2"]);

    // Fewer layers than the checkpoint has.
    let dir = broken(|_| {}, |c| c["num_hidden_layers"] = Value::from(1));
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &["model.safetensors", "num_hidden_layers=1", "has layer 1"],
    );

    // Vocabulary.
    let dir = broken(|_| {}, |c| c["vocab_size"] = Value::from(500));
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &["has shape [512, 64], expected [500, 64]", "vocab_size"],
    );

    // use_bias declared true with no bias tensors.
    let dir = broken(|_| {}, |c| c["use_bias"] = Value::Bool(true));
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "missing tensor `backbone.layers.0.mixer.in_proj.bias`",
            "use_bias is true",
        ],
    );

    // use_conv_bias declared false with bias tensors present.
    let dir = broken(|_| {}, |c| c["use_conv_bias"] = Value::Bool(false));
    let e = load_err(dir.path());
    assert_mentions(&e, &["conv1d.bias", "use_conv_bias=false"]);

    // An untied config with no lm_head.weight.
    let dir = broken(|_| {}, |c| c["tie_word_embeddings"] = Value::Bool(false));
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "missing tensor `lm_head.weight`",
            "[512, 64]",
            "untied",
        ],
    );
}

#[test]
fn missing_use_bias_is_taken_from_the_tensors() {
    let dir = broken(
        |_| {},
        |c| {
            if let Some(o) = c.as_object_mut() {
                o.remove("use_bias");
                o.remove("use_conv_bias");
            }
        },
    );
    let m = MambaForCausalLM::load(dir.path(), &LoadOptions::default()).expect("loads");
    assert!(
        !m.config().use_bias,
        "never default a missing use_bias to true"
    );
    assert!(m.config().use_conv_bias);
}

#[test]
fn unknown_and_unsupported_config_styles() {
    let dir = broken(
        |_| {},
        |c| *c = serde_json::json!({"n_embd": 64, "n_layer": 2}),
    );
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "config.json",
            "unknown config style",
            "hidden_size",
            "d_model",
        ],
    );

    let dir = broken(
        |_| {},
        |c| *c = serde_json::json!({"d_model": 64, "n_layer": 2, "vocab_size": 512, "ssm_cfg": {"layer": "Mamba2"}}),
    );
    let e = load_err(dir.path());
    assert_mentions(&e, &["config.json", "unsupported", "Mamba2"]);

    let dir = broken(|_| {}, |c| c["model_type"] = Value::from("mamba2"));
    let e = load_err(dir.path());
    assert_mentions(&e, &["config.json", "mamba2"]);

    let dir = broken(|_| {}, |c| c["state_size"] = Value::from("eight"));
    let e = load_err(dir.path());
    assert_mentions(&e, &["config.json", "state_size", "\"eight\""]);

    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("config.json"), "{not json").expect("write");
    let e = load_err(tmp.path());
    assert_mentions(&e, &["config.json", "invalid JSON"]);
}

#[test]
fn non_finite_weights() {
    let dir = broken(
        |w| {
            let a = &w["backbone.layers.1.mixer.A_log"];
            let mut v = a
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            v[5] = f32::NAN;
            v[9] = f32::INFINITY;
            let t = Tensor::from_vec(v, a.dims(), &Device::Cpu).expect("tensor");
            w.insert("backbone.layers.1.mixer.A_log".into(), t);
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            "model.safetensors",
            "`backbone.layers.1.mixer.A_log`",
            "2 non-finite",
            "index 5",
        ],
    );
}

#[test]
fn integer_weights_are_refused() {
    let dir = broken(
        |w| {
            let t = Tensor::zeros(128, candle_core::DType::I64, &Device::Cpu).expect("zeros");
            w.insert("backbone.layers.0.mixer.D".into(), t);
        },
        |_| {},
    );
    assert_mentions(
        &load_err(dir.path()),
        &["`backbone.layers.0.mixer.D`", "I64"],
    );
}

#[test]
fn no_or_unreadable_weights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(tiny().join("config.json"), tmp.path().join("config.json")).expect("copy");
    assert_mentions(&load_err(tmp.path()), &["no weights found"]);

    std::fs::write(
        tmp.path().join("model.safetensors"),
        b"definitely not safetensors",
    )
    .expect("write");
    assert_mentions(
        &load_err(tmp.path()),
        &["model.safetensors", "cannot read weights"],
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(tiny().join("config.json"), tmp.path().join("config.json")).expect("copy");
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"PK not a zip").expect("write");
    assert_mentions(
        &load_err(tmp.path()),
        &["pytorch_model.bin", "cannot read weights"],
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    assert_mentions(&load_err(tmp.path()), &["config.json"]);

    // A sharded index naming a file that is not there.
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(tiny().join("config.json"), tmp.path().join("config.json")).expect("copy");
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"backbone.norm_f.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .expect("write");
    assert_mentions(
        &load_err(tmp.path()),
        &[
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "not found",
        ],
    );
}

#[test]
fn token_ids_out_of_range() {
    let m = model();
    let ids = Tensor::new(&[[1u32, 512, 3]], &Device::Cpu).expect("ids");
    let e = m
        .forward(&ids, None)
        .expect_err("id 512 ≥ vocab 512")
        .to_string();
    assert_mentions(
        &e,
        &["input_ids", "token id 512", "[0, 1]", "vocabulary of 512"],
    );

    let ids = Tensor::new(&[[1i64, 2], [3, -1]], &Device::Cpu).expect("ids");
    let e = m.forward(&ids, None).expect_err("negative id").to_string();
    assert_mentions(&e, &["input_ids", "token id -1", "[1, 1]"]);

    let e = m
        .step(&[4, 9999], &mut m.new_cache(2).expect("cache"))
        .expect_err("step")
        .to_string();
    assert_mentions(&e, &["token id 9999"]);
}

#[test]
fn empty_and_malformed_input() {
    let m = model();
    for shape in [(1usize, 0usize), (0, 4)] {
        let ids = Tensor::zeros(shape, candle_core::DType::U32, &Device::Cpu).expect("ids");
        let e = m.forward(&ids, None).expect_err("empty").to_string();
        assert_mentions(&e, &["input_ids", "empty input"]);
    }
    let ids = Tensor::new(&[1u32, 2, 3], &Device::Cpu).expect("ids");
    assert_mentions(
        &m.forward(&ids, None).expect_err("1-d").to_string(),
        &["input_ids", "[batch, length]"],
    );
    let ids = Tensor::new(&[[1f32, 2.]], &Device::Cpu).expect("ids");
    assert_mentions(
        &m.forward(&ids, None).expect_err("float ids").to_string(),
        &["input_ids", "F32"],
    );

    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).expect("ids");
    let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).expect("mask");
    assert_mentions(
        &m.forward(&ids, Some(&mask))
            .expect_err("mask shape")
            .to_string(),
        &["attention_mask", "[1, 2]"],
    );
    let mask = Tensor::new(&[[1u32, 2, 1]], &Device::Cpu).expect("mask");
    assert_mentions(
        &m.forward(&ids, Some(&mask))
            .expect_err("mask value")
            .to_string(),
        &["attention_mask", "value 2"],
    );

    let logits = m.forward(&ids, None).expect("forward");
    let one = Tensor::new(&[[1u32]], &Device::Cpu).expect("ids");
    let short = m.forward(&one, None).expect("forward");
    assert_mentions(
        &causal_lm_loss(&short, &one).expect_err("T=1").to_string(),
        &["at least 2 positions"],
    );
    let labels = Tensor::new(&[[1i64, -100, 700]], &Device::Cpu).expect("labels");
    assert_mentions(
        &causal_lm_loss(&logits, &labels)
            .expect_err("label")
            .to_string(),
        &["label 700", "[0, 2]"],
    );
    let labels = Tensor::new(&[[1i64, -100, -100]], &Device::Cpu).expect("labels");
    assert_mentions(
        &causal_lm_loss(&logits, &labels)
            .expect_err("all ignored")
            .to_string(),
        &["ignored"],
    );
}

#[test]
fn bad_generation_settings() {
    use trainer::generate::{GenerationConfig, generate};
    let m = model();
    let cfg = GenerationConfig {
        temperature: -1.0,
        ..GenerationConfig::for_model(&m)
    };
    assert_mentions(
        &generate(&m, &[vec![1, 2]], &cfg)
            .expect_err("temp")
            .to_string(),
        &["temperature"],
    );
    let cfg = GenerationConfig {
        top_p: 0.0,
        ..GenerationConfig::for_model(&m)
    };
    assert_mentions(
        &generate(&m, &[vec![1, 2]], &cfg)
            .expect_err("top_p")
            .to_string(),
        &["top_p"],
    );
    let cfg = GenerationConfig::for_model(&m);
    assert_mentions(
        &generate(&m, &[vec![1], vec![]], &cfg)
            .expect_err("empty")
            .to_string(),
        &["prompt 1 is empty"],
    );
    assert_mentions(
        &generate(&m, &[vec![1, 600]], &cfg)
            .expect_err("oov")
            .to_string(),
        &["token id 600"],
    );
}
