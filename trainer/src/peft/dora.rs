//! DoRA in two flavours (spec §3.5, §4.5):
//! - `dora` (HF PEFT): one magnitude per **output row**, W' = diag(m/‖V‖_row)·V,
//!   V = W + scale·B·A, scale = α/r.
//! - `dora_p` (MambaPEFT): on one row slice (X by default), one magnitude per **input
//!   column**, W'_slice = V·diag(m/‖V‖_col), V = W_slice + s·B·A.
//!
//! In both the norm is detached (a constant in backprop, DoRA paper §4.3), and the
//! magnitude starts at the norm of W, so W' = W at init. Both are weight transforms: the
//! whole W' is formed per forward (cheap next to the sequence GEMMs).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::lora::{LoraTarget, Slice, check_rank, check_scale, lora_p_names};
use super::sites::{Dir, LinearPart, Proj, Sites, Stage, f32};
use super::spec::one_or_many;
use super::target::{ModelShape, PeftBase, base_weight};
use super::{ParamShape, Params, PeftMethod};

pub(crate) const DORA_TARGETS: &[&str] = &["in_proj", "x_proj", "dt_proj", "out_proj"];

fn default_dora_r() -> usize {
    16
}
fn default_true() -> bool {
    true
}

/// `{"type": "dora", "targets": ["in_proj", "out_proj"], "r": 16, "alpha": 16}` (ProDiaL's
/// DoRA baseline: r = α = 16). `alpha` absent = `r` (scale 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoraConfig {
    #[serde(alias = "target", deserialize_with = "one_or_many")]
    pub targets: Vec<String>,
    #[serde(default = "default_dora_r")]
    pub r: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default = "default_true")]
    pub zero_init: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl DoraConfig {
    pub(crate) fn parsed_targets(&self) -> PeftResult<Vec<Proj>> {
        self.targets
            .iter()
            .map(|t| match LoraTarget::parse("dora", t, DORA_TARGETS)? {
                LoraTarget::Proj(p) => Ok(p),
                LoraTarget::Embedding | LoraTarget::PatchEmbed => Err(PeftError::UnknownTarget {
                    method: "dora".into(),
                    target: t.clone(),
                    valid: DORA_TARGETS.iter().map(|s| s.to_string()).collect(),
                }),
            })
            .collect()
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.r as f64)
    }

    pub fn scale(&self) -> f64 {
        self.alpha() / self.r.max(1) as f64
    }
}

pub(crate) fn dora_names(p: Proj, i: usize, dir: Dir) -> [String; 3] {
    let pre = format!("layers.{i}.{}.dora", p.site_name(dir));
    [
        format!("{pre}.lora_A"),
        format!("{pre}.lora_B"),
        format!("{pre}.magnitude"),
    ]
}

/// Row (`dim` 1) or column (`dim` 0) L2 norms of a 2-D tensor, in f32.
fn norms(w: &Tensor, dim: usize) -> Result<Tensor> {
    f32(w)?.sqr()?.sum(dim)?.sqrt()
}

impl PeftMethod for DoraConfig {
    fn kind(&self) -> &'static str {
        "dora"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        let targets = self.parsed_targets()?;
        if targets.is_empty() {
            return Err(PeftError::UnknownTarget {
                method: "dora".into(),
                target: "(none)".into(),
                valid: DORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            });
        }
        for (k, p) in targets.iter().enumerate() {
            cfg.require_proj("dora", *p)?;
            if targets[..k].contains(p) {
                return Err(PeftError::Contradictory(format!(
                    "dora: target `{}` listed twice",
                    p.name()
                )));
            }
            let (o, i) = p.shape(cfg);
            check_rank("dora", p.name(), self.r, o, i)?;
        }
        check_scale("dora", "alpha", self.alpha())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let Ok(targets) = self.parsed_targets() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in targets {
            let (o, i) = p.shape(cfg);
            for (layer, dir) in cfg.proj_copies(p) {
                let [a, b, m] = dora_names(p, layer, dir);
                out.push((a, vec![self.r, i]));
                out.push((b, vec![o, self.r]));
                out.push((m, vec![o]));
            }
        }
        out
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in self.parsed_targets()? {
            for (layer, dir) in base.peft_shape().proj_copies(p) {
                let w = base_weight(base, layer, p, dir)?;
                let (o, i) = w.dims2()?;
                let [a, b, m] = dora_names(p, layer, dir);
                out.push((a.clone(), rng.kaiming_uniform(&a, &[self.r, i], i)?));
                let bt = if self.zero_init {
                    rng.zeros(&[o, self.r])?
                } else {
                    rng.kaiming_uniform(&b, &[o, self.r], self.r)?
                };
                out.push((b, bt));
                out.push((m, norms(&w, 1)?.to_dtype(rng.dtype())?));
            }
        }
        Ok(out)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        for p in self.parsed_targets()? {
            for (i, dir) in sites.config().proj_copies(p) {
                let [a, b, m] = dora_names(p, i, dir);
                sites.add_linear(
                    i,
                    p,
                    dir,
                    Arc::new(DoraRows {
                        a: params.get(&a)?,
                        b: params.get(&b)?,
                        m: params.get(&m)?,
                        scale: self.scale(),
                    }),
                );
            }
        }
        Ok(())
    }
}

/// PEFT DoRA: W' = diag(m / ‖W + s·BA‖_row) · (W + s·BA), norm detached.
#[derive(Debug)]
struct DoraRows {
    a: Tensor,
    b: Tensor,
    m: Tensor,
    scale: f64,
}

impl LinearPart for DoraRows {
    fn stage(&self) -> Stage {
        Stage::Transform
    }

    fn weight(&self, w: &Tensor) -> Result<Tensor> {
        let v = (w + (self.b.matmul(&self.a)? * self.scale)?.to_dtype(w.dtype())?)?;
        let n = norms(&v, 1)?.detach();
        let factor = (f32(&self.m)? / n)?.to_dtype(w.dtype())?;
        v.broadcast_mul(&factor.unsqueeze(1)?)
    }
}

fn default_slice() -> String {
    "X".into()
}
fn default_r_p() -> usize {
    64
}
fn default_s() -> f64 {
    0.1
}

/// `{"type": "dora_p", "slice": "X", "r": 64, "s": 0.1}` (MambaPEFT App. A.8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoraPConfig {
    #[serde(default = "default_slice", alias = "target")]
    pub slice: String,
    #[serde(default = "default_r_p")]
    pub r: usize,
    #[serde(default = "default_s")]
    pub s: f64,
    #[serde(default = "default_true")]
    pub zero_init: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

fn dora_p_names(cfg: &ModelShape, slice: Slice, i: usize, dir: Dir) -> [String; 3] {
    let (a, b) = lora_p_names(cfg, slice, i, dir, "dora_p");
    let m = format!(
        "layers.{i}.{}.dora_p_{}.magnitude",
        slice.proj(cfg).site_name(dir),
        slice.name()
    );
    [a, b, m]
}

impl PeftMethod for DoraPConfig {
    fn kind(&self) -> &'static str {
        "dora_p"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        let slice = Slice::parse("dora_p", &self.slice)?;
        let (_, len) = slice.rows(cfg);
        let (_, inp) = slice.proj(cfg).shape(cfg);
        check_rank(
            "dora_p",
            &format!("the {} slice of {}", slice.name(), slice.proj(cfg).name()),
            self.r,
            len,
            inp,
        )?;
        check_scale("dora_p", "s", self.s)
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let Ok(slice) = Slice::parse("dora_p", &self.slice) else {
            return Vec::new();
        };
        let (_, len) = slice.rows(cfg);
        let (_, inp) = slice.proj(cfg).shape(cfg);
        cfg.proj_copies(slice.proj(cfg))
            .into_iter()
            .flat_map(|(i, dir)| {
                let [a, b, m] = dora_p_names(cfg, slice, i, dir);
                [
                    (a, vec![self.r, inp]),
                    (b, vec![len, self.r]),
                    (m, vec![inp]),
                ]
            })
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let slice = Slice::parse("dora_p", &self.slice)?;
        let shape = base.peft_shape();
        let (start, len) = slice.rows(&shape);
        let mut out = Vec::new();
        for (i, dir) in shape.proj_copies(slice.proj(&shape)) {
            let w = base_weight(base, i, slice.proj(&shape), dir)?.narrow(0, start, len)?;
            let inp = w.dim(1)?;
            let [a, b, m] = dora_p_names(&shape, slice, i, dir);
            out.push((a.clone(), rng.kaiming_uniform(&a, &[self.r, inp], inp)?));
            let bt = if self.zero_init {
                rng.zeros(&[len, self.r])?
            } else {
                rng.kaiming_uniform(&b, &[len, self.r], self.r)?
            };
            out.push((b, bt));
            // One magnitude per input column: the column norms of W_slice (§4.5).
            out.push((m, norms(&w, 0)?.to_dtype(rng.dtype())?));
        }
        Ok(out)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let slice = Slice::parse("dora_p", &self.slice)?;
        let cfg = sites.config().clone();
        let (start, len) = slice.rows(&cfg);
        for (i, dir) in cfg.proj_copies(slice.proj(&cfg)) {
            let [a, b, m] = dora_p_names(&cfg, slice, i, dir);
            sites.add_linear(
                i,
                slice.proj(&cfg),
                dir,
                Arc::new(DoraColumns {
                    a: params.get(&a)?,
                    b: params.get(&b)?,
                    m: params.get(&m)?,
                    scale: self.s,
                    start,
                    len,
                }),
            );
        }
        Ok(())
    }
}

/// MambaPEFT DoRA on rows [start, start+len): W'_slice = V·diag(m/‖V‖_col), norm detached.
#[derive(Debug)]
struct DoraColumns {
    a: Tensor,
    b: Tensor,
    m: Tensor,
    scale: f64,
    start: usize,
    len: usize,
}

impl LinearPart for DoraColumns {
    fn stage(&self) -> Stage {
        Stage::Transform
    }

    fn weight(&self, w: &Tensor) -> Result<Tensor> {
        let rows = w.narrow(0, self.start, self.len)?;
        let v = (rows + (self.b.matmul(&self.a)? * self.scale)?.to_dtype(w.dtype())?)?;
        let n = norms(&v, 0)?.detach();
        let factor = (f32(&self.m)? / n)?.to_dtype(w.dtype())?;
        let new_rows = v.broadcast_mul(&factor.unsqueeze(0)?)?;
        let total = w.dim(0)?;
        let mut parts = Vec::with_capacity(3);
        if self.start > 0 {
            parts.push(w.narrow(0, 0, self.start)?);
        }
        parts.push(new_rows);
        let end = self.start + self.len;
        if end < total {
            parts.push(w.narrow(0, end, total - end)?);
        }
        Tensor::cat(&parts, 0)
    }
}
