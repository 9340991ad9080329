//! The audit log: one JSON record per decision, signal and reload, hash-chained, appended by
//! one writer thread (group commit), rotated by size, and verified by `agentca audit verify`.
//!
//! A record is one line: `{"v":1,"seq":N,` + body + `,"prev_hash":"P","hash":"H"}` where
//! H = SHA-256(P ‖ the line up to and including `"prev_hash":"P"`, closed with `}`), hex.
//! Editing, removing, reordering or cutting a record breaks the chain at that record.
//! Nothing is dropped: a full queue waits or refuses (the caller then denies), as configured.
//! A file deleted or moved under the writer is noticed and a new one continues the chain.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};

use crate::engine::Decision;
use crate::request::Request;
use crate::snapshot::Snapshot;

/// The version of the record layout.
pub const RECORD_VERSION: u32 = 1;
/// The `prev_hash` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Off,
    Stdout,
    File(PathBuf),
}

impl Target {
    pub fn parse(s: &str) -> Target {
        match s {
            "off" | "none" => Target::Off,
            "-" => Target::Stdout,
            path => Target::File(PathBuf::from(path)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Off => "off".into(),
            Target::Stdout => "-".into(),
            Target::File(p) => p.display().to_string(),
        }
    }
}

/// When an answer may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Only once its record is on disk (fsync, many records per fsync).
    Fsync,
    /// Once its record is written to the file (it survives a crash of agentca, not of the
    /// machine); fsynced within the flush interval.
    Written,
    /// Once its record is queued; written at once and fsynced within the flush interval.
    Buffered,
}

/// What a request does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFull {
    /// Wait for room (backpressure).
    Wait,
    /// Answer deny with `audit_unavailable`.
    Deny,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    pub durability: Durability,
    pub on_full: OnFull,
    /// Records the queue holds before `on_full` applies.
    pub queue: usize,
    /// Bytes of records the queue holds before `on_full` applies.
    pub queue_bytes: usize,
    /// Rotate the file when it would grow past this many bytes (0: never).
    pub max_bytes: u64,
    /// Buffered mode: the longest a queued record waits to be fsynced.
    pub flush_interval: Duration,
}

impl Config {
    pub fn new(target: Target) -> Config {
        Config {
            target,
            durability: Durability::Fsync,
            on_full: OnFull::Wait,
            queue: 65_536,
            queue_bytes: 64 * 1024 * 1024,
            max_bytes: 256 * 1024 * 1024,
            flush_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log `{path}`: {source}")]
    Io { path: String, source: io::Error },
    #[error("audit log `{path}`: the last record cannot be read: {message}")]
    Corrupt { path: String, message: String },
}

/// Why a record was not accepted: the caller must not answer allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the audit queue is full")]
    QueueFull,
    #[error("the audit log is closed")]
    Closed,
    #[error("the audit log cannot be written")]
    Unavailable,
}

/// How long the writer waits before it retries a failed write.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The most record bytes one group commit gathers (an outage under `deny` gathers everything).
const BATCH_BYTES: usize = 4 << 20;

/// The field the writer adds to a record whose caller was answered deny (audit_unavailable)
/// because the record could not be written in time.
const ANSWERED_UNAVAILABLE: &str = "\"answered\":\"audit_unavailable\"";

/// Counters of the sink.
#[derive(Debug, Default)]
struct Stats {
    written: AtomicU64,
    waited: AtomicU64,
    refused: AtomicU64,
    seq: AtomicU64,
    /// Records accepted into the queue, and those of them written: the difference is pending.
    accepted: AtomicU64,
    landed: AtomicU64,
    failing: AtomicBool,
    error: Mutex<Option<String>>,
    /// The last `recovery` note (file deleted or moved, writes that failed), with its time.
    notice: Mutex<Option<String>>,
}

impl Stats {
    fn set_notice(&self, time: DateTime<Utc>, note: &str) {
        if let Ok(mut slot) = self.notice.lock() {
            *slot = Some(format!("{}: {note}", time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)));
        }
    }
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditStats {
    pub written: u64,
    pub waited: u64,
    pub refused: u64,
    pub seq: u64,
    /// Records accepted and not yet written.
    pub pending: u64,
    pub error: Option<String>,
    pub notice: Option<String>,
}

/// Answers the submitter: the record's seq once written, or a refusal.
type Ack = oneshot::Sender<Result<u64, Refused>>;
type Answer = oneshot::Receiver<Result<u64, Refused>>;

enum Job {
    /// A record; its share of the byte budget (`room`) is returned once it is written.
    /// `refusable`: its caller is answered deny rather than kept waiting while writes fail.
    Record { body: String, ack: Option<Ack>, room: OwnedSemaphorePermit, refusable: bool },
    /// Buffered mode: fsync what is written if the interval has passed.
    Tick,
    /// Write and fsync everything queued before, then answer.
    Flush(oneshot::Sender<()>),
}

/// The handle requests hold: cheap to clone, knows nothing of gRPC.
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<Job>>,
    /// Bytes of records queued and not yet written: the queue is bounded in bytes too.
    bytes: Arc<Semaphore>,
    stats: Arc<Stats>,
    config: Arc<Config>,
}

impl Audit {
    /// Opens the log (continuing its chain) and starts the writer thread.
    pub fn start(config: Config) -> Result<Audit, AuditError> {
        let stats = Arc::new(Stats::default());
        let config = Arc::new(config);
        let bytes = Arc::new(Semaphore::new(config.queue_bytes.clamp(1, Semaphore::MAX_PERMITS)));
        let mut sink = match &config.target {
            Target::Off => return Ok(Audit { tx: None, bytes, stats, config }),
            Target::Stdout => Sink::Stdout { last: Tail { seq: 0, hash: GENESIS.into() } },
            Target::File(path) => Sink::open(path, config.max_bytes)?,
        };
        // A torn tail was cut: say so in the chain itself, before anything else is written.
        if let Some(note) = sink.recovered() {
            let note = Note::new(note);
            let mut line = Vec::new();
            let tail = append_record(&mut line, sink.last(), &note.body(), "");
            sink.write(&line, true).map_err(|e| AuditError::Io { path: config.target.describe(), source: e })?;
            sink.set_last(tail);
            stats.written.fetch_add(1, Ordering::Relaxed);
            stats.set_notice(note.time, &note.text);
        }
        stats.seq.store(sink.last().seq, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let writer = Writer { sink, rx, stats: stats.clone(), config: config.clone(), notes: Vec::new() };
        std::thread::Builder::new()
            .name("agentca-audit".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Io { path: config.target.describe(), source: e })?;
        if config.durability != Durability::Fsync {
            // A weak sender: once every handle is gone, the writer sees the channel close.
            let ticks = tx.downgrade();
            let every = config.flush_interval;
            std::thread::Builder::new()
                .name("agentca-audit-tick".into())
                .spawn(move || {
                    while let Some(tx) = ticks.upgrade() {
                        let _ = tx.try_send(Job::Tick);
                        drop(tx);
                        std::thread::sleep(every);
                    }
                })
                .map_err(|e| AuditError::Io { path: config.target.describe(), source: e })?;
        }
        Ok(Audit { tx: Some(tx), bytes, stats, config })
    }

    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Accepts a record body (a JSON object); returns once the configured durability is met.
    pub async fn submit(&self, body: String) -> Result<(), Refused> {
        self.submit_with(body, self.config.on_full).await
    }

    /// As `submit`, but waits for room whatever the overflow policy (signals, reloads).
    pub async fn submit_waiting(&self, body: String) -> Result<(), Refused> {
        self.submit_with(body, OnFull::Wait).await
    }

    async fn submit_with(&self, body: String, on_full: OnFull) -> Result<(), Refused> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let refusable = on_full == OnFull::Deny;
        // While writes fail, a record would only wait behind the ones being retried.
        if refusable && self.stats.failing.load(Ordering::Relaxed) {
            return Err(self.refuse(Refused::Unavailable));
        }
        let size = self.size_of(&body);
        let mut waited = false;
        let room = match self.bytes.clone().try_acquire_many_owned(size) {
            Ok(room) => room,
            Err(TryAcquireError::Closed) => return Err(Refused::Closed),
            Err(TryAcquireError::NoPermits) => match on_full {
                OnFull::Deny => return Err(self.refuse(Refused::QueueFull)),
                OnFull::Wait => {
                    waited = true;
                    self.bytes.clone().acquire_many_owned(size).await.map_err(|_| Refused::Closed)?
                }
            },
        };
        let (ack, done) = self.ack();
        let job = Job::Record { body, ack, room, refusable };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Refused::Closed),
            Err(mpsc::error::TrySendError::Full(job)) => match on_full {
                OnFull::Deny => return Err(self.refuse(Refused::QueueFull)),
                OnFull::Wait => {
                    waited = true;
                    tx.send(job).await.map_err(|_| Refused::Closed)?;
                }
            },
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if waited {
            self.stats.waited.fetch_add(1, Ordering::Relaxed);
        }
        match done {
            Some(done) => done.await.unwrap_or(Err(Refused::Closed)).map(|_| ()),
            None => Ok(()),
        }
    }

    fn refuse(&self, why: Refused) -> Refused {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        why
    }

    /// A record's share of the byte budget (a record larger than the whole budget takes it all).
    fn size_of(&self, body: &str) -> u32 {
        body.len().clamp(1, self.config.queue_bytes.clamp(1, Semaphore::MAX_PERMITS)).min(u32::MAX as usize) as u32
    }

    /// As `submit`, for code outside an async runtime (the CLI): waits for room.
    pub fn submit_blocking(&self, body: String) -> Result<(), Refused> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let size = self.size_of(&body);
        let room =
            futures::executor::block_on(self.bytes.clone().acquire_many_owned(size)).map_err(|_| Refused::Closed)?;
        let (ack, done) = self.ack();
        tx.blocking_send(Job::Record { body, ack, room, refusable: false }).map_err(|_| Refused::Closed)?;
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        match done {
            Some(done) => done.blocking_recv().unwrap_or(Err(Refused::Closed)).map(|_| ()),
            None => Ok(()),
        }
    }

    fn ack(&self) -> (Option<Ack>, Option<Answer>) {
        match self.config.durability {
            Durability::Fsync | Durability::Written => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            Durability::Buffered => (None, None),
        }
    }

    /// Writes and fsyncs everything queued so far.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Job::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    pub fn flush_blocking(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.blocking_send(Job::Flush(done)).is_ok() {
            let _ = wait.blocking_recv();
        }
    }

    pub fn stats(&self) -> AuditStats {
        AuditStats {
            written: self.stats.written.load(Ordering::Relaxed),
            waited: self.stats.waited.load(Ordering::Relaxed),
            refused: self.stats.refused.load(Ordering::Relaxed),
            seq: self.stats.seq.load(Ordering::Relaxed),
            // The writer may count a record as landed a moment before its sender counts it as
            // accepted: hence the saturating difference.
            pending: self
                .stats
                .accepted
                .load(Ordering::Relaxed)
                .saturating_sub(self.stats.landed.load(Ordering::Relaxed)),
            error: self.stats.error.lock().ok().and_then(|e| e.clone()),
            notice: self.stats.notice.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// False while writes fail: with `on_full = deny`, the service reports NOT_SERVING.
    pub fn healthy(&self) -> bool {
        !self.stats.failing.load(Ordering::Relaxed)
    }
}

/// The last record of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    seq: u64,
    hash: String,
}

enum Sink {
    Stdout {
        last: Tail,
    },
    File {
        path: PathBuf,
        file: File,
        len: u64,
        max_bytes: u64,
        last: Tail,
        recovered: Option<String>,
        /// The file was rotated away but the new one could not be opened yet.
        reopen: bool,
        /// The open file's device and inode, to notice when `path` no longer names it (None for
        /// a pipe or a device, which are neither rotated nor replaced).
        id: Option<FileId>,
        /// A failed append could not be cut back: the file must be cut to `len` before
        /// anything else is appended.
        cut: bool,
    },
}

impl Sink {
    fn open(path: &Path, max_bytes: u64) -> Result<Sink, AuditError> {
        let err = |source: io::Error| AuditError::Io { path: path.display().to_string(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(err)?;
        }
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path).map_err(err)?;
        let (mut last, recovered) = recover_tail(&mut file, path)?;
        if last.is_none() {
            // The current file is new or empty: the chain goes on from the newest rotated file.
            if let Some(rotated) = rotated_files(path).last() {
                let mut f = File::open(rotated).map_err(err)?;
                last = read_tail(&mut f, rotated)?.0;
            }
        }
        let meta = file.metadata().map_err(err)?;
        let last = last.unwrap_or(Tail { seq: 0, hash: GENESIS.into() });
        Ok(Sink::File {
            path: path.to_path_buf(),
            file,
            len: meta.len(),
            max_bytes,
            last,
            recovered,
            reopen: false,
            id: identity(&meta),
            cut: false,
        })
    }

    fn last(&self) -> &Tail {
        match self {
            Sink::Stdout { last } | Sink::File { last, .. } => last,
        }
    }

    fn recovered(&self) -> Option<String> {
        match self {
            Sink::File { recovered, .. } => recovered.clone(),
            Sink::Stdout { .. } => None,
        }
    }

    /// Notices that `path` no longer names the open file (deleted, moved away, or replaced by
    /// logrotate's new empty file) and opens the file now at `path` to continue the chain, or
    /// that the file was truncated from outside. Returns what happened, for a `recovery`
    /// record: the caller writes it first.
    fn ensure_current(&mut self) -> io::Result<Option<String>> {
        let Sink::File { path, file, len, last, reopen, id, cut, .. } = self else { return Ok(None) };
        // Mid-rotation the path is ours to create: `write` opens it.
        let (Some(ours), false) = (*id, *reopen) else { return Ok(None) };
        let now = match fs::metadata(&*path) {
            Ok(meta) => identity(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            // Cannot tell (the folder cannot be searched): writes to the open file go on.
            Err(_) => return Ok(None),
        };
        if now == Some(ours) {
            // Still ours, but cut short from outside (logrotate's copytruncate): `len` must
            // follow, or a cut after a failed append would pad the file with zeros.
            let size = file.metadata()?.len();
            if size >= *len {
                return Ok(None);
            }
            let note = format!(
                "`{}` was truncated from {} to {size} bytes while agentca had it open (as logrotate's copytruncate \
                 does): records up to seq {} were in it, and a copy taken before may lack the last of them; this \
                 file continues the chain from seq {}",
                path.display(),
                *len,
                last.seq,
                last.seq + 1
            );
            *len = size;
            *cut = false;
            return Ok(Some(note));
        }
        let fresh = open_continuing(path, last)?;
        // The old file keeps what reached it: leave it whole and durable, in case it was moved.
        let deleted = file.metadata().is_ok_and(|m| m.nlink() == 0);
        let mut troubles = Vec::new();
        if *cut && let Err(e) = file.set_len(*len) {
            troubles.push(format!("a torn record at its end could not be cut: {e}"));
        }
        if let Err(e) = sync_file(file) {
            troubles.push(format!("it could not be fsynced: {e}"));
        }
        sync_dir(path);
        (*file, *len, *id, *cut) = (fresh.file, fresh.len, fresh.id, false);
        let what = if deleted {
            format!(
                "`{}` was deleted while agentca had it open: records up to seq {} were written to the deleted file and are lost with it",
                path.display(),
                last.seq
            )
        } else {
            format!(
                "`{}` was moved or replaced while agentca had it open: records up to seq {} are in the old file, under its new name",
                path.display(),
                last.seq
            )
        };
        let troubles = if troubles.is_empty() { String::new() } else { format!(" ({})", troubles.join("; ")) };
        Ok(Some(format!("{what}{troubles}; this file continues the chain from seq {}", last.seq + 1)))
    }

    /// Appends `lines` (whole records); on error the file is cut back to where it was.
    fn write(&mut self, lines: &[u8], sync: bool) -> io::Result<()> {
        match self {
            Sink::Stdout { .. } => {
                let mut out = io::stdout().lock();
                out.write_all(lines)?;
                out.flush()
            }
            Sink::File { path, file, len, max_bytes, last, reopen, id, cut, .. } => {
                // INVARIANT: the file holds whole records up to `len`. A torn fragment past it
                // (a failed append whose cut failed too) goes before anything else is appended
                // or the file is rotated, so it never sits in the middle of the chain.
                if *cut {
                    file.set_len(*len)?;
                    *cut = false;
                }
                let rotate = *max_bytes > 0 && *len > 0 && *len + lines.len() as u64 > *max_bytes;
                if rotate && !*reopen && id.is_some() {
                    sync_file(file)?;
                    let next = rotated_files(path).last().and_then(|p| rotation_number(path, p)).unwrap_or(0) + 1;
                    fs::rename(&*path, rotated_name(path, next))?;
                    *reopen = true;
                }
                // Separate from the rename, so that a failed open is retried without renaming
                // again; until it succeeds nothing is appended, to the rotated file or any other.
                if *reopen {
                    let fresh = open_continuing(path, last)?;
                    sync_dir(path);
                    (*file, *len, *id, *reopen) = (fresh.file, fresh.len, fresh.id, false);
                }
                let before = *len;
                let result = file.write_all(lines).and_then(|()| if sync { sync_file(file) } else { Ok(()) });
                match result {
                    Ok(()) => {
                        *len += lines.len() as u64;
                        Ok(())
                    }
                    Err(e) => {
                        // Never leave a torn record behind: the batch is retried whole. If even
                        // the cut fails, it is retried before the next append. A pipe or a
                        // device cannot be cut (and would refuse it forever).
                        *cut = id.is_some() && file.set_len(before).is_err();
                        Err(e)
                    }
                }
            }
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout { .. } => io::stdout().lock().flush(),
            Sink::File { file, .. } => sync_file(file),
        }
    }

    fn set_last(&mut self, tail: Tail) {
        match self {
            Sink::Stdout { last } | Sink::File { last, .. } => *last = tail,
        }
    }
}

/// A regular file's device and inode.
type FileId = (u64, u64);

/// The file an audit log goes on in, as `open_continuing` found it.
struct Opened {
    file: File,
    len: u64,
    id: Option<FileId>,
}

/// A regular file's device and inode; None for a pipe or a device.
fn identity(meta: &fs::Metadata) -> Option<FileId> {
    meta.is_file().then(|| (meta.dev(), meta.ino()))
}

/// Opens (creating it and its folder) the file at `path` to continue the chain after `last`:
/// a new or empty file, or one whose last record is `last` (a copy put back). Anything else
/// belongs to another chain and is not appended to.
fn open_continuing(path: &Path, last: &Tail) -> io::Result<Opened> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > 0 {
        let continues = matches!(read_tail(&mut file, path), Ok((Some(tail), None)) if tail == *last);
        if !continues {
            return Err(io::Error::other(format!(
                "`{}` holds records that do not end with this log's last record (seq {}): move it away so that a new file can be started",
                path.display(),
                last.seq
            )));
        }
    }
    Ok(Opened { file, len: meta.len(), id: identity(&meta) })
}

/// fsync; a pipe or device that cannot be synced (EINVAL) has nothing to sync.
fn sync_file(file: &File) -> io::Result<()> {
    match file.sync_data() {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        other => other,
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

fn rotated_name(path: &Path, n: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rotation_number(path: &Path, rotated: &Path) -> Option<u64> {
    let base = path.file_name()?.to_str()?;
    rotated.file_name()?.to_str()?.strip_prefix(base)?.strip_prefix('.')?.parse().ok()
}

/// The rotated files of `path` (`PATH.1`, `PATH.2`, …), oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| dir.join(e.file_name()))
                .filter_map(|p| rotation_number(path, &p).map(|n| (n, p)))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Reads the last record; cuts a torn last line (a write the crash interrupted, never acknowledged).
fn recover_tail(file: &mut File, path: &Path) -> Result<(Option<Tail>, Option<String>), AuditError> {
    let (tail, torn) = read_tail(file, path)?;
    let Some(keep) = torn else { return Ok((tail, None)) };
    let err = |source: io::Error| AuditError::Io { path: path.display().to_string(), source };
    let len = file.metadata().map_err(err)?.len();
    file.set_len(keep).map_err(err)?;
    file.sync_all().map_err(err)?;
    let note = format!(
        "cut {} bytes of a torn last line from `{}` (a record whose write was interrupted; it was never acknowledged)",
        len - keep,
        path.display()
    );
    Ok((tail, Some(note)))
}

/// The last complete record, and where the file should end if its last line is torn.
fn read_tail(file: &mut File, path: &Path) -> Result<(Option<Tail>, Option<u64>), AuditError> {
    let err = |source: io::Error| AuditError::Io { path: path.display().to_string(), source };
    let meta = file.metadata().map_err(err)?;
    // A pipe or device (e.g. /dev/stdout given as a path) has no tail to read.
    if !meta.is_file() || meta.len() == 0 {
        return Ok((None, None));
    }
    let len = meta.len();
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::take(&mut *file, len - start).read_to_end(&mut buf).map_err(err)?;
        let whole_window = start == 0;
        // Bytes after the last newline are a torn line: the write of a record that a crash cut.
        let (complete, torn_at) = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) if i + 1 == buf.len() => (&buf[..i], None),
            Some(i) => (&buf[..i], Some(start + i as u64 + 1)),
            None if whole_window => return Ok((None, (len > 0).then_some(0))),
            None => {
                window *= 4;
                continue;
            }
        };
        let line = match complete.iter().rposition(|b| *b == b'\n') {
            Some(j) => &complete[j + 1..],
            None if whole_window => complete,
            None => {
                window *= 4;
                continue;
            }
        };
        if line.is_empty() {
            return Ok((None, torn_at));
        }
        let tail =
            parse_tail(line).map_err(|message| AuditError::Corrupt { path: path.display().to_string(), message })?;
        return Ok((Some(tail), torn_at));
    }
}

fn parse_tail(line: &[u8]) -> Result<Tail, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let seq = v.get("seq").and_then(Value::as_u64).ok_or("no `seq`")?;
    let hash = v.get("hash").and_then(Value::as_str).ok_or("no `hash`")?.to_string();
    Ok(Tail { seq, hash })
}

struct Writer {
    sink: Sink,
    rx: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
    config: Arc<Config>,
    /// `recovery` notes not yet written: they go first in the next write.
    notes: Vec<Note>,
}

/// A record waiting in the writer.
struct Entry {
    body: String,
    ack: Option<Ack>,
    refusable: bool,
    /// Its caller was answered deny (audit_unavailable) while the record could not be written.
    refused: bool,
    /// Its seq, once the batch is laid out.
    seq: u64,
    /// Its share of the queue's byte budget, returned once it is written.
    _room: OwnedSemaphorePermit,
}

/// A `recovery` note: something the chain itself must say (a cut tail, a file replaced, an outage).
struct Note {
    time: DateTime<Utc>,
    text: String,
}

impl Note {
    fn new(text: String) -> Note {
        Note { time: Utc::now(), text }
    }

    fn body(&self) -> String {
        body(&RecoveryRecord { kind: "recovery", time: self.time, note: &self.text })
    }
}

/// Failed attempts to write the current batch.
struct Outage {
    since: DateTime<Utc>,
    attempts: u64,
    error: String,
}

impl Outage {
    /// The note written after the batch once it lands.
    fn note(&self, batch: &[Entry]) -> Note {
        let (first, last) = (batch.first().map_or(0, |e| e.seq), batch.last().map_or(0, |e| e.seq));
        let refused = batch.iter().filter(|e| e.refused).count();
        let late = if first == last {
            format!("record seq {first} was written late")
        } else {
            format!("records seq {first}..{last} were written late")
        };
        let answered = if refused == 0 {
            String::new()
        } else {
            format!(
                "; meanwhile the callers of {refused} of them were answered deny with audit_unavailable, not with \
                 the decision recorded (those records carry {ANSWERED_UNAVAILABLE})"
            )
        };
        Note::new(format!(
            "audit writes failed from {} (failed attempts: {}; last error: {}); {late}{answered}",
            self.since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            self.attempts,
            self.error
        ))
    }
}

impl Writer {
    fn run(mut self) {
        let mut lines = Vec::with_capacity(1 << 16);
        let mut batch: Vec<Entry> = Vec::new();
        let mut flushes = Vec::new();
        let mut unsynced = false;
        let mut last_sync = Instant::now();
        let mut last_complaint: Option<Instant> = None;
        while let Some(job) = self.rx.blocking_recv() {
            // Group commit: everything already queued goes out in this write.
            self.gather(job, &mut batch, &mut flushes, BATCH_BYTES);
            let sync_now = match self.config.durability {
                Durability::Fsync => !batch.is_empty() || (!flushes.is_empty() && unsynced),
                Durability::Buffered | Durability::Written => {
                    !flushes.is_empty()
                        || ((unsynced || !batch.is_empty()) && last_sync.elapsed() >= self.config.flush_interval)
                }
            };
            // A failed write is retried until it succeeds: an accepted record is never dropped.
            let mut outage: Option<Outage> = None;
            while let Err(e) = self.attempt(&mut lines, &mut batch, outage.as_ref(), sync_now) {
                // Loud, but not a line every retry: the first failure, then every 10 s.
                if last_complaint.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::error!(error = %e, "audit write failed; retrying until it succeeds");
                    last_complaint = Some(Instant::now());
                }
                let outage =
                    outage.get_or_insert_with(|| Outage { since: Utc::now(), attempts: 0, error: String::new() });
                outage.attempts += 1;
                outage.error = e.to_string();
                if let Ok(mut slot) = self.stats.error.lock() {
                    *slot = Some(e.to_string());
                }
                self.stats.failing.store(true, Ordering::Relaxed);
                if self.config.on_full == OnFull::Deny {
                    // Nobody waits on a write that fails: new submits are refused (`failing`),
                    // and those already queued are taken in and answered now. Their records
                    // stay in the batch and are written once writes succeed again.
                    while let Ok(job) = self.rx.try_recv() {
                        self.gather(job, &mut batch, &mut flushes, usize::MAX);
                    }
                    self.refuse_waiting(&mut batch);
                }
                std::thread::sleep(RETRY_AFTER);
            }
            if self.stats.failing.swap(false, Ordering::Relaxed) {
                tracing::info!("audit writes succeed again");
                last_complaint = None;
                if let Ok(mut e) = self.stats.error.lock() {
                    *e = None;
                }
            }
            if !batch.is_empty() {
                unsynced = !sync_now;
            }
            if sync_now {
                unsynced = false;
                last_sync = Instant::now();
            }
            for entry in batch.drain(..) {
                if let Some(ack) = entry.ack {
                    let _ = ack.send(Ok(entry.seq));
                }
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
        // Every sender is gone: make what was written durable.
        let _ = self.sink.sync();
    }

    /// Takes `first` and what is already queued behind it, up to `max_bytes` of records.
    fn gather(&mut self, first: Job, batch: &mut Vec<Entry>, flushes: &mut Vec<oneshot::Sender<()>>, max_bytes: usize) {
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Record { body, ack, room, refusable } => {
                    bytes += body.len();
                    batch.push(Entry { body, ack, refusable, refused: false, seq: 0, _room: room });
                }
                Job::Tick => {}
                Job::Flush(done) => flushes.push(done),
            }
            if bytes < max_bytes {
                next = self.rx.try_recv().ok();
            }
        }
    }

    /// Answers deny (audit_unavailable) to every caller that may be refused and still waits.
    fn refuse_waiting(&self, batch: &mut [Entry]) {
        for entry in batch.iter_mut().filter(|e| e.refusable) {
            let Some(ack) = entry.ack.take() else { continue };
            // Counted before the caller can see the answer (and look at the counters).
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            entry.refused = ack.send(Err(Refused::Unavailable)).is_ok();
            if !entry.refused {
                // The caller is gone: it was answered nothing.
                self.stats.refused.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// One try at writing the pending notes and `batch` (and, after an outage, a note saying
    /// so), laid out afresh after the chain's current last record.
    fn attempt(
        &mut self,
        lines: &mut Vec<u8>,
        batch: &mut [Entry],
        outage: Option<&Outage>,
        sync: bool,
    ) -> io::Result<()> {
        if let Some(text) = self.sink.ensure_current()? {
            tracing::warn!("audit log {text}");
            let note = Note::new(text);
            self.stats.set_notice(note.time, &note.text);
            self.notes.push(note);
        }
        lines.clear();
        let mut tail = self.sink.last().clone();
        for note in &self.notes {
            tail = append_record(lines, &tail, &note.body(), "");
        }
        for entry in batch.iter_mut() {
            tail = append_record(lines, &tail, &entry.body, if entry.refused { ANSWERED_UNAVAILABLE } else { "" });
            entry.seq = tail.seq;
        }
        let after = outage.filter(|_| !batch.is_empty()).map(|o| o.note(batch));
        if let Some(note) = &after {
            tail = append_record(lines, &tail, &note.body(), "");
        }
        if lines.is_empty() {
            return if sync { self.sink.sync() } else { Ok(()) };
        }
        self.sink.write(lines, sync)?;
        let records = self.notes.len() + batch.len() + usize::from(after.is_some());
        self.notes.clear();
        self.sink.set_last(tail.clone());
        self.stats.written.fetch_add(records as u64, Ordering::Relaxed);
        self.stats.landed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.seq.store(tail.seq, Ordering::Relaxed);
        if let Some(note) = after {
            tracing::warn!("{}", note.text);
            self.stats.set_notice(note.time, &note.text);
        }
        Ok(())
    }
}

/// Appends one record line for `body` (a JSON object) and `extra` (fields the writer adds, or
/// empty) after `prev`; returns the new tail.
fn append_record(out: &mut Vec<u8>, prev: &Tail, body: &str, extra: &str) -> Tail {
    let seq = prev.seq + 1;
    let start = out.len();
    let inner = body.trim().strip_prefix('{').and_then(|b| b.strip_suffix('}')).unwrap_or("").trim();
    let _ = write!(out, "{{\"v\":{RECORD_VERSION},\"seq\":{seq},");
    for fields in [inner, extra] {
        if !fields.is_empty() {
            out.extend_from_slice(fields.as_bytes());
            out.push(b',');
        }
    }
    let _ = write!(out, "\"prev_hash\":\"{}\"", prev.hash);
    let hash = chain_hash(&prev.hash, &out[start..]);
    let _ = writeln!(out, ",\"hash\":\"{hash}\"}}");
    Tail { seq, hash }
}

/// SHA-256 over `prev_hash` and the record up to its `prev_hash` field, closed with `}`.
fn chain_hash(prev: &str, unclosed: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(unclosed);
    h.update(b"}");
    hex::encode(h.finalize())
}

/// A record body as compact JSON.
pub fn body<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record)
        .unwrap_or_else(|e| format!("{{\"kind\":\"unserializable\",\"error\":{:?}}}", e.to_string()))
}

/// Who asked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Caller {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `grpc`, `envoy`, `cli`.
    pub via: &'static str,
}

/// The record of one decision.
#[derive(Serialize)]
pub struct DecisionRecord<'a> {
    pub kind: &'static str,
    pub time: DateTime<Utc>,
    pub decision_id: &'a str,
    pub request_id: Option<&'a str>,
    pub request: &'a Request,
    pub blueprint: Option<&'a str>,
    pub sponsor: Option<&'a str>,
    pub decision: crate::engine::Verdict,
    pub reasons: &'a [crate::engine::Reason],
    pub report_only: &'a [crate::engine::ReportOnly],
    pub report_only_decision: crate::engine::Verdict,
    pub errors: &'a [crate::engine::PolicyError],
    pub revision: &'a str,
    pub eval_us: u64,
    pub caller: &'a Caller,
}

impl<'a> DecisionRecord<'a> {
    /// The record of `decision`, with the agent's blueprint and sponsor from the snapshot
    /// that decided it.
    pub fn new(snap: &'a Snapshot, request: &'a Request, decision: &'a Decision, caller: &'a Caller) -> Self {
        let agent = snap.agent(&request.agent).map(|a| a.agent);
        DecisionRecord {
            kind: "decision",
            time: Utc::now(),
            decision_id: &decision.decision_id,
            request_id: decision.request_id.as_deref(),
            request,
            blueprint: agent.map(|a| a.blueprint.as_str()),
            sponsor: agent.map(|a| a.sponsor.as_str()),
            decision: decision.decision,
            reasons: &decision.reasons,
            report_only: &decision.report_only,
            report_only_decision: decision.report_only_decision,
            errors: &decision.errors,
            revision: &decision.revision,
            eval_us: decision.eval_us,
            caller,
        }
    }
}

/// The record of a reload (or the first load).
#[derive(Serialize)]
pub struct ReloadRecord<'a> {
    pub kind: &'static str,
    pub time: DateTime<Utc>,
    /// `loaded`, `swapped`, `unchanged`, `failed`.
    pub outcome: &'a str,
    pub from: Option<&'a str>,
    pub revision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    pub trigger: &'a str,
}

#[derive(Serialize)]
struct RecoveryRecord<'a> {
    kind: &'static str,
    time: DateTime<Utc>,
    note: &'a str,
}

/// What `verify` found in an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// True if the first record is the start of the chain (its prev_hash is the genesis).
    pub from_genesis: bool,
    /// The note of the first record if it is a `recovery` record: it may say why the chain
    /// does not start here (the file before it was deleted or moved).
    pub first_note: Option<String>,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct Broken {
    pub file: String,
    pub line: u64,
    pub message: String,
}

/// Checks the chain across `paths` (ordered by their first record's seq, so rotated files may
/// come in any order).
pub fn verify(paths: &[PathBuf]) -> Result<Verified, Broken> {
    let mut files: Vec<(u64, &PathBuf)> = Vec::with_capacity(paths.len());
    for p in paths {
        let broken = |message: String| Broken { file: p.display().to_string(), line: 0, message };
        let f = File::open(p).map_err(|e| broken(format!("cannot read: {e}")))?;
        let mut first = Vec::new();
        Read::take(BufReader::new(f), MAX_RECORD_BYTES)
            .read_until(b'\n', &mut first)
            .map_err(|e| broken(format!("cannot read: {e}")))?;
        let seq = serde_json::from_slice::<Value>(&first).ok().and_then(|v| v.get("seq").and_then(Value::as_u64));
        files.push((seq.unwrap_or(u64::MAX), p));
    }
    files.sort();

    let mut prev: Option<Tail> = None;
    let mut verified = Verified {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        last_hash: String::new(),
        from_genesis: false,
        first_note: None,
    };
    for (_, path) in files {
        let file = path.display().to_string();
        let mut reader = BufReader::new(File::open(path).map_err(|e| Broken {
            file: file.clone(),
            line: 0,
            message: e.to_string(),
        })?);
        let mut line = Vec::new();
        for line_no in 1u64.. {
            let broken = |message: String| Broken { file: file.clone(), line: line_no, message };
            line.clear();
            // A record is a few KiB: a longer "line" (a device, a hostile file) is never read whole.
            let n = Read::take(&mut reader, MAX_RECORD_BYTES + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| broken(format!("cannot read: {e}")))?;
            if n == 0 {
                break;
            }
            if line.len() as u64 > MAX_RECORD_BYTES {
                return Err(broken(format!("a line longer than {MAX_RECORD_BYTES} bytes is not a record")));
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            let tail = check_line(&line, prev.as_ref()).map_err(&broken)?;
            if prev.is_none() {
                let first: Value = serde_json::from_slice(&line).unwrap_or_default();
                verified.first_seq = tail.seq;
                verified.from_genesis = first.get("prev_hash").and_then(Value::as_str) == Some(GENESIS);
                verified.first_note = (first.get("kind").and_then(Value::as_str) == Some("recovery"))
                    .then(|| first.get("note").and_then(Value::as_str).map(str::to_string))
                    .flatten();
            }
            verified.records += 1;
            verified.last_seq = tail.seq;
            verified.last_hash = tail.hash.clone();
            prev = Some(tail);
        }
    }
    Ok(verified)
}

/// Longest record `verify` reads.
const MAX_RECORD_BYTES: u64 = 16 << 20;

const HASH_SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;

fn check_line(line: &[u8], prev: Option<&Tail>) -> Result<Tail, String> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| format!("not a whole JSON record (torn or edited): {e}"))?;
    let seq = v.get("seq").and_then(Value::as_u64).ok_or("the record has no `seq`")?;
    let hash = v.get("hash").and_then(Value::as_str).ok_or(format!("record seq {seq} has no `hash`"))?;
    let prev_hash = v.get("prev_hash").and_then(Value::as_str).ok_or(format!("record seq {seq} has no `prev_hash`"))?;
    if let Some(p) = prev {
        if seq != p.seq + 1 {
            return Err(format!(
                "record seq {seq} follows seq {}: records were removed or reordered (expected seq {})",
                p.seq,
                p.seq + 1
            ));
        }
        if prev_hash != p.hash {
            return Err(format!("record seq {seq}: its prev_hash is not the hash of record seq {}", p.seq));
        }
    }
    let suffix_ok = line.len() > HASH_SUFFIX_LEN && line.ends_with(format!(",\"hash\":\"{hash}\"}}").as_bytes());
    if !suffix_ok {
        return Err(format!("record seq {seq}: `hash` is not the last field: the record was rewritten"));
    }
    let unclosed = &line[..line.len() - HASH_SUFFIX_LEN];
    if chain_hash(prev_hash, unclosed) != hash {
        return Err(format!("record seq {seq} was edited: its hash does not match its content"));
    }
    Ok(Tail { seq, hash: hash.to_string() })
}

#[cfg(test)]
mod tests;
