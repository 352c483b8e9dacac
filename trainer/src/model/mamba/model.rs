//! Mamba-1 language model (peft-spec §1.2), one struct per module, built from a
//! [`VarBuilder`] whose paths are the checkpoint's tensor names (HF naming). The same code
//! serves training (weights are `Var`s from a `VarMap`, or frozen tensors plus adapters) and
//! inference (frozen tensors, cache-driven decoding).
//!
//! Everything is channels-last (`[batch, time, channels]`), the layout the kernels take, so
//! the forward never transposes.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::cache::{LayerCache, MambaCache};
use super::config::MambaConfig;
use crate::error::{Error, Result};
use crate::model::layers::{Embedding, Linear, Projection, RmsNorm, linear_forward};
use crate::model::selective::{BranchDims, BranchInput, BranchRef, SelectiveBranch};

/// Hook into a mixer's sequence path, for methods that add positions inside a layer
/// (affix-tuning inserts soft tokens after in_proj and drops them after out_proj).
pub trait MixerHook: Send + Sync + std::fmt::Debug {
    /// Receives the in_proj output `xz` `[b, L, 2E]` (X then Z) and the mask `[b, L, 1]`;
    /// returns the sequence the conv and scan run on, and its mask.
    fn before_conv(
        &self,
        layer: usize,
        xz: Tensor,
        mask: Option<Tensor>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let _ = layer;
        Ok((xz, mask))
    }

    /// A bidirectional mixer's tokens `[n, 2E]` (X then Z) for one scan direction: prepended
    /// to that direction's sequence in its own scan order, their outputs dropped before the
    /// directions are combined. `None`: this hook does not act per direction.
    fn direction_prefix(
        &self,
        layer: usize,
        backward: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let _ = (layer, backward);
        Ok(None)
    }

    /// Receives the out_proj output for the augmented sequence; returns `[b, L, D]`.
    fn after_out(&self, layer: usize, out: Tensor) -> candle_core::Result<Tensor> {
        let _ = layer;
        Ok(out)
    }
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

/// The selective-SSM mixer of one layer: in_proj, the selective branch (conv1d, x_proj,
/// dt_proj and its bias, `A_log`, `D`; see [`SelectiveBranch`]), out_proj.
#[derive(Clone, Debug)]
pub struct MambaMixer {
    pub in_proj: Projection,
    /// `A_log` is `[E, N]`; N is read from it, not from the config, so extra state
    /// dimensions need no change to this code.
    pub branch: SelectiveBranch,
    pub out_proj: Projection,
    pub hook: Option<Arc<dyn MixerHook>>,
    layer_idx: usize,
    d_inner: usize,
}

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    Ok(vb.get(shape, name)?)
}

impl MambaMixer {
    pub fn new(cfg: &MambaConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let (d_model, e, n, r, k) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.state_size,
            cfg.time_step_rank,
            cfg.conv_kernel,
        );
        let in_bias = if cfg.use_bias {
            Some(get(&vb, &[2 * e], "in_proj.bias")?)
        } else {
            None
        };
        let out_bias = if cfg.use_bias {
            Some(get(&vb, &[d_model], "out_proj.bias")?)
        } else {
            None
        };
        let dims = BranchDims {
            d_inner: e,
            d_state: n,
            dt_rank: r,
            d_conv: k,
            conv_bias: cfg.use_conv_bias,
        };
        Ok(MambaMixer {
            in_proj: Projection::new(Linear::new(
                get(&vb, &[2 * e, d_model], "in_proj.weight")?,
                in_bias,
            )),
            branch: SelectiveBranch::new(dims, "", layer_idx, &vb)?,
            out_proj: Projection::new(Linear::new(
                get(&vb, &[d_model, e], "out_proj.weight")?,
                out_bias,
            )),
            hook: None,
            layer_idx,
            d_inner: e,
        })
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }

    pub fn d_inner(&self) -> usize {
        self.d_inner
    }

    /// The SSM state width N (including any extra dimensions an adapter adds).
    pub fn state_size(&self) -> Result<usize> {
        Ok(self.branch.a_log.value()?.dim(1)?)
    }

    pub fn conv_kernel(&self) -> usize {
        self.branch
            .conv_weight
            .base()
            .dims()
            .last()
            .copied()
            .unwrap_or(1)
    }

    /// This mixer's selective branch (conv1d → x_proj → dt_proj → scan), the code shared
    /// with every family built on the Mamba-1 branch ([`crate::model::selective`]).
    pub fn branch(&self) -> BranchRef<'_> {
        self.branch.as_ref()
    }

    /// Full-sequence forward. `u` is the normed block input `[b, L, D]`; `mask` is
    /// `[b, L, 1]` (1 = real token) or `None`. With a cache, the conv history and SSM state
    /// are read from it and written back (prefill, or continuing a prompt).
    pub fn forward(
        &self,
        u: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let e = self.d_inner;
        let xz = self.in_proj.forward(u)?;
        let (xz, mask) = match &self.hook {
            Some(h) => h.before_conv(self.layer_idx, xz, mask.cloned())?,
            None => (xz, mask.cloned()),
        };
        let mask = mask.as_ref();
        let x = xz.narrow(D::Minus1, 0, e)?;
        let z = xz.narrow(D::Minus1, e, e)?.contiguous()?;
        // HF zeroes padded positions of X (after in_proj) and of the conv output, so the SSM
        // state stays exactly zero through left padding.
        let x = apply_mask(&x, mask)?.contiguous()?;
        let k = self.conv_kernel();
        let history = match &cache {
            // The kernels may require contiguous inputs; this view is small.
            Some(c) => Some(c.conv.narrow(2, 1, k - 1)?.contiguous()?),
            None => None,
        };
        let init = cache.as_ref().map(|c| c.ssm.clone());
        let (y, last) = self.branch().forward(
            &x,
            &z,
            BranchInput {
                mask,
                conv_history: history.as_ref(),
                initial_state: init.as_ref(),
                reverse: false,
            },
        )?;
        if let Some(c) = cache {
            c.conv = next_conv_state(&c.conv, &x)?;
            c.ssm = last;
        }
        let out = self.out_proj.forward(&y)?;
        match &self.hook {
            Some(h) => Ok(h.after_out(self.layer_idx, out)?),
            None => Ok(out),
        }
    }

    /// One decode step: `u` is the normed input `[b, D]` of a single new token.
    pub fn step(&self, u: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let e = self.d_inner;
        let xz = self.in_proj.forward(u)?;
        let x = xz.narrow(1, 0, e)?.contiguous()?;
        let z = xz.narrow(1, e, e)?.contiguous()?;
        let (y, conv, state) = self.branch().step(&x, &z, &cache.conv, &cache.ssm)?;
        cache.conv = conv;
        cache.ssm = state;
        Ok(self.out_proj.forward(&y)?)
    }
}

/// Multiplies `[b, L, C]` by a `[b, L, 1]` mask.
fn apply_mask(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => x.broadcast_mul(m)?,
        None => x.clone(),
    })
}

/// The conv cache after feeding `x` (`[b, L, E]`, pre-conv) to a conv whose cache was
/// `prev` (`[b, E, K]`): the last K inputs, oldest first. A fresh (zero) cache gives HF's
/// left zero-padding when the prompt is shorter than K.
fn next_conv_state(prev: &Tensor, x: &Tensor) -> Result<Tensor> {
    let k = prev.dim(2)?;
    let len = x.dim(1)?;
    let take = len.min(k);
    let recent = x.narrow(1, len - take, take)?.transpose(1, 2)?; // [b, E, take]
    let joined = Tensor::cat(&[prev, &recent.to_dtype(prev.dtype())?], 2)?;
    Ok(joined.narrow(2, take, k)?.contiguous()?)
}

/// A residual block: `h + mixer(norm(h))`.
#[derive(Clone, Debug)]
pub struct MambaBlock {
    pub norm: RmsNorm,
    pub mixer: MambaMixer,
}

impl MambaBlock {
    pub fn new(cfg: &MambaConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        Ok(MambaBlock {
            norm: RmsNorm::new(
                get(&vb, &[cfg.hidden_size], "norm.weight")?,
                cfg.layer_norm_epsilon,
            ),
            mixer: MambaMixer::new(cfg, layer_idx, vb.pp("mixer"))?,
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
pub struct MambaModel {
    pub embeddings: Embedding,
    pub layers: Vec<MambaBlock>,
    pub norm_f: RmsNorm,
}

impl MambaModel {
    pub fn new(cfg: &MambaConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = Embedding::new(get(
            &vb,
            &[cfg.vocab_size, cfg.hidden_size],
            "embeddings.weight",
        )?);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| MambaBlock::new(cfg, i, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm_f = RmsNorm::new(
            get(&vb, &[cfg.hidden_size], "norm_f.weight")?,
            cfg.layer_norm_epsilon,
        );
        Ok(MambaModel {
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
        let mut h = embeds.clone();
        for (i, block) in self.layers.iter().enumerate() {
            h = block.step(&h, cache.layer_mut(i)?)?;
        }
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

/// What [`MambaForCausalLM::forward_with`] returns.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// `[b, L, V]`.
    pub logits: Tensor,
    /// Embeddings, each block's output, the norm_f output; empty unless requested.
    pub hidden_states: Vec<Tensor>,
}

/// Mamba-1 with its LM head (tied to the embedding unless the checkpoint has its own).
#[derive(Clone, Debug)]
pub struct MambaForCausalLM {
    pub backbone: MambaModel,
    /// `Some` when the head is untied (`lm_head.weight`), `None` when tied.
    pub lm_head: Option<Tensor>,
    /// Inserts positions into the input sequence (prompt-tuning); the logits keep the
    /// input's length and positions.
    pub input_hook: Option<Arc<dyn InputHook>>,
    config: MambaConfig,
    device: Device,
    dtype: DType,
}

impl MambaForCausalLM {
    /// Builds the model from `vb`, whose names are HF checkpoint names (`backbone.…`,
    /// `lm_head.weight`). The head is tied unless `lm_head.weight` is present.
    pub fn new(cfg: &MambaConfig, vb: VarBuilder) -> Result<Self> {
        let backbone = MambaModel::new(cfg, vb.pp("backbone"))?;
        let lm_head = if vb.contains_tensor("lm_head.weight") || !cfg.tie_word_embeddings {
            Some(get(
                &vb,
                &[cfg.vocab_size, cfg.hidden_size],
                "lm_head.weight",
            )?)
        } else {
            None
        };
        Ok(MambaForCausalLM {
            backbone,
            lm_head,
            input_hook: None,
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &MambaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Every base weight under its HF checkpoint name (the tied head is not listed twice).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "backbone.embeddings.weight".to_string(),
            self.backbone.embeddings.weight().clone(),
        )];
        for (i, block) in self.backbone.layers.iter().enumerate() {
            let p = format!("backbone.layers.{i}");
            let m = &block.mixer;
            out.push((format!("{p}.norm.weight"), block.norm.weight().clone()));
            let mut push = |name: &str, t: &Tensor| {
                out.push((format!("{p}.mixer.{name}"), t.clone()));
            };
            push("in_proj.weight", m.in_proj.base().weight());
            if let Some(b) = m.in_proj.base().bias() {
                push("in_proj.bias", b);
            }
            push("conv1d.weight", m.branch.conv_weight.base());
            if let Some(b) = &m.branch.conv_bias {
                push("conv1d.bias", b.base());
            }
            push("x_proj.weight", m.branch.x_proj.base().weight());
            push("dt_proj.weight", m.branch.dt_proj.base().weight());
            push("dt_proj.bias", m.branch.dt_bias.base());
            push("A_log", m.branch.a_log.base());
            push("D", m.branch.d.base());
            push("out_proj.weight", m.out_proj.base().weight());
            if let Some(b) = m.out_proj.base().bias() {
                push("out_proj.bias", b);
            }
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
        self.input_hook.is_some() || self.backbone.layers.iter().any(|b| b.mixer.hook.is_some())
    }

    /// An empty (zero) cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<MambaCache> {
        let layers = self
            .backbone
            .layers
            .iter()
            .map(|b| {
                let m = &b.mixer;
                let (e, k, n) = (m.d_inner(), m.conv_kernel(), m.state_size()?);
                Ok(LayerCache {
                    conv: Tensor::zeros((batch, e, k), self.dtype, &self.device)?,
                    ssm: Tensor::zeros((batch, e, n), DType::F32, &self.device)?,
                })
            })
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

#[cfg(test)]
mod tests {
    use super::super::checkpoint::Checkpoint;
    use super::*;
    use crate::model::layers::{LinearAdapter, ParamAdapter};
    use crate::model::loss::causal_lm_loss;
    use candle_core::Var;

    /// `base + δ`, the partial-tuning re-parameterisation.
    #[derive(Debug)]
    struct Delta(Var);
    impl ParamAdapter for Delta {
        fn value(&self, base: &Tensor) -> candle_core::Result<Tensor> {
            base + self.0.as_tensor()
        }
    }

    /// A LoRA-shaped adapter: `W x + B (A x)`.
    #[derive(Debug)]
    struct LowRank {
        a: Var,
        b: Var,
    }
    impl LinearAdapter for LowRank {
        fn forward(&self, base: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
            let low = linear_forward(
                &linear_forward(x, self.a.as_tensor(), None)?,
                self.b.as_tensor(),
                None,
            )?;
            base.forward(x)? + low
        }
    }

    #[test]
    fn adapters_hook_in_and_only_they_get_gradients() -> Result<()> {
        let mut cfg = MambaConfig::new(16, 2, 32);
        cfg.state_size = 4;
        let base = Checkpoint::random(&cfg, 7, &Device::Cpu)?.into_frozen()?;
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 2]], &Device::Cpu)?;
        let want = base.forward(&ids, None)?;

        let mut model = base.clone();
        let e = cfg.intermediate_size;
        let delta = Var::zeros(e, DType::F32, &Device::Cpu)?;
        let a = Var::from_tensor(&(Tensor::ones((2, 16), DType::F32, &Device::Cpu)? * 0.1)?)?;
        let b = Var::zeros((2 * e, 2), DType::F32, &Device::Cpu)?;
        let mixer = &mut model.backbone.layers[1].mixer;
        mixer
            .branch
            .d
            .set_adapter(Some(Arc::new(Delta(delta.clone()))));
        mixer.in_proj.set_adapter(Some(Arc::new(LowRank {
            a: a.clone(),
            b: b.clone(),
        })));

        // Zero-initialised adapters preserve the function.
        let got = model.forward(&ids, None)?;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");

        let grads = causal_lm_loss(&model.forward(&ids, None)?, &ids)?.backward()?;
        assert!(grads.get(delta.as_tensor()).is_some());
        assert!(grads.get(b.as_tensor()).is_some());
        // Frozen matrices are plain tensors kept out of the graph: no gradient is computed
        // for them (candle still fills one in for small frozen operands of elementwise ops,
        // such as biases and norm weights; those cost little).
        for (name, t) in base.named_weights() {
            if t.rank() == 2 {
                assert!(grads.get(&t).is_none(), "{name} got a gradient");
            }
        }

        // A moved δ changes the output on the next forward (no stale cached value).
        delta.set(&Tensor::ones(e, DType::F32, &Device::Cpu)?)?;
        let moved = model.forward(&ids, None)?;
        let diff = (moved - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff > 1e-4, "{diff}");
        Ok(())
    }
}
