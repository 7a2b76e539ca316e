//! The accept loop: HTTP/1.1 and HTTP/2 (gRPC) on one listener, with HTTP/2 sized for bulk Arrow data.
//!
//! `axum::serve` keeps hyper's HTTP/2 defaults: 16 KiB frames and a 1 MiB receive window per stream,
//! which a Flight `DoPut` of multi-megabyte record batches fills many times per batch, leaving the
//! producer waiting for window updates. This loop is `axum::serve` with those two settings raised.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::tls::Tls;

/// Largest HTTP/2 frame we accept (the protocol's range is 16 KiB to 16 MiB). h2 reads each frame into a
/// buffer of about its size; below the allocator's mapping threshold those buffers are recycled arena
/// memory rather than fresh mappings, whose page faults cost a Flight `DoPut` ~5% of the server's CPU
/// at 1 MiB frames (measured: half the page faults, 0.73x -> 0.79x of in-process).
const MAX_FRAME_BYTES: u32 = 512 << 10;
const _: () = assert!(2 * MAX_FRAME_BYTES as usize <= crate::malloc::LARGE_BYTES, "frames must stay arena-sized");
/// Bytes a producer may send on one HTTP/2 stream before we have read them.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// …and on one connection, across its streams.
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// After the shutdown deadline, how long uploads have to answer once told to stop.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// The accept loop's time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a request's HTTP/1.1 headers to arrive.
    pub header: Duration,
    /// For open connections to finish their requests after `stop`.
    pub shutdown: Duration,
}

/// Serves `app` on `listener` (over TLS with `tls`) until `stop` completes, then waits up to the shutdown timeout for open
/// connections to finish their requests (each is told to close once idle). Past it, `abort` is
/// cancelled: uploads roll back and answer `shutting_down`, and connections get a few more seconds to
/// carry those answers; a client that still keeps its connection open is left to the process's exit.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: impl Future<Output = ()>,
    timeouts: Timeouts,
    abort: CancellationToken,
    tls: Option<Tls>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header);
    builder
        .http2()
        .max_frame_size(MAX_FRAME_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
    let connections = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(error) => {
                    // Typically out of file descriptors: wait rather than spin.
                    tracing::warn!(%error, "Could not accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if let Err(error) = socket.set_nodelay(true) {
            tracing::debug!(%error, "Could not set TCP_NODELAY.");
        }
        let Some(tls) = &tls else {
            let service = TowerToHyperService::new(app.clone());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service).into_owned();
            let connection = connections.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "Connection ended with an error.");
                }
            });
            continue;
        };
        // The handshake runs in the connection's task, so a slow client never holds up the accept loop;
        // it must finish within the header timeout.
        let (tls, builder, watcher, app) = (tls.clone(), builder.clone(), connections.watcher(), app.clone());
        tokio::spawn(async move {
            let Some((stream, peer)) = tls.accept(socket, timeouts.header).await else {
                return;
            };
            // Every request of the connection carries its client certificate's name, for access control.
            let service = app.map_request(move |mut request: axum::http::Request<Incoming>| {
                if let Some(peer) = &peer {
                    request.extensions_mut().insert(peer.clone());
                }
                request
            });
            let service = TowerToHyperService::new(service);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    let finished = connections.shutdown();
    tokio::pin!(finished);
    if tokio::time::timeout(timeouts.shutdown, &mut finished).await.is_err() {
        tracing::warn!(
            seconds = timeouts.shutdown.as_secs(),
            "Shutdown timeout passed: rolling back the uploads still open (answered shutting_down)."
        );
        abort.cancel();
        if tokio::time::timeout(ABORT_GRACE, finished).await.is_err() {
            tracing::warn!("Some connections are still open; exiting without them.");
        }
    }
}
