//! The checker: the table, request by request, held against the ledger.
//!
//! Two checks, kept apart on purpose:
//! - [`at_most_once`]: every request in the table is whole (all its rows, none missing), once (no row
//!   twice), unaltered, and was sent and not refused. This holds for every request, acknowledged or not.
//! - [`exactly_once_for_acked`]: every acknowledged request is in the table, and so is every request an
//!   earlier check found there (a later crash must not take back what was durable). Together with the
//!   first check: acknowledged means present exactly once.
//!
//! Requests in flight at a kill have no answer; they may be present (whole, once) or absent. Once
//! producers retry those with an idempotency key, the retried ones move into the second check: acked
//! after the retry, so present exactly once however many times they were sent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::Context;
use arrow::array::{Array, Int64Array, RecordBatch};
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;

use crate::data::{NOTE_SQL, STREAM, VALUE_SQL};
use crate::ledger::{Key, Ledger, State};
use crate::server::Spec;

/// One request as the table holds it.
///
/// The check after each restart reads a fingerprint of each request's row numbers — count, range, sum
/// and sum of squares — and its `value`s, which costs DuckDB about a tenth of counting distinct row
/// numbers and comparing every `note` (0.4 s against 5 s for 9M rows). The final check also counts
/// distinct row numbers and compares the notes: there, whole and once is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub rows: i64,
    pub min_row: i64,
    pub max_row: i64,
    pub sum_rows: i64,
    pub sum_squares: i64,
    /// Distinct row numbers (the exact check only).
    pub distinct_rows: Option<i64>,
    /// Rows whose `value` (or, in the exact check, `note`) is not what the producer sent for that row.
    pub altered_rows: i64,
}

impl Observed {
    /// A request of `rows` rows, whole and once.
    pub fn whole(rows: i64, exact: bool) -> Self {
        Self {
            rows,
            min_row: 0,
            max_row: rows - 1,
            sum_rows: rows * (rows - 1) / 2,
            sum_squares: (rows - 1) * rows * (2 * rows - 1) / 6,
            distinct_rows: exact.then_some(rows),
            altered_rows: 0,
        }
    }
}

pub type Table = BTreeMap<Key, Observed>;

/// Everything found wrong, by request (the first finding of each request is kept, with the check that
/// found it).
#[derive(Default)]
pub struct Findings {
    /// Acknowledged (or found present before) but absent.
    pub lost: BTreeMap<Key, String>,
    /// Partly present: some of its rows missing, or rows it never had.
    pub torn: BTreeMap<Key, String>,
    /// Some rows (or the whole request) present more than once.
    pub duplicated: BTreeMap<Key, String>,
    /// Present although never sent, or refused with a definite answer.
    pub phantom: BTreeMap<Key, String>,
    /// Rows whose values differ from what was sent.
    pub altered: BTreeMap<Key, String>,
}

impl Findings {
    pub fn total(&self) -> usize {
        self.lost.len() + self.torn.len() + self.duplicated.len() + self.phantom.len() + self.altered.len()
    }

    /// The findings as lines, at most `limit` of each kind.
    pub fn describe(&self, limit: usize) -> Vec<String> {
        let kinds = [
            ("lost", &self.lost),
            ("torn", &self.torn),
            ("duplicated", &self.duplicated),
            ("phantom", &self.phantom),
            ("altered", &self.altered),
        ];
        let mut lines = Vec::new();
        for (kind, found) in kinds {
            for ((producer, request), detail) in found.iter().take(limit) {
                lines.push(format!("{kind}: producer {producer} request {request}: {detail}"));
            }
            if found.len() > limit {
                lines.push(format!("{kind}: ... and {} more", found.len() - limit));
            }
        }
        lines
    }
}

/// What one check saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    pub requests: usize,
    pub rows: i64,
    /// Requests left without an answer by a kill, and of those how many are in the table.
    pub ambiguous: usize,
    pub ambiguous_present: usize,
}

/// Every request present is whole, once, unaltered, and one the producers sent and did not see refused.
pub fn at_most_once(ledger: &Ledger, table: &Table, label: &str, findings: &mut Findings) {
    for (key, seen) in table {
        let note = |detail: String| format!("{detail} ({label})");
        let Some(sent) = ledger.get(key) else {
            findings.phantom.entry(*key).or_insert_with(|| note(format!("{} rows of a request never sent", seen.rows)));
            continue;
        };
        if sent.state == State::Refused {
            findings.phantom.entry(*key).or_insert_with(|| note(format!("{} rows of a refused request", seen.rows)));
        }
        let n = sent.rows;
        let duplicated = seen.distinct_rows.map_or(seen.rows > n, |distinct| seen.rows > distinct);
        let torn = match seen.distinct_rows {
            Some(distinct) => distinct != n || seen.min_row != 0 || seen.max_row != n - 1,
            // Whole copies (one, or more: duplicated) of rows 0..n, by their fingerprint.
            None => {
                let copies = seen.rows / n;
                let whole = Observed::whole(n, false);
                seen.rows % n != 0
                    || (seen.min_row, seen.max_row) != (0, n - 1)
                    || (seen.sum_rows, seen.sum_squares) != (copies * whole.sum_rows, copies * whole.sum_squares)
            }
        };
        let shape = || {
            let distinct = seen.distinct_rows.map_or(String::new(), |d| format!(", {d} distinct"));
            format!(
                "{} rows{distinct} numbered {}..={}, of {n} sent ({:?}, {:?}, server run {})",
                seen.rows, seen.min_row, seen.max_row, sent.protocol, sent.state, sent.epoch
            )
        };
        if duplicated {
            findings.duplicated.entry(*key).or_insert_with(|| note(shape()));
        }
        if torn {
            findings.torn.entry(*key).or_insert_with(|| note(shape()));
        }
        if seen.altered_rows > 0 {
            findings.altered.entry(*key).or_insert_with(|| note(format!("{} rows altered", seen.altered_rows)));
        }
    }
}

/// Every acknowledged request is present, and so is every request an earlier check found (`durable`,
/// which this check extends with what it finds).
pub fn exactly_once_for_acked(
    ledger: &Ledger,
    table: &Table,
    durable: &mut BTreeSet<Key>,
    label: &str,
    findings: &mut Findings,
) {
    for (key, sent) in ledger.iter() {
        if sent.state == State::Acked && !table.contains_key(key) {
            findings.lost.entry(*key).or_insert_with(|| {
                format!(
                    "acknowledged ({:?}, {} rows, server run {}) but absent ({label})",
                    sent.protocol, sent.rows, sent.epoch
                )
            });
        }
    }
    for key in durable.iter() {
        if !table.contains_key(key) {
            findings.lost.entry(*key).or_insert_with(|| format!("present at an earlier check, absent now ({label})"));
        }
    }
    durable.extend(table.keys().copied());
}

/// Both checks, and what the table holds.
pub fn check(
    ledger: &Ledger,
    table: &Table,
    durable: &mut BTreeSet<Key>,
    label: &str,
    findings: &mut Findings,
) -> Seen {
    at_most_once(ledger, table, label, findings);
    exactly_once_for_acked(ledger, table, durable, label, findings);
    let ambiguous: Vec<&Key> = ledger.iter().filter(|(_, s)| s.state == State::Ambiguous).map(|(k, _)| k).collect();
    Seen {
        requests: table.len(),
        rows: table.values().map(|o| o.rows).sum(),
        ambiguous: ambiguous.len(),
        ambiguous_present: ambiguous.iter().filter(|k| table.contains_key(k)).count(),
    }
}

/// Each request in the table: the columns of [`Observed`], in its order. `exact` adds the distinct row
/// numbers and the notes.
fn table_query(exact: bool) -> String {
    let (distinct, altered) = match exact {
        true => ("count(DISTINCT row_no)", format!("value <> {VALUE_SQL} OR note <> {NOTE_SQL}")),
        false => ("NULL::BIGINT", format!("value <> {VALUE_SQL}")),
    };
    format!(
        "SELECT producer::BIGINT, request::BIGINT, count(*), min(row_no)::BIGINT, max(row_no)::BIGINT, \
         sum(row_no)::BIGINT, sum(row_no::BIGINT * row_no)::BIGINT, {distinct}, count(*) FILTER (WHERE {altered}) \
         FROM {STREAM} GROUP BY producer, request"
    )
}

fn exists_query() -> String {
    format!("SELECT count(*) FROM duckdb_tables() WHERE table_name = '{STREAM}'")
}

/// The table's fingerprints, read while the server runs, through its Flight SQL query API.
pub async fn through_server(url: &str) -> anyhow::Result<Table> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())?.connect().await?;
    let mut sql = FlightSqlServiceClient::new(channel);
    let exists = query(&mut sql, &exists_query()).await?;
    if column(&exists, 0)?.first() != Some(&1) {
        return Ok(Table::new());
    }
    let batches = query(&mut sql, &table_query(false)).await?;
    let mut table = Table::new();
    for batch in &batches {
        let columns: Vec<Vec<i64>> = [0, 1, 2, 3, 4, 5, 6, 8]
            .iter()
            .map(|&i| column(std::slice::from_ref(batch), i))
            .collect::<Result<_, _>>()?;
        for (row, &producer) in columns[0].iter().enumerate() {
            let c = |i: usize| columns[i][row];
            let observed = Observed {
                rows: c(2),
                min_row: c(3),
                max_row: c(4),
                sum_rows: c(5),
                sum_squares: c(6),
                distinct_rows: None,
                altered_rows: c(7),
            };
            table.insert((i32::try_from(producer)?, c(1)), observed);
        }
    }
    Ok(table)
}

async fn query(
    sql: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    query: &str,
) -> anyhow::Result<Vec<RecordBatch>> {
    let info = sql.execute(query.to_owned(), None).await.with_context(|| format!("query {query}"))?;
    let ticket = info.endpoint.first().and_then(|e| e.ticket.clone()).context("a ticket for the query's result")?;
    Ok(sql.do_get(ticket).await?.try_collect().await?)
}

/// Column `index` of the batches, as BIGINTs (the queries cast every column to BIGINT).
fn column(batches: &[RecordBatch], index: usize) -> anyhow::Result<Vec<i64>> {
    let mut values = Vec::new();
    for batch in batches {
        let array = batch.column(index);
        let ints = array
            .as_any()
            .downcast_ref::<Int64Array>()
            .with_context(|| format!("BIGINT, not {}", array.data_type()))?;
        anyhow::ensure!(ints.null_count() == 0, "NULL in the query's column {index}");
        values.extend(ints.values().iter().copied());
    }
    Ok(values)
}

/// The table, exactly, read by opening the database file (or attaching the lake) here; the server must
/// have stopped: it holds the lock. Opening replays any write-ahead log, as a restart does.
pub fn from_file(spec: &Spec) -> anyhow::Result<Table> {
    let connection = open(spec)?;
    let exists: i64 = connection.query_row(&exists_query(), [], |row| row.get(0))?;
    let mut table = Table::new();
    if exists != 1 {
        return Ok(table);
    }
    let mut statement = connection.prepare(&table_query(true))?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let producer: i64 = row.get(0)?;
        let observed = Observed {
            rows: row.get(2)?,
            min_row: row.get(3)?,
            max_row: row.get(4)?,
            sum_rows: row.get(5)?,
            sum_squares: row.get(6)?,
            distinct_rows: Some(row.get(7)?),
            altered_rows: row.get(8)?,
        };
        table.insert((i32::try_from(producer)?, row.get(1)?), observed);
    }
    Ok(table)
}

/// The database file, or an in-memory database with the lake attached (as `lake`, in use).
fn open(spec: &Spec) -> anyhow::Result<duckdb::Connection> {
    let Some(lake) = &spec.lake else {
        return duckdb::Connection::open(&spec.db).with_context(|| format!("cannot open {}", spec.db.display()));
    };
    let connection = duckdb::Connection::open_in_memory()?;
    let quote = |text: &str| format!("'{}'", text.replace('\'', "''"));
    let mut extensions = vec!["ducklake", "icu"];
    if lake.catalog.starts_with("postgres:") {
        extensions.push("postgres_scanner");
    }
    for name in extensions {
        let file = lake.extensions.join(format!("{name}.duckdb_extension"));
        connection.execute_batch(&format!("LOAD {}", quote(&file.to_string_lossy())))?;
    }
    let data_path = format!("{}/", lake.data_path.to_string_lossy().trim_end_matches('/'));
    let attach = format!(
        "ATTACH {} AS lake (DATA_PATH {}); USE lake",
        quote(&format!("ducklake:{}", lake.catalog)),
        quote(&data_path)
    );
    connection.execute_batch(&attach).with_context(|| format!("cannot attach the lake {}", lake.catalog))?;
    Ok(connection)
}

/// A lake's Parquet files: on disk under its data path, referenced by its latest snapshot (data and
/// delete files of every table), and known to its catalog otherwise (kept for older snapshots, or
/// scheduled for deletion once those expired).
pub struct LakeFiles {
    pub on_disk: BTreeSet<PathBuf>,
    pub referenced: BTreeSet<PathBuf>,
    pub known: BTreeSet<PathBuf>,
}

impl LakeFiles {
    /// Files the catalog does not know: left behind by a killed writer and not cleaned up.
    pub fn unreferenced(&self) -> Vec<&PathBuf> {
        self.on_disk.iter().filter(|file| !self.referenced.contains(*file) && !self.known.contains(*file)).collect()
    }

    /// Files the latest snapshot references that are gone: data lost.
    pub fn missing(&self) -> Vec<&PathBuf> {
        self.referenced.difference(&self.on_disk).collect()
    }
}

/// Every file path in the catalog's tables (relative ones resolved as DuckLake does: data path, schema's
/// path, table's path, file's), and those scheduled for deletion (relative to the data path).
fn known_files_query(data_path: &str) -> String {
    let data_path = data_path.replace('\'', "''");
    let resolved = |files: &str| {
        format!(
            "SELECT CASE WHEN NOT f.path_is_relative THEN f.path \
                 WHEN NOT t.path_is_relative THEN t.path || f.path \
                 WHEN NOT s.path_is_relative THEN s.path || t.path || f.path \
                 ELSE '{data_path}' || s.path || t.path || f.path END \
             FROM __ducklake_metadata_lake.{files} f \
             JOIN __ducklake_metadata_lake.ducklake_table t USING (table_id) \
             JOIN __ducklake_metadata_lake.ducklake_schema s USING (schema_id)"
        )
    };
    format!(
        "{} UNION {} UNION SELECT CASE WHEN path_is_relative THEN '{data_path}' || path ELSE path END \
         FROM __ducklake_metadata_lake.ducklake_files_scheduled_for_deletion",
        resolved("ducklake_data_file"),
        resolved("ducklake_delete_file")
    )
}

pub fn lake_files(spec: &Spec) -> anyhow::Result<LakeFiles> {
    let lake = spec.lake.as_ref().context("not a lake")?;
    let connection = open(spec)?;
    let mut tables =
        connection.prepare("SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = 'lake'")?;
    let tables: Vec<(String, String)> =
        tables.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?;
    let mut referenced = BTreeSet::new();
    for (schema, table) in tables {
        let query = format!(
            "SELECT data_file, delete_file FROM ducklake_list_files('lake', '{}', schema => '{}')",
            table.replace('\'', "''"),
            schema.replace('\'', "''")
        );
        let mut statement = connection.prepare(&query)?;
        let files: Vec<(String, Option<String>)> =
            statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?;
        for (data, delete) in files {
            referenced.insert(PathBuf::from(data));
            referenced.extend(delete.map(PathBuf::from));
        }
    }
    let data_path = format!("{}/", lake.data_path.to_string_lossy().trim_end_matches('/'));
    let mut statement = connection.prepare(&known_files_query(&data_path))?;
    let known = statement.query_map([], |row| row.get::<_, String>(0))?.map(|path| path.map(PathBuf::from));
    let known = known.collect::<Result<_, _>>()?;
    let mut on_disk = BTreeSet::new();
    let mut directories = vec![lake.data_path.clone()];
    while let Some(directory) = directories.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else { continue };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                directories.push(path);
            } else if path.extension().is_some_and(|extension| extension == "parquet") {
                on_disk.insert(path);
            }
        }
    }
    Ok(LakeFiles { on_disk, referenced, known })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Protocol;

    fn ledger(entries: &[(Key, i64, State)]) -> Ledger {
        let mut ledger = Ledger::default();
        for &(key, rows, state) in entries {
            ledger.register(key, rows, Protocol::Http, 0);
            ledger.settle(key, state);
        }
        ledger
    }

    /// What the table would hold for these row numbers (with `altered` of them altered).
    fn rows(numbers: &[i64], exact: bool, altered: i64) -> Observed {
        let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
        Observed {
            rows: numbers.len() as i64,
            min_row: *numbers.iter().min().unwrap(),
            max_row: *numbers.iter().max().unwrap(),
            sum_rows: numbers.iter().sum(),
            sum_squares: numbers.iter().map(|n| n * n).sum(),
            distinct_rows: exact.then_some(distinct.len() as i64),
            altered_rows: altered,
        }
    }

    #[test]
    fn whole_requests_pass_and_ambiguous_ones_may_be_absent() {
        for exact in [false, true] {
            let ledger =
                ledger(&[((0, 0), 10, State::Acked), ((0, 1), 10, State::Ambiguous), ((1, 0), 5, State::Ambiguous)]);
            let table = Table::from([((0, 0), Observed::whole(10, exact)), ((1, 0), Observed::whole(5, exact))]);
            assert_eq!(table[&(0, 0)], rows(&(0..10).collect::<Vec<_>>(), exact, 0));
            let (mut durable, mut findings) = (BTreeSet::new(), Findings::default());
            let seen = check(&ledger, &table, &mut durable, "test", &mut findings);
            assert_eq!(findings.total(), 0, "{:?}", findings.describe(10));
            assert_eq!((seen.requests, seen.rows, seen.ambiguous, seen.ambiguous_present), (2, 15, 2, 1));
            assert_eq!(durable.len(), 2);
        }
    }

    #[test]
    fn each_kind_of_damage_is_told_apart_by_both_checks() {
        let ledger = ledger(&[
            ((0, 0), 4, State::Acked),     // lost
            ((0, 1), 4, State::Ambiguous), // torn: 3 of 4
            ((0, 2), 4, State::Acked),     // duplicated: twice
            ((0, 3), 4, State::Refused),   // phantom: refused but present
            ((0, 4), 4, State::Acked),     // altered
            ((0, 5), 4, State::Acked),     // one row twice, another missing: torn and duplicated
        ]);
        for exact in [false, true] {
            let table = Table::from([
                ((0, 1), rows(&[0, 1, 2], exact, 0)),
                ((0, 2), rows(&[0, 1, 2, 3, 0, 1, 2, 3], exact, 0)),
                ((0, 3), rows(&[0, 1, 2, 3], exact, 0)),
                ((0, 4), rows(&[0, 1, 2, 3], exact, 1)),
                ((0, 5), rows(&[0, 1, 1, 3], exact, 0)),
                ((9, 9), rows(&[0, 1], exact, 0)), // phantom: never sent
            ]);
            let (mut durable, mut findings) = (BTreeSet::new(), Findings::default());
            check(&ledger, &table, &mut durable, "test", &mut findings);
            let keys = |found: &BTreeMap<Key, String>| found.keys().copied().collect::<Vec<_>>();
            assert_eq!(keys(&findings.lost), [(0, 0)]);
            assert_eq!(keys(&findings.torn), [(0, 1), (0, 5)]);
            // The fingerprint sees four rows where four were sent: the repeated row shows as torn only.
            let duplicated: &[Key] = if exact { &[(0, 2), (0, 5)] } else { &[(0, 2)] };
            assert_eq!(keys(&findings.duplicated), duplicated);
            assert_eq!(keys(&findings.phantom), [(0, 3), (9, 9)]);
            assert_eq!(keys(&findings.altered), [(0, 4)]);
        }
    }

    #[test]
    fn a_request_found_once_must_stay() {
        let ledger = ledger(&[((0, 0), 10, State::Ambiguous)]);
        let (mut durable, mut findings) = (BTreeSet::new(), Findings::default());
        check(&ledger, &Table::from([((0, 0), Observed::whole(10, false))]), &mut durable, "first", &mut findings);
        assert_eq!(findings.total(), 0);
        check(&ledger, &Table::new(), &mut durable, "second", &mut findings);
        assert_eq!(findings.lost.keys().copied().collect::<Vec<_>>(), [(0, 0)]);
        assert!(findings.lost[&(0, 0)].contains("second"));
    }
}
