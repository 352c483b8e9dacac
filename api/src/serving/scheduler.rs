//! Continuous batching: one scheduler thread per base model decodes every running sequence
//! of that base together, one token per step.
//!
//! A Mamba sequence's whole state is a fixed-size cache row, so a new request joins between
//! two steps: its prompt runs (prefill, batch of one; in chunks of [`PREFILL_CHUNK`] tokens
//! interleaved with decode steps while others decode, so a long prompt does not stall them)
//! and its cache row enters its group; a finished or abandoned sequence leaves by dropping
//! its row (`MambaCache::select_rows`). The base model and every adapter that only adds
//! projection terms (the LoRA family, parallel adapters) share one group: one base matmul
//! per projection for all their rows, each run of rows adding its own adapter's terms.
//! Other models (weight-transforming or state-extending adapters, inserted tokens, merged
//! models) are groups of their own, sub-batches of the same step. The thread is outside the
//! async runtime, so the model never blocks an axum worker; requests reach it over a
//! channel, tokens go back over one channel per sequence, and a closed channel (client
//! gone, stop string found) frees the slot at the next step.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;
use trainer::generate::{argmax, sample};
use trainer::model::{AnyLm, LayerCache, MambaCache, ModelInput};

use super::{ServedModel, Stats};

/// Sampling settings of one sequence.
#[derive(Debug, Clone)]
pub struct SeqParams {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// How many alternatives to report per token (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    pub eos: Vec<u32>,
}

impl SeqParams {
    /// Greedy decoding of `max_tokens` tokens, no log-probabilities, no end-of-sequence.
    pub fn greedy(max_tokens: usize) -> Self {
        SeqParams {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            logprobs: None,
            eos: Vec::new(),
        }
    }
}

/// One sequence to generate.
pub struct SeqRequest {
    pub model: ServedModel,
    pub prompt: Vec<u32>,
    pub params: SeqParams,
    pub tx: UnboundedSender<SeqEvent>,
}

/// A produced token, with its log-probability under the model (before temperature/top-p)
/// and the top alternatives when asked.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end-of-sequence token (not reported as a token).
    Eos,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone)]
pub enum SeqEvent {
    Token(TokenOut),
    Done(Finish),
    Failed(String),
}

/// The admission queue is full.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded;

/// Handle to a base model's scheduler thread.
pub struct Scheduler {
    tx: Mutex<mpsc::Sender<SeqRequest>>,
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
}

impl Scheduler {
    /// Starts the thread. At most `max_batch` sequences decode at once; `max_queue` more may
    /// wait; beyond that [`Self::submit`] refuses.
    pub fn start(name: &str, max_batch: usize, max_queue: usize, stats: Arc<Stats>) -> Self {
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        let max_batch = max_batch.max(1);
        let spawned = std::thread::Builder::new()
            .name(format!("molt-sched-{name}"))
            .spawn(move || run(rx, counter, max_batch, stats));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a scheduler thread");
        }
        Scheduler {
            tx: Mutex::new(tx),
            in_flight,
            capacity: max_batch + max_queue,
        }
    }

    /// The most sequences that may be in flight at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences running or waiting.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Queues all of `reqs`, or none of them when that would exceed the capacity.
    pub fn submit(&self, reqs: Vec<SeqRequest>) -> Result<(), Overloaded> {
        let n = reqs.len();
        let admitted = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur + n <= self.capacity).then_some(cur + n)
            });
        if admitted.is_err() {
            return Err(Overloaded);
        }
        let tx = match self.tx.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for (i, r) in reqs.into_iter().enumerate() {
            if let Err(mpsc::SendError(r)) = tx.send(r) {
                // The thread is gone (it could not start): fail what is left.
                let _ = r.tx.send(SeqEvent::Failed(
                    "the model's scheduler is not running".into(),
                ));
                self.in_flight.fetch_sub(n - i, Ordering::SeqCst);
                return Ok(());
            }
        }
        Ok(())
    }
}

struct Seq {
    req: SeqRequest,
    rng: StdRng,
    produced: usize,
}

/// Sequences decoded as one sub-batch.
struct Group {
    key: String,
    /// Set for the group of the base and its additive adapters: rows then come in runs of
    /// one model each (a new row joins at the end of its model's run), and `model` is the
    /// base with each run's projection terms ([`AnyLm::row_segmented`]), rebuilt
    /// when the runs change.
    shared_base: Option<Arc<AnyLm>>,
    model: Arc<AnyLm>,
    stale: bool,
    cache: MambaCache,
    /// `[b, V]`: the distribution each row draws its next token from.
    logits: Tensor,
    seqs: Vec<Seq>,
}

impl Group {
    /// Rebuilds a shared group's model after its runs changed.
    fn refresh(&mut self) -> trainer::Result<()> {
        if !self.stale {
            return Ok(());
        }
        if let Some(base) = &self.shared_base {
            let runs = runs(self.seqs.iter().map(|s| &s.req.model));
            self.model = Arc::new(base.row_segmented(&runs)?);
        }
        self.stale = false;
        Ok(())
    }
}

/// `(rows, model)` of each run of consecutive sequences on one model.
fn runs<'a>(models: impl Iterator<Item = &'a ServedModel>) -> Vec<(usize, &'a AnyLm)> {
    let mut runs: Vec<(usize, &str, &AnyLm)> = Vec::new();
    for m in models {
        match runs.last_mut() {
            Some((n, key, _)) if *key == m.key => *n += 1,
            _ => runs.push((1, m.key.as_str(), m.model.as_ref())),
        }
    }
    runs.into_iter().map(|(n, _, m)| (n, m)).collect()
}

/// Key of the shared group (model keys are ids and names, never this).
pub(super) const SHARED: &str = "\0shared";

/// Prompt tokens run per scheduler step while other sequences decode: a long prompt then
/// delays each of their tokens by one chunk's prefill instead of its whole prompt's.
const PREFILL_CHUNK: usize = 256;

/// A sequence whose prompt is being run, chunk by chunk.
struct Prefill {
    req: SeqRequest,
    cache: MambaCache,
    /// Prompt tokens already in `cache`.
    done: usize,
    /// The last position's logits `[1, V]`, once the prompt is done.
    logits: Option<Tensor>,
    failed: Option<String>,
}

fn run(
    rx: mpsc::Receiver<SeqRequest>,
    in_flight: Arc<AtomicUsize>,
    max_batch: usize,
    stats: Arc<Stats>,
) {
    let mut pending: VecDeque<SeqRequest> = VecDeque::new();
    let mut prefilling: Vec<Prefill> = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    let release = |n: usize| {
        if n > 0 {
            in_flight.fetch_sub(n, Ordering::SeqCst);
        }
    };
    loop {
        let mut active: usize = groups.iter().map(|g| g.seqs.len()).sum();
        if active == 0 && prefilling.is_empty() && pending.is_empty() {
            match rx.recv() {
                Ok(r) => pending.push_back(r),
                Err(_) => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            pending.push_back(r);
        }
        // Admit: decoding and prefilling sequences together stay within max_batch.
        while active + prefilling.len() < max_batch {
            let Some(r) = pending.pop_front() else { break };
            if r.tx.is_closed() {
                release(1);
                continue;
            }
            match start_prefill(r) {
                Some(p) => prefilling.push(p),
                None => release(1),
            }
        }
        // Prefill within this step's token budget (all of it when nothing decodes), FIFO.
        // The first chunks of new prompts run as one batch per batch key (a model, or the
        // shared group's base), the rest one prompt at a time. A finished prompt joins its
        // group between two decode steps.
        let mut budget = if active == 0 {
            usize::MAX
        } else {
            PREFILL_CHUNK
        };
        prefilling.retain(|p| {
            let open = !p.req.tx.is_closed();
            if !open {
                release(1);
            }
            open
        });
        // One batch per batch key, in order of each key's oldest prompt.
        while budget > 0 {
            let mut batch = Vec::new();
            let mut used = 0;
            let mut key = None;
            for (i, p) in prefilling.iter().enumerate() {
                let m = &p.req.model;
                // A prompt the model would refuse runs alone, failing only itself.
                let valid = !p.req.prompt.is_empty()
                    && p.req
                        .prompt
                        .iter()
                        .all(|&t| (t as usize) < m.model.vocab_size());
                if p.done > 0
                    || p.failed.is_some()
                    || !valid
                    || !m.plain_prefill()
                    || key.is_some_and(|k| k != m.batch_key())
                {
                    continue;
                }
                let piece = p.req.prompt.len().min(PREFILL_CHUNK);
                if !batch.is_empty() && used + piece > budget {
                    break;
                }
                key = Some(m.batch_key());
                used += piece;
                batch.push(i);
            }
            if batch.is_empty() {
                break;
            }
            budget = budget.saturating_sub(used);
            match prefill_batch(&mut prefilling, &batch) {
                Ok(()) if batch.len() > 1 => {
                    stats.prefill_batches.fetch_add(1, Ordering::Relaxed);
                    stats
                        .prefill_batched_rows
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Ok(()) => {}
                Err(e) => {
                    for &i in &batch {
                        prefilling[i].failed = Some(e.to_string());
                    }
                }
            }
        }
        let mut i = 0;
        while i < prefilling.len() {
            let p = &mut prefilling[i];
            if p.logits.is_none() && p.failed.is_none() && budget > 0 {
                match prefill_chunk(p, &mut budget) {
                    Ok(logits) => p.logits = logits,
                    Err(e) => p.failed = Some(e.to_string()),
                }
            }
            if p.logits.is_none() && p.failed.is_none() {
                i += 1;
                continue;
            }
            let p = prefilling.remove(i);
            match (p.logits, p.failed) {
                (Some(logits), None) => {
                    stats
                        .prompt_tokens
                        .fetch_add(p.req.prompt.len() as u64, Ordering::Relaxed);
                    if let Err(e) = join(&mut groups, p.req, logits, p.cache) {
                        tracing::error!(error = %e, "scheduler: joining a batch failed");
                        release(1);
                        continue;
                    }
                    active += 1;
                }
                (_, failed) => {
                    let m = failed.unwrap_or_else(|| "prefill failed".into());
                    let _ = p.req.tx.send(SeqEvent::Failed(m));
                    release(1);
                }
            }
        }
        stats
            .sequences_running
            .store(active as u64, Ordering::Relaxed);
        if active > 0 {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats
                .decode_rows
                .fetch_add(active as u64, Ordering::Relaxed);
            stats
                .decode_groups
                .fetch_add(groups.len() as u64, Ordering::Relaxed);
        }
        for g in &mut groups {
            let before = g.seqs.len();
            if let Err(e) = advance(g, &stats) {
                tracing::error!(model = %g.key, error = %e, "decode step failed");
                for s in g.seqs.drain(..) {
                    let _ = s.req.tx.send(SeqEvent::Failed(e.to_string()));
                }
            }
            release(before - g.seqs.len());
        }
        groups.retain(|g| !g.seqs.is_empty());
        let running: usize = groups.iter().map(|g| g.seqs.len()).sum();
        stats
            .sequences_running
            .store(running as u64, Ordering::Relaxed);
    }
}

/// The empty (or initial-state) cache a request's prompt starts from; on failure the
/// request is told so and `None` returned.
fn start_prefill(r: SeqRequest) -> Option<Prefill> {
    let m = &r.model.model;
    let cache = match &r.model.initial_state {
        Some(s) => s.to_cache(1, m.dtype()).map_err(|e| trainer::Error::Input {
            field: "initial_state".into(),
            reason: e.to_string(),
        }),
        None => m.new_cache(1),
    };
    match cache {
        Ok(cache) => Some(Prefill {
            req: r,
            cache,
            done: 0,
            logits: None,
            failed: None,
        }),
        Err(e) => {
            let _ = r.tx.send(SeqEvent::Failed(e.to_string()));
            None
        }
    }
}

/// Runs the next chunk of a prompt, taking its length from `budget`. A prompt is chunked
/// only on models without inserted tokens ([`ServedModel::plain_prefill`]), whose prefill
/// is the same in pieces as whole; others run whole. Returns the last
/// position's logits `[1, V]` once the prompt is done.
fn prefill_chunk(p: &mut Prefill, budget: &mut usize) -> trainer::Result<Option<Tensor>> {
    let m = &p.req.model.model;
    let rest = p.req.prompt.len() - p.done;
    let take = if p.req.model.plain_prefill() {
        rest.min(*budget)
    } else {
        rest
    };
    *budget = budget.saturating_sub(take);
    let chunk = p.req.prompt[p.done..p.done + take].to_vec();
    let ids = Tensor::from_vec(chunk, (1, take), &Device::Cpu)?;
    let input = ModelInput::new(&ids, None, m.vocab_size())?;
    let logits = m.prefill(&input, &mut p.cache)?;
    p.done += take;
    Ok((p.done == p.req.prompt.len()).then_some(logits))
}

/// Runs the first chunk of the prompts at `batch` (fresh, one batch key, plain prefill) as
/// one left-padded batch: a masked pad leaves a zero Mamba state exactly zero, so each row
/// ends as it would alone. For the shared group, rows are ordered by model so each model's
/// rows form one run of the base's row-segmented model.
fn prefill_batch(ps: &mut [Prefill], batch: &[usize]) -> trainer::Result<()> {
    let mut order = batch.to_vec();
    order.sort_by(|&a, &b| ps[a].req.model.key.cmp(&ps[b].req.model.key));
    let pieces: Vec<usize> = order
        .iter()
        .map(|&i| ps[i].req.prompt.len().min(PREFILL_CHUNK))
        .collect();
    let width = pieces.iter().copied().max().unwrap_or(0);
    let n = order.len();
    let mut ids = vec![0u32; n * width];
    let mut mask = vec![0f32; n * width];
    for (r, (&i, &len)) in order.iter().zip(&pieces).enumerate() {
        let at = r * width + width - len;
        ids[at..at + len].copy_from_slice(&ps[i].req.prompt[..len]);
        mask[at..at + len].fill(1.0);
    }
    let (logits, cache) = {
        let first = &ps[order[0]].req.model;
        let runs = runs(order.iter().map(|&i| &ps[i].req.model));
        let model = match &first.shared_base {
            Some(base) => std::borrow::Cow::Owned(base.row_segmented(&runs)?),
            // One model: the batch key is its key.
            None => std::borrow::Cow::Borrowed(first.model.as_ref()),
        };
        let ids = Tensor::from_vec(ids, (n, width), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (n, width), &Device::Cpu)?;
        let input = ModelInput::new(&ids, Some(&mask), model.vocab_size())?;
        let mut cache = model.new_cache(n)?;
        (model.prefill(&input, &mut cache)?, cache)
    };
    for (r, (&i, &len)) in order.iter().zip(&pieces).enumerate() {
        let layers = cache
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    conv: l.conv.narrow(0, r, 1)?.contiguous()?,
                    ssm: l.ssm.narrow(0, r, 1)?.contiguous()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let p = &mut ps[i];
        p.cache = MambaCache {
            layers,
            seqlen_offset: len,
        };
        p.done = len;
        if len == p.req.prompt.len() {
            p.logits = Some(logits.narrow(0, r, 1)?);
        }
    }
    Ok(())
}

/// `t` with `row` inserted before index `at` of dimension 0.
fn insert_row(t: &Tensor, row: &Tensor, at: usize) -> candle_core::Result<Tensor> {
    let n = t.dim(0)?;
    let mut parts = Vec::with_capacity(3);
    if at > 0 {
        parts.push(t.narrow(0, 0, at)?);
    }
    parts.push(row.clone());
    if at < n {
        parts.push(t.narrow(0, at, n - at)?);
    }
    Tensor::cat(&parts, 0)
}

fn join(
    groups: &mut Vec<Group>,
    r: SeqRequest,
    logits: Tensor,
    cache: MambaCache,
) -> candle_core::Result<()> {
    let seq = Seq {
        rng: StdRng::seed_from_u64(r.params.seed),
        produced: 0,
        req: r,
    };
    let shared_base = seq.req.model.shared_base.clone();
    let key = seq.req.model.batch_key().to_string();
    match groups.iter_mut().find(|g| g.key == key) {
        Some(g) => {
            // After the last row of the same model, so runs stay contiguous.
            let at = g
                .seqs
                .iter()
                .rposition(|s| s.req.model.key == seq.req.model.key)
                .map_or(g.seqs.len(), |i| i + 1);
            let layers = g
                .cache
                .layers
                .iter()
                .zip(&cache.layers)
                .map(|(a, b)| {
                    Ok(LayerCache {
                        conv: insert_row(&a.conv, &b.conv, at)?,
                        ssm: insert_row(&a.ssm, &b.ssm, at)?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            g.cache.layers = layers;
            g.cache.seqlen_offset = g.cache.seqlen_offset.max(cache.seqlen_offset);
            g.logits = insert_row(&g.logits, &logits, at)?;
            g.seqs.insert(at, seq);
            g.stale = g.shared_base.is_some();
        }
        None => groups.push(Group {
            key,
            model: seq.req.model.model.clone(),
            stale: shared_base.is_some(),
            shared_base,
            cache,
            logits,
            seqs: vec![seq],
        }),
    }
    Ok(())
}

/// Picks each row's token, reports it, drops finished rows, and steps the rest.
fn advance(g: &mut Group, stats: &Stats) -> trainer::Result<()> {
    let rows = g.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut keep: Vec<u32> = Vec::new();
    let mut feed: Vec<u32> = Vec::new();
    // The last event of each leaving sequence, sent once its row (and the adapter pin it
    // holds) is gone, so a client that sees the end finds the slot free.
    let mut last: Vec<Option<SeqEvent>> = vec![None; g.seqs.len()];
    for (i, (seq, row)) in g.seqs.iter_mut().zip(&rows).enumerate() {
        if seq.req.tx.is_closed() {
            continue;
        }
        let p = &seq.req.params;
        let tok = if p.temperature == 0.0 {
            argmax(row)
        } else {
            sample(row, p.temperature, p.top_p, &mut seq.rng)
        };
        let Some(tok) = tok else {
            last[i] = Some(SeqEvent::Failed(
                "the model produced no finite logit".into(),
            ));
            continue;
        };
        if p.eos.contains(&tok) {
            last[i] = Some(SeqEvent::Done(Finish::Eos));
            continue;
        }
        let (logprob, top) = match p.logprobs {
            Some(k) => logprobs(row, tok, k),
            None => (0.0, Vec::new()),
        };
        let out = TokenOut {
            id: tok,
            logprob,
            top,
        };
        if seq.req.tx.send(SeqEvent::Token(out)).is_err() {
            continue;
        }
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        seq.produced += 1;
        if seq.produced >= p.max_tokens {
            last[i] = Some(SeqEvent::Done(Finish::Length));
            continue;
        }
        keep.push(i as u32);
        feed.push(tok);
    }
    if keep.len() < g.seqs.len() {
        if !keep.is_empty() {
            g.cache.select_rows(&keep)?;
        }
        let mut kept = Vec::with_capacity(keep.len());
        for (i, s) in g.seqs.drain(..).enumerate() {
            if keep.contains(&(i as u32)) {
                kept.push(s);
                continue;
            }
            let SeqRequest { tx, model, .. } = s.req;
            drop(model);
            if let Some(ev) = last[i].take() {
                let _ = tx.send(ev);
            }
        }
        g.seqs = kept;
        if g.seqs.is_empty() {
            return Ok(());
        }
        g.stale = g.shared_base.is_some();
    }
    g.refresh()?;
    g.logits = g.model.step(&feed, &mut g.cache)?;
    Ok(())
}

/// log softmax(row)[tok] and the `k` most likely tokens with theirs.
pub fn logprobs(row: &[f32], tok: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = row
        .iter()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = f64::from(max)
        + row
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| (f64::from(v) - f64::from(max)).exp())
            .sum::<f64>()
            .ln();
    let lp = |v: f32| (f64::from(v) - lse) as f32;
    let chosen = row.get(tok as usize).map(|&v| lp(v)).unwrap_or(f32::NAN);
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<usize> = (0..row.len()).filter(|&i| !row[i].is_nan()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        top = idx
            .into_iter()
            .take(k)
            .map(|i| (i as u32, lp(row[i])))
            .collect();
    }
    (chosen, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::model::{Checkpoint, MambaConfig};

    fn generate(
        sched: &Scheduler,
        model: &ServedModel,
        prompt: Vec<u32>,
        n: usize,
    ) -> Vec<TokenOut> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let req = SeqRequest {
            model: model.clone(),
            prompt,
            params: SeqParams {
                logprobs: Some(0),
                ..SeqParams::greedy(n)
            },
            tx,
        };
        assert!(sched.submit(vec![req]).is_ok());
        let mut out = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                SeqEvent::Token(t) => out.push(t),
                SeqEvent::Done(_) => break,
                SeqEvent::Failed(m) => panic!("generation failed: {m}"),
            }
        }
        out
    }

    fn plain_model(key: &str, model: Arc<AnyLm>, shared_base: Option<Arc<AnyLm>>) -> ServedModel {
        ServedModel {
            key: key.into(),
            model,
            initial_state: None,
            pin: None,
            shared_base,
        }
    }

    /// A LoRA on in_proj and out_proj moved off its zero init, served hot-swapped.
    fn lora(base: &Arc<AnyLm>, seed: u64) -> ServedModel {
        let spec = trainer::peft::AdapterSpec::from_value(
            &serde_json::json!({"type": "lora", "targets": ["in_proj", "out_proj"], "r": 2}),
        )
        .expect("spec");
        let a = trainer::peft::Adapter::init(&spec, base.as_ref(), seed).expect("init");
        for v in a.vars().values() {
            v.set(&(v.as_tensor() + 0.05).expect("add")).expect("set");
        }
        let loaded =
            super::super::LoadedAdapter::new(&format!("lora-{seed}"), a, base).expect("load");
        assert!(loaded.shared_base.is_some());
        ServedModel::adapter(Arc::new(loaded))
    }

    /// Two random models of each language family: a base and one "of its own".
    fn random_pairs() -> trainer::Result<Vec<(Arc<AnyLm>, Arc<AnyLm>)>> {
        let mut cfg = MambaConfig::new(32, 2, 64);
        cfg.state_size = 4;
        let m1 = |seed| -> trainer::Result<Arc<AnyLm>> {
            Ok(Arc::new(AnyLm::from(
                Checkpoint::random(&cfg, seed, &Device::Cpu)?.into_frozen()?,
            )))
        };
        let mut cfg2 = trainer::model::mamba2::Mamba2Config::new(32, 2, 64);
        (
            cfg2.head_dim,
            cfg2.num_heads,
            cfg2.state_size,
            cfg2.n_groups,
        ) = (8, 8, 4, 2);
        let m2 = |seed| -> trainer::Result<Arc<AnyLm>> {
            Ok(Arc::new(AnyLm::from(
                trainer::model::mamba2::Mamba2Checkpoint::random(&cfg2, seed, &Device::Cpu)?
                    .into_frozen()?,
            )))
        };
        Ok(vec![(m1(2)?, m1(3)?), (m2(2)?, m2(3)?)])
    }

    /// For Mamba-1 and Mamba-2 alike: the base and two LoRA adapters share one decode
    /// batch (row-segmented), a model of its own runs beside them, and every sequence gets
    /// the tokens it gets alone.
    #[test]
    fn prompts_prefilled_together_match_each_alone() -> trainer::Result<()> {
        for (base, other) in random_pairs()? {
            prompts_prefilled_together_match_each_alone_on(base, other);
        }
        Ok(())
    }

    fn prompts_prefilled_together_match_each_alone_on(base: Arc<AnyLm>, other: Arc<AnyLm>) {
        let plain = plain_model("base", base.clone(), Some(base.clone()));
        let (one, two) = (lora(&base, 1), lora(&base, 2));
        // A model of its own (as a merged one is): batched apart from the shared group.
        let other = plain_model("other", other, None);
        // Different lengths (left padding), models interleaved (runs re-ordered).
        let cases: Vec<(ServedModel, Vec<u32>)> = vec![
            (other.clone(), vec![1, 2, 3, 4, 5, 6]),
            (one.clone(), vec![5, 9, 2, 7, 1, 1, 3]),
            (other, vec![9, 9]),
            (plain.clone(), vec![4]),
            (two.clone(), vec![8, 8, 6, 1, 2]),
            (one.clone(), vec![3, 2]),
            (plain, vec![10, 11, 12, 13, 14, 15, 16, 17, 18]),
            (two, vec![7, 7, 7]),
        ];
        let stats = Arc::new(Stats::default());
        let sched = Scheduler::start("test", 16, 16, stats.clone());
        let alone: Vec<Vec<TokenOut>> = cases
            .iter()
            .map(|(m, p)| generate(&sched, m, p.clone(), 5))
            .collect();
        // The scheduler may wake between two sends; retry until the prompts met in a batch.
        for _ in 0..5 {
            let mut rxs = Vec::new();
            let mut reqs = Vec::new();
            for (m, p) in &cases {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                reqs.push(SeqRequest {
                    model: m.clone(),
                    prompt: p.clone(),
                    params: SeqParams {
                        logprobs: Some(0),
                        ..SeqParams::greedy(5)
                    },
                    tx,
                });
                rxs.push(rx);
            }
            let before = stats.prefill_batched_rows.load(Ordering::Relaxed);
            assert!(sched.submit(reqs).is_ok());
            for (rx, want) in rxs.iter_mut().zip(&alone) {
                let mut got = Vec::new();
                while let Some(SeqEvent::Token(t)) = rx.blocking_recv() {
                    got.push(t);
                }
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want) {
                    assert_eq!(g.id, w.id);
                    assert!(
                        (g.logprob - w.logprob).abs() < 1e-4,
                        "{} vs {}",
                        g.logprob,
                        w.logprob
                    );
                }
            }
            // 2 prompts on `other`, 6 in the shared group.
            if stats.prefill_batched_rows.load(Ordering::Relaxed) - before == 8 {
                return;
            }
        }
        panic!("the prompts were never prefilled in one batch");
    }

    #[test]
    fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps() -> trainer::Result<()> {
        let mut cfg = MambaConfig::new(32, 2, 64);
        cfg.state_size = 4;
        let base = Arc::new(AnyLm::from(
            Checkpoint::random(&cfg, 1, &Device::Cpu)?.into_frozen()?,
        ));
        let served = plain_model("base", base.clone(), Some(base.clone()));
        let stats = Arc::new(Stats::default());
        let sched = Scheduler::start("test", 8, 8, stats.clone());
        let long: Vec<u32> = (0..12 * PREFILL_CHUNK + 17)
            .map(|i| (i * 7 % 64) as u32)
            .collect();
        let alone = generate(&sched, &served, long.clone(), 4);
        assert_eq!(alone.len(), 4);

        // A companion decodes while the long prompt arrives.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let companion = SeqRequest {
            model: served.clone(),
            prompt: vec![1, 2, 3],
            params: SeqParams::greedy(100_000),
            tx,
        };
        assert!(sched.submit(vec![companion]).is_ok());
        assert!(matches!(rx.blocking_recv(), Some(SeqEvent::Token(_))));
        let steps = stats.decode_steps.load(Ordering::Relaxed);
        let together = generate(&sched, &served, long, 4);
        let during = stats.decode_steps.load(Ordering::Relaxed) - steps;
        // 13 chunks, each followed by a decode step, then 4 tokens (whole: ~5 steps).
        assert!(during >= 13, "{during} decode steps");
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.id, t.id);
            assert!(
                (a.logprob - t.logprob).abs() < 1e-4,
                "{} vs {}",
                a.logprob,
                t.logprob
            );
        }
        drop(rx);
        Ok(())
    }

    #[test]
    fn logprobs_normalise() {
        let row = [0.0f32, (2.0f32).ln(), f32::NAN];
        let (lp, top) = logprobs(&row, 1, 2);
        assert!((lp - (2.0f32 / 3.0).ln()).abs() < 1e-6);
        assert_eq!(top[0].0, 1);
        assert_eq!(top[1].0, 0);
        assert!((top[1].1 - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }
}
