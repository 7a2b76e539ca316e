//! Errors as gRPC statuses: the code's table gives the gRPC code, and the stable error code travels in
//! the `x-arrowport-code` metadata.

use arrowport_api::{ERROR_CODE_METADATA, ErrorCode};
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::error::IngestError;

/// The gRPC status for an ingest or query error.
pub fn status(error: &IngestError) -> Status {
    coded(error.code(), error.to_string())
}

/// A status with `code`'s gRPC code and `code` in the metadata.
pub fn coded(code: ErrorCode, message: impl Into<String>) -> Status {
    let mut status = Status::new(code.grpc_code(), message);
    status.metadata_mut().insert(ERROR_CODE_METADATA, MetadataValue::from_static(code.as_str()));
    status
}
