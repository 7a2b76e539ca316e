//! The storage seam: what differs between kinds of storage behind the one DuckDB instance.
//!
//! Everything above [`Database`](super::Database) (loading, queries, routing) sees only a catalog to
//! write tables into. A storage kind says which file DuckDB opens, how the data catalog is attached,
//! what a checkpoint means for it, how big it is, and what it cannot store. Two kinds: a DuckDB file
//! ([`DuckDbFile`]) and a DuckLake ([`DuckLake`](super::DuckLake)).

use std::path::{Path, PathBuf};

use duckdb::Connection;

use crate::error::IngestError;

/// Bytes a storage takes on disk, and the room left on its volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageSizes {
    /// The data itself (a DuckDB file).
    pub data_bytes: u64,
    /// Written but not yet folded into the data (a DuckDB write-ahead log).
    pub log_bytes: u64,
    /// The volume the storage writes to; `None` where that cannot be read (or there is no such volume).
    pub volume: Option<Volume>,
}

/// A file system's size and the room left on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Volume {
    /// Bytes an unprivileged writer may still take (`statvfs`'s `f_bavail`: without the blocks reserved
    /// for root).
    pub free_bytes: u64,
    pub total_bytes: u64,
}

impl Volume {
    /// The volume holding `path` (a file or directory that exists).
    #[cfg(unix)]
    pub fn of(path: &Path) -> Option<Self> {
        let stat = rustix::fs::statvfs(path).ok()?;
        Some(Self {
            free_bytes: stat.f_bavail.saturating_mul(stat.f_frsize),
            total_bytes: stat.f_blocks.saturating_mul(stat.f_frsize),
        })
    }

    /// Not read on this platform.
    #[cfg(not(unix))]
    pub fn of(_path: &Path) -> Option<Self> {
        None
    }
}

/// What a checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    Done,
    /// Another ingester sharing the storage holds the turn to maintain it.
    NotOurTurn,
}

/// One kind of storage.
pub trait Storage: Send + Sync + 'static {
    /// The kind's name, as configured (`storage.kind`).
    fn kind(&self) -> &'static str;

    /// Where the data is, for logs.
    fn describe(&self) -> String;

    /// The file DuckDB opens as its main database.
    fn database_path(&self) -> &Path;

    /// Attaches the data catalog on the freshly opened database (file access is still allowed) and
    /// returns its name.
    fn attach(&self, admin: &Connection) -> Result<String, IngestError>;

    /// Folds recent writes into their long-term form. May fail harmlessly when other writes are in
    /// progress; it is tried again later.
    fn checkpoint(&self, admin: &Connection) -> Result<Checkpoint, IngestError>;

    /// After the last checkpoint of a shutdown: gives up whatever this process holds that others wait
    /// for (a lake's maintenance turn).
    fn hand_over(&self, _admin: &Connection) -> Result<(), IngestError> {
        Ok(())
    }

    /// What the storage takes on disk now, and the room left on its volume.
    fn sizes(&self) -> StorageSizes;

    /// Why a column of this DuckDB type cannot be stored here, if it cannot.
    fn unsupported_type(&self, _sql_type: &str) -> Option<String> {
        None
    }

    /// Whether creating or altering a table commits on its own, before the rows' transaction, because
    /// another writer may race it (and a conflict found at the rows' commit could not be retried).
    fn schema_changes_alone(&self) -> bool {
        false
    }
}

/// Free space beyond twice the WAL that a checkpoint at start needs.
const STARTUP_CHECKPOINT_MARGIN: u64 = 64 << 20;

/// A DuckDB database file: the data catalog is the file itself, its WAL beside it.
#[derive(Debug, Clone)]
pub struct DuckDbFile {
    path: PathBuf,
}

impl DuckDbFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl Storage for DuckDbFile {
    fn kind(&self) -> &'static str {
        "duckdb"
    }

    fn describe(&self) -> String {
        format!("DuckDB file {}", self.path.display())
    }

    fn database_path(&self) -> &Path {
        &self.path
    }

    fn attach(&self, admin: &Connection) -> Result<String, IngestError> {
        // DuckDB replays the WAL at open but does not fold it into the file: the first commit past
        // `checkpoint_threshold` would, holding every other commit for seconds under load (the crash test
        // measured 5.5-6.5 s for 64 MiB, so an ingester killed repeatedly never got past it). Fold it now,
        // before any request, if the volume has room: a checkpoint that cannot write invalidates the database.
        let sizes = self.sizes();
        let room =
            sizes.volume.is_none_or(|volume| volume.free_bytes > 2 * sizes.log_bytes + STARTUP_CHECKPOINT_MARGIN);
        if sizes.log_bytes > 0 && room {
            let started = std::time::Instant::now();
            admin.execute_batch("CHECKPOINT")?;
            tracing::info!(
                wal_bytes = sizes.log_bytes,
                seconds = started.elapsed().as_secs_f64(),
                "Folded the write-ahead log replayed at start into the database file."
            );
        }
        Ok(admin.query_row("SELECT current_database()", [], |row| row.get(0))?)
    }

    fn checkpoint(&self, admin: &Connection) -> Result<Checkpoint, IngestError> {
        admin.execute_batch("CHECKPOINT")?;
        Ok(Checkpoint::Done)
    }

    fn sizes(&self) -> StorageSizes {
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        let mut wal = self.path.clone().into_os_string();
        wal.push(".wal");
        // The directory, not the file: it exists even before the file does.
        let directory = match self.path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        StorageSizes { data_bytes: size(&self.path), log_bytes: size(Path::new(&wal)), volume: Volume::of(directory) }
    }
}
