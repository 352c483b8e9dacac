//! The training loop end to end on the tiny fixture model (tests/fixtures/tiny/model: 2
//! layers, hidden 64, vocab 512): it learns, two runs with one seed are bit-identical, a run
//! stopped and resumed ends where an uninterrupted one does, and the events are coherent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;
use trainer::peft::AdapterSpec;
use trainer::train::{
    Control, Hyperparameters, LrScheduler, TrainError, TrainEvent, TrainOutcome, TrainRequest, run,
};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/model")
}

/// A small memorisation task: 16 prompt → one-word completions.
fn task(dir: &Path) -> PathBuf {
    let colours = [
        ("grass", "green"),
        ("sky", "blue"),
        ("snow", "white"),
        ("coal", "black"),
        ("blood", "red"),
        ("sun", "yellow"),
        ("sea", "blue"),
        ("night", "black"),
        ("milk", "white"),
        ("leaf", "green"),
        ("rose", "red"),
        ("lemon", "yellow"),
        ("cloud", "white"),
        ("ink", "black"),
        ("lime", "green"),
        ("fire", "red"),
    ];
    let body: String = colours
        .iter()
        .map(|(thing, c)| {
            format!("{}\n", json!({"prompt": format!("The colour of {thing} is"), "completion": format!(" {c}")}))
        })
        .collect();
    let p = dir.join("train.jsonl");
    std::fs::write(&p, body).unwrap();
    p
}

fn request(dir: &Path, train: PathBuf, hyper: Hyperparameters, seed: u64) -> TrainRequest {
    TrainRequest {
        model_dir: tiny_model(),
        train_file: train,
        validation_file: None,
        method: AdapterSpec::from_value(&json!({"type": "full"})).unwrap(),
        hyper,
        seed,
        out_dir: dir.join("out"),
        checkpoint_dir: dir.join("checkpoint"),
        resume: false,
        device: Device::Cpu,
    }
}

fn hyper() -> Hyperparameters {
    Hyperparameters {
        n_epochs: 3,
        batch_size: 4,
        learning_rate: 2e-3,
        lr_scheduler: LrScheduler::Linear,
        warmup_steps: 2,
        max_seq_length: 32,
        ..Default::default()
    }
}

/// Every tensor of the saved output, as raw bits.
fn saved(dir: &Path) -> BTreeMap<String, Vec<u32>> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    t.into_iter()
        .map(|(k, v)| {
            let bits = v
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect();
            (k, bits)
        })
        .collect()
}

fn collect(req: &TrainRequest) -> Result<(TrainOutcome, Vec<TrainEvent>), TrainError> {
    let mut events = Vec::new();
    let out = run(req, &mut |ev: &TrainEvent| {
        events.push(ev.clone());
        Control::Continue
    })?;
    Ok((out, events))
}

fn step_losses(events: &[TrainEvent]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

#[test]
fn full_fine_tune_learns_and_reports_progress() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let mut req = request(dir.path(), train.clone(), hyper(), 7);
    req.hyper.n_epochs = 6;
    req.validation_file = Some(train);
    let (out, events) = collect(&req)?;
    let losses = step_losses(&events);
    // 16 examples / batch 4 = 4 steps per epoch, 6 epochs.
    assert_eq!(losses.len(), 24);
    let TrainOutcome::Finished {
        steps,
        validation_loss: Some(after),
        ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(steps, 24);
    let before = losses[0];
    eprintln!("full FT: loss {before:.4} → {after:.4}; steps {losses:?}");
    assert!(after < 0.5 * before, "loss {before} → {after}");

    // Events: Started first, Finished last, steps counted 1..=24 with a sane lr and ETA.
    assert!(matches!(
        events[0],
        TrainEvent::Started {
            total_steps: 24,
            start_step: 0,
            ..
        }
    ));
    assert!(matches!(
        events.last(),
        Some(TrainEvent::Finished { step: 24, .. })
    ));
    let mut n = 0;
    for e in &events {
        if let TrainEvent::Step {
            step,
            total_steps,
            lr,
            tokens_per_second,
            eta_seconds,
            tokens_seen,
            ..
        } = e
        {
            n += 1;
            assert_eq!((*step, *total_steps), (n, 24));
            assert!(*lr > 0.0 && *lr <= 2e-3);
            assert!(*tokens_per_second > 0.0 && *tokens_seen > 0);
            assert!(*eta_seconds >= 0.0);
        }
    }
    // warm-up 2: 1e-3 at step 1, 2e-3 at step 2.
    let lrs: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { lr, .. } => Some(*lr),
            _ => None,
        })
        .collect();
    assert!((lrs[0] - 1e-3).abs() < 1e-12 && (lrs[1] - 2e-3).abs() < 1e-12);
    Ok(())
}

#[test]
fn one_seed_gives_bit_identical_runs_and_another_seed_does_not() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let mut h = hyper();
    h.n_epochs = 1;
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let c = dir.path().join("c");
    for (d, seed) in [(&a, 11), (&b, 11), (&c, 12)] {
        std::fs::create_dir_all(d).unwrap();
        collect(&request(d, train.clone(), h.clone(), seed))?;
    }
    assert_eq!(saved(&a.join("out")), saved(&b.join("out")));
    assert_ne!(saved(&a.join("out")), saved(&c.join("out")));
    Ok(())
}

#[test]
fn stopped_and_resumed_run_ends_bit_identical() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let mut h = hyper();
    // 4 steps per epoch with accumulation 2 of batch 2, 2 epochs: the stop at step 3 falls
    // inside an epoch, after a warm-up, under a decaying schedule.
    h.batch_size = 2;
    h.gradient_accumulation_steps = 2;
    h.n_epochs = 2;
    h.weight_decay = Some(0.1);
    h.checkpoint_every = 3;
    let whole = dir.path().join("whole");
    std::fs::create_dir_all(&whole).unwrap();
    let (_, events) = collect(&request(&whole, train.clone(), h.clone(), 5))?;
    let whole_losses = step_losses(&events);

    let parts = dir.path().join("parts");
    std::fs::create_dir_all(&parts).unwrap();
    let req = request(&parts, train.clone(), h.clone(), 5);
    let mut first = Vec::new();
    let out = run(&req, &mut |ev: &TrainEvent| {
        first.push(ev.clone());
        match ev {
            TrainEvent::Checkpoint { step: 3, .. } => Control::Stop,
            _ => Control::Continue,
        }
    })?;
    assert!(
        matches!(out, TrainOutcome::Stopped { step: 3, .. }),
        "{out:?}"
    );
    assert!(
        !parts.join("out").exists(),
        "a stopped run writes no adapter"
    );
    assert!(req.checkpoint_dir.join("trainer_state.json").is_file());

    let mut again = req.clone();
    again.resume = true;
    let (out, second) = collect(&again)?;
    assert!(matches!(out, TrainOutcome::Finished { steps: 8, .. }));
    assert!(matches!(
        second[0],
        TrainEvent::Started { start_step: 3, .. }
    ));
    let mut losses = step_losses(&first);
    losses.extend(step_losses(&second));
    assert_eq!(losses, whole_losses, "the same loss at every step");
    assert_eq!(saved(&parts.join("out")), saved(&whole.join("out")));

    // A checkpoint refuses to resume a different run.
    let mut other = again.clone();
    other.seed = 6;
    let e = run(&other, &mut |_: &TrainEvent| Control::Continue).unwrap_err();
    assert!(e.to_string().contains("different seed"), "{e}");
    let mut other = again.clone();
    other.hyper.learning_rate = 1e-2;
    let e = run(&other, &mut |_: &TrainEvent| Control::Continue).unwrap_err();
    assert!(e.to_string().contains("different hyperparameters"), "{e}");
    let mut fresh = again.clone();
    fresh.checkpoint_dir = dir.path().join("nothing-here");
    let e = run(&fresh, &mut |_: &TrainEvent| Control::Continue).unwrap_err();
    assert!(e.to_string().contains("no trainer_state.json"), "{e}");
    Ok(())
}

#[test]
fn accumulation_matches_one_big_batch() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let mut h = hyper();
    h.n_epochs = 1;
    h.batch_size = 8;
    let big = dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let (_, eb) = collect(&request(&big, train.clone(), h.clone(), 3))?;
    h.batch_size = 2;
    h.gradient_accumulation_steps = 4;
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let (_, es) = collect(&request(&small, train, h, 3))?;
    let (lb, ls) = (step_losses(&eb), step_losses(&es));
    assert_eq!(lb.len(), 2);
    assert_eq!(ls.len(), 2);
    for (a, b) in lb.iter().zip(&ls) {
        assert!((a - b).abs() < 1e-5, "{lb:?} vs {ls:?}");
    }
    // Same examples per step (same seed, same order), so nearly the same weights.
    let (wb, ws) = (saved(&big.join("out")), saved(&small.join("out")));
    let mut max = 0f32;
    for (k, a) in &wb {
        for (x, y) in a.iter().zip(&ws[k]) {
            max = max.max((f32::from_bits(*x) - f32::from_bits(*y)).abs());
        }
    }
    assert!(max < 1e-4, "max weight difference {max}");
    Ok(())
}

#[test]
fn multiple_choice_validation_reports_accuracy() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        ("The colour of grass is", 1),
        ("The colour of the sky is", 2),
        ("The colour of blood is", 0),
        ("The colour of leaves is", 1),
        ("The colour of the sea is", 2),
        ("The colour of a rose is", 0),
    ];
    let body: String = rows
        .iter()
        .map(|(ctx, l)| {
            format!(
                "{}\n",
                json!({"context": ctx, "choices": [" red", " green", " blue"], "label": l})
            )
        })
        .collect();
    let f = dir.path().join("mc.jsonl");
    std::fs::write(&f, body).unwrap();
    let mut h = hyper();
    h.n_epochs = 8;
    h.batch_size = 3;
    h.learning_rate = 3e-3;
    h.eval_every = 4;
    let mut req = request(dir.path(), f.clone(), h, 1);
    req.validation_file = Some(f);
    let (out, events) = collect(&req)?;
    let accs: Vec<(u64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Validation {
                step,
                accuracy: Some(a),
                ..
            } => Some((*step, *a)),
            _ => None,
        })
        .collect();
    // Every 4 steps (4, 8, 12) and once at the end (16).
    assert_eq!(
        accs.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![4, 8, 12, 16]
    );
    eprintln!("multiple choice accuracy by step: {accs:?}");
    let TrainOutcome::Finished {
        validation_accuracy: Some(acc),
        ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(acc, 1.0, "memorises six examples");
    Ok(())
}

#[test]
fn bad_requests_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let mut req = request(dir.path(), train, hyper(), 1);
    req.hyper.batch_size = 0;
    let e = run(&req, &mut |_: &TrainEvent| Control::Continue).unwrap_err();
    assert!(e.is_user_error());
    assert!(e.to_string().contains("`batch_size`"), "{e}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": 1}\n",
    )
    .unwrap();
    let mut req = request(dir.path(), bad.clone(), hyper(), 1);
    let mut events = 0;
    let e = run(&req, &mut |_: &TrainEvent| {
        events += 1;
        Control::Continue
    })
    .unwrap_err();
    assert_eq!(events, 0, "nothing trains on garbage");
    assert!(matches!(e, TrainError::Dataset { .. }));
    assert!(
        e.to_string().starts_with(&format!("{}:2: ", bad.display())),
        "{e}"
    );

    // A validation file of another format than the training file.
    req.train_file = task(dir.path());
    let v = dir.path().join("v.jsonl");
    std::fs::write(&v, "{\"text\": \"hello there\"}\n").unwrap();
    req.validation_file = Some(v);
    let e = run(&req, &mut |_: &TrainEvent| Control::Continue).unwrap_err();
    assert!(
        e.to_string().contains("v.jsonl:1: this is a text example"),
        "{e}"
    );
}

#[test]
fn cancel_stops_between_steps() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let req = request(dir.path(), train, hyper(), 1);
    let mut steps = 0;
    let out = run(&req, &mut |ev: &TrainEvent| {
        if let TrainEvent::Step { .. } = ev {
            steps += 1;
            if steps == 2 {
                return Control::Stop;
            }
        }
        Control::Continue
    })?;
    assert!(
        matches!(out, TrainOutcome::Stopped { step: 2, .. }),
        "{out:?}"
    );
    assert_eq!(steps, 2);
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
    Ok(())
}

/// With dropout on (LoRA's activation path), the masks come from a seed and a counter that the
/// checkpoint keeps: a resumed run still ends bit-identical, and a second run with the same
/// seed too.
#[test]
fn resume_is_exact_with_dropout() -> Result<(), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let train = task(dir.path());
    let mut h = hyper();
    h.n_epochs = 2;
    h.checkpoint_every = 5;
    let spec = AdapterSpec::from_value(
        &json!({"type": "lora", "targets": "in_proj", "r": 4, "s": 1.0, "dropout": 0.3}),
    )
    .unwrap();
    let mk = |d: &Path| {
        std::fs::create_dir_all(d).unwrap();
        let mut r = request(d, train.clone(), h.clone(), 9);
        r.method = spec.clone();
        r
    };
    let whole = dir.path().join("whole");
    collect(&mk(&whole))?;
    let again = dir.path().join("again");
    collect(&mk(&again))?;
    assert_eq!(saved(&whole.join("out")), saved(&again.join("out")));

    let parts = dir.path().join("parts");
    let req = mk(&parts);
    let out = run(&req, &mut |ev: &TrainEvent| match ev {
        TrainEvent::Checkpoint { step: 5, .. } => Control::Stop,
        _ => Control::Continue,
    })?;
    assert!(matches!(out, TrainOutcome::Stopped { step: 5, .. }));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(req.checkpoint_dir.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["rng_counter"].as_u64().unwrap() > 0, "{state}");
    let mut resumed = req.clone();
    resumed.resume = true;
    collect(&resumed)?;
    assert_eq!(saved(&parts.join("out")), saved(&whole.join("out")));
    Ok(())
}
