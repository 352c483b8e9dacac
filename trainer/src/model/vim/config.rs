//! Vim's `config.json`: every `VisionMamba` kwarg by name (hustvl/Vim `vim/models_mamba.py`),
//! resolved into one [`VimConfig`]. Options the model does not implement are refused by
//! name rather than ignored: a config that asks for rope, a double class token, bimamba v1 or
//! LayerNorm blocks would give silently different numbers.
//!
//! Defaults are `VisionMamba.__init__`'s: `stride = patch_size`, `d_state = 16`,
//! `ssm_cfg.{d_conv = 4, expand = 2, dt_rank = ceil(embed_dim / 16), conv_bias = true,
//! bias = false}`, `if_divide_out = false`, `norm_epsilon = 1e-5`, `channels = 3`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::fields::{Fields, LIMIT};
use crate::model::selective::BranchDims;

/// Where the class token sits in the token sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClsPosition {
    /// Index `M / 2` (floor) of the M patch tokens (`use_middle_cls_token`).
    Middle,
    /// Before the patches (`if_cls_token` without `use_middle_cls_token`).
    First,
}

/// A resolved Vision Mamba config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VimConfig {
    /// `[H, W]`.
    pub img_size: [usize; 2],
    pub patch_size: usize,
    pub stride: usize,
    pub channels: usize,
    pub depth: usize,
    pub embed_dim: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    pub dt_rank: usize,
    pub conv_bias: bool,
    pub num_classes: usize,
    pub norm_epsilon: f64,
    pub drop_path_rate: f64,
    pub cls_position: ClsPosition,
    /// `if_divide_out`: the two directions are averaged (true) or summed (false).
    pub divide_out: bool,
}

impl VimConfig {
    pub fn d_inner(&self) -> usize {
        self.expand * self.embed_dim
    }

    /// Patch grid `(gh, gw)` for an image of `[h, w]`: `((h-p)/s+1, (w-p)/s+1)`.
    pub fn grid_for(&self, img: [usize; 2]) -> Option<(usize, usize)> {
        let g = |n: usize| n.checked_sub(self.patch_size).map(|d| d / self.stride + 1);
        Some((g(img[0])?, g(img[1])?))
    }

    /// The configured image size's grid.
    pub fn grid(&self) -> (usize, usize) {
        // Checked at parse time: img_size ≥ patch_size.
        self.grid_for(self.img_size).unwrap_or((0, 0))
    }

    pub fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    /// Sequence length with the class token.
    pub fn seq_len(&self) -> usize {
        self.num_patches() + 1
    }

    /// Index of the class token in the sequence.
    pub fn cls_index(&self) -> usize {
        cls_index(self.cls_position, self.num_patches())
    }

    pub fn branch_dims(&self) -> BranchDims {
        BranchDims {
            d_inner: self.d_inner(),
            d_state: self.d_state,
            dt_rank: self.dt_rank,
            d_conv: self.d_conv,
            conv_bias: self.conv_bias,
        }
    }

    /// Drop-path rate of block i's incoming residual branch (hustvl: `([0] + linspace(0,
    /// rate, depth))[i]`); index `depth` is the final add before `norm_f` (the full rate).
    pub fn drop_path_at(&self, i: usize) -> f64 {
        if i >= self.depth {
            return self.drop_path_rate;
        }
        if i == 0 || self.depth < 2 {
            return 0.0;
        }
        self.drop_path_rate * (i - 1) as f64 / (self.depth - 1) as f64
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(&value, path)
    }

    /// Resolves the kwargs in `value`; `path` is only used in messages.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let r = Reader(Fields::new(path));
        let Value::Object(obj) = value else {
            return Err(r.err("(top level)", "expected a JSON object"));
        };
        let empty = Map::new();
        let ssm = match obj.get("ssm_cfg") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(v) => return Err(r.err("ssm_cfg", format!("expected an object, found {v}"))),
        };
        // Options this implementation does not have: refuse them by name.
        r.require_bool(obj, "rms_norm", true, true)?;
        r.require_bool(obj, "if_abs_pos_embed", true, true)?;
        r.require_bool(obj, "if_cls_token", true, true)?;
        r.require_bool(obj, "if_rope", false, false)?;
        r.require_bool(obj, "if_rope_residual", false, false)?;
        r.require_bool(obj, "if_bidirectional", false, false)?;
        r.require_bool(obj, "if_bimamba", false, false)?;
        r.require_bool(obj, "use_double_cls_token", false, false)?;
        if let Some(t) = obj.get("bimamba_type")
            && !t.is_null()
            && t.as_str() != Some("v2")
        {
            return Err(r.unsupported(format!(
                "bimamba_type is {t}; only \"v2\" (shared in_proj/out_proj, two scans) is supported"
            )));
        }
        if let Some(v) = obj.get("flip_img_sequences_ratio")
            && let Some(f) = v.as_f64()
            && f > 0.0
        {
            return Err(r.unsupported(format!(
                "flip_img_sequences_ratio is {f}; random sequence flipping is not supported"
            )));
        }
        if let Some(v) = obj.get("init_layer_scale")
            && !v.is_null()
        {
            return Err(r.unsupported(format!(
                "init_layer_scale is {v}; layer scale is not supported"
            )));
        }
        if let Some(v) = obj
            .get("if_devide_out")
            .or_else(|| obj.get("if_divide_out"))
            && !v.is_null()
            && !v.is_boolean()
        {
            return Err(r.err(
                "if_divide_out",
                format!("expected true or false, found {v}"),
            ));
        }

        let img_size = r.pair(obj, "img_size")?.unwrap_or([224, 224]);
        let patch_size = r.usize_opt(obj, "patch_size")?.unwrap_or(16);
        let stride = r.usize_opt(obj, "stride")?.unwrap_or(patch_size);
        let embed_dim = r.usize_req(obj, "embed_dim")?;
        let depth = r.usize_req(obj, "depth")?;
        let channels = r.usize_opt(obj, "channels")?.unwrap_or(3);
        let d_state = r.usize_opt(obj, "d_state")?.unwrap_or(16);
        let num_classes = r.usize_opt(obj, "num_classes")?.unwrap_or(1000);
        let d_conv = r.usize_opt(ssm, "d_conv")?.unwrap_or(4);
        let expand = r.usize_opt(ssm, "expand")?.unwrap_or(2);
        let dt_rank = match ssm.get("dt_rank") {
            None | Some(Value::Null) => embed_dim.div_ceil(16),
            Some(Value::String(s)) if s == "auto" => embed_dim.div_ceil(16),
            Some(v) => r.as_usize(v, "ssm_cfg.dt_rank")?,
        };
        if r.bool_opt(ssm, "bias")? == Some(true) {
            return Err(r.unsupported(
                "ssm_cfg.bias is true; Vim's in_proj/out_proj have no bias".to_string(),
            ));
        }
        let conv_bias = r.bool_opt(ssm, "conv_bias")?.unwrap_or(true);
        let middle = r.bool_opt(obj, "use_middle_cls_token")?.unwrap_or(false);
        let divide_out = match obj
            .get("if_devide_out")
            .or_else(|| obj.get("if_divide_out"))
        {
            Some(Value::Bool(b)) => *b,
            _ => false,
        };
        let norm_epsilon = r.f64_opt(obj, "norm_epsilon")?.unwrap_or(1e-5);
        let drop_path_rate = r.f64_opt(obj, "drop_path_rate")?.unwrap_or(0.0);
        let cfg = VimConfig {
            img_size,
            patch_size,
            stride,
            channels,
            depth,
            embed_dim,
            d_state,
            d_conv,
            expand,
            dt_rank,
            conv_bias,
            num_classes,
            norm_epsilon,
            drop_path_rate,
            cls_position: if middle {
                ClsPosition::Middle
            } else {
                ClsPosition::First
            },
            divide_out,
        };
        r.check(&cfg)?;
        Ok(cfg)
    }
}

/// Index of the class token among `m` patches plus the token.
pub fn cls_index(pos: ClsPosition, m: usize) -> usize {
    match pos {
        ClsPosition::Middle => m / 2,
        ClsPosition::First => 0,
    }
}

/// The Vim reads on top of the shared [`Fields`].
struct Reader(Fields);

impl std::ops::Deref for Reader {
    type Target = Fields;
    fn deref(&self) -> &Fields {
        &self.0
    }
}

impl Reader {
    /// A bool option that must have the value `want` (`default` when absent).
    fn require_bool(
        &self,
        obj: &Map<String, Value>,
        field: &str,
        want: bool,
        default: bool,
    ) -> Result<()> {
        let v = self.bool_opt(obj, field)?.unwrap_or(default);
        if v != want {
            return Err(self.unsupported(format!(
                "{field} is {v}; this Vim implementation needs {field} = {want}"
            )));
        }
        Ok(())
    }

    /// An int (square) or a two-element list `[H, W]`.
    fn pair(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<[usize; 2]>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.len() == 2 => Ok(Some([
                self.as_usize(&a[0], field)?,
                self.as_usize(&a[1], field)?,
            ])),
            Some(v) if v.is_number() => {
                let n = self.as_usize(v, field)?;
                Ok(Some([n, n]))
            }
            Some(v) => Err(self.err(
                field,
                format!("expected an integer or [height, width], found {v}"),
            )),
        }
    }

    fn check(&self, c: &VimConfig) -> Result<()> {
        let positive = [
            ("patch_size", c.patch_size),
            ("stride", c.stride),
            ("channels", c.channels),
            ("depth", c.depth),
            ("embed_dim", c.embed_dim),
            ("d_state", c.d_state),
            ("ssm_cfg.d_conv", c.d_conv),
            ("ssm_cfg.expand", c.expand),
            ("ssm_cfg.dt_rank", c.dt_rank),
            ("num_classes", c.num_classes),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(self.err(field, "must be at least 1"));
            }
        }
        if c.img_size[0] < c.patch_size || c.img_size[1] < c.patch_size {
            return Err(self.err(
                "img_size",
                format!(
                    "{:?} is smaller than patch_size {}",
                    c.img_size, c.patch_size
                ),
            ));
        }
        if c.expand * c.embed_dim > LIMIT {
            return Err(self.err("ssm_cfg.expand", "expand × embed_dim is implausibly large"));
        }
        if !(c.norm_epsilon.is_finite() && c.norm_epsilon > 0.0) {
            return Err(self.err("norm_epsilon", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&c.drop_path_rate) {
            return Err(self.err(
                "drop_path_rate",
                format!("{} is outside [0, 1)", c.drop_path_rate),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VimConfig> {
        VimConfig::from_json_str(s, Path::new("config.json"))
    }

    #[test]
    fn non_square_grid_and_defaults() {
        let c = parse(
            r#"{"img_size": [40, 24], "patch_size": 8, "stride": 4, "embed_dim": 40, "depth": 2,
                "use_middle_cls_token": true, "if_devide_out": true, "num_classes": 5}"#,
        )
        .unwrap();
        assert_eq!(c.grid(), (9, 5));
        assert_eq!(c.cls_index(), 22);
        assert_eq!(c.dt_rank, 3);
        assert_eq!(c.d_state, 16);
        assert!(c.divide_out);
    }

    #[test]
    fn unsupported_options_are_named() {
        let e = parse(r#"{"embed_dim": 8, "depth": 1, "if_rope": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("if_rope"), "{e}");
        let e = parse(r#"{"embed_dim": 8, "depth": 1, "bimamba_type": "v1"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bimamba_type"), "{e}");
    }

    #[test]
    fn drop_path_schedule() {
        let mut c = parse(r#"{"embed_dim": 8, "depth": 3, "drop_path_rate": 0.1}"#).unwrap();
        assert_eq!(c.drop_path_at(0), 0.0);
        assert_eq!(c.drop_path_at(1), 0.0);
        assert!((c.drop_path_at(2) - 0.05).abs() < 1e-12);
        assert_eq!(c.drop_path_at(3), 0.1);
        c.drop_path_rate = 0.0;
        assert_eq!(c.drop_path_at(3), 0.0);
    }
}
