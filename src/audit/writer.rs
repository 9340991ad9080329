//! The writer: one thread owns the file. It gathers what is queued into one write (group
//! commit) and one fsync, rotates the file by size, notices a file deleted, moved or truncated
//! under it and continues the chain in a new one, and retries failed writes until they land,
//! saying so in the chain (`recovery` records) rather than tearing it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::chain::{Tail, append_record, read_tail};
use super::{Ack, AuditError, Config, Durability, Job, OnFull, Refused, Stats, Target};

/// How long the writer waits before it retries a failed write.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The most record bytes one group commit gathers (an outage under `deny` gathers everything).
const BATCH_BYTES: usize = 4 << 20;

/// Buffered mode: after a write, the writer lets records gather this long before the next.
/// Nobody waits on a buffered write, and a write per record would cost a wake-up of this
/// thread per record; a busy log is written about a thousand times a second instead.
const LINGER: Duration = Duration::from_millis(1);

/// The field the writer adds to a record whose caller was answered deny (audit_unavailable)
/// because the record could not be written in time.
const ANSWERED_UNAVAILABLE: &str = "\"answered\":\"audit_unavailable\"";

/// Opens the log (continuing its chain, cutting a torn tail and saying so) and starts the
/// writer thread; returns the queue's sending end.
pub(super) fn start(config: Arc<Config>, stats: Arc<Stats>) -> Result<mpsc::Sender<Job>, AuditError> {
    let describe = || config.target.describe();
    let mut sink = match &config.target {
        Target::File(path) => Sink::open(path, config.max_bytes)?,
        // `Off` starts no writer (see `Audit::start`).
        Target::Stdout | Target::Off => Sink::Stdout { last: Tail::genesis() },
    };
    // A torn tail was cut: say so in the chain itself, before anything else is written.
    if let Some(note) = sink.recovered() {
        let note = Note::new(note);
        let mut line = Vec::new();
        let tail = append_record(&mut line, sink.last(), &note.body(), "");
        sink.write(&line, true).map_err(|e| AuditError::Io { path: describe(), source: e })?;
        sink.set_last(tail);
        stats.written.fetch_add(1, Ordering::Relaxed);
        stats.set_notice(note.time, &note.text);
    }
    stats.seq.store(sink.last().seq, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let writer = Writer { sink, rx, stats, config: config.clone(), notes: Vec::new() };
    std::thread::Builder::new()
        .name("agentca-audit".into())
        .spawn(move || writer.run())
        .map_err(|e| AuditError::Io { path: describe(), source: e })?;
    Ok(tx)
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
        let last = last.unwrap_or_else(Tail::genesis);
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
            // Cannot tell (its folder was replaced by a file, or cannot be searched): records
            // might be going to a file nobody will find. Fail loudly, as a write error does,
            // rather than write on unseen.
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot check that `{}` is still the audit file: {e}", path.display()),
                ));
            }
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
        recovery_body(self.time, &self.text)
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
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        loop {
            // What is written but not fsynced is fsynced within the flush interval, whether or
            // not another record comes: wait for one until then.
            let deadline = unsynced.then(|| last_sync + self.config.flush_interval);
            let Some(job) = self.next_job(deadline, &waker) else { break };
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
            let mut started = Instant::now();
            while let Err(e) = self.attempt(&mut lines, &mut batch, outage.as_ref(), sync_now) {
                self.stats.failed_writes.fetch_add(1, Ordering::Relaxed);
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
                self.stats.set_failing(true);
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
                started = Instant::now();
            }
            if (!batch.is_empty() || sync_now)
                && let Some(hook) = self.stats.on_write.0.get()
            {
                hook(started.elapsed());
            }
            if self.stats.set_failing(false) {
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
            let wrote = batch.len();
            for entry in batch.drain(..) {
                if let Some(ack) = entry.ack {
                    let _ = ack.send(Ok(entry.seq));
                }
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            // A writer that falls behind (a batch of half the queue) writes again at once.
            if wrote > 0 && wrote < self.config.queue / 2 && self.config.durability == Durability::Buffered {
                std::thread::sleep(LINGER);
            }
        }
        // Every sender is gone: make what was written durable.
        let _ = self.sink.sync();
    }

    /// The next job: waits for one, until `deadline` if given (then a `Tick`). None once every
    /// sender is gone.
    fn next_job(&mut self, deadline: Option<Instant>, waker: &Waker) -> Option<Job> {
        let Some(deadline) = deadline else { return self.rx.blocking_recv() };
        // As `blocking_recv`, with a timeout: poll, and park until woken or the deadline.
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(job) = self.rx.poll_recv(&mut cx) {
                return job;
            }
            let now = Instant::now();
            if now >= deadline {
                return Some(Job::Tick);
            }
            // A wake-up that comes early (or is left over from an earlier poll) only polls again.
            std::thread::park_timeout(deadline - now);
        }
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

/// Wakes the writer thread parked in `Writer::next_job`.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// The body of a `recovery` record: something the chain itself must say.
#[derive(Serialize)]
struct RecoveryRecord<'a> {
    kind: &'static str,
    time: DateTime<Utc>,
    note: &'a str,
}

/// The body of the `recovery` record of `note`, written at `time`.
pub(crate) fn recovery_body(time: DateTime<Utc>, note: &str) -> String {
    let record = RecoveryRecord { kind: "recovery", time, note };
    serde_json::to_string(&record)
        .unwrap_or_else(|e| format!("{{\"kind\":\"unserializable\",\"error\":{:?}}}", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> (mpsc::Sender<Job>, Writer) {
        let (tx, rx) = mpsc::channel(4);
        let sink = Sink::Stdout { last: Tail::genesis() };
        let config = Arc::new(Config::new(Target::Stdout));
        (tx, Writer { sink, rx, stats: Arc::new(Stats::new()), config, notes: Vec::new() })
    }

    #[test]
    fn the_writer_waits_for_a_job_until_its_deadline_and_no_longer() {
        let (tx, mut writer) = writer();
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let started = Instant::now();
        let job = writer.next_job(Some(started + Duration::from_millis(30)), &waker);
        assert!(matches!(job, Some(Job::Tick)));
        assert!(started.elapsed() >= Duration::from_millis(30));

        // A job sent from another thread wakes it long before its deadline.
        let far = Instant::now() + Duration::from_secs(60);
        let sender = std::thread::spawn({
            let tx = tx.clone();
            move || {
                let (done, _) = oneshot::channel();
                tx.blocking_send(Job::Flush(done)).is_ok()
            }
        });
        assert!(matches!(writer.next_job(Some(far), &waker), Some(Job::Flush(_))));
        assert!(sender.join().unwrap());
        // Once every sender is gone, it ends.
        drop(tx);
        assert!(writer.next_job(Some(far), &waker).is_none());
        assert!(Instant::now() < far);
    }
}
