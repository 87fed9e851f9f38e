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
//! vectored `write` straight from the callers' buffers (a body is never copied into memory
//! of the spool's own), and makes it durable with one `fdatasync` (group commit): only then
//! does each append return. Replay reads records from the cursor up to the last durable
//! byte, and [`Spool::consume_through`] moves the cursor once the broker confirmed them.
//!
//! The disk may fill up, and the spool must still work its way out:
//! - a segment is deleted as soon as replay has passed its end, the one being written to
//!   included (its records hold export keys), so a drained spool holds no segment at all;
//! - a segment is created only when a write needs one, after consumed ones are deleted;
//!   opening creates nothing and needs no free space;
//! - the cursor is a fixed-size record overwritten in place, so saving it needs no free
//!   space either. It is fsynced before segments are deleted and on close; in between it
//!   survives a crash of the process but not a power loss, after which some webhooks are
//!   replayed twice (the delivery guarantee is at-least-once), never skipped;
//! - a failed write (ENOSPC, EIO, ...) makes the spool say it does not accept
//!   ([`Spool::is_accepting`], [`Spool::write_error`]) until a write works again. Meanwhile
//!   the writer tries a write of its own every second, so the spool recovers by itself
//!   once space is freed, without a webhook (which a readiness-gated load balancer would
//!   not send) having to prove it.
//!
//! On open, segments are checked record by record. A torn or corrupt record (power lost
//! mid-write) ends its segment: it is reported and cut off, and startup goes on. A record
//! damaged later, while the relay runs, stalls replay at that record with an error instead.

use std::cmp::Ordering as Order;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

const MAGIC: &[u8; 8] = b"HHRSPL01";
/// Where a segment's first record starts.
const SEGMENT_HEADER: u64 = MAGIC.len() as u64;
const RECORD_HEADER: u64 = 8;
/// A new segment is started once the current one is this large.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Appends taken into one write + fsync at most.
const MAX_BATCH: usize = 1024;
/// How often the writer tries a write of its own while writes fail.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The largest such try: enough for a typical webhook, small enough to repeat every second.
const MAX_PROBE_BYTES: u64 = 1024 * 1024;
/// The probe's scratch file, deleted after each try.
const PROBE_FILE: &str = "probe";

/// The longest record read back; a longer length is taken for corruption. The config keeps
/// `http.max_body_bytes` (a record is a body and a small header) well below it.
pub const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

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
    cursor_file: CursorFile,
    /// Segment number → bytes of valid data in it.
    segments: BTreeMap<u64, u64>,
    /// The segment the writer appends to, if it has one open.
    active: Option<u64>,
    /// Records between cursor and committed.
    records: u64,
    /// Appends handed to the writer and not yet answered.
    in_flight: u64,
    /// An append was refused for lack of space under `spool.max_bytes`, and no segment has
    /// been deleted since.
    full: bool,
    /// Why the last write failed, until a write works again.
    failure: Option<Arc<str>>,
}

impl State {
    fn disk_bytes(&self) -> u64 {
        self.segments.values().sum()
    }
}

enum Command {
    Append(Append),
    /// Replay has caught up: delete the segment being written to, if that is all it holds.
    Wake,
    /// Finish what is queued, release the directory, and stop.
    Close(oneshot::Sender<()>),
}

struct Append {
    /// The record's payload, in pieces written one after the other.
    parts: Vec<Bytes>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

impl Append {
    fn len(&self) -> u64 {
        self.parts.iter().map(|part| part.len() as u64).sum()
    }
}

/// Counts an append as under way for [`Spool::is_drained`] until it is answered or dropped
/// (a caller may give up on an append, and the count must not stay up for good).
struct AppendInFlight<'a>(&'a Shared);

impl<'a> AppendInFlight<'a> {
    fn new(shared: &'a Shared) -> AppendInFlight<'a> {
        shared.lock().in_flight += 1;
        AppendInFlight(shared)
    }
}

impl Drop for AppendInFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, checks what an earlier run left, deletes what
    /// was already replayed, and starts the writer thread. Needs no free space when the
    /// directory exists: a spool on a full disk opens, and replay frees space.
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
        // Opened, not truncated or rewritten: after the first start this needs no space.
        let lock = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        if lock.try_lock().is_err() {
            return Err(OpenError::Locked(dir.to_owned()));
        }
        // Left by a writer that stopped in the middle of a probe.
        let _ = fs::remove_file(dir.join(PROBE_FILE));
        let (cursor_file, saved) = CursorFile::open(dir);
        let mut cursor = saved.unwrap_or_default();

        // One pass over every segment: check it, and count what is left behind the cursor.
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut last = cursor.segment;
        for (number, path) in list_segments(dir).map_err(io_err)? {
            last = last.max(number);
            if number < cursor.segment {
                // Replayed before; deleted below.
                let len = fs::metadata(&path).map_err(io_err)?.len();
                segments.insert(number, len);
                continue;
            }
            let from = if number == cursor.segment {
                cursor.offset
            } else {
                SEGMENT_HEADER
            };
            let scan = scan_segment(&path, from).map_err(io_err)?;
            if scan.corrupt > 0 {
                recovery.corrupt.push((path.clone(), scan.corrupt));
            }
            if scan.valid == 0 {
                // Not even a whole header, so no record: nothing to keep.
                fs::remove_file(&path).map_err(io_err)?;
                continue;
            }
            if scan.corrupt > 0 {
                // Shrinking needs no space.
                truncate(&path, scan.valid).map_err(io_err)?;
            }
            if number == cursor.segment {
                cursor.offset = cursor.offset.clamp(SEGMENT_HEADER, scan.valid);
                recovery.records += scan.records_from;
            } else {
                recovery.records += scan.records;
            }
            segments.insert(number, scan.valid);
        }
        // Replay may read every segment to its end: no writer is adding to any of them.
        let committed = segments
            .last_key_value()
            .map_or(cursor, |(&segment, &offset)| Position { segment, offset });
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            max_bytes,
            committed: watch::channel(committed).0,
            syncs: AtomicU64::new(0),
            state: Mutex::new(State {
                cursor,
                cursor_file,
                segments,
                active: None,
                records: recovery.records,
                in_flight: 0,
                full: false,
                failure: None,
            }),
        });
        shared.delete_consumed_segments(&mut shared.lock());

        let (commands, rx) = mpsc::channel(4 * MAX_BATCH);
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(io_err)?;
        let writer = Writer {
            shared: Arc::clone(&shared),
            file: None,
            position: committed,
            // Above every number seen and the cursor's: a new segment is never taken for
            // one replay has passed.
            next_segment: last + 1,
            probe: None,
            clock,
            _lock: lock,
        };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err)?;
        Ok((Spool { shared, commands }, recovery))
    }

    /// Appends one record, made of `parts` one after the other, and returns once it is on
    /// disk (fdatasync'd). The parts are written as they are, not copied.
    pub async fn append(&self, parts: impl IntoIterator<Item = Bytes>) -> Result<(), SpoolError> {
        let parts = parts.into_iter().collect();
        let (done, answer) = oneshot::channel();
        let _counted = AppendInFlight::new(&self.shared);
        let sent = self
            .commands
            .send(Command::Append(Append { parts, done }))
            .await;
        match sent {
            Ok(()) => answer.await.unwrap_or(Err(SpoolError::Closed)),
            Err(_) => Err(SpoolError::Closed),
        }
    }

    /// Waits for queued appends to finish, deletes the segment being written to if replay
    /// has passed all of it, saves the cursor, then stops the writer and releases the
    /// directory. Appends after this fail with [`SpoolError::Closed`].
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

    /// Whether the next webhook would be kept: false while the spool is full (until replay
    /// deletes a segment) and while writes fail (until one works again).
    pub fn is_accepting(&self) -> bool {
        let state = self.shared.lock();
        !state.full && state.failure.is_none()
    }

    /// Why writes fail, while they do.
    pub fn write_error(&self) -> Option<Arc<str>> {
        self.shared.lock().failure.clone()
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

    /// Reads records from the cursor on, each with the position after it: at most
    /// `max_records`, and no more once `max_bytes` of payload are read (at least one record,
    /// however large), so a batch of large webhooks does not fill memory.
    ///
    /// A record that cannot be read before the committed end was damaged on disk after it
    /// was written (or is over `read_record`'s size limit). Skipping it would let
    /// [`Spool::consume_through`] move past webhooks that were answered 202, so it is an
    /// [`io::ErrorKind::InvalidData`] error instead, once the records before it are returned:
    /// replay stalls there and says so.
    pub fn read_batch(
        &self,
        max_records: usize,
        max_bytes: u64,
    ) -> io::Result<Vec<(Bytes, Position)>> {
        let (cursor, segments) = {
            let state = self.shared.lock();
            (state.cursor, state.segments.clone())
        };
        let committed = *self.shared.committed.borrow();
        let mut batch = Vec::new();
        let mut bytes = 0;
        let full = |batch: &Vec<_>, bytes| batch.len() >= max_records || bytes >= max_bytes;
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
            while position.offset < end && !full(&batch, bytes) {
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
                bytes += payload.len() as u64;
                batch.push((Bytes::from(payload), position));
            }
            if full(&batch, bytes) {
                break;
            }
        }
        Ok(batch)
    }

    /// Marks every record before `position` (as returned by [`Spool::read_batch`]) as
    /// delivered, and deletes segments replay has now passed.
    pub fn consume_through(&self, position: Position, records: u64) {
        let mut state = self.shared.lock();
        if position <= state.cursor {
            return;
        }
        state.cursor = position;
        state.records = state.records.saturating_sub(records);
        state.cursor_file.save(position);
        self.shared.delete_consumed_segments(&mut state);
        if state.records == 0 && state.active.is_some() {
            // The segment being written to is replayed to its end; only the writer may delete
            // it, and it should now rather than at the next append, which may be far off.
            // A full queue means appends are coming, which makes deleting it moot.
            let _ = self.commands.try_send(Command::Wake);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deletes every segment that holds nothing replay still needs, except the one the
    /// writer has open.
    fn delete_consumed_segments(&self, state: &mut State) {
        let cursor = state.cursor;
        let consumed: Vec<u64> = state
            .segments
            .iter()
            .filter(|&(&number, &len)| {
                Some(number) != state.active
                    && match number.cmp(&cursor.segment) {
                        Order::Less => true,
                        Order::Equal => cursor.offset >= len,
                        Order::Greater => len <= SEGMENT_HEADER,
                    }
            })
            .map(|(&number, _)| number)
            .collect();
        if consumed.is_empty() {
            return;
        }
        // The cursor reaches the disk before the records it covers leave it.
        state.cursor_file.sync();
        for number in consumed {
            let path = segment_path(&self.dir, number);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "failed to delete a replayed spool segment");
                    continue;
                }
            }
            state.segments.remove(&number);
            state.full = false;
        }
    }
}

/// The one thread that writes: batches appends, writes them at once, fsyncs once.
struct Writer {
    shared: Arc<Shared>,
    /// The segment being appended to. None until a write needs one, and again once it is
    /// full or replay has caught up with it.
    file: Option<File>,
    /// End of the durable data in that segment.
    position: Position,
    /// Number of the next segment to create.
    next_segment: u64,
    /// While writes fail: how much the next probe writes (the smallest record that could not
    /// be written, up to [`MAX_PROBE_BYTES`]).
    probe: Option<u64>,
    /// Times the wait for commands while writes fail (tokio's channel has no blocking
    /// receive with a timeout).
    clock: tokio::runtime::Runtime,
    /// Held open while the writer runs: the directory lock.
    _lock: File,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::new();
        loop {
            let Some(command) = self.next_command(&mut rx) else {
                // Every handle is gone, so nobody waits for a close.
                self.finish();
                return;
            };
            let mut closing = None;
            let mut next = Some(command);
            while let Some(command) = next.take() {
                match command {
                    Command::Append(append) => batch.push(append),
                    Command::Wake => {}
                    Command::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if batch.is_empty() {
                self.probe();
                self.retire_if_drained();
            } else {
                self.write_batch(&mut batch);
            }
            if let Some(done) = closing {
                rx.close();
                // Appends that raced with the close are refused, not left hanging.
                while let Ok(command) = rx.try_recv() {
                    if let Command::Append(append) = command {
                        let _ = append.done.send(Err(SpoolError::Closed));
                    }
                }
                self.finish();
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    /// The next command; while writes fail, a [`Command::Wake`] at least every
    /// [`PROBE_EVERY`], to probe.
    fn next_command(&self, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        if self.probe.is_none() {
            return rx.blocking_recv();
        }
        // The timer is made inside `block_on`: it needs the runtime's context.
        self.clock
            .block_on(async { tokio::time::timeout(PROBE_EVERY, rx.recv()).await })
            .unwrap_or(Some(Command::Wake))
    }

    fn write_batch(&mut self, batch: &mut Vec<Append>) {
        // Space replay has freed goes back before any is taken.
        self.retire_if_drained();
        if self.file.is_some() && self.position.offset >= SEGMENT_BYTES {
            // Kept for replay; the next write starts a new segment.
            self.file = None;
            self.shared.lock().active = None;
        }
        let accepted = self.admit(batch);
        if accepted.is_empty() {
            return;
        }
        match self.write_records(&accepted) {
            Ok(()) => self.committed(accepted),
            Err(_) if accepted.len() > 1 => {
                // A full disk may still hold some of them: each gets its own try, so none is
                // refused that could have been kept.
                for append in accepted {
                    match self.write_records(std::slice::from_ref(&append)) {
                        Ok(()) => self.committed(vec![append]),
                        Err(err) => self.failed(append, &err),
                    }
                }
            }
            Err(err) => {
                for append in accepted {
                    self.failed(append, &err);
                }
            }
        }
    }

    /// Counts `appends`, just written and synced, and tells their callers.
    fn committed(&mut self, appends: Vec<Append>) {
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        {
            // Published under the lock that counts the records, so whoever sees them counted
            // can read them.
            let mut state = self.shared.lock();
            state.records += appends.len() as u64;
            state
                .segments
                .insert(self.position.segment, self.position.offset);
            self.shared.committed.send_replace(self.position);
        }
        self.writes_work();
        for append in appends {
            let _ = append.done.send(Ok(()));
        }
    }

    /// Tells the caller of `append` that it could not be written.
    fn failed(&mut self, append: Append, err: &io::Error) {
        self.writes_fail(err, RECORD_HEADER + append.len());
        let err = io::Error::new(err.kind(), err.to_string());
        let _ = append.done.send(Err(err.into()));
    }

    /// Answers the appends that do not fit under `spool.max_bytes` (or are too large to ever
    /// be read back) and returns the rest.
    fn admit(&mut self, batch: &mut Vec<Append>) -> Vec<Append> {
        let max_bytes = self.shared.max_bytes;
        // Decided under one lock with setting `full`, so a segment deleted meanwhile either
        // counts here or clears `full` after.
        let mut state = self.shared.lock();
        let new_segment = if self.file.is_none() {
            SEGMENT_HEADER
        } else {
            0
        };
        let mut bytes = state.disk_bytes() + new_segment;
        let mut accepted = Vec::with_capacity(batch.len());
        for append in batch.drain(..) {
            let len = append.len();
            if len > MAX_RECORD_BYTES as u64 {
                let too_large = io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a record of {len} bytes is over the spool's limit"),
                );
                let _ = append.done.send(Err(too_large.into()));
                continue;
            }
            let size = RECORD_HEADER + len;
            if bytes + size > max_bytes {
                // Replay frees space only if something is waiting for it: a webhook too
                // large for an empty spool does not make the spool refuse the rest.
                if state.records > 0 || !accepted.is_empty() {
                    if !state.full {
                        tracing::warn!(
                            max_bytes,
                            "spool full (spool.max_bytes); refusing webhooks until replay frees space"
                        );
                    }
                    state.full = true;
                }
                let _ = append.done.send(Err(SpoolError::Full { max_bytes }));
                continue;
            }
            bytes += size;
            accepted.push(append);
        }
        accepted
    }

    /// Writes `appends` as records at the end of the active segment (created first if there
    /// is none) and makes them durable; on failure the segment is cut back to where it was.
    fn write_records(&mut self, appends: &[Append]) -> io::Result<()> {
        if self.file.is_none() {
            self.start_segment()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("no spool segment open"));
        };
        let headers: Vec<[u8; RECORD_HEADER as usize]> =
            appends.iter().map(record_header).collect();
        let mut slices = Vec::with_capacity(appends.len() * 3);
        let mut total = 0;
        for (header, append) in headers.iter().zip(appends) {
            slices.push(IoSlice::new(header));
            slices.extend(append.parts.iter().map(|part| IoSlice::new(part)));
            total += RECORD_HEADER + append.len();
        }
        let written = write_all_vectored(file, &mut slices).and_then(|()| file.sync_data());
        if let Err(err) = written {
            // Cut off whatever part of the batch reached the file, so the segment ends at the
            // last durable record. Should that fail too, the segment is left as it is (a scan
            // at the next start cuts the tail) and the next write starts a new one.
            let cut = file
                .set_len(self.position.offset)
                .and_then(|()| file.seek(SeekFrom::Start(self.position.offset)));
            if cut.is_err() {
                self.file = None;
                self.shared.lock().active = None;
            }
            return Err(err);
        }
        self.position.offset += total;
        Ok(())
    }

    /// Creates the next segment and makes it the one written to.
    fn start_segment(&mut self) -> io::Result<()> {
        let number = self.next_segment;
        let file = create_segment(&self.shared.dir, number)?;
        self.next_segment += 1;
        self.file = Some(file);
        self.position = Position {
            segment: number,
            offset: SEGMENT_HEADER,
        };
        let mut state = self.shared.lock();
        state.segments.insert(number, SEGMENT_HEADER);
        state.active = Some(number);
        self.shared.committed.send_replace(self.position);
        Ok(())
    }

    /// Closes and deletes the segment being written to once replay has passed all of it.
    fn retire_if_drained(&mut self) {
        if self.file.is_none() {
            return;
        }
        let mut state = self.shared.lock();
        if state.records > 0 {
            return;
        }
        self.file = None;
        state.active = None;
        self.shared.delete_consumed_segments(&mut state);
    }

    /// While writes fail, tries a write of the size that failed, outside the log.
    fn probe(&mut self) {
        let Some(bytes) = self.probe else {
            return;
        };
        if probe_space(&self.shared.dir, bytes).is_ok() {
            self.writes_work();
        }
    }

    fn writes_fail(&mut self, err: &io::Error, size: u64) {
        self.probe = Some(
            self.probe
                .unwrap_or(u64::MAX)
                .min(size)
                .min(MAX_PROBE_BYTES),
        );
        let mut state = self.shared.lock();
        if state.failure.is_none() {
            tracing::error!(
                dir = %self.shared.dir.display(),
                error = %err,
                "spool write failed; webhooks that need the spool get 503 until a write works \
                 again (tried every second)"
            );
        }
        state.failure = Some(format!("write failed: {err}").into());
    }

    fn writes_work(&mut self) {
        self.probe = None;
        if self.shared.lock().failure.take().is_some() {
            tracing::info!("spool writes work again; accepting webhooks into the spool");
        }
    }

    /// On the way out: nothing replayed stays on disk, and the cursor is saved for good.
    fn finish(&mut self) {
        self.retire_if_drained();
        self.shared.lock().cursor_file.sync();
    }
}

/// `[u32 LE length][u32 LE CRC-32]` of the record `append` makes.
fn record_header(append: &Append) -> [u8; RECORD_HEADER as usize] {
    let mut crc = crc32fast::Hasher::new();
    for part in &append.parts {
        crc.update(part);
    }
    // `admit` refused anything over MAX_RECORD_BYTES, far below 4 GiB.
    let len = u32::try_from(append.len()).unwrap_or(u32::MAX);
    let mut header = [0u8; RECORD_HEADER as usize];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&crc.finalize().to_le_bytes());
    header
}

/// `write_all` for several buffers (std's is not stable yet): `writev` may take only part.
fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Writes `bytes` to a scratch file, makes them durable, and deletes the file: whether the
/// spool's filesystem takes a write that large now.
fn probe_space(dir: &Path, bytes: u64) -> io::Result<()> {
    static FILL: [u8; 64 * 1024] = [0xff; 64 * 1024];
    let path = dir.join(PROBE_FILE);
    let written = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(FILL.len() as u64);
            file.write_all(&FILL[..n as usize])?;
            left -= n;
        }
        file.sync_data()
    })();
    let _ = fs::remove_file(&path);
    written
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
                SEGMENT_HEADER
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
    scan.valid = SEGMENT_HEADER;
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
    let path = segment_path(dir, number);
    let created = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        // The new file's directory entry must survive a crash too.
        File::open(dir)?.sync_all()?;
        Ok(file)
    })();
    if created.is_err() {
        // Half a header, or none, on a full disk: not left behind.
        let _ = fs::remove_file(&path);
    }
    created
}

/// The `cursor` file: where replay has got to, as one fixed-size record overwritten in place
/// (`HHRCUR01`, segment and offset as u64 LE, CRC-32 of those 24 bytes as u32 LE), so that
/// saving it needs no free space, and a torn write is noticed (replay then starts over from
/// the oldest segment: duplicates, never a gap).
struct CursorFile {
    path: PathBuf,
    file: Option<File>,
    /// A save or sync failed and was logged; the next failures are not.
    failing: bool,
}

const CURSOR_MAGIC: &[u8; 8] = b"HHRCUR01";
const CURSOR_BYTES: usize = 28;

impl CursorFile {
    /// Opens the cursor file (creating it on the first start) and reads the saved position.
    fn open(dir: &Path) -> (CursorFile, Option<Position>) {
        let mut cursor = CursorFile {
            path: dir.join("cursor"),
            file: None,
            failing: false,
        };
        let mut saved = None;
        if let Some(file) = cursor.file() {
            let mut bytes = [0u8; CURSOR_BYTES];
            if file.read_exact_at(&mut bytes, 0).is_ok() {
                saved = decode_cursor(&bytes);
            }
        }
        if saved.is_none() {
            // Takes the file's space now, while there is some: later saves overwrite it.
            cursor.save(Position::default());
        }
        (cursor, saved)
    }

    fn file(&mut self) -> Option<&File> {
        if self.file.is_none() {
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.path);
            match opened {
                Ok(file) => self.file = Some(file),
                Err(err) => self.failed("open", &err),
            }
        }
        self.file.as_ref()
    }

    fn save(&mut self, position: Position) {
        let bytes = encode_cursor(position);
        let Some(file) = self.file() else { return };
        match file.write_all_at(&bytes, 0) {
            Ok(()) => self.failing = false,
            Err(err) => self.failed("save", &err),
        }
    }

    fn sync(&mut self) {
        let Some(file) = self.file() else { return };
        if let Err(err) = file.sync_data() {
            self.failed("sync", &err);
        }
    }

    fn failed(&mut self, what: &str, err: &io::Error) {
        if !self.failing {
            tracing::warn!(
                path = %self.path.display(),
                error = %err,
                "failed to {what} the spool cursor; a restart may replay webhooks already delivered"
            );
        }
        self.failing = true;
    }
}

fn encode_cursor(position: Position) -> [u8; CURSOR_BYTES] {
    let mut bytes = [0u8; CURSOR_BYTES];
    bytes[..8].copy_from_slice(CURSOR_MAGIC);
    bytes[8..16].copy_from_slice(&position.segment.to_le_bytes());
    bytes[16..24].copy_from_slice(&position.offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..24]);
    bytes[24..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn decode_cursor(bytes: &[u8; CURSOR_BYTES]) -> Option<Position> {
    let crc = u32::from_le_bytes(bytes[24..].try_into().ok()?);
    if &bytes[..8] != CURSOR_MAGIC || crc32fast::hash(&bytes[..24]) != crc {
        return None;
    }
    Some(Position {
        segment: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
        offset: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
    })
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
            spool.append([p]).await.unwrap();
        }
        spool.close().await;
    }

    /// Polls `check` until it holds, for 10 s at most (the writer thread acts on its own).
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The names in `dir`, sorted.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn drain_all(spool: &Spool) -> Vec<Bytes> {
        let mut all = Vec::new();
        loop {
            let batch = spool.read_batch(7, u64::MAX).unwrap();
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
                async move { spool.append([p]).await }
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
        // Replayed to the end: the segment goes at once, not at the next append.
        eventually("the drained segment is deleted", || {
            list_segments(&dir.0).unwrap().is_empty()
        })
        .await;
        spool.append([Bytes::from_static(b"x")]).await.unwrap();
        assert_eq!(list_segments(&dir.0).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs_and_all_land() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        let mut handles = Vec::new();
        for p in payloads(200) {
            let spool = spool.clone();
            handles.push(tokio::spawn(async move { spool.append([p]).await }));
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
                spool.append([p]).await.unwrap();
            }
            let batch = spool.read_batch(3, u64::MAX).unwrap();
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
            spool.append([p]).await.unwrap();
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
            match spool.read_batch(2, u64::MAX) {
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
        assert!(spool.read_batch(2, u64::MAX).is_err());
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_accepts_again_once_replayed() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 200).unwrap();
        let mut accepted = 0;
        let full = loop {
            match spool.append([Bytes::from(vec![b'x'; 40])]).await {
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
        // The drained segment is deleted without waiting for an append, which a
        // readiness-gated load balancer would never send.
        eventually("the spool accepts again", || spool.is_accepting()).await;
        // And space replay freed is given back before a new segment takes any: the whole
        // spool fits again.
        for _ in 0..accepted {
            spool.append([Bytes::from(vec![b'y'; 40])]).await.unwrap();
        }
        assert_eq!(drain_all(&spool).await.len(), accepted);
        for _ in 0..accepted {
            spool.append([Bytes::from(vec![b'z'; 40])]).await.unwrap();
        }
        assert!(spool.is_accepting());
    }

    #[tokio::test]
    async fn one_webhook_larger_than_the_spool_leaves_an_empty_spool_accepting() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 200).unwrap();
        let refused = spool.append([Bytes::from(vec![b'x'; 300])]).await;
        assert!(matches!(refused, Err(SpoolError::Full { .. })));
        assert!(spool.is_accepting());
        spool.append([Bytes::from(vec![b'y'; 40])]).await.unwrap();
    }

    #[tokio::test]
    async fn spool_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        spool.append([Bytes::from_static(b"secret")]).await.unwrap();
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

    #[tokio::test]
    async fn a_record_is_written_from_its_parts_as_one_payload() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        let parts = [
            Bytes::from_static(b"head:"),
            Bytes::new(),
            Bytes::from_static(b"body"),
        ];
        spool.append(parts).await.unwrap();
        let batch = spool.read_batch(10, u64::MAX).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].0, Bytes::from_static(b"head:body"));
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_byte_budget_but_holds_at_least_one_record() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        for n in 0..5u8 {
            spool.append([Bytes::from(vec![n; 100])]).await.unwrap();
        }
        assert_eq!(spool.read_batch(10, 250).unwrap().len(), 3);
        assert_eq!(spool.read_batch(10, 1).unwrap().len(), 1);
        assert_eq!(spool.read_batch(2, u64::MAX).unwrap().len(), 2);
        assert_eq!(spool.read_batch(10, u64::MAX).unwrap().len(), 5);
    }

    #[tokio::test]
    async fn an_append_given_up_on_does_not_leave_the_spool_undrained_for_good() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        // Each append is polled once (handed to the writer, waiting for its fsync) and
        // dropped, as when a caller's future is cancelled.
        for p in payloads(20) {
            let append = spool.append([p]);
            futures_lite::pin!(append);
            let _ = futures_lite::future::poll_once(&mut append).await;
        }
        // The writer still writes them; once they are replayed, nothing is under way.
        eventually("the dropped appends are written", || {
            spool.depth().records == 20
        })
        .await;
        assert_eq!(drain_all(&spool).await.len(), 20);
        assert!(
            spool.is_drained(),
            "an append dropped mid-way is still counted"
        );
    }

    #[tokio::test]
    async fn restarts_of_a_drained_spool_leave_no_file_behind() {
        let dir = TempDir::new();
        write_closed_spool(&dir.0, 3).await;
        for _ in 0..3 {
            let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
            drain_all(&spool).await;
            spool.close().await;
            assert_eq!(files(&dir.0), ["cursor", "lock"]);
        }
        // Closing a spool with nothing in it deletes nothing it should keep either.
        write_closed_spool(&dir.0, 2).await;
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 2);
        assert_eq!(drain_all(&spool).await, payloads(2));
    }

    #[tokio::test]
    async fn the_cursor_is_overwritten_in_place_and_a_clean_restart_replays_nothing_twice() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        for p in payloads(30) {
            spool.append([p]).await.unwrap();
        }
        for _ in 0..10 {
            let batch = spool.read_batch(2, u64::MAX).unwrap();
            spool.consume_through(batch[1].1, 2);
        }
        spool.close().await;
        let cursor = fs::metadata(dir.0.join("cursor")).unwrap();
        assert_eq!(cursor.len(), CURSOR_BYTES as u64);
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 10);
        assert_eq!(drain_all(&spool).await, payloads(30)[20..].to_vec());
    }

    #[tokio::test]
    async fn a_damaged_cursor_replays_from_the_oldest_segment_instead_of_skipping() {
        let dir = TempDir::new();
        let (spool, _) = Spool::open(&dir.0, 1 << 20).unwrap();
        for p in payloads(5) {
            spool.append([p]).await.unwrap();
        }
        let batch = spool.read_batch(2, u64::MAX).unwrap();
        spool.consume_through(batch[1].1, 2);
        spool.close().await;
        // A torn write: half the new cursor over the old one.
        let cursor = dir.0.join("cursor");
        let mut bytes = fs::read(&cursor).unwrap();
        bytes[12] ^= 0xff;
        fs::write(&cursor, bytes).unwrap();
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 5);
        assert_eq!(drain_all(&spool).await, payloads(5));
    }

    #[tokio::test]
    async fn segments_replay_passed_are_deleted_at_open_and_no_segment_is_created() {
        let dir = TempDir::new();
        write_closed_spool(&dir.0, 4).await;
        // As a relay killed between saving the cursor and deleting the segment leaves it.
        let (number, path) = list_segments(&dir.0).unwrap().remove(0);
        let end = fs::metadata(&path).unwrap().len();
        let passed = Position {
            segment: number,
            offset: end,
        };
        fs::write(dir.0.join("cursor"), encode_cursor(passed)).unwrap();
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 0);
        assert_eq!(files(&dir.0), ["cursor", "lock"]);
        // The next segment is numbered past the cursor's, or its records would count as
        // replayed already.
        spool.append([Bytes::from_static(b"after")]).await.unwrap();
        assert_eq!(list_segments(&dir.0).unwrap()[0].0, number + 1);
        spool.close().await;
        let (spool, recovery) = Spool::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovery.records, 1);
        assert_eq!(drain_all(&spool).await, [Bytes::from_static(b"after")]);
    }
}
