//! Image fine-tuning as a service, end to end with real processes, on SQLite + local files
//! and (when the test services are configured) PostgreSQL + the S3 server: each Vision Mamba
//! fixture checkpoint is registered, an ImageFolder zip with `train/` and `val/` splits is
//! uploaded (its classes fixed at upload), LoRA and ProDiaL jobs train on it through the
//! workers and validate above chance on the split, and the validation images are classified
//! with each fine-tuned model hot-swapped, merged, in this process from the downloaded
//! adapter and through `molt classify`: the same probabilities within 1e-5. Another tenant
//! sees none of it, and bad uploads, jobs and requests get their errors.
//!
//! Image size and class count come from each checkpoint's config.

mod common;

#[path = "../../trainer/tests/common/mod.rs"]
mod fixtures;

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use candle_core::{DType, Device, Tensor};
use common::{Backend, ServeOptions, Server};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use trainer::model::Family;
use trainer::model::vim::{EvalTransform, Mode, VimCheckpoint, VimLoadOptions};

/// A PNG of `[h, w]` with a bright square in quadrant `k` (row-major) on a noisy background.
fn quadrant_png(h: u32, w: u32, k: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let (qy, qx) = ((k / 2) as u32, (k % 2) as u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = (state >> 58) as u8; // 0..63
        let inside = y / (h / 2).max(1) == qy && x / (w / 2).max(1) == qx;
        let v = if inside { 190 + noise } else { 20 + noise };
        image::Rgb([v, v, v])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// A zip with `train/` (per class `n_train`) and `val/` (per class `n_val`) splits; returns
/// it and the validation images in class order.
fn split_zip(
    size: [usize; 2],
    classes: &[String],
    n_train: usize,
    n_val: usize,
) -> (Vec<u8>, Vec<(usize, Vec<u8>)>) {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut val = Vec::new();
    let mut seed = 1;
    for (k, class) in classes.iter().enumerate() {
        for (split, n) in [("train", n_train), ("val", n_val)] {
            for i in 0..n {
                seed += 1;
                let png = quadrant_png(size[0] as u32, size[1] as u32, k, seed);
                z.start_file(format!("shapes/{split}/{class}/{i:03}.png"), opts)
                    .expect("start");
                z.write_all(&png).expect("write");
                if split == "val" {
                    val.push((k, png));
                }
            }
        }
    }
    (z.finish().expect("zip").into_inner(), val)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `/v1/classifications` with every class: probabilities by class index, per image.
async fn classify(
    s: &Server,
    key: &str,
    model: &str,
    images: &[String],
    k: usize,
) -> Vec<Vec<f64>> {
    let (st, v) = s
        .call(
            s.req_as(key, Method::POST, "/v1/classifications")
                .json(&json!({"model": model, "images": images, "top_k": k})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "classify with {model}: {v}");
    assert_eq!(v["usage"]["images"], images.len(), "{v}");
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            let mut p = vec![f64::NAN; k];
            let preds = d["predictions"].as_array().expect("predictions");
            assert_eq!(preds.len(), k, "{d}");
            // Most likely first.
            let probs: Vec<f64> = preds
                .iter()
                .map(|x| x["probability"].as_f64().expect("probability"))
                .collect();
            assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{d}");
            for x in preds {
                p[x["index"].as_u64().expect("index") as usize] =
                    x["probability"].as_f64().expect("p");
            }
            p
        })
        .collect()
}

fn assert_probs_close(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() < 1e-5, "{what}: {g:?} vs {w:?}");
        }
    }
}

fn error_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn vision_service(backend: Backend) {
    let label = backend.label;
    let s = Server::start(ServeOptions {
        backend,
        workers: 1,
        lease_seconds: 10,
        ..ServeOptions::default()
    })
    .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, other_key) = s.new_tenant("vision-other").await;
    // A language model, which /v1/classifications refuses.
    s.register_model("lm", &common::tiny_model_dir()).await;
    for (ci, case) in fixtures::indexed_cases(Family::Vim, "vim_model")
        .into_iter()
        .enumerate()
    {
        let dir = case.path("model_dir");
        let id = format!("vim-{ci}");
        s.register_model(&id, &dir).await;
        let base = VimCheckpoint::load(&dir, &VimLoadOptions::default())
            .and_then(|c| c.into_frozen())
            .expect("base");
        let size = base.config.img_size;
        let n_classes = base.config.num_classes.min(4);
        assert!(n_classes >= 2, "{}: needs two classes", case.label);
        let classes: Vec<String> = (0..n_classes).map(|k| format!("quadrant{k}")).collect();
        let (zip, val) = split_zip(size, &classes, 14, 3);

        let (st, file) = s.upload("shapes.zip", zip.clone()).await;
        assert_eq!(st, StatusCode::OK, "{file}");
        assert_eq!(file["status"], "processed", "{label}: {file}");
        assert_eq!(file["dataset"]["kind"], "images", "{file}");
        assert_eq!(file["dataset"]["format"], "zip", "{file}");
        assert_eq!(file["dataset"]["classes"], json!(classes), "{file}");
        assert_eq!(file["dataset"]["split"], true, "{file}");
        assert_eq!(file["dataset"]["train_examples"], 14 * n_classes, "{file}");
        assert_eq!(
            file["dataset"]["validation_examples"],
            3 * n_classes,
            "{file}"
        );
        let file_id = file["id"].as_str().expect("id").to_string();

        // The base itself classifies with its own head.
        let images: Vec<String> = val.iter().map(|(_, png)| b64(png)).collect();
        let own = base.config.num_classes;
        let probs = classify(&s, &s.key, &id, &images[..2], own).await;
        assert!(
            probs
                .iter()
                .all(|p| (p.iter().sum::<f64>() - 1.0).abs() < 1e-4),
            "{probs:?}"
        );

        // The evaluation transform applied here, for the in-process reference.
        let transform = EvalTransform::for_image_size(size);
        let pixels: Vec<Tensor> = val
            .iter()
            .map(|(_, png)| {
                let img = image::load_from_memory(png).expect("png").to_rgb8();
                transform.apply(&img, &Device::Cpu).expect("transform")
            })
            .collect();
        let pixels = Tensor::stack(&pixels, 0).expect("stack");

        let (d, e) = (base.config.embed_dim, base.config.d_inner());
        let blocks = |w: usize| w / (2..=w).find(|q| w.is_multiple_of(*q)).unwrap_or(1);
        let methods = [
            json!({"type": "lora", "targets": ["in_proj", "x_proj"], "r": 4, "s": 1.0}),
            json!({"type": "prodial", "targets": ["in_proj", "out_proj"],
                   "r_b": {"in_proj": blocks(d), "out_proj": blocks(e)}, "r_eps": 4}),
        ];
        for (k, method) in methods.iter().enumerate() {
            let what = format!("{label} {} {}", case.label, method["type"]);
            let (st, job) = s
                .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
                    "model": id,
                    "training_file": file_id,
                    "method": method,
                    "hyperparameters": {"n_epochs": 6, "batch_size": 8, "learning_rate": 0.01,
                                        "warmup_ratio": 0},
                    "seed": 5 + k,
                    "suffix": format!("vis-{k}"),
                })))
                .await;
            assert_eq!(st, StatusCode::OK, "{what}: {job}");
            // The vision recipe's defaults fill what the request leaves out.
            assert_eq!(job["hyperparameters"]["weight_decay"], 1e-4, "{job}");
            assert_eq!(job["hyperparameters"]["lr_scheduler"], "cosine", "{job}");
            let job_id = job["id"].as_str().expect("id").to_string();
            let job = s.wait_job(&job_id, Duration::from_secs(300)).await;
            assert_eq!(
                job["status"],
                "succeeded",
                "{what}: {job}\n{}",
                s.log_text()
            );

            // Validated every epoch on the val/ split, ending well above chance.
            let accs: Vec<f64> = s
                .events(&job_id)
                .await
                .iter()
                .filter_map(|ev| ev["data"]["valid_accuracy"].as_f64())
                .collect();
            assert_eq!(accs.len(), 6, "{what}: one validation per epoch: {accs:?}");
            let chance = 1.0 / n_classes as f64;
            eprintln!("{what}: validation accuracy by epoch {accs:?}");
            let last = *accs.last().expect("accuracy");
            assert!(
                last >= (chance + 0.4).min(0.9),
                "{what}: accuracy {accs:?} (chance {chance})"
            );

            let ft = job["fine_tuned_model"].as_str().expect("ft").to_string();
            let adapter_id = job["adapter_id"].as_str().expect("adapter").to_string();

            // The downloaded adapter carries the class names; applied here it is the reference.
            let dest = tmp.path().join(format!("{id}-adapter-{k}"));
            s.download_adapter(&ft, &dest);
            let names: Vec<String> = serde_json::from_slice(
                &std::fs::read(dest.join("classes.json")).expect("classes.json"),
            )
            .expect("names");
            assert_eq!(names, classes);
            let base_k = VimCheckpoint::load(
                &dir,
                &VimLoadOptions {
                    num_classes: Some(n_classes),
                    ..VimLoadOptions::default()
                },
            )
            .and_then(|c| c.into_frozen())
            .expect("base with the dataset's classes");
            let adapter = trainer::peft::Adapter::load(&dest, &base_k).expect("adapter");
            let adapted = adapter.apply(&base_k).expect("apply");
            let logits = adapted
                .forward(&pixels, Mode::Eval, None)
                .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec2::<f32>()?))
                .expect("forward");
            let want: Vec<Vec<f64>> = logits
                .iter()
                .map(|l| {
                    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f64> = l.iter().map(|x| f64::from(x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    e.iter().map(|x| x / sum).collect()
                })
                .collect();

            // Hot-swapped, then merged: the same probabilities; labels are the class names.
            let hot = classify(&s, &s.key, &ft, &images, n_classes).await;
            assert_probs_close(&hot, &want, &format!("{what} hot-swapped"));
            // Warm and evict work on vision adapters as on language ones.
            let (st, r) = s
                .call(s.req(Method::POST, &format!("/v1/adapters/{adapter_id}/load")))
                .await;
            assert_eq!(st, StatusCode::OK, "{r}");
            assert_eq!(r["resident"], true, "{r}");
            assert!(r["bytes"].as_u64().unwrap_or(0) > 0, "{r}");
            let (st, r) = s
                .call(s.req(Method::DELETE, &format!("/v1/adapters/{adapter_id}/load")))
                .await;
            assert_eq!(st, StatusCode::OK, "{r}");
            assert_eq!(r["resident"], false, "{r}");
            // Concurrent requests (which the batcher may run in one pass) each get their own
            // images' answers.
            let answers = futures::future::join_all(images.iter().enumerate().map(|(i, img)| {
                let s = &s;
                let ft = &ft;
                async move {
                    let one = std::slice::from_ref(img);
                    (i, classify(s, &s.key, ft, one, n_classes).await)
                }
            }))
            .await;
            for (i, p) in answers {
                assert_probs_close(&p, &hot[i..=i], &format!("{what} concurrent image {i}"));
            }
            let (st, m) = s
                .call(s.req(Method::POST, &format!("/v1/adapters/{adapter_id}/merge")))
                .await;
            assert_eq!(st, StatusCode::OK, "{what}: {m}");
            let merged = m["id"].as_str().expect("merged id").to_string();
            let mv = classify(&s, &s.key, &merged, &images, n_classes).await;
            assert_probs_close(&mv, &hot, &format!("{what} merged"));
            let correct = hot
                .iter()
                .zip(&val)
                .filter(|(p, (label, _))| {
                    p.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i)
                        == Some(*label)
                })
                .count();
            assert!(
                correct as f64 / val.len() as f64 >= (chance + 0.4).min(0.9),
                "{what}: {correct}/{} classified right",
                val.len()
            );

            // The CLI prints the same top class with its name.
            let img_path = tmp.path().join(format!("{id}-{k}-val0.png"));
            std::fs::write(&img_path, &val[0].1).expect("write");
            let img = img_path.display().to_string();
            let out = s.client(&["classify", "--model", &ft, "--top-k", "1", &img]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let cols: Vec<&str> = text.trim().split('\t').collect();
            let top = hot[0]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .expect("top");
            assert_eq!(cols.get(2).copied(), Some(classes[top].as_str()), "{text}");
            let p: f64 = cols
                .get(4)
                .and_then(|c| c.parse().ok())
                .expect("probability");
            assert!((p - hot[0][top]).abs() < 1e-5, "{text}");

            // Another tenant sees none of it.
            for model in [&ft, &merged, &adapter_id] {
                let (st, v) = s
                    .call(
                        s.req_as(&other_key, Method::POST, "/v1/classifications")
                            .json(&json!({"model": model, "images": [images[0].clone()]})),
                    )
                    .await;
                assert_eq!(st, StatusCode::NOT_FOUND, "{model}: {v}");
            }
        }
        let (st, _) = s
            .call(s.req_as(&other_key, Method::GET, &format!("/v1/files/{file_id}")))
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);

        bad_requests(&s, &id, &file_id, &classes, size).await;
    }
}

/// Bad uploads, jobs and classification requests on a vision base: each status and message.
async fn bad_requests(s: &Server, id: &str, file_id: &str, classes: &[String], size: [usize; 2]) {
    // A corrupt image in the archive: stored with status error naming the entry.
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for (k, c) in classes.iter().enumerate() {
        z.start_file(format!("{c}/a.png"), opts).expect("start");
        z.write_all(&quadrant_png(size[0] as u32, size[1] as u32, k, 9))
            .expect("write");
    }
    z.start_file(format!("{}/broken.png", classes[0]), opts)
        .expect("start");
    z.write_all(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDRtruncated")
        .expect("write");
    let (st, f) = s
        .upload("broken.zip", z.finish().expect("zip").into_inner())
        .await;
    assert_eq!(st, StatusCode::OK, "{f}");
    assert_eq!(f["status"], "error", "{f}");
    let details = f["status_details"].as_str().unwrap_or_default();
    assert!(
        details.contains(&format!(
            "{}/broken.png: cannot decode the image",
            classes[0]
        )),
        "{details}"
    );
    let broken = f["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": id, "training_file": broken, "method": {"type": "lora", "r": 2}
        })))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_message(&v).contains("broken.png"), "{v}");

    // More bad archives, each stored as an error naming the entry.
    let png = quadrant_png(size[0] as u32, size[1] as u32, 0, 13);
    let tar_of = |members: &[(&str, tar::EntryType, &[u8])]| {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in members {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar")
    };
    let file = tar::EntryType::Regular;
    let good = [
        ("a/1.png", file, png.as_slice()),
        ("b/1.png", file, png.as_slice()),
    ];
    let with = |extra: (&'static str, tar::EntryType, &'static [u8])| {
        let mut m: Vec<(&str, tar::EntryType, &[u8])> = good.to_vec();
        m.push(extra);
        tar_of(&m)
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "zero-byte entry",
            with(("a/empty.png", file, b"")),
            "a/empty.png: the entry is empty",
        ),
        (
            "path traversal",
            with(("../evil.png", file, b"x")),
            "../evil.png: a path with '..'",
        ),
        (
            "absolute path",
            with(("/etc/x.png", file, b"x")),
            "/etc/x.png: an absolute path",
        ),
        (
            "symlink",
            with(("a/link.png", tar::EntryType::Symlink, b"")),
            "a/link.png: links are not accepted",
        ),
        (
            "empty class folder",
            with(("c/", tar::EntryType::Directory, b"")),
            "c/: the class folder has no image",
        ),
        (
            "image outside a class",
            with(("loose.png", file, b"x")),
            "loose.png: an image must be inside a class folder",
        ),
    ];
    for (what, bytes, want) in cases {
        let (st, f) = s.upload("bad.tar", bytes).await;
        assert_eq!(st, StatusCode::OK, "{what}: {f}");
        assert_eq!(f["status"], "error", "{what}: {f}");
        let details = f["status_details"].as_str().unwrap_or_default();
        assert!(details.contains(want), "{what}: {details}");
    }
    // A decompression bomb: a zip entry declaring more bytes than an image may have.
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let big = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    z.start_file("a/bomb.png", big).expect("start");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..40 {
        z.write_all(&zeros).expect("write");
    }
    let (st, f) = s
        .upload("bomb.zip", z.finish().expect("zip").into_inner())
        .await;
    assert_eq!(st, StatusCode::OK, "{f}");
    assert_eq!(f["status"], "error", "{f}");
    assert!(
        f["status_details"]
            .as_str()
            .unwrap_or_default()
            .contains("a/bomb.png: 41943040 bytes; an image may have at most"),
        "{f}"
    );

    // A text dataset for a vision model.
    let (st, text) = s.upload("text.jsonl", common::text_dataset(4)).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": id, "training_file": text["id"], "method": {"type": "lora", "r": 2}
        })))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "training_file", "{v}");
    assert!(error_message(&v).contains("needs an image dataset"), "{v}");

    // A validation file with other classes: both lists named.
    let mut lines = String::new();
    for (k, _) in classes.iter().enumerate().take(2) {
        let png = quadrant_png(size[0] as u32, size[1] as u32, k, 11);
        lines.push_str(&format!(
            "{{\"image\": \"{}\", \"label\": \"other{k}\"}}\n",
            b64(&png)
        ));
    }
    let (st, other) = s.upload("other.jsonl", lines.into_bytes()).await;
    assert_eq!(st, StatusCode::OK, "{other}");
    assert_eq!(other["status"], "processed", "{other}");
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/fine_tuning/jobs").json(&json!({
            "model": id, "training_file": file_id, "validation_file": other["id"],
            "method": {"type": "lora", "r": 2}
        })))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let msg = error_message(&v);
    assert!(
        msg.contains("[other0, other1]") && msg.contains(&format!("[{}]", classes.join(", "))),
        "{v}"
    );

    // Classification requests.
    let png = b64(&quadrant_png(size[0] as u32, size[1] as u32, 0, 12));
    let cases = [
        (
            json!({"model": id, "images": ["not base64!"]}),
            StatusCode::BAD_REQUEST,
            "images[0]",
        ),
        (
            json!({"model": id, "images": [b64(b"hello")]}),
            StatusCode::BAD_REQUEST,
            "images[0]",
        ),
        (
            json!({"model": id, "images": []}),
            StatusCode::BAD_REQUEST,
            "images",
        ),
        (
            json!({"model": id, "images": [png.clone()], "top_k": 0}),
            StatusCode::BAD_REQUEST,
            "top_k",
        ),
        (
            json!({"model": id, "images": [png.clone()], "top_k": 100_000}),
            StatusCode::BAD_REQUEST,
            "top_k",
        ),
        (
            json!({"model": id, "images": vec![png.clone(); 65]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "images",
        ),
        (
            json!({"model": "no-such-model", "images": [png.clone()]}),
            StatusCode::NOT_FOUND,
            "model",
        ),
        (
            json!({"model": "lm", "images": [png.clone()]}),
            StatusCode::BAD_REQUEST,
            "model",
        ),
    ];
    for (body, want, param) in cases {
        let (st, v) = s
            .call(s.req(Method::POST, "/v1/classifications").json(&body))
            .await;
        assert_eq!(st, want, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(!error_message(&v).is_empty(), "{v}");
    }
    // And a vision model where text is expected.
    let (st, v) = s
        .call(s.req(Method::POST, "/v1/completions").json(&json!({
            "model": id, "prompt": "hello", "max_tokens": 2
        })))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_message(&v).contains("/v1/classifications"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_fine_tuning_on_sqlite_and_local_files() {
    vision_service(Backend::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_fine_tuning_on_postgres_and_s3() {
    match Backend::postgres_s3() {
        Some(b) => vision_service(b).await,
        None => eprintln!(
            "skipped: set MOLT_TEST_DATABASE_URL and MOLT_TEST_S3_ENDPOINT (scripts/test-services.sh does)"
        ),
    }
}
