//! The policy index: policies sliced by principal scope (global, agent, blueprint, sponsor),
//! action and resource, so that a request evaluates only the policies that can apply to it.
//!
//! Cedar decides the same over disjoint slices as over their union: any satisfied forbid
//! denies, otherwise any satisfied permit allows. A response's `reason()` is its satisfied
//! forbids if it has any, otherwise its satisfied permits; errors are per policy. So the
//! engine calls Cedar once per non-empty slice and combines (see `Outcome`).

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Authorizer, Decision as CedarDecision, Effect, Entities, EntityUid, PolicyId, PolicySet,
    PrincipalConstraint, Request as CedarRequest, ResourceConstraint,
};

use crate::bundle::{BundlePolicy, PolicyState};
use crate::directory::EntityTypes;
use crate::request::Action;

/// What a decision needs to know of a policy, by id.
#[derive(Debug, Clone)]
pub struct PolicyMeta {
    pub id: Arc<str>,
    pub effect: Effect,
    pub state: PolicyState,
    pub reason: Arc<str>,
    /// Position in the bundle, so that reasons come out in a stable order.
    pub order: usize,
}

/// The policies of one (principal scope, action, resource) key, by state and effect.
#[derive(Debug, Default)]
pub struct Slice {
    /// Enforced policies, both effects (one Cedar call gives the decision of the slice).
    pub on: PolicySet,
    /// Report-only forbids and permits apart: every matching one is reported, and Cedar
    /// hides satisfied permits when a forbid is satisfied in the same call.
    pub report_forbid: PolicySet,
    pub report_permit: PolicySet,
}

impl Slice {
    fn add(&mut self, p: &BundlePolicy) -> Result<(), Box<cedar_policy::PolicySetError>> {
        let set = match (p.state, p.effect) {
            (PolicyState::On, _) => &mut self.on,
            (PolicyState::ReportOnly, Effect::Forbid) => &mut self.report_forbid,
            (PolicyState::ReportOnly, Effect::Permit) => &mut self.report_permit,
            (PolicyState::Off, _) => return Ok(()),
        };
        set.add(p.policy.clone()).map_err(Box::new)
    }
}

/// The slices of one action within one principal scope.
#[derive(Debug, Default)]
struct Target {
    any_resource: Slice,
    by_resource: HashMap<Box<str>, Slice>,
}

/// The slices of one principal scope, by action.
#[derive(Debug, Default)]
struct Scope {
    actions: [Target; 2],
}

/// Where a policy's principal scope puts it.
enum PrincipalKey {
    Global,
    Agent(String),
    Blueprint(String),
    Sponsor(String),
    /// The scope names no agent, blueprint or sponsor: it can never match an agent.
    Never,
}

/// Policies keyed by principal scope, action and resource.
#[derive(Debug, Default)]
pub struct Index {
    global: Scope,
    agents: HashMap<Box<str>, Scope>,
    blueprints: HashMap<Box<str>, Scope>,
    sponsors: HashMap<Box<str>, Scope>,
    meta: HashMap<PolicyId, PolicyMeta>,
    /// Policies that can never apply to an agent (their scope names another type).
    pub unreachable: Vec<Arc<str>>,
}

/// The principal-side keys of one request.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    pub agent: &'a str,
    pub blueprint: &'a str,
    pub sponsor: &'a str,
    pub action: Action,
    pub resource: &'a str,
}

impl Index {
    pub fn build(policies: &[BundlePolicy], types: &EntityTypes) -> Result<Index, String> {
        let mut index = Index::default();
        for (order, p) in policies.iter().enumerate() {
            index.meta.insert(
                p.policy.id().clone(),
                PolicyMeta { id: p.id.clone(), effect: p.effect, state: p.state, reason: p.reason.clone(), order },
            );
            if p.state == PolicyState::Off {
                continue;
            }
            let scope = match principal_key(&p.policy.principal_constraint(), types) {
                PrincipalKey::Global => &mut index.global,
                PrincipalKey::Agent(id) => index.agents.entry(id.into()).or_default(),
                PrincipalKey::Blueprint(id) => index.blueprints.entry(id.into()).or_default(),
                PrincipalKey::Sponsor(id) => index.sponsors.entry(id.into()).or_default(),
                PrincipalKey::Never => {
                    index.unreachable.push(p.id.clone());
                    continue;
                }
            };
            let resource = match resource_key(&p.policy.resource_constraint(), types) {
                Some(key) => key,
                None => {
                    index.unreachable.push(p.id.clone());
                    continue;
                }
            };
            for action in actions_of(&p.policy.action_constraint()) {
                let target = &mut scope.actions[action.index()];
                let slice = match &resource {
                    None => &mut target.any_resource,
                    Some(id) => target.by_resource.entry(id.as_str().into()).or_default(),
                };
                slice.add(p).map_err(|e| format!("policy `{}`: {e}", p.id))?;
            }
        }
        Ok(index)
    }

    pub fn meta(&self, id: &PolicyId) -> Option<&PolicyMeta> {
        self.meta.get(id)
    }

    /// The slices that can apply to a request, at most eight.
    pub fn slices<'a>(&'a self, keys: &Keys<'a>) -> impl Iterator<Item = &'a Slice> + 'a {
        let scopes = [
            Some(&self.global),
            self.agents.get(keys.agent),
            self.blueprints.get(keys.blueprint),
            self.sponsors.get(keys.sponsor),
        ];
        let action = keys.action.index();
        let resource = keys.resource;
        scopes.into_iter().flatten().flat_map(move |scope| {
            let target = &scope.actions[action];
            [Some(&target.any_resource), target.by_resource.get(resource)].into_iter().flatten()
        })
    }

    /// How many policies the index holds in its slices (a policy on several actions counts once per action).
    pub fn slice_count(&self) -> usize {
        let count = |s: &Scope| s.actions.iter().map(|t| 1 + t.by_resource.len()).sum::<usize>();
        count(&self.global)
            + self.agents.values().map(count).sum::<usize>()
            + self.blueprints.values().map(count).sum::<usize>()
            + self.sponsors.values().map(count).sum::<usize>()
    }
}

fn principal_key(c: &PrincipalConstraint, types: &EntityTypes) -> PrincipalKey {
    let by_uid = |uid: &EntityUid| {
        let id = uid.id().unescaped().to_string();
        let ty = uid.type_name();
        if *ty == types.agent {
            PrincipalKey::Agent(id)
        } else if *ty == types.blueprint {
            PrincipalKey::Blueprint(id)
        } else if *ty == types.sponsor {
            PrincipalKey::Sponsor(id)
        } else {
            PrincipalKey::Never
        }
    };
    match c {
        PrincipalConstraint::Any => PrincipalKey::Global,
        PrincipalConstraint::Is(ty) if *ty == types.agent => PrincipalKey::Global,
        PrincipalConstraint::Is(_) => PrincipalKey::Never,
        // `principal in X` holds for X itself and its ancestors; an agent's are its blueprint and sponsor.
        PrincipalConstraint::In(uid) => by_uid(uid),
        PrincipalConstraint::IsIn(ty, uid) if *ty == types.agent => by_uid(uid),
        PrincipalConstraint::IsIn(..) => PrincipalKey::Never,
        // The principal is always an agent: `principal == Blueprint::"x"` never holds.
        PrincipalConstraint::Eq(uid) if *uid.type_name() == types.agent => by_uid(uid),
        PrincipalConstraint::Eq(_) => PrincipalKey::Never,
    }
}

/// `Some(None)`: any resource; `Some(Some(id))`: that resource only; `None`: never a resource.
fn resource_key(c: &ResourceConstraint, types: &EntityTypes) -> Option<Option<String>> {
    let by_uid = |uid: &EntityUid| (*uid.type_name() == types.resource).then(|| Some(uid.id().unescaped().to_string()));
    match c {
        ResourceConstraint::Any => Some(None),
        ResourceConstraint::Is(ty) => (*ty == types.resource).then_some(None),
        // Resources have no parents, so `resource in X` is `resource == X`.
        ResourceConstraint::Eq(uid) | ResourceConstraint::In(uid) => by_uid(uid),
        ResourceConstraint::IsIn(ty, uid) => {
            if *ty == types.resource {
                by_uid(uid)
            } else {
                None
            }
        }
    }
}

fn actions_of(c: &ActionConstraint) -> Vec<Action> {
    let named = |uid: &EntityUid| Action::ALL.into_iter().find(|a| uid.id().unescaped() == a.as_str());
    match c {
        ActionConstraint::Any => Action::ALL.to_vec(),
        ActionConstraint::Eq(uid) => named(uid).into_iter().collect(),
        ActionConstraint::In(uids) => {
            // An action group we do not know of could contain either action: keep both.
            if uids.iter().any(|u| named(u).is_none()) {
                Action::ALL.to_vec()
            } else {
                let mut out: Vec<Action> = uids.iter().filter_map(named).collect();
                out.dedup();
                out
            }
        }
    }
}

/// The combined result of Cedar over several slices of enforced (or report-only) policies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub forbids: Vec<PolicyId>,
    pub permits: Vec<PolicyId>,
    /// Erroring policies and the message of each.
    pub errors: Vec<(PolicyId, String)>,
}

impl Outcome {
    /// Adds one Cedar call's response. A Deny with reasons lists satisfied forbids; an Allow
    /// lists satisfied permits.
    pub fn add(&mut self, authorizer: &Authorizer, request: &CedarRequest, set: &PolicySet, entities: &Entities) {
        if set.is_empty() {
            return;
        }
        let response = authorizer.is_authorized(request, set, entities);
        let reasons = response.diagnostics().reason().cloned();
        match response.decision() {
            CedarDecision::Deny => self.forbids.extend(reasons),
            CedarDecision::Allow => self.permits.extend(reasons),
        }
        for e in response.diagnostics().errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = e;
            self.errors.push((e.policy_id().clone(), e.inner().to_string()));
        }
    }

    /// Cedar's decision over the union of the slices added, ignoring errors.
    pub fn allows(&self) -> bool {
        self.forbids.is_empty() && !self.permits.is_empty()
    }

    /// The determining policies: the satisfied forbids if any, otherwise the satisfied permits.
    pub fn determining(&self) -> &[PolicyId] {
        if self.forbids.is_empty() { &self.permits } else { &self.forbids }
    }
}
