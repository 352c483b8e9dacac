//! AdamW over parameter groups, each with its own learning rate and weight decay, and
//! global-norm gradient clipping.
//!
//! `candle_nn::AdamW` has one (lr, weight decay) for all its variables; nearly every PEFT
//! recipe needs several (peft-spec §2, §11), and partial tuning decays toward the pretrained
//! value, which no stock optimizer does. The update is PyTorch's `torch.optim.AdamW`
//! (`_single_tensor_adamw`, `amsgrad=False`, `maximize=False`), in its order of operations:
//!
//! ```text
//! θ ← θ − lr·λ·(θ − θ₀)              (θ₀ = 0 unless the group decays toward pretrained values)
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! A parameter with no gradient in a step is left alone (as PyTorch skips `grad is None`):
//! no decay, no moment update. The step counter `t` is shared by all parameters.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::TrainError;

/// A set of parameters trained with one learning rate and weight decay (PEFT methods
/// produce them; pretraining builds its own).
pub use crate::peft::ParamGroup;

/// A group inside the optimizer, with its Adam moments.
#[derive(Debug)]
pub struct ParamGroupState {
    pub name: String,
    pub params: Vec<(String, Var)>,
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    pub weight_decay: f64,
    pub decay_toward: Option<Vec<Tensor>>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// Gradients aligned with the optimizer's groups and params (`None`: no gradient).
pub type Grads = Vec<Vec<Option<Tensor>>>;

/// AdamW with per-group lr and weight decay.
#[derive(Debug)]
pub struct AdamW {
    pub groups: Vec<ParamGroupState>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken so far.
    pub t: u64,
}

impl AdamW {
    /// `default_lr` applies to groups with `lr: None`. Moments start at zero, in f32 (the
    /// update is computed in f32 whatever the parameter's dtype).
    pub fn new(
        groups: Vec<ParamGroup>,
        default_lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> Result<Self, TrainError> {
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            if !names.insert(g.name.clone()) {
                return Err(TrainError::Method(format!(
                    "two parameter groups are named `{}`",
                    g.name
                )));
            }
            if let Some(t) = &g.decay_toward
                && t.len() != g.params.len()
            {
                return Err(TrainError::Method(format!(
                    "group `{}`: {} decay targets for {} parameters",
                    g.name,
                    t.len(),
                    g.params.len()
                )));
            }
            let lr = g.lr.unwrap_or(default_lr);
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            if !(ok(lr) && ok(g.weight_decay)) {
                return Err(TrainError::Method(format!(
                    "group `{}`: learning rate {lr} and weight decay {} must be finite and >= 0",
                    g.name, g.weight_decay
                )));
            }
            let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
            let m = g
                .params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?;
            let v = g
                .params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?;
            out.push(ParamGroupState {
                name: g.name,
                params: g.params,
                lr,
                weight_decay: g.weight_decay,
                decay_toward: g.decay_toward,
                m,
                v,
            });
        }
        Ok(AdamW {
            groups: out,
            beta1,
            beta2,
            eps,
            t: 0,
        })
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Every `Var`, in group order (the order of [`Grads`]).
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(_, v)| v))
    }

    /// Pulls each param's gradient out of a backward pass's store.
    pub fn grads_from(&self, store: &candle_core::backprop::GradStore) -> Grads {
        self.groups
            .iter()
            .map(|g| {
                g.params
                    .iter()
                    .map(|(_, v)| store.get(v.as_tensor()).cloned())
                    .collect()
            })
            .collect()
    }

    /// One update with every group's lr scaled by `lr_factor` (the schedule).
    pub fn step(&mut self, grads: &Grads, lr_factor: f64) -> Result<(), TrainError> {
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for (gi, group) in self.groups.iter_mut().enumerate() {
            let lr = group.lr * lr_factor;
            let step_size = lr / bias1;
            for (pi, (_, var)) in group.params.iter().enumerate() {
                let Some(Some(g)) = grads.get(gi).and_then(|g| g.get(pi)) else {
                    continue;
                };
                let g = g.to_dtype(DType::F32)?;
                let mut theta = var.as_tensor().to_dtype(DType::F32)?.detach();
                if group.weight_decay != 0.0 && lr != 0.0 {
                    let k = lr * group.weight_decay;
                    theta = match group.decay_toward.as_ref().and_then(|t| t.get(pi)) {
                        Some(target) => {
                            let target = target.to_dtype(DType::F32)?;
                            (&theta - ((&theta - target)? * k)?)?
                        }
                        None => (theta * (1.0 - k))?,
                    };
                }
                let m = ((&group.m[pi] * b1)? + (&g * (1.0 - b1))?)?;
                let v = ((&group.v[pi] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let denom = ((v.sqrt()? / bias2_sqrt)? + eps)?;
                let theta = (theta - ((&m / denom)? * step_size)?)?;
                var.set(&theta.to_dtype(var.dtype())?)?;
                group.m[pi] = m;
                group.v[pi] = v;
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`m.{group}.{param}`, `v.{group}.{param}`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for g in &self.groups {
            for (i, (name, _)) in g.params.iter().enumerate() {
                out.insert(format!("m.{}.{name}", g.name), g.m[i].clone());
                out.insert(format!("v.{}.{name}", g.name), g.v[i].clone());
            }
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step counter. Every moment
    /// must be present with the right shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<(), String> {
        for g in &mut self.groups {
            for (i, (name, var)) in g.params.iter().enumerate() {
                for (which, slot) in [("m", &mut g.m[i]), ("v", &mut g.v[i])] {
                    let key = format!("{which}.{}.{name}", g.name);
                    let Some(t) = tensors.get(&key) else {
                        return Err(format!("optimizer state has no `{key}`"));
                    };
                    if t.dims() != var.dims() {
                        return Err(format!(
                            "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                            t.dims(),
                            var.dims()
                        ));
                    }
                    *slot = t
                        .to_dtype(DType::F32)
                        .and_then(|t| t.to_device(var.device()))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Adds `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut Grads, more: Grads) -> candle_core::Result<()> {
    if acc.is_empty() {
        *acc = more;
        return Ok(());
    }
    for (ga, gm) in acc.iter_mut().zip(more) {
        for (a, m) in ga.iter_mut().zip(gm) {
            *a = match (a.take(), m) {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, None) => x,
                (None, y) => y,
            };
        }
    }
    Ok(())
}

/// The global L2 norm of every gradient, and (when `max_norm > 0`) every gradient scaled by
/// `max_norm / (norm + 1e-6)` if that is below 1 — `torch.nn.utils.clip_grad_norm_`.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten().flatten() {
        sq += f64::from(
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
