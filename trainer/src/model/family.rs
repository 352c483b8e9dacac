//! Which model family a `config.json` describes — the first question the seam answers.
//!
//! | family | recognised by |
//! | --- | --- |
//! | [`Family::Mamba`] (Mamba-1 LM) | HF `model_type: "mamba"`; or `hidden_size` (HF style) without `model_type`; or state-spaces `d_model` with no `ssm_cfg.layer` / `ssm_cfg.layer: "Mamba1"` |
//! | [`Family::Vim`] (Vision Mamba) | Vim's kwargs: `img_size`, `patch_size` and `embed_dim`, or `bimamba_type` |
//! | [`Family::Mamba2`] (Mamba-2 LM) | HF `model_type: "mamba2"`, or state-spaces `ssm_cfg.layer: "Mamba2"` |
//!
//! Adding a family is one variant here, one arm in [`detect`], and one folder under
//! `model/` (see the seam in [`super`]).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// A model family molt can load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Mamba-1 language model (`MambaForCausalLM`, mamba_ssm `MambaLMHeadModel`).
    Mamba,
    /// Vision Mamba (hustvl/Vim `VisionMamba`, bimamba v2, middle class token).
    Vim,
    /// Mamba-2 language model (`Mamba2ForCausalLM`, mamba_ssm with `ssm_cfg.layer: "Mamba2"`).
    Mamba2,
}

impl Family {
    /// Every family, in registry order.
    pub const ALL: [Family; 3] = [Family::Mamba, Family::Vim, Family::Mamba2];

    /// The name written in adapter configs and API responses.
    pub fn name(self) -> &'static str {
        match self {
            Family::Mamba => "mamba",
            Family::Vim => "vim",
            Family::Mamba2 => "mamba2",
        }
    }

    /// What the family's head does.
    pub fn task(self) -> Task {
        match self {
            Family::Mamba | Family::Mamba2 => Task::CausalLm,
            Family::Vim => Task::ImageClassification,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The task head a family carries, which fixes its loss and its serving entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Next-token prediction over a vocabulary (completions, scoring).
    CausalLm,
    /// One label per image, read at a class token (classification).
    ImageClassification,
}

/// The family of a parsed `config.json`; `path` is only used in messages.
pub fn detect(config: &Value, path: &Path) -> Result<Family> {
    let unsupported = |what: String| Error::Unsupported {
        path: path.to_path_buf(),
        what,
    };
    let Value::Object(obj) = config else {
        return Err(Error::ConfigField {
            path: path.to_path_buf(),
            field: "(top level)".into(),
            reason: "expected a JSON object".into(),
        });
    };
    if let Some(mt) = obj.get("model_type") {
        match mt.as_str() {
            Some("mamba") => return Ok(Family::Mamba),
            Some("mamba2") => return Ok(Family::Mamba2),
            Some("vim" | "vision_mamba") => return Ok(Family::Vim),
            Some(other) => {
                return Err(unsupported(format!(
                    "model_type is \"{other}\"; known families: mamba (Mamba-1), mamba2 (Mamba-2), vim (Vision Mamba)"
                )));
            }
            None => {
                return Err(Error::ConfigField {
                    path: path.to_path_buf(),
                    field: "model_type".into(),
                    reason: format!("expected a string, found {mt}"),
                });
            }
        }
    }
    if let Some(layer) = obj.get("ssm_cfg").and_then(|c| c.get("layer")) {
        match layer.as_str() {
            Some("Mamba1") => {}
            Some("Mamba2") => return Ok(Family::Mamba2),
            _ => {
                return Err(unsupported(format!(
                    "ssm_cfg.layer is {layer}; known layers: \"Mamba1\", \"Mamba2\""
                )));
            }
        }
    }
    let has = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if has("bimamba_type") || (has("img_size") && has("patch_size") && has("embed_dim")) {
        return Ok(Family::Vim);
    }
    if has("hidden_size") || has("d_model") {
        return Ok(Family::Mamba);
    }
    Err(Error::UnknownConfigStyle {
        path: path.to_path_buf(),
    })
}

/// Reads `dir/config.json` and detects its family.
pub fn detect_dir(dir: &Path) -> Result<Family> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    detect(&value, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(s: &str) -> Result<Family> {
        detect(&serde_json::from_str(s).unwrap(), Path::new("config.json"))
    }

    #[test]
    fn mamba_styles() {
        assert_eq!(
            det(r#"{"model_type": "mamba", "hidden_size": 8}"#).unwrap(),
            Family::Mamba
        );
        assert_eq!(det(r#"{"hidden_size": 8}"#).unwrap(), Family::Mamba);
        assert_eq!(
            det(r#"{"d_model": 8, "n_layer": 2, "ssm_cfg": {"d_state": 4}}"#).unwrap(),
            Family::Mamba
        );
        assert_eq!(
            det(r#"{"d_model": 8, "ssm_cfg": {"layer": "Mamba1"}}"#).unwrap(),
            Family::Mamba
        );
    }

    #[test]
    fn vim_kwargs() {
        let f = det(
            r#"{"img_size": [32, 32], "patch_size": 8, "embed_dim": 48, "depth": 3,
                        "bimamba_type": "v2", "ssm_cfg": {"d_conv": 4}}"#,
        )
        .unwrap();
        assert_eq!(f, Family::Vim);
        assert_eq!(f.task(), Task::ImageClassification);
    }

    #[test]
    fn mamba2_in_both_namings() {
        assert_eq!(
            det(r#"{"model_type": "mamba2", "hidden_size": 8}"#).unwrap(),
            Family::Mamba2
        );
        let f = det(r#"{"d_model": 8, "ssm_cfg": {"layer": "Mamba2"}}"#).unwrap();
        assert_eq!(f, Family::Mamba2);
        assert_eq!(f.task(), Task::CausalLm);
        let e = det(r#"{"d_model": 8, "ssm_cfg": {"layer": "Mamba3"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssm_cfg.layer") && e.contains("Mamba3"), "{e}");
    }

    #[test]
    fn unknown_is_refused() {
        let e = det(r#"{"n_embd": 8}"#).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }
}
