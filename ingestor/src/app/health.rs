//! Storage health: whether writes can succeed, as far as the core knows, for `/readyz`.
//!
//! Two things make the ingester not ready, each cleared without a restart:
//!
//! - **A full volume.** A write that fails for lack of space (`insufficient_storage`: DuckDB's "No space
//!   left on device" or a spent quota) marks the storage full. DuckDB rolls that write back and keeps
//!   serving, so there is nothing to repair: the mark is cleared once the volume [has room](has_room)
//!   again, as a check every [`CHECK_INTERVAL`] sees it (`statvfs`). A successful commit does not clear
//!   it: a small one can still fit in the WAL's last, partly written page of a volume with no byte free.
//! - **An invalidated database.** When a checkpoint cannot write, DuckDB invalidates the whole instance:
//!   every statement fails from then on, even once space returns, until the file is opened again. The
//!   check notices (a trivial statement fails that way), and once the volume has room it closes the
//!   instance, waits for the connections still open on it, and opens the file again; DuckDB replays the
//!   WAL, so everything committed is back. Arrowport's own checkpoints are not run while the volume lacks
//!   room, but DuckDB also checkpoints by itself at the commit that takes the WAL past
//!   `duckdb.checkpoint_threshold`.
//!
//! Readiness only steers traffic: requests that arrive anyway are answered as usual (`507
//! insufficient_storage` while the volume is full).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::App;
use crate::error::IngestError;
use crate::store::StorageSizes;

/// How often the storage is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The smallest and largest margin [`has_room`] asks for beyond the WAL's size.
const MIN_MARGIN: u64 = 1 << 20;
const MAX_MARGIN: u64 = 64 << 20;

/// What is wrong with the storage, if anything.
#[derive(Default)]
pub(super) struct Health {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The error of the write that found the volume full; cleared once it has room.
    full: Option<String>,
    /// Why DuckDB invalidated the instance; cleared once it is reopened.
    invalidated: Option<String>,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("health lock poisoned")
    }
}

/// Whether the volume has room for writes again: free space for what a checkpoint may write (about the
/// WAL's size, which it folds into the file) and a margin of 1% of the volume, from 1 MiB up to 64 MiB.
/// A volume whose room cannot be read counts as having room: then only failing writes tell.
pub fn has_room(sizes: &StorageSizes) -> bool {
    sizes.volume.is_none_or(|volume| {
        let margin = (volume.total_bytes / 100).clamp(MIN_MARGIN, MAX_MARGIN);
        volume.free_bytes >= sizes.log_bytes.saturating_add(margin)
    })
}

impl App {
    /// Why the ingester should get no traffic now (`/readyz` answers 503 with it), or `None` when ready.
    pub fn not_ready(&self) -> Option<String> {
        if self.is_shutting_down() {
            return Some("shutting down".to_owned());
        }
        let state = self.health.state();
        // On one line: DuckDB's messages may span several.
        let one_line = |text: &str| text.replace('\n', " ");
        if let Some(reason) = &state.invalidated {
            return Some(format!(
                "DuckDB invalidated the database after a fatal error; it is reopened once the volume has room \
                 ({})",
                one_line(reason)
            ));
        }
        let full = state.full.as_deref()?;
        Some(format!("the database's volume is full: writes fail until space is freed ({})", one_line(full)))
    }

    /// Takes note of a request that failed: a full volume makes the ingester not ready until it has room.
    pub(crate) fn note_failure(&self, error: &IngestError) {
        if let IngestError::InsufficientStorage(message) = error {
            let mut state = self.health.state();
            if state.full.is_none() {
                tracing::warn!(%message, "The database's volume is full: not ready until it has room again.");
            }
            state.full = Some(message.clone());
        }
    }

    /// Looks at the storage once: clears the full mark if the volume has room, notices an invalidated
    /// database and reopens it once the volume has room. Blocking (file system and DuckDB calls).
    pub fn check_storage(&self) {
        let database = self.database();
        let room = has_room(&database.sizes());
        let invalidated = database.invalidated();
        let mut state = self.health.state();
        if let Some(reason) = invalidated {
            if state.invalidated.is_none() {
                tracing::error!(%reason, "DuckDB invalidated the database; reopening it once the volume has room.");
            }
            state.invalidated = Some(reason);
        }
        if room && state.full.take().is_some() {
            tracing::info!("The database's volume has room again: ready.");
        }
        if let Some(reason) = state.invalidated.clone()
            && room
        {
            drop(state);
            database.close(&reason);
            self.loader.drop_stale_connections();
            match database.reopen() {
                Ok(()) => {
                    tracing::info!("Reopened the database: DuckDB replayed its WAL.");
                    self.health.state().invalidated = None;
                }
                Err(error) => tracing::warn!(%error, "The database is not reopened yet; trying again."),
            }
        }
    }

    /// Checks the storage every [`CHECK_INTERVAL`] (see [`check_storage`](Self::check_storage)).
    pub fn spawn_storage_checks(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let app = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CHECK_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let app = app.clone();
                if let Err(join) = tokio::task::spawn_blocking(move || app.check_storage()).await {
                    tracing::error!(%join, "The storage check failed.");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Volume;

    fn sizes(log_bytes: u64, free_bytes: u64, total_bytes: u64) -> StorageSizes {
        StorageSizes { data_bytes: 0, log_bytes, volume: Some(Volume { free_bytes, total_bytes }) }
    }

    #[test]
    fn room_is_the_wal_and_a_margin_of_the_volume() {
        const MIB: u64 = 1 << 20;
        // A 16 MiB volume: a margin of 1 MiB.
        assert!(has_room(&sizes(0, MIB, 16 * MIB)));
        assert!(!has_room(&sizes(0, MIB - 1, 16 * MIB)));
        assert!(!has_room(&sizes(4 * MIB, 4 * MIB, 16 * MIB)), "the WAL's size comes on top");
        assert!(has_room(&sizes(4 * MIB, 5 * MIB, 16 * MIB)));
        // 1% of a 1 GiB volume; at most 64 MiB of a large one.
        assert!(!has_room(&sizes(0, 10 * MIB, 1 << 30)));
        assert!(has_room(&sizes(0, 11 * MIB, 1 << 30)));
        assert!(has_room(&sizes(0, 64 * MIB, 1 << 40)));
        assert!(has_room(&StorageSizes::default()), "a volume that cannot be read counts as having room");
    }
}
