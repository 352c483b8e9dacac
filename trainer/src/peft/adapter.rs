//! [`Adapter`]: an [`AdapterSpec`] with its trainable tensors, bound to one base model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use super::error::{PeftError, PeftResult};
use super::identity::base_identity;
use super::init::InitRng;
use super::merge::{MergeOptions, MergedModel};
use super::sites::{Runtime, Sites};
use super::spec::{AdapterSpec, head_shapes};
use super::target::{ModelShape, PeftBase, PeftModel};
use super::{ParamGroup, Params};
use crate::model::MambaForCausalLM;

/// A PEFT adapter: the spec, its tensors (candle `Var`s, trainable in place), and the
/// identity of the base model it belongs to.
#[derive(Debug)]
pub struct Adapter {
    spec: AdapterSpec,
    base_identity: String,
    base_shape: ModelShape,
    vars: BTreeMap<String, Var>,
    /// Per method, its tensor names in declaration order.
    owners: Vec<Vec<String>>,
    /// A classification model's head tensors (trained under every method).
    head: Vec<String>,
    groups: Vec<ParamGroup>,
    runtime: Arc<Runtime>,
}

impl Adapter {
    /// A fresh adapter, initialised as the spec prescribes. `seed` fixes every random draw.
    /// A classification head starts at zero, as MambaPEFT's vision recipe does.
    pub fn init(spec: &AdapterSpec, base: &impl PeftBase, seed: u64) -> PeftResult<Adapter> {
        let shape = base.peft_shape();
        spec.validate(&shape)?;
        let rng = InitRng::new(seed, base.device(), base.dtype());
        let mut tensors = HashMap::new();
        for m in &spec.methods {
            for (name, t) in m.method().init(base, &rng)? {
                tensors.insert(name, t);
            }
        }
        for (name, s) in head_shapes(&shape) {
            tensors.insert(name, rng.zeros(&s)?);
        }
        Self::from_tensors(spec, base, tensors)
    }

    /// An adapter from given tensor values (loaded from a file, or a test's fixture). Every
    /// tensor the spec implies must be present with its shape, and nothing else.
    pub fn from_tensors(
        spec: &AdapterSpec,
        base: &impl PeftBase,
        mut tensors: HashMap<String, Tensor>,
    ) -> PeftResult<Adapter> {
        let shape = base.peft_shape();
        let cfg = &shape;
        spec.validate(cfg)?;
        let mut problems = Vec::new();
        let mut vars = BTreeMap::new();
        let mut owners = Vec::new();
        let head = ("head", head_shapes(cfg));
        let owned = spec
            .methods
            .iter()
            .map(|m| (m.method().kind(), m.method().parameters(cfg)))
            .chain((!head.1.is_empty()).then_some(head));
        for (kind, shapes) in owned {
            let mut names = Vec::new();
            for (name, shape) in shapes {
                match tensors.remove(&name) {
                    None => problems.push(format!("missing `{name}` (shape {shape:?}, {kind})")),
                    Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                        "`{name}` has shape {:?}, expected {shape:?} ({kind})",
                        t.dims(),
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
        let head = if owners.len() > spec.methods.len() {
            owners.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        let group_of = |names: &[String]| -> Vec<(String, Var)> {
            names
                .iter()
                .filter_map(|n| vars.get(n).map(|v| (n.clone(), v.clone())))
                .collect()
        };
        let mut groups = Vec::new();
        for (k, (m, names)) in spec.methods.iter().zip(&owners).enumerate() {
            groups.extend(m.method().groups(k, group_of(names), base)?);
        }
        if !head.is_empty() {
            // The job's learning rate, no decay (MambaPEFT trains the head with the rest).
            groups.push(ParamGroup {
                name: "head".into(),
                params: group_of(&head),
                lr: None,
                weight_decay: 0.0,
                decay_toward: None,
            });
        }
        Ok(Adapter {
            spec: spec.clone(),
            base_identity: base_identity(base),
            base_shape: shape,
            vars,
            owners,
            head,
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

    /// The shape of the base model this adapter was made for.
    pub fn base_shape(&self) -> &ModelShape {
        &self.base_shape
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
    pub fn check_base(&self, base: &impl PeftBase) -> PeftResult<()> {
        let found = base_identity(base);
        if found != self.base_identity {
            return Err(PeftError::WrongBase {
                expected: self.base_identity.clone(),
                found,
                detail: format!(
                    "adapter base: {}; this model: {}",
                    self.base_shape.description,
                    base.peft_shape().description
                ),
            });
        }
        Ok(())
    }

    /// The adapted model: `base` with this adapter's parts attached. It shares the base's
    /// tensors and reads the adapter's variables on every forward, so optimizer updates
    /// show without re-applying.
    pub fn apply<M: PeftModel>(&self, base: &M) -> PeftResult<M> {
        self.attach(base, Params::new(&self.vars))
    }

    /// The adapted model for inference: like [`Self::apply`], but its parts hold detached
    /// values of the variables. A forward then builds no backprop graph, which would keep
    /// every intermediate alive and send the frozen base layers down their graph-aware
    /// (slower) paths; serving uses this.
    pub fn apply_frozen<M: PeftModel>(&self, base: &M) -> PeftResult<M> {
        self.attach(base, Params::frozen(&self.vars))
    }

    fn attach<M: PeftModel>(&self, base: &M, params: Params) -> PeftResult<M> {
        self.check_base(base)?;
        if base.has_adapters() {
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
        if let [w, b] = self.head.as_slice() {
            sites.set_head(params.get(w)?, params.get(b)?)?;
        }
        sites.build(base)
    }

    /// The model to serve this adapter with: merged where the methods allow it (no
    /// per-token cost for DoRA/ProDiaL weight transforms; Additional-scan as an expanded
    /// state; prompt/affix tables collapsed), the plain adapted model otherwise
    /// (ParallelAdapter). Same function as [`Self::apply`] up to float rounding.
    pub fn inference_model<M: PeftModel>(&self, base: &M) -> PeftResult<M> {
        match self.merge(base) {
            Ok(m) => m.model(),
            Err(PeftError::NotMergeable { .. }) => self.apply_frozen(base),
            Err(e) => Err(e),
        }
    }

    /// Merges into the base weights (see [`MergedModel`]), any family; an error for
    /// methods without a merged form (ParallelAdapter).
    pub fn merge<M: PeftModel>(&self, base: &M) -> PeftResult<MergedModel<M>> {
        self.check_base(base)?;
        super::merge::merge(self, base)
    }

    /// [`Self::merge`] with Mamba-1's options (a prefix folded into initial states).
    pub fn merge_with(
        &self,
        base: &MambaForCausalLM,
        opts: &MergeOptions,
    ) -> PeftResult<MergedModel> {
        let mut merged = self.merge(base)?;
        if opts.prefix_as_initial_state {
            super::merge::fold_prefix(&mut merged)?;
        }
        Ok(merged)
    }

    /// [`Self::merge_with`] for a language model of either family; folding a prefix into
    /// initial states is Mamba-1's (a Mamba-2 prefix stays a residual prompt).
    pub fn merge_lm(
        &self,
        base: &crate::model::AnyLm,
        opts: &MergeOptions,
    ) -> PeftResult<MergedModel<crate::model::AnyLm>> {
        use crate::model::AnyLm;
        match base {
            AnyLm::Mamba(m) => {
                let merged = self.merge_with(m, opts)?;
                Ok(MergedModel {
                    base: AnyLm::Mamba(merged.base),
                    residual: merged.residual,
                    initial_state: merged.initial_state,
                })
            }
            AnyLm::Mamba2(_) if opts.prefix_as_initial_state => Err(PeftError::Contradictory(
                "prefix_as_initial_state folds a prefix into Mamba-1 states; on Mamba-2 the \
                 prompt stays a residual adapter"
                    .into(),
            )),
            AnyLm::Mamba2(_) => self.merge(base),
        }
    }

    /// The head tensors' values `(weight, bias)` of a classification model's adapter.
    pub(crate) fn head_tensors(&self) -> Option<(Tensor, Tensor)> {
        match self.head.as_slice() {
            [w, b] => Some((
                self.vars.get(w)?.as_tensor().detach(),
                self.vars.get(b)?.as_tensor().detach(),
            )),
            _ => None,
        }
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` to `dir`.
    pub fn save(&self, dir: &Path) -> PeftResult<()> {
        super::files::save(self, dir)
    }

    /// Reads an adapter folder written by [`Self::save`] or by HF PEFT (LoRA/DoRA), and
    /// binds it to `base`; refuses an adapter made for another base model.
    pub fn load(dir: &Path, base: &impl PeftBase) -> PeftResult<Adapter> {
        super::files::load(dir, base)
    }

    pub(crate) fn params(&self) -> Params<'_> {
        Params::new(&self.vars)
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }
}
