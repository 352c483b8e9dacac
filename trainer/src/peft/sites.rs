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
    EmbeddingAdapter, Linear, LinearAdapter, LowRankTerm, ParamAdapter, embedding_lookup,
    linear_forward,
};
use crate::model::{InputHook, MambaConfig, MambaForCausalLM, MixerHook};

use super::error::{PeftError, PeftResult};

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

    /// `(out, in)` of the projection's weight.
    pub fn shape(self, cfg: &MambaConfig) -> (usize, usize) {
        let (d, e, n, r) = dims(cfg);
        match self {
            Proj::In => (2 * e, d),
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
    DtBias,
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
        }
    }
}

/// `(D, E, N, R)` of a config.
pub fn dims(cfg: &MambaConfig) -> (usize, usize, usize, usize) {
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
    base: &'a MambaForCausalLM,
    runtime: Arc<Runtime>,
    pub(crate) linear: BTreeMap<(usize, Proj), Vec<Arc<dyn LinearPart>>>,
    pub(crate) params: BTreeMap<(usize, Slot), Vec<Arc<dyn ParamPart>>>,
    pub(crate) embedding: Vec<Arc<dyn EmbeddingPart>>,
    pub(crate) mixer_hooks: BTreeMap<usize, Arc<dyn MixerHook>>,
    pub(crate) input_hook: Option<Arc<dyn InputHook>>,
    pub(crate) lm_head: Option<Tensor>,
    pub(crate) replacement: Option<MambaForCausalLM>,
}

impl<'a> Sites<'a> {
    pub(crate) fn new(base: &'a MambaForCausalLM, runtime: Arc<Runtime>) -> Self {
        Sites {
            base,
            runtime,
            linear: BTreeMap::new(),
            params: BTreeMap::new(),
            embedding: Vec::new(),
            mixer_hooks: BTreeMap::new(),
            input_hook: None,
            lm_head: None,
            replacement: None,
        }
    }

    pub fn base(&self) -> &MambaForCausalLM {
        self.base
    }

    pub fn config(&self) -> &MambaConfig {
        self.base.config()
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn add_linear(&mut self, layer: usize, proj: Proj, part: Arc<dyn LinearPart>) {
        self.linear.entry((layer, proj)).or_default().push(part);
    }

    pub fn add_param(&mut self, layer: usize, slot: Slot, part: Arc<dyn ParamPart>) {
        self.params.entry((layer, slot)).or_default().push(part);
    }

    pub fn add_embedding(&mut self, part: Arc<dyn EmbeddingPart>) {
        self.embedding.push(part);
    }

    pub fn set_mixer_hook(&mut self, layer: usize, hook: Arc<dyn MixerHook>) -> PeftResult<()> {
        if self.mixer_hooks.insert(layer, hook).is_some() {
            return Err(PeftError::Contradictory(format!(
                "two methods insert tokens into layer {layer}'s mixer; use one affix method"
            )));
        }
        Ok(())
    }

    pub fn set_input_hook(&mut self, hook: Arc<dyn InputHook>) -> PeftResult<()> {
        if self.input_hook.replace(hook).is_some() {
            return Err(PeftError::Contradictory(
                "two methods insert prompt tokens; use one prompt method".into(),
            ));
        }
        Ok(())
    }

    pub fn set_lm_head(&mut self, head: Tensor) -> PeftResult<()> {
        if self.lm_head.replace(head).is_some() {
            return Err(PeftError::Contradictory(
                "two methods replace the LM head".into(),
            ));
        }
        Ok(())
    }

    pub fn set_replacement(&mut self, model: MambaForCausalLM) -> PeftResult<()> {
        if self.replacement.replace(model).is_some() {
            return Err(PeftError::Contradictory(
                "two methods replace the whole model".into(),
            ));
        }
        Ok(())
    }

    /// The adapted model: a clone of the base (sharing its tensors) with every composite
    /// attached.
    pub(crate) fn build(self) -> PeftResult<MambaForCausalLM> {
        let mut model = match self.replacement {
            Some(m) => m,
            None => self.base.clone(),
        };
        let rt = self.runtime;
        let n_layers = model.backbone.layers.len();
        let layer_err = |i: usize| {
            PeftError::Contradictory(format!(
                "a method targets layer {i}, but the model has {n_layers} layers"
            ))
        };
        for ((i, proj), parts) in self.linear {
            let mixer = &mut model
                .backbone
                .layers
                .get_mut(i)
                .ok_or_else(|| layer_err(i))?
                .mixer;
            let site = match proj {
                Proj::In => &mut mixer.in_proj,
                Proj::X => &mut mixer.x_proj,
                Proj::Dt => &mut mixer.dt_proj,
                Proj::Out => &mut mixer.out_proj,
            };
            site.set_adapter(Some(Arc::new(SiteLinear::new(parts, rt.clone()))));
        }
        for ((i, slot), parts) in self.params {
            let mixer = &mut model
                .backbone
                .layers
                .get_mut(i)
                .ok_or_else(|| layer_err(i))?
                .mixer;
            let param = match slot {
                Slot::ALog => &mut mixer.a_log,
                Slot::D => &mut mixer.d,
                Slot::ConvWeight => &mut mixer.conv_weight,
                Slot::ConvBias => match &mut mixer.conv_bias {
                    Some(b) => b,
                    None => {
                        return Err(PeftError::UnknownTarget {
                            method: "bitfit".into(),
                            target: "conv1d.bias".into(),
                            valid: vec!["dt_proj.bias (this model has no conv bias)".into()],
                        });
                    }
                },
                Slot::DtBias => &mut mixer.dt_bias,
            };
            param.set_adapter(Some(Arc::new(SiteParam::new(parts))));
        }
        if !self.embedding.is_empty() {
            model
                .backbone
                .embeddings
                .set_adapter(Some(Arc::new(SiteEmbedding {
                    parts: self.embedding,
                })));
        }
        for (i, hook) in self.mixer_hooks {
            model
                .backbone
                .layers
                .get_mut(i)
                .ok_or_else(|| layer_err(i))?
                .mixer
                .hook = Some(hook);
        }
        if let Some(h) = self.input_hook {
            model.input_hook = Some(h);
        }
        if let Some(head) = self.lm_head {
            model.lm_head = Some(head);
        }
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
            w = Some(p.weight(w.as_ref().unwrap_or(base.weight()))?);
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
    parts: Vec<Arc<dyn EmbeddingPart>>,
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
    fn forward(&self, weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut e = embedding_lookup(weight, ids)?;
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
