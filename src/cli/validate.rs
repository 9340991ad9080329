//! `agentca validate`: parse and validate a bundle, print what it holds or every error.

use std::path::Path;
use std::process::ExitCode;

use crate::bundle::PolicyState;

use super::{Error, load};

pub fn run(dir: &Path) -> Result<ExitCode, Error> {
    let snap = load(dir)?;
    let b = &snap.bundle;
    for w in &b.warnings {
        errln!("warning: {w}");
    }
    let count = |state| b.policies.iter().filter(|p| p.state == state).count();
    let d = &b.directory;
    outln!(
        "bundle `{}` is valid: {} policies ({} on, {} report-only, {} off), {} agents, {} blueprints, {} sponsors, {} users, {} resources, {} named locations",
        dir.display(),
        b.policies.len(),
        count(PolicyState::On),
        count(PolicyState::ReportOnly),
        count(PolicyState::Off),
        d.agents.len(),
        d.blueprints.len(),
        d.sponsors.len(),
        d.users.len(),
        d.resources.len(),
        b.locations.len(),
    )?;
    for id in &snap.index.unreachable {
        outln!("note: policy `{id}` can never apply: its scope names no agent, blueprint, sponsor or resource")?;
    }
    outln!("revision {}", snap.revision)?;
    Ok(ExitCode::SUCCESS)
}
