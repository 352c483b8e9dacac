//! Job-queue tests (SQLite always; PostgreSQL with `MOLT_TEST_DATABASE_URL`; see
//! `tests/common/mod.rs`).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use storage::{Db, Error, EventLevel, JobError, JobResult, JobStatus};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(300);
/// Comfortably past `SHORT`.
const PAST_SHORT: Duration = Duration::from_millis(800);

fn result(name: &str) -> JobResult {
    JobResult {
        fine_tuned_model: name.to_string(),
        adapter_object_prefix: format!("adapters/{name}"),
        adapter_bytes: 1,
        adapter_config: json!({}),
    }
}

#[tokio::test]
async fn claim_returns_each_job_once() {
    for t in common::databases("claim_returns_each_job_once").await {
        let db = &t.db;
        assert!(db.claim("w", LONG).await.unwrap().is_none(), "empty queue");
        let (tenant, file) = common::tenant_with_file(db, "a").await;
        // A job still validating is not claimable.
        let (validating, _) = db
            .create_job(storage::NewJob::new(&tenant.id, "m", &file.id))
            .await
            .unwrap();
        let j1 = common::submit(db, &tenant, &file).await;
        let j2 = common::submit(db, &tenant, &file).await;
        assert_eq!(db.queue_depth().await.unwrap(), 2);

        let c1 = db.claim("w1", LONG).await.unwrap().expect("first claim");
        let c2 = db.claim("w2", LONG).await.unwrap().expect("second claim");
        assert!(
            db.claim("w3", LONG).await.unwrap().is_none(),
            "{}: nothing left",
            t.label
        );
        assert_eq!(
            (c1.id.as_str(), c2.id.as_str()),
            (j1.id.as_str(), j2.id.as_str()),
            "FIFO"
        );
        assert_eq!(c1.status, JobStatus::Running);
        assert_eq!(c1.lease_owner.as_deref(), Some("w1"));
        assert_eq!(c1.attempts, 1);
        assert!(c1.started_at.is_some());
        let now_ms = db.now_ms().await.unwrap();
        let expiry = c1.lease_expires_at_ms.unwrap();
        assert!(
            expiry > now_ms + 50_000 && expiry <= now_ms + 61_000,
            "{}: lease {expiry} vs now {now_ms}",
            t.label
        );
        assert_eq!(
            db.get_job(&tenant.id, &validating.id).await.unwrap().status,
            JobStatus::ValidatingFiles
        );

        // Only the owner may act on the job.
        assert!(matches!(
            db.heartbeat(&c1.id, "w2", LONG).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            db.complete_job(&c1.id, "w2", result("x")).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            db.heartbeat("ftjob-missing", "w1", LONG).await,
            Err(Error::NotFound { .. })
        ));
        assert!(!db.heartbeat(&c1.id, "w1", LONG).await.unwrap());

        let started = db
            .list_job_events(&tenant.id, &c1.id, None, 10)
            .await
            .unwrap();
        assert!(
            started.data[0].message.contains("started on worker 'w1'"),
            "{:?}",
            started.data[0]
        );
    }
}

/// Twenty jobs from four tenants; eight claim loops across two separate pools. Every job is
/// claimed exactly once and finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_claim_each_job_exactly_once() {
    for t in common::databases("concurrent_claimers_claim_each_job_exactly_once").await {
        let mut all = HashSet::new();
        for n in 0..4 {
            let (tenant, file) = common::tenant_with_file(&t.db, &format!("t{n}")).await;
            for _ in 0..5 {
                all.insert(common::submit(&t.db, &tenant, &file).await.id);
            }
        }
        let pools = [t.db.clone(), t.another_pool().await];
        let mut tasks = Vec::new();
        for w in 0..8 {
            let db: Db = pools[w % 2].clone();
            tasks.push(tokio::spawn(async move {
                let worker = format!("worker-{w}");
                let mut got = Vec::new();
                while let Some(job) = db.claim(&worker, LONG).await.expect("claim") {
                    assert_eq!(job.attempts, 1);
                    assert_eq!(job.lease_owner.as_deref(), Some(worker.as_str()));
                    db.complete_job(&job.id, &worker, result(&format!("ft:{}", job.id)))
                        .await
                        .expect("complete");
                    got.push(job.id);
                    tokio::task::yield_now().await;
                }
                got
            }));
        }
        let mut claimed = Vec::new();
        for task in tasks {
            claimed.extend(task.await.expect("task"));
        }
        let unique: HashSet<_> = claimed.iter().cloned().collect();
        assert_eq!(claimed.len(), 20, "{}: {} claims", t.label, claimed.len());
        assert_eq!(unique, all, "{}", t.label);
        for id in &all {
            let job = t.db.get_job_unscoped(id).await.unwrap();
            assert_eq!(
                (job.status, job.attempts),
                (JobStatus::Succeeded, 1),
                "{}",
                t.label
            );
        }
        pools[1].close().await;
    }
}

#[tokio::test]
async fn lease_expiry_lets_another_worker_reclaim() {
    for t in common::databases("lease_expiry_lets_another_worker_reclaim").await {
        let db = &t.db;
        let (tenant, file) = common::tenant_with_file(db, "a").await;
        let job = common::submit(db, &tenant, &file).await;
        let c = db.claim("w1", SHORT).await.unwrap().unwrap();
        db.add_checkpoint(&c.id, "w1", 3, "ckpt/3", None)
            .await
            .unwrap();
        // The lease is live: nobody else gets it.
        assert!(db.claim("w2", LONG).await.unwrap().is_none());
        // A heartbeat keeps it alive past the original expiry.
        db.heartbeat(&c.id, "w1", Duration::from_secs(5))
            .await
            .unwrap();
        tokio::time::sleep(PAST_SHORT).await;
        assert!(
            db.claim("w2", LONG).await.unwrap().is_none(),
            "{}: heartbeat extended the lease",
            t.label
        );

        // w1 dies after a last heartbeat: the lease runs out and w2 takes over, attempt 2.
        db.heartbeat(&c.id, "w1", SHORT).await.unwrap();
        tokio::time::sleep(PAST_SHORT).await;
        let r = db.claim("w2", LONG).await.unwrap().expect("reclaim");
        assert_eq!(r.id, job.id);
        assert_eq!(r.attempts, 2, "{}", t.label);
        assert_eq!(r.lease_owner.as_deref(), Some("w2"));
        // It resumes from the last checkpoint.
        assert_eq!(db.latest_checkpoint(&r.id).await.unwrap().unwrap().step, 3);
        // The old worker has lost it.
        let err = db.heartbeat(&r.id, "w1", LONG).await.unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
        assert!(matches!(
            db.update_progress(&r.id, "w1", &storage::Progress::default())
                .await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            db.add_checkpoint(&r.id, "w1", 4, "x", None).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(!db.heartbeat(&r.id, "w2", LONG).await.unwrap());
        let events = db
            .list_job_events(&tenant.id, &job.id, None, 1)
            .await
            .unwrap();
        assert_eq!(events.data[0].level, EventLevel::Warn);
        assert!(
            events.data[0]
                .message
                .contains("reclaimed by worker 'w2' (attempt 2 of 3)"),
            "{}",
            events.data[0].message
        );
        let (done, _) = db.complete_job(&r.id, "w2", result("ft:a")).await.unwrap();
        assert_eq!(done.status, JobStatus::Succeeded);
    }
}

#[tokio::test]
async fn max_attempts_then_failed() {
    for t in common::databases("max_attempts_then_failed").await {
        let db = &t.db;
        let (tenant, file) = common::tenant_with_file(db, "a").await;
        // Lease expiry on every attempt.
        let job = common::submit_with(db, &tenant, &file, Some(2)).await;
        assert_eq!(db.claim("w1", SHORT).await.unwrap().unwrap().attempts, 1);
        tokio::time::sleep(PAST_SHORT).await;
        assert_eq!(db.claim("w2", SHORT).await.unwrap().unwrap().attempts, 2);
        tokio::time::sleep(PAST_SHORT).await;
        assert!(
            db.claim("w3", LONG).await.unwrap().is_none(),
            "{}: out of attempts",
            t.label
        );
        let failed = db.get_job(&tenant.id, &job.id).await.unwrap();
        assert_eq!(failed.status, JobStatus::Failed, "{}", t.label);
        let error = failed.error.expect("error recorded");
        assert_eq!(error.kind, "lease_expired");
        assert!(
            error.message.contains("2 attempt(s)") && error.message.contains("'w2'"),
            "{}",
            error.message
        );
        assert!(failed.finished_at.is_some() && failed.lease_owner.is_none());
        let last = db
            .list_job_events(&tenant.id, &job.id, None, 1)
            .await
            .unwrap();
        assert_eq!(last.data[0].level, EventLevel::Error);

        // Retryable failures reported by the worker: requeued until the last attempt, which
        // fails with that (last) error.
        let job = common::submit_with(db, &tenant, &file, Some(2)).await;
        let c = db.claim("w1", LONG).await.unwrap().unwrap();
        let after = db
            .fail_job(&c.id, "w1", JobError::new("oom", "out of memory (1)"), true)
            .await
            .unwrap();
        assert_eq!((after.status, after.attempts), (JobStatus::Queued, 1));
        assert!(after.lease_owner.is_none() && after.error.is_none());
        let c = db.claim("w2", LONG).await.unwrap().unwrap();
        assert_eq!((c.id.as_str(), c.attempts), (job.id.as_str(), 2));
        let after = db
            .fail_job(&c.id, "w2", JobError::new("oom", "out of memory (2)"), true)
            .await
            .unwrap();
        assert_eq!(after.status, JobStatus::Failed);
        assert_eq!(after.error.unwrap().message, "out of memory (2)");
        assert!(db.claim("w3", LONG).await.unwrap().is_none());

        // A non-retryable failure fails at once.
        let job = common::submit(db, &tenant, &file).await;
        let c = db.claim("w1", LONG).await.unwrap().unwrap();
        let failed = db
            .fail_job(
                &c.id,
                "w1",
                JobError::new("invalid_training_file", "bad row").with_line(9),
                false,
            )
            .await
            .unwrap();
        assert_eq!(
            (failed.id.as_str(), failed.status),
            (job.id.as_str(), JobStatus::Failed)
        );
        assert_eq!(failed.error.unwrap().line, Some(9));

        // Releasing a job (worker shutdown) does not use up an attempt.
        let job = common::submit(db, &tenant, &file).await;
        let c = db.claim("w1", LONG).await.unwrap().unwrap();
        let released = db.release_job(&c.id, "w1").await.unwrap();
        assert_eq!((released.status, released.attempts), (JobStatus::Queued, 0));
        let c = db.claim("w2", LONG).await.unwrap().unwrap();
        assert_eq!((c.id.as_str(), c.attempts), (job.id.as_str(), 1));
    }
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    for t in common::databases("cancel_queued_and_running_jobs").await {
        let db = &t.db;
        let (tenant, file) = common::tenant_with_file(db, "a").await;

        // Queued: cancelled at once, never claimed.
        let queued = common::submit(db, &tenant, &file).await;
        let c = db.request_cancel(&tenant.id, &queued.id).await.unwrap();
        assert_eq!(c.status, JobStatus::Cancelled, "{}", t.label);
        assert!(c.finished_at.is_some());
        assert!(db.claim("w", LONG).await.unwrap().is_none());
        assert!(matches!(
            db.request_cancel(&tenant.id, &queued.id).await,
            Err(Error::InvalidState { .. })
        ));

        // Running: cancelling, the worker sees it at its heartbeat and confirms.
        let running = common::submit(db, &tenant, &file).await;
        db.claim("w1", LONG).await.unwrap().unwrap();
        assert!(!db.heartbeat(&running.id, "w1", LONG).await.unwrap());
        let c = db.request_cancel(&tenant.id, &running.id).await.unwrap();
        assert_eq!(c.status, JobStatus::Cancelling);
        assert!(c.cancel_requested);
        // Asking again is harmless.
        assert_eq!(
            db.request_cancel(&tenant.id, &running.id)
                .await
                .unwrap()
                .status,
            JobStatus::Cancelling
        );
        assert!(
            db.heartbeat(&running.id, "w1", LONG).await.unwrap(),
            "{}: heartbeat reports cancel",
            t.label
        );
        // Still leased to w1 while cancelling: not claimable.
        assert!(db.claim("w2", LONG).await.unwrap().is_none());
        let done = db.confirm_cancelled(&running.id, "w1").await.unwrap();
        assert_eq!(done.status, JobStatus::Cancelled);
        assert!(done.lease_owner.is_none());
        assert!(matches!(
            db.heartbeat(&running.id, "w1", LONG).await,
            Err(Error::LeaseLost { .. })
        ));
        let events = db
            .list_job_events(&tenant.id, &running.id, None, 10)
            .await
            .unwrap();
        assert_eq!(events.data[0].message, "Job cancelled");
        assert!(events.data[1].message.starts_with("Cancellation requested"));

        // Cancelling, and the worker dies: the expired lease finishes the cancel.
        let orphan = common::submit(db, &tenant, &file).await;
        db.claim("w1", SHORT).await.unwrap().unwrap();
        db.request_cancel(&tenant.id, &orphan.id).await.unwrap();
        tokio::time::sleep(PAST_SHORT).await;
        assert_eq!(db.reap_expired().await.unwrap(), 1);
        assert_eq!(
            db.get_job(&tenant.id, &orphan.id).await.unwrap().status,
            JobStatus::Cancelled,
            "{}",
            t.label
        );

        // Validating: cancelled at once too.
        let (v, _) = db
            .create_job(storage::NewJob::new(&tenant.id, "m", &file.id))
            .await
            .unwrap();
        assert_eq!(
            db.request_cancel(&tenant.id, &v.id).await.unwrap().status,
            JobStatus::Cancelled
        );
    }
}

#[tokio::test]
async fn fair_across_tenants_fifo_within_one() {
    for t in common::databases("fair_across_tenants_fifo_within_one").await {
        let db = &t.db;
        let (a, fa) = common::tenant_with_file(db, "a").await;
        let (b, fb) = common::tenant_with_file(db, "b").await;
        let (c, fc) = common::tenant_with_file(db, "c").await;
        let mut names: HashMap<String, String> = HashMap::new();
        for i in 1..=4 {
            names.insert(common::submit(db, &a, &fa).await.id, format!("A{i}"));
        }
        for i in 1..=2 {
            names.insert(common::submit(db, &b, &fb).await.id, format!("B{i}"));
        }
        names.insert(common::submit(db, &c, &fc).await.id, "C1".into());

        let mut order = Vec::new();
        while let Some(job) = db.claim("w", LONG).await.unwrap() {
            order.push(names[&job.id].clone());
        }
        // A's burst does not starve B and C; each tenant's jobs come out in order.
        assert_eq!(
            order,
            ["A1", "B1", "C1", "A2", "B2", "A3", "A4"],
            "{}",
            t.label
        );

        // With running jobs finishing, the tenant with fewer running jobs goes first.
        let by_name: HashMap<String, String> =
            names.iter().map(|(k, v)| (v.clone(), k.clone())).collect();
        for n in ["A1", "A2", "A3", "A4", "B1", "B2", "C1"] {
            db.complete_job(&by_name[n], "w", result(&format!("ft:{n}")))
                .await
                .unwrap();
        }
        let a5 = common::submit(db, &a, &fa).await;
        let b3 = common::submit(db, &b, &fb).await;
        let b4 = common::submit(db, &b, &fb).await;
        // Nobody is running now: B was served less recently than A (A4 was the last claim).
        assert_eq!(
            db.claim("w", LONG).await.unwrap().unwrap().id,
            b3.id,
            "{}",
            t.label
        );
        // B now has one running, A none.
        assert_eq!(db.claim("w", LONG).await.unwrap().unwrap().id, a5.id);
        assert_eq!(db.claim("w", LONG).await.unwrap().unwrap().id, b4.id);
    }
}
