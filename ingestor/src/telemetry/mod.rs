//! What the ingester tells the outside about itself: Prometheus metrics and per-stream totals, each
//! recorded in one place whatever the transport.

pub mod metrics;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arrowport_api::{ErrorCode, IngestReport, StreamStats};

use crate::error::IngestError;
use crate::store::Checkpoint;
use metrics::{CheckpointLabels, OutcomeLabels, StreamLabels};
pub use metrics::{Metrics, Protocol, Resources};

/// Metrics and per-stream totals since start.
#[derive(Default)]
pub struct Telemetry {
    pub metrics: Metrics,
    stats: Mutex<BTreeMap<String, StreamStats>>,
}

impl Telemetry {
    /// Per-stream totals since start.
    pub fn stream_stats(&self) -> BTreeMap<String, StreamStats> {
        self.stats.lock().expect("stats lock poisoned").clone()
    }

    /// Counts one commit (a whole HTTP request, or one flush of a Flight call) in the metrics and the
    /// per-stream totals.
    pub fn record_commit(&self, protocol: Protocol, report: &IngestReport) {
        let ratio = {
            let mut stats = self.stats.lock().expect("stats lock poisoned");
            let totals = stats.entry(report.stream.clone()).or_default();
            totals.add(report);
            totals.compression_ratio()
        };
        let labels = StreamLabels { stream: report.stream.clone(), protocol };
        let metrics = &self.metrics;
        metrics.rows.get_or_create(&labels).inc_by(report.rows);
        metrics.batches.get_or_create(&labels).inc_by(report.batches);
        metrics.decoded_bytes.get_or_create(&labels).inc_by(report.bytes_decoded);
        if let Some(ratio) = ratio {
            metrics.compression_ratio.get_or_create(&labels).set(ratio);
        }
        metrics.commit_duration.get_or_create(&labels).observe(report.commit_time.as_secs_f64());
        if report.grouped {
            metrics.grouped_requests.get_or_create(&labels).inc();
        }
        if report.journaled {
            metrics.journaled_requests.get_or_create(&labels).inc();
        }
        tracing::debug!(stream = %report.stream, table = %report.table, rows = report.rows, %protocol, "Committed.");
    }

    /// Counts a finished request (its wire bytes, duration and outcome) and logs a failure.
    pub fn record_request(
        &self,
        protocol: Protocol,
        stream: &str,
        error: Option<&IngestError>,
        wire_bytes: u64,
        started: Instant,
    ) {
        let metrics = &self.metrics;
        // Names that never became a stream are not labels: that would let any client mint time series.
        let label = match error {
            Some(
                IngestError::InvalidStreamName(_) | IngestError::UnknownStream(_) | IngestError::PermissionDenied(_),
            ) => "",
            _ => stream,
        };
        let labels = StreamLabels { stream: label.to_owned(), protocol };
        metrics.received_bytes.get_or_create(&labels).inc_by(wire_bytes);
        metrics.request_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        let outcome = match error {
            None => "ok",
            Some(error) => {
                let code = error.code();
                if code == ErrorCode::Overloaded {
                    metrics.overloaded.get_or_create(&labels).inc();
                }
                if matches!(error, IngestError::SchemaMismatch(_)) {
                    metrics.schema_mismatches.get_or_create(&labels).inc();
                    tracing::warn!(stream, %protocol, %error, "Refused data whose schema does not fit the table.");
                } else if code.http_status().is_server_error() {
                    tracing::error!(stream, %protocol, %code, %error, "Ingest failed; its uncommitted data was rolled back.");
                } else {
                    tracing::info!(stream, %protocol, %code, %error, "Refused an ingest request.");
                }
                code.as_str()
            }
        };
        metrics
            .requests
            .get_or_create(&OutcomeLabels { stream: labels.stream, protocol, outcome: outcome.to_owned() })
            .inc();
    }

    /// Counts a retry answered from its idempotency key's receipt.
    pub fn record_replay(&self, protocol: Protocol, stream: &str) {
        let labels = StreamLabels { stream: stream.to_owned(), protocol };
        self.metrics.replayed_requests.get_or_create(&labels).inc();
    }

    /// Counts a checkpoint (`None`: it failed) and, if it was taken, how long it took.
    pub fn record_checkpoint(&self, outcome: Option<Checkpoint>, duration: Duration) {
        let outcome = match outcome {
            Some(Checkpoint::Done) => "ok",
            Some(Checkpoint::NotOurTurn) => "skipped",
            None => "failed",
        };
        self.metrics.checkpoints.get_or_create(&CheckpointLabels { outcome }).inc();
        if outcome == "ok" {
            self.metrics.checkpoint_duration.observe(duration.as_secs_f64());
        }
    }

    /// Counts a handler that panicked (and was answered with an error).
    pub fn record_panic(&self) {
        self.metrics.panics.inc();
    }

    /// Counts a request in `arrowport_inflight_requests` for as long as the guard lives (cancellation
    /// included).
    pub fn inflight(&self) -> Inflight<'_> {
        self.metrics.inflight_requests.inc();
        Inflight(self)
    }
}

/// See [`Telemetry::inflight`].
pub struct Inflight<'a>(&'a Telemetry);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.metrics.inflight_requests.dec();
    }
}
