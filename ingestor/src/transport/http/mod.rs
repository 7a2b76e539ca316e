//! HTTP: `POST /ingest/{stream}`, `GET /streams`, health, readiness and metrics.
//!
//! An ingest request's body is undone of its `Content-Encoding` ([`body`]), cut into IPC messages
//! ([`framing`]) and handed to the core's ingest loop; errors become a JSON body with the status the
//! error code's table gives.

mod body;
pub mod framing;

use std::sync::Arc;

use arrowport_api::{ErrorBody, ErrorCode, IDEMPOTENCY_KEY_HEADER, IngestReport, REPLAYED_HEADER, StreamsReport};
use axum::extract::{DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};

use crate::app::{App, Commits, Incoming, IngestRequest, WireCounter};
use crate::auth::{Identity, PeerName};
use crate::budget::MemoryBudget;
use crate::error::IngestError;
use crate::telemetry::Protocol;
pub use body::ContentEncoding;
use framing::{IpcDecoder, IpcFormat};

/// All HTTP routes. Ingest and `/streams` go through access control; health, readiness and metrics
/// stay open (probes and Prometheus carry no token).
pub fn router(app: Arc<App>) -> Router {
    let guarded = Router::new()
        .route("/ingest/{stream}", post(ingest))
        .route("/streams", get(streams))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .merge(guarded)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // Bodies are streamed and limited by `limits.max_body_bytes` in the handler, not buffered.
        .layer(DefaultBodyLimit::disable())
        .layer(super::catch_panics(&app, panicked))
        .with_state(app)
}

/// An error as an HTTP answer: the status its code's table gives, and `{"error": {"code", "message"}}`.
fn error_response(code: ErrorCode, message: String) -> Response {
    let status = code.http_status();
    let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        error_response(self.code(), self.to_string())
    }
}

/// Most of a refused request's body (unauthenticated, or not allowed to write its stream) read and
/// dropped before the answer.
const REFUSED_BODY_BYTES: u64 = 1 << 20;

/// Access control, before the handler reads a byte of the body: who the request is (its
/// `Authorization` header, its connection's client certificate) goes into its extensions, or it is
/// answered `401 unauthenticated`.
async fn authenticate(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let peer = request.extensions().get::<PeerName>().map(|peer| peer.0.clone());
    match app.authenticate(authorization, peer.as_deref()) {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(error) => {
            let version = request.version();
            // A small body is read and dropped first: a client sends it before it reads the answer, and
            // a stream reset under it (HTTP/2) or a closed connection hides the 401. An unauthenticated
            // client gets no more than that of the server's time.
            body::drain(request.into_body().into_data_stream(), REFUSED_BODY_BYTES).await;
            let mut response = error.into_response();
            let headers = response.headers_mut();
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // The body may be unread: an HTTP/1.1 connection cannot carry another request.
            if version < Version::HTTP_2 {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// The answer to a request whose handler panicked: a JSON error like any other, and the server goes on.
pub fn panicked() -> Response {
    tracing::error!("A request handler panicked; answered 500. This is a bug: please report it.");
    let mut response = error_response(ErrorCode::Internal, "internal error (the server logged it)".to_owned());
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn ingest(
    State(app): State<Arc<App>>,
    Extension(identity): Extension<Identity>,
    Path(stream): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let answer = match app.authorize_write(&identity, &stream) {
        Ok(()) => ingest_body(&app, stream, &headers, body).await,
        Err(error) => {
            app.refused(Protocol::Http, &stream, &error);
            // As for a 401 (see `authenticate`): under a stream reset an HTTP/2 client misses the 403.
            body::drain(body.into_data_stream(), REFUSED_BODY_BYTES).await;
            Err(error)
        }
    };
    match answer {
        Ok(report) if report.replayed => {
            ([(REPLAYED_HEADER, HeaderValue::from_static("true"))], Json(report)).into_response()
        }
        Ok(report) => Json(report).into_response(),
        Err(error) => {
            let mut response = error.into_response();
            // The rest of the body may be unread, so the connection cannot carry another request: say so,
            // or an HTTP/1.1 client may reuse it and see its next request fail.
            if version < Version::HTTP_2 {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

async fn ingest_body(
    app: &Arc<App>,
    stream: String,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<IngestReport, IngestError> {
    // A key that is not text is still a key: refused by the core with a clear error, not ignored.
    let key = headers.get(IDEMPOTENCY_KEY_HEADER).map(|key| String::from_utf8_lossy(key.as_bytes()).into_owned());
    let request = IngestRequest { key, ..IngestRequest::new(Protocol::Http, stream, Commits::AtEnd) };
    let ingest = app.start_ingest(request).await?;
    let wire = WireCounter::default();
    let (body, returned) = body::returning(body.into_data_stream());
    let messages = (|| {
        let format = IpcFormat::from_content_type(header_text(headers, header::CONTENT_TYPE))?;
        let encoding = ContentEncoding::from_header(header_text(headers, header::CONTENT_ENCODING))?;
        let limit = app.limits().max_body_bytes.0;
        let declared_length = header_text(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > limit) {
            return Err(IngestError::BodyTooLarge { limit });
        }
        let bytes = body::decoded_bytes(body, encoding, limit, wire.clone());
        let decoder = IpcDecoder::new(format, app.limits().max_message_bytes.0).pausing_before_bodies();
        Ok(messages(bytes, decoder, app.budget().clone()))
    })();
    let answer = match messages {
        Ok(messages) => ingest.run(messages, &wire, None).await,
        Err(error) => Err(ingest.refuse(error)),
    };
    // A client that stalled, or a server shutting down, has nothing to wait for.
    if let Err(error) = &answer
        && !matches!(error, IngestError::IdleTimeout { .. } | IngestError::ShuttingDown)
    {
        body::linger(returned).await;
    }
    answer
}

/// The IPC messages of a body's bytes; an error ends them. A body that arrives in pieces is buffered only
/// once the budget has room for it: the memory a request holds while it receives is in the budget too.
fn messages(
    bytes: impl Stream<Item = Result<bytes::Bytes, IngestError>> + Unpin,
    decoder: IpcDecoder,
    budget: MemoryBudget,
) -> impl Stream<Item = Result<Incoming, IngestError>> {
    futures::stream::try_unfold((bytes, decoder, budget), |(mut bytes, mut decoder, budget)| async move {
        let mut room = None;
        loop {
            if let Some(message) = decoder.next_message()? {
                let incoming = Incoming { message, request_id: None, room };
                return Ok(Some((incoming, (bytes, decoder, budget))));
            }
            if let Some(len) = decoder.pending_body() {
                match budget.reserve_batch(len).await {
                    Ok(reservation) => room = Some(reservation),
                    Err(refused) => {
                        // Read the body past, keeping none of it: the client sends it before it reads
                        // the answer, and would otherwise see the connection close instead of the error.
                        decoder.skip_body();
                        decoder.next_message()?;
                        while decoder.skipping()
                            && let Some(Ok(chunk)) = bytes.next().await
                        {
                            decoder.push(chunk);
                            decoder.next_message()?;
                        }
                        return Err(refused);
                    }
                }
                decoder.admit();
                continue;
            }
            match bytes.next().await {
                Some(chunk) => decoder.push(chunk?),
                None => {
                    decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    })
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready while the server is not shutting down and its storage takes writes (see [`App::not_ready`]).
async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.not_ready() {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => "ready".into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.refresh_resources().await;
    let body = app.telemetry().metrics.encode();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

async fn streams(State(app): State<Arc<App>>, Extension(identity): Extension<Identity>) -> Response {
    match app.authorize_query(&identity) {
        Ok(()) => Json::<StreamsReport>(app.streams_report()).into_response(),
        Err(error) => error.into_response(),
    }
}
