//! The transports: HTTP ([`http`]) and Arrow Flight ([`flight`]), siblings that never import each other,
//! each a thin adapter between its protocol and the [`App`]. This module serves both, on one listener
//! or two, and owns what they share: the accept loop ([`listen`]), TLS ([`tls`]) and the panic guard.

pub mod flight;
pub mod http;
mod listen;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};

use crate::app::App;

/// A layer that answers a request whose handler panicked with `answer()` and counts it in
/// `arrowport_panics_total`, instead of dropping the connection: the fix is to make the panic an error,
/// this keeps one bug from costing the client its answer.
pub fn catch_panics(
    app: &Arc<App>,
    answer: fn() -> axum::response::Response,
) -> CatchPanicLayer<impl ResponseForPanic<ResponseBody = axum::body::Body> + use<>> {
    let app = app.clone();
    CatchPanicLayer::custom(move |_panic: Box<dyn std::any::Any + Send>| {
        app.telemetry().record_panic();
        answer()
    })
}

/// Serves HTTP, and Arrow Flight on the same listener unless `flight_listener` is given, over TLS with
/// `tls`, until `shutdown` completes; then lets in-flight requests finish and checkpoints.
pub async fn serve(
    listener: TcpListener,
    flight_listener: Option<TcpListener>,
    app: Arc<App>,
    tls: Option<tls::Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal_app = app.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal_app.begin_shutdown();
        tracing::info!("Shutting down: no new connections; finishing in-flight requests.");
        let _ = stop.send(true);
    });
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let background = app.spawn_background();
    let storage_checks = app.spawn_storage_checks();
    let limits = app.limits();
    let timeouts = listen::Timeouts {
        header: Duration::from_secs(limits.header_timeout_seconds),
        shutdown: Duration::from_secs(limits.shutdown_timeout_seconds),
    };
    let abort = app.abort_token();
    let (http, flight) = (http::router(app.clone()), flight::router(app.clone()));
    match flight_listener {
        None => listen::serve(listener, http.merge(flight), until_stopped(), timeouts, abort, tls).await,
        Some(flight_listener) => {
            let http = listen::serve(listener, http, until_stopped(), timeouts, abort.clone(), tls.clone());
            let flight = listen::serve(flight_listener, flight, until_stopped(), timeouts, abort, tls);
            tokio::join!(http, flight);
        }
    }
    background.iter().for_each(|task| task.abort());
    storage_checks.abort();
    app.finish().await;
}
