//! Validation of an uploaded dataset while it streams to the blob store, with the trainer's
//! own rules (`trainer::train::data::validate_reader` for text,
//! `trainer::train::images::source` for images), so that what the API accepts is exactly
//! what a worker can train on.
//!
//! Formats (one per file, told apart by the content): JSONL text datasets — `{"text"}`,
//! `{"prompt", "completion"}`, `{"context", "choices", "label"}`, OpenAI's chat format
//! `{"messages": [{"role", "content"}, ...]}` (the first example decides; blank lines are
//! skipped) — and image classification datasets: a zip / tar / tar.gz of class folders, or
//! JSONL lines `{"image": <base64 | data URL>, "label"}` (see the trainer's
//! `images::source` for the rules and bounds).
//!
//! The validators read synchronously, so they run on their own thread, fed through a bounded
//! channel of chunks (memory stays bounded: at most [`CHANNEL_CHUNKS`] chunks are queued;
//! the text validator holds one line at a time, an image dataset is spooled to a temporary
//! file, which random access into a zip needs, and its images are decoded one per thread).
//! The validator never rejects the upload: the file is stored with `status: "error"` and the
//! first problems, with their line numbers or archive entries, in `status_details`; a job
//! naming such a file is refused with the same text. A valid file records what it holds in
//! `dataset` (for images: the class list, fixed here).

use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;
use serde_json::{Value, json};
use storage::UploadValidator;
use trainer::train::images::source::{self, ImageLimits, Role};
use trainer::train::{DatasetError, DatasetSummary};

/// The one purpose molt accepts for uploads.
pub const PURPOSE_FINE_TUNE: &str = "fine-tune";

/// How many problems `status_details` lists.
pub const MAX_REPORTED_ERRORS: usize = 10;

/// Chunks queued between the upload and the validator thread.
pub const CHANNEL_CHUNKS: usize = 16;

/// `Read` over chunks arriving on a channel; the end of the channel is the end of the file.
struct ChannelReader {
    rx: Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(chunk) => self.current = chunk,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// What a valid upload holds.
#[derive(Debug, Clone)]
enum Summary {
    Text(DatasetSummary),
    Images {
        format: source::ImageFormat,
        classes: Vec<String>,
        train: usize,
        validation: usize,
        split: bool,
    },
}

type Outcome = Result<Summary, Vec<DatasetError>>;

/// The longest prefix read to find the first example of a JSONL file (an image line may be a
/// whole base64 image).
const MAX_FIRST_LINE: u64 = 64 << 20;

fn read_error(label: &Path, e: std::io::Error) -> Vec<DatasetError> {
    vec![DatasetError {
        file: label.to_path_buf(),
        line: None,
        message: format!("cannot read the upload: {e}"),
    }]
}

/// Tells the format from the first bytes (and the first example of a JSONL file) and runs its
/// validator.
fn validate(reader: impl Read, label: &Path) -> Outcome {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut prefix = Vec::new();
    (&mut reader)
        .take(512)
        .read_to_end(&mut prefix)
        .map_err(|e| read_error(label, e))?;
    if source::sniff_archive(&prefix).is_some() {
        return validate_images(Cursor::new(prefix).chain(reader), label);
    }
    // The first non-blank line decides between image and text JSONL.
    let mut start = 0;
    let first = loop {
        if let Some(end) = prefix[start..].iter().position(|b| *b == b'\n') {
            let line = &prefix[start..start + end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                break Some(line.to_vec());
            }
            start += end + 1;
            continue;
        }
        let before = prefix.len();
        (&mut reader)
            .take(MAX_FIRST_LINE)
            .read_until(b'\n', &mut prefix)
            .map_err(|e| read_error(label, e))?;
        if prefix.len() == before {
            break Some(prefix[start..].to_vec());
        }
        if prefix.len() as u64 > MAX_FIRST_LINE {
            break None;
        }
    };
    let rest = Cursor::new(prefix).chain(reader);
    if first.is_some_and(|l| source::is_image_jsonl_line(&l)) {
        validate_images(rest, label)
    } else {
        trainer::train::data::validate_reader(rest, label, None).map(Summary::Text)
    }
}

/// Spools an image dataset to a temporary file, scans it and decodes every image.
fn validate_images(mut reader: impl Read, label: &Path) -> Outcome {
    let one = |message: String| {
        vec![DatasetError {
            file: label.to_path_buf(),
            line: None,
            message,
        }]
    };
    let dir = tempfile::tempdir().map_err(|e| one(format!("no scratch space: {e}")))?;
    let path = dir.path().join("upload");
    // The upload's size is bounded by --max-upload-bytes before it gets here.
    source::spool(&mut reader, &path).map_err(|e| read_error(label, e))?;
    let limits = ImageLimits::default();
    let scanned = source::scan(&path, &limits, dir.path()).map_err(|mut e| {
        e.file = label.to_path_buf();
        vec![e]
    })?;
    let errors = source::check_decodes(label, &scanned, MAX_REPORTED_ERRORS + 1);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Summary::Images {
        format: scanned.format,
        train: scanned.role(Role::Training).len(),
        validation: if scanned.split {
            scanned.validation.len()
        } else {
            0
        },
        split: scanned.split,
        classes: scanned.classes,
    })
}

/// Streaming dataset validator (an [`UploadValidator`]).
pub struct DatasetValidator {
    tx: Option<SyncSender<Bytes>>,
    handle: Option<JoinHandle<Outcome>>,
    outcome: Option<Outcome>,
}

impl DatasetValidator {
    /// Starts the validator thread; `filename` labels the errors.
    pub fn new(filename: &str) -> Self {
        let (tx, rx) = sync_channel::<Bytes>(CHANNEL_CHUNKS);
        let label = PathBuf::from(filename);
        let handle = std::thread::Builder::new()
            .name("molt-validate".into())
            .spawn(move || {
                let reader = ChannelReader {
                    rx,
                    current: Bytes::new(),
                };
                validate(reader, &label)
            })
            .ok();
        DatasetValidator {
            tx: Some(tx),
            handle,
            outcome: None,
        }
    }

    fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// True when the file is a usable dataset.
    pub fn is_valid(&self) -> bool {
        self.examples() > 0
    }

    /// Valid examples (0 unless valid): every image of every split for image datasets.
    pub fn examples(&self) -> u64 {
        match self.outcome() {
            Some(Ok(Summary::Text(s))) => s.examples as u64,
            Some(Ok(Summary::Images {
                train, validation, ..
            })) => (train + validation) as u64,
            _ => 0,
        }
    }

    /// The dataset's format (`text`, `prompt_completion`, `multiple_choice`, `chat`,
    /// `images`) when valid.
    pub fn kind(&self) -> Option<String> {
        match self.outcome() {
            Some(Ok(Summary::Text(s))) => Some(s.kind.to_string()),
            Some(Ok(Summary::Images { .. })) => Some("images".into()),
            _ => None,
        }
    }

    /// What the file holds, stored with it (`FileRecord::dataset`): `None` unless valid.
    pub fn dataset(&self) -> Option<Value> {
        if !self.is_valid() {
            return None;
        }
        match self.outcome()? {
            Ok(Summary::Text(s)) => Some(json!({"kind": s.kind.to_string()})),
            Ok(Summary::Images {
                format,
                classes,
                train,
                validation,
                split,
            }) => Some(json!({
                "kind": "images",
                "format": format.as_str(),
                "classes": classes,
                "train_examples": train,
                "validation_examples": validation,
                "split": split,
            })),
            Err(_) => None,
        }
    }

    /// The text for `status_details`: `None` for a valid file.
    pub fn status_details(&self) -> Option<String> {
        match self.outcome() {
            Some(Ok(_)) if self.is_valid() => None,
            Some(Ok(_)) => Some("the file is empty: it holds no training examples".into()),
            Some(Err(errors)) => Some(describe(errors)),
            None => Some("the dataset could not be validated".into()),
        }
    }
}

/// "2 invalid lines: line 3: …; line 7: …", at most [`MAX_REPORTED_ERRORS`] listed.
pub fn describe(errors: &[DatasetError]) -> String {
    let listed: Vec<String> = errors
        .iter()
        .take(MAX_REPORTED_ERRORS)
        .map(|e| match e.line {
            Some(l) => format!("line {l}: {}", e.message),
            None => e.message.clone(),
        })
        .collect();
    let lines = errors.iter().filter(|e| e.line.is_some()).count();
    let mut s = if lines == 0 {
        listed.join("; ")
    } else {
        format!(
            "{lines} invalid line{}: {}",
            if lines == 1 { "" } else { "s" },
            listed.join("; ")
        )
    };
    if errors.len() > MAX_REPORTED_ERRORS {
        s.push_str(&format!(
            "; and {} more",
            errors.len() - MAX_REPORTED_ERRORS
        ));
    }
    s
}

impl UploadValidator for DatasetValidator {
    fn update(&mut self, chunk: &[u8]) -> Result<(), String> {
        if let Some(tx) = &self.tx
            && tx.send(Bytes::copy_from_slice(chunk)).is_err()
        {
            // The validator finished early (it never does before EOF); keep uploading.
            self.tx = None;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            self.outcome = Some(h.join().unwrap_or_else(|_| {
                Err(vec![DatasetError {
                    file: PathBuf::new(),
                    line: None,
                    message: "the validator crashed".into(),
                }])
            }));
        }
        Ok(())
    }
}

impl Drop for DatasetValidator {
    fn drop(&mut self) {
        // Ends the reader; the thread finishes on its own.
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> DatasetValidator {
        let mut v = DatasetValidator::new("upload.jsonl");
        for c in chunks {
            v.update(c).unwrap();
        }
        v.finish().unwrap();
        v
    }

    #[test]
    fn valid_file_in_odd_chunks() {
        let data = b"{\"text\": \"hello\"}\n\n{\"text\": \"again\"}\r\n{\"text\": \"x\"}";
        for split in [1usize, 3, 7, 1000] {
            let chunks: Vec<&[u8]> = data.chunks(split).collect();
            let v = run(&chunks);
            assert!(v.is_valid(), "{:?}", v.status_details());
            assert_eq!(v.examples(), 3);
            assert_eq!(v.kind().as_deref(), Some("text"));
        }
    }

    #[test]
    fn errors_carry_line_numbers() {
        let v = run(&[b"{\"text\": \"ok\"}\n{bad json\n"]);
        assert!(!v.is_valid());
        let details = v.status_details().unwrap();
        assert!(details.contains("line 2"), "{details}");
    }

    #[test]
    fn chat_files_are_validated() {
        let v = run(&[
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, ",
            b"{\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
        ]);
        assert!(v.is_valid(), "{:?}", v.status_details());
        assert_eq!(v.kind().as_deref(), Some("chat"));
        let v = run(&[
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        ]);
        let details = v.status_details().unwrap();
        assert!(
            details.starts_with("1 invalid line: line 2: no assistant message to train on"),
            "{details}"
        );
    }

    #[test]
    fn empty_file() {
        let v = run(&[b""]);
        assert!(!v.is_valid());
        assert!(v.status_details().is_some());
    }
}
