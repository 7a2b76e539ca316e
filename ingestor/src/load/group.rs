//! Group commit: small requests to one table with one schema share a transaction.
//!
//! Every transaction has a fixed cost — describing the scan view, planning the insert, merging local
//! storage at commit — of a few milliseconds of CPU, which dominates a 1,000-row request. Requests that
//! end below the small-request threshold (see [`Upload`](super::Upload)) queue here by table and schema;
//! one runner per queue commits everything queued in one session and then answers each request. While it
//! commits, the next group gathers, so groups grow with load and nobody waits on a timer. When a group
//! fails, its requests are retried one at a time, so one bad request cannot fail the others.
//!
//! With the journal (see [`journaled`](super::journaled)), a request of a trusted group is answered as
//! soon as its record is durable and waits in the queue with the others; the runner lets them gather
//! for up to the linger time (or a million rows, or until someone waits for them to be written) and
//! writes them in one transaction that records their sequence numbers. A journaled request is never
//! failed: when its group fails, it goes back to the head of the queue and is tried again.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrowport_config::SchemaPolicy;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::{Committed, LoadSession, Loader, Proof, Receipt, TableMode, Target, blocking, decoded_size, journaled};
use crate::budget::{MemoryBudget, Reservation};
use crate::error::IngestError;

/// Most rows one group commits; the requests after them form the next group.
const MAX_GROUP_ROWS: u64 = 1 << 20;

/// While journaled requests linger, how often the runner looks whether it should stop waiting.
const LINGER_STEP: Duration = Duration::from_millis(10);

/// How long a runner waits before trying its journaled requests again after their group failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Decoded bytes up to which a group's small batches are joined into one before DuckDB scans them.
/// DuckDB's per-batch work dominates small batches: in one transaction, 25,600 rows as 100-row batches
/// took 3x the CPU of the same rows as one batch, as 1,000-row batches 1.4x. And a batch of less than a
/// row group (the chunk size) makes DuckDB's bulk insert build a partial row group and merge it with
/// others later, appending every row twice: with the journal's large groups, joining whole row groups
/// (up to 64 MiB instead of 4) took the rate of 1,000-row requests from 0.77M to 1.01M rows/s. The
/// joined copy holds its own share of the memory budget until DuckDB releases it.
const JOINED_BATCH_BYTES: u64 = 64 << 20;

/// Requests waiting for a group commit, by what they write to. A key is present while its runner runs.
#[derive(Default)]
pub(super) struct GroupQueues {
    queues: std::sync::Mutex<HashMap<GroupKey, Vec<Member>>>,
    /// Requests retried one at a time because the group they were in failed, since the loader opened.
    retried_alone: AtomicU64,
}

/// Requests can share a transaction when they write the same columns to the same table the same way.
#[derive(Clone, Hash, PartialEq, Eq)]
pub(super) struct GroupKey {
    pub table: String,
    pub policy: SchemaPolicy,
    pub mode: TableMode,
    pub schema: SchemaRef,
}

/// A complete small request: its batches (holding their share of the memory budget) and where to answer.
struct Member {
    batches: Vec<RecordBatch>,
    /// Held until the request is answered.
    _reservations: Vec<Reservation>,
    rows: u64,
    /// Committed with the member's rows, whichever transaction takes them.
    receipt: Option<Receipt>,
    /// Where to answer; `None` for a request answered from the journal.
    answer: Option<oneshot::Sender<Result<Committed, IngestError>>>,
    /// The request's journal record, once it is durable there.
    journaled: Option<u64>,
    /// When it was queued: a journaled request waits at most the linger time.
    queued: Instant,
}

impl GroupKey {
    fn of(target: &Target, schema: SchemaRef) -> Self {
        Self { table: target.table.clone(), policy: target.policy, mode: target.mode, schema }
    }
}

impl Member {
    fn new(
        batches: Vec<RecordBatch>,
        reservations: Vec<Reservation>,
        rows: u64,
        receipt: Option<Receipt>,
        answer: Option<oneshot::Sender<Result<Committed, IngestError>>>,
        journaled: Option<u64>,
    ) -> Self {
        Self { batches, _reservations: reservations, rows, receipt, answer, journaled, queued: Instant::now() }
    }
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
        let rows = batches.iter().map(|batch| batch.num_rows() as u64).sum();
        let count = batches.len() as u64;
        let receipt = receipt.map(|receipt| Receipt { rows: Some(rows), batches: Some(count), ..receipt });
        let key = GroupKey::of(&target, schema);
        if let Some(journaling) = self.shared.journal.as_ref().filter(|journaling| journaling.trusts(&key)) {
            let (header, body) = journaled::encode(&target, &key.schema, &batches, receipt.as_ref());
            // Trust is asked again as the record is admitted: a change of the table that started since
            // (a replace) then either waits for this record or finds it refused.
            let admitted = journaling.journal.admit(&target.table, header, body, || journaling.trusts(&key)).await?;
            if let Some(admitted) = admitted {
                // The record is written whatever happens to this request now, so its rows are queued by a
                // task of their own: a request cancelled while it waits must not leave a record that
                // nothing writes to its table.
                let loader = self.clone();
                let queued = tokio::spawn(async move {
                    let seq = admitted.durable().await?;
                    loader.enqueue(key, target, Member::new(batches, reservations, rows, receipt, None, Some(seq)));
                    Ok::<_, IngestError>(())
                });
                queued
                    .await
                    .map_err(|error| IngestError::Journal(format!("queueing a journaled request: {error}")))??;
                let commit_time = started.elapsed();
                return Ok(Committed { rows, batches: count, commit_time, grouped: true, journaled: true });
            }
        }
        let (answer, answered) = oneshot::channel();
        self.enqueue(key, target, Member::new(batches, reservations, rows, receipt, Some(answer), None));
        let committed = answered
            .await
            .map_err(|_| IngestError::Database("the group commit ended without an answer".to_owned()))??;
        Ok(Committed { commit_time: started.elapsed(), ..committed })
    }

    /// Queues `member` for `key`, starting the queue's runner if it has none.
    fn enqueue(&self, key: GroupKey, target: Target, member: Member) {
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
    }

    /// Commits the queue of `key` group by group until it is empty.
    async fn run_groups(self, key: GroupKey, target: Target) {
        let mut runner = Runner { loader: &self, key: &key, done: false };
        loop {
            if let Some(wait) = self.lingering(&key) {
                tokio::time::sleep(wait).await;
                continue;
            }
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
            if !self.commit_group(slot, &target, &key, group).await {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    /// How much longer the queue of `key` should gather before its next group, if at all: only a queue of
    /// journaled requests waits, and only while it holds less than a group, its oldest request is younger
    /// than the linger time, nobody waits for the journal to be applied and the memory budget (which
    /// waiting requests hold) is less than half full.
    fn lingering(&self, key: &GroupKey) -> Option<Duration> {
        let journaling = self.shared.journal.as_ref()?;
        let budget = &self.shared.budget;
        if journaling.journal.hurried() || budget.used() > budget.capacity() / 2 {
            return None;
        }
        let queues = self.shared.groups.lock();
        let queue = queues.get(key)?;
        if queue.iter().any(|member| member.answer.is_some()) {
            return None;
        }
        if queue.iter().map(|member| member.rows).sum::<u64>() >= MAX_GROUP_ROWS {
            return None;
        }
        let left = journaling.linger.checked_sub(queue.first()?.queued.elapsed())?;
        Some(left.min(LINGER_STEP))
    }

    /// Commits `group` and answers its requests. Returns `false` if journaled requests failed and went
    /// back to the queue.
    async fn commit_group(
        &self,
        slot: OwnedSemaphorePermit,
        target: &Target,
        key: &GroupKey,
        group: Vec<Member>,
    ) -> bool {
        let journal = self.shared.journal.as_ref();
        let epoch = journal.map_or(0, |journaling| journaling.epoch(&key.table));
        let session = self.begin_in(slot, target.clone(), key.schema.clone()).await;
        let alone = group.len() == 1;
        let seqs: Vec<u64> = group.iter().filter_map(|member| member.journaled).collect();
        let applies = journal.filter(|_| !seqs.is_empty()).map(|j| (j.journal.id().to_owned(), seqs.clone()));
        match load_members(session, &group, target.chunk_size, &self.shared.budget, applies).await {
            Ok(_) => {
                if let Some(journaling) = journal {
                    journaling.journal.applied(&seqs);
                    if seqs.is_empty() && !journaling.trusts(key) {
                        self.trust_if_unconstrained(key, epoch).await;
                    }
                }
                for member in group {
                    let (rows, batches) = (member.rows, member.batches.len() as u64);
                    let committed =
                        Committed { rows, batches, commit_time: Duration::ZERO, grouped: !alone, journaled: false };
                    if let Some(answer) = member.answer {
                        let _ = answer.send(Ok(committed));
                    }
                }
                true
            }
            Err(error) => {
                let (answered, waiting): (Vec<Member>, Vec<Member>) =
                    group.into_iter().partition(|member| member.journaled.is_none());
                if let Some(journaling) = journal.filter(|_| !waiting.is_empty()) {
                    tracing::warn!(table = %target.table, requests = waiting.len(), %error,
                        "Could not write journaled requests to their table; trying again. New requests to it are \
                         committed before they are answered until this succeeds.");
                    journaling.distrust_table(&target.table);
                    journaling.journal.failing(&seqs, &error.to_string());
                    let mut queues = self.shared.groups.lock();
                    let queue = queues.get_mut(key).expect("a running group queue stays in the map");
                    queue.splice(0..0, waiting);
                }
                self.answer_failed(target, key, answered, alone, error).await;
                seqs.is_empty()
            }
        }
    }

    /// Answers the requests of a failed group: a request alone gets the error, the others are retried one
    /// at a time so that one bad request cannot fail them.
    async fn answer_failed(
        &self,
        target: &Target,
        key: &GroupKey,
        members: Vec<Member>,
        alone: bool,
        error: IngestError,
    ) {
        if alone {
            if let Some(answer) = members.into_iter().next().and_then(|member| member.answer) {
                let _ = answer.send(Err(error));
            }
            return;
        }
        tracing::debug!(table = %target.table, requests = members.len(), %error,
            "A group commit failed; committing its requests one at a time.");
        self.shared.groups.retried_alone.fetch_add(members.len() as u64, Ordering::Relaxed);
        for member in members {
            // Not `begin`: that would wait for the journaled requests this runner itself has to write.
            let session = match self.load_slot().await {
                Ok(slot) => self.begin_in(slot, target.clone(), key.schema.clone()).await,
                Err(error) => Err(error),
            };
            let one = std::slice::from_ref(&member);
            let outcome = load_members(session, one, target.chunk_size, &self.shared.budget, None).await;
            if let Some(answer) = member.answer {
                let _ = answer.send(outcome);
            }
        }
    }

    /// Trusts `key` with the journal, after a commit that started at `epoch`, if its table has no
    /// constraints that could refuse rows later.
    async fn trust_if_unconstrained(&self, key: &GroupKey, epoch: u64) {
        let db = self.shared.db.clone();
        let table = key.table.clone();
        let constraints = blocking(move || {
            db.with_connection(|conn| {
                conn.query_row(
                    "SELECT count(*) FROM duckdb_constraints() \
                     WHERE database_name = ? AND schema_name = 'main' AND lower(table_name) = lower(?)",
                    [db.catalog(), table.as_str()],
                    |row| row.get::<_, i64>(0),
                )
            })
        })
        .await;
        match constraints {
            Ok(0) => {
                if let Some(journaling) = &self.shared.journal {
                    journaling.trust(key.clone(), epoch);
                }
            }
            Ok(_) => tracing::debug!(table = %key.table, "The table has constraints: its requests are not journaled."),
            Err(error) => tracing::warn!(table = %key.table, %error, "Could not read the table's constraints."),
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
    journaled: Option<(String, Vec<u64>)>,
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
    let receipts = members.iter().filter_map(|member| member.receipt.clone()).collect();
    session.commit(Proof { receipts, journaled }).await
}

/// Feeds `batches` (one schema) as one joined batch, or one by one if there is a single batch or the
/// budget has no room for the copy of `bytes`.
async fn feed_joined(
    session: &mut LoadSession,
    batches: &[&RecordBatch],
    bytes: u64,
    budget: &MemoryBudget,
) -> Result<(), IngestError> {
    // A single batch is fed as it is, without taking room for a copy it does not need.
    let reservation = if batches.len() > 1 { budget.try_reserve(bytes) } else { None };
    if let (Some(first), Some(reservation)) = (batches.first(), reservation) {
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

impl Loader {
    /// Queues a journal record found at start that no transaction recorded: it is written like any
    /// journaled request.
    pub(super) fn requeue_recovered(&self, seq: u64, record: journaled::Decoded) {
        let journaled::Decoded { target, schema, batches, receipt } = record;
        let rows = batches.iter().map(|batch| batch.num_rows() as u64).sum();
        // Its rows hold room in the budget like a journaled request's, where there is room: they are
        // written whether or not.
        let bytes = batches.iter().map(decoded_size).sum();
        let reservations = self.shared.budget.try_reserve(bytes).into_iter().collect();
        let key = GroupKey::of(&target, schema);
        self.enqueue(key, target, Member::new(batches, reservations, rows, receipt, None, Some(seq)));
    }
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
    use crate::load::{IfExists, LoaderOptions, Scope, Upload};
    use crate::store::{Database, DatabaseOptions, DuckDbFile};

    fn loader(dir: &tempfile::TempDir) -> Loader {
        loader_with(dir, None)
    }

    fn loader_with(dir: &tempfile::TempDir, journal: Option<journaled::JournalOptions>) -> Loader {
        let storage = DuckDbFile::new(dir.path().join("group.duckdb"));
        let options = DatabaseOptions {
            extensions: Vec::new(),
            memory_limit: None,
            checkpoint_threshold: 16 << 20,
            threads: None,
        };
        let database = Database::open(Box::new(storage), &options).unwrap();
        let options = LoaderOptions {
            max_concurrent_loads: 4,
            slot_wait: Duration::from_secs(60),
            budget: MemoryBudget::new(1 << 30, Duration::from_secs(1)),
            journal,
        };
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
            let member =
                |values: &&[i64]| Member::new(vec![ids(values)], Vec::new(), values.len() as u64, None, None, None);
            requests.iter().map(member).collect()
        };
        let mut batches_read = Vec::new();
        for (requests, max_rows, budget) in [
            (&[&[1, 2][..], &[3], &[4, 5, 6]][..], 1000, loader.budget().clone()),
            (&[&[7, 8], &[9], &[10, 11]], 3, loader.budget().clone()),
            (&[&[12], &[13]], 1000, MemoryBudget::new(0, Duration::from_millis(1))),
        ] {
            let session = loader.begin(target(), ids(&[]).schema()).await;
            let committed = load_members(session, &members(requests), max_rows, &budget, None).await.unwrap();
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

    #[tokio::test]
    async fn a_journaled_group_that_fails_is_kept_and_written_once_the_table_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journaled::JournalOptions { dir: dir.path().join("journal"), linger: Duration::from_millis(1) };
        let loader = loader_with(&dir, Some(journal));
        let first = upload_together(&loader, target(), &[&[1]]).await.remove(0).unwrap();
        assert!(!first.journaled, "a new table is committed before the answer");
        let second = upload_together(&loader, target(), &[&[2]]).await.remove(0).unwrap();
        assert!(second.journaled, "its group is trusted now");
        loader.settle(Scope::All).await.unwrap();
        // The table changes under the journal: the next journaled rows break its constraint.
        let replace = |sql: &'static str| loader.database().with_connection(|conn| conn.execute_batch(sql)).unwrap();
        replace("DROP TABLE t; CREATE TABLE t (id BIGINT CHECK (id < 0))");
        let third = upload_together(&loader, target(), &[&[3]]).await.remove(0).unwrap();
        assert!(third.journaled);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(loader.journal().unwrap().unapplied(), 1, "answered, and not written while the table refuses it");
        let fourth = upload_together(&loader, target(), &[&[4]]).await;
        assert!(fourth[0].is_err(), "a failing group is no longer trusted: the next request gets the error");
        // Nobody waits for it: what settles the table answers the error, other tables go on.
        let settled = tokio::time::timeout(Duration::from_secs(1), loader.settle(Scope::Table("t"))).await;
        assert!(matches!(settled, Ok(Err(IngestError::JournalBacklog(_)))), "{settled:?}");
        let large = Target { table: "other".to_owned(), ..target() };
        let other = tokio::time::timeout(Duration::from_secs(1), loader.begin(large, ids(&[]).schema())).await;
        assert!(other.expect("not held up by table t").is_ok());
        replace("DROP TABLE t; CREATE TABLE t (id BIGINT)");
        tokio::time::timeout(Duration::from_secs(5), async {
            while loader.settle(Scope::All).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("written on a later try");
        assert_eq!(table(&loader), [3], "written on a later try, once");
    }

    #[tokio::test]
    async fn records_found_at_start_hold_room_in_the_budget_until_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let options =
            || journaled::JournalOptions { dir: dir.path().join("journal"), linger: Duration::from_millis(1) };
        let loader = loader_with(&dir, Some(options()));
        upload_together(&loader, target(), &[&[1]]).await.remove(0).unwrap();
        // The group's runner ends (and lets go of the database) once it finds its queue empty.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(loader);
        // A record that no transaction wrote, as a crash leaves it.
        let (journal, _) = crate::journal::Journal::open(&options().dir).unwrap();
        let batch = ids(&[2, 3]);
        let (header, body) = journaled::encode(&target(), &batch.schema(), &[batch], None);
        journal.admit("t", header, body, || true).await.unwrap().unwrap().durable().await.unwrap();
        drop(journal);
        let loader = loader_with(&dir, Some(options()));
        assert!(loader.budget().used() > 0, "the recovered rows hold their room while they wait");
        loader.settle(Scope::All).await.unwrap();
        assert_eq!(table(&loader), [1, 2, 3]);
        tokio::task::yield_now().await;
        assert_eq!(loader.budget().used(), 0, "and give it back once written");
    }

    #[tokio::test]
    async fn a_journaled_request_whose_caller_goes_away_is_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journaled::JournalOptions { dir: dir.path().join("journal"), linger: Duration::from_millis(1) };
        let loader = loader_with(&dir, Some(journal));
        upload_together(&loader, target(), &[&[1]]).await.remove(0).unwrap();
        let batch = ids(&[2]);
        let mut upload = loader.upload(target(), batch.schema()).unwrap();
        send(&loader, &mut upload, batch).await.unwrap();
        // The client goes away while its record is being made durable.
        let mut commit = Box::pin(upload.commit(None));
        assert!(futures::poll!(&mut commit).is_pending());
        drop(commit);
        assert_eq!(loader.journal().unwrap().unapplied(), 1, "the record was admitted before the client went");
        tokio::time::timeout(Duration::from_secs(5), loader.settle(Scope::All)).await.unwrap().unwrap();
        assert_eq!(table(&loader), [1, 2], "the record was durable, so its rows are written");
        assert_eq!(loader.journal().unwrap().unapplied(), 0);
    }

    #[test]
    fn the_next_group_stops_at_the_row_limit() {
        let member = |rows| Member::new(Vec::new(), Vec::new(), rows, None, None, None);
        let mut queue = vec![member(MAX_GROUP_ROWS / 2), member(MAX_GROUP_ROWS / 2), member(1)];
        assert_eq!(next_group(&mut queue).len(), 2);
        assert_eq!(next_group(&mut queue).len(), 1);
        let mut oversized = vec![member(MAX_GROUP_ROWS + 1), member(1)];
        assert_eq!(next_group(&mut oversized).len(), 1, "one request alone may exceed the limit");
    }
}
