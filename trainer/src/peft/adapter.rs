//! [`Adapter`]: an [`AdapterSpec`] with its trainable tensors, bound to one base model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use super::error::{PeftError, PeftResult};
use super::identity::{base_identity, describe};
use super::init::InitRng;
use super::merge::{MergeOptions, MergedModel};
use super::sites::{Runtime, Sites};
use super::spec::AdapterSpec;
use super::{ParamGroup, Params};
use crate::model::{MambaConfig, MambaForCausalLM};

/// A PEFT adapter: the spec, its tensors (candle `Var`s, trainable in place), and the
/// identity of the base model it belongs to.
#[derive(Debug)]
pub struct Adapter {
    spec: AdapterSpec,
    base_identity: String,
    base_config: MambaConfig,
    vars: BTreeMap<String, Var>,
    /// Per method, its tensor names in declaration order.
    owners: Vec<Vec<String>>,
    groups: Vec<ParamGroup>,
    runtime: Arc<Runtime>,
}

impl Adapter {
    /// A fresh adapter, initialised as the spec prescribes. `seed` fixes every random draw.
    pub fn init(spec: &AdapterSpec, base: &MambaForCausalLM, seed: u64) -> PeftResult<Adapter> {
        spec.validate(base.config())?;
        let rng = InitRng::new(seed, base.device(), base.dtype());
        let mut tensors = HashMap::new();
        for m in &spec.methods {
            for (name, t) in m.method().init(base, &rng)? {
                tensors.insert(name, t);
            }
        }
        Self::from_tensors(spec, base, tensors)
    }

    /// An adapter from given tensor values (loaded from a file, or a test's fixture). Every
    /// tensor the spec implies must be present with its shape, and nothing else.
    pub fn from_tensors(
        spec: &AdapterSpec,
        base: &MambaForCausalLM,
        mut tensors: HashMap<String, Tensor>,
    ) -> PeftResult<Adapter> {
        let cfg = base.config();
        spec.validate(cfg)?;
        let mut problems = Vec::new();
        let mut vars = BTreeMap::new();
        let mut owners = Vec::new();
        for m in &spec.methods {
            let mut names = Vec::new();
            for (name, shape) in m.method().parameters(cfg) {
                match tensors.remove(&name) {
                    None => problems.push(format!(
                        "missing `{name}` (shape {shape:?}, {})",
                        m.method().kind()
                    )),
                    Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                        "`{name}` has shape {:?}, expected {shape:?} ({})",
                        t.dims(),
                        m.method().kind()
                    )),
                    Some(t) => {
                        let t = t.to_dtype(base.dtype())?.to_device(base.device())?;
                        // Nothing trains on garbage: NaN/inf would poison every step.
                        let bad = t
                            .to_dtype(candle_core::DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            .iter()
                            .filter(|v| !v.is_finite())
                            .count();
                        if bad > 0 {
                            problems.push(format!(
                                "`{name}` has {bad} non-finite value(s) (NaN or infinity)"
                            ));
                            continue;
                        }
                        vars.insert(name.clone(), Var::from_tensor(&t)?);
                        names.push(name);
                    }
                }
            }
            owners.push(names);
        }
        let mut extra: Vec<_> = tensors
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        extra.sort();
        for (n, s) in extra {
            problems.push(format!(
                "unexpected `{n}` with shape {s:?} (not part of {})",
                spec.kind()
            ));
        }
        if !problems.is_empty() {
            return Err(PeftError::Tensors { problems });
        }
        let mut groups = Vec::new();
        for (k, (m, names)) in spec.methods.iter().zip(&owners).enumerate() {
            let params = names
                .iter()
                .filter_map(|n| vars.get(n).map(|v| (n.clone(), v.clone())))
                .collect();
            groups.extend(m.method().groups(k, params, base)?);
        }
        Ok(Adapter {
            spec: spec.clone(),
            base_identity: base_identity(base),
            base_config: cfg.clone(),
            vars,
            owners,
            groups,
            runtime: Arc::new(Runtime::default()),
        })
    }

    pub fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    /// The base model's identity (see [`super::model_identity`]).
    pub fn base_identity(&self) -> &str {
        &self.base_identity
    }

    pub fn base_config(&self) -> &MambaConfig {
        &self.base_config
    }

    /// Every tensor, by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Every tensor's current value, by name (detached copies of the graph leaves).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The number of trainable scalars.
    pub fn trainable_parameters(&self) -> usize {
        self.vars.values().map(|v| v.as_tensor().elem_count()).sum()
    }

    /// The optimizer groups: one per method (more where a method needs them, e.g.
    /// Additional-scan's undecayed A columns), with the method's lr and weight decay.
    pub fn param_groups(&self) -> Vec<ParamGroup> {
        self.groups.clone()
    }

    /// Per method (in spec order), its tensor names.
    pub fn method_tensors(&self) -> &[Vec<String>] {
        &self.owners
    }

    /// Dropout on (training) or off (evaluation, merging; the default).
    pub fn set_training(&self, on: bool) {
        self.runtime.set_training(on);
    }

    /// Seeds the dropout masks. Masks depend on (seed, counter) only; restore the counter
    /// ([`Self::dropout_counter`]) to resume a run exactly.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.runtime.set_dropout_seed(seed);
    }

    pub fn dropout_counter(&self) -> u64 {
        self.runtime.dropout_counter()
    }

    pub fn set_dropout_counter(&self, c: u64) {
        self.runtime.set_dropout_counter(c);
    }

    /// Fails unless `base` is the model this adapter was made for.
    pub fn check_base(&self, base: &MambaForCausalLM) -> PeftResult<()> {
        let found = base_identity(base);
        if found != self.base_identity {
            return Err(PeftError::WrongBase {
                expected: self.base_identity.clone(),
                found,
                detail: format!(
                    "adapter base: {}; this model: {}",
                    describe(&self.base_config),
                    describe(base.config())
                ),
            });
        }
        Ok(())
    }

    /// The adapted model: `base` with this adapter's parts attached. It shares the base's
    /// tensors and reads the adapter's variables on every forward, so optimizer updates
    /// show without re-applying.
    pub fn apply(&self, base: &MambaForCausalLM) -> PeftResult<MambaForCausalLM> {
        self.attach(base, Params::new(&self.vars))
    }

    /// The adapted model for inference: like [`Self::apply`], but its parts hold detached
    /// values of the variables. A forward then builds no backprop graph, which would keep
    /// every intermediate alive and send the frozen base layers down their graph-aware
    /// (slower) paths; serving uses this.
    pub fn apply_frozen(&self, base: &MambaForCausalLM) -> PeftResult<MambaForCausalLM> {
        self.attach(base, Params::frozen(&self.vars))
    }

    fn attach(&self, base: &MambaForCausalLM, params: Params) -> PeftResult<MambaForCausalLM> {
        self.check_base(base)?;
        if has_adapters(base) {
            return Err(PeftError::Contradictory(
                "the base model already has adapters attached; apply to the plain base (stack \
                 methods in one spec instead)"
                    .into(),
            ));
        }
        let mut sites = Sites::new(base, self.runtime.clone());
        for m in &self.spec.methods {
            m.method().attach(&params, &mut sites)?;
        }
        sites.build()
    }

    /// The model to serve this adapter with: merged where the methods allow it (no
    /// per-token cost for DoRA/ProDiaL weight transforms; Additional-scan as an expanded
    /// state; prompt/affix tables collapsed), the plain adapted model otherwise
    /// (ParallelAdapter). Same function as [`Self::apply`] up to float rounding.
    pub fn inference_model(&self, base: &MambaForCausalLM) -> PeftResult<MambaForCausalLM> {
        match self.merge(base) {
            Ok(m) => m.model(),
            Err(PeftError::NotMergeable { .. }) => self.apply_frozen(base),
            Err(e) => Err(e),
        }
    }

    /// Merges into the base weights (see [`MergedModel`]); an error for methods without a
    /// merged form (ParallelAdapter).
    pub fn merge(&self, base: &MambaForCausalLM) -> PeftResult<MergedModel> {
        self.merge_with(base, &MergeOptions::default())
    }

    pub fn merge_with(
        &self,
        base: &MambaForCausalLM,
        opts: &MergeOptions,
    ) -> PeftResult<MergedModel> {
        self.check_base(base)?;
        super::merge::merge(self, base, opts)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` to `dir`.
    pub fn save(&self, dir: &Path) -> PeftResult<()> {
        super::files::save(self, dir)
    }

    /// Reads an adapter folder written by [`Self::save`] or by HF PEFT (LoRA/DoRA), and
    /// binds it to `base`; refuses an adapter made for another base model.
    pub fn load(dir: &Path, base: &MambaForCausalLM) -> PeftResult<Adapter> {
        super::files::load(dir, base)
    }

    pub(crate) fn params(&self) -> Params<'_> {
        Params::new(&self.vars)
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }
}

/// Whether any seam of `m` already holds an adapter.
pub(crate) fn has_adapters(m: &MambaForCausalLM) -> bool {
    m.input_hook.is_some()
        || m.backbone.embeddings.adapter().is_some()
        || m.backbone.layers.iter().any(|b| {
            let x = &b.mixer;
            x.hook.is_some()
                || x.in_proj.adapter().is_some()
                || x.x_proj.adapter().is_some()
                || x.dt_proj.adapter().is_some()
                || x.out_proj.adapter().is_some()
                || x.a_log.adapter().is_some()
                || x.d.adapter().is_some()
                || x.conv_weight.adapter().is_some()
                || x.dt_bias.adapter().is_some()
                || x.conv_bias.as_ref().is_some_and(|b| b.adapter().is_some())
        })
}
