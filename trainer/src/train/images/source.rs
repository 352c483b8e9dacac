//! Labelled image datasets as files: what `molt train` reads and what the API validates at
//! upload, with one set of rules so that what the API accepts is what a worker can train on.
//!
//! Formats (told apart by their first bytes, not by the file name):
//! - **an image folder** on disk, or a **zip**, **tar** or **tar.gz** archive of one
//!   (torchvision's ImageFolder): `class_name/…/*.{png,jpg,jpeg,webp}`. One top folder
//!   wrapping everything (what zipping a folder gives) is looked through. When the top
//!   folders are split names (`train/` plus `val/` or `validation/`, and `test/`, which is
//!   ignored), each split holds the class folders: the training split trains and the
//!   validation split validates (see [`Role`]); both must have the same classes. Files that
//!   are not images (a README, `.DS_Store`, `__MACOSX/`) are skipped.
//! - **JSONL**, one example per line: `{"image": "<base64 or data: URL>", "label": int |
//!   "name"}`. Integer labels give the classes `0..=max` (named by their numbers), string
//!   labels the sorted distinct names; a file mixes neither.
//! - **an archive with a label manifest**: `labels.jsonl` or `metadata.jsonl` at its top (or
//!   in its one wrapping folder) holding lines `{"image": "<path in the archive>", "label"}`
//!   instead of class folders; classes as for JSONL.
//!
//! The classes are the sorted class-folder names (or as above for JSONL); class `i` is the
//! i-th. Every bound ([`ImageLimits`]) is checked before the work it bounds: entry counts
//! and declared sizes before decompressing, decompressed bytes while decompressing (a zip
//! whose entry inflates past its declared size is refused), pixel counts from the image
//! header before decoding. Archives with absolute paths, `..` components or links are
//! refused, naming the entry.
//!
//! Nothing is decoded into memory as a whole: [`scan`] records where each example's encoded
//! bytes are (a file, a byte range of the archive, a JSONL line) and [`ImageIndex::read`]
//! fetches one when it is needed. A tar.gz is decompressed once to a plain tar in the
//! caller's scratch folder so that its members can be read at random.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::train::DatasetError;

/// Bounds on what a dataset may hold; each is checked before the work it bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLimits {
    /// Examples (images) in a file.
    pub max_images: usize,
    /// Entries of an archive (images, folders and skipped files together).
    pub max_entries: usize,
    /// Bytes of one encoded image.
    pub max_image_bytes: u64,
    /// Decompressed bytes of a whole archive.
    pub max_total_bytes: u64,
    /// Width × height of one image, from its header.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_images: 200_000,
            max_entries: 400_000,
            max_image_bytes: 32 << 20,
            max_total_bytes: 16 << 30,
            max_pixels: 40_000_000,
        }
    }
}

/// The file formats of an image dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Folder,
    Zip,
    Tar,
    TarGz,
    Jsonl,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Folder => "folder",
            ImageFormat::Zip => "zip",
            ImageFormat::Tar => "tar",
            ImageFormat::TarGz => "tar_gz",
            ImageFormat::Jsonl => "jsonl",
        }
    }
}

/// The format of the file whose first bytes are `head` (at least 512 bytes unless the file is
/// shorter): a zip, a gzip (taken as tar.gz), a tar (`ustar` magic, or a valid pre-POSIX
/// header), or `None`.
pub fn sniff_archive(head: &[u8]) -> Option<ImageFormat> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(ImageFormat::Zip)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(ImageFormat::TarGz)
    } else if (head.len() >= 262 && &head[257..262] == b"ustar") || is_v7_tar_header(head) {
        Some(ImageFormat::Tar)
    } else {
        None
    }
}

/// A pre-POSIX tar has no magic: its first header's checksum (the byte sum with the checksum
/// field read as spaces, stored as octal at 148..156) identifies it.
fn is_v7_tar_header(head: &[u8]) -> bool {
    let Some(h) = head.get(..512) else {
        return false;
    };
    let field = String::from_utf8_lossy(&h[148..156]);
    let Ok(stored) = u32::from_str_radix(field.trim_matches(|c: char| c == ' ' || c == '\0'), 8)
    else {
        return false;
    };
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == sum && h[0] != 0
}

/// True when the first line of a JSONL file is an image example (`{"image": …}`).
pub fn is_image_jsonl_line(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .is_some_and(|v| v.get("image").is_some())
}

/// Which part of a split dataset (`train/`, `val/`) a file plays; unsplit files are whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Training,
    Validation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Stored,
    Deflate,
}

/// Where one example's encoded image is.
#[derive(Debug, Clone)]
enum Locator {
    File(PathBuf),
    /// `len` bytes at `offset` of the data file, stored or deflated to `size` bytes.
    Range {
        offset: u64,
        len: u64,
        size: u64,
        codec: Codec,
    },
    /// A JSONL line (without its newline) whose `image` is base64.
    Line {
        offset: u64,
        len: u64,
    },
}

/// One example: its name for messages (archive entry, or `line N`), its label, where it is.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub label: u32,
    loc: Locator,
}

/// A scanned dataset: its classes and the examples of each split.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub format: ImageFormat,
    pub classes: Vec<String>,
    /// The examples that train (all of them in an unsplit file).
    pub train: Vec<Entry>,
    /// The examples of a `val/` split; empty in an unsplit file.
    pub validation: Vec<Entry>,
    /// True when the file has split folders.
    pub split: bool,
    /// Bytes read from (for archives: decompressed).
    data: PathBuf,
    limits: ImageLimits,
}

/// The examples of one role, readable one at a time from any thread.
#[derive(Debug, Clone)]
pub struct ImageIndex {
    pub format: ImageFormat,
    pub classes: Vec<String>,
    pub entries: Vec<Entry>,
    data: PathBuf,
    limits: ImageLimits,
}

impl Scanned {
    /// The examples `role` uses: a split file's training or validation split, or the whole
    /// file.
    pub fn role(&self, role: Role) -> ImageIndex {
        let entries = match (role, self.split) {
            (Role::Validation, true) => self.validation.clone(),
            _ => self.train.clone(),
        };
        ImageIndex {
            format: self.format,
            classes: self.classes.clone(),
            entries,
            data: self.data.clone(),
            limits: self.limits,
        }
    }

    /// Hex SHA-256 of what the examples are read from (the file; for a folder every image's
    /// name and bytes), for resume fingerprints.
    pub fn sha256(&self, file: &Path) -> Result<String, DatasetError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let add = |h: &mut Sha256, p: &Path| -> Result<(), DatasetError> {
            let mut f = File::open(p).map_err(|e| err(p, format!("cannot open: {e}")))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => h.update(&buf[..n]),
                    Err(e) => return Err(err(p, format!("cannot read: {e}"))),
                }
            }
        };
        if self.format == ImageFormat::Folder {
            for e in self.train.iter().chain(&self.validation) {
                if let Locator::File(p) = &e.loc {
                    add(&mut h, p)?;
                    h.update(e.name.as_bytes());
                }
            }
        } else {
            add(&mut h, file)?;
        }
        Ok(hex::encode(h.finalize()))
    }
}

fn err(file: &Path, message: impl Into<String>) -> DatasetError {
    DatasetError {
        file: file.to_path_buf(),
        line: None,
        message: message.into(),
    }
}

fn line_err(file: &Path, line: usize, message: impl Into<String>) -> DatasetError {
    DatasetError {
        file: file.to_path_buf(),
        line: Some(line),
        message: message.into(),
    }
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];
const SPLIT_TRAIN: &str = "train";
const SPLIT_VALIDATION: &[&str] = &["val", "validation"];
const SPLIT_IGNORED: &str = "test";

fn is_image_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Manifests: JSONL naming each image's label, at the top (or in the one wrapping folder).
const MANIFEST_NAMES: &[&str] = &["labels.jsonl", "metadata.jsonl"];

fn is_manifest_name(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    MANIFEST_NAMES.contains(&base)
}

/// Hidden files and macOS resource forks: never examples.
fn is_junk(parts: &[String]) -> bool {
    parts
        .iter()
        .any(|p| p.starts_with('.') || p == "__MACOSX" || p == "Thumbs.db")
}

/// The `/`-separated parts of an archive member's name, refusing absolute paths and `..`.
fn member_parts(name: &str) -> Result<Vec<String>, String> {
    if name.starts_with('/') || name.starts_with('\\') || name.contains('\0') {
        return Err("an absolute path is not accepted in an archive".into());
    }
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err("a path with '..' is not accepted in an archive".into());
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("an absolute path is not accepted in an archive".into());
            }
        }
    }
    Ok(parts)
}

/// What an archive or folder listing found: image files and folders, by path parts.
#[derive(Default)]
struct Listing {
    images: Vec<(Vec<String>, Locator)>,
    /// `labels.jsonl` / `metadata.jsonl` files naming each image's label.
    manifests: Vec<(Vec<String>, Locator)>,
    dirs: BTreeSet<Vec<String>>,
    entries: usize,
}

impl Listing {
    fn add_dir(&mut self, parts: Vec<String>) {
        if !parts.is_empty() && !is_junk(&parts) {
            self.dirs.insert(parts);
        }
    }

    /// Records a member (skipped unless it is an image).
    fn add_file(
        &mut self,
        file: &Path,
        name: &str,
        parts: Vec<String>,
        loc: Locator,
        limits: &ImageLimits,
    ) -> Result<(), DatasetError> {
        self.entries += 1;
        if self.entries > limits.max_entries {
            return Err(err(
                file,
                format!("more than {} entries in the archive", limits.max_entries),
            ));
        }
        if is_junk(&parts) {
            return Ok(());
        }
        if is_manifest_name(name) && parts.len() <= 2 {
            self.manifests.push((parts, loc));
            return Ok(());
        }
        if !is_image_name(name) {
            return Ok(());
        }
        if self.images.len() >= limits.max_images {
            return Err(err(
                file,
                format!("more than {} images in the dataset", limits.max_images),
            ));
        }
        for i in 1..parts.len() {
            self.dirs.insert(parts[..i].to_vec());
        }
        self.images.push((parts, loc));
        Ok(())
    }
}

/// Scans the dataset at `path` (see the module docs), without decoding images. `scratch` is a
/// folder for a tar.gz's decompressed tar.
pub fn scan(path: &Path, limits: &ImageLimits, scratch: &Path) -> Result<Scanned, DatasetError> {
    if path.is_dir() {
        let listing = list_folder(path, limits)?;
        return classify(path, ImageFormat::Folder, listing, path, limits);
    }
    let mut f = File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(err(path, format!("cannot read: {e}"))),
        }
    }
    if got == 0 {
        return Err(err(path, "the file is empty: it holds no images"));
    }
    match sniff_archive(&head[..got]) {
        Some(ImageFormat::Zip) => {
            let listing = list_zip(path, limits)?;
            classify(path, ImageFormat::Zip, listing, path, limits)
        }
        Some(ImageFormat::TarGz) => {
            let tar = scratch.join("dataset.tar");
            gunzip(path, &tar, limits)?;
            let listing = list_tar(path, &tar, limits)?;
            classify(path, ImageFormat::TarGz, listing, &tar, limits)
        }
        Some(ImageFormat::Tar) => {
            let listing = list_tar(path, path, limits)?;
            classify(path, ImageFormat::Tar, listing, path, limits)
        }
        _ => scan_jsonl(path, limits),
    }
}

fn list_folder(root: &Path, limits: &ImageLimits) -> Result<Listing, DatasetError> {
    let mut listing = Listing::default();
    let mut stack = vec![(root.to_path_buf(), Vec::<String>::new())];
    while let Some((dir, parts)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| err(&dir, format!("cannot list: {e}")))?;
        for entry in rd {
            let entry = entry.map_err(|e| err(&dir, format!("cannot list: {e}")))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut sub = parts.clone();
            sub.push(name.clone());
            let ty = entry
                .file_type()
                .map_err(|e| err(&entry.path(), e.to_string()))?;
            if ty.is_dir() {
                listing.add_dir(sub.clone());
                stack.push((entry.path(), sub));
            } else {
                let p = entry.path();
                listing.add_file(root, &name, sub, Locator::File(p), limits)?;
            }
        }
    }
    Ok(listing)
}

fn list_zip(path: &Path, limits: &ImageLimits) -> Result<Listing, DatasetError> {
    let f = File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| err(path, format!("not a readable zip archive: {e}")))?;
    if zip.len() > limits.max_entries {
        return Err(err(
            path,
            format!(
                "the archive has {} entries; at most {} are accepted",
                zip.len(),
                limits.max_entries
            ),
        ));
    }
    let mut listing = Listing::default();
    let mut total = 0u64;
    for i in 0..zip.len() {
        let m = zip
            .by_index_raw(i)
            .map_err(|e| err(path, format!("entry {i}: {e}")))?;
        let name = m
            .name()
            .map(|n| n.into_owned())
            .map_err(|e| err(path, format!("entry {i}: {e}")))?;
        let at = |msg: String| err(path, format!("{name}: {msg}"));
        let parts = member_parts(&name).map_err(at)?;
        if m.enclosed_name().is_none() {
            return Err(at("a path leaving the archive is not accepted".into()));
        }
        if m.is_symlink() {
            return Err(at("links are not accepted in an archive".into()));
        }
        if m.is_dir() {
            listing.add_dir(parts);
            continue;
        }
        if !(is_image_name(&name) || is_manifest_name(&name)) || is_junk(&parts) {
            listing.add_file(path, &name, parts, Locator::File(PathBuf::new()), limits)?;
            continue;
        }
        if m.encrypted() {
            return Err(at("encrypted entries are not accepted".into()));
        }
        let codec = match m.compression() {
            zip::CompressionMethod::Stored => Codec::Stored,
            zip::CompressionMethod::Deflated => Codec::Deflate,
            other => {
                return Err(at(format!(
                    "compression method {other:?} is not supported (use stored or deflate)"
                )));
            }
        };
        let size = m.size();
        check_image_bytes(size, limits).map_err(at)?;
        total = total.saturating_add(size);
        if total > limits.max_total_bytes {
            return Err(err(
                path,
                format!(
                    "the archive expands to more than {} bytes",
                    limits.max_total_bytes
                ),
            ));
        }
        let offset = m
            .data_start()
            .ok_or_else(|| at("its data offset is unknown".into()))?;
        let loc = Locator::Range {
            offset,
            len: m.compressed_size(),
            size,
            codec,
        };
        listing.add_file(path, &name, parts, loc, limits)?;
    }
    Ok(listing)
}

fn check_image_bytes(size: u64, limits: &ImageLimits) -> Result<(), String> {
    if size == 0 {
        Err("the entry is empty (0 bytes)".into())
    } else if size > limits.max_image_bytes {
        Err(format!(
            "{size} bytes; an image may have at most {} bytes",
            limits.max_image_bytes
        ))
    } else {
        Ok(())
    }
}

/// Decompresses `src` into `dest`, refusing more than the archive limit.
fn gunzip(src: &Path, dest: &Path, limits: &ImageLimits) -> Result<(), DatasetError> {
    let f = File::open(src).map_err(|e| err(src, format!("cannot open: {e}")))?;
    let mut gz = flate2::read::MultiGzDecoder::new(BufReader::new(f))
        .take(limits.max_total_bytes.saturating_add(1));
    let mut out = File::create(dest).map_err(|e| err(dest, format!("cannot create: {e}")))?;
    let n = std::io::copy(&mut gz, &mut out)
        .map_err(|e| err(src, format!("not a readable gzip file: {e}")))?;
    if n > limits.max_total_bytes {
        return Err(err(
            src,
            format!(
                "the archive expands to more than {} bytes",
                limits.max_total_bytes
            ),
        ));
    }
    Ok(())
}

/// Lists the tar `data` (`label` names it in messages).
fn list_tar(label: &Path, data: &Path, limits: &ImageLimits) -> Result<Listing, DatasetError> {
    let f = File::open(data).map_err(|e| err(label, format!("cannot open: {e}")))?;
    let mut archive = tar::Archive::new(BufReader::new(f));
    let entries = archive
        .entries_with_seek()
        .map_err(|e| err(label, format!("not a readable tar archive: {e}")))?;
    let mut listing = Listing::default();
    for entry in entries {
        let entry = entry.map_err(|e| err(label, format!("not a readable tar archive: {e}")))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| err(label, format!("an entry name is unreadable: {e}")))?;
        let at = |msg: String| err(label, format!("{name}: {msg}"));
        let parts = member_parts(&name).map_err(at)?;
        let ty = entry.header().entry_type();
        if ty.is_symlink() || ty.is_hard_link() {
            return Err(at("links are not accepted in an archive".into()));
        }
        if ty.is_dir() {
            listing.add_dir(parts);
            continue;
        }
        if !ty.is_file() {
            continue;
        }
        let size = entry.size();
        let loc = Locator::Range {
            offset: entry.raw_file_position(),
            len: size,
            size,
            codec: Codec::Stored,
        };
        if (is_image_name(&name) || is_manifest_name(&name)) && !is_junk(&parts) {
            check_image_bytes(size, limits).map_err(at)?;
        }
        listing.add_file(label, &name, parts, loc, limits)?;
    }
    Ok(listing)
}

/// Turns a listing into classes and splits (see the module docs).
fn classify(
    file: &Path,
    format: ImageFormat,
    mut listing: Listing,
    data: &Path,
    limits: &ImageLimits,
) -> Result<Scanned, DatasetError> {
    if listing.images.is_empty() {
        return Err(err(
            file,
            "no image (png, jpg, jpeg, webp) found; expected class_name/<images> folders",
        ));
    }
    if !listing.manifests.is_empty() {
        return classify_manifest(file, format, listing, data, limits);
    }
    // One folder wrapping everything (what zipping a folder gives) is looked through.
    let tops: BTreeSet<&String> = listing.images.iter().map(|(p, _)| &p[0]).collect();
    if tops.len() == 1 && listing.images.iter().all(|(p, _)| p.len() >= 3) {
        for (p, _) in &mut listing.images {
            p.remove(0);
        }
        listing.dirs = listing
            .dirs
            .into_iter()
            .filter(|d| d.len() > 1)
            .map(|d| d[1..].to_vec())
            .collect();
    }
    let top_dirs: BTreeSet<&str> = listing
        .dirs
        .iter()
        .filter(|d| d.len() == 1)
        .map(|d| d[0].as_str())
        .collect();
    let split = top_dirs.contains(SPLIT_TRAIN)
        && top_dirs
            .iter()
            .all(|d| *d == SPLIT_TRAIN || *d == SPLIT_IGNORED || SPLIT_VALIDATION.contains(d));
    if split && SPLIT_VALIDATION.iter().all(|v| top_dirs.contains(v)) {
        return Err(err(
            file,
            "both val/ and validation/ split folders; keep one",
        ));
    }

    // (split, class) → images; the class folders of each split.
    let depth = usize::from(split);
    let mut groups: BTreeMap<(String, String), Vec<(String, Locator)>> = BTreeMap::new();
    for (parts, loc) in listing.images {
        let name = parts.join("/");
        if parts.len() < depth + 2 {
            return Err(err(
                file,
                format!(
                    "{name}: an image must be inside a class folder ({}class_name/{})",
                    if split { "split/" } else { "" },
                    parts.last().map(String::as_str).unwrap_or("")
                ),
            ));
        }
        let s = if split {
            parts[0].clone()
        } else {
            String::new()
        };
        groups
            .entry((s, parts[depth].clone()))
            .or_default()
            .push((name, loc));
    }
    let class_dirs = |s: &str| -> BTreeSet<String> {
        listing
            .dirs
            .iter()
            .filter(|d| d.len() == depth + 1 && (!split || d[0] == s))
            .map(|d| d[depth].clone())
            .collect()
    };
    let splits: Vec<&str> = if split {
        std::iter::once(SPLIT_TRAIN)
            .chain(
                SPLIT_VALIDATION
                    .iter()
                    .copied()
                    .filter(|v| top_dirs.contains(v)),
            )
            .collect()
    } else {
        vec![""]
    };
    let classes: Vec<String> = class_dirs(splits[0]).into_iter().collect();
    for s in &splits {
        let here = class_dirs(s);
        for c in &here {
            if !groups.contains_key(&(s.to_string(), c.clone())) {
                let shown = if split {
                    format!("{s}/{c}/")
                } else {
                    format!("{c}/")
                };
                return Err(err(file, format!("{shown}: the class folder has no image")));
            }
        }
        let here: Vec<String> = here.into_iter().collect();
        if here != classes {
            return Err(err(
                file,
                format!(
                    "the {s}/ split has the classes [{}] but train/ has [{}]",
                    here.join(", "),
                    classes.join(", ")
                ),
            ));
        }
    }
    if classes.len() < 2 {
        return Err(err(
            file,
            format!(
                "an image dataset needs at least two classes (class folders), found {}",
                classes.len()
            ),
        ));
    }
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for ((s, class), mut images) in groups {
        if split && s == SPLIT_IGNORED {
            continue;
        }
        let label = classes.binary_search(&class).unwrap_or(0) as u32;
        images.sort_by(|a, b| a.0.cmp(&b.0));
        let out = if split && s != SPLIT_TRAIN {
            &mut validation
        } else {
            &mut train
        };
        out.extend(
            images
                .into_iter()
                .map(|(name, loc)| Entry { name, label, loc }),
        );
    }
    // Class by class, names sorted: the order of `molt train`'s folder reader.
    train.sort_by_key(|e| e.label);
    validation.sort_by_key(|e| e.label);
    Ok(Scanned {
        format,
        classes,
        train,
        validation,
        split,
        data: data.to_path_buf(),
        limits: *limits,
    })
}

/// An archive whose manifest (`labels.jsonl` or `metadata.jsonl`, at the top or in the one
/// wrapping folder) gives each image's label: lines `{"image": "<path in the archive, relative
/// to the manifest>", "label": int | "name"}`, classes as for JSONL. Images the manifest
/// does not name are not examples.
fn classify_manifest(
    file: &Path,
    format: ImageFormat,
    listing: Listing,
    data: &Path,
    limits: &ImageLimits,
) -> Result<Scanned, DatasetError> {
    if listing.manifests.len() > 1 {
        let names: Vec<String> = listing.manifests.iter().map(|(p, _)| p.join("/")).collect();
        return Err(err(
            file,
            format!("several label manifests ({}); keep one", names.join(", ")),
        ));
    }
    let (mparts, mloc) = &listing.manifests[0];
    let mname = mparts.join("/");
    let folder = &mparts[..mparts.len() - 1];
    let at = |line: usize, m: String| err(file, format!("{mname} line {line}: {m}"));
    let bytes = read_locator(data, mloc, limits).map_err(|m| err(file, format!("{mname}: {m}")))?;
    let images: std::collections::HashMap<String, Locator> = listing
        .images
        .into_iter()
        .map(|(p, l)| (p.join("/"), l))
        .collect();
    let mut found: Vec<(usize, Label, String, Locator)> = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let number = i + 1;
        let text = trim_line(line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let ex: JsonlExample = serde_json::from_slice(text).map_err(|e| {
            at(
                number,
                format!("expected {{\"image\": <path in the archive>, \"label\"}}: {e}"),
            )
        })?;
        let label = parse_label(&ex.label).map_err(|m| at(number, m))?;
        check_label_kind(found.first().map(|f| &f.1), &label).map_err(|m| at(number, m))?;
        let serde_json::Value::String(rel) = &ex.image else {
            return Err(at(number, "image must be a path inside the archive".into()));
        };
        let mut parts = folder.to_vec();
        parts.extend(member_parts(rel).map_err(|m| at(number, m))?);
        let name = parts.join("/");
        let loc = images
            .get(&name)
            .cloned()
            .ok_or_else(|| at(number, format!("'{rel}' is not an image of the archive")))?;
        if found.len() >= limits.max_images {
            return Err(err(
                file,
                format!("more than {} images in the dataset", limits.max_images),
            ));
        }
        found.push((number, label, name, loc));
    }
    let labels: Vec<&Label> = found.iter().map(|f| &f.1).collect();
    let classes = classes_of(&labels);
    if classes.len() < 2 {
        return Err(err(
            file,
            format!(
                "an image dataset needs at least two classes, {mname} names {}",
                classes.len()
            ),
        ));
    }
    let train = found
        .into_iter()
        .map(|(_, label, name, loc)| Entry {
            name,
            label: label_index(&classes, &label),
            loc,
        })
        .collect();
    Ok(Scanned {
        format,
        classes,
        train,
        validation: Vec::new(),
        split: false,
        data: data.to_path_buf(),
        limits: *limits,
    })
}

fn parse_label(v: &serde_json::Value) -> Result<Label, String> {
    match v {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(v) if (v as usize) < MAX_CLASSES => Ok(Label::Index(v)),
            _ => Err(format!("label {n} is not an integer in [0, {MAX_CLASSES})")),
        },
        serde_json::Value::String(s) if !s.trim().is_empty() => Ok(Label::Name(s.clone())),
        other => Err(format!(
            "label must be an integer or a class name, found {other}"
        )),
    }
}

fn check_label_kind(first: Option<&Label>, this: &Label) -> Result<(), String> {
    match first {
        Some(f) if matches!(f, Label::Index(_)) != matches!(this, Label::Index(_)) => {
            Err("labels mix integers and class names; use one kind in a file".into())
        }
        _ => Ok(()),
    }
}

/// Integer labels: `0..=max`, named by their numbers; names: sorted and distinct.
fn classes_of(labels: &[&Label]) -> Vec<String> {
    match labels.first() {
        Some(Label::Index(_)) => {
            let max = labels
                .iter()
                .filter_map(|l| match l {
                    Label::Index(v) => Some(*v),
                    Label::Name(_) => None,
                })
                .max()
                .unwrap_or(0);
            (0..=max).map(|i| i.to_string()).collect()
        }
        _ => labels
            .iter()
            .filter_map(|l| match l {
                Label::Name(s) => Some(s.clone()),
                Label::Index(_) => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    }
}

fn label_index(classes: &[String], label: &Label) -> u32 {
    match label {
        Label::Index(v) => *v as u32,
        Label::Name(s) => classes.binary_search(s).unwrap_or(0) as u32,
    }
}

#[derive(Deserialize)]
struct JsonlExample {
    image: serde_json::Value,
    label: serde_json::Value,
}

enum Label {
    Index(u64),
    Name(String),
}

/// The most classes a dataset may have (integer labels are bounded by it too).
pub const MAX_CLASSES: usize = 100_000;

fn scan_jsonl(path: &Path, limits: &ImageLimits) -> Result<Scanned, DatasetError> {
    let f = File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    // base64 is 4/3 of the bytes, plus the JSON around it.
    let max_line = limits.max_image_bytes / 3 * 4 + 4096;
    let mut reader = BufReader::new(f);
    let mut offset = 0u64;
    let mut line = Vec::new();
    let mut found: Vec<(usize, Label, Locator)> = Vec::new();
    for number in 1.. {
        line.clear();
        let n = (&mut reader)
            .take(max_line + 2)
            .read_until(b'\n', &mut line)
            .map_err(|e| err(path, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        let start = offset;
        offset += n as u64;
        if line.last() != Some(&b'\n') && n as u64 > max_line {
            return Err(line_err(
                path,
                number,
                format!("the line is longer than {max_line} bytes"),
            ));
        }
        let text = trim_line(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let ex: JsonlExample = serde_json::from_slice(text).map_err(|e| {
            line_err(
                path,
                number,
                format!("expected {{\"image\": <base64>, \"label\": int | name}}: {e}"),
            )
        })?;
        let label = parse_label(&ex.label).map_err(|m| line_err(path, number, m))?;
        check_label_kind(found.first().map(|f| &f.1), &label)
            .map_err(|m| line_err(path, number, m))?;
        let bytes = image_field_bytes(&ex.image).map_err(|m| line_err(path, number, m))?;
        check_image_bytes(bytes.len() as u64, limits).map_err(|m| line_err(path, number, m))?;
        if found.len() >= limits.max_images {
            return Err(err(
                path,
                format!("more than {} images in the dataset", limits.max_images),
            ));
        }
        found.push((
            number,
            label,
            Locator::Line {
                offset: start,
                len: text.len() as u64,
            },
        ));
    }
    if found.is_empty() {
        return Err(err(path, "the file is empty: it holds no images"));
    }
    let labels: Vec<&Label> = found.iter().map(|f| &f.1).collect();
    let classes = classes_of(&labels);
    if classes.len() < 2 {
        return Err(err(
            path,
            format!(
                "an image dataset needs at least two classes, found {}",
                classes.len()
            ),
        ));
    }
    let train = found
        .into_iter()
        .map(|(number, label, loc)| Entry {
            name: format!("line {number}"),
            label: label_index(&classes, &label),
            loc,
        })
        .collect();
    Ok(Scanned {
        format: ImageFormat::Jsonl,
        classes,
        train,
        validation: Vec::new(),
        split: false,
        data: path.to_path_buf(),
        limits: *limits,
    })
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut t = line;
    while let Some((last, rest)) = t.split_last() {
        if *last == b'\n' || *last == b'\r' {
            t = rest;
        } else {
            break;
        }
    }
    t
}

/// The bytes of an `image` field: base64, or a `data:` URL with base64 content.
fn image_field_bytes(v: &serde_json::Value) -> Result<Vec<u8>, String> {
    let serde_json::Value::String(s) = v else {
        return Err(format!(
            "image must be a base64 string or a data: URL, found {v}"
        ));
    };
    decode_image_string(s)
}

/// Decodes a base64 string or a `data:image/…;base64,` URL (what `/v1/classifications` takes
/// too).
pub fn decode_image_string(s: &str) -> Result<Vec<u8>, String> {
    let payload = match s.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| "a data: URL needs a ',' before its content".to_string())?;
            if !meta.ends_with(";base64") {
                return Err("a data: URL must be base64 (data:image/png;base64,…)".into());
            }
            data
        }
        None => s,
    };
    let payload = payload.trim();
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(payload))
        .map_err(|e| format!("image is neither base64 nor a base64 data: URL ({e})"))
}

impl ImageIndex {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The encoded bytes of example `i` (safe to call from several threads).
    pub fn read(&self, i: usize) -> Result<Vec<u8>, String> {
        let e = self
            .entries
            .get(i)
            .ok_or_else(|| format!("no example {i}"))?;
        match &e.loc {
            Locator::Line { offset, len } => {
                let raw = read_at(&self.data, *offset, *len)?;
                let ex: JsonlExample =
                    serde_json::from_slice(&raw).map_err(|x| format!("changed on disk: {x}"))?;
                image_field_bytes(&ex.image)
            }
            loc => read_locator(&self.data, loc, &self.limits),
        }
    }

    /// Example `i`, decoded to RGB within the pixel limit.
    pub fn decode(&self, i: usize) -> Result<image::RgbImage, String> {
        let bytes = self.read(i)?;
        decode_image(&bytes, &self.limits)
    }
}

/// The bytes a file or archive member holds (decompressed; bounded by the image limit).
fn read_locator(data: &Path, loc: &Locator, limits: &ImageLimits) -> Result<Vec<u8>, String> {
    match loc {
        Locator::File(p) => {
            let f = File::open(p).map_err(|x| format!("cannot open: {x}"))?;
            let size = f.metadata().map_err(|x| x.to_string())?.len();
            check_image_bytes(size, limits)?;
            let mut buf = Vec::with_capacity(size as usize);
            f.take(limits.max_image_bytes)
                .read_to_end(&mut buf)
                .map_err(|x| format!("cannot read: {x}"))?;
            Ok(buf)
        }
        Locator::Range {
            offset,
            len,
            size,
            codec,
        } => {
            let raw = read_at(data, *offset, *len)?;
            match codec {
                Codec::Stored => Ok(raw),
                Codec::Deflate => {
                    let mut out = Vec::with_capacity(*size as usize);
                    flate2::read::DeflateDecoder::new(raw.as_slice())
                        .take(size + 1)
                        .read_to_end(&mut out)
                        .map_err(|x| format!("corrupt compressed data: {x}"))?;
                    if out.len() as u64 != *size {
                        return Err(format!(
                            "inflates to {} bytes, not the {size} its header declares",
                            out.len()
                        ));
                    }
                    Ok(out)
                }
            }
        }
        Locator::Line { offset, len } => read_at(data, *offset, *len),
    }
}

fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|x| format!("cannot open the dataset: {x}"))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)
        .map_err(|x| format!("truncated archive: {x}"))?;
    Ok(buf)
}

/// Decodes a PNG, JPEG or WebP image to RGB, checking its pixel count from the header before
/// decoding.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<image::RgbImage, String> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read the image: {e}"))
    };
    let r = reader()?;
    match r.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        Some(other) => {
            return Err(format!(
                "{other:?} images are not accepted (png, jpeg, webp)"
            ));
        }
        None => return Err("not a png, jpeg or webp image".into()),
    }
    let (w, h) = r
        .into_dimensions()
        .map_err(|e| format!("cannot decode the image: {e}"))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err("the image has no pixels".into());
    }
    if pixels > limits.max_pixels {
        return Err(format!(
            "{w}×{h} pixels; an image may have at most {} pixels",
            limits.max_pixels
        ));
    }
    let mut r = reader()?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(w);
    l.max_image_height = Some(h);
    l.max_alloc = Some(pixels * 16 + (64 << 20));
    r.limits(l);
    let img = r
        .decode()
        .map_err(|e| format!("cannot decode the image: {e}"))?;
    Ok(img.to_rgb8())
}

/// Checks every image of `scanned` decodes (the upload validator's last step), stopping after
/// `max_errors` problems. Images are decoded in parallel, one at a time per thread.
pub fn check_decodes(file: &Path, scanned: &Scanned, max_errors: usize) -> Vec<DatasetError> {
    use rayon::prelude::*;
    let mut errors = Vec::new();
    for role in [Role::Training, Role::Validation] {
        if role == Role::Validation && !scanned.split {
            break;
        }
        let index = scanned.role(role);
        let mut found: Vec<(usize, String)> = (0..index.len())
            .into_par_iter()
            .filter_map(|i| index.decode(i).err().map(|m| (i, m)))
            .collect();
        found.sort_by_key(|f| f.0);
        for (i, m) in found {
            let name = &index.entries[i].name;
            errors.push(
                match name.strip_prefix("line ").and_then(|n| n.parse().ok()) {
                    Some(line) if scanned.format == ImageFormat::Jsonl => line_err(file, line, m),
                    _ => err(file, format!("{name}: {m}")),
                },
            );
            if errors.len() >= max_errors {
                return errors;
            }
        }
    }
    errors
}

/// Copies `reader` into `dest` (a stream spooled for random access; the caller bounds its
/// size).
pub fn spool(reader: &mut dyn Read, dest: &Path) -> std::io::Result<u64> {
    std::io::copy(reader, &mut File::create(dest)?)
}
