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

use std::sync::Mutex;

use duckdb::Connection;

use crate::error::IngestError;
pub use ducklake::DuckLake;
pub use ffi::RawConnection;
use ffi::RawDatabase;
pub use storage::{Checkpoint, DuckDbFile, Storage, StorageSizes};

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
}

/// The open DuckDB instance and its data catalog. Share it behind an `Arc`.
pub struct Database {
    // Connections are declared before `raw`: fields drop in order, and the database must close last.
    admin: Mutex<Connection>,
    storage: Box<dyn Storage>,
    catalog: String,
    memory_limit: Option<u64>,
    raw: RawDatabase,
}

impl Database {
    /// Opens DuckDB on `storage` and prepares it as `options` say.
    pub fn open(storage: Box<dyn Storage>, options: &DatabaseOptions) -> Result<Self, IngestError> {
        let path = storage.database_path();
        let raw = RawDatabase::open(path)
            .map_err(|e| IngestError::Database(format!("cannot open {}: {e}", path.display())))?;
        let admin = raw.connect()?;
        if let Some(limit) = options.memory_limit {
            admin.execute_batch(&format!("SET memory_limit = '{limit}B'"))?;
        }
        admin.execute_batch(&format!("SET checkpoint_threshold = '{}B'", options.checkpoint_threshold))?;
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
        Ok(Self { admin: Mutex::new(admin), storage, catalog, memory_limit: options.memory_limit, raw })
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
        self.memory_limit
    }

    /// A new connection for SQL, in the data catalog (names without a catalog are the data's).
    pub fn connect(&self) -> Result<Connection, IngestError> {
        let conn = self.raw.connect()?;
        conn.execute_batch(&format!("USE {}", sql::ident(&self.catalog)))?;
        Ok(conn)
    }

    /// A raw connection in the data catalog (to classify statements).
    pub fn raw_connection(&self) -> Result<RawConnection, IngestError> {
        self.raw.connection_in(&self.catalog).map_err(IngestError::Database)
    }

    /// A raw connection in [`SCRATCH`], to register Arrow streams as views there.
    pub fn scan_connection(&self) -> Result<RawConnection, IngestError> {
        self.raw.connection_in(SCRATCH).map_err(IngestError::Database)
    }

    /// Folds recent writes into the storage's long-term form (for a DuckDB file: `CHECKPOINT`).
    pub fn checkpoint(&self) -> Result<Checkpoint, IngestError> {
        let admin = self.admin.lock().expect("admin connection lock poisoned");
        self.storage.checkpoint(&admin)
    }

    /// What the storage takes on disk.
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
    pub fn with_connection<T>(&self, f: impl FnOnce(&Connection) -> duckdb::Result<T>) -> Result<T, IngestError> {
        let admin = self.admin.lock().expect("admin connection lock poisoned");
        Ok(f(&admin)?)
    }
}
