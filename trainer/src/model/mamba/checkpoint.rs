//! Mamba-1's side of the shared language-model loader ([`crate::model::lm_checkpoint`]): the
//! tensors a [`MambaConfig`] implies, and the biases it may leave to the tensors.

use std::collections::BTreeSet;
use std::path::Path;

use candle_nn::VarBuilder;

use super::config::{ConfigStyle, MambaConfig};
use super::model::MambaForCausalLM;
use crate::error::Result;
pub use crate::model::lm_checkpoint::LoadOptions;
use crate::model::lm_checkpoint::{Expected, LmCheckpoint, LmConfig};

/// A validated Mamba-1 checkpoint: resolved config and every weight under its HF name.
pub type Checkpoint = LmCheckpoint<MambaConfig>;

impl LmConfig for MambaConfig {
    type Model = MambaForCausalLM;

    fn from_file(path: &Path) -> Result<Self> {
        MambaConfig::from_file(path)
    }

    fn family(&self) -> crate::model::Family {
        crate::model::Family::Mamba
    }

    fn expected_tensors(&self) -> Vec<Expected> {
        expected_tensors(self)
    }

    /// Takes `use_bias` / `use_conv_bias` from the tensors when the config does not state
    /// them.
    fn resolve_from_names(&mut self, names: &BTreeSet<&str>) {
        let any = |suffix: &str| {
            names
                .iter()
                .any(|k| k.starts_with("backbone.layers.") && k.ends_with(suffix))
        };
        if !self.use_bias_declared {
            self.use_bias = any(".mixer.in_proj.bias") || any(".mixer.out_proj.bias");
            tracing::debug!(
                use_bias = self.use_bias,
                "use_bias not in config.json; taken from the tensors"
            );
        }
        if !self.use_conv_bias_declared {
            self.use_conv_bias = any(".mixer.conv1d.bias");
            tracing::debug!(
                use_conv_bias = self.use_conv_bias,
                "use_conv_bias not in config.json; taken from the tensors"
            );
        }
    }

    fn style(&self) -> ConfigStyle {
        self.style
    }

    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    fn norm_epsilon(&self) -> f64 {
        self.layer_norm_epsilon
    }

    fn build(&self, vb: VarBuilder) -> Result<MambaForCausalLM> {
        MambaForCausalLM::new(self, vb)
    }

    fn to_hf_json(&self) -> serde_json::Value {
        MambaConfig::to_hf_json(self)
    }

    fn describe(&self) -> String {
        format!(
            "Mamba-1 ({:?} naming): {} layers, hidden {}, vocab {}",
            self.style, self.num_hidden_layers, self.hidden_size, self.vocab_size
        )
    }
}

fn expected_tensors(c: &MambaConfig) -> Vec<Expected> {
    let (d, e, n, r, k, v) = (
        c.hidden_size,
        c.intermediate_size,
        c.state_size,
        c.time_step_rank,
        c.conv_kernel,
        c.vocab_size,
    );
    let mut out = vec![Expected::new(
        "backbone.embeddings.weight".into(),
        vec![v, d],
        format!("[vocab_size, hidden_size] = [{v}, {d}]"),
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("backbone.layers.{i}");
        let m = format!("{p}.mixer");
        let mut push = |name: String, shape: Vec<usize>, why: String| {
            out.push(Expected::new(name, shape, why))
        };
        push(
            format!("{p}.norm.weight"),
            vec![d],
            format!("[hidden_size] = [{d}]"),
        );
        push(
            format!("{m}.in_proj.weight"),
            vec![2 * e, d],
            format!("[2·intermediate_size, hidden_size] = [{}, {d}]", 2 * e),
        );
        if c.use_bias {
            push(
                format!("{m}.in_proj.bias"),
                vec![2 * e],
                format!(
                    "[2·intermediate_size] = [{}] because use_bias is true",
                    2 * e
                ),
            );
            push(
                format!("{m}.out_proj.bias"),
                vec![d],
                format!("[hidden_size] = [{d}] (use_bias is true)"),
            );
        }
        push(
            format!("{m}.conv1d.weight"),
            vec![e, 1, k],
            format!("[intermediate_size, 1, conv_kernel] = [{e}, 1, {k}]"),
        );
        if c.use_conv_bias {
            push(
                format!("{m}.conv1d.bias"),
                vec![e],
                format!("[intermediate_size] = [{e}] (use_conv_bias is true)"),
            );
        }
        push(
            format!("{m}.x_proj.weight"),
            vec![r + 2 * n, e],
            format!(
                "[time_step_rank + 2·state_size, intermediate_size] = [{}, {e}]",
                r + 2 * n
            ),
        );
        push(
            format!("{m}.dt_proj.weight"),
            vec![e, r],
            format!("[intermediate_size, time_step_rank] = [{e}, {r}]"),
        );
        push(
            format!("{m}.dt_proj.bias"),
            vec![e],
            format!("[intermediate_size] = [{e}]"),
        );
        push(
            format!("{m}.A_log"),
            vec![e, n],
            format!("[intermediate_size, state_size] = [{e}, {n}]"),
        );
        push(
            format!("{m}.D"),
            vec![e],
            format!("[intermediate_size] = [{e}]"),
        );
        push(
            format!("{m}.out_proj.weight"),
            vec![d, e],
            format!("[hidden_size, intermediate_size] = [{d}, {e}]"),
        );
    }
    out.push(Expected::new(
        "backbone.norm_f.weight".into(),
        vec![d],
        format!("[hidden_size] = [{d}]"),
    ));
    if !c.tie_word_embeddings {
        out.push(Expected::new(
            "lm_head.weight".into(),
            vec![v, d],
            format!("[vocab_size, hidden_size] = [{v}, {d}] (the head is untied)"),
        ));
    }
    out
}
