//! Small requests answered from the [journal](crate::journal), and written to their tables later.
//!
//! A request may be journaled only when nothing but the machine can keep its rows out of the table once
//! it is answered: it appends to a table that took requests of the same schema, policy and mode before
//! (its group is *trusted*), and that table has no constraints. Anything else (a new table, a schema
//! change, a table with a primary key) is committed before it is answered, as without the journal, and
//! a group commit of it that succeeds makes its group trusted for the requests after it.
//!
//! A record holds the request's target and receipt as JSON and its batches as an Arrow IPC stream.

use std::collections::HashSet;
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
    trusted: Mutex<HashSet<GroupKey>>,
}

impl Journaling {
    pub fn new(journal: Journal, linger: Duration) -> Self {
        Self { journal, linger, trusted: Mutex::new(HashSet::new()) }
    }

    pub fn trusts(&self, key: &GroupKey) -> bool {
        self.lock().contains(key)
    }

    pub fn trust(&self, key: GroupKey) {
        self.lock().insert(key);
    }

    /// Stops journaling requests to `table` until a commit proves their group again.
    pub fn distrust_table(&self, table: &str) {
        self.lock().retain(|key| key.table != table);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<GroupKey>> {
        self.trusted.lock().expect("trusted groups lock poisoned")
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
