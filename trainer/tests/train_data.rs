//! JSONL datasets: every error names its file and line; tokenization masks prompts, splits
//! long texts and truncates from the right place; batches are right-padded with −100.

use std::path::{Path, PathBuf};

use candle_core::Device;
use trainer::model::IGNORE_INDEX;
use trainer::tokenizer::Tokenizer;
use trainer::train::data::{
    ChatMessage, ChatRole, Encoder, chat_prompt, collate, read_dataset, validate_reader,
};
use trainer::train::{DatasetKind, validate_dataset};

fn tiny_tokenizer() -> Tokenizer {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/model/tokenizer.json");
    Tokenizer::from_file(&p).unwrap()
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// The errors of a file, as `file:line: message` strings.
fn errors(path: &Path) -> Vec<String> {
    validate_dataset(path, None)
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn every_bad_line_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = concat!(
        "{\"prompt\": \"a\", \"completion\": \" b\"}\n", // 1 ok, fixes the format
        "{\"prompt\": \"a\", \"completion\": }\n",       // 2 not JSON
        "\n",                                            // 3 blank: skipped
        "[1, 2]\n",                                      // 4 not an object
        "{\"prompt\": \"a\"}\n",                         // 5 missing completion
        "{\"prompt\": 3, \"completion\": \"x\"}\n",      // 6 wrong type
        "{\"text\": \"hello\"}\n",                       // 7 another format
        "{\"foo\": 1}\n",                                // 8 no known field
        "{\"prompt\": \"a\", \"completion\": \"\"}\n",   // 9 empty completion
    );
    let f = write(dir.path(), "train.jsonl", body.as_bytes());
    let got = errors(&f);
    let file = f.display().to_string();
    let want = [
        (2, "not valid JSON: expected value (column 31)"),
        (4, "expected a JSON object, found an array"),
        (5, "missing field `completion` (a string)"),
        (6, "field `prompt` must be a string, found a number"),
        (
            7,
            "this is a text example ({\"text\"}) but the file's first example (line 1) is a \
             prompt/completion example",
        ),
        (8, "no known fields (found `foo`)"),
        (9, "field `completion` is empty"),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, (line, msg)) in got.iter().zip(want) {
        let prefix = format!("{file}:{line}: {msg}");
        assert!(g.starts_with(&prefix), "got  {g}\nwant {prefix}…");
    }
}

#[test]
fn multiple_choice_errors() {
    let dir = tempfile::tempdir().unwrap();
    let body = concat!(
        "{\"context\": \"q\", \"choices\": [\" a\", \" b\"], \"label\": 1}\n",
        "{\"context\": \"q\", \"choices\": [\" a\", \" b\"], \"label\": 2}\n",
        "{\"context\": \"q\", \"choices\": [\" a\"], \"label\": 0}\n",
        "{\"context\": \"q\", \"choices\": [\" a\", 7], \"label\": 0}\n",
        "{\"context\": \"q\", \"choices\": [\" a\", \" b\"], \"label\": \"1\"}\n",
        "{\"context\": \"q\", \"choices\": \" a\", \"label\": 0}\n",
        "{\"choices\": [\" a\", \" b\"], \"label\": 0}\n",
    );
    let f = write(dir.path(), "mc.jsonl", body.as_bytes());
    let got = errors(&f);
    let file = f.display().to_string();
    let want = [
        (2, "label 2 is out of range for 2 choices (valid: 0..=1)"),
        (
            3,
            "field `choices` has 1 choice(s); a multiple-choice example needs at least 2",
        ),
        (4, "choices[1] must be a string, found a number"),
        (
            5,
            "field `label` must be an integer index into `choices` (0..=1), found a string",
        ),
        (
            6,
            "field `choices` must be an array of strings, found a string",
        ),
        (7, "missing field `context` (a string)"),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, (line, msg)) in got.iter().zip(want) {
        assert_eq!(g, &format!("{file}:{line}: {msg}"));
    }
}

#[test]
fn empty_non_utf8_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.jsonl", b"\n  \n");
    let e = errors(&empty);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(&format!(
            "{}: the dataset is empty (2 line(s), no examples)",
            empty.display()
        )),
        "{e:?}"
    );
    let zero = write(dir.path(), "zero.jsonl", b"");
    assert!(errors(&zero)[0].contains("the dataset is empty"));

    let bad = write(
        dir.path(),
        "latin1.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n",
    );
    let e = errors(&bad);
    assert_eq!(
        e,
        vec![format!(
            "{}:2: not valid UTF-8 (at byte 14 of the line)",
            bad.display()
        )]
    );

    // A BOM, CRLF line ends, extra fields and a missing final newline are fine.
    let ok = write(
        dir.path(),
        "ok.jsonl",
        b"\xEF\xBB\xBF{\"text\": \"one\", \"id\": 1}\r\n{\"text\": \"two\"}",
    );
    let s = validate_dataset(&ok, None).unwrap();
    assert_eq!((s.kind, s.examples, s.lines), (DatasetKind::Text, 2, 2));
    // A pinned format is enforced from line 1.
    let e = validate_dataset(&ok, Some(DatasetKind::PromptCompletion)).unwrap_err();
    assert!(
        e[0].to_string().contains(":1: this is a text example"),
        "{}",
        e[0]
    );
    assert!(
        e[0].to_string()
            .contains("this file must hold a prompt/completion example")
    );

    // The reader entry point names the label it is given.
    let e = validate_reader(&b"{\"text\": 1}\n"[..], Path::new("upload.jsonl"), None).unwrap_err();
    assert_eq!(
        e[0].to_string(),
        "upload.jsonl:1: field `text` must be a string, found a number"
    );
}

#[test]
fn errors_are_capped_but_counted() {
    let dir = tempfile::tempdir().unwrap();
    let body = "nope\n".repeat(250);
    let f = write(dir.path(), "bad.jsonl", body.as_bytes());
    let e = validate_dataset(&f, None).unwrap_err();
    assert_eq!(e.len(), 101);
    assert_eq!(e[99].line, Some(100));
    assert_eq!(e[100].line, None);
    assert!(e[100].message.contains("150 more error(s)"), "{}", e[100]);
}

#[test]
fn prompt_is_masked_and_completion_scored_with_eos() {
    let tok = tiny_tokenizer();
    let enc = Encoder {
        tokenizer: &tok,
        max_len: 64,
        eos: Some(0),
    };
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "pc.jsonl",
        b"{\"prompt\": \"The sky is\", \"completion\": \" blue\"}\n{\"prompt\": \"\", \"completion\": \" hi\"}\n",
    );
    let (s, recs) = read_dataset(&f, None).unwrap();
    let t = enc.tokenize(&f, s.kind, &recs).unwrap();
    let p = tok.encode("The sky is").unwrap();
    let c = tok
        .inner()
        .encode(" blue", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let e = &t.examples[0];
    let mut want_ids = p.clone();
    want_ids.extend(&c);
    want_ids.push(0);
    assert_eq!(e.ids, want_ids);
    // Prompt positions are −100; the completion and EOS are their own ids.
    let mut want_labels = vec![IGNORE_INDEX; p.len()];
    want_labels.extend(c.iter().map(|&x| i64::from(x)));
    want_labels.push(0);
    assert_eq!(e.labels, want_labels);
    assert_eq!(e.scored(), c.len() + 1);
    // An empty prompt becomes EOS, so the first completion token is still predicted.
    let e = &t.examples[1];
    assert_eq!(e.ids[0], 0);
    assert_eq!(e.labels[0], IGNORE_INDEX);
    assert_eq!(e.scored(), e.ids.len() - 1);
}

#[test]
fn truncation_drops_the_start_of_the_prompt_and_long_texts_are_windowed() {
    let tok = tiny_tokenizer();
    let enc = Encoder {
        tokenizer: &tok,
        max_len: 8,
        eos: Some(0),
    };
    let dir = tempfile::tempdir().unwrap();
    let long_prompt = "one two three four five six seven eight nine ten";
    let f = write(
        dir.path(),
        "pc.jsonl",
        format!("{{\"prompt\": \"{long_prompt}\", \"completion\": \" end\"}}\n").as_bytes(),
    );
    let (s, recs) = read_dataset(&f, None).unwrap();
    let t = enc.tokenize(&f, s.kind, &recs).unwrap();
    let e = &t.examples[0];
    let p = tok.encode(long_prompt).unwrap();
    let c = tok
        .inner()
        .encode(" end", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(e.ids.len(), 8);
    // The prompt's *last* tokens are kept, then the whole completion and EOS.
    let keep = 8 - c.len() - 1;
    assert_eq!(&e.ids[..keep], &p[p.len() - keep..]);
    assert_eq!(e.scored(), c.len() + 1);

    // A text of n tokens (+ EOS) splits into windows of 8 overlapping by one token: every
    // next-token pair is scored exactly once.
    let text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi";
    let f = write(
        dir.path(),
        "text.jsonl",
        format!("{{\"text\": \"{text}\"}}\n").as_bytes(),
    );
    let (s, recs) = read_dataset(&f, None).unwrap();
    let t = enc.tokenize(&f, s.kind, &recs).unwrap();
    let mut ids = tok.encode(text).unwrap();
    ids.push(0);
    assert!(ids.len() > 16, "{}", ids.len());
    let pairs: usize = t.examples.iter().map(|e| e.scored()).sum();
    assert_eq!(pairs, ids.len() - 1);
    assert!(t.examples.iter().all(|e| e.ids.len() <= 8));
    let mut rebuilt = t.examples[0].ids.clone();
    for e in &t.examples[1..] {
        assert_eq!(rebuilt.last(), e.ids.first(), "windows overlap by one");
        rebuilt.extend(&e.ids[1..]);
    }
    assert_eq!(rebuilt, ids);
}

#[test]
fn multiple_choice_trains_on_the_correct_choice() {
    let tok = tiny_tokenizer();
    let enc = Encoder {
        tokenizer: &tok,
        max_len: 64,
        eos: Some(0),
    };
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "mc.jsonl",
        b"{\"context\": \"Grass is\", \"choices\": [\" red\", \" green\", \" blue\"], \"label\": 1}\n",
    );
    let (s, recs) = read_dataset(&f, None).unwrap();
    let t = enc.tokenize(&f, s.kind, &recs).unwrap();
    assert_eq!(t.kind, DatasetKind::MultipleChoice);
    assert_eq!(t.choice_sets[0].choices.len(), 3);
    assert_eq!(t.choice_sets[0].label, 1);
    // Training example = context + " green", scored on " green" only, no EOS.
    assert_eq!(t.examples[0], t.choice_sets[0].choices[1]);
    let green = tok
        .inner()
        .encode(" green", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(t.examples[0].scored(), green.len());
    assert_ne!(t.examples[0].ids.last(), Some(&0));
}

#[test]
fn batches_are_right_padded_with_ignored_labels() {
    let tok = tiny_tokenizer();
    let enc = Encoder {
        tokenizer: &tok,
        max_len: 64,
        eos: Some(0),
    };
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "t.jsonl",
        b"{\"text\": \"a much longer line of text here\"}\n{\"text\": \"short\"}\n",
    );
    let (s, recs) = read_dataset(&f, None).unwrap();
    let t = enc.tokenize(&f, s.kind, &recs).unwrap();
    let exs: Vec<_> = t.examples.iter().collect();
    let b = collate(&exs, 7, &Device::Cpu).unwrap();
    let (n0, n1) = (exs[0].ids.len(), exs[1].ids.len());
    assert!(n0 > n1);
    assert_eq!(b.input_ids.dims(), &[2, n0]);
    let ids = b.input_ids.to_vec2::<u32>().unwrap();
    let labels = b.labels.to_vec2::<i64>().unwrap();
    assert_eq!(&ids[1][..n1], exs[1].ids.as_slice());
    assert!(
        ids[1][n1..].iter().all(|&x| x == 7),
        "right padding with the pad id"
    );
    assert!(labels[1][n1..].iter().all(|&x| x == IGNORE_INDEX));
    assert_eq!(b.tokens, n0 + n1);
    assert_eq!(b.scored, n0 - 1 + n1 - 1);
}

#[test]
fn chat_errors_name_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let body = concat!(
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
        "\n",
        r#"{"messages": []}"#,
        "\n",
        r#"{"messages": "hi"}"#,
        "\n",
        r#"{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "x"}], "text": "y"}"#,
        "\n",
        r#"{"prompt": "a", "completion": "b"}"#,
        "\n",
    );
    let f = write(dir.path(), "chat.jsonl", body.as_bytes());
    let got = errors(&f);
    let file = f.display().to_string();
    let want = [
        (2, "field `messages` is empty"),
        (
            3,
            "field `messages` must be an array of {\"role\", \"content\"} objects, found a string",
        ),
        (
            4,
            "messages[0].role must be \"system\", \"user\" or \"assistant\", found \"robot\"",
        ),
        (
            5,
            "messages[0].content is missing (a string); tool and function calls are not supported",
        ),
        (
            6,
            "no assistant message to train on (the loss is on assistant replies; `\"weight\": 0` \
             ones do not count)",
        ),
        (7, "messages[1].weight must be 0 or 1, found 2"),
        (
            8,
            "messages[1].role is \"tool\"; tool and function messages are not supported",
        ),
        (9, "messages[0].content must be a string, found a number"),
        (10, "fields of more than one format on one line"),
        (
            11,
            "this is a prompt/completion example ({\"prompt\", \"completion\"}) but the file's \
             first example (line 1) is a chat example ({\"messages\"})",
        ),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, (line, msg)) in got.iter().zip(want) {
        let prefix = format!("{file}:{line}: {msg}");
        assert!(g.starts_with(&prefix), "got  {g}\nwant {prefix}…");
    }
}

/// The template's tokens of one message: header (never scored) and body.
fn chat_parts(tok: &Tokenizer, role: &str, content: &str, first: bool) -> (Vec<u32>, Vec<u32>) {
    let enc = |s: &str, special: bool| tok.inner().encode(s, special).unwrap().get_ids().to_vec();
    (
        enc(&format!("<|{role}|>\n"), first),
        enc(&format!("{content}\n"), false),
    )
}

#[test]
fn chat_trains_on_assistant_replies_only() {
    let tok = tiny_tokenizer();
    let enc = Encoder {
        tokenizer: &tok,
        max_len: 256,
        eos: Some(0),
    };
    let dir = tempfile::tempdir().unwrap();
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of grass?"}, {"role": "assistant", "content": "Green.", "weight": 0}, {"role": "user", "content": "And the sky?"}, {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}, {"role": "user", "content": "Thanks"}]}"#;
    let f = write(dir.path(), "chat.jsonl", format!("{line}\n").as_bytes());
    let (s, recs) = read_dataset(&f, None).unwrap();
    assert_eq!(s.kind, DatasetKind::Chat);
    let t = enc.tokenize(&f, s.kind, &recs).unwrap();
    let e = &t.examples[0];

    let mut want_ids = Vec::new();
    let mut want_labels = Vec::new();
    let msgs = [
        ("system", "Be brief.", false),
        ("user", "Colour of grass?", false),
        ("assistant", "Green.", false),
        ("user", "And the sky?", false),
        ("assistant", "Blue.", true),
        // The last user message follows the last trained reply: dropped.
    ];
    for (i, (role, content, trained)) in msgs.iter().enumerate() {
        let (h, b) = chat_parts(&tok, role, content, i == 0);
        want_labels.extend(std::iter::repeat_n(IGNORE_INDEX, h.len()));
        want_ids.extend(h);
        if *trained {
            want_labels.extend(b.iter().map(|&x| i64::from(x)));
            want_ids.extend(b);
            want_ids.push(0);
            want_labels.push(0);
        } else {
            want_labels.extend(std::iter::repeat_n(IGNORE_INDEX, b.len()));
            want_ids.extend(b);
        }
    }
    assert_eq!(e.ids, want_ids);
    assert_eq!(e.labels, want_labels);
    let blue = chat_parts(&tok, "assistant", "Blue.", false).1;
    assert_eq!(e.scored(), blue.len() + 1);

    // Too long: the earliest tokens go first, the last reply stays whole.
    let short = Encoder {
        tokenizer: &tok,
        max_len: blue.len() + 4,
        eos: Some(0),
    };
    let t = short.tokenize(&f, s.kind, &recs).unwrap();
    let e = &t.examples[0];
    assert_eq!(e.ids.len(), blue.len() + 4);
    assert_eq!(&e.ids[..], &want_ids[want_ids.len() - e.ids.len()..]);
    assert_eq!(e.scored(), blue.len() + 1);

    // Generation prompts use the same template.
    let prompt = chat_prompt(&[ChatMessage {
        role: ChatRole::User,
        content: "And the sky?".into(),
        train: false,
    }]);
    assert_eq!(prompt, "<|user|>\nAnd the sky?\n<|assistant|>\n");
}
