//! The family seam: every model folder of every fixture set is detected as its family and
//! loads through `trainer::model::load`; Mamba-2 is refused by name.

mod common;

use std::path::Path;

use trainer::model::{AnyModel, Family, LoadOptions, detect, family::detect_dir, load};

#[test]
fn every_fixture_model_is_detected_and_loads_as_its_family() {
    for (kind, family) in [("base", Family::Mamba), ("vim_model", Family::Vim)] {
        for case in common::indexed_cases(kind) {
            let dir = case.path("model_dir");
            let found = detect_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", case.label));
            assert_eq!(found, family, "{}", case.label);
            let model = load(&dir, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", case.label));
            assert_eq!(model.family(), family, "{}", case.label);
            match model {
                AnyModel::Mamba(_) => assert_eq!(family, Family::Mamba),
                AnyModel::Vim(m) => assert_eq!(m.layers.len(), m.config.depth),
            }
        }
    }
}

#[test]
fn mamba2_configs_are_refused_naming_the_field() {
    for (text, field) in [
        (
            r#"{"model_type": "mamba2", "hidden_size": 768}"#,
            "model_type",
        ),
        (
            r#"{"d_model": 768, "n_layer": 24, "ssm_cfg": {"layer": "Mamba2"}}"#,
            "ssm_cfg.layer",
        ),
    ] {
        let value: serde_json::Value = serde_json::from_str(text).expect("json");
        let e = detect(&value, Path::new("m2/config.json"))
            .expect_err("Mamba-2 is not supported yet")
            .to_string();
        assert!(
            e.contains(field) && e.contains("not supported yet") && e.contains("m2/config.json"),
            "{e}"
        );
    }
}
