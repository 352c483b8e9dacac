//! Fine-tuning a Vision Mamba through the training loop: a learnable synthetic task (which
//! quadrant of the image holds a bright square) on each Vim checkpoint of the fixtures, with
//! LoRA, ProDiaL and Additional-scan; validation accuracy must end well above chance. Image
//! size, channels and class count come from the checkpoint's config. A streamed tar.gz run
//! stopped at a checkpoint and resumed ends bit-identical to an uninterrupted one.

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

/// An ImageFolder tar.gz of quadrant PNGs (`n` per class) of the model's size, with `val/`.
fn quadrant_archive(path: &std::path::Path, size: [usize; 2], classes: usize, n: usize) {
    let mut b = tar::Builder::new(Vec::new());
    let mut seed = 0u64;
    for split in ["train", "val"] {
        for k in 0..classes {
            for i in 0..n {
                seed += 1;
                let (qy, qx) = ((k / 2) as u32, (k % 2) as u32);
                let (h, w) = (size[0] as u32, size[1] as u32);
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let inside = y / (h / 2).max(1) == qy && x / (w / 2).max(1) == qx;
                    let noise = ((x * 31 + y * 17 + seed as u32 * 7) % 50) as u8;
                    let v = if inside { 180 + noise } else { 20 + noise };
                    image::Rgb([v, v, v])
                });
                let mut png = std::io::Cursor::new(Vec::new());
                img.write_to(&mut png, image::ImageFormat::Png)
                    .expect("png");
                let png = png.into_inner();
                let mut hd = tar::Header::new_gnu();
                hd.set_size(png.len() as u64);
                hd.set_mode(0o644);
                hd.set_cksum();
                b.append_data(&mut hd, format!("{split}/c{k}/{i:03}.png"), png.as_slice())
                    .expect("append");
            }
        }
    }
    let tar = b.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    std::fs::write(path, gz.finish().expect("gzip")).expect("write");
}

/// `molt train`'s path on a streamed archive: a run stopped at a checkpoint and resumed (as a
/// worker's successor does) ends bit-identical to an uninterrupted one, step losses and
/// adapter alike; validation runs every epoch on the archive's `val/` split.
#[test]
fn streamed_archive_training_resumes_bit_identical() {
    use trainer::train::{TrainOutcome, TrainRequest, run};
    for case in common::indexed_cases(trainer::model::Family::Vim, "vim_model") {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_dir = case.path("model_dir");
        let base = VimCheckpoint::load(&model_dir, &VimLoadOptions::default())
            .and_then(|c| c.into_frozen())
            .expect("base");
        let classes = base.config.num_classes.min(4);
        let data = dir.path().join("data.tgz");
        quadrant_archive(&data, base.config.img_size, classes, 6);
        let hyper = Hyperparameters {
            n_epochs: 2,
            batch_size: 4,
            learning_rate: 1e-2,
            checkpoint_every: 3,
            ..Hyperparameters::vision_recipe()
        };
        let request = |sub: &str| TrainRequest {
            model_dir: model_dir.clone(),
            train_file: data.clone(),
            validation_file: None,
            method: AdapterSpec::from_value(&json!({"type": "lora", "targets": "in_proj", "r": 2}))
                .expect("spec"),
            hyper: hyper.clone(),
            seed: 9,
            out_dir: dir.path().join(sub).join("out"),
            checkpoint_dir: dir.path().join(sub).join("checkpoint"),
            resume: false,
            device: Device::Cpu,
        };
        let steps = |events: &[TrainEvent]| -> Vec<f64> {
            events
                .iter()
                .filter_map(|e| match e {
                    TrainEvent::Step { loss, .. } => Some(*loss),
                    _ => None,
                })
                .collect()
        };
        let mut whole = Vec::new();
        let out = run(&request("whole"), &mut |ev: &TrainEvent| {
            whole.push(ev.clone());
            Control::Continue
        })
        .unwrap_or_else(|e| panic!("{}: {e}", case.label));
        assert!(matches!(out, TrainOutcome::Finished { .. }), "{out:?}");
        let validations = whole
            .iter()
            .filter(|e| matches!(e, TrainEvent::Validation { .. }))
            .count();
        assert_eq!(validations, 2, "{}: one validation per epoch", case.label);

        let req = request("parts");
        let mut first = Vec::new();
        let out = run(&req, &mut |ev: &TrainEvent| {
            first.push(ev.clone());
            match ev {
                TrainEvent::Checkpoint { step: 3, .. } => Control::Stop,
                _ => Control::Continue,
            }
        })
        .expect("first part");
        assert!(
            matches!(out, TrainOutcome::Stopped { step: 3, .. }),
            "{out:?}"
        );
        let mut again = req.clone();
        again.resume = true;
        let mut second = Vec::new();
        run(&again, &mut |ev: &TrainEvent| {
            second.push(ev.clone());
            Control::Continue
        })
        .expect("resumed");
        let mut losses = steps(&first);
        losses.extend(steps(&second));
        assert_eq!(
            losses,
            steps(&whole),
            "{}: the same loss at every step",
            case.label
        );
        let bits = |p: std::path::PathBuf| -> Vec<(String, Vec<u32>)> {
            let t =
                candle_core::safetensors::load(p.join("adapter_model.safetensors"), &Device::Cpu)
                    .expect("adapter");
            let mut v: Vec<(String, Vec<u32>)> = t
                .into_iter()
                .map(|(k, t)| {
                    let b = t
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("f32")
                        .into_iter()
                        .map(f32::to_bits)
                        .collect();
                    (k, b)
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            bits(again.out_dir.clone()),
            bits(request("whole").out_dir),
            "{}: the resumed adapter is bit-identical",
            case.label
        );
        // The adapter names its classes.
        let names: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(again.out_dir.join("classes.json")).expect("classes.json"),
        )
        .expect("names");
        assert_eq!(
            names,
            (0..classes).map(|k| format!("c{k}")).collect::<Vec<_>>()
        );
    }
}
