//! Per-API-key rate limiting against a real `molt serve`: a burst over the limit gets 429
//! with `Retry-After` and OpenAI's envelope, another key is not affected, probes are never
//! limited, the refusals are counted in /metrics, and after waiting `Retry-After` the key
//! works again.

mod common;

use std::time::Duration;

use common::{ServeOptions, Server};
use reqwest::{Method, StatusCode};

const LIMIT: u32 = 5;
/// Long enough that the burst below finishes well before a token comes back
/// (one per 2 s), even on a loaded machine.
const WINDOW_SECS: u64 = 10;

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_limited_per_key() {
    let s = Server::start(ServeOptions {
        extra_args: vec![
            "--rate-limit-requests".into(),
            LIMIT.to_string(),
            "--rate-limit-window-secs".into(),
            WINDOW_SECS.to_string(),
        ],
        ..ServeOptions::default()
    })
    .await;
    let (_, other_key) = s.new_tenant("other").await;

    // The burst: LIMIT requests pass, counting down `x-ratelimit-remaining-requests`.
    for i in 0..LIMIT {
        let res = s
            .req(Method::GET, "/v1/files")
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
        assert_eq!(
            header(&res, "x-ratelimit-limit-requests"),
            Some(LIMIT.to_string().as_str())
        );
        assert_eq!(
            header(&res, "x-ratelimit-remaining-requests"),
            Some((LIMIT - 1 - i).to_string().as_str()),
            "request {i}"
        );
        assert!(header(&res, "x-ratelimit-reset-requests").is_some());
    }

    // The next one is refused.
    let res = s
        .req(Method::GET, "/v1/fine_tuning/jobs")
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = header(&res, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After header in whole seconds");
    // One token comes back every WINDOW_SECS / LIMIT = 2 s.
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let retry_ms: u64 = header(&res, "retry-after-ms")
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms");
    assert!(
        retry_ms <= 2000 && retry_ms > 0,
        "retry-after-ms {retry_ms}"
    );
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), Some("0"));
    let (_, body) = common::json_of(res).await;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests", "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains("Rate limit reached"), "{msg}");

    // Another key has its own budget.
    let (status, v) = s.call(s.req_as(&other_key, Method::GET, "/v1/files")).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // Probes and metrics are never limited; the refusal is counted.
    for path in ["/healthz", "/readyz"] {
        for _ in 0..(2 * LIMIT) {
            let r = s
                .http
                .get(format!("{}{path}", s.url))
                .bearer_auth(&s.key)
                .send()
                .await
                .expect("probe");
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }
    }
    let metrics = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("molt_rate_limited_requests_total{route=\"/v1/fine_tuning/jobs\"} 1"),
        "{metrics}"
    );

    // A missing or wrong key is still a 401, not a 429.
    let (status, _) = s
        .call(s.req_as("sk-molt-wrong", Method::GET, "/v1/files"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // After Retry-After the key works again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, v) = s.call(s.req(Method::GET, "/v1/files")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_turns_the_limit_off() {
    let s = Server::start(ServeOptions {
        extra_args: vec!["--rate-limit-requests".into(), "0".into()],
        ..ServeOptions::default()
    })
    .await;
    for _ in 0..30 {
        let res = s
            .req(Method::GET, "/v1/models")
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), StatusCode::OK);
        assert!(header(&res, "x-ratelimit-limit-requests").is_none());
    }
}
