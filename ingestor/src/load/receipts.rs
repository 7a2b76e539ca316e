//! Receipts: proof, committed in the same transaction as a request's rows, that a client's request
//! (named by its idempotency key) is in the table. A retry with the same key finds the receipt and is
//! answered from it instead of writing the rows again.
//!
//! Receipts live in `arrowport.receipts` in the data catalog: beside the data, so they survive a crash
//! exactly as the rows do, and outside `main`, so no stream routes to them and no client query reads
//! them. Times are milliseconds since the epoch, computed here, so pruning needs no time-zone support.

use std::time::{SystemTime, UNIX_EPOCH};

use duckdb::{Connection, OptionalExt, params};

use crate::error::IngestError;
use crate::store::Database;

/// What a commit records for one keyed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub stream: String,
    pub key: String,
    /// A Flight producer's position: the highest `request_id` this commit covers.
    pub request_id: Option<u64>,
    /// The request's own rows and batches; `None` in a session of its own, where they are the session's.
    pub rows: Option<u64>,
    pub batches: Option<u64>,
    pub bytes_received: u64,
    pub bytes_decoded: u64,
}

/// What a commit records beside its rows.
#[derive(Debug, Clone, Default)]
pub struct Proof {
    /// The receipts of the keyed requests it commits.
    pub receipts: Vec<Receipt>,
    /// The journal records it applies: the journal's id and their sequence numbers.
    pub journaled: Option<(String, Vec<u64>)>,
}

/// A receipt found for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub rows: u64,
    pub batches: u64,
    pub bytes_received: u64,
    pub bytes_decoded: u64,
    /// The highest `request_id` committed under the key (Flight producers).
    pub request_id: Option<u64>,
}

fn table(db: &Database) -> String {
    crate::store::sql::qualified(db.catalog(), "arrowport", "receipts")
}

fn journal_table(db: &Database) -> String {
    crate::store::sql::qualified(db.catalog(), "arrowport", "journal_applied")
}

/// Creates the receipts table, and the table of journal records applied, if they do not exist.
pub fn create_table(db: &Database) -> Result<(), IngestError> {
    let schema = format!("{}.arrowport", crate::store::sql::ident(db.catalog()));
    db.with_connection(|conn| {
        conn.execute_batch(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; CREATE TABLE IF NOT EXISTS {} (stream VARCHAR NOT NULL, \
             key VARCHAR NOT NULL, committed_ms BIGINT NOT NULL, request_id UBIGINT, rows UBIGINT NOT NULL, \
             batches UBIGINT NOT NULL, bytes_received UBIGINT NOT NULL, bytes_decoded UBIGINT NOT NULL); \
             CREATE TABLE IF NOT EXISTS {} (journal VARCHAR NOT NULL, seqs UBIGINT[] NOT NULL, \
             committed_ms BIGINT NOT NULL)",
            table(db),
            journal_table(db)
        ))
    })
}

/// Records `proof` on `conn`, inside the transaction that wrote its rows.
pub fn record(db: &Database, conn: &Connection, proof: &Proof, rows: u64, batches: u64) -> Result<(), IngestError> {
    let now = now_ms();
    if let Some((journal, seqs)) = &proof.journaled {
        let seqs = format!("{seqs:?}");
        let sql = format!("INSERT INTO {} VALUES (?, ?::UBIGINT[], ?)", journal_table(db));
        conn.execute(&sql, params![journal, seqs, now])?;
    }
    let receipts = &proof.receipts;
    if receipts.is_empty() {
        return Ok(());
    }
    let mut statement = conn.prepare(&format!("INSERT INTO {} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", table(db)))?;
    for receipt in receipts {
        statement.execute(params![
            receipt.stream,
            receipt.key,
            now,
            receipt.request_id,
            receipt.rows.unwrap_or(rows),
            receipt.batches.unwrap_or(batches),
            receipt.bytes_received,
            receipt.bytes_decoded,
        ])?;
    }
    Ok(())
}

/// The receipt of `key` on `stream`, if one is committed: for a request, its own; for a Flight
/// producer's key, the totals of its commits and the highest `request_id` among them.
pub fn find(db: &Database, stream: &str, key: &str) -> Result<Option<Found>, IngestError> {
    let conn = db.connect()?;
    let found = conn
        .query_row(
            &format!(
                "SELECT sum(rows)::UBIGINT, sum(batches)::UBIGINT, sum(bytes_received)::UBIGINT, \
                 sum(bytes_decoded)::UBIGINT, max(request_id) FROM {} WHERE stream = ? AND key = ? HAVING count(*) > 0",
                table(db)
            ),
            params![stream, key],
            |row| {
                Ok(Found {
                    rows: row.get(0)?,
                    batches: row.get(1)?,
                    bytes_received: row.get(2)?,
                    bytes_decoded: row.get(3)?,
                    request_id: row.get(4)?,
                })
            },
        )
        .optional()?;
    Ok(found)
}

/// Forgets receipts older than `window_ms`; returns how many are left.
pub fn prune(db: &Database, window_ms: u64) -> Result<u64, IngestError> {
    let conn = db.connect()?;
    let cutoff = now_ms().saturating_sub(window_ms as i64);
    conn.execute(&format!("DELETE FROM {} WHERE committed_ms < ?", table(db)), params![cutoff])?;
    let left: i64 = conn.query_row(&format!("SELECT count(*) FROM {}", table(db)), [], |row| row.get(0))?;
    Ok(left.max(0) as u64)
}

/// The sequence numbers of `journal`'s records from `oldest` on that are applied.
pub fn journal_applied(db: &Database, journal: &str, oldest: u64) -> Result<Vec<u64>, IngestError> {
    let conn = db.connect()?;
    let mut statement = conn.prepare(&format!(
        "SELECT seq FROM (SELECT unnest(seqs) AS seq FROM {} WHERE journal = ?) WHERE seq >= ?",
        journal_table(db)
    ))?;
    let seqs = statement.query_map(params![journal, oldest], |row| row.get(0))?.collect::<duckdb::Result<_>>()?;
    Ok(seqs)
}

/// Forgets which of `journal`'s records below `oldest` were applied: the journal no longer holds them.
pub fn prune_journal_applied(db: &Database, journal: &str, oldest: u64) -> Result<(), IngestError> {
    let conn = db.connect()?;
    let sql = format!("DELETE FROM {} WHERE journal = ? AND list_max(seqs) < ?", journal_table(db));
    conn.execute(&sql, params![journal, oldest])?;
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
