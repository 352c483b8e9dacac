//! LoRA on a whole projection or the token embedding (spec §4.2, §4.4), and partial LoRA on
//! one row slice of in_proj or x_proj (LoRA_p, §4.3).
//!
//! ΔW = scale·B·A with A `(r, in)` Uniform(±1/√in) and B `(out, r)` zeros, so the adapter
//! starts as the identity change. Scale: MambaPEFT's plain `s` by default; PEFT's α/r when
//! `alpha` is given. Forward on the activation path, y += scale·B(A·drop(x)), which equals the
//! weight path W + scale·BA that MambaPEFT uses for x_proj/dt_proj (dropout is 0 there).
//! LoRA(dt_proj) acts on `dt_proj.weight` in both forward and merge (PEFT's unmerged
//! forward skips it on HF Mamba; see the fixtures README).
//!
//! On a vision model, LoRA on the patch embedding (§4.4, MambaPEFT's Conv2dAdapter): down =
//! a conv with the patch kernel and stride (`patch_embed.lora_A` `[r, C, p, p]`), up = a 1×1
//! conv (`patch_embed.lora_B` `[D, r]`), dropout between; written as one more low-rank term on
//! the flattened kernel, so it merges as kernel += s·up·down.

use std::sync::Arc;

use candle_core::{D, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::sites::{Dir, EmbeddingPart, LinearPart, LinearSite, Proj, Runtime, Sites, Stage, dims};
use super::spec::{check_float, check_range, one_or_many};
use super::target::{ModelShape, PeftBase};
use super::{ParamShape, Params, PeftMethod};
use crate::model::layers::{LowRankTerm, embedding_lookup, linear_forward};

/// A whole-matrix LoRA target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraTarget {
    Embedding,
    /// A vision model's patch embedding.
    PatchEmbed,
    Proj(Proj),
}

pub(crate) const LORA_TARGETS: &[&str] = &[
    "embedding",
    "in_proj",
    "x_proj",
    "dt_proj",
    "out_proj",
    // Vision models only (`validate` refuses it elsewhere, naming the family).
    "patch_embed",
];

impl LoraTarget {
    pub fn parse(method: &str, s: &str, valid: &[&str]) -> PeftResult<Self> {
        let t = match s {
            "embedding" | "embeddings" => LoraTarget::Embedding,
            "patch_embed" => LoraTarget::PatchEmbed,
            "in_proj" => LoraTarget::Proj(Proj::In),
            "x_proj" => LoraTarget::Proj(Proj::X),
            "dt_proj" => LoraTarget::Proj(Proj::Dt),
            "out_proj" => LoraTarget::Proj(Proj::Out),
            _ => {
                return Err(PeftError::UnknownTarget {
                    method: method.into(),
                    target: s.into(),
                    valid: valid.iter().map(|v| v.to_string()).collect(),
                });
            }
        };
        if !valid.contains(&t.name()) {
            return Err(PeftError::UnknownTarget {
                method: method.into(),
                target: s.into(),
                valid: valid.iter().map(|v| v.to_string()).collect(),
            });
        }
        Ok(t)
    }

    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Embedding => "embedding",
            LoraTarget::PatchEmbed => "patch_embed",
            LoraTarget::Proj(p) => p.name(),
        }
    }

    /// (out, in) of the adapted matrix; for the embedding (vocab, hidden), vocab 0 on a
    /// family without tokens (refused by `validate`).
    fn shape(self, cfg: &ModelShape) -> (usize, usize) {
        match self {
            LoraTarget::Embedding => (cfg.vocab_size.unwrap_or(0), cfg.hidden_size),
            LoraTarget::PatchEmbed => (cfg.hidden_size, patch_inputs(cfg)),
            LoraTarget::Proj(p) => p.shape(cfg),
        }
    }

    /// Released defaults (spec §4.2, §4.4): rank, plain scale, dropout (activation path
    /// on in_proj only; the weight path elsewhere in the language code).
    fn defaults(self) -> (usize, f64, f64) {
        match self {
            LoraTarget::Embedding => (32, 1.0, 0.0),
            LoraTarget::PatchEmbed => (32, 1.0, 0.1),
            LoraTarget::Proj(Proj::In) => (32, 0.1, 0.1),
            LoraTarget::Proj(Proj::X) => (64, 0.1, 0.0),
            LoraTarget::Proj(Proj::Dt) => (64, 0.1, 0.0),
            LoraTarget::Proj(Proj::Out) => (96, 0.1, 0.0),
        }
    }
}

fn default_true() -> bool {
    true
}

/// `{"type": "lora", "targets": "in_proj" | [...], "r", "s" | "alpha", "dropout", "lr",
/// "weight_decay"}`. Absent `r`, `s`, `dropout` take each target's released default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(alias = "target", deserialize_with = "one_or_many")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// MambaPEFT's plain multiplier: ΔW = s·B·A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<f64>,
    /// PEFT's convention: ΔW = (alpha/r)·B·A (or alpha/√r with `use_rslora`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_rslora: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Zero-init B (function-preserving start). `false` draws B like A (tests only).
    #[serde(default = "default_true")]
    pub zero_init: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl LoraConfig {
    pub fn new(targets: &[&str], r: usize, s: f64) -> Self {
        LoraConfig {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            r: Some(r),
            s: Some(s),
            alpha: None,
            use_rslora: false,
            dropout: None,
            zero_init: true,
            lr: None,
            weight_decay: 0.0,
        }
    }

    pub(crate) fn parsed_targets(&self) -> PeftResult<Vec<LoraTarget>> {
        self.targets
            .iter()
            .map(|t| LoraTarget::parse("lora", t, LORA_TARGETS))
            .collect()
    }

    pub(crate) fn rank(&self, t: LoraTarget) -> usize {
        self.r.unwrap_or(t.defaults().0)
    }

    pub(crate) fn scale(&self, t: LoraTarget) -> f64 {
        let r = self.rank(t).max(1) as f64;
        match self.alpha {
            Some(a) if self.use_rslora => a / r.sqrt(),
            Some(a) => a / r,
            None => self.s.unwrap_or(t.defaults().1),
        }
    }

    fn dropout_for(&self, t: LoraTarget) -> f64 {
        self.dropout.unwrap_or(t.defaults().2)
    }

    /// Whether this LoRA uses PEFT's α/r convention (and so PEFT's file layout).
    pub fn is_peft_convention(&self) -> bool {
        self.alpha.is_some()
    }
}

/// Tensor names of a whole-matrix LoRA on `t` in layer `i`, direction `dir` (`None` for the
/// embedding).
pub(crate) fn lora_names(t: LoraTarget, at: Option<(usize, Dir)>) -> (String, String) {
    match (t, at) {
        (LoraTarget::PatchEmbed, _) => ("patch_embed.lora_A".into(), "patch_embed.lora_B".into()),
        (LoraTarget::Embedding, _) | (_, None) => {
            ("embeddings.lora_A".into(), "embeddings.lora_B".into())
        }
        (LoraTarget::Proj(p), Some((i, dir))) => (
            format!("layers.{i}.{}.lora_A", p.site_name(dir)),
            format!("layers.{i}.{}.lora_B", p.site_name(dir)),
        ),
    }
}

/// The largest rank any LoRA-style factor may have: far above the papers' ranks (≤ 128)
/// and small enough that a typo cannot allocate vocab × rank gigabytes.
pub(crate) const MAX_RANK: usize = 1024;

/// Rank bounds: at least 1, at most the larger side of the matrix (more is pointless; the
/// papers' over-parameterised ranks, e.g. 64 on dt_proj's 48 inputs, stay inside) and at
/// most [`MAX_RANK`].
pub(crate) fn check_rank(
    method: &str,
    target: &str,
    r: usize,
    out: usize,
    inp: usize,
) -> PeftResult<()> {
    check_range(
        method,
        "r",
        &format!("{target} ({out}×{inp})"),
        r,
        1,
        out.max(inp).min(MAX_RANK),
    )
}

pub(crate) fn check_dropout(method: &str, p: f64) -> PeftResult<()> {
    check_float(method, "dropout", p, 0.0, 0.999, "a probability in [0, 1)")
}

pub(crate) fn check_scale(method: &str, field: &str, s: f64) -> PeftResult<()> {
    check_float(method, field, s, -1e6, 1e6, "a finite number")
}

impl PeftMethod for LoraConfig {
    fn kind(&self) -> &'static str {
        "lora"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        if self.targets.is_empty() {
            return Err(PeftError::UnknownTarget {
                method: "lora".into(),
                target: "(none)".into(),
                valid: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            });
        }
        if self.s.is_some() && self.alpha.is_some() {
            return Err(PeftError::Contradictory(
                "lora: give either `s` (MambaPEFT's plain scale) or `alpha` (PEFT's alpha/r), \
                 not both"
                    .into(),
            ));
        }
        if self.use_rslora && self.alpha.is_none() {
            return Err(PeftError::Contradictory(
                "lora: `use_rslora` scales alpha/sqrt(r) and needs `alpha`".into(),
            ));
        }
        let targets = self.parsed_targets()?;
        for (k, t) in targets.iter().enumerate() {
            if targets[..k].contains(t) {
                return Err(PeftError::Contradictory(format!(
                    "lora: target `{}` listed twice",
                    t.name()
                )));
            }
            if *t == LoraTarget::Embedding {
                cfg.vocab("lora on the embedding")?;
            }
            if let LoraTarget::Proj(p) = t {
                cfg.require_proj("lora", *p)?;
            }
            if *t == LoraTarget::PatchEmbed && cfg.vision.is_none() {
                return Err(PeftError::unsupported(
                    "lora on patch_embed",
                    cfg.family,
                    "it has no patch embedding (its token embedding is `embedding`)",
                ));
            }
            let (out, inp) = t.shape(cfg);
            check_rank("lora", t.name(), self.rank(*t), out, inp)?;
            check_scale("lora", "scale", self.scale(*t))?;
            check_dropout("lora", self.dropout_for(*t))?;
            if *t == LoraTarget::Embedding && self.dropout.unwrap_or(0.0) > 0.0 {
                return Err(PeftError::Contradictory(
                    "lora: the embedding LoRA has no dropout (spec §4.4); drop `dropout` or \
                     the embedding target"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let Ok(targets) = self.parsed_targets() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in targets {
            let r = self.rank(t);
            let (o, i) = t.shape(cfg);
            match t {
                LoraTarget::Embedding => {
                    let (a, b) = lora_names(t, None);
                    out.push((a, vec![o, r]));
                    out.push((b, vec![r, i]));
                }
                LoraTarget::PatchEmbed => {
                    let (a, b) = lora_names(t, None);
                    let (c, p) = cfg.vision.map_or((0, 0), |v| (v.channels, v.patch_size));
                    out.push((a, vec![r, c, p, p]));
                    out.push((b, vec![o, r]));
                }
                LoraTarget::Proj(p) => {
                    for at in cfg.proj_copies(p) {
                        let (a, b) = lora_names(t, Some(at));
                        out.push((a, vec![r, i]));
                        out.push((b, vec![o, r]));
                    }
                }
            }
        }
        out
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, shape) in self.parameters(&base.peft_shape()) {
            let is_a = name.ends_with("lora_A");
            let t = if name.starts_with("embeddings.") {
                // MambaPEFT's EmbedAdapter: A (V, r) ~ N(0, 1), B zeros.
                if is_a || !self.zero_init {
                    rng.normal(&name, &shape, 1.0)?
                } else {
                    rng.zeros(&shape)?
                }
            } else if is_a || !self.zero_init {
                // Fan-in: every input of one output (the whole kernel for the patch conv).
                let fan_in = shape.iter().skip(1).product::<usize>().max(1);
                rng.kaiming_uniform(&name, &shape, fan_in)?
            } else {
                rng.zeros(&shape)?
            };
            out.push((name, t));
        }
        Ok(out)
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        for t in self.parsed_targets()? {
            let scale = self.scale(t);
            match t {
                LoraTarget::Embedding => {
                    let (a, b) = lora_names(t, None);
                    sites.add_embedding(Arc::new(EmbeddingLora {
                        a: params.get(&a)?,
                        b: params.get(&b)?,
                        scale,
                    }));
                }
                LoraTarget::PatchEmbed => {
                    let (a, b) = lora_names(t, None);
                    let (_, inputs) = t.shape(sites.config());
                    let a = params.get(&a)?;
                    let r = a.dim(0)?;
                    sites.add_site_linear(
                        LinearSite::PatchEmbed,
                        Arc::new(PatchLora {
                            down: a.reshape((r, inputs))?,
                            up: params.get(&b)?,
                            scale,
                            dropout: self.dropout_for(t),
                        }),
                    );
                }
                LoraTarget::Proj(p) => {
                    let (out, _) = p.shape(sites.config());
                    for (i, dir) in sites.config().proj_copies(p) {
                        let (a, b) = lora_names(t, Some((i, dir)));
                        sites.add_linear(
                            i,
                            p,
                            dir,
                            Arc::new(LowRank {
                                a: params.get(&a)?,
                                b: params.get(&b)?,
                                scale,
                                dropout: self.dropout_for(t),
                                rows: (0, out, out),
                            }),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// `y[rows] += scale·B(A·drop(x))`; `rows` = (start, len, total output width).
#[derive(Debug)]
pub(crate) struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    pub rows: (usize, usize, usize),
}

impl LinearPart for LowRank {
    fn stage(&self) -> Stage {
        Stage::Add
    }

    fn low_rank(&self) -> Option<LowRankTerm> {
        Some(LowRankTerm {
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
            rows: self.rows,
        })
    }

    fn output(&self, x: &Tensor, y: Tensor, rt: &Runtime) -> Result<Tensor> {
        let x = rt.dropout(x, self.dropout)?;
        let low = linear_forward(&linear_forward(&x, &self.a, None)?, &self.b, None)?;
        let low = (low * self.scale)?;
        let (start, len, total) = self.rows;
        let low = if len == total {
            low
        } else {
            low.pad_with_zeros(D::Minus1, start, total - start - len)?
        };
        y + low
    }

    fn merge(&self, w: &Tensor) -> Result<Option<Tensor>> {
        let delta = (self.b.matmul(&self.a)? * self.scale)?;
        let (start, len, total) = self.rows;
        let delta = if len == total {
            delta
        } else {
            delta.pad_with_zeros(0, start, total - start - len)?
        };
        Ok(Some((w + delta.to_dtype(w.dtype())?)?))
    }
}

/// Inputs of one patch: C·p·p (0 for a model without patches).
fn patch_inputs(cfg: &ModelShape) -> usize {
    cfg.vision
        .map_or(0, |v| v.channels * v.patch_size * v.patch_size)
}

/// The patch embedding's LoRA on the flattened kernel: y += s·up(drop(down·x)), dropout
/// between the two convolutions as MambaPEFT's Conv2dAdapter has it.
#[derive(Debug)]
pub(crate) struct PatchLora {
    /// `[r, C·p·p]`.
    down: Tensor,
    /// `[D, r]`.
    up: Tensor,
    scale: f64,
    dropout: f64,
}

impl LinearPart for PatchLora {
    fn stage(&self) -> Stage {
        Stage::Add
    }

    fn output(&self, x: &Tensor, y: Tensor, rt: &Runtime) -> Result<Tensor> {
        let h = rt.dropout(&linear_forward(x, &self.down, None)?, self.dropout)?;
        y + (linear_forward(&h, &self.up, None)? * self.scale)?
    }

    fn merge(&self, w: &Tensor) -> Result<Option<Tensor>> {
        let delta = (self.up.matmul(&self.down)? * self.scale)?;
        Ok(Some((w + delta.to_dtype(w.dtype())?)?))
    }
}

/// e_t += scale·A[id_t]·B with A `(V, r)`, B `(r, D)`; the tied head is untouched.
#[derive(Debug)]
pub(crate) struct EmbeddingLora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl EmbeddingPart for EmbeddingLora {
    fn output(&self, ids: &Tensor, e: Tensor) -> Result<Tensor> {
        let rows = embedding_lookup(&self.a, ids)?;
        let r = self.b.dim(0)?;
        let mut dims = rows.dims().to_vec();
        let lead: usize = dims.iter().rev().skip(1).product();
        let low = rows.reshape((lead, r))?.matmul(&self.b)?;
        if let Some(last) = dims.last_mut() {
            *last = self.b.dim(1)?;
        }
        e + (low.reshape(dims)? * self.scale)?
    }

    fn merge(&self, w: &Tensor) -> Result<Tensor> {
        w + (self.a.matmul(&self.b)? * self.scale)?.to_dtype(w.dtype())?
    }
}

/// A row slice of in_proj (X, Z) or x_proj (dt, B, C); on Mamba-2 every slice is a row
/// block of in_proj (`z | x | B | C | dt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slice {
    X,
    Z,
    Dt,
    B,
    C,
}

pub(crate) const SLICES: &[&str] = &["X", "Z", "dt", "B", "C"];

impl Slice {
    pub fn parse(method: &str, s: &str) -> PeftResult<Self> {
        Ok(match s {
            "X" | "x" => Slice::X,
            "Z" | "z" => Slice::Z,
            "dt" | "d" | "delta" => Slice::Dt,
            "B" | "b" => Slice::B,
            "C" | "c" => Slice::C,
            _ => {
                return Err(PeftError::UnknownTarget {
                    method: method.into(),
                    target: s.into(),
                    valid: SLICES.iter().map(|v| v.to_string()).collect(),
                });
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Slice::X => "X",
            Slice::Z => "Z",
            Slice::Dt => "dt",
            Slice::B => "B",
            Slice::C => "C",
        }
    }

    /// The projection holding the slice in a model of shape `cfg`.
    pub fn proj(self, cfg: &ModelShape) -> Proj {
        match self {
            Slice::X | Slice::Z => Proj::In,
            _ if cfg.ssd.is_some() => Proj::In,
            _ => Proj::X,
        }
    }

    /// (start, len) of the slice's rows.
    pub fn rows(self, cfg: &ModelShape) -> (usize, usize) {
        let (_, e, n, r) = dims(cfg);
        if let Some(ssd) = cfg.ssd {
            let gn = ssd.groups * n;
            return match self {
                Slice::Z => (0, e),
                Slice::X => (e, e),
                Slice::B => (2 * e, gn),
                Slice::C => (2 * e + gn, gn),
                Slice::Dt => (2 * e + 2 * gn, ssd.heads),
            };
        }
        match self {
            Slice::X => (0, e),
            Slice::Z => (e, e),
            Slice::Dt => (0, r),
            Slice::B => (r, n),
            Slice::C => (r + n, n),
        }
    }

    /// Activation path with dropout on in_proj's X and Z slices, weight path on the others
    /// (§4.3).
    fn default_dropout(self) -> f64 {
        match self {
            Slice::X | Slice::Z => 0.1,
            _ => 0.0,
        }
    }
}

fn default_r_p() -> usize {
    64
}
fn default_s() -> f64 {
    0.1
}

/// `{"type": "lora_p", "slice": "X" | "Z" | "dt" | "B" | "C", "r": 64, "s": 0.1, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraPConfig {
    #[serde(alias = "target")]
    pub slice: String,
    #[serde(default = "default_r_p")]
    pub r: usize,
    #[serde(default = "default_s")]
    pub s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    #[serde(default = "default_true")]
    pub zero_init: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl LoraPConfig {
    pub fn new(slice: &str, r: usize, s: f64) -> Self {
        LoraPConfig {
            slice: slice.into(),
            r,
            s,
            dropout: None,
            zero_init: true,
            lr: None,
            weight_decay: 0.0,
        }
    }
}

pub(crate) fn lora_p_names(
    cfg: &ModelShape,
    slice: Slice,
    i: usize,
    dir: Dir,
    kind: &str,
) -> (String, String) {
    let p = format!(
        "layers.{i}.{}.{kind}_{}",
        slice.proj(cfg).site_name(dir),
        slice.name()
    );
    (format!("{p}.lora_A"), format!("{p}.lora_B"))
}

impl PeftMethod for LoraPConfig {
    fn kind(&self) -> &'static str {
        "lora_p"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        let slice = Slice::parse("lora_p", &self.slice)?;
        let (_, len) = slice.rows(cfg);
        let (_, inp) = slice.proj(cfg).shape(cfg);
        check_rank(
            "lora_p",
            &format!("the {} slice of {}", slice.name(), slice.proj(cfg).name()),
            self.r,
            len,
            inp,
        )?;
        check_scale("lora_p", "s", self.s)?;
        check_dropout("lora_p", self.dropout.unwrap_or(slice.default_dropout()))
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let Ok(slice) = Slice::parse("lora_p", &self.slice) else {
            return Vec::new();
        };
        let (_, len) = slice.rows(cfg);
        let (_, inp) = slice.proj(cfg).shape(cfg);
        cfg.proj_copies(slice.proj(cfg))
            .into_iter()
            .flat_map(|(i, dir)| {
                let (a, b) = lora_p_names(cfg, slice, i, dir, "lora_p");
                [(a, vec![self.r, inp]), (b, vec![len, self.r])]
            })
            .collect()
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        self.parameters(&base.peft_shape())
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("lora_A") || !self.zero_init {
                    let fan_in = shape.get(1).copied().unwrap_or(1);
                    rng.kaiming_uniform(&name, &shape, fan_in)?
                } else {
                    rng.zeros(&shape)?
                };
                Ok((name, t))
            })
            .collect()
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let slice = Slice::parse("lora_p", &self.slice)?;
        let cfg = sites.config().clone();
        let (start, len) = slice.rows(&cfg);
        let (total, _) = slice.proj(&cfg).shape(&cfg);
        for (i, dir) in cfg.proj_copies(slice.proj(&cfg)) {
            let (a, b) = lora_p_names(&cfg, slice, i, dir, "lora_p");
            sites.add_linear(
                i,
                slice.proj(&cfg),
                dir,
                Arc::new(LowRank {
                    a: params.get(&a)?,
                    b: params.get(&b)?,
                    scale: self.s,
                    dropout: self.dropout.unwrap_or(slice.default_dropout()),
                    rows: (start, len, total),
                }),
            );
        }
        Ok(())
    }
}
