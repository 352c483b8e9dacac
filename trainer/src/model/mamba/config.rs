//! `config.json` in either of the two styles Mamba-1 checkpoints ship with, resolved into one
//! [`MambaConfig`].
//!
//! - Hugging Face (`MambaConfig` in transformers): `hidden_size`, `num_hidden_layers`,
//!   `state_size`, `expand`, `intermediate_size`, `conv_kernel`, `time_step_rank`, ...
//! - state-spaces (`mamba_ssm`'s `MambaConfig`): `d_model`, `n_layer`, `vocab_size` padded to
//!   `pad_vocab_size_multiple`, and `ssm_cfg` overriding the mixer's `d_state`, `d_conv`,
//!   `expand`, `dt_rank`, `bias`, `conv_bias`.
//!
//! Detection: `hidden_size` present ⇒ Hugging Face; only `d_model` ⇒ state-spaces.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::fields::Fields;

/// Which naming the config file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigStyle {
    HuggingFace,
    StateSpaces,
}

/// A resolved Mamba-1 language-model config. `vocab_size` is the number of embedding rows
/// (already padded for state-spaces configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MambaConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub state_size: usize,
    pub conv_kernel: usize,
    pub expand: usize,
    pub intermediate_size: usize,
    pub time_step_rank: usize,
    /// Bias on in_proj and out_proj.
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (HF allows a list).
    pub eos_token_ids: Vec<u32>,
    pub style: ConfigStyle,
    /// Whether `use_bias` / `use_conv_bias` were written in the file. When they were not,
    /// the loader takes them from the tensors instead of guessing a default (the HF class
    /// defaults `use_bias` to true, which is wrong for every released Mamba checkpoint).
    #[serde(skip)]
    pub use_bias_declared: bool,
    #[serde(skip)]
    pub use_conv_bias_declared: bool,
}

impl MambaConfig {
    /// A Hugging Face style config with the usual defaults; handy for random-init models.
    pub fn new(hidden_size: usize, num_hidden_layers: usize, vocab_size: usize) -> Self {
        let expand = 2;
        MambaConfig {
            hidden_size,
            num_hidden_layers,
            vocab_size,
            state_size: 16,
            conv_kernel: 4,
            expand,
            intermediate_size: expand * hidden_size,
            time_step_rank: hidden_size.div_ceil(16),
            use_bias: false,
            use_conv_bias: true,
            layer_norm_epsilon: 1e-5,
            tie_word_embeddings: true,
            pad_token_id: Some(0),
            bos_token_id: Some(0),
            eos_token_ids: vec![0],
            style: ConfigStyle::HuggingFace,
            use_bias_declared: true,
            use_conv_bias_declared: true,
        }
    }

    /// Reads and resolves `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses a config; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::ConfigField {
                path: path.to_path_buf(),
                field: "(top level)".into(),
                reason: "expected a JSON object".into(),
            });
        };
        let r = Reader(Fields::new(path));
        let cfg = if obj.contains_key("hidden_size") {
            r.hugging_face(&obj)?
        } else if obj.contains_key("d_model") {
            r.state_spaces(&obj)?
        } else {
            return Err(Error::UnknownConfigStyle {
                path: path.to_path_buf(),
            });
        };
        r.check(&cfg)?;
        Ok(cfg)
    }

    /// The HF-style JSON for this config (what `save_pretrained` would write).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "state_size": self.state_size,
            "conv_kernel": self.conv_kernel,
            "expand": self.expand,
            "intermediate_size": self.intermediate_size,
            "time_step_rank": self.time_step_rank,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => Value::from(*one),
                many => Value::from(many.to_vec()),
            },
            "hidden_act": "silu",
            "residual_in_fp32": true,
        })
    }
}

/// The Mamba-1 reads on top of the shared [`Fields`].
struct Reader(Fields);

impl std::ops::Deref for Reader {
    type Target = Fields;
    fn deref(&self) -> &Fields {
        &self.0
    }
}

impl Reader {
    /// `time_step_rank` / `dt_rank`: an integer or `"auto"` (= ceil(hidden / 16)).
    fn rank(&self, obj: &Map<String, Value>, field: &str, hidden: usize) -> Result<usize> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(hidden.div_ceil(16)),
            Some(Value::String(s)) if s == "auto" => Ok(hidden.div_ceil(16)),
            Some(v) => self.as_usize(v, field),
        }
    }

    fn ssm_cfg<'a>(&self, obj: &'a Map<String, Value>) -> Result<Option<&'a Map<String, Value>>> {
        match obj.get("ssm_cfg") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => {
                if let Some(layer) = m.get("layer") {
                    match layer.as_str() {
                        Some("Mamba1") => {}
                        Some("Mamba2") => {
                            return Err(self.unsupported(
                                "ssm_cfg.layer is \"Mamba2\"; only Mamba-1 checkpoints are supported",
                            ));
                        }
                        _ => {
                            return Err(self.unsupported(format!(
                                "ssm_cfg.layer is {layer}; only Mamba-1 checkpoints are supported"
                            )));
                        }
                    }
                }
                Ok(Some(m))
            }
            Some(v) => Err(self.err("ssm_cfg", format!("expected an object, found {v}"))),
        }
    }

    fn hugging_face(&self, obj: &Map<String, Value>) -> Result<MambaConfig> {
        if let Some(mt) = obj.get("model_type") {
            match mt.as_str() {
                Some("mamba") => {}
                Some(other) => {
                    return Err(self.unsupported(format!(
                        "model_type is \"{other}\"; only \"mamba\" (Mamba-1) is supported"
                    )));
                }
                None => {
                    return Err(self.err("model_type", format!("expected a string, found {mt}")));
                }
            }
        }
        // HF configs also carry the original-style keys; a Mamba-2 one must still be refused.
        self.ssm_cfg(obj)?;
        let hidden = self.usize_req(obj, "hidden_size")?;
        let n_layer = self.usize_req(obj, "num_hidden_layers")?;
        let vocab = self.usize_req(obj, "vocab_size")?;
        let state = self.usize_opt(obj, "state_size")?.unwrap_or(16);
        let conv = self.usize_opt(obj, "conv_kernel")?.unwrap_or(4);
        let expand = self.usize_opt(obj, "expand")?.unwrap_or(2);
        let inner = self.product("expand", expand, hidden)?;
        if let Some(declared) = self.usize_opt(obj, "intermediate_size")?
            && declared != inner
        {
            // transformers ignores the field and uses expand × hidden_size; a file where they
            // differ was edited by hand, and guessing which one is meant would be wrong.
            return Err(self.err(
                "intermediate_size",
                format!(
                    "{declared} contradicts expand × hidden_size = {expand} × {hidden} = {inner}"
                ),
            ));
        }
        let rank = self.rank(obj, "time_step_rank", hidden)?;
        let use_bias = self.bool_opt(obj, "use_bias")?;
        let use_conv_bias = self.bool_opt(obj, "use_conv_bias")?;
        let eps = self.f64_opt(obj, "layer_norm_epsilon")?.unwrap_or(1e-5);
        let tie = self.bool_opt(obj, "tie_word_embeddings")?.unwrap_or(true);
        Ok(MambaConfig {
            hidden_size: hidden,
            num_hidden_layers: n_layer,
            vocab_size: vocab,
            state_size: state,
            conv_kernel: conv,
            expand,
            intermediate_size: inner,
            time_step_rank: rank,
            use_bias: use_bias.unwrap_or(false),
            use_conv_bias: use_conv_bias.unwrap_or(true),
            layer_norm_epsilon: eps,
            tie_word_embeddings: tie,
            pad_token_id: self.token_id(obj, "pad_token_id")?,
            bos_token_id: self.token_id(obj, "bos_token_id")?,
            eos_token_ids: self.token_ids(obj, "eos_token_id")?,
            style: ConfigStyle::HuggingFace,
            use_bias_declared: use_bias.is_some(),
            use_conv_bias_declared: use_conv_bias.is_some(),
        })
    }

    fn state_spaces(&self, obj: &Map<String, Value>) -> Result<MambaConfig> {
        let ssm = self.ssm_cfg(obj)?;
        let empty = Map::new();
        let ssm = ssm.unwrap_or(&empty);
        self.plain_mamba_blocks(obj)?;
        let hidden = self.usize_req(obj, "d_model")?;
        let n_layer = self.usize_req(obj, "n_layer")?;
        let vocab = self.padded_vocab(obj)?;
        let state = self.usize_opt(ssm, "d_state")?.unwrap_or(16);
        let conv = self.usize_opt(ssm, "d_conv")?.unwrap_or(4);
        let expand = self.usize_opt(ssm, "expand")?.unwrap_or(2);
        let rank = self.rank(ssm, "dt_rank", hidden)?;
        // mamba_simple.Mamba defaults: bias=False, conv_bias=True. Never the HF default.
        let use_bias = self.bool_opt(ssm, "bias")?;
        let use_conv_bias = self.bool_opt(ssm, "conv_bias")?;
        let eps = self.f64_opt(obj, "norm_epsilon")?.unwrap_or(1e-5);
        let tie = self.bool_opt(obj, "tie_embeddings")?.unwrap_or(true);
        Ok(MambaConfig {
            hidden_size: hidden,
            num_hidden_layers: n_layer,
            vocab_size: vocab,
            state_size: state,
            conv_kernel: conv,
            expand,
            intermediate_size: self.product("expand", expand, hidden)?,
            time_step_rank: rank,
            use_bias: use_bias.unwrap_or(false),
            use_conv_bias: use_conv_bias.unwrap_or(true),
            layer_norm_epsilon: eps,
            tie_word_embeddings: tie,
            pad_token_id: self.token_id(obj, "pad_token_id")?,
            bos_token_id: self.token_id(obj, "bos_token_id")?,
            eos_token_ids: self.token_ids(obj, "eos_token_id")?,
            style: ConfigStyle::StateSpaces,
            use_bias_declared: use_bias.is_some(),
            use_conv_bias_declared: use_conv_bias.is_some(),
        })
    }

    fn check(&self, c: &MambaConfig) -> Result<()> {
        let (hidden, layers, vocab) = match c.style {
            ConfigStyle::HuggingFace => ("hidden_size", "num_hidden_layers", "vocab_size"),
            ConfigStyle::StateSpaces => ("d_model", "n_layer", "vocab_size"),
        };
        self.positive(&[
            (hidden, c.hidden_size),
            (layers, c.num_hidden_layers),
            (vocab, c.vocab_size),
            ("state_size", c.state_size),
            ("conv_kernel", c.conv_kernel),
            ("expand", c.expand),
            ("time_step_rank", c.time_step_rank),
        ])?;
        self.epsilon("layer_norm_epsilon", c.layer_norm_epsilon)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MambaConfig> {
        MambaConfig::from_json_str(s, Path::new("config.json"))
    }

    #[test]
    fn hf_style_with_auto_rank() {
        let c = parse(
            r#"{"hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280,
                "time_step_rank": "auto", "use_bias": false, "eos_token_id": 0}"#,
        )
        .unwrap();
        assert_eq!(c.style, ConfigStyle::HuggingFace);
        assert_eq!(c.time_step_rank, 48);
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!(c.eos_token_ids, vec![0]);
        assert!(c.use_bias_declared && !c.use_bias);
        assert!(!c.use_conv_bias_declared && c.use_conv_bias);
    }

    #[test]
    fn state_spaces_style_pads_vocab_and_reads_ssm_cfg() {
        let c = parse(
            r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"d_state": 8},
                "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
                "pad_vocab_size_multiple": 8}"#,
        )
        .unwrap();
        assert_eq!(c.style, ConfigStyle::StateSpaces);
        assert_eq!(c.vocab_size, 50280);
        assert_eq!(c.state_size, 8);
        assert_eq!(c.time_step_rank, 48);
        assert!(!c.use_bias && !c.use_bias_declared);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn mamba2_is_refused() {
        let e = parse(
            r#"{"d_model": 64, "n_layer": 2, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Mamba2") && e.contains("config.json"), "{e}");
    }

    #[test]
    fn unknown_style_names_the_file() {
        let e = parse(r#"{"n_embd": 64}"#).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("unknown config style"),
            "{e}"
        );
    }

    #[test]
    fn absurd_sizes_are_refused_without_overflow() {
        let e = parse(r#"{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10, "expand": 18446744073709551615}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expand") && e.contains("implausibly large"),
            "{e}"
        );
        let e = parse(r#"{"d_model": 16777216, "n_layer": 1, "vocab_size": 10, "ssm_cfg": {"expand": 16777216}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expand"), "{e}");
    }

    #[test]
    fn bad_field_is_named() {
        let e = parse(r#"{"hidden_size": "big", "num_hidden_layers": 2, "vocab_size": 10}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = parse(r#"{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 100}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("intermediate_size") && e.contains("128"), "{e}");
    }
}
