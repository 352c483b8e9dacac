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

/// What one operation documents: its id, statuses, link targets and whether it is public.
#[derive(Debug, Default)]
struct Operation {
    id: Option<String>,
    statuses: BTreeSet<String>,
    link_targets: Vec<String>,
    public: bool,
}

/// Every operation of the `paths:` section, by `(METHOD, path)` (same layout as above:
/// operation keys at four spaces, their fields at six, statuses at eight, links deeper).
fn operations(yaml: &str) -> std::collections::BTreeMap<(String, String), Operation> {
    let mut out = std::collections::BTreeMap::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    let mut current: Option<(String, String)> = None;
    let mut in_responses = false;
    for line in yaml.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if indent == 0 {
            in_paths = text == "paths:";
            current = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        let key = text.split_once(':').map(|(k, _)| k.trim_matches('"'));
        match indent {
            2 => {
                path = key.map(str::to_string);
                current = None;
            }
            4 => {
                current = match (key, &path) {
                    (Some(k), Some(p)) if METHODS.contains(&k) => {
                        let op = (k.to_uppercase(), p.clone());
                        out.insert(op.clone(), Operation::default());
                        Some(op)
                    }
                    _ => None,
                };
                in_responses = false;
            }
            _ => {
                let Some(op) = current.as_ref().and_then(|c| out.get_mut(c)) else {
                    continue;
                };
                if indent == 6 {
                    in_responses = key == Some("responses");
                    if let Some(id) = text.strip_prefix("operationId:") {
                        op.id = Some(id.trim().to_string());
                    }
                    if text == "security: []" {
                        op.public = true;
                    }
                } else if indent == 8 && in_responses {
                    if let Some(k) =
                        key.filter(|k| k.len() == 3 && k.chars().all(|c| c.is_ascii_digit()))
                    {
                        op.statuses.insert(k.to_string());
                    }
                } else if let Some(target) = text.strip_prefix("operationId:") {
                    op.link_targets.push(target.trim().to_string());
                }
            }
        }
    }
    out
}

/// Every operation has a unique `operationId`, every link names one, and every operation
/// documents the statuses every route of its kind can answer.
#[test]
fn operations_document_their_statuses_and_links() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml"))
        .expect("openapi.yaml at the repository root");
    let ops = operations(&yaml);
    assert!(
        ops.len() >= 30,
        "suspiciously few operations: {}",
        ops.len()
    );
    let mut ids = BTreeSet::new();
    for ((method, path), op) in &ops {
        let id = op
            .id
            .clone()
            .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
        assert!(ids.insert(id.clone()), "operationId {id} is used twice");
    }
    let mut links = 0;
    for ((method, path), op) in &ops {
        for target in &op.link_targets {
            links += 1;
            assert!(
                ids.contains(target),
                "{method} {path} links to an unknown operation {target}"
            );
        }
        let mut wanted: Vec<&str> = Vec::new();
        if !op.public {
            wanted.extend(["401", "500", "504"]);
        }
        if path.starts_with("/v1/") {
            wanted.push("429");
        }
        if path.contains('{') {
            wanted.extend(["400", "404"]);
        }
        for status in wanted {
            assert!(
                op.statuses.contains(status),
                "{method} {path} does not document {status}: {:?}",
                op.statuses
            );
        }
    }
    assert!(links >= 40, "suspiciously few links: {links}");
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
