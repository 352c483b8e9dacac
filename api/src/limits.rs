//! Sizes a client controls, each bounded before any work starts: a request over a limit is
//! answered 400 (a single field too long or too large) or 413 (the work a whole request
//! asks for), naming the limit, its flag and the request's value. Every limit is a
//! `molt serve` flag with an env fallback (README "Limits", openapi.yaml). Limits that live
//! elsewhere: `--max-body-bytes`, `--max-upload-bytes` (state.rs), `--max-prompt-tokens`
//! and `--max-new-tokens` (serving), the training hyperparameters' ranges (training.rs).

use axum::http::StatusCode;
use serde_json::Value;

use crate::error::ApiError;

/// Request-size limits (flattened into `molt serve`'s flags).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Most items in one `/v1/scores` request.
    #[arg(long, env = "MOLT_MAX_SCORE_ITEMS", default_value_t = 1024)]
    pub max_score_items: usize,

    /// Most choices of one scored item.
    #[arg(long, env = "MOLT_MAX_SCORE_CHOICES", default_value_t = 64)]
    pub max_score_choices: usize,

    /// Most tokens one `/v1/scores` request runs through the model (context + choice,
    /// summed over every choice of every item).
    #[arg(long, env = "MOLT_MAX_SCORE_TOKENS", default_value_t = 32768)]
    pub max_score_tokens: usize,

    /// Most sequences one `/v1/completions` request generates (prompts × n).
    #[arg(long, env = "MOLT_MAX_COMPLETION_SEQUENCES", default_value_t = 128)]
    pub max_completion_sequences: usize,

    /// Most tokens one `/v1/completions` request may generate (prompts × n × max_tokens).
    #[arg(long, env = "MOLT_MAX_COMPLETION_TOKENS", default_value_t = 65536)]
    pub max_completion_tokens: usize,

    /// Longest name a client gives (tenant, API key and uploaded file names), in characters.
    #[arg(long, env = "MOLT_MAX_NAME_CHARS", default_value_t = 256)]
    pub max_name_chars: usize,

    /// Most images one `/v1/classifications` request classifies.
    #[arg(long, env = "MOLT_MAX_CLASSIFICATION_IMAGES", default_value_t = 64)]
    pub max_classification_images: usize,

    /// Largest encoded image a `/v1/classifications` request sends, in bytes.
    #[arg(long, env = "MOLT_MAX_IMAGE_BYTES", default_value_t = 16 << 20)]
    pub max_image_bytes: usize,

    /// Most pixels (width × height, from the image header) of one classified image.
    #[arg(long, env = "MOLT_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_score_items: 1024,
            max_score_choices: 64,
            max_score_tokens: 32768,
            max_completion_sequences: 128,
            max_completion_tokens: 65536,
            max_name_chars: 256,
            max_classification_images: 64,
            max_image_bytes: 16 << 20,
            max_image_pixels: 40_000_000,
        }
    }
}

/// Longest `source` of a model registration (a path or URL), in characters.
pub const MAX_SOURCE_CHARS: usize = 4096;

/// Most key-value pairs of a job's `metadata` (OpenAI's limit).
pub const MAX_METADATA_PAIRS: usize = 16;
/// Longest `metadata` key, in characters (OpenAI's limit).
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// Longest `metadata` value, in characters (OpenAI's limit).
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

/// 413 for a request whose total work is over `limit` (`flag` names the setting).
pub fn too_large(param: &str, what: &str, value: usize, limit: usize, flag: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!(
            "{what} is {value}; this server accepts at most {limit} ({flag} / {})",
            env_of(flag)
        ),
    )
    .param(param)
}

/// The env variable of a `--flag` (`--max-score-tokens` → `MOLT_MAX_SCORE_TOKENS`).
fn env_of(flag: &str) -> String {
    format!(
        "MOLT_{}",
        flag.trim_start_matches('-')
            .replace('-', "_")
            .to_uppercase()
    )
}

/// Checks a client-given name: 1 to `max` characters, no control characters.
pub fn check_name(param: &str, name: &str, max: usize) -> Result<(), ApiError> {
    let chars = name.chars().count();
    let bad = |m: String| ApiError::bad_request("invalid_name", m).param(param);
    if name.trim().is_empty() {
        return Err(bad(format!("{param} must not be empty")));
    }
    if chars > max {
        return Err(bad(format!(
            "{param} has {chars} characters; this server accepts at most {max} \
             (--max-name-chars / MOLT_MAX_NAME_CHARS)"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(bad(format!("{param} must not contain control characters")));
    }
    Ok(())
}

/// Checks OpenAI's `metadata`: null or an object of at most 16 string values, keys up to
/// 64 and values up to 512 characters.
pub fn check_metadata(metadata: Option<&Value>) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_metadata", m).param("metadata");
    let map = match metadata {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("metadata must be an object of strings".into())),
    };
    if map.len() > MAX_METADATA_PAIRS {
        return Err(bad(format!(
            "metadata has {} keys; at most {MAX_METADATA_PAIRS} are accepted",
            map.len()
        )));
    }
    for (k, v) in map {
        let kc = k.chars().count();
        if kc > MAX_METADATA_KEY_CHARS {
            return Err(bad(format!(
                "metadata key of {kc} characters; at most {MAX_METADATA_KEY_CHARS} are accepted"
            )));
        }
        let Some(s) = v.as_str() else {
            return Err(bad(format!("metadata['{k}'] must be a string")));
        };
        let vc = s.chars().count();
        if vc > MAX_METADATA_VALUE_CHARS {
            return Err(bad(format!(
                "metadata['{k}'] has {vc} characters; at most {MAX_METADATA_VALUE_CHARS} are \
                 accepted"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_bounded() {
        assert!(check_name("name", "acme", 8).is_ok());
        assert!(check_name("name", "ééééé", 5).is_ok());
        let e = check_name("name", "abcdefghi", 8).expect_err("too long");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("9 characters") && e.message.contains("at most 8"));
        assert!(check_name("name", "  ", 8).is_err());
        assert!(check_name("name", "a\nb", 8).is_err());
    }

    #[test]
    fn metadata_follows_openai_limits() {
        assert!(check_metadata(None).is_ok());
        assert!(check_metadata(Some(&json!({"team": "a"}))).is_ok());
        assert!(check_metadata(Some(&json!({"n": 1}))).is_err());
        assert!(check_metadata(Some(&json!([1]))).is_err());
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(check_metadata(Some(&Value::Object(many))).is_err());
        assert!(check_metadata(Some(&json!({"k": "v".repeat(513)}))).is_err());
        assert!(check_metadata(Some(&json!({"k".repeat(65): "v"}))).is_err());
    }

    #[test]
    fn too_large_names_the_flag_and_env() {
        let e = too_large("items", "the token count", 9, 8, "--max-score-tokens");
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("MOLT_MAX_SCORE_TOKENS"), "{}", e.message);
        assert!(e.message.contains("is 9") && e.message.contains("at most 8"));
    }
}
