//! Arrow Flight `DoPut` from the client side: one call with a `PATH [stream]` descriptor, the server's
//! JSON acknowledgements read as they come.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, FlightDescriptor};
use arrowport_api::{Ack, ERROR_CODE_METADATA};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::progress::Progress;
use super::tls::{self, Tls};
use super::{Error, root_cause};

/// The server a `DoPut` goes to, and how: the token it sends, the TLS settings for `https://`.
pub struct Target<'a> {
    pub server: &'a str,
    pub token: Option<&'a str>,
    pub tls: &'a Tls,
}

/// Sends `batches` to `stream` in one `DoPut` and returns the rows the server committed (the last
/// ack's `rows_total`). The server commits at the stream's flush thresholds and once the stream ends;
/// dropping the future before cancels the call, which rolls back what is not yet committed.
pub async fn put<S>(
    target: Target<'_>,
    stream: &str,
    schema: SchemaRef,
    options: IpcWriteOptions,
    batches: S,
    progress: Arc<Progress>,
) -> Result<u64, Error>
where
    S: Stream<Item = RecordBatch> + Send + 'static,
{
    let Target { server, token, tls } = target;
    let mut endpoint = Channel::from_shared(server.to_owned())
        .map_err(|error| Error::ServerUrl { url: server.to_owned(), message: error.to_string() })?;
    if server.starts_with("https://") {
        let mut config = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &tls.ca {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).map_err(|error| tls::invalid("TLS settings", root_cause(&error)))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| Error::Unreachable { url: server.to_owned(), message: root_cause(&error) })?;
    let data = FlightDataEncoderBuilder::new()
        .with_options(options)
        .with_schema(schema)
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![stream.to_owned()])))
        .build(batches.map(Ok))
        .inspect_ok(move |data| progress.sent(data.data_header.len() + data.data_body.len()));
    let mut client = FlightClient::new(channel);
    if let Some(token) = token {
        client
            .add_header("authorization", &format!("Bearer {token}"))
            .map_err(|error| Error::Protocol { url: server.to_owned(), message: error.to_string() })?;
    }
    let mut acks = client.do_put(data).await.map_err(|error| refused(server, error))?;
    let mut rows_total = 0;
    while let Some(result) = acks.next().await {
        let result = result.map_err(|error| refused(server, error))?;
        let ack: Ack = serde_json::from_slice(&result.app_metadata).map_err(|error| Error::Protocol {
            url: server.to_owned(),
            message: format!("an acknowledgement that is not Arrowport's JSON: {error}"),
        })?;
        rows_total = ack.rows_total;
    }
    Ok(rows_total)
}

/// The gRPC status and Arrowport's code (the `x-arrowport-code` trailer) of a failed call.
fn refused(server: &str, error: FlightError) -> Error {
    match error {
        FlightError::Tonic(status) => Error::FlightStatus {
            status: grpc_name(status.code()),
            code: status.metadata().get(ERROR_CODE_METADATA).and_then(|v| v.to_str().ok()).map(str::to_owned),
            message: status.message().to_owned(),
        },
        other => Error::Protocol { url: server.to_owned(), message: other.to_string() },
    }
}

/// `FailedPrecondition` → `FAILED_PRECONDITION`, as gRPC documents its codes.
fn grpc_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_codes_are_named_as_grpc_documents_them() {
        assert_eq!(super::grpc_name(tonic::Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(super::grpc_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(super::grpc_name(tonic::Code::Ok), "OK");
    }
}
