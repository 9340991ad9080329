//! The directory: agents, blueprints, sponsors, users and resources, from `directory.json`
//! and from live changes, every reference checked; and the Cedar entities of one request.
//!
//! A directory is a value made of persistent maps (`imbl`): a change makes a new directory
//! that shares everything it did not touch, in time and memory that follow the change, not
//! the tenant, while requests keep the one they took. Agents are kept compactly and their
//! Cedar entities built per request; the few users, sponsors, blueprints and resources keep
//! theirs once built.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use cedar_policy::{EntityTypeName, EntityUid, Schema};
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use serde_json::value::RawValue;
use smol_str::SmolStr;

use crate::cedar::{Attr, CedarEntity, CedarError, check_entities, entity_uid};
use crate::input::{UnknownName, parse_name};

/// A risk level, for an agent (Identity Protection) or a sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RiskLevel {
    #[default]
    None,
    Low,
    Medium,
    High,
}

impl RiskLevel {
    pub const ALL: [RiskLevel; 4] = [RiskLevel::None, RiskLevel::Low, RiskLevel::Medium, RiskLevel::High];

    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::None => "none",
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
        }
    }
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RiskLevel {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_name("risk level", s, &RiskLevel::ALL, RiskLevel::as_str)
    }
}

/// How sensitive a resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sensitivity {
    Low,
    Medium,
    High,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Low => "low",
            Sensitivity::Medium => "medium",
            Sensitivity::High => "high",
        }
    }
}

impl FromStr for Sensitivity {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        let all = [Sensitivity::Low, Sensitivity::Medium, Sensitivity::High];
        parse_name("sensitivity", s, &all, Sensitivity::as_str)
    }
}

/// A directory that could not be read: names the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("{0}")]
    Syntax(String),
    #[error("{object}: field `{field}`: {message}")]
    Field { object: String, field: String, message: String },
    #[error("{object}: {message}")]
    Object { object: String, message: String },
}

/// Custom security attributes: Cedar entity tags, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(Box<[(SmolStr, SmolStr)]>);

impl Tags {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| self.0[i].1.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn attrs(&self) -> impl Iterator<Item = (&str, Attr)> {
        self.0.iter().map(|(k, v)| (k.as_str(), Attr::smol(v)))
    }
}

impl Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Per record: where it came from in time (a number no other record of this process has),
/// and, for the few kinds that are not agents, its Cedar entity once built.
#[derive(Debug, Default)]
struct Made {
    serial: u64,
    entity: OnceLock<CedarEntity>,
}

impl Made {
    fn new() -> Made {
        Made { serial: next_serial(), entity: OnceLock::new() }
    }
}

/// A number no other record or change of this process has had: what caches of values derived
/// from the directory are keyed by.
fn next_serial() -> u64 {
    static SERIALS: AtomicU64 = AtomicU64::new(1);
    SERIALS.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Serialize)]
pub struct User {
    pub id: SmolStr,
    pub name: SmolStr,
    #[serde(skip)]
    made: Made,
}

#[derive(Debug, Serialize)]
pub struct Sponsor {
    pub id: SmolStr,
    pub name: SmolStr,
    pub active: bool,
    pub department: SmolStr,
    pub tags: Tags,
    #[serde(skip)]
    made: Made,
}

#[derive(Debug, Serialize)]
pub struct Blueprint {
    pub id: SmolStr,
    pub name: SmolStr,
    pub enabled: bool,
    pub publisher: SmolStr,
    pub allowed_scopes: Box<[SmolStr]>,
    pub allowed_resources: Box<[SmolStr]>,
    pub tags: Tags,
    #[serde(skip)]
    made: Made,
}

/// One agent, compactly: ids by value (a `SmolStr` holds up to 23 bytes inline), no Cedar
/// entity kept (it is built for the request that needs it).
#[derive(Debug, Serialize)]
pub struct Agent {
    pub id: SmolStr,
    pub name: SmolStr,
    pub blueprint: SmolStr,
    pub sponsor: SmolStr,
    pub owners: Box<[SmolStr]>,
    pub enabled: bool,
    pub risk: RiskLevel,
    pub framework: SmolStr,
    pub channel: SmolStr,
    pub tags: Tags,
    #[serde(skip)]
    serial: u64,
}

#[derive(Debug, Serialize)]
pub struct Resource {
    pub id: SmolStr,
    pub name: SmolStr,
    pub audiences: Box<[SmolStr]>,
    pub sensitivity: SmolStr,
    pub tags: Tags,
    #[serde(skip)]
    made: Made,
}

/// A kind of directory record: its fields by name (bit `i` of a field mask is field `i`, the
/// id being field 0), and how a patch of some of them lies over an older record.
pub trait Record: Sized + Serialize {
    /// `agent`, `blueprint`, …: how errors name one.
    const KIND: &'static str;
    const FIELDS: &'static [&'static str];
    fn id(&self) -> &SmolStr;
    /// A new record: this one's fields in `given`, `old`'s for the others.
    fn merged(&self, old: &Self, given: u16) -> Self;
    /// The fields in `given` say the same in both.
    fn same_in(&self, other: &Self, given: u16) -> bool;

    /// The mask of every field.
    fn all() -> u16 {
        ((1u32 << Self::FIELDS.len()) - 1) as u16
    }

    /// The bit of field `name`.
    fn bit(name: &str) -> u16 {
        Self::FIELDS.iter().position(|f| *f == name).map_or(0, |i| 1 << i)
    }
}

macro_rules! record {
    ($ty:ident, $kind:literal, $made:ident: $fresh:expr; $($field:ident),*) => {
        impl Record for $ty {
            const KIND: &'static str = $kind;
            const FIELDS: &'static [&'static str] = &["id", $(stringify!($field)),*];

            fn id(&self) -> &SmolStr {
                &self.id
            }

            fn merged(&self, old: &Self, given: u16) -> Self {
                $ty {
                    id: self.id.clone(),
                    $($field: if given & Self::bit(stringify!($field)) != 0 { self.$field.clone() } else { old.$field.clone() },)*
                    $made: $fresh,
                }
            }

            fn same_in(&self, other: &Self, given: u16) -> bool {
                self.id == other.id $(&& (given & Self::bit(stringify!($field)) == 0 || self.$field == other.$field))*
            }
        }

        /// The same content (what a directory file says), whenever it was made.
        impl PartialEq for $ty {
            fn eq(&self, other: &Self) -> bool {
                self.same_in(other, Self::all())
            }
        }
    };
}
record!(User, "user", made: Made::new(); name);
record!(Sponsor, "sponsor", made: Made::new(); name, active, department, tags);
record!(Blueprint, "blueprint", made: Made::new(); name, enabled, publisher, allowed_scopes, allowed_resources, tags);
record!(Agent, "agent", serial: next_serial(); name, blueprint, sponsor, owners, enabled, risk, framework, channel, tags);
record!(Resource, "resource", made: Made::new(); name, audiences, sensitivity, tags);

/// An object a change upserts: the record as read (the file's defaults in the fields it left
/// out), and which fields it gave. Over an object that exists, only the given fields change.
#[derive(Debug)]
pub struct Upsert<T> {
    pub record: Arc<T>,
    pub given: u16,
}

impl<T> Clone for Upsert<T> {
    fn clone(&self) -> Self {
        Upsert { record: self.record.clone(), given: self.given }
    }
}

impl<T: Record> Upsert<T> {
    /// A whole object: every field given.
    pub fn whole(record: Arc<T>) -> Upsert<T> {
        Upsert { record, given: T::all() }
    }

    pub fn id(&self) -> &SmolStr {
        self.record.id()
    }

    /// The record served once this lies over `old` (None: a new object).
    fn over(&self, old: Option<&Arc<T>>) -> Arc<T> {
        match old {
            Some(old) if self.given != T::all() => Arc::new(self.record.merged(old, self.given)),
            _ => self.record.clone(),
        }
    }
}

/// Only the id and the fields given: read back, it is the same upsert.
impl<T: Record> Serialize for Upsert<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        match serde_json::to_value(&*self.record).map_err(S::Error::custom)? {
            Json::Object(mut fields) => {
                fields.retain(|k, _| T::bit(k) & (self.given | 1) != 0);
                fields.serialize(s)
            }
            other => other.serialize(s),
        }
    }
}

impl User {
    fn entity(&self, t: &EntityTypes) -> &CedarEntity {
        self.made
            .entity
            .get_or_init(|| CedarEntity::new(entity_uid(&t.user, &self.id), [("name", Attr::smol(&self.name))], [], []))
    }
}

impl Sponsor {
    fn entity(&self, t: &EntityTypes) -> &CedarEntity {
        self.made.entity.get_or_init(|| {
            let attrs = [
                ("name", Attr::smol(&self.name)),
                ("active", Attr::bool(self.active)),
                ("department", Attr::smol(&self.department)),
            ];
            CedarEntity::new(entity_uid(&t.sponsor, &self.id), attrs, [], self.tags.attrs())
        })
    }
}

impl Blueprint {
    fn entity(&self, t: &EntityTypes) -> &CedarEntity {
        self.made.entity.get_or_init(|| {
            let attrs = [
                ("name", Attr::smol(&self.name)),
                ("enabled", Attr::bool(self.enabled)),
                ("publisher", Attr::smol(&self.publisher)),
                ("allowed_scopes", Attr::smols(self.allowed_scopes.iter())),
                (
                    "allowed_resources",
                    Attr::entities(self.allowed_resources.iter().map(|r| entity_uid(&t.resource, r))),
                ),
            ];
            CedarEntity::new(entity_uid(&t.blueprint, &self.id), attrs, [], self.tags.attrs())
        })
    }
}

impl Agent {
    /// The agent's Cedar entity, built anew: an agent's is kept nowhere, so a million agents
    /// cost their records only.
    ///
    /// INVARIANT: an agent's only ancestors are its blueprint and sponsor, which have none, so
    /// its parents are its transitive closure.
    pub fn entity(&self, t: &EntityTypes) -> CedarEntity {
        let (blueprint, sponsor) = (entity_uid(&t.blueprint, &self.blueprint), entity_uid(&t.sponsor, &self.sponsor));
        let attrs = [
            ("name", Attr::smol(&self.name)),
            ("blueprint", Attr::entity(blueprint.clone())),
            ("sponsor", Attr::entity(sponsor.clone())),
            ("owners", Attr::entities(self.owners.iter().map(|o| entity_uid(&t.user, o)))),
            ("enabled", Attr::bool(self.enabled)),
            ("risk", Attr::string(self.risk.as_str())),
            ("framework", Attr::smol(&self.framework)),
            ("channel", Attr::smol(&self.channel)),
        ];
        CedarEntity::new(entity_uid(&t.agent, &self.id), attrs, [blueprint, sponsor], self.tags.attrs())
    }

    /// Changes whenever the agent's record does: a key for what is learned of it.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

impl Resource {
    fn entity(&self, t: &EntityTypes) -> &CedarEntity {
        self.made.entity.get_or_init(|| {
            let attrs = [
                ("name", Attr::smol(&self.name)),
                ("audiences", Attr::smols(self.audiences.iter())),
                ("sensitivity", Attr::smol(&self.sensitivity)),
            ];
            CedarEntity::new(entity_uid(&t.resource, &self.id), attrs, [], self.tags.attrs())
        })
    }

    /// Changes whenever the resource's record does.
    pub fn serial(&self) -> u64 {
        self.made.serial
    }
}

/// Cedar entity type names of the schema, built once.
#[derive(Debug, Clone)]
pub struct EntityTypes {
    pub agent: EntityTypeName,
    pub blueprint: EntityTypeName,
    pub sponsor: EntityTypeName,
    pub user: EntityTypeName,
    pub resource: EntityTypeName,
    pub action: EntityTypeName,
}

impl EntityTypes {
    pub fn new() -> Self {
        fn name(s: &str) -> EntityTypeName {
            // INVARIANT: these literals are valid Cedar identifiers, so parsing cannot fail.
            #[allow(clippy::expect_used)]
            EntityTypeName::from_str(s).expect("a valid entity type name")
        }
        EntityTypes {
            agent: name("Agent"),
            blueprint: name("Blueprint"),
            sponsor: name("Sponsor"),
            user: name("User"),
            resource: name("Resource"),
            action: name("Action"),
        }
    }

    /// The names, built once per process.
    pub fn get() -> &'static EntityTypes {
        static TYPES: std::sync::LazyLock<EntityTypes> = std::sync::LazyLock::new(EntityTypes::new);
        &TYPES
    }

    pub fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        entity_uid(ty, &SmolStr::new(id))
    }
}

impl Default for EntityTypes {
    fn default() -> Self {
        Self::new()
    }
}

/// The sections of a directory document, in the order they are read.
const SECTIONS: [&str; 5] = ["users", "sponsors", "blueprints", "agents", "resources"];

/// The objects of a directory document's sections: the whole of `directory.json`, or what a
/// change upserts.
#[derive(Debug, Default, Serialize)]
pub struct Objects {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<Upsert<User>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sponsors: Vec<Upsert<Sponsor>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blueprints: Vec<Upsert<Blueprint>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<Upsert<Agent>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Upsert<Resource>>,
}

impl Objects {
    /// The ids of the objects, by section.
    pub fn ids(&self) -> Ids {
        Ids {
            users: self.users.iter().map(|x| x.id().clone()).collect(),
            sponsors: self.sponsors.iter().map(|x| x.id().clone()).collect(),
            blueprints: self.blueprints.iter().map(|x| x.id().clone()).collect(),
            agents: self.agents.iter().map(|x| x.id().clone()).collect(),
            resources: self.resources.iter().map(|x| x.id().clone()).collect(),
        }
    }

    /// How many each section holds, by section name.
    pub fn counts(&self) -> [(&'static str, usize); 5] {
        [
            ("users", self.users.len()),
            ("sponsors", self.sponsors.len()),
            ("blueprints", self.blueprints.len()),
            ("agents", self.agents.len()),
            ("resources", self.resources.len()),
        ]
    }

    pub fn len(&self) -> usize {
        self.counts().iter().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ids by section: what a change removes, or the ids of what it upserts.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Ids {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<SmolStr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sponsors: Vec<SmolStr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blueprints: Vec<SmolStr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<SmolStr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<SmolStr>,
}

impl Ids {
    /// How many each section holds, by section name.
    pub fn counts(&self) -> [(&'static str, usize); 5] {
        [
            ("users", self.users.len()),
            ("sponsors", self.sponsors.len()),
            ("blueprints", self.blueprints.len()),
            ("agents", self.agents.len()),
            ("resources", self.resources.len()),
        ]
    }

    pub fn len(&self) -> usize {
        self.counts().iter().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn section_mut(&mut self, name: &str) -> Option<&mut Vec<SmolStr>> {
        match name {
            "users" => Some(&mut self.users),
            "sponsors" => Some(&mut self.sponsors),
            "blueprints" => Some(&mut self.blueprints),
            "agents" => Some(&mut self.agents),
            "resources" => Some(&mut self.resources),
            _ => None,
        }
    }
}

/// A change to the directory, in the shapes of `directory.json`:
/// `{"upsert": {<any of its sections>}, "remove": {"agents": [ids], "blueprints": [ids], …}}`.
/// Upserts are applied first, then removals; the result is checked whole.
#[derive(Debug, Default, Serialize)]
pub struct Change {
    #[serde(skip_serializing_if = "Objects::is_empty")]
    pub upsert: Objects,
    #[serde(skip_serializing_if = "Ids::is_empty")]
    pub remove: Ids,
    #[serde(skip)]
    warnings: Vec<String>,
}

impl Change {
    /// Reads a change document; every error names the object and field.
    pub fn from_json_str(src: &str) -> Result<Change, Vec<DirectoryError>> {
        let root = raw_object(src).map_err(|e| {
            vec![match e.classify() {
                serde_json::error::Category::Data if e.line() == 1 && e.column() <= 1 => DirectoryError::Syntax(
                    "expected a JSON object: {\"upsert\": {<directory sections>}, \"remove\": {\"agents\": [ids], …}}"
                        .into(),
                ),
                _ => syntax_error(&e),
            }]
        })?;
        let mut errors = Vec::new();
        let mut change = Change::default();
        for (key, raw) in root {
            match key.as_str() {
                "upsert" => match raw_object(raw.get()) {
                    Ok(sections) => {
                        change.upsert = read_objects(sections, Unknown::Refuse, &mut change.warnings, &mut errors)
                    }
                    Err(_) => errors.push(object_error("`upsert`", "expected an object of directory sections")),
                },
                "remove" => match raw_object(raw.get()) {
                    Ok(sections) => {
                        for (section, ids) in sections {
                            let label = format!("`remove.{section}`");
                            let Some(list) = change.remove.section_mut(&section) else {
                                errors.push(object_error(
                                    &label,
                                    "unknown section: expected users, sponsors, blueprints, agents, resources",
                                ));
                                continue;
                            };
                            match serde_json::from_str::<Vec<SmolStr>>(ids.get()) {
                                Ok(ids) => {
                                    for id in ids {
                                        match crate::input::id_problem(&id) {
                                            Some(problem) => errors.push(object_error(
                                                &label,
                                                &format!("`{}`: {problem}", crate::input::printable(&id)),
                                            )),
                                            None => list.push(id),
                                        }
                                    }
                                }
                                Err(_) => errors.push(object_error(&label, "expected an array of ids")),
                            }
                        }
                    }
                    Err(_) => errors.push(object_error("`remove`", "expected an object of id lists by section")),
                },
                other => errors
                    .push(object_error(&format!("`{other}`"), "unknown key: a change has `upsert` and `remove` only")),
            }
        }
        if errors.is_empty() && change.upsert.is_empty() && change.remove.is_empty() {
            errors.push(DirectoryError::Syntax("the change is empty: give `upsert`, `remove` or both".into()));
        }
        if errors.is_empty() { Ok(change) } else { Err(errors) }
    }

    /// This change as it applies over `served`: an upsert of an object `served` lacks becomes
    /// whole (the file's defaults in the fields it left out), so that it means the same
    /// whatever it is later laid over. What the journal keeps and the overlay records.
    pub fn resolved(&self, served: &Directory) -> Change {
        fn resolve<T: Record>(ups: &[Upsert<T>], served: &Map<T>) -> Vec<Upsert<T>> {
            ups.iter()
                .map(|u| if served.contains_key(u.id()) { u.clone() } else { Upsert::whole(u.record.clone()) })
                .collect()
        }
        let u = &self.upsert;
        Change {
            upsert: Objects {
                users: resolve(&u.users, &served.users),
                sponsors: resolve(&u.sponsors, &served.sponsors),
                blueprints: resolve(&u.blueprints, &served.blueprints),
                agents: resolve(&u.agents, &served.agents),
                resources: resolve(&u.resources, &served.resources),
            },
            remove: self.remove.clone(),
            warnings: Vec::new(),
        }
    }

    /// Fields and sections the change does not know, ignored.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// One line of JSON that reads back as the same change (the journal's form).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// What the change does, in a few words (an audit record, an answer).
    pub fn summary(&self) -> String {
        let upserts = self.upsert.counts().map(|(what, n)| ("upsert", what, n));
        let removals = self.remove.counts().map(|(what, n)| ("remove", what, n));
        let parts = upserts.into_iter().chain(removals).filter(|(_, _, n)| *n > 0);
        parts.map(|(verb, what, n)| format!("{verb} {n} {what}")).collect::<Vec<_>>().join(", ")
    }

    /// An id given twice in one list, or both upserted and removed, is an error: which one
    /// was meant cannot be told.
    fn check_unique(&self, errors: &mut Vec<DirectoryError>) {
        let (u, r) = (&self.upsert, &self.remove);
        let upserted = |kind: &str,
                        ids: &mut dyn Iterator<Item = &SmolStr>,
                        removed: &[SmolStr],
                        errors: &mut Vec<DirectoryError>| {
            let up = unique_ids(kind, ids, errors);
            let mut gone = HashSet::new();
            for id in removed {
                if !gone.insert(id) {
                    errors.push(object_error(&format!("{kind} `{id}`"), "is removed more than once"));
                } else if up.contains(id.as_str()) {
                    errors.push(object_error(&format!("{kind} `{id}`"), "is both upserted and removed"));
                }
            }
        };
        upserted("user", &mut u.users.iter().map(|x| x.id()), &r.users, errors);
        upserted("sponsor", &mut u.sponsors.iter().map(|x| x.id()), &r.sponsors, errors);
        upserted("blueprint", &mut u.blueprints.iter().map(|x| x.id()), &r.blueprints, errors);
        upserted("agent", &mut u.agents.iter().map(|x| x.id()), &r.agents, errors);
        upserted("resource", &mut u.resources.iter().map(|x| x.id()), &r.resources, errors);
    }
}

/// The directory's maps, with the decision path's hasher (`crate::HashState`): a request looks up
/// its agent, blueprint, sponsor and resource, and SipHash was most of that.
type Hashed<K, V> = imbl::GenericHashMap<K, V, crate::HashState, imbl::shared_ptr::DefaultSharedPtr>;
type Map<T> = Hashed<SmolStr, Arc<T>>;
/// How many objects refer to an id (agents to a blueprint, blueprints to a resource, …).
type Uses = Hashed<SmolStr, u32>;

/// The whole directory, every reference checked. A value: cloning it is cheap, and a change
/// makes a new one that shares everything the change did not touch (persistent maps), so a
/// request keeps the directory it took while a change builds the next.
#[derive(Clone, Default)]
pub struct Directory {
    users: Map<User>,
    sponsors: Map<Sponsor>,
    blueprints: Map<Blueprint>,
    agents: Map<Agent>,
    resources: Map<Resource>,
    /// A resource's id, and each of its audiences, to its id.
    names: Hashed<SmolStr, SmolStr>,
    agents_of_blueprint: Uses,
    agents_of_sponsor: Uses,
    agents_of_owner: Uses,
    blueprints_of_resource: Uses,
    /// Changes with every change to a user, sponsor, blueprint or resource (what an agent's
    /// policies may read besides the agent): a key for what is learned of them.
    others: u64,
    /// Fields and sections the directory file does not know, ignored.
    warnings: Arc<[String]>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Directory({} agents)", self.agents.len())
    }
}

/// The errors joined by `sep`, at most 50 of them and how many more: a change with many
/// errors is refused with a message that still fits an answer's header and a log line.
pub fn listed(errors: &[DirectoryError], sep: &str) -> String {
    const SHOWN: usize = 50;
    /// An error is cut here, and the list stops growing past its total.
    const ERROR_BYTES: usize = 240;
    // Sent in a header, percent-encoded: up to three times as long.
    const TOTAL_BYTES: usize = 2 << 10;
    let mut text = String::new();
    let mut shown = 0;
    for e in errors.iter().take(SHOWN) {
        if text.len() >= TOTAL_BYTES {
            break;
        }
        let mut e = e.to_string();
        if e.len() > ERROR_BYTES {
            let mut cut = ERROR_BYTES;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
            e.push('…');
        }
        if shown > 0 {
            text.push_str(sep);
        }
        text.push_str(&e);
        shown += 1;
    }
    if errors.len() > shown {
        text.push_str(&format!("{sep}… and {} more", errors.len() - shown));
    }
    text
}

/// Each id once, in order (a change that names one twice is refused, and said so once).
fn once_each(ids: &[SmolStr]) -> impl Iterator<Item = &SmolStr> {
    let mut seen = HashSet::new();
    ids.iter().filter(move |id| seen.insert(id.as_str()))
}

fn add_use(uses: &mut Uses, id: &SmolStr) {
    *uses.entry(id.clone()).or_insert(0) += 1;
}

fn drop_use(uses: &mut Uses, id: &SmolStr) {
    match uses.get_mut(id) {
        Some(n) if *n > 1 => *n -= 1,
        _ => {
            uses.remove(id);
        }
    }
}

fn uses(uses: &Uses, id: &str) -> u32 {
    uses.get(id).copied().unwrap_or(0)
}

impl Directory {
    /// Parses `directory.json` and checks every reference. The file is read object by object
    /// (each section is only scanned whole), so a large file costs its text and its records.
    pub fn from_json_str(src: &str) -> Result<Directory, Vec<DirectoryError>> {
        let root = raw_object(src).map_err(|e| {
            vec![match e.classify() {
                serde_json::error::Category::Data if !src.trim_start().starts_with('{') => DirectoryError::Syntax(
                    "expected a JSON object with users, sponsors, blueprints, agents, resources".into(),
                ),
                _ => syntax_error(&e),
            }]
        })?;
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let objects = read_objects(root, Unknown::Warn, &mut warnings, &mut errors);
        if errors.iter().any(|e| matches!(e, DirectoryError::Syntax(_))) {
            // An object that could not be read at all would make its references dangle.
            return Err(errors);
        }
        let change = Change { upsert: objects, remove: Ids::default(), warnings: Vec::new() };
        let mut dir = Directory::default().apply_checked(&change, errors)?;
        dir.warnings = warnings.into();
        Ok(dir)
    }

    /// The directory with `change` applied, if the result is whole: no dangling reference, no
    /// removed object still in use, no ambiguous resource name. Otherwise every error, and
    /// nothing of the change applies. Costs what the change touches, not the directory's size.
    pub fn apply(&self, change: &Change) -> Result<Directory, Vec<DirectoryError>> {
        self.apply_checked(change, Vec::new())
    }

    fn apply_checked(
        &self,
        change: &Change,
        mut errors: Vec<DirectoryError>,
    ) -> Result<Directory, Vec<DirectoryError>> {
        change.check_unique(&mut errors);
        let mut d = self.clone();
        let (up, rm) = (&change.upsert, &change.remove);
        // Each upsert over what is there: a patch of an object that exists, else a new object.
        let users: Vec<Arc<User>> = up.users.iter().map(|u| u.over(d.users.get(u.id()))).collect();
        let sponsors: Vec<Arc<Sponsor>> = up.sponsors.iter().map(|u| u.over(d.sponsors.get(u.id()))).collect();
        let blueprints: Vec<Arc<Blueprint>> = up.blueprints.iter().map(|u| u.over(d.blueprints.get(u.id()))).collect();
        let resources: Vec<Arc<Resource>> = up.resources.iter().map(|u| u.over(d.resources.get(u.id()))).collect();
        let mut agents: Vec<Arc<Agent>> = Vec::with_capacity(up.agents.len());
        for u in &up.agents {
            let old = d.agents.get(u.id());
            if old.is_none() {
                let required = [("blueprint", &u.record.blueprint), ("sponsor", &u.record.sponsor)];
                for (field, value) in required {
                    if u.given & Agent::bit(field) == 0 || value.is_empty() {
                        errors.push(DirectoryError::Field {
                            object: format!("agent `{}`", crate::input::printable(u.id())),
                            field: field.into(),
                            message: format!("is required: every agent has exactly one {field}"),
                        });
                    }
                }
            }
            agents.push(u.over(old));
        }

        for u in &users {
            d.users.insert(u.id.clone(), u.clone());
        }
        for s in &sponsors {
            d.sponsors.insert(s.id.clone(), s.clone());
        }
        for b in &blueprints {
            if let Some(old) = d.blueprints.insert(b.id.clone(), b.clone()) {
                old.allowed_resources.iter().for_each(|r| drop_use(&mut d.blueprints_of_resource, r));
            }
            b.allowed_resources.iter().for_each(|r| add_use(&mut d.blueprints_of_resource, r));
        }
        for a in &agents {
            if let Some(old) = d.agents.insert(a.id.clone(), a.clone()) {
                d.forget_agent(&old);
            }
            d.count_agent(a);
        }
        for r in &resources {
            if let Some(old) = d.resources.insert(r.id.clone(), r.clone()) {
                d.forget_names(&old);
            }
        }
        // Ids first, then audiences: an audience that is another resource's id is the error,
        // unless that resource goes in this change (its names are free once it is gone, as
        // they would be had it gone in a change of its own before).
        let going: HashSet<&SmolStr> = rm.resources.iter().collect();
        for r in &resources {
            if let Some(other) = d.names.insert(r.id.clone(), r.id.clone())
                && other != r.id
                && !going.contains(&other)
            {
                errors.push(DirectoryError::Field {
                    object: format!("resource `{}`", r.id),
                    field: "id".into(),
                    message: format!("`{}` is also an audience of resource `{other}`", r.id),
                });
            }
        }
        for r in &resources {
            for aud in r.audiences.iter() {
                match d.names.get(aud) {
                    Some(other) if *other != r.id && !going.contains(other) => errors.push(DirectoryError::Field {
                        object: format!("resource `{}`", r.id),
                        field: "audiences".into(),
                        message: format!("audience `{aud}` also names resource `{other}`"),
                    }),
                    _ => {
                        d.names.insert(aud.clone(), r.id.clone());
                    }
                }
            }
        }

        let unknown = |kind: &str, id: &SmolStr| object_error(&format!("{kind} `{id}`"), "is not in the directory");
        for id in once_each(&rm.agents) {
            match d.agents.remove(id) {
                Some(old) => d.forget_agent(&old),
                None => errors.push(unknown("agent", id)),
            }
        }
        for id in once_each(&rm.blueprints) {
            match d.blueprints.remove(id) {
                Some(old) => old.allowed_resources.iter().for_each(|r| drop_use(&mut d.blueprints_of_resource, r)),
                None => errors.push(unknown("blueprint", id)),
            }
        }
        for id in once_each(&rm.sponsors) {
            if d.sponsors.remove(id).is_none() {
                errors.push(unknown("sponsor", id));
            }
        }
        for id in once_each(&rm.users) {
            if d.users.remove(id).is_none() {
                errors.push(unknown("user", id));
            }
        }
        for id in once_each(&rm.resources) {
            match d.resources.remove(id) {
                Some(old) => d.forget_names(&old),
                None => errors.push(unknown("resource", id)),
            }
        }

        // What the change upserted names only what is there; what it removed is named by nothing.
        let dangling = |errors: &mut Vec<DirectoryError>, object: String, field: &str, kind: &str, id: &str| {
            errors.push(DirectoryError::Field {
                object,
                field: field.into(),
                message: format!("unknown {kind} `{id}`"),
            })
        };
        for b in &blueprints {
            for r in b.allowed_resources.iter().filter(|r| !d.resources.contains_key(*r)) {
                dangling(&mut errors, format!("blueprint `{}`", b.id), "allowed_resources", "resource", r);
            }
        }
        for a in &agents {
            let object = || format!("agent `{}`", a.id);
            if !a.blueprint.is_empty() && !d.blueprints.contains_key(&a.blueprint) {
                dangling(&mut errors, object(), "blueprint", "blueprint", &a.blueprint);
            }
            if !a.sponsor.is_empty() && !d.sponsors.contains_key(&a.sponsor) {
                dangling(&mut errors, object(), "sponsor", "sponsor", &a.sponsor);
            }
            for o in a.owners.iter().filter(|o| !d.users.contains_key(*o)) {
                dangling(&mut errors, object(), "owners", "user", o);
            }
        }
        let in_use = |errors: &mut Vec<DirectoryError>, kind: &str, id: &SmolStr, n: u32, by: &str| {
            if n > 0 {
                errors.push(object_error(&format!("{kind} `{id}`"), &format!("cannot be removed: {n} {by}")));
            }
        };
        for id in once_each(&rm.blueprints) {
            in_use(&mut errors, "blueprint", id, uses(&d.agents_of_blueprint, id), "agents are made from it");
        }
        for id in once_each(&rm.sponsors) {
            in_use(&mut errors, "sponsor", id, uses(&d.agents_of_sponsor, id), "agents have it as their sponsor");
        }
        for id in once_each(&rm.users) {
            in_use(&mut errors, "user", id, uses(&d.agents_of_owner, id), "agents have it among their owners");
        }
        for id in once_each(&rm.resources) {
            in_use(&mut errors, "resource", id, uses(&d.blueprints_of_resource, id), "blueprints allow it");
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let others = up.users.len() + up.sponsors.len() + up.blueprints.len() + up.resources.len();
        if others + rm.users.len() + rm.sponsors.len() + rm.blueprints.len() + rm.resources.len() > 0 {
            d.others = next_serial();
        }
        Ok(d)
    }

    /// The Cedar entities of what `change` upserted, as this directory (the change applied)
    /// serves them, to check against the schema: every sponsor, blueprint and resource; of
    /// agents, one with tags and one without, and one user (the rest are built by the same
    /// code from the same fields).
    pub fn entities_of_change(&self, change: &Change, t: &EntityTypes) -> Vec<CedarEntity> {
        let up = &change.upsert;
        let mut out = Vec::new();
        out.extend(up.users.iter().take(1).filter_map(|u| self.users.get(u.id())).map(|x| x.entity(t).clone()));
        out.extend(up.sponsors.iter().filter_map(|u| self.sponsors.get(u.id())).map(|x| x.entity(t).clone()));
        out.extend(up.blueprints.iter().filter_map(|u| self.blueprints.get(u.id())).map(|x| x.entity(t).clone()));
        out.extend(up.resources.iter().filter_map(|u| self.resources.get(u.id())).map(|x| x.entity(t).clone()));
        let agents = || up.agents.iter().filter_map(|u| self.agents.get(u.id()));
        let untagged = agents().find(|a| a.tags.is_empty());
        let tagged = agents().find(|a| !a.tags.is_empty());
        out.extend(untagged.into_iter().chain(tagged).map(|a| a.entity(t)));
        out
    }

    fn count_agent(&mut self, a: &Agent) {
        add_use(&mut self.agents_of_blueprint, &a.blueprint);
        add_use(&mut self.agents_of_sponsor, &a.sponsor);
        a.owners.iter().for_each(|o| add_use(&mut self.agents_of_owner, o));
    }

    fn forget_agent(&mut self, a: &Agent) {
        drop_use(&mut self.agents_of_blueprint, &a.blueprint);
        drop_use(&mut self.agents_of_sponsor, &a.sponsor);
        a.owners.iter().for_each(|o| drop_use(&mut self.agents_of_owner, o));
    }

    fn forget_names(&mut self, r: &Resource) {
        for name in std::iter::once(&r.id).chain(r.audiences.iter()) {
            if self.names.get(name) == Some(&r.id) {
                self.names.remove(name);
            }
        }
    }

    pub fn agent(&self, id: &str) -> Option<&Arc<Agent>> {
        self.agents.get(id)
    }

    pub fn blueprint(&self, id: &str) -> Option<&Arc<Blueprint>> {
        self.blueprints.get(id)
    }

    pub fn sponsor(&self, id: &str) -> Option<&Arc<Sponsor>> {
        self.sponsors.get(id)
    }

    pub fn user(&self, id: &str) -> Option<&Arc<User>> {
        self.users.get(id)
    }

    /// A resource by its id or one of its audiences.
    pub fn resource(&self, id_or_audience: &str) -> Option<&Arc<Resource>> {
        self.names.get(id_or_audience).and_then(|id| self.resources.get(id))
    }

    /// The resource that has `audience` among its audiences (an id does not count).
    pub fn resource_by_audience(&self, audience: &str) -> Option<&Arc<Resource>> {
        self.resource(audience).filter(|r| r.audiences.iter().any(|a| a == audience))
    }

    /// Every agent, in no particular order.
    pub fn agents(&self) -> impl Iterator<Item = &Arc<Agent>> {
        self.agents.values()
    }

    /// Users, sponsors, blueprints, agents, resources.
    pub fn counts(&self) -> [usize; 5] {
        [self.users.len(), self.sponsors.len(), self.blueprints.len(), self.agents.len(), self.resources.len()]
    }

    /// Changes whenever a user, sponsor, blueprint or resource does.
    pub fn others_serial(&self) -> u64 {
        self.others
    }

    /// Fields and sections the directory does not know, ignored (a misspelt optional field).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The Cedar entity of `uid`, if the directory has it (a policy may name one literally).
    pub fn entity(&self, t: &EntityTypes, uid: &EntityUid) -> Option<CedarEntity> {
        let (ty, id) = (uid.type_name(), uid.id().unescaped());
        if *ty == t.agent {
            self.agents.get(id).map(|a| a.entity(t))
        } else if *ty == t.blueprint {
            self.blueprints.get(id).map(|b| b.entity(t).clone())
        } else if *ty == t.sponsor {
            self.sponsors.get(id).map(|s| s.entity(t).clone())
        } else if *ty == t.user {
            self.users.get(id).map(|u| u.entity(t).clone())
        } else if *ty == t.resource {
            self.resources.get(id).map(|r| r.entity(t).clone())
        } else {
            None
        }
    }

    /// Every entity of the directory.
    pub fn all_entities(&self, t: &EntityTypes) -> Vec<CedarEntity> {
        let mut out = Vec::with_capacity(self.counts().iter().sum());
        out.extend(self.users.values().map(|x| x.entity(t).clone()));
        out.extend(self.sponsors.values().map(|x| x.entity(t).clone()));
        out.extend(self.blueprints.values().map(|x| x.entity(t).clone()));
        out.extend(self.agents.values().map(|x| x.entity(t)));
        out.extend(self.resources.values().map(|x| x.entity(t).clone()));
        out
    }

    /// The entities of `blueprint`, `sponsor`, `resource` and `user` (cached with them).
    pub fn shared_entities<'a>(
        &'a self,
        t: &EntityTypes,
        blueprint: &'a Blueprint,
        sponsor: &'a Sponsor,
        resource: &'a Resource,
        user: Option<&str>,
    ) -> impl Iterator<Item = &'a CedarEntity> {
        let user = user.and_then(|u| self.users.get(u)).map(|u| u.entity(t));
        [Some(blueprint.entity(t)), Some(sponsor.entity(t)), Some(resource.entity(t)), user].into_iter().flatten()
    }

    /// Checks the directory's entities against the schema: every sponsor, blueprint and
    /// resource; of agents, one with tags and one without, and one user (every agent, and
    /// every user, is built by the same code from the same fields, so these stand for all).
    pub fn check_schema(&self, schema: &Schema, t: &EntityTypes) -> Result<(), CedarError> {
        let mut entities: Vec<CedarEntity> = Vec::new();
        entities.extend(self.users.values().take(1).map(|x| x.entity(t).clone()));
        entities.extend(self.sponsors.values().map(|x| x.entity(t).clone()));
        entities.extend(self.blueprints.values().map(|x| x.entity(t).clone()));
        entities.extend(self.resources.values().map(|x| x.entity(t).clone()));
        let untagged = self.agents.values().find(|a| a.tags.is_empty());
        let tagged = self.agents.values().find(|a| !a.tags.is_empty());
        entities.extend(untagged.into_iter().chain(tagged).map(|a| a.entity(t)));
        check_entities(&entities, schema)
    }

    /// The directory as a `directory.json` document, each section sorted by id.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        fn sorted<T>(m: &Map<T>) -> Vec<&T> {
            let mut v: Vec<(&SmolStr, &T)> = m.iter().map(|(k, v)| (k, &**v)).collect();
            v.sort_unstable_by(|a, b| a.0.cmp(b.0));
            v.into_iter().map(|(_, v)| v).collect()
        }
        #[derive(Serialize)]
        struct File<'a> {
            users: Vec<&'a User>,
            sponsors: Vec<&'a Sponsor>,
            blueprints: Vec<&'a Blueprint>,
            agents: Vec<&'a Agent>,
            resources: Vec<&'a Resource>,
        }
        let file = File {
            users: sorted(&self.users),
            sponsors: sorted(&self.sponsors),
            blueprints: sorted(&self.blueprints),
            agents: sorted(&self.agents),
            resources: sorted(&self.resources),
        };
        serde_json::to_string_pretty(&file)
    }
}

/// One section of the overlay: by id, what the live changes made of it over the base: an
/// upsert (a patch of the base's object, or a whole object), or its removal (None).
type Layer<T> = std::collections::BTreeMap<SmolStr, Option<Upsert<T>>>;

/// The live changes, net, by id. Laid over a base directory it gives what the changes made of
/// it; laid over a new base (a reload) it keeps them: a patch of an object keeps patching
/// the fields it gave, the others come from the new base.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    users: Layer<User>,
    sponsors: Layer<Sponsor>,
    blueprints: Layer<Blueprint>,
    agents: Layer<Agent>,
    resources: Layer<Resource>,
}

/// Adds `upserts` (resolved: see [`Change::resolved`]) and then `removals`.
fn record_layer<T: Record>(layer: &mut Layer<T>, upserts: &[Upsert<T>], removals: &[SmolStr]) {
    for u in upserts {
        let net = match layer.get(u.id()) {
            // Over a live upsert: this one's fields over it.
            Some(Some(prev)) => Upsert { record: u.over(Some(&prev.record)), given: prev.given | u.given },
            // A patch of the base's object, or a whole new object, as it was resolved.
            _ => u.clone(),
        };
        layer.insert(u.id().clone(), Some(net));
    }
    // A removal is kept as such, whatever the base has: what a restart replays must not
    // depend on the bundle it finds. A fold drops it once the bundle lacks the object too.
    for id in removals {
        layer.insert(id.clone(), None);
    }
}

/// The layer as an upsert list and a removal list over `base`.
fn split_layer<T: Record>(layer: &Layer<T>, up: &mut Vec<Upsert<T>>, rm: &mut Vec<SmolStr>, base: &Map<T>) {
    for (id, x) in layer {
        match x {
            Some(u) => up.push(u.clone()),
            None if base.contains_key(id) => rm.push(id.clone()),
            None => {}
        }
    }
}

/// Drops what `base` already says: an upsert whose fields the base's object has, a removal of
/// what the base lacks.
fn fold_layer<T: Record>(layer: &mut Layer<T>, base: &Map<T>) {
    layer.retain(|id, x| match (x, base.get(id)) {
        (Some(u), Some(b)) => !u.record.same_in(b, u.given),
        (None, None) => false,
        _ => true,
    });
}

impl Overlay {
    /// Adds a change (resolved: see [`Change::resolved`]), upserts first, then removals, as
    /// it was applied.
    pub fn record(&mut self, change: &Change) {
        let (up, rm) = (&change.upsert, &change.remove);
        record_layer(&mut self.users, &up.users, &rm.users);
        record_layer(&mut self.sponsors, &up.sponsors, &rm.sponsors);
        record_layer(&mut self.blueprints, &up.blueprints, &rm.blueprints);
        record_layer(&mut self.agents, &up.agents, &rm.agents);
        record_layer(&mut self.resources, &up.resources, &rm.resources);
    }

    /// How many objects the live changes set or remove.
    pub fn len(&self) -> usize {
        self.users.len() + self.sponsors.len() + self.blueprints.len() + self.agents.len() + self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The change that lays this overlay over `base`.
    pub fn as_change(&self, base: &Directory) -> Change {
        let mut change = Change::default();
        let (up, rm) = (&mut change.upsert, &mut change.remove);
        split_layer(&self.users, &mut up.users, &mut rm.users, &base.users);
        split_layer(&self.sponsors, &mut up.sponsors, &mut rm.sponsors, &base.sponsors);
        split_layer(&self.blueprints, &mut up.blueprints, &mut rm.blueprints, &base.blueprints);
        split_layer(&self.agents, &mut up.agents, &mut rm.agents, &base.agents);
        split_layer(&self.resources, &mut up.resources, &mut rm.resources, &base.resources);
        change
    }

    /// Every entry, as one change: what a journal keeps of the overlay, exactly (a removal of
    /// what the base lacks included: it is laid over a base only through [`Overlay::as_change`]).
    pub fn as_journal(&self) -> Change {
        let mut change = Change::default();
        let (up, rm) = (&mut change.upsert, &mut change.remove);
        fn all<T: Record>(layer: &Layer<T>, up: &mut Vec<Upsert<T>>, rm: &mut Vec<SmolStr>) {
            for (id, x) in layer {
                match x {
                    Some(u) => up.push(u.clone()),
                    None => rm.push(id.clone()),
                }
            }
        }
        all(&self.users, &mut up.users, &mut rm.users);
        all(&self.sponsors, &mut up.sponsors, &mut rm.sponsors);
        all(&self.blueprints, &mut up.blueprints, &mut rm.blueprints);
        all(&self.agents, &mut up.agents, &mut rm.agents);
        all(&self.resources, &mut up.resources, &mut rm.resources);
        change
    }

    /// Drops what `base` already says: the live changes an admin folded into the bundle.
    /// Returns how many were dropped.
    pub fn fold(&mut self, base: &Directory) -> usize {
        let before = self.len();
        fold_layer(&mut self.users, &base.users);
        fold_layer(&mut self.sponsors, &base.sponsors);
        fold_layer(&mut self.blueprints, &base.blueprints);
        fold_layer(&mut self.agents, &base.agents);
        fold_layer(&mut self.resources, &base.resources);
        before - self.len()
    }
}

/// A JSON object's members, each value left as text; a key given twice is an error.
fn raw_object(text: &str) -> Result<Vec<(String, &RawValue)>, serde_json::Error> {
    struct Members<'a>(Vec<(String, &'a RawValue)>);
    impl<'de> Deserialize<'de> for Members<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                    let mut out: Vec<(String, &'de RawValue)> = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        if out.iter().any(|(k, _)| *k == key) {
                            return Err(A::Error::custom(format!("duplicate key `{key}`")));
                        }
                        out.push((key, map.next_value()?));
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Members<'_>>(text).map(|m| m.0)
}

fn object_error(object: &str, message: &str) -> DirectoryError {
    DirectoryError::Object { object: object.into(), message: message.into() }
}

/// How a document treats what it does not know: `directory.json` warns of an unknown section
/// or field (a file exported with more fields still loads); a live change refuses it (a
/// misspelt field would otherwise be dropped in silence, and the change applied without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unknown {
    Warn,
    Refuse,
}

/// The objects of a document's sections, read one object at a time: each is parsed, read into
/// its record and dropped before the next.
fn read_objects(
    root: Vec<(String, &RawValue)>,
    unknown: Unknown,
    warnings: &mut Vec<String>,
    errors: &mut Vec<DirectoryError>,
) -> Objects {
    let mut objects = Objects::default();
    let mut sections: [Vec<&RawValue>; 5] = Default::default();
    for (key, raw) in root {
        let Some(at) = SECTIONS.iter().position(|s| *s == key) else {
            let expected = "expected users, sponsors, blueprints, agents, resources";
            match unknown {
                Unknown::Warn => warnings.push(format!("unknown section `{key}` is ignored: {expected}")),
                Unknown::Refuse => {
                    errors.push(object_error(&format!("`upsert.{key}`"), &format!("unknown section: {expected}")))
                }
            }
            continue;
        };
        match serde_json::from_str::<Option<Vec<&RawValue>>>(raw.get()) {
            Ok(items) => sections[at] = items.unwrap_or_default(),
            Err(_) => errors.push(object_error(&format!("`{key}`"), "expected an array")),
        }
    }
    let [users, sponsors, blueprints, agents, resources] = sections;
    macro_rules! read {
        ($section:ident, $read:ident) => {
            let (read, more_warnings, more_errors) = read_section(stringify!($section), &$section, unknown, $read);
            warnings.extend(more_warnings);
            errors.extend(more_errors);
            objects.$section = read;
        };
    }
    read!(users, read_user);
    read!(sponsors, read_sponsor);
    read!(blueprints, read_blueprint);
    read!(agents, read_agent);
    read!(resources, read_resource);
    objects
}

/// Sections longer than this are read on every core, in runs, joined in order.
const PARALLEL_OBJECTS: usize = 20_000;

/// The objects of one section, read by `read`, with the warnings and errors in the order a
/// single pass would give them.
fn read_section<T: Send + Sync>(
    name: &str,
    items: &[&RawValue],
    unknown: Unknown,
    read: fn(&mut Obj<'_>) -> Upsert<T>,
) -> (Vec<Upsert<T>>, Vec<String>, Vec<DirectoryError>) {
    let run = |from: usize, items: &[&RawValue]| {
        let (mut out, mut warnings, mut errors) = (Vec::with_capacity(items.len()), Vec::new(), Vec::new());
        for (i, raw) in items.iter().enumerate() {
            let i = from + i;
            match crate::input::parse_json(raw.get()) {
                Ok(v) => out.push(read(&mut Obj::new(&mut warnings, unknown, name, i, &v, &mut errors))),
                Err(e) => errors.push(DirectoryError::Syntax(format!("{name}[{i}]: {e}"))),
            }
        }
        (out, warnings, errors)
    };
    if items.len() < PARALLEL_OBJECTS {
        return run(0, items);
    }
    // Asked only for a large section: the answer reads the cgroup's files.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 {
        return run(0, items);
    }
    let size = items.len().div_ceil(threads);
    let runs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(size)
            .enumerate()
            .map(|(k, chunk)| (k, chunk, std::thread::Builder::new().spawn_scoped(scope, move || run(k * size, chunk))))
            .collect();
        // A run whose thread could not start or failed is read here, so nothing is lost.
        handles
            .into_iter()
            .map(|(k, chunk, h)| h.ok().and_then(|h| h.join().ok()).unwrap_or_else(|| run(k * size, chunk)))
            .collect()
    });
    let mut all = (Vec::with_capacity(items.len()), Vec::new(), Vec::new());
    for (out, warnings, errors) in runs {
        all.0.extend(out);
        all.1.extend(warnings);
        all.2.extend(errors);
    }
    all
}

fn read_user(o: &mut Obj<'_>) -> Upsert<User> {
    let record = User { id: o.id(), name: o.string("name", None), made: Made::new() };
    o.finish(record)
}

fn read_sponsor(o: &mut Obj<'_>) -> Upsert<Sponsor> {
    let record = Sponsor {
        id: o.id(),
        name: o.string("name", None),
        active: o.bool("active", true),
        department: o.string("department", Some("")),
        tags: o.tags(),
        made: Made::new(),
    };
    o.finish(record)
}

fn read_blueprint(o: &mut Obj<'_>) -> Upsert<Blueprint> {
    let record = Blueprint {
        id: o.id(),
        name: o.string("name", None),
        enabled: o.bool("enabled", true),
        publisher: o.string("publisher", Some("")),
        allowed_scopes: o.strings("allowed_scopes", false),
        allowed_resources: o.strings("allowed_resources", true),
        tags: o.tags(),
        made: Made::new(),
    };
    o.finish(record)
}

fn read_agent(o: &mut Obj<'_>) -> Upsert<Agent> {
    let risk = o.string("risk", Some("none"));
    let record = Agent {
        id: o.id(),
        name: o.string("name", None),
        blueprint: o.reference("blueprint"),
        sponsor: o.reference("sponsor"),
        owners: o.strings("owners", true),
        enabled: o.bool("enabled", true),
        risk: match risk.parse() {
            Ok(level) => level,
            Err(e) => {
                o.fail("risk", e.to_string());
                RiskLevel::None
            }
        },
        framework: o.string("framework", Some("")),
        channel: o.string("channel", Some("")),
        tags: o.tags(),
        serial: next_serial(),
    };
    o.finish(record)
}

fn read_resource(o: &mut Obj<'_>) -> Upsert<Resource> {
    let sensitivity = o.string("sensitivity", Some("medium"));
    if let Err(e) = Sensitivity::from_str(&sensitivity) {
        o.fail("sensitivity", e.to_string());
    }
    let record = Resource {
        id: o.id(),
        name: o.string("name", None),
        audiences: o.strings("audiences", true),
        sensitivity,
        tags: o.tags(),
        made: Made::new(),
    };
    o.finish(record)
}

fn syntax_error(e: &serde_json::Error) -> DirectoryError {
    let text = e.to_string();
    let message = text.rsplit_once(" at line ").map_or(text.as_str(), |(m, _)| m);
    DirectoryError::Syntax(format!("{}:{}: {message}", e.line(), e.column()))
}

fn unique_ids<'a>(
    kind: &str,
    ids: &mut dyn Iterator<Item = &'a SmolStr>,
    errors: &mut Vec<DirectoryError>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for id in ids {
        if !id.is_empty() && !seen.insert(id.as_str()) {
            errors.push(object_error(&format!("{kind} `{id}`"), "is defined more than once"));
        }
    }
    seen
}

/// One object of a section, read field by field so that every error names the object and field.
struct Obj<'a> {
    warnings: &'a mut Vec<String>,
    unknown: Unknown,
    label: String,
    map: Option<&'a serde_json::Map<String, Json>>,
    errors: &'a mut Vec<DirectoryError>,
}

impl<'a> Obj<'a> {
    fn new(
        warnings: &'a mut Vec<String>,
        unknown: Unknown,
        section: &str,
        index: usize,
        v: &'a Json,
        errors: &'a mut Vec<DirectoryError>,
    ) -> Self {
        let singular = section.trim_end_matches('s');
        let map = v.as_object();
        let label = match map.and_then(|m| m.get("id")).and_then(Json::as_str) {
            Some(id) if !id.is_empty() => format!("{singular} `{id}`"),
            _ => format!("{section}[{index}]"),
        };
        if map.is_none() {
            errors.push(DirectoryError::Object { object: label.clone(), message: "expected a JSON object".into() });
        }
        Obj { warnings, unknown, label, map, errors }
    }

    fn fail(&mut self, field: &str, message: String) {
        self.errors.push(DirectoryError::Field { object: self.label.clone(), field: field.into(), message });
    }

    fn get(&self, field: &str) -> Option<&'a Json> {
        self.map.and_then(|m| m.get(field)).filter(|v| !v.is_null())
    }

    fn id(&mut self) -> SmolStr {
        let id = self.string("id", Some(""));
        if id.is_empty() && self.map.is_some() {
            self.fail("id", "is required and must not be empty".into());
        } else if let Some(problem) = crate::input::id_problem(&id) {
            self.fail("id", problem);
        }
        id
    }

    /// The id of another object (empty if absent: required or not, the change decides).
    fn reference(&mut self, field: &str) -> SmolStr {
        let id = self.string(field, Some(""));
        if let Some(problem) = crate::input::id_problem(&id).filter(|_| !id.is_empty()) {
            self.fail(field, problem);
        }
        id
    }

    /// A string field; `default` None means it defaults to the object's id.
    fn string(&mut self, field: &str, default: Option<&str>) -> SmolStr {
        match self.get(field) {
            None => match default {
                Some(d) => SmolStr::new(d),
                None => SmolStr::new(self.get("id").and_then(Json::as_str).unwrap_or_default()),
            },
            Some(Json::String(s)) => SmolStr::new(s),
            Some(other) => {
                self.fail(field, format!("expected a string, found {}", kind(other)));
                SmolStr::default()
            }
        }
    }

    fn bool(&mut self, field: &str, default: bool) -> bool {
        match self.get(field) {
            None => default,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                self.fail(field, format!("expected true or false, found {}", kind(other)));
                default
            }
        }
    }

    /// A set of strings (sorted, each once: every such field is a set to Cedar); `ids`: each
    /// must be an id (another object's, or an audience a request may name).
    fn strings(&mut self, field: &str, ids: bool) -> Box<[SmolStr]> {
        match self.get(field) {
            None => Box::default(),
            Some(Json::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Json::String(s) => match crate::input::id_problem(s).filter(|_| ids) {
                            Some(problem) => self.fail(field, format!("`{}`: {problem}", crate::input::printable(s))),
                            None => out.push(SmolStr::new(s)),
                        },
                        other => self.fail(field, format!("expected an array of strings, found {}", kind(other))),
                    }
                }
                out.sort_unstable();
                out.dedup();
                out.into()
            }
            Some(other) => {
                self.fail(field, format!("expected an array of strings, found {}", kind(other)));
                Box::default()
            }
        }
    }

    fn tags(&mut self) -> Tags {
        match self.get("tags") {
            None => Tags::default(),
            Some(Json::Object(m)) => {
                let mut tags = Vec::with_capacity(m.len());
                for (k, v) in m {
                    match v {
                        Json::String(s) => tags.push((SmolStr::new(k), SmolStr::new(s))),
                        other => self.fail("tags", format!("tag `{k}`: expected a string, found {}", kind(other))),
                    }
                }
                tags.sort_unstable();
                Tags(tags.into())
            }
            Some(other) => {
                self.fail("tags", format!("expected an object of string tags, found {}", kind(other)));
                Tags::default()
            }
        }
    }

    /// The object's upsert: its record and the fields it gave. A field the directory does not
    /// know is a warning or an error (see [`Unknown`]): a misspelt optional field is otherwise
    /// unseen.
    fn finish<T: Record>(&mut self, record: T) -> Upsert<T> {
        let mut given = 1;
        if let Some(map) = self.map {
            for (key, value) in map {
                match T::FIELDS.iter().position(|f| f == key) {
                    Some(i) if !value.is_null() => given |= 1 << i,
                    Some(_) => {}
                    None => {
                        let expected = T::FIELDS.join(", ");
                        match self.unknown {
                            Unknown::Warn => self.warnings.push(format!(
                                "{}: unknown field `{key}` is ignored: expected one of {expected}",
                                self.label
                            )),
                            Unknown::Refuse => self.fail(key, format!("unknown field: expected one of {expected}")),
                        }
                    }
                }
            }
        }
        Upsert { record: Arc::new(record), given }
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        match Directory::from_json_str(src) {
            Ok(_) => Vec::new(),
            Err(errs) => errs.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn dangling_references_name_object_and_field() {
        let src = r#"{
          "users": [{"id": "u-bob"}],
          "sponsors": [{"id": "s-alice"}],
          "blueprints": [{"id": "bp-mail", "allowed_resources": ["graph", "nope"]}],
          "agents": [{"id": "ag-1", "blueprint": "bp-gone", "sponsor": "s-alice", "owners": ["u-bob", "u-eve"]}],
          "resources": [{"id": "graph", "sensitivity": "medium"}]
        }"#;
        assert_eq!(
            errors(src),
            vec![
                "blueprint `bp-mail`: field `allowed_resources`: unknown resource `nope`",
                "agent `ag-1`: field `blueprint`: unknown blueprint `bp-gone`",
                "agent `ag-1`: field `owners`: unknown user `u-eve`",
            ]
        );
    }

    #[test]
    fn bad_values_and_unknown_fields_are_named() {
        let src = r#"{"sponsors": [{"id": "s", "active": "yes"}],
          "blueprints": [{"id": "b"}],
          "agents": [{"id": "a", "blueprint": "b", "sponsor": "s", "risk": "severe", "sponser": "s"}],
          "resources": [{"id": "r", "sensitivity": "secret"}]}"#;
        assert_eq!(
            errors(src),
            vec![
                "sponsor `s`: field `active`: expected true or false, found a string",
                "agent `a`: field `risk`: unknown risk level `severe`: expected one of none, low, medium, high",
                "resource `r`: field `sensitivity`: unknown sensitivity `secret`: expected one of low, medium, high",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_warnings() {
        let dir = Directory::from_json_str(
            r#"{"sponsors": [{"id": "s"}], "blueprints": [{"id": "b"}],
                "agents": [{"id": "a", "blueprint": "b", "sponsor": "s", "sponser": "x"}], "groups": []}"#,
        )
        .unwrap();
        assert_eq!(
            dir.warnings(),
            [
                "unknown section `groups` is ignored: expected users, sponsors, blueprints, agents, resources",
                "agent `a`: unknown field `sponser` is ignored: expected one of id, name, blueprint, sponsor, owners, enabled, risk, framework, channel, tags",
            ]
        );
    }

    #[test]
    fn duplicates_and_ambiguous_audiences_are_errors() {
        let src = r#"{"resources": [{"id": "r1", "audiences": ["api://x"]}, {"id": "r2", "audiences": ["api://x"]},
                                   {"id": "r1"}]}"#;
        assert_eq!(
            errors(src),
            vec![
                "resource `r1`: is defined more than once",
                "resource `r2`: field `audiences`: audience `api://x` also names resource `r1`",
            ]
        );
    }

    #[test]
    fn a_large_section_read_on_every_core_keeps_its_order() {
        let agent = |i: usize| {
            let risk = if i == 3 || i == 24_000 { "severe" } else { "none" };
            format!(r#"{{"id": "a{i}", "blueprint": "b", "sponsor": "s", "risk": "{risk}", "x{i}": 1}}"#)
        };
        let agents: Vec<String> = (0..25_000).map(agent).collect();
        let src = format!(
            r#"{{"sponsors": [{{"id": "s"}}], "blueprints": [{{"id": "b"}}], "agents": [{}]}}"#,
            agents.join(",")
        );
        let errs = errors(&src);
        assert_eq!(
            errs,
            [
                "agent `a3`: field `risk`: unknown risk level `severe`: expected one of none, low, medium, high",
                "agent `a24000`: field `risk`: unknown risk level `severe`: expected one of none, low, medium, high",
            ]
        );
        let fine = src.replace("severe", "high");
        let dir = Directory::from_json_str(&fine).unwrap();
        assert_eq!(dir.counts()[3], 25_000);
        // Warnings in file order too.
        assert!(dir.warnings()[0].starts_with("agent `a0`: unknown field `x0`"));
        assert!(dir.warnings()[24_999].starts_with("agent `a24999`: unknown field `x24999`"));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        assert_eq!(errors("{\n  \"agents\": [,]\n}"), vec!["2:14: expected value"]);
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let dir = Directory::from_json_str(
            r#"{"sponsors": [{"id": "s"}], "blueprints": [{"id": "b"}], "agents": [{"id": "a", "blueprint": "b", "sponsor": "s"}]}"#,
        )
        .unwrap();
        let a = dir.agent("a").unwrap();
        assert_eq!((a.name.as_str(), a.enabled, a.risk), ("a", true, RiskLevel::None));
        assert!(dir.sponsor("s").unwrap().active);
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;

    const BASE: &str = r#"{
      "users": [{"id": "u-bob"}, {"id": "u-eve"}],
      "sponsors": [{"id": "s-alice"}, {"id": "s-carol"}],
      "blueprints": [{"id": "bp-mail", "allowed_resources": ["graph"]}, {"id": "bp-idle"}],
      "agents": [{"id": "ag-1", "blueprint": "bp-mail", "sponsor": "s-alice", "owners": ["u-bob"]}],
      "resources": [{"id": "graph", "audiences": ["https://graph.example.com"]}, {"id": "hr"}]
    }"#;

    fn base() -> Directory {
        Directory::from_json_str(BASE).unwrap()
    }

    fn apply(d: &Directory, change: &str) -> Result<Directory, Vec<String>> {
        let change =
            Change::from_json_str(change).map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        d.apply(&change).map_err(|e| e.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn an_upsert_adds_or_replaces_and_leaves_the_old_directory_as_it_was() {
        let old = base();
        let new = apply(
            &old,
            r#"{"upsert": {"agents": [{"id": "ag-2", "blueprint": "bp-idle", "sponsor": "s-carol", "tags": {"env": "prod"}},
                                      {"id": "ag-1", "owners": [], "enabled": false}]}}"#,
        )
        .unwrap();
        assert!(old.agent("ag-2").is_none());
        assert!(old.agent("ag-1").unwrap().enabled);
        assert_eq!(new.agent("ag-2").unwrap().tags.get("env"), Some("prod"));
        assert!(!new.agent("ag-1").unwrap().enabled);
        assert_ne!(new.agent("ag-1").unwrap().serial(), old.agent("ag-1").unwrap().serial());
        // Only agents changed: what the rest of the directory is known by stays.
        assert_eq!(new.others_serial(), old.others_serial());
        // ag-1 no longer has owners, so u-bob can go.
        let newer = apply(&new, r#"{"remove": {"users": ["u-bob"]}}"#).unwrap();
        assert!(newer.user("u-bob").is_none());
        assert_ne!(newer.others_serial(), new.others_serial());
    }

    #[test]
    fn a_change_with_a_dangling_reference_is_refused_whole() {
        let d = base();
        let errors = apply(
            &d,
            r#"{"upsert": {"agents": [{"id": "ag-2", "blueprint": "bp-mail", "sponsor": "s-alice"},
                                      {"id": "ag-3", "blueprint": "bp-mail", "sponsor": "s-gone", "owners": ["u-nobody"]}],
                           "blueprints": [{"id": "bp-new", "allowed_resources": ["nowhere"]}]}}"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "blueprint `bp-new`: field `allowed_resources`: unknown resource `nowhere`",
                "agent `ag-3`: field `sponsor`: unknown sponsor `s-gone`",
                "agent `ag-3`: field `owners`: unknown user `u-nobody`",
            ]
        );
        assert!(d.agent("ag-2").is_none());
    }

    #[test]
    fn what_is_in_use_cannot_be_removed() {
        let d = base();
        let errors = apply(
            &d,
            r#"{"remove": {"blueprints": ["bp-mail"], "sponsors": ["s-alice"], "users": ["u-bob"], "resources": ["graph"], "agents": ["ag-9"]}}"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "agent `ag-9`: is not in the directory",
                "blueprint `bp-mail`: cannot be removed: 1 agents are made from it",
                "sponsor `s-alice`: cannot be removed: 1 agents have it as their sponsor",
                "user `u-bob`: cannot be removed: 1 agents have it among their owners",
            ]
        );
        // The agent removed with its blueprint in one change: both go.
        let after = apply(&d, r#"{"remove": {"agents": ["ag-1"], "blueprints": ["bp-mail"]}}"#).unwrap();
        assert!(after.agent("ag-1").is_none() && after.blueprint("bp-mail").is_none());
        // graph is still allowed by nothing now: it can go, and its audience with it.
        let after = apply(&after, r#"{"remove": {"resources": ["graph"]}}"#).unwrap();
        assert!(after.resource("https://graph.example.com").is_none());
        assert!(d.resource("https://graph.example.com").is_some());
    }

    #[test]
    fn names_stay_unambiguous_and_ids_unique_within_a_change() {
        let d = base();
        let errors = apply(
            &d,
            r#"{"upsert": {"resources": [{"id": "mail", "audiences": ["https://graph.example.com"]}],
                           "agents": [{"id": "ag-1", "blueprint": "bp-mail", "sponsor": "s-alice"},
                                      {"id": "ag-1", "blueprint": "bp-mail", "sponsor": "s-alice"}]},
                "remove": {"resources": ["hr", "hr"], "agents": ["ag-1"]}}"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "agent `ag-1`: is defined more than once",
                "agent `ag-1`: is both upserted and removed",
                "resource `hr`: is removed more than once",
                "resource `mail`: field `audiences`: audience `https://graph.example.com` also names resource `graph`",
            ]
        );
        // A resource removed in the same change frees its names: as one change, what two did.
        let d2 = apply(&d, r#"{"upsert": {"blueprints": [{"id": "bp-mail", "allowed_resources": ["hr"]}]}}"#).unwrap();
        let both = r#"{"upsert": {"resources": [{"id": "graph2", "audiences": ["https://graph.example.com"]}]},
                       "remove": {"resources": ["graph"]}}"#;
        let moved = apply(&d2, both).unwrap();
        assert_eq!(moved.resource("https://graph.example.com").map(|r| r.id.as_str()), Some("graph2"));
        assert!(moved.resource("graph").is_none());
        // A resource may take over an audience its old version had.
        let moved = apply(&d, r#"{"upsert": {"resources": [{"id": "graph", "audiences": ["api://graph"]}]}}"#).unwrap();
        assert!(moved.resource("https://graph.example.com").is_none());
        assert_eq!(moved.resource("api://graph").map(|r| r.id.as_str()), Some("graph"));
        assert_eq!(moved.resource_by_audience("api://graph").map(|r| r.id.as_str()), Some("graph"));
        assert!(moved.resource_by_audience("graph").is_none());
    }

    #[test]
    fn bad_change_documents_name_what_is_wrong() {
        let errors =
            |src: &str| Change::from_json_str(src).unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(errors("{}"), ["the change is empty: give `upsert`, `remove` or both"]);
        assert_eq!(errors(r#"{"delete": {}}"#), ["`delete`: unknown key: a change has `upsert` and `remove` only"]);
        assert_eq!(errors(r#"{"remove": {"agents": "ag-1"}}"#), ["`remove.agents`: expected an array of ids"]);
        assert_eq!(
            errors(r#"{"remove": {"groups": ["g"]}}"#),
            ["`remove.groups`: unknown section: expected users, sponsors, blueprints, agents, resources"]
        );
        assert_eq!(
            errors(r#"{"upsert": {"agents": [{"id": "a", "risk": "severe"}]}}"#),
            ["agent `a`: field `risk`: unknown risk level `severe`: expected one of none, low, medium, high",]
        );
        assert_eq!(
            errors(r#"{"upsert": {"agents": [{"id": "a", "id": "b"}]}}"#),
            ["agents[0]: duplicate key `id` at line 1 column 22"]
        );
        assert_eq!(
            errors("[1]"),
            ["expected a JSON object: {\"upsert\": {<directory sections>}, \"remove\": {\"agents\": [ids], …}}"]
        );
    }

    #[test]
    fn an_upsert_of_an_existing_object_changes_only_the_fields_it_gives() {
        let d = Directory::from_json_str(
            r#"{"users": [{"id": "u-bob"}], "sponsors": [{"id": "s"}], "blueprints": [{"id": "b"}],
                "agents": [{"id": "ag-1", "name": "One", "blueprint": "b", "sponsor": "s", "owners": ["u-bob"],
                            "enabled": false, "risk": "high", "framework": "langchain", "tags": {"env": "dev"}}]}"#,
        )
        .unwrap();
        // Re-tagged: still disabled, still at high risk, still named, still owned.
        let d2 = apply(&d, r#"{"upsert": {"agents": [{"id": "ag-1", "tags": {"env": "prod"}}]}}"#).unwrap();
        let a = d2.agent("ag-1").unwrap();
        assert_eq!(
            (a.name.as_str(), a.enabled, a.risk, a.framework.as_str()),
            ("One", false, RiskLevel::High, "langchain")
        );
        assert_eq!((a.tags.get("env"), &*a.owners), (Some("prod"), &[SmolStr::new("u-bob")][..]));
        // A new agent needs its blueprint and sponsor; null is as good as absent.
        let errors = apply(&d, r#"{"upsert": {"agents": [{"id": "ag-2", "blueprint": null}]}}"#).unwrap_err();
        assert_eq!(
            errors,
            [
                "agent `ag-2`: field `blueprint`: is required: every agent has exactly one blueprint",
                "agent `ag-2`: field `sponsor`: is required: every agent has exactly one sponsor",
            ]
        );

        // Kept live and laid over a new base that disables nothing and renames the agent: the
        // patch keeps patching the tags only.
        let change =
            Change::from_json_str(r#"{"upsert": {"agents": [{"id": "ag-1", "tags": {"env": "prod"}}]}}"#).unwrap();
        let mut overlay = Overlay::default();
        overlay.record(&change);
        let newer = Directory::from_json_str(
            r#"{"users": [{"id": "u-bob"}], "sponsors": [{"id": "s"}], "blueprints": [{"id": "b"}],
                "agents": [{"id": "ag-1", "name": "Renamed", "blueprint": "b", "sponsor": "s", "tags": {"env": "dev"}}]}"#,
        )
        .unwrap();
        let served = newer.apply(&overlay.as_change(&newer)).unwrap();
        let a = served.agent("ag-1").unwrap();
        assert_eq!((a.name.as_str(), a.enabled, a.tags.get("env")), ("Renamed", true, Some("prod")));
        // The journal's form of the patch reads back as the same patch.
        let again = Change::from_json_str(&overlay.as_change(&newer).to_json().unwrap()).unwrap();
        assert_eq!(again.to_json().unwrap(), r#"{"upsert":{"agents":[{"id":"ag-1","tags":{"env":"prod"}}]}}"#);
    }

    #[test]
    fn ids_are_ids_sets_are_sets_and_a_change_names_what_it_does_not_know() {
        let errors =
            |src: &str| Change::from_json_str(src).unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            errors(r#"{"upsert": {"agents": [{"id": "ag 1", "blueprint": "b", "sponsor": "s\u001b"}]}}"#),
            [
                "agent `ag 1`: field `id`: is not an id: 1 to 512 bytes, no whitespace, control or invisible characters",
                "agent `ag 1`: field `sponsor`: is not an id: 1 to 512 bytes, no whitespace, control or invisible characters",
            ]
        );
        assert_eq!(
            errors(r#"{"remove": {"agents": ["ok", "x\ny"]}}"#),
            [
                "`remove.agents`: `x\\u{a}y`: is not an id: 1 to 512 bytes, no whitespace, control or invisible characters"
            ]
        );
        assert_eq!(
            errors(r#"{"upsert": {"agents": [{"id": "a", "enabeld": false}], "blueprintz": []}}"#),
            [
                "`upsert.blueprintz`: unknown section: expected users, sponsors, blueprints, agents, resources",
                "agent `a`: field `enabeld`: unknown field: expected one of id, name, blueprint, sponsor, owners, enabled, risk, framework, channel, tags",
            ]
        );
        // Owners are a set: their order is not a difference, so a live change folds.
        let d = base();
        let mut overlay = Overlay::default();
        let change =
            Change::from_json_str(r#"{"upsert": {"agents": [{"id": "ag-1", "owners": ["u-eve", "u-bob", "u-eve"]}]}}"#)
                .unwrap();
        let live = d.apply(&change).unwrap();
        overlay.record(&change);
        assert_eq!(&*live.agent("ag-1").unwrap().owners, &[SmolStr::new("u-bob"), SmolStr::new("u-eve")][..]);
        let reordered = BASE.replace(r#""owners": ["u-bob"]"#, r#""owners": ["u-eve", "u-bob"]"#);
        assert_eq!(overlay.fold(&Directory::from_json_str(&reordered).unwrap()), 1);
        // Many errors are listed fifty at a time.
        let many: Vec<String> = (0..120).map(|i| format!("\"ag-x{i}\"")).collect();
        let refused =
            d.apply(&Change::from_json_str(&format!(r#"{{"remove": {{"agents": [{}]}}}}"#, many.join(","))).unwrap());
        let text = listed(&refused.unwrap_err(), "\n");
        assert_eq!(text.lines().count(), 51);
        assert!(text.ends_with("… and 70 more"), "{text}");
        // Long values are cut: the list fits an answer's header whatever the input.
        let long = "a".repeat(20_000);
        let errors =
            Change::from_json_str(&format!(r#"{{"upsert": {{"agents": [{{"id": "{long}", "{long}": 1}}]}}}}"#))
                .unwrap_err();
        let text = listed(&errors, "\n");
        assert!(text.len() < 1_000 && text.lines().count() == 2, "{}", text.len());
    }

    #[test]
    fn a_change_reads_back_from_its_journal_form() {
        let src = r#"{"upsert": {"agents": [{"id": "ag-2", "blueprint": "bp-idle", "sponsor": "s-carol", "owners": ["u-eve"],
                                            "tags": {"b": "2", "a": "1"}, "risk": "high"}]},
                      "remove": {"agents": ["ag-1"]}}"#;
        let change = Change::from_json_str(src).unwrap();
        let again = Change::from_json_str(&change.to_json().unwrap()).unwrap();
        assert_eq!(again.to_json().unwrap(), change.to_json().unwrap());
        assert_eq!(*again.upsert.agents[0].record, *change.upsert.agents[0].record);
        assert_eq!(again.upsert.agents[0].given, change.upsert.agents[0].given);
        assert_eq!(again.summary(), "upsert 1 agents, remove 1 agents");
    }

    #[test]
    fn the_overlay_keeps_live_changes_over_a_new_base_until_the_base_says_the_same() {
        let d = base();
        let mut overlay = Overlay::default();
        for c in [
            r#"{"upsert": {"agents": [{"id": "ag-2", "blueprint": "bp-idle", "sponsor": "s-carol"}]}}"#,
            r#"{"upsert": {"agents": [{"id": "ag-3", "blueprint": "bp-idle", "sponsor": "s-carol"}]}}"#,
            r#"{"remove": {"agents": ["ag-3", "ag-1"]}}"#,
        ] {
            let change = Change::from_json_str(c).unwrap();
            d.apply(&overlay.as_change(&d)).unwrap().apply(&change).unwrap();
            overlay.record(&change);
        }
        let live = d.apply(&overlay.as_change(&d)).unwrap();
        assert!(live.agent("ag-1").is_none() && live.agent("ag-3").is_none() && live.agent("ag-2").is_some());
        // Exported and made the bundle's directory: the overlay has nothing left to say.
        let exported = Directory::from_json_str(&live.to_json().unwrap()).unwrap();
        assert_eq!(exported.to_json().unwrap(), live.to_json().unwrap());
        // ag-3, made and removed live, is kept removed until a fold sees the base lacks it.
        assert_eq!(overlay.len(), 3);
        assert_eq!(overlay.clone().fold(&d), 1);
        assert_eq!(overlay.fold(&exported), 3);
        assert!(overlay.is_empty());
    }
}

#[cfg(test)]
pub(crate) mod entity_tests {
    use std::collections::HashSet;

    use cedar_policy::{Entities, Entity, RestrictedExpression};
    use serde_json::Value;

    use super::*;
    use crate::cedar::{action_entities, entities_of};

    fn sample() -> (String, Schema) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let schema_src = std::fs::read_to_string(root.join("schema.cedarschema")).unwrap();
        (
            std::fs::read_to_string(root.join("directory.json")).unwrap(),
            Schema::from_cedarschema_str(&schema_src).unwrap().0,
        )
    }

    /// The entities the slow, public way, from the file's JSON and nothing of ours:
    /// expressions evaluated, every entity checked against the schema, the transitive closure
    /// computed.
    pub(crate) fn reference(json: &str, schema: &Schema) -> Entities {
        let doc: Value = serde_json::from_str(json).unwrap();
        let items = |section: &str| doc[section].as_array().cloned().unwrap_or_default();
        let text = |v: &Value, field: &str, default: &str| v[field].as_str().unwrap_or(default).to_string();
        let s = |v: String| RestrictedExpression::new_string(v);
        let uid = |ty: &str, id: &str| {
            cedar_policy::EntityUid::from_type_name_and_id(ty.parse().unwrap(), id.parse().unwrap())
        };
        let list = |v: &Value, field: &str| -> Vec<String> {
            v[field].as_array().map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect()).unwrap_or_default()
        };
        let refs = |ty: &str, ids: Vec<String>| {
            RestrictedExpression::new_set(ids.iter().map(|id| RestrictedExpression::new_entity_uid(uid(ty, id))))
        };
        let tags = |v: &Value| -> Vec<(String, RestrictedExpression)> {
            v["tags"]
                .as_object()
                .map(|m| m.iter().map(|(k, t)| (k.clone(), s(t.as_str().unwrap().into()))).collect())
                .unwrap_or_default()
        };
        let mut all = Vec::new();
        for u in items("users") {
            let id = text(&u, "id", "");
            all.push(
                Entity::new(uid("User", &id), [("name".into(), s(text(&u, "name", &id)))].into(), HashSet::new())
                    .unwrap(),
            );
        }
        for sp in items("sponsors") {
            let id = text(&sp, "id", "");
            let attrs = [
                ("name".to_string(), s(text(&sp, "name", &id))),
                ("active".into(), RestrictedExpression::new_bool(sp["active"].as_bool().unwrap_or(true))),
                ("department".into(), s(text(&sp, "department", ""))),
            ];
            all.push(Entity::new_with_tags(uid("Sponsor", &id), attrs, [], tags(&sp)).unwrap());
        }
        for b in items("blueprints") {
            let id = text(&b, "id", "");
            let attrs = [
                ("name".to_string(), s(text(&b, "name", &id))),
                ("enabled".into(), RestrictedExpression::new_bool(b["enabled"].as_bool().unwrap_or(true))),
                ("publisher".into(), s(text(&b, "publisher", ""))),
                ("allowed_scopes".into(), RestrictedExpression::new_set(list(&b, "allowed_scopes").into_iter().map(s))),
                ("allowed_resources".into(), refs("Resource", list(&b, "allowed_resources"))),
            ];
            all.push(Entity::new_with_tags(uid("Blueprint", &id), attrs, [], tags(&b)).unwrap());
        }
        for a in items("agents") {
            let id = text(&a, "id", "");
            let (bp, sp) = (uid("Blueprint", &text(&a, "blueprint", "")), uid("Sponsor", &text(&a, "sponsor", "")));
            let attrs = [
                ("name".to_string(), s(text(&a, "name", &id))),
                ("blueprint".into(), RestrictedExpression::new_entity_uid(bp.clone())),
                ("sponsor".into(), RestrictedExpression::new_entity_uid(sp.clone())),
                ("owners".into(), refs("User", list(&a, "owners"))),
                ("enabled".into(), RestrictedExpression::new_bool(a["enabled"].as_bool().unwrap_or(true))),
                ("risk".into(), s(text(&a, "risk", "none"))),
                ("framework".into(), s(text(&a, "framework", ""))),
                ("channel".into(), s(text(&a, "channel", ""))),
            ];
            all.push(Entity::new_with_tags(uid("Agent", &id), attrs, [bp, sp], tags(&a)).unwrap());
        }
        for r in items("resources") {
            let id = text(&r, "id", "");
            let attrs = [
                ("name".to_string(), s(text(&r, "name", &id))),
                ("audiences".into(), RestrictedExpression::new_set(list(&r, "audiences").into_iter().map(s))),
                ("sensitivity".into(), s(text(&r, "sensitivity", "medium"))),
            ];
            all.push(Entity::new_with_tags(uid("Resource", &id), attrs, [], tags(&r)).unwrap());
        }
        Entities::from_entities(all, Some(schema)).unwrap()
    }

    #[test]
    fn every_entity_built_equals_plain_cedars_from_the_file() {
        let (json, schema) = sample();
        let dir = Directory::from_json_str(&json).unwrap();
        let types = EntityTypes::get();
        dir.check_schema(&schema, types).unwrap();
        let reference = reference(&json, &schema);
        let mut built: Vec<CedarEntity> = reference.iter().filter_map(|e| dir.entity(types, &e.uid())).collect();
        assert_eq!(built.len(), dir.counts().iter().sum::<usize>());
        built.extend(action_entities(&schema).unwrap());
        let built = entities_of(&built).unwrap();
        assert!(built.deep_eq(&reference));
        let agent = EntityTypes::uid(&types.agent, "ag-mail-01");
        assert!(built.is_ancestor_of(&EntityTypes::uid(&types.blueprint, "bp-mail"), &agent));
        assert!(built.is_ancestor_of(&EntityTypes::uid(&types.sponsor, "s-alice"), &agent));
    }

    #[test]
    fn a_schema_the_directory_does_not_fit_is_an_error() {
        let (json, _) = sample();
        let dir = Directory::from_json_str(&json).unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let src = std::fs::read_to_string(root.join("schema.cedarschema")).unwrap();
        let changed = src
            .replace("  channel: String,\n} tags String;", "  channel: String,\n  cost_center: Long,\n} tags String;");
        assert_ne!(src, changed);
        let schema = Schema::from_cedarschema_str(&changed).unwrap().0;
        let err = dir.check_schema(&schema, EntityTypes::get()).unwrap_err().0;
        assert!(err.contains("cost_center"), "{err}");
    }
}
