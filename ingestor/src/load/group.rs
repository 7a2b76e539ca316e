//! Group commit: small requests to one table with one schema share a transaction.
//!
//! Every transaction has a fixed cost — describing the scan view, planning the insert, merging local
//! storage at commit — of a few milliseconds of CPU, which dominates a 1,000-row request. Requests that
//! end below the small-request threshold (see [`Upload`](super::Upload)) queue here by table and schema;
//! one runner per queue commits everything queued in one session and then answers each request. While it
//! commits, the next group gathers, so groups grow with load and nobody waits on a timer. When a group
//! fails, its requests are retried one at a time, so one bad request cannot fail the others.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrowport_config::SchemaPolicy;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::{Committed, LoadSession, Loader, Receipt, TableMode, Target, decoded_size};
use crate::budget::{MemoryBudget, Reservation};
use crate::error::IngestError;

/// Most rows one group commits; the requests after them form the next group.
const MAX_GROUP_ROWS: u64 = 1 << 20;

/// Decoded bytes up to which a group's small batches are joined into one before DuckDB scans them.
/// DuckDB's per-batch work dominates small batches: in one transaction, 25,600 rows as 100-row batches
/// took 3x the CPU of the same rows as one batch, as 1,000-row batches 1.4x. The joined copy holds its
/// own share of the memory budget until DuckDB releases it.
const JOINED_BATCH_BYTES: u64 = 4 << 20;

/// Requests waiting for a group commit, by what they write to. A key is present while its runner runs.
#[derive(Default)]
pub(super) struct GroupQueues {
    queues: std::sync::Mutex<HashMap<GroupKey, Vec<Member>>>,
    /// Requests retried one at a time because the group they were in failed, since the loader opened.
    retried_alone: AtomicU64,
}

/// Requests can share a transaction when they write the same columns to the same table the same way.
#[derive(Clone, Hash, PartialEq, Eq)]
struct GroupKey {
    table: String,
    policy: SchemaPolicy,
    mode: TableMode,
    schema: SchemaRef,
}

/// A complete small request: its batches (holding their share of the memory budget) and where to answer.
struct Member {
    batches: Vec<RecordBatch>,
    /// Held until the request is answered.
    _reservations: Vec<Reservation>,
    rows: u64,
    /// Committed with the member's rows, whichever transaction takes them.
    receipt: Option<Receipt>,
    answer: oneshot::Sender<Result<Committed, IngestError>>,
}

impl Loader {
    /// Commits a complete small request, together with whatever else is waiting for the same table and
    /// schema, and answers once its rows are committed.
    pub(super) async fn commit_in_group(
        &self,
        target: Target,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        reservations: Vec<Reservation>,
        receipt: Option<Receipt>,
    ) -> Result<Committed, IngestError> {
        let started = Instant::now();
        let (answer, answered) = oneshot::channel();
        let rows = batches.iter().map(|batch| batch.num_rows() as u64).sum();
        let receipt =
            receipt.map(|receipt| Receipt { rows: Some(rows), batches: Some(batches.len() as u64), ..receipt });
        let member = Member { batches, _reservations: reservations, rows, receipt, answer };
        let key = GroupKey { table: target.table.clone(), policy: target.policy, mode: target.mode, schema };
        let start_runner = match self.shared.groups.lock().entry(key.clone()) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push(member);
                false
            }
            Entry::Vacant(slot) => {
                slot.insert(vec![member]);
                true
            }
        };
        if start_runner {
            tokio::spawn(self.clone().run_groups(key, target));
        }
        let committed = answered
            .await
            .map_err(|_| IngestError::Database("the group commit ended without an answer".to_owned()))??;
        Ok(Committed { commit_time: started.elapsed(), ..committed })
    }

    /// Commits the queue of `key` group by group until it is empty.
    async fn run_groups(self, key: GroupKey, target: Target) {
        let mut runner = Runner { loader: &self, key: &key, done: false };
        loop {
            // Requests keep gathering while the runner waits for a load slot.
            let Ok(slot) = self.load_slot().await else { return };
            let group = {
                let mut queues = self.shared.groups.lock();
                let queue = queues.get_mut(&key).expect("a running group queue stays in the map");
                if queue.is_empty() {
                    queues.remove(&key);
                    runner.done = true;
                    return;
                }
                next_group(queue)
            };
            self.commit_group(slot, &target, &key.schema, group).await;
        }
    }

    async fn commit_group(&self, slot: OwnedSemaphorePermit, target: &Target, schema: &SchemaRef, group: Vec<Member>) {
        let session = self.begin_in(slot, target.clone(), schema.clone()).await;
        let alone = group.len() == 1;
        match load_members(session, &group, target.chunk_size, &self.shared.budget).await {
            Ok(_) => {
                for member in group {
                    let rows = member.rows;
                    let batches = member.batches.len() as u64;
                    let committed = Committed { rows, batches, commit_time: Duration::ZERO, grouped: !alone };
                    let _ = member.answer.send(Ok(committed));
                }
            }
            Err(error) if alone => {
                if let Some(member) = group.into_iter().next() {
                    let _ = member.answer.send(Err(error));
                }
            }
            Err(error) => {
                tracing::debug!(table = %target.table, requests = group.len(), %error,
                    "A group commit failed; committing its requests one at a time.");
                self.shared.groups.retried_alone.fetch_add(group.len() as u64, Ordering::Relaxed);
                for member in group {
                    let session = self.begin(target.clone(), schema.clone()).await;
                    let outcome =
                        load_members(session, std::slice::from_ref(&member), target.chunk_size, &self.shared.budget)
                            .await;
                    let _ = member.answer.send(outcome);
                }
            }
        }
    }
}

/// Loads the members' batches in `session` and commits. Consecutive batches are joined into one of at
/// most `max_rows` rows and [`JOINED_BATCH_BYTES`] when the budget has room for the copy; otherwise they
/// go as they are. The members keep their budget reservations until they are answered, so their own
/// batches go without one.
async fn load_members(
    session: Result<LoadSession, IngestError>,
    members: &[Member],
    max_rows: usize,
    budget: &MemoryBudget,
) -> Result<Committed, IngestError> {
    let mut session = session?;
    let mut joining: Vec<&RecordBatch> = Vec::new();
    let (mut rows, mut bytes) = (0, 0);
    for batch in members.iter().flat_map(|member| &member.batches) {
        let size = decoded_size(batch);
        if !joining.is_empty() && (rows + batch.num_rows() > max_rows || bytes + size > JOINED_BATCH_BYTES) {
            feed_joined(&mut session, &joining, bytes, budget).await?;
            joining.clear();
            (rows, bytes) = (0, 0);
        }
        joining.push(batch);
        rows += batch.num_rows();
        bytes += size;
    }
    if !joining.is_empty() {
        feed_joined(&mut session, &joining, bytes, budget).await?;
    }
    session.commit(members.iter().filter_map(|member| member.receipt.clone()).collect()).await
}

/// Feeds `batches` (one schema) as one joined batch, or one by one if there is a single batch or the
/// budget has no room for the copy of `bytes`.
async fn feed_joined(
    session: &mut LoadSession,
    batches: &[&RecordBatch],
    bytes: u64,
    budget: &MemoryBudget,
) -> Result<(), IngestError> {
    if let ([first, _, ..], Some(reservation)) = (batches, budget.try_reserve(bytes)) {
        let joined = arrow::compute::concat_batches(&first.schema(), batches.iter().copied())
            .map_err(|error| IngestError::Database(format!("joining a group's batches: {error}")))?;
        return session.feed(joined, Some(reservation)).await;
    }
    for batch in batches {
        session.feed((*batch).clone(), None).await?;
    }
    Ok(())
}

/// Takes the oldest requests up to [`MAX_GROUP_ROWS`] (always at least one).
fn next_group(queue: &mut Vec<Member>) -> Vec<Member> {
    let mut rows = 0;
    let count = queue
        .iter()
        .take_while(|member| {
            rows += member.rows;
            rows <= MAX_GROUP_ROWS
        })
        .count()
        .max(1);
    queue.drain(..count).collect()
}

impl GroupQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Vec<Member>>> {
        self.queues.lock().expect("group queue lock poisoned")
    }
}

/// Removes its queue if the runner stops without finishing (a panic), so later requests start a new
/// runner instead of waiting for one that is gone; the requests in the queue get an error.
struct Runner<'a> {
    loader: &'a Loader,
    key: &'a GroupKey,
    done: bool,
}

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.loader.shared.groups.lock().remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::load::{IfExists, LoaderOptions, Upload};
    use crate::store::{Database, DatabaseOptions, DuckDbFile};

    fn loader(dir: &tempfile::TempDir) -> Loader {
        let storage = DuckDbFile::new(dir.path().join("group.duckdb"));
        let options = DatabaseOptions {
            extensions: Vec::new(),
            memory_limit: None,
            checkpoint_threshold: 16 << 20,
            threads: None,
        };
        let database = Database::open(Box::new(storage), &options).unwrap();
        let options =
            LoaderOptions { max_concurrent_loads: 4, budget: MemoryBudget::new(1 << 30, Duration::from_secs(1)) };
        Loader::new(Arc::new(database), options).unwrap()
    }

    fn target() -> Target {
        Target { table: "t".to_owned(), chunk_size: 122_880, policy: SchemaPolicy::Reject, mode: TableMode::default() }
    }

    fn ids(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    /// Sends each request as a small upload; on this single-threaded runtime all of them queue before the
    /// group runner first runs, so they meet in one group.
    async fn upload_together(
        loader: &Loader,
        target: Target,
        requests: &[&[i64]],
    ) -> Vec<Result<Committed, IngestError>> {
        let uploads = requests.iter().map(|values| async {
            let batch = ids(values);
            let mut upload = loader.upload(target.clone(), batch.schema()).unwrap();
            send(loader, &mut upload, batch).await?;
            upload.commit(None).await
        });
        futures::future::join_all(uploads).await
    }

    /// Sends a batch with its budget reservation, as the transports do.
    async fn send(loader: &Loader, upload: &mut Upload, batch: RecordBatch) -> Result<u64, IngestError> {
        let reservation = loader.budget().reserve_batch(decoded_size(&batch)).await?;
        upload.send(batch, reservation).await
    }

    fn table(loader: &Loader) -> Vec<i64> {
        loader
            .database()
            .with_connection(|conn| {
                let mut statement = conn.prepare("SELECT id FROM t ORDER BY id")?;
                statement.query_map([], |row| row.get(0))?.collect()
            })
            .unwrap()
    }

    #[tokio::test]
    async fn small_requests_share_one_commit_and_each_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let loader = loader(&dir);
        let outcomes = upload_together(&loader, target(), &[&[1, 2], &[3], &[4, 5, 6]]).await;
        let answers: Vec<_> = outcomes.into_iter().map(|outcome| outcome.unwrap()).collect();
        assert_eq!(
            answers.iter().map(|c| (c.rows, c.batches, c.grouped)).collect::<Vec<_>>(),
            [(2, 1, true), (1, 1, true), (3, 1, true)]
        );
        assert_eq!(table(&loader), [1, 2, 3, 4, 5, 6]);
        assert!(loader.shared.groups.lock().is_empty(), "the runner leaves no queue behind");
    }

    #[tokio::test]
    async fn a_request_that_fails_does_not_fail_the_others_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let loader = loader(&dir);
        loader.database().with_connection(|conn| conn.execute_batch("CREATE TABLE t (id BIGINT PRIMARY KEY)")).unwrap();
        // The second request violates the primary key on its own: the group fails, then each is retried alone.
        let outcomes = upload_together(&loader, target(), &[&[1, 2], &[10, 10], &[20]]).await;
        let retried = loader.shared.groups.retried_alone.load(Ordering::Relaxed);
        assert_eq!(retried, 3, "all three met in one group, which failed, and were retried alone");
        assert_eq!(outcomes[0].as_ref().unwrap().rows, 2);
        assert!(!outcomes[0].as_ref().unwrap().grouped, "committed alone on the retry");
        let error = outcomes[1].as_ref().unwrap_err().to_string();
        assert!(error.contains("duplicate key \"10\""), "{error}");
        assert_eq!(outcomes[2].as_ref().unwrap().rows, 1);
        assert_eq!(table(&loader), [1, 2, 20]);
    }

    #[tokio::test]
    async fn a_groups_small_batches_reach_duckdb_joined_unless_the_budget_has_no_room_for_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let loader = loader(&dir);
        loader.database().with_connection(|conn| conn.execute_batch("CREATE TABLE t (id BIGINT)")).unwrap();
        let members = |requests: &[&[i64]]| -> Vec<Member> {
            let member = |values: &&[i64]| Member {
                batches: vec![ids(values)],
                _reservations: Vec::new(),
                rows: values.len() as u64,
                receipt: None,
                answer: oneshot::channel().0,
            };
            requests.iter().map(member).collect()
        };
        let mut batches_read = Vec::new();
        for (requests, max_rows, budget) in [
            (&[&[1, 2][..], &[3], &[4, 5, 6]][..], 1000, loader.budget().clone()),
            (&[&[7, 8], &[9], &[10, 11]], 3, loader.budget().clone()),
            (&[&[12], &[13]], 1000, MemoryBudget::new(0, Duration::from_millis(1))),
        ] {
            let session = loader.begin(target(), ids(&[]).schema()).await;
            let committed = load_members(session, &members(requests), max_rows, &budget).await.unwrap();
            batches_read.push(committed.batches);
        }
        // All three joined; then at most three rows a batch; then no room for a copy: one by one.
        assert_eq!(batches_read, [1, 2, 2]);
        assert_eq!(table(&loader), (1..=13).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn requests_that_replace_the_table_are_never_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let loader = loader(&dir);
        let replace = Target { mode: TableMode { create: true, if_exists: IfExists::Replace }, ..target() };
        let outcomes = upload_together(&loader, replace, &[&[1, 2], &[3]]).await;
        let answers: Vec<_> = outcomes.into_iter().map(|outcome| outcome.unwrap()).collect();
        assert_eq!(answers.iter().map(|c| (c.rows, c.grouped)).collect::<Vec<_>>(), [(2, false), (1, false)]);
        // One replaced the other: in one transaction both would have landed.
        let rows = table(&loader);
        assert!(rows == [1, 2] || rows == [3], "{rows:?}");
    }

    #[tokio::test]
    async fn a_request_of_a_chunk_or_more_streams_in_a_session_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let loader = loader(&dir);
        let target = Target { chunk_size: 3, ..target() };
        let batch = ids(&[1, 2]);
        let mut upload = loader.upload(target, batch.schema()).unwrap();
        send(&loader, &mut upload, batch).await.unwrap();
        send(&loader, &mut upload, ids(&[3, 4])).await.unwrap();
        let committed = upload.commit(None).await.unwrap();
        assert_eq!((committed.rows, committed.grouped), (4, false));
        assert_eq!(table(&loader), [1, 2, 3, 4]);
    }

    #[test]
    fn the_next_group_stops_at_the_row_limit() {
        let member = |rows| Member {
            batches: Vec::new(),
            _reservations: Vec::new(),
            rows,
            receipt: None,
            answer: oneshot::channel().0,
        };
        let mut queue = vec![member(MAX_GROUP_ROWS / 2), member(MAX_GROUP_ROWS / 2), member(1)];
        assert_eq!(next_group(&mut queue).len(), 2);
        assert_eq!(next_group(&mut queue).len(), 1);
        let mut oversized = vec![member(MAX_GROUP_ROWS + 1), member(1)];
        assert_eq!(next_group(&mut oversized).len(), 1, "one request alone may exceed the limit");
    }
}
