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

use std::collections::{BTreeSet, VecDeque};
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
    /// Every record below this sequence number is applied.
    applied_below: watch::Sender<u64>,
    /// Callers of [`Journal::settle`] waiting now: whoever applies records should not delay them.
    settling: AtomicUsize,
}

struct State {
    /// Durable records not yet applied.
    unapplied: BTreeSet<u64>,
    /// The next sequence number to be made durable.
    next_seq: u64,
    /// First sequence number of each live segment, oldest first; the last one is being written.
    segments: VecDeque<u64>,
}

/// Writes a record's body into the buffer it is given.
pub type BodyWriter = Box<dyn FnOnce(&mut Vec<u8>) -> io::Result<()> + Send>;

/// Where the writer says a record is durable, with its sequence number.
type Durable = oneshot::Sender<io::Result<u64>>;

/// A record for the writer, and where to say it is durable.
struct Append {
    header: Vec<u8>,
    body: BodyWriter,
    durable: Durable,
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
            if let Some(record) = records.first().filter(|record| record.seq != *first) {
                return Err(IngestError::Journal(format!(
                    "{} starts with record {} instead of {first}",
                    path.display(),
                    record.seq
                )));
            }
            recovered.extend(records);
        }
        let next_seq = recovered.last().map_or_else(|| firsts.last().copied().unwrap_or(0), |r| r.seq + 1);
        // New records go to a segment of their own: the newest one may end where a torn record was cut.
        firsts.push(next_seq);
        firsts.dedup();
        let file = open_segment(dir, next_seq).map_err(|e| fail("cannot create a segment", e))?;
        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let unapplied: BTreeSet<u64> = recovered.iter().map(|record| record.seq).collect();
        let low = unapplied.first().copied().unwrap_or(next_seq);
        let shared = Arc::new(Shared {
            id,
            dir: dir.to_owned(),
            writes,
            state: Mutex::new(State { unapplied, next_seq, segments: firsts.into() }),
            applied_below: watch::Sender::new(low),
            settling: AtomicUsize::new(0),
        });
        let writer = Writer { shared: Arc::downgrade(&shared), file, written: 0, body: Vec::new() };
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

    /// Appends a record and returns its sequence number once it is on disk. The writer thread writes the
    /// body into a buffer it reuses (a fresh buffer per record cost more in page faults than the copy).
    pub async fn append(&self, header: Vec<u8>, body: BodyWriter) -> Result<u64, IngestError> {
        let (durable, done) = oneshot::channel();
        let closed = || IngestError::Journal("the journal writer stopped".to_owned());
        self.shared.writes.send(Append { header, body, durable }).await.map_err(|_| closed())?;
        done.await.map_err(|_| closed())?.map_err(|error| match error.kind() {
            io::ErrorKind::StorageFull => IngestError::InsufficientStorage(format!("the journal: {error}")),
            _ => IngestError::Journal(format!("writing a record: {error}")),
        })
    }

    /// Marks records applied: their rows are committed in the database.
    pub fn applied(&self, seqs: &[u64]) {
        let low = {
            let mut state = self.shared.lock();
            for seq in seqs {
                state.unapplied.remove(seq);
            }
            state.low()
        };
        self.shared.applied_below.send_replace(low);
        self.delete_applied_segments();
    }

    /// Waits until every record made durable before the call is applied.
    pub async fn settle(&self) {
        let target = self.shared.lock().next_seq;
        let mut applied = self.shared.applied_below.subscribe();
        if *applied.borrow() >= target {
            return;
        }
        struct Settling<'a>(&'a AtomicUsize);
        impl Drop for Settling<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.shared.settling.fetch_add(1, Ordering::Relaxed);
        let _settling = Settling(&self.shared.settling);
        // The sender lives as long as `self`.
        let _ = applied.wait_for(|below| *below >= target).await;
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

    /// Deletes sealed segments whose records are all applied.
    fn delete_applied_segments(&self) {
        let doomed: Vec<u64> = {
            let mut state = self.shared.lock();
            let low = state.low();
            let mut doomed = Vec::new();
            // A segment ends where the next begins; the newest is never deleted.
            while state.segments.len() > 1 && state.segments[1] <= low {
                doomed.extend(state.segments.pop_front());
            }
            doomed
        };
        for first in doomed {
            let path = segment_path(&self.shared.dir, first);
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "Could not delete an applied journal segment.");
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("journal state lock poisoned")
    }
}

impl State {
    fn low(&self) -> u64 {
        self.unapplied.first().copied().unwrap_or(self.next_seq)
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
            let first_seq = shared.lock().next_seq;
            match self.write(&mut batch, first_seq) {
                Ok(written) => {
                    let next_seq = first_seq + written.len() as u64;
                    let mut state = shared.lock();
                    state.unapplied.extend(first_seq..next_seq);
                    state.next_seq = next_seq;
                    drop(state);
                    for (seq, durable) in (first_seq..).zip(written) {
                        let _ = durable.send(Ok(seq));
                    }
                    if let Err(error) = self.roll(&shared) {
                        tracing::error!(%error, "Could not start a new journal segment; writing on in the old one.");
                    }
                }
                Err((error, written)) => {
                    // Nothing of the batch counts: cut the segment back to where it was.
                    let _ = self.file.set_len(self.written);
                    let _ = self.file.seek(SeekFrom::Start(self.written));
                    for durable in written {
                        let _ = durable.send(Err(io::Error::new(error.kind(), error.to_string())));
                    }
                }
            }
        }
    }

    /// Writes the batch's records from `first_seq` on and syncs; a record whose body cannot be written
    /// is answered at once and takes no number. Returns where to answer the records written, in order.
    fn write(&mut self, batch: &mut Vec<Append>, first_seq: u64) -> Result<Vec<Durable>, (io::Error, Vec<Durable>)> {
        let mut written = Vec::with_capacity(batch.len());
        let mut length = 0;
        let mut outcome = Ok(());
        for append in batch.drain(..) {
            self.body.clear();
            if let Err(error) = (append.body)(&mut self.body) {
                let _ = append.durable.send(Err(error));
                continue;
            }
            written.push(append.durable);
            if outcome.is_err() {
                continue;
            }
            let seq = first_seq + written.len() as u64 - 1;
            let head = record_head(seq, &append.header, &self.body);
            outcome =
                [&head[..], &append.header, &self.body].into_iter().try_for_each(|part| self.file.write_all(part));
            length += (head.len() + append.header.len() + self.body.len()) as u64;
        }
        if let Err(error) = outcome.and_then(|()| self.file.sync_data()) {
            return Err((error, written));
        }
        self.written += length;
        Ok(written)
    }

    /// Seals the segment once it is full and starts the next.
    fn roll(&mut self, shared: &Shared) -> io::Result<()> {
        if self.written < SEGMENT_BYTES {
            return Ok(());
        }
        let next = shared.lock().next_seq;
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
    if header_len + body_len > MAX_RECORD_BYTES {
        return None;
    }
    let crc = u32::from_le_bytes(head[24..28].try_into().ok()?);
    let end = RECORD_HEADER + (header_len + body_len) as usize;
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

    #[tokio::test]
    async fn settle_waits_for_every_durable_record_to_be_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        journal.settle().await;
        let seq = journal.append(Vec::new(), body(&[1])).await.unwrap();
        let settled = tokio::spawn({
            let journal = journal.clone();
            async move { journal.settle().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!settled.is_finished(), "a record is not applied yet");
        journal.applied(&[seq]);
        settled.await.unwrap();
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
