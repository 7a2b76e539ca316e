//! The Arrow stream DuckDB pulls a session's batches from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{RecordBatch, RecordBatchReader};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use tokio::sync::mpsc;

use super::Proof;
use super::held::holding;
use crate::budget::Reservation;

/// What a session sends to DuckDB.
pub enum Feed {
    /// A batch, holding its share of the memory budget until DuckDB releases it (unless its request holds it).
    Batch(RecordBatch, Option<Reservation>),
    /// The stream is complete: the transaction may commit, recording this beside its rows.
    End(Proof),
}

/// Yields batches until [`Feed::End`]. A channel closed without `End` means the producer failed or went
/// away: that is an error, so DuckDB aborts the statement and the transaction rolls back.
pub struct ChannelReader {
    schema: SchemaRef,
    rx: mpsc::Receiver<Feed>,
    finished: bool,
    batches: Arc<AtomicU64>,
    /// Where the proof that came with [`Feed::End`] is left for the commit.
    proof: Arc<Mutex<Proof>>,
}

impl ChannelReader {
    pub fn new(schema: SchemaRef, rx: mpsc::Receiver<Feed>, batches: Arc<AtomicU64>, proof: Arc<Mutex<Proof>>) -> Self {
        Self { schema, rx, finished: false, batches, proof }
    }
}

impl Iterator for ChannelReader {
    type Item = Result<RecordBatch, ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        // Runs on DuckDB's threads or the loader's blocking thread, never on the async runtime.
        match self.rx.blocking_recv() {
            Some(Feed::Batch(batch, reservation)) => {
                self.batches.fetch_add(1, Ordering::Relaxed);
                Some(Ok(match reservation {
                    Some(reservation) => holding(&batch, reservation),
                    None => batch,
                }))
            }
            Some(Feed::End(proof)) => {
                self.finished = true;
                *self.proof.lock().expect("proof lock poisoned") = proof;
                None
            }
            None => {
                self.finished = true;
                Some(Err(ArrowError::ExternalError("the request ended before it was complete".into())))
            }
        }
    }
}

impl RecordBatchReader for ChannelReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}
