//! openapi.yaml and the router must agree: every (method, path) the router mounts is
//! documented, and every documented operation is mounted. The router records what it mounts
//! (`api::routes::mounted_routes`), so this compares the real route table with the file.

use std::collections::BTreeSet;

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete", "head", "options"];

/// `(METHOD, path)` pairs of the `paths:` section. The file keeps the usual layout: paths
/// at two spaces of indentation, operations at four.
fn documented(yaml: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut current: Option<String> = None;
    for line in yaml.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            in_paths = line.trim_end() == "paths:";
            current = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        let Some((key, _)) = line.trim().split_once(':') else {
            continue;
        };
        let key = key.trim_matches('"');
        if indent == 2 {
            assert!(key.starts_with('/'), "odd key under paths: {line}");
            current = Some(key.to_string());
        } else if indent == 4
            && METHODS.contains(&key)
            && let Some(path) = &current
        {
            out.insert((key.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn router_and_openapi_yaml_agree() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml"))
        .expect("openapi.yaml at the repository root");
    assert!(yaml.starts_with("openapi: 3."), "not an OpenAPI 3 document");
    let doc = documented(&yaml);
    let mounted: BTreeSet<(String, String)> = api::routes::mounted_routes()
        .into_iter()
        .map(|(m, p)| (m.as_str().to_string(), p.to_string()))
        .collect();
    let undocumented: Vec<_> = mounted.difference(&doc).collect();
    let unserved: Vec<_> = doc.difference(&mounted).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "openapi.yaml and the router disagree.\n  mounted but not documented: {undocumented:?}\n  documented but not mounted: {unserved:?}"
    );
    assert!(
        doc.len() >= 30,
        "suspiciously few operations parsed: {}",
        doc.len()
    );
}

#[test]
fn the_parser_sees_operations() {
    let yaml = "openapi: 3.1.0\npaths:\n  /a:\n    parameters: []\n    get:\n      x: 1\n    post: {}\n  /b/{id}:\n    delete:\n      y: 2\ncomponents:\n  schemas:\n    get:\n      z: 1\n";
    let doc = documented(yaml);
    let want: BTreeSet<(String, String)> = [("GET", "/a"), ("POST", "/a"), ("DELETE", "/b/{id}")]
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(doc, want);
}
