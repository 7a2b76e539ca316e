//! One request's rows on their way into a table.
//!
//! A request starts out small: its batches are held (against the memory budget) and, if it ends that way,
//! committed together with other small requests (see [`group`](super::group)). Once it reaches a chunk of
//! rows or [`SMALL_REQUEST_BYTES`] it gets a session of its own and streams, never held whole in memory.
//! Only appends are grouped: a request that replaces the table, or must create it, has to find the table
//! as the requests before it left it, so it always has a transaction of its own.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::{Committed, IfExists, LoadSession, Loader, Proof, Receipt, Target, check_supported, decoded_size};
use crate::budget::Reservation;
use crate::error::IngestError;

/// Decoded bytes up to which a request counts as small (and rows up to the target's chunk size).
pub const SMALL_REQUEST_BYTES: u64 = 8 << 20;

/// A request being loaded: [`send`](Self::send) its batches, then [`commit`](Self::commit). Dropping it
/// without committing writes nothing.
pub struct Upload {
    loader: Loader,
    target: Target,
    schema: SchemaRef,
    held: Vec<RecordBatch>,
    reservations: Vec<Reservation>,
    held_rows: usize,
    held_bytes: u64,
    session: Option<LoadSession>,
}

impl Loader {
    /// Starts loading a request whose batches have `schema`. Unsupported types are refused here; whether
    /// the schema fits the table is checked when the request's transaction begins.
    pub fn upload(&self, target: Target, schema: SchemaRef) -> Result<Upload, IngestError> {
        check_supported(&schema)?;
        Ok(Upload {
            loader: self.clone(),
            target,
            schema,
            held: Vec::new(),
            reservations: Vec::new(),
            held_rows: 0,
            held_bytes: 0,
            session: None,
        })
    }
}

impl Upload {
    /// Takes one batch with the budget reservation that covers it (see
    /// [`MemoryBudget::reserve_batch`](crate::budget::MemoryBudget::reserve_batch)), waiting while DuckDB
    /// catches up. Returns its decoded size.
    pub async fn send(&mut self, batch: RecordBatch, reservation: Reservation) -> Result<u64, IngestError> {
        let session = match &mut self.session {
            Some(session) => session,
            None => {
                let size = decoded_size(&batch);
                if self.target.mode.if_exists == IfExists::Append
                    && self.held_rows + batch.num_rows() < self.target.chunk_size
                    && self.held_bytes + size < SMALL_REQUEST_BYTES
                {
                    self.held_rows += batch.num_rows();
                    self.held_bytes += size;
                    self.held.push(batch);
                    self.reservations.push(reservation);
                    return Ok(size);
                }
                let mut session = self.loader.begin(self.target.clone(), self.schema.clone()).await?;
                for (held, reservation) in self.held.drain(..).zip(self.reservations.drain(..)) {
                    session.feed(held, Some(reservation)).await?;
                }
                self.session.insert(session)
            }
        };
        session.send(batch, reservation).await
    }

    /// Waits until the next batch would go straight to DuckDB. A request that waits here before reading
    /// further holds one batch in memory, not one read and another queued behind it.
    pub async fn ready(&self) {
        if let Some(session) = &self.session {
            session.ready().await;
        }
    }

    /// Ends the request and waits until its rows, and its receipt if it has one, are committed.
    pub async fn commit(self, receipt: Option<Receipt>) -> Result<Committed, IngestError> {
        match self.session {
            Some(session) => session.commit(Proof { receipts: receipt.into_iter().collect(), journaled: None }).await,
            None => self.loader.commit_in_group(self.target, self.schema, self.held, self.reservations, receipt).await,
        }
    }
}
