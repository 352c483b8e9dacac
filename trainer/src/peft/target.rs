//! What the PEFT methods see of a model family: its shape ([`ModelShape`]), read access to
//! the base tensors at every site ([`PeftBase`], for initialisation), and the installation of
//! the folded composites ([`PeftModel`]). Mamba-1 and Vim implement both; a method written
//! against these works on every family that has its sites.
//!
//! Per-direction copies: a bidirectional family (Vim) has every branch site — conv1d, x_proj,
//! dt_proj and its bias, A_log, D — once per scan direction ([`Dir`]), with independent
//! parameters; in_proj and out_proj are shared. A method on a branch site therefore makes one
//! instance per direction, named after the checkpoint tensor it modifies (`x_proj_b`,
//! `A_b_log`, …; see [`super::sites::Proj::site_name`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::error::{PeftError, PeftResult};
use super::sites::{Dir, EmbeddingPart, LinearSite, ParamSite, Proj, SiteEmbedding, Slot};
use crate::model::layers::{Param, Projection};
use crate::model::lm_checkpoint::LmConfig;
use crate::model::mamba2::{Mamba2Config, Mamba2Mixer};
use crate::model::selective::SelectiveBranch;
use crate::model::vim::{VimConfig, VimForImageClassification};
use crate::model::{AnyLm, CausalLm, Family, InputHook, MambaConfig, MambaMixer, Mixer, MixerHook};

/// The sizes a method needs, whatever the family. Field names are Mamba-1's.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub family: Family,
    /// D.
    pub hidden_size: usize,
    /// E.
    pub intermediate_size: usize,
    /// N.
    pub state_size: usize,
    /// R.
    pub time_step_rank: usize,
    /// K.
    pub conv_kernel: usize,
    pub num_hidden_layers: usize,
    pub use_conv_bias: bool,
    /// Biases on in_proj / out_proj.
    pub use_bias: bool,
    /// Every base weight's checkpoint name and shape (full fine-tuning's parameters).
    pub weights: Vec<super::ParamShape>,
    /// Scan directions: `[Fwd]`, or `[Fwd, Bwd]` for a bidirectional mixer.
    pub directions: Vec<Dir>,
    /// The token vocabulary of a language model (token-embedding methods); `None` for images.
    pub vocab_size: Option<usize>,
    /// Image classification: the vision sites (class token, position embedding, head).
    pub vision: Option<VisionShape>,
    /// Mamba-2's SSD mixer sizes; `None` for the Mamba-1 selective mixer (Mamba-1, Vim).
    pub ssd: Option<SsdShape>,
    /// The structural fields in a readable form: part of the base identity and of the
    /// "adapter is for another base model" message.
    pub description: String,
}

/// Mamba-2's mixer sizes beyond E, N and K: in_proj rows are `z [E] | x [E] | B [GN] |
/// C [GN] | dt [H]`; A, D and the dt bias are per head; the gated norm has G groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsdShape {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
}

/// The vision-only sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisionShape {
    /// Tokens with the class token: M + 1 (the rows of `pos_embed`).
    pub tokens: usize,
    pub num_classes: usize,
    /// Image channels C and patch size p: the patch embedding's kernel is `[D, C, p, p]`.
    pub channels: usize,
    pub patch_size: usize,
}

impl ModelShape {
    /// The copies of `proj` in one layer: shared projectors once, branch projections once
    /// per direction (none on Mamba-2, which has no x_proj or dt_proj).
    pub fn proj_dirs(&self, proj: Proj) -> &[Dir] {
        match proj {
            Proj::In | Proj::Out => &[Dir::Fwd],
            Proj::X | Proj::Dt if self.ssd.is_some() => &[],
            Proj::X | Proj::Dt => &self.directions,
        }
    }

    /// Rows of in_proj: `2E` (x | z), or Mamba-2's `2E + 2GN + H` (z | x | B | C | dt).
    pub fn in_proj_rows(&self) -> usize {
        let e = self.intermediate_size;
        match self.ssd {
            Some(s) => 2 * e + 2 * s.groups * self.state_size + s.heads,
            None => 2 * e,
        }
    }

    /// Channels of conv1d: E, or Mamba-2's `E + 2GN` (x, B and C).
    pub fn conv_channels(&self) -> usize {
        let e = self.intermediate_size;
        match self.ssd {
            Some(s) => e + 2 * s.groups * self.state_size,
            None => e,
        }
    }

    /// The shape of a mixer parameter: Mamba-2's A, D and dt bias are per head, its conv
    /// covers x, B and C.
    pub fn slot_shape(&self, slot: Slot) -> Vec<usize> {
        let (e, n, k) = (self.intermediate_size, self.state_size, self.conv_kernel);
        let heads = self.ssd.map(|s| s.heads);
        match slot {
            Slot::ALog => heads.map_or(vec![e, n], |h| vec![h]),
            Slot::D => vec![heads.unwrap_or(e)],
            Slot::ConvWeight => vec![self.conv_channels(), 1, k],
            Slot::ConvBias => vec![self.conv_channels()],
            Slot::DtBias | Slot::Norm => vec![e],
            Slot::HeadDtBias => vec![heads.unwrap_or(e)],
        }
    }

    /// Refuses `method` on a projection this family does not have (x_proj / dt_proj on
    /// Mamba-2), listing what the family has.
    pub fn require_proj(&self, method: &str, proj: Proj) -> PeftResult<()> {
        if self.proj_dirs(proj).is_empty() {
            return Err(PeftError::unsupported(
                format!("{method} on {}", proj.name()),
                self.family,
                "it has no such projection (B, C and dt come from in_proj rows: use lora_p \
                 with slice B, C or dt; in_proj and out_proj take LoRA, DoRA and ProDiaL)",
            ));
        }
        Ok(())
    }

    /// Refuses a method that only exists for the Mamba-1 selective mixer.
    pub fn require_selective(&self, method: &str) -> PeftResult<()> {
        if self.ssd.is_some() {
            return Err(PeftError::unsupported(
                method,
                self.family,
                "it exists for the Mamba-1 selective scan only (Mamba-2 supports lora, \
                 lora_p (X, Z, B, C, dt), dora, dora_p, prodial, partial (A_log, D, \
                 conv1d.weight, dt_bias, norm.weight), parallel_adapter, prompt, bitfit, \
                 linear_probe, full)",
            ));
        }
        Ok(())
    }

    /// Every copy of `proj` in the model: `(layer, direction)`, layer by layer.
    pub fn proj_copies(&self, proj: Proj) -> Vec<(usize, Dir)> {
        let dirs = self.proj_dirs(proj).to_vec();
        (0..self.num_hidden_layers)
            .flat_map(|i| dirs.iter().map(move |&d| (i, d)))
            .collect()
    }

    /// The token vocabulary, or an error naming `method` for a family without tokens.
    pub fn vocab(&self, method: &str) -> PeftResult<usize> {
        self.vocab_size
            .ok_or_else(|| PeftError::unsupported(method, self.family, "it has no token embedding"))
    }
}

impl ModelShape {
    /// The shape of the model a parsed `config.json` describes, whatever its family; `path`
    /// is only used in messages.
    pub fn from_config(config: &serde_json::Value, path: &std::path::Path) -> crate::Result<Self> {
        Ok(match crate::model::family::detect(config, path)? {
            Family::Mamba => (&MambaConfig::from_json_str(&config.to_string(), path)?).into(),
            Family::Mamba2 => (&Mamba2Config::from_value(config, path)?).into(),
            Family::Vim => (&VimConfig::from_value(config, path)?).into(),
        })
    }
}

impl From<&ModelShape> for ModelShape {
    fn from(s: &ModelShape) -> Self {
        s.clone()
    }
}

impl From<&MambaConfig> for ModelShape {
    fn from(cfg: &MambaConfig) -> Self {
        ModelShape {
            family: Family::Mamba,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            state_size: cfg.state_size,
            time_step_rank: cfg.time_step_rank,
            conv_kernel: cfg.conv_kernel,
            num_hidden_layers: cfg.num_hidden_layers,
            use_conv_bias: cfg.use_conv_bias,
            use_bias: cfg.use_bias,
            weights: super::baselines::base_shapes(cfg),
            directions: vec![Dir::Fwd],
            vocab_size: Some(cfg.vocab_size),
            vision: None,
            ssd: None,
            description: super::identity::describe(cfg),
        }
    }
}

impl From<&VimConfig> for ModelShape {
    fn from(cfg: &VimConfig) -> Self {
        ModelShape {
            family: Family::Vim,
            hidden_size: cfg.embed_dim,
            intermediate_size: cfg.d_inner(),
            state_size: cfg.d_state,
            time_step_rank: cfg.dt_rank,
            conv_kernel: cfg.d_conv,
            num_hidden_layers: cfg.depth,
            use_conv_bias: cfg.conv_bias,
            use_bias: false,
            weights: vim_weight_shapes(cfg),
            directions: vec![Dir::Fwd, Dir::Bwd],
            vocab_size: None,
            ssd: None,
            vision: Some(VisionShape {
                tokens: cfg.seq_len(),
                num_classes: cfg.num_classes,
                channels: cfg.channels,
                patch_size: cfg.patch_size,
            }),
            description: format!(
                "vim img_size={:?} patch_size={} stride={} channels={} embed_dim={} depth={} \
                 d_state={} d_conv={} expand={} dt_rank={} conv_bias={} num_classes={} \
                 cls={:?} divide_out={}",
                cfg.img_size,
                cfg.patch_size,
                cfg.stride,
                cfg.channels,
                cfg.embed_dim,
                cfg.depth,
                cfg.d_state,
                cfg.d_conv,
                cfg.expand,
                cfg.dt_rank,
                cfg.conv_bias,
                cfg.num_classes,
                cfg.cls_position,
                cfg.divide_out
            ),
        }
    }
}

impl From<&Mamba2Config> for ModelShape {
    fn from(cfg: &Mamba2Config) -> Self {
        ModelShape {
            family: Family::Mamba2,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size(),
            state_size: cfg.state_size,
            time_step_rank: 0,
            conv_kernel: cfg.conv_kernel,
            num_hidden_layers: cfg.num_hidden_layers,
            use_conv_bias: cfg.use_conv_bias,
            use_bias: cfg.use_bias,
            weights: cfg
                .expected_tensors()
                .into_iter()
                .map(|e| (e.name, e.shape))
                .collect(),
            directions: vec![Dir::Fwd],
            vocab_size: Some(cfg.vocab_size),
            vision: None,
            ssd: Some(SsdShape {
                heads: cfg.num_heads,
                head_dim: cfg.head_dim,
                groups: cfg.n_groups,
            }),
            description: format!(
                "mamba2 hidden_size={} num_hidden_layers={} vocab_size={} num_heads={} \
                 head_dim={} state_size={} n_groups={} conv_kernel={} time_step_limit={:?} \
                 use_bias={} use_conv_bias={} tied={}",
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.vocab_size,
                cfg.num_heads,
                cfg.head_dim,
                cfg.state_size,
                cfg.n_groups,
                cfg.conv_kernel,
                cfg.time_step_limit,
                cfg.use_bias,
                cfg.use_conv_bias,
                cfg.tie_word_embeddings,
            ),
        }
    }
}

/// Every weight of a Vim with `cfg`'s shapes, under hustvl's names (shape-only; the twin of
/// `VimForImageClassification::named_weights`).
fn vim_weight_shapes(cfg: &VimConfig) -> Vec<super::ParamShape> {
    let (d, e, n, r, k) = (
        cfg.embed_dim,
        cfg.d_inner(),
        cfg.d_state,
        cfg.dt_rank,
        cfg.d_conv,
    );
    let p = cfg.patch_size;
    let mut out = vec![
        (
            "patch_embed.proj.weight".to_string(),
            vec![d, cfg.channels, p, p],
        ),
        ("patch_embed.proj.bias".to_string(), vec![d]),
        ("cls_token".to_string(), vec![1, 1, d]),
        ("pos_embed".to_string(), vec![1, cfg.seq_len(), d]),
    ];
    for i in 0..cfg.depth {
        let m = format!("layers.{i}.mixer");
        out.push((format!("layers.{i}.norm.weight"), vec![d]));
        out.push((format!("{m}.in_proj.weight"), vec![2 * e, d]));
        out.push((format!("{m}.out_proj.weight"), vec![d, e]));
        for s in ["", "_b"] {
            out.push((format!("{m}.conv1d{s}.weight"), vec![e, 1, k]));
            if cfg.conv_bias {
                out.push((format!("{m}.conv1d{s}.bias"), vec![e]));
            }
            out.push((format!("{m}.x_proj{s}.weight"), vec![r + 2 * n, e]));
            out.push((format!("{m}.dt_proj{s}.weight"), vec![e, r]));
            out.push((format!("{m}.dt_proj{s}.bias"), vec![e]));
            out.push((format!("{m}.A{s}_log"), vec![e, n]));
            out.push((format!("{m}.D{s}"), vec![e]));
        }
    }
    out.push(("norm_f.weight".to_string(), vec![d]));
    out.push(("head.weight".to_string(), vec![cfg.num_classes, d]));
    out.push(("head.bias".to_string(), vec![cfg.num_classes]));
    out
}

/// Read access to a base model, for methods' initial values (DoRA's magnitudes, ProDiaL's
/// identity start, Additional-scan's neighbour copy, full fine-tuning's copy).
pub trait PeftBase {
    fn peft_shape(&self) -> ModelShape;
    /// The matrix at `site` (shared projectors are `Dir::Fwd`).
    fn projection(&self, site: LinearSite) -> Option<&Projection>;
    fn param(&self, site: ParamSite) -> Option<&Param>;
    /// Every base tensor under its checkpoint name.
    fn named_weights(&self) -> Vec<(String, Tensor)>;
    /// The token embedding matrix `[V, D]` (language models).
    fn token_embedding(&self) -> Option<&Tensor> {
        None
    }
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
}

/// The base weight of `proj` at `(layer, dir)` in the model's dtype (however it is stored),
/// or an error naming the missing site.
pub(crate) fn base_weight(
    base: &dyn PeftBase,
    layer: usize,
    proj: Proj,
    dir: Dir,
) -> PeftResult<Tensor> {
    let p = base
        .projection(LinearSite::Mixer(layer, proj, dir))
        .ok_or_else(|| missing_site(base, format!("layers.{layer}.{}", proj.site_name(dir))))?;
    Ok(p.base().weight_as(base.dtype())?)
}

/// The base value of a parameter site, or an error naming it.
pub(crate) fn base_param(base: &dyn PeftBase, site: ParamSite) -> PeftResult<&Tensor> {
    base.param(site)
        .map(Param::base)
        .ok_or_else(|| missing_site(base, site.name()))
}

fn missing_site(base: &dyn PeftBase, name: String) -> PeftError {
    PeftError::Contradictory(format!(
        "the base model ({}) has no `{name}`",
        base.peft_shape().description
    ))
}

fn no_layer(i: usize, n: usize) -> PeftError {
    PeftError::Contradictory(format!(
        "a method targets layer {i}, but the model has {n} layers"
    ))
}

/// A model the folded composites can be installed on.
pub trait PeftModel: PeftBase + Clone + Sized {
    fn projection_mut(&mut self, site: LinearSite) -> Option<&mut Projection>;
    fn param_mut(&mut self, site: ParamSite) -> Option<&mut Param>;
    /// The family-specific seams (token embedding, sequence hooks, heads); see [`Extras`].
    fn install(&mut self, extras: Extras) -> PeftResult<()>;
    /// The same architecture with these tensors as its weights (full fine-tuning).
    fn with_weights(&self, tensors: HashMap<String, Tensor>) -> PeftResult<Self>;
    /// Whether any seam already holds an adapter.
    fn has_adapters(&self) -> bool;

    /// A plain model whose weights are the merged values of every composite of `self` (an
    /// adapted model built on `base`); an error where a part has no merged form.
    fn merged_weights(&self, base: &Self) -> PeftResult<Self>;
}

/// What a family installs itself: seams that are not a projection or a parameter of a
/// mixer. A family without a seam refuses a method that needs it, naming both.
#[derive(Default)]
pub struct Extras {
    pub embedding: Vec<Arc<dyn EmbeddingPart>>,
    pub mixer_hooks: BTreeMap<usize, Arc<dyn MixerHook>>,
    pub input_hook: Option<Arc<dyn InputHook>>,
    pub lm_head: Option<Tensor>,
    /// A classification head's `(weight [C, D], bias [C])`.
    pub head: Option<(Tensor, Tensor)>,
}

// ---- Language models (Mamba-1, Mamba-2) ----------------------------------------------------

/// What a language family's mixer tells PEFT: its sites, by projection and slot. The rest of
/// a language model (token embedding, prompt hooks, LM head) is the shared shell's, so
/// [`PeftBase`] and [`PeftModel`] are written once for every [`CausalLm`].
pub trait MixerSites: Mixer {
    /// The shape PEFT reads from a config of this family.
    fn shape_of(cfg: &Self::Config) -> ModelShape;
    fn projection(&self, proj: Proj) -> Option<&Projection>;
    fn projection_mut(&mut self, proj: Proj) -> Option<&mut Projection>;
    fn param(&self, slot: Slot) -> Option<&Param>;
    fn param_mut(&mut self, slot: Slot) -> Option<&mut Param>;
    /// Installs a sequence hook (affix tokens); families without one refuse.
    fn set_hook(&mut self, hook: Arc<dyn MixerHook>) -> PeftResult<()>;
    fn has_hook(&self) -> bool;
    /// The config of a model built from merged `tensors` (checkpoint names): Mamba-1 takes
    /// an expanded state size from `A_log`; `untie` records an untied head.
    fn merged_config(
        cfg: &Self::Config,
        tensors: &HashMap<String, Tensor>,
        untie: bool,
    ) -> PeftResult<Self::Config>;
}

/// The slots every language mixer may have, in checkpoint order.
const SLOTS: [Slot; 7] = [
    Slot::ALog,
    Slot::D,
    Slot::ConvWeight,
    Slot::ConvBias,
    Slot::DtBias,
    Slot::HeadDtBias,
    Slot::Norm,
];

const PROJS: [Proj; 4] = [Proj::In, Proj::X, Proj::Dt, Proj::Out];

impl<M: MixerSites> PeftBase for CausalLm<M> {
    fn peft_shape(&self) -> ModelShape {
        M::shape_of(self.config())
    }

    fn projection(&self, site: LinearSite) -> Option<&Projection> {
        let LinearSite::Mixer(layer, proj, Dir::Fwd) = site else {
            return None;
        };
        self.backbone.layers.get(layer)?.mixer.projection(proj)
    }

    fn param(&self, site: ParamSite) -> Option<&Param> {
        let ParamSite::Mixer(layer, slot, Dir::Fwd) = site else {
            return None;
        };
        self.backbone.layers.get(layer)?.mixer.param(slot)
    }

    fn named_weights(&self) -> Vec<(String, Tensor)> {
        CausalLm::named_weights(self)
    }

    fn token_embedding(&self) -> Option<&Tensor> {
        Some(self.backbone.embeddings.weight())
    }

    fn device(&self) -> &Device {
        CausalLm::device(self)
    }

    fn dtype(&self) -> DType {
        CausalLm::dtype(self)
    }
}

impl<M: MixerSites> PeftModel for CausalLm<M> {
    fn projection_mut(&mut self, site: LinearSite) -> Option<&mut Projection> {
        let LinearSite::Mixer(layer, proj, Dir::Fwd) = site else {
            return None;
        };
        self.backbone
            .layers
            .get_mut(layer)?
            .mixer
            .projection_mut(proj)
    }

    fn param_mut(&mut self, site: ParamSite) -> Option<&mut Param> {
        let ParamSite::Mixer(layer, slot, Dir::Fwd) = site else {
            return None;
        };
        self.backbone.layers.get_mut(layer)?.mixer.param_mut(slot)
    }

    fn install(&mut self, extras: Extras) -> PeftResult<()> {
        let family = self.peft_shape().family;
        if extras.head.is_some() {
            return Err(PeftError::unsupported(
                "a classification head",
                family,
                "a language model predicts tokens (use linear_probe for its LM head)",
            ));
        }
        if !extras.embedding.is_empty() {
            self.backbone
                .embeddings
                .set_adapter(Some(Arc::new(SiteEmbedding {
                    parts: extras.embedding,
                })));
        }
        let n = self.backbone.layers.len();
        for (i, hook) in extras.mixer_hooks {
            let layer = self.backbone.layers.get_mut(i);
            layer.ok_or_else(|| no_layer(i, n))?.mixer.set_hook(hook)?;
        }
        if let Some(h) = extras.input_hook {
            self.input_hook = Some(h);
        }
        if let Some(head) = extras.lm_head {
            self.lm_head = Some(head);
        }
        Ok(())
    }

    fn with_weights(&self, tensors: HashMap<String, Tensor>) -> PeftResult<Self> {
        let vb = candle_nn::VarBuilder::from_tensors(tensors, self.dtype(), self.device());
        Ok(CausalLm::new(self.config(), vb)?)
    }

    fn merged_weights(&self, base: &Self) -> PeftResult<Self> {
        super::merge::merged_weights(self, base)
    }

    fn has_adapters(&self) -> bool {
        self.input_hook.is_some()
            || self.backbone.embeddings.adapter().is_some()
            || self.backbone.layers.iter().any(|b| {
                let m = &b.mixer;
                m.has_hook()
                    || PROJS
                        .iter()
                        .filter_map(|p| m.projection(*p))
                        .any(|p| p.adapter().is_some())
                    || SLOTS
                        .iter()
                        .filter_map(|s| m.param(*s))
                        .any(|p| p.adapter().is_some())
            })
    }
}

/// Runs `$body` with `$m` bound to the [`AnyLm`] variant's model.
macro_rules! each_lm {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            AnyLm::Mamba($m) => $body,
            AnyLm::Mamba2($m) => $body,
        }
    };
}

impl PeftBase for AnyLm {
    fn peft_shape(&self) -> ModelShape {
        each_lm!(self, m => m.peft_shape())
    }

    fn projection(&self, site: LinearSite) -> Option<&Projection> {
        each_lm!(self, m => PeftBase::projection(m, site))
    }

    fn param(&self, site: ParamSite) -> Option<&Param> {
        each_lm!(self, m => PeftBase::param(m, site))
    }

    fn named_weights(&self) -> Vec<(String, Tensor)> {
        AnyLm::named_weights(self)
    }

    fn token_embedding(&self) -> Option<&Tensor> {
        each_lm!(self, m => m.token_embedding())
    }

    fn device(&self) -> &Device {
        AnyLm::device(self)
    }

    fn dtype(&self) -> DType {
        AnyLm::dtype(self)
    }
}

impl PeftModel for AnyLm {
    fn projection_mut(&mut self, site: LinearSite) -> Option<&mut Projection> {
        each_lm!(self, m => m.projection_mut(site))
    }

    fn param_mut(&mut self, site: ParamSite) -> Option<&mut Param> {
        each_lm!(self, m => m.param_mut(site))
    }

    fn install(&mut self, extras: Extras) -> PeftResult<()> {
        each_lm!(self, m => m.install(extras))
    }

    fn with_weights(&self, tensors: HashMap<String, Tensor>) -> PeftResult<Self> {
        Ok(match self {
            AnyLm::Mamba(m) => AnyLm::Mamba(m.with_weights(tensors)?),
            AnyLm::Mamba2(m) => AnyLm::Mamba2(m.with_weights(tensors)?),
        })
    }

    fn has_adapters(&self) -> bool {
        each_lm!(self, m => m.has_adapters())
    }

    fn merged_weights(&self, base: &Self) -> PeftResult<Self> {
        match (self, base) {
            (AnyLm::Mamba(a), AnyLm::Mamba(b)) => Ok(AnyLm::Mamba(a.merged_weights(b)?)),
            (AnyLm::Mamba2(a), AnyLm::Mamba2(b)) => Ok(AnyLm::Mamba2(a.merged_weights(b)?)),
            _ => Err(PeftError::Contradictory(
                "the adapted model and its base are of different families".into(),
            )),
        }
    }
}

/// A language mixer's sites under their checkpoint names (below
/// `backbone.layers.{i}.mixer.`), for merging.
pub(crate) struct NamedSites<'a> {
    pub projections: Vec<(&'static str, &'a Projection)>,
    pub params: Vec<(&'static str, &'a Param)>,
}

/// Every projection and parameter `m` has.
pub(crate) fn mixer_sites<M: MixerSites>(m: &M) -> NamedSites<'_> {
    NamedSites {
        projections: PROJS
            .iter()
            .filter_map(|p| Some((p.name(), m.projection(*p)?)))
            .collect(),
        params: SLOTS
            .iter()
            .filter_map(|s| Some((s.name(), m.param(*s)?)))
            .collect(),
    }
}

impl MixerSites for MambaMixer {
    fn shape_of(cfg: &MambaConfig) -> ModelShape {
        cfg.into()
    }

    fn projection(&self, proj: Proj) -> Option<&Projection> {
        Some(match proj {
            Proj::In => &self.in_proj,
            Proj::X => &self.branch.x_proj,
            Proj::Dt => &self.branch.dt_proj,
            Proj::Out => &self.out_proj,
        })
    }

    fn projection_mut(&mut self, proj: Proj) -> Option<&mut Projection> {
        Some(match proj {
            Proj::In => &mut self.in_proj,
            Proj::X => &mut self.branch.x_proj,
            Proj::Dt => &mut self.branch.dt_proj,
            Proj::Out => &mut self.out_proj,
        })
    }

    fn param(&self, slot: Slot) -> Option<&Param> {
        branch_param(&self.branch, slot)
    }

    fn param_mut(&mut self, slot: Slot) -> Option<&mut Param> {
        branch_param_mut(&mut self.branch, slot)
    }

    fn set_hook(&mut self, hook: Arc<dyn MixerHook>) -> PeftResult<()> {
        self.hook = Some(hook);
        Ok(())
    }

    fn has_hook(&self) -> bool {
        self.hook.is_some()
    }

    fn merged_config(
        cfg: &MambaConfig,
        tensors: &HashMap<String, Tensor>,
        untie: bool,
    ) -> PeftResult<MambaConfig> {
        let mut cfg = cfg.clone();
        // Additional-scan merges into an expanded state: every layer must agree on it.
        let widths: std::collections::BTreeSet<usize> = tensors
            .iter()
            .filter(|(n, _)| n.ends_with(".mixer.A_log"))
            .map(|(_, a)| a.dim(1))
            .collect::<candle_core::Result<_>>()?;
        match widths.len() {
            0 => {}
            1 => cfg.state_size = widths.into_iter().next().unwrap_or(cfg.state_size),
            _ => {
                return Err(PeftError::Contradictory(
                    "layers end up with different state sizes; a merged checkpoint needs one"
                        .into(),
                ));
            }
        }
        if untie {
            cfg.tie_word_embeddings = false;
        }
        Ok(cfg)
    }
}

impl MixerSites for Mamba2Mixer {
    fn shape_of(cfg: &Mamba2Config) -> ModelShape {
        cfg.into()
    }

    fn projection(&self, proj: Proj) -> Option<&Projection> {
        match proj {
            Proj::In => Some(&self.in_proj),
            Proj::Out => Some(&self.out_proj),
            Proj::X | Proj::Dt => None,
        }
    }

    fn projection_mut(&mut self, proj: Proj) -> Option<&mut Projection> {
        match proj {
            Proj::In => Some(&mut self.in_proj),
            Proj::Out => Some(&mut self.out_proj),
            Proj::X | Proj::Dt => None,
        }
    }

    fn param(&self, slot: Slot) -> Option<&Param> {
        match slot {
            Slot::ALog => Some(&self.a_log),
            Slot::D => Some(&self.d),
            Slot::ConvWeight => Some(&self.conv_weight),
            Slot::ConvBias => self.conv_bias.as_ref(),
            Slot::HeadDtBias => Some(&self.dt_bias),
            Slot::Norm => Some(&self.norm),
            Slot::DtBias => None,
        }
    }

    fn param_mut(&mut self, slot: Slot) -> Option<&mut Param> {
        match slot {
            Slot::ALog => Some(&mut self.a_log),
            Slot::D => Some(&mut self.d),
            Slot::ConvWeight => Some(&mut self.conv_weight),
            Slot::ConvBias => self.conv_bias.as_mut(),
            Slot::HeadDtBias => Some(&mut self.dt_bias),
            Slot::Norm => Some(&mut self.norm),
            Slot::DtBias => None,
        }
    }

    fn set_hook(&mut self, _hook: Arc<dyn MixerHook>) -> PeftResult<()> {
        Err(PeftError::unsupported(
            "affix-tuning",
            Family::Mamba2,
            "its mixer takes no sequence hook",
        ))
    }

    fn has_hook(&self) -> bool {
        false
    }

    fn merged_config(
        cfg: &Mamba2Config,
        _tensors: &HashMap<String, Tensor>,
        untie: bool,
    ) -> PeftResult<Mamba2Config> {
        let mut cfg = cfg.clone();
        if untie {
            cfg.tie_word_embeddings = false;
        }
        Ok(cfg)
    }
}

fn branch_param(b: &SelectiveBranch, slot: Slot) -> Option<&Param> {
    match slot {
        Slot::ALog => Some(&b.a_log),
        Slot::D => Some(&b.d),
        Slot::ConvWeight => Some(&b.conv_weight),
        Slot::ConvBias => b.conv_bias.as_ref(),
        Slot::DtBias => Some(&b.dt_bias),
        Slot::HeadDtBias | Slot::Norm => None,
    }
}

fn branch_param_mut(b: &mut SelectiveBranch, slot: Slot) -> Option<&mut Param> {
    match slot {
        Slot::ALog => Some(&mut b.a_log),
        Slot::D => Some(&mut b.d),
        Slot::ConvWeight => Some(&mut b.conv_weight),
        Slot::ConvBias => b.conv_bias.as_mut(),
        Slot::DtBias => Some(&mut b.dt_bias),
        Slot::HeadDtBias | Slot::Norm => None,
    }
}

fn branch_params(b: &SelectiveBranch) -> impl Iterator<Item = &Param> {
    [&b.a_log, &b.d, &b.conv_weight, &b.dt_bias]
        .into_iter()
        .chain(b.conv_bias.as_ref())
}

// ---- Vim -----------------------------------------------------------------------------------

impl PeftBase for VimForImageClassification {
    fn peft_shape(&self) -> ModelShape {
        (&self.config).into()
    }

    fn projection(&self, site: LinearSite) -> Option<&Projection> {
        let LinearSite::Mixer(layer, proj, dir) = site else {
            return Some(&self.patch_embed.proj);
        };
        let m = &self.layers.get(layer)?.mixer;
        let branch = match dir {
            Dir::Fwd => &m.forward_branch,
            Dir::Bwd => &m.backward_branch,
        };
        match (proj, dir) {
            (Proj::In, Dir::Fwd) => Some(&m.in_proj),
            (Proj::Out, Dir::Fwd) => Some(&m.out_proj),
            (Proj::In | Proj::Out, Dir::Bwd) => None,
            (Proj::X, _) => Some(&branch.x_proj),
            (Proj::Dt, _) => Some(&branch.dt_proj),
        }
    }

    fn param(&self, site: ParamSite) -> Option<&Param> {
        match site {
            ParamSite::Mixer(layer, slot, dir) => {
                let m = &self.layers.get(layer)?.mixer;
                match dir {
                    Dir::Fwd => branch_param(&m.forward_branch, slot),
                    Dir::Bwd => branch_param(&m.backward_branch, slot),
                }
            }
            ParamSite::ClsToken => Some(&self.cls_token),
            ParamSite::PosEmbed => Some(&self.pos_embed),
        }
    }

    fn named_weights(&self) -> Vec<(String, Tensor)> {
        VimForImageClassification::named_weights(self)
    }

    fn device(&self) -> &Device {
        self.head.weight().device()
    }

    fn dtype(&self) -> DType {
        self.head.weight().dtype()
    }
}

impl PeftModel for VimForImageClassification {
    fn projection_mut(&mut self, site: LinearSite) -> Option<&mut Projection> {
        let LinearSite::Mixer(layer, proj, dir) = site else {
            return Some(&mut self.patch_embed.proj);
        };
        let m = &mut self.layers.get_mut(layer)?.mixer;
        match (proj, dir) {
            (Proj::In, Dir::Fwd) => Some(&mut m.in_proj),
            (Proj::Out, Dir::Fwd) => Some(&mut m.out_proj),
            (Proj::In | Proj::Out, Dir::Bwd) => None,
            (Proj::X, Dir::Fwd) => Some(&mut m.forward_branch.x_proj),
            (Proj::X, Dir::Bwd) => Some(&mut m.backward_branch.x_proj),
            (Proj::Dt, Dir::Fwd) => Some(&mut m.forward_branch.dt_proj),
            (Proj::Dt, Dir::Bwd) => Some(&mut m.backward_branch.dt_proj),
        }
    }

    fn param_mut(&mut self, site: ParamSite) -> Option<&mut Param> {
        match site {
            ParamSite::Mixer(layer, slot, dir) => {
                let m = &mut self.layers.get_mut(layer)?.mixer;
                match dir {
                    Dir::Fwd => branch_param_mut(&mut m.forward_branch, slot),
                    Dir::Bwd => branch_param_mut(&mut m.backward_branch, slot),
                }
            }
            ParamSite::ClsToken => Some(&mut self.cls_token),
            ParamSite::PosEmbed => Some(&mut self.pos_embed),
        }
    }

    fn install(&mut self, extras: Extras) -> PeftResult<()> {
        let refuse =
            |method: &str, why: &str| Err(PeftError::unsupported(method, Family::Vim, why));
        if !extras.embedding.is_empty() {
            return refuse("a token-embedding method", "it has no token embedding");
        }
        if extras.lm_head.is_some() {
            return refuse(
                "an LM head",
                "it classifies images (its head is always trained)",
            );
        }
        if let Some((w, b)) = extras.head {
            self.head = crate::model::layers::Linear::new(w, Some(b));
        }
        if let Some(h) = extras.input_hook {
            self.input_hook = Some(h);
        }
        let n = self.layers.len();
        for (i, hook) in extras.mixer_hooks {
            let layer = self.layers.get_mut(i);
            layer.ok_or_else(|| no_layer(i, n))?.mixer.hook = Some(hook);
        }
        Ok(())
    }

    /// The state size comes from `A_log`'s width, so an Additional-scan merge (N + N′
    /// columns) builds an expanded-state model.
    fn with_weights(&self, tensors: HashMap<String, Tensor>) -> PeftResult<Self> {
        let mut cfg = self.config.clone();
        if let Some(a) = tensors.get("layers.0.mixer.A_log") {
            cfg.d_state = a.dim(1)?;
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, self.dtype(), self.device());
        Ok(VimForImageClassification::new(&cfg, vb)?)
    }

    fn merged_weights(&self, _base: &Self) -> PeftResult<Self> {
        let not_mergeable = |site: String| PeftError::NotMergeable {
            method: site,
            reason: "a part attached there has no merged form".into(),
        };
        let shape = self.peft_shape();
        // The current values (the adapter's head is installed already), then every adapted
        // site's merged value under its checkpoint name.
        let mut t: HashMap<String, Tensor> = self.named_weights().into_iter().collect();
        for i in 0..shape.num_hidden_layers {
            for proj in [Proj::In, Proj::X, Proj::Dt, Proj::Out] {
                for &dir in shape.proj_dirs(proj) {
                    let name = format!("layers.{i}.mixer.{}.weight", proj.site_name(dir));
                    let Some(p) = self.projection(LinearSite::Mixer(i, proj, dir)) else {
                        continue;
                    };
                    if let Some(a) = p.adapter() {
                        let w = a.merged_weight(p.base())?;
                        t.insert(name.clone(), w.ok_or_else(|| not_mergeable(name))?);
                    }
                }
            }
            for slot in [
                Slot::ALog,
                Slot::D,
                Slot::ConvWeight,
                Slot::ConvBias,
                Slot::DtBias,
            ] {
                for &dir in &shape.directions {
                    if let Some(p) = self.param(ParamSite::Mixer(i, slot, dir))
                        && p.adapter().is_some()
                    {
                        let name = format!("layers.{i}.mixer.{}", slot.site_name(dir));
                        t.insert(name, p.value()?.detach());
                    }
                }
            }
        }
        if let Some(a) = self.patch_embed.proj.adapter() {
            let w = a
                .merged_weight(self.patch_embed.proj.base())?
                .ok_or_else(|| not_mergeable("patch_embed".into()))?;
            let kernel = self.patch_embed.kernel_shape();
            t.insert("patch_embed.proj.weight".into(), w.reshape(kernel)?);
        }
        for (site, p) in [
            (ParamSite::ClsToken, &self.cls_token),
            (ParamSite::PosEmbed, &self.pos_embed),
        ] {
            if p.adapter().is_some() {
                t.insert(site.name(), p.value()?.detach());
            }
        }
        let widths: std::collections::BTreeSet<usize> = t
            .iter()
            .filter(|(n, _)| n.ends_with("_log"))
            .map(|(_, a)| a.dim(1))
            .collect::<candle_core::Result<_>>()?;
        if widths.len() > 1 {
            return Err(PeftError::Contradictory(
                "layers end up with different state sizes; a merged checkpoint needs one".into(),
            ));
        }
        self.with_weights(t)
    }

    fn has_adapters(&self) -> bool {
        self.input_hook.is_some()
            || self.patch_embed.proj.adapter().is_some()
            || self.layers.iter().any(|b| b.mixer.hook.is_some())
            || self.cls_token.adapter().is_some()
            || self.pos_embed.adapter().is_some()
            || self.layers.iter().any(|b| {
                let m = &b.mixer;
                [&m.in_proj, &m.out_proj]
                    .into_iter()
                    .chain(
                        [&m.forward_branch, &m.backward_branch]
                            .into_iter()
                            .flat_map(|br| [&br.x_proj, &br.dt_proj]),
                    )
                    .any(|p| p.adapter().is_some())
                    || [&m.forward_branch, &m.backward_branch]
                        .into_iter()
                        .flat_map(branch_params)
                        .any(|p| p.adapter().is_some())
            })
    }
}
