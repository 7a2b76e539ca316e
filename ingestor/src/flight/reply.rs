//! Arrow data out: query results and table reads encoded as FlightData, compressed as configured.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::FlightData;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_ipc::CompressionType;
use arrow_ipc::writer::IpcWriteOptions;
use arrowport_config::{Compression, CompressionAlgorithm};
use futures::{StreamExt, TryStreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{BoxStream, status};
use crate::load::QueryResult;

/// A running query's batches as a `DoGet` reply. Dropping the reply cancels the query.
pub fn query_reply(result: QueryResult, compression: Compression) -> BoxStream<FlightData> {
    let batches = ReceiverStream::new(result.batches).map_err(|error| FlightError::Tonic(Box::new(status(&error))));
    encode(result.schema, batches, compression)
}

/// A reply of batches already in hand (catalog metadata).
pub fn batch_reply(batch: RecordBatch, compression: Compression) -> BoxStream<FlightData> {
    let schema = batch.schema();
    encode(schema, futures::stream::iter([Ok(batch)]), compression)
}

fn encode(
    schema: SchemaRef,
    batches: impl futures::Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    compression: Compression,
) -> BoxStream<FlightData> {
    FlightDataEncoderBuilder::new()
        .with_options(write_options(compression))
        .with_schema(schema)
        .build(batches)
        .map_err(Status::from)
        .boxed()
}

/// IPC options with the configured buffer compression (Arrow IPC has no compression levels).
pub fn write_options(compression: Compression) -> IpcWriteOptions {
    let codec = match compression.algorithm {
        CompressionAlgorithm::Zstd => Some(CompressionType::ZSTD),
        CompressionAlgorithm::Lz4 => Some(CompressionType::LZ4_FRAME),
        CompressionAlgorithm::None => None,
    };
    IpcWriteOptions::default().try_with_compression(codec).expect("the default IPC options (V5) support compression")
}
