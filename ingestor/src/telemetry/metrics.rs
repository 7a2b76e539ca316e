//! Prometheus metrics. Labels are fixed and low-cardinality: `stream`, `protocol`, `outcome`. The README's
//! "Metrics" section is the specification; a test scrapes `/metrics` after known traffic.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::auth::Refusal;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckpointLabels {
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why access control refused (see [`Refusal::reason`]).
    pub reason: &'static str,
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
    pub overloaded: Family<StreamLabels, Counter>,
    pub grouped_requests: Family<StreamLabels, Counter>,
    pub journaled_requests: Family<StreamLabels, Counter>,
    pub journal_unwritten_requests: Gauge,
    pub replayed_requests: Family<StreamLabels, Counter>,
    pub idempotency_keys: Gauge,
    pub idempotency_key_window_seconds: Gauge,
    pub request_duration: LatencyFamily,
    pub commit_duration: LatencyFamily,
    pub inflight_bytes: Gauge,
    pub inflight_requests: Gauge,
    pub memory_budget_bytes: Gauge,
    pub compression_ratio: Family<StreamLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub config_generation: Gauge,
    pub config_reloads: Counter,
    pub config_reload_failures: Counter,
    pub panics: Counter,
    pub auth_refusals: Family<ReasonLabels, Counter>,
    pub auth_tokens: Gauge,
    pub tls_handshake_failures: Counter,
    pub tls_certificate_reloads: Counter,
    pub tls_certificate_reload_failures: Counter,
    pub tls_certificate_expiry: Gauge,
    pub checkpoints: Family<CheckpointLabels, Counter>,
    pub checkpoint_duration: Histogram,
    /// Read at each scrape (see [`Metrics::set_resources`]).
    pub resident_memory_bytes: Gauge,
    pub duckdb_memory_bytes: Gauge,
    pub duckdb_memory_limit_bytes: Gauge,
    pub database_file_bytes: Gauge,
    pub wal_file_bytes: Gauge,
    pub storage_free_bytes: Gauge,
    pub storage_total_bytes: Gauge,
}

/// Resource readings taken at scrape time.
#[derive(Debug, Default)]
pub struct Resources {
    pub resident_memory_bytes: Option<u64>,
    pub duckdb_memory_bytes: Option<u64>,
    pub database_file_bytes: u64,
    pub wal_file_bytes: u64,
    /// The database volume's room and size (`None` where they cannot be read).
    pub storage_free_bytes: Option<u64>,
    pub storage_total_bytes: Option<u64>,
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
        let overloaded = Family::<StreamLabels, Counter>::default();
        let grouped_requests = Family::<StreamLabels, Counter>::default();
        let journaled_requests = Family::<StreamLabels, Counter>::default();
        let journal_unwritten_requests = Gauge::default();
        let replayed_requests = Family::<StreamLabels, Counter>::default();
        let idempotency_keys = Gauge::default();
        let idempotency_key_window_seconds = Gauge::default();
        let request_duration: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let commit_duration: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let checkpoints = Family::<CheckpointLabels, Counter>::default();
        let checkpoint_duration = latency_histogram();
        let resident_memory_bytes = Gauge::default();
        let duckdb_memory_bytes = Gauge::default();
        let duckdb_memory_limit_bytes = Gauge::default();
        let database_file_bytes = Gauge::default();
        let wal_file_bytes = Gauge::default();
        let storage_free_bytes = Gauge::default();
        let storage_total_bytes = Gauge::default();
        let inflight_bytes = Gauge::default();
        let memory_budget_bytes = Gauge::default();
        let inflight_requests = Gauge::default();
        let compression_ratio = Family::<StreamLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let config_generation = Gauge::default();
        let config_reloads = Counter::default();
        let config_reload_failures = Counter::default();
        let panics = Counter::default();
        let auth_refusals = Family::<ReasonLabels, Counter>::default();
        for refusal in Refusal::ALL {
            auth_refusals.get_or_create(&ReasonLabels { reason: refusal.reason() }).inc_by(0);
        }
        let auth_tokens = Gauge::default();
        registry.register(
            "auth_refusals",
            "Requests refused by access control, by reason (missing, invalid, stream_not_granted, query_not_granted)",
            auth_refusals.clone(),
        );
        registry.register("auth_tokens", "Entries of the tokens file in force", auth_tokens.clone());
        let tls_handshake_failures = Counter::default();
        let tls_certificate_reloads = Counter::default();
        let tls_certificate_reload_failures = Counter::default();
        let tls_certificate_expiry = Gauge::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out (a client certificate refused, a client that does not trust the server's)",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_certificate_reloads",
            "New TLS certificates (or client CAs) put in force after their files changed",
            tls_certificate_reloads.clone(),
        );
        registry.register(
            "tls_certificate_reload_failures",
            "New TLS certificates or client CAs refused (unreadable, key mismatch, outside their validity); the old ones stay",
            tls_certificate_reload_failures.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate in force expires (Unix seconds; 0 without TLS)",
            tls_certificate_expiry.clone(),
        );
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
            "overloaded_requests",
            "Requests refused because the in-flight memory budget stayed full",
            overloaded.clone(),
        );
        registry.register(
            "grouped_requests",
            "Requests committed in one transaction together with other small requests (group commit)",
            grouped_requests.clone(),
        );
        registry.register(
            "journaled_requests",
            "Small requests answered once durable in the journal, before their rows were written to the table",
            journaled_requests.clone(),
        );
        registry.register(
            "journal_unwritten_requests",
            "Journaled requests answered but not yet written to their tables",
            journal_unwritten_requests.clone(),
        );
        registry.register(
            "replayed_requests",
            "Retries with an idempotency key already committed: answered from the first commit, not written again",
            replayed_requests.clone(),
        );
        registry.register(
            "idempotency_keys",
            "Committed idempotency keys remembered (counted when expired keys are pruned, every minute)",
            idempotency_keys.clone(),
        );
        registry.register(
            "idempotency_key_window_seconds",
            "How long a committed idempotency key is remembered (idempotency.key_window_seconds)",
            idempotency_key_window_seconds.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request start to commit (or failure)",
            request_duration.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Time from the end of a commit's data to the end of its COMMIT",
            commit_duration.clone(),
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
        registry.register(
            "panics",
            "Requests whose handler panicked (answered 500 internal / INTERNAL; a bug to report)",
            panics.clone(),
        );
        registry.register("checkpoints", "CHECKPOINTs Arrowport ran, by outcome", checkpoints.clone());
        registry.register(
            "checkpoint_duration_seconds",
            "Duration of successful CHECKPOINTs Arrowport ran",
            checkpoint_duration.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the ingester process",
            resident_memory_bytes.clone(),
        );
        registry.register(
            "duckdb_memory_bytes",
            "Memory DuckDB's buffer manager holds (duckdb_memory())",
            duckdb_memory_bytes.clone(),
        );
        registry.register(
            "duckdb_memory_limit_bytes",
            "DuckDB's memory_limit: what its buffer manager may hold",
            duckdb_memory_limit_bytes.clone(),
        );
        registry.register("database_file_bytes", "Size of the DuckDB database file", database_file_bytes.clone());
        registry.register("wal_file_bytes", "Size of DuckDB's write-ahead log (0 when absent)", wal_file_bytes.clone());
        registry.register(
            "storage_free_bytes",
            "Bytes still free for the ingester on the database's volume",
            storage_free_bytes.clone(),
        );
        registry.register("storage_total_bytes", "Size of the database's volume", storage_total_bytes.clone());
        Self {
            registry,
            requests,
            rows,
            batches,
            received_bytes,
            decoded_bytes,
            schema_mismatches,
            overloaded,
            grouped_requests,
            journaled_requests,
            journal_unwritten_requests,
            replayed_requests,
            idempotency_keys,
            idempotency_key_window_seconds,
            request_duration,
            commit_duration,
            inflight_bytes,
            inflight_requests,
            memory_budget_bytes,
            compression_ratio,
            config_generation,
            config_reloads,
            config_reload_failures,
            panics,
            auth_refusals,
            auth_tokens,
            tls_handshake_failures,
            tls_certificate_reloads,
            tls_certificate_reload_failures,
            tls_certificate_expiry,
            checkpoints,
            checkpoint_duration,
            resident_memory_bytes,
            duckdb_memory_bytes,
            duckdb_memory_limit_bytes,
            database_file_bytes,
            wal_file_bytes,
            storage_free_bytes,
            storage_total_bytes,
        }
    }
}

impl Metrics {
    /// Counts a request access control refused.
    pub fn auth_refused(&self, refusal: Refusal) {
        self.auth_refusals.get_or_create(&ReasonLabels { reason: refusal.reason() }).inc();
    }

    /// Sets the gauges read at scrape time; a reading that could not be taken keeps its last value.
    pub fn set_resources(&self, resources: &Resources) {
        let set = |gauge: &Gauge, value: u64| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        if let Some(bytes) = resources.resident_memory_bytes {
            set(&self.resident_memory_bytes, bytes);
        }
        if let Some(bytes) = resources.duckdb_memory_bytes {
            set(&self.duckdb_memory_bytes, bytes);
        }
        set(&self.database_file_bytes, resources.database_file_bytes);
        set(&self.wal_file_bytes, resources.wal_file_bytes);
        if let Some(bytes) = resources.storage_free_bytes {
            set(&self.storage_free_bytes, bytes);
        }
        if let Some(bytes) = resources.storage_total_bytes {
            set(&self.storage_total_bytes, bytes);
        }
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// The process's resident memory, from `/proc/self/status` (Linux; `None` elsewhere).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 =
        status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}
