//! Adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! - LoRA/DoRA in PEFT's α/r convention (a single `lora` with `alpha`, or a single `dora`)
//!   are written exactly as HF PEFT writes them (`base_model.model.backbone.layers.0.mixer.
//!   in_proj.lora_A.weight`, `lora_magnitude_vector`, `lora_embedding_A`; config keys
//!   `peft_type`, `r`, `lora_alpha`, `target_modules`, `use_dora`, ...), so PEFT reads them,
//!   plus a `molt` key with the base identity. PEFT's own folders load too.
//! - Everything else: molt's names (those of the reference fixtures), and a config with
//!   `peft_type` naming the method, the full spec and the base identity.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{Value, json};

use super::MethodConfig;
use super::adapter::Adapter;
use super::dora::DoraConfig;
use super::error::{PeftError, PeftResult};
use super::identity::base_identity;
use super::lora::{LoraConfig, LoraTarget};
use super::spec::AdapterSpec;
use super::target::PeftBase;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const FORMAT: &str = "molt";
const FORMAT_VERSION: u64 = 1;
const PEFT_PREFIX: &str = "base_model.model.backbone.";

/// PEFT's view of a spec, when it has one: (use_dora, r, alpha, targets, dropout, rslora).
struct PeftView {
    use_dora: bool,
    r: usize,
    alpha: f64,
    targets: Vec<LoraTarget>,
    dropout: f64,
    use_rslora: bool,
}

fn peft_view(spec: &AdapterSpec) -> Option<PeftView> {
    match spec.methods.as_slice() {
        [MethodConfig::Lora(l)] if l.alpha.is_some() => {
            let targets = l.parsed_targets().ok()?;
            let r = targets.first().map(|t| l.rank(*t))?;
            // PEFT has one rank and one dropout for all targets.
            if targets.iter().any(|t| l.rank(*t) != r) || (l.dropout.is_none() && targets.len() > 1)
            {
                return None;
            }
            Some(PeftView {
                use_dora: false,
                r,
                alpha: l.alpha?,
                dropout: l.dropout.unwrap_or(0.0),
                use_rslora: l.use_rslora,
                targets,
            })
        }
        [MethodConfig::Dora(d)] => Some(PeftView {
            use_dora: true,
            r: d.r,
            alpha: d.alpha(),
            targets: d
                .parsed_targets()
                .ok()?
                .into_iter()
                .map(LoraTarget::Proj)
                .collect(),
            dropout: 0.0,
            use_rslora: false,
        }),
        _ => None,
    }
}

fn same_peft_view(a: &AdapterSpec, b: &AdapterSpec) -> bool {
    match (peft_view(a), peft_view(b)) {
        (Some(x), Some(y)) => {
            x.use_dora == y.use_dora
                && x.r == y.r
                && x.alpha == y.alpha
                && x.targets == y.targets
                && x.use_rslora == y.use_rslora
        }
        _ => false,
    }
}

fn peft_module(t: LoraTarget) -> &'static str {
    match t {
        LoraTarget::Embedding => "embeddings",
        LoraTarget::PatchEmbed => "patch_embed",
        LoraTarget::Proj(p) => p.name(),
    }
}

/// A molt adapter tensor name → its HF PEFT key, and whether PEFT stores it transposed
/// (the embedding factors). `None` for tensors PEFT has no name for.
pub fn to_peft_name(name: &str) -> Option<(String, bool)> {
    if let Some(which) = name.strip_prefix("embeddings.lora_") {
        return Some((
            format!("{PEFT_PREFIX}embeddings.lora_embedding_{which}"),
            true,
        ));
    }
    let rest = name.strip_prefix("layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (proj, leaf) = rest.split_once('.')?;
    let leaf = match leaf {
        "lora_A" | "dora.lora_A" => "lora_A.weight",
        "lora_B" | "dora.lora_B" => "lora_B.weight",
        "dora.magnitude" => "lora_magnitude_vector",
        _ => return None,
    };
    Some((
        format!("{PEFT_PREFIX}layers.{i}.mixer.{proj}.{leaf}"),
        false,
    ))
}

/// PEFT name → (molt name, transpose?).
fn from_peft_name(name: &str, use_dora: bool) -> Option<(String, bool)> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    if let Some(which) = rest.strip_prefix("embeddings.lora_embedding_") {
        return Some((format!("embeddings.lora_{which}"), true));
    }
    let rest = rest.strip_prefix("layers.")?;
    let (i, rest) = rest.split_once(".mixer.")?;
    let (proj, leaf) = rest.split_once('.')?;
    let d = if use_dora { "dora." } else { "" };
    let leaf = match leaf {
        "lora_A.weight" => format!("{d}lora_A"),
        "lora_B.weight" => format!("{d}lora_B"),
        "lora_magnitude_vector" | "lora_magnitude_vector.weight" if use_dora => {
            "dora.magnitude".to_string()
        }
        _ => return None,
    };
    Some((format!("layers.{i}.{proj}.{leaf}"), false))
}

fn write_json(path: &Path, v: &Value) -> PeftResult<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| PeftError::file(path, e.to_string()))?;
    std::fs::write(path, text).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn save(a: &Adapter, dir: &Path) -> PeftResult<()> {
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let molt = json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_identity": a.base_identity(),
        "family": a.base_shape().family.name(),
        "base_model": a.base_shape().description,
        "spec": a.spec().to_value(),
        "trainable_parameters": a.trainable_parameters(),
    });
    let mut tensors = HashMap::new();
    let config = match peft_view(a.spec()) {
        Some(v) => {
            for (name, t) in a.named_tensors() {
                let Some((peft, transpose)) = to_peft_name(&name) else {
                    return Err(PeftError::file(
                        dir.join(WEIGHTS_FILE),
                        format!("no PEFT name for tensor `{name}`"),
                    ));
                };
                let t = if transpose { t.t()? } else { t };
                tensors.insert(peft, t.contiguous()?);
            }
            json!({
                "peft_type": "LORA",
                "task_type": null,
                "r": v.r,
                // PEFT writes an integer alpha as an integer.
                "lora_alpha": if v.alpha.fract() == 0.0 && v.alpha.abs() < 1e15 {
                    json!(v.alpha as i64)
                } else {
                    json!(v.alpha)
                },
                "lora_dropout": v.dropout,
                "target_modules": v.targets.iter().map(|t| peft_module(*t)).collect::<Vec<_>>(),
                "use_dora": v.use_dora,
                "use_rslora": v.use_rslora,
                "bias": "none",
                "fan_in_fan_out": false,
                "init_lora_weights": true,
                "inference_mode": true,
                "modules_to_save": null,
                "layers_to_transform": null,
                "layers_pattern": null,
                "rank_pattern": {},
                "alpha_pattern": {},
                "base_model_name_or_path": null,
                "revision": null,
                "molt": molt,
            })
        }
        None => {
            for (name, t) in a.named_tensors() {
                tensors.insert(name, t.contiguous()?);
            }
            let peft_type = match a.spec().methods.as_slice() {
                [MethodConfig::Lora(_)] => "MAMBAPEFT_LORA".to_string(),
                [m] => m.method().kind().to_uppercase(),
                _ => "HYBRID".to_string(),
            };
            let mut c = json!({ "peft_type": peft_type });
            if let (Value::Object(c), Value::Object(m)) = (&mut c, molt) {
                c.extend(m);
            }
            c
        }
    };
    write_json(&dir.join(CONFIG_FILE), &config)?;
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| PeftError::file(&path, e.to_string()))
}

fn check_identity(recorded: &Value, base: &impl PeftBase) -> PeftResult<()> {
    let Some(expected) = recorded.get("base_model_identity").and_then(Value::as_str) else {
        return Ok(());
    };
    let found = base_identity(base);
    if expected != found {
        return Err(PeftError::WrongBase {
            expected: expected.to_string(),
            found,
            detail: format!(
                "adapter base: {}; this model: {}",
                recorded
                    .get("base_model")
                    .and_then(Value::as_str)
                    .unwrap_or("(not recorded)"),
                base.peft_shape().description
            ),
        });
    }
    Ok(())
}

pub(crate) fn load(dir: &Path, base: &impl PeftBase) -> PeftResult<Adapter> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|source| PeftError::Io {
        path: cpath.clone(),
        source,
    })?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| PeftError::file(&cpath, format!("invalid JSON: {e}")))?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.is_file() {
        return Err(PeftError::file(&wpath, "not found (the adapter's tensors)"));
    }
    let tensors = candle_core::safetensors::load(&wpath, base.device())
        .map_err(|e| PeftError::file(&wpath, format!("cannot read safetensors: {e}")))?;
    if config.get("format").and_then(Value::as_str) == Some(FORMAT) {
        check_identity(&config, base)?;
        let spec_v = config
            .get("spec")
            .ok_or_else(|| PeftError::file(&cpath, "molt adapter config without `spec`"))?;
        let spec = AdapterSpec::from_value(spec_v)?;
        return Adapter::from_tensors(&spec, base, tensors);
    }
    match config.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {
            if let Some(m) = config.get("molt") {
                check_identity(m, base)?;
            }
            load_peft(&cpath, &config, tensors, base)
        }
        other => Err(PeftError::file(
            &cpath,
            format!(
                "unsupported adapter: peft_type {}; supported: HF PEFT \"LORA\" (LoRA and DoRA) \
                 and adapters written by molt",
                other.map_or("(missing)".to_string(), |s| format!("{s:?}"))
            ),
        )),
    }
}

fn load_peft(
    cpath: &Path,
    c: &Value,
    tensors: HashMap<String, Tensor>,
    base: &impl PeftBase,
) -> PeftResult<Adapter> {
    let bad = |field: &str, why: String| PeftError::file(cpath, format!("`{field}`: {why}"));
    let r = c
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r", "missing or not a positive integer".into()))? as usize;
    let alpha = c.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let use_dora = c.get("use_dora").and_then(Value::as_bool).unwrap_or(false);
    let use_rslora = c
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let dropout = c.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    if let Some(b) = c.get("bias").and_then(Value::as_str)
        && b != "none"
    {
        return Err(bad(
            "bias",
            format!("{b:?} is not supported; valid: \"none\""),
        ));
    }
    if c.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "fan_in_fan_out",
            "true is not supported; valid: false".into(),
        ));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if c.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(
                key,
                "per-module ranks/alphas are not supported; valid: {}".into(),
            ));
        }
    }
    for key in ["layers_to_transform", "modules_to_save"] {
        if c.get(key)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(bad(key, "not supported; valid: null".into()));
        }
    }
    let targets: Vec<String> = match c.get("target_modules") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("target_modules", "expected strings".into()))
            })
            .collect::<PeftResult<_>>()?,
        _ => return Err(bad("target_modules", "missing".into())),
    };
    // PEFT matches by module-name suffix; molt names the module itself.
    let targets: Vec<String> = targets
        .into_iter()
        .map(|t| {
            let leaf = t.rsplit('.').next().unwrap_or(&t).to_string();
            if leaf == "embeddings" {
                "embedding".to_string()
            } else {
                leaf
            }
        })
        .collect();
    let method = if use_dora {
        if use_rslora {
            return Err(bad("use_rslora", "not supported together with DoRA".into()));
        }
        MethodConfig::Dora(DoraConfig {
            targets,
            r,
            alpha: Some(alpha),
            zero_init: true,
            lr: None,
            weight_decay: 0.0,
        })
    } else {
        let mut l = LoraConfig::new(&[], r, 0.0);
        l.targets = targets;
        l.s = None;
        l.alpha = Some(alpha);
        l.use_rslora = use_rslora;
        l.dropout = Some(dropout);
        MethodConfig::Lora(l)
    };
    // A molt-written PEFT folder also records the full spec (lr, weight decay, ...): prefer
    // it when it describes the same adapter.
    let spec = match c.get("molt").and_then(|m| m.get("spec")) {
        Some(v) => match AdapterSpec::from_value(v) {
            Ok(s)
                if s.methods.len() == 1
                    && same_peft_view(&s, &AdapterSpec::single(method.clone())) =>
            {
                s
            }
            _ => AdapterSpec::single(method),
        },
        None => AdapterSpec::single(method),
    };
    let mut renamed = HashMap::new();
    let mut problems = Vec::new();
    for (name, t) in tensors {
        match from_peft_name(&name, use_dora) {
            Some((n, transpose)) => {
                let t = if transpose { t.t()?.contiguous()? } else { t };
                renamed.insert(n, t);
            }
            None => problems.push(format!("unexpected PEFT tensor `{name}`")),
        }
    }
    if !problems.is_empty() {
        return Err(PeftError::Tensors { problems });
    }
    Adapter::from_tensors(&spec, base, renamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_round_trip() {
        for (molt, dora) in [
            ("layers.3.in_proj.lora_A", false),
            ("layers.0.out_proj.lora_B", false),
            ("layers.1.x_proj.dora.magnitude", true),
            ("layers.1.x_proj.dora.lora_A", true),
            ("embeddings.lora_A", false),
        ] {
            let (peft, tr) = to_peft_name(molt).expect("has a PEFT name");
            assert!(peft.starts_with(PEFT_PREFIX), "{peft}");
            let (back, tr2) = from_peft_name(&peft, dora).expect("maps back");
            assert_eq!(back, molt);
            assert_eq!(tr, tr2);
        }
        assert_eq!(
            to_peft_name("layers.0.in_proj.lora_A")
                .map(|p| p.0)
                .as_deref(),
            Some("base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight")
        );
        assert!(to_peft_name("prompt.table").is_none());
    }
}
