//! The directory: agents, blueprints, sponsors, users and resources from `directory.json`,
//! checked for dangling references, and the Cedar entities they become.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use cedar_policy::{Entities, EntityId, EntityTypeName, EntityUid, Schema};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::cedar::{Attr, CedarError, EntitiesBuilder};
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

pub type Tags = BTreeMap<String, String>;

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sponsor {
    pub id: String,
    pub name: String,
    pub active: bool,
    pub department: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, Serialize)]
pub struct Blueprint {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    pub publisher: String,
    pub allowed_scopes: Vec<String>,
    pub allowed_resources: Vec<String>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub blueprint: String,
    pub sponsor: String,
    pub owners: Vec<String>,
    pub enabled: bool,
    pub risk: RiskLevel,
    pub framework: String,
    pub channel: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    pub id: String,
    pub name: String,
    pub audiences: Vec<String>,
    pub sensitivity: String,
    pub tags: Tags,
}

/// The whole directory, every reference checked.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    users: Vec<User>,
    sponsors: Vec<Sponsor>,
    blueprints: Vec<Blueprint>,
    agents: Vec<Agent>,
    resources: Vec<Resource>,
    /// Fields and sections the directory does not know, ignored (a misspelt optional field).
    warnings: Vec<String>,
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

    pub fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }
}

impl Default for EntityTypes {
    fn default() -> Self {
        Self::new()
    }
}

impl Directory {
    /// Parses `directory.json` and checks every reference.
    pub fn from_json_str(src: &str) -> Result<Directory, Vec<DirectoryError>> {
        let root: Json = crate::input::parse_json(src).map_err(|e| vec![syntax_error(&e)])?;
        let Json::Object(mut root) = root else {
            return Err(vec![DirectoryError::Syntax(
                "expected a JSON object with users, sponsors, blueprints, agents, resources".into(),
            )]);
        };
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        for key in root.keys() {
            if !["users", "sponsors", "blueprints", "agents", "resources"].contains(&key.as_str()) {
                warnings.push(format!(
                    "unknown section `{key}` is ignored: expected users, sponsors, blueprints, agents, resources"
                ));
            }
        }
        let mut dir = Directory::default();
        let mut section = |name: &str| -> Vec<Json> {
            match root.remove(name) {
                None | Some(Json::Null) => Vec::new(),
                Some(Json::Array(items)) => items,
                Some(_) => {
                    errors.push(DirectoryError::Object {
                        object: format!("`{name}`"),
                        message: "expected an array".into(),
                    });
                    Vec::new()
                }
            }
        };
        let (users, sponsors, blueprints, agents, resources) =
            (section("users"), section("sponsors"), section("blueprints"), section("agents"), section("resources"));

        for (i, v) in users.iter().enumerate() {
            let mut o = Obj::new(&mut warnings, "users", i, v, &mut errors);
            let user = User { id: o.id(), name: o.string("name", None) };
            o.finish(&["id", "name"]);
            dir.users.push(user);
        }
        for (i, v) in sponsors.iter().enumerate() {
            let mut o = Obj::new(&mut warnings, "sponsors", i, v, &mut errors);
            let sponsor = Sponsor {
                id: o.id(),
                name: o.string("name", None),
                active: o.bool("active", true),
                department: o.string("department", Some("")),
                tags: o.tags(),
            };
            o.finish(&["id", "name", "active", "department", "tags"]);
            dir.sponsors.push(sponsor);
        }
        for (i, v) in blueprints.iter().enumerate() {
            let mut o = Obj::new(&mut warnings, "blueprints", i, v, &mut errors);
            let blueprint = Blueprint {
                id: o.id(),
                name: o.string("name", None),
                enabled: o.bool("enabled", true),
                publisher: o.string("publisher", Some("")),
                allowed_scopes: o.strings("allowed_scopes"),
                allowed_resources: o.strings("allowed_resources"),
                tags: o.tags(),
            };
            o.finish(&["id", "name", "enabled", "publisher", "allowed_scopes", "allowed_resources", "tags"]);
            dir.blueprints.push(blueprint);
        }
        for (i, v) in agents.iter().enumerate() {
            let mut o = Obj::new(&mut warnings, "agents", i, v, &mut errors);
            let risk = o.string("risk", Some("none"));
            let agent = Agent {
                id: o.id(),
                name: o.string("name", None),
                blueprint: o.string("blueprint", Some("")),
                sponsor: o.string("sponsor", Some("")),
                owners: o.strings("owners"),
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
            };
            if agent.blueprint.is_empty() {
                o.fail("blueprint", "is required: every agent has exactly one blueprint".into());
            }
            if agent.sponsor.is_empty() {
                o.fail("sponsor", "is required: every agent has exactly one sponsor".into());
            }
            o.finish(&[
                "id",
                "name",
                "blueprint",
                "sponsor",
                "owners",
                "enabled",
                "risk",
                "framework",
                "channel",
                "tags",
            ]);
            dir.agents.push(agent);
        }
        for (i, v) in resources.iter().enumerate() {
            let mut o = Obj::new(&mut warnings, "resources", i, v, &mut errors);
            let sensitivity = o.string("sensitivity", Some("medium"));
            if let Err(e) = Sensitivity::from_str(&sensitivity) {
                o.fail("sensitivity", e.to_string());
            }
            let resource = Resource {
                id: o.id(),
                name: o.string("name", None),
                audiences: o.strings("audiences"),
                sensitivity,
                tags: o.tags(),
            };
            o.finish(&["id", "name", "audiences", "sensitivity", "tags"]);
            dir.resources.push(resource);
        }

        dir.check_references(&mut errors);
        dir.warnings = warnings;
        if errors.is_empty() { Ok(dir) } else { Err(errors) }
    }

    pub fn users(&self) -> &[User] {
        &self.users
    }

    pub fn sponsors(&self) -> &[Sponsor] {
        &self.sponsors
    }

    pub fn blueprints(&self) -> &[Blueprint] {
        &self.blueprints
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// Fields and sections the directory does not know, ignored (a misspelt optional field).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn check_references(&self, errors: &mut Vec<DirectoryError>) {
        let users = unique_ids("user", self.users.iter().map(|u| u.id.as_str()), errors);
        let sponsors = unique_ids("sponsor", self.sponsors.iter().map(|s| s.id.as_str()), errors);
        let blueprints = unique_ids("blueprint", self.blueprints.iter().map(|b| b.id.as_str()), errors);
        unique_ids("agent", self.agents.iter().map(|a| a.id.as_str()), errors);
        let resources = unique_ids("resource", self.resources.iter().map(|r| r.id.as_str()), errors);

        let dangling = |errors: &mut Vec<DirectoryError>, object: String, field: &str, kind: &str, id: &str| {
            errors.push(DirectoryError::Field {
                object,
                field: field.into(),
                message: format!("unknown {kind} `{id}`"),
            })
        };
        for b in &self.blueprints {
            for r in &b.allowed_resources {
                if !resources.contains(r.as_str()) {
                    dangling(errors, format!("blueprint `{}`", b.id), "allowed_resources", "resource", r);
                }
            }
        }
        for a in &self.agents {
            let object = format!("agent `{}`", a.id);
            if !a.blueprint.is_empty() && !blueprints.contains(a.blueprint.as_str()) {
                dangling(errors, object.clone(), "blueprint", "blueprint", &a.blueprint);
            }
            if !a.sponsor.is_empty() && !sponsors.contains(a.sponsor.as_str()) {
                dangling(errors, object.clone(), "sponsor", "sponsor", &a.sponsor);
            }
            for o in &a.owners {
                if !users.contains(o.as_str()) {
                    dangling(errors, object.clone(), "owners", "user", o);
                }
            }
        }
        // A resource is named by its id or any of its audiences: each name must be unambiguous.
        let mut names: HashMap<&str, &str> = self.resources.iter().map(|r| (r.id.as_str(), r.id.as_str())).collect();
        for r in &self.resources {
            for aud in &r.audiences {
                if let Some(other) = names.insert(aud.as_str(), r.id.as_str())
                    && other != r.id
                {
                    errors.push(DirectoryError::Field {
                        object: format!("resource `{}`", r.id),
                        field: "audiences".into(),
                        message: format!("audience `{aud}` also names resource `{other}`"),
                    });
                }
            }
        }
    }

    /// The Cedar entities of the directory. One entity of each type is checked against the
    /// schema: every entity of a type is built by the same code, so one stands for all.
    ///
    /// The values are built directly (no expression to evaluate per attribute), and the
    /// transitive closure is not computed: an agent's only ancestors are its blueprint and
    /// sponsor, which have none, so its parents are the closure.
    pub fn to_entities(&self, schema: &Schema, types: &EntityTypes) -> Result<Entities, CedarError> {
        let mut entities = EntitiesBuilder::with_capacity(
            self.users.len() + self.sponsors.len() + self.blueprints.len() + self.agents.len() + self.resources.len(),
        );
        let uid = EntityTypes::uid;
        let s = Attr::string;
        let strings = |vs: &[String]| Attr::strings(vs.iter().map(String::as_str));
        let uids = |ty: &EntityTypeName, ids: &[String]| Attr::entities(ids.iter().map(|id| uid(ty, id)));
        let none = Vec::<EntityUid>::new;
        for (i, u) in self.users.iter().enumerate() {
            entities.add(uid(&types.user, &u.id), [("name", s(&u.name))], none(), [], i == 0);
        }
        for (i, sp) in self.sponsors.iter().enumerate() {
            let attrs = [("name", s(&sp.name)), ("active", Attr::bool(sp.active)), ("department", s(&sp.department))];
            entities.add(uid(&types.sponsor, &sp.id), attrs, none(), tags(&sp.tags), i == 0);
        }
        for (i, bp) in self.blueprints.iter().enumerate() {
            let attrs = [
                ("name", s(&bp.name)),
                ("enabled", Attr::bool(bp.enabled)),
                ("publisher", s(&bp.publisher)),
                ("allowed_scopes", strings(&bp.allowed_scopes)),
                ("allowed_resources", uids(&types.resource, &bp.allowed_resources)),
            ];
            entities.add(uid(&types.blueprint, &bp.id), attrs, none(), tags(&bp.tags), i == 0);
        }
        for (i, a) in self.agents.iter().enumerate() {
            let (blueprint, sponsor) = (uid(&types.blueprint, &a.blueprint), uid(&types.sponsor, &a.sponsor));
            let attrs = [
                ("name", s(&a.name)),
                ("blueprint", Attr::entity(blueprint.clone())),
                ("sponsor", Attr::entity(sponsor.clone())),
                ("owners", uids(&types.user, &a.owners)),
                ("enabled", Attr::bool(a.enabled)),
                ("risk", s(a.risk.as_str())),
                ("framework", s(&a.framework)),
                ("channel", s(&a.channel)),
            ];
            // INVARIANT: an agent's only ancestors are its blueprint and sponsor, which have
            // none: its parents are the transitive closure `build` takes them for.
            entities.add(uid(&types.agent, &a.id), attrs, [blueprint, sponsor], tags(&a.tags), i == 0);
        }
        for (i, r) in self.resources.iter().enumerate() {
            let attrs =
                [("name", s(&r.name)), ("audiences", strings(&r.audiences)), ("sensitivity", s(&r.sensitivity))];
            entities.add(uid(&types.resource, &r.id), attrs, none(), tags(&r.tags), i == 0);
        }
        entities.build(schema)
    }
}

fn tags(t: &Tags) -> impl Iterator<Item = (&str, Attr)> {
    t.iter().map(|(k, v)| (k.as_str(), Attr::string(v)))
}

fn syntax_error(e: &serde_json::Error) -> DirectoryError {
    let text = e.to_string();
    let message = text.rsplit_once(" at line ").map_or(text.as_str(), |(m, _)| m);
    DirectoryError::Syntax(format!("{}:{}: {message}", e.line(), e.column()))
}

fn unique_ids<'a>(
    kind: &str,
    ids: impl Iterator<Item = &'a str>,
    errors: &mut Vec<DirectoryError>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for id in ids {
        if !id.is_empty() && !seen.insert(id) {
            errors.push(DirectoryError::Object {
                object: format!("{kind} `{id}`"),
                message: "is defined more than once".into(),
            });
        }
    }
    seen
}

/// One object of a section, read field by field so that every error names the object and field.
struct Obj<'a> {
    warnings: &'a mut Vec<String>,
    label: String,
    map: Option<&'a serde_json::Map<String, Json>>,
    errors: &'a mut Vec<DirectoryError>,
}

impl<'a> Obj<'a> {
    fn new(
        warnings: &'a mut Vec<String>,
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
        Obj { warnings, label, map, errors }
    }

    fn fail(&mut self, field: &str, message: String) {
        self.errors.push(DirectoryError::Field { object: self.label.clone(), field: field.into(), message });
    }

    fn get(&self, field: &str) -> Option<&'a Json> {
        self.map.and_then(|m| m.get(field)).filter(|v| !v.is_null())
    }

    fn id(&mut self) -> String {
        let id = self.string("id", Some(""));
        if id.is_empty() && self.map.is_some() {
            self.fail("id", "is required and must not be empty".into());
        }
        id
    }

    /// A string field; `default` None means it defaults to the object's id.
    fn string(&mut self, field: &str, default: Option<&str>) -> String {
        match self.get(field) {
            None => match default {
                Some(d) => d.to_string(),
                None => self.get("id").and_then(Json::as_str).unwrap_or_default().to_string(),
            },
            Some(Json::String(s)) => s.clone(),
            Some(other) => {
                self.fail(field, format!("expected a string, found {}", kind(other)));
                String::new()
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

    fn strings(&mut self, field: &str) -> Vec<String> {
        match self.get(field) {
            None => Vec::new(),
            Some(Json::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Json::String(s) => out.push(s.clone()),
                        other => self.fail(field, format!("expected an array of strings, found {}", kind(other))),
                    }
                }
                out
            }
            Some(other) => {
                self.fail(field, format!("expected an array of strings, found {}", kind(other)));
                Vec::new()
            }
        }
    }

    fn tags(&mut self) -> Tags {
        match self.get("tags") {
            None => Tags::new(),
            Some(Json::Object(m)) => {
                let mut tags = Tags::new();
                for (k, v) in m {
                    match v {
                        Json::String(s) => {
                            tags.insert(k.clone(), s.clone());
                        }
                        other => self.fail("tags", format!("tag `{k}`: expected a string, found {}", kind(other))),
                    }
                }
                tags
            }
            Some(other) => {
                self.fail("tags", format!("expected an object of string tags, found {}", kind(other)));
                Tags::new()
            }
        }
    }

    /// Warns of fields the directory does not know: a misspelt optional field is otherwise unseen.
    fn finish(self, known: &[&str]) {
        let Some(map) = self.map else { return };
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            self.warnings.push(format!(
                "{}: unknown field `{key}` is ignored: expected one of {}",
                self.label,
                known.join(", ")
            ));
        }
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
            dir.warnings,
            vec![
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
    fn syntax_errors_carry_line_and_column() {
        assert_eq!(errors("{\n  \"agents\": [,]\n}"), vec!["2:14: expected value"]);
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let dir = Directory::from_json_str(
            r#"{"sponsors": [{"id": "s"}], "blueprints": [{"id": "b"}], "agents": [{"id": "a", "blueprint": "b", "sponsor": "s"}]}"#,
        )
        .unwrap();
        let a = &dir.agents[0];
        assert_eq!((a.name.as_str(), a.enabled, a.risk), ("a", true, RiskLevel::None));
        assert!(dir.sponsors[0].active);
    }
}

#[cfg(test)]
mod entity_tests {
    use std::str::FromStr;

    use cedar_policy::{Entity, RestrictedExpression};

    use super::*;

    fn sample() -> (Directory, Schema) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let dir = Directory::from_json_str(&std::fs::read_to_string(root.join("directory.json")).unwrap()).unwrap();
        let schema_src = std::fs::read_to_string(root.join("schema.cedarschema")).unwrap();
        (dir, Schema::from_cedarschema_str(&schema_src).unwrap().0)
    }

    /// The entities the slow, public way: expressions evaluated, every entity checked
    /// against the schema, the transitive closure computed.
    fn reference(d: &Directory, schema: &Schema, t: &EntityTypes) -> Entities {
        let s = |v: &str| RestrictedExpression::new_string(v.to_string());
        let strings = |vs: &[String]| RestrictedExpression::new_set(vs.iter().map(|v| s(v)));
        let uids = |ty: &EntityTypeName, ids: &[String]| {
            RestrictedExpression::new_set(
                ids.iter().map(|id| RestrictedExpression::new_entity_uid(EntityTypes::uid(ty, id))),
            )
        };
        let tags = |m: &Tags| m.iter().map(|(k, v)| (k.clone(), s(v))).collect::<Vec<_>>();
        let mut all = Vec::new();
        for u in &d.users {
            all.push(
                Entity::new(EntityTypes::uid(&t.user, &u.id), [("name".into(), s(&u.name))].into(), HashSet::new())
                    .unwrap(),
            );
        }
        for sp in &d.sponsors {
            let attrs = [
                ("name".to_string(), s(&sp.name)),
                ("active".into(), RestrictedExpression::new_bool(sp.active)),
                ("department".into(), s(&sp.department)),
            ];
            all.push(Entity::new_with_tags(EntityTypes::uid(&t.sponsor, &sp.id), attrs, [], tags(&sp.tags)).unwrap());
        }
        for b in &d.blueprints {
            let attrs = [
                ("name".to_string(), s(&b.name)),
                ("enabled".into(), RestrictedExpression::new_bool(b.enabled)),
                ("publisher".into(), s(&b.publisher)),
                ("allowed_scopes".into(), strings(&b.allowed_scopes)),
                ("allowed_resources".into(), uids(&t.resource, &b.allowed_resources)),
            ];
            all.push(Entity::new_with_tags(EntityTypes::uid(&t.blueprint, &b.id), attrs, [], tags(&b.tags)).unwrap());
        }
        for a in &d.agents {
            let (bp, sp) = (EntityTypes::uid(&t.blueprint, &a.blueprint), EntityTypes::uid(&t.sponsor, &a.sponsor));
            let attrs = [
                ("name".to_string(), s(&a.name)),
                ("blueprint".into(), RestrictedExpression::new_entity_uid(bp.clone())),
                ("sponsor".into(), RestrictedExpression::new_entity_uid(sp.clone())),
                ("owners".into(), uids(&t.user, &a.owners)),
                ("enabled".into(), RestrictedExpression::new_bool(a.enabled)),
                ("risk".into(), s(a.risk.as_str())),
                ("framework".into(), s(&a.framework)),
                ("channel".into(), s(&a.channel)),
            ];
            all.push(Entity::new_with_tags(EntityTypes::uid(&t.agent, &a.id), attrs, [bp, sp], tags(&a.tags)).unwrap());
        }
        for r in &d.resources {
            let attrs = [
                ("name".to_string(), s(&r.name)),
                ("audiences".into(), strings(&r.audiences)),
                ("sensitivity".into(), s(&r.sensitivity)),
            ];
            all.push(Entity::new_with_tags(EntityTypes::uid(&t.resource, &r.id), attrs, [], tags(&r.tags)).unwrap());
        }
        Entities::from_entities(all, Some(schema)).unwrap()
    }

    #[test]
    fn the_direct_build_equals_the_checked_build() {
        let (dir, schema) = sample();
        let types = EntityTypes::new();
        let fast = dir.to_entities(&schema, &types).unwrap();
        assert!(fast.deep_eq(&reference(&dir, &schema, &types)));
        let agent = EntityTypes::uid(&types.agent, "ag-mail-01");
        assert!(fast.is_ancestor_of(&EntityTypes::uid(&types.blueprint, "bp-mail"), &agent));
        assert!(fast.is_ancestor_of(&EntityTypes::uid(&types.sponsor, "s-alice"), &agent));
        assert!(fast.get(&EntityUid::from_str(r#"Action::"call_api""#).unwrap()).is_some());
    }

    #[test]
    fn a_schema_the_directory_does_not_fit_is_an_error() {
        let (dir, _) = sample();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let src = std::fs::read_to_string(root.join("schema.cedarschema")).unwrap();
        let changed = src
            .replace("  channel: String,\n} tags String;", "  channel: String,\n  cost_center: Long,\n} tags String;");
        assert_ne!(src, changed);
        let schema = Schema::from_cedarschema_str(&changed).unwrap().0;
        let err = dir.to_entities(&schema, &EntityTypes::new()).unwrap_err().0;
        assert!(err.contains("cost_center"), "{err}");
    }
}
