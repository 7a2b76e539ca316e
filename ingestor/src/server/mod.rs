//! The network front: one listener, one router. Flight joins this router later, on the same port.

mod body;
mod http;
pub mod streams;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrowport_config::Limits;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::load::Loader;
use crate::metrics::Metrics;
use crate::routing::Routes;

pub use body::ContentEncoding;
pub use http::IngestReport;
pub use streams::{StreamReport, StreamStats, StreamsReport};

/// What every request handler shares.
pub struct AppState {
    pub loader: Loader,
    routes: RwLock<Arc<Routes>>,
    pub limits: Limits,
    pub metrics: Metrics,
    stats: Mutex<BTreeMap<String, StreamStats>>,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(loader: Loader, routes: Routes, limits: Limits) -> Self {
        let metrics = Metrics::default();
        metrics.memory_budget_bytes.set(loader.budget().capacity() as i64);
        metrics.config_generation.set(routes.generation as i64);
        Self {
            loader,
            routes: RwLock::new(Arc::new(routes)),
            limits,
            metrics,
            stats: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
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

    /// Records a committed request in the per-stream totals; returns the stream's compression ratio.
    fn add_commit(&self, report: &IngestReport) -> f64 {
        let mut stats = self.stats.lock().expect("stats lock poisoned");
        streams::add_commit(&mut stats, &report.stream, report);
        let totals = &stats[&report.stream];
        totals.bytes_decoded as f64 / totals.bytes_received.max(1) as f64
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
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
        .with_state(state)
}

/// Serves until `shutdown` completes, then lets in-flight requests finish and checkpoints.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let signal_state = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            signal_state.shutting_down.store(true, Ordering::Relaxed);
            tracing::info!("Shutting down: no new connections; finishing in-flight requests.");
        })
        .await?;
    let loader = state.loader.clone();
    match tokio::task::spawn_blocking(move || loader.checkpoint()).await {
        Ok(Ok(())) => tracing::info!("Checkpointed the database."),
        Ok(Err(error)) => {
            tracing::error!(%error, "Checkpoint at shutdown failed; the WAL is replayed at next start.")
        }
        Err(error) => tracing::error!(%error, "Checkpoint task failed."),
    }
    Ok(())
}
