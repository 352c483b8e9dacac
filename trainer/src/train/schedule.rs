//! Learning-rate schedules: a factor in [0, 1] that scales every parameter group's base lr.
//!
//! These are transformers' `get_{constant,linear,cosine}_schedule_with_warmup` with one
//! change: steps count from 1, so warm-up reaches the peak at step `warmup` and the first
//! step is not taken at lr 0 (transformers' first step with warm-up is `lr · 0/warmup`,
//! i.e. a step that only updates the Adam moments). After warm-up the formulas are
//! transformers' with its 0-based step `s − 1`:
//!
//! - warm-up (`s ≤ warmup`): `s / warmup`
//! - constant: `1`
//! - linear: `1 − p` with `p = (s − 1 − warmup) / (total − warmup)`, so the last step still
//!   moves (`1 / (total − warmup)`)
//! - cosine: `½ (1 + cos(π p))`

use serde::{Deserialize, Serialize};

use super::LrScheduler;

/// A schedule over `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    pub fn new(kind: LrScheduler, warmup: u64, total: u64) -> Self {
        Schedule {
            kind,
            warmup,
            total,
        }
    }

    /// The factor for 1-based optimizer step `step` (the step about to be taken).
    pub fn factor(&self, step: u64) -> f64 {
        let s = step.max(1);
        if s <= self.warmup {
            return s as f64 / self.warmup as f64;
        }
        let decay_steps = self.total.saturating_sub(self.warmup).max(1);
        let p = ((s - 1 - self.warmup) as f64 / decay_steps as f64).min(1.0);
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::Linear => (1.0 - p).max(0.0),
            LrScheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0),
        }
    }
}
