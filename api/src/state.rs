//! The handlers' shared state (`State<AppState>`): database, blob store, limits, metrics.

use std::sync::Arc;
use std::time::Duration;

use storage::{BlobStore, Db};

use crate::limits::RequestLimits;
use crate::metrics::Metrics;
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::serving::{Engine, ServingConfig};

/// Limits and settings of the HTTP side.
#[derive(Clone)]
pub struct ApiConfig {
    /// Bearer token for the admin routes; `None` disables them.
    pub admin_token: Option<String>,
    /// Largest accepted dataset upload, in bytes (413 above).
    pub max_upload_bytes: u64,
    /// Largest accepted JSON body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Time limit for a request (uploads have their own).
    pub request_timeout: Duration,
    /// Time limit for one upload request.
    pub upload_timeout: Duration,
    /// Max attempts of a job before it is given up on.
    pub job_max_attempts: i64,
    /// How often an event stream (`stream=true`) looks for new events.
    pub event_poll_interval: Duration,
    /// Requests per API key and window on `/v1/…`.
    pub rate_limit: RateLimit,
    /// Completions and scoring: limits, adapter cache budget, batching.
    pub serving: ServingConfig,
    /// Sizes a client controls (scores, completions, names).
    pub limits: RequestLimits,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin token is a secret: never log it.
        f.debug_struct("ApiConfig")
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("upload_timeout", &self.upload_timeout)
            .field("job_max_attempts", &self.job_max_attempts)
            .field("rate_limit", &self.rate_limit)
            .field("serving", &self.serving)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            admin_token: None,
            max_upload_bytes: 2 * 1024 * 1024 * 1024,
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(3600),
            job_max_attempts: 3,
            event_poll_interval: Duration::from_millis(500),
            rate_limit: RateLimit::default(),
            serving: ServingConfig::default(),
            limits: RequestLimits::default(),
        }
    }
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub blobs: BlobStore,
    pub config: Arc<ApiConfig>,
    pub metrics: Arc<Metrics>,
    pub rate_limiter: Arc<RateLimiter>,
    pub serving: Arc<Engine>,
}

impl AppState {
    pub fn new(db: Db, blobs: BlobStore, config: ApiConfig) -> Self {
        AppState {
            db,
            blobs,
            rate_limiter: Arc::new(RateLimiter::new(config.rate_limit)),
            serving: Arc::new(Engine::new(config.serving.clone())),
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new()),
        }
    }
}
