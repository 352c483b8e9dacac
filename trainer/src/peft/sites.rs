//! Where methods attach: [`Sites`] collects every method's parts per seam, then folds each
//! seam's parts into one composite adapter of `model::layers` (so any set of methods stacks),
//! and reads the merged value of each composite back (so merging reuses the forward's code).
//!
//! Order inside one seam: weight transforms (ProDiaL's diag(s)·W·D_b, DoRA's normalised
//! weight), then additive output terms (LoRA, ParallelAdapter), then extensions that add
//! outputs (Additional-scan's new B/C rows). For parameters: in-shape changes (`+δ`) before
//! extensions (extra A columns), so A-tuning acts on the original columns only (spec §4.9).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::layers::{
    Embedding, EmbeddingAdapter, Linear, LinearAdapter, LowRankTerm, ParamAdapter, linear_forward,
};
use crate::model::{InputHook, MixerHook};

use super::error::{PeftError, PeftResult};
use super::target::{Extras, ModelShape, PeftBase, PeftModel};

/// A scan direction. Mamba-1 has only `Fwd`; Vim's backward copies are `Bwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    Fwd,
    Bwd,
}

/// The four projections of a mixer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    In,
    X,
    Dt,
    Out,
}

impl Proj {
    pub fn name(self) -> &'static str {
        match self {
            Proj::In => "in_proj",
            Proj::X => "x_proj",
            Proj::Dt => "dt_proj",
            Proj::Out => "out_proj",
        }
    }

    /// The checkpoint name of this projection's copy in direction `dir`: `x_proj`,
    /// `x_proj_b`, … (shared projectors have one copy, under the plain name).
    pub fn site_name(self, dir: Dir) -> String {
        match dir {
            Dir::Fwd => self.name().to_string(),
            Dir::Bwd => format!("{}_b", self.name()),
        }
    }

    /// `(out, in)` of the projection's weight.
    pub fn shape(self, cfg: &ModelShape) -> (usize, usize) {
        let (d, e, n, r) = dims(cfg);
        match self {
            Proj::In => (cfg.in_proj_rows(), d),
            Proj::X => (r + 2 * n, e),
            Proj::Dt => (e, r),
            Proj::Out => (d, e),
        }
    }
}

/// The tensor parameters of a mixer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    ALog,
    D,
    ConvWeight,
    ConvBias,
    /// Mamba-1's per-channel dt bias (`dt_proj.bias`).
    DtBias,
    /// Mamba-2's per-head dt bias (`dt_bias`).
    HeadDtBias,
    /// Mamba-2's gated RMSNorm weight (`norm.weight`).
    Norm,
}

impl Slot {
    /// The name inside `backbone.layers.{i}.mixer.`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::ALog => "A_log",
            Slot::D => "D",
            Slot::ConvWeight => "conv1d.weight",
            Slot::ConvBias => "conv1d.bias",
            Slot::DtBias => "dt_proj.bias",
            Slot::HeadDtBias => "dt_bias",
            Slot::Norm => "norm.weight",
        }
    }

    /// The checkpoint name of the copy in direction `dir`, as hustvl spells the backward
    /// tensors: `A_b_log`, `D_b`, `conv1d_b.weight`, `conv1d_b.bias`, `dt_proj_b.bias`.
    pub fn site_name(self, dir: Dir) -> String {
        match (dir, self) {
            (Dir::Fwd, s) => s.name().to_string(),
            (Dir::Bwd, Slot::ALog) => "A_b_log".into(),
            (Dir::Bwd, Slot::D) => "D_b".into(),
            (Dir::Bwd, Slot::ConvWeight) => "conv1d_b.weight".into(),
            (Dir::Bwd, Slot::ConvBias) => "conv1d_b.bias".into(),
            (Dir::Bwd, Slot::DtBias) => "dt_proj_b.bias".into(),
            // Mamba-2 has one direction; these names only appear in messages.
            (Dir::Bwd, Slot::HeadDtBias) => "dt_bias_b".into(),
            (Dir::Bwd, Slot::Norm) => "norm_b.weight".into(),
        }
    }
}

/// A matrix a method can adapt: a mixer's projection (per layer and direction), or a vision
/// model's patch embedding (its kernel flattened to `[D, C·p·p]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinearSite {
    Mixer(usize, Proj, Dir),
    PatchEmbed,
}

impl LinearSite {
    /// For messages: `layers.{i}.x_proj_b`, `patch_embed`.
    pub fn name(self) -> String {
        match self {
            LinearSite::Mixer(i, proj, dir) => format!("layers.{i}.{}", proj.site_name(dir)),
            LinearSite::PatchEmbed => "patch_embed".into(),
        }
    }
}

/// A tensor parameter a method can adapt: one of a mixer's (per layer and direction), or a
/// vision model's class token or position embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParamSite {
    Mixer(usize, Slot, Dir),
    ClsToken,
    PosEmbed,
}

impl ParamSite {
    /// The name under which adapters refer to it (`layers.{i}.A_b_log`, `cls_token`).
    pub fn name(self) -> String {
        match self {
            ParamSite::Mixer(i, slot, dir) => format!("layers.{i}.{}", slot.site_name(dir)),
            ParamSite::ClsToken => "cls_token".into(),
            ParamSite::PosEmbed => "pos_embed".into(),
        }
    }
}

/// `(D, E, N, R)` of a model.
pub fn dims(cfg: &ModelShape) -> (usize, usize, usize, usize) {
    (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.state_size,
        cfg.time_step_rank,
    )
}

/// Where a part sits in its seam's fold (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Transform,
    Add,
    Extend,
}

/// A method's contribution to one projection.
pub trait LinearPart: fmt::Debug + Send + Sync {
    fn stage(&self) -> Stage;

    /// `Transform` parts: the new weight from the current one.
    fn weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.clone())
    }

    /// `Add`/`Extend` parts: the output given the input and the output so far.
    fn output(&self, _x: &Tensor, y: Tensor, _rt: &Runtime) -> Result<Tensor> {
        Ok(y)
    }

    /// `Add` parts that are one low-rank product in evaluation mode (LoRA): that term.
    fn low_rank(&self) -> Option<LowRankTerm> {
        None
    }

    /// The weight after this part, in merged form; `None` when it has none.
    fn merge(&self, w: &Tensor) -> Result<Option<Tensor>> {
        match self.stage() {
            Stage::Transform => Ok(Some(self.weight(w)?)),
            _ => Ok(None),
        }
    }
}

/// A method's contribution to a tensor parameter.
pub trait ParamPart: fmt::Debug + Send + Sync {
    fn stage(&self) -> Stage;
    fn value(&self, current: &Tensor) -> Result<Tensor>;
}

/// A method's contribution to the token embedding lookup.
pub trait EmbeddingPart: fmt::Debug + Send + Sync {
    /// `e` is the lookup so far `[..., D]` for `ids`.
    fn output(&self, ids: &Tensor, e: Tensor) -> Result<Tensor>;
    /// The merged embedding matrix.
    fn merge(&self, w: &Tensor) -> Result<Tensor>;
}

/// Training-time state shared by an adapter's parts: the train/eval switch and the dropout
/// randomness. Masks come from a seed and a counter (not a running RNG) so a run can resume
/// exactly: save [`Runtime::dropout_counter`] and restore it.
#[derive(Debug, Default)]
pub struct Runtime {
    training: AtomicBool,
    seed: AtomicU64,
    counter: AtomicU64,
}

impl Runtime {
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::SeqCst);
    }

    pub fn training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }

    pub fn set_dropout_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::SeqCst);
    }

    pub fn dropout_counter(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }

    pub fn set_dropout_counter(&self, c: u64) {
        self.counter.store(c, Ordering::SeqCst);
    }

    /// Inverted dropout with probability `p` in training mode; the identity otherwise.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.training() || p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            return x.zeros_like();
        }
        let k = self.counter.fetch_add(1, Ordering::SeqCst);
        let seed = self.seed.load(Ordering::SeqCst);
        // SplitMix-style mixing so consecutive counters give unrelated streams.
        let mut z = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let mut rng = StdRng::seed_from_u64(z ^ (z >> 31));
        let keep = 1.0 - p;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// Every method's parts, per seam; see the module docs.
pub struct Sites<'a> {
    base: &'a dyn PeftBase,
    shape: ModelShape,
    runtime: Arc<Runtime>,
    pub(crate) linear: BTreeMap<LinearSite, Vec<Arc<dyn LinearPart>>>,
    pub(crate) params: BTreeMap<ParamSite, Vec<Arc<dyn ParamPart>>>,
    pub(crate) extras: Extras,
    pub(crate) replacement: Option<std::collections::HashMap<String, Tensor>>,
}

impl<'a> Sites<'a> {
    pub(crate) fn new(base: &'a dyn PeftBase, runtime: Arc<Runtime>) -> Self {
        Sites {
            shape: base.peft_shape(),
            base,
            runtime,
            linear: BTreeMap::new(),
            params: BTreeMap::new(),
            extras: Extras::default(),
            replacement: None,
        }
    }

    pub fn base(&self) -> &dyn PeftBase {
        self.base
    }

    /// The model's shape (named `config` for the Mamba-1 field names it keeps).
    pub fn config(&self) -> &ModelShape {
        &self.shape
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn add_linear(&mut self, layer: usize, proj: Proj, dir: Dir, part: Arc<dyn LinearPart>) {
        self.add_site_linear(LinearSite::Mixer(layer, proj, dir), part);
    }

    pub fn add_site_linear(&mut self, site: LinearSite, part: Arc<dyn LinearPart>) {
        self.linear.entry(site).or_default().push(part);
    }

    pub fn add_param(&mut self, site: ParamSite, part: Arc<dyn ParamPart>) {
        self.params.entry(site).or_default().push(part);
    }

    pub fn add_embedding(&mut self, part: Arc<dyn EmbeddingPart>) {
        self.extras.embedding.push(part);
    }

    pub fn set_mixer_hook(&mut self, layer: usize, hook: Arc<dyn MixerHook>) -> PeftResult<()> {
        if self.extras.mixer_hooks.insert(layer, hook).is_some() {
            return Err(PeftError::Contradictory(format!(
                "two methods insert tokens into layer {layer}'s mixer; use one affix method"
            )));
        }
        Ok(())
    }

    pub fn set_input_hook(&mut self, hook: Arc<dyn InputHook>) -> PeftResult<()> {
        if self.extras.input_hook.replace(hook).is_some() {
            return Err(PeftError::Contradictory(
                "two methods insert prompt tokens; use one prompt method".into(),
            ));
        }
        Ok(())
    }

    pub fn set_lm_head(&mut self, head: Tensor) -> PeftResult<()> {
        if self.extras.lm_head.replace(head).is_some() {
            return Err(PeftError::Contradictory(
                "two methods replace the LM head".into(),
            ));
        }
        Ok(())
    }

    /// A classification head `(weight [C, D], bias [C])` in place of the base's.
    pub fn set_head(&mut self, weight: Tensor, bias: Tensor) -> PeftResult<()> {
        if self.extras.head.replace((weight, bias)).is_some() {
            return Err(PeftError::Contradictory(
                "two methods replace the classification head".into(),
            ));
        }
        Ok(())
    }

    /// Every base weight replaced by these tensors (full fine-tuning), by checkpoint name.
    pub fn set_replacement(
        &mut self,
        tensors: std::collections::HashMap<String, Tensor>,
    ) -> PeftResult<()> {
        if self.replacement.replace(tensors).is_some() {
            return Err(PeftError::Contradictory(
                "two methods replace the whole model".into(),
            ));
        }
        Ok(())
    }

    /// The adapted model: a clone of `base` (sharing its tensors) with every composite
    /// attached. `base` is the model these sites were collected on.
    pub(crate) fn build<M: PeftModel>(self, base: &M) -> PeftResult<M> {
        let mut model = match self.replacement {
            Some(tensors) => base.with_weights(tensors)?,
            None => base.clone(),
        };
        let rt = self.runtime;
        let n_layers = self.shape.num_hidden_layers;
        for (site, parts) in self.linear {
            let proj = model.projection_mut(site).ok_or_else(|| {
                PeftError::Contradictory(format!(
                    "a method targets {}, which this model (of {n_layers} layers) does not have",
                    site.name()
                ))
            })?;
            proj.set_adapter(Some(Arc::new(SiteLinear::new(parts, rt.clone()))));
        }
        for (site, parts) in self.params {
            let param = model.param_mut(site).ok_or_else(|| match site {
                ParamSite::Mixer(_, Slot::ConvBias, _) => PeftError::UnknownTarget {
                    method: "bitfit".into(),
                    target: "conv1d.bias".into(),
                    valid: vec!["dt_proj.bias (this model has no conv bias)".into()],
                },
                _ => PeftError::Contradictory(format!(
                    "a method targets {}, which this model (of {n_layers} layers) does not have",
                    site.name()
                )),
            })?;
            param.set_adapter(Some(Arc::new(SiteParam::new(parts))));
        }
        model.install(self.extras)?;
        Ok(model)
    }
}

/// The composite on one projection.
#[derive(Debug)]
pub(crate) struct SiteLinear {
    parts: Vec<Arc<dyn LinearPart>>,
    runtime: Arc<Runtime>,
}

impl SiteLinear {
    fn new(mut parts: Vec<Arc<dyn LinearPart>>, runtime: Arc<Runtime>) -> Self {
        // Stable: parts of one stage keep the order the methods were listed in.
        parts.sort_by_key(|p| p.stage());
        SiteLinear { parts, runtime }
    }
}

impl SiteLinear {
    /// Applies the `Add`/`Extend` parts to `y`, the output of the (transformed) weight.
    fn add_outputs(&self, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        for p in self.parts.iter().filter(|p| p.stage() != Stage::Transform) {
            y = p.output(x, y, &self.runtime)?;
        }
        Ok(y)
    }
}

impl LinearAdapter for SiteLinear {
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let mut w: Option<Tensor> = None;
        for p in self.parts.iter().filter(|p| p.stage() == Stage::Transform) {
            w = Some(match &w {
                Some(w) => p.weight(w)?,
                None => p.weight(&base.weight_as(x.dtype())?)?,
            });
        }
        let y = match &w {
            Some(w) => linear_forward(x, w, base.bias())?,
            None => base.forward(x)?,
        };
        self.add_outputs(x, y)
    }

    fn is_additive(&self) -> bool {
        self.parts.iter().all(|p| p.stage() == Stage::Add)
    }

    fn add_terms(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        if !self.is_additive() {
            candle_core::bail!("add_terms: this site transforms or extends the weight");
        }
        self.add_outputs(x, y)
    }

    fn low_rank_terms(&self) -> Option<Vec<LowRankTerm>> {
        if self.runtime.training() {
            return None;
        }
        self.parts.iter().map(|p| p.low_rank()).collect()
    }

    fn merged_weight(&self, base: &Linear) -> Result<Option<Tensor>> {
        let mut w = base.weight().clone();
        for p in &self.parts {
            match p.merge(&w)? {
                Some(next) => w = next,
                None => return Ok(None),
            }
        }
        Ok(Some(w.detach()))
    }
}

/// The composite on one tensor parameter.
#[derive(Debug)]
pub(crate) struct SiteParam {
    parts: Vec<Arc<dyn ParamPart>>,
}

impl SiteParam {
    fn new(mut parts: Vec<Arc<dyn ParamPart>>) -> Self {
        parts.sort_by_key(|p| p.stage());
        SiteParam { parts }
    }
}

impl ParamAdapter for SiteParam {
    fn value(&self, base: &Tensor) -> Result<Tensor> {
        let mut v = base.clone();
        for p in &self.parts {
            v = p.value(&v)?;
        }
        Ok(v)
    }
}

/// The composite on the token embedding.
#[derive(Debug)]
pub(crate) struct SiteEmbedding {
    pub(crate) parts: Vec<Arc<dyn EmbeddingPart>>,
}

impl SiteEmbedding {
    pub(crate) fn merged(&self, w: &Tensor) -> Result<Tensor> {
        let mut w = w.clone();
        for p in &self.parts {
            w = p.merge(&w)?;
        }
        Ok(w.detach())
    }
}

impl EmbeddingAdapter for SiteEmbedding {
    fn forward(&self, base: &Embedding, ids: &Tensor) -> Result<Tensor> {
        let mut e = base.lookup(ids)?;
        for p in &self.parts {
            e = p.output(ids, e)?;
        }
        Ok(e)
    }

    fn merged_weight(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.merged(weight)?))
    }
}

/// `x` in f32 when it is not already (the adapters compute in the model's dtype; this is
/// for reductions such as norms).
pub(crate) fn f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_is_off_in_eval_and_reproducible_in_training() -> Result<()> {
        let rt = Runtime::default();
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu)?;
        let eval = rt.dropout(&x, 0.5)?;
        assert_eq!(eval.sum_all()?.to_scalar::<f32>()?, 4096.0);
        rt.set_training(true);
        rt.set_dropout_seed(11);
        let a = rt.dropout(&x, 0.5)?.flatten_all()?.to_vec1::<f32>()?;
        let b = rt.dropout(&x, 0.5)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(a, b, "consecutive masks differ");
        assert!(
            a.iter().all(|v| *v == 0.0 || *v == 2.0),
            "inverted dropout scales by 1/(1-p)"
        );
        let kept = a.iter().filter(|v| **v > 0.0).count() as f32 / a.len() as f32;
        assert!((kept - 0.5).abs() < 0.05, "{kept}");
        // Restoring the counter replays the masks (exact resume).
        rt.set_dropout_counter(0);
        assert_eq!(rt.dropout(&x, 0.5)?.flatten_all()?.to_vec1::<f32>()?, a);
        assert_eq!(rt.dropout_counter(), 1);
        Ok(())
    }
}
