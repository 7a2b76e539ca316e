//! Errors on the wire: the stable codes, the HTTP and gRPC statuses each is answered with, and the
//! JSON body of an HTTP error.

use std::fmt;
use std::str::FromStr;

use http::StatusCode;
use serde::{Deserialize, Serialize};
use tonic::Code;

/// The gRPC metadata key (a trailer) a failed Flight call carries its [`ErrorCode`] in.
pub const ERROR_CODE_METADATA: &str = "x-arrowport-code";

/// A stable, machine-readable error code: the JSON `error.code`, the `x-arrowport-code` trailer of
/// Flight calls and the metrics `outcome` label. Clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidStreamName,
    UnknownStream,
    UnsupportedMediaType,
    UnsupportedEncoding,
    InvalidEncoding,
    BodyTooLarge,
    MessageTooLarge,
    BatchTooLarge,
    IdleTimeout,
    InvalidIpc,
    EmptyBody,
    BodyReadError,
    SchemaMismatch,
    UnsupportedType,
    Overloaded,
    ShuttingDown,
    TableNotFound,
    NoData,
    TableExists,
    InvalidRequest,
    InvalidQuery,
    ConstraintViolation,
    QueryTimeout,
    /// Another request with the same idempotency key is being committed right now (retry shortly).
    RequestInProgress,
    /// The database's volume is full (or over its quota): DuckDB could not write. Retry once space is
    /// freed; the server's `/readyz` says not ready meanwhile.
    InsufficientStorage,
    DatabaseError,
    /// Rows answered from the journal before this request (to its table, or to any for a query) cannot
    /// be written to their table yet; the server retries them every second. Retry shortly.
    JournalBacklog,
    /// A handler panicked: a bug, logged by the server.
    Internal,
    /// No valid token (or client certificate) where access control is on.
    Unauthenticated,
    /// A valid token without the grant the request needs (a stream it may not write, or a query).
    PermissionDenied,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [Self; 30] = [
        Self::InvalidStreamName,
        Self::UnknownStream,
        Self::UnsupportedMediaType,
        Self::UnsupportedEncoding,
        Self::InvalidEncoding,
        Self::BodyTooLarge,
        Self::MessageTooLarge,
        Self::BatchTooLarge,
        Self::IdleTimeout,
        Self::InvalidIpc,
        Self::EmptyBody,
        Self::BodyReadError,
        Self::SchemaMismatch,
        Self::UnsupportedType,
        Self::Overloaded,
        Self::ShuttingDown,
        Self::TableNotFound,
        Self::NoData,
        Self::TableExists,
        Self::InvalidRequest,
        Self::InvalidQuery,
        Self::ConstraintViolation,
        Self::QueryTimeout,
        Self::RequestInProgress,
        Self::InsufficientStorage,
        Self::DatabaseError,
        Self::JournalBacklog,
        Self::Internal,
        Self::Unauthenticated,
        Self::PermissionDenied,
    ];

    /// The code as it goes on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidStreamName => "invalid_stream_name",
            Self::UnknownStream => "unknown_stream",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::InvalidEncoding => "invalid_encoding",
            Self::BodyTooLarge => "body_too_large",
            Self::MessageTooLarge => "message_too_large",
            Self::BatchTooLarge => "batch_too_large",
            Self::IdleTimeout => "idle_timeout",
            Self::InvalidIpc => "invalid_ipc",
            Self::EmptyBody => "empty_body",
            Self::BodyReadError => "body_read_error",
            Self::SchemaMismatch => "schema_mismatch",
            Self::UnsupportedType => "unsupported_type",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::TableNotFound => "table_not_found",
            Self::NoData => "no_data",
            Self::TableExists => "table_exists",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidQuery => "invalid_query",
            Self::ConstraintViolation => "constraint_violation",
            Self::QueryTimeout => "query_timeout",
            Self::RequestInProgress => "request_in_progress",
            Self::InsufficientStorage => "insufficient_storage",
            Self::DatabaseError => "database_error",
            Self::JournalBacklog => "journal_backlog",
            Self::Internal => "internal",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
        }
    }

    /// The HTTP status an error with this code is answered with.
    pub fn http_status(self) -> StatusCode {
        self.statuses().0
    }

    /// The gRPC status code a Flight call failing with this code ends with.
    pub fn grpc_code(self) -> Code {
        self.statuses().1
    }

    /// The one table of both protocols' statuses, one line per code.
    fn statuses(self) -> (StatusCode, Code) {
        match self {
            Self::InvalidStreamName => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::UnknownStream => (StatusCode::NOT_FOUND, Code::NotFound),
            Self::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, Code::InvalidArgument),
            Self::UnsupportedEncoding => (StatusCode::UNSUPPORTED_MEDIA_TYPE, Code::InvalidArgument),
            Self::InvalidEncoding => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
            Self::MessageTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
            Self::BatchTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::InvalidArgument),
            Self::IdleTimeout => (StatusCode::REQUEST_TIMEOUT, Code::DeadlineExceeded),
            Self::InvalidIpc => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::EmptyBody => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::BodyReadError => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::SchemaMismatch => (StatusCode::UNPROCESSABLE_ENTITY, Code::FailedPrecondition),
            Self::UnsupportedType => (StatusCode::UNPROCESSABLE_ENTITY, Code::InvalidArgument),
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, Code::ResourceExhausted),
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            Self::TableNotFound => (StatusCode::NOT_FOUND, Code::NotFound),
            Self::NoData => (StatusCode::NOT_FOUND, Code::NotFound),
            Self::TableExists => (StatusCode::CONFLICT, Code::AlreadyExists),
            Self::InvalidRequest => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::InvalidQuery => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            Self::ConstraintViolation => (StatusCode::CONFLICT, Code::FailedPrecondition),
            Self::QueryTimeout => (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded),
            Self::RequestInProgress => (StatusCode::CONFLICT, Code::Aborted),
            Self::InsufficientStorage => (StatusCode::INSUFFICIENT_STORAGE, Code::ResourceExhausted),
            Self::DatabaseError => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
            Self::JournalBacklog => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
            Self::Unauthenticated => (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            Self::PermissionDenied => (StatusCode::FORBIDDEN, Code::PermissionDenied),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code this build does not know (a newer server may send one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|known| known.as_str() == code).ok_or_else(|| UnknownErrorCode(code.to_owned()))
    }
}

/// The body of every HTTP error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code to branch on and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// An [`ErrorCode`] as text, kept as sent: a newer server may answer codes this build lacks.
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { code: code.as_str().to_owned(), message: message.into() } }
    }

    /// The code, if this build knows it.
    pub fn code(&self) -> Option<ErrorCode> {
        self.error.code.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!("no_such_code".parse::<ErrorCode>(), Err(UnknownErrorCode("no_such_code".to_owned())));
    }

    #[test]
    fn statuses_of_both_protocols() {
        let statuses = |code: ErrorCode| (code.http_status().as_u16(), code.grpc_code());
        assert_eq!(statuses(ErrorCode::SchemaMismatch), (422, Code::FailedPrecondition));
        assert_eq!(statuses(ErrorCode::Overloaded), (503, Code::ResourceExhausted));
        assert_eq!(statuses(ErrorCode::IdleTimeout), (408, Code::DeadlineExceeded));
        assert_eq!(statuses(ErrorCode::BatchTooLarge), (413, Code::InvalidArgument));
        assert_eq!(statuses(ErrorCode::Internal), (500, Code::Internal));
        assert_eq!(statuses(ErrorCode::InsufficientStorage), (507, Code::ResourceExhausted));
        assert_eq!(ErrorCode::InsufficientStorage.as_str(), "insufficient_storage");
        assert_eq!(statuses(ErrorCode::Unauthenticated), (401, Code::Unauthenticated));
        assert_eq!(statuses(ErrorCode::PermissionDenied), (403, Code::PermissionDenied));
    }

    #[test]
    fn error_body_json() {
        let body = ErrorBody::new(ErrorCode::UnknownStream, "unknown stream \"x\"");
        let json = serde_json::to_string(&body).unwrap();
        assert_eq!(json, r#"{"error":{"code":"unknown_stream","message":"unknown stream \"x\""}}"#);
        let read: ErrorBody = serde_json::from_str(&json).unwrap();
        assert_eq!(read.code(), Some(ErrorCode::UnknownStream));
        let newer: ErrorBody = serde_json::from_str(r#"{"error":{"code":"from_the_future","message":"m"}}"#).unwrap();
        assert_eq!((newer.code(), newer.error.code.as_str()), (None, "from_the_future"));
    }
}
