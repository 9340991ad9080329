//! Live signals: an overlay of agent, blueprint and sponsor state and agent risk, set without
//! reloading the bundle and consulted on every decision. The directory's values are the defaults.

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::directory::RiskLevel;

/// Who set a live value, why, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A live value and its mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live<T> {
    pub value: T,
    #[serde(flatten)]
    pub mark: Mark,
}

/// The overlay of live state. Lookups are lock-free on distinct keys (dashmap shards).
#[derive(Debug, Default)]
pub struct Overlay {
    agent_enabled: DashMap<String, Live<bool>>,
    agent_risk: DashMap<String, Live<RiskLevel>>,
    blueprint_enabled: DashMap<String, Live<bool>>,
    sponsor_active: DashMap<String, Live<bool>>,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn agent_enabled(&self, id: &str) -> Option<Live<bool>> {
        self.agent_enabled.get(id).map(|l| l.clone())
    }

    pub fn agent_risk(&self, id: &str) -> Option<Live<RiskLevel>> {
        self.agent_risk.get(id).map(|l| l.clone())
    }

    pub fn blueprint_enabled(&self, id: &str) -> Option<Live<bool>> {
        self.blueprint_enabled.get(id).map(|l| l.clone())
    }

    pub fn sponsor_active(&self, id: &str) -> Option<Live<bool>> {
        self.sponsor_active.get(id).map(|l| l.clone())
    }

    pub fn set_agent_enabled(&self, id: &str, live: Live<bool>) {
        self.agent_enabled.insert(id.to_string(), live);
    }

    pub fn set_agent_risk(&self, id: &str, live: Live<RiskLevel>) {
        self.agent_risk.insert(id.to_string(), live);
    }

    pub fn set_blueprint_enabled(&self, id: &str, live: Live<bool>) {
        self.blueprint_enabled.insert(id.to_string(), live);
    }

    pub fn set_sponsor_active(&self, id: &str, live: Live<bool>) {
        self.sponsor_active.insert(id.to_string(), live);
    }

    /// Forgets a risk set by a signal: the directory's level applies again.
    pub fn clear_agent_risk(&self, id: &str) {
        self.agent_risk.remove(id);
    }
}
