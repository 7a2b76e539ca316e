//! Integration tests: the real server on an ephemeral loopback port, real HTTP and Flight clients, real DuckDB.

mod auth;
mod bad_input;
mod cli;
mod disk;
mod flight;
mod hostile;
mod idempotency;
mod ingest;
mod lake;
mod metrics;
mod process;
mod reload;
mod support;
mod types;
