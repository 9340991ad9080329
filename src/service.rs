//! The running service, transport aside: decides with the current snapshot and the live
//! overlay, audits every decision before it is answered, takes signals (journaled first) and
//! reloads. The gRPC and Envoy front ends are thin layers over this.

use std::sync::Arc;

use chrono::Utc;

use crate::audit::{self, Audit, Caller, DecisionRecord, Refused, ReloadRecord};
use crate::engine::{Decision, ReasonCode, evaluate};
use crate::request::{RawRequest, Request, RequestError};
use crate::signals::{Journal, JournalError, Overlay, Signal};
use crate::snapshot::{Reloaded, Snapshot, Store};

/// Most requests in one `EvaluateBatch`.
pub const MAX_BATCH: usize = 1000;

pub struct Service {
    pub store: Store,
    pub live: Overlay,
    pub journal: Option<Journal>,
    pub audit: Audit,
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
    Journal(#[from] JournalError),
    #[error("the signal task failed")]
    Aborted,
}

impl Service {
    pub fn new(store: Store, live: Overlay, journal: Option<Journal>, audit: Audit) -> Arc<Service> {
        Arc::new(Service { store, live, journal, audit, signalling: tokio::sync::Mutex::new(()) })
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
        let request = raw.validate(Utc::now())?;
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
            pending.push(raw.validate(now).map(|request| {
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

    async fn take_signal(&self, signal: Signal, caller: &Caller) -> Result<Signalled, SignalFailure> {
        let journal = self.journal.as_ref().ok_or(SignalFailure::NoJournal)?;
        let _one_at_a_time = self.signalling.lock().await;
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
        if let Err(e) = tokio::task::block_in_place(|| journal.compact_if_needed(&self.live)) {
            tracing::warn!(error = %e, "signal journal compaction failed; it will be retried");
        }
        Ok(Signalled { seq, signal, unknown_target })
    }

    /// True if the signal names an agent, blueprint or sponsor the served directory lacks.
    pub fn unknown_target(&self, snap: &Snapshot, signal: &Signal) -> bool {
        use crate::signals::Field;
        let d = &snap.bundle.directory;
        match signal.field {
            Field::AgentEnabled | Field::AgentRisk => snap.agent(&signal.target).is_none(),
            Field::BlueprintEnabled => !d.blueprints.iter().any(|b| b.id == signal.target),
            Field::SponsorActive => !d.sponsors.iter().any(|s| s.id == signal.target),
        }
    }

    /// Reloads the bundle and records the outcome, to the end even if the caller goes away.
    pub async fn reload(self: &Arc<Self>, trigger: &'static str) -> Reloaded {
        let service = self.clone();
        match tokio::spawn(async move { service.take_reload(trigger).await }).await {
            Ok(result) => result,
            Err(_) => {
                let kept = self.store.current().revision.clone();
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
            revision: &snap.revision,
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
