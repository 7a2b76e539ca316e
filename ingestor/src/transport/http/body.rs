//! A request body as a stream of decompressed bytes, counting and limiting what came over the wire.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_compression::tokio::bufread::{GzipDecoder, Lz4Decoder, ZstdDecoder};
use axum::body::BodyDataStream;
use bytes::Bytes;
use futures::Stream;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::oneshot;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::app::WireCounter;
use crate::error::IngestError;

/// Read size for decompressed output: large enough to keep per-chunk overhead negligible.
const DECOMPRESSED_CHUNK: usize = 256 * 1024;

/// Largest zstd window a body may need, as a power of two: 16 MiB, what every level up to 19 uses. A
/// frame may declare up to 2 GiB, which the decoder would allocate outside the memory budget; larger
/// windows (levels 20–22, `--long`) are refused as invalid encoding.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Whole-body compression named by `Content-Encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentEncoding {
    Identity,
    Zstd,
    Lz4,
    Gzip,
}

impl ContentEncoding {
    pub fn from_header(value: Option<&str>) -> Result<Self, IngestError> {
        let Some(raw) = value else {
            return Ok(Self::Identity);
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Self::Identity),
            "zstd" => Ok(Self::Zstd),
            "lz4" => Ok(Self::Lz4),
            "gzip" | "x-gzip" => Ok(Self::Gzip),
            _ => Err(IngestError::UnsupportedEncoding(raw.to_owned())),
        }
    }
}

/// An [`IngestError`] carried through `io::Error` so it survives the decompressors unchanged.
#[derive(Debug)]
struct Carried(IngestError);

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Carried {}

/// The body's bytes after `encoding` is undone. `wire_bytes` counts what arrived; more than `limit`
/// of it ends the stream with [`IngestError::BodyTooLarge`].
pub fn decoded_bytes(
    body: Returning<BodyDataStream>,
    encoding: ContentEncoding,
    limit: u64,
    wire_bytes: WireCounter,
) -> BoxStream<'static, Result<Bytes, IngestError>> {
    let wire = body.map(move |frame| {
        let frame = frame.map_err(|e| carried(IngestError::BodyRead(e.to_string())))?;
        let total = wire_bytes.add(frame.len() as u64);
        if total > limit {
            return Err(carried(IngestError::BodyTooLarge { limit }));
        }
        Ok(frame)
    });
    let name = match encoding {
        ContentEncoding::Identity => return wire.map(|r| r.map_err(uncarry("identity"))).boxed(),
        ContentEncoding::Zstd => "zstd",
        ContentEncoding::Lz4 => "lz4",
        ContentEncoding::Gzip => "gzip",
    };
    let reader = StreamReader::new(wire);
    let decoded: BoxStream<'static, io::Result<Bytes>> = match encoding {
        ContentEncoding::Zstd => {
            let window = async_compression::zstd::DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX);
            let mut decoder = ZstdDecoder::with_params(reader, &[window]);
            decoder.multiple_members(true);
            ReaderStream::with_capacity(decoder, DECOMPRESSED_CHUNK).boxed()
        }
        ContentEncoding::Gzip => {
            let mut decoder = GzipDecoder::new(reader);
            decoder.multiple_members(true);
            ReaderStream::with_capacity(decoder, DECOMPRESSED_CHUNK).boxed()
        }
        _ => ReaderStream::with_capacity(Lz4Decoder::new(reader), DECOMPRESSED_CHUNK).boxed(),
    };
    decoded.map(move |r| r.map_err(uncarry(name))).boxed()
}

/// A stream that hands itself back through `back` when it is dropped, so that what is left of a request
/// body can still be read after the code reading it gave up (see [`linger`]).
pub struct Returning<S> {
    inner: Option<S>,
    back: Option<oneshot::Sender<S>>,
}

/// `stream`, and where it comes back once dropped.
pub fn returning<S>(stream: S) -> (Returning<S>, oneshot::Receiver<S>) {
    let (back, returned) = oneshot::channel();
    (Returning { inner: Some(stream), back: Some(back) }, returned)
}

impl<S: Stream + Unpin> Stream for Returning<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        match self.inner.as_mut() {
            Some(inner) => inner.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

impl<S> Drop for Returning<S> {
    fn drop(&mut self) {
        if let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) {
            let _ = back.send(inner);
        }
    }
}

/// How long, and how much of it, the rest of a refused request's body is read and dropped before the
/// answer: an HTTP/1.1 client sends its whole body before it reads the answer, and a connection closed
/// under it shows as a broken pipe instead of the error (and its `Retry-After`).
const LINGER: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 1 << 30;

/// Reads what is left of a body (come back through [`returning`]) and drops it, within [`LINGER`] and
/// [`LINGER_BYTES`].
pub async fn linger(returned: oneshot::Receiver<BodyDataStream>) {
    if let Ok(rest) = returned.await {
        drain(rest, LINGER_BYTES).await;
    }
}

/// Reads up to `max_bytes` of `body` within [`LINGER`] and drops them.
pub async fn drain(mut body: BodyDataStream, max_bytes: u64) {
    let mut read = 0u64;
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(frame)) = body.next().await {
            read += frame.len() as u64;
            if read > max_bytes {
                break;
            }
        }
    })
    .await;
}

fn carried(error: IngestError) -> io::Error {
    io::Error::other(Carried(error))
}

/// Our own errors come back out as they went in; anything else is the decompressor's complaint.
fn uncarry(encoding: &'static str) -> impl Fn(io::Error) -> IngestError {
    move |error| match error.into_inner() {
        Some(inner) => match inner.downcast::<Carried>() {
            Ok(carried) => carried.0,
            Err(other) => IngestError::InvalidEncoding(format!("cannot decompress the {encoding} body: {other}")),
        },
        None => IngestError::InvalidEncoding(format!("cannot decompress the {encoding} body")),
    }
}
