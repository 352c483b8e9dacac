//! The recurrent inference state of every language family: per layer, the last K pre-conv
//! inputs and the SSM state (`[b, E, N]` for Mamba-1, `[b, H, P, N]` for Mamba-2).
//! Decoding one token costs O(1) in the sequence length.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// One layer's state.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// `[b, C, K]`: the last K inputs to the conv (Mamba-1: the X half of in_proj; Mamba-2:
    /// xBC), oldest first.
    pub conv: Tensor,
    /// `[b, E, N]` (Mamba-1) or `[b, H, P, N]` (Mamba-2), f32.
    pub ssm: Tensor,
}

/// Every layer's state plus how many positions have been consumed.
#[derive(Clone, Debug)]
pub struct MambaCache {
    pub layers: Vec<LayerCache>,
    pub seqlen_offset: usize,
}

impl MambaCache {
    pub fn batch_size(&self) -> Result<usize> {
        match self.layers.first() {
            Some(l) => Ok(l.ssm.dim(0)?),
            None => Ok(0),
        }
    }

    pub fn layer_mut(&mut self, i: usize) -> Result<&mut LayerCache> {
        let n = self.layers.len();
        self.layers
            .get_mut(i)
            .ok_or_else(|| Error::input("cache", format!("no layer {i} (cache has {n} layers)")))
    }

    /// Keeps only the sequences at `rows` (e.g. to drop finished sequences from a batch).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let Some(first) = self.layers.first() else {
            return Ok(());
        };
        let idx = Tensor::new(rows, first.ssm.device())?;
        for l in &mut self.layers {
            l.conv = l.conv.index_select(&idx, 0)?;
            l.ssm = l.ssm.index_select(&idx, 0)?;
        }
        Ok(())
    }
}
