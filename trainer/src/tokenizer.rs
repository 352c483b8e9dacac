//! `tokenizer.json` through the `tokenizers` crate, with errors that name the file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A loaded Hugging Face tokenizer.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::wrap(tokenizers::Tokenizer::from_file(path), path)
    }

    /// A `tokenizer.json` read elsewhere (an object store); `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        Self::wrap(tokenizers::Tokenizer::from_bytes(bytes), path)
    }

    fn wrap(parsed: tokenizers::Result<tokenizers::Tokenizer>, path: &Path) -> Result<Self> {
        let inner = parsed.map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// One past the largest token id the tokenizer can produce (added tokens included): the
    /// embedding rows a model needs to read every tokenized text.
    pub fn id_bound(&self) -> usize {
        let max = self.inner.get_vocab(true).into_values().max();
        max.map_or(0, |m| m as usize + 1)
    }

    /// `tokenizer.json` in a model folder, if there is one.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join("tokenizer.json");
        if p.is_file() {
            Self::from_file(&p).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Ids of `text`, with the tokenizer's own special-token template (as `tokenizer.encode`
    /// does in Python with its defaults).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token strings of `text` (byte-level BPE shows spaces as `Ġ`).
    pub fn tokens(&self, text: &str) -> Result<Vec<String>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        Ok(enc.get_tokens().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }
}
