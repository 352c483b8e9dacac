//! Additional-scan (spec §4.9): N′ extra SSM state dimensions per channel, with new A
//! columns (`A_log_scan_addi`, E×N′) and new x_proj rows (`x_proj_scan_addi.weight`, 2N′×E:
//! B_new then C_new). The mixer reads N from A_log's width, so the method only has to widen
//! A_log and assemble x_proj's output as [dt; B_ext; C_ext]:
//! top = [new | old], bottom = [old | new]. Merges into an expanded-state model (N + N′).
//! A bidirectional model gets the extra states in each scan direction, from that direction's
//! own tensors (`A_b_log_scan_addi`, `x_proj_b_scan_addi.weight`).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::sites::{Dir, LinearPart, ParamPart, ParamSite, Proj, Runtime, Sites, Slot, Stage};
use super::spec::{check_float, check_range};
use super::target::{ModelShape, PeftBase, base_param};
use super::{ParamGroup, ParamShape, Params, PeftMethod};
use crate::model::layers::linear_forward;

/// Where the new state dimensions go (no computational effect; it picks the neighbour the
/// A init copies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    #[serde(alias = "prefix")]
    Top,
    #[serde(alias = "suffix")]
    Bottom,
}

/// How the new A columns start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AInit {
    /// Copy the neighbouring pretrained column (top: A_log[:, 0]; bottom: A_log[:, N−1]).
    Copy,
    /// S4D-real continuation: A_new[:, j] = N + 1 + j.
    S4d,
    /// A constant `a_value` (A = a_value, stored as log).
    Constant,
}

fn default_n_add() -> usize {
    6
}
fn default_placement() -> Placement {
    Placement::Top
}
fn default_a_init() -> AInit {
    AInit::Copy
}
fn default_a_value() -> f64 {
    1.0
}

/// The most extra states one method may add (the scan's cost grows with N + N′).
const MAX_N_ADD: usize = 1024;

/// `{"type": "additional_scan", "n_add": 6, "placement": "top", "a_init": "copy"}`.
/// `weight_decay` applies to the new x_proj rows; the new A columns never decay (§4.9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdditionalScanConfig {
    #[serde(default = "default_n_add", alias = "n")]
    pub n_add: usize,
    #[serde(default = "default_placement")]
    pub placement: Placement,
    #[serde(default = "default_a_init")]
    pub a_init: AInit,
    /// For `a_init: "constant"`.
    #[serde(default = "default_a_value")]
    pub a_value: f64,
    /// Zero-init the new x_proj rows (function-preserving); the released configs do not.
    #[serde(default)]
    pub zero_init_x_proj: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl AdditionalScanConfig {
    pub fn new(n_add: usize, placement: Placement) -> Self {
        AdditionalScanConfig {
            n_add,
            placement,
            a_init: AInit::Copy,
            a_value: 1.0,
            zero_init_x_proj: false,
            lr: None,
            weight_decay: 0.0,
        }
    }
}

fn names(i: usize, dir: Dir) -> (String, String) {
    (
        format!("layers.{i}.{}_scan_addi", Slot::ALog.site_name(dir)),
        format!("layers.{i}.{}_scan_addi.weight", Proj::X.site_name(dir)),
    )
}

impl PeftMethod for AdditionalScanConfig {
    fn kind(&self) -> &'static str {
        "additional_scan"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        cfg.require_selective("additional_scan")?;
        check_range(
            "additional_scan",
            "n_add (N')",
            "the SSM state",
            self.n_add,
            1,
            MAX_N_ADD,
        )?;
        if self.a_init == AInit::Constant {
            check_float(
                "additional_scan",
                "a_value",
                self.a_value,
                1e-12,
                1e12,
                "a positive number (A = a_value)",
            )?;
        } else if self.a_value != default_a_value() {
            return Err(PeftError::Contradictory(format!(
                "additional_scan: `a_value` is only used with `a_init: \"constant\"` (a_init is \
                 {:?})",
                self.a_init
            )));
        }
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let e = cfg.intermediate_size;
        cfg.proj_copies(Proj::X)
            .into_iter()
            .flat_map(|(i, dir)| {
                let (a, w) = names(i, dir);
                [(a, vec![e, self.n_add]), (w, vec![2 * self.n_add, e])]
            })
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, dir) in base.peft_shape().proj_copies(Proj::X) {
            let (a_name, w_name) = names(i, dir);
            let a_log = base_param(base, ParamSite::Mixer(i, Slot::ALog, dir))?;
            let (e, n) = a_log.dims2()?;
            let a = match self.a_init {
                AInit::Copy => {
                    let col = match self.placement {
                        Placement::Top => 0,
                        Placement::Bottom => n.saturating_sub(1),
                    };
                    a_log
                        .narrow(1, col, 1)?
                        .broadcast_as((e, self.n_add))?
                        .contiguous()?
                }
                AInit::S4d => {
                    let v: Vec<f32> = (0..self.n_add).map(|j| ((n + 1 + j) as f32).ln()).collect();
                    Tensor::from_vec(v, (1, self.n_add), rng.device())?
                        .broadcast_as((e, self.n_add))?
                        .contiguous()?
                }
                AInit::Constant => {
                    (Tensor::ones((e, self.n_add), candle_core::DType::F32, rng.device())?
                        * self.a_value.ln())?
                }
            };
            out.push((a_name, a.to_dtype(rng.dtype())?));
            let w = if self.zero_init_x_proj {
                rng.zeros(&[2 * self.n_add, e])?
            } else {
                rng.kaiming_uniform(&w_name, &[2 * self.n_add, e], e)?
            };
            out.push((w_name, w));
        }
        Ok(out)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let n = sites.config().state_size;
        for (i, dir) in sites.config().proj_copies(Proj::X) {
            let (a, w) = names(i, dir);
            sites.add_param(
                ParamSite::Mixer(i, Slot::ALog, dir),
                Arc::new(ExtraColumns {
                    a: params.get(&a)?,
                    placement: self.placement,
                }),
            );
            sites.add_linear(
                i,
                Proj::X,
                dir,
                Arc::new(ExtraRows {
                    w: params.get(&w)?,
                    n,
                    n_add: self.n_add,
                    placement: self.placement,
                }),
            );
        }
        Ok(())
    }

    fn groups(
        &self,
        index: usize,
        params: Vec<(String, candle_core::Var)>,
        _base: &dyn PeftBase,
    ) -> PeftResult<Vec<ParamGroup>> {
        let (a, w): (Vec<_>, Vec<_>) = params
            .into_iter()
            .partition(|(n, _)| n.ends_with("_log_scan_addi"));
        Ok(vec![
            ParamGroup {
                name: format!("{index}:additional_scan"),
                params: w,
                lr: self.lr,
                weight_decay: self.weight_decay,
                decay_toward: None,
            },
            ParamGroup {
                name: format!("{index}:additional_scan.A_log"),
                params: a,
                lr: self.lr,
                weight_decay: 0.0,
                decay_toward: None,
            },
        ])
    }
}

/// A_log → [A_new | A_log] (top) or [A_log | A_new] (bottom).
#[derive(Debug)]
struct ExtraColumns {
    a: Tensor,
    placement: Placement,
}

impl ParamPart for ExtraColumns {
    fn stage(&self) -> Stage {
        Stage::Extend
    }

    fn value(&self, current: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(current.dtype())?;
        match self.placement {
            Placement::Top => Tensor::cat(&[&a, current], 1),
            Placement::Bottom => Tensor::cat(&[current, &a], 1),
        }
    }
}

/// x_proj's output [dt; B; C] → [dt; B_ext; C_ext] with the new rows' B_new, C_new.
#[derive(Debug)]
struct ExtraRows {
    w: Tensor,
    n: usize,
    n_add: usize,
    placement: Placement,
}

impl ExtraRows {
    /// Interleaves `old` = [dt; B; C] and `new` = [B_new; C_new] along `dim`.
    fn assemble(&self, old: &Tensor, new: &Tensor, dim: usize) -> Result<Tensor> {
        let (n, k) = (self.n, self.n_add);
        let r = old.dim(dim)?.checked_sub(2 * n).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "additional_scan: x_proj has {} outputs, fewer than 2·state_size = {}",
                old.dim(dim).unwrap_or(0),
                2 * n
            ))
        })?;
        let dt = old.narrow(dim, 0, r)?;
        let b = old.narrow(dim, r, n)?;
        let c = old.narrow(dim, r + n, n)?;
        let b_new = new.narrow(dim, 0, k)?;
        let c_new = new.narrow(dim, k, k)?;
        match self.placement {
            Placement::Top => Tensor::cat(&[&dt, &b_new, &b, &c_new, &c], dim),
            Placement::Bottom => Tensor::cat(&[&dt, &b, &b_new, &c, &c_new], dim),
        }
    }
}

impl LinearPart for ExtraRows {
    fn stage(&self) -> Stage {
        Stage::Extend
    }

    fn output(&self, x: &Tensor, y: Tensor, _rt: &Runtime) -> Result<Tensor> {
        let new = linear_forward(x, &self.w.to_dtype(x.dtype())?, None)?;
        let dim = y.rank() - 1;
        self.assemble(&y, &new, dim)
    }

    fn merge(&self, w: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.assemble(w, &self.w.to_dtype(w.dtype())?, 0)?))
    }
}
