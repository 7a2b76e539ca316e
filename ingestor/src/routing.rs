//! Routing: which table a stream lands in, and how.

use std::collections::BTreeMap;

use arrowport_config::settings::{self, NoRoute};
use arrowport_config::{Compression, Config, StreamConfig, StreamsFile};

use crate::error::IngestError;
pub use settings::Route;

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

impl Routes {
    pub fn new(streams: BTreeMap<String, StreamConfig>, auto_create: bool, compression: Compression) -> Self {
        let hash = fingerprint(&streams, auto_create, &compression);
        Self { streams, auto_create, compression, generation: 1, hash }
    }

    /// The routes `config` defines (its streams, with the streams file merged in).
    pub fn from_config(config: &Config) -> Self {
        Self::new(config.streams.clone(), config.auto_create, config.compression)
    }

    /// Identifies what this table routes, independent of how the files were written.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// How `stream` is loaded (see [`settings::route`]).
    pub fn resolve(&self, stream: &str) -> Result<Route, IngestError> {
        settings::route(&self.streams, self.auto_create, self.compression, stream).map_err(|no_route| match no_route {
            NoRoute::InvalidName => IngestError::InvalidStreamName(stream.to_owned()),
            NoRoute::Unknown => IngestError::UnknownStream(stream.to_owned()),
            NoRoute::TableOfConfigured { table, configured } => IngestError::PermissionDenied(format!(
                "stream {stream:?} is not configured, and its table {table} belongs to the configured stream \
                 {configured:?}: send to that stream"
            )),
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
    fn streams_without_a_route_get_their_errors() {
        assert!(matches!(routes(false).resolve("other"), Err(IngestError::UnknownStream(_))));
    }

    #[test]
    fn hostile_names_never_route() {
        assert!(matches!(routes(true).resolve("x\"; DROP TABLE t; --"), Err(IngestError::InvalidStreamName(_))));
    }
}
