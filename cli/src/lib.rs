//! The client commands of the `arrowport` binary: `ingest` sends files to a running server, `streams`
//! lists what a server (or a config file) routes, `validate` checks config files offline, `token hash`
//! prints what a tokens file stores for a token.
//!
//! Each command is a `run` function taking its clap arguments; the binary's `main.rs` only dispatches and
//! prints the error. Output goes to stdout, progress and problems to stderr, colours only where stderr or
//! stdout is a terminal and `NO_COLOR` is unset (the `console` crate's rule).
//!
//! A crate of its own so that the client side builds without DuckDB: it reads the server's answers
//! through `arrowport-api` and config files through `arrowport-config`, exactly as the server writes
//! and reads them.

mod error;
mod flight_client;
mod http_client;
pub mod ingest;
mod progress;
mod sources;
pub mod streams;
pub mod tls;
pub mod token;
pub mod validate;

use arrowport_config::CompressionAlgorithm;

pub use error::Error;

/// The server the client commands talk to unless `--server` or `ARROWPORT_SERVER` says otherwise.
pub const DEFAULT_SERVER: &str = "http://localhost:8888";

/// Arrow IPC buffer compression, as flags spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionArg {
    Zstd,
    Lz4,
    None,
}

impl From<CompressionArg> for CompressionAlgorithm {
    fn from(algorithm: CompressionArg) -> Self {
        match algorithm {
            CompressionArg::Zstd => Self::Zstd,
            CompressionArg::Lz4 => Self::Lz4,
            CompressionArg::None => Self::None,
        }
    }
}

/// How `streams` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// Pretty-printed JSON for programs.
    Json,
}

/// A runtime for one command's network calls.
fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Runtime::new().map_err(|error| Error::Runtime(error.to_string()))
}

/// The innermost cause of an error chain: for a failed connection, "Connection refused (os error 111)"
/// says more than the layers of client wrappers around it.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
