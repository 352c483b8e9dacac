//! Bad checkpoints and bad inputs give errors that name the file, the tensor and the
//! expected and found shapes — never a panic. Broken checkpoints are built in a temp dir
//! from every base fixture checkpoint (see `common`); every size in an expected message is
//! read from that checkpoint's config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use trainer::model::{LoadOptions, MambaForCausalLM, causal_lm_loss};

mod common;

/// One base fixture checkpoint and the sizes its config.json declares.
struct Base {
    label: String,
    dir: PathBuf,
    vocab: usize,
    hidden: usize,
    inner: usize,
    state: usize,
    rank: usize,
    layers: usize,
}

fn bases() -> Vec<Base> {
    common::indexed_cases(trainer::model::Family::Mamba, "base")
        .into_iter()
        .map(|c| {
            let dir = c.path("model_dir");
            let cfg = common::read_json(&dir.join("config.json"));
            let get = |k: &str| {
                cfg[k]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{}: config `{k}`", c.label)) as usize
            };
            let base = Base {
                vocab: get("vocab_size"),
                hidden: get("hidden_size"),
                inner: get("intermediate_size"),
                state: get("state_size"),
                rank: get("time_step_rank"),
                layers: get("num_hidden_layers"),
                label: c.label,
                dir,
            };
            assert!(
                base.layers >= 2,
                "{}: the layer checks need 2 layers",
                base.label
            );
            base
        })
        .collect()
}

/// A copy of `base`'s checkpoint with its weights and config passed through `edit_*`.
fn broken(
    base: &Base,
    edit_weights: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut Value),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut weights =
        candle_core::safetensors::load(base.dir.join("model.safetensors"), &Device::Cpu)
            .expect("weights");
    edit_weights(&mut weights);
    candle_core::safetensors::save(&weights, tmp.path().join("model.safetensors")).expect("save");
    let mut cfg = common::read_json(&base.dir.join("config.json"));
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

fn assert_mentions<S: AsRef<str>>(msg: &str, parts: &[S]) {
    for p in parts {
        let p = p.as_ref();
        assert!(msg.contains(p), "error message lacks `{p}`:\n{msg}");
    }
}

fn model(base: &Base) -> MambaForCausalLM {
    MambaForCausalLM::load(&base.dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", base.label))
}

#[test]
fn missing_tensor() {
    for b in bases() {
        let dir = broken(
            &b,
            |w| {
                w.remove("backbone.layers.0.mixer.D");
            },
            |_| {},
        );
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                "model.safetensors".to_string(),
                "missing tensor `backbone.layers.0.mixer.D`".to_string(),
                format!("[{}]", b.inner),
                "intermediate_size".to_string(),
            ],
        );
    }
}

#[test]
fn extra_tensor() {
    for b in bases() {
        let dir = broken(
            &b,
            |w| {
                let t =
                    Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu).expect("zeros");
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
}

#[test]
fn misshaped_tensor() {
    for b in bases() {
        // x_proj of the last layer with one row too many: [dt_rank + 2·state + 1, d_inner].
        let rows = b.rank + 2 * b.state;
        let name = format!("backbone.layers.{}.mixer.x_proj.weight", b.layers - 1);
        let dir = broken(
            &b,
            |w| {
                let t = Tensor::zeros((rows + 1, b.inner), candle_core::DType::F32, &Device::Cpu)
                    .expect("zeros");
                w.insert(name.clone(), t);
            },
            |_| {},
        );
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                "model.safetensors".to_string(),
                format!("`{name}`"),
                format!("has shape [{}, {}]", rows + 1, b.inner),
                format!("expected [{rows}, {}]", b.inner),
            ],
        );
    }
}

#[test]
fn config_contradicts_tensors() {
    for b in bases() {
        let (v, h, l) = (b.vocab, b.hidden, b.layers);
        // Hidden size: every tensor that depends on it is reported with both shapes.
        let dir = broken(
            &b,
            |_| {},
            |c| {
                c["hidden_size"] = Value::from(h / 2);
                c["intermediate_size"] = Value::from(b.inner / 2);
            },
        );
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                format!(
                    "`backbone.embeddings.weight` has shape [{v}, {h}], expected [{v}, {}]",
                    h / 2
                ),
                "hidden_size".to_string(),
            ],
        );

        // More layers than the checkpoint has.
        let dir = broken(&b, |_| {}, |c| c["num_hidden_layers"] = Value::from(l + 1));
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                format!("num_hidden_layers={}", l + 1),
                format!("no tensors for layer {l}"),
            ],
        );

        // Fewer layers than the checkpoint has.
        let dir = broken(&b, |_| {}, |c| c["num_hidden_layers"] = Value::from(l - 1));
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                "model.safetensors".to_string(),
                format!("num_hidden_layers={}", l - 1),
                format!("has layer {}", l - 1),
            ],
        );

        // Vocabulary.
        let dir = broken(&b, |_| {}, |c| c["vocab_size"] = Value::from(v - 12));
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                format!("has shape [{v}, {h}], expected [{}, {h}]", v - 12),
                "vocab_size".to_string(),
            ],
        );

        // use_bias declared true with no bias tensors.
        let dir = broken(&b, |_| {}, |c| c["use_bias"] = Value::Bool(true));
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                "missing tensor `backbone.layers.0.mixer.in_proj.bias`",
                "use_bias is true",
            ],
        );

        // use_conv_bias declared false with bias tensors present.
        let dir = broken(&b, |_| {}, |c| c["use_conv_bias"] = Value::Bool(false));
        let e = load_err(dir.path());
        assert_mentions(&e, &["conv1d.bias", "use_conv_bias=false"]);

        // An untied config with no lm_head.weight.
        let dir = broken(
            &b,
            |_| {},
            |c| c["tie_word_embeddings"] = Value::Bool(false),
        );
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                "model.safetensors".to_string(),
                "missing tensor `lm_head.weight`".to_string(),
                format!("[{v}, {h}]"),
                "untied".to_string(),
            ],
        );
    }
}

#[test]
fn missing_use_bias_is_taken_from_the_tensors() {
    for b in bases() {
        let dir = broken(
            &b,
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
            "{}: never default a missing use_bias to true",
            b.label
        );
        assert!(m.config().use_conv_bias, "{}", b.label);
    }
}

#[test]
fn unknown_and_unsupported_config_styles() {
    for b in bases() {
        let (h, l, v) = (b.hidden, b.layers, b.vocab);
        let dir = broken(
            &b,
            |_| {},
            |c| *c = serde_json::json!({"n_embd": h, "n_layer": l}),
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
            &b,
            |_| {},
            |c| *c = serde_json::json!({"d_model": h, "n_layer": l, "vocab_size": v, "ssm_cfg": {"layer": "Mamba2"}}),
        );
        let e = load_err(dir.path());
        assert_mentions(&e, &["config.json", "unsupported", "Mamba2"]);

        let dir = broken(&b, |_| {}, |c| c["model_type"] = Value::from("mamba2"));
        let e = load_err(dir.path());
        assert_mentions(&e, &["config.json", "mamba2"]);

        let dir = broken(&b, |_| {}, |c| c["state_size"] = Value::from("eight"));
        let e = load_err(dir.path());
        assert_mentions(&e, &["config.json", "state_size", "\"eight\""]);
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("config.json"), "{not json").expect("write");
    let e = load_err(tmp.path());
    assert_mentions(&e, &["config.json", "invalid JSON"]);
}

#[test]
fn non_finite_weights() {
    for b in bases() {
        let name = format!("backbone.layers.{}.mixer.A_log", b.layers - 1);
        let dir = broken(
            &b,
            |w| {
                let a = &w[&name];
                let mut v = a
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("values");
                v[5] = f32::NAN;
                v[9] = f32::INFINITY;
                let t = Tensor::from_vec(v, a.dims(), &Device::Cpu).expect("tensor");
                w.insert(name.clone(), t);
            },
            |_| {},
        );
        let e = load_err(dir.path());
        assert_mentions(
            &e,
            &[
                "model.safetensors".to_string(),
                format!("`{name}`"),
                "2 non-finite".to_string(),
                "index 5".to_string(),
            ],
        );
    }
}

#[test]
fn integer_weights_are_refused() {
    for b in bases() {
        let dir = broken(
            &b,
            |w| {
                let t =
                    Tensor::zeros(b.inner, candle_core::DType::I64, &Device::Cpu).expect("zeros");
                w.insert("backbone.layers.0.mixer.D".into(), t);
            },
            |_| {},
        );
        assert_mentions(
            &load_err(dir.path()),
            &["`backbone.layers.0.mixer.D`", "I64"],
        );
    }
}

#[test]
fn no_or_unreadable_weights() {
    for b in bases() {
        let config = b.dir.join("config.json");
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::copy(&config, tmp.path().join("config.json")).expect("copy");
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
        std::fs::copy(&config, tmp.path().join("config.json")).expect("copy");
        std::fs::write(tmp.path().join("pytorch_model.bin"), b"PK not a zip").expect("write");
        assert_mentions(
            &load_err(tmp.path()),
            &["pytorch_model.bin", "cannot read weights"],
        );

        // A sharded index naming a file that is not there.
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::copy(&config, tmp.path().join("config.json")).expect("copy");
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

    let tmp = tempfile::tempdir().expect("tempdir");
    assert_mentions(&load_err(tmp.path()), &["config.json"]);
}

#[test]
fn token_ids_out_of_range() {
    for b in bases() {
        let m = model(&b);
        let v = b.vocab;
        let ids = Tensor::new(&[[1u32, v as u32, 3]], &Device::Cpu).expect("ids");
        let e = m
            .forward(&ids, None)
            .expect_err("id = vocab size")
            .to_string();
        assert_mentions(
            &e,
            &[
                "input_ids".to_string(),
                format!("token id {v}"),
                "[0, 1]".to_string(),
                format!("vocabulary of {v}"),
            ],
        );

        let ids = Tensor::new(&[[1i64, 2], [3, -1]], &Device::Cpu).expect("ids");
        let e = m.forward(&ids, None).expect_err("negative id").to_string();
        assert_mentions(&e, &["input_ids", "token id -1", "[1, 1]"]);

        let far = 10 * v as u32 + 7;
        let e = m
            .step(&[4, far], &mut m.new_cache(2).expect("cache"))
            .expect_err("step")
            .to_string();
        assert_mentions(&e, &[format!("token id {far}")]);
    }
}

#[test]
fn empty_and_malformed_input() {
    for b in bases() {
        let m = model(&b);
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
        let beyond = b.vocab as i64 + 1;
        let labels = Tensor::new(&[[1i64, -100, beyond]], &Device::Cpu).expect("labels");
        assert_mentions(
            &causal_lm_loss(&logits, &labels)
                .expect_err("label")
                .to_string(),
            &[format!("label {beyond}"), "[0, 2]".to_string()],
        );
        let labels = Tensor::new(&[[1i64, -100, -100]], &Device::Cpu).expect("labels");
        assert_mentions(
            &causal_lm_loss(&logits, &labels)
                .expect_err("all ignored")
                .to_string(),
            &["ignored"],
        );
    }
}

#[test]
fn bad_generation_settings() {
    use trainer::generate::{GenerationConfig, generate};
    for b in bases() {
        let m = model(&b);
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
        let oov = b.vocab as u32;
        assert_mentions(
            &generate(&m, &[vec![1, oov]], &cfg)
                .expect_err("oov")
                .to_string(),
            &[format!("token id {oov}")],
        );
    }
}
