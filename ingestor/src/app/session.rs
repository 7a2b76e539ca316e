//! The one ingest loop both transports drive: IPC messages in, rows committed, a report out.
//!
//! A transport resolves nothing and decodes nothing itself: it hands [`App::start_ingest`] the stream
//! name, then [`Ingest::run`] a stream of raw IPC messages (HTTP cuts them from the body, Flight takes
//! one per `FlightData`) and a [`WireCounter`] it bumps as bytes arrive. The loop reserves each batch's
//! memory before decoding it, opens the upload on the first schema (so unsupported types and schema
//! mismatches are refused before any data is read), reads the next message only once DuckDB can take
//! it, commits at the end (and, for a long Flight `DoPut`, at the stream's flush thresholds, each commit
//! acknowledged before the next starts), and rolls back whatever is not committed when anything fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrowport_api::{Ack, IngestReport};
use arrowport_config::FlushPolicy;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::App;
use crate::budget::Reservation;
use crate::error::IngestError;
use crate::ipc::{Checked, MessageDecoder, Payload, RawMessage};
use crate::load::{Found, Receipt, TableMode, Target, Upload};
use crate::routing::Route;
use crate::telemetry::Protocol;

/// When an ingest commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commits {
    /// Once, when the client's data ends: the request is one transaction.
    AtEnd,
    /// Whenever the stream's flush thresholds are reached (rows, bytes, time), and at the end.
    AtFlushThresholds,
}

/// What a client asks to ingest.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    pub protocol: Protocol,
    pub stream: String,
    /// Whether the table may be created, appended to or replaced (Flight SQL's table options).
    pub mode: TableMode,
    pub commits: Commits,
    /// The client's idempotency key: for a request committed at the end, its name (a retry of a
    /// committed request is answered from its receipt); for a Flight `DoPut`, the producer's name, whose
    /// batches up to the highest committed `request_id` are skipped on a retry.
    pub key: Option<String>,
}

impl IngestRequest {
    /// Appends to `stream`'s table, creating it if needed.
    pub fn new(protocol: Protocol, stream: impl Into<String>, commits: Commits) -> Self {
        Self { protocol, stream: stream.into(), mode: TableMode::default(), commits, key: None }
    }
}

/// Longest idempotency key accepted.
const MAX_KEY_CHARS: usize = 255;

/// One IPC message from the client.
pub struct Incoming {
    pub message: RawMessage,
    /// The producer's position, from Flight `app_metadata` (acknowledged once committed).
    pub request_id: Option<u64>,
    /// Room the transport took in the budget for the message's body before it buffered it; the batch
    /// decoded from the body takes it over.
    pub room: Option<Reservation>,
}

/// Bytes received over the wire for one request (compressed, framing included), counted by the
/// transport as they arrive; and, for a transport that counts whole messages only, every byte of the
/// call's body as it arrives: the idle timeout watches those, so a large message that arrives slowly is
/// not cut off as silence.
#[derive(Debug, Clone, Default)]
pub struct WireCounter {
    counted: Arc<AtomicU64>,
    arrived: Option<Arc<AtomicU64>>,
}

impl WireCounter {
    /// A counter whose progress is `arrived`, bumped by the transport as the body's bytes come in.
    pub fn with_arrivals(arrived: Arc<AtomicU64>) -> Self {
        Self { counted: Arc::default(), arrived: Some(arrived) }
    }

    /// Counts `bytes` more; returns the total.
    pub fn add(&self, bytes: u64) -> u64 {
        self.counted.fetch_add(bytes, Ordering::Relaxed) + bytes
    }

    pub fn get(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    /// What has arrived so far: grows whenever the client sends anything.
    pub fn progress(&self) -> u64 {
        self.arrived.as_ref().unwrap_or(&self.counted).load(Ordering::Relaxed)
    }
}

/// An ingest that may start: its route is resolved and the server is not shutting down.
pub struct Ingest {
    app: Arc<App>,
    request: IngestRequest,
    route: Route,
    target: Target,
    flush: Option<FlushPolicy>,
    started: Instant,
    schema: Option<SchemaRef>,
    upload: Option<Upload>,
    pending: Pending,
    totals: IngestReport,
    /// Wire bytes counted up to the last commit: each commit counts what arrived since, its schema and
    /// metadata-only messages included, so the commits add up to the request.
    wire_committed: u64,
    committed_request_id: Option<u64>,
    /// Held while this ingest runs: no other request with the same key starts meanwhile.
    _claim: Option<KeyClaim>,
    /// A committed receipt for this request's key: answer from it, write nothing.
    replay: Option<Found>,
    /// A Flight producer's batches up to this `request_id` are committed already: skip them.
    skip_through: Option<u64>,
}

/// An idempotency key taken for the duration of one ingest.
struct KeyClaim {
    app: Arc<App>,
    id: (String, String),
}

impl KeyClaim {
    fn take(app: &Arc<App>, stream: &str, key: &str) -> Result<Self, IngestError> {
        let id = (stream.to_owned(), key.to_owned());
        if !app.keys_in_flight.lock().expect("key set lock poisoned").insert(id.clone()) {
            return Err(IngestError::RequestInProgress(key.to_owned()));
        }
        Ok(Self { app: app.clone(), id })
    }
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        self.app.keys_in_flight.lock().expect("key set lock poisoned").remove(&self.id);
    }
}

/// 1 to 255 visible ASCII characters: a key goes into logs and the database, never anything else.
fn check_key(key: &str) -> Result<(), IngestError> {
    if key.is_empty() || key.len() > MAX_KEY_CHARS || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IngestError::InvalidRequest(format!(
            "an idempotency key is 1 to {MAX_KEY_CHARS} visible ASCII characters"
        )));
    }
    Ok(())
}

/// What the open upload holds, not yet committed.
#[derive(Default)]
struct Pending {
    rows: u64,
    bytes: u64,
    first_at: Option<Instant>,
    request_id: Option<u64>,
}

impl App {
    /// Starts an ingest: refused while shutting down, when the stream does not route, or while another
    /// request with the same idempotency key runs. A refusal is counted here; an ingest that starts is
    /// counted by [`Ingest::run`].
    pub async fn start_ingest(self: &Arc<Self>, request: IngestRequest) -> Result<Ingest, IngestError> {
        let started = Instant::now();
        let prepared = self.prepare_ingest(&request).await.inspect_err(|error| {
            self.telemetry.record_request(request.protocol, &request.stream, Some(error), 0, started);
        });
        let (route, claim, found) = prepared?;
        let target = Target {
            table: route.table.clone(),
            chunk_size: route.chunk_size,
            policy: route.policy,
            mode: request.mode,
        };
        let flush = (request.commits == Commits::AtFlushThresholds).then_some(route.flush);
        let totals = IngestReport {
            stream: route.stream.clone(),
            table: route.table.clone(),
            rows: 0,
            batches: 0,
            bytes_received: 0,
            bytes_decoded: 0,
            elapsed_ms: 0,
            commit_time: Duration::ZERO,
            grouped: false,
            replayed: false,
            journaled: false,
        };
        let (replay, skip_through) = match request.commits {
            Commits::AtEnd => (found, None),
            Commits::AtFlushThresholds => (None, found.and_then(|found| found.request_id)),
        };
        Ok(Ingest {
            app: self.clone(),
            request,
            route,
            target,
            flush,
            started,
            schema: None,
            upload: None,
            pending: Pending::default(),
            totals,
            wire_committed: 0,
            committed_request_id: skip_through,
            _claim: claim,
            replay,
            skip_through,
        })
    }

    /// The route, and for a keyed request its claim and any receipt already committed for the key.
    async fn prepare_ingest(
        self: &Arc<Self>,
        request: &IngestRequest,
    ) -> Result<(Route, Option<KeyClaim>, Option<Found>), IngestError> {
        let route = self.routes().resolve(&request.stream)?;
        if self.is_shutting_down() {
            return Err(IngestError::ShuttingDown);
        }
        let Some(key) = &request.key else { return Ok((route, None, None)) };
        check_key(key)?;
        let claim = KeyClaim::take(self, &route.stream, key)?;
        let found = self.loader.find_receipt(&route.stream, &route.table, key).await?;
        Ok((route, Some(claim), found))
    }
}

impl Ingest {
    /// Ends the ingest before any data, because the transport refused the request; counts it.
    pub fn refuse(self, error: IngestError) -> IngestError {
        let request = &self.request;
        self.app.telemetry.record_request(request.protocol, &request.stream, Some(&error), 0, self.started);
        error
    }

    /// Receives the client's messages until they end and commits them. Each commit is counted in the
    /// telemetry and, if `acks` is given, acknowledged there before the next one starts. On error
    /// whatever is not committed is rolled back. Returns the request's totals.
    pub async fn run<S>(
        mut self,
        messages: S,
        wire: &WireCounter,
        acks: Option<&mpsc::Sender<Result<Ack, IngestError>>>,
    ) -> Result<IngestReport, IngestError>
    where
        S: Stream<Item = Result<Incoming, IngestError>>,
    {
        let app = self.app.clone();
        let _inflight = app.telemetry.inflight();
        if let Some(found) = self.replay.take() {
            return self.answer_replay(found, messages, wire).await;
        }
        let outcome = self.receive(messages, wire, acks).await;
        // Dropping an uncommitted upload rolls it back.
        self.upload.take();
        if let Err(error) = &outcome {
            app.note_failure(error);
        }
        let request = &self.request;
        app.telemetry.record_request(
            request.protocol,
            &request.stream,
            outcome.as_ref().err(),
            wire.get(),
            self.started,
        );
        outcome?;
        self.totals.bytes_received = wire.get();
        self.totals.elapsed_ms = self.started.elapsed().as_millis() as u64;
        Ok(self.totals)
    }

    /// A retry of a committed request: reads the client's data to its end (so the connection stays in
    /// order), writes nothing, and answers with the first commit's figures.
    async fn answer_replay<S>(self, found: Found, messages: S, wire: &WireCounter) -> Result<IngestReport, IngestError>
    where
        S: Stream<Item = Result<Incoming, IngestError>>,
    {
        let mut messages = std::pin::pin!(messages);
        let drained = async {
            while let Some(incoming) = self.app.next_from_client(messages.next(), wire).await? {
                incoming?;
            }
            Ok(())
        };
        let outcome: Result<(), IngestError> = drained.await;
        let request = &self.request;
        let telemetry = &self.app.telemetry;
        telemetry.record_request(request.protocol, &request.stream, outcome.as_ref().err(), wire.get(), self.started);
        outcome?;
        telemetry.record_replay(request.protocol, &request.stream);
        Ok(IngestReport {
            rows: found.rows,
            batches: found.batches,
            bytes_received: found.bytes_received,
            bytes_decoded: found.bytes_decoded,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            replayed: true,
            journaled: false,
            ..self.totals
        })
    }

    async fn receive<S>(
        &mut self,
        messages: S,
        wire: &WireCounter,
        acks: Option<&mpsc::Sender<Result<Ack, IngestError>>>,
    ) -> Result<(), IngestError>
    where
        S: Stream<Item = Result<Incoming, IngestError>>,
    {
        let mut messages = std::pin::pin!(messages);
        let app = self.app.clone();
        let budget = app.loader.budget();
        let mut decoder = MessageDecoder::new(budget.capacity());
        let mut dictionaries = None;
        loop {
            // Read on only once DuckDB can take the next batch: a slow table holds back the client, not memory.
            if let Some(upload) = &self.upload {
                upload.ready().await;
            }
            let deadline = match (self.flush, self.pending.first_at) {
                (Some(flush), Some(first)) => Some(first + Duration::from_secs(flush.interval_seconds)),
                _ => None,
            };
            let next = self.app.next_from_client(messages.next(), wire);
            let next = match deadline {
                Some(deadline) => tokio::select! {
                    next = next => next?,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        self.commit(wire, acks).await?;
                        continue;
                    }
                },
                None => next.await?,
            };
            let Some(incoming) = next else { break };
            let Incoming { message, request_id, room } = incoming?;
            let checked = decoder.check(&message)?;
            // A producer's retry resends batches already committed under its key: skip them undecoded.
            if let (Checked::Batch { .. }, Some(id), Some(done)) = (checked, request_id, self.skip_through)
                && id <= done
            {
                continue;
            }
            // Room in the budget first, then decoding: a batch never exists outside the budget.
            let reservation = match checked {
                // The body's room (when the transport took some) covers the batch read from it in place;
                // decoding may need more (decompression, realigned buffers).
                Checked::Batch { decoded_bytes } => Some(budget.top_up(room, decoded_bytes).await?),
                // Dictionaries live as long as the request: they hold their room in the budget too.
                Checked::Dictionary { dictionary_bytes } => {
                    budget.resize(&mut dictionaries, dictionary_bytes).await?;
                    None
                }
                Checked::Schema | Checked::Empty => None,
            };
            match decoder.decode(&message)? {
                Payload::Schema(schema) => self.start(schema)?,
                Payload::Batch(batch) => {
                    let rows = batch.num_rows() as u64;
                    let reservation = reservation.expect("a batch message was checked as one");
                    let upload = match &mut self.upload {
                        Some(upload) => upload,
                        None => self.upload.insert(self.begin()?),
                    };
                    let bytes = upload.send(batch, reservation).await?;
                    let pending = &mut self.pending;
                    pending.rows += rows;
                    pending.bytes += bytes;
                    pending.first_at.get_or_insert_with(Instant::now);
                    pending.request_id = pending.request_id.max(request_id);
                    if let Some(flush) = self.flush
                        && (pending.rows >= flush.rows || pending.bytes >= flush.bytes.0)
                    {
                        self.commit(wire, acks).await?;
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
            self.commit(wire, acks).await?;
        }
        Ok(())
    }

    /// The stream's schema arrived: open the first upload, which refuses unsupported types at once. The
    /// same schema again changes nothing; another one is refused.
    fn start(&mut self, schema: SchemaRef) -> Result<(), IngestError> {
        if let Some(known) = &self.schema {
            if known.fields() != schema.fields() {
                return Err(IngestError::InvalidIpc(
                    "the schema changed in the middle of the stream; send a new schema in a new request".to_owned(),
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
        self.app.loader.upload(self.target.clone(), schema)
    }

    /// Commits the open upload, counts it and acknowledges it.
    async fn commit(
        &mut self,
        wire: &WireCounter,
        acks: Option<&mpsc::Sender<Result<Ack, IngestError>>>,
    ) -> Result<(), IngestError> {
        let Some(upload) = self.upload.take() else { return Ok(()) };
        let pending = std::mem::take(&mut self.pending);
        let wire_now = wire.get();
        let bytes_received = wire_now - std::mem::replace(&mut self.wire_committed, wire_now);
        let receipt = self.request.key.as_ref().map(|key| Receipt {
            stream: self.route.stream.clone(),
            key: key.clone(),
            request_id: pending.request_id,
            rows: None,
            batches: None,
            bytes_received,
            bytes_decoded: pending.bytes,
        });
        let committed = upload.commit(receipt).await?;
        let report = IngestReport {
            stream: self.route.stream.clone(),
            table: self.route.table.clone(),
            rows: committed.rows,
            batches: committed.batches,
            bytes_received,
            bytes_decoded: pending.bytes,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            commit_time: committed.commit_time,
            grouped: committed.grouped,
            journaled: committed.journaled,
            replayed: false,
        };
        self.app.telemetry.record_commit(self.request.protocol, &report);
        let totals = &mut self.totals;
        totals.rows += report.rows;
        totals.batches += report.batches;
        totals.bytes_decoded += report.bytes_decoded;
        totals.commit_time += report.commit_time;
        totals.grouped |= report.grouped;
        totals.journaled |= report.journaled;
        self.committed_request_id = self.committed_request_id.max(pending.request_id);
        if let Some(acks) = acks {
            let ack = Ack {
                rows_committed: committed.rows,
                batches_committed: committed.batches,
                rows_total: totals.rows,
                request_id: self.committed_request_id,
            };
            // A client that stopped listening still has its data committed; only the ack is lost.
            let _ = acks.send(Ok(ack)).await;
        }
        Ok(())
    }
}
