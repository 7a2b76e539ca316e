//! One error type for every ingest path, with one mapping to HTTP status; `flight::status` maps it to gRPC.

use axum::http::StatusCode;

/// Why a request was not (fully) ingested. Every variant leaves nothing of the request behind.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid stream name {0:?}: use 1-128 characters of [A-Za-z0-9_.-], starting with a letter, digit or '_'")]
    InvalidStreamName(String),
    #[error("unknown stream {0:?}: it is not configured and auto_create is off")]
    UnknownStream(String),
    #[error(
        "unsupported content type {0:?}: send application/vnd.apache.arrow.stream or application/vnd.apache.arrow.file"
    )]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding {0:?}: use zstd, lz4, gzip or identity")]
    UnsupportedEncoding(String),
    #[error("{0}")]
    InvalidEncoding(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("an Arrow IPC message exceeds the limit of {limit} bytes; send smaller record batches")]
    MessageTooLarge { limit: u64 },
    #[error(
        "a record batch decodes to {bytes} bytes, more than the whole memory budget of {limit} bytes \
         (limits.memory_budget_bytes); send smaller record batches"
    )]
    BatchTooLarge { bytes: u64, limit: u64 },
    #[error("no data from the client for {seconds} s (limits.idle_timeout_seconds)")]
    IdleTimeout { seconds: u64 },
    #[error("invalid Arrow IPC data: {0}")]
    InvalidIpc(String),
    #[error("request body ended before any Arrow schema arrived")]
    EmptyBody,
    #[error("reading the request body failed: {0}")]
    BodyRead(String),
    #[error("schema mismatch: {0}")]
    SchemaMismatch(String),
    #[error("unsupported type: {0}")]
    UnsupportedType(String),
    #[error("the ingester's memory budget is exhausted; retry later")]
    Overloaded,
    #[error("the ingester is shutting down")]
    ShuttingDown,
    #[error("table {0:?} does not exist and the request does not allow creating it")]
    TableNotFound(String),
    #[error("stream {0:?} has no data yet: its table is created by the first write")]
    NoData(String),
    #[error("table {0:?} already exists and the request does not allow writing to it")]
    TableExists(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("query refused: {0}")]
    InvalidQuery(String),
    #[error("the data violates a constraint of the table: {0}")]
    ConstraintViolation(String),
    #[error("query cancelled after the limit of {seconds} s")]
    QueryTimeout { seconds: u64 },
    #[error("DuckDB error: {0}")]
    Database(String),
}

impl IngestError {
    /// The HTTP status this error is answered with.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidStreamName(_)
            | Self::InvalidIpc(_)
            | Self::InvalidEncoding(_)
            | Self::EmptyBody
            | Self::BodyRead(_)
            | Self::InvalidRequest(_)
            | Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::UnknownStream(_) | Self::TableNotFound(_) | Self::NoData(_) => StatusCode::NOT_FOUND,
            Self::TableExists(_) | Self::ConstraintViolation(_) => StatusCode::CONFLICT,
            Self::QueryTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UnsupportedMediaType(_) | Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge { .. } | Self::MessageTooLarge { .. } | Self::BatchTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::IdleTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::SchemaMismatch(_) | Self::UnsupportedType(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code: the JSON `error.code` and the metrics `outcome` label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidStreamName(_) => "invalid_stream_name",
            Self::UnknownStream(_) => "unknown_stream",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UnsupportedEncoding(_) => "unsupported_encoding",
            Self::InvalidEncoding(_) => "invalid_encoding",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::MessageTooLarge { .. } => "message_too_large",
            Self::BatchTooLarge { .. } => "batch_too_large",
            Self::IdleTimeout { .. } => "idle_timeout",
            Self::InvalidIpc(_) => "invalid_ipc",
            Self::EmptyBody => "empty_body",
            Self::BodyRead(_) => "body_read_error",
            Self::SchemaMismatch(_) => "schema_mismatch",
            Self::UnsupportedType(_) => "unsupported_type",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::TableNotFound(_) => "table_not_found",
            Self::NoData(_) => "no_data",
            Self::TableExists(_) => "table_exists",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidQuery(_) => "invalid_query",
            Self::ConstraintViolation(_) => "constraint_violation",
            Self::QueryTimeout { .. } => "query_timeout",
            Self::Database(_) => "database_error",
        }
    }
}

impl From<duckdb::Error> for IngestError {
    fn from(error: duckdb::Error) -> Self {
        let message = error.to_string();
        // DuckDB names its error class first ("Constraint Error: Duplicate key ..."): a primary key,
        // unique, NOT NULL or CHECK constraint of a table the user created refused the data, which is
        // the client's to fix, not a server fault.
        match message.strip_prefix("Constraint Error: ") {
            Some(detail) => Self::ConstraintViolation(detail.to_owned()),
            None => Self::Database(message),
        }
    }
}
