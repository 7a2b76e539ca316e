//! Flight SQL, as much as ADBC and JDBC drivers need: bulk ingest, read-only queries, catalog metadata.
//! A `DoPut` that is no Flight SQL command reaches [`FlightSqlService::do_put_fallback`] (Flight SQL has
//! to peek at a call's first message to tell), which hands it to [`super::put`].

use std::sync::Arc;

use arrow::datatypes::Schema;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{DoPutError, FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    Any, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandStatementIngest, CommandStatementQuery, ProstMessageExt, SqlInfo, SqlSupportedTransaction,
    TableExistsOption, TableNotExistOption, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use arrowport_config::{Compression, CompressionAlgorithm};
use prost::Message;
use tonic::{Request, Response, Status};

use super::receive::Arrivals;
use super::status::status;
use super::{authorize_write, put, reply};
use crate::app::{App, Commits, IngestRequest};
use crate::error::IngestError;
use crate::load::{IfExists, TableMode};
use crate::telemetry::Protocol;
/// The one schema Arrowport writes to (DuckDB's default).
const SCHEMA: &str = "main";
const TABLE_TYPE: &str = "BASE TABLE";

pub struct SqlService {
    app: Arc<App>,
    info: SqlInfoData,
}

impl SqlService {
    pub fn new(app: Arc<App>) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Arrowport");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "58");
        info.append(SqlInfo::FlightSqlServerReadOnly, false);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, SqlSupportedTransaction::None as i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::FlightSqlServerBulkIngestion, true);
        info.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        let info = info.build().expect("static SqlInfo values always build");
        Self { app, info }
    }

    /// How a bulk ingest writes: the table name is a stream name, routed like any other (by the core).
    fn ingest_mode(&self, command: &CommandStatementIngest) -> Result<TableMode, IngestError> {
        if command.temporary {
            return Err(IngestError::InvalidRequest("temporary tables are not supported".to_owned()));
        }
        if command.transaction_id.is_some() {
            return Err(IngestError::InvalidRequest(
                "transactions are not supported; each ingest is its own transaction".to_owned(),
            ));
        }
        let catalog = self.app.queries().catalog();
        if let Some(requested) = command.catalog.as_deref().filter(|c| *c != catalog) {
            return Err(IngestError::InvalidRequest(format!(
                "catalog {requested:?} does not exist; the only catalog is {catalog:?}"
            )));
        }
        if let Some(requested) = command.schema.as_deref().filter(|s| *s != SCHEMA) {
            return Err(IngestError::InvalidRequest(format!(
                "schema {requested:?} does not exist; the only schema is {SCHEMA:?}"
            )));
        }
        let mode = match &command.table_definition_options {
            None => TableMode::default(),
            Some(options) => {
                let create = match TableNotExistOption::try_from(options.if_not_exist) {
                    Ok(TableNotExistOption::Create) => true,
                    Ok(TableNotExistOption::Fail) => false,
                    _ => return Err(IngestError::InvalidRequest("if_not_exist must be CREATE or FAIL".to_owned())),
                };
                let if_exists = match TableExistsOption::try_from(options.if_exists) {
                    Ok(TableExistsOption::Append) => IfExists::Append,
                    Ok(TableExistsOption::Fail) => IfExists::Fail,
                    Ok(TableExistsOption::Replace) => IfExists::Replace,
                    _ => {
                        return Err(IngestError::InvalidRequest(
                            "if_exists must be FAIL, APPEND or REPLACE".to_owned(),
                        ));
                    }
                };
                TableMode { create, if_exists }
            }
        };
        Ok(mode)
    }

    fn default_compression(&self) -> Compression {
        self.app.routes().compression
    }
}

/// A FlightInfo whose one endpoint's ticket is `command`, to be answered by `DoGet` on this server.
fn command_info(schema: &Schema, command: Any, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("cannot encode the schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.encode_to_vec())))
        .with_descriptor(descriptor)
        .with_total_records(-1)
        .with_total_bytes(-1);
    Ok(info)
}

fn arrow_status(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

/// Catalog metadata is small: it goes uncompressed.
const METADATA: Compression = Compression { algorithm: CompressionAlgorithm::None, level: None };

#[tonic::async_trait]
impl FlightSqlService for SqlService {
    type FlightService = SqlService;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = self.app.queries().query_schema(&query.query).await.map_err(|e| status(&e))?;
        let ticket = TicketStatementQuery { statement_handle: query.query.into_bytes().into() };
        Ok(Response::new(command_info(&schema, ticket.as_any(), request.into_inner())?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = std::str::from_utf8(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("the statement handle is not UTF-8 SQL"))?;
        let result = self.app.queries().query(sql).await.map_err(|e| status(&e))?;
        Ok(Response::new(reply::query_reply(result, self.default_compression())))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        Ok(Response::new(command_info(&schema, query.as_any(), request.into_inner())?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let batch = query.into_builder(&self.info).build().map_err(arrow_status)?;
        Ok(Response::new(reply::batch_reply(batch, METADATA)))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(command_info(&schema, query.as_any(), request.into_inner())?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(self.app.queries().catalog());
        let batch = builder.build().map_err(arrow_status)?;
        Ok(Response::new(reply::batch_reply(batch, METADATA)))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(command_info(&schema, query.as_any(), request.into_inner())?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(self.app.queries().catalog(), SCHEMA);
        let batch = builder.build().map_err(arrow_status)?;
        Ok(Response::new(reply::batch_reply(batch, METADATA)))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(command_info(&schema, query.as_any(), request.into_inner())?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tables = self.app.queries().tables().await.map_err(|e| status(&e))?;
        let catalog = self.app.queries().catalog();
        let mut builder = query.into_builder();
        for table in &tables {
            builder.append(catalog, SCHEMA, &table.name, TABLE_TYPE, &table.schema).map_err(arrow_status)?;
        }
        let batch = builder.build().map_err(arrow_status)?;
        Ok(Response::new(reply::batch_reply(batch, METADATA)))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = table_types_batch()?.schema();
        Ok(Response::new(command_info(&schema, query.as_any(), request.into_inner())?))
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Ok(Response::new(reply::batch_reply(table_types_batch()?, METADATA)))
    }

    async fn do_put_statement_ingest(
        &self,
        command: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let mode = self.ingest_mode(&command).inspect_err(|error| {
            self.app.refused(Protocol::FlightSql, &command.table, error);
        });
        let mode = mode.map_err(|e| status(&e))?;
        authorize_write(&self.app, &request, Protocol::FlightSql, &command.table)?;
        let key = put::idempotency_key(request.metadata());
        let asked =
            IngestRequest { mode, key, ..IngestRequest::new(Protocol::FlightSql, command.table, Commits::AtEnd) };
        let ingest = self.app.start_ingest(asked).await.map_err(|e| status(&e))?;
        let wire = Arrivals::wire_counter(&request);
        let max_message = self.app.limits().max_message_bytes.0;
        let messages = put::messages(request.into_inner(), wire.clone(), max_message, self.app.budget().clone());
        let report = ingest.run(messages, &wire, None).await.map_err(|e| status(&e))?;
        Ok(report.rows as i64)
    }

    async fn do_put_fallback(
        &self,
        request: Request<PeekableFlightDataStream>,
        message: Any,
    ) -> Result<Response<<Self as FlightService>::DoPutStream>, Status> {
        put::put_stream(&self.app, request, message).await
    }

    /// A `DoPut` without a first message, or whose first message has no descriptor.
    async fn do_put_error_callback(
        &self,
        _request: Request<PeekableFlightDataStream>,
        error: DoPutError,
    ) -> Result<Response<<Self as FlightService>::DoPutStream>, Status> {
        let message = format!("a DoPut starts with a message carrying its flight descriptor ({error})");
        Err(status(&IngestError::InvalidRequest(message)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// The one table type Arrowport has.
fn table_types_batch() -> Result<arrow::array::RecordBatch, Status> {
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field};
    let schema = Schema::new(vec![Field::new("table_type", DataType::Utf8, false)]);
    arrow::array::RecordBatch::try_new(Arc::new(schema), vec![Arc::new(StringArray::from(vec![TABLE_TYPE]))])
        .map_err(arrow_status)
}
