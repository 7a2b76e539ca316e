//! Arrowport's ingester: Arrow data over HTTP and Arrow Flight into DuckDB tables.
//!
//! Dependencies run one way, from the edge inwards:
//!
//! - [`transport`]: the two protocols, siblings that never import each other — [`transport::http`]
//!   (axum handlers, body decoding, status mapping) and [`transport::flight`] (codec, message decoding,
//!   Flight SQL, status mapping) — and the accept loop that serves both on one port.
//! - [`auth`]: access control (tokens, grants), which the core applies for both transports.
//! - [`app`]: the protocol-neutral core and composition root: the one ingest loop both transports drive,
//!   the route table, lifecycle (shutdown, checkpoints). [`reload`] feeds it new routes.
//! - the engines it composes: [`load`] (Arrow batches → one DuckDB transaction per commit, with
//!   [`ipc`] checking and decoding messages, [`budget`] bounding their memory and [`journal`] making
//!   small requests durable before their tables are written), [`query`] (read-only
//!   queries), [`routing`] (stream → table), [`telemetry`] (metrics and per-stream totals).
//! - [`store`]: the one DuckDB instance and the storage seam behind it (a DuckDB file or a DuckLake).
//!
//! Wire types and error codes live in the `arrowport-api` crate, shared with the client commands of
//! the `arrowport-cli` crate, which have no DuckDB behind them.

pub mod app;
pub mod auth;
pub mod budget;
pub mod error;
pub mod ipc;
pub mod journal;
pub mod load;
pub mod malloc;
pub mod query;
pub mod reload;
pub mod routing;
pub mod sizing;
pub mod store;
pub mod telemetry;
pub mod transport;
