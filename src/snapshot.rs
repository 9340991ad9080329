//! A snapshot: everything one revision of the bundle needs to decide (policies, index,
//! entities, lookups, locations), built aside and never changed; and the store that holds
//! the current one behind `arc-swap`, so a reload swaps it whole without blocking a request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Instant;

use arc_swap::ArcSwap;
use cedar_policy::{Authorizer, Entities, EntityUid};
use chrono::{DateTime, Utc};

use crate::bundle::{Bundle, BundleError, BundleErrors, DIRECTORY_FILE};
use crate::directory::{Agent, Blueprint, EntityTypes, Resource, Sponsor};
use crate::index::Index;
use crate::request::Action;

/// An agent's place in the snapshot: its entity id and its blueprint and sponsor.
#[derive(Debug)]
pub struct AgentEntry {
    pub index: usize,
    pub uid: EntityUid,
    pub blueprint: usize,
    pub sponsor: usize,
}

/// One revision of the bundle, ready to decide.
pub struct Snapshot {
    pub bundle: Bundle,
    pub revision: Arc<str>,
    pub loaded_at: DateTime<Utc>,
    /// How long loading, validating and indexing took.
    pub load_ms: u64,
    pub entities: Entities,
    pub index: Index,
    pub types: EntityTypes,
    pub authorizer: Authorizer,
    agents: HashMap<String, AgentEntry>,
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
        let directory_file = bundle.dir.join(DIRECTORY_FILE).display().to_string();
        let fail = |message: String| BundleError { file: directory_file.clone(), line: None, column: None, message };
        let entities = bundle.directory.to_entities(&bundle.schema, &types).map_err(&fail)?;
        let index = Index::build(&bundle.policies, &types, &entities);

        let dir = &bundle.directory;
        let position = |ids: &mut dyn Iterator<Item = &String>| -> HashMap<String, usize> {
            ids.enumerate().map(|(i, id)| (id.clone(), i)).collect()
        };
        let blueprints = position(&mut dir.blueprints.iter().map(|b| &b.id));
        let sponsors = position(&mut dir.sponsors.iter().map(|s| &s.id));
        let mut agents = HashMap::with_capacity(dir.agents.len());
        for (index, a) in dir.agents.iter().enumerate() {
            // INVARIANT: Directory::from_json_str rejected every dangling blueprint or sponsor.
            let (Some(&blueprint), Some(&sponsor)) = (blueprints.get(&a.blueprint), sponsors.get(&a.sponsor)) else {
                return Err(fail(format!("agent `{}`: dangling blueprint or sponsor", a.id)).into());
            };
            agents.insert(
                a.id.clone(),
                AgentEntry { index, uid: EntityTypes::uid(&types.agent, &a.id), blueprint, sponsor },
            );
        }
        let mut resources = HashMap::new();
        let mut audiences = HashMap::new();
        for (i, r) in dir.resources.iter().enumerate() {
            resources.insert(r.id.clone(), i);
            for aud in &r.audiences {
                resources.entry(aud.clone()).or_insert(i);
                audiences.entry(aud.clone()).or_insert(i);
            }
        }
        let resource_uids = dir.resources.iter().map(|r| EntityTypes::uid(&types.resource, &r.id)).collect();
        let actions = Action::ALL.map(|a| EntityTypes::uid(&types.action, a.as_str()));
        Ok(Snapshot {
            revision: Arc::from(bundle.revision.as_str()),
            bundle,
            loaded_at: Utc::now(),
            load_ms: 0,
            entities,
            index,
            types,
            authorizer: Authorizer::new(),
            agents,
            blueprints,
            sponsors,
            resources,
            audiences,
            resource_uids,
            actions,
            reaper: OnceLock::new(),
        })
    }

    pub fn agent(&self, id: &str) -> Option<(&Agent, &AgentEntry)> {
        self.agents.get(id).map(|e| (&self.bundle.directory.agents[e.index], e))
    }

    pub fn blueprint(&self, id: &str) -> Option<&Blueprint> {
        self.blueprints.get(id).map(|&i| &self.bundle.directory.blueprints[i])
    }

    pub fn sponsor(&self, id: &str) -> Option<&Sponsor> {
        self.sponsors.get(id).map(|&i| &self.bundle.directory.sponsors[i])
    }

    pub fn blueprint_of(&self, entry: &AgentEntry) -> &Blueprint {
        &self.bundle.directory.blueprints[entry.blueprint]
    }

    pub fn sponsor_of(&self, entry: &AgentEntry) -> &Sponsor {
        &self.bundle.directory.sponsors[entry.sponsor]
    }

    /// A resource by its id or one of its audiences, with its entity id.
    pub fn resource(&self, name: &str) -> Option<(&Resource, &EntityUid)> {
        self.resources.get(name).map(|&i| (&self.bundle.directory.resources[i], &self.resource_uids[i]))
    }

    /// The resource that has `audience` among its audiences (an id does not count).
    pub fn resource_by_audience(&self, audience: &str) -> Option<&Resource> {
        self.audiences.get(audience).map(|&i| &self.bundle.directory.resources[i])
    }

    pub fn action_uid(&self, action: Action) -> &EntityUid {
        &self.actions[action.index()]
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
            std::mem::take(&mut self.bundle.directory),
            std::mem::take(&mut self.bundle.policies),
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
        let served = self.current().revision.clone();
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
    use super::*;

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
