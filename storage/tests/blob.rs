//! Blob-store tests (local directory and memory always; S3 with `MOLT_TEST_S3_ENDPOINT`; see
//! `tests/common/mod.rs`).

mod common;

use bytes::Bytes;
use futures::StreamExt;
use storage::{BlobStore, Error};

/// Deterministic pseudo-random content.
fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

async fn visible_keys(store: &BlobStore) -> Vec<String> {
    store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect()
}

#[tokio::test]
async fn put_get_head_range_list_delete() {
    for s in common::blob_stores("put_get_head_range_list_delete") {
        let store = &s.store;
        let data = Bytes::from(content(1000, 1));
        let put = store.put("files/a", data.clone()).await.unwrap();
        assert_eq!(put.size, 1000);
        assert_eq!(put.sha256.len(), 64);
        store
            .put("files/b", Bytes::from_static(b"bee"))
            .await
            .unwrap();
        store
            .put("filesx/c", Bytes::from_static(b"sea"))
            .await
            .unwrap();
        store
            .put("files/sub/d", Bytes::from_static(b"dee"))
            .await
            .unwrap();

        assert_eq!(store.get("files/a").await.unwrap(), data, "{}", s.label);
        assert_eq!(
            store.get_range("files/a", 10..20).await.unwrap(),
            data.slice(10..20)
        );
        assert_eq!(
            store.get_range("files/a", 990..1000).await.unwrap(),
            data.slice(990..1000)
        );
        let head = store.head("files/a").await.unwrap();
        assert_eq!((head.key.as_str(), head.size), ("files/a", 1000));
        assert!(head.last_modified > 1_700_000_000);
        assert!(store.exists("files/b").await.unwrap());
        assert!(!store.exists("files/zzz").await.unwrap());

        let mut streamed = Vec::new();
        let mut blob = store.get_stream("files/a").await.unwrap();
        assert_eq!(blob.size, 1000);
        while let Some(chunk) = blob.stream.next().await {
            streamed.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(streamed, data);

        // Prefixes match whole segments.
        let listed: Vec<String> = store
            .list("files")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(listed, ["files/a", "files/b", "files/sub/d"], "{}", s.label);
        assert_eq!(store.list("files/").await.unwrap().len(), 3);
        assert_eq!(store.list("nothing-here").await.unwrap().len(), 0);

        let err = store.get("files/missing").await.unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { kind: "object", id } if id == "files/missing"),
            "{}: {err}",
            s.label
        );
        assert!(
            store
                .head("files/missing")
                .await
                .unwrap_err()
                .is_not_found()
        );

        store.delete("files/b").await.unwrap();
        store.delete("files/b").await.unwrap(); // idempotent
        assert!(!store.exists("files/b").await.unwrap());
        assert_eq!(store.delete_prefix("files").await.unwrap(), 2);
        assert_eq!(visible_keys(store).await, ["filesx/c"]);
        assert!(store.delete_prefix("").await.is_err());

        // Bad keys are refused before reaching the store.
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/../b",
            "dir/",
            ".molt-tmp/uploads/x",
            "x#1",
        ] {
            let err = store.put(bad, Bytes::from_static(b"x")).await.unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{bad:?}: {err}");
        }
    }
}

#[tokio::test]
async fn streaming_upload_is_invisible_until_commit() {
    for s in common::blob_stores("streaming_upload_is_invisible_until_commit") {
        let store = &s.store;
        // 11 MiB in odd-sized writes: three 5 MiB parts' worth, so a real multipart upload.
        let data = content(11 * 1024 * 1024 + 123, 2);
        let mut up = store.upload("datasets/big.jsonl").unwrap();
        for chunk in data.chunks(700 * 1024 + 7) {
            up.write(chunk).await.unwrap();
            assert!(
                !store.exists("datasets/big.jsonl").await.unwrap(),
                "{}: visible before commit",
                s.label
            );
        }
        assert_eq!(up.bytes_written(), data.len() as u64);
        assert!(
            visible_keys(store).await.is_empty(),
            "{}: nothing listed before commit",
            s.label
        );
        let done = up.commit().await.unwrap();
        assert_eq!(done.size, data.len() as u64);
        let expected_sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&data))
        };
        assert_eq!(done.sha256, expected_sha);
        assert_eq!(
            store.get("datasets/big.jsonl").await.unwrap(),
            data,
            "{}",
            s.label
        );
        assert_eq!(
            visible_keys(store).await,
            ["datasets/big.jsonl"],
            "{}: no temp leftovers",
            s.label
        );
        // No temporary objects remain either.
        assert_eq!(
            store
                .cleanup_stale_uploads(std::time::Duration::ZERO)
                .await
                .unwrap(),
            0,
            "{}",
            s.label
        );

        // A small upload (one PUT) and an empty one.
        let mut small = store.upload("datasets/small").unwrap();
        small.write(b"hello ").await.unwrap();
        small.write(b"world").await.unwrap();
        assert!(!store.exists("datasets/small").await.unwrap());
        small.commit().await.unwrap();
        assert_eq!(
            store.get("datasets/small").await.unwrap().as_ref(),
            b"hello world"
        );
        let empty = store.upload("datasets/empty").unwrap();
        assert_eq!(empty.commit().await.unwrap().size, 0);
        assert_eq!(
            store.head("datasets/empty").await.unwrap().size,
            0,
            "{}",
            s.label
        );

        // Committing over an existing key replaces it whole.
        let mut again = store.upload("datasets/small").unwrap();
        again.write(b"v2").await.unwrap();
        again.commit().await.unwrap();
        assert_eq!(store.get("datasets/small").await.unwrap().as_ref(), b"v2");
    }
}

#[tokio::test]
async fn aborted_or_rejected_uploads_leave_nothing() {
    for s in common::blob_stores("aborted_or_rejected_uploads_leave_nothing") {
        let store = &s.store;
        let data = content(6 * 1024 * 1024, 3);

        // Explicit abort after a part went out.
        let mut up = store.upload("x/aborted").unwrap();
        up.write(&data).await.unwrap();
        up.abort().await.unwrap();
        assert!(!store.exists("x/aborted").await.unwrap(), "{}", s.label);

        // Dropped without commit.
        let mut up = store.upload("x/dropped").unwrap();
        up.write(&data).await.unwrap();
        drop(up);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!store.exists("x/dropped").await.unwrap());

        // A validator rejecting the third line.
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"{\"a\":1}\n{\"a\":2}\n")),
            Ok(Bytes::from_static(b"not json\n")),
        ];
        let mut lines = 0usize;
        let mut validator = |chunk: &[u8]| {
            for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                lines += 1;
                if !line.starts_with(b"{") {
                    return Err(format!("line {lines}: expected a JSON object"));
                }
            }
            Ok(())
        };
        let err = store
            .put_stream(
                "x/rejected",
                futures::stream::iter(chunks),
                None,
                Some(&mut validator),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Rejected(m) if m == "line 3: expected a JSON object"),
            "{err}"
        );
        assert!(!store.exists("x/rejected").await.unwrap());

        // A source stream that fails halfway (a client disconnecting).
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from(data.clone())),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "client went away",
            )),
        ];
        let err = store
            .put_stream("x/broken", futures::stream::iter(chunks), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::UploadStream(m) if m.contains("client went away")),
            "{err}"
        );
        assert!(!store.exists("x/broken").await.unwrap());

        // Over the size limit.
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(data.clone()))];
        let err = store
            .put_stream("x/huge", futures::stream::iter(chunks), Some(1024), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge { limit: 1024 }), "{err}");
        assert_eq!(err.http_status(), 413);

        assert!(
            visible_keys(store).await.is_empty(),
            "{}: {:?}",
            s.label,
            visible_keys(store).await
        );

        // And a good stream goes through.
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"{\"a\":1}\n")),
            Ok(Bytes::from_static(b"{\"b\":2}\n")),
        ];
        let mut ok_validator = |_: &[u8]| Ok(());
        let done = store
            .put_stream(
                "x/good",
                futures::stream::iter(chunks),
                Some(1024),
                Some(&mut ok_validator),
            )
            .await
            .unwrap();
        assert_eq!(done.size, 16);
        assert_eq!(visible_keys(store).await, ["x/good"]);
    }
}

#[tokio::test]
async fn directory_upload_and_download() {
    for s in common::blob_stores("directory_upload_and_download") {
        let store = &s.store;
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("adapter_config.json"), b"{\"r\": 8}").unwrap();
        let weights = content(6 * 1024 * 1024 + 5, 4);
        std::fs::write(src.path().join("adapter_model.safetensors"), &weights).unwrap();
        std::fs::create_dir_all(src.path().join("extra/deeper")).unwrap();
        std::fs::write(src.path().join("extra/deeper/notes.txt"), b"hi").unwrap();

        let up = store
            .upload_dir(src.path(), "adapters/adapter-1")
            .await
            .unwrap();
        let keys: Vec<&str> = up.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "adapters/adapter-1/adapter_config.json",
                "adapters/adapter-1/adapter_model.safetensors",
                "adapters/adapter-1/extra/deeper/notes.txt"
            ],
            "{}",
            s.label
        );
        assert_eq!(store.list("adapters/adapter-1").await.unwrap().len(), 3);

        let dst = tempfile::tempdir().unwrap();
        let down = store
            .download_dir("adapters/adapter-1", dst.path())
            .await
            .unwrap();
        assert_eq!(down.len(), 3);
        assert_eq!(
            std::fs::read(dst.path().join("adapter_model.safetensors")).unwrap(),
            weights,
            "{}",
            s.label
        );
        assert_eq!(
            std::fs::read(dst.path().join("adapter_config.json")).unwrap(),
            b"{\"r\": 8}"
        );
        assert_eq!(
            std::fs::read(dst.path().join("extra/deeper/notes.txt")).unwrap(),
            b"hi"
        );
        // No partial files left in the destination.
        let names: Vec<String> = std::fs::read_dir(dst.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");

        // Single files, and a missing one.
        let one = dst.path().join("copy.json");
        assert_eq!(
            store
                .download_file("adapters/adapter-1/adapter_config.json", &one)
                .await
                .unwrap(),
            8
        );
        assert!(
            store
                .download_file("adapters/nope", &dst.path().join("nope"))
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(!dst.path().join("nope").exists());
        assert!(!dst.path().join(".nope.part").exists());
    }
}

#[tokio::test]
async fn stale_temporary_uploads_are_cleaned() {
    for s in common::blob_stores("stale_temporary_uploads_are_cleaned") {
        let store = &s.store;
        // Simulate a process killed after finishing a temporary object but before the move.
        let raw = store.object_store();
        use object_store::ObjectStoreExt;
        raw.put(
            &object_store::path::Path::from(format!("{}/upload-dead", storage::blob::TMP_PREFIX)),
            Bytes::from_static(b"partial").into(),
        )
        .await
        .unwrap();
        assert!(
            visible_keys(store).await.is_empty(),
            "{}: temp objects are never listed",
            s.label
        );
        // Fresh ones are kept, old ones removed.
        assert_eq!(
            store
                .cleanup_stale_uploads(std::time::Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .cleanup_stale_uploads(std::time::Duration::ZERO)
                .await
                .unwrap(),
            1,
            "{}",
            s.label
        );
    }
}

/// `s3://bucket/prefix` configured only from the `AWS_*` environment (as `molt serve
/// --store s3://…` is). Runs when `scripts/test-services.sh` exported `AWS_ENDPOINT_URL`.
#[tokio::test]
async fn s3_store_from_environment() {
    let (Ok(endpoint), Ok(_)) = (
        std::env::var(common::S3_ENV),
        std::env::var("AWS_ENDPOINT_URL"),
    ) else {
        eprintln!(
            "s3_store_from_environment: skipping S3 ({} / AWS_ENDPOINT_URL not set)",
            common::S3_ENV
        );
        return;
    };
    let bucket = std::env::var("MOLT_TEST_S3_BUCKET").unwrap_or_else(|_| "molt-test".into());
    let prefix = storage::ids::new_id("env");
    let store = BlobStore::from_url(&format!("s3://{bucket}/{prefix}")).unwrap();
    assert_eq!(store.backend(), storage::BlobBackend::S3);
    store.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(
        store.get("k").await.unwrap().as_ref(),
        b"v",
        "via {endpoint}"
    );
    assert_eq!(visible_keys(&store).await, ["k"]);
    // The prefix is applied: the object sits under it in the bucket.
    let root = BlobStore::from_url(&format!("s3://{bucket}")).unwrap();
    assert!(root.exists(&format!("{prefix}/k")).await.unwrap());
    store.delete("k").await.unwrap();
}

#[tokio::test]
async fn store_urls() {
    let dir = tempfile::tempdir().unwrap();
    let local = BlobStore::from_url(dir.path().join("b").to_str().unwrap()).unwrap();
    assert_eq!(local.backend(), storage::BlobBackend::Local);
    let file_url =
        BlobStore::from_url(&format!("file://{}", dir.path().join("c").display())).unwrap();
    assert_eq!(file_url.backend(), storage::BlobBackend::Local);
    assert_eq!(
        BlobStore::from_url("memory:").unwrap().backend(),
        storage::BlobBackend::Memory
    );
    assert!(matches!(
        BlobStore::from_url("gs://bucket"),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        BlobStore::from_url("s3://"),
        Err(Error::InvalidInput(_))
    ));
    let s3 = BlobStore::s3(&storage::S3Config {
        url: "s3://bucket/some/prefix".into(),
        endpoint: Some("http://127.0.0.1:1".into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("a".into()),
        secret_access_key: Some("b".into()),
        allow_http: Some(true),
    })
    .unwrap();
    assert_eq!(s3.to_string(), "s3://bucket/some/prefix");
}
