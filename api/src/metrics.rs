//! Prometheus metrics in the text exposition format, all under the prefix `molt_`.
//!
//! HTTP: `molt_http_requests_total` and `molt_http_request_duration_seconds` (histogram with
//! explicit buckets), labelled by method, route template (never the raw path, so ids do not
//! explode the label set) and status. Uploads: `molt_upload_bytes_total`. Rate limiting:
//! `molt_rate_limited_requests_total{route}` (requests answered 429 by the per-key limit).
//! Queue and training (read from the database at scrape time, so they cover every worker
//! process): `molt_queue_depth`, `molt_jobs{status}`, `molt_training_tokens_per_second`
//! (sum over running jobs of their latest rate) and `molt_training_step_seconds` (mean of the
//! running jobs' latest step time).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

/// Histogram bucket upper bounds for request latency, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`].
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; LATENCY_BUCKETS.len()];
        }
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if v <= *bound {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

/// Process-local counters of the API server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (method, route, status) → latency histogram.
    http: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    upload_bytes: AtomicU64,
    /// route → requests refused by the rate limiter.
    rate_limited: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics::default()
    }

    /// Records one finished request.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut map = match self.http.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry((method.to_string(), route.to_string(), status))
            .or_default()
            .observe(seconds);
    }

    /// Counts uploaded dataset bytes.
    pub fn add_upload_bytes(&self, n: u64) {
        self.upload_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one request refused by the rate limiter.
    pub fn add_rate_limited(&self, route: &str) {
        let mut map = match self.rate_limited.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        *map.entry(route.to_string()).or_default() += 1;
    }

    /// Renders the process-local part.
    fn render_http(&self, out: &mut String) {
        let map = match self.http.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        out.push_str("# HELP molt_http_requests_total HTTP requests answered.\n");
        out.push_str("# TYPE molt_http_requests_total counter\n");
        for ((method, route, status), h) in map.iter() {
            let _ = writeln!(
                out,
                "molt_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                h.count
            );
        }
        out.push_str("# HELP molt_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE molt_http_request_duration_seconds histogram\n");
        for ((method, route, status), h) in map.iter() {
            let labels = format!(
                "method=\"{method}\",route=\"{}\",status=\"{status}\"",
                escape(route)
            );
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "molt_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    h.buckets.get(i).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(
                out,
                "molt_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "molt_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "molt_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out.push_str("# HELP molt_upload_bytes_total Dataset bytes received.\n");
        out.push_str("# TYPE molt_upload_bytes_total counter\n");
        let _ = writeln!(
            out,
            "molt_upload_bytes_total {}",
            self.upload_bytes.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP molt_rate_limited_requests_total Requests refused (429) by the per-key rate limit.\n",
        );
        out.push_str("# TYPE molt_rate_limited_requests_total counter\n");
        let limited = match self.rate_limited.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (route, n) in limited.iter() {
            let _ = writeln!(
                out,
                "molt_rate_limited_requests_total{{route=\"{}\"}} {n}",
                escape(route)
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware: times every request and records it under its route template.
pub async fn track_http(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let res = next.run(req).await;
    state.metrics.observe_http(
        &method,
        &route,
        res.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    res
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    state.metrics.render_http(&mut out);
    state.serving.stats.render(&mut out);
    if let Err(e) = render_queue(&state, &mut out).await {
        tracing::warn!(error = %e, "metrics: could not read the queue state");
        out.push_str("# molt_queue metrics unavailable: database error\n");
    }
    let mut res = out.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

async fn render_queue(state: &AppState, out: &mut String) -> storage::Result<()> {
    let depth = state.db.queue_depth().await?;
    let counts = state.db.job_status_counts().await?;
    out.push_str("# HELP molt_queue_depth Jobs waiting for a worker.\n");
    out.push_str("# TYPE molt_queue_depth gauge\n");
    let _ = writeln!(out, "molt_queue_depth {depth}");
    out.push_str("# HELP molt_jobs Jobs by status.\n");
    out.push_str("# TYPE molt_jobs gauge\n");
    for (status, n) in counts {
        let _ = writeln!(out, "molt_jobs{{status=\"{status}\"}} {n}");
    }
    let running = state.db.running_job_metrics().await?;
    let tokens_per_second: f64 = running
        .iter()
        .filter_map(|m| m.get("tokens_per_second").and_then(|v| v.as_f64()))
        .sum();
    let step_times: Vec<f64> = running
        .iter()
        .filter_map(|m| {
            m.get("step_seconds")
                .or_else(|| m.get("extra").and_then(|e| e.get("step_seconds")))
                .and_then(|v| v.as_f64())
        })
        .collect();
    out.push_str(
        "# HELP molt_training_tokens_per_second Training throughput summed over running jobs.\n",
    );
    out.push_str("# TYPE molt_training_tokens_per_second gauge\n");
    let _ = writeln!(out, "molt_training_tokens_per_second {tokens_per_second}");
    out.push_str(
        "# HELP molt_training_step_seconds Mean latest optimiser-step time of running jobs.\n",
    );
    out.push_str("# TYPE molt_training_step_seconds gauge\n");
    let mean = if step_times.is_empty() {
        0.0
    } else {
        step_times.iter().sum::<f64>() / step_times.len() as f64
    };
    let _ = writeln!(out, "molt_training_step_seconds {mean}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::new();
        m.observe_http("GET", "/v1/files", 200, 0.003);
        m.observe_http("GET", "/v1/files", 200, 2.0);
        let mut out = String::new();
        m.render_http(&mut out);
        assert!(out.contains(
            "molt_http_requests_total{method=\"GET\",route=\"/v1/files\",status=\"200\"} 2"
        ));
        assert!(out.contains("le=\"0.005\"} 1"));
        assert!(out.contains("le=\"2.5\"} 2"));
        assert!(out.contains("le=\"+Inf\"} 2"));
        m.add_rate_limited("/v1/files");
        m.add_rate_limited("/v1/files");
        let mut out = String::new();
        m.render_http(&mut out);
        assert!(out.contains("molt_rate_limited_requests_total{route=\"/v1/files\"} 2"));
    }
}
