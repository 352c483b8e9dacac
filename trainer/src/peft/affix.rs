//! Affix-tuning (spec §4.8), MambaPEFT's "inner single" form: per layer, n soft tokens in
//! in_proj's output space (2E = X part then Z part) are inserted into the sequence before
//! conv1d and dropped after out_proj. Layer i reads table columns [i·2E, (i+1)·2E).
//! Layouts as prompt-tuning's (prefix, infix, suffix). The Z half of each token only gates
//! dropped outputs: its gradient is exactly 0 (kept for the paper's parameter counts).
//! With projection, table = fc2(tanh(fc1(E_p))) (H = 2E by default), which merges into the
//! fixed table; a prefix affix also merges into per-layer initial states (`merge`).
//!
//! On a bidirectional model (Vim, MambaPEFT's vision code) the tokens are a prefix of each
//! scan direction's sequence in its own scan order (the backward scan starts with them), and
//! each direction drops its first n outputs before the two are combined. "Single" uses the
//! same tokens for both directions; `per_direction` ("dual") gives each its own: layer i then
//! reads columns [i·2·2E, (i+1)·2·2E), forward tokens first.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::error::{PeftError, PeftResult};
use super::init::InitRng;
use super::prompt::{
    MAX_TOKENS, PromptKind, Table, interleave, layout, positions, table_init, table_shapes,
};
use super::spec::check_range;
use super::target::{ModelShape, PeftBase};
use super::{MergePlan, MethodConfig, ParamShape, Params, PeftMethod, Sites};
use crate::model::MixerHook;

/// Where the affix tokens go in each layer's sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AffixKind {
    #[serde(alias = "inner_single_prefix")]
    Prefix,
    #[serde(alias = "inner_single_infix")]
    Infix,
    #[serde(alias = "inner_single_suffix")]
    Suffix,
}

impl AffixKind {
    pub(crate) fn layout_kind(self) -> PromptKind {
        match self {
            AffixKind::Prefix => PromptKind::Prefix,
            AffixKind::Infix => PromptKind::Infix,
            AffixKind::Suffix => PromptKind::Suffix,
        }
    }
}

fn default_n() -> usize {
    3
}
fn default_kind() -> AffixKind {
    AffixKind::Prefix
}

/// `{"type": "affix", "n": 3, "kind": "prefix", "projection": false, "hidden": 2E}` (the
/// LLM preset: inner single prefix, n = 3, w/o projection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffixConfig {
    #[serde(default = "default_n")]
    pub n: usize,
    #[serde(default = "default_kind")]
    pub kind: AffixKind,
    #[serde(default, alias = "proj")]
    pub projection: bool,
    /// H of the projection (default 2E).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    /// One set of tokens per scan direction (bidirectional models; MambaPEFT's "dual").
    #[serde(default, alias = "dual", skip_serializing_if = "std::ops::Not::not")]
    pub per_direction: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
}

impl AffixConfig {
    pub fn new(n: usize, kind: AffixKind, projection: bool) -> Self {
        AffixConfig {
            n,
            kind,
            projection,
            hidden: None,
            per_direction: false,
            lr: None,
            weight_decay: 0.0,
        }
    }
}

impl PeftMethod for AffixConfig {
    fn kind(&self) -> &'static str {
        "affix"
    }

    fn lr(&self) -> Option<f64> {
        self.lr
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn validate(&self, cfg: &ModelShape) -> PeftResult<()> {
        cfg.require_selective("affix")?;
        let bidirectional = cfg.directions.len() > 1;
        if bidirectional && self.kind != AffixKind::Prefix {
            return Err(PeftError::unsupported(
                format!("affix with kind {:?}", self.kind),
                cfg.family,
                "on a bidirectional model the affix is a prefix of each scan direction \
                 (kind \"prefix\")",
            ));
        }
        if self.per_direction && !bidirectional {
            return Err(PeftError::Contradictory(format!(
                "affix: `per_direction` needs a bidirectional model; {} scans one way",
                cfg.family.name()
            )));
        }
        check_range("affix", "n", "each layer's sequence", self.n, 1, MAX_TOKENS)?;
        if !self.projection && self.hidden.is_some() {
            return Err(PeftError::Contradictory(
                "affix: `hidden` sizes the projection MLP; set `projection: true` or drop \
                 `hidden`"
                    .into(),
            ));
        }
        if let Some(h) = self.hidden {
            check_range("affix", "hidden", "the projection MLP", h, 1, 1 << 16)?;
        }
        Ok(())
    }

    fn parameters(&self, cfg: &ModelShape) -> Vec<ParamShape> {
        let e2 = 2 * cfg.intermediate_size;
        table_shapes(
            "affix",
            self.projection,
            self.n,
            e2,
            self.hidden.unwrap_or(e2),
            cfg.num_hidden_layers * self.copies() * e2,
        )
    }

    fn init(&self, base: &dyn PeftBase, rng: &InitRng) -> PeftResult<Vec<(String, Tensor)>> {
        table_init(rng, self.parameters(&base.peft_shape()))
    }

    fn attach(&self, params: &Params, sites: &mut Sites) -> PeftResult<()> {
        let hook = Arc::new(AffixHook {
            table: Table::load(params, "affix", self.projection)?,
            kind: self.kind,
            width: 2 * sites.config().intermediate_size,
            copies: self.copies(),
        });
        for i in 0..sites.config().num_hidden_layers {
            sites.set_mixer_hook(i, hook.clone())?;
        }
        Ok(())
    }

    fn merge_plan(&self, params: &Params) -> PeftResult<MergePlan> {
        let table = Table::load(params, "affix", self.projection)?
            .columns(None)?
            .detach();
        let mut cfg = self.clone();
        cfg.projection = false;
        cfg.hidden = None;
        Ok(MergePlan::Residual(
            MethodConfig::Affix(cfg),
            vec![("affix.table".into(), table)],
        ))
    }
}

impl AffixConfig {
    /// Token sets per layer: 2 with `per_direction`, else 1.
    fn copies(&self) -> usize {
        if self.per_direction { 2 } else { 1 }
    }
}

/// One hook shared by every layer; it slices the layer's tokens from the table.
#[derive(Debug)]
pub(crate) struct AffixHook {
    table: Table,
    kind: AffixKind,
    /// 2E.
    width: usize,
    /// Token sets per layer (1, or 2 with one per scan direction).
    copies: usize,
}

impl AffixHook {
    /// Layer `layer`'s tokens `[n, 2E]` (its first set).
    pub(crate) fn tokens(&self, layer: usize) -> Result<Tensor> {
        self.table
            .columns(Some((layer * self.copies * self.width, self.width)))
    }
}

impl MixerHook for AffixHook {
    fn before_conv(
        &self,
        layer: usize,
        xz: Tensor,
        mask: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let tokens = self.tokens(layer)?;
        let n = tokens.dim(0)?;
        let len = xz.dim(1)?;
        let order = layout(self.kind.layout_kind(), len, n);
        let aug = interleave(&xz, &tokens, &order)?;
        let mask = match mask {
            Some(m) => {
                let ones = Tensor::ones((n, 1), m.dtype(), m.device())?;
                Some(interleave(&m, &ones, &order)?)
            }
            None => None,
        };
        Ok((aug, mask))
    }

    fn direction_prefix(&self, layer: usize, backward: bool) -> Result<Option<Tensor>> {
        if self.kind != AffixKind::Prefix {
            candle_core::bail!("affix: a bidirectional mixer takes prefix tokens only");
        }
        let set = usize::from(backward && self.copies > 1);
        let start = (layer * self.copies + set) * self.width;
        Ok(Some(self.table.columns(Some((start, self.width)))?))
    }

    fn after_out(&self, _layer: usize, out: Tensor) -> Result<Tensor> {
        let n = match &self.table {
            Table::Stored(t) => t.dim(0)?,
            Table::Mlp { embedding, .. } => embedding.dim(0)?,
        };
        let total = out.dim(1)?;
        let len = total.checked_sub(n).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "affix: the mixer returned {total} positions, fewer than the {n} affix tokens"
            ))
        })?;
        let order = layout(self.kind.layout_kind(), len, n);
        let pos = Tensor::new(positions(&order).as_slice(), out.device())?;
        out.index_select(&pos, 1)
    }
}
