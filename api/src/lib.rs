//! Arrowport's wire contract: what the server answers and what clients read.
//!
//! The JSON of `POST /ingest/{stream}` ([`IngestReport`]), of each Flight `DoPut` acknowledgement
//! ([`Ack`]) and of `GET /streams` ([`StreamsReport`]); the error answer ([`ErrorBody`]) and the one
//! table of stable error codes with their HTTP and gRPC statuses ([`ErrorCode`]); and the two Arrow
//! rules both sides must agree on: how a compression setting becomes IPC buffer compression
//! ([`ipc_write_options`]) and how decoded bytes are counted ([`decoded_size`]).
//!
//! Nothing here touches DuckDB or a web framework, so the client commands (and any other program
//! that talks to an Arrowport server) build without them and still read exactly what the server writes.

mod error;
mod ipc;
mod report;

pub use error::{ERROR_CODE_METADATA, ErrorBody, ErrorCode, ErrorDetail, UnknownErrorCode};
pub use ipc::{decoded_size, ipc_write_options};
pub use report::{
    Ack, IDEMPOTENCY_KEY_HEADER, IngestReport, REPLAYED_HEADER, StreamReport, StreamStats, StreamsReport,
};
