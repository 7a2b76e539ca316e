//! The load: large HTTP and Flight `DoPut` requests from eight producers, one streamed upload of about a
//! GiB, and 1,000-row requests from a few more, all at once. Every payload is encoded once, before any
//! run, and sent again and again (cheap clones of the same bytes), so the producers cost the shared cores
//! little and every run sends the same thing. Each producer adds up the rows the server acknowledged,
//! per stream.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow::ipc::writer::StreamWriter;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, FlightData, FlightDescriptor};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tonic::transport::Channel;

use crate::data;

/// The streams (auto-created tables of the same names) and what sends to each.
pub const STREAMS: [&str; 5] =
    ["memlimit_http", "memlimit_flight", "memlimit_upload", "memlimit_small_http", "memlimit_small_flight"];
const HTTP_LARGE: usize = 0;
const FLIGHT_LARGE: usize = 1;
const UPLOAD: usize = 2;
const SMALL_HTTP: usize = 3;
const SMALL_FLIGHT: usize = 4;

/// Error messages kept per run.
const KEPT_ERRORS: usize = 8;

/// Which protocols the large producers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocols {
    /// Every other one over Flight `DoPut`, the rest over HTTP.
    Mixed,
    Http,
    Flight,
}

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Producers of large requests.
    pub producers: usize,
    pub protocols: Protocols,
    /// Producers of small requests, every other one over Flight `DoPut`.
    pub small_producers: usize,
    /// Size of the one streamed HTTP upload (0: none).
    pub upload_bytes: u64,
    /// Large producers keep sending for this long (and until the upload is done).
    pub duration: Duration,
}

/// Every payload, encoded once.
pub struct Payloads {
    pub columns: usize,
    /// One large request: an Arrow IPC stream of the pool's batches.
    http_large: Bytes,
    /// The same batches as one `DoPut`.
    flight_large: Vec<FlightData>,
    pub rows_per_request: u64,
    pub bytes_per_request: u64,
    /// The upload's pieces: the schema message, one message per batch (cycled), the end-of-stream marker.
    upload_header: Bytes,
    upload_batches: Vec<Bytes>,
    upload_end: Bytes,
    /// Small requests, each its own IPC stream or `DoPut`.
    small_http: Vec<Bytes>,
    small_flight: Vec<Vec<FlightData>>,
}

impl Payloads {
    pub async fn new(columns: usize, batch_rows: usize, batches: usize, small_rows: usize) -> anyhow::Result<Self> {
        let pool: Vec<RecordBatch> =
            (0..batches.max(1)).map(|i| data::batch((i * batch_rows) as u64, batch_rows, columns)).collect();
        let (header, pieces, end) = ipc_pieces(&pool)?;
        let mut http_large = Vec::with_capacity(pieces.iter().map(Bytes::len).sum::<usize>() + 1024);
        for piece in std::iter::once(&header).chain(&pieces).chain(std::iter::once(&end)) {
            http_large.extend_from_slice(piece);
        }
        let small_rows = small_rows.clamp(1, batch_rows);
        let small: Vec<RecordBatch> = (0..16)
            .map(|i| pool[i % pool.len()].slice((i * small_rows) % (batch_rows - small_rows + 1), small_rows))
            .collect();
        let mut small_http = Vec::new();
        let mut small_flight = Vec::new();
        for batch in &small {
            let (header, pieces, end) = ipc_pieces(std::slice::from_ref(batch))?;
            small_http.push(Bytes::from([header, pieces[0].clone(), end].concat()));
            small_flight.push(flight_messages(STREAMS[SMALL_FLIGHT], std::slice::from_ref(batch)).await?);
        }
        Ok(Self {
            columns,
            bytes_per_request: http_large.len() as u64,
            http_large: Bytes::from(http_large),
            flight_large: flight_messages(STREAMS[FLIGHT_LARGE], &pool).await?,
            rows_per_request: pool.iter().map(|b| b.num_rows() as u64).sum(),
            upload_header: header,
            upload_batches: pieces,
            upload_end: end,
            small_http,
            small_flight,
        })
    }
}

/// An Arrow IPC stream of `batches` cut into its messages: the schema, each batch, the end marker.
fn ipc_pieces(batches: &[RecordBatch]) -> anyhow::Result<(Bytes, Vec<Bytes>, Bytes)> {
    let mut writer = StreamWriter::try_new(Vec::new(), &batches[0].schema())?;
    let header = Bytes::from(std::mem::take(writer.get_mut()));
    let mut pieces = Vec::new();
    for batch in batches {
        writer.write(batch)?;
        pieces.push(Bytes::from(std::mem::take(writer.get_mut())));
    }
    writer.finish()?;
    Ok((header, pieces, Bytes::from(std::mem::take(writer.get_mut()))))
}

/// One `DoPut`'s messages (as in `bench/src/flight.rs`): the schema with the stream's descriptor, then one
/// message per batch.
async fn flight_messages(stream: &str, batches: &[RecordBatch]) -> anyhow::Result<Vec<FlightData>> {
    // The encoder's stream must own its batches (cheap, reference-counted clones).
    let owned: Vec<RecordBatch> = batches.to_vec();
    let encoder = FlightDataEncoderBuilder::new()
        .with_max_flight_data_size(usize::MAX)
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![stream.to_owned()])))
        .build(futures::stream::iter(owned.into_iter().map(Ok)));
    Ok(encoder.try_collect().await?)
}

/// What all producers of one run share: when to stop, and what they saw.
#[derive(Default)]
pub struct Tally {
    /// Stop starting requests (the time is up, or the server is gone).
    stop: AtomicBool,
    /// The server process is gone.
    pub dead: AtomicBool,
    /// Rows the server acknowledged as committed, per stream ([`STREAMS`]).
    acked: [AtomicU64; 5],
    requests: AtomicU64,
    /// 503 `overloaded` / `RESOURCE_EXHAUSTED` answers: the documented back-pressure, retried.
    overloaded: AtomicU64,
    /// Any other failure.
    errors: AtomicU64,
    messages: Mutex<Vec<String>>,
    small_latencies: Mutex<Vec<Duration>>,
    pub upload: Mutex<Option<UploadOutcome>>,
}

#[derive(Clone, Debug)]
pub struct UploadOutcome {
    pub rows: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub attempts: u32,
}

impl Tally {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.dead.load(Ordering::Relaxed)
    }

    pub fn acked(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.acked[i].load(Ordering::Relaxed))
    }

    pub fn acked_total(&self) -> u64 {
        self.acked().iter().sum()
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn overloaded(&self) -> u64 {
        self.overloaded.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("lock").clone()
    }

    /// p50 and p99 from sending a small request to its answer.
    pub fn small_latency(&self) -> Option<(Duration, Duration)> {
        let mut latencies = self.small_latencies.lock().expect("lock").clone();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort();
        let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        Some((at(0.5), at(0.99)))
    }

    /// Counts one request's outcome; after a failure, waits before the next (the server's `Retry-After`
    /// of one second after an overload).
    async fn record(&self, stream: usize, acked: u64, failure: Option<Failure>) {
        self.acked[stream].fetch_add(acked, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        match failure {
            None => {}
            Some(Failure::Overloaded) => {
                self.overloaded.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(Failure::Other(message)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                {
                    let mut messages = self.messages.lock().expect("lock");
                    if messages.len() < KEPT_ERRORS {
                        messages.push(format!("{}: {message}", STREAMS[stream]));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[derive(Debug)]
enum Failure {
    /// The documented back-pressure: retry later.
    Overloaded,
    Other(String),
}

/// Runs the whole load against the server at `url` until `shape.duration` has passed and the upload is
/// done (or the server is gone). Returns how long it ran.
pub async fn drive(url: &str, payloads: Arc<Payloads>, shape: &Shape, tally: Arc<Tally>) -> Duration {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("HTTP client");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..shape.producers {
        let (url, client, payloads, tally) = (url.to_owned(), client.clone(), payloads.clone(), tally.clone());
        let over_flight = match shape.protocols {
            Protocols::Mixed => i % 2 == 1,
            Protocols::Http => false,
            Protocols::Flight => true,
        };
        tasks.push(tokio::spawn(async move { large(&url, &client, &payloads, over_flight, &tally).await }));
    }
    for i in 0..shape.small_producers {
        let (url, client, payloads, tally) = (url.to_owned(), client.clone(), payloads.clone(), tally.clone());
        tasks.push(tokio::spawn(async move { small(&url, &client, &payloads, i, &tally).await }));
    }
    let upload = (shape.upload_bytes > 0).then(|| {
        let (url, client, payloads, tally) = (url.to_owned(), client.clone(), payloads.clone(), tally.clone());
        let bytes = shape.upload_bytes;
        tokio::spawn(async move { upload(&url, &client, &payloads, bytes, &tally).await })
    });
    let deadline = tokio::time::Instant::from_std(started + shape.duration);
    while tokio::time::Instant::now() < deadline && !tally.stopping() {
        tokio::time::sleep(Duration::from_millis(100).min(deadline - tokio::time::Instant::now())).await;
    }
    if let Some(upload) = upload {
        let _ = upload.await;
    }
    tally.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    started.elapsed()
}

async fn large(url: &str, client: &reqwest::Client, payloads: &Payloads, over_flight: bool, tally: &Tally) {
    let mut flight = None;
    while !tally.stopping() {
        if over_flight {
            let (acked, failure) = put(url, &mut flight, payloads.flight_large.clone()).await;
            tally.record(FLIGHT_LARGE, acked, failure).await;
        } else {
            let body = reqwest::Body::from(payloads.http_large.clone());
            let (acked, failure) = split(post(client, url, STREAMS[HTTP_LARGE], body).await);
            tally.record(HTTP_LARGE, acked, failure).await;
        }
    }
}

async fn small(url: &str, client: &reqwest::Client, payloads: &Payloads, producer: usize, tally: &Tally) {
    let mut flight = None;
    let mut next = producer;
    while !tally.stopping() {
        next = (next + 1) % payloads.small_http.len();
        let sent = Instant::now();
        let (stream, (acked, failure)) = if producer % 2 == 1 {
            (SMALL_FLIGHT, put(url, &mut flight, payloads.small_flight[next].clone()).await)
        } else {
            let body = reqwest::Body::from(payloads.small_http[next].clone());
            (SMALL_HTTP, split(post(client, url, STREAMS[SMALL_HTTP], body).await))
        };
        if failure.is_none() {
            tally.small_latencies.lock().expect("lock").push(sent.elapsed());
        }
        tally.record(stream, acked, failure).await;
    }
}

/// One streamed upload of about `bytes`, sent message by message as the server reads it; retried (at
/// most three times) only after an overload answer, which rolled it back.
async fn upload(url: &str, client: &reqwest::Client, payloads: &Payloads, bytes: u64, tally: &Tally) {
    let per_batch =
        payloads.upload_batches.iter().map(|b| b.len() as u64).sum::<u64>() / payloads.upload_batches.len() as u64;
    let batches = bytes.div_ceil(per_batch.max(1)) as usize;
    let mut pieces = vec![payloads.upload_header.clone()];
    pieces.extend(payloads.upload_batches.iter().cycle().take(batches).cloned());
    pieces.push(payloads.upload_end.clone());
    let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
    let started = Instant::now();
    for attempt in 1..=3 {
        if tally.dead.load(Ordering::Relaxed) {
            return;
        }
        let stream = futures::stream::iter(pieces.clone().into_iter().map(Ok::<_, std::io::Error>));
        let (acked, failure) = split(post(client, url, STREAMS[UPLOAD], reqwest::Body::wrap_stream(stream)).await);
        let overloaded = matches!(failure, Some(Failure::Overloaded));
        let done = failure.is_none();
        tally.record(UPLOAD, acked, failure).await;
        if done {
            let outcome = UploadOutcome { rows: acked, bytes: total, elapsed: started.elapsed(), attempts: attempt };
            *tally.upload.lock().expect("lock") = Some(outcome);
        }
        if !overloaded {
            return;
        }
    }
}

fn split(result: Result<u64, Failure>) -> (u64, Option<Failure>) {
    match result {
        Ok(rows) => (rows, None),
        Err(failure) => (0, Some(failure)),
    }
}

/// `POST /ingest/{stream}`: the committed rows, or why not.
async fn post(client: &reqwest::Client, url: &str, stream: &str, body: reqwest::Body) -> Result<u64, Failure> {
    let response = client
        .post(format!("{url}/ingest/{stream}"))
        .header("content-type", "application/vnd.apache.arrow.stream")
        .body(body)
        .send()
        .await
        .map_err(|e| Failure::Other(format!("{e:?}")))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| Failure::Other(format!("reading the answer: {e}")))?;
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && text.contains("overloaded") {
        return Err(Failure::Overloaded);
    }
    if !status.is_success() {
        return Err(Failure::Other(format!("HTTP {status}: {text}")));
    }
    let report: serde_json::Value = serde_json::from_str(&text).map_err(|e| Failure::Other(format!("{e}: {text}")))?;
    report["rows"].as_u64().ok_or_else(|| Failure::Other(format!("no rows in {text}")))
}

/// One `DoPut` on the producer's connection (made again after a failure): the rows its acks say were
/// committed (its last `rows_total`), even if the call then failed.
async fn put(url: &str, client: &mut Option<FlightClient>, messages: Vec<FlightData>) -> (u64, Option<Failure>) {
    let connection = match client {
        Some(connection) => connection,
        None => match connect(url).await {
            Ok(connection) => client.insert(connection),
            Err(e) => return (0, Some(Failure::Other(format!("connecting: {e:#}")))),
        },
    };
    let mut acked = 0;
    let failure = match connection.do_put(futures::stream::iter(messages.into_iter().map(Ok))).await {
        Err(e) => Some(e),
        Ok(mut acks) => loop {
            match acks.next().await {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(put)) => match serde_json::from_slice::<serde_json::Value>(&put.app_metadata) {
                    Ok(ack) => acked = ack["rows_total"].as_u64().unwrap_or(acked),
                    Err(e) => break Some(FlightError::ProtocolError(format!("ack: {e}"))),
                },
            }
        },
    };
    let failure = failure.map(|e| {
        *client = None;
        match &e {
            FlightError::Tonic(status) if status.code() == tonic::Code::ResourceExhausted => Failure::Overloaded,
            _ => Failure::Other(e.to_string()),
        }
    });
    (acked, failure)
}

async fn connect(url: &str) -> anyhow::Result<FlightClient> {
    let channel = Channel::from_shared(url.to_owned())?.connect().await.context("Flight connection")?;
    Ok(FlightClient::new(channel))
}
