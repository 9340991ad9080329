//! The running service, transport aside: decides with the current snapshot and the live
//! overlay, audits every decision before it is answered, takes signals (journaled first) and
//! reloads. The gRPC and Envoy front ends are thin layers over this.

use std::sync::Arc;

use chrono::Utc;

use crate::audit::{self, Audit, Refused};
use crate::directory::{Change as DirectoryChange, DirectoryError};
use crate::engine::{Decision, ReasonCode, evaluate};
use crate::fleet::{Fleet, Message, Outcome, PublishError, SentDirectory};
use crate::live::{DirectoryJournal, LiveJournalError};
use crate::metrics::{Metrics, Sample, listener::Source};
use crate::records::{self, Caller, DecisionRecord, DirectoryRecord, RefusedRecord, ReloadRecord, SignalRecord};
use crate::request::{RawRequest, Request, RequestError};
use crate::signals::{Change, Field, Journal, JournalError, Overlay, Signal, SignalError};
use crate::snapshot::{ApplyError, Reloaded, Snapshot, Store};

/// Most requests in one `EvaluateBatch`.
pub const MAX_BATCH: usize = 1000;

/// What the service accepts, beyond the shape of each request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Refuse a request whose `time` is further than this from the server's clock.
    pub max_clock_skew: Option<chrono::TimeDelta>,
    /// Most live signals for targets the served directory does not know.
    pub max_unknown_signals: usize,
    /// The fleet this replica shares its live state with (`--live nats://…`), if any: then
    /// signals and directory changes go through its stream.
    pub fleet: Option<Arc<Fleet>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_clock_skew: None, max_unknown_signals: 10_000, fleet: None }
    }
}

pub struct Service {
    store: Store,
    live: Overlay,
    journal: Option<Journal>,
    /// The live directory's journal (under `--state`, as the signal journal).
    directory_journal: Option<DirectoryJournal>,
    audit: Audit,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// The journal's upkeep (compaction) error, reported once and shown in Status.
    journal_error: Upkeep,
    /// The directory journal's compaction failed: it holds lines a reload made stale, so it is
    /// compacted at the next chance, and Status says so until it is.
    directory_error: Upkeep,
    /// One signal or directory change at a time: journal order is apply order, a compaction
    /// sees every change journaled before it, and one barrier wait is in progress at a time.
    signalling: tokio::sync::Mutex<()>,
}

/// The last outcome of a journal's upkeep (its compaction): an error is logged once, not per
/// attempt (a read-only state folder fails every one), and shown in Status until it clears.
struct Upkeep {
    journal: &'static str,
    retried_with: &'static str,
    error: std::sync::Mutex<Option<String>>,
}

impl Upkeep {
    fn new(journal: &'static str, retried_with: &'static str) -> Upkeep {
        Upkeep { journal, retried_with, error: std::sync::Mutex::new(None) }
    }

    fn note(&self, error: Option<String>) {
        let Ok(mut slot) = self.error.lock() else { return };
        match (&*slot, &error) {
            (None, Some(e)) => {
                tracing::error!(error = %e, "{} compaction failed; retried with {}", self.journal, self.retried_with)
            }
            (Some(_), None) => tracing::info!("{} compaction succeeds again", self.journal),
            _ => {}
        }
        *slot = error;
    }

    fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }
}

/// The result of one live directory change.
#[derive(Debug, Clone)]
pub struct DirectoryApplied {
    /// Its number in the directory journal: durable when this answer arrives.
    pub seq: u64,
    pub summary: String,
    /// Fields and sections of the change that were not understood, ignored.
    pub warnings: Vec<String>,
    /// The bundle revision it applied over.
    pub revision: std::sync::Arc<str>,
    /// In a fleet: the replicas that had not applied it when the wait for them ended.
    pub unconfirmed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryFailure {
    #[error("directory changes need a state folder (--state) to be durable")]
    NoJournal,
    /// Nothing of the change applied; each error names the object and field.
    #[error("the change was refused, and nothing of it applied:\n{}", crate::directory::listed(.0, "\n"))]
    Refused(Vec<DirectoryError>),
    #[error("the change could not be made durable, and nothing of it applied: {0}")]
    NotDurable(String),
    /// In a fleet: the stream did not take it, so no replica applies it.
    #[error("the fleet's stream did not take the change, so no replica applies it: {0}")]
    Unavailable(String),
    /// In a fleet: sent, but JetStream's acknowledgement did not come.
    #[error("{UNKNOWN_OUTCOME}: {0}")]
    Unknown(String),
    #[error("the directory change task failed")]
    Aborted,
}

/// What a fleet's change whose acknowledgement did not come says.
const UNKNOWN_OUTCOME: &str = "no acknowledgement came from the fleet's stream, which may have taken the change: if it \
     did, every replica applies it. Send it again to be sure (a signal or an upsert sent twice leaves the same state)";

/// The result of one signal.
#[derive(Debug, Clone)]
pub struct Signalled {
    pub seq: u64,
    pub signal: Signal,
    pub unknown_target: bool,
    /// In a fleet: the replicas that had not applied it when the wait for them ended.
    pub unconfirmed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignalFailure {
    #[error("signals need a state folder (--state) to be durable")]
    NoJournal,
    #[error(transparent)]
    Invalid(#[from] SignalError),
    #[error(
        "refusing a signal for `{target}`, which the served directory does not know: {live} signals for unknown \
         targets are live already (the cap is {cap}, --max-unknown-signals); clear stale ones with `agentca admin clear ID`"
    )]
    TooManyUnknown { target: String, live: usize, cap: usize },
    #[error("`{0}` has no live value to clear")]
    NothingToClear(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// In a fleet: the stream did not take it, so no replica applies it.
    #[error("the fleet's stream did not take the signal, so no replica applies it: {0}")]
    Unavailable(String),
    /// In a fleet: sent, but JetStream's acknowledgement did not come.
    #[error("{UNKNOWN_OUTCOME}: {0}")]
    Unknown(String),
    #[error("the signal task failed")]
    Aborted,
}

impl Service {
    pub fn new(
        store: Store,
        live: Overlay,
        journal: Option<Journal>,
        directory_journal: Option<DirectoryJournal>,
        audit: Audit,
        settings: Settings,
    ) -> Arc<Service> {
        let metrics = Metrics::new();
        metrics.serving(&store.current());
        let recorder = metrics.clone();
        audit.on_write(Box::new(move |took| recorder.audit_wrote(took)));
        Arc::new(Service {
            store,
            live,
            journal,
            directory_journal,
            audit,
            settings,
            metrics,
            journal_error: Upkeep::new("signal journal", "later signals"),
            directory_error: Upkeep::new("directory journal", "the next change or reload"),
            signalling: tokio::sync::Mutex::new(()),
        })
    }

    /// The served snapshot, its folder and the last reload failure.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The live values (signals) over the served directory.
    pub fn live(&self) -> &Overlay {
        &self.live
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What the service counts (decisions, signals, reloads, RPCs recorded by the doors).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Validates, decides and audits one request. Only malformed input is an error.
    pub async fn decide(&self, raw: RawRequest, caller: &Caller) -> Result<Decision, RequestError> {
        self.decide_with(raw, caller, |_, _| {}).await
    }

    /// As `decide`, with `complete` filling in the raw request from the very snapshot that
    /// decides it (a gateway's host resolved to a resource).
    pub async fn decide_with(
        &self,
        mut raw: RawRequest,
        caller: &Caller,
        complete: impl FnOnce(&Snapshot, &mut RawRequest),
    ) -> Result<Decision, RequestError> {
        let _in_flight = self.live.enter();
        // Before the snapshot and the live state are read (see `judged`).
        let stale = self.stale();
        let snap = self.store.current();
        complete(&snap, &mut raw);
        let request = raw.validate_with(Utc::now(), self.settings.max_clock_skew).inspect_err(|e| {
            self.metrics.invalid_request();
            tracing::debug!(caller = %caller, error = %e, "invalid request");
        })?;
        let decision = self.judged(stale, &snap, &request);
        Ok(self.audited(&snap, &request, decision, caller).await)
    }

    /// Decides many requests, each on its own: one bad item is an error for that item only.
    pub async fn decide_batch(&self, raws: Vec<RawRequest>, caller: &Caller) -> Vec<Result<Decision, RequestError>> {
        let _in_flight = self.live.enter();
        // As of the batch's start, before its snapshot is read; and again before each item,
        // since a batch yields the thread between items.
        let stale = self.stale();
        let snap = self.store.current();
        let now = Utc::now();
        let mut pending = Vec::with_capacity(raws.len());
        for raw in raws {
            let item = raw.validate_with(now, self.settings.max_clock_skew).inspect_err(|e| {
                self.metrics.invalid_request();
                tracing::debug!(caller = %caller, error = %e, "invalid batch item");
            });
            pending.push(item.map(|request| {
                let decision = self.judged(stale || self.stale(), &snap, &request);
                (request, decision)
            }));
            // A large batch gives the thread back now and then: admin calls, the kill switch
            // and SIGTERM must not wait behind it.
            tokio::task::consume_budget().await;
        }
        // Every record is queued before any is awaited, so one fsync covers the batch.
        let snap = &snap;
        let audits = pending.into_iter().map(|item| async move {
            let (request, decision) = item?;
            Ok(self.audited(snap, &request, decision, caller).await)
        });
        futures::future::join_all(audits).await
    }

    /// The decision on `request`: the engine's, unless the fleet's live state is too old to
    /// decide with (`--live-stale-after` with `--live-stale-policy deny`).
    ///
    /// `stale` is read before the snapshot and the live state: a state found fresh enough then
    /// is at least as fresh when it is read. Read after, a change applied in between (a
    /// replica woken after a freeze, catching up) could vouch for the state read before it.
    fn judged(&self, stale: bool, snap: &Snapshot, request: &Request) -> Decision {
        if stale {
            // Nothing is evaluated on a state too old to decide with.
            return Decision::deny(
                ReasonCode::LiveStateUnavailable,
                "the live state (signals, directory changes) is older than --live-stale-after allows: the fleet's \
                 stream cannot be reached",
                snap.revision().clone(),
                request.request_id.clone(),
            );
        }
        evaluate(snap, &self.live, request)
    }

    /// Whether the fleet's live state is too old to decide with (see `judged`).
    fn stale(&self) -> bool {
        self.settings.fleet.as_ref().is_some_and(|fleet| fleet.denying())
    }

    /// Audits a decision (see `recorded`), counts it and logs it (at debug level).
    async fn audited(&self, snap: &Snapshot, request: &Request, decision: Decision, caller: &Caller) -> Decision {
        self.metrics.evaluated(decision.eval_us);
        let decision = self.recorded(snap, request, decision, caller).await;
        self.metrics.decided(&decision);
        tracing::debug!(
            decision_id = %decision.decision_id,
            request_id = decision.request_id.as_deref().unwrap_or(""),
            caller = %caller,
            agent = %request.agent,
            decision = if decision.is_allow() { "allow" } else { "deny" },
            code = decision.reasons.first().map_or("", |r| r.code.as_str()),
            eval_us = decision.eval_us,
            "decided"
        );
        decision
    }

    /// The decision once its record is accepted, or a deny (audit_unavailable) if it is not.
    async fn recorded(&self, snap: &Snapshot, request: &Request, decision: Decision, caller: &Caller) -> Decision {
        if !self.audit.is_on() {
            return decision;
        }
        // Serializing is the costly part of a batch item: let other work in between.
        tokio::task::consume_budget().await;
        let body = records::body(&DecisionRecord::new(snap, request, &decision, caller));
        match self.audit.submit(body).await {
            Ok(()) => decision,
            Err(refused) => {
                let why = match refused {
                    Refused::QueueFull => "the audit log cannot keep up, so no decision can be recorded",
                    Refused::Closed => "the audit log is closed, so no decision can be recorded",
                    Refused::Unavailable => "the audit log cannot be written, so no decision can be recorded",
                };
                tracing::debug!(decision_id = %decision.decision_id, caller = %caller, refused = %refused, "denied: {why}");
                Decision::deny(ReasonCode::AuditUnavailable, why, decision.revision, decision.request_id)
            }
        }
    }

    /// Journals a signal (fsynced), applies it, waits until no decision taken before it is
    /// still on its way, and records it in the audit log. It runs to its end even if the
    /// caller goes away: the signal is durable from the journal write on.
    pub async fn signal(self: &Arc<Self>, signal: Signal, caller: Caller) -> Result<Signalled, SignalFailure> {
        let service = self.clone();
        tokio::spawn(async move { service.take_signal(signal, &caller).await })
            .await
            .map_err(|_| SignalFailure::Aborted)?
    }

    /// Removes the live value `field` of `target` (every live value of it when `field` is
    /// None): the directory's values apply again. Journaled and acknowledged as a signal.
    pub async fn clear(
        self: &Arc<Self>,
        target: &str,
        field: Option<Field>,
        reason: &str,
        actor: &str,
        caller: Caller,
    ) -> Result<Vec<Signalled>, SignalFailure> {
        crate::signals::check_text(target, reason, actor)?;
        let fields: Vec<Field> = match field {
            Some(f) => vec![f],
            None => Field::ALL.to_vec(),
        };
        let fields: Vec<Field> = fields.into_iter().filter(|f| self.live.has(*f, target)).collect();
        if fields.is_empty() {
            return Err(SignalFailure::NothingToClear(target.to_string()));
        }
        let mut done = Vec::with_capacity(fields.len());
        for f in fields {
            done.push(self.signal(Signal::clear(f, target, reason, actor)?, caller.clone()).await?);
        }
        Ok(done)
    }

    /// Live signals whose target the directory of `snap` does not know.
    pub fn unknown_signals(&self, snap: &Snapshot) -> usize {
        self.live.count(|field, target| !knows(snap, field, target))
    }

    /// The journal's upkeep error, if its last compaction failed, else the last thing that
    /// happened to its file (deleted or replaced, and written anew).
    pub fn journal_error(&self) -> Option<String> {
        let error = self.journal_error.error();
        error.or_else(|| self.journal.as_ref().and_then(Journal::notice))
    }

    async fn take_signal(self: &Arc<Self>, signal: Signal, caller: &Caller) -> Result<Signalled, SignalFailure> {
        self.journal()?;
        if let Some(fleet) = self.settings.fleet.clone() {
            self.check_unknown_cap(&signal)?;
            let message = Message {
                origin: fleet.replica().to_string(),
                caller: crate::fleet::Sender::of(caller),
                signal: Some(signal.clone()),
                directory: None,
            };
            let seq = fleet.publish(&message).await.map_err(|e| match e {
                PublishError::NotSent(e) => SignalFailure::Unavailable(e),
                PublishError::Unknown(e) => SignalFailure::Unknown(e),
            })?;
            let (unconfirmed, _) = fleet.confirm(seq).await;
            let unknown_target = self.unknown_target(&self.store.current(), signal.change().field(), signal.target());
            return Ok(Signalled { seq, signal, unknown_target, unconfirmed });
        }
        let _one_at_a_time = self.signalling.lock().await;
        self.check_unknown_cap(&signal)?;
        // Journaled (written and fsynced, off the async threads), then applied.
        let (recorded, signal) = self
            .blocking(move |s| (s.journal().and_then(|j| Ok(j.record(&signal, &s.live)?)), signal))
            .await
            .ok_or(SignalFailure::Aborted)?;
        let seq = recorded?;
        self.signal_applied(seq, &signal, caller).await;
        let unknown_target = self.unknown_target(&self.store.current(), signal.change().field(), signal.target());
        Ok(Signalled { seq, signal, unknown_target, unconfirmed: Vec::new() })
    }

    /// Signals for ids the directory lacks are kept for agents yet to come, but not without
    /// bound: a flood of them would grow the overlay and the journal for ever.
    fn check_unknown_cap(&self, signal: &Signal) -> Result<(), SignalFailure> {
        let snap = self.store.current();
        let (field, target) = (signal.change().field(), signal.target());
        if !matches!(signal.change(), Change::Clear(_)) && !knows(&snap, field, target) && !self.live.has(field, target)
        {
            let live = self.unknown_signals(&snap);
            let cap = self.settings.max_unknown_signals;
            if live >= cap {
                return Err(SignalFailure::TooManyUnknown { target: target.to_string(), live, cap });
            }
        }
        Ok(())
    }

    /// What follows a journaled signal: counted, logged, waited for (no decision taken before
    /// it still on its way), recorded in the audit log, and the journal compacted if due.
    async fn signal_applied(self: &Arc<Self>, seq: u64, signal: &Signal, caller: &Caller) {
        self.metrics.signalled(signal.kind());
        tracing::info!(
            seq,
            caller = %caller,
            kind = signal.kind().as_str(),
            target = signal.target(),
            actor = %signal.mark().by,
            "signal applied"
        );
        self.live.quiesce().await;
        let unknown_target = self.unknown_target(&self.store.current(), signal.change().field(), signal.target());
        let record = SignalRecord::new(seq, signal, unknown_target, caller);
        // A signal's record waits for room whatever the overflow policy: signals are rare and
        // the signal already holds.
        let _ = self.audit.submit_waiting(records::body(&record)).await;
        let compacted = self.blocking(|s| s.journal().map(|j| j.compact_if_needed(&s.live))).await;
        self.note_journal_upkeep(match compacted {
            Some(Ok(Err(e))) => Some(e.to_string()),
            Some(_) => None,
            None => Some("the compaction task failed".into()),
        });
    }

    /// Applies a live directory change: checked whole against the directory served, journaled
    /// (fsynced), swapped in for the next request, then, once no decision taken before it is
    /// still on its way, recorded in the audit log and acknowledged. It runs to its end even
    /// if the caller goes away: the change is durable from the journal write on.
    pub async fn apply_directory(
        self: &Arc<Self>,
        change: DirectoryChange,
        by: String,
        reason: String,
        caller: Caller,
    ) -> Result<DirectoryApplied, DirectoryFailure> {
        let service = self.clone();
        tokio::spawn(async move { service.take_directory(change, &by, &reason, &caller).await })
            .await
            .map_err(|_| DirectoryFailure::Aborted)?
    }

    async fn take_directory(
        self: &Arc<Self>,
        change: DirectoryChange,
        by: &str,
        reason: &str,
        caller: &Caller,
    ) -> Result<DirectoryApplied, DirectoryFailure> {
        if self.directory_journal.is_none() {
            return Err(DirectoryFailure::NoJournal);
        }
        if let Some(fleet) = self.settings.fleet.clone() {
            // Checked over the directory served first: a change refused here never enters the
            // stream. (Replicas check it again as they apply it.)
            self.store.current().directory().apply(&change).map_err(DirectoryFailure::Refused)?;
            let json = change.to_json().map_err(|e| DirectoryFailure::NotDurable(e.to_string()))?;
            let raw = serde_json::value::RawValue::from_string(json)
                .map_err(|e| DirectoryFailure::NotDurable(e.to_string()))?;
            let message = Message {
                origin: fleet.replica().to_string(),
                caller: crate::fleet::Sender::of(caller),
                signal: None,
                directory: Some(SentDirectory { change: raw, by: by.to_string(), reason: reason.to_string() }),
            };
            let seq = fleet.publish(&message).await.map_err(|e| match e {
                PublishError::NotSent(e) => DirectoryFailure::Unavailable(e),
                PublishError::Unknown(e) => DirectoryFailure::Unknown(e),
            })?;
            let (unconfirmed, outcome) = fleet.confirm(seq).await;
            if let Some(Outcome::Refused(mut errors)) = outcome {
                if errors.is_empty() {
                    errors.push(crate::directory::DirectoryError::Object {
                        object: "the change".into(),
                        message: format!("#{seq} could not be read back from the fleet's stream here"),
                    });
                }
                return Err(DirectoryFailure::Refused(errors));
            }
            return Ok(DirectoryApplied {
                seq,
                summary: change.summary(),
                warnings: change.warnings().to_vec(),
                revision: self.store.current().revision().clone(),
                unconfirmed,
            });
        }
        let _one_at_a_time = self.signalling.lock().await;
        let change = Arc::new(change);
        let seq = self.change_directory(None, change.clone(), by, reason, caller).await?;
        let snap = self.store.current();
        Ok(DirectoryApplied {
            seq,
            summary: change.summary(),
            warnings: change.warnings().to_vec(),
            revision: snap.revision().clone(),
            unconfirmed: Vec::new(),
        })
    }

    /// Applies a directory change (numbered `at`, in a fleet), journaled and audited, then
    /// waits until no decision taken before it is still on its way. The caller holds
    /// `signalling`.
    async fn change_directory(
        self: &Arc<Self>,
        at: Option<u64>,
        change: Arc<DirectoryChange>,
        by: &str,
        reason: &str,
        caller: &Caller,
    ) -> Result<u64, DirectoryFailure> {
        let (applying, by_owned, reason_owned) = (change.clone(), by.to_string(), reason.to_string());
        let audited_caller = caller.clone();
        let applied = self
            .blocking(move |s| {
                let journal = s.directory_journal.as_ref().ok_or(DirectoryFailure::NoJournal)?;
                s.store
                    .apply_directory_at(at, &applying, |seq, resolved, net| {
                        journal.append(seq, resolved, &by_owned, &reason_owned, net).map_err(|e| e.to_string())?;
                        // Recorded once durable and before any request is decided with it: a
                        // kill after this point leaves a change both replayed and recorded. Like
                        // a signal's, the record waits for room whatever the overflow policy; a
                        // log that refuses it cannot undo what the journal holds, so it is said.
                        let revision = s.store.current().revision().clone();
                        let record =
                            DirectoryRecord::new(seq, resolved, &by_owned, &reason_owned, &revision, &audited_caller);
                        if let Err(refused) = s.audit.submit_blocking(records::body(&record)) {
                            tracing::error!(seq, %refused, "directory change applied without its audit record");
                        }
                        Ok(())
                    })
                    .map_err(|e| match e {
                        ApplyError::Refused(errors) => DirectoryFailure::Refused(errors),
                        ApplyError::NotDurable(message) => DirectoryFailure::NotDurable(message),
                    })
            })
            .await
            .ok_or(DirectoryFailure::Aborted)?;
        let seq = applied.inspect_err(|e| tracing::info!(caller = %caller, error = %e, "directory change refused"))?;
        let snap = self.store.current();
        self.metrics.serving(&snap);
        tracing::info!(seq, caller = %caller, by, change = %change.summary(), "directory change applied");
        self.live.quiesce().await;
        let due = self.directory_error.error().is_some();
        self.compact_directory_journal(due).await;
        Ok(seq)
    }

    /// The fleet this replica belongs to, if any.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.settings.fleet.as_ref()
    }

    /// The last live number applied: signals and directory changes share a fleet's numbers.
    pub fn live_applied(&self) -> u64 {
        let signals = self.journal.as_ref().map_or(0, Journal::seq);
        signals.max(self.store.current().live_seq())
    }

    /// Applies the fleet stream's message `seq`: journaled (numbered `seq`), applied, waited
    /// for and audited as a change sent here would be. A change that does not apply here
    /// (refused over this replica's directory, or unreadable) is marked as taken and skipped:
    /// every replica on the same bundle refuses it alike. An error means nothing is durable;
    /// the fleet retries it.
    pub async fn apply_streamed(
        self: &Arc<Self>,
        seq: u64,
        message: Result<Message, String>,
    ) -> Result<Outcome, String> {
        let _one_at_a_time = self.signalling.lock().await;
        if seq <= self.live_applied() {
            return Ok(Outcome::Applied);
        }
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(seq, error = %e, "an unreadable change on the fleet's stream was skipped");
                self.mark_taken(seq).await?;
                return Ok(Outcome::Refused(Vec::new()));
            }
        };
        let caller = message.caller.caller(&message.origin);
        match (message.signal, message.directory) {
            (Some(signal), None) => {
                let mark = signal.mark();
                if let Err(e) = crate::signals::check_text(signal.target(), &mark.reason, &mark.by) {
                    tracing::error!(seq, origin = %crate::input::printable(&message.origin), error = %e, "a signal on the fleet's stream is not valid; skipped");
                    self.mark_taken(seq).await?;
                    return Ok(Outcome::Refused(Vec::new()));
                }
                let recorded = self
                    .blocking(move |s| {
                        let journal = s.journal().map_err(|e| e.to_string())?;
                        journal.record_at(seq, &signal, &s.live).map_err(|e| e.to_string())?;
                        Ok::<_, String>(signal)
                    })
                    .await
                    .ok_or("the signal task failed")??;
                self.signal_applied(seq, &recorded, &caller).await;
                Ok(Outcome::Applied)
            }
            (None, Some(sent)) => {
                let change = match DirectoryChange::from_json_str(sent.change.get()) {
                    Ok(change) => Arc::new(change),
                    Err(errors) => {
                        tracing::error!(seq, errors = %crate::directory::listed(&errors, "; "), "a fleet's directory change does not read here; skipped");
                        self.mark_taken(seq).await?;
                        return Ok(Outcome::Refused(errors));
                    }
                };
                match self.change_directory(Some(seq), change, &sent.by, &sent.reason, &caller).await {
                    Ok(_) => Ok(Outcome::Applied),
                    Err(DirectoryFailure::Refused(errors)) => {
                        tracing::warn!(seq, origin = %message.origin, errors = %crate::directory::listed(&errors, "; "), "a fleet's directory change does not apply here; skipped");
                        self.mark_taken(seq).await?;
                        Ok(Outcome::Refused(errors))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            _ => {
                tracing::error!(
                    seq,
                    "a change on the fleet's stream is neither a signal nor a directory change; skipped"
                );
                self.mark_taken(seq).await?;
                Ok(Outcome::Refused(Vec::new()))
            }
        }
    }

    /// Journals that number `seq` was taken without a change, so that a restart goes on after it.
    async fn mark_taken(self: &Arc<Self>, seq: u64) -> Result<(), String> {
        self.blocking(move |s| s.journal().map_err(|e| e.to_string())?.mark(seq, &s.live).map_err(|e| e.to_string()))
            .await
            .ok_or("the journal task failed")?
    }

    /// Rewrites the directory journal as the net of the live changes, if it has grown (or
    /// `now`: after a reload folded some of them into the bundle).
    async fn compact_directory_journal(self: &Arc<Self>, now: bool) {
        let done = self
            .blocking(move |s| -> Result<(), LiveJournalError> {
                let Some(journal) = s.directory_journal.as_ref() else { return Ok(()) };
                if !now && !journal.wants_compaction() {
                    return Ok(());
                }
                // Under the store's lock: no reload rewrites the journal in between.
                s.store.with_live_change(|seq, net| journal.compact(seq, net))
            })
            .await;
        let error = match done {
            Some(Ok(())) => None,
            Some(Err(e)) => Some(e.to_string()),
            None => Some("the directory journal compaction task failed".to_string()),
        };
        self.note_directory_upkeep(error);
    }

    fn note_directory_upkeep(&self, error: Option<String>) {
        self.directory_error.note(error);
    }

    /// Why the directory journal could not be compacted, until it can.
    pub fn directory_error(&self) -> Option<String> {
        self.directory_error.error()
    }

    fn journal(&self) -> Result<&Journal, SignalFailure> {
        self.journal.as_ref().ok_or(SignalFailure::NoJournal)
    }

    /// Runs blocking work (a journal write and fsync, a compaction, a reload) on tokio's
    /// blocking threads and waits for it: unlike `block_in_place`, it works on any runtime,
    /// a current-thread one included. None if the task failed.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Service) -> T + Send + 'static,
    ) -> Option<T> {
        let service = self.clone();
        tokio::task::spawn_blocking(move || work(&service)).await.ok()
    }

    fn note_journal_upkeep(&self, error: Option<String>) {
        self.journal_error.note(error);
    }

    /// True if `target` is an agent, blueprint or sponsor (as `field` says) that the served
    /// directory lacks.
    pub fn unknown_target(&self, snap: &Snapshot, field: Field, target: &str) -> bool {
        !knows(snap, field, target)
    }

    /// Reloads the bundle and records the outcome, to the end even if the caller goes away.
    pub async fn reload(self: &Arc<Self>, trigger: &'static str) -> Reloaded {
        self.reload_for(trigger, None).await
    }

    /// As `reload`, asked for by `caller` (recorded with the outcome).
    pub async fn reload_for(self: &Arc<Self>, trigger: &'static str, caller: Option<Caller>) -> Reloaded {
        let service = self.clone();
        match tokio::spawn(async move { service.take_reload(trigger, caller.as_ref()).await }).await {
            Ok(result) => result,
            Err(_) => self.reload_failed(),
        }
    }

    /// What a reload whose task failed says: the old snapshot is still served.
    fn reload_failed(&self) -> Reloaded {
        let kept = self.store.current().revision().clone();
        let error = crate::bundle::BundleErrors(vec![crate::bundle::BundleError {
            file: self.store.dir().display().to_string(),
            line: None,
            column: None,
            message: "the reload task failed".into(),
        }]);
        Reloaded::Failed { kept, error }
    }

    async fn take_reload(self: &Arc<Self>, trigger: &str, caller: Option<&Caller>) -> Reloaded {
        // The store takes one reload or live change at a time: the reload lays the live changes
        // over the new bundle and rewrites their journal in step. (Signals do not wait for it.)
        let reloaded = self
            .blocking(|s| {
                s.store.reload_with(|seq, net| match s.directory_journal.as_ref() {
                    Some(journal) => journal.compact(seq, net).map_err(|e| e.to_string()),
                    None => Ok(()),
                })
            })
            .await;
        let result = match reloaded {
            Some((result, compacted)) => {
                if matches!(result, Reloaded::Swapped { .. }) {
                    self.note_directory_upkeep(compacted);
                }
                result
            }
            None => self.reload_failed(),
        };
        self.metrics.reloaded(&result);
        if matches!(result, Reloaded::Swapped { .. }) {
            self.metrics.serving(&self.store.current());
        }
        let error = match &result {
            Reloaded::Failed { error, .. } => Some(error.to_string()),
            _ => None,
        };
        let (outcome, from, revision) = match &result {
            Reloaded::Swapped { from, to } => ("swapped", Some(from.as_ref()), to.as_ref()),
            Reloaded::Unchanged(r) => ("unchanged", None, r.as_ref()),
            Reloaded::Failed { kept, .. } => ("failed", None, kept.as_ref()),
        };
        match &result {
            Reloaded::Swapped { from, to } => tracing::info!(%from, %to, trigger, "reloaded the bundle"),
            Reloaded::Unchanged(r) => tracing::debug!(revision = %r, trigger, "bundle unchanged"),
            Reloaded::Failed { kept, error } => {
                tracing::error!(kept = %kept, trigger, "reload failed; the old bundle is still served:\n{error}")
            }
        }
        let mut record = ReloadRecord::new(outcome, from, revision, error.as_deref(), trigger);
        record.caller = caller;
        let live_seq = self.store.current().live_seq();
        record.live_directory_seq = Some(live_seq).filter(|seq| *seq > 0);
        if outcome != "unchanged" {
            let _ = self.audit.submit_waiting(records::body(&record)).await;
        }
        result
    }

    /// Records a call the access rules refused, before the refusal is answered. It takes the
    /// overflow policy of decisions: under `deny` a full queue refuses (and counts) it.
    pub async fn refused(&self, method: &str, need: &str, reason: &str, caller: &Caller) {
        if !self.audit.is_on() {
            return;
        }
        let record = RefusedRecord::new(method, need, reason, caller);
        let _ = self.audit.submit(records::body(&record)).await;
    }

    /// Records the first load.
    pub async fn loaded(&self) {
        let snap = self.store.current();
        let mut record = ReloadRecord::new("loaded", None, snap.revision(), None, "start");
        record.live_directory_seq = Some(snap.live_seq()).filter(|seq| *seq > 0);
        let _ = self.audit.submit_waiting(records::body(&record)).await;
    }

    /// False when the service must not take traffic: audit writes fail and the policy is deny.
    pub fn serving(&self) -> bool {
        self.audit.healthy() || self.audit.config().on_full != audit::OnFull::Deny
    }

    /// In a fleet: whether every request is denied for a stale live state, as it changes
    /// (never, without a fleet: the channel is closed at once).
    pub fn denying_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        match &self.settings.fleet {
            Some(fleet) => fleet.denying_changes(),
            None => tokio::sync::watch::channel(false).1,
        }
    }

    /// `serving`, as it changes. Under any other overflow policy than deny it never changes
    /// (the channel is closed at once).
    pub fn serving_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        if self.audit.config().on_full == audit::OnFull::Deny {
            self.audit.health()
        } else {
            tokio::sync::watch::channel(true).1
        }
    }
}

/// What the fleet applies its stream's messages with.
impl crate::fleet::Applier for Service {
    fn applied(&self) -> u64 {
        self.live_applied()
    }

    fn journals(&self) -> (u64, u64) {
        (self.journal.as_ref().map_or(0, Journal::seq), self.store.current().live_seq())
    }

    fn has_local_state(&self) -> bool {
        self.live_applied() > 0 || !self.live.is_empty()
    }

    fn revision(&self) -> String {
        self.store.current().revision().to_string()
    }

    async fn apply(self: Arc<Self>, seq: u64, message: Result<Message, String>) -> Result<Outcome, String> {
        self.apply_streamed(seq, message).await
    }
}

/// What `/metrics` and `/readyz` read.
impl Source for Service {
    fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn sample(&self) -> Sample {
        let audit = self.audit.stats();
        let stale = self.store.last_failure().map_or(0, |f| (Utc::now() - f.stale_since).num_seconds().max(0));
        Sample {
            revision: Some(self.store.current().revision().clone()),
            stale_seconds: stale as u64,
            live_signals: self.live.len() as u64,
            audit_pending: audit.pending,
            audit_written: audit.written,
            audit_errors: audit.failed_writes,
            fleet: self.settings.fleet.as_ref().map(|fleet| {
                let fresh = fleet.freshness();
                let view = fleet.view(fleet.this(self.store.current().revision().to_string()));
                crate::metrics::FleetSample {
                    replicas: view.replicas.len() as u64,
                    lag: fresh.stream_seq.saturating_sub(fresh.applied),
                    revision_disagreement: view.replicas.iter().any(|r| r.other_revision),
                    stale_seconds: fresh.stale_seconds.unwrap_or_else(|| fleet.up_seconds()),
                    healthy: fresh.healthy,
                }
            }),
        }
    }

    fn ready(&self) -> bool {
        // A replica denying everything for a stale live state sends its callers elsewhere.
        self.serving() && !self.settings.fleet.as_ref().is_some_and(|f| f.denying())
    }
}

/// True if the directory of `snap` has the agent, blueprint or sponsor that `field` is about.
fn knows(snap: &Snapshot, field: Field, target: &str) -> bool {
    match field {
        Field::AgentEnabled | Field::AgentRisk => snap.agent(target).is_some(),
        Field::BlueprintEnabled => snap.blueprint(target).is_some(),
        Field::SponsorActive => snap.sponsor(target).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::{Config, Target};
    use crate::engine::Verdict;

    /// On a current-thread runtime, where `block_in_place` panics: a signal is journaled,
    /// applied and acknowledged, and a reload swaps.
    #[tokio::test]
    async fn signals_and_reloads_run_on_a_current_thread_runtime() {
        let bundle = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, bundle.path().join(path.file_name().unwrap())).unwrap();
            }
        }
        let state = tempfile::tempdir().unwrap();
        let live = Overlay::new();
        let (journal, _) = Journal::open(state.path(), &live).unwrap();
        let audit = Audit::start(Config::new(Target::Off)).unwrap();
        let store = Store::open(bundle.path()).unwrap();
        let service = Service::new(store, live, Some(journal), None, audit, Settings::default());
        let ask = || {
            let raw = serde_json::json!({"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"]});
            RawRequest::from_json(&raw).unwrap()
        };
        assert_eq!(service.decide(ask(), &Caller::default()).await.unwrap().decision, Verdict::Allow);

        let signal = Signal::new("disable_agent", "ag-mail-01", "", "test", "admin").unwrap();
        assert_eq!(service.signal(signal, Caller::default()).await.unwrap().seq, 1);
        let denied = service.decide(ask(), &Caller::default()).await.unwrap();
        assert_eq!(denied.reasons[0].code, ReasonCode::AgentDisabled);

        let policy = bundle.path().join("baseline.cedar");
        let text = std::fs::read_to_string(&policy).unwrap();
        std::fs::write(&policy, format!("{text}\n// a new revision\n")).unwrap();
        assert!(matches!(service.reload("test").await, Reloaded::Swapped { .. }));
    }
}
