//! The journal: an append-only log on local disk where small requests become durable before their
//! tables are written.
//!
//! DuckDB's cost per commit bounds what many small transactions can reach (a third of its bulk rate at
//! 32,000 rows a commit, and every commit waits while a checkpoint runs). With the journal, a small
//! request is answered once its record is on disk (`fdatasync`, shared by every record written
//! meanwhile); the loader then writes records to their tables in large transactions and marks them
//! applied, each transaction recording the sequence numbers it applied, so after a crash the records
//! that no transaction recorded are applied again and the others are not.
//!
//! Records live in segment files named after their first sequence number; a segment is deleted once it
//! is sealed (a newer one exists) and every record in it is applied. A record is
//! `magic, seq, header length, body length, CRC-32 of (seq, header, body), header, body`. A torn write at
//! the end of the newest segment (the crash the journal exists for) is cut off when it is opened;
//! damage anywhere else is refused, naming the file.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::IngestError;

const MAGIC: [u8; 4] = *b"APJ1";
/// magic, seq (u64), header length (u32), body length (u64), CRC-32.
const RECORD_HEADER: usize = 4 + 8 + 4 + 8 + 4;
/// A segment is sealed and a new one started once it holds this much.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Records waiting for the writer; each holds its request's rows, which the memory budget bounds.
const QUEUE_DEPTH: usize = 1024;
/// Largest record the journal reads back: a longer length field is damage, not a record.
const MAX_RECORD_BYTES: u64 = 1 << 32;

/// A record read back when the journal is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub seq: u64,
    pub header: Vec<u8>,
    pub body: Vec<u8>,
}

/// The journal of one ingester. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

struct Shared {
    id: String,
    dir: PathBuf,
    writes: mpsc::Sender<Append>,
    state: Mutex<State>,
    /// Bumped whenever a record is applied, dropped or found failing: what [`Journal::settle`] waits on.
    changes: watch::Sender<u64>,
    /// Callers of [`Journal::settle`] waiting now: whoever applies records should not delay them.
    settling: AtomicUsize,
    /// Held while applied segments are deleted, so one deletion runs at a time.
    deleting: Mutex<()>,
}

struct State {
    /// Records admitted (queued for the writer, or durable) and not yet applied.
    unapplied: BTreeMap<u64, Pending>,
    /// The next sequence number to admit.
    next_seq: u64,
    /// First sequence number of each live segment, oldest first; the last one is being written.
    segments: VecDeque<u64>,
}

/// What the journal knows of a record it has not applied.
#[derive(Default)]
struct Pending {
    /// The table it is for, lower-case; `None` for a record read back at start, which could be for any.
    table: Option<Arc<str>>,
    /// Why writing it to its table failed the last time, until it succeeds.
    failing: Option<Arc<str>>,
}

/// The records a [`Journal::settle`] waits for.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every record admitted before the call.
    All,
    /// Those for one table (and those read back at start, whose table the journal does not know).
    Table(&'a str),
}

/// Writes a record's body into the buffer it is given.
pub type BodyWriter = Box<dyn FnOnce(&mut Vec<u8>) -> io::Result<()> + Send>;

/// Where the writer says a record is durable, with its sequence number.
type Durable = oneshot::Sender<io::Result<u64>>;

/// A record for the writer, with the sequence number it was admitted with, and where to say it is durable.
struct Append {
    seq: u64,
    header: Vec<u8>,
    body: BodyWriter,
    durable: Durable,
}

/// A record admitted to the journal: it will be written whatever happens to whoever admitted it.
pub struct Admitted {
    done: oneshot::Receiver<io::Result<u64>>,
}

impl Admitted {
    /// Its sequence number, once the record is on disk.
    pub async fn durable(self) -> Result<u64, IngestError> {
        let closed = || IngestError::Journal("the journal writer stopped".to_owned());
        self.done.await.map_err(|_| closed())?.map_err(|error| match error.kind() {
            io::ErrorKind::StorageFull => IngestError::InsufficientStorage(format!("the journal: {error}")),
            _ => IngestError::Journal(format!("writing a record: {error}")),
        })
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir`. Returns it with every record its segments hold, oldest
    /// first, all counted as not applied: the caller applies those its database has not recorded and
    /// marks them [`applied`](Self::applied).
    pub fn open(dir: &Path) -> Result<(Self, Vec<Recovered>), IngestError> {
        let fail = |what: &str, error: io::Error| {
            IngestError::Journal(format!("{what} in the journal {}: {error}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create the directory", e))?;
        let id = identity(dir).map_err(|e| fail("cannot read or write its id", e))?;
        let mut firsts = segment_firsts(dir).map_err(|e| fail("cannot list the segments", e))?;
        let mut recovered = Vec::new();
        for (index, first) in firsts.iter().enumerate() {
            let path = segment_path(dir, *first);
            let newest = index + 1 == firsts.len();
            let records = read_segment(&path, newest)?;
            // A segment is named after the first number it may hold; numbers only grow.
            if let Some(record) = records.first().filter(|record| record.seq < *first) {
                return Err(IngestError::Journal(format!(
                    "{} starts with record {} below its name {first}",
                    path.display(),
                    record.seq
                )));
            }
            recovered.extend(records);
        }
        let named = firsts.last().copied().unwrap_or(0);
        let next_seq = recovered.last().map_or(named, |r| (r.seq + 1).max(named));
        // New records go to a segment of their own: the newest one may end where a torn record was cut.
        firsts.push(next_seq);
        firsts.dedup();
        let file = open_segment(dir, next_seq).map_err(|e| fail("cannot create a segment", e))?;
        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let unapplied = recovered.iter().map(|record| (record.seq, Pending::default())).collect();
        let shared = Arc::new(Shared {
            id,
            dir: dir.to_owned(),
            writes,
            state: Mutex::new(State { unapplied, next_seq, segments: firsts.into() }),
            changes: watch::Sender::new(0),
            settling: AtomicUsize::new(0),
            deleting: Mutex::new(()),
        });
        let writer = Writer { shared: Arc::downgrade(&shared), file, written: 0, body: Vec::new(), broken: None };
        std::thread::Builder::new()
            .name("arrowport-journal".to_owned())
            .spawn(move || writer.run(queue))
            .map_err(|e| fail("cannot start the writer", e))?;
        let journal = Self { shared };
        journal.delete_applied_segments();
        Ok((journal, recovered))
    }

    /// This journal's identity, recorded beside the rows of every transaction that applies its records.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Admits a record for `table` if `admit` (asked while no [`settle`](Self::settle) can start) still
    /// says so, and queues it for the writer thread, which writes the body into a buffer it reuses (a
    /// fresh buffer per record cost more in page faults than the copy). A settle that starts after this
    /// returns waits for the record; `None` if `admit` said no.
    pub async fn admit(
        &self,
        table: &str,
        header: Vec<u8>,
        body: BodyWriter,
        admit: impl FnOnce() -> bool,
    ) -> Result<Option<Admitted>, IngestError> {
        let closed = || IngestError::Journal("the journal writer stopped".to_owned());
        let permit = self.shared.writes.reserve().await.map_err(|_| closed())?;
        let (durable, done) = oneshot::channel();
        let mut state = self.shared.lock();
        if !admit() {
            return Ok(None);
        }
        // Numbered and queued under one lock: the writer gets records in the order of their numbers.
        let seq = state.next_seq;
        state.next_seq += 1;
        state.unapplied.insert(seq, Pending { table: Some(table.to_lowercase().into()), failing: None });
        permit.send(Append { seq, header, body, durable });
        Ok(Some(Admitted { done }))
    }

    /// Marks records applied: their rows are committed in the database.
    pub fn applied(&self, seqs: &[u64]) {
        self.shared.forget(seqs);
        self.delete_applied_segments();
    }

    /// Records that writing these records to their table failed with `error`: a settle waiting for them
    /// answers that error instead of waiting, until they are applied.
    pub fn failing(&self, seqs: &[u64], error: &str) {
        let error: Arc<str> = error.into();
        let mut state = self.shared.lock();
        for seq in seqs {
            if let Some(pending) = state.unapplied.get_mut(seq) {
                pending.failing = Some(error.clone());
            }
        }
        drop(state);
        self.shared.changes.send_modify(|count| *count += 1);
    }

    /// Waits until every record of `scope` admitted before the call is applied. Fails at once with
    /// [`IngestError::JournalBacklog`] while one of them cannot be written to its table, rather than
    /// wait for a retry that may take long.
    pub async fn settle(&self, scope: Scope<'_>) -> Result<(), IngestError> {
        let table = match scope {
            Scope::All => None,
            Scope::Table(table) => Some(table.to_lowercase()),
        };
        let mut changes = self.shared.changes.subscribe();
        let target = self.shared.lock().next_seq;
        let _settling = Settling::start(&self.shared.settling);
        loop {
            {
                let state = self.shared.lock();
                let mut waiting =
                    state.unapplied.range(..target).map(|(_, pending)| pending).filter(|pending| {
                        match (&table, &pending.table) {
                            (Some(wanted), Some(of)) => **of == **wanted,
                            _ => true,
                        }
                    });
                let Some(first) = waiting.next() else { return Ok(()) };
                if let Some(failing) =
                    std::iter::once(first).chain(waiting).find_map(|pending| pending.failing.as_ref())
                {
                    return Err(IngestError::JournalBacklog(failing.to_string()));
                }
            }
            // The sender lives as long as `self`.
            let _ = changes.changed().await;
        }
    }

    /// Whether someone waits in [`settle`](Self::settle): records should be applied without delay.
    pub fn hurried(&self) -> bool {
        self.shared.settling.load(Ordering::Relaxed) > 0
    }

    /// Records not yet applied.
    pub fn unapplied(&self) -> usize {
        self.shared.lock().unapplied.len()
    }

    /// The oldest sequence number still on disk: records below it can never be read back, so what the
    /// database remembers about them may be forgotten.
    pub fn oldest_kept(&self) -> u64 {
        self.shared.lock().segments.front().copied().unwrap_or(0)
    }

    /// Deletes sealed segments whose records are all applied. They leave [`oldest_kept`](Self::oldest_kept)
    /// only once their deletion is durable: until then the database must remember that their records
    /// were applied, or a segment that reappears after a power cut would be written again.
    fn delete_applied_segments(&self) {
        let _deleting = self.shared.deleting.lock().expect("journal deletion lock poisoned");
        let doomed: Vec<u64> = {
            let state = self.shared.lock();
            let low = state.low();
            // A segment ends where the next begins; the newest is never deleted.
            let count = state.segments.iter().skip(1).take_while(|next| **next <= low).count();
            state.segments.iter().take(count).copied().collect()
        };
        if doomed.is_empty() {
            return;
        }
        let mut deleted = 0;
        for first in &doomed {
            let path = segment_path(&self.shared.dir, *first);
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(error) if error.kind() == io::ErrorKind::NotFound => deleted += 1,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "Could not delete an applied journal segment.");
                    break;
                }
            }
        }
        if let Err(error) = File::open(&self.shared.dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!(%error, "Could not sync the journal's directory after deleting segments.");
            return;
        }
        self.shared.lock().segments.drain(..deleted);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("journal state lock poisoned")
    }

    /// Forgets records: applied, or never written.
    fn forget(&self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let mut state = self.lock();
        for seq in seqs {
            state.unapplied.remove(seq);
        }
        drop(state);
        self.changes.send_modify(|count| *count += 1);
    }
}

/// Counts a caller of [`Journal::settle`] while it waits.
struct Settling<'a>(&'a AtomicUsize);

impl<'a> Settling<'a> {
    fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl State {
    /// Every record below this number is applied (or was never written).
    fn low(&self) -> u64 {
        self.unapplied.keys().next().copied().unwrap_or(self.next_seq)
    }
}

/// Owns the segment being written, on a thread of its own: takes every record queued, writes them,
/// syncs once, and answers them all.
struct Writer {
    shared: std::sync::Weak<Shared>,
    file: File,
    written: u64,
    /// The buffer each record's body is written into.
    body: Vec<u8>,
    /// Why the segment cannot be written any more: a failed write could not be cut off, so a record
    /// written after it could not be read back.
    broken: Option<String>,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Append>) {
        let mut batch = Vec::new();
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while let Ok(more) = queue.try_recv() {
                batch.push(more);
            }
            let Some(shared) = self.shared.upgrade() else { return };
            let next = batch.last().map_or(0, |append| append.seq + 1);
            let outcomes = self.write(&mut batch);
            // Forgotten before anyone hears of the failure, so no settle waits for a record never written.
            let failed: Vec<u64> =
                outcomes.iter().filter(|(_, _, outcome)| outcome.is_err()).map(|(seq, ..)| *seq).collect();
            shared.forget(&failed);
            for (seq, durable, outcome) in outcomes {
                let _ = durable.send(outcome.map(|()| seq));
            }
            if let Err(error) = self.roll(&shared, next) {
                tracing::error!(%error, "Could not start a new journal segment; writing on in the old one.");
            }
        }
    }

    /// Writes the batch's records and syncs. Returns each record's number, where to answer it and whether
    /// it is durable: a record whose body cannot be encoded is not, nor is any when the write or the sync
    /// fails.
    fn write(&mut self, batch: &mut Vec<Append>) -> Vec<(u64, Durable, io::Result<()>)> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut length = 0;
        let mut written = match &self.broken {
            Some(broken) => Err(io::Error::other(broken.clone())),
            None => Ok(()),
        };
        for append in batch.drain(..) {
            self.body.clear();
            if written.is_ok() {
                if let Err(error) = (append.body)(&mut self.body) {
                    outcomes.push((append.seq, append.durable, Err(error)));
                    continue;
                }
                let head = record_head(append.seq, &append.header, &self.body);
                written =
                    [&head[..], &append.header, &self.body].into_iter().try_for_each(|part| self.file.write_all(part));
                length += (head.len() + append.header.len() + self.body.len()) as u64;
            }
            outcomes.push((append.seq, append.durable, Ok(())));
        }
        match written.and_then(|()| self.file.sync_data()) {
            Ok(()) => self.written += length,
            Err(error) => {
                // Nothing of the batch counts: cut the segment back to where it was.
                if self.broken.is_none() {
                    let cut =
                        self.file.set_len(self.written).and_then(|()| self.file.seek(SeekFrom::Start(self.written)));
                    if let Err(cut) = cut {
                        tracing::error!(%cut, "Could not cut a failed write off the journal: it takes no more records.");
                        self.broken = Some(format!("a failed write could not be cut off the journal: {cut}"));
                    }
                }
                for (_, _, outcome) in &mut outcomes {
                    if outcome.is_ok() {
                        *outcome = Err(io::Error::new(error.kind(), error.to_string()));
                    }
                }
            }
        }
        outcomes
    }

    /// Seals the segment once it is full and starts the next, named after `next`, the first number its
    /// records may have.
    fn roll(&mut self, shared: &Shared, next: u64) -> io::Result<()> {
        if self.written < SEGMENT_BYTES {
            return Ok(());
        }
        self.file = open_segment(&shared.dir, next)?;
        self.written = 0;
        shared.lock().segments.push_back(next);
        Ok(())
    }
}

fn record_head(seq: u64, header: &[u8], body: &[u8]) -> [u8; RECORD_HEADER] {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(header);
    crc.update(body);
    let mut head = [0; RECORD_HEADER];
    head[..4].copy_from_slice(&MAGIC);
    head[4..12].copy_from_slice(&seq.to_le_bytes());
    head[12..16].copy_from_slice(&(header.len() as u32).to_le_bytes());
    head[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    head[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    head
}

/// Reads a segment's records. In the newest segment a damaged or partial record is where a write was
/// torn: the file is cut there. In an older one it is damage the journal cannot repair.
fn read_segment(path: &Path, newest: bool) -> Result<Vec<Recovered>, IngestError> {
    let fail = |error: io::Error| IngestError::Journal(format!("reading {}: {error}", path.display()));
    let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(fail)?;
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        match parse_record(&bytes[offset..]) {
            Some((record, length)) => {
                records.push(record);
                offset += length;
            }
            None if newest => {
                tracing::warn!(path = %path.display(), offset, "Cutting off a torn record at the end of the journal.");
                file.set_len(offset as u64).and_then(|()| file.sync_all()).map_err(fail)?;
                break;
            }
            None => {
                return Err(IngestError::Journal(format!(
                    "{} is damaged at byte {offset}; move the file away to start without its records",
                    path.display()
                )));
            }
        }
    }
    Ok(records)
}

/// One record at the start of `bytes` and its length, if it is whole and its checksum matches.
fn parse_record(bytes: &[u8]) -> Option<(Recovered, usize)> {
    let head = bytes.get(..RECORD_HEADER)?;
    if head[..4] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(head[4..12].try_into().ok()?);
    let header_len = u32::from_le_bytes(head[12..16].try_into().ok()?) as u64;
    let body_len = u64::from_le_bytes(head[16..24].try_into().ok()?);
    let payload_len = header_len.checked_add(body_len).filter(|length| *length <= MAX_RECORD_BYTES)?;
    let crc = u32::from_le_bytes(head[24..28].try_into().ok()?);
    let end = RECORD_HEADER + payload_len as usize;
    let payload = bytes.get(RECORD_HEADER..end)?;
    let (header, body) = payload.split_at(header_len as usize);
    if record_head(seq, header, body)[24..28] != crc.to_le_bytes() {
        return None;
    }
    Some((Recovered { seq, header: header.to_vec(), body: body.to_vec() }, end))
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.segment"))
}

fn segment_firsts(dir: &Path) -> io::Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = name.strip_suffix(".segment").and_then(|stem| stem.parse().ok()) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Creates (or reopens, appending) a segment and makes its name durable.
fn open_segment(dir: &Path, first: u64) -> io::Result<File> {
    let mut file = OpenOptions::new().create(true).append(true).open(segment_path(dir, first))?;
    file.seek(SeekFrom::End(0))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// The journal's id, made up the first time: 128 random bits in hex.
fn identity(dir: &Path) -> io::Result<String> {
    let path = dir.join("id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let random = || RandomState::new().hash_one(std::time::SystemTime::now());
    let id = format!("{:016x}{:016x}", random(), random());
    let temporary = dir.join("id.new");
    let mut file = File::create(&temporary)?;
    file.write_all(id.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(bytes: &[u8]) -> BodyWriter {
        let bytes = bytes.to_vec();
        Box::new(move |buffer: &mut Vec<u8>| {
            buffer.extend_from_slice(&bytes);
            Ok(())
        })
    }

    impl Journal {
        /// Appends a record for table `t` and returns its sequence number once it is on disk.
        async fn append(&self, header: Vec<u8>, body: BodyWriter) -> Result<u64, IngestError> {
            self.admit("t", header, body, || true).await?.expect("admitted unconditionally").durable().await
        }
    }

    fn records(recovered: &[Recovered]) -> Vec<(u64, &[u8], &[u8])> {
        recovered.iter().map(|r| (r.seq, r.header.as_slice(), r.body.as_slice())).collect()
    }

    #[tokio::test]
    async fn records_survive_a_reopen_until_they_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, recovered) = Journal::open(dir.path()).unwrap();
        assert!(recovered.is_empty());
        let id = journal.id().to_owned();
        assert_eq!(journal.append(b"h0".to_vec(), body(b"b0")).await.unwrap(), 0);
        assert_eq!(journal.append(b"h1".to_vec(), body(b"b1")).await.unwrap(), 1);
        assert_eq!(journal.unapplied(), 2);
        drop(journal);
        let (journal, recovered) = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.id(), id, "the id is kept");
        assert_eq!(records(&recovered), [(0, &b"h0"[..], &b"b0"[..]), (1, b"h1", b"b1")]);
        assert_eq!(journal.unapplied(), 2, "recovered records count as not applied");
        journal.applied(&[0, 1]);
        assert_eq!(journal.append(Vec::new(), body(b"b2")).await.unwrap(), 2, "numbers go on");
        drop(journal);
        let (_journal, recovered) = Journal::open(dir.path()).unwrap();
        let seqs: Vec<u64> = recovered.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [2], "the applied segment is gone; the newer record is kept");
    }

    #[tokio::test]
    async fn a_torn_record_at_the_end_is_cut_off_and_earlier_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        for n in 0..3u8 {
            journal.append(vec![n], body(&[n; 100])).await.unwrap();
        }
        drop(journal);
        let segment = segment_path(dir.path(), 0);
        let length = std::fs::metadata(&segment).unwrap().len();
        // The last record loses its tail, as when the machine stops in the middle of a write.
        OpenOptions::new().write(true).open(&segment).unwrap().set_len(length - 10).unwrap();
        let (journal, recovered) = Journal::open(dir.path()).unwrap();
        assert_eq!(recovered.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(journal.append(vec![9], body(&[9])).await.unwrap(), 2, "the torn record's number is reused");
        drop(journal);
        // A flipped byte in a segment that is not the newest is damage.
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[RECORD_HEADER + 5] ^= 0xff;
        std::fs::write(&segment, bytes).unwrap();
        let error = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(error.contains("is damaged at byte 0"), "{error}");
    }

    fn settling(journal: &Journal, table: Option<&'static str>) -> tokio::task::JoinHandle<Result<(), IngestError>> {
        let journal = journal.clone();
        tokio::spawn(async move { journal.settle(table.map_or(Scope::All, Scope::Table)).await })
    }

    async fn still_waiting(settled: &tokio::task::JoinHandle<Result<(), IngestError>>) -> bool {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        !settled.is_finished()
    }

    #[tokio::test]
    async fn settle_waits_for_every_durable_record_to_be_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        journal.settle(Scope::All).await.unwrap();
        let seq = journal.append(Vec::new(), body(&[1])).await.unwrap();
        let settled = settling(&journal, None);
        assert!(still_waiting(&settled).await, "a record is not applied yet");
        journal.applied(&[seq]);
        settled.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settle_waits_for_a_record_admitted_before_it_that_is_not_on_disk_yet() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        // The writer is held inside the record's body: admitted, numbered, not yet durable.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocked: BodyWriter = Box::new(move |buffer: &mut Vec<u8>| {
            held.recv().ok();
            buffer.push(1);
            Ok(())
        });
        let admitted = journal.admit("t", Vec::new(), blocked, || true).await.unwrap().unwrap();
        let settled = settling(&journal, Some("T"));
        assert!(still_waiting(&settled).await, "the record was admitted first, so it is waited for");
        release.send(()).unwrap();
        let seq = admitted.durable().await.unwrap();
        assert!(still_waiting(&settled).await, "durable is not applied");
        journal.applied(&[seq]);
        settled.await.unwrap().unwrap();
        let refused = journal.admit("t", Vec::new(), body(&[2]), || false).await.unwrap();
        assert!(refused.is_none(), "a record `admit` refuses is not queued");
        assert_eq!(journal.unapplied(), 0);
    }

    #[tokio::test]
    async fn settle_is_scoped_to_a_table_and_answers_the_error_of_a_record_that_keeps_failing() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let stuck =
            journal.admit("a", Vec::new(), body(&[1]), || true).await.unwrap().unwrap().durable().await.unwrap();
        journal.settle(Scope::Table("b")).await.expect("nothing of table b is unapplied");
        let waiting = settling(&journal, Some("a"));
        assert!(still_waiting(&waiting).await);
        journal.failing(&[stuck], "the table refuses the rows");
        let error = waiting.await.unwrap().unwrap_err();
        assert!(matches!(&error, IngestError::JournalBacklog(m) if m.contains("refuses")), "{error}");
        assert!(journal.settle(Scope::All).await.is_err(), "every table's settle includes it");
        journal.applied(&[stuck]);
        journal.settle(Scope::All).await.unwrap();
    }

    #[tokio::test]
    async fn a_record_whose_body_cannot_be_written_is_answered_its_error_and_waited_for_by_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let failing: BodyWriter = Box::new(|_: &mut Vec<u8>| Err(io::Error::other("cannot encode")));
        let admitted = journal.admit("t", Vec::new(), failing, || true).await.unwrap().unwrap();
        let error = admitted.durable().await.unwrap_err().to_string();
        assert!(error.contains("cannot encode"), "{error}");
        assert_eq!(journal.unapplied(), 0);
        tokio::time::timeout(std::time::Duration::from_secs(1), journal.settle(Scope::All)).await.unwrap().unwrap();
    }

    #[test]
    fn a_length_field_that_overflows_is_damage_not_a_crash() {
        let mut head = record_head(0, b"h", b"");
        head[12..16].copy_from_slice(&1u32.to_le_bytes());
        head[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_record(&[&head[..], b"h"].concat()).is_none());
    }

    #[test]
    fn a_record_parses_back_only_whole_and_unchanged() {
        let head = record_head(7, b"head", b"body");
        let bytes = [&head[..], b"head", b"body"].concat();
        let (record, length) = parse_record(&bytes).unwrap();
        assert_eq!((record.seq, length), (7, bytes.len()));
        assert!(parse_record(&bytes[..bytes.len() - 1]).is_none());
        let mut changed = bytes.clone();
        changed[RECORD_HEADER] ^= 1;
        assert!(parse_record(&changed).is_none());
    }
}
