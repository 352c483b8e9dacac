//! Database tests (SQLite always; PostgreSQL with `MOLT_TEST_DATABASE_URL`; see
//! `tests/common/mod.rs`).

mod common;

use serde_json::json;
use storage::{
    Db, Error, EventLevel, FileStatus, JobError, JobMetric, JobResult, JobStatus, NewAdapter,
    NewBaseModel, NewFile, NewJob, Progress,
};

fn new_file(tenant_id: &str, name: &str, idem: Option<&str>) -> NewFile {
    NewFile {
        id: None,
        tenant_id: tenant_id.to_string(),
        purpose: "fine-tune".into(),
        filename: name.into(),
        bytes: 42,
        status: FileStatus::Uploaded,
        status_details: None,
        line_count: None,
        object_key: format!("files/{name}"),
        sha256: None,
        idempotency_key: idem.map(str::to_string),
        dataset: None,
    }
}

#[tokio::test]
async fn migrations_are_idempotent() {
    for t in common::databases("migrations_are_idempotent").await {
        // Already migrated by the fixture: run again, and from a second pool.
        t.db.migrate().await.expect("second migrate");
        let other = t.another_pool().await;
        other.migrate().await.expect("migrate from another pool");
        // The schema works after all that.
        let tenant = other.create_tenant("acme").await.unwrap();
        assert_eq!(
            t.db.get_tenant(&tenant.id).await.unwrap(),
            tenant,
            "{}",
            t.label
        );
        t.db.ping().await.unwrap();
        assert!(
            t.db.now_ms().await.unwrap() > 1_700_000_000_000,
            "{}",
            t.label
        );
        other.close().await;
    }
}

#[tokio::test]
async fn connect_rejects_unknown_schemes() {
    let err = Db::connect("mysql://localhost/x").await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    // A plain path opens SQLite.
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_data_dir(dir.path()).await.unwrap();
    db.migrate().await.unwrap();
    assert_eq!(db.backend(), storage::Backend::Sqlite);
    assert!(dir.path().join("molt.db").exists());
    // A sqlite: URL whose directory does not exist yet.
    let nested = dir.path().join("a/b/molt.db");
    let db = Db::connect(&format!("sqlite://{}", nested.display()))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    assert!(nested.exists());
    // In-memory SQLite keeps its data across calls (one long-lived connection).
    let mem = Db::connect("sqlite::memory:").await.unwrap();
    mem.migrate().await.unwrap();
    let t = mem.create_tenant("m").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(mem.get_tenant(&t.id).await.unwrap(), t);
}

#[tokio::test]
async fn tenants_and_api_keys() {
    for t in common::databases("tenants_and_api_keys").await {
        let db = &t.db;
        let a = db.create_tenant("alpha").await.unwrap();
        let b = db.create_tenant("beta").await.unwrap();
        assert!(a.id.starts_with("tenant-"));
        assert!(
            matches!(db.create_tenant("alpha").await, Err(Error::Conflict(_))),
            "{}",
            t.label
        );
        assert_eq!(db.get_tenant_by_name("beta").await.unwrap(), b);
        assert!(
            db.get_tenant("tenant-nope")
                .await
                .unwrap_err()
                .is_not_found()
        );

        let (key, secret) = db.create_api_key(&a.id, Some("ci")).await.unwrap();
        assert!(secret.starts_with("sk-molt-") && secret.len() > 40);
        assert!(secret.starts_with(&key.prefix) && key.prefix.len() < 16);
        assert!(!key.prefix.contains(&secret[key.prefix.len()..]));
        let found = db
            .authenticate(&secret)
            .await
            .unwrap()
            .expect("key authenticates");
        assert_eq!(found.id, key.id);
        assert_eq!(found.tenant_id, a.id);
        assert!(found.last_used_at.is_some());
        assert!(db.authenticate("sk-molt-wrong").await.unwrap().is_none());
        assert!(
            db.authenticate(&format!("{secret}x"))
                .await
                .unwrap()
                .is_none()
        );

        // Listing is per tenant and never exposes the secret.
        let (_, secret_b) = db.create_api_key(&b.id, None).await.unwrap();
        let listed = db.list_api_keys(&a.id, None, 10).await.unwrap();
        assert_eq!(listed.data.len(), 1);
        assert!(!serde_json::to_string(&listed).unwrap().contains(&secret));
        // Another tenant cannot revoke it.
        assert!(
            db.revoke_api_key(&b.id, &key.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        let revoked = db.revoke_api_key(&a.id, &key.id).await.unwrap();
        assert!(revoked.revoked_at.is_some());
        assert!(
            db.authenticate(&secret).await.unwrap().is_none(),
            "{}",
            t.label
        );
        assert!(db.authenticate(&secret_b).await.unwrap().is_some());
        // Keys for a missing tenant are refused.
        assert!(
            db.create_api_key("tenant-nope", None)
                .await
                .unwrap_err()
                .is_not_found()
        );

        let tenants = db.list_tenants(None, 10).await.unwrap();
        assert_eq!(
            tenants
                .data
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["beta", "alpha"]
        );
    }
}

#[tokio::test]
async fn files_crud_isolation_and_idempotency() {
    for t in common::databases("files_crud_isolation_and_idempotency").await {
        let db = &t.db;
        let a = db.create_tenant("a").await.unwrap();
        let b = db.create_tenant("b").await.unwrap();
        let (f, created) = db
            .create_file(new_file(&a.id, "one.jsonl", Some("k1")))
            .await
            .unwrap();
        assert!(created);
        assert!(f.id.starts_with("file-"));
        assert_eq!(f.status, FileStatus::Uploaded);
        // Same idempotency key → same row, nothing new.
        let (again, created) = db
            .create_file(new_file(&a.id, "other.jsonl", Some("k1")))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(again.id, f.id);
        // The same key in another tenant is independent.
        let (fb, created) = db
            .create_file(new_file(&b.id, "b.jsonl", Some("k1")))
            .await
            .unwrap();
        assert!(created);
        assert_ne!(fb.id, f.id);
        // A caller-chosen id is kept.
        let chosen = Db::new_file_id();
        let mut nf = new_file(&a.id, "chosen.jsonl", None);
        nf.id = Some(chosen.clone());
        assert_eq!(db.create_file(nf).await.unwrap().0.id, chosen);

        assert_eq!(db.get_file(&a.id, &f.id).await.unwrap(), f);
        // Tenant isolation: b cannot see, update or delete a's file.
        let err = db.get_file(&b.id, &f.id).await.unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { kind: "file", id } if id == &f.id),
            "{}: {err}",
            t.label
        );
        assert!(
            db.set_file_status(&b.id, &f.id, FileStatus::Error, None, None)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(
            db.delete_file(&b.id, &f.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(
            db.list_files(&b.id, None, None, 100)
                .await
                .unwrap()
                .data
                .iter()
                .all(|x| x.tenant_id == b.id)
        );

        let processed = db
            .set_file_status(
                &a.id,
                &f.id,
                FileStatus::Error,
                Some("line 3: expected JSON"),
                Some(7),
            )
            .await
            .unwrap();
        assert_eq!(processed.status, FileStatus::Error);
        assert_eq!(
            processed.status_details.as_deref(),
            Some("line 3: expected JSON")
        );
        assert_eq!(processed.line_count, Some(7));

        let only_ft = db
            .list_files(&a.id, Some("fine-tune"), None, 100)
            .await
            .unwrap();
        assert_eq!(only_ft.data.len(), 2);
        assert!(
            db.list_files(&a.id, Some("assistants"), None, 100)
                .await
                .unwrap()
                .data
                .is_empty()
        );

        let deleted = db.delete_file(&a.id, &f.id).await.unwrap();
        assert_eq!(deleted.id, f.id);
        assert!(db.get_file(&a.id, &f.id).await.unwrap_err().is_not_found());
    }
}

#[tokio::test]
async fn pagination_newest_first_with_cursor() {
    for t in common::databases("pagination_newest_first_with_cursor").await {
        let db = &t.db;
        let a = db.create_tenant("a").await.unwrap();
        let b = db.create_tenant("b").await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                db.create_file(new_file(&a.id, &format!("f{i}"), None))
                    .await
                    .unwrap()
                    .0
                    .id,
            );
        }
        let fb = db.create_file(new_file(&b.id, "fb", None)).await.unwrap().0;
        ids.reverse(); // newest first

        let p1 = db.list_files(&a.id, None, None, 2).await.unwrap();
        assert_eq!(
            p1.data.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
            ids[0..2],
            "{}",
            t.label
        );
        assert!(p1.has_more);
        let p2 = db.list_files(&a.id, None, Some(&ids[1]), 2).await.unwrap();
        assert_eq!(
            p2.data.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
            ids[2..4]
        );
        assert!(p2.has_more);
        let p3 = db.list_files(&a.id, None, Some(&ids[3]), 2).await.unwrap();
        assert_eq!(
            p3.data.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
            ids[4..5]
        );
        assert!(!p3.has_more);
        let exact = db.list_files(&a.id, None, None, 5).await.unwrap();
        assert_eq!(exact.data.len(), 5);
        assert!(!exact.has_more);

        // Bad cursors: unknown id, or another tenant's id.
        let err = db
            .list_files(&a.id, None, Some("file-nope"), 2)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidCursor { .. }), "{err}");
        let err = db
            .list_files(&a.id, None, Some(&fb.id), 2)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidCursor { .. }), "{err}");
        // Bad limits.
        assert!(matches!(
            db.list_files(&a.id, None, None, 0).await,
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            db.list_jobs(&a.id, None, None, 1_000_000).await,
            Err(Error::InvalidInput(_))
        ));

        // Jobs paginate the same way.
        let (tenant, file) = common::tenant_with_file(db, "jobs").await;
        let mut jobs = Vec::new();
        for _ in 0..3 {
            jobs.push(common::submit(db, &tenant, &file).await.id);
        }
        let page = db
            .list_jobs(&tenant.id, None, Some(&jobs[2]), 1)
            .await
            .unwrap();
        assert_eq!(page.data[0].id, jobs[1]);
        assert!(page.has_more);
        assert!(
            db.list_jobs(&a.id, None, None, 10)
                .await
                .unwrap()
                .data
                .is_empty()
        );

        // …and filter by status: a queued job cancelled is cancelled at once.
        db.request_cancel(&tenant.id, &jobs[1]).await.unwrap();
        let ids = |page: storage::Page<storage::Job>| -> Vec<String> {
            page.data.into_iter().map(|j| j.id).collect()
        };
        let cancelled = db
            .list_jobs(&tenant.id, Some(JobStatus::Cancelled), None, 10)
            .await
            .unwrap();
        assert_eq!(ids(cancelled), vec![jobs[1].clone()]);
        let queued = db
            .list_jobs(&tenant.id, Some(JobStatus::Queued), None, 10)
            .await
            .unwrap();
        assert_eq!(ids(queued), vec![jobs[2].clone(), jobs[0].clone()]);
        let page = db
            .list_jobs(&tenant.id, Some(JobStatus::Queued), Some(&jobs[2]), 10)
            .await
            .unwrap();
        assert_eq!(ids(page), vec![jobs[0].clone()]);
        assert!(
            db.list_jobs(&tenant.id, Some(JobStatus::Running), None, 10)
                .await
                .unwrap()
                .data
                .is_empty()
        );
    }
}

#[tokio::test]
async fn base_models_registry() {
    for t in common::databases("base_models_registry").await {
        let db = &t.db;
        let model = db
            .register_base_model(NewBaseModel {
                id: "mamba-130m".into(),
                location: "models/mamba-130m".into(),
                config_hash: "abc".into(),
                config: json!({"d_model": 768, "n_layer": 24}),
            })
            .await
            .unwrap();
        assert_eq!(model.config["d_model"], 768);
        let dup = db
            .register_base_model(NewBaseModel {
                id: "mamba-130m".into(),
                location: "/elsewhere".into(),
                config_hash: "def".into(),
                config: json!({}),
            })
            .await;
        assert!(matches!(dup, Err(Error::Conflict(_))), "{}", t.label);
        assert_eq!(db.get_base_model("mamba-130m").await.unwrap(), model);
        assert_eq!(db.list_base_models().await.unwrap(), vec![model.clone()]);
        assert_eq!(db.delete_base_model("mamba-130m").await.unwrap(), model);
        assert!(
            db.get_base_model("mamba-130m")
                .await
                .unwrap_err()
                .is_not_found()
        );
    }
}

#[tokio::test]
async fn jobs_events_metrics_checkpoints_adapters() {
    for t in common::databases("jobs_events_metrics_checkpoints_adapters").await {
        let db = &t.db;
        let (a, file) = common::tenant_with_file(db, "a").await;
        let (b, _) = common::tenant_with_file(db, "b").await;
        let mut new = NewJob::new(&a.id, "mamba-130m", &file.id);
        new.method = json!({"type": "lora", "r": 8, "targets": ["in_proj"]});
        new.hyperparameters = json!({"n_epochs": 2, "learning_rate": 1e-3});
        new.seed = 7;
        new.suffix = Some("demo".into());
        new.trainable_params = Some(12345);
        new.idempotency_key = Some("job-1".into());
        let (job, created) = db.create_job(new.clone()).await.unwrap();
        assert!(created);
        assert!(job.id.starts_with("ftjob-"));
        assert_eq!(job.status, JobStatus::ValidatingFiles);
        assert_eq!(job.method["r"], 8);
        assert_eq!(job.hyperparameters["learning_rate"], 1e-3);
        assert_eq!(
            (job.seed, job.trainable_params, job.attempts),
            (7, Some(12345), 0)
        );
        assert!(!job.cancel_requested);
        // Idempotent create.
        let (same, created) = db.create_job(new).await.unwrap();
        assert!(!created);
        assert_eq!(same.id, job.id);

        // Isolation.
        assert!(db.get_job(&b.id, &job.id).await.unwrap_err().is_not_found());
        assert!(
            db.list_job_events(&b.id, &job.id, None, 10)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(
            db.request_cancel(&b.id, &job.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(db.enqueue(&b.id, &job.id).await.unwrap_err().is_not_found());

        let job = db.enqueue(&a.id, &job.id).await.unwrap();
        assert_eq!(job.status, JobStatus::Queued);
        let err = db.enqueue(&a.id, &job.id).await.unwrap_err();
        assert!(matches!(err, Error::InvalidState { .. }), "{err}");

        let claimed = db
            .claim("w1", std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.id, job.id);
        db.update_progress(
            &job.id,
            "w1",
            &Progress {
                step: 5,
                total_steps: Some(10),
                tokens_seen: 640,
                eta_seconds: Some(30),
                metrics: Some(json!({"train_loss": 1.5})),
            },
        )
        .await
        .unwrap();
        for step in [5, 10] {
            db.record_metric(
                &job.id,
                "w1",
                &JobMetric {
                    step,
                    train_loss: Some(2.0 / step as f64),
                    learning_rate: Some(1e-3),
                    tokens_per_second: Some(100.0),
                    tokens_seen: Some(step * 128),
                    ..JobMetric::default()
                },
            )
            .await
            .unwrap();
        }
        // Re-recording a step (after a resume) replaces it.
        db.record_metric(
            &job.id,
            "w1",
            &JobMetric {
                step: 10,
                train_loss: Some(0.1),
                ..JobMetric::default()
            },
        )
        .await
        .unwrap();
        let metrics = db.list_job_metrics(&a.id, &job.id, None, 10).await.unwrap();
        assert_eq!(
            metrics.data.iter().map(|m| m.step).collect::<Vec<_>>(),
            [5, 10]
        );
        assert_eq!(metrics.data[1].train_loss, Some(0.1));
        assert_eq!(
            db.list_job_metrics(&a.id, &job.id, Some(5), 10)
                .await
                .unwrap()
                .data
                .len(),
            1
        );
        // The validation series of a list of jobs: only steps with a validation value, in
        // step order, tagged with their job; unknown ids add nothing.
        for (step, loss) in [(14, 0.7), (12, 0.9)] {
            db.record_metric(
                &job.id,
                "w1",
                &JobMetric {
                    step,
                    // (The job's latest metrics keep the training loss checked below.)
                    train_loss: Some(0.1),
                    valid_loss: Some(loss),
                    ..JobMetric::default()
                },
            )
            .await
            .unwrap();
        }
        let series = db
            .validation_series(&[job.id.clone(), "ftjob-none".into()])
            .await
            .unwrap();
        let got: Vec<(String, i64, Option<f64>)> = series
            .into_iter()
            .map(|(id, m)| (id, m.step, m.valid_loss))
            .collect();
        assert_eq!(
            got,
            [
                (job.id.clone(), 12, Some(0.9)),
                (job.id.clone(), 14, Some(0.7))
            ]
        );
        assert!(db.validation_series(&[]).await.unwrap().is_empty());

        let c1 = db
            .add_checkpoint(&job.id, "w1", 5, "ckpt/5", Some(json!({"loss": 1.0})))
            .await
            .unwrap();
        let c2 = db
            .add_checkpoint(&job.id, "w1", 10, "ckpt/10", None)
            .await
            .unwrap();
        assert!(c1.id.starts_with("ftckpt-"));
        assert_eq!(
            db.latest_checkpoint(&job.id).await.unwrap().unwrap().id,
            c2.id
        );
        let cps = db.list_checkpoints(&a.id, &job.id, None, 1).await.unwrap();
        assert_eq!(cps.data[0].step, 10);
        assert!(cps.has_more);
        let cps = db
            .list_checkpoints(&a.id, &job.id, Some(&c2.id), 10)
            .await
            .unwrap();
        assert_eq!(cps.data.iter().map(|c| c.step).collect::<Vec<_>>(), [5]);
        assert!(
            db.list_checkpoints(&b.id, &job.id, None, 10)
                .await
                .unwrap_err()
                .is_not_found()
        );

        let running = db.get_job(&a.id, &job.id).await.unwrap();
        assert_eq!(
            (running.step, running.total_steps, running.tokens_seen),
            (5, Some(10), 640)
        );
        assert!(running.estimated_finish.is_some());
        assert_eq!(running.metrics.as_ref().unwrap()["train_loss"], 0.1);

        let (done, adapter) = db
            .complete_job(
                &job.id,
                "w1",
                JobResult {
                    fine_tuned_model: "ft:mamba-130m:demo:abc".into(),
                    adapter_object_prefix: format!("adapters/{}", job.id),
                    adapter_bytes: 4096,
                    adapter_config: json!({"peft_type": "LORA", "r": 8}),
                },
            )
            .await
            .unwrap();
        assert_eq!(done.status, JobStatus::Succeeded);
        assert_eq!(done.result_adapter_id.as_deref(), Some(adapter.id.as_str()));
        assert_eq!(
            done.fine_tuned_model.as_deref(),
            Some("ft:mamba-130m:demo:abc")
        );
        assert!(done.finished_at.is_some() && done.lease_owner.is_none());
        assert_eq!(
            (adapter.tenant_id.as_str(), adapter.base_model.as_str()),
            (a.id.as_str(), "mamba-130m")
        );
        assert_eq!(adapter.job_id.as_deref(), Some(job.id.as_str()));
        // Finished: no more worker calls, no cancel.
        assert!(matches!(
            db.heartbeat(&job.id, "w1", std::time::Duration::from_secs(1))
                .await,
            Err(Error::LeaseLost { .. })
        ));
        let err = db.request_cancel(&a.id, &job.id).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidState { state, .. } if state == "succeeded"),
            "{err}"
        );
        assert_eq!(err.http_status(), 409);

        // Adapters: lookups, isolation, pagination, name uniqueness.
        assert_eq!(db.get_adapter(&a.id, &adapter.id).await.unwrap(), adapter);
        assert_eq!(
            db.get_adapter_by_name(&a.id, "ft:mamba-130m:demo:abc")
                .await
                .unwrap(),
            adapter
        );
        assert!(
            db.get_adapter(&b.id, &adapter.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        let imported = db
            .create_adapter(NewAdapter {
                tenant_id: a.id.clone(),
                job_id: None,
                base_model: "mamba-130m".into(),
                name: "imported".into(),
                object_prefix: "adapters/imported".into(),
                bytes: 1,
                config: json!({}),
            })
            .await
            .unwrap();
        let dup = db
            .create_adapter(NewAdapter {
                tenant_id: a.id.clone(),
                job_id: None,
                base_model: "mamba-130m".into(),
                name: "imported".into(),
                object_prefix: "x".into(),
                bytes: 1,
                config: json!({}),
            })
            .await;
        assert!(matches!(dup, Err(Error::Conflict(_))));
        let page = db.list_adapters(&a.id, None, 1).await.unwrap();
        assert_eq!(page.data[0].id, imported.id);
        assert!(page.has_more);
        assert!(
            db.list_adapters(&b.id, None, 10)
                .await
                .unwrap()
                .data
                .is_empty()
        );
        assert!(
            db.delete_adapter(&b.id, &imported.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        db.delete_adapter(&a.id, &imported.id).await.unwrap();

        // Events: per-job sequence, newest first, cursor, and the streaming form.
        let events = db.list_job_events(&a.id, &job.id, None, 100).await.unwrap();
        let seqs: Vec<i64> = events.data.iter().map(|e| e.seq).collect();
        let mut expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        expected.reverse();
        assert_eq!(seqs, expected, "{}", t.label);
        assert!(events.data[0].message.contains("successfully completed"));
        assert!(
            events
                .data
                .last()
                .unwrap()
                .message
                .starts_with("Created fine-tuning job")
        );
        assert!(
            events
                .data
                .iter()
                .all(|e| e.id.starts_with("ftevent-") && e.job_id == job.id)
        );
        let older = db
            .list_job_events(&a.id, &job.id, Some(&events.data[1].id), 2)
            .await
            .unwrap();
        assert_eq!(
            older.data.iter().map(|e| e.seq).collect::<Vec<_>>(),
            seqs[2..4]
        );
        let since = db.job_events_since(&a.id, &job.id, 2, 100).await.unwrap();
        assert_eq!(since.first().map(|e| e.seq), Some(3));
        assert_eq!(since.len(), seqs.len() - 2);

        db.add_job_event(
            &job.id,
            EventLevel::Info,
            "metrics",
            "step 10",
            Some(json!({"step": 10})),
        )
        .await
        .unwrap();
        let latest = db.list_job_events(&a.id, &job.id, None, 1).await.unwrap();
        assert_eq!(latest.data[0].event_type, "metrics");
        assert_eq!(latest.data[0].data, Some(json!({"step": 10})));

        // A job can be rejected while validating.
        let (j2, _) = db
            .create_job(NewJob::new(&a.id, "mamba-130m", &file.id))
            .await
            .unwrap();
        let rejected = db
            .reject_job(
                &a.id,
                &j2.id,
                JobError::new("invalid_training_file", "bad line").with_line(3),
            )
            .await
            .unwrap();
        assert_eq!(rejected.status, JobStatus::Failed);
        assert_eq!(rejected.error.as_ref().unwrap().line, Some(3));
        assert_eq!(
            serde_json::to_value(&rejected.error).unwrap()["type"],
            "invalid_training_file"
        );

        let counts = db.job_status_counts().await.unwrap();
        let get = |s: JobStatus| counts.iter().find(|(x, _)| *x == s).unwrap().1;
        assert_eq!(
            (
                get(JobStatus::Succeeded),
                get(JobStatus::Failed),
                get(JobStatus::Queued)
            ),
            (1, 1, 0)
        );
        assert_eq!(db.queue_depth().await.unwrap(), 0);
    }
}
