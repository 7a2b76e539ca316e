//! Routing: which table a stream lands in, and how.

use std::collections::BTreeMap;

use arrowport_config::{
    Compression, DEFAULT_CHUNK_SIZE, SchemaPolicy, StreamConfig, is_valid_stream_name,
};

use crate::error::IngestError;

/// The routing table in force. Requests take a snapshot of it when they start.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub streams: BTreeMap<String, StreamConfig>,
    pub auto_create: bool,
    pub compression: Compression,
}

/// How one stream is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub stream: String,
    pub table: String,
    pub chunk_size: usize,
    pub policy: SchemaPolicy,
    pub compression: Compression,
    /// Whether the route comes from configuration (or from auto-creation).
    pub configured: bool,
}

impl Routes {
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
            configured: configured.is_some(),
        })
    }
}

/// `sensors.v2-eu` → `sensors_v2_eu`; a leading digit gets a `_` in front.
fn auto_table_name(stream: &str) -> String {
    let mut table: String = stream
        .chars()
        .map(|c| if c == '.' || c == '-' { '_' } else { c })
        .collect();
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
        Routes {
            streams,
            auto_create,
            compression: Compression::default(),
        }
    }

    #[test]
    fn configured_stream_routes_to_its_table() {
        let route = routes(true).resolve("sensors").unwrap();
        assert_eq!(
            (route.table.as_str(), route.chunk_size),
            ("sensor_readings", 1000)
        );
        assert_eq!(route.policy, SchemaPolicy::Evolve);
        assert!(route.configured);
    }

    #[test]
    fn unknown_stream_is_auto_routed_or_refused() {
        let route = routes(true).resolve("9lives.v2-x").unwrap();
        assert_eq!(route.table, "_9lives_v2_x");
        assert_eq!(route.chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(matches!(
            routes(false).resolve("other"),
            Err(IngestError::UnknownStream(_))
        ));
    }

    #[test]
    fn hostile_names_never_route() {
        assert!(matches!(
            routes(true).resolve("x\"; DROP TABLE t; --"),
            Err(IngestError::InvalidStreamName(_))
        ));
    }
}
