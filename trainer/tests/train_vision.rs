//! Fine-tuning a Vision Mamba through the training loop: a learnable synthetic task (which
//! quadrant of the image holds a bright square) on each Vim checkpoint of the fixtures, with
//! LoRA, ProDiaL and Additional-scan; validation accuracy must end well above chance. Image
//! size, channels and class count come from the checkpoint's config.

mod common;

use candle_core::{Device, Tensor};
use serde_json::json;
use trainer::model::vim::{VimCheckpoint, VimForImageClassification, VimLoadOptions};
use trainer::peft::AdapterSpec;
use trainer::train::engine::{self, LoopConfig, TrainSet};
use trainer::train::images::ImageSet;
use trainer::train::{AdapterTrainable, Control, Hyperparameters, TrainEvent};

/// `n` images of the model's size: class k has a bright square in quadrant k (row-major) on
/// a noisy background, already normalised. Deterministic in `seed`.
fn quadrant_images(
    model: &VimForImageClassification,
    n: usize,
    classes: usize,
    seed: u64,
) -> ImageSet {
    let [h, w] = model.config.img_size;
    let c = model.config.channels;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut noise = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let mut pixels = Vec::with_capacity(n * c * h * w);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let k = i % classes;
        let (qy, qx) = (k / 2, k % 2);
        for _ in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let inside = y / (h / 2).max(1) == qy && x / (w / 2).max(1) == qx;
                    pixels.push(if inside { 2.0 } else { -1.0 } + 0.5 * noise());
                }
            }
        }
        labels.push(k as u32);
    }
    let pixels = Tensor::from_vec(pixels, (n, c, h, w), &Device::Cpu).expect("pixels");
    ImageSet::new(pixels, labels, model.config.num_classes).expect("image set")
}

#[test]
fn vim_learns_a_synthetic_image_task_with_lora_prodial_and_additional_scan() {
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let base = VimCheckpoint::load(&case.path("model_dir"), &VimLoadOptions::default())
            .and_then(|c| c.into_frozen())
            .unwrap_or_else(|e| panic!("{}: {e}", case.label));
        let classes = base.config.num_classes.min(4);
        assert!(classes >= 2, "{}: needs at least two classes", case.label);
        let train = quadrant_images(&base, 16 * classes, classes, 1);
        let val = quadrant_images(&base, 6 * classes, classes, 2);
        let (d, e) = (base.config.embed_dim, base.config.d_inner());
        let blocks = |w: usize| w / (2..=w).find(|q| w.is_multiple_of(*q)).unwrap_or(1);
        for method in [
            json!({"type": "lora", "targets": ["in_proj", "x_proj"], "r": 4, "s": 1.0}),
            json!({"type": "prodial", "targets": ["in_proj", "out_proj"],
                   "r_b": {"in_proj": blocks(d), "out_proj": blocks(e)}, "r_eps": 4}),
            // The fixture checkpoints have small steps (dt ≈ 0.01): new states need a larger rate.
            json!({"type": "additional_scan", "n_add": 4, "lr": 0.1}),
        ] {
            let label = format!("{}: {}", case.label, method["type"]);
            let spec = AdapterSpec::from_value(&method).expect("spec");
            let trainable = AdapterTrainable::new(&spec, &base, 3, None)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let hyper = Hyperparameters {
                n_epochs: 6,
                batch_size: 8,
                learning_rate: 1e-2,
                warmup_steps: 0,
                ..Hyperparameters::default()
            };
            hyper.validate().expect("hyperparameters");
            let out = tempfile::tempdir().expect("tempdir");
            let mut kinds = Vec::new();
            let mut observe = |ev: &TrainEvent| {
                if let TrainEvent::Started { dataset_kind, .. } = ev {
                    kinds.push(*dataset_kind);
                }
                Control::Continue
            };
            let end = engine::train(
                &trainable,
                LoopConfig {
                    hyper: &hyper,
                    seed: 5,
                    train: TrainSet::Images(&train),
                    validation: Some(TrainSet::Images(&val)),
                    device: Device::Cpu,
                    checkpoint_dir: None,
                    out_dir: out.path(),
                    fingerprint: Default::default(),
                    resume: None,
                },
                &mut observe,
            )
            .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(kinds, vec![trainer::train::DatasetKind::Images], "{label}");
            let v = end.validation.expect("validation");
            let (loss, acc) = (v.loss, v.accuracy.expect("accuracy"));
            let chance = 1.0 / classes as f64;
            eprintln!("{label}: validation loss {loss:.3}, accuracy {acc:.2} (chance {chance:.2})");
            assert!(
                acc >= (chance + 0.4).min(0.9),
                "{label}: accuracy {acc} is not well above chance {chance}"
            );
            assert!(
                out.path().join(trainer::peft::CONFIG_FILE).is_file(),
                "{label}: no adapter saved"
            );
        }
    }
}
