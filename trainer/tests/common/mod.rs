//! The fixture sets the tests walk. Every folder with an `index.json` — `tests/fixtures/`
//! itself and each folder directly below it — is one set: a *case set* when its index lists
//! `cases` (the shared set, `alt/`), a *method set* when it lists `methods` (`methods/`,
//! `methods_alt/`). A set added in the same format is walked with no code change; paths in
//! an index are relative to the folder holding it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{Value, json};
use trainer::model::MambaConfig;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every set holding `key` in its index: (folder, index), sorted by folder.
fn sets_with(key: &str) -> Vec<(PathBuf, Value)> {
    let root = fixtures();
    let mut dirs = vec![root.clone()];
    let mut below: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("index.json").is_file())
        .collect();
    below.sort();
    dirs.extend(below);
    dirs.into_iter()
        .filter(|d| d.join("index.json").is_file())
        .map(|d| {
            let index = read_json(&d.join("index.json"));
            (d, index)
        })
        .filter(|(_, index)| index.get(key).is_some())
        .collect()
}

/// The case sets (`index.json` with `cases`).
pub fn case_sets() -> Vec<(PathBuf, Value)> {
    sets_with("cases")
}

/// The method sets (`index.json` with `methods`).
pub fn method_sets() -> Vec<(PathBuf, Value)> {
    sets_with("methods")
}

/// The method sets whose base model is of `family`, at any depth below `tests/fixtures/` up to
/// two folders (`methods/`, `vim/methods/`): (folder, index, base model folder).
pub fn method_sets_of(family: trainer::model::Family) -> Vec<(PathBuf, Value, PathBuf)> {
    let root = fixtures();
    let mut dirs = Vec::new();
    let mut frontier = vec![root.clone()];
    for _ in 0..=2 {
        let mut next = Vec::new();
        for d in frontier {
            if d.join("index.json").is_file() {
                dirs.push(d.clone());
            }
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            next.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir()),
            );
        }
        frontier = next;
    }
    dirs.sort();
    dirs.into_iter()
        .filter_map(|d| {
            let index = read_json(&d.join("index.json"));
            let base = d.join(
                index
                    .get("methods")?
                    .as_array()
                    .and(index["base_model"]["dir"].as_str())?,
            );
            let found = trainer::model::family::detect_dir(&base).ok()?;
            (found == family).then_some((d, index, base))
        })
        .collect()
}

/// `dir` relative to `tests/fixtures/` (`tiny`, `alt/alt_lora`, `methods_alt`), for messages.
pub fn label(dir: &Path) -> String {
    let root = fixtures();
    match dir.strip_prefix(&root) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".to_string(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => dir.display().to_string(),
    }
}

/// One entry of a case set's index.
pub struct IndexedCase {
    /// The folder holding the index.
    pub set: PathBuf,
    /// The case's folder.
    pub dir: PathBuf,
    /// The case's path below `tests/fixtures/`, for messages.
    pub label: String,
    /// The index entry.
    pub entry: Value,
}

impl IndexedCase {
    /// A path the entry names (`model_dir`, `adapter_dir`), resolved against the set.
    pub fn path(&self, key: &str) -> PathBuf {
        let rel = self.entry[key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: index entry has no `{key}`", self.label));
        self.set.join(rel)
    }

    pub fn manifest(&self) -> Value {
        read_json(&self.dir.join("manifest.json"))
    }
}

/// The family of a case set: that of the first model folder its index names (a set holds
/// one family: the shared set and `alt/` Mamba-1, `vim/` Vim, `mamba2/` Mamba-2).
fn set_family(set: &Path, index: &Value) -> Option<trainer::model::Family> {
    index["cases"].as_array()?.iter().find_map(|c| {
        let dir = set.join(c["model_dir"].as_str()?);
        trainer::model::family::detect_dir(&dir).ok()
    })
}

/// Every case of `kind` (`base`, `adapter`, `ops`, `vim_model`, …) in every case set of
/// `family`, in index order.
pub fn indexed_cases(family: trainer::model::Family, kind: &str) -> Vec<IndexedCase> {
    let mut out = Vec::new();
    for (set, index) in case_sets() {
        if set_family(&set, &index) != Some(family) {
            continue;
        }
        for entry in index["cases"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: `cases` is not a list", set.display()))
        {
            if entry["kind"] != kind {
                continue;
            }
            let name = entry["name"].as_str().expect("case name");
            let dir = set.join(name);
            out.push(IndexedCase {
                label: label(&dir),
                set: set.clone(),
                dir,
                entry: entry.clone(),
            });
        }
    }
    assert!(
        !out.is_empty(),
        "no `{kind}` case of family {family} in any fixture index"
    );
    out
}

/// ProDiaL block counts (`r_b`) for a model with `cfg`: the most blocks (the smallest block
/// size above 1) that divide each target's input width, so any shape gets a valid spec.
pub fn prodial_blocks(cfg: &MambaConfig) -> Value {
    let blocks = |d: usize| d / (2..=d).find(|q| d.is_multiple_of(*q)).unwrap_or(1);
    json!({"in_proj": blocks(cfg.hidden_size), "out_proj": blocks(cfg.intermediate_size)})
}

#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
    pub rel_l2: Option<f64>,
}

/// Elementwise `|got − want| ≤ atol + rtol·|want|` (and the relative L2 bound when the class
/// has one). Returns (max abs diff, rel L2) for the report.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: Tol) -> (f64, f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("got values");
    let w = want
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("want values");
    let mut max_abs = 0f64;
    let mut worst: Option<(usize, f64)> = None;
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        assert!(a.is_finite(), "{what}: non-finite value {a} at {i}");
        max_abs = max_abs.max(d);
        let excess = d - (tol.atol + tol.rtol * b.abs());
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
        num += d * d;
        den += b * b;
    }
    let rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {} want {} (|diff| {:.3e} > atol {} + rtol {}·|want|); max abs diff {max_abs:.3e}",
            g[i],
            w[i],
            (g[i] - w[i]).abs(),
            tol.atol,
            tol.rtol
        );
    }
    if let Some(bound) = tol.rel_l2 {
        assert!(
            rel_l2 <= bound,
            "{what}: relative L2 error {rel_l2:.3e} > {bound}"
        );
    }
    (max_abs, rel_l2)
}

impl Tol {
    /// The tolerance class `class` of a manifest's `tolerances`.
    pub fn of(manifest: &Value, class: &str) -> Tol {
        let t = &manifest["tolerances"][class];
        Tol {
            atol: t["atol"].as_f64().unwrap_or(0.0),
            rtol: t["rtol"].as_f64().unwrap_or(0.0),
            rel_l2: t["rel_l2"].as_f64(),
        }
    }

    /// The class a manifest gives reference tensor `name`.
    pub fn for_tensor(manifest: &Value, name: &str) -> Tol {
        let class = manifest["tensors"]["reference.safetensors"][name]["tolerance"]
            .as_str()
            .unwrap_or_else(|| panic!("manifest: no tolerance class for `{name}`"));
        Tol::of(manifest, class)
    }
}
