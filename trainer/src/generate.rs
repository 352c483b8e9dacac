//! Autoregressive generation: prefill the prompts through the full-sequence path, then one
//! O(1) recurrent step per token. Greedy or sampled (temperature, top-p, seeded RNG, so a
//! seed reproduces the output); batches of prompts of different lengths are left-padded
//! and masked, which leaves each row's result as if it ran alone.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::lm_checkpoint::LmConfig;
use crate::model::{CausalLm, Mixer, ModelInput};

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches
    /// `top_p`. 1.0 keeps every token.
    pub top_p: f64,
    pub seed: u64,
    /// A row stops after producing any of these. Empty: never stop early.
    pub eos_token_ids: Vec<u32>,
    /// Fills left padding and finished rows.
    pub pad_token_id: u32,
    /// Keep each step's logits `[b, V]` in the output (tests, scoring).
    pub keep_step_logits: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            keep_step_logits: false,
        }
    }
}

impl GenerationConfig {
    /// Takes EOS and pad ids from the model's config.
    pub fn for_model<M: Mixer>(model: &CausalLm<M>) -> Self {
        let c = model.config();
        GenerationConfig {
            eos_token_ids: c.eos_token_ids().to_vec(),
            pad_token_id: c
                .pad_token_id()
                .or(c.eos_token_ids().first().copied())
                .unwrap_or(0),
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(
                "temperature",
                format!("must be a finite number ≥ 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Produced an EOS token (included in `tokens`).
    Eos,
    /// Reached `max_new_tokens`.
    Length,
    /// The step callback asked to stop.
    Stopped,
}

#[derive(Clone, Debug)]
pub struct GenerationOutput {
    /// The new tokens of each row (an EOS that ended the row is included).
    pub tokens: Vec<Vec<u32>>,
    pub finish_reasons: Vec<FinishReason>,
    /// Per step `[b, V]` logits the tokens were chosen from (when asked for). Step 0 comes
    /// from the prefill.
    pub step_logits: Vec<Tensor>,
}

/// Generates for each prompt (token ids). See [`generate_with`].
pub fn generate<M: Mixer>(
    model: &CausalLm<M>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<GenerationOutput> {
    generate_with(model, prompts, cfg, |_, _| true)
}

/// Like [`generate`], calling `on_step(step, tokens)` after every step with the token each
/// row produced (`None` for rows already finished). Returning `false` stops generation
/// (streaming clients that disconnect, stop strings).
pub fn generate_with<M: Mixer>(
    model: &CausalLm<M>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    mut on_step: impl FnMut(usize, &[Option<u32>]) -> bool,
) -> Result<GenerationOutput> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Err(Error::input("prompts", "no prompts given"));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::input(
            "prompts",
            format!("prompt {i} is empty; a prompt needs at least one token"),
        ));
    }
    let b = prompts.len();
    let mut out = GenerationOutput {
        tokens: vec![Vec::new(); b],
        finish_reasons: vec![FinishReason::Length; b],
        step_logits: Vec::new(),
    };
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }

    let (ids, mask) = left_pad(prompts, cfg.pad_token_id);
    let len = ids.len() / b;
    let ids = Tensor::from_vec(ids, (b, len), &candle_core::Device::Cpu)?;
    let mask = Tensor::from_vec(mask, (b, len), &candle_core::Device::Cpu)?;
    let input = ModelInput::new(&ids, Some(&mask), model.vocab_size())?;
    let mut cache = model.new_cache(b)?;
    let mut logits = model.prefill(&input, &mut cache)?;

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut finished = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        if cfg.keep_step_logits {
            out.step_logits.push(logits.clone());
        }
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut chosen = vec![None; b];
        let mut feed = vec![cfg.pad_token_id; b];
        for (r, row) in rows.iter().enumerate() {
            if finished[r] {
                continue;
            }
            let tok = if cfg.temperature == 0.0 {
                argmax(row)
            } else {
                sample(row, cfg.temperature, cfg.top_p, &mut rng)
            }
            .ok_or_else(|| {
                Error::input(
                    "logits",
                    format!("row {r} at step {step} has no finite logit"),
                )
            })?;
            out.tokens[r].push(tok);
            chosen[r] = Some(tok);
            feed[r] = tok;
            if cfg.eos_token_ids.contains(&tok) {
                finished[r] = true;
                out.finish_reasons[r] = FinishReason::Eos;
            }
        }
        if !on_step(step, &chosen) {
            for (r, done) in finished.iter().enumerate() {
                if !done {
                    out.finish_reasons[r] = FinishReason::Stopped;
                }
            }
            break;
        }
        if finished.iter().all(|f| *f) || step + 1 == cfg.max_new_tokens {
            break;
        }
        logits = model.step(&feed, &mut cache)?;
    }
    Ok(out)
}

/// Left-pads prompts to one length; returns flat ids and a 0/1 mask (u32).
fn left_pad(prompts: &[Vec<u32>], pad: u32) -> (Vec<u32>, Vec<u32>) {
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * len);
    let mut mask = Vec::with_capacity(prompts.len() * len);
    for p in prompts {
        let padding = len - p.len();
        ids.extend(std::iter::repeat_n(pad, padding));
        mask.extend(std::iter::repeat_n(0u32, padding));
        ids.extend_from_slice(p);
        mask.extend(std::iter::repeat_n(1u32, p.len()));
    }
    (ids, mask)
}

/// Index of the largest finite logit (the first on ties, as torch's argmax).
pub fn argmax(row: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Samples from `softmax(row / temperature)` restricted to the top-p nucleus. Serving
/// draws with this too, so a seed gives the same tokens there as here.
pub fn sample(row: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> Option<u32> {
    let max = row
        .iter()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if !max.is_finite() {
        return argmax(row);
    }
    let mut probs: Vec<(usize, f64)> = row
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i, ((f64::from(v) - f64::from(max)) / temperature).exp()))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    // Highest first; ties keep index order so the nucleus is deterministic.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut cum = 0.0;
    for (_, p) in &probs {
        kept += 1;
        cum += p / total;
        if cum >= top_p {
            break;
        }
    }
    probs.truncate(kept.max(1));
    let mass: f64 = probs.iter().map(|(_, p)| p).sum();
    let mut u = rng.random::<f64>() * mass;
    for (i, p) in &probs {
        if u < *p {
            return Some(*i as u32);
        }
        u -= p;
    }
    probs.last().map(|(i, _)| *i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, 0.5]), Some(1));
        assert_eq!(argmax(&[f32::NAN]), None);
    }

    #[test]
    fn top_p_restricts_to_nucleus_and_is_seeded() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 leaves only token 0.
        let row = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(sample(&row, 1.0, 0.5, &mut rng), Some(0));
        }
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&row, 1.0, 1.0, &mut rng).unwrap_or(99))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().any(|t| *t != 0));
    }

    #[test]
    fn left_pad_masks_padding() {
        let (ids, mask) = left_pad(&[vec![5, 6, 7], vec![9]], 0);
        assert_eq!(ids, vec![5, 6, 7, 0, 0, 9]);
        assert_eq!(mask, vec![1, 1, 1, 0, 0, 1]);
    }
}
