//! Parameter-efficient fine-tuning: every method of MambaPEFT and ProDiaL
//! (`/work/shared/peft-spec.md`), stacked freely into one adapter, on every model family that
//! has the method's sites (Mamba-1, Vim; see `peft::target`).
//!
//! Design:
//! - Each method family is one file with a typed, serde config that implements
//!   [`PeftMethod`]. [`MethodConfig`] is the registry: one line per method, and the JSON
//!   `type` tag selects the variant. A new method is one new file and one registry line.
//! - A method never edits the model itself. In [`PeftMethod::attach`] it hands small *parts*
//!   to [`Sites`] (a low-rank output term for in_proj, a `+δ` for A_log, an extra state
//!   block for x_proj, ...). The adapter then folds every site's parts into one composite
//!   per seam of `model::layers` (`LinearAdapter`, `ParamAdapter`, `EmbeddingAdapter`,
//!   `MixerHook`, `InputHook`). Stacking methods (a hybrid) is therefore free, and merging
//!   reads the merged value of each composite, so the merged model uses the same code path
//!   as the unmerged one.
//! - Parameters are named exactly as the reference fixtures name them
//!   (`layers.{i}.in_proj.lora_A`, `prompt.table`, ...); [`Adapter::save`] writes them under
//!   those names, except LoRA/DoRA in PEFT's α/r convention, which use HF PEFT's layout.
//!
//! ```no_run
//! # fn main() -> Result<(), trainer::peft::PeftError> {
//! use trainer::model::{LoadOptions, MambaForCausalLM};
//! use trainer::peft::{Adapter, AdapterSpec};
//! let base = MambaForCausalLM::load("models/mamba-130m".as_ref(), &LoadOptions::default())?;
//! let spec = AdapterSpec::from_json_str(r#"{"type": "lora", "targets": "in_proj", "r": 8}"#)?;
//! spec.validate(base.config())?;
//! let adapter = Adapter::init(&spec, &base, 42)?;
//! let model = adapter.apply(&base)?; // train `adapter.param_groups()` through `model`
//! adapter.save("out/adapter".as_ref())?;
//! # Ok(()) }
//! ```

mod adapter;
mod additional_scan;
mod affix;
mod baselines;
mod dora;
mod error;
mod files;
mod identity;
mod init;
mod lora;
mod merge;
mod parallel;
mod partial;
mod prodial;
mod prompt;
mod sites;
mod spec;
mod target;

use std::collections::BTreeMap;
use std::fmt;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

pub use adapter::Adapter;
pub use additional_scan::{AInit, AdditionalScanConfig, Placement};
pub use affix::{AffixConfig, AffixKind};
pub use baselines::{BitFitConfig, FullConfig, LinearProbeConfig, SllLoraConfig};
pub use dora::{DoraConfig, DoraPConfig};
pub use error::{PeftError, PeftResult};
pub use files::{CONFIG_FILE, WEIGHTS_FILE, to_peft_name};
pub use identity::{base_identity, model_identity};
pub use init::InitRng;
pub use lora::{LoraConfig, LoraPConfig, LoraTarget, Slice};
pub use merge::{InitialState, MergeOptions, MergedModel};
pub use parallel::ParallelAdapterConfig;
pub use partial::{PartialConfig, PartialTarget};
pub use prodial::{ProdialConfig, ProdialTarget};
pub use prompt::{PromptConfig, PromptKind, augmented_logits};
pub use sites::{Dir, ParamSite, Proj, Sites, Slot, Stage};
pub use spec::AdapterSpec;
pub use target::{Extras, MixerSites, ModelShape, PeftBase, PeftModel, SsdShape, VisionShape};

/// A set of trainable tensors that share an optimizer setting.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// `"{index}:{type}"`, plus a suffix for a method's sub-groups (e.g. `"2:additional_scan.A"`).
    pub name: String,
    /// `(adapter tensor name, variable)`.
    pub params: Vec<(String, Var)>,
    /// `None`: the job's learning rate.
    pub lr: Option<f64>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// When set (aligned with `params`), decay pulls toward these values instead of zero:
    /// θ ← θ − lr·wd·(θ − θ₀), i.e. the |W − W₀|² regulariser in decoupled form.
    pub decay_toward: Option<Vec<Tensor>>,
}

/// One trainable tensor's name and shape (shape-only, no weights).
pub type ParamShape = (String, Vec<usize>);

/// The values of an adapter's tensors, by name, handed to a method's `attach`.
pub struct Params<'a> {
    vars: &'a BTreeMap<String, Var>,
    /// Hand out detached values (inference) instead of graph leaves (training).
    frozen: bool,
}

impl<'a> Params<'a> {
    pub(crate) fn new(vars: &'a BTreeMap<String, Var>) -> Self {
        Params {
            vars,
            frozen: false,
        }
    }

    pub(crate) fn frozen(vars: &'a BTreeMap<String, Var>) -> Self {
        Params { vars, frozen: true }
    }

    /// The tensor `name`: a graph leaf, so gradients reach the variable, or for a frozen
    /// adapter its detached value.
    pub fn get(&self, name: &str) -> PeftResult<Tensor> {
        self.vars
            .get(name)
            .map(|v| {
                if self.frozen {
                    v.as_tensor().detach()
                } else {
                    v.as_tensor().clone()
                }
            })
            .ok_or_else(|| PeftError::Tensors {
                problems: vec![format!("missing tensor `{name}`")],
            })
    }
}

/// What a method becomes when the adapter is merged.
#[derive(Debug)]
pub enum MergePlan {
    /// Folded into the base weights through its parts (the default).
    Weights,
    /// Kept as a smaller method of its own (a prompt/affix projection collapses to a table).
    Residual(MethodConfig, Vec<(String, Tensor)>),
}

/// One PEFT method family. Implemented by each method's config.
pub trait PeftMethod: fmt::Debug + Send + Sync {
    /// The JSON `type` tag.
    fn kind(&self) -> &'static str;

    /// This method's learning rate (`None`: the job's).
    fn lr(&self) -> Option<f64>;

    /// This method's AdamW weight decay.
    fn weight_decay(&self) -> f64;

    /// Checks the options against the model's shapes (and its family's sites).
    fn validate(&self, cfg: &ModelShape) -> PeftResult<()>;

    /// Every trainable tensor: unique name and shape. Shape-only (no weights needed).
    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape>;

    /// Initial values of [`Self::parameters`], as the spec prescribes.
    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>>;

    /// Hands this method's parts to the model's seams.
    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()>;

    /// How this method merges; an error when it cannot.
    fn merge_plan(&self, _params: &Params) -> PeftResult<MergePlan> {
        Ok(MergePlan::Weights)
    }

    /// The optimizer groups of this method's tensors (`names` in [`Self::parameters`]
    /// order). Default: one group with the method's lr and weight decay.
    fn groups(
        &self,
        index: usize,
        params: Vec<(String, Var)>,
        _base: &dyn PeftBase,
    ) -> PeftResult<Vec<ParamGroup>> {
        Ok(vec![ParamGroup {
            name: format!("{index}:{}", self.kind()),
            params,
            lr: self.lr(),
            weight_decay: self.weight_decay(),
            decay_toward: None,
        }])
    }
}

/// The registry: every method, by `type` tag. One line per method.
macro_rules! registry {
    ($($variant:ident($tag:literal) => $ty:ty),* $(,)?) => {
        /// One method's config, tagged by `type` (e.g. `{"type": "lora", ...}`).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type")]
        pub enum MethodConfig {
            $(#[serde(rename = $tag)] $variant($ty),)*
        }

        /// Every valid `type` (plus `"hybrid"`, which stacks several).
        pub const METHOD_TYPES: &[&str] = &[$($tag,)*];

        impl MethodConfig {
            /// The method behind this config.
            pub fn method(&self) -> &dyn PeftMethod {
                match self {
                    $(MethodConfig::$variant(m) => m,)*
                }
            }
        }
    };
}

registry! {
    Lora("lora") => lora::LoraConfig,
    LoraP("lora_p") => lora::LoraPConfig,
    Dora("dora") => dora::DoraConfig,
    DoraP("dora_p") => dora::DoraPConfig,
    ParallelAdapter("parallel_adapter") => parallel::ParallelAdapterConfig,
    Prompt("prompt") => prompt::PromptConfig,
    Affix("affix") => affix::AffixConfig,
    Partial("partial") => partial::PartialConfig,
    AdditionalScan("additional_scan") => additional_scan::AdditionalScanConfig,
    Prodial("prodial") => prodial::ProdialConfig,
    Full("full") => baselines::FullConfig,
    BitFit("bitfit") => baselines::BitFitConfig,
    LinearProbe("linear_probe") => baselines::LinearProbeConfig,
    SllLora("sll_lora") => baselines::SllLoraConfig,
}
