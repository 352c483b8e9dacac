//! Mamba-2's side of the shared language-model loader ([`crate::model::lm_checkpoint`]): the
//! tensors a [`Mamba2Config`] implies. Both namings load through it: HF
//! (`backbone.embeddings`) and state-spaces (`backbone.embedding`, `lm_head.weight` tied and
//! dropped), safetensors (sharded) or `pytorch_model.bin`.

use std::path::Path;

use candle_nn::VarBuilder;

use super::config::Mamba2Config;
use super::model::Mamba2ForCausalLM;
use crate::error::Result;
use crate::model::config::ConfigStyle;
use crate::model::lm_checkpoint::{Expected, LmCheckpoint, LmConfig};

/// A validated Mamba-2 checkpoint: resolved config and every weight under its HF name.
pub type Mamba2Checkpoint = LmCheckpoint<Mamba2Config>;

impl LmConfig for Mamba2Config {
    type Model = Mamba2ForCausalLM;

    fn from_file(path: &Path) -> Result<Self> {
        Mamba2Config::from_file(path)
    }

    fn family(&self) -> crate::model::Family {
        crate::model::Family::Mamba2
    }

    fn expected_tensors(&self) -> Vec<Expected> {
        let hf = self.style == ConfigStyle::HuggingFace;
        let n = |hf_name: &'static str, ss_name: &'static str| if hf { hf_name } else { ss_name };
        let (d, v, e, h) = (
            self.hidden_size,
            self.vocab_size,
            self.intermediate_size(),
            self.num_heads,
        );
        let (conv, k, d_in) = (self.conv_dim(), self.conv_kernel, self.d_in_proj());
        let (hid, heads) = (
            n("hidden_size", "d_model"),
            n("num_heads", "d_model·expand/headdim"),
        );
        let mut out = vec![Expected::new(
            "backbone.embeddings.weight".into(),
            vec![v, d],
            format!("[vocab_size, {hid}] = [{v}, {d}]"),
        )];
        for i in 0..self.num_hidden_layers {
            let p = format!("backbone.layers.{i}");
            let m = format!("{p}.mixer");
            let mut push = |name: String, shape: Vec<usize>, why: String| {
                out.push(Expected::new(name, shape, why))
            };
            push(
                format!("{p}.norm.weight"),
                vec![d],
                format!("[{hid}] = [{d}]"),
            );
            push(
                format!("{m}.in_proj.weight"),
                vec![d_in, d],
                format!("[2E + 2GN + H, {hid}] = [{d_in}, {d}] (z | x | B | C | dt)"),
            );
            if self.use_bias {
                push(
                    format!("{m}.in_proj.bias"),
                    vec![d_in],
                    format!("[2E + 2GN + H] = [{d_in}] because use_bias is true"),
                );
                push(
                    format!("{m}.out_proj.bias"),
                    vec![d],
                    format!("[{hid}] = [{d}] (use_bias is true)"),
                );
            }
            push(
                format!("{m}.conv1d.weight"),
                vec![conv, 1, k],
                format!("[E + 2GN, 1, conv_kernel] = [{conv}, 1, {k}]"),
            );
            if self.use_conv_bias {
                push(
                    format!("{m}.conv1d.bias"),
                    vec![conv],
                    format!("[E + 2GN] = [{conv}] (use_conv_bias is true)"),
                );
            }
            for name in ["dt_bias", "A_log", "D"] {
                push(format!("{m}.{name}"), vec![h], format!("[{heads}] = [{h}]"));
            }
            push(format!("{m}.norm.weight"), vec![e], format!("[E] = [{e}]"));
            push(
                format!("{m}.out_proj.weight"),
                vec![d, e],
                format!("[{hid}, E] = [{d}, {e}]"),
            );
        }
        out.push(Expected::new(
            "backbone.norm_f.weight".into(),
            vec![d],
            format!("[{hid}] = [{d}]"),
        ));
        if !self.tie_word_embeddings {
            out.push(Expected::new(
                "lm_head.weight".into(),
                vec![v, d],
                format!("[vocab_size, {hid}] = [{v}, {d}] (the head is untied)"),
            ));
        }
        out
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

    fn build(&self, vb: VarBuilder) -> Result<Mamba2ForCausalLM> {
        Mamba2ForCausalLM::new(self, vb)
    }

    fn to_hf_json(&self) -> serde_json::Value {
        Mamba2Config::to_hf_json(self)
    }

    fn describe(&self) -> String {
        format!(
            "Mamba-2 ({:?} naming): {} layers, hidden {}, {} heads × {}, state {}, {} group(s), vocab {}",
            self.style,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_heads,
            self.head_dim,
            self.state_size,
            self.n_groups,
            self.vocab_size
        )
    }
}
