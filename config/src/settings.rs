//! The effective configuration: defaults, then the base file, then the streams file, then environment
//! and flags (clap folds `ARROWPORT_*` variables into the flags, so flag > env > file > default).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::{
    Compression, CompressionAlgorithm, Config, ConfigError, DEFAULT_CHUNK_SIZE, FlushPolicy, SchemaPolicy,
    StreamConfig, StreamsFile, TokensFile, is_valid_stream_name,
};

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

/// The tokens file at `path`. Unlike a streams file it must exist: access control that cannot read
/// its tokens refuses to start rather than run open.
pub fn load_tokens(path: &Path) -> Result<TokensFile, SettingsError> {
    TokensFile::from_yaml(&read(path)?).map_err(|error| invalid(path, error))
}

/// Every problem of the base or streams file at `path`, and of the streams and tokens files it names,
/// each with its file; empty if all are fine. A streams file parses as a base file holding only
/// `streams:`. The error is for a base file that cannot be read.
pub fn problems(path: &Path) -> Result<Vec<SettingsError>, SettingsError> {
    let config = match Config::check_yaml(&read(path)?) {
        Ok(config) => config,
        Err(errors) => return Ok(errors.into_iter().map(|error| invalid(path, error)).collect()),
    };
    let mut found = Vec::new();
    if let Some(tokens_path) = &config.auth.tokens_file {
        match read(tokens_path) {
            Ok(text) => found.extend(
                TokensFile::check_yaml(&text).err().unwrap_or_default().into_iter().map(|e| invalid(tokens_path, e)),
            ),
            Err(error) => found.push(error),
        }
    }
    let Some(streams_path) = config.streams_path else {
        return Ok(found);
    };
    found.extend(match std::fs::read_to_string(&streams_path) {
        Ok(text) => StreamsFile::check_yaml(&text)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|error| invalid(&streams_path, error))
            .collect(),
        // As when loading: a streams file not written yet means no streams.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(error) => vec![SettingsError::Read { path: streams_path, error }],
    });
    Ok(found)
}

/// Streams-file entries win over base-file entries of the same name.
fn merge_streams(base: &mut BTreeMap<String, StreamConfig>, file: BTreeMap<String, StreamConfig>) {
    for (name, stream) in file {
        if base.insert(name.clone(), stream).is_some() {
            tracing::warn!(stream = %name, "Stream defined in both the base config and the streams file; using the streams file.");
        }
    }
}

/// How one stream is loaded: its entry's settings with the defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub stream: String,
    pub table: String,
    pub chunk_size: usize,
    pub policy: SchemaPolicy,
    pub compression: Compression,
    /// When a long Flight `DoPut` commits.
    pub flush: FlushPolicy,
    /// Whether the route comes from configuration (or from auto-creation).
    pub configured: bool,
}

/// Why a stream has no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// Not a valid stream name (see [`is_valid_stream_name`]): it never names a table.
    InvalidName,
    /// Not configured, and `auto_create` is off.
    Unknown,
    /// Not configured, and auto-routing would write the table of `configured`, a configured stream
    /// (names are case-insensitive): that table takes only its own stream's writers and schema policy.
    TableOfConfigured { table: String, configured: String },
}

/// `stream`'s route: its entry in `streams`, or (with `auto_create`) a table named after it.
/// `compression` applies to streams that configure none.
pub fn route(
    streams: &BTreeMap<String, StreamConfig>,
    auto_create: bool,
    compression: Compression,
    stream: &str,
) -> Result<Route, NoRoute> {
    if !is_valid_stream_name(stream) {
        return Err(NoRoute::InvalidName);
    }
    let configured = streams.get(stream);
    if configured.is_none() && !auto_create {
        return Err(NoRoute::Unknown);
    }
    let config = configured.cloned().unwrap_or_default();
    let table = match config.target_table {
        Some(table) => table,
        // Auto-routing: the table is named after the stream, with characters SQL names lack replaced.
        None => auto_table_name(stream),
    };
    if configured.is_none() {
        let table_of = |(name, config): (&String, &StreamConfig)| {
            let taken = match &config.target_table {
                Some(theirs) => theirs.eq_ignore_ascii_case(&table),
                None => auto_table_name(name).eq_ignore_ascii_case(&table),
            };
            taken.then(|| name.clone())
        };
        if let Some(configured) = streams.iter().find_map(table_of) {
            return Err(NoRoute::TableOfConfigured { table, configured });
        }
    }
    Ok(Route {
        stream: stream.to_owned(),
        table,
        chunk_size: config.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
        policy: config.schema_policy,
        compression: config.compression.unwrap_or(compression),
        flush: config.flush.unwrap_or_default(),
        configured: configured.is_some(),
    })
}

/// `sensors.v2-eu` → `sensors_v2_eu`; a leading digit gets a `_` in front.
fn auto_table_name(stream: &str) -> String {
    let mut table: String = stream.chars().map(|c| if c == '.' || c == '-' { '_' } else { c }).collect();
    if table.starts_with(|c: char| c.is_ascii_digit()) {
        table.insert(0, '_');
    }
    table
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
        std::fs::write(&path, "port: 9000\ndb_path: file.duckdb\ncompression: {algorithm: zstd, level: 3}\n").unwrap();
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
    fn problems_cover_the_tokens_file() {
        let dir = tempfile::tempdir().unwrap();
        let (base, tokens) = (dir.path().join("config.yaml"), dir.path().join("tokens.yaml"));
        std::fs::write(&base, format!("auth: {{tokens_file: {}}}\n", tokens.display())).unwrap();
        let missing: Vec<String> = problems(&base).unwrap().iter().map(ToString::to_string).collect();
        assert!(missing.len() == 1 && missing[0].starts_with("cannot read"), "{missing:?}");
        std::fs::write(&tokens, "tokens:\n  a: {sha256: abc}\n").unwrap();
        let found: Vec<String> = problems(&base).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("tokens.a.sha256") && found[0].contains("(line 2)"), "{found:?}");
        std::fs::write(&tokens, "tokens:\n  a: {query: true}\n").unwrap();
        assert!(problems(&base).unwrap().is_empty());
        assert!(load_tokens(&tokens).unwrap().tokens["a"].query);
    }

    fn streams() -> BTreeMap<String, StreamConfig> {
        StreamsFile::from_yaml(
            "streams:\n  sensors: {target_table: sensor_readings, chunk_size: 1000, schema_policy: evolve}\n",
        )
        .unwrap()
        .streams
    }

    #[test]
    fn configured_stream_routes_to_its_table() {
        let route = route(&streams(), true, Compression::default(), "sensors").unwrap();
        assert_eq!((route.table.as_str(), route.chunk_size), ("sensor_readings", 1000));
        assert_eq!(route.policy, SchemaPolicy::Evolve);
        assert!(route.configured);
    }

    #[test]
    fn unknown_stream_is_auto_routed_or_refused() {
        let route = route(&streams(), true, Compression::default(), "9lives.v2-x").unwrap();
        assert_eq!(route.table, "_9lives_v2_x");
        assert_eq!(route.chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(!route.configured);
        assert_eq!(super::route(&streams(), false, Compression::default(), "other"), Err(NoRoute::Unknown));
    }

    #[test]
    fn an_unconfigured_stream_never_reaches_a_configured_streams_table() {
        let mut streams = streams();
        streams.insert("metrics.eu".to_owned(), StreamConfig::default());
        for (stream, configured) in
            [("sensor_readings", "sensors"), ("Sensor-Readings", "sensors"), ("metrics-eu", "metrics.eu")]
        {
            let refused = route(&streams, true, Compression::default(), stream);
            let table = auto_table_name(stream);
            assert_eq!(
                refused,
                Err(NoRoute::TableOfConfigured { table, configured: configured.to_owned() }),
                "{stream}"
            );
        }
        assert!(route(&streams, true, Compression::default(), "metrics.eu").unwrap().configured);
    }

    #[test]
    fn hostile_names_never_route() {
        let routed = route(&streams(), true, Compression::default(), "x\"; DROP TABLE t; --");
        assert_eq!(routed, Err(NoRoute::InvalidName));
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
