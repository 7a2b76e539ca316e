//! Arrow Flight and Flight SQL, served from the same router as HTTP (gRPC is HTTP/2 on the same port).
//!
//! Plain Flight names a stream by a one-element `PATH` descriptor (`DoPut`, `GetFlightInfo`,
//! `GetSchema`) or by a ticket holding the stream name (`DoGet`). Flight SQL commands (bulk ingest,
//! read-only queries, catalog metadata) are handled by [`sql::SqlService`]; [`FlightFront`] sends each
//! call to the right one.

mod info;
mod message;
mod put;
mod receive;
mod reply;
mod sql;
mod status;

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse,
    PollInfo, PutResult, SchemaResult, Ticket,
};
use axum::Router;
use axum::extract::{Request as HttpRequest, State};
use axum::middleware::{self, Next};
use axum::routing::post;
use futures::Stream;
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::app::App;
use crate::auth::{self, Identity, PeerName};
use crate::telemetry::Protocol;
use status::status;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Flight SQL's protobuf messages travel as `Any` with type URLs under this prefix.
const FLIGHT_SQL_TYPE_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// The gRPC routes, ready to merge into the HTTP router or to serve on their own port.
pub fn router(app: Arc<App>) -> Router {
    // Slack over the largest batch for the FlightData envelope (header, metadata).
    let max_message = usize::try_from(app.limits().max_message_bytes.0).unwrap_or(usize::MAX).saturating_add(1 << 20);
    let idle_timeout = std::time::Duration::from_secs(app.limits().idle_timeout_seconds);
    let panics = app.clone();
    let front = Arc::new(FlightFront::new(app));
    let service = FlightServiceServer::from_arc(front.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(usize::MAX);
    let name = FlightServiceServer::<FlightFront>::NAME;
    // DoPut takes its own decoder (see `receive`); the generated server answers every other call.
    let do_put = post(move |request| receive::do_put(front.clone(), max_message, idle_timeout, request));
    // Access control in front of every call, DoPut's own route included, before a message is read.
    Router::new()
        .route(&format!("/{name}/DoPut"), do_put)
        .route_service(&format!("/{name}/{{*rpc}}"), service)
        .layer(middleware::from_fn_with_state(panics.clone(), authenticate))
        .layer(super::catch_panics(&panics, panicked))
}

/// Who a call is (its `authorization` metadata, its connection's client certificate), put into its
/// extensions for the handlers' grant checks; or the call ends `UNAUTHENTICATED` before a message is read.
async fn authenticate(State(app): State<Arc<App>>, mut request: HttpRequest, next: Next) -> axum::response::Response {
    let authorization = request.headers().get(axum::http::header::AUTHORIZATION).map(|value| value.as_bytes());
    let peer = request.extensions().get::<PeerName>().map(|peer| peer.0.clone());
    match app.authenticate(authorization, peer.as_deref()) {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(error) => status(&error).into_http(),
    }
}

/// The identity [`authenticate`] found for a call (a call without one is refused: access control fails
/// closed).
fn identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    request.extensions().get::<Identity>().cloned().ok_or_else(|| Status::unauthenticated("no identity"))
}

/// Refuses a call whose identity may not read.
fn authorize_query<T>(app: &App, request: &Request<T>) -> Result<(), Status> {
    app.authorize_query(&identity(request)?).map_err(|e| status(&e))
}

/// Refuses (and counts, as a request of `protocol`) a call whose identity may not write `stream`.
fn authorize_write<T>(app: &App, request: &Request<T>, protocol: Protocol, stream: &str) -> Result<(), Status> {
    app.authorize_write(&identity(request)?, stream).map_err(|error| {
        app.refused(protocol, stream, &error);
        status(&error)
    })
}

/// The answer to a call whose handler panicked: `INTERNAL`, and the server goes on.
fn panicked() -> axum::response::Response {
    tracing::error!("A Flight call panicked; answered INTERNAL. This is a bug: please report it.");
    status::coded(arrowport_api::ErrorCode::Internal, "internal error (the server logged it)").into_http()
}

/// The Flight service: stream operations here, Flight SQL commands in [`sql::SqlService`].
pub struct FlightFront {
    app: Arc<App>,
    sql: sql::SqlService,
}

impl FlightFront {
    fn new(app: Arc<App>) -> Self {
        Self { sql: sql::SqlService::new(app.clone()), app }
    }
}

/// The stream a one-element `PATH` descriptor names.
fn path_stream(descriptor: &FlightDescriptor) -> Result<&str, Status> {
    match descriptor.path.as_slice() {
        [stream] => Ok(stream),
        _ => Err(Status::invalid_argument(format!(
            "a PATH descriptor names one stream, as [\"lineitem\"]; got {:?}",
            descriptor.path
        ))),
    }
}

fn is_path(descriptor: &FlightDescriptor) -> bool {
    descriptor.r#type == DescriptorType::Path as i32
}

/// Whether a ticket carries a Flight SQL command (rather than a stream name).
fn is_sql_ticket(ticket: &Ticket) -> bool {
    arrow_flight::sql::Any::decode(ticket.ticket.as_ref())
        .is_ok_and(|any| any.type_url.starts_with(FLIGHT_SQL_TYPE_PREFIX))
}

#[tonic::async_trait]
impl FlightService for FlightFront {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    /// The caller is authenticated by now (by its `authorization` metadata: `Basic` with the token as the
    /// password, as ADBC's username/password and pyarrow's `authenticate_basic_token` send it, or
    /// `Bearer`). The answer carries `authorization: Bearer <token>` for the client to send from then on.
    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let bearer = request.metadata().get("authorization").and_then(|value| auth::bearer_of(value.as_bytes()));
        let answer = HandshakeResponse { protocol_version: 0, payload: Default::default() };
        let mut response: Response<Self::HandshakeStream> =
            Response::new(Box::pin(futures::stream::iter([Ok(answer)])));
        if let Some(value) = bearer.and_then(|bearer| MetadataValue::try_from(bearer).ok()) {
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn list_flights(&self, request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        authorize_query(&self.app, &request)?;
        let flights = info::list(&self.app).await.map_err(|e| status(&e))?;
        Ok(Response::new(Box::pin(futures::stream::iter(flights.into_iter().map(Ok)))))
    }

    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        authorize_query(&self.app, &request)?;
        if !is_path(request.get_ref()) {
            return FlightService::get_flight_info(&self.sql, request).await;
        }
        let stream = path_stream(request.get_ref())?;
        Ok(Response::new(info::stream_info(&self.app, stream).await.map_err(|e| status(&e))?))
    }

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        authorize_query(&self.app, &request)?;
        FlightService::poll_flight_info(&self.sql, request).await
    }

    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        authorize_query(&self.app, &request)?;
        if !is_path(request.get_ref()) {
            return Err(Status::invalid_argument("GetSchema takes a PATH descriptor naming one stream"));
        }
        let stream = path_stream(request.get_ref())?;
        Ok(Response::new(info::stream_schema(&self.app, stream).await.map_err(|e| status(&e))?))
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        authorize_query(&self.app, &request)?;
        if is_sql_ticket(request.get_ref()) {
            return FlightService::do_get(&self.sql, request).await;
        }
        let stream = std::str::from_utf8(&request.get_ref().ticket)
            .map_err(|_| Status::invalid_argument("a ticket is a stream name (UTF-8) or a Flight SQL ticket"))?;
        let reply = info::read_stream(&self.app, stream).await.map_err(|e| status(&e))?;
        Ok(Response::new(reply))
    }

    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        // Flight SQL peeks at the descriptor; PATH descriptors come back through its fallback. The stream's
        // grant is checked there, once the first message has named it and before any data is decoded.
        FlightService::do_put(&self.sql, request).await
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        authorize_query(&self.app, &request)?;
        FlightService::do_action(&self.sql, request).await
    }

    async fn list_actions(&self, _request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        // No actions are implemented (prepared statements, transactions, cancellation): advertise none, so
        // clients do not try them.
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("DoExchange is not supported: use DoPut to write and DoGet to read"))
    }
}
