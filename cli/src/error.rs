//! Why a client command failed. Messages carry their causes (no `source` chains), so each prints once.

use arrowport_config::settings::SettingsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A FILE argument could not be opened or read.
    #[error("{file}: {message}")]
    Input { file: String, message: String },
    #[error(
        "{file}: unknown file type: expected an Arrow IPC stream or file or a Parquet file (recognised by their \
         first bytes), or a .csv, .json, .jsonl or .ndjson file"
    )]
    UnknownFormat { file: String },
    /// All batches of one upload share one schema.
    #[error("{file} does not have the columns of {first}: {difference}")]
    SchemaDiffers { file: String, first: String, difference: String },
    #[error("`-` (stdin) can be given only once")]
    StdinTwice,
    /// The reading thread ended without saying whether it finished.
    #[error("reading the input stopped unexpectedly")]
    ReaderStopped,
    #[error("invalid server URL {url:?}: {message}")]
    ServerUrl { url: String, message: String },
    #[error("cannot reach the server at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The server answered with its JSON error.
    #[error("the server refused the data (HTTP {status} {code}): {message}")]
    Refused { status: u16, code: String, message: String },
    /// The server ended a Flight call with a gRPC status; `code` is Arrowport's, from the trailers.
    #[error("the server refused the data (gRPC {status}{}): {message}", code.as_ref().map(|c| format!(" {c}")).unwrap_or_default())]
    FlightStatus { status: String, code: Option<String>, message: String },
    /// An answer that is not what an Arrowport server sends.
    #[error("unexpected answer from {url}: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot read the server's compression setting for the stream: {0}; choose one with --compression")]
    CompressionUnknown(String),
    #[error("the server committed {committed} rows but {sent} were sent")]
    RowsMissing { committed: u64, sent: u64 },
    #[error("cannot encode Arrow data: {0}")]
    Encode(String),
    #[error("{file}: {count} problem{}", if *count == 1 { "" } else { "s" })]
    Invalid { file: String, count: usize },
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A token must be one line of printable ASCII (it travels in a header).
    #[error("{origin}: a token is one non-empty line of printable ASCII characters")]
    Token { origin: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
}
