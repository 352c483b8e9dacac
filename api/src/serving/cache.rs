//! The hot-swap adapter cache: adapters loaded on first use, applied unmerged to their base
//! (sharing its tensors), kept while they fit a byte budget, least recently used evicted
//! first. An adapter in use is pinned: whoever holds its `Arc<LoadedAdapter>` (a request,
//! the scheduler's sequences) keeps it resident, so eviction never pulls weights from under
//! a running generation. Language-model adapters and image classifiers
//! ([`super::vision::LoadedClassifier`]) share the one budget.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OnceCell;
use trainer::model::AnyLm;
use trainer::peft::{Adapter, InitialState};

use super::{ServingError, Stats};

/// An adapter (or a merged model) ready to serve.
#[derive(Debug)]
pub struct LoadedAdapter {
    /// The cache key: the adapter id, or `merged:<adapter id>`.
    pub id: String,
    /// The adapted model (the base's tensors plus this adapter's parts), or the merged one.
    pub model: Arc<AnyLm>,
    /// A merged prefix prompt/affix: the state every sequence starts from.
    pub initial_state: Option<Arc<InitialState>>,
    /// Bytes of the tensors residency costs: the adapter's own on top of the shared base,
    /// or a merged model's whole weights.
    pub bytes: u64,
    /// The base, when the adapter only adds projection terms to it: its sequences then
    /// share the base's decode batch (one base matmul for all adapters' rows).
    pub shared_base: Option<Arc<AnyLm>>,
}

impl LoadedAdapter {
    /// Applies `adapter` unmerged on `base`.
    pub fn new(id: &str, adapter: Adapter, base: &Arc<AnyLm>) -> Result<Self, ServingError> {
        let model = adapter
            .apply_frozen(base.as_ref())
            .map_err(|e| ServingError::Load(format!("adapter {id}: {e}")))?;
        let bytes = adapter
            .named_tensors()
            .iter()
            .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        let shared_base = model.is_additive_over(base).then(|| base.clone());
        Ok(LoadedAdapter {
            id: id.to_string(),
            model: Arc::new(model),
            initial_state: None,
            bytes,
            shared_base,
        })
    }
}

/// What the cache holds.
#[derive(Debug, Clone)]
pub enum Resident {
    Lm(Arc<LoadedAdapter>),
    Classifier(Arc<super::vision::LoadedClassifier>),
}

impl Resident {
    fn bytes(&self) -> u64 {
        match self {
            Resident::Lm(a) => a.bytes,
            Resident::Classifier(c) => c.bytes,
        }
    }

    /// Held by a request (or a running sequence) besides the cache.
    fn in_use(&self) -> bool {
        match self {
            Resident::Lm(a) => Arc::strong_count(a) > 1,
            Resident::Classifier(c) => Arc::strong_count(c) > 1,
        }
    }
}

/// A kind of loaded model the cache holds.
pub trait Cached: Sized {
    fn wrap(loaded: Arc<Self>) -> Resident;
    fn unwrap(resident: &Resident) -> Option<Arc<Self>>;
}

impl Cached for LoadedAdapter {
    fn wrap(loaded: Arc<Self>) -> Resident {
        Resident::Lm(loaded)
    }
    fn unwrap(resident: &Resident) -> Option<Arc<Self>> {
        match resident {
            Resident::Lm(a) => Some(a.clone()),
            Resident::Classifier(_) => None,
        }
    }
}

impl Cached for super::vision::LoadedClassifier {
    fn wrap(loaded: Arc<Self>) -> Resident {
        Resident::Classifier(loaded)
    }
    fn unwrap(resident: &Resident) -> Option<Arc<Self>> {
        match resident {
            Resident::Classifier(c) => Some(c.clone()),
            Resident::Lm(_) => None,
        }
    }
}

struct Slot {
    cell: Arc<OnceCell<Resident>>,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<String, Slot>,
    tick: u64,
}

/// What [`AdapterCache::evict`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    Yes,
    NotResident,
    /// In use by a running request.
    Pinned,
}

/// LRU cache of loaded adapters bounded by `budget` bytes.
pub struct AdapterCache {
    budget: u64,
    inner: Mutex<Inner>,
    stats: Arc<Stats>,
}

impl AdapterCache {
    pub fn new(budget: u64, stats: Arc<Stats>) -> Self {
        AdapterCache {
            budget,
            inner: Mutex::new(Inner::default()),
            stats,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The adapter `id`, loaded by `load` on a miss (one load per id at a time; concurrent
    /// requests wait for it). The returned `Arc` pins it.
    pub async fn get_or_load<T, F, Fut>(&self, id: &str, load: F) -> Result<Arc<T>, ServingError>
    where
        T: Cached,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ServingError>>,
    {
        let cell = {
            let mut g = self.lock();
            g.tick += 1;
            let tick = g.tick;
            let slot = g.slots.entry(id.to_string()).or_insert_with(|| Slot {
                cell: Arc::new(OnceCell::new()),
                last_used: tick,
            });
            slot.last_used = tick;
            slot.cell.clone()
        };
        if cell.initialized() {
            self.stats.adapter_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.adapter_misses.fetch_add(1, Ordering::Relaxed);
        }
        let res = cell
            .get_or_try_init(|| async {
                let loaded = load().await?;
                self.stats.adapter_loads.fetch_add(1, Ordering::Relaxed);
                Ok::<_, ServingError>(T::wrap(Arc::new(loaded)))
            })
            .await;
        match res {
            Ok(r) => {
                let a = T::unwrap(r).ok_or_else(|| {
                    ServingError::Load(format!("'{id}' is loaded as another kind of model"))
                })?;
                self.enforce_budget(Some(id));
                Ok(a)
            }
            Err(e) => {
                // A failed load leaves nothing behind; the next request tries again.
                let mut g = self.lock();
                if g.slots.get(id).is_some_and(|s| !s.cell.initialized()) {
                    g.slots.remove(id);
                }
                Err(e)
            }
        }
    }

    /// Evicts least recently used, unpinned adapters (never `keep`) until the resident
    /// bytes fit the budget; when everything left is pinned the cache stays over budget
    /// until those requests end.
    pub fn enforce_budget(&self, keep: Option<&str>) {
        let mut g = self.lock();
        loop {
            let resident = resident_bytes(&g);
            if resident <= self.budget {
                break;
            }
            let victim = g
                .slots
                .iter()
                .filter(|(id, s)| {
                    Some(id.as_str()) != keep && s.cell.get().is_some_and(|a| !a.in_use())
                })
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone());
            let Some(victim) = victim else { break };
            g.slots.remove(&victim);
            self.stats.adapter_evictions.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(adapter_id = %victim, "adapter evicted");
        }
        self.publish(&g);
    }

    /// Drops `id` from the cache unless a request is using it.
    pub fn evict(&self, id: &str) -> Evicted {
        let mut g = self.lock();
        let out = match g.slots.get(id).and_then(|s| s.cell.get()) {
            None => Evicted::NotResident,
            Some(a) if a.in_use() => Evicted::Pinned,
            Some(_) => {
                g.slots.remove(id);
                self.stats.adapter_evictions.fetch_add(1, Ordering::Relaxed);
                Evicted::Yes
            }
        };
        self.publish(&g);
        out
    }

    /// Drops `id` even while in use (its files changed or are gone); running requests keep
    /// their copy until they end.
    pub fn forget(&self, id: &str) {
        let mut g = self.lock();
        if g.slots.remove(id).is_some_and(|s| s.cell.initialized()) {
            self.stats.adapter_evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.publish(&g);
    }

    /// Whether `id` is loaded, and its bytes.
    pub fn resident(&self, id: &str) -> Option<u64> {
        let g = self.lock();
        g.slots
            .get(id)
            .and_then(|s| s.cell.get())
            .map(Resident::bytes)
    }

    fn publish(&self, g: &Inner) {
        let resident = resident_bytes(g);
        let count = g.slots.values().filter(|s| s.cell.initialized()).count();
        self.stats
            .adapter_resident_bytes
            .store(resident, Ordering::Relaxed);
        self.stats
            .adapters_resident
            .store(count as u64, Ordering::Relaxed);
    }
}

fn resident_bytes(g: &Inner) -> u64 {
    g.slots
        .values()
        .filter_map(|s| s.cell.get())
        .map(Resident::bytes)
        .sum()
}
