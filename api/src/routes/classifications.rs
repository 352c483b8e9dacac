//! `POST /v1/classifications`: image classification on a vision base model, a fine-tuned
//! model (hot-swapped onto the shared base) or a merged model, named as for completions.
//!
//! OpenAI has no image-classification endpoint; the name follows its plural-noun routes
//! (`/v1/completions`, `/v1/embeddings`) and the shape its list responses: `images` in,
//! one `data` entry per image out with the `top_k` classes `{label, index, probability}`,
//! labels being the class names of the training file. Images are base64 or data URLs,
//! decoded and preprocessed here (the model's evaluation transform) with their byte and
//! pixel counts bounded before decoding; the model work runs on the base's batcher thread,
//! where concurrent requests for the same model share forward passes.

use axum::extract::State;
use axum::http::StatusCode;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trainer::train::images::source::{ImageLimits, decode_image, decode_image_string};

use super::completions::{Named, lookup, not_merged};
use crate::auth::Tenant;
use crate::error::{ApiError, Json};
use crate::limits::too_large;
use crate::serving::vision::{ClassifyError, LoadedClassifier, top_k};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub model: String,
    /// One image or a list: base64, or `data:image/…;base64,…`.
    pub images: Value,
    /// Classes returned per image, most likely first (default 5, at most the class count).
    pub top_k: Option<Value>,
    /// Echoed by OpenAI-style clients; ignored.
    pub user: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub index: usize,
    pub probability: f32,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageResult {
    pub object: String,
    pub index: usize,
    pub predictions: Vec<Prediction>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub images: usize,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassifyResponse {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub data: Vec<ImageResult>,
    pub usage: Usage,
}

const DEFAULT_TOP_K: usize = 5;

fn bad(code: &'static str, param: &str, message: String) -> ApiError {
    ApiError::bad_request(code, message).param(param)
}

/// The request's images as strings, bounded in count and size before decoding.
fn image_strings<'a>(v: &'a Value, state: &AppState) -> Result<Vec<&'a str>, ApiError> {
    let limits = &state.config.limits;
    let list: Vec<&Value> = match v {
        Value::String(_) => vec![v],
        Value::Array(a) => a.iter().collect(),
        other => {
            return Err(bad(
                "invalid_images",
                "images",
                format!("images must be a base64 string or a list of them, got {other}"),
            ));
        }
    };
    if list.is_empty() {
        return Err(bad(
            "invalid_images",
            "images",
            "images must not be empty".into(),
        ));
    }
    if list.len() > limits.max_classification_images {
        return Err(too_large(
            "images",
            "the number of images",
            list.len(),
            limits.max_classification_images,
            "--max-classification-images",
        ));
    }
    // base64 is 4/3 of the bytes; a data URL adds a short header.
    let max_chars = limits.max_image_bytes / 3 * 4 + 256;
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) if s.len() > max_chars => Err(too_large(
                &format!("images[{i}]"),
                "an image's base64 length",
                s.len(),
                max_chars,
                "--max-image-bytes",
            )),
            Value::String(s) => Ok(s.as_str()),
            other => Err(bad(
                "invalid_images",
                &format!("images[{i}]"),
                format!("images[{i}] must be a base64 string or a data URL, got {other}"),
            )),
        })
        .collect()
}

/// `POST /v1/classifications`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    Json(req): Json<ClassifyRequest>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let images = image_strings(&req.images, &state)?;
    let top_k_req = match &req.top_k {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_number().and_then(super::integer::to_u64) {
            Some(k) if k >= 1 => Some(k as usize),
            _ => {
                return Err(bad(
                    "invalid_top_k",
                    "top_k",
                    format!("top_k must be a positive integer, got {v}"),
                ));
            }
        },
    };
    let named = lookup(&state, &tenant, &req.model).await?;
    named.require(&req.model, trainer::model::Task::ImageClassification)?;
    let engine = &state.serving;
    let base = engine.vision_base(named.base(), &state.blobs).await?;
    let model: std::sync::Arc<LoadedClassifier> = match &named {
        Named::Base(_) => base.own.clone(),
        Named::Adapter { adapter, .. } => engine.classifier(&base, adapter, &state.blobs).await?,
        Named::Merged { adapter, .. } => engine
            .merged_classifier(adapter, &state.blobs)
            .await?
            .ok_or_else(|| not_merged(&req.model, adapter))?,
    };
    let classes = model.classes.len();
    let k = match top_k_req {
        None => DEFAULT_TOP_K.min(classes),
        Some(k) if k <= classes => k,
        Some(k) => {
            return Err(bad(
                "invalid_top_k",
                "top_k",
                format!("top_k is {k}; '{}' has {classes} classes", req.model),
            ));
        }
    };

    // Decode and preprocess off the async workers; each image bounded by its header first.
    let limits = ImageLimits {
        max_image_bytes: state.config.limits.max_image_bytes as u64,
        max_pixels: state.config.limits.max_image_pixels,
        ..ImageLimits::default()
    };
    let owned: Vec<String> = images.iter().map(|s| s.to_string()).collect();
    let transform = base.transform.clone();
    let pixels = tokio::task::spawn_blocking(move || -> Result<Tensor, ApiError> {
        let mut out = Vec::with_capacity(owned.len());
        for (i, s) in owned.iter().enumerate() {
            let param = format!("images[{i}]");
            let bytes = decode_image_string(s)
                .map_err(|m| bad("invalid_image", &param, format!("{param}: {m}")))?;
            if bytes.len() as u64 > limits.max_image_bytes {
                return Err(too_large(
                    &param,
                    "an image's size in bytes",
                    bytes.len(),
                    limits.max_image_bytes as usize,
                    "--max-image-bytes",
                ));
            }
            let img = decode_image(&bytes, &limits)
                .map_err(|m| bad("invalid_image", &param, format!("{param}: {m}")))?;
            let t = transform
                .apply(&img, &Device::Cpu)
                .map_err(|e| bad("invalid_image", &param, format!("{param}: {e}")))?;
            out.push(t);
        }
        Tensor::stack(&out, 0).map_err(|e| ApiError::internal("batching the images", &e))
    })
    .await
    .map_err(|e| ApiError::internal("decoding the images", &e))??;

    let probs = base
        .batcher
        .classify(&model, pixels)
        .await
        .map_err(|e| match e {
            ClassifyError::Busy => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "server_busy", e.to_string())
            }
            ClassifyError::Failed(m) => ApiError::internal("classifying", &m),
        })?;
    let data = probs
        .iter()
        .enumerate()
        .map(|(index, p)| ImageResult {
            object: "classification".into(),
            index,
            predictions: top_k(p, k)
                .into_iter()
                .map(|(c, probability)| Prediction {
                    label: model
                        .classes
                        .get(c)
                        .cloned()
                        .unwrap_or_else(|| c.to_string()),
                    index: c,
                    probability,
                })
                .collect(),
        })
        .collect();
    Ok(Json(ClassifyResponse {
        id: format!("clf-{}", uuid::Uuid::new_v4().simple()),
        object: "list".into(),
        created: now_secs(),
        model: req.model,
        data,
        usage: Usage {
            images: images.len(),
        },
    }))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
