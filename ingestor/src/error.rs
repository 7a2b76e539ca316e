//! One error type for every ingest and query path. Each variant has a stable [`ErrorCode`], and the
//! code decides the HTTP status and the gRPC code (one table, in `arrowport_api`).

use arrowport_api::ErrorCode;

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
    #[error("DuckDB's memory limit (duckdb.memory_limit) is exhausted by the loads running now; retry later: {0}")]
    DuckDbOutOfMemory(String),
    #[error("all {slots} load slots (limits.max_concurrent_loads) stayed busy for {seconds} s; retry later")]
    LoadSlotsBusy { slots: usize, seconds: u64 },
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
    #[error("a request with idempotency key {0:?} is being committed right now; retry once it is answered")]
    RequestInProgress(String),
    #[error("the database's volume is full; retry once space is freed: {0}")]
    InsufficientStorage(String),
    #[error("DuckDB error: {0}")]
    Database(String),
    #[error("journal: {0}")]
    Journal(String),
    #[error(
        "rows answered from the journal before this request cannot be written to their table yet (retried every second): {0}"
    )]
    JournalBacklog(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl IngestError {
    /// Its stable machine-readable code: the JSON `error.code`, the gRPC `x-arrowport-code` and the
    /// metrics `outcome` label.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidStreamName(_) => ErrorCode::InvalidStreamName,
            Self::UnknownStream(_) => ErrorCode::UnknownStream,
            Self::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            Self::UnsupportedEncoding(_) => ErrorCode::UnsupportedEncoding,
            Self::InvalidEncoding(_) => ErrorCode::InvalidEncoding,
            Self::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
            Self::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            Self::IdleTimeout { .. } => ErrorCode::IdleTimeout,
            Self::InvalidIpc(_) => ErrorCode::InvalidIpc,
            Self::EmptyBody => ErrorCode::EmptyBody,
            Self::BodyRead(_) => ErrorCode::BodyReadError,
            Self::SchemaMismatch(_) => ErrorCode::SchemaMismatch,
            Self::UnsupportedType(_) => ErrorCode::UnsupportedType,
            Self::Overloaded | Self::DuckDbOutOfMemory(_) | Self::LoadSlotsBusy { .. } => ErrorCode::Overloaded,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::TableNotFound(_) => ErrorCode::TableNotFound,
            Self::NoData(_) => ErrorCode::NoData,
            Self::TableExists(_) => ErrorCode::TableExists,
            Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::InvalidQuery(_) => ErrorCode::InvalidQuery,
            Self::ConstraintViolation(_) => ErrorCode::ConstraintViolation,
            Self::QueryTimeout { .. } => ErrorCode::QueryTimeout,
            Self::RequestInProgress(_) => ErrorCode::RequestInProgress,
            Self::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            Self::Database(_) | Self::Journal(_) => ErrorCode::DatabaseError,
            Self::JournalBacklog(_) => ErrorCode::JournalBacklog,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
        }
    }
}

/// What the operating system says, through DuckDB, when a write finds the volume full (`ENOSPC`) or the
/// user's quota spent (`EDQUOT`; glibc says "Disk quota exceeded", musl "Quota exceeded"). DuckDB 1.5.5
/// passes the system's text on, e.g. `IO Error: Could not write file "/data/db.duckdb": No space left on
/// device`, or `TransactionContext Error: Failed to commit: Could not write file "/data/db.duckdb.wal": No
/// space left on device`; matched case-insensitively anywhere in the message.
const NO_SPACE: [&str; 3] = ["no space left on device", "quota exceeded", "enospc"];

impl IngestError {
    /// A DuckDB error from its message: a full volume, a constraint the data breaks, or anything else.
    pub fn database(message: String) -> Self {
        // DuckDB names its error class first ("Constraint Error: Duplicate key ..."): a primary key,
        // unique, NOT NULL or CHECK constraint of a table the user created refused the data, which is
        // the client's to fix, not a server fault. (Checked first: its message quotes the client's values.)
        if let Some(detail) = message.strip_prefix("Constraint Error: ") {
            return Self::ConstraintViolation(detail.to_owned());
        }
        let lower = message.to_lowercase();
        if NO_SPACE.iter().any(|text| lower.contains(text)) {
            return Self::InsufficientStorage(message);
        }
        // Out of its buffer pool, DuckDB fails the statement and nothing else: the same request fits
        // once fewer loads run, so it is the client's to retry, like a full memory budget. (Not once
        // the instance is invalidated: that needs the reopen a database error leads to.)
        if message.contains("Out of Memory Error") && !lower.contains("invalidated") {
            return Self::DuckDbOutOfMemory(message);
        }
        Self::Database(message)
    }
}

impl From<duckdb::Error> for IngestError {
    fn from(error: duckdb::Error) -> Self {
        Self::database(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_volume_is_insufficient_storage() {
        // DuckDB 1.5.5's messages, measured on a full tmpfs.
        for message in [
            r#"IO Error: Could not write file "/data/db.duckdb": No space left on device"#,
            r#"TransactionContext Error: Failed to commit: Could not write file "/data/db.duckdb.wal": No space left on device"#,
            "FATAL Error: Failed: database has been invalidated because of a previous fatal error. The database \
             must be restarted prior to being used again.\nOriginal error: \"Failed to create checkpoint because \
             of error: Could not write file \"/data/db.duckdb\": No space left on device\"",
            r#"IO Error: Could not write file "/data/db.duckdb.wal": Disk quota exceeded"#,
            r#"IO Error: Could not write file "/data/db.duckdb.wal": Quota exceeded"#,
        ] {
            let error = IngestError::database(message.to_owned());
            assert_eq!(error.code(), ErrorCode::InsufficientStorage, "{message}");
            assert!(error.to_string().contains(message), "the message keeps DuckDB's: {error}");
        }
        let constraint = IngestError::database("Constraint Error: Duplicate key \"id: 1\"".to_owned());
        assert_eq!(constraint.code(), ErrorCode::ConstraintViolation);
        let memory = "Out of Memory Error: failed to pin block of size 256.0 KiB (191.8 MiB/192.0 MiB used)";
        assert_eq!(IngestError::database(memory.to_owned()).code(), ErrorCode::Overloaded);
        let other = IngestError::database("IO Error: Could not read file: Input/output error".to_owned());
        assert_eq!(other.code(), ErrorCode::DatabaseError);
    }
}
