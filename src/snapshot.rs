//! A snapshot: everything one revision of the bundle needs to decide (policies, index,
//! entities, lookups, locations), built aside, never changed, and asked rather than reached
//! into; and the store that holds the current one behind `arc-swap`, so a reload swaps it
//! whole without blocking a request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Instant;

use arc_swap::ArcSwap;
use cedar_policy::{Authorizer, Entities, EntityUid, PolicySet, Request as CedarRequest, Response};
use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::bundle::{Bundle, BundleError, BundleErrors, BundlePolicy, DIRECTORY_FILE, PolicyState};
use crate::cedar::{CedarError, ContextBuilder};
use crate::directory::{Agent, Blueprint, EntityTypes, Resource, RiskLevel, Sponsor};
use crate::index::{Evaluated, Index, Keys};
use crate::request::{Action, Ask, Request};

/// An agent's entity id and the positions of its blueprint and sponsor.
#[derive(Debug)]
struct AgentEntry {
    uid: EntityUid,
    blueprint: usize,
    sponsor: usize,
}

/// An agent of the snapshot with its blueprint and sponsor (it has exactly one of each).
#[derive(Debug, Clone, Copy)]
pub struct AgentRef<'a> {
    /// The agent's position in the directory.
    at: usize,
    agent: &'a Agent,
    blueprint: &'a Blueprint,
    sponsor: &'a Sponsor,
    uid: &'a EntityUid,
}

impl<'a> AgentRef<'a> {
    /// The agent's Cedar entity id.
    pub fn uid(&self) -> &'a EntityUid {
        self.uid
    }

    pub fn id(&self) -> &'a str {
        &self.agent.id
    }

    /// Enabled in the directory (a live signal may say otherwise).
    pub fn enabled(&self) -> bool {
        self.agent.enabled
    }

    /// The risk level in the directory (a live signal may say otherwise).
    pub fn risk(&self) -> RiskLevel {
        self.agent.risk
    }

    pub fn blueprint_id(&self) -> &'a str {
        &self.blueprint.id
    }

    /// The agent's blueprint is enabled in the directory.
    pub fn blueprint_enabled(&self) -> bool {
        self.blueprint.enabled
    }

    pub fn sponsor_id(&self) -> &'a str {
        &self.sponsor.id
    }

    /// The agent's sponsor is active in the directory.
    pub fn sponsor_active(&self) -> bool {
        self.sponsor.active
    }
}

/// A resource of the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct ResourceRef<'a> {
    /// The resource's position in the directory.
    at: usize,
    resource: &'a Resource,
    uid: &'a EntityUid,
}

impl<'a> ResourceRef<'a> {
    pub fn id(&self) -> &'a str {
        &self.resource.id
    }

    /// The audiences a token for this resource may name.
    pub fn audiences(&self) -> &'a [String] {
        &self.resource.audiences
    }

    /// The resource's Cedar entity id.
    pub fn uid(&self) -> &'a EntityUid {
        self.uid
    }
}

/// How much a snapshot holds (Status, `validate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub policies: usize,
    pub on: usize,
    pub report_only: usize,
    pub off: usize,
    pub agents: usize,
    pub blueprints: usize,
    pub sponsors: usize,
    pub users: usize,
    pub resources: usize,
    pub locations: usize,
}

/// One revision of the bundle, ready to decide.
pub struct Snapshot {
    bundle: Bundle,
    /// Unique among the snapshots of this process: what per-thread caches of values derived
    /// from a snapshot are keyed by (an address could be reused by a later snapshot).
    generation: u64,
    revision: Arc<str>,
    loaded_at: DateTime<Utc>,
    /// How long loading, validating and indexing took.
    load_ms: u64,
    entities: Entities,
    index: Index,
    types: EntityTypes,
    authorizer: Authorizer,
    /// An agent's position in the directory, which is also its entry's.
    agents: HashMap<String, usize>,
    agent_entries: Vec<AgentEntry>,
    blueprints: HashMap<String, usize>,
    sponsors: HashMap<String, usize>,
    /// A resource by one of its audiences only.
    audiences: HashMap<String, usize>,
    /// A resource by its id or any of its audiences.
    resources: HashMap<String, usize>,
    resource_uids: Vec<EntityUid>,
    actions: [EntityUid; 2],
    /// Set when a reload replaces this snapshot: where its bulk goes to be freed.
    reaper: OnceLock<Reaper>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("revision", &self.revision).field("loaded_at", &self.loaded_at).finish()
    }
}

impl Snapshot {
    /// Loads, validates and indexes the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Snapshot, BundleErrors> {
        let started = Instant::now();
        let bundle = Bundle::load(dir)?;
        let mut snapshot = Snapshot::from_bundle(bundle)?;
        snapshot.load_ms = started.elapsed().as_millis() as u64;
        Ok(snapshot)
    }

    pub fn from_bundle(bundle: Bundle) -> Result<Snapshot, BundleErrors> {
        let types = EntityTypes::new();
        let directory_file = bundle.dir().join(DIRECTORY_FILE).display().to_string();
        let fail = |message: String| BundleError { file: directory_file.clone(), line: None, column: None, message };
        let dir = bundle.directory();
        let entities = dir.to_entities(bundle.schema(), &types).map_err(|e| fail(e.0))?;
        let index = Index::build(bundle.policies(), &types, &entities);

        let position = |ids: &mut dyn Iterator<Item = &String>| -> HashMap<String, usize> {
            ids.enumerate().map(|(i, id)| (id.clone(), i)).collect()
        };
        let blueprints = position(&mut dir.blueprints().iter().map(|b| &b.id));
        let sponsors = position(&mut dir.sponsors().iter().map(|s| &s.id));
        let mut agents = HashMap::with_capacity(dir.agents().len());
        let mut agent_entries = Vec::with_capacity(dir.agents().len());
        for (index, a) in dir.agents().iter().enumerate() {
            // INVARIANT: Directory::from_json_str rejected every dangling blueprint or sponsor.
            let (Some(&blueprint), Some(&sponsor)) = (blueprints.get(&a.blueprint), sponsors.get(&a.sponsor)) else {
                return Err(fail(format!("agent `{}`: dangling blueprint or sponsor", a.id)).into());
            };
            agents.insert(a.id.clone(), index);
            agent_entries.push(AgentEntry { uid: EntityTypes::uid(&types.agent, &a.id), blueprint, sponsor });
        }
        let mut resources = HashMap::new();
        let mut audiences = HashMap::new();
        for (i, r) in dir.resources().iter().enumerate() {
            resources.insert(r.id.clone(), i);
            for aud in &r.audiences {
                resources.entry(aud.clone()).or_insert(i);
                audiences.entry(aud.clone()).or_insert(i);
            }
        }
        let resource_uids = dir.resources().iter().map(|r| EntityTypes::uid(&types.resource, &r.id)).collect();
        let actions = Action::ALL.map(|a| EntityTypes::uid(&types.action, a.as_str()));
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Snapshot {
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            revision: Arc::from(bundle.revision()),
            bundle,
            loaded_at: Utc::now(),
            load_ms: 0,
            entities,
            index,
            types,
            authorizer: Authorizer::new(),
            agents,
            agent_entries,
            blueprints,
            sponsors,
            resources,
            audiences,
            resource_uids,
            actions,
            reaper: OnceLock::new(),
        })
    }

    /// The content hash of the bundle (`sha256:…`).
    pub fn revision(&self) -> &Arc<str> {
        &self.revision
    }

    pub fn loaded_at(&self) -> DateTime<Utc> {
        self.loaded_at
    }

    /// How long loading, validating and indexing took, in ms (0 if built from a bundle).
    pub fn load_ms(&self) -> u64 {
        self.load_ms
    }

    /// The policies of the bundle (off ones too), in file order, then order within the file.
    pub fn policies(&self) -> &[BundlePolicy] {
        self.bundle.policies()
    }

    /// What the bundle's files left out or ignored, each naming its file.
    pub fn warnings(&self) -> &[String] {
        self.bundle.warnings()
    }

    /// Policies that can never apply to an agent: their scope names no agent, blueprint,
    /// sponsor or resource.
    pub fn unreachable(&self) -> &[Arc<str>] {
        self.index.unreachable()
    }

    pub fn counts(&self) -> Counts {
        let policies = self.bundle.policies();
        let count = |state| policies.iter().filter(|p| p.state == state).count();
        let dir = self.bundle.directory();
        Counts {
            policies: policies.len(),
            on: count(PolicyState::On),
            report_only: count(PolicyState::ReportOnly),
            off: count(PolicyState::Off),
            agents: dir.agents().len(),
            blueprints: dir.blueprints().len(),
            sponsors: dir.sponsors().len(),
            users: dir.users().len(),
            resources: dir.resources().len(),
            locations: self.bundle.locations().len(),
        }
    }

    /// An agent by its id, with its blueprint and sponsor.
    pub fn agent(&self, id: &str) -> Option<AgentRef<'_>> {
        self.agents.get(id).map(|&i| self.agent_at(i, &self.agent_entries[i]))
    }

    /// Every agent, in directory order.
    pub fn agents(&self) -> impl Iterator<Item = AgentRef<'_>> {
        self.agent_entries.iter().enumerate().map(|(i, e)| self.agent_at(i, e))
    }

    /// INVARIANT: `e` is the entry of the agent at position `i` of the directory.
    fn agent_at<'a>(&'a self, i: usize, e: &'a AgentEntry) -> AgentRef<'a> {
        let dir = self.bundle.directory();
        AgentRef {
            at: i,
            agent: &dir.agents()[i],
            blueprint: &dir.blueprints()[e.blueprint],
            sponsor: &dir.sponsors()[e.sponsor],
            uid: &e.uid,
        }
    }

    pub fn blueprint(&self, id: &str) -> Option<&Blueprint> {
        self.blueprints.get(id).map(|&i| &self.bundle.directory().blueprints()[i])
    }

    pub fn sponsor(&self, id: &str) -> Option<&Sponsor> {
        self.sponsors.get(id).map(|&i| &self.bundle.directory().sponsors()[i])
    }

    /// A resource by its id or one of its audiences.
    pub fn resource(&self, id_or_audience: &str) -> Option<ResourceRef<'_>> {
        self.resources.get(id_or_audience).map(|&i| ResourceRef {
            at: i,
            resource: &self.bundle.directory().resources()[i],
            uid: &self.resource_uids[i],
        })
    }

    /// The resource that has `audience` among its audiences (an id does not count).
    pub fn resource_by_audience(&self, audience: &str) -> Option<&Resource> {
        self.audiences.get(audience).map(|&i| &self.bundle.directory().resources()[i])
    }

    /// The names of the named locations that contain `ip`, in file order.
    pub fn locations_containing(&self, ip: IpAddr) -> impl Iterator<Item = &Arc<str>> {
        self.bundle.locations().containing(ip)
    }

    /// The Cedar entity id of an action.
    pub fn action_uid(&self, action: Action) -> &EntityUid {
        &self.actions[action.index()]
    }

    /// The request as Cedar takes it: cached entity ids, the context of DESIGN §3 built as
    /// values, no schema check (our types already guarantee the shape; a unit test checks it
    /// against the schema).
    pub fn cedar_request(
        &self,
        req: &Request,
        agent: AgentRef<'_>,
        resource: ResourceRef<'_>,
        agent_risk: RiskLevel,
    ) -> Result<CedarRequest, CedarError> {
        let context = self.context(req, agent_risk)?;
        CedarRequest::new(agent.uid.clone(), self.action_uid(req.action()).clone(), resource.uid.clone(), context, None)
            .map_err(|e| CedarError(e.to_string()))
    }

    fn context(&self, req: &Request, agent_risk: RiskLevel) -> Result<cedar_policy::Context, CedarError> {
        let mut c = ContextBuilder::new();
        c.locations("locations", (self.generation, req.client_ip), || {
            req.client_ip.into_iter().flat_map(|ip| self.locations_containing(ip)).map(|l| &**l)
        });
        c.string("flow", req.flow.as_str());
        if let Some(client_ip) = req.client_ip {
            c.ip("client_ip", client_ip)?;
        }
        c.datetime("time", req.time)?;
        c.long("hour", i64::from(req.time.hour()));
        c.string("weekday", WEEKDAYS[req.time.weekday().num_days_from_monday() as usize]);
        c.string("agent_risk", agent_risk.as_str());
        c.string("signin_risk", req.signin_risk.as_str());
        match &req.ask {
            Ask::Token { scopes, grant_type, user } => {
                c.scopes("scopes", scopes);
                c.string("grant_type", grant_type);
                if let Some(user) = user {
                    c.entity("user", &EntityTypes::uid(&self.types.user, user));
                }
            }
            Ask::Call { method, path } => {
                c.string("method", method);
                c.string("path", path);
            }
        }
        Ok(c.build())
    }

    /// Evaluates the policies that can apply to a request of `agent` for `resource`: the
    /// request's slices of the index, with one evaluator.
    pub fn evaluate_slices<'a>(
        &'a self,
        agent: AgentRef<'a>,
        resource: ResourceRef<'a>,
        action: Action,
        request: &CedarRequest,
    ) -> Evaluated<'a> {
        self.index.evaluate(&keys(agent, resource, action), request, &self.entities)
    }

    /// How many policies `evaluate_slices` evaluates for such a request.
    pub fn slice_len(&self, agent: AgentRef<'_>, resource: ResourceRef<'_>, action: Action) -> usize {
        self.index.slice_len(&keys(agent, resource, action))
    }

    /// Plain Cedar: `policies` against this snapshot's entities.
    pub fn is_authorized(&self, request: &CedarRequest, policies: &PolicySet) -> Response {
        self.authorizer.is_authorized(request, policies, &self.entities)
    }

    /// Cedar's `uid in target`: `uid` is `target` or one of its descendants.
    pub fn is_in(&self, uid: &EntityUid, target: &EntityUid) -> bool {
        uid == target || self.entities.is_ancestor_of(target, uid)
    }
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The index keys of a request by `agent` for `resource` (its id, never an audience).
fn keys<'a>(agent: AgentRef<'a>, resource: ResourceRef<'a>, action: Action) -> Keys<'a> {
    Keys {
        agent_at: agent.at,
        resource_at: resource.at,
        agent: &agent.agent.id,
        blueprint: &agent.blueprint.id,
        sponsor: &agent.sponsor.id,
        action,
        resource: &resource.resource.id,
    }
}

/// Where the bulk of replaced snapshots goes to be freed: a thread of its own, so that
/// neither a request nor a reload pays for freeing a large snapshot.
type Reaper = mpsc::Sender<Box<dyn Send>>;

fn start_reaper() -> Option<Reaper> {
    let (tx, rx) = mpsc::channel::<Box<dyn Send>>();
    // It ends once the store and every snapshot it replaced are gone.
    let spawned =
        std::thread::Builder::new().name("agentca-reaper".into()).spawn(move || rx.into_iter().for_each(drop));
    spawned.ok().map(|_| tx)
}

impl Drop for Snapshot {
    /// A replaced snapshot is dropped by whoever held it last, often a request finishing: it
    /// hands its bulk to the reaper rather than freeing it there.
    fn drop(&mut self) {
        let Some(reaper) = self.reaper.take() else { return };
        let bulk: Box<dyn Send> = Box::new((
            std::mem::take(&mut self.entities),
            std::mem::take(&mut self.index),
            std::mem::take(&mut self.agents),
            std::mem::take(&mut self.resources),
            std::mem::take(&mut self.audiences),
            self.bundle.take_bulk(),
        ));
        // The reaper is gone only if its thread died: then it is freed here after all.
        let _ = reaper.send(bulk);
    }
}

/// Why the last reload failed, and since when the served snapshot is stale.
#[derive(Debug, Clone)]
pub struct ReloadFailure {
    pub at: DateTime<Utc>,
    pub error: String,
    /// When the first of the failures in a row happened (the served snapshot is stale since).
    pub stale_since: DateTime<Utc>,
}

/// The result of one reload.
#[derive(Debug, Clone)]
pub enum Reloaded {
    /// A new revision is served.
    Swapped { from: Arc<str>, to: Arc<str> },
    /// The bundle did not change: same revision, nothing swapped.
    Unchanged(Arc<str>),
    /// The bundle failed to load; the old snapshot is still served.
    Failed { kept: Arc<str>, error: BundleErrors },
}

/// The current snapshot. Readers take one `Arc` per request; reloads build aside and swap.
pub struct Store {
    dir: PathBuf,
    current: ArcSwap<Snapshot>,
    last_failure: Mutex<Option<ReloadFailure>>,
    /// Serialises reloads, so two triggers at once build one snapshot after the other.
    reloading: Mutex<()>,
    /// Started with the first reload that replaces a snapshot.
    reaper: OnceLock<Option<Reaper>>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, BundleErrors> {
        let snapshot = Snapshot::load(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(snapshot),
            last_failure: Mutex::new(None),
            reloading: Mutex::new(()),
            reaper: OnceLock::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshot to decide with. Take it once per request and keep the `Arc`.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn last_failure(&self) -> Option<ReloadFailure> {
        self.last_failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    /// Builds a new snapshot from the folder and swaps it in; on failure keeps the old one.
    pub fn reload(&self) -> Reloaded {
        let _one_at_a_time = self.reloading.lock();
        let served = self.current().revision().clone();
        let result = match Snapshot::load(&self.dir) {
            Ok(new) if new.revision == served => Reloaded::Unchanged(served),
            Ok(new) => {
                let to = new.revision.clone();
                let old = self.current.swap(Arc::new(new));
                // INVARIANT: `old` is held here until it is marked, so whoever drops it last
                // (a request still using it, or this reload) finds the mark.
                if let Some(reaper) = self.reaper.get_or_init(start_reaper) {
                    let _ = old.reaper.set(reaper.clone());
                }
                Reloaded::Swapped { from: served, to }
            }
            Err(error) => Reloaded::Failed { kept: served, error },
        };
        if let Ok(mut failure) = self.last_failure.lock() {
            *failure = match &result {
                Reloaded::Failed { error, .. } => {
                    let now = Utc::now();
                    let stale_since = failure.as_ref().map_or(now, |f| f.stale_since);
                    Some(ReloadFailure { at: now, error: error.to_string(), stale_since })
                }
                _ => None,
            };
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::request::RawRequest;

    fn sample() -> Snapshot {
        Snapshot::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies").as_path()).unwrap()
    }

    fn request(json: &str) -> Request {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        RawRequest::from_json(&v).unwrap().validate(Utc::now()).unwrap()
    }

    #[test]
    fn the_context_conforms_to_the_schema() {
        let snap = sample();
        let cases = [
            r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "2001:db8::1"}"#,
            r#"{"agent": "ag-support-eu", "resource": "tickets", "flow": "on_behalf_of", "user": "u-gina", "signin_risk": "medium"}"#,
            r#"{"agent": "ag-support-01", "resource": "tickets", "action": "call_api", "method": "GET", "path": "/x", "client_ip": "10.0.0.1"}"#,
            r#"{"agent": "ag-support-01", "resource": "tickets", "action": "call_api", "method": "GET", "path": "/x"}"#,
        ];
        for json in cases {
            let req = request(json);
            let agent = snap.agent(&req.agent).unwrap();
            let resource = snap.resource(&req.resource).unwrap();
            let ctx = snap.context(&req, RiskLevel::Low).unwrap();
            let checked = CedarRequest::new(
                agent.uid().clone(),
                snap.action_uid(req.action()).clone(),
                resource.uid().clone(),
                ctx,
                Some(snap.bundle.schema()),
            );
            assert!(checked.is_ok(), "{json}: {:?}", checked.err());
        }
    }

    #[test]
    fn agents_come_with_their_blueprint_and_sponsor() {
        let snap = sample();
        let a = snap.agent("ag-mail-01").unwrap();
        assert_eq!(
            (a.agent.id.as_str(), a.blueprint.id.as_str(), a.sponsor.id.as_str()),
            ("ag-mail-01", "bp-mail", "s-alice")
        );
        assert_eq!(a.uid().to_string(), r#"Agent::"ag-mail-01""#);
        assert!(snap.agent("bp-mail").is_none());
        assert_eq!(snap.agents().count(), snap.counts().agents);
        assert!(snap.agents().all(|a| a.agent.blueprint == a.blueprint.id && a.agent.sponsor == a.sponsor.id));
        assert_eq!(snap.blueprint("bp-mail").map(|b| b.id.as_str()), Some("bp-mail"));
        assert_eq!(snap.sponsor("s-alice").map(|s| s.id.as_str()), Some("s-alice"));
        assert!(snap.is_in(a.uid(), &EntityTypes::uid(&EntityTypes::new().blueprint, "bp-mail")));
        assert!(snap.is_in(a.uid(), a.uid()));
        assert!(!snap.is_in(a.uid(), &EntityTypes::uid(&EntityTypes::new().blueprint, "bp-other")));
    }

    #[test]
    fn resources_answer_to_their_id_and_audiences() {
        let snap = sample();
        let graph = snap.resource("graph").unwrap();
        assert_eq!(graph.uid().to_string(), r#"Resource::"graph""#);
        let audience = graph.audiences().first().unwrap().clone();
        assert_eq!(snap.resource(&audience).map(|r| r.id()), Some("graph"));
        assert_eq!(snap.resource_by_audience(&audience).map(|r| r.id.as_str()), Some("graph"));
        assert!(snap.resource_by_audience("graph").is_none());
        assert!(snap.resource("nowhere").is_none());
    }

    #[test]
    fn a_replaced_snapshot_still_in_use_holds_no_reload_up_and_answers_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        for entry in std::fs::read_dir(&sample).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        let held = store.current();
        let edited = dir.path().join("baseline.cedar");
        let text = std::fs::read_to_string(&edited).unwrap();
        std::fs::write(&edited, format!("{text}\n// a new revision\n")).unwrap();

        // A request still holds the old snapshot: the reload swaps and returns all the same
        // (it used to wait up to 5 s for the request to let go).
        let started = Instant::now();
        assert!(matches!(store.reload(), Reloaded::Swapped { .. }));
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        assert_ne!(store.current().revision, held.revision);
        // Whole until the request drops it; then its bulk goes to the reaper.
        assert!(held.agent("ag-mail-01").is_some());
        assert!(held.reaper.get().is_some());
        assert!(store.current().reaper.get().is_none());
        drop(held);
    }
}
