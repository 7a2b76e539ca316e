//! The database Arrowport writes to and reads from: one DuckDB instance, opened once, with the data
//! catalog a [`Storage`] provides.
//!
//! [`Database::open`] opens DuckDB, lets the storage attach its data catalog, attaches the in-memory
//! [`SCRATCH`] catalog where uploads are scanned, and then locks DuckDB down: from there on no connection
//! may touch a file beyond the storage's own nor change a setting. The loader ([`crate::load`]) and the
//! query service ([`crate::query`]) share the one `Database`.

mod ducklake;
mod ffi;
pub mod sql;
mod storage;

use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::error::IngestError;
pub use ducklake::DuckLake;
use ffi::RawDatabase;
pub use ffi::{Connection, RawConnection};
pub use storage::{Checkpoint, DuckDbFile, Storage, StorageSizes, Volume};

/// In-memory catalog holding the per-upload Arrow views, so nothing about them reaches the data.
pub const SCRATCH: &str = "arrowport_scratch";

/// How DuckDB itself is set up, whatever the storage.
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    /// DuckDB extensions to `LOAD` (built in or installed beforehand).
    pub extensions: Vec<String>,
    /// DuckDB's `memory_limit` in bytes; `None` keeps DuckDB's default.
    pub memory_limit: Option<u64>,
    /// DuckDB's `checkpoint_threshold` in bytes: the WAL size at which a commit checkpoints.
    pub checkpoint_threshold: u64,
    /// DuckDB's `threads`; `None` keeps DuckDB's default (every core).
    pub threads: Option<usize>,
}

/// The open DuckDB instance and its data catalog. Share it behind an `Arc`.
///
/// After a fatal error DuckDB invalidates its instance: every statement on every connection fails until
/// the instance is closed and opened again. DuckDB 1.5.5 does that when a checkpoint cannot write (the
/// volume is full), including the automatic one at the commit that takes the WAL past
/// `checkpoint_threshold`; what was committed is in the WAL and replayed when the file is opened again.
/// [`reopen`](Self::reopen) does that in place: connections handed out before keep the old instance
/// alive until they are dropped (each holds it), and the new one is opened only once the old one is
/// closed, so two instances never have the file open at once.
pub struct Database {
    storage: Box<dyn Storage>,
    options: DatabaseOptions,
    catalog: String,
    /// The open instance; `None` from the moment a reopen closes it until the new one is open.
    current: RwLock<Option<Arc<Instance>>>,
    /// The instance being closed by a reopen, and why.
    closing: Mutex<Option<Closing>>,
}

/// One open DuckDB instance.
struct Instance {
    admin: Mutex<Connection>,
    raw: Arc<RawDatabase>,
}

struct Closing {
    /// Gone (no strong reference) once the instance's last connection is dropped.
    old: Weak<RawDatabase>,
    reason: String,
}

impl Instance {
    /// Opens DuckDB on `storage`, prepares it as `options` say, and returns it with the data catalog's name.
    fn open(storage: &dyn Storage, options: &DatabaseOptions) -> Result<(Self, String), IngestError> {
        let path = storage.database_path();
        let raw = RawDatabase::open(path)
            .map_err(|e| IngestError::database(format!("cannot open {}: {e}", path.display())))?;
        let admin = raw.connect()?;
        if let Some(limit) = options.memory_limit {
            admin.execute_batch(&format!("SET memory_limit = '{limit}B'"))?;
        }
        admin.execute_batch(&format!("SET checkpoint_threshold = '{}B'", options.checkpoint_threshold))?;
        if let Some(threads) = options.threads {
            admin.execute_batch(&format!("SET threads = {threads}"))?;
        }
        for extension in &options.extensions {
            admin.execute_batch(&format!("LOAD {}", sql::ident(extension))).map_err(|e| {
                IngestError::Database(format!(
                    "cannot load DuckDB extension {extension:?} (it must be built in or installed beforehand; \
                     Arrowport does not download extensions): {e}"
                ))
            })?;
        }
        let catalog = storage.attach(&admin)?;
        admin.execute_batch(&format!("ATTACH IF NOT EXISTS ':memory:' AS {}", sql::ident(SCRATCH)))?;
        // From here on no connection may touch a file beyond the storage's own nor change a setting:
        // client queries cannot read the server's files, attach other databases, load extensions or switch
        // this back on.
        admin.execute_batch("SET enable_external_access = false; SET lock_configuration = true")?;
        Ok((Self { admin: Mutex::new(admin), raw }, catalog))
    }
}

impl Database {
    /// Opens DuckDB on `storage` and prepares it as `options` say.
    pub fn open(storage: Box<dyn Storage>, options: &DatabaseOptions) -> Result<Self, IngestError> {
        let (instance, catalog) = Instance::open(storage.as_ref(), options)?;
        Ok(Self {
            storage,
            options: options.clone(),
            catalog,
            current: RwLock::new(Some(Arc::new(instance))),
            closing: Mutex::new(None),
        })
    }

    /// The open instance, or the reason there is none (a reopen in progress).
    fn instance(&self) -> Result<Arc<Instance>, IngestError> {
        if let Some(instance) = self.current.read().expect("database lock poisoned").as_ref() {
            return Ok(instance.clone());
        }
        let closing = self.closing.lock().expect("database lock poisoned");
        let reason = closing.as_ref().map_or("", |closing| closing.reason.as_str());
        // Classified like DuckDB's own error: a full volume stays `insufficient_storage`.
        Err(IngestError::database(format!("the database is being reopened after a fatal error: {reason}")))
    }

    /// The data catalog's name (what Flight SQL calls the catalog).
    pub fn catalog(&self) -> &str {
        &self.catalog
    }

    /// The storage behind the data catalog.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// `"catalog"."main"."table"` in the data catalog.
    pub fn table_name(&self, table: &str) -> String {
        sql::qualified(&self.catalog, "main", table)
    }

    /// The `memory_limit` set on DuckDB, if Arrowport set one.
    pub fn memory_limit(&self) -> Option<u64> {
        self.options.memory_limit
    }

    /// A new connection for SQL, in the data catalog (names without a catalog are the data's).
    pub fn connect(&self) -> Result<Connection, IngestError> {
        let conn = self.instance()?.raw.connect()?;
        conn.execute_batch(&format!("USE {}", sql::ident(&self.catalog)))?;
        Ok(conn)
    }

    /// Whether `conn` is a connection to the instance open now (not to one closed by a reopen).
    pub fn is_current(&self, conn: &Connection) -> bool {
        self.current.read().expect("database lock poisoned").as_ref().is_some_and(|instance| conn.is_on(&instance.raw))
    }

    /// A raw connection in the data catalog (to classify statements).
    pub fn raw_connection(&self) -> Result<RawConnection, IngestError> {
        self.instance()?.raw.connection_in(&self.catalog).map_err(IngestError::database)
    }

    /// A raw connection in [`SCRATCH`], to register Arrow streams as views there.
    pub fn scan_connection(&self) -> Result<RawConnection, IngestError> {
        self.instance()?.raw.connection_in(SCRATCH).map_err(IngestError::database)
    }

    /// Folds recent writes into the storage's long-term form (for a DuckDB file: `CHECKPOINT`).
    pub fn checkpoint(&self) -> Result<Checkpoint, IngestError> {
        let instance = self.instance()?;
        let admin = instance.admin.lock().expect("admin connection lock poisoned");
        self.storage.checkpoint(&admin)
    }

    /// See [`Storage::hand_over`].
    pub fn hand_over(&self) -> Result<(), IngestError> {
        let instance = self.instance()?;
        let admin = instance.admin.lock().expect("admin connection lock poisoned");
        self.storage.hand_over(&admin)
    }

    /// What the storage takes on disk, and the room its volume has left.
    pub fn sizes(&self) -> StorageSizes {
        self.storage.sizes()
    }

    /// Bytes DuckDB's buffer manager holds, on a connection of its own (never waiting for a checkpoint).
    pub fn memory_bytes(&self) -> Result<u64, IngestError> {
        let conn = self.connect()?;
        let bytes: i64 =
            conn.query_row("SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory()", [], |row| {
                row.get(0)
            })?;
        Ok(bytes.max(0) as u64)
    }

    /// Runs `f` with the administrative connection (for status endpoints and tests).
    pub fn with_connection<T>(
        &self,
        f: impl FnOnce(&duckdb::Connection) -> duckdb::Result<T>,
    ) -> Result<T, IngestError> {
        let instance = self.instance()?;
        let admin = instance.admin.lock().expect("admin connection lock poisoned");
        Ok(f(&admin)?)
    }

    /// Why DuckDB refuses every statement, if it invalidated the instance after a fatal error (then only
    /// [`reopen`](Self::reopen) helps); `None` while it works, or while a reopen is in progress.
    pub fn invalidated(&self) -> Option<String> {
        let instance = self.current.read().expect("database lock poisoned").clone()?;
        let probe = instance.raw.connect().and_then(|conn| conn.execute_batch("SELECT 1"));
        match probe {
            Err(error) if error.to_string().contains(INVALIDATED) => Some(error.to_string()),
            _ => None,
        }
    }

    /// The error of a C API call that fails without saying why (`duckdb_arrow_scan`): DuckDB's reason if it
    /// invalidated the database (a full volume stays `insufficient_storage`), else `message`.
    pub fn explain(&self, message: String) -> IngestError {
        IngestError::database(self.invalidated().unwrap_or(message))
    }

    /// Closes the instance for a [`reopen`](Self::reopen): from now on new connections are refused, with
    /// `reason`. Connections handed out before keep the old instance open until they are dropped (their
    /// statements fail: DuckDB invalidated it). Does nothing if it is closed already.
    pub fn close(&self, reason: &str) {
        let mut closing = self.closing.lock().expect("database lock poisoned");
        if let Some(old) = self.current.write().expect("database lock poisoned").take() {
            *closing = Some(Closing { old: Arc::downgrade(&old.raw), reason: reason.to_owned() });
        }
    }

    /// Opens the file again once the instance [`close`](Self::close)d before it is gone (its last
    /// connection dropped; loaders drop theirs, see [`is_current`](Self::is_current)): DuckDB replays the
    /// WAL, and everything committed is back. Until the old instance is gone this returns an error and
    /// changes nothing; a later call carries on. Closes the instance first if that was not done.
    pub fn reopen(&self) -> Result<(), IngestError> {
        self.close("the database is being reopened");
        if let Some(Closing { old, .. }) = self.closing.lock().expect("database lock poisoned").as_ref()
            && old.strong_count() > 0
        {
            return Err(IngestError::Database(format!(
                "{} connection(s) to the closed instance are still open; it is reopened once they are dropped",
                old.strong_count()
            )));
        }
        let (instance, catalog) = Instance::open(self.storage.as_ref(), &self.options)?;
        if catalog != self.catalog {
            return Err(IngestError::Database(format!(
                "the reopened database's catalog is {catalog:?}, not {:?} as before",
                self.catalog
            )));
        }
        *self.current.write().expect("database lock poisoned") = Some(Arc::new(instance));
        *self.closing.lock().expect("database lock poisoned") = None;
        Ok(())
    }
}

/// `COMMIT`s the transaction open on `conn`.
///
/// When the commit takes the WAL past `checkpoint_threshold`, DuckDB checkpoints right after it; if that
/// checkpoint cannot write (a full volume), DuckDB 1.5.5 answers the `COMMIT` with an error that says the
/// commit is durable — "FATAL Error: Transaction COMMIT succeeded and is durable, but the autocheckpoint
/// failed. Reopen the database instance to recover. ..." — and invalidates the instance. The rows are
/// committed (they are in the WAL, and back after a reopen), so that is a success: answering an error
/// would make the client send them again. The app notices the invalidation and reopens the instance.
pub fn commit(conn: &duckdb::Connection) -> Result<(), IngestError> {
    match conn.execute_batch("COMMIT") {
        Err(error) if error.to_string().contains(DURABLE_COMMIT) => {
            tracing::error!(%error, "Committed, but DuckDB's automatic checkpoint failed and invalidated the database.");
            Ok(())
        }
        outcome => Ok(outcome?),
    }
}

/// How DuckDB 1.5.5 starts the error of a `COMMIT` that is durable although the checkpoint after it failed.
const DURABLE_COMMIT: &str = "Transaction COMMIT succeeded and is durable";

/// What DuckDB says about every statement once it invalidated the instance: "FATAL Error: Failed:
/// database has been invalidated because of a previous fatal error. The database must be restarted prior
/// to being used again. Original error: ...".
const INVALIDATED: &str = "database has been invalidated";

#[cfg(test)]
mod tests {
    use super::*;

    fn threads_of(threads: Option<usize>) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let storage = Box::new(DuckDbFile::new(dir.path().join("t.duckdb")));
        let options =
            DatabaseOptions { extensions: Vec::new(), memory_limit: None, checkpoint_threshold: 16 << 20, threads };
        let database = Database::open(storage, &options).unwrap();
        database
            .with_connection(|conn| conn.query_row("SELECT current_setting('threads')", [], |row| row.get(0)))
            .unwrap()
    }

    #[test]
    fn duckdb_runs_on_the_threads_configured() {
        assert_eq!([threads_of(Some(1)), threads_of(Some(3))], [1, 3]);
    }
}
