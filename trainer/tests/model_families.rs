//! The family seam: every model folder of every fixture set is detected as its family and
//! loads through `trainer::model::load`; an unknown family is refused by name.

mod common;

use std::path::Path;

use trainer::model::{AnyModel, Family, LoadOptions, detect, family::detect_dir, load};

#[test]
fn every_fixture_model_is_detected_and_loads_as_its_family() {
    for (kind, family) in [
        ("base", Family::Mamba),
        ("vim_model", Family::Vim),
        ("base", Family::Mamba2),
    ] {
        for case in common::indexed_cases(family, kind) {
            let dirs = ["model_dir", "original_model_dir"]
                .into_iter()
                .filter(|k| case.entry.get(*k).is_some())
                .map(|k| case.path(k));
            for dir in dirs {
                let label = format!("{}: {}", case.label, dir.display());
                let found = detect_dir(&dir).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(found, family, "{label}");
                let model =
                    load(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(model.family(), family, "{label}");
                match model {
                    AnyModel::Mamba(m) => {
                        assert_eq!(m.backbone.layers.len(), m.config().num_hidden_layers)
                    }
                    AnyModel::Mamba2(m) => {
                        assert_eq!(m.backbone.layers.len(), m.config().num_hidden_layers)
                    }
                    AnyModel::Vim(m) => assert_eq!(m.layers.len(), m.config.depth),
                }
            }
        }
    }
}

#[test]
fn unknown_layers_and_model_types_are_refused_naming_the_field() {
    for (text, field) in [
        (
            r#"{"model_type": "mamba3", "hidden_size": 768}"#,
            "model_type",
        ),
        (
            r#"{"d_model": 768, "n_layer": 24, "ssm_cfg": {"layer": "Mamba3"}}"#,
            "ssm_cfg.layer",
        ),
    ] {
        let value: serde_json::Value = serde_json::from_str(text).expect("json");
        let e = detect(&value, Path::new("m3/config.json"))
            .expect_err("unknown family")
            .to_string();
        assert!(
            e.contains(field) && e.contains("amba3") && e.contains("m3/config.json"),
            "{e}"
        );
    }
}
