//! Prometheus metrics. Labels are fixed and low-cardinality: `stream`, `protocol`, `outcome`.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How data arrived.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// Arrow Flight `DoPut` with a stream path.
    Flight,
    /// Flight SQL bulk ingest (`CommandStatementIngest`).
    FlightSql,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Flight => "flight",
            Self::FlightSql => "flightsql",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub stream: String,
    pub protocol: Protocol,
    /// `ok` or the error code of the JSON error body.
    pub outcome: String,
}

type LatencyFamily = Family<StreamLabels, Histogram, fn() -> Histogram>;

/// Everything `/metrics` reports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<OutcomeLabels, Counter>,
    pub rows: Family<StreamLabels, Counter>,
    pub batches: Family<StreamLabels, Counter>,
    pub received_bytes: Family<StreamLabels, Counter>,
    pub decoded_bytes: Family<StreamLabels, Counter>,
    pub schema_mismatches: Family<StreamLabels, Counter>,
    pub request_duration: LatencyFamily,
    pub inflight_bytes: Gauge,
    pub inflight_requests: Gauge,
    pub memory_budget_bytes: Gauge,
    pub compression_ratio: Family<StreamLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub config_generation: Gauge,
    pub config_reloads: Counter,
    pub config_reload_failures: Counter,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("arrowport");
        let requests = Family::<OutcomeLabels, Counter>::default();
        let rows = Family::<StreamLabels, Counter>::default();
        let batches = Family::<StreamLabels, Counter>::default();
        let received_bytes = Family::<StreamLabels, Counter>::default();
        let decoded_bytes = Family::<StreamLabels, Counter>::default();
        let schema_mismatches = Family::<StreamLabels, Counter>::default();
        let request_duration: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let inflight_bytes = Gauge::default();
        let memory_budget_bytes = Gauge::default();
        let inflight_requests = Gauge::default();
        let compression_ratio = Family::<StreamLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let config_generation = Gauge::default();
        let config_reloads = Counter::default();
        let config_reload_failures = Counter::default();
        registry.register("requests", "Ingest requests by outcome", requests.clone());
        registry.register("rows", "Rows committed", rows.clone());
        registry.register("batches", "Record batches committed", batches.clone());
        registry.register("received_bytes", "Request body bytes as received on the wire", received_bytes.clone());
        registry.register("decoded_bytes", "Arrow bytes of committed batches, decoded", decoded_bytes.clone());
        registry.register(
            "schema_mismatches",
            "Requests refused because their schema does not fit the table",
            schema_mismatches.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request start to commit (or failure)",
            request_duration.clone(),
        );
        registry.register("inflight_bytes", "Decoded Arrow bytes held by in-flight requests", inflight_bytes.clone());
        registry.register(
            "inflight_requests",
            "Ingest requests being received or committed",
            inflight_requests.clone(),
        );
        registry.register(
            "memory_budget_bytes",
            "Capacity of the in-flight memory budget",
            memory_budget_bytes.clone(),
        );
        registry.register(
            "compression_ratio",
            "Decoded Arrow bytes per wire byte, over all committed requests",
            compression_ratio.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the routing configuration in force",
            config_generation.clone(),
        );
        registry.register("config_reloads", "Configuration changes put in force", config_reloads.clone());
        registry.register(
            "config_reload_failures",
            "Configuration changes refused because they did not parse or validate",
            config_reload_failures.clone(),
        );
        Self {
            registry,
            requests,
            rows,
            batches,
            received_bytes,
            decoded_bytes,
            schema_mismatches,
            request_duration,
            inflight_bytes,
            inflight_requests,
            memory_budget_bytes,
            compression_ratio,
            config_generation,
            config_reloads,
            config_reload_failures,
        }
    }
}

impl Metrics {
    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
