//! The accept loop: HTTP/1.1 and HTTP/2 (gRPC) on one listener, with HTTP/2 sized for bulk Arrow data.
//!
//! `axum::serve` keeps hyper's HTTP/2 defaults: 16 KiB frames and a 1 MiB receive window per stream,
//! which a Flight `DoPut` of multi-megabyte record batches fills many times per batch, leaving the
//! producer waiting for window updates. This loop is `axum::serve` with those two settings raised.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

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

/// Serves `app` on `listener` until `stop` completes, then waits for open connections to finish their
/// requests (each is told to close once idle).
pub async fn serve(listener: TcpListener, app: Router, stop: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
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
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service).into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}
