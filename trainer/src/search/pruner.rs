//! Pruning: Optuna's median stopping rule (`optuna.pruners.MedianPruner`, a `PercentilePruner`
//! at percentile 50), decision for decision as Optuna 4.5's `pruners/_percentile.py`.
//!
//! A trial's intermediate values arrive as `(step, value)` pairs in the order reported. As
//! Optuna's `Trial.report`, a step reported again is ignored: the first value for a step is the
//! one that counts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Direction, SpaceError};

/// Optuna's `PercentilePruner` (median at percentile 50, the default), same defaults as
/// optuna.pruners.MedianPruner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MedianPruner {
    /// Prune a trial whose best value is worse than this percentile of the completed trials'
    /// values at the same step (counted from the best side), in `[0, 100]`.
    pub percentile: f64,
    /// No pruning until this many trials have completed.
    pub n_startup_trials: usize,
    /// No pruning before this step (steps start at 0).
    pub n_warmup_steps: u64,
    /// Check every this many steps after the warm-up; a check that falls on an unreported step
    /// happens at the next reported one.
    pub interval_steps: u64,
    /// No pruning unless at least this many completed trials reported the step.
    pub n_min_trials: usize,
}

impl Default for MedianPruner {
    fn default() -> Self {
        MedianPruner {
            percentile: 50.0,
            n_startup_trials: 5,
            n_warmup_steps: 0,
            interval_steps: 1,
            n_min_trials: 1,
        }
    }
}

impl MedianPruner {
    /// Checks the settings; the message names the field (e.g. "interval_steps must be ≥ 1, got 0").
    pub fn validate(&self) -> Result<(), SpaceError> {
        let bad = |m: String| Err(SpaceError(m));
        if !(0.0..=100.0).contains(&self.percentile) {
            return bad(format!(
                "percentile must be in [0, 100], got {}",
                self.percentile
            ));
        }
        if self.interval_steps < 1 {
            return bad(format!(
                "interval_steps must be ≥ 1, got {}",
                self.interval_steps
            ));
        }
        if self.n_min_trials < 1 {
            return bad(format!(
                "n_min_trials must be ≥ 1, got {}",
                self.n_min_trials
            ));
        }
        Ok(())
    }

    /// Whether to stop a running trial now. `current`: the trial's intermediate values (step,
    /// value) in the order reported (the last one is the step just reported). `completed`: the
    /// intermediate values of every COMPLETE trial of the study (not pruned, running or failed
    /// ones).
    ///
    /// As Optuna, the step judged is the largest one reported (not necessarily the last), and
    /// the trial is judged by its best value over all its steps.
    pub fn should_prune(
        &self,
        direction: Direction,
        current: &[(u64, f64)],
        completed: &[Vec<(u64, f64)>],
    ) -> bool {
        if completed.is_empty() || completed.len() < self.n_startup_trials {
            return false;
        }
        let reported = first_reports(current);
        let Some((&step, _)) = reported.last_key_value() else {
            return false;
        };
        if step < self.n_warmup_steps || !self.is_first_in_interval(step, &reported) {
            return false;
        }
        // numpy's nanmin / nanmax: NaNs ignored, NaN when all are (f64::min/max skip a NaN).
        let values = reported.values().copied();
        let best = match direction {
            Direction::Minimize => values.fold(f64::NAN, f64::min),
            Direction::Maximize => values.fold(f64::NAN, f64::max),
        };
        if best.is_nan() {
            // Optuna prunes a trial that has reported nothing but NaN, whatever the others did.
            return true;
        }
        let at_step: Vec<f64> = completed
            .iter()
            .filter_map(|t| t.iter().find(|(s, _)| *s == step).map(|&(_, v)| v))
            .collect();
        // NaN values count towards n_min_trials (Optuna counts them before numpy drops them).
        if at_step.len() < self.n_min_trials {
            return false;
        }
        let q = match direction {
            Direction::Minimize => self.percentile,
            Direction::Maximize => 100.0 - self.percentile,
        };
        let p = nanpercentile(at_step, q);
        // A NaN percentile (no numbers at the step, or numpy's infinities) compares false: no prune.
        match direction {
            Direction::Minimize => best > p,
            Direction::Maximize => best < p,
        }
    }

    /// Optuna's `_is_first_in_interval_step`: whether `step` is the first reported step at or
    /// after the latest pruning point (warm-up plus a multiple of the interval) at or below it.
    fn is_first_in_interval(&self, step: u64, reported: &BTreeMap<u64, f64>) -> bool {
        let w = self.n_warmup_steps;
        let nearest_lower = (step - w) / self.interval_steps * self.interval_steps + w;
        // `step` is the largest key, so the one before it is the second largest.
        match reported.range(..step).next_back() {
            Some((&previous, _)) => previous < nearest_lower,
            None => true,
        }
    }
}

/// The step → value map Optuna keeps: the first value reported for each step.
fn first_reports(values: &[(u64, f64)]) -> BTreeMap<u64, f64> {
    let mut map = BTreeMap::new();
    for &(s, v) in values {
        map.entry(s).or_insert(v);
    }
    map
}

/// numpy's `nanpercentile(values, q)` with its default linear interpolation, operation for
/// operation so that ties with the pruned trial's value fall the same way. Note numpy's
/// interpolation gives NaN next to an infinity (`inf - inf`), even for one value.
fn nanpercentile(mut values: Vec<f64>, q: f64) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let virtual_index = (n - 1) as f64 * (q / 100.0);
    // numpy clamps an index at or past the end to the last value, keeping its `floor` of -1 in
    // the interpolation weight; the result is the same up to an infinity's NaN.
    let (previous, next, gamma) = if virtual_index >= (n - 1) as f64 {
        (n - 1, n - 1, virtual_index + 1.0)
    } else {
        let floor = virtual_index.floor();
        (floor as usize, floor as usize + 1, virtual_index - floor)
    };
    let (a, b) = (values[previous], values[next]);
    let diff = b - a;
    if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    }
}
