//! The effective configuration: defaults, then the base file, then the streams file, then environment
//! and flags (clap folds `ARROWPORT_*` variables into the flags, so flag > env > file > default).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use arrowport_config::{CompressionAlgorithm, Config, ConfigError, StreamConfig, StreamsFile};

use crate::routing::Routes;

/// Values given on the command line or in the environment; each replaces the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub db_path: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub flight_port: Option<u16>,
    pub streams_path: Option<PathBuf>,
    pub compression: Option<CompressionAlgorithm>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    // The inner errors are part of the message (not `source`s), so each problem prints once.
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{}: {error}", path.display())]
    Invalid { path: PathBuf, error: ConfigError },
}

/// Reads the base file (if any), applies `overrides`, and merges the streams file.
pub fn load(config_path: Option<&Path>, overrides: &Overrides) -> Result<Config, SettingsError> {
    let mut config = match config_path {
        Some(path) => Config::from_yaml(&read(path)?).map_err(|error| invalid(path, error))?,
        None => Config::default(),
    };
    apply(&mut config, overrides);
    if let Some(path) = config.streams_path.clone() {
        merge_streams(&mut config.streams, load_streams(&path)?);
    }
    Ok(config)
}

fn apply(config: &mut Config, overrides: &Overrides) {
    let o = overrides.clone();
    if let Some(db_path) = o.db_path {
        config.db_path = db_path;
    }
    if let Some(host) = o.host {
        config.host = host;
    }
    if let Some(port) = o.port {
        config.port = port;
    }
    if let Some(port) = o.flight_port {
        config.flight_port = Some(port);
    }
    if o.streams_path.is_some() {
        config.streams_path = o.streams_path;
    }
    if let Some(algorithm) = o.compression {
        config.compression.algorithm = algorithm;
        if algorithm != CompressionAlgorithm::Zstd {
            config.compression.level = None;
        }
    }
}

/// The streams file's map. A missing file is no streams: in Kubernetes the operator may not have
/// written it yet, and the ingester starts anyway.
pub fn load_streams(path: &Path) -> Result<BTreeMap<String, StreamConfig>, SettingsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(StreamsFile::from_yaml(&text).map_err(|error| invalid(path, error))?.streams),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(error) => Err(SettingsError::Read { path: path.to_owned(), error }),
    }
}

/// Every problem of the base or streams file at `path`, and of the streams file it names, each with
/// its file; empty if both are fine. A streams file parses as a base file holding only `streams:`.
/// The error is for a base file that cannot be read.
pub fn problems(path: &Path) -> Result<Vec<SettingsError>, SettingsError> {
    let config = match Config::check_yaml(&read(path)?) {
        Ok(config) => config,
        Err(errors) => return Ok(errors.into_iter().map(|error| invalid(path, error)).collect()),
    };
    let Some(streams_path) = config.streams_path else {
        return Ok(Vec::new());
    };
    Ok(match std::fs::read_to_string(&streams_path) {
        Ok(text) => StreamsFile::check_yaml(&text)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|error| invalid(&streams_path, error))
            .collect(),
        // As when loading: a streams file not written yet means no streams.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(error) => vec![SettingsError::Read { path: streams_path, error }],
    })
}

/// Streams-file entries win over base-file entries of the same name.
fn merge_streams(base: &mut BTreeMap<String, StreamConfig>, file: BTreeMap<String, StreamConfig>) {
    for (name, stream) in file {
        if base.insert(name.clone(), stream).is_some() {
            tracing::warn!(stream = %name, "Stream defined in both the base config and the streams file; using the streams file.");
        }
    }
}

/// The routing table a configuration describes.
pub fn routes(config: &Config) -> Routes {
    Routes::new(config.streams.clone(), config.auto_create, config.compression)
}

fn read(path: &Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|error| SettingsError::Read { path: path.to_owned(), error })
}

fn invalid(path: &Path, error: ConfigError) -> SettingsError {
    SettingsError::Invalid { path: path.to_owned(), error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_override_then_file_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "port: 9000\ndb_path: file.duckdb\ncompression: {algorithm: zstd, level: 5}\n").unwrap();
        let from_file = load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!((from_file.port, from_file.host.as_str()), (9000, "0.0.0.0"));
        let overridden = load(
            Some(&path),
            &Overrides {
                port: Some(9100),
                db_path: Some("flag.duckdb".into()),
                compression: Some(CompressionAlgorithm::Lz4),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(overridden.port, 9100);
        assert_eq!(overridden.db_path, PathBuf::from("flag.duckdb"));
        assert_eq!(overridden.compression.algorithm, CompressionAlgorithm::Lz4);
        assert_eq!(overridden.compression.level, None);
    }

    #[test]
    fn streams_file_merges_and_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        let streams = dir.path().join("streams.yaml");
        let base = dir.path().join("config.yaml");
        std::fs::write(
            &base,
            format!("streams_path: {}\nstreams:\n  a: {{target_table: from_base}}\n", streams.display()),
        )
        .unwrap();
        let config = load(Some(&base), &Overrides::default()).unwrap();
        assert_eq!(config.streams["a"].target_table.as_deref(), Some("from_base"));
        std::fs::write(&streams, "streams:\n  a: {target_table: from_file}\n  b: {}\n").unwrap();
        let config = load(Some(&base), &Overrides::default()).unwrap();
        assert_eq!(config.streams["a"].target_table.as_deref(), Some("from_file"));
        assert!(config.streams.contains_key("b"));
    }

    #[test]
    fn problems_cover_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (base, streams) = (dir.path().join("config.yaml"), dir.path().join("streams.yaml"));
        std::fs::write(&base, "").unwrap();
        assert!(problems(&base).unwrap().is_empty(), "an empty file is the default config");
        std::fs::write(&base, format!("streams_path: {}\nlimits: {{max_concurrent_loads: 0}}\n", streams.display()))
            .unwrap();
        assert_eq!(problems(&base).unwrap().len(), 1, "the base file's problem; the streams file is not there yet");
        std::fs::write(&base, format!("streams_path: {}\n", streams.display())).unwrap();
        std::fs::write(&streams, "streams:\n  a: {chunk_size: 0}\n  b: {target_table: '1'}\n").unwrap();
        let found: Vec<String> = problems(&base).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|problem| problem.starts_with(&streams.display().to_string())), "{found:?}");
        assert!(matches!(problems(&dir.path().join("missing.yaml")), Err(SettingsError::Read { .. })));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "prot: 1\n").unwrap();
        let message = load(Some(&path), &Overrides::default()).unwrap_err().to_string();
        assert!(message.contains("bad.yaml") && message.contains("prot"), "{message}");
    }
}
