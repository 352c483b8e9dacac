//! The TPE sampler (`trainer::search`): its Parzen estimators are probability distributions
//! on every kind of domain, the split follows Optuna's γ and ranking (pruned after finished,
//! running last under the constant liar), a seed makes a search reproducible, parallel asks
//! spread, and at equal budget it beats random search on a synthetic objective with log,
//! integer, categorical and conditional parameters, over several seeds. Against Optuna
//! (`tests/fixtures/search/tpe.json`, from `reference/make_tpe_fixtures.py`): the same
//! Parzen log-densities on every kind of domain, the same split of a study with complete,
//! pruned, running and failed trials, and the same acquisition values.

use std::collections::BTreeMap;

use trainer::search::tpe::{Parzen, gamma, weights};
use trainer::search::{Direction, Param, TpeConfig, TpeSampler, Trial, TrialState};

fn trial(number: u64, params: &[(&str, f64)], state: TrialState) -> Trial {
    Trial {
        number,
        params: params.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        state,
    }
}

#[test]
fn gamma_and_weights_are_optunas() {
    assert_eq!(
        [0, 1, 9, 10, 11, 100, 250, 1000].map(gamma),
        [0, 1, 1, 1, 2, 10, 25, 25]
    );
    assert_eq!(weights(3), vec![1.0; 3]);
    let w = weights(30);
    assert_eq!(w.len(), 30);
    assert!((w[0] - 1.0 / 30.0).abs() < 1e-12 && (w[4] - 1.0).abs() < 1e-12);
    assert!(w[..5].windows(2).all(|p| p[0] < p[1]));
    assert!(w[5..].iter().all(|x| *x == 1.0));
}

#[test]
fn domains_are_checked() {
    let f = |low, high, log, step| Param::Float {
        low,
        high,
        log,
        step,
    };
    assert!(f(0.0, 1.0, false, None).validate().is_ok());
    assert!(f(1e-3, 1.0, true, None).validate().is_ok());
    for (p, want) in [
        (f(1.0, 0.0, false, None), "not an interval"),
        (f(0.0, f64::INFINITY, false, None), "not an interval"),
        (f(0.0, 1.0, true, None), "low > 0"),
        (f(1e-3, 1.0, true, Some(0.1)), "no step"),
        (f(0.0, 1.0, false, Some(0.0)), "must be > 0"),
        (
            Param::Int {
                low: 0,
                high: 8,
                log: true,
                step: 1,
            },
            "low ≥ 1",
        ),
        (
            Param::Int {
                low: 1,
                high: 8,
                log: false,
                step: 0,
            },
            "≥ 1",
        ),
        (Param::Categorical { n: 0 }, "needs a choice"),
    ] {
        let e = p.validate().expect_err(want);
        assert!(e.to_string().contains(want), "{p:?}: {e}");
    }
}

#[test]
fn estimators_are_distributions_on_every_domain() {
    let cfg = TpeConfig::default();
    let float = Param::Float {
        low: -2.0,
        high: 3.0,
        log: false,
        step: None,
    };
    let log = Param::Float {
        low: 1e-4,
        high: 1.0,
        log: true,
        step: None,
    };
    let int = Param::Int {
        low: 2,
        high: 40,
        log: false,
        step: 2,
    };
    let log_int = Param::Int {
        low: 1,
        high: 64,
        log: true,
        step: 1,
    };
    let cat = Param::Categorical { n: 4 };
    // Integrates (in the log domain's own space) or sums to 1, with and without observations.
    let integral = |p: &Parzen, lo: f64, hi: f64, log: bool| {
        let n = 20_000;
        let (a, b) = if log { (lo.ln(), hi.ln()) } else { (lo, hi) };
        let h = (b - a) / n as f64;
        (0..=n)
            .map(|i| {
                let t = a + i as f64 * h;
                let x = if log { t.exp() } else { t };
                let w = if i == 0 || i == n { 0.5 } else { 1.0 };
                w * p.log_pdf(x).exp() * h
            })
            .sum::<f64>()
    };
    for obs in [vec![], vec![0.5], vec![-1.9, 0.0, 0.1, 2.5]] {
        let p = Parzen::new(&obs, &float, &cfg);
        let i = integral(&p, -2.0, 3.0, false);
        assert!((i - 1.0).abs() < 1e-3, "float {obs:?}: {i}");
    }
    for obs in [vec![], vec![1e-3, 0.5, 0.02]] {
        let p = Parzen::new(&obs, &log, &cfg);
        let i = integral(&p, 1e-4, 1.0, true);
        assert!((i - 1.0).abs() < 1e-3, "log {obs:?}: {i}");
    }
    let p = Parzen::new(&[4.0, 38.0, 20.0], &int, &cfg);
    let s: f64 = (2..=40).step_by(2).map(|x| p.log_pdf(x as f64).exp()).sum();
    assert!((s - 1.0).abs() < 1e-9, "{s}");
    // A log integer is a density in log space over [low − ½, high + ½], as in Optuna.
    let p = Parzen::new(&[1.0, 2.0, 50.0], &log_int, &cfg);
    let i = integral(&p, 0.5, 64.5, true);
    assert!((i - 1.0).abs() < 1e-3, "log int: {i}");
    let p = Parzen::new(&[1.0, 1.0, 3.0], &cat, &cfg);
    let probs: Vec<f64> = (0..4).map(|c| p.log_pdf(c as f64).exp()).collect();
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{probs:?}");
    assert!(probs[1] > probs[3] && probs[3] > probs[0], "{probs:?}");
    assert!((probs[0] - probs[2]).abs() < 1e-15);
    // Draws stay in the domain and on its grid.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    for param in [&float, &log, &int, &log_int, &cat] {
        let p = Parzen::new(&[], param, &cfg);
        for _ in 0..500 {
            let x = p.sample(&mut rng);
            assert!(param.contains(x), "{param:?}: {x}");
            if let Param::Int { low, step, .. } = param {
                assert_eq!((x as i64 - low) % step, 0, "{x}");
            }
        }
    }
}

#[test]
fn split_ranks_finished_then_pruned_then_running() {
    let s = TpeSampler::new(0, Direction::Minimize);
    let mut trials: Vec<Trial> = (0..20)
        .map(|i| {
            trial(
                i,
                &[("x", i as f64)],
                TrialState::Complete((i as f64 - 7.0).abs()),
            )
        })
        .collect();
    trials.push(trial(
        20,
        &[("x", 100.0)],
        TrialState::Pruned(Some((3, -5.0))),
    ));
    trials.push(trial(21, &[("x", 200.0)], TrialState::Running));
    trials.push(trial(22, &[("x", 300.0)], TrialState::Failed));
    trials.push(trial(23, &[("y", 1.0)], TrialState::Complete(-100.0)));
    // 23 ranked trials (failed ignored): γ = 3 good ones: 23 (no x), 7 and then 6 (ties by number).
    let (below, above) = s.split(&trials, 99, "x");
    assert_eq!(below, vec![6.0, 7.0]);
    assert_eq!(above.len(), 20);
    assert_eq!(above[above.len() - 2..], [100.0, 200.0]);
    // Maximising reverses the ranking of finished trials.
    let s = TpeSampler::new(0, Direction::Maximize);
    let (below, _) = s.split(&trials[..20], 99, "x");
    assert_eq!(below, vec![18.0, 19.0]);
}

/// A synthetic objective: a shifted quadratic over two floats, a log-scaled rate, an integer,
/// a categorical switch choosing the optimum's branch, and a parameter only one branch has.
fn objective(p: &BTreeMap<String, f64>) -> f64 {
    let x = p["x"] - 1.3;
    let y = p["y"] + 0.7;
    let lr = (p["lr"].log10() + 2.5).powi(2);
    let r = (p["r"] - 24.0) / 8.0;
    let branch = if p["kind"] == 2.0 { 0.0 } else { 1.5 };
    let extra = p.get("alpha").map_or(0.0, |a| (a - 0.25).powi(2) * 4.0);
    x * x + y * y + lr + r * r + branch + extra
}

fn space() -> Vec<(&'static str, Param)> {
    vec![
        (
            "x",
            Param::Float {
                low: -5.0,
                high: 5.0,
                log: false,
                step: None,
            },
        ),
        (
            "y",
            Param::Float {
                low: -5.0,
                high: 5.0,
                log: false,
                step: None,
            },
        ),
        (
            "lr",
            Param::Float {
                low: 1e-5,
                high: 1.0,
                log: true,
                step: None,
            },
        ),
        (
            "r",
            Param::Int {
                low: 4,
                high: 64,
                log: false,
                step: 4,
            },
        ),
        ("kind", Param::Categorical { n: 3 }),
    ]
}

/// Best value after `budget` sequential trials, sampling with TPE or at random.
fn run(seed: u64, budget: u64, tpe: bool) -> f64 {
    let s = TpeSampler::new(seed, Direction::Minimize);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 0xA5A5);
    let mut trials: Vec<Trial> = Vec::new();
    for n in 0..budget {
        let mut params = BTreeMap::new();
        let mut ask = |name: &str, p: &Param, trials: &[Trial]| {
            if tpe {
                s.suggest(trials, n, name, p)
            } else {
                p.sample_uniform(&mut rng)
            }
        };
        for (name, p) in space() {
            params.insert(name.to_string(), ask(name, &p, &trials));
        }
        if params["kind"] == 2.0 {
            let alpha = Param::Float {
                low: 0.0,
                high: 1.0,
                log: false,
                step: None,
            };
            params.insert("alpha".into(), ask("alpha", &alpha, &trials));
        }
        for (name, p) in space() {
            assert!(p.contains(params[name]), "{name}: {}", params[name]);
        }
        let v = objective(&params);
        trials.push(Trial {
            number: n,
            params,
            state: TrialState::Complete(v),
        });
    }
    trials
        .iter()
        .filter_map(|t| match t.state {
            TrialState::Complete(v) => Some(v),
            _ => None,
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn beats_random_search_at_equal_budget() {
    let seeds: Vec<u64> = (0..8).collect();
    let tpe: Vec<f64> = seeds.iter().map(|&s| run(s, 60, true)).collect();
    let random: Vec<f64> = seeds.iter().map(|&s| run(s, 60, false)).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "best after 60 trials: TPE {tpe:?} (mean {}), random {random:?} (mean {})",
        mean(&tpe),
        mean(&random)
    );
    assert!(
        mean(&tpe) < 0.6 * mean(&random),
        "TPE {} vs random {}",
        mean(&tpe),
        mean(&random)
    );
    let wins = tpe.iter().zip(&random).filter(|(t, r)| t < r).count();
    assert!(wins >= 6, "TPE won {wins} of 8 seeds");
    // The same seed gives the same search.
    assert_eq!(run(3, 30, true), run(3, 30, true));
}

#[test]
fn parallel_asks_spread_under_the_constant_liar() {
    let s = TpeSampler::new(5, Direction::Minimize);
    let x = Param::Float {
        low: -5.0,
        high: 5.0,
        log: false,
        step: None,
    };
    let mut trials: Vec<Trial> = (0..20)
        .map(|i| {
            let v = -5.0 + i as f64 * 0.5;
            trial(i, &[("x", v)], TrialState::Complete((v - 1.0).powi(2)))
        })
        .collect();
    // Four asks in a row, each running while the next is asked: four different points.
    let mut asked = Vec::new();
    for n in 20..24 {
        let v = s.suggest(&trials, n, "x", &x);
        asked.push(v);
        trials.push(trial(n, &[("x", v)], TrialState::Running));
    }
    for i in 0..asked.len() {
        for j in i + 1..asked.len() {
            assert!((asked[i] - asked[j]).abs() > 1e-9, "{asked:?}");
        }
    }
    // And they stay near the good region.
    assert!(asked.iter().all(|v| (v - 1.0).abs() < 3.0), "{asked:?}");
}

fn fixture() -> serde_json::Value {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/search/tpe.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("tpe.json")).expect("json")
}

fn param_of(d: &serde_json::Value) -> Param {
    let f = |k: &str| d[k].as_f64().expect(k);
    match d["type"].as_str().expect("type") {
        "categorical" => Param::Categorical {
            n: d["n"].as_u64().expect("n") as usize,
        },
        "int" => Param::Int {
            low: f("low") as i64,
            high: f("high") as i64,
            log: d["log"].as_bool().expect("log"),
            step: f("step") as i64,
        },
        _ => Param::Float {
            low: f("low"),
            high: f("high"),
            log: d["log"].as_bool().expect("log"),
            step: d["step"].as_f64(),
        },
    }
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// The same formulas as Optuna's: only rounding differs.
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-10 * (1.0 + want.abs())
}

#[test]
fn parzen_log_densities_match_optuna() {
    let fx = fixture();
    let cfg = TpeConfig::default();
    for case in fx["parzen"].as_array().expect("parzen") {
        let name = case["name"].as_str().expect("name");
        let p = Parzen::new(
            &floats(&case["observations"]),
            &param_of(&case["domain"]),
            &cfg,
        );
        for (x, want) in floats(&case["points"])
            .into_iter()
            .zip(floats(&case["log_pdf"]))
        {
            let got = p.log_pdf(x);
            assert!(close(got, want), "{name} at {x}: {got} vs Optuna's {want}");
        }
    }
}

#[test]
fn split_and_acquisition_match_optuna() {
    let fx = fixture();
    for study in fx["split"].as_array().expect("split") {
        let direction = match study["direction"].as_str() {
            Some("maximize") => Direction::Maximize,
            _ => Direction::Minimize,
        };
        let trials: Vec<Trial> = study["trials"]
            .as_array()
            .expect("trials")
            .iter()
            .map(|t| {
                let state = match t["state"].as_str().expect("state") {
                    "complete" => TrialState::Complete(t["value"].as_f64().expect("value")),
                    "pruned" => TrialState::Pruned(
                        t["step"]
                            .as_u64()
                            .map(|s| (s, t["value"].as_f64().expect("value"))),
                    ),
                    "running" => TrialState::Running,
                    _ => TrialState::Failed,
                };
                Trial {
                    number: t["number"].as_u64().expect("number"),
                    params: t["params"]
                        .as_object()
                        .expect("params")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_f64().expect("param")))
                        .collect(),
                    state,
                }
            })
            .collect();
        let below_numbers: Vec<u64> = study["below"]
            .as_array()
            .expect("below")
            .iter()
            .map(|n| n.as_u64().expect("number"))
            .collect();
        let s = TpeSampler::new(0, direction);
        for (name, acq) in study["acquisition"].as_object().expect("acquisition") {
            let (below, above) = s.split(&trials, u64::MAX, name);
            let want_below: Vec<f64> = trials
                .iter()
                .filter(|t| below_numbers.contains(&t.number))
                .filter_map(|t| t.params.get(name).copied())
                .collect();
            assert_eq!(below, want_below, "{direction:?} {name}: the good trials");
            let param = param_of(&acq["domain"]);
            let l = Parzen::new(&below, &param, &s.config);
            let g = Parzen::new(&above, &param, &s.config);
            for (x, want) in floats(&acq["points"])
                .into_iter()
                .zip(floats(&acq["acquisition"]))
            {
                let got = l.log_pdf(x) - g.log_pdf(x);
                assert!(
                    close(got, want),
                    "{direction:?} {name} at {x}: {got} vs Optuna's {want}"
                );
            }
        }
    }
}
