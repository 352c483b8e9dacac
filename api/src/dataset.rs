//! Line-by-line validation of an uploaded JSONL dataset, as it streams to the blob store
//! (memory: one line at a time, at most [`MAX_LINE_BYTES`]).
//!
//! Purpose `fine-tune` accepts one JSON object per line in one of three shapes:
//!
//! - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}` with at
//!   least one `assistant` message (OpenAI's chat fine-tuning format);
//! - completion: `{"prompt": "…", "completion": "…"}` (OpenAI's legacy format);
//! - plain text: `{"text": "…"}` (language-model continued training).
//!
//! Blank lines are skipped. The validator never rejects the upload: it records the first
//! [`MAX_REPORTED_ERRORS`] problems with their 1-based line numbers, and the file is stored
//! with `status: "error"` and those problems in `status_details`, so that the user can see
//! exactly what to fix; a job naming such a file is refused with the same message.

use serde_json::Value;
use storage::UploadValidator;

/// The one purpose molt accepts for uploads.
pub const PURPOSE_FINE_TUNE: &str = "fine-tune";

/// Longest accepted line (longer ones are reported as errors and skipped).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// How many problems `status_details` lists.
pub const MAX_REPORTED_ERRORS: usize = 10;

/// One problem, at a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Streaming JSONL validator for purpose `fine-tune`.
#[derive(Debug, Default)]
pub struct JsonlValidator {
    /// Bytes of the current, unfinished line.
    partial: Vec<u8>,
    /// 1-based number of the line being read.
    line: u64,
    /// The current line is over the limit: drop bytes until its end.
    skipping: bool,
    examples: u64,
    error_count: u64,
    errors: Vec<LineError>,
    finished: bool,
}

impl JsonlValidator {
    pub fn new() -> Self {
        JsonlValidator {
            line: 1,
            ..JsonlValidator::default()
        }
    }

    /// Valid examples seen.
    pub fn examples(&self) -> u64 {
        self.examples
    }

    /// Total number of problems (only the first few are kept).
    pub fn error_count(&self) -> u64 {
        self.error_count
    }

    /// The first problems.
    pub fn errors(&self) -> &[LineError] {
        &self.errors
    }

    /// True when the file is a usable dataset.
    pub fn is_valid(&self) -> bool {
        self.error_count == 0 && self.examples > 0
    }

    /// The text for `status_details`: `None` for a valid file.
    pub fn status_details(&self) -> Option<String> {
        if self.is_valid() {
            return None;
        }
        if self.error_count == 0 {
            return Some("the file is empty: it holds no training examples".to_string());
        }
        let listed: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        let more = self.error_count - self.errors.len() as u64;
        let mut s = format!(
            "{} invalid line{}: {}",
            self.error_count,
            if self.error_count == 1 { "" } else { "s" },
            listed.join("; ")
        );
        if more > 0 {
            s.push_str(&format!("; and {more} more"));
        }
        Some(s)
    }

    fn error(&mut self, message: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(LineError {
                line: self.line,
                message,
            });
        }
    }

    /// Checks one complete line (without its `\n`).
    fn check_line(&mut self, raw: &[u8]) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                self.error(format!(
                    "not valid UTF-8 (invalid byte at offset {} of the line)",
                    e.valid_up_to()
                ));
                return;
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.error(format!("invalid JSON: {e}"));
                return;
            }
        };
        match check_example(&value) {
            Ok(()) => self.examples += 1,
            Err(msg) => self.error(msg),
        }
    }

    fn end_line(&mut self) {
        if self.skipping {
            self.skipping = false;
        } else {
            let line = std::mem::take(&mut self.partial);
            self.check_line(&line);
        }
        self.line += 1;
    }
}

/// Checks the shape of one example.
pub fn check_example(value: &Value) -> Result<(), String> {
    let Some(obj) = value.as_object() else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_kind(value)
        ));
    };
    if let Some(messages) = obj.get("messages") {
        let Some(messages) = messages.as_array() else {
            return Err("`messages` must be an array".into());
        };
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        let mut assistant = false;
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                format!("messages[{i}] needs a string `role` (system, user or assistant)")
            })?;
            match role {
                "system" | "user" | "developer" => {}
                "assistant" => assistant = true,
                other => {
                    return Err(format!(
                        "messages[{i}].role is '{other}'; expected system, user or assistant"
                    ));
                }
            }
            if !m.get("content").is_some_and(Value::is_string) {
                return Err(format!("messages[{i}] needs a string `content`"));
            }
        }
        if !assistant {
            return Err("`messages` has no assistant message to learn from".into());
        }
        return Ok(());
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        for field in ["prompt", "completion"] {
            if !obj.get(field).is_some_and(Value::is_string) {
                return Err(format!("`{field}` must be a string"));
            }
        }
        return Ok(());
    }
    if let Some(text) = obj.get("text") {
        return match text.as_str() {
            Some(t) if !t.is_empty() => Ok(()),
            Some(_) => Err("`text` is empty".into()),
            None => Err("`text` must be a string".into()),
        };
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).take(5).collect();
    Err(format!(
        "wrong schema for purpose 'fine-tune': expected `messages`, `prompt` + `completion`, \
         or `text`; found keys [{}]",
        keys.join(", ")
    ))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl UploadValidator for JsonlValidator {
    fn update(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if !self.skipping {
                        if self.partial.len() + i > MAX_LINE_BYTES {
                            self.partial.clear();
                            self.error(format!("longer than {MAX_LINE_BYTES} bytes"));
                        } else {
                            self.partial.extend_from_slice(&chunk[..i]);
                        }
                    }
                    self.end_line();
                    chunk = &chunk[i + 1..];
                }
                None => {
                    if !self.skipping {
                        if self.partial.len() + chunk.len() > MAX_LINE_BYTES {
                            self.partial = Vec::new();
                            self.error(format!("longer than {MAX_LINE_BYTES} bytes"));
                            self.skipping = true;
                        } else {
                            self.partial.extend_from_slice(chunk);
                        }
                    }
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        if !self.finished {
            self.finished = true;
            if self.skipping || !self.partial.is_empty() {
                self.end_line();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> JsonlValidator {
        let mut v = JsonlValidator::new();
        for c in chunks {
            v.update(c).unwrap();
        }
        v.finish().unwrap();
        v
    }

    #[test]
    fn valid_file_in_odd_chunks() {
        let data = b"{\"text\": \"hello\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\r\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}";
        for split in [1usize, 3, 7, 1000] {
            let chunks: Vec<&[u8]> = data.chunks(split).collect();
            let v = run(&chunks);
            assert!(v.is_valid(), "{:?}", v.errors());
            assert_eq!(v.examples(), 3);
            assert_eq!(v.status_details(), None);
        }
    }

    #[test]
    fn errors_carry_line_numbers() {
        let v = run(&[b"{\"text\": \"ok\"}\n{bad json\n[1]\n{\"foo\": 1}\n"]);
        assert!(!v.is_valid());
        let lines: Vec<u64> = v.errors().iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        let details = v.status_details().unwrap();
        assert!(
            details.starts_with("3 invalid lines: line 2: invalid JSON"),
            "{details}"
        );
        assert!(details.contains("line 4: wrong schema"), "{details}");
    }

    #[test]
    fn empty_and_non_utf8() {
        let v = run(&[b""]);
        assert!(!v.is_valid());
        assert!(v.status_details().unwrap().contains("empty"));
        let v = run(&[b"\n\n  \n"]);
        assert!(v.status_details().unwrap().contains("empty"));
        let v = run(&[b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n"]);
        assert_eq!(v.errors()[0].line, 2);
        assert!(v.errors()[0].message.contains("UTF-8"));
    }

    #[test]
    fn chat_needs_an_assistant() {
        let v = run(&[b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"]);
        assert!(v.errors()[0].message.contains("assistant"));
    }

    #[test]
    fn only_first_errors_are_listed() {
        let data = "x\n".repeat(25);
        let v = run(&[data.as_bytes()]);
        assert_eq!(v.error_count(), 25);
        assert_eq!(v.errors().len(), MAX_REPORTED_ERRORS);
        assert!(v.status_details().unwrap().ends_with("and 15 more"));
    }
}
