//! The JSON the server answers with: an ingest request's report, a Flight `DoPut`'s
//! acknowledgements, and `GET /streams`.

use std::time::Duration;

use arrowport_config::{Compression, SchemaPolicy};
use serde::{Deserialize, Serialize};

/// The answer to a committed ingest request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    pub stream: String,
    pub table: String,
    pub rows: u64,
    pub batches: u64,
    /// Body bytes as received (compressed, if it was).
    pub bytes_received: u64,
    /// Arrow bytes after decoding.
    pub bytes_decoded: u64,
    pub elapsed_ms: u64,
    /// Time the commit took (reported in the commit latency histogram, not in the answer).
    #[serde(skip)]
    pub commit_time: Duration,
    /// Committed in one transaction with other requests (counted in the metrics, not in the answer).
    #[serde(skip)]
    pub grouped: bool,
    /// A retry whose idempotency key was already committed: this is the first commit's report (its rows,
    /// batches and bytes), and nothing was written again. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// Answered once durable in the server's journal: the rows are written to the table shortly after,
    /// and the server's own queries already read them. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub journaled: bool,
}

/// The HTTP header that names a request for retries (the IETF httpapi draft's name).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The HTTP header set on the answer to a replayed request.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The `app_metadata` of each `PutResult`, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Rows made durable by this commit.
    pub rows_committed: u64,
    pub batches_committed: u64,
    /// Rows committed by this call so far.
    pub rows_total: u64,
    /// The highest `request_id` the producer attached to a batch that is now committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
}

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

impl StreamStats {
    /// Adds one committed request (or one flush of a Flight call), committed now.
    pub fn add(&mut self, report: &IngestReport) {
        self.table.clone_from(&report.table);
        self.requests += 1;
        self.rows += report.rows;
        self.batches += report.batches;
        self.bytes_received += report.bytes_received;
        self.bytes_decoded += report.bytes_decoded;
        self.last_write = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }

    /// Decoded bytes per wire byte; `None` before the first write.
    pub fn compression_ratio(&self) -> Option<f64> {
        (self.bytes_received > 0).then(|| self.bytes_decoded as f64 / self.bytes_received as f64)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_leaves_out_a_missing_request_id() {
        let ack = Ack { rows_committed: 2, batches_committed: 1, rows_total: 5, request_id: None };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"rows_committed":2,"batches_committed":1,"rows_total":5}"#
        );
    }

    #[test]
    fn stats_add_up_commits() {
        let report = |table: &str, bytes_received| IngestReport {
            stream: "s".into(),
            table: table.into(),
            rows: 10,
            batches: 2,
            bytes_received,
            bytes_decoded: 400,
            elapsed_ms: 1,
            commit_time: Duration::ZERO,
            grouped: false,
            replayed: false,
            journaled: false,
        };
        let mut stats = StreamStats::default();
        assert_eq!(stats.compression_ratio(), None);
        stats.add(&report("a", 100));
        stats.add(&report("b", 300));
        assert_eq!((stats.table.as_str(), stats.requests, stats.rows, stats.batches), ("b", 2, 20, 4));
        // RFC 3339 in UTC with milliseconds, as `2026-01-01T00:00:00.000Z`.
        let last_write = stats.last_write.as_deref().unwrap();
        assert!(last_write.len() == 24 && last_write.ends_with('Z'), "{last_write}");
        assert_eq!(stats.compression_ratio(), Some(2.0));
    }

    #[test]
    fn replayed_appears_only_when_true() {
        let mut report = IngestReport {
            stream: "s".into(),
            table: "t".into(),
            rows: 1,
            batches: 1,
            bytes_received: 1,
            bytes_decoded: 1,
            elapsed_ms: 0,
            commit_time: Duration::ZERO,
            grouped: false,
            replayed: false,
            journaled: false,
        };
        assert!(!serde_json::to_string(&report).unwrap().contains("replayed"));
        report.replayed = true;
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains(r#""replayed":true"#), "{json}");
        assert_eq!(serde_json::from_str::<IngestReport>(&json).unwrap(), report);
    }
}
