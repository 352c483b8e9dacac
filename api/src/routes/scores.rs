//! `POST /v1/scores`: multiple-choice scoring, the papers' evaluation protocol. For each
//! item, every choice is appended to the context and scored by the summed log-likelihood of
//! its tokens; the chosen index is the highest (ties: the first). The numbers are those of
//! the training code's validation accuracy (`trainer::train::engine::score_choice_sets`),
//! on the same model a completion would use (base, hot-swapped adapter).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use trainer::train::data::Encoder;
use trainer::train::engine::{argmax, score_choice_sets};

use super::completions::resolve;
use crate::auth::Tenant;
use crate::error::{ApiError, Json};
use crate::limits::too_large;
use crate::serving::{ServingError, blocking};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreItem {
    pub context: String,
    /// Appended to the context as they are: include the leading space a choice needs.
    pub choices: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub model: String,
    pub items: Vec<ScoreItem>,
    /// Sequences per forward pass (default 8).
    #[serde(default, deserialize_with = "super::integer::opt_i64")]
    pub batch_size: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChoiceScore {
    pub index: usize,
    /// Summed log-probability of the choice's tokens given the context.
    pub logprob: f64,
    /// How many tokens were scored.
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ItemScore {
    pub index: usize,
    pub object: String,
    pub choices: Vec<ChoiceScore>,
    /// The index of the most likely choice.
    pub chosen: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreResponse {
    pub object: String,
    pub model: String,
    pub data: Vec<ItemScore>,
    pub usage: ScoreUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreUsage {
    /// Tokens run through the model (context + choice, per choice).
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /v1/scores`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    Json(req): Json<ScoreRequest>,
) -> Result<Json<ScoreResponse>, ApiError> {
    let limits = &state.config.limits;
    if req.items.is_empty() {
        return Err(
            ApiError::bad_request("invalid_items", "items must not be empty").param("items"),
        );
    }
    if req.items.len() > limits.max_score_items {
        return Err(too_large(
            "items",
            "the number of items",
            req.items.len(),
            limits.max_score_items,
            "--max-score-items",
        ));
    }
    for (i, it) in req.items.iter().enumerate() {
        if it.choices.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_choices",
                format!("items[{i}].choices must not be empty"),
            )
            .param(format!("items[{i}].choices")));
        }
        if let Some(j) = it.choices.iter().position(String::is_empty) {
            return Err(ApiError::bad_request(
                "invalid_choices",
                format!("items[{i}].choices[{j}] is empty"),
            )
            .param(format!("items[{i}].choices[{j}]")));
        }
        if it.choices.len() > limits.max_score_choices {
            return Err(too_large(
                &format!("items[{i}].choices"),
                &format!("the number of choices of items[{i}]"),
                it.choices.len(),
                limits.max_score_choices,
                "--max-score-choices",
            ));
        }
    }
    let batch = req.batch_size.unwrap_or(8);
    let Some(batch) = usize::try_from(batch)
        .ok()
        .filter(|b| (1..=256).contains(b))
    else {
        return Err(ApiError::bad_request(
            "invalid_batch_size",
            format!("batch_size must be between 1 and 256, got {batch}"),
        )
        .param("batch_size"));
    };
    let r = resolve(&state, &tenant, &req.model).await?;
    let max_tokens = state.config.serving.max_prompt_tokens;
    let (eos, pad) = r.base.special_tokens();
    let enc = Encoder {
        tokenizer: &r.base.tokenizer,
        // Never truncate: an over-long item is refused below instead.
        max_len: usize::MAX / 2,
        eos: eos.first().copied(),
    };
    let mut sets = Vec::with_capacity(req.items.len());
    let mut prompt_tokens = 0;
    for (i, it) in req.items.iter().enumerate() {
        // Valid by the document, refused by this model's tokenizer.
        let set = enc.choice_set(&it.context, &it.choices, 0).map_err(|m| {
            ApiError::unprocessable("invalid_item", format!("items[{i}]: {m}"))
                .param(format!("items[{i}]"))
        })?;
        for (c, ex) in set.choices.iter().enumerate() {
            if ex.ids.len() > max_tokens {
                // 400, the status /v1/completions gives this code (OpenAI's).
                return Err(ApiError::bad_request(
                    "context_length_exceeded",
                    format!(
                        "items[{i}] with choice {c} has {} tokens; this server accepts at most \
                         {max_tokens}",
                        ex.ids.len()
                    ),
                )
                .param(format!("items[{i}]")));
            }
            prompt_tokens += ex.ids.len();
        }
        sets.push(set);
    }
    if prompt_tokens > limits.max_score_tokens {
        return Err(too_large(
            "items",
            "the number of tokens to score (context + choice, summed over every choice)",
            prompt_tokens,
            limits.max_score_tokens,
            "--max-score-tokens",
        ));
    }
    let model = r.served.model.clone();
    let pin = r.served.pin.clone();
    let init = r.served.initial_state.clone();
    let scores = blocking(move || {
        let _pin = pin;
        let device = model.device().clone();
        score_choice_sets(model.as_ref(), &sets, batch, pad, &device, init.as_deref())
            .map_err(|e| ServingError::Load(format!("scoring: {e}")))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "scoring_failed",
            e.to_string(),
        )
    })?;
    let data = scores
        .into_iter()
        .enumerate()
        .map(|(index, sc)| {
            let sums: Vec<f64> = sc.iter().map(|s| s.0).collect();
            ItemScore {
                index,
                object: "score".into(),
                chosen: argmax(&sums).unwrap_or(0),
                choices: sc
                    .into_iter()
                    .enumerate()
                    .map(|(index, (logprob, tokens))| ChoiceScore {
                        index,
                        logprob,
                        tokens,
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Json(ScoreResponse {
        object: "list".into(),
        model: r.name,
        data,
        usage: ScoreUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}
