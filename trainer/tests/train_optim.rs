//! Schedules, AdamW and gradient clipping against hand-computed values.

use candle_core::{DType, Device, Tensor, Var};
use trainer::train::optim::{AdamW, ParamGroup, accumulate, clip_grad_norm};
use trainer::train::{Hyperparameters, LrScheduler, Schedule, TrainError};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn schedules_follow_transformers_with_one_based_warmup() {
    // 10 steps, 2 of warm-up, peak factor 1.
    let f = |k, s| Schedule::new(k, 2, 10).factor(s);
    for k in [
        LrScheduler::Constant,
        LrScheduler::Linear,
        LrScheduler::Cosine,
    ] {
        assert_eq!(f(k, 1), 0.5, "{k:?}: half way up at step 1");
        assert_eq!(f(k, 2), 1.0, "{k:?}: peak at the last warm-up step");
        assert_eq!(f(k, 3), 1.0, "{k:?}: first decay step at the peak");
    }
    for s in 1..=10 {
        assert_eq!(f(LrScheduler::Constant, s), if s < 2 { 0.5 } else { 1.0 });
    }
    // linear: 1 − (s − 1 − 2)/8
    let lin: Vec<f64> = (3..=10).map(|s| f(LrScheduler::Linear, s)).collect();
    assert_eq!(lin, vec![1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]);
    // cosine: ½(1 + cos(π p)), p = (s − 3)/8
    let want = [
        1.0,
        0.961_939_766_255_643_4,
        0.853_553_390_593_273_8,
        0.691_341_716_182_544_9,
        0.5,
        0.308_658_283_817_455_1,
        0.146_446_609_406_726_2,
        0.038_060_233_744_356_6,
    ];
    for (s, w) in (3..=10).zip(want) {
        let got = f(LrScheduler::Cosine, s);
        assert!(close(got, w, 1e-12), "cosine step {s}: {got} vs {w}");
    }
    // No warm-up: the first step is at the peak, the last one still moves.
    let s = Schedule::new(LrScheduler::Linear, 0, 4);
    assert_eq!(
        (1..=4).map(|i| s.factor(i)).collect::<Vec<_>>(),
        vec![1.0, 0.75, 0.5, 0.25]
    );
    // warmup_ratio rounds up: 10% of 25 steps = 3 steps.
    let h = Hyperparameters {
        warmup_ratio: 0.1,
        ..Default::default()
    };
    assert_eq!(h.warmup_for(25), 3);
}

fn var(v: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().to_vec1::<f32>().unwrap()
}

/// PyTorch `torch.optim.AdamW(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)`,
/// first step (t = 1), written out:
///   θ ← θ(1 − lr·wd);  m = 0.1·g;  v = 0.001·g²;  m̂ = m/0.1 = g;  v̂ = v/0.001 = g²
///   θ ← θ − lr·m̂/(√v̂ + ε) = θ(1 − lr·wd) − lr·g/(|g| + 1e-8)
/// With θ = [1, −2, 0.5], g = [0.5, −0.25, 0], lr = 0.1, wd = 0.01:
///   θ₀ = 1·0.999 − 0.1·0.5/(0.5 + 1e-8)        = 0.899 000 002
///   θ₁ = −2·0.999 − 0.1·(−0.25)/(0.25 + 1e-8) = −1.897 999 996
///   θ₂ = 0.5·0.999 − 0                         = 0.4995
/// Second step with g = [0.1, 0.1, 0.1] (t = 2):
///   m = 0.9·m₁ + 0.1·g, v = 0.999·v₁ + 0.001·g², step = lr/(1 − 0.9²),
///   θ ← θ(1 − lr·wd) − step·m/(√v/√(1 − 0.999²) + ε)
#[test]
fn adamw_matches_pytorch_by_hand() -> Result<(), TrainError> {
    let p = var(&[1.0, -2.0, 0.5]);
    let groups = vec![ParamGroup {
        name: "g".into(),
        params: vec![("p".into(), p.clone())],
        lr: None,
        weight_decay: 0.01,
        decay_toward: None,
    }];
    let mut opt = AdamW::new(groups, 0.1, 0.9, 0.999, 1e-8)?;
    let g1 = Tensor::new(&[0.5f32, -0.25, 0.0], &Device::Cpu)?;
    opt.step(&vec![vec![Some(g1)]], 1.0)?;
    let got = values(&p);
    let want = [0.899_000_002f64, -1.897_999_996, 0.4995];
    for (g, w) in got.iter().zip(want) {
        assert!(close(f64::from(*g), w, 1e-6), "step 1: {got:?} vs {want:?}");
    }

    // Step 2, the reference computed in f64 from the formula above.
    let g2 = [0.1f64, 0.1, 0.1];
    let g1 = [0.5f64, -0.25, 0.0];
    let mut want2 = [0f64; 3];
    for i in 0..3 {
        let m = 0.9 * (0.1 * g1[i]) + 0.1 * g2[i];
        let v = 0.999 * (0.001 * g1[i] * g1[i]) + 0.001 * g2[i] * g2[i];
        let step = 0.1 / (1.0 - 0.9f64.powi(2));
        let denom = v.sqrt() / (1.0 - 0.999f64.powi(2)).sqrt() + 1e-8;
        want2[i] = want[i] * (1.0 - 0.1 * 0.01) - step * m / denom;
    }
    let g2t = Tensor::new(&[0.1f32, 0.1, 0.1], &Device::Cpu)?;
    opt.step(&vec![vec![Some(g2t)]], 1.0)?;
    let got = values(&p);
    for (g, w) in got.iter().zip(want2) {
        assert!(
            close(f64::from(*g), w, 1e-6),
            "step 2: {got:?} vs {want2:?}"
        );
    }
    assert_eq!(opt.t, 2);
    Ok(())
}

#[test]
fn groups_have_their_own_lr_decay_target_and_schedule_scaling() -> Result<(), TrainError> {
    // Three groups, one gradient g = 1 each, first step: the Adam part is lr·g/(|g|+ε) ≈ lr.
    let a = var(&[1.0]);
    let b = var(&[1.0]);
    let c = var(&[3.0]);
    let target = Tensor::new(&[2.0f32], &Device::Cpu)?;
    let groups = vec![
        ParamGroup {
            name: "default_lr".into(),
            params: vec![("a".into(), a.clone())],
            lr: None,
            weight_decay: 0.0,
            decay_toward: None,
        },
        ParamGroup {
            name: "own_lr_decay".into(),
            params: vec![("b".into(), b.clone())],
            lr: Some(0.01),
            weight_decay: 0.5,
            decay_toward: None,
        },
        ParamGroup {
            name: "toward".into(),
            params: vec![("c".into(), c.clone())],
            lr: Some(0.1),
            weight_decay: 1.0,
            decay_toward: Some(vec![target]),
        },
    ];
    let mut opt = AdamW::new(groups, 0.2, 0.9, 0.999, 1e-8)?;
    let one = || Some(Tensor::new(&[1f32], &Device::Cpu).unwrap());
    // The schedule's factor 0.5 halves every group's lr.
    opt.step(&vec![vec![one()], vec![one()], vec![one()]], 0.5)?;
    let adam = |lr: f64| lr / (1.0 + 1e-8);
    // a: 1 − 0.1·1
    assert!(close(f64::from(values(&a)[0]), 1.0 - adam(0.1), 1e-7));
    // b: 1·(1 − 0.005·0.5) − 0.005
    assert!(close(
        f64::from(values(&b)[0]),
        (1.0 - 0.005 * 0.5) - adam(0.005),
        1e-7
    ));
    // c: decays toward 2, not 0: 3 − 0.05·1·(3 − 2) − 0.05
    assert!(close(
        f64::from(values(&c)[0]),
        3.0 - 0.05 * (3.0 - 2.0) - adam(0.05),
        1e-7
    ));
    // A parameter without a gradient is left alone (no decay either), as in PyTorch.
    opt.step(&vec![vec![None], vec![None], vec![None]], 1.0)?;
    assert!(close(f64::from(values(&a)[0]), 1.0 - adam(0.1), 1e-7));
    Ok(())
}

#[test]
fn moments_round_trip_through_state_tensors() -> Result<(), TrainError> {
    let mk = || -> Result<(Var, AdamW), TrainError> {
        let p = var(&[1.0, 2.0]);
        let opt = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                params: vec![("p".into(), p.clone())],
                lr: None,
                weight_decay: 0.1,
                decay_toward: None,
            }],
            0.05,
            0.9,
            0.999,
            1e-8,
        )?;
        Ok((p, opt))
    };
    let grads = |x: f32| vec![vec![Some(Tensor::new(&[x, -x], &Device::Cpu).unwrap())]];
    let (p1, mut o1) = mk()?;
    for s in 0..3 {
        o1.step(&grads(0.3 + s as f32), 1.0)?;
    }
    let (p2, mut o2) = mk()?;
    p2.set(p1.as_tensor())?;
    o2.load_state(&o1.state_tensors(), o1.t)
        .map_err(TrainError::Method)?;
    o1.step(&grads(1.7), 0.7)?;
    o2.step(&grads(1.7), 0.7)?;
    assert_eq!(
        values(&p1),
        values(&p2),
        "bit-identical after restoring the moments"
    );
    let mut missing = o1.state_tensors();
    missing.remove("v.g.p");
    let e = o2.load_state(&missing, 3).unwrap_err();
    assert!(e.contains("`v.g.p`"), "{e}");
    Ok(())
}

#[test]
fn clipping_is_global_across_groups() -> candle_core::Result<()> {
    let t = |v: &[f32]| Some(Tensor::new(v, &Device::Cpu).unwrap());
    // Norm of [3, 4] and [12] across two groups = 13.
    let mut g = vec![vec![t(&[3.0, 4.0])], vec![t(&[12.0]), None]];
    let norm = clip_grad_norm(&mut g, 1.0)?;
    assert!(close(norm, 13.0, 1e-6));
    // Scaled by max_norm/(norm + 1e-6), PyTorch's clip_coef.
    let coef = 1.0 / (13.0 + 1e-6);
    let a = g[0][0].as_ref().unwrap().to_vec1::<f32>()?;
    let b = g[1][0].as_ref().unwrap().to_vec1::<f32>()?;
    assert!(close(f64::from(a[0]), 3.0 * coef, 1e-7) && close(f64::from(a[1]), 4.0 * coef, 1e-7));
    assert!(close(f64::from(b[0]), 12.0 * coef, 1e-7));
    let after: f64 = [a[0], a[1], b[0]]
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(close(after, 1.0, 1e-6), "{after}");
    // Below the threshold, and with clipping off: untouched.
    let mut g = vec![vec![t(&[0.3, 0.4])]];
    assert!(close(clip_grad_norm(&mut g, 1.0)?, 0.5, 1e-7));
    assert_eq!(g[0][0].as_ref().unwrap().to_vec1::<f32>()?, vec![0.3, 0.4]);
    let mut g = vec![vec![t(&[30.0, 40.0])]];
    assert!(close(clip_grad_norm(&mut g, 0.0)?, 50.0, 1e-5));
    assert_eq!(
        g[0][0].as_ref().unwrap().to_vec1::<f32>()?,
        vec![30.0, 40.0]
    );
    Ok(())
}

#[test]
fn accumulation_adds_and_keeps_missing() -> candle_core::Result<()> {
    let t = |v: f32| Some(Tensor::new(&[v], &Device::Cpu).unwrap());
    let mut acc = Vec::new();
    accumulate(&mut acc, vec![vec![t(1.0), None]])?;
    accumulate(&mut acc, vec![vec![t(2.0), t(5.0)]])?;
    assert_eq!(acc[0][0].as_ref().unwrap().to_vec1::<f32>()?, vec![3.0]);
    assert_eq!(acc[0][1].as_ref().unwrap().to_vec1::<f32>()?, vec![5.0]);
    Ok(())
}

#[test]
fn hyperparameter_errors_name_the_field_and_range() {
    let check = |h: Hyperparameters, field: &str, range: &str| {
        let e = h.validate().unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{field}`")) && e.contains(range),
            "{e}"
        );
    };
    let d = Hyperparameters::default;
    check(
        Hyperparameters { n_epochs: 0, ..d() },
        "n_epochs",
        "1..=1000",
    );
    check(
        Hyperparameters {
            batch_size: 0,
            ..d()
        },
        "batch_size",
        "1..=4096",
    );
    check(
        Hyperparameters {
            learning_rate: -1.0,
            ..d()
        },
        "learning_rate",
        "(0, 10]",
    );
    check(
        Hyperparameters {
            learning_rate: f64::NAN,
            ..d()
        },
        "learning_rate",
        "(0, 10]",
    );
    check(
        Hyperparameters {
            max_seq_length: 1,
            ..d()
        },
        "max_seq_length",
        "2..=",
    );
    check(
        Hyperparameters {
            gradient_accumulation_steps: 0,
            ..d()
        },
        "gradient_accumulation_steps",
        "1..=65536",
    );
    check(
        Hyperparameters {
            weight_decay: Some(-0.1),
            ..d()
        },
        "weight_decay",
        "[0, 10]",
    );
    check(
        Hyperparameters {
            max_grad_norm: -1.0,
            ..d()
        },
        "max_grad_norm",
        ">= 0",
    );
    check(
        Hyperparameters {
            warmup_steps: 5,
            warmup_ratio: 0.1,
            ..d()
        },
        "warmup_ratio",
        "set one of them",
    );
    assert!(d().validate().is_ok());
    // Serde: absent fields take defaults, unknown ones (the API's extras) are ignored,
    // and the aliases are accepted.
    let h: Hyperparameters = serde_json::from_value(serde_json::json!({
        "epochs": 2, "max_seq_len": 64, "lr_scheduler": "cosine", "learning_rate_multiplier": 3.0
    }))
    .unwrap();
    assert_eq!(
        (h.n_epochs, h.max_seq_length, h.lr_scheduler, h.batch_size),
        (2, 64, LrScheduler::Cosine, 4)
    );
    let bad =
        serde_json::from_value::<Hyperparameters>(serde_json::json!({"lr_scheduler": "step"}));
    assert!(bad.is_err());
    let _ = DType::F32;
}
