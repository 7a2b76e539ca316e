//! Arrow data out: query results and table reads encoded as FlightData, compressed as configured.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::FlightData;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrowport_config::Compression;
use futures::{StreamExt, TryStreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::BoxStream;
use super::status::status;
use crate::query::QueryResult;

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
        .with_options(arrowport_api::ipc_write_options(&compression))
        .with_schema(schema)
        .build(batches)
        .map_err(Status::from)
        .boxed()
}
