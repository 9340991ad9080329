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
use crate::input::{UnknownName, parse_name};

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
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_name("signal", s, &SignalKind::ALL, SignalKind::as_str)
    }
}

impl SignalKind {
    /// Whether this verb makes `change` (a journal line whose kind and change disagree is
    /// not replayed).
    fn makes(self, change: Change) -> bool {
        use {Change as C, SignalKind as K};
        match self {
            K::DisableAgent => change == C::AgentEnabled(false),
            K::EnableAgent => change == C::AgentEnabled(true),
            K::DisableBlueprint => change == C::BlueprintEnabled(false),
            K::EnableBlueprint => change == C::BlueprintEnabled(true),
            K::SponsorInactive => change == C::SponsorActive(false),
            K::SponsorActive => change == C::SponsorActive(true),
            K::SetRisk => matches!(change, C::AgentRisk(_)),
            K::ConfirmCompromised => change == C::AgentRisk(RiskLevel::High),
            K::ConfirmSafe | K::DismissRisk => change == C::AgentRisk(RiskLevel::None),
            K::Clear => matches!(change, C::Clear(_)),
        }
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

    pub fn as_str(self) -> &'static str {
        match self {
            Field::AgentEnabled => "agent_enabled",
            Field::AgentRisk => "agent_risk",
            Field::BlueprintEnabled => "blueprint_enabled",
            Field::SponsorActive => "sponsor_active",
        }
    }
}

impl FromStr for Field {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_name("live value", s, &Field::ALL, Field::as_str)
    }
}

/// What a signal changes: one live value set, or removed so that the directory's value
/// applies again. The verbs (`disable_agent`, `confirm_safe`, …) are only the names a
/// change is asked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    AgentEnabled(bool),
    BlueprintEnabled(bool),
    SponsorActive(bool),
    AgentRisk(RiskLevel),
    Clear(Field),
}

impl Change {
    /// The live field it changes.
    pub fn field(self) -> Field {
        match self {
            Change::AgentEnabled(_) => Field::AgentEnabled,
            Change::BlueprintEnabled(_) => Field::BlueprintEnabled,
            Change::SponsorActive(_) => Field::SponsorActive,
            Change::AgentRisk(_) => Field::AgentRisk,
            Change::Clear(field) => field,
        }
    }

    /// The value as journal lines, audit records and ListSignals show it.
    pub fn value(self) -> Value {
        match self {
            Change::AgentEnabled(b) | Change::BlueprintEnabled(b) | Change::SponsorActive(b) => Value::Flag(b),
            Change::AgentRisk(level) => Value::Risk(level),
            Change::Clear(_) => Value::Cleared,
        }
    }

    /// The change a journal line's field and value make, if they fit together.
    fn of(field: Field, value: Value) -> Option<Change> {
        Some(match (field, value) {
            (field, Value::Cleared) => Change::Clear(field),
            (Field::AgentEnabled, Value::Flag(b)) => Change::AgentEnabled(b),
            (Field::BlueprintEnabled, Value::Flag(b)) => Change::BlueprintEnabled(b),
            (Field::SponsorActive, Value::Flag(b)) => Change::SponsorActive(b),
            (Field::AgentRisk, Value::Risk(level)) => Change::AgentRisk(level),
            _ => return None,
        })
    }

    /// The verb that asks for this change (a compacted journal restates each live value).
    fn verb(self) -> SignalKind {
        match self {
            Change::AgentEnabled(true) => SignalKind::EnableAgent,
            Change::AgentEnabled(false) => SignalKind::DisableAgent,
            Change::BlueprintEnabled(true) => SignalKind::EnableBlueprint,
            Change::BlueprintEnabled(false) => SignalKind::DisableBlueprint,
            Change::SponsorActive(true) => SignalKind::SponsorActive,
            Change::SponsorActive(false) => SignalKind::SponsorInactive,
            Change::AgentRisk(_) => SignalKind::SetRisk,
            Change::Clear(_) => SignalKind::Clear,
        }
    }
}

/// A value as journal lines and records show it: a flag, a risk level, or none (removed).
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

/// A signal as received, checked: the verb it was asked by, the change it makes, its target,
/// and who asked, why and when. Only its constructors make one, so verb and change agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    kind: SignalKind,
    change: Change,
    target: String,
    mark: Mark,
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
        let kind = SignalKind::from_str(kind).map_err(|e| err("kind", e.to_string()))?;
        check_text(target, reason, actor)?;
        let change = match kind {
            SignalKind::DisableAgent => Change::AgentEnabled(false),
            SignalKind::EnableAgent => Change::AgentEnabled(true),
            SignalKind::DisableBlueprint => Change::BlueprintEnabled(false),
            SignalKind::EnableBlueprint => Change::BlueprintEnabled(true),
            SignalKind::SponsorInactive => Change::SponsorActive(false),
            SignalKind::SponsorActive => Change::SponsorActive(true),
            SignalKind::ConfirmCompromised => Change::AgentRisk(RiskLevel::High),
            SignalKind::ConfirmSafe | SignalKind::DismissRisk => Change::AgentRisk(RiskLevel::None),
            SignalKind::SetRisk => {
                Change::AgentRisk(risk.parse().map_err(|e: UnknownName| err("risk", e.to_string()))?)
            }
            SignalKind::Clear => {
                return Err(err("kind", "`clear` names the live value to remove: see Signal::clear".into()));
            }
        };
        if kind != SignalKind::SetRisk && !risk.is_empty() {
            return Err(err("risk", format!("applies only to set_risk, not {}", kind.as_str())));
        }
        Ok(Signal { kind, change, target: target.to_string(), mark: Mark::now(reason, actor) })
    }

    /// A signal that removes the live value `field` of `target`.
    pub fn clear(field: Field, target: &str, reason: &str, actor: &str) -> Result<Signal, SignalError> {
        check_text(target, reason, actor)?;
        Ok(Signal {
            kind: SignalKind::Clear,
            change: Change::Clear(field),
            target: target.to_string(),
            mark: Mark::now(reason, actor),
        })
    }

    /// The same signal, sent at `at` (a relayed signal keeps the time it was sent).
    pub fn sent_at(mut self, at: DateTime<Utc>) -> Signal {
        self.mark.at = at;
        self
    }

    /// The verb the signal was asked by.
    pub fn kind(&self) -> SignalKind {
        self.kind
    }

    pub fn change(&self) -> Change {
        self.change
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// Who sent it, why, and when.
    pub fn mark(&self) -> &Mark {
        &self.mark
    }
}

impl Mark {
    fn now(reason: &str, actor: &str) -> Mark {
        let by = if actor.is_empty() { "unknown".to_string() } else { actor.to_string() };
        Mark { by, reason: reason.to_string(), at: Utc::now() }
    }
}

/// A signal as journal lines and audit records hold it (the shape is pinned by
/// `tests/golden/audit-records.jsonl`).
#[derive(Serialize, Deserialize)]
struct SignalLine<T, S> {
    kind: SignalKind,
    field: Field,
    target: T,
    value: Value,
    reason: S,
    actor: S,
    at: DateTime<Utc>,
}

impl Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SignalLine {
            kind: self.kind,
            field: self.change.field(),
            target: &self.target,
            value: self.change.value(),
            reason: &self.mark.reason,
            actor: &self.mark.by,
            at: self.mark.at,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let line = SignalLine::<String, String>::deserialize(deserializer)?;
        let change = Change::of(line.field, line.value).filter(|c| line.kind.makes(*c)).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{} does not set {} to {}",
                line.kind.as_str(),
                line.field.as_str(),
                line.value
            ))
        })?;
        let mark = Mark { by: line.actor, reason: line.reason, at: line.at };
        Ok(Signal { kind: line.kind, change, target: line.target, mark })
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

/// One live value as a listing shows it: the change that set it, on what, by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub target: String,
    pub change: Change,
    pub mark: Mark,
}

/// A live value borrowed from the overlay (a shard read lock: keep it briefly).
pub struct LiveRef<'a, T>(dashmap::mapref::one::Ref<'a, String, Live<T>>);

impl<T> std::ops::Deref for LiveRef<'_, T> {
    type Target = Live<T>;
    fn deref(&self) -> &Live<T> {
        self.0.value()
    }
}

/// Live values by id, looked up on every decision (hence `crate::HashState`).
type Lives<T> = DashMap<String, Live<T>, crate::HashState>;

/// The overlay of live state. Lookups are lock-free on distinct keys (dashmap shards).
#[derive(Debug, Default)]
pub struct Overlay {
    agent_enabled: Lives<bool>,
    agent_risk: Lives<RiskLevel>,
    blueprint_enabled: Lives<bool>,
    sponsor_active: Lives<bool>,
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
    fn get<'a, T>(&self, map: &'a Lives<T>, id: &str) -> Option<LiveRef<'a, T>> {
        if !self.any() {
            return None;
        }
        map.get(id).map(LiveRef)
    }

    fn put<T>(&self, map: &Lives<T>, id: &str, live: Live<T>) {
        if map.insert(id.to_string(), live).is_none() {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn remove<T>(&self, map: &Lives<T>, id: &str) {
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

    /// An overlay holding `signals`, applied in order: for evaluating offline (tests, what-if)
    /// with live values that no journal holds. A served overlay changes only through
    /// `Journal::record`, so every live value it holds is journaled first.
    pub fn from_signals<'a>(signals: impl IntoIterator<Item = &'a Signal>) -> Overlay {
        let overlay = Overlay::new();
        for signal in signals {
            overlay.apply(signal);
        }
        overlay
    }

    /// Applies a signal. Private: see `Journal::record`.
    fn apply(&self, s: &Signal) {
        let target = s.target.as_str();
        let live = |value| Live { value, mark: s.mark.clone() };
        match s.change {
            Change::AgentEnabled(b) => self.put(&self.agent_enabled, target, live(b)),
            Change::BlueprintEnabled(b) => self.put(&self.blueprint_enabled, target, live(b)),
            Change::SponsorActive(b) => self.put(&self.sponsor_active, target, live(b)),
            Change::AgentRisk(level) => self.put(&self.agent_risk, target, Live { value: level, mark: s.mark.clone() }),
            Change::Clear(Field::AgentEnabled) => self.remove(&self.agent_enabled, target),
            Change::Clear(Field::AgentRisk) => self.remove(&self.agent_risk, target),
            Change::Clear(Field::BlueprintEnabled) => self.remove(&self.blueprint_enabled, target),
            Change::Clear(Field::SponsorActive) => self.remove(&self.sponsor_active, target),
        }
    }

    /// How many live values satisfy `keep` (nothing is copied).
    pub fn count(&self, keep: impl Fn(Field, &str) -> bool) -> usize {
        fn of<T>(map: &Lives<T>, field: Field, keep: &impl Fn(Field, &str) -> bool) -> usize {
            map.iter().filter(|e| keep(field, e.key())).count()
        }
        of(&self.agent_enabled, Field::AgentEnabled, &keep)
            + of(&self.agent_risk, Field::AgentRisk, &keep)
            + of(&self.blueprint_enabled, Field::BlueprintEnabled, &keep)
            + of(&self.sponsor_active, Field::SponsorActive, &keep)
    }

    /// Every live value (sorted by field, then target).
    pub fn entries(&self) -> Vec<Listed> {
        self.page(None, usize::MAX).0
    }

    /// The live values after `after` in (field, target) order, at most `size`, and whether
    /// more follow. Only the keys are gathered for the sort; marks (with reasons of up to
    /// 4 KiB) are copied for the page alone.
    pub fn page(&self, after: Option<(Field, &str)>, size: usize) -> (Vec<Listed>, bool) {
        fn keys<T>(map: &Lives<T>, field: Field, out: &mut Vec<(Field, String)>) {
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
                Field::AgentEnabled => {
                    self.agent_enabled.get(&target).map(|l| (Change::AgentEnabled(l.value), l.mark.clone()))
                }
                Field::AgentRisk => self.agent_risk.get(&target).map(|l| (Change::AgentRisk(l.value), l.mark.clone())),
                Field::BlueprintEnabled => {
                    self.blueprint_enabled.get(&target).map(|l| (Change::BlueprintEnabled(l.value), l.mark.clone()))
                }
                Field::SponsorActive => {
                    self.sponsor_active.get(&target).map(|l| (Change::SponsorActive(l.value), l.mark.clone()))
                }
            };
            if let Some((change, mark)) = found {
                page.push(Listed { target, change, mark });
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

/// A journal line that only keeps a number: what a compaction with nothing live writes, and
/// a fleet's change that did not apply here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    seq: u64,
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
    /// The last number, as `file` holds it: read without waiting for an fsync in progress.
    last: AtomicU64,
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
                if whole && let Ok(Marker { seq }) = serde_json::from_slice::<Marker>(&line) {
                    last_seq = last_seq.max(seq);
                    line.clear();
                    continue;
                }
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
            last: AtomicU64::new(last_seq),
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

    /// Journals a signal, then applies it to `overlay`: the one way a served overlay changes,
    /// so no live value is ever in force that a restart would not replay. Returns the
    /// signal's sequence number.
    pub fn record(&self, signal: &Signal, overlay: &Overlay) -> Result<u64, JournalError> {
        let seq = self.append(signal, overlay, None)?;
        overlay.apply(signal);
        Ok(seq)
    }

    /// As `record`, numbered `seq` (a fleet's stream sequence, above every number before).
    pub fn record_at(&self, seq: u64, signal: &Signal, overlay: &Overlay) -> Result<u64, JournalError> {
        let seq = self.append(signal, overlay, Some(seq))?;
        overlay.apply(signal);
        Ok(seq)
    }

    /// Notes that number `seq` was taken without a signal (a fleet's change that did not apply
    /// here), so that a restart goes on after it.
    pub fn mark(&self, seq: u64, overlay: &Overlay) -> Result<(), JournalError> {
        self.write_line(overlay, seq, |_| serde_json::to_vec(&Marker { seq }))
    }

    /// The number of the last signal (or mark) journaled.
    pub fn seq(&self) -> u64 {
        self.last.load(Ordering::SeqCst)
    }

    /// Appends a signal and fsyncs it; returns its sequence number. On failure (a full disk)
    /// the journal is cut back to its last whole line, so that a restart replays exactly the
    /// signals that were acknowledged.
    ///
    /// If the journal at the path is no longer the file being appended to (deleted, moved or
    /// replaced), it is first written anew from `overlay`, the live state it held: a signal is
    /// acknowledged only once it is in the file that a restart will read.
    fn append(&self, signal: &Signal, overlay: &Overlay, at: Option<u64>) -> Result<u64, JournalError> {
        let mut taken = 0;
        self.write_line(overlay, at.unwrap_or(0), |tail_seq| {
            taken = at.unwrap_or(tail_seq + 1);
            serde_json::to_vec(&Entry { seq: taken, signal: signal.clone() })
        })?;
        Ok(taken)
    }

    /// Appends the line `line` makes (given the last number) and fsyncs it; `at`, if not 0,
    /// must be above the last number, and becomes it.
    fn write_line(
        &self,
        overlay: &Overlay,
        at: u64,
        line: impl FnOnce(u64) -> serde_json::Result<Vec<u8>>,
    ) -> Result<(), JournalError> {
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
        if at != 0 && at <= tail.seq {
            return Err(err(io::Error::other(format!("number {at} does not follow {}", tail.seq))));
        }
        let mut line = line(tail.seq).map_err(|e| err(io::Error::other(e)))?;
        line.push(b'\n');
        if let Err(e) = tail.file.write_all(&line).and_then(|()| tail.file.sync_data()) {
            tail.torn = true;
            if let Err(cut) = cut_back(tail) {
                tracing::error!(journal = %self.path.display(), error = %cut, "cannot cut a failed append back; no signal is taken until it can");
            }
            return Err(err(e));
        }
        tail.len += line.len() as u64;
        tail.seq = if at == 0 { tail.seq + 1 } else { at };
        self.last.store(tail.seq, Ordering::SeqCst);
        self.lines.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
        // Every line keeps the last number, and a journal with nothing live keeps it in a mark:
        // numbers are never used twice, and a fleet's replica goes on from where it was.
        let seq = tail.seq;
        for Listed { target, change, mark } in &entries {
            let signal = Signal { kind: change.verb(), change: *change, target: target.clone(), mark: mark.clone() };
            let mut line = serde_json::to_vec(&Entry { seq, signal }).map_err(io::Error::other)?;
            line.push(b'\n');
            out.write_all(&line)?;
        }
        if entries.is_empty() && seq > 0 {
            let mut line = serde_json::to_vec(&Marker { seq }).map_err(io::Error::other)?;
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
        assert_eq!(s.change(), Change::AgentRisk(RiskLevel::High));
    }

    #[test]
    fn the_journal_replays_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (journal, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(replayed, Replayed::default());
        assert_eq!(journal.append(&signal("disable_agent", "ag-1", ""), &Overlay::new(), None).unwrap(), 1);
        assert_eq!(journal.append(&signal("set_risk", "ag-2", "medium"), &Overlay::new(), None).unwrap(), 2);
        assert_eq!(journal.append(&signal("disable_blueprint", "bp-x", ""), &Overlay::new(), None).unwrap(), 3);
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
        assert_eq!(journal.append(&signal("enable_agent", "ag-1", ""), &Overlay::new(), None).unwrap(), 4);
        drop(journal);
        let overlay = Overlay::new();
        let (_, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!((replayed.applied, replayed.skipped.len()), (4, 0));
        assert_eq!(overlay.agent_enabled("ag-1").map(|l| l.value), Some(true));
    }

    #[test]
    fn a_journal_line_whose_verb_and_change_disagree_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), &Overlay::new()).unwrap();
        journal.append(&signal("disable_agent", "ag-1", ""), &Overlay::new(), None).unwrap();
        drop(journal);
        let mut f = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        let at = r#""reason":"","actor":"x","at":"2026-11-27T10:00:00Z"}"#;
        for body in [
            // A verb that says enable with a value that disables.
            r#""kind":"enable_agent","field":"agent_enabled","target":"ag-2","value":false,"#,
            // A flag where a risk level belongs.
            r#""kind":"set_risk","field":"agent_risk","target":"ag-3","value":true,"#,
            // A verb for another field.
            r#""kind":"disable_blueprint","field":"sponsor_active","target":"s-1","value":false,"#,
            // A clear without the `clear` verb.
            r#""kind":"dismiss_risk","field":"agent_risk","target":"ag-1","value":null,"#,
        ] {
            writeln!(f, "{{\"seq\":9,{body}{at}").unwrap();
        }
        drop(f);
        let overlay = Overlay::new();
        let (_, replayed) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(replayed.applied, 1);
        let skipped: Vec<u64> = replayed.skipped.iter().map(|(line, _)| *line).collect();
        assert_eq!(skipped, [2, 3, 4, 5], "{:?}", replayed.skipped);
        assert!(
            replayed.skipped[0].1.contains("enable_agent does not set agent_enabled to false"),
            "{:?}",
            replayed.skipped
        );
        assert_eq!(overlay.len(), 1);
        assert_eq!(overlay.agent_enabled("ag-1").map(|l| l.value), Some(false));
    }

    #[test]
    fn a_clear_replays_and_a_signal_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (journal, _) = Journal::open(dir.path(), &overlay).unwrap();
        let sent = [
            signal("confirm_compromised", "ag-1", ""),
            signal("disable_agent", "ag-1", ""),
            Signal::clear(Field::AgentRisk, "ag-1", "false alarm", "soc").unwrap(),
        ];
        for s in &sent {
            journal.record(s, &overlay).unwrap();
        }
        assert_eq!(overlay.entries(), Overlay::from_signals(&sent).entries());
        assert!(overlay.agent_risk("ag-1").is_none());
        drop(journal);
        let text = fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        let read: Vec<Signal> = text.lines().map(|l| serde_json::from_str::<Entry>(l).unwrap().signal).collect();
        assert_eq!(read, sent);
        let replayed = Overlay::new();
        Journal::open(dir.path(), &replayed).unwrap();
        assert_eq!(replayed.entries(), overlay.entries());
    }

    #[test]
    fn a_signal_glued_to_a_torn_fragment_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (journal, _) = Journal::open(dir.path(), &overlay).unwrap();
        journal.append(&signal("set_risk", "ag-2", "low"), &Overlay::new(), None).unwrap();
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
        assert_eq!(journal.append(&signal("enable_agent", "ag-3", ""), &Overlay::new(), None).unwrap(), 3);
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
        journal.append(&signal("disable_agent", "ag-1", ""), &Overlay::new(), None).unwrap();
        drop(journal);
        let mut f = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        f.write_all(&vec![b'x'; 300_000]).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        let (journal, _) = Journal::open(dir.path(), &Overlay::new()).unwrap();
        journal.append(&signal("disable_agent", "ag-2", ""), &Overlay::new(), None).unwrap();
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
            journal.append(&s, &overlay, None).unwrap();
            overlay.apply(&s);
            let path = dir.path().join(JOURNAL_FILE);
            if moved {
                fs::rename(&path, dir.path().join("elsewhere.jsonl")).unwrap();
            } else {
                fs::remove_file(&path).unwrap();
            }
            let s = signal("disable_agent", "ag-2", "");
            journal.append(&s, &overlay, None).unwrap();
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
        let last = first.last().map(|l| (l.change.field(), l.target.clone())).unwrap();
        let (second, more) = overlay.page(Some((last.0, &last.1)), 5);
        assert!(!more);
        let key = |l: &Listed| (l.change.field().as_str(), l.target.clone());
        let seen: Vec<_> = first.iter().chain(&second).map(key).collect();
        let all: Vec<_> = overlay.entries().iter().map(key).collect();
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
            journal.append(&s, &overlay, None).unwrap();
            overlay.apply(&s);
            journal.compact_if_needed(&overlay).unwrap();
        }
        assert_eq!(journal.seq(), 30);
        let lines = fs::read_to_string(journal.path()).unwrap().lines().count();
        assert!(lines < 15, "{lines} lines");
        let replayed = Overlay::new();
        Journal::open(dir.path(), &replayed).unwrap();
        assert_eq!(replayed.entries(), overlay.entries());
    }

    /// A fleet numbers its signals by the stream: a number is taken once, marks keep the
    /// numbers of changes that did not apply, and a compaction keeps the last number even
    /// with nothing live, so that a restart resumes after it.
    #[test]
    fn numbers_given_by_a_stream_survive_marks_compaction_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::new();
        let (journal, _) = Journal::open(dir.path(), &overlay).unwrap();
        assert_eq!(journal.record_at(5, &signal("disable_agent", "ag-1", ""), &overlay).unwrap(), 5);
        assert!(journal.record_at(5, &signal("enable_agent", "ag-1", ""), &overlay).is_err());
        journal.mark(9, &overlay).unwrap();
        assert!(journal.mark(9, &overlay).is_err());
        let (reopened, replayed) = Journal::open(dir.path(), &Overlay::new()).unwrap();
        assert_eq!((reopened.seq(), replayed.applied, replayed.skipped.len()), (9, 1, 0));
        assert_eq!(
            journal.record_at(12, &Signal::clear(Field::AgentEnabled, "ag-1", "", "x").unwrap(), &overlay).unwrap(),
            12
        );
        assert!(overlay.is_empty());
        journal.compact(&overlay).unwrap();
        let fresh = Overlay::new();
        let (reopened, replayed) = Journal::open(dir.path(), &fresh).unwrap();
        assert_eq!((reopened.seq(), replayed.skipped.len(), fresh.len()), (12, 0, 0));
        // Local numbering goes on after it too.
        assert_eq!(reopened.record(&signal("disable_agent", "ag-2", ""), &fresh).unwrap(), 13);
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
