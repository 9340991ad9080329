//! The audit log: hash-chained JSON records, appended by one writer thread (group commit),
//! rotated by size, and verified by `agentca audit verify`. This file holds the handle that
//! requests submit to, its bounded queue and the configuration; `writer` owns the file and
//! `chain` the record layout. The log knows record bodies (JSON objects), not what they mean.
//!
//! Nothing is dropped: a full queue waits or refuses (the caller then denies), as configured.

mod chain;
mod writer;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot, watch};

pub use chain::{Broken, GENESIS, RECORD_VERSION, Verified, verify};
#[cfg(test)]
pub(crate) use writer::recovery_body;
pub use writer::rotated_files;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Counters of the sink, shared by the handles and the writer.
#[derive(Debug)]
struct Stats {
    written: AtomicU64,
    waited: AtomicU64,
    refused: AtomicU64,
    seq: AtomicU64,
    /// Records accepted into the queue, and those of them written: the difference is pending.
    accepted: AtomicU64,
    landed: AtomicU64,
    /// Write attempts that failed (each is retried until it succeeds).
    failed_writes: AtomicU64,
    failing: AtomicBool,
    /// True while writes succeed; changed only when `failing` flips.
    healthy: watch::Sender<bool>,
    error: Mutex<Option<String>>,
    /// The last `recovery` note (file deleted or moved, writes that failed), with its time.
    notice: Mutex<Option<String>>,
    /// Told how long each successful write (and its fsync) took.
    on_write: WriteHook,
}

#[derive(Default)]
struct WriteHook(OnceLock<OnWrite>);

impl std::fmt::Debug for WriteHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "WriteHook(set)" } else { "WriteHook(none)" })
    }
}

/// Told, on the writer thread, how long one write of a group of records (and its fsync, if
/// any) took: it must return at once.
pub type OnWrite = Box<dyn Fn(Duration) + Send + Sync>;

impl Stats {
    fn new() -> Stats {
        Stats {
            written: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            landed: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            healthy: watch::Sender::new(true),
            error: Mutex::new(None),
            notice: Mutex::new(None),
            on_write: WriteHook::default(),
        }
    }

    /// Records whether writes fail; returns whether they failed before. Watchers of the
    /// health hear of a flip only, not of every retry.
    fn set_failing(&self, failing: bool) -> bool {
        let was = self.failing.swap(failing, Ordering::Relaxed);
        if was != failing {
            self.healthy.send_replace(!failing);
        }
        was
    }

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
    /// Write attempts that failed (each retried until it succeeded).
    pub failed_writes: u64,
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
    /// Made by the writer itself when the flush interval passes with nothing queued: fsync
    /// what is written (buffered and written modes).
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
        let stats = Arc::new(Stats::new());
        let config = Arc::new(config);
        let bytes = Arc::new(Semaphore::new(config.queue_bytes.clamp(1, Semaphore::MAX_PERMITS)));
        if config.target == Target::Off {
            return Ok(Audit { tx: None, bytes, stats, config });
        }
        let tx = writer::start(config.clone(), stats.clone())?;
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
        let refusable = self.config.on_full == OnFull::Deny;
        tx.blocking_send(Job::Record { body, ack, room, refusable }).map_err(|_| Refused::Closed)?;
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
            failed_writes: self.stats.failed_writes.load(Ordering::Relaxed),
            error: self.stats.error.lock().ok().and_then(|e| e.clone()),
            notice: self.stats.notice.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// Has `hook` told how long each write takes from now on (the first hook set stays).
    pub fn on_write(&self, hook: OnWrite) {
        let _ = self.stats.on_write.0.set(hook);
    }

    /// False while writes fail: with `on_full = deny`, the service reports NOT_SERVING.
    pub fn healthy(&self) -> bool {
        !self.stats.failing.load(Ordering::Relaxed)
    }

    /// `healthy`, as it changes: the writer sends when writes start or stop failing.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.stats.healthy.subscribe()
    }
}

#[cfg(test)]
mod tests;
