//! Arrowport's ingester: Arrow IPC streams over HTTP into DuckDB tables.
//!
//! Request path: [`server`] (HTTP) → [`routing`] (stream → table) → [`decode`] (IPC bytes → batches)
//! → [`load`] (batches → one DuckDB transaction). Flight and other front ends reuse routing and loading.

pub mod budget;
pub mod decode;
pub mod error;
pub mod load;
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
use load::Loader;
use server::AppState;

/// How long a request waits for room in the memory budget before it gets 503.
const BUDGET_PATIENCE: Duration = Duration::from_secs(2);

/// Opens the database and builds the state the server runs on.
pub fn open(config: &Config) -> Result<Arc<AppState>, IngestError> {
    let budget = MemoryBudget::new(config.limits.memory_budget_bytes.0, BUDGET_PATIENCE);
    let loader = Loader::open(&config.db_path, &config.duckdb_extensions, config.limits.max_concurrent_loads, budget)?;
    Ok(Arc::new(AppState::new(loader, settings::routes(config), config.limits.clone())))
}
