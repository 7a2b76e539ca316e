//! The README's configuration reference is tested against the types: every key the config accepts has
//! a row, every row names a real key, and each scalar default is the one `Config::default()` has.

use std::collections::BTreeMap;

use arrowport_config::{Compression, Config, FlushPolicy, SchemaPolicy, StreamConfig};
use serde_json::Value;

/// The repository's README, found at run time: a test binary reused from another checkout's build cache
/// must read this checkout's README, not the path it was compiled in.
fn readme_path() -> std::path::PathBuf {
    std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test")).join("../README.md")
}

/// `key → default` from the README's table rows of the form ``| `key` | default | meaning |``.
fn readme_rows() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let section = readme.split("## Configuration").nth(1).expect("a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((key.to_owned(), cells.get(2)?.trim_matches('`').to_owned()))
        })
        .filter(|(key, _)| !key.starts_with("--"))
        .collect()
}

/// Every key of `value`, dotted, with its value. Sections (`limits`) are walked into; `compression` and
/// the `streams` map are documented as a whole.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match child {
                Value::Object(_) if path != "compression" && path != "streams" => flatten(&path, child, out),
                _ => {
                    out.insert(path, child.clone());
                }
            }
        }
    }
}

fn config_keys() -> BTreeMap<String, Value> {
    let mut keys = BTreeMap::new();
    flatten("", &serde_json::to_value(Config::default()).unwrap(), &mut keys);
    // Every stream field, from a stream that sets them all (defaults are skipped when serialising).
    let full = StreamConfig {
        target_table: Some("t".into()),
        chunk_size: Some(1),
        compression: Some(Compression::default()),
        schema_policy: SchemaPolicy::Evolve,
        flush: Some(FlushPolicy::default()),
        writers: vec!["w".into()],
    };
    if let Value::Object(fields) = serde_json::to_value(full).unwrap() {
        for field in fields.keys() {
            keys.insert(format!("streams.<name>.{field}"), Value::Null);
        }
    }
    for (field, value) in flatten_of(serde_json::to_value(FlushPolicy::default()).unwrap()) {
        keys.insert(format!("streams.<name>.flush.{field}"), value);
    }
    keys.remove("streams.<name>.flush");
    // The DuckLake storage kind's fields, its defaults from parsing the required ones alone.
    let lake: arrowport_config::StorageConfig =
        serde_saphyr::from_str("kind: ducklake\ncatalog: c\ndata_path: d\n").unwrap();
    for (field, value) in flatten_of(serde_json::to_value(lake).unwrap()) {
        let required = field == "catalog" || field == "data_path";
        if field != "kind" {
            keys.insert(format!("storage.{field}"), if required { Value::Null } else { value });
        }
    }
    // TLS is off by default (`tls: none`); its fields are all required once it is on.
    for field in ["cert", "key", "client_ca"] {
        keys.insert(format!("tls.{field}"), Value::Null);
    }
    keys
}

fn flatten_of(value: Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    flatten("", &value, &mut out);
    out
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let documented = readme_rows();
    let keys = config_keys();
    let undocumented: Vec<_> = keys.keys().filter(|k| !documented.contains_key(*k)).collect();
    let unknown: Vec<_> = documented.keys().filter(|k| !keys.contains_key(*k)).collect();
    assert!(undocumented.is_empty(), "keys missing from the README's configuration table: {undocumented:?}");
    assert!(unknown.is_empty(), "README rows that are not config keys: {unknown:?}");
}

#[test]
fn documented_defaults_are_the_real_ones() {
    let documented = readme_rows();
    for (key, value) in config_keys() {
        let expected = match &value {
            Value::String(text) => text.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(items) if items.is_empty() => "[]".to_owned(),
            Value::Null if !["streams.", "storage.", "tls."].iter().any(|p| key.starts_with(p)) => "none".to_owned(),
            _ => continue,
        };
        assert_eq!(documented[&key], expected, "README default of `{key}`");
    }
}
