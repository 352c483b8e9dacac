//! Validation of an uploaded dataset while it streams to the blob store, with the trainer's
//! own rules (`trainer::train::data::validate_reader`), so that what the API accepts is
//! exactly what a worker can train on.
//!
//! Formats (one per file; the first example decides): `{"text"}`,
//! `{"prompt", "completion"}`, `{"context", "choices", "label"}` and OpenAI's chat format
//! `{"messages": [{"role", "content"}, ...]}`. Blank lines are skipped.
//!
//! The trainer's validator reads synchronously, so it runs on its own thread, fed through a
//! bounded channel of chunks (memory stays bounded: at most [`CHANNEL_CHUNKS`] chunks are
//! queued, and the validator holds one line at a time). The validator never rejects the
//! upload: the file is stored with `status: "error"` and the first problems, with their line
//! numbers, in `status_details`; a job naming such a file is refused with the same text.

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;
use storage::UploadValidator;
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

type Outcome = Result<DatasetSummary, Vec<DatasetError>>;

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
                trainer::train::data::validate_reader(reader, &label, None)
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
        matches!(self.outcome(), Some(Ok(s)) if s.examples > 0)
    }

    /// Valid examples (0 unless valid).
    pub fn examples(&self) -> u64 {
        match self.outcome() {
            Some(Ok(s)) => s.examples as u64,
            _ => 0,
        }
    }

    /// The dataset's format (`text`, `prompt_completion`, `multiple_choice`, `chat`) when valid.
    pub fn kind(&self) -> Option<String> {
        match self.outcome() {
            Some(Ok(s)) => Some(s.kind.to_string()),
            _ => None,
        }
    }

    /// The text for `status_details`: `None` for a valid file.
    pub fn status_details(&self) -> Option<String> {
        match self.outcome() {
            Some(Ok(s)) if s.examples > 0 => None,
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
