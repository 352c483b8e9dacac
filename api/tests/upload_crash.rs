//! The server is killed (SIGKILL) in the middle of a large upload: after a restart there is
//! no file record and no visible object — on SQLite + local files, and on PostgreSQL + S3
//! when those are configured. The upload is sent over a raw socket so the test controls
//! exactly how much of the body the server has seen.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Backend, ServeOptions, Server};

/// Starts a multipart upload of about 24 MiB and sends the first ~12 MiB of it.
fn start_partial_upload(server: &Server) -> TcpStream {
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut sock = TcpStream::connect(&addr).expect("connect");
    let boundary = "molt-test-boundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    );
    let total_body = head.len() + 24 * 1024 * 1024 + boundary.len() + 8;
    write!(
        sock,
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total_body}\r\n\r\n{head}",
        server.key
    )
    .expect("headers");
    let line = b"{\"text\": \"a line of a large dataset that never finishes uploading......\"}\n";
    let mut chunk = Vec::with_capacity(1024 * 1024);
    while chunk.len() + line.len() <= 1024 * 1024 {
        chunk.extend_from_slice(line);
    }
    for _ in 0..12 {
        sock.write_all(&chunk).expect("body");
    }
    sock.flush().expect("flush");
    sock
}

/// Every object key under the store, visible ones only (what a reader could see).
async fn visible_objects(server: &Server) -> Vec<String> {
    let store = server
        .options
        .backend
        .store
        .clone()
        .unwrap_or_else(|| server.data_dir.join("blobs").display().to_string());
    let blobs = storage::BlobStore::from_url(&store).expect("store");
    blobs
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key)
        .collect()
}

async fn killed_mid_upload(backend: Backend) {
    let server = Server::start(ServeOptions {
        backend: backend.clone(),
        ..ServeOptions::default()
    })
    .await;
    let mut server = server;
    let sock = start_partial_upload(&server);
    // Give the server time to stream what it got into the store.
    let staged = server.data_dir.join("blobs").join(".molt-tmp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while backend.store.is_none() && Instant::now() < deadline {
        let n = std::fs::read_dir(staged.join("uploads"))
            .map(|d| d.count())
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    drop(sock);

    let data_dir = server.data_dir.clone();
    let options = ServeOptions {
        backend: backend.clone(),
        data_dir: Some(data_dir),
        ..ServeOptions::default()
    };
    // Keep the temporary directory alive: restart on the same data dir.
    let restarted = Server::start(options).await;
    let files = restarted.get_ok("/v1/files").await;
    assert_eq!(
        files["data"],
        serde_json::json!([]),
        "{}: a file record survived: {files}",
        backend.label
    );
    let objects = visible_objects(&restarted).await;
    assert!(
        objects.iter().all(|k| !k.starts_with("files/")),
        "{}: a visible object survived: {objects:?}",
        backend.label
    );
    drop(restarted);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_upload_leaves_nothing_visible() {
    killed_mid_upload(Backend::local()).await;
    match Backend::postgres_s3() {
        Some(b) => killed_mid_upload(b).await,
        None => eprintln!(
            "skipping the PostgreSQL + S3 variant: MOLT_TEST_DATABASE_URL / MOLT_TEST_S3_ENDPOINT not set"
        ),
    }
}
