//! Prompt-tuning (spec §4.7): n soft tokens in embedding space, inserted after the embedding
//! lookup and dropped after norm_f, so the logits keep the input's length and positions.
//! Layouts: prefix [P; x], suffix [x; P], prefix_suffix (⌈n/2⌉ before, the rest after),
//! infix (x cut into n+1 chunks with `torch.tensor_split` sizes, prompt j after chunk j).
//! With projection the table is fc2(tanh(fc1(E_p))) and merges into a fixed table.
//!
//! In a causal LM a suffix prompt cannot reach any real token's logits (they are dropped
//! before the head); that is the correct behaviour, not a bug (fixtures README).
//!
//! On Vim (MambaPEFT's vision code) the same layouts apply to the token sequence after the
//! class token and `pos_embed` (the prompts get no position embedding); the prompts are
//! never removed, and the head reads the class token at its new index: `c + n` for prefix,
//! `c` for suffix, `c + ⌈n/2⌉` for prefix_suffix, and for infix `c` plus the number of prompts
//! inserted before the chunk holding it (the official code's index formula misses the class
//! token; the fixtures follow the token).

use std::sync::Arc;

use candle_core::{D, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::spec::check_range;
use super::target::{ModelShape, PeftBase};
use super::{MergePlan, MethodConfig, ParamShape, Params, PeftMethod, Sites};
use crate::model::InputHook;
use crate::model::layers::linear_forward;

/// Where the soft tokens go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptKind {
    Prefix,
    Suffix,
    Infix,
    PrefixSuffix,
}

/// One position of an augmented sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pos {
    Real(usize),
    Soft(usize),
}

/// The augmented order of `len` real tokens and `n` soft tokens.
pub(crate) fn layout(kind: PromptKind, len: usize, n: usize) -> Vec<Pos> {
    let real = |r: std::ops::Range<usize>| r.map(Pos::Real);
    let soft = |r: std::ops::Range<usize>| r.map(Pos::Soft);
    match kind {
        PromptKind::Prefix => soft(0..n).chain(real(0..len)).collect(),
        PromptKind::Suffix => real(0..len).chain(soft(0..n)).collect(),
        PromptKind::PrefixSuffix => {
            let before = n.div_ceil(2);
            soft(0..before)
                .chain(real(0..len))
                .chain(soft(before..n))
                .collect()
        }
        PromptKind::Infix => {
            let chunks = n + 1;
            let (base, extra) = (len / chunks, len % chunks);
            let mut out = Vec::with_capacity(len + n);
            let mut t = 0;
            for j in 0..chunks {
                let size = base + usize::from(j < extra);
                out.extend(real(t..t + size));
                t += size;
                if j < n {
                    out.push(Pos::Soft(j));
                }
            }
            out
        }
    }
}

/// The real tokens' indices in a layout.
pub(crate) fn positions(order: &[Pos]) -> Vec<u32> {
    order
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Pos::Real(_)))
        .map(|(k, _)| k as u32)
        .collect()
}

/// Builds `[b, L', C]` from `x` `[b, L, C]` and `soft` `[n, C]` in `order`, as a
/// concatenation of contiguous runs (so autograd reaches both).
pub(crate) fn interleave(x: &Tensor, soft: &Tensor, order: &[Pos]) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    let soft = soft.to_dtype(x.dtype())?;
    let mut pieces: Vec<Tensor> = Vec::new();
    let mut k = 0;
    while k < order.len() {
        let start = k;
        match order[k] {
            Pos::Real(t0) => {
                while k < order.len() && order[k] == Pos::Real(t0 + (k - start)) {
                    k += 1;
                }
                pieces.push(x.narrow(1, t0, k - start)?);
            }
            Pos::Soft(j0) => {
                while k < order.len() && order[k] == Pos::Soft(j0 + (k - start)) {
                    k += 1;
                }
                let run = soft.narrow(0, j0, k - start)?;
                pieces.push(
                    run.unsqueeze(0)?
                        .broadcast_as((b, k - start, c))?
                        .contiguous()?,
                );
            }
        }
    }
    Tensor::cat(&pieces, 1)
}

fn default_n() -> usize {
    8
}
fn default_kind() -> PromptKind {
    PromptKind::Prefix
}

/// The most soft tokens a prompt or affix may have (beyond this it is a dataset, not a prompt).
pub(crate) const MAX_TOKENS: usize = 4096;

/// `{"type": "prompt", "n": 8, "kind": "prefix", "projection": false, "hidden": D}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    #[serde(default = "default_n")]
    pub n: usize,
    #[serde(default = "default_kind")]
    pub kind: PromptKind,
    /// Reparameterise through Linear(D→H)·tanh·Linear(H→D).
    #[serde(default, alias = "proj")]
    pub projection: bool,
    /// H of the projection (default D).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl PromptConfig {
    pub fn new(n: usize, kind: PromptKind, projection: bool) -> Self {
        PromptConfig {
            n,
            kind,
            projection,
            hidden: None,
            lr: None,
            weight_decay: 0.0,
        }
    }

    fn hidden_size(&self, cfg: &ModelShape) -> usize {
        self.hidden.unwrap_or(cfg.hidden_size)
    }
}

/// The soft-token table: stored, or computed by the projection MLP.
#[derive(Debug, Clone)]
pub(crate) enum Table {
    Stored(Tensor),
    Mlp {
        embedding: Tensor,
        fc1_w: Tensor,
        fc1_b: Tensor,
        fc2_w: Tensor,
        fc2_b: Tensor,
    },
}

impl Table {
    pub(crate) fn load(params: &Params, prefix: &str, projection: bool) -> PeftResult<Self> {
        Ok(if projection {
            Table::Mlp {
                embedding: params.get(&format!("{prefix}.embedding"))?,
                fc1_w: params.get(&format!("{prefix}.fc1.weight"))?,
                fc1_b: params.get(&format!("{prefix}.fc1.bias"))?,
                fc2_w: params.get(&format!("{prefix}.fc2.weight"))?,
                fc2_b: params.get(&format!("{prefix}.fc2.bias"))?,
            }
        } else {
            Table::Stored(params.get(&format!("{prefix}.table"))?)
        })
    }

    /// Columns `[start, start+len)` of the table (all when `None`).
    pub(crate) fn columns(&self, cols: Option<(usize, usize)>) -> Result<Tensor> {
        match self {
            Table::Stored(t) => match cols {
                Some((s, l)) => t.narrow(1, s, l),
                None => Ok(t.clone()),
            },
            Table::Mlp {
                embedding,
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
            } => {
                let h = linear_forward(embedding, fc1_w, Some(fc1_b))?.tanh()?;
                // Only the requested output rows of fc2: one layer's slice of a large MLP.
                let (w, b) = match cols {
                    Some((s, l)) => (fc2_w.narrow(0, s, l)?, fc2_b.narrow(0, s, l)?),
                    None => (fc2_w.clone(), fc2_b.clone()),
                };
                linear_forward(&h, &w, Some(&b))
            }
        }
    }
}

/// The shapes of a table or of its projection MLP: `(n, width)` output, `input` wide MLP
/// input with `hidden` units.
pub(crate) fn table_shapes(
    prefix: &str,
    projection: bool,
    n: usize,
    input: usize,
    hidden: usize,
    width: usize,
) -> Vec<ParamShape> {
    if projection {
        vec![
            (format!("{prefix}.embedding"), vec![n, input]),
            (format!("{prefix}.fc1.weight"), vec![hidden, input]),
            (format!("{prefix}.fc1.bias"), vec![hidden]),
            (format!("{prefix}.fc2.weight"), vec![width, hidden]),
            (format!("{prefix}.fc2.bias"), vec![width]),
        ]
    } else {
        vec![(format!("{prefix}.table"), vec![n, width])]
    }
}

/// Tables and projection inputs ~ N(0, 1); the MLP's Linear layers PyTorch's default,
/// Uniform(±1/√fan_in) for weights and biases alike.
pub(crate) fn table_init(
    rng: &InitRng,
    shapes: Vec<ParamShape>,
) -> PeftResult<Vec<(String, Tensor)>> {
    let fan_in = |stem: &str| {
        shapes
            .iter()
            .find(|(n, _)| n.strip_suffix(".weight") == Some(stem))
            .and_then(|(_, s)| s.get(1).copied())
            .unwrap_or(1)
    };
    shapes
        .iter()
        .map(|(name, shape)| {
            let t = if name.ends_with(".table") || name.ends_with(".embedding") {
                rng.normal(name, shape, 1.0)?
            } else if let Some(stem) = name.strip_suffix(".bias") {
                rng.kaiming_uniform(name, shape, fan_in(stem))?
            } else {
                rng.kaiming_uniform(name, shape, shape.get(1).copied().unwrap_or(1))?
            };
            Ok((name.clone(), t))
        })
        .collect()
}

impl PeftMethod for PromptConfig {
    fn kind(&self) -> &'static str {
        "prompt"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        check_range("prompt", "n", "the input sequence", self.n, 1, MAX_TOKENS)?;
        if !self.projection && self.hidden.is_some() {
            return Err(PeftError::Contradictory(
                "prompt: `hidden` sizes the projection MLP; set `projection: true` or drop \
                 `hidden`"
                    .into(),
            ));
        }
        if let Some(h) = self.hidden {
            check_range("prompt", "hidden", "the projection MLP", h, 1, 1 << 16)?;
        }
        let _ = cfg;
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let d = cfg.hidden_size;
        table_shapes(
            "prompt",
            self.projection,
            self.n,
            d,
            self.hidden_size(cfg),
            d,
        )
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        table_init(rng, self.parameters(&base.peft_shape()))
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        sites.set_input_hook(Arc::new(PromptHook {
            table: Table::load(params, "prompt", self.projection)?,
            kind: self.kind,
        }))
    }

    fn merge_plan(&self, params: &Params) -> PeftResult<MergePlan> {
        let table = Table::load(params, "prompt", self.projection)?
            .columns(None)?
            .detach();
        let mut cfg = self.clone();
        cfg.projection = false;
        cfg.hidden = None;
        Ok(MergePlan::Residual(
            MethodConfig::Prompt(cfg),
            vec![("prompt.table".into(), table)],
        ))
    }
}

#[derive(Debug)]
struct PromptHook {
    table: Table,
    kind: PromptKind,
}

impl InputHook for PromptHook {
    fn insert(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let table = self.table.columns(None)?;
        let (b, len, _) = embeds.dims3()?;
        let n = table.dim(0)?;
        let order = layout(self.kind, len, n);
        let aug = interleave(embeds, &table, &order)?;
        let mask = match mask {
            Some(m) => {
                let ones = Tensor::ones((n, 1), m.dtype(), m.device())?;
                Some(interleave(&m.reshape((b, len, 1))?, &ones, &order)?.squeeze(D::Minus1)?)
            }
            None => None,
        };
        let pos = Tensor::new(positions(&order).as_slice(), embeds.device())?;
        Ok((aug, mask, pos))
    }
}

/// The logits of the whole augmented sequence `[b, L+n, V]` and the positions of the real
/// tokens in it, for a model with a prompt (or the plain logits and `0..L` without one).
pub fn augmented_logits<M: crate::model::Mixer>(
    model: &crate::model::CausalLm<M>,
    input_ids: &Tensor,
) -> PeftResult<(Tensor, Vec<u32>)> {
    let input = crate::model::ModelInput::new(input_ids, None, model.vocab_size())?;
    let embeds = model.embed(&input.input_ids)?;
    let len = embeds.dim(1)?;
    let (embeds, mask, pos) = model.insert_hooked(embeds, None)?;
    let h = model
        .backbone
        .forward_embeds(&embeds, mask.as_ref(), None, None)?;
    let pos = match pos {
        Some(p) => p.to_vec1::<u32>()?,
        None => (0..len as u32).collect(),
    };
    Ok((model.logits(&h)?, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_reference_chunking() {
        use Pos::*;
        assert_eq!(
            layout(PromptKind::Prefix, 2, 2),
            vec![Soft(0), Soft(1), Real(0), Real(1)]
        );
        assert_eq!(
            layout(PromptKind::PrefixSuffix, 1, 3),
            vec![Soft(0), Soft(1), Real(0), Soft(2)]
        );
        // torch.tensor_split(13 tokens, 4) → sizes 4, 3, 3, 3.
        let o = layout(PromptKind::Infix, 13, 3);
        assert_eq!(
            positions(&o),
            vec![0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]
        );
        assert_eq!(o[4], Soft(0));
        assert_eq!(o[8], Soft(1));
        assert_eq!(o[12], Soft(2));
        // More prompts than tokens: empty chunks, consecutive prompts.
        assert_eq!(
            layout(PromptKind::Infix, 1, 2),
            vec![Real(0), Soft(0), Soft(1)]
        );
    }
}
