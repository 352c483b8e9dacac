//! The language-model shell every Mamba language family shares (peft-spec §1.2, §1.5): token
//! embedding, pre-norm residual blocks around a family's [`Mixer`], `norm_f`, the LM head
//! (tied to the embedding unless the checkpoint has its own), input validation, the
//! recurrent cache, prefill and single-token decode. Mamba-1 ([`MambaMixer`]) and Mamba-2
//! ([`Mamba2Mixer`](crate::model::mamba2::Mamba2Mixer)) differ only in the mixer, so
//! generation, scoring, prompt-tuning hooks and serving are written once against
//! [`CausalLm`].
//!
//! Everything is channels-last (`[batch, time, channels]`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::model::cache::{LayerCache, MambaCache};
use crate::model::layers::{Embedding, Param, Projection, RmsNorm, linear_forward};
use crate::model::lm_checkpoint::LmConfig;

/// The sequence mixer of one block: what distinguishes one language family from another.
pub trait Mixer: Clone + std::fmt::Debug + Send + Sync + Sized + 'static {
    /// The family's resolved config.
    type Config: LmConfig<Model = CausalLm<Self>>;

    /// Builds layer `layer_idx` from `vb` (the checkpoint's `backbone.layers.{i}.mixer`).
    fn new(cfg: &Self::Config, layer_idx: usize, vb: VarBuilder) -> Result<Self>;

    /// Full-sequence forward. `u` is the normed block input `[b, L, D]`; `mask` is
    /// `[b, L, 1]` (1 = real token) or `None`. With a cache, the conv history and SSM state
    /// are read from it and written back (prefill, or continuing a prompt).
    fn forward(
        &self,
        u: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor>;

    /// One decode step: `u` is the normed input `[b, D]` of a single new token.
    fn step(&self, u: &Tensor, cache: &mut LayerCache) -> Result<Tensor>;

    /// One decode step through all `blocks` (`h` `[b, D]` in, the last block's output
    /// out). A family with a fused whole-layer step overrides this; the default steps
    /// block by block.
    fn step_blocks(blocks: &[Block<Self>], h: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        step_each(blocks, h, cache)
    }

    /// An empty (zero) cache for `batch` sequences.
    fn new_cache(&self, batch: usize, dtype: DType, device: &Device) -> Result<LayerCache>;

    /// Whether a method inserts positions inside this mixer (affix tokens).
    fn inserts_positions(&self) -> bool {
        false
    }

    /// Every base weight under its checkpoint name below `prefix` (`backbone.layers.{i}.mixer`).
    fn named_weights(&self, prefix: &str, out: &mut Vec<(String, Tensor)>);

    /// The projections, in a fixed order (serving's row-segmented batches pair them up).
    fn projections(&self) -> Vec<&Projection>;
    fn projections_mut(&mut self) -> Vec<&mut Projection>;
    /// The tensor parameters (A_log, D, conv, dt bias, …), in a fixed order.
    fn params(&self) -> Vec<&Param>;
}

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    Ok(vb.get(shape, name)?)
}

/// Multiplies `[b, L, C]` by a `[b, L, 1]` mask.
pub(crate) fn apply_mask(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => x.broadcast_mul(m)?,
        None => x.clone(),
    })
}

/// The conv cache after feeding `x` (`[b, L, E]`, pre-conv) to a conv whose cache was
/// `prev` (`[b, E, K]`): the last K inputs, oldest first. A fresh (zero) cache gives HF's
/// left zero-padding when the prompt is shorter than K.
pub(crate) fn next_conv_state(prev: &Tensor, x: &Tensor) -> Result<Tensor> {
    let k = prev.dim(2)?;
    let len = x.dim(1)?;
    let take = len.min(k);
    let recent = x.narrow(1, len - take, take)?.transpose(1, 2)?; // [b, E, take]
    let joined = Tensor::cat(&[prev, &recent.to_dtype(prev.dtype())?], 2)?;
    Ok(joined.narrow(2, take, k)?.contiguous()?)
}

/// Hook on the model's input sequence, for methods that add positions to it (prompt-tuning
/// inserts soft tokens after the embedding lookup and drops them before the LM head).
pub trait InputHook: Send + Sync + std::fmt::Debug {
    /// Receives the embeddings `[b, L, D]` and the mask `[b, L]`; returns the augmented
    /// embeddings `[b, L', D]`, their mask, and the index of each of the L real tokens in
    /// the augmented sequence (`u32`, `[L]`, increasing).
    fn insert(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)>;
}

/// One decode step block by block ([`Block::step`]).
pub(crate) fn step_each<M: Mixer>(
    blocks: &[Block<M>],
    h: &Tensor,
    cache: &mut MambaCache,
) -> Result<Tensor> {
    let mut h = h.clone();
    for (i, block) in blocks.iter().enumerate() {
        h = block.step(&h, cache.layer_mut(i)?)?;
    }
    Ok(h)
}

/// A residual block: `h + mixer(norm(h))`.
#[derive(Clone, Debug)]
pub struct Block<M> {
    pub norm: RmsNorm,
    pub mixer: M,
}

impl<M: Mixer> Block<M> {
    pub fn new(cfg: &M::Config, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Block {
            norm: RmsNorm::new(
                get(&vb, &[cfg.hidden_size()], "norm.weight")?,
                cfg.norm_epsilon(),
            ),
            mixer: M::new(cfg, layer_idx, vb.pp("mixer"))?,
        })
    }

    pub fn forward(
        &self,
        h: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let u = self.norm.forward(h)?;
        Ok((h + self.mixer.forward(&u, mask, cache)?)?)
    }

    pub fn step(&self, h: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let u = self.norm.forward(h)?;
        Ok((h + self.mixer.step(&u, cache)?)?)
    }
}

/// The backbone: embedding, blocks, final norm (`backbone.*` in checkpoints).
#[derive(Clone, Debug)]
pub struct Backbone<M> {
    pub embeddings: Embedding,
    pub layers: Vec<Block<M>>,
    pub norm_f: RmsNorm,
}

impl<M: Mixer> Backbone<M> {
    pub fn new(cfg: &M::Config, vb: VarBuilder) -> Result<Self> {
        let embeddings = Embedding::new(get(
            &vb,
            &[cfg.vocab_size(), cfg.hidden_size()],
            "embeddings.weight",
        )?);
        let layers = (0..cfg.num_layers())
            .map(|i| Block::new(cfg, i, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm_f = RmsNorm::new(
            get(&vb, &[cfg.hidden_size()], "norm_f.weight")?,
            cfg.norm_epsilon(),
        );
        Ok(Backbone {
            embeddings,
            layers,
            norm_f,
        })
    }

    /// Runs the blocks and the final norm on input embeddings `[b, L, D]`. When `hidden` is
    /// given it receives the embeddings, each block's output and the norm_f output (HF's
    /// `output_hidden_states`, plus norm_f).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut MambaCache>,
        mut hidden: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let mask = match mask {
            Some(m) => Some(m.to_dtype(embeds.dtype())?.unsqueeze(2)?),
            None => None,
        };
        let mut h = embeds.clone();
        if let Some(hs) = hidden.as_deref_mut() {
            hs.push(h.clone());
        }
        for (i, block) in self.layers.iter().enumerate() {
            let layer_cache = match cache.as_deref_mut() {
                Some(c) => Some(c.layer_mut(i)?),
                None => None,
            };
            h = block.forward(&h, mask.as_ref(), layer_cache)?;
            if let Some(hs) = hidden.as_deref_mut() {
                hs.push(h.clone());
            }
        }
        if let Some(c) = cache {
            c.seqlen_offset += embeds.dim(1)?;
        }
        let out = self.norm_f.forward(&h)?;
        if let Some(hs) = hidden {
            hs.push(out.clone());
        }
        Ok(out)
    }

    /// One decode step on embeddings `[b, D]`; returns the normed hidden state `[b, D]`.
    pub fn step_embeds(&self, embeds: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        let h = M::step_blocks(&self.layers, embeds, cache)?;
        cache.seqlen_offset += 1;
        Ok(self.norm_f.forward(&h)?)
    }
}

/// Token ids and an optional attention mask, checked against a vocabulary.
#[derive(Clone, Debug)]
pub struct ModelInput {
    /// `[b, L]`, `u32`.
    pub input_ids: Tensor,
    /// `[b, L]` of 0/1 in the model's dtype; `None` when every position is real.
    pub attention_mask: Option<Tensor>,
}

impl ModelInput {
    /// Validates `input_ids` (`[b, L]`, U32/I64/I32, every id < `vocab_size`, non-empty)
    /// and `attention_mask` (same shape, only 0 and 1). An all-ones mask is dropped.
    pub fn new(
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        vocab_size: usize,
    ) -> Result<Self> {
        let ids = checked_ids(input_ids, "input_ids", vocab_size)?;
        let attention_mask = match attention_mask {
            None => None,
            Some(m) => {
                if m.dims() != ids.dims() {
                    return Err(Error::input(
                        "attention_mask",
                        format!(
                            "shape {:?} does not match input_ids {:?}",
                            m.dims(),
                            ids.dims()
                        ),
                    ));
                }
                let values = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                if let Some((i, v)) = values
                    .iter()
                    .enumerate()
                    .find(|(_, v)| **v != 0.0 && **v != 1.0)
                {
                    return Err(Error::input(
                        "attention_mask",
                        format!("value {v} at flat index {i}; only 0 and 1 are allowed"),
                    ));
                }
                if values.iter().all(|v| *v == 1.0) {
                    None
                } else {
                    Some(m.to_dtype(DType::F32)?)
                }
            }
        };
        Ok(ModelInput {
            input_ids: ids,
            attention_mask,
        })
    }
}

/// Checks and converts a `[b, L]` id tensor to u32.
pub(crate) fn checked_ids(ids: &Tensor, field: &str, vocab_size: usize) -> Result<Tensor> {
    let (b, l) = ids.dims2().map_err(|_| {
        Error::input(
            field,
            format!("expected shape [batch, length], found {:?}", ids.dims()),
        )
    })?;
    if b == 0 || l == 0 {
        return Err(Error::input(
            field,
            format!("empty input (shape [{b}, {l}]); need at least one token"),
        ));
    }
    let values: Vec<i64> = match ids.dtype() {
        DType::U32 => ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::I64 => ids.flatten_all()?.to_vec1::<i64>()?,
        DType::I32 => ids
            .flatten_all()?
            .to_vec1::<i32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::U8 => ids
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        other => {
            return Err(Error::input(
                field,
                format!("dtype {other:?} is not an integer type (expected I64 or U32)"),
            ));
        }
    };
    if let Some((i, v)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| **v < 0 || **v as u64 >= vocab_size as u64)
    {
        return Err(Error::input(
            field,
            format!(
                "token id {v} at [{}, {}] is out of range for a vocabulary of {vocab_size}",
                i / l,
                i % l
            ),
        ));
    }
    let ids = values.into_iter().map(|v| v as u32).collect::<Vec<_>>();
    Ok(Tensor::from_vec(ids, (b, l), &Device::Cpu)?)
}

/// What [`CausalLm::forward_with`] returns.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// `[b, L, V]`.
    pub logits: Tensor,
    /// Embeddings, each block's output, the norm_f output; empty unless requested.
    pub hidden_states: Vec<Tensor>,
}

/// Mamba-1 with its LM head (tied to the embedding unless the checkpoint has its own).
#[derive(Clone, Debug)]
pub struct CausalLm<M: Mixer> {
    pub backbone: Backbone<M>,
    /// `Some` when the head is untied (`lm_head.weight`), `None` when tied.
    pub lm_head: Option<Tensor>,
    /// Inserts positions into the input sequence (prompt-tuning); the logits keep the
    /// input's length and positions.
    pub input_hook: Option<Arc<dyn InputHook>>,
    config: M::Config,
    device: Device,
    dtype: DType,
}

impl<M: Mixer> CausalLm<M> {
    /// Builds the model from `vb`, whose names are HF checkpoint names (`backbone.…`,
    /// `lm_head.weight`). The head is tied unless `lm_head.weight` is present.
    pub fn new(cfg: &M::Config, vb: VarBuilder) -> Result<Self> {
        let backbone = Backbone::new(cfg, vb.pp("backbone"))?;
        let lm_head = if vb.contains_tensor("lm_head.weight") || !cfg.tie_word_embeddings() {
            Some(get(
                &vb,
                &[cfg.vocab_size(), cfg.hidden_size()],
                "lm_head.weight",
            )?)
        } else {
            None
        };
        Ok(CausalLm {
            backbone,
            lm_head,
            input_hook: None,
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &M::Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    /// Keeps the model's matrices — every projection, the embedding and the head — in `dtype`
    /// (bf16: half the bytes each decode step reads). Activations, norms, the SSM parameters
    /// and states stay in the model's dtype, and so do adapters installed later; only
    /// inference reads a stored bf16 matrix directly (`layers::linear_forward`). Train on
    /// the model as loaded. The model's own dtype keeps every tensor as it is.
    pub fn store_weights_as(mut self, dtype: DType) -> Result<Self> {
        self.backbone.embeddings.store_as(dtype)?;
        for block in &mut self.backbone.layers {
            for p in block.mixer.projections_mut() {
                p.base_mut().store_as(dtype)?;
            }
        }
        if let Some(h) = &mut self.lm_head {
            *h = h.to_dtype(dtype)?;
        }
        Ok(self)
    }

    /// Every base weight under its HF checkpoint name (the tied head is not listed twice).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "backbone.embeddings.weight".to_string(),
            self.backbone.embeddings.weight().clone(),
        )];
        for (i, block) in self.backbone.layers.iter().enumerate() {
            let p = format!("backbone.layers.{i}");
            out.push((format!("{p}.norm.weight"), block.norm.weight().clone()));
            block.mixer.named_weights(&format!("{p}.mixer"), &mut out);
        }
        out.push((
            "backbone.norm_f.weight".to_string(),
            self.backbone.norm_f.weight().clone(),
        ));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// The token embeddings `[b, L, D]` of validated ids (see [`ModelInput`]).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_device(&self.device)?;
        Ok(self.backbone.embeddings.forward(&ids)?)
    }

    /// The LM head on normed hidden states `[..., D]` → `[..., V]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self
            .lm_head
            .as_ref()
            .unwrap_or_else(|| self.backbone.embeddings.weight());
        Ok(linear_forward(hidden, w, None)?)
    }

    /// Logits `[b, L, V]` for `input_ids` `[b, L]` (U32/I64), with an optional 0/1 mask.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let input = ModelInput::new(input_ids, attention_mask, self.vocab_size())?;
        Ok(self.forward_with(&input, false)?.logits)
    }

    /// Forward on a validated input, optionally keeping the hidden states.
    pub fn forward_with(
        &self,
        input: &ModelInput,
        output_hidden_states: bool,
    ) -> Result<ForwardOutput> {
        self.forward_inner(input, output_hidden_states, None)
    }

    /// Logits `[b, L, V]` of a sequence that starts from the state in `cache` (a merged
    /// prefix prompt's initial state) instead of from zeros; `cache` holds the state after
    /// it.
    pub fn forward_from(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor> {
        Ok(self.forward_inner(input, false, Some(cache))?.logits)
    }

    fn forward_inner(
        &self,
        input: &ModelInput,
        output_hidden_states: bool,
        cache: Option<&mut MambaCache>,
    ) -> Result<ForwardOutput> {
        let embeds = self.embed(&input.input_ids)?;
        let mask = match &input.attention_mask {
            Some(m) => Some(m.to_device(&self.device)?),
            None => None,
        };
        let (embeds, mask, positions) = self.insert_hooked(embeds, mask)?;
        let mut hidden = Vec::new();
        let h = self.backbone.forward_embeds(
            &embeds,
            mask.as_ref(),
            cache,
            output_hidden_states.then_some(&mut hidden),
        )?;
        let h = match &positions {
            Some(p) => h.index_select(p, 1)?,
            None => h,
        };
        Ok(ForwardOutput {
            logits: self.logits(&h)?,
            hidden_states: hidden,
        })
    }

    /// Applies [`Self::input_hook`], if any: the augmented embeddings and mask, and the
    /// positions of the real tokens.
    pub fn insert_hooked(
        &self,
        embeds: Tensor,
        mask: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        match &self.input_hook {
            Some(hook) => {
                let (e, m, p) = hook.insert(&embeds, mask.as_ref())?;
                Ok((e, m, Some(p.to_device(&self.device)?)))
            }
            None => Ok((embeds, mask, None)),
        }
    }

    /// Whether a method inserts positions into the sequence (prompt or affix tokens): such
    /// a model's prompt must run whole, unpadded.
    pub fn inserts_positions(&self) -> bool {
        self.input_hook.is_some()
            || self
                .backbone
                .layers
                .iter()
                .any(|b| b.mixer.inserts_positions())
    }

    /// An empty (zero) cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<MambaCache> {
        let layers = self
            .backbone
            .layers
            .iter()
            .map(|b| b.mixer.new_cache(batch, self.dtype, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(MambaCache {
            layers,
            seqlen_offset: 0,
        })
    }

    /// Runs a prompt (or the next chunk of one) through the full-sequence path, updating
    /// `cache`. Returns the logits of the last position, `[b, V]`.
    /// An input hook (prompt tokens) applies to the first chunk only, so the tokens enter
    /// the cache once.
    pub fn prefill(&self, input: &ModelInput, cache: &mut MambaCache) -> Result<Tensor> {
        let embeds = self.embed(&input.input_ids)?;
        if self.input_hook.is_some() && cache.seqlen_offset == 0 {
            let mask = match &input.attention_mask {
                Some(m) => Some(m.to_device(&self.device)?),
                None => None,
            };
            let (embeds, mask, positions) = self.insert_hooked(embeds, mask)?;
            let (b, l, _) = embeds.dims3()?;
            if cache.batch_size()? != b {
                return Err(Error::input(
                    "cache",
                    format!(
                        "cache holds {} sequences, input is [{b}, {l}]",
                        cache.batch_size()?
                    ),
                ));
            }
            let h = self
                .backbone
                .forward_embeds(&embeds, mask.as_ref(), Some(cache), None)?;
            // The last *real* token feeds generation (a suffix prompt comes after it).
            let last = match positions {
                Some(p) => {
                    let n = p.dim(0)?;
                    p.narrow(0, n.saturating_sub(1), 1)?
                }
                None => Tensor::new(&[l as u32 - 1], &self.device)?,
            };
            return self.logits(&h.index_select(&last, 1)?.squeeze(1)?);
        }
        self.prefill_embeds(&embeds, input.attention_mask.as_ref(), cache)
    }

    /// [`Self::prefill`] on input embeddings `[b, L, D]` (e.g. with soft prompt tokens
    /// inserted) and an optional `[b, L]` 0/1 mask.
    pub fn prefill_embeds(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut MambaCache,
    ) -> Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        if cache.batch_size()? != b || l == 0 {
            return Err(Error::input(
                "cache",
                format!(
                    "cache holds {} sequences, input is [{b}, {l}]",
                    cache.batch_size()?
                ),
            ));
        }
        let mask = match mask {
            Some(m) => Some(m.to_device(&self.device)?),
            None => None,
        };
        let h = self
            .backbone
            .forward_embeds(embeds, mask.as_ref(), Some(cache), None)?;
        let l = h.dim(1)?;
        // Only the last position feeds generation; skip the head elsewhere.
        self.logits(&h.narrow(1, l - 1, 1)?.squeeze(1)?)
    }

    /// One decode step for `tokens` (`b` ids, one per sequence). Returns logits `[b, V]`.
    pub fn step(&self, tokens: &[u32], cache: &mut MambaCache) -> Result<Tensor> {
        if tokens.len() != cache.batch_size()? {
            return Err(Error::input(
                "tokens",
                format!(
                    "{} tokens for a cache of {} sequences",
                    tokens.len(),
                    cache.batch_size()?
                ),
            ));
        }
        if let Some(t) = tokens.iter().find(|t| **t as usize >= self.vocab_size()) {
            return Err(Error::input(
                "tokens",
                format!(
                    "token id {t} is out of range for a vocabulary of {}",
                    self.vocab_size()
                ),
            ));
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let embeds = self.backbone.embeddings.forward(&ids)?;
        let h = self.backbone.step_embeds(&embeds, cache)?;
        self.logits(&h)
    }
}
