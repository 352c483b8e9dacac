//! MambaPEFT's hybrid search plan (`trainer::search::hybrid`) on every family's fixture
//! shapes: the default candidate set per family, step 1's booleans, Algorithm 1's first
//! step-2 trial (step 1's best with its defaults), `max_parallel`, skipped trials, the
//! errors naming the request field, and a whole two-step search on a synthetic objective
//! that is deterministic for a seed and finds a better configuration in step 2.

mod common;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use trainer::model::Family;
use trainer::peft::ModelShape;
use trainer::search::hybrid::{Next, Plan, SearchSettings, TrialRecord};
use trainer::search::{Direction, TrialState};

/// The shape of the first base model of `family` in the fixture indexes.
fn shape(family: Family) -> ModelShape {
    let kind = if family == Family::Vim {
        "vim_model"
    } else {
        "base"
    };
    let case = common::indexed_cases(family, kind)
        .into_iter()
        .next()
        .expect("a case");
    let dir = case.path("model_dir");
    let cfg = common::read_json(&dir.join("config.json"));
    ModelShape::from_config(&cfg, &dir.join("config.json")).expect("shape")
}

fn settings(v: Value) -> SearchSettings {
    serde_json::from_value(v).expect("settings")
}

fn plan(family: Family, v: Value) -> Plan {
    Plan::new(settings(v), Direction::Minimize, shape(family), 1e-3).expect("plan")
}

fn names(p: &Plan) -> Vec<String> {
    p.candidates().iter().map(|c| c.name.clone()).collect()
}

#[test]
fn default_candidates_follow_the_family() {
    let lm = names(&plan(Family::Mamba, json!({})));
    let vim = names(&plan(Family::Vim, json!({})));
    let m2 = names(&plan(Family::Mamba2, json!({})));
    for n in [
        "lora_in_proj",
        "lora_x_proj",
        "affix",
        "additional_scan",
        "A",
        "prompt",
    ] {
        assert!(lm.contains(&n.to_string()), "Mamba-1 lacks {n}: {lm:?}");
        assert!(vim.contains(&n.to_string()), "Vim lacks {n}: {vim:?}");
    }
    for n in ["cls_token", "pos_embed"] {
        assert!(vim.contains(&n.to_string()), "{vim:?}");
        assert!(!lm.contains(&n.to_string()), "{lm:?}");
        assert!(!m2.contains(&n.to_string()), "{m2:?}");
    }
    // Mamba-2 has no x_proj / dt_proj and no selective scan (spec §8); its gated norm is a
    // partial-tuning candidate.
    for n in ["lora_x_proj", "lora_dt_proj", "affix", "additional_scan"] {
        assert!(!m2.contains(&n.to_string()), "{m2:?}");
    }
    for n in ["norm", "lora_p_B", "lora_in_proj", "A"] {
        assert!(m2.contains(&n.to_string()), "{m2:?}");
    }
    // ParallelAdapter is in the paper's table but not the authors' space: on request only.
    assert!(!vim.contains(&"parallel_adapter".to_string()));
    let on_request = plan(
        Family::Vim,
        json!({"methods": ["parallel_adapter", "lora_in_proj"]}),
    );
    assert_eq!(names(&on_request), ["parallel_adapter", "lora_in_proj"]);
}

fn record(p: &Plan, trials: &mut Vec<TrialRecord>) -> Option<Next> {
    let next = p.next(trials);
    match &next {
        Next::Run(x) => trials.push(TrialRecord {
            number: x.number,
            step: x.step,
            params: x.params.clone(),
            state: TrialState::Running,
        }),
        Next::Skip(x, _) => trials.push(TrialRecord {
            number: x.number,
            step: x.step,
            params: x.params.clone(),
            state: TrialState::Pruned(None),
        }),
        _ => return Some(next),
    }
    None
}

/// A synthetic objective over the configuration: some methods help, some hurt, and step 2's
/// rank and scale have an optimum away from step 1's defaults.
fn objective(configuration: &Value) -> f64 {
    let good = [("lora_in_proj", -1.0), ("A", -0.5), ("lora_p_X", -0.7)];
    let on: Vec<&str> = configuration["methods"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut v = 3.0;
    for m in &on {
        v += good.iter().find(|(g, _)| g == m).map_or(0.3, |(_, w)| *w);
    }
    if let Some(r) = configuration["lora_in_proj"]["r"].as_f64()
        && on.contains(&"lora_in_proj")
    {
        v += ((r - 16.0) / 8.0).powi(2) - 1.0;
    }
    if let Some(s) = configuration["lora_in_proj"]["s"].as_f64()
        && on.contains(&"lora_in_proj")
    {
        v += (s.ln() - 0.5f64.ln()).powi(2) / 4.0 - (0.1f64.ln() - 0.5f64.ln()).powi(2) / 4.0;
    }
    v
}

/// Runs a whole search: asks until the plan waits, then finishes the oldest running trial.
fn run(p: &Plan) -> (Vec<TrialRecord>, Vec<Value>, usize) {
    let mut trials = Vec::new();
    let mut configs: BTreeMap<u64, Value> = BTreeMap::new();
    let mut most_running = 0;
    let mut guard = 0;
    loop {
        guard += 1;
        assert!(guard < 10_000, "the search does not end");
        let before = trials.len();
        match record(p, &mut trials) {
            None => {
                let last = trials.last().expect("recorded");
                let next = p.next(&trials[..before]);
                let cfg = match next {
                    Next::Run(x) | Next::Skip(x, _) => x.configuration,
                    other => panic!("{other:?}"),
                };
                configs.insert(last.number, cfg);
                let running = trials
                    .iter()
                    .filter(|t| t.state == TrialState::Running)
                    .count();
                most_running = most_running.max(running);
            }
            Some(Next::Wait) => {
                let t = trials
                    .iter_mut()
                    .find(|t| t.state == TrialState::Running)
                    .expect("waiting on a running trial");
                t.state = TrialState::Complete(objective(&configs[&t.number]));
            }
            Some(Next::Finished) => break,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    (trials, configs.into_values().collect(), most_running)
}

#[test]
fn a_two_step_search_runs_to_the_end_deterministically() {
    let s = json!({"methods": ["lora_in_proj", "A", "lora_p_X", "prompt", "D", "lora_out_proj"],
                   "trials": {"step1": 24, "step2": 16}, "max_parallel": 3, "seed": 7});
    let p = plan(Family::Mamba, s.clone());
    let (trials, configs, most_running) = run(&p);
    assert_eq!(trials.len(), 40);
    assert_eq!(most_running, 3, "max_parallel trials run at once");
    let numbers: Vec<u64> = trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    assert!(trials[..24].iter().all(|t| t.step == 1));
    assert!(trials[24..].iter().all(|t| t.step == 2));
    // Step 1 tried distinct combinations, not one point.
    let distinct: std::collections::BTreeSet<String> = configs[..24]
        .iter()
        .map(|c| c["methods"].to_string())
        .collect();
    assert!(distinct.len() > 8, "{distinct:?}");

    // Algorithm 1: step 2 starts from step 1's best combination with its defaults.
    let chosen = p.chosen(&trials).expect("step 1 finished");
    let first2 = &configs[24];
    assert_eq!(first2["remove"], "none");
    assert_eq!(first2["methods"], json!(chosen));
    if chosen.contains(&"lora_in_proj".to_string()) {
        assert_eq!(first2["lora_in_proj"]["r"], json!(8));
        assert_eq!(first2["lora_in_proj"]["s"], json!(0.1));
        assert_eq!(first2["lora_in_proj"]["lr_mult"], json!(1.0));
        assert_eq!(first2["lora_in_proj"]["wd_mult"], json!(1.0));
    }
    let best1 = trials[..24]
        .iter()
        .filter_map(|t| match t.state {
            TrialState::Complete(v) => Some(v),
            _ => None,
        })
        .fold(f64::INFINITY, f64::min);
    let TrialState::Complete(v24) = trials[24].state else {
        panic!("{:?}", trials[24].state)
    };
    assert!(
        (v24 - best1).abs() < 1e-12,
        "the first step-2 trial repeats the best"
    );
    let (best, value) = p.best(&trials).expect("a best trial");
    assert!(value <= best1);
    assert!(
        value < best1 - 0.1,
        "step 2 improved on step 1: {value} vs {best1}"
    );
    assert_eq!(best.step, 2);

    // Same seed and completion order: the same trials.
    let (again, configs_again, _) = run(&plan(Family::Mamba, s));
    assert_eq!(again, trials);
    assert_eq!(configs_again, configs);
}

#[test]
fn step_two_proposals_are_valid_methods_with_sampled_values() {
    let p = plan(
        Family::Vim,
        json!({"methods": ["lora_in_proj", "cls_token", "lora_x_proj"],
               "trials": {"step1": 1, "step2": 12}, "max_parallel": 1, "seed": 3}),
    );
    let mut trials = vec![TrialRecord {
        number: 0,
        step: 1,
        params: [
            ("lora_in_proj", 1.0),
            ("cls_token", 1.0),
            ("lora_x_proj", 1.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        state: TrialState::Complete(1.0),
    }];
    let mut removed = std::collections::BTreeSet::new();
    for n in 1..13u64 {
        let Next::Run(x) = p.next(&trials) else {
            panic!("expected a trial")
        };
        assert_eq!((x.number, x.step), (n, 2));
        let spec = x.spec.as_ref().expect("a method").to_value();
        let methods = spec["methods"]
            .as_array()
            .cloned()
            .unwrap_or(vec![spec.clone()]);
        let remove = x.configuration["remove"]
            .as_str()
            .expect("remove")
            .to_string();
        assert_eq!(methods.len(), if remove == "none" { 3 } else { 2 });
        removed.insert(remove);
        for m in &methods {
            let lr = m["lr"].as_f64().expect("step 2 sets every lr");
            if m["targets"] == json!(["x_proj"]) {
                assert!((1e-5..=5e-4 + 1e-12).contains(&lr), "x_proj lr ×0.1: {lr}");
            } else {
                assert!((1e-4..=5e-3 + 1e-12).contains(&lr), "{lr}");
            }
            if let Some(r) = m["r"].as_u64() {
                assert!(r % 4 == 0 && (4..=16).contains(&r), "{r}");
            }
        }
        assert!(x.trainable_params > 0);
        trials.push(TrialRecord {
            number: n,
            step: 2,
            params: x.params,
            state: TrialState::Complete(n as f64),
        });
    }
    assert!(removed.len() > 1, "remove varies: {removed:?}");
    assert_eq!(p.next(&trials), Next::Finished);
}

#[test]
fn skipped_and_failed_trials() {
    let shape_lm = shape(Family::Mamba);
    // Over the budget: skipped, not run.
    let p = Plan::new(
        settings(
            json!({"methods": ["lora_in_proj"], "max_trainable_params": 1,
                        "trials": {"step1": 12, "step2": 0}}),
        ),
        Direction::Minimize,
        shape_lm.clone(),
        1e-3,
    )
    .expect("plan");
    let mut trials = Vec::new();
    let mut reasons = Vec::new();
    while trials.len() < 12 {
        match p.next(&trials) {
            Next::Skip(x, why) => {
                reasons.push(why);
                trials.push(TrialRecord {
                    number: x.number,
                    step: 1,
                    params: x.params,
                    state: TrialState::Pruned(None),
                });
            }
            Next::Run(x) => panic!("{:?} runs", x.configuration),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        reasons.iter().any(|r| r.contains("max_trainable_params 1")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no method")),
        "{reasons:?}"
    );
    // Nothing finished in step 1: the search fails, saying why.
    match p.next(&trials) {
        Next::Failed(m) => assert!(m.contains("none of the 12 step-1 trials"), "{m}"),
        other => panic!("{other:?}"),
    }
    // An empty combination on a vision model trains the head alone.
    let v = plan(
        Family::Vim,
        json!({"methods": ["A"], "trials": {"step1": 30, "step2": 0}}),
    );
    let mut trials = Vec::new();
    let mut probe = false;
    for _ in 0..30 {
        let Next::Run(x) = v.next(&trials) else {
            panic!("vision trials all run")
        };
        if x.configuration["methods"] == json!([]) {
            assert_eq!(
                x.spec.as_ref().expect("spec").to_value()["type"],
                "linear_probe"
            );
            probe = true;
        }
        trials.push(TrialRecord {
            number: x.number,
            step: 1,
            params: x.params,
            state: TrialState::Failed,
        });
    }
    assert!(probe, "30 draws of one boolean include false");
}

#[test]
fn bad_settings_name_the_field() {
    let lm = shape(Family::Mamba);
    let cases = [
        (json!({"trials": {"step1": 0, "step2": 3}}), "trials.step1"),
        (
            json!({"trials": {"step1": 3, "step2": 100000}}),
            "trials.step2",
        ),
        (json!({"max_parallel": 0}), "max_parallel"),
        (json!({"max_trainable_params": 0}), "max_trainable_params"),
        (json!({"methods": []}), "methods"),
        (json!({"methods": ["lora_in_proj", "nope"]}), "methods[1]"),
        (json!({"methods": ["A", "A"]}), "methods[1]"),
        (json!({"methods": ["cls_token"]}), "methods[0]"),
        (json!({"space": {"nope": {}}}), "space.nope"),
        (
            json!({"methods": ["A"], "space": {"lora_in_proj": {}}}),
            "space.lora_in_proj",
        ),
        (
            json!({"space": {"lora_in_proj": {"r": {"low": 16, "high": 4}}}}),
            "space.lora_in_proj.r",
        ),
        (
            json!({"space": {"lora_in_proj": {"r": {"low": 4, "high": 4096}}}}),
            "space.lora_in_proj.r",
        ),
        (
            json!({"space": {"lora_in_proj": {"r": {"low": 12, "high": 16}}}}),
            "space.lora_in_proj.r",
        ),
        (
            json!({"space": {"lora_in_proj": {"s": {"low": 0, "high": 1}}}}),
            "space.lora_in_proj.s",
        ),
        (
            json!({"space": {"lora_in_proj": {"q": {"low": 0, "high": 1}}}}),
            "space.lora_in_proj.q",
        ),
        (
            json!({"space": {"lora_in_proj": {"r": {"low": 4.5, "high": 8}}}}),
            "space.lora_in_proj.r.low",
        ),
        (
            json!({"space": {"A": {"fixed": {"type": "lora"}}}}),
            "space.A.fixed",
        ),
        (
            json!({"space": {"A": {"fixed": {"weight_decay": -1}}}}),
            "space.A.fixed",
        ),
        (json!({"pruner": {"interval_steps": 0}}), "pruner"),
    ];
    for (v, field) in cases {
        let e = Plan::new(settings(v.clone()), Direction::Minimize, lm.clone(), 1e-3)
            .expect_err(&v.to_string());
        assert!(
            e.field == field,
            "{v}: got field {} ({})",
            e.field,
            e.message
        );
    }
    // A wider range than the default is fine, and used.
    let p = plan(
        Family::Mamba,
        json!({"methods": ["lora_in_proj"], "space": {"lora_in_proj": {"r": {"low": 4, "high": 64, "step": 4}}}}),
    );
    let space = p.step2_space(&["lora_in_proj".to_string()]);
    assert!(space.iter().any(|(n, d)| n == "lora_in_proj.r"
        && *d
            == trainer::search::Param::Int {
                low: 4,
                high: 64,
                log: false,
                step: 4
            }));
    assert!(serde_json::from_value::<SearchSettings>(json!({"bogus": 1})).is_err());
}

#[test]
fn the_random_sampler_is_a_seeded_baseline() {
    let s = json!({"methods": ["lora_in_proj", "A", "lora_p_X", "prompt", "D", "lora_out_proj"],
                   "trials": {"step1": 24, "step2": 8}, "max_parallel": 1, "seed": 7});
    let mut r = s.clone();
    r["sampler"] = json!("random");
    let (tpe, _, _) = run(&plan(Family::Mamba, s));
    let (random, _, _) = run(&plan(Family::Mamba, r.clone()));
    let (again, _, _) = run(&plan(Family::Mamba, r));
    assert_eq!(random, again, "seeded");
    // The first 10 trials are TPE's random start-up: the same draws; later ones differ.
    assert_eq!(tpe[..10], random[..10]);
    assert_ne!(tpe[10..24], random[10..24]);
}
