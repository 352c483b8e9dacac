//! Serving image classifiers (Vision Mamba): a base model loaded once per head size, tenants'
//! adapters hot-swapped onto it (loaded on first use into the shared [`super::AdapterCache`],
//! weight-form methods folded into private copies of the weights they change, the rest of
//! the base shared) or their merged models, and a batcher thread per base that runs the images of concurrent requests
//! for the same model in one forward pass. The HTTP side is `routes::classifications`.
//!
//! An adapter trained on a dataset with `k` classes carries a head of `k` rows and the class
//! names (`classes.json`, see `trainer::train::images::CLASSES_FILE`); the base it attaches to
//! is loaded with a `k`-class head, which the adapter replaces. The base model itself answers
//! with its own head and the names of its `config.json` (`id2label`, else the indices).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use storage::BlobStore;
use tokio::sync::oneshot;
use trainer::model::vim::{
    EvalTransform, Mode, VimCheckpoint, VimForImageClassification, VimLoadOptions,
};
use trainer::peft::Adapter;
use trainer::train::images::read_classes;

use super::{Engine, ServingError, Stats, blocking};
use crate::registry;

/// An image classifier ready to serve: a hot-swapped adapter or a merged model.
#[derive(Debug)]
pub struct LoadedClassifier {
    /// The cache key and batch key: the adapter id, or `merged:<adapter id>`.
    pub id: String,
    pub model: Arc<VimForImageClassification>,
    /// Class `i`'s name.
    pub classes: Vec<String>,
    /// Bytes residency costs (the adapter's tensors, or a merged model's weights).
    pub bytes: u64,
}

/// A Vision Mamba base in memory.
pub struct VisionBase {
    pub id: String,
    /// The local model folder.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: Value,
    /// The checkpoint with its own head and the class names of its config, as served.
    pub own: Arc<LoadedClassifier>,
    pub transform: EvalTransform,
    /// The frozen base with a fresh head of `k` classes, for adapters trained on `k`.
    heads: Mutex<HashMap<usize, Arc<VimForImageClassification>>>,
    pub batcher: Batcher,
}

fn bytes_of(tensors: &[(String, Tensor)]) -> u64 {
    tensors
        .iter()
        .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Bytes of `model`'s weights that are not `base`'s own tensors.
fn own_bytes(model: &VimForImageClassification, base: &VimForImageClassification) -> u64 {
    let shared: std::collections::HashSet<_> =
        base.named_weights().iter().map(|(_, t)| t.id()).collect();
    let own: Vec<(String, Tensor)> = model
        .named_weights()
        .into_iter()
        .filter(|(_, t)| !shared.contains(&t.id()))
        .collect();
    bytes_of(&own)
}

fn load_err(what: &str, e: impl std::fmt::Display) -> ServingError {
    ServingError::Load(format!("{what}: {e}"))
}

fn load_vim(
    dir: &Path,
    num_classes: Option<usize>,
) -> Result<VimForImageClassification, ServingError> {
    let opts = VimLoadOptions {
        num_classes,
        ..VimLoadOptions::default()
    };
    VimCheckpoint::load(dir, &opts)
        .and_then(VimCheckpoint::into_frozen)
        .map_err(|e| load_err(&dir.display().to_string(), e))
}

/// The class names of a model folder's `config.json` (`id2label`), else the indices.
pub fn config_class_names(config: &Value, n: usize) -> Vec<String> {
    let labels = config.get("id2label");
    (0..n)
        .map(|c| {
            labels
                .and_then(|l| l.get(c.to_string()))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| c.to_string())
        })
        .collect()
}

/// Whether a registered base model is an image classifier (served by this module).
pub fn is_vision(base: &storage::BaseModel) -> bool {
    trainer::model::detect(&base.config, Path::new(&base.id))
        .is_ok_and(|f| f.task() == trainer::model::Task::ImageClassification)
}

impl VisionBase {
    /// The base with a `k`-class head (loaded on first use; blocking).
    fn with_classes(&self, k: usize) -> Result<Arc<VimForImageClassification>, ServingError> {
        if k == self.own.model.config.num_classes {
            return Ok(self.own.model.clone());
        }
        let mut g = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = g.get(&k) {
            return Ok(m.clone());
        }
        let m = Arc::new(load_vim(&self.dir, Some(k))?);
        g.insert(k, m.clone());
        Ok(m)
    }
}

/// The class names of an adapter folder: its `classes.json`, else the indices of its head.
fn adapter_classes(dir: &Path, head_rows: usize) -> Result<Vec<String>, ServingError> {
    match read_classes(dir).map_err(|e| load_err("classes", e))? {
        Some(c) => Ok(c),
        None => Ok((0..head_rows).map(|i| i.to_string()).collect()),
    }
}

/// Rows of the `head.bias` an adapter folder carries (its class count).
fn adapter_head_rows(dir: &Path) -> Result<usize, ServingError> {
    let path = dir.join(trainer::peft::WEIGHTS_FILE);
    let t = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| load_err(&path.display().to_string(), e))?;
    t.get("head.bias")
        .and_then(|b| b.dims().first().copied())
        .ok_or_else(|| load_err("adapter", "it has no classification head (head.bias)"))
}

impl Engine {
    /// The Vision Mamba base model, loaded (and its batcher started) on first use.
    pub async fn vision_base(
        &self,
        model: &storage::BaseModel,
        blobs: &BlobStore,
    ) -> Result<Arc<VisionBase>, ServingError> {
        let cell = Self::cell(
            &self.vision_bases,
            &format!("{}@{}", model.id, model.config_hash),
        );
        let loaded = cell
            .get_or_try_init(|| async {
                let dir = registry::materialize(model, blobs, &self.config.cache_dir).await?;
                let from = dir.clone();
                let m = blocking(move || load_vim(&from, None)).await?;
                let classes = config_class_names(&model.config, m.config.num_classes);
                let transform = EvalTransform::for_image_size(m.config.img_size);
                let batcher = Batcher::start(
                    &model.id,
                    self.config.max_batch,
                    self.config.max_queue,
                    self.stats.clone(),
                );
                tracing::info!(model = %model.id, "vision model loaded for serving");
                Ok::<_, ServingError>(Arc::new(VisionBase {
                    id: model.id.clone(),
                    dir,
                    config: model.config.clone(),
                    own: Arc::new(LoadedClassifier {
                        id: model.id.clone(),
                        model: Arc::new(m),
                        classes,
                        bytes: 0,
                    }),
                    transform,
                    heads: Mutex::new(HashMap::new()),
                    batcher,
                }))
            })
            .await?;
        Ok(loaded.clone())
    }

    /// A tenant's adapter on a vision base, hot-swapped: loaded on first use, in its
    /// inference form.
    pub async fn classifier(
        &self,
        base: &Arc<VisionBase>,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
    ) -> Result<Arc<LoadedClassifier>, ServingError> {
        let id = adapter.id.clone();
        let base = base.clone();
        self.cached_adapter(adapter, blobs, move |dir| {
            let rows = adapter_head_rows(dir)?;
            let classes = adapter_classes(dir, rows)?;
            let b = base.with_classes(rows)?;
            let a = Adapter::load(dir, b.as_ref())
                .map_err(|e| load_err(&format!("adapter {id}"), e))?;
            // Weight-form methods are folded into private copies of the weights they change
            // (the rest stays the base's): the adapter then costs nothing per image, as a
            // merged model.
            let model = a
                .inference_model(b.as_ref())
                .map_err(|e| load_err(&format!("adapter {id}"), e))?;
            let bytes = bytes_of(&a.named_tensors()) + own_bytes(&model, &b);
            Ok(LoadedClassifier {
                id,
                model: Arc::new(model),
                classes,
                bytes,
            })
        })
        .await
    }

    /// Merges a vision adapter into its base (`trainer::peft::merge`; methods without a weight
    /// form stay a residual adapter beside the weights), stores the folder (weights, config,
    /// classes) in the blob store and returns its files.
    pub async fn merge_classifier(
        &self,
        base: &Arc<VisionBase>,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
    ) -> Result<Vec<(String, u64)>, ServingError> {
        let b = base.clone();
        self.store_merge(adapter, blobs, move |adir, out| {
            let rows = adapter_head_rows(adir)?;
            let classes = adapter_classes(adir, rows)?;
            let bk = b.with_classes(rows)?;
            let a = Adapter::load(adir, bk.as_ref()).map_err(|e| load_err("adapter", e))?;
            let merged = a.merge(bk.as_ref()).map_err(|e| match e {
                trainer::peft::PeftError::NotMergeable { .. } => {
                    ServingError::Unmergeable(e.to_string())
                }
                other => load_err("merging", other),
            })?;
            merged
                .save(&b.config, out)
                .map_err(|e| load_err("saving the merged model", e))?;
            trainer::train::images::write_classes(out, &classes)
                .map_err(|e| load_err("saving the class names", e))
        })
        .await
    }

    /// The merged model of a vision adapter (`Ok(None)` when it has not been merged).
    pub async fn merged_classifier(
        &self,
        adapter: &storage::Adapter,
        blobs: &BlobStore,
    ) -> Result<Option<Arc<LoadedClassifier>>, ServingError> {
        self.cached_merge(adapter, blobs, |key, dir| {
            let base = load_vim(dir, None)?;
            let bytes = bytes_of(&base.named_weights());
            let model = if dir.join(trainer::peft::CONFIG_FILE).is_file() {
                let r = Adapter::load(dir, &base).map_err(|e| load_err(key, e))?;
                r.apply_frozen(&base).map_err(|e| load_err(key, e))?
            } else {
                base
            };
            let classes = adapter_classes(dir, model.config.num_classes)?;
            Ok(LoadedClassifier {
                id: key.to_string(),
                model: Arc::new(model),
                classes,
                bytes,
            })
        })
        .await
    }
}

/// Why a classification could not run.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The base's queue is full (429).
    #[error("the classification queue of this model is full; retry later")]
    Busy,
    #[error("classification failed: {0}")]
    Failed(String),
}

struct Job {
    key: String,
    model: Arc<VimForImageClassification>,
    /// `[n, 3, H, W]`.
    pixels: Tensor,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// The batcher of one base: a thread that runs queued requests' images, those of the same
/// model in one forward pass of up to `max_batch` images.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
}

impl Batcher {
    fn start(id: &str, max_batch: usize, max_queue: usize, stats: Arc<Stats>) -> Self {
        let (tx, rx) = sync_channel::<Job>(max_queue.max(1));
        let max_batch = max_batch.max(1);
        let _ = std::thread::Builder::new()
            .name(format!("molt-classify-{id}"))
            .spawn(move || batch_loop(rx, max_batch, &stats));
        Batcher { tx }
    }

    /// Class probabilities `[n][classes]` of `pixels` (`[n, 3, H, W]`) under `model`.
    pub async fn classify(
        &self,
        model: &LoadedClassifier,
        pixels: Tensor,
    ) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            key: model.id.clone(),
            model: model.model.clone(),
            pixels,
            reply,
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ClassifyError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                return Err(ClassifyError::Failed("the batcher stopped".into()));
            }
        }
        rx.await
            .map_err(|_| ClassifyError::Failed("the batcher dropped the request".into()))?
            .map_err(ClassifyError::Failed)
    }
}

fn batch_loop(rx: Receiver<Job>, max_batch: usize, stats: &Stats) {
    while let Ok(first) = rx.recv() {
        let mut images = first.pixels.dim(0).unwrap_or(0);
        let mut jobs = vec![first];
        while images < max_batch {
            match rx.try_recv() {
                Ok(j) => {
                    images += j.pixels.dim(0).unwrap_or(0);
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // Same model → one pass; groups in arrival order.
        let mut groups: Vec<Vec<Job>> = Vec::new();
        for j in jobs {
            match groups.iter_mut().find(|g| g[0].key == j.key) {
                Some(g) => g.push(j),
                None => groups.push(vec![j]),
            }
        }
        for group in groups {
            stats.classification_batches.fetch_add(1, Ordering::Relaxed);
            let n: usize = group.iter().map(|j| j.pixels.dim(0).unwrap_or(0)).sum();
            stats
                .classification_images
                .fetch_add(n as u64, Ordering::Relaxed);
            match run_group(&group) {
                Ok(rows) => {
                    let mut rows = rows.into_iter();
                    for j in group {
                        let k = j.pixels.dim(0).unwrap_or(0);
                        let _ = j.reply.send(Ok(rows.by_ref().take(k).collect()));
                    }
                }
                Err(e) => {
                    for j in group {
                        let _ = j.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// Softmax probabilities of every image of the group, in order.
fn run_group(group: &[Job]) -> Result<Vec<Vec<f32>>, String> {
    let pixels: Vec<&Tensor> = group.iter().map(|j| &j.pixels).collect();
    let run = || -> trainer::Result<Vec<Vec<f32>>> {
        let x = Tensor::cat(&pixels, 0)?;
        let logits = group[0].model.forward(&x, Mode::Eval, None)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    };
    let logits = run().map_err(|e| e.to_string())?;
    Ok(logits.iter().map(|l| softmax(l)).collect())
}

/// Probabilities from logits (shifted by the maximum, so large logits do not overflow).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

/// The `k` most likely classes, most likely first (ties by class index).
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&x, &y| probs[y].total_cmp(&probs[x]).then(x.cmp(&y)));
    order.into_iter().take(k).map(|c| (c, probs[c])).collect()
}
