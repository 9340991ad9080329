//! The decision: guards first, then the enforced policies of the request's slices (fail
//! closed on any policy error), report-only policies beside them; and the per-policy
//! explanation behind `eval --explain`.

use std::sync::Arc;
use std::time::Instant;

use cedar_policy::{
    ActionConstraint, Context, Effect, EntityUid, Policy, PolicySet, PrincipalConstraint, Request as CedarRequest,
    ResourceConstraint,
};
use chrono::{Datelike, Timelike};
use serde::Serialize;

use crate::bundle::PolicyState;
use crate::cedar::ContextBuilder;
use crate::directory::{EntityTypes, RiskLevel};
use crate::index::{Compiled, Evaluated, Keys};
use crate::request::{Action, Request};
use crate::signals::{LiveRef, Overlay};
use crate::snapshot::{AgentEntry, Snapshot};

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
    let revision = snap.revision.clone();
    let agent = snap.agent(&req.agent);
    let resource = snap.resource(&req.resource);
    let guards = guard_reasons(snap, live, req, agent.map(|(_, e)| e), resource.is_some());
    let (Some((agent, entry)), Some((resource, resource_uid)), true) = (agent, resource, guards.is_empty()) else {
        return Decision::denied(guards, revision, req.request_id.clone());
    };
    let risk = live.agent_risk(&agent.id).map_or(agent.risk, |l| l.value);
    let cedar_request = match cedar_request(snap, req, &entry.uid, resource_uid, risk) {
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
    let keys = Keys::of(agent, &resource.id, req.action);
    let evaluated = snap.index.evaluate(&keys, &cedar_request, &snap.entities);
    combine(evaluated, revision, req.request_id.clone())
}

/// The guards of DESIGN §4, all that apply; empty if the request may go to the policies.
fn guard_reasons(
    snap: &Snapshot,
    live: &Overlay,
    req: &Request,
    entry: Option<&AgentEntry>,
    resource_known: bool,
) -> Vec<Reason> {
    let mut reasons = Vec::new();
    let mut push = |code: ReasonCode, reason: String| {
        reasons.push(Reason { code, policy: None, effect: None, reason: reason.into() })
    };
    if entry.is_none() {
        push(ReasonCode::UnknownAgent, format!("agent `{}` is not in the directory", req.agent));
    }
    if !resource_known {
        push(ReasonCode::UnknownResource, format!("resource `{}` is not in the directory", req.resource));
    }
    let Some(entry) = entry else { return reasons };
    let agent = &snap.bundle.directory.agents[entry.index];
    let blueprint = snap.blueprint_of(entry);
    let sponsor = snap.sponsor_of(entry);
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
        live.agent_enabled(&agent.id),
        agent.enabled,
        ReasonCode::AgentDisabled,
        &|| format!("agent `{}`", agent.id),
        ("disabled", "disabled"),
    );
    flag(
        live.blueprint_enabled(&blueprint.id),
        blueprint.enabled,
        ReasonCode::BlueprintDisabled,
        &|| format!("blueprint `{}` of agent `{}`", blueprint.id, agent.id),
        ("disabled", "disabled"),
    );
    flag(
        live.sponsor_active(&sponsor.id),
        sponsor.active,
        ReasonCode::SponsorInactive,
        &|| format!("sponsor `{}` of agent `{}`", sponsor.id, agent.id),
        ("marked inactive", "inactive"),
    );
    reasons
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The Cedar request: cached entity ids, the context of DESIGN §3 built as values, no schema
/// check (our types already guarantee the shape; a unit test checks it against the schema).
fn cedar_request(
    snap: &Snapshot,
    req: &Request,
    principal: &EntityUid,
    resource: &EntityUid,
    agent_risk: RiskLevel,
) -> Result<CedarRequest, String> {
    let context = context(snap, req, agent_risk)?;
    CedarRequest::new(principal.clone(), snap.action_uid(req.action).clone(), resource.clone(), context, None)
        .map_err(|e| e.to_string())
}

fn context(snap: &Snapshot, req: &Request, agent_risk: RiskLevel) -> Result<Context, String> {
    let mut c = ContextBuilder::new();
    let locations = req.client_ip.into_iter().flat_map(|ip| snap.bundle.locations.containing(ip));
    c.strings("locations", locations.map(|l| &**l));
    c.string("flow", req.flow.as_str());
    if let Some(client_ip) = req.client_ip {
        c.ip("client_ip", client_ip)?;
    }
    c.datetime("time", req.time)?;
    c.long("hour", i64::from(req.time.hour()));
    c.string("weekday", WEEKDAYS[req.time.weekday().num_days_from_monday() as usize]);
    c.string("agent_risk", agent_risk.as_str());
    c.string("signin_risk", req.signin_risk.as_str());
    match req.action {
        Action::RequestToken => {
            c.strings("scopes", req.scopes.iter().map(String::as_str));
            c.string("grant_type", req.grant_type.as_deref().unwrap_or_default());
            if let Some(user) = &req.user {
                c.entity("user", &EntityTypes::uid(&snap.types.user, user));
            }
        }
        Action::CallApi => {
            c.string("method", req.method.as_deref().unwrap_or_default());
            c.string("path", req.path.as_deref().unwrap_or_default());
        }
    }
    Ok(c.build())
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
        (Some((agent, entry)), Some((_, resource_uid))) => {
            let risk = live.agent_risk(&agent.id).map_or(agent.risk, |l| l.value);
            cedar_request(snap, req, &entry.uid, resource_uid, risk).ok()
        }
        _ => None,
    };
    snap.bundle
        .policies
        .iter()
        .map(|p| {
            let (outcome, unmet, error) = match &request {
                None => (ExplainOutcome::NotEvaluated, None, None),
                Some(r) => explain_one(snap, &p.policy, r),
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
) -> (ExplainOutcome, Option<Unmet>, Option<String>) {
    let mut alone = PolicySet::new();
    if let Err(e) = alone.add(policy.clone()) {
        return (ExplainOutcome::Error, None, Some(e.to_string()));
    }
    let response = snap.authorizer.is_authorized(req, &alone, &snap.entities);
    if let Some(e) = response.diagnostics().errors().next() {
        return (ExplainOutcome::Error, None, Some(e.to_string()));
    }
    if response.diagnostics().reason().any(|id| id == policy.id()) {
        return (ExplainOutcome::Applied, None, None);
    }
    let within = |target: &EntityUid, uid: Option<&EntityUid>| {
        uid.is_some_and(|uid| uid == target || snap.entities.is_ancestor_of(target, uid))
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
