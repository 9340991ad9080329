//! A snapshot: everything one revision of the bundle needs to decide (policies, index,
//! entities, lookups, locations), built aside, never changed, and asked rather than reached
//! into; and the store that holds the current one behind `arc-swap`, so a reload swaps it
//! whole without blocking a request.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Instant;

use arc_swap::ArcSwap;
use cedar_policy::{Authorizer, Entities, EntityUid, PolicySet, Request as CedarRequest, Response};
use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::bundle::{Bundle, BundleError, BundleErrors, BundlePolicy, DIRECTORY_FILE, PolicyState};
use crate::cedar::{CedarEntity, CedarError, ContextBuilder, action_entities, check_entities, entities_of, entity_uid};
use crate::directory::{
    Agent, Blueprint, Change, Directory, DirectoryError, EntityTypes, Overlay, Resource, RiskLevel, Sponsor,
};
use crate::index::{Evaluated, Index, Keys};
use crate::request::{Action, Ask, Request};

/// An agent of the snapshot with its blueprint and sponsor (it has exactly one of each).
#[derive(Debug, Clone, Copy)]
pub struct AgentRef<'a> {
    agent: &'a Agent,
    blueprint: &'a Blueprint,
    sponsor: &'a Sponsor,
}

impl<'a> AgentRef<'a> {
    /// The agent's Cedar entity id.
    pub fn uid(&self) -> EntityUid {
        entity_uid(&EntityTypes::get().agent, &self.agent.id)
    }

    pub fn id(&self) -> &'a str {
        &self.agent.id
    }

    /// The agent's record in the directory.
    pub fn record(&self) -> &'a Agent {
        self.agent
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
    resource: &'a Resource,
}

impl<'a> ResourceRef<'a> {
    pub fn id(&self) -> &'a str {
        &self.resource.id
    }

    /// The audiences a token for this resource may name.
    pub fn audiences(&self) -> &'a [smol_str::SmolStr] {
        &self.resource.audiences
    }

    /// The resource's Cedar entity id.
    pub fn uid(&self) -> EntityUid {
        entity_uid(&EntityTypes::get().resource, &self.resource.id)
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

/// One revision of the bundle, ready to decide: policies, index, schema, locations. Shared by
/// every snapshot that serves it, whatever its directory.
struct Core {
    bundle: Bundle,
    /// Unique among the cores of this process: what per-thread caches of values derived from
    /// the policies and locations are keyed by (an address could be reused by a later one).
    generation: u64,
    revision: Arc<str>,
    loaded_at: DateTime<Utc>,
    /// How long loading, validating and indexing took.
    load_ms: u64,
    index: Index,
    authorizer: Authorizer,
    actions: [EntityUid; 2],
    /// The schema's actions, put in every request's entities.
    action_entities: Vec<CedarEntity>,
    /// Entities the policies name literally in their conditions, put in every request's
    /// entities when the directory has them.
    literals: Box<[EntityUid]>,
    /// Some of them are agents: then what a request's policies read can change with another
    /// agent's record, which no key of the memo or of the per-thread entities follows, so
    /// neither is used.
    names_agents: bool,
}

/// What one request is decided with: a revision of the policies and the directory as it was
/// when the request began (the bundle's, with the live changes over it).
pub struct Snapshot {
    core: Arc<Core>,
    directory: Directory,
    /// The number of live directory changes applied since the process started (0: none).
    live_seq: u64,
    /// How many objects the live changes set or remove over the bundle's directory.
    live_objects: usize,
    /// Set when this snapshot is replaced: where its bulk goes to be freed.
    reaper: OnceLock<Reaper>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("revision", &self.core.revision)
            .field("loaded_at", &self.core.loaded_at)
            .field("live_seq", &self.live_seq)
            .finish()
    }
}

impl Snapshot {
    /// Loads, validates and indexes the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Snapshot, BundleErrors> {
        let started = Instant::now();
        let bundle = Bundle::load(dir)?;
        let mut snapshot = Snapshot::from_bundle(bundle)?;
        if let Some(core) = Arc::get_mut(&mut snapshot.core) {
            core.load_ms = started.elapsed().as_millis() as u64;
        }
        Ok(snapshot)
    }

    pub fn from_bundle(bundle: Bundle) -> Result<Snapshot, BundleErrors> {
        Snapshot::with_live(bundle, &Overlay::default(), 0)
    }

    /// The bundle with the live changes of `overlay` laid over its directory.
    fn with_live(bundle: Bundle, overlay: &Overlay, live_seq: u64) -> Result<Snapshot, BundleErrors> {
        let types = EntityTypes::get();
        let directory_file = bundle.dir().join(DIRECTORY_FILE).display().to_string();
        let fail = |message: String| BundleError { file: directory_file.clone(), line: None, column: None, message };
        let base = bundle.directory();
        base.check_schema(bundle.schema(), types).map_err(|e| fail(e.0))?;
        let directory = if overlay.is_empty() {
            base.clone()
        } else {
            let change = overlay.as_change(base);
            let conflict = |what: String| {
                fail(format!(
                    "the live directory changes (the journal `directory.jsonl` under --state) {what}; fix the \
                     bundle, fold the changes into it (`agentca admin export-directory`), or move the journal \
                     aside to serve the bundle alone"
                ))
            };
            let directory = base.apply(&change).map_err(|errors| {
                conflict(format!("no longer apply over it: {}", crate::directory::listed(&errors, "; ")))
            })?;
            check_entities(&directory.entities_of_change(&change, types), bundle.schema())
                .map_err(|e| conflict(format!("do not fit the schema: {e}")))?;
            directory
        };
        let action_entities = action_entities(bundle.schema()).map_err(|e| fail(e.0))?;
        let actions_only = entities_of(&action_entities).map_err(|e| fail(e.0))?;
        let index = Index::build(bundle.policies(), types, &actions_only);
        let literals: Box<[EntityUid]> = index.literals().into();
        let names_agents = literals.iter().any(|uid| *uid.type_name() == types.agent);
        let actions = Action::ALL.map(|a| EntityTypes::uid(&types.action, a.as_str()));
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let core = Core {
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            revision: Arc::from(bundle.revision()),
            bundle,
            loaded_at: Utc::now(),
            load_ms: 0,
            index,
            authorizer: Authorizer::new(),
            actions,
            action_entities,
            literals,
            names_agents,
        };
        Ok(Snapshot { core: Arc::new(core), directory, live_seq, live_objects: overlay.len(), reaper: OnceLock::new() })
    }

    /// This snapshot's policies with another directory.
    fn with_directory(&self, directory: Directory, live_seq: u64, live_objects: usize) -> Snapshot {
        Snapshot { core: self.core.clone(), directory, live_seq, live_objects, reaper: OnceLock::new() }
    }

    /// The content hash of the bundle (`sha256:…`).
    pub fn revision(&self) -> &Arc<str> {
        &self.core.revision
    }

    /// The number of live directory changes applied since the process started (0: none).
    pub fn live_seq(&self) -> u64 {
        self.live_seq
    }

    /// How many objects the live changes set or remove over the bundle's directory.
    pub fn live_objects(&self) -> usize {
        self.live_objects
    }

    pub fn loaded_at(&self) -> DateTime<Utc> {
        self.core.loaded_at
    }

    /// How long loading, validating and indexing took, in ms (0 if built from a bundle).
    pub fn load_ms(&self) -> u64 {
        self.core.load_ms
    }

    /// The policies of the bundle (off ones too), in file order, then order within the file.
    pub fn policies(&self) -> &[BundlePolicy] {
        self.core.bundle.policies()
    }

    /// What the bundle's files left out or ignored, each naming its file.
    pub fn warnings(&self) -> &[String] {
        self.core.bundle.warnings()
    }

    /// Policies that can never apply to an agent: their scope names no agent, blueprint,
    /// sponsor or resource.
    pub fn unreachable(&self) -> &[Arc<str>] {
        self.core.index.unreachable()
    }

    /// The directory served: the bundle's, with the live changes over it.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The bundle's own directory (`directory.json`).
    pub fn base_directory(&self) -> &Directory {
        self.core.bundle.directory()
    }

    pub fn counts(&self) -> Counts {
        let policies = self.core.bundle.policies();
        let count = |state| policies.iter().filter(|p| p.state == state).count();
        let [users, sponsors, blueprints, agents, resources] = self.directory.counts();
        Counts {
            policies: policies.len(),
            on: count(PolicyState::On),
            report_only: count(PolicyState::ReportOnly),
            off: count(PolicyState::Off),
            agents,
            blueprints,
            sponsors,
            users,
            resources,
            locations: self.core.bundle.locations().len(),
        }
    }

    /// An agent by its id, with its blueprint and sponsor.
    pub fn agent(&self, id: &str) -> Option<AgentRef<'_>> {
        self.directory.agent(id).and_then(|a| self.agent_of(a))
    }

    /// Every agent, in no particular order.
    pub fn agents(&self) -> impl Iterator<Item = AgentRef<'_>> {
        self.directory.agents().filter_map(|a| self.agent_of(a))
    }

    fn agent_of<'a>(&'a self, agent: &'a Agent) -> Option<AgentRef<'a>> {
        // INVARIANT: the directory refuses an agent whose blueprint or sponsor is missing.
        let blueprint = self.directory.blueprint(&agent.blueprint)?;
        let sponsor = self.directory.sponsor(&agent.sponsor)?;
        Some(AgentRef { agent, blueprint, sponsor })
    }

    pub fn blueprint(&self, id: &str) -> Option<&Blueprint> {
        self.directory.blueprint(id).map(|b| &**b)
    }

    pub fn sponsor(&self, id: &str) -> Option<&Sponsor> {
        self.directory.sponsor(id).map(|s| &**s)
    }

    /// A resource by its id or one of its audiences.
    pub fn resource(&self, id_or_audience: &str) -> Option<ResourceRef<'_>> {
        self.directory.resource(id_or_audience).map(|r| ResourceRef { resource: r })
    }

    /// The resource that has `audience` among its audiences (an id does not count).
    pub fn resource_by_audience(&self, audience: &str) -> Option<&Resource> {
        self.directory.resource_by_audience(audience).map(|r| &**r)
    }

    /// The names of the named locations that contain `ip`, in file order.
    pub fn locations_containing(&self, ip: IpAddr) -> impl Iterator<Item = &Arc<str>> {
        self.core.bundle.locations().containing(ip)
    }

    /// The Cedar entity id of an action.
    pub fn action_uid(&self, action: Action) -> &EntityUid {
        &self.core.actions[action.index()]
    }

    /// The request as Cedar takes it: entity ids, the context of DESIGN §3 built as values, no
    /// schema check (our types already guarantee the shape; a unit test checks it against the
    /// schema); and the entities it can reach: the agent, its blueprint and sponsor, the
    /// resource, the user it acts for, the entities the policies name, the actions.
    pub fn cedar_request(
        &self,
        req: &Request,
        agent: AgentRef<'_>,
        resource: ResourceRef<'_>,
        agent_risk: RiskLevel,
    ) -> Result<(CedarRequest, Arc<Entities>), CedarError> {
        let context = self.context(req, agent_risk)?;
        let request = crate::cedar::request(&agent.uid(), self.action_uid(req.action()), &resource.uid(), &context);
        Ok((request, self.entities(req, agent, resource)?))
    }

    /// The request's entities, reused from this thread's last few requests when the same
    /// agent, resource and user were asked about with the same records and policies.
    fn entities(
        &self,
        req: &Request,
        agent: AgentRef<'_>,
        resource: ResourceRef<'_>,
    ) -> Result<Arc<Entities>, CedarError> {
        let user = match &req.ask {
            Ask::Token { user: Some(user), .. } => Some(user.as_str()),
            _ => None,
        };
        let serials = [agent.agent.serial(), resource.resource.serial(), self.directory.others_serial()];
        let key = (self.core.generation, serials);
        let hit = RECENT_ENTITIES.with_borrow(|recent| {
            recent.iter().find(|(k, u, _)| *k == key && u.as_deref() == user).map(|(_, _, e)| e.clone())
        });
        if let Some(entities) = hit.filter(|_| !self.core.names_agents) {
            return Ok(entities);
        }
        let types = EntityTypes::get();
        let core = &self.core;
        let mut all = Vec::with_capacity(7 + core.literals.len());
        all.push(agent.agent.entity(types));
        all.extend(
            self.directory.shared_entities(types, agent.blueprint, agent.sponsor, resource.resource, user).cloned(),
        );
        all.extend(core.literals.iter().filter_map(|uid| self.directory.entity(types, uid)));
        all.extend(core.action_entities.iter().cloned());
        let entities = Arc::new(entities_of(&all)?);
        RECENT_ENTITIES.with_borrow_mut(|recent| {
            if recent.len() == RECENT_ENTITIES_KEPT {
                recent.pop();
            }
            recent.insert(0, (key, user.map(Box::from), entities.clone()));
        });
        Ok(entities)
    }

    fn context(&self, req: &Request, agent_risk: RiskLevel) -> Result<cedar_policy::Context, CedarError> {
        let mut c = ContextBuilder::new();
        c.locations("locations", (self.core.generation, req.client_ip), || {
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
                    c.entity("user", &EntityTypes::uid(&EntityTypes::get().user, user));
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
        entities: &Entities,
    ) -> Evaluated<'a> {
        self.core.index.evaluate(&self.keys(agent, resource, action), request, entities)
    }

    /// How many policies `evaluate_slices` evaluates for such a request.
    pub fn slice_len(&self, agent: AgentRef<'_>, resource: ResourceRef<'_>, action: Action) -> usize {
        self.core.index.slice_len(&self.keys(agent, resource, action))
    }

    /// The whole directory as one Cedar entity set, with the actions: what plain Cedar is
    /// given (benchmarks compare with it; requests never build it).
    pub fn all_entities(&self) -> Result<Entities, CedarError> {
        let mut all = self.directory.all_entities(EntityTypes::get());
        all.extend(self.core.action_entities.iter().cloned());
        entities_of(&all)
    }

    /// Plain Cedar: `policies` against `entities`.
    pub fn is_authorized(&self, request: &CedarRequest, policies: &PolicySet, entities: &Entities) -> Response {
        self.core.authorizer.is_authorized(request, policies, entities)
    }

    /// The index keys of a request by `agent` for `resource` (its id, never an audience).
    fn keys<'a>(&self, agent: AgentRef<'a>, resource: ResourceRef<'a>, action: Action) -> Keys<'a> {
        Keys {
            learned: (!self.core.names_agents)
                .then(|| [agent.agent.serial(), resource.resource.serial(), self.directory.others_serial()]),
            agent: &agent.agent.id,
            blueprint: &agent.blueprint.id,
            sponsor: &agent.sponsor.id,
            action,
            resource: &resource.resource.id,
        }
    }
}

/// What a request's entities depend on: the policies' generation (the entities they name,
/// the actions), and the serials of the agent's record, the resource's record and the rest
/// of the directory; and the user the request acts for.
type EntitiesKey = (u64, [u64; 3]);

/// A recently built entity set: its key, the user it was built for, the entities.
type Recent = (EntitiesKey, Option<Box<str>>, Arc<Entities>);

/// How many requests' entities a thread keeps.
const RECENT_ENTITIES_KEPT: usize = 4;

thread_local! {
    /// The entities of this thread's last few requests, the latest first: a caller's requests
    /// often repeat an agent, and building them is most of what a decision costs beyond Cedar.
    static RECENT_ENTITIES: std::cell::RefCell<Vec<Recent>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

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
        // The clone keeps the policies alive until the reaper drops it (the last holder frees).
        let bulk: Box<dyn Send> = Box::new((self.core.clone(), std::mem::take(&mut self.directory)));
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

/// Why a live directory change did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The change is not valid over the directory served: nothing of it applied.
    Refused(Vec<DirectoryError>),
    /// It is valid but could not be made durable: nothing of it applied.
    NotDurable(String),
}

/// The live directory changes, net, and how many were applied since the process started.
#[derive(Debug, Default)]
struct Live {
    overlay: Overlay,
    seq: u64,
}

/// The current snapshot. Readers take one `Arc` per request; reloads and live directory
/// changes build aside and swap.
pub struct Store {
    dir: PathBuf,
    current: ArcSwap<Snapshot>,
    last_failure: Mutex<Option<ReloadFailure>>,
    /// Serialises reloads and live changes, and holds the live changes, so that a reload lays
    /// them over its new directory.
    live: Mutex<Live>,
    /// Started with the first swap that replaces a snapshot.
    reaper: OnceLock<Option<Reaper>>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, BundleErrors> {
        Store::open_with(dir, &[], 0)
    }

    /// Opens the bundle with live directory changes laid over its directory, in order (the
    /// journal's, at start, the last numbered `seq`). If they no longer apply over it, the
    /// error says why.
    pub fn open_with(dir: &Path, changes: &[Change], seq: u64) -> Result<Store, BundleErrors> {
        let started = Instant::now();
        let bundle = Bundle::load(dir)?;
        let mut overlay = Overlay::default();
        // As the journal has them, not folded: only a rewrite of the journal may fold (see
        // `reload_with`), or a later start would bring back what this one dropped.
        for c in changes {
            overlay.record(c);
        }
        let mut snapshot = Snapshot::with_live(bundle, &overlay, seq)?;
        if let Some(core) = Arc::get_mut(&mut snapshot.core) {
            core.load_ms = started.elapsed().as_millis() as u64;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(snapshot),
            last_failure: Mutex::new(None),
            live: Mutex::new(Live { overlay, seq }),
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

    /// The live changes, net, as one change over the bundle's directory (what a journal
    /// compacts to), and the sequence number of the last.
    pub fn live_change(&self) -> (Change, u64) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        (live.overlay.as_journal(), live.seq)
    }

    /// Calls `f` with the live sequence and the live changes, net, while no reload or live
    /// change can come in between (a journal compaction).
    pub fn with_live_change<T>(&self, f: impl FnOnce(u64, &Change) -> T) -> T {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        f(live.seq, &live.overlay.as_journal())
    }

    fn swap(&self, new: Snapshot) {
        let old = self.current.swap(Arc::new(new));
        // INVARIANT: `old` is held here until it is marked, so whoever drops it last (a request
        // still using it, or this swap) finds the mark.
        if let Some(reaper) = self.reaper.get_or_init(start_reaper) {
            let _ = old.reaper.set(reaper.clone());
        }
    }

    /// Applies a live directory change over the directory served, whole or not at all:
    /// checked (references, removals, the schema), then made durable by `durable` (given the
    /// change's live sequence number, the change as resolved over the directory served, which
    /// is what to keep, and the live changes before it, net, should it need to write them
    /// anew), then swapped in for the next request.
    pub fn apply_directory(
        &self,
        change: &Change,
        durable: impl FnOnce(u64, &Change, &dyn Fn() -> Change) -> Result<(), String>,
    ) -> Result<u64, ApplyError> {
        self.apply_directory_at(None, change, durable)
    }

    /// As `apply_directory`, numbered `at` if given (a fleet's stream sequence, which must be
    /// above the last live number) rather than the next number.
    pub fn apply_directory_at(
        &self,
        at: Option<u64>,
        change: &Change,
        durable: impl FnOnce(u64, &Change, &dyn Fn() -> Change) -> Result<(), String>,
    ) -> Result<u64, ApplyError> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let served = self.current();
        let directory = served.directory.apply(change).map_err(ApplyError::Refused)?;
        check_entities(&directory.entities_of_change(change, EntityTypes::get()), served.core.bundle.schema())
            .map_err(|e| {
                ApplyError::Refused(vec![DirectoryError::Object {
                    object: "the change".into(),
                    message: format!("does not fit the schema: {e}"),
                }])
            })?;
        let seq = at.unwrap_or(live.seq + 1);
        if seq <= live.seq {
            return Err(ApplyError::NotDurable(format!("change #{seq} does not follow #{}", live.seq)));
        }
        let resolved = change.resolved(&served.directory);
        let net = || live.overlay.as_journal();
        durable(seq, &resolved, &net).map_err(ApplyError::NotDurable)?;
        live.seq = seq;
        live.overlay.record(&resolved);
        let objects = live.overlay.len();
        self.swap(served.with_directory(directory, seq, objects));
        Ok(seq)
    }

    /// Builds a new snapshot from the folder, with the live changes laid over its directory,
    /// and swaps it in; on failure keeps the old one. A `directory.json` that did not change is
    /// not read again: the served base directory is kept.
    pub fn reload(&self) -> Reloaded {
        self.reload_with(|_, _| Ok(())).0
    }

    /// As [`Store::reload`], keeping the live changes' journal in step: when a new revision is
    /// swapped in, `compact` is given the live sequence and the live changes as they now lie
    /// over the new bundle (some may be folded into it), to rewrite the journal with. Only if
    /// it succeeds are the folded changes dropped here too: a journal that still holds them
    /// would bring them back at the next start, over whatever bundle is there then. Returns
    /// the result, and `compact`'s error.
    pub fn reload_with(&self, compact: impl FnOnce(u64, &Change) -> Result<(), String>) -> (Reloaded, Option<String>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let served = self.current();
        let from = served.revision().clone();
        let started = Instant::now();
        let mut compacted = None;
        let loaded = Bundle::load_reusing(&self.dir, Some(&served.core.bundle)).and_then(|bundle| {
            if bundle.revision() == &*from {
                return Ok(None);
            }
            let mut overlay = live.overlay.clone();
            overlay.fold(bundle.directory());
            let mut new = Snapshot::with_live(bundle, &overlay, live.seq)?;
            if let Some(core) = Arc::get_mut(&mut new.core) {
                core.load_ms = started.elapsed().as_millis() as u64;
            }
            Ok(Some((new, overlay)))
        });
        let result = match loaded {
            Ok(None) => Reloaded::Unchanged(from),
            Ok(Some((new, overlay))) => {
                let to = new.revision().clone();
                match compact(live.seq, &overlay.as_journal()) {
                    Ok(()) => live.overlay = overlay,
                    // The served directory is the same either way: only what is kept differs.
                    Err(e) => compacted = Some(e),
                }
                self.swap(new);
                Reloaded::Swapped { from, to }
            }
            Err(error) => Reloaded::Failed { kept: from, error },
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
        (result, compacted)
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

    /// A copy of the sample bundle (its files, not its tests) in a folder of its own.
    fn sample_copy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
            }
        }
        dir
    }

    /// Applies `change`, keeping in `journal` what a journal keeps (its resolved form, read back).
    fn apply_journaled(store: &Store, change: &Change, journal: &mut Vec<Change>) {
        store
            .apply_directory(change, |_, resolved, _| {
                journal.push(Change::from_json_str(&resolved.to_json().unwrap()).unwrap());
                Ok(())
            })
            .unwrap();
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
                agent.uid(),
                snap.action_uid(req.action()).clone(),
                resource.uid(),
                ctx,
                Some(snap.core.bundle.schema()),
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
        // The request's entities put the agent in its blueprint and sponsor.
        let req = request(r#"{"agent": "ag-mail-01", "resource": "graph", "flow": "on_behalf_of", "user": "u-bob"}"#);
        let (_, entities) = snap.cedar_request(&req, a, snap.resource("graph").unwrap(), RiskLevel::None).unwrap();
        let types = EntityTypes::get();
        assert!(entities.is_ancestor_of(&EntityTypes::uid(&types.blueprint, "bp-mail"), &a.uid()));
        assert!(entities.is_ancestor_of(&EntityTypes::uid(&types.sponsor, "s-alice"), &a.uid()));
        assert!(!entities.is_ancestor_of(&EntityTypes::uid(&types.blueprint, "bp-other"), &a.uid()));
        assert!(entities.get(&EntityTypes::uid(&types.user, "u-bob")).is_some());
    }

    #[test]
    fn a_live_change_is_decided_on_at_once_by_the_same_thread() {
        use crate::engine::{Verdict, evaluate};
        let store = Store::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies").as_path()).unwrap();
        let live = crate::signals::Overlay::new();
        let req = request(
            r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3"}"#,
        );
        // Twice: the second is served from this thread's recent entities and the memo.
        for _ in 0..2 {
            assert_eq!(evaluate(&store.current(), &live, &req).decision, Verdict::Allow);
        }
        let tags = |env: &str| {
            Change::from_json_str(&format!(
                r#"{{"upsert": {{"agents": [{{"id": "ag-mail-01", "blueprint": "bp-mail", "sponsor": "s-alice",
                    "owners": ["u-bob"], "tags": {{"env": "{env}"}}}}]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(store.apply_directory(&tags("dev"), |_, _, _| Ok(())), Ok(1));
        let d = evaluate(&store.current(), &live, &req);
        assert_eq!(d.reasons[0].policy.as_deref(), Some("prod-resources-need-prod-agents"), "{:?}", d.reasons);
        // The resource changes too (others' serial): its tag no longer asks for prod agents.
        let resource = r#"{"upsert": {"resources": [{"id": "graph", "audiences": ["https://graph.example.com"], "tags": {"env": "test"}}]}}"#;
        assert_eq!(store.apply_directory(&Change::from_json_str(resource).unwrap(), |_, _, _| Ok(())), Ok(2));
        assert_eq!(evaluate(&store.current(), &live, &req).decision, Verdict::Allow);
        // Not durable: nothing applies, and the sequence does not move.
        let refused = store.apply_directory(&tags("prod"), |_, _, _| Err("disk full".into()));
        assert_eq!(refused, Err(ApplyError::NotDurable("disk full".into())));
        assert_eq!(store.current().live_seq(), 2);
        assert_eq!(store.current().live_objects(), 2);
    }

    #[test]
    fn a_policy_naming_another_agent_follows_that_agents_changes() {
        use crate::engine::{Verdict, evaluate};
        let dir = sample_copy();
        // While ag-mail-02 is at high risk, every agent is stopped (a context-free condition,
        // which the memo would keep for ag-mail-01 if it did not know whom it names).
        std::fs::write(
            dir.path().join("named.cedar"),
            r#"@id("stop-while-ag-mail-02-is-risky") forbid(principal, action, resource) when { Agent::"ag-mail-02".risk == "high" };"#,
        )
        .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let live = crate::signals::Overlay::new();
        let req = request(
            r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3"}"#,
        );
        for _ in 0..2 {
            let d = evaluate(&store.current(), &live, &req);
            assert_eq!(d.reasons[0].policy.as_deref(), Some("stop-while-ag-mail-02-is-risky"));
        }
        let calm = r#"{"upsert": {"agents": [{"id": "ag-mail-02", "blueprint": "bp-mail", "sponsor": "s-alice", "risk": "none"}]}}"#;
        store.apply_directory(&Change::from_json_str(calm).unwrap(), |_, _, _| Ok(())).unwrap();
        assert_eq!(evaluate(&store.current(), &live, &req).decision, Verdict::Allow);
    }

    #[test]
    fn a_reload_and_a_restart_serve_the_same_live_directory() {
        let dir = sample_copy();
        let store = Store::open(dir.path()).unwrap();
        // What a journal keeps: each change as resolved, read back from its line.
        let mut journal: Vec<Change> = Vec::new();
        let mut apply = |json: &str| apply_journaled(&store, &Change::from_json_str(json).unwrap(), &mut journal);
        apply(
            r#"{"upsert": {"agents": [{"id": "ag-new", "blueprint": "bp-mail", "sponsor": "s-alice", "tags": {"env": "prod"}}]}}"#,
        );
        apply(r#"{"upsert": {"agents": [{"id": "ag-mail-01", "tags": {"env": "prod", "team": "mail"}}]}}"#);
        // The bundle now has ag-new too, disabled, and renames ag-mail-01.
        let file = dir.path().join(DIRECTORY_FILE);
        let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let agents = doc["agents"].as_array_mut().unwrap();
        agents
            .push(serde_json::json!({"id": "ag-new", "blueprint": "bp-mail", "sponsor": "s-alice", "enabled": false}));
        agents.iter_mut().find(|a| a["id"] == "ag-mail-01").unwrap()["name"] = "Renamed".into();
        std::fs::write(&file, doc.to_string()).unwrap();
        assert!(matches!(store.reload(), Reloaded::Swapped { .. }));
        let reloaded = store.current().directory().to_json().unwrap();
        // A restart replays the journal over the same bundle: the same directory.
        let restarted = Store::open_with(dir.path(), &journal, journal.len() as u64).unwrap();
        assert_eq!(restarted.current().directory().to_json().unwrap(), reloaded);
        // The live creation of ag-new was whole: it wins over the bundle's (until folded); the
        // patch of ag-mail-01 keeps the bundle's new name.
        let snap = restarted.current();
        assert!(snap.agent("ag-new").unwrap().enabled());
        assert_eq!(snap.directory().agent("ag-mail-01").unwrap().name.as_str(), "Renamed");
        assert_eq!(snap.directory().agent("ag-mail-01").unwrap().tags.get("team"), Some("mail"));
    }

    #[test]
    fn a_journal_that_cannot_be_compacted_keeps_what_a_reload_would_fold() {
        let dir = sample_copy();
        let store = Store::open(dir.path()).unwrap();
        let mut journal: Vec<Change> = Vec::new();
        let patch =
            Change::from_json_str(r#"{"upsert": {"agents": [{"id": "ag-mail-01", "tags": {"k": "a"}}]}}"#).unwrap();
        apply_journaled(&store, &patch, &mut journal);
        let file = dir.path().join(DIRECTORY_FILE);
        let tag = |k: &str| {
            let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            doc["agents"].as_array_mut().unwrap().iter_mut().find(|a| a["id"] == "ag-mail-01").unwrap()["tags"] =
                serde_json::json!({ "k": k });
            std::fs::write(&file, doc.to_string()).unwrap();
        };
        // The bundle says what the patch said, but the journal cannot be rewritten: the patch
        // is kept, as the journal keeps it.
        tag("a");
        let (reloaded, error) = store.reload_with(|_, _| Err("disk full".into()));
        assert!(matches!(reloaded, Reloaded::Swapped { .. }) && error.as_deref() == Some("disk full"));
        assert_eq!(store.live_change().0.upsert.len(), 1);
        // The bundle changes again: served and restarted agree (the patch still applies).
        tag("b");
        let (_, error) = store.reload_with(|_, _| Err("disk full".into()));
        assert!(error.is_some());
        let served = store.current().directory().to_json().unwrap();
        let restarted = Store::open_with(dir.path(), &journal, 1).unwrap();
        assert_eq!(restarted.current().directory().to_json().unwrap(), served);
        assert_eq!(store.current().directory().agent("ag-mail-01").unwrap().tags.get("k"), Some("a"));
        // Once the journal is rewritten, the fold holds.
        tag("a");
        let (_, error) =
            store.reload_with(|_, net| if net.upsert.is_empty() { Ok(()) } else { Err("not folded".into()) });
        assert_eq!(error, None);
        assert_eq!(store.live_change().0.upsert.len(), 0);
    }

    #[test]
    fn a_start_folds_nothing_the_journal_still_holds() {
        let dir = sample_copy();
        let store = Store::open(dir.path()).unwrap();
        let mut journal: Vec<Change> = Vec::new();
        let create = Change::from_json_str(r#"{"upsert": {"users": [{"id": "u-new1", "name": "A"}]}}"#).unwrap();
        apply_journaled(&store, &create, &mut journal);
        let file = dir.path().join(DIRECTORY_FILE);
        let users = |add: bool| {
            let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let users = doc["users"].as_array_mut().unwrap();
            users.retain(|u| u["id"] != "u-new1");
            if add {
                users.push(serde_json::json!({"id": "u-new1", "name": "A"}));
            }
            std::fs::write(&file, doc.to_string()).unwrap();
        };
        // The bundle says the same; the journal cannot be rewritten; a start, then the bundle
        // drops the user: the live creation still stands, as it does after the next start.
        users(true);
        assert!(store.reload_with(|_, _| Err("disk full".into())).1.is_some());
        let started = Store::open_with(dir.path(), &journal, 1).unwrap();
        users(false);
        assert!(started.reload_with(|_, _| Err("disk full".into())).1.is_some());
        let served = started.current().directory().to_json().unwrap();
        assert!(served.contains("u-new1"));
        let again = Store::open_with(dir.path(), &journal, 1).unwrap();
        assert_eq!(again.current().directory().to_json().unwrap(), served);

        // What a compaction writes is the overlay exactly: a removal of what the bundle lacks
        // too, which a start would otherwise not find to keep.
        let remove = Change::from_json_str(r#"{"remove": {"users": ["u-new1"]}}"#).unwrap();
        again.apply_directory(&remove, |_, _, _| Ok(())).unwrap();
        let (net, seq) = again.live_change();
        assert_eq!((net.remove.users.as_slice(), seq), (&[smol_str::SmolStr::new("u-new1")][..], 2));
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
        assert_ne!(store.current().revision(), held.revision());
        // Whole until the request drops it; then its bulk goes to the reaper.
        assert!(held.agent("ag-mail-01").is_some());
        assert!(held.reaper.get().is_some());
        assert!(store.current().reaper.get().is_none());
        drop(held);
    }
}
