//! The policy index: policies sliced by principal scope (global, agent, blueprint, sponsor),
//! action and resource, so that a request evaluates only the policies that can apply to it;
//! and the evaluation of those slices.
//!
//! Each policy's condition (its `when`/`unless` body, as Cedar builds it; the slice's keys
//! stand for its scope) is compiled once at load; a request builds one Cedar evaluator and
//! runs it over the conditions of its slices. Cedar's own authorizer rebuilds every condition and walks the
//! whole set on each call; the decision is the same, and a differential test proves it.

use std::sync::Arc;

use dashmap::DashMap;

use cedar_policy::{
    ActionConstraint, Effect, Entities, EntityUid, PrincipalConstraint, Request as CedarRequest, ResourceConstraint,
};

use crate::bundle::{BundlePolicy, PolicyState};
use crate::cedar::{Condition, Evaluator, Split};
use crate::directory::EntityTypes;
use crate::request::Action;

/// A policy ready to evaluate: what a decision reports of it, and its compiled condition.
#[derive(Debug)]
pub struct Compiled {
    pub id: Arc<str>,
    pub effect: Effect,
    pub reason: Arc<str>,
    /// Position in the bundle, so that reasons come out in a stable order.
    pub order: usize,
    /// The condition as `fixed && rest`: `fixed` reads no context, so its value is learned
    /// once per (agent, resource, action) and kept in the index's memo.
    condition: Split,
}

impl Compiled {
    /// What the context-free part of the condition comes to for the evaluator's request.
    fn fixed(&self, evaluator: &Evaluator<'_>) -> Fixed {
        match &self.condition.fixed {
            None => Fixed::Holds,
            Some(c) => match evaluator.holds(c) {
                Ok(true) => Fixed::Holds,
                Ok(false) => Fixed::False,
                Err(e) => Fixed::Failed(e.0.into()),
            },
        }
    }

    /// Whether the condition holds, given what its context-free part came to.
    fn holds(&self, fixed: &Fixed, evaluator: &Evaluator<'_>) -> Result<bool, String> {
        match fixed {
            Fixed::False => Ok(false),
            Fixed::Failed(message) => Err(message.to_string()),
            Fixed::Holds => match &self.condition.rest {
                None => Ok(true),
                Some(rest) => evaluator.holds(rest).map_err(|e| e.0),
            },
        }
    }
}

/// What a policy's context-free conjuncts came to.
#[derive(Debug, Clone)]
enum Fixed {
    /// True (or there are none): the rest of the condition decides.
    Holds,
    False,
    Failed(Arc<str>),
}

/// The most (agent, resource, directory, action) keys the memo keeps; when it is full it starts over.
/// A key costs about 200 bytes for a slice of ten policies: at most about 25 MB.
const MEMO_ENTRIES: usize = 1 << 17;

/// What the context-free conjuncts of a request's slices came to, in slice order, by
/// (agent, resource, directory, action). They depend on the request's principal, action and
/// resource and the directory's entities only; the key holds the serials of the agent's and
/// the resource's records and of the rest of the directory, which change whenever those do,
/// so a value is learned on a key's first request and reused until its records change; the
/// differential test checks decisions either way.
#[derive(Default)]
struct Memo(DashMap<MemoKey, Arc<Learned>, crate::HashState>);

/// The serials of the agent's record, the resource's record and the rest of the directory
/// (each changes when its record does), and the action.
type MemoKey = ([u64; 3], u8);

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Memo({} entries)", self.0.len())
    }
}

impl Memo {
    fn get(&self, key: MemoKey) -> Option<Arc<Learned>> {
        self.0.get(&key).map(|e| e.value().clone())
    }

    fn learn(&self, key: MemoKey, fixed: Vec<Fixed>) {
        if self.0.len() >= MEMO_ENTRIES {
            self.0.clear();
        }
        self.0.insert(key, Arc::new(Learned::of(fixed)));
    }
}

/// One key's `Fixed` values, compactly: a mark per policy, the messages of those that
/// failed kept apart (there are seldom any).
struct Learned {
    marks: Box<[Mark]>,
    errors: Box<[Arc<str>]>,
}

#[derive(Clone, Copy)]
enum Mark {
    Holds,
    False,
    /// The position of its message in `errors`.
    Failed(u32),
}

impl Learned {
    fn of(fixed: Vec<Fixed>) -> Learned {
        let mut errors = Vec::new();
        let marks = fixed
            .into_iter()
            .map(|f| match f {
                Fixed::Holds => Mark::Holds,
                Fixed::False => Mark::False,
                Fixed::Failed(message) => {
                    errors.push(message);
                    Mark::Failed(errors.len() as u32 - 1)
                }
            })
            .collect();
        Learned { marks, errors: errors.into() }
    }

    /// The `Fixed` value of the policy at `at`, if one was learned.
    fn get(&self, at: usize) -> Option<Fixed> {
        self.marks.get(at).and_then(|m| match *m {
            Mark::Holds => Some(Fixed::Holds),
            Mark::False => Some(Fixed::False),
            Mark::Failed(i) => self.errors.get(i as usize).map(|e| Fixed::Failed(e.clone())),
        })
    }
}

/// The policies of one (principal scope, action, resource) key.
#[derive(Debug, Default)]
struct Slice {
    on: Vec<Arc<Compiled>>,
    report_only: Vec<Arc<Compiled>>,
}

/// Maps looked up on every request: std's, with the decision path's hasher (`crate::HashState`).
type HashMap<K, V> = std::collections::HashMap<K, V, crate::HashState>;

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
    /// Policies that can never apply to an agent (their scope names another type).
    unreachable: Vec<Arc<str>>,
    /// The entities the indexed conditions name literally, actions aside, each once.
    literals: Box<[EntityUid]>,
    memo: Memo,
}

/// The keys of one request.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// The serials of the agent's record, the resource's record and the rest of the
    /// directory: with the action, the memo's key. None: learn nothing (what the policies
    /// read may change with records the key does not follow).
    pub learned: Option<[u64; 3]>,
    pub agent: &'a str,
    pub blueprint: &'a str,
    pub sponsor: &'a str,
    pub action: Action,
    pub resource: &'a str,
}

impl Index {
    pub fn build(policies: &[BundlePolicy], types: &EntityTypes, entities: &Entities) -> Index {
        let mut index = Index::default();
        let mut literals = std::collections::HashSet::new();
        for (order, p) in policies.iter().enumerate() {
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
            let Some(resource) = resource_key(&p.policy.resource_constraint(), types) else {
                index.unreachable.push(p.id.clone());
                continue;
            };
            let actions = actions_of(&p.policy.action_constraint(), types, entities);
            // INVARIANT: a slice is reached only by requests whose agent, blueprint or sponsor,
            // action and resource are its keys, so the scope holds whenever the slice is
            // evaluated (the differential test checks it), and only the body is left to Cedar.
            let condition = Condition::body_of(&p.policy).split();
            for c in [&condition.fixed, &condition.rest].into_iter().flatten() {
                literals.extend(c.entity_literals().filter(|uid| *uid.type_name() != types.action));
            }
            let compiled =
                Arc::new(Compiled { id: p.id.clone(), effect: p.effect, reason: p.reason.clone(), order, condition });
            for action in actions {
                let target = &mut scope.actions[action.index()];
                let slice = match &resource {
                    None => &mut target.any_resource,
                    Some(id) => target.by_resource.entry(id.as_str().into()).or_default(),
                };
                match p.state {
                    PolicyState::ReportOnly => slice.report_only.push(compiled.clone()),
                    _ => slice.on.push(compiled.clone()),
                }
            }
        }
        index.literals = literals.into_iter().collect();
        index
    }

    /// Policies that can never apply to an agent (their scope names another type).
    pub fn unreachable(&self) -> &[Arc<str>] {
        &self.unreachable
    }

    /// The entities the indexed conditions name literally, actions aside, each once.
    pub fn literals(&self) -> &[EntityUid] {
        &self.literals
    }

    /// The slices that can apply to a request: at most two per principal scope.
    fn slices<'a>(&'a self, keys: &Keys<'a>) -> impl Iterator<Item = &'a Slice> + 'a {
        let scopes = [
            Some(&self.global),
            self.agents.get(keys.agent),
            self.blueprints.get(keys.blueprint),
            self.sponsors.get(keys.sponsor),
        ];
        let (action, resource) = (keys.action.index(), keys.resource);
        scopes.into_iter().flatten().flat_map(move |scope| {
            let target = &scope.actions[action];
            [Some(&target.any_resource), target.by_resource.get(resource)].into_iter().flatten()
        })
    }

    /// Evaluates every policy of the request's slices with one evaluator; the context-free
    /// part of each condition comes from the memo once the request's key has been seen.
    pub fn evaluate<'a>(&'a self, keys: &Keys<'a>, request: &CedarRequest, entities: &Entities) -> Evaluated<'a> {
        let evaluator = Evaluator::new(request, entities);
        let key = keys.learned.map(|serials| (serials, keys.action.index() as u8));
        let known = key.and_then(|key| self.memo.get(key));
        let mut learned = Vec::new();
        let mut out = Evaluated::default();
        let mut at = 0;
        for slice in self.slices(keys) {
            let on = slice.on.iter().map(|p| (p, false));
            for (p, report_only) in on.chain(slice.report_only.iter().map(|p| (p, true))) {
                let fixed = match known.as_deref().and_then(|k| k.get(at)) {
                    Some(fixed) => fixed,
                    None => p.fixed(&evaluator),
                };
                let outcome = if report_only { &mut out.report_only } else { &mut out.on };
                outcome.add(p, p.holds(&fixed, &evaluator));
                if known.is_none() {
                    learned.push(fixed);
                }
                at += 1;
            }
        }
        if let (None, Some(key)) = (&known, key) {
            self.memo.learn(key, learned);
        }
        out
    }

    /// How many policies `evaluate` evaluates for these keys.
    pub fn slice_len(&self, keys: &Keys<'_>) -> usize {
        self.slices(keys).map(|s| s.on.len() + s.report_only.len()).sum()
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

/// The actions a policy can apply to. `action in X` holds for X and for every action the
/// schema puts in X (an action group), so groups are resolved through the action entities.
fn actions_of(c: &ActionConstraint, types: &EntityTypes, entities: &Entities) -> Vec<Action> {
    let uid = |a: Action| EntityTypes::uid(&types.action, a.as_str());
    match c {
        ActionConstraint::Any => Action::ALL.to_vec(),
        ActionConstraint::Eq(target) => Action::ALL.into_iter().filter(|a| uid(*a) == *target).collect(),
        ActionConstraint::In(targets) => Action::ALL
            .into_iter()
            .filter(|a| {
                let a = uid(*a);
                targets.iter().any(|t| *t == a || entities.is_ancestor_of(t, &a))
            })
            .collect(),
    }
}

/// The satisfied and erroring policies among a group (enforced, or report-only).
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    pub forbids: Vec<&'a Compiled>,
    pub permits: Vec<&'a Compiled>,
    pub errors: Vec<(&'a Compiled, String)>,
}

impl<'a> Outcome<'a> {
    fn add(&mut self, p: &'a Compiled, holds: Result<bool, String>) {
        match holds {
            Ok(true) => match p.effect {
                Effect::Forbid => self.forbids.push(p),
                Effect::Permit => self.permits.push(p),
            },
            Ok(false) => {}
            Err(message) => self.errors.push((p, message)),
        }
    }

    /// Cedar's decision, errors aside: no satisfied forbid and at least one satisfied permit.
    pub fn allows(&self) -> bool {
        self.forbids.is_empty() && !self.permits.is_empty()
    }

    /// Cedar's determining policies: the satisfied forbids if any, otherwise the satisfied permits.
    pub fn determining(&self) -> &[&'a Compiled] {
        if self.forbids.is_empty() { &self.permits } else { &self.forbids }
    }
}

/// The outcomes of one request's slices.
#[derive(Debug, Default)]
pub struct Evaluated<'a> {
    pub on: Outcome<'a>,
    pub report_only: Outcome<'a>,
}
