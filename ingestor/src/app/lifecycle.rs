//! Lifecycle: shutting down in order (refuse new requests, let open ones finish, abort the rest at the
//! deadline, checkpoint last) and checkpointing on a schedule in between.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{App, WireCounter, health};
use crate::error::IngestError;
use crate::load::Scope;
use crate::store::Checkpoint;

/// How often expired idempotency keys are pruned (and the remembered ones counted).
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How often a wait for the client looks whether any of its bytes arrived: the idle timeout's precision.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// Runs `work` every `interval`, the first time one interval from now.
fn every<F, Fut>(interval: Duration, app: Arc<App>, work: F) -> JoinHandle<()>
where
    F: Fn(Arc<App>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            work(app.clone()).await;
        }
    })
}

/// Where the process is in its life.
#[derive(Default)]
pub(super) struct Lifecycle {
    shutting_down: AtomicBool,
    /// Cancelled when the shutdown deadline passes: uploads still open roll back and answer at once.
    aborting: CancellationToken,
}

impl App {
    /// From now on new requests are refused (`shutting_down`, and `/readyz` says so).
    pub fn begin_shutdown(&self) {
        self.lifecycle.shutting_down.store(true, Ordering::Relaxed);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.lifecycle.shutting_down.load(Ordering::Relaxed)
    }

    /// Cancelling this token aborts every upload still open (at the shutdown deadline).
    pub fn abort_token(&self) -> CancellationToken {
        self.lifecycle.aborting.clone()
    }

    /// How long an upload may wait for the client's next bytes or message.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_seconds)
    }

    /// Waits for the client's next piece of an upload: `None` at its end; an error when no byte of it
    /// arrives on `wire` for the idle timeout (a piece may take longer, as long as its bytes keep
    /// coming), or when the shutdown deadline passes first.
    pub async fn next_from_client<T>(
        &self,
        next: impl Future<Output = Option<T>>,
        wire: &WireCounter,
    ) -> Result<Option<T>, IngestError> {
        let timeout = self.idle_timeout();
        let step = timeout.min(IDLE_CHECK);
        let mut next = std::pin::pin!(next);
        let (mut seen, mut since) = (wire.progress(), Instant::now());
        loop {
            tokio::select! {
                next = &mut next => return Ok(next),
                () = tokio::time::sleep(step) => {
                    let now = wire.progress();
                    if now != seen {
                        (seen, since) = (now, Instant::now());
                    } else if since.elapsed() >= timeout {
                        return Err(IngestError::IdleTimeout { seconds: timeout.as_secs() });
                    }
                }
                () = self.lifecycle.aborting.cancelled() => return Err(IngestError::ShuttingDown),
            }
        }
    }

    /// Checkpoints the storage (for a DuckDB file, folds the WAL into it) and counts it. A checkpoint
    /// DuckDB cannot take now (other writes in progress) fails harmlessly and is tried again next time.
    /// Nor is one run while the volume lacks room for it (see [`health::has_room`]): a checkpoint that
    /// cannot write makes DuckDB invalidate the whole database until it is reopened.
    pub async fn checkpoint(&self) -> Result<Checkpoint, IngestError> {
        let database = self.database.clone();
        let started = Instant::now();
        let checkpoint = move || {
            let sizes = database.sizes();
            if !health::has_room(&sizes) {
                let free = sizes.volume.map_or(0, |volume| volume.free_bytes);
                return Err(IngestError::InsufficientStorage(format!(
                    "checkpoint not run: the volume has {free} bytes free, too little for the WAL's {} bytes \
                     and a margin",
                    sizes.log_bytes
                )));
            }
            database.checkpoint()
        };
        let outcome = match tokio::task::spawn_blocking(checkpoint).await {
            Ok(outcome) => outcome,
            Err(join) => Err(IngestError::Database(format!("checkpoint task failed: {join}"))),
        };
        self.telemetry.record_checkpoint(outcome.as_ref().ok().copied(), started.elapsed());
        outcome
    }

    /// Starts the work done on a schedule until the returned tasks are aborted: checkpoints every
    /// `duckdb.checkpoint_interval_seconds` (unless 0), and pruning expired idempotency keys every
    /// [`PRUNE_INTERVAL`]. Failures are logged and tried again next time.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(interval) = self.checkpoint_interval {
            tasks.push(every(interval, self.clone(), |app| async move {
                if let Err(error) = app.checkpoint().await {
                    tracing::info!(%error, "Periodic checkpoint not taken; trying again next interval.");
                }
            }));
        }
        tasks.push(every(PRUNE_INTERVAL, self.clone(), |app| async move {
            match app.loader.prune_receipts(app.key_window).await {
                Ok(left) => {
                    app.telemetry.metrics.idempotency_keys.set(left as i64);
                }
                Err(error) => tracing::info!(%error, "Expired idempotency keys not pruned; trying again later."),
            }
        }));
        tasks
    }

    /// The last step of a shutdown, once no request is open: the journaled requests are written (those
    /// that cannot be in the shutdown timeout are written at the next start), a final checkpoint, then
    /// what others wait for is handed over (a lake's maintenance turn).
    pub async fn finish(&self) {
        let timeout = Duration::from_secs(self.limits.shutdown_timeout_seconds);
        match tokio::time::timeout(timeout, self.loader.settle(Scope::All)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "Journaled requests are written at the next start."),
            Err(_) => tracing::warn!("Journaled requests not yet written to their tables; they are at the next start."),
        }
        match self.checkpoint().await {
            Ok(_) => tracing::info!("Checkpointed the database."),
            Err(error) => tracing::error!(%error, "Checkpoint at shutdown failed; the WAL is replayed at next start."),
        }
        let database = self.database.clone();
        match tokio::task::spawn_blocking(move || database.hand_over()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "Could not hand over the lake's maintenance turn; it passes on when its lease runs out.")
            }
            Err(join) => tracing::warn!(%join, "Handing over the lake's maintenance turn failed."),
        }
    }
}
