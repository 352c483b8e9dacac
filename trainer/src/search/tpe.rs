//! Optuna's `TPESampler` (univariate, its defaults): until `n_startup_trials` trials have
//! finished, parameters are drawn at random; then, per parameter, the finished trials are
//! ranked by objective and split into the best `γ(n) = min(⌈0.1·n⌉, 25)` ("below") and the
//! rest ("above"); a Parzen estimator is fitted to each — a mixture of one kernel per
//! observation (weights 1, or a ramp favouring recent trials beyond 25) plus a prior kernel
//! of weight 1 — and of `n_ei_candidates` = 24 draws from the "below" estimator l the one
//! maximising log l(x) − log g(x) is chosen.
//!
//! Kernels (Optuna's `_ParzenEstimator`): numerical parameters are truncated normals on the
//! domain (in log space for log domains; widened by half a step and integrated over each
//! grid cell for stepped and integer ones), centred on the observations with a bandwidth
//! of the larger gap to the neighbouring observations (the prior's centre and the domain ends
//! included; the outermost ones use their inner gap), clipped to
//! `[(high − low) / min(100, 1 + n_kernels), high − low]`; the prior kernel sits at the
//! centre with bandwidth `high − low`. Categorical kernels put `prior_weight / n_kernels` on
//! every choice plus one on the observed one, renormalised.
//!
//! Checked against Optuna 4.5 (`reference/make_tpe_fixtures.py`): densities, splits and
//! acquisition values agree to 1e-10. Optuna 5 changed the bandwidths (the prior's centre no
//! longer counts as a neighbour) and defaults to multivariate TPE; the spec (§7.4) asks for
//! the univariate sampler the authors ran. Tied observations are ordered stably here, where
//! numpy's argsort leaves them unspecified.
//!
//! Ranking: finished trials by value, then pruned trials by how far they got (deeper first)
//! and their last value, then — with the constant liar, so that parallel asks spread —
//! running trials, worst of all. Each parameter uses the trials that have it (conditional
//! parameters). Random draws come from a generator seeded by (seed, trial number, parameter
//! name), so a search is deterministic for a given seed and completion order.

use std::hash::{Hash, Hasher};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::{Direction, Param, Trial, TrialState};

/// The sampler's settings; `Default` is Optuna's, with the constant liar on.
#[derive(Debug, Clone, PartialEq)]
pub struct TpeConfig {
    pub n_startup_trials: usize,
    pub n_ei_candidates: usize,
    pub prior_weight: f64,
    pub consider_magic_clip: bool,
    pub consider_endpoints: bool,
    /// Running trials rank as the worst (Optuna's `constant_liar`).
    pub constant_liar: bool,
}

impl Default for TpeConfig {
    fn default() -> Self {
        TpeConfig {
            n_startup_trials: 10,
            n_ei_candidates: 24,
            prior_weight: 1.0,
            consider_magic_clip: true,
            consider_endpoints: false,
            constant_liar: true,
        }
    }
}

/// Optuna's `default_gamma`: how many ranked trials count as good.
pub fn gamma(n: usize) -> usize {
    ((n as f64 * 0.1).ceil() as usize).min(25)
}

/// Optuna's `default_weights` for `n` observations in trial order: ones, or beyond 25 a ramp
/// from `1/n` to 1 for the oldest and ones for the 25 newest.
pub fn weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    // numpy's linspace(1/n, 1, n − 25): start + i·step, the last exactly 1.
    let ramp = n - 25;
    let start = 1.0 / n as f64;
    let step = if ramp > 1 {
        (1.0 - start) / (ramp - 1) as f64
    } else {
        0.0
    };
    let mut w: Vec<f64> = (0..ramp).map(|i| start + i as f64 * step).collect();
    if ramp > 1 {
        w[ramp - 1] = 1.0;
    }
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// The TPE sampler of one search.
#[derive(Debug, Clone)]
pub struct TpeSampler {
    pub config: TpeConfig,
    pub seed: u64,
    pub direction: Direction,
}

impl TpeSampler {
    pub fn new(seed: u64, direction: Direction) -> Self {
        TpeSampler {
            config: TpeConfig::default(),
            seed,
            direction,
        }
    }

    fn rng(&self, trial_number: u64, name: &str) -> StdRng {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.seed, trial_number, name).hash(&mut h);
        StdRng::seed_from_u64(h.finish())
    }

    /// A uniform draw for parameter `name` of trial `trial_number` (Optuna's
    /// `RandomSampler`; also TPE's startup trials), seeded as [`Self::suggest`].
    pub fn random(&self, trial_number: u64, name: &str, param: &Param) -> f64 {
        param.sample_uniform(&mut self.rng(trial_number, name))
    }

    /// The value of parameter `name` (domain `param`, assumed valid) for trial
    /// `trial_number`, given every other trial of the search.
    pub fn suggest(&self, trials: &[Trial], trial_number: u64, name: &str, param: &Param) -> f64 {
        let mut rng = self.rng(trial_number, name);
        let finished = trials
            .iter()
            .filter(|t| matches!(t.state, TrialState::Complete(_) | TrialState::Pruned(_)))
            .count();
        if finished < self.config.n_startup_trials {
            return param.sample_uniform(&mut rng);
        }
        let (below, above) = self.split(trials, trial_number, name);
        let l = Parzen::new(&below, param, &self.config);
        let g = Parzen::new(&above, param, &self.config);
        let mut best = (f64::NEG_INFINITY, f64::NAN);
        for _ in 0..self.config.n_ei_candidates.max(1) {
            let x = l.sample(&mut rng);
            let score = l.log_pdf(x) - g.log_pdf(x);
            if score > best.0 || best.1.is_nan() {
                best = (score, x);
            }
        }
        best.1
    }

    /// The observations of `name` in the good and the other ranked trials, each in trial
    /// order.
    pub fn split(&self, trials: &[Trial], current: u64, name: &str) -> (Vec<f64>, Vec<f64>) {
        let sign = match self.direction {
            Direction::Minimize => 1.0,
            Direction::Maximize => -1.0,
        };
        let key = |t: &Trial| -> Option<(u8, f64, f64)> {
            match t.state {
                TrialState::Complete(v) => Some((0, sign * v, 0.0)),
                // Deeper first, then by the last value (NaN last); unreported ones after.
                TrialState::Pruned(Some((step, value))) => Some((1, -(step as f64), sign * value)),
                TrialState::Pruned(None) => Some((1, 1.0, 0.0)),
                TrialState::Running if self.config.constant_liar && t.number != current => {
                    Some((2, 0.0, 0.0))
                }
                _ => None,
            }
        };
        let mut ranked: Vec<((u8, f64, f64), &Trial)> = trials
            .iter()
            .filter_map(|t| key(t).map(|k| (k, t)))
            .collect();
        let nan_last = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
        ranked.sort_by(|(a, ta), (b, tb)| {
            a.0.cmp(&b.0)
                .then(nan_last(a.1).total_cmp(&nan_last(b.1)))
                .then(nan_last(a.2).total_cmp(&nan_last(b.2)))
                .then(ta.number.cmp(&tb.number))
        });
        // γ counts finished trials only (Optuna ignores running ones here, optuna#4073);
        // running trials always rank after them, so they never count as good.
        let finished = ranked.iter().filter(|(k, _)| k.0 < 2).count();
        let n_below = gamma(finished);
        let observe = |part: &[((u8, f64, f64), &Trial)]| -> Vec<f64> {
            let mut v: Vec<(u64, f64)> = part
                .iter()
                .filter_map(|(_, t)| t.params.get(name).map(|x| (t.number, *x)))
                .collect();
            v.sort_by_key(|p| p.0);
            v.into_iter().map(|p| p.1).collect()
        };
        (observe(&ranked[..n_below]), observe(&ranked[n_below..]))
    }
}

/// A Parzen estimator of one parameter (see the module docs).
#[derive(Debug, Clone)]
pub struct Parzen {
    /// Mixture weights, the prior's last; sum 1.
    weights: Vec<f64>,
    kernels: Kernels,
}

#[derive(Debug, Clone)]
enum Kernels {
    Numerical {
        mus: Vec<f64>,
        sigmas: Vec<f64>,
        /// The truncation interval, transformed (log) and widened by half a step.
        low: f64,
        high: f64,
        /// The domain in the caller's space.
        domain: (f64, f64),
        /// The grid draws are rounded to.
        step: Option<f64>,
        /// The cell width probabilities integrate over (none: a density).
        density_step: Option<f64>,
        log: bool,
    },
    Categorical {
        /// Per kernel, the probability of each choice.
        probs: Vec<Vec<f64>>,
    },
}

fn log_sum_exp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// P(a ≤ Z ≤ b) for a standard normal Z, accurate in both tails.
fn normal_mass(a: f64, b: f64) -> f64 {
    let s = std::f64::consts::SQRT_2;
    let m = if a >= 0.0 {
        0.5 * (libm::erfc(a / s) - libm::erfc(b / s))
    } else if b <= 0.0 {
        0.5 * (libm::erfc(-b / s) - libm::erfc(-a / s))
    } else {
        1.0 - 0.5 * libm::erfc(-a / s) - 0.5 * libm::erfc(b / s)
    };
    m.max(0.0)
}

fn pick(rng: &mut StdRng, weights: &[f64]) -> usize {
    let u: f64 = rng.random_range(0.0..1.0);
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    weights.len() - 1
}

impl Parzen {
    /// The estimator of `observations` (internal representation, in trial order) on `param`.
    pub fn new(observations: &[f64], param: &Param, cfg: &TpeConfig) -> Parzen {
        let n = observations.len();
        let mut weights = if n == 0 {
            vec![1.0]
        } else {
            let mut w = self::weights(n);
            w.push(cfg.prior_weight);
            w
        };
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let (low, high, step, log) = match *param {
            Param::Categorical { n: choices } => {
                let n_kernels = (n + 1) as f64;
                let mut probs: Vec<Vec<f64>> = observations
                    .iter()
                    .map(|&x| {
                        let mut row = vec![cfg.prior_weight / n_kernels; choices];
                        if let Some(c) = row.get_mut(x as usize) {
                            *c += 1.0;
                        }
                        row
                    })
                    .collect();
                probs.push(vec![cfg.prior_weight / n_kernels; choices]);
                if n == 0 {
                    probs = vec![vec![1.0; choices]];
                }
                for row in &mut probs {
                    let s: f64 = row.iter().sum();
                    if s > 0.0 {
                        row.iter_mut().for_each(|p| *p /= s);
                    }
                }
                return Parzen {
                    weights,
                    kernels: Kernels::Categorical { probs },
                };
            }
            Param::Float {
                low,
                high,
                log,
                step,
            } => (low, high, step, log),
            Param::Int {
                low,
                high,
                log,
                step,
            } => (low as f64, high as f64, Some(step as f64), log),
        };
        let t = |x: f64| if log { x.ln() } else { x };
        let half = step.map_or(0.0, |s| s / 2.0);
        let (lo, hi) = (t(low - half), t(high + half));
        // Optuna models a log integer as a continuous density in log space over the widened
        // interval (its "log-Int hack"), rounding draws to the grid; so does this.
        let density_step = if log { None } else { step };
        let mus: Vec<f64> = observations.iter().map(|&x| t(x)).collect();
        let prior_mu = 0.5 * (lo + hi);
        // Bandwidths from the gaps to the neighbours, the prior's centre and the ends included.
        let mut with_prior: Vec<(f64, usize)> =
            mus.iter().copied().chain([prior_mu]).zip(0..).collect();
        with_prior.sort_by(|a, b| a.0.total_cmp(&b.0));
        let sorted: Vec<f64> = std::iter::once(lo)
            .chain(with_prior.iter().map(|p| p.0))
            .chain([hi])
            .collect();
        let k = with_prior.len();
        let mut sorted_sigmas: Vec<f64> = (1..=k)
            .map(|i| (sorted[i] - sorted[i - 1]).max(sorted[i + 1] - sorted[i]))
            .collect();
        if !cfg.consider_endpoints && sorted.len() >= 4 {
            sorted_sigmas[0] = sorted[2] - sorted[1];
            sorted_sigmas[k - 1] = sorted[k] - sorted[k - 1];
        }
        let mut sigmas = vec![0.0; k];
        for (s, (_, orig)) in sorted_sigmas.iter().zip(&with_prior) {
            sigmas[*orig] = *s;
        }
        sigmas.truncate(n);
        let maxsigma = hi - lo;
        let minsigma = if cfg.consider_magic_clip {
            (hi - lo) / (100f64).min(1.0 + (n + 1) as f64)
        } else {
            1e-12
        };
        let mut sigmas: Vec<f64> = sigmas
            .into_iter()
            .map(|s| s.clamp(minsigma, maxsigma.max(minsigma)))
            .collect();
        let mut mus = mus;
        mus.push(prior_mu);
        sigmas.push((hi - lo).max(1e-12));
        Parzen {
            weights,
            kernels: Kernels::Numerical {
                mus,
                sigmas,
                low: lo,
                high: hi,
                domain: (low, high),
                step,
                density_step,
                log,
            },
        }
    }

    /// Log density (numerical, in the transformed space: the Jacobian cancels in l/g) or log
    /// probability (stepped, integer and categorical) of `x`.
    pub fn log_pdf(&self, x: f64) -> f64 {
        match &self.kernels {
            Kernels::Categorical { probs } => {
                let c = x as usize;
                let terms: Vec<f64> = self
                    .weights
                    .iter()
                    .zip(probs)
                    .map(|(w, row)| w.ln() + row.get(c).copied().unwrap_or(0.0).ln())
                    .collect();
                log_sum_exp(&terms)
            }
            Kernels::Numerical {
                mus,
                sigmas,
                low,
                high,
                density_step,
                log,
                ..
            } => {
                let t = |v: f64| if *log { v.ln() } else { v };
                let terms: Vec<f64> = self
                    .weights
                    .iter()
                    .zip(mus.iter().zip(sigmas))
                    .map(|(w, (mu, sigma))| {
                        let z = normal_mass((low - mu) / sigma, (high - mu) / sigma).ln();
                        let p = match density_step {
                            None => {
                                let u = (t(x) - mu) / sigma;
                                -0.5 * u * u
                                    - 0.5 * (2.0 * std::f64::consts::PI).ln()
                                    - sigma.ln()
                                    - z
                            }
                            Some(s) => {
                                let a = (t(x - s / 2.0) - mu) / sigma;
                                let b = (t(x + s / 2.0) - mu) / sigma;
                                normal_mass(a, b).ln() - z
                            }
                        };
                        w.ln() + p
                    })
                    .collect();
                log_sum_exp(&terms)
            }
        }
    }

    /// A draw from the mixture, in the caller's space (on the grid for stepped domains).
    pub fn sample(&self, rng: &mut StdRng) -> f64 {
        let k = pick(rng, &self.weights);
        match &self.kernels {
            Kernels::Categorical { probs } => pick(rng, &probs[k]) as f64,
            Kernels::Numerical {
                mus,
                sigmas,
                low,
                high,
                domain,
                step,
                log,
                ..
            } => {
                // Rejection from the kernel's normal; a kernel is centred in the interval with
                // a bandwidth of at most its width, so acceptance is at least about a third.
                let mut v = f64::NAN;
                for _ in 0..1000 {
                    let z: f64 = StandardNormal.sample(rng);
                    let c = mus[k] + sigmas[k] * z;
                    if c >= *low && c <= *high {
                        v = c;
                        break;
                    }
                }
                if v.is_nan() {
                    v = rng.random_range(*low..=*high);
                }
                let mut x = if *log { v.exp() } else { v };
                if let Some(s) = step {
                    // numpy rounds halves to even.
                    x = domain.0 + ((x - domain.0) / s).round_ties_even() * s;
                }
                x.clamp(domain.0, domain.1)
            }
        }
    }
}
