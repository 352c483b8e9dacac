//! Per-API-key rate limiting: a token bucket per key, holding up to `requests` tokens and
//! refilled at `requests / window`, so a key may send `requests` at once and then
//! `requests` per `window` on average. One request takes one token; without one the answer
//! is 429 with `Retry-After` (and `retry-after-ms`, which the `openai` clients prefer) and
//! OpenAI's envelope (`type: "requests"`, `code: "rate_limit_exceeded"`). Every answer to a
//! limited request carries OpenAI's `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` (time until the
//! bucket is full again, e.g. `"1.5s"`, `"6m0s"`).
//!
//! Only `/v1/…` is limited: health, readiness and metrics probes and the admin API are not.
//! The middleware authenticates the key itself (to know whose bucket to take from) and
//! leaves the [`Tenant`] in the request's extensions, where the extractor finds it, so a
//! request still costs one key lookup. A request without a valid key passes through
//! unlimited to the handler, which answers 401.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;

/// OpenAI's error `type` for a request-count limit.
pub const ERROR_TYPE: &str = "requests";
/// OpenAI's error `code` for any rate limit.
pub const ERROR_CODE: &str = "rate_limit_exceeded";

/// Above this many buckets, full ones are dropped (a full bucket is the same as none), so
/// the map stays as small as the set of recently active keys.
const PRUNE_ABOVE: usize = 10_000;

/// The limit: `requests` per `window` per API key; `requests == 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests: u32,
    pub window: Duration,
}

impl RateLimit {
    pub const OFF: RateLimit = RateLimit {
        requests: 0,
        window: Duration::from_secs(60),
    };

    pub fn enabled(&self) -> bool {
        self.requests > 0 && !self.window.is_zero()
    }

    /// Tokens added per second.
    fn rate(&self) -> f64 {
        f64::from(self.requests) / self.window.as_secs_f64()
    }
}

impl Default for RateLimit {
    /// 600 requests a minute per key (10 per second on average, bursts up to 600).
    fn default() -> Self {
        RateLimit {
            requests: 600,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// What one request got from its bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    /// Whole requests left after this one.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until the next request can pass (zero when allowed).
    pub retry_after: Duration,
}

/// The buckets of every key, in this process (each API server limits on its own).
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token from `key`'s bucket at time `now`.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let cap = f64::from(self.limit.requests);
        let rate = self.limit.rate();
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < cap
            });
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: cap,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(cap);
        b.updated = now;
        let allowed = b.tokens >= 1.0;
        let retry_after = if allowed {
            b.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - b.tokens) / rate)
        };
        Decision {
            allowed,
            limit: self.limit.requests,
            remaining: b.tokens.floor() as u32,
            reset: Duration::from_secs_f64((cap - b.tokens) / rate),
            retry_after,
        }
    }
}

/// A duration the way OpenAI writes `x-ratelimit-reset-*`: `"20ms"`, `"1.5s"`, `"6m0s"`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let total = d.as_secs_f64();
    let seconds = |s: f64| {
        let s = format!("{s:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}s")
    };
    if total < 60.0 {
        return seconds(total);
    }
    let whole = d.as_secs();
    let (h, m) = (whole / 3600, (whole % 3600) / 60);
    let s = total - (h * 3600 + m * 60) as f64;
    if h > 0 {
        format!("{h}h{m}m{}", seconds(s))
    } else {
        format!("{m}m{}", seconds(s))
    }
}

fn set_headers(headers: &mut HeaderMap, d: &Decision) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set("x-ratelimit-limit-requests", d.limit.to_string());
    set("x-ratelimit-remaining-requests", d.remaining.to_string());
    set("x-ratelimit-reset-requests", format_reset(d.reset));
}

/// Middleware: limits `/v1/…` requests per API key (see the module docs).
pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.rate_limiter.limit().enabled() || !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let tenant = match Tenant::from_request_parts(&mut parts, &state).await {
        Ok(t) => t,
        // No valid key: the handler's extractor answers (401, or 500 on a database error).
        Err(_) => return next.run(Request::from_parts(parts, body)).await,
    };
    let decision = state.rate_limiter.check(&tenant.key_id, Instant::now());
    if !decision.allowed {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "unmatched".to_string());
        state.metrics.add_rate_limited(&route);
        tracing::info!(key_id = %tenant.key_id, route = %route, "rate limited");
        let limit = state.rate_limiter.limit();
        let wait = decision.retry_after;
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ERROR_CODE,
            format!(
                "Rate limit reached for API key {} on requests: limit {} per {} s. Please try \
                 again in {}.",
                tenant.key_id,
                limit.requests,
                limit.window.as_secs_f64(),
                format_reset(wait)
            ),
        );
        e.kind = ERROR_TYPE;
        // Whole seconds, rounded up, at least 1: a client that waits that long gets in.
        e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        let mut res = e.into_response();
        set_headers(res.headers_mut(), &decision);
        if let Ok(v) = HeaderValue::from_str(&wait.as_millis().max(1).to_string()) {
            res.headers_mut().insert("retry-after-ms", v);
        }
        return res;
    }
    parts.extensions.insert(tenant);
    let mut res = next.run(Request::from_parts(parts, body)).await;
    set_headers(res.headers_mut(), &decision);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, secs: u64) -> RateLimiter {
        RateLimiter::new(RateLimit {
            requests,
            window: Duration::from_secs(secs),
        })
    }

    #[test]
    fn a_burst_empties_the_bucket_and_time_refills_it() {
        let l = limiter(3, 6); // 0.5 tokens per second
        let t0 = Instant::now();
        let got: Vec<_> = (0..4).map(|_| l.check("k", t0)).collect();
        assert_eq!(
            got.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(
            got.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert_eq!(got[3].retry_after, Duration::from_secs(2));
        assert_eq!(got[3].reset, Duration::from_secs(6));
        // Another key has its own bucket.
        assert!(l.check("other", t0).allowed);
        // After 1 s half a token is back: still refused, 1 s to go.
        let d = l.check("k", t0 + Duration::from_secs(1));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(1));
        // After 2 s one token is back.
        let d = l.check("k", t0 + Duration::from_secs(2));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.remaining, 0);
        // A long pause refills to the cap, not beyond.
        let d = l.check("k", t0 + Duration::from_secs(3600));
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
    }

    #[test]
    fn full_buckets_are_pruned() {
        let l = limiter(2, 1);
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            l.check(&format!("k{i}"), t0);
        }
        l.check("late", t0 + Duration::from_secs(5));
        assert_eq!(l.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn reset_is_written_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_millis(61_250)), "1m1.25s");
        assert_eq!(format_reset(Duration::from_secs(3661)), "1h1m1s");
    }

    #[test]
    fn zero_is_off() {
        assert!(!RateLimit::OFF.enabled());
        assert!(RateLimit::default().enabled());
    }
}
