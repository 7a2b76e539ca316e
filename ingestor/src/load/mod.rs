//! The loader: streams of Arrow record batches into DuckDB tables, one transaction per session.
//!
//! A session's batches flow through a bounded channel into an Arrow stream that DuckDB scans as a view
//! (`duckdb_arrow_scan`, see `store::ffi`) in the [`SCRATCH`] catalog; one `INSERT INTO table (...) SELECT ... FROM view` reads it with all
//! of DuckDB's threads, mapping columns by name. The transaction commits only when the producer says the
//! stream is complete; anything else (an error, a dropped session, a client gone) rolls it back.

mod group;
mod held;
mod journaled;
mod reader;
mod receipts;
mod schema;
mod tables;
mod upload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrowport_config::SchemaPolicy;
use duckdb::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::budget::{MemoryBudget, Reservation};
use crate::error::IngestError;
use crate::journal::Journal;
pub use crate::journal::Scope;
use crate::store::{self, Database, RawConnection, SCRATCH, sql};
pub use arrowport_api::decoded_size;
pub use journaled::JournalOptions;
use journaled::Journaling;
use reader::{ChannelReader, Feed};
pub use receipts::{Found, Proof, Receipt};
pub use schema::{Column, IfExists, TableMode, TablePlan, check_supported};
use tables::{TableGuard, TableLocks};
pub use upload::{SMALL_REQUEST_BYTES, Upload};

/// Batches buffered between the request and DuckDB, per session. One is enough to keep DuckDB busy (each
/// of its threads already holds a batch it is reading), and each more costs a batch of memory: with a
/// 20 MB message, 2 raised a 1 GiB upload's peak by ~20 MB at the same rate.
const CHANNEL_DEPTH: usize = 1;

/// Where one session's rows go.
#[derive(Clone, Debug)]
pub struct Target {
    pub table: String,
    /// Most rows handed to DuckDB per batch; larger batches are sliced (zero-copy).
    pub chunk_size: usize,
    pub policy: SchemaPolicy,
    pub mode: TableMode,
}

/// How a [`Loader`] shares the database.
pub struct LoaderOptions {
    /// Sessions loading at once; further ones wait for a slot.
    pub max_concurrent_loads: usize,
    /// How long a session waits for a slot before it is refused as overloaded: slow uploads that hold
    /// every slot must not make the others wait without end.
    pub slot_wait: Duration,
    /// The memory budget sessions reserve decoded batches against.
    pub budget: MemoryBudget,
    /// Answer small requests from a journal (see [`journaled`]).
    pub journal: Option<JournalOptions>,
}

/// What a committed session wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub rows: u64,
    pub batches: u64,
    /// From the end of the data to the end of `COMMIT`: what the producer waited for after its last byte.
    pub commit_time: Duration,
    /// Committed in one transaction with other requests (group commit).
    pub grouped: bool,
    /// Durable in the journal, and written to the table soon after (see [`journaled`]).
    pub journaled: bool,
}

/// Loads Arrow data into the database's tables. Cheap to clone.
#[derive(Clone)]
pub struct Loader {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<Database>,
    idle: Mutex<Vec<Worker>>,
    permits: Arc<Semaphore>,
    slots: usize,
    slot_wait: Duration,
    tables: TableLocks,
    groups: group::GroupQueues,
    budget: MemoryBudget,
    next_view: AtomicU64,
    journal: Option<Journaling>,
}

/// One loading slot: a SQL connection and the raw connection that registers its Arrow streams.
struct Worker {
    sql: store::Connection,
    scan: RawConnection,
}

impl Loader {
    /// A loader on `db`; creates the table of receipts if it is missing. With a journal, its records
    /// that no transaction recorded are queued to be written (this needs the async runtime).
    pub fn new(db: Arc<Database>, options: LoaderOptions) -> Result<Self, IngestError> {
        receipts::create_table(&db)?;
        let (journal, recovered) = match &options.journal {
            Some(journal) => {
                let (opened, recovered) = Journal::open(&journal.dir)?;
                (Some(Journaling::new(opened, journal.linger)), recovered)
            }
            None => (None, Vec::new()),
        };
        let loader = Self {
            shared: Arc::new(Shared {
                db,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(options.max_concurrent_loads)),
                slots: options.max_concurrent_loads,
                slot_wait: options.slot_wait,
                tables: TableLocks::default(),
                groups: group::GroupQueues::default(),
                budget: options.budget,
                next_view: AtomicU64::new(0),
                journal,
            }),
        };
        if let Some(journal) = loader.journal() {
            let db = &loader.shared.db;
            let applied: std::collections::HashSet<u64> =
                receipts::journal_applied(db, journal.id(), journal.oldest_kept())?.into_iter().collect();
            let (done, todo): (Vec<_>, Vec<_>) = recovered.into_iter().partition(|r| applied.contains(&r.seq));
            journal.applied(&done.iter().map(|record| record.seq).collect::<Vec<_>>());
            if !todo.is_empty() {
                tracing::info!(
                    records = todo.len(),
                    "Writing the journal's records that were not written before the last stop."
                );
            }
            for record in todo {
                loader.requeue_recovered(record.seq, journaled::decode(&record)?);
            }
            receipts::prune_journal_applied(db, journal.id(), journal.oldest_kept())?;
        }
        Ok(loader)
    }

    /// The journal, if small requests are answered from one.
    pub fn journal(&self) -> Option<&Journal> {
        self.shared.journal.as_ref().map(|journaling| &journaling.journal)
    }

    /// Waits until every journaled request of `scope` answered so far is written to its table (see
    /// [`Journal::settle`]).
    pub async fn settle(&self, scope: Scope<'_>) -> Result<(), IngestError> {
        match self.journal() {
            Some(journal) => journal.settle(scope).await,
            None => Ok(()),
        }
    }

    /// The committed receipt of `key` on `stream`, which writes to `table`, if any (see [`Receipt`]).
    pub async fn find_receipt(&self, stream: &str, table: &str, key: &str) -> Result<Option<Found>, IngestError> {
        // A journaled request's receipt is committed with its rows.
        self.settle(Scope::Table(table)).await?;
        let (db, stream, key) = (self.shared.db.clone(), stream.to_owned(), key.to_owned());
        blocking(move || receipts::find(&db, &stream, &key)).await
    }

    /// Forgets receipts older than `window`, and which journal records were written once the journal no
    /// longer holds them; returns how many receipts are left.
    pub async fn prune_receipts(&self, window: Duration) -> Result<u64, IngestError> {
        let db = self.shared.db.clone();
        let journal = self.journal().map(|journal| (journal.id().to_owned(), journal.oldest_kept()));
        blocking(move || {
            if let Some((id, oldest)) = journal {
                receipts::prune_journal_applied(&db, &id, oldest)?;
            }
            receipts::prune(&db, window.as_millis() as u64)
        })
        .await
    }

    /// The database this loader writes to.
    pub fn database(&self) -> &Database {
        &self.shared.db
    }

    /// The memory budget sessions reserve decoded batches against.
    pub fn budget(&self) -> &MemoryBudget {
        &self.shared.budget
    }

    /// Drops the idle connections to a database instance that is no longer open (see
    /// [`Database::reopen`]), so that it can close.
    pub fn drop_stale_connections(&self) {
        let db = &self.shared.db;
        self.shared.idle.lock().expect("worker pool lock poisoned").retain(|worker| db.is_current(&worker.sql));
    }

    /// Starts a session: waits for a free slot, checks `schema` against the target table (creating or
    /// evolving it inside the session's transaction), then accepts batches. Schema problems are reported
    /// here, before the caller reads any data.
    /// With a journal, the session first waits until the journaled requests to its table answered before
    /// it are written; while one that may replace the table runs, no request to it is journaled.
    pub async fn begin(&self, target: Target, schema: SchemaRef) -> Result<LoadSession, IngestError> {
        check_supported(&schema)?;
        let mut change = None;
        if let Some(journaling) = &self.shared.journal {
            if target.mode.if_exists != IfExists::Append {
                journaling.begin_change(&target.table);
                change = Some(TableChange { shared: self.shared.clone(), table: target.table.clone() });
            }
            journaling.journal.settle(Scope::Table(&target.table)).await?;
        }
        let (slots, wait) = (self.shared.slots, self.shared.slot_wait);
        let slot = tokio::time::timeout(wait, self.load_slot())
            .await
            .map_err(|_| IngestError::LoadSlotsBusy { slots, seconds: wait.as_secs() })??;
        let session = self.begin_in(slot, target, schema).await?;
        Ok(LoadSession { _change: change, ..session })
    }

    /// Waits for one of the `max_concurrent_loads` slots.
    async fn load_slot(&self) -> Result<OwnedSemaphorePermit, IngestError> {
        self.shared.permits.clone().acquire_owned().await.map_err(|_| IngestError::ShuttingDown)
    }

    /// [`begin`](Self::begin) in a slot already taken.
    async fn begin_in(
        &self,
        permit: OwnedSemaphorePermit,
        target: Target,
        schema: SchemaRef,
    ) -> Result<LoadSession, IngestError> {
        let (feed, rx) = mpsc::channel(CHANNEL_DEPTH);
        let (ready_tx, ready_rx) = oneshot::channel();
        let shared = self.shared.clone();
        let chunk_size = target.chunk_size.max(1);
        let mut handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            shared.run(&target, schema, rx, ready_tx)
        });
        if ready_rx.await.is_err() {
            // The worker stopped before the data phase: its result carries the reason.
            return Err(match (&mut handle).await {
                Ok(Err(error)) => error,
                Ok(Ok(_)) => IngestError::Database("load finished before it started".to_owned()),
                Err(join) => IngestError::Database(format!("load task failed: {join}")),
            });
        }
        Ok(LoadSession { feed, handle, chunk_size, _change: None })
    }
}

impl Shared {
    /// Runs one session on a blocking thread; `ready` is sent once the table is ready for the data.
    fn run(
        &self,
        target: &Target,
        schema: SchemaRef,
        rx: mpsc::Receiver<Feed>,
        ready: oneshot::Sender<()>,
    ) -> Result<Committed, IngestError> {
        let mut worker = self.checkout()?;
        let outcome = self.load(&mut worker, target, schema, rx, ready);
        // Connections to an instance that a reopen closed are dropped: it closes with its last one.
        if self.db.is_current(&worker.sql) {
            self.idle.lock().expect("worker pool lock poisoned").push(worker);
        }
        outcome
    }

    fn checkout(&self) -> Result<Worker, IngestError> {
        let mut idle = self.idle.lock().expect("worker pool lock poisoned");
        while let Some(worker) = idle.pop() {
            if self.db.is_current(&worker.sql) {
                return Ok(worker);
            }
        }
        drop(idle);
        Ok(Worker { sql: self.db.connect()?, scan: self.db.scan_connection()? })
    }

    fn load(
        &self,
        worker: &mut Worker,
        target: &Target,
        schema: SchemaRef,
        rx: mpsc::Receiver<Feed>,
        ready: oneshot::Sender<()>,
    ) -> Result<Committed, IngestError> {
        let view = format!("ingest_{}", self.next_view.fetch_add(1, Ordering::Relaxed));
        let batches = Arc::new(AtomicU64::new(0));
        let proof = Arc::new(Mutex::new(Proof::default()));
        let reader = ChannelReader::new(schema, rx, batches.clone(), proof.clone());
        let stream = worker.scan.register(&view, Box::new(reader)).map_err(|error| self.db.explain(error))?;
        let view = sql::qualified(SCRATCH, "main", &view);
        let outcome = self.load_view(&worker.sql, target, &view, ready, &batches, &proof);
        // The view points at `stream`: drop the view first. Failure here only leaves an in-memory entry.
        if let Err(error) = worker.sql.execute_batch(&format!("DROP VIEW IF EXISTS {view}")) {
            tracing::warn!(%view, %error, "Could not drop a scan view.");
        }
        drop(stream);
        outcome.map(|rows| Committed {
            rows,
            batches: batches.load(Ordering::Relaxed),
            commit_time: Duration::ZERO,
            grouped: false,
            journaled: false,
        })
    }

    fn load_view(
        &self,
        conn: &Connection,
        target: &Target,
        view: &str,
        ready: oneshot::Sender<()>,
        batches: &AtomicU64,
        proof: &Mutex<Proof>,
    ) -> Result<u64, IngestError> {
        let incoming = describe(conn, view)?;
        let storage = self.db.storage();
        if let Some(reason) = incoming.iter().find_map(|column| storage.unsupported_type(&column.sql_type)) {
            return Err(IngestError::UnsupportedType(reason));
        }
        let lock = self.tables.lock_for(&target.table);
        // Appends share the table; creating or altering it takes it exclusively for the whole transaction.
        let mut guard = TableGuard::shared(&lock);
        let plan = || {
            let existing = self.table_columns(conn, &target.table)?;
            schema::plan(&target.table, existing.as_deref(), &incoming, target.policy, target.mode)
        };
        let mut plan_now = plan()?;
        if plan_now.changes_table() {
            drop(guard);
            guard = TableGuard::exclusive(&lock);
            plan_now = plan()?;
        }
        let table = self.db.table_name(&target.table);
        if storage.schema_changes_alone() && matches!(plan_now, TablePlan::Create(_) | TablePlan::AddColumns(_)) {
            plan_now = self.change_schema_alone(conn, &table, plan_now, plan)?;
        }
        let plan = plan_now;
        conn.execute_batch("BEGIN TRANSACTION")?;
        let outcome = (|| {
            apply(conn, &table, &plan)?;
            // The table is ready: the caller may start sending data.
            let _ = ready.send(());
            let columns = sql::ident_list(incoming.iter().map(|c| c.name.as_str()));
            let rows = conn.execute(&format!("INSERT INTO {table} ({columns}) SELECT {columns} FROM {view}"), [])?;
            // The stream ended (else the INSERT failed): its proof commits with its rows, or neither does.
            let proof = std::mem::take(&mut *proof.lock().expect("proof lock poisoned"));
            receipts::record(&self.db, conn, &proof, rows as u64, batches.load(Ordering::Relaxed))?;
            store::commit(conn)?;
            Ok(rows as u64)
        })();
        if outcome.is_err() {
            // Nothing of the session may stay; if COMMIT itself failed the transaction is already gone.
            let _ = conn.execute_batch("ROLLBACK");
        }
        drop(guard);
        outcome
    }

    /// Creates or alters the table in a transaction of its own, for storage where another writer may do
    /// the same at once: a conflict means the other won, so the plan is made again against what it left
    /// (usually an append). Returns the plan for the rows' transaction.
    fn change_schema_alone(
        &self,
        conn: &Connection,
        table: &str,
        mut current: TablePlan,
        plan: impl Fn() -> Result<TablePlan, IngestError>,
    ) -> Result<TablePlan, IngestError> {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            if !current.changes_table() {
                break;
            }
            conn.execute_batch("BEGIN TRANSACTION")?;
            match apply(conn, table, &current).and_then(|()| Ok(conn.execute_batch("COMMIT")?)) {
                Ok(()) => current = TablePlan::Append,
                Err(error) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    let message = error.to_string().to_ascii_lowercase();
                    let raced = message.contains("conflict") || message.contains("already exists");
                    if attempt == ATTEMPTS || !raced {
                        return Err(error);
                    }
                    tracing::debug!(%table, %error, "Another writer changed the table first; planning again.");
                    current = plan()?;
                }
            }
        }
        Ok(current)
    }

    /// The table's columns, or `None` if it does not exist.
    fn table_columns(&self, conn: &Connection, table: &str) -> Result<Option<Vec<Column>>, IngestError> {
        let exists: bool = conn.query_row(
            "SELECT count(*) > 0 FROM duckdb_tables() \
             WHERE database_name = ? AND schema_name = 'main' AND lower(table_name) = lower(?)",
            [self.db.catalog(), table],
            |row| row.get(0),
        )?;
        if !exists {
            return Ok(None);
        }
        describe(conn, &self.db.table_name(table)).map(Some)
    }
}

/// Column names and DuckDB types of a table or view.
fn describe(conn: &Connection, relation: &str) -> Result<Vec<Column>, IngestError> {
    let mut statement = conn.prepare(&format!("SELECT column_name, column_type FROM (DESCRIBE {relation})"))?;
    let columns = statement
        .query_map([], |row| Ok(Column::new(row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?
        .collect::<duckdb::Result<Vec<_>>>()?;
    Ok(columns)
}

fn apply(conn: &Connection, table: &str, plan: &TablePlan) -> Result<(), IngestError> {
    let definition = |c: &Column| format!("{} {}", sql::ident(&c.name), c.sql_type);
    match plan {
        TablePlan::Append => {}
        TablePlan::Create(columns) => {
            let columns: Vec<String> = columns.iter().map(definition).collect();
            conn.execute_batch(&format!("CREATE TABLE {table} ({})", columns.join(", ")))?;
        }
        TablePlan::Replace(columns) => {
            let columns: Vec<String> = columns.iter().map(definition).collect();
            conn.execute_batch(&format!("DROP TABLE {table}; CREATE TABLE {table} ({})", columns.join(", ")))?;
        }
        TablePlan::AddColumns(columns) => {
            for column in columns {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {}", definition(column)))?;
            }
        }
    }
    Ok(())
}

/// An open load: batches go in with [`send`](Self::send); [`commit`](Self::commit) makes them visible.
/// Dropping the session without committing rolls everything back.
pub struct LoadSession {
    feed: mpsc::Sender<Feed>,
    handle: JoinHandle<Result<Committed, IngestError>>,
    chunk_size: usize,
    /// Held by a session that may replace its table, until it ends.
    _change: Option<TableChange>,
}

/// A session that may change a table's columns, running: see [`Journaling::begin_change`].
struct TableChange {
    shared: Arc<Shared>,
    table: String,
}

impl Drop for TableChange {
    fn drop(&mut self) {
        if let Some(journaling) = &self.shared.journal {
            journaling.end_change(&self.table);
        }
    }
}

impl LoadSession {
    /// Queues `batch` (sliced to the chunk size), waiting while DuckDB catches up. `reservation` covers
    /// the whole batch; each slice takes its share along, so the budget gets it back as DuckDB reads it.
    /// Returns the batch's decoded size.
    pub async fn send(&mut self, batch: RecordBatch, mut reservation: Reservation) -> Result<u64, IngestError> {
        let mut queued = 0;
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = self.chunk_size.min(batch.num_rows() - offset);
            let piece = batch.slice(offset, len);
            offset += len;
            let size = decoded_size(&piece);
            let share = if offset < batch.num_rows() { reservation.split(size) } else { reservation.split(u64::MAX) };
            self.feed(piece, Some(share)).await?;
            queued += size;
        }
        Ok(queued)
    }

    /// Waits until the channel to DuckDB has room. A session that stopped returns at once; its next send
    /// reports why.
    pub async fn ready(&self) {
        let _room = self.feed.reserve().await;
    }

    /// Queues a batch of at most the chunk size as it is, with the reservation that covers it (if any).
    async fn feed(&mut self, batch: RecordBatch, reservation: Option<Reservation>) -> Result<(), IngestError> {
        if self.feed.send(Feed::Batch(batch, reservation)).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Ends the stream and waits until its rows, and `proof` with them, are committed.
    pub async fn commit(self, proof: Proof) -> Result<Committed, IngestError> {
        let started = Instant::now();
        // If the worker already stopped, its result says why.
        let _ = self.feed.send(Feed::End(proof)).await;
        match self.handle.await {
            Ok(result) => result.map(|committed| Committed { commit_time: started.elapsed(), ..committed }),
            Err(join) => Err(IngestError::Database(format!("load task failed: {join}"))),
        }
    }

    async fn failure(&mut self) -> IngestError {
        match (&mut self.handle).await {
            Ok(Err(error)) => error,
            Ok(Ok(_)) => IngestError::Database("load ended before the data did".to_owned()),
            Err(join) => IngestError::Database(format!("load task failed: {join}")),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IngestError> + Send + 'static,
) -> Result<T, IngestError> {
    tokio::task::spawn_blocking(f).await.map_err(|join| IngestError::Database(format!("task failed: {join}")))?
}
