//! `molt search`: MambaPEFT's two-step hybrid PEFT search (`trainer::search::hybrid`) run
//! locally on files, with no server — the same plan `POST /v1/fine_tuning/searches` drives,
//! with the same flags as `molt searches create` (this module also holds those shared flags
//! and the trial table both commands print).
//!
//! `molt search --model DIR --training-file PATH --validation-file PATH [--objective …]
//! [--methods a,b,…] [--trials STEP1,STEP2] [--max-parallel N] [--max-trainable-params N]
//! [--pruner median|JSON|@file] [--space JSON|@file] [--hyperparameters JSON|@file]
//! [--seed N] [--sampler tpe|random] [--train-best] [--out DIR] [--device cpu]` asks the plan for trials until it
//! waits, trains each proposed trial with `api::training::run_training` (the worker's entry
//! point) on up to `max_parallel` threads, records skipped proposals as skipped, and feeds
//! every outcome back — `complete` with the objective at the run's last validation,
//! `failed`, or `pruned` at its last `(step, value)` — until the plan finishes or fails. It
//! prints one table row per trial as it is recorded, keeps `OUT/search.json` up to date
//! (settings, resolved hyperparameters, every trial in the API's trial shape, the best
//! trial), and with `--train-best` trains the best method into `OUT/best/` (adapter files as
//! `molt train` writes them). Exit status 0 when the search succeeded.
//!
//! Choices:
//! - Requests are validated as the API validates them: objective, seed range,
//!   `hyperparameters` through [`api::training::Hyperparameters::from_request`] (the vision
//!   recipe as defaults for a vision model; `weight_decay` refused, step 2 tunes it), and
//!   everything else by `Plan::new`; errors name the request field (`trials.step1`,
//!   `methods[0]`, `space.lora_in_proj.r`, …). Missing files are refused up front by path, and
//!   a text dataset is checked line by line before any trial starts.
//! - Image datasets are supported: for a Vision Mamba model the training data is scanned
//!   (`trainer::train::images::scan`) for its classes, which size the head in the plan's
//!   `ModelShape` as the API does; the validation data must have the same classes; image runs
//!   validate every epoch (`validate_every_epoch`).
//! - No checkpoints: the API's default `checkpoint_every` serves reclaimed jobs, which a
//!   local run does not have, so it is 0 unless `hyperparameters.checkpoint_every` is given.
//! - Determinism: trials train concurrently, but outcomes are fed back to the plan one at a
//!   time in trial-number order (the oldest running trial first), so the same seed gives the
//!   same trials whatever the threads' timing. A slot whose trial finished out of order waits
//!   for the older ones. For the same reason the pruner judges a trial against the completed
//!   trials of its step *known when it started* (Optuna would use those known at each
//!   report); a trial the pruner stops is recorded `pruned` even if the stop came at its last
//!   validation.
//! - Each trial trains in a temporary folder under `OUT/trials/` removed when it ends; with
//!   `--train-best` the best method is trained again with the same seed and hyperparameters
//!   (as the service's `train_best` does) rather than copied from its trial.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use api::ApiError;
use api::training::{Hyperparameters, RunControl, RunEvent, RunOutcome, RunSpec, run_training};
use serde_json::{Map, Value, json};
use trainer::search::hybrid::{Next, Plan, SearchSettings, TrialBudget, TrialRecord};
use trainer::search::pruner::MedianPruner;
use trainer::search::{Direction, TrialState};

use super::client::json_arg;

// ----- the flags `molt search` and `molt searches create` share ------------------------------

/// The search's settings as flags (the body fields of `POST /v1/fine_tuning/searches`).
#[derive(clap::Args, Debug, Clone)]
pub struct SearchFlags {
    /// `validation_loss` (default, minimised) or `validation_accuracy` (maximised).
    #[arg(long)]
    pub objective: Option<String>,
    /// Candidate methods, comma-separated, e.g. `lora_in_proj,A,prompt` (default:
    /// MambaPEFT's step-1 set for the model's family).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Trials of step 1 and step 2, e.g. `8,8` (default 20,20).
    #[arg(long, value_name = "STEP1,STEP2")]
    pub trials: Option<String>,
    /// Trials trained at once (default 2).
    #[arg(long)]
    pub max_parallel: Option<u32>,
    /// Skip trials that would train more parameters than this.
    #[arg(long)]
    pub max_trainable_params: Option<u64>,
    /// `median`, or the pruner as JSON (or @file.json), e.g. '{"type": "median",
    /// "n_startup_trials": 2}'. Off when absent.
    #[arg(long)]
    pub pruner: Option<String>,
    /// Step 2's search space as JSON (or @file.json), e.g. '{"lora_in_proj": {"r": {"low":
    /// 4, "high": 8}}}'.
    #[arg(long)]
    pub space: Option<String>,
    /// The trials' shared training settings as JSON (or @file.json), e.g. '{"n_epochs": 1,
    /// "batch_size": 4}'.
    #[arg(long)]
    pub hyperparameters: Option<String>,
    /// Seeds the sampler and every trial's training (default: random).
    #[arg(long)]
    pub seed: Option<i64>,
    /// Train the best configuration into an adapter when the search succeeds.
    #[arg(long)]
    pub train_best: bool,
    /// How trials' parameters are drawn: `tpe` (default) or `random` (a baseline).
    #[arg(long)]
    pub sampler: Option<String>,
}

/// `STEP1,STEP2` as `{"step1": n, "step2": m}`.
fn trials_arg(s: &str) -> Result<Value> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [a, b] = parts.as_slice() else {
        bail!("--trials: expected STEP1,STEP2 (e.g. 8,8), got '{s}'");
    };
    let count = |x: &str, field: &str| {
        x.parse::<u32>()
            .with_context(|| format!("--trials: {field} must be a count ≥ 0, got '{x}'"))
    };
    Ok(json!({"step1": count(a, "trials.step1")?, "step2": count(b, "trials.step2")?}))
}

impl SearchFlags {
    /// The request fields these flags set (absent flags are left out: the server's
    /// defaults apply).
    pub fn request(&self) -> Result<Map<String, Value>> {
        let mut body = Map::new();
        if let Some(o) = &self.objective {
            body.insert("objective".into(), json!(o));
        }
        if let Some(m) = &self.methods {
            let names: Vec<&str> = m.iter().map(|s| s.trim()).collect();
            body.insert("methods".into(), json!(names));
        }
        if let Some(t) = &self.trials {
            body.insert("trials".into(), trials_arg(t)?);
        }
        if let Some(p) = self.max_parallel {
            body.insert("max_parallel".into(), json!(p));
        }
        if let Some(m) = self.max_trainable_params {
            body.insert("max_trainable_params".into(), json!(m));
        }
        if let Some(p) = &self.pruner {
            let v = if p.trim() == "median" {
                json!({"type": "median"})
            } else {
                json_arg(p).context("--pruner")?
            };
            body.insert("pruner".into(), v);
        }
        if let Some(s) = &self.space {
            body.insert("space".into(), json_arg(s).context("--space")?);
        }
        if let Some(h) = &self.hyperparameters {
            body.insert(
                "hyperparameters".into(),
                json_arg(h).context("--hyperparameters")?,
            );
        }
        if let Some(s) = self.seed {
            body.insert("seed".into(), json!(s));
        }
        if self.train_best {
            body.insert("train_best".into(), json!(true));
        }
        if let Some(s) = &self.sampler {
            body.insert("sampler".into(), json!(s));
        }
        Ok(body)
    }
}

// ----- the trial table ------------------------------------------------------------------------

/// `v` with two decimals, or three significant ones when small.
fn short_float(v: f64) -> String {
    if v == 0.0 || v.abs() >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

/// One method's step-2 values, e.g. `r=8 s=0.10 lr×1.00 wd×1.00`.
fn method_values(values: &Map<String, Value>) -> String {
    let order = ["r", "s", "n", "lr_mult", "wd_mult"];
    let mut keys: Vec<&String> = values.keys().collect();
    keys.sort_by_key(|k| order.iter().position(|o| o == k).unwrap_or(order.len()));
    keys.into_iter()
        .map(|k| {
            let v = &values[k];
            let shown = match v.as_i64() {
                Some(i) if v.is_i64() || v.is_u64() => i.to_string(),
                _ => v.as_f64().map(short_float).unwrap_or_else(|| v.to_string()),
            };
            match k.as_str() {
                "lr_mult" => format!("lr×{shown}"),
                "wd_mult" => format!("wd×{shown}"),
                _ => format!("{k}={shown}"),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A trial's configuration in one line: the switched-on methods with their step-2 values,
/// e.g. `lora_in_proj(r=8 s=0.10 lr×1.00 wd×1.00) + A(lr×0.52)`, and the method step 2
/// removed, if any.
pub fn configuration_summary(c: &Value) -> String {
    let methods: Vec<&str> = c["methods"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut s = if methods.is_empty() {
        "(no method)".to_string()
    } else {
        methods
            .iter()
            .map(|m| match c.get(*m).and_then(Value::as_object) {
                Some(v) if !v.is_empty() => format!("{m}({})", method_values(v)),
                _ => m.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" + ")
    };
    if let Some(r) = c["remove"].as_str()
        && r != trainer::search::hybrid::KEEP_ALL
    {
        s.push_str(&format!(" (without {r})"));
    }
    s
}

/// The table's header line.
pub fn table_header(objective: &str) -> String {
    format!(
        "{:>4}  {:>4}  {:<9}  {:>19}  {:>10}  configuration",
        "#", "step", "status", objective, "params"
    )
}

/// A trial (the API's `fine_tuning.search.trial` shape) as a table row.
pub fn table_row(t: &Value) -> String {
    let status = t["status"].as_str().unwrap_or("?");
    let value = match t["value"].as_f64() {
        Some(v) => format!("{v:.6}"),
        None => match t["intermediate_values"].as_array().and_then(|a| a.last()) {
            // A pruned (or running) trial: its last validation value and step.
            Some(p) => match p["value"].as_f64() {
                Some(v) => format!("{v:.4}@{}", p["step"]),
                None => "-".into(),
            },
            None => "-".into(),
        },
    };
    let params = t["trainable_parameters"]
        .as_i64()
        .map_or_else(|| "-".to_string(), |p| p.to_string());
    let mut config = configuration_summary(&t["configuration"]);
    if t["method"]["type"] == "linear_probe" {
        // A vision trial with no method switched on trains the head only.
        config = config.replacen("(no method)", "(head only)", 1);
    }
    let mut row = format!(
        "{:>4}  {:>4}  {:<9}  {:>19}  {:>10}  {config}",
        t["number"].to_string(),
        t["step"].to_string(),
        status,
        value,
        params,
    );
    if matches!(status, "skipped" | "failed" | "pruned")
        && let Some(m) = t["message"].as_str()
    {
        let m: String = if m.chars().count() > 100 {
            m.chars().take(99).chain(['…']).collect()
        } else {
            m.to_string()
        };
        row.push_str(&format!("  [{m}]"));
    }
    row
}

/// `h:mm:ss`.
pub fn hms(s: f64) -> String {
    let s = if s.is_finite() { s.max(0.0) as u64 } else { 0 };
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `molt searches watch`'s screen for a search object and its trials: a header line
/// (status, step, counts, best so far and, with `eta`, the ETA) and the trial table.
pub fn watch_screen(search: &Value, trials: &[Value], eta: bool) -> String {
    let objective = search["objective"].as_str().unwrap_or("objective");
    let c = &search["trial_counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let planned = search["trials"]["step1"].as_u64().unwrap_or(0)
        + search["trials"]["step2"].as_u64().unwrap_or(0);
    let mut parts = vec![
        format!("search {}", search["id"].as_str().unwrap_or("?")),
        search["status"].as_str().unwrap_or("?").to_string(),
        format!("step {}", search["step"]),
        format!(
            "trials {}/{planned}: {} running, {} complete, {} pruned, {} skipped, {} failed{}",
            n("finished"),
            n("running"),
            n("complete"),
            n("pruned"),
            n("skipped"),
            n("failed"),
            if n("cancelled") > 0 {
                format!(", {} cancelled", n("cancelled"))
            } else {
                String::new()
            }
        ),
    ];
    let best = &search["best"];
    match best["value"].as_f64() {
        Some(v) => parts.push(format!("best {objective} {v:.6} (trial {})", best["trial"])),
        None => parts.push("best -".into()),
    }
    if eta && let Some(finish) = search["estimated_finish"].as_i64() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(finish);
        parts.push(format!("ETA {}", hms((finish - now) as f64)));
    }
    let mut out = parts.join(" · ");
    out.push('\n');
    out.push_str(&table_header(objective));
    out.push('\n');
    for t in trials {
        out.push_str(&table_row(t));
        out.push('\n');
    }
    out
}

// ----- molt search ----------------------------------------------------------------------------

/// `molt search`.
#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// Base model folder (config.json, weights; tokenizer.json for a language model).
    #[arg(long, env = "MOLT_MODEL")]
    pub model: PathBuf,
    /// Training data: JSONL for a language model; an image dataset (class folders, a zip /
    /// tar / tar.gz of them, or image JSONL) for a Vision Mamba.
    #[arg(long)]
    pub training_file: PathBuf,
    /// Validation data in the same format: the objective is measured on it.
    #[arg(long)]
    pub validation_file: PathBuf,
    #[command(flatten)]
    pub search: SearchFlags,
    /// Where `search.json`, the trials' scratch folders and (with --train-best) the `best/`
    /// adapter go.
    #[arg(long, default_value = "molt-search")]
    pub out: PathBuf,
    /// Device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "MOLT_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// An API validation error as a CLI error naming the field.
fn field_error(e: ApiError) -> anyhow::Error {
    match e.param {
        Some(p) if !e.message.starts_with(&p) => anyhow!("{p}: {}", e.message),
        _ => anyhow!("{}", e.message),
    }
}

fn plan_error(field: &str, message: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{field}: {message}")
}

/// What the files say: examples per epoch, and a vision model's classes.
struct Data {
    examples: u64,
    classes: Option<Vec<String>>,
}

fn must_exist(flag: &str, p: &Path) -> Result<()> {
    if !p.exists() {
        bail!("{flag} {}: no such file or folder", p.display());
    }
    Ok(())
}

/// Checks the data before any trial trains: every line of a text dataset, the classes of an
/// image dataset (the validation data's must be the training data's).
fn check_data(args: &SearchArgs, vision: bool) -> Result<Data> {
    if vision {
        use trainer::train::images;
        let scratch = images::Scratch::new()?;
        let train = images::scan(&args.training_file, &scratch.sub("training")?)
            .with_context(|| format!("--training-file {}", args.training_file.display()))?;
        let valid = images::scan(&args.validation_file, &scratch.sub("validation")?)
            .with_context(|| format!("--validation-file {}", args.validation_file.display()))?;
        if valid.classes != train.classes {
            bail!(
                "--validation-file {} has the classes [{}] but --training-file {} has [{}]; \
                 both must have the same class list",
                args.validation_file.display(),
                valid.classes.join(", "),
                args.training_file.display(),
                train.classes.join(", ")
            );
        }
        return Ok(Data {
            examples: train.train.len() as u64,
            classes: Some(train.classes),
        });
    }
    let mut examples = 0;
    for (flag, path) in [
        ("--training-file", &args.training_file),
        ("--validation-file", &args.validation_file),
    ] {
        if path.is_dir() {
            bail!(
                "{flag} {} is a folder; a language model trains on a JSONL file",
                path.display()
            );
        }
        match trainer::train::validate_dataset(path, None) {
            Ok(summary) if flag == "--training-file" => examples = summary.examples as u64,
            Ok(_) => {}
            Err(errors) => {
                let shown: Vec<String> = errors.iter().take(10).map(|e| e.to_string()).collect();
                bail!("{flag}: invalid data: {}", shown.join("; "));
            }
        }
    }
    Ok(Data {
        examples,
        classes: None,
    })
}

/// The search, resolved and checked as `POST /v1/fine_tuning/searches` checks it.
struct Setup {
    plan: Plan,
    objective: String,
    seed: u64,
    hyperparameters: Hyperparameters,
    train_best: bool,
}

fn setup(args: &SearchArgs) -> Result<Setup> {
    must_exist("--model", &args.model)?;
    let config_path = args.model.join("config.json");
    if !config_path.is_file() {
        bail!(
            "--model {}: no config.json in this folder (a model folder has config.json and \
             its weights)",
            args.model.display()
        );
    }
    must_exist("--training-file", &args.training_file)?;
    must_exist("--validation-file", &args.validation_file)?;
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let family = trainer::model::detect(&config, &config_path)?;
    let vision = family.task() == trainer::model::Task::ImageClassification;

    let req = args.search.request()?;
    let field = |e: api::search::FieldError| anyhow!("{}: {}", e.field, e.message);
    let objective = api::search::parse_objective(req.get("objective").and_then(Value::as_str))
        .map_err(field)?;
    let seed = match args.search.seed {
        Some(s) if (0..=i64::from(i32::MAX)).contains(&s) => s as u64,
        Some(s) => bail!("seed: must be between 0 and {}, got {s}", i32::MAX),
        None => u64::from(rand::random::<u32>() & 0x7fff_ffff),
    };
    let trials: TrialBudget = match req.get("trials") {
        None => TrialBudget::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| plan_error("trials", e))?,
    };
    let pruner = api::search::parse_pruner(req.get("pruner")).map_err(field)?;
    let space: BTreeMap<String, Value> = match req.get("space") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| plan_error("space", format!("must be an object by method: {e}")))?,
    };
    let hp_req = req.get("hyperparameters");
    api::search::check_search_hyperparameters(hp_req).map_err(field)?;
    let user_checkpoints = hp_req.is_some_and(|h| h.get("checkpoint_every").is_some());
    // Bad hyperparameters are reported before the data is read, as the API does.
    Hyperparameters::from_request(hp_req, 0, &Default::default()).map_err(field_error)?;

    let data = check_data(args, vision)?;
    let defaults = if vision {
        trainer::train::Hyperparameters::vision_recipe()
    } else {
        trainer::train::Hyperparameters::default()
    };
    let mut hp =
        Hyperparameters::from_request(hp_req, data.examples, &defaults).map_err(field_error)?;
    if vision {
        hp.train.validate_every_epoch(data.examples as usize);
    }
    if !user_checkpoints {
        hp.train.checkpoint_every = 0;
    }
    let settings = SearchSettings {
        methods: args
            .search
            .methods
            .as_ref()
            .map(|m| m.iter().map(|s| s.trim().to_string()).collect()),
        space,
        trials,
        max_parallel: args
            .search
            .max_parallel
            .unwrap_or(SearchSettings::default().max_parallel),
        max_trainable_params: args.search.max_trainable_params,
        pruner,
        seed,
        ..SearchSettings::default()
    };
    // Through serde, so that the flag is checked as the request field is.
    let settings = match req.get("sampler") {
        None => settings,
        Some(s) => {
            let mut v = serde_json::to_value(&settings)?;
            v["sampler"] = s.clone();
            serde_json::from_value(v).map_err(|e| plan_error("sampler", e))?
        }
    };
    let shape = api::search::model_shape(&config, data.classes.as_ref().map(|c| c.len() as i64))
        .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let plan = Plan::new(
        settings,
        api::search::direction(&objective),
        shape,
        hp.train.learning_rate,
    )
    .map_err(|e| anyhow!("{e}"))?;
    Ok(Setup {
        plan,
        objective,
        seed,
        hyperparameters: hp,
        train_best: args.search.train_best,
    })
}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    Complete(f64),
    Pruned { step: u64, value: f64 },
    Failed(String),
}

/// A finished trial's report from its thread.
struct Done {
    number: u64,
    ending: Ending,
    /// The objective at each validation.
    series: Vec<(u64, f64)>,
    seconds: f64,
}

/// A trial as `search.json` keeps it.
struct TrialInfo {
    number: u64,
    step: u8,
    status: &'static str,
    configuration: Value,
    method: Option<Value>,
    trainable_parameters: u64,
    value: Option<f64>,
    intermediate: Vec<(u64, f64)>,
    pruned_step: Option<u64>,
    message: Option<String>,
    seconds: Option<f64>,
}

impl TrialInfo {
    /// The API's trial shape (`fine_tuning.search.trial`), plus `seconds`.
    fn to_value(&self) -> Value {
        json!({
            "number": self.number,
            "step": self.step,
            "status": self.status,
            "configuration": self.configuration,
            "method": self.method,
            "trainable_parameters": self.trainable_parameters,
            "value": self.value,
            "intermediate_values": self.intermediate.iter()
                .map(|(s, v)| json!({"step": s, "value": v}))
                .collect::<Vec<_>>(),
            "pruned_step": self.pruned_step,
            "message": self.message,
            "seconds": self.seconds,
        })
    }
}

/// The objective's value in a validation event.
fn objective_of(objective: &str, loss: f64, accuracy: Option<f64>) -> Option<f64> {
    if objective == "validation_accuracy" {
        accuracy
    } else {
        Some(loss)
    }
}

/// Trains one trial (on the calling thread); the pruner, if any, judges each validation
/// value against `peers` (the series of the step's completed trials).
fn run_trial(
    spec: &RunSpec,
    objective: &str,
    direction: Direction,
    pruner: Option<&MedianPruner>,
    peers: &[Vec<(u64, f64)>],
) -> (Ending, Vec<(u64, f64)>) {
    let mut series: Vec<(u64, f64)> = Vec::new();
    let mut pruned: Option<(u64, f64)> = None;
    let result = {
        let mut observe = |ev: RunEvent| -> RunControl {
            let RunEvent::Validation {
                step,
                loss,
                accuracy,
                ..
            } = ev
            else {
                return RunControl::Continue;
            };
            let Some(v) = objective_of(objective, loss, accuracy) else {
                return RunControl::Continue;
            };
            let step = u64::try_from(step).unwrap_or(0);
            series.push((step, v));
            if pruned.is_none()
                && let Some(p) = pruner
                && p.should_prune(direction, &series, peers)
            {
                pruned = Some((step, v));
            }
            if pruned.is_some() {
                RunControl::Stop
            } else {
                RunControl::Continue
            }
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_training(spec, &mut observe)
        }))
    };
    let ending = match (result, pruned) {
        (Err(_), _) => Ending::Failed("the training run panicked".into()),
        (Ok(Err(e)), _) => Ending::Failed(e.to_string()),
        (Ok(Ok(_)), Some((step, value))) => Ending::Pruned { step, value },
        (Ok(Ok(RunOutcome::Finished { .. })), None) => match series.last() {
            Some(&(_, v)) if v.is_finite() => Ending::Complete(v),
            _ => Ending::Failed(format!(
                "the run measured no finite {objective} on the validation file"
            )),
        },
        (Ok(Ok(RunOutcome::Stopped)), None) => Ending::Failed("the run stopped early".into()),
    };
    (ending, series)
}

/// Writes `value` to `path` through a temporary file (never a half-written file).
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The best trial in the API's `best` shape.
fn best_value(plan: &Plan, records: &[TrialRecord], trials: &BTreeMap<u64, TrialInfo>) -> Value {
    let Some((best, value)) = plan.best(records) else {
        return Value::Null;
    };
    let Some(t) = trials.get(&best.number) else {
        return Value::Null;
    };
    json!({
        "trial": t.number,
        "step": t.step,
        "value": value,
        "configuration": t.configuration,
        "method": t.method,
        "trainable_params": t.trainable_parameters,
    })
}

/// The state `search.json` shows.
struct Report<'a> {
    args: &'a SearchArgs,
    setup: &'a Setup,
    status: &'static str,
    error: Option<String>,
    adapter: Option<PathBuf>,
}

impl Report<'_> {
    fn value(&self, records: &[TrialRecord], trials: &BTreeMap<u64, TrialInfo>) -> Value {
        let plan = &self.setup.plan;
        let mut settings = plan.settings().clone();
        settings.methods = Some(plan.candidates().iter().map(|c| c.name.clone()).collect());
        let mut counts: BTreeMap<&str, u64> =
            ["running", "complete", "pruned", "skipped", "failed"]
                .into_iter()
                .map(|k| (k, 0))
                .collect();
        for t in trials.values() {
            *counts.entry(t.status).or_default() += 1;
        }
        json!({
            "object": "molt.search",
            "status": self.status,
            "error": self.error,
            "model": self.args.model,
            "training_file": self.args.training_file,
            "validation_file": self.args.validation_file,
            "objective": self.setup.objective,
            "direction": match plan.direction() {
                Direction::Minimize => "minimize",
                Direction::Maximize => "maximize",
            },
            "seed": self.setup.seed,
            "settings": settings,
            "hyperparameters": self.setup.hyperparameters.to_value(),
            "trial_counts": counts,
            "chosen": plan.chosen(records),
            "best": best_value(plan, records, trials),
            "adapter": self.adapter,
            "trials": trials.values().map(TrialInfo::to_value).collect::<Vec<_>>(),
        })
    }
}

/// `molt search`: see the module doc.
pub fn search(args: SearchArgs) -> Result<()> {
    let setup = setup(&args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let scratch = args.out.join("trials");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let plan = &setup.plan;
    let settings = plan.settings();
    let json_path = args.out.join("search.json");
    println!(
        "searching {} candidates ({}) for the best {} ({}): {} + {} trials, up to {} at once, \
         seed {}",
        plan.candidates().len(),
        plan.candidates()
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        setup.objective,
        match plan.direction() {
            Direction::Minimize => "lowest",
            Direction::Maximize => "highest",
        },
        settings.trials.step1,
        settings.trials.step2,
        settings.max_parallel,
        setup.seed
    );
    println!("{}", table_header(&setup.objective));

    let mut report = Report {
        args: &args,
        setup: &setup,
        status: "running",
        error: None,
        adapter: None,
    };
    let mut records: Vec<TrialRecord> = Vec::new();
    let mut trials: BTreeMap<u64, TrialInfo> = BTreeMap::new();
    // Validation series of each step's completed trials (the pruner's peers).
    let mut completed: BTreeMap<u8, Vec<Vec<(u64, f64)>>> = BTreeMap::new();
    let mut running: BTreeSet<u64> = BTreeSet::new();
    let mut arrived: BTreeMap<u64, Done> = BTreeMap::new();
    let mut step = 1u8;
    let started = Instant::now();
    let hyperparameters = setup.hyperparameters.to_value();

    let outcome: Result<()> = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Done>();
        loop {
            // Ask until the plan waits.
            let end = loop {
                match plan.next(&records) {
                    Next::Run(p) | Next::Skip(p, _) if p.step == 2 && step == 1 => {
                        step = 2;
                        println!(
                            "step 1 finished; step 2 tunes the best combination: {}",
                            plan.chosen(&records).unwrap_or_default().join(", ")
                        );
                    }
                    Next::Run(p) => {
                        let method = p.spec.as_ref().map(|s| s.to_value());
                        let Some(method_value) = method.clone() else {
                            bail!("trial {} has no method to train", p.number);
                        };
                        records.push(TrialRecord {
                            number: p.number,
                            step: p.step,
                            params: p.params.clone(),
                            state: TrialState::Running,
                        });
                        trials.insert(
                            p.number,
                            TrialInfo {
                                number: p.number,
                                step: p.step,
                                status: "running",
                                configuration: p.configuration.clone(),
                                method,
                                trainable_parameters: p.trainable_params,
                                value: None,
                                intermediate: Vec::new(),
                                pruned_step: None,
                                message: None,
                                seconds: None,
                            },
                        );
                        running.insert(p.number);
                        let dir = tempfile::Builder::new()
                            .prefix(&format!("trial-{}-", p.number))
                            .tempdir_in(&scratch)
                            .with_context(|| {
                                format!("creating a folder in {}", scratch.display())
                            })?;
                        let spec = RunSpec {
                            model_dir: args.model.clone(),
                            training_file: args.training_file.clone(),
                            validation_file: Some(args.validation_file.clone()),
                            method: method_value,
                            hyperparameters: hyperparameters.clone(),
                            seed: setup.seed,
                            checkpoint_dir: dir.path().join("checkpoint"),
                            resume: false,
                            output_dir: dir.path().join("adapter"),
                            device: args.device.clone(),
                        };
                        let peers = completed.get(&p.step).cloned().unwrap_or_default();
                        let tx = tx.clone();
                        let number = p.number;
                        let objective = setup.objective.as_str();
                        let direction = plan.direction();
                        let pruner = plan.pruner();
                        scope.spawn(move || {
                            let t0 = Instant::now();
                            let (ending, series) =
                                run_trial(&spec, objective, direction, pruner, &peers);
                            drop(dir);
                            let _ = tx.send(Done {
                                number,
                                ending,
                                series,
                                seconds: t0.elapsed().as_secs_f64(),
                            });
                        });
                    }
                    Next::Skip(p, why) => {
                        records.push(TrialRecord {
                            number: p.number,
                            step: p.step,
                            params: p.params.clone(),
                            state: TrialState::Pruned(None),
                        });
                        let info = TrialInfo {
                            number: p.number,
                            step: p.step,
                            status: "skipped",
                            configuration: p.configuration.clone(),
                            method: p.spec.as_ref().map(|s| s.to_value()),
                            trainable_parameters: p.trainable_params,
                            value: None,
                            intermediate: Vec::new(),
                            pruned_step: None,
                            message: Some(why),
                            seconds: None,
                        };
                        println!("{}", table_row(&info.to_value()));
                        trials.insert(p.number, info);
                        write_json(&json_path, &report.value(&records, &trials))?;
                    }
                    Next::Wait => break None,
                    Next::Finished => break Some(Ok(())),
                    Next::Failed(message) => break Some(Err(message)),
                }
            };
            match end {
                Some(Ok(())) => {
                    report.status = "succeeded";
                    return Ok(());
                }
                Some(Err(message)) => {
                    report.status = "failed";
                    report.error = Some(message);
                    return Ok(());
                }
                None => {}
            }
            // Feed back the oldest running trial's outcome (see the module doc).
            let Some(&oldest) = running.first() else {
                bail!("the plan waits but no trial is running");
            };
            while !arrived.contains_key(&oldest) {
                let done = rx
                    .recv()
                    .context("a trial's thread ended without reporting")?;
                arrived.insert(done.number, done);
            }
            let Some(done) = arrived.remove(&oldest) else {
                continue;
            };
            running.remove(&oldest);
            let state = match &done.ending {
                Ending::Complete(v) => TrialState::Complete(*v),
                Ending::Pruned { step, value } => TrialState::Pruned(Some((*step, *value))),
                Ending::Failed(_) => TrialState::Failed,
            };
            if let Some(r) = records.iter_mut().find(|r| r.number == oldest) {
                r.state = state;
            }
            if let Some(t) = trials.get_mut(&oldest) {
                t.seconds = Some(done.seconds);
                match &done.ending {
                    Ending::Complete(v) => {
                        t.status = "complete";
                        t.value = Some(*v);
                        completed
                            .entry(t.step)
                            .or_default()
                            .push(done.series.clone());
                    }
                    Ending::Pruned { step, value } => {
                        t.status = "pruned";
                        t.pruned_step = Some(*step);
                        t.message = Some(format!(
                            "pruned at step {step}: {} {value:.6} is worse than the median of \
                             the step's completed trials",
                            setup.objective
                        ));
                    }
                    Ending::Failed(m) => {
                        t.status = "failed";
                        t.message = Some(m.clone());
                    }
                }
                t.intermediate = done.series;
                println!("{}", table_row(&t.to_value()));
            }
            write_json(&json_path, &report.value(&records, &trials))?;
        }
    });
    if let Err(e) = outcome {
        report.status = "failed";
        report.error = Some(format!("{e:#}"));
        write_json(&json_path, &report.value(&records, &trials))?;
        return Err(e);
    }
    let best = best_value(plan, &records, &trials);
    let _ = std::fs::remove_dir(&scratch);
    if report.status != "succeeded" {
        write_json(&json_path, &report.value(&records, &trials))?;
        bail!(
            "the search failed: {} (see {})",
            report.error.as_deref().unwrap_or("?"),
            json_path.display()
        );
    }
    println!(
        "search succeeded in {}: best {} {} (trial {}, step {}): {}",
        hms(started.elapsed().as_secs_f64()),
        setup.objective,
        best["value"]
            .as_f64()
            .map_or_else(|| "-".into(), |v| format!("{v:.6}")),
        best["trial"],
        best["step"],
        configuration_summary(&best["configuration"])
    );
    if setup.train_best {
        write_json(&json_path, &report.value(&records, &trials))?;
        let dir = train_best(&args, &setup, &best)?;
        report.adapter = Some(dir);
    }
    write_json(&json_path, &report.value(&records, &trials))?;
    println!("wrote {}", json_path.display());
    Ok(())
}

/// Trains the best trial's method into `OUT/best` (same hyperparameters and seed).
fn train_best(args: &SearchArgs, setup: &Setup, best: &Value) -> Result<PathBuf> {
    let method = best
        .get("method")
        .filter(|m| !m.is_null())
        .cloned()
        .context("the search has no best trial to train")?;
    let out = args.out.join("best");
    let checkpoints = tempfile::Builder::new()
        .prefix("best-checkpoint-")
        .tempdir_in(&args.out)
        .with_context(|| format!("creating a folder in {}", args.out.display()))?;
    println!(
        "training the best configuration (trial {}) into {}",
        best["trial"],
        out.display()
    );
    let spec = RunSpec {
        model_dir: args.model.clone(),
        training_file: args.training_file.clone(),
        validation_file: Some(args.validation_file.clone()),
        method,
        hyperparameters: setup.hyperparameters.to_value(),
        seed: setup.seed,
        checkpoint_dir: checkpoints.path().to_path_buf(),
        resume: false,
        output_dir: out.clone(),
        device: args.device.clone(),
    };
    let mut last: Option<f64> = None;
    let outcome = run_training(&spec, &mut |ev| {
        if let RunEvent::Validation { loss, accuracy, .. } = ev {
            last = objective_of(&setup.objective, loss, accuracy);
        }
        RunControl::Continue
    })
    .map_err(|e| anyhow!("training the best configuration: {e}"))?;
    if outcome == RunOutcome::Stopped {
        bail!("training the best configuration stopped early");
    }
    println!(
        "adapter written to {}{}",
        out.display(),
        last.map(|v| format!(" ({} {v:.6})", setup.objective))
            .unwrap_or_default()
    );
    Ok(out)
}
