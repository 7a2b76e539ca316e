//! `DoPut`: Flight data into the core's ingest loop.
//!
//! A plain-Flight `DoPut` names its stream with a `PATH` descriptor; one call may be one batch or hours
//! of them. The core commits at the stream's flush thresholds and at the end; each commit is
//! acknowledged with a `PutResult` (its JSON [`Ack`] in `app_metadata`) before the next one starts, so
//! a producer knows exactly what is durable. Flight SQL bulk ingest ([`super::sql`]) uses the same
//! messages, committed once at the end.

use std::sync::Arc;

use arrow_flight::sql::Any;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::{FlightData, PutResult};
use arrowport_api::{Ack, IDEMPOTENCY_KEY_HEADER};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::message::raw_message;
use super::receive::Arrivals;
use super::status::status;
use super::{BoxStream, authorize_write, is_path, path_stream};
use crate::app::{App, Commits, Incoming, IngestRequest, WireCounter};
use crate::budget::{MemoryBudget, Reservation};
use crate::error::IngestError;
use crate::telemetry::Protocol;

/// Acks buffered per `DoPut`; a producer that does not read them slows down rather than piling them up.
const ACK_DEPTH: usize = 16;

/// A `DoPut` whose descriptor is not a Flight SQL command: a `PATH` naming a stream, or an error.
pub async fn put_stream(
    app: &Arc<App>,
    mut request: Request<PeekableFlightDataStream>,
    command: Any,
) -> Result<Response<BoxStream<PutResult>>, Status> {
    let descriptor = match request.get_mut().peek().await {
        Some(Ok(first)) => first.flight_descriptor.clone().unwrap_or_default(),
        Some(Err(status)) => return Err(status.clone()),
        None => return Err(Status::invalid_argument("the DoPut carried no data")),
    };
    if !is_path(&descriptor) {
        return Err(Status::invalid_argument(format!(
            "unknown command {:?}: DoPut takes a PATH descriptor naming a stream, or a Flight SQL command",
            command.type_url
        )));
    }
    let stream = path_stream(&descriptor)?.to_owned();
    authorize_write(app, &request, Protocol::Flight, &stream)?;
    let key = idempotency_key(request.metadata());
    let asked = IngestRequest { key, ..IngestRequest::new(Protocol::Flight, stream, Commits::AtFlushThresholds) };
    let ingest = app.start_ingest(asked).await.map_err(|e| status(&e))?;
    let (acks, replies) = mpsc::channel(ACK_DEPTH);
    let failed = acks.clone();
    let max_message = app.limits().max_message_bytes.0;
    let budget = app.budget().clone();
    let wire = Arrivals::wire_counter(&request);
    let work = tokio::spawn(async move {
        let data = messages(request.into_inner(), wire.clone(), max_message, budget);
        if let Err(error) = ingest.run(data, &wire, Some(&acks)).await {
            let _ = acks.send(Err(error)).await;
        }
    });
    // A panic must still end the call with an error, not with a clean end that looks like success.
    tokio::spawn(async move {
        if let Err(join) = work.await {
            tracing::error!(%join, "A DoPut task failed; its uncommitted data was rolled back.");
            let error = IngestError::Database("the ingester failed on this data; nothing uncommitted was kept".into());
            let _ = failed.send(Err(error)).await;
        }
    });
    let replies = ReceiverStream::new(replies).map(|reply| match reply {
        Ok(ack) => Ok(put_result(&ack)),
        Err(error) => Err(status(&error)),
    });
    Ok(Response::new(Box::pin(replies)))
}

/// The `idempotency-key` of a call's metadata (see [`IngestRequest::key`]); a key that is not text is
/// passed on as it is, to be refused with a clear error.
pub fn idempotency_key(metadata: &MetadataMap) -> Option<String> {
    metadata.get(IDEMPOTENCY_KEY_HEADER).map(|key| String::from_utf8_lossy(key.as_bytes()).into_owned())
}

/// The IPC messages of a call's `FlightData`, their bytes counted on `wire`.
///
/// tonic reads each message whole into a receive buffer of the call's own, which it keeps and reuses for
/// the next, and grows by doubling: the call holds room in `budget` for twice the largest message so far,
/// until it ends (measured: a 17 MiB message left a 36 MiB buffer). The room is taken once the message is
/// there, since tonic reads it before the service sees its length; a call that cannot get it fails, as
/// one whose batch does not fit.
pub fn messages<S>(
    data: S,
    wire: WireCounter,
    max_message: u64,
    budget: MemoryBudget,
) -> impl Stream<Item = Result<Incoming, IngestError>>
where
    S: Stream<Item = Result<FlightData, Status>> + Unpin,
{
    let state = (data, wire, budget, None::<Reservation>);
    futures::stream::try_unfold(state, move |(mut stream, wire, budget, mut receive_buffer)| async move {
        let Some(data) = stream.next().await else {
            return Ok(None);
        };
        let data = data.map_err(|status| receive_error(&status, max_message))?;
        let bytes = (data.data_header.len() + data.data_body.len() + data.app_metadata.len()) as u64;
        wire.add(bytes);
        let buffer = 2 * bytes;
        if buffer > receive_buffer.as_ref().map_or(0, Reservation::bytes) {
            budget.resize(&mut receive_buffer, buffer).await?;
        }
        let incoming = Incoming { message: raw_message(&data), request_id: request_id(&data.app_metadata), room: None };
        Ok(Some((incoming, (stream, wire, budget, receive_buffer))))
    })
}

fn put_result(ack: &Ack) -> PutResult {
    let metadata = serde_json::to_vec(ack).expect("an Ack always serialises");
    PutResult { app_metadata: metadata.into() }
}

/// The transport failed: the message was too large for gRPC, or the client went away.
fn receive_error(status: &Status, max_message: u64) -> IngestError {
    if status.code() == tonic::Code::OutOfRange {
        IngestError::MessageTooLarge { limit: max_message }
    } else {
        IngestError::BodyRead(status.message().to_owned())
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
}
