//! The network front: one listener, one router for HTTP and Arrow Flight (or a second listener for Flight).

mod body;
mod http;
mod listen;
pub mod streams;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrowport_config::{DuckDbSettings, Limits};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};

use crate::error::IngestError;
use crate::load::Loader;
use crate::metrics::{self, CheckpointLabels, Metrics, OutcomeLabels, Protocol, Resources, StreamLabels};
use crate::routing::Routes;

pub use body::ContentEncoding;
pub use http::{IngestReport, panicked};
pub use streams::{StreamReport, StreamStats, StreamsReport};

/// What every request handler shares.
pub struct AppState {
    pub loader: Loader,
    routes: RwLock<Arc<Routes>>,
    pub limits: Limits,
    pub duckdb: DuckDbSettings,
    pub metrics: Metrics,
    stats: Mutex<BTreeMap<String, StreamStats>>,
    shutting_down: AtomicBool,
    /// Cancelled when the shutdown deadline passes: uploads still open roll back and answer at once.
    aborting: CancellationToken,
}

impl AppState {
    pub fn new(loader: Loader, routes: Routes, limits: Limits, duckdb: DuckDbSettings) -> Self {
        let metrics = Metrics::default();
        metrics.memory_budget_bytes.set(loader.budget().capacity() as i64);
        if let Some(limit) = loader.memory_limit() {
            metrics.duckdb_memory_limit_bytes.set(limit as i64);
        }
        metrics.config_generation.set(routes.generation as i64);
        Self {
            loader,
            routes: RwLock::new(Arc::new(routes)),
            limits,
            duckdb,
            metrics,
            stats: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
            aborting: CancellationToken::new(),
        }
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
        self.metrics.config_generation.set(generation as i64);
        Some(generation)
    }

    /// Per-stream totals since start.
    pub fn stream_stats(&self) -> BTreeMap<String, StreamStats> {
        self.stats.lock().expect("stats lock poisoned").clone()
    }

    /// Counts one commit (a whole HTTP request, or one flush of a Flight call) in the metrics and the
    /// per-stream totals.
    pub fn record_commit(&self, protocol: Protocol, report: &IngestReport) {
        let ratio = {
            let mut stats = self.stats.lock().expect("stats lock poisoned");
            streams::add_commit(&mut stats, &report.stream, report);
            let totals = &stats[&report.stream];
            totals.bytes_decoded as f64 / totals.bytes_received.max(1) as f64
        };
        let labels = StreamLabels { stream: report.stream.clone(), protocol };
        let metrics = &self.metrics;
        metrics.rows.get_or_create(&labels).inc_by(report.rows);
        metrics.batches.get_or_create(&labels).inc_by(report.batches);
        metrics.decoded_bytes.get_or_create(&labels).inc_by(report.bytes_decoded);
        metrics.compression_ratio.get_or_create(&labels).set(ratio);
        metrics.commit_duration.get_or_create(&labels).observe(report.commit_time.as_secs_f64());
        if report.grouped {
            metrics.grouped_requests.get_or_create(&labels).inc();
        }
        tracing::debug!(stream = %report.stream, table = %report.table, rows = report.rows, %protocol, "Committed.");
    }

    /// Counts a finished request (its wire bytes, duration and outcome) and logs a failure.
    pub fn record_request(
        &self,
        protocol: Protocol,
        stream: &str,
        error: Option<&IngestError>,
        wire_bytes: u64,
        started: Instant,
    ) {
        let metrics = &self.metrics;
        // Names that never became a stream are not labels: that would let any client mint time series.
        let label = match error {
            Some(IngestError::InvalidStreamName(_) | IngestError::UnknownStream(_)) => "",
            _ => stream,
        };
        let labels = StreamLabels { stream: label.to_owned(), protocol };
        metrics.received_bytes.get_or_create(&labels).inc_by(wire_bytes);
        metrics.request_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        let outcome = match error {
            None => "ok",
            Some(error) => {
                if matches!(error, IngestError::Overloaded) {
                    metrics.overloaded.get_or_create(&labels).inc();
                }
                if matches!(error, IngestError::SchemaMismatch(_)) {
                    metrics.schema_mismatches.get_or_create(&labels).inc();
                    tracing::warn!(stream, %protocol, %error, "Refused data whose schema does not fit the table.");
                } else if error.status_code().is_server_error() {
                    tracing::error!(stream, %protocol, code = error.code(), %error, "Ingest failed; its uncommitted data was rolled back.");
                } else {
                    tracing::info!(stream, %protocol, code = error.code(), %error, "Refused an ingest request.");
                }
                error.code()
            }
        };
        metrics
            .requests
            .get_or_create(&OutcomeLabels { stream: labels.stream, protocol, outcome: outcome.to_owned() })
            .inc();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Completes when the shutdown deadline has passed: an upload waiting for data stops, rolls back and
    /// answers `shutting_down`.
    pub async fn aborted(&self) {
        self.aborting.cancelled().await
    }

    /// How long an upload may wait for the client's next bytes or message.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_seconds)
    }

    /// Waits for the client's next piece of an upload: `None` at its end; an error when it stays silent
    /// past the idle timeout, or when the shutdown deadline passes first.
    pub async fn next_from_client<T>(&self, next: impl Future<Output = Option<T>>) -> Result<Option<T>, IngestError> {
        let timeout = self.idle_timeout();
        tokio::select! {
            next = tokio::time::timeout(timeout, next) => {
                next.map_err(|_| IngestError::IdleTimeout { seconds: timeout.as_secs() })
            }
            () = self.aborted() => Err(IngestError::ShuttingDown),
        }
    }

    /// Runs `CHECKPOINT` (folding the WAL into the database file) and counts it. A checkpoint DuckDB
    /// cannot take now (other writes in progress) fails harmlessly and is tried again next time.
    pub async fn checkpoint(&self) -> Result<(), IngestError> {
        let loader = self.loader.clone();
        let started = Instant::now();
        let outcome = match tokio::task::spawn_blocking(move || loader.checkpoint()).await {
            Ok(outcome) => outcome,
            Err(join) => Err(IngestError::Database(format!("checkpoint task failed: {join}"))),
        };
        let label = CheckpointLabels { outcome: if outcome.is_ok() { "ok" } else { "failed" } };
        self.metrics.checkpoints.get_or_create(&label).inc();
        if outcome.is_ok() {
            self.metrics.checkpoint_duration.observe(started.elapsed().as_secs_f64());
        }
        outcome
    }

    /// Reads the resource gauges (memory, file sizes) for a scrape.
    pub async fn refresh_resources(&self) {
        let loader = self.loader.clone();
        let resources = tokio::task::spawn_blocking(move || {
            let (database_file_bytes, wal_file_bytes) = loader.file_sizes();
            Resources {
                resident_memory_bytes: metrics::resident_memory_bytes(),
                duckdb_memory_bytes: loader.duckdb_memory_bytes().ok(),
                database_file_bytes,
                wal_file_bytes,
            }
        })
        .await
        .unwrap_or_default();
        self.metrics.set_resources(&resources);
        self.metrics.inflight_bytes.set(self.loader.budget().used() as i64);
    }
}

/// Checkpoints every `interval` until the process stops; failures are logged and retried next time.
async fn checkpoint_periodically(state: Arc<AppState>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = state.checkpoint().await {
            tracing::info!(%error, "Periodic checkpoint not taken; trying again next interval.");
        }
    }
}

/// Counts a request in `arrowport_inflight_requests` for as long as it lives (cancellation included).
pub struct InflightRequest<'a>(&'a AppState);

impl<'a> InflightRequest<'a> {
    pub fn new(state: &'a AppState) -> Self {
        state.metrics.inflight_requests.inc();
        Self(state)
    }
}

impl Drop for InflightRequest<'_> {
    fn drop(&mut self) {
        self.0.metrics.inflight_requests.dec();
    }
}

/// All HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ingest/{stream}", post(http::ingest))
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .route("/streams", get(streams::list))
        // Bodies are streamed and limited by `limits.max_body_bytes` in the handler, not buffered.
        .layer(DefaultBodyLimit::disable())
        .layer(catch_panics(&state, http::panicked))
        .with_state(state)
}

/// A layer that answers a request whose handler panicked with `answer()` and counts it in
/// `arrowport_panics_total`, instead of dropping the connection: the fix is to make the panic an error,
/// this keeps one bug from costing the client its answer.
pub fn catch_panics(
    state: &Arc<AppState>,
    answer: fn() -> axum::response::Response,
) -> CatchPanicLayer<impl ResponseForPanic<ResponseBody = axum::body::Body> + use<>> {
    let state = state.clone();
    CatchPanicLayer::custom(move |_panic: Box<dyn std::any::Any + Send>| {
        state.metrics.panics.inc();
        answer()
    })
}

/// Serves HTTP, and Arrow Flight on the same listener unless `flight_listener` is given, until
/// `shutdown` completes; then lets in-flight requests finish and checkpoints.
pub async fn serve(
    listener: TcpListener,
    flight_listener: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal_state = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal_state.shutting_down.store(true, Ordering::Relaxed);
        tracing::info!("Shutting down: no new connections; finishing in-flight requests.");
        let _ = stop.send(true);
    });
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let checkpointer = match state.duckdb.checkpoint_interval_seconds {
        0 => None,
        seconds => Some(tokio::spawn(checkpoint_periodically(state.clone(), Duration::from_secs(seconds)))),
    };
    let flight = crate::flight::router(state.clone());
    let timeouts = listen::Timeouts {
        header: Duration::from_secs(state.limits.header_timeout_seconds),
        shutdown: Duration::from_secs(state.limits.shutdown_timeout_seconds),
    };
    let abort = state.aborting.clone();
    match flight_listener {
        None => listen::serve(listener, router(state.clone()).merge(flight), until_stopped(), timeouts, abort).await,
        Some(flight_listener) => {
            let http = listen::serve(listener, router(state.clone()), until_stopped(), timeouts, abort.clone());
            let flight = listen::serve(flight_listener, flight, until_stopped(), timeouts, abort);
            tokio::join!(http, flight);
        }
    }
    if let Some(checkpointer) = checkpointer {
        checkpointer.abort();
    }
    match state.checkpoint().await {
        Ok(()) => tracing::info!("Checkpointed the database."),
        Err(error) => tracing::error!(%error, "Checkpoint at shutdown failed; the WAL is replayed at next start."),
    }
}
