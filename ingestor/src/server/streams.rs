//! `GET /streams`: what is routed where, and what each stream has ingested since start.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrowport_config::{Compression, SchemaPolicy};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::AppState;

/// Totals of one stream's committed requests since the server started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Table of the last commit (reported as the stream's table once no route names one).
    #[serde(skip)]
    pub table: String,
    pub requests: u64,
    pub rows: u64,
    pub batches: u64,
    pub bytes_received: u64,
    pub bytes_decoded: u64,
    /// Time of the last commit, RFC 3339.
    pub last_write: Option<String>,
}

/// The `GET /streams` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamsReport {
    /// Generation of the routing configuration in force (1 at start, +1 per applied reload).
    pub generation: u64,
    /// Fingerprint of the routing configuration in force.
    pub hash: String,
    pub auto_create: bool,
    /// Default compression Arrowport uses for Arrow data it sends.
    pub compression: Compression,
    pub streams: Vec<StreamReport>,
}

/// One configured or auto-created stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    pub stream: String,
    pub table: String,
    /// Configured (or auto-created on first write).
    pub configured: bool,
    /// Whether new requests to the stream are accepted under the configuration in force.
    pub routable: bool,
    pub schema_policy: SchemaPolicy,
    pub chunk_size: Option<usize>,
    pub compression: Compression,
    #[serde(flatten)]
    pub stats: StreamStats,
    /// Decoded bytes per wire byte; `None` before the first write.
    pub compression_ratio: Option<f64>,
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<StreamsReport> {
    Json(report(&state))
}

pub fn report(state: &AppState) -> StreamsReport {
    let routes = state.routes();
    let stats = state.stream_stats();
    let mut names: Vec<&String> = routes.streams.keys().chain(stats.keys()).collect();
    names.sort();
    names.dedup();
    let streams = names
        .into_iter()
        .map(|name| {
            let stats = stats.get(name).cloned().unwrap_or_default();
            let compression_ratio =
                (stats.bytes_received > 0).then(|| stats.bytes_decoded as f64 / stats.bytes_received as f64);
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

/// Adds one committed request to `stats`.
pub fn add_commit(stats: &mut BTreeMap<String, StreamStats>, stream: &str, report: &super::IngestReport) {
    let entry = stats.entry(stream.to_owned()).or_default();
    entry.table.clone_from(&report.table);
    entry.requests += 1;
    entry.rows += report.rows;
    entry.batches += report.batches;
    entry.bytes_received += report.bytes_received;
    entry.bytes_decoded += report.bytes_decoded;
    entry.last_write = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
}
