//! Producers: each sends requests one after another, over HTTP (one `POST` per request) or Flight (a
//! `DoPut` of one to several requests, one batch each, with `{"request_id": N}` in the batch's
//! `app_metadata`), and writes down what it sent and what it was told in the ledger.
//!
//! A request without an answer (the server was killed under it) is left as it is, and the producer goes on
//! with a new request id once the server is back: a request id is never sent twice.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::ipc::writer::StreamWriter;
use arrow_flight::error::FlightError;
use arrow_flight::utils::batches_to_flight_data;
use arrow_flight::{FlightClient, FlightData, FlightDescriptor};
use futures::{SinkExt, StreamExt};
use tokio::sync::watch;

use crate::data::{self, STREAM};
use crate::ledger::{Key, Ledger, Protocol, State};
use crate::rng::Rng;

/// An answer slower than this is a hang, reported as a problem.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Rows per batch inside one HTTP request (a large request is several batches in one body).
const HTTP_BATCH_ROWS: i32 = 65_536;

/// Where the server is: producers send only while `url` is set, to the run `epoch`.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub epoch: u64,
    pub url: Option<String>,
    pub stop: bool,
}

/// What producers send.
#[derive(Debug, Clone)]
pub struct Load {
    pub small_rows: i32,
    pub large_rows: (i32, i32),
    /// Chance that a request is large.
    pub large_share: f64,
    /// Most requests in one Flight `DoPut`.
    pub requests_per_call: u64,
    /// Longest pause between the requests of one `DoPut`, ms.
    pub pause_ms: u64,
}

/// State all producers and the controller share.
pub struct Shared {
    pub phase: watch::Sender<Phase>,
    pub ledger: Mutex<Ledger>,
    /// Producers inside a session (sending or waiting for an answer).
    pub busy: AtomicUsize,
    /// Server runs whose end (SIGKILL, or SIGTERM at the end) has begun: failures of requests sent to
    /// them are expected. Raised before the signal is sent.
    pub ended: AtomicU64,
    /// Anything wrong the checker cannot see in the table: an error while the server was not being
    /// stopped, an acknowledgement that does not add up, a hang.
    pub problems: Mutex<Vec<String>>,
}

impl Shared {
    pub fn new() -> Self {
        Self {
            phase: watch::Sender::new(Phase::default()),
            ledger: Mutex::default(),
            busy: AtomicUsize::new(0),
            ended: AtomicU64::new(0),
            problems: Mutex::default(),
        }
    }

    fn ended(&self, epoch: u64) -> bool {
        epoch < self.ended.load(Ordering::SeqCst)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger lock")
    }

    fn problem(&self, producer: i32, epoch: u64, what: String) {
        let line = format!("producer {producer}, server run {epoch}: {what}");
        eprintln!("PROBLEM {line}");
        self.problems.lock().expect("problems lock").push(line);
    }
}

/// How a session (a producer's requests to one server run) ended.
enum End {
    /// The controller paused the producers (the server is down or being checked).
    Paused,
    /// A request failed because the server run ended: wait for the next one.
    ServerGone,
    /// A request failed while the server was up (already reported as a problem).
    Unexpected,
}

pub struct Producer {
    pub id: i32,
    pub protocol: Protocol,
    load: Load,
    rng: Rng,
    next_request: i64,
}

impl Producer {
    /// Even producers send over HTTP, odd ones over Flight.
    pub fn new(id: i32, seed: u64, load: Load) -> Self {
        let protocol = if id % 2 == 0 { Protocol::Http } else { Protocol::Flight };
        Self { id, protocol, load, rng: Rng::derive(seed, 1 + id as u64), next_request: 0 }
    }

    /// Sends requests whenever the server is up, until the controller says stop.
    pub async fn run(mut self, shared: Arc<Shared>) {
        let mut phase = shared.phase.subscribe();
        let mut gone: Option<u64> = None;
        loop {
            let (epoch, url) = {
                let Ok(now) = phase.wait_for(|p| p.stop || (p.url.is_some() && gone.is_none_or(|e| p.epoch > e))).await
                else {
                    return;
                };
                if now.stop {
                    return;
                }
                (now.epoch, now.url.clone().expect("waited for a url"))
            };
            // Busy first, then the phase again: the controller pauses first, then waits for no one busy.
            shared.busy.fetch_add(1, Ordering::SeqCst);
            let end = if running(&phase, epoch) {
                match self.protocol {
                    Protocol::Http => self.http(&shared, &phase, epoch, &url).await,
                    Protocol::Flight => self.flight(&shared, &phase, epoch, &url).await,
                }
            } else {
                End::Paused
            };
            shared.busy.fetch_sub(1, Ordering::SeqCst);
            gone = match end {
                End::Paused => None,
                End::ServerGone => Some(epoch),
                End::Unexpected => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
            };
        }
    }

    fn next_key(&mut self) -> Key {
        let key = (self.id, self.next_request);
        self.next_request += 1;
        key
    }

    fn choose_rows(&mut self) -> i32 {
        let load = &self.load;
        if self.rng.chance(load.large_share) {
            self.rng.between(load.large_rows.0 as u64, load.large_rows.1 as u64) as i32
        } else {
            load.small_rows
        }
    }
}

impl Producer {
    /// One `POST /ingest/crash` per request, each waiting for its answer.
    async fn http(&mut self, shared: &Arc<Shared>, phase: &watch::Receiver<Phase>, epoch: u64, url: &str) -> End {
        let client = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
            Ok(client) => client,
            Err(error) => {
                shared.problem(self.id, epoch, format!("cannot build an HTTP client: {error}"));
                return End::Unexpected;
            }
        };
        loop {
            if !running(phase, epoch) {
                return End::Paused;
            }
            let key = self.next_key();
            let rows = self.choose_rows();
            let body =
                tokio::task::spawn_blocking(move || ipc(&data::request_batches(key.0, key.1, rows, HTTP_BATCH_ROWS)))
                    .await
                    .expect("encoding a request");
            shared.ledger().register(key, i64::from(rows), Protocol::Http, epoch);
            let answer = client
                .post(format!("{url}/ingest/{STREAM}"))
                .header("content-type", "application/vnd.apache.arrow.stream")
                .body(body)
                .send()
                .await;
            match answer {
                // The answer comes only after the commit: the status alone acknowledges the request.
                Ok(response) if response.status() == reqwest::StatusCode::OK => {
                    shared.ledger().settle(key, State::Acked);
                    if let Ok(report) = response.json::<serde_json::Value>().await
                        && report["rows"].as_i64() != Some(i64::from(rows))
                    {
                        shared.problem(self.id, epoch, format!("request {}: {rows} rows sent, report {report}", key.1));
                    }
                }
                // A definite refusal: nothing of it may be written.
                Ok(response) => {
                    shared.ledger().settle(key, State::Refused);
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if !shared.ended(epoch) {
                        shared.problem(self.id, epoch, format!("request {} refused: {status} {text}", key.1));
                        return End::Unexpected;
                    }
                }
                Err(error) => {
                    shared.ledger().settle(key, State::Ambiguous);
                    // IDEMPOTENT RETRY GOES HERE. No answer: the request may or may not have been
                    // committed. Today the producer gives the request up and goes on with a new request id
                    // once the server is back. With idempotency keys, it will resend this very request
                    // (same `key`, same rows, its key in the request) to the next server run, settle it
                    // `Acked` on a 200, and the checker will then demand it exactly once
                    // (`check::exactly_once_for_acked`) where today it demands at most once
                    // (`check::at_most_once`).
                    if shared.ended(epoch) {
                        return End::ServerGone;
                    }
                    shared.problem(self.id, epoch, format!("request {} failed: {error:#}", key.1));
                    return End::Unexpected;
                }
            }
        }
    }

    /// `DoPut` calls of one to `requests_per_call` requests (one batch each, paused between), each call
    /// on the producer's connection, acknowledgements read as they come.
    async fn flight(&mut self, shared: &Arc<Shared>, phase: &watch::Receiver<Phase>, epoch: u64, url: &str) -> End {
        let channel = match tonic::transport::Channel::from_shared(url.to_owned()) {
            Ok(endpoint) => endpoint.connect().await,
            Err(error) => {
                shared.problem(self.id, epoch, format!("bad url {url}: {error}"));
                return End::Unexpected;
            }
        };
        let mut client = match channel {
            Ok(channel) => FlightClient::new(channel),
            Err(_) if shared.ended(epoch) => return End::ServerGone,
            Err(error) => {
                shared.problem(self.id, epoch, format!("cannot connect: {error}"));
                return End::Unexpected;
            }
        };
        loop {
            if !running(phase, epoch) {
                return End::Paused;
            }
            let count = self.rng.between(1, self.load.requests_per_call.max(1));
            let plan: Vec<(Key, i32, u64)> = (0..count)
                .map(|_| (self.next_key(), self.choose_rows(), self.rng.between(0, self.load.pause_ms)))
                .collect();
            let call = Arc::new(Mutex::new(Vec::<(Key, i64, bool)>::new()));
            let (tx, rx) = futures::channel::mpsc::channel::<Result<FlightData, FlightError>>(1);
            // The call's messages end when the sender is done with the plan (and drops `tx`).
            let sender = tokio::spawn(send_call(shared.clone(), plan, epoch, call.clone(), tx));
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut acks = client.do_put(rx).await?;
                while let Some(ack) = acks.next().await {
                    let ack = ack?;
                    self.acknowledge(shared, epoch, &call, &ack.app_metadata);
                }
                Ok::<(), FlightError>(())
            })
            .await;
            // Nothing more is registered once the sender has stopped.
            sender.abort();
            let _ = sender.await;
            let unacked: Vec<Key> =
                call.lock().expect("call lock").iter().filter(|(_, _, acked)| !acked).map(|(key, ..)| *key).collect();
            for key in &unacked {
                shared.ledger().settle(*key, State::Ambiguous);
            }
            match outcome {
                Ok(Ok(())) if unacked.is_empty() => {}
                Ok(Ok(())) => {
                    shared.problem(self.id, epoch, format!("a DoPut ended cleanly without acknowledging {unacked:?}"));
                    return End::Unexpected;
                }
                // IDEMPOTENT RETRY GOES HERE (see `http`): today `unacked` are given up.
                Ok(Err(_)) if shared.ended(epoch) => return End::ServerGone,
                Ok(Err(error)) => {
                    shared.problem(self.id, epoch, format!("a DoPut failed: {error}"));
                    return End::Unexpected;
                }
                Err(_) => {
                    shared.problem(self.id, epoch, format!("a DoPut hung for {} s", REQUEST_TIMEOUT.as_secs()));
                    return End::Unexpected;
                }
            }
        }
    }

    /// One `PutResult`: every request of the call up to its `request_id` is committed, and the call's
    /// `rows_total` must be exactly their rows.
    fn acknowledge(&self, shared: &Shared, epoch: u64, call: &Mutex<Vec<(Key, i64, bool)>>, metadata: &[u8]) {
        let ack: serde_json::Value = serde_json::from_slice(metadata).unwrap_or_default();
        let Some(up_to) = ack["request_id"].as_i64() else {
            shared.problem(self.id, epoch, format!("an ack without a request_id: {ack}"));
            return;
        };
        let mut call = call.lock().expect("call lock");
        let mut ledger = shared.ledger();
        let mut rows = 0;
        for (key, request_rows, acked) in call.iter_mut() {
            if key.1 <= up_to {
                if !*acked {
                    ledger.settle(*key, State::Acked);
                    *acked = true;
                }
                rows += *request_rows;
            }
        }
        if ack["rows_total"].as_i64() != Some(rows) {
            shared.problem(self.id, epoch, format!("ack {ack}: the call's requests up to {up_to} have {rows} rows"));
        }
    }
}

/// Sends one `DoPut`'s messages: the schema with the stream's descriptor, then each planned request as
/// one batch with its `request_id`, registered in the ledger (and the call) just before it is sent.
async fn send_call(
    shared: Arc<Shared>,
    plan: Vec<(Key, i32, u64)>,
    epoch: u64,
    call: Arc<Mutex<Vec<(Key, i64, bool)>>>,
    mut tx: futures::channel::mpsc::Sender<Result<FlightData, FlightError>>,
) {
    let descriptor = FlightDescriptor::new_path(vec![STREAM.to_owned()]);
    let schema = batches_to_flight_data(&data::schema(), vec![]).expect("a schema message").remove(0);
    if tx.send(Ok(schema.with_descriptor(descriptor))).await.is_err() {
        return;
    }
    for (key, rows, pause_ms) in plan {
        let message = tokio::task::spawn_blocking(move || {
            let batch = data::batch(key.0, key.1, 0, rows);
            let mut messages = batches_to_flight_data(&data::schema(), vec![batch]).expect("encoding a batch");
            let metadata = serde_json::json!({ "request_id": key.1 }).to_string();
            messages.pop().expect("the batch's message").with_app_metadata(metadata)
        })
        .await
        .expect("encoding a request");
        shared.ledger().register(key, i64::from(rows), Protocol::Flight, epoch);
        call.lock().expect("call lock").push((key, i64::from(rows), false));
        if tx.send(Ok(message)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
}

/// Whether the server run `epoch` is still the one to send to.
fn running(phase: &watch::Receiver<Phase>, epoch: u64) -> bool {
    let now = phase.borrow();
    !now.stop && now.epoch == epoch && now.url.is_some()
}

/// One Arrow IPC stream (an HTTP body) of `batches`.
fn ipc(batches: &[RecordBatch]) -> Vec<u8> {
    let mut writer = StreamWriter::try_new(Vec::new(), &data::schema()).expect("IPC writer");
    for batch in batches {
        writer.write(batch).expect("in-memory write");
    }
    writer.into_inner().expect("in-memory finish")
}
