//! The decision: guards first, then the enforced policies of the request's slices (fail
//! closed on any policy error), report-only policies beside them; and the per-policy
//! explanation behind `eval --explain`.

use std::sync::Arc;
use std::time::Instant;

use cedar_policy::{
    ActionConstraint, Effect, Entities, EntityUid, Policy, PolicySet, PrincipalConstraint, Request as CedarRequest,
    ResourceConstraint,
};
use serde::Serialize;

use crate::bundle::PolicyState;
use crate::index::{Compiled, Evaluated};
use crate::request::Request;
use crate::signals::{LiveRef, Overlay};
use crate::snapshot::{AgentRef, Snapshot};

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// A policy's effect, as the decision reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyEffect {
    Permit,
    Forbid,
}

impl From<Effect> for PolicyEffect {
    fn from(e: Effect) -> Self {
        match e {
            Effect::Permit => PolicyEffect::Permit,
            Effect::Forbid => PolicyEffect::Forbid,
        }
    }
}

/// Why a decision came out as it did (DESIGN §4, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    Policy,
    NoPermit,
    PolicyError,
    UnknownAgent,
    UnknownResource,
    AgentDisabled,
    BlueprintDisabled,
    SponsorInactive,
    AuditUnavailable,
    /// In a fleet, the live state is older than `--live-stale-after` and the policy is deny.
    LiveStateUnavailable,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Policy => "policy",
            ReasonCode::NoPermit => "no_permit",
            ReasonCode::PolicyError => "policy_error",
            ReasonCode::UnknownAgent => "unknown_agent",
            ReasonCode::UnknownResource => "unknown_resource",
            ReasonCode::AgentDisabled => "agent_disabled",
            ReasonCode::BlueprintDisabled => "blueprint_disabled",
            ReasonCode::SponsorInactive => "sponsor_inactive",
            ReasonCode::AuditUnavailable => "audit_unavailable",
            ReasonCode::LiveStateUnavailable => "live_state_unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub code: ReasonCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<PolicyEffect>,
    pub reason: Arc<str>,
}

/// A report-only policy that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportOnly {
    pub policy: Arc<str>,
    pub effect: PolicyEffect,
    pub reason: Arc<str>,
}

/// A policy that failed to evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyError {
    pub policy: Arc<str>,
    pub message: String,
    /// True for a report-only policy: it is reported but does not decide.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub report_only: bool,
}

/// The answer to one request (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub decision: Verdict,
    pub decision_id: String,
    pub request_id: Option<String>,
    pub reasons: Vec<Reason>,
    pub report_only: Vec<ReportOnly>,
    pub report_only_decision: Verdict,
    pub errors: Vec<PolicyError>,
    pub revision: Arc<str>,
    pub eval_us: u64,
}

impl Decision {
    /// A deny for a reason outside the policies (a guard, an unavailable audit log).
    pub fn deny(code: ReasonCode, reason: impl Into<Arc<str>>, revision: Arc<str>, request_id: Option<String>) -> Self {
        let reasons = vec![Reason { code, policy: None, effect: None, reason: reason.into() }];
        Decision::denied(reasons, revision, request_id)
    }

    fn denied(reasons: Vec<Reason>, revision: Arc<str>, request_id: Option<String>) -> Self {
        Decision {
            decision: Verdict::Deny,
            decision_id: new_decision_id(),
            request_id,
            reasons,
            report_only: Vec::new(),
            report_only_decision: Verdict::Deny,
            errors: Vec::new(),
            revision,
            eval_us: 0,
        }
    }

    pub fn is_allow(&self) -> bool {
        self.decision == Verdict::Allow
    }

    /// True if a policy id or a reason code named `name` is among the reasons.
    pub fn has_reason(&self, name: &str) -> bool {
        self.reasons.iter().any(|r| r.code.as_str() == name || r.policy.as_deref() == Some(name))
    }
}

/// A time-ordered unique id (UUID v7), so decision ids sort by time in the audit log.
pub fn new_decision_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Decides one request against one snapshot and the live overlay.
pub fn evaluate(snap: &Snapshot, live: &Overlay, req: &Request) -> Decision {
    let started = Instant::now();
    let mut decision = decide(snap, live, req);
    decision.eval_us = started.elapsed().as_micros() as u64;
    decision
}

fn decide(snap: &Snapshot, live: &Overlay, req: &Request) -> Decision {
    let revision = snap.revision().clone();
    let agent = snap.agent(&req.agent);
    let resource = snap.resource(&req.resource);
    let guards = guard_reasons(live, req, agent, resource.is_some());
    let (Some(agent), Some(resource), true) = (agent, resource, guards.is_empty()) else {
        return Decision::denied(guards, revision, req.request_id.clone());
    };
    let risk = live.agent_risk(agent.id()).map_or(agent.risk(), |l| l.value);
    let (cedar_request, entities) = match snap.cedar_request(req, agent, resource, risk) {
        Ok(r) => r,
        Err(message) => {
            return Decision::deny(
                ReasonCode::PolicyError,
                format!("the request could not be put to the policies: {message}"),
                revision,
                req.request_id.clone(),
            );
        }
    };
    let evaluated = snap.evaluate_slices(agent, resource, req.action(), &cedar_request, &entities);
    combine(evaluated, revision, req.request_id.clone())
}

/// The guards of DESIGN §4, all that apply; empty if the request may go to the policies.
fn guard_reasons(live: &Overlay, req: &Request, agent: Option<AgentRef<'_>>, resource_known: bool) -> Vec<Reason> {
    let mut reasons = Vec::new();
    let mut push = |code: ReasonCode, reason: String| {
        reasons.push(Reason { code, policy: None, effect: None, reason: reason.into() })
    };
    if agent.is_none() {
        push(ReasonCode::UnknownAgent, format!("agent `{}` is not in the directory", req.agent));
    }
    if !resource_known {
        push(ReasonCode::UnknownResource, format!("resource `{}` is not in the directory", req.resource));
    }
    let Some(agent) = agent else { return reasons };
    // A live value (a signal) wins over the directory's.
    let mut flag = |live: Option<LiveRef<'_, bool>>,
                    in_directory: bool,
                    code: ReasonCode,
                    what: &dyn Fn() -> String,
                    (made, state): (&str, &str)| {
        match live {
            Some(l) if !l.value => {
                let why = if l.mark.reason.is_empty() { String::new() } else { format!(": {}", l.mark.reason) };
                let at = l.mark.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                push(code, format!("{} was {made} by {} at {at}{why}", what(), l.mark.by));
            }
            None if !in_directory => push(code, format!("{} is {state} in the directory", what())),
            _ => {}
        }
    };
    flag(
        live.agent_enabled(agent.id()),
        agent.enabled(),
        ReasonCode::AgentDisabled,
        &|| format!("agent `{}`", agent.id()),
        ("disabled", "disabled"),
    );
    flag(
        live.blueprint_enabled(agent.blueprint_id()),
        agent.blueprint_enabled(),
        ReasonCode::BlueprintDisabled,
        &|| format!("blueprint `{}` of agent `{}`", agent.blueprint_id(), agent.id()),
        ("disabled", "disabled"),
    );
    flag(
        live.sponsor_active(agent.sponsor_id()),
        agent.sponsor_active(),
        ReasonCode::SponsorInactive,
        &|| format!("sponsor `{}` of agent `{}`", agent.sponsor_id(), agent.id()),
        ("marked inactive", "inactive"),
    );
    reasons
}

/// DESIGN §4: any policy error denies (Cedar skips an erroring policy, which could drop a
/// forbid); otherwise a satisfied forbid denies, otherwise a satisfied permit allows.
fn verdict(forbids: bool, permits: bool, errors: bool) -> Verdict {
    if !errors && !forbids && permits { Verdict::Allow } else { Verdict::Deny }
}

fn policy_reason(p: &Compiled, code: ReasonCode) -> Reason {
    Reason { code, policy: Some(p.id.clone()), effect: Some(p.effect.into()), reason: p.reason.clone() }
}

fn combine(evaluated: Evaluated<'_>, revision: Arc<str>, request_id: Option<String>) -> Decision {
    let Evaluated { on, report_only: report } = evaluated;
    let decision = verdict(!on.forbids.is_empty(), !on.permits.is_empty(), !on.errors.is_empty());
    let mut determining = on.determining().to_vec();
    determining.sort_by_key(|p| p.order);
    let mut reasons: Vec<Reason> = determining.into_iter().map(|p| policy_reason(p, ReasonCode::Policy)).collect();
    let mut errored = on.errors.iter().collect::<Vec<_>>();
    errored.sort_by_key(|(p, _)| p.order);
    if !errored.is_empty() {
        // A permit that was satisfied did not allow: only the errors explain the deny.
        if on.forbids.is_empty() {
            reasons.clear();
        }
        reasons.extend(errored.iter().map(|(p, message)| Reason {
            reason: Arc::from(format!("policy `{}` failed to evaluate, so the request is denied: {message}", p.id)),
            ..policy_reason(p, ReasonCode::PolicyError)
        }));
    } else if decision == Verdict::Deny && on.forbids.is_empty() {
        reasons.push(Reason {
            code: ReasonCode::NoPermit,
            policy: None,
            effect: None,
            reason: Arc::from("no policy permits this request"),
        });
    }

    let mut matched: Vec<&Compiled> = report.forbids.iter().chain(&report.permits).copied().collect();
    matched.sort_by_key(|p| p.order);
    let report_only_decision = verdict(
        !on.forbids.is_empty() || !report.forbids.is_empty(),
        !on.permits.is_empty() || !report.permits.is_empty(),
        !on.errors.is_empty() || !report.errors.is_empty(),
    );
    let errors = on
        .errors
        .iter()
        .map(|e| (e, false))
        .chain(report.errors.iter().map(|e| (e, true)))
        .map(|((p, message), report_only)| PolicyError { policy: p.id.clone(), message: message.clone(), report_only })
        .collect();

    Decision {
        decision,
        decision_id: new_decision_id(),
        request_id,
        reasons,
        report_only: matched
            .into_iter()
            .map(|p| ReportOnly { policy: p.id.clone(), effect: p.effect.into(), reason: p.reason.clone() })
            .collect(),
        report_only_decision,
        errors,
        revision,
        eval_us: 0,
    }
}

/// How one policy fared against a request (`eval --explain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub policy: Arc<str>,
    pub effect: PolicyEffect,
    pub state: PolicyState,
    /// `file:line:column` of the policy.
    pub at: String,
    pub outcome: ExplainOutcome,
    /// For `not_applied`: the first part of the policy that did not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmet: Option<Unmet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExplainOutcome {
    /// Scope and condition matched.
    Applied,
    NotApplied,
    /// The condition failed to evaluate.
    Error,
    /// The agent or resource is unknown, so no policy could be put to the test.
    NotEvaluated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmet {
    Principal,
    Action,
    Resource,
    Condition,
}

/// Every policy of the bundle (off ones too, as if on) against the request.
pub fn explain(snap: &Snapshot, live: &Overlay, req: &Request) -> Vec<Explanation> {
    let request = match (snap.agent(&req.agent), snap.resource(&req.resource)) {
        (Some(agent), Some(resource)) => {
            let risk = live.agent_risk(agent.id()).map_or(agent.risk(), |l| l.value);
            snap.cedar_request(req, agent, resource, risk).ok()
        }
        _ => None,
    };
    snap.policies()
        .iter()
        .map(|p| {
            let (outcome, unmet, error) = match &request {
                None => (ExplainOutcome::NotEvaluated, None, None),
                Some((r, entities)) => explain_one(snap, &p.policy, r, entities),
            };
            Explanation {
                policy: p.id.clone(),
                effect: p.effect.into(),
                state: p.state,
                at: format!("{}:{}:{}", p.file, p.line, p.column),
                outcome,
                unmet,
                error,
            }
        })
        .collect()
}

fn explain_one(
    snap: &Snapshot,
    policy: &Policy,
    req: &CedarRequest,
    entities: &Entities,
) -> (ExplainOutcome, Option<Unmet>, Option<String>) {
    let mut alone = PolicySet::new();
    if let Err(e) = alone.add(policy.clone()) {
        return (ExplainOutcome::Error, None, Some(e.to_string()));
    }
    let response = snap.is_authorized(req, &alone, entities);
    if let Some(e) = response.diagnostics().errors().next() {
        return (ExplainOutcome::Error, None, Some(e.to_string()));
    }
    if response.diagnostics().reason().any(|id| id == policy.id()) {
        return (ExplainOutcome::Applied, None, None);
    }
    // Cedar's `uid in target`: `uid` is `target` or one of its ancestors' descendants.
    let within = |target: &EntityUid, uid: Option<&EntityUid>| {
        uid.is_some_and(|uid| uid == target || entities.is_ancestor_of(target, uid))
    };
    let (principal, action, resource) = (req.principal(), req.action(), req.resource());
    let principal_ok = match policy.principal_constraint() {
        PrincipalConstraint::Any => true,
        PrincipalConstraint::Eq(uid) => principal == Some(&uid),
        PrincipalConstraint::In(uid) => within(&uid, principal),
        PrincipalConstraint::Is(ty) => principal.is_some_and(|p| *p.type_name() == ty),
        PrincipalConstraint::IsIn(ty, uid) => {
            principal.is_some_and(|p| *p.type_name() == ty) && within(&uid, principal)
        }
    };
    let action_ok = match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => action == Some(&uid),
        ActionConstraint::In(uids) => uids.iter().any(|uid| within(uid, action)),
    };
    let resource_ok = match policy.resource_constraint() {
        ResourceConstraint::Any => true,
        ResourceConstraint::Eq(uid) => resource == Some(&uid),
        ResourceConstraint::In(uid) => within(&uid, resource),
        ResourceConstraint::Is(ty) => resource.is_some_and(|r| *r.type_name() == ty),
        ResourceConstraint::IsIn(ty, uid) => resource.is_some_and(|r| *r.type_name() == ty) && within(&uid, resource),
    };
    let unmet = if !principal_ok {
        Unmet::Principal
    } else if !action_ok {
        Unmet::Action
    } else if !resource_ok {
        Unmet::Resource
    } else {
        Unmet::Condition
    };
    (ExplainOutcome::NotApplied, Some(unmet), None)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod differential;
