//! Arrowport's ingester: Arrow data over HTTP and Arrow Flight into DuckDB tables.
//!
//! Request path: [`server`] (HTTP) or [`flight`] (gRPC, same port) → [`routing`] (stream → table) →
//! [`decode`] (HTTP body → IPC messages) → [`ipc`] (messages checked, then decoded into batches) → [`load`] (batches → one DuckDB transaction per commit).
//! [`cli`] holds the binary's client commands (`ingest`, `streams`, `validate`).

pub mod budget;
pub mod cli;
pub mod decode;
pub mod error;
pub mod flight;
pub mod ipc;
pub mod load;
pub mod malloc;
pub mod metrics;
pub mod reload;
pub mod routing;
pub mod server;
pub mod settings;
pub mod sizing;

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
        memory_limit: duckdb_memory_limit(config),
        checkpoint_threshold: config.duckdb.checkpoint_threshold.0,
        max_concurrent_loads: config.limits.max_concurrent_loads,
        budget,
        queries,
    };
    let loader = Loader::open(&config.db_path, options)?;
    Ok(Arc::new(AppState::new(loader, settings::routes(config), config.limits.clone(), config.duckdb.clone())))
}

/// DuckDB's memory limit: the configured one, or [`sizing::default_duckdb_limit`] of the memory this
/// process may use; `None` (DuckDB's own default) only where that cannot be read.
fn duckdb_memory_limit(config: &Config) -> Option<u64> {
    if let Some(limit) = config.duckdb.memory_limit {
        return Some(limit.0);
    }
    let available = sizing::available()?;
    let budget = config.limits.memory_budget_bytes.0;
    let limit = sizing::default_duckdb_limit(available.bytes, budget);
    // In MiB: ByteSize prints sizes that are not whole units in bytes.
    let (duckdb_mib, available_mib) = (limit >> 20, available.bytes >> 20);
    if limit + budget > available.bytes {
        tracing::warn!(
            duckdb_mib, available_mib, source = %available.source,
            "DuckDB's memory limit and limits.memory_budget_bytes together exceed the memory available; \
             lower the budget or give the process more memory."
        );
    } else {
        tracing::info!(
            duckdb_mib, available_mib, source = %available.source,
            "DuckDB memory limit: 80% of the memory available, less limits.memory_budget_bytes."
        );
    }
    Some(limit)
}
