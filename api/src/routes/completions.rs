//! `POST /v1/completions`: OpenAI's (legacy) completions in its shape, on a base model, a
//! fine-tuned model (`ft:…` or the adapter id, hot-swapped onto the shared base) or a merged
//! model. The work runs on the base model's scheduler thread (continuous batching, see
//! `serving::scheduler`); this handler tokenizes, submits one sequence per prompt × `n`,
//! turns tokens back into text (stop strings, log-probabilities) and answers as JSON or as
//! server-sent events ending with `data: [DONE]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use trainer::tokenizer::Tokenizer;

use super::integer;
use crate::auth::Tenant;
use crate::error::{ApiError, Json};
use crate::limits::{RequestLimits, too_large};
use crate::serving::scheduler::Finish;
use crate::serving::{LoadedBase, SeqEvent, SeqParams, SeqRequest, ServedModel, ServingError};
use crate::state::AppState;

impl From<ServingError> for ApiError {
    fn from(e: ServingError) -> Self {
        match e {
            ServingError::Storage(s) => s.into(),
            ServingError::Unmergeable(m) => ApiError::unprocessable("adapter_not_mergeable", m),
            other => ApiError::internal("loading the model", &other),
        }
    }
}

/// A model resolved for a request.
pub struct Resolved {
    /// The name the request used.
    pub name: String,
    pub base: Arc<LoadedBase>,
    pub served: ServedModel,
}

fn model_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("The model '{name}' does not exist or you do not have access to it."),
    )
    .param("model")
}

/// What a request's `model` names (see [`lookup`]).
pub enum Named {
    Base(storage::BaseModel),
    /// A hot-swapped adapter, with its base.
    Adapter {
        adapter: storage::Adapter,
        base: storage::BaseModel,
    },
    /// The merged model of an adapter, with the adapter's base.
    Merged {
        adapter: storage::Adapter,
        base: storage::BaseModel,
    },
}

impl Named {
    pub fn base(&self) -> &storage::BaseModel {
        match self {
            Named::Base(b) | Named::Adapter { base: b, .. } | Named::Merged { base: b, .. } => b,
        }
    }

    /// The task of the base model (text generation or image classification); 400 naming the
    /// endpoint to use when it is not `want`.
    pub fn require(&self, name: &str, want: trainer::model::Task) -> Result<(), ApiError> {
        let base = self.base();
        let task = trainer::model::detect(&base.config, std::path::Path::new(&base.id))
            .map(|f| f.task())
            .map_err(|e| ApiError::internal("reading the base model's config", &e))?;
        if task == want {
            return Ok(());
        }
        let (is, use_) = match task {
            trainer::model::Task::CausalLm => ("a language model", "/v1/completions or /v1/scores"),
            trainer::model::Task::ImageClassification => {
                ("an image classifier", "/v1/classifications")
            }
        };
        Err(ApiError::bad_request(
            "model_not_supported",
            format!("'{name}' is {is}; use {use_}"),
        )
        .param("model"))
    }
}

/// Looks up `model`: a base model id, a fine-tuned model name (`ft:…`), an adapter id of
/// this tenant, either of those as `<base>:<adapter>`, or a merged model (`merged:…`).
/// Another tenant's adapter is as absent as an unknown one (404).
pub async fn lookup(state: &AppState, tenant: &Tenant, name: &str) -> Result<Named, ApiError> {
    let not_found = |e: storage::Error| match e {
        storage::Error::NotFound { .. } => model_not_found(name),
        other => other.into(),
    };
    let base_of = |a: &storage::Adapter| {
        let id = a.base_model.clone();
        async move {
            state.db.get_base_model(&id).await.map_err(|e| match e {
                storage::Error::NotFound { .. } => ApiError::new(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!("the base model '{id}' of '{name}' is no longer registered"),
                )
                .param("model"),
                other => other.into(),
            })
        }
    };
    if let Some(rest) = name.strip_prefix(crate::serving::MERGED_PREFIX) {
        let adapter = match state
            .db
            .get_adapter_by_name(&tenant.id, &format!("ft:{rest}"))
            .await
        {
            Ok(a) => a,
            Err(storage::Error::NotFound { .. }) => state
                .db
                .get_adapter(&tenant.id, rest)
                .await
                .map_err(not_found)?,
            Err(e) => return Err(e.into()),
        };
        let base = base_of(&adapter).await?;
        return Ok(Named::Merged { adapter, base });
    }
    // `<base>:<adapter>` (base ids have no ':'): the adapter must be made for that base.
    let (wanted_base, adapter_ref) = match name.split_once(':') {
        Some((b, rest)) if b != "ft" => (Some(b), rest),
        _ => (None, name),
    };
    let a = if adapter_ref.starts_with("ft:") {
        state
            .db
            .get_adapter_by_name(&tenant.id, adapter_ref)
            .await
            .map_err(not_found)?
    } else {
        match state.db.get_base_model(adapter_ref).await {
            Ok(m) if wanted_base.is_none() => return Ok(Named::Base(m)),
            Ok(_) | Err(storage::Error::NotFound { .. }) => state
                .db
                .get_adapter(&tenant.id, adapter_ref)
                .await
                .map_err(not_found)?,
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(b) = wanted_base
        && b != a.base_model
    {
        return Err(ApiError::unprocessable(
            "adapter_base_mismatch",
            format!(
                "adapter '{adapter_ref}' was trained on base model '{}', not '{b}'",
                a.base_model
            ),
        )
        .param("model"));
    }
    let base = base_of(&a).await?;
    Ok(Named::Adapter { adapter: a, base })
}

/// Resolves `model` (see [`lookup`]) to a language model ready to run.
pub async fn resolve(state: &AppState, tenant: &Tenant, name: &str) -> Result<Resolved, ApiError> {
    let engine = &state.serving;
    let named = lookup(state, tenant, name).await?;
    named.require(name, trainer::model::Task::CausalLm)?;
    let base = engine.base(named.base(), &state.blobs).await?;
    let served = match &named {
        Named::Base(_) => ServedModel::base(&base),
        Named::Adapter { adapter, .. } => {
            ServedModel::adapter(engine.adapter(&base, adapter, &state.blobs).await?)
        }
        Named::Merged { adapter, .. } => {
            let Some(m) = engine.merged(adapter, &state.blobs).await? else {
                return Err(not_merged(name, adapter));
            };
            ServedModel::adapter(m)
        }
    };
    Ok(Resolved {
        name: name.to_string(),
        served,
        base,
    })
}

/// 404 for a `merged:` name whose adapter has not been merged.
pub fn not_merged(name: &str, adapter: &storage::Adapter) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "'{name}' has not been merged yet: POST /v1/adapters/{}/merge first",
            adapter.id
        ),
    )
    .param("model")
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The request body (OpenAI's fields; those molt does not implement are refused when set
/// to anything but their neutral value).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of such lists.
    pub prompt: Value,
    #[serde(default, deserialize_with = "integer::opt_i64")]
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "integer::opt_i64")]
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "integer::opt_i64")]
    pub logprobs: Option<i64>,
    /// A string or up to 4 strings.
    pub stop: Option<Value>,
    #[serde(default, deserialize_with = "integer::opt_i64")]
    pub seed: Option<i64>,
    pub echo: Option<bool>,
    #[serde(default, deserialize_with = "integer::opt_i64")]
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
}

/// Checked generation settings.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub n: usize,
    pub logprobs: Option<usize>,
    pub stop: Vec<String>,
    pub seed: u64,
}

fn bad(param: &str, code: &'static str, msg: String) -> ApiError {
    ApiError::bad_request(code, msg).param(param)
}

impl CompletionRequest {
    /// Checks the sampling parameters against OpenAI's ranges and molt's limits.
    pub fn sampling(&self, max_new_tokens: usize) -> Result<Sampling, ApiError> {
        let max_tokens = self.max_tokens.unwrap_or(16);
        if max_tokens < 1 || max_tokens as u64 > max_new_tokens as u64 {
            return Err(bad(
                "max_tokens",
                "invalid_max_tokens",
                format!("max_tokens must be between 1 and {max_new_tokens}, got {max_tokens}"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(bad(
                "temperature",
                "invalid_temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad(
                "top_p",
                "invalid_top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=128).contains(&n) {
            return Err(bad(
                "n",
                "invalid_n",
                format!("n must be between 1 and 128, got {n}"),
            ));
        }
        let logprobs = match self.logprobs {
            None => None,
            Some(k) if (0..=5).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(bad(
                    "logprobs",
                    "invalid_logprobs",
                    format!("logprobs must be between 0 and 5, got {k}"),
                ));
            }
        };
        let stop = parse_stop(self.stop.as_ref())?;
        let unsupported = |param: &str, what: &str| {
            Err(bad(
                param,
                "unsupported_parameter",
                format!("{param} {what} is not supported by molt"),
            ))
        };
        if self.echo == Some(true) {
            return unsupported("echo", "= true");
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return unsupported("best_of", "other than 1");
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return unsupported("suffix", "(insertion)");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return unsupported("presence_penalty", "other than 0");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return unsupported("frequency_penalty", "other than 0");
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|b| b.as_object().is_none_or(|o| !o.is_empty()))
        {
            return unsupported("logit_bias", "(non-empty)");
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random::<u64>(),
        };
        Ok(Sampling {
            max_tokens: max_tokens as usize,
            temperature,
            top_p,
            n: n as usize,
            logprobs,
            stop,
            seed,
        })
    }
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let err = |m: String| bad("stop", "invalid_stop", m);
    let stops: Vec<String> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("stop[{i}] must be a string, found {s}")))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(err(format!(
                "stop must be a string or a list of up to 4 strings, found {other}"
            )));
        }
    };
    if stops.len() > 4 {
        return Err(err(format!(
            "stop has {} sequences; at most 4 are allowed",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(err("stop sequences must not be empty".into()));
    }
    Ok(stops)
}

/// The prompts as token ids, checked against the vocabulary and `max_prompt_tokens`.
pub fn tokenize_prompts(
    prompt: &Value,
    base: &LoadedBase,
    max_prompt_tokens: usize,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let err = |m: String| bad("prompt", "invalid_prompt", m);
    let tok = &base.tokenizer;
    let encode = |s: &str| {
        tok.encode(s)
            .map_err(|e| err(format!("the prompt could not be tokenized: {e}")))
    };
    let ids_of = |a: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(j, v)| {
                v.as_number()
                    .and_then(integer::to_u64)
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| err(format!("{at}[{j}] must be a token id, found {v}")))
            })
            .collect()
    };
    let prompts: Vec<Vec<u32>> = match prompt {
        Value::String(s) => vec![encode(s)?],
        Value::Array(a) if a.is_empty() => return Err(err("prompt is an empty list".into())),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| encode(s.as_str().unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        Value::Array(a) if a.iter().all(Value::is_number) => vec![ids_of(a, "prompt")?],
        Value::Array(a) if a.iter().all(Value::is_array) => a
            .iter()
            .enumerate()
            .map(|(i, p)| {
                ids_of(
                    p.as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &format!("prompt[{i}]"),
                )
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(err(format!(
                "prompt must be a string, a list of strings, a list of token ids or a list of \
                 such lists; found {}",
                kind_of(other)
            )));
        }
    };
    let vocab = base.model.vocab_size();
    let (eos, _) = base.special_tokens();
    let mut out = Vec::with_capacity(prompts.len());
    for (i, mut p) in prompts.into_iter().enumerate() {
        if p.is_empty() {
            // As training does for an empty prompt: generation starts after an EOS.
            match eos.first() {
                Some(&e) => p.push(e),
                None => return Err(err(format!("prompt {i} has no tokens"))),
            }
        }
        if let Some(t) = p.iter().find(|t| **t as usize >= vocab) {
            // Valid by the document (any u32); the model's vocabulary refuses it (400, as
            // OpenAI answers an invalid token id).
            return Err(ApiError::bad_request(
                "invalid_prompt",
                format!("prompt {i}: token id {t} is out of range for a vocabulary of {vocab}"),
            )
            .param("prompt"));
        }
        if p.len() > max_prompt_tokens {
            // 400, as OpenAI: clients match this code on their BadRequestError.
            return Err(ApiError::bad_request(
                "context_length_exceeded",
                format!(
                    "prompt {i} has {} tokens; this server accepts at most {max_prompt_tokens}",
                    p.len()
                ),
            )
            .param("prompt"));
        }
        out.push(p);
    }
    Ok(out)
}

/// The work a request asks for — sequences (prompts × n) and tokens to generate — within
/// the server's limits, checked before the model is touched.
fn check_request_size(
    prompt: &Value,
    sampling: &Sampling,
    limits: &RequestLimits,
) -> Result<(), ApiError> {
    // A list of strings or of token-id lists is several prompts; anything else is one.
    let prompts = match prompt {
        Value::Array(a) if a.iter().all(|p| p.is_string() || p.is_array()) => a.len().max(1),
        _ => 1,
    };
    let sequences = prompts.saturating_mul(sampling.n);
    if sequences > limits.max_completion_sequences {
        return Err(too_large(
            "prompt",
            "the number of sequences to generate (prompts × n)",
            sequences,
            limits.max_completion_sequences,
            "--max-completion-sequences",
        ));
    }
    let tokens = sequences.saturating_mul(sampling.max_tokens);
    if tokens > limits.max_completion_tokens {
        return Err(too_large(
            "max_tokens",
            "the number of tokens to generate (prompts × n × max_tokens)",
            tokens,
            limits.max_completion_tokens,
            "--max-completion-tokens",
        ));
    }
    Ok(())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list of mixed types",
        Value::Object(_) => "an object",
    }
}

/// OpenAI's legacy `logprobs` object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Logprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

impl Logprobs {
    fn extend(&mut self, o: Logprobs) {
        self.tokens.extend(o.tokens);
        self.token_logprobs.extend(o.token_logprobs);
        self.top_logprobs.extend(o.top_logprobs);
        self.text_offset.extend(o.text_offset);
    }
}

/// One choice of the answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// The answer (and, with one choice and no usage, each streamed chunk).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Token ids → text, holding back what could still turn into a stop sequence (or is an
/// incomplete UTF-8 character).
struct TextStream {
    tokenizer: Arc<Tokenizer>,
    stops: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    emitted: usize,
}

impl TextStream {
    fn text(&self) -> String {
        self.tokenizer.decode(&self.ids, true).unwrap_or_default()
    }

    /// Adds a token; returns the new text and whether a stop sequence ended the text.
    fn push(&mut self, id: u32) -> (String, bool) {
        self.ids.push(id);
        let text = self.text();
        let from = self.emitted.min(text.len());
        let window_start = self
            .stops
            .iter()
            .map(String::len)
            .max()
            .map_or(from, |m| from.saturating_sub(m));
        let start = (0..=window_start)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| text[start..].find(s.as_str()).map(|p| p + start))
            .min();
        if let Some(at) = hit {
            let delta = text.get(from..at.max(from)).unwrap_or_default().to_string();
            self.emitted = at.max(from);
            return (delta, true);
        }
        // Hold back a tail that is a prefix of some stop sequence, and a broken character.
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if text[..safe].ends_with(&s[..k]) {
                    safe = safe.min(text.len() - k);
                    break;
                }
            }
        }
        let safe = safe.max(from);
        let delta = text.get(from..safe).unwrap_or_default().to_string();
        self.emitted = safe;
        (delta, false)
    }

    /// The rest of the text at the end of generation.
    fn flush(&mut self) -> String {
        let text = self.text();
        let delta = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        delta
    }
}

/// What one sequence produced.
struct SeqOutput {
    text: String,
    logprobs: Option<Logprobs>,
    finish_reason: &'static str,
    tokens: usize,
}

/// A piece of a sequence's output, for streaming.
struct Piece {
    text: String,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
}

/// Where a streamed sequence's pieces go: its choice index in the shared event channel.
struct Sink {
    tx: mpsc::Sender<Event>,
    meta: Arc<ChunkMeta>,
    index: usize,
}

/// What every chunk of one answer repeats.
struct ChunkMeta {
    id: String,
    created: i64,
    model: String,
}

impl ChunkMeta {
    fn event(&self, choices: Vec<Choice>, usage: Option<Usage>) -> Event {
        let c = Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        Event::default().data(serde_json::to_string(&c).unwrap_or_default())
    }
}

impl Sink {
    /// Sends a piece as a chunk; false when the client is gone.
    async fn send(&self, p: Piece) -> bool {
        if p.text.is_empty() && p.logprobs.is_none() && p.finish_reason.is_none() {
            return !self.tx.is_closed();
        }
        let ev = self.meta.event(
            vec![Choice {
                text: p.text,
                index: self.index,
                logprobs: p.logprobs,
                finish_reason: p.finish_reason.map(str::to_string),
            }],
            None,
        );
        self.tx.send(ev).await.is_ok()
    }
}

/// Consumes a sequence's events, streaming pieces to `sink` when there is one. Dropping
/// `rx` on return is what frees the sequence's slot early (stop sequence, client gone).
async fn drive(
    mut rx: mpsc::UnboundedReceiver<SeqEvent>,
    tokenizer: Arc<Tokenizer>,
    stops: Vec<String>,
    logprobs: Option<usize>,
    sink: Option<Sink>,
) -> Result<SeqOutput, String> {
    let mut ts = TextStream {
        tokenizer: tokenizer.clone(),
        stops,
        ids: Vec::new(),
        emitted: 0,
    };
    let mut out = SeqOutput {
        text: String::new(),
        logprobs: logprobs.map(|_| Logprobs::default()),
        finish_reason: "length",
        tokens: 0,
    };
    loop {
        let Some(ev) = rx.recv().await else {
            return Err("the generation ended unexpectedly".into());
        };
        match ev {
            SeqEvent::Token(t) => {
                out.tokens += 1;
                let offset = out.text.len();
                let (delta, stopped) = ts.push(t.id);
                let name = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
                let lp = logprobs.map(|_| Logprobs {
                    tokens: vec![name(t.id)],
                    token_logprobs: vec![t.logprob],
                    top_logprobs: vec![t.top.iter().map(|(id, lp)| (name(*id), *lp)).collect()],
                    text_offset: vec![offset],
                });
                out.text.push_str(&delta);
                if let (Some(all), Some(lp)) = (out.logprobs.as_mut(), lp.clone()) {
                    all.extend(lp);
                }
                if let Some(sink) = &sink {
                    let piece = Piece {
                        text: delta,
                        logprobs: lp,
                        finish_reason: stopped.then_some("stop"),
                    };
                    if !sink.send(piece).await {
                        return Err("the client went away".into());
                    }
                }
                if stopped {
                    out.finish_reason = "stop";
                    return Ok(out);
                }
            }
            SeqEvent::Done(f) => {
                let rest = ts.flush();
                out.text.push_str(&rest);
                out.finish_reason = match f {
                    Finish::Eos => "stop",
                    Finish::Length => "length",
                };
                if let Some(sink) = &sink {
                    sink.send(Piece {
                        text: rest,
                        logprobs: None,
                        finish_reason: Some(out.finish_reason),
                    })
                    .await;
                }
                return Ok(out);
            }
            SeqEvent::Failed(m) => return Err(m),
        }
    }
}

/// Submits every prompt × `n` to the scheduler; returns the receivers in choice order.
pub fn submit(
    state: &AppState,
    r: &Resolved,
    prompts: &[Vec<u32>],
    s: &Sampling,
) -> Result<Vec<mpsc::UnboundedReceiver<SeqEvent>>, ApiError> {
    let total = prompts.len() * s.n;
    let sched = &r.base.scheduler;
    if total > sched.capacity() {
        return Err(bad(
            "n",
            "too_many_sequences",
            format!(
                "{} prompt(s) × n = {total} sequences; this server runs at most {} per model",
                prompts.len(),
                sched.capacity()
            ),
        ));
    }
    let (eos, _) = r.base.special_tokens();
    let mut reqs = Vec::with_capacity(total);
    let mut rxs = Vec::with_capacity(total);
    for p in prompts {
        for j in 0..s.n {
            let (tx, rx) = mpsc::unbounded_channel();
            reqs.push(SeqRequest {
                model: r.served.clone(),
                prompt: p.clone(),
                params: SeqParams {
                    max_tokens: s.max_tokens,
                    temperature: s.temperature,
                    top_p: s.top_p,
                    // Choice j of a prompt draws from seed + j: choice 0 reproduces a lone
                    // request with the same seed.
                    seed: s.seed.wrapping_add(j as u64),
                    logprobs: s.logprobs,
                    eos: eos.clone(),
                },
                tx,
            });
            rxs.push(rx);
        }
    }
    if sched.submit(reqs).is_err() {
        state
            .serving
            .stats
            .rejected
            .fetch_add(total as u64, Ordering::Relaxed);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!(
                "model '{}' is at capacity ({} sequences running or queued); retry shortly",
                r.name,
                sched.capacity()
            ),
        );
        e.retry_after = Some(1);
        return Err(e);
    }
    Ok(rxs)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `POST /v1/completions`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let cfg = &state.config.serving;
    let sampling = req.sampling(cfg.max_new_tokens)?;
    check_request_size(&req.prompt, &sampling, &state.config.limits)?;
    let resolved = resolve(&state, &tenant, &req.model).await?;
    let prompts = tokenize_prompts(&req.prompt, &resolved.base, cfg.max_prompt_tokens)?;
    let rxs = submit(&state, &resolved, &prompts, &sampling)?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let tokenizer = resolved.base.tokenizer.clone();
    let model = resolved.name.clone();
    // The request keeps its adapter pinned until every sequence is done.
    let pin = resolved.served.pin.clone();

    if req.stream != Some(true) {
        let futs = rxs.into_iter().map(|rx| {
            drive(
                rx,
                tokenizer.clone(),
                sampling.stop.clone(),
                sampling.logprobs,
                None,
            )
        });
        let outs = futures::future::join_all(futs).await;
        drop(pin);
        let mut choices = Vec::with_capacity(outs.len());
        let mut completion_tokens = 0;
        for (index, o) in outs.into_iter().enumerate() {
            let o = o.map_err(|m| ApiError::internal("generating", &m))?;
            completion_tokens += o.tokens;
            choices.push(Choice {
                text: o.text,
                index,
                logprobs: o.logprobs,
                finish_reason: Some(o.finish_reason.to_string()),
            });
        }
        return Ok(Json(Completion {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices,
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            }),
        })
        .into_response());
    }

    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let (tx, rx) = mpsc::channel::<Event>(64);
    let meta = Arc::new(ChunkMeta { id, created, model });
    let stops = sampling.stop.clone();
    let logprobs = sampling.logprobs;
    tokio::spawn(async move {
        let _pin = pin;
        let futs = rxs.into_iter().enumerate().map(|(index, seq_rx)| {
            let sink = Sink {
                tx: tx.clone(),
                meta: meta.clone(),
                index,
            };
            drive(
                seq_rx,
                tokenizer.clone(),
                stops.clone(),
                logprobs,
                Some(sink),
            )
        });
        let outs = futures::future::join_all(futs).await;
        let mut completion_tokens = 0;
        for o in outs {
            match o {
                Ok(o) => completion_tokens += o.tokens,
                Err(m) => {
                    if !tx.is_closed() {
                        tracing::warn!(error = %m, "a streamed completion failed");
                        let body = ApiError::internal("generating", &m).body();
                        let _ = tx
                            .send(Event::default().data(String::from_utf8_lossy(&body)))
                            .await;
                    }
                    return;
                }
            }
        }
        if include_usage {
            let usage = Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            };
            let _ = tx.send(meta.event(Vec::new(), Some(usage))).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stream(stops: &[&str]) -> (TextStream, Vec<u32>, String) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer");
        let text = "Elizabeth said that Mr. Darcy was proud.";
        let ids = tok.encode(text).expect("encode");
        let full = tok.decode(&ids, true).expect("decode");
        let ts = TextStream {
            tokenizer: Arc::new(tok),
            stops: stops.iter().map(|s| s.to_string()).collect(),
            ids: Vec::new(),
            emitted: 0,
        };
        (ts, ids, full)
    }

    #[test]
    fn text_streams_cut_at_stop_sequences_and_hold_back_prefixes() {
        let (mut ts, ids, full) = stream(&[]);
        let mut got = String::new();
        for &id in &ids {
            let (d, stopped) = ts.push(id);
            assert!(!stopped);
            got.push_str(&d);
        }
        got.push_str(&ts.flush());
        assert_eq!(got, full);

        let (mut ts, ids, full) = stream(&[" Mr.", "zzz"]);
        let cut = &full[..full.find(" Mr.").expect("stop in text")];
        let mut got = String::new();
        let mut stopped = false;
        for &id in &ids {
            let (d, s) = ts.push(id);
            got.push_str(&d);
            // Nothing after the cut is ever handed out, not even the stop's first bytes.
            assert!(cut.starts_with(&got), "{got:?} is not a prefix of {cut:?}");
            if s {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(got, cut);
    }

    #[test]
    fn stop_parsing() {
        assert_eq!(parse_stop(None).unwrap(), Vec::<String>::new());
        assert_eq!(parse_stop(Some(&json!("\n"))).unwrap(), vec!["\n"]);
        assert!(parse_stop(Some(&json!(["a", "b", "c", "d", "e"]))).is_err());
        assert!(parse_stop(Some(&json!([""]))).is_err());
        assert!(parse_stop(Some(&json!(3))).is_err());
    }
}
