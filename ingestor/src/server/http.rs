//! HTTP handlers: `POST /ingest/{stream}`, health, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::body::{ContentEncoding, decoded_bytes};
use super::{AppState, InflightRequest};
use crate::decode::{IpcDecoder, IpcFormat};
use crate::error::IngestError;
use crate::ipc::{Checked, MessageDecoder, Payload};
use crate::load::Upload;
use crate::metrics::Protocol;

/// The answer to a committed ingest request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    pub stream: String,
    pub table: String,
    pub rows: u64,
    pub batches: u64,
    /// Body bytes as received (compressed, if it was).
    pub bytes_received: u64,
    /// Arrow bytes after decoding.
    pub bytes_decoded: u64,
    pub elapsed_ms: u64,
    /// Time the commit took (reported in the commit latency histogram, not in the answer).
    #[serde(skip)]
    pub commit_time: Duration,
    /// Committed in one transaction with other requests (counted in the metrics, not in the answer).
    #[serde(skip)]
    pub grouped: bool,
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = Json(json!({"error": {"code": self.code(), "message": self.to_string()}}));
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The answer to a request whose handler panicked: a JSON error like any other, and the server goes on.
pub fn panicked() -> Response {
    tracing::error!("A request handler panicked; answered 500. This is a bug: please report it.");
    let body = Json(json!({"error": {"code": "internal", "message": "internal error (the server logged it)"}}));
    (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONNECTION, "close")], body).into_response()
}

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(stream): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let inflight = InflightRequest::new(&state);
    let outcome = ingest_body(&state, &stream, &headers, body, &wire_bytes, started).await;
    drop(inflight);
    if let Ok(report) = &outcome {
        state.record_commit(Protocol::Http, report);
    }
    state.record_request(Protocol::Http, &stream, outcome.as_ref().err(), wire_bytes.load(Ordering::Relaxed), started);
    match outcome {
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
    state: &AppState,
    stream: &str,
    headers: &HeaderMap,
    body: Body,
    wire_bytes: &Arc<AtomicU64>,
    started: Instant,
) -> Result<IngestReport, IngestError> {
    if state.is_shutting_down() {
        return Err(IngestError::ShuttingDown);
    }
    let route = state.routes().resolve(stream)?;
    let format = IpcFormat::from_content_type(header_text(headers, header::CONTENT_TYPE))?;
    let encoding = ContentEncoding::from_header(header_text(headers, header::CONTENT_ENCODING))?;
    let limit = state.limits.max_body_bytes.0;
    let declared_length = header_text(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(IngestError::BodyTooLarge { limit });
    }

    let mut bytes = decoded_bytes(body, encoding, limit, wire_bytes.clone());
    let mut decoder = IpcDecoder::new(format, state.limits.max_message_bytes.0);
    let mut messages = MessageDecoder::new(state.loader.budget().capacity());
    let mut upload: Option<Upload> = None;
    let budget = state.loader.budget();
    let mut dictionaries = None;
    let mut bytes_decoded = 0;
    loop {
        // Read on only once DuckDB can take the next batch: a slow table holds back the client, not memory.
        if let Some(upload) = &upload {
            upload.ready().await;
        }
        let Some(chunk) = state.next_from_client(bytes.next()).await? else { break };
        decoder.push(chunk?);
        while let Some(message) = decoder.next_message()? {
            match messages.check(&message)? {
                Checked::Schema if messages.schema().is_some() => {
                    return Err(IngestError::InvalidIpc("a second schema message in one stream".into()));
                }
                Checked::Dictionary { dictionary_bytes } => {
                    // Dictionaries live as long as the request: they hold their room in the budget too.
                    budget.resize(&mut dictionaries, dictionary_bytes).await?;
                    messages.decode(&message)?;
                    budget.resize(&mut dictionaries, messages.dictionary_bytes()).await?;
                }
                Checked::Batch { decoded_bytes: size } => {
                    let Some(upload) = upload.as_mut() else {
                        return Err(IngestError::InvalidIpc("a record batch came before the schema".into()));
                    };
                    // Room in the budget first, then decoding: a batch never exists outside the budget.
                    let reservation = budget.reserve_batch(size).await?;
                    if let Payload::Batch(batch) = messages.decode(&message)? {
                        bytes_decoded += upload.send(batch, reservation).await?;
                    }
                }
                _ => {
                    if let Payload::Schema(schema) = messages.decode(&message)? {
                        upload = Some(state.loader.upload(route.target(), schema)?);
                    }
                }
            }
        }
    }
    decoder.finish()?;
    let committed = upload.ok_or(IngestError::EmptyBody)?.commit().await?;
    Ok(IngestReport {
        stream: route.stream,
        table: route.table,
        rows: committed.rows,
        batches: committed.batches,
        bytes_received: wire_bytes.load(Ordering::Relaxed),
        bytes_decoded,
        elapsed_ms: started.elapsed().as_millis() as u64,
        commit_time: committed.commit_time,
        grouped: committed.grouped,
    })
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready while the database is open and the server is not shutting down.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        "ready".into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.refresh_resources().await;
    let metrics = &state.metrics;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}
