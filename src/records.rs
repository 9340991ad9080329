//! What the service writes to the audit log: the record of each decision, signal, reload and
//! refused admin call, and who asked. The log frames a record's body (`v`, `seq`, the hashes); the fields here are
//! the rest of a record whose `v` is 1, so their names and order are part of the file format.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::directory::{Change, Ids};
use crate::engine::{Decision, PolicyError, Reason, ReportOnly, Verdict};
use crate::request::Request;
use crate::signals::Signal;
use crate::snapshot::Snapshot;

/// A record's body as compact JSON (an object), as the audit log takes it.
pub fn body<T: Serialize>(record: &T) -> String {
    // Room for a decision record at once (about 900 bytes), rather than growing from 128.
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, record)
        .map_err(|e| e.to_string())
        // serde_json writes valid UTF-8 only; were it not to, the record says so, never empty.
        .and_then(|()| String::from_utf8(out).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| format!("{{\"kind\":\"unserializable\",\"error\":{e:?}}}"))
}

/// Who asked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Caller {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Arc<str>>,
    /// The identity of the peer's client certificate (its SPIFFE ID, DNS name or common name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<str>>,
    /// For a gateway's Check: the downstream principal the gateway reports (Envoy's
    /// `attributes.source.principal`), the party the call is made for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The name (never the value) of the access file's token that allowed the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `grpc`, `envoy`, `cli`.
    pub via: &'static str,
    /// In a fleet: the replica the call came to, for a change another replica applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<Arc<str>>,
}

/// As logs show a caller: how it came, and who it is (its identity, else its address).
impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.identity, &self.peer) {
            (Some(identity), Some(peer)) => write!(f, "{} {} ({peer})", self.via, crate::input::printable(identity)),
            (Some(identity), None) => write!(f, "{} {}", self.via, crate::input::printable(identity)),
            (None, Some(peer)) => write!(f, "{} {peer}", self.via),
            (None, None) => f.write_str(self.via),
        }
    }
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
    pub decision: Verdict,
    pub reasons: &'a [Reason],
    pub report_only: &'a [ReportOnly],
    pub report_only_decision: Verdict,
    pub errors: &'a [PolicyError],
    pub revision: &'a str,
    pub eval_us: u64,
    pub caller: &'a Caller,
}

impl<'a> DecisionRecord<'a> {
    /// The record of `decision`, with the agent's blueprint and sponsor from the snapshot
    /// that decided it.
    pub fn new(snap: &'a Snapshot, request: &'a Request, decision: &'a Decision, caller: &'a Caller) -> Self {
        let agent = snap.agent(&request.agent);
        DecisionRecord::of(request, agent.map(|a| a.blueprint_id()), agent.map(|a| a.sponsor_id()), decision, caller)
    }

    /// The record of `decision` for an agent of `blueprint` and `sponsor` (None: unknown).
    pub fn of(
        request: &'a Request,
        blueprint: Option<&'a str>,
        sponsor: Option<&'a str>,
        decision: &'a Decision,
        caller: &'a Caller,
    ) -> Self {
        DecisionRecord {
            kind: "decision",
            time: Utc::now(),
            decision_id: &decision.decision_id,
            request_id: decision.request_id.as_deref(),
            request,
            blueprint,
            sponsor,
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

/// The record of a signal, once it is journaled, applied and no decision before it is on its way.
#[derive(Serialize)]
pub struct SignalRecord<'a> {
    pub kind: &'static str,
    pub time: DateTime<Utc>,
    pub journal_seq: u64,
    pub signal: &'a Signal,
    pub unknown_target: bool,
    pub caller: &'a Caller,
}

impl<'a> SignalRecord<'a> {
    pub fn new(journal_seq: u64, signal: &'a Signal, unknown_target: bool, caller: &'a Caller) -> Self {
        SignalRecord { kind: "signal", time: Utc::now(), journal_seq, signal, unknown_target, caller }
    }
}

/// The record of a live directory change, once it is journaled, applied, and no decision
/// taken before it is still on its way. It names what changed (the ids); the journal under
/// `--state` holds the records themselves.
#[derive(Serialize)]
pub struct DirectoryRecord<'a> {
    pub kind: &'static str,
    pub time: DateTime<Utc>,
    pub journal_seq: u64,
    pub by: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: &'a str,
    pub summary: String,
    pub upsert: Ids,
    pub remove: &'a Ids,
    /// The change itself, when it is small (up to 64 KiB): the fields it set. A larger one is
    /// named by its ids only; the journal under `--state` holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<&'a Change>,
    /// The bundle revision the change applied over.
    pub revision: &'a str,
    pub caller: &'a Caller,
}

impl<'a> DirectoryRecord<'a> {
    pub fn new(
        journal_seq: u64,
        change: &'a Change,
        by: &'a str,
        reason: &'a str,
        revision: &'a str,
        caller: &'a Caller,
    ) -> Self {
        DirectoryRecord {
            kind: "directory",
            time: Utc::now(),
            journal_seq,
            by,
            reason,
            summary: change.summary(),
            upsert: change.upsert.ids(),
            remove: &change.remove,
            change: change.to_json().ok().filter(|j| j.len() <= 64 << 10).map(|_| change),
            revision,
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
    /// Who asked for it, for a reload asked for through AdminService.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<&'a Caller>,
    /// The journal number of the last live directory change in force, when there is one: the
    /// `directory` records before it should account for every number up to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_directory_seq: Option<u64>,
}

impl<'a> ReloadRecord<'a> {
    pub fn new(
        outcome: &'a str,
        from: Option<&'a str>,
        revision: &'a str,
        error: Option<&'a str>,
        trigger: &'a str,
    ) -> Self {
        ReloadRecord {
            kind: "reload",
            time: Utc::now(),
            outcome,
            from,
            revision,
            error,
            trigger,
            caller: None,
            live_directory_seq: None,
        }
    }
}

/// The record of an admin call refused by the access rules (`serve --access`).
#[derive(Serialize)]
pub struct RefusedRecord<'a> {
    pub kind: &'static str,
    pub time: DateTime<Utc>,
    /// The gRPC method, as `/agentca.v1.AdminService/Signal`.
    pub method: &'a str,
    /// The role the call needs: `decide`, `read`, `signal` or `admin`.
    pub need: &'a str,
    /// `no_credentials`, `bad_token` or `no_role`.
    pub reason: &'a str,
    pub caller: &'a Caller,
}

impl<'a> RefusedRecord<'a> {
    pub fn new(method: &'a str, need: &'a str, reason: &'a str, caller: &'a Caller) -> Self {
        RefusedRecord { kind: "refused", time: Utc::now(), method, need, reason, caller }
    }
}

#[cfg(test)]
mod tests;
