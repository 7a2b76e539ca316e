//! The module graph of `src/`, read from the code: dependencies run one way (transports → app → the
//! engines → store), the two transports never import each other, and there is no cycle. A `use` that
//! breaks this fails here with the offending edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Which top-level modules each module may import. Every module of `src/` must be listed.
const ALLOWED: &[(&str, &[&str])] = &[
    ("transport", &["app", "auth", "budget", "error", "ipc", "load", "malloc", "query", "routing", "telemetry"]),
    ("reload", &["app", "routing"]),
    ("app", &["auth", "budget", "error", "ipc", "load", "query", "routing", "sizing", "store", "telemetry"]),
    ("load", &["budget", "error", "journal", "store"]),
    ("journal", &["error"]),
    ("query", &["error", "journal", "store"]),
    ("telemetry", &["auth", "error", "store"]),
    ("auth", &[]),
    ("routing", &["error"]),
    ("store", &["error"]),
    ("ipc", &["error"]),
    ("budget", &["error"]),
    ("error", &[]),
    ("sizing", &[]),
    ("malloc", &[]),
];

/// `crate::name` references outside comments, by top-level module of the file they are in.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_owned()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
            continue;
        }
        let relative = path.strip_prefix(src).unwrap();
        let module = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        for line in text.lines().map(str::trim_start).filter(|line| !line.starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let name: String =
                    line[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if name != module {
                    edges.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn dependencies_run_one_way() {
    let graph = imports(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let modules: BTreeSet<&str> = graph.keys().map(String::as_str).collect();
    assert_eq!(modules, allowed.keys().copied().collect(), "every module of src/ is listed in ALLOWED");
    for (module, imported) in &graph {
        for name in imported {
            assert!(allowed[module.as_str()].contains(&name.as_str()), "{module} must not import crate::{name}");
        }
    }
}

#[test]
fn the_allowed_graph_has_no_cycle() {
    // Peel off modules that import nothing left; whatever remains is a cycle.
    let mut left: BTreeMap<&str, BTreeSet<&str>> =
        ALLOWED.iter().map(|(module, imports)| (*module, imports.iter().copied().collect())).collect();
    while let Some(leaf) = left.iter().find(|(_, imports)| imports.is_empty()).map(|(module, _)| *module) {
        left.remove(leaf);
        left.values_mut().for_each(|imports| {
            imports.remove(leaf);
        });
    }
    assert!(left.is_empty(), "a cycle among {:?}", left.keys());
}

#[test]
fn the_transports_never_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
    for (transport, other) in [("http", "flight"), ("flight", "http")] {
        let mut files = vec![src.join(transport)];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines().map(str::trim_start).filter(|line| !line.starts_with("//")) {
                for pattern in [format!("super::{other}"), format!("transport::{other}")] {
                    assert!(!line.contains(&pattern), "{}: {line}", path.display());
                }
            }
        }
    }
}
