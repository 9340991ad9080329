//! `agentca validate`: parse and validate a bundle, print what it holds or every error.

use std::path::Path;
use std::process::ExitCode;

use super::{Error, load};

pub fn run(dir: &Path) -> Result<ExitCode, Error> {
    let snap = load(dir)?;
    for w in snap.warnings() {
        errln!("warning: {w}");
    }
    let c = snap.counts();
    outln!(
        "bundle `{}` is valid: {} policies ({} on, {} report-only, {} off), {} agents, {} blueprints, {} sponsors, {} users, {} resources, {} named locations",
        dir.display(),
        c.policies,
        c.on,
        c.report_only,
        c.off,
        c.agents,
        c.blueprints,
        c.sponsors,
        c.users,
        c.resources,
        c.locations,
    )?;
    for id in snap.unreachable() {
        outln!("note: policy `{id}` can never apply: its scope names no agent, blueprint, sponsor or resource")?;
    }
    outln!("revision {}", snap.revision())?;
    Ok(ExitCode::SUCCESS)
}
