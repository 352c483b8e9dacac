//! [`AdapterSpec`]: one method, or several stacked (`{"type": "hybrid", "methods": [...]}`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::error::{PeftError, PeftResult};
use super::target::ModelShape;
use super::{METHOD_TYPES, MethodConfig, ParamShape};

/// The PEFT method(s) of an adapter. JSON: a single method object (`{"type": "lora", ...}`)
/// or `{"type": "hybrid", "methods": [...]}`; each method keeps its own lr and weight decay.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub methods: Vec<MethodConfig>,
}

/// The largest learning rate or weight decay a method may ask for; larger is a typo.
const MAX_RATE: f64 = 10.0;

impl AdapterSpec {
    pub fn single(method: MethodConfig) -> Self {
        AdapterSpec {
            methods: vec![method],
        }
    }

    pub fn hybrid(methods: Vec<MethodConfig>) -> Self {
        AdapterSpec { methods }
    }

    pub fn from_json_str(text: &str) -> PeftResult<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| PeftError::config("spec", format!("not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    /// Parses a method object or a hybrid. Unknown types list the valid ones.
    pub fn from_value(v: &Value) -> PeftResult<Self> {
        let mut methods = Vec::new();
        parse_into(v, &mut methods, 0)?;
        Ok(AdapterSpec { methods })
    }

    /// The JSON form: the method object itself for one method, a hybrid otherwise.
    pub fn to_value(&self) -> Value {
        let one = |m: &MethodConfig| serde_json::to_value(m).unwrap_or(Value::Null);
        match self.methods.as_slice() {
            [m] => one(m),
            many => serde_json::json!({
                "type": "hybrid",
                "methods": many.iter().map(one).collect::<Vec<_>>(),
            }),
        }
    }

    /// A short name: the method's type, or `hybrid(lora+prompt+...)`.
    pub fn kind(&self) -> String {
        match self.methods.as_slice() {
            [m] => m.method().kind().to_string(),
            many => format!(
                "hybrid({})",
                many.iter()
                    .map(|m| m.method().kind())
                    .collect::<Vec<_>>()
                    .join("+")
            ),
        }
    }

    /// Checks every method against the model and the methods against each other.
    pub fn validate(&self, cfg: impl Into<ModelShape>) -> PeftResult<()> {
        let cfg = &cfg.into();
        if self.methods.is_empty() {
            return Err(PeftError::config(
                "hybrid",
                "`methods` is empty; list at least one method",
            ));
        }
        for m in &self.methods {
            let m = m.method();
            if let Some(lr) = m.lr()
                && !(lr.is_finite() && lr > 0.0 && lr <= MAX_RATE)
            {
                return Err(PeftError::BadValue {
                    method: m.kind().into(),
                    field: "lr".into(),
                    value: lr.to_string(),
                    valid: format!("a number in (0, {MAX_RATE}], or absent for the job's lr"),
                });
            }
            let wd = m.weight_decay();
            if !(wd.is_finite() && (0.0..=MAX_RATE).contains(&wd)) {
                return Err(PeftError::BadValue {
                    method: m.kind().into(),
                    field: "weight_decay".into(),
                    value: wd.to_string(),
                    valid: format!("a number in [0, {MAX_RATE}]"),
                });
            }
            m.validate(cfg)?;
        }
        if self.methods.len() > 1
            && let Some(full) = self
                .methods
                .iter()
                .find(|m| matches!(m, MethodConfig::Full(_)))
        {
            return Err(PeftError::Contradictory(format!(
                "`{}` trains every weight and cannot be stacked with other methods",
                full.method().kind()
            )));
        }
        let count =
            |pred: fn(&MethodConfig) -> bool| self.methods.iter().filter(|m| pred(m)).count();
        if count(|m| matches!(m, MethodConfig::Prompt(_))) > 1 {
            return Err(PeftError::Contradictory(
                "more than one `prompt` method; use one with a larger `n`".into(),
            ));
        }
        if count(|m| matches!(m, MethodConfig::Affix(_))) > 1 {
            return Err(PeftError::Contradictory(
                "more than one `affix` method; use one with a larger `n`".into(),
            ));
        }
        if count(|m| matches!(m, MethodConfig::AdditionalScan(_))) > 1 {
            return Err(PeftError::Contradictory(
                "more than one `additional_scan` method; use one with a larger `n_add`".into(),
            ));
        }
        // Two methods training the same tensor under one name would silently share it.
        let mut owner: BTreeMap<String, &str> = BTreeMap::new();
        for m in &self.methods {
            let m = m.method();
            for (name, _) in m.parameters(cfg) {
                if let Some(prev) = owner.insert(name.clone(), m.kind()) {
                    return Err(PeftError::Contradictory(format!(
                        "`{prev}` and `{}` both define the tensor `{name}`; a target can take \
                         each method once",
                        m.kind()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every trainable tensor's name and shape, without weights: the methods' and, on a
    /// classification model, its head (always trained, see `head_shapes`).
    pub fn parameter_shapes(&self, cfg: impl Into<ModelShape>) -> Vec<ParamShape> {
        let cfg = &cfg.into();
        self.methods
            .iter()
            .flat_map(|m| m.method().parameters(cfg))
            .chain(head_shapes(cfg))
            .collect()
    }

    /// The number of trainable scalars, from shapes alone.
    pub fn trainable_parameters(&self, cfg: impl Into<ModelShape>) -> usize {
        self.parameter_shapes(cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The head of a classification model, trained under every method (spec §1.4, §6.1):
/// `head.weight` `[C, D]` and `head.bias` `[C]`; none for a language model.
pub fn head_shapes(cfg: &ModelShape) -> Vec<ParamShape> {
    match cfg.vision {
        Some(v) => vec![
            ("head.weight".into(), vec![v.num_classes, cfg.hidden_size]),
            ("head.bias".into(), vec![v.num_classes]),
        ],
        None => Vec::new(),
    }
}

fn parse_into(v: &Value, out: &mut Vec<MethodConfig>, depth: usize) -> PeftResult<()> {
    let valid = || {
        let mut v: Vec<String> = METHOD_TYPES.iter().map(|s| s.to_string()).collect();
        v.push("hybrid".into());
        v
    };
    let Some(obj) = v.as_object() else {
        return Err(PeftError::config(
            "spec",
            format!(
                "expected a JSON object with a `type` (one of {}), got {v}",
                valid().join(", ")
            ),
        ));
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        return Err(PeftError::config(
            "spec",
            format!(
                "missing string field `type`; valid types: {}",
                valid().join(", ")
            ),
        ));
    };
    if kind == "hybrid" {
        if depth > 4 {
            return Err(PeftError::config("hybrid", "hybrids nested too deeply"));
        }
        if let Some(extra) = obj.keys().find(|k| *k != "type" && *k != "methods") {
            return Err(PeftError::config(
                "hybrid",
                format!("unknown field `{extra}`, expected `type` or `methods`"),
            ));
        }
        let Some(list) = obj.get("methods").and_then(Value::as_array) else {
            return Err(PeftError::config(
                "hybrid",
                "needs `methods`: a list of method objects",
            ));
        };
        if list.is_empty() {
            return Err(PeftError::config(
                "hybrid",
                "`methods` is empty; list at least one method",
            ));
        }
        for m in list {
            parse_into(m, out, depth + 1)?;
        }
        return Ok(());
    }
    if !METHOD_TYPES.contains(&kind) {
        return Err(PeftError::UnknownMethod {
            got: kind.to_string(),
            valid: valid(),
        });
    }
    let m: MethodConfig =
        serde_json::from_value(v.clone()).map_err(|e| PeftError::config(kind, e.to_string()))?;
    out.push(m);
    Ok(())
}

impl Serialize for AdapterSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for AdapterSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        AdapterSpec::from_value(&v).map_err(serde::de::Error::custom)
    }
}

/// Serde helper: a string or a list of strings.
pub(crate) fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Checks `lo <= got <= hi` for a size option.
pub(crate) fn check_range(
    method: &str,
    what: &str,
    target: &str,
    got: usize,
    lo: usize,
    hi: usize,
) -> PeftResult<()> {
    if got < lo || got > hi {
        return Err(PeftError::OutOfRange {
            method: method.into(),
            what: what.into(),
            target: target.into(),
            got,
            min: lo,
            max: hi,
        });
    }
    Ok(())
}

/// Checks a float option is finite and inside `[lo, hi]`.
pub(crate) fn check_float(
    method: &str,
    field: &str,
    v: f64,
    lo: f64,
    hi: f64,
    valid: &str,
) -> PeftResult<()> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(PeftError::BadValue {
            method: method.into(),
            field: field.into(),
            value: v.to_string(),
            valid: valid.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_hybrid_round_trip_with_defaults() -> PeftResult<()> {
        let s = AdapterSpec::from_json_str(r#"{"type": "lora_p", "slice": "X"}"#)?;
        let v = s.to_value();
        // The papers' defaults are filled in and written back.
        assert_eq!(v["r"], 64);
        assert_eq!(v["s"], 0.1);
        assert_eq!(AdapterSpec::from_value(&v)?, s);
        let h = AdapterSpec::from_json_str(
            r#"{"type": "hybrid", "methods": [
                {"type": "additional_scan"}, {"type": "prodial", "r_b": {"in_proj": 8, "out_proj": 16}},
                {"type": "affix", "kind": "inner_single_infix"}]}"#,
        )?;
        assert_eq!(h.methods.len(), 3);
        assert_eq!(h.kind(), "hybrid(additional_scan+prodial+affix)");
        let v = h.to_value();
        assert_eq!(v["type"], "hybrid");
        assert_eq!(v["methods"][0]["n_add"], 6);
        assert_eq!(v["methods"][2]["kind"], "infix");
        assert_eq!(AdapterSpec::from_value(&v)?, h);
        let back: AdapterSpec =
            serde_json::from_value(v).map_err(|e| PeftError::config("x", e.to_string()))?;
        assert_eq!(back, h);
        Ok(())
    }
}
