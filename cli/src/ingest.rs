//! `arrowport ingest STREAM FILE...`: sends files to a running server over HTTP (one request, one
//! transaction) or Arrow Flight (one `DoPut`), batch by batch.
//!
//! Files are read on a thread of their own, at most two batches ahead of the network, so neither a
//! large file nor stdin is ever held whole and reading overlaps with compressing and sending.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::BatchCoalescer;
use arrow::datatypes::SchemaRef;
use arrowport_api::{StreamsReport, ipc_write_options};
use arrowport_config::{Compression, CompressionAlgorithm};
use futures::Stream;
use indicatif::HumanBytes;
use tokio::sync::{mpsc, oneshot};

use super::http_client::HttpServer;
use super::progress::{Progress, Totals};
use super::sources::{self, DEFAULT_BATCH_ROWS, Source};
use super::tls::TlsArgs;
use super::token::TokenArgs;
use super::{CompressionArg, DEFAULT_SERVER, Error, flight_client};

#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Stream to write to; the server routes it to a table (by default one named after the stream).
    pub stream: String,
    /// Files to send: Arrow IPC stream or file, Parquet, CSV with a header row, or JSON lines (.json,
    /// .jsonl, .ndjson). `-` reads an Arrow IPC stream from stdin. All must have the same columns.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Arrowport server to send to.
    #[arg(long, env = "ARROWPORT_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Send with Arrow Flight DoPut: the server commits at the stream's flush thresholds and at the end.
    #[arg(long, conflicts_with = "http")]
    pub flight: bool,
    /// Send with HTTP POST /ingest/STREAM: all files in one transaction, all or nothing (the default).
    #[arg(long)]
    pub http: bool,
    /// Arrow IPC buffer compression [default: what the server advertises for the stream in GET /streams].
    #[arg(long, value_enum)]
    pub compression: Option<CompressionArg>,
    /// Rows per record batch sent: batches are split or combined to this size [default: as read; CSV,
    /// JSON and Parquet are read 65536 rows at a time].
    #[arg(long, value_name = "N")]
    pub batch_rows: Option<NonZeroUsize>,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Reads, sends, and prints a one-line summary on stdout.
pub fn run(args: IngestArgs) -> Result<(), Error> {
    let batch_rows = args.batch_rows.map(NonZeroUsize::get);
    // Everything local is checked before the server is contacted.
    if args.files.iter().filter(|file| file.as_os_str() == "-").count() > 1 {
        return Err(Error::StdinTwice);
    }
    let mut sources = args
        .files
        .iter()
        .map(|file| Source::open(file, batch_rows.unwrap_or(DEFAULT_BATCH_ROWS)))
        .collect::<Result<Vec<_>, _>>()?;
    let schema = sources::align(&mut sources)?;
    let summary = super::runtime()?.block_on(send(&args, sources, schema, batch_rows))?;
    println!("{summary}");
    Ok(())
}

async fn send(
    args: &IngestArgs,
    sources: Vec<Source>,
    schema: SchemaRef,
    batch_rows: Option<usize>,
) -> Result<Summary, Error> {
    let token = args.token.token()?;
    let tls = args.tls.load()?;
    let http = HttpServer::new(&args.server, token.as_deref(), &tls)?;
    let algorithm = match args.compression {
        Some(algorithm) => algorithm.into(),
        None => advertised_compression(&http, &args.stream).await?,
    };
    let options = ipc_write_options(&Compression { algorithm, level: None });
    let progress = Arc::new(Progress::start());
    let (batches, failed) = read_batches(sources, schema.clone(), batch_rows, progress.clone());
    let upload = async {
        if args.flight {
            let target = flight_client::Target { server: &args.server, token: token.as_deref(), tls: &tls };
            flight_client::put(target, &args.stream, schema, options, batches, progress.clone()).await
        } else {
            let report = http.ingest(&args.stream, schema, options, batches, progress.clone()).await;
            report.map(|report| report.rows)
        }
    };
    let outcome = tokio::select! {
        outcome = upload => outcome,
        // A read failed: dropping the upload mid-stream aborts it, so the server rolls back what it has
        // not committed. (A reader that finishes drops its sender unsent, which disables this branch.)
        Ok(error) = failed => Err(error),
    };
    let totals = progress.finish();
    let committed = outcome?;
    if committed != totals.rows {
        return Err(Error::RowsMissing { committed, sent: totals.rows });
    }
    Ok(Summary { stream: args.stream.clone(), flight: args.flight, algorithm, totals })
}

/// The compression the server advertises for `stream`, or its default for streams it does not list.
async fn advertised_compression(http: &HttpServer, stream: &str) -> Result<CompressionAlgorithm, Error> {
    let report: StreamsReport = match http.streams().await {
        Ok(report) => report,
        // A token that may write but not read (`GET /streams` needs the query grant): the server takes
        // any compression, so send with the default.
        Err(Error::Refused { status: 403, .. }) => return Ok(Compression::default().algorithm),
        Err(error @ (Error::Unreachable { .. } | Error::Refused { status: 401, .. })) => return Err(error),
        Err(other) => return Err(Error::CompressionUnknown(other.to_string())),
    };
    let entry = report.streams.iter().find(|entry| entry.stream == stream);
    Ok(entry.map_or(report.compression, |entry| entry.compression).algorithm)
}

/// What the reading thread hands over.
enum Message {
    Batch(RecordBatch),
    Done,
    Failed(Error),
}

/// Reads every source in turn on a thread of its own and yields the batches; the stream ends only
/// after the last source was read to its end. If a read fails, the error comes out of the receiver and
/// the stream never ends: to both transports an ended stream is a complete upload (a Flight call would
/// end gracefully and commit), so the caller drops the upload instead, which aborts it.
fn read_batches(
    sources: Vec<Source>,
    schema: SchemaRef,
    batch_rows: Option<usize>,
    progress: Arc<Progress>,
) -> (impl Stream<Item = RecordBatch> + Send + 'static, oneshot::Receiver<Error>) {
    let (sender, receiver) = mpsc::channel(2);
    // A plain thread, not the runtime's blocking pool: a read stuck on stdin must not keep the
    // process alive after the upload failed.
    std::thread::spawn(move || {
        let last = match read_all(sources, &schema, batch_rows, &sender) {
            Ok(()) => Message::Done,
            Err(error) => Message::Failed(error),
        };
        // The receiver is gone if the upload already ended; nothing is left to tell.
        let _ = sender.blocking_send(last);
    });
    let (fail, failed) = oneshot::channel();
    let batches = futures::stream::unfold((receiver, fail), move |(mut receiver, fail)| {
        let progress = progress.clone();
        async move {
            let error = match receiver.recv().await {
                Some(Message::Batch(batch)) => {
                    progress.batch(&batch);
                    return Some((batch, (receiver, fail)));
                }
                Some(Message::Done) => return None,
                Some(Message::Failed(error)) => error,
                // The thread ended without a last word (it panicked).
                None => Error::ReaderStopped,
            };
            let _ = fail.send(error);
            std::future::pending().await
        }
    });
    (batches, failed)
}

/// Sends every batch of every source, re-chunked to `batch_rows` if given. Stops early, without an
/// error, once the receiver is gone (the upload ended).
fn read_all(
    sources: Vec<Source>,
    schema: &SchemaRef,
    batch_rows: Option<usize>,
    sender: &mpsc::Sender<Message>,
) -> Result<(), Error> {
    let mut coalescer = batch_rows.map(|rows| BatchCoalescer::new(schema.clone(), rows));
    let encode = |error: arrow::error::ArrowError| Error::Encode(error.to_string());
    let send = |batch| sender.blocking_send(Message::Batch(batch)).is_ok();
    for mut source in sources {
        while let Some(batch) = source.next_batch(schema)? {
            let ready = match coalescer.as_mut() {
                None => vec![batch],
                Some(coalescer) => {
                    coalescer.push_batch(batch).map_err(encode)?;
                    completed(coalescer)
                }
            };
            if !ready.into_iter().all(send) {
                return Ok(());
            }
        }
    }
    if let Some(coalescer) = coalescer.as_mut() {
        coalescer.finish_buffered_batch().map_err(encode)?;
        completed(coalescer).into_iter().all(send);
    }
    Ok(())
}

fn completed(coalescer: &mut BatchCoalescer) -> Vec<RecordBatch> {
    std::iter::from_fn(|| coalescer.next_completed_batch()).collect()
}

/// The line printed after a successful upload.
struct Summary {
    stream: String,
    flight: bool,
    algorithm: CompressionAlgorithm,
    totals: Totals,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let Totals { rows, arrow_bytes, wire_bytes, elapsed } = self.totals;
        let seconds = elapsed.as_secs_f64();
        write!(
            f,
            "{}: {rows} rows committed over {} in {seconds:.2} s ({:.0} rows/s); {} sent for {} of Arrow data \
             (ratio {:.2}, {} buffers)",
            self.stream,
            if self.flight { "Flight" } else { "HTTP" },
            rows as f64 / seconds.max(1e-9),
            HumanBytes(wire_bytes),
            HumanBytes(arrow_bytes),
            arrow_bytes as f64 / wire_bytes.max(1) as f64,
            self.algorithm.as_str(),
        )
    }
}
