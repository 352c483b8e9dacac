//! Mamba-2's `config.json` in both namings, resolved into one [`Mamba2Config`].
//!
//! - Hugging Face (`Mamba2Config` in transformers, `model_type: "mamba2"`): `hidden_size`,
//!   `num_hidden_layers`, `num_heads`, `head_dim`, `state_size`, `n_groups`, `chunk_size`,
//!   `expand`, `conv_kernel`, `time_step_limit` (transformers writes +inf as
//!   `{"__float__": "Infinity"}`), `use_bias`, `use_conv_bias`, `tie_word_embeddings`. Absent
//!   fields take transformers' defaults, except that the three sizes are required.
//! - state-spaces (mamba_ssm `MambaLMHeadModel`): `d_model`, `n_layer`, `vocab_size` padded
//!   to `pad_vocab_size_multiple`, and `ssm_cfg: {"layer": "Mamba2", …}` listing only what
//!   differs from the `Mamba2` constructor's defaults (`d_state` 128, `d_conv` 4, `expand` 2,
//!   `headdim` 64, `ngroups` 1, `chunk_size` 256, `rmsnorm` true, `norm_before_gate` false,
//!   `D_has_hdim` false, `bias` false, `conv_bias` true, `dt_limit` (0, inf)).
//!
//! Variants transformers cannot express — `norm_before_gate: true`, `D_has_hdim: true`,
//! `rmsnorm: false`, `d_ssm` < E (an extra gated-MLP slice), learnable initial states, another
//! activation — are refused with a message naming the field: their numbers would differ.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::config::ConfigStyle;
use crate::model::fields::Fields;

/// A resolved Mamba-2 language-model config. `vocab_size` is the number of embedding rows
/// (already padded for state-spaces configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mamba2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    /// H.
    pub num_heads: usize,
    /// P.
    pub head_dim: usize,
    /// N.
    pub state_size: usize,
    /// G: B and C are shared by the H/G heads of a group; the gated norm has G groups.
    pub n_groups: usize,
    pub chunk_size: usize,
    pub expand: usize,
    pub conv_kernel: usize,
    /// `(min, max)` clamp of dt after the softplus, on the chunked path only (HF and
    /// mamba_ssm leave the single-token cached step unclamped). `(0, inf)` is no clamp.
    pub time_step_limit: (f64, f64),
    /// Bias on in_proj and out_proj.
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub style: ConfigStyle,
}

impl Mamba2Config {
    /// A config with mamba_ssm's mixer defaults scaled to `hidden_size` (head_dim 64 or
    /// smaller, one group); handy for random-init models.
    pub fn new(hidden_size: usize, num_hidden_layers: usize, vocab_size: usize) -> Self {
        let expand = 2;
        let e = expand * hidden_size;
        let head_dim = 64.min(e);
        Mamba2Config {
            hidden_size,
            num_hidden_layers,
            vocab_size,
            num_heads: e / head_dim,
            head_dim,
            state_size: 128,
            n_groups: 1,
            chunk_size: 256,
            expand,
            conv_kernel: 4,
            time_step_limit: (0.0, f64::INFINITY),
            use_bias: false,
            use_conv_bias: true,
            layer_norm_epsilon: 1e-5,
            tie_word_embeddings: true,
            pad_token_id: Some(0),
            bos_token_id: Some(0),
            eos_token_ids: vec![0],
            style: ConfigStyle::HuggingFace,
        }
    }

    /// E = H·P.
    pub fn intermediate_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Channels of the conv: x, B and C (`E + 2GN`).
    pub fn conv_dim(&self) -> usize {
        self.intermediate_size() + 2 * self.n_groups * self.state_size
    }

    /// Rows of in_proj: `z | xBC | dt` = `2E + 2GN + H`.
    pub fn d_in_proj(&self) -> usize {
        self.intermediate_size() + self.conv_dim() + self.num_heads
    }

    /// Whether dt is clamped at all (a finite bound, or a positive lower one).
    pub fn clamps_dt(&self) -> bool {
        self.time_step_limit.0 > 0.0 || self.time_step_limit.1.is_finite()
    }

    /// Reads and resolves `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(&value, path)
    }

    /// Resolves a parsed config; `path` is only used in messages.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let f = Fields::new(path);
        let obj = f.object(value)?;
        let cfg = if obj.contains_key("hidden_size") {
            hugging_face(&f, obj)?
        } else if obj.contains_key("d_model") {
            state_spaces(&f, obj)?
        } else {
            return Err(Error::UnknownConfigStyle {
                path: path.to_path_buf(),
            });
        };
        check(&f, &cfg)?;
        Ok(cfg)
    }

    /// The HF-style JSON for this config (what transformers' `save_pretrained` writes, +inf
    /// in its `{"__float__": "Infinity"}` form).
    pub fn to_hf_json(&self) -> Value {
        let bound = |v: f64| {
            if v.is_finite() {
                Value::from(v)
            } else {
                serde_json::json!({"__float__": if v > 0.0 { "Infinity" } else { "-Infinity" }})
            }
        };
        serde_json::json!({
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "state_size": self.state_size,
            "n_groups": self.n_groups,
            "chunk_size": self.chunk_size,
            "expand": self.expand,
            "conv_kernel": self.conv_kernel,
            "time_step_limit": [bound(self.time_step_limit.0), bound(self.time_step_limit.1)],
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

/// `[min, max]` from a two-element list.
fn limit(f: &Fields, obj: &Map<String, Value>, field: &str) -> Result<Option<(f64, f64)>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.len() == 2 => {
            let (lo, hi) = (f.as_f64(&a[0], field)?, f.as_f64(&a[1], field)?);
            if lo.is_nan() || hi.is_nan() || lo < 0.0 || lo > hi {
                return Err(f.err(
                    field,
                    format!("[{lo}, {hi}] is not a range 0 ≤ min ≤ max of time steps"),
                ));
            }
            Ok(Some((lo, hi)))
        }
        Some(v) => Err(f.err(field, format!("expected [min, max], found {v}"))),
    }
}

fn hugging_face(f: &Fields, obj: &Map<String, Value>) -> Result<Mamba2Config> {
    if let Some(mt) = obj.get("model_type") {
        match mt.as_str() {
            Some("mamba2") => {}
            Some(other) => {
                return Err(f.unsupported(format!(
                    "model_type is \"{other}\"; a Mamba-2 config has \"mamba2\""
                )));
            }
            None => return Err(f.err("model_type", format!("expected a string, found {mt}"))),
        }
    }
    let hidden = f.usize_req(obj, "hidden_size")?;
    let expand = f.usize_opt(obj, "expand")?.unwrap_or(2);
    f.product("expand", expand, hidden)?;
    Ok(Mamba2Config {
        hidden_size: hidden,
        num_hidden_layers: f.usize_req(obj, "num_hidden_layers")?,
        vocab_size: f.usize_req(obj, "vocab_size")?,
        num_heads: f.usize_opt(obj, "num_heads")?.unwrap_or(128),
        head_dim: f.usize_opt(obj, "head_dim")?.unwrap_or(64),
        state_size: f.usize_opt(obj, "state_size")?.unwrap_or(128),
        n_groups: f.usize_opt(obj, "n_groups")?.unwrap_or(8),
        chunk_size: f.usize_opt(obj, "chunk_size")?.unwrap_or(256),
        expand,
        conv_kernel: f.usize_opt(obj, "conv_kernel")?.unwrap_or(4),
        time_step_limit: limit(f, obj, "time_step_limit")?.unwrap_or((0.0, f64::INFINITY)),
        use_bias: f.bool_opt(obj, "use_bias")?.unwrap_or(false),
        use_conv_bias: f.bool_opt(obj, "use_conv_bias")?.unwrap_or(true),
        layer_norm_epsilon: f.f64_opt(obj, "layer_norm_epsilon")?.unwrap_or(1e-5),
        tie_word_embeddings: f.bool_opt(obj, "tie_word_embeddings")?.unwrap_or(false),
        pad_token_id: f.token_id(obj, "pad_token_id")?,
        bos_token_id: f.token_id(obj, "bos_token_id")?,
        eos_token_ids: f.token_ids(obj, "eos_token_id")?,
        style: ConfigStyle::HuggingFace,
    })
}

fn state_spaces(f: &Fields, obj: &Map<String, Value>) -> Result<Mamba2Config> {
    let empty = Map::new();
    let ssm = f.object_opt(obj, "ssm_cfg")?.unwrap_or(&empty);
    match ssm.get("layer").and_then(Value::as_str) {
        Some("Mamba2") => {}
        _ => {
            return Err(f.unsupported(format!(
                "ssm_cfg.layer is {}; a Mamba-2 config has \"Mamba2\"",
                ssm.get("layer").unwrap_or(&Value::Null)
            )));
        }
    }
    f.plain_mamba_blocks(obj)?;
    // Variants transformers cannot express; their numbers differ from the HF reference.
    for (field, unsupported_value, why) in [
        ("rmsnorm", false, "the mixer without its gated RMSNorm"),
        ("norm_before_gate", true, "normalising before the gate"),
        ("D_has_hdim", true, "a D per channel instead of per head"),
        ("learnable_init_states", true, "learnable initial states"),
    ] {
        if f.bool_opt(ssm, field)? == Some(unsupported_value) {
            return Err(f.unsupported(format!(
                "ssm_cfg.{field} is {unsupported_value} ({why}): not supported; molt implements \
                 Mamba-2 as transformers' Mamba2ForCausalLM does"
            )));
        }
    }
    if let Some(act) = ssm.get("activation")
        && act.as_str() != Some("silu")
        && act.as_str() != Some("swish")
    {
        return Err(f.unsupported(format!(
            "ssm_cfg.activation is {act}; only \"silu\" is supported"
        )));
    }
    let hidden = f.usize_req(obj, "d_model")?;
    let expand = f.usize_opt(ssm, "expand")?.unwrap_or(2);
    let e = f.product("ssm_cfg.expand", expand, hidden)?;
    if let Some(d_ssm) = f.usize_opt(ssm, "d_ssm")?
        && d_ssm != e
    {
        return Err(f.unsupported(format!(
            "ssm_cfg.d_ssm is {d_ssm}, not expand × d_model = {e}: the extra gated-MLP slice \
             is not supported"
        )));
    }
    let head_dim = f.usize_opt(ssm, "headdim")?.unwrap_or(64);
    if head_dim == 0 || !e.is_multiple_of(head_dim) {
        return Err(f.err(
            "ssm_cfg.headdim",
            format!("{head_dim} does not divide expand × d_model = {e}"),
        ));
    }
    let vocab = f.padded_vocab(obj)?;
    Ok(Mamba2Config {
        hidden_size: hidden,
        num_hidden_layers: f.usize_req(obj, "n_layer")?,
        vocab_size: vocab,
        num_heads: e / head_dim,
        head_dim,
        state_size: f.usize_opt(ssm, "d_state")?.unwrap_or(128),
        n_groups: f.usize_opt(ssm, "ngroups")?.unwrap_or(1),
        chunk_size: f.usize_opt(ssm, "chunk_size")?.unwrap_or(256),
        expand,
        conv_kernel: f.usize_opt(ssm, "d_conv")?.unwrap_or(4),
        time_step_limit: limit(f, ssm, "dt_limit")?.unwrap_or((0.0, f64::INFINITY)),
        use_bias: f.bool_opt(ssm, "bias")?.unwrap_or(false),
        use_conv_bias: f.bool_opt(ssm, "conv_bias")?.unwrap_or(true),
        layer_norm_epsilon: f.f64_opt(obj, "norm_epsilon")?.unwrap_or(1e-5),
        tie_word_embeddings: f.bool_opt(obj, "tie_embeddings")?.unwrap_or(true),
        pad_token_id: f.token_id(obj, "pad_token_id")?,
        bos_token_id: f.token_id(obj, "bos_token_id")?,
        eos_token_ids: f.token_ids(obj, "eos_token_id")?,
        style: ConfigStyle::StateSpaces,
    })
}

fn check(f: &Fields, c: &Mamba2Config) -> Result<()> {
    let hf = c.style == ConfigStyle::HuggingFace;
    let name = |hf_name: &'static str, ss_name: &'static str| if hf { hf_name } else { ss_name };
    f.positive(&[
        (name("hidden_size", "d_model"), c.hidden_size),
        (name("num_hidden_layers", "n_layer"), c.num_hidden_layers),
        ("vocab_size", c.vocab_size),
        (name("num_heads", "ssm_cfg.headdim"), c.num_heads),
        (name("head_dim", "ssm_cfg.headdim"), c.head_dim),
        (name("state_size", "ssm_cfg.d_state"), c.state_size),
        (name("n_groups", "ssm_cfg.ngroups"), c.n_groups),
        (name("chunk_size", "ssm_cfg.chunk_size"), c.chunk_size),
        (name("expand", "ssm_cfg.expand"), c.expand),
        (name("conv_kernel", "ssm_cfg.d_conv"), c.conv_kernel),
    ])?;
    let e = c.expand * c.hidden_size;
    if c.num_heads.checked_mul(c.head_dim) != Some(e) {
        // transformers views x as [H, P] and sizes in_proj from expand × hidden_size; a
        // config where the two disagree cannot be loaded by it either.
        return Err(f.err(
            "num_heads",
            format!(
                "num_heads × head_dim = {} × {} must equal expand × hidden_size = {e}",
                c.num_heads, c.head_dim
            ),
        ));
    }
    if !c.num_heads.is_multiple_of(c.n_groups) {
        return Err(f.err(
            name("n_groups", "ssm_cfg.ngroups"),
            format!("{} does not divide the {} heads", c.n_groups, c.num_heads),
        ));
    }
    f.product("state_size", 2 * c.n_groups, c.state_size)?;
    f.epsilon(
        name("layer_norm_epsilon", "norm_epsilon"),
        c.layer_norm_epsilon,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Mamba2Config> {
        Mamba2Config::from_value(&serde_json::from_str(s).unwrap(), Path::new("config.json"))
    }

    #[test]
    fn mamba2_130m_original_config_and_derived_widths() {
        // The released state-spaces/mamba2-130m config.json.
        let c = parse(
            r#"{"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
                "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
                "pad_vocab_size_multiple": 16, "tie_embeddings": true}"#,
        )
        .unwrap();
        assert_eq!(c.style, ConfigStyle::StateSpaces);
        assert_eq!(c.vocab_size, 50288);
        assert_eq!((c.num_heads, c.head_dim, c.state_size), (24, 64, 128));
        assert_eq!(c.intermediate_size(), 1536);
        assert_eq!(c.conv_dim(), 1792);
        assert_eq!(c.d_in_proj(), 3352);
        assert!(!c.clamps_dt());
    }

    #[test]
    fn hf_infinity_round_trips() {
        let c = parse(
            r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2,
                "vocab_size": 500, "num_heads": 8, "head_dim": 16, "n_groups": 2,
                "time_step_limit": [0.0, {"__float__": "Infinity"}]}"#,
        )
        .unwrap();
        assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));
        let again = Mamba2Config::from_value(&c.to_hf_json(), Path::new("x.json")).unwrap();
        assert_eq!(again, c);
        let c = parse(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 500, "num_heads": 8,
                "head_dim": 16, "n_groups": 1, "model_type": "mamba2",
                "time_step_limit": [0.01, 0.2]}"#,
        )
        .unwrap();
        assert!(c.clamps_dt());
    }

    #[test]
    fn bad_fields_are_named() {
        for (json, field) in [
            (
                r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 5, "num_heads": 7, "head_dim": 16}"#,
                "num_heads",
            ),
            (
                r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 5, "num_heads": 8, "head_dim": 16, "n_groups": 3}"#,
                "n_groups",
            ),
            (
                r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 5, "num_heads": 8, "head_dim": 16, "n_groups": 1, "time_step_limit": [0.5, 0.1]}"#,
                "time_step_limit",
            ),
            (
                r#"{"d_model": 64, "n_layer": 2, "vocab_size": 5, "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": true}}"#,
                "ssm_cfg.norm_before_gate",
            ),
            (
                r#"{"d_model": 64, "n_layer": 2, "vocab_size": 5, "ssm_cfg": {"layer": "Mamba2", "D_has_hdim": true}}"#,
                "ssm_cfg.D_has_hdim",
            ),
            (
                r#"{"d_model": 64, "n_layer": 2, "vocab_size": 5, "ssm_cfg": {"layer": "Mamba2", "rmsnorm": false}}"#,
                "ssm_cfg.rmsnorm",
            ),
            (
                r#"{"d_model": 64, "n_layer": 2, "vocab_size": 5, "ssm_cfg": {"layer": "Mamba2", "headdim": 48}}"#,
                "ssm_cfg.headdim",
            ),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.contains("config.json"),
                "{field}: {e}"
            );
        }
    }
}
