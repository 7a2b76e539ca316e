//! DuckLake storage: a catalog (a local DuckDB file, or PostgreSQL shared by several ingesters) and a
//! directory of Parquet files, attached to an in-memory DuckDB as the data catalog `lake`.
//!
//! Facts this follows (DuckDB 1.5.5, DuckLake 0.3): the extensions come from files, never the network;
//! DuckLake stores `DATA_PATH` verbatim, so it is made absolute; with file access locked down, only the
//! data directory stays reachable (`allowed_directories`); one transaction writes one attached database,
//! which is why receipts live in the lake too; DuckLake cannot store ENUM, UNION, fixed-size ARRAY or BIT
//! columns; creating or altering a table conflicts with another writer doing the same, so schema changes
//! commit on their own (see [`Storage::schema_changes_alone`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use duckdb::Connection;

use super::storage::{Checkpoint, Storage, StorageSizes, Volume};
use crate::error::IngestError;

/// The data catalog's name.
const LAKE: &str = "lake";
/// Tries to attach a catalog that other ingesters are creating at the same moment.
const ATTACH_ATTEMPTS: u32 = 5;

/// A DuckLake to write into.
#[derive(Debug, Clone)]
pub struct DuckLake {
    /// `ducklake:` + this is what is attached: a file path or `postgres:...`.
    catalog: String,
    data_path: PathBuf,
    extension_directory: PathBuf,
    inlining_row_limit: u64,
    snapshot_retention: Duration,
    /// This ingester's name in the maintenance lease.
    holder: String,
    /// How long a maintenance turn lasts unless renewed.
    lease: Duration,
}

impl DuckLake {
    /// A lake with `catalog` and `data_path` (made absolute against the working directory), loading its
    /// extensions from `extension_directory`.
    pub fn new(
        catalog: &str,
        data_path: &Path,
        extension_directory: &Path,
        inlining_row_limit: u64,
        snapshot_retention: Duration,
        maintenance_interval: Duration,
    ) -> Result<Self, IngestError> {
        let absolute = |path: &Path| {
            std::path::absolute(path)
                .map_err(|e| IngestError::Database(format!("cannot resolve {}: {e}", path.display())))
        };
        let data_path = absolute(data_path)?;
        std::fs::create_dir_all(&data_path)
            .map_err(|e| IngestError::Database(format!("cannot create {}: {e}", data_path.display())))?;
        let catalog = match catalog.strip_prefix("postgres:") {
            Some(_) => catalog.to_owned(),
            None => absolute(Path::new(catalog))?.to_string_lossy().into_owned(),
        };
        Ok(Self {
            catalog,
            data_path,
            extension_directory: extension_directory.to_owned(),
            inlining_row_limit,
            snapshot_retention,
            holder: format!("{}-{}", hostname(), now_ms()),
            // Two missed turns pass it on, and never sooner than a minute: a turn that runs long under load
            // does not hand the lake to a second maintainer while the first is still at it.
            lease: (maintenance_interval * 2).max(Duration::from_secs(60)),
        })
    }

    fn is_postgres(&self) -> bool {
        self.catalog.starts_with("postgres:")
    }

    /// The extensions this lake needs, by their file names.
    fn extensions(&self) -> Vec<&'static str> {
        let mut names = vec!["ducklake", "icu"];
        if self.is_postgres() {
            names.push("postgres_scanner");
        }
        names
    }
}

impl DuckLake {
    /// Whether this ingester may maintain the lake now: one at a time may, since two compactions of a
    /// table conflict. The turn is a lease in the lake itself (`arrowport.maintenance`, one row): taking
    /// or renewing it is an UPDATE, and of two ingesters updating it at once DuckLake commits one and
    /// fails the other with a conflict. The holder renews it each time; it passes on once it has not
    /// been renewed for the lease time.
    fn take_maintenance_turn(&self, admin: &Connection) -> Result<bool, IngestError> {
        let table = format!("{LAKE}.arrowport.maintenance");
        // One row from the start: created with it, so there is never a row to insert (inserts do not conflict).
        let created = admin.execute_batch(&format!(
            "CREATE SCHEMA IF NOT EXISTS {LAKE}.arrowport; \
             CREATE TABLE IF NOT EXISTS {table} AS SELECT ''::VARCHAR AS holder, 0::BIGINT AS until_ms"
        ));
        if let Err(error) = created {
            // Another ingester created it at the same moment: it is there now.
            tracing::debug!(%error, "The maintenance lease table was created by another ingester.");
        }
        let now = now_ms();
        let until = now + self.lease.as_millis() as i64;
        let taken = (|| {
            admin.execute_batch("BEGIN TRANSACTION")?;
            let updated = admin.execute(
                &format!("UPDATE {table} SET holder = ?, until_ms = ? WHERE holder = ? OR until_ms < ?"),
                duckdb::params![self.holder, until, self.holder, now],
            )?;
            admin.execute_batch("COMMIT")?;
            Ok::<_, duckdb::Error>(updated > 0)
        })();
        match taken {
            Ok(taken) => Ok(taken),
            Err(error) => {
                let _ = admin.execute_batch("ROLLBACK");
                tracing::debug!(%error, "Another ingester took the maintenance turn.");
                Ok(false)
            }
        }
    }
}

/// The host's name (a pod's name in Kubernetes), for the lease's holder.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map_or_else(|_| std::process::id().to_string(), |h| h.trim().to_owned())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Loads `name` from `directory`, or says which file, for which DuckDB, is missing or does not load.
fn load_extension(admin: &Connection, directory: &Path, name: &str) -> Result<(), IngestError> {
    let file = directory.join(format!("{name}.duckdb_extension"));
    let quoted = file.to_string_lossy().replace('\'', "''");
    admin.execute_batch(&format!("LOAD '{quoted}'")).map_err(|error| {
        let version: String = admin
            .query_row("SELECT version() || ' ' || (SELECT platform FROM pragma_platform())", [], |row| row.get(0))
            .unwrap_or_else(|_| "?".to_owned());
        IngestError::Database(format!(
            "cannot load the DuckDB extension {name} from {} (this is DuckDB {version}; install the matching file, \
             e.g. with scripts/duckdb-extensions; the arrowport-lake image carries them): {error}",
            file.display()
        ))
    })
}

impl Storage for DuckLake {
    fn kind(&self) -> &'static str {
        "ducklake"
    }

    fn database_path(&self) -> &Path {
        Path::new(":memory:")
    }

    fn describe(&self) -> String {
        format!("DuckLake {} with data in {}", self.catalog, self.data_path.display())
    }

    fn attach(&self, admin: &Connection) -> Result<String, IngestError> {
        admin.execute_batch("SET autoinstall_known_extensions = false; SET autoload_known_extensions = false")?;
        for name in self.extensions() {
            load_extension(admin, &self.extension_directory, name)?;
        }
        // Several writers race for each snapshot id, and DuckLake retries a commit that lost: by default 10
        // times with waits growing by half each time, which eight producers on two ingesters exhausted now
        // and then (a 500). More, shorter, slower-growing waits: at most 50, about 23 s in all.
        admin.execute_batch(
            "SET GLOBAL ducklake_max_retry_count = 50; SET GLOBAL ducklake_retry_wait_ms = 20; \
             SET GLOBAL ducklake_retry_backoff = 1.1",
        )?;
        let data_path = format!("{}/", self.data_path.to_string_lossy().trim_end_matches('/'));
        let quote = |text: &str| format!("'{}'", text.replace('\'', "''"));
        let attach = format!(
            "ATTACH IF NOT EXISTS {} AS {LAKE} (DATA_PATH {}, DATA_INLINING_ROW_LIMIT {}); USE {LAKE}",
            quote(&format!("ducklake:{}", self.catalog)),
            quote(&data_path),
            self.inlining_row_limit
        );
        // Ingesters starting together on a new PostgreSQL catalog race to create its tables; the losers
        // fail once and find them made on the next try.
        let mut attempt = 1;
        while let Err(error) = admin.execute_batch(&attach) {
            if attempt == ATTACH_ATTEMPTS || !error.to_string().contains("Failed to initialize DuckLake") {
                return Err(IngestError::Database(format!("cannot attach the DuckLake {}: {error}", self.describe())));
            }
            tracing::info!(%error, "Another ingester is creating the lake's catalog; attaching again.");
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            attempt += 1;
        }
        // Once file access is locked down, the lake's own files must stay reachable.
        admin.execute_batch(&format!("SET allowed_directories = [{}]", quote(&data_path)))?;
        Ok(LAKE.to_owned())
    }

    fn checkpoint(&self, admin: &Connection) -> Result<Checkpoint, IngestError> {
        if !self.take_maintenance_turn(admin)? {
            return Ok(Checkpoint::NotOurTurn);
        }
        // Files older than the retention that no snapshot references are left by writers that died
        // mid-insert; a running insert's files are younger than that.
        let older_than = format!("older_than => now() - INTERVAL '{} seconds'", self.snapshot_retention.as_secs());
        let steps = [
            format!("CALL ducklake_flush_inlined_data('{LAKE}')"),
            format!("CALL ducklake_merge_adjacent_files('{LAKE}')"),
            format!("CALL ducklake_expire_snapshots('{LAKE}', {older_than})"),
            format!("CALL ducklake_cleanup_old_files('{LAKE}', {older_than})"),
            format!("CALL ducklake_delete_orphaned_files('{LAKE}', {older_than})"),
        ];
        for step in steps {
            admin
                .execute_batch(&step)
                .map_err(|e| IngestError::Database(format!("DuckLake maintenance ({step}) failed: {e}")))?;
        }
        Ok(Checkpoint::Done)
    }

    /// Ends this ingester's lease on the maintenance turn, so that the next one (often this pod, restarted)
    /// takes it at once instead of after the lease time. After a kill, the lease runs out by itself.
    fn hand_over(&self, admin: &Connection) -> Result<(), IngestError> {
        let table = format!("{LAKE}.arrowport.maintenance");
        let exists: bool = admin.query_row(
            "SELECT count(*) > 0 FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'arrowport' \
             AND table_name = 'maintenance'",
            [LAKE],
            |row| row.get(0),
        )?;
        if exists {
            admin.execute(&format!("UPDATE {table} SET until_ms = 0 WHERE holder = ?"), [&self.holder])?;
        }
        Ok(())
    }

    fn sizes(&self) -> StorageSizes {
        let catalog = if self.is_postgres() { 0 } else { std::fs::metadata(&self.catalog).map_or(0, |m| m.len()) };
        StorageSizes {
            data_bytes: directory_bytes(&self.data_path),
            log_bytes: catalog,
            volume: Volume::of(&self.data_path),
        }
    }

    fn unsupported_type(&self, sql_type: &str) -> Option<String> {
        let upper = sql_type.to_ascii_uppercase();
        let reason = if upper.starts_with("ENUM") {
            "ENUM"
        } else if upper.starts_with("UNION") {
            "UNION"
        } else if upper == "BIT" {
            "BIT"
        } else if upper.ends_with(']') && !upper.ends_with("[]") {
            "fixed-size ARRAY (Arrow FixedSizeList)"
        } else {
            return None;
        };
        Some(format!("{reason} columns ({sql_type}) cannot be stored in a DuckLake"))
    }

    fn schema_changes_alone(&self) -> bool {
        true
    }
}

/// Bytes of the files under `path`.
fn directory_bytes(path: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => pending.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}
