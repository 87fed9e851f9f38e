//! The local spool: an append-only log on disk that keeps webhooks the broker could not
//! confirm, so that a broker outage becomes a delay instead of a loss.
//!
//! Layout: `spool.dir` holds numbered segment files (`00000000000000000001.seg`, ...), a
//! `cursor` file (how far replay has got) and a `lock` file (one relay per directory). A
//! segment starts with an 8-byte magic and holds records:
//!
//! ```text
//! [u32 LE payload length][u32 LE CRC-32 of the payload][payload]
//! ```
//!
//! Appends go to one writer thread that batches everything queued, writes it with one
//! `write`, and makes it durable with one `fdatasync` (group commit): only then does each
//! append return. Replay reads records from the cursor up to the last durable byte, and
//! [`Spool::consume_through`] moves the cursor after the broker confirmed them; segments
//! wholly behind the cursor are deleted. The cursor file is rewritten (not fsynced) as replay
//! goes: after a crash it may be a little behind, which replays a few webhooks twice (the
//! delivery guarantee is at-least-once anyway), never skips one.
//!
//! On open, segments are checked record by record. A torn or corrupt record (power lost
//! mid-write) ends its segment: it is reported and cut off, and startup goes on. A record
//! damaged later, while the relay runs, stalls replay at that record with an error instead.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

const MAGIC: &[u8; 8] = b"HHRSPL01";
const RECORD_HEADER: u64 = 8;
/// A new segment is started once the current one is this large.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Appends taken into one write + fsync at most.
const MAX_BATCH: usize = 1024;

/// Why the spool could not keep a webhook.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("failed to write to the spool: {0}")]
    Io(#[from] io::Error),
    #[error("spool is closed")]
    Closed,
}

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("failed to open spool directory {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("spool directory {0} is in use by another relay")]
    Locked(PathBuf),
}

/// A place in the log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// What opening found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Records waiting for replay from an earlier run.
    pub records: u64,
    /// Bytes cut off after a torn or corrupt record, with the segment they were in.
    pub corrupt: Vec<(PathBuf, u64)>,
}

/// Counts for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub records: u64,
    pub bytes: u64,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    /// End of durable data; replay may read up to here.
    committed: watch::Sender<Position>,
    state: Mutex<State>,
    /// Batches written and fdatasync'd: far fewer than appends when group commit works.
    syncs: AtomicU64,
}

struct State {
    cursor: Position,
    /// Segment number → bytes of valid data in it.
    segments: BTreeMap<u64, u64>,
    /// Records between cursor and committed.
    records: u64,
    /// Appends handed to the writer and not yet answered.
    in_flight: u64,
    /// An append was refused for lack of space, and no segment has been deleted since (an
    /// empty spool accepts anyway: see [`Spool::is_accepting`]).
    full: bool,
}

impl State {
    fn disk_bytes(&self) -> u64 {
        self.segments.values().sum()
    }
}

enum Command {
    Append(Append),
    /// Finish what is queued, release the directory, and stop.
    Close(oneshot::Sender<()>),
}

struct Append {
    payload: Bytes,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, checks what an earlier run left, and starts the
    /// writer thread.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Recovery), OpenError> {
        let io_err = |cause| OpenError::Io {
            path: dir.to_owned(),
            cause,
        };
        // Records hold webhook bodies, export keys included: owner only.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        let lock = File::create(dir.join("lock")).map_err(io_err)?;
        if lock.try_lock().is_err() {
            return Err(OpenError::Locked(dir.to_owned()));
        }

        // One pass over every segment: check it, and count what is left behind the cursor.
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut scans = BTreeMap::new();
        let saved = read_cursor(dir);
        for (number, path) in list_segments(dir).map_err(io_err)? {
            let from = saved
                .filter(|c| c.segment == number)
                .map_or(MAGIC.len() as u64, |c| c.offset);
            let scan = scan_segment(&path, from).map_err(io_err)?;
            if scan.corrupt > 0 {
                recovery.corrupt.push((path.clone(), scan.corrupt));
                truncate(&path, scan.valid).map_err(io_err)?;
            }
            segments.insert(number, scan.valid);
            scans.insert(number, scan);
        }
        let first = segments.keys().next().copied().unwrap_or(1);
        let cursor = saved
            .filter(|c| segments.get(&c.segment).is_some_and(|len| c.offset <= *len))
            .unwrap_or(Position {
                segment: first,
                offset: MAGIC.len() as u64,
            });
        recovery.records = scans
            .range(cursor.segment..)
            .map(|(&number, scan)| {
                if number == cursor.segment && saved == Some(cursor) {
                    scan.records_from
                } else {
                    scan.records
                }
            })
            .sum();

        // Writes always go to a fresh segment: the old ones stay exactly as checked.
        let active = segments.keys().next_back().map_or(1, |last| last + 1);
        let file = create_segment(dir, active).map_err(io_err)?;
        segments.insert(active, MAGIC.len() as u64);
        let committed = Position {
            segment: active,
            offset: MAGIC.len() as u64,
        };
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            max_bytes,
            committed: watch::channel(committed).0,
            syncs: AtomicU64::new(0),
            state: Mutex::new(State {
                cursor,
                segments,
                records: recovery.records,
                in_flight: 0,
                full: false,
            }),
        });
        shared.delete_consumed_segments(&mut shared.lock());

        let (commands, rx) = mpsc::channel(4 * MAX_BATCH);
        let writer = Writer {
            shared: Arc::clone(&shared),
            file,
            _lock: lock,
            position: committed,
        };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err)?;
        Ok((Spool { shared, commands }, recovery))
    }

    /// Appends `payload` and returns once it is on disk (fdatasync'd).
    pub async fn append(&self, payload: Bytes) -> Result<(), SpoolError> {
        let (done, answer) = oneshot::channel();
        self.shared.lock().in_flight += 1;
        let sent = self
            .commands
            .send(Command::Append(Append { payload, done }))
            .await;
        let result = match sent {
            Ok(()) => answer.await.unwrap_or(Err(SpoolError::Closed)),
            Err(_) => Err(SpoolError::Closed),
        };
        self.shared.lock().in_flight -= 1;
        result
    }

    /// Waits for queued appends to finish, then stops the writer and releases the directory.
    /// Appends after this fail with [`SpoolError::Closed`].
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    /// True when nothing is waiting for replay and no append is under way.
    pub fn is_drained(&self) -> bool {
        let state = self.shared.lock();
        state.records == 0 && state.in_flight == 0
    }

    /// False from the first append refused for lack of space until replay frees some.
    ///
    /// An empty spool always accepts: its space comes back only when the next append rotates
    /// (see `Writer::rotate_if_needed`), and a readiness-gated load balancer would never send
    /// that append. Derived here rather than by clearing `full` in `consume_through`, which a
    /// refusal racing with the last consume could set again.
    pub fn is_accepting(&self) -> bool {
        let state = self.shared.lock();
        !state.full || state.records == 0
    }

    /// Batches written and fdatasync'd so far.
    #[cfg(test)]
    fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> Depth {
        let state = self.shared.lock();
        let committed = *self.shared.committed.borrow();
        let bytes = pending(&state.segments, state.cursor, committed)
            .map(|(_, start, end)| end.saturating_sub(start))
            .sum();
        Depth {
            records: state.records,
            bytes,
        }
    }

    /// Waits until there is something to replay.
    pub async fn wait_for_records(&self) {
        let mut committed = self.shared.committed.subscribe();
        loop {
            if self.shared.lock().records > 0 {
                return;
            }
            if committed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Reads up to `max` records from the cursor on, each with the position after it.
    ///
    /// A record that cannot be read before the committed end was damaged on disk after it
    /// was written (or is over `read_record`'s size limit). Skipping it would let
    /// [`Spool::consume_through`] move past webhooks that were answered 202, so it is an
    /// [`io::ErrorKind::InvalidData`] error instead, once the records before it are returned:
    /// replay stalls there and says so.
    pub fn read_batch(&self, max: usize) -> io::Result<Vec<(Bytes, Position)>> {
        let (cursor, segments) = {
            let state = self.shared.lock();
            (state.cursor, state.segments.clone())
        };
        let committed = *self.shared.committed.borrow();
        let mut batch = Vec::new();
        for (number, start, end) in pending(&segments, cursor, committed) {
            let mut position = Position {
                segment: number,
                offset: start,
            };
            if position.offset >= end {
                continue;
            }
            let mut file = File::open(segment_path(&self.shared.dir, number))?;
            file.seek(SeekFrom::Start(position.offset))?;
            let mut reader = io::BufReader::new(file);
            while position.offset < end && batch.len() < max {
                let record = read_record(&mut reader)?.filter(|payload| {
                    position.offset + RECORD_HEADER + payload.len() as u64 <= end
                });
                let Some(payload) = record else {
                    if !batch.is_empty() {
                        return Ok(batch);
                    }
                    let path = segment_path(&self.shared.dir, number);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "unreadable spool record in {} at byte {} (committed data runs to \
                             {end}): damaged on disk, or over the record size limit",
                            path.display(),
                            position.offset,
                        ),
                    ));
                };
                position.offset += RECORD_HEADER + payload.len() as u64;
                batch.push((Bytes::from(payload), position));
            }
            if batch.len() >= max {
                break;
            }
        }
        Ok(batch)
    }

    /// Marks every record before `position` (as returned by [`Spool::read_batch`]) as
    /// delivered, and deletes segments that are now wholly behind it.
    pub fn consume_through(&self, position: Position, records: u64) {
        let mut state = self.shared.lock();
        if position <= state.cursor {
            return;
        }
        state.cursor = position;
        state.records = state.records.saturating_sub(records);
        if let Err(err) = write_cursor(&self.shared.dir, position) {
            tracing::warn!(error = %err, "failed to save the spool cursor; a restart may replay some webhooks twice");
        }
        self.shared.delete_consumed_segments(&mut state);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn delete_consumed_segments(&self, state: &mut State) {
        let behind: Vec<u64> = state
            .segments
            .range(..state.cursor.segment)
            .map(|(&n, _)| n)
            .collect();
        for number in behind {
            let path = segment_path(&self.dir, number);
            match fs::remove_file(&path) {
                Ok(()) => {
                    state.segments.remove(&number);
                    state.full = false;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    state.segments.remove(&number);
                    state.full = false;
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "failed to delete a replayed spool segment")
                }
            }
        }
    }
}

/// The one thread that writes: batches appends, writes them at once, fsyncs once.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    position: Position,
    /// Held open while the writer runs: the directory lock.
    _lock: File,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut buffer = Vec::new();
        let mut closing = None;
        while let Some(command) = rx.blocking_recv() {
            let mut next = Some(command);
            while let Some(command) = next.take() {
                match command {
                    Command::Append(append) => batch.push(append),
                    Command::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.write_batch(&mut batch, &mut buffer);
            }
            if let Some(done) = closing.take() {
                rx.close();
                // Appends that raced with the close are refused, not left hanging.
                while let Ok(command) = rx.try_recv() {
                    if let Command::Append(append) = command {
                        let _ = append.done.send(Err(SpoolError::Closed));
                    }
                }
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    fn write_batch(&mut self, batch: &mut Vec<Append>, buffer: &mut Vec<u8>) {
        if let Err(err) = self.rotate_if_needed() {
            let message = err.to_string();
            for append in batch.drain(..) {
                let _ = append
                    .done
                    .send(Err(io::Error::other(message.clone()).into()));
            }
            return;
        }
        buffer.clear();
        let mut accepted = Vec::with_capacity(batch.len());
        let disk_bytes = self.shared.lock().disk_bytes();
        for append in batch.drain(..) {
            let size = RECORD_HEADER + append.payload.len() as u64;
            if disk_bytes + buffer.len() as u64 + size > self.shared.max_bytes {
                self.shared.lock().full = true;
                let max_bytes = self.shared.max_bytes;
                let _ = append.done.send(Err(SpoolError::Full { max_bytes }));
                continue;
            }
            encode_record(&append.payload, buffer);
            accepted.push(append);
        }
        if accepted.is_empty() {
            return;
        }
        let written = self
            .file
            .write_all(buffer)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.shared.syncs.fetch_add(1, Ordering::Relaxed);
                self.position.offset += buffer.len() as u64;
                {
                    // Published under the lock that counts the records, so whoever sees them
                    // counted can read them.
                    let mut state = self.shared.lock();
                    state.records += accepted.len() as u64;
                    state
                        .segments
                        .insert(self.position.segment, self.position.offset);
                    self.shared.committed.send_replace(self.position);
                }
                for append in accepted {
                    let _ = append.done.send(Ok(()));
                }
            }
            Err(err) => {
                // Cut off whatever part of the batch reached the file, so the segment ends
                // at the last durable record.
                let _ = self.file.set_len(self.position.offset);
                let _ = self.file.seek(SeekFrom::Start(self.position.offset));
                let message = err.to_string();
                for append in accepted {
                    let _ = append
                        .done
                        .send(Err(io::Error::new(err.kind(), message.clone()).into()));
                }
            }
        }
    }

    /// Starts a new segment when the current one is large, or when replay has caught up
    /// with it (so its space can be given back).
    fn rotate_if_needed(&mut self) -> io::Result<()> {
        let drained = {
            let state = self.shared.lock();
            state.cursor >= self.position
        };
        let header = MAGIC.len() as u64;
        let large = self.position.offset >= SEGMENT_BYTES;
        if !(large || (drained && self.position.offset > header)) {
            return Ok(());
        }
        let next = self.position.segment + 1;
        self.file = create_segment(&self.shared.dir, next)?;
        self.position = Position {
            segment: next,
            offset: header,
        };
        let mut state = self.shared.lock();
        state.segments.insert(next, header);
        if drained {
            // Nothing in the old segments is waiting: move the cursor so they can go.
            state.cursor = self.position;
            let _ = write_cursor(&self.shared.dir, self.position);
        }
        self.shared.committed.send_replace(self.position);
        self.shared.delete_consumed_segments(&mut state);
        Ok(())
    }
}

/// The longest record read back; a longer length is taken for corruption. The config keeps
/// `http.max_body_bytes` (a record is a body and a small header) well below it.
pub const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

fn encode_record(payload: &[u8], buffer: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("webhook bodies are far below 4 GiB");
    buffer.extend_from_slice(&len.to_le_bytes());
    buffer.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buffer.extend_from_slice(payload);
}

/// The next record, `None` at the end of the data or at a torn or corrupt record.
fn read_record(reader: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; RECORD_HEADER as usize];
    if !read_full(reader, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // Bodies are bounded by http.max_body_bytes, far below this: a huge length is corruption.
    if len > MAX_RECORD_BYTES {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    if !read_full(reader, &mut payload)? || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(Some(payload))
}

/// Fills `buf`; false if the data ended first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(err) => Err(err),
    }
}

/// Each segment from the cursor's on, with where its unreplayed data starts and ends: the
/// cursor's segment from the cursor, the writer's up to what is committed.
fn pending(
    segments: &BTreeMap<u64, u64>,
    cursor: Position,
    committed: Position,
) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    segments
        .range(cursor.segment..)
        .map(move |(&number, &len)| {
            let start = if number == cursor.segment {
                cursor.offset
            } else {
                MAGIC.len() as u64
            };
            let end = if number == committed.segment {
                committed.offset
            } else {
                len
            };
            (number, start, end)
        })
}

/// What a segment holds, read once at startup.
struct Scan {
    /// Length of the valid data (the header and whole, intact records).
    valid: u64,
    /// Bytes after it that are torn or corrupt.
    corrupt: u64,
    records: u64,
    /// Records that start at or after the offset the scan was asked about (the cursor's).
    records_from: u64,
}

fn scan_segment(path: &Path, from: u64) -> io::Result<Scan> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut magic = [0u8; 8];
    let mut scan = Scan {
        valid: 0,
        corrupt: size,
        records: 0,
        records_from: 0,
    };
    if !read_full(&mut file, &mut magic)? || &magic != MAGIC {
        return Ok(scan);
    }
    let mut reader = io::BufReader::new(file);
    scan.valid = MAGIC.len() as u64;
    while let Some(payload) = read_record(&mut reader)? {
        scan.records += 1;
        if scan.valid >= from {
            scan.records_from += 1;
        }
        scan.valid += RECORD_HEADER + payload.len() as u64;
    }
    scan.corrupt = size - scan.valid;
    Ok(scan)
}

fn truncate(path: &Path, len: u64) -> io::Result<()> {
    if len == 0 {
        // Not even a valid header: rewrite it so the segment is usable and empty.
        let mut file = File::create(path)?;
        file.write_all(MAGIC)?;
        return file.sync_all();
    }
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_all()
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.seg"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .extension()
            .filter(|ext| *ext == "seg")
            .and(path.file_stem())
            .and_then(|stem| stem.to_str())
            .and_then(|stem| stem.parse::<u64>().ok());
        if let Some(number) = number {
            segments.push((number, path));
        }
    }
    segments.sort();
    Ok(segments)
}

fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(segment_path(dir, number))?;
    file.write_all(MAGIC)?;
    file.sync_all()?;
    // The new file's directory entry must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = fs::read_to_string(dir.join("cursor")).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Position {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

fn write_cursor(dir: &Path, position: Position) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, format!("{} {}\n", position.segment, position.offset))?;
    fs::rename(tmp, dir.join("cursor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let path = std::env::temp_dir().join(format!("hirehop-spool-{}", uuid::Uuid::now_v7()));
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn payloads(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!("webhook number {i}")))
            .collect()
    }

    /// Leaves a closed spool in `dir` holding `payloads(n)`.
    async fn write_closed_spool(dir: &Path, n: usize) {
        let (spool, _) = Spool::open(dir, 1 << 20).unwrap();
        for p in payloads(n) {
            spool.append(p).await.unwrap();
        }
        spool.close().await;
    }

    async fn drain_all(spool: &Spool) -> Vec<Bytes> {
        let mut all = Vec::new();
        loop {
            let batch = spool.read_batch(7).unwrap();
            let Some((_, last)) = batch.last() else {
                return all;
            };
            spool.consume_through(*last, batch.len() as u64);
            all.extend(batch.into_iter().map(|(payload, _)| payload));
        }
    }

    #[tokio::test]
    async fn appended_records_replay_in_order_and_free_their_space() {
        let dir = TempDir::new();
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 0);
        assert!(spool.is_drained());
        let tasks: Vec<_> = payloads(50)
            .into_iter()
            .map(|p| {
                let spool = spool.clone();
                async move { spool.append(p).await }
            })
            .collect();
        // Sequential appends keep order; the writer batches whatever is queued.
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(spool.depth().records, 50);
        assert!(!spool.is_drained());
        assert_eq!(drain_all(&spool).await, payloads(50));
        assert!(spool.is_drained());
        assert_eq!(spool.depth(), Depth::default());
        // The next append starts a fresh segment and the drained one is deleted.
        spool.append(Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(list_segments(&dir.0).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs_and_all_land() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        let mut handles = Vec::new();
        for p in payloads(200) {
            let spool = spool.clone();
            handles.push(tokio::spawn(async move { spool.append(p).await }));
        }
        for handle in handles {
            handle.await.unwrap().unwrap();
        }
        // Appends queued while a batch is being fsynced go together into the next one.
        let syncs = spool.syncs();
        assert!(
            (1..100).contains(&syncs),
            "{syncs} fdatasyncs for 200 appends"
        );
        let mut replayed = drain_all(&spool).await;
        replayed.sort();
        let mut expected = payloads(200);
        expected.sort();
        assert_eq!(replayed, expected);
    }

    #[tokio::test]
    async fn leftover_records_are_recovered_after_a_restart() {
        let dir = TempDir::new();
        {
            let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
            for p in payloads(10) {
                spool.append(p).await.unwrap();
            }
            let batch = spool.read_batch(3).unwrap();
            spool.consume_through(batch[2].1, 3);
            spool.close().await;
        }
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 7);
        assert!(recovery.corrupt.is_empty());
        assert_eq!(drain_all(&spool).await, payloads(10)[3..].to_vec());
    }

    #[tokio::test]
    async fn a_torn_or_corrupt_tail_is_reported_cut_off_and_the_rest_kept() {
        let dir = TempDir::new();
        write_closed_spool(&dir.0, 5).await;
        let (_, path) = list_segments(&dir.0).unwrap().pop().unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        // Half a record: a length and a checksum that promise more than is there.
        file.write_all(&100u32.to_le_bytes()).unwrap();
        file.write_all(&[1, 2, 3, 4, 5, 6]).unwrap();
        drop(file);
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 5);
        assert_eq!(recovery.corrupt, vec![(path.clone(), 10)]);
        assert_eq!(drain_all(&spool).await, payloads(5));

        // A flipped byte inside the last record: that record is dropped, earlier ones kept.
        drop(spool);
        let dir2 = TempDir::new();
        write_closed_spool(&dir2.0, 3).await;
        let (_, path) = list_segments(&dir2.0).unwrap().pop().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let (spool, recovery) = Spool::open(&dir2.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 2);
        assert_eq!(recovery.corrupt.len(), 1);
        assert_eq!(drain_all(&spool).await, payloads(3)[..2].to_vec());
    }

    #[tokio::test]
    async fn a_record_damaged_after_it_was_committed_stalls_replay_instead_of_skipping() {
        let dir = TempDir::new();
        write_closed_spool(&dir.0, 5).await;
        // Reopening starts a second segment: the damaged record will have records behind it
        // both in its own segment and in the next one.
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 5);
        for p in payloads(10).split_off(5) {
            spool.append(p).await.unwrap();
        }
        let (_, first) = list_segments(&dir.0).unwrap().remove(0);
        // Every payload here is 16 bytes: flip one inside the fourth record's payload.
        let damaged = MAGIC.len() as u64 + 3 * (RECORD_HEADER + 16);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&first)
            .unwrap();
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(damaged + RECORD_HEADER + 4))
            .unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(damaged + RECORD_HEADER + 4))
            .unwrap();
        file.write_all(&[byte[0] ^ 0xff]).unwrap();
        drop(file);

        let mut replayed = Vec::new();
        let err = loop {
            match spool.read_batch(2) {
                Ok(batch) => {
                    let Some((_, last)) = batch.last() else {
                        panic!("an empty batch with {:?} waiting", spool.depth());
                    };
                    spool.consume_through(*last, batch.len() as u64);
                    replayed.extend(batch.into_iter().map(|(payload, _)| payload));
                }
                Err(err) => break err,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // What comes before the damage is replayed; nothing after it is skipped to.
        assert_eq!(replayed, payloads(3));
        let cursor = spool.shared.lock().cursor;
        assert_eq!((cursor.segment, cursor.offset), (1, damaged));
        assert!(first.exists());
        assert_eq!(spool.depth().records, 7);
        assert!(!spool.is_drained());
        // And it stays stalled there rather than moving on.
        assert!(spool.read_batch(2).is_err());
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_accepts_again_once_replayed() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 200).unwrap();
        let mut accepted = 0;
        let full = loop {
            match spool.append(Bytes::from(vec![b'x'; 40])).await {
                Ok(()) => accepted += 1,
                Err(err) => break err,
            }
        };
        assert!(
            matches!(full, SpoolError::Full { max_bytes: 200 }),
            "{full}"
        );
        assert!(accepted >= 3, "{accepted}");
        assert!(!spool.is_accepting());
        assert_eq!(drain_all(&spool).await.len(), accepted);
        // Nothing is deleted until the next append rotates, but an empty spool must already
        // say it accepts: a readiness-gated load balancer would never send that append.
        assert!(spool.is_accepting());
        spool.append(Bytes::from(vec![b'y'; 40])).await.unwrap();
        assert!(spool.is_accepting());
    }

    #[tokio::test]
    async fn one_webhook_larger_than_the_spool_leaves_an_empty_spool_accepting() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 200).unwrap();
        let refused = spool.append(Bytes::from(vec![b'x'; 300])).await;
        assert!(matches!(refused, Err(SpoolError::Full { .. })));
        assert!(spool.is_accepting());
        spool.append(Bytes::from(vec![b'y'; 40])).await.unwrap();
    }

    #[tokio::test]
    async fn spool_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        spool.append(Bytes::from_static(b"secret")).await.unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.0), 0o700);
        for (_, segment) in list_segments(&dir.0).unwrap() {
            assert_eq!(mode(&segment), 0o600);
        }
    }

    #[tokio::test]
    async fn a_directory_is_used_by_one_relay_at_a_time() {
        let dir = TempDir::new();
        let (_spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert!(matches!(
            Spool::open(&dir.0, 1 << 20),
            Err(OpenError::Locked(_))
        ));
        _spool.close().await;
        assert!(Spool::open(&dir.0, 1 << 20).is_ok());
    }
}
