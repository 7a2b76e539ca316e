//! `DoPut`: Flight data into the loader, committed at the stream's flush thresholds and at the end.
//!
//! One call may be one batch or hours of them. Each commit is one loader [`Upload`] (one DuckDB
//! transaction, which a small one shares with other small requests to the table); a failure rolls back
//! only what is not yet committed, and every commit is acknowledged with a `PutResult` before the next
//! one starts, so a producer knows exactly what is durable.

use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow_flight::{FlightData, PutResult};
use arrowport_config::FlushPolicy;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::IngestError;
use crate::load::{Target, Upload};
use crate::metrics::Protocol;
use crate::routing::Route;
use crate::server::{AppState, IngestReport};

use super::message::raw_message;
use crate::ipc::{Checked, MessageDecoder, Payload};

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

/// What one call wrote in total.
#[derive(Debug, Default)]
pub struct Totals {
    pub rows: u64,
    pub wire_bytes: u64,
}

/// One `DoPut` being received.
pub struct Put<'a> {
    state: &'a AppState,
    route: Route,
    target: Target,
    /// `None` commits only at the end (Flight SQL ingest is one transaction).
    flush: Option<FlushPolicy>,
    protocol: Protocol,
    acks: Option<mpsc::Sender<Result<PutResult, Status>>>,
    started: Instant,
    /// Wire bytes received so far.
    wire: u64,
    /// Wire bytes received up to the last commit: each commit counts what arrived since, its schema and
    /// metadata-only messages included, so the commits add up to the call.
    wire_committed: u64,
    schema: Option<SchemaRef>,
    upload: Option<Upload>,
    pending: Pending,
    rows_total: u64,
    committed_request_id: Option<u64>,
}

/// What the open upload holds, not yet committed.
#[derive(Default)]
struct Pending {
    rows: u64,
    bytes: u64,
    first_at: Option<Instant>,
    request_id: Option<u64>,
}

impl<'a> Put<'a> {
    pub fn new(
        state: &'a AppState,
        route: Route,
        target: Target,
        flush: Option<FlushPolicy>,
        protocol: Protocol,
        acks: Option<mpsc::Sender<Result<PutResult, Status>>>,
    ) -> Self {
        Self {
            state,
            route,
            target,
            flush,
            protocol,
            acks,
            started: Instant::now(),
            wire: 0,
            wire_committed: 0,
            schema: None,
            upload: None,
            pending: Pending::default(),
            rows_total: 0,
            committed_request_id: None,
        }
    }

    /// Receives the whole call. On error, whatever is not committed is rolled back.
    pub async fn run<S>(mut self, data: S) -> (Totals, Result<(), IngestError>)
    where
        S: Stream<Item = Result<FlightData, Status>> + Send + 'static,
    {
        let outcome = self.receive(data).await;
        // Dropping an uncommitted upload rolls it back.
        self.upload.take();
        (Totals { rows: self.rows_total, wire_bytes: self.wire }, outcome)
    }

    async fn receive<S>(&mut self, data: S) -> Result<(), IngestError>
    where
        S: Stream<Item = Result<FlightData, Status>> + Send + 'static,
    {
        let mut data = std::pin::pin!(data);
        let mut decoder = MessageDecoder::new(self.state.loader.budget().capacity());
        let mut dictionaries = None;
        loop {
            // Read on only once DuckDB can take the next batch (see the HTTP handler).
            if let Some(upload) = &self.upload {
                upload.ready().await;
            }
            let deadline = match (self.flush, self.pending.first_at) {
                (Some(flush), Some(first)) => Some(first + Duration::from_secs(flush.interval_seconds)),
                _ => None,
            };
            let next = self.state.next_from_client(data.next());
            let next = match deadline {
                Some(deadline) => tokio::select! {
                    next = next => next?,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        self.commit().await?;
                        continue;
                    }
                },
                None => next.await?,
            };
            let Some(message) = next else { break };
            let message = message.map_err(|status| self.receive_error(&status))?;
            self.wire += (message.data_header.len() + message.data_body.len() + message.app_metadata.len()) as u64;
            let request_id = request_id(&message.app_metadata);
            let message = raw_message(&message);
            // Room in the budget first, then decoding: a batch never exists outside the budget.
            let budget = self.state.loader.budget();
            let reservation = match decoder.check(&message)? {
                Checked::Batch { decoded_bytes } => Some(budget.reserve_batch(decoded_bytes).await?),
                // Dictionaries live as long as the call: they hold their room in the budget too.
                Checked::Dictionary { dictionary_bytes } => {
                    budget.resize(&mut dictionaries, dictionary_bytes).await?;
                    None
                }
                _ => None,
            };
            match decoder.decode(&message)? {
                Payload::Schema(schema) => self.start(schema)?,
                Payload::Batch(batch) => {
                    let rows = batch.num_rows() as u64;
                    if self.upload.is_none() {
                        self.upload = Some(self.begin()?);
                    }
                    let upload = self.upload.as_mut().expect("an upload was just opened");
                    let reservation = reservation.expect("a batch message was checked as one");
                    let bytes = upload.send(batch, reservation).await?;
                    let pending = &mut self.pending;
                    pending.rows += rows;
                    pending.bytes += bytes;
                    pending.first_at.get_or_insert_with(Instant::now);
                    pending.request_id = pending.request_id.max(request_id);
                    if let Some(flush) = self.flush
                        && (pending.rows >= flush.rows || pending.bytes >= flush.bytes.0)
                    {
                        self.commit().await?;
                    }
                }
                // No rows, but metadata still marks the producer's position.
                Payload::None => {
                    budget.resize(&mut dictionaries, decoder.dictionary_bytes()).await?;
                    self.pending.request_id = self.pending.request_id.max(request_id);
                }
            }
        }
        if self.schema.is_none() {
            return Err(IngestError::EmptyBody);
        }
        if self.upload.is_some() {
            self.commit().await?;
        }
        Ok(())
    }

    /// The stream's schema arrived: open the first upload, which refuses unsupported types at once.
    fn start(&mut self, schema: SchemaRef) -> Result<(), IngestError> {
        if let Some(known) = &self.schema {
            if known.fields() != schema.fields() {
                return Err(IngestError::InvalidIpc(
                    "the schema changed in the middle of the stream; send a new schema in a new DoPut".to_owned(),
                ));
            }
            return Ok(());
        }
        self.schema = Some(schema);
        self.upload = Some(self.begin()?);
        Ok(())
    }

    fn begin(&self) -> Result<Upload, IngestError> {
        let schema = self.schema.clone().ok_or(IngestError::EmptyBody)?;
        self.state.loader.upload(self.target.clone(), schema)
    }

    /// Commits the open upload and acknowledges it.
    async fn commit(&mut self) -> Result<(), IngestError> {
        let Some(upload) = self.upload.take() else { return Ok(()) };
        let pending = std::mem::take(&mut self.pending);
        let committed = upload.commit().await?;
        self.rows_total += committed.rows;
        self.committed_request_id = self.committed_request_id.max(pending.request_id);
        self.state.record_commit(
            self.protocol,
            &IngestReport {
                stream: self.route.stream.clone(),
                table: self.route.table.clone(),
                rows: committed.rows,
                batches: committed.batches,
                bytes_received: self.wire - std::mem::replace(&mut self.wire_committed, self.wire),
                bytes_decoded: pending.bytes,
                elapsed_ms: self.started.elapsed().as_millis() as u64,
                commit_time: committed.commit_time,
                grouped: committed.grouped,
            },
        );
        if let Some(acks) = &self.acks {
            let ack = Ack {
                rows_committed: committed.rows,
                batches_committed: committed.batches,
                rows_total: self.rows_total,
                request_id: self.committed_request_id,
            };
            let metadata = serde_json::to_vec(&ack).expect("an Ack always serialises");
            let result = PutResult { app_metadata: metadata.into() };
            // A client that stopped listening still has its data committed; only the ack is lost.
            let _ = acks.send(Ok(result)).await;
        }
        Ok(())
    }

    /// The transport failed: the message was too large for gRPC, or the client went away.
    fn receive_error(&self, status: &Status) -> IngestError {
        if status.code() == tonic::Code::OutOfRange {
            IngestError::MessageTooLarge { limit: self.state.limits.max_message_bytes.0 }
        } else {
            IngestError::BodyRead(status.message().to_owned())
        }
    }
}

/// `{"request_id": 42}` (or a bare `42`) in a batch's `app_metadata`; anything else carries none.
fn request_id(metadata: &[u8]) -> Option<u64> {
    if metadata.is_empty() {
        return None;
    }
    match serde_json::from_slice::<serde_json::Value>(metadata).ok()? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::Object(map) => map.get("request_id")?.as_u64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_come_from_json_metadata() {
        assert_eq!(request_id(br#"{"request_id": 42}"#), Some(42));
        assert_eq!(request_id(b"7"), Some(7));
        assert_eq!(request_id(b""), None);
        assert_eq!(request_id(b"not json"), None);
        assert_eq!(request_id(br#"{"request_id": "x"}"#), None);
    }

    #[test]
    fn ack_leaves_out_a_missing_request_id() {
        let ack = Ack { rows_committed: 2, batches_committed: 1, rows_total: 5, request_id: None };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"rows_committed":2,"batches_committed":1,"rows_total":5}"#
        );
    }
}
