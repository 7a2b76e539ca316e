//! Streams as flights: `ListFlights`, `GetFlightInfo`, `GetSchema` and `DoGet` by stream name.

use std::collections::HashSet;

use arrow::datatypes::Schema;
use arrow_flight::{FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, SchemaAsIpc, SchemaResult, Ticket};
use arrow_ipc::writer::IpcWriteOptions;

use super::{BoxStream, reply};
use crate::app::App;
use crate::error::IngestError;
use crate::query::TableInfo;
use crate::routing::Route;

/// Every stream with a route or a table: configured ones, ones written since start, and tables written
/// earlier (listed under their own name, which is the stream that auto-routes to them).
pub async fn list(app: &App) -> Result<Vec<FlightInfo>, IngestError> {
    let tables = app.queries().tables().await?;
    let mut covered = HashSet::new();
    let mut flights = Vec::new();
    for stream in app.streams_report().streams {
        let table = tables.iter().find(|t| t.name.eq_ignore_ascii_case(&stream.table));
        covered.insert(stream.table.to_lowercase());
        flights.push(flight_info(&stream.stream, table)?);
    }
    for table in tables.iter().filter(|t| !covered.contains(&t.name.to_lowercase())) {
        flights.push(flight_info(&table.name, Some(table))?);
    }
    Ok(flights)
}

/// A stream's flight: its table's schema and row count, and the ticket that reads it.
pub async fn stream_info(app: &App, stream: &str) -> Result<FlightInfo, IngestError> {
    let (route, table) = resolve(app, stream).await?;
    flight_info(&route.stream, table.as_ref())
}

pub async fn stream_schema(app: &App, stream: &str) -> Result<SchemaResult, IngestError> {
    let (_, table) = resolve(app, stream).await?;
    let empty = Schema::empty();
    let schema = table.as_ref().map_or(&empty, |t| t.schema.as_ref());
    SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into().map_err(|e| IngestError::Database(format!("{e}")))
}

/// The stream's whole table, compressed as the stream is configured.
pub async fn read_stream(app: &App, stream: &str) -> Result<BoxStream<FlightData>, IngestError> {
    let (route, table) = resolve(app, stream).await?;
    let table = table.ok_or_else(|| IngestError::NoData(route.stream.clone()))?;
    let result = app.queries().read_table(&table.name).await?;
    Ok(reply::query_reply(result, route.compression))
}

/// The route and, if it exists, the table. A stream that is neither configured nor written is unknown.
async fn resolve(app: &App, stream: &str) -> Result<(Route, Option<TableInfo>), IngestError> {
    let route = app.routes().resolve(stream)?;
    let table = app.queries().table(&route.table).await?;
    if table.is_none() && !route.configured {
        return Err(IngestError::NoData(route.stream));
    }
    Ok((route, table))
}

fn flight_info(stream: &str, table: Option<&TableInfo>) -> Result<FlightInfo, IngestError> {
    let empty = Schema::empty();
    let schema = table.map_or(&empty, |t| t.schema.as_ref());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| IngestError::Database(format!("cannot encode the schema of {stream:?}: {e}")))?
        .with_descriptor(FlightDescriptor::new_path(vec![stream.to_owned()]))
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(stream.to_owned())))
        .with_total_records(table.map_or(0, |t| t.rows as i64))
        .with_total_bytes(-1);
    Ok(info)
}
