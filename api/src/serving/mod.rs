//! Serving what molt trains: one shared copy of each base model's weights (loaded on first
//! use), tenants' adapters hot-swapped on top of it ([`cache`]), and a continuous-batching
//! scheduler per base model ([`scheduler`]). The HTTP side is `routes::completions` and
//! `routes::scores`; this module knows nothing of HTTP or tenants.

pub mod cache;
pub mod scheduler;
pub mod vision;

use std::collections::HashMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use storage::BlobStore;
use tokio::sync::OnceCell;
use trainer::model::{AnyLm, LoadOptions};
use trainer::peft::{Adapter, InitialState, MergeOptions, PeftError};
use trainer::tokenizer::Tokenizer;

pub use cache::{AdapterCache, Evicted, LoadedAdapter};
pub use scheduler::{Scheduler, SeqEvent, SeqParams, SeqRequest};

use crate::registry;

/// Serving limits and places.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// Local scratch space: downloaded base models and adapters.
    pub cache_dir: PathBuf,
    /// Budget of the hot-swap adapter cache, in bytes of adapter tensors.
    pub adapter_cache_bytes: u64,
    /// Sequences decoded together per base model.
    pub max_batch: usize,
    /// Sequences that may wait per base model; beyond it requests get 429.
    pub max_queue: usize,
    /// Longest accepted prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest accepted `max_tokens`.
    pub max_new_tokens: usize,
    /// How language models keep their matrices (`--dtype`).
    pub weights: WeightDtype,
}

/// How a served language model keeps its matrices: `f32` as in the checkpoint, or `bf16`
/// (half the memory and half the bytes each decode step reads; activations, states and
/// sums stay f32, see `trainer::model::CausalLm::store_weights_as`). Merges are computed
/// from the f32 checkpoint either way; image models stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
}

impl WeightDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::Bf16 => candle_core::DType::BF16,
        }
    }

    /// A language model loaded from `dir` for inference, its matrices kept as asked.
    pub fn load_lm(self, dir: &Path) -> trainer::Result<AnyLm> {
        AnyLm::load(dir, &LoadOptions::default())?.store_weights_as(self.dtype())
    }
}

/// The flag's spelling (`f32`, `bf16`), for messages.
impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dtype().as_str())
    }
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            cache_dir: std::env::temp_dir().join("molt-serving"),
            adapter_cache_bytes: 1 << 30,
            max_batch: 32,
            max_queue: 256,
            max_prompt_tokens: 4096,
            max_new_tokens: 2048,
            weights: WeightDtype::F32,
        }
    }
}

/// Why a model could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("{0}")]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error("loading failed: {0}")]
    Load(String),
    /// The adapter has no merged form (or not the one asked for).
    #[error("{0}")]
    Unmergeable(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub adapter_hits: AtomicU64,
    pub adapter_misses: AtomicU64,
    pub adapter_loads: AtomicU64,
    pub adapter_evictions: AtomicU64,
    pub adapter_resident_bytes: AtomicU64,
    pub adapters_resident: AtomicU64,
    pub rejected: AtomicU64,
    pub sequences_running: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Sum over decode steps of the sequences in the step (÷ steps = mean batch size).
    pub decode_rows: AtomicU64,
    /// Sum over decode steps of the sub-batches (model passes) in the step.
    pub decode_groups: AtomicU64,
    /// Batched prefills (first chunks of several prompts in one pass), and their prompts.
    pub prefill_batches: AtomicU64,
    pub prefill_batched_rows: AtomicU64,
    /// Images classified, and the forward passes that ran them.
    pub classification_images: AtomicU64,
    pub classification_batches: AtomicU64,
}

impl Stats {
    /// Appends the serving metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 17] = [
            (
                "molt_adapter_cache_hits_total",
                "counter",
                "Requests that found their adapter resident.",
                g(&self.adapter_hits),
            ),
            (
                "molt_adapter_cache_misses_total",
                "counter",
                "Requests that had to wait for their adapter to load.",
                g(&self.adapter_misses),
            ),
            (
                "molt_adapter_loads_total",
                "counter",
                "Adapters loaded from the object store.",
                g(&self.adapter_loads),
            ),
            (
                "molt_adapter_evictions_total",
                "counter",
                "Adapters evicted from the cache.",
                g(&self.adapter_evictions),
            ),
            (
                "molt_adapter_resident_bytes",
                "gauge",
                "Bytes of adapter tensors resident in the cache.",
                g(&self.adapter_resident_bytes),
            ),
            (
                "molt_adapters_resident",
                "gauge",
                "Adapters resident in the cache.",
                g(&self.adapters_resident),
            ),
            (
                "molt_serving_rejected_total",
                "counter",
                "Sequences refused with 429 (admission queue full).",
                g(&self.rejected),
            ),
            (
                "molt_serving_sequences_running",
                "gauge",
                "Sequences in the decode batches.",
                g(&self.sequences_running),
            ),
            (
                "molt_serving_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                g(&self.prompt_tokens),
            ),
            (
                "molt_serving_generated_tokens_total",
                "counter",
                "Tokens generated.",
                g(&self.generated_tokens),
            ),
            (
                "molt_serving_decode_steps_total",
                "counter",
                "Scheduler steps (one token for every running sequence).",
                g(&self.decode_steps),
            ),
            (
                "molt_serving_decode_rows_total",
                "counter",
                "Sequences summed over scheduler steps (÷ steps: mean batch size).",
                g(&self.decode_rows),
            ),
            (
                "molt_serving_decode_groups_total",
                "counter",
                "Sub-batches (one model pass each) summed over scheduler steps; the base and \
                 its LoRA-family adapters share one.",
                g(&self.decode_groups),
            ),
            (
                "molt_serving_prefill_batches_total",
                "counter",
                "Prefill passes that ran the first chunks of several prompts together.",
                g(&self.prefill_batches),
            ),
            (
                "molt_serving_prefill_batched_rows_total",
                "counter",
                "Prompts prefilled in those batched passes.",
                g(&self.prefill_batched_rows),
            ),
            (
                "molt_classification_images_total",
                "counter",
                "Images classified.",
                g(&self.classification_images),
            ),
            (
                "molt_classification_batches_total",
                "counter",
                "Classifier forward passes (÷ into images: mean batch size).",
                g(&self.classification_batches),
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

/// A base model in memory, with its tokenizer and scheduler.
pub struct LoadedBase {
    pub id: String,
    /// The local model folder it was loaded from.
    pub dir: PathBuf,
    pub model: Arc<AnyLm>,
    pub tokenizer: Arc<Tokenizer>,
    pub scheduler: Scheduler,
}

impl LoadedBase {
    /// End-of-sequence ids and the padding id, from the model's config.
    pub fn special_tokens(&self) -> (Vec<u32>, u32) {
        let m = &self.model;
        let (eos, pad) = trainer::train::special_tokens(m.eos_token_ids(), m.pad_token_id());
        let mut all = m.eos_token_ids().to_vec();
        if all.is_empty() {
            all.extend(eos);
        }
        (all, pad)
    }
}

/// The model a request runs on.
#[derive(Clone)]
pub struct ServedModel {
    /// Groups sequences of the same model in a batch (base id, adapter id, merged id).
    pub key: String,
    pub model: Arc<AnyLm>,
    /// A merged prefix prompt/affix: the state every sequence starts from.
    pub initial_state: Option<Arc<InitialState>>,
    /// Keeps a hot-swapped adapter resident while the request runs.
    pub pin: Option<Arc<LoadedAdapter>>,
    /// The base whose decode batch this model's sequences share: set for the base itself
    /// and for adapters that only add projection terms (see `LoadedAdapter::shared_base`).
    pub shared_base: Option<Arc<AnyLm>>,
}

impl ServedModel {
    /// Whether this model's prompts may be prefilled in chunks and, from a zero state, in
    /// left-padded batches: no inserted prompt/affix tokens and no initial state.
    pub fn plain_prefill(&self) -> bool {
        self.shared_base.is_some()
            || (self.initial_state.is_none() && !self.model.inserts_positions())
    }

    /// Prompts that may be prefilled in one batch share this key.
    fn batch_key(&self) -> &str {
        match self.shared_base {
            Some(_) => scheduler::SHARED,
            None => &self.key,
        }
    }

    pub fn base(b: &LoadedBase) -> Self {
        ServedModel {
            key: b.id.clone(),
            model: b.model.clone(),
            initial_state: None,
            pin: None,
            shared_base: Some(b.model.clone()),
        }
    }

    pub fn adapter(a: Arc<LoadedAdapter>) -> Self {
        ServedModel {
            key: a.id.clone(),
            model: a.model.clone(),
            initial_state: a.initial_state.clone(),
            shared_base: a.shared_base.clone(),
            pin: Some(a),
        }
    }
}

type Cell<T> = Arc<OnceCell<Arc<T>>>;

/// The serving engine, shared by every handler.
pub struct Engine {
    pub config: ServingConfig,
    pub stats: Arc<Stats>,
    pub adapters: AdapterCache,
    bases: Mutex<HashMap<String, Cell<LoadedBase>>>,
    vision_bases: Mutex<HashMap<String, Cell<vision::VisionBase>>>,
}

impl Engine {
    pub fn new(config: ServingConfig) -> Self {
        let stats = Arc::new(Stats::default());
        Engine {
            adapters: AdapterCache::new(config.adapter_cache_bytes, stats.clone()),
            stats,
            config,
            bases: Mutex::new(HashMap::new()),
            vision_bases: Mutex::new(HashMap::new()),
        }
    }

    fn cell<T>(map: &Mutex<HashMap<String, Cell<T>>>, key: &str) -> Cell<T> {
        let mut g = match map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.entry(key.to_string()).or_default().clone()
    }

    /// The base model, loaded (and its scheduler started) on first use.
    pub async fn base(
        &self,
        model: &storage::BaseModel,
        blobs: &BlobStore,
    ) -> Result<Arc<LoadedBase>, ServingError> {
        // Keyed by config hash too: a model re-registered under the same id with other
        // weights is loaded afresh.
        let cell = Self::cell(&self.bases, &format!("{}@{}", model.id, model.config_hash));
        let loaded = cell
            .get_or_try_init(|| async {
                let dir = registry::materialize(model, blobs, &self.config.cache_dir).await?;
                let id = model.id.clone();
                let from = dir.clone();
                let weights = self.config.weights;
                let (m, tok) = blocking(move || load_base(&from, weights)).await?;
                let scheduler = Scheduler::start(
                    &id,
                    self.config.max_batch,
                    self.config.max_queue,
                    self.stats.clone(),
                );
                tracing::info!(model = %id, "base model loaded for serving");
                Ok::<_, ServingError>(Arc::new(LoadedBase {
                    id,
                    dir,
                    model: Arc::new(m),
                    tokenizer: Arc::new(tok),
                    scheduler,
                }))
            })
            .await?;
        Ok(loaded.clone())
    }

    /// A tenant's adapter on `base`, from the cache or loaded from the object store.
    pub async fn adapter(
        &self,
        base: &Arc<LoadedBase>,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
    ) -> Result<Arc<LoadedAdapter>, ServingError> {
        let id = adapter.id.clone();
        let base = base.clone();
        self.cached_adapter(adapter, blobs, move |dir| {
            let a = Adapter::load(dir, base.model.as_ref())
                .map_err(|e| ServingError::Load(format!("adapter {id}: {e}")))?;
            LoadedAdapter::new(&id, a, &base.model)
        })
        .await
    }

    /// An adapter of any task, from the cache, or downloaded into a private folder and built
    /// by `load` (off the async workers) on a miss.
    pub(crate) async fn cached_adapter<T: cache::Cached + Send + 'static>(
        &self,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
        load: impl FnOnce(&Path) -> Result<T, ServingError> + Send + 'static,
    ) -> Result<Arc<T>, ServingError> {
        let dir = self.config.cache_dir.join("adapters").join(format!(
            "{}.{}",
            adapter.id,
            uuid::Uuid::new_v4().simple()
        ));
        let prefix = adapter.object_prefix.trim_end_matches('/').to_string();
        self.adapters
            .get_or_load(&adapter.id, || async move {
                blobs.download_dir(&prefix, &dir).await?;
                blocking(move || {
                    let res = load(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                    res
                })
                .await
            })
            .await
    }

    /// Merges `adapter`: downloads it, lets `build(adapter_dir, out_dir)` write the merged
    /// model folder (off the async workers), stores that folder in the blob store (replacing
    /// an earlier merge) and returns its files.
    pub(crate) async fn store_merge(
        &self,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
        build: impl FnOnce(&Path, &Path) -> Result<(), ServingError> + Send + 'static,
    ) -> Result<Vec<(String, u64)>, ServingError> {
        let work = self.config.cache_dir.join("merge").join(format!(
            "{}.{}",
            adapter.id,
            uuid::Uuid::new_v4().simple()
        ));
        let res = async {
            let adir = work.join("adapter");
            let out = work.join("merged");
            blobs
                .download_dir(adapter.object_prefix.trim_end_matches('/'), &adir)
                .await?;
            let o = out.clone();
            blocking(move || build(&adir, &o)).await?;
            let prefix = merged_blob_prefix(&adapter.id);
            blobs.delete_prefix(&prefix).await?;
            blobs.upload_dir(&out, &prefix).await?;
            Ok::<_, ServingError>(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        res?;
        // A request still running on the old merge keeps its copy; new ones load this one.
        self.adapters
            .forget(&format!("{MERGED_PREFIX}{}", adapter.id));
        merged_files(blobs, &adapter.id).await
    }

    /// The merged model of `adapter`, from the cache or downloaded and built by
    /// `load(cache key, folder)` (`Ok(None)` when it has not been merged).
    pub(crate) async fn cached_merge<T: cache::Cached + Send + 'static>(
        &self,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
        load: impl FnOnce(&str, &Path) -> Result<T, ServingError> + Send + 'static,
    ) -> Result<Option<Arc<T>>, ServingError> {
        let key = format!("{MERGED_PREFIX}{}", adapter.id);
        if self.adapters.resident(&key).is_none()
            && merged_files(blobs, &adapter.id).await?.is_empty()
        {
            return Ok(None);
        }
        let dir = self.config.cache_dir.join("merged").join(format!(
            "{}.{}",
            adapter.id,
            uuid::Uuid::new_v4().simple()
        ));
        let prefix = merged_blob_prefix(&adapter.id);
        let k = key.clone();
        let loaded = self
            .adapters
            .get_or_load(&key, || async move {
                blobs.download_dir(&prefix, &dir).await?;
                blocking(move || {
                    let res = load(&k, &dir);
                    let _ = std::fs::remove_dir_all(&dir);
                    res
                })
                .await
            })
            .await?;
        Ok(Some(loaded))
    }
}

/// Model names of merged models: `merged:` + the adapter's fine-tuned name without `ft:`
/// (or + the adapter id).
pub const MERGED_PREFIX: &str = "merged:";

/// Where a merged model's files live in the blob store.
pub fn merged_blob_prefix(adapter_id: &str) -> String {
    format!("merged/{adapter_id}")
}

/// The merged model's name for an adapter.
pub fn merged_name(adapter: &storage::Adapter) -> String {
    match adapter.name.strip_prefix("ft:") {
        Some(rest) => format!("{MERGED_PREFIX}{rest}"),
        None => format!("{MERGED_PREFIX}{}", adapter.id),
    }
}

/// Files of a merged model in the blob store, as (name, bytes); empty when not merged.
pub async fn merged_files(
    blobs: &BlobStore,
    adapter_id: &str,
) -> Result<Vec<(String, u64)>, ServingError> {
    let prefix = merged_blob_prefix(adapter_id);
    Ok(blobs
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|m| {
            let name = m
                .key
                .strip_prefix(&prefix)?
                .trim_start_matches('/')
                .to_string();
            (!name.is_empty() && !name.contains('/')).then_some((name, m.size))
        })
        .collect())
}

impl Engine {
    /// Materialises the merged model of `adapter` (see `trainer::peft::merge`) with the base's
    /// tokenizer beside it, and stores it in the blob store (replacing an earlier merge).
    /// Returns its files.
    pub async fn merge(
        &self,
        base: &Arc<LoadedBase>,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
        opts: MergeOptions,
    ) -> Result<Vec<(String, u64)>, ServingError> {
        let b = base.clone();
        let weights = self.config.weights;
        self.store_merge(adapter, blobs, move |adir, out| {
            // Merged files are exact: computed from the checkpoint's f32 weights, whatever
            // the served copy keeps.
            let f32_base;
            let model = match weights {
                WeightDtype::F32 => b.model.as_ref(),
                _ => {
                    f32_base = WeightDtype::F32
                        .load_lm(&b.dir)
                        .map_err(|e| ServingError::Load(format!("{}: {e}", b.dir.display())))?;
                    &f32_base
                }
            };
            let a = Adapter::load(adir, model)
                .map_err(|e| ServingError::Load(format!("adapter: {e}")))?;
            let merged = a.merge_lm(model, &opts).map_err(|e| match e {
                PeftError::NotMergeable { .. } | PeftError::Contradictory(_) => {
                    ServingError::Unmergeable(e.to_string())
                }
                other => ServingError::Load(format!("merging: {other}")),
            })?;
            merged
                .save(out)
                .map_err(|e| ServingError::Load(format!("saving the merged model: {e}")))?;
            let tok = b.dir.join("tokenizer.json");
            std::fs::copy(&tok, out.join("tokenizer.json"))
                .map_err(|e| ServingError::Load(format!("copying {}: {e}", tok.display())))?;
            Ok(())
        })
        .await
    }

    /// The merged model of `adapter`, from the cache or loaded from the blob store
    /// (`Ok(None)` when it has not been merged).
    pub async fn merged(
        &self,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
    ) -> Result<Option<Arc<LoadedAdapter>>, ServingError> {
        let weights = self.config.weights;
        self.cached_merge(adapter, blobs, move |key, dir| {
            load_merged(key, dir, weights)
        })
        .await
    }
}

/// Loads a folder written by `MergedModel::save`: the weights, a residual prompt/affix
/// adapter, an initial state.
fn load_merged(key: &str, dir: &Path, weights: WeightDtype) -> Result<LoadedAdapter, ServingError> {
    let err = |e: &dyn std::fmt::Display| ServingError::Load(format!("{key}: {e}"));
    let base = weights.load_lm(dir).map_err(|e| err(&e))?;
    let bytes = base
        .named_weights()
        .iter()
        .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    let model = if dir.join(trainer::peft::CONFIG_FILE).is_file() {
        let residual = Adapter::load(dir, &base).map_err(|e| err(&e))?;
        residual.apply_frozen(&base).map_err(|e| err(&e))?
    } else {
        base
    };
    let state_file = dir.join("initial_state.safetensors");
    let initial_state = if state_file.is_file() {
        let mut t = candle_core::safetensors::load(&state_file, &candle_core::Device::Cpu)
            .map_err(|e| err(&e))?;
        let mut layers = Vec::new();
        for i in 0..model.num_layers() {
            let conv = t.remove(&format!("layers.{i}.conv_inputs"));
            let ssm = t.remove(&format!("layers.{i}.ssm_state"));
            match (conv, ssm) {
                (Some(c), Some(s)) => layers.push((c, s)),
                _ => return Err(err(&format!("initial_state.safetensors lacks layer {i}"))),
            }
        }
        Some(Arc::new(InitialState { layers }))
    } else {
        None
    };
    Ok(LoadedAdapter {
        id: key.to_string(),
        model: Arc::new(model),
        initial_state,
        bytes,
        shared_base: None,
    })
}

/// Runs blocking model work off the async runtime's workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServingError> + Send + 'static,
) -> Result<T, ServingError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServingError::Load(format!("loader task failed: {e}")))?
}

fn load_base(dir: &Path, weights: WeightDtype) -> Result<(AnyLm, Tokenizer), ServingError> {
    let model = weights
        .load_lm(dir)
        .map_err(|e| ServingError::Load(format!("{}: {e}", dir.display())))?;
    let tok = Tokenizer::from_model_dir(dir)
        .map_err(|e| ServingError::Load(format!("{}: {e}", dir.display())))?
        .ok_or_else(|| ServingError::Load(format!("{} has no tokenizer.json", dir.display())))?;
    Ok((model, tok))
}
