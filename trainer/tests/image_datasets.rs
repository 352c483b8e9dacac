//! Image datasets as files (`trainer::train::images::source`): the same labelled images as an
//! image folder, a zip (stored and deflated), a tar, a tar.gz and JSONL (base64 and data URLs,
//! integer and named labels) scan to the same classes and labels and read back the same
//! pixels; splits, wrapping folders and skipped files; and every bad input is refused with a
//! message naming the entry or line.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use trainer::train::images::source::{self, ImageFormat, ImageLimits, Role, Scanned};

/// A small PNG whose pixels encode `seed` (so images are told apart after a round trip).
fn png(seed: u32, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (seed * 37 + x * 11) as u8,
            (seed * 91 + y * 7) as u8,
            (seed * 13 + x * y) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

/// `(path inside the dataset, bytes)`: three classes with 2, 3 and 2 images.
fn members() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut seed = 0;
    for (class, n) in [("bird", 2), ("cat", 3), ("dog", 2)] {
        for i in 0..n {
            seed += 1;
            out.push((format!("{class}/img{i}.png"), png(seed, 5 + i, 4)));
        }
    }
    out
}

fn write_folder(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, bytes).expect("write");
    }
}

fn write_zip(path: &Path, files: &[(String, Vec<u8>)], method: zip::CompressionMethod) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).expect("create"));
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in files {
        z.start_file(name.as_str(), opts).expect("start");
        z.write_all(bytes).expect("write");
    }
    z.finish().expect("finish");
}

fn tar_bytes(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice())
            .expect("append");
    }
    b.into_inner().expect("tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

fn scan(path: &Path, limits: &ImageLimits) -> Result<Scanned, String> {
    let scratch = tempfile::tempdir().expect("tmp");
    let s = source::scan(path, limits, scratch.path()).map_err(|e| e.to_string())?;
    // Keep the scratch (a tar.gz's tar) alive as long as the test reads.
    std::mem::forget(scratch);
    Ok(s)
}

/// (name, label, decoded pixels) of every training example.
fn contents(s: &Scanned) -> Vec<(String, u32, Vec<u8>)> {
    let idx = s.role(Role::Training);
    (0..idx.len())
        .map(|i| {
            let img = idx.decode(i).unwrap_or_else(|e| panic!("decode {i}: {e}"));
            (
                idx.entries[i].name.clone(),
                idx.entries[i].label,
                img.into_raw(),
            )
        })
        .collect()
}

#[test]
fn every_format_reads_the_same_examples() {
    let files = members();
    let dir = tempfile::tempdir().expect("tmp");
    let folder = dir.path().join("folder");
    write_folder(&folder, &files);
    let limits = ImageLimits::default();
    let want = scan(&folder, &limits).expect("folder");
    assert_eq!(want.format, ImageFormat::Folder);
    assert_eq!(want.classes, ["bird", "cat", "dog"]);
    assert!(!want.split);
    let want_contents = contents(&want);
    assert_eq!(want_contents.len(), files.len());
    // Labels follow the sorted class names; pixels are the encoded images'.
    for (name, label, px) in &want_contents {
        let (_, bytes) = files.iter().find(|(n, _)| n == name).expect("member");
        let class = name.split('/').next().expect("class");
        assert_eq!(want.classes[*label as usize], class);
        let decoded = image::load_from_memory(bytes).expect("png").to_rgb8();
        assert_eq!(&decoded.into_raw(), px, "{name}");
    }

    let mut cases: Vec<(std::path::PathBuf, ImageFormat)> = Vec::new();
    for (method, tag) in [
        (zip::CompressionMethod::Stored, "stored"),
        (zip::CompressionMethod::Deflated, "deflated"),
    ] {
        let p = dir.path().join(format!("{tag}.zip"));
        write_zip(&p, &files, method);
        cases.push((p, ImageFormat::Zip));
    }
    let tar = tar_bytes(&files);
    let p = dir.path().join("set.tar");
    std::fs::write(&p, &tar).expect("write");
    cases.push((p, ImageFormat::Tar));
    let p = dir.path().join("set.tgz");
    std::fs::write(&p, gzip(&tar)).expect("write");
    cases.push((p, ImageFormat::TarGz));
    // Zipping a folder wraps everything in it: looked through.
    let wrapped: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(n, b)| (format!("mydata/{n}"), b.clone()))
        .collect();
    let p = dir.path().join("wrapped.zip");
    write_zip(&p, &wrapped, zip::CompressionMethod::Deflated);
    cases.push((p, ImageFormat::Zip));

    for (path, format) in cases {
        let s = scan(&path, &limits).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(s.format, format, "{}", path.display());
        assert_eq!(s.classes, want.classes, "{}", path.display());
        assert_eq!(contents(&s), want_contents, "{}", path.display());
        assert!(
            source::check_decodes(&path, &s, 10).is_empty(),
            "{}",
            path.display()
        );
    }

    // JSONL: named labels (base64 and data URLs mixed), and integer labels.
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut named = String::new();
    let mut numbered = String::new();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let class = name.split('/').next().expect("class");
        let image = if i % 2 == 0 {
            b64(bytes)
        } else {
            format!("data:image/png;base64,{}", b64(bytes))
        };
        named.push_str(&format!(
            "{{\"image\": \"{image}\", \"label\": \"{class}\"}}\n"
        ));
        let label = want.classes.iter().position(|c| c == class).expect("class");
        numbered.push_str(&format!(
            "{{\"image\": \"{image}\", \"label\": {label}}}\r\n\n"
        ));
    }
    for (text, classes) in [
        (named, want.classes.clone()),
        (numbered, vec!["0".into(), "1".into(), "2".into()]),
    ] {
        let p = dir.path().join("set.jsonl");
        std::fs::write(&p, text).expect("write");
        let s = scan(&p, &limits).expect("jsonl");
        assert_eq!(s.format, ImageFormat::Jsonl);
        assert_eq!(s.classes, classes);
        let got = contents(&s);
        assert_eq!(got.len(), want_contents.len());
        for (g, w) in got.iter().zip(&want_contents) {
            // JSONL keeps the file's order, which is the folder's here.
            assert_eq!((g.1, &g.2), (w.1, &w.2), "{}", g.0);
        }
        assert_eq!(got[0].0, "line 1");
    }
}

#[test]
fn split_folders_train_and_validate_separately() {
    let files = members();
    let mut split = Vec::new();
    for (name, bytes) in &files {
        split.push((format!("train/{name}"), bytes.clone()));
        if name.ends_with("img0.png") {
            split.push((format!("val/{name}"), bytes.clone()));
            split.push((format!("test/{name}"), bytes.clone()));
        }
    }
    split.push(("README.txt".into(), b"not an image".to_vec()));
    split.push(("__MACOSX/train/cat/._img0.png".into(), b"junk".to_vec()));
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("split.zip");
    write_zip(&p, &split, zip::CompressionMethod::Deflated);
    let s = scan(&p, &ImageLimits::default()).expect("split");
    assert!(s.split);
    assert_eq!(s.classes, ["bird", "cat", "dog"]);
    assert_eq!(s.role(Role::Training).len(), files.len());
    let val = s.role(Role::Validation);
    assert_eq!(val.len(), 3);
    assert!(val.entries.iter().all(|e| e.name.starts_with("val/")));
    assert_eq!(
        val.entries.iter().map(|e| e.label).collect::<Vec<_>>(),
        [0, 1, 2]
    );

    // A validation split with other classes is refused naming both lists.
    let mut bad = split.clone();
    bad.push(("val/fox/a.png".into(), png(99, 3, 3)));
    let p = dir.path().join("bad.zip");
    write_zip(&p, &bad, zip::CompressionMethod::Stored);
    let e = scan(&p, &ImageLimits::default()).expect_err("class mismatch");
    assert!(
        e.contains("[bird, cat, dog, fox]") && e.contains("train/ has [bird, cat, dog]"),
        "{e}"
    );
}

/// A tar whose one member has the raw name `name` and type `kind`.
fn raw_tar(name: &str, kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, data).expect("append");
    b.into_inner().expect("tar")
}

#[test]
fn bad_inputs_name_the_entry() {
    let dir = tempfile::tempdir().expect("tmp");
    let limits = ImageLimits::default();
    let good = members();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    let with = |extra: (&str, Vec<u8>)| {
        let mut v = good.clone();
        v.push((extra.0.to_string(), extra.1));
        tar_bytes(&v)
    };

    // Corrupt and truncated images pass the scan (headers are not read) and fail decoding,
    // naming the entry.
    let mut truncated = png(7, 9, 9);
    truncated.truncate(truncated.len() / 2);
    for (entry, bytes) in [
        ("cat/corrupt.png", b"\x89PNG\r\n\x1a\nnot really".to_vec()),
        ("cat/truncated.png", truncated),
        ("cat/text.jpg", b"hello".to_vec()),
    ] {
        let p = write("bad.tar", &with((entry, bytes)));
        let s = scan(&p, &limits).expect("scan");
        let errors = source::check_decodes(&p, &s, 10);
        assert_eq!(errors.len(), 1, "{entry}: {errors:?}");
        assert!(errors[0].message.starts_with(entry), "{entry}: {errors:?}");
    }

    let cases: Vec<(&str, std::path::PathBuf, ImageLimits, &str)> = vec![
        (
            "zero-byte entry",
            write("empty.tar", &with(("cat/empty.png", Vec::new()))),
            limits,
            "cat/empty.png: the entry is empty",
        ),
        (
            "path traversal",
            write(
                "dotdot.tar",
                &raw_tar("../evil.png", tar::EntryType::Regular, &png(1, 2, 2)),
            ),
            limits,
            "../evil.png: a path with '..' is not accepted",
        ),
        (
            "absolute path",
            write(
                "abs.tar",
                &raw_tar("/etc/evil.png", tar::EntryType::Regular, &png(1, 2, 2)),
            ),
            limits,
            "/etc/evil.png: an absolute path is not accepted",
        ),
        (
            "symlink",
            write(
                "link.tar",
                &raw_tar("cat/link.png", tar::EntryType::Symlink, b""),
            ),
            limits,
            "cat/link.png: links are not accepted",
        ),
        (
            "an image over the byte limit",
            write("big.tar", &tar_bytes(&good)),
            ImageLimits {
                max_image_bytes: 40,
                ..limits
            },
            "bytes; an image may have at most 40 bytes",
        ),
        (
            "too many entries",
            write("many.tar", &tar_bytes(&good)),
            ImageLimits {
                max_entries: 3,
                ..limits
            },
            "more than 3 entries",
        ),
        (
            "too many images",
            write("many2.tar", &tar_bytes(&good)),
            ImageLimits {
                max_images: 3,
                ..limits
            },
            "more than 3 images",
        ),
        (
            "a decompression bomb",
            write("bomb.tgz", &gzip(&tar_bytes(&good))),
            ImageLimits {
                max_total_bytes: 1000,
                ..limits
            },
            "expands to more than 1000 bytes",
        ),
        (
            "an image outside a class folder",
            write("loose.tar", &with(("loose.png", png(3, 2, 2)))),
            limits,
            "loose.png: an image must be inside a class folder",
        ),
        (
            "a single class",
            write("one.tar", &tar_bytes(&good[..2])),
            limits,
            "at least two classes",
        ),
        (
            "an empty class folder",
            write("emptyclass.tar", &{
                let mut b = tar::Builder::new(Vec::new());
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append_data(&mut h, "zebra/", std::io::empty())
                    .expect("dir");
                for (n, d) in &good {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, n, d.as_slice()).expect("file");
                }
                b.into_inner().expect("tar")
            }),
            limits,
            "zebra/: the class folder has no image",
        ),
        (
            "not a dataset",
            write("garbage.bin", b"\x00\x01\x02 definitely not json"),
            limits,
            ":1: expected {\"image\"",
        ),
        (
            "a label that is no class",
            write(
                "labels.jsonl",
                format!(
                    "{{\"image\": \"{}\", \"label\": -1}}\n",
                    base64::engine::general_purpose::STANDARD.encode(png(1, 2, 2))
                )
                .as_bytes(),
            ),
            limits,
            ":1: label -1 is not an integer",
        ),
        (
            "mixed labels",
            write(
                "mixed.jsonl",
                format!(
                    "{{\"image\": \"{0}\", \"label\": 1}}\n{{\"image\": \"{0}\", \"label\": \"cat\"}}\n",
                    base64::engine::general_purpose::STANDARD.encode(png(1, 2, 2))
                )
                .as_bytes(),
            ),
            limits,
            ":2: labels mix integers and class names",
        ),
        (
            "an image that is not base64",
            write(
                "notb64.jsonl",
                b"{\"image\": \"cat/img0.png\", \"label\": 0}\n",
            ),
            limits,
            ":1: image is neither base64 nor a base64 data: URL",
        ),
    ];
    for (what, path, limits, want) in cases {
        let e = scan(&path, &limits).expect_err(what);
        assert!(e.contains(want), "{what}: {e}");
    }

    // Symlinks in a zip, and a zip entry whose name leaves the archive.
    let p = dir.path().join("link.zip");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&p).expect("create"));
    z.add_symlink(
        "cat/x.png",
        "/etc/passwd",
        zip::write::SimpleFileOptions::default(),
    )
    .expect("symlink");
    z.finish().expect("finish");
    let e = scan(&p, &limits).expect_err("zip symlink");
    assert!(e.contains("cat/x.png: links are not accepted"), "{e}");

    // An image over the pixel limit is refused from its header, before decoding.
    let p = write("wide.tar", &tar_bytes(&good));
    let s = scan(
        &p,
        &ImageLimits {
            max_pixels: 16,
            ..limits
        },
    )
    .expect("scan");
    let errors = source::check_decodes(&p, &s, 3);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0]
            .message
            .contains("pixels; an image may have at most 16 pixels"),
        "{errors:?}"
    );
}

#[test]
fn an_archive_with_a_label_manifest() {
    let files = members();
    let dir = tempfile::tempdir().expect("tmp");
    // Images anywhere in the archive; the manifest gives their labels.
    let mut entries: Vec<(String, Vec<u8>)> = files
        .iter()
        .enumerate()
        .map(|(i, (_, b))| (format!("data/images/{i:02}.png"), b.clone()))
        .collect();
    let manifest: String = files
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let class = name.split('/').next().expect("class");
            format!("{{\"image\": \"images/{i:02}.png\", \"label\": \"{class}\"}}\n")
        })
        .collect();
    entries.push(("data/labels.jsonl".into(), manifest.clone().into_bytes()));
    // An image the manifest does not name is no example.
    entries.push(("data/images/extra.png".into(), png(50, 3, 3)));
    let p = dir.path().join("manifest.zip");
    write_zip(&p, &entries, zip::CompressionMethod::Deflated);
    let s = scan(&p, &ImageLimits::default()).expect("manifest");
    assert_eq!(s.classes, ["bird", "cat", "dog"]);
    let got = contents(&s);
    assert_eq!(got.len(), files.len());
    for ((name, label, px), (want_name, bytes)) in got.iter().zip(&files) {
        let class = want_name.split('/').next().expect("class");
        assert_eq!(s.classes[*label as usize], class, "{name}");
        let decoded = image::load_from_memory(bytes).expect("png").to_rgb8();
        assert_eq!(&decoded.into_raw(), px, "{name}");
    }
    assert!(source::check_decodes(&p, &s, 10).is_empty());

    // A line naming an image the archive does not have.
    let mut bad = entries.clone();
    let last = bad.len() - 2;
    bad[last].1 = format!("{manifest}{{\"image\": \"images/missing.png\", \"label\": \"cat\"}}\n")
        .into_bytes();
    let p = dir.path().join("bad-manifest.tar");
    std::fs::write(&p, tar_bytes(&bad)).expect("write");
    let e = scan(&p, &ImageLimits::default()).expect_err("missing image");
    assert!(
        e.contains(&format!(
            "data/labels.jsonl line {}: 'images/missing.png' is not an image of the archive",
            files.len() + 1
        )),
        "{e}"
    );
}
