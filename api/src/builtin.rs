//! Base models built into the `molt` binary: the demo models' files are embedded at build
//! time, so `molt serve` registers `demo` and `digits` however the binary was started or installed (any
//! working directory, `cargo install --path api`, the Docker image) with no model folder on
//! disk. `--models-dir` / `MOLT_MODELS_DIR` replaces them with the models of a folder.

use std::path::{Path, PathBuf};

/// One embedded model: its registered name and its files (name, bytes).
#[derive(Debug, Clone, Copy)]
pub struct BuiltinModel {
    pub name: &'static str,
    pub files: &'static [(&'static str, &'static [u8])],
}

macro_rules! model_file {
    ($dir:literal, $file:literal) => {
        (
            $file,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../models/",
                $dir,
                "/",
                $file
            )) as &[u8],
        )
    };
}

/// The models `molt serve` registers on start when no `--models-dir` is given: the demo
/// language model and the demo image classifier (a Vision Mamba).
pub const BUILTIN_MODELS: &[BuiltinModel] = &[
    BuiltinModel {
        name: "demo",
        files: &[
            model_file!("demo", "config.json"),
            model_file!("demo", "model.safetensors"),
            model_file!("demo", "tokenizer.json"),
        ],
    },
    BuiltinModel {
        name: "digits",
        files: &[
            model_file!("digits", "config.json"),
            model_file!("digits", "model.safetensors"),
        ],
    },
];

impl BuiltinModel {
    /// Writes the files into `root/<name>/` (replacing what is there) and returns that
    /// folder, ready for `registry::register_folder`.
    pub fn write_to(&self, root: &Path) -> std::io::Result<PathBuf> {
        let dir = root.join(self.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in self.files {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_models_are_the_repository_folders_byte_for_byte() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let tmp = std::env::temp_dir().join(format!("molt-builtin-{}", std::process::id()));
        for m in BUILTIN_MODELS {
            let dir = m.write_to(&tmp).expect("write");
            let mut on_disk: Vec<String> = std::fs::read_dir(repo.join(m.name))
                .expect("model folder")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            on_disk.sort();
            let mut embedded: Vec<String> = m.files.iter().map(|(n, _)| n.to_string()).collect();
            embedded.sort();
            assert_eq!(
                embedded, on_disk,
                "every file of models/{} is embedded",
                m.name
            );
            for (name, _) in m.files {
                assert_eq!(
                    std::fs::read(dir.join(name)).expect("written"),
                    std::fs::read(repo.join(m.name).join(name)).expect("repo file"),
                    "{}/{name}",
                    m.name
                );
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
