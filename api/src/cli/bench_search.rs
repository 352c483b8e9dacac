//! `molt bench search`: the sampler's quality on a synthetic objective — the best value
//! after N trials for molt's TPE and for random search, over several seeds, at equal
//! budget. `bench/search.py` runs Optuna's TPE on the same objective (defined identically
//! there) and puts the three side by side in BENCHMARKS.md.
//!
//! The objective has what MambaPEFT's search space has: six on/off switches (some help,
//! some hurt), a log-scaled float (a learning rate), an integer with a step (a rank), a
//! log-scaled integer, a categorical, and a float that exists only when a switch is on.

use std::collections::BTreeMap;

use serde_json::json;
use trainer::search::{Direction, Param, TpeSampler, Trial, TrialState};

#[derive(clap::Args, Debug)]
pub struct BenchSearchArgs {
    /// Seeds to average over (0, 1, …).
    #[arg(long, default_value_t = 10)]
    pub seeds: u64,
    /// Trials per run.
    #[arg(long, default_value_t = 60)]
    pub trials: u64,
    /// Print one JSON object per sampler and seed (the best value after each trial)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The synthetic domains, in suggestion order.
pub fn space() -> Vec<(String, Param)> {
    let mut out = vec![
        (
            "lr".to_string(),
            Param::Float {
                low: 1e-5,
                high: 1e-1,
                log: true,
                step: None,
            },
        ),
        (
            "r".to_string(),
            Param::Int {
                low: 4,
                high: 64,
                log: false,
                step: 4,
            },
        ),
        (
            "depth".to_string(),
            Param::Int {
                low: 1,
                high: 64,
                log: true,
                step: 1,
            },
        ),
        ("act".to_string(), Param::Categorical { n: 3 }),
        ("use_x".to_string(), Param::Categorical { n: 2 }),
    ];
    for i in 0..6 {
        out.push((format!("b{i}"), Param::Categorical { n: 2 }));
    }
    out
}

/// The conditional parameter, drawn only when `use_x` is on.
fn x_param() -> Param {
    Param::Float {
        low: -3.0,
        high: 3.0,
        log: false,
        step: None,
    }
}

const SWITCH_WEIGHTS: [f64; 6] = [-0.5, 0.3, -0.4, 0.2, 0.6, -0.3];

/// The objective (minimised; its minimum is -1.2).
pub fn objective(p: &BTreeMap<String, f64>) -> f64 {
    let g = |k: &str| p.get(k).copied().unwrap_or(0.0);
    let mut v = (g("lr").log10() + 3.0).powi(2)
        + ((g("r") - 24.0) / 16.0).powi(2)
        + (g("depth").log2() - 3.0).powi(2) / 4.0
        + [0.6, 0.0, 1.2][g("act") as usize % 3];
    v += if g("use_x") == 1.0 {
        (g("x") - 1.0).powi(2) / 2.0
    } else {
        0.8
    };
    for (i, w) in SWITCH_WEIGHTS.iter().enumerate() {
        v += w * g(&format!("b{i}"));
    }
    v
}

/// Best value after each trial of one run.
fn run(seed: u64, trials: u64, tpe: bool) -> Vec<f64> {
    let sampler = TpeSampler::new(seed, Direction::Minimize);
    let mut history: Vec<Trial> = Vec::new();
    let mut best = f64::INFINITY;
    let mut curve = Vec::new();
    for n in 0..trials {
        let mut params = BTreeMap::new();
        let draw = |name: &str, p: &Param, history: &[Trial]| {
            if tpe {
                sampler.suggest(history, n, name, p)
            } else {
                sampler.random(n, name, p)
            }
        };
        for (name, p) in space() {
            let v = draw(&name, &p, &history);
            params.insert(name, v);
        }
        if params.get("use_x") == Some(&1.0) {
            let v = draw("x", &x_param(), &history);
            params.insert("x".into(), v);
        }
        let value = objective(&params);
        best = best.min(value);
        curve.push(best);
        history.push(Trial {
            number: n,
            params,
            state: TrialState::Complete(value),
        });
    }
    curve
}

pub fn run_bench(args: BenchSearchArgs) -> anyhow::Result<()> {
    let trials = args.trials.clamp(1, 10_000);
    let seeds = args.seeds.clamp(1, 1000);
    let mut curves: BTreeMap<&str, Vec<Vec<f64>>> = BTreeMap::new();
    for (name, tpe) in [("molt-tpe", true), ("molt-random", false)] {
        for seed in 0..seeds {
            let curve = run(seed, trials, tpe);
            if args.json {
                println!(
                    "{}",
                    json!({"sampler": name, "seed": seed, "best_after": curve})
                );
            }
            curves.entry(name).or_default().push(curve);
        }
    }
    if !args.json {
        let points: Vec<u64> = [10, 20, 30, 40, 60, 100]
            .into_iter()
            .filter(|p| *p <= trials)
            .collect();
        print!("{:<12}", "sampler");
        for p in &points {
            print!(" {:>10}", format!("best@{p}"));
        }
        println!();
        for (name, runs) in &curves {
            print!("{name:<12}");
            for p in &points {
                let mean = runs.iter().map(|c| c[*p as usize - 1]).sum::<f64>() / runs.len() as f64;
                print!(" {mean:>10.3}");
            }
            println!();
        }
    }
    Ok(())
}
