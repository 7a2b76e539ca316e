//! Routing: which table a stream lands in, and how.

use std::collections::BTreeMap;

use arrowport_config::{
    Compression, DEFAULT_CHUNK_SIZE, FlushPolicy, SchemaPolicy, StreamConfig, StreamsFile, is_valid_stream_name,
};

use crate::error::IngestError;
use crate::load::{TableMode, Target};

/// The routing table in force. Requests take a snapshot of it when they start.
#[derive(Debug, Clone)]
pub struct Routes {
    pub streams: BTreeMap<String, StreamConfig>,
    pub auto_create: bool,
    pub compression: Compression,
    /// Counts the routing tables put in force since start (1 is the first).
    pub generation: u64,
    hash: String,
}

/// How one stream is loaded.
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

impl Route {
    /// Where the loader puts this stream's rows.
    pub fn target(&self) -> Target {
        Target {
            table: self.table.clone(),
            chunk_size: self.chunk_size,
            policy: self.policy,
            mode: TableMode::default(),
        }
    }
}

impl Routes {
    pub fn new(streams: BTreeMap<String, StreamConfig>, auto_create: bool, compression: Compression) -> Self {
        let hash = fingerprint(&streams, auto_create, &compression);
        Self { streams, auto_create, compression, generation: 1, hash }
    }

    /// Identifies what this table routes, independent of how the files were written.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn resolve(&self, stream: &str) -> Result<Route, IngestError> {
        if !is_valid_stream_name(stream) {
            return Err(IngestError::InvalidStreamName(stream.to_owned()));
        }
        let configured = self.streams.get(stream);
        if configured.is_none() && !self.auto_create {
            return Err(IngestError::UnknownStream(stream.to_owned()));
        }
        let config = configured.cloned().unwrap_or_default();
        let table = match config.target_table {
            Some(table) => table,
            // Auto-routing: the table is named after the stream, with characters SQL names lack replaced.
            None => auto_table_name(stream),
        };
        Ok(Route {
            stream: stream.to_owned(),
            table,
            chunk_size: config.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
            policy: config.schema_policy,
            compression: config.compression.unwrap_or(self.compression),
            flush: config.flush.unwrap_or_default(),
            configured: configured.is_some(),
        })
    }
}

/// FNV-1a over the canonical YAML of what routes: stable across runs and versions.
fn fingerprint(streams: &BTreeMap<String, StreamConfig>, auto_create: bool, compression: &Compression) -> String {
    let file = StreamsFile { streams: streams.clone() };
    let canonical =
        format!("{}auto_create: {auto_create}\ncompression: {compression:?}\n", file.to_yaml().unwrap_or_default());
    let hash =
        canonical.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// `sensors.v2-eu` → `sensors_v2_eu`; a leading digit gets a `_` in front.
fn auto_table_name(stream: &str) -> String {
    let mut table: String = stream.chars().map(|c| if c == '.' || c == '-' { '_' } else { c }).collect();
    if table.starts_with(|c: char| c.is_ascii_digit()) {
        table.insert(0, '_');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(auto_create: bool) -> Routes {
        let streams = arrowport_config::StreamsFile::from_yaml(
            "streams:\n  sensors: {target_table: sensor_readings, chunk_size: 1000, schema_policy: evolve}\n",
        )
        .unwrap()
        .streams;
        Routes::new(streams, auto_create, Compression::default())
    }

    #[test]
    fn hash_follows_content_not_formatting() {
        let a = routes(true);
        let reformatted = arrowport_config::StreamsFile::from_yaml(
            "streams:\n  sensors:\n    schema_policy: evolve\n    chunk_size: 1000\n    target_table: sensor_readings\n",
        )
        .unwrap();
        assert_eq!(a.hash(), Routes::new(reformatted.streams, true, Compression::default()).hash());
        assert_ne!(a.hash(), routes(false).hash());
    }

    #[test]
    fn configured_stream_routes_to_its_table() {
        let route = routes(true).resolve("sensors").unwrap();
        assert_eq!((route.table.as_str(), route.chunk_size), ("sensor_readings", 1000));
        assert_eq!(route.policy, SchemaPolicy::Evolve);
        assert!(route.configured);
    }

    #[test]
    fn unknown_stream_is_auto_routed_or_refused() {
        let route = routes(true).resolve("9lives.v2-x").unwrap();
        assert_eq!(route.table, "_9lives_v2_x");
        assert_eq!(route.chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(matches!(routes(false).resolve("other"), Err(IngestError::UnknownStream(_))));
    }

    #[test]
    fn hostile_names_never_route() {
        assert!(matches!(routes(true).resolve("x\"; DROP TABLE t; --"), Err(IngestError::InvalidStreamName(_))));
    }
}
