//! MambaPEFT's hybrid PEFT search (paper §3.4, Algorithm 1, Table 9; spec §7) as a plan the
//! service's orchestration, or `molt search` on local files, drives.
//!
//! - **Step 1** chooses which methods to switch on: one boolean per *candidate* (a method
//!   with fixed, small hyperparameters: spec §7.2's code column).
//! - **Step 2** tunes the best step-1 combination C: each method's structural
//!   hyperparameters (rank `r`, scale `s`, tokens `n`), a learning-rate multiplier on the
//!   job's learning rate and a weight-decay multiplier on [`BASE_WEIGHT_DECAY`] (spec §7.3),
//!   plus one categorical `remove` (drop one method of C, or `none`). Its first trial is
//!   step 1's best with its defaults (Algorithm 1; the authors' driver enqueues it).
//!
//! [`Plan::next`] is a pure function of the trials so far: given the same seed and the same
//! completion order it proposes the same trials, so a restarted orchestrator continues where
//! it stopped. Each step is its own TPE study (own trials, own seed), as in the paper.
//!
//! Choices where the paper and code are silent: a trial with no method switched on trains
//! only the head on a vision model (linear probing) and is *skipped* on a language model (it
//! would train nothing); a trial over `max_trainable_params` is skipped too. The sampler sees
//! skipped trials as pruned before reporting anything, i.e. worse than every finished one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::pruner::MedianPruner;
use super::{Direction, Param, TpeSampler, Trial, TrialState};
use crate::peft::{AdapterSpec, ModelShape};

/// The weight decay step 2's `wd_mult` scales (spec §7.2: AdamW wd 1e-4 for both steps).
pub const BASE_WEIGHT_DECAY: f64 = 1e-4;
/// The most trials one step may ask for.
pub const MAX_TRIALS_PER_STEP: u32 = 1000;
/// The most trials a search may run at once.
pub const MAX_PARALLEL: u32 = 64;
/// Step 2's `remove` choice that keeps every method.
pub const KEEP_ALL: &str = "none";

/// What step 2 varies for a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Partial tuning: lr and weight decay only.
    Partial,
    /// A low-rank term: `r`, `s`, lr, weight decay.
    LowRank { r_max: i64 },
    /// Learned tokens or state dimensions: `n`, lr, weight decay.
    Tokens,
}

/// A candidate method of the search: a name, its step-1 configuration and what step 2 tunes.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    kind: Kind,
    /// The step-1 method object (spec §7.2), after `space.<name>.fixed`.
    pub step1: Value,
    /// Step-1 learning rate as a multiple of the job's (LoRA(x_proj): 0.1).
    lr_scale: f64,
    /// Step 2's domains, by hyperparameter (`r`, `s`, `n`, `lr_mult`, `wd_mult`).
    pub step2: BTreeMap<String, Param>,
    /// Whether MambaPEFT's step-1 set holds it (the default candidate set).
    default_on: bool,
}

/// Why a search cannot be planned: the request field at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PlanError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError {
        field: field.into(),
        message: message.into(),
    }
}

/// The search's settings, as a request gives them (every field but `base_lr` optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// Candidate names; `None`: MambaPEFT's step-1 set for the model's family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// `{"<candidate>": {"r" | "s" | "n" | "lr_mult" | "wd_mult": {"low", "high", "step"?,
    /// "log"?}, "fixed": {<step-1 method fields>}}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub space: BTreeMap<String, Value>,
    #[serde(default)]
    pub trials: TrialBudget,
    #[serde(default = "default_parallel")]
    pub max_parallel: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_trainable_params: Option<u64>,
    /// Off by default, as in Optuna.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruner: Option<MedianPruner>,
    #[serde(default)]
    pub seed: u64,
    /// `tpe` (the default, as the authors ran it) or `random` (a baseline).
    #[serde(default)]
    pub sampler: Sampler,
}

/// How trials' parameters are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Optuna's univariate TPE with its defaults.
    #[default]
    Tpe,
    /// Uniform draws (Optuna's `RandomSampler`).
    Random,
}

fn default_parallel() -> u32 {
    2
}

/// Trials per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialBudget {
    pub step1: u32,
    pub step2: u32,
}

impl Default for TrialBudget {
    /// A fifth of the paper's 100 + 100: a service's default has to finish on a CPU.
    fn default() -> Self {
        TrialBudget {
            step1: 20,
            step2: 20,
        }
    }
}

impl Default for SearchSettings {
    fn default() -> Self {
        SearchSettings {
            methods: None,
            space: BTreeMap::new(),
            trials: TrialBudget::default(),
            max_parallel: default_parallel(),
            max_trainable_params: None,
            pruner: None,
            seed: 0,
            sampler: Sampler::Tpe,
        }
    }
}

/// A trial as the plan sees it: its number (0-based, over both steps, in ask order), step,
/// parameters (Optuna's internal representation: a boolean or categorical as its index) and
/// state.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRecord {
    pub number: u64,
    pub step: u8,
    pub params: BTreeMap<String, f64>,
    pub state: TrialState,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Train this trial.
    Run(Proposal),
    /// Record this trial as skipped (not trained), for the reason given.
    Skip(Proposal, String),
    /// `max_parallel` trials are running, or the step's last trials are: wait for one.
    Wait,
    /// Every trial has finished.
    Finished,
    /// The search cannot go on (every step-1 trial failed).
    Failed(String),
}

/// A trial to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub number: u64,
    pub step: u8,
    pub params: BTreeMap<String, f64>,
    /// The parameters in readable form (booleans, method names, numbers).
    pub configuration: Value,
    /// The trial's method: a hybrid of the switched-on candidates (`None` when empty).
    pub spec: Option<AdapterSpec>,
    pub trainable_params: u64,
}

/// The planned search over one model.
#[derive(Debug, Clone)]
pub struct Plan {
    settings: SearchSettings,
    direction: Direction,
    shape: ModelShape,
    /// The job's learning rate (step 2's `lr_mult` scales it).
    base_lr: f64,
    candidates: Vec<Candidate>,
}

/// Every candidate molt knows for a model of `shape`, in MambaPEFT's order, before
/// validation (a candidate the family lacks fails [`AdapterSpec::validate`]).
fn catalogue(shape: &ModelShape) -> Vec<Candidate> {
    let vision = shape.vision.is_some();
    let ssd = shape.ssd.is_some();
    let bidirectional = shape.directions.len() > 1;
    let partial = |name: &str, target: &str, wd: Option<f64>, on: bool| {
        let mut m = json!({"type": "partial", "target": target});
        if let Some(w) = wd {
            m["weight_decay"] = json!(w);
        }
        (name.to_string(), Kind::Partial, m, 1.0, on)
    };
    let low_rank = |name: &str, m: Value, r_max: i64, lr_scale: f64, on: bool| {
        (name.to_string(), Kind::LowRank { r_max }, m, lr_scale, on)
    };
    let lora = |targets: &str, r: usize, s: f64| {
        json!({"type": "lora", "targets": [targets], "r": r, "s": s,
               "weight_decay": BASE_WEIGHT_DECAY})
    };
    let lora_p = |slice: &str, r: usize| {
        json!({"type": "lora_p", "slice": slice, "r": r, "s": 0.1,
               "weight_decay": BASE_WEIGHT_DECAY})
    };
    let tokens = |name: &str, m: Value| (name.to_string(), Kind::Tokens, m, 1.0, true);
    let rows = vec![
        partial("cls_token", "cls_token", None, vision),
        // v1 in the authors' code: the bias itself, counted as a bias, so no decay.
        partial(
            "bias",
            if ssd { "dt_bias" } else { "dt_proj.bias" },
            Some(0.0),
            true,
        ),
        // No custom key in the code: the base decay.
        partial("pos_embed", "pos_embed", Some(BASE_WEIGHT_DECAY), vision),
        partial("D", "D", None, true),
        partial("A", "A_log", None, true),
        partial("conv1d", "conv1d.weight", None, true),
        partial("norm", "norm.weight", None, ssd),
        tokens(
            "prompt",
            json!({"type": "prompt", "n": 1, "kind": "prefix", "projection": true,
                   "weight_decay": BASE_WEIGHT_DECAY}),
        ),
        tokens(
            "affix",
            json!({"type": "affix", "n": 1, "kind": "prefix", "projection": true,
                   "per_direction": bidirectional, "weight_decay": BASE_WEIGHT_DECAY}),
        ),
        tokens(
            "additional_scan",
            json!({"type": "additional_scan", "n_add": 1, "placement": "top", "a_init": "copy",
                   "weight_decay": BASE_WEIGHT_DECAY}),
        ),
        // In the paper's Table 9, absent from the code's space: a candidate on request only.
        low_rank(
            "parallel_adapter",
            json!({"type": "parallel_adapter", "r": 8, "s": 0.1,
                   "weight_decay": BASE_WEIGHT_DECAY}),
            16,
            1.0,
            false,
        ),
        low_rank(
            "lora_embedding",
            lora(if vision { "patch_embed" } else { "embedding" }, 8, 1.0),
            16,
            1.0,
            true,
        ),
        low_rank("lora_x_proj", lora("x_proj", 4, 0.1), 16, 0.1, true),
        low_rank("lora_dt_proj", lora("dt_proj", 4, 0.1), 12, 1.0, true),
        low_rank("lora_out_proj", lora("out_proj", 8, 0.1), 16, 1.0, true),
        low_rank("lora_in_proj", lora("in_proj", 8, 0.1), 16, 1.0, true),
        low_rank("lora_p_dt", lora_p("dt", 4), 12, 1.0, true),
        low_rank("lora_p_B", lora_p("B", 4), 12, 1.0, true),
        low_rank("lora_p_C", lora_p("C", 4), 12, 1.0, true),
        low_rank("lora_p_X", lora_p("X", 8), 16, 1.0, true),
        low_rank("lora_p_Z", lora_p("Z", 8), 16, 1.0, true),
    ];
    rows.into_iter()
        .map(|(name, kind, step1, lr_scale, default_on)| Candidate {
            name,
            kind,
            step1,
            lr_scale,
            step2: BTreeMap::new(),
            default_on,
        })
        .collect()
}

/// Names of every candidate, for error messages.
pub fn candidate_names(shape: &ModelShape) -> Vec<String> {
    catalogue(shape).into_iter().map(|c| c.name).collect()
}

fn log_float(low: f64, high: f64) -> Param {
    Param::Float {
        low,
        high,
        log: true,
        step: None,
    }
}

impl Candidate {
    fn method(&self) -> Result<AdapterSpec, String> {
        AdapterSpec::from_value(&self.step1).map_err(|e| e.to_string())
    }

    /// The step-1 weight decay of the method (its own default when the config is silent).
    fn step1_weight_decay(&self) -> f64 {
        self.method()
            .ok()
            .and_then(|s| s.methods.first().map(|m| m.method().weight_decay()))
            .unwrap_or(0.0)
    }

    fn field_usize(&self, key: &str) -> Option<i64> {
        self.step1.get(key).and_then(Value::as_i64)
    }

    /// Step 2's default domains (spec §7.3).
    fn default_step2(&self) -> BTreeMap<String, Param> {
        let mut out = BTreeMap::new();
        match self.kind {
            Kind::Partial => {}
            Kind::LowRank { r_max } => {
                out.insert(
                    "r".into(),
                    Param::Int {
                        low: 4,
                        high: r_max,
                        log: false,
                        step: 4,
                    },
                );
                out.insert("s".into(), log_float(0.01, 1.0));
            }
            Kind::Tokens => {
                out.insert(
                    "n".into(),
                    Param::Int {
                        low: 1,
                        high: 3,
                        log: false,
                        step: 1,
                    },
                );
            }
        }
        out.insert(
            "lr_mult".into(),
            log_float(0.1 * self.lr_scale, 5.0 * self.lr_scale),
        );
        if self.step1_weight_decay() > 0.0 {
            let high = if self.kind == Kind::Partial {
                100.0
            } else {
                10.0
            };
            out.insert("wd_mult".into(), log_float(0.1, high));
        }
        out
    }

    /// The step-1 configuration in step 2's terms (Algorithm 1's first step-2 trial).
    fn step2_defaults(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for key in self.step2.keys() {
            let v = match key.as_str() {
                "r" => self.field_usize("r").unwrap_or(8) as f64,
                "s" => self.step1.get("s").and_then(Value::as_f64).unwrap_or(0.1),
                "n" => self
                    .field_usize("n")
                    .or_else(|| self.field_usize("n_add"))
                    .unwrap_or(1) as f64,
                "lr_mult" => self.lr_scale,
                "wd_mult" => self.step1_weight_decay() / BASE_WEIGHT_DECAY,
                _ => continue,
            };
            out.insert(key.clone(), v);
        }
        out
    }

    /// The method with step 2's values `values` (keys of [`Candidate::step2`]) applied.
    fn configured(&self, values: &BTreeMap<String, f64>, base_lr: f64) -> Value {
        let mut m = self.step1.clone();
        for (key, v) in values {
            match key.as_str() {
                "r" => m["r"] = json!(*v as i64),
                "s" => m["s"] = json!(v),
                "n" if m.get("n_add").is_some() => m["n_add"] = json!(*v as i64),
                "n" => m["n"] = json!(*v as i64),
                "lr_mult" => m["lr"] = json!(base_lr * v),
                "wd_mult" => m["weight_decay"] = json!(BASE_WEIGHT_DECAY * v),
                _ => {}
            }
        }
        if !values.contains_key("lr_mult") && self.lr_scale != 1.0 {
            m["lr"] = json!(base_lr * self.lr_scale);
        }
        m
    }
}

/// Parses one `space.<candidate>.<key>` override into a domain of the same kind.
fn override_param(field: &str, default: &Param, v: &Value) -> Result<Param, PlanError> {
    let obj = v
        .as_object()
        .ok_or_else(|| err(field, "must be an object with `low` and `high`"))?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "low" | "high" | "step" | "log") {
            return Err(err(
                field,
                format!("unknown key `{k}`; use low, high, step, log"),
            ));
        }
    }
    let num = |k: &str| -> Result<Option<f64>, PlanError> {
        match obj.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| err(format!("{field}.{k}"), format!("must be a number, got {x}"))),
        }
    };
    let log = match obj.get("log") {
        None => None,
        Some(x) => Some(
            x.as_bool()
                .ok_or_else(|| err(format!("{field}.log"), "must be true or false"))?,
        ),
    };
    let p = match default {
        Param::Float {
            low,
            high,
            log: dlog,
            ..
        } => Param::Float {
            low: num("low")?.unwrap_or(*low),
            high: num("high")?.unwrap_or(*high),
            log: log.unwrap_or(*dlog),
            step: num("step")?,
        },
        Param::Int {
            low,
            high,
            log: dlog,
            step,
        } => {
            let int = |k: &str, d: i64| -> Result<i64, PlanError> {
                match num(k)? {
                    None => Ok(d),
                    Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => Ok(x as i64),
                    Some(x) => Err(err(
                        format!("{field}.{k}"),
                        format!("must be an integer, got {x}"),
                    )),
                }
            };
            Param::Int {
                low: int("low", *low)?,
                high: int("high", *high)?,
                log: log.unwrap_or(*dlog),
                step: int("step", *step)?,
            }
        }
        Param::Categorical { .. } => return Err(err(field, "cannot be overridden")),
    };
    p.validate().map_err(|e| err(field, e.0))?;
    Ok(p)
}

/// The bounds a structural override may not leave (sizes a user controls are bounded).
fn check_structural(field: &str, key: &str, p: &Param) -> Result<(), PlanError> {
    let (lo, hi) = match (key, p) {
        ("r", Param::Int { low, high, .. }) => ((1, 1024), (*low, *high)),
        ("n", Param::Int { low, high, .. }) => ((1, 256), (*low, *high)),
        _ => return Ok(()),
    };
    if hi.0 < lo.0 || hi.1 > lo.1 {
        return Err(err(
            field,
            format!("must lie in [{}, {}], got [{}, {}]", lo.0, lo.1, hi.0, hi.1),
        ));
    }
    Ok(())
}

impl Plan {
    /// Resolves the candidates (defaults or `settings.methods`), applies `space`, and checks
    /// every candidate's step-1 method against the model and its step-1 values against its
    /// step-2 domains. `shape` must already carry a vision model's class count.
    pub fn new(
        settings: SearchSettings,
        direction: Direction,
        shape: ModelShape,
        base_lr: f64,
    ) -> Result<Plan, PlanError> {
        let t = settings.trials;
        if !(1..=MAX_TRIALS_PER_STEP).contains(&t.step1) {
            return Err(err(
                "trials.step1",
                format!("must be in 1..={MAX_TRIALS_PER_STEP}, got {}", t.step1),
            ));
        }
        if t.step2 > MAX_TRIALS_PER_STEP {
            return Err(err(
                "trials.step2",
                format!("must be in 0..={MAX_TRIALS_PER_STEP}, got {}", t.step2),
            ));
        }
        if !(1..=MAX_PARALLEL).contains(&settings.max_parallel) {
            return Err(err(
                "max_parallel",
                format!(
                    "must be in 1..={MAX_PARALLEL}, got {}",
                    settings.max_parallel
                ),
            ));
        }
        if settings.max_trainable_params == Some(0) {
            return Err(err("max_trainable_params", "must be at least 1"));
        }
        if let Some(p) = &settings.pruner {
            p.validate().map_err(|e| err("pruner", e.0))?;
        }
        if !(base_lr.is_finite() && base_lr > 0.0) {
            return Err(err(
                "hyperparameters.learning_rate",
                format!("must be > 0, got {base_lr}"),
            ));
        }
        let all = catalogue(&shape);
        let known = || {
            all.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for name in settings.space.keys() {
            if !all.iter().any(|c| &c.name == name) {
                return Err(err(
                    format!("space.{name}"),
                    format!("unknown method; known: {}", known()),
                ));
            }
        }
        let mut candidates = Vec::new();
        match &settings.methods {
            Some(names) => {
                if names.is_empty() {
                    return Err(err("methods", "list at least one method"));
                }
                for (i, name) in names.iter().enumerate() {
                    let c = all.iter().find(|c| &c.name == name).ok_or_else(|| {
                        err(
                            format!("methods[{i}]"),
                            format!("unknown method `{name}`; known: {}", known()),
                        )
                    })?;
                    if candidates.iter().any(|x: &Candidate| &x.name == name) {
                        return Err(err(format!("methods[{i}]"), format!("`{name}` repeated")));
                    }
                    let c = Self::resolve(c.clone(), &settings, &shape, &format!("methods[{i}]"))?;
                    candidates.push(c);
                }
            }
            None => {
                for c in all.iter().filter(|c| c.default_on) {
                    // The family's step-1 set: what its model has sites for.
                    if c.method()
                        .and_then(|s| s.validate(shape.clone()).map_err(|e| e.to_string()))
                        .is_ok()
                    {
                        let c = Self::resolve(c.clone(), &settings, &shape, "methods")?;
                        candidates.push(c);
                    }
                }
                if candidates.is_empty() {
                    return Err(err(
                        "methods",
                        "no method of the search applies to this model",
                    ));
                }
            }
        }
        for (name, v) in &settings.space {
            if !candidates.iter().any(|c| &c.name == name) {
                return Err(err(
                    format!("space.{name}"),
                    format!("`{name}` is not among the search's methods"),
                ));
            }
            let c = candidates
                .iter_mut()
                .find(|c| &c.name == name)
                .ok_or_else(|| err(format!("space.{name}"), "unknown method"))?;
            let obj = v
                .as_object()
                .ok_or_else(|| err(format!("space.{name}"), "must be an object"))?;
            for (key, dv) in obj {
                if key == "fixed" {
                    continue;
                }
                let field = format!("space.{name}.{key}");
                let default = c.step2.get(key).ok_or_else(|| {
                    err(
                        &field,
                        format!(
                            "`{name}` has no step-2 hyperparameter `{key}`; it has: {}",
                            c.step2.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?;
                let p = override_param(&field, default, dv)?;
                check_structural(&field, key, &p)?;
                c.step2.insert(key.clone(), p);
            }
            for (key, value) in c.step2_defaults() {
                if let Some(p) = c.step2.get(&key)
                    && !p.contains(value)
                {
                    return Err(err(
                        format!("space.{name}.{key}"),
                        format!(
                            "must contain the step-1 value {value} (step 2's first trial \
                             starts from step 1's configuration)"
                        ),
                    ));
                }
            }
        }
        Ok(Plan {
            settings,
            direction,
            shape,
            base_lr,
            candidates,
        })
    }

    /// Applies `space.<name>.fixed` and checks the step-1 method against the model.
    fn resolve(
        mut c: Candidate,
        settings: &SearchSettings,
        shape: &ModelShape,
        field: &str,
    ) -> Result<Candidate, PlanError> {
        let fixed_field = format!("space.{}.fixed", c.name);
        if let Some(fixed) = settings.space.get(&c.name).and_then(|v| v.get("fixed")) {
            let Some(obj) = fixed.as_object() else {
                return Err(err(fixed_field, "must be an object of method fields"));
            };
            for (k, v) in obj {
                if k == "type" {
                    return Err(err(fixed_field, "cannot change the method's `type`"));
                }
                c.step1[k] = v.clone();
            }
        }
        let at = if settings
            .space
            .get(&c.name)
            .and_then(|v| v.get("fixed"))
            .is_some()
        {
            fixed_field
        } else {
            field.to_string()
        };
        let spec = c.method().map_err(|m| err(&at, m))?;
        spec.validate(shape.clone()).map_err(|e| {
            err(
                &at,
                format!("`{}` does not apply to this model: {e}", c.name),
            )
        })?;
        c.step2 = c.default_step2();
        // Re-serialise so the stored step-1 method has every default filled in.
        c.step1 = spec.to_value();
        Ok(c)
    }

    pub fn settings(&self) -> &SearchSettings {
        &self.settings
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The pruner, when the search prunes.
    pub fn pruner(&self) -> Option<&MedianPruner> {
        self.settings.pruner.as_ref()
    }

    /// The total number of trials (both steps).
    pub fn total_trials(&self) -> u64 {
        u64::from(self.settings.trials.step1) + u64::from(self.settings.trials.step2)
    }

    /// The best finished trial of either step (`None` before one completes).
    pub fn best<'a>(&self, trials: &'a [TrialRecord]) -> Option<(&'a TrialRecord, f64)> {
        let mut best: Option<(&TrialRecord, f64)> = None;
        for t in trials {
            let TrialState::Complete(v) = t.state else {
                continue;
            };
            if v.is_nan() {
                continue;
            }
            let better = match best {
                None => true,
                Some((_, b)) => match self.direction {
                    Direction::Minimize => v < b,
                    Direction::Maximize => v > b,
                },
            };
            if better {
                best = Some((t, v));
            }
        }
        best
    }

    /// Step 1's best combination (names of the switched-on candidates).
    pub fn chosen(&self, trials: &[TrialRecord]) -> Option<Vec<String>> {
        let step1: Vec<TrialRecord> = trials.iter().filter(|t| t.step == 1).cloned().collect();
        let (best, _) = self.best(&step1)?;
        Some(self.switched_on(&best.params))
    }

    fn switched_on(&self, params: &BTreeMap<String, f64>) -> Vec<String> {
        self.candidates
            .iter()
            .filter(|c| params.get(&c.name).copied() == Some(1.0))
            .map(|c| c.name.clone())
            .collect()
    }

    /// Step 1's domains: one boolean (`[false, true]`) per candidate.
    pub fn step1_space(&self) -> Vec<(String, Param)> {
        self.candidates
            .iter()
            .map(|c| (c.name.clone(), Param::Categorical { n: 2 }))
            .collect()
    }

    /// Step 2's domains for the combination `chosen`: `<method>.<hyperparameter>` and
    /// `remove` (`none`, then each method of `chosen`).
    pub fn step2_space(&self, chosen: &[String]) -> Vec<(String, Param)> {
        let mut out = Vec::new();
        for c in self.candidates.iter().filter(|c| chosen.contains(&c.name)) {
            for (k, p) in &c.step2 {
                out.push((format!("{}.{k}", c.name), p.clone()));
            }
        }
        out.push((
            "remove".into(),
            Param::Categorical {
                n: chosen.len() + 1,
            },
        ));
        out
    }

    /// What to do given every trial so far (any order; numbers are unique).
    pub fn next(&self, trials: &[TrialRecord]) -> Next {
        let t = self.settings.trials;
        let running = trials
            .iter()
            .filter(|x| x.state == TrialState::Running)
            .count();
        let number = trials.iter().map(|x| x.number + 1).max().unwrap_or(0);
        let in_step = |s: u8| trials.iter().filter(move |x| x.step == s);
        let asked1 = in_step(1).count() as u64;
        if asked1 < u64::from(t.step1) {
            if running >= self.settings.max_parallel as usize {
                return Next::Wait;
            }
            return self.propose_step1(number, trials);
        }
        if in_step(1).any(|x| x.state == TrialState::Running) {
            return Next::Wait;
        }
        let Some(chosen) = self.chosen(trials) else {
            return Next::Failed(format!(
                "none of the {} step-1 trials finished (each failed or was skipped); see the \
                 trials' jobs for why",
                t.step1
            ));
        };
        let asked2 = in_step(2).count() as u64;
        if asked2 < u64::from(t.step2) {
            if running >= self.settings.max_parallel as usize {
                return Next::Wait;
            }
            return self.propose_step2(number, asked2, &chosen, trials);
        }
        if running > 0 {
            return Next::Wait;
        }
        Next::Finished
    }

    /// The sampler's view of one step: its trials renumbered from 0 in ask order.
    fn study(trials: &[TrialRecord], step: u8) -> Vec<Trial> {
        let mut mine: Vec<&TrialRecord> = trials.iter().filter(|t| t.step == step).collect();
        mine.sort_by_key(|t| t.number);
        mine.into_iter()
            .enumerate()
            .map(|(i, t)| Trial {
                number: i as u64,
                params: t.params.clone(),
                state: t.state.clone(),
            })
            .collect()
    }

    fn sample(
        &self,
        step: u8,
        trials: &[TrialRecord],
        space: &[(String, Param)],
    ) -> BTreeMap<String, f64> {
        let study = Self::study(trials, step);
        let sampler = TpeSampler::new(
            self.settings.seed.wrapping_add(u64::from(step) - 1),
            self.direction,
        );
        let local = study.len() as u64;
        space
            .iter()
            .map(|(name, p)| {
                let v = match self.settings.sampler {
                    Sampler::Tpe => sampler.suggest(&study, local, name, p),
                    Sampler::Random => sampler.random(local, name, p),
                };
                (name.clone(), v)
            })
            .collect()
    }

    fn propose_step1(&self, number: u64, trials: &[TrialRecord]) -> Next {
        let params = self.sample(1, trials, &self.step1_space());
        let on = self.switched_on(&params);
        let methods: Vec<(&Candidate, BTreeMap<String, f64>)> = self
            .candidates
            .iter()
            .filter(|c| on.contains(&c.name))
            .map(|c| (c, BTreeMap::new()))
            .collect();
        let configuration = json!({
            "methods": on,
        });
        self.proposal(number, 1, params, configuration, &methods)
    }

    fn propose_step2(
        &self,
        number: u64,
        asked: u64,
        chosen: &[String],
        trials: &[TrialRecord],
    ) -> Next {
        let space = self.step2_space(chosen);
        let params = if asked == 0 {
            // Algorithm 1: the first step-2 trial is step 1's best with its defaults.
            let mut p: BTreeMap<String, f64> = BTreeMap::new();
            for c in self.candidates.iter().filter(|c| chosen.contains(&c.name)) {
                for (k, v) in c.step2_defaults() {
                    p.insert(format!("{}.{k}", c.name), v);
                }
            }
            p.insert("remove".into(), 0.0);
            p
        } else {
            self.sample(2, trials, &space)
        };
        let removed = match params.get("remove") {
            Some(&i) if i >= 1.0 => chosen.get(i as usize - 1).cloned(),
            _ => None,
        };
        let mut methods = Vec::new();
        let mut readable = serde_json::Map::new();
        for c in self.candidates.iter().filter(|c| chosen.contains(&c.name)) {
            let values: BTreeMap<String, f64> = c
                .step2
                .keys()
                .filter_map(|k| {
                    params
                        .get(&format!("{}.{k}", c.name))
                        .map(|v| (k.clone(), *v))
                })
                .collect();
            let shown: serde_json::Map<String, Value> = values
                .iter()
                .map(|(k, v)| {
                    let int = matches!(c.step2.get(k), Some(Param::Int { .. }));
                    (k.clone(), if int { json!(*v as i64) } else { json!(v) })
                })
                .collect();
            readable.insert(c.name.clone(), Value::Object(shown));
            if removed.as_deref() != Some(c.name.as_str()) {
                methods.push((c, values));
            }
        }
        let on: Vec<&str> = methods.iter().map(|(c, _)| c.name.as_str()).collect();
        readable.insert("methods".into(), json!(on));
        readable.insert(
            "remove".into(),
            json!(removed.as_deref().unwrap_or(KEEP_ALL)),
        );
        self.proposal(number, 2, params, Value::Object(readable), &methods)
    }

    fn proposal(
        &self,
        number: u64,
        step: u8,
        params: BTreeMap<String, f64>,
        configuration: Value,
        methods: &[(&Candidate, BTreeMap<String, f64>)],
    ) -> Next {
        let spec = if methods.is_empty() {
            self.shape
                .vision
                .and_then(|_| AdapterSpec::from_value(&json!({"type": "linear_probe"})).ok())
        } else {
            let objs: Vec<Value> = methods
                .iter()
                .map(|(c, v)| c.configured(v, self.base_lr))
                .collect();
            let v = if objs.len() == 1 {
                objs.into_iter().next().unwrap_or(Value::Null)
            } else {
                json!({"type": "hybrid", "methods": objs})
            };
            AdapterSpec::from_value(&v).ok()
        };
        let trainable = spec
            .as_ref()
            .map_or(0, |s| s.trainable_parameters(self.shape.clone()) as u64);
        let skip = match &spec {
            None if methods.is_empty() => Some("no method is switched on".to_string()),
            None => Some("the combination is not a valid method".to_string()),
            Some(s) => match s.validate(self.shape.clone()) {
                Err(e) => Some(format!("the combination is not valid for this model: {e}")),
                Ok(()) => match self.settings.max_trainable_params {
                    Some(max) if trainable > max => Some(format!(
                        "{trainable} trainable parameters exceed max_trainable_params {max}"
                    )),
                    _ => None,
                },
            },
        };
        let p = Proposal {
            number,
            step,
            params,
            configuration,
            spec,
            trainable_params: trainable,
        };
        match skip {
            Some(reason) => Next::Skip(p, reason),
            None => Next::Run(p),
        }
    }
}
