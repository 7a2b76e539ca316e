//! Integration tests: the real server on an ephemeral loopback port, a real HTTP client, real DuckDB.

mod bad_input;
mod ingest;
mod process;
mod reload;
mod support;
mod types;
