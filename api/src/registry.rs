//! Base models: registering a model folder (local, or under an object-store URL) and
//! materialising a registered model on a worker's disk.
//!
//! A model folder holds `config.json` (either Mamba naming), weights (`*.safetensors`, or
//! `pytorch_model.bin`) and `tokenizer.json`. The recorded `location` is one of
//!
//! - `store:<prefix>` — copied into molt's own blob store (the default for a local folder),
//!   so that every worker, on any machine, can fetch it;
//! - `s3://bucket/prefix` — left where it is; workers read it with the usual `AWS_*`
//!   environment;
//! - an absolute local path — registered in place (`copy: false`); every worker must see
//!   the same path.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use storage::{BaseModel, BlobStore, Db, NewBaseModel};

/// Prefix of locations inside molt's blob store.
pub const STORE_SCHEME: &str = "store:";

/// Why a model could not be registered or fetched.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid model: {0}")]
    Invalid(String),
    /// The source folder does not exist.
    #[error("{0} does not exist on the server")]
    SourceNotFound(String),
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        RegistryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A model name users can type: 1–128 of `[A-Za-z0-9._-]`, not starting with `ft:`.
pub fn check_model_id(id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "model id '{id}' must be 1 to 128 characters of [A-Za-z0-9._-]"
        )))
    }
}

/// Parses and checks `config.json`; returns (parsed JSON, hex SHA-256 of the bytes, the
/// embedding rows of a language model — `None` for a model that reads no text, hence needs no
/// tokenizer).
fn check_config(
    bytes: &[u8],
    origin: &str,
) -> Result<(Value, String, Option<usize>), RegistryError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| RegistryError::Invalid(format!("{origin}/config.json is not UTF-8")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RegistryError::Invalid(format!("{origin}/config.json: {e}")))?;
    let checked = trainer::model::check_config(&value, Path::new(origin))
        .map_err(|e| RegistryError::Invalid(format!("{origin}/config.json: {e}")))?;
    Ok((
        value,
        hex::encode(Sha256::digest(bytes)),
        checked.vocab_size,
    ))
}

/// Refuses a language model whose tokenizer produces ids its embedding has no row for: every
/// request or dataset using those tokens would fail later, far from the cause.
fn check_tokenizer(bytes: &[u8], origin: &str, vocab: usize) -> Result<(), RegistryError> {
    let path = Path::new(origin).join("tokenizer.json");
    let tok = trainer::tokenizer::Tokenizer::from_bytes(bytes, &path)
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let bound = tok.id_bound();
    if bound > vocab {
        return Err(RegistryError::Invalid(format!(
            "{origin}/tokenizer.json produces token ids up to {}, but config.json gives the \
             model {vocab} embedding rows: every token id must be below the vocabulary size \
             (a tokenizer of another model?)",
            bound - 1
        )));
    }
    Ok(())
}

/// Checks that the file names include weights and, for a language model, a tokenizer.
fn check_files(names: &[String], origin: &str, text_model: bool) -> Result<(), RegistryError> {
    let weights = names
        .iter()
        .any(|n| n.ends_with(".safetensors") || n == "pytorch_model.bin");
    if !weights {
        return Err(RegistryError::Invalid(format!(
            "{origin} has no weights (*.safetensors or pytorch_model.bin)"
        )));
    }
    if text_model && !names.iter().any(|n| n == "tokenizer.json") {
        return Err(RegistryError::Invalid(format!(
            "{origin} has no tokenizer.json (training needs it to tokenize datasets)"
        )));
    }
    Ok(())
}

/// Registers a local model folder: checks it, copies it into the blob store under
/// `models/<id>/<hash>` (unless `copy` is false) and records it.
pub async fn register_folder(
    db: &Db,
    blobs: &BlobStore,
    id: &str,
    dir: &Path,
    copy: bool,
) -> Result<BaseModel, RegistryError> {
    check_model_id(id)?;
    let dir = std::fs::canonicalize(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RegistryError::SourceNotFound(dir.display().to_string()),
        _ => RegistryError::io(dir, e),
    })?;
    let origin = dir.display().to_string();
    let config_path = dir.join("config.json");
    let bytes = std::fs::read(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => {
            RegistryError::Invalid(format!("{origin} is not a folder with a config.json"))
        }
        _ => RegistryError::io(&config_path, e),
    })?;
    let (config, hash, vocab) = check_config(&bytes, &origin)?;
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| RegistryError::io(&dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    check_files(&names, &origin, vocab.is_some())?;
    if let Some(vocab) = vocab {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| RegistryError::io(&path, e))?;
        check_tokenizer(&bytes, &origin, vocab)?;
    }
    // Fail on a duplicate before copying anything.
    match db.get_base_model(id).await {
        Ok(_) => {
            return Err(storage::Error::Conflict(format!(
                "a base model named '{id}' already exists"
            ))
            .into());
        }
        Err(storage::Error::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let location = if copy {
        let prefix = format!("models/{id}/{}", &hash[..12]);
        for name in &names {
            blobs
                .upload_file(&dir.join(name), &format!("{prefix}/{name}"))
                .await?;
        }
        format!("{STORE_SCHEME}{prefix}")
    } else {
        origin
    };
    let model = db
        .register_base_model(NewBaseModel {
            id: id.to_string(),
            location,
            config_hash: hash,
            config,
        })
        .await?;
    Ok(model)
}

/// Registers a model that stays under an object-store URL (`s3://bucket/prefix`).
pub async fn register_url(db: &Db, id: &str, url: &str) -> Result<BaseModel, RegistryError> {
    check_model_id(id)?;
    let store = BlobStore::from_url(url.trim_end_matches('/'))?;
    let bytes = store.get("config.json").await.map_err(|e| match e {
        storage::Error::NotFound { .. } => {
            RegistryError::Invalid(format!("{url} has no config.json"))
        }
        other => other.into(),
    })?;
    let (config, hash, vocab) = check_config(&bytes, url)?;
    let names: Vec<String> = store.list("").await?.into_iter().map(|m| m.key).collect();
    check_files(&names, url, vocab.is_some())?;
    if let Some(vocab) = vocab {
        check_tokenizer(&store.get("tokenizer.json").await?, url, vocab)?;
    }
    Ok(db
        .register_base_model(NewBaseModel {
            id: id.to_string(),
            location: url.trim_end_matches('/').to_string(),
            config_hash: hash,
            config,
        })
        .await?)
}

/// Registers from a `source` that is a URL (`s3://…`) or a local folder.
pub async fn register(
    db: &Db,
    blobs: &BlobStore,
    id: &str,
    source: &str,
    copy: bool,
) -> Result<BaseModel, RegistryError> {
    if source.starts_with("s3://") {
        register_url(db, id, source).await
    } else {
        let path = source.strip_prefix("file://").unwrap_or(source);
        register_folder(db, blobs, id, Path::new(path), copy).await
    }
}

/// Removes a registered model; files copied into the store are deleted too.
pub async fn unregister(db: &Db, blobs: &BlobStore, id: &str) -> Result<BaseModel, RegistryError> {
    let model = db.delete_base_model(id).await?;
    if let Some(prefix) = model.location.strip_prefix(STORE_SCHEME)
        && let Err(e) = blobs.delete_prefix(prefix).await
    {
        tracing::warn!(model = id, error = %e, "model unregistered but its files remain");
    }
    Ok(model)
}

/// Makes a registered model available as a local folder under `cache_dir` (downloaded once
/// per config hash; a local in-place model is used where it is).
pub async fn materialize(
    model: &BaseModel,
    blobs: &BlobStore,
    cache_dir: &Path,
) -> Result<PathBuf, RegistryError> {
    let (store, prefix): (BlobStore, String) =
        if let Some(prefix) = model.location.strip_prefix(STORE_SCHEME) {
            (blobs.clone(), prefix.to_string())
        } else if model.location.starts_with("s3://") {
            (BlobStore::from_url(&model.location)?, String::new())
        } else {
            let p = PathBuf::from(&model.location);
            if !p.join("config.json").is_file() {
                return Err(RegistryError::Invalid(format!(
                    "model '{}' is registered at {} but that folder has no config.json here",
                    model.id, model.location
                )));
            }
            return Ok(p);
        };
    let hash = model.config_hash.get(..12).unwrap_or(&model.config_hash);
    let dest = cache_dir
        .join("models")
        .join(format!("{}-{hash}", model.id));
    let marker = dest.join(".complete");
    if marker.is_file() {
        return Ok(dest);
    }
    let tmp = cache_dir
        .join("models")
        .join(format!(".{}-{hash}.{}", model.id, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    store.download_dir(&prefix, &tmp).await?;
    std::fs::write(tmp.join(".complete"), b"").map_err(|e| RegistryError::io(&tmp, e))?;
    match std::fs::rename(&tmp, &dest) {
        Ok(()) => {}
        // Another worker on this machine finished first.
        Err(_) if marker.is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(RegistryError::io(&dest, e)),
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_checked() {
        assert!(check_model_id("mamba-130m").is_ok());
        assert!(check_model_id("ft:x").is_err());
        assert!(check_model_id("").is_err());
        assert!(check_model_id("a/b").is_err());
    }

    #[test]
    fn folders_need_weights_and_tokenizer() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            check_files(
                &names(&["config.json", "model.safetensors", "tokenizer.json"]),
                "x",
                true
            )
            .is_ok()
        );
        assert!(check_files(&names(&["config.json", "tokenizer.json"]), "x", true).is_err());
        assert!(check_files(&names(&["config.json", "model.safetensors"]), "x", true).is_err());
        // An image model reads no text.
        assert!(check_files(&names(&["config.json", "model.safetensors"]), "x", false).is_ok());
    }
}
