//! Arrow Flight `DoPut` producers, with their messages encoded before the clock starts (as the HTTP
//! bodies are), so the figures measure the server rather than the client's encoder.

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, FlightData, FlightDescriptor, PutResult};
use arrow_ipc::CompressionType;
use arrow_ipc::writer::IpcWriteOptions;
use futures::TryStreamExt;
use tonic::transport::Channel;

/// One `DoPut`'s messages: the schema with the stream's descriptor, then one message per batch (whole, as
/// PyArrow sends them).
pub async fn messages(
    stream: &str,
    batches: &[RecordBatch],
    compression: Option<CompressionType>,
) -> anyhow::Result<Vec<FlightData>> {
    let options = IpcWriteOptions::default().try_with_compression(compression)?;
    // The encoder's stream must own its batches (they are cheap, reference-counted clones).
    let owned: Vec<RecordBatch> = batches.to_vec();
    let encoder = FlightDataEncoderBuilder::new()
        .with_options(options)
        .with_max_flight_data_size(usize::MAX)
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![stream.to_owned()])))
        .build(futures::stream::iter(owned.into_iter().map(Ok)));
    Ok(encoder.try_collect().await?)
}

/// A Flight client with a connection of its own.
pub async fn connect(url: &str) -> anyhow::Result<FlightClient> {
    Ok(FlightClient::new(Channel::from_shared(url.to_owned())?.connect().await?))
}

/// The rows of `table` as the server counts them (`GetFlightInfo`), once every answered request is in it.
pub async fn table_rows(url: &str, table: &str) -> anyhow::Result<u64> {
    let info = connect(url).await?.get_flight_info(FlightDescriptor::new_path(vec![table.to_owned()])).await?;
    u64::try_from(info.total_records).context("a row count")
}

/// Sends one `DoPut` on a connection of its own and returns the rows the server acknowledged as committed.
pub async fn put(url: &str, messages: Vec<FlightData>) -> anyhow::Result<u64> {
    put_on(&mut connect(url).await?, messages).await
}

/// Sends one `DoPut` with `client` and returns the rows the server acknowledged as committed.
pub async fn put_on(client: &mut FlightClient, messages: Vec<FlightData>) -> anyhow::Result<u64> {
    let acks: Vec<PutResult> =
        client.do_put(futures::stream::iter(messages.into_iter().map(Ok))).await?.try_collect().await?;
    let last = acks.last().context("the DoPut ended without an ack")?;
    let ack: serde_json::Value = serde_json::from_slice(&last.app_metadata)?;
    ack["rows_total"].as_u64().context("rows_total in the ack")
}
