//! Live signals: an overlay of agent, blueprint and sponsor state and agent risk, set without
//! reloading the bundle and consulted on every decision (the directory's values are the
//! defaults); the durable journal that makes them outlive restarts; and the barrier that lets
//! a signal be acknowledged only once no decision taken before it is still on its way.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::directory::RiskLevel;

/// Who set a live value, why, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A live value and its mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live<T> {
    pub value: T,
    #[serde(flatten)]
    pub mark: Mark,
}

/// What a signal asks for (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    DisableAgent,
    EnableAgent,
    DisableBlueprint,
    EnableBlueprint,
    SponsorInactive,
    SponsorActive,
    SetRisk,
    ConfirmCompromised,
    ConfirmSafe,
    DismissRisk,
    /// Removes a live value: the directory's value applies again.
    Clear,
}

impl SignalKind {
    pub const ALL: [SignalKind; 11] = [
        SignalKind::DisableAgent,
        SignalKind::EnableAgent,
        SignalKind::DisableBlueprint,
        SignalKind::EnableBlueprint,
        SignalKind::SponsorInactive,
        SignalKind::SponsorActive,
        SignalKind::SetRisk,
        SignalKind::ConfirmCompromised,
        SignalKind::ConfirmSafe,
        SignalKind::DismissRisk,
        SignalKind::Clear,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::DisableAgent => "disable_agent",
            SignalKind::EnableAgent => "enable_agent",
            SignalKind::DisableBlueprint => "disable_blueprint",
            SignalKind::EnableBlueprint => "enable_blueprint",
            SignalKind::SponsorInactive => "sponsor_inactive",
            SignalKind::SponsorActive => "sponsor_active",
            SignalKind::SetRisk => "set_risk",
            SignalKind::ConfirmCompromised => "confirm_compromised",
            SignalKind::ConfirmSafe => "confirm_safe",
            SignalKind::DismissRisk => "dismiss_risk",
            SignalKind::Clear => "clear",
        }
    }
}

impl FromStr for SignalKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SignalKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = SignalKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown signal `{}`: expected one of {}", crate::input::printable(s), all.join(", "))
        })
    }
}

/// The live field a signal sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    AgentEnabled,
    AgentRisk,
    BlueprintEnabled,
    SponsorActive,
}

impl Field {
    pub const ALL: [Field; 4] = [Field::AgentEnabled, Field::AgentRisk, Field::BlueprintEnabled, Field::SponsorActive];

    pub fn parse(s: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Field::AgentEnabled => "agent_enabled",
            Field::AgentRisk => "agent_risk",
            Field::BlueprintEnabled => "blueprint_enabled",
            Field::SponsorActive => "sponsor_active",
        }
    }
}

/// A value a signal sets: a flag, a risk level, or none (the live value is removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Flag(bool),
    Risk(RiskLevel),
    Cleared,
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Flag(b) => write!(f, "{b}"),
            Value::Risk(r) => write!(f, "{r}"),
            Value::Cleared => f.write_str("cleared"),
        }
    }
}

/// A signal as received, checked: the field it sets and the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub kind: SignalKind,
    pub field: Field,
    pub target: String,
    pub value: Value,
    pub reason: String,
    pub actor: String,
    pub at: DateTime<Utc>,
}

/// Longest reason a signal may carry, in bytes.
pub const MAX_REASON_LEN: usize = 4096;

/// A signal that cannot be taken: names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct SignalError {
    pub field: &'static str,
    pub message: String,
}

impl Signal {
    /// Checks a signal's fields: `risk` only for `set_risk`, a target always.
    pub fn new(kind: &str, target: &str, risk: &str, reason: &str, actor: &str) -> Result<Signal, SignalError> {
        let err = |field, message: String| SignalError { field, message };
        let kind = SignalKind::from_str(kind).map_err(|m| err("kind", m))?;
        check_text(target, reason, actor)?;
        let (field, value) = match kind {
            SignalKind::DisableAgent => (Field::AgentEnabled, Value::Flag(false)),
            SignalKind::EnableAgent => (Field::AgentEnabled, Value::Flag(true)),
            SignalKind::DisableBlueprint => (Field::BlueprintEnabled, Value::Flag(false)),
            SignalKind::EnableBlueprint => (Field::BlueprintEnabled, Value::Flag(true)),
            SignalKind::SponsorInactive => (Field::SponsorActive, Value::Flag(false)),
            SignalKind::SponsorActive => (Field::SponsorActive, Value::Flag(true)),
            SignalKind::ConfirmCompromised => (Field::AgentRisk, Value::Risk(RiskLevel::High)),
            SignalKind::ConfirmSafe | SignalKind::DismissRisk => (Field::AgentRisk, Value::Risk(RiskLevel::None)),
            SignalKind::SetRisk => {
                let level = RiskLevel::from_str(risk).map_err(|()| {
                    err(
                        "risk",
                        format!(
                            "unknown risk level `{}`: expected one of none, low, medium, high",
                            crate::input::printable(risk)
                        ),
                    )
                })?;
                (Field::AgentRisk, Value::Risk(level))
            }
            SignalKind::Clear => {
                return Err(err("kind", "`clear` names the live value to remove: see Signal::clear".into()));
            }
        };
        if kind != SignalKind::SetRisk && !risk.is_empty() {
            return Err(err("risk", format!("applies only to set_risk, not {}", kind.as_str())));
        }
        Ok(Signal {
            kind,
            field,
            target: target.to_string(),
            value,
            reason: reason.to_string(),
            actor: if actor.is_empty() { "unknown".into() } else { actor.to_string() },
            at: Utc::now(),
        })
    }

    /// A signal that removes the live value `field` of `target`.
    pub fn clear(field: Field, target: &str, reason: &str, actor: &str) -> Result<Signal, SignalError> {
        check_text(target, reason, actor)?;
        Ok(Signal {
            kind: SignalKind::Clear,
            field,
            target: target.to_string(),
            value: Value::Cleared,
            reason: reason.to_string(),
            actor: if actor.is_empty() { "unknown".into() } else { actor.to_string() },
            at: Utc::now(),
        })
    }

    fn mark(&self) -> Mark {
        Mark { by: self.actor.clone(), reason: self.reason.clone(), at: self.at }
    }
}

/// Checks a signal's target, reason and actor.
pub fn check_text(target: &str, reason: &str, actor: &str) -> Result<(), SignalError> {
    let err = |field, message: String| SignalError { field, message };
    if target.is_empty() {
        return Err(err("target", "is required: the agent, blueprint or sponsor id".into()));
    }
    // As for a request's ids: taken as sent, never trimmed, and no id has whitespace.
    if target.len() > crate::request::MAX_ID_LEN || target.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err(
            "target",
            format!("is not an id: at most {} bytes, no whitespace or control characters", crate::request::MAX_ID_LEN),
        ));
    }
    for (field, text, max) in [("reason", reason, MAX_REASON_LEN), ("actor", actor, crate::request::MAX_ID_LEN)] {
        if text.len() > max {
            return Err(err(field, format!("is longer than {max} bytes")));
        }
        // Reasons and actors are printed to terminals and logs: no escape sequences or line breaks.
        if text.chars().any(char::is_control) {
            return Err(err(field, "must not contain control characters (escapes, line breaks, tabs)".into()));
        }
    }
    Ok(())
}

/// A live value borrowed from the overlay (a shard read lock: keep it briefly).
pub struct LiveRef<'a, T>(dashmap::mapref::one::Ref<'a, String, Live<T>>);

impl<T> std::ops::Deref for LiveRef<'_, T> {
    type Target = Live<T>;
    fn deref(&self) -> &Live<T> {
        self.0.value()
    }
}

/// The overlay of live state. Lookups are lock-free on distinct keys (dashmap shards).
#[derive(Debug, Default)]
pub struct Overlay {
    agent_enabled: DashMap<String, Live<bool>>,
    agent_risk: DashMap<String, Live<RiskLevel>>,
    blueprint_enabled: DashMap<String, Live<bool>>,
    sponsor_active: DashMap<String, Live<bool>>,
    /// How many live values there are: when zero, a decision skips the lookups.
    count: AtomicU64,
    /// The barrier: decisions in flight counted per epoch (by its parity); `quiesce` moves the
    /// epoch on and waits for the old one's count to drop to zero, which `drained` announces
    /// while any barrier (`barriers`) waits.
    epoch: AtomicU64,
    in_flight: [AtomicU64; 2],
    barriers: AtomicU64,
    drained: Notify,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    pub fn agent_enabled(&self, id: &str) -> Option<LiveRef<'_, bool>> {
        self.get(&self.agent_enabled, id)
    }

    pub fn agent_risk(&self, id: &str) -> Option<LiveRef<'_, RiskLevel>> {
        self.get(&self.agent_risk, id)
    }

    pub fn blueprint_enabled(&self, id: &str) -> Option<LiveRef<'_, bool>> {
        self.get(&self.blueprint_enabled, id)
    }

    pub fn sponsor_active(&self, id: &str) -> Option<LiveRef<'_, bool>> {
        self.get(&self.sponsor_active, id)
    }

    /// A live value, read in place (no copy of its mark); skipped when nothing is live.
    fn get<'a, T>(&self, map: &'a DashMap<String, Live<T>>, id: &str) -> Option<LiveRef<'a, T>> {
        if !self.any() {
            return None;
        }
        map.get(id).map(LiveRef)
    }

    fn put<T>(&self, map: &DashMap<String, Live<T>>, id: &str, live: Live<T>) {
        if map.insert(id.to_string(), live).is_none() {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn remove<T>(&self, map: &DashMap<String, Live<T>>, id: &str) {
        if map.remove(id).is_some() {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// True if `field` of `id` has a live value.
    pub fn has(&self, field: Field, id: &str) -> bool {
        match field {
            Field::AgentEnabled => self.agent_enabled.contains_key(id),
            Field::AgentRisk => self.agent_risk.contains_key(id),
            Field::BlueprintEnabled => self.blueprint_enabled.contains_key(id),
            Field::SponsorActive => self.sponsor_active.contains_key(id),
        }
    }

    pub fn set_agent_enabled(&self, id: &str, live: Live<bool>) {
        self.put(&self.agent_enabled, id, live);
    }

    pub fn set_agent_risk(&self, id: &str, live: Live<RiskLevel>) {
        self.put(&self.agent_risk, id, live);
    }

    pub fn set_blueprint_enabled(&self, id: &str, live: Live<bool>) {
        self.put(&self.blueprint_enabled, id, live);
    }

    pub fn set_sponsor_active(&self, id: &str, live: Live<bool>) {
        self.put(&self.sponsor_active, id, live);
    }

    /// Applies a signal to the overlay.
    pub fn apply(&self, s: &Signal) {
        let flag = |v: Value| matches!(v, Value::Flag(true));
        match (s.field, s.value) {
            (Field::AgentEnabled, Value::Cleared) => self.remove(&self.agent_enabled, &s.target),
            (Field::AgentRisk, Value::Cleared) => self.remove(&self.agent_risk, &s.target),
            (Field::BlueprintEnabled, Value::Cleared) => self.remove(&self.blueprint_enabled, &s.target),
            (Field::SponsorActive, Value::Cleared) => self.remove(&self.sponsor_active, &s.target),
            (Field::AgentRisk, Value::Risk(level)) => {
                self.set_agent_risk(&s.target, Live { value: level, mark: s.mark() })
            }
            (Field::AgentEnabled, v) => self.set_agent_enabled(&s.target, Live { value: flag(v), mark: s.mark() }),
            (Field::BlueprintEnabled, v) => {
                self.set_blueprint_enabled(&s.target, Live { value: flag(v), mark: s.mark() })
            }
            (Field::SponsorActive, v) => self.set_sponsor_active(&s.target, Live { value: flag(v), mark: s.mark() }),
            // INVARIANT: Signal::new pairs AgentRisk with a risk value only.
            (Field::AgentRisk, Value::Flag(_)) => {}
        }
    }

    /// How many live values satisfy `keep` (nothing is copied).
    pub fn count(&self, keep: impl Fn(Field, &str) -> bool) -> usize {
        fn of<T>(map: &DashMap<String, Live<T>>, field: Field, keep: &impl Fn(Field, &str) -> bool) -> usize {
            map.iter().filter(|e| keep(field, e.key())).count()
        }
        of(&self.agent_enabled, Field::AgentEnabled, &keep)
            + of(&self.agent_risk, Field::AgentRisk, &keep)
            + of(&self.blueprint_enabled, Field::BlueprintEnabled, &keep)
            + of(&self.sponsor_active, Field::SponsorActive, &keep)
    }

    /// Every live value, as the signals that set it (sorted by field, then target).
    pub fn entries(&self) -> Vec<(Field, String, Value, Mark)> {
        self.page(None, usize::MAX).0
    }

    /// The live values after `after` in (field, target) order, at most `size`, and whether
    /// more follow. Only the keys are gathered for the sort; marks (with reasons of up to
    /// 4 KiB) are copied for the page alone.
    pub fn page(&self, after: Option<(Field, &str)>, size: usize) -> (Vec<(Field, String, Value, Mark)>, bool) {
        fn keys<T>(map: &DashMap<String, Live<T>>, field: Field, out: &mut Vec<(Field, String)>) {
            out.extend(map.iter().map(|e| (field, e.key().clone())));
        }
        let mut all = Vec::with_capacity(self.len());
        keys(&self.agent_enabled, Field::AgentEnabled, &mut all);
        keys(&self.agent_risk, Field::AgentRisk, &mut all);
        keys(&self.blueprint_enabled, Field::BlueprintEnabled, &mut all);
        keys(&self.sponsor_active, Field::SponsorActive, &mut all);
        all.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
        let start =
            after.map_or(0, |(f, t)| all.partition_point(|(af, at)| (af.as_str(), at.as_str()) <= (f.as_str(), t)));
        let mut page = Vec::new();
        let mut rest = all.into_iter().skip(start);
        for (field, target) in rest.by_ref() {
            if page.len() == size {
                return (page, true);
            }
            // A value removed since the keys were gathered is simply not on the page.
            let found = match field {
                Field::AgentEnabled => self.agent_enabled.get(&target).map(|l| (Value::Flag(l.value), l.mark.clone())),
                Field::AgentRisk => self.agent_risk.get(&target).map(|l| (Value::Risk(l.value), l.mark.clone())),
                Field::BlueprintEnabled => {
                    self.blueprint_enabled.get(&target).map(|l| (Value::Flag(l.value), l.mark.clone()))
                }
                Field::SponsorActive => {
                    self.sponsor_active.get(&target).map(|l| (Value::Flag(l.value), l.mark.clone()))
                }
            };
            if let Some((value, mark)) = found {
                page.push((field, target, value, mark));
            }
        }
        (page, false)
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks a decision in flight until the guard drops (after its answer is sent).
    pub fn enter(&self) -> InFlight<'_> {
        let slot = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.in_flight[slot].fetch_add(1, Ordering::SeqCst);
        InFlight { overlay: self, slot }
    }

    /// Waits until every decision that may have read the overlay before now has been answered.
    /// A request entering after this call reads the overlay as it is now.
    pub async fn quiesce(&self) {
        let _waiting = Barrier::enter(&self.barriers);
        let old = (self.epoch.fetch_add(1, Ordering::SeqCst) & 1) as usize;
        loop {
            // Registered before the count is read, so that a drop to zero in between still wakes it.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.in_flight[old].load(Ordering::SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }
}

/// A barrier waiting in `Overlay::quiesce`, counted until it ends (or is given up).
struct Barrier<'a>(&'a AtomicU64);

impl<'a> Barrier<'a> {
    fn enter(barriers: &'a AtomicU64) -> Barrier<'a> {
        barriers.fetch_add(1, Ordering::SeqCst);
        Barrier(barriers)
    }
}

impl Drop for Barrier<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A decision in flight (see `Overlay::enter`).
pub struct InFlight<'a> {
    overlay: &'a Overlay,
    slot: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let overlay = self.overlay;
        let was = overlay.in_flight[self.slot].fetch_sub(1, Ordering::SeqCst);
        // A count dropping to zero wakes the barriers, if any waits: with none, a decision
        // costs no wake-up. INVARIANT: a barrier is counted before it reads the count, so if
        // it read the count before this decrement, this read sees it counted.
        if was == 1 && overlay.barriers.load(Ordering::SeqCst) > 0 {
            overlay.drained.notify_waiters();
        }
    }
}

/// A journal line: a signal and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    #[serde(flatten)]
    signal: Signal,
}

/// What replaying the journal found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub applied: u64,
    /// Lines that could not be read (a torn last line after a crash), with their line number.
    pub skipped: Vec<(u64, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("signal journal `{path}`: {source}")]
pub struct JournalError {
    pub path: String,
    pub source: io::Error,
}

/// The open journal file: its sequence, and its length after the last whole, synced line.
struct Tail {
    file: File,
    seq: u64,
    /// Appends go here. A failed append is cut back to it before anything else is written,
    /// so a torn fragment never shares a line with a signal that is acknowledged later.
    len: u64,
    /// A failed append could not be cut back yet: no signal is taken until it is.
    torn: bool,
}

/// The durable journal: a signal is appended and fsynced before it is acknowledged.
pub struct Journal {
    path: PathBuf,
    file: Mutex<Tail>,
    /// Compact when the journal holds this many more lines than live values.
    compact_after: u64,
    lines: AtomicU64,
    notice: Mutex<Option<String>>,
}

pub const JOURNAL_FILE: &str = "signals.jsonl";

/// Longest journal line read back: a signal's line is a few KiB at most.
const MAX_LINE: u64 = 64 * 1024;

impl Journal {
    /// Opens `DIR/signals.jsonl` and replays it into `overlay`. A torn or unreadable line is
    /// reported and skipped, never fatal.
    pub fn open(dir: &Path, overlay: &Overlay) -> Result<(Journal, Replayed), JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let err = |source| JournalError { path: path.display().to_string(), source };
        fs::create_dir_all(dir).map_err(err)?;
        let mut replayed = Replayed::default();
        let mut last_seq = 0;
        let mut lines = 0;
        let mut torn_tail = None;
        let exists = match fs::metadata(&path) {
            Ok(m) if m.is_file() => true,
            Ok(_) => return Err(err(io::Error::other("not a regular file"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(err(e)),
        };
        if exists {
            let f = File::open(&path).map_err(err)?;
            let mut offset = 0u64;
            let mut reader = BufReader::new(f);
            let mut line = Vec::new();
            let mut i = 0u64;
            while Read::by_ref(&mut reader).take(MAX_LINE + 1).read_until(b'\n', &mut line).map_err(err)? > 0 {
                i += 1;
                let start = offset;
                offset += line.len() as u64;
                if line.len() as u64 > MAX_LINE {
                    // No signal is this long: skip to the end of the line, reading it in pieces.
                    while !line.ends_with(b"\n") {
                        line.clear();
                        if Read::by_ref(&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).map_err(err)? == 0 {
                            break;
                        }
                        offset += line.len() as u64;
                    }
                    lines += 1;
                    replayed.skipped.push((i, format!("the line is longer than {MAX_LINE} bytes")));
                    if !line.ends_with(b"\n") {
                        torn_tail = Some(start);
                    }
                    line.clear();
                    continue;
                }
                // Only a last line without its newline is torn (a write a crash cut); a whole
                // line that does not parse is skipped but kept.
                let whole = line.ends_with(b"\n");
                lines += 1;
                match serde_json::from_slice::<Entry>(&line) {
                    Ok(entry) if whole => {
                        overlay.apply(&entry.signal);
                        last_seq = last_seq.max(entry.seq);
                        replayed.applied += 1;
                    }
                    Ok(_) => {
                        replayed.skipped.push((i, "the line has no newline: its write was cut".into()));
                        torn_tail = Some(start);
                    }
                    Err(e) => match glued_entry(&line).filter(|_| whole) {
                        // A journal written before failed appends were cut back can hold a
                        // torn fragment with an acknowledged signal glued after it.
                        Some(entry) => {
                            overlay.apply(&entry.signal);
                            last_seq = last_seq.max(entry.seq);
                            replayed.applied += 1;
                            replayed
                                .skipped
                                .push((i, format!("a torn fragment before signal #{} was skipped", entry.seq)));
                        }
                        None => {
                            replayed.skipped.push((i, e.to_string()));
                            if !whole {
                                torn_tail = Some(start);
                            }
                        }
                    },
                }
                line.clear();
            }
            // A torn last line is cut so that the next signal starts on a line of its own.
            if let Some(at) = torn_tail {
                let f = OpenOptions::new().write(true).open(&path).map_err(err)?;
                f.set_len(at).map_err(err)?;
                f.sync_all().map_err(err)?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let tail = Tail { file, seq: last_seq, len, torn: false };
        let journal = Journal {
            path,
            file: Mutex::new(tail),
            compact_after: 10_000,
            lines: AtomicU64::new(lines),
            notice: Mutex::new(None),
        };
        Ok((journal, replayed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compacts once the journal holds `lines` more lines than live values (default 10,000).
    pub fn set_compact_after(&mut self, lines: u64) {
        self.compact_after = lines.max(1);
    }

    /// Appends a signal and fsyncs it; returns its sequence number. On failure (a full disk)
    /// the journal is cut back to its last whole line, so that a restart replays exactly the
    /// signals that were acknowledged.
    ///
    /// If the journal at the path is no longer the file being appended to (deleted, moved or
    /// replaced), it is first written anew from `overlay`, the live state it held: a signal is
    /// acknowledged only once it is in the file that a restart will read.
    pub fn append(&self, signal: &Signal, overlay: &Overlay) -> Result<u64, JournalError> {
        let err = |source| JournalError { path: self.path.display().to_string(), source };
        let mut guard = self.file.lock().map_err(|_| err(io::Error::other("journal lock poisoned")))?;
        let tail = &mut *guard;
        if let Some(what) = self.gone(&tail.file) {
            tracing::error!(journal = %self.path.display(), "the signal journal {what}: writing it anew from the live state");
            self.rewrite(tail, overlay).map_err(err)?;
            if let Ok(mut notice) = self.notice.lock() {
                *notice = Some(format!(
                    "{}: the signal journal {what}; it was written anew from the live state",
                    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
        }
        if tail.torn {
            cut_back(tail).map_err(err)?;
        }
        let entry = Entry { seq: tail.seq + 1, signal: signal.clone() };
        let mut line = serde_json::to_vec(&entry).map_err(|e| err(io::Error::other(e)))?;
        line.push(b'\n');
        if let Err(e) = tail.file.write_all(&line).and_then(|()| tail.file.sync_data()) {
            tail.torn = true;
            if let Err(cut) = cut_back(tail) {
                tracing::error!(journal = %self.path.display(), error = %cut, "cannot cut a failed append back; no signal is taken until it can");
            }
            return Err(err(e));
        }
        tail.len += line.len() as u64;
        tail.seq += 1;
        self.lines.fetch_add(1, Ordering::Relaxed);
        Ok(tail.seq)
    }

    /// Rewrites the journal as one signal per live value, if it has grown well past that.
    pub fn compact_if_needed(&self, overlay: &Overlay) -> Result<bool, JournalError> {
        let live = overlay.len() as u64;
        if self.lines.load(Ordering::Relaxed) < self.compact_after + live {
            return Ok(false);
        }
        self.compact(overlay)?;
        Ok(true)
    }

    /// Rewrites the journal from the overlay: written aside, fsynced, renamed over.
    pub fn compact(&self, overlay: &Overlay) -> Result<(), JournalError> {
        let err = |source| JournalError { path: self.path.display().to_string(), source };
        let mut guard = self.file.lock().map_err(|_| err(io::Error::other("journal lock poisoned")))?;
        self.rewrite(&mut guard, overlay).map_err(err)
    }

    /// What happened to the journal file, if the path no longer leads to `file`.
    fn gone(&self, file: &File) -> Option<&'static str> {
        use std::os::unix::fs::MetadataExt;
        let open = file.metadata().ok()?;
        match fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (open.dev(), open.ino()) => None,
            Ok(_) => Some("was replaced by another file"),
            Err(_) => Some("was deleted or moved"),
        }
    }

    /// The last thing that happened to the journal file itself, if anything did.
    pub fn notice(&self) -> Option<String> {
        self.notice.lock().ok().and_then(|n| n.clone())
    }

    /// Writes the journal anew from the overlay: aside, fsynced, renamed over the path.
    fn rewrite(&self, tail: &mut Tail, overlay: &Overlay) -> io::Result<()> {
        let tmp = self.path.with_extension("jsonl.compact");
        let mut out = File::create(&tmp)?;
        let entries = overlay.entries();
        // The sequence moves on only once the compacted journal replaces the old one.
        let mut seq = tail.seq;
        for (field, target, value, mark) in &entries {
            let signal = Signal {
                kind: kind_for(*field, *value),
                field: *field,
                target: target.clone(),
                value: *value,
                reason: mark.reason.clone(),
                actor: mark.by.clone(),
                at: mark.at,
            };
            seq += 1;
            let mut line = serde_json::to_vec(&Entry { seq, signal }).map_err(io::Error::other)?;
            line.push(b'\n');
            out.write_all(&line)?;
        }
        out.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        let file = OpenOptions::new().append(true).open(&self.path)?;
        let len = file.metadata()?.len();
        *tail = Tail { file, seq, len, torn: false };
        self.lines.store(entries.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The whole entry at the end of a line that starts with a torn fragment, if there is one.
fn glued_entry(line: &[u8]) -> Option<Entry> {
    const START: &[u8] = b"{\"seq\":";
    (1..line.len())
        .filter(|&i| line[i..].starts_with(START))
        .find_map(|i| serde_json::from_slice::<Entry>(&line[i..]).ok())
}

/// Cuts the journal back to its last whole line and makes that durable.
fn cut_back(tail: &mut Tail) -> io::Result<()> {
    tail.file.set_len(tail.len)?;
    tail.file.sync_all()?;
    tail.torn = false;
    Ok(())
}

/// The signal kind that sets `field` to `value` (used when compacting).
fn kind_for(field: Field, value: Value) -> SignalKind {
    match (field, value) {
        (Field::AgentEnabled, Value::Flag(true)) => SignalKind::EnableAgent,
        (Field::AgentEnabled, _) => SignalKind::DisableAgent,
        (Field::BlueprintEnabled, Value::Flag(true)) => SignalKind::EnableBlueprint,
        (Field::BlueprintEnabled, _) => SignalKind::DisableBlueprint,
        (Field::SponsorActive, Value::Flag(true)) => SignalKind::SponsorActive,
        (Field::SponsorActive, _) => SignalKind::SponsorInactive,
        (Field::AgentRisk, _) => SignalKind::SetRisk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(kind: &str, target: &str, risk: &str) -> Signal {
        Signal::new(kind, target, risk, "test", "admin").unwrap()
    }

    #[test]
    fn signals_check_their_fields() {
        let e = |k: &str, t: &str, r: &str| Signal::new(k, t, r, "", "").unwrap_err().to_string();
        assert!(e("disable", "a", "").starts_with("field `kind`: unknown signal `disable`: expected one of"));
        assert!(e("disable_agent", " ", "").starts_with("field `target`: is not an id"));
        assert_eq!(
            e("set_risk", "a", "severe"),
            "field `risk`: unknown risk level `severe`: expected one of none, low, medium, high"
        );
        assert_eq!(e("disable_agent", "a", "high"), "field `risk`: applies only to set_risk, not disable_agent");
        assert!(e("disable_agent", " a", "").starts_with("field `target`: is not an id"));
        let control = |reason: &str, actor: &str| Signal::new("disable_agent", "a", "", reason, actor).unwrap_err();
        assert_eq!(control("leak\x1b[2J", "").field, "reason");
        assert_eq!(control("two\nlines", "").field, "reason");
        assert_eq!(control("", "bob\r").field, "actor");
        assert_eq!(control(&"x".repeat(MAX_REASON_LEN + 1), "").field, "reason");
        let s = signal("confirm_compromised", "a", "");
        assert_eq!((s.field, s.value), (Field::AgentRisk, Value::Risk(RiskLevel::High)));
    }

    #[test]
    fn the_journal_replays_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (journal, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(replayed, Replayed::default());
        assert_eq!(journal.append(&signal("disable_agent", "ag-1", ""), &Overlay::new()).unwrap(), 1);
        assert_eq!(journal.append(&signal("set_risk", "ag-2", "medium"), &Overlay::new()).unwrap(), 2);
        assert_eq!(journal.append(&signal("disable_blueprint", "bp-x", ""), &Overlay::new()).unwrap(), 3);
        drop(journal);
        // A crash cut the last write.
        let mut f = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        f.write_all(b"{\"seq\":4,\"kind\":\"enable_ag").unwrap();
        drop(f);

        let overlay = Overlay::new();
        let (journal, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(replayed.applied, 3);
        assert_eq!(replayed.skipped.len(), 1);
        assert_eq!(replayed.skipped[0].0, 4);
        assert_eq!(overlay.agent_enabled("ag-1").map(|l| l.value), Some(false));
        assert_eq!(overlay.agent_risk("ag-2").map(|l| l.value), Some(RiskLevel::Medium));
        assert_eq!(overlay.blueprint_enabled("bp-x").map(|l| l.value), Some(false));
        // The next signal goes on a line of its own and replays.
        assert_eq!(journal.append(&signal("enable_agent", "ag-1", ""), &Overlay::new()).unwrap(), 4);
        drop(journal);
        let overlay = Overlay::new();
        let (_, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!((replayed.applied, replayed.skipped.len()), (4, 0));
        assert_eq!(overlay.agent_enabled("ag-1").map(|l| l.value), Some(true));
    }

    #[test]
    fn a_signal_glued_to_a_torn_fragment_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (journal, _) = Journal::open(dir.path(), &overlay).unwrap();
        journal.append(&signal("set_risk", "ag-2", "low"), &Overlay::new()).unwrap();
        drop(journal);
        // What a failed append left behind before appends were cut back.
        let mut f = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        let entry = Entry { seq: 2, signal: signal("disable_agent", "ag-1", "") };
        let mut line = b"{\"seq\":2,\"kind\":\"disa".to_vec();
        line.extend(serde_json::to_vec(&entry).unwrap());
        line.push(b'\n');
        f.write_all(&line).unwrap();
        drop(f);
        let overlay = Overlay::new();
        let (journal, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(replayed.applied, 2);
        assert_eq!(overlay.agent_enabled("ag-1").map(|l| l.value), Some(false));
        assert_eq!(journal.append(&signal("enable_agent", "ag-3", ""), &Overlay::new()).unwrap(), 3);
    }

    #[test]
    fn a_hostile_journal_is_an_error_or_skipped_never_read_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        // A link to a device would be read for ever.
        std::os::unix::fs::symlink("/dev/zero", dir.path().join(JOURNAL_FILE)).unwrap();
        let e = Journal::open(dir.path(), &Overlay::new()).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
        // An overlong line between two signals is skipped; both signals replay.
        let (journal, _) = Journal::open(dir.path(), &Overlay::new()).unwrap();
        journal.append(&signal("disable_agent", "ag-1", ""), &Overlay::new()).unwrap();
        drop(journal);
        let mut f = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        f.write_all(&vec![b'x'; 300_000]).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        let (journal, _) = Journal::open(dir.path(), &Overlay::new()).unwrap();
        journal.append(&signal("disable_agent", "ag-2", ""), &Overlay::new()).unwrap();
        drop(journal);
        let overlay = Overlay::new();
        let (_, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(replayed.applied, 2);
        assert_eq!(replayed.skipped, vec![(2, "the line is longer than 65536 bytes".to_string())]);
        assert_eq!(overlay.agent_enabled("ag-2").map(|l| l.value), Some(false));
    }

    #[test]
    fn a_deleted_or_moved_journal_is_written_anew_before_the_next_signal() {
        for moved in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let overlay = Overlay::new();
            let (journal, _) = Journal::open(dir.path(), &overlay).unwrap();
            let s = signal("disable_agent", "ag-1", "");
            journal.append(&s, &overlay).unwrap();
            overlay.apply(&s);
            let path = dir.path().join(JOURNAL_FILE);
            if moved {
                fs::rename(&path, dir.path().join("elsewhere.jsonl")).unwrap();
            } else {
                fs::remove_file(&path).unwrap();
            }
            let s = signal("disable_agent", "ag-2", "");
            journal.append(&s, &overlay).unwrap();
            overlay.apply(&s);
            assert!(journal.notice().unwrap().contains("deleted or moved"), "{:?}", journal.notice());
            drop(journal);
            // A restart replays both: the one from before the loss and the one after.
            let replayed = Overlay::new();
            Journal::open(dir.path(), &replayed).unwrap();
            assert_eq!(replayed.entries(), overlay.entries());
            assert_eq!(replayed.len(), 2);
        }
    }

    #[test]
    fn pages_follow_each_other_in_order() {
        let overlay = Overlay::new();
        for i in 0..7 {
            overlay.apply(&signal("disable_agent", &format!("ag-{i}"), ""));
        }
        overlay.apply(&signal("disable_blueprint", "bp-1", ""));
        let (first, more) = overlay.page(None, 5);
        assert!(more);
        let last = first.last().map(|(f, t, ..)| (*f, t.clone())).unwrap();
        let (second, more) = overlay.page(Some((last.0, &last.1)), 5);
        assert!(!more);
        let seen: Vec<_> = first.iter().chain(&second).map(|(f, t, ..)| (f.as_str(), t.clone())).collect();
        let all: Vec<_> = overlay.entries().into_iter().map(|(f, t, ..)| (f.as_str(), t)).collect();
        assert_eq!((seen.len(), &seen), (8, &all));
    }

    #[test]
    fn compaction_keeps_the_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (mut journal, _) = Journal::open(dir.path(), &overlay).unwrap();
        journal.compact_after = 10;
        for i in 0..30 {
            let s = signal(if i % 2 == 0 { "disable_agent" } else { "enable_agent" }, &format!("ag-{}", i % 3), "");
            journal.append(&s, &overlay).unwrap();
            overlay.apply(&s);
            journal.compact_if_needed(&overlay).unwrap();
        }
        let lines = fs::read_to_string(journal.path()).unwrap().lines().count();
        assert!(lines < 15, "{lines} lines");
        let replayed = Overlay::new();
        Journal::open(dir.path(), &replayed).unwrap();
        assert_eq!(replayed.entries(), overlay.entries());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quiesce_is_woken_however_decisions_interleave() {
        use std::sync::atomic::AtomicBool;
        let overlay = std::sync::Arc::new(Overlay::new());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let decider = std::thread::spawn({
            let (overlay, stop) = (overlay.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let _in_flight = overlay.enter();
                    std::hint::spin_loop();
                }
            }
        });
        for _ in 0..2_000 {
            let limit = std::time::Duration::from_secs(10);
            tokio::time::timeout(limit, overlay.quiesce()).await.expect("a barrier was never woken");
        }
        stop.store(true, Ordering::Relaxed);
        decider.join().unwrap();
        assert_eq!(overlay.barriers.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn quiesce_waits_for_decisions_in_flight() {
        let overlay = std::sync::Arc::new(Overlay::new());
        let guard_holder = overlay.clone();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (entered, is_entered) = tokio::sync::oneshot::channel::<()>();
        let decision = tokio::spawn(async move {
            let _in_flight = guard_holder.enter();
            let _ = entered.send(());
            let _ = released.await;
        });
        is_entered.await.unwrap();
        let quiesced = tokio::spawn({
            let overlay = overlay.clone();
            async move { overlay.quiesce().await }
        });
        while overlay.epoch.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!quiesced.is_finished());
        // A decision entering now does not hold the barrier back.
        let _later = overlay.enter();
        release.send(()).unwrap();
        decision.await.unwrap();
        quiesced.await.unwrap();
    }
}
