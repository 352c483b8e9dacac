//! A language model of any family, for the code that picks the family at run time (a
//! training job on whatever base it names) or holds several at once (serving: Mamba-1 and
//! Mamba-2 bases side by side). Each variant is the shared shell ([`CausalLm`]) with its
//! family's mixer; [`AnyLm`] only dispatches.
//!
//! [`LanguageModel`] is the object-safe part the training loop and scoring need.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::cache::MambaCache;
use super::family::{self, Family};
use super::lm::{CausalLm, ForwardOutput, Mixer, ModelInput};
use super::lm_checkpoint::{LmConfig, LoadOptions};
use super::mamba::MambaForCausalLM;
use super::mamba2::Mamba2ForCausalLM;
use crate::error::{Error, Result};

/// What the training loop and scoring ask of a language model, whatever its family.
pub trait LanguageModel: Send + Sync {
    fn family(&self) -> Family;
    fn vocab_size(&self) -> usize;
    fn dtype(&self) -> DType;
    /// Logits `[b, L, V]` of validated ids, optionally with a 0/1 mask.
    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;
    /// Logits of a sequence that starts from the state in `cache`.
    fn forward_from(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor>;
}

impl<M: Mixer> LanguageModel for CausalLm<M> {
    fn family(&self) -> Family {
        self.config().family()
    }

    fn vocab_size(&self) -> usize {
        CausalLm::vocab_size(self)
    }

    fn dtype(&self) -> DType {
        CausalLm::dtype(self)
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        CausalLm::forward(self, input_ids, attention_mask)
    }

    fn forward_from(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor> {
        CausalLm::forward_from(self, input, cache)
    }
}

/// A loaded language model of either family.
#[derive(Clone, Debug)]
pub enum AnyLm {
    Mamba(MambaForCausalLM),
    Mamba2(Mamba2ForCausalLM),
}

/// Runs `$body` with `$m` bound to the variant's model.
macro_rules! each {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            AnyLm::Mamba($m) => $body,
            AnyLm::Mamba2($m) => $body,
        }
    };
}

impl From<MambaForCausalLM> for AnyLm {
    fn from(m: MambaForCausalLM) -> Self {
        AnyLm::Mamba(m)
    }
}

impl From<Mamba2ForCausalLM> for AnyLm {
    fn from(m: Mamba2ForCausalLM) -> Self {
        AnyLm::Mamba2(m)
    }
}

impl AnyLm {
    /// Detects the family of `dir` and loads it for inference; an image model is refused.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        match family::detect_dir(dir)? {
            Family::Mamba => Ok(MambaForCausalLM::load(dir, opts)?.into()),
            Family::Mamba2 => Ok(Mamba2ForCausalLM::load(dir, opts)?.into()),
            Family::Vim => Err(Error::Unsupported {
                path: dir.join("config.json"),
                what: "a Vision Mamba classifies images; it is not a language model".into(),
            }),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            AnyLm::Mamba(_) => Family::Mamba,
            AnyLm::Mamba2(_) => Family::Mamba2,
        }
    }

    pub fn vocab_size(&self) -> usize {
        each!(self, m => m.vocab_size())
    }

    pub fn dtype(&self) -> DType {
        each!(self, m => m.dtype())
    }

    /// See [`CausalLm::store_weights_as`].
    pub fn store_weights_as(self, dtype: DType) -> Result<Self> {
        Ok(match self {
            AnyLm::Mamba(m) => AnyLm::Mamba(m.store_weights_as(dtype)?),
            AnyLm::Mamba2(m) => AnyLm::Mamba2(m.store_weights_as(dtype)?),
        })
    }

    pub fn device(&self) -> &Device {
        each!(self, m => m.device())
    }

    pub fn num_layers(&self) -> usize {
        each!(self, m => m.backbone.layers.len())
    }

    /// Ids that end generation, and the padding id, from the config.
    pub fn eos_token_ids(&self) -> &[u32] {
        each!(self, m => m.config().eos_token_ids())
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        each!(self, m => m.config().pad_token_id())
    }

    /// The config as transformers writes it (also the model's structural fingerprint).
    pub fn config_json(&self) -> serde_json::Value {
        each!(self, m => m.config().to_hf_json())
    }

    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        each!(self, m => m.forward(input_ids, attention_mask))
    }

    pub fn forward_with(&self, input: &ModelInput, hidden: bool) -> Result<ForwardOutput> {
        each!(self, m => m.forward_with(input, hidden))
    }

    pub fn forward_from(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor> {
        each!(self, m => m.forward_from(input, cache))
    }

    pub fn new_cache(&self, batch: usize) -> Result<MambaCache> {
        each!(self, m => m.new_cache(batch))
    }

    pub fn prefill(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor> {
        each!(self, m => m.prefill(input, cache))
    }

    pub fn step(&self, tokens: &[u32], cache: &mut MambaCache) -> Result<Tensor> {
        each!(self, m => m.step(tokens, cache))
    }

    pub fn inserts_positions(&self) -> bool {
        each!(self, m => m.inserts_positions())
    }

    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        each!(self, m => m.named_weights())
    }

    /// See [`CausalLm::is_additive_over`]; models of different families never are.
    pub fn is_additive_over(&self, base: &AnyLm) -> bool {
        match (self, base) {
            (AnyLm::Mamba(a), AnyLm::Mamba(b)) => a.is_additive_over(b),
            (AnyLm::Mamba2(a), AnyLm::Mamba2(b)) => a.is_additive_over(b),
            _ => false,
        }
    }

    /// See [`CausalLm::row_segmented`]; every segment must be of this model's family.
    pub fn row_segmented(&self, segments: &[(usize, &AnyLm)]) -> Result<AnyLm> {
        fn same<'a, M: Mixer>(
            segments: &[(usize, &'a AnyLm)],
            pick: impl Fn(&'a AnyLm) -> Option<&'a CausalLm<M>>,
        ) -> Result<Vec<(usize, &'a CausalLm<M>)>> {
            segments
                .iter()
                .map(|(rows, m)| {
                    pick(m).map(|m| (*rows, m)).ok_or_else(|| {
                        Error::input("segments", "a batch mixes models of different families")
                    })
                })
                .collect()
        }
        Ok(match self {
            AnyLm::Mamba(base) => {
                let segs = same(segments, |m| match m {
                    AnyLm::Mamba(x) => Some(x),
                    _ => None,
                })?;
                AnyLm::Mamba(base.row_segmented(&segs)?)
            }
            AnyLm::Mamba2(base) => {
                let segs = same(segments, |m| match m {
                    AnyLm::Mamba2(x) => Some(x),
                    _ => None,
                })?;
                AnyLm::Mamba2(base.row_segmented(&segs)?)
            }
        })
    }
}

impl LanguageModel for AnyLm {
    fn family(&self) -> Family {
        AnyLm::family(self)
    }

    fn vocab_size(&self) -> usize {
        AnyLm::vocab_size(self)
    }

    fn dtype(&self) -> DType {
        AnyLm::dtype(self)
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        AnyLm::forward(self, input_ids, attention_mask)
    }

    fn forward_from(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor> {
        AnyLm::forward_from(self, input, cache)
    }
}
