//! Small requests answered from the [journal](crate::journal), and written to their tables later.
//!
//! A request may be journaled only when nothing but the machine can keep its rows out of the table once
//! it is answered: it appends to a table that took requests of the same schema, policy and mode before
//! (its group is *trusted*), and that table has no constraints. Anything else (a new table, a schema
//! change, a table with a primary key) is committed before it is answered, as without the journal, and
//! a group commit of it that succeeds makes its group trusted for the requests after it.
//!
//! A record holds the request's target and receipt as JSON and its batches as an Arrow IPC stream.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrowport_config::SchemaPolicy;
use serde_json::{Value, json};

use super::group::GroupKey;
use super::{IfExists, Receipt, TableMode, Target};
use crate::error::IngestError;
use crate::journal::{BodyWriter, Journal, Recovered};

/// Where the journal is and how long its requests may wait to be written.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    pub dir: PathBuf,
    pub linger: Duration,
}

/// The loader's journal, and the groups whose requests may go to it.
pub(super) struct Journaling {
    pub journal: Journal,
    pub linger: Duration,
    trust: Mutex<Trust>,
}

/// Which groups may be journaled. A table's epoch moves whenever trust in its groups is withdrawn, so a
/// commit that started before (and so may have written to the table as it was) proves nothing; while a
/// session that may change the table's columns runs (a replace), none of its groups is journaled, since
/// a request answered then could find the table changed under it.
#[derive(Default)]
struct Trust {
    keys: HashSet<GroupKey>,
    epochs: HashMap<String, u64>,
    changing: HashMap<String, usize>,
}

impl Trust {
    fn withdraw(&mut self, table: &str) {
        self.keys.retain(|key| key.table != table);
        *self.epochs.entry(table.to_owned()).or_default() += 1;
    }
}

impl Journaling {
    pub fn new(journal: Journal, linger: Duration) -> Self {
        Self { journal, linger, trust: Mutex::new(Trust::default()) }
    }

    pub fn trusts(&self, key: &GroupKey) -> bool {
        let trust = self.lock();
        trust.keys.contains(key) && !trust.changing.contains_key(&key.table)
    }

    /// The table's epoch now: pass it to [`trust`](Self::trust) after a commit that starts now.
    pub fn epoch(&self, table: &str) -> u64 {
        self.lock().epochs.get(table).copied().unwrap_or(0)
    }

    /// Trusts `key` after a commit that started at `epoch`, unless trust in its table was withdrawn
    /// since or a change of the table is running.
    pub fn trust(&self, key: GroupKey, epoch: u64) {
        let mut trust = self.lock();
        let current = trust.epochs.get(&key.table).copied().unwrap_or(0);
        if current == epoch && !trust.changing.contains_key(&key.table) {
            trust.keys.insert(key);
        }
    }

    /// Stops journaling requests to `table` until a commit proves their group again.
    pub fn distrust_table(&self, table: &str) {
        self.lock().withdraw(table);
    }

    /// A session that may change `table`'s columns starts: nothing is journaled for it until
    /// [`end_change`](Self::end_change), and what was trusted before must be proven again after.
    pub fn begin_change(&self, table: &str) {
        let mut trust = self.lock();
        trust.withdraw(table);
        *trust.changing.entry(table.to_owned()).or_default() += 1;
    }

    pub fn end_change(&self, table: &str) {
        let mut trust = self.lock();
        trust.withdraw(table);
        if let Some(count) = trust.changing.get_mut(table) {
            *count -= 1;
            if *count == 0 {
                trust.changing.remove(table);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Trust> {
        self.trust.lock().expect("journal trust lock poisoned")
    }
}

/// A request's record: header (target and receipt, JSON) and what writes its body (its batches, Arrow
/// IPC) on the journal's thread.
pub(super) fn encode(
    target: &Target,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    receipt: Option<&Receipt>,
) -> (Vec<u8>, BodyWriter) {
    let receipt = receipt.map(|r| {
        json!({
            "stream": r.stream, "key": r.key, "request_id": r.request_id, "rows": r.rows, "batches": r.batches,
            "bytes_received": r.bytes_received, "bytes_decoded": r.bytes_decoded,
        })
    });
    let header = json!({
        "table": target.table,
        "chunk_size": target.chunk_size,
        "policy": target.policy,
        "create": target.mode.create,
        "receipt": receipt,
    });
    let (schema, batches) = (schema.clone(), batches.to_vec());
    let body: BodyWriter = Box::new(move |buffer: &mut Vec<u8>| {
        let mut writer = StreamWriter::try_new(buffer, &schema).map_err(std::io::Error::other)?;
        batches.iter().try_for_each(|batch| writer.write(batch)).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    });
    (header.to_string().into_bytes(), body)
}

/// A recovered record: the request's target, schema, batches and receipt.
pub(super) struct Decoded {
    pub target: Target,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub receipt: Option<Receipt>,
}

pub(super) fn decode(record: &Recovered) -> Result<Decoded, IngestError> {
    let damaged = |what: String| IngestError::Journal(format!("record {} cannot be read: {what}", record.seq));
    let header: Value = serde_json::from_slice(&record.header).map_err(|e| damaged(e.to_string()))?;
    let text = |value: &Value| value.as_str().map(str::to_owned).ok_or_else(|| damaged(format!("{value} is not text")));
    let number = |value: &Value| value.as_u64().ok_or_else(|| damaged(format!("{value} is not a number")));
    let policy: SchemaPolicy = serde_json::from_value(header["policy"].clone()).map_err(|e| damaged(e.to_string()))?;
    let target = Target {
        table: text(&header["table"])?,
        chunk_size: number(&header["chunk_size"])? as usize,
        policy,
        mode: TableMode { create: header["create"].as_bool().unwrap_or(true), if_exists: IfExists::Append },
    };
    let receipt = match &header["receipt"] {
        Value::Null => None,
        r => Some(Receipt {
            stream: text(&r["stream"])?,
            key: text(&r["key"])?,
            request_id: r["request_id"].as_u64(),
            rows: r["rows"].as_u64(),
            batches: r["batches"].as_u64(),
            bytes_received: number(&r["bytes_received"])?,
            bytes_decoded: number(&r["bytes_decoded"])?,
        }),
    };
    let reader = StreamReader::try_new(Cursor::new(&record.body), None).map_err(|e| damaged(e.to_string()))?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| damaged(e.to_string()))?;
    Ok(Decoded { target, schema, batches, receipt })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn key(table: &str) -> GroupKey {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        GroupKey { table: table.to_owned(), policy: SchemaPolicy::Reject, mode: TableMode::default(), schema }
    }

    #[test]
    fn a_change_of_the_table_withdraws_trust_during_and_after_it_and_older_commits_prove_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let journaling = Journaling::new(Journal::open(dir.path()).unwrap().0, Duration::from_millis(1));
        let (t, other) = (key("t"), key("other"));
        journaling.trust(t.clone(), journaling.epoch("t"));
        journaling.trust(other.clone(), journaling.epoch("other"));
        assert!(journaling.trusts(&t));
        let before_change = journaling.epoch("t");
        journaling.begin_change("t");
        assert!(!journaling.trusts(&t), "not while the table may change");
        journaling.trust(t.clone(), journaling.epoch("t"));
        assert!(!journaling.trusts(&t), "nor proven while it may");
        assert!(journaling.trusts(&other), "other tables keep their trust");
        let during_change = journaling.epoch("t");
        journaling.end_change("t");
        assert!(!journaling.trusts(&t), "the table may have changed: proven again first");
        journaling.trust(t.clone(), before_change);
        journaling.trust(t.clone(), during_change);
        assert!(!journaling.trusts(&t), "a commit that started before the change ended proves nothing");
        journaling.trust(t.clone(), journaling.epoch("t"));
        assert!(journaling.trusts(&t));
    }
}
