//! What is routed where, and what each stream has ingested since start (`GET /streams`, `ListFlights`).

use arrowport_api::{StreamReport, StreamsReport};
use arrowport_config::SchemaPolicy;

use super::App;

impl App {
    /// Every configured stream and every stream written since start, by name.
    pub fn streams_report(&self) -> StreamsReport {
        let routes = self.routes();
        let stats = self.telemetry.stream_stats();
        let mut names: Vec<&String> = routes.streams.keys().chain(stats.keys()).collect();
        names.sort();
        names.dedup();
        let streams = names
            .into_iter()
            .map(|name| {
                let stats = stats.get(name).cloned().unwrap_or_default();
                let compression_ratio = stats.compression_ratio();
                match routes.resolve(name) {
                    Ok(route) => StreamReport {
                        stream: route.stream,
                        table: route.table,
                        configured: route.configured,
                        routable: true,
                        schema_policy: route.policy,
                        chunk_size: Some(route.chunk_size),
                        compression: route.compression,
                        stats,
                        compression_ratio,
                    },
                    // Wrote data earlier, but the configuration in force no longer routes it.
                    Err(_) => StreamReport {
                        stream: name.clone(),
                        table: stats.table.clone(),
                        configured: false,
                        routable: false,
                        schema_policy: SchemaPolicy::default(),
                        chunk_size: None,
                        compression: routes.compression,
                        stats,
                        compression_ratio,
                    },
                }
            })
            .collect();
        StreamsReport {
            generation: routes.generation,
            hash: routes.hash().to_owned(),
            auto_create: routes.auto_create,
            compression: routes.compression,
            streams,
        }
    }
}
