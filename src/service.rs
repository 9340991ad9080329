//! The running service, transport aside: decides with the current snapshot and the live
//! overlay, audits every decision before it is answered, takes signals (journaled first) and
//! reloads. The gRPC and Envoy front ends are thin layers over this.

use std::sync::Arc;

use chrono::Utc;

use crate::audit::{self, Audit, Caller, DecisionRecord, Refused, ReloadRecord};
use crate::engine::{Decision, ReasonCode, evaluate};
use crate::request::{RawRequest, Request, RequestError};
use crate::signals::{Field, Journal, JournalError, Overlay, Signal, SignalError};
use crate::snapshot::{Reloaded, Snapshot, Store};

/// Most requests in one `EvaluateBatch`.
pub const MAX_BATCH: usize = 1000;

/// What the service accepts, beyond the shape of each request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Refuse a request whose `time` is further than this from the server's clock.
    pub max_clock_skew: Option<chrono::TimeDelta>,
    /// Most live signals for targets the served directory does not know.
    pub max_unknown_signals: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_clock_skew: None, max_unknown_signals: 10_000 }
    }
}

pub struct Service {
    store: Store,
    live: Overlay,
    journal: Option<Journal>,
    audit: Audit,
    settings: Settings,
    /// The journal's upkeep (compaction) error, reported once and shown in Status.
    journal_error: std::sync::Mutex<Option<String>>,
    /// One signal at a time: journal order is apply order, a compaction sees every signal
    /// journaled before it, and one barrier wait is in progress at a time.
    signalling: tokio::sync::Mutex<()>,
}

/// The result of one signal.
#[derive(Debug, Clone)]
pub struct Signalled {
    pub seq: u64,
    pub signal: Signal,
    pub unknown_target: bool,
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
    #[error("the signal task failed")]
    Aborted,
}

impl Service {
    pub fn new(
        store: Store,
        live: Overlay,
        journal: Option<Journal>,
        audit: Audit,
        settings: Settings,
    ) -> Arc<Service> {
        Arc::new(Service {
            store,
            live,
            journal,
            audit,
            settings,
            journal_error: std::sync::Mutex::new(None),
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
        let snap = self.store.current();
        complete(&snap, &mut raw);
        let request = raw.validate_with(Utc::now(), self.settings.max_clock_skew)?;
        let decision = evaluate(&snap, &self.live, &request);
        Ok(self.audited(&snap, &request, decision, caller).await)
    }

    /// Decides many requests, each on its own: one bad item is an error for that item only.
    pub async fn decide_batch(&self, raws: Vec<RawRequest>, caller: &Caller) -> Vec<Result<Decision, RequestError>> {
        let _in_flight = self.live.enter();
        let snap = self.store.current();
        let now = Utc::now();
        let mut pending = Vec::with_capacity(raws.len());
        for raw in raws {
            pending.push(raw.validate_with(now, self.settings.max_clock_skew).map(|request| {
                let decision = evaluate(&snap, &self.live, &request);
                (request, decision)
            }));
        }
        // Every record is queued before any is awaited, so one fsync covers the batch.
        let snap = &snap;
        let audits = pending.into_iter().map(|item| async move {
            let (request, decision) = item?;
            Ok(self.audited(snap, &request, decision, caller).await)
        });
        futures::future::join_all(audits).await
    }

    async fn audited(&self, snap: &Snapshot, request: &Request, decision: Decision, caller: &Caller) -> Decision {
        if !self.audit.is_on() {
            return decision;
        }
        let body = audit::body(&DecisionRecord::new(snap, request, &decision, caller));
        match self.audit.submit(body).await {
            Ok(()) => decision,
            Err(refused) => {
                let why = match refused {
                    Refused::QueueFull => "the audit log cannot keep up, so no decision can be recorded",
                    Refused::Closed => "the audit log is closed, so no decision can be recorded",
                    Refused::Unavailable => "the audit log cannot be written, so no decision can be recorded",
                };
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

    /// The journal's upkeep error, if its last compaction failed.
    pub fn journal_error(&self) -> Option<String> {
        self.journal_error.lock().ok().and_then(|e| e.clone())
    }

    async fn take_signal(&self, signal: Signal, caller: &Caller) -> Result<Signalled, SignalFailure> {
        let journal = self.journal.as_ref().ok_or(SignalFailure::NoJournal)?;
        let _one_at_a_time = self.signalling.lock().await;
        // Signals for ids the directory lacks are kept for agents yet to come, but not without
        // bound: a flood of them would grow the overlay and the journal for ever.
        let snap = self.store.current();
        if signal.value != crate::signals::Value::Cleared
            && !knows(&snap, signal.field, &signal.target)
            && !self.live.has(signal.field, &signal.target)
        {
            let live = self.unknown_signals(&snap);
            let cap = self.settings.max_unknown_signals;
            if live >= cap {
                return Err(SignalFailure::TooManyUnknown { target: signal.target.clone(), live, cap });
            }
        }
        drop(snap);
        let seq = tokio::task::block_in_place(|| journal.append(&signal))?;
        self.live.apply(&signal);
        self.live.quiesce().await;
        let unknown_target = self.unknown_target(&self.store.current(), &signal);
        #[derive(serde::Serialize)]
        struct SignalRecord<'a> {
            kind: &'static str,
            time: chrono::DateTime<Utc>,
            journal_seq: u64,
            signal: &'a Signal,
            unknown_target: bool,
            caller: &'a Caller,
        }
        let record = SignalRecord {
            kind: "signal",
            time: Utc::now(),
            journal_seq: seq,
            signal: &signal,
            unknown_target,
            caller,
        };
        // A signal's record waits for room whatever the overflow policy: signals are rare and
        // the signal already holds.
        let _ = self.audit.submit_waiting(audit::body(&record)).await;
        let compacted = tokio::task::block_in_place(|| journal.compact_if_needed(&self.live));
        self.note_journal_upkeep(compacted.err().map(|e| e.to_string()));
        Ok(Signalled { seq, signal, unknown_target })
    }

    /// Records the outcome of the journal's upkeep: an error is logged once, not per signal
    /// (a read-only state folder fails every compaction), and shown in Status until it clears.
    fn note_journal_upkeep(&self, error: Option<String>) {
        let Ok(mut slot) = self.journal_error.lock() else { return };
        match (&*slot, &error) {
            (None, Some(e)) => {
                tracing::error!(error = %e, "signal journal compaction failed; retried with later signals")
            }
            (Some(_), None) => tracing::info!("signal journal compaction succeeds again"),
            _ => {}
        }
        *slot = error;
    }

    /// True if the signal names an agent, blueprint or sponsor the served directory lacks.
    pub fn unknown_target(&self, snap: &Snapshot, signal: &Signal) -> bool {
        !knows(snap, signal.field, &signal.target)
    }

    /// Reloads the bundle and records the outcome, to the end even if the caller goes away.
    pub async fn reload(self: &Arc<Self>, trigger: &'static str) -> Reloaded {
        let service = self.clone();
        match tokio::spawn(async move { service.take_reload(trigger).await }).await {
            Ok(result) => result,
            Err(_) => {
                let kept = self.store.current().revision().clone();
                let error = crate::bundle::BundleErrors(vec![crate::bundle::BundleError {
                    file: self.store.dir().display().to_string(),
                    line: None,
                    column: None,
                    message: "the reload task failed".into(),
                }]);
                Reloaded::Failed { kept, error }
            }
        }
    }

    async fn take_reload(&self, trigger: &str) -> Reloaded {
        let result = tokio::task::block_in_place(|| self.store.reload());
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
        let record = ReloadRecord {
            kind: "reload",
            time: Utc::now(),
            outcome,
            from,
            revision,
            error: error.as_deref(),
            trigger,
        };
        if outcome != "unchanged" {
            let _ = self.audit.submit_waiting(audit::body(&record)).await;
        }
        result
    }

    /// Records the first load.
    pub async fn loaded(&self) {
        let snap = self.store.current();
        let record = ReloadRecord {
            kind: "reload",
            time: Utc::now(),
            outcome: "loaded",
            from: None,
            revision: snap.revision(),
            error: None,
            trigger: "start",
        };
        let _ = self.audit.submit_waiting(audit::body(&record)).await;
    }

    /// False when the service must not take traffic: audit writes fail and the policy is deny.
    pub fn serving(&self) -> bool {
        self.audit.healthy() || self.audit.config().on_full != audit::OnFull::Deny
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
