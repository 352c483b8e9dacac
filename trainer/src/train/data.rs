//! JSONL datasets: parsing with file:line errors, tokenization into training examples, and
//! right-padded batches with loss masks.
//!
//! Four formats, one per file (the first example decides, every later line must match):
//! - `{"text": ...}`: language modelling on every token. Texts longer than `max_seq_length`
//!   are split into windows that overlap by one token, so every next-token pair is scored
//!   exactly once and nothing is thrown away.
//! - `{"prompt": ..., "completion": ...}`: loss on the completion only (prompt labels are
//!   −100). An end-of-sequence token follows the completion so the model learns to stop.
//! - `{"context": ..., "choices": [...], "label": i}`: trained like a prompt/completion pair
//!   with the correct choice as the completion (no end-of-sequence token: the papers'
//!   benchmarks score the choice alone); evaluated by the summed log-likelihood of each
//!   choice given the context (lm-eval-harness's `acc`). Choices are appended to the context
//!   as they are, so include the leading space a choice needs (" yes", not "yes").
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: OpenAI's chat fine-tuning format.
//!   Roles `system`, `user`, `assistant`; `content` a string (or OpenAI's list of
//!   `{"type": "text", "text"}` parts); an assistant message may carry `"weight": 0` to be
//!   context only. The loss is on assistant replies only. Each message becomes the plain
//!   text `<|{role}|>\n{content}\n` ([`render_chat`]); an assistant reply's content and
//!   newline are scored and followed by a scored end-of-sequence token. Messages after the
//!   last trained reply are dropped (a causal model's loss cannot depend on them). To
//!   generate a reply, a server renders the conversation the same way and appends
//!   `<|assistant|>\n` ([`chat_prompt`]). Tool and function calls are not supported.
//!
//! Too long prompt/completion and multiple-choice examples lose tokens from the *start* of
//! the prompt/context (what is closest to the completion matters most), and only then from
//! the end of the completion; too long conversations likewise lose their earliest tokens,
//! down to the start of the last trained reply, and only then the end of that reply. Other
//! fields on a line are ignored; blank lines are skipped.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::IGNORE_INDEX;
use crate::tokenizer::Tokenizer;

use super::TrainError;

/// The dataset formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// `{"text"}`
    Text,
    /// `{"prompt", "completion"}`
    PromptCompletion,
    /// `{"context", "choices", "label"}`
    MultipleChoice,
    /// `{"messages": [{"role", "content"}, ...]}`
    Chat,
    /// Labelled images (image classification).
    Images,
}

impl DatasetKind {
    fn describe(self) -> &'static str {
        match self {
            DatasetKind::Text => "a text example ({\"text\"})",
            DatasetKind::PromptCompletion => {
                "a prompt/completion example ({\"prompt\", \"completion\"})"
            }
            DatasetKind::MultipleChoice => {
                "a multiple-choice example ({\"context\", \"choices\", \"label\"})"
            }
            DatasetKind::Chat => "a chat example ({\"messages\"})",
            DatasetKind::Images => "a labelled image",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetKind::Text => "text",
            DatasetKind::PromptCompletion => "prompt_completion",
            DatasetKind::MultipleChoice => "multiple_choice",
            DatasetKind::Chat => "chat",
            DatasetKind::Images => "images",
        })
    }
}

/// What [`validate_dataset`] found in a valid file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub kind: DatasetKind,
    pub examples: usize,
    /// Lines read, blank ones included.
    pub lines: usize,
    pub bytes: u64,
}

/// One problem in a dataset file. `line` is 1-based; `None` for the whole file (e.g. empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for DatasetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for DatasetError {}

/// Formats a list of dataset errors for [`TrainError::Dataset`].
pub(crate) struct ErrorList<'a>(pub &'a [DatasetError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 10;
        match self.0 {
            [] => write!(f, "invalid dataset"),
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} dataset errors:", many.len())?;
                for e in many.iter().take(SHOWN) {
                    write!(f, "\n  {e}")?;
                }
                if many.len() > SHOWN {
                    write!(f, "\n  ... and {} more", many.len() - SHOWN)?;
                }
                Ok(())
            }
        }
    }
}

/// Beyond this many, errors are counted but not kept: a file with a wrong format would
/// otherwise produce one error per line.
const MAX_ERRORS: usize = 100;

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    MultipleChoice {
        context: String,
        choices: Vec<String>,
        label: usize,
    },
    Chat(Vec<ChatMessage>),
}

impl Record {
    pub fn kind(&self) -> DatasetKind {
        match self {
            Record::Text(_) => DatasetKind::Text,
            Record::PromptCompletion { .. } => DatasetKind::PromptCompletion,
            Record::MultipleChoice { .. } => DatasetKind::MultipleChoice,
            Record::Chat(_) => DatasetKind::Chat,
        }
    }
}

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

impl ChatRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        }
    }
}

/// One message of a chat example.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
    /// Whether the loss trains on it: assistant messages unless `"weight": 0`.
    pub train: bool,
}

/// The header that opens a message in the chat template: `<|user|>\n`.
pub fn chat_header(role: ChatRole) -> String {
    format!("<|{}|>\n", role.as_str())
}

/// A conversation in the plain-text chat template (see the module docs), without the
/// end-of-sequence tokens that follow trained replies in training.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&chat_header(m.role));
        s.push_str(&m.content);
        s.push('\n');
    }
    s
}

/// The text a model continues to write the assistant's next reply: the conversation
/// followed by the assistant header. Generation should stop at the end-of-sequence token.
pub fn chat_prompt(messages: &[ChatMessage]) -> String {
    let mut s = render_chat(messages);
    s.push_str(&chat_header(ChatRole::Assistant));
    s
}

/// Reads every line of `path`, checking each, and calls `each` with the valid records.
/// Every error is collected (up to [`MAX_ERRORS`], then counted).
fn scan(
    path: &Path,
    expected: Option<DatasetKind>,
    each: impl FnMut(usize, Record),
) -> Result<DatasetSummary, Vec<DatasetError>> {
    let file = std::fs::File::open(path).map_err(|e| {
        vec![DatasetError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot open: {e}"),
        }]
    })?;
    scan_reader(file, path, expected, each)
}

fn scan_reader(
    reader: impl Read,
    path: &Path,
    expected: Option<DatasetKind>,
    mut each: impl FnMut(usize, Record),
) -> Result<DatasetSummary, Vec<DatasetError>> {
    let err = |line: Option<usize>, message: String| DatasetError {
        file: path.to_path_buf(),
        line,
        message,
    };
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut errors = Vec::new();
    let mut dropped = 0usize;
    let mut push = |errors: &mut Vec<DatasetError>, e: DatasetError| {
        if errors.len() < MAX_ERRORS {
            errors.push(e);
        } else {
            dropped += 1;
        }
    };
    // The kind, and the line that fixed it (None when the caller fixed it).
    let mut kind: Option<(DatasetKind, Option<usize>)> = expected.map(|k| (k, None));
    let mut buf = Vec::new();
    let (mut lines, mut examples, mut bytes) = (0usize, 0usize, 0u64);
    loop {
        buf.clear();
        let n = match reader.read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                push(
                    &mut errors,
                    err(Some(lines + 1), format!("read error: {e}")),
                );
                break;
            }
        };
        if n == 0 {
            break;
        }
        lines += 1;
        bytes += n as u64;
        let mut raw: &[u8] = &buf;
        if lines == 1 {
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                push(
                    &mut errors,
                    err(
                        Some(lines),
                        format!(
                            "not valid UTF-8 (at byte {} of the line)",
                            e.valid_up_to() + 1
                        ),
                    ),
                );
                continue;
            }
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match parse_line(text) {
            Err(msg) => push(&mut errors, err(Some(lines), msg)),
            Ok(rec) => {
                let k = rec.kind();
                match kind {
                    None => kind = Some((k, Some(lines))),
                    Some((want, _)) if want == k => {}
                    Some((want, first)) => {
                        let whence = match first {
                            Some(l) => format!("the file's first example (line {l}) is"),
                            None => "this file must hold".to_string(),
                        };
                        push(
                            &mut errors,
                            err(
                                Some(lines),
                                format!(
                                    "this is {} but {whence} {}; one file holds one format",
                                    k.describe(),
                                    want.describe()
                                ),
                            ),
                        );
                        continue;
                    }
                }
                examples += 1;
                each(lines, rec);
            }
        }
    }
    if examples == 0 && errors.is_empty() {
        push(
            &mut errors,
            err(
                None,
                format!(
                    "the dataset is empty ({lines} line(s), no examples); expected JSON lines \
                     like {{\"text\": ...}}, {{\"prompt\": ..., \"completion\": ...}}, \
                     {{\"context\": ..., \"choices\": [...], \"label\": 0}} or \
                     {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}"
                ),
            ),
        );
    }
    if dropped > 0 {
        errors.push(err(
            None,
            format!("... and {dropped} more error(s) not listed"),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let Some((kind, _)) = kind else {
        return Err(vec![err(None, "the dataset is empty".into())]);
    };
    Ok(DatasetSummary {
        kind,
        examples,
        lines,
        bytes,
    })
}

/// Checks every line of a JSONL dataset without keeping it in memory. `expected` pins the
/// format; `None` takes it from the first example. On failure, every error found (each with
/// file and line; at most 100 listed, the rest counted).
pub fn validate_dataset(
    path: &Path,
    expected: Option<DatasetKind>,
) -> Result<DatasetSummary, Vec<DatasetError>> {
    scan(path, expected, |_, _| {})
}

/// Records with their 1-based line numbers.
pub type Records = Vec<(usize, Record)>;

/// Reads every record of a dataset (see [`validate_dataset`] for the checks).
pub fn read_dataset(
    path: &Path,
    expected: Option<DatasetKind>,
) -> Result<(DatasetSummary, Records), Vec<DatasetError>> {
    let mut out = Vec::new();
    let summary = scan(path, expected, |line, rec| out.push((line, rec)))?;
    Ok((summary, out))
}

/// Checks a dataset read from any reader (e.g. an upload being streamed); `label` names it
/// in errors.
pub fn validate_reader(
    reader: impl Read,
    label: &Path,
    expected: Option<DatasetKind>,
) -> Result<DatasetSummary, Vec<DatasetError>> {
    scan_reader(reader, label, expected, |_, _| {})
}

/// `serde_json`'s messages end in "at line 1 column N"; every line is its own document, so
/// only the column means anything.
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => format!("{} (column {})", &s[..i], e.column()),
        None => s,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(obj: &Map<String, Value>, field: &str) -> Result<String, String> {
    match obj.get(field) {
        None => Err(format!("missing field `{field}` (a string)")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!(
            "field `{field}` must be a string, found {}",
            type_name(v)
        )),
    }
}

/// Parses one non-blank line into a record, or says what is wrong with it.
fn parse_line(text: &str) -> Result<Record, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {}", json_message(&e)))?;
    let Value::Object(obj) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            type_name(&value)
        ));
    };
    let has = |k: &str| obj.contains_key(k);
    let text_fmt = has("text");
    let pc_fmt = has("prompt") || has("completion");
    let mc_fmt = has("context") || has("choices") || has("label");
    let chat_fmt = has("messages");
    if chat_fmt {
        if text_fmt || pc_fmt || mc_fmt {
            return Err(MIXED_FORMATS.into());
        }
        return parse_chat(&obj);
    }
    match (text_fmt, pc_fmt, mc_fmt) {
        (true, false, false) => {
            let t = string_field(&obj, "text")?;
            if t.trim().is_empty() {
                return Err("field `text` is empty".into());
            }
            Ok(Record::Text(t))
        }
        (false, true, false) => {
            let prompt = string_field(&obj, "prompt")?;
            let completion = string_field(&obj, "completion")?;
            if completion.is_empty() {
                return Err("field `completion` is empty; there is nothing to train on".into());
            }
            Ok(Record::PromptCompletion { prompt, completion })
        }
        (false, false, true) => parse_choice(&obj),
        (false, false, false) => {
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            Err(format!(
                "no known fields (found {}); expected {{\"text\"}}, {{\"prompt\", \
                 \"completion\"}}, {{\"context\", \"choices\", \"label\"}} or \
                 {{\"messages\"}}",
                if keys.is_empty() {
                    "none".to_string()
                } else {
                    keys.iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))
        }
        _ => Err(MIXED_FORMATS.into()),
    }
}

const MIXED_FORMATS: &str = "fields of more than one format on one line (`text`, \
     `prompt`/`completion`, `context`/`choices`/`label`, `messages`); use one format";

/// A chat message's `content`: a string, or OpenAI's list of `{"type": "text", "text"}`
/// parts (joined).
fn chat_content(v: Option<&Value>, at: &str) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err(format!(
            "{at}.content is missing (a string); tool and function calls are not supported"
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str);
                match (kind, p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    (Some("text"), _) => {
                        return Err(format!("{at}.content[{j}].text must be a string"));
                    }
                    (Some(other), _) => {
                        return Err(format!(
                            "{at}.content[{j}] has type \"{other}\"; only \"text\" parts are \
                             supported"
                        ));
                    }
                    (None, _) => {
                        return Err(format!(
                            "{at}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}}"
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(v) => Err(format!(
            "{at}.content must be a string, found {}",
            type_name(v)
        )),
    }
}

fn parse_chat(obj: &Map<String, Value>) -> Result<Record, String> {
    let messages = match obj.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err("field `messages` is empty".into()),
        Some(v) => {
            return Err(format!(
                "field `messages` must be an array of {{\"role\", \"content\"}} objects, found {}",
                type_name(v)
            ));
        }
        None => return Err("missing field `messages`".into()),
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(format!(
                "{at} must be an object {{\"role\", \"content\"}}, found {}",
                type_name(m)
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "developer" => ChatRole::System,
                "user" => ChatRole::User,
                "assistant" => ChatRole::Assistant,
                "tool" | "function" => {
                    return Err(format!(
                        "{at}.role is \"{r}\"; tool and function messages are not supported"
                    ));
                }
                other => {
                    return Err(format!(
                        "{at}.role must be \"system\", \"user\" or \"assistant\", found \"{other}\""
                    ));
                }
            },
            Some(v) => {
                return Err(format!(
                    "{at}.role must be a string, found {}",
                    type_name(v)
                ));
            }
            None => return Err(format!("{at} has no `role`")),
        };
        if m.contains_key("tool_calls") || m.contains_key("function_call") {
            return Err(format!(
                "{at} has tool or function calls, which are not supported"
            ));
        }
        let content = chat_content(m.get("content"), &at)?;
        let train = match m.get("weight") {
            None => role == ChatRole::Assistant,
            Some(w) if role != ChatRole::Assistant => {
                return Err(format!(
                    "{at}.weight ({w}) is only allowed on assistant messages"
                ));
            }
            Some(w) => match w.as_f64() {
                Some(0.0) => false,
                Some(1.0) => true,
                _ => return Err(format!("{at}.weight must be 0 or 1, found {w}")),
            },
        };
        if train && content.is_empty() {
            return Err(format!(
                "{at}.content is empty; an assistant reply that is trained on needs text"
            ));
        }
        out.push(ChatMessage {
            role,
            content,
            train,
        });
    }
    if !out.iter().any(|m| m.train) {
        return Err(
            "no assistant message to train on (the loss is on assistant replies; \
             `\"weight\": 0` ones do not count)"
                .into(),
        );
    }
    Ok(Record::Chat(out))
}

fn parse_choice(obj: &Map<String, Value>) -> Result<Record, String> {
    let context = string_field(obj, "context")?;
    let choices = match obj.get("choices") {
        None => return Err("missing field `choices` (an array of strings)".into()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(format!(
                "field `choices` must be an array of strings, found {}",
                type_name(v)
            ));
        }
    };
    if choices.len() < 2 {
        return Err(format!(
            "field `choices` has {} choice(s); a multiple-choice example needs at least 2",
            choices.len()
        ));
    }
    let mut out = Vec::with_capacity(choices.len());
    for (i, c) in choices.iter().enumerate() {
        match c {
            Value::String(s) if !s.is_empty() => out.push(s.clone()),
            Value::String(_) => return Err(format!("choices[{i}] is empty")),
            v => {
                return Err(format!(
                    "choices[{i}] must be a string, found {}",
                    type_name(v)
                ));
            }
        }
    }
    let label = match obj.get("label") {
        None => return Err("missing field `label` (the index of the correct choice)".into()),
        Some(v) => v,
    };
    let max = out.len() - 1;
    let label = match label.as_u64() {
        Some(l) if (l as usize) <= max => l as usize,
        Some(l) => {
            return Err(format!(
                "label {l} is out of range for {} choices (valid: 0..={max})",
                out.len()
            ));
        }
        None => {
            return Err(match label {
                Value::Number(n) => format!(
                    "label {n} is not a valid index for {} choices (valid: 0..={max})",
                    out.len()
                ),
                v => format!(
                    "field `label` must be an integer index into `choices` (0..={max}), found {}",
                    type_name(v)
                ),
            });
        }
    };
    Ok(Record::MultipleChoice {
        context,
        choices: out,
        label,
    })
}

// ----- tokenization -------------------------------------------------------------------------

/// One training sequence: token ids and per-position labels (−100 = not scored). The loss
/// scores `labels[t]` against the logits at `t − 1`, so `labels[0]` is never used.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Positions whose label is scored (excluding position 0, which has no predecessor).
    pub fn scored(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|l| **l != IGNORE_INDEX)
            .count()
    }
}

/// A multiple-choice example for evaluation: one sequence per choice, scored on the
/// choice's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceExample {
    pub choices: Vec<Example>,
    pub label: usize,
}

/// A tokenized dataset.
#[derive(Debug, Clone)]
pub struct Tokenized {
    pub kind: DatasetKind,
    /// What the loss trains on (for multiple choice: context + correct choice).
    pub examples: Vec<Example>,
    /// Multiple choice only.
    pub choice_sets: Vec<ChoiceExample>,
    /// Source records.
    pub records: usize,
}

/// How records become token sequences.
#[derive(Debug, Clone)]
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub max_len: usize,
    /// Appended to texts and completions (and used as the context of an empty prompt).
    pub eos: Option<u32>,
}

impl Encoder<'_> {
    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .inner()
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer failed: {e}"))
    }

    /// `prompt` + `completion`, truncated to `max_len` (prompt first, from its start); the
    /// completion positions are scored. An empty prompt becomes the EOS token so the first
    /// completion token has something to be predicted from.
    fn pair(&self, mut prompt: Vec<u32>, mut completion: Vec<u32>) -> Example {
        if prompt.is_empty()
            && let Some(e) = self.eos
        {
            prompt.push(e);
        }
        let max = self.max_len.max(2);
        if prompt.len() + completion.len() > max {
            // Keep one prompt token when there is one, so the completion's first token is
            // still scored.
            let keep_prompt = max
                .saturating_sub(completion.len())
                .max(prompt.len().min(1));
            let drop = prompt.len() - keep_prompt.min(prompt.len());
            prompt.drain(..drop);
            completion.truncate(max - prompt.len());
        }
        let mut labels = vec![IGNORE_INDEX; prompt.len()];
        labels.extend(completion.iter().map(|&t| i64::from(t)));
        let mut ids = prompt;
        ids.extend(completion);
        Example { ids, labels }
    }

    /// A conversation in the chat template, scored on the trained replies and their
    /// end-of-sequence tokens; truncated as the module docs say.
    fn chat(&self, messages: &[ChatMessage]) -> Result<Example, String> {
        let last = messages
            .iter()
            .rposition(|m| m.train)
            .ok_or("no assistant message to train on")?;
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        // Where the last trained reply starts.
        let mut reply_start = 0;
        for (i, m) in messages[..=last].iter().enumerate() {
            let header = self.encode(&chat_header(m.role), i == 0)?;
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, header.len()));
            ids.extend(header);
            let body = self.encode(&format!("{}\n", m.content), false)?;
            if m.train {
                reply_start = ids.len();
                labels.extend(body.iter().map(|&t| i64::from(t)));
                ids.extend(body);
                if let Some(e) = self.eos {
                    ids.push(e);
                    labels.push(i64::from(e));
                }
            } else {
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, body.len()));
                ids.extend(body);
            }
        }
        let max = self.max_len.max(2);
        if ids.len() > max {
            // Keep one token before the reply so that its first token is still scored.
            let drop = (ids.len() - max).min(reply_start.saturating_sub(1));
            ids.drain(..drop);
            labels.drain(..drop);
            ids.truncate(max);
            labels.truncate(max);
        }
        Ok(Example { ids, labels })
    }

    /// One sequence per choice (context + choice, the choice's tokens scored), as the
    /// evaluation and the serving API's scoring both use.
    pub fn choice_set(
        &self,
        context: &str,
        choices: &[String],
        label: usize,
    ) -> Result<ChoiceExample, String> {
        let ctx = self.encode(context, true)?;
        let mut set = Vec::with_capacity(choices.len());
        for (i, ch) in choices.iter().enumerate() {
            let c = self.encode(ch, false)?;
            if c.is_empty() {
                return Err(format!("choices[{i}] has no tokens"));
            }
            set.push(self.pair(ctx.clone(), c));
        }
        Ok(ChoiceExample {
            choices: set,
            label,
        })
    }

    /// Windows of `max_len` tokens overlapping by one (see the module docs).
    pub fn windows(&self, ids: &[u32]) -> Vec<Example> {
        let max = self.max_len.max(2);
        let mut out = Vec::new();
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + max).min(ids.len());
            let w = ids[start..end].to_vec();
            let labels = w.iter().map(|&t| i64::from(t)).collect();
            out.push(Example { ids: w, labels });
            if end == ids.len() {
                break;
            }
            start = end - 1;
        }
        out
    }

    /// Tokenizes records into examples; errors name `file` and the record's line.
    pub fn tokenize(
        &self,
        file: &Path,
        kind: DatasetKind,
        records: &[(usize, Record)],
    ) -> Result<Tokenized, Vec<DatasetError>> {
        let mut errors = Vec::new();
        let mut examples = Vec::new();
        let mut choice_sets = Vec::new();
        for (line, rec) in records {
            let res: Result<(), String> = (|| {
                match rec {
                    Record::Text(t) => {
                        let mut ids = self.encode(t, true)?;
                        ids.extend(self.eos);
                        let w = self.windows(&ids);
                        if w.is_empty() {
                            return Err("the text is a single token; nothing to predict".into());
                        }
                        examples.extend(w);
                    }
                    Record::PromptCompletion { prompt, completion } => {
                        let p = self.encode(prompt, true)?;
                        let mut c = self.encode(completion, false)?;
                        if c.is_empty() {
                            return Err("the completion has no tokens".into());
                        }
                        c.extend(self.eos);
                        examples.push(self.pair(p, c));
                    }
                    Record::MultipleChoice {
                        context,
                        choices,
                        label,
                    } => {
                        let set = self.choice_set(context, choices, *label)?;
                        let Some(train) = set.choices.get(*label).cloned() else {
                            return Err(format!("label {label} is out of range"));
                        };
                        examples.push(train);
                        choice_sets.push(set);
                    }
                    Record::Chat(messages) => examples.push(self.chat(messages)?),
                }
                Ok(())
            })();
            if let Err(message) = res
                && errors.len() < MAX_ERRORS
            {
                errors.push(DatasetError {
                    file: file.to_path_buf(),
                    line: Some(*line),
                    message,
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Guaranteed by the construction above, checked because the loss refuses a batch
        // with nothing to score.
        if let Some(i) = examples.iter().position(|e| e.scored() == 0) {
            return Err(vec![DatasetError {
                file: file.to_path_buf(),
                line: records.get(i).map(|r| r.0),
                message: "the example has no token to score after truncation".into(),
            }]);
        }
        Ok(Tokenized {
            kind,
            examples,
            choice_sets,
            records: records.len(),
        })
    }
}

/// A right-padded batch. Right padding needs no attention mask for a causal model: padding
/// comes after every real token, so it cannot change their outputs, and its labels are −100.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, T]` u32.
    pub input_ids: Tensor,
    /// `[b, T]` i64, −100 where not scored.
    pub labels: Tensor,
    /// Scored positions.
    pub scored: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

/// Pads `examples` on the right with `pad` to the longest one.
pub fn collate(examples: &[&Example], pad: u32, device: &Device) -> candle_core::Result<Batch> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b * t);
    let (mut scored, mut tokens) = (0, 0);
    for e in examples {
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad, t - e.ids.len()));
        labels.extend_from_slice(&e.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - e.labels.len()));
        scored += e.scored();
        tokens += e.ids.len();
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        scored,
        tokens,
    })
}

/// Reads and tokenizes a dataset file; errors are wrapped in [`TrainError::Dataset`].
pub fn load(
    path: &Path,
    expected: Option<DatasetKind>,
    enc: &Encoder<'_>,
) -> Result<Tokenized, TrainError> {
    let (summary, records) =
        read_dataset(path, expected).map_err(|errors| TrainError::Dataset { errors })?;
    enc.tokenize(path, summary.kind, &records)
        .map_err(|errors| TrainError::Dataset { errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_column_only() {
        let e = parse_line("{\"text\": }").unwrap_err();
        assert!(
            e.starts_with("not valid JSON: expected value (column"),
            "{e}"
        );
        assert!(!e.contains("line"), "{e}");
    }

    #[test]
    fn kinds_are_detected() {
        assert_eq!(
            parse_line(r#"{"text":"a b","id":3}"#).unwrap().kind(),
            DatasetKind::Text
        );
        assert_eq!(
            parse_line(r#"{"prompt":"","completion":"x"}"#)
                .unwrap()
                .kind(),
            DatasetKind::PromptCompletion
        );
        let e = parse_line(r#"{"text":"a","prompt":"b"}"#).unwrap_err();
        assert!(e.contains("more than one format"), "{e}");
        let e = parse_line(r#"{"context":"a","choices":["x","y"],"label":-1}"#).unwrap_err();
        assert!(e.contains("label -1 is not a valid index"), "{e}");
        let e = parse_line(r#"{"context":"a","choices":["x","y"],"label":1.5}"#).unwrap_err();
        assert!(e.contains("valid: 0..=1"), "{e}");
    }
}
