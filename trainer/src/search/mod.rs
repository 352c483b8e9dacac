//! Hyperparameter search (MambaPEFT's hybrid search, spec §7): the search space and the
//! sampler. Nothing here knows of HTTP, jobs or the database — the service's orchestration
//! (issue "Hybrid PEFT search as a service") feeds trials in and asks for parameters out.
//!
//! Values travel in Optuna's internal representation: a float as itself, an integer as an
//! `f64` holding it, a categorical choice as its index. The sampler is [`tpe::TpeSampler`],
//! Optuna's univariate `TPESampler` with its defaults.

pub mod hybrid;
pub mod pruner;
pub mod tpe;

use std::collections::BTreeMap;

use rand::Rng;

pub use tpe::{TpeConfig, TpeSampler};

/// One parameter's domain.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// `[low, high]`, log-uniform when `log` (then `low > 0`), on a grid `low + k·step` when
    /// `step` is set (not with `log`).
    Float {
        low: f64,
        high: f64,
        log: bool,
        step: Option<f64>,
    },
    /// `low, low + step, …, ≤ high`; log-uniform when `log` (then `step` is 1 and `low ≥ 1`).
    Int {
        low: i64,
        high: i64,
        log: bool,
        step: i64,
    },
    /// One of `n` choices (their labels live with the caller).
    Categorical { n: usize },
}

/// Why a domain is not usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SpaceError(pub String);

impl Param {
    /// Checks the domain (bounds ordered and finite, log bounds positive, steps positive).
    pub fn validate(&self) -> Result<(), SpaceError> {
        let bad = |m: String| Err(SpaceError(m));
        match *self {
            Param::Float {
                low,
                high,
                log,
                step,
            } => {
                if !(low.is_finite() && high.is_finite()) || low > high {
                    return bad(format!("bounds [{low}, {high}] are not an interval"));
                }
                if log && low <= 0.0 {
                    return bad(format!("a log domain needs low > 0, got {low}"));
                }
                match step {
                    Some(_) if log => bad("a log domain takes no step".into()),
                    Some(s) if !(s > 0.0 && s.is_finite()) => bad(format!("step {s} must be > 0")),
                    _ => Ok(()),
                }
            }
            Param::Int {
                low,
                high,
                log,
                step,
            } => {
                if low > high {
                    return bad(format!("bounds [{low}, {high}] are not an interval"));
                }
                if step < 1 {
                    return bad(format!("step {step} must be ≥ 1"));
                }
                if log && (low < 1 || step != 1) {
                    return bad("a log integer domain needs low ≥ 1 and step 1".into());
                }
                Ok(())
            }
            Param::Categorical { n: 0 } => bad("a categorical domain needs a choice".into()),
            Param::Categorical { .. } => Ok(()),
        }
    }

    /// Whether `v` (internal representation) lies in the domain.
    pub fn contains(&self, v: f64) -> bool {
        match *self {
            Param::Float { low, high, .. } => v >= low && v <= high,
            Param::Int { low, high, .. } => v.fract() == 0.0 && v >= low as f64 && v <= high as f64,
            Param::Categorical { n } => v.fract() == 0.0 && v >= 0.0 && (v as usize) < n,
        }
    }

    /// A uniform draw (log-uniform for log domains), as Optuna's `RandomSampler`.
    pub fn sample_uniform(&self, rng: &mut impl Rng) -> f64 {
        match *self {
            Param::Float {
                low,
                high,
                log,
                step,
            } => {
                if log {
                    (rng.random_range(0.0..=1.0) * (high.ln() - low.ln()) + low.ln())
                        .exp()
                        .clamp(low, high)
                } else if let Some(s) = step {
                    let k = ((high - low) / s).floor() as i64;
                    low + rng.random_range(0..=k) as f64 * s
                } else {
                    rng.random_range(0.0..=1.0) * (high - low) + low
                }
            }
            Param::Int {
                low,
                high,
                log,
                step,
            } => {
                if log {
                    let x = (rng.random_range(0.0..=1.0)
                        * ((high as f64 + 0.5).ln() - (low as f64 - 0.5).ln())
                        + (low as f64 - 0.5).ln())
                    .exp();
                    (x.round() as i64).clamp(low, high) as f64
                } else {
                    let k = (high - low) / step;
                    (low + rng.random_range(0..=k) * step) as f64
                }
            }
            Param::Categorical { n } => rng.random_range(0..n) as f64,
        }
    }
}

/// Whether the objective is minimised or maximised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Minimize,
    Maximize,
}

/// A trial as the sampler sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum TrialState {
    /// Finished with the objective's value.
    Complete(f64),
    /// Stopped early by a pruner; its last reported `(step, value)`, if it reported any.
    Pruned(Option<(u64, f64)>),
    /// Still training (constant liar: it counts as worse than every finished trial).
    Running,
    /// Failed: ignored.
    Failed,
}

/// A trial: its number (the order trials were asked in), parameters and state.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub number: u64,
    pub params: BTreeMap<String, f64>,
    pub state: TrialState,
}
