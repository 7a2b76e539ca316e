//! Arrowport's ingester: Arrow data over HTTP and Arrow Flight into DuckDB tables.
//!
//! Request path: [`server`] (HTTP) or [`flight`] (gRPC, same port) → [`routing`] (stream → table) →
//! [`decode`] (IPC bytes → batches) → [`load`] (batches → one DuckDB transaction per commit).
//! [`cli`] holds the binary's client commands (`ingest`, `streams`, `validate`).

pub mod budget;
pub mod cli;
pub mod decode;
pub mod error;
pub mod flight;
pub mod load;
pub mod malloc;
pub mod metrics;
pub mod reload;
pub mod routing;
pub mod server;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use arrowport_config::Config;

use budget::MemoryBudget;
use error::IngestError;
use load::{Loader, LoaderOptions, QueryLimits};
use server::AppState;

/// How long a request waits for room in the memory budget before it gets 503.
const BUDGET_PATIENCE: Duration = Duration::from_secs(2);

/// Opens the database and builds the state the server runs on.
pub fn open(config: &Config) -> Result<Arc<AppState>, IngestError> {
    let budget = MemoryBudget::new(config.limits.memory_budget_bytes.0, BUDGET_PATIENCE);
    let queries = QueryLimits {
        max_concurrent: config.limits.max_concurrent_queries,
        timeout: Duration::from_secs(config.limits.query_timeout_seconds),
    };
    let options = LoaderOptions {
        extensions: config.duckdb_extensions.clone(),
        memory_limit: config.duckdb.memory_limit.map(|limit| limit.0),
        checkpoint_threshold: config.duckdb.checkpoint_threshold.0,
        max_concurrent_loads: config.limits.max_concurrent_loads,
        budget,
        queries,
    };
    let loader = Loader::open(&config.db_path, options)?;
    Ok(Arc::new(AppState::new(loader, settings::routes(config), config.limits.clone(), config.duckdb.clone())))
}
