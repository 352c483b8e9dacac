//! Typed reads of `config.json` fields, shared by every family's config parser: each error
//! names the file and the field, every size is bounded before it is used, and the JSON
//! quirks real exporters produce (`2.0` for an integer, `-1` for "no such token",
//! transformers' `{"__float__": "Infinity"}` for ±inf) are accepted.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Upper bound for any size field (16M): far above every real model, far below overflow.
pub(crate) const LIMIT: usize = 1 << 24;

/// Reads fields of one config file; `path` is only used in messages.
pub(crate) struct Fields {
    pub(crate) path: PathBuf,
}

impl Fields {
    pub(crate) fn new(path: &Path) -> Self {
        Fields {
            path: path.to_path_buf(),
        }
    }

    pub(crate) fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::ConfigField {
            path: self.path.clone(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(&self, what: impl Into<String>) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// The top-level object of a parsed config.
    pub(crate) fn object<'a>(&self, value: &'a Value) -> Result<&'a Map<String, Value>> {
        value
            .as_object()
            .ok_or_else(|| self.err("(top level)", "expected a JSON object"))
    }

    /// A nested object (`ssm_cfg`); `null` or absent is `None`.
    pub(crate) fn object_opt<'a>(
        &self,
        obj: &'a Map<String, Value>,
        field: &str,
    ) -> Result<Option<&'a Map<String, Value>>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(field, format!("expected an object, found {v}"))),
        }
    }

    /// A non-negative integer (a float with no fractional part is accepted, as JSON writers
    /// sometimes produce `2.0`), at most [`LIMIT`].
    pub(crate) fn as_usize(&self, v: &Value, field: &str) -> Result<usize> {
        let n = if let Some(u) = v.as_u64() {
            u
        } else if let Some(f) = v.as_f64()
            && f >= 0.0
            && f.fract() == 0.0
            && f < 1e15
        {
            f as u64
        } else {
            return Err(self.err(field, format!("expected a non-negative integer, found {v}")));
        };
        // Every size is bounded so that products of sizes cannot overflow, and a typo
        // cannot make the loader try to allocate the impossible.
        if n > LIMIT as u64 {
            return Err(self.err(field, format!("{n} is implausibly large (limit {LIMIT})")));
        }
        Ok(n as usize)
    }

    /// An optional size; `null` counts as absent.
    pub(crate) fn usize_opt(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.as_usize(v, field).map(Some),
        }
    }

    pub(crate) fn usize_req(&self, obj: &Map<String, Value>, field: &str) -> Result<usize> {
        self.usize_opt(obj, field)?
            .ok_or_else(|| self.err(field, "missing (required)"))
    }

    /// `a × b`, refused when it exceeds 64·[`LIMIT`].
    pub(crate) fn product(&self, field: &str, a: usize, b: usize) -> Result<usize> {
        a.checked_mul(b)
            .filter(|p| *p <= LIMIT * 64)
            .ok_or_else(|| self.err(field, format!("{a} × {b} is implausibly large")))
    }

    pub(crate) fn bool_opt(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    /// A number, or transformers' encoding of a non-finite float (`{"__float__": "Infinity"}`,
    /// `"-Infinity"`, `"NaN"`), or the bare strings `"inf"` / `"Infinity"` other writers use.
    pub(crate) fn as_f64(&self, v: &Value, field: &str) -> Result<f64> {
        if let Some(f) = v.as_f64() {
            return Ok(f);
        }
        let text = match v {
            Value::Object(m) if m.len() == 1 => m.get("__float__").and_then(Value::as_str),
            Value::String(s) => Some(s.as_str()),
            _ => None,
        };
        match text {
            Some("Infinity" | "inf" | "+inf" | "+Infinity") => Ok(f64::INFINITY),
            Some("-Infinity" | "-inf") => Ok(f64::NEG_INFINITY),
            _ => Err(self.err(field, format!("expected a number, found {v}"))),
        }
    }

    pub(crate) fn f64_opt(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<f64>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.as_f64(v, field).map(Some),
        }
    }

    /// A token id; `-1` (some exporters' "no such token") is absent, not an error.
    pub(crate) fn token_id(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
        if obj
            .get(field)
            .and_then(Value::as_i64)
            .is_some_and(|v| v < 0)
        {
            return Ok(None);
        }
        match self.usize_opt(obj, field)? {
            None => Ok(None),
            Some(id) => u32::try_from(id)
                .map(Some)
                .map_err(|_| self.err(field, format!("token id {id} does not fit in u32"))),
        }
    }

    /// `eos_token_id` may be one id or a list of ids.
    pub(crate) fn token_ids(&self, obj: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
        match obj.get(field) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    let id = self.as_usize(v, field)?;
                    u32::try_from(id)
                        .map_err(|_| self.err(field, format!("token id {id} does not fit in u32")))
                })
                .collect(),
            _ => Ok(self.token_id(obj, field)?.into_iter().collect()),
        }
    }

    /// mamba_ssm's `MambaLMHeadModel` options molt does not implement, refused by name: MLP
    /// blocks (`d_intermediate`), hybrid attention layers, LayerNorm blocks.
    pub(crate) fn plain_mamba_blocks(&self, obj: &Map<String, Value>) -> Result<()> {
        if let Some(d) = self.usize_opt(obj, "d_intermediate")?
            && d != 0
        {
            return Err(self.unsupported(format!(
                "d_intermediate is {d}: blocks with an MLP are not supported"
            )));
        }
        if let Some(Value::Array(a)) = obj.get("attn_layer_idx")
            && !a.is_empty()
        {
            return Err(self.unsupported(
                "attn_layer_idx is not empty: hybrid attention layers are not supported",
            ));
        }
        if self.bool_opt(obj, "rms_norm")? == Some(false) {
            return Err(self.unsupported("rms_norm is false: LayerNorm blocks are not supported"));
        }
        Ok(())
    }

    /// A state-spaces `vocab_size` rounded up to `pad_vocab_size_multiple` (default 8), the
    /// embedding's row count.
    pub(crate) fn padded_vocab(&self, obj: &Map<String, Value>) -> Result<usize> {
        let raw = self.usize_req(obj, "vocab_size")?;
        let multiple = self.usize_opt(obj, "pad_vocab_size_multiple")?.unwrap_or(8);
        if multiple > 1 {
            self.product("pad_vocab_size_multiple", raw.div_ceil(multiple), multiple)
        } else {
            Ok(raw)
        }
    }

    /// Fails naming the first of `fields` that is zero.
    pub(crate) fn positive(&self, fields: &[(&str, usize)]) -> Result<()> {
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => Err(self.err(field, "must be at least 1")),
            None => Ok(()),
        }
    }

    /// Fails unless `eps` is a positive finite number.
    pub(crate) fn epsilon(&self, field: &str, eps: f64) -> Result<()> {
        if eps.is_finite() && eps > 0.0 {
            Ok(())
        } else {
            Err(self.err(field, format!("must be a positive number, found {eps}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_infinity_and_plain_numbers() {
        let f = Fields::new(Path::new("config.json"));
        let v: Value =
            serde_json::from_str(r#"[0.0, {"__float__": "Infinity"}, "-Infinity", "x"]"#).unwrap();
        assert_eq!(f.as_f64(&v[0], "a").unwrap(), 0.0);
        assert_eq!(f.as_f64(&v[1], "a").unwrap(), f64::INFINITY);
        assert_eq!(f.as_f64(&v[2], "a").unwrap(), f64::NEG_INFINITY);
        let e = f.as_f64(&v[3], "time_step_limit").unwrap_err().to_string();
        assert!(
            e.contains("time_step_limit") && e.contains("config.json"),
            "{e}"
        );
    }
}
