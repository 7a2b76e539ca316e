//! The protocol-neutral core, and the composition root that builds it from the configuration.
//!
//! [`App`] owns what every transport shares: the route table, the ingest engine ([`Loader`]) and the
//! ingest session loop ([`session`]), the read-only [`QueryService`], [`Telemetry`], the lifecycle
//! (shutdown, checkpoints) and the storage's health ([`health`]: a full volume, an invalidated database).
//! Transports ([`crate::transport`]) turn their requests into calls on it and its
//! results and errors into their answers; nothing here knows HTTP or gRPC.

mod health;
mod lifecycle;
mod session;
mod streams;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrowport_config::{Config, Limits, StorageConfig, TokensFile};

use crate::auth::{Access, Identity, Refusal};
use crate::budget::MemoryBudget;
use crate::error::IngestError;
use crate::load::{JournalOptions, Loader, LoaderOptions};
use crate::query::{QueryLimits, QueryService};
use crate::routing::Routes;
use crate::sizing;
use crate::store::{Database, DatabaseOptions, DuckDbFile, DuckLake, Storage};
use crate::telemetry::{Resources, Telemetry, metrics};
use health::Health;
use lifecycle::Lifecycle;
pub use session::{Commits, Incoming, IngestRequest, WireCounter};

/// How long a request waits for room in the memory budget before it gets 503.
const BUDGET_PATIENCE: Duration = Duration::from_secs(2);

/// The ingester: what every request handler shares.
pub struct App {
    routes: RwLock<Arc<Routes>>,
    /// The tokens in force (access control off without `auth.tokens_file`).
    access: RwLock<Arc<Access>>,
    database: Arc<Database>,
    loader: Loader,
    queries: QueryService,
    telemetry: Telemetry,
    lifecycle: Lifecycle,
    health: Health,
    limits: Limits,
    checkpoint_interval: Option<Duration>,
    /// How long a committed idempotency key is remembered.
    key_window: Duration,
    /// (stream, idempotency key) of the ingests running now.
    keys_in_flight: Mutex<HashSet<(String, String)>>,
}

impl App {
    /// Opens the storage `config` names and builds the ingester on it.
    pub fn open(config: &Config) -> Result<Arc<Self>, IngestError> {
        let storage: Box<dyn Storage> = match &config.storage {
            StorageConfig::Duckdb => Box::new(DuckDbFile::new(&config.db_path)),
            StorageConfig::Ducklake(lake) => {
                let extensions =
                    config.duckdb.extension_directory.as_deref().ok_or_else(|| {
                        IngestError::Database("a DuckLake needs duckdb.extension_directory".to_owned())
                    })?;
                Box::new(DuckLake::new(
                    &lake.catalog,
                    &lake.data_path,
                    extensions,
                    lake.data_inlining_row_limit,
                    Duration::from_secs(lake.snapshot_retention_seconds),
                    Duration::from_secs(lake.maintenance_interval_seconds),
                )?)
            }
        };
        tracing::info!(storage = %storage.describe(), "Opening the storage.");
        let (budget, duckdb_memory_limit) = memory_plan(config);
        let options = DatabaseOptions {
            extensions: config.duckdb_extensions.clone(),
            memory_limit: duckdb_memory_limit,
            checkpoint_threshold: config.duckdb.checkpoint_threshold.0,
            threads: config.duckdb.threads,
        };
        let database = Arc::new(Database::open(storage, &options)?);
        let budget = MemoryBudget::new(budget, BUDGET_PATIENCE);
        let journal = config.journal.enabled.then(|| JournalOptions {
            dir: journal_dir(config),
            linger: Duration::from_millis(config.journal.linger_ms),
        });
        if let Some(journal) = &journal {
            tracing::info!(dir = %journal.dir.display(), linger_ms = journal.linger.as_millis() as u64,
                "Small requests are answered once durable in the journal.");
        }
        let max_concurrent_loads = config.limits.max_concurrent_loads;
        // A session waits for a slot as long as a client may stay silent.
        let slot_wait = Duration::from_secs(config.limits.idle_timeout_seconds);
        let options = LoaderOptions { max_concurrent_loads, slot_wait, budget, journal };
        let loader = Loader::new(database.clone(), options)?;
        let query_limits = QueryLimits {
            max_concurrent: config.limits.max_concurrent_queries,
            timeout: Duration::from_secs(config.limits.query_timeout_seconds),
        };
        let queries = QueryService::new(database.clone(), query_limits, loader.journal().cloned());
        let routes = Routes::from_config(config);
        let telemetry = Telemetry::default();
        let metrics = &telemetry.metrics;
        metrics.memory_budget_bytes.set(loader.budget().capacity() as i64);
        if let Some(limit) = database.memory_limit() {
            metrics.duckdb_memory_limit_bytes.set(limit as i64);
        }
        metrics.config_generation.set(routes.generation as i64);
        let key_window = Duration::from_secs(config.idempotency.key_window_seconds);
        metrics.idempotency_key_window_seconds.set(key_window.as_secs() as i64);
        // A DuckDB file checkpoints its WAL; a lake runs its maintenance.
        let interval = match &config.storage {
            StorageConfig::Duckdb => config.duckdb.checkpoint_interval_seconds,
            StorageConfig::Ducklake(lake) => lake.maintenance_interval_seconds,
        };
        let checkpoint_interval = (interval > 0).then(|| Duration::from_secs(interval));
        // With a tokens file configured, nobody gets in until its tokens are put in force
        // ([`App::replace_tokens`]): access control fails closed.
        let access = match &config.auth.tokens_file {
            Some(_) => Access::from_file(&TokensFile::default()),
            None => Access::default(),
        };
        Ok(Arc::new(Self {
            routes: RwLock::new(Arc::new(routes)),
            access: RwLock::new(Arc::new(access)),
            database,
            loader,
            queries,
            telemetry,
            lifecycle: Lifecycle::default(),
            health: Health::default(),
            limits: config.limits.clone(),
            checkpoint_interval,
            key_window,
            keys_in_flight: Mutex::new(HashSet::new()),
        }))
    }

    /// The routing table now; a request keeps the snapshot it started with.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.read().expect("routes lock poisoned").clone()
    }

    /// Puts `routes` in force for requests that start from now on, unless it routes exactly as the
    /// current table does. Returns the new generation if it changed anything.
    pub fn replace_routes(&self, mut routes: Routes) -> Option<u64> {
        let mut current = self.routes.write().expect("routes lock poisoned");
        if current.hash() == routes.hash() {
            return None;
        }
        routes.generation = current.generation + 1;
        let generation = routes.generation;
        *current = Arc::new(routes);
        self.telemetry.metrics.config_generation.set(generation as i64);
        Some(generation)
    }

    /// Puts the tokens of `file` in force for requests that start from now on (access control must be on:
    /// whether it is only changes at start).
    pub fn replace_tokens(&self, file: &TokensFile) {
        let access = Access::from_file(file);
        self.telemetry.metrics.auth_tokens.set(access.len() as i64);
        *self.access.write().expect("access lock poisoned") = Arc::new(access);
    }

    /// Whether access control is on.
    pub fn access_control(&self) -> bool {
        self.access.read().expect("access lock poisoned").enabled()
    }

    /// Who a request is, from its `authorization` header or metadata and its connection's client
    /// certificate; refusals are counted by reason, and never log the token.
    pub fn authenticate(&self, authorization: Option<&[u8]>, peer: Option<&str>) -> Result<Identity, IngestError> {
        let access = self.access.read().expect("access lock poisoned").clone();
        access.authenticate(authorization, peer).map_err(|refusal| self.auth_refused(refusal, None, ""))
    }

    /// Whether `who` may write `stream` (its own grants, or the stream's `writers`).
    pub fn authorize_write(&self, who: &Identity, stream: &str) -> Result<(), IngestError> {
        let routes = self.routes();
        let writers = routes.streams.get(stream).map_or(&[][..], |config| config.writers.as_slice());
        who.may_write(stream, writers).map_err(|refusal| self.auth_refused(refusal, who.name(), stream))
    }

    /// Whether `who` may read (queries, table reads, listings, `GET /streams`).
    pub fn authorize_query(&self, who: &Identity) -> Result<(), IngestError> {
        who.may_query().map_err(|refusal| self.auth_refused(refusal, who.name(), ""))
    }

    fn auth_refused(&self, refusal: Refusal, name: Option<&str>, stream: &str) -> IngestError {
        self.telemetry.metrics.auth_refused(refusal);
        let name = name.unwrap_or("");
        tracing::info!(reason = refusal.reason(), token = name, stream, "Refused a request by access control.");
        match refusal {
            Refusal::Missing => IngestError::Unauthenticated(
                "this server needs a token: send Authorization: Bearer <token> (or a client certificate it knows)"
                    .to_owned(),
            ),
            Refusal::Invalid => IngestError::Unauthenticated("the token is not valid".to_owned()),
            Refusal::StreamNotGranted => {
                IngestError::PermissionDenied(format!("token {name:?} may not write stream {stream:?}"))
            }
            Refusal::QueryNotGranted => IngestError::PermissionDenied(format!(
                "token {name:?} may not query (Flight SQL, DoGet, the Flight listings, GET /streams)"
            )),
        }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    pub fn queries(&self) -> &QueryService {
        &self.queries
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The memory budget: transports reserve a message's receive buffer against it before they fill one.
    pub fn budget(&self) -> &MemoryBudget {
        self.loader.budget()
    }

    /// Reads the resource gauges (memory, storage sizes, the volume's room) for a scrape.
    pub async fn refresh_resources(&self) {
        let database = self.database.clone();
        let resources = tokio::task::spawn_blocking(move || {
            let sizes = database.sizes();
            Resources {
                resident_memory_bytes: metrics::resident_memory_bytes(),
                duckdb_memory_bytes: database.memory_bytes().ok(),
                database_file_bytes: sizes.data_bytes,
                wal_file_bytes: sizes.log_bytes,
                storage_free_bytes: sizes.volume.map(|volume| volume.free_bytes),
                storage_total_bytes: sizes.volume.map(|volume| volume.total_bytes),
            }
        })
        .await
        .unwrap_or_default();
        let metrics = &self.telemetry.metrics;
        metrics.set_resources(&resources);
        metrics.inflight_bytes.set(self.loader.budget().used() as i64);
        let unwritten = self.loader.journal().map_or(0, |journal| journal.unapplied());
        metrics.journal_unwritten_requests.set(unwritten as i64);
    }

    /// Counts a request refused before it reached the core (a transport's own checks).
    pub fn refused(&self, protocol: metrics::Protocol, stream: &str, error: &IngestError) {
        self.telemetry.record_request(protocol, stream, Some(error), 0, Instant::now());
    }
}

/// The journal's directory: configured, or beside the database file or the lake's local catalog.
fn journal_dir(config: &Config) -> PathBuf {
    let beside = |path: &Path| {
        let mut name = path.as_os_str().to_owned();
        name.push(".journal");
        PathBuf::from(name)
    };
    match (&config.journal.path, &config.storage) {
        (Some(path), _) => path.clone(),
        (None, StorageConfig::Duckdb) => beside(&config.db_path),
        // Validation refuses a PostgreSQL catalog without a path.
        (None, StorageConfig::Ducklake(lake)) => beside(Path::new(&lake.catalog)),
    }
}

/// The memory plan: the budget and DuckDB's memory limit, each the configured one or derived from the
/// memory this process may use ([`sizing`]). DuckDB's limit is `None` (its own default) only where that
/// memory cannot be read.
fn memory_plan(config: &Config) -> (u64, Option<u64>) {
    let available = sizing::available();
    let budget = match (config.limits.memory_budget_bytes, available) {
        (Some(budget), _) => budget.0,
        (None, Some(available)) => sizing::default_budget(available.bytes),
        (None, None) => sizing::MAX_BUDGET_BYTES,
    };
    let Some(available) = available else {
        return (budget, config.duckdb.memory_limit.map(|limit| limit.0));
    };
    let duckdb =
        config.duckdb.memory_limit.map_or_else(|| sizing::default_duckdb_limit(available.bytes, budget), |l| l.0);
    // In MiB: ByteSize prints sizes that are not whole units in bytes.
    let (budget_mib, duckdb_mib, available_mib) = (budget >> 20, duckdb >> 20, available.bytes >> 20);
    if budget + duckdb > available.bytes {
        tracing::warn!(
            budget_mib, duckdb_mib, available_mib, source = %available.source,
            "limits.memory_budget_bytes and DuckDB's memory limit together exceed the memory available, with \
             nothing left for the process itself; lower them or give the process more memory."
        );
    } else {
        tracing::info!(
            budget_mib, duckdb_mib, available_mib, source = %available.source,
            "Memory plan: the budget for requests in flight, DuckDB's memory limit, and the rest for the process."
        );
    }
    (budget, Some(duckdb))
}
