//! How `DoPut` messages leave tonic's receive buffer: each `FlightData` is copied once, into memory where
//! its body starts 64-byte aligned, so the columns can be read in place (see `put::decode`).
//!
//! With tonic's usual prost codec, `data_body` is a slice of the receive buffer at whatever offset the
//! protobuf framing leaves it: arrow-ipc would copy every misaligned column into fresh memory, and the
//! receive buffer, still referenced by the columns it did not copy, would be reallocated for the next
//! message. Here the receive buffer is reused from message to message, as HTTP's is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::buffer::MutableBuffer;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{FlightData, PutResult};
use bytes::{Buf, Bytes};
use futures::StreamExt;
use futures::future::BoxFuture;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstEncoder;

use super::status::status;
use super::{BoxStream, FlightFront};
use crate::app::WireCounter;
use crate::error::IngestError;

/// Arrow's buffer alignment (arrow-rs writers pad every buffer of a body to it).
const ALIGNMENT: usize = 64;

/// `FlightData.data_body`'s protobuf field number.
const DATA_BODY_FIELD: u64 = 1000;

/// Serves one `DoPut` call: tonic's gRPC framing, the aligned decoder, then [`FlightFront::do_put`].
/// A call whose first bytes take longer than the idle timeout ends `DEADLINE_EXCEEDED` (`idle_timeout`)
/// there: Flight SQL waits for the first message to learn what the call is, and would wait for ever
/// (later messages have their deadline in the ingest loop).
pub async fn do_put(
    front: Arc<FlightFront>,
    max_message: usize,
    idle_timeout: Duration,
    request: axum::extract::Request,
) -> axum::http::Response<tonic::body::Body> {
    let (mut parts, body) = request.into_parts();
    let mut data = body.into_data_stream();
    let Ok(first) = tokio::time::timeout(idle_timeout, data.next()).await else {
        return status(&IngestError::IdleTimeout { seconds: idle_timeout.as_secs() }).into_http();
    };
    // The idle timeout watches every byte that arrives, not only whole messages (see `Arrivals`).
    let arrivals = Arrivals::default();
    parts.extensions.insert(arrivals.clone());
    let counted = futures::stream::iter(first).chain(data).inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            arrivals.0.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from_stream(counted));
    let mut grpc = tonic::server::Grpc::new(PutCodec).apply_max_message_size_config(Some(max_message), None);
    grpc.streaming(DoPut(front), request).await
}

/// The bytes of a `DoPut`'s body so far, as they arrive (a request extension).
#[derive(Clone, Default)]
pub(super) struct Arrivals(pub Arc<AtomicU64>);

impl Arrivals {
    /// The call's byte counter for the ingest loop: whole messages counted, every byte watched.
    pub(super) fn wire_counter<T>(request: &tonic::Request<T>) -> WireCounter {
        request
            .extensions()
            .get::<Self>()
            .map_or_else(WireCounter::default, |arrivals| WireCounter::with_arrivals(arrivals.0.clone()))
    }
}

struct DoPut(Arc<FlightFront>);

impl tonic::server::StreamingService<FlightData> for DoPut {
    type Response = PutResult;
    type ResponseStream = BoxStream<PutResult>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<FlightData>>) -> Self::Future {
        let front = self.0.clone();
        Box::pin(async move { front.do_put(request).await })
    }
}

/// `FlightData` in through [`AlignedDecoder`], `PutResult` out through prost as usual.
struct PutCodec;

impl Codec for PutCodec {
    type Encode = PutResult;
    type Decode = FlightData;
    type Encoder = ProstEncoder<PutResult>;
    type Decoder = AlignedDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        AlignedDecoder
    }
}

struct AlignedDecoder;

impl Decoder for AlignedDecoder {
    type Item = FlightData;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<FlightData>, Status> {
        // tonic hands over one whole message, in one slice of its buffer.
        let message = if src.chunk().len() == src.remaining() {
            let copy = aligned_copy(src.chunk());
            src.advance(src.remaining());
            copy
        } else {
            let whole = src.copy_to_bytes(src.remaining());
            aligned_copy(&whole)
        };
        FlightData::decode(message)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("invalid FlightData message: {e}")))
    }
}

/// A copy of an encoded `FlightData` placed so that its `data_body` starts on an [`ALIGNMENT`] boundary.
/// Decoding it slices the fields out of the copy without copying again.
pub(super) fn aligned_copy(message: &[u8]) -> Bytes {
    let pad = body_offset(message).map_or(0, |at| at.next_multiple_of(ALIGNMENT) - at);
    // `MutableBuffer` allocations start on a 64-byte boundary.
    let mut buffer = MutableBuffer::with_capacity(pad + message.len());
    buffer.extend_zeros(pad);
    buffer.extend_from_slice(message);
    Bytes::from_owner(Owned(buffer)).slice(pad..)
}

/// Lets [`Bytes`] own an arrow allocation.
struct Owned(MutableBuffer);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Where `data_body`'s bytes start in an encoded `FlightData`; `None` if it has none or is malformed (the
/// decoder then reports what is wrong).
fn body_offset(message: &[u8]) -> Option<usize> {
    let mut rest = message;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        match key & 7 {
            0 => {
                varint(&mut rest)?;
            }
            1 => rest = rest.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut rest)?).ok()?;
                if key >> 3 == DATA_BODY_FIELD {
                    return Some(message.len() - rest.len());
                }
                rest = rest.get(len..)?;
            }
            5 => rest = rest.get(4..)?,
            _ => return None,
        }
    }
    None
}

/// A protobuf base-128 varint.
fn varint(rest: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = rest.split_first()?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flight_data(header: usize, metadata: usize, body: usize) -> FlightData {
        FlightData {
            flight_descriptor: None,
            data_header: vec![1; header].into(),
            app_metadata: vec![2; metadata].into(),
            data_body: (0..body).map(|i| i as u8).collect::<Vec<_>>().into(),
        }
    }

    #[test]
    fn bodies_come_out_aligned_and_intact_whatever_precedes_them() {
        for (header, metadata, body) in [(0, 0, 1), (3, 0, 64), (200, 17, 1000), (70_000, 5, 300_000), (9, 0, 0)] {
            let sent = flight_data(header, metadata, body);
            let decoded = FlightData::decode(aligned_copy(&sent.encode_to_vec())).unwrap();
            assert_eq!(decoded, sent);
            if body > 0 {
                assert_eq!(decoded.data_body.as_ptr() as usize % ALIGNMENT, 0, "{header}/{metadata}/{body}");
            }
        }
    }

    #[test]
    fn the_body_offset_is_found_past_every_other_field() {
        let sent = FlightData {
            flight_descriptor: Some(arrow_flight::FlightDescriptor::new_path(vec!["s".into()])),
            ..flight_data(10, 10, 10)
        };
        let encoded = sent.encode_to_vec();
        let at = body_offset(&encoded).unwrap();
        assert_eq!(&encoded[at..], &sent.data_body[..]);
        assert_eq!(body_offset(&flight_data(10, 10, 0).encode_to_vec()), None);
        // Garbage has no offset; truncation is reported by decoding.
        assert_eq!(body_offset(&[0xff; 16]), None);
        assert!(FlightData::decode(aligned_copy(&encoded[..encoded.len() - 5])).is_err());
    }
}
