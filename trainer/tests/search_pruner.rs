//! The median pruner (`trainer::search::pruner`): it prunes a trial worse than the completed
//! trials' median at its step, waits for its startup trials and warm-up, checks once per
//! interval, and rejects bad settings naming the field; its settings deserialise with
//! Optuna's defaults. Against Optuna (`tests/fixtures/search/pruner.json`, from
//! `reference/make_pruner_fixtures.py`): the same decision in every case, hand-written and
//! random, both directions, with NaN, infinities, missing steps and steps reported twice.

use trainer::search::Direction;
use trainer::search::pruner::MedianPruner;

fn ramp(values: &[f64]) -> Vec<(u64, f64)> {
    values
        .iter()
        .enumerate()
        .map(|(s, v)| (s as u64, *v))
        .collect()
}

/// Five complete trials whose values at step 0 are 5..=9 (median 7), improving by 1 a step.
fn five() -> Vec<Vec<(u64, f64)>> {
    (5..10)
        .map(|v| (0..4).map(|s| (s, (v - s) as f64)).collect())
        .collect()
}

#[test]
fn prunes_below_the_median_of_completed_trials() {
    let p = MedianPruner::default();
    let done = five();
    assert!(p.should_prune(Direction::Minimize, &ramp(&[7.5]), &done));
    assert!(
        !p.should_prune(Direction::Minimize, &ramp(&[7.0]), &done),
        "a tie is kept"
    );
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[6.5]), &done));
    assert!(p.should_prune(Direction::Maximize, &ramp(&[6.5]), &done));
    assert!(!p.should_prune(Direction::Maximize, &ramp(&[7.0]), &done));
    // At step 1 the median is 6; the trial is judged by its best value over all steps.
    assert!(p.should_prune(Direction::Minimize, &ramp(&[8.0, 6.5]), &done));
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[5.0, 9.0]), &done));
    // Even median (4 trials, so no startup trials): halfway between the middle two.
    let lenient = MedianPruner {
        n_startup_trials: 0,
        ..MedianPruner::default()
    };
    assert!(lenient.should_prune(Direction::Minimize, &ramp(&[6.6]), &done[..4]));
    assert!(!lenient.should_prune(Direction::Minimize, &ramp(&[6.5]), &done[..4]));
    // Fewer complete trials than n_startup_trials (5), none at all, or nothing reported.
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[100.0]), &done[..4]));
    assert!(lenient.should_prune(Direction::Minimize, &ramp(&[100.0]), &done[..1]));
    assert!(!lenient.should_prune(Direction::Minimize, &ramp(&[100.0]), &[]));
    assert!(!lenient.should_prune(Direction::Minimize, &[], &done));
    // A step no complete trial reached, and n_min_trials.
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[100.0; 5]), &done));
    let three = MedianPruner {
        n_min_trials: 3,
        n_startup_trials: 0,
        ..MedianPruner::default()
    };
    assert!(!three.should_prune(Direction::Minimize, &ramp(&[100.0]), &done[..2]));
    assert!(three.should_prune(Direction::Minimize, &ramp(&[100.0]), &done[..3]));
}

#[test]
fn nan_values() {
    let p = MedianPruner::default();
    let done = five();
    // Nothing but NaN: pruned (as Optuna), whichever direction.
    assert!(p.should_prune(Direction::Minimize, &ramp(&[f64::NAN]), &done));
    assert!(p.should_prune(Direction::Maximize, &ramp(&[f64::NAN; 2]), &done));
    // NaN steps are skipped for the best value.
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[5.0, f64::NAN]), &done));
    // NaN at the step is left out of the median; all NaN there: no decision.
    let mut nans = five();
    nans[0][0].1 = f64::NAN;
    nans[1][0].1 = f64::NAN; // 7, 8, 9 left
    assert!(p.should_prune(Direction::Minimize, &ramp(&[8.5]), &nans));
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[7.5]), &nans));
    for t in &mut nans {
        t[0].1 = f64::NAN;
    }
    assert!(!p.should_prune(Direction::Minimize, &ramp(&[100.0]), &nans));
}

#[test]
fn warm_up_and_interval() {
    let done: Vec<Vec<(u64, f64)>> = vec![(0..10).map(|s| (s, 1.0)).collect(); 5];
    let bad = |n: u64| (0..n).map(|s| (s, 100.0)).collect::<Vec<_>>();
    let warm = MedianPruner {
        n_warmup_steps: 2,
        ..MedianPruner::default()
    };
    let judged: Vec<bool> = (1..=4)
        .map(|n| warm.should_prune(Direction::Minimize, &bad(n), &done))
        .collect();
    assert_eq!(judged, [false, false, true, true]);
    // Checks at steps 1, 4, 7 (warm-up 1, every 3).
    let every3 = MedianPruner {
        n_warmup_steps: 1,
        interval_steps: 3,
        ..MedianPruner::default()
    };
    let checked: Vec<u64> = (1..=9)
        .filter(|&n| every3.should_prune(Direction::Minimize, &bad(n), &done))
        .map(|n| n - 1)
        .collect();
    assert_eq!(checked, [1, 4, 7]);
    // A check whose step was not reported happens at the next reported step, once.
    let every3 = MedianPruner {
        interval_steps: 3,
        ..MedianPruner::default()
    };
    let gap = [(0, 100.0), (2, 100.0), (5, 100.0)];
    assert!(every3.should_prune(Direction::Minimize, &gap, &done));
    let after = [(0, 100.0), (3, 100.0), (4, 100.0)];
    assert!(!every3.should_prune(Direction::Minimize, &after, &done));
}

#[test]
fn a_step_reported_twice_keeps_its_first_value() {
    let p = MedianPruner::default();
    let done = five();
    assert!(!p.should_prune(Direction::Minimize, &[(0, 5.0), (0, 9.0)], &done));
    assert!(p.should_prune(Direction::Minimize, &[(0, 9.0), (0, 5.0)], &done));
}

#[test]
fn settings_are_checked() {
    assert_eq!(MedianPruner::default().validate(), Ok(()));
    for percentile in [0.0, 25.0, 100.0] {
        let p = MedianPruner {
            percentile,
            ..MedianPruner::default()
        };
        assert_eq!(p.validate(), Ok(()));
    }
    let bad = [
        (
            MedianPruner {
                percentile: 100.5,
                ..MedianPruner::default()
            },
            "percentile",
        ),
        (
            MedianPruner {
                percentile: -1.0,
                ..MedianPruner::default()
            },
            "percentile",
        ),
        (
            MedianPruner {
                percentile: f64::NAN,
                ..MedianPruner::default()
            },
            "percentile",
        ),
        (
            MedianPruner {
                interval_steps: 0,
                ..MedianPruner::default()
            },
            "interval_steps must be ≥ 1, got 0",
        ),
        (
            MedianPruner {
                n_min_trials: 0,
                ..MedianPruner::default()
            },
            "n_min_trials",
        ),
    ];
    for (p, want) in bad {
        let err = p.validate().expect_err(want).0;
        assert!(err.contains(want), "{err:?} should name {want:?}");
    }
}

#[test]
fn serde_defaults_and_unknown_fields() {
    let p: MedianPruner = serde_json::from_str("{}").expect("defaults");
    assert_eq!(p, MedianPruner::default());
    assert_eq!(
        (
            p.percentile,
            p.n_startup_trials,
            p.n_warmup_steps,
            p.interval_steps,
            p.n_min_trials
        ),
        (50.0, 5, 0, 1, 1)
    );
    let p: MedianPruner =
        serde_json::from_str(r#"{"n_warmup_steps": 3, "interval_steps": 2}"#).expect("partial");
    assert_eq!(
        p,
        MedianPruner {
            n_warmup_steps: 3,
            interval_steps: 2,
            ..MedianPruner::default()
        }
    );
    let back: MedianPruner =
        serde_json::from_str(&serde_json::to_string(&p).expect("ser")).expect("round trip");
    assert_eq!(back, p);
    let err = serde_json::from_str::<MedianPruner>(r#"{"n_warmup_step": 3}"#).expect_err("typo");
    assert!(err.to_string().contains("n_warmup_step"), "{err}");
}

fn value(v: &serde_json::Value) -> f64 {
    match v.as_str() {
        Some("nan") => f64::NAN,
        Some("inf") => f64::INFINITY,
        Some("-inf") => f64::NEG_INFINITY,
        Some(s) => panic!("unexpected value {s:?}"),
        None => v.as_f64().expect("number"),
    }
}

fn reports(v: &serde_json::Value) -> Vec<(u64, f64)> {
    v.as_array()
        .expect("reports")
        .iter()
        .map(|p| (p[0].as_u64().expect("step"), value(&p[1])))
        .collect()
}

#[test]
fn decisions_match_optuna() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/search/pruner.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("pruner.json")).expect("json");
    let cases = fx["cases"].as_array().expect("cases");
    assert_eq!(Some(cases.len() as u64), fx["n_cases"].as_u64());
    let (mut pruned, mut kept, mut bad) = (0, 0, Vec::new());
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let pruner: MedianPruner =
            serde_json::from_value(case["pruner"].clone()).expect("settings");
        pruner.validate().expect("Optuna accepted these settings");
        let direction = match case["direction"].as_str().expect("direction") {
            "maximize" => Direction::Maximize,
            _ => Direction::Minimize,
        };
        let completed: Vec<Vec<(u64, f64)>> = case["completed"]
            .as_array()
            .expect("completed")
            .iter()
            .map(reports)
            .collect();
        let got = pruner.should_prune(direction, &reports(&case["current"]), &completed);
        let want = case["prune"].as_bool().expect("prune");
        if got != want {
            bad.push(format!("{name}: {got}, Optuna {want}"));
        }
        if want {
            pruned += 1;
        } else {
            kept += 1;
        }
    }
    assert!(
        bad.is_empty(),
        "{} disagree:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // Not vacuous: a good share of both decisions, and the random cases are most of the set.
    assert!(cases.len() >= 300, "{} cases", cases.len());
    assert!(pruned >= 40 && kept >= 40, "{pruned} pruned, {kept} kept");
}
