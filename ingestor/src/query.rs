//! Reading back: Flight SQL queries and whole-table reads, on their own connections and slots.
//!
//! Clients' SQL must be one statement that only reads (checked on the prepared statement's type) the
//! stream tables (checked on DuckDB's own parse of it, see [`check_references`]), and runs in a
//! `READ ONLY` transaction that is always rolled back. Queries take their own slots, never
//! the loaders', and are interrupted after the timeout, so they cannot stall ingest for long. DuckDB's
//! MVCC lets them read while loads append. With a journal, every read first waits until the requests
//! answered before it are written to their tables, so a client reads what it was told is committed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use duckdb::{Connection, InterruptHandle};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::IngestError;
use crate::journal::{Journal, Scope};
use crate::store::Database;

/// DuckDB hands out 2,048-row chunks; batches of about this many rows are cheaper to send.
const TARGET_BATCH_ROWS: usize = 65_536;
/// Batches buffered between DuckDB and the client, per query.
const CHANNEL_DEPTH: usize = 2;

/// How many queries may run at once, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub max_concurrent: usize,
    pub timeout: Duration,
}

/// Runs clients' read-only queries and whole-table reads. Cheap to clone.
#[derive(Clone)]
pub struct QueryService {
    db: Arc<Database>,
    permits: Arc<Semaphore>,
    timeout: Duration,
    journal: Option<Journal>,
}

/// A running query: its schema now, its batches as DuckDB produces them. Dropping it cancels the query.
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: mpsc::Receiver<Result<RecordBatch, IngestError>>,
}

/// SQL written by a client (checked to be read-only) or by Arrowport itself.
enum Sql {
    Client(String),
    Internal(String),
}

impl QueryService {
    /// Queries on `db`; with `journal`, each waits for the journaled requests answered before it.
    pub fn new(db: Arc<Database>, limits: QueryLimits, journal: Option<Journal>) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_concurrent.max(1)));
        Self { db, permits, timeout: limits.timeout, journal }
    }

    /// Waits for the journaled requests answered before (to `scope`'s tables) to be written.
    async fn settle(&self, scope: Scope<'_>) -> Result<(), IngestError> {
        match &self.journal {
            Some(journal) => journal.settle(scope).await,
            None => Ok(()),
        }
    }

    /// Runs a client's read-only SQL statement.
    pub async fn query(&self, sql: &str) -> Result<QueryResult, IngestError> {
        self.run_query(Sql::Client(sql.to_owned())).await
    }

    /// The result schema of a client's read-only SQL statement, exactly as [`query`](Self::query) will
    /// send it (drivers compare the two). Runs the statement under `LIMIT 0` where it nests, else
    /// starts it and stops at the schema.
    pub async fn query_schema(&self, sql: &str) -> Result<SchemaRef, IngestError> {
        let db = self.db.clone();
        let text = sql.to_owned();
        blocking(move || check_read_only(&db, &text)).await?;
        // Newlines keep a trailing `--` comment from swallowing the wrapper.
        let statement = sql.trim_end().trim_end_matches(';');
        let empty = format!("SELECT * FROM (\n{statement}\n) AS q LIMIT 0");
        match self.run_query(Sql::Internal(empty)).await {
            Ok(result) => Ok(result.schema),
            Err(_) => Ok(self.run_query(Sql::Internal(sql.to_owned())).await?.schema),
        }
    }

    /// Reads a whole table, `SELECT *`.
    pub async fn read_table(&self, table: &str) -> Result<QueryResult, IngestError> {
        self.settle(Scope::Table(table)).await?;
        let relation = self.db.table_name(table);
        self.run_query(Sql::Internal(format!("SELECT * FROM {relation}"))).await
    }

    /// The database's catalog name (what Flight SQL calls the catalog).
    pub fn catalog(&self) -> &str {
        self.db.catalog()
    }

    /// Every table of the main schema with its Arrow schema and row count, sorted by name.
    pub async fn tables(&self) -> Result<Vec<TableInfo>, IngestError> {
        self.table_infos(None).await
    }

    /// One table (names match case-insensitively, as in DuckDB), or `None` if it does not exist.
    pub async fn table(&self, name: &str) -> Result<Option<TableInfo>, IngestError> {
        Ok(self.table_infos(Some(name.to_owned())).await?.pop())
    }

    async fn table_infos(&self, only: Option<String>) -> Result<Vec<TableInfo>, IngestError> {
        self.settle(only.as_deref().map_or(Scope::All, Scope::Table)).await?;
        let db = self.db.clone();
        blocking(move || {
            let conn = db.connect()?;
            let mut statement = conn.prepare(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' \
                 AND (? IS NULL OR lower(table_name) = lower(?)) ORDER BY table_name",
            )?;
            let names = statement
                .query_map(duckdb::params![db.catalog(), only, only], |row| row.get::<_, String>(0))?
                .collect::<duckdb::Result<Vec<_>>>()?;
            names
                .into_iter()
                .map(|name| {
                    let relation = db.table_name(&name);
                    let schema =
                        conn.prepare(&format!("SELECT * FROM {relation} LIMIT 0"))?.query_arrow([])?.get_schema();
                    let rows: i64 =
                        conn.query_row(&format!("SELECT count(*) FROM {relation}"), [], |row| row.get(0))?;
                    Ok(TableInfo { name, schema, rows: rows.max(0) as u64 })
                })
                .collect()
        })
        .await
    }

    async fn run_query(&self, sql: Sql) -> Result<QueryResult, IngestError> {
        // A client's SQL may read any table; whole-table reads settled their own.
        if let Sql::Client(_) = sql {
            self.settle(Scope::All).await?;
        }
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| IngestError::ShuttingDown)?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (batches_tx, batches_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (interrupt_tx, interrupt_rx) = oneshot::channel::<Arc<InterruptHandle>>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let timed_out = Arc::new(AtomicBool::new(false));
        let timeout = self.timeout;
        let flag = timed_out.clone();
        tokio::spawn(async move {
            let Ok(interrupt) = interrupt_rx.await else { return };
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    flag.store(true, Ordering::Relaxed);
                    interrupt.interrupt();
                }
                _ = done_rx => {}
            }
        });
        let db = self.db.clone();
        let seconds = timeout.as_secs();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _done = done_tx;
            let outcome = run_query(&db, &sql, interrupt_tx, ready_tx, &batches_tx);
            if let Err(error) = outcome {
                let error =
                    if timed_out.load(Ordering::Relaxed) { IngestError::QueryTimeout { seconds } } else { error };
                // Before the schema went out, the error reaches the caller through `ready`.
                let _ = batches_tx.blocking_send(Err(error));
            }
        });
        match ready_rx.await {
            Ok(schema) => Ok(QueryResult { schema, batches: batches_rx }),
            Err(_) => {
                let mut batches = batches_rx;
                Err(match batches.recv().await {
                    Some(Err(error)) => error,
                    _ => IngestError::Database("the query stopped before it started".to_owned()),
                })
            }
        }
    }
}

/// A table as Flight lists it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: String,
    pub schema: SchemaRef,
    pub rows: u64,
}

/// Refuses anything but one read-only statement that reads the stream tables (see [`check_references`]).
fn check_read_only(db: &Database, sql: &str) -> Result<(), IngestError> {
    let raw = db.raw_connection()?;
    if !raw.is_read_only(sql).map_err(IngestError::InvalidQuery)? {
        return Err(IngestError::InvalidQuery(
            "only one read-only statement (SELECT, WITH, VALUES, DESCRIBE, ...) may run here".to_owned(),
        ));
    }
    let conn = db.connect()?;
    let tree: String = conn.query_row("SELECT json_serialize_sql(?::VARCHAR)", [sql], |row| row.get(0))?;
    let tables: HashSet<String> = conn
        .prepare("SELECT lower(table_name) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main'")?
        .query_map([db.catalog()], |row| row.get(0))?
        .collect::<duckdb::Result<_>>()?;
    check_references(&tree, db.catalog(), &tables)
}

fn run_query(
    db: &Database,
    sql: &Sql,
    interrupt: oneshot::Sender<Arc<InterruptHandle>>,
    ready: oneshot::Sender<SchemaRef>,
    batches: &mpsc::Sender<Result<RecordBatch, IngestError>>,
) -> Result<(), IngestError> {
    let text = match sql {
        Sql::Client(text) => {
            check_read_only(db, text)?;
            text
        }
        Sql::Internal(text) => text,
    };
    // A fresh connection per query: nothing a query sets can outlive it.
    let conn = db.connect()?;
    let _ = interrupt.send(conn.interrupt_handle());
    conn.execute_batch("BEGIN TRANSACTION READ ONLY")?;
    let outcome = stream_rows(&conn, text, ready, batches);
    let _ = conn.execute_batch("ROLLBACK");
    outcome
}

fn stream_rows(
    conn: &Connection,
    text: &str,
    ready: oneshot::Sender<SchemaRef>,
    batches: &mpsc::Sender<Result<RecordBatch, IngestError>>,
) -> Result<(), IngestError> {
    let mut statement = conn.prepare(text).map_err(|e| IngestError::InvalidQuery(e.to_string()))?;
    // Executes lazily; the iterator itself is not used because it panics on errors.
    drop(statement.stream_arrow([])?);
    let schema = statement.schema();
    if ready.send(schema.clone()).is_err() {
        return Ok(());
    }
    let mut pending: Vec<RecordBatch> = Vec::new();
    let mut pending_rows = 0;
    loop {
        let chunk = statement.step()?;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            let batch = RecordBatch::from(&chunk);
            pending_rows += batch.num_rows();
            pending.push(batch);
        }
        if (done && !pending.is_empty()) || pending_rows >= TARGET_BATCH_ROWS {
            let arrow_error = |e: arrow::error::ArrowError| IngestError::Database(e.to_string());
            let batch = concat_batches(&pending[0].schema(), &pending).map_err(arrow_error)?;
            // Chunks carry their own field names; the reply promised the statement's schema.
            let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec()).map_err(arrow_error)?;
            pending.clear();
            pending_rows = 0;
            if batches.blocking_send(Ok(batch)).is_err() {
                // The client went away: stop reading.
                return Ok(());
            }
        }
        if done {
            return Ok(());
        }
    }
}

/// Table functions a client query may call: they compute values or list tables (never views, where
/// uploads are scanned, nor databases or files).
const TABLE_FUNCTIONS: &[&str] = &["range", "generate_series", "unnest", "duckdb_tables"];

/// Checks a client's statement, as DuckDB's own parser serialised it (`json_serialize_sql`), against
/// what a client may read: tables of the data catalog's `main` schema (or the query's own CTEs) and
/// [`TABLE_FUNCTIONS`]. Nothing else is reachable: no other catalog (not the in-memory one where
/// uploads' Arrow streams are scanned, see [`crate::store::SCRATCH`]), no system views or table functions
/// that list the database or read files. DuckDB also refuses all file access for every connection
/// (`enable_external_access = false`, locked, see [`Database::open`]): this check is
/// the one that keeps queries off other clients' uploads.
fn check_references(tree: &str, catalog: &str, tables: &HashSet<String>) -> Result<(), IngestError> {
    let refused = |message: String| Err(IngestError::InvalidQuery(message));
    let tree: serde_json::Value =
        serde_json::from_str(tree).map_err(|e| IngestError::Database(format!("json_serialize_sql: {e}")))?;
    if tree["error"].as_bool() != Some(false) {
        let message = tree["error_message"].as_str().unwrap_or("the statement cannot be checked");
        return refused(message.to_owned());
    }
    let mut nodes = Vec::new();
    collect_objects(&tree, &HashSet::new(), &mut nodes);
    let text = |node: &serde_json::Value, key: &str| node[key].as_str().unwrap_or_default().to_lowercase();
    for (node, ctes) in nodes {
        match node["type"].as_str() {
            Some("BASE_TABLE") => {
                let (db, schema, name) =
                    (text(node, "catalog_name"), text(node, "schema_name"), text(node, "table_name"));
                let is_cte = db.is_empty() && schema.is_empty() && ctes.contains(&name);
                let is_table = in_data_catalog(&db, &schema, catalog) && tables.contains(&name);
                if !is_cte && !is_table {
                    let parts = [db.as_str(), schema.as_str(), name.as_str()];
                    let full = parts.into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>().join(".");
                    return refused(format!(
                        "Table with name {full} does not exist among the stream tables (queries read only those)"
                    ));
                }
            }
            Some("TABLE_FUNCTION") => {
                let function = &node["function"];
                let name = text(function, "function_name");
                let qualified = !text(function, "schema").is_empty() || !text(function, "catalog").is_empty();
                if qualified || !TABLE_FUNCTIONS.contains(&name.as_str()) {
                    return refused(format!(
                        "table function {name}() is not available to queries (only {})",
                        TABLE_FUNCTIONS.join(", ")
                    ));
                }
            }
            Some("SHOW_REF") if node["query"].is_null() => {
                return refused("SHOW is not available to queries; DESCRIBE a table or query it".to_owned());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a reference's catalog and schema (lower case, empty where not written) are the data's.
fn in_data_catalog(db: &str, schema: &str, catalog: &str) -> bool {
    (db.is_empty() || db == catalog.to_lowercase()) && (schema.is_empty() || schema == "main")
}

/// Every JSON object in `value`, depth first.
/// Every object of the tree, with the names of the CTEs a table reference there resolves to: those
/// of the query nodes around it (for a CTE's own query, only the CTEs before it in its `WITH`) and a
/// recursive CTE's own name. A CTE of another subquery is out of scope: DuckDB resolves that name in the
/// catalog, so it must pass the table check like any other.
fn collect_objects<'a>(
    value: &'a serde_json::Value,
    scope: &HashSet<String>,
    out: &mut Vec<(&'a serde_json::Value, HashSet<String>)>,
) {
    match value {
        serde_json::Value::Object(map) => {
            let mut scope = scope.clone();
            scope.extend(map.get("cte_name").and_then(|name| name.as_str()).map(str::to_lowercase));
            let ctes = map.get("cte_map").and_then(|ctes| ctes["map"].as_array());
            for entry in ctes.into_iter().flatten() {
                collect_objects(&entry["value"], &scope, out);
                scope.extend(entry["key"].as_str().map(str::to_lowercase));
            }
            for (key, child) in map {
                if key != "cte_map" {
                    collect_objects(child, &scope, out);
                }
            }
            out.push((value, scope));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_objects(v, scope, out)),
        _ => {}
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IngestError> + Send + 'static,
) -> Result<T, IngestError> {
    tokio::task::spawn_blocking(f).await.map_err(|join| IngestError::Database(format!("task failed: {join}")))?
}
