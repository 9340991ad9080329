//! The one module below cedar-policy's facade (`cedar-policy-core`): where a parsed policy
//! begins, policy conditions compiled once and evaluated with one evaluator per request,
//! contexts and entities built as values. A Cedar upgrade that moves the core touches this file.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use cedar_policy::{Context, Entities, Entity, EntityTypeName, EntityUid, Policy, Request, Schema, Template};
use cedar_policy_core::ast::{
    self, EntityUID as CoreUid, Expr, ExtensionFunction, Literal, Name, PartialValue, SlotEnv, Value, ValueKind,
};
use cedar_policy_core::entities::{Entities as CoreEntities, NoEntitiesSchema, TCComputation};
use cedar_policy_core::evaluator::Evaluator as CoreEvaluator;
use cedar_policy_core::extensions::Extensions;
use chrono::{DateTime, Utc};
use smol_str::SmolStr;

/// The byte offset in its source where a parsed policy begins (its first annotation, or its
/// effect), from the parser's own source location. None for a policy not parsed from text.
pub fn policy_offset(policy: &Policy) -> Option<usize> {
    AsRef::<ast::Policy>::as_ref(policy).loc().map(|loc| loc.start())
}

/// As [`policy_offset`], for a template.
pub fn template_offset(template: &Template) -> Option<usize> {
    AsRef::<ast::Template>::as_ref(template).loc().map(|loc| loc.start())
}

/// What a policy leaves to evaluate once its scope is known to hold: its `when` and `unless`
/// clauses as Cedar joins them (`true` if it has none). Built once, at load.
#[derive(Debug, Clone)]
pub struct Condition(Expr);

impl Condition {
    pub fn body_of(policy: &Policy) -> Condition {
        let ast: &ast::Policy = policy.as_ref();
        Condition(ast.non_scope_constraints().map_or_else(|| Expr::val(true), unroll_literal_sets))
    }

    /// The condition cut in two: its leading conjuncts that do not read the request's
    /// `context` (their value follows from the principal, action and resource and the
    /// entities alone), and the conjuncts after them. Cedar evaluates `a && b` left to right
    /// and stops at the first false or error, so `fixed && rest` is the same condition, and a
    /// `fixed` that is false, or fails, decides it without `rest`.
    /// The entities the condition names literally (`Blueprint::"bp-x".enabled`): a request's
    /// entity set holds the request's own entities, so these are added to it.
    pub fn entity_literals(&self) -> impl Iterator<Item = EntityUid> + '_ {
        self.0.subexpressions().filter_map(|e| match e.expr_kind() {
            ast::ExprKind::Lit(Literal::EntityUID(uid)) => Some(EntityUid::from((**uid).clone())),
            _ => None,
        })
    }

    pub fn split(&self) -> Split {
        let mut conjuncts = Vec::new();
        flatten_and(&self.0, &mut conjuncts);
        let cut = conjuncts.iter().position(|c| reads_context(c)).unwrap_or(conjuncts.len());
        let join = |part: &[&Expr]| part.iter().map(|e| (*e).clone()).reduce(Expr::and).map(Condition);
        Split { fixed: join(&conjuncts[..cut]), rest: join(&conjuncts[cut..]) }
    }
}

/// The most elements of a set literal that `unroll_literal_sets` unrolls.
const UNROLL_MAX: usize = 8;

/// `e` with its small set literals of literals unrolled where they are tested, through
/// `&&`, `||` and `!`: `["a", "b"].contains(x)` becomes `x == "a" || x == "b"`,
/// `s.containsAny(["a", "b"])` (or `["a", "b"].containsAny(s)`) becomes `s.contains("a") ||
/// s.contains("b")`, and `s.containsAll(["a", "b"])` becomes `s.contains("a") &&
/// s.contains("b")`. Cedar builds a set literal anew (a tree and a hash set) each time it
/// evaluates one; the unrolled form tests the same values. It is equivalent: literals cannot
/// fail, the other operand is evaluated first either way (so it fails the same way), `==`
/// and set membership are the same equality, and the differential test checks it.
fn unroll_literal_sets(e: &Expr) -> Expr {
    use ast::{BinaryOp, ExprKind, UnaryOp};
    let literals = |x: &Expr| match x.expr_kind() {
        ExprKind::Set(items)
            if (1..=UNROLL_MAX).contains(&items.len())
                && items.iter().all(|i| matches!(i.expr_kind(), ExprKind::Lit(_))) =>
        {
            Some(items.clone())
        }
        _ => None,
    };
    let join = |items: &[Expr], test: &dyn Fn(Expr) -> Expr, with: fn(Expr, Expr) -> Expr| {
        items.iter().map(|l| test(l.clone())).reduce(with).unwrap_or_else(|| e.clone())
    };
    match e.expr_kind() {
        ExprKind::And { left, right } => Expr::and(unroll_literal_sets(left), unroll_literal_sets(right)),
        ExprKind::Or { left, right } => Expr::or(unroll_literal_sets(left), unroll_literal_sets(right)),
        ExprKind::UnaryApp { op: UnaryOp::Not, arg } => Expr::not(unroll_literal_sets(arg)),
        ExprKind::BinaryApp { op, arg1, arg2 } => {
            let (a1, a2) = (&**arg1, &**arg2);
            match (op, literals(a1), literals(a2)) {
                (BinaryOp::Contains, Some(items), _) => join(&items, &|l| Expr::is_eq(a2.clone(), l), Expr::or),
                (BinaryOp::ContainsAny, _, Some(items)) => join(&items, &|l| Expr::contains(a1.clone(), l), Expr::or),
                (BinaryOp::ContainsAny, Some(items), None) => {
                    join(&items, &|l| Expr::contains(a2.clone(), l), Expr::or)
                }
                (BinaryOp::ContainsAll, _, Some(items)) => join(&items, &|l| Expr::contains(a1.clone(), l), Expr::and),
                _ => e.clone(),
            }
        }
        _ => e.clone(),
    }
}

/// A condition as `fixed && rest` (see [`Condition::split`]); either may be absent.
#[derive(Debug, Clone)]
pub struct Split {
    pub fixed: Option<Condition>,
    pub rest: Option<Condition>,
}

/// The operands of a chain of `&&`, in evaluation order.
fn flatten_and<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e.expr_kind() {
        ast::ExprKind::And { left, right } => {
            flatten_and(left, out);
            flatten_and(right, out);
        }
        _ => out.push(e),
    }
}

fn reads_context(e: &Expr) -> bool {
    e.subexpressions().any(|s| matches!(s.expr_kind(), ast::ExprKind::Var(ast::Var::Context)))
}

/// What Cedar could not do, in its own words (its message and the causes below it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CedarError(pub String);

impl CedarError {
    fn of(e: &dyn std::error::Error) -> Self {
        CedarError(error_chain(e))
    }
}

impl From<&str> for CedarError {
    fn from(message: &str) -> Self {
        CedarError(message.to_string())
    }
}

/// Evaluates conditions for one request against one set of entities. Cedar's authorizer
/// builds an evaluator and rebuilds every condition on each call; this builds one per request.
pub struct Evaluator<'e> {
    inner: CoreEvaluator<'e>,
    slots: SlotEnv,
}

impl<'e> Evaluator<'e> {
    pub fn new(request: &Request, entities: &'e Entities) -> Self {
        Evaluator {
            inner: CoreEvaluator::new(request.as_ref().clone(), entities.as_ref(), Extensions::all_available()),
            slots: SlotEnv::new(),
        }
    }

    /// Whether `condition` holds; `Err` says why it could not be evaluated.
    pub fn holds(&self, condition: &Condition) -> Result<bool, CedarError> {
        match self.inner.interpret(&condition.0, &self.slots) {
            Ok(v) => match v.value_kind() {
                ValueKind::Lit(Literal::Bool(b)) => Ok(*b),
                // Strict validation makes every condition boolean; fail closed if one is not.
                _ => Err(CedarError(format!("the condition evaluated to {v}, not a boolean"))),
            },
            Err(e) => Err(CedarError(e.to_string())),
        }
    }
}

/// Cedar's `ip` and `datetime` constructors, looked up once. (`RestrictedExpression::new_ip`
/// parses the function's name with the full Cedar parser on every call.)
static CONSTRUCTORS: LazyLock<Option<(&'static ExtensionFunction, &'static ExtensionFunction)>> = LazyLock::new(|| {
    let lookup = |name: &str| {
        let name = Name::parse_unqualified_name(name).ok()?;
        Extensions::all_available().func(&name).ok()
    };
    Some((lookup("ip")?, lookup("datetime")?))
});

const NO_CONSTRUCTORS: &str = "the ip and datetime extensions are unavailable";

thread_local! {
    /// The last `datetime` and `ip` values built on this thread: Cedar parses them with a
    /// regular expression, and under load many requests share the same millisecond (and a
    /// gateway's requests often the same client).
    static LAST_TIME: RefCell<Option<(i64, Value)>> = const { RefCell::new(None) };
    static LAST_IP: RefCell<Option<(IpAddr, Value)>> = const { RefCell::new(None) };
}

/// The value `slot` holds for `key` (the last one built on this thread), else `build`'s, kept
/// there for the next caller.
fn cached<K, Q, E>(
    slot: &'static std::thread::LocalKey<RefCell<Option<(K, Value)>>>,
    key: &Q,
    build: impl FnOnce() -> Result<Value, E>,
) -> Result<Value, E>
where
    K: std::borrow::Borrow<Q>,
    Q: PartialEq + ToOwned<Owned = K> + ?Sized,
{
    if let Some(v) = slot.with_borrow(|last| last.as_ref().filter(|(k, _)| k.borrow() == key).map(|(_, v)| v.clone())) {
        return Ok(v);
    }
    let v = build()?;
    slot.set(Some((key.to_owned(), v.clone())));
    Ok(v)
}

fn construct(f: &ExtensionFunction, arg: &str) -> Result<Value, CedarError> {
    match f.call(&[Value::from(arg)]) {
        Ok(PartialValue::Value(v)) => Ok(v),
        Ok(PartialValue::Residual(_)) => Err(CedarError(format!("`{arg}` could not be evaluated"))),
        Err(e) => Err(CedarError(e.to_string())),
    }
}

thread_local! {
    /// The uids of this thread's last principal, action and resource, shared with the next
    /// request that names them: Cedar keeps each uid of a request in a box of its own.
    static LAST_UIDS: RefCell<[Option<Arc<CoreUid>>; 3]> = const { RefCell::new([None, None, None]) };
}

/// A Cedar request, as `Request::new` without a schema builds it (the caller's types
/// guarantee its shape), its uids shared with this thread's last request that named them.
pub fn request(principal: &EntityUid, action: &EntityUid, resource: &EntityUid, context: &Context) -> Request {
    LAST_UIDS.with_borrow_mut(|last| {
        let mut known = |slot: usize, uid: &EntityUid| {
            let uid: &CoreUid = uid.as_ref();
            let euid = match &last[slot] {
                Some(kept) if **kept == *uid => kept.clone(),
                _ => last[slot].insert(Arc::new(uid.clone())).clone(),
            };
            ast::EntityUIDEntry::Known { euid, loc: None }
        };
        let (p, a, r) = (known(0, principal), known(1, action), known(2, resource));
        Request::from(ast::Request::new_unchecked(p, a, r, Some(context.as_ref().clone())))
    })
}

/// A request context built as values: no expression to evaluate and no schema check (the
/// caller's types guarantee the shape). Keys are put in any order; `build` puts them in
/// Cedar's map, reusing this thread's last map when it has the same keys.
#[derive(Debug, Default)]
pub struct ContextBuilder(Vec<(&'static str, Value)>);

/// The last context map built on this thread: the keys it was built from, in the order they
/// were put, and for each entry of the map (in key order) the position of its value among
/// them. A request with the same keys writes its values into that map in place, once Cedar has
/// let go of it: no sorting and no allocation (building the map was a sixth of a decision).
struct LastContext {
    keys: Vec<&'static str>,
    order: Vec<usize>,
    map: Arc<BTreeMap<SmolStr, Value>>,
}

/// What a set of named locations is built from: a snapshot's generation and a client address.
type LocationsKey = (u64, Option<IpAddr>);

thread_local! {
    /// The last set of named locations built on this thread, by snapshot generation and
    /// client address, and the last set of scopes: a caller's requests repeat them.
    static LAST_LOCATIONS: RefCell<Option<(LocationsKey, Value)>> = const { RefCell::new(None) };
    static LAST_SCOPES: RefCell<Option<(Vec<String>, Value)>> = const { RefCell::new(None) };
    static LAST_CONTEXT: RefCell<Option<LastContext>> = const { RefCell::new(None) };
}

impl ContextBuilder {
    pub fn new() -> Self {
        ContextBuilder(Vec::with_capacity(12))
    }

    fn put(&mut self, key: &'static str, value: Value) {
        self.0.push((key, value));
    }

    pub fn string(&mut self, key: &'static str, value: &str) {
        self.put(key, Value::from(value));
    }

    pub fn long(&mut self, key: &'static str, value: i64) {
        self.put(key, Value::from(value));
    }

    /// A set of strings that depends only on the snapshot (by its generation) and the client
    /// address: the named locations that contain it.
    pub fn locations<'a, I: IntoIterator<Item = &'a str>>(
        &mut self,
        key: &'static str,
        of: LocationsKey,
        values: impl FnOnce() -> I,
    ) {
        let Ok(value) = cached(&LAST_LOCATIONS, &of, || {
            Ok::<_, std::convert::Infallible>(Value::set(values().into_iter().map(Value::from), None))
        });
        self.put(key, value);
    }

    /// A set of strings, reused while a thread's requests ask for the same ones.
    pub fn scopes(&mut self, key: &'static str, scopes: &[String]) {
        let Ok(value) = cached(&LAST_SCOPES, scopes, || {
            Ok::<_, std::convert::Infallible>(Value::set(scopes.iter().map(|s| Value::from(s.as_str())), None))
        });
        self.put(key, value);
    }

    pub fn entity(&mut self, key: &'static str, uid: &EntityUid) {
        self.put(key, Value::from(CoreUid::from(uid.clone())));
    }

    /// An `ip` value.
    pub fn ip(&mut self, key: &'static str, ip: IpAddr) -> Result<(), CedarError> {
        let (constructor, _) = CONSTRUCTORS.ok_or(NO_CONSTRUCTORS)?;
        let value = cached(&LAST_IP, &ip, || construct(constructor, &ip.to_string()))?;
        self.put(key, value);
        Ok(())
    }

    /// A `datetime` value, to the millisecond.
    pub fn datetime(&mut self, key: &'static str, time: DateTime<Utc>) -> Result<(), CedarError> {
        let (_, constructor) = CONSTRUCTORS.ok_or(NO_CONSTRUCTORS)?;
        let value = cached(&LAST_TIME, &time.timestamp_millis(), || {
            construct(constructor, &time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        })?;
        self.put(key, value);
        Ok(())
    }

    pub fn build(mut self) -> Context {
        let reused = LAST_CONTEXT.with_borrow_mut(|last| {
            let last = last.as_mut()?;
            let same_keys = last.keys.len() == self.0.len()
                && last.keys.iter().zip(&self.0).all(|(a, (b, _))| std::ptr::eq(*a, *b) || a == b);
            // INVARIANT: only this thread's cache holds the map once the request it was given to
            // is dropped; while anything else holds it, `get_mut` refuses and a new map is built.
            let map = Arc::get_mut(&mut last.map).filter(|_| same_keys)?;
            for (slot, &at) in map.values_mut().zip(&last.order) {
                *slot = std::mem::replace(&mut self.0[at].1, Value::from(false));
            }
            Some(last.map.clone())
        });
        Context::from(ast::Context::Value(reused.unwrap_or_else(|| self.fresh())))
    }

    /// A new map, kept for the next request on this thread if its keys are distinct.
    fn fresh(self) -> Arc<BTreeMap<SmolStr, Value>> {
        let keys: Vec<&'static str> = self.0.iter().map(|(k, _)| *k).collect();
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by_key(|&at| keys[at]);
        let distinct = order.windows(2).all(|w| keys[w[0]] != keys[w[1]]);
        // Sorting a handful of keys and building the map in bulk beats inserting them one by one.
        let map = Arc::new(self.0.into_iter().map(|(k, v)| (SmolStr::new_static(k), v)).collect::<BTreeMap<_, _>>());
        if distinct {
            LAST_CONTEXT.set(Some(LastContext { keys, order, map: map.clone() }));
        }
        map
    }
}

/// An attribute or tag value of an entity.
#[derive(Debug, Clone)]
pub struct Attr(PartialValue);

impl Attr {
    pub fn string(value: &str) -> Attr {
        Attr(PartialValue::Value(Value::from(value)))
    }

    /// A string already held as a `SmolStr`: shared, not copied.
    pub fn smol(value: &SmolStr) -> Attr {
        Attr(PartialValue::Value(Value::from(value.clone())))
    }

    /// A set of strings already held as `SmolStr`s.
    pub fn smols<'a>(values: impl IntoIterator<Item = &'a SmolStr>) -> Attr {
        Attr(PartialValue::Value(Value::set(values.into_iter().map(|v| Value::from(v.clone())), None)))
    }

    pub fn bool(value: bool) -> Attr {
        Attr(PartialValue::Value(Value::from(value)))
    }

    /// A set of strings.
    pub fn strings<'a>(values: impl IntoIterator<Item = &'a str>) -> Attr {
        Attr(PartialValue::Value(Value::set(values.into_iter().map(Value::from), None)))
    }

    pub fn entity(uid: EntityUid) -> Attr {
        Attr(PartialValue::Value(Value::from(CoreUid::from(uid))))
    }

    /// A set of entity references.
    pub fn entities(uids: impl IntoIterator<Item = EntityUid>) -> Attr {
        Attr(PartialValue::Value(Value::set(uids.into_iter().map(|uid| Value::from(CoreUid::from(uid))), None)))
    }
}

/// A Cedar entity built as a value (no expression evaluated per attribute), shared: an
/// entity of the directory is built once and put in the entity set of many requests.
#[derive(Debug, Clone)]
pub struct CedarEntity(Arc<ast::Entity>);

impl CedarEntity {
    /// INVARIANT (the caller's): `parents` are all the entity's ancestors (the transitive
    /// closure is taken as already computed).
    pub fn new<'a>(
        uid: EntityUid,
        attrs: impl IntoIterator<Item = (&'static str, Attr)>,
        parents: impl IntoIterator<Item = EntityUid>,
        tags: impl IntoIterator<Item = (&'a str, Attr)>,
    ) -> CedarEntity {
        CedarEntity(Arc::new(ast::Entity::new_with_attr_partial_value(
            CoreUid::from(uid),
            attrs.into_iter().map(|(k, v)| (SmolStr::new_static(k), v.0)),
            HashSet::new(),
            parents.into_iter().map(CoreUid::from).collect(),
            tags.into_iter().map(|(k, v)| (SmolStr::from(k), v.0)),
        )))
    }

    pub fn uid(&self) -> EntityUid {
        EntityUid::from(self.0.uid().clone())
    }
}

/// An entity id from a type and an id, without copying an id that is already a `SmolStr`.
pub fn entity_uid(ty: &EntityTypeName, id: &SmolStr) -> EntityUid {
    EntityUid::from(CoreUid::from_components(
        AsRef::<ast::EntityType>::as_ref(ty).clone(),
        ast::Eid::new(id.clone()),
        None,
    ))
}

/// Checks entities against the schema: attribute names and types, tags and parents.
pub fn check_entities<'a>(
    entities: impl IntoIterator<Item = &'a CedarEntity>,
    schema: &Schema,
) -> Result<(), CedarError> {
    let public = entities.into_iter().map(|e| Entity::from((*e.0).clone()));
    Entities::from_entities(public, Some(schema)).map(drop).map_err(|e| CedarError::of(&e))
}

/// The schema's action entities, to put in every request's entity set.
pub fn action_entities(schema: &Schema) -> Result<Vec<CedarEntity>, CedarError> {
    let actions = schema.action_entities().map_err(|e| CedarError(e.to_string()))?;
    Ok(actions.iter().map(|e| CedarEntity(Arc::new(AsRef::<ast::Entity>::as_ref(e).clone()))).collect())
}

/// The entity set of one request: a handful of shared entities, none copied. An entity given
/// twice is kept once.
///
/// INVARIANT (the caller's): each entity's parents are all its ancestors.
pub fn entities_of<'a>(entities: impl IntoIterator<Item = &'a CedarEntity>) -> Result<Entities, CedarError> {
    CoreEntities::new()
        .add_entities(
            entities.into_iter().map(|e| e.0.clone()),
            None::<&NoEntitiesSchema>,
            TCComputation::AssumeAlreadyComputed,
            Extensions::all_available(),
        )
        .map(Entities::from)
        .map_err(|e| CedarError(e.to_string()))
}

/// An error and its causes, joined: Cedar's top-level messages leave the detail to the causes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use cedar_policy::{Authorizer, Decision, PolicySet, RestrictedExpression};

    use super::*;

    const SCHEMA: &str = r#"
        entity Group;
        entity User in [Group] { name: String, admin: Bool, groups: Set<Group>, mail: Set<String> } tags String;
        entity Doc { owner: User };
        action read appliesTo {
            principal: [User], resource: [Doc],
            context: { ip: ipaddr, at: datetime, n: Long, who: User, tags: Set<String>, s: String }
        };
    "#;

    fn schema() -> Schema {
        Schema::from_cedarschema_str(SCHEMA).unwrap().0
    }

    fn uid(s: &str) -> EntityUid {
        EntityUid::from_str(s).unwrap()
    }

    fn built() -> Vec<CedarEntity> {
        let attrs = |name: &str| {
            [
                ("name", Attr::string(name)),
                ("admin", Attr::bool(name == "ann")),
                ("groups", Attr::entities([uid(r#"Group::"g""#)])),
                ("mail", Attr::strings([name, "x"])),
            ]
        };
        vec![
            CedarEntity::new(uid(r#"Group::"g""#), [], [], []),
            CedarEntity::new(
                uid(r#"User::"ann""#),
                attrs("ann"),
                [uid(r#"Group::"g""#)],
                [("team", Attr::string("a"))],
            ),
            CedarEntity::new(uid(r#"User::"bob""#), attrs("bob"), [], []),
            CedarEntity::new(uid(r#"Doc::"d""#), [("owner", Attr::entity(uid(r#"User::"ann""#)))], [], []),
        ]
    }

    /// The request entities of `built`, with the schema's actions.
    fn entities() -> Entities {
        let mut all = built();
        all.extend(action_entities(&schema()).unwrap());
        entities_of(&all).unwrap()
    }

    fn context() -> Context {
        let mut c = ContextBuilder::new();
        c.ip("ip", "10.1.2.3".parse().unwrap()).unwrap();
        c.datetime("at", "2026-11-25T10:00:00.250Z".parse().unwrap()).unwrap();
        c.long("n", 7);
        c.entity("who", &uid(r#"User::"bob""#));
        c.scopes("tags", &["a".to_string(), "b".to_string()]);
        c.string("s", "x");
        c.build()
    }

    fn request(principal: &str) -> Request {
        Request::new(uid(principal), uid(r#"Action::"read""#), uid(r#"Doc::"d""#), context(), None).unwrap()
    }

    fn policy(text: &str) -> Policy {
        Policy::from_str(text).unwrap()
    }

    #[test]
    fn built_entities_equal_the_checked_public_build() {
        check_entities(&built(), &schema()).unwrap();
        let all = entities();
        let s = |v: &str| RestrictedExpression::new_string(v.into());
        let group = |id: &str| RestrictedExpression::new_entity_uid(uid(id));
        let user = |name: &str, parents: Vec<EntityUid>, tags: Vec<(String, RestrictedExpression)>| {
            let attrs = [
                ("name".to_string(), s(name)),
                ("admin".into(), RestrictedExpression::new_bool(name == "ann")),
                ("groups".into(), RestrictedExpression::new_set([group(r#"Group::"g""#)])),
                ("mail".into(), RestrictedExpression::new_set([s(name), s("x")])),
            ];
            Entity::new_with_tags(uid(&format!(r#"User::"{name}""#)), attrs, parents, tags).unwrap()
        };
        let reference = Entities::from_entities(
            [
                Entity::new_no_attrs(uid(r#"Group::"g""#), HashSet::new()),
                user("ann", vec![uid(r#"Group::"g""#)], vec![("team".into(), s("a"))]),
                user("bob", vec![], vec![]),
                Entity::new(
                    uid(r#"Doc::"d""#),
                    [("owner".to_string(), RestrictedExpression::new_entity_uid(uid(r#"User::"ann""#)))].into(),
                    HashSet::new(),
                )
                .unwrap(),
            ],
            Some(&schema()),
        )
        .unwrap();
        // With a schema, Cedar adds the schema's actions, as `entities` does.
        assert!(all.deep_eq(&reference));
        // An entity given twice is kept once; the same uid with other content is an error.
        let mut twice = built();
        twice.extend(built());
        assert!(entities_of(&twice).is_ok());
        let other = CedarEntity::new(uid(r#"Group::"g""#), [("name", Attr::string("x"))], [], []);
        assert!(entities_of(&[built()[0].clone(), other]).is_err());
        assert!(all.is_ancestor_of(&uid(r#"Group::"g""#), &uid(r#"User::"ann""#)));
        assert!(all.get(&uid(r#"Action::"read""#)).is_some());
    }

    #[test]
    fn an_entity_that_does_not_fit_the_schema_is_an_error_with_its_causes() {
        let doc = CedarEntity::new(uid(r#"Doc::"d""#), [("owner", Attr::string("ann"))], [], []);
        let err = check_entities(&[doc], &schema()).unwrap_err().0;
        assert!(err.contains("owner"), "{err}");
    }

    #[test]
    fn contexts_carry_values_of_every_kind() {
        let entities = entities();
        let when = "when { context.ip.isInRange(ip(\"10.0.0.0/8\")) && context.at == datetime(\"2026-11-25T10:00:00.250Z\") \
             && context.n == 7 && context.who == User::\"bob\" && context.tags.contains(\"b\") && context.s == \"x\" }";
        let p = policy(&format!("permit(principal, action, resource) {when};"));
        let mut set = PolicySet::new();
        set.add(p.clone()).unwrap();
        let req = request(r#"User::"ann""#);
        let response = Authorizer::new().is_authorized(&req, &set, &entities);
        assert_eq!(response.decision(), Decision::Allow, "{:?}", response.diagnostics().errors().collect::<Vec<_>>());
        assert!(
            Request::new(
                req.principal().unwrap().clone(),
                uid(r#"Action::"read""#),
                uid(r#"Doc::"d""#),
                context(),
                Some(&schema())
            )
            .is_ok()
        );
        // Built again from the per-thread cache, the values are the same.
        assert_eq!(Evaluator::new(&request(r#"User::"ann""#), &entities).holds(&Condition::body_of(&p)), Ok(true));
    }

    #[test]
    fn requests_share_repeated_uids_and_equal_cedars_own() {
        std::thread::spawn(|| {
            let (ann, bob, read, doc) =
                (uid(r#"User::"ann""#), uid(r#"User::"bob""#), uid(r#"Action::"read""#), uid(r#"Doc::"d""#));
            let ctx = context();
            let own = |p: &EntityUid| Request::new(p.clone(), read.clone(), doc.clone(), ctx.clone(), None).unwrap();
            let shows = |r: &Request| format!("{:?}", AsRef::<ast::Request>::as_ref(r));
            let arc = |r: &Request| match AsRef::<ast::Request>::as_ref(r).principal() {
                ast::EntityUIDEntry::Known { euid, .. } => Arc::as_ptr(euid),
                ast::EntityUIDEntry::Unknown { .. } => std::ptr::null(),
            };
            let first = super::request(&ann, &read, &doc, &ctx);
            assert_eq!(shows(&first), shows(&own(&ann)));
            let again = super::request(&ann, &read, &doc, &ctx);
            assert_eq!(arc(&first), arc(&again));
            let other = super::request(&bob, &read, &doc, &ctx);
            assert_ne!(arc(&other), arc(&first));
            assert_eq!(shows(&other), shows(&own(&bob)));
            // The principal's slot holds bob now; ann's request is untouched.
            assert_eq!(shows(&first), shows(&own(&ann)));
            let entities = entities();
            let p = policy(r#"permit(principal == User::"bob", action, resource);"#);
            assert_eq!(Evaluator::new(&other, &entities).holds(&Condition::body_of(&p)), Ok(true));
            let scoped = |r: &Request| {
                let mut set = PolicySet::new();
                set.add(p.clone()).unwrap();
                Authorizer::new().is_authorized(r, &set, &entities).decision()
            };
            assert_eq!(scoped(&other), Decision::Allow);
            assert_eq!(scoped(&first), Decision::Deny);
        })
        .join()
        .unwrap();
    }

    /// The map of a built context, by key.
    fn map_of(c: &Context) -> BTreeMap<SmolStr, Value> {
        match c.as_ref() {
            ast::Context::Value(map) => (**map).clone(),
            ast::Context::RestrictedResidual(_) => panic!("a context built from values has no residual"),
        }
    }

    fn expected(pairs: &[(&str, Value)]) -> BTreeMap<SmolStr, Value> {
        pairs.iter().map(|(k, v)| (SmolStr::new(k), v.clone())).collect()
    }

    #[test]
    fn a_thread_reuses_its_context_map_only_once_it_is_free_and_keeps_each_requests_values() {
        std::thread::spawn(|| {
            let build = |pairs: &[(&'static str, i64)]| {
                let mut c = ContextBuilder::new();
                for (k, v) in pairs {
                    c.long(k, *v);
                }
                c.build()
            };
            let ptr = |c: &Context| match c.as_ref() {
                ast::Context::Value(map) => Arc::as_ptr(map),
                ast::Context::RestrictedResidual(_) => std::ptr::null(),
            };
            let first = build(&[("s", 1), ("n", 2), ("a", 3)]);
            // The first is still held: the second gets a map of its own.
            let second = build(&[("s", 4), ("n", 5), ("a", 6)]);
            assert_ne!(ptr(&first), ptr(&second));
            assert_eq!(map_of(&first), expected(&[("s", 1.into()), ("n", 2.into()), ("a", 3.into())]));
            assert_eq!(map_of(&second), expected(&[("s", 4.into()), ("n", 5.into()), ("a", 6.into())]));
            let kept = ptr(&second);
            drop((first, second));
            // Free again: the same map, with the new values in their places.
            let third = build(&[("s", 7), ("n", 8), ("a", 9)]);
            assert_eq!(ptr(&third), kept);
            assert_eq!(map_of(&third), expected(&[("s", 7.into()), ("n", 8.into()), ("a", 9.into())]));
            drop(third);
            // Other keys, or the same keys put in another order, or one key twice: a new map,
            // with what Cedar's own map would hold (the last value of a key given twice).
            let reordered = build(&[("a", 10), ("s", 11), ("n", 12)]);
            assert_eq!(map_of(&reordered), expected(&[("s", 11.into()), ("n", 12.into()), ("a", 10.into())]));
            drop(reordered);
            let again = build(&[("a", 13), ("s", 14), ("n", 15)]);
            assert_eq!(map_of(&again), expected(&[("s", 14.into()), ("n", 15.into()), ("a", 13.into())]));
            drop(again);
            let fewer = build(&[("a", 16), ("s", 17)]);
            assert_eq!(map_of(&fewer), expected(&[("s", 17.into()), ("a", 16.into())]));
            drop(fewer);
            let twice = build(&[("a", 18), ("s", 19), ("a", 20)]);
            assert_eq!(map_of(&twice), expected(&[("s", 19.into()), ("a", 20.into())]));
            drop(twice);
            let after = build(&[("a", 21), ("s", 22), ("a", 23)]);
            assert_eq!(map_of(&after), expected(&[("s", 22.into()), ("a", 23.into())]));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn conditions_hold_fail_and_err_as_cedar_says() {
        let entities = entities();
        let req = request(r#"User::"ann""#);
        let eval = Evaluator::new(&req, &entities);
        let holds = |text: &str| eval.holds(&Condition::body_of(&policy(text)));
        // The scope is left out: only the conditions are evaluated.
        assert_eq!(holds(r#"permit(principal == User::"bob", action, resource);"#), Ok(true));
        assert_eq!(holds("permit(principal, action, resource) when { principal.admin };"), Ok(true));
        assert_eq!(holds("permit(principal, action, resource) unless { principal.admin };"), Ok(false));
        assert_eq!(holds("permit(principal, action, resource) when { principal in Group::\"g\" };"), Ok(true));
        assert_eq!(
            holds("permit(principal, action, resource) when { principal.getTag(\"team\") == \"a\" };"),
            Ok(true)
        );
        let err =
            holds("permit(principal, action, resource) when { context.n + 9223372036854775807 > 0 };").unwrap_err().0;
        assert!(err.contains("overflow"), "{err}");
        assert_eq!(
            eval.holds(&Condition(Expr::val(1i64))),
            Err(CedarError("the condition evaluated to 1, not a boolean".to_string()))
        );
    }

    #[test]
    fn policies_begin_where_the_parser_saw_them() {
        let src = "// c\n@id(\"a\")\npermit(principal, action, resource);\n  forbid(principal, action, resource);\npermit(principal == ?principal, action, resource);";
        let set = PolicySet::from_str(src).unwrap();
        let mut offsets: Vec<usize> = set.policies().map(|p| policy_offset(p).unwrap()).collect();
        offsets.sort();
        assert_eq!(offsets, [5, 53]);
        let template = set.templates().next().unwrap();
        assert_eq!(template_offset(template), src.find("permit(principal == ?"));
    }
}
